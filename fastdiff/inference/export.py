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
import os
import re
import shutil
from pathlib import Path

from diffusers import DDIMScheduler, DDPMPipeline, FlowMatchEulerDiscreteScheduler, LCMScheduler
from huggingface_hub import ModelCard, ModelCardData

from ..errors import FastdiffError

PIPELINES_DIR = Path(__file__).resolve().parents[2] / "pipelines"  # the repository's pipelines/ (a source tree)
CLASS_COND_FILE = "pipeline_fastdiff_class_conditional.py"
TORCH_DTYPES = {"fp16": "float16", "bf16": "bfloat16"}  # --dtype / --variant names -> torch attribute names
SAMPLE_GRID = "samples.png"  # the run's last sample grid, shown by the model card


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


def flux_scheduler(teacher_scheduler, num_steps: int, sampler: str) -> FlowMatchEulerDiscreteScheduler:
    """``flow_scheduler`` for FluxPipeline, which passes ``sigmas = linspace(1, 1/K, K)`` (fastdiff's levels
    ``t = 1 - i/K``, the same float32 values) and ``mu``: shift 1 without dynamic shifting leaves them as given (mu is
    then unused), and no ``shift_terminal``, whose stretch would move them by an ulp (K = 3, 5, 6, 7). An ``lcm``
    student re-noises with fresh noise at every K it is called with (at K = 1 the step's noise is multiplied by 0)."""
    config = flow_scheduler(teacher_scheduler, num_steps, sampler).config
    return FlowMatchEulerDiscreteScheduler.from_config(config, shift_terminal=None,
                                                       stochastic_sampling=sampler == "lcm")


def scheduler_for(teacher, info: dict):
    """The scheduler an exported student samples with (see the module docstring and ``flow_scheduler``)."""
    prediction = teacher.denoiser.prediction_type
    if type(teacher.pipeline).__name__ == "FluxPipeline":
        return flux_scheduler(teacher.scheduler, info["num_steps"], info.get("sampler", "lcm"))
    if teacher.denoiser.schedule.kind == "flow":
        source = teacher.scheduler
        if "FlowMatch" not in type(source).__name__:  # DPMSolver on flow sigmas (Sana): only its table length carries
            source = FlowMatchEulerDiscreteScheduler(num_train_timesteps=source.config.num_train_timesteps)
        return flow_scheduler(source, info["num_steps"], info.get("sampler", "lcm"))
    if info.get("sampler") == "ddim":
        return deterministic_scheduler(teacher.scheduler, prediction, info["top_timestep"])
    return student_scheduler(teacher.scheduler, prediction, info["top_timestep"], info.get("timestep_scaling"))


def tcd_scheduler(scheduler):
    """Hyper-SD's sampler beside the exact one: diffusers' TCDScheduler on the exported table, its K timesteps
    fastdiff's for every K (``original_inference_steps`` = the table length). Its step count and ``eta`` (TCD's gamma)
    are call arguments, so one config serves 1, 2, 4 and 8 steps; at eta 0 its steps are the DDIM sampler's except the
    last, which stops at timestep 0 (``a_0 x0 + s_0 eps``) instead of returning x0."""
    from diffusers import TCDScheduler

    return TCDScheduler.from_config(scheduler.config, original_inference_steps=scheduler.config.num_train_timesteps)


# step counts a flow export's per-K schedulers are written for (``scheduler_k{K}/``), beside the student's own
FLOW_STEP_COUNTS = (1, 2, 4, 8)


def flow_schedulers_per_k(info: dict) -> bool:
    """Whether an export needs ``scheduler_k{K}/`` folders: SD3- and Sana-style flow exports, whose scheduler holds K
    (``shift_terminal = 1/K``); FluxPipeline passes every K's levels itself."""
    return info.get("scheduler_class") == "FlowMatchEulerDiscreteScheduler" and \
        info.get("pipeline_class") != "FluxPipeline"


def _save_schedulers(scheduler, folder: Path, info: dict) -> None:
    """Beside a pipeline or LoRA export: a hyper-sd student's TCD scheduler in ``scheduler_tcd/``; a flow export's
    scheduler for each other K of ``FLOW_STEP_COUNTS`` in ``scheduler_k{K}/`` (a consistency student samples any K,
    and SD3's and Sana's pipelines take the levels from the scheduler's config)."""
    if str(info.get("objective", "")).startswith("hyper-sd"):
        tcd_scheduler(scheduler).save_pretrained(folder / "scheduler_tcd")
    if flow_schedulers_per_k(info):
        for k in FLOW_STEP_COUNTS:
            if k != info["num_steps"]:
                flow_scheduler(scheduler, k, info.get("sampler", "lcm")).save_pretrained(folder / f"scheduler_k{k}")


