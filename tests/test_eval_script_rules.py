"""The bookkeeping of the evaluation scripts, with the heavy parts (distillation, sampling, FID) replaced by fakes
that return fixed numbers: eval/cpu_ladder.py (which rows run, which start a student is compared with, verdicts,
rows replaced across invocations, the table), eval/teacher_vs_student.py (row plan, table, JSON arithmetic) and
eval/adaptive_fid.py (rows quoted from the ladder, --append, noise batches, table order). CPU only, no network."""
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import eval_script
from fastdiff.errors import FastdiffError


# ---------------------------------------------------------------------------------------------------- cpu_ladder


def _student(run: Path, **info):
    (run / "student").mkdir(parents=True, exist_ok=True)
    (run / "student" / "fastdiff.json").write_text(json.dumps(info))


def test_ladder_eval_steps_one_two_and_trained_count(tmp_path):
    lad = eval_script("cpu_ladder")
    assert lad.eval_steps("dmd2", tmp_path / "none") == [1]  # no export yet: a one-step student
    assert lad.eval_steps("cd", tmp_path / "none") == [1, 2]  # a few-step student also at 2
    _student(tmp_path / "tdm", num_steps=4)
    assert lad.eval_steps("tdm", tmp_path / "tdm") == [4]  # a K-step student only at K
    _student(tmp_path / "cd4", num_steps=4)
    assert lad.eval_steps("cd", tmp_path / "cd4") == [1, 2, 4]


def test_ladder_reflow_pairs_cover_every_image_trained_on(tmp_path, monkeypatch):
    lad = eval_script("cpu_ladder")
    made = []
    monkeypatch.setattr(lad, "make_pairs", lambda teacher, guidance, folder, num, args: made.append(num))
    args = SimpleNamespace(pairs=800, updates=200, batch_size=8)
    sets = lad.objective_settings("ddpm", "embedded:t", 1.0, "reflow", tmp_path, args)
    assert made == [1600]  # 200 updates x batch 8 > 800
    assert sets == ["data.name=pairs", f"data.path={tmp_path / 'runs' / 'ddpm-pairs'}", "student.sampler=ddim"]


def test_ladder_run_distill_counts_generator_updates_and_last_log(tmp_path, monkeypatch):
    lad = eval_script("cpu_ladder")
    run = tmp_path / "run"
    args = SimpleNamespace(data_path="d", batch_size=8, seed=0, set=None)

    def ok(cmd, **kw):
        _student(run, train_step=12, generator_updates=10)  # DisBack: 2 stage-1 steps train only its fake score
        (run / "metrics.jsonl").write_text('{"step": 10}\n{"step": 12}\n')
        return SimpleNamespace(returncode=0, stderr="")

    monkeypatch.setattr(lad, "subprocess", SimpleNamespace(run=ok))
    info = lad.run_distill("embedded:t", 1.0, "disback", run, args, [])
    assert (info["steps"], info["updates"], info["images_seen"], info["log"]) == (12, 10, 80, {"step": 12})
    monkeypatch.setattr(lad, "subprocess", SimpleNamespace(
        run=lambda cmd, **kw: SimpleNamespace(returncode=1, stderr="Traceback\n  line\nValueError: bad\n")))
    assert lad.run_distill("embedded:t", 1.0, "dmd2", run, args, [])["error"] == "ValueError: bad"


# Fixed FIDs per run folder (``<teacher>-<name>[-start]``) and step count; teacher rows by teacher path.
FIDS = {"embedded:a": {1: 300.0}, "embedded:b": {1: 200.0},
        "ddpm-dmd2-start": {1: 170.0}, "ddpm-cd-start": {2: 110.04}, "ddpm-tdm-start": {4: 60.66},
        "ddpm-dmd2": {1: 150.0}, "ddpm-cd": {1: 160.0, 2: 120.0}, "ddpm-tdm": {4: 53.61},
        "cond-dmd2-start": {1: 140.0}, "cond-cd-start": {2: 90.0}, "cond-tdm-start": {4: 50.0},
        "cond-dmd2": {1: 140.0}, "cond-cd": {1: 130.0, 2: 80.0}, "cond-tdm": {4: 40.0}}
