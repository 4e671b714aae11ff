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

from diffusers import DDIMScheduler, DDPMPipeline, LCMScheduler

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


def student_scheduler(teacher_scheduler, prediction_type: str, top_timestep: int | None = None,
                      timestep_scaling: float | None = None) -> LCMScheduler:
    """LCMScheduler reproducing fastdiff's K-step sampler; a student starting at timestep t0 < T-1 gets the
    teacher's first t0 + 1 betas, so its table is the teacher's, truncated, and its top timestep is t0."""
    config = _table_config(teacher_scheduler)
    T = config["num_train_timesteps"]
    if top_timestep is not None and top_timestep < T - 1:
        T = top_timestep + 1
        config.update(num_train_timesteps=T, trained_betas=[float(b) for b in teacher_scheduler.betas[:T]])
    return LCMScheduler.from_config(config, original_inference_steps=T, timestep_scaling=timestep_scaling or 1e9,
                                    clip_sample=False,
                                    thresholding=False, prediction_type=prediction_type)


def deterministic_scheduler(teacher_scheduler, prediction_type: str) -> DDIMScheduler:
    """DDIMScheduler (eta 0, trailing timesteps) reproducing the ``ddim`` sampler from the top of the schedule:
    its K timesteps equal the LCM rule's whenever K divides T (1, 2, 4, 5, 8, ... for T = 1000)."""
    return DDIMScheduler.from_config(_table_config(teacher_scheduler), timestep_spacing="trailing", clip_sample=False, thresholding=False,
                                     set_alpha_to_one=True, prediction_type=prediction_type)


def _class_cond_pipeline_file() -> Path:
    try:  # installed: fastdiff.pipelines maps to the repository's pipelines/ folder
        import fastdiff.pipelines as pkg

        return Path(pkg.__file__).parent / CLASS_COND_FILE
    except ImportError:
        return PIPELINES_DIR / CLASS_COND_FILE


def model_card(info: dict) -> str:
    steps = info["num_steps"]
    usage = ("from fastdiff.pipelines import FastdiffClassConditionalPipeline\n"
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
    scheduler_note = ("The scheduler is diffusers' `DDIMScheduler` (eta 0, trailing timesteps): `num_inference_steps=K`\n"
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


def export_student(unet, teacher, info: dict, out: str | Path) -> Path:
    """Write ``out`` atomically: a diffusers pipeline folder + fastdiff.json + README.md model card.

    ``info`` holds: teacher, objective, num_steps, sigma_init, train_step, ema, settings (a dict).
    """
    out = Path(out)
    guided = type(unet).__name__ == "GuidanceEmbeddedUNet"
    if teacher.denoiser.schedule.kind != "vp" or (type(unet).__name__ != "UNet2DModel" and not guided):
        raise FastdiffError(f"export of {type(unet).__name__} students on a {teacher.denoiser.schedule.kind} "
                            "schedule is not supported yet; export supports UNet2DModel with a VP scheduler")
    info = {**info, "num_classes": teacher.num_classes, "null_class": teacher.null_class, "guidance_embedded": guided,
            "prediction_type": teacher.denoiser.prediction_type, "format": "fastdiff-student-v1"}
    from .generator import top_timestep

    top = top_timestep(teacher.denoiser, info.get("sigma_init"))
    info["top_timestep"] = top
    if info.get("sampler") == "ddim":
        scheduler = deterministic_scheduler(teacher.scheduler, teacher.denoiser.prediction_type)
    else:
        scheduler = student_scheduler(teacher.scheduler, teacher.denoiser.prediction_type, top,
                                      info.get("timestep_scaling"))
    if teacher.num_classes:
        from fastdiff.pipelines import FastdiffClassConditionalPipeline

        pipe = FastdiffClassConditionalPipeline(unet=unet, scheduler=scheduler)
    else:
        pipe = DDPMPipeline(unet=unet, scheduler=scheduler)

    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    if teacher.num_classes:  # lets DiffusionPipeline.from_pretrained(out, custom_pipeline=out) work without fastdiff
        shutil.copy(_class_cond_pipeline_file(), tmp / "pipeline.py")
    (tmp / "fastdiff.json").write_text(json.dumps(info, indent=2, default=str))
    (tmp / "README.md").write_text(model_card(info))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


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
