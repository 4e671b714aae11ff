"""Attention backend for every attention module of a diffusers model: PyTorch SDPA or xformers, set through
diffusers' own API.

diffusers 0.42 has two kinds of attention module. Newer models (Flux, Wan, Qwen-Image, ...) are built on
``AttentionModuleMixin`` and their processors call diffusers' attention dispatcher, which reads a backend name
from the processor: ``model.set_attention_backend("native" | "xformers")`` sets it. Classic ``Attention``
modules (UNets, SD3, PixArt, DiT, Sana) carry a processor class per backend:
``enable_xformers_memory_efficient_attention`` picks the xformers class, ``set_attn_processor`` installs the SDPA
one (``UNet2DModel`` and DiT have no ``set_attn_processor``: there each module's ``set_processor``).
diffusers' xformers switch maps every processor it does not know to the plain ``XFormersAttnProcessor``, which
would turn Sana's linear attention into softmax attention and drop q/k norms; so fastdiff uses it only when every
module of the model has an exact xformers twin, and otherwise swaps per module. Processors without a twin (Sana's,
IP-adapter's, custom ones) stay as they are and are counted, never reported as the backend.

xformers wheels are built against CUDA 12's runtime; on a CUDA 13 torch their kernels load once
``libcudart.so.12`` is found. ``import fastdiff`` has it loaded before xformers' first import (``fastdiff.cudart``),
this module again before its own xformers import, then checks that a kernel really runs and agrees with SDPA before
``auto`` picks it.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import sys
import warnings
from typing import Iterable, NamedTuple

import torch

from .. import cudart
from ..cudart import preload_cudart12
from ..errors import FastdiffError

BACKENDS = ("auto", "sdpa", "xformers")
DISPATCHER_NAMES = {"sdpa": "native", "xformers": "xformers"}  # fastdiff's backend -> diffusers' dispatcher name


@functools.cache
def xformers_status() -> tuple[bool, str]:
    """(usable, why): xformers imports, its memory-efficient kernel runs on CUDA, and agrees with SDPA."""
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    if importlib.util.find_spec("xformers") is None:
        return False, "xformers is not installed (pip install 'fastdiff[xformers]')"
    late = "xformers" in sys.modules and not cudart.PRELOADED_BEFORE_XFORMERS  # its kernels tried to load without it
    lib = preload_cudart12()
    try:
        import xformers.ops as xops

        q, k, v = (torch.randn(2, 64, 4, 32, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        out = xops.memory_efficient_attention(q, k, v)
        ref = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                               v.transpose(1, 2)).transpose(1, 2)
        err = (out.float() - ref.float()).abs().max().item()
    except Exception as exc:  # noqa: BLE001 - any failure to load or run means "not usable", with the reason
        hint = (" (no libcudart.so.12 found: pip install 'nvidia-cuda-runtime-cu12==12.8.*')" if not lib else
                " (xformers was imported before libcudart.so.12 was loaded: import fastdiff before "
                "diffusers' models)" if late else "")
        return False, f"xformers kernels do not run: {str(exc).splitlines()[0][:160]}{hint}"
    if err > 2e-2:
        return False, f"xformers disagrees with SDPA by {err:.3g}"
    return True, f"xformers kernels run (max difference to SDPA {err:.1e})"


def dispatcher_has_xformers() -> bool:
    """Whether diffusers' attention dispatcher imported xformers (its ``xops``; None when that import failed)."""
    from diffusers.models import attention_dispatch

    return bool(getattr(attention_dispatch, "_CAN_USE_XFORMERS_ATTN", False)) and attention_dispatch.xops is not None


# Per kind of classic attention: its SDPA processor, its xformers processor, and the other processors of that kind
# (the kinds diffusers' enable_xformers_memory_efficient_attention maps: self/cross, SD3's joint, added-KV).
_FAMILIES = (("AttnProcessor2_0", "XFormersAttnProcessor", "AttnProcessor"),
             ("JointAttnProcessor2_0", "XFormersJointAttnProcessor"),
             ("AttnAddedKVProcessor2_0", "XFormersAttnAddedKVProcessor", "AttnAddedKVProcessor"))