SIGMAS = {"dmd2": 2.5, "sid": 2.5, "cd": 2.5, "tdm": None}  # cd shares dmd2's start here, so it lacks only step 2


def _fake_ladder(lad, monkeypatch, tmp_path, fids):
    calls = {"fid": [], "distill": []}

    def fid_rows(model, steps, guidance, ref, extractor, args):
        key = model if model.startswith("embedded:") else Path(model).parent.name
        calls["fid"].append((key, list(steps)))
        return [{"steps": k, "fid": fids[key][k], "fid_label": "FID@10", "kid": 0.1, "kid_std": 0.01} for k in steps]

    def run_distill(teacher, guidance, objective, run, args, extra, user_sets=True):
        extra = [*extra, *(args.set or [] if user_sets else [])]  # as the real one: the command's --set last
        calls["distill"].append((run.name, list(extra)))
        if objective == "sid":
            return {"error": "out of memory", "wall_seconds": 1.0}
        k = next((int(e.split("=")[1]) for e in extra if e.startswith("student.num_steps=")), 1)
        _student(run, num_steps=k)
        return {"wall_seconds": 12.4, "steps": 3, "updates": 3, "images_seen": 6, "log": {}}

    import fastdiff.evaluation.inception as inception
    import fastdiff.evaluation.metrics as metrics

    monkeypatch.setattr(lad, "fid_rows", fid_rows)
    monkeypatch.setattr(lad, "run_distill", run_distill)
    monkeypatch.setattr(lad, "start_sigma", lambda teacher, name, extra: SIGMAS[name])
    monkeypatch.setattr(lad, "plot", lambda result, path: None)
    monkeypatch.setattr(lad, "subprocess", SimpleNamespace(run=lambda *a, **k: SimpleNamespace(stdout="abc1234\n")))
    monkeypatch.setattr(lad, "TEACHERS", {"ddpm": ("embedded:a", 1.0), "cond": ("embedded:b", 2.0)})
    monkeypatch.setattr(inception, "InceptionFeatures", lambda *a: None)
    monkeypatch.setattr(metrics.ReferenceStats, "load", staticmethod(lambda path: SimpleNamespace(name="ref", n=10)))
    (tmp_path / "fmnist-train2000.npz").write_bytes(b"")  # the cached reference: never built here
    return calls


def _ladder_main(lad, monkeypatch, argv):
    monkeypatch.setattr(sys, "argv", ["cpu_ladder.py", *argv])
    lad.main()


