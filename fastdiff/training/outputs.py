"""What a run shows and hands over: sample grids during training and the exported student."""
from __future__ import annotations

import copy
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..config import Config, to_dict
from ..inference.export import export_student
from ..inference.sampling import class_labels_for, guided_cond, save_grid, to_uint8
from ..inference.students import range_middle
from ..models.lora import is_lora
from ..models.teacher import Teacher
from .setup import sigma_init, timestep_scaling
from .trackers import log_image


def sample_grid(run) -> None:
    if not run.accelerator.is_main_process:
        return
    n = run.cfg.train.num_sample_images
    rng = torch.Generator().manual_seed(run.cfg.train.seed + 12345)
    z = torch.randn((n, *run.teacher.sample_shape), generator=rng).to(run.accelerator.device)
    cond = class_labels_for(n, run.teacher.num_classes, run.accelerator.device)
    if run.text is not None:
        cond = {**(cond or {}), **run.text(run.sample_prompts())}  # fada: class labels and prompts
    gen = run.export_generator()
    if run.cfg.objective.name == "fada":  # both scales at the middle of their ranges
        cond = run.objective.student_condition(cond, n)
    else:
        cond = guided_cond(gen.denoiser.model, cond, middle_guidance(run.cfg))
    with torch.no_grad(), run.accelerator.autocast(), as_exported(gen), frozen_parts_on_device(run):
        x0 = gen(z, cond, rng=rng)
        if run.teacher.latents is not None:
            x0 = run.teacher.latents.decode(x0)
    ncol = run.teacher.num_classes or None
    path = run.out / "samples" / f"step-{run.step:08d}.png"
    save_grid(to_uint8(x0), path, ncol=ncol)
    with Image.open(path) as grid:  # the grid exactly as written, to the trackers too
        image = np.asarray(grid)
    log_image(run.accelerator, "samples", image[..., None] if image.ndim == 2 else image, run.step)


def middle_guidance(cfg) -> float | None:
    """The scale a student with an LCM guidance embedding is shown at (grids, evaluations): its range's middle."""
    return range_middle(cfg.objective.guidance_range)


@contextmanager
def as_exported(module: torch.nn.Module):
    """``module`` run as its export runs: in eval mode (dropout off) and eager. ``train.compile`` compiles networks
    in place (``nn.Module.compile``); a grid or an evaluation calls them uncompiled, so their images are the
    export's float for float (inductor's fused kernels round otherwise) and no graph is compiled for eval mode and
    no-grad, states a training step never reaches. Each submodule's mode and compiled call are restored after."""
    modes = [(m, m.training) for m in module.modules()]
    compiled = [(m, m._compiled_call_impl) for m in module.modules() if m._compiled_call_impl is not None]
    module.eval()
    for m, _ in compiled:
        m._compiled_call_impl = None  # nn.Module.__call__ then takes the eager _call_impl
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
        for m, call in compiled:
            m._compiled_call_impl = call


@contextmanager
def frozen_parts_on_device(run, text_encoders: bool = False):
    """A latent teacher's VAE on the run's device for a grid or an evaluation only (unless training encodes there);
    with ``text_encoders``, the pipeline's text encoders too (setup parks them on the CPU once the training prompts
    are encoded; an evaluation encodes its own prompts)."""
    parts = [run.teacher.latents.vae] if run.teacher.latents is not None else []
    if text_encoders and run.teacher.pipeline is not None:
        parts += [m for k, m in run.teacher.pipeline.components.items() if k.startswith("text_encoder") and m is not None]
    homes = [next(m.parameters()).device for m in parts]
    for m in parts:
        m.to(run.accelerator.device)
    try:
        yield
    finally:
        for m, home in zip(parts, homes):
            m.to(home)


