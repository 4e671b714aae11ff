"""The CPU ladder: does every objective improve its student on a real teacher within a CPU budget?

For each objective (all of ``fastdiff.objectives.OBJECTIVES`` unless ``--objectives`` names some) it distils the
teacher for ``--minutes`` of training (``train.time_limit_minutes``) at the batch size a CPU allows, with every other
setting at the objective's defaults (so the ladder tests what a user gets), exports the student and measures FID@N
and KID against a cached reference of Fashion-MNIST training images. Beside them: each starting point (the student
before training, i.e. the teacher sampled in one step from the objective's ``sigma_init``: 2.5 for distribution
matching, the top for consistency) and the teacher's DDIM at 1 and 10 NFE. Writes ``ladder.json``, ``README.md``
(table) and ``ladder.png`` (FID against images seen, start to end) to ``--out``.

    python eval/cpu_ladder.py                                   # both teachers, all objectives, 5 minutes each
    python eval/cpu_ladder.py --which ddpm --objectives dmd2,sid --minutes 2
    python eval/cpu_ladder.py --minutes 0.05 --num 20 --ref-num 40 --objectives dmd2 --out /tmp/ladder  # smoke
    python eval/cpu_ladder.py --updates 100    # a fixed number of trainer steps instead of a time budget

``--updates`` (trainer steps: generator updates, except DisBack's stage-1 steps, which train only its fake score; the
table's "generator updates" column counts those without them) is for a machine that is not quiet: a time budget shared with other work gives each objective
whatever the other processes leave it, while a number of updates gives the same training anywhere (the wall time
is still recorded beside it).

The start row is the exported student after one update at learning rate 1e-30 (the weights move by ~1e-30, and the
ramped EMA's first update copies them), so it goes through the same export and sampling path as the trained rows.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from fastdiff.errors import FastdiffError, require_folder_path, script_main  # noqa: E402

SHARED = ROOT.parent / "shared"
# label -> (teacher path, CFG of the real score, conditioning note)
TEACHERS = {"ddpm": ("embedded:fmnist-ddpm", 1.0), "cond": (str(SHARED / "teachers" / "fmnist-cond-vpred"), 2.0)}
# CFG distilled into a student that still samples many steps (agd: one pass instead of two; fada: one instead of a
# two-condition teacher's three, and the ladder's teachers have one condition): not few-step students, not laddered
NOT_STUDENTS = {"agd", "fada"}
# few-step students (consistency, segment consistency, flow maps, straight lines): also measured at 2 steps
MULTI_STEP = {"cd", "scm", "rcm", "scm-ladd", "hyper-sd", "hyper-sd-dmd", "meanflow", "ayf", "reflow"}
# reflow trains on (noise, teacher sample) pairs and samples its straight lines with Euler (README's recipe)
PAIRS_STEPS = 10  # the teacher's DDIM (Euler) ODE for the pairs: its 10-step samples are the ladder's teacher row


def eval_steps(name: str, run: Path) -> list[int]:
    """Step counts a student is measured at: 1 (and 2 for few-step students) plus the count it was trained for; a
    student trained for K > 1 steps that is not a few-step (any-step) student only at K (TDM)."""
    steps = {1, 2} if name in MULTI_STEP else {1}
    info = run / "student" / "fastdiff.json"
    trained = int(json.loads(info.read_text()).get("num_steps", 1)) if info.is_file() else 1
    if trained > 1 and name not in MULTI_STEP:
        return [trained]  # a K-step student (TDM) is only meant to sample at K
    return sorted(steps | {trained})


def objective_settings(which: str, teacher: str, guidance: float, name: str, out: Path, args) -> list[str]:
    """What the ladder sets beyond the objective's defaults: reflow's pairs (made here, the first time) and its
    Euler sampler, TDM's K = 4 DDIM student (the reference's; a default student has one step), no generator hold for
    SiDA and Uni-Instruct (the rows measured before the hold existed had none either)."""
    if name == "reflow":
        pairs = out / "runs" / f"{which}-pairs"
        make_pairs(teacher, guidance, pairs, max(args.pairs, (args.updates or 0) * args.batch_size), args)
        return ["data.name=pairs", f"data.path={pairs}", "student.sampler=ddim"]
    if name == "tdm":
        return ["student.num_steps=4", "student.sampler=ddim"]
    if name == "pg-sb":  # draws its CFG scale from objective.real_guidance_range: the teacher's fixed one stays 1
        return ["teacher.guidance_scale=1.0"]
    if name in ("sida", "uni_instruct"):  # their references' 100k-image generator hold outlasts any ladder budget
        return ["objective.generator_hold_images=0"]
    return []


def start_row(which, teacher, guidance, name, extra, out, args, rows, errors, add, ref, extractor) -> str | None:
    """The label of ``name``'s start row, measured first if the ladder lacks it at a step count it needs (starts
    are shared by objectives that start alike); None if the start run failed."""
    user = [e for e in args.set or [] if e.startswith("student.")]  # --set's student (steps, sampler, level) too
    extra = [*extra, *user]
    sigma = start_sigma(teacher, name, extra)
    start = "start (top)" if sigma is None else f"start (sigma {sigma:.3g})"
    student = [e for e in extra if e.startswith("student.")]
    if student:  # a start of its own: the student's sampler or step count differs from the default
        start = f"{start[:-1]}, {', '.join(student)})"
    run = out / "runs" / f"{which}-{name}-start"
    if user:  # not the default start's run folder either
        run = run.with_name(f"{run.name}-{re.sub(r'[^A-Za-z0-9_.-]+', '-', '-'.join(user)).strip('-')}")
    have = {r["steps"] for r in rows if r["teacher"] == which and r["model"] == start}
    if have and set(eval_steps(name, run)) <= have:
        return start
    if not (run / "student" / "fastdiff.json").is_file():
        info = run_distill(teacher, guidance, name, run, args, ["train.max_steps=1", "train.lr_generator=1e-30",
                                                                 "train.lr_critic=1e-30", *extra], user_sets=False)
        if "error" in info:
            errors.append({"teacher": which, "model": start, **info})
            return None
    missing = [k for k in eval_steps(name, run) if k not in have]
    for r in fid_rows(str(run / "student"), missing, None, ref, extractor, args):
        add({**r, "teacher": which, "kind": "start", "model": start, "images_seen": 0})
    return start


def make_pairs(teacher: str, guidance: float, folder: Path, num: int, args) -> None:
    """The teacher's ODE pairs reflow trains on (``fastdiff pairs`` resumes, so a rerun keeps what is made)."""
    cmd = [sys.executable, "-m", "fastdiff", "pairs", "--quiet", "--teacher", teacher, "--num", str(num),
           "--out", str(folder), "--steps", str(PAIRS_STEPS), "--sampler", "ddim", "--seed", str(args.seed + 1)]
    if guidance != 1.0:
        cmd += ["--guidance", str(guidance)]
    subprocess.run(cmd, check=True)