def test_ladder_rows_starts_verdicts_and_rerun_replacement(tmp_path, monkeypatch, capsys):
    """Two teachers, objectives that share a start (dmd2, sid, cd at sigma 2.5: cd measures only the step it lacks),
    a K-step start of its own (tdm), a failed run; every verdict compares with its own teacher's start at the same
    step count (an equal FID is not below); a second invocation replaces the rows it measures again."""
    lad = eval_script("cpu_ladder")
    fids = {k: dict(v) for k, v in FIDS.items()}
    calls = _fake_ladder(lad, monkeypatch, tmp_path, fids)
    _ladder_main(lad, monkeypatch, ["--out", str(tmp_path), "--which", "ddpm,cond", "--objectives", "dmd2,sid,cd,tdm",
                                    "--updates", "3", "--batch-size", "2", "--teacher-nfe", "1"])
    tdm_start = "start (top, student.num_steps=4, student.sampler=ddim)"
    per_teacher = [("dmd2-start", [1]), ("dmd2", [1]), ("cd-start", [2]), ("cd", [1, 2]), ("tdm-start", [4]),
                   ("tdm", [4])]  # sid: dmd2's start, then a failed run; cd's start measures only step 2
    assert calls["fid"] == [("embedded:a", [1])] + [(f"ddpm-{r}", s) for r, s in per_teacher] + [
        ("embedded:b", [1])] + [(f"cond-{r}", s) for r, s in per_teacher]
    starts = {run: extra for run, extra in calls["distill"] if run.endswith("-start")}
    assert starts["ddpm-tdm-start"][-2:] == ["student.num_steps=4", "student.sampler=ddim"]
    rows = json.loads((tmp_path / "ladder.json").read_text())["rows"]
    got = [(r["teacher"], r["model"], r["steps"], r["fid"], r.get("verdict")) for r in rows]
    assert got == [
        ("ddpm", "teacher DDIM 1", 1, 300.0, None),
        ("ddpm", "start (sigma 2.5)", 1, 170.0, None),
        ("ddpm", "dmd2", 1, 150.0, "below its start (170.0)"),
        ("ddpm", "start (sigma 2.5)", 2, 110.04, None),
        ("ddpm", "cd", 1, 160.0, "below its start (170.0)"),
        ("ddpm", "cd", 2, 120.0, "NOT below its start (110.0)"),
        ("ddpm", tdm_start, 4, 60.66, None),
        ("ddpm", "tdm", 4, 53.61, "below its start (60.7)"),
        ("cond", "teacher DDIM 1", 1, 200.0, None),
        ("cond", "start (sigma 2.5)", 1, 140.0, None),
        ("cond", "dmd2", 1, 140.0, "NOT below its start (140.0)"),  # equal is not below
        ("cond", "start (sigma 2.5)", 2, 90.0, None),
        ("cond", "cd", 1, 130.0, "below its start (140.0)"),
        ("cond", "cd", 2, 80.0, "below its start (90.0)"),
        ("cond", tdm_start, 4, 50.0, None),
        ("cond", "tdm", 4, 40.0, "below its start (50.0)")]
    readme = (tmp_path / "README.md").read_text()
    assert "| ddpm | tdm | 4 | 53.6 | 0.1000 | 3 steps | 3 | 6 | 12 | abc1234 | below its start (60.7) |" in readme
    assert "| ddpm | start (sigma 2.5) | 2 | 110.0 | 0.1000 |  |  | 0 | 0 | abc1234 |  |" in readme
    assert "| ddpm | sid | | failed: out of memory | | | | | | | |" in readme
    assert "| cond | sid | | failed: out of memory | | | | | | | |" in readme

    # the second invocation: dmd2 on ddpm again, on a time budget; its start is reused, its rows replaced
    fids["ddpm-dmd2"][1], fids["embedded:a"][1] = 180.0, 301.0
    calls["fid"].clear()
    _ladder_main(lad, monkeypatch, ["--out", str(tmp_path), "--which", "ddpm", "--objectives", "dmd2",
                                    "--minutes", "2", "--teacher-nfe", "1"])
    assert calls["fid"] == [("embedded:a", [1]), ("ddpm-dmd2", [1])]
    rows = json.loads((tmp_path / "ladder.json").read_text())["rows"]
    assert len(rows) == 16 and len({(r["teacher"], r["model"], r["steps"]) for r in rows}) == 16
    dmd2 = [r for r in rows if (r["teacher"], r["model"]) == ("ddpm", "dmd2")]
    assert [(r["fid"], r["verdict"], r["minutes"], "budget_updates" in r) for r in dmd2] == [
        (180.0, "NOT below its start (170.0)", 2.0, False)]
    assert "| ddpm | dmd2 | 1 | 180.0 | 0.1000 | 2.0 min | 3 | 6 | 12 | abc1234 | NOT below its start (170.0) |" \
        in (tmp_path / "README.md").read_text()



def test_a_labelled_ladder_run_with_student_overrides_measures_its_own_start(tmp_path, monkeypatch, capsys):
    """After a default dmd2 row, `--set student.num_steps=2 --set train.lr_generator=1 --label dmd2-k2` compares with
    a start of its own, 2 steps, in its own run folder (it once reused the default 1-step start and raised
    StopIteration after training); the start run takes the --set's student keys, not its training ones."""
    lad = eval_script("cpu_ladder")
    fids = {"embedded:a": {1: 300.0}, "ddpm-dmd2-start": {1: 170.0}, "ddpm-dmd2": {1: 150.0},
            "ddpm-dmd2-start-student.num_steps-2": {2: 120.0}, "ddpm-dmd2-k2": {2: 100.0}}
    calls = _fake_ladder(lad, monkeypatch, tmp_path, fids)
    base = ["--out", str(tmp_path), "--which", "ddpm", "--objectives", "dmd2", "--updates", "1", "--teacher-nfe", ""]
    _ladder_main(lad, monkeypatch, base)
    _ladder_main(lad, monkeypatch, [*base, "--set", "student.num_steps=2", "--set", "train.lr_generator=1",
                                    "--label", "dmd2-k2"])
    rows = json.loads((tmp_path / "ladder.json").read_text())["rows"]
    k2 = next(r for r in rows if r["model"] == "dmd2-k2")
    assert (k2["start"], k2["steps"], k2["verdict"]) == (
        "start (sigma 2.5, student.num_steps=2)", 2, "below its start (120.0)")
    start_sets = dict(calls["distill"])["ddpm-dmd2-start-student.num_steps-2"]
    assert "student.num_steps=2" in start_sets and "train.lr_generator=1" not in start_sets
    assert start_sets[:3] == ["train.max_steps=1", "train.lr_generator=1e-30", "train.lr_critic=1e-30"]
    capsys.readouterr()