@functools.cache
def _twins() -> dict:
    """Processor class -> (its kind's SDPA processor, its kind's xformers processor)."""
    from diffusers.models import attention_processor as ap

    twins = {}
    for sdpa, xformers, *others in _FAMILIES:
        if hasattr(ap, sdpa) and hasattr(ap, xformers):
            pair = (getattr(ap, sdpa), getattr(ap, xformers))
            twins.update({getattr(ap, name): pair for name in (sdpa, xformers, *others) if hasattr(ap, name)})
    return twins


def attention_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) for every attention module of ``model``: classic ``Attention`` and ``AttentionModuleMixin``."""
    from diffusers.models.attention import AttentionModuleMixin
    from diffusers.models.attention_processor import Attention

    return [(n, m) for n, m in model.named_modules() if isinstance(m, (Attention, AttentionModuleMixin))]


def uses_dispatcher(module: torch.nn.Module) -> bool:
    """The module's processor calls diffusers' attention dispatcher (it carries an ``_attention_backend``)."""
    return hasattr(getattr(module, "processor", None), "_attention_backend")


def classic_targets(module: torch.nn.Module) -> tuple[type, type | None] | None:
    """(SDPA processor, xformers processor or None) a classic module can take; None when its processor has no twin.

    The xformers self/cross processor applies no q/k norm (AttnProcessor2_0 does): a module with one has no
    xformers twin."""
    pair = _twins().get(type(getattr(module, "processor", None)))
    if pair is None:
        return None
    sdpa, xformers = pair
    plain = sdpa.__name__ == "AttnProcessor2_0"
    if plain and (getattr(module, "norm_q", None) is not None or getattr(module, "norm_k", None) is not None):
        xformers = None
    return sdpa, xformers


def running_backend(module: torch.nn.Module) -> str | None:
    """The backend a module runs now: "sdpa", "xformers", or None (a processor fastdiff does not set)."""
    proc = getattr(module, "processor", None)
    if uses_dispatcher(module):
        from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

        try:
            name = AttentionBackendName(proc._attention_backend or _AttentionBackendRegistry._active_backend)
        except ValueError:  # a device-specific name outside the enum (NPU's "_fused_npu")
            return None
        return {AttentionBackendName.NATIVE: "sdpa", AttentionBackendName.XFORMERS: "xformers"}.get(name)
    pair = _twins().get(type(proc))
    if pair is None:
        return None
    return "sdpa" if type(proc) is pair[0] else "xformers" if type(proc) is pair[1] else None


class AttentionSetting(NamedTuple):
    """What ``set_attention`` did to one model: modules now on SDPA, on xformers, left on their own processor, and
    the diffusers calls that set them."""
    sdpa: int
    xformers: int
    untouched: int
    via: tuple[str, ...]

    @property
    def backend(self) -> str:
        """The backend of the modules set ("sdpa", "xformers", "xformers+sdpa"), "none" when none was set."""
        return "+".join(b for b in ("xformers", "sdpa") if getattr(self, b)) or "none"


def describe(settings: Iterable[AttentionSetting]) -> str:
    """One line for a run's log and the speed table: the backends used, with the modules left out."""
    settings = list(settings)
    sdpa, xformers, kept = (sum(getattr(s, f) for s in settings) for f in ("sdpa", "xformers", "untouched"))
    label = AttentionSetting(sdpa, xformers, kept, ()).backend
    if sdpa and xformers:
        label += f" ({xformers} xformers, {sdpa} sdpa)"
    return label + (f", {kept} modules on their own processors" if kept else "")


