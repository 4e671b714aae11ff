"""Bad input found by a careless-user audit of the CLI (2026-11-30), held to the standard: one line on stderr, exit
2, nothing half-written, nothing existing deleted or overwritten. Each test failed on the code before its fix (seen
as a strict xfail first): the working directory or an input deleted by --overwrite, an input overwritten by --json,
tracebacks for out-of-range seeds, tune settings and an unallocatable batch, multi-line YAML and loading-bar noise,
messages naming another flag or no file, NaN guidance and more DDIM steps than timesteps accepted."""
import shutil
from pathlib import Path

import pytest
import yaml

from fastdiff.cli import main

FAST = ["train.max_steps=1", "train.batch_size=2", "objective.critic_updates=1", "train.sample_every=100",
        "train.num_sample_images=2", "train.report_to=none"]


def _sets(*items):
    return [a for item in items for a in ("--set", item)]


def _one_line(capsys, fragment=""):
    err = capsys.readouterr().err.strip()
    assert fragment in err and len(err.splitlines()) == 1, err
    return err


def _tree(folder: Path) -> list:
    return sorted((str(p.relative_to(folder)), p.read_bytes() if p.is_file() else b"") for p in folder.rglob("*"))


@pytest.fixture(scope="module")
def one_step_run(tiny_teacher, tmp_path_factory):
    """A 1-step distill run with one checkpoint and its exported student."""
    run = tmp_path_factory.mktemp("more_bad_input") / "run"
    assert main(["distill", "-q", *_sets(f"teacher.path={tiny_teacher}", f"output_dir={run}",
                                         "train.checkpoint_every=1", *FAST)]) == 0
    return run


@pytest.fixture(scope="module")
def class_runs(tiny_cond_teacher, tmp_path_factory):
    """Two finished student.classes runs ([0, 1] and [2]) of the class-conditional teacher, for msd --assemble."""
    root = tmp_path_factory.mktemp("more_bad_input_msd")
    for k, classes in enumerate(["[0,1]", "[2]"]):
        assert main(["distill", "-q", *_sets(f"teacher.path={tiny_cond_teacher}", f"output_dir={root / f'r{k}'}",
                                             f"student.classes={classes}", *FAST)]) == 0
    return root


# --- data lost -----------------------------------------------------------------------------------------------------

def test_empty_output_dir_with_overwrite_keeps_the_working_directory(tmp_path, monkeypatch, capsys, tiny_teacher):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "precious.txt").write_text("keep me")
    monkeypatch.chdir(cwd)
    rc = main(["distill", "-q", *_sets(f"teacher.path={tiny_teacher}", "output_dir=", *FAST), "--overwrite"])
    assert (cwd / "precious.txt").read_text() == "keep me"
    assert rc == 2
    _one_line(capsys, "output_dir")


@pytest.mark.parametrize("role", ["teacher", "teacher's parent", "data.path", "student.model"])
def test_overwrite_never_deletes_an_input_of_the_run(tmp_path, capsys, tiny_teacher, one_step_run, role):
    from PIL import Image

    teacher = tmp_path / "in" / "teacher"
    shutil.copytree(tiny_teacher, teacher)
    images = tmp_path / "in" / "images"
    images.mkdir()
    for i in range(4):
        Image.new("L", (8, 8), color=40 * i).save(images / f"{i}.png")
    student = tmp_path / "in" / "student"
    shutil.copytree(one_step_run / "student", student)
    sets, watched = [f"teacher.path={teacher}"], teacher
    if role == "teacher":
        sets.append(f"output_dir={teacher}")
    elif role == "teacher's parent":
        sets.append(f"output_dir={teacher.parent}")
    elif role == "data.path":
        sets += [f"output_dir={images}", "objective.gan=true", "data.name=imagefolder", f"data.path={images}"]
        watched = images
    else:
        sets += [f"output_dir={student}", f"student.model={student / 'unet'}"]
        watched = student
    before = _tree(watched)
    rc = main(["distill", "-q", *_sets(*sets, *FAST), "--overwrite"])
    assert watched.is_dir() and _tree(watched) == before, f"{role} folder changed"
    assert rc == 2
    _one_line(capsys, "output_dir")


def test_export_into_the_runs_checkpoints_keeps_them(tmp_path, capsys, one_step_run):
    run = tmp_path / "run"
    shutil.copytree(one_step_run, run)
    before = _tree(run / "checkpoints")
    rc = main(["export", str(run), "--out", str(run / "checkpoints"), "--overwrite"])
    assert _tree(run / "checkpoints") == before
    assert rc == 2
    _one_line(capsys, "--out")


