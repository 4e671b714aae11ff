"""Load a frozen diffusers teacher (model + scheduler) and wrap it as a Denoiser."""
from __future__ import annotations

import contextlib
import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .denoiser import Denoiser
from . import flux
from ..errors import FastdiffError, read_json_object
from ..machine import offline
from .sana import flow_shift
from .schedule import FlowSchedule, schedule_from_scheduler

MODEL_FOLDERS = ("unet", "transformer")


@dataclass
class Teacher:
    """A loaded teacher: its network, its scheduler and the Denoiser view of them."""

    path: str
    model: nn.Module
    scheduler: object
    denoiser: Denoiser
    model_folder: str  # "unet" or "transformer"
    num_classes: int | None  # class-conditional teachers: number of real classes
    null_class: int | None
    pipeline: object | None = None  # latent / text teachers: the diffusers pipeline (VAE, text encoders)
    dtype: torch.dtype = torch.float32  # of the frozen networks

    @functools.cached_property
    def latents(self):
        """The VAE wrapper of a latent teacher (None for pixel-space teachers)."""
        vae = getattr(self.pipeline, "vae", None)
        if vae is None:
            return None
        from .latent import Latents

        return Latents(vae)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images the teacher makes: the decoded size for latent teachers."""
        return self.latents.image_shape(self.sample_shape) if self.latents else self.sample_shape

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        cfg = self.model.config
        if flux.takes_packed_latents(self.model):  # Flux: no sample_size; the VAE's image size, unpacked channels
            return flux.sample_shape(self.model, self.pipeline.vae)
        size = cfg.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return (cfg.in_channels, h, w)

    @property
    def conditioning(self) -> str:
        if self.num_classes:
            return "class"
        if getattr(self.pipeline, "text_encoder", None) is not None or "encoder_hidden_states" in self.denoiser._accepted:
            return "text"
        return "none"


def _resolve_folders(path: str) -> tuple[str, str]:
    """Find (model_subfolder, scheduler_subfolder) of a local teacher folder, or raise FastdiffError."""
    root = Path(path)
    index = root / "model_index.json"
    if index.is_file():
        components = read_model_index(index)
        folder = next((f for f in MODEL_FOLDERS if f in components and (root / f).is_dir()), None)
        if folder is None:
            raise FastdiffError(f"{path}: model_index.json names no unet or transformer folder that exists")
    else:
        folder = next((f for f in MODEL_FOLDERS if (root / f / "config.json").is_file()), None)
        if folder is None:
            raise FastdiffError(
                f"{path}: no diffusers model found; expected a pipeline folder (model_index.json) "
                "or a folder with unet/ or transformer/ plus scheduler/"
            )
    if not (root / "scheduler" / "scheduler_config.json").is_file():
        raise FastdiffError(f"{path}: no scheduler/scheduler_config.json next to {folder}/; add the teacher's scheduler")
    return folder, "scheduler"


def _class_from_config(path: str, subfolder: str, config_name: str):
    import diffusers

    local = Path(path) / subfolder / config_name
    if local.is_file():  # a damaged config is one line naming its file, before diffusers reads it
        name = read_json_object(local, f"restore the teacher's {subfolder}/{config_name}" if subfolder else
                                f"restore {config_name}").get("_class_name")
    else:  # hub id: let diffusers resolve the config
        from huggingface_hub import hf_hub_download

        name = json.loads(Path(hf_hub_download(path, config_name, subfolder=subfolder)).read_text())["_class_name"]
    cls = getattr(diffusers, name or "", None) or fastdiff_model_classes().get(name)
    if cls is None:
        raise FastdiffError(f"{path}/{subfolder}: class {name!r} is not a diffusers class")
    return cls


def dtype_kwargs(dtype: torch.dtype) -> dict:
    """The keyword that sets the dtype in this diffusers' ``from_pretrained``: 0.40 renamed ``torch_dtype`` to
    ``dtype`` and warns on the old name."""
    import diffusers
    from packaging.version import Version

    return {"dtype" if Version(diffusers.__version__).release >= (0, 40) else "torch_dtype": dtype}


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@contextlib.contextmanager
def loading_errors(what: str):
    """Any failure inside but fastdiff's own becomes one readable line, ``could not load {what}: {its first line}``."""
    try:
        yield
    except FastdiffError:
        raise
    except Exception as exc:  # noqa: BLE001 - any loading failure becomes one readable line
        raise FastdiffError(f"could not load {what}: {_first_line(exc)}") from exc


