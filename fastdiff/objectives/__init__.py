"""Distillation objectives, one file each, looked up by name.

``vsd`` and ``sida`` are variants (other defaults) of ``dmd2`` and ``sid``, not copies.
"""
from __future__ import annotations

import inspect

from .base import Objective
from .dmd2 import DMD2
from .sid import SiD
from .sim import SIM

# name -> (class, defaults that make the variant)
OBJECTIVES = {
    "dmd2": (DMD2, {}),
    "vsd": (DMD2, {"weighting": "vsd", "critic_updates": 1}),
    "sid": (SiD, {}),
    "sida": (SiD, {"alpha": 1.0}),
    "sim": (SIM, {}),
}
NEEDS_GAN = {"sida"}


def build(name: str, teacher, fake, gan_head=None, **options) -> Objective:
    """The objective ``name`` with ``options`` (None = default); unknown options are a ValueError naming them."""
    cls, defaults = OBJECTIVES[name]
    accepted = inspect.signature(cls.__init__).parameters
    given = {k: v for k, v in options.items() if v is not None}
    wrong = sorted(k for k in given if k not in accepted)
    if wrong:
        raise ValueError(f"objective.{wrong[0]} does not apply to {name}")
    return cls(teacher, fake, gan_head=gan_head, **{**defaults, **given})


__all__ = ["OBJECTIVES", "NEEDS_GAN", "Objective", "DMD2", "SiD", "SIM", "build"]
