"""Flow-map (MeanFlow) distillation: a two-time student learns the teacher's average velocity (Geng et al. 2025,
"Mean Flows for One-step Generative Modeling", arXiv 2505.13447; reference NVlabs/FastGen
fastgen/methods/consistency_model/mean_flow.py, ``FlowMapLossMixin`` with ``loss_config.use_cd``: the teacher
supplies the velocity).

In flow units (``z_t = (1 - t) x0 + t eps``; fastdiff's VE point x at sigma is ``z = x / (1 + sigma)`` at
``t = sigma / (1 + sigma)``, for VP and flow teachers alike) the average velocity between r and t is

    u(z_t, r, t) = 1 / (t - r) int_r^t v(z_s, s) ds                                   (MeanFlow Eq. 3)

and differentiating ``(t - r) u = int_r^t v ds`` in t gives the MeanFlow identity

    u(z_t, r, t) = v(z_t, t) - (t - r) d/dt u(z_t, r, t),   d/dt = v . d_z + d_t      (Eq. 6, 8)

The loss regresses the student on the right-hand side with a stop-gradient (Eq. 9-10):
``|| u_theta - sg(v - (t - r) (v . d_z u_theta + d_t u_theta)) ||^2``, where v is the teacher's velocity
``(z - D_teacher) / t`` at (z_t, t) and the total derivative is one forward-mode JVP of u_theta with tangents (v, 1)
(``torch.func.jvp``, SDPA's math backend), or the central finite difference along the same tangent where JVP cannot
pass (as sCM's ``objectives/scm.py``). The student's u is ``(z - D_student(z / (1 - t), sigma; r)) / t`` with r fed
through its flow-map embedding (``models/flow_map.py``), added to the network here, zero-initialised, so it starts
as the teacher (u = v at every r).

Adaptive weighting (Sec. 4.3): per sample ``w = sg(1 / (||delta||^2 + c)^p)``, ||.||^2 summed over elements. Default
p = 0.5, c = 0.01: FastGen's ``config_mean_flow.py`` (``loss_type opt_grad``, ``norm_method poly_1.0``, norm_const
0.1; a consistency-*training* config: ``use_cd`` off) steps each sample by ``delta / (||delta|| + 0.1)``, which is
p = 0.5's ``delta / sqrt(||delta||^2 + 0.01)`` up to how the constant enters; FastGen's only distillation config
(``WanT2V/config_mf.py``) uses norm_const 10 on the RMS-scaled tangent, a nearly constant weight (p = 0 here). The paper's p = 1, c = 1e-3 (Table 1d, training from data) gives ``delta / ||delta||^2``:
in distillation the student starts as the teacher, so short jumps (r near t) start near their targets and outweigh
the long ones (r = 0 from the top) by orders of magnitude; on ``fastdiff bench gmm`` it left the one-step map at the
teacher's own one DDIM step (20.5 x floor at 500 updates; p = 0.5: 4.4 x, p = 0: 4.4 x).
(t, r) sampling (Sec. 4.3, Table 1a-b): two draws from a logit-normal in t, which is a log-normal in
sigma = t / (1 - t) (``ln sigma ~ N(p_mean, p_std^2)``, the paper's (-0.4, 1.0)), t the larger and r the smaller;
a share ``flow_matching_ratio`` of the samples takes r = t (the paper's best: 75%, i.e. 25% with r != t; FastGen's
DiT config 0.25, its Wan distillation config none), and a share ``consistency_ratio`` r = 0 (FastGen/AnyFlow's consistency bucket; 0 in MeanFlow).
Training levels stay inside the teacher's table and at or below the student's first sampling level (``sigma_max``);
an r below the table's first level is the data end, r = 0.
"""
from __future__ import annotations

import warnings

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..models.denoiser import Denoiser, expand
from ..models.flow_map import add_flow_map_embedding, r_timestep, target_time
from ..models.lora import is_lora
from .base import Objective, finite_mean, schedule_range
from .registry import register

TANGENTS = ("auto", "jvp", "finite_difference")