def run_distill(teacher: str, guidance: float, objective: str, run: Path, args, extra: list[str],
                user_sets: bool = True) -> dict:
    """``user_sets``: the command's --set overrides last (a start run takes only their student.* ones, in ``extra``:
    a --set train.max_steps or learning rate must not train the start)."""
    sets = [f"teacher.path={teacher}", f"teacher.guidance_scale={guidance}", f"objective.name={objective}",
            f"output_dir={run}", f"data.path={args.data_path}", f"train.batch_size={args.batch_size}",
            f"train.seed={args.seed}", "train.max_steps=1000000", "train.checkpoint_every=1000000",
            "train.sample_every=1000000", "train.log_every=10", *extra, *((args.set or []) if user_sets else [])]
    cmd = [sys.executable, "-m", "fastdiff", "distill", "--overwrite"]
    for item in sets:
        cmd += ["--set", item]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.time() - t0
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1], "wall_seconds": wall}
    info = json.loads((run / "student" / "fastdiff.json").read_text())
    steps = info.get("train_step", 0)
    updates = info.get("generator_updates", steps)  # DisBack's stage-1 steps train only its fake score
    losses = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()] \
        if (run / "metrics.jsonl").is_file() else []
    return {"wall_seconds": wall, "steps": steps, "updates": updates, "images_seen": updates * args.batch_size,
            "log": losses[-1] if losses else {}}


def start_sigma(teacher: str, objective: str, extra: list[str]) -> float | None:
    """The noise level a default student of ``objective`` starts from on ``teacher`` (None: the top)."""
    from fastdiff.config import load_config
    from fastdiff.models.embedded import resolve_teacher_path
    from fastdiff.models.teacher import load_teacher
    from fastdiff.training.setup import sigma_init

    cfg = load_config(None, [f"teacher.path={teacher}", f"objective.name={objective}", *extra])
    return sigma_init(cfg, load_teacher(resolve_teacher_path(teacher)))


