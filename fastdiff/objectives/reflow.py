"""Reflow with the improved training of rectified flows (Lee, Lin & Fanti 2024, "Improving the Training of Rectified
Flows", NeurIPS; reference code sangyun884/rfpp ``train.py`` ``train_rectified_flow``, ``t_dist.py`` ``sample_t``,
``network_edm.py`` ``EDMPrecondVel``).

The data are pairs (z, x0) of the teacher's deterministic ODE (``fastdiff pairs``, ``data.name: pairs``); the student,
a copy of the teacher, is trained on the straight line between them, in flow convention (t = 1 noise, t = 0 data):

    x_t = t x1 + (1 - t) x0,     target velocity  v = x1 - x0        (the pair's displacement; rfpp ``target = z - x``)
    v_theta(x_t, t) = (x_t - D_theta(x_t / (1 - t), sigma)) / t,  sigma = t / (1 - t)   (rfpp ``EDMPrecondVel``:
        the x0 estimate D of the VE point x0 + sigma x1, turned into a velocity)
    loss = d(v_theta - v),  d(y) = sqrt(|y|^2 + c^2) - c,  c = 0.00054 sqrt(dim)         (the paper's pseudo-Huber)
    t ~ p(t) ∝ exp(a t) + exp(a (1 - t)) ∝ cosh(a (t - 1/2)),  a = 4                     (the paper's U-shaped p(t))

x1 is where the student starts sampling. Flow teachers start at t = 1 from native noise z: x1 = z. A VP teacher has
no t = 1; its student (``student.sigma_init``) starts at a level sigma_s < inf from the native input z, i.e. from the
VE point z / alpha(sigma_s) = z sqrt(1 + sigma_s^2); the line through that point and x0 at sigma_s has
``x1 = (z sqrt(1 + sigma_s^2) - x0) / sigma_s`` (-> z as sigma_s -> inf), and t is confined to the teacher's range,
[t(sigma_min), t(sigma_s)] (rfpp rescales its U-shaped draws to [1e-5, 1 - 1e-5] the same way). The network sees
x_t through its own parametrisation (``Denoiser.denoise_native`` of ``alpha(sigma) x_t / (1 - t)``; ``x_t`` itself on
flow teachers). Sampling is Euler on the learned velocity, which is the ``ddim`` sampler (``student.sampler: ddim``)
on the student's K levels: one step is ``x0 = D(z, sigma_s)``.

Differences from rfpp, on purpose: c = 0.00054 sqrt(dim) as the paper states (rfpp's ``huber`` loss uses
0.00054 dim and divides the loss by dim; ``objective.huber_c`` sets c); the U-shaped draw inverts the exponential's
CDF in closed form (rfpp samples scipy's ``rv_continuous`` and mirrors a random half, the same distribution).

LPIPS (``objective.loss``, rfpp ``train.py`` ``--loss_type lpips | lpips-huber``; the paper's Config F, its best):
the x0 estimate ``x0_hat = x_t - t v_theta`` and the pair's x0, both bilinear to 224 px, are compared by LPIPS-VGG
(``models/lpips.py``, weights from the local file ``objective.lpips_path``), per sample:

    lpips:        loss = LPIPS(x0_hat, x0)
    lpips_huber:  loss = (1 - t) h(v_theta - v) + LPIPS(x0_hat, x0),  h(y) = (sqrt(|y|^2 + c^2) - c) / dim,
                  c = 0.00054 dim                                                    (rfpp's scale for this balance)

``objective.huber_c`` replaces c in lpips_huber too. rfpp computes LPIPS with ``piq.LPIPS(replace_pooling=True)``
(average pooling, ImageNet mean/std on [0, 1] inputs); fastdiff follows the ``lpips`` package (max pooling, its
ScalingLayer), the metric whose lin weights both use. rfpp's ``--lpips_divt`` (LPIPS / t) is not built.
"""
from __future__ import annotations

import math

import torch

from ..errors import FastdiffError
from ..models.denoiser import Denoiser, expand
from ..models.lpips import LPIPS
from ..models.generator import step_sigmas
from ..models.schedule import FlowSchedule
from .base import Objective, finite_mean
from .cd import DISTANCES, consistency_distance
from .registry import register

LOSSES = ("huber", "lpips", "lpips_huber")


