"""Named presets (fastdiff/configs): each parses and validates, each number names its reference in a comment,
``base:`` merges (cycles refused), and ``fastdiff distill --dry-run`` describes a preset's networks on a tiny local
teacher of the same family without writing anything."""
import re
from importlib import resources

import pytest
import torch

import tiny_pipelines as tp
from fastdiff.cli import main
from fastdiff.config import load_config
from fastdiff.errors import FastdiffError
from fastdiff.training.dry_run import GIB, memory_estimate

PRESETS = {"sd15-dmd2": "dmd2", "sdxl-dmd2-lora": "dmd2", "sd3-sid": "sid", "flux-dmd2-lora": "dmd2",
           "sana-scm": "scm"}
NUMBER_LINE = re.compile(r"^\s*[a-z_]+:\s*(-?[0-9][0-9.e+-]*|\[[-0-9., e]+\])\s*(#.*)?$")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_validates_and_comments_every_number(name):
    cfg = load_config(name)
    assert cfg.objective.name == PRESETS[name]
    text = (resources.files("fastdiff.configs") / f"{name}.yaml").read_text()
    numbers = [line for line in text.splitlines() if NUMBER_LINE.match(line)]
    assert numbers, name
    bare = [line for line in numbers if "#" not in line]
    assert not bare, f"{name}: numbers without their reference: {bare}"


def test_sdxl_preset_inherits_the_dmd2_settings_of_its_base():
    sd15, sdxl = load_config("sd15-dmd2"), load_config("sdxl-dmd2-lora")
    assert (sdxl.train.weight_decay, sdxl.train.lr_warmup_steps, sdxl.train.grad_clip, sdxl.objective.min_t) == \
        (sd15.train.weight_decay, sd15.train.lr_warmup_steps, sd15.train.grad_clip, sd15.objective.min_t)
    assert (sdxl.train.lr_generator, sdxl.objective.critic_updates, sdxl.student.lora_rank) == (5e-5, 5, 64)
    assert (sd15.train.lr_generator, sd15.objective.critic_updates, sd15.student.lora_rank) == (1e-5, 10, 0)


def test_dmd2_presets_warm_up_over_500_fake_score_updates_as_train_sd(tiny_teacher):
    """train_sd.py's --warmup_step 500 counts iterations, one fake-score update each, and steps the generator's
    scheduler every iteration too: both rates are full after 500 fake-score updates. fastdiff counts generator
    updates, so the presets leave the warm-up to dmd2's own 500 // critic_updates (50 at SD 1.5's 10, 100 at SDXL's 5);
    a preset line of 500 had warmed up 10x too long."""
    from fastdiff.models.teacher import load_teacher
    from fastdiff.objectives import build

    d = load_teacher(tiny_teacher).denoiser
    for name, warmup in (("sd15-dmd2", 50), ("sdxl-dmd2-lora", 100)):
        cfg = load_config(name)
        assert cfg.train.lr_warmup_steps is None, name
        obj = build("dmd2", d, d, critic_updates=cfg.objective.critic_updates)
        assert obj.train_defaults()["lr_warmup_steps"] * cfg.objective.critic_updates == 500 and \
            obj.train_defaults()["lr_warmup_steps"] == warmup, name


def test_sana_preset_counts_the_tangent_warm_up_in_generator_updates():
    """Sana's tangent_warmup_steps 4000 counts a global step per generator and per discriminator step (1:1)."""
    assert load_config("sana-scm").objective.tangent_warmup == 4000 // 2


