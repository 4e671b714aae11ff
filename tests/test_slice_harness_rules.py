"""The GPU-slice bookkeeping of the Fashion-MNIST quality table (eval/fmnist_quality.py), of eval/gpu_round.sh and of
eval/memory.py's tables, with the heavy parts (distillation, FID, the speed bench, training steps) replaced by fakes
that return fixed results: which rows a budget runs, what they are estimated to cost, when a stored row is done,
how results merge and render, and the minute arithmetic that splits a slice. All CPU, no network, < 3 s each."""
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import eval_script
from test_quality_harness import _load_quality

ROOT = Path(__file__).resolve().parents[1]
fq = _load_quality()


def _args(*argv, tmp=None):
    """fmnist_quality's arguments at the real table's size (FID@10k), work folder in tmp (no cached reference);
    no training curves unless asked for (their 0.3 min per student row is test_static_estimates' own case)."""
    extra = ["--work", str(tmp / "work")] if tmp else []
    if "--curve-every" not in argv:
        extra += ["--curve-every", "0"]
    return fq.parse([*argv, *extra] if any(a in argv for a in ("--rows", "--render")) else ["--next", *argv, *extra])


def _row(args, name):
    return next(r for r in fq.plan(args) if r.name == name)


def _stored(name, **kw):
    teacher = fq.TEACHERS[name.split("-")[0]][0]
    return {"name": name, "teacher": teacher, "objective": name.split("-", 1)[1], "steps": [1], "config_hash": "x",
            "wall_seconds": 60.0, "device": "cpu", "date": "2026-11-29", "commit": "0" * 12,
            "results": [{"steps": 1, "fid": 1.0, "fid_label": "FID@10k", "kid": None}], **kw}


# --- the plan, time limits and hashes ------------------------------------------------------------------------
def test_plan_runs_in_the_fixed_order_with_each_objectives_step_counts():
    args = _args()
    rows = fq.plan(args)
    assert [r.name for r in rows] == fq.ORDER  # merge sorts by ORDER: the plan and the table agree
    assert fq.ORDER[:5] == ["ddpm-teacher", "ddpm-dmd2", "ddpm-sid", "ddpm-sim", "ddpm-cd"]
    steps = {r.name: r.steps for r in rows}
    assert steps["ddpm-dmd2"] == [1] and steps["ddpm-cd"] == [1, 2, 4] and steps["ddpm-meanflow"] == [1, 2, 4]
    assert steps["ddpm-tdm"] == [4] and steps["ddpm-teacher"] == [1, 2, 4, 10, 25, 50]
    # the later objectives' rows are fmnist-ddpm's only: without that teacher there are none
    assert [r.name for r in fq.plan(_args("--which", "cond"))] == [f"cond-{o}" for o in ("teacher", *fq.OBJECTIVES)]


def test_train_minutes_is_the_smallest_of_config_cap_flag_and_hard_cap(tmp_path):
    assert fq.train_minutes(_row(_args(), "ddpm-dmd2"), _args()) == 4.5  # the config's time limit
    assert fq.train_minutes(_row(_args(), "ddpm-dmd2"), _args("--train-minutes", "2")) == 2.0
    assert fq.train_minutes(_row(_args(), "ddpm-dmd2"), _args("--train-minutes", "9")) == 4.5
    assert fq.train_minutes(_row(_args(), "ddpm-teacher"), _args()) is None
    (tmp_path / "fmnist-ddpm-dmd2.yaml").write_text("train:\n  time_limit_minutes: 8\n")
    long = _args("--configs", str(tmp_path))
    assert fq.train_minutes(_row(long, "ddpm-dmd2"), long) == fq.MAX_TRAIN_MINUTES == 5.0  # never above 5


