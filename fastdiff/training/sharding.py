"""``train.sharding: fsdp``: the run's large networks sharded over the processes with PyTorch's own FSDP2
(``torch.distributed.fsdp.fully_shard``), one FSDP unit per transformer block or part of a UNet block (each
resnet, attention transformer, up/downsampler; ``units``) plus the root.

What is sharded: the student, its EMA, the fake score, the frozen teacher and a consistency target network (any
network with blocks); small heads (GAN head, SCM's log-variance, density ratios) stay replicated and their
gradients are still averaged by ``optim``'s all-reduce. Gradients of sharded parameters are reduce-scattered by
FSDP itself (mean over processes, as the all-reduce computes). Checkpoints and exports hold full tensors gathered
to the main process, in the format unsharded runs write, so a checkpoint moves between process counts and between
``sharding: none`` and ``fsdp`` freely.

LoRA networks (a LoRA student, its EMA, a LoRA fake score) share the teacher's tensors as their frozen base
(``models.lora``). That base is kept whole, one copy per process, not sharded: FSDP2 gives each ``fully_shard``
unit its own sharded parameters, and a tensor shared by units of separate networks would be sharded (and held)
once per network; grouping the networks' blocks into one unit (``fully_shard([a, b])``) does not fit either, as a
group reshards only once every member ran forward and a root must be one module. So the teacher stays plain and
each LoRA network is one FSDP unit whose base is ``ignored_params``: its adapters (and their Adam states) are
sharded and their gradients reduce-scattered by FSDP like any sharded gradient. A full network in the same run (a
full fake score next to a LoRA student) is sharded per block as usual.

Setup (``loads_into_shards``): the teacher is sharded as soon as it is loaded, and the student, the fake score and
the EMA, full copies of it, are made from its shards (``Shards.copy_of``: the module structure on the meta device,
sharded, then each process's slices copied), so no process holds more than the teacher whole. So are the networks
objectives keep or change: cd's (and hyper-sd's) EMA target is a sharded copy of the student's
(``objectives.base.copy_network``), and meanflow's (and ayf's) flow-map embedding is added to the student's
structure before it is sharded (``Objective.prepare_student``), its zero weights sliced like the rest. The
teacher's network itself loads straight into shards (``load_sharded``): its module structure without weights,
sharded, then each process reads only its own rows of the checkpoint's safetensors file(s), memory-mapped. Where
that does not apply it loads whole and is sharded after (see ``load_sharded``). The VAE and text encoders always
load whole and stay replicated.
"""
from __future__ import annotations

import contextlib
import copy
import os

import math

import torch
from torch import nn

from ..errors import FastdiffError
from ..models.lora import AdapterWeights

SHARDINGS = ("none", "fsdp")
# Module lists whose entries are one FSDP unit each: diffusers UNets, DiT / SD3 / Sana, Flux's single-stream blocks.
BLOCK_LISTS = ("down_blocks", "up_blocks", "transformer_blocks", "single_transformer_blocks", "blocks")
SINGLE_BLOCKS = ("mid_block",)
# Inside a UNet block, the entries of these lists are units of their own, the block only keeps what is left (if
# anything). A whole block is too coarse: SD1.5's widest up block holds 30% of the UNet (986 MB in float32; one
# part at most 5.7%), and its gathered copy with FSDP's all-gather buffer was the largest transient of a sharded
# step (eval/memory.py, 2 CPU processes, width 0.2, DMD2: ~110 MB of the 1633 MB peak per block, ~25 MB per part).
PART_LISTS = ("resnets", "attentions", "upsamplers", "downsamplers")
# Modules a network calls outside their block's forward, each a unit of its own: DiT (Transformer2DModel with
# ada_norm_zero) takes its conditioning from its first block's norm1.emb, called by the root before block 0 runs,
# when that block's weights are still sharded ("mixed Tensor and DTensor" otherwise).
CALLED_OUTSIDE = ("transformer_blocks.0.norm1.emb",)

