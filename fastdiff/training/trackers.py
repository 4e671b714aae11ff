"""Experiment trackers (``train.report_to``): TensorBoard and Weights & Biases through accelerate.

Each tracker gets the run's resolved config (flattened: ``train.max_steps`` ...), the scalars of every log step and
the sample grids as images. Resuming keeps one history per run:

- TensorBoard: the writer opens with ``purge_step = S + 1`` after a resume from step S, so the steps a crashed run
  logged past its last checkpoint are dropped by TensorBoard's readers and logged again.
- W&B: the run id is kept in ``output_dir/wandb_run_id`` and the resumed process continues that run
  (``resume="allow"``). W&B only accepts increasing ``step`` values, so a resumed run that logged ``step=S+1`` after
  a crash at S+k would have its first k steps dropped; fastdiff therefore lets W&B count its own steps and logs the
  training step as the metric ``train_step``, the x axis of every chart (``define_metric``). Steps a crashed run logged
  past its last checkpoint then show twice on that axis; nothing is dropped. (Offline runs, WANDB_MODE=offline,
  cannot look up the run they resume: W&B writes each process as its own offline run with the same id.)
"""
from __future__ import annotations

import importlib.util
import os
import secrets
import string
from pathlib import Path

import numpy as np

from ..config import to_dict
from ..errors import FastdiffError

PROJECT = "fastdiff"
RUN_ID_FILE = "wandb_run_id"
STEP_METRIC = "train_step"


def wandb_installed() -> bool:
    return importlib.util.find_spec("wandb") is not None


def trackers_for(report_to: str) -> list[str]:
    """accelerate's ``log_with`` for a ``train.report_to`` value; asking for wandb without it is one line."""
    if report_to == "none":
        return []
    if report_to == "all":  # as accelerate's "all": every tracker installed here
        return ["tensorboard"] + (["wandb"] if wandb_installed() else [])
    if report_to == "wandb" and not wandb_installed():
        raise FastdiffError("train.report_to wandb: wandb is not installed; pip install wandb "
                            "(or pip install 'fastdiff[wandb]'), or set train.report_to=tensorboard")
    return [report_to]


def flat_config(values: dict, prefix: str = "") -> dict:
    """{"train": {"max_steps": 10}} -> {"train.max_steps": 10}. TensorBoard's hparams take numbers, strings and
    booleans only, so null and lists are written as text."""
    flat = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flat_config(value, f"{name}."))
        elif value is None or isinstance(value, (list, tuple)):
            flat[name] = str(value)
        else:
            flat[name] = value
    return flat


def wandb_run_id(out: Path) -> str:
    """The run's W&B id: the one kept in output_dir, else a new one written there."""
    path = out / RUN_ID_FILE
    if path.is_file() and path.read_text().strip():
        return path.read_text().strip()
    alphabet = string.ascii_lowercase + string.digits  # W&B's own ids: 8 of these
    run_id = "".join(secrets.choice(alphabet) for _ in range(8))
    path.write_text(run_id + "\n")
    return run_id


def start(run) -> None:
    """``accelerator.init_trackers`` with the run's config; a resumed run continues its histories (module doc)."""
    acc = run.accelerator
    kwargs = {}
    names = {str(t) for t in acc.log_with}
    if "tensorboard" in names and run.step > 0:
        kwargs["tensorboard"] = {"purge_step": run.step + 1}
    if "wandb" in names and acc.is_main_process:
        wandb_kwargs = {"id": wandb_run_id(run.out), "resume": "allow", "name": run.out.name}
        if not os.environ.get("WANDB_DIR"):  # W&B's files next to the run's, unless the user chose a place
            wandb_kwargs["dir"] = str(run.out)
        kwargs["wandb"] = wandb_kwargs
    acc.init_trackers(PROJECT, config=flat_config(to_dict(run.cfg)), init_kwargs=kwargs)
    if "wandb" in names and acc.is_main_process:
        wandb_run = acc.get_tracker("wandb", unwrap=True)
        wandb_run.define_metric(STEP_METRIC)
        wandb_run.define_metric("*", step_metric=STEP_METRIC)


def log_scalars(accelerator, values: dict, step: int) -> None:
    if not accelerator.is_main_process:
        return
    for tracker in accelerator.trackers:
        if tracker.name == "wandb":
            tracker.log({**values, STEP_METRIC: step})
        else:
            tracker.log(values, step=step)


def log_image(accelerator, name: str, image: np.ndarray, step: int) -> None:
    """One uint8 (H, W, C) image (a sample grid) to every tracker."""
    if not accelerator.is_main_process:
        return
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({name: image[None]}, step=step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({name: wandb.Image(image[..., 0] if image.shape[-1] == 1 else image), STEP_METRIC: step})
