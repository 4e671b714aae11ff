"""Adaptive teacher-student sampling: the one-step student draws every image, a critic scores each one, and
only the worst go through a few teacher steps (issue 24 item 5).

Refinement is SDEdit (Meng et al. 2022): re-noise the student's sample to a level ``sigma_refine``,
``x_native = a x0 + s eps``, then run the teacher's deterministic DDIM (Euler on the probability-flow ODE,
as ``sampling.ddim_sample``) from there to 0. ``sigma_refine=None`` is the top of the schedule, where the
teacher's own sampler starts from pure noise (``x_native = eps``, as ``Generator`` and diffusers pipelines
start); there the refined image no longer depends on the student's, so refining everything is plain teacher
sampling from the refinement noise.

Critics map samples to a per-sample score:
- ``DenoisingError(denoiser, sigma)``: re-noise at ``sigma`` and denoise with the teacher (or the fake score);
  the per-sample mean squared error to the sample is high off the data manifold (higher = worse, 1 NFE);
- ``CallableCritic(fn, nfe, higher_is_better)``: anything else, e.g. a CLIP score. Inference sits below
  evaluation in the package's layers, so the caller builds the CLIP scorer and passes it as a callable
  (README "Adaptive sampling" shows one).

NFE per image: the student's steps + the critic's NFE (it scores every image; skipped when the worst fraction is
0 or 1, where scores decide nothing) + the refined share x the teacher's steps. A guided teacher's step counts
as one evaluation here, as ``fastdiff bench`` and the papers count steps.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import FastdiffError
from ..models.denoiser import Denoiser, expand
from ..models.generator import Generator, step_sigmas


class DenoisingError:
    """Per-sample MSE between a sample and ``denoiser``'s estimate of it after re-noising at ``sigma``.

    The noise comes from a generator seeded with ``seed`` (drawn on the CPU, so scores repeat across devices)."""

    higher_is_better = False
    nfe = 1

    def __init__(self, denoiser: Denoiser, sigma: float, seed: int = 0):
        if not sigma > 0:
            raise FastdiffError(f"the denoising-error critic needs a noise level sigma > 0, got {sigma}")
        self.denoiser, self.sigma, self.rng = denoiser, float(sigma), torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def __call__(self, x0: torch.Tensor, cond: dict | None = None) -> torch.Tensor:
        eps = torch.randn(x0.shape, generator=self.rng, dtype=x0.dtype).to(x0.device)
        estimate = self.denoiser(x0 + self.sigma * eps, torch.tensor(self.sigma), cond)
        return (estimate - x0).float().pow(2).flatten(1).mean(1)


@dataclass
class CallableCritic:
    """A user's score ``fn(x0, cond) -> (B,)``; ``nfe``: network evaluations it costs per image (1 for CLIP)."""

    fn: Callable[[torch.Tensor, dict | None], torch.Tensor]
    nfe: int = 0
    higher_is_better: bool = False

    def __call__(self, x0: torch.Tensor, cond: dict | None = None) -> torch.Tensor:
        return torch.as_tensor(self.fn(x0, cond)).reshape(-1)


@dataclass
class AdaptiveResult:
    samples: torch.Tensor
    scores: torch.Tensor | None  # the critic's raw scores (None when it was not run)
    refined: torch.Tensor  # (B,) bool: which samples the teacher refined
    nfe_per_image: float

    @property
    def refined_share(self) -> float:
        return int(self.refined.sum()) / self.refined.numel()  # counts, so 2 of 10 is exactly 2 / 10


def refine(teacher: Denoiser, x0: torch.Tensor, noise: torch.Tensor, num_steps: int,
           sigma_refine: float | None = None, cond: dict | None = None) -> torch.Tensor:
    """SDEdit: re-noise ``x0`` to ``sigma_refine`` with ``noise`` and take ``num_steps`` teacher DDIM steps to 0.

    VP teachers: the levels are those of a ``num_steps``-step sampler started at ``sigma_refine`` (snapped to
    the nearest training timestep, LCM rule on the truncated table, as ``Generator``); flow teachers: evenly
    spaced in t from ``t_refine``. ``None`` (or a level at the top) starts from the noise alone."""
    levels = refine_levels(teacher, num_steps, sigma_refine).to(x0.device)
    schedule = teacher.schedule
    if sigma_refine is None or levels[0] >= schedule.sigma_max:
        z = noise
    else:
        z = expand(schedule.alpha(levels[0]), x0) * x0 + expand(schedule.noise_scale(levels[0]), x0) * noise
    estimate = teacher.denoise_native(z, levels[0], cond)
    for prev, sigma in zip(levels[:-1], levels[1:]):  # the DDIM step of sampling.ddim_sample
        eps = z if torch.isinf(prev) else (z / schedule.alpha(prev) - estimate) / prev
        z = (estimate + sigma * eps) * schedule.alpha(sigma)
        estimate = teacher.denoise_native(z, sigma, cond)
    return estimate


