"""Distillation objectives, one file each, looked up by name.

``vsd`` and ``sida`` are variants (other defaults) of ``dmd2`` and ``sid``, not copies. ``cd`` and ``scm``
(consistency distillation, discrete and continuous-time) train on noised data and need no fake score.
"""
from __future__ import annotations

import inspect

from .base import Objective
from .cd import ConsistencyDistillation
from .dmd2 import DMD2
from .scm import ContinuousConsistency
from .sid import SiD
from .sim import SIM

# name -> (class, defaults that make the variant)
OBJECTIVES = {
    "dmd2": (DMD2, {}),
    "vsd": (DMD2, {"weighting": "vsd", "critic_updates": 1}),
    "sid": (SiD, {}),
    "sida": (SiD, {"alpha": 1.0}),
    "sim": (SIM, {}),
    "cd": (ConsistencyDistillation, {}),
    "scm": (ContinuousConsistency, {}),
}
NEEDS_GAN = {"sida"}


def objective_class(name: str) -> type[Objective]:
    return OBJECTIVES[name][0]


def build(name: str, teacher, fake, gan_head=None, student=None, **options) -> Objective:
    """The objective ``name`` with ``options`` (None = default); unknown options are a ValueError naming them.

    Consistency objectives train the student Denoiser themselves and get it as ``student``.
    """
    cls, defaults = OBJECTIVES[name]
    accepted = inspect.signature(cls.__init__).parameters
    given = {k: v for k, v in options.items() if v is not None}
    wrong = sorted(k for k in given if k not in accepted)
    if wrong:
        raise ValueError(f"objective.{wrong[0]} does not apply to {name}")
    extra = {"student": student} if "student" in accepted else {}
    return cls(teacher, fake, gan_head=gan_head, **extra, **{**defaults, **given})


__all__ = ["OBJECTIVES", "NEEDS_GAN", "Objective", "DMD2", "SiD", "SIM", "ConsistencyDistillation",
           "ContinuousConsistency", "build", "objective_class"]
