"""Trackers (train.report_to): TensorBoard event files hold the run's losses and sample grids, a resumed run purges
the steps logged past its checkpoint; W&B (offline, only where wandb is installed) keeps one run across a resume;
asking for wandb without it is one line."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastdiff.cli import main


def _sets(teacher, out, steps, *extra):
    items = [f"teacher.path={teacher}", f"output_dir={out}", f"train.max_steps={steps}", "train.batch_size=2",
             "objective.critic_updates=1", "train.log_every=1", "train.sample_every=2", "train.checkpoint_every=2",
             "train.num_sample_images=4", "train.ema_decay=0.9", *extra]
    return [a for item in items for a in ("--set", item)]


def _events(out: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # All event files of the run's writer (a resumed run adds one), purge_step applied as TensorBoard does.
    acc = EventAccumulator(str(out / "logs" / "fastdiff"), size_guidance={"scalars": 0, "images": 0})
    return acc.Reload()


def test_tensorboard_event_file_holds_losses_and_sample_grids(tiny_teacher, tmp_path):
    out = tmp_path / "run"
    assert main(["distill", *_sets(tiny_teacher, out, 4)]) == 0
    ev = _events(out)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for key in ("loss_dm", "loss_fake"):
        scalars = ev.Scalars(key)
        assert [s.step for s in scalars] == [1, 2, 3, 4]
        # The same values metrics.jsonl holds (TensorBoard stores float32: one rounding of a float64).
        for s, m in zip(scalars, metrics):
            assert s.value == pytest.approx(m[key], rel=1.2e-7, abs=1e-30)
    images = ev.Images("samples")
    assert [i.step for i in images] == [2, 4, 4]  # every sample_every steps, then the grid exported with the student
    # The image logged is the PNG grid written at that step, pixel for pixel.
    logged = np.asarray(Image.open(__import__("io").BytesIO(images[0].encoded_image_string)).convert("L"))
    written = np.asarray(Image.open(out / "samples" / "step-00000002.png"))
    assert logged.shape == written.shape == (16, 16) and np.array_equal(logged, written)
    # The run's resolved config is stored with it (accelerate's hparams.yml next to the hparams event).
    hparams = list((out / "logs" / "fastdiff").glob("*/hparams.yml"))
    assert len(hparams) == 1 and "train.max_steps: 4" in hparams[0].read_text()


def test_resume_purges_steps_logged_past_the_checkpoint(tiny_teacher, tmp_path):
    """A run that logged steps 1..3 and resumes from its step-2 checkpoint logs 3 and 4 again; TensorBoard keeps the
    new step 3 only (purge_step), so no step appears twice."""
    out = tmp_path / "run"
    assert main(["distill", *_sets(tiny_teacher, out, 3, "train.checkpoint_every=2")]) == 0
    ckpts = sorted((out / "checkpoints").iterdir())
    import shutil

    shutil.rmtree(ckpts[-1])  # as if the process died after logging step 3, before its checkpoint
    first = _events(out).Scalars("loss_dm")
    assert [s.step for s in first] == [1, 2, 3]
    assert main(["distill", *_sets(tiny_teacher, out, 4), "--resume", "latest"]) == 0
    steps = [s.step for s in _events(out).Scalars("loss_dm")]
    assert steps == [1, 2, 3, 4]


def test_report_to_none_writes_no_event_file(tiny_teacher, tmp_path):
    out = tmp_path / "run"
    assert main(["distill", *_sets(tiny_teacher, out, 2, "train.report_to=none")]) == 0
    assert not (out / "logs").exists() and (out / "samples" / "step-00000002.png").is_file()


def test_wandb_missing_is_one_line(tiny_teacher, tmp_path, capsys, monkeypatch):
    from fastdiff.training import trackers

    monkeypatch.setattr(trackers, "wandb_installed", lambda: False)
    assert main(["distill", *_sets(tiny_teacher, tmp_path / "run", 2, "train.report_to=wandb")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install wandb" in err
    assert not (tmp_path / "run").exists()
    assert main(["distill", *_sets(tiny_teacher, tmp_path / "r2", 2, "train.report_to=neptune")]) == 2
    assert "train.report_to must be" in capsys.readouterr().err
    assert trackers.trackers_for("all") == ["tensorboard"]  # all: the trackers installed here


def test_flat_config_is_what_tensorboard_hparams_take():
    from fastdiff.config import Config, to_dict
    from fastdiff.training.trackers import flat_config

    flat = flat_config(to_dict(Config()))
    assert flat["train.max_steps"] == 1000 and flat["train.lr_generator"] == "None"
    assert all(isinstance(v, (int, float, str, bool)) for v in flat.values())


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb not installed (pip install wandb)")
def test_wandb_offline_keeps_one_run_across_resume(tiny_teacher, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wandb").mkdir()
    out = tmp_path / "run"
    assert main(["distill", *_sets(tiny_teacher, out, 2, "train.report_to=all")]) == 0
    run_id = (out / "wandb_run_id").read_text().strip()
    assert main(["distill", *_sets(tiny_teacher, out, 4, "train.report_to=all"), "--resume", "latest"]) == 0
    assert (out / "wandb_run_id").read_text().strip() == run_id
    runs = sorted((tmp_path / "wandb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(run_id) for r in runs)  # both processes wrote the same run
    assert all(list(r.glob("files/media/images/samples_*.png")) for r in runs)  # the sample grids, as W&B images
    assert _events(out).Scalars("loss_dm")[-1].step == 4  # TensorBoard alongside (all)