def _class_cond_pipeline_file() -> Path:
    try:  # installed: fastdiff.pipelines maps to the repository's pipelines/ folder
        import fastdiff.pipelines as pkg

        return Path(pkg.__file__).parent / CLASS_COND_FILE
    except ImportError:
        return PIPELINES_DIR / CLASS_COND_FILE


def _load_args(info: dict) -> str:
    """``from_pretrained`` keywords for the exported weights' dtype and variant (diffusers' own names)."""
    dtype = info.get("dtype")
    if not dtype:
        return ""
    from ..models.teacher import dtype_kwargs

    (key,) = dtype_kwargs(None)  # torch_dtype, or dtype from diffusers 0.40 on
    variant = f", variant=\"{info['variant']}\"" if info.get("variant") else ""
    return f"{variant}, {key}=torch.{TORCH_DTYPES[dtype]}"


# diffusers (0.42) loads a network class of a library not its own only from a module already imported
FLOW_MAP_IMPORT = "from fastdiff import FlowMapModel  # noqa: F401 - imports the network's module for diffusers\n"
GUIDANCE_IMPORT = "from fastdiff import GuidanceEmbeddedUNet  # noqa: F401 - imports the network's module for diffusers\n"


def _pipeline_usage(info: dict, where: str = ".") -> str:
    steps, cls, sched = info["num_steps"], info["pipeline_class"], info["scheduler_class"]
    absent = "".join(f", {k}=None" for k in info.get("absent_components", []))  # diffusers wants them named
    call = (f"pipe(class_labels=[0, 1, 2], num_inference_steps={steps}, guidance_scale=1)" if info["num_classes"]
            else f"pipe(\"a photo of a cat\", num_inference_steps={steps}, "
            f"guidance_scale={_call_guidance(info)}{info.get('call_args', '')})")
    note = ("# guidance_scale is an input of this student (LCM-style): one pass, no CFG\n"
            if info.get("guidance_embedded") and not info["num_classes"] else "")
    torch_import = "import torch\n" if info.get("dtype") else ""
    if info.get("flow_map"):  # fastdiff's own pipeline class, its file in the folder (FLOW_MAP_PIPELINES)
        module = next(f[:-3] for f, name in FLOW_MAP_PIPELINES.values() if name == cls)
        return (f"{torch_import}{FLOW_MAP_IMPORT}from fastdiff.pipelines import {cls}\n"
                f"pipe = {cls}.from_pretrained(\"{where}\"{absent}{_load_args(info)})\n"
                "images = pipe(\"a photo of a cat\", num_inference_steps=2).images  # any step count: one flow-map "
                "student\n# or, with the pipeline file in this folder (the network still needs fastdiff):\n"
                "# DiffusionPipeline.from_pretrained(\n"
                f"#     \"{where}\", custom_pipeline=\"{module}\", trust_remote_code=True{absent})")
    if info.get("export") == "lora":
        return (f"{torch_import}from diffusers import {cls}, {sched}\n"
                f"pipe = {cls}.from_pretrained(\"{info['teacher']}\"{absent}{_load_args(info)})  # the teacher\n"
                f"pipe.load_lora_weights(\"{where}\")  # this folder\n"
                f"pipe.scheduler = {sched}.from_pretrained(\"{where}\", subfolder=\"scheduler\")\n"
                f"{note}images = {call}.images")
    nasa = ("# a negative prompt in the same one pass (NASA, SNOOPI), with fastdiff installed: the same call on\n"
            f"# fastdiff.pipelines.FastdiffNASAPipeline.from_pretrained(\"{where}\"), plus negative_prompt=\"blurry\", "
            "nasa_scale=0.5\n" if cls == "StableDiffusionPipeline" else "")
    return (f"{torch_import}from diffusers import {cls}\n"
            f"pipe = {cls}.from_pretrained(\"{where}\"{absent}{_load_args(info)})\n"
            f"{note}images = {call}.images\n{nasa}").rstrip("\n")


def _call_guidance(info: dict):
    """The pipeline call's guidance_scale: a guidance-distilled (Flux) student's embedded value, an LCM-style
    student's example scale, else 0 (no CFG: the student's guidance is distilled in)."""
    if info.get("embedded_guidance") is not None:
        return info["embedded_guidance"]
    return "3.0" if info.get("guidance_embedded") else "0"


def card_data(info: dict) -> ModelCardData:
    """The card's metadata, as diffusers' ``load_or_create_model_card`` / ``populate_model_card`` write it: the
    library, the teacher as ``base_model`` (when its hub id is known), the teacher card's license, the task and tags."""
    tags = ["fastdiff", info["objective"], "diffusers", "distillation"]
    if info.get("pipeline_tag") == "text-to-image":
        tags.append("text-to-image")
    if info.get("export") == "lora":
        tags.append("lora")
    license_ = info.get("license") or {}
    return ModelCardData(library_name="diffusers", base_model=info.get("base_model"), license=license_.get("license"),
                         license_name=license_.get("license_name"), license_link=license_.get("license_link"),
                         pipeline_tag=info.get("pipeline_tag"), tags=tags)


