"""CLI, tracker and machine rules the other tests left open (found by a mutation audit, 2026-11-30): --out checks
(non-empty, the model folder itself, an optional input not given; sample --overwrite replacing the numbered images),
export of exactly the checkpoint named, --seed reaching the sampler (batch b: seed + b), prompts paired and refused for
models without text, --json written atomically and refused in a missing folder, fid's JSON settings, explicit
--levels kept as given, the W&B tracker's run id / resume / train_step axis (a fake accelerate tracker: wandb need
not be installed), offline() and cpu_name()."""
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from fastdiff.cli import main
from fastdiff.errors import FastdiffError


def _distill_args(teacher, out, *extra):
    items = [f"teacher.path={teacher}", f"output_dir={out}", "train.max_steps=2", "train.batch_size=2",
             "objective.critic_updates=1", "train.checkpoint_every=1", "train.sample_every=100",
             "train.num_sample_images=2", "train.lr_generator=1e-3", "train.lr_warmup_steps=0",
             "train.report_to=none", *extra]
    return ["distill", "-q", *[a for item in items for a in ("--set", item)]]


@pytest.fixture(scope="module")
def two_step_run(tiny_teacher, tmp_path_factory):
    """A 2-step run with a checkpoint at each step (the student moves well between them: lr 1e-3, no warm-up)."""
    run = tmp_path_factory.mktemp("cli_rules") / "run"
    assert main(_distill_args(tiny_teacher, run)) == 0
    assert [p.name for p in sorted((run / "checkpoints").iterdir())] == ["step-00000001", "step-00000002"]
    return run


def _unet_weights(folder: Path) -> dict:
    return load_file(str(next((folder / "unet").glob("*.safetensors"))))


def test_export_takes_exactly_the_checkpoint_named(two_step_run, tmp_path):
    """--checkpoint 1 of a 2-checkpoint run: the export says step 1 and holds other weights than step 2's."""
    assert main(["export", str(two_step_run), "--out", str(tmp_path / "one"), "--checkpoint", "1"]) == 0
    assert main(["export", str(two_step_run), "--out", str(tmp_path / "two"), "--checkpoint", "2"]) == 0
    assert json.loads((tmp_path / "one" / "fastdiff.json").read_text())["train_step"] == 1
    assert json.loads((tmp_path / "two" / "fastdiff.json").read_text())["train_step"] == 2
    one, two = _unet_weights(tmp_path / "one"), _unet_weights(tmp_path / "two")
    # Two Adam steps of lr 1e-3 move weights by ~1e-3, far above float32 rounding of the same computation (0).
    assert max(float((one[k] - two[k]).abs().max()) for k in one) > 1e-4


def test_sample_seed_gives_batch_b_the_seed_plus_b(tiny_teacher, tmp_path):
    """--seed 5 with batches of one: image 1 is what --seed 6 draws first, and differs from --seed 5's first."""
    common = ["--steps", "1", "--batch-size", "1"]
    assert main(["sample", tiny_teacher, "--num", "2", "--seed", "5", "--out", str(tmp_path / "a"), *common]) == 0
    assert main(["sample", tiny_teacher, "--num", "1", "--seed", "6", "--out", str(tmp_path / "b"), *common]) == 0
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["000000.png", "000001.png"]
    a0, a1 = (np.asarray(Image.open(tmp_path / "a" / f"00000{i}.png")) for i in (0, 1))
    b0 = np.asarray(Image.open(tmp_path / "b" / "000000.png"))
    assert np.array_equal(a1, b0)  # the same noise, the same deterministic DDIM step: identical uint8
    assert not np.array_equal(a0, b0)


