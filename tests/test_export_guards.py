"""Exports that could not carry what a student learnt: written the one way that does, or refused before training.

- agd on a Stable Diffusion teacher: its adapters train beside a scale embedding (``time_cond_proj_dim``'s
  ``cond_proj``) that is not a LoRA weight, so a file for ``load_lora_weights`` would sample without it. The student
  exports fused only, and ``StableDiffusionPipeline`` told ``guidance_scale`` samples fastdiff's own images.
- agd's guided sampler is the teacher's own deterministic one: the fresh-noise (lcm) sampler is refused.
- flow-map students (meanflow, ayf) whose network takes no second time (PixArt's transformer) and LoRA flow-map
  students asked for a LoRA file (it would lose the r embedding): one line before training, not an error after it;
  so are objectives on teachers they do not support (boot, tdm, agd on SD3, meanflow on Flux).
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
    return {"sd": str(tp.sd_pipeline(root / "sd")), "pixart": str(tp.pixart_pipeline(root / "pixart")),
            "sd3": str(tp.sd3_pipeline(root / "sd3")), "flux": str(tp.flux_pipeline(root / "flux")),
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


FLOW_MAP = ["data.name=teacher", "data.teacher_steps=2"]  # no images: the refusal comes first either way
# case: (teacher, settings, the one line's words). The first three are exports or samplers that would lose what the
# student learnt; the rest objectives on teachers they do not support.
REFUSED = {
    "agd-lora": ("sd", [*AGD, "student.lora_export=lora"], "objective agd: its scale embedding is not a LoRA weight"),
    "agd-lcm": ("sd", [*AGD, "student.sampler=lcm"], "set student.sampler=ddim"),
    "meanflow-lora": ("sd", ["objective.name=meanflow", "student.lora_rank=2", "student.lora_export=lora", *FLOW_MAP],
                      "objective meanflow: its r embedding is a new layer, not a LoRA weight"),
    "ayf-pixart": ("pixart", ["objective.name=ayf", *FLOW_MAP], "a flow-map student needs a UNet2DModel"),
    "meanflow-flux": ("flux", ["objective.name=meanflow", *FLOW_MAP], "FluxTransformer2DModel"),
    "boot-sd3": ("sd3", ["objective.name=boot"], "needs a VP teacher"),
    "tdm-sd3": ("sd3", ["objective.name=tdm"], "flow-matching teachers are not supported"),
    "agd-sd3": ("sd3", AGD, "needs a UNet2DModel or UNet2DConditionModel"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_refused_with_one_line_before_anything_is_written(files, tmp_path, capsys, case):
    teacher, sets, message = REFUSED[case]
    out = tmp_path / "x"
    code = main(["distill", *distill_args(f"teacher.path={files[teacher]}", f"output_dir={out}",
                                          f"data.prompts={files['prompts']}", *FAST, *sets)])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err[-800:]
    lines = [line for line in err.splitlines() if "error" in line]  # beside diffusers' loading bars
    assert len(lines) == 1 and lines[0].startswith("fastdiff: error: ") and message in lines[0], err
    assert not (out / "checkpoints").exists() and not (out / "student").exists()
