"""rCM: score-regularized continuous-time consistency (Zheng et al. 2025, "Large Scale Diffusion Distillation via
Score-Regularized Continuous-Time Consistency", arXiv 2510.08431; reference NVlabs/rcm).

The student's loss is sCM's (``scm.py``, sCM Eq. 8 with tangent normalisation) on noised real data plus a DMD
(reverse-KL) regulariser on the student's own samples, ``L = L_sCM + w L_DMD``; the fake score learns the
student's samples with the teacher's denoising loss. Both parts are the existing code: this class *is* an
``ContinuousConsistency`` and *has* a ``DMD2`` (its generator gradient, per-sample normalisation, non-finite mask
and fake-score loss), so each term is exactly what ``scm`` and ``dmd2`` compute, except the sCM term's tangent
warm-up, which is rCM's own (``rcm_tangent``): during the warm-up (r < 1) rCM scales only the ``x_t`` term by r,
keeps the JVP term ``cos sin dF/dt`` whole and weights ``sd F - dx_t/dt`` by ``cos(t) sqrt(1 - r^2 sin^2 t)``
instead of sCM's ``cos^2 t``; at r = 1 both are sCM's Eq. 8.

What follows the reference, file by file (NVlabs/rcm):
- rcm/models/t2v_model_distill_rcm.py ``_student_scm_step``: the sCM term without a prior or adaptive weighting
  (``kendall_loss = loss_scale * loss_scm``), hence ``prior_weighting`` / ``adaptive_weighting`` off here; its
  tangent with rCM's warm-up (lines 548-552; ``rcm_tangent``), r = ``min(1, step / tangent_warmup)`` as there (every
  update of the warm-up is a student update in both).
- ``_student_dmd_step``: DMD's gradient ``(x0_fake - x0_teacher) / mean|x - x0_teacher|`` (dmd2's) on the student
  sample noised at a DMD level; ``training_step_critic``: the fake score's denoising loss on student samples.
- ``is_student_phase`` / ``training_step_closures``: during the tangent warm-up the student trains on sCM alone
  and the fake score not at all (it starts from the teacher's weights when the warm-up ends); afterwards the DMD
  term joins and the fake score updates ``student_update_freq - 1 = 4`` times per student update
  (``critic_updates = 4``; ``critic_updates_now``). Its learning-rate warm-up therefore starts with the DMD phase, as
  the reference's ``get_effective_iteration_fake`` does.
- ``backward_simulation``: the student's sample starts from pure noise at its first sampling level (here the
  Generator's, ``step_sigmas(student, 1, sigma_max)``) and runs ``n`` steps, ``n`` in 1..``simulation_steps``
  (``max_simulation_steps_fake = 4``), each next level ``min(draw, previous)`` from the DMD noise distribution,
  re-noised with fresh noise, gradient through the last step only. rCM cycles ``n`` with the iteration; fastdiff
  draws it uniformly (the same frequencies, and the RNG is already checkpointed).
- DMD noise levels: rCM draws them from its teacher's own training distribution (``p_D``: shifted-uniform RF time
  for Wan, shift 5); here dmd2's, the teacher's table in ``[min_t, max_t]`` (DMD2's [0.02, 0.98]); on a flow teacher
  ``sigma_grid: shifted`` draws rCM's shifted-uniform levels with the teacher schedule's own shift.
- rcm/configs/experiments/rcm/wan2pt1_t2v.py: ``loss_scale = 100`` (sCM) and ``loss_scale_dmd = 1``, both *summed*
  over elements, with sCM's tangent normalised by its L2 norm (``g / (||g|| + 0.1)``); tangent warm-up 1000;
  AdamW betas (0, 0.999), weight decay 0.01 for both networks (student lr 2e-6, fake score 4e-7: a 5x lower critic
  lr, which ``train.lr_critic`` has to be set to); rcm/configs/defaults/scheduler.py: 100 warm-up steps.

The weight ``w``. fastdiff's sCM and DMD losses are element means with the tangent normalised by its RMS. Writing
rCM's sums in those terms (D elements per sample, ``||g|| = sqrt(D) rms(g)``, ``g_hat = g / rms(g)``, the tangent
constant negligible), the gradients with respect to the student's x0 are ``100 * 2 g_hat / (sqrt(D) sd_r sin t)``
(sCM, through ``F = (cos t x_t - x0) / (sd sin t)``) and ``2 grad`` (DMD), against fastdiff's
``2 g_hat / (D sd sin t)`` and ``w grad / D``. The same ratio needs ``w = sqrt(D) sd_r / (50 sd)``, with rCM's
``sd_r = 1`` (rcm/utils/denoiser_scaling.py asserts sigma_data 1) and sCM's ``sd = 0.5`` here: ``sqrt(D) / 25``
(``dmd_weight`` None), 0.32 on the 1x8x8 bench mixture, 1.12 on 28x28 images.
"""
from __future__ import annotations