def test_failed_json_write_leaves_the_previous_file_whole(tmp_path):
    """--json is written atomically: a result that cannot be written leaves the file as it was."""
    from fastdiff.cli import _write_json

    target = tmp_path / "r.json"
    target.write_text('{"fid": 1.0}')
    with pytest.raises(TypeError):
        _write_json(str(target), {"fid": 2.0, "not_json": object()})
    assert target.read_text() == '{"fid": 1.0}'
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_an_input_not_given_does_not_skip_the_non_empty_out_check(tiny_teacher, tmp_path, capsys):
    """upscale's --eval-images is optional (None): --out holding a file is still refused without --overwrite."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    (tmp_path / "images").mkdir()
    assert main(["upscale", tiny_teacher, "--images", str(tmp_path / "images"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "is not empty" in err and len(err.splitlines()) == 1, err
    assert [p.name for p in out.iterdir()] == ["mine.txt"] and (out / "mine.txt").read_text() == "keep"


def test_explicit_levels_are_kept_as_given_not_rounded():
    """727.5 stays 727.5 (a VP student then refuses it as not an integer) instead of silently becoming 727."""
    from fastdiff.inference.students import parse_levels

    levels = parse_levels("727.5,234", 2)
    assert levels == [727.5, 234] and isinstance(levels[1], int)
    assert parse_levels("999,500.0", 2) == [999, 500]


class _FakeTracker:
    def __init__(self, name):
        self.name, self.calls = name, []

    def log(self, values, **kwargs):
        self.calls.append((values, kwargs))


class _FakeWandbRun:
    def __init__(self):
        self.metrics = []

    def define_metric(self, name, **kwargs):
        self.metrics.append((name, kwargs))


class _FakeAccelerator:
    """What trackers.start / log_scalars use of accelerate's Accelerator, recording the calls."""

    is_main_process = True

    def __init__(self, log_with, trackers=()):
        self.log_with, self.trackers, self.wandb_run, self.init = log_with, list(trackers), _FakeWandbRun(), None

    def init_trackers(self, project, config=None, init_kwargs=None):
        self.init = (project, config, init_kwargs)

    def get_tracker(self, name, unwrap=False):
        assert name == "wandb" and unwrap
        return self.wandb_run


def _start(out: Path, step: int, log_with=("wandb",)):
    from fastdiff.config import Config
    from fastdiff.training import trackers

    acc = _FakeAccelerator(list(log_with))
    trackers.start(SimpleNamespace(accelerator=acc, step=step, out=out, cfg=Config()))
    return acc


def test_wandb_resume_continues_the_same_run_on_the_train_step_axis(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_DIR", raising=False)
    first = _start(tmp_path, 0).init[2]["wandb"]
    run_id = first["id"]
    assert len(run_id) == 8 and (tmp_path / "wandb_run_id").read_text().strip() == run_id
    assert first == {"id": run_id, "resume": "allow", "name": tmp_path.name, "dir": str(tmp_path)}
    resumed = _start(tmp_path, 4, ("wandb", "tensorboard"))
    assert resumed.init[2]["wandb"]["id"] == run_id and resumed.init[2]["wandb"]["resume"] == "allow"
    assert resumed.init[2]["tensorboard"] == {"purge_step": 5}
    # Every chart's x axis is the training step, not W&B's own step counter.
    assert resumed.wandb_run.metrics == [("train_step", {}), ("*", {"step_metric": "train_step"})]


def test_wandb_run_id_file_empty_gets_a_new_id_and_wandb_dir_is_respected(tmp_path, monkeypatch):
    (tmp_path / "wandb_run_id").write_text("\n")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "elsewhere"))
    kwargs = _start(tmp_path, 0).init[2]["wandb"]
    assert len(kwargs["id"]) == 8 and "dir" not in kwargs
    assert (tmp_path / "wandb_run_id").read_text().strip() == kwargs["id"]


def test_scalars_go_to_wandb_with_train_step_and_to_tensorboard_at_the_step():
    """W&B gets the step as the train_step metric (its own step must only increase, which a resume would break);
    TensorBoard gets it as the event step."""
    from fastdiff.training.trackers import log_scalars

    wandb, tensorboard = _FakeTracker("wandb"), _FakeTracker("tensorboard")
    log_scalars(_FakeAccelerator([], [wandb, tensorboard]), {"loss_dm": 0.5}, 7)
    assert wandb.calls == [({"loss_dm": 0.5, "train_step": 7}, {})]
    assert tensorboard.calls == [({"loss_dm": 0.5}, {"step": 7})]


