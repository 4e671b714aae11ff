"""The Fashion-MNIST quality harness at smoke scale: the teacher recipe trains a few steps and loads as a teacher,
the quality table grows by its missing rows and the runner distills, evaluates and writes its table. The real
table needs a GPU (issue 17)."""
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


@pytest.mark.parametrize("conditional", [False, pytest.param(True, marks=pytest.mark.slow)])  # 8 s each
def test_teacher_recipe_trains_and_loads(tmp_path, conditional, monkeypatch, capsys):
    """eval/train_teacher.py's main() as `python eval/train_teacher.py ARGV` runs it, in this process (a fresh one
    spends ~10 s importing torch and diffusers)."""
    _need(DATA)
    from conftest import eval_script
    from fastdiff.models.teacher import load_teacher

    out = tmp_path / "teacher"
    argv = ["train_teacher.py", "--out", str(out), "--steps", "2", "--batch-size", "4", "--warmup", "2",
            "--log-every", "1", "--data-path", str(DATA), "--device", "cpu"]
    monkeypatch.setattr(sys, "argv", argv + (["--conditional"] if conditional else []))
    eval_script("train_teacher").main()
    assert f"wrote {out}" in capsys.readouterr().out
    teacher = load_teacher(str(out))
    assert teacher.sample_shape == (1, 32, 32)
    assert teacher.num_classes == (10 if conditional else None)
    assert teacher.denoiser.prediction_type == ("v_prediction" if conditional else "epsilon")
    assert sum(p.numel() for p in teacher.model.parameters()) / 1e6 == pytest.approx(8.95, abs=0.01 + 0.01 * conditional)


def _quality(tmp_path, teachers, *extra) -> list[str]:
    """eval/fmnist_quality.py's arguments at smoke size (4 images per FID, NFE 1) in tmp_path."""
    return ["--out", str(tmp_path / "table"), "--work", str(tmp_path / "work"), "--teachers", str(teachers),
            "--data-path", str(DATA), "--nfe", "1", "--num", "4", "--ref-num", "4", "--batch-size", "4",
            "--device", "cpu", *extra]


def _load_quality():
    sys.path.insert(0, str(ROOT / "eval"))
    try:
        import fmnist_quality
    finally:
        sys.path.remove(str(ROOT / "eval"))
    return fmnist_quality


class _PixelMeasure:
    """Stands in for the Inception measurement (two 2048x2048 eigendecompositions per FID take seconds on a CPU;
    the slow test below measures for real): the mean pixel of 4 real samples from the row's model, per step count."""

    def __init__(self, args):
        self.args = args

    def model(self, folder, row, guidance):
        from fastdiff.evaluation.images import model_sources

        sources = model_sources(str(folder), row.steps, self.args.seed, guidance, self.args.device)
        return [{"steps": k, "fid": float(next(s.read(4, 4)).float().mean()), "fid_label": "mean-pixel@4",
                 "kid": None, "kid_std": None} for k, s in zip(row.steps, sources)]


