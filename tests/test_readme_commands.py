"""The README's commands, keys and imports are the ones fastdiff takes, so a user who copies them gets a run, not a
usage error. Checked without running anything heavy:

- every ``fastdiff ...`` invocation of its shell blocks (also under ``accelerate launch`` / ``torchrun -m fastdiff``)
  parses with the CLI's own parser;
- those of ``distill`` / ``msd`` resolve their ``--config`` and ``--set`` through ``load_config``, whose validation
  refuses unknown keys, wrong types and keys another objective takes; ``tune`` / ``upscale`` settings go through
  their own configs (a ``distill ...`` line continues the ``distill`` command above it);
- every ``section.key`` it names in backticks is a config key;
- its Python blocks compile, and their imports import;
- the ``eval/`` scripts it runs exist and take the flags it passes.
Placeholders (``SD_FOLDER``, ``./sd15``, ``my-sdxl.yaml``) are fine: nothing here opens a teacher or a data set.
"""
from __future__ import annotations

import ast
import dataclasses
import re
import shlex
from pathlib import Path

import pytest

from fastdiff.cli import build_parser
from fastdiff.config import Config, load_config, named_configs
from fastdiff.training.tune import tune_config
from fastdiff.training.upscale import upscale_config

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(language: str) -> list[str]:
    """The fenced blocks of one language, indented ones (inside list items) included, dedented."""
    blocks = []
    for m in re.finditer(rf"^( *)```{language}\n(.*?)^ *```", README, re.M | re.S):
        indent = len(m.group(1))
        blocks.append("\n".join(line[indent:] for line in m.group(2).splitlines()))
    return blocks


def _shell_commands() -> list[list[str]]:
    """Each command line of the shell blocks as words: continuations joined, comments dropped."""
    commands = []
    for block in _blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                commands.append(words)
    return commands


def _fastdiff_args(words: list[str]) -> list[str] | None:
    """The arguments after ``fastdiff`` (or ``-m fastdiff``), else None."""
    if words[0] == "fastdiff":
        return words[1:]
    for i in range(len(words) - 1):
        if words[i:i + 2] == ["-m", "fastdiff"]:
            return words[i + 2:]
    return None


def _invocations() -> list[list[str]]:
    found = [args for args in map(_fastdiff_args, _shell_commands()) if args is not None]
    assert len(found) >= 40, f"only {len(found)} fastdiff commands found in README.md: the block parser broke"
    return found


def _sets(args: list[str]) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--set"]


def _config_of(args: list[str]) -> str | None:
    """--config's value when it is a named config or a file here; a user's own file (my-sdxl.yaml) is a placeholder."""
    if "--config" not in args:
        return None
    name = args[args.index("--config") + 1]
    return name if name in named_configs() or (ROOT / name).is_file() else None


def test_every_fastdiff_command_parses_and_its_settings_validate(monkeypatch):
    monkeypatch.chdir(ROOT)  # the presets' relative teacher paths are read from the repository root, as README runs
    parser = build_parser()
    previous_distill: list[str] = []
    failures = []
    for args in _invocations():
        line = "fastdiff " + " ".join(args)
        continued = "..." in args  # `fastdiff distill ... --set X`: the distill command above, plus X
        if continued:
            args = [a for a in args if a != "..."]
        try:
            parsed = parser.parse_args(args)
        except SystemExit:
            failures.append(f"{line}: the CLI's parser refuses it")
            continue
        try:
            if parsed.command in ("distill", "msd"):
                sets = _sets(args)
                if parsed.command == "distill":
                    sets = (previous_distill if continued else []) + sets
                    if not continued:
                        previous_distill = sets
                load_config(_config_of(args), sets)
            elif parsed.command == "tune":
                tune_config(parsed.set or [])
            elif parsed.command == "upscale":
                upscale_config(parsed.set or [])
        except Exception as e:  # noqa: BLE001 - each line's reason is reported together with the others
            failures.append(f"{line}: {type(e).__name__}: {e}")
    assert not failures, "\n".join(failures)


def _config_keys() -> set[str]:
    cfg = Config()
    return {f"{section.name}.{f.name}" for section in dataclasses.fields(cfg)
            if dataclasses.is_dataclass(getattr(cfg, section.name))
            for f in dataclasses.fields(getattr(cfg, section.name))}


def test_every_config_key_the_readme_names_exists():
    keys = _config_keys()
    sections = {k.split(".")[0] for k in keys}
    named = {k for k in re.findall(rf"`((?:{'|'.join(sections)})\.[a-z_0-9]+)", README)
             if not k.endswith(".py")}  # `teacher.py` is a file
    assert len(named) >= 100, f"only {len(named)} keys found: the pattern broke"
    assert not sorted(named - keys), f"README names keys fastdiff does not have: {sorted(named - keys)}"


def test_readme_python_blocks_compile_and_their_imports_import():
    blocks = _blocks("python")
    # python -c "..." one-liners of the shell blocks too
    blocks += [w[w.index("-c") + 1] for w in _shell_commands() if w[0] == "python" and "-c" in w]
    assert len(blocks) >= 10
    for block in blocks:
        tree = ast.parse(block)  # a SyntaxError names the block's line
        imports = [node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))]
        exec(compile(ast.Module(body=imports, type_ignores=[]), "<README>", "exec"), {})


@pytest.mark.parametrize("words", [w for w in _shell_commands() if w[0] == "python" and w[1].startswith("eval/")],
                         ids=lambda w: w[1])
def test_eval_scripts_the_readme_runs_exist_and_take_its_flags(words):
    script = ROOT / words[1]
    assert script.is_file(), f"README runs {words[1]}, which does not exist"
    source = script.read_text()
    flags = [w.split("=")[0] for w in words[2:] if w.startswith("--")]
    assert not [f for f in flags if f'"{f}"' not in source], f"{words[1]} has no such flags"
