"""The Fashion-MNIST quality table, grown a few rows per GPU slice (issue 17).

A row is one unit of work: a teacher's DDIM NFE sweep, or one objective's one-step student (distilled for
``train.time_limit_minutes``, then measured at 1 step, and 2 and 4 for consistency students). Rows run in a fixed
order: fmnist-ddpm's teacher sweep and its dmd2, sid, sim and cd students, then the same for fmnist-cond-vpred
(CFG 2 on the real score and for its teacher sweep). FID and KID are measured against the 60k training images,
whose statistics are computed once per work folder (once per GPU slice) and reused by every row.

``fmnist.json`` keeps one row per (teacher, objective); a stored row counts as done only while its step counts
and config hash (the config file, overrides, time limit and evaluation settings) match the current plan, so an
edited config reruns. Each row records commit, date, device, versions, wall time and images seen. Re-running a
row replaces it. ``fmnist.md`` is regenerated from the JSON after every row.

    python eval/fmnist_quality.py --next --budget-minutes 6     # the first missing rows that fit in 6 minutes
    python eval/fmnist_quality.py --rows ddpm-sid,cond-sid       # named rows (replacing their stored results)
    python eval/fmnist_quality.py --next --budget-minutes 6 --plan   # what --next would run, without running it
    python eval/fmnist_quality.py --render                       # fmnist.md from fmnist.json
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "eval"))  # the training-curve plot of eval/plot_metrics.py
from fastdiff.errors import FastdiffError, script_main  # noqa: E402
from plot_metrics import plot as plot_run, read_metrics, save_figure  # noqa: E402

TEACHERS = {"ddpm": ("fmnist-ddpm", None), "cond": ("fmnist-cond-vpred", 2.0)}  # folder, CFG of the evaluation
OBJECTIVES = ("dmd2", "sid", "sim", "cd")
# The later objectives' rows the issues ask for (21: rcm, meanflow; 22: fdistill, ladd, tdm; 23: hyper-sd, reflow),
# on fmnist-ddpm only, after both teachers' first rows: their configs set only batch 256 and bf16 (lr and the rest
# are the objective's defaults)
LATER = ("rcm", "meanflow", "fdistill", "ladd", "hyper-sd", "reflow", "tdm")
MULTI_STEP = {"cd", "rcm", "meanflow", "hyper-sd", "reflow"}  # students sampled at several step counts
STEPS = {"tdm": [4]}  # trained for one step count other than 1 (TDM's K = 4 DDIM student)
# Also scored on other sampling levels (step count, FlowMapGenerator levels): meanflow's two steps on the flow-time
# levels, which the analytic bench measured better than the table's (an exported option, `timesteps=`)
EXTRA_LEVELS = {"meanflow": [(2, "flow")]}
PAIRS = {"reflow": 50000}  # teacher ODE pairs (``fastdiff pairs``, 18 Heun levels) made in the row before training
PAIRS_MINUTES = 1.5  # 50k pairs at 35 NFE: ~5 PFLOP of the 2.9 GFLOP UNet, deliberately high as the rest
MAX_TRAIN_MINUTES = 5.0  # one distillation row must leave room in a 10-minute slice
# Minutes on an H200, deliberately high (a row that overruns is lost to the slice's hard stop): the teacher's
# UNet is 2.9 GFLOP per image, so one NFE over 10k images is 29 TFLOP (~1 s in fp32 with TF32 convolutions);
# one FID@10k adds ~10 s of Inception; a distillation process spends ~1 minute outside its time limit
# (start-up, CUDA context, export) before its FID. Rows already measured on a GPU use their own recorded times.
REFERENCE_MINUTES = 1.0
TEACHER_FIXED, PER_NFE_10K, PER_FID = 0.5, 0.025, 0.15
STUDENT_OVERHEAD, STUDENT_PER_FID = 1.0, 0.3
# --curve-every: FID@1k every 500 updates while a student trains (train.eval_every), kept out of its time limit:
# ~3 s each (1000 one-step samples, 5.7 TFLOP of fp32 Inception), a few per row
CURVE_MINUTES = 0.3


@dataclass
class Row:
    name: str  # e.g. ddpm-teacher, cond-sid
    which: str  # ddpm | cond
    objective: str  # teacher | dmd2 | sid | sim | cd
    steps: list
    config: Path | None  # distillation config (None for the teacher sweep)

    @property
    def teacher(self) -> str:
        return TEACHERS[self.which][0]

    @property
    def guidance(self) -> float | None:
        return TEACHERS[self.which][1]


def plan(args) -> list[Row]:
    rows = []
    for which in args.which:
        rows.append(Row(f"{which}-teacher", which, "teacher", args.nfe, None))
        for name in args.objectives:
            rows.append(Row(f"{which}-{name}", which, name, row_steps(name),
                            args.configs / f"fmnist-{which}-{name}.yaml"))
    rows += [Row(f"ddpm-{name}", "ddpm", name, row_steps(name), args.configs / f"fmnist-ddpm-{name}.yaml")
             for name in args.later if "ddpm" in args.which]
    return rows


def row_steps(name: str) -> list[int]:
    return STEPS.get(name, [1, 2, 4] if name in MULTI_STEP else [1])


def train_minutes(row: Row, args) -> float | None:
    """The row's distillation time limit: the config's ``train.time_limit_minutes``, capped by --train-minutes."""
    if row.config is None:
        return None
    import yaml

    configured = (yaml.safe_load(row.config.read_text()).get("train") or {}).get("time_limit_minutes")
    return min(v for v in (configured, args.train_minutes, MAX_TRAIN_MINUTES) if v is not None)


def config_hash(row: Row, args) -> str:
    """What makes a result: never machine paths (the GPU sees the teachers and data elsewhere); nor the training
    curve's settings (--curve-every, --curve-num), which leave the trained student as it is (a stored row without
    a curve stays done)."""
    spec = {"objective": row.objective, "steps": row.steps, "guidance": row.guidance, "num": args.num,
            "ref_num": args.ref_num, "crop": args.crop, "seed": args.seed}
    if row.config is not None:
        spec.update(config=hashlib.sha256(row.config.read_bytes()).hexdigest(), sets=args.set,
                    train_minutes=train_minutes(row, args))
    if row.objective in EXTRA_LEVELS:  # only there, so the other rows' hashes (and measured rows) stay
        spec["levels"] = EXTRA_LEVELS[row.objective]
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


def source_sha() -> str:
    """Content hash of the code that makes the numbers (fastdiff/, pipelines/, eval/configs/), for runs where
    git is absent (the GPU machine receives the files, not the repository)."""
    h = hashlib.sha256()
    for top in ("fastdiff", "pipelines", "eval/configs"):
        for f in sorted((ROOT / top).rglob("*")):
            if f.is_file() and "__pycache__" not in f.parts:
                h.update(str(f.relative_to(ROOT)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def commit() -> str:
    if os.environ.get("FASTDIFF_COMMIT"):
        return os.environ["FASTDIFF_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        if head.returncode == 0:
            dirty = subprocess.run(["git", "status", "--porcelain", "--", "fastdiff", "pipelines", "eval/configs",
                                    "eval/fmnist_quality.py"], cwd=ROOT,
                                   capture_output=True, text=True).stdout.strip()
            return head.stdout.strip() + ("+dirty" if dirty else "")
    except OSError:
        pass
    return "unknown"


# --- the table ----------------------------------------------------------------------------------------------
def load_table(out: Path) -> dict:
    path = out / "fmnist.json"
    return json.loads(path.read_text()) if path.is_file() else {"rows": []}


def stored(table: dict, name: str) -> dict | None:
    return next((r for r in table["rows"] if r["name"] == name), None)


def is_done(row: Row, table: dict, args) -> bool:
    old = stored(table, row.name)
    return old is not None and old["steps"] == row.steps and old["config_hash"] == config_hash(row, args)


def merge(table: dict, result: dict) -> dict:
    """Replace the stored row of the same name (or add it); rows stay in the fixed order."""
    rows = [r for r in table["rows"] if r["name"] != result["name"]] + [result]
    rows.sort(key=lambda r: (ORDER.index(r["name"]) if r["name"] in ORDER else len(ORDER), r["name"]))
    overruns = {k: v for k, v in table.get("overruns", {}).items() if k != result["name"]}
    return {**table, "rows": rows, "overruns": overruns}


ORDER = [f"{w}-{o}" for w in TEACHERS for o in ("teacher", *OBJECTIVES)] + [f"ddpm-{o}" for o in LATER]


def static_minutes(row: Row, args, train: float | None = None) -> float:
    scale = args.num / 10000
    if row.config is None:
        cfg = 2 if row.guidance else 1  # CFG evaluates the network twice
        return TEACHER_FIXED + len(row.steps) * PER_FID * scale + sum(row.steps) * PER_NFE_10K * scale * cfg
    train = train_minutes(row, args) if train is None else train
    pairs = PAIRS_MINUTES if row.objective in PAIRS else 0.0
    fids = len(row.steps) + len(EXTRA_LEVELS.get(row.objective, []))
    return STUDENT_OVERHEAD + pairs + train + fids * STUDENT_PER_FID * scale + (CURVE_MINUTES if args.curve_every else 0)


def estimate_minutes(row: Row, table: dict, args) -> float:
    """A row measured on a GPU at this size takes what it took (its time limit adjusted); the others take the
    static estimate, scaled up where GPU rows of the same kind took longer than theirs (never down)."""
    def measured(r: Row) -> dict | None:
        old = stored(table, r.name)
        ok = old and not old.get("error") and old["steps"] == r.steps and old.get("device_type") == "cuda"
        return old if ok and old.get("num") == args.num else None

    own = measured(row)
    if own:
        return own["wall_seconds"] / 60 - (own.get("train_minutes") or 0) + (train_minutes(row, args) or 0)
    ratios = [old["wall_seconds"] / 60 / static_minutes(r, args, old.get("train_minutes"))
              for r in plan(args) if (r.config is None) == (row.config is None) and (old := measured(r))]
    estimate = static_minutes(row, args) * max([1.0, *ratios])
    over = table.get("overruns", {}).get(row.name)  # stopped at a slice's end: it needs more than that
    if over and over["config_hash"] == config_hash(row, args):
        estimate = max(estimate, over["seconds"] / 60 + 1.0)
    return estimate


def write_table(out: Path, table: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "fmnist.json.tmp"
    tmp.write_text(json.dumps(table, indent=2, default=str) + "\n")
    tmp.replace(out / "fmnist.json")  # a slice stopped mid-write keeps the previous table
    (out / "fmnist.md").write_text(render(table))
    try:  # the GPU machine has no matplotlib: gpu_round.sh --collect re-renders here
        import matplotlib  # noqa: F401
    except ImportError:
        return
    plot(table, out / "fmnist.png")
    plot_curves(table, out / "fmnist-curves.png")
    for log in sorted((out / "logs").glob("*-metrics.jsonl")):  # each student row's losses, norms and FIDs
        png = log.with_name(log.name.replace("-metrics.jsonl", "-curves.png"))
        if not png.is_file() or png.stat().st_mtime < log.stat().st_mtime:
            try:
                plot_run({log.name.removesuffix("-metrics.jsonl"): read_metrics(log)}, png)
            except FastdiffError:  # a row that logged nothing to plot
                pass


def nfe_series(table: dict) -> dict:
    """Per teacher folder: {model: [(NFE, FID), ...]}, the teacher's DDIM curve and each student's step counts."""
    series: dict = {}
    for r in table["rows"]:
        if not r.get("error"):
            points = sorted((m["steps"], m["fid"]) for m in r["results"] if not m.get("levels"))  # default levels
            series.setdefault(r["teacher"], {})[r["objective"]] = points
    return series


def plot(table: dict, path: Path) -> None:
    """FID against NFE, one panel per teacher: the teacher's DDIM curve, the students as points (issue 17's
    targets read off it: every 1-step point below the curve at NFE 10, the best below the curve's minimum)."""
    import matplotlib
    import matplotlib.ticker
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = nfe_series(table)
    if not series:
        return
    label = next((m["fid_label"] for r in table["rows"] for m in r.get("results", [])), "FID")
    fig, axes = plt.subplots(1, len(series), figsize=(5.5 * len(series), 4), squeeze=False)
    for ax, (teacher, models) in zip(axes[0], series.items()):
        for model, points in models.items():
            nfe, fid = zip(*points)
            teacher_curve = model == "teacher"
            ax.plot(nfe, fid, "o-" if teacher_curve else "*--", label=model, markersize=6 if teacher_curve else 11)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ticks = sorted({n for points in models.values() for n, _ in points})
        ax.set_xticks(ticks, [f"{n:g}" for n in ticks])  # the measured NFEs, not 2^k
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xlabel("NFE (sampling steps)")
        ax.set_ylabel(label)
        ax.set_title(teacher)
        ax.legend()
    save_figure(fig, path, dpi=110)