def refine_levels(teacher: Denoiser, num_steps: int, sigma_refine: float | None) -> torch.Tensor:
    if num_steps < 1:
        raise FastdiffError(f"teacher refinement needs at least one step, got {num_steps}")
    if sigma_refine is not None and not sigma_refine > 0:
        raise FastdiffError(f"the refinement level sigma_refine must be > 0 (or None: the top), got {sigma_refine}")
    if sigma_refine is not None and math.isinf(sigma_refine):
        sigma_refine = None  # a flow teacher's top (sigma_max = inf) is the top, not t = inf / inf
    return step_sigmas(teacher, num_steps, sigma_refine)  # flow teachers: uniform in flow time below sigma_refine


class AdaptiveSampler:
    """Student first, the teacher only where the critic says so.

    Args:
        student: the one-step (or few-step) student Generator.
        teacher: the teacher's Denoiser (refines with DDIM).
        critic: ``DenoisingError``, ``CallableCritic`` or any callable with ``nfe`` and ``higher_is_better``.
        fraction: refine the worst ``round(fraction * B)`` samples of each batch (ties: the lower index first), or
        threshold: refine samples whose score is worse than it (exactly one of the two).
        sigma_refine: SDEdit level (None: the top, pure noise); teacher_steps: DDIM steps from there.
    """

    def __init__(self, student: Generator, teacher: Denoiser, critic=None, fraction: float | None = None,
                 threshold: float | None = None, sigma_refine: float | None = None, teacher_steps: int = 4):
        if (fraction is None) == (threshold is None):
            raise FastdiffError("adaptive sampling needs exactly one of fraction (the worst share) or threshold")
        if fraction is not None and not 0 <= fraction <= 1:
            raise FastdiffError(f"fraction must lie in [0, 1], got {fraction}")
        if critic is None and (threshold is not None or 0 < fraction < 1):
            raise FastdiffError("adaptive sampling with a threshold or a fraction in (0, 1) needs a critic")
        if critic is not None and not (hasattr(critic, "nfe") and hasattr(critic, "higher_is_better")):
            raise FastdiffError("a critic needs nfe and higher_is_better: wrap a plain function in CallableCritic")
        refine_levels(teacher, teacher_steps, sigma_refine)  # bad levels fail here, not after the student ran
        self.student, self.teacher, self.critic = student, teacher, critic
        self.fraction, self.threshold = fraction, threshold
        self.sigma_refine, self.teacher_steps = sigma_refine, teacher_steps

    @torch.no_grad()
    def __call__(self, z: torch.Tensor, cond: dict | None = None, rng: torch.Generator | None = None,
                 student_rng: torch.Generator | None = None) -> AdaptiveResult:
        """z: the student's noise; rng: the refinement noise (one draw per sample of the batch, refined or not,
        so a sample's refinement does not depend on which others are refined)."""
        x0 = self.student(z, cond, rng=student_rng)
        n = x0.shape[0]
        noise = torch.randn(z.shape, generator=rng, dtype=z.dtype, device=rng.device if rng else z.device).to(z.device)
        scores, critic_nfe = None, 0
        if self.fraction in (0.0, 1.0):
            refined = torch.full((n,), bool(self.fraction), device=x0.device)
        else:
            scores = self.critic(x0, cond).to(x0.device)
            critic_nfe = self.critic.nfe
            refined = self.select(scores)
        out = x0.clone()
        if refined.any():
            idx = refined.nonzero().squeeze(1)
            out[idx] = refine(self.teacher, x0[idx], noise[idx], self.teacher_steps, self.sigma_refine,
                              subset(cond, idx, n))
        share = int(refined.sum()) / n
        return AdaptiveResult(out, scores, refined, self.student.levels().numel() + critic_nfe + share * self.teacher_steps)

    def select(self, scores: torch.Tensor) -> torch.Tensor:
        """Which samples are worse than the threshold, or the worst fraction; non-finite scores count as worst."""
        badness = -scores.double() if self.critic.higher_is_better else scores.double()
        badness = torch.where(torch.isfinite(badness), badness, torch.full_like(badness, math.inf))
        if self.threshold is not None:
            limit = -self.threshold if self.critic.higher_is_better else self.threshold
            return badness > limit
        k = math.floor(self.fraction * len(scores) + 0.5)
        order = torch.sort(-badness, stable=True).indices  # worst first, ties by index
        refined = torch.zeros(len(scores), dtype=torch.bool, device=scores.device)
        refined[order[:k]] = True
        return refined


def subset(cond: dict | None, idx: torch.Tensor, batch: int) -> dict | None:
    """The conditions of the samples ``idx``: every per-sample tensor (first dimension = batch) is indexed."""
    if cond is None:
        return None
    return {k: v[idx] if torch.is_tensor(v) and v.ndim and v.shape[0] == batch else v for k, v in cond.items()}