def test_ladder_start_label_rounds_sigma_to_three_figures(tmp_path, monkeypatch):
    lad = eval_script("cpu_ladder")
    calls = _fake_ladder(lad, monkeypatch, tmp_path, {"embedded:a": {}, "ddpm-cd-start": {1: 9.0, 2: 8.0},
                                                        "ddpm-cd": {1: 7.0, 2: 6.0}})
    monkeypatch.setitem(SIGMAS, "cd", 14.6123)
    _ladder_main(lad, monkeypatch, ["--out", str(tmp_path), "--which", "ddpm", "--objectives", "cd", "--updates", "1",
                                    "--teacher-nfe", ""])
    rows = json.loads((tmp_path / "ladder.json").read_text())["rows"]
    assert [r["model"] for r in rows] == ["start (sigma 14.6)", "start (sigma 14.6)", "cd", "cd"]
    assert calls["fid"] == [("ddpm-cd-start", [1, 2]), ("ddpm-cd", [1, 2])]


# --------------------------------------------------------------------------------------------- teacher_vs_student


def test_bench_steps_must_be_positive_and_not_empty():
    bench = eval_script("teacher_vs_student")
    assert bench._steps("1, 2,4") == [1, 2, 4]
    for text in ("0,1", "", ","):
        with pytest.raises(FastdiffError, match="positive"):
            bench._steps(text)


def test_bench_rows_scale_and_table_with_fakes(tmp_path, monkeypatch):
    """Teacher rows first (CFG only on the teacher), each row labelled with the step count its source samples,
    Inception seconds per 1000 images (not per row), the table's rounding and KID ± its std."""
    bench = eval_script("teacher_vs_student")
    teacher, student = tmp_path / "teacher", tmp_path / "student"
    teacher.mkdir(), student.mkdir()
    ref = SimpleNamespace(name="ref10", n=10, resize="nv-bilinear", extractor="fake", check_images=lambda *a: None)
    monkeypatch.setattr(bench.ReferenceStats, "load", staticmethod(lambda path: ref))
    monkeypatch.setattr(bench, "resolve_teacher_path", lambda model: model)
    monkeypatch.setattr(bench, "is_model_folder", lambda folder: True)
    monkeypatch.setattr(bench, "InceptionFeatures", lambda *a: SimpleNamespace(to=lambda device: None))
    scales = []

    def model_sources(folder, steps, seed, scale, device):
        scales.append((Path(folder).name, scale))
        return [SimpleNamespace(name=Path(folder).name, k=k, cropped_shape=lambda crop: (1, 8, 8)) for k in steps]

    def evaluate(src, ref, extractor, num, batch_size, crop):
        fid = (100.0 if src.name == "teacher" else 10.0) + src.k + 0.004
        return {"fid": fid, "fid_label": "FID@4", "kid": 0.12344, "kid_std": 0.00456, "images_per_second": 33.33,
                "feature_seconds": 0.5, "n": num}

    monkeypatch.setattr(bench, "model_sources", model_sources)
    monkeypatch.setattr(bench, "evaluate", evaluate)
    result = bench.run(str(teacher), [str(student)], "ref.npz", 4, [1, 4], [2, 1], guidance_scale=3.0, device="cpu")
    assert scales == [("teacher", 3.0), ("student", None)]
    assert [(r["kind"], r["steps"], r["fid"]) for r in result["rows"]] == [
        ("teacher", 1, 101.004), ("teacher", 4, 104.004), ("student", 2, 12.004), ("student", 1, 11.004)]
    assert result["feature_seconds_per_1000"] == pytest.approx(1000 * 4 * 0.5 / 16)  # 4 rows of 4 images
    md = bench.table(result)
    assert "| teacher | teacher | 4 | 104.00 | 0.1234 ± 0.0046 | 33.3 |" in md
    assert "| student | student | 2 | 12.00 | 0.1234 ± 0.0046 | 33.3 |" in md