def test_export_onto_the_runs_teacher_keeps_it(tmp_path, capsys, tiny_teacher, one_step_run):
    teacher, run = tmp_path / "teacher", tmp_path / "run"
    shutil.copytree(tiny_teacher, teacher)
    shutil.copytree(one_step_run, run)
    for config in (run / "config.yaml", run / "checkpoints" / "step-00000001" / "config.yaml"):
        data = yaml.safe_load(config.read_text())
        data["teacher"]["path"] = str(teacher)
        config.write_text(yaml.safe_dump(data, sort_keys=False))
    before = _tree(teacher)
    rc = main(["export", str(run), "--out", str(teacher), "--overwrite"])
    assert _tree(teacher) == before
    assert rc == 2
    _one_line(capsys, "teacher")


@pytest.mark.parametrize("target", ["a run being assembled", "a non-empty folder"])
def test_msd_assemble_never_replaces_a_folder_unasked(tmp_path, capsys, class_runs, target):
    runs = [tmp_path / "r0", tmp_path / "r1"]
    for k, run in enumerate(runs):
        shutil.copytree(class_runs / f"r{k}", run)
    out = runs[0]
    if target == "a non-empty folder":
        out = tmp_path / "mine"
        out.mkdir()
        (out / "precious.txt").write_text("keep me")
    before = _tree(out)
    rc = main(["msd", "-q", "--assemble", *map(str, runs), "--out", str(out)])
    assert _tree(out) == before
    assert rc == 2
    _one_line(capsys, "--out")


def test_json_result_never_overwrites_an_input(tmp_path, capsys, tiny_clip):
    from PIL import Image

    config, weights = tiny_clip
    images = tmp_path / "images"
    images.mkdir()
    for i in range(2):
        Image.new("RGB", (8, 8), color=(60 * i, 0, 0)).save(images / f"{i}.png")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a shoe\n")
    rc = main(["clip-score", str(images), "--prompts", str(prompts), "--json", str(prompts), "--clip-model",
               Path(config).stem, "--clip-config", config, "--clip-weights", weights, "--device", "cpu", "-q"])
    assert prompts.read_text() == "a shoe\n"
    assert rc == 2
    _one_line(capsys, "--json")


# --- tracebacks ----------------------------------------------------------------------------------------------------

def test_sample_seed_out_of_range_is_one_line(tmp_path, capsys, tiny_teacher):
    rc = main(["sample", tiny_teacher, "--num", "1", "--steps", "1", "--seed", "99999999999999999999",
               "--out", str(tmp_path / "s"), "-q"])
    assert rc == 2
    _one_line(capsys, "--seed")
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("setting", ["weight_decay=-1", "grad_clip=-1", "seed=99999999999999999999"])
def test_tune_settings_out_of_range_are_refused(tmp_path, capsys, one_step_run, setting):
    rc = main(["tune", str(one_step_run / "student"), "--targets", str(one_step_run / "samples"), "--out",
               str(tmp_path / "t"), "--device", "cpu", "-q", "--set", "steps=1", "--set", "batch_size=1",
               "--set", "num_sample_images=1", "--set", setting])
    assert rc == 2
    _one_line(capsys, setting.split("=")[0])
    assert not (tmp_path / "t").exists()


def test_batch_too_large_for_memory_is_one_line_and_leaves_no_run(tmp_path, capsys, tiny_teacher):
    rc = main(["distill", "-q", *_sets(f"teacher.path={tiny_teacher}", f"output_dir={tmp_path / 'out'}", *FAST,
                                       "train.batch_size=100000000000")])
    assert rc == 2
    _one_line(capsys, "train.batch_size")
    assert not (tmp_path / "out").exists()


# --- unclear or multi-line messages --------------------------------------------------------------------------------

def test_partition_file_with_bad_yaml_is_one_line(tmp_path, capsys, tiny_cond_teacher):
    bad = tmp_path / "parts.json"
    bad.write_text("[[0, 1],")
    rc = main(["msd", "-q", "--partition-file", str(bad),
               *_sets(f"teacher.path={tiny_cond_teacher}", f"output_dir={tmp_path / 'o'}", *FAST)])
    assert rc == 2
    _one_line(capsys, "--partition-file")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("component,text", [("scheduler/scheduler_config.json", "[1]"), ("unet/config.json", "{")])
def test_damaged_teacher_component_config_names_the_file(tmp_path, capsys, tiny_teacher, component, text):
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_teacher, teacher)
    (teacher / component).write_text(text)
    rc = main(["distill", "-q", *_sets(f"teacher.path={teacher}", f"output_dir={tmp_path / 'o'}", *FAST)])
    assert rc == 2
    _one_line(capsys, component.split("/")[-1])
    assert not (tmp_path / "o").exists()


