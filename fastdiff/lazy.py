"""Names a module serves on first use (PEP 562): importing the module stays light (no torch or diffusers), and names
that moved to modules of their own still resolve where outside code imported them from."""
from __future__ import annotations

import importlib


def lazy_names(module: str, package: str, names: dict[str, str], namespace: dict):
    """``(__getattr__, __dir__)`` for ``module``: each of ``names`` (name: its module, relative to ``package``) is
    imported when first asked for; ``namespace`` (the module's globals) gives the rest of ``dir()``."""
    def __getattr__(name):
        if name in names:
            return getattr(importlib.import_module(names[name], package), name)
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    def __dir__():
        return sorted({*namespace, *names})

    return __getattr__, __dir__
