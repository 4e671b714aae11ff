"""The README.md model card of an exported student: how to load and call it, what it was trained with."""
from __future__ import annotations

from huggingface_hub import ModelCard, ModelCardData

from .export_format import FLOW_MAP_PIPELINES, TORCH_DTYPES


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
    return _embedded_scale(info, "3.0") if info.get("guidance_embedded") else "0"


def _embedded_scale(info: dict, example):
    """The scale an LCM-style student's example call shows: the one fastdiff samples it at by default (the one it
    was tuned at, else its range's middle), else ``example``."""
    from .students import embedded_guidance_default

    scale = embedded_guidance_default(info)
    return example if scale is None else scale


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
             f"{f', guidance_scale={_embedded_scale(info, 2.0)}' if info.get('guidance_embedded') else ''}).images\n"
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
                          if info.get("flow_levels_2") else "") + (
                          f"\nTuned (PSO) on the levels `timesteps={info['tuned']['timesteps']}`: pass them to sample "
                          "as it was tuned." if (info.get("tuned") or {}).get("timesteps") else "")
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
