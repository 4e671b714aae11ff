"""What a run's config decides before anything is built: the student's first noise level, which networks and data the
objective needs, the objective's options and the train.* values it fills in, the EMA's decay, the output folder."""
from __future__ import annotations

import functools
from pathlib import Path

import torch

from ..config import RUN_SHAPE_KEYS, Config
from ..errors import FastdiffError, refuse_replacing, require_folder_path
from ..models.consistency import consistency_start, network_view
from ..models.denoiser import Denoiser
from ..models.generator import Generator
from ..models.teacher import Teacher, require_condition
from ..objectives import build, entry, objective_class, teacher_options
from ..objectives.gan import GANHead
from .data import takes_text


def student_like(teacher: Teacher, model: torch.nn.Module) -> Denoiser:
    """A Denoiser for a trainable copy of the teacher (same schedule, parametrisation, null class)."""
    return network_view(model, teacher.denoiser)


def objective_options(cfg: Config) -> dict:
    """The objective.* keys the objective's constructor takes (the rest shape the networks or the trainer)."""
    return {k: v for k, v in vars(cfg.objective).items() if k not in RUN_SHAPE_KEYS}


def timestep_scaling(cfg: Config) -> float | None:
    """The consistency boundary scalings' k the student is wrapped with (cd: LCM's 10 unless set; else None)."""
    return objective_class(cfg.objective.name).boundary_timestep_scaling(objective_options(cfg))


def student_denoiser(cfg: Config, teacher: Teacher, model: torch.nn.Module) -> Denoiser:
    """The student network as the objective sees it: plain, or with the consistency boundary condition (cd)."""
    return network_view(model, teacher.denoiser, timestep_scaling(cfg))


def sigma_init(cfg: Config, teacher: Teacher | None = None) -> float | None:
    """student.sigma_init with ``auto`` resolved: 2.5 for distribution matching on VP teachers (the top with the ddim
    sampler); for consistency
    students ``consistency_start`` (1 / a_t <= 15 on epsilon VP teachers, else the top); the top for flow teachers.

    Flow students start at t = 1 (pure noise) as their pipelines do: there ``x0 = x - t v`` is well conditioned,
    unlike an epsilon student's ``x0 = (x - s eps) / a`` at the top of a VP schedule."""
    if cfg.student.sigma_init != "auto":
        return cfg.student.sigma_init
    if trains_on_data(cfg):
        return consistency_start(teacher.denoiser) if teacher is not None else None
    flow = teacher is not None and teacher.denoiser.schedule.kind == "flow"
    # the ddim sampler starts at the top by construction (TDM's reference student), so auto means the top there
    return None if flow or cfg.student.sampler == "ddim" else 2.5


def trains_on_data(cfg: Config) -> bool:
    return objective_class(cfg.objective.name).trains_on == "data"


def uses_gan(cfg: Config) -> bool:
    return cfg.objective.gan or entry(cfg.objective.name).needs_gan


