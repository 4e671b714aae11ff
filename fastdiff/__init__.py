"""fastdiff: distill a frozen diffusers teacher into a one- or few-step student."""
# CUDA 12's runtime for xformers must be in the process before anything imports xformers (diffusers' attention
# modules do): a hook loads it then (fastdiff.cudart). The rest of the package (torch, diffusers) is imported on
# first use, so `fastdiff --help` answers at once.
from .cudart import install_hook as _install_hook
from .errors import FastdiffError
from .lazy import lazy_names as _lazy_names

_install_hook()
del _install_hook

__version__ = "0.1.0"

# The public names, each imported from its module on first use. fastdiff's own diffusers models are among them:
# diffusers finds them by name when it loads a pipeline folder whose model_index.json says ["fastdiff", "<class>"].
_LAZY = {"Denoiser": ".models.denoiser", "Generator": ".models.generator", "FlowSchedule": ".models.schedule",
         "VPSchedule": ".models.schedule", "Teacher": ".models.teacher", "load_teacher": ".models.teacher",
         "GuidanceEmbeddedUNet": ".models.guidance_unet", "MLPDenoiser": ".models.mlp",
         "GaussianMixtureModel": ".models.analytic", "FlowMapModel": ".models.flow_map_model"}


__getattr__, __dir__ = _lazy_names(__name__, __package__, _LAZY, globals())

__all__ = ["Denoiser", "FastdiffError", "Generator", "FlowSchedule", "VPSchedule", "Teacher", "load_teacher"]