# reshard_after_forward per network (True: free the gathered weights after each forward and gather again in backward).
#  - teacher: True. It is frozen, the largest network a step calls, and called several times per update (real
#    score, sometimes CFG); its backward (SiD's loss differentiates through it) comes only after the student's and
#    fake score's passes. Holding it gathered from forward to backward would keep a full copy for most of the step.
#  - student: True. Its forward is the first thing an update does and its backward the last, with the teacher's
#    and fake score's forwards between them.
#  - fake score: True, though its critic updates run forward and backward back to back (False would save one
#    all-gather per block there). In the generator update it is frozen and, for DMD2, not differentiated at all,
#    so no backward would reshard it: it would stay gathered, a full copy, into the next critic update, and with
#    the requires_grad flags of that frozen gather (FSDP reads them from the sharded parameters at each gather
#    only), so the critic would not train. (Explicit True also reshards the root unit, which FSDP's default keeps.)
#  - EMA and consistency target: True. Never differentiated; the EMA is not even run during training.
RESHARD_AFTER_FORWARD = {"teacher": True, "student": True, "fake": True, "ema": True, "target": True}

_ACCELERATE_PLUGINS = {"ACCELERATE_USE_FSDP": "FSDP", "ACCELERATE_USE_DEEPSPEED": "DeepSpeed",
                       "ACCELERATE_USE_MEGATRON_LM": "Megatron-LM"}


def refuse_accelerate_sharding(distributed_type=None, env=None) -> None:
    """accelerate's FSDP / DeepSpeed / Megatron plugins only act through ``accelerator.prepare``, which fastdiff does
    not call: such a config would silently replicate every network. Refuse it and point to ``train.sharding``."""
    env = os.environ if env is None else env
    asked = [name for var, name in _ACCELERATE_PLUGINS.items() if env.get(var, "false").lower() in ("true", "1", "yes")]
    kind = getattr(distributed_type, "value", distributed_type)
    if kind in ("FSDP", "DEEPSPEED", "MEGATRON_LM"):
        asked.append({"FSDP": "FSDP", "DEEPSPEED": "DeepSpeed", "MEGATRON_LM": "Megatron-LM"}[kind])
    if asked:
        raise FastdiffError(f"accelerate's {asked[0]} plugin is not used by fastdiff (every network would be "
                            "replicated); launch plain multi-process (accelerate launch --multi_gpu or torchrun) and "
                            "set train.sharding: fsdp instead")


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in module.modules())


def is_dtensor(t: torch.Tensor | None) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's part of a tensor (the tensor itself when not sharded); in-place ops on it act on the shard."""
    return t.to_local() if is_dtensor(t) else t


def _outermost(model: nn.Module, chosen, skip=()) -> list[tuple[str, nn.Module]]:
    """(name, module) of the outermost modules for which ``chosen(owner list, leaf name)`` holds, in module order,
    leaving out those inside the names in ``skip``."""
    found = []
    for name, module in model.named_modules():
        parent, _, leaf = name.rpartition(".")
        if not chosen(parent.rpartition(".")[2], leaf):
            continue
        if not any(name.startswith(p + ".") for p, _ in found) and not any(name.startswith(p + ".") for p in skip):
            found.append((name, module))
    return found


def units(model: nn.Module) -> list[nn.Module]:
    """The FSDP units of a network below its root, inner ones first (the order ``fully_shard`` needs): the parts
    of UNet blocks (``PART_LISTS``), then the outermost blocks (entries of ``BLOCK_LISTS``, the mid block) not
    inside a part, except a block whose parameters all belong to its parts (nothing left for it to hold)."""
    parts = _outermost(model, lambda owner, leaf: owner in PART_LISTS and leaf.isdigit())
    modules = dict(model.named_modules())
    parts += [(name, modules[name]) for name in CALLED_OUTSIDE if name in modules]
    part_names = [name for name, _ in parts]
    in_parts = {id(p) for _, m in parts for p in m.parameters()}
    found = [m for _, m in parts]
    for name, block in _outermost(model, lambda owner, leaf: owner in BLOCK_LISTS and leaf.isdigit()
                                  or leaf in SINGLE_BLOCKS, part_names):
        if any(id(p) not in in_parts for p in block.parameters()):
            found.append(block)
    return found


