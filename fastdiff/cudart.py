"""CUDA 12's runtime for xformers, loaded just before anything imports xformers.

xformers wheels are built against CUDA 12's runtime; on a CUDA 13 torch their kernels load once ``libcudart.so.12``
is in the process. xformers loads its kernels when first imported, and diffusers imports it with its attention
modules, so the runtime has to come first. ``import fastdiff`` installs an import hook: when xformers' module is
first executed (imported by anyone; a mere ``find_spec`` lookup, as diffusers' availability check makes, loads
nothing), torch is imported and then the runtime loaded from the ``nvidia-cuda-runtime-cu12`` package (the
``xformers`` extra installs it): torch's own CUDA runtime first, as when fastdiff imported torch eagerly. The hook
costs nothing until then, so ``fastdiff --help`` needs neither torch nor diffusers.
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


class _RuntimeFirst(importlib.abc.Loader):
    """xformers' own loader, run after torch and the runtime are in the process. The work happens here, when the
    module executes (under xformers' module lock only): a finder runs under Python's global import lock, where
    importing torch could deadlock against another thread's import."""

    def __init__(self, loader, hook: "_BeforeXformers"):
        self.loader, self.hook = loader, hook

    def create_module(self, spec):
        create = getattr(self.loader, "create_module", None)
        return None if create is None else create(spec)  # None: Python's default module

    def exec_module(self, module):
        global PRELOADED_BEFORE_XFORMERS
        if not self.hook.done:  # under xformers' module lock: one thread at a time
            importlib.import_module("torch")  # its own CUDA runtime first
            PRELOADED_BEFORE_XFORMERS = preload_cudart12() is not None
            self.hook.done = True  # only now: a first import that failed leaves the next one the same order
        self.loader.exec_module(module)

    def __getattr__(self, name):  # the rest of the loader's interface (resource readers, get_code, ...)
        return getattr(self.loader, name)


class _BeforeXformers(importlib.abc.MetaPathFinder):
    """Finds xformers as the finders after it do, with its loader wrapped in ``_RuntimeFirst``; nothing else, and
    nothing once the runtime is loaded. It stays in ``sys.meta_path`` (removing itself during a lookup would make
    that lookup skip the next finder)."""

    done = False

    def find_spec(self, name, path=None, target=None):
        if name != "xformers" or self.done:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                if spec.loader is not None and not isinstance(spec.loader, _RuntimeFirst):
                    spec.loader = _RuntimeFirst(spec.loader, self)
                return spec
        return None


def install_hook() -> None:
    """Run the preload before xformers executes, where xformers is installed and not imported yet."""
    if ("xformers" not in sys.modules and not any(isinstance(f, _BeforeXformers) for f in sys.meta_path)
            and importlib.util.find_spec("xformers") is not None):
        sys.meta_path.insert(0, _BeforeXformers())
