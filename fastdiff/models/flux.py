"""Flux transformers (diffusers' ``FluxTransformer2DModel``, ``FluxPipeline``) behind the one Denoiser interface.

A Flux transformer takes its latents packed: 2x2 patches of the [B, C, H, W] latent become tokens of 4C channels,
[B, (H/2)(W/2), 4C], with rotary position ids per image token (``img_ids``: (0, row, col)) and per text token
(``txt_ids``: zeros); its timestep input is t in [0, 1] (it multiplies by 1000 itself). fastdiff's Denoiser sees
the unpacked latents like every other teacher: ``flux_forward`` packs, builds the ids, calls the transformer and
unpacks, with FluxPipeline's own operations (``_pack_latents``, ``_prepare_latent_image_ids``, ``timestep / 1000``)
so an exported FluxPipeline reproduces fastdiff's samples bit for bit.

Guidance-distilled teachers (``guidance_embeds=True``, FLUX.1-dev) take the guidance scale as an input instead of
classifier-free guidance: FluxPipeline feeds ``guidance_scale`` to that embedding. fastdiff feeds the teacher's
``teacher.guidance_scale`` there, to the teacher, the fake score and the student alike (the student is exported to
be called with the same value). The value rides on the network object (``set_embedded_guidance``): every trainable
copy of the teacher (deep copies, LoRA copies, EMA) carries it, and the Denoiser views built on a copy from the
network alone read it from there.

The flow schedule's shift is dynamic in FLUX.1 (``use_dynamic_shifting``: ``mu`` from the image's token count,
``calculate_shift``); fastdiff trains at one image size, so the shift is resolved once for that size
(``resolved_shift``): exponential time shifting with ``mu`` is the plain shift ``exp(mu)``, linear is ``mu``.
"""
from __future__ import annotations

import math

import torch

from .generator import Generator

GUIDANCE_ATTR = "fastdiff_embedded_guidance"
PIPELINE_GUIDANCE = 3.5  # FluxPipeline's default guidance_scale: what a network given no value is fed


def takes_packed_latents(model) -> bool:
    """A Flux-style transformer: its forward takes position ids for text and image tokens."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return "txt_ids" in params and "img_ids" in params


def pack(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/2)(W/2), 4C] (FluxPipeline._pack_latents)."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """[B, (H/2)(W/2), 4C] -> [B, C, H, W] (FluxPipeline._unpack_latents on latent sizes)."""
    b, _, channels = tokens.shape
    x = tokens.view(b, h // 2, w // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, channels // 4, h, w)


def image_ids(h: int, w: int, device, dtype) -> torch.Tensor:
    """(0, row, col) of each packed token of an h x w latent (FluxPipeline._prepare_latent_image_ids)."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(h // 2)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


def set_embedded_guidance(model, value: float) -> None:
    """The guidance value a guidance-distilled network is fed (see the module docstring)."""
    setattr(model, GUIDANCE_ATTR, float(value))


def embedded_guidance(model) -> float | None:
    """The guidance value for a ``guidance_embeds`` network (None for networks without that input)."""
    if not getattr(model.config, "guidance_embeds", False):
        return None
    return getattr(model, GUIDANCE_ATTR, PIPELINE_GUIDANCE)


def flux_forward(model, x: torch.Tensor, timestep: torch.Tensor, cond: dict) -> torch.Tensor:
    """The transformer's velocity for unpacked latents ``x`` [B, C, H, W] at fastdiff timesteps ``t * 1000``,
    returned unpacked; ``cond`` holds encoder_hidden_states and pooled_projections (FluxPipeline's call)."""
    b, _, h, w = x.shape
    if h % 2 or w % 2:
        raise ValueError(f"Flux latents need an even size, got {h}x{w}")
    text = cond["encoder_hidden_states"]
    g = embedded_guidance(model)
    guidance = None if g is None else torch.full((b,), g, device=x.device, dtype=torch.float32)
    out = model(hidden_states=pack(x), timestep=timestep.to(x.dtype) / 1000, guidance=guidance,
                txt_ids=torch.zeros(text.shape[1], 3, device=x.device, dtype=x.dtype),
                img_ids=image_ids(h, w, x.device, x.dtype), return_dict=False, **cond)[0]
    return unpack(out, h, w)


def sample_shape(model, vae) -> tuple[int, int, int]:
    """(C, H, W) of a Flux teacher's latents: the transformer's packed channels / 4, at the VAE's image size
    (``sample_size``: 1024 for FLUX.1, FluxPipeline's default) over its scale factor, rounded down to even as
    FluxPipeline's prepare_latents does."""
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    size = vae.config.sample_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return (model.config.in_channels // 4, 2 * (h // (factor * 2)), 2 * (w // (factor * 2)))


def resolved_shift(scheduler, shape: tuple[int, int, int]) -> float:
    """The flow shift FluxPipeline's scheduler applies at latents of ``shape``: ``shift`` of a fixed config; with
    dynamic shifting ``exp(mu)`` (exponential time shift, FLUX.1's) or ``mu`` (linear), ``mu`` by FluxPipeline's
    ``calculate_shift`` of the packed token count."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    config = scheduler.config
    if not config.get("use_dynamic_shifting", False):
        return float(config.get("shift", 1.0))
    _, h, w = shape
    mu = calculate_shift((h // 2) * (w // 2), config.get("base_image_seq_len", 256),
                         config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                         config.get("max_shift", 1.15))
    return math.exp(mu) if config.get("time_shift_type", "exponential") == "exponential" else float(mu)


def teacher_setup(model, scheduler, pipeline, guidance_scale: float):
    """(FlowSchedule, CFG scale) of a Flux teacher: the flow schedule at its resolved shift; for a
    guidance-distilled teacher ``guidance_scale`` goes to the guidance embedding (as FluxPipeline's does) and the
    CFG scale is 1 (one pass), else it is classifier-free guidance (FluxPipeline's ``true_cfg_scale``)."""
    from .schedule import FlowSchedule

    schedule = FlowSchedule(scheduler.config.num_train_timesteps,
                            resolved_shift(scheduler, sample_shape(model, pipeline.vae)))
    if getattr(model.config, "guidance_embeds", False):
        set_embedded_guidance(model, guidance_scale)
        return schedule, 1.0
    return schedule, guidance_scale


def default_image_size(pipeline) -> int:
    """FluxPipeline's image size when the call gives none (``default_sample_size * vae_scale_factor``)."""
    return pipeline.default_sample_size * pipeline.vae_scale_factor


class FluxGenerator(Generator):
    """fastdiff's K-step sampler for Flux students, with FluxPipeline's noise layout between steps.

    FlowMatchEulerDiscreteScheduler's stochastic step draws its fresh noise in the packed token shape; the same
    N(0, I) numbers laid out unpacked are ``unpack(noise.view(packed shape))``. So with one seeded generator the
    exported pipeline and this sampler re-noise with the very same values (any fixed permutation of i.i.d.
    noise is the same distribution, so training is unaffected by which layout is used)."""

    def next_input(self, x_native, x0, sigma, sigma_next, fresh_noise):
        if self.sampler != "lcm":
            return super().next_input(x_native, x0, sigma, sigma_next, fresh_noise)
        b, c, h, w = x_native.shape

        def packed_layout():
            return unpack(fresh_noise().reshape(b, (h // 2) * (w // 2), 4 * c), h, w)

        return super().next_input(x_native, x0, sigma, sigma_next, packed_layout)