class Shards:
    """The sharded networks of one run, the device mesh they live on, and a weightless copy of each (its plain
    module structure) from which full copies are rebuilt for sample grids and export."""

    def __init__(self, accelerator, mixed_precision: str, log=print):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy

        device = accelerator.device
        self.mesh = init_device_mesh(device.type, (accelerator.num_processes,))
        self.device = device
        self.is_main = accelerator.is_main_process
        self.policy = MixedPrecisionPolicy()
        if mixed_precision == "bf16" and device.type == "cuda":
            # bf16 gathers and compute, fp32 master weights (the sharded parameters) and fp32 gradient reduction.
            self.policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                               output_dtype=torch.float32)
        elif mixed_precision == "bf16":
            log(f"train.sharding fsdp: FSDP keeps float32 parameters on {device.type} (its bf16 policy is for GPUs); "
                "only accelerate's autocast decides the compute dtype there")
        self.networks: list[nn.Module] = []
        self.gathering = False  # inside gathered_student
        self._skeletons: dict[int, nn.Module] = {}
        self._kept: dict[int, list[nn.Parameter]] = {}  # per network, its parameters left whole (a LoRA's base)

    def shard(self, model: nn.Module, role: str, keep: set[nn.Parameter] = frozenset()) -> nn.Module:
        """Shard ``model`` in place (its blocks, then the rest as the root unit); returns it. Its parameters in
        ``keep`` (the teacher's tensors, a LoRA network's base) are left whole and shared; such a network is one
        unit (its sharded part is the adapters, a few percent of the base: one all-gather per call)."""
        from torch.distributed.fsdp import fully_shard

        kept = [p for p in model.parameters() if p in keep]
        self._skeletons[id(model)] = weightless_copy(model, kept)
        options = {"mesh": self.mesh, "mp_policy": self.policy, "reshard_after_forward": RESHARD_AFTER_FORWARD[role]}
        if kept:
            from torch.distributed.fsdp import MixedPrecisionPolicy

            self._kept[id(model)] = kept
            # No bf16 policy here: it would cast the network's inputs and its adapters but not the base it leaves
            # alone (the teacher's dtype); autocast picks the compute dtype as in a replicated run, and the adapters
            # are small enough to gather in float32.
            options["mp_policy"] = MixedPrecisionPolicy()
            fully_shard(model, **options, ignored_params=set(kept))
        else:
            for unit in units(model):
                fully_shard(unit, **options)
            fully_shard(model, **options)
        self.networks.append(model)
        return model

    def copy_of(self, source: nn.Module, role: str, trainable: bool, prepare=None) -> nn.Module:
        """A sharded copy of the sharded network ``source`` made without its full weights (``train.sharding fsdp``
        setup): its module structure with meta parameters, sharded like ``source`` (the same mesh and units, so each
        parameter is cut into the same slices), then filled with this process's slices of ``source``. ``trainable``:
        float32 and trainable, as ``networks.trainable_copy`` makes a full one (the cast is elementwise, so casting
        the slices gives the slices of the cast), else frozen in ``source``'s dtype (an EMA).

        ``prepare(model)``: changes the copy's structure before it is sharded (``Objective.prepare_student``: the
        flow-map embedding), so FSDP manages what it adds; the layers it adds are small and made whole (real
        initial values, not meta), and each process keeps its slices of those values."""
        model = copy.deepcopy(self._skeletons[id(source)])
        model = model.float().requires_grad_(True).train() if trainable else model.requires_grad_(False).eval()
        sources = {**dict(source.named_parameters()), **dict(source.named_buffers())}
        added = {}
        if prepare is not None:
            prepare(model)
            added = {name: t.detach().clone() for name, t in (*model.named_parameters(), *model.named_buffers())
                     if name not in sources}
            assert not any(t.is_meta for t in added.values()), "prepare made layers without values"
        self.shard(model, role)
        model.to_empty(device=self.device)  # room for this process's slices only; buffers are emptied too
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in added:  # a layer prepare added: its initial values, cut locally
                    copy_full_(p, added[name])
                    continue
                assert p.shape == sources[name].shape, name
                local(p).copy_(local(sources[name]))
            for name, b in model.named_buffers():  # buffers are not sharded: whole on every process
                b.copy_(added[name] if name in added else sources[name])
        return model

    def set_gradient_sync(self, on: bool) -> None:
        """Accumulation: micro-batches before the last keep their gradients unreduced (no reduce-scatter)."""
        for net in self.networks:
            net.set_requires_gradient_sync(on)

    def skeleton(self, model: nn.Module) -> nn.Module:
        """The plain module structure of a sharded network (its type is what export checks), weightless."""
        return self._skeletons.get(id(model), model)

    def gathered(self, model: nn.Module, everywhere: bool = False) -> nn.Module | None:
        """A full, unsharded copy of a sharded network on the main process (its gathered tensors on the CPU), None
        elsewhere. Collective. A network with parameters left whole (a LoRA's base) gets its sharded ones gathered
        and shares the rest. ``everywhere``: a copy on every process, on its device (an evaluation split over the
        processes samples on each); each process then holds what the main one holds for a grid or the export."""
        kept = self._kept.get(id(model), [])
        if everywhere:  # gathered one at a time, in the same order on each; buffers copied, never the live ones
            state = {name: value.full_tensor() if is_dtensor(value) else value.detach().clone()
                     for name, value in model.state_dict().items() if is_dtensor(value) or not kept}
        else:
            state = gather_dtensors(model.state_dict(), self.is_main) if kept else full_state_dict(model)
            if not self.is_main:
                return None
        plain = copy.deepcopy(self._skeletons[id(model)], {id(p): p for p in kept})
        plain.load_state_dict(state, strict=not kept, assign=True)  # its parameters become the gathered tensors
        return plain