import math

import torch

from ..models.denoiser import Denoiser, expand
from ..models.generator import step_sigmas
from .base import sample_sigma
from .dmd2 import DMD2
from .registry import register
from .scm import SIGMA_DATA, ContinuousConsistency

RCM_SCM_SCALE, RCM_DMD_SCALE = 100.0, 1.0  # rcm/configs/experiments/rcm/wan2pt1_t2v.py: loss_scale, loss_scale_dmd
RCM_SIGMA_DATA = 1.0  # rcm/utils/denoiser_scaling.py (RectifiedFlow_TrigFlowWrapper)


def rcm_dmd_weight(elements: int) -> float:
    """rCM's DMD weight relative to fastdiff's element-mean sCM loss (module docstring): sqrt(D) sd_r / (50 sd)."""
    return 2 * RCM_DMD_SCALE * math.sqrt(elements) * RCM_SIGMA_DATA / (RCM_SCM_SCALE * SIGMA_DATA)


def rcm_tangent(F, dF_dt, x_t, dxt_dt, t, r: float) -> torch.Tensor:
    """rCM's sCM tangent with its warm-up (NVlabs/rcm rcm/models/t2v_model_distill_rcm.py ``_student_scm_step``,
    lines 548-552), before normalisation:

        g = -cos(t) sqrt(1 - r^2 sin^2(t)) (F_sg - F_teacher) - (r cos(t) sin(t) x_t + t_F_theta)

    with rCM's F (sigma_data 1, ``F = (cos x_t - x0) / sin``) = ``SIGMA_DATA * F`` here, F_teacher = ``dxt_dt`` and
    t_F_theta (the JVP of F along ``(cos sin F_teacher, cos sin)``) = ``SIGMA_DATA * dF_dt``. Only the x_t term is
    scaled by r; at r = 1 this is ``scm.tangent_loss``'s sCM Eq. 8."""
    cos, sin = expand(torch.cos(t), x_t), expand(torch.sin(t), x_t)
    return (-cos * torch.sqrt(1 - r**2 * sin**2) * (SIGMA_DATA * F.detach() - dxt_dt)
            - (r * cos * sin * x_t + SIGMA_DATA * dF_dt))