def test_config_hash_changes_with_what_makes_a_result_and_not_with_paths(tmp_path):
    args = _args()
    base = fq.config_hash(_row(args, "ddpm-dmd2"), args)
    for flag in (("--seed", "1"), ("--num", "5000"), ("--ref-num", "100"), ("--crop", "32"),
                 ("--set", "train.lr_generator=1e-5"), ("--train-minutes", "2")):
        other = _args(*flag)
        assert fq.config_hash(_row(other, "ddpm-dmd2"), other) != base, flag
    # the same config content in another folder (the GPU machine's checkout): the same hash
    shutil.copy(ROOT / "eval" / "configs" / "fmnist-ddpm-dmd2.yaml", tmp_path / "fmnist-ddpm-dmd2.yaml")
    moved = _args("--configs", str(tmp_path))
    assert fq.config_hash(_row(moved, "ddpm-dmd2"), moved) == base
    (tmp_path / "fmnist-ddpm-dmd2.yaml").write_text((tmp_path / "fmnist-ddpm-dmd2.yaml").read_text() + "# edited\n")
    assert fq.config_hash(_row(moved, "ddpm-dmd2"), moved) != base  # an edited config reruns


def test_committed_table_rows_stay_done_under_the_default_plan():
    """A change to the hash's recipe would make every measured row stale, and the next slices re-measure them."""
    args = _args()
    table = fq.load_table(ROOT / "eval" / "results" / "fmnist")
    measured = [r for r in fq.plan(args) if fq.stored(table, r.name)]
    assert measured and all(fq.is_done(r, table, args) for r in measured), [r.name for r in measured]


# --- merging -------------------------------------------------------------------------------------------------
def test_merge_replaces_the_row_keeps_the_order_and_clears_its_overrun():
    table = {"rows": [_stored("cond-teacher"), _stored("ddpm-teacher")],
             "overruns": {"ddpm-dmd2": {"seconds": 600.0, "date": "d", "config_hash": "x"},
                          "cond-sid": {"seconds": 500.0, "date": "d", "config_hash": "x"}}}
    table = fq.merge(table, _stored("ddpm-dmd2", wall_seconds=1.0))
    assert [r["name"] for r in table["rows"]] == ["ddpm-teacher", "ddpm-dmd2", "cond-teacher"]
    assert list(table["overruns"]) == ["cond-sid"]  # the row ran to its end: no longer an overrun
    table = fq.merge(table, _stored("ddpm-dmd2", wall_seconds=2.0))  # re-run: replaced, not added
    assert [(r["name"], r["wall_seconds"]) for r in table["rows"]] == [
        ("ddpm-teacher", 60.0), ("ddpm-dmd2", 2.0), ("cond-teacher", 60.0)]


# --- estimates -----------------------------------------------------------------------------------------------
# Expected minutes are sums of a few constants of <= 2 decimals; float64 rounding is ~1e-15 of them: rel=1e-12.
@pytest.mark.parametrize("name, fixed, per_image", [
    ("ddpm-teacher", 0.5, 6 * 0.15 + 92 * 0.025),  # 6 FIDs, 1+2+4+10+25+50 NFE
    ("cond-teacher", 0.5, 6 * 0.15 + 92 * 0.025 * 2),  # CFG: two network calls per NFE
    ("ddpm-dmd2", 1.0 + 4.5, 0.3), ("ddpm-cd", 1.0 + 4.5, 3 * 0.3),  # start-up + time limit, FIDs
    ("ddpm-meanflow", 1.0 + 4.5, 4 * 0.3),  # 3 step counts + 2 steps on the flow levels
    ("ddpm-reflow", 1.0 + 1.5 + 4.5, 3 * 0.3)], ids=lambda v: v if isinstance(v, str) else "")  # + teacher pairs
def test_static_estimates(name, fixed, per_image):
    args, half = _args(), _args("--num", "5000")  # FIDs and teacher sampling scale with the images per FID
    assert fq.static_minutes(_row(args, name), args) == pytest.approx(fixed + per_image, rel=1e-12)
    assert fq.static_minutes(_row(half, name), half) == pytest.approx(fixed + per_image / 2, rel=1e-12)
    curves = _args("--curve-every", "500")  # the default: FIDs while a student trains, 0.3 min a row in all
    student = not name.endswith("teacher")
    assert fq.static_minutes(_row(curves, name), curves) == pytest.approx(fixed + per_image + 0.3 * student,
                                                                         rel=1e-12)


