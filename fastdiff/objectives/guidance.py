"""Teacher guidance for consistency objectives: one fixed CFG scale, or a scale per example from a range
whose embedding the student reads (LCM, Luo et al. 2023, Sec. 4.2: the student learns the guided ODE of
every scale in the range)."""
from __future__ import annotations

import torch

from ..models.denoiser import Denoiser
from ..models.guidance import guided_condition


class TeacherGuidance:
    """Draw per-example guidance scales and the student's matching condition.

    Args:
        teacher: the teacher Denoiser; a range needs a conditional one (CFG needs its null condition).
        student: the student Denoiser; with a range its model must take ``timestep_cond``.
        guidance_range: (lo, hi) CFG scales drawn uniformly per example, or None for the teacher's fixed scale.
    """

    def __init__(self, teacher: Denoiser, student: Denoiser, guidance_range=None):
        self.range = None if guidance_range is None else (float(guidance_range[0]), float(guidance_range[1]))
        self.embed_dim = getattr(getattr(student.model, "config", None), "time_cond_proj_dim", None)
        if self.range is not None:
            if not 1.0 <= self.range[0] <= self.range[1]:
                raise ValueError(f"objective.guidance_range must be [lo, hi] with 1 <= lo <= hi, got {list(guidance_range)}")
            if teacher.null_class is None and "encoder_hidden_states" not in teacher._accepted:
                raise ValueError("objective.guidance_range needs a conditional teacher (class labels or text)")
            if not self.embed_dim:
                raise ValueError("objective.guidance_range needs a student with a guidance embedding (time_cond_proj_dim)")

    def draw(self, n: int, cond: dict | None, device) -> tuple[torch.Tensor | None, dict | None]:
        """(scales for the teacher, or None = its own fixed scale; the student's condition)."""
        if self.range is None:
            return None, cond
        lo, hi = self.range
        w = lo + (hi - lo) * torch.rand(n, device=device)
        return w, guided_condition(cond, w - 1.0, self.embed_dim, device)