def curve_series(table: dict) -> dict:
    """Per teacher folder: {objective: [(images seen, FID), ...]}, the FIDs measured while each student trained."""
    series: dict = {}
    for r in table["rows"]:
        if r.get("curve") and not r.get("error"):
            series.setdefault(r["teacher"], {})[r["objective"]] = [(c["images_seen"], c["fid"]) for c in r["curve"]]
    return series


def plot_curves(table: dict, path: Path) -> None:
    """FID against images seen while each student trained, one panel per teacher: whether a row that misses its
    target was still improving when its time ran out. (Curve FIDs use fewer images than the table's, so they sit
    above its numbers and are compared with each other only.)"""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = curve_series(table)
    if not series:
        return
    label = next(c["fid_label"] for r in table["rows"] if not r.get("error") for c in r.get("curve") or [])
    fig, axes = plt.subplots(1, len(series), figsize=(5.5 * len(series), 4), squeeze=False)
    for ax, (teacher, models) in zip(axes[0], series.items()):
        for model, points in models.items():
            ax.plot(*zip(*points), "o-", label=model, markersize=4)
        ax.set_yscale("log")
        ax.set_xlabel("images seen by the student")
        ax.set_ylabel(label)
        ax.set_title(teacher)
        ax.legend()
    save_figure(fig, path, dpi=110)