def fid_rows(model: str, steps: list[int], guidance: float | None, ref, extractor, args) -> list[dict]:
    from fastdiff.evaluation.evaluate import evaluate
    from fastdiff.evaluation.images import model_sources

    rows = []
    for k, source in zip(steps, model_sources(model, steps, args.seed, guidance, args.device)):
        result = evaluate(source, ref, extractor, args.num, 250, args.crop)
        rows.append({"steps": k, "fid": result["fid"], "fid_label": result["fid_label"], "kid": result.get("kid"),
                     "kid_std": result.get("kid_std")})
    return rows


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    teachers = sorted({r["teacher"] for r in result["rows"]})
    fig, axes = plt.subplots(1, len(teachers), figsize=(8 * len(teachers), 5), squeeze=False)
    for ax, teacher in zip(axes[0], teachers):
        rows = [r for r in result["rows"] if r["teacher"] == teacher]
        for r in rows:
            if r["kind"] == "teacher":
                ax.axhline(r["fid"], ls=":", color="gray")
                ax.text(0, r["fid"], f" teacher DDIM {r['steps']}", va="bottom", fontsize=8, color="gray")
        students = [r for r in rows if r["kind"] == "student" and r["steps"] == 1]
        colors = plt.cm.tab20.colors  # twenty distinguishable lines (the default cycle repeats after ten)
        for i, r in enumerate(students):
            start = next(s for s in rows if s["kind"] == "start" and s["model"] == r["start"] and s["steps"] == 1)
            ax.plot([0, r["images_seen"]], [start["fid"], r["fid"]], marker="o", label=r["model"],
                    color=colors[i % len(colors)], ls="-" if i < len(colors) else "--")
        ax.set(title=f"{teacher}: one-step FID against images seen", xlabel="images seen", ylabel=rows[0]["fid_label"]
               if rows else "FID", yscale="log")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: the lines fill the axes
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def table(result: dict, out: Path) -> str:
    """The results table, followed by the hand-written analysis in ``NOTES.md`` when the folder has one."""
    lines = [f"# CPU ladder: training budget per row (minutes, or trainer steps), batch {result['batch_size']}", "",
             f"{result['device']}; {result['date']}; commit {result['commit']}; "
             + ", ".join(f"{k} {v}" for k, v in result["versions"].items()), "",
             f"FID@{result['num']} and KID against {result['reference']} ({result['reference_n']} images).", "",
             "| teacher | row | steps | FID | KID | budget | generator updates | images seen | wall s | commit | verdict |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        kid = "" if r.get("kid") is None else f"{r['kid']:.4f}"
        verdict = r.get("verdict", "")
        budget = (f"{r['budget_updates']} steps" if r.get("budget_updates") else f"{r.get('minutes', '')} min") \
            if r["kind"] == "student" else ""
        lines.append(f"| {r['teacher']} | {r['model']} | {r['steps']} | {r['fid']:.1f} | {kid} | {budget} "
                     f"| {r.get('updates', '')} | {r.get('images_seen', '')} | {r.get('wall_seconds', 0):.0f} "
                     f"| {r.get('commit', '')} | {verdict} |")
    for e in result.get("errors", []):
        lines.append(f"| {e['teacher']} | {e['model']} | | failed: {e['error']} | | | | | | | |")
    notes = out / "NOTES.md"
    if notes.is_file():
        lines += ["", notes.read_text().rstrip()]
    return "\n".join(lines) + "\n"


@script_main
def main() -> None:
    from fastdiff.objectives import OBJECTIVES

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="eval/results/cpu-ladder")
    p.add_argument("--which", default="ddpm,cond", help="teachers: ddpm (embedded), cond (shared fmnist-cond-vpred)")
    # agd trains guidance adapters, not a few-step student: the single-pass error it lowers is measured in its tests
    p.add_argument("--objectives", default=",".join(name for name in OBJECTIVES if name not in NOT_STUDENTS))
    p.add_argument("--minutes", type=float, default=5.0, help="training budget per objective")
    p.add_argument("--updates", type=int, help="budget as a number of trainer steps (generator updates but DisBack's stage-1 steps) instead of minutes")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num", type=int, default=1000, help="images per FID")
    p.add_argument("--ref-num", type=int, default=2000, help="Fashion-MNIST training images in the reference")
    p.add_argument("--crop", type=int, default=28)
    p.add_argument("--teacher-nfe", default="1,10", help="teacher DDIM step counts to score (empty: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pairs", type=int, default=800, help="reflow's teacher pairs (at least one per image trained on)")
    p.add_argument("--data-path", default=str(SHARED / "datasets" / "fashion-mnist"))
    p.add_argument("--set", action="append", help="extra config override for every run")
    p.add_argument("--label", help="row name for one objective run with --set overrides (default: the objective's "
                                   "name, which stands for its defaults)")
    p.add_argument("--render", action="store_true", help="only rewrite README.md and ladder.png from ladder.json")
    args = p.parse_args()

    import torch

    from fastdiff.evaluation.evaluate import make_reference
    from fastdiff.evaluation.images import open_source
    from fastdiff.evaluation.inception import InceptionFeatures
    from fastdiff.machine import describe, today, versions
    from fastdiff.evaluation.metrics import ReferenceStats

    args.device = torch.device("cpu")
    if args.label and "," in args.objectives:
        p.error("--label names one run: give one objective with it")
    out = Path(args.out)
    if args.render:
        if not (out / "ladder.json").is_file():
            raise FastdiffError(f"--render: {out / 'ladder.json'} does not exist; run without --render first")
        result = json.loads((out / "ladder.json").read_text())
        (out / "README.md").write_text(table(result, out))
        plot(result, out / "ladder.png")
        return
    unknown = [o for o in args.objectives.split(",") if o.strip() and o.strip() not in OBJECTIVES]
    if unknown:  # before the teacher rows, not after them
        raise FastdiffError(f"--objectives: unknown {', '.join(unknown)}; known: {', '.join(OBJECTIVES)}")
    require_folder_path(out, "--out")
    ref_file = out / f"fmnist-train{args.ref_num}.npz"
    source = None if ref_file.is_file() else open_source("fashion-mnist:train", data_path=args.data_path,
                                                          allow_model=False)  # a missing folder: before --out is made
    out.mkdir(parents=True, exist_ok=True)
    extractor = InceptionFeatures(None, "nv-bilinear")
    if source is not None:
        make_reference(source, extractor, args.ref_num, 250, min(args.ref_num, 5000), None).save(ref_file)
    ref = ReferenceStats.load(ref_file)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    # Rows accumulate across invocations (a row measured again replaces the old one), so the ladder can be grown
    # one part at a time; each row records the commit and minutes it was measured with.
    previous = json.loads((out / "ladder.json").read_text()) if (out / "ladder.json").is_file() else {}
    rows, errors = previous.get("rows", []), []
    meta = {"commit": commit, "date": today(),
            **({"budget_updates": args.updates} if args.updates else {"minutes": args.minutes})}

    def add(row: dict) -> None:
        rows[:] = [r for r in rows if (r["teacher"], r["model"], r["steps"]) != (row["teacher"], row["model"], row["steps"])]
        rows.append({**meta, **row})
        save()

    def save() -> dict:
        result = {"device": describe(args.device), "versions": versions(), "date": today(), "commit": commit,
                  "minutes": args.minutes, "batch_size": args.batch_size, "num": args.num, "reference": ref.name,
                  "reference_n": ref.n, "rows": rows, "errors": errors}
        (out / "ladder.json").write_text(json.dumps(result, indent=2, default=str))
        (out / "README.md").write_text(table(result, out))
        plot(result, out / "ladder.png")
        return result

    for which in args.which.split(","):
        teacher, guidance = TEACHERS[which]
        if not teacher.startswith("embedded:") and not Path(teacher).is_dir():
            print(f"skipping {which}: {teacher} not present")
            continue
        scale = guidance if guidance != 1.0 else None
        nfe = [int(k) for k in args.teacher_nfe.split(",") if k]
        for r in fid_rows(teacher, nfe, scale, ref, extractor, args) if nfe else []:
            add({**r, "teacher": which, "kind": "teacher", "model": f"teacher DDIM {r['steps']}"})
        for name in args.objectives.split(","):
            extra = objective_settings(which, teacher, guidance, name, out, args)
            start = start_row(which, teacher, guidance, name, extra, out, args, rows, errors, add, ref, extractor)
            if start is None:
                continue
            label = args.label or name  # a labelled row holds overrides; the objective's name, its defaults
            run = out / "runs" / f"{which}-{re.sub(r'[^A-Za-z0-9_.-]+', '-', label).strip('-')}"
            budget = [f"train.max_steps={args.updates}"] if args.updates else [f"train.time_limit_minutes={args.minutes}"]
            info = run_distill(teacher, guidance, name, run, args, budget + extra)
            print(name, which, info, flush=True)
            if "error" in info:
                errors.append({"teacher": which, "model": name, **info})
                save()
                continue
            for r in fid_rows(str(run / "student"), eval_steps(name, run), None, ref, extractor, args):
                base = next(s for s in rows if s["teacher"] == which and s["model"] == start and s["steps"] == r["steps"])
                verdict = f"{'below' if r['fid'] < base['fid'] else 'NOT below'} its start ({base['fid']:.1f})"
                add({**r, "teacher": which, "kind": "student", "model": label, "start": start,
                     **({"overrides": args.set} if args.set else {}),
                     "updates": info["updates"], "images_seen": info["images_seen"],
                     "wall_seconds": info["wall_seconds"], "verdict": verdict, "last_log": info["log"]})
    result = save()
    print(table(result, out))


if __name__ == "__main__":
    main()