def model_card(info: dict, where: str = ".") -> ModelCard:
    """The export's README.md: metadata (``card_data``), the sample grid, and the exact call that loads and samples
    the folder (``where``: "." for the folder itself, or the hub repo id it is pushed to)."""
    body = model_card_body(info, where)
    return ModelCard(f"---\n{card_data(info).to_yaml()}\n---\n{body}")


def _shown(value):
    """A setting as the card shows it: a section without its null (= default) keys."""
    return {k: v for k, v in value.items() if v is not None} if isinstance(value, dict) else value


def model_card_body(info: dict, where: str = ".") -> str:
    steps = info["num_steps"]
    load = f"\"{where}\"{_load_args(info)}"
    usage = _pipeline_usage(info, where) if info.get("pipeline_class") else (
             ("import torch\n" if info.get("dtype") else "") + FLOW_MAP_IMPORT +
             "from fastdiff.pipelines.pipeline_fastdiff_flow_map import FastdiffFlowMapPipeline\n"
             f"pipe = FastdiffFlowMapPipeline.from_pretrained({load})\n"
             "images = pipe(batch_size=4, num_inference_steps=2).images  # any step count: one flow-map student"
             if info.get("flow_map") else (
             ("import torch\n" if info.get("dtype") else "") + (GUIDANCE_IMPORT if info.get("guidance_embedded") else "") +
             "from fastdiff.pipelines import FastdiffClassConditionalPipeline\n"
             f"pipe = FastdiffClassConditionalPipeline.from_pretrained({load})\n"
             f"images = pipe(class_labels=[0, 1, 2], num_inference_steps={steps}"
             f"{', guidance_scale=2.0' if info.get('guidance_embedded') else ''}).images\n"
             + ("# the network is fastdiff's GuidanceEmbeddedUNet: loading needs fastdiff installed and imported"
                if info.get("guidance_embedded") else
                "# without fastdiff, run the pipeline.py in this folder (read it first):\n"
                "# DiffusionPipeline.from_pretrained(\".\", custom_pipeline=\".\", trust_remote_code=True)")
             if info["num_classes"] else
             ("import torch\n" if info.get("dtype") else "") +
             "from diffusers import DDPMPipeline\n"
             f"pipe = DDPMPipeline.from_pretrained({load})\n"
             f"images = pipe(batch_size=4, num_inference_steps={steps}).images"))
    settings = "\n".join(f"- `{k}`: {_shown(v)}" for k, v in info["settings"].items())
    scheduler_note = ("Each step maps to the next level, told to the network as `r_timestep` (the last to the data), with\n"
                      f"diffusers' `{info.get('scheduler_class', 'DDIMScheduler')}`: one student samples any "
                      "`num_inference_steps`,\nor on the levels given as `timesteps=[...]` (highest first, the first "
                      "the student's own)." + (
                          f"\nFor two steps pass `timesteps={info['flow_levels_2']}`: levels uniform in flow time, better "
                          "than the default's\nat two steps (not at four) on fastdiff's analytic benchmark."
                          if info.get("flow_levels_2") else "")
                      if info.get("flow_map") else
                      "The scheduler is diffusers' `FlowMatchEulerDiscreteScheduler` with shift 1: FluxPipeline passes "
                      "fastdiff's levels\nt = 1 - i/K for every `num_inference_steps=K`."
                      if info.get("pipeline_class") == "FluxPipeline" else
                      "The scheduler is diffusers' `FlowMatchEulerDiscreteScheduler` with shift 1 (and `shift_terminal`\n"
                      f"1/K for K > 1): `num_inference_steps={steps}` gives fastdiff's levels t = 1 - i/K. For another "
                      "K (1, 2, 4, 8)\nload its own: `pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained("
                      "\".\", subfolder=\"scheduler_k2\")`."
                      if info.get("scheduler_class") == "FlowMatchEulerDiscreteScheduler" else
                      "The scheduler is diffusers' `DDIMScheduler` (eta 0, trailing timesteps): `num_inference_steps=K`\n"
                      "reproduces fastdiff's deterministic K-step consistency sampler when K divides the table length."
                      if info.get("sampler") == "ddim" else
                      "The scheduler is diffusers' `LCMScheduler` set so that `num_inference_steps=K` reproduces fastdiff's\n"
                      "own K-step sampler (denoise, re-noise) exactly.")
    grid = f"\n![samples from the student]({info['sample_grid']})\n" if info.get("sample_grid") else ""
    weights = f"- weights stored as: {info['dtype']}" + (f" (variant `{info['variant']}`)" if info.get("variant") else "") \
        + "\n" if info.get("dtype") else ""
    title = "Flow-map student (any step count)" if info.get("flow_map") else f"{info['num_steps']}-step student"
    steps_line = ("- sampling steps: any step count, one student (K = 1, 2, 4, 8, ...: each step a trained map from one "
                  "noise level to the next)" if info.get("flow_map") else
                  f"- sampling steps trained for: {steps} (other step counts run, but were not trained)")
    return f"""# {title} distilled with fastdiff
{grid}
- teacher: `{info['teacher']}`
- objective: `{info['objective']}`
{steps_line}
- training steps: {info['train_step']}
- weights: {'EMA of the generator' if info['ema'] else 'generator'}
{weights}
## Use

```python
{usage}
```

{scheduler_note}

## Settings

{settings}
"""


