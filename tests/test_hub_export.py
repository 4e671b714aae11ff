"""Hub-ready exports: the model card's metadata (parsed back with huggingface_hub's ModelCard), the sample grid,
no absolute local path in any exported text file, ``--push-to-hub`` against a local mock of HfApi (never the
network), and fp16 / variant exports that diffusers loads with ``variant="fp16"``."""
import copy
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, DiffusionPipeline
from huggingface_hub import ModelCard
from PIL import Image

import tiny_pipelines as tp
from conftest import tiny_unet
from fastdiff.cli import main
from fastdiff.config import load_config
from fastdiff.errors import FastdiffError
from fastdiff.inference.export import export_student, push_to_hub
from fastdiff.inference.sampling import load_sampler, sample_model
from fastdiff.models.teacher import dtype_kwargs, load_teacher
from fastdiff.training.outputs import export_info

TEXT = (".json", ".md", ".txt", ".py", ".yaml")
OPENRAIL = "---\nlicense: creativeml-openrail-m\n---\n# a teacher\n"


def text_files_naming(folder: Path, prefix: str) -> list[str]:
    """Every exported text file that contains ``prefix`` (the test's tmp folder: where teacher and export live)."""
    return [str(p) for p in Path(folder).rglob("*") if p.suffix in TEXT and prefix in p.read_text(errors="replace")]


def run_card(folder: Path) -> list:
    """Execute the card's Python block from inside the folder, as a user who downloaded it would."""
    code = re.search(r"```python\n(.*?)```", (folder / "README.md").read_text(), re.S).group(1)
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        scope = {}
        exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - our own generated card
        return scope["images"]
    finally:
        os.chdir(cwd)


def hub_saved_teacher(path: Path) -> Path:
    """A tiny DDPM teacher as a hub pipeline looks once saved: ``_name_or_path`` holds its hub id, and its own
    model card carries a license."""
    DDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler(clip_sample=True)).save_pretrained(path)
    index = json.loads((path / "model_index.json").read_text())
    (path / "model_index.json").write_text(json.dumps({**index, "_name_or_path": "org/tiny-ddpm"}))
    (path / "README.md").write_text(OPENRAIL)
    return path


def export(teacher_path: Path, out: Path, model=None, **options) -> Path:
    teacher = load_teacher(str(teacher_path))
    info = export_info(load_config(None, [f"teacher.path={teacher_path}"]), 7, False, teacher)
    return export_student(model if model is not None else copy.deepcopy(teacher.model), teacher, info, out, **options)


def test_card_metadata_grid_and_no_local_paths(tmp_path):
    teacher = hub_saved_teacher(tmp_path / "teacher")
    grid = tmp_path / "grid.png"
    Image.new("L", (16, 16), 128).save(grid)
    out = export(teacher, tmp_path / "export", sample_grid=grid)
    card = ModelCard.load(str(out / "README.md"))
    data = card.data
    assert (data.base_model, data.license, data.pipeline_tag, data.library_name) == \
        ("org/tiny-ddpm", "creativeml-openrail-m", "unconditional-image-generation", "diffusers")
    assert {"fastdiff", "dmd2", "diffusers"} <= set(data.tags)
    assert (out / "samples.png").read_bytes() == grid.read_bytes() and "](samples.png)" in card.text
    info = json.loads((out / "fastdiff.json").read_text())
    assert (info["teacher"], info["teacher_folder"]) == ("org/tiny-ddpm", "../teacher")
    assert text_files_naming(out, str(tmp_path)) == []  # model_index.json / unet config: no _name_or_path left
    assert len(run_card(out)) == 4  # the card's exact call loads and samples the folder
    model, loaded = load_sampler(str(out), "cpu", None)  # fastdiff sample / fid read the same folder
    assert model.num_steps == 1


def test_teacher_without_hub_id_is_recorded_relative(tmp_path, tiny_teacher):
    out = export(Path(tiny_teacher), tmp_path / "deep" / "export")
    info = json.loads((out / "fastdiff.json").read_text())
    assert info["teacher_folder"] == os.path.relpath(tiny_teacher, out)
    assert (out / info["teacher_folder"]).resolve() == Path(tiny_teacher).resolve()
    data = ModelCard.load(str(out / "README.md")).data
    assert data.base_model is None and data.license is None and "samples.png" not in (out / "README.md").read_text()
    assert text_files_naming(out, str(Path(tiny_teacher).parent)) == []


def test_text_to_image_lora_export_carries_the_license_and_no_local_paths(tmp_path):
    from fastdiff.models.lora import with_lora

    sd = tp.sd_pipeline(tmp_path / "sd")
    (sd / "README.md").write_text(OPENRAIL)
    teacher = load_teacher(str(sd))
    torch.manual_seed(0)
    student = with_lora(teacher.model, 4, "student.lora_rank")
    for name, p in student.named_parameters():
        if "lora_B" in name:  # non-zero adapters, so the LoRA changes the images
            p.data.normal_(0, 0.5)
    out = export(sd, tmp_path / "export", model=student)
    assert (out / "fused" / "model_index.json").is_file() and (out / "pytorch_lora_weights.safetensors").is_file()
    for folder in (out, out / "fused"):
        data = ModelCard.load(str(folder / "README.md")).data
        assert (data.license, data.pipeline_tag) == ("creativeml-openrail-m", "text-to-image")
    assert "lora" in ModelCard.load(str(out / "README.md")).data.tags
    assert json.loads((out / "fastdiff.json").read_text())["teacher_folder"] == "../sd"
    assert json.loads((out / "fused" / "fastdiff.json").read_text())["teacher_folder"] == "../../sd"
    # tokenizer, text encoder, VAE and UNet configs included: nothing names the tmp folder
    assert text_files_naming(out, str(tmp_path)) == []
    # the LoRA folder finds its teacher through the relative path, in the card's call and in fastdiff's sampler
    assert len(run_card(out)) == 1
    model, loaded = load_sampler(str(out), "cpu", None)
    (_, lora_images), = list(sample_model(model, loaded, 1, 1, 5, 1, "cpu", None, ["a red shoe"]))
    model, loaded = load_sampler(str(out / "fused"), "cpu", None)
    (_, fused_images), = list(sample_model(model, loaded, 1, 1, 5, 1, "cpu", None, ["a red shoe"]))
    assert np.array_equal(lora_images, fused_images)