def weightless_copy(model: nn.Module, keep=()) -> nn.Module:
    """A copy of the module structure with parameters on the meta device (no memory), except those in ``keep``,
    which the copy shares; buffers are copied."""
    kept = {id(p) for p in keep}
    memo = {id(p): p if id(p) in kept else nn.Parameter(torch.empty_like(p, device="meta"),
                                                        requires_grad=p.requires_grad)
            for p in model.parameters()}
    return copy.deepcopy(model, memo)


def gather_dtensors(state: dict[str, torch.Tensor], is_main: bool) -> dict[str, torch.Tensor]:
    """The sharded (DTensor) entries of a state dict gathered to full size, one at a time and in the dict's order
    (the same on every process: collective), kept on CPU by the main process; the others get an empty dict."""
    out = {}
    for name, value in state.items():
        if is_dtensor(value):
            full = value.full_tensor()
            if is_main:
                out[name] = full.detach().cpu()
    return out


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """A module's full state dict: on every process for a plain module; gathered (collective) to the main process
    on CPU for a sharded one, whose other processes get an empty dict."""
    if not is_sharded(module):
        state = module.state_dict()
        if not any(is_dtensor(v) for v in state.values()):
            return state
        # a view of a sharded network (a LoRA's adapters, models.lora.AdapterWeights): its tensors are DTensors
        return gather_dtensors(state, torch.distributed.get_rank() == 0)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def copy_full_(param: torch.Tensor, value: torch.Tensor) -> None:
    """Copy a full tensor (as every process read it from a checkpoint) into a parameter: into this process's shard
    of a sharded one (cut locally, no communication)."""
    if not is_dtensor(param):
        param.copy_(value)
        return
    from torch.distributed.tensor import distribute_tensor

    mine = distribute_tensor(value.to(param.device, param.dtype), param.device_mesh, param.placements,
                             src_data_rank=None)
    param.to_local().copy_(mine.to_local())


def load_full_state_dict(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load full tensors (every process read the same file) into a sharded module: each keeps its own shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=True))


def full_optimizer_state(state: dict, is_main: bool) -> dict:
    """An optimizer state dict with every sharded tensor gathered to full size (collective, one tensor at a time);
    kept, on CPU, by the main process only (the others get None in their place: they do not write)."""
    out = {}
    for index in sorted(state["state"]):
        out[index] = {}
        for key, value in state["state"][index].items():
            if is_dtensor(value):
                full = value.full_tensor()
                value = full.cpu() if is_main else None
            out[index][key] = value
    return {**state, "state": out}


