"""PG-SB, "proper guidance" SwiftBrush (SNOOPI, Nguyen et al. 2024, arXiv 2412.02687, its PG-SB section).

SwiftBrush / VSD (``vsd``, :mod:`.dmd2`) guides the real score with one fixed CFG scale. SNOOPI found that scale
must be retuned per backbone (training diverges or collapses otherwise) and instead draws it at random every step,
``kappa ~ U(kappa_min, kappa_max)``, which widens the distribution the scores pull towards, for both "teachers": the
frozen real score and the LoRA fake score. With the VSD gradient of :mod:`.dmd2` (ProlificDreamer Eq. 9 in x0 terms,
``w = a_t s_t``):

    kappa ~ U(lo, hi), one draw per sample, shared by the two scores
    real score:  x0_real = x0_uncond + kappa (x0_cond - x0_uncond)
    fake score:  x0_fake = x0f_uncond + kappa (x0f_cond - x0f_uncond)        (guide_fake; else the fake's x0f_cond)
    generator:   grad_x = a_t s_t (x0_fake - x0_real),   loss = 0.5 ||x - sg(x - grad_x)||^2 / numel

Settings from the paper (arXiv 2412.02687 v1): Table 6 (PG-SB's hyperparameters) gives (kappa_min, kappa_max) =
(0.5, 4) for SD 1.5 and SD 2.1 (the default here; PixArt-alpha: (0.5, 3)), a rank-64 LoRA fake score trained at lr
1e-3, the student at lr 1e-6; Table 2 (ablation, SD 2.1, FID on 2k COCO prompts) random CFG on the real score only
10.81, on the LoRA fake score only 9.51, on both 9.03, neither (SwiftBrush's fixed scale) 10.72, hence ``guide_fake``
on by default. kappa is diffusers' scale (Table 5 lists SD 1.5 "cfg=3" at DMD2's 8.78), so kappa < 1 leans towards the
unconditional prediction. Everything else (timesteps in [0.02, 0.98] T, 1:1 updates) is ``vsd``'s.

fastdiff's own choices, the paper being silent (no public training code): the guided fake score needs an unconditional
prediction of the generator's distribution, so while it trains 10% of its conditions are replaced by the null one
(SiD-LSG's rate, :mod:`.sid`) whenever it is guided; its LoRA scaling is 1 (alpha = rank; the paper's "LoRA scaling
128" at rank 64 is 2); SwiftBrush v2's CLIP loss (Table 6's "Clip weight", "tau") is not included.
A fixed draw ``kappa`` gives exactly ``vsd``'s gradient with the real and fake scores at CFG ``kappa``
(tests/test_snoopi.py). For an unconditional call (no class or text condition) CFG is the identity (cond = uncond), so
PG-SB is VSD there.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from ..models.denoiser import Denoiser
from .base import drop_conditions
from .dmd2 import DMD2
from .gan import GANHead
from .registry import register
from .sid import COND_DROPOUT

DEFAULT_RANGE = [0.5, 4.0]  # SNOOPI's Table 6, SD 1.5 and SD 2.1


@contextmanager
def _guidance(teacher: Denoiser, scales: torch.Tensor):
    """The teacher's CFG scale set to per-sample ``scales`` for one call (Denoiser takes a (B,) tensor)."""
    fixed = teacher.guidance_scale
    teacher.guidance_scale = scales
    try:
        yield
    finally:
        teacher.guidance_scale = fixed


