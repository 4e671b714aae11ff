"""Negative prompts for one-step text-to-image students: NASA (Negative-Away Steer Attention).

SNOOPI (Nguyen et al. 2024, "SNOOPI: Supercharged One-step Diffusion Distillation with Proper Guidance", arXiv
2412.02687, the NASA section; ICCV 2025 as "Supercharged One-step Text-to-Image Diffusion Models with Negative
Prompts"). CFG's negative prompt needs a second network pass and, at one step, blends the negative concept into the
image instead of removing it. NASA steers in feature space instead: in every cross-attention layer, the attention
features of the negative prompt are subtracted from the positive prompt's, before the layer's output projection,

    Z = softmax(Q K+^T / sqrt(d)) V+  -  alpha softmax(Q K-^T / sqrt(d)) V-,    out = W_out Z + b_out,

with Q from the image tokens, K+- = W_k c+-, V+- = W_v c+- the layer's own projections of the positive / negative
prompt embeddings c+- (no new weights) and alpha = ``nasa_scale``. Self-attention layers are untouched. One network
pass per step: the negative prompt only adds its key / value projections and one more attention per cross-attention
layer. The paper's code is not public (its project page lists it as coming soon): this is written from the
equation above. At alpha = 0 a layer's output is bit for bit diffusers' ``AttnProcessor2_0``'s (the positive branch
runs the same operations in the same order, and ``Z - 0 * Z-`` is ``Z``).

``FastdiffNASAPipeline`` is diffusers' ``StableDiffusionPipeline`` plus two call arguments, ``negative_prompt`` and
``nasa_scale``; it loads any SD-style student folder fastdiff exports (``FastdiffNASAPipeline.from_pretrained(folder)``
with fastdiff installed, or ``DiffusionPipeline.from_pretrained(folder, custom_pipeline=<this file>)`` without), or
wraps a loaded pipeline with ``FastdiffNASAPipeline.from_pipe(pipe)``. This file imports only torch and diffusers.
"""
from __future__ import annotations

import contextlib
import inspect

import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline
from diffusers.models.attention_processor import Attention, AttnProcessor2_0


class NASAAttnProcessor:
    """A cross-attention processor that subtracts ``scale`` x the negative prompt's attention features.

    ``negative`` holds the negative prompt's embeddings, (B-, tokens, dim): B- is 1 (one negative for the whole batch)
    or divides the batch (one per image; a batch doubled for CFG repeats them over both halves)."""

    def __init__(self, negative: torch.Tensor, scale: float):
        self.negative = negative
        self.scale = float(scale)

    def _negative_for(self, batch: int, like: torch.Tensor) -> torch.Tensor:
        neg = self.negative.to(device=like.device, dtype=like.dtype)
        if batch % neg.shape[0]:
            raise ValueError(f"NASA: {neg.shape[0]} negative prompt embeddings for a batch of {batch}")
        return neg.repeat(batch // neg.shape[0], 1, 1)

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args, **kwargs):
        if encoder_hidden_states is None:  # a self-attention call: nothing to steer away from
            return AttnProcessor2_0()(attn, hidden_states, None, attention_mask, temb)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        image_shape = hidden_states.shape if hidden_states.ndim == 4 else None
        if image_shape is not None:  # (B, C, H, W) feature maps -> (B, HW, C) tokens
            hidden_states = hidden_states.view(*image_shape[:2], -1).transpose(1, 2)
        batch = encoder_hidden_states.shape[0]
        if attention_mask is not None:  # the positive prompt's mask only: the negative attends to all its tokens
            attention_mask = attn.prepare_attention_mask(attention_mask, encoder_hidden_states.shape[1], batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        negative = self._negative_for(batch, encoder_hidden_states)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
            negative = attn.norm_encoder_hidden_states(negative)
        key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads

        def heads(t: torch.Tensor) -> torch.Tensor:  # (B, N, heads x d) -> (B, heads, N, d)
            return t.view(batch, -1, attn.heads, head_dim).transpose(1, 2)

        def norm_k(k: torch.Tensor) -> torch.Tensor:
            return attn.norm_k(k) if attn.norm_k is not None else k

        query = heads(query)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        key, value = norm_k(heads(key)), heads(value)
        z = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False)
        if self.scale != 0:  # Z+ - alpha Z-, in the attention features (before the output projection)
            key_neg, value_neg = norm_k(heads(attn.to_k(negative))), heads(attn.to_v(negative))
            z = z - self.scale * F.scaled_dot_product_attention(query, key_neg, value_neg, dropout_p=0.0,
                                                                is_causal=False)
        z = z.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](z))  # projection, dropout
        if image_shape is not None:
            out = out.transpose(-1, -2).reshape(image_shape)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def cross_attention_modules(model: torch.nn.Module) -> list[Attention]:
    """The classic ``Attention`` modules of ``model`` that attend to the prompt (a UNet's ``attn2``)."""
    return [m for m in model.modules() if isinstance(m, Attention) and m.is_cross_attention]


