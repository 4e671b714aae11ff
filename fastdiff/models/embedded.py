"""The embedded default teacher: the fmnist-ddpm reference teacher's weights in fp16, shipped in the package,
so ``fastdiff distill`` runs on a machine that has only this repository."""
from __future__ import annotations

from importlib import resources

from ..errors import FastdiffError

PREFIX = "embedded:"


def embedded_teachers() -> list[str]:
    root = resources.files("fastdiff") / "assets"
    return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def resolve_teacher_path(path: str) -> str:
    if not path.startswith(PREFIX):
        return path
    name = path[len(PREFIX):]
    folder = resources.files("fastdiff") / "assets" / name
    if not folder.is_dir():
        raise FastdiffError(f"no embedded teacher {name!r}; available: {', '.join(embedded_teachers()) or 'none'}")
    return str(folder)
