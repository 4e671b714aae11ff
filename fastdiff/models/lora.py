"""LoRA (peft) on frozen teacher weights: LoRA students and LoRA fake scores that share one copy of the base.

Memory is what text-to-image users run out of, so a LoRA network never copies the teacher's weights: it is a
copy of the module tree whose parameters *are* the teacher's tensors (``shared_copy``), plus adapters. The
teacher, a LoRA fake score and a LoRA student then hold one set of base weights between them. Each is a
separate module, so no adapter is switched on and off around a call: that keeps gradient checkpointing
(which re-runs forwards during backward) and ``torch.compile`` correct.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..errors import FastdiffError

# The layers LCM-LoRA and DMD2's SDXL LoRA adapt (diffusers examples/consistency_distillation/
# train_lcm_distill_lora_sdxl.py ``lora_target_modules``, tianweiy/DMD2 main/sd_unified_model.py, the same 14 names):
# attention and transformer in/out projections, both feed-forward layers, the ResNet convolutions with their
# shortcuts and time-embedding projections, and the down / up samplers' convolutions. Names a model lacks are skipped.
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")


def shared_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s modules whose parameters are ``model``'s own (buffers are copied)."""
    return copy.deepcopy(model, memo={id(p): p for p in model.parameters()})


def lora_targets(model: nn.Module) -> list[str]:
    return [t for t in LORA_TARGETS if any(n.endswith(t) for n, _ in model.named_modules())]


def is_lora(model: nn.Module) -> bool:
    return any("lora_" in n for n, _ in model.named_parameters())


def with_lora(model: nn.Module, rank: int, what: str, seed: int | None = None, alpha: float | None = None) -> nn.Module:
    """A LoRA network on ``model``'s frozen weights: adapters (rank r, alpha r unless ``alpha`` is given: the delta is
    ``alpha / r`` B A) trainable, everything else frozen.

    ``what`` names the config key in errors (a model without adapter targets, or no peft installed). ``seed``:
    peft draws ``lora_A`` from torch's global generator; with a seed it draws from that seed instead and leaves
    the global generator as it was. The student's LoRA is built before the run seeds torch, so without one its
    start would differ between processes (and a run resumed in a new process would not continue the first run).
    """
    targets = lora_targets(model)
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise FastdiffError(f"{what}: LoRA needs peft (pip install 'fastdiff[lora]')") from None
    if not targets:
        raise FastdiffError(f"{what}: {type(model).__name__} has no attention or convolution layers for a LoRA; "
                            "set it to 0")
    net = shared_copy(model)
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=targets, init_lora_weights=True)
    with torch.random.fork_rng(devices=[], enabled=seed is not None):  # peft makes the adapters on the CPU
        if seed is not None:
            torch.random.default_generator.manual_seed(seed)
        if hasattr(net, "add_adapter"):  # diffusers models: keeps their own adapter bookkeeping consistent
            net.add_adapter(config)
        else:
            net = inject_adapter_in_model(config, net)
    for name, p in net.named_parameters():
        adapter = "lora_" in name
        p.requires_grad_(adapter)
        if adapter:  # trainable weights in float32, also on a bf16 base
            p.data = p.data.float()
    return net.train()


def lora_rank(model: nn.Module) -> int:
    """The rank of a LoRA network's adapters (the largest, should they differ); 0 for a network without any."""
    if not is_lora(model):
        return 0
    from peft.tuners.lora import LoraLayer

    return max((r for m in model.modules() if isinstance(m, LoraLayer) for r in m.r.values()), default=0)


def lora_copy(lora_model: nn.Module) -> nn.Module:
    """A copy of a LoRA network with its own copy of everything that trains (the adapters, and any other trained
    module such as AGD's scale embedding ``cond_proj``) and the same shared frozen base (for the EMA)."""
    frozen = {id(p): p for p in lora_model.parameters() if not p.requires_grad}
    return copy.deepcopy(lora_model, memo=frozen)


class AdapterWeights(nn.Module):
    """Checkpoint view of a LoRA network: its adapter weights only (the base is the teacher's, saved nowhere), or
    the parameters in ``params`` (an EMA copy's: everything it averages)."""

    def __init__(self, model: nn.Module, params: list[nn.Parameter] | None = None):
        super().__init__()
        self._model = [model]  # a list keeps the model out of this module's own state
        self._ids = None if params is None else {id(p) for p in params}

    def state_dict(self, *args, **kwargs):
        return {n: p.detach() for n, p in self._model[0].named_parameters()
                if ("lora_" in n if self._ids is None else id(p) in self._ids)}

    def load_state_dict(self, state: dict, strict: bool = True):
        own = self.state_dict()
        if set(own) != set(state):
            raise RuntimeError(f"adapter weights differ: {len(own)} expected, {len(state)} in the checkpoint")
        with torch.no_grad():
            for name, value in state.items():
                self.copy_into(own[name], value)

    @staticmethod
    def copy_into(own: torch.Tensor, value: torch.Tensor) -> None:
        own.copy_(value)


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter weights in peft's naming (``<module>.lora_A.weight``), as diffusers' ``load_lora_weights`` reads, with
    each module's ``alpha / r`` folded into its ``lora_B``: a loader that finds no alpha in the file (diffusers' scale
    1 for a file without metadata) then applies the trained delta ``(alpha / r) B A``."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import get_peft_model_state_dict

    scale = {name: next(iter(m.scaling.values())) for name, m in model.named_modules()
             if isinstance(m, BaseTunerLayer) and getattr(m, "scaling", None)}
    out = {}
    for k, v in get_peft_model_state_dict(model).items():
        v = v.detach().float().cpu()
        if ".lora_B." in k:
            v = v * scale.get(k.split(".lora_B.")[0], 1.0)
        out[k] = v.contiguous()
    return out


def merged_model(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A plain diffusers model (same class and config, and a flow-map network's r embedding) whose weights are
    base + LoRA delta; the shared base is left untouched."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    state = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, BaseTunerLayer):
                base = module.get_base_layer()
                delta = sum(module.get_delta_weight(a) for a in module.active_adapters)
                state[f"{name}.weight"] = base.weight.float() + delta.float()
                if base.bias is not None:
                    state[f"{name}.bias"] = base.bias.float()
        for name, value in model.state_dict().items():
            if "lora_" in name or ".base_layer." in name:
                continue
            state.setdefault(name, value.float() if value.is_floating_point() else value)
    plain = type(model).from_config(model.config)
    from .flow_map import add_flow_map_embedding, flow_map_embedding

    if flow_map_embedding(model) is not None:  # a flow-map LoRA student: its r embedding, trained beside the adapters
        add_flow_map_embedding(plain)
    plain.load_state_dict(state)
    return (plain if dtype == torch.float32 else plain.to(dtype)).eval()