FADA_CARD_STEPS = 25  # the card's example step count: FADA removes CFG's extra passes, not the teacher's steps


def multi_guidance_card(info: dict, where: str = ".") -> ModelCard:
    """A fada export's README.md: metadata (``card_data``) and the call that loads the folder and samples it at the
    export's default scales (``class_guidance_scale`` / ``text_guidance_scale`` in fastdiff.json), the prompts
    encoded by the teacher's own text encoder (the folder holds the UNet and the scheduler only)."""
    (c_lo, c_hi), (t_lo, t_hi) = info["class_guidance_range"], info["text_guidance_range"]
    s_c, s_t = info["class_guidance_scale"], info["text_guidance_scale"]
    body = f"""# FADA student distilled with fastdiff: two guidance scales, one UNet pass a step

- teacher: `{info['teacher']}`
- objective: `fada`: the teacher's nested classifier-free guidance of a class label and a text condition
  (`{info['guidance_order']}`: three passes a step) distilled into one pass told both scales
- guidance scales trained for: class {c_lo} to {c_hi}, text {t_lo} to {t_hi}; defaults (`fastdiff sample`): class
  {s_c}, text {s_t}
- sampling steps: any (DDIM on the teacher's table, eta 0; FADA removes CFG's passes, not steps)
- training steps: {info['train_step']}

## Use

```python
import torch
from transformers import CLIPTextModel, CLIPTokenizer
from fastdiff.pipelines import FastdiffMultiGuidancePipeline  # model_index.json names this fastdiff class

pipe = FastdiffMultiGuidancePipeline.from_pretrained("{where}")
teacher = "{info['teacher']}"  # its tokenizer and text encoder encode the prompts, as in training
tokenizer = CLIPTokenizer.from_pretrained(teacher, subfolder="tokenizer")
text_encoder = CLIPTextModel.from_pretrained(teacher, subfolder="text_encoder")
ids = tokenizer(["a photo of a shoe", "a red bag"], padding="max_length", max_length=tokenizer.model_max_length,
                truncation=True, return_tensors="pt").input_ids
with torch.no_grad():
    prompt_embeds = text_encoder(ids)[0]  # what StableDiffusionPipeline.encode_prompt returns
images = pipe(class_labels=[0, 1], prompt_embeds=prompt_embeds, class_guidance_scale={s_c},
              text_guidance_scale={s_t}, num_inference_steps={FADA_CARD_STEPS}).images  # one UNet call a step
```

The same pipeline class run on the teacher's UNet samples the three-pass nested guidance the student learned.
"""
    return ModelCard(f"---\n{card_data(info).to_yaml()}\n---\n{body}")


def check_exportable(model, teacher) -> None:
    """Raise if ``export_student`` cannot write this student (the trainer asks before training, not after).

    Teachers with a pipeline (latent, text-to-image) export into their own pipeline class; the rest into
    DDPMPipeline or fastdiff's class-conditional pipeline, which take a UNet2DModel (or the guidance-embedded one)
    on a VP schedule; flow-map students of pipeline teachers into fastdiff's flow-map pipeline for that class."""
    if teacher.pipeline is not None:
        from ..models.flow_map import flow_map_embedding

        if flow_map_embedding(model) is not None:
            check_flow_map_exportable(model, type(teacher.pipeline).__name__)
        return
    name, kind = type(model).__name__, teacher.denoiser.schedule.kind
    if kind != "vp" or name not in ("UNet2DModel", "GuidanceEmbeddedUNet", "FlowMapModel"):
        raise FastdiffError(f"export of {name} students on a {kind} schedule is not supported yet; export supports "
                            "UNet2DModel students on a VP schedule and students of teachers with a diffusers pipeline")


