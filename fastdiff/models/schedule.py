"""Noise schedules: the bookkeeping between a teacher's native timesteps and the VE noise level sigma.

Inside fastdiff every noise level is a sigma in the variance-exploding scale, ``x = x0 + sigma * eps``.
A teacher sees its own native input ``x_native = alpha(sigma) * x``:

- VP (DDPM/DDIM/LCM/Euler-discrete schedulers): ``x_t = a_t x0 + s_t eps`` so ``sigma = s_t / a_t`` and
  ``alpha = a_t = 1 / sqrt(1 + sigma^2)``.
- Flow matching: ``x_t = (1 - t) x0 + t eps`` so ``sigma = t / (1 - t)`` and ``alpha = 1 - t``.

Sigma -> timestep: the VP table is interpolated in log-sigma (as k-diffusion's DiscreteSchedule does),
so noise levels between training timesteps stay usable by continuous-time objectives. Values within
1e-3 of a training timestep are snapped onto it, so a sigma read off the table maps back to the exact
integer timestep the teacher was trained on (and that a diffusers scheduler would pass it).
"""
from __future__ import annotations

import math
import numbers

import torch


class VPSchedule:
    kind = "vp"

    def __init__(self, alphas_cumprod: torch.Tensor):
        self.alphas_cumprod = alphas_cumprod.detach().to(torch.float32).cpu()
        self.num_train_timesteps = len(self.alphas_cumprod)
        ac = self.alphas_cumprod.double()
        self.sigmas = ((1 - ac) / ac).sqrt()  # float64, increasing with t
        self._log_sigmas = self.sigmas.log()
        self._tables = {}  # device -> log-sigma table there: lookups never wait for the host
        # Python floats, read once: no tensor-to-number conversion in a step (which would break torch.compile graphs).
        self._range = (float(self.sigmas[0]), float(self.sigmas[-1]))

    def _log_table(self, device) -> torch.Tensor:
        key = str(device)
        if key not in self._tables:
            self._tables[key] = self._log_sigmas.to(device)
        return self._tables[key]

    @property
    def sigma_min(self) -> float:
        return self._range[0]

    @property
    def sigma_max(self) -> float:
        return self._range[1]

    def sigma_at(self, timesteps: torch.Tensor) -> torch.Tensor:
        """sigma for (integer or fractional) timesteps, float32."""
        table = self._log_table(timesteps.device)
        t = timesteps.double().clamp(0, self.num_train_timesteps - 1)
        lo = t.floor().long()
        hi = (lo + 1).clamp(max=self.num_train_timesteps - 1)
        w = t - lo
        log_sigma = (1 - w) * table[lo] + w * table[hi]
        return log_sigma.exp().float()

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """Fractional timestep for sigma (float32), snapped to the integer grid within 1e-3; differentiable."""
        table = self._log_table(sigma.device)
        log_sigma = sigma.double().clamp(self.sigma_min, self.sigma_max).log()
        idx = torch.searchsorted(table, log_sigma).clamp(1, self.num_train_timesteps - 1)
        lo_val, hi_val = table[idx - 1], table[idx]
        t = (idx - 1).double() + (log_sigma - lo_val) / (hi_val - lo_val)
        # Straight-through snap: the value is the integer, the derivative stays d t / d sigma, so
        # continuous-time objectives (sCM's JVP) see the true time derivative everywhere.
        snap = (t.round() - t).detach()
        t = torch.where(snap.abs() < 1e-3, t + snap, t)
        return t.float()

    def alpha(self, sigma: torch.Tensor) -> torch.Tensor:
        """Signal scale a_t of the native input; equals sqrt(alphas_cumprod[t]) on the table."""
        return torch.rsqrt(1 + sigma.double() ** 2).to(sigma.dtype)

    def noise_scale(self, sigma: torch.Tensor) -> torch.Tensor:
        """Noise scale s_t of the native input (a_t * sigma)."""
        s = sigma.double()
        return (s / torch.sqrt(1 + s**2)).to(sigma.dtype)

    def model_timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        return self.timestep(sigma)


class FlowSchedule:
    """Rectified flow, ``x_t = (1 - t) x0 + t eps``, t in (0, 1]; the network is fed ``t * T``."""

    kind = "flow"

    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0):
        self.num_train_timesteps = num_train_timesteps
        self.shift = shift
        t_min = 1.0 / num_train_timesteps
        t_min = shift * t_min / (1 + (shift - 1) * t_min)
        self._t_min = t_min

    @property
    def sigma_min(self) -> float:
        return self._t_min / (1 - self._t_min)

    @property
    def sigma_max(self) -> float:
        return math.inf

    @staticmethod
    def t_of(sigma: torch.Tensor) -> torch.Tensor:
        s = sigma.double()
        return torch.where(torch.isinf(s), torch.ones_like(s), s / (1 + s)).to(sigma.dtype)

    def sigma_at(self, timesteps: torch.Tensor) -> torch.Tensor:
        """sigma for the scheduler's timesteps in [0, T] (t = timesteps / T, before any shift)."""
        t = timesteps.double() / self.num_train_timesteps
        t = self.shift * t / (1 + (self.shift - 1) * t)
        return (t / (1 - t)).float()

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        return self.t_of(sigma) * self.num_train_timesteps

    def alpha(self, sigma: torch.Tensor) -> torch.Tensor:
        return 1 - self.t_of(sigma)

    def noise_scale(self, sigma: torch.Tensor) -> torch.Tensor:
        return self.t_of(sigma)

    def model_timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        return self.timestep(sigma)


def require_steps(num_steps, schedule) -> None:
    """A sampler's step count on the teacher's table: an integer in [1, T]; more steps than the T training
    timesteps would repeat levels (steps of zero length, each a wasted network pass)."""
    from ..errors import FastdiffError

    T = schedule.num_train_timesteps
    if isinstance(num_steps, bool) or not isinstance(num_steps, numbers.Integral) or not 1 <= num_steps <= T:
        raise FastdiffError(f"{num_steps!r} steps: give an integer in [1, {T}], the teacher's timesteps")


def schedule_from_scheduler(scheduler) -> VPSchedule | FlowSchedule:
    """Build the schedule from any diffusers scheduler instance."""
    name = type(scheduler).__name__
    config = scheduler.config
    if "FlowMatch" in name or getattr(config, "prediction_type", None) == "flow_prediction":
        if getattr(config, "use_dynamic_shifting", False):
            raise NotImplementedError(
                f"{name} with use_dynamic_shifting=True: pass a fixed `shift` in the scheduler config"
            )
        return FlowSchedule(config.num_train_timesteps, float(getattr(config, "shift", 1.0)))
    alphas_cumprod = getattr(scheduler, "alphas_cumprod", None)
    if alphas_cumprod is None:
        raise NotImplementedError(f"scheduler {name} has no alphas_cumprod table; fastdiff supports VP and flow schedulers")
    return VPSchedule(torch.as_tensor(alphas_cumprod))