# ---------------------------------------------------------------------------------------------------- adaptive_fid


def _ladder_json(path: Path, num=1000):
    rows = [{"teacher": "ddpm", "kind": "teacher", "steps": k, "fid": fid, "fid_label": "FID@1000", "kid": 0.1,
             "kid_std": 0.01, "commit": "c0"} for k, fid in ((1, 317.3), (10, 29.0))]
    rows.insert(0, {"teacher": "cond", "kind": "teacher", "steps": 10, "fid": 32.5, "fid_label": "FID@1000",
                    "kid": 0.2, "kid_std": 0.02})
    path.write_text(json.dumps({"num": num, "rows": rows}))


def _adaptive_args(tmp_path, **kw):
    args = dict(ladder_teacher=(10, 1), ladder=str(tmp_path / "ladder.json"), teacher="embedded:fmnist-ddpm", seed=0,
                num=1000, crop=28, student="s", ref="r.npz", sigma_refine=1.0, teacher_steps=2, critic_sigma=0.2,
                fractions=(0.5,), teacher_nfe=(2,), append=False, out=str(tmp_path))
    args.update(kw)
    return SimpleNamespace(**args)


def test_adaptive_ladder_rows_quote_the_ddpm_teacher_at_each_nfe(tmp_path):
    script = eval_script("adaptive_fid")
    _ladder_json(tmp_path / "ladder.json")
    rows = script.ladder_rows(_adaptive_args(tmp_path))
    assert [(r["row"], r["nfe"], r["fid"], r["refined_share"]) for r in rows] == [
        ("teacher ddim-10 (ladder)", 10.0, 29.0, None), ("teacher ddim-1 (ladder)", 1.0, 317.3, None)]
    with pytest.raises(FastdiffError, match="1000 images"):  # another FID@N is not the same row
        script.ladder_rows(_adaptive_args(tmp_path, num=500))


def _fake_adaptive(script, monkeypatch):
    seen = {"scored": [], "z": None}
    shape = SimpleNamespace(image_shape=(1, 2, 2), sample_shape=(1, 2, 2))
    monkeypatch.setattr(script, "load_sampler", lambda path, device: (None, shape))
    monkeypatch.setattr(script.ReferenceStats, "load", staticmethod(lambda path: SimpleNamespace(
        name="ref", n=10, resize="nv-bilinear", check_extractor=lambda e: None, check_images=lambda *a: None)))
    monkeypatch.setattr(script, "InceptionFeatures", lambda *a: SimpleNamespace(extractor_id="x", resize="nv-bilinear"))
    monkeypatch.setattr(script, "FeatureCache", lambda extractor, crop: (lambda samples: samples))
    monkeypatch.setattr(script, "subprocess", SimpleNamespace(run=lambda *a, **k: SimpleNamespace(stdout="c1\n")))

    def fid_kid(features, ref):
        seen["scored"].append(float(features))
        return {"fid": float(features), "fid_label": "FID@300", "kid": 0.0, "kid_std": 0.0}

    def sample_rows(student, teacher, z_batches, seed, *rest):
        seen["z"] = z_batches
        for i, (name, kind) in enumerate([("student", "student"), ("adaptive q=0.5", "adaptive")]):
            yield {"row": name, "kind": kind, "nfe": 1.0 + i, "refined_share": 0.5 * i, "samples": torch.tensor(i)}

    monkeypatch.setattr(script, "fid_kid", fid_kid)
    monkeypatch.setattr(script, "sample_rows", sample_rows)
    return seen


