"""fastdiff: distill a frozen diffusers teacher into a one- or few-step student."""
# First: attention preloads CUDA 12's runtime for xformers, which must happen before anything imports xformers
# (diffusers' attention modules do, through config -> objectives -> models).
from .models import attention as _attention  # noqa: I001

del _attention  # imported for its side effect only

from .models.denoiser import Denoiser
from .errors import FastdiffError
from .models.generator import Generator
from .models.schedule import FlowSchedule, VPSchedule
from .models.teacher import Teacher, load_teacher

__version__ = "0.1.0"

# fastdiff's own diffusers models, found by name when diffusers loads a pipeline folder whose
# model_index.json says ["fastdiff", "<class>"]; imported on first use (they import diffusers).
_MODELS = {"GuidanceEmbeddedUNet": ".models.guidance", "MLPDenoiser": ".models.mlp", "GaussianMixtureModel": ".models.analytic",
           "FlowMapModel": ".models.flow_map"}


def __getattr__(name):
    if name in _MODELS:
        import importlib

        return getattr(importlib.import_module(_MODELS[name], __name__), name)
    raise AttributeError(f"module 'fastdiff' has no attribute {name!r}")

__all__ = ["Denoiser", "FastdiffError", "Generator", "FlowSchedule", "VPSchedule", "Teacher", "load_teacher"]
