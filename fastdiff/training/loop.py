"""The training loop: alternating critic / generator updates on accelerate.

Per generator update: ``objective.critic_updates_now()`` critic updates (fake score, GAN head) on fresh
generator samples, then one generator update, an EMA update, and (at their intervals) logs, a sample
grid and a checkpoint. Gradients are averaged across processes by hand (one all-reduce per
optimizer step), so the same code runs on one CPU or under ``accelerate launch`` on several GPUs, and
frozen networks can be called freely without a DDP wrapper getting in the way. With ``train.sharding: fsdp``
the large networks are FSDP2-sharded (``sharding.py``) and their gradients reduce-scattered by FSDP instead.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from ..config import to_dict
from ..errors import FastdiffError
from ..inference.export import check_exportable
from . import checkpoint as ckpt
from . import trackers
from .optim import Optimizer
from .outputs import export_run, middle_guidance, sample_grid
from .run import Run
from .setup import ema_beta
from .sharding import gathered_student
from .state import keep_metrics_upto, load_checkpoint, save_checkpoint


class Trainer(Run):
    """A built :class:`Run` and its loop. See ``fit``."""

    def save(self) -> None:
        save_checkpoint(self)

    def load(self, which: str) -> None:
        load_checkpoint(self, which)

    def sample_grid(self) -> None:
        with gathered_student(self):  # sharded: every process helps gather, the main one draws
            sample_grid(self)

    def export(self, out: Path | None = None, num_steps: int | None = None) -> Path | None:
        with gathered_student(self):
            return export_run(self, out, num_steps)

    def export_stage(self, segments: int) -> Path | None:
        """A finished stage's student (hyper-sd: Hyper-SD's per-step-count LoRAs) exported to ``stages/k{segments}/``
        for ``segments``-step sampling. The random streams are left as they were, so the run trains on unchanged."""
        with torch.random.fork_rng(devices=[self.accelerator.device] if self.accelerator.device.type == "cuda" else []):
            return self.export(self.out / "stages" / f"k{segments}", num_steps=segments)

    def evaluate(self, metrics) -> float:
        """train.eval_every: FID / KID of the student as it would be exported now (``self.evaluator``), logged to the
        trackers, ``metrics`` (the open metrics.jsonl, main process) and the console; with train.eval_keep_best a FID
        below every earlier one exports the student to ``student-best/`` too. Returns the seconds it took, which the
        loop keeps out of its time limit and images/s. The random streams are left as they were."""
        t0, acc = time.time(), self.accelerator
        devices = [acc.device] if acc.device.type == "cuda" else []
        with gathered_student(self, self.evaluator.every_process), torch.random.fork_rng(devices=devices):
            scores = self.evaluator(self) if acc.is_main_process or self.evaluator.every_process else None
            if scores is not None:
                values = {k: float(scores[k]) for k in ("fid", "kid", "kid_std") if k in scores}
                trackers.log_scalars(acc, {f"eval_{k}": v for k, v in values.items()}, self.step)
                record = {"step": self.step, "eval": scores["fid_label"], **values}
                scale = middle_guidance(self.cfg)  # an LCM-style student is scored at its range's middle
                metrics.write(json.dumps({**record, **({} if scale is None else {"guidance_scale": scale})}) + "\n")
                metrics.flush()
                best = self.cfg.train.eval_keep_best and values["fid"] < self.best_fid
                acc.print(f"step {self.step}: {scores['fid_label']} {values['fid']:.3f}"
                          + (f", KID {values['kid']:.5f}" if "kid" in values else "")
                          + (" (lowest yet: exported to student-best/)" if best else ""))
                if best:
                    self.best_fid = values["fid"]
                    best_dir = self.export(self.out / "student-best")
                    # its score beside it: a resumed run never replaces it with a worse one (state.recorded_best_fid)
                    (best_dir / "eval.json").write_text(json.dumps(record) + "\n")
        acc.wait_for_everyone()
        return time.time() - t0

    def restart_ema(self) -> None:
        """The EMA set to the student's weights (``train.ema_stage_restart``, at a progressive stage's end)."""
        with torch.no_grad():
            for e, p in self._ema_pairs:
                e.copy_(p)

    # --- one step ---------------------------------------------------------------------------------
    def _seed_micro_batch(self, phase: str, index: int) -> None:
        key = f"{self.cfg.train.seed}/{self.step}/{phase}/{index}".encode()
        seed = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1
        torch.manual_seed(seed)
        # Every stream a micro-batch draws from (real images, training prompts), each offset so no two coincide.
        for offset, gen in enumerate(self._generators().values()):
            gen.manual_seed(seed + offset)

    def _update(self, opt: Optimizer, loss_of, critic: bool, phase: str):
        """One optimizer step over ``gradient_accumulation`` micro-batches of fresh generator samples.

        Critic updates see detached samples and real images; generator updates backpropagate into the sample.
        Objectives that train on data (consistency distillation) get a batch of real images instead, and those that
        run their own student pass (``uses_generator_sample`` False) the noise, with no student forward made for them.
        """
        accum, n = self.cfg.train.gradient_accumulation, self.cfg.train.batch_size
        acc = self.accelerator
        split = acc.num_processes * accum > 1
        for a in range(accum):
            if self.shards is not None:  # FSDP reduce-scatters the last micro-batch's backward only
                self.shards.set_gradient_sync(a == accum - 1)
            if split:
                # A global batch split over processes or accumulation draws each micro-batch's randomness from
                # (seed, step, update, global index): rank r of P processes draws exactly what micro-batch r of a
                # P-fold accumulation draws in one process. A single micro-batch draws from the global stream,
                # whose state the checkpoint restores (so results of unsplit runs are unchanged by this).
                self._seed_micro_batch(phase, acc.process_index * accum + a)
            with self.accelerator.autocast():
                if self.objective.trains_on == "data":
                    x, cond = self._real(n)
                else:
                    z, cond = self._inputs(n)
                    x = z  # objectives that run their own student pass read only the batch's shape
                    if self.objective.uses_generator_sample:
                        with torch.set_grad_enabled(not critic):
                            x = self.generator.training_sample(z, cond)
                loss, logs = loss_of(x, cond, self._real(n) if critic else None)
            opt.backward(loss / accum)
        return logs, opt.step(self.accelerator, self.objective.critic_clip if critic else None)

    def train_step(self) -> dict:
        obj = self.objective
        obj.step = self.step
        global_batch = obj.images_per_step  # batch x accumulation x processes, set when the run built it
        obj.images_seen = self.step * global_batch  # before this update, as SiD's cur_nimg
        logs = {}
        critic_params = self.opt_c.params if self.opt_c else []
        for p in critic_params:
            p.requires_grad_(True)
        for u in range(obj.critic_updates_now()):
            part, (logs["grad_norm_critic"], applied) = self._update(self.opt_c, obj.critic_loss, True, f"critic{u}")
            logs.update(part)
            self.skipped["critic"] += ~applied
        for p in critic_params:  # the generator's loss reads the critic; it must not train it
            p.requires_grad_(False)
        if obj.trains_generator():  # not in DisBack's stage 1 (critic updates only)
            part, (logs["grad_norm_generator"], applied) = self._update(self.opt_g, obj.generator_loss, False, "generator")
            logs.update(part)
            self.skipped["generator"] += ~applied
            self.skipped["consecutive"] = torch.where(applied, 0, self.skipped["consecutive"] + 1)
        logs["skipped_updates"] = self.skipped["generator"] + self.skipped["critic"]
        obj.after_generator_step()
        if self._ema_pairs:
            beta = ema_beta(self.step, global_batch, self.cfg.train)
            with torch.no_grad():
                for e, p in self._ema_pairs:
                    e.lerp_(p, 1 - beta)
        return logs

    def _out_of_time(self, start: float) -> bool:
        """train.time_limit_minutes reached (the main process decides, so every process stops at the same step)."""
        limit = self.cfg.train.time_limit_minutes
        if limit is None:
            return False
        over = time.time() - start > 60 * limit
        if self.accelerator.num_processes == 1:
            return over
        flag = torch.tensor(float(over), device=self.accelerator.device)  # one sync a step, only with a time limit
        torch.distributed.broadcast(flag, 0)
        return bool(flag)

    def _check_divergence(self) -> None:
        """Stop after ``train.max_nonfinite_steps`` generator updates in a row were skipped (read at log steps).
        Skipped updates leave the weights as they were, so every checkpoint holds finite weights."""
        consecutive = int(self.skipped["consecutive"])
        if consecutive >= self.cfg.train.max_nonfinite_steps:
            last = ckpt.checkpoint_dirs(self.out)
            raise FastdiffError(
                f"training stopped at step {self.step}: {consecutive} generator updates in a row had "
                f"non-finite gradients (train.max_nonfinite_steps); the last good checkpoint is "
                f"{last[-1] if last else 'none'}; lower train.lr_generator / train.lr_critic and resume from it")

    def fit(self, export: bool = True, on_stage_end=None) -> Path | None:
        """Train to ``train.max_steps`` and (``export``) export the student. ``on_stage_end(segments)`` is called when a
        progressive objective's stage ends (default with ``export``: ``export_stage``; a resumed run that crosses an
        end calls it there, one that resumes past it does not call it again)."""
        cfg, acc = self.cfg, self.accelerator
        stage_ends = self.objective.stage_ends()  # {step: segment count}; {} unless progressive
        on_stage_end = on_stage_end or (self.export_stage if export else None)
        if cfg.train.eval_every and self.evaluator is None:
            raise FastdiffError("train.eval_every scores the student during `fastdiff distill`; from Python, set "
                                "trainer.evaluator = fastdiff.evaluation.during_training.TrainingEvaluator(trainer) "
                                "first, or set train.eval_every=0")
        if export:  # an export that cannot succeed fails now, not after training
            weights = self.student_weights()
            check_exportable(self.shards.skeleton(weights) if self.shards else weights, self.teacher)
        if self.resume:
            self.load(self.resume)
        elif self.overwrite and acc.is_main_process and self.out.exists():
            shutil.rmtree(self.out)
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        trackers.start(self)  # after load: a resumed run continues its tracker histories
        bar = tqdm(total=cfg.train.max_steps, initial=self.step, desc="distill",
                   disable=None if acc.is_main_process and self.progress else True)  # None: off unless a terminal
        if acc.is_main_process:
            keep_metrics_upto(self.out / "metrics.jsonl", self.step)
        metrics = open(self.out / "metrics.jsonl", "a") if acc.is_main_process else None
        try:
            start, first_step = time.time(), self.step
            if cfg.train.eval_every and self.step == 0:  # the curve starts where the student starts (as SiD's)
                start += self.evaluate(metrics)
            if cfg.train.ema_stage_restart and self.step in stage_ends and self.step < cfg.train.max_steps:
                # A finished run that ended at a stage's end, extended: the restart its last update skipped (no next
                # stage followed then). A no-op where the checkpoint holds the restarted EMA already.
                self.restart_ema()
            while self.step < cfg.train.max_steps:
                logs = self.train_step()
                self.step += 1
                bar.update(1)
                if self.step % cfg.train.log_every == 0 or self.step == cfg.train.max_steps:
                    # Logging waits for the device; on CUDA nothing else in the step does.
                    self._check_divergence()
                    values = {k: float(v) for k, v in logs.items()}
                    values["images_per_second"] = ((self.step - first_step) * cfg.train.batch_size * acc.num_processes
                                                   * cfg.train.gradient_accumulation) / max(time.time() - start, 1e-9)
                    values.update({f"method_{k}": float(v) for k, v in self.methods_used().items()})
                    trackers.log_scalars(acc, values, self.step)
                    bar.set_postfix({k: f"{v:.3g}" for k, v in values.items() if k.startswith("loss")})
                    if metrics:
                        metrics.write(json.dumps({"step": self.step, **values}) + "\n")
                        metrics.flush()
                if self.step % cfg.train.sample_every == 0:
                    self.sample_grid()
                if self.step in stage_ends:  # before the checkpoint: a resume past it finds it done
                    if on_stage_end:
                        on_stage_end(stage_ends[self.step])
                    if cfg.train.ema_stage_restart and self.step < cfg.train.max_steps:  # a next stage follows
                        self.restart_ema()
                out_of_time = self._out_of_time(start)
                every = cfg.train.eval_every
                if every and (self.step % every == 0 or self.step == cfg.train.max_steps or out_of_time):
                    start += self.evaluate(metrics)  # before the checkpoint, which keeps the lowest FID
                if self.step % cfg.train.checkpoint_every == 0 or self.step == cfg.train.max_steps or out_of_time:
                    self.save()
                acc.wait_for_everyone()
                if out_of_time:
                    acc.print(f"train.time_limit_minutes reached at step {self.step}: stopping")
                    break
        finally:  # an error message starts on its own line, and the log is flushed
            bar.close()
            if metrics:
                metrics.close()
        if not export:
            acc.end_training()
            return None
        self.sample_grid()
        with gathered_student(self):  # sharded: gathered while the process group lives (end_training ends it)
            acc.end_training()  # after the last grid: it is logged to the trackers too
            return self.export()
