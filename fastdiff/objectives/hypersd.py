"""Hyper-SD: trajectory segmented consistency distillation (TSCD; Ren et al. 2024, "Hyper-SD: Trajectory Segmented
Consistency Model for Efficient Image Synthesis", arXiv 2404.13686, Sec. 3.1 and Alg. 1), progressive k = 8 -> 4 ->
2 -> 1 in one run, with optional DMD score distillation in the one-step stage (Sec. 3.3).

No training code of Hyper-SD is public (ByteDance/Hyper-SD on the Hub ships LoRAs and inference scripts with
DDIMScheduler / TCDScheduler; FastGen has no TSCD), so this follows the paper, built on fastdiff's discrete CD
(``cd.py``, LCM's recipe: teacher DDIM/Heun step, EMA target network, pseudo-Huber or L2). The map to a segment edge is
the DDIM step of TCD's ``pred_noised_sample`` (jabir-zheng/TCD ``scheduling_tcd.py``: ``a_s x0 + s_s eps``, the same
formula as diffusers' TCDScheduler), with which Hyper-SD's multi-step LoRAs are sampled.

Grid (LCM's DDIM solver grid, luosiallen/latent-consistency-model ``DDIMSolver``: ``t_i = i (T0 / N) - 1``):
``t_0 = 0`` and ``t_i = round(i (t_top + 1) / N) - 1`` for i = 1..N, t_top the student's first sampling timestep.
Segments: with k segments (N a multiple of k, m = N / k grid intervals each), grid index i in 1..N lies in segment
``(e, e + m]`` with lower edge ``e = floor((i - 1) / m) m``. Its edge level is ``sigma_e = sigma(t_e)`` for e > 0, and
clean data (``sigma_e = 0``) for the lowest segment. The edges ``t_e = (t_top + 1) j / k - 1`` are exactly the levels
of fastdiff's K-step sampler for K = k (999, 749, 499, 249 for k = 4), so a DDIM (``student.sampler: ddim``) K-step
sample walks the segments the student was trained on.

Map of a point x at level sigma with x0 estimate y to the edge (DDIM in the native scale, Hyper-SD Eq. 5 /
TCD's ``pred_noised_sample``): ``F(x, sigma, y, sigma_e) = a(sigma_e) (y + (sigma_e / sigma) (x - y))``
(VE scale ``x = x0 + sigma eps``; ``a = 1 / sqrt(1 + sigma^2)``); at ``sigma_e = 0`` it is ``y`` itself.

Loss (Hyper-SD Alg. 1; the consistency target lands on the segment edge, not on 0): draw i uniformly in 1..N, its
edge e, ``i' = max(i - skip, e)``; noise data to ``x_i = x + sigma_i eps``; one teacher ODE step ``x_i' = Psi(x_i,
sigma_i -> sigma_i')``; then
``L = d( F(x_i, sigma_i, f_theta(x_i, sigma_i), sigma_e),  sg F(x_i', sigma_i', f_target(x_i', sigma_i'), sigma_e) )``
with ``f_target`` the EMA of the student (``target_ema``; 0 = the student itself under stop-gradient) and the target
``a(sigma_e) x_i'`` itself when ``i' = e > 0`` (the trajectory has reached the edge). With k = 1 this is cd's loss
exactly (the edge is clean data, ``F = y``).

Progressive stages: ``segments`` [8, 4, 2, 1] (Hyper-SD's), stage s running ``stage_steps[s]`` generator updates
(the last stage runs to the end of training). The stage is a pure function of the trainer's step, so a resumed run
picks up in the right stage; the EMA target carries over between stages, as Alg. 1's single target network does.

One-step stage (``hyper-sd-dmd``): in the last stage, when it has one segment, the loss adds ``dmd_weight`` x DMD2's
generator loss (``dmd2.py``: ``(x0_fake - x0_real) / mean|x - x0_real|`` through ``0.5 ||x - sg(x - grad)||^2``) on
the student's one-step samples from pure noise; the fake score learns those samples with the teacher's denoising loss
from the start of the run (``critic_updates`` per generator update, as ``rcm``), so it is current when the term joins.

Export: one student (LoRA with ``student.lora_rank``) serves 1, 2, 4 and 8 steps; the exported scheduler
(DDIMScheduler, trailing, for ``student.sampler: ddim``) reproduces fastdiff's sampler image for image, and a
TCDScheduler config is saved beside it in ``scheduler_tcd/`` (``inference/schedulers.py`` ``tcd_scheduler``: its K
timesteps are fastdiff's for every K; step count and eta are call arguments, so one config serves 1, 2, 4 and 8).
Per-stage students, as Hyper-SD ships one LoRA per step count besides its unified one: ``stage_ends`` tells the
trainer where each stage but the last ends, and there it exports that stage's student (the EMA when the run keeps
one, as the final export) to ``stages/k{segments}/`` with ``num_steps`` = the stage's segment count, before that
step's checkpoint (so a resume past it does not redo it, and one from before it crosses it again and rewrites the
same student). Training the later, fewer-segment stages moves the maps the earlier stages' samplers walk.

Human feedback (Sec. 3.2, ReFL): with ``reward_weight`` > 0 the loss adds ReFL's ``reward_weight * mean relu(
reward_margin - r)`` on the x0 prediction at a late step of the student's k-step DDIM walk, k the current stage's
segment count (``reward.py``, which says what of Hyper-SD's reward set is built); 0, the default, draws nothing more.
"""
from __future__ import annotations

