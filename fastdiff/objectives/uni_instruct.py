"""Uni-Instruct: one-step distillation by the diffusion expansion of an f-divergence (Wang et al., NeurIPS 2025,
"Uni-Instruct: One-step Diffusion Model through Unified Diffusion Divergence Instruction"; reference code
a-little-hoof/Uni_Instruct, fsim_training/fsim_loss.py and fsim_training_loop.py, built on SiDA).

The expansion (the paper's Theorem 3.1): with ``r_t = p_real,t / p_fake,t`` and ``g(r) = f''(r) r^2``,
``D_f(p_real,0 || p_fake,0) = integral over t of w(t) E_fake,t[ g(r_t) |s_fake - s_real|^2 ]``. Per noise level,
in x0 terms (``s = (y - x_t) / sigma^2``), fastdiff minimises ``D = E_{x_t ~ fake}[ g(r) d ]``, ``d = mean(delta^2)``,
``delta = y_f - y_r`` (fake and teacher x0 estimates). Its generator gradient, derived here (the paper's Theorem 3.2
states the same split into a Diff-Instruct part and a SIM part; the reference code leaves out terms, see below):
1. ``dD = E[grad_x psi . dx_t] + E_p[g'(r) d_theta r d] + E_p[g(r) d'(delta) . d_theta y_f]`` (psi = g(r) d frozen in
   theta; the second and third terms differentiate the generator's own density in r and in the fake score).
2. ``d_theta r = -r d_theta log p``, so the second term is the pathwise gradient of ``-E[sg(r g'(r) d)]``; and
   ``grad_x log r = s_real - s_fake = -delta / sigma^2`` (no gradient of the discriminator is needed).
3. The third term, as in SIM (fastdiff/objectives/sim.py), goes through the score-projection identity
   ``E_p[u . s_p] = E_{x0, eps}[u(x_t) . (x0 - x_t) / sigma^2]``, differentiated in theta.
Collecting the terms, half of dD / dx is the gradient of three surrogates (each divided by ``mean|x - y_r|`` without
gradient, as SiD, SIM and DMD normalise):
- SiD/SIM part: ``g(r) * sid_loss(alpha=0.5)`` (SIM with d = |.|^2 is twice SiD's loss at alpha = 0.5);
- Fisher part: ``-1/2 r g'(r) mean(delta^2)``, through both networks;
- Diff-Instruct/DMD part: ``N / sigma^2 * (1/2 r^2 g''(r) d - r g'(r) mean(delta (x - y_f)))`` times DMD's
  ``mean(x * sg(delta))``, N elements per sample (``grad_x log r`` is a full-dimensional gradient).
Checked against autograd of D itself on Gaussians with exact ratios (tests/test_fdistill.py). At reverse KL (g = 1) the
last two vanish and Uni-Instruct is SiD's loss.

The reference trains on the first part alone (forward KL: ``density_ratio * SiD(alpha=1)``), and so does fastdiff by
default (``expansion="reference"``); ``expansion="exact"`` adds the other two, which diverged with a learned
discriminator on the GMM bench (:data:`EXPANSIONS`). Where fastdiff differs on purpose: the reference takes
``density_ratio = -L / (1 - L)`` of its scaled GAN *loss* L (BCE times N over mean|x - y_r|, large, so the "ratio" is
about 1); fastdiff reads ``r = exp(logit)`` off the discriminator (its optimum), clamped and normalised per level
exactly as f-distill (:class:`~fastdiff.objectives.fdistill.DensityRatio`), and the weights are divided by the batch
mean of g. The rest follows the reference: SiDA's fake score, discriminator on the fake score's encoder, critic
loss, clipping and optimizer (:class:`~fastdiff.objectives.sid.SiD`); the generator runs plain SiD (alpha = 1, the
reference's ``(y_r - y_f) (y_f - y)``) until ``gan_start_images`` (200k), then the expanded-divergence loss plus
SiDA's GAN term at full weight (``loss_scaling_G_gan`` 0.01 / ``loss_scaling_G`` 100 = 1e-4 in fastdiff's units). As in
SiDA, the generator is held still for the first 100k images (``g_optimizer.step()`` only when ``cur_nimg > 100 * 1000``,
``fsim_training_loop.py``; ``generator_hold_images``) while the fake score and discriminator train.
"""
from __future__ import annotations

