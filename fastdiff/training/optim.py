"""The optimizer of one group of modules: AdamW, gradient clipping, (fp16) loss scaling, a learning-rate schedule,
a hand-made gradient all-reduce across processes, and non-finite updates skipped without waiting for the device."""
from __future__ import annotations

import contextlib
import math
import warnings

import torch
from accelerate import Accelerator

from . import sharding


def _average_gradients(params: list[torch.nn.Parameter], accelerator: Accelerator) -> None:
    if accelerator.num_processes == 1:
        return
    # Sharded parameters' gradients were reduce-scattered by FSDP in backward (train.sharding fsdp).
    grads = [p.grad for p in params if p.grad is not None and not sharding.is_dtensor(p.grad)]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= accelerator.num_processes
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


class Optimizer:
    """AdamW + gradient clipping + (fp16) loss scaling + learning-rate schedule for one group of modules."""

    def __init__(self, modules: list[torch.nn.Module], lr: float, cfg, fp16: bool, steps_per_update: int = 1,
                 clip: float | None = None):
        self.params = [p for m in modules for p in m.parameters() if p.requires_grad]  # LoRA: adapters only
        self.sharded = any(sharding.is_dtensor(p) for p in self.params)  # train.sharding fsdp
        fused = torch.cuda.is_available() and all(p.is_cuda for p in self.params) and not self.sharded
        self.opt = torch.optim.AdamW(self.params, lr=lr, betas=tuple(cfg.train.adam_betas),
                                     weight_decay=cfg.train.weight_decay, fused=fused or None)
        # the parameters' own device type: torch's default ("cuda") disables itself elsewhere, with a warning
        self.scaler = torch.amp.GradScaler(self.params[0].device.type if self.params else "cpu", enabled=fp16)
        # the gradient-norm clip (``clip``, else train.grad_clip); 0 = none: an infinite bound still measures the norm
        self.clip = (cfg.train.grad_clip if clip is None else clip) or math.inf
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda step: lr_factor(step // steps_per_update, cfg.train))

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def step(self, accelerator: Accelerator, clip_value: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(gradient norm, applied): both device tensors. A non-finite gradient is never applied: the update is
        skipped (the learning-rate schedule still advances, so it stays tied to the step count).

        With fused AdamW (CUDA) the skip happens inside the kernel: it takes ``found_inf`` as GradScaler hands
        it over, so the step never waits for the device. Elsewhere (CPU, fp16 loss scaling) deciding it costs one
        host synchronisation, which the CPU does not notice.

        ``clip_value``: clip each gradient element to [-clip_value, clip_value] before the norm clip (SiDA's
        fake-score ``clip_grad_value_``)."""
        _average_gradients(self.params, accelerator)
        self.scaler.unscale_(self.opt)
        if self.sharded:  # a norm over shards and replicated heads together
            norm = sharding.clip_grad_norm(self.params, self.clip, clip_value)
        else:
            if clip_value:
                torch.nn.utils.clip_grad_value_(self.params, clip_value)
            if math.isinf(self.clip):  # no clip: measure the norm without rescaling every gradient by 1
                norm = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])
            else:
                norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        finite = torch.isfinite(norm)
        if self.opt.defaults.get("fused") and not self.scaler.is_enabled():
            self.opt.grad_scale, self.opt.found_inf = None, (~finite).float()
            try:
                self.opt.step()
            finally:
                del self.opt.grad_scale, self.opt.found_inf
        elif bool(finite):
            self.scaler.step(self.opt)
        self.scaler.update()  # fp16: a skipped step also lowers the loss scale
        self.opt.zero_grad(set_to_none=True)
        # A skipped update advances the schedule too (one step, one schedule step). torch warns, at the schedule's
        # first step only, that it stepped before the optimizer, which is meant here: silenced there and only there
        # (catching warnings resets Python's once-per-place registry, so other warnings would repeat every step).
        first = getattr(self.schedule, "_step_count", 1) <= 1
        with warnings.catch_warnings() if first else contextlib.nullcontext():
            if first:
                warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
            self.schedule.step()
        return norm, finite

    def state_dict(self, is_main: bool = True):
        """Sharded: collective (every process calls it); full tensors, kept by the main process."""
        opt = self.opt.state_dict()
        if self.sharded:
            opt = sharding.full_optimizer_state(opt, is_main)
        return {"opt": opt, "scaler": self.scaler.state_dict(), "schedule": self.schedule.state_dict()}

    def load_state_dict(self, state):
        opt = state["opt"]
        if self.sharded:  # the checkpoint's full tensors cut into this process's shards
            opt = sharding.shard_optimizer_state(opt, self.params)
        self.opt.load_state_dict(opt)
        self.scaler.load_state_dict(state["scaler"])
        if "schedule" in state:  # checkpoints from before learning-rate schedules
            self.schedule.load_state_dict(state["schedule"])


def lr_factor(step: int, train) -> float:
    """Learning-rate multiplier after ``step`` optimizer steps: linear warm-up, then constant or cosine to 0."""
    warmup = train.lr_warmup_steps or 0  # null before the trainer resolves the objective's default
    if step < warmup:
        return (step + 1) / warmup
    if train.lr_schedule == "constant":
        return 1.0
    span = max(train.max_steps - warmup, 1)
    return 0.5 * (1 + math.cos(math.pi * min(step - warmup, span) / span))
