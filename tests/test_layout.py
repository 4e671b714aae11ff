"""The package's layers: imports only go down (cli -> bench -> evaluation -> training -> config -> objectives /
inference -> models -> errors, machine, pipelines), and README's package map names every subpackage and top-level
module there is."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import fastdiff

PACKAGE = Path(fastdiff.__file__).parent
README = PACKAGE.parent / "README.md"

# Higher numbers may import lower ones and their own layer; never the other way.
LAYERS = {"errors": 0, "machine": 0, "pipelines": 0, "configs": 0, "cudart": 0, "lazy": 0,
          "models": 1,
          "objectives": 2, "inference": 2,
          "config": 3,
          "training": 4,
          "evaluation": 5,
          "bench": 6,
          "cli": 7, "__main__": 7}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, here: str | None = None) -> set[str]:
    """Every fastdiff module the file at ``path`` (the module ``here``) imports, relative imports resolved,
    function-level imports included."""
    here = here or module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found |= {f"{target}.{a.name}" for a in node.names}  # ``from . import checkpoint``
    return {m for m in found if m.split(".")[0] == "fastdiff"}


def layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 else None  # None: the package root (public names, __version__)


def test_every_module_has_a_layer():
    unplaced = sorted({module_name(p) for p in PACKAGE.rglob("*.py")
                       if module_name(p) != "fastdiff" and layer(module_name(p)) is None})
    assert not unplaced, f"modules outside the layer map (add them to LAYERS and README's package map): {unplaced}"


def test_imports_only_go_down():
    upward = []
    for path in PACKAGE.rglob("*.py"):
        here = module_name(path)
        if here == "fastdiff":  # the root re-exports public names from below
            continue
        upward += upward_imports(path, here)
    assert not upward, "\n".join(sorted(upward))


def upward_imports(path: Path, here: str) -> list[str]:
    return [f"{here} (layer {layer(here)}) imports {target} (layer {layer(target)})"
            for target in imported_modules(path, here) if layer(target) is not None and layer(target) > layer(here)]


def test_the_layer_check_sees_an_upward_import(tmp_path):
    """The walker resolves relative and function-level imports: a models module reaching up is caught."""
    module = tmp_path / "offender.py"
    module.write_text("from .denoiser import Denoiser\n\n\ndef f():\n    from ..training import Trainer\n"
                      "    from .. import cli\n")
    found = upward_imports(module, "fastdiff.models.offender")
    assert [line.split(" imports ")[1].split()[0] for line in found] == ["fastdiff.cli", "fastdiff.training",
                                                                         "fastdiff.training.Trainer"] or \
        sorted(line.split(" imports ")[1].split()[0] for line in found) == ["fastdiff.cli", "fastdiff.training",
                                                                           "fastdiff.training.Trainer"]


def test_help_and_version_import_neither_torch_nor_diffusers(tmp_path):
    """`fastdiff --help`, a command's --help and --version answer without the heavy libraries (7.6 s before on a
    2-core CPU, 0.06 s now): the package's public names, the config types and the commands import them on use. With
    xformers installed (a stand-in here) the runtime hook is in place and imports nothing either."""
    import os
    import subprocess
    import sys

    (tmp_path / "xformers").mkdir()
    (tmp_path / "xformers" / "__init__.py").write_text("")

    probe = ("import sys\nfrom fastdiff.cli import main\nfor argv in (['--help'], ['distill', '--help'], "
             "['--version']):\n    try:\n        main(argv)\n    except SystemExit as exc:\n        assert exc.code == 0\n"
             "print('HOOK', any(type(f).__name__ == '_BeforeXformers' for f in sys.meta_path))\n"
             "print('HEAVY', sorted(m for m in ('torch', 'diffusers', 'transformers', 'numpy') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])})
    assert done.returncode == 0, done.stderr
    # the help did list the named configs, and the version was printed
    assert "quickstart" in done.stdout and f"fastdiff {fastdiff.__version__}" in done.stdout
    assert done.stdout.strip().splitlines()[-2:] == ["HOOK True", "HEAVY []"], done.stdout[-300:]


def test_bad_config_is_answered_without_diffusers(tmp_path):
    """A config or argument error of distill, msd, export and tune (a missing teacher folder too) is found before
    diffusers and transformers are imported (3.5x sooner than with the Trainer's imports first:
    eval/results/cli-errors-cpu): checking a config imports every objective, so the objectives reach diffusers only
    on use, and the CLI builds the Trainer (diffusers) after the config and the teacher's path have been checked."""
    import os
    import subprocess
    import sys

    bad = tmp_path / "bad.yaml"
    bad.write_text("objective:\n  name: nope\n")
    calls = [["distill", "--config", str(bad)], ["distill", "--set", "train.lr_schedule=cos"],
             ["distill", "--set", "teacher.path=/nope", "--set", f"output_dir={tmp_path / 'run'}"],
             ["msd", "--config", str(bad), "--partitions", "2"], ["export", str(tmp_path), "--out", str(tmp_path / "o")],
             ["tune", str(tmp_path), "--targets", str(tmp_path), "--set", "lr=-1"]]
    probe = (f"import sys\nfrom fastdiff.cli import main\nfor argv in {calls!r}:\n    print('RC', main(argv))\n"
             "print('HEAVY', sorted(m for m in ('diffusers', 'transformers', 'peft') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["RC", "2"] * len(calls) + ["HEAVY", "[]"], done.stdout
    errors = done.stderr.splitlines()  # one line each, the reason named
    assert len(errors) == len(calls), errors
    for line, reason in zip(errors, ["unknown objective 'nope'", "train.lr_schedule must be constant or cosine",
                                     "teacher path '/nope' does not exist", "unknown objective 'nope'", "is not a fastdiff run folder",
                                     "lr and beta must be positive"]):
        assert reason in line, errors


def test_moved_names_resolve_where_they_were():
    """Names moved into modules of their own (so that importing the objectives does not load diffusers) still resolve
    from where outside code imported them, as the same objects; a name that never existed is still an AttributeError;
    dir() lists the lazy names."""
    import importlib

    import fastdiff
    from fastdiff.pipelines import pipeline_fastdiff_class_conditional, pipeline_fastdiff_flow_map

    moved = {("fastdiff.models.flow_map", "FlowMapModel"): fastdiff.FlowMapModel,
             ("fastdiff.models.guidance", "GuidanceEmbeddedUNet"): fastdiff.GuidanceEmbeddedUNet,
             ("fastdiff.models.guidance", "guidance_embedding"): pipeline_fastdiff_class_conditional.guidance_embedding,
             ("fastdiff.models.generator", "step_timesteps"): pipeline_fastdiff_flow_map.step_timesteps,
             ("fastdiff.training", "Trainer"): importlib.import_module("fastdiff.training.loop").Trainer}
    for (module_name, name), obj in moved.items():
        module = importlib.import_module(module_name)
        assert getattr(module, name) is obj and name in dir(module), (module_name, name)
        with pytest.raises(AttributeError, match=f"module '{module_name}' has no attribute 'nope'"):
            getattr(module, "nope")


def test_cli_errors_bench_refuses_what_it_cannot_compare(tmp_path, monkeypatch, capsys):
    """eval/cli_errors.py (the timing behind README's config-error figure): its table states the speed-up over the
    baseline; two calls that answer differently, and --repeats 0, are refused in one line (the real timing spawns
    two interpreters per repeat: test_cli_errors_bench_times_both_calls, slow)."""
    import sys

    from conftest import eval_script

    bench = eval_script("cli_errors")
    answers = iter([(2.0, "fastdiff: error: one"), (8.0, "fastdiff: error: two")])
    monkeypatch.setattr(bench, "timed_call", lambda code, config, repeats: next(answers))
    for argv, message in [(["cli_errors.py"], "the two calls answered differently"),
                          (["cli_errors.py", "--repeats", "0"], "--repeats must be >= 1")]:
        monkeypatch.setattr(sys, "argv", argv)
        with pytest.raises(SystemExit) as exit_:
            bench.main()
        assert exit_.value.code == 2 and message in capsys.readouterr().err
    rows = [{"call": "as shipped", "seconds": 2.0}, {"call": "baseline", "seconds": 8.0}]
    text = bench.table({"machine": "m", "date": "d", "versions": {"torch": "x"}, "repeats": 1, "error": "e",
                        "rows": rows})
    assert "| as shipped | 2.00 | 4.0x |" in text and "| baseline | 8.00 | 1.0x |" in text


@pytest.mark.slow
def test_cli_errors_bench_times_both_calls(tmp_path, monkeypatch):
    """The real timing, one fresh interpreter per call: both answer the unknown objective with exit status 2."""
    import json
    import sys

    from conftest import eval_script

    bench = eval_script("cli_errors")
    monkeypatch.setattr(sys, "argv", ["cli_errors.py", "--repeats", "1", "--out", str(tmp_path / "r")])
    bench.main()
    result = json.loads((tmp_path / "r" / "result.json").read_text())
    assert [r["call"] for r in result["rows"]] == list(bench.CALLS) and "unknown objective 'nope'" in result["error"]


def test_the_lazy_public_names_are_listed_and_resolve():
    """dir(fastdiff) lists the names the package imports on first use, and each resolves to its class."""
    names = {"Denoiser", "Generator", "FlowSchedule", "VPSchedule", "Teacher", "load_teacher", "GuidanceEmbeddedUNet",
             "MLPDenoiser", "GaussianMixtureModel", "FlowMapModel", "FastdiffError"}
    assert names <= set(dir(fastdiff)) and set(fastdiff.__all__) <= names
    assert all(getattr(fastdiff, n).__name__ == n for n in names)


def test_readme_package_map_matches_the_tree():
    text = README.read_text()
    section = text[text.index("### Package map"):]
    section = section[:section.index("\n#", 1)]
    named = set(re.findall(r"`fastdiff/([\w.]+?)/?`", section))
    # not the fastdiff/pipelines -> ../pipelines link eval/gpu_round.sh makes (pyproject installs pipelines/ there)
    subpackages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file() and not p.is_symlink()}
    top_modules = {p.name for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", "__main__")}
    assert subpackages | top_modules == named, (f"README's package map names {sorted(named)}; "
                                                f"the tree has {sorted(subpackages | top_modules)}")


def test_readme_package_map_names_every_objective_file():
    row = next(line for line in README.read_text().splitlines() if line.startswith("| 2 | `fastdiff/objectives/`"))
    files = {p.name for p in (PACKAGE / "objectives").glob("*.py") if p.name != "__init__.py"}
    missing = sorted(f for f in files if f"`{f}`" not in row)
    assert not missing, f"README's package map row for fastdiff/objectives/ does not name {missing}"


def table_cell_counts(text: str) -> list[tuple[int, int, int]]:
    """(line, separators, header's separators) of every Markdown table row whose count of unescaped ``|`` differs
    from its header's: a ``|`` inside a code span still splits a GitHub table cell unless written ``\\|``."""
    lines, bad, i = text.split("\n"), [], 0
    count = lambda line: len(re.findall(r"(?<!\\)\|", line))  # noqa: E731
    while i < len(lines):
        if lines[i].startswith("|") and i + 1 < len(lines) and re.fullmatch(r"\|[-| :]+\|", lines[i + 1]):
            n, i = count(lines[i]), i + 2
            while i < len(lines) and lines[i].startswith("|"):
                if count(lines[i]) != n:
                    bad.append((i + 1, count(lines[i]), n))
                i += 1
        else:
            i += 1
    return bad


def test_markdown_tables_keep_their_columns():
    docs = [README, *sorted((PACKAGE.parent / "eval").rglob("README.md"))]
    bad = {str(p.relative_to(PACKAGE.parent)): table_cell_counts(p.read_text()) for p in docs if p.is_file()}
    assert not {k: v for k, v in bad.items() if v}, bad
    assert table_cell_counts("| a | b |\n|---|---|\n| `x || y` | z |") == [(3, 5, 3)]  # the check sees one
