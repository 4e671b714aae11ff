"""One noise language for every network: ``D(x, sigma, cond) -> x0`` with ``x = x0 + sigma * eps``.

The adapter hides the teacher's parametrisation (VP or flow schedule; epsilon, v, sample or velocity
prediction), its forward signature (UNet2DModel, UNet2DConditionModel, DiT and flow transformers) and
classifier-free guidance. Objectives are written once in sigma / x0 terms on top of it.
"""
from __future__ import annotations

import inspect

import torch
from torch import nn

from .schedule import FlowSchedule, VPSchedule

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")

# Condition keys fastdiff understands, mapped onto the model forward argument of the same name.
COND_KEYS = ("class_labels", "encoder_hidden_states", "pooled_projections", "added_cond_kwargs", "encoder_attention_mask",
             "timestep_cond")


def expand(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


class Denoiser(nn.Module):
    """Wraps a diffusers model and its schedule as an x0-predictor in the VE sigma scale.

    Args:
        model: any diffusers denoising network (its ``forward`` takes a sample and a timestep).
        schedule: :class:`VPSchedule` or :class:`FlowSchedule` built from the teacher's scheduler.
        prediction_type: what the network outputs: ``epsilon``, ``v_prediction``, ``sample`` or ``flow``.
        null_class: class label used as the unconditional input for classifier-free guidance.
        guidance_scale: default CFG scale (1 = no guidance, one forward pass); a call may pass a (B,) tensor.
    """

    def __init__(self, model: nn.Module, schedule: VPSchedule | FlowSchedule, prediction_type: str,
                 null_class: int | None = None, guidance_scale: float = 1.0):
        super().__init__()
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")
        if prediction_type == "flow" and not isinstance(schedule, FlowSchedule):
            raise ValueError("flow prediction needs a FlowSchedule")
        self.model = model
        self.schedule = schedule
        self.prediction_type = prediction_type
        self.null_class = null_class
        self.guidance_scale = guidance_scale
        params = inspect.signature(model.forward).parameters
        self._sample_arg = "sample" if "sample" in params else "hidden_states"
        self._accepted = {k for k in COND_KEYS if k in params}
        # Flux transformers take packed latents and position ids: models/flux.py packs around the call.
        self._packed = "txt_ids" in params and "img_ids" in params
        self._in_channels = getattr(getattr(model, "config", None), "in_channels", None)
        # Sana transformers take the timestep times config.timestep_scale: SanaPipeline multiplies before the call.
        cfg = getattr(model, "config", None)  # (a compiled or LoRA-wrapped model keeps its config's class name)
        scale = getattr(cfg, "timestep_scale", 1.0) if "Sana" in str(getattr(cfg, "_class_name", "")) else 1.0
        self._timestep_scale = None if scale == 1.0 else float(scale)

    # --- the interface objectives use -------------------------------------------------------
    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict | None = None,
                guidance_scale: float | None = None) -> torch.Tensor:
        """x0 estimate for ``x = x0 + sigma * eps`` (VE scale); sigma has shape (B,) or is a scalar."""
        sigma = self._per_sample(sigma, x)
        return self.denoise_native(x * expand(self.schedule.alpha(sigma), x), sigma, cond, guidance_scale)

    def denoise_native(self, x_native: torch.Tensor, sigma: torch.Tensor, cond: dict | None = None,
                       guidance_scale: float | None = None) -> torch.Tensor:
        """x0 estimate from the teacher's native input (``a x0 + s eps`` for VP, ``(1-t) x0 + t eps`` for flow).

        Needed where sigma is infinite (flow at t=1) and to match diffusers pipelines bit for bit.
        """
        sigma = self._per_sample(sigma, x_native)
        g = self.guidance_scale if guidance_scale is None else guidance_scale
        if not torch.is_tensor(g) and g == 1.0:
            return self._x0(x_native, sigma, cond)
        uncond = self.null_cond(cond, x_native.shape[0])
        both = self._x0(torch.cat([x_native, x_native]), torch.cat([sigma, sigma]), _cat_cond(uncond, cond))
        x0_uncond, x0_cond = both.chunk(2)
        if torch.is_tensor(g):  # one scale per sample (LCM-style guidance ranges)
            g = expand(g, x0_cond)
        # CFG is linear in the prediction, so guiding x0 equals guiding eps / v at fixed (x, sigma).
        return x0_uncond + g * (x0_cond - x0_uncond)

    def loss_weight(self, sigma: torch.Tensor) -> torch.Tensor:
        """Weight turning ``|x0_hat - x0|^2`` into the teacher's own training loss on its native target."""
        s = sigma.double()
        if self.prediction_type == "epsilon":
            w = 1 / s**2
        elif self.prediction_type == "v_prediction":
            w = (1 + s**2) / s**2
        elif self.prediction_type == "flow":
            w = ((1 + s) / s) ** 2
        else:
            w = torch.ones_like(s)
        return w.float()

    def null_cond(self, cond: dict | None, batch: int) -> dict | None:
        """The unconditional input for CFG: the null class, or the ``uncond_*`` entries of ``cond``."""
        if not cond:
            raise ValueError("classifier-free guidance needs a condition (class labels or text embeddings)")
        out = {}
        for key, value in cond.items():
            if key.startswith("uncond_"):
                continue
            if key == "class_labels":
                if self.null_class is None:
                    raise ValueError("guidance with class labels needs the teacher's null class (teacher.null_class)")
                out[key] = torch.full_like(value, self.null_class)
            elif "uncond_" + key in cond:
                out[key] = cond["uncond_" + key]
            else:
                raise ValueError(f"guidance needs an unconditional value for {key!r} (cond['uncond_{key}'])")
        return out

    # --- internals -------------------------------------------------------------------------
    @staticmethod
    def _per_sample(sigma, like: torch.Tensor) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=like.device)
        return sigma.expand(like.shape[0]) if sigma.ndim == 0 else sigma

    def raw(self, x_native: torch.Tensor, sigma: torch.Tensor, cond: dict | None = None) -> torch.Tensor:
        """The network's own output for native input at noise level sigma."""
        kwargs = {k: v for k, v in (cond or {}).items() if k in self._accepted}
        unknown = [k for k in (cond or {}) if k not in self._accepted and not k.startswith("uncond_")]
        if unknown:
            raise ValueError(f"{type(self.model).__name__} takes no condition {unknown}")
        dtype = getattr(self.model, "dtype", torch.float32)  # ModelMixin: parameters' dtype, else buffers'
        kwargs = _cast(kwargs, dtype)  # text embeddings of a bf16 text encoder meet a float32 student
        timestep = self.schedule.model_timestep(sigma)
        if self._timestep_scale is not None:
            timestep = timestep * self._timestep_scale
        if self._packed:
            from .flux import flux_forward

            out = flux_forward(self.model, x_native.to(dtype), timestep, kwargs)
        else:
            out = self.model(**{self._sample_arg: x_native.to(dtype)}, timestep=timestep, **kwargs, return_dict=False)[0]
        if self._in_channels and out.shape[1] == 2 * self._in_channels:
            out = out[:, : self._in_channels]  # learned-variance models (DiT) also output a variance
        return out.float()

    def _x0(self, x_native: torch.Tensor, sigma: torch.Tensor, cond: dict | None) -> torch.Tensor:
        out = self.raw(x_native, sigma, cond)
        x = x_native.float()
        a = expand(self.schedule.alpha(sigma), x)
        s = expand(self.schedule.noise_scale(sigma), x)
        # Same arithmetic as diffusers' schedulers, so exported pipelines match to the last bits.
        if self.prediction_type == "epsilon":
            return (x - s * out) / a
        if self.prediction_type == "v_prediction":
            return a * x - s * out
        if self.prediction_type == "flow":
            return x - s * out
        return out


def _cast(cond: dict, dtype: torch.dtype) -> dict:
    """Floating tensors of a condition (nested dicts too) in the network's dtype; labels and masks unchanged."""
    return {k: _cast(v, dtype) if isinstance(v, dict) else
            (v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in cond.items()}


def _cat_cond(a: dict | None, b: dict | None) -> dict | None:
    if not b:
        return None
    out = {}
    for key, value in b.items():
        if key.startswith("uncond_"):
            continue
        if isinstance(value, dict):  # None entries (inputs a model leaves unused) stay None
            out[key] = {k: None if v is None else torch.cat([a[key][k], v]) for k, v in value.items()}
        else:
            out[key] = torch.cat([a[key], value])
    return out
