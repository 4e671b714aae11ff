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
        # Each of the encoder's down blocks but the last halves the size (the pipelines' vae_scale_factor);
        # AutoencoderDC (Sana's DC-AE) names them encoder_block_out_channels.
        blocks = getattr(cfg, "block_out_channels", None) or cfg.encoder_block_out_channels
        self.factor = 2 ** (len(blocks) - 1)
        self.image_channels = cfg.in_channels

    def image_shape(self, latent_shape: tuple[int, int, int]) -> tuple[int, int, int]:
        _, h, w = latent_shape
        return (self.image_channels, h * self.factor, w * self.factor)

    @torch.no_grad()
    def posterior(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> the VAE posterior's (mean, std), concatenated on the channels, in the VAE's dtype
        on the images' device: what ``sample`` draws from, so a data set can be encoded once (``data.cache_latents``)."""
        vae = self.vae
        encoded = vae.encode(images.to(device=vae.device, dtype=vae.dtype))
        if not hasattr(encoded, "latent_dist"):  # a deterministic encoder (AutoencoderDC): the latent, std 0
            return torch.cat([encoded.latent, torch.zeros_like(encoded.latent)], dim=1).to(images.device)
        dist = encoded.latent_dist
        return torch.cat([dist.mean, dist.std], dim=1).to(images.device)

    def sample(self, posterior: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """A draw from ``posterior`` (as ``posterior`` returns it), as float32 latents in the teacher's scale."""
        mean, std = posterior.chunk(2, dim=1)
        noise = torch.randn(mean.shape, generator=generator, device=generator.device if generator else mean.device)
        z = mean + std * noise.to(mean)
        return (z.float() - self.shift) * self.scale

    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [-1, 1] -> latents in the teacher's scale (a sample of the VAE's posterior)."""
        return self.sample(self.posterior(images), generator)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [-1, 1] (not clamped), in float32 on the latents' device."""
        vae = self.vae
        z = latents.to(device=vae.device, dtype=vae.dtype) / self.scale + self.shift
        return vae.decode(z, return_dict=False)[0].float().to(latents.device)
