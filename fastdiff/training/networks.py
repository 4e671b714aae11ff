"""The networks a run trains: the student (a full copy of the teacher, a LoRA on it, or a given model) and the
fake score (a full copy, or a LoRA sharing the teacher's tensors), what a checkpoint keeps of each, and what a
run records where a setting can fall back (``methods_used``)."""
from __future__ import annotations

import copy
import warnings

import torch

from ..config import Config
from ..errors import FastdiffError
from ..models import flux
from ..models.layer_skip import drop_blocks, with_layer_budget
from ..models.lora import AdapterWeights, is_lora, lora_rank, with_lora
from ..models.teacher import Teacher, load_model
from ..objectives import entry, objective_class


def trainable_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A full trainable copy of a frozen network, in float32 master weights whatever the teacher's dtype."""
    return copy.deepcopy(model).float().requires_grad_(True).train()


def fake_score_model(cfg: Config, teacher: Teacher, log=None) -> torch.nn.Module:
    """The fake score's network: a trainable copy of the teacher, or a LoRA on the teacher's own weights.

    VSD / SwiftBrush train the fake score as a LoRA (rank ``objective.fake_lora_rank``, default 16 for vsd)
    on the teacher's attention and convolution layers; a teacher with no such layers (the analytic
    teacher) or no peft falls back to a full copy unless a rank was asked for explicitly. The fallback is
    said through ``log`` (default: a warning) and recorded by ``methods_used`` (``fake_score_lora_rank`` 0).
    """
    rank = cfg.objective.fake_lora_rank
    explicit = rank is not None
    rank = rank if explicit else entry(cfg.objective.name).fake_lora_rank
    if not rank:
        return trainable_copy(teacher.model)
    try:
        return with_lora(teacher.model, rank, "objective.fake_lora_rank")
    except FastdiffError as exc:
        if explicit:
            raise
        reason = str(exc).split(": ", 1)[-1].split(";")[0]
    (log or _warn)(f"{cfg.objective.name}: the fake score is a full trainable copy of the teacher, not a rank-{rank} "
                   f"LoRA ({reason})")
    return trainable_copy(teacher.model)


def _warn(message: str) -> None:
    warnings.warn(message, stacklevel=3)


def enable_gradient_checkpointing(net: torch.nn.Module, name: str, log) -> bool:
    """train.gradient_checkpointing on one trainable network: on the network itself, or on the diffusers models
    inside a wrapper that has none of its own (GuidanceEmbeddedUNet's UNet). A network with neither runs without
    it, and ``log`` says so."""
    models = [m for m in net.modules() if getattr(m, "_supports_gradient_checkpointing", False)]
    if not models:
        log(f"train.gradient_checkpointing: {type(net).__name__} (the {name}) does not support it; the {name} "
            "runs without it")
        return False
    for m in _outermost(models):
        m.enable_gradient_checkpointing()
    return True


def _outermost(models: list[torch.nn.Module]) -> list[torch.nn.Module]:
    inner = {id(sub) for m in models for sub in m.modules() if sub is not m}
    return [m for m in models if id(m) not in inner]


def is_checkpointing(net: torch.nn.Module) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) is True for m in net.modules())


def lora_export_mode(cfg: Config, teacher: Teacher) -> str | None:
    """How a LoRA student is exported: ``student.lora_export`` where the teacher has a pipeline that loads LoRA
    weights; fused for pixel teachers, whose pipelines (DDPMPipeline, fastdiff's class-conditional one) do not.
    None for students that are not LoRAs."""
    cls = objective_class(cfg.objective.name)
    if not (cfg.student.lora_rank or cls.attaches_adapters):
        return None
    if cls.fused_export_reason:  # agd's scale embedding, a flow-map student's r embedding: no LoRA file carries them
        return "fused"
    return cfg.student.lora_export if teacher.pipeline is not None else "fused"