import itertools

import torch

from ..models.denoiser import Denoiser, expand
from ..models.generator import step_sigmas
from .base import finite_mean
from .cd import ConsistencyDistillation, consistency_distance
from .dmd2 import DMD2
from .registry import register
from .reward import RewardFeedback

DEFAULT_SEGMENTS = [8, 4, 2, 1]  # Hyper-SD's progressive schedule
DEFAULT_STAGE_STEPS = 1000  # generator updates per stage when objective.stage_steps is not given (fastdiff's choice)
DEFAULT_INTERVALS = 40  # grid intervals: a multiple of 8, 25 teacher timesteps per interval on a 1000-step table


def stage_at(step: int, segments: list[int], stage_steps: list[int]) -> int:
    """Index of the stage the generator update ``step`` (0-based) belongs to: stage s covers ``stage_steps[s]``
    updates after the previous ones; the last stage has no end."""
    end = 0
    for s, length in enumerate(stage_steps[:len(segments) - 1]):
        end += length
        if step < end:
            return s
    return len(segments) - 1


def segment_edges(index: torch.Tensor, num_intervals: int, num_segments: int) -> torch.Tensor:
    """Grid index of the lower edge of the segment holding each grid index (1..N): ``floor((i - 1) / m) m``."""
    width = num_intervals // num_segments
    return torch.div(index - 1, width, rounding_mode="floor") * width


def to_edge(denoiser: Denoiser, x: torch.Tensor, sigma: torch.Tensor, x0: torch.Tensor,
            sigma_edge: torch.Tensor) -> torch.Tensor:
    """DDIM map of x (VE scale, level sigma) with x0 estimate ``x0`` to level ``sigma_edge``, in the native scale:
    ``a(sigma_e) (x0 + sigma_e / sigma (x - x0))``; exactly ``x0`` at ``sigma_e = 0``, also where sigma is 0 too (a
    flow grid's lowest level, where the ratio would be 0 / 0)."""
    ratio = expand(torch.where(sigma_edge > 0, sigma_edge / sigma.clamp(min=1e-30), torch.zeros_like(sigma)), x)
    return expand(denoiser.schedule.alpha(sigma_edge), x) * (x0 + ratio * (x - x0))


