"""Exports that could not carry what a student learnt: written the one way that does, or refused before training.

- agd on a Stable Diffusion teacher: its adapters train beside a scale embedding (``time_cond_proj_dim``'s
  ``cond_proj``) that is not a LoRA weight, so a file for ``load_lora_weights`` would sample without it. The student
  exports fused only, and ``StableDiffusionPipeline`` told ``guidance_scale`` samples fastdiff's own images.
- agd's guided sampler is the teacher's own deterministic one: the fresh-noise (lcm) sampler is refused.
- flow-map students (meanflow, ayf) of pipelines without a fastdiff flow-map pipeline (SDXL): one line before
  training, not an error after it.
"""
import json

import numpy as np
import pytest
import torch

import tiny_pipelines as tp
from fastdiff.cli import main
from test_text_to_image import FAST, assert_same, ours, theirs


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("guards")
    return {"sd": str(tp.sd_pipeline(root / "sd")), "sdxl": str(tp.sdxl_pipeline(root / "sdxl")),
            "prompts": str(tp.prompts_file(root / "prompts.txt"))}


def distill_args(*items) -> list[str]:
    return [a for item in items for a in ("--set", item)]


AGD = ["objective.name=agd", "objective.guidance_range=[1.0, 4.0]", "objective.trajectory_steps=4",
       "objective.adapter_rank=2", "student.sampler=ddim", "student.num_steps=4", "train.lr_generator=1e-2",
       "train.lr_warmup_steps=0"]


def test_agd_on_stable_diffusion_exports_fused_and_the_pipeline_samples_it(files, tmp_path):
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    run = tmp_path / "run"
    assert main(["distill", *distill_args(f"teacher.path={files['sd']}", f"output_dir={run}",
                                          f"data.prompts={files['prompts']}", *FAST, *AGD)]) == 0
    student = run / "student"
    info = json.loads((student / "fastdiff.json").read_text())
    assert info["lora_export"] == "fused" and info["pipeline_class"] == "StableDiffusionPipeline"
    # no LoRA file that would drop the scale embedding, and no second copy in fused/
    assert not list(student.glob("*lora*.safetensors")) and not (student / "fused").exists()
    pipe = StableDiffusionPipeline.from_pretrained(student)
    embedding = load_file(run / "checkpoints" / "step-00000002" / "agd_scale_embedding.safetensors")["weight"]
    assert pipe.unet.config.time_cond_proj_dim and embedding.abs().sum() > 0
    assert torch.equal(pipe.unet.time_embedding.cond_proj.weight, embedding)
    for scale in (1.0, 3.0):  # one UNet pass per step, the scale read from guidance_scale
        assert_same(ours(student, 4, guidance=scale), theirs(pipe, 4, guidance=scale))
    assert not np.array_equal(theirs(pipe, 4, guidance=1.0), theirs(pipe, 4, guidance=3.0))


@pytest.mark.parametrize("case", ["agd-lora", "agd-lcm", "meanflow-sdxl", "ayf-sdxl"])
def test_exports_that_would_lose_the_student_are_refused_before_training(files, tmp_path, capsys, case):
    items = {"agd-lora": [f"teacher.path={files['sd']}", *AGD, "student.lora_export=lora"],
             "agd-lcm": [f"teacher.path={files['sd']}", *AGD, "student.sampler=lcm"],
             "meanflow-sdxl": [f"teacher.path={files['sdxl']}", "objective.name=meanflow", "data.name=teacher",
                               "data.teacher_steps=2"],
             "ayf-sdxl": [f"teacher.path={files['sdxl']}", "objective.name=ayf", "data.name=teacher",
                          "data.teacher_steps=2"]}[case]
    message = {"agd-lora": "agd's scale embedding is not a LoRA weight",
               "agd-lcm": "set student.sampler=ddim",
               "meanflow-sdxl": "flow-map (meanflow, ayf) students of StableDiffusionXLPipeline teachers",
               "ayf-sdxl": "flow-map (meanflow, ayf) students of StableDiffusionXLPipeline teachers"}[case]
    out = tmp_path / "x"
    code = main(["distill", *distill_args(f"output_dir={out}", f"data.prompts={files['prompts']}", *FAST, *items)])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err[-800:]
    lines = [line for line in err.splitlines() if "error" in line]  # beside diffusers' loading bars
    assert len(lines) == 1 and lines[0].startswith("fastdiff: error: ") and message in lines[0], err
    assert not (out / "checkpoints").exists() and not (out / "student").exists()