class ProperGuidanceSwiftBrush(DMD2):
    """VSD whose real score's CFG scale is drawn from ``real_guidance_range`` per sample at every generator step.

    Args (besides :class:`~fastdiff.objectives.dmd2.DMD2`'s, with VSD's defaults):
        real_guidance_range: [lo, hi], 0 <= lo <= hi, the uniform range of the CFG scale drawn per sample
            (``teacher.guidance_scale`` must then stay 1: the draws replace it); None (only when built directly,
            the registered default fills a config's null) keeps the teacher's fixed scale and an unguided fake
            score (plain VSD). Not
            ``objective.guidance_range``: that key gives consistency students an LCM guidance embedding, which a
            PG-SB student does not read.
        guide_fake: the fake score guided by the same draw as the real score (SNOOPI's "both teachers"), and then
            trained with 10% null conditions; False guides the real score alone.
    """

    def __init__(self, teacher: Denoiser, fake: Denoiser, min_t: float = 0.02, max_t: float = 0.98,
                 critic_updates: int = 1, gan_head: GANHead | None = None,
                 gan_generator_weight: float = 3e-3, gan_critic_weight: float = 1e-2, weighting: str = "vsd",
                 fake_loss: str = "teacher", sigma_grid: str | None = None,
                 real_guidance_range: list[float] | None = None, guide_fake: bool = True):
        super().__init__(teacher, fake, min_t, max_t, critic_updates, gan_head, gan_generator_weight,
                         gan_critic_weight, weighting, fake_loss, sigma_grid)
        self.real_guidance_range = None
        if real_guidance_range is not None:
            lo, hi = (float(v) for v in real_guidance_range) if len(real_guidance_range) == 2 else (0.0, -1.0)
            if not 0.0 <= lo <= hi:
                raise ValueError(f"objective.real_guidance_range must be [lo, hi] with 0 <= lo <= hi, "
                                 f"got {list(real_guidance_range)}")
            self.real_guidance_range = (lo, hi)
            fixed = teacher.guidance_scale
            if torch.is_tensor(fixed) or fixed != 1.0:  # it would be silently replaced by the draws
                raise ValueError(f"teacher.guidance_scale {fixed} is not used by pg-sb, which draws the scale from "
                                 f"objective.real_guidance_range {list(real_guidance_range)}: leave it at 1 (objective vsd "
                                 "takes one fixed scale, as does a range [w, w])")
        self.guide_fake = bool(guide_fake)
        self.last_real_guidance: torch.Tensor | None = None  # the scales of the latest step (for logs and tests)

    def train_defaults(self) -> dict:
        """vsd's (Adam without weight decay, the LoRA fake score at 1e-3, as SNOOPI's Table 6) with the student at
        SNOOPI's 1e-6."""
        return {**super().train_defaults(), "lr_generator": 1e-6}

    def draw_real_guidance(self, n: int, device) -> torch.Tensor:
        """n scales ~ U(lo, hi) from the global RNG (seeded by the trainer, checkpointed with it)."""
        lo, hi = self.real_guidance_range
        return lo + (hi - lo) * torch.rand(n, device=device)

    def dm_gradient(self, x, x_t, sigma, cond):
        if self.real_guidance_range is None or not cond:  # no range, or nothing to guide (CFG is the identity)
            self.last_real_guidance = None
            return super().dm_gradient(x, x_t, sigma, cond)
        kappa = self.last_real_guidance = self.draw_real_guidance(x.shape[0], x.device)
        with _guidance(self.teacher, kappa):
            return super().dm_gradient(x, x_t, sigma, cond, kappa if self.guide_fake else 1.0)

    def fake_denoising_loss(self, x, cond=None, *args, **kwargs):
        """The fake score's denoising loss; a guided fake score also learns its null-condition prediction."""
        if self.guide_fake and self.real_guidance_range is not None:
            cond = drop_conditions(self.fake, cond, COND_DROPOUT)
        return super().fake_denoising_loss(x, cond, *args, **kwargs)

    def generator_loss(self, x, cond=None, real=None):
        loss, logs = super().generator_loss(x, cond, real)
        if self.last_real_guidance is not None:
            logs["real_guidance_mean"] = self.last_real_guidance.mean()
        return loss, logs


register("pg-sb", ProperGuidanceSwiftBrush, defaults={"real_guidance_range": DEFAULT_RANGE},
         fake_lora_rank=64)  # SNOOPI's Table 6
