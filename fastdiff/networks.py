"""The networks a run trains: the student (a full copy of the teacher, a LoRA on it, or a given model) and the
fake score (a full copy, or a LoRA sharing the teacher's tensors), and what a checkpoint keeps of each."""
from __future__ import annotations

import copy
import warnings

import torch

from .config import Config
from .errors import FastdiffError
from .lora import AdapterWeights, is_lora, with_lora
from .teacher import Teacher, load_model

DEFAULT_LORA_RANK = {"vsd": 16}


def trainable_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A full trainable copy of a frozen network, in float32 master weights whatever the teacher's dtype."""
    return copy.deepcopy(model).float().requires_grad_(True).train()


def fake_score_model(cfg: Config, teacher: Teacher) -> torch.nn.Module:
    """The fake score's network: a trainable copy of the teacher, or a LoRA on the teacher's own weights.

    VSD / SwiftBrush train the fake score as a LoRA (rank ``objective.fake_lora_rank``, default 16 for vsd)
    on the teacher's attention and convolution layers; a teacher with no such layers (the analytic
    teacher) or no peft falls back to a full copy unless a rank was asked for explicitly.
    """
    rank = cfg.objective.fake_lora_rank
    explicit = rank is not None
    rank = rank if explicit else DEFAULT_LORA_RANK.get(cfg.objective.name)
    if not rank:
        return trainable_copy(teacher.model)
    try:
        return with_lora(teacher.model, rank, "objective.fake_lora_rank")
    except FastdiffError:
        if explicit:
            raise
    warnings.warn(f"no LoRA for {type(teacher.model).__name__} (needs peft and attention or convolution layers): "
                  "the fake score is a full copy of the teacher", stacklevel=2)
    return trainable_copy(teacher.model)


def student_model_for(cfg: Config, teacher: Teacher) -> torch.nn.Module:
    """The student's network: a full copy of the teacher, a LoRA on it, or the model in ``student.model``."""
    if cfg.student.model:
        return load_model(cfg.student.model).requires_grad_(True).train()
    if cfg.student.lora_rank:
        return with_lora(teacher.model, cfg.student.lora_rank, "student.lora_rank")
    return trainable_copy(teacher.model)


def checkpoint_view(model: torch.nn.Module) -> torch.nn.Module:
    """What a checkpoint stores of a network: everything, or only the adapters of a LoRA on the teacher."""
    return AdapterWeights(model) if is_lora(model) else model


def check_student(model: torch.nn.Module, teacher: Teacher) -> None:
    cfg = model.config
    size = getattr(cfg, "sample_size", None)
    shape = (getattr(cfg, "in_channels", None), *((size, size) if isinstance(size, int) else tuple(size or ())))
    if shape != teacher.sample_shape:
        raise FastdiffError(f"student.model takes {shape} samples but the teacher makes {teacher.sample_shape}")