def check_objective_settings(cfg: Config, teacher: Teacher) -> None:
    """Settings the objective's constructor does not see but that only make sense for some objectives."""
    o = cfg.objective
    cls = objective_class(o.name)
    if teacher.denoiser.schedule.kind == "flow" and sigma_init(cfg, teacher) is not None:
        raise FastdiffError("flow-matching students start from pure noise (t = 1), as their pipelines do: "
                            "set student.sigma_init to null or auto")
    if cfg.student.sampler == "ddim" and sigma_init(cfg, teacher) is not None and not trains_on_data(cfg):
        raise FastdiffError("student.sampler ddim starts at the top of the schedule: set student.sigma_init to null")
    backtrack = getattr(o, "backtrack", None)
    if (backtrack if backtrack is not None else entry(o.name).defaults.get("backtrack")) and cfg.train.sharding == "fsdp":
        raise FastdiffError("objective.backtrack (DisBack) does not run with train.sharding fsdp yet")
    if o.gan_readout is not None and not uses_gan(cfg):
        raise FastdiffError(f"objective.gan_readout is the GAN head's read-out, and objective {o.name} has none here: "
                            "set objective.gan=true, or leave objective.gan_readout unset")
    if uses_gan(cfg) and not cls.uses_fake_score:
        raise FastdiffError(f"objective.gan does not apply to {o.name} (the GAN head sits on a fake score)")
    if o.name == "fada" and not (teacher.num_classes and takes_text(teacher)):
        raise FastdiffError(f"objective fada needs a teacher with two conditions, class labels (num_class_embeds) and "
                            f"a text encoder; {cfg.teacher.path} is {teacher.conditioning}-conditioned")
    if o.name == "fada" and (cfg.student.lora_rank or cfg.student.model or cfg.student.skip_layers
                             or cfg.student.layer_budget):
        raise FastdiffError("objective fada trains its own adapters on a copy of the teacher: leave student.lora_rank, "
                            "student.model, student.skip_layers and student.layer_budget unset")
    T = teacher.denoiser.schedule.num_train_timesteps  # the most levels a sampler on the table can step on
    if cfg.student.num_steps > T:
        raise FastdiffError(f"student.num_steps {cfg.student.num_steps} is more than the teacher's {T} timesteps")
    if cfg.data.name == "teacher" and cfg.data.teacher_sampler == "ddim" and cfg.data.teacher_steps > T:
        raise FastdiffError(f"data.teacher_steps {cfg.data.teacher_steps} is more than the teacher's {T} timesteps "
                            "(the ddim sampler steps on them)")
    for key in ("fake_guidance", "fake_train_guidance"):  # SiD-LSG's CFG of the fake score
        if getattr(o, key, None) not in (None, 1):
            require_condition(teacher, f"objective.{key} {getattr(o, key)}")
    if cfg.student.lora_rank and (cfg.student.model or o.guidance_range is not None):
        raise FastdiffError("student.lora_rank adapts the teacher's own weights: it cannot be combined with "
                            "student.model or objective.guidance_range")
    if cls.sampler is not None and cfg.student.sampler != cls.sampler:
        raise FastdiffError(f"objective {o.name} {cls.sampler_reason}: set student.sampler={cls.sampler}")
    if cls.fused_export_reason and cfg.student.lora_export == "lora" and (cfg.student.lora_rank or cls.attaches_adapters):
        raise FastdiffError(f"objective {o.name}: {cls.fused_export_reason}; its student exports fused: set "
                            "student.lora_export=fused")
    pipe = teacher.pipeline
    if cfg.student.lora_rank and cfg.student.lora_export != "fused" and pipe is not None \
            and not hasattr(type(pipe), "save_lora_weights"):
        raise FastdiffError(f"{type(pipe).__name__} cannot load LoRA weights: set student.lora_export=fused")
    if cfg.student.lora_rank and cfg.student.lora_export == "lora" and pipe is None:
        raise FastdiffError(f"{cfg.teacher.path} has no pipeline that loads LoRA weights (DDPMPipeline and fastdiff's "
                            "class-conditional pipeline take a full UNet): set student.lora_export=fused")


def build_objective(cfg: Config, teacher: Teacher, fake: Denoiser | None, student: Denoiser):
    try:
        cls = objective_class(cfg.objective.name)
        readout = cfg.objective.gan_readout or cls.gan_readout
        gan_head = GANHead(fake, readout, teacher.sample_shape[-2:]) if uses_gan(cfg) else None
        options = teacher_options(cfg.objective.name, teacher, objective_options(cfg))
        # Consistency students train up to the level they sample from; BOOT reads its g(eps, 0) there.
        if cls.trains_on == "data" or cls.needs_sigma_init:
            options["sigma_max"] = sigma_init(cfg, teacher)
        if cls.samples_student:
            # tdm runs the student's K-step sampler itself: the same levels and re-noising as the run's generator
            student = Generator(student, cfg.student.num_steps, sigma_init(cfg, teacher), cfg.student.sampler)
        objective = build(cfg.objective.name, teacher.denoiser, fake, gan_head=gan_head, student=student, **options)
        if getattr(objective, "refl", None) is not None:  # ReFL scores decoded images: hand down the VAE (or None)
            objective.refl.latents = teacher.latents
        return objective
    except ValueError as exc:
        raise FastdiffError(str(exc)) from exc