def test_estimate_takes_a_measured_gpu_rows_time_with_its_time_limit_adjusted():
    args = _args("--train-minutes", "2")
    gpu = dict(device_type="cuda", num=10000, wall_seconds=420.0, train_minutes=4.5)
    row = _row(args, "ddpm-dmd2")
    assert fq.estimate_minutes(row, {"rows": [_stored("ddpm-dmd2", **gpu)]}, args) == pytest.approx(7 - 4.5 + 2)
    static = 1.0 + 2 + 0.3
    for unusable in (dict(gpu, device_type="cpu"), dict(gpu, num=5000), dict(gpu, error="RuntimeError: OOM")):
        assert fq.estimate_minutes(row, {"rows": [_stored("ddpm-dmd2", **unusable)]}, args) == pytest.approx(static)


def test_estimate_scales_up_by_slower_gpu_rows_of_the_same_kind_never_down():
    args = _args()
    sid, teacher = _row(args, "ddpm-sid"), _row(args, "ddpm-teacher")
    slow = {"rows": [_stored("ddpm-dmd2", device_type="cuda", num=10000, wall_seconds=2 * 5.8 * 60, train_minutes=4.5)]}
    assert fq.estimate_minutes(sid, slow, args) == pytest.approx(2 * 5.8)  # took twice its static estimate
    assert fq.estimate_minutes(teacher, slow, args) == pytest.approx(3.7)  # a student row says nothing of teachers
    fast = {"rows": [_stored("ddpm-dmd2", device_type="cuda", num=10000, wall_seconds=0.5 * 5.8 * 60, train_minutes=4.5)]}
    assert fq.estimate_minutes(sid, fast, args) == pytest.approx(5.8)


def test_overrun_raises_the_estimate_above_what_the_row_ran_while_its_config_holds():
    args = _args()
    row = _row(args, "ddpm-dmd2")
    over = {"seconds": 600.0, "date": "d", "config_hash": fq.config_hash(row, args)}
    assert fq.estimate_minutes(row, {"rows": [], "overruns": {"ddpm-dmd2": over}}, args) == pytest.approx(11.0)
    stale = dict(over, config_hash="0" * 12)  # the config changed since: the old overrun says nothing
    assert fq.estimate_minutes(row, {"rows": [], "overruns": {"ddpm-dmd2": stale}}, args) == pytest.approx(5.8)


# --- what fits a budget --------------------------------------------------------------------------------------
def test_fits_charges_the_reference_statistics_once_and_passes_over_too_big_rows(tmp_path):
    empty = {"rows": []}
    args = _args("--budget-minutes", "11", tmp=tmp_path)
    todo = [_row(args, n) for n in ("ddpm-teacher", "ddpm-dmd2", "ddpm-sid")]
    # 3.7 + 1 (reference) + 5.8 = 10.5 fits 11; + 5.8 does not: the slice stops there
    assert [r.name for r in fq.fits(todo, empty, args)] == ["ddpm-teacher", "ddpm-dmd2"]
    args = _args("--budget-minutes", "6.5", tmp=tmp_path)
    assert fq.too_big(_row(args, "ddpm-dmd2"), empty, args)  # 5.8 + 1 reference > 6.5: no slice of 6.5 fits it
    small = _args("--budget-minutes", "6", "--nfe", "1", tmp=tmp_path)
    todo = [_row(small, "ddpm-dmd2"), _row(small, "ddpm-teacher")]
    assert [r.name for r in fq.fits(todo, empty, small)] == ["ddpm-teacher"]  # passed over, not a stall


def test_fits_counts_cached_reference_statistics_and_leaves_named_rows_alone(tmp_path):
    args = _args("--budget-minutes", "9.6", tmp=tmp_path)
    todo = [_row(args, "ddpm-teacher"), _row(args, "ddpm-dmd2")]
    assert [r.name for r in fq.fits(todo, {"rows": []}, args)] == ["ddpm-teacher"]  # 3.7 + 1 + 5.8 > 9.6
    fq.reference_file(args).parent.mkdir(parents=True)
    fq.reference_file(args).write_bytes(b"")  # made by an earlier row of this slice: 3.7 + 5.8 <= 9.6
    assert [r.name for r in fq.fits(todo, {"rows": []}, args)] == ["ddpm-teacher", "ddpm-dmd2"]
    named = _args("--rows", "ddpm-dmd2,ddpm-sid", "--budget-minutes", "1", tmp=tmp_path)
    todo = fq.select(fq.plan(named), {"rows": []}, named)
    assert [r.name for r in fq.fits(todo, {"rows": []}, named)] == ["ddpm-dmd2", "ddpm-sid"]


