"""Training: a run built from its config (run.py, setup.py), its loop (loop.py), checkpoints (state.py,
checkpoint.py), optimizers (optim.py), networks (networks.py), data (data.py) and outputs (outputs.py)."""

from ..lazy import lazy_names

__all__ = ["Trainer"]

# the Trainer (and with it diffusers) on first use: the CLI reads a checkpoint's config or a partition through this
# package's light modules and answers bad input in seconds (eval/results/cli-errors-cpu)
__getattr__, __dir__ = lazy_names(__name__, __package__, {"Trainer": ".loop"}, globals())
