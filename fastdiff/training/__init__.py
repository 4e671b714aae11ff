"""Training: a run built from its config (run.py, setup.py), its loop (loop.py), checkpoints (state.py,
checkpoint.py), optimizers (optim.py), networks (networks.py), data (data.py) and outputs (outputs.py)."""
from .loop import Trainer

__all__ = ["Trainer"]
