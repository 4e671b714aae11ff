"""Training curves of fastdiff runs, from their metrics.jsonl: each loss, the gradient norms, and the FIDs measured
while training (``train.eval_every``), against the generator update; one PNG, one line per run.

    python eval/plot_metrics.py runs/quickstart --out curves.png
    python eval/plot_metrics.py runs/a runs/b/metrics.jsonl --labels a,b --out compare.png
    python eval/plot_metrics.py runs/a runs/b --label "dmd2, lr 1e-5" --label "dmd2, lr 2e-5" --out lr.png

A run is its output folder or its metrics.jsonl. Needs matplotlib (``pip install matplotlib``); TensorBoard
(``train.report_to``) shows the same scalars live.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from fastdiff.errors import FastdiffError, script_main


def read_metrics(run: str | Path) -> list[dict]:
    """The rows of a run's metrics.jsonl (a half-written last line, as a killed run leaves, is skipped)."""
    path = Path(run)
    path = path / "metrics.jsonl" if path.is_dir() else path
    if not path.is_file():
        raise FastdiffError(f"{run}: no metrics.jsonl there (a run's output_dir, or its metrics.jsonl)")
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    if not rows:
        raise FastdiffError(f"{path}: no logged steps yet")
    return rows


def panels(runs: dict[str, list[dict]]) -> list[tuple[str, list[str]]]:
    """(title, keys) per panel: one per loss, the gradient norms together, the FIDs measured while training."""
    keys = sorted({k for rows in runs.values() for r in rows for k in r if isinstance(r[k], (int, float))})
    out = [(k, [k]) for k in keys if k.startswith("loss")]
    norms = [k for k in keys if k.startswith("grad_norm")]
    if norms:
        out.append(("gradient norms (before clipping)", norms))
    if "fid" in keys:
        out.append(("FID while training", ["fid"]))
    return out


def plot(runs: dict[str, list[dict]], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = panels(runs)
    if not chosen:
        raise FastdiffError("the runs logged no loss, gradient norm or FID to plot")
    columns = min(3, len(chosen))
    rows_n = -(-len(chosen) // columns)
    fig, axes = plt.subplots(rows_n, columns, figsize=(5 * columns, 3.4 * rows_n), squeeze=False)
    for ax, (title, keys) in zip(axes.flat, chosen):
        for label, rows in runs.items():
            for key in keys:
                points = [(r["step"], r[key]) for r in rows if key in r and "step" in r]
                if points:
                    name = label if len(keys) == 1 else f"{label}: {key.removeprefix('grad_norm_')}"
                    ax.plot(*zip(*points), "o-" if key == "fid" else "-", label=name, markersize=3)
        positive = all(r.get(k, 1) > 0 for rs in runs.values() for r in rs for k in keys)
        if positive and not title.startswith("FID"):  # losses and norms span decades; a FID curve rarely does
            ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("generator update")
        if len(runs) > 1 or len(keys) > 1:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(chosen):]:
        ax.axis("off")
    save_figure(fig, out, dpi=100)


def save_figure(fig, path: Path, dpi: int) -> None:
    """``fig`` laid out and written to ``path`` through a temporary file (never a half-written picture), closed."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    try:
        fig.savefig(tmp, dpi=dpi)
        tmp.replace(path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)


@script_main
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="run folders or metrics.jsonl files")
    p.add_argument("--out", required=True, help="the PNG to write")
    names = p.add_mutually_exclusive_group()
    names.add_argument("--labels", help="comma-separated, one per run (default: the folders' names)")
    names.add_argument("--label", action="append", help="one run's label, in the runs' order (repeat it; a label "
                       "may hold commas)")
    args = p.parse_args(argv)
    out = Path(args.out)
    if out.suffix.lower() != ".png" or not out.parent.is_dir():
        raise FastdiffError(f"--out {out}: give a .png file name in an existing folder")
    labels = args.label or (args.labels.split(",") if args.labels else
                            [Path(r).name if Path(r).is_dir() else Path(r).parent.name for r in args.runs])
    if len(labels) != len(args.runs) or len(set(labels)) != len(labels):
        flag = "--label" if args.label else "--labels"
        raise FastdiffError(f"{flag}: {len(args.runs)} distinct labels needed, one per run; got {labels}")
    runs = dict(zip(labels, (read_metrics(r) for r in args.runs)))  # every input checked first
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise FastdiffError("plotting needs matplotlib: pip install matplotlib (or fastdiff[eval])") from None
    plot(runs, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
