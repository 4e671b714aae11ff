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
"""
from __future__ import annotations

import warnings

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..denoiser import Denoiser, expand
from .base import Objective, edm_sigma, finite_mean
from .guidance import TeacherGuidance

TANGENTS = ("auto", "jvp", "finite_difference")
SIGMA_DATA = 0.5


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
    """

    trains_on = "data"
    uses_fake_score = False

    def __init__(self, teacher: Denoiser, fake, student: Denoiser, gan_head=None, tangent: str = "auto",
                 tangent_warmup: int = 1000, tangent_norm: float = 0.1, fd_step: float = 3e-4,
                 p_mean: float = -1.0, p_std: float = 1.4, guidance_range=None):
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
        return torch.atan(sigma / SIGMA_DATA).float()

    def generator_loss(self, x, cond=None, real=None):
        x = x.detach().float()
        t = self.sample_time(x.shape[0], x.device)
        x_t = expand(torch.cos(t), x) * x + expand(torch.sin(t), x) * SIGMA_DATA * torch.randn_like(x)
        scale, student_cond = self.guidance.draw(x.shape[0], cond, x.device)
        per_sample, rms = self.loss_at(x_t, t, cond, scale, student_cond)
        loss = finite_mean(per_sample)
        return loss, {"loss_scm": loss.detach(), "tangent_rms": rms.mean().detach()}

    def loss_at(self, x_t, t, cond=None, scale=None, student_cond=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample sCM loss at TrigFlow points (x_t, t), and the tangent's RMS before normalisation."""
        student_cond = cond if student_cond is None else student_cond
        cos, sin = expand(torch.cos(t), x_t), expand(torch.sin(t), x_t)
        with torch.no_grad():
            x0_teacher = self.teacher(x_t / cos, SIGMA_DATA * torch.tan(t), cond, scale)
            dxt_dt = (cos * x_t - x0_teacher) / sin
        dF_dt = self.time_derivative(x_t, t, student_cond, dxt_dt)  # times cos sin
        F = self.F(x_t, t, student_cond)
        r = 1.0 if self.tangent_warmup == 0 else min(1.0, self.step / self.tangent_warmup)
        g = -cos**2 * (SIGMA_DATA * F.detach() - dxt_dt) - r * (cos * sin * x_t + SIGMA_DATA * dF_dt)
        rms = g.flatten(1).pow(2).mean(dim=1).sqrt()
        g = g / expand(rms + self.tangent_norm, g)
        return (F - (F.detach() + g)).flatten(1).pow(2).mean(dim=1), rms
