"""The student generator: a Denoiser initialised from the teacher, sampled in one or a few steps.

One step: ``G(z, c) = D_student(x_init, sigma_init, c)`` where the initial state is pure noise in the
teacher's native input space, ``x_native = z`` (what diffusers pipelines feed at the first timestep).
In the VE scale that is ``x = z / alpha(sigma_init)``, i.e. ``sigma_init * z`` up to the factor
``sqrt(1 + 1 / sigma_init^2)`` (1 + 2e-5 at the top of a DDPM schedule); fastdiff uses the native
form so an exported pipeline reproduces the student exactly.

Why sigma_init matters: an epsilon-prediction student at the top of a linear DDPM schedule returns
``x0 = (x - s eps) / a`` with ``1 / a = 157``, so each optimizer step on eps moves the image 157 times
as far (and bf16 rounding of eps becomes visible noise). Starting lower (SiD uses sigma 2.5) keeps the
one-step map well conditioned.

K steps: denoise, then re-noise the x0 estimate with fresh noise to the next level,
``x_native = alpha x0 + s eps``, the LCM / multi-step DMD2 sampler (``sampler="lcm"``). ``sampler="ddim"``
re-noises with the noise the step itself implies, ``eps = (x_native - alpha x0) / s`` (deterministic
multi-step consistency sampling, TCD with gamma = 0; diffusers' DDIMScheduler with eta = 0 and trailing
timesteps is the same step, and the export uses it). On a VP teacher the K levels are
the timesteps that diffusers' ``LCMScheduler(original_inference_steps=T).set_timesteps(K)`` picks
(999, 499 for K=2; 999, 749, 499, 249 for K=4), so the export needs no custom scheduler.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import FastdiffError
from ..lazy import lazy_names
from .denoiser import Denoiser, expand
from .schedule import FlowSchedule, require_steps

# step_timesteps, the flow-map pipeline's rule, was imported here; it is now imported on use (diffusers with it)
__getattr__, __dir__ = lazy_names(__name__, __package__, {
    "step_timesteps": "fastdiff.pipelines.pipeline_fastdiff_flow_map"}, globals())


SAMPLERS = ("lcm", "ddim")


def top_timestep(denoiser: Denoiser, sigma_init: float | None) -> int:
    """The VP table timestep a student starts from: T-1, or the one nearest to sigma_init."""
    T = denoiser.schedule.num_train_timesteps
    if sigma_init is None:
        return T - 1
    return int(denoiser.schedule.timestep(torch.tensor([float(sigma_init)])).round().item())


def flow_time_levels(first: torch.Tensor, num_steps: int) -> torch.Tensor:
    """K levels uniform in flow time below the first level sigma_0: ``t_i = t_0 (K - i) / K`` with
    ``t = sigma / (1 + sigma)`` (t_0 = 1 for sigma_0 = inf), returned as sigma = t / (1 - t), highest first."""
    first = first.double()
    t0 = torch.where(torch.isinf(first), torch.ones_like(first), first / (1 + first))
    t = t0 * (num_steps - torch.arange(num_steps, dtype=torch.float64)) / num_steps
    sigmas = t / (1 - t)
    sigmas[0] = first
    return sigmas.float()


def step_sigmas(denoiser: Denoiser, num_steps: int, sigma_init: float | None = None) -> torch.Tensor:
    """Noise levels of a K-step student, highest first.

    On a VP teacher a sigma_init below the top is snapped to the nearest training timestep t0 and the
    K levels follow the LCM rule on the truncated table [0, t0]: an exported LCMScheduler whose betas are
    the teacher's first t0 + 1 betas reproduces them exactly.
    """
    schedule = denoiser.schedule
    require_steps(num_steps, schedule)  # the student's and ddim_sample's levels alike
    if isinstance(schedule, FlowSchedule):
        # t_i = t_0 (K - i) / K; the first level is pure noise (t_0 = 1, sigma = inf) unless sigma_init is given (the
        # library's callers only: the trainer refuses it on flow teachers), whose t_0 the later levels then divide.
        return flow_time_levels(torch.tensor(float("inf") if sigma_init is None else float(sigma_init)), num_steps)
    # One rule for the student and the flow-map pipeline that must reproduce it: the pipeline file's (it imports only
    # diffusers, so the rule lives there), imported on first use so that importing the objectives (config checks do)
    # does not load diffusers.
    from fastdiff.pipelines.pipeline_fastdiff_flow_map import step_timesteps

    top = top_timestep(denoiser, sigma_init)
    return schedule.sigma_at(torch.tensor(step_timesteps(top + 1, num_steps))).float()


class Generator(nn.Module):
    """A student Denoiser driven as a K-step sampler.

    Args:
        denoiser: the student network as a Denoiser (same schedule and parametrisation as the teacher).
        num_steps: number of sampling steps the student is trained for (1 = one-step generator).
        sigma_init: noise level of the first step; None = the top of the teacher's schedule.
        sampler: "lcm" (fresh noise between steps) or "ddim" (the implied noise; needs sigma_init at the top).
    """

    def __init__(self, denoiser: Denoiser, num_steps: int = 1, sigma_init: float | None = None, sampler: str = "lcm"):
        super().__init__()
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
        if not isinstance(denoiser, Denoiser):  # e.g. load_teacher's Teacher: its .denoiser is the one
            raise FastdiffError(f"Generator takes a Denoiser (a Teacher's .denoiser), got {type(denoiser).__name__}")
        self.denoiser = denoiser
        self.num_steps = num_steps
        self.sigma_init = sigma_init
        self.sampler = sampler
        self.register_buffer("sigmas", step_sigmas(denoiser, num_steps, sigma_init), persistent=False)

    def levels(self, num_steps: int | None = None) -> torch.Tensor:
        if num_steps is None or num_steps == self.num_steps:
            return self.sigmas
        return step_sigmas(self.denoiser, num_steps, self.sigma_init).to(self.sigmas.device)

    def renoise(self, x0: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Native input at level sigma for clean x0: ``alpha x0 + s eps``."""
        schedule = self.denoiser.schedule
        sigma = sigma.expand(x0.shape[0])
        return expand(schedule.alpha(sigma), x0) * x0 + expand(schedule.noise_scale(sigma), x0) * noise

    def forward(self, z: torch.Tensor, cond: dict | None = None, num_steps: int | None = None,
                rng: torch.Generator | None = None) -> torch.Tensor:
        """Sample: z is the initial noise (N(0, I) in native scale); fresh noise for re-noising comes from rng."""
        sigmas = self.levels(num_steps)

        def fresh():  # drawn on the generator's device, as diffusers' randn_tensor does, so CPU seeds match on GPU
            return torch.randn(z.shape, generator=rng, device=rng.device if rng else z.device, dtype=z.dtype).to(z.device)

        x_native = x0 = z
        for i, sigma in enumerate(sigmas):
            x0 = self.denoiser.denoise_native(x_native, sigma, cond)
            if i + 1 < len(sigmas):
                x_native = self.next_input(x_native, x0, sigma, sigmas[i + 1], fresh)
        return x0

    def next_input(self, x_native: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor,
                   fresh_noise) -> torch.Tensor:
        """The native input of the next step: x0 re-noised to ``sigma_next`` with the sampler's noise.

        "ddim" uses the noise the step implies, ``(x_native - alpha x0) / s``; "lcm" calls ``fresh_noise()``
        (only then, so a ddim step draws nothing from the RNG).
        """
        if self.sampler == "ddim":
            schedule = self.denoiser.schedule
            noise = (x_native - expand(schedule.alpha(sigma), x0) * x0) / expand(schedule.noise_scale(sigma), x0)
        else:
            noise = fresh_noise()
        return self.renoise(x0, sigma_next, noise)

    def training_sample(self, z: torch.Tensor, cond: dict | None = None) -> torch.Tensor:
        """A sample with gradient through the last step only.

        Multi-step students are trained by backward simulation (DMD2, Yin et al. 2024, Sec. 4.5): pick a
        step k, run the current student without gradient through steps < k, as at inference, and train
        the k-th step on its own input distribution. The earlier steps re-noise as the sampler does
        (``student.sampler``), so a ddim student trains on the deterministic trajectory it samples.
        """
        if self.num_steps == 1:
            return self.denoiser.denoise_native(z, self.sigmas[0], cond)
        k = int(torch.randint(self.num_steps, (1,)).item())  # CPU draw: choosing k needs no device sync
        x_native = z
        with torch.no_grad():
            for i in range(k):
                x0 = self.denoiser.denoise_native(x_native, self.sigmas[i], cond)
                x_native = self.next_input(x_native, x0, self.sigmas[i], self.sigmas[i + 1], lambda: torch.randn_like(z))
        return self.denoiser.denoise_native(x_native, self.sigmas[k], cond)