@pytest.mark.parametrize("row_seconds, ran", [(100, ["ddpm-teacher", "cond-teacher"]), (120, ["ddpm-teacher"])])
def test_next_counts_the_minutes_spent_and_the_reference_made_by_the_first_row(tmp_path, monkeypatch, capsys,
                                                                               row_seconds, ran):
    """Budget 2.5 min, teacher rows at NFE 1 (0.675 and 0.7 min), each taking ``row_seconds`` of a fake clock: the
    second row fits after 100 s (1.67 + 0.7, the reference already made by the first row), not after 120 s."""
    clock = SimpleNamespace(now=1000.0)
    monkeypatch.setattr(fq, "time", SimpleNamespace(time=lambda: clock.now, strftime=lambda f: "2026-11-30"))
    monkeypatch.setattr(fq.signal, "signal", lambda *a: None)
    monkeypatch.setattr(fq, "Measure", lambda args: object())  # no Inception, no reference file written
    monkeypatch.setattr(fq, "plot", lambda *a: None)
    calls = []

    def fake_run_row(row, args, measure_fn):
        measure_fn()  # what the real rows do first: make (or load) the reference statistics
        clock.now += row_seconds
        calls.append(row.name)
        return _stored(row.name, wall_seconds=float(row_seconds), config_hash=fq.config_hash(row, args))

    monkeypatch.setattr(fq, "run_row", fake_run_row)
    for t in ("fmnist-ddpm", "fmnist-cond-vpred"):
        (tmp_path / "teachers" / t).mkdir(parents=True)
    fq.main(["--next", "--budget-minutes", "2.5", "--objectives", "", "--later", "", "--nfe", "1", "--device", "cpu",
             "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"), "--teachers", str(tmp_path / "teachers")])
    assert calls == ran
    capsys.readouterr()



def test_a_too_big_row_is_passed_over_before_its_missing_teacher_stops_the_slice(tmp_path, monkeypatch, capsys):
    """The kit packs only the teachers of rows that fit (--teachers-needed, through fits). Here cond-teacher (no kit
    folder) is too big for 6.5 minutes and ddpm-rcm fits: the slice passes over cond-teacher and runs ddpm-rcm, as
    --plan promised (it once stopped at cond-teacher's missing folder and ran nothing)."""
    monkeypatch.setattr(fq.signal, "signal", lambda *a: None)
    monkeypatch.setattr(fq, "Measure", lambda args: object())
    monkeypatch.setattr(fq, "plot", lambda *a: None)
    ran = []
    monkeypatch.setattr(fq, "run_row", lambda row, args, m: ran.append(row.name) or _stored(
        row.name, config_hash=fq.config_hash(row, args)))
    argv = ["--next", "--budget-minutes", "6.5", "--which", "ddpm,cond", "--objectives", "", "--later", "rcm",
            "--train-minutes", "2", "--device", "cpu", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "w"),
            "--teachers", str(tmp_path / "kit")]
    args = fq.parse(argv)
    teacher = fq.plan(args)[0]
    assert teacher.name == "ddpm-teacher"
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "fmnist.json").write_text(json.dumps({"rows": [_stored(
        "ddpm-teacher", steps=teacher.steps, config_hash=fq.config_hash(teacher, args))]}))
    table = fq.load_table(tmp_path / "out")
    cond, rcm = (_row(args, n) for n in ("cond-teacher", "ddpm-rcm"))
    assert fq.too_big(cond, table, args) and not fq.too_big(rcm, table, args)  # the case this test is about
    fq.main([*argv, "--teachers-needed"])
    assert capsys.readouterr().out.split() == ["fmnist-ddpm"]  # what gpu_round.sh packs
    (tmp_path / "kit" / "fmnist-ddpm").mkdir(parents=True)
    fq.main(argv)
    assert ran == ["ddpm-rcm"]
    capsys.readouterr()