def test_base_merges_recursively_and_refuses_cycles(tmp_path):
    (tmp_path / "mid.yaml").write_text("base: fmnist-dmd2\ntrain:\n  batch_size: 7\n")
    (tmp_path / "top.yaml").write_text("base: mid.yaml\ntrain:\n  max_steps: 3\nobjective:\n  critic_updates: 2\n")
    cfg = load_config(str(tmp_path / "top.yaml"), ["train.seed=4"])
    named = load_config("fmnist-dmd2")
    # top's keys, then mid's, then the named config's, then the defaults: each section merged key by key
    assert (cfg.train.max_steps, cfg.train.batch_size, cfg.train.seed, cfg.objective.critic_updates) == (3, 7, 4, 2)
    assert (cfg.train.lr_generator, cfg.train.ema_decay, cfg.output_dir) == \
        (named.train.lr_generator, named.train.ema_decay, named.output_dir)
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(FastdiffError, match="base cycle a.yaml -> b.yaml -> a.yaml"):
        load_config(str(tmp_path / "a.yaml"))
    (tmp_path / "bad.yaml").write_text("base: no-such-config\n")
    with pytest.raises(FastdiffError, match="neither a file nor a named config"):
        load_config(str(tmp_path / "bad.yaml"))


def test_memory_estimate_counts_bytes_by_dtype_and_shared_tensors_once():
    frozen = torch.nn.Linear(10, 10).to(torch.float16).requires_grad_(False)  # 110 params x 2 bytes
    trained = torch.nn.Linear(4, 5)  # 25 params: 4 weight + 4 grad + 8 Adam + 4 EMA bytes each
    rows = [("teacher", list(frozen.parameters())), ("student", [*trained.parameters(), *frozen.parameters()])]
    got = {k: v * GIB for k, v in memory_estimate(rows, ema=True).items()}
    assert got == {"frozen weights": 220, "trainable weights": 100, "gradients": 100, "adam states": 200, "ema": 100,
                   "total": 720}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("presets")
    return {"sd": str(tp.sd_pipeline(root / "sd")), "sdxl": str(tp.sdxl_pipeline(root / "sdxl")),
            "flow": str(tp.sd3_pipeline(root / "sd3")), "flux": str(tp.flux_pipeline(root / "flux")),
            "sana": str(tp.sana_pipeline(root / "sana"))}


# Each preset on a tiny local teacher of its own family.
DRY = {"sd15-dmd2": "sd", "sdxl-dmd2-lora": "sdxl", "sd3-sid": "flow", "flux-dmd2-lora": "flux", "sana-scm": "sana"}


@pytest.mark.parametrize("name", sorted(DRY))
def test_dry_run_prints_config_counts_and_memory_and_writes_nothing(name, tiny, tmp_path, capsys):
    from fastdiff.models.teacher import load_teacher

    out = tmp_path / "run"
    assert main(["distill", "--config", name, "--set", f"teacher.path={tiny[DRY[name]]}", "--set",
                 f"output_dir={out}", "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert not out.exists() and list(tmp_path.iterdir()) == []
    assert "# resolved config" in text and f"name: {PRESETS[name]}" in text and "excludes activations" in text
    rows = {line.split()[0]: line.split() for line in text.splitlines()
            if line.startswith(("teacher ", "student ", "fake "))}
    teacher = load_teacher(tiny[DRY[name]])
    denoiser = sum(p.numel() for p in teacher.model.parameters()) / 1e6
    pipeline = sum(p.numel() for m in teacher.pipeline.components.values() if isinstance(m, torch.nn.Module)
                   for p in m.parameters()) / 1e6
    assert rows["teacher"][1:3] == ["0.000", f"{pipeline:.3f}"]  # every frozen network of the pipeline
    trainable, frozen = float(rows["student"][1]), float(rows["student"][2])
    if load_config(name).student.lora_rank:  # adapters trained, the teacher's own weights frozen under them
        assert trainable > 0 and frozen == pytest.approx(denoiser, abs=2e-3)  # (rank 64 outweighs a tiny network)
    else:
        assert trainable == pytest.approx(denoiser, abs=1e-3) and frozen == 0
    assert ("fake" in rows) == (PRESETS[name] != "scm")
    assert re.search(r"^total\s+\d+\.\d{3}$", text, re.M)
