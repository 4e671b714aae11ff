"""Attention backend for every attention module of a diffusers model: PyTorch SDPA or xformers.

diffusers 0.42 reaches attention through ``Attention`` modules and their processors; ``UNet2DModel`` has no
``set_attn_processor``, and ``set_attention_backend`` only reaches processors that know backends. So fastdiff
walks the model's ``Attention`` modules itself and swaps each processor for its SDPA or xformers twin
(self/cross attention, SD3's joint attention, added-KV attention). Processors without a twin stay as they
are and are counted.

xformers wheels are built against CUDA 12's runtime; on a CUDA 13 torch its kernels load once
``libcudart.so.12`` is found. fastdiff preloads it from the ``nvidia-cuda-runtime-cu12`` package (the
``xformers`` extra installs it) before importing xformers, then checks that a kernel really runs and agrees
with SDPA before ``auto`` picks it.
"""
from __future__ import annotations

import ctypes
import functools
import glob
import importlib.util
import os
import warnings

import torch

from ..errors import FastdiffError

BACKENDS = ("auto", "sdpa", "xformers")


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


@functools.cache
def xformers_status() -> tuple[bool, str]:
    """(usable, why): xformers imports, its memory-efficient kernel runs on CUDA, and agrees with SDPA."""
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    if importlib.util.find_spec("xformers") is None:
        return False, "xformers is not installed (pip install 'fastdiff[xformers]')"
    lib = preload_cudart12()
    try:
        import xformers.ops as xops

        q, k, v = (torch.randn(2, 64, 4, 32, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        out = xops.memory_efficient_attention(q, k, v)
        ref = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                               v.transpose(1, 2)).transpose(1, 2)
        err = (out.float() - ref.float()).abs().max().item()
    except Exception as exc:  # noqa: BLE001 - any failure to load or run means "not usable", with the reason
        hint = "" if lib else " (no libcudart.so.12 found: pip install 'nvidia-cuda-runtime-cu12==12.8.*')"
        return False, f"xformers kernels do not run: {str(exc).splitlines()[0][:160]}{hint}"
    if err > 2e-2:
        return False, f"xformers disagrees with SDPA by {err:.3g}"
    return True, f"xformers kernels run (max difference to SDPA {err:.1e})"


# Per kind of attention: its SDPA processor, its xformers processor, and the other processors of that kind.
_FAMILIES = (("AttnProcessor2_0", "XFormersAttnProcessor", "AttnProcessor"),
             ("JointAttnProcessor2_0", "XFormersJointAttnProcessor"),
             ("AttnAddedKVProcessor2_0", "XFormersAttnAddedKVProcessor", "AttnAddedKVProcessor"))


def _twins() -> dict:
    """Processor class -> (its kind's SDPA processor, its kind's xformers processor)."""
    from diffusers.models import attention_processor as ap

    twins = {}
    for sdpa, xformers, *others in _FAMILIES:
        if hasattr(ap, sdpa) and hasattr(ap, xformers):
            pair = (getattr(ap, sdpa), getattr(ap, xformers))
            twins.update({getattr(ap, name): pair for name in (sdpa, xformers, *others) if hasattr(ap, name)})
    return twins


def set_attention(model: torch.nn.Module, backend: str) -> tuple[str, int, int]:
    """Put every attention module of ``model`` on ``backend``; returns (backend used, swapped, left as they were).

    ``auto``: xformers where its kernels run (see ``xformers_status``), otherwise SDPA. ``xformers`` asked for
    explicitly and not usable is an error naming the reason.
    """
    if backend not in BACKENDS:
        raise FastdiffError(f"train.attention must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend != "sdpa":
        usable, why = xformers_status()
        if not usable and backend == "xformers":
            raise FastdiffError(f"train.attention=xformers: {why}; use auto or sdpa")
        backend = "xformers" if usable else "sdpa"
    from diffusers.models.attention_processor import Attention

    twins = _twins()
    swapped = kept = 0
    for module in model.modules():
        if not isinstance(module, Attention):
            continue
        current = type(module.processor)
        pair = twins.get(current)
        if pair is None:
            kept += 1
            continue
        target = pair[1] if backend == "xformers" else pair[0]
        if current is not target:
            module.set_processor(target())
        swapped += 1
    if kept:
        warnings.warn(f"{kept} attention modules of {type(model).__name__} have processors without an "
                      f"SDPA/xformers twin; they keep their own", stacklevel=2)
    return backend, swapped, kept
