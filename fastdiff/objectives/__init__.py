"""Distillation objectives, one file each, looked up by name."""
from .base import Objective
from .dmd2 import DMD2

OBJECTIVES = {"dmd2": DMD2}

__all__ = ["OBJECTIVES", "Objective", "DMD2"]
