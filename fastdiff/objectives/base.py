"""What every objective shares: the networks it reads, noise-level sampling, the fake-score loss."""
from __future__ import annotations

import torch
from torch import nn

from ..denoiser import Denoiser, expand
from ..schedule import FlowSchedule, VPSchedule


def sample_sigma(schedule: VPSchedule | FlowSchedule, n: int, lo: float, hi: float, device) -> torch.Tensor:
    """Noise levels at timesteps drawn uniformly from [lo, hi] * T (integers for discrete VP teachers)."""
    T = schedule.num_train_timesteps
    if isinstance(schedule, VPSchedule):
        t = torch.randint(int(lo * T), min(int(hi * T), T - 1) + 1, (n,), device=device)
        return schedule.sigma_at(t)
    t = lo + (hi - lo) * torch.rand(n, dtype=torch.float64, device=device)
    t = t.clamp(1.0 / T, 1 - 1e-4)  # flow: stay off t = 1, where sigma is infinite
    return (t / (1 - t)).float()


def edm_sigma(schedule, n: int, device, p_mean: float = -1.2, p_std: float = 1.2,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """EDM's training noise levels, ``ln sigma ~ N(p_mean, p_std^2)`` (Karras et al. 2022, Table 1), kept inside
    the teacher's own range so every level maps to a timestep it was trained on."""
    lo, hi = schedule_range(schedule)
    return (torch.randn(n, device=device, dtype=dtype) * p_std + p_mean).exp().clamp(lo, hi)


def schedule_range(schedule) -> tuple[float, float]:
    T = schedule.num_train_timesteps
    if isinstance(schedule, VPSchedule):
        sig = schedule.sigma_at(torch.tensor([0, T - 1]))
        return float(sig[0]), float(sig[1])
    return 1.0 / (T - 1), float(T - 1)  # flow: t in [1/T, 1 - 1/T]


def finite_samples(*tensors: torch.Tensor) -> torch.Tensor:
    """Per-sample mask: True where every element of every tensor is finite (SiD masks the rest)."""
    ok = torch.ones(tensors[0].shape[0], dtype=torch.bool, device=tensors[0].device)
    for t in tensors:
        ok &= torch.isfinite(t.detach()).reshape(t.shape[0], -1).all(dim=1)
    return ok


def only_finite(ok: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors with the samples outside ``ok`` replaced by zeros.

    A select, not boolean indexing: indexing needs the count of kept samples on the host (a device sync every
    step) and changes shapes under ``torch.compile``. The select's backward passes exactly zero to a dropped
    sample, so a NaN computed from it never reaches the networks' gradients.
    """
    return tuple(torch.where(ok.reshape(-1, *([1] * (t.ndim - 1))), t, torch.zeros_like(t)) for t in tensors)


def finite_mean(per_sample: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of a per-sample loss over the samples where it is finite (optionally weighted per sample)."""
    ok = finite_samples(per_sample)
    (kept,) = only_finite(ok, per_sample if weight is None else weight * per_sample)
    return kept.sum() / ok.sum().clamp(min=1)


def per_sample_mean(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).mean(dim=1)


def noised(x: torch.Tensor, schedule, lo: float, hi: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + sigma * eps, sigma) with sigma drawn by ``sample_sigma`` over [lo, hi] * T, then fresh eps."""
    sigma = sample_sigma(schedule, x.shape[0], lo, hi, x.device)
    return x + expand(sigma, x) * torch.randn_like(x), sigma


class Objective(nn.Module):
    """Base class: ``generator_loss`` and ``critic_loss`` return (loss, logs); no optimizer inside.

    Trainable modules that belong to the critic side (fake score, GAN head) are the objective's
    ``critic_modules``; the trainer gives them their own optimizer.

    ``trains_on``: what the trainer passes as ``x`` to ``generator_loss``: "generator" samples (distribution
    matching) or "data" (consistency distillation, which noises real images and needs no fake score).
    ``step``: the generator update about to run, set by the trainer (schedules such as sCM's warm-up read it).
    """

    trains_on = "generator"
    uses_fake_score = True
    step = 0

    def __init__(self, teacher: Denoiser, fake: Denoiser | None, critic_updates: int, gan_head: nn.Module | None = None):
        super().__init__()
        self.teacher = teacher
        self.fake = fake
        self.critic_updates = critic_updates
        self.gan_head = gan_head

    def critic_modules(self) -> list[nn.Module]:
        return [m for m in (self.fake, self.gan_head) if m is not None]

    def state_modules(self) -> dict[str, nn.Module]:
        """Modules the objective updates itself (a consistency target network) and checkpoints must keep."""
        return {}

    def after_generator_step(self) -> None:
        """Called after each generator optimizer step (e.g. to move an EMA target network)."""

    def fake_denoising_loss(self, x: torch.Tensor, cond=None, weighting: str = "teacher",
                            guidance_scale: float = 1.0) -> torch.Tensor:
        """Denoising loss of the fake score on generator samples x (detached), written in x0 terms.

        weighting "teacher": the teacher's own loss (its target: eps, v, x0 or velocity), timesteps uniform.
        weighting "edm": EDM's loss, ``(sigma^2 + sd^2) / (sigma sd)^2 * |D - x|^2`` with log-normal sigma
        (Karras et al. 2022, Eq. 8 and Table 1), as SiD trains its fake score.
        guidance_scale: CFG on the fake score's own prediction while it trains (SiD-LSG's kappa_1).
        """
        x = x.detach().float()
        if weighting == "edm":
            sigma = edm_sigma(self.fake.schedule, x.shape[0], x.device)
            x_t = x + expand(sigma, x) * torch.randn_like(x)
            weight = (sigma ** 2 + 0.25) / (0.25 * sigma ** 2)  # sigma_data = 0.5
        else:
            x_t, sigma = noised(x, self.fake.schedule, 0.0, 1.0)
            weight = self.fake.loss_weight(sigma).to(x.device)
        x0_hat = self.fake(x_t, sigma, cond, guidance_scale=guidance_scale)
        return finite_mean(per_sample_mean((x0_hat - x) ** 2), weight)

    def generator_loss(self, x: torch.Tensor, cond=None, real=None):
        raise NotImplementedError

    def critic_loss(self, x: torch.Tensor, cond=None, real=None):
        raise NotImplementedError
