"""Export a student as a diffusers folder that ``from_pretrained`` loads.

VP students get diffusers' ``LCMScheduler`` configured so the pipeline reproduces fastdiff's K-step
sampler exactly: ``original_inference_steps = T`` gives the same K timesteps, ``clip_sample = False``
matches fastdiff (the pipeline clamps the final image anyway), and ``timestep_scaling`` is the one the
student was trained with: a consistency-distilled (cd) student's boundary scalings (LCM's k, 10 by
default), or, for every other student, a huge value that makes them exactly ``c_skip = 0, c_out = 1`` in
float32, so each step is the student's plain x0 estimate. Then re-noising with fresh noise, as in fastdiff.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from diffusers import DDIMScheduler, DDPMPipeline, FlowMatchEulerDiscreteScheduler, LCMScheduler

from .errors import FastdiffError

PIPELINES_DIR = Path(__file__).resolve().parent.parent / "pipelines"
CLASS_COND_FILE = "pipeline_fastdiff_class_conditional.py"


def _table_config(teacher_scheduler) -> dict:
    """The teacher scheduler's noise table (betas, prediction type), without its sampling options."""
    config = dict(teacher_scheduler.config)
    for key in ("clip_sample", "thresholding", "timestep_spacing", "variance_type", "steps_offset",
                "original_inference_steps", "timestep_scaling"):
        config.pop(key, None)
    return config


def _truncated_table_config(teacher_scheduler, top_timestep: int | None) -> dict:
    """The teacher's table; for a student starting at timestep t0 < T-1, its first t0 + 1 betas, so the table is
    the teacher's, truncated, and its top timestep is t0."""
    config = _table_config(teacher_scheduler)
    T = config["num_train_timesteps"]
    if top_timestep is not None and top_timestep < T - 1:
        T = top_timestep + 1
        config.update(num_train_timesteps=T, trained_betas=[float(b) for b in teacher_scheduler.betas[:T]])
    return config


def student_scheduler(teacher_scheduler, prediction_type: str, top_timestep: int | None = None,
                      timestep_scaling: float | None = None) -> LCMScheduler:
    """LCMScheduler reproducing fastdiff's K-step sampler, on the table truncated at the student's first timestep."""
    config = _truncated_table_config(teacher_scheduler, top_timestep)
    T = config["num_train_timesteps"]
    # steps_offset 1: unused by LCM and trailing DDIM, but SD pipelines rewrite (and warn about) any other value.
    return LCMScheduler.from_config(config, original_inference_steps=T, timestep_scaling=timestep_scaling or 1e9, steps_offset=1,
                                    clip_sample=False,
                                    thresholding=False, prediction_type=prediction_type)


def deterministic_scheduler(teacher_scheduler, prediction_type: str, top_timestep: int | None = None) -> DDIMScheduler:
    """DDIMScheduler (eta 0, trailing timesteps) reproducing the ``ddim`` sampler from the student's first timestep
    t0 (the table truncated there): its K timesteps equal the LCM rule's whenever K divides t0 + 1 (1, 2, 4, 5, 8, ...
    for 1000; consistency students on epsilon teachers start where t0 + 1 is a multiple of 8)."""
    config = _truncated_table_config(teacher_scheduler, top_timestep)
    return DDIMScheduler.from_config(config, timestep_spacing="trailing", clip_sample=False, thresholding=False, steps_offset=1,
                                     set_alpha_to_one=True, prediction_type=prediction_type)


def flow_scheduler(teacher_scheduler, num_steps: int, sampler: str) -> FlowMatchEulerDiscreteScheduler:
    """FlowMatchEulerDiscreteScheduler whose K levels are fastdiff's flow levels ``t_i = 1 - i/K``.

    With shift 1 the scheduler's K timesteps are ``linspace(1, 1/T, K)``; ``shift_terminal = 1/K`` stretches
    them so the last is 1/K, which makes them exactly ``1 - i/K``. One step is ``x0 = z - v`` at t = 1, the
    same arithmetic as fastdiff. ``lcm`` students re-noise with fresh noise (``stochastic_sampling``), ``ddim``
    ones take Euler steps, which equal fastdiff's deterministic re-noising algebraically."""
    extra = {"shift_terminal": 1.0 / num_steps} if num_steps > 1 else {"shift_terminal": None}
    return FlowMatchEulerDiscreteScheduler.from_config(
        teacher_scheduler.config, shift=1.0, use_dynamic_shifting=False, invert_sigmas=False, use_karras_sigmas=False,
        use_exponential_sigmas=False, use_beta_sigmas=False, stochastic_sampling=sampler == "lcm" and num_steps > 1,
        **extra)