def test_adaptive_noise_batches_are_the_ladders(tmp_path, monkeypatch):
    script = eval_script("adaptive_fid")
    seen = _fake_adaptive(script, monkeypatch)
    script.run(_adaptive_args(tmp_path, num=300, seed=3, ladder_teacher=()), lambda result: None)
    want = [torch.randn((n, 1, 2, 2), generator=torch.Generator().manual_seed(3 + b)) for b, n in enumerate((250, 50))]
    assert len(seen["z"]) == 2 and all(torch.equal(z, w) for z, w in zip(seen["z"], want))


def test_adaptive_append_scores_only_new_rows_and_keeps_time(tmp_path, monkeypatch):
    script = eval_script("adaptive_fid")
    seen = _fake_adaptive(script, monkeypatch)
    _ladder_json(tmp_path / "ladder.json", num=300)
    args = _adaptive_args(tmp_path, num=300, ladder_teacher=(1,))
    first = script.run(args, lambda result: None)
    assert seen["scored"] == [0.0, 1.0]
    (tmp_path / "adaptive_fid.json").write_text(json.dumps({**first, "seconds": 100.0,
                                                            "rows": first["rows"][:1] + first["rows"][2:]}))
    seen["scored"].clear()
    again = script.run(_adaptive_args(tmp_path, num=300, ladder_teacher=(1,), append=True), lambda result: None)
    assert seen["scored"] == [1.0]  # the student row it has is sampled, not scored again
    assert [r["row"] for r in again["rows"]] == ["student", "teacher ddim-1 (ladder)", "adaptive q=0.5"]
    assert again["seconds"] >= 100.0  # the earlier run's time counts
    with pytest.raises(FastdiffError, match="critic_sigma"):
        script.run(_adaptive_args(tmp_path, num=300, append=True, critic_sigma=0.3), lambda result: None)
    # --append with every row done scores nothing and keeps the earlier time (it once lost "seconds" and the table
    # raised KeyError after all the sampling; the JSON it left then broke every later --append)
    (tmp_path / "adaptive_fid.json").write_text(json.dumps(again))
    seen["scored"].clear()
    saved = []
    same = script.run(_adaptive_args(tmp_path, num=300, ladder_teacher=(1,), append=True), saved.append)
    assert seen["scored"] == [] and same["seconds"] == again["seconds"] and "s." in script.table(saved[-1])


def test_adaptive_table_order_and_rounding():
    script = eval_script("adaptive_fid")
    row = dict(fid_label="FID@1000", kid=0.01234, kid_std=0.0, seconds=1.5)
    rows = [{**row, "row": "teacher ddim-1 (ladder)", "kind": "teacher", "nfe": 1.0, "refined_share": None,
             "fid": 317.34, "seconds": None},
            {**row, "row": "student", "kind": "student", "nfe": 1.0, "refined_share": 0.0, "fid": 105.54},
            {**row, "row": "adaptive q=0.5", "kind": "adaptive", "nfe": 3.0, "refined_share": 0.5, "fid": 80.0},
            {**row, "row": "random q=0.2", "kind": "random", "nfe": 2.404, "refined_share": 0.2, "fid": 99.0},
            {**row, "row": "adaptive q=0.1", "kind": "adaptive", "nfe": 2.2, "refined_share": 0.1, "fid": 90.0}]
    result = dict(versions=dict(python="3", torch="t", diffusers="d", fastdiff="f"), date="d", machine="m",
                  commit="c", seconds=9, teacher="t", student="s", num=1000, seed=0, reference="r", reference_n=2,
                  crop=28, critic_sigma=0.2, sigma_refine=1.0, teacher_steps=2, rows=rows)
    lines = [line for line in script.table(result).splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert lines == ["| student | 1.00 | 0.00 | 105.5 | 0.0123 | 1.5 |",
                     "| random q=0.2 | 2.40 | 0.20 | 99.0 | 0.0123 | 1.5 |",
                     "| adaptive q=0.1 | 2.20 | 0.10 | 90.0 | 0.0123 | 1.5 |",
                     "| adaptive q=0.5 | 3.00 | 0.50 | 80.0 | 0.0123 | 1.5 |",
                     "| teacher ddim-1 (ladder) | 1.00 | - | 317.3 | 0.0123 | - |"]