def load_model(path: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A single diffusers model folder (config.json + weights), e.g. a student's starting network."""
    root = Path(path)
    if not (root / "config.json").is_file():
        raise FastdiffError(f"student.model {path!r} is not a diffusers model folder (no config.json)")
    with loading_errors(f"student.model {path!r}"):
        return _class_from_config(path, "", "config.json").from_pretrained(path, **dtype_kwargs(dtype))


def fastdiff_model_classes() -> dict:
    """fastdiff's own diffusers-style models (the analytic benchmark's teacher and student, guided students)."""
    from .analytic import GaussianMixtureModel
    from .flow_map_model import FlowMapModel
    from .guidance_unet import GuidanceEmbeddedUNet
    from .mlp import MLPDenoiser

    return {"GaussianMixtureModel": GaussianMixtureModel, "MLPDenoiser": MLPDenoiser,
            "GuidanceEmbeddedUNet": GuidanceEmbeddedUNet, "FlowMapModel": FlowMapModel}


def prediction_type_of(scheduler) -> str:
    if "FlowMatch" in type(scheduler).__name__ or getattr(scheduler.config, "prediction_type", None) == "flow_prediction":
        return "flow"  # flow_prediction: DPMSolverMultistepScheduler on flow sigmas (Sana)
    return getattr(scheduler.config, "prediction_type", "epsilon")


LATENT_OR_TEXT = ("vae", "text_encoder", "text_encoder_2")


def read_model_index(path: Path) -> dict:
    """A local pipeline's model_index.json; a damaged one is a one-line error."""
    return read_json_object(path, "restore the pipeline's model_index.json")


def pipeline_index(path: str) -> dict | None:
    """The pipeline's model_index.json (local, or from the hub), or None for a bare unet/scheduler folder."""
    local = Path(path) / "model_index.json"
    if local.is_file():
        return read_model_index(local)
    if os.path.isdir(path):
        return None
    from huggingface_hub import hf_hub_download

    return json.loads(Path(hf_hub_download(path, "model_index.json")).read_text())


def load_pipeline(path: str, index: dict, dtype: torch.dtype = torch.float32, safety_checker: bool = False,
                  **components):
    """A diffusers pipeline from a teacher folder; ``components`` replace the folder's own (e.g. a student unet).

    Only classes diffusers itself defines are loaded (no remote code). Components a pipeline expects but the
    folder leaves out (SD3 without T5) are passed as None; the safety checker is loaded only when asked for.
    """
    import diffusers

    cls = getattr(diffusers, index.get("_class_name") or "", None)
    if cls is None or not issubclass(cls, diffusers.DiffusionPipeline):
        raise FastdiffError(f"{path}: pipeline class {index.get('_class_name')!r} is not a diffusers pipeline "
                            "(fastdiff loads no remote code)")
    expected, _ = diffusers.DiffusionPipeline._get_signature_keys(cls)
    given = {k: None for k in expected if k not in index or index[k] in (None, [None, None])}
    if not safety_checker:
        given.update({k: None for k in ("safety_checker", "feature_extractor") if k in expected})
    given.update(components)
    try:
        return cls.from_pretrained(path, **dtype_kwargs(dtype), **given)
    except Exception as exc:  # noqa: BLE001 - any loading failure becomes one readable line
        raise FastdiffError(f"could not load the pipeline in {path!r}: {_first_line(exc)}") from exc


def could_be_hub_id(path: str) -> bool:
    """Not a local folder, but shaped like a hub id (``owner/name``, nothing at that path, not written as a local
    path): where a teacher or student folder is missing, only such a string may still be resolved on the hub."""
    return not os.path.exists(path) and not path.startswith((".", "/", "~")) and path.count("/") == 1


def check_teacher_location(path: str) -> None:
    """Refuse a teacher path that cannot load before anything heavy runs (the CLI checks it before the trainer's
    imports): neither a local folder nor, on a machine allowed to use the hub, a hub id."""
    if os.path.isdir(path):
        return
    if not could_be_hub_id(path):
        what = "is a file, not a folder" if os.path.exists(path) else "does not exist"
        raise FastdiffError(f"teacher path {path!r} {what}; pass a local diffusers folder (teacher.path)")
    if offline():
        raise FastdiffError(f"teacher {path!r} is not a local folder and HF_HUB_OFFLINE / FASTDIFF_OFFLINE forbid the hub")


def load_teacher(path: str, guidance_scale: float = 1.0, null_class: int | None = None,
                 dtype: torch.dtype = torch.float32, load_network=None) -> Teacher:
    """Load a teacher from a local diffusers folder, or from a hub id on a machine with a network.

    Latent and text-to-image teachers (a pipeline folder with a VAE or text encoders: SD, SDXL, SD3, DiT) load
    as their whole pipeline, so VAE and prompt encoding are the pipeline's own. ``dtype`` is that of every frozen
    network. The denoising network is frozen (``requires_grad=False``, eval mode).

    ``load_network(cls, path, subfolder, dtype)``: an other way to load the denoising network of a local folder
    (``train.sharding fsdp`` loads it straight into shards); it returns None where it does not apply, and the
    network then loads whole with ``from_pretrained``.
    """
    path = str(path)
    pipeline = None
    check_teacher_location(path)
    index = pipeline_index(path)
    if index is not None and any(k in index for k in LATENT_OR_TEXT):
        given = {}
        if load_network is not None and os.path.isdir(path):
            folder = next((f for f in MODEL_FOLDERS if f in index and (Path(path) / f / "config.json").is_file()), None)
            with loading_errors(f"the {folder} of {path!r}"):
                network = folder and load_network(_class_from_config(path, folder, "config.json"), path, folder, dtype)
            given = {folder: network} if network is not None else {}
        pipeline = load_pipeline(path, index, dtype, **given)
        folder = next(f for f in MODEL_FOLDERS if getattr(pipeline, f, None) is not None)
        model, scheduler = getattr(pipeline, folder), pipeline.scheduler
    else:
        folder, sched_folder = _resolve_folders(path) if os.path.isdir(path) else ("unet", "scheduler")
        with loading_errors(f"teacher from {path!r}"):
            model_cls = _class_from_config(path, folder, "config.json")
            sched_cls = _class_from_config(path, sched_folder, "scheduler_config.json")
            model = load_network(model_cls, path, folder, dtype) if load_network and os.path.isdir(path) else None
            if model is None:
                model = model_cls.from_pretrained(path, subfolder=folder, **dtype_kwargs(dtype))
            scheduler = sched_cls.from_pretrained(path, subfolder=sched_folder)
    model.requires_grad_(False).eval()
    if pipeline is not None:
        for part in pipeline.components.values():
            if isinstance(part, nn.Module):
                part.requires_grad_(False).eval()

    num_classes = None
    cfg = model.config
    if getattr(cfg, "num_class_embeds", None):
        # fastdiff's convention (and the reference teachers'): the last embedding is the null class.
        num_classes = cfg.num_class_embeds - 1
        null_class = cfg.num_class_embeds - 1 if null_class is None else null_class
    elif getattr(cfg, "num_embeds_ada_norm", None) and "DiT" in type(model).__name__:
        num_classes = cfg.num_embeds_ada_norm  # DiT's label table has one extra row: the null class
        null_class = num_classes if null_class is None else null_class
    elif getattr(cfg, "class_conditional", False):  # the analytic teacher: class k is mode k, then null
        num_classes = len(cfg.weights)
        null_class = num_classes if null_class is None else null_class

    if null_class is not None and num_classes is not None and not 0 <= null_class <= num_classes:
        raise FastdiffError(f"teacher.null_class {null_class} is not one of {path}'s class labels 0..{num_classes}")
    if flux.takes_packed_latents(model):  # the shift resolved at the teacher's size; guidance as embedding input
        schedule, guidance_scale = flux.teacher_setup(model, scheduler, pipeline, guidance_scale)
    else:
        schedule = schedule_from_scheduler(scheduler)
    if flow_shift(scheduler) is not None:  # DPMSolver's flow sigmas call their shift flow_shift (Sana folders)
        schedule = FlowSchedule(schedule.num_train_timesteps, flow_shift(scheduler))
    denoiser = Denoiser(model, schedule, prediction_type_of(scheduler),
                        null_class=null_class, guidance_scale=guidance_scale)
    teacher = Teacher(path, model, scheduler, denoiser, folder, num_classes, null_class, pipeline, dtype)
    if guidance_scale != 1 and not flux.takes_packed_latents(model):  # Flux: the scale is an embedding input
        require_condition(teacher, f"classifier-free guidance (scale {guidance_scale})")
    return teacher


def require_condition(teacher: Teacher, what: str) -> None:
    """Refuse CFG (``what``: the setting asking for it) on a teacher without class labels or text: checked before a
    run writes anything, as the guided pass would fail at its first step."""
    if teacher.conditioning == "none":
        raise FastdiffError(f"{what} needs a class- or text-conditional teacher; {teacher.path} is unconditional: "
                            "leave the guidance scale at 1")
