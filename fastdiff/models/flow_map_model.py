"""The exported form of a flow-map network (see :mod:`.flow_map`): a diffusers model, so a module of its own;
:mod:`.flow_map` is imported by the objectives (config checks) without diffusers."""
from __future__ import annotations

import inspect

import diffusers
import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import FrozenDict, register_to_config
from torch import nn

from .flow_map import add_flow_map_embedding, target_time
from .mlp import MLPDenoiser


class FlowMapModel(ModelMixin, ConfigMixin):
    """An exported flow-map network: ``base`` (its class and config recorded) with the r embedding; ``forward``
    takes ``r_timestep`` (native timesteps; default 0, the map to the data)."""

    @register_to_config
    def __init__(self, base_class: str, base_config: dict, sample_size=None, in_channels: int = 1,
                 num_class_embeds: int | None = None):
        super().__init__()
        cls = MLPDenoiser if base_class == "MLPDenoiser" else getattr(diffusers, base_class)
        self.base = add_flow_map_embedding(cls.from_config(base_config))

    @classmethod
    def wrap(cls, model: nn.Module) -> "FlowMapModel":
        """The in-place flow-map network ``model`` as a FlowMapModel with the same weights."""
        cfg = model.config
        wrapped = cls(type(model).__name__, dict(cfg), getattr(cfg, "sample_size", None),
                      getattr(cfg, "in_channels", 1), getattr(cfg, "num_class_embeds", None))
        wrapped.base.load_state_dict(model.state_dict())
        return wrapped.to(next(model.parameters()).device)

    @property
    def config(self) -> FrozenDict:
        """Its own config with the base network's keys readable beside it: the teacher pipelines' code reads e.g.
        ``transformer.config.patch_size`` or ``joint_attention_dim`` (only its own keys are saved)."""
        own = self._internal_dict
        return FrozenDict({**own.get("base_config", {}), **own})

    def forward(self, sample: torch.Tensor | None = None, timestep=None, class_labels=None, r_timestep=None,
                return_dict: bool = True, **kwargs):
        """The base network's forward mapping to ``r_timestep``; its other inputs pass through by name
        (``encoder_hidden_states``, ``pooled_projections``, ...; transformers' ``hidden_states`` is ``sample``)."""
        if sample is not None:
            first = "sample" if "sample" in inspect.signature(self.base.forward).parameters else "hidden_states"
            kwargs[first] = sample
        if class_labels is not None:
            kwargs["class_labels"] = class_labels
        if r_timestep is None:  # fastdiff's samplers set it through target_time
            return self.base(timestep=timestep, return_dict=return_dict, **kwargs)
        with target_time(self.base, torch.as_tensor(r_timestep, device=self.device)):
            return self.base(timestep=timestep, return_dict=return_dict, **kwargs)