import torch
from torch.func import grad, vmap

from ..errors import FastdiffError
from ..models.denoiser import Denoiser, expand
from .base import finite_samples, noised, only_finite, per_sample_mean
from .fdistill import DIVERGENCES, DensityRatio, check_divergence, level_position
from .gan import GANHead, per_sample_logits, sida_generator_gan_loss
from .registry import register
from .sid import SiD, sid_loss


# "exact": the three parts of the derived gradient (exact when r and the scores are). "reference": g(r) * SiD alone,
# as the reference trains. With a learned discriminator the Diff-Instruct part's weight (N / sigma^2 times score errors
# that do not vanish at small sigma) dominates: on `fastdiff bench gmm` js diverged with it (226 x floor) and reached
# 1.56 x floor without it (eval/results/bench-gmm-cpu/README.md).
EXPANSIONS = ("reference", "exact")


def expansion_weights(divergence: str, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(g, r g', r^2 g'')`` at r for ``g = f'' r^2`` of ``divergence``, derivatives by autograd of the table."""
    g = DIVERGENCES[divergence]
    flat = r.detach().reshape(-1)
    g1, g2 = vmap(grad(g))(flat).reshape(r.shape), vmap(grad(grad(g)))(flat).reshape(r.shape)
    return g(r), r * g1, r * r * g2


def di_loss(x: torch.Tensor, y_real: torch.Tensor, y_fake: torch.Tensor, weight: torch.Tensor,
            norm: torch.Tensor) -> torch.Tensor:
    """Diff-Instruct / DMD part per sample: its gradient in x is ``weight (y_f - y_r) / norm`` over the elements,
    DMD2's gradient at weight 1."""
    return per_sample_mean(x * (expand(weight, x) * (y_fake - y_real)).detach()) / norm


def expanded_loss(x: torch.Tensor, y_real: torch.Tensor, y_fake: torch.Tensor, sigma: torch.Tensor, g: torch.Tensor,
                  rg1: torch.Tensor, r2g2: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """Per-sample surrogate whose gradient is half that of ``E[g(r) mean(delta^2)] / mean|x - y_r|`` (alpha = 0.5;
    see the module docstring). ``g``, ``rg1``, ``r2g2``: :func:`expansion_weights` per sample, without gradient."""
    with torch.no_grad():
        norm = per_sample_mean((x - y_real).abs()).clamp(min=1e-5)
        delta = y_fake - y_real
        di_weight = (0.5 * r2g2 * per_sample_mean(delta ** 2) - rg1 * per_sample_mean(delta * (x - y_fake)))
        di_weight = di_weight * x[0].numel() / sigma.to(x.dtype) ** 2
    fisher = -0.5 * rg1 * per_sample_mean((y_fake - y_real) ** 2) / norm
    return g * sid_loss(x, y_real, y_fake, alpha) + fisher + di_loss(x, y_real, y_fake, di_weight, norm)


class UniInstruct(SiD):
    """SiDA's networks and losses with the generator minimising an expanded f-divergence (module docstring).

    Args:
        divergence: the f, one of :data:`~fastdiff.objectives.fdistill.DIVERGENCES` ("kl", forward KL: the reference's
            default and its ImageNet-64 record; "rkl" is SiD).
        alpha: SiD's alpha in the SiD/SIM part (the reference's loss is alpha = 1; the exact gradient is 0.5).
        expansion: "reference" (the g-weighted SiD part alone, the reference's forward-KL loss) or "exact" (all three
            parts; see :data:`EXPANSIONS` for why it is not the default).
        ratio_lower, ratio_upper, ratio_bins, ratio_ema_rate: the ratio's clamp and per-level normalisation (as
            fdistill).
        gan_head: required (SiDA's discriminator, which also gives r).
        gan_start_images: the divergence weighting and the GAN term start after this many images (200k).
        generator_hold_images: the generator steps only past this many images (100k, as SiDA).
        The rest: as :class:`~fastdiff.objectives.sid.SiD` (SiDA's defaults).
    """

    def __init__(self, teacher: Denoiser, fake: Denoiser, divergence: str = "kl", alpha: float = 1.0,
                 expansion: str = "reference", ratio_lower: float = 0.1, ratio_upper: float = 20.0,
                 ratio_bins: int = 10, ratio_ema_rate: float = 0.0,
                 min_t: float = 0.0, max_t: float = 0.8, critic_updates: int = 1, fake_loss: str | None = None,
                 gan_head: GANHead | None = None, gan_generator_weight: float = 1e-4, gan_critic_weight: float = 1.0,
                 gan_start_images: int = 200_000, critic_clip_value: float = 1.0, sigma_grid: str | None = None,
                 generator_hold_images: int = 100_000):
        if gan_head is None:
            raise FastdiffError("uni_instruct estimates the density ratio with a GAN head: it needs real images "
                                "(data.path)")
        check_divergence(divergence)
        if expansion not in EXPANSIONS:
            raise FastdiffError(f"objective.expansion must be one of {', '.join(EXPANSIONS)}, got {expansion!r}")
        super().__init__(teacher, fake, alpha=alpha, min_t=min_t, max_t=max_t, critic_updates=critic_updates,
                         fake_loss=fake_loss, gan_head=gan_head, gan_generator_weight=gan_generator_weight,
                         gan_critic_weight=gan_critic_weight, gan_start_images=gan_start_images,
                         critic_clip_value=critic_clip_value, sigma_grid=sigma_grid,
                         generator_hold_images=generator_hold_images)
        self.divergence, self.expansion = divergence, expansion
        self.ratio = DensityRatio(ratio_lower, ratio_upper, ratio_bins, ratio_ema_rate)

    @classmethod
    def teacher_defaults(cls, teacher) -> dict:
        """SiDA's settings (its constructor's defaults) on every teacher, as ``sida``: SiD's SiD-LSG rule for guided
        and text teachers is not its reference's, and its head shares the fake score's pass only when unguided."""
        return {}

    def state_modules(self):
        return {"density_ratio": self.ratio}

    def weights(self, logits: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:func:`expansion_weights` of the discriminator's ratio, each divided by the batch mean of g (finite)."""
        r = self.ratio(logits, level_position(self.teacher.schedule, sigma, self.min_t, self.max_t))
        g, rg1, r2g2 = expansion_weights(self.divergence, r)
        ok = torch.isfinite(g)
        mean = (torch.where(ok, g, 0).sum() / ok.sum().clamp(min=1)).clamp(min=1e-12)
        return g / mean, rg1 / mean, r2g2 / mean

    def generator_loss(self, x, cond=None, real=None):
        if not self.gan_on():  # the reference's first 200k images: SiD alone
            return super().generator_loss(x, cond, real)
        x = x.float()
        x_t, sigma = noised(x, self.teacher.schedule, self.min_t, self.max_t, self.sigma_grid)
        y_real = self.teacher(x_t, sigma, cond).float()
        # One fake-score pass gives y_fake and the logits (the reference's return_flag='encoder_decoder').
        with self.gan_head.reading():
            y_fake = self.fake(x_t, sigma, cond).float()
        logits = self.gan_head.logits()
        ok = finite_samples(x, y_real, y_fake, logits)
        with torch.no_grad():
            g, rg1, r2g2 = only_finite(ok, *self.weights(per_sample_logits(logits.detach()), sigma))
            norm = per_sample_mean((x - y_real).abs()).clamp(min=1e-5)
        kept = only_finite(ok, x, y_real, y_fake)
        if self.expansion == "exact":
            per_sample = expanded_loss(*kept, sigma, g, rg1, r2g2, self.alpha)
        else:
            per_sample = g * sid_loss(*kept, self.alpha)
        loss = only_finite(ok, per_sample)[0].sum() / x.shape[0]
        gan = sida_generator_gan_loss(logits, only_finite(ok, norm)[0].clamp(min=1e-5), ok)
        logs = {"loss_uni": loss.detach(), "loss_gan_g": gan.detach(), "nonfinite_samples": (~ok).sum(),
                "g_max": g.max()}
        return loss + self.gan_generator_weight * gan, logs


register("uni_instruct", UniInstruct, needs_gan=True)