# --- numbers that make no sense, accepted ---------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["sample", "pairs"])
def test_nan_guidance_is_refused(tmp_path, capsys, tiny_cond_teacher, command):
    out = tmp_path / "o"
    if command == "sample":
        argv = ["sample", tiny_cond_teacher, "--num", "1", "--steps", "1", "--guidance-scale", "nan"]
    else:
        argv = ["pairs", "--teacher", tiny_cond_teacher, "--num", "2", "--steps", "2", "--guidance", "nan"]
    rc = main([*argv, "--out", str(out), "-q"])
    assert rc == 2
    _one_line(capsys, "nan")
    assert not out.exists()


@pytest.mark.parametrize("command", ["sample", "pairs"])
def test_more_steps_than_the_teachers_timesteps_is_refused(tmp_path, capsys, tiny_teacher, command):
    import json

    teacher = tmp_path / "teacher"  # a 10-timestep schedule: 11 steps are too many, and quick to run
    shutil.copytree(tiny_teacher, teacher)
    config = teacher / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "num_train_timesteps": 10}))
    out = tmp_path / "o"
    if command == "sample":
        argv = ["sample", str(teacher), "--num", "1", "--steps", "11"]
    else:
        argv = ["pairs", "--teacher", str(teacher), "--num", "1", "--steps", "11", "--sampler", "ddim"]
    rc = main([*argv, "--out", str(out), "-q"])
    assert rc == 2
    _one_line(capsys, "timesteps")
    assert not out.exists()


def test_error_after_loading_a_text_to_image_model_is_one_line(tmp_path, capsys):
    import tiny_pipelines as tp

    sd = tp.sd_pipeline(tmp_path / "sd")
    capsys.readouterr()
    rc = main(["sample", str(sd), "--num", "1", "--steps", "1", "--out", str(tmp_path / "o"), "-q"])
    assert rc == 2
    _one_line(capsys, "pass --prompts")


@pytest.mark.parametrize("kind", ["empty folder", "file"])
def test_upscale_eval_images_errors_name_the_flag(tmp_path, capsys, kind):
    from PIL import Image
    from test_upscale import tiny_upscaler

    teacher = tiny_upscaler(tmp_path / "teacher")
    images = tmp_path / "hr"
    images.mkdir()
    for i in range(2):
        Image.new("RGB", (16, 16), color=(40 * i, 10, 10)).save(images / f"{i}.png")
    bad = tmp_path / "eval"
    if kind == "empty folder":
        bad.mkdir()
    else:
        bad.write_bytes((images / "0.png").read_bytes())
    capsys.readouterr()
    rc = main(["upscale", teacher, "--images", str(images), "--eval-images", str(bad), "--out", str(tmp_path / "o"),
               "--device", "cpu", "-q", "--set", "steps=1", "--set", "decoder_steps=1", "--set", "prompt=x"])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # (the loading bars: the test above)
    assert "--eval-images" in err, err
    assert not (tmp_path / "o").exists()


def test_pairs_never_write_into_their_teacher(tmp_path, capsys, tiny_teacher):
    """pairs --out the teacher folder (or one of its parts) with --overwrite wrote its shards into the teacher:
    refused in one line, the teacher unchanged."""
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_teacher, teacher)
    before = _tree(teacher)
    for out in (teacher, teacher / "unet"):
        rc = main(["pairs", "--teacher", str(teacher), "--num", "2", "--steps", "2", "--out", str(out), "-q",
                   "--overwrite"])
        assert rc == 2
        _one_line(capsys, "teacher")
    assert _tree(teacher) == before


def test_a_key_given_twice_in_a_config_is_one_line(tmp_path, capsys):
    """PyYAML keeps the last of two equal keys silently, so an edited line above a forgotten one did not apply:
    refused in one line naming the key and its line; a merge key's override stays allowed."""
    config = tmp_path / "c.yaml"
    config.write_text("train:\n  lr_generator: 1.0e-4\n  batch_size: 4\n  lr_generator: 2.0e-4\n")
    assert main(["distill", "--config", str(config), "--dry-run"]) == 2
    _one_line(capsys, "'lr_generator' given twice (line 4)")
    config.write_text("base: &b {batch_size: 4, max_steps: 3}\ntrain:\n  <<: *b\n  batch_size: 2\n")
    from fastdiff.config import _read_one_yaml

    assert _read_one_yaml(str(config))["train"] == {"batch_size": 2, "max_steps": 3}
