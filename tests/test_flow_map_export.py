"""Text-to-image flow-map (meanflow) students: the second time enters SD3's transformer (and SD's UNet) through a
zero-initialised embedding, so the student starts as the teacher; tiny SD and SD3 students, distilled a few
updates, export as fastdiff's flow-map pipelines (``pipelines/pipeline_fastdiff_flow_map_sd*.py``), which diffusers
reloads as a custom pipeline and which give fastdiff's own any-K images at K = 1, 2, 4 from one student."""
import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import tiny_pipelines as tp
from fastdiff.inference.export import export_student
from fastdiff.inference.sampling import to_uint8
from fastdiff.models.consistency import consistency_start
from fastdiff.models.denoiser import Denoiser
from fastdiff.models.flow_map import FlowMapGenerator, add_flow_map_embedding, target_time
from fastdiff.models.flow_map_model import FlowMapModel
from fastdiff.models.teacher import load_teacher
from fastdiff.models.text import PromptEncoder
from fastdiff.objectives.meanflow import MeanFlow

PROMPTS = ["a red shoe on a table", "a blue bag", "a green shirt"]
PIPELINES = {"sd": ("FastdiffFlowMapSDPipeline", "pipeline_fastdiff_flow_map_sd", "DDIMScheduler", {}),
             "sdxl": ("FastdiffFlowMapSDXLPipeline", "pipeline_fastdiff_flow_map_sdxl", "DDIMScheduler", {}),
             "sd3": ("FastdiffFlowMapSD3Pipeline", "pipeline_fastdiff_flow_map_sd3", "FlowMatchEulerDiscreteScheduler",
                     {"text_encoder_3": None, "tokenizer_3": None})}


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    root = tmp_path_factory.mktemp("flow_map_t2i")
    return {kind: str(getattr(tp, f"{kind}_pipeline")(root / kind)) for kind in PIPELINES}


def network_call(kind, net, batch: int, timestep: float, gen: torch.Generator):
    """A direct call of the tiny SD / SDXL UNet / SD3 transformer on random inputs of their shapes (fixed by
    ``gen``)."""
    x = torch.randn(batch, 4, tp.LATENT, tp.LATENT, generator=gen)
    t = torch.full((batch,), timestep)
    if kind == "sdxl":  # both encoders' states side by side; the pooled text and the six time ids
        text, added = torch.randn(batch, 5, 64, generator=gen), {"text_embeds": torch.randn(batch, 32, generator=gen),
                                                                 "time_ids": torch.randn(batch, 6, generator=gen)}
        return lambda: net(x, t, encoder_hidden_states=text, added_cond_kwargs=added).sample
    text = torch.randn(batch, 5, 32, generator=gen)
    if kind == "sd":
        return lambda: net(x, t, encoder_hidden_states=text).sample
    pooled = torch.randn(batch, 64, generator=gen)
    return lambda: net(hidden_states=x, timestep=t, encoder_hidden_states=text, pooled_projections=pooled).sample


@pytest.mark.parametrize("kind", PIPELINES)
def test_second_time_starts_as_the_teacher_and_is_wired(kind, teachers):
    """The r embedding adds an exact zero at the start, so the student's output equals the teacher's bit for bit at
    r = 0, mid-way and r = t (SD3: into the timestep MLP of ``time_text_embed``); once trained (weights set nonzero
    here) the output depends on r, so the test would catch an embedding that is never added."""
    teacher = load_teacher(teachers[kind]).model
    student = add_flow_map_embedding(copy.deepcopy(teacher))
    assert student.flow_map_r.proj.weight.abs().sum() == 0
    gen = torch.Generator().manual_seed(0)
    call_teacher = network_call(kind, teacher, 2, 700.0, gen)
    call_student = network_call(kind, student, 2, 700.0, gen.manual_seed(0))
    with torch.no_grad():
        reference = call_teacher()
        outputs = {}
        for r in (0.0, 350.0, 700.0):
            with target_time(student, torch.tensor(r)):
                outputs[r] = call_student()
            assert torch.equal(outputs[r], reference), r
        student.flow_map_r.proj.weight.normal_(0, 0.05, generator=gen)
        moved = {}
        for r in (0.0, 350.0):
            with target_time(student, torch.tensor(r)):
                moved[r] = call_student()
    scale = reference.abs().max()
    assert (moved[0.0] - moved[350.0]).abs().max() > 1e-3 * scale  # r changes the output (O(1e-2) measured)


