"""Adaptive teacher-student sampling on the analytic teacher: sliced W2 to exact samples against NFE per image.

    OMP_NUM_THREADS=1 python eval/adaptive_nfe.py --out eval/results/adaptive     # about 30 s on one thread

Rows, all from the same noise: the deliberately imperfect one-step student (tests/test_adaptive.py's: an MLP
regressed 300 steps on the teacher's ODE pairs), adaptive sampling at q = 0.1, 0.2, 0.5 (critic: the teacher's
denoising error at sigma 0.2, 1 NFE; refinement: SDEdit from sigma 1 with 4 teacher DDIM steps) and at q = 1
(everything refined, no critic), a random fifth refined (what the critic is worth), and the teacher's DDIM alone.
Every q uses the same critic scores, so the refined sets are nested. Writes README.md (table), adaptive_nfe.json and
adaptive_nfe.png into --out. eval/adaptive_fid.py builds the same rows (``sample_rows``) on a real teacher (FID).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from fastdiff.bench.gmm import warm_start
from fastdiff.errors import FastdiffError, require_folder_path, script_main
from fastdiff.inference.adaptive import AdaptiveSampler, CallableCritic, DenoisingError
from fastdiff.inference.sampling import ddim_sample
from fastdiff.machine import describe, today, versions
from fastdiff.models.analytic import GaussianMixtureModel, sliced_wasserstein
from fastdiff.models.denoiser import Denoiser
from fastdiff.models.generator import Generator
from fastdiff.models.mlp import MLPDenoiser
from fastdiff.models.teacher import load_teacher

FRACTIONS = (0.1, 0.2, 0.5, 1.0)
TEACHER_NFE = (1, 2, 4, 8, 16, 32)


class Memo:
    """Calls ``fn`` once per input tensor (by identity) and returns the stored result after that: the rows below
    share one student draw and one critic score per noise batch, as they would if computed again (both are
    deterministic), at the cost of one. Other attributes (``levels``, ``nfe``, ...) are ``fn``'s."""

    def __init__(self, fn):
        self.fn, self.seen = fn, {}

    def __call__(self, x, *args, **kwargs):
        if id(x) not in self.seen:
            self.seen[id(x)] = (x, self.fn(x, *args, **kwargs))  # x kept alive, so its id is not reused
        return self.seen[id(x)][1]

    def __getattr__(self, name):
        return getattr(self.fn, name)


def sample_rows(student, teacher, z_batches: list, seed: int, sigma_refine: float, teacher_steps: int,
                critic_sigma: float, fractions=FRACTIONS, teacher_nfe=TEACHER_NFE):
    """Yield each row's samples, all rows from the same noise batches ``z_batches``: the student alone, a random
    fifth refined, adaptive at each fraction (denoising-error critic), the teacher's DDIM at each NFE. Batch b refines
    with noise seeded ``seed + 50 + b``; the random critic draws from one generator seeded ``seed`` per row."""
    student = Memo(student)
    critic = Memo(DenoisingError(teacher, critic_sigma, seed=seed))
    n = sum(len(z) for z in z_batches)
    with torch.no_grad():
        yield {"row": "student", "kind": "student", "nfe": float(student.levels().numel()), "refined_share": 0.0,
               "samples": torch.cat([student(z, None) for z in z_batches])}
    chance = torch.Generator()
    random = CallableCritic(lambda x, c: torch.rand(len(x), generator=chance))
    for q, crit, name in [(0.2, random, "random q=0.2")] + [(q, critic, f"adaptive q={q}") for q in fractions]:
        chance.manual_seed(seed)
        sampler = AdaptiveSampler(student, teacher, crit, fraction=q, sigma_refine=sigma_refine,
                                  teacher_steps=teacher_steps)
        results = [sampler(z, rng=torch.Generator().manual_seed(seed + 50 + b)) for b, z in enumerate(z_batches)]
        yield {"row": name, "kind": "adaptive" if crit is critic else "random",
               "nfe": sum(r.nfe_per_image * len(r.samples) for r in results) / n,
               "refined_share": sum(int(r.refined.sum()) for r in results) / n,
               "samples": torch.cat([r.samples for r in results])}
    for k in teacher_nfe:
        yield {"row": f"teacher ddim-{k}", "kind": "teacher", "nfe": float(k), "refined_share": None,
               "samples": torch.cat([ddim_sample(teacher, z, k) for z in z_batches])}


