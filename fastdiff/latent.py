"""Latent space: the teacher's VAE around the Denoiser.

Denoisers, objectives and students work on latents; images enter (real images for GAN heads and
consistency distillation) through ``encode`` and leave (sample grids, evaluation, export checks) through
``decode``, with the scaling and shift factors of the VAE's config, as diffusers pipelines apply them:
``latents = (vae.encode(x).sample - shift) * scale`` and ``x = vae.decode(latents / scale + shift)``.
"""
from __future__ import annotations

import torch


class Latents:
    def __init__(self, vae):
        self.vae = vae.requires_grad_(False).eval()
        cfg = vae.config
        self.scale = float(cfg.scaling_factor)
        self.shift = float(getattr(cfg, "shift_factor", None) or 0.0)
        # Each of the encoder's down blocks but the last halves the size (the pipelines' vae_scale_factor).
        self.factor = 2 ** (len(cfg.block_out_channels) - 1)
        self.image_channels = cfg.in_channels

    def image_shape(self, latent_shape: tuple[int, int, int]) -> tuple[int, int, int]:
        _, h, w = latent_shape
        return (self.image_channels, h * self.factor, w * self.factor)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [-1, 1] -> latents in the teacher's scale (a sample of the VAE's posterior)."""
        vae = self.vae
        x = images.to(device=vae.device, dtype=vae.dtype)
        dist = vae.encode(x).latent_dist
        noise = torch.randn(dist.mean.shape, generator=generator, device=generator.device if generator else x.device)
        z = dist.mean + dist.std * noise.to(dist.mean)
        return ((z.float() - self.shift) * self.scale).to(images.device)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [-1, 1] (not clamped), in float32 on the latents' device."""
        vae = self.vae
        z = latents.to(device=vae.device, dtype=vae.dtype) / self.scale + self.shift
        return vae.decode(z, return_dict=False)[0].float().to(latents.device)
