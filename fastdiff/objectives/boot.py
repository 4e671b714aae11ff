"""BOOT: data-free distillation by bootstrapping (Gu, Zhai, Zhang, Liu & Susskind 2023, "BOOT: Data-free
Distillation of Denoising Diffusion Models with Bootstrapping", arXiv 2306.05544, Sec. 3).

Followed: the paper (Sec. 3.1 Signal-ODE, Sec. 3.2 bootstrapping objective); its loss form as re-implemented in
public code by OFTSR, yuanzhi-zhu/OFTSR ``distill_fm.py`` (``distil_loss == "boot"``:
``1 / delta^2 * mse(y_s, sg(y_t + delta (teacher - y_t)))``, delta from the two times' signal-to-noise ratios;
transcribed in tests/test_boot.py). Apple's own BOOT code is not public.

A time-conditioned student ``g(eps, t)`` maps the initial noise eps to the *signal* of the teacher's ODE state
at any time t, ``y_t = (x_t - s_t eps) / a_t`` (VP native ``x_t = a_t x0 + s_t eps``); in fastdiff's VE scale,
with ``rho_t = s_t / a_t``, that is ``y_t = x_t / a_t - rho_t eps``: the ODE state without its noise component,
image-like at every t (``y_0 ~ x_0``), where ``x_t`` itself would be noise. Along the teacher's probability-flow
ODE (the paper's Signal-ODE, Sec. 3.1, ``lambda_t = -log(a_t / s_t) = log rho_t``)

    dy_t / dt = -lambda'_t (f(x_t, t) - y_t),        x_t = a_t y_t + s_t eps   (native)

with f the teacher's x0 estimate. Holding f at its value at t, the step from t down to s < t is exact
(DDIM is exactly this exponential step, in VE: ``x_s = x_t + (rho_s - rho_t)(x_t - f) / rho_t``):

    y_s = y_t + delta (f(a_t y_t + s_t eps, t) - y_t),      delta = 1 - rho_s / rho_t = 1 - exp(lambda_s - lambda_t)

Bootstrapping objective (Sec. 3.2): the student at s regresses onto one teacher step from its own estimate at
t, under stop-gradient, scaled by 1 / delta^2 so every step counts as a finite difference of the ODE:

    L = E_eps,t [ 1/delta^2 || g(eps, s) - sg( g(eps, t) + delta (f(a_t g(eps, t) + s_t eps, t) - g(eps, t)) ) ||^2 ]

No data is read: eps ~ N(0, I) is all the loss draws. t and s are adjacent points of an N-interval grid on the
teacher's table (uniform in timesteps from T-1 down to 0, ``num_intervals``).

Boundary (t = T). The paper fits ``g(eps, T)`` to the teacher's ``f(eps, T)`` with an extra loss: the limit of
y_t as t -> T when a_T -> 0. On a discrete table a_T > 0 and the ODE starts from the native state x_T = eps, so the
signal there is known exactly, ``y_T = (1 - s_T) eps / a_T``; fastdiff anchors the top step of the grid on it (the
target is the teacher's first DDIM step from x_T = eps, the student not read), so ``g`` converges to the teacher's
own N-step DDIM chain from that noise, with no boundary loss and no error from its limit.

The student network (parametrisation). ``g(eps, t)`` is the student Denoiser's x0 estimate for the native input
eps at a network level that runs from the top of the table (t = T, where the teacher copy's estimate is the
paper's boundary ``f(eps, T)``) down to the level the student samples from (t = 0, ``student.sigma_init``): the
network timestep is ``u(t) = t_init + (t / (T - 1)) (T - 1 - t_init)`` with t_init the timestep of sigma_init.
So the one-step sample ``g(eps, 0)`` is exactly fastdiff's ordinary one-step student at sigma_init, and the export
(a one-step LCMScheduler pipeline) reproduces it with no new code. t = 0 cannot sit at the table's timestep 0:
LCMScheduler's boundary scalings make its timestep 0 the identity (the pipeline would return the noise). An
epsilon or v student at sigma_init turns its output into x0 with gain sigma (2.5 for the default ``auto``); near
t = T the gain grows to the top's 1 / a_T, where the targets are the teacher's own top estimate, which the teacher
copy already gives.

Loss weighting: ``boot`` (the paper's 1 / delta^2) or ``uniform``.

Why 100 updates barely move g(eps, 0) on a real epsilon teacher (the CPU ladder, embedded fmnist-ddpm; README's BOOT
parity row has the runs). The paper's student outputs the signal itself; fastdiff's epsilon student reads it with
gain sigma (2.5 at t = 0, ~140 at the top), so the gradient of the paper-weighted loss is 1.3 at the one-step
interval (n = 1), 124 at n = 10, 4.0e3 at n = 40 and 6.3e4 at the top (teacher copy, 50 intervals, batch 4 per
level): a batch's update (clipped, then Adam-normalised, so the clip itself does not shrink it) goes to the top
levels, and g(eps, 0) only improves once the bootstrap has carried the teacher's chain down all 50 intervals.
Dividing that gain out (weight 1 / sigma^2) balances the norms (1.3 / 41 / 10.5 / 20) but lets the top levels drift
(FID 491 after 100 updates, 486 with 8 intervals); lr 1e-4 (OFTSR's) diverges (loss 2e5 by update 50). So the
defaults stay the paper's.

BOOT needs the noise itself, not a one-step sample: ``uses_generator_sample`` is False, so the trainer makes none and
``x`` of ``generator_loss`` is its noise batch, of which only the shape is read.
"""
from __future__ import annotations