def distil_and_export(kind: str, folder: str, out: Path, updates: int = 2):
    """A few MeanFlow updates on a tiny text-to-image student (teacher CFG 2 baked into the target), exported."""
    teacher = load_teacher(folder, guidance_scale=2.0)
    d = teacher.denoiser
    encode = PromptEncoder(teacher.pipeline)
    model = copy.deepcopy(teacher.model).requires_grad_(True)
    top = consistency_start(d) if d.schedule.kind == "vp" else None  # flow teachers start at t = 1
    # the central difference: the first forward-mode JVP costs ~2 s of set-up here (the CLI test runs the default)
    obj = MeanFlow(d, None, Denoiser(model, d.schedule, d.prediction_type), sigma_max=top, flow_matching_ratio=0.25,
                   tangent="finite_difference")
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    torch.manual_seed(0)
    for _ in range(updates):
        loss, logs = obj.generator_loss(torch.randn(2, *teacher.sample_shape), encode(PROMPTS[:2]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.isfinite(loss) and logs["meanflow_mse"] > 0
    assert model.flow_map_r.proj.weight.abs().sum() > 0  # the second time is trained
    info = {"teacher": folder, "teacher_folder": folder, "objective": "meanflow", "num_steps": 1, "sigma_init": top,
            "train_step": updates, "ema": False, "settings": {}}
    return teacher, model.eval(), top, export_student(copy.deepcopy(model).eval(), teacher, info, out)


def compare_any_k(pipe, teacher, generator: FlowMapGenerator) -> dict:
    """{K: (largest float difference, share of uint8 values that differ, largest uint8 difference)} between the
    reloaded pipeline and fastdiff's flow-map sampler + the teacher's VAE, same seed and prompts, no CFG (the
    student learnt the guided velocity); asserts K = 1 and 4 are different samplers. Key "explicit": two steps on
    levels given as the pipeline's ``timesteps`` (the second at 0.3 x the first), fastdiff's sampler told the same."""
    cond = PromptEncoder(teacher.pipeline)(PROMPTS)
    first = generator.timesteps(1)[0]
    explicit = FlowMapGenerator(generator.denoiser, generator.num_steps, generator.sigma_init,
                                levels=[first, round(first * 0.3)])
    cases = {k: (generator, k, {"num_inference_steps": k}) for k in (1, 2, 3, 4)}  # 3: not a divisor of the table
    cases["explicit"] = (explicit, None, {"timesteps": explicit.timesteps()})
    measured, images = {}, {}
    for k, (sampler, steps, kwargs) in cases.items():
        ref = pipe(PROMPTS, **kwargs, generator=torch.Generator().manual_seed(11), output_type="np").images
        z = torch.randn((len(PROMPTS), *teacher.sample_shape), generator=torch.Generator().manual_seed(11))
        with torch.no_grad():
            x0 = teacher.latents.decode(sampler(z, cond, num_steps=steps))
        mine = (x0 / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
        ours, theirs = to_uint8(x0).astype(int), (ref * 255).round().astype(int)
        measured[k] = (np.abs(mine - ref).max(), (ours != theirs).mean(), np.abs(ours - theirs).max())
        images[k] = mine
    assert np.abs(images[1] - images[4]).max() > 1e-3  # K steps are different samplers, not one map repeated
    assert np.abs(images[2] - images["explicit"]).max() > 1e-3  # the given levels were used
    return measured


def assert_reproduced(measured: dict) -> None:
    """The same network on the same inputs; the pipelines' step arithmetic (DDIM's or Euler's form of the same map
    step) and the VAE scaling differ from fastdiff's by a few float32 roundings of latents of magnitude ~6
    (1.2e-7 x 6 x ~10 operations ~ 7e-6 at most in latent units; measured at most 1e-6 on the decoded images in
    [0, 1]): 1e-5. uint8: measured equal; on another CPU (other GEMM kernels) a value within ~1e-6 of a rounding
    boundary may round the other way, so at most 1 apart in at most 0.5% of values."""
    for k, (floats, share, most) in measured.items():
        assert floats <= 1e-5, (k, floats)
        assert most <= 1 and share <= 0.005, (k, share, most)


@pytest.mark.parametrize("kind", PIPELINES)
def test_text_flow_map_student_exports_any_k(kind, teachers, tmp_path):
    """Distil a few updates, export, reload with diffusers (``DiffusionPipeline.from_pretrained`` with the pipeline
    file in the folder as custom pipeline), and sample K = 1, 2, 4 from the one student: fastdiff's images."""
    from diffusers import DiffusionPipeline

    name, module, scheduler, absent = PIPELINES[kind]
    teacher, model, top, out = distil_and_export(kind, teachers[kind], tmp_path / "student")
    info = json.loads((out / "fastdiff.json").read_text())
    assert info["flow_map"] and info["pipeline_class"] == name and info["scheduler_class"] == scheduler
    card = (out / "README.md").read_text()
    assert f'custom_pipeline="{module}"' in card
    # one student samples any K: the card says so, not "trained for 1 step (others not trained)"
    assert "# Flow-map student (any step count)" in card and "K = 1, 2, 4, 8" in card and "not trained" not in card
    assert ("For two steps pass `timesteps=[" in card) == (kind != "sd3")  # SD3's levels are flow-time already
    pipe = DiffusionPipeline.from_pretrained(out, custom_pipeline=module, trust_remote_code=True, **absent)
    assert type(pipe).__name__ == name and isinstance(getattr(pipe, teacher.model_folder), FlowMapModel)
    d = teacher.denoiser
    measured = compare_any_k(pipe, teacher, FlowMapGenerator(Denoiser(model, d.schedule, d.prediction_type), 1, top))
    assert_reproduced(measured)


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["meanflow", "ayf"])  # ayf: its default AYF-EMD loss, the same export
@pytest.mark.parametrize("kind", PIPELINES)
def test_distill_cli_exports_text_flow_map_students(kind, objective, teachers, tmp_path):
    """``fastdiff distill objective.name=meanflow`` (or ayf) on a captioned image folder (teacher CFG 2, JVP
    tangent): the trainer's own export reloads through the class the model card names (the card's code runs), and
    ``fastdiff sample``'s path (``load_sampler`` on the folder, then ``sample_model``) gives the pipeline's uint8
    images at K = 1, 2, 4 for the same seed and prompts."""
    import importlib

    from fastdiff.cli import main

    name, _, _, absent = PIPELINES[kind]
    images = tp.caption_folder(tmp_path / "images")
    args = ["distill"]
    for item in [f"teacher.path={teachers[kind]}", f"output_dir={tmp_path / 'run'}", "train.max_steps=2",
                 "train.batch_size=2", "train.checkpoint_every=2", "train.sample_every=2", "train.num_sample_images=2",
                 f"objective.name={objective}", "data.name=imagefolder", f"data.path={images}",
                 "teacher.guidance_scale=2", "train.lr_generator=1e-2", "train.ema_decay=0"]:
        args += ["--set", item]
    assert main(args) == 0
    out = tmp_path / "run" / "student"
    card = re.search(r"```python\n(.*?)```", (out / "README.md").read_text(), re.S).group(1)
    assert f"from fastdiff.pipelines import {name}" in card
    if kind == "sd3":  # (one of the two: a fresh interpreter costs ~10 s; the cards differ only in absent encoders)
        # the card's own code in a fresh interpreter, from the folder, as a user runs it (nothing of fastdiff imported
        # beforehand: diffusers finds the network's class only through what the card's imports bring)
        run = subprocess.run([sys.executable, "-c", card + "\nassert len(images) == 1"], cwd=out, capture_output=True,
                             text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert run.returncode == 0, run.stderr[-2000:]
    pipe = getattr(importlib.import_module("fastdiff.pipelines"), name).from_pretrained(out, **absent)
    assert getattr(pipe, "transformer" if kind == "sd3" else "unet").base.flow_map_r.proj.weight.abs().sum() > 0
    sample_cli_images(out, pipe)


def sample_cli_images(out: Path, pipe, steps=(1, 2, 4)) -> dict:
    """``fastdiff sample``'s path (``load_sampler`` on the folder, then ``sample_model``) on PROMPTS, seed 5, checked
    against the pipeline's uint8 images at each K: returns fastdiff's, by K."""
    from fastdiff.inference.sampling import load_sampler, sample_model

    sampler, loaded = load_sampler(str(out), "cpu")
    images = {}
    for k in steps:
        (_, ours), = list(sample_model(sampler, loaded, len(PROMPTS), k, 5, len(PROMPTS), "cpu", None, PROMPTS))
        theirs = pipe(PROMPTS, num_inference_steps=k, generator=torch.Generator().manual_seed(5), output_type="np")
        theirs = (theirs.images * 255).round().astype(int)
        differ = ours.astype(int) != theirs
        # as assert_reproduced: measured equal; at most 1 apart in at most 0.5% of values on another CPU
        assert np.abs(ours.astype(int) - theirs).max() <= 1 and differ.mean() <= 0.005, (k, differ.mean())
        images[k] = ours
    return images


def test_lora_text_flow_map_student_exports_fused(teachers, tmp_path):
    """A LoRA meanflow student of an SD teacher (student.lora_rank: adapters and the r embedding train) exports as
    FastdiffFlowMapSDPipeline with the adapters fused and the trained embedding kept (no LoRA file: it would lose the
    embedding; student.lora_export both falls back to fused, said in one line): `fastdiff sample`'s path gives the
    pipeline's uint8 images at K = 1, 2, 4."""
    from fastdiff.cli import main
    from fastdiff.pipelines import FastdiffFlowMapSDPipeline

    images = tp.caption_folder(tmp_path / "images")
    args = ["distill"]
    for item in [f"teacher.path={teachers['sd']}", f"output_dir={tmp_path / 'run'}", "train.max_steps=2",
                 "train.batch_size=2", "train.num_sample_images=2", "objective.name=meanflow", "student.lora_rank=4",
                 "data.name=imagefolder", f"data.path={images}", "train.lr_generator=1e-2", "train.ema_decay=0"]:
        args += ["--set", item]
    assert main(args) == 0
    out = tmp_path / "run" / "student"
    info = json.loads((out / "fastdiff.json").read_text())
    assert info["pipeline_class"] == "FastdiffFlowMapSDPipeline" and info["lora_export"] == "fused"
    assert not list(out.glob("*lora*.safetensors")) and not (out / "fused").exists()
    pipe = FastdiffFlowMapSDPipeline.from_pretrained(out)
    assert pipe.unet.base.flow_map_r.proj.weight.abs().sum() > 0  # the embedding trained and was exported
    sample_cli_images(out, pipe)
