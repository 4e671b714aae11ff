"""Continuous-time consistency distillation in TrigFlow (sCM; Lu & Song 2024, "Simplifying, Stabilizing and
Scaling Continuous-Time Consistency Models", Eq. 6-8 and Alg. 1).

TrigFlow writes a noised sample as ``x_t = cos(t) x0 + sin(t) eps sd`` (t in [0, pi/2]), which is the VE
point ``x = x_t / cos(t)`` at ``sigma = sd tan(t)``; fastdiff keeps its VE Denoisers and converts. The
consistency function is ``f(x_t, t) = cos(t) x_t - sin(t) sd F(x_t, t)``; with the student's x0 estimate
D that is ``F = (cos(t) x_t - D) / (sd sin(t))``, and the teacher's ODE velocity is
``dx_t/dt = (cos(t) x_t - D_teacher) / sin(t)``. The continuous-time CM gradient is carried by

    g = -cos^2(t) (sd F- - dx_t/dt) - r cos(t) sin(t) (x_t + sd dF-/dt)      (sCM Eq. 8, r: warm-up 0 -> 1)
    g <- g / (rms(g) + c),   loss = |F_theta - stopgrad(F_theta + g)|^2        (tangent normalisation)

``cos(t) sin(t) dF-/dt`` is one forward-mode JVP of F with tangents ``(cos sin dx_t/dt, cos sin)``; where
JVP cannot pass (fused attention kernels without forward-mode AD, e.g. xformers), a central finite
difference of the same tangent is used. ``tangent="auto"`` tries the JVP (with SDPA's math backend,
which supports it) and falls back for good, with a warning, at the first failure.

Weighting (sCM Sec. 4.2 and Alg. 1; reference NVlabs/FastGen fastgen/methods/consistency_model/sCM.py
``_scm_pred_to_loss``): the per-sample loss ``mean((F - F- - g)^2)`` is multiplied by the prior weighting
``1 / sigma`` (``1 / (sd tan t)``; ``prior_weighting``) and, with ``adaptive_weighting``, by ``exp(-logvar(t))`` plus
``logvar(t)``, where ``logvar`` is a small network on Fourier features of the noise level (EDM2's uncertainty head)
trained with the generator (``generator_modules``). At the optimum of ``logvar`` the generator's per-sample weight
is 1 / (the expected loss at t), which equalises the noise levels. FastGen's default ``divide_x_0_spatial_dim``
divides the element mean by the element count D once more; that only shifts the learned logvar by log D at its
optimum, so fastdiff keeps the paper's ``||.||^2 / D``.
Optimizer (sCM App. and FastGen's config_scm.py): Adam betas (0.9, 0.99), eps 1e-8 (torch's default), no weight
decay; tangent warm-up over 10k updates.
"""
from __future__ import annotations

import math
import warnings

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..models.denoiser import Denoiser, expand
from .base import Objective, edm_sigma, finite_mean
from .guidance import TeacherGuidance
from .registry import register

TANGENTS = ("auto", "jvp", "finite_difference")
SIGMA_DATA = 0.5


def scm_tangent(F, dF_dt, x_t, dxt_dt, t, r: float) -> torch.Tensor:
    """sCM Eq. 8's tangent with sCM's warm-up r (both the x_t and the JVP term scaled by r), before normalisation.
    ``dF_dt`` is ``cos(t) sin(t) dF/dt`` along the teacher ODE, ``dxt_dt`` the teacher's TrigFlow velocity."""
    cos, sin = expand(torch.cos(t), x_t), expand(torch.sin(t), x_t)
    return -cos**2 * (SIGMA_DATA * F.detach() - dxt_dt) - r * (cos * sin * x_t + SIGMA_DATA * dF_dt)