import torch

from ..models.denoiser import Denoiser, expand
from ..models.generator import top_timestep
from .base import Objective, finite_mean, per_sample_mean
from .registry import register

WEIGHTINGS = ("boot", "uniform")


class BOOT(Objective):
    """Args:
        teacher: the frozen teacher (its guidance_scale is the CFG of every teacher step).
        student: the student Denoiser, read as ``g(eps, t)`` (module docstring).
        num_intervals: N, grid intervals from the table's top (t = T) to its timestep 0 (t = 0); adjacent grid
            points are the bootstrapping pair (t, s). None: 50.
        loss_weighting: "boot" (1 / delta^2, the paper) or "uniform". None: "boot".
        sigma_max: the student's sampling level, student.sigma_init (the trainer passes it): where g(eps, 0) is
            read. Must lie below the top of a VP table.
    """

    uses_fake_score = False
    uses_generator_sample = False  # the loss draws its own noise and runs g itself: the trainer's sample is not made
    needs_sigma_init = True  # training/setup.py passes student.sigma_init as sigma_max

    def __init__(self, teacher: Denoiser, fake, student: Denoiser, gan_head=None, num_intervals: int | None = None,
                 loss_weighting: str | None = None, sigma_max: float | None = None):
        super().__init__(teacher, None, 0, None)
        schedule = teacher.schedule
        if schedule.kind != "vp":
            raise ValueError("boot needs a VP teacher (DDPM-style table): a flow student samples from t = 1 only")
        num_intervals = 50 if num_intervals is None else num_intervals
        loss_weighting = loss_weighting or "boot"
        if loss_weighting not in WEIGHTINGS:
            raise ValueError(f"objective.loss_weighting must be one of {', '.join(WEIGHTINGS)} for boot, "
                             f"got {loss_weighting!r}")
        T = schedule.num_train_timesteps
        if not 1 <= num_intervals < T:
            raise ValueError(f"objective.num_intervals must be in 1..{T - 1}, got {num_intervals}")
        t_init = top_timestep(teacher, sigma_max)
        if sigma_max is None or t_init >= T - 1:
            raise ValueError("boot reads its one-step sample g(eps, 0) at student.sigma_init: set it below the top "
                             "of the teacher's table (auto: 2.5)")
        self.student = student
        self.loss_weighting = loss_weighting
        self.num_intervals = num_intervals
        timesteps = torch.linspace(0, T - 1, num_intervals + 1, dtype=torch.float64).round()
        # Teacher levels rho_n (its ODE grid) and the student's network levels for the same grid points.
        self.register_buffer("levels", schedule.sigma_at(timesteps), persistent=False)
        net = t_init + timesteps / (T - 1) * (T - 1 - t_init)
        self.register_buffer("net_levels", schedule.sigma_at(net), persistent=False)

    def student_signal(self, eps: torch.Tensor, n: torch.Tensor, cond=None) -> torch.Tensor:
        """g(eps, t_n): the student's signal estimate at grid point n (per sample)."""
        return self.student.denoise_native(eps, self.net_levels[n], cond)

    def top_signal(self, eps: torch.Tensor) -> torch.Tensor:
        """The exact signal at the top, ``y_T = (x_T - s_T eps) / a_T`` with ``x_T = eps`` (the boundary)."""
        top = self.levels[-1].double()
        a, s = self.teacher.schedule.alpha(top), self.teacher.schedule.noise_scale(top)
        return (eps.double() * (1 - s) / a).to(eps.dtype)

    @torch.no_grad()
    def teacher_step(self, y_t: torch.Tensor, eps: torch.Tensor, rho_t: torch.Tensor, rho_s: torch.Tensor,
                     cond=None) -> torch.Tensor:
        """One teacher DDIM step of the Signal-ODE: ``y_t + delta (f(a_t y_t + s_t eps, t) - y_t)``."""
        schedule = self.teacher.schedule
        x_t = expand(schedule.alpha(rho_t), y_t) * y_t + expand(schedule.noise_scale(rho_t), y_t) * eps
        f = self.teacher.denoise_native(x_t, rho_t, cond)
        delta = expand((1 - rho_s.double() / rho_t.double()).float(), y_t)
        return y_t + delta * (f - y_t)

    @torch.no_grad()
    def bootstrap_target(self, eps: torch.Tensor, n: torch.Tensor, cond=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(previous estimate at t_n, target at t_{n-1}): the student's stop-gradient estimate (the exact y_T at
        the top point) and one teacher step from it down to the next grid point."""
        top = (n == self.num_intervals).reshape(-1, *[1] * (eps.ndim - 1))
        y_t = torch.where(top, self.top_signal(eps), self.student_signal(eps, n, cond))
        return y_t, self.teacher_step(y_t, eps, self.levels[n], self.levels[n - 1], cond)

    def generator_loss(self, x, cond=None, real=None):
        eps = torch.randn(x.shape, device=x.device)  # data-free: the loss draws only noise
        n = torch.randint(1, self.num_intervals + 1, (x.shape[0],), device=x.device)
        _, target = self.bootstrap_target(eps, n, cond)
        pred = self.student_signal(eps, n - 1, cond)
        per_sample = per_sample_mean((pred - target) ** 2)
        weight = None
        if self.loss_weighting == "boot":
            weight = ((1 - self.levels[n - 1].double() / self.levels[n].double()) ** -2).float()
        loss = finite_mean(per_sample, weight)
        return loss, {"loss_boot": loss.detach(), "loss_boot_unweighted": finite_mean(per_sample.detach())}


register("boot", BOOT)