def methods_used(cfg: Config, teacher: Teacher, objective, student_model: torch.nn.Module,
                 fake_model: torch.nn.Module | None) -> dict[str, int | bool]:
    """What the run actually does where a setting can fall back to something else, as numbers (logged with every
    metrics line, written to the export's fastdiff.json):

    - ``fake_score_lora_rank``: the fake score's LoRA rank, 0 for a full trainable copy (objectives with one);
    - ``gradient_checkpointing_generator`` / ``_fake_score``: whether it runs (when train.gradient_checkpointing);
    - ``lora_weights_exported``: LoRA students: whether adapters are exported as LoRA weights (else fused only);
    - ``tangent_jvp``: scm: whether the tangent is a JVP (False once ``tangent: auto`` fell back to differences).
    """
    methods: dict[str, int | bool] = {}
    if fake_model is not None:
        methods["fake_score_lora_rank"] = lora_rank(fake_model)
    if cfg.train.gradient_checkpointing:
        methods["gradient_checkpointing_generator"] = is_checkpointing(student_model)
        if fake_model is not None:
            methods["gradient_checkpointing_fake_score"] = is_checkpointing(fake_model)
    mode = lora_export_mode(cfg, teacher)
    if mode is not None:
        methods["lora_weights_exported"] = mode != "fused"
    tangent = getattr(objective, "tangent", None)  # scm: "auto" or "jvp" while JVP runs
    if isinstance(tangent, str):
        methods["tangent_jvp"] = tangent != "finite_difference"
    return methods


def student_model_for(cfg: Config, teacher: Teacher) -> torch.nn.Module:
    """The student's network: a full copy of the teacher, a LoRA on it, or the model in ``student.model``; without
    the blocks in ``student.skip_layers``, or budget-conditioned (``student.layer_budget``; models/layer_skip.py)."""
    if cfg.objective.name == "fada":  # the teacher with both guidance scales embedded, zero projection: the
        # objective attaches its adapters (objectives.fada); setup.check_objective_settings refuses other students
        from ..objectives.fada import fada_student

        return fada_student(teacher.denoiser).model.float().requires_grad_(True).train()
    if cfg.student.model:
        model = load_model(cfg.student.model).requires_grad_(True).train()
    elif cfg.student.lora_rank:  # blocks dropped from the LoRA's own module tree: the teacher keeps all of its
        # Built before the run seeds torch: its adapters start from train.seed, the same in every process.
        model = with_lora(teacher.model, cfg.student.lora_rank, "student.lora_rank", seed=cfg.train.seed,
                          alpha=cfg.student.lora_alpha)
    else:
        model = trainable_copy(teacher.model)
    if cfg.student.layer_budget:
        return with_layer_budget(model, cfg.student.layer_budget, cfg.student.export_budget)
    return drop_blocks(model, cfg.student.skip_layers) if cfg.student.skip_layers else model


def checkpoint_view(model: torch.nn.Module, params: list | None = None) -> torch.nn.Module:
    """What a checkpoint stores of a network: everything, or only the adapters of a LoRA on the teacher (or, for
    a LoRA student's EMA, ``params``: the parameters it averages, AGD's scale embedding included)."""
    from .sharding import ShardedAdapterWeights, is_sharded

    if not is_lora(model):
        return model
    return (ShardedAdapterWeights if is_sharded(model) else AdapterWeights)(model, params)


def check_student(model: torch.nn.Module, teacher: Teacher) -> None:
    cfg = model.config
    size = getattr(cfg, "sample_size", None)
    shape = (getattr(cfg, "in_channels", None), *((size, size) if isinstance(size, int) else tuple(size or ())))
    if flux.takes_packed_latents(model) and teacher.pipeline is not None:  # Flux: packed channels, the VAE's size
        shape = flux.sample_shape(model, teacher.pipeline.vae)
    if shape != teacher.sample_shape:
        raise FastdiffError(f"student.model takes {shape} samples but the teacher makes {teacher.sample_shape}")
    # a diffusers UNet without a label table fails on the labels at the first step ("class_embedding needs to be
    # initialized"); other networks may take labels their own way, or ignore them (an MSD part's MLP)
    if teacher.num_classes and getattr(model, "class_embedding", False) is None:
        raise FastdiffError(f"student.model takes no class labels but the teacher is class-conditional "
                            f"({teacher.num_classes} classes); give a class-conditional student")
