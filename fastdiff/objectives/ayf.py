"""Align Your Flow: flow-map distillation by Eulerian or Lagrangian map distillation (Sabour, Fidler, Kreis 2025,
"Align Your Flow: Scaling Continuous-Time Flow Map Distillation", arXiv 2506.14603; NVIDIA published no code that
we found, FastGen has MeanFlow but no AYF method: the paper is the reference).

AYF's flow map ``f(x_t, t, s) = x_t + (s - t) F(x_t, t, s)`` is fastdiff's flow-map student (``models/flow_map.py``)
in flow units, with s = r and F = u, the average velocity (``u = (z - D_student(z / (1 - t), sigma; r)) / t``); the
two-time network, the teacher's (CFG-guided) velocity v, the JVP with its finite-difference fallback, the clipping
of levels and the buckets are MeanFlow's (``objectives/meanflow.py``, subclassed; the (t, s) draw is AYF's). The
paper's two losses, by their gradients (theta^- = stop-gradient; as restated in DSL-Lab's "A Unified Framework for
Diffusion Distillation" (2025), the paper's own Sec. 3.2 not being readable here; each is checked in
tests/test_ayf.py against a closed-form flow map and by autograd of the surrogate):

    EMD:  grad_theta E[ w(t, s) sign(t - s) f_theta(x_t, t, s) . d/dt f_theta^-(x_t, t, s) ]
          d/dt along the teacher's ODE at fixed s, tangents (v, 1, 0): the map's output must not move with its
          starting point along a trajectory (s = 0: continuous-time consistency; s -> t: flow matching);
    LMD:  grad_theta E[ w(t, s) sign(s - t) f_theta(x_t, t, s) . (d/ds f_theta^-(x_t, t, s) - v(f_theta^-, s)) ]
          d/ds at fixed (x_t, t), tangents (0, 0, 1): the end point must move with the teacher's velocity there.

With f = z + (r - t) u, ``d f / dt = v - u - (t - r) du/dt`` and ``d f / dr = u - (t - r) du/dr``, so each gradient
is ``|t - r| (du/dtheta)^T g`` with the tangent g = u^- - target:

    EMD target: v(z_t, t) - (t - r) (v . d_z u + d_t u)       (MeanFlow's identity: EMD's fixed point is MeanFlow's)
    LMD target: v(f^-(z_t, t, r), r) + (t - r) d_r u           (the teacher's velocity at the map's end point)

The recipe, and where it comes from. The paper's HTML (arxiv.org/html/2506.14603v1) is stored for search, but only
its opening (abstract, introduction) could be read here; the rest is from third-party readings of the paper, named
("notes": a paper-notes file on the NeurIPS version, found by text search, quoting its section and table numbers):
    - Theorem 3.2 / Sec. 3.2: the EMD gradient above with weight w'(t, s) = w(t, s) |t - s| (notes; DSL-Lab's
      restatement); the normalised step below absorbs w' and |t - s|.
    - Sec. 3.4, Eq. 4-5, Algorithm 1 lines 7-10: sCM's tangent normalisation ``g / (||g|| + c)``, c = 0.1, and the
      "regularized tangent warmup" r = min(r_max, iteration / H), r_max = 0.99 (the left-over (1 - r) term is a flow
      matching regulariser; notes and both reimplementations below); ``tangent_warmup`` here ramps r to 1, H
      unstated in what we read: default 500 updates, meanflow's (on ``fastdiff bench gmm``, 2000 updates, seeds 0 / 1:
      2 steps 2.03 / 1.84 x floor with it against 2.35 / 2.32 x without, 4 steps 1.38 / 0.98 against 2.82 / 2.30;
      1 step 2.92 / 2.64 against 2.39 / 2.62).
    - Algorithm 1 line 4, the (t, s) draw: the gap t - s = sigmoid(tau), tau ~ N(P_mean, P_std^2), then s uniform
      on [0, 1 - (t - s)] (a single-file reimplementation, "Align Your Flow: A PyTorch Implementation", that follows
      Algorithm 1 line by line; its values P_mean -0.6, P_std 1.6 are not the paper's as far as we can tell; another
      reimplementation, flowmodels' AlignYourFlow, uses MeanFlow's two sorted draws instead). That is
      ``time_sampling: interval``, with ``p_mean``/``p_std`` as (P_mean, P_std) (fastdiff's -0.4, 1.0 unless set);
      the default ``meanflow`` keeps MeanFlow's logit-normal pairs: the interval draw's source is a transcription and
      it measured worse (below). No share of s = t or s = 0 is described in
      what we read (``flow_matching_ratio``/``consistency_ratio`` default 0 and apply on top of either sampling).
      On ``fastdiff bench gmm`` the interval draw measured worse than MeanFlow's pairs at 1 / 2 / 4 steps (fewer short
      jumps; eval/results/bench-gmm-cpu/README.md, "AYF flow-map losses").
    - Table 5 (ImageNet 512, 4 steps; notes): AYF-EMD FID 1.70 against AYF-LMD 6.70 (LMD over-smooths images; on 2D toy
      data, Fig. 11, LMD was the more stable): EMD is the paper's loss, and ``map_loss: eulerian`` the default here.
      EMD alone also trains a one-time student (every r = 0). LMD needs the teacher's velocity at r, so its r stays
      inside the teacher's table (r >= the smallest level instead of the data end) and needs the two-time student.
Levels stay inside the teacher's table and at or below the student's first level (``sigma_max``) for either
sampling, as MeanFlow's: t above the top is clipped to it, s below the table's first level is the data end.

Not here (the paper's other parts): autoguidance of the teacher (Sec. 3.3, Eq. 3; Table 5: 1.70 against CFG's 2.32;
fastdiff's teacher CFG is used), the r_max = 0.99 cap and the adversarial fine-tuning (Algorithm 2).
"""
from __future__ import annotations

