"""SiD: score identity distillation (Zhou et al., ICML 2024; mingyuanzhou/SiD), SiDA and SiD-LSG.

Generator loss per sample (SiD Sec. 3-4, Algorithm 1; reference training/sid_loss.py ``generator_loss``):
``(y_r - y_f) . ((y_r - x) - alpha (y_r - y_f)) / mean|x - y_r|`` with ``y_r``, ``y_f`` the teacher and fake
x0 estimates at ``x_t = x + sigma eps``; the denominator has no gradient, everything else backpropagates
through the frozen teacher and fake networks into the generator sample x. With alpha = 0.5 and an exact
fake score this is half the gradient of the x0-space Fisher divergence ``E||y_r - y_f||^2`` (tested);
SiD uses alpha = 1.2 (1.0 for text-to-image). Noise levels: positions in [min_t, max_t] (t <= 0.8) of
``sigma_grid`` (the teacher's DDPM table as SiD-LSG; opt-in Karras rho=7 as sid_loss.py on EDM teachers).
The reference sums over elements and scales by ``loss_scaling_G`` = 100; fastdiff reports the mean over
elements, i.e. the reference's loss / (100 N), N elements per sample (a constant factor Adam ignores, and one
scale for logs across objectives; no gradient-norm clip, as the reference).
Fake score: EDM's loss on x0 teachers (sid_loss.py ``__call__``), the epsilon loss at t in [20, 980) on
epsilon / v teachers (SiD-LSG training/sid_training_loop.py), one update per generator update.
Samples with non-finite values are masked out of the loss. The generator EMA is the trainer's.

SiDA (Zhou et al. 2025, "Adversarial Score identity Distillation"; branch sida, sida_training/sida_loss.py,
sida_training_loop.py): a GAN head on the fake score's encoder, real images, alpha = 1. In the reference's units
(per-sample sums) the generator loss is ``100 SiD`` until 200k images, then
``0.5 (100 SiD) + 0.5 (0.01 N BCE(clamp(D(x_t), -10, 10), 1) mean(1 / mean|x - y_r|))`` at the SiD noise level;
the critic loss is the fake score's EDM loss (summed over elements) plus
``mean(lambda(sigma)) (BCE(D(real_t), 1) + BCE(D(fake_t), 0)) / 2`` with real and fake noised by the fake loss's
own sigma and noise; fake-score gradients are clipped by value 1 while the GAN is on. fastdiff divides the
generator loss by 100 N and the critic loss by N, so ``gan_generator_weight`` = 0.01 / 100,
``gan_critic_weight`` = 1, and the clip value becomes ``critic_clip_value / N``: the same updates under Adam.
SiD-LSG (Zhou et al. 2024, "Long and Short Guidance"; mingyuanzhou/SiD-LSG training/sid_training_loop.py): CFG
scales for the real score (the teacher's guidance_scale), the fake score in the generator loss
(``fake_guidance``, kappa_2) and while it trains (``fake_train_guidance``, kappa_1); when either is not 1, 10% of
the conditions are replaced by the null condition while the fake score trains (the reference drops the prompt
before generating; fastdiff drops it on the generated sample, as CFG training drops labels of data, so the
unconditional fake score learns the generator's marginal, the counterpart of the teacher's unconditional score).
With a guided real score (``teacher.guidance_scale`` != 1) sid defaults to SiD-LSG (``teacher_defaults``; sida keeps
SiDA's): kappa_1 = kappa_2 = kappa_4, alpha 1, t in [20, 980) of the table. Issue 27's CPU ladder (fmnist-cond-vpred
at CFG 2, one-step student from sigma 2.5, 100 updates at batch 8, FID@1k): SiD's own defaults (kappa_1 = kappa_2 =
1, alpha 1.2, t <= 0.8) 150.0 -> 144.5; SiD-LSG's 150.0 -> 70.2 (KID 0.0347; 73.7 in the ladder's own run), 68.5 at
t <= 0.8; sida (alpha 1 with an unguided fake score, t <= 0.8) 150.0 -> 68.1. So at this budget alpha 1.2 -> 1 is
what mattered, not the guided fake score: with a guided real score ``y_r - y_f`` is larger than on an unguided
teacher (the CFG term stays in it however well an unguided fake fits), and alpha > 1 rewards widening it. The guided
fake score is kept because it is the reference's (every SiD-LSG command and checkpoint), at ~1.3x the time per update.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch

from ..models.denoiser import Denoiser, expand
from .base import (Objective, default_fake_loss, drop_conditions, finite_mean, finite_samples, noised, only_finite,
                   per_sample_mean)
from .disback import Backtrack, Backtracking
from .gan import GANHead, sida_discriminator_loss, sida_generator_gan_loss
from .registry import register

# SiD-LSG's fake-score timesteps, torch.randint(20, 980): [0.02, 0.979] * 1000 inclusive.
FAKE_T_RANGE = (0.02, 0.979)
# sid_train.py: torch.optim.Adam (no weight decay), betas (0, 0.999) for the fake score and the generator
# (--g_beta1 0), no learning-rate warm-up, no gradient-norm clip (sid_training_loop.py only replaces non-finite
# gradient entries; SiDA clips the fake score by value, ``critic_clip_value``).
SID_OPTIMIZER = {"adam_betas": [0.0, 0.999], "weight_decay": 0.0, "lr_warmup_steps": 0, "grad_clip": 0.0}
# SiD-LSG: share of conditions dropped while the fake score trains when a fake-score CFG scale is not 1.
COND_DROPOUT = 0.1


def sid_loss(x: torch.Tensor, y_real: torch.Tensor, y_fake: torch.Tensor, alpha: float) -> torch.Tensor:
    """Per-sample SiD generator loss (mean over elements), normalised by mean|x - y_real| without gradient."""
    with torch.no_grad():
        norm = per_sample_mean((x - y_real).abs()).clamp(min=1e-5)
    diff = y_real - y_fake
    return per_sample_mean(diff * ((y_real - x) - alpha * diff)) / norm


class SiD(Backtracking, Objective):
    """Score identity distillation; with a ``gan_head`` it is SiDA.

    Args:
        teacher, fake: the frozen real score (its guidance_scale is the real-score CFG) and the fake score.
        alpha: weight of the ``||y_r - y_f||^2`` term (SiD: 1.2; SiDA: 1.0).
        min_t, max_t: positions on ``sigma_grid`` for the generator-loss noise levels (SiD: t <= 0.8).
        critic_updates: fake-score updates per generator update (SiD: 1).
        fake_guidance, fake_train_guidance: SiD-LSG's CFG scales for the fake score.
        fake_loss: "edm", "eps" or "teacher"; None = :func:`default_fake_loss` (edm on x0 teachers, eps on
            epsilon / v teachers).
        sigma_grid: "karras" or "teacher"; None = :func:`~fastdiff.objectives.base.default_sigma_grid`.
        gan_head: SiDA's head. gan_weight: its share of the generator loss once on (0.5).
        gan_generator_weight, gan_critic_weight: SiDA's GAN scales in fastdiff's per-element units (1e-4 = the
            reference's loss_scaling_G_gan 0.01 / loss_scaling_G 100; 1 = loss_scaling_D / loss_scaling).
        gan_start_images: the GAN term joins the generator loss once more images than this were seen (200k).
        generator_hold_images: the generator stays as it is until more images than this were seen, while the fake
            score (and head) train: SiDA's reference steps its generator only past 100k images (``g_optimizer.step()``
            if ``cur_nimg > 100 * 1000``, ``sida_training_loop.py``; sida's default); 0 = from the first update.
        critic_clip_value: clip fake-score (and head) gradients by this value in the reference's units while the
            GAN is on (1); 0 = no clip.
        backtrack, degradation_steps, backtrack_interval: DisBack's path (:mod:`.disback`; 0 = off).
    """

    gan_readout = "sida"  # SiDA's discriminator: the fake score's bottleneck channel mean, no head parameters

    def __init__(self, teacher: Denoiser, fake: Denoiser, alpha: float = 1.2, min_t: float = 0.0,
                 max_t: float = 0.8, critic_updates: int = 1, fake_guidance: float = 1.0,
                 fake_train_guidance: float = 1.0, fake_loss: str | None = None, gan_head: GANHead | None = None,
                 gan_weight: float = 0.5, gan_generator_weight: float = 1e-4, gan_critic_weight: float = 1.0,
                 gan_start_images: int = 200_000, critic_clip_value: float = 1.0, sigma_grid: str | None = None,
                 backtrack: int = 0, degradation_steps: int = 200, backtrack_interval: int = 200,
                 generator_hold_images: int = 0):
        super().__init__(teacher, fake, critic_updates, gan_head, sigma_grid)
        if generator_hold_images < 0:
            raise ValueError(f"objective.generator_hold_images must be 0 or more, got {generator_hold_images}")
        self.generator_hold_images = int(generator_hold_images)
        self.backtrack = Backtrack(fake, backtrack, degradation_steps, backtrack_interval)
        self.alpha, self.min_t, self.max_t = alpha, min_t, max_t
        self.fake_guidance, self.fake_train_guidance = fake_guidance, fake_train_guidance
        self.fake_loss = fake_loss or default_fake_loss(teacher)
        self.gan_weight, self.gan_start_images = gan_weight, gan_start_images
        self.gan_generator_weight, self.gan_critic_weight = gan_generator_weight, gan_critic_weight
        self.critic_clip_value = critic_clip_value

    @classmethod
    def teacher_defaults(cls, teacher) -> dict:
        """SiD-LSG's settings where SiD-LSG is the reference: text teachers, and any guided real score (CFG scale
        kappa_4 = ``teacher.guidance_scale`` != 1). SiD-LSG trains with alpha 1 and generator noise levels at
        ``t ~ randint(20, 980)`` of the teacher's table (``--alpha 1``, ``--tmin 20``, ``--tmax 980``), and every
        run_sid.sh command and released checkpoint (``cfg4.54.54.5``, ``cfg1.51.51.5``) guides the fake score as the
        real one, kappa_1 = kappa_2 = kappa_3 = kappa_4 (``--cfg_train_fake``, ``--cfg_eval_fake``,
        ``--cfg_eval_real``). See the module docstring for what SiD's own defaults did on a guided teacher (alpha 1.2
        was the part that mattered there)."""
        lsg = {"alpha": 1.0, "min_t": FAKE_T_RANGE[0], "max_t": FAKE_T_RANGE[1]}
        defaults = dict(lsg) if teacher.conditioning == "text" else {}
        scale = teacher.denoiser.guidance_scale  # 1 for guidance-distilled (embedded-guidance) Flux teachers
        if scale != 1:
            defaults.update(lsg, fake_guidance=float(scale), fake_train_guidance=float(scale))
        return defaults

    def train_defaults(self) -> dict:
        """SiD's optimizer (``SID_OPTIMIZER``)."""
        return dict(SID_OPTIMIZER)

    def teacher_train_defaults(self, teacher) -> dict:
        """SiD-LSG's learning rates on text teachers (every ``run_sid.sh`` command: ``--lr 0.000001 --glr 0.000001``;
        its fp32 runs' 50k-image EMA half-life is not a null key: set ``train.ema_halflife_kimg``). Plain ``sid`` only:
        SiDA and Uni-Instruct keep their own references' settings, which have no text teacher."""
        if teacher.conditioning != "text" or type(self) is not SiD or self.gan_head is not None:
            return {}
        return {"lr_generator": 1e-6, "lr_critic": 1e-6}

    def trains_generator(self) -> bool:
        """DisBack's stage 1 aside (``Backtracking``), False while at most ``generator_hold_images`` images were seen:
        the reference's ``cur_nimg > 100 * 1000`` before its generator step, ``images_seen`` being its cur_nimg."""
        held = self.generator_hold_images and self.images_seen <= self.generator_hold_images
        return super().trains_generator() and not held

    @property
    def held_steps(self) -> int:
        """Trainer steps s the hold covers (s x global batch <= generator_hold_images, i.e. s <= hold // batch); 0
        without a hold or before the trainer set ``images_per_step``."""
        if not (self.generator_hold_images and self.images_per_step):
            return 0
        return self.generator_hold_images // self.images_per_step + 1

    def generator_updates(self, steps: int) -> int:
        """Of the first ``steps`` trainer steps, those past DisBack's stage 1 and past the hold."""
        return min(super().generator_updates(steps), max(0, steps - self.held_steps))

    def gan_on(self) -> bool:
        """SiDA's loop: ``cur_nimg > 200 * 1000`` before the update (a host integer, no device sync)."""
        return self.gan_head is not None and self.images_seen > self.gan_start_images

    def generator_loss(self, x, cond=None, real=None):
        if not self.trains_generator():  # DisBack's stage 1 (the trainer skips it): no gradient for the generator
            return torch.zeros((), device=x.device, requires_grad=True), {}
        x = x.float()
        x_t, sigma = noised(x, self.teacher.schedule, self.min_t, self.max_t, self.sigma_grid)
        y_real = self.real_x0(x_t, sigma, cond).float()  # the teacher, or DisBack's node on the path
        # SiDA reads its logits off the fake score's own pass (one forward), unless CFG doubles that pass.
        share = self.gan_head is not None and self.fake_guidance == 1
        with self.gan_head.reading() if share else nullcontext():
            y_fake = self.fake(x_t, sigma, cond, guidance_scale=self.fake_guidance).float()
        logits = self.gan_head.logits() if share else None
        ok = finite_samples(x, y_real, y_fake)
        per_sample = sid_loss(*only_finite(ok, x, y_real, y_fake), self.alpha)
        loss = only_finite(ok, per_sample)[0].sum() / x.shape[0]
        logs = {"loss_sid": loss.detach(), "nonfinite_samples": (~ok).sum()}
        if self.gan_head is not None and (share or self.gan_on()):
            with torch.no_grad():
                norm = per_sample_mean((x - y_real).abs()).clamp(min=1e-5)
            if logits is None:
                logits = self.gan_head(x_t, sigma, cond)
            gan = sida_generator_gan_loss(logits, only_finite(ok, norm)[0].clamp(min=1e-5), ok)
            logs["loss_gan_g"] = gan.detach()
            if self.gan_on():
                loss = (1 - self.gan_weight) * loss + self.gan_weight * self.gan_generator_weight * gan
        return loss, logs

    def critic_loss(self, x, cond=None, real=None):
        guided = self.fake_guidance != 1 or self.fake_train_guidance != 1
        fake_cond = drop_conditions(self.fake, cond, COND_DROPOUT) if guided else cond
        if self.gan_head is None:
            loss = self.fake_denoising_loss(x, fake_cond, self.fake_loss, self.fake_train_guidance, FAKE_T_RANGE)
            return loss, {"loss_fake": loss.detach()}
        if real is None:
            raise ValueError("SiDA's GAN head needs real images (data.path)")
        return self.sida_critic_loss(x.detach().float(), cond, fake_cond, real)

    def sida_critic_loss(self, x, cond, fake_cond, real):
        """Fake-score loss plus SiDA's discriminator loss at the same sigma and noise for real and fake."""
        x_real, cond_real = real
        n = x[0].numel()
        sigma, weight = self.fake_noise_levels(x.shape[0], x.device, self.fake_loss, FAKE_T_RANGE)
        noise = torch.randn_like(x)
        s = expand(sigma, x)
        share = fake_cond is cond and self.fake_train_guidance == 1
        with self.gan_head.reading() if share else nullcontext():
            x0_hat = self.fake(x + s * noise, sigma, fake_cond, guidance_scale=self.fake_train_guidance)
        logits_fake = self.gan_head.logits() if share else self.gan_head(x + s * noise, sigma, cond)
        logits_real = self.gan_head(x_real.float() + s * noise, sigma, cond_real)
        loss = finite_mean(per_sample_mean((x0_hat - x) ** 2), weight)
        ok = finite_samples(x, x0_hat, logits_fake, logits_real)
        gan = sida_discriminator_loss(logits_real, logits_fake, weight, ok)
        # The reference's critic loss sums over elements; fastdiff's is that / n, so its clip value is too.
        self.critic_clip = self.critic_clip_value / n if self.critic_clip_value else None
        logs = {"loss_fake": loss.detach(), "loss_gan_d": gan.detach()}
        return loss + self.gan_critic_weight * gan / n, logs


register("sid", SiD)
# SiDA's own settings (sida_train.py: alpha 1, t <= 0.8, unguided EDM teachers) stay its defaults on guided teachers
# too: SiDA has no guided reference, and its head shares the fake score's pass only when that pass is unguided.
register("sida", SiD, defaults={"alpha": 1.0, "min_t": 0.0, "max_t": 0.8, "fake_guidance": 1.0,
                                "fake_train_guidance": 1.0, "generator_hold_images": 100_000}, needs_gan=True)