# --- rendering -----------------------------------------------------------------------------------------------
def test_render_shows_row_minutes_and_judges_the_targets():
    def row(name, fids, **kw):
        return _stored(name, steps=sorted(fids), results=[{"steps": k, "fid": f, "fid_label": "FID@10k", "kid": None}
                                                          for k, f in fids.items()], **kw)

    table = {"rows": [row("ddpm-teacher", {1: 300.0, 10: 12.0, 50: 5.0}, wall_seconds=180.0),
                      row("ddpm-dmd2", {1: 10.0}), row("ddpm-cd", {1: 15.0, 2: 4.0}),
                      row("cond-teacher", {1: 100.0, 10: 20.0}), row("cond-sid", {1: 8.0})]}
    md = fq.render(table)
    assert "| ddpm-teacher | fmnist-ddpm | teacher | 1 | 300.00 |" in md and "| 3.0 | cpu | 2026-11-29 |" in md
    assert fq.verdicts(table["rows"]) == [
        "fmnist-ddpm: dmd2 1-step 10.00 beats the teacher at NFE 10 (12.00)",
        "fmnist-ddpm: cd 1-step 15.00 does NOT beat the teacher at NFE 10 (12.00)",  # its 2-step 4.00 is no 1-step
        "fmnist-ddpm: best 1-step student dmd2 10.00 does NOT beat the teacher's best 5.00 (NFE 50)",
        "fmnist-cond-vpred: sid 1-step 8.00 beats the teacher at NFE 10 (20.00)",
        "fmnist-cond-vpred: best 1-step student sid 8.00 beats the teacher's best 20.00 (NFE 10)"]


# --- a distillation row's bookkeeping ------------------------------------------------------------------------
def test_distill_counts_images_seen_with_accumulation_and_trains_reflow_on_its_pairs(tmp_path, monkeypatch):
    commands = []

    def fake_run(cmd, **kw):
        commands.append(cmd)
        if "distill" in cmd:
            run = Path(next(a for a in cmd if a.startswith("output_dir=")).split("=", 1)[1])
            (run / "student").mkdir(parents=True)
            (run / "student" / "fastdiff.json").write_text(json.dumps({"train_step": 10}))
            (run / "config.yaml").write_text("train:\n  batch_size: 8\n  gradient_accumulation: 3\n")
            (run / "metrics.jsonl").write_text('{"images_per_second": 50}\n{"images_per_second": 100}\n')
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(fq.subprocess, "run", fake_run)
    args = _args("--pairs", "100", "--data-path", str(tmp_path / "data"), "--teachers", str(tmp_path / "t"),
                 tmp=tmp_path)
    info = fq.distill(_row(args, "ddpm-reflow"), args, tmp_path / "run", tmp_path / "logs" / "ddpm-reflow.log")
    assert (info["train_steps"], info["images_seen"], info["train_images_per_second"]) == (10, 240, 100)
    pairs, distill = commands
    assert pairs[pairs.index("--out") + 1] == str(tmp_path / "work" / "pairs-ddpm")
    sets = [distill[i + 1] for i, a in enumerate(distill) if a == "--set"]
    data = [s for s in sets if s.startswith("data.path=")]
    assert data[-1] == f"data.path={tmp_path / 'work' / 'pairs-ddpm'}"  # the last override wins: the pairs
    # a --set time limit cannot lift the row's cap (the row records and hashes the capped value): the cap comes last
    commands.clear()
    args = _args("--set", "train.time_limit_minutes=9", "--teachers", str(tmp_path / "t"), tmp=tmp_path)
    fq.distill(_row(args, "ddpm-dmd2"), args, tmp_path / "run2", tmp_path / "logs" / "ddpm-dmd2.log")
    sets = [commands[-1][i + 1] for i, a in enumerate(commands[-1]) if a == "--set"]
    limits = [s for s in sets if s.startswith("train.time_limit_minutes=")]
    assert limits[-1] == "train.time_limit_minutes=4.5" and len(limits) == 2


