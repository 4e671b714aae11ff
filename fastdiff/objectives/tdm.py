"""TDM: trajectory distribution matching (Luo, Hu, Sun, Cai, Tang, ICCV 2025, "Learning Few-Step Diffusion Models by
Trajectory Distribution Matching", arXiv 2503.06674; reference code Luo-Yihong/TDM ``train_tdm_demo.py`` and the
training command of its README).

A K-step student samples ``x_{t_0} = z -> x0_0 -> x_{t_1} -> ... -> x0_{K-1}`` (step k: its x0 estimate ``x0_k``, then
the sampler's re-noising to the next level ``t_{k+1}``; the end ``t_K`` is the clean sample). TDM matches, for every
step, the distribution of the student's next state to the teacher's marginal there: data-free, distribution-level
trajectory matching. Written out (from the reference script: the paper's text beyond its abstract was not reachable),
with ``q_t^k`` the law of the student's state after step k diffused forward to level t, ``p_t`` the teacher's marginal:

    L(theta) = E_k E_{t ~ U[t_{k+1}, t_k]} KL(q_t^k || p_t)                        (TDM's objective)
    grad = E[ w (x0_fake(x_t, t) - x0_real(x_t, t)) . d x0_k / d theta ]             (DMD-style, Eq. 7 of DMD)
    x_t = x_{t_{k+1}} + sqrt(sigma_t^2 - sigma_{t_{k+1}}^2) eps   (VE scale; native: ``predictor.add_noise``)

The gradient flows through x0_k only. With ddim re-noising (VE) ``x_{t_{k+1}} = (1 - r) x0_k + r x_{t_k}``,
``r = sigma_{k+1} / sigma_k``, and x_{t_k} comes from earlier steps without gradient, so ``d x_t / d theta =
(1 - r) d x0_k / d theta``: with ``w = a_t s_t`` the surrogate's expected gradient is ``2 w sigma_t^2 / (D (1 - r))``
times grad KL(q_t^k || p_t) (tests/test_tdm.py checks it on Gaussians); the reference's ``w = 1 / wf`` rescales it per
sample, as DMD's normalisation does.

``x0_fake`` is a fake score trained on the student's own trajectory states (not on its final samples) and ``x0_real``
the teacher with CFG. What follows the reference, line by line of ``train_tdm_demo.py``:
- the trajectory: ``generate_new`` runs the K student steps (deterministic DDIM re-noising with the step's own eps,
  fastdiff's ``student.sampler: ddim``) without gradient; every sample draws its own step ``ind_t`` uniformly and the
  student re-runs that step with gradient (``model_eps, model_latents``);
- step-aware timesteps (the "sampling-steps-aware" objective, ``--use_separate``): ``t`` is an integer drawn uniformly
  in ``[max(20, t_{k+1} + 1), t_k - 10)``, so each step's target lives on its own interval and the steps' objectives
  are decoupled; without it (``separate_intervals: false``) the upper end is ``total_steps - 10`` for all;
- the noised sample: the student's next state (``add_noise(model_latents, model_eps, t_mid)``) diffused forward to
  t with fresh noise (``predictor.add_noise``); fastdiff takes the state at the student's own next level ``t_{k+1}``,
  the reference at ``t_{k+1} + 1`` (its ``timesteps_mid``), a one-timestep difference;
- generator loss (``loss_instruct``, README command ``--use_huber``): with ``g = x0_fake - x0_real`` (teacher CFG'd,
  ``sd_latents_cfg``; the fake score unguided) and ``wf = mean|x0_k - x0_real|`` per sample (no gradient),
      huber: mean( (sqrt((x0_k - sg(x0_k - g))^2 + c^2) - c) / wf ),  c = 1e-3
      l2:    mean( (x0_k - sg(x0_k - g))^2 / wf )
  (the l2 gradient is 2 g / wf per element, twice DMD2's ``0.5 mse`` surrogate: at K = 1, l2 TDM is DMD2 on
  timesteps [20, t_0 - 11] with twice its gradient, tests/test_tdm.py);
- fake-score loss (``loss_score``): at the same kind of (x_t, t), the fake score's x0 estimate regressed onto the
  student's x0_k, weighted by ``min(snr_t, 5)`` (min-SNR; ``snr = a_t^2 / s_t^2 = 1 / sigma_t^2``) and by the
  importance weight ``exp(-0.5 mean(m^2)) / exp(-0.5 mean(eps^2))`` of the mixed noise ``m = (x_t - x0_k) / sigma_t``
  (``obtain_mixed_noise``) against the fresh noise eps;
- one fake-score update per generator update; AdamW betas (0, 0.95), weight decay 1e-2; the fake score a full copy
  of the teacher at ``--learning_rate`` 2e-5, the student at a fifth of it (4e-6, the README's command), 50 warm-up
  steps, generator gradients clipped at norm 1 (``--max_grad_norm``: ``train.grad_clip`` 1 by default) and the fake
  score's not at all (``critic_grad_clip`` 0).
Not followed: ``--use_randmid`` (off in the README command), the PixArt-specific plumbing.

fastdiff's K levels are the student's own (``student.num_steps``, ``student.sigma_init``, ``student.sampler``): the
reference's ``--total_steps 900`` grid 899/674/449/224 is ``step_timesteps`` from ``sigma_init`` at t = 899 with the
lcm sampler, or, with the ddim sampler (which starts at the top), the ``--total_steps 1000`` grid 999/749/499/249. With
``student.sampler: lcm`` the re-noising is fresh noise and each step's target is DMD on its x0 at its own interval.
The trainer hands TDM the student's sampler itself (``samples_student``): TDM runs the trajectory, so the trainer makes
no generator sample of its own (``uses_generator_sample`` False; ``x`` is the noise batch, read for its shape).
"""
from __future__ import annotations