import torch

from ..models.denoiser import Denoiser, expand
from ..models.flow_map import r_timestep
from .base import schedule_range
from .meanflow import MeanFlow, meanflow_target
from .registry import register

MAP_LOSSES = ("eulerian", "lagrangian")
TIME_SAMPLINGS = ("interval", "meanflow")


def interval_times(n: int, p_mean: float, p_std: float, device=None) -> tuple[torch.Tensor, ...]:
    """AYF's (t, s, 1 - t) in flow units, float64: the gap t - s = sigmoid(tau), tau ~ N(p_mean, p_std^2), and s
    uniform on [0, 1 - (t - s)], so 0 <= s < t <= 1. 1 - t = (1 - u)(1 - gap) is returned without cancellation
    (sigma_t = t / (1 - t) near t = 1)."""
    tau = torch.randn(n, device=device, dtype=torch.float64) * p_std + p_mean
    u = torch.rand(n, device=device, dtype=torch.float64)
    rest = torch.sigmoid(-tau)  # 1 - gap, exact where the gap is near 1
    s = u * rest
    return s + torch.sigmoid(tau), s, (1 - u) * rest


def eulerian_target(v: torch.Tensor, t: torch.Tensor, r: torch.Tensor, du_dt: torch.Tensor) -> torch.Tensor:
    """AYF-EMD's target ``v - (t - r) du/dt`` (d/dt f = 0 along the teacher's ODE at fixed r): MeanFlow's identity."""
    return meanflow_target(v, t, r, du_dt)


def lagrangian_target(v_end: torch.Tensor, t: torch.Tensor, r: torch.Tensor, du_dr: torch.Tensor) -> torch.Tensor:
    """AYF-LMD's target ``v(f, r) + (t - r) du/dr`` (from d/dr f = v(f, r), f = z + (r - t) u)."""
    return v_end + expand(t - r, v_end) * du_dr


