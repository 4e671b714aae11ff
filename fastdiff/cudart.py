"""CUDA 12's runtime for xformers, loaded just before anything imports xformers.

xformers wheels are built against CUDA 12's runtime; on a CUDA 13 torch their kernels load once ``libcudart.so.12``
is in the process. xformers loads its kernels when first imported, and diffusers imports it with its attention
modules, so the runtime has to come first. ``import fastdiff`` installs an import hook that, the first time
xformers is imported (by anyone), imports torch and then loads the runtime from the ``nvidia-cuda-runtime-cu12``
package (the ``xformers`` extra installs it): torch's own CUDA runtime first, as when fastdiff imported torch
eagerly. The hook costs nothing until then, so ``fastdiff --help`` needs neither torch nor diffusers.
``models.attention`` loads the runtime again before its own xformers import and says which came first when
xformers does not work.
"""
from __future__ import annotations

import ctypes
import glob
import importlib
import importlib.abc
import importlib.util
import os
import sys

PRELOADED_BEFORE_XFORMERS = False  # set by the hook: the runtime was in the process when xformers was imported


def preload_cudart12() -> str | None:
    """Load libcudart.so.12 from the nvidia-cuda-runtime-cu12 wheel into the process (global symbols)."""
    spec = importlib.util.find_spec("nvidia")
    roots = list(spec.submodule_search_locations) if spec and spec.submodule_search_locations else []
    for root in roots:
        for lib in sorted(glob.glob(os.path.join(root, "cuda_runtime", "lib", "libcudart.so.12*"))):
            try:
                ctypes.CDLL(lib, mode=ctypes.RTLD_GLOBAL)
                return lib
            except OSError:
                continue
    return None


class _BeforeXformers(importlib.abc.MetaPathFinder):
    """On the first import of xformers: torch, then the runtime; then it steps aside (finds nothing itself)."""

    def find_spec(self, name, path=None, target=None):
        if name == "xformers":
            global PRELOADED_BEFORE_XFORMERS
            sys.meta_path.remove(self)  # once
            importlib.import_module("torch")  # its own CUDA runtime first
            PRELOADED_BEFORE_XFORMERS = preload_cudart12() is not None
        return None


def install_hook() -> None:
    """Run the preload before xformers' first import, where xformers is installed and not imported yet."""
    if ("xformers" not in sys.modules and not any(isinstance(f, _BeforeXformers) for f in sys.meta_path)
            and importlib.util.find_spec("xformers") is not None):
        sys.meta_path.insert(0, _BeforeXformers())