# train.* keys whose null means "the objective's reference" (Objective.train_defaults), and what fills the rest.
TRAIN_FALLBACKS = {"adam_betas": [0.9, 0.999], "weight_decay": 0.01, "lr_warmup_steps": 0, "lr_generator": 1e-5,
                   "lr_critic": 1e-5, "grad_clip": 10.0}  # DMD2's --max_grad_norm 10


def resolve_train_defaults(cfg: Config, objective, teacher=None) -> None:
    """Fill the train.* keys left null with the objective's reference values (in place, so checkpoints and the
    export record what the run used), the teacher's own (``teacher_train_defaults``) over the objective's."""
    defaults = {**TRAIN_FALLBACKS, **objective.train_defaults(),
                **(objective.teacher_train_defaults(teacher) if teacher is not None else {})}
    for key, value in defaults.items():
        if getattr(cfg.train, key) is None:
            setattr(cfg.train, key, value)


@functools.lru_cache(maxsize=8)  # ema_beta asks every update; the root depends on the setting alone
def power_ema_exponent(sigma_rel: float) -> float:
    """EDM2's gamma for a relative width sigma_rel (Karras et al. 2024, Eq. 3 solved for gamma): the largest real
    root of ``g^3 + 7 g^2 + (16 - s^-2) g + (12 - s^-2)`` (rcm ``t2v_model_distill_rcm.py``: ``np.roots([1, 7,
    16 - s**-2, 12 - s**-2]).real.max()``; 6.94 at rCM's rate 0.1)."""
    import numpy as np

    return float(np.roots([1, 7, 16 - sigma_rel ** -2, 12 - sigma_rel ** -2]).real.max())


def ema_beta(step: int, global_batch: int, train) -> float:
    """The generator EMA's decay for update ``step`` (0-based): ``train.ema_decay`` when set; with
    ``train.ema_sigma_rel`` EDM2's power function ``(1 - 1 / (step + 1)) ** (gamma + 1)`` (rcm's ``ema_beta`` on the
    student's iteration: 0 at the first update); else SiD's / EDM's half-life in images, ramped up to ``ema_rampup``
    x the images seen before this update (sid_training_loop.py: ``0.5 ** (batch / max(min(halflife, nimg *
    rampup), 1e-8))``). The first update's beta is 0, so the EMA never keeps the student's starting weights."""
    if train.ema_decay is not None:
        return train.ema_decay
    if train.ema_sigma_rel is not None:
        return 0.0 if step < 1 else (1 - 1 / (step + 1)) ** (power_ema_exponent(train.ema_sigma_rel) + 1)
    halflife = train.ema_halflife_kimg * 1000
    if train.ema_rampup is not None:
        halflife = min(halflife, step * global_batch * train.ema_rampup)
    return 0.5 ** (global_batch / max(halflife, 1e-8))


def uses_ema(train) -> bool:
    if train.ema_decay is not None:
        return train.ema_decay != 0
    return train.ema_sigma_rel is not None or train.ema_halflife_kimg > 0


def prepare_output_dir(cfg: Config, resume: str | None, overwrite: bool) -> Path:
    out = Path(cfg.output_dir)
    require_folder_path(out, "output_dir")
    if cfg.data.name == "teacher" and cfg.data.cache_dir:  # here, before the teacher loads, not at the first batch
        require_folder_path(cfg.data.cache_dir, "data.cache_dir")
    if resume is None:  # a new run replaces output_dir with --overwrite: never the working directory or an input
        refuse_replacing(out, "output_dir", {"teacher": cfg.teacher.path, "student.model": cfg.student.model,
                                             "data.path": cfg.data.path, "data.prompts": cfg.data.prompts})
    if resume is None and out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise FastdiffError(f"output_dir {out} is not empty; pass --resume latest to continue it "
                                "or --overwrite to replace it")
    return out