def run(num: int, seed: int, sigma_refine: float, teacher_steps: int, critic_sigma: float) -> dict:
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        gmm = GaussianMixtureModel()
        gmm.save_teacher(tmp / "teacher")
        teacher = load_teacher(str(tmp / "teacher")).denoiser
        warm_start(load_teacher(str(tmp / "teacher")), tmp / "student", "ode", num_pairs=4096, steps=300,
                   ode_steps=50, hidden=128, depth=2)
        student = Generator(Denoiser(MLPDenoiser.from_pretrained(tmp / "student"), teacher.schedule, "sample"))
    truth = gmm.sample_true(num, torch.Generator().manual_seed(seed + 100))
    floor = sliced_wasserstein(truth, gmm.sample_true(num, torch.Generator().manual_seed(seed + 200)))
    z = torch.randn(num, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
    rows = []
    for row in sample_rows(student, teacher, [z], seed, sigma_refine, teacher_steps, critic_sigma):
        samples = row.pop("samples")
        rows.append({**row, "sw2": sliced_wasserstein(samples, truth)})
    return {"machine": describe("cpu"), "versions": versions(), "date": today(), "num": num, "seed": seed,
            "sigma_refine": sigma_refine, "teacher_steps": teacher_steps, "critic_sigma": critic_sigma,
            "sw2_floor": floor, "seconds": round(time.time() - start, 1), "rows": rows}


def table(result: dict) -> str:
    v = result["versions"]
    lines = ["# Adaptive sampling on the analytic teacher: sliced W2 vs NFE per image", "",
             f"{result['date']}, {result['machine']}, python {v['python']}, torch {v['torch']}, diffusers "
             f"{v['diffusers']}, fastdiff {v['fastdiff']}; n = {result['num']}, seed {result['seed']}, "
             f"{result['seconds']} s. Critic: teacher denoising error at sigma {result['critic_sigma']} (1 NFE); "
             f"refinement: SDEdit from sigma {result['sigma_refine']}, {result['teacher_steps']} teacher DDIM steps. "
             f"Floor (two exact sample sets): {result['sw2_floor']:.4f}.", "",
             "| row | NFE / image | refined | sliced W2 | / floor |", "|---|---:|---:|---:|---:|"]
    for r in result["rows"]:
        share = "-" if r["refined_share"] is None else f"{r['refined_share']:.2f}"
        lines.append(f"| {r['row']} | {r['nfe']:.2f} | {share} | {r['sw2']:.4f} | "
                     f"{r['sw2'] / result['sw2_floor']:.2f} |")
    lines += ["", "NFE per image = 1 (student) + 1 (critic, on every image; none at q = 1) + refined share x teacher "
              "steps. Chart: adaptive_nfe.png."]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path, metric: str = "sw2", ylabel: str = "sliced W2 to exact samples",
         title: str = "adaptive teacher-student sampling (analytic teacher)", floor: float | None = None,
         log_y: bool = False) -> None:
    import matplotlib
    import matplotlib.ticker
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for kind, style in (("teacher", "o-"), ("adaptive", "s-"), ("student", "*"), ("random", "x")):
        rows = sorted((r for r in result["rows"] if r["kind"] == kind),
                      key=lambda r: (r["refined_share"] or 0, r["nfe"]))  # adaptive by q, teacher by NFE
        if kind == "adaptive":
            rows = [r for r in result["rows"] if r["kind"] == "student"] + rows  # the curve starts at q = 0
        ax.plot([r["nfe"] for r in rows], [r[metric] for r in rows], style, label=kind, markersize=9)
    if floor is not None:
        ax.axhline(floor, color="gray", ls="--", label="floor")
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())  # 1, 2, 4 rather than 2^0, 2^1, 2^2
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("NFE per image")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


@script_main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="eval/results/adaptive")
    parser.add_argument("--num", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sigma-refine", type=float, default=1.0)
    parser.add_argument("--teacher-steps", type=int, default=4)
    parser.add_argument("--critic-sigma", type=float, default=0.2)
    args = parser.parse_args()
    if args.num <= 0 or args.teacher_steps <= 0 or not args.sigma_refine > 0 or not args.critic_sigma > 0:
        raise FastdiffError("--num, --teacher-steps, --sigma-refine and --critic-sigma must be positive")
    out = Path(args.out)
    require_folder_path(out, "--out")  # a file here was found only after the run
    result = run(args.num, args.seed, args.sigma_refine, args.teacher_steps, args.critic_sigma)
    out.mkdir(parents=True, exist_ok=True)
    (out / "adaptive_nfe.json").write_text(json.dumps(result, indent=2))
    (out / "README.md").write_text(table(result))
    plot(result, out / "adaptive_nfe.png", floor=result["sw2_floor"])
    print(table(result))


if __name__ == "__main__":
    main()
