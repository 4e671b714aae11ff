"""DMD2: improved distribution matching distillation (Yin et al., NeurIPS 2024; tianweiy/DMD2).

Generator: the gradient of KL(p_fake || p_real) over noise levels, estimated by the difference of two
denoisers on the noised generator sample (DMD, Yin et al. CVPR 2024, Eq. 7), normalised per sample by
``mean |x - x0_real|`` (DMD Eq. 8, no gradient through the weight), applied through the surrogate
``0.5 * ||x - stopgrad(x - grad)||^2`` whose gradient w.r.t. x is exactly ``grad`` (per element / numel).
Fake score: the teacher's own denoising loss on generator samples, at every noise level.
CFG enters the real score only. Optional GAN head on the fake score's bottleneck (DMD2 Sec. 4.3).

VSD / SwiftBrush (``weighting="vsd"``; Wang et al. 2023 "ProlificDreamer" Eq. 9, Nguyen & Tran 2024
"SwiftBrush"): the same KL gradient, ``w(t) (eps_real - eps_fake)`` with ``w(t) = s_t^2`` instead of the
per-sample normalisation. In x0 terms (``eps = (x_t - a y) / s`` on the native scale) that is
``a_t s_t (y_fake - y_real)``; the fake score is a LoRA on the teacher and updates 1:1 (the trainer's
``objective.fake_lora_rank`` and ``critic_updates`` defaults for "vsd").
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..denoiser import Denoiser, expand
from .base import Objective, noised
from .gan import GANHead, discriminator_gan_loss, generator_gan_loss


class DMD2(Objective):
    """Distribution matching with a fake score trained faster than the generator (two time-scale rule).

    Args:
        teacher: the frozen real score (its guidance_scale is the real-score CFG).
        fake: the fake score, a trainable copy of the teacher.
        min_t, max_t: fraction of the teacher's timesteps for the distribution-matching noise levels
            (DMD2: [0.02, 0.98] T).
        critic_updates: fake-score updates per generator update (DMD2: 5 class-conditional, 10 text).
        gan_head: optional GAN head (needs real images); weights for its generator / critic terms.
        weighting: "dmd" (per-sample normalisation) or "vsd" (see the module docstring).
        fake_loss: the fake score's loss, "teacher" (its own, DMD2) or "edm".
    """

    def __init__(self, teacher: Denoiser, fake: Denoiser, min_t: float = 0.02, max_t: float = 0.98,
                 critic_updates: int = 5, gan_head: GANHead | None = None,
                 gan_generator_weight: float = 3e-3, gan_critic_weight: float = 1e-2, weighting: str = "dmd",
                 fake_loss: str = "teacher"):
        super().__init__(teacher, fake, critic_updates, gan_head)
        if weighting not in ("dmd", "vsd"):
            raise ValueError(f"weighting must be dmd or vsd, got {weighting!r}")
        self.weighting = weighting
        self.fake_loss = fake_loss
        self.min_t, self.max_t = min_t, max_t
        self.gan_generator_weight = gan_generator_weight
        self.gan_critic_weight = gan_critic_weight

    def dm_gradient(self, x: torch.Tensor, x_t: torch.Tensor, sigma: torch.Tensor, cond) -> torch.Tensor:
        """The KL gradient on x, no graph: (x0_fake - x0_real) / mean|x - x0_real| (DMD) or a s (x0_fake - x0_real) (VSD)."""
        with torch.no_grad():
            x0_real = self.teacher(x_t, sigma, cond)
            x0_fake = self.fake(x_t, sigma, cond, guidance_scale=1.0)
            if self.weighting == "vsd":
                schedule = self.teacher.schedule
                weight = expand(schedule.alpha(sigma) * schedule.noise_scale(sigma), x).to(x0_real.dtype)
            else:
                weight = 1 / (x.detach() - x0_real).abs().mean(dim=tuple(range(1, x.ndim)), keepdim=True)
            grad = (x0_fake - x0_real) * weight
        return torch.nan_to_num(grad)

    def generator_loss(self, x, cond=None, real=None):
        x_t, sigma = noised(x.detach(), self.teacher.schedule, self.min_t, self.max_t)
        grad = self.dm_gradient(x, x_t, sigma, cond)
        loss = 0.5 * F.mse_loss(x.float(), (x - grad).detach().float())
        logs = {"loss_dm": loss.detach()}
        if self.gan_head is not None:
            logits = self.gan_head(*noised(x, self.teacher.schedule, self.min_t, self.max_t), cond)
            gan = generator_gan_loss(logits)
            logs["loss_gan_g"] = gan.detach()
            loss = loss + self.gan_generator_weight * gan
        return loss, logs

    def critic_loss(self, x, cond=None, real=None):
        loss = self.fake_denoising_loss(x, cond, self.fake_loss)
        logs = {"loss_fake": loss.detach()}
        if self.gan_head is not None:
            if real is None:
                raise ValueError("the DMD2 GAN head needs real images (data.path)")
            x_real, cond_real = real
            logits_fake = self.gan_head(*noised(x, self.teacher.schedule, self.min_t, self.max_t), cond)
            logits_real = self.gan_head(*noised(x_real, self.teacher.schedule, self.min_t, self.max_t), cond_real)
            gan = discriminator_gan_loss(logits_real, logits_fake)
            logs["loss_gan_d"] = gan.detach()
            loss = loss + self.gan_critic_weight * gan
        return loss, logs
