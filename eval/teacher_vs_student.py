"""Teacher versus students: FID@N and KID of a teacher at several DDIM NFEs and of students at 1, 2 and 4 steps,
with sampling throughput, in one command. Writes a markdown table and JSON (machine, versions, date).

    python eval/teacher_vs_student.py --teacher embedded:fmnist-ddpm --students runs/quickstart/student \
        --ref fmnist-train.npz --num 10000 --crop 28 --out eval/results/fmnist-teacher-vs-student

Reference statistics come from ``fastdiff ref-stats`` (e.g. ``fastdiff ref-stats fashion-mnist:train --out REF``).
Every row reads the same noise seeds, so rows differ only by the model and its number of steps.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from fastdiff.training.checkpoint import atomic_write_text
from fastdiff.errors import FastdiffError, require_folder_path
from fastdiff.evaluation.evaluate import evaluate
from fastdiff.models.embedded import resolve_teacher_path
from fastdiff.evaluation.images import is_model_folder, model_sources
from fastdiff.evaluation.inception import InceptionFeatures
from fastdiff.machine import describe, today, versions
from fastdiff.evaluation.metrics import ReferenceStats, count_label

TEACHER_NFE = (1, 2, 4, 10, 25, 50)
STUDENT_STEPS = (1, 2, 4)


def _steps(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise FastdiffError(f"steps {text!r} must be comma-separated integers, e.g. 1,2,4") from None
    if not values or min(values) <= 0:
        raise FastdiffError(f"steps {text!r} must be positive integers")
    return values


def run(teacher: str | None, students: list[str], ref_path: str, num: int, teacher_nfe, student_steps,
        batch_size: int = 100, crop: int | None = None, guidance_scale: float | None = None, seed: int = 0,
        device=None, inception: str | None = None) -> dict:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ref = ReferenceStats.load(ref_path)
    models = ([("teacher", teacher, teacher_nfe)] if teacher else []) + [("student", s, student_steps) for s in students]
    if not models:
        raise FastdiffError("nothing to evaluate: give --teacher and/or --students")
    plan = []
    for kind, model, steps in models:  # each model loaded once, and every row checked before the long part
        folder = Path(resolve_teacher_path(model))
        if not (folder.is_dir() and is_model_folder(folder)):
            raise FastdiffError(f"{model} is not a model folder (a teacher or an exported student)")
        scale = guidance_scale if kind == "teacher" else None
        for k, src in zip(steps, model_sources(str(folder), list(steps), seed, scale, device)):
            ref.check_images(ref.resize, src.cropped_shape(crop))
            plan.append((kind, model, k, src))
    extractor = InceptionFeatures(inception, ref.resize).to(device)
    rows, start = [], time.perf_counter()
    for kind, model, steps, src in plan:
        r = evaluate(src, ref, extractor, num, batch_size, crop)
        rows.append({"model": model, "kind": kind, "steps": steps, **r})
        print(f"{kind:8s} {Path(model).name:28s} {steps:3d}  {r['fid_label']} = {r['fid']:.3f}"
              f"  KID = {r.get('kid', float('nan')):.5f}  {r['images_per_second']:.1f} img/s", flush=True)
    feature_seconds = sum(r["feature_seconds"] for r in rows)
    return {"date": today(), "machine": describe(device), "versions": versions(), "reference": ref.name,
            "reference_n": ref.n, "resize": ref.resize, "extractor": ref.extractor, "num": num, "crop": crop,
            "guidance_scale": guidance_scale, "seed": seed, "batch_size": batch_size,
            "feature_seconds_per_1000": 1000 * feature_seconds / sum(r["n"] for r in rows),
            "total_seconds": time.perf_counter() - start, "rows": rows}


def table(result: dict) -> str:
    n = count_label(result["num"])
    fid, kid = f"FID@{n}", f"KID@{n}"
    lines = [f"# Teacher versus students: {fid}({result['reference']}, {result['resize']})", "",
             f"{result['date']} on {result['machine']}; torch {result['versions']['torch']}, diffusers "
             f"{result['versions']['diffusers']}, fastdiff {result['versions']['fastdiff']}. Extractor "
             f"{result['extractor']}; reference {result['reference']} ({result['reference_n']} images)"
             + (f"; samples centre-cropped to {result['crop']}" if result["crop"] else "") + ".", "",
             f"| model | kind | steps (NFE) | {fid} | {kid} | img/s (sampling) |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        kid_text = f"{r['kid']:.4f} ± {r['kid_std']:.4f}" if "kid" in r else "n/a"
        lines.append(f"| {Path(r['model']).name} | {r['kind']} | {r['steps']} | {r['fid']:.2f} | {kid_text} | "
                     f"{r['images_per_second']:.1f} |")
    lines += ["", f"Inception features: {result['feature_seconds_per_1000']:.1f} s per 1000 images; "
              f"whole run {result['total_seconds']:.0f} s."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", help="teacher folder (sampled with DDIM), e.g. embedded:fmnist-ddpm")
    p.add_argument("--students", nargs="*", default=[], help="exported student folders")
    p.add_argument("--ref", required=True, help="reference statistics (.npz from fastdiff ref-stats)")
    p.add_argument("--num", type=int, default=10000, help="images per row (default 10000)")
    p.add_argument("--teacher-nfe", default=",".join(map(str, TEACHER_NFE)), help="default 1,2,4,10,25,50")
    p.add_argument("--student-steps", default=",".join(map(str, STUDENT_STEPS)), help="default 1,2,4")
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--crop", type=int, default=None, help="centre-crop samples (28 for the 32x32 Fashion-MNIST teachers)")
    p.add_argument("--guidance-scale", type=float, default=None, help="the teacher's CFG scale (class-conditional)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--inception", default=None, help="Inception weights file (default: as fastdiff fid)")
    p.add_argument("--out", required=True, help="folder for table.md and results.json")
    args = p.parse_args(argv)
    try:
        if args.num <= 0 or args.batch_size <= 0:
            raise FastdiffError("--num and --batch-size must be positive")
        out = Path(args.out)
        require_folder_path(out, "--out")  # a file here was found only after the whole run
        if not out.resolve().parent.is_dir():
            raise FastdiffError(f"--out {out}: folder {out.parent} does not exist")
        result = run(args.teacher, args.students, args.ref, args.num, _steps(args.teacher_nfe),
                     _steps(args.student_steps), args.batch_size, args.crop, args.guidance_scale, args.seed,
                     args.device, args.inception)
    except FastdiffError as exc:
        print(f"teacher_vs_student: error: {exc}", file=sys.stderr)
        return 2
    out.mkdir(exist_ok=True)
    atomic_write_text(out / "results.json", json.dumps(result, indent=2))
    atomic_write_text(out / "table.md", table(result))
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
