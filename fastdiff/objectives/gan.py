"""A GAN head on the fake score's bottleneck (DMD2, Yin et al. 2024, Sec. 4.3).

The fake score network doubles as the discriminator's trunk: a forward hook reads its bottleneck
(UNet ``mid_block`` output, or the middle transformer block) on noised images, and a small head turns
it into one logit per image. Non-saturating losses: generator ``softplus(-D(fake))``, discriminator
``softplus(-D(real)) + softplus(D(fake))``.

SiDA's forms (mingyuanzhou/SiD, branch sida, sida_training/sida_loss.py and sida_training_loop.py) weigh the
same BCE terms by batch means: see :func:`sida_generator_gan_loss` and :func:`sida_discriminator_loss`.
"""
from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from ..models.denoiser import Denoiser
from .base import kept_mean, only_finite


def bottleneck_module(model: nn.Module) -> nn.Module:
    if getattr(model, "mid_block", None) is not None:
        return model.mid_block
    blocks = getattr(model, "transformer_blocks", None)
    if blocks is not None and len(blocks) > 0:
        return blocks[len(blocks) // 2]
    raise ValueError(f"{type(model).__name__} has no mid_block or transformer_blocks for a GAN head")


def bottleneck_channels(model: nn.Module) -> int:
    if getattr(model, "bottleneck_channels", None):  # models that say it (the analytic teacher)
        return model.bottleneck_channels
    cfg = model.config
    if getattr(cfg, "block_out_channels", None):
        return cfg.block_out_channels[-1]
    return cfg.num_attention_heads * cfg.attention_head_dim


def _is_fsdp_root(model: nn.Module) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


class GANHead(nn.Module):
    """Logits from the fake score's bottleneck features; owns only the head's parameters."""

    def __init__(self, fake: Denoiser):
        super().__init__()
        channels = bottleneck_channels(fake.model)
        self.conv = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1), nn.GroupNorm(math.gcd(32, channels), channels), nn.SiLU())
        self.mlp = nn.Sequential(nn.Linear(channels, channels), nn.SiLU(), nn.Linear(channels, 1))
        self._fake = [fake]  # a list keeps the fake score out of this module's parameters
        self._features = None
        self._capturing = False  # other fake-score passes (DM gradient, fake loss) keep nothing
        bottleneck_module(fake.model).register_forward_hook(self._keep)

    def _keep(self, module, args, output):
        if self._capturing:
            features = output[0] if isinstance(output, tuple) else output
            self._features = features
            root = self._fake[0].model
            if features.requires_grad and _is_fsdp_root(root):
                # train.sharding fsdp: FSDP gathers a unit's weights again in backward when the gradient reaches
                # the unit's output. The root unit's output is the fake score's x0, which the head does not use,
                # so that never happens, and backward would reach the root's own layers (conv_in, the time
                # embedding) with their weights freed after forward. The features lead there: gather on them.
                features.register_hook(lambda grad: root.unshard())

    @contextmanager
    def reading(self):
        """Keep the bottleneck features of the fake-score pass run inside, for :meth:`logits`: one pass then gives
        both the fake score's x0 and the logits (SiDA's ``return_flag='encoder_decoder'``)."""
        self._capturing = True
        try:
            yield
        finally:
            self._capturing = False

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict | None = None) -> torch.Tensor:
        with self.reading():
            self._fake[0](x, sigma, cond)
        return self.logits()

    def logits(self) -> torch.Tensor:
        """One logit per image from the features the last :meth:`reading` pass kept."""
        h, self._features = self._features.float(), None
        if h.ndim == 4:
            h = self.conv(h).mean(dim=(2, 3))
        elif h.ndim == 3:  # tokens (B, N, D)
            h = h.mean(dim=1)
        return self.mlp(h).squeeze(1)


def discriminator_gan_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean()


def sida_generator_gan_loss(logits_fake: torch.Tensor, norm: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    """SiDA's generator GAN term: ``BCE(clamp(D, -10, 10), real)`` averaged over the kept samples, times
    ``sum_kept(1 / norm) / B`` with norm = mean|x - y_r| per sample (sida_loss.py divides the batch-mean BCE by each
    sample's weight_factor; the loop sums over samples and divides by the batch). ``ok``: samples kept."""
    (logits,) = only_finite(ok, logits_fake.float())
    bce = kept_mean(ok, F.softplus(-logits.clamp(-10, 10)))
    return bce * only_finite(ok, 1 / norm)[0].sum() / ok.shape[0]


def sida_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor, weight: torch.Tensor,
                            ok: torch.Tensor) -> torch.Tensor:
    """SiDA's discriminator loss: ``sum_kept(lambda(sigma)) / B * (BCE(D(real), 1) + BCE(D(fake), 0)) / 2``, the
    BCEs averaged over the kept samples, lambda the fake-score loss weight at the shared noise level."""
    real, fake, weight = only_finite(ok, logits_real.float(), logits_fake.float(), weight)
    bce = (kept_mean(ok, F.softplus(-real)) + kept_mean(ok, F.softplus(fake))) / 2
    return weight.sum() / ok.shape[0] * bce
