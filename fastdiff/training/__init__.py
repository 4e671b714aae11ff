"""Training: a run built from its config (run.py, setup.py), its loop (loop.py), checkpoints (state.py,
checkpoint.py), optimizers (optim.py), networks (networks.py), data (data.py) and outputs (outputs.py)."""

__all__ = ["Trainer"]


def __getattr__(name):
    # the Trainer (and with it diffusers) on first use: the CLI reads a checkpoint's config or a partition through
    # this package's light modules and answers bad input in ~2 s (eval/results/cli-errors-cpu)
    if name == "Trainer":
        from .loop import Trainer

        return Trainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
