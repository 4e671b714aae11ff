"""Bad input: one line on stderr saying what is wrong, exit status 2, nothing written.

| case                                   | expected message fragment                 |
|----------------------------------------|-------------------------------------------|
| teacher path does not exist            | does not exist                            |
| folder without a diffusers model       | no diffusers model found                  |
| model folder without scheduler         | no scheduler/scheduler_config.json        |
| unknown objective                      | unknown objective                         |
| unknown config key                     | unknown config key                        |
| wrong value type                       | expected int                              |
| data resolution != teacher resolution  | does not match the teacher's sample size  |
| missing data folder for the GAN head   | is not a folder                           |
| non-empty output_dir without --resume  | is not empty                              |
| export of a folder that is not a run   | is not a fastdiff run folder              |
| sample with --num 0                    | must be positive                          |
"""
import os
import subprocess
import sys

import pytest

from fastdiff.cli import main


def _distill(tmp_path, *sets):
    args = ["distill", "--set", f"output_dir={tmp_path / 'out'}", "--set", "train.max_steps=1"]
    for item in sets:
        args += ["--set", item]
    return main(args)


@pytest.mark.parametrize("sets,fragment", [
    (["teacher.path=/no/such/teacher"], "does not exist"),
    (["teacher.path={empty}"], "no diffusers model found"),
    (["teacher.path={no_scheduler}"], "no scheduler/scheduler_config.json"),
    (["teacher.path={teacher}", "objective.name=magic"], "unknown objective 'magic'"),
    (["teacher.path={teacher}", "train.bogus=1"], "unknown config key 'train.bogus'"),
    (["teacher.path={teacher}", "train.batch_size=big"], "train.batch_size: expected int"),
    (["teacher.path={teacher}", "objective.gan=true", "data.resolution=16", "data.path={data}"],
     "does not match the teacher's sample size"),
    (["teacher.path={teacher}", "objective.gan=true", "data.path=/no/data"], "is not a folder"),
])
def test_distill_bad_input(tmp_path, capsys, tiny_teacher, sets, fragment):
    (tmp_path / "empty").mkdir()
    (tmp_path / "no_scheduler" / "unet").mkdir(parents=True)
    (tmp_path / "no_scheduler" / "unet" / "config.json").write_text("{}")
    (tmp_path / "data").mkdir()
    fill = {"empty": tmp_path / "empty", "no_scheduler": tmp_path / "no_scheduler", "teacher": tiny_teacher,
            "data": tmp_path / "data"}
    rc = _distill(tmp_path, *[s.format(**fill) for s in sets])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert fragment in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_non_empty_output_dir_is_kept(tmp_path, capsys, tiny_teacher):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    rc = _distill(tmp_path, f"teacher.path={tiny_teacher}")
    assert rc == 2 and "is not empty" in capsys.readouterr().err
    assert (out / "precious.txt").read_text() == "keep me" and len(list(out.iterdir())) == 1


def test_export_and_sample_bad_input(tmp_path, capsys, tiny_teacher):
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "is not a fastdiff run folder" in capsys.readouterr().err
    assert main(["sample", tiny_teacher, "--num", "0", "--steps", "1", "--out", str(tmp_path / "s")]) == 2
    assert "must be positive" in capsys.readouterr().err
    assert not (tmp_path / "s").exists() and not (tmp_path / "x").exists()


def test_cli_process_exit_code_and_no_traceback(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "fastdiff", "distill", "--set", "teacher.path=/nope",
                           "--set", f"output_dir={tmp_path / 'o'}"], capture_output=True, text=True, env=env)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["fastdiff: error: teacher path '/nope' does not exist; "
                                                "pass a local diffusers folder (teacher.path)"]
    assert not (tmp_path / "o").exists()
