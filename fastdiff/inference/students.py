"""Exported students read back (``fastdiff sample``, ``fid``, ``clip-score``, ``tune``): their fastdiff.json, the
teacher a LoRA export loads on, and fastdiff's own K-step sampler for the folder."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import FastdiffError, read_json_object
from .export_format import FLOW_MAP_PIPELINES, is_hub_id


def load_flow_map_student(folder: str | Path, info: dict):
    """A text-to-image flow-map export (``FLOW_MAP_PIPELINES``) as a loaded teacher for ``student_generator``
    (``fastdiff sample``, ``fid``, ``clip-score``): the folder's components in the teacher's pipeline class, the
    network the in-place flow-map one (``FlowMapModel.base``), the scheduler the export's."""
    import diffusers
    import torch

    from ..models.denoiser import Denoiser
    from ..models.flow_map_model import FlowMapModel
    from ..models.schedule import schedule_from_scheduler
    from ..models.teacher import Teacher, prediction_type_of

    parent = next((k for k, (_, name) in FLOW_MAP_PIPELINES.items() if name == info.get("pipeline_class")), None)
    if parent is None:
        raise FastdiffError(f"{folder}: unknown flow-map pipeline {info.get('pipeline_class')!r}")
    model_folder = "unet" if (Path(folder) / "unet").is_dir() else "transformer"
    variant = {"variant": info["variant"]} if info.get("variant") else {}
    network = FlowMapModel.from_pretrained(folder, subfolder=model_folder, **variant).base
    absent = {k: None for k in info.get("absent_components", [])}
    pipe = getattr(diffusers, parent).from_pretrained(folder, **{model_folder: network}, **absent, **variant)
    for part in pipe.components.values():
        if isinstance(part, torch.nn.Module):
            part.requires_grad_(False).eval()
    scheduler = pipe.scheduler
    denoiser = Denoiser(network, schedule_from_scheduler(scheduler), prediction_type_of(scheduler))
    return Teacher(str(folder), network, scheduler, denoiser, model_folder, None, None, pipe)


def teacher_location(folder: str | Path, info: dict) -> str:
    """Where an export's teacher loads from: ``teacher_folder`` relative to the export folder (older exports: an
    absolute path), an ``embedded:`` teacher, or a hub id."""
    from ..models.embedded import PREFIX, resolve_teacher_path

    recorded = str(info["teacher_folder"])
    if recorded.startswith(PREFIX):
        return resolve_teacher_path(recorded)
    local = Path(folder) / recorded
    if local.is_dir():
        return str(local)
    if is_hub_id(recorded):
        return recorded
    raise FastdiffError(f"{folder}: its teacher {recorded!r} (relative to the export folder) is not there; the LoRA "
                        "weights load on top of that teacher")


def load_lora_student(folder: str | Path, info: dict):
    """An exported LoRA student as a loaded teacher: the teacher pipeline with the folder's adapters applied by
    diffusers' ``load_lora_weights`` and the folder's scheduler (whose table the student was trained on)."""
    import diffusers

    from ..models.denoiser import Denoiser
    from ..models.schedule import schedule_from_scheduler
    from ..models.teacher import load_teacher, prediction_type_of

    loaded = load_teacher(teacher_location(folder, info))
    loaded.pipeline.load_lora_weights(str(folder))
    name = json.loads((Path(folder) / "scheduler" / "scheduler_config.json").read_text())["_class_name"]
    scheduler = getattr(diffusers, name).from_pretrained(str(folder), subfolder="scheduler")
    loaded.scheduler = loaded.pipeline.scheduler = scheduler
    loaded.denoiser = Denoiser(loaded.model, schedule_from_scheduler(scheduler), prediction_type_of(scheduler),
                               null_class=loaded.null_class)
    loaded.model.requires_grad_(False).eval()
    return loaded


def read_student_info(folder: str | Path) -> dict | None:
    """An export's fastdiff.json (None where the folder has none: a teacher); a damaged one is a one-line error."""
    path = Path(folder) / "fastdiff.json"
    if not path.is_file():
        return None
    return read_json_object(path, "re-export the student with fastdiff export")