def weight_options(dtype: str | None, variant: str | None) -> dict:
    """``export_student``'s dtype / variant from ``fastdiff export --dtype / --variant``: a variant's files hold weights
    of its own dtype (diffusers' convention: ``variant="fp16"`` files are float16), so the dtype follows the variant."""
    if dtype not in (None, "fp32", *TORCH_DTYPES):
        raise FastdiffError(f"--dtype must be fp32, fp16 or bf16, got {dtype!r}")
    if variant not in (None, *TORCH_DTYPES):
        raise FastdiffError(f"--variant must be fp16 or bf16, got {variant!r}")
    if variant and dtype not in (None, variant):
        raise FastdiffError(f"--variant {variant} files hold {variant} weights: leave --dtype out or pass --dtype {variant}")
    dtype = variant or (None if dtype == "fp32" else dtype)
    return {"dtype": dtype, "variant": variant}


def export_student(unet, teacher, info: dict, out: str | Path, sample_grid: str | Path | None = None,
                   dtype: str | None = None, variant: str | None = None, repo_id: str | None = None) -> Path:
    """Write ``out`` atomically: a diffusers pipeline folder + fastdiff.json + README.md model card.

    ``info`` holds: teacher, teacher_folder (the folder loaded), objective, num_steps, sigma_init, train_step, ema,
    settings (a dict). ``sample_grid``: a PNG shown by the card; ``dtype`` (fp16 / bf16) casts every saved weight;
    ``variant`` names the weight files as diffusers' variants; ``repo_id``: the hub repo the card's call loads from
    (default: the folder itself). No file of the export holds an absolute local path (see ``_portable``).
    """
    out = Path(out)
    weight_options(dtype, variant)
    from ..models.layer_skip import exportable

    unet = exportable(unet)  # a budget-conditioned student: the plain, smaller transformer at its export budget
    info = {**info, "dtype": dtype, "variant": variant}
    card = {"grid": Path(sample_grid) if sample_grid else None, "where": repo_id or ".", "teacher": teacher}
    if teacher.pipeline is not None:
        from ..models.flow_map import flow_map_embedding

        if flow_map_embedding(unet) is not None:  # the teacher's pipeline would drop the r embedding: fastdiff's
            return export_flow_map_pipeline_student(unet, teacher, info, out, card)  # flow-map pipeline for it
        return export_pipeline_student(unet, teacher, info, out, card)
    from ..models.lora import is_lora, merged_model

    if is_lora(unet):  # pipelines without a latent / text part take LoRA students fused
        unet = merged_model(unet)
    from ..models.flow_map import FlowMapModel, flow_map_embedding

    flow_map = flow_map_embedding(unet) is not None
    if flow_map:  # a two-time (meanflow) student: its own network class and pipeline, DDIM steps told r
        unet = unet if isinstance(unet, FlowMapModel) else FlowMapModel.wrap(unet)
        info = {**info, "flow_map": True, "sampler": "ddim"}
    check_exportable(unet, teacher)
    guided = type(unet).__name__ == "GuidanceEmbeddedUNet"
    info = _student_info(info, teacher, guided)
    scheduler = scheduler_for(teacher, info)
    if flow_map:
        from fastdiff.pipelines.pipeline_fastdiff_flow_map import FastdiffFlowMapPipeline

        pipe = FastdiffFlowMapPipeline(unet=unet, scheduler=scheduler)
    elif teacher.num_classes:
        from fastdiff.pipelines import FastdiffClassConditionalPipeline

        pipe = FastdiffClassConditionalPipeline(unet=unet, scheduler=scheduler)
    else:
        pipe = DDPMPipeline(unet=unet, scheduler=scheduler)

    def fill(tmp: Path) -> None:
        _save_pipeline(pipe, tmp, dtype, variant)
        # lets DiffusionPipeline.from_pretrained(out, custom_pipeline=out) work without fastdiff
        if teacher.num_classes and not flow_map:
            shutil.copy(_class_cond_pipeline_file(), tmp / "pipeline.py")
        _write_card(tmp, info, out, card)
    return _write_folder(out, fill, teacher)


def _save_pipeline(pipe, folder: Path, dtype: str | None, variant: str | None) -> None:
    if dtype:
        import torch

        for part in pipe.components.values():
            if isinstance(part, torch.nn.Module):  # diffusers' to() warns on every model; plain to() where nothing
                keep = getattr(part, "_keep_in_fp32_modules", None)  # has to stay float32
                dtype_ = getattr(torch, TORCH_DTYPES[dtype])
                part.to(dtype_) if keep else torch.nn.Module.to(part, dtype_)
    pipe.save_pretrained(folder, safe_serialization=True, variant=variant)


def _student_info(info: dict, teacher, guided: bool) -> dict:
    """What fastdiff.json records about every exported student (and the model card reads)."""
    from ..models.generator import top_timestep

    vp = teacher.denoiser.schedule.kind == "vp"
    info = {**info, "num_classes": teacher.num_classes, "null_class": teacher.null_class, "guidance_embedded": guided,
            "prediction_type": teacher.denoiser.prediction_type, "format": "fastdiff-student-v1",
            "top_timestep": top_timestep(teacher.denoiser, info.get("sigma_init")) if vp else None}
    if info.get("flow_map") and vp:  # the card's two-step advice: flow-time levels (flow teachers' tables are those)
        from ..models.flow_map import FlowMapGenerator

        info["flow_levels_2"] = FlowMapGenerator(teacher.denoiser, 1, info.get("sigma_init"), levels="flow").timesteps(2)
    return info