import torch

from ..models.denoiser import Denoiser, expand
from ..models.generator import Generator
from ..models.schedule import VPSchedule
from .base import finite_mean, finite_samples, only_finite, per_sample_mean
from .dmd2 import DMD2
from .registry import register

DISTANCES = ("huber", "l2")
REFERENCE_FLOOR_T = 0.02  # train_tdm_demo.py: ``lowt = max(20, ...)`` on a 1000-step table


def tdm_generator_loss(x0: torch.Tensor, diff: torch.Tensor, weight: torch.Tensor, distance: str = "l2",
                       huber_c: float = 1e-3) -> torch.Tensor:
    """Per-sample ``mean_elements(d(x0 - sg(x0 - diff))) * weight``: the reference's ``loss_instruct`` before its batch
    mean (``diff = x0_fake - x0_real``; ``weight = 1 / wf``). Its gradient in x0 is ``d'(diff) * weight / numel``."""
    u = x0 - (x0 - diff).detach()
    d = u ** 2 if distance == "l2" else torch.sqrt(u ** 2 + huber_c ** 2) - huber_c
    return per_sample_mean(d) * weight


def mixed_noise_weight(mixed: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """``exp(-0.5 mean(mixed^2)) / exp(-0.5 mean(eps^2))`` per sample, as one exponential (no underflow)."""
    return torch.exp(-0.5 * (per_sample_mean(mixed.double() ** 2) - per_sample_mean(eps.double() ** 2)))


class TDM(DMD2):
    """Trajectory distribution matching for a K-step student (see the module docstring).

    Args:
        student: the student's K-step sampler (the trainer passes the run's own, ``samples_student``).
        min_t: the lowest matching timestep as a fraction of the table (reference: 20 of 1000).
        step_margin: timesteps kept clear below each step's own level (reference: ``t_k - 10``, exclusive).
        separate_intervals: step k matches on ``[t_{k+1}, t_k]`` (reference ``--use_separate``); else on
            ``[t_{k+1}, t_0]``.
        critic_updates: fake-score updates per generator update (reference: 1).
        distance: "l2" (default) or "huber" (the reference README's ``--use_huber``, ``huber_c`` 1e-3). At c = 1e-3 the
            element-wise pseudo-Huber's gradient is nearly the sign of g; on the analytic bench (4 steps, 400
            updates, seeds 0 / 1 / 2) l2 measured 2.65 / 2.86 / 2.48 x floor (mode weights 0.038 / 0.037 / 0.060)
            against huber's 4.07 / 4.67 / 3.92 (0.072 / 0.080 / 0.082), so l2 is the default
            (eval/results/bench-gmm-cpu/README.md, "TDM").
        fake_snr_cap: the fake score's min-SNR cap (reference: 5); importance_weight: the mixed-noise weight on it.
        weighting: "dmd" (the reference's ``1 / mean|x0 - x0_real|``) or "vsd" (``a_t s_t``, no per-sample
            normalisation: the plain KL gradient, used to test it).
    """

    samples_student = True
    critic_grad_clip = 0.0  # train_tdm_demo.py steps optimizer_d without clipping (only the student's is clipped)
    uses_generator_sample = False  # both losses run the student's trajectory themselves (trajectory_sample)

    def __init__(self, teacher: Denoiser, fake: Denoiser, student: Generator, min_t: float = REFERENCE_FLOOR_T,
                 step_margin: int = 10, separate_intervals: bool = True, critic_updates: int = 1,
                 distance: str = "l2", huber_c: float = 1e-3, fake_snr_cap: float = 5.0,
                 importance_weight: bool = True, weighting: str = "dmd", gan_head=None):
        if gan_head is not None:
            raise ValueError("objective.gan does not apply to tdm (TDM is data-free)")
        if not isinstance(teacher.schedule, VPSchedule):
            raise ValueError("tdm draws its timesteps on the teacher's DDPM table, as its reference does; "
                             "flow-matching teachers are not supported")
        if distance not in DISTANCES or huber_c <= 0 or fake_snr_cap <= 0 or step_margin < 0 or critic_updates < 1:
            raise ValueError(f"objective.distance must be one of {', '.join(DISTANCES)}, huber_c and fake_snr_cap "
                             f"positive, step_margin >= 0, critic_updates >= 1; got {distance!r}, {huber_c}, "
                             f"{fake_snr_cap}, {step_margin}, {critic_updates}")
        super().__init__(teacher, fake, min_t=min_t, max_t=1.0, critic_updates=critic_updates, weighting=weighting)
        self.student = student
        self.distance, self.huber_c = distance, huber_c
        self.fake_snr_cap, self.use_importance_weight = fake_snr_cap, importance_weight
        self.step_margin, self.separate_intervals = step_margin, separate_intervals
        lo, hi = self._intervals = self.intervals()
        if (lo > hi).any():
            raise ValueError(f"objective.step_margin {step_margin} leaves no timestep between the student's "
                             f"{len(lo)} levels (intervals {list(zip(lo.tolist(), hi.tolist()))})")

    @classmethod
    def teacher_defaults(cls, teacher) -> dict:
        """None: the reference updates the fake score once per generator update on text-to-image teachers too
        (DMD2's 10:1 for text teachers does not apply)."""
        return {}

    def train_defaults(self) -> dict:
        """The reference's optimizers (``train_tdm_demo.py`` and its README command): AdamW betas (0, 0.95), weight
        decay 1e-2, 50 warm-up steps, fake score at 2e-5 and the student at a fifth of it; the student's gradient
        clipped at ``--max_grad_norm 1``, the fake score's never (``critic_grad_clip``)."""
        return {"adam_betas": [0.0, 0.95], "weight_decay": 1e-2, "lr_warmup_steps": 50, "lr_generator": 4e-6,
                "lr_critic": 2e-5, "grad_clip": 1.0}

    # --- the student's trajectory ---------------------------------------------------------------------------
    @property
    def num_steps(self) -> int:
        return self.student.num_steps

    def levels(self) -> torch.Tensor:
        """The K step levels, highest first, and 0 (the clean end) after the last: K + 1 values."""
        sigmas = self.student.sigmas
        return torch.cat([sigmas, sigmas.new_zeros(1)])

    def intervals(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each step's matching timesteps, inclusive integer bounds ``lo_k <= t <= hi_k`` on the teacher's table:
        ``lo_k = max(min_t T, t_{k+1} + 1)``, ``hi_k = t_k - step_margin - 1`` (``t_0 - step_margin`` for all when
        not separate, as the reference's ``total_steps - 10``); t_K = -1 stands for the clean end. CPU tensors (read
        once; no device sync in a step)."""
        schedule = self.teacher.schedule
        t = schedule.timestep(self.student.sigmas.detach().cpu().float()).round().long()
        nxt = torch.cat([t[1:], torch.tensor([-1])])
        lo = torch.clamp(nxt + 1, min=int(self.min_t * schedule.num_train_timesteps))
        if self.separate_intervals:
            return lo, t - self.step_margin - 1
        return lo, (t[:1] - self.step_margin).expand_as(t)  # ``total_steps - 10`` (exclusive), total_steps = t_0 + 1

    def draw_levels(self, k: torch.Tensor) -> torch.Tensor:
        """sigma at an integer timestep uniform in step k's interval, per sample (``k`` on the CPU)."""
        lo, hi = self._intervals
        lo, hi = lo[k], hi[k]
        t = lo + (torch.rand(k.shape) * (hi - lo + 1).double()).floor().long().clamp(max=(hi - lo))
        return self.teacher.schedule.sigma_at(t)

    def draw_steps(self, n: int) -> torch.Tensor:
        """Each sample's step k, uniform in 0..K-1 (the reference's ``ind_t``); a CPU draw: no device sync."""
        return torch.randint(self.num_steps, (n,))

    def step_inputs(self, z: torch.Tensor, k: torch.Tensor, cond) -> torch.Tensor:
        """Every sample's native input at its step k: the student's own sampler run from z without gradient
        (``generate_new``), re-noising as ``student.sampler`` does."""
        x_native, x_k = z, z
        kk = k.to(z.device).reshape(-1, *[1] * (z.ndim - 1))
        sigmas = self.student.sigmas
        with torch.no_grad():
            for i in range(int(k.max())):
                x0 = self.student.denoiser.denoise_native(x_native, sigmas[i], cond)
                x_native = self.student.next_input(x_native, x0, sigmas[i], sigmas[i + 1], lambda: torch.randn_like(z))
                x_k = torch.where(kk == i + 1, x_native, x_k)
        return x_k

    def student_step(self, x_k: torch.Tensor, k: torch.Tensor, cond) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x0_k with gradient, the student's next state in the VE scale without gradient, its level) for inputs
        ``x_k`` at per-sample steps ``k``; after the last step the next state is x0_k itself (level 0)."""
        levels = self.levels()
        idx = k.to(levels.device)
        sigma, sigma_next = levels[idx], levels[idx + 1]
        x0 = self.student.denoiser.denoise_native(x_k, sigma, cond)
        with torch.no_grad():
            nxt = self.student.next_input(x_k, x0.detach(), sigma, sigma_next, lambda: torch.randn_like(x_k))
            x_next = nxt / expand(self.teacher.schedule.alpha(sigma_next), nxt)
        return x0, x_next, sigma_next

    def diffuse(self, x0: torch.Tensor, x_next: torch.Tensor, sigma_next: torch.Tensor, sigma_t: torch.Tensor):
        """(x_t, mixed noise, fresh noise): x_next carried forward from its level to sigma_t (VE scale, the
        reference's ``predictor.add_noise``), and ``(x_t - x0) / sigma_t`` (its ``obtain_mixed_noise``)."""
        eps = torch.randn_like(x_next)
        var = (sigma_t.double() ** 2 - sigma_next.double() ** 2).clamp(min=0)
        x_t = x_next + expand(var.sqrt().to(x_next.dtype), x_next) * eps
        mixed = (x_t - x0) / expand(sigma_t.to(x_t.dtype), x_t)
        return x_t, mixed, eps

    def trajectory_sample(self, like: torch.Tensor, cond):
        """One training point per sample: (x0_k with gradient if enabled, x_t, sigma_t, mixed noise, fresh noise)."""
        z = torch.randn_like(like, dtype=torch.float32)
        k = self.draw_steps(z.shape[0])
        x_k = self.step_inputs(z, k, cond)
        x0, x_next, sigma_next = self.student_step(x_k, k, cond)
        sigma_t = self.draw_levels(k).to(z.device)
        x_t, mixed, eps = self.diffuse(x0.detach(), x_next, sigma_next, sigma_t)
        return x0, x_t, sigma_t, mixed, eps

    # --- losses -----------------------------------------------------------------------------------------------
    def matching_loss(self, x0: torch.Tensor, x_t: torch.Tensor, sigma: torch.Tensor, cond):
        """The generator loss at given (x_t, sigma) for the student's x0 (see ``tdm_generator_loss``)."""
        with torch.no_grad():
            x0_real = self.teacher(x_t, sigma, cond)
            x0_fake = self.fake(x_t, sigma, cond, guidance_scale=1.0)
            diff = x0_fake - x0_real
            if self.weighting == "vsd":
                schedule = self.teacher.schedule
                weight = (schedule.alpha(sigma) * schedule.noise_scale(sigma)).to(diff.dtype)
            else:  # the reference computes wf in float64
                weight = 1 / (x0.detach().double() - x0_real.double()).abs().flatten(1).mean(dim=1)
        ok = finite_samples(x0, diff, weight)
        x0_kept, diff, weight = only_finite(ok, x0 if x0.dtype == torch.float64 else x0.float(), diff, weight)
        per_sample = tdm_generator_loss(x0_kept, diff.to(x0_kept.dtype), weight.to(x0_kept.dtype), self.distance,
                                        self.huber_c)
        loss = per_sample.sum() / x0.shape[0]
        return loss, {"loss_tdm": loss.detach(), "nonfinite_samples": (~ok).sum()}

    def generator_loss(self, x, cond=None, real=None):
        x0, x_t, sigma, _, _ = self.trajectory_sample(x, cond)
        return self.matching_loss(x0, x_t, sigma, cond)

    def fake_weight(self, sigma: torch.Tensor, mixed: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """min(snr, cap) times the importance weight (when on), per sample."""
        w = (sigma.double() ** -2).clamp(max=self.fake_snr_cap)
        return w * mixed_noise_weight(mixed, eps) if self.use_importance_weight else w

    def critic_loss(self, x, cond=None, real=None):
        """The fake score regressed onto the student's x0_k from its trajectory point x_t (``loss_score``)."""
        with torch.no_grad():
            x0, x_t, sigma, mixed, eps = self.trajectory_sample(x, cond)
            weight = self.fake_weight(sigma, mixed, eps).float()
        x0_hat = self.fake(x_t, sigma, cond, guidance_scale=1.0)
        loss = finite_mean(per_sample_mean((x0_hat - x0.float()) ** 2), weight)
        return loss, {"loss_fake": loss.detach()}


register("tdm", TDM)