class AdaptiveLogVariance(nn.Module):
    """logvar(sigma) of sCM's adaptive weighting: a linear layer on fixed random Fourier features of
    ``ln(sigma) / 4`` (EDM2's ``logvar_fourier``, ``MPFourier``), zero-initialised so the weighting starts at 1.
    The layer is a plain ``nn.Linear`` with a bias, as FastGen's ``logvar_linear`` (``networks/EDM/network.py``; it
    reads the network's own timestep embedding); EDM2's ``logvar_linear`` is a weight-normalised ``MPConv`` without
    one. The features are drawn from their own seeded generator: building the objective leaves the global RNG alone."""

    def __init__(self, channels: int = 128, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("freqs", 2 * math.pi * torch.randn(channels, generator=gen))
        self.register_buffer("phases", 2 * math.pi * torch.rand(channels, generator=gen))
        self.linear = nn.Linear(channels, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, sigma: torch.Tensor) -> torch.Tensor:
        c_noise = sigma.to(self.freqs.dtype).log().unsqueeze(1) / 4
        features = math.sqrt(2) * torch.cos(c_noise * self.freqs + self.phases)
        return self.linear(features).squeeze(1)


class ContinuousConsistency(Objective):
    """Args:
        teacher: the frozen teacher (its guidance_scale is the fixed CFG scale).
        student: the student Denoiser; its x0 estimate is the consistency function.
        tangent: how d F / dt is computed: "auto", "jvp" or "finite_difference".
        tangent_warmup: generator updates over which r rises from 0 to 1 (sCM: 10k on images); 0 = none.
        tangent_norm: c of the tangent normalisation (sCM: 0.1).
        fd_step: step in t of the central difference. On a UNet (fp32) the error against the JVP fell as h^2
            from 0.81 at 1e-2 to 1.4e-3 at 3e-4, then rose with round-off (2.5e-3 at 1e-4): 3e-4 balances them.
        p_mean, p_std: log-normal training noise levels, ``ln(sd tan t) ~ N(p_mean, p_std^2)`` (sCM: -1.0, 1.4).
        guidance_range: CFG scales drawn per example (needs a guidance-embedded student), or None.
        prior_weighting: weight each sample's loss by 1 / sigma (sCM's prior weighting).
        adaptive_weighting: learn logvar(t) and weight by exp(-logvar) + logvar (sCM's adaptive weighting).
        sigma_max: the student's first sampling level (the trainer passes it; see ``consistency_start``): training
            noise levels stay at or below it; None = the top of the teacher's table.
    """

    trains_on = "data"
    uses_fake_score = False
    tf32 = False  # its tangent differentiates the networks along time (FastGen: tf32_enabled False)
    tangent_rule = staticmethod(scm_tangent)  # the tangent with its warm-up (rCM: its own)

    def __init__(self, teacher: Denoiser, fake, student: Denoiser, gan_head=None, tangent: str = "auto",
                 tangent_warmup: int = 10_000, tangent_norm: float = 0.1, fd_step: float = 3e-4,
                 p_mean: float = -1.0, p_std: float = 1.4, guidance_range: list[float] | None = None, prior_weighting: bool = True,
                 adaptive_weighting: bool = True, sigma_max: float | None = None):
        super().__init__(teacher, None, 0, None)
        if tangent not in TANGENTS:
            raise ValueError(f"objective.tangent must be one of {', '.join(TANGENTS)}, got {tangent!r}")
        if tangent_warmup < 0 or tangent_norm < 0 or fd_step <= 0:
            raise ValueError("objective.tangent_warmup and tangent_norm must be >= 0 and fd_step > 0")
        self.student = student
        self.tangent = tangent
        self.tangent_warmup, self.tangent_norm, self.fd_step = tangent_warmup, tangent_norm, fd_step
        self.p_mean, self.p_std = p_mean, p_std
        self.guidance = TeacherGuidance(teacher, student, guidance_range)
        self.prior_weighting = prior_weighting
        self.sigma_max = sigma_max
        self.logvar = AdaptiveLogVariance() if adaptive_weighting else None

    def train_defaults(self) -> dict:
        """sCM's optimizer (FastGen config_scm.py: betas (0.9, 0.99), weight decay 0, ``grad_clip.grad_norm`` 1e6, i.e.
        no clip; Adam's eps 1e-8 is torch's; FastGen's optimizer there is RAdam, fastdiff's AdamW)."""
        return {"adam_betas": [0.9, 0.99], "weight_decay": 0.0, "lr_warmup_steps": 0, "grad_clip": 0.0}

    def generator_modules(self) -> list[nn.Module]:
        return [self.logvar] if self.logvar is not None else []

    def state_modules(self) -> dict[str, nn.Module]:
        return {"scm_logvar": self.logvar} if self.logvar is not None else {}

    def F(self, x_t: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        """The student's TrigFlow output F(x_t, t), differentiable in x_t and t."""
        cos, sin = expand(torch.cos(t), x_t), expand(torch.sin(t), x_t)
        x0 = self.student(x_t / cos, SIGMA_DATA * torch.tan(t), cond)
        return (cos * x_t - x0) / (SIGMA_DATA * sin)

    def time_derivative(self, x_t, t, cond, dxt_dt) -> torch.Tensor:
        """cos(t) sin(t) dF/dt along the teacher's ODE, by JVP or central finite difference (no graph)."""
        cs = torch.cos(t) * torch.sin(t)
        v_x, v_t = expand(cs, x_t) * dxt_dt, cs

        def f(x, tt):
            return self.F(x, tt, cond)

        if self.tangent != "finite_difference":
            try:
                with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]):
                    return torch.func.jvp(f, (x_t, t), (v_x, v_t))[1]
            except Exception as exc:  # noqa: BLE001 - any op without forward-mode AD
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                if self.tangent == "jvp":
                    raise RuntimeError(f"objective.tangent jvp failed ({first}); use auto or finite_difference") from exc
                warnings.warn(f"JVP failed ({first}); sCM uses finite differences from now on", stacklevel=2)
                self.tangent = "finite_difference"
        h = self.fd_step
        with torch.no_grad():
            return (f(x_t + h * v_x, t + h * v_t) - f(x_t - h * v_x, t - h * v_t)) / (2 * h)

    def sample_time(self, n: int, device) -> torch.Tensor:
        """t = arctan(sigma / sd) with log-normal sigma, kept inside the teacher's noise range."""
        sigma = edm_sigma(self.teacher.schedule, n, device, self.p_mean, self.p_std, dtype=torch.float64)
        if self.sigma_max is not None:
            sigma = sigma.clamp(max=self.sigma_max)
        return torch.atan(sigma / SIGMA_DATA).float()

    def generator_loss(self, x, cond=None, real=None):
        x = x.detach().float()
        t = self.sample_time(x.shape[0], x.device)
        x_t = expand(torch.cos(t), x) * x + expand(torch.sin(t), x) * SIGMA_DATA * torch.randn_like(x)
        scale, student_cond = self.guidance.draw(x.shape[0], cond, x.device)
        per_sample, rms = self.loss_at(x_t, t, cond, scale, student_cond)
        loss = finite_mean(self.weighted(per_sample, t))
        logs = {"loss_scm": loss.detach(), "loss_scm_unweighted": finite_mean(per_sample.detach()),
                "tangent_rms": rms.mean().detach()}
        return loss, logs

    def weighted(self, per_sample: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """sCM's weighting of the per-sample loss: ``w(t) / exp(logvar(t)) * loss + logvar(t)``, w = 1/sigma or 1."""
        sigma = SIGMA_DATA * torch.tan(t.double())
        weight = (1 / sigma).to(per_sample.dtype) if self.prior_weighting else torch.ones_like(per_sample)
        if self.logvar is None:
            return weight * per_sample
        logvar = self.logvar(sigma).to(per_sample.dtype)
        return weight * torch.exp(-logvar) * per_sample + logvar

    def loss_at(self, x_t, t, cond=None, scale=None, student_cond=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample sCM loss (unweighted) at TrigFlow points (x_t, t), and the tangent's RMS before normalisation."""
        student_cond = cond if student_cond is None else student_cond
        cos, sin = expand(torch.cos(t), x_t), expand(torch.sin(t), x_t)
        with torch.no_grad():
            x0_teacher = self.teacher(x_t / cos, SIGMA_DATA * torch.tan(t), cond, scale)
            dxt_dt = (cos * x_t - x0_teacher) / sin
        dF_dt = self.time_derivative(x_t, t, student_cond, dxt_dt)  # times cos sin
        F = self.F(x_t, t, student_cond)
        r = 1.0 if self.tangent_warmup == 0 else min(1.0, self.step / self.tangent_warmup)
        return tangent_loss(F, dF_dt, x_t, dxt_dt, t, r, self.tangent_norm, self.tangent_rule)


def tangent_loss(F, dF_dt, x_t, dxt_dt, t, r: float, tangent_norm: float,
                 tangent=scm_tangent) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample ``mean((F - sg(F + g / (rms(g) + c)))^2)`` and rms(g) before normalising, g = ``tangent(...)``
    (sCM Eq. 8 with its warm-up by default; rCM passes its own warm-up, ``rcm.rcm_tangent``)."""
    g = tangent(F, dF_dt, x_t, dxt_dt, t, r)
    rms = g.flatten(1).pow(2).mean(dim=1).sqrt()
    g = g / expand(rms + tangent_norm, g)
    return (F - (F.detach() + g)).flatten(1).pow(2).mean(dim=1), rms


register("scm", ContinuousConsistency)