class RCM(ContinuousConsistency):
    """Args (beyond :class:`~fastdiff.objectives.scm.ContinuousConsistency`, whose defaults change to rCM's: no prior
    or adaptive weighting, tangent warm-up 1000, in rCM's form: ``rcm_tangent``):
        fake: the fake score, a trainable copy of the teacher.
        dmd_weight: w of ``L_sCM + w L_DMD``; None = rCM's balance (``rcm_dmd_weight``). The DMD term joins after
            the tangent warm-up, as in rCM.
        critic_updates: fake-score updates per student update (rCM: 4).
        min_t, max_t, fake_loss, sigma_grid: the DMD term's noise levels and the fake score's loss, as dmd2's.
        simulation_steps: the student's samples take 1..simulation_steps steps (rCM: 4).
    """

    trains_on = "data"
    uses_fake_score = True
    tangent_rule = staticmethod(rcm_tangent)  # rCM's warm-up in the sCM term (ContinuousConsistency.loss_at)

    def __init__(self, teacher: Denoiser, fake: Denoiser, student: Denoiser, gan_head=None, tangent: str = "auto",
                 tangent_warmup: int = 1000, tangent_norm: float = 0.1, fd_step: float = 3e-4, p_mean: float = -1.0,
                 p_std: float = 1.4, prior_weighting: bool = False, adaptive_weighting: bool = False,
                 dmd_weight: float | None = None, critic_updates: int = 4, min_t: float = 0.02, max_t: float = 0.98,
                 fake_loss: str = "teacher", sigma_grid: str | None = None, simulation_steps: int = 4,
                 sigma_max: float | None = None):
        if gan_head is not None:
            raise ValueError("objective.gan does not apply to rcm (rCM has no GAN term)")
        if critic_updates < 1 or simulation_steps < 1 or (dmd_weight is not None and dmd_weight < 0):
            raise ValueError("objective.critic_updates and simulation_steps must be >= 1 and dmd_weight >= 0")
        super().__init__(teacher, None, student, tangent=tangent, tangent_warmup=tangent_warmup,
                         tangent_norm=tangent_norm, fd_step=fd_step, p_mean=p_mean, p_std=p_std,
                         prior_weighting=prior_weighting, adaptive_weighting=adaptive_weighting, sigma_max=sigma_max)
        self.fake, self.critic_updates = fake, critic_updates
        self.dmd = DMD2(teacher, fake, min_t, max_t, critic_updates, weighting="dmd", fake_loss=fake_loss,
                        sigma_grid=sigma_grid)
        self.sigma_grid = self.dmd.sigma_grid
        self.dmd_weight, self.simulation_steps = dmd_weight, simulation_steps

    def train_defaults(self) -> dict:
        """rCM's optimizer (wan2pt1_t2v.py: AdamW betas (0, 0.999), weight decay 0.01; scheduler.py: 100 warm-up
        steps). Its fake-score lr is 5x below the student's: set ``train.lr_critic`` accordingly."""
        return {"adam_betas": [0.0, 0.999], "weight_decay": 0.01, "lr_warmup_steps": 100,
                "grad_clip": 0.0}  # wan2pt1_t2v.py: grad_clip=False

    def dmd_on(self) -> bool:
        return self.step >= self.tangent_warmup

    def critic_updates_now(self) -> int:
        return self.critic_updates if self.dmd_on() else 0  # rCM: no fake-score update in the warm-up

    def weight_for(self, x: torch.Tensor) -> float:
        return rcm_dmd_weight(x[0].numel()) if self.dmd_weight is None else self.dmd_weight

    def student_sample(self, like: torch.Tensor, cond, steps: int) -> torch.Tensor:
        """rCM's ``backward_simulation``: ``steps`` student steps from pure noise, with gradient through the last.
        The first level is the student's first sampling level; each later one ``min(draw, previous)`` with draws
        from the DMD noise levels; between steps the x0 estimate is re-noised with fresh noise."""
        n = like.shape[0]
        top = step_sigmas(self.student, 1, self.sigma_max).to(like.device)[0]
        z = torch.randn_like(like, dtype=torch.float32)
        sigma = top.expand(n)
        with torch.set_grad_enabled(torch.is_grad_enabled() and steps == 1):
            x0 = self.student.denoise_native(z, sigma, cond).float()
        for k in range(1, steps):
            draw = sample_sigma(self.teacher.schedule, n, self.dmd.min_t, self.dmd.max_t, like.device, self.sigma_grid)
            sigma = torch.minimum(draw.to(sigma.dtype), sigma)
            x = x0.detach() + expand(sigma, x0) * torch.randn_like(x0)
            with torch.set_grad_enabled(torch.is_grad_enabled() and k == steps - 1):
                x0 = self.student(x, sigma, cond).float()
        return x0

    def simulation_draw(self) -> int:
        return int(torch.randint(self.simulation_steps, (1,)).item()) + 1  # CPU draw: no device sync

    def generator_loss(self, x, cond=None, real=None):
        loss, logs = super().generator_loss(x, cond)
        if not self.dmd_on():  # rCM: sCM alone during the tangent warm-up
            return loss, {**logs, "loss_rcm": loss.detach()}
        sample = self.student_sample(x, cond, self.simulation_draw())
        dm, dm_logs = self.dmd.generator_loss(sample, cond)
        total = loss + self.weight_for(x) * dm
        return total, {**logs, **dm_logs, "loss_rcm": total.detach()}

    def critic_loss(self, x, cond=None, real=None):
        """The fake score's denoising loss (dmd2's) on student samples; ``x`` (real data) only gives the shape."""
        with torch.no_grad():
            sample = self.student_sample(x, cond, self.simulation_draw())
        return self.dmd.critic_loss(sample, cond)


register("rcm", RCM)
