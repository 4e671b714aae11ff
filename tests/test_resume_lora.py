"""A LoRA student's run resumed from a checkpoint ends bit-identical to an uninterrupted one, as a full student's does.

The student's LoRA is built before the run seeds torch (Run calls set_seed after student_model_for), and
peft draws ``lora_A`` from torch's global generator: unseeded, a second process (or a second run in one
process) started from other adapters, so ``--resume`` continued a different run. The student's adapters now
start from ``train.seed`` (``with_lora(seed=...)``)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fastdiff.cli import main
from fastdiff.config import load_config
from fastdiff.models.teacher import load_teacher
from fastdiff.training.networks import student_model_for
from test_reliability import _assert_identical  # nested dicts / lists of tensors, bit for bit

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
# A LoRA student with its EMA, and dmd2's fake score a LoRA too: every network a LoRA run checkpoints.
LORA = ["student.lora_rank=2", "train.ema_decay=0.9", "objective.fake_lora_rank=2"]


def _sets(teacher, out, steps, *extra) -> list[str]:
    items = [f"teacher.path={teacher}", f"output_dir={out}", f"train.max_steps={steps}", "train.batch_size=2",
             "objective.name=dmd2", "objective.critic_updates=1", "train.checkpoint_every=2", "train.log_every=1",
             "train.sample_every=1000", "train.num_sample_images=2", "train.lr_generator=1e-3",
             "train.lr_critic=1e-3", *extra]
    return [a for item in items for a in ("--set", item)]


def _checkpoint(run: Path, step: int) -> dict:
    """Every file of a checkpoint: the networks' weights and the optimizer, RNG and step state."""
    folder = run / "checkpoints" / f"step-{step:08d}"
    out = {f"{p.stem}/{k}": v for p in sorted(folder.glob("*.safetensors")) for k, v in load_file(str(p)).items()}
    out["state"] = torch.load(folder / "state.pt", weights_only=True)
    return out


def _adapters(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def test_lora_student_starts_from_train_seed(tiny_teacher, tmp_path):
    """The student's adapters depend on train.seed alone, not on what drew from torch's generator before, and
    building them leaves that generator where it was (the run's later draws are a full student's)."""
    teacher = load_teacher(tiny_teacher)
    cfg = load_config(None, [f"teacher.path={tiny_teacher}", f"output_dir={tmp_path}", "student.lora_rank=2"])
    torch.manual_seed(1)
    first = _adapters(student_model_for(cfg, teacher))
    torch.manual_seed(2)
    before = torch.get_rng_state()
    second = _adapters(student_model_for(cfg, teacher))
    assert torch.equal(torch.get_rng_state(), before)
    assert first.keys() == second.keys() and len(first) > 0
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert any(first[k].abs().max() > 0 for k in first if "lora_A" in k)  # peft's random lora_A, not zeros
    cfg.train.seed += 1
    other = _adapters(student_model_for(cfg, teacher))
    assert any(not torch.equal(first[k], other[k]) for k in first if "lora_A" in k)


def test_resumed_lora_run_equals_an_uninterrupted_one(tiny_teacher, tmp_path):
    """In one process: 3 updates, and 2 updates resumed to 3, end with identical checkpoints (adapters, EMA, LoRA
    fake score, optimizer moments, RNG), and the checkpoint resumed from equals the uninterrupted run's."""
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert main(["distill", *_sets(tiny_teacher, whole, 3, *LORA)]) == 0
    assert main(["distill", *_sets(tiny_teacher, part, 2, *LORA)]) == 0
    assert main(["distill", *_sets(tiny_teacher, part, 3, *LORA), "--resume", "latest"]) == 0
    _assert_identical(_checkpoint(part, 2), _checkpoint(whole, 2))
    _assert_identical(_checkpoint(part, 3), _checkpoint(whole, 3))


def _cli(*args) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "fastdiff", "distill", *args], env=ENV, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    return done


@pytest.mark.slow  # three fresh processes: about a minute on the loaded 2-core CPU
def test_resumed_lora_run_equals_an_uninterrupted_one_across_processes(tiny_teacher, tmp_path):
    """As a real resume: each run in its own process, whose torch generator starts from its own state."""
    whole, part = tmp_path / "whole", tmp_path / "part"
    _cli(*_sets(tiny_teacher, whole, 4, *LORA))
    _cli(*_sets(tiny_teacher, part, 2, *LORA))
    _cli(*_sets(tiny_teacher, part, 4, *LORA), "--resume", "latest")
    _assert_identical(_checkpoint(part, 2), _checkpoint(whole, 2))
    _assert_identical(_checkpoint(part, 4), _checkpoint(whole, 4))