def embedded_guidance_default(info: dict) -> float | None:
    """The scale a guidance-embedded (LCM-style) student samples at when none is given: the one it was tuned at
    (``fastdiff tune``), else the middle of the range it was distilled for (where its grids and ``train.eval_every``
    showed it); None for other students, and for one whose fastdiff.json names no range."""
    if not info.get("guidance_embedded"):
        return None
    tuned = info.get("tuned", {}).get("guidance_scale")
    if tuned is not None:
        return float(tuned)
    return range_middle(distilled_guidance_range(info))


def distilled_guidance_range(info: dict) -> list | None:
    """[lo, hi], the objective.guidance_range a guidance-embedded student was distilled for (None for others)."""
    if not info.get("guidance_embedded"):
        return None
    return info.get("settings", {}).get("objective", {}).get("guidance_range")


def check_guidance_in_range(info: dict, scale: float | None, flag: str) -> None:
    """A guidance-embedded student's scale inside the range it was distilled for (objective.guidance_range, its ends
    included): outside it the w-embedding was never trained, and the images are whatever the network extrapolates
    to, so a scale there is refused rather than sampled silently."""
    g_range = distilled_guidance_range(info)
    if scale is not None and g_range and not g_range[0] <= scale <= g_range[1]:
        raise FastdiffError(f"{flag} {scale:g} is outside the range [{g_range[0]:g}, {g_range[1]:g}] this student was "
                            "distilled for (objective.guidance_range); pass a scale in it")


def range_middle(g_range) -> float | None:
    """The middle of a guidance range [lo, hi] (None for none): where an LCM-style student is shown by default."""
    return sum(g_range) / 2 if g_range else None


def parse_levels(text: str | None, steps: int | None, option: str = "--levels"):
    """A flow-map student's levels as given (``--levels``, tune's ``levels``): None, a rule name, or comma-separated
    timesteps (their number must be ``steps`` when given)."""
    if text is None or text in ("table", "flow"):
        return text
    try:
        values = [float(v) for v in str(text).split(",")]
        values = [int(v) if v == int(v) else v for v in values]  # inf / nan fail here too
    except (ValueError, OverflowError):
        raise FastdiffError(f"{option} {text!r}: use table, flow or timesteps such as 727,234 (highest first, the "
                            "first the student's own: `fastdiff sample --levels flow` prints them)") from None
    if steps is not None and steps != len(values):
        raise FastdiffError(f"{option} {text} gives {len(values)} levels: pass --steps {len(values)}")
    return values


def student_generator(loaded, info: dict, levels=None):
    """fastdiff's K-step sampler for an exported student folder loaded with ``load_teacher``: the consistency
    boundary scalings when it was trained with them, and the top of its (truncated) table as first level.
    ``levels``: a flow-map student's level rule or timesteps (``FlowMapGenerator``; None: the table's)."""
    from ..models.consistency import network_view
    from ..models.generator import Generator

    from ..models import flux

    d = network_view(loaded.model, loaded.denoiser, info.get("timestep_scaling"))
    if info.get("embedded_guidance") is not None:  # a guidance-distilled Flux student: fed the value it trained with
        flux.set_embedded_guidance(loaded.model, info["embedded_guidance"])
    if info.get("flow_map"):  # any-K map steps from one two-time student
        from ..models.flow_map import FlowMapGenerator

        try:
            return FlowMapGenerator(d, info["num_steps"], levels="table" if levels is None else levels)
        except ValueError as e:
            raise FastdiffError(f"levels {levels!r}: {e}") from None
    cls = flux.FluxGenerator if flux.takes_packed_latents(loaded.model) else Generator  # FluxPipeline's noise layout
    generator = cls(d, info["num_steps"], sampler=info.get("sampler", "lcm"))
    generator.default_guidance = embedded_guidance_default(info)  # sample_model's scale when none is given
    return generator
