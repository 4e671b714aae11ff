"""Issue 26's done-when check: cd and scm on the embedded linear-beta epsilon teacher, 5 minutes at batch 8 on the
CPU, must lower FID@1k (against 2k Fashion-MNIST training images) from their start, with no loss blow-up.

For each objective: build the run with fastdiff's defaults (``Trainer``), export the untrained student (the start:
the teacher's weights behind the same sampler), train for ``--minutes``, export, and measure FID@N of both at 1 and
2 steps with ``fastdiff fid``. Writes eval/results/consistency-cpu/check.json and README.md's table rows.

    python eval/consistency_cpu_check.py --data-path /work/shared/datasets/fashion-mnist --objectives cd,scm
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from fastdiff.errors import FastdiffError, script_main

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results" / "consistency-cpu"


def fid(folder: Path, ref: Path, num: int, steps: int, out_json: Path) -> float:
    """FID@num of a student folder at ``steps`` steps; a JSON already written for it (same run) is reused."""
    from fastdiff.cli import main

    if out_json.is_file():
        return json.loads(out_json.read_text())["fid"]
    for _ in range(360):  # reference statistics made by a parallel `fastdiff ref-stats` (see --ref)
        if ref.is_file():
            break
        time.sleep(10)
    assert main(["fid", str(folder), "--ref", str(ref), "--num", str(num), "--steps", str(steps), "--crop", "28",
                 "--device", "cpu", "--json", str(out_json)]) == 0
    return json.loads(out_json.read_text())["fid"]


def run(objective: str, args, work: Path) -> dict:
    from fastdiff.config import load_config, to_dict
    from fastdiff.training import Trainer

    sets = [f"objective.name={objective}", f"data.path={args.data_path}", f"output_dir={work / objective}",
            "train.batch_size=8", f"train.time_limit_minutes={args.minutes}", "train.max_steps=1000000",
            f"train.lr_generator={args.lr}", "train.checkpoint_every=1000000", "train.sample_every=1000000",
            "train.log_every=10", "train.num_sample_images=16", *args.set]
    cfg = load_config(None, sets)  # the embedded teacher and every other default
    start = work / f"{objective}-start"
    if args.reuse and (work / objective / "student").is_dir():  # trained before: only the measurements are redone
        seconds, steps, sigma = None, None, json.loads((work / objective / "student" / "fastdiff.json").read_text())["sigma_init"]
    else:
        trainer = Trainer(cfg, overwrite=True, progress=False)
        trainer.export(start)
        t0 = time.time()
        trainer.fit()
        seconds, steps, sigma = time.time() - t0, trainer.step, trainer.generator.sigma_init
    if args.start_of and args.start_of != objective:
        # the same sampler at the same level from the teacher's weights (cd's boundary scalings are 1 - 5e-9 there)
        start = work / f"{args.start_of}-start"
    logs = [json.loads(line) for line in (work / objective / "metrics.jsonl").read_text().splitlines()]
    if steps is None:  # the checkpoint written when the time limit stopped the run
        steps = max(int(p.name.split("-")[1]) for p in (work / objective / "checkpoints").glob("step-*"))
    loss_key = f"loss_{objective}"
    losses = [r[loss_key] for r in logs]
    row = {"objective": objective, "settings": sets, "resolved": to_dict(cfg), "steps": steps,
           "train_seconds": seconds, "sigma_init": sigma, "start_folder": start.name,
           "loss_first_logged": losses[0], "loss_last_logged": losses[-1], "loss_max_logged": max(losses),
           "grad_norm_max_logged": max(r["grad_norm_generator"] for r in logs),
           "grad_norm_median_logged": sorted(r["grad_norm_generator"] for r in logs)[len(logs) // 2],
           "log": logs}
    for k in args.fid_steps:
        row[f"fid_start_{k}step"] = fid(start, args.ref, args.num, k, work / f"{start.name}-{k}.json")
        row[f"fid_end_{k}step"] = fid(work / objective / "student", args.ref, args.num, k, work / f"{objective}-end-{k}.json")
    print({k: v for k, v in row.items() if k not in ("log", "resolved", "settings")}, flush=True)
    return row


def summarize(results: Path = RESULTS) -> str:
    """README.md of the results folder: the check's table (check-*.json) and the diagnosis (diagnose.json)."""
    lines = ["# Consistency distillation on the embedded fmnist-ddpm teacher (CPU)", "",
             "Issue 26. Written by `python eval/consistency_cpu_check.py --summarize` from the JSON files here.", ""]
    rows = [{**json.loads(p.read_text()), "file": p.name} for p in sorted(results.glob("check-*.json"))]
    if rows:
        r0 = rows[0]
        lines += ["## Check: 5 minutes at batch 8, FID@1k before and after", "",
                  f"{r0.get('cpu_model', r0['machine'])}, {r0['cpus']} cores (steps done are what the time allowed: "
                  f"runs on cores shared with other jobs did fewer), torch {r0['torch']}, diffusers {r0['diffusers']}; "
                  "each row's date in its last column. "
                  f"{r0['reference']}. Start = the untrained student (the teacher's weights behind the same sampler, "
                  "from timestep 727).", "",
                  "| objective | lr | steps | first level | loss first / last / max logged | grad norm median / max | "
                  "FID@1k 1 step start -> end | 2 steps start -> end | file, date |", "|---|---|---|---|---|---|---|---|---|"]
        for result in rows:
            for r in result["rows"]:
                two = (f"{r['fid_start_2step']:.1f} -> {r['fid_end_2step']:.1f}" if "fid_end_2step" in r else "-")
                lines.append(f"| {r['objective']} | {r['resolved']['train']['lr_generator']:g} | {r['steps']} | sigma {r['sigma_init']:.2f} | "
                             f"{r['loss_first_logged']:.3g} / {r['loss_last_logged']:.3g} / {r['loss_max_logged']:.3g} | "
                             f"{r['grad_norm_median_logged']:.3g} / {r['grad_norm_max_logged']:.3g} | "
                             f"{r['fid_start_1step']:.1f} -> {r['fid_end_1step']:.1f} | {two} | "
                             f"{result['file']}, {result['date']} |")
        lines.append("")
    diag = results / "diagnose.json"
    if diag.is_file():
        d = json.loads(diag.read_text())
        lines += ["## Diagnosis at initialisation (student = target = teacher, batch 8 per level)", "",
                  "`python eval/consistency_diagnose.py`. x0 gain: RMS change of the student's x0 per unit weight step "
                  "along the cd gradient.", "",
                  "| timestep | 1 / a_t | teacher x0 RMSE | cd loss | grad norm | x0 gain |", "|---|---|---|---|---|---|"]
        for r in d["init"]:
            lines.append(f"| {r['timestep']} | {r['inv_a']:.1f} | {r['teacher_x0_rmse']:.3f} | {r['cd_loss']:.3g} | "
                         f"{r['grad_norm']:.3g} | {r['x0_gain']:.3g} |")
        if d.get("runs"):
            lines += ["", "## Short cd runs (variants)", "",
                      "One-step ODE error: RMS distance of the one-step sample to the teacher's 25-step DDIM sample from "
                      "the same noise and level.", "",
                      "| variant | lr | betas | top timestep | head | steps | loss first10 / last10 / max | "
                      "grad norm median / max | one-step ODE error start -> end |", "|---|---|---|---|---|---|---|---|---|"]
            for name, r in d["runs"].items():
                lines.append(f"| {name} | {r['lr']:g} | {r['betas']} | {r['top']} | {r['head']} | {r['steps']} | "
                             f"{r['loss_first10']:.3g} / {r['loss_last10']:.3g} / {r['loss_max']:.3g} | "
                             f"{r['grad_norm_median']:.3g} / {r['grad_norm_max']:.3g} | "
                             f"{r['one_step_ode_rmse_start']:.3f} -> {r['one_step_ode_rmse_end']:.3f} |")
        lines += ["", f"{d['machine']}, torch {d['torch']}, {d['date']}."]
    text = "\n".join(lines) + "\n"
    readme = results / "README.md"
    old = readme.read_text() if readme.is_file() else ""
    if "\n## Reading" in old:  # the hand-written analysis is kept
        text += old[old.index("\n## Reading"):]
    readme.write_text(text)
    return text


