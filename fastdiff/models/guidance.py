"""LCM-style guidance embedding for students of class-conditional UNet2DModel teachers.

LCM (Luo et al. 2023, Sec. 4.2) distils a whole range of CFG scales into one student by feeding it the
scale w as an extra embedding added to the timestep embedding (diffusers' ``time_cond_proj_dim`` on
``UNet2DConditionModel``). ``UNet2DModel`` has no such input, so :class:`.guidance_unet.GuidanceEmbeddedUNet` wraps one
and adds ``cond_proj(embedding(w))`` to the input of its timestep MLP, which is exactly where
``TimestepEmbedding(cond_proj_dim=...)`` adds it. ``cond_proj`` starts at zero, so the wrapped student
starts as an exact copy of the teacher.
"""
from __future__ import annotations

import torch
from torch import nn

from ..lazy import lazy_names

__all__ = ["guided_condition", "with_guidance_embedding"]

# diffusers is imported on first use below: the objectives import this module, and config checks import the
# objectives, which then answer without loading diffusers (seconds). The names that lived here resolve on first use.
__getattr__, __dir__ = lazy_names(__name__, __package__, {
    "GuidanceEmbeddedUNet": ".guidance_unet",
    "guidance_embedding": "fastdiff.pipelines.pipeline_fastdiff_class_conditional"}, globals())


def guided_condition(cond: dict, w: torch.Tensor, dim: int, device) -> dict:
    """The condition of a guidance-embedded student: ``cond`` plus the embedding of ``w = guidance_scale - 1``
    (computed where w lives, as the exported pipeline computes it on the CPU, then moved to ``device``)."""
    from fastdiff.pipelines.pipeline_fastdiff_class_conditional import guidance_embedding  # the pipeline's own rule

    return {**cond, "timestep_cond": guidance_embedding(w, dim).to(device)}


def with_guidance_embedding(model: nn.Module, dim: int = 256) -> nn.Module:
    """The student network with a guidance input (weights kept, the new projection zero, so it starts as the
    teacher): a UNet2DModel is wrapped as :class:`GuidanceEmbeddedUNet`; a UNet2DConditionModel is rebuilt with
    diffusers' own ``time_cond_proj_dim`` (LCM-SD's layout, which StableDiffusionPipeline feeds from its
    ``guidance_scale``). Other models raise ValueError."""
    from diffusers import UNet2DConditionModel, UNet2DModel

    from .guidance_unet import GuidanceEmbeddedUNet

    device = next(model.parameters()).device
    if isinstance(model, UNet2DConditionModel):
        guided = UNet2DConditionModel.from_config({**model.config, "time_cond_proj_dim": dim})
        missing, unexpected = guided.load_state_dict(model.state_dict(), strict=False)
        if unexpected or any(not k.startswith("time_embedding.cond_proj") for k in missing):
            raise ValueError(f"could not add a guidance embedding to {type(model).__name__}: {missing + unexpected}")
        nn.init.zeros_(guided.time_embedding.cond_proj.weight)
        return guided.to(device)
    if not isinstance(model, UNet2DModel):
        raise ValueError(f"objective.guidance_range needs a UNet2DModel or UNet2DConditionModel student to embed "
                         f"the scale into, got {type(model).__name__}")
    cfg = model.config
    # keywords, not positions: diffusers records positional arguments as "defaults used" and from_config (LoRA
    # merging, AGD's export) would then drop them
    wrapped = GuidanceEmbeddedUNet(unet_config=dict(cfg), time_cond_proj_dim=dim, sample_size=cfg.sample_size,
                                   in_channels=cfg.in_channels, num_class_embeds=cfg.num_class_embeds)
    wrapped.unet.load_state_dict(model.state_dict())
    return wrapped.to(device)
