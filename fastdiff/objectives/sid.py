"""SiD: score identity distillation (Zhou et al., ICML 2024; mingyuanzhou/SiD), SiDA and SiD-LSG.

Generator loss per sample (SiD Sec. 3-4, Algorithm 1; reference ``sid_loss.py``):
``(y_r - y_f) . ((y_r - x) - alpha (y_r - y_f)) / mean|x - y_r|`` with ``y_r``, ``y_f`` the teacher and fake
x0 estimates at ``x_t = x + sigma eps``; the denominator has no gradient, everything else backpropagates
through the frozen teacher and fake networks into the generator sample x. With alpha = 0.5 and an exact
fake score this is half the gradient of the x0-space Fisher divergence ``E||y_r - y_f||^2`` (tested);
SiD uses alpha = 1.2 (1.0 for text-to-image). Noise levels: timesteps in [min_t, max_t] T, t <= 0.8 T.
Fake score: EDM's denoising loss, one update per generator update. Samples with non-finite values are
masked out of the loss. The generator EMA is the trainer's.

SiDA (Zhou et al. 2025, "Adversarial Score identity Distillation"): a GAN head on the fake score,
real images, alpha = 1, and the generator loss ``0.5 * SiD + 0.5 * GAN / mean|x - y_r|``.
SiD-LSG (Zhou et al. 2024, "Long and Short Guidance"): CFG scales for the real score (the teacher's
guidance_scale), the fake score in the generator loss (``fake_guidance``) and the fake score while it
trains (``fake_train_guidance``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..denoiser import Denoiser
from .base import Objective, finite_samples, noised, only_finite, per_sample_mean
from .gan import GANHead, discriminator_gan_loss


def sid_loss(x: torch.Tensor, y_real: torch.Tensor, y_fake: torch.Tensor, alpha: float) -> torch.Tensor:
    """Per-sample SiD generator loss (mean over elements), normalised by mean|x - y_real| without gradient."""
    with torch.no_grad():
        norm = per_sample_mean((x - y_real).abs()).clamp(min=1e-5)
    diff = y_real - y_fake
    return per_sample_mean(diff * ((y_real - x) - alpha * diff)) / norm


class SiD(Objective):
    """Score identity distillation; with a ``gan_head`` it is SiDA.

    Args:
        teacher, fake: the frozen real score (its guidance_scale is the real-score CFG) and the fake score.
        alpha: weight of the ``||y_r - y_f||^2`` term (SiD: 1.2; SiDA: 1.0).
        min_t, max_t: fraction of the teacher's timesteps for the generator-loss noise levels (SiD: t <= 0.8 T).
        critic_updates: fake-score updates per generator update (SiD: 1).
        fake_guidance, fake_train_guidance: SiD-LSG's CFG scales for the fake score.
        fake_loss: "edm" (SiD) or "teacher" (the teacher's own loss).
        gan_head, gan_weight: SiDA's head and its share of both losses (0.5).
    """

    def __init__(self, teacher: Denoiser, fake: Denoiser, alpha: float = 1.2, min_t: float = 0.0,
                 max_t: float = 0.8, critic_updates: int = 1, fake_guidance: float = 1.0,
                 fake_train_guidance: float = 1.0, fake_loss: str = "edm", gan_head: GANHead | None = None,
                 gan_weight: float = 0.5):
        super().__init__(teacher, fake, critic_updates, gan_head)
        self.alpha, self.min_t, self.max_t = alpha, min_t, max_t
        self.fake_guidance, self.fake_train_guidance = fake_guidance, fake_train_guidance
        self.fake_loss = fake_loss
        self.gan_weight = gan_weight

    def generator_loss(self, x, cond=None, real=None):
        x = x.float()
        x_t, sigma = noised(x, self.teacher.schedule, self.min_t, self.max_t)
        y_real = self.teacher(x_t, sigma, cond).float()
        y_fake = self.fake(x_t, sigma, cond, guidance_scale=self.fake_guidance).float()
        ok = finite_samples(x, y_real, y_fake)
        per_sample = sid_loss(*only_finite(ok, x, y_real, y_fake), self.alpha)
        loss = only_finite(ok, per_sample)[0].sum() / x.shape[0]
        logs = {"loss_sid": loss.detach(), "nonfinite_samples": (~ok).sum()}
        if self.gan_head is not None:
            with torch.no_grad():
                norm = per_sample_mean((x - y_real).abs()).clamp(min=1e-5)
            logits = self.gan_head(x_t, sigma, cond)
            gan = only_finite(ok, F.softplus(-logits.float()) / norm)[0].sum() / x.shape[0]
            logs["loss_gan_g"] = gan.detach()
            loss = (1 - self.gan_weight) * loss + self.gan_weight * gan
        return loss, logs

    def critic_loss(self, x, cond=None, real=None):
        loss = self.fake_denoising_loss(x, cond, self.fake_loss, self.fake_train_guidance)
        logs = {"loss_fake": loss.detach()}
        if self.gan_head is not None:
            if real is None:
                raise ValueError("SiDA's GAN head needs real images (data.path)")
            x_real, cond_real = real
            logits_fake = self.gan_head(*noised(x.detach(), self.teacher.schedule, self.min_t, self.max_t), cond)
            logits_real = self.gan_head(*noised(x_real, self.teacher.schedule, self.min_t, self.max_t), cond_real)
            gan = discriminator_gan_loss(logits_real, logits_fake)
            logs["loss_gan_d"] = gan.detach()
            loss = (1 - self.gan_weight) * loss + self.gan_weight * gan
        return loss, logs