def _tmp_folder(out: Path) -> Path:
    return out.parent / f".{out.name}.tmp"


def _write_card(folder: Path, info: dict, out: Path, card: dict) -> None:
    """fastdiff.json and README.md of ``folder`` (being written in ``out``'s temporary folder), with the sample grid
    copied beside them; paths recorded relative to where the folder will be (see ``_portable``)."""
    final = out / folder.relative_to(_tmp_folder(out))
    info = _portable(info, final, card["teacher"])
    if card["grid"] is not None and card["grid"].is_file():
        shutil.copy(card["grid"], folder / SAMPLE_GRID)
        info["sample_grid"] = SAMPLE_GRID
    (folder / "fastdiff.json").write_text(json.dumps(info, indent=2, default=str))
    model_card(info, card["where"] if final == out else ".").save(str(folder / "README.md"))


def _is_hub_id(name) -> bool:
    """``owner/name`` that is not a local path: what ``from_pretrained`` fetches from the Hub."""
    return (isinstance(name, str) and re.fullmatch(r"[\w.-]+/[\w.-]+", name) is not None
            and not name.startswith((".", "/", "~")) and not Path(name).exists())


def teacher_hub_id(path: str, given: str) -> str | None:
    """The teacher's hub id when known: the teacher given as one, or ``_name_or_path`` of the teacher folder's
    model_index.json / model config (diffusers writes the hub id there when a hub pipeline is saved)."""
    if _is_hub_id(given):
        return given
    root = Path(path)
    for config in (root / "model_index.json", root / "unet" / "config.json", root / "transformer" / "config.json"):
        try:
            name = json.loads(config.read_text()).get("_name_or_path")
        except (OSError, ValueError):
            continue
        if _is_hub_id(name):
            return name
    return None


def teacher_license(path: str, hub_id: str | None) -> dict:
    """license (and license_name / license_link for ``other``) of the teacher's own model card: its README.md in the
    teacher folder, else the hub repo's (from the local cache when offline); {} when it has none."""
    readme = Path(path) / "README.md"
    try:
        if not readme.is_file() and hub_id:
            from huggingface_hub import hf_hub_download

            readme = Path(hf_hub_download(hub_id, "README.md"))
        data = ModelCard.load(str(readme), ignore_metadata_errors=True).data if readme.is_file() else None
    except Exception:  # noqa: BLE001 - no card (or no network): the export simply names no license
        return {}
    if data is None:
        return {}
    return {k: getattr(data, k, None) for k in ("license", "license_name", "license_link") if getattr(data, k, None)}


def _portable(info: dict, where: Path, teacher) -> dict:
    """``info`` without local absolute paths: ``teacher_folder`` relative to the exported folder ``where`` (or the
    hub id / ``embedded:`` name it was given as), ``teacher`` by hub id when known; plus the card's metadata."""
    from ..models.embedded import PREFIX

    given, loaded = str(info["teacher"]), str(info.get("teacher_folder") or teacher.path)
    hub_id = teacher_hub_id(loaded, given)
    if given.startswith(PREFIX) or _is_hub_id(given):
        folder = given
    else:
        folder = os.path.relpath(Path(loaded).resolve(), Path(where).resolve())
    return {**info, "teacher": hub_id or (given if given.startswith(PREFIX) else folder), "teacher_folder": folder,
            "base_model": hub_id, "license": teacher_license(loaded, hub_id),
            "pipeline_tag": "text-to-image" if teacher.conditioning == "text" else "unconditional-image-generation"}


def _drop_local_names(folder: Path) -> None:
    """diffusers and transformers record where a model was loaded from (``_name_or_path``) in every config they
    save; a local absolute path there is dropped (hub ids stay)."""
    def clean(node):
        if isinstance(node, dict):
            return {k: clean(v) for k, v in node.items()
                    if not (k in ("_name_or_path", "name_or_path") and isinstance(v, str) and os.path.isabs(v))}
        return [clean(v) for v in node] if isinstance(node, list) else node

    for path in folder.rglob("*.json"):
        data = json.loads(path.read_text())
        cleaned = clean(data)
        if cleaned != data:
            path.write_text(json.dumps(cleaned, indent=2, sort_keys=True) + "\n")


TEXT_SUFFIXES = (".json", ".md", ".txt", ".py", ".yaml", ".yml")