def test_sample_refuses_a_non_empty_out_unless_overwrite(tiny_teacher, tmp_path, capsys):
    """A folder holding anything is refused (the file kept, nothing written); an existing empty folder is fine;
    --overwrite replaces its numbered images, those of an earlier, larger call included (they were once left beside
    the new ones, and `fastdiff fid OUT` scored both), and keeps other files."""
    out = tmp_path / "out"
    out.mkdir()
    args = ["sample", tiny_teacher, "--num", "2", "--steps", "1", "--out", str(out)]
    assert main(args) == 0  # empty: fine
    assert main(args) == 2  # now it holds the first images
    err = capsys.readouterr().err.strip()
    assert "is not empty; pass --overwrite" in err and len(err.splitlines()) == 1, err
    (out / "000000.png").unlink()
    (out / "mine.txt").write_text("keep")
    assert main(args) == 2
    assert sorted(p.name for p in out.iterdir()) == ["000001.png", "mine.txt"]
    assert main([*args, "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["000000.png", "000001.png", "mine.txt"]
    (out / "0000001.png").write_text("not one of ours: seven digits")
    assert main([*args[:3], "1", *args[4:], "--overwrite"]) == 0  # --num 1 after --num 2
    assert sorted(p.name for p in out.iterdir()) == ["000000.png", "0000001.png", "mine.txt"]
    assert (out / "mine.txt").read_text() == "keep"


def test_a_sample_call_that_fails_partway_leaves_out_as_it_was(tiny_teacher, tmp_path, monkeypatch, capsys):
    """--overwrite with a call that fails after its first batch: --out keeps the earlier call's images byte for byte
    (none replaced, none added), and no staging folder is left; into a new --out, nothing is created."""
    import fastdiff.inference.sampling as sampling

    out = tmp_path / "out"
    args = ["sample", tiny_teacher, "--num", "4", "--steps", "1", "--batch-size", "2", "--out", str(out)]
    assert main(args) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real = sampling.sample_model

    def fails_after_one_batch(*a, **k):
        batches = real(*a, **k)
        yield next(batches)
        raise FastdiffError("stopped partway")

    monkeypatch.setattr(sampling, "sample_model", fails_after_one_batch)
    assert main([*args, "--seed", "7", "--overwrite"]) == 2
    assert "stopped partway" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert main([*args[:-1], str(tmp_path / "new")]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_sample_refuses_its_model_folder_as_out_and_a_zero_batch_size(tiny_teacher, tmp_path, capsys):
    """--out the model folder itself is refused even with --overwrite (the model is left as it was); --batch-size 0
    is one line, not a traceback."""
    before = sorted(str(p.relative_to(tiny_teacher)) for p in Path(tiny_teacher).rglob("*"))
    assert main(["sample", tiny_teacher, "--num", "1", "--steps", "1", "--out", tiny_teacher, "--overwrite"]) == 2
    err = capsys.readouterr().err.strip()
    assert "is the model folder itself" in err and len(err.splitlines()) == 1, err
    assert sorted(str(p.relative_to(tiny_teacher)) for p in Path(tiny_teacher).rglob("*")) == before
    assert main(["sample", tiny_teacher, "--num", "2", "--steps", "1", "--batch-size", "0",
                 "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip()
    assert "must be positive" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "s").exists()


def test_prompts_for_a_model_without_text_are_refused_as_such_not_as_a_count(tiny_teacher, tmp_path, capsys):
    """Three prompts for two images of an unconditional model: the error names the real problem (no text input)."""
    (tmp_path / "p.txt").write_text("a shoe\na bag\na hat\n")
    assert main(["sample", tiny_teacher, "--num", "2", "--steps", "1", "--out", str(tmp_path / "s"),
                 "--prompts", str(tmp_path / "p.txt")]) == 2
    err = capsys.readouterr().err.strip()
    assert "--prompts is for text-to-image models; this one is unconditional" in err, err
    assert not (tmp_path / "s").exists()


def test_one_prompt_is_paired_with_every_image(tmp_path):
    """--prompts with one line and --num 3: three prompts, one per image (sample_model slices them per batch)."""
    from fastdiff.cli import _paired_prompts

    (tmp_path / "p.txt").write_text("a red shoe\n")
    assert _paired_prompts(str(tmp_path / "p.txt"), 3, SimpleNamespace(conditioning="text")) == ["a red shoe"] * 3


@pytest.mark.parametrize("command", ["fid", "clip-score"])
def test_json_in_a_missing_folder_is_refused_before_anything_loads(tmp_path, capsys, command):
    target = tmp_path / "no-such-folder" / "r.json"
    extra = ["--ref", str(tmp_path / "ref.npz")] if command == "fid" else ["--prompts", str(tmp_path / "p.txt")]
    assert main([command, str(tmp_path / "images"), *extra, "--json", str(target)]) == 2
    err = capsys.readouterr().err.strip()
    assert f"--json {target}: folder {target.parent} does not exist" in err and len(err.splitlines()) == 1, err


def test_ref_stats_takes_kid_features_zero_and_names_a_missing_npz(tmp_path, capsys):
    """--kid-features 0 (no KID features) is allowed: the run gets as far as the missing source, which is named as
    missing, not as an unreadable .npz."""
    for source, extra in ((tmp_path / "nope", ["--kid-features", "0"]), (tmp_path / "nope.npz", [])):
        assert main(["ref-stats", str(source), "--out", str(tmp_path / "o.npz"), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert f"{source}: no such file or folder" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "o.npz").exists()


def test_fid_refuses_prompts_with_images(tmp_path, capsys):
    """--prompts would be silently ignored for a folder of images: refused before any feature is computed."""
    from fastdiff.evaluation.metrics import ReferenceStats

    ref = tmp_path / "ref.npz"
    ReferenceStats(mu=np.zeros(4), sigma=np.eye(4), n=10, extractor="tf-inception-2015-12-05", resize="nv-bilinear",
                   image_shape=(1, 8, 8), name="x10").save(ref)
    (tmp_path / "imgs").mkdir()
    Image.new("L", (8, 8)).save(tmp_path / "imgs" / "0.png")
    (tmp_path / "p.txt").write_text("a shoe\n")
    assert main(["fid", str(tmp_path / "imgs"), "--ref", str(ref), "--prompts", str(tmp_path / "p.txt")]) == 2
    err = capsys.readouterr().err.strip()
    assert "--prompts samples a text-to-image model" in err and len(err.splitlines()) == 1, err


def test_offline_is_any_value_but_empty_or_zero(monkeypatch):
    from fastdiff.machine import offline

    monkeypatch.delenv("FASTDIFF_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert not offline()
    monkeypatch.setenv("FASTDIFF_OFFLINE", "1")
    assert offline()


def test_cpu_name_is_the_model_name_value(monkeypatch):
    """The value after the first colon (a CPU name may hold colons itself), as benchmark results record it."""
    from fastdiff import machine

    cpuinfo = "processor\t: 0\nmodel name\t: Fake CPU v2 @ 3.0GHz: rev 7\nflags\t: fpu\n"
    monkeypatch.setattr(machine, "Path", lambda path: SimpleNamespace(read_text=lambda: cpuinfo))
    assert machine.cpu_name() == "Fake CPU v2 @ 3.0GHz: rev 7"


def test_fid_json_records_the_model_steps_and_levels(tmp_path, monkeypatch, capsys):
    """What `fastdiff fid --json` adds to the metric's result for a sampled model: its --steps and --levels, the
    settings a reader needs to reproduce the number (the metric itself is faked: this checks the command)."""
    import fastdiff.cli as cli
    from fastdiff.evaluation import evaluate, images
    from fastdiff.evaluation.metrics import ReferenceStats

    ref = tmp_path / "ref.npz"
    ReferenceStats(mu=np.zeros(4), sigma=np.eye(4), n=10, extractor="tf-inception-2015-12-05", resize="nv-bilinear",
                   image_shape=(1, 8, 8), name="x10").save(ref)
    opened = {}

    def fake_source(spec, **kwargs):
        opened.update(kwargs)
        return SimpleNamespace(is_model=True, resolve_num=lambda n: n, cropped_shape=lambda crop: (1, 8, 8),
                               guidance_scale=None)

    monkeypatch.setattr(images, "open_source", fake_source)
    monkeypatch.setattr(cli, "_extractor", lambda args, resize, device: None)
    monkeypatch.setattr(evaluate, "evaluate", lambda *a, **kw: {"fid": 12.5, "fid_label": "FID@4(x10, nv-bilinear)"})
    out = tmp_path / "r.json"
    assert main(["fid", "student", "--ref", str(ref), "--num", "4", "--steps", "2", "--levels", "727,234",
                 "--json", str(out)]) == 0
    assert opened["levels"] == [727, 234] and opened["steps"] == 2
    assert json.loads(out.read_text()) == {"fid": 12.5, "fid_label": "FID@4(x10, nv-bilinear)", "steps": 2,
                                           "levels": "727,234"}
    assert capsys.readouterr().out.startswith("FID@4(x10, nv-bilinear) = 12.5000")
    # a model sampled at a guidance scale (given, or a guidance-embedded student's default) records it
    monkeypatch.setattr(images, "open_source", lambda spec, **kwargs: SimpleNamespace(
        is_model=True, resolve_num=lambda n: n, cropped_shape=lambda crop: (1, 8, 8), guidance_scale=2.5))
    assert main(["fid", "student", "--ref", str(ref), "--num", "4", "--steps", "2", "--json", str(out), "-q"]) == 0
    assert json.loads(out.read_text())["guidance_scale"] == 2.5


@pytest.mark.parametrize("command, config", [("tune", "fastdiff.training.tune:TuneConfig"),
                                             ("upscale", "fastdiff.training.upscale:UpscaleConfig")])
def test_help_names_every_key_its_set_takes(command, config, capsys):
    """tune and upscale list their --set keys in their help by hand (the help imports no torch, so it cannot read
    the dataclass): every field of the config is named there."""
    import dataclasses
    import importlib
    import re

    module, name = config.split(":")
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    keys = text[text.index("Keys:"):text.index("(training/")]  # the list only: option help names keys too
    missing = [f.name for f in dataclasses.fields(getattr(importlib.import_module(module), name))
               if not re.search(rf"\b{f.name}\b", keys)]
    assert not missing, f"fastdiff {command} --help does not name {missing}"