def render(table: dict) -> str:
    rows = table["rows"]
    label = next((m["fid_label"] for r in rows for m in r.get("results", [])), "FID")
    lines = ["# Fashion-MNIST: one-step students against their teachers", "",
             "Written by `eval/fmnist_quality.py` from `fmnist.json` (do not edit by hand). "
             f"FID and KID against the Fashion-MNIST training images: {label}.", "",
             "| row | teacher | model | steps (NFE) | FID | KID | distill min | images seen | train img/s | row min | "
             "device | date | commit |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        common = f"{r['wall_seconds'] / 60:.1f} | {r['device']} | {r['date']} | {r['commit']}"
        if r.get("error"):
            steps = ",".join(map(str, r["steps"]))
            lines.append(f"| {r['name']} | {r['teacher']} | {r['objective']} | {steps} | failed | "
                         f"{r['error'].splitlines()[-1][:80]} | | | | {common} |")
            continue
        for m in r["results"]:
            kid = "" if m.get("kid") is None else f"{m['kid']:.5f} ± {m['kid_std']:.5f}"
            train = "" if r.get("train_minutes") is None else f"{r['train_minutes']:g}"
            seen = "" if r.get("images_seen") is None else f"{r['images_seen']:,}"
            speed = "" if r.get("train_images_per_second") is None else f"{r['train_images_per_second']:.0f}"
            steps = m["steps"] if not m.get("levels") else f"{m['steps']} ({m['levels']} levels)"
            lines.append(f"| {r['name']} | {r['teacher']} | {r['objective']} | {steps} | {m['fid']:.2f} | {kid} | "
                         f"{train} | {seen} | {speed} | {common} |")
    missing = [n for n in ORDER if stored(table, n) is None]
    lines += ["", "Chart (FID against NFE; written where matplotlib is installed): fmnist.png."]
    if curve_series(table):
        lines += ["", "Training curves (FID measured while each student trained, `--curve-every`): fmnist-curves.png."]
    lines += ["", "## Targets", ""] + [f"- {v}" for v in verdicts(rows)]
    if missing:
        lines += ["", "Rows not measured yet: " + ", ".join(missing) + "."]
    for name, over in table.get("overruns", {}).items():
        lines.append(f"- {name} was stopped at a slice's end after {over['seconds'] / 60:.1f} min ({over['date']}); "
                     "--next now estimates it above that")
    return "\n".join(lines) + "\n"


def verdicts(rows: list[dict]) -> list[str]:
    """Issue 17's targets: every 1-step student beats its teacher's NFE-10 FID; the best beats the teacher's best."""
    out = []
    for which, (teacher, _) in TEACHERS.items():
        t = stored({"rows": rows}, f"{which}-teacher")
        fids = {m["steps"]: m["fid"] for m in t["results"]} if t and not t.get("error") else {}
        students = [(r["objective"], m["fid"]) for r in rows if r["teacher"] == teacher and r["objective"] != "teacher"
                    and not r.get("error") for m in r["results"] if m["steps"] == 1 and not m.get("levels")]
        out += [f"{teacher}: {r['objective']} failed ({r['error'].splitlines()[-1][:80]})" for r in rows
                if r["teacher"] == teacher and r.get("error")]
        if not fids or not students:
            out.append(f"{teacher}: not enough rows yet")
            continue
        if 10 in fids:
            out += [f"{teacher}: {name} 1-step {fid:.2f} {'beats' if fid < fids[10] else 'does NOT beat'} the teacher "
                    f"at NFE 10 ({fids[10]:.2f})" for name, fid in students]
        best, (nfe, best_t) = min(students, key=lambda s: s[1]), min(fids.items(), key=lambda kv: kv[1])
        out.append(f"{teacher}: best 1-step student {best[0]} {best[1]:.2f} "
                   f"{'beats' if best[1] < best_t else 'does NOT beat'} the teacher's best {best_t:.2f} (NFE {nfe})")
    return out


# --- running rows -------------------------------------------------------------------------------------------
class Measure:
    """The Inception extractor and the reference statistics, made once per work folder and kept."""

    def __init__(self, args):
        import torch

        from fastdiff.evaluation.evaluate import make_reference
        from fastdiff.evaluation.images import open_source
        from fastdiff.evaluation.inception import InceptionFeatures
        from fastdiff.evaluation.metrics import ReferenceStats

        self.args = args
        self.extractor = InceptionFeatures(None, "nv-bilinear").to(args.device)
        ref_file = reference_file(args)
        if not ref_file.is_file():
            t0 = time.time()
            source = open_source("fashion-mnist:train", data_path=str(args.data_path), allow_model=False)
            with torch.no_grad():
                ref = make_reference(source, self.extractor, args.ref_num, args.batch_size, 5000, args.crop)
            ref_file.parent.mkdir(parents=True, exist_ok=True)
            ref.save(ref_file)
            print(f"reference statistics: {ref.name} in {time.time() - t0:.0f} s -> {ref_file}", flush=True)
        self.ref = ReferenceStats.load(ref_file)

    def model(self, folder: Path, row: Row, guidance: float | None) -> list[dict]:
        """FID/KID at each of the row's step counts, and one grid (a block of samples per step count, same noise)."""
        import numpy as np
        import torch

        from fastdiff.evaluation.evaluate import evaluate
        from fastdiff.evaluation.images import model_sources
        from fastdiff.inference.sampling import save_grid

        a = self.args
        sources = model_sources(str(folder), row.steps, a.seed, guidance, a.device)  # one load for the step counts
        extra = EXTRA_LEVELS.get(row.objective, [])  # and one per extra level set (seconds for this UNet)
        sources += [model_sources(str(folder), [k], a.seed, guidance, a.device, levels=rule)[0] for k, rule in extra]
        results, blocks = [], []
        per = min(max(10, 100 // len(sources) // 10 * 10), a.num)  # 100 images in all, 10 a line
        for (k, rule), source in zip([(k, None) for k in row.steps] + extra, sources):
            with torch.no_grad():
                r = evaluate(source, self.ref, self.extractor, a.num, a.batch_size, a.crop)
                blocks.append(next(source.read(per, per)).permute(0, 2, 3, 1).numpy())  # uint8 NCHW -> NHWC
            results.append({"steps": k, "fid": r["fid"], "fid_label": r["fid_label"], "kid": r.get("kid"),
                            "kid_std": r.get("kid_std"), "images_per_second": r.get("images_per_second")})
            if rule is not None:
                results[-1]["levels"] = rule
            print(f"  {row.name} {k} step(s){'' if rule is None else f' ({rule} levels)'}: {r['fid_label']} "
                  f"{r['fid']:.3f}", flush=True)
        save_grid(np.concatenate(blocks), a.out / "grids" / f"{row.name}.png", ncol=10)
        return results


def reference_file(args) -> Path:
    return args.work / f"ref-fmnist-train{args.ref_num or 'all'}-crop{args.crop}.npz"


def distill(row: Row, args, run: Path, log: Path) -> dict:
    """fastdiff's own CLI in a child process (the GPU memory of each row is freed when it ends); its progress bar
    writes at most once a minute to the row's log (the loss curve is in metrics.jsonl)."""
    import yaml

    # the time limit after --set: the row records (and hashes) the capped value, so no --set may lift it
    curve = [f"train.eval_every={args.curve_every}", f"train.eval_reference={reference_file(args)}",
             f"train.eval_images={min(args.curve_num, args.num)}", f"train.eval_crop={args.crop}"]
    sets = [f"teacher.path={args.teachers / row.teacher}", f"output_dir={run}", f"data.path={args.data_path}",
            *(curve if args.curve_every else []), *args.set, f"train.time_limit_minutes={train_minutes(row, args)}"]
    t0 = time.time()
    if row.objective in PAIRS:  # reflow trains on the teacher's ODE pairs, made here (resumable, sharded)
        pairs = args.work / f"pairs-{row.which}"
        cmd = [sys.executable, "-m", "fastdiff", "pairs", "--quiet", "--teacher", str(args.teachers / row.teacher),
               "--num", str(args.pairs or PAIRS[row.objective]), "--out", str(pairs), "--steps", "18",
               "--batch-size", "1000"]
        if row.guidance:
            cmd += ["--guidance", str(row.guidance)]
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log.with_suffix(".pairs.log"), "w") as f:
            if subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode != 0:
                raise RowFailed(log.with_suffix(".pairs.log").read_text().strip()[-2000:] or "fastdiff pairs failed")
        sets.append(f"data.path={pairs}")
    cmd = [sys.executable, "-m", "fastdiff", "distill", "--config", str(row.config), "--overwrite"]
    for item in sets:
        cmd += ["--set", item]
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        code = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                              env={**os.environ, "TQDM_MININTERVAL": "60", "PYTHONUNBUFFERED": "1"}).returncode
    info = {"distill_seconds": time.time() - t0}
    if code != 0:
        tail = log.read_text().strip().splitlines()[-15:]
        raise RowFailed("\n".join(tail) or f"fastdiff distill exited with {code}")
    student = json.loads((run / "student" / "fastdiff.json").read_text())
    config = yaml.safe_load((run / "config.yaml").read_text())["train"]
    per_step = config["batch_size"] * config["gradient_accumulation"]  # images per update (one process)
    info.update(train_steps=student["train_step"], images_seen=student["train_step"] * per_step)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    if metrics:
        logged = [m for m in metrics if "images_per_second" in m]  # not the FID rows of the curve
        info["train_images_per_second"] = logged[-1]["images_per_second"] if logged else None
        info["curve"] = [{"step": m["step"], "images_seen": m["step"] * per_step, "fid": m["fid"],
                          "fid_label": m["eval"]} for m in metrics if "eval" in m]
    return info


class RowFailed(Exception):
    pass


class SliceEnd(Exception):
    pass


def _slice_end(signum, frame):
    raise SliceEnd()


def run_row(row: Row, args, measure_fn) -> dict:
    import torch

    from fastdiff.machine import describe, today, versions

    t0 = time.time()
    result = {"name": row.name, "teacher": row.teacher, "objective": row.objective, "steps": row.steps,
              "config_hash": config_hash(row, args), "config": None if row.config is None else
              str(row.config.relative_to(ROOT)) if row.config.is_relative_to(ROOT) else str(row.config),
              "guidance": row.guidance, "train_minutes": train_minutes(row, args), "num": args.num,
              "commit": commit(), "source_sha": source_sha(), "date": today(), "device": describe(args.device),
              "device_type": args.device.type, "versions": versions(), "images_seen": None}
    teacher = args.teachers / row.teacher
    try:
        if row.config is None:
            result["results"] = measure_fn().model(teacher, row, row.guidance)
        else:
            run, logs = args.work / "runs" / row.name, args.out / "logs"
            if args.curve_every:
                measure_fn()  # the reference statistics the run's curve is scored against, made first
            result.update(distill(row, args, run, logs / f"{row.name}.log"))
            metrics = run / "metrics.jsonl"
            if metrics.is_file():  # the loss curves, kept beside the table as evidence
                (logs / f"{row.name}-metrics.jsonl").write_text(metrics.read_text())
            result["results"] = measure_fn().model(run / "student", row, None)
    except RowFailed as exc:
        result.update(error=str(exc), results=[])
        print(f"  {row.name} FAILED:\n{exc}", flush=True)
    if args.device.type == "cuda":
        torch.cuda.empty_cache()
    result["wall_seconds"] = time.time() - t0
    return result


# --- main ---------------------------------------------------------------------------------------------------
def parse(argv=None):
    env = os.environ.get
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--next", action="store_true", help="run the first rows still missing, in order")
    what.add_argument("--rows", help="run these rows (comma-separated, e.g. ddpm-teacher,ddpm-sid), replacing them")
    what.add_argument("--render", action="store_true", help="only regenerate fmnist.md from fmnist.json")
    p.add_argument("--budget-minutes", type=float, default=None, help="--next: stop before a row that would not fit")
    p.add_argument("--plan", action="store_true", help="print the rows, their state and estimates; run nothing")
    p.add_argument("--teachers-needed", action="store_true", help="print the teacher folders the selected rows need")
    p.add_argument("--out", type=Path, default=ROOT / "eval" / "results" / "fmnist",
                   help="the table: fmnist.json, fmnist.md, grids/, logs/ (committed)")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "fmnist-quality",
                   help="distillation runs and the cached reference statistics (not committed)")
    p.add_argument("--teachers", type=Path,
                   default=Path(env("FASTDIFF_TEACHERS") or ROOT.parent / "shared" / "teachers"))
    p.add_argument("--data-path", type=Path, default=Path(env("FASTDIFF_FASHION_MNIST") or
                                                           ROOT.parent / "shared" / "datasets" / "fashion-mnist"))
    p.add_argument("--configs", type=Path, default=ROOT / "eval" / "configs")
    p.add_argument("--which", default="ddpm,cond", help="teachers, in order: ddpm, cond")
    p.add_argument("--objectives", default=",".join(OBJECTIVES), help="students per teacher, in order ('' for none)")
    p.add_argument("--later", default=",".join(LATER), help="the later objectives' fmnist-ddpm rows ('' for none)")
    p.add_argument("--pairs", type=int, default=None, help="teacher pairs for reflow rows (default 50000; a dry run: few)")
    p.add_argument("--nfe", default="1,2,4,10,25,50", help="the teacher row's DDIM step counts")
    p.add_argument("--train-minutes", type=float, default=None,
                   help=f"cap on each distillation's train.time_limit_minutes (never above {MAX_TRAIN_MINUTES:g})")
    p.add_argument("--num", type=int, default=10000, help="images per FID")
    p.add_argument("--ref-num", type=int, default=None, help="reference images (default: all 60k)")
    p.add_argument("--batch-size", type=int, default=500, help="sampling and Inception batch")
    p.add_argument("--crop", type=int, default=28, help="the teachers make 32x32 (padded) images; the data is 28x28")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--set", action="append", default=[], help="extra config override for every distillation")
    p.add_argument("--curve-every", type=int, default=500,
                   help="while a student trains, FID every N updates (train.eval_every; 0: none): the FID-against-"
                        "training curves of fmnist-curves.png, evidence for a row that misses its target")
    p.add_argument("--curve-num", type=int, default=1000, help="images per curve FID (at most --num)")
    args = p.parse_args(argv)
    args.which = [w for w in args.which.split(",") if w]
    args.objectives = [o for o in args.objectives.split(",") if o]
    args.later = [o for o in args.later.split(",") if o]
    try:
        args.nfe = [int(k) for k in args.nfe.split(",")]
    except ValueError:
        raise FastdiffError(f"--nfe {args.nfe!r}: give comma-separated step counts, e.g. 1,2,4,10") from None
    if not args.configs.is_dir():
        raise FastdiffError(f"--configs {args.configs}: no such folder (the rows' YAML files)")
    if args.budget_minutes is not None and not args.budget_minutes > 0:
        raise FastdiffError(f"--budget-minutes must be positive, got {args.budget_minutes}")
    if args.curve_every < 0 or args.curve_num < 2:  # KID needs two features
        raise FastdiffError(f"--curve-every must be >= 0 (0: none) and --curve-num at least 2, got "
                            f"{args.curve_every} and {args.curve_num}")
    bad = [w for w in args.which if w not in TEACHERS] + [o for o in args.objectives if o not in OBJECTIVES] \
        + [o for o in args.later if o not in LATER]
    if bad:
        p.error(f"unknown teacher or objective: {', '.join(bad)}")
    return args