def _check_no_local_paths(folder: Path, *roots: Path) -> None:
    """Refuse an export whose text files name a local folder (the export's own, the teacher's): a bug guard."""
    needles = {str(Path(r).resolve()) for r in roots} | {str(r) for r in roots if os.path.isabs(str(r))}
    for path in folder.rglob("*"):
        if path.suffix in TEXT_SUFFIXES and path.is_file():
            text = path.read_text(errors="replace")
            # an absolute path starts the string (or follows a quote, a space...); a relative path to the teacher
            # (../../work/teachers/x) holds the same characters after a dot
            hit = next((n for n in needles if re.search(r"(?<![\w.])" + re.escape(n), text)), None)
            if hit:
                raise FastdiffError(f"export: {path.relative_to(folder)} names the local path {hit}")


def _write_folder(out: Path, fill, teacher) -> Path:
    """Write a folder atomically: ``fill(tmp)`` writes into a hidden temporary folder, renamed to ``out`` at the end."""
    tmp = _tmp_folder(out)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    fill(tmp)
    _drop_local_names(tmp)
    _check_no_local_paths(tmp, tmp, out, Path(teacher.path))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def export_pipeline_student(model, teacher, info: dict, out: Path, card: dict) -> Path:
    """A latent / text-to-image student as the teacher's own pipeline class with the student network and a
    scheduler reproducing fastdiff's sampler; a LoRA student as LoRA weights for the teacher pipeline
    (``student.lora_export`` lora), a fused full pipeline (fused), or both (the fused one in ``fused/``)."""
    from diffusers import DiffusionPipeline

    from ..models.lora import is_lora, lora_state_dict, merged_model
    from ..models.teacher import load_pipeline, pipeline_index

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
    if info["pipeline_class"] == "SanaPipeline":  # its default is 1024 px whatever the model: name the student's size
        from ..models.sana import call_args

        info["call_args"] = call_args(model, teacher.pipeline.vae_scale_factor)
    if info["pipeline_class"] == "FluxPipeline":  # the guidance embedding's value; the size when not the default
        from ..models import flux

        info["embedded_guidance"] = flux.embedded_guidance(model)
        _, h, w = teacher.image_shape
        if (h, w) != (flux.default_image_size(teacher.pipeline),) * 2:
            info["call_args"] = f", height={h}, width={w}"
    lora = is_lora(model)
    # A guidance-embedded student's scale embedding (agd's cond_proj) is not a LoRA weight: a LoRA file loaded into
    # the teacher's pipeline would sample without it, so such students export fused only.
    mode = info.get("lora_export", "both") if lora and not guided else "fused"
    if lora:
        info["lora_export"] = mode  # the card says what was written
    dtype, variant = info.get("dtype"), info.get("variant")

    def write_pipeline(folder: Path, network) -> None:
        pipe = load_pipeline(teacher.path, index, safety_checker=True,
                             **{teacher.model_folder: network, "scheduler": scheduler})
        _save_pipeline(pipe, folder, dtype, variant)
        _save_schedulers(scheduler, folder, info)
        _write_card(folder, {**info, "export": "pipeline"}, out, card)

    def write_lora(folder: Path) -> None:  # the trainer has checked that the pipeline class loads LoRA weights
        weights = lora_state_dict(model)
        if dtype:  # LoRA files have no variants: the dtype is the one of the weights in the file
            import torch

            weights = {k: v.to(getattr(torch, TORCH_DTYPES[dtype])) for k, v in weights.items()}
        cls.save_lora_weights(folder, **{f"{teacher.model_folder}_lora_layers": weights}, safe_serialization=True)
        scheduler.save_pretrained(folder / "scheduler")
        _save_schedulers(scheduler, folder, info)
        _write_card(folder, {**info, "export": "lora", "format": "fastdiff-lora-v1", "variant": None}, out, card)
        if mode == "both":
            write_pipeline(folder / "fused", merged_model(model))

    if mode in ("lora", "both"):
        return _write_folder(out, write_lora, teacher)
    return _write_folder(out, lambda tmp: write_pipeline(tmp, merged_model(model) if lora else model), teacher)


# teacher pipeline class -> fastdiff's flow-map pipeline for its students (file in pipelines/, class)
FLOW_MAP_PIPELINES = {"StableDiffusionPipeline": ("pipeline_fastdiff_flow_map_sd.py", "FastdiffFlowMapSDPipeline"),
                      "StableDiffusion3Pipeline": ("pipeline_fastdiff_flow_map_sd3.py", "FastdiffFlowMapSD3Pipeline")}


def check_flow_map_exportable(model, pipeline_class: str) -> None:
    from ..models.lora import is_lora

    if pipeline_class not in FLOW_MAP_PIPELINES:
        raise FastdiffError(f"export of flow-map (meanflow, ayf) students of {pipeline_class} teachers is not "
                            f"supported yet; supported: {', '.join(FLOW_MAP_PIPELINES)} and pixel VP teachers")
    if is_lora(model) or getattr(model.config, "time_cond_proj_dim", None):
        raise FastdiffError("export of flow-map students with LoRA layers or a guidance embedding is not supported")