def total_derivative(fn, z: torch.Tensor, t: torch.Tensor, v: torch.Tensor, method: str, h) -> torch.Tensor:
    """``d/dt fn(z_t, t) = v . d_z fn + d_t fn`` (no graph): one JVP with tangents (v, 1), or the central difference
    ``(fn(z + h v, t + h) - fn(z - h v, t - h)) / 2h`` (h a float or one step per sample)."""
    ones = torch.ones_like(t)
    with torch.no_grad():
        if method == "jvp":
            with sdpa_kernel([SDPBackend.MATH]):  # fused SDPA kernels have no forward-mode AD
                return torch.func.jvp(fn, (z, t), (v, ones))[1]
        h = torch.as_tensor(h, dtype=t.dtype, device=t.device).expand_as(t)
        hz = expand(h, z)
        return (fn(z + hz * v, t + h) - fn(z - hz * v, t - h)) / (2 * hz)


def meanflow_target(v: torch.Tensor, t: torch.Tensor, r: torch.Tensor, du_dt: torch.Tensor) -> torch.Tensor:
    """The MeanFlow identity's right-hand side ``v - (t - r) du/dt`` (Eq. 8)."""
    return v - expand(t - r, v) * du_dt


class MeanFlow(Objective):
    """Args:
        teacher: the frozen teacher (its guidance_scale is the fixed CFG scale of v).
        student: the student Denoiser; its network gets the flow-map embedding (``add_flow_map_embedding``).
        tangent: how du/dt is computed: "auto" (JVP, falling back for good to finite differences), "jvp",
            "finite_difference".
        fd_step: step of the central difference in logit(t) = ln sigma, i.e. ``h = fd_step t (1 - t)`` in t: the
            student varies on the scale of ln sigma (a fixed step in t near t = 1 spans many sigmas). On the tiny
            UNet (float32) the error against the JVP fell as h^2 down to 3e-4, then round-off grows as 1 / h.
        p_mean, p_std: ``ln sigma ~ N(p_mean, p_std^2)`` for t and r (MeanFlow: logit-normal (-0.4, 1.0)).
        flow_matching_ratio: share of samples with r = t (MeanFlow: 0.75).
        consistency_ratio: share of samples with r = 0 (MeanFlow: 0). At 1 every r is 0 and the student needs no
            second time (a plain x0 network is the map to the data).
        adaptive_power, adaptive_const: p and c of the adaptive weight ``1 / (||delta||^2 + c)^p``; p = 0: none
            (default FastGen's 0.5, 0.01; the paper's 1, 1e-3 starves long jumps in distillation, see above).
        tangent_warmup: generator updates over which the ``(t - r) du/dt`` term's factor rises from 0 to 1 (FastGen's
            ``tangent_warmup_steps``, sCM's tangent warm-up). Default 500, not FastGen's 0: on ``fastdiff bench gmm``
            the full term from the first update wrecked the low levels of a student that starts as the teacher
            (2 steps 2.63-2.78 x the floor at 2000 updates, seeds 0-2; with 500: 2.14-2.44 x, and 1.67-1.89 x at
            4000; eval/results/bench-gmm-cpu/README.md, "MeanFlow's 2-step miss, part 2"). At update 0 the target is
            then the teacher's v itself, which a student that starts as the teacher already meets.
        sigma_max: the student's first sampling level (trainer-supplied); None = the top of the table.
    """

    trains_on = "data"
    uses_fake_score = False
    tf32 = False  # its tangent differentiates the networks along time (FastGen: tf32_enabled False)
    fused_export_reason = "its r embedding is a new layer, not a LoRA weight, so a LoRA file would lose it"
    name = "meanflow"  # in messages and log keys (AYF, objectives/ayf.py, shares this machinery)

    def __init__(self, teacher: Denoiser, fake, student: Denoiser, gan_head=None, tangent: str = "auto",
                 fd_step: float = 3e-4, p_mean: float = -0.4, p_std: float = 1.0, flow_matching_ratio: float = 0.75,
                 consistency_ratio: float = 0.0, adaptive_power: float = 0.5, adaptive_const: float = 0.01,
                 tangent_warmup: int = 500, sigma_max: float | None = None):
        super().__init__(teacher, None, 0, None)
        if gan_head is not None:
            raise ValueError(f"objective.gan does not apply to {self.name}")
        if tangent not in TANGENTS:
            raise ValueError(f"objective.tangent must be one of {', '.join(TANGENTS)}, got {tangent!r}")
        if not (0 <= flow_matching_ratio and 0 <= consistency_ratio and flow_matching_ratio + consistency_ratio <= 1):
            raise ValueError("objective.flow_matching_ratio and consistency_ratio must be >= 0 with a sum <= 1")
        if fd_step <= 0 or p_std <= 0 or adaptive_power < 0 or adaptive_const <= 0 or tangent_warmup < 0:
            raise ValueError("objective.fd_step, p_std and adaptive_const must be > 0, adaptive_power and "
                             "tangent_warmup >= 0")
        self.student, self.tangent, self.fd_step = student, tangent, fd_step
        self.p_mean, self.p_std = p_mean, p_std
        self.flow_matching_ratio, self.consistency_ratio = flow_matching_ratio, consistency_ratio
        self.adaptive_power, self.adaptive_const = adaptive_power, adaptive_const
        self.sigma_max, self.tangent_warmup = sigma_max, tangent_warmup
        self.two_time = consistency_ratio < 1
        if self.two_time:  # in place: the optimizer, EMA and checkpoints see the new layer (a LoRA's: beside it)
            self.add_second_time(student.model)

    @classmethod
    def add_second_time(cls, model) -> None:
        """The flow-map embedding on the student network (``add_flow_map_embedding``; once: idempotent)."""
        try:
            add_flow_map_embedding(model)
        except ValueError as exc:
            raise ValueError(f"objective {cls.name}: {exc} (or set objective.consistency_ratio 1: every r = 0, "
                             "no second time)") from exc

    @classmethod
    def prepare_student(cls, model, options: dict) -> None:
        """The flow-map embedding added before setup copies or shards the student (train.sharding fsdp: so FSDP
        shards it with the rest; the constructor then finds it there)."""
        if options["consistency_ratio"] < 1:
            cls.add_second_time(model)

    def state_modules(self) -> dict[str, torch.nn.Module]:
        """A LoRA student's r embedding: its checkpoint keeps only the ``lora_`` weights (``AdapterWeights``), so the
        embedding trained beside them is checkpointed here (a full student's checkpoint holds it already)."""
        model = self.student.model
        return {"flow_map_r": model.flow_map_r} if self.two_time and is_lora(model) else {}

    def train_defaults(self) -> dict:
        """FastGen's config_mean_flow.py: no weight decay, no learning-rate warm-up; Adam's betas stay fastdiff's, and
        so does its gradient-norm clip 10 where FastGen has none (``grad_norm`` 1e6; its Wan distillation config drops
        the clip callback): on the analytic bench (seed 0, 4000 updates) two map steps measured 1.67 x floor with the
        clip and 2.67 x without (eval/results/bench-gmm-cpu, "Gradient clips"; the summed loss's gradients exceed 10)."""
        return {"weight_decay": 0.0, "lr_warmup_steps": 0}

    # --- times ---------------------------------------------------------------------------------------
    def sample_levels(self, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(sigma_t, sigma_r), float64, sigma_r <= sigma_t, sigma_r = 0 meaning the data end."""
        lo, hi = schedule_range(self.teacher.schedule)
        hi = hi if self.sigma_max is None else min(hi, self.sigma_max)
        sigma_t, sigma_r = self.draw_levels(n, device)
        sigma_t = sigma_t.clamp(lo, hi)
        sigma_r = torch.minimum(sigma_r, sigma_t)
        sigma_r = torch.where(sigma_r < lo, torch.zeros_like(sigma_r), sigma_r)
        share = torch.rand(n, device=device, dtype=torch.float64)
        sigma_r = torch.where(share < self.flow_matching_ratio, sigma_t, sigma_r)
        sigma_r = torch.where(share >= 1 - self.consistency_ratio, torch.zeros_like(sigma_r), sigma_r)
        return sigma_t, sigma_r

    def draw_levels(self, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Unclipped (sigma_t, sigma_r), float64: two log-normal draws, the larger and the smaller (AYF overrides
        this with its interval sampling; ``sample_levels`` clips to the table and adds the buckets)."""
        draws = (torch.randn(2, n, device=device, dtype=torch.float64) * self.p_std + self.p_mean).exp()
        return draws.max(dim=0).values, draws.min(dim=0).values

    # --- velocities in flow units ------------------------------------------------------------------------
    def teacher_velocity(self, z: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        """v(z_t, t) = (z - D_teacher) / t."""
        with torch.no_grad():
            x0 = self.teacher(z / expand(1 - t, z), t / (1 - t), cond)
        return (z - x0) / expand(t, z)

    def student_velocity(self, z: torch.Tensor, t: torch.Tensor, r_ts: torch.Tensor | None, cond) -> torch.Tensor:
        """u(z_t, r, t) = (z - D_student(z / (1 - t), t / (1 - t); r)) / t, differentiable in z and t."""
        x, sigma = z / expand(1 - t, z), t / (1 - t)
        if r_ts is None:
            x0 = self.student(x, sigma, cond)
        else:
            with target_time(self.student.model, r_ts):
                x0 = self.student(x, sigma, cond)
        return (z - x0) / expand(t, z)

    def du_dt(self, z, t, r_ts, cond, v) -> torch.Tensor:
        """d/dt u along the teacher's flow, by JVP or finite difference (``tangent``; auto falls back once)."""
        return self.derivative(lambda zz, tt: self.student_velocity(zz, tt, r_ts, cond), z, t, v)

    def derivative(self, fn, z, time, v) -> torch.Tensor:
        """``d/d time fn(z + time v, time)`` (no graph) by JVP, or the central difference stepping ``fd_step`` in
        logit(time) where JVP cannot pass (``tangent``; auto falls back for good at the first failure)."""
        if self.tangent != "finite_difference":
            try:
                return total_derivative(fn, z, time, v, "jvp", self.fd_step)
            except Exception as exc:  # noqa: BLE001 - any op without forward-mode AD
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                if self.tangent == "jvp":
                    raise RuntimeError(f"objective.tangent jvp failed ({first}); use auto or "
                                       "finite_difference") from exc
                warnings.warn(f"JVP failed ({first}); {self.name} uses finite differences from now on", stacklevel=3)
                self.tangent = "finite_difference"
        return total_derivative(fn, z, time, v, "finite_difference", self.fd_step * time * (1 - time))

    def target(self, z, t, r, r_ts, cond) -> torch.Tensor:
        """``v - (t - r) du/dt`` (no graph) with the teacher's velocity v, CFG-guided at the teacher's
        guidance_scale (``Denoiser`` applies it), both in the target and as the JVP's tangent."""
        v = self.teacher_velocity(z, t, cond)
        du_dt = self.du_dt(z, t, r_ts, cond, v)
        if self.tangent_warmup > 0:  # FastGen: v - min(1, step / warm-up) (t - r) du/dt
            du_dt = du_dt * min(1.0, self.step / self.tangent_warmup)
        return meanflow_target(v, t, r, du_dt)

    # --- the loss --------------------------------------------------------------------------------------------
    def generator_loss(self, x, cond=None, real=None):
        x = x.detach().float()
        sigma_t, sigma_r = self.sample_levels(x.shape[0], x.device)
        x_t = x + expand(sigma_t.float(), x) * torch.randn_like(x)
        per_sample, sq = self.loss_at(x_t, sigma_t, sigma_r, cond)
        loss = finite_mean(per_sample)
        return loss, {f"loss_{self.name}": loss.detach(), f"{self.name}_mse": finite_mean(sq.detach()),
                      "share_r_below_t": (sigma_r < sigma_t).float().mean()}

    def loss_at(self, x_t, sigma_t, sigma_r, cond=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(weighted per-sample loss, unweighted per-element mean squared error) at VE points x_t of level sigma_t,
        mapping to sigma_r (0: the data)."""
        t = (sigma_t / (1 + sigma_t)).float()
        r = (sigma_r / (1 + sigma_r)).float()
        z = x_t / expand(1 + sigma_t.float(), x_t)
        r_ts = r_timestep(self.teacher.schedule, sigma_r.float()).to(x_t.device) if self.two_time else None
        target = self.target(z, t, r, r_ts, cond)
        u = self.student_velocity(z, t, r_ts, cond)
        return self.regression(u, target)

    def regression(self, u, target) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-sample loss, per-element squared error) of u against sg(target): the adaptive weight."""
        return adaptive_loss(u, target, self.adaptive_power, self.adaptive_const)


def adaptive_loss(u: torch.Tensor, target: torch.Tensor, power: float, const: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(``sg(1 / (||delta||^2 + c)^p) ||delta||^2`` per sample, delta = u - sg(target), per-element mean of
    delta^2): MeanFlow's adaptively weighted L2 (Sec. 4.3)."""
    sq = (u - target.detach()).flatten(1).pow(2)
    total = sq.sum(dim=1)
    weight = (total.detach() + const) ** -power
    return weight * total, sq.mean(dim=1)


register("meanflow", MeanFlow)