def scheduler_for(teacher, info: dict):
    """The scheduler an exported student samples with (see the module docstring and ``flow_scheduler``)."""
    prediction = teacher.denoiser.prediction_type
    if teacher.denoiser.schedule.kind == "flow":
        return flow_scheduler(teacher.scheduler, info["num_steps"], info.get("sampler", "lcm"))
    if info.get("sampler") == "ddim":
        return deterministic_scheduler(teacher.scheduler, prediction, info["top_timestep"])
    return student_scheduler(teacher.scheduler, prediction, info["top_timestep"], info.get("timestep_scaling"))


def _class_cond_pipeline_file() -> Path:
    try:  # installed: fastdiff.pipelines maps to the repository's pipelines/ folder
        import fastdiff.pipelines as pkg

        return Path(pkg.__file__).parent / CLASS_COND_FILE
    except ImportError:
        return PIPELINES_DIR / CLASS_COND_FILE


def _pipeline_usage(info: dict) -> str:
    steps, cls, sched = info["num_steps"], info["pipeline_class"], info["scheduler_class"]
    absent = "".join(f", {k}=None" for k in info.get("absent_components", []))  # diffusers wants them named
    call = (f"pipe(class_labels=[0, 1, 2], num_inference_steps={steps}, guidance_scale=1)" if info["num_classes"]
            else f"pipe(\"a photo of a cat\", num_inference_steps={steps}, "
            f"guidance_scale={'3.0' if info.get('guidance_embedded') else '0'}{info.get('call_args', '')})")
    note = ("# guidance_scale is an input of this student (LCM-style): one pass, no CFG\n"
            if info.get("guidance_embedded") and not info["num_classes"] else "")
    if info.get("export") == "lora":
        return (f"from diffusers import {cls}, {sched}\n"
                f"pipe = {cls}.from_pretrained(\"{info['teacher']}\"{absent})  # the teacher\n"
                "pipe.load_lora_weights(\".\")  # this folder\n"
                f"pipe.scheduler = {sched}.from_pretrained(\".\", subfolder=\"scheduler\")\n"
                f"{note}images = {call}.images")
    return (f"from diffusers import {cls}\n"
            f"pipe = {cls}.from_pretrained(\".\"{absent})\n"
            f"{note}images = {call}.images")


def model_card(info: dict) -> str:
    steps = info["num_steps"]
    usage = _pipeline_usage(info) if info.get("pipeline_class") else ("from fastdiff.pipelines import FastdiffClassConditionalPipeline\n"
             "pipe = FastdiffClassConditionalPipeline.from_pretrained(\".\")\n"
             f"images = pipe(class_labels=[0, 1, 2], num_inference_steps={steps}"
             f"{', guidance_scale=2.0' if info.get('guidance_embedded') else ''}).images\n"
             + ("# the network is fastdiff's GuidanceEmbeddedUNet: loading needs fastdiff installed"
                if info.get("guidance_embedded") else
                "# without fastdiff, run the pipeline.py in this folder (read it first):\n"
                "# DiffusionPipeline.from_pretrained(\".\", custom_pipeline=\".\", trust_remote_code=True)")
             if info["num_classes"] else
             "from diffusers import DDPMPipeline\n"
             "pipe = DDPMPipeline.from_pretrained(\".\")\n"
             f"images = pipe(batch_size=4, num_inference_steps={steps}).images")
    settings = "\n".join(f"- `{k}`: {v}" for k, v in info["settings"].items())
    scheduler_note = ("The scheduler is diffusers' `FlowMatchEulerDiscreteScheduler` with shift 1 (and `shift_terminal`\n"
                      f"1/K for K > 1): `num_inference_steps={steps}` gives fastdiff's levels t = 1 - i/K."
                      if info.get("scheduler_class") == "FlowMatchEulerDiscreteScheduler" else
                      "The scheduler is diffusers' `DDIMScheduler` (eta 0, trailing timesteps): `num_inference_steps=K`\n"
                      "reproduces fastdiff's deterministic K-step consistency sampler when K divides the table length."
                      if info.get("sampler") == "ddim" else
                      "The scheduler is diffusers' `LCMScheduler` set so that `num_inference_steps=K` reproduces fastdiff's\n"
                      "own K-step sampler (denoise, re-noise) exactly.")
    return f"""---
library_name: diffusers
tags: [fastdiff, distillation, {info['objective']}]
---
# {info['num_steps']}-step student distilled with fastdiff

- teacher: `{info['teacher']}`
- objective: `{info['objective']}`
- sampling steps trained for: {steps} (other step counts run, but were not trained)
- training steps: {info['train_step']}
- weights: {'EMA of the generator' if info['ema'] else 'generator'}

## Use

```python
{usage}
```

{scheduler_note}

## Settings

{settings}
"""