def select(rows: list[Row], table: dict, args) -> list[Row]:
    if args.rows:
        names = [n for n in args.rows.split(",") if n]
        known = {r.name: r for r in rows}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise FastdiffError(f"unknown row(s) {', '.join(unknown)}; known: {', '.join(known)}")
        return [known[n] for n in names]
    return [r for r in rows if not is_done(r, table, args)]


def too_big(row: Row, table: dict, args) -> bool:
    """A row that would not fit even as the first of a fresh slice (reference statistics included): --next
    passes over it, so one oversized row cannot stall the table (give it a longer slice, or lower its cost)."""
    return estimate_minutes(row, table, args) + REFERENCE_MINUTES > args.budget_minutes


def fits(todo: list[Row], table: dict, args, spent: float = 0.0, ref_ready: bool | None = None) -> list[Row]:
    """The leading rows of ``todo`` whose estimates add up within the budget: the first that does not fit stops
    the slice, except rows too big for any slice of this budget, which are passed over."""
    if args.budget_minutes is None or not args.next:
        return todo
    ref_ready = reference_file(args).is_file() if ref_ready is None else ref_ready
    chosen = []
    for row in todo:
        if too_big(row, table, args):
            continue
        spent += estimate_minutes(row, table, args) + (0 if ref_ready else REFERENCE_MINUTES)
        if spent > args.budget_minutes:
            break
        chosen.append(row)
        ref_ready = True
    return chosen


