"""How long a config error takes to answer: `fastdiff distill` as shipped against the same call with the Trainer's
imports (diffusers, transformers, peft) loaded first, as the CLI did before it checked the config first.

Each call is a fresh interpreter (what a user pays): ``python -m fastdiff distill --config BAD`` with an unknown
objective, the fastest of ``--repeats``; the baseline imports ``fastdiff.training.loop`` before the same ``main``
call. Both must answer with exit status 2 and the same one-line error. Prints a table with the machine, the versions
and the ratio.

    taskset -c 1 python eval/cli_errors.py --out eval/results/cli-errors-cpu
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fastdiff.errors import FastdiffError, require_folder_path, script_main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CALLS = {"as shipped": "from fastdiff.cli import main; sys.exit(main(sys.argv[1:]))",
         "Trainer imported first (baseline)": "import fastdiff.training.loop; from fastdiff.cli import main; "
                                              "sys.exit(main(sys.argv[1:]))"}


def timed_call(code: str, config: Path, repeats: int) -> tuple[float, str]:
    """(the fastest wall time of ``repeats`` fresh interpreters, their error line); status 2 is required."""
    best, line = float("inf"), ""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])}
    for _ in range(repeats):
        t0 = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", "import sys; " + code, "distill", "--config", str(config)],
                              capture_output=True, text=True, env=env)
        best = min(best, time.perf_counter() - t0)
        line = done.stderr.strip()
        if done.returncode != 2 or len(line.splitlines()) != 1:
            raise FastdiffError(f"expected one error line and exit status 2, got {done.returncode}: {line[-300:]}")
    return best, line


def table(result: dict) -> str:
    lines = [f"# A config error's answer time ({result['machine']}, {result['date']})", "",
             f"{', '.join(f'{k} {v}' for k, v in result['versions'].items())}; fastest of {result['repeats']} fresh "
             "interpreters each.", "", f"Error: `{result['error']}`", "", "| call | seconds | speed-up (baseline seconds / seconds) |",
             "|---|---|---|"]
    base = result["rows"][-1]["seconds"]
    lines += [f"| {r['call']} | {r['seconds']:.2f} | {base / r['seconds']:.1f}x |" for r in result["rows"]]
    return "\n".join(lines) + "\n"


@script_main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None, help="folder for result.json and README.md (default: print only)")
    args = p.parse_args()
    if args.repeats < 1:
        raise FastdiffError(f"--repeats must be >= 1, got {args.repeats}")
    out = Path(args.out) if args.out else None
    if out is not None:
        require_folder_path(out, "--out")
    from fastdiff.machine import describe, today, versions

    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "bad.yaml"
        config.write_text("objective:\n  name: nope\n")
        rows, errors = [], set()
        for name, code in CALLS.items():
            seconds, error = timed_call(code, config, args.repeats)
            rows.append({"call": name, "seconds": seconds})
            errors.add(error)
    if len(errors) != 1:
        raise FastdiffError(f"the two calls answered differently: {sorted(errors)}")
    result = {"machine": describe(), "date": today(), "versions": versions(), "repeats": args.repeats,
              "error": errors.pop(), "rows": rows}
    text = table(result)
    print(text, end="")
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "result.json").write_text(json.dumps(result, indent=1) + "\n")
        (out / "README.md").write_text(text + f"\nMade by `taskset -c 1 python eval/cli_errors.py --out {out}`.\n")


if __name__ == "__main__":
    main()