class FakeHfApi:
    """Records what fastdiff asks of ``huggingface_hub.HfApi`` (no network)."""
    calls: list = []

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, **kwargs):
        FakeHfApi.calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, **kwargs):
        folder = Path(kwargs["folder_path"])
        FakeHfApi.calls.append(("upload_folder", kwargs["repo_id"], kwargs,
                                sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())))
        return f"https://huggingface.co/{kwargs['repo_id']}/commit/0"


@pytest.fixture
def fake_hub(monkeypatch):
    import huggingface_hub

    FakeHfApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    return FakeHfApi.calls


def test_push_to_hub_uploads_the_export_folder(tmp_path, tiny_teacher, fake_hub):
    out = export(Path(tiny_teacher), tmp_path / "export")
    assert push_to_hub(out, "me/tiny-student", private=True) == "https://huggingface.co/me/tiny-student/commit/0"
    (create, repo, kw), (upload, repo2, kw2, files) = fake_hub
    assert (create, repo, kw["private"], kw["exist_ok"], kw["repo_type"]) == ("create_repo", "me/tiny-student", True,
                                                                              True, "model")
    assert (upload, repo2, kw2["folder_path"], kw2["repo_type"]) == ("upload_folder", "me/tiny-student", str(out),
                                                                     "model")
    assert {"README.md", "fastdiff.json", "model_index.json", "unet/config.json"} <= set(files)
    for bad in ("not a repo id", "/abs/path", "a/b/c"):
        with pytest.raises(FastdiffError, match="expected a hub repo id"):
            push_to_hub(out, bad)
    with pytest.raises(FastdiffError, match="not a fastdiff export"):
        push_to_hub(tmp_path, "me/x")


def test_cli_export_fp16_variant_pushes_and_matches_the_fp32_export_cast(tmp_path, tiny_teacher, fake_hub, capsys):
    run = tmp_path / "run"
    args = ["distill"]
    for item in [f"teacher.path={tiny_teacher}", f"output_dir={run}", "train.max_steps=1", "train.batch_size=2",
                 "objective.critic_updates=1", "train.checkpoint_every=1", "train.sample_every=1",
                 "train.num_sample_images=4", "train.lr_generator=1e-3", "train.lr_warmup_steps=0"]:
        args += ["--set", item]
    assert main(args) == 0
    assert main(["export", str(run), "--out", str(tmp_path / "fp32")]) == 0
    assert main(["export", str(run), "--out", str(tmp_path / "fp16"), "--variant", "fp16",
                 "--push-to-hub", "me/student"]) == 0
    assert "uploaded to https://huggingface.co/me/student" in capsys.readouterr().out
    fp16 = tmp_path / "fp16"
    assert (fp16 / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    assert not (fp16 / "unet" / "diffusion_pytorch_model.safetensors").exists()
    assert (fp16 / "samples.png").is_file()  # the run's last grid
    (_, _, _), (_, repo, kw, files) = fake_hub
    assert (repo, kw["folder_path"]) == ("me/student", str(fp16)) and "samples.png" in files
    card = (fp16 / "README.md").read_text()
    assert f'from_pretrained("me/student", variant="fp16", {next(iter(dtype_kwargs(None)))}=torch.float16)' in card
    temp = str(Path(tiny_teacher).parent)  # pytest's base folder: holds the teacher and this test's tmp_path
    assert text_files_naming(fp16, temp) == [] and text_files_naming(tmp_path / "fp32", temp) == []

    # The variant export in float16 is the float32 export cast to float16: the same weights, so the same arithmetic
    # and the same uint8 images (compared exactly).
    kw16 = dtype_kwargs(torch.float16)
    pipe16 = DiffusionPipeline.from_pretrained(fp16, variant="fp16", **kw16)
    pipe32 = DiffusionPipeline.from_pretrained(tmp_path / "fp32", **kw16)
    assert pipe16.unet.dtype == pipe32.unet.dtype == torch.float16
    for steps in (1, 2):
        a = pipe16(batch_size=2, num_inference_steps=steps, generator=torch.Generator().manual_seed(3),
                   output_type="np").images
        b = pipe32(batch_size=2, num_inference_steps=steps, generator=torch.Generator().manual_seed(3),
                   output_type="np").images
        assert np.array_equal((a * 255).round().astype(np.uint8), (b * 255).round().astype(np.uint8))
        assert a.std() > 0.01  # images, not a constant

    assert main(["export", str(run), "--out", str(tmp_path / "x"), "--variant", "fp16", "--dtype", "bf16"]) == 2
    assert "--variant fp16 files hold fp16 weights" in capsys.readouterr().err