def check_exportable(model, teacher) -> None:
    """Raise if ``export_student`` cannot write this student (the trainer asks before training, not after).

    Teachers with a pipeline (latent, text-to-image) export into their own pipeline class; the rest into
    DDPMPipeline or fastdiff's class-conditional pipeline, which take a UNet2DModel (or the guidance-embedded one)
    on a VP schedule."""
    if teacher.pipeline is not None:
        return
    name, kind = type(model).__name__, teacher.denoiser.schedule.kind
    if kind != "vp" or name not in ("UNet2DModel", "GuidanceEmbeddedUNet"):
        raise FastdiffError(f"export of {name} students on a {kind} schedule is not supported yet; export supports "
                            "UNet2DModel students on a VP schedule and students of teachers with a diffusers pipeline")


def export_student(unet, teacher, info: dict, out: str | Path) -> Path:
    """Write ``out`` atomically: a diffusers pipeline folder + fastdiff.json + README.md model card.

    ``info`` holds: teacher, objective, num_steps, sigma_init, train_step, ema, settings (a dict).
    """
    out = Path(out)
    if teacher.pipeline is not None:
        return export_pipeline_student(unet, teacher, info, out)
    from .lora import is_lora, merged_model

    if is_lora(unet):  # pipelines without a latent / text part take LoRA students fused
        unet = merged_model(unet)
    check_exportable(unet, teacher)
    guided = type(unet).__name__ == "GuidanceEmbeddedUNet"
    info = _student_info(info, teacher, guided)
    scheduler = scheduler_for(teacher, info)
    if teacher.num_classes:
        from fastdiff.pipelines import FastdiffClassConditionalPipeline

        pipe = FastdiffClassConditionalPipeline(unet=unet, scheduler=scheduler)
    else:
        pipe = DDPMPipeline(unet=unet, scheduler=scheduler)

    def fill(tmp: Path) -> None:
        pipe.save_pretrained(tmp, safe_serialization=True)
        if teacher.num_classes:  # lets DiffusionPipeline.from_pretrained(out, custom_pipeline=out) work without fastdiff
            shutil.copy(_class_cond_pipeline_file(), tmp / "pipeline.py")
        _write_card(tmp, info)
    return _write_folder(out, fill)


def _student_info(info: dict, teacher, guided: bool) -> dict:
    """What fastdiff.json records about every exported student (and the model card reads)."""
    from .generator import top_timestep

    vp = teacher.denoiser.schedule.kind == "vp"
    return {**info, "num_classes": teacher.num_classes, "null_class": teacher.null_class, "guidance_embedded": guided,
            "prediction_type": teacher.denoiser.prediction_type, "format": "fastdiff-student-v1",
            "top_timestep": top_timestep(teacher.denoiser, info.get("sigma_init")) if vp else None}


def _write_card(folder: Path, info: dict) -> None:
    (folder / "fastdiff.json").write_text(json.dumps(info, indent=2, default=str))
    (folder / "README.md").write_text(model_card(info))


