"""Distillation objectives, one file each, looked up by name in :mod:`.registry`.

Every module of this package is imported here, so an objective file's ``register(...)`` call is all it takes to
appear in ``objective.name``. ``vsd`` and ``sida`` are variants (other defaults) of ``dmd2`` and ``sid``, not copies.
``cd`` and ``scm`` (consistency distillation, discrete and continuous-time) train on noised data and need no fake score.
"""
from __future__ import annotations

import importlib
import inspect
import pkgutil

from .base import Objective
from .registry import OBJECTIVES, Entry, option_types, register

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

from .cd import ConsistencyDistillation  # noqa: E402 - names users import from here
from .dmd2 import DMD2  # noqa: E402
from .scm import ContinuousConsistency  # noqa: E402
from .sid import SiD  # noqa: E402
from .sim import SIM  # noqa: E402


def entry(name: str) -> Entry:
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; choose one of: {', '.join(sorted(OBJECTIVES))}")
    return OBJECTIVES[name]


def objective_class(name: str) -> type[Objective]:
    return entry(name).cls


def teacher_options(name: str, teacher, options: dict) -> dict:
    """``options`` with the entries left None filled from the objective's ``teacher_defaults`` for this loaded
    teacher (e.g. DMD2's fake-score update ratio for SDXL)."""
    filled, e = dict(options), entry(name)
    for key, value in e.cls.teacher_defaults(teacher).items():
        if filled.get(key) is None and key not in e.defaults:  # a variant's own defaults come first
            filled[key] = value
    return filled


def build(name: str, teacher, fake, gan_head=None, student=None, **options) -> Objective:
    """The objective ``name`` (a teacher Denoiser, the fake score or None) with ``options`` over the variant's
    defaults (None = default); an option it does not take is a ValueError naming it.

    Consistency objectives train the student Denoiser themselves and get it as ``student``; ``sigma_max`` (the
    level they sample from) goes only to objectives that take it."""
    e = entry(name)
    accepted = inspect.signature(e.cls.__init__).parameters
    given = {k: v for k, v in options.items() if v is not None and (k != "sigma_max" or k in accepted)}
    wrong = sorted(k for k in given if k not in e.options() and k != "sigma_max")
    if wrong:
        raise ValueError(f"objective.{wrong[0]} does not apply to {name}")
    extra = {"student": student} if "student" in accepted else {}
    return e.cls(teacher, fake, gan_head=gan_head, **extra, **e.arguments(given))


__all__ = ["OBJECTIVES", "Entry", "Objective", "DMD2", "SiD", "SIM", "ConsistencyDistillation",
           "ContinuousConsistency", "build", "entry", "objective_class", "option_types", "register", "teacher_options"]