# --- eval/gpu_round.sh, with a fake python ---------------------------------------------------------------------
FAKE_PY = """#!/usr/bin/env bash
# fake python for eval/gpu_round.sh: logs each call; fmnist_quality.py --plan prints one ' run' row per ROWMIN
# minutes of the budget; -c (the speed table's completeness check) goes to the real python
if [ "$1" = -c ]; then exec {real} "$@"; fi
echo "$*" >> "$FAKE_LOG"
if [ "$1" = eval/fmnist_quality.py ]; then
  budget=$(echo "$*" | sed -n 's/.*--budget-minutes \\([0-9.]*\\).*/\\1/p')
  if [[ " $* " == *" --plan "* ]]; then
    n=$(awk "BEGIN {{ print int($budget / $ROWMIN) }}")
    for ((i = 0; i < n; i++)); do echo "row-$i missing ~ 1.0 min  run"; done
  elif [[ " $* " == *" --teachers-needed "* ]]; then
    echo fmnist-ddpm
  fi
fi
"""


def _sha16(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def _round_tree(tmp_path, speed=None, fresh=False, pycache=False):
    """A minimal tree for gpu_round.sh: the script, a fastdiff/ to hash, the committed speed table (``speed``:
    None for missing, else its sampling rows), its .source matching fastdiff/ when ``fresh``."""
    tree = tmp_path / "tree"
    (tree / "eval" / "results" / "fmnist").mkdir(parents=True)
    shutil.copy(ROOT / "eval" / "gpu_round.sh", tree / "eval" / "gpu_round.sh")
    (tree / "fastdiff").mkdir()
    (tree / "fastdiff" / "a.py").write_text("x = 1\n")
    if pycache:
        (tree / "fastdiff" / "__pycache__").mkdir()
        (tree / "fastdiff" / "__pycache__" / "a.cpython-312.pyc").write_bytes(os.urandom(8))
    if speed is not None:
        (tree / "eval" / "results" / "speed-nvidia-h200.json").write_text(json.dumps({"training": [1], "sampling": speed}))
        # fastdiff_sha: sha256sum's lines over the files sorted bytewise, hashed again (the __pycache__ left out)
        line = f"{hashlib.sha256(b'x = 1' + bytes([10])).hexdigest()}  fastdiff/a.py\n".encode()
        (tree / "eval" / "results" / "speed-nvidia-h200.source").write_text(_sha16(line) + "\n" if fresh else "old\n")
    fake = tmp_path / "fakepy"
    fake.write_text(FAKE_PY.format(real=sys.executable))
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    return tree, fake


def _pack_args(tmp_path, minutes, rowmin=4.0, **kw):
    """gpu_round.sh --pack-args MINUTES: (printed arguments, the budget its --teachers-needed call was given)."""
    env_over = {k: kw.pop(k) for k in list(kw) if k.isupper()}
    tree, fake = _round_tree(tmp_path, **kw)
    log = tmp_path / "calls.log"
    env = {**os.environ, "PYTHON": str(fake), "FAKE_LOG": str(log), "ROWMIN": str(rowmin),
           "ROUND_WORK": str(tmp_path / "work"), **env_over}
    done = subprocess.run(["bash", "eval/gpu_round.sh", "--pack-args", str(minutes)], cwd=tree, env=env,
                          capture_output=True, text=True, timeout=20)
    assert done.returncode == 0, done.stderr
    needed = [c for c in log.read_text().splitlines() if "--teachers-needed" in c]
    return done.stdout.split(), float(needed[0].split("--budget-minutes ")[1].split()[0])


def test_pack_args_makes_a_missing_speed_table_and_plans_the_rest(tmp_path):
    # 10 min: 600 s - 30 s reserve - 150 s speed table = 420 s for quality rows
    assert _pack_args(tmp_path, 10) == (["--xformers", "--teacher", "../shared/teachers/fmnist-ddpm"], 7.0)


def test_pack_args_skips_a_fresh_speed_table_even_with_speed_always(tmp_path):
    # SPEED=always re-measures a stale table only; __pycache__ beside fastdiff/'s sources is no change to them
    assert _pack_args(tmp_path, 10, speed=[1], fresh=True, pycache=True, SPEED="always") == (
        ["--teacher", "../shared/teachers/fmnist-ddpm"], 9.5)  # 600 - 30 s


@pytest.mark.parametrize("minutes, due", [(11, True), (10, False)])
def test_pack_args_remeasures_a_stale_speed_table_only_where_it_costs_no_quality_row(tmp_path, minutes, due):
    """Rows of 4 min: 11 min leaves 10.5 (2 rows) or 8.0 with the speed table (still 2): due; 10 min leaves 9.5 (2)
    or 7.0 (1): not due. The table here is fresh in content but incomplete (no sampling rows)."""
    printed, budget = _pack_args(tmp_path, minutes, speed=[], fresh=True)
    assert ("--xformers" in printed) == due
    assert budget == (minutes * 60 - 30 - 150 * due) / 60


@pytest.mark.parametrize("mode, minutes, due", [("always", 10, True), ("never", 11, False)])
def test_pack_args_speed_modes_override_the_auto_rule(tmp_path, mode, minutes, due):
    printed, _ = _pack_args(tmp_path, minutes, speed=[], fresh=True, SPEED=mode)
    assert ("--xformers" in printed) == due


def test_slice_caps_the_speed_table_and_gives_quality_rows_the_rest_less_the_reserve(tmp_path):
    tree, fake = _round_tree(tmp_path)  # speed table missing: due
    log = tmp_path / "calls.log"
    env = {**os.environ, "PYTHON": str(fake), "FAKE_LOG": str(log), "ROWMIN": "4", "ROUND_WORK": str(tmp_path / "work"),
           "OUT": str(tmp_path / "out")}
    t0 = time.monotonic()
    done = subprocess.run(["bash", "eval/gpu_round.sh", "4"], cwd=tree, env=env, capture_output=True, text=True,
                          timeout=60)
    elapsed = time.monotonic() - t0
    assert done.returncode == 0, done.stderr
    calls = log.read_text().splitlines()
    speed = next(c for c in calls if c.startswith("-m fastdiff bench speed"))
    assert speed.split("--time-budget ")[1].split()[0] == "120"  # cap min(240 - 30, 150) = 150, less 30 s
    quality = next(c for c in calls if c.startswith("eval/fmnist_quality.py --next") and "--plan" not in c)
    # 240 s - 30 s reserve, less the whole seconds the script had spent (at most this run's wall time, plus one for
    # whole-second clocks; printed to 0.01 minutes): a slow machine lowers it only by what it took
    budget = float(quality.split("--budget-minutes ")[1].split()[0])
    assert (210 - elapsed - 1) / 60 - 0.01 <= budget <= 3.5, (budget, elapsed)


# --- eval/memory.py's tables ----------------------------------------------------------------------------------


def _fake_row(cmd, peaks, setups, libraries=200.0):
    """The ROW lines a child (or each of its processes) prints, from the --row arguments of its command."""
    obj, fake, ckpt, sharding, *student = cmd[cmd.index("--row") + 1:]
    return "".join("ROW " + json.dumps({
        "objective": obj, "fake_lora_rank": int(fake), "student_lora_rank": int(student[0]) if student else 0,
        "sharding": sharding, "process": p, "libraries_mb": libraries, "gradient_checkpointing": ckpt == "1",
        "after_setup_mb": setups[p], "held_after_setup_mb": 100.0, "peak_mb": peaks[p], "step_seconds": 1.5,
        "trainable_parameters": 2_000_000}) + "\n" for p in range(len(peaks)))


def test_fsdp_table_takes_the_largest_process_and_compares_with_the_replicated_row(tmp_path, monkeypatch):
    memory = eval_script("memory")
    commands = []

    def fake_run(cmd, **kw):
        commands.append(cmd)
        sharded = cmd[cmd.index("--row") + 4] == "fsdp"
        peaks, setups = ((700.0, 800.0), (900.0, 950.0)) if sharded else ((1000.0, 1200.0), (1300.0, 1250.0))
        return SimpleNamespace(stdout=_fake_row(cmd, peaks, setups), stderr="")

    monkeypatch.setattr(memory.subprocess, "run", fake_run)
    monkeypatch.setattr(memory, "build_teacher", lambda *a: 10_000_000)
    args = SimpleNamespace(width=0.2, latent=32, batch_size=1, processes=2, networks="full", out=str(tmp_path))
    memory.fsdp_rows(args, tmp_path / "work")
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [(r["objective"], r["student_lora_rank"], r["sharding"], r["peak_mb"], r["setup_mb"]) for r in rows] == [
        ("dmd2", 0, "none", 1200.0, 1300.0), ("dmd2", 0, "fsdp", 800.0, 950.0),
        ("sid", 0, "none", 1200.0, 1300.0), ("sid", 0, "fsdp", 800.0, 950.0)]
    md = (tmp_path / "table.md").read_text()
    # 800 / 1200 - 1 = -33%; above libraries (800 - 200) / (1200 - 200) - 1 = -40%
    assert "| dmd2 | full student + full fake | fsdp | 950 | 100 | 800 | -33% | 600 | -40% | 1.50 |" in md
    assert "| dmd2 | full student + full fake | none | 1300 | 100 | 1200 | +0% | 1000 | +0% | 1.50 |" in md


def test_sd15_gpu_rows_run_at_batch_4_and_the_first_row_ignores_the_time_budget(tmp_path, monkeypatch, capsys):
    memory = eval_script("memory")
    commands = []

    def fake_run(cmd, **kw):
        commands.append(cmd)
        return SimpleNamespace(stdout=_fake_row(cmd, (4000.0,), (3000.0,)), stderr="")

    monkeypatch.setattr(memory.subprocess, "run", fake_run)
    monkeypatch.setattr(memory, "build_teacher", lambda *a: 860_000_000)
    monkeypatch.setattr(sys, "argv", ["memory.py", "--sd15-gpu", "--time-budget", "-1", "--out", str(tmp_path),
                                      "--work", str(tmp_path / "work")])
    memory.main()
    assert len(commands) == 1  # a row after the first only within the budget (none here)
    cmd = commands[0]
    assert [cmd[cmd.index(f) + 1] for f in ("--width", "--latent", "--batch-size")] == ["1.0", "64", "4"]
    assert "| dmd2 | full copy | off | 3000 | 4000 | 1.50 | 2.0M |" in (tmp_path / "table.md").read_text()
    capsys.readouterr()


def test_single_row_table_on_a_gpu_names_the_gpu_and_its_allocator(tmp_path, monkeypatch):
    """Where the children measured on CUDA (torch.cuda.max_memory_allocated) the table names the GPU and that unit;
    it once described the host CPU and called the numbers VmHWM."""
    memory = eval_script("memory")
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    row = dict(objective="dmd2", fake_lora_rank=0, gradient_checkpointing=False, after_setup_mb=3000.0,
               peak_mb=9000.0, step_seconds=0.5, trainable_parameters=860_000_000)
    memory.single_rows_table(SimpleNamespace(width=1.0, latent=64, batch_size=4, out=str(tmp_path)), 860_000_000, [row])
    md = (tmp_path / "table.md").read_text()
    assert "machine: NVIDIA H200" in md and "memory: GPU max_memory_allocated" in md
    assert json.loads((tmp_path / "results.json").read_text())["machine"] == "NVIDIA H200"


def test_memory_child_reads_its_row_arguments(tmp_path, monkeypatch, capsys):
    memory = eval_script("memory")
    monkeypatch.setattr(memory, "run_row", lambda a: {k: getattr(a, k) for k in (
        "objective", "fake_lora", "checkpointing", "sharding", "student_lora")})
    monkeypatch.setattr(sys, "argv", ["memory.py", "--work", str(tmp_path), "--row", "sid", "64", "1", "fsdp", "16"])
    memory.main()
    line = capsys.readouterr().out.strip()
    assert json.loads(line.removeprefix("ROW ")) == {"objective": "sid", "fake_lora": 64, "checkpointing": True,
                                                     "sharding": "fsdp", "student_lora": 16}


def test_peak_rss_is_the_kernels_high_water_mark_in_mib():
    def vm_hwm_kib():  # /proc/self/status: "VmHWM:    812345 kB"
        return next(int(ln.split()[1]) for ln in Path("/proc/self/status").read_text().splitlines()
                    if ln.startswith("VmHWM"))

    memory = eval_script("memory")
    before = vm_hwm_kib()
    peak = memory.peak_rss_mb()
    after = vm_hwm_kib()  # the high-water mark only grows; a MiB is 1024 KiB
    assert before / 1024 <= peak <= after / 1024
