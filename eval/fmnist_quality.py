"""One command for the Fashion-MNIST quality table: teachers at DDIM NFE 1..100 against one-step students.

For both reference teachers (``fmnist-ddpm``, unconditional; ``fmnist-cond-vpred``, class-conditional with CFG 2 on
the real score) it distills every config in ``eval/configs/`` with fastdiff's own CLI (each run stops at its
``train.time_limit_minutes``, 10), then measures FID@N and KID with ``fastdiff``'s evaluation against the 60k
training images: the teacher at each DDIM NFE, each student at 1 step (and 2 and 4 for consistency students). It
writes ``fmnist.md`` and ``fmnist.json`` (FID, KID, steps, wall time, device, versions, date) and a sample grid per
model to ``--out``.

    python eval/fmnist_quality.py --out eval/results/fmnist                       # the full table (GPU)
    python eval/fmnist_quality.py --num 20 --ref-num 20 --nfe 1 --objectives dmd2 \\
        --set train.max_steps=1 --set train.batch_size=2 --out /tmp/smoke          # a smoke run on a CPU
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TEACHERS = {"ddpm": ("fmnist-ddpm", 1.0), "cond": ("fmnist-cond-vpred", 2.0)}  # folder, CFG of the evaluation
MULTI_STEP = {"cd"}  # students trained to sample at several step counts


def fid_rows(model: Path, steps: list[int], guidance: float | None, ref, extractor, args, label: str) -> list[dict]:
    from fastdiff.evaluate import evaluate
    from fastdiff.images import model_sources
    from fastdiff.sampling import save_grid

    rows = []
    sources = model_sources(str(model), steps, args.seed, guidance, args.device)  # the model is loaded once
    for k, source in zip(steps, sources):
        result = evaluate(source, ref, extractor, args.num, args.batch_size, args.crop)
        rows.append({"model": label, "steps": k, "fid": result["fid"], "fid_label": result["fid_label"],
                     "kid": result.get("kid"), "kid_std": result.get("kid_std"),
                     "images_per_second": result.get("images_per_second")})
    images = next(sources[0].read(100, 100)).permute(0, 2, 3, 1).numpy()  # uint8 NCHW -> NHWC
    save_grid(images, Path(args.out) / "grids" / f"{label}-{steps[0]}step.png", ncol=10)
    return rows


def distill(config: Path, teacher: Path, run: Path, args) -> float:
    sets = [f"teacher.path={teacher}", f"output_dir={run}", f"data.path={args.data_path}", *(args.set or [])]
    cmd = [sys.executable, "-m", "fastdiff", "distill", "--config", str(config), "--overwrite"]
    for item in sets:
        cmd += ["--set", item]
    t0 = time.time()
    subprocess.run(cmd, check=True)
    return time.time() - t0


def table(result: dict) -> str:
    lines = [f"# Fashion-MNIST: one-step students against their teachers ({result['device']})", "",
             f"{result['date']}, " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()), "",
             "| teacher | model | steps (NFE) | FID | KID | distill wall s |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        kid = "" if r["kid"] is None else f"{r['kid']:.5f} +- {r['kid_std']:.5f}"
        wall = "" if r.get("wall_seconds") is None else f"{r['wall_seconds']:.0f}"
        lines.append(f"| {r['teacher']} | {r['model']} | {r['steps']} | {r['fid']:.2f} | {kid} | {wall} |")
    lines += ["", f"FID label: {result['rows'][0]['fid_label']}" if result["rows"] else "", ""]
    for teacher, verdict in result["verdicts"].items():
        lines.append(f"- {teacher}: " + "; ".join(verdict))
    return "\n".join(lines) + "\n"


def verdicts(rows: list[dict]) -> dict:
    out = {}
    for teacher in {r["teacher"] for r in rows}:
        mine = [r for r in rows if r["teacher"] == teacher]
        t = {r["steps"]: r["fid"] for r in mine if r["model"] == "teacher"}
        students = [r for r in mine if r["model"] != "teacher" and r["steps"] == 1]
        notes = []
        if 10 in t:
            for s in students:
                notes.append(f"{s['model']} 1-step {s['fid']:.2f} {'beats' if s['fid'] < t[10] else 'does not beat'} "
                             f"teacher NFE 10 ({t[10]:.2f})")
        if t and students:
            best = min(students, key=lambda r: r["fid"])
            best_t = min(t.items(), key=lambda kv: kv[1])
            notes.append(f"best 1-step student {best['model']} {best['fid']:.2f} vs best teacher "
                         f"{best_t[1]:.2f} (NFE {best_t[0]})")
        out[teacher] = notes
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="eval/results/fmnist")
    p.add_argument("--teachers", default=str(ROOT.parent / "shared" / "teachers"))
    p.add_argument("--data-path", default=str(ROOT.parent / "shared" / "datasets" / "fashion-mnist"))
    p.add_argument("--objectives", default="dmd2,sid,sim,cd")
    p.add_argument("--which", default="ddpm,cond", help="teachers: ddpm, cond")
    p.add_argument("--nfe", default="1,2,4,10,25,50,100", help="teacher DDIM step counts")
    p.add_argument("--num", type=int, default=10000, help="images per FID")
    p.add_argument("--ref-num", type=int, default=None, help="reference images (default: all 60k)")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--crop", type=int, default=28, help="the teachers make 32x32 (padded) images; the data is 28x28")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--set", action="append", help="extra config override for every distillation run")
    args = p.parse_args()

    import torch

    from fastdiff.evaluate import make_reference
    from fastdiff.images import open_source
    from fastdiff.inception import InceptionFeatures
    from fastdiff.machine import describe, today, versions
    from fastdiff.metrics import ReferenceStats

    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    extractor = InceptionFeatures(None, "nv-bilinear").to(args.device)
    ref_file = out / f"fmnist-train{args.ref_num or 'all'}.npz"
    if not ref_file.is_file():
        source = open_source("fashion-mnist:train", data_path=args.data_path, allow_model=False)
        make_reference(source, extractor, args.ref_num, args.batch_size, 5000, None).save(ref_file)
    ref = ReferenceStats.load(ref_file)
    rows = []
    for which in args.which.split(","):
        folder, guidance = TEACHERS[which]
        teacher = Path(args.teachers) / folder
        scale = guidance if guidance != 1.0 else None
        nfe = [int(k) for k in args.nfe.split(",")]
        for r in fid_rows(teacher, nfe, scale, ref, extractor, args, f"{which}-teacher"):
            rows.append({**r, "teacher": folder, "model": "teacher"})
        for name in args.objectives.split(","):
            run = out / "runs" / f"{which}-{name}"
            wall = distill(ROOT / "eval" / "configs" / f"fmnist-{which}-{name}.yaml", teacher, run, args)
            steps = [1, 2, 4] if name in MULTI_STEP else [1]
            for r in fid_rows(run / "student", steps, None, ref, extractor, args, f"{which}-{name}"):
                rows.append({**r, "teacher": folder, "model": name, "wall_seconds": wall})
    result = {"device": describe(args.device), "versions": versions(), "date": today(), "num": args.num,
              "reference": ref.name, "reference_n": ref.n, "rows": rows, "verdicts": verdicts(rows)}
    (out / "fmnist.json").write_text(json.dumps(result, indent=2, default=str))
    (out / "fmnist.md").write_text(table(result))
    print(table(result))


if __name__ == "__main__":
    main()
