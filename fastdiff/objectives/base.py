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


def noised(x: torch.Tensor, schedule, lo: float, hi: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + sigma * eps, sigma) with sigma drawn by ``sample_sigma`` over [lo, hi] * T, then fresh eps."""
    sigma = sample_sigma(schedule, x.shape[0], lo, hi, x.device)
    return x + expand(sigma, x) * torch.randn_like(x), sigma


class Objective(nn.Module):
    """Base class: ``generator_loss`` and ``critic_loss`` return (loss, logs); no optimizer inside.

    Trainable modules that belong to the critic side (fake score, GAN head) are the objective's
    ``critic_modules``; the trainer gives them their own optimizer.
    """

    def __init__(self, teacher: Denoiser, fake: Denoiser | None, critic_updates: int, gan_head: nn.Module | None = None):
        super().__init__()
        self.teacher = teacher
        self.fake = fake
        self.critic_updates = critic_updates
        self.gan_head = gan_head

    def critic_modules(self) -> list[nn.Module]:
        return [m for m in (self.fake, self.gan_head) if m is not None]

    def fake_denoising_loss(self, x: torch.Tensor, cond=None) -> torch.Tensor:
        """The teacher's training loss (its own target: eps, v, x0 or velocity), on samples x, all noise levels."""
        x = x.detach()
        x_t, sigma = noised(x, self.fake.schedule, 0.0, 1.0)
        x0_hat = self.fake(x_t, sigma, cond, guidance_scale=1.0)
        per_sample = ((x0_hat - x.float()) ** 2).flatten(1).mean(1)
        return (self.fake.loss_weight(sigma).to(x.device) * per_sample).mean()

    def generator_loss(self, x: torch.Tensor, cond=None, real=None):
        raise NotImplementedError

    def critic_loss(self, x: torch.Tensor, cond=None, real=None):
        raise NotImplementedError