def _write_folder(out: Path, fill) -> Path:
    """Write a folder atomically: ``fill(tmp)`` writes into a hidden temporary folder, renamed to ``out`` at the end."""
    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    fill(tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def export_pipeline_student(model, teacher, info: dict, out: Path) -> Path:
    """A latent / text-to-image student as the teacher's own pipeline class with the student network and a
    scheduler reproducing fastdiff's sampler; a LoRA student as LoRA weights for the teacher pipeline
    (``student.lora_export`` lora), a fused full pipeline (fused), or both (the fused one in ``fused/``)."""
    from diffusers import DiffusionPipeline

    from .lora import is_lora, lora_state_dict, merged_model
    from .teacher import load_pipeline, pipeline_index

    guided = bool(getattr(model.config, "time_cond_proj_dim", None))  # LCM-style: the scale is an input
    info = _student_info(info, teacher, guided)
    scheduler = scheduler_for(teacher, info)
    index = pipeline_index(teacher.path)
    cls = type(teacher.pipeline)
    expected, _ = DiffusionPipeline._get_signature_keys(cls)
    absent = [k for k in expected if index.get(k) in (None, [None, None]) and k not in cls._optional_components]
    info.update(pipeline_class=index["_class_name"], scheduler_class=type(scheduler).__name__,
                absent_components=absent)  # e.g. SD3 without T5: from_pretrained needs them passed as None
    if "PixArt" in info["pipeline_class"] and model.config.sample_size not in (32, 64, 128):
        info["call_args"] = ", use_resolution_binning=False"  # PixArt bins only its 256/512/1024 px sizes
    lora = is_lora(model)
    mode = info.get("lora_export", "both") if lora else "fused"

    def write_pipeline(folder: Path, network) -> None:
        pipe = load_pipeline(teacher.path, index, safety_checker=True,
                             **{teacher.model_folder: network, "scheduler": scheduler})
        pipe.save_pretrained(folder, safe_serialization=True)
        _write_card(folder, {**info, "export": "pipeline"})

    def write_lora(folder: Path) -> None:  # the trainer has checked that the pipeline class loads LoRA weights
        cls.save_lora_weights(folder, **{f"{teacher.model_folder}_lora_layers": lora_state_dict(model)},
                              safe_serialization=True)
        scheduler.save_pretrained(folder / "scheduler")
        _write_card(folder, {**info, "export": "lora", "format": "fastdiff-lora-v1"})
        if mode == "both":
            write_pipeline(folder / "fused", merged_model(model))

    if mode in ("lora", "both"):
        return _write_folder(out, write_lora)
    return _write_folder(out, lambda tmp: write_pipeline(tmp, merged_model(model) if lora else model))


def load_lora_student(folder: str | Path, info: dict):
    """An exported LoRA student as a loaded teacher: the teacher pipeline with the folder's adapters applied by
    diffusers' ``load_lora_weights`` and the folder's scheduler (whose table the student was trained on)."""
    import diffusers

    from .denoiser import Denoiser
    from .schedule import schedule_from_scheduler
    from .teacher import load_teacher, prediction_type_of

    loaded = load_teacher(info["teacher_folder"])
    loaded.pipeline.load_lora_weights(str(folder))
    name = json.loads((Path(folder) / "scheduler" / "scheduler_config.json").read_text())["_class_name"]
    scheduler = getattr(diffusers, name).from_pretrained(str(folder), subfolder="scheduler")
    loaded.scheduler = loaded.pipeline.scheduler = scheduler
    loaded.denoiser = Denoiser(loaded.model, schedule_from_scheduler(scheduler), prediction_type_of(scheduler),
                               null_class=loaded.null_class)
    loaded.model.requires_grad_(False).eval()
    return loaded


def read_student_info(folder: str | Path) -> dict | None:
    path = Path(folder) / "fastdiff.json"
    return json.loads(path.read_text()) if path.is_file() else None


def student_generator(loaded, info: dict):
    """fastdiff's K-step sampler for an exported student folder loaded with ``load_teacher``: the consistency
    boundary scalings when it was trained with them, and the top of its (truncated) table as first level."""
    from .consistency import network_view
    from .generator import Generator

    d = network_view(loaded.model, loaded.denoiser, info.get("timestep_scaling"))
    return Generator(d, info["num_steps"], sampler=info.get("sampler", "lcm"))
