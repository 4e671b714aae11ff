"""Deterministic trajectories of a teacher's probability-flow ODE: the noise-level grids its samplers walk, and one
iterator that walks them (DDIM / Euler, or EDM's Heun).

Shared by the places that run the teacher's own sampler: ``data.name: teacher`` (``training.teacher_data``), the
reflow pairs (``training.pairs``) and AGD's guided trajectories (``objectives.agd``). It sits in ``models`` so the
objectives may use it too (objectives sit below training in the layering).

The ODE in fastdiff's VE scale is ``dx/dsigma = (x - D(x, sigma)) / sigma``. A DDIM step (eta = 0) is its Euler
step, exact when D is held fixed: from native ``x_t = a_t x0 + s_t eps`` it lands on ``x_s = a_s x0 + s_s eps`` with
the same x0 and eps (Song et al. 2021, Eq. 12); Heun adds EDM's second-order correction (Karras et al. 2022,
Algorithm 1).
"""
from __future__ import annotations

from typing import Iterator, NamedTuple

import torch

from .schedule import FlowSchedule, VPSchedule, require_steps

SAMPLERS = ("ddim", "heun")
KARRAS_POINTS = 1000  # DMD2 edm_guidance.py: --num_train_timesteps 1000


def schedule_range(schedule) -> tuple[float, float]:
    """The smallest and largest sigma the teacher was trained on (flow: t in [1/T, 1 - 1/T])."""
    T = schedule.num_train_timesteps
    if isinstance(schedule, VPSchedule):
        sig = schedule.sigma_at(torch.tensor([0, T - 1]))
        return float(sig[0]), float(sig[1])
    return 1.0 / (T - 1), float(T - 1)


def karras_grid(schedule, device=None, n: int = KARRAS_POINTS, rho: float = 7.0) -> torch.Tensor:
    """n Karras rho=7 noise levels over the teacher's own sigma range, smallest first (DMD2 edm_guidance.py's
    flipped ``get_sigmas_karras``; SiD sid_loss.py evaluates the same curve at continuous positions).
    The ends are the teacher's first and last table entries, so no level falls outside what it was trained on."""
    lo, hi = schedule_range(schedule)
    ramp = torch.linspace(0, 1, n, dtype=torch.float64, device=device)
    sigmas = (hi ** (1 / rho) + (1 - ramp) * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
    return sigmas.clamp(lo, hi).float()


def ddim_levels(schedule, num_steps: int, finite: bool = False) -> torch.Tensor:
    """Levels evenly spaced in the teacher's timesteps, highest first (DDIM's "linspace" spacing).

    VP: the table's timesteps round(linspace(T - 1, 0, K)), down to its smallest level. Flow: linspace(T, 1, K) as
    FlowMatchEulerDiscreteScheduler spaces them (with its shift), from t = 1 (sigma = inf, pure noise).
    ``finite``: round(linspace(T - 1, 1, K)) on a flow table instead, every level finite and above sigma = 0 (AGD
    trains at every level, and a velocity loss weight is infinite at both ends)."""
    require_steps(num_steps, schedule)
    T = schedule.num_train_timesteps
    if not isinstance(schedule, FlowSchedule):
        return schedule.sigma_at(torch.linspace(T - 1, 0, num_steps, dtype=torch.float64).round())
    if finite:
        return schedule.sigma_at(torch.linspace(T - 1, 1, num_steps, dtype=torch.float64).round())
    return schedule.sigma_at(torch.linspace(T, 1, num_steps, dtype=torch.float64))


def trajectory_levels(schedule, num_steps: int, sampler: str = "heun") -> torch.Tensor:
    """The sampler's noise levels, highest first, ending on the teacher's smallest trained level.

    ddim: :func:`ddim_levels`. Unlike a K-step student's trailing levels, which stop at T/K, the endpoint is the x0
    estimate at the table's smallest level. heun: EDM's Karras rho = 7 levels over the teacher's range (Karras et
    al. 2022, Algorithm 1)."""
    if sampler == "heun":
        return karras_grid(schedule, n=num_steps).flip(0)
    return ddim_levels(schedule, num_steps)


class ODEState(NamedTuple):
    """One level of a trajectory: the level, the native input there (what the network reads) and D's x0 there."""

    sigma: torch.Tensor
    x: torch.Tensor
    x0: torch.Tensor


@torch.no_grad()
def ode_trajectory(denoiser, z: torch.Tensor, sigmas: torch.Tensor, cond=None, guidance_scale=None,
                   heun: bool = False) -> Iterator[ODEState]:
    """The probability-flow ODE from native noise z at sigmas[0] through each level: yields one :class:`ODEState` a
    level, highest first; the last state's x0 is the sample (the step to sigma = 0). Euler steps are deterministic
    DDIM (eta = 0); ``heun`` adds EDM's second-order correction to every step between two finite levels.

    ``guidance_scale``: CFG of every evaluation (a number, or one per sample). Each state costs one denoiser call,
    a Heun step one more; a step is computed only when the next state is asked for."""
    sigmas = sigmas.to(z.device)
    schedule = denoiser.schedule

    def at(x_native, sigma):  # (the slope (x - x0) / sigma, x in the VE scale, x0)
        x0 = denoiser.denoise_native(x_native, sigma, cond, guidance_scale)
        if torch.isinf(sigma):  # x / sigma -> the native noise: Euler from here is exact
            return x_native, x_native, x0
        x = x_native / schedule.alpha(sigma)
        return (x - x0) / sigma, x, x0

    x_native = z
    slope, x, x0 = at(x_native, sigmas[0])
    for i in range(len(sigmas)):
        yield ODEState(sigmas[i], x_native, x0)
        if i + 1 == len(sigmas):
            return
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x_next = x0 + sigma_next * slope  # Euler: x_s = x0 + sigma_s eps, the DDIM step in the VE scale
        if heun and not torch.isinf(sigma):
            slope_next, _, _ = at(x_next * schedule.alpha(sigma_next), sigma_next)
            x_next = x + (sigma_next - sigma) * (slope + slope_next) / 2
        x_native = x_next * schedule.alpha(sigma_next)
        slope, x, x0 = at(x_native, sigma_next)


def ode_sample(denoiser, z: torch.Tensor, sigmas: torch.Tensor, cond=None, guidance_scale=None,
               heun: bool = False) -> torch.Tensor:
    """The end of :func:`ode_trajectory`: the x0 estimate at the last level."""
    for state in ode_trajectory(denoiser, z, sigmas, cond, guidance_scale, heun):
        pass
    return state.x0
