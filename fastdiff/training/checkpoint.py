"""Checkpoints: safetensors for weights, ``weights_only`` torch files for optimizer and RNG state.

A checkpoint is written to a hidden temporary folder and renamed into place, so a folder named
``step-XXXXXXXX`` is always complete; resume takes the newest one that loads.
"""
from __future__ import annotations

import json
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..errors import FastdiffError
from .sharding import is_sharded, load_full_state_dict

PREFIX = "step-"


def atomic_write_text(path: Path, text: str) -> None:
    """Write through a temporary file and rename: a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def save_weights(module: torch.nn.Module | dict, path: Path) -> None:
    """A module's weights, or a state dict already gathered from a sharded module (train.sharding fsdp)."""
    state = module if isinstance(module, dict) else module.state_dict()
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(path))


def load_weights(module: torch.nn.Module, path: Path) -> None:
    state = load_file(str(path))
    if is_sharded(module):  # full tensors, whatever process count wrote them: each process keeps its shard
        load_full_state_dict(module, state)
    else:
        module.load_state_dict(state)


def rng_state(extra_generators: dict[str, torch.Generator]) -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": random.getstate(),
        "generators": {k: g.get_state() for k, g in extra_generators.items()},
    }


def set_rng_state(state: dict, extra_generators: dict[str, torch.Generator]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    random.setstate(state["python"])
    for k, g in extra_generators.items():
        g.set_state(state["generators"][k])


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=step_of)


def write_checkpoint(run_dir: Path, step: int, modules: dict[str, torch.nn.Module | dict], state: dict,
                     limit: int) -> Path:
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for name, module in modules.items():
        save_weights(module, tmp / f"{name}.safetensors")
    torch.save(state, tmp / "state.pt")
    (tmp / "meta.json").write_text(json.dumps({"step": step, "modules": sorted(modules)}))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    prune(run_dir, step, limit)
    return final


def step_of(path: Path) -> int:
    return int(path.name[len(PREFIX):])


def prune(run_dir: Path, step: int, limit: int) -> None:
    """Keep the ``limit`` newest checkpoints up to ``step`` (the one just written is always among them).
    Checkpoints past ``step`` belong to a run that crashed after them and was resumed from an earlier one
    (they may be the corrupt ones); they are not counted, and the resumed run overwrites them as it gets there."""
    upto = [p for p in checkpoint_dirs(run_dir) if step_of(p) <= step]
    for old in upto[:-max(limit, 1)]:
        shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(run_dir: Path, which: str = "latest") -> Path:
    """``latest`` or a step number -> checkpoint folder."""
    dirs = checkpoint_dirs(run_dir)
    if not dirs:
        raise FastdiffError(f"{run_dir}: no checkpoints to resume or export from")
    if which == "latest":
        return dirs[-1]
    if not str(which).isdigit():
        raise FastdiffError(f"checkpoint must be 'latest' or a step number, got {which!r}")
    wanted = [d for d in dirs if step_of(d) == int(which)]
    if not wanted:
        raise FastdiffError(f"{run_dir}: no checkpoint for step {which}; have {', '.join(d.name for d in dirs)}")
    return wanted[0]


def read_checkpoint(ckpt: Path, modules: dict[str, torch.nn.Module]) -> dict:
    """Load weights into modules and return the training state (optimizers, RNG, step); raises what the readers
    raise on a damaged or incomplete checkpoint (``load_latest_valid`` skips those)."""
    for name, module in modules.items():
        load_weights(module, ckpt / f"{name}.safetensors")
    return torch.load(ckpt / "state.pt", weights_only=True, map_location="cpu")


def load_checkpoint(ckpt: Path, modules: dict[str, torch.nn.Module]) -> dict:
    """``read_checkpoint`` of the checkpoint a user named (a step number): a damaged one is a one-line error."""
    try:
        return read_checkpoint(ckpt, modules)
    except Exception as exc:  # noqa: BLE001 - truncated safetensors, a missing file, a corrupt state.pt
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FastdiffError(f"checkpoint {ckpt} cannot be read ({type(exc).__name__}: {first}); name another step, "
                            "or 'latest' to take the newest readable one") from exc


def load_latest_valid(run_dir: Path, modules: dict[str, torch.nn.Module]) -> tuple[Path, dict]:
    """Newest checkpoint that loads; corrupt ones are skipped with a warning."""
    for ckpt in reversed(checkpoint_dirs(run_dir)):
        try:
            return ckpt, read_checkpoint(ckpt, modules)
        except Exception as exc:  # noqa: BLE001 - a damaged checkpoint must not stop resume
            warnings.warn(f"skipping unreadable checkpoint {ckpt.name}: {exc}")
    raise FastdiffError(f"{run_dir}: no readable checkpoint to resume from")