@contextlib.contextmanager
def steer_away(model: torch.nn.Module, negative: torch.Tensor, scale: float):
    """NASA on every cross-attention module of ``model`` inside the block; their own processors back after it."""
    modules = cross_attention_modules(model)
    if not modules:
        raise ValueError(f"NASA: {type(model).__name__} has no cross-attention modules to steer")
    kept = [m.processor for m in modules]
    try:
        for m in modules:
            m.set_processor(NASAAttnProcessor(negative, scale))
        yield
    finally:
        for m, processor in zip(modules, kept):
            m.set_processor(processor)


class FastdiffNASAPipeline(StableDiffusionPipeline):
    """``StableDiffusionPipeline`` whose call also takes ``negative_prompt`` and ``nasa_scale`` (NASA's alpha)."""

    @torch.no_grad()
    def __call__(self, prompt: str | list[str] | None = None, *, negative_prompt: str | list[str] | None = None,
                 nasa_scale: float = 0.5, **kwargs):
        """As ``StableDiffusionPipeline.__call__`` (other arguments by keyword); with ``negative_prompt`` (one string,
        or one per prompt) the negative prompt is applied by NASA with weight ``nasa_scale``, in one network pass per
        step. 0.5 is a middle value of the 0 - 1 range the paper shows (its Fig. 5); the paper's per-backbone choices
        (Table 8, PG-SB students) are 0.04 on SD 1.5, 0.30 on SD 2.1, 0.80 on PixArt-alpha: raise it to remove
        more, lower it if images degrade. NASA replaces CFG's negative pass, so it needs ``guidance_scale`` <= 1 (a one-step
        student's call; a guidance-embedded student's own scale is fine)."""
        if negative_prompt is None or nasa_scale == 0:
            return super().__call__(prompt, **kwargs)
        guidance = kwargs.get("guidance_scale", SD_GUIDANCE_DEFAULT)
        if guidance > 1 and self.unet.config.time_cond_proj_dim is None:
            raise ValueError(f"NASA replaces CFG's negative pass: call with guidance_scale <= 1, got {guidance}")
        if kwargs.get("negative_prompt_embeds") is not None:
            raise ValueError("pass negative_prompt (NASA encodes it), not negative_prompt_embeds")
        if (isinstance(negative_prompt, list) and isinstance(prompt, list)
                and len(negative_prompt) not in (1, len(prompt))):
            raise ValueError(f"{len(negative_prompt)} negative prompts for {len(prompt)} prompts")
        per_prompt = isinstance(negative_prompt, list) and len(negative_prompt) > 1
        # One negative per prompt is laid out as the prompts' embeddings are (each repeated num_images_per_prompt
        # times); a single negative is encoded once and shared by every image.
        repeats = (kwargs.get("num_images_per_prompt") or 1) if per_prompt else 1
        negative, _ = self.encode_prompt(negative_prompt, self._execution_device, repeats, False,
                                         clip_skip=kwargs.get("clip_skip"))
        with steer_away(self.unet, negative, nasa_scale):
            return super().__call__(prompt, **kwargs)


SD_GUIDANCE_DEFAULT = inspect.signature(StableDiffusionPipeline.__call__).parameters["guidance_scale"].default
