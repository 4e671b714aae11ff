"""eval/teacher_vs_student.py end to end on the tiny teacher and a 2-step-trained student: rows for every
NFE and step count, the table and JSON written with machine, versions and date; bad input fails in seconds."""
import json

import numpy as np
import pytest

from fastdiff.cli import main as fastdiff_main
from conftest import eval_script
from test_export_e2e import distill
from test_fid import needs_inception




@pytest.mark.slow  # 11 s on 2 cores; the default suite keeps test_fid's FID checks
@needs_inception
def test_teacher_vs_student_table(tiny_teacher, tmp_path, capsys):
    student = distill(tiny_teacher, tmp_path / "run") / "student"
    np.savez(tmp_path / "real.npz", images=np.random.default_rng(0).integers(0, 256, (10, 8, 8), dtype=np.uint8))
    assert fastdiff_main(["ref-stats", str(tmp_path / "real.npz"), "--out", str(tmp_path / "ref.npz")]) == 0
    out = tmp_path / "bench"
    code = eval_script("teacher_vs_student").main(["--teacher", tiny_teacher, "--students", str(student), "--ref", str(tmp_path / "ref.npz"),
                          "--num", "4", "--teacher-nfe", "1,2", "--student-steps", "1,2", "--batch-size", "4",
                          "--out", str(out), "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    result = json.loads((out / "results.json").read_text())
    assert [(r["kind"], r["steps"]) for r in result["rows"]] == [("teacher", 1), ("teacher", 2), ("student", 1), ("student", 2)]
    assert all(r["fid_label"] == "FID@4(real10, nv-bilinear)" and r["images_per_second"] > 0 for r in result["rows"])
    assert {"machine", "versions", "date", "feature_seconds_per_1000"} <= set(result)
    md = (out / "table.md").read_text()
    assert "| student | student | 2 |" in md and "FID@4" in md


def test_teacher_vs_student_bad_input(tiny_teacher, tmp_path, capsys):
    bench = eval_script("teacher_vs_student")
    cases = [(["--teacher", tiny_teacher, "--ref", str(tmp_path / "none.npz"), "--out", str(tmp_path / "o")], "no such file"),
             (["--teacher", tiny_teacher, "--ref", "x.npz", "--teacher-nfe", "1,a", "--out", str(tmp_path / "o")], "comma-separated"),
             (["--teacher", tiny_teacher, "--ref", "x.npz", "--num", "0", "--out", str(tmp_path / "o")], "positive")]
    for argv, message in cases:
        assert bench.main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
