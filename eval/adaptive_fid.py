"""Adaptive teacher-student sampling on a real teacher: FID@N and KID against NFE per image.

    OMP_NUM_THREADS=1 python eval/adaptive_fid.py            # embedded fmnist-ddpm teacher, CPU ladder's pg-sb student
    # what eval/results/adaptive-fmnist holds: the ladder's teacher DDIM 1 and 10 quoted, cheap rows first
    OMP_NUM_THREADS=1 python eval/adaptive_fid.py --fractions 0.2,0.1,0.5,1 --teacher-nfe 2,4 --ladder-teacher 1,10
    OMP_NUM_THREADS=1 python eval/adaptive_fid.py --append --fractions "" --teacher-nfe 2,4   # rows a run lacks
    OMP_NUM_THREADS=1 python eval/adaptive_fid.py --num 200 --fractions 1 --teacher-nfe "" --out /tmp/trial  # a trial

The rows of eval/adaptive_nfe.py (student alone, adaptive at q = 0.1, 0.2, 0.5 with the denoising-error critic and
at q = 1, a random q = 0.2, the teacher's DDIM alone), all from the noise the CPU ladder samples with (batch b of 250
from ``torch.Generator().manual_seed(seed + b)``, as ``fastdiff fid``), scored on the ladder's scale: its cached
2,000-image Fashion-MNIST reference, nv-bilinear resize, centre crop 28, KID subsets of 1,000. Inception features
are cached per image, so an adaptive row pays Inception only for the images it refined (an unrefined image is the
student's, bit for bit). Writes README.md (table, then NOTES.md if --out has one), adaptive_fid.json and
adaptive_fid.png into --out, after every row (a run cut short keeps its finished rows).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared row builder of the analytic script
from adaptive_nfe import FRACTIONS, plot, sample_rows  # noqa: E402

from fastdiff.errors import FastdiffError, require_folder_path, script_main  # noqa: E402
from fastdiff.evaluation.images import centre_crop  # noqa: E402
from fastdiff.evaluation.inception import InceptionFeatures  # noqa: E402
from fastdiff.evaluation.metrics import (FeatureStats, ReferenceStats, frechet_distance,  # noqa: E402
                                         kernel_inception_distance)
from fastdiff.inference.sampling import load_sampler, to_uint8  # noqa: E402
from fastdiff.machine import describe, today, versions  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LADDER = "eval/results/cpu-ladder"  # read only: the ladder's process owns it
BATCH = 250  # the ladder's sampling batch: the same noise per image needs the same batching
SETTINGS = ("teacher", "student", "reference", "num", "seed", "crop", "sigma_refine", "teacher_steps", "critic_sigma")


class FeatureCache:
    """Inception features per image (keyed by its uint8 bytes): an image seen in an earlier row costs nothing."""

    def __init__(self, extractor: InceptionFeatures, crop: int | None):
        self.extractor, self.crop, self.seen = extractor, crop, {}

    def __call__(self, samples: torch.Tensor) -> torch.Tensor:
        images = torch.from_numpy(to_uint8(samples)).permute(0, 3, 1, 2).contiguous()
        if self.crop:
            images = centre_crop(images, self.crop)
        keys = [img.numpy().tobytes() for img in images]
        first = {}  # each new image once, even if it occurs twice in the batch
        for i, k in enumerate(keys):
            if k not in self.seen:
                first.setdefault(k, i)
        new = list(first.values())
        for start in range(0, len(new), BATCH):
            idx = new[start:start + BATCH]
            for i, f in zip(idx, self.extractor(images[idx])):
                self.seen[keys[i]] = f
        return torch.stack([self.seen[k] for k in keys])


def fid_kid(features: torch.Tensor, ref: ReferenceStats) -> dict:
    """FID and KID as ``fastdiff.evaluation.evaluate`` computes them (float64 stats, KID subsets of 1,000)."""
    stats = FeatureStats(features.shape[1], keep=len(features))
    stats.add(features)
    mu, sigma = stats.mean_cov()
    kid, kid_std = kernel_inception_distance(stats.features(), ref.features, subset_size=1000)
    return {"fid": frechet_distance(mu, sigma, ref.mu, ref.sigma, factor1=stats.cov_factor()),
            "fid_label": ref.label("FID", stats.n), "kid": kid, "kid_std": kid_std}


def ladder_rows(args) -> list[dict]:
    """The teacher DDIM rows the CPU ladder measured (``--ladder-teacher``), taken from its ladder.json rather than
    sampled again: the same teacher, noise (seed 0, batches of 250), reference, crop and FID@N, so the same row."""
    if not args.ladder_teacher:
        return []
    ladder = json.loads(Path(args.ladder).read_text())
    if args.teacher != "embedded:fmnist-ddpm" or args.seed != 0 or args.num != ladder["num"] or args.crop != 28:
        raise FastdiffError(f"--ladder-teacher: the ladder's rows are the embedded teacher at seed 0, crop 28, "
                            f"{ladder['num']} images; measure them here instead (--teacher-nfe)")
    rows = []
    for k in args.ladder_teacher:
        row = next((r for r in ladder["rows"] if (r["teacher"], r["kind"], r["steps"]) == ("ddpm", "teacher", k)), None)
        if row is None:
            raise FastdiffError(f"{args.ladder} has no teacher DDIM {k} row; measure it here (--teacher-nfe {k})")
        rows.append({"row": f"teacher ddim-{k} (ladder)", "kind": "teacher", "nfe": float(k), "refined_share": None,
                     **{key: row[key] for key in ("fid", "fid_label", "kid", "kid_std")}, "seconds": None,
                     "source": f"{args.ladder}, commit {row.get('commit', '(not recorded)')}"})
    return rows


def run(args, save) -> dict:
    start = time.time()
    cpu = torch.device("cpu")
    teacher, loaded = load_sampler(args.teacher, cpu)
    student, _ = load_sampler(args.student, cpu)
    ref = ReferenceStats.load(args.ref)
    extractor = InceptionFeatures(None, ref.resize)
    ref.check_extractor(extractor.extractor_id)
    ref.check_images(extractor.resize, (loaded.image_shape[0], args.crop, args.crop))
    features = FeatureCache(extractor, args.crop)
    z_batches = [torch.randn((min(BATCH, args.num - s), *loaded.sample_shape),
                             generator=torch.Generator().manual_seed(args.seed + b))
                 for b, s in enumerate(range(0, args.num, BATCH))]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    result = {"machine": describe(cpu), "versions": versions(), "date": today(), "commit": commit.stdout.strip(),
              "teacher": args.teacher, "student": args.student, "reference": ref.name, "reference_n": ref.n,
              "num": args.num, "seed": args.seed, "crop": args.crop, "sigma_refine": args.sigma_refine,
              "teacher_steps": args.teacher_steps, "critic_sigma": args.critic_sigma, "rows": []}
    if args.append:  # add rows to an earlier run of the same settings; the rows it has are sampled but not scored
        if not (Path(args.out) / "adaptive_fid.json").is_file():
            raise FastdiffError(f"--append: {Path(args.out) / 'adaptive_fid.json'} does not exist; run without it")
        previous = json.loads((Path(args.out) / "adaptive_fid.json").read_text())
        differ = [k for k in SETTINGS if previous[k] != result[k]]
        if differ:
            raise FastdiffError(f"--append: {', '.join(differ)} differ from the earlier run's; use another --out")
        result["rows"] = previous["rows"]
        result["seconds"] = previous["seconds"]  # kept when no new row is scored (the table reads it)
        start -= previous["seconds"]
    done = {r["row"] for r in result["rows"]}
    rows = sample_rows(student, teacher, z_batches, args.seed, args.sigma_refine, args.teacher_steps,
                       args.critic_sigma, args.fractions, args.teacher_nfe)
    t0 = time.time()
    for row in rows:
        if row["row"] in done:
            t0 = time.time()
            continue
        row.update(fid_kid(features(row.pop("samples")), ref), seconds=round(time.time() - t0, 1),
                   commit=result["commit"], date=result["date"])
        result["rows"].append(row)
        result["seconds"] = round(time.time() - start, 1)
        save(result)
        print(f"{row['row']}: NFE {row['nfe']:.2f}, {row['fid_label']} {row['fid']:.1f}", flush=True)
        t0 = time.time()
    result["rows"] += [r for r in ladder_rows(args) if r["row"] not in done]
    save(result)
    return result


def table(result: dict) -> str:
    v = result["versions"]
    lines = ["# Adaptive sampling on the embedded Fashion-MNIST DDPM teacher: FID vs NFE per image", "",
             f"{result['date']}, {result['machine']}, commit {result['commit']}, python {v['python']}, torch "
             f"{v['torch']}, diffusers {v['diffusers']}, fastdiff {v['fastdiff']}; {result['seconds']} s.", "",
             f"Teacher {result['teacher']}; student {result['student']}. {result['num']} images per row, seed "
             f"{result['seed']} (the CPU ladder's noise), against {result['reference']} ({result['reference_n']} "
             f"images), centre crop {result['crop']}. Critic: the teacher's denoising error at sigma "
             f"{result['critic_sigma']} (1 NFE); refinement: SDEdit from sigma {result['sigma_refine']}, "
             f"{result['teacher_steps']} teacher DDIM steps.", "",
             "| row | NFE / image | refined | FID | KID | seconds |", "|---|---:|---:|---:|---:|---:|"]
    order = ("student", "random", "adaptive", "teacher")  # rows are measured cheapest-first, shown in this order
    for r in sorted(result["rows"], key=lambda r: (order.index(r["kind"]), r["refined_share"] or 0, r["nfe"])):
        share = "-" if r["refined_share"] is None else f"{r['refined_share']:.2f}"
        seconds = "-" if r["seconds"] is None else r["seconds"]
        lines.append(f"| {r['row']} | {r['nfe']:.2f} | {share} | {r['fid']:.1f} | {r['kid']:.4f} | {seconds} |")
    label = result["rows"][0]["fid_label"] if result["rows"] else "FID"
    lines += ["", f"FID = {label}. NFE per image = 1 (student) + 1 (critic, on every image; none at q = 1) + refined "
              "share x teacher steps. Seconds: sampling + Inception of the row's new images (one thread, shared "
              "core). Rows marked (ladder): the CPU ladder's measurement of the same row (same noise and scoring), "
              "from its ladder.json. Chart: adaptive_fid.png."]
    return "\n".join(lines) + "\n"


def numbers(text: str, kind=float) -> tuple:
    return tuple(kind(x) for x in text.split(",") if x.strip())


@script_main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="eval/results/adaptive-fmnist")
    parser.add_argument("--teacher", default="embedded:fmnist-ddpm")
    parser.add_argument("--student", default=f"{LADDER}/runs/ddpm-pg-sb/student")
    parser.add_argument("--ref", default=f"{LADDER}/fmnist-train2000.npz")
    parser.add_argument("--num", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--crop", type=int, default=28)
    parser.add_argument("--sigma-refine", type=float, default=1.0)
    parser.add_argument("--teacher-steps", type=int, default=2)
    parser.add_argument("--critic-sigma", type=float, default=0.2)
    parser.add_argument("--fractions", type=numbers, default=FRACTIONS, help="refined shares with the critic")
    parser.add_argument("--teacher-nfe", type=lambda s: numbers(s, int), default=(1, 2, 4, 10), help="DDIM rows")
    parser.add_argument("--ladder-teacher", type=lambda s: numbers(s, int), default=(),
                        help="teacher DDIM rows to take from the ladder's ladder.json instead (e.g. 1,10)")
    parser.add_argument("--ladder", default=f"{LADDER}/ladder.json")
    parser.add_argument("--render", action="store_true",
                        help="only rewrite README.md and the chart from the json (+ missing --ladder-teacher rows)")
    parser.add_argument("--append", action="store_true", help="add the rows --out's json lacks (same settings)")
    args = parser.parse_args()
    out = Path(args.out)
    require_folder_path(out, "--out")

    def save(result: dict, write_json: bool = True) -> None:
        out.mkdir(parents=True, exist_ok=True)  # here, not before the inputs are checked: a bad call leaves nothing
        if write_json:
            (out / "adaptive_fid.json").write_text(json.dumps(result, indent=2))
        notes = out / "NOTES.md"  # the hand-written analysis, kept below the table as the CPU ladder does
        (out / "README.md").write_text(table(result) + (f"\n{notes.read_text().rstrip()}\n" if notes.is_file() else ""))
        plot(result, out / "adaptive_fid.png", "fid", result["rows"][0]["fid_label"],
             "adaptive teacher-student sampling (fmnist-ddpm)", log_y=True)

    if args.render:  # no sampling; the --ladder-teacher rows the json lacks are added (a run cut short has none)
        if not (out / "adaptive_fid.json").is_file():
            raise FastdiffError(f"--render: {out / 'adaptive_fid.json'} does not exist; run without --render first")
        result = json.loads((out / "adaptive_fid.json").read_text())
        done = {r["row"] for r in result["rows"]}
        args.teacher, args.num, args.seed, args.crop = (result[k] for k in ("teacher", "num", "seed", "crop"))
        added = [r for r in ladder_rows(args) if r["row"] not in done]
        result["rows"] += added
        return save(result, write_json=bool(added))
    print(table(run(args, save)))


if __name__ == "__main__":
    main()