def test_quality_table_grows_by_missing_rows(tmp_path, tiny_teacher, tiny_cond_teacher, capsys, monkeypatch):
    """--next picks the first missing rows that fit the budget (and whose teacher the GPU kit brought), a re-run
    row replaces its stored row, and fmnist.md is regenerated from fmnist.json. Tiny 8x8 teachers stand in for the
    reference ones."""
    fq = _load_quality()
    monkeypatch.setattr(fq, "Measure", _PixelMeasure)
    kit, full = tmp_path / "kit", tmp_path / "teachers"  # kit: what was packed for the first slice
    for folder in (kit, full):
        folder.mkdir()
        (folder / "fmnist-ddpm").symlink_to(tiny_teacher)
    (full / "fmnist-cond-vpred").symlink_to(tiny_cond_teacher)
    table_json, table_md = tmp_path / "table" / "fmnist.json", tmp_path / "table" / "fmnist.md"

    def run(teachers, *extra):
        fq.main(_quality(tmp_path, teachers, "--objectives", "", "--later", "", *extra))
        return capsys.readouterr().out

    def rows():
        return [(r["name"], r["config_hash"], r["wall_seconds"], r["results"][0]["fid"])
                for r in json.loads(table_json.read_text())["rows"]]

    # GPU estimates at 4 images: ~0.5 min per teacher row, +1 min for the reference statistics: 1.6 fits one row.
    assert run(kit, "--next", "--budget-minutes", "1.6", "--teachers-needed").split() == ["fmnist-ddpm"]
    assert "too big" in run(kit, "--next", "--budget-minutes", "1.2", "--plan")  # passed over, not a stall
    out = run(kit, "--next", "--budget-minutes", "1.6")
    first = rows()
    assert [r[0] for r in first] == ["ddpm-teacher"] and "stopping before cond-teacher" in out

    run(full, "--next")  # no budget: every missing row, and only those
    second = rows()
    assert [r[0] for r in second] == ["ddpm-teacher", "cond-teacher"] and second[0] == first[0]
    assert "| cond-teacher | fmnist-cond-vpred | teacher | 1 |" in table_md.read_text()

    run(full, "--rows", "ddpm-teacher", "--seed", "1")  # re-run with another seed: replaced in place
    third = rows()
    assert [r[0] for r in third] == ["ddpm-teacher", "cond-teacher"] and third[1] == second[1]
    assert third[0][1] != first[0][1] and third[0][3] != first[0][3]
    assert run(full, "--next", "--plan").split()[:2] == ["ddpm-teacher", "stale"]  # seed 0 wants it again
    assert run(full, "--next", "--plan", "--seed", "1").split()[:2] == ["ddpm-teacher", "done"]

    table_md.unlink()
    run(full, "--render")
    md = table_md.read_text()
    for name, _, _, fid in third:
        assert f"| {name} | " in md and f" | 1 | {fid:.2f} | " in md
    assert "Rows not measured yet: ddpm-dmd2, ddpm-sid, ddpm-sim, ddpm-cd, cond-dmd2" in md


@pytest.mark.slow
def test_quality_runner_smoke(tmp_path):
    """Rows end to end on the reference teacher with the real Inception FID@4: the teacher sweep, and distillation
    rows (one update each) measured at their step counts."""
    _need(DATA)
    _need(SHARED / "teachers" / "fmnist-ddpm")
    cmd = [sys.executable, str(ROOT / "eval" / "fmnist_quality.py"), "--rows",
           "ddpm-teacher,ddpm-dmd2,ddpm-cd,ddpm-meanflow",
           *_quality(tmp_path, SHARED / "teachers"), "--set", "train.max_steps=1", "--set", "train.batch_size=2",
           "--set", "train.num_sample_images=4", "--set", "train.mixed_precision=no"]
    subprocess.run(cmd, check=True, capture_output=True)
    rows = json.loads((tmp_path / "table" / "fmnist.json").read_text())["rows"]
    assert [(r["name"], [(m["steps"], m.get("levels")) for m in r["results"]]) for r in rows] == [
        ("ddpm-teacher", [(1, None)]), ("ddpm-dmd2", [(1, None)]), ("ddpm-cd", [(1, None), (2, None), (4, None)]),
        ("ddpm-meanflow", [(1, None), (2, None), (4, None), (2, "flow")])]  # meanflow: 2 steps on flow levels too
    assert all(r["images_seen"] == 2 and r["train_steps"] == 1 and r["train_minutes"] == 4.5 for r in rows[1:])
    # the curve: train.eval_every's FID at the start and at the last update (the run's only one), at --num images
    assert all([(c["step"], c["images_seen"], c["fid_label"][:6]) for c in r["curve"]] == [(0, 0, "FID@4("),
                                                                                          (1, 2, "FID@4(")]
               and r["curve"][0]["fid"] > 0 for r in rows[1:])
    assert all(m["fid"] > 0 and m["fid_label"].startswith("FID@4(") for r in rows for m in r["results"])
    assert (tmp_path / "table" / "logs" / "ddpm-cd-metrics.jsonl").is_file()
    assert sorted(p.name for p in (tmp_path / "table" / "grids").iterdir()) == [
        "ddpm-cd.png", "ddpm-dmd2.png", "ddpm-meanflow.png", "ddpm-teacher.png"]
    md = (tmp_path / "table" / "fmnist.md").read_text()
    assert "| ddpm-cd | fmnist-ddpm | cd | 4 |" in md and "| ddpm-meanflow | fmnist-ddpm | meanflow | 2 (flow levels) |" in md


