"""FID / KID of a run's student while it trains (``train.eval_every``), as SiD's and EDM's training loops track it.

Each evaluation scores the student the run would export at that step (``run.export_generator()``: the EMA where
kept), in float32, eval mode and eager (uncompiled under train.compile), sampled the way ``fastdiff fid STUDENT
--steps K --seed S --batch-size B`` samples the exported folder (``sample_model``: one CPU noise generator per batch, seeded S + batch index; here S =
``train.seed``, B = ``train.batch_size``; a text-to-image student from ``train.eval_prompts`` as from ``--prompts``),
against reference statistics from ``fastdiff ref-stats``. So the number
logged at step N is the number ``fastdiff fid`` gives for the student exported at step N
(tests/test_eval_during_training.py).

Settings are checked when the evaluator is built, before training. On several processes each samples its share of
the batches (batch b on process b mod P: every process holds the whole student) and the main process adds their
Inception features in batch order, so the number is the one process's, bit for bit. A sharded run (train.sharding:
fsdp) gathers its student whole on every process for the evaluation (the copy the main process holds for a sample
grid or the export), then splits the batches alike.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import FastdiffError
from ..models.text import read_prompts
from ..training.outputs import as_exported, frozen_parts_on_device, middle_guidance
from .clip_score import prompts_for
from .evaluate import evaluate
from .images import sampled_source
from .inception import InceptionFeatures
from .metrics import ReferenceStats


def check_files(cfg) -> None:
    """The evaluation's files exist, checked before a run is built (a teacher loaded, latents cached)."""
    t = cfg.train
    for key in ("eval_reference", "eval_prompts", "eval_inception"):
        path = getattr(t, key)
        if t.eval_every and path is not None and not Path(path).is_file():
            make = f"; make it once with `fastdiff ref-stats IMAGES --out {path}`" if key == "eval_reference" else ""
            raise FastdiffError(f"train.{key} {path}: no such file{make}")


class TrainingEvaluator:
    """``evaluator(run) -> evaluate()'s result`` for the run's current student (None on processes other than the
    main one); called on every process when ``every_process``, else on the main one only."""

    def __init__(self, run):
        t, teacher = run.cfg.train, run.teacher
        if run.cfg.objective.name == "fada":
            raise FastdiffError("train.eval_every: a fada student samples with two guidance scales; score its export "
                                "with `fastdiff fid STUDENT --prompts FILE`")
        self.prompts = None
        if teacher.conditioning == "text":
            if not t.eval_prompts:
                raise FastdiffError("train.eval_every on a text-to-image student needs train.eval_prompts: a prompts "
                                    "file (one per line, or JSONL), one per image or one for all")
            self.prompts = read_prompts(t.eval_prompts, "train.eval_prompts")
            try:  # one per image or one for all, or refused now
                prompts_for(self.prompts, t.eval_images)
            except FastdiffError as exc:
                raise FastdiffError(f"train.eval_prompts and train.eval_images: {exc}") from None
        elif t.eval_prompts:
            raise FastdiffError(f"train.eval_prompts is for text-to-image students; this one is "
                                f"{'unconditional' if teacher.conditioning == 'none' else 'class-conditioned'}")
        check_files(run.cfg)  # `fastdiff distill` checked them before building the run; a Python caller may not
        try:
            self.ref = ReferenceStats.load(t.eval_reference)
        except FastdiffError as exc:
            raise FastdiffError(f"train.eval_reference: {exc}") from None
        c, h, w = teacher.image_shape
        if t.eval_crop is not None and t.eval_crop > min(h, w):
            raise FastdiffError(f"train.eval_crop {t.eval_crop} is larger than the student's {h}x{w} images")
        self.shape = (c, t.eval_crop, t.eval_crop) if t.eval_crop else (c, h, w)
        made = self.ref.image_shape
        if made is not None and tuple(made) != self.shape:
            fix = f"set train.eval_crop {made[1]}" if made[0] == c and made[1] == made[2] < min(h, w) else \
                "remake the reference from images like the student's"
            raise FastdiffError(f"train.eval_reference was made from {'x'.join(map(str, made))} (CxHxW) images, the "
                                f"student's are {'x'.join(map(str, self.shape))}: {fix}")
        acc = run.accelerator
        self.part = (acc.process_index, acc.num_processes) if acc.num_processes > 1 else None
        self.extractor = None
        if acc.is_main_process or self.part is not None:
            try:
                with torch.random.fork_rng(devices=[]):  # its layers' random initial weights would shift the run's draws
                    self.extractor = InceptionFeatures(t.eval_inception, self.ref.resize).to(run.accelerator.device)
            except FastdiffError as exc:
                raise FastdiffError(f"train.eval_inception: {exc}".replace("pass --inception FILE", "set "
                                    "train.eval_inception")) from None
            try:
                self.ref.check_extractor(self.extractor.extractor_id)
            except FastdiffError as exc:
                raise FastdiffError(f"train.eval_reference and train.eval_inception: {exc}") from None

    @property
    def every_process(self) -> bool:
        """Whether each process takes part in an evaluation (it samples its share of the batches)."""
        return self.part is not None

    def __call__(self, run) -> dict | None:
        """The scores on the main process; None on the others."""
        t = run.cfg.train
        gen = run.export_generator()
        source = sampled_source(f"step-{run.step}", gen, run.teacher, run.cfg.student.num_steps, t.seed,
                                run.accelerator.device, middle_guidance(run.cfg), self.prompts)
        with torch.no_grad(), as_exported(gen), frozen_parts_on_device(run, text_encoders=self.prompts is not None):
            return evaluate(source, self.ref, self.extractor, t.eval_images, t.batch_size, t.eval_crop,
                            progress=False, part=self.part)