def shard_optimizer_state(state: dict, params: list[nn.Parameter]) -> dict:
    """Full optimizer tensors (as a checkpoint holds them) cut into this process's shards of the sharded ``params``
    (optimizer state is indexed by parameter order)."""
    from torch.distributed.tensor import distribute_tensor

    out = {}
    for index, values in state["state"].items():
        p = params[index]
        out[index] = {key: (distribute_tensor(v.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
                            if is_dtensor(p) and torch.is_tensor(v) and v.shape == p.shape else v)
                      for key, v in values.items()}
    return {**state, "state": out}


def clip_grad_norm(params: list[nn.Parameter], max_norm: float, clip_value: float | None = None) -> torch.Tensor:
    """``clip_grad_value_`` then ``clip_grad_norm_`` over a mix of sharded and replicated parameters: the norm sums
    every shard's squares over the processes once and a replicated gradient's once. Returns the total norm."""
    grads = [p.grad for p in params if p.grad is not None]
    if clip_value:
        for g in grads:
            local(g).clamp_(-clip_value, clip_value)
    device = grads[0].device if grads else torch.device("cpu")
    sharded = torch.zeros((), dtype=torch.float32, device=device)
    replicated = torch.zeros((), dtype=torch.float32, device=device)
    for g in grads:
        squares = local(g).float().square().sum()
        if is_dtensor(g):
            sharded += squares
        else:
            replicated += squares
    torch.distributed.all_reduce(sharded)
    norm = (sharded + replicated).sqrt()
    if math.isinf(max_norm):  # no clip: the norm only
        return norm
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for g in grads:
        local(g).mul_(coef.to(g.dtype))
    return norm


def loads_into_shards(cfg, num_processes: int) -> bool:
    """Whether setup shards the teacher first and makes the student, the fake score and the EMA as sharded copies
    of it (``Shards.copy_of``: no process ever holds them whole) rather than full copies sharded afterwards. Under
    fsdp on several processes, for the plain full copies of the teacher only: not a LoRA student or fake score (on
    the teacher's whole tensors), a given ``student.model``, a student with blocks dropped, a layer budget or a
    guidance embedding, nor fada's student (a guidance-embedded network wrapping a whole copy of the teacher's,
    ``objectives.fada.fada_student``, to which the objective attaches adapters); nor with ``train.channels_last``
    (a memory-format change of the whole weights) or the settings fsdp refuses. The objectives that keep or change
    the student do load into shards: cd's target (and hyper-sd's) is a sharded copy of the student's
    (``objectives.base.copy_network``), meanflow's flow-map embedding (and ayf's) is added before the student is
    sharded (``Objective.prepare_student``, ``Shards.copy_of``)."""
    from ..objectives import entry

    o, t, s = cfg.objective, cfg.train, cfg.student
    fake_rank = o.fake_lora_rank if o.fake_lora_rank is not None else entry(o.name).fake_lora_rank
    return (t.sharding == "fsdp" and num_processes > 1 and t.mixed_precision != "fp16" and not t.compile
            and not t.channels_last and not fake_rank and not s.model and not s.lora_rank and not s.skip_layers
            and not s.layer_budget and o.guidance_range is None and o.name != "fada")


def shards_before_teacher(cfg, accelerator, log=print):
    """``loads_into_shards``: (the run's Shards, the ``load_network`` hook ``models.teacher.load_teacher`` loads
    the teacher's network into shards with); else (None, None). Not with ``data.name teacher``, whose samples the
    teacher makes during setup, before every process would call it (a sharded forward is collective)."""
    if not loads_into_shards(cfg, accelerator.num_processes):
        return None, None
    shards = Shards(accelerator, cfg.train.mixed_precision, log)
    if cfg.data.name == "teacher":
        return shards, None
    return shards, lambda cls, path, subfolder, dtype: load_sharded(shards, cls, path, subfolder, dtype, log)


def shards_for_setup(run, log=print) -> Shards | None:
    """The run's Shards (``shards_before_teacher``) with the teacher sharded, before any copy of it is made: a
    teacher loaded whole (``load_sharded`` did not apply) is sharded now; None when setup does not load into
    shards (``shard_run`` then shards the built run)."""
    if run.shards is not None and not is_sharded(run.teacher.model):
        run.shards.shard(run.teacher.model, "teacher")
    return run.shards


SAFETENSORS = "diffusion_pytorch_model.safetensors"


def weight_files(folder) -> dict[str, str] | None:
    """{tensor name: safetensors file} of a diffusers model folder (one file, or an index of several, as
    ``from_pretrained`` reads them without a variant); None when it has neither (.bin weights)."""
    import json
    from pathlib import Path

    from safetensors import safe_open

    folder = Path(folder)
    index = folder / (SAFETENSORS + ".index.json")
    if index.is_file():
        return {name: str(folder / file) for name, file in json.loads(index.read_text())["weight_map"].items()}
    if (folder / SAFETENSORS).is_file():
        with safe_open(folder / SAFETENSORS, "pt") as f:
            return dict.fromkeys(f.keys(), str(folder / SAFETENSORS))
    return None


def load_sharded(shards: Shards, cls, path: str, subfolder: str, dtype: torch.dtype, log=print) -> nn.Module | None:
    """The teacher's network ``cls`` from ``path/subfolder`` loaded straight into shards: built with its parameters
    on the meta device (accelerate's ``init_empty_weights``; buffers get their register-time values), cast to
    ``dtype`` and frozen as ``from_pretrained`` leaves it, sharded (``Shards.shard``, the usual units), then each
    process's rows read from the memory-mapped safetensors file(s) (``get_slice``) and cast (``copy_`` rounds as
    ``Tensor.to`` does). Buffers: from the file where it holds them, else their register-time values.

    None (the network then loads whole with ``from_pretrained`` and is sharded after) when: the folder has no
    safetensors weights (.bin), the class keeps modules in float32 (``_keep_in_fp32_modules``), or the file's tensor
    names differ from the network's state dict (weights ``from_pretrained`` renames, e.g. old attention names). Not
    called at all (models.teacher: whole) for hub ids, a single process, LoRA runs and the other runs
    ``loads_into_shards`` leaves out; the VAE and text encoders of a pipeline always load whole (replicated)."""
    from pathlib import Path

    from accelerate import init_empty_weights
    from safetensors import safe_open

    folder = Path(path) / subfolder
    files = weight_files(folder)
    if files is None or getattr(cls, "_keep_in_fp32_modules", None):
        return None
    with init_empty_weights():  # parameters on meta; buffers (include_buffers False) real
        model = cls.from_config(cls.load_config(folder))
    model.register_to_config(_name_or_path=str(path))  # as from_pretrained records it
    if set(files) != set(model.state_dict()):
        log(f"train.sharding fsdp: {folder}'s tensor names differ from {cls.__name__}'s; loading it whole")
        return None
    registered = {name: b.clone() for name, b in model.named_buffers() if name not in files}
    # from_pretrained casts what the file holds (floating parameters and persistent buffers) to dtype; the buffers
    # it does not hold keep their register-time dtype (restored below). nn.Module.to: diffusers' own warns.
    nn.Module.to(model, dtype).requires_grad_(False).eval()
    shards.shard(model, "teacher")
    model.to_empty(device=shards.device)  # this process's slices only; buffers emptied too (refilled below)
    with torch.no_grad():
        # one opening per tensor: the file's pages a reading touches stay mapped (and count as resident) until the
        # file is closed, so keeping it open would end holding about the whole file; reopening costs a header read
        for name, p in model.named_parameters():
            with safe_open(files[name], "pt") as file:
                _read_slice_(p, file, name)
        for name, b in list(model.named_buffers()):
            if name in files:
                with safe_open(files[name], "pt") as file:
                    b.copy_(file.get_tensor(name))
            else:
                owner, _, leaf = name.rpartition(".")
                model.get_submodule(owner)._buffers[leaf] = registered[name].to(shards.device)
                shards.skeleton(model).get_submodule(owner)._buffers[leaf] = registered[name]  # copies made from it
    return model


def _read_slice_(param: torch.Tensor, file, name: str) -> None:
    """Fill this process's slice of ``param`` from an open safetensors file, reading only its rows: FSDP2 cuts
    dim 0 into ``ceil(n / P)``-row chunks, process ``i`` holding rows ``[i * chunk, i * chunk + its local size)``."""
    from torch.distributed.tensor import Shard

    mine = local(param)
    if not is_dtensor(param) or param.dim() == 0 or tuple(param.placements) != (Shard(0),):
        copy_full_(param, file.get_tensor(name))  # whole, or not FSDP's dim-0 cut: read whole, cut locally
        return
    chunk = -(-param.shape[0] // param.device_mesh.size())
    start = param.device_mesh.get_local_rank() * chunk
    if mine.shape[0]:
        mine.copy_(file.get_slice(name)[start:start + mine.shape[0]])


def shard_run(run, log=print) -> Shards | None:
    """Shard a built run's networks (before its EMA pairs and optimizers take their parameters); those already
    sharded in setup (``shards_for_setup``) are kept. One process has nothing to shard: the run stays unsharded
    (and resumes exactly as any single-process run)."""
    from ..models.attention import set_attention
    from ..models.lora import is_lora

    cfg = run.cfg
    if cfg.train.sharding != "fsdp":
        return None
    if run.accelerator.num_processes == 1:
        log("train.sharding fsdp on one process: nothing to shard, the networks are kept whole")
        return None
    student = run.generator.denoiser.model
    fake = run.objective.fake.model if run.objective.fake is not None else None
    early = run.shards is not None  # shards_for_setup made the teacher, student, fake score and EMA sharded
    if not early and cfg.train.mixed_precision == "fp16":
        raise FastdiffError("train.sharding fsdp runs bf16 or float32, not fp16 (its loss scaler does not take "
                            "sharded gradients); set train.mixed_precision bf16 or no")
    if not early and cfg.train.compile:
        raise FastdiffError("train.sharding fsdp with train.compile is not supported yet; set train.compile false")
    shards = run.shards or Shards(run.accelerator, cfg.train.mixed_precision, log)
    for net in shards.networks:  # sharded before the attention backend was set: their skeletons (the structure of
        # the gathered copies: sample grids, export) get it too, as a skeleton taken now would have it
        set_attention(shards.skeleton(net), cfg.train.attention)
        if any(not is_dtensor(p) for p in net.parameters()):  # a layer added after setup sharded it: not in the
            # skeleton, nor managed by FSDP (Objective.prepare_student adds it before; else loads_into_shards must
            # leave such an objective out)
            raise FastdiffError(f"train.sharding fsdp: objective {cfg.objective.name} changed a network after setup "
                                "sharded it; this objective is not supported with fsdp yet")
    # LoRA networks share the teacher's tensors as their base: then the teacher stays whole (see the module's doc)
    base = set(run.teacher.model.parameters()) if any(is_lora(n) for n in (student, fake) if n is not None) else set()
    if base:
        log("train.sharding fsdp: the teacher's weights are the LoRA networks' shared base: kept whole (one copy per "
            "process), the adapters sharded")
    networks = [(run.teacher.model, "teacher")] if not base else []
    networks += [(net, role) for net, role in ((student, "student"), (fake, "fake"), (run.ema, "ema")) if net is not None]
    for net, role in networks:
        if not is_sharded(net):
            shards.shard(net, role, base)
    for module in run.objective.state_modules().values():  # a consistency target: a copy of the student
        if units(module) and not is_sharded(module):
            shards.shard(module, "target", base)
    return shards


class ShardedAdapterWeights(AdapterWeights):
    """Checkpoint view of a sharded LoRA network: its adapters (DTensors, gathered by ``full_state_dict`` to save);
    a checkpoint's full adapter tensors load into this process's shards."""

    copy_into = staticmethod(copy_full_)  # each process keeps its own shard of the full tensor


@contextlib.contextmanager
def gathered_student(run, everywhere: bool = False):
    """Sample grids and export on a sharded run: the student's weights gathered once (collective) into a plain copy
    on the main process (``everywhere``: on every process, for an evaluation each samples a share of), which
    ``run.student_weights()`` returns inside this block."""
    if run.shards is None or run.shards.gathering:  # unsharded, or already inside such a block
        yield
        return
    plain = run.shards.gathered(run.student_weights(), everywhere)
    if plain is not None:
        plain = plain.to(run.accelerator.device)
    run.gathered_student, run.shards.gathering = plain, True
    try:
        yield
    finally:
        run.gathered_student, run.shards.gathering = None, False
