"""Consistency functions on top of a student Denoiser.

A consistency model maps any point of a probability-flow ODE trajectory to its origin and must be the
identity at the smallest noise level. Discrete consistency distillation builds that boundary into the
network (Song et al. 2023, "Consistency Models", Eq. 5-6):
``f(x, t) = c_skip(t) x + c_out(t) D(x, t)`` with ``c_skip(t_min) = 1`` and ``c_out(t_min) = 0``.
fastdiff uses LCM's scalings on the teacher's native input and timestep (Luo et al. 2023, Eq. 4; the
formula of diffusers' ``LCMScheduler``), ``c_skip = sd^2 / ((k t)^2 + sd^2)``, ``c_out = k t / sqrt((k t)^2 + sd^2)``
with ``sd = 0.5`` and ``k = timestep_scaling``: both are exact at timestep 0, and an exported
``LCMScheduler`` with the same ``timestep_scaling`` applies the very same function, so a K-step pipeline
reproduces fastdiff's sampler.

The continuous-time objective (sCM) needs no such scalings: in TrigFlow the x0 estimate is already
``cos(t) x_t - sin(t) sd F``, the identity at t = 0 (see ``objectives/scm.py``).

Where consistency students start (``consistency_start``, issue 26): an epsilon network's x0 estimate is
``(x_native - s eps) / a``, so a change of its output moves the image ``1 / a`` times as far. At the top of a
linear-beta DDPM table ``1 / a = 157``: measured on the fmnist-ddpm teacher (eval/results/consistency-cpu/), the
x0 moved per unit weight step grows with ``1 / a`` (0.5 at t = 20, 138 at t = 700, 1783 at t = 999), the cd loss
gradient of the top 10% of levels is 10-100x that of the rest, and above t ~ 750 the teacher's own x0 estimate is
worse than the per-pixel data mean (RMSE 0.57 at t = 800, 1.86 at t = 999, against 0.51), so the consistency
targets there are noise too. Epsilon students
on VP teachers therefore start (and train) at the highest table level with ``1 / a <= 15`` (Stable Diffusion's
top, where LCM is run), snapped down so its table length is a multiple of 8 (DDIMScheduler's trailing timesteps
then equal fastdiff's for K = 1, 2, 4, 8); pure noise is fed there, as SD's pipelines do. v / x0 / flow students
have ``x0 = a x - s v`` (bounded by 1) and start at the top.
"""
from __future__ import annotations

import torch

from .denoiser import Denoiser, expand

SIGMA_DATA = 0.5  # LCMScheduler's fixed sigma_data
MAX_X0_GAIN = 15.0  # 1 / a_t at a consistency student's first level: SD's top (1 / sqrt(0.00466) = 14.6)
TABLE_MULTIPLE = 8


def consistency_start(denoiser: Denoiser) -> float | None:
    """First (and highest training) noise level of a consistency student: None = the top of the schedule;
    for epsilon students on VP tables the highest level with ``1 / a_t <= MAX_X0_GAIN`` (see the module docstring)."""
    schedule = denoiser.schedule
    if denoiser.prediction_type != "epsilon" or schedule.kind != "vp":
        return None
    sigmas = schedule.sigmas  # float64, increasing with t
    ok = torch.nonzero((1 + sigmas**2).sqrt() <= MAX_X0_GAIN).flatten()
    top = int(ok[-1]) if len(ok) else 0
    if top == schedule.num_train_timesteps - 1:
        return None
    top = max((top + 1) // TABLE_MULTIPLE * TABLE_MULTIPLE - 1, 0)
    return float(schedule.sigma_at(torch.tensor([top]))[0])


def boundary_scalings(timestep: torch.Tensor, timestep_scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_skip, c_out) at native timesteps, in float32 with LCMScheduler's operation order."""
    scaled = timestep.float() * timestep_scaling
    c_skip = SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2)
    c_out = scaled / (scaled**2 + SIGMA_DATA**2) ** 0.5
    return c_skip, c_out


def network_view(model, like: Denoiser, timestep_scaling: float | None = None) -> Denoiser:
    """``model`` as a Denoiser with ``like``'s schedule, parametrisation and null class; with the consistency
    boundary condition when ``timestep_scaling`` is given (cd students, in training and once exported)."""
    if timestep_scaling is None:
        return Denoiser(model, like.schedule, like.prediction_type, null_class=like.null_class)
    return ConsistencyDenoiser(model, like.schedule, like.prediction_type, like.null_class, timestep_scaling)


class ConsistencyDenoiser(Denoiser):
    """A student Denoiser whose x0 estimate obeys the consistency boundary condition.

    Args (beyond :class:`Denoiser`):
        timestep_scaling: LCM's k; 10 as in LCM. Larger values make f = D everywhere but near timestep 0.
    """

    def __init__(self, model, schedule, prediction_type: str, null_class: int | None = None,
                 timestep_scaling: float = 10.0):
        super().__init__(model, schedule, prediction_type, null_class=null_class)
        self.timestep_scaling = timestep_scaling

    def denoise_native(self, x_native: torch.Tensor, sigma: torch.Tensor, cond: dict | None = None,
                       guidance_scale: float | None = None) -> torch.Tensor:
        sigma = self._per_sample(sigma, x_native)
        x0 = super().denoise_native(x_native, sigma, cond, guidance_scale)
        c_skip, c_out = boundary_scalings(self.schedule.model_timestep(sigma), self.timestep_scaling)
        return expand(c_out, x0) * x0 + expand(c_skip, x0) * x_native.float()
