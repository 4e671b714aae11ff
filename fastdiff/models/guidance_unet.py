"""fastdiff's guidance-embedded UNet2DModel (see :mod:`.guidance` for the embedding): a module of its own because
it is a diffusers model, and :mod:`.guidance` is imported by the objectives (config checks) without diffusers."""
from __future__ import annotations

import torch
from diffusers import ConfigMixin, ModelMixin, UNet2DModel
from diffusers.configuration_utils import register_to_config
from torch import nn


class GuidanceEmbeddedUNet(ModelMixin, ConfigMixin):
    """A ``UNet2DModel`` that also takes ``timestep_cond`` (the embedded guidance scale)."""

    @register_to_config
    def __init__(self, unet_config: dict, time_cond_proj_dim: int = 256, sample_size=None, in_channels: int = 1,
                 num_class_embeds: int | None = None):
        super().__init__()
        self.unet = UNet2DModel.from_config(unet_config)
        width = self.unet.time_embedding.linear_1.in_features
        self.cond_proj = nn.Linear(time_cond_proj_dim, width, bias=False)
        nn.init.zeros_(self.cond_proj.weight)
        self._pending = None
        self.unet.time_embedding.register_forward_pre_hook(self._add_guidance)

    def _add_guidance(self, module, args):
        if self._pending is None:
            return None
        return (args[0] + self.cond_proj(self._pending).to(args[0].dtype),) + tuple(args[1:])

    def forward(self, sample: torch.Tensor, timestep, class_labels=None, timestep_cond=None, return_dict: bool = True):
        if timestep_cond is None:
            raise ValueError("GuidanceEmbeddedUNet needs timestep_cond (guidance_embedding(guidance_scale - 1))")
        self._pending = timestep_cond.to(self.dtype)
        try:
            return self.unet(sample, timestep, class_labels=class_labels, return_dict=return_dict)
        finally:
            self._pending = None
