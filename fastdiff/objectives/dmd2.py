"""DMD2: improved distribution matching distillation (Yin et al., NeurIPS 2024; tianweiy/DMD2).

Generator: the gradient of KL(p_fake || p_real) over noise levels, estimated by the difference of two
denoisers on the noised generator sample (DMD, Yin et al. CVPR 2024, Eq. 7), normalised per sample by
``mean |x - x0_real|`` (DMD Eq. 8, no gradient through the weight), applied through the surrogate
``0.5 * ||x - stopgrad(x - grad)||^2`` whose gradient w.r.t. x is exactly ``grad`` (per element / numel).
Fake score: the teacher's own denoising loss on generator samples, at every noise level. Samples with a
non-finite value (theirs or a network's) are masked out of the generator loss and counted (``nonfinite_samples``).
CFG enters the real score only. Optional GAN head on the fake score's bottleneck (DMD2 Sec. 4.3), its inputs
noised at levels over the whole schedule (main/edm/edm_guidance.py, main/sd_guidance.py ``compute_cls_logits``
with ``--diffusion_gan_max_timestep 1000`` in every experiments/ script). Noise levels come from ``sigma_grid``:
the teacher's DDPM table as sd_guidance.py (default), or the 1000-point Karras grid as edm_guidance.py.

VSD / SwiftBrush (``weighting="vsd"``; Wang et al. 2023 "ProlificDreamer" Eq. 9, Nguyen & Tran 2024
"SwiftBrush"): the same KL gradient, ``w(t) (eps_real - eps_fake)`` with ``w(t) = s_t^2`` instead of the
per-sample normalisation. In x0 terms (``eps = (x_t - a y) / s`` on the native scale) that is
``a_t s_t (y_fake - y_real)``, at timesteps [20, 980] (VinAIResearch/SwiftBrush ``train_swiftbrush.py``:
``randint(20, 981)``, ``sigma_t**2 * (teacher_pred - lora_pred)``, tested in tests/test_vsd.py); the fake score is a
zero-initialised LoRA on the teacher (starts as the teacher), updated 1:1 at its own learning rate
(``train_defaults``: SwiftBrush's 1e-3; the trainer's ``objective.fake_lora_rank`` and ``critic_updates``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models.denoiser import Denoiser, expand
from .base import Objective, finite_samples, kept_mean, noised, only_finite, per_sample_mean
from .disback import Backtrack, Backtracking
from .gan import GANHead, discriminator_gan_loss
from .registry import register


class DMD2(Backtracking, Objective):
    """Distribution matching with a fake score trained faster than the generator (two time-scale rule).

    Args:
        teacher: the frozen real score (its guidance_scale is the real-score CFG).
        fake: the fake score, a trainable copy of the teacher.
        min_t, max_t: fraction of the teacher's timesteps for the distribution-matching noise levels
            (DMD2: [0.02, 0.98] T).
        critic_updates: fake-score updates per generator update (DMD2: 5 class-conditional, 10 text).
        gan_head: optional GAN head (needs real images); weights for its generator / critic terms.
        weighting: "dmd" (per-sample normalisation) or "vsd" (see the module docstring).
        fake_loss: the fake score's loss, "teacher" (its own, DMD2), "eps" or "edm".
        sigma_grid: "karras" (main/edm/edm_guidance.py) or "teacher" (main/sd_guidance.py); None = per teacher
            family (:func:`~fastdiff.objectives.base.default_sigma_grid`). The GAN head's noise levels cover the
            whole grid, ``randint(0, diffusion_gan_max_timestep=1000)`` as DMD2's scripts run it.
        backtrack, degradation_steps, backtrack_interval: DisBack's path (:mod:`.disback`; 0 = off).
    """

    def __init__(self, teacher: Denoiser, fake: Denoiser, min_t: float = 0.02, max_t: float = 0.98,
                 critic_updates: int = 5, gan_head: GANHead | None = None,
                 gan_generator_weight: float = 3e-3, gan_critic_weight: float = 1e-2, weighting: str = "dmd",
                 fake_loss: str = "teacher", sigma_grid: str | None = None, backtrack: int = 0,
                 degradation_steps: int = 200, backtrack_interval: int = 200):
        super().__init__(teacher, fake, critic_updates, gan_head, sigma_grid)
        self.backtrack = Backtrack(fake, backtrack, degradation_steps, backtrack_interval)
        if weighting not in ("dmd", "vsd"):
            raise ValueError(f"weighting must be dmd or vsd, got {weighting!r}")
        self.weighting = weighting
        self.fake_loss = fake_loss
        self.min_t, self.max_t = min_t, max_t
        self.gan_generator_weight = gan_generator_weight
        self.gan_critic_weight = gan_critic_weight

    @classmethod
    def teacher_defaults(cls, teacher) -> dict:
        """Text-to-image teachers: DMD2's experiments/ scripts update the fake score ``--dfake_gen_update_ratio``
        10 times per generator update for SD1.5, 5 for SDXL (as for ImageNet), and weigh the generator's GAN term
        ``--gen_cls_loss_weight`` 1e-3 (SD1.5) and 5e-3 (SDXL) where ImageNet's is 3e-3 (the discriminator's
        ``--guidance_cls_loss_weight`` is 1e-2 in all of them)."""
        if teacher.conditioning != "text":
            return {}
        xl = "XL" in type(teacher.pipeline).__name__
        return {"critic_updates": 5 if xl else 10, "gan_generator_weight": 5e-3 if xl else 1e-3}

    def train_defaults(self) -> dict:
        """DMD2's scripts (main/train_sd.py, main/edm/train_edm.py): AdamW (0.9, 0.999), weight decay 0.01, and
        ``constant_with_warmup`` over ``--warmup_step 500`` iterations, each of which is one fake-score update
        (the generator updates every ``dfake_gen_update_ratio``-th): 500 / critic_updates generator updates here.

        VSD / SwiftBrush (VinAIResearch/SwiftBrush ``train_swiftbrush.py`` and its README's training command):
        Adam (0.9, 0.999) without weight decay (``--adam_weight_decay`` 0), constant learning rate, and the LoRA
        fake score at ``--learning_rate_lora 1e-3``, 1000x the student's 1e-6 (ProlificDreamer as threestudio runs
        it, ``configs/prolificdreamer.yaml``: the LoRA at 1e-4 beside a NeRF at 1e-3 / 1e-2, also Adam-type with no
        shared rate). ``lr_critic`` 1e-3 is SwiftBrush's LoRA rate; the generator keeps fastdiff's 1e-5. At the
        generator's rate the zero-initialised LoRA barely leaves the teacher, so ``x0_fake - x0_real`` is an
        untrained adapter's residual, not the generator's score: on the embedded teacher (3 CPU minutes, batch 8)
        FID@500 went 186.0 -> 311.3 at lr_critic 1e-5 (loss_dm 2e-8 to 2e-6) and 186.0 -> 117.6 at 1e-3 (loss_dm
        1e-3 to 7e-3), issue 27."""
        if self.weighting == "vsd":
            return {"adam_betas": [0.9, 0.999], "weight_decay": 0.0, "lr_warmup_steps": 0, "lr_critic": 1e-3}
        return {"adam_betas": [0.9, 0.999], "weight_decay": 0.01, "lr_warmup_steps": 500 // self.critic_updates}

    def dm_gradient(self, x: torch.Tensor, x_t: torch.Tensor, sigma: torch.Tensor, cond,
                    fake_guidance=1.0) -> torch.Tensor:
        """The KL gradient on x, no graph: (x0_fake - x0_real) / mean|x - x0_real| (DMD) or a s (x0_fake - x0_real) (VSD).
        ``fake_guidance``: the fake score's CFG scale (a float or one per sample); 1 (unguided) as DMD2 and SwiftBrush."""
        with torch.no_grad():
            x0_real = self.real_x0(x_t, sigma, cond)  # the teacher, or DisBack's node on the path
            x0_fake = self.fake(x_t, sigma, cond, guidance_scale=fake_guidance)
            if self.weighting == "vsd":
                schedule = self.teacher.schedule
                weight = expand(schedule.alpha(sigma) * schedule.noise_scale(sigma), x).to(x0_real.dtype)
            else:
                weight = 1 / (x.detach() - x0_real).abs().mean(dim=tuple(range(1, x.ndim)), keepdim=True)
            grad = (x0_fake - x0_real) * weight
        return grad  # non-finite where a network output was: generator_loss masks those samples, as SiD does

    def gan_noised(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The GAN head's input: x at a noise level drawn over the whole grid (DMD2's ``compute_cls_logits``)."""
        return noised(x, self.teacher.schedule, 0.0, 1.0, self.sigma_grid)

    def generator_loss(self, x, cond=None, real=None):
        if not self.trains_generator():  # DisBack's stage 1 (the trainer skips it): no gradient for the generator
            return torch.zeros((), device=x.device, requires_grad=True), {}
        x_t, sigma = noised(x.detach(), self.teacher.schedule, self.min_t, self.max_t, self.sigma_grid)
        grad = self.dm_gradient(x, x_t, sigma, cond)
        # A sample with a non-finite value (its own, the teacher's or the fake score's output) is dropped from
        # the loss and counted; zeroing it instead (nan_to_num) hid a NaN teacher output as a zero gradient.
        ok = finite_samples(x, grad)
        x_kept, grad = only_finite(ok, x.float(), grad.float())
        per_sample = 0.5 * per_sample_mean((x_kept - (x_kept - grad).detach()) ** 2)
        loss = per_sample.sum() / x.shape[0]  # = 0.5 mse(x, x - grad) when every sample is finite
        logs = {"loss_dm": loss.detach(), "nonfinite_samples": (~ok).sum()}
        if self.gan_head is not None:
            logits = self.gan_head(*self.gan_noised(x_kept.to(x.dtype)), cond)
            gan = kept_mean(ok, F.softplus(-logits.float()))
            logs["loss_gan_g"] = gan.detach()
            loss = loss + self.gan_generator_weight * gan
        return loss, logs

    def critic_loss(self, x, cond=None, real=None):
        loss = self.fake_denoising_loss(x, cond, self.fake_loss)
        logs = {"loss_fake": loss.detach()}
        if self.gan_head is not None:
            if real is None:
                raise ValueError("the DMD2 GAN head needs real images (data.path)")
            x_real, cond_real = real
            logits_fake = self.gan_head(*self.gan_noised(x), cond)
            logits_real = self.gan_head(*self.gan_noised(x_real), cond_real)
            gan = discriminator_gan_loss(logits_real, logits_fake)
            logs["loss_gan_d"] = gan.detach()
            loss = loss + self.gan_critic_weight * gan
        return loss, logs


register("dmd2", DMD2)
register("disback", DMD2, defaults={"backtrack": 10})  # DisBack's 10 path checkpoints (main/degradation.py)
register("vsd", DMD2, defaults={"weighting": "vsd", "critic_updates": 1}, fake_lora_rank=16)  # SwiftBrush's LoRA