def sample_u_shaped(n: int, a: float, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
    """u in [0, 1] with density ``a (e^{a u} + e^{a (1-u)}) / (2 (e^a - 1))`` (float64; a = 0: uniform).

    An equal mixture of rfpp's exponential density ``a e^{a u} / (e^a - 1)`` and its mirror image; each half drawn by
    the inverse CDF ``u = log(1 + r (e^a - 1)) / a``, r ~ U(0, 1)."""
    r = torch.rand(n, dtype=torch.float64, generator=generator).to(device)
    if a == 0:
        return r
    u = torch.log1p(r * math.expm1(a)) / a
    mirror = torch.rand(n, generator=generator).to(device) < 0.5
    return torch.where(mirror, 1 - u, u).clamp(0, 1)


def u_shaped_cdf(u: torch.Tensor, a: float) -> torch.Tensor:
    """CDF of :func:`sample_u_shaped`'s density (float64)."""
    u = u.double()
    if a == 0:
        return u
    return 0.5 * (torch.expm1(a * u) - torch.expm1(a * (1 - u)) + math.expm1(a)) / math.expm1(a)


class Reflow(Objective):
    """Args (``objective.*``):
        teacher: the frozen teacher (its schedule and parametrisation; reflow itself never calls it).
        student: the student Denoiser (the trainer's generator optimizer trains it).
        sigma_max: the student's first sampling level (the trainer passes ``student.sigma_init``); None = the top of
            a VP table, t = 1 on a flow teacher.
        u_shape: a of the U-shaped timestep density (paper and rfpp's README: 4; 0 = uniform).
        distance: "pseudo_huber" (default) or "l2" (mean squared error of the velocity).
        huber_c: the pseudo-Huber c; None = 0.00054 sqrt(dim) (0.00054 dim in lpips_huber).
        loss: "huber" (default: ``distance`` on the velocity), "lpips" or "lpips_huber" (module docstring).
        lpips_path: a local LPIPS-VGG weights file (safetensors or .pth, ``lpips`` key names); needed by the LPIPS
            losses, and with loss "huber" it adds an ``lpips`` metric to the logs.
    """

    trains_on = "data"
    uses_fake_score = False
    sampler = "ddim"
    sampler_reason = ("samples by Euler steps along its straight lines (rfpp's sampler); the lcm sampler's fresh "
                      "noise between steps would leave them")

    def __init__(self, teacher: Denoiser, fake, student: Denoiser, gan_head=None, sigma_max: float | None = None,
                 u_shape: float = 4.0, distance: str | None = None, huber_c: float | None = None,
                 loss: str | None = None, lpips_path: str | None = None):
        super().__init__(teacher, None, 0, None)
        distance = distance or "pseudo_huber"
        if distance not in DISTANCES:
            raise ValueError(f"objective.distance must be one of {', '.join(DISTANCES)}, got {distance!r}")
        if u_shape < 0 or (huber_c is not None and huber_c <= 0):
            raise ValueError("objective.u_shape must be >= 0 and objective.huber_c positive")
        self.student, self.u_shape, self.distance, self.huber_c = student, u_shape, distance, huber_c
        self.loss = loss or "huber"
        if self.loss not in LOSSES:
            raise FastdiffError(f"objective.loss must be one of {', '.join(LOSSES)}, got {loss!r}")
        if self.loss != "huber" and not lpips_path:
            raise FastdiffError(f"objective.loss={self.loss} needs objective.lpips_path "
                                "(a local LPIPS-VGG weights file)")
        # Kept off the module tree: frozen, not trained, not checkpointed with the objective.
        self.lpips = [LPIPS.from_file(lpips_path)] if lpips_path else []
        schedule = teacher.schedule
        self.flow = isinstance(schedule, FlowSchedule)
        # the level the student's sampler starts from (a VP sigma_init snapped to its table timestep, as Generator does)
        self.sigma_start = float(step_sigmas(teacher, 1, sigma_max)[0])  # the student shares the teacher's table
        # The range of flow times the teacher was trained on, up to the student's first level.
        self.t_lo = schedule.sigma_min / (1 + schedule.sigma_min)
        self.t_hi = 1.0 if math.isinf(self.sigma_start) else self.sigma_start / (1 + self.sigma_start)

    def train_defaults(self) -> dict:
        """rfpp train.py for CIFAR-10 (README, Config F): Adam (no weight decay), lr 2e-4 after 5000 warm-up steps, no
        gradient clip (its summed pseudo-Huber's gradient norms, 49-78 on the CPU ladder, were cut to 10 every update
        under the old global clip)."""
        return {"adam_betas": [0.9, 0.999], "weight_decay": 0.0, "lr_generator": 2e-4, "lr_warmup_steps": 5000,
                "grad_clip": 0.0}

    def line_noise(self, z: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """x1: the line's noise end, through the student's starting point (module docstring); z on flow teachers."""
        if math.isinf(self.sigma_start):
            return z
        s = self.sigma_start
        return ((z.double() * math.sqrt(1 + s * s) - x0.double()) / s).to(z.dtype)

    def draw_t(self, n: int, device) -> torch.Tensor:
        """Flow times: the U-shaped draw rescaled to [t_lo, t_hi] (float64)."""
        return self.t_lo + (self.t_hi - self.t_lo) * sample_u_shaped(n, self.u_shape, device)

    def regression(self, pairs: torch.Tensor, cond=None, t: torch.Tensor | None = None):
        """(t, predicted velocity, target velocity) for a batch of pairs ``(n, 2, *shape)`` (noise, sample)."""
        return self.line_fit(pairs, cond, t)[:3]

    def line_fit(self, pairs: torch.Tensor, cond=None, t: torch.Tensor | None = None):
        """:meth:`regression`'s triple, then the x0 estimate ``x_t - t v_theta`` and the pair's x0 (for LPIPS)."""
        if pairs.ndim < 3 or pairs.shape[1] != 2:
            raise ValueError("reflow trains on (noise, sample) pairs: set data.name=pairs and data.path to a folder "
                             "made by `fastdiff pairs`")
        z, x0 = pairs[:, 0].float(), pairs[:, 1].float()
        x1 = self.line_noise(z, x0)
        t = self.draw_t(len(z), z.device) if t is None else t.double().to(z.device)
        tt = expand(t, x0)
        x_t = (tt * x1 + (1 - tt) * x0).float()
        sigma = t / (1 - t)  # inf at t = 1 (flow teachers only)
        if self.flow:
            native = x_t
        else:  # the VE point x_t / (1 - t) in the VP teacher's native scale alpha(sigma) x
            native = (x_t.double() * expand(self.teacher.schedule.alpha(sigma) / (1 - t), x_t)).float()
        x0_hat = self.student.denoise_native(native, sigma.float(), cond).float()
        v_pred = (x_t - x0_hat) / expand(t, x_t).float()
        return t, v_pred, x1 - x0, x0_hat, x0

    def perceptual(self, x0_hat: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """LPIPS(x0_hat, x0) per sample (both resized to 224 px inside)."""
        metric = self.lpips[0]
        if metric.shift.device != x0.device:
            metric.to(x0.device)
        return metric(x0_hat, x0)

    def generator_loss(self, x, cond=None, real=None):
        t, v_pred, v_target, x0_hat, x0 = self.line_fit(x, cond)
        delta = v_pred - v_target
        logs = {}
        if self.loss == "lpips_huber":  # rfpp train.py lpips-huber: (1 - t) huber / dim + lpips, c = 0.00054 dim
            flat = delta.flatten(1)
            c = 0.00054 * flat.shape[1] if self.huber_c is None else self.huber_c
            huber = ((flat.pow(2).sum(dim=1) + c * c).sqrt() - c) / flat.shape[1]
            lpips = self.perceptual(x0_hat, x0)
            per_sample = (1 - t.to(huber.dtype)) * huber + lpips
            logs = {"huber": huber.detach().mean(), "lpips": lpips.detach().mean()}
        elif self.loss == "lpips":
            per_sample = self.perceptual(x0_hat, x0)
        elif self.distance == "pseudo_huber" and self.huber_c is not None:
            flat = delta.flatten(1)
            per_sample = (flat.pow(2).sum(dim=1) + self.huber_c ** 2).sqrt() - self.huber_c
        else:
            per_sample = consistency_distance(delta, self.distance)
        if self.loss == "huber" and self.lpips:  # a metric only
            with torch.no_grad():
                logs = {"lpips": self.perceptual(x0_hat.detach(), x0).mean()}
        loss = finite_mean(per_sample)
        return loss, {"loss_reflow": loss.detach(), **logs}


register("reflow", Reflow)
