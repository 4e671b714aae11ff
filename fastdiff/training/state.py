"""A run's checkpoints: what they hold, writing them, resuming from them (refusing a checkpoint that another
config's networks wrote), and the metrics log trimmed back to the step resumed."""
from __future__ import annotations

import json
from pathlib import Path

import yaml

from . import checkpoint as ckpt
from ..config import to_dict
from ..errors import FastdiffError
from .networks import checkpoint_view
from .sharding import full_state_dict


# Settings that decide which networks a run has and what their weights mean.
RESUME_KEYS = ("teacher.path", "student.model", "student.num_steps", "student.lora_rank", "student.lora_alpha",
               "objective.name", "objective.gan", "objective.gan_readout", "objective.fake_lora_rank",
               "objective.guidance_range", "objective.timestep_scaling", "train.ema_decay",
               "objective.adaptive_weighting",  # scm: whether checkpoints hold the logvar head
               "objective.backtrack", "objective.degradation_steps",  # DisBack: the recorded path and its stage 1
               "train.ema_halflife_kimg", "train.ema_rampup", "train.ema_sigma_rel",
               # what the student means: its first noise level and its multi-step sampler
               "student.sigma_init", "student.sampler",
               # the distribution it is trained towards (for cd, the scale distilled in); fastdiff.json records one
               "teacher.guidance_scale", "objective.fake_guidance", "objective.fake_train_guidance")
# Allowed to change on resume, with a logged line: SiD's alpha weights the two terms of the generator gradient,
# whose fixed point (fake score = teacher score) does not depend on it, so the checkpoint's networks keep their meaning;
# train.max_steps extends (or ends early) a run: a cosine learning rate is a function of the step and the new
# max_steps, so a finished cosine run (rate 0) restarts warm (max_steps 2 -> 4: factor 0.5 at update 3).
LOGGED_RESUME_KEYS = ("objective.alpha", "train.max_steps")


def changed_keys(saved: dict, now: dict, keys):
    """(key, before, after) for each dotted ``section.name`` key whose value differs between two config dicts."""
    for key in keys:
        section, name = key.split(".")
        before, after = saved.get(section, {}).get(name), now[section][name]
        if before != after:
            yield key, before, after


def checkpoint_modules(run) -> dict:
    modules = {"generator": checkpoint_view(run.generator.denoiser.model), **run.objective.state_modules()}
    if run.objective.fake is not None:
        modules["fake"] = checkpoint_view(run.objective.fake.model)
    if run.ema is not None:
        modules["ema"] = checkpoint_view(run.ema, [e for e, _ in run._ema_pairs])  # what it averages
    if run.objective.gan_head is not None:
        modules["gan_head"] = run.objective.gan_head
    return modules


def save_checkpoint(run) -> None:
    """Written by the main process. Sharded runs (train.sharding fsdp) first gather full tensors there, which every
    process takes part in; the checkpoint then holds what an unsharded run writes, for any process count."""
    main, sharded = run.accelerator.is_main_process, getattr(run, "shards", None) is not None
    if not main and not sharded:
        return
    modules = checkpoint_modules(run)
    if sharded:
        modules = {name: full_state_dict(module) for name, module in modules.items()}
    opt_g, opt_c = run.opt_g.state_dict(main), run.opt_c.state_dict(main) if run.opt_c else None
    if not main:
        return
    state = {"step": run.step, "skipped": {k: int(v) for k, v in run.skipped.items()}, "opt_g": opt_g,
             "opt_c": opt_c, "rng": ckpt.rng_state(run._generators()), "best_fid": run.best_fid}
    path = ckpt.write_checkpoint(run.out, run.step, modules, state, run.cfg.train.checkpoint_limit)
    (path / "config.yaml").write_text(yaml.safe_dump(to_dict(run.cfg), sort_keys=False))


def check_resume_config(run) -> None:
    """A checkpoint only fits the networks its own config built: refuse another teacher, objective or student."""
    saved_file = run.out / "config.yaml"
    if not saved_file.is_file():  # deleted: the newest checkpoint keeps its own copy
        saved_file = next((d / "config.yaml" for d in reversed(ckpt.checkpoint_dirs(run.out))
                           if (d / "config.yaml").is_file()), None)
        if saved_file is None:
            return
    try:
        saved = yaml.safe_load(saved_file.read_text()) or {}
    except yaml.YAMLError as exc:
        raise FastdiffError(f"{saved_file} is not valid YAML ({str(exc).splitlines()[0]}); restore the run's config "
                            "or start a new output_dir") from None
    if not isinstance(saved, dict):
        raise FastdiffError(f"{saved_file} is not a run config (a mapping of sections); restore it or start a new "
                            "output_dir")
    now = to_dict(run.cfg)
    for key, before, after in changed_keys(saved, now, RESUME_KEYS):
        raise FastdiffError(f"{run.out} was trained with {key}={before!r}, this config has {after!r}; resume "
                            f"with the run's own config ({saved_file}) or start a new output_dir")
    for key, before, after in changed_keys(saved, now, LOGGED_RESUME_KEYS):
        run.accelerator.print(f"resuming with {key}={after!r}; the run was trained with {before!r} until now")


def load_checkpoint(run, which: str) -> None:
    check_resume_config(run)
    if which == "latest":
        path, state = ckpt.load_latest_valid(run.out, checkpoint_modules(run))
    else:
        path = ckpt.find_checkpoint(run.out, which)
        state = ckpt.load_checkpoint(path, checkpoint_modules(run))
    run.opt_g.load_state_dict(state["opt_g"])
    if run.opt_c is not None:
        run.opt_c.load_state_dict(state["opt_c"])
    ckpt.set_rng_state(state["rng"], run._generators())
    run.step = state["step"]
    # the lowest FID: the checkpoint's, or student-best's own when lower (exported after the checkpoint was written)
    run.best_fid = min(float(state.get("best_fid", float("inf"))), recorded_best_fid(run.out))
    for key, value in state.get("skipped", {}).items():
        run.skipped[key].fill_(int(value))
    run.accelerator.print(f"resumed from {path}")


def recorded_best_fid(out: Path) -> float:
    """The FID written beside ``out/student-best`` (train.eval_keep_best); infinity without one."""
    try:
        return float(json.loads((out / "student-best" / "eval.json").read_text())["fid"])
    except (OSError, ValueError, KeyError, TypeError):
        return float("inf")


def keep_metrics_upto(path: Path, step: int) -> None:
    """On resume, drop the log lines a crashed run wrote after its last checkpoint (they are redone)."""
    if not path.is_file():
        return

    def logged_step(line: str) -> float:
        try:
            return json.loads(line).get("step", 0)
        except ValueError:  # half a line written when the process was killed
            return float("inf")

    lines = path.read_text().splitlines()
    kept = [line for line in lines if line.strip() and logged_step(line) <= step]
    if len(kept) != len(lines):
        ckpt.atomic_write_text(path, "".join(line + "\n" for line in kept))


