"""PG-SB, "proper guidance" SwiftBrush (SNOOPI, Nguyen et al. 2024, arXiv 2412.02687, its PG-SB section).

SwiftBrush / VSD (``vsd``, :mod:`.dmd2`) guides the real score with one fixed CFG scale. SNOOPI found that scale
must be retuned per backbone (training diverges or collapses otherwise) and instead draws it at random every step,
``kappa ~ U(kappa_min, kappa_max)``, which widens the distribution the real score pulls towards. With the VSD
gradient of :mod:`.dmd2` (ProlificDreamer Eq. 9 in x0 terms, ``w = a_t s_t``):

    real score:  x0_real = x0_uncond + kappa (x0_cond - x0_uncond),   kappa ~ U(lo, hi), one draw per sample
    generator:   grad_x = a_t s_t (x0_fake - x0_real),   loss = 0.5 ||x - sg(x - grad_x)||^2 / numel

Everything else (timesteps in [0.02, 0.98] T, the rank-16 LoRA fake score at 1:1 updates and lr 1e-3) is ``vsd``'s.
A fixed draw ``kappa`` gives exactly ``vsd``'s gradient with ``teacher.guidance_scale = kappa`` (tests/test_snoopi.py).
For an unconditional call (no class or text condition) CFG is the identity (cond = uncond), so PG-SB is VSD there.

The default range [2, 8]: the paper's exact kappa_min / kappa_max could not be read from the sources reachable when
this was written (its abstract and secondary summaries state only ``U(kappa_min, kappa_max)``); [2, 8] brackets the
fixed scales SwiftBrush-style runs use on SD 1.5 / 2.1 (4.5 - 7.5). Check it against the paper before quoting it.
The abstract says the scales of "both teacher models" vary; here only the real score's does (the fake score keeps
CFG 1 as in SwiftBrush's ``train_swiftbrush.py``), since fastdiff's fake score is not trained with a null condition.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from ..models.denoiser import Denoiser
from .dmd2 import DMD2
from .gan import GANHead
from .registry import register

DEFAULT_RANGE = [2.0, 8.0]  # unverified against the paper: see the module docstring


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
        real_guidance_range: [lo, hi], 1 <= lo <= hi, the uniform range of the real score's CFG scale; None keeps
            the teacher's fixed ``teacher.guidance_scale`` (plain VSD). Not ``objective.guidance_range``: that key
            gives consistency students an LCM guidance embedding, which a PG-SB student does not read.
    """

    def __init__(self, teacher: Denoiser, fake: Denoiser, min_t: float = 0.02, max_t: float = 0.98,
                 critic_updates: int = 1, gan_head: GANHead | None = None,
                 gan_generator_weight: float = 3e-3, gan_critic_weight: float = 1e-2, weighting: str = "vsd",
                 fake_loss: str = "teacher", sigma_grid: str | None = None,
                 real_guidance_range: list[float] | None = None):
        super().__init__(teacher, fake, min_t, max_t, critic_updates, gan_head, gan_generator_weight,
                         gan_critic_weight, weighting, fake_loss, sigma_grid)
        self.real_guidance_range = None
        if real_guidance_range is not None:
            lo, hi = (float(v) for v in real_guidance_range) if len(real_guidance_range) == 2 else (0.0, -1.0)
            if not 1.0 <= lo <= hi:
                raise ValueError(f"objective.real_guidance_range must be [lo, hi] with 1 <= lo <= hi, "
                                 f"got {list(real_guidance_range)}")
            self.real_guidance_range = (lo, hi)
        self.last_real_guidance: torch.Tensor | None = None  # the scales of the latest step (for logs and tests)

    def draw_real_guidance(self, n: int, device) -> torch.Tensor:
        """n scales ~ U(lo, hi) from the global RNG (seeded by the trainer, checkpointed with it)."""
        lo, hi = self.real_guidance_range
        return lo + (hi - lo) * torch.rand(n, device=device)

    def dm_gradient(self, x, x_t, sigma, cond):
        if self.real_guidance_range is None or not cond:  # no range, or nothing to guide (CFG is the identity)
            self.last_real_guidance = None
            return super().dm_gradient(x, x_t, sigma, cond)
        self.last_real_guidance = self.draw_real_guidance(x.shape[0], x.device)
        with _guidance(self.teacher, self.last_real_guidance):
            return super().dm_gradient(x, x_t, sigma, cond)

    def generator_loss(self, x, cond=None, real=None):
        loss, logs = super().generator_loss(x, cond, real)
        if self.last_real_guidance is not None:
            logs["real_guidance_mean"] = self.last_real_guidance.mean()
        return loss, logs


register("pg-sb", ProperGuidanceSwiftBrush, defaults={"real_guidance_range": DEFAULT_RANGE},
         fake_lora_rank=16)  # SwiftBrush's LoRA fake score, as vsd