def test_quality_chart(tmp_path):
    """The table's chart: the teacher's FID-NFE curve and each student's points per teacher folder, failed rows left
    out, written beside fmnist.md (where matplotlib is installed)."""
    pytest.importorskip("matplotlib")
    fq = _load_quality()

    def row(name, teacher, objective, fids, error=None):
        return {"name": name, "teacher": teacher, "objective": objective, "steps": sorted(fids), "error": error,
                "results": [{"steps": k, "fid": f, "fid_label": "FID@10k", "kid": None} for k, f in fids.items()],
                "wall_seconds": 60.0, "device": "cpu", "date": "2026-11-29", "commit": "0" * 12}

    table = {"rows": [row("ddpm-teacher", "fmnist-ddpm", "teacher", {4: 43.2, 1: 304.9, 10: 11.9}),
                      row("ddpm-cd", "fmnist-ddpm", "cd", {1: 20.0, 2: 9.0}),
                      row("ddpm-sid", "fmnist-ddpm", "sid", {}, error="RuntimeError: out of memory"),
                      row("cond-teacher", "fmnist-cond-vpred", "teacher", {1: 150.0})]}
    table["rows"][1]["results"].append({"steps": 2, "levels": "flow", "fid": 7.0, "fid_label": "FID@10k", "kid": None})
    assert fq.nfe_series(table) == {"fmnist-ddpm": {"teacher": [(1, 304.9), (4, 43.2), (10, 11.9)],
                                                     "cd": [(1, 20.0), (2, 9.0)]},
                                     "fmnist-cond-vpred": {"teacher": [(1, 150.0)]}}
    fq.write_table(tmp_path, table)
    assert (tmp_path / "fmnist.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "fmnist.md").read_text()
    assert "fmnist.png" in md and not [p for p in tmp_path.iterdir() if ".tmp" in p.name]
    assert not (tmp_path / "fmnist-curves.png").exists() and "fmnist-curves.png" not in md  # no curve measured yet
    # --curve-every: the FIDs measured while a student trained, against the images it had seen
    table["rows"][1]["curve"] = [{"step": s, "images_seen": 256 * s, "fid": f, "fid_label": "FID@1k"}
                                 for s, f in ((500, 60.0), (1000, 31.0))]
    assert fq.curve_series(table) == {"fmnist-ddpm": {"cd": [(128000, 60.0), (256000, 31.0)]}}
    (tmp_path / "logs").mkdir()  # a row's training log (fmnist_quality keeps each run's metrics.jsonl there)
    (tmp_path / "logs" / "ddpm-cd-metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "loss_cd": 1.0 / s, "grad_norm_generator": 2.0}) + "\n" for s in (1, 2)))
    fq.write_table(tmp_path, table)
    assert (tmp_path / "fmnist-curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "fmnist-curves.png" in (tmp_path / "fmnist.md").read_text()
    assert (tmp_path / "logs" / "ddpm-cd-curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # its loss curves
    assert "| ddpm-cd | fmnist-ddpm | cd | 2 (flow levels) | 7.00 |" in md  # in the table, not on the NFE curve


def _bare_checkout(tmp_path, **env) -> tuple[Path, dict]:
    """A copy of the tree as the GPU machine gets it (not installed, no .git) and the environment to run
    eval/gpu_round.sh there: this environment's editable-install finder is dropped from every python the script
    starts (it would resolve fastdiff.pipelines, or fastdiff itself, to this repository)."""
    import os
    import shutil

    checkout, site = tmp_path / "checkout", tmp_path / "site"
    for folder in ("fastdiff", "pipelines", "eval", "tests"):
        shutil.copytree(ROOT / folder, checkout / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    site.mkdir()
    (site / "sitecustomize.py").write_text("import sys\nsys.meta_path[:] = [f for f in sys.meta_path if "
                                           "'__editable__' not in getattr(f, '__module__', '')]\n")
    return checkout, {**os.environ, "OUT": str(tmp_path / "out"), "ROUND_WORK": str(tmp_path / "work"),
                      "PYTHON": sys.executable, "FASTDIFF_COMMIT": "0123456789ab", "PYTHONPATH": str(site), **env}


@pytest.mark.slow
def test_preflight_gpu_round_in_a_bare_checkout(tmp_path):
    """eval/gpu_round.sh as the GPU machine runs it (``_bare_checkout``; the first slice failed there on the
    missing pipelines/ inside fastdiff/), with a deadline, the speed table skipped: it must leave round.log, the
    merged table and the extras archive in $OUT/round, the student row measured, and the committed table
    untouched. Pre-flight before packing a slice (eval/README.md)."""
    import tarfile

    _need(DATA)
    _need(SHARED / "teachers" / "fmnist-ddpm")
    fmnist_args = ["--which", "ddpm", "--objectives", "dmd2", "--later=", "--nfe", "1", "--num", "4", "--ref-num", "4",
                   "--batch-size", "4", "--device", "cpu", "--train-minutes", "0.1", "--data-path", str(DATA),
                   "--set", "train.max_steps=1", "--set", "train.batch_size=2", "--set", "train.num_sample_images=4",
                   "--set", "train.mixed_precision=no"]
    checkout, env = _bare_checkout(tmp_path, TEACHERS=str(SHARED / "teachers"), SPEED="never",
                                   FMNIST_ARGS=" ".join(fmnist_args))
    committed = (checkout / "eval" / "results" / "fmnist" / "fmnist.json").read_text()
    done = subprocess.run(["bash", "eval/gpu_round.sh", "6"], cwd=checkout, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    round_dir = tmp_path / "out" / "round"
    assert sorted(p.name for p in round_dir.iterdir()) == ["fmnist-extras.tar.gz", "fmnist.json", "fmnist.md",
                                                          "round.log"]
    rows = {r["name"]: r for r in json.loads((round_dir / "fmnist.json").read_text())["rows"]}
    assert not rows["ddpm-dmd2"].get("error") and rows["ddpm-dmd2"]["results"][0]["fid"] > 0
    assert rows["ddpm-dmd2"]["commit"] == "0123456789ab"
    with tarfile.open(round_dir / "fmnist-extras.tar.gz") as tar:
        assert "./grids/ddpm-dmd2.png" in tar.getnames()
    assert (checkout / "eval" / "results" / "fmnist" / "fmnist.json").read_text() == committed


@pytest.mark.slow
def test_preflight_gpu_round_memory_row_in_a_bare_checkout(tmp_path):
    """MEMORY_ROW=1 (issue 19's GPU row, eval/memory.py --sd15-gpu) the same way, at a tiny shape (MEMORY_ARGS):
    memory.py does not put the root on sys.path, gpu_round.sh does; all three rows land in round/."""
    checkout, env = _bare_checkout(tmp_path, TEACHERS=str(tmp_path / "no-teachers"), SPEED="never", MEMORY_ROW="1",
                                   MEMORY_SECONDS="200", MEMORY_ARGS="--width 0.05 --latent 8 --batch-size 1")
    done = subprocess.run(["bash", "eval/gpu_round.sh", "4"], cwd=checkout, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads((tmp_path / "out" / "round" / "memory.json").read_text())
    assert [(r["objective"], r["gradient_checkpointing"]) for r in result["rows"]] == [
        ("dmd2", False), ("dmd2", True), ("sid", False)]
    assert "| dmd2 | full copy | on |" in (tmp_path / "out" / "round" / "memory.md").read_text()


@pytest.mark.slow
def test_preflight_every_row_config_dry_runs_on_its_teacher(capsys):
    """Each eval/configs row builds its networks and objective on its reference teacher (``--dry-run``: a wrong
    objective setting, e.g. a stage_steps list of the wrong length, fails here, not in a GPU slice); ~17 s."""
    from fastdiff.cli import main

    for config in sorted((ROOT / "eval" / "configs").glob("fmnist-*.yaml")):
        teacher = SHARED / "teachers" / ("fmnist-cond-vpred" if config.name.startswith("fmnist-cond") else "fmnist-ddpm")
        _need(teacher)
        code = main(["distill", "--config", str(config), "--dry-run", "--set", f"teacher.path={teacher}",
                     "--set", f"data.path={DATA}"])
        assert code == 0, f"{config.name}: {capsys.readouterr().err[-500:]}"
