"""``fastdiff distill --dry-run``: the resolved config, the networks' parameter counts and an estimate of the memory
one process holds for them, without an output folder, an accelerator or a training step.

The networks are built exactly as a run builds them (``networks.student_model_for``, ``fake_score_model``,
``setup.build_objective``), so LoRA students and fake scores, GAN heads and sCM's logvar head are counted as trained.
Tensors shared between networks (a LoRA's frozen base is the teacher's own) are counted once in the memory estimate.
"""
from __future__ import annotations

import torch
import yaml

from ..config import Config, to_dict
from ..errors import FastdiffError
from ..models.embedded import resolve_teacher_path
from ..models.generator import Generator
from ..models.guidance import with_guidance_embedding
from ..models.teacher import load_teacher
from ..objectives import objective_class
from .networks import check_student, fake_score_model, student_model_for
from .setup import (build_objective, check_objective_settings, resolve_train_defaults, sigma_init, student_denoiser,
                    student_like, uses_ema)

GIB = 1024 ** 3
# Bytes per trainable parameter beyond its float32 master weight: its float32 gradient and Adam's two float32 moments.
GRAD_BYTES, ADAM_BYTES = 4, 8


def _rows(teacher, student: torch.nn.Module, fake, extras: list[torch.nn.Module]) -> list[tuple[str, list]]:
    """(name, parameters) of every network a run holds. The teacher row counts every frozen network of its pipeline
    (VAE, text encoders); ``extras`` are the objective's own trained modules (GAN head, logvar head)."""
    frozen = [teacher.model]
    if teacher.pipeline is not None:
        frozen += [m for m in teacher.pipeline.components.values()
                   if isinstance(m, torch.nn.Module) and m is not teacher.model]
    rows = [("teacher", [p for m in frozen for p in m.parameters()]), ("student", list(student.parameters()))]
    if fake is not None:
        rows.append(("fake score", list(fake.parameters())))
    seen = {id(p) for _, params in rows for p in params}
    extra = [p for m in extras for p in m.parameters() if id(p) not in seen]
    if extra:
        rows.append(("objective heads", extra))
    return rows


def _count(params: list) -> tuple[int, int]:
    trainable = sum(p.numel() for p in params if p.requires_grad)
    return trainable, sum(p.numel() for p in params) - trainable


def memory_estimate(rows: list[tuple[str, list]], ema: bool) -> dict[str, float]:
    """GiB per process: every distinct parameter tensor at its dtype, plus per trainable parameter a float32
    gradient and Adam's two float32 moments, plus a float32 EMA copy of the student's trainable parameters."""
    seen: set = set()
    out = {"frozen weights": 0, "trainable weights": 0, "gradients": 0, "adam states": 0, "ema": 0}
    for name, params in rows:
        for p in params:
            key = (p.data_ptr(), p.numel(), p.dtype)  # a LoRA's base may be other Parameter objects on the same storage
            if key in seen:
                continue
            seen.add(key)
            size = p.numel() * p.element_size()
            if p.requires_grad:
                out["trainable weights"] += size
                out["gradients"] += p.numel() * GRAD_BYTES
                out["adam states"] += p.numel() * ADAM_BYTES
                if name == "student" and ema:
                    out["ema"] += p.numel() * 4
            else:
                out["frozen weights"] += size
    out["total"] = sum(out.values())
    return {k: v / GIB for k, v in out.items()}


def _dtypes(params: list) -> str:
    return ",".join(sorted({str(p.dtype).replace("torch.", "") for p in params})) or "-"


def dry_run_report(cfg: Config) -> str:
    """Build the run's networks (as ``Run`` does, on the CPU) and describe them; writes nothing."""
    teacher = load_teacher(resolve_teacher_path(cfg.teacher.path), cfg.teacher.guidance_scale, cfg.teacher.null_class,
                           getattr(torch, cfg.teacher.dtype))
    check_objective_settings(cfg, teacher)
    student = student_model_for(cfg, teacher)
    check_student(student, teacher)
    if cfg.objective.guidance_range is not None and not getattr(student.config, "time_cond_proj_dim", None):
        try:
            student = with_guidance_embedding(student)
        except ValueError as exc:
            raise FastdiffError(str(exc)) from exc
    generator = Generator(student_denoiser(cfg, teacher, student), cfg.student.num_steps, sigma_init(cfg, teacher),
                          cfg.student.sampler)
    fake = None
    if objective_class(cfg.objective.name).uses_fake_score:
        fake = student_like(teacher, fake_score_model(cfg, teacher, lambda message: None))
    objective = build_objective(cfg, teacher, fake, generator.denoiser)
    resolve_train_defaults(cfg, objective, teacher)  # the train.* values the run would use
    rows = _rows(teacher, student, fake.model if fake is not None else None,
                 [*objective.generator_modules(), *objective.critic_modules()])
    ema = uses_ema(cfg.train)

    lines = ["# resolved config", yaml.safe_dump(to_dict(cfg), sort_keys=False).rstrip(), "",
             "# parameters (millions)",
             f"{'network':<16}{'trainable':>12}{'frozen':>12}  dtype"]
    for name, params in rows:
        trainable, frozen = _count(params)
        lines.append(f"{name:<16}{trainable / 1e6:>12.3f}{frozen / 1e6:>12.3f}  {_dtypes(params)}")
    lines += ["", f"# estimated memory per process (GiB): weights at their dtype, float32 gradients and Adam states "
              f"of trained parameters, {'a float32 EMA of the student' if ema else 'no EMA'}; excludes activations, "
              "the latent cache and the framework's own overhead"]
    lines += [f"{k:<18}{v:>10.3f}" for k, v in memory_estimate(rows, ema).items()]
    return "\n".join(lines)
