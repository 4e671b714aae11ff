"""Two-condition sampling (a class label and a text embedding) with one guidance scale per condition: the teacher's
nested multi-condition CFG in three passes per step, or a FADA student's single pass told both scales.

Nested guidance (InstructPix2Pix, Brooks et al. 2023, Eq. 3; the multi-CFG FADA distils), with the class guided
first (``guidance_order="class_first"``):
    eps = eps(0, 0) + s_c (eps(c, 0) - eps(0, 0)) + s_t (eps(c, t) - eps(c, 0))
and with ``"text_first"`` the roles swap: eps(0, 0) + s_t (eps(0, t) - eps(0, 0)) + s_c (eps(c, t) - eps(0, t)).
A student (``unet.config.time_cond_proj_dim`` set) reads ``timestep_cond = [emb(s_c - 1), emb(s_t - 1)]``
(:func:`scales_embedding`) and runs once per step.
"""
from __future__ import annotations

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput, ModelMixin, SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from .pipeline_fastdiff_class_conditional import guidance_embedding

GUIDANCE_ORDERS = ("class_first", "text_first")


def scales_embedding(class_scale, text_scale, dim: int) -> torch.Tensor:
    """(B, dim): the first half embeds ``class_scale - 1``, the second ``text_scale - 1`` (LCM's sinusoidal
    embedding of each, :func:`guidance_embedding`); the input of a two-scale student's ``timestep_cond``."""
    if dim % 2:
        raise ValueError(f"a two-scale embedding needs an even time_cond_proj_dim, got {dim}")
    half = dim // 2
    return torch.cat([guidance_embedding(class_scale - 1.0, half), guidance_embedding(text_scale - 1.0, half)], 1)


def nested_guidance(uncond: torch.Tensor, first: torch.Tensor, both: torch.Tensor, s_first, s_second) -> torch.Tensor:
    """``uncond + s_first (first - uncond) + s_second (both - first)``: ``first`` is the prediction with only the
    first-guided condition (the other at its null value), ``both`` the fully conditional one."""
    return uncond + s_first * (first - uncond) + s_second * (both - first)


class FastdiffMultiGuidancePipeline(DiffusionPipeline):
    model_cpu_offload_seq = "unet"

    # unet: a UNet2DConditionModel with class embeddings (the last one the null class) and cross-attention; a FADA
    # student also has time_cond_proj_dim (both scales embedded). guidance_order: which condition the teacher's
    # nested CFG guides first.
    def __init__(self, unet: ModelMixin, scheduler: SchedulerMixin, guidance_order: str = "class_first"):
        super().__init__()
        if guidance_order not in GUIDANCE_ORDERS:
            raise ValueError(f"guidance_order must be one of {GUIDANCE_ORDERS}, got {guidance_order!r}")
        self.register_modules(unet=unet, scheduler=scheduler)
        self.register_to_config(guidance_order=guidance_order)

    @torch.no_grad()
    def __call__(self, class_labels, prompt_embeds: torch.Tensor, negative_prompt_embeds: torch.Tensor | None = None,
                 class_guidance_scale: float = 1.0, text_guidance_scale: float = 1.0, num_inference_steps: int = 1,
                 generator: torch.Generator | None = None, output_type: str = "pil", return_dict: bool = True):
        """Images for ``class_labels`` (B,) and ``prompt_embeds`` (B, L, D); ``negative_prompt_embeds`` is the text
        condition's null value (default: zeros)."""
        device = self._execution_device
        labels = torch.as_tensor(class_labels, device=device).long().reshape(-1)
        text = prompt_embeds.to(device=device, dtype=self.unet.dtype)
        null_text = torch.zeros_like(text) if negative_prompt_embeds is None else negative_prompt_embeds.to(text)
        null_label = torch.full_like(labels, self.unet.config.num_class_embeds - 1)
        size = self.unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        image = randn_tensor((len(labels), self.unet.config.in_channels, *size), generator=generator, device=device,
                             dtype=self.unet.dtype)

        embed_dim = getattr(self.unet.config, "time_cond_proj_dim", None)
        scales = None
        if embed_dim:  # a FADA student: both scales are inputs, one pass per step
            n = len(labels)
            scales = scales_embedding(torch.full((n,), float(class_guidance_scale)),
                                      torch.full((n,), float(text_guidance_scale)), embed_dim).to(device, text.dtype)
        class_first = self.config.guidance_order == "class_first"
        # the three passes: (null, null), only the first-guided condition, both
        labels3 = torch.cat([null_label, labels if class_first else null_label, labels])
        text3 = torch.cat([null_text, null_text if class_first else text, text])
        s_first, s_second = ((class_guidance_scale, text_guidance_scale) if class_first
                             else (text_guidance_scale, class_guidance_scale))

        self.scheduler.set_timesteps(num_inference_steps)
        for t in self.progress_bar(self.scheduler.timesteps):
            if scales is not None:
                output = self.unet(image, t, encoder_hidden_states=text, class_labels=labels,
                                   timestep_cond=scales).sample
            else:
                out = self.unet(torch.cat([image] * 3), t, encoder_hidden_states=text3, class_labels=labels3).sample
                output = nested_guidance(*out.chunk(3), s_first, s_second)
            image = self.scheduler.step(output, t, image, generator=generator).prev_sample

        image = (image / 2 + 0.5).clamp(0, 1)
        if output_type != "pt":
            image = image.cpu().permute(0, 2, 3, 1).float().numpy()
            if output_type == "pil":
                image = self.numpy_to_pil(image)
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)
