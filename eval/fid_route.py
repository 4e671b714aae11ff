"""FID's square-root trace with few generated images: the N x N route against the d x d one, timed.

``fastdiff.evaluation.metrics.frechet_distance`` takes tr((S1 S2)^(1/2)) from two d x d symmetric
eigendecompositions (the baseline here), or, given the generated side's centred features F (N <= d, S1 = F'F), from
the N x N matrix F S2 F' (``factor1``; what ``evaluate`` and ``train.eval_every`` use at N <= 2048). This times both
on random Inception-sized features (d = 2048; the time depends on the sizes, not the values) and prints a table with
the machine, the versions, the ratio and the two results' relative difference.

    OMP_NUM_THREADS=1 taskset -c 1 python eval/fid_route.py --out eval/results/fid-route-cpu
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fastdiff.errors import FastdiffError, require_folder_path, script_main  # noqa: E402


def _seconds(fn, repeats: int) -> tuple[float, float]:
    """(the fastest of ``repeats`` calls, its result)."""
    best, value = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        value = fn()
        best = min(best, time.perf_counter() - t0)
    return best, value


def rows(dim: int, counts: list[int], repeats: int, seed: int = 0) -> list[dict]:
    from fastdiff.evaluation.metrics import FeatureStats, frechet_distance

    rng = np.random.default_rng(seed)
    ref = rng.standard_normal((2 * dim, dim))  # a full-rank reference covariance, as FID@10k's is
    mu2, s2 = ref.mean(0), np.cov(ref, rowvar=False)
    out = []
    for n in counts:
        stats = FeatureStats(dim)
        stats.add(rng.standard_normal((n, dim)) * 0.8 + 0.1)
        mu, s1 = stats.mean_cov()
        factor = stats.cov_factor()
        full_s, full = _seconds(lambda: frechet_distance(mu, s1, mu2, s2), repeats)
        small_s, small = _seconds(lambda: frechet_distance(mu, s1, mu2, s2, factor1=factor), repeats)
        out.append({"n": n, "dim": dim, "full_seconds": full_s, "factor_seconds": small_s,
                    "speedup": full_s / small_s, "relative_difference": abs(full - small) / abs(full)})
    return out


def table(result: dict) -> str:
    lines = [f"# FID's square-root trace: N x N route vs d x d route ({result['machine']}, {result['date']})", "",
             f"{', '.join(f'{k} {v}' for k, v in result['versions'].items())}; fastest of {result['repeats']} calls.",
             "", "| N images | d | d x d route (s) | N x N route (s) | ratio | relative difference |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['n']} | {r['dim']} | {r['full_seconds']:.3f} | {r['factor_seconds']:.4f} | {r['speedup']:.0f}x | "
              f"{r['relative_difference']:.1e} |" for r in result["rows"]]
    return "\n".join(lines) + "\n"


@script_main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dim", type=int, default=2048, help="feature size (Inception's pool features: 2048)")
    p.add_argument("--n", default="8,64,500,2048", help="generated-image counts, comma-separated, each <= --dim")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None, help="folder for result.json and README.md (default: print only)")
    args = p.parse_args()
    try:
        counts = [int(c) for c in args.n.split(",") if c.strip()]
    except ValueError:
        raise FastdiffError(f"--n must be comma-separated integers, got {args.n!r}") from None
    if args.dim < 2 or args.repeats < 1 or not counts or not all(2 <= c <= args.dim for c in counts):
        raise FastdiffError(f"--dim must be >= 2, --repeats >= 1 and each --n in [2, --dim]; got --dim {args.dim}, "
                            f"--repeats {args.repeats}, --n {args.n}")
    out = Path(args.out) if args.out else None
    if out is not None:
        require_folder_path(out, "--out")
    from fastdiff.machine import describe, today, versions

    result = {"machine": describe(), "date": today(), "versions": versions(), "repeats": args.repeats,
              "rows": rows(args.dim, counts, args.repeats)}
    text = table(result)
    print(text, end="")
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "result.json").write_text(json.dumps(result, indent=1) + "\n")
        (out / "README.md").write_text(text + "\nMade by `OMP_NUM_THREADS=1 taskset -c 1 python eval/fid_route.py "
                                       f"--out {out}` (eval/fid_route.py says what it times).\n")


if __name__ == "__main__":
    main()