@script_main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-path", default=os.environ.get("FASTDIFF_FASHION_MNIST", "/work/shared/datasets/fashion-mnist"))
    p.add_argument("--ref", type=Path, default=None, help="reference statistics (default: 2k training images, made once)")
    p.add_argument("--objectives", default="cd,scm")
    p.add_argument("--minutes", type=float, default=5.0)
    p.add_argument("--lr", type=float, default=1e-4, help="train.lr_generator (the README's CD example)")
    p.add_argument("--num", type=int, default=1000)
    p.add_argument("--work", type=Path, default=Path("runs/consistency-cpu"))
    p.add_argument("--set", action="append", default=[], help="extra config overrides for every run")
    p.add_argument("--fid-steps", type=lambda s: [int(k) for k in s.split(",")], default=[1, 2])
    p.add_argument("--out", type=Path, default=None, help="default: eval/results/consistency-cpu/check-<objective>.json")
    p.add_argument("--summarize", action="store_true", help="only (re)write the results README from the JSON files")
    p.add_argument("--reuse", action="store_true", help="keep runs already trained in --work; only measure")
    p.add_argument("--start-of", default=None, help="measure every start with this objective's (e.g. cd)")
    args = p.parse_args(argv)
    from fastdiff.objectives import OBJECTIVES

    unknown = [o for o in args.objectives.split(",") if o not in OBJECTIVES]
    if unknown:
        raise FastdiffError(f"--objectives: unknown {', '.join(unknown)}")
    if args.summarize:
        print(summarize())
        return 0
    args.work.mkdir(parents=True, exist_ok=True)
    if args.ref is None:  # made once and shared by later runs
        args.ref = args.work / "fmnist-train2k.npz"
        if not args.ref.is_file():
            from fastdiff.cli import main as cli

            rc = cli(["ref-stats", "fashion-mnist:train", "--num", "2000", "--out", str(args.ref), "--data-path",
                      args.data_path, "--device", "cpu"])
            if rc:  # its one error line is printed: stop there
                return rc
    import diffusers

    result = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
              "threads": torch.get_num_threads(), "torch": torch.__version__, "diffusers": diffusers.__version__,
              "python": sys.version.split()[0], "date": time.strftime("%Y-%m-%d %H:%M"),
              "reference": "FID@%d vs the first 2000 Fashion-MNIST training images (nv-bilinear, crop 28)" % args.num,
              "rows": []}
    try:
        result["cpu_model"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    for objective in args.objectives.split(","):
        row = run(objective, args, args.work)
        out = args.out or RESULTS / f"check-{objective}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({**result, "rows": [row]}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