def export_run(run, out: Path | None = None, num_steps: int | None = None, **options) -> Path | None:
    """The run's student exported (``options``: ``export_student``'s dtype, variant, repo_id), with the run's last
    sample grid at or before this step as the model card's picture. ``num_steps``: the step count the export is meant
    for when not ``student.num_steps`` (a progressive run's stage student: its stage's segment count)."""
    if not run.accelerator.is_main_process:
        return None
    model = run.student_weights()
    if run.cfg.objective.name == "fada":
        return export_fada(run, model, out or run.out / "student")
    if not is_lora(model):  # a LoRA student's export reads its adapters and merges into a fresh model
        model = copy.deepcopy(model).cpu().eval()
    info = {**export_info(run.cfg, run.step, run.ema is not None, run.teacher), "methods": run.methods_used(),
            "generator_updates": run.objective.generator_updates(run.step)}
    if num_steps is not None:
        info["num_steps"] = num_steps
    grids = sorted(p for p in (run.out / "samples").glob("step-*.png") if p.stem <= f"step-{run.step:08d}")
    return export_student(model, run.teacher, info, out or run.out / "student", sample_grid=grids[-1] if grids else None,
                          **options)


def export_fada(run, model, out: Path) -> Path:
    """A fada student: :class:`FastdiffMultiGuidancePipeline` (adapters merged, one pass a step told both scales)
    with the DDIM scheduler of fastdiff's ``ddim`` sampler on the teacher's whole table (FADA removes CFG's passes,
    not steps: any number of steps), plus fastdiff.json (with the default scales: the middle of each range, as the
    sample grid uses) and a README.md model card; written to a hidden sibling folder, then moved."""
    import json

    from ..inference.export import _portable, _write_folder
    from ..inference.model_card import multi_guidance_card
    from ..inference.schedulers import deterministic_scheduler
    from ..objectives.fada import export_multi_guidance

    o = run.cfg.objective
    order = o.guidance_order or "class_first"
    info = {"format": "fastdiff-fada-v1", "objective": "fada", "train_step": run.step, "guidance_order": order,
            "class_guidance_range": o.class_guidance_range, "text_guidance_range": o.text_guidance_range,
            "class_guidance_scale": sum(o.class_guidance_range) / 2,
            "text_guidance_scale": sum(o.text_guidance_range) / 2,
            "num_classes": run.teacher.num_classes, "null_class": run.teacher.null_class,
            "teacher": run.cfg.teacher.path, "teacher_folder": run.teacher.path, "methods": run.methods_used()}
    # teacher and teacher_folder relative to the export (or hub ids), like every export; both conditions: text-to-image
    info = {**_portable(info, Path(out), run.teacher), "pipeline_tag": "text-to-image"}
    # the merge reads the weights into a fresh CPU model: the trained one is left as it is
    scheduler = deterministic_scheduler(run.teacher.scheduler, run.teacher.denoiser.prediction_type)

    def fill(tmp: Path) -> None:
        export_multi_guidance(model, scheduler, tmp, order)
        (tmp / "fastdiff.json").write_text(json.dumps(info, indent=2))
        multi_guidance_card(info).save(str(tmp / "README.md"))
    return _write_folder(Path(out), fill, run.teacher)


def export_info(cfg: Config, step: int, ema: bool, teacher: Teacher) -> dict:
    # teacher_folder: the folder loaded, made relative to the export folder (or kept as a hub id) by export_student
    return {"teacher": cfg.teacher.path, "teacher_folder": teacher.path, "lora_rank": cfg.student.lora_rank, "lora_alpha": cfg.student.lora_alpha, "lora_export": cfg.student.lora_export,
            "objective": cfg.objective.name, "num_steps": cfg.student.num_steps,
            "sigma_init": sigma_init(cfg, teacher), "timestep_scaling": timestep_scaling(cfg), "sampler": cfg.student.sampler, "train_step": step, "ema": ema,
            "settings": {"teacher.guidance_scale": cfg.teacher.guidance_scale,
                         "objective": to_dict(cfg)["objective"], "train.batch_size": cfg.train.batch_size,
                         "train.lr_generator": cfg.train.lr_generator, "train.lr_critic": cfg.train.lr_critic,
                         "train.mixed_precision": cfg.train.mixed_precision, "train.ema_decay": cfg.train.ema_decay,
                         "train.ema_halflife_kimg": cfg.train.ema_halflife_kimg, "train.ema_rampup": cfg.train.ema_rampup,
                         "train.ema_sigma_rel": cfg.train.ema_sigma_rel}}