@script_main
def main(argv=None) -> None:
    args = parse(argv)
    table = load_table(args.out)
    if args.render:
        write_table(args.out, table)
        print(render(table))
        return
    rows = plan(args)
    todo = select(rows, table, args)
    if args.teachers_needed:
        print("\n".join(dict.fromkeys(r.teacher for r in fits(todo, table, args))))
        return
    if args.plan:
        chosen = {r.name for r in fits(todo, table, args)}
        for r in rows:
            state = "done" if is_done(r, table, args) else ("stale" if stored(table, r.name) else "missing")
            mark = "run" if r.name in chosen else ("too big" if args.next and args.budget_minutes is not None
                                                   and state != "done" and too_big(r, table, args) else "")
            print(f"{r.name:14s} {state:8s} ~{estimate_minutes(r, table, args):5.1f} min  {mark}")
        return

    import torch

    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.work.mkdir(parents=True, exist_ok=True)
    measure: list[Measure] = []
    get_measure = lambda: measure[0] if measure else measure.append(Measure(args)) or measure[0]  # noqa: E731
    signal.signal(signal.SIGTERM, _slice_end)  # gpu_round.sh's timeout stops a row that overruns with SIGTERM
    start = time.time()
    for row in todo:
        # A row too big for the budget is passed over first: --teachers-needed (fits) packs no teacher for it, so
        # checking its teacher folder first would stop the slice before later rows that fit.
        if args.next and args.budget_minutes is not None and too_big(row, table, args):
            print(f"passing over {row.name}: ~{estimate_minutes(row, table, args):.1f} min (+ reference statistics)"
                  f" does not fit a {args.budget_minutes:.1f}-minute budget", flush=True)
            continue
        if not (args.teachers / row.teacher).is_dir():  # the GPU kit holds the teachers --teachers-needed named
            message = f"{row.name}: no teacher folder {args.teachers / row.teacher}"
            if args.rows:
                sys.exit(message)
            print(f"stopping before {message}", flush=True)
            break
        spent = (time.time() - start) / 60
        if not fits([row], table, args, spent, ref_ready=bool(measure) or reference_file(args).is_file()):
            print(f"stopping before {row.name}: ~{estimate_minutes(row, table, args):.1f} min left to do, "
                  f"{args.budget_minutes - spent:.1f} min of the budget left", flush=True)
            break
        print(f"row {row.name} (~{estimate_minutes(row, table, args):.1f} min)", flush=True)
        t_row = time.time()
        try:
            result = run_row(row, args, get_measure)
        except SliceEnd:  # the slice's hard stop: remember how long the row had run, so the estimate grows
            table = load_table(args.out)
            table.setdefault("overruns", {})[row.name] = {"seconds": time.time() - t_row, "date": time.strftime(
                "%Y-%m-%d"), "config_hash": config_hash(row, args)}
            write_table(args.out, table)
            sys.exit(f"{row.name} stopped at the slice's end after {time.time() - t_row:.0f} s (recorded)")
        table = merge(load_table(args.out), result)
        write_table(args.out, table)
        print(f"row {row.name} done in {stored(table, row.name)['wall_seconds']:.0f} s", flush=True)
    print(render(table))


if __name__ == "__main__":
    main()
