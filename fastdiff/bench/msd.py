"""``fastdiff bench msd``: multi-student distillation (training/msd.py) on the class-conditional analytic teacher.

The teacher is ``GaussianMixtureModel(class_conditional=True)``, the bench's mixture with class k = mode k (4 modes,
weights 0.1..0.4, 1x8x8). For each K the 4 classes are cut into K contiguous groups of modes and one one-step student
per group is distilled with ``student.classes`` (the same objective, updates and seed per student); evaluation labels
are drawn with the mixture's weights and each sample is made by its group's student (MSD's router), so the set is
scored against exact samples of the whole mixture like the gmm bench (sliced W2 over its floor, mode weights).

The student is what MSD starts from, a trainable copy of the teacher: here the mixture itself, whose one-step map at
sigma_init 2.5 is affine in the noise per class, so every K can reach the target exactly and the rows check that the
partitioned training and the routing are right, not the paper's capacity gain (which needs students too small for
all classes). Its spread is its log-std weight, which must move by ~1.6 (std 0.1 -> 0.49 at sigma_init 2.5) to
reach the target, hence the learning rate 1e-2 (the gmm bench's 1e-4 for MLPs would need >10k updates).
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from ..config import Config, _apply, parse_override, validate
from ..errors import FastdiffError
from ..inference.sampling import ddim_sample
from ..machine import describe
from ..models.analytic import GaussianMixtureModel
from ..models.generator import Generator
from ..models.teacher import load_teacher
from ..training import Trainer
from ..training.msd import contiguous_partition
from .gmm import TRAIN, exact_floor, row_recorder
from .gmm import table as gmm_table

NUM_MODES = 4
SETTINGS = {"objective": {"critic_updates": 5}, "train": {**TRAIN, "lr_generator": 1e-2, "report_to": "none"}}


def train_student(teacher_dir: Path, classes: list[int], objective: str, steps: int, seed: int, out: Path,
                  overrides=()) -> Trainer:
    cfg = Config()
    _apply(cfg, {"teacher": {"path": str(teacher_dir)}, "student": {"classes": classes},
                 "objective": {"name": objective, **SETTINGS["objective"]}, "data": {"name": "analytic"},
                 "train": {**SETTINGS["train"], "max_steps": steps, "log_every": steps, "seed": seed},
                 "output_dir": str(out)})
    for item in overrides:
        _apply(cfg, parse_override(item))
    validate(cfg)
    trainer = Trainer(cfg, overwrite=True, progress=False)
    trainer.fit(export=False)
    return trainer


def run(partitions=(1, 2, 4), objectives=("dmd2",), steps: int = 400, num_eval: int = 5000, seed: int = 0,
        log=print, overrides=()) -> dict:
    if any(not 1 <= k <= NUM_MODES for k in partitions) or num_eval < 100 or steps <= 0:
        raise FastdiffError(f"--partitions must be in 1..{NUM_MODES}, --num-eval at least 100, --steps positive")
    for item in overrides:  # a wrong key fails now, not after the first student
        _apply(Config(), parse_override(item))
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        gmm = GaussianMixtureModel(class_conditional=True)
        gmm.save_teacher(tmp / "teacher")
        teacher = load_teacher(str(tmp / "teacher"))
        truth = gmm.sample_true(num_eval, torch.Generator().manual_seed(seed + 1))
        floors = exact_floor(gmm, truth, seed)
        floor = floors["sw2_floor"]
        weights = gmm.log_weights.detach().exp()
        labels = torch.multinomial(weights, num_eval, replacement=True, generator=torch.Generator().manual_seed(seed + 3))
        z = torch.randn(num_eval, *teacher.sample_shape, generator=torch.Generator().manual_seed(seed + 4))
        rows = []

        add = row_recorder(rows, truth, gmm, floor, log)

        for k in (1, 4):
            t0 = time.time()
            with torch.no_grad():
                add(f"teacher-ddim-{k}", ddim_sample(teacher.denoiser, z, k, {"class_labels": labels}), "teacher", 0, t0)
        t0 = time.time()
        start_gen = Generator(teacher.denoiser, 1, 2.5)  # every student's start: the teacher copy at sigma_init 2.5
        with torch.no_grad():
            add("start (teacher copy)", start_gen(z, {"class_labels": labels}), "init", 0, t0)
        for objective in objectives:
            for k in partitions:
                t0 = time.time()
                samples = torch.empty_like(z)
                for g, part in enumerate(contiguous_partition(NUM_MODES, k)):
                    student = train_student(tmp / "teacher", part, objective, steps, seed, tmp / f"{objective}-{k}-{g}",
                                            overrides).export_generator().eval()
                    mine = torch.isin(labels, torch.tensor(part))  # the router: each label to its group's student
                    with torch.no_grad():
                        samples[mine] = student(z[mine], {"class_labels": labels[mine]})
                add(f"msd K={k} ({objective})", samples, "objective", steps, t0)
    return {"machine": describe("cpu"), "overrides": list(overrides), "num_eval": num_eval, "seed": seed, **floors,
            "seconds": round(time.time() - start, 1), "rows": rows}


def table(result: dict) -> str:
    """gmm's table, with this bench's title and footnote."""
    lines = gmm_table(result).splitlines()
    lines[0] = lines[0].replace("fastdiff bench gmm: few-step students", "fastdiff bench msd: one-step students per "
                                "group of modes")
    lines[-1] = (f"floor (mean of {result['floor_draws']} exact sample sets): sw2 {result['sw2_floor']:.4f}; steps "
                 "are per student; every row's mode-weight error is the evaluation labels' own sampling error")
    return "\n".join(lines)