class HyperSD(ConsistencyDistillation):
    """Args (cd's where shared: ``skip``, ``solver``, ``distance``, ``target_ema``, ``guidance_range``,
    ``timestep_scaling``, ``sigma_max``):
        segments: segment counts of the progressive stages, e.g. [8, 4, 2, 1]; each must divide num_intervals, none
            repeated (a stage exports to stages/k{segments}/).
        stage_steps: generator updates per stage (len(segments) - 1 values, or one per stage: the last stage runs on
            to the end of training either way); None = 1000 per stage.
        num_intervals: N, grid intervals (LCM grid, module docstring); 40 by default.
        timestep_scaling: LCM's boundary scalings' k for the student (None, the default: the plain x0 estimate, the
            DDIM parametrisation Hyper-SD's LoRAs are sampled with by DDIM / TCD schedulers).
        dmd_weight: weight of the DMD2 term in the one-step stage (``hyper-sd-dmd`` only; 1 there by default).
        critic_updates, min_t, max_t, fake_loss, sigma_grid: the DMD term's fake-score updates and noise levels (dmd2's).
        reward: the ReFL reward, ``clip`` or ``module:function`` (``reward.py``); reward_weight: ReFL's ``grad_scale``
            (0 = off, the default); reward_margin: the hinge's margin (ReFL's 2); reward_path, reward_clip_model,
            reward_prompt: the clip reward's local weights file, open_clip model (name or JSON config) and prompt.
    """

    trains_on = "data"
    uses_fake_score = False

    @classmethod
    def boundary_timestep_scaling(cls, options: dict) -> float | None:
        return options.get("timestep_scaling")

    def __init__(self, teacher: Denoiser, fake, student: Denoiser, gan_head=None, segments: list[int] | None = None,
                 stage_steps: list[int] | None = None, num_intervals: int | None = None, skip: int = 1,
                 solver: str = "ddim", distance: str | None = None, target_ema: float | None = None,
                 guidance_range: list[float] | None = None, sigma_max: float | None = None,
                 timestep_scaling: float | None = None, dmd_weight: float | None = None, critic_updates: int = 1,
                 min_t: float = 0.02, max_t: float = 0.98, fake_loss: str = "teacher", sigma_grid: str | None = None,
                 reward: str | None = None, reward_weight: float | None = None, reward_margin: float | None = None,
                 reward_path: str | None = None, reward_clip_model: str | None = None, reward_prompt: str | None = None):
        if gan_head is not None:
            raise ValueError("objective.gan does not apply to hyper-sd")
        num_intervals = DEFAULT_INTERVALS if num_intervals is None else num_intervals
        super().__init__(teacher, None, student, num_intervals=num_intervals, skip=skip, solver=solver,
                         distance=distance, target_ema=target_ema, guidance_range=guidance_range, sigma_max=sigma_max)
        segments = list(DEFAULT_SEGMENTS if segments is None else segments)
        if not segments or any(k < 1 or num_intervals % k for k in segments):
            raise ValueError(f"objective.segments must be positive divisors of objective.num_intervals "
                             f"({num_intervals}), got {segments}")
        if len(set(segments)) < len(segments):  # each stage's student is exported to stages/k{segments}/
            raise ValueError(f"objective.segments repeats a count ({segments}): give a stage one entry and its "
                             f"updates in objective.stage_steps")
        stage_steps = [DEFAULT_STAGE_STEPS] * (len(segments) - 1) if stage_steps is None else list(stage_steps)
        if len(stage_steps) not in (len(segments) - 1, len(segments)) or any(n < 1 for n in stage_steps):
            raise ValueError(f"objective.stage_steps needs {len(segments) - 1} positive values (one per stage but the "
                             f"last), got {stage_steps}")
        self.segments, self.stage_steps, self.sigma_max = segments, stage_steps, sigma_max
        if (dmd_weight or 0) < 0 or critic_updates < 1:
            raise ValueError("objective.dmd_weight must be >= 0 and objective.critic_updates >= 1")
        self.dmd_weight = dmd_weight or 0.0
        self.dmd = None
        if fake is not None and self.dmd_weight == 0:
            raise ValueError("hyper-sd-dmd needs objective.dmd_weight > 0 (hyper-sd has no DMD term)")
        if self.dmd_weight > 0:
            if fake is None:
                raise ValueError("objective.dmd_weight needs a fake score: use objective.name hyper-sd-dmd")
            self.fake, self.critic_updates = fake, critic_updates
            self.dmd = DMD2(teacher, fake, min_t, max_t, critic_updates, weighting="dmd", fake_loss=fake_loss,
                            sigma_grid=sigma_grid)
            self.sigma_grid = self.dmd.sigma_grid
        if (reward_weight or 0) < 0 or ((reward_weight or 0) > 0 and not reward):
            raise ValueError("objective.reward_weight must be >= 0, and > 0 needs objective.reward (clip or module:function)")
        if reward and reward_weight is None:  # forgotten, the reward would be silently unused (an explicit 0: off)
            raise ValueError(f"objective.reward {reward!r} is applied with objective.reward_weight > 0 (ReFL's "
                             "grad_scale); set it (0 turns ReFL off)")
        self.refl = None  # 0 (the default): no reward is loaded and the loss draws nothing more
        if (reward_weight or 0) > 0:
            self.refl = RewardFeedback(reward, reward_weight, reward_margin, reward_path, reward_clip_model, reward_prompt)

    def num_segments(self, step: int | None = None) -> int:
        """The segment count of the stage that generator update ``step`` (default: the current one) trains."""
        return self.segments[stage_at(self.step if step is None else step, self.segments, self.stage_steps)]

    def stage_ends(self) -> dict[int, int]:
        """{generator updates done when a stage ends: that stage's segment count} for every stage but the last (which
        runs to the end of training); the trainer exports each such stage's student (``stages/k{segments}/``)."""
        ends = itertools.accumulate(self.stage_steps[:len(self.segments) - 1])
        return dict(zip(ends, self.segments))

    def grid(self, n: int, device) -> torch.Tensor:
        """N + 1 noise levels, lowest first, at LCM's grid timesteps ``0, round(i (t_top + 1) / N) - 1``."""
        i = torch.arange(1, n + 1, dtype=torch.float64)
        timesteps = torch.cat([torch.zeros(1, dtype=torch.float64), torch.round(i * (self.top + 1) / n) - 1])
        return self.teacher.schedule.sigma_at(timesteps.to(device))

    def generator_loss(self, x, cond=None, real=None):
        x = x.detach().float()
        k = self.num_segments()
        levels = self.grid(self.num_intervals, x.device)
        i = self.draw_index(levels, x.shape[0])
        edge = segment_edges(i, self.num_intervals, k)
        prev = torch.maximum(i - self.skip, edge)
        sigma, sigma_prev = levels[i], levels[prev]
        sigma_edge = torch.where(edge > 0, levels[edge], torch.zeros_like(sigma))
        x_n = x + expand(sigma, x) * torch.randn_like(x)
        scale, student_cond = self.guidance.draw(x.shape[0], cond, x.device)
        loss = finite_mean(self.loss_at(x_n, sigma, sigma_prev, sigma_edge, cond, scale, student_cond))
        logs = {"loss_tscd": loss.detach(), "segments": torch.tensor(float(k))}
        last = stage_at(self.step, self.segments, self.stage_steps) == len(self.segments) - 1
        if self.dmd is not None and last and k == 1:
            dm, dm_logs = self.dmd.generator_loss(self.one_step_sample(x, cond), cond)
            loss = loss + self.dmd_weight * dm
            logs = {**logs, **dm_logs, "loss_hyper_sd": loss.detach()}
        if self.refl is not None:  # ReFL on the student's k-step walk, k this stage's segment count
            refl, refl_logs = self.refl.loss(self.student, x, student_cond, k, self.sigma_max)
            loss = loss + refl
            logs = {**logs, **refl_logs}
        return loss, logs

    def loss_at(self, x_n, sigma, sigma_prev, sigma_edge=None, cond=None, scale=None, student_cond=None):
        """Per-sample TSCD loss for x_n at sigma, the teacher stepping to sigma_prev, both mapped to sigma_edge
        (None: clean data, i.e. cd's loss)."""
        pred, target = self.pair(x_n, sigma, sigma_prev, sigma_edge, cond, scale, student_cond)
        return consistency_distance(pred - target, self.distance)

    def pair(self, x_n, sigma, sigma_prev, sigma_edge=None, cond=None, scale=None, student_cond=None):
        """(the student's map of x_n to the edge, the target: the target network's map of the teacher's step to it)."""
        if sigma_edge is None:
            sigma_edge = torch.zeros_like(sigma)
        student_cond = cond if student_cond is None else student_cond
        with torch.no_grad():
            x_prev = self.teacher_step(x_n, sigma, sigma_prev, cond, scale)
            y_prev = (self.target or self.student)(x_prev, sigma_prev, student_cond)
            reached = (sigma_prev == sigma_edge) & (sigma_edge > 0)  # the ODE step reached the edge
            at_edge = reached.reshape(-1, *([1] * (x_prev.ndim - 1)))
            target = torch.where(at_edge, expand(self.teacher.schedule.alpha(sigma_edge), x_prev) * x_prev,
                                 to_edge(self.teacher, x_prev, sigma_prev, y_prev, sigma_edge))
        pred = to_edge(self.teacher, x_n, sigma, self.student(x_n, sigma, student_cond), sigma_edge)
        return pred, target

    def one_step_sample(self, like: torch.Tensor, cond) -> torch.Tensor:
        """The student's one-step sample from pure native noise at its first sampling level (gradient through it)."""
        top = step_sigmas(self.student, 1, self.sigma_max).to(like.device)[0]
        z = torch.randn_like(like, dtype=torch.float32)
        return self.student.denoise_native(z, top.expand(like.shape[0]), cond).float()

    def critic_loss(self, x, cond=None, real=None):
        """The fake score's denoising loss (dmd2's) on the student's one-step samples; x (real data) gives the shape."""
        with torch.no_grad():
            sample = self.one_step_sample(x, cond)
        return self.dmd.critic_loss(sample, cond)


class HyperSDWithDMD(HyperSD):
    """``hyper-sd`` with the DMD term in the one-step stage (it trains a fake score, so the trainer must build one:
    a class of its own, registered with ``dmd_weight`` 1 and DMD2's 5 fake-score updates per generator update)."""

    uses_fake_score = True


register("hyper-sd", HyperSD)
register("hyper-sd-dmd", HyperSDWithDMD, defaults={"dmd_weight": 1.0, "critic_updates": 5})  # DMD2's 5:1
