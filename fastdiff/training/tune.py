"""``fastdiff tune``: fine-tune an exported student toward a folder of target images with PSO (pairwise sample
optimisation, ``objectives/pso.py``), then export it as a student folder like the one it came from.

A tune is not a distillation run: there is no teacher and no fake score, only the student, a frozen copy of it as it
was (PSO's reference policy) and two image sources, the targets (a folder) and the student's own samples. So it is
this short loop of its own rather than a ``Trainer`` configuration: one process, AdamW with gradient clipping as
Diffusion-DPO trains (its defaults: weight decay 0.01, clip 1.0), float32 master weights.

Each update draws ``batch_size`` targets, samples as many references with the student's K-step sampler (the frozen
initial student: offline PSO; ``online: true``: the current one) under the same condition, picks one of the student's
K levels and one noise per pair, and takes a step on the PSO loss. A flow-map (meanflow, ayf) student's step at level
k is its map to the next level (the data after the last): both networks are told that level while the pair is scored
(``mapping_to_next_level``), so the loss is that of the x0 estimate its sampler uses there; the export still samples
any K.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
import typing
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import flat_config
from ..errors import FastdiffError
from ..inference.students import (check_guidance_in_range, embedded_guidance_default, load_flow_map_student,
                                  parse_levels, read_student_info, student_generator, teacher_location)
from ..inference.sampling import guided_cond, save_grid, to_uint8
from ..machine import progress
from ..models.teacher import Teacher, load_teacher
from ..objectives.pso import pso_loss
from .data import IMAGE_SUFFIXES, as_model_range, load_image_folder
from .networks import trainable_copy


@dataclass
class TuneConfig:
    """``fastdiff tune --set KEY=VALUE`` keys."""

    steps: int = 200  # optimizer updates
    batch_size: int = 4  # (target, reference) pairs per update
    lr: float = 1e-5
    beta: float = 5000.0  # the Bradley-Terry temperature; Diffusion-DPO's beta_dpo for SD1.5 / SDXL (launchers/*.sh)
    online: bool = False  # references from the current student (online PSO) instead of the frozen initial one
    class_label: typing.Optional[int] = None  # class-conditional students: the class of the targets (required)
    # guidance-embedded students (objective.guidance_range): the scale they are tuned at, which the references are
    # sampled with and both networks are told (null: the range's middle, as grids and evaluations show them)
    guidance_scale: typing.Optional[float] = None
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int = 0
    num_sample_images: int = 16  # the model card's grid of tuned samples
    # flow-map (meanflow, ayf) students: the levels scored and sampled, as `fastdiff sample --levels` takes them
    # (table, flow, or timesteps such as 999,256); null: the table's, which the exported scheduler steps on
    levels: typing.Optional[str] = None


def tune_config(overrides: list[str]) -> TuneConfig:
    cfg = flat_config(TuneConfig(), overrides, positive=("steps", "batch_size", "num_sample_images"))
    if cfg.lr <= 0 or cfg.beta <= 0:
        raise FastdiffError(f"lr and beta must be positive, got lr {cfg.lr}, beta {cfg.beta}")
    parse_levels(cfg.levels, None, "levels")  # a malformed value before anything loads
    return cfg


def tuned_guidance(info: dict, cfg: TuneConfig) -> float | None:
    """The scale a guidance-embedded student is tuned at: ``guidance_scale``, else the one it samples at by default
    (``embedded_guidance_default``: the middle of its range); None for other students (which refuse it)."""
    if not info.get("guidance_embedded"):
        if cfg.guidance_scale is not None:
            fixed = info.get("embedded_guidance")
            why = (f"this Flux student is always fed the guidance value it was distilled with ({fixed})"
                   if fixed is not None else "this one has its guidance distilled in")
            raise FastdiffError(f"guidance_scale is for guidance-embedded students (objective.guidance_range); {why}")
        return None
    check_guidance_in_range(info, cfg.guidance_scale, "guidance_scale")
    scale = cfg.guidance_scale if cfg.guidance_scale is not None else embedded_guidance_default(info)
    if scale is None:
        raise FastdiffError("this guidance-embedded student's fastdiff.json names no guidance range: pass --set "
                            "guidance_scale=W, the scale to tune it at")
    return scale


def load_student(folder: str) -> tuple[Teacher, dict]:
    """(loaded, info) of an exported student folder; anything else is a one-line error."""
    if not Path(folder).is_dir():
        raise FastdiffError(f"{folder} is not a folder (expected an exported fastdiff student)")
    info = read_student_info(folder)
    if info is None:
        raise FastdiffError(f"{folder} is not an exported fastdiff student (no fastdiff.json)")
    if info.get("export") == "lora":
        raise FastdiffError(f"{folder} holds LoRA weights: tune its fused pipeline ({Path(folder) / 'fused'}), "
                            "exported beside them with student.lora_export both")
    if info.get("flow_map") and info.get("pipeline_class"):  # text-to-image flow-map exports: their own class
        return load_flow_map_student(folder, info), info
    return load_teacher(folder), info


@contextlib.contextmanager
def mapping_to_next_level(networks, denoiser, levels: torch.Tensor, k: torch.Tensor):
    """While PSO scores a flow-map (meanflow, ayf) student at its levels ``levels[k]``, both networks are told the
    level each step maps to (the next one; the data, 0, after the last), as its sampler tells them: the loss is then
    that of the x0 estimate the sampler uses at each step. Other students: nothing to tell."""
    from ..models.flow_map import flow_map_embedding, r_timestep, target_time

    if flow_map_embedding(networks[0]) is None:
        yield
        return
    following = torch.cat([levels[1:], levels.new_zeros(1)])[k.to(levels.device)]
    r = r_timestep(denoiser.schedule, following.cpu()).to(levels.device)  # (N,): each pair's, for both its halves
    with contextlib.ExitStack() as stack:
        for network in networks:
            stack.enter_context(target_time(network, r))
        yield


class Targets:
    """The target images (in the student's sample space: latents for latent students) and their conditions."""

    def __init__(self, folder: str, loaded: Teacher, class_label: int | None, device, guidance_scale=None):
        # a guidance-embedded student's conditions carry the scale it is tuned at (guided_cond; others: as they are)
        self.model, self.guidance_scale = loaded.model, guidance_scale
        root = Path(folder)
        if not root.is_dir():
            raise FastdiffError(f"--targets {folder} is not a folder")
        if not any(os.path.splitext(n)[1].lower() in IMAGE_SUFFIXES for n in os.listdir(root)):
            raise FastdiffError(f"--targets {folder}: no images (png, jpg, webp, bmp) found")
        channels, height, width = loaded.image_shape
        if height != width:
            raise FastdiffError(f"students of non-square images ({height}x{width}) cannot be tuned yet")
        images, captions = load_image_folder(folder, height, channels, "--targets")
        self.folder = folder
        self.images = as_model_range(images).to(device)
        self.latents = loaded.latents
        if self.latents is not None:  # encoded once; each draw samples the posterior
            self.latents.vae.to(device)
            self.images = self.latents.posterior(self.images)
        self.kind, self.label, self.text = loaded.conditioning, class_label, None
        if self.kind == "class":
            if class_label is None or not 0 <= class_label < loaded.num_classes:
                raise FastdiffError(f"a class-conditional student ({loaded.num_classes} classes): pass --set "
                                    f"class_label=K, the class of the targets (0 <= K < {loaded.num_classes})")
        elif class_label is not None:
            raise FastdiffError(f"class_label is for class-conditional students; this one is {self.kind}-conditioned")
        if self.kind == "text":
            if captions is None:
                raise FastdiffError(f"--targets {folder}: a text-to-image student needs captions (metadata.jsonl "
                                    "with file_name and text per image)")
            from ..models.text import PromptEncoder

            self.captions, self.text = captions, PromptEncoder(loaded.pipeline, device=device)

    def __len__(self):
        return len(self.images)

    def batch(self, n: int, rng: torch.Generator) -> tuple[torch.Tensor, dict | None]:
        idx = torch.randint(len(self.images), (n,), generator=rng)
        x = self.images[idx.to(self.images.device)]
        if self.latents is not None:
            x = self.latents.sample(x, rng)
        if self.kind == "class":
            cond = {"class_labels": torch.full((n,), self.label, device=x.device)}
        elif self.text is not None:
            cond = self.text([self.captions[i] for i in idx.tolist()])
        else:
            cond = None
        return x, guided_cond(self.model, cond, self.guidance_scale)


def _draw(shape, rng: torch.Generator, device) -> torch.Tensor:
    """Noise from the CPU generator (the same draws on every device), moved to ``device``."""
    return torch.randn(shape, generator=rng).to(device)


def tune(student_dir: str, targets_dir: str, out: str, cfg: TuneConfig, device=None, show_progress: bool = True,
         log=print) -> Path:
    """Tune the student in ``student_dir`` toward the images of ``targets_dir`` and export it to ``out``."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    loaded, info = load_student(student_dir)
    scale = tuned_guidance(info, cfg)
    level_rule = parse_levels(cfg.levels, None, "levels")
    if level_rule is not None and not info.get("flow_map"):
        raise FastdiffError("levels is for flow-map students (objective meanflow or ayf); this one samples on its own "
                            "levels")
    # bad targets fail before anything is written
    targets = Targets(targets_dir, loaded, cfg.class_label, device, scale)
    (loaded.pipeline if loaded.pipeline is not None else loaded.model).to(device)
    frozen = student_generator(loaded, info, level_rule).to(device)  # theta_0: PSO's reference policy, never trained
    tuned_model = trainable_copy(loaded.model)
    tuned = student_generator(dataclasses.replace(loaded, model=tuned_model), info, level_rule).to(device)
    opt = torch.optim.AdamW([p for p in tuned_model.parameters() if p.requires_grad], lr=cfg.lr,
                            weight_decay=cfg.weight_decay)
    rng = torch.Generator().manual_seed(cfg.seed)
    levels, shape = frozen.levels(), loaded.sample_shape  # the sampler's own: a flow-map student's given ones
    logs = {}
    with progress(total=cfg.steps, desc="tune (pso)", unit="step", enabled=show_progress) as bar:
        for _ in range(cfg.steps):
            x_target, cond = targets.batch(cfg.batch_size, rng)
            sampler = tuned if cfg.online else frozen
            with torch.no_grad():  # the student's own samples under the targets' conditions
                x_reference = sampler(_draw((cfg.batch_size, *shape), rng, device), cond, rng=rng)
            k = torch.randint(len(levels), (cfg.batch_size,), generator=rng)
            noise = _draw((cfg.batch_size, *shape), rng, device)
            with mapping_to_next_level((tuned_model, loaded.model), frozen.denoiser, levels, k):
                loss, logs = pso_loss(tuned.denoiser, frozen.denoiser, x_target, x_reference, levels[k.to(device)],
                                      noise, cond, cfg.beta)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(tuned_model.parameters(), cfg.grad_clip)
            opt.step()
            bar.update(1)
            bar.set_postfix({k: f"{float(v):.3g}" for k, v in logs.items()})
    if logs:
        log("last update: " + ", ".join(f"{k} {float(v):.4g}" for k, v in logs.items()))
    return export_tuned(tuned, loaded, info, student_dir, targets, out, cfg, device)


def export_tuned(tuned, loaded: Teacher, info: dict, student_dir: str, targets: Targets, out: str, cfg: TuneConfig,
                 device) -> Path:
    """The tuned network exported as ``student_dir`` was (same pipeline, scheduler, dtype and variant), with the
    tune's settings on its card and a grid of its samples."""
    from ..inference.export import export_student  # diffusers' pipelines: not imported for a bad --set

    recorded = str(info["teacher_folder"])
    try:  # where the original teacher is, for the card (export_student makes it relative to ``out`` again)
        teacher_folder = teacher_location(student_dir, info)
    except FastdiffError:  # a moved or missing teacher: a pipeline export does not need it
        teacher_folder = str((Path(student_dir) / recorded).resolve())
    derived = ("sample_grid", "base_model", "license", "pipeline_tag", "format", "top_timestep", "dtype", "variant")
    new_info = {k: v for k, v in info.items() if k not in derived}
    new_info.update(teacher_folder=teacher_folder, tuned={"method": "pso", "steps": cfg.steps,
                                                          "targets": Path(targets.folder).name,
                                                          "from_objective": info.get("objective"),
                                                          **({} if targets.guidance_scale is None else
                                                             {"guidance_scale": targets.guidance_scale}),
                                                          # flow-map students tuned on given levels: the pipeline's
                                                          # timesteps= that samples on them (the card says so)
                                                          **({} if cfg.levels is None else
                                                             {"timesteps": tuned.timesteps()})})
    resolved = {} if targets.guidance_scale is None else {"guidance_scale": targets.guidance_scale}  # null: the middle
    new_info["settings"] = {**info.get("settings", {}), "tune.pso": {**dataclasses.asdict(cfg), **resolved}}
    model = tuned.denoiser.model.eval()
    with tempfile.TemporaryDirectory() as tmp:
        grid = Path(tmp) / "samples.png"
        _, cond = targets.batch(cfg.num_sample_images, torch.Generator().manual_seed(cfg.seed + 12345))
        rng = torch.Generator().manual_seed(cfg.seed + 12345)
        with torch.no_grad():
            x0 = tuned(_draw((cfg.num_sample_images, *loaded.sample_shape), rng, device), cond, rng=rng)
            if loaded.latents is not None:
                x0 = loaded.latents.decode(x0)
        save_grid(to_uint8(x0), grid)
        return export_student(model.cpu(), loaded, new_info, out, sample_grid=grid, dtype=info.get("dtype"),
                              variant=info.get("variant"))