@contextlib.contextmanager
def _dispatcher_default_kept():
    """``ModelMixin.set_attention_backend`` also makes its backend the process-wide default; processors set
    explicitly do not read that default, so it is put back and other models keep theirs."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry
    from diffusers.utils import logging as dlogging

    active, verbosity = _AttentionBackendRegistry._active_backend, dlogging.get_verbosity()
    dlogging.set_verbosity_error()  # its "experimental feature" warning, once per model and call
    try:
        yield
    finally:
        _AttentionBackendRegistry.set_active_backend(active)
        dlogging.set_verbosity(verbosity)


def resolve_backend(backend: str, compiled: bool = False) -> str:
    """``auto`` -> sdpa for a compiled network, else xformers where its kernels run, else sdpa; ``xformers`` not
    usable is an error with the reason.

    Why SDPA under ``torch.compile``: inductor fuses around SDPA but must call xformers' kernel as an opaque op.
    Measured on an H200 (eval/results/speed-nvidia-h200.md, batch 128, CIFAR-shaped UNet): compiled steps with SDPA
    ran 1.10x (dmd2) and 1.08x (sid) faster than with xformers; eager, the order was mixed (0.92x, 1.05x)."""
    if backend not in BACKENDS:
        raise FastdiffError(f"train.attention must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "sdpa" or (backend == "auto" and compiled):
        return "sdpa"
    usable, why = xformers_status()
    if not usable and backend == "xformers":
        raise FastdiffError(f"train.attention=xformers: {why}; use auto or sdpa")
    return "xformers" if usable else "sdpa"


def _names_match(model: torch.nn.Module, settable: dict) -> bool:
    """``model.set_attn_processor`` exists and names the modules as ``named_modules`` does (a wrapper that
    forwards attributes to an inner model would not)."""
    if not (hasattr(model, "set_attn_processor") and hasattr(model, "attn_processors")):
        return False
    return set(settable) <= {key[:-len(".processor")] for key in model.attn_processors}


def set_attention(model: torch.nn.Module, backend: str, compiled: bool = False) -> AttentionSetting:
    """Put every attention module of ``model`` on ``backend`` (auto | sdpa | xformers) through diffusers' API;
    ``compiled``: the model will run under ``torch.compile`` (``auto`` then means SDPA, see ``resolve_backend``).

    A module that cannot take xformers (a classic one with q/k norms, a dispatcher module when diffusers' dispatcher
    has no xformers) goes to SDPA instead; one without a twin keeps its processor. Both are counted and warned
    about; the returned counts are read back from the modules after the calls."""
    want = resolve_backend(backend, compiled)
    modules = attention_modules(model)
    dispatcher = [m for _, m in modules if uses_dispatcher(m)]
    classic = {n: (m, classic_targets(m)) for n, m in modules if not uses_dispatcher(m)}
    via = []
    if dispatcher:
        name = DISPATCHER_NAMES["xformers" if want == "xformers" and dispatcher_has_xformers() else "sdpa"]
        if hasattr(model, "set_attention_backend"):
            with _dispatcher_default_kept():
                model.set_attention_backend(name)
            via.append("set_attention_backend")
        else:  # not a ModelMixin: each module's own setter (AttentionModuleMixin), else the processor's field
            from diffusers.models.attention_dispatch import AttentionBackendName

            for m in dispatcher:
                if hasattr(m, "set_attention_backend"):
                    m.set_attention_backend(name)
                else:
                    m.processor._attention_backend = AttentionBackendName(name)
            via.append("AttentionModuleMixin.set_attention_backend")
    settable = {n: (m, t[1] if want == "xformers" and t[1] else t[0]) for n, (m, t) in classic.items() if t}
    if settable:
        all_exact = len(settable) == len(classic) and all(t is classic[n][1][1] for n, (_, t) in settable.items())
        # diffusers' switch also reaches dispatcher modules and maps unknown processors: only on pure classic models
        if (want == "xformers" and all_exact and not dispatcher
                and hasattr(model, "enable_xformers_memory_efficient_attention")):
            model.enable_xformers_memory_efficient_attention()  # maps exactly the twins fastdiff would pick
            via.append("enable_xformers_memory_efficient_attention")
        elif _names_match(model, settable):
            # every module with a processor, named "<module>.processor"; the others get their own back
            model.set_attn_processor({key: settable[key[:-len(".processor")]][1]()
                                      if key[:-len(".processor")] in settable else proc
                                      for key, proc in model.attn_processors.items()})
            via.append("set_attn_processor")
        else:  # UNet2DModel, DiT: no set_attn_processor
            for m, target in settable.values():
                m.set_processor(target())
            via.append("Attention.set_processor")
    counts = {"sdpa": 0, "xformers": 0, None: 0}
    for name, m in modules:
        now = running_backend(m) if uses_dispatcher(m) or name in settable else None
        if (uses_dispatcher(m) or name in settable) and now is None:
            raise FastdiffError(f"attention module {name} of {type(model).__name__} ended on "
                                f"{type(m.processor).__name__}, not on SDPA or xformers")
        counts[now] += 1
    setting = AttentionSetting(counts["sdpa"], counts["xformers"], counts[None], tuple(via))
    if setting.untouched or (want == "xformers" and setting.sdpa):
        warnings.warn(f"{type(model).__name__}: {describe([setting])} (asked for {want})", stacklevel=2)
    return setting