def normalized_tangent_loss(u: torch.Tensor, target: torch.Tensor, const: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-sample ``||u - sg(u - g / (||g|| + c))||^2``, g = sg(u - target): gradient 2 g / (||g|| + c) in u;
    per-element mean of g^2)."""
    g = (u - target).detach().flatten(1)
    step = g / (g.norm(dim=1, keepdim=True) + const)
    per_sample = (u.flatten(1) - (u.detach().flatten(1) - step)).pow(2).sum(dim=1)
    return per_sample, g.pow(2).mean(dim=1)


class AlignYourFlow(MeanFlow):
    """Args (the rest as :class:`MeanFlow`):
        map_loss: "eulerian" (AYF-EMD, default) or "lagrangian" (AYF-LMD).
        tangent_norm_const: c of the tangent normalisation ``g / (||g|| + c)`` (sCM/AYF: 0.1).
        time_sampling: "meanflow" (default: MeanFlow's two sorted log-normal levels) or "interval" (Algorithm 1's
            gap-then-start draw as transcribed, ``interval_times``, with p_mean and p_std as its (P_mean, P_std)).
        flow_matching_ratio: share of samples with r = t (default 0: AYF samples t > s, its loss already contains
            flow matching in the limit s -> t).
    """

    name = "ayf"

    def __init__(self, teacher: Denoiser, fake, student: Denoiser, gan_head=None, map_loss: str = "eulerian",
                 tangent: str = "auto", fd_step: float = 3e-4, p_mean: float = -0.4, p_std: float = 1.0,
                 flow_matching_ratio: float = 0.0, consistency_ratio: float = 0.0, tangent_norm_const: float = 0.1,
                 tangent_warmup: int = 500, time_sampling: str = "meanflow", sigma_max: float | None = None):
        if map_loss not in MAP_LOSSES:
            raise ValueError(f"objective.map_loss must be one of {', '.join(MAP_LOSSES)}, got {map_loss!r}")
        if time_sampling not in TIME_SAMPLINGS:
            raise ValueError(f"objective.time_sampling must be one of {', '.join(TIME_SAMPLINGS)}, "
                             f"got {time_sampling!r}")
        if tangent_norm_const <= 0:
            raise ValueError("objective.tangent_norm_const must be > 0")
        if map_loss == "lagrangian" and consistency_ratio >= 1:
            raise ValueError("objective.map_loss lagrangian differentiates in r: it needs a two-time student "
                             "(objective.consistency_ratio < 1)")
        super().__init__(teacher, fake, student, gan_head, tangent=tangent, fd_step=fd_step, p_mean=p_mean,
                         p_std=p_std, flow_matching_ratio=flow_matching_ratio, consistency_ratio=consistency_ratio,
                         tangent_warmup=tangent_warmup, sigma_max=sigma_max)
        self.map_loss, self.tangent_norm_const, self.time_sampling = map_loss, tangent_norm_const, time_sampling

    def draw_levels(self, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Unclipped (sigma_t, sigma_s) from AYF's interval draw (sigma = t / (1 - t)), or MeanFlow's pair."""
        if self.time_sampling == "meanflow":
            return super().draw_levels(n, device)
        t, s, one_minus_t = interval_times(n, self.p_mean, self.p_std, device)
        return t / one_minus_t, s / (1 - s)

    def sample_levels(self, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """MeanFlow's clipping of ``draw_levels``; LMD keeps sigma_r at or above the table's smallest level (it reads
        the teacher there), which maps to the same native timestep 0 as the data end."""
        sigma_t, sigma_r = super().sample_levels(n, device)
        if self.map_loss == "lagrangian":
            sigma_r = torch.minimum(sigma_r.clamp(min=schedule_range(self.teacher.schedule)[0]), sigma_t)
        return sigma_t, sigma_r

    def du_dr(self, z, t, r, cond) -> torch.Tensor:
        """d_r u at fixed (z, t), by JVP through the r embedding's native timestep (or the central difference)."""
        def fn(_zz, rr):
            return self.student_velocity(z, t, r_timestep(self.teacher.schedule, rr / (1 - rr)), cond)

        return self.derivative(fn, z, r, torch.zeros_like(z))

    def target(self, z, t, r, r_ts, cond) -> torch.Tensor:
        """EMD's ``v - (t - r) du/dt`` or LMD's ``v(f^-, r) + (t - r) du/dr`` (no graph; v CFG-guided as in
        MeanFlow, the warm-up factor on the derivative term)."""
        if self.map_loss == "eulerian":
            return super().target(z, t, r, r_ts, cond)
        with torch.no_grad():
            end = z - expand(t - r, z) * self.student_velocity(z, t, r_ts, cond)  # f^-(z_t, t, r)
        v_end = self.teacher_velocity(end, r, cond)
        du_dr = self.du_dr(z, t, r, cond)
        if self.tangent_warmup > 0:
            du_dr = du_dr * min(1.0, self.step / self.tangent_warmup)
        return lagrangian_target(v_end, t, r, du_dr)

    def regression(self, u, target) -> tuple[torch.Tensor, torch.Tensor]:
        """AYF's normalised tangent in place of MeanFlow's adaptive weight."""
        return normalized_tangent_loss(u, target, self.tangent_norm_const)


register("ayf", AlignYourFlow)