def export_flow_map_pipeline_student(model, teacher, info: dict, out: Path, card: dict) -> Path:
    """A latent text-to-image flow-map (meanflow) student: the teacher's components with the network as
    ``FlowMapModel`` in fastdiff's flow-map pipeline for that teacher class (any K; each step told the level it maps
    to); the pipeline's file is copied in (``custom_pipeline`` = its name). Scheduler: VP teachers the
    trailing DDIMScheduler (``deterministic_scheduler``), flow teachers FlowMatchEuler with shift 1, the pipeline
    passing the levels ``1 - i/K`` (``flux_scheduler``'s configuration)."""
    import importlib

    from ..models.flow_map import FlowMapModel
    from ..models.teacher import load_pipeline, pipeline_index

    index = pipeline_index(teacher.path)
    check_flow_map_exportable(model, index["_class_name"])
    file, name = FLOW_MAP_PIPELINES[index["_class_name"]]
    info = _student_info({**info, "flow_map": True, "sampler": "ddim"}, teacher, False)
    flow = teacher.denoiser.schedule.kind == "flow"
    scheduler = flux_scheduler(teacher.scheduler, info["num_steps"], "ddim") if flow else scheduler_for(teacher, info)
    cls = getattr(importlib.import_module(f"fastdiff.pipelines.{file[:-3]}"), name)  # a subclass of the teacher's
    expected, _ = cls._get_signature_keys(cls)
    absent = [k for k in expected if index.get(k) in (None, [None, None]) and k not in cls._optional_components]
    info.update(pipeline_class=name, scheduler_class=type(scheduler).__name__, absent_components=absent)
    base = load_pipeline(teacher.path, index, safety_checker=True, **{teacher.model_folder: teacher.model,
                                                                      "scheduler": scheduler})
    network = model if isinstance(model, FlowMapModel) else FlowMapModel.wrap(model)
    # the teacher's components and settings (requires_safety_checker), its network replaced by the flow-map one
    pipe = cls(**{**base.components, teacher.model_folder: network},
               **{k: v for k, v in base.config.items() if k in cls._get_signature_keys(cls)[1]
                  and k not in base.components})

    def fill(tmp: Path) -> None:
        _save_pipeline(pipe, tmp, info.get("dtype"), info.get("variant"))
        # under its own name, not pipeline.py: diffusers imports every local custom pipeline.py as one module, so a
        # second folder's class would join the first's there (ambiguous in one process)
        shutil.copy(Path(importlib.import_module("fastdiff.pipelines").__file__).parent / file, tmp / file)
        _write_card(tmp, {**info, "export": "pipeline"}, out, card)
    return _write_folder(out, fill, teacher)


def load_flow_map_student(folder: str | Path, info: dict):
    """A text-to-image flow-map export (``FLOW_MAP_PIPELINES``) as a loaded teacher for ``student_generator``
    (``fastdiff sample``, ``fid``, ``clip-score``): the folder's components in the teacher's pipeline class, the
    network the in-place flow-map one (``FlowMapModel.base``), the scheduler the export's."""
    import diffusers
    import torch

    from ..models.denoiser import Denoiser
    from ..models.flow_map import FlowMapModel
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


def push_to_hub(folder: str | Path, repo_id: str, private: bool = False, token: str | None = None) -> str:
    """Upload an exported folder to the Hub model repo ``repo_id`` (created when missing) with
    ``huggingface_hub.HfApi().upload_folder``; returns the commit's URL. Failures are one line."""
    import huggingface_hub

    if not _is_hub_id(repo_id):
        raise FastdiffError(f"--push-to-hub {repo_id!r}: expected a hub repo id, owner/name")
    folder = Path(folder)
    if not (folder / "fastdiff.json").is_file():
        raise FastdiffError(f"{folder} is not a fastdiff export (no fastdiff.json)")
    api = huggingface_hub.HfApi(token=token)
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                                   commit_message="fastdiff export")
    except Exception as exc:  # noqa: BLE001 - network, auth and hub errors become one line
        text = str(exc).strip().splitlines()
        raise FastdiffError(f"push to {repo_id} failed: {text[0] if text else type(exc).__name__}") from exc
    return str(getattr(commit, "commit_url", None) or commit)


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
    if _is_hub_id(recorded):
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
    path = Path(folder) / "fastdiff.json"
    return json.loads(path.read_text()) if path.is_file() else None


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
            raise FastdiffError(f"--levels: {e}") from None
    cls = flux.FluxGenerator if flux.takes_packed_latents(loaded.model) else Generator  # FluxPipeline's noise layout
    return cls(d, info["num_steps"], sampler=info.get("sampler", "lcm"))
