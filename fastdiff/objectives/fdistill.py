"""f-distill: distribution matching with an f-divergence (Xu et al. 2025, "One-step Diffusion Models with f-Divergence
Distribution Matching"; reference code NVlabs/FastGen fastgen/methods/distribution_matching/f_distill.py and
fastgen/configs/methods/config_f_distill.py).

The gradient of ``D_f(p_real,t || p_fake,t) = E_fake[f(r)]``, ``r = p_real,t / p_fake,t``, with respect to the generator
is DMD's score difference weighted per sample by ``h(r) = f''(r) r^2`` (the paper's Eq. 8 and Table 1):
``grad = h(r) (s_fake - s_real) . dx/dtheta``. Reverse KL (``f = -log r``) has ``h = 1``: DMD itself. fastdiff applies
``h`` to DMD2's per-sample-normalised gradient (``(x0_fake - x0_real) / mean|x - x0_real|``), as FastGen's
``variational_score_distillation_loss(..., additional_scale=h)`` does.

The ratio comes from the GAN head: its logistic discriminator (real = 1) is at its optimum at
``logit = log(p_real / p_fake)``, so ``r = exp(logit)``, read at the same noised generator sample and noise level as the
DMD gradient (one fake-score pass gives both). FastGen's normalisation, followed step by step:
1. the logit is clamped to [-10, 10] and ``r`` to ``[ratio_lower, ratio_upper]`` = [0.1, 20];
2. ``r`` is divided by the mean ratio of its noise-level bin (``ratio_bins`` = 10 equal bins of the timestep range the
   DMD levels are drawn from; FastGen bins its ``t`` range), kept as an EMA across steps (``ratio_ema_rate``: 0 on
   CIFAR-10, i.e. this batch's bin means; 0.5 on ImageNet-64); ``ratio_bins = 0`` skips this step;
3. ``h(r)`` is divided by its batch mean, so only the relative weights of the samples change.
Across processes (torch.distributed with more than one) the bin counts and ratio sums of step 2 and the sum and count
of ``h`` in step 3 are all-reduced, as FastGen's ``world_size() > 1`` branches do: every process normalises by the
global batch's statistics and keeps the same bins (only the main process's copy is checkpointed). The bin EMA is
checkpointed (``state_modules``). Everything else (fake score, GAN losses) is DMD2's; the generator's GAN term uses
DMD2's weights (FastGen's f-distill configs: ``gan_loss_weight_gen`` 1e-3 to 3e-3). The two time-scale rule and the
optimizer follow FastGen's f-distill configs, not DMD2's scripts: ``critic_updates`` 4 (``student_update_freq`` 5, of
whose iterations every 5th updates the student instead of the critic; 9 where dmd2 gives text teachers 10: SD1.5's
``student_update_freq`` 10) and no learning-rate warm-up (``warm_up_steps [0]`` for all three schedulers).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..errors import FastdiffError
from ..models.denoiser import Denoiser
from .dmd2 import DMD2
from .gan import GANHead
from .registry import register

# h(r) = f''(r) r^2, up to the constant factor the batch normalisation removes (Xu et al. 2025, Table 1; FastGen
# f_distill.py ``all_f_div_weighting_function``). f of each: rkl -log r; kl r log r;
# js r log r - (1 + r) log((1 + r) / 2); sf (softened reverse KL) (1 + r) log((1 + r) / (2 r)); sh (squared Hellinger)
# (sqrt(r) - 1)^2; jf (Jeffreys) (r - 1) log r; neyman (Neyman chi^2) (1 - r)^2 / r; chi2 (Pearson chi^2, Uni-Instruct's
# "Chi-Square") (r - 1)^2.
DIVERGENCES = {
    "rkl": lambda r: torch.ones_like(r),
    "kl": lambda r: r,
    "js": lambda r: r / (1 + r),
    "sf": lambda r: 1 / (1 + r),
    "sh": lambda r: r.sqrt(),
    "jf": lambda r: 1 + r,
    "neyman": lambda r: 1 / r,
    "chi2": lambda r: r * r,
}


def check_divergence(divergence: str) -> None:
    if divergence not in DIVERGENCES:
        raise FastdiffError(f"objective.divergence must be one of {', '.join(DIVERGENCES)}, got {divergence!r}")


def processes() -> int:
    """The number of torch.distributed processes (1 when it is not initialised)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def summed_over_processes(*stats: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Each of ``stats`` (same shape) summed over all processes, in float64, with one all-reduce."""
    packed = torch.stack([s.double() for s in stats])
    dist.all_reduce(packed)
    return packed.unbind(0)


class DensityRatio(nn.Module):
    """Per-sample ``r = p_real / p_fake`` from discriminator logits, clamped and normalised per noise-level bin.

    ``position``: each sample's timestep as a fraction of the range its level was drawn from, in [0, 1].
    """

    def __init__(self, ratio_lower: float = 0.1, ratio_upper: float = 20.0, bins: int = 10, ema_rate: float = 0.0):
        super().__init__()
        if not 0 < ratio_lower <= ratio_upper:
            raise FastdiffError(f"objective.ratio_lower / ratio_upper must satisfy 0 < lower <= upper, got "
                                f"{ratio_lower}, {ratio_upper}")
        if bins < 0 or not 0 <= ema_rate < 1:
            raise FastdiffError(f"objective.ratio_bins must be >= 0 and ratio_ema_rate in [0, 1), got {bins}, "
                                f"{ema_rate}")
        self.lower, self.upper, self.ema_rate = ratio_lower, ratio_upper, ema_rate
        self.register_buffer("bins", torch.ones(bins))  # running mean ratio per bin (FastGen: ``net.bins``)

    @torch.no_grad()
    def forward(self, logits: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        r = logits.detach().float().clamp(-10, 10).exp().clamp(self.lower, self.upper)
        n = self.bins.numel()
        if n == 0:
            return r
        ok = torch.isfinite(r)  # a NaN logit stays NaN (the caller masks that sample) and stays out of the bins
        idx = (position.double() * n).floor().long().clamp(0, n - 1)
        count = torch.bincount(idx, weights=ok.double(), minlength=n)
        total = torch.bincount(idx, weights=torch.where(ok, r, 0).double(), minlength=n)
        if processes() > 1:  # the global batch's bin means, the same bins on every process (FastGen all-reduces)
            count, total = summed_over_processes(count, total)
        seen = count > 0
        new = torch.where(seen, total / count.clamp(min=1), 0).to(self.bins.dtype)
        self.bins.copy_(torch.where(seen, self.ema_rate * self.bins + (1 - self.ema_rate) * new, self.bins))
        return r / self.bins[idx]


def normalised(h: torch.Tensor) -> torch.Tensor:
    """``h`` over its mean across the finite samples of the global batch (every process's, all-reduced when there
    are several; the mean of the result is 1; a constant h gives exactly 1)."""
    ok = torch.isfinite(h)
    total, count = torch.where(ok, h, 0).sum(), ok.sum()
    if processes() > 1:
        total, count = summed_over_processes(total, count)
    mean = (total / count.clamp(min=1)).to(h.dtype)
    return h / mean.clamp(min=1e-12)


def level_position(schedule, sigma: torch.Tensor, min_t: float, max_t: float) -> torch.Tensor:
    """Where each level sits in the drawn timestep range [min_t, max_t] * T, as a fraction in [0, 1]."""
    t = schedule.timestep(sigma).double() / schedule.num_train_timesteps
    return ((t - min_t) / max(max_t - min_t, 1e-12)).clamp(0, 1)


class FDistill(DMD2):
    """DMD2 with the DMD gradient weighted per sample by ``h(r)`` of an f-divergence (see the module docstring).

    Args:
        divergence: the f, one of :data:`DIVERGENCES` ("js": FastGen's default; "kl" in its CIFAR-10 config;
            "rkl" is DMD2 exactly).
        ratio_lower, ratio_upper: the clamp of ``r`` (FastGen: 0.1, 20).
        ratio_bins, ratio_ema_rate: the per-level normalisation of ``r`` (FastGen: 10 bins, EMA 0; 0 bins = off).
        critic_updates: fake-score and GAN-head updates per generator update (FastGen's f-distill: 4, from
            ``student_update_freq`` 5; :meth:`teacher_defaults`: 9 on SD1.5-type text teachers).
        gan_head: required (the discriminator that estimates ``r``; it needs real images).
        The rest: as :class:`~fastdiff.objectives.dmd2.DMD2`.
    """

    def __init__(self, teacher: Denoiser, fake: Denoiser, divergence: str = "js", ratio_lower: float = 0.1,
                 ratio_upper: float = 20.0, ratio_bins: int = 10, ratio_ema_rate: float = 0.0, min_t: float = 0.02,
                 max_t: float = 0.98, critic_updates: int = 4, gan_head: GANHead | None = None,
                 gan_generator_weight: float = 3e-3, gan_critic_weight: float = 1e-2, fake_loss: str = "teacher",
                 sigma_grid: str | None = None):
        if gan_head is None:
            raise FastdiffError("fdistill estimates the density ratio with a GAN head: it needs real images "
                                "(data.path)")
        check_divergence(divergence)
        super().__init__(teacher, fake, min_t, max_t, critic_updates, gan_head, gan_generator_weight,
                         gan_critic_weight, "dmd", fake_loss, sigma_grid)
        self.divergence = divergence
        self.ratio = DensityRatio(ratio_lower, ratio_upper, ratio_bins, ratio_ema_rate)
        self._weight_logs: dict = {}

    @classmethod
    def teacher_defaults(cls, teacher) -> dict:
        """One critic update fewer than dmd2's on text teachers: FastGen's ``student_update_freq`` counts the
        student's iteration (``iteration % student_update_freq == 0``: student, else fake score and discriminator),
        10 in ``SD15/config_f_distill.py`` (9 critic updates) and the default 5 in ``SDXL/config_f_distill.py`` (4)."""
        dmd2 = super().teacher_defaults(teacher)
        return {**dmd2, "critic_updates": dmd2["critic_updates"] - 1} if "critic_updates" in dmd2 else dmd2

    def train_defaults(self) -> dict:
        """DMD2's optimizer (AdamW (0.9, 0.999), weight decay 0.01: FastGen's ``BaseOptimizerConfig``, which its
        f-distill configs keep) without its warm-up: ``config_f_distill.py`` sets ``warm_up_steps [0]`` for the
        student's, the fake score's and the discriminator's schedulers."""
        return {**super().train_defaults(), "lr_warmup_steps": 0}

    def state_modules(self) -> dict[str, nn.Module]:
        return {"density_ratio": self.ratio}

    def f_weights(self, logits: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Normalised ``h(r)`` per sample for discriminator logits at noise levels sigma."""
        r = self.ratio(logits, level_position(self.teacher.schedule, sigma, self.min_t, self.max_t))
        return normalised(DIVERGENCES[self.divergence](r))

    def dm_gradient(self, x, x_t, sigma, cond):
        """DMD2's gradient times ``h(r)``, the logits read off the fake score's own pass at (x_t, sigma)."""
        with self.gan_head.reading():
            grad = super().dm_gradient(x, x_t, sigma, cond)
        with torch.no_grad():
            h = self.f_weights(self.gan_head.logits(), sigma)
        ok = torch.isfinite(h)
        self._weight_logs = {"h_min": torch.where(ok, h, torch.inf).min(),
                             "h_max": torch.where(ok, h, -torch.inf).max()}
        return grad * h.reshape(-1, *[1] * (grad.ndim - 1)).to(grad.dtype)

    def generator_loss(self, x, cond=None, real=None):
        loss, logs = super().generator_loss(x, cond, real)
        return loss, {**logs, **self._weight_logs}


register("fdistill", FDistill, needs_gan=True)
