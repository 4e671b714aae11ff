"""DisBack: distribution backtracking (Zhang et al. 2024, "Distribution Backtracking Builds a Faster Convergence
Trajectory for One-step Diffusion Distillation", arXiv 2408.15991; SYZhang0805/DisBack), a plug-in for the
distribution-matching objectives: ``objective.backtrack: N`` on dmd2 / vsd and sid / sida (``disback`` is dmd2 with
it on at the reference's settings).

The paper. Score distillation trains a generator G against a target ("real") score with a fake score s_phi fitted to
G's samples by denoising score matching (Eq. 5, ``E ||s_phi(x_t, t) - grad log q_t(x_t | x_0)||^2``, x_0 = G(z)); G
follows (Eq. 8) ``E[w(t) (s_phi(x_t, t) - s_target(x_t, t)) dx_t / d eta]``. With the teacher as the target from the
first update, the initial student's samples sit where the teacher's score is poor (the "score mismatch" of the early
stage). DisBack builds a path of targets between the two:

- Stage 1, degradation recording (Eq. 7): a copy of the teacher, psi_0 = s_theta, is trained with Eq. 5 on the
  *initial* (frozen) student's samples; checkpoints psi_1 .. psi_N along the way form the degradation path from the
  teacher's distribution to the initial student's.
- Stage 2, distribution backtracking: the reversed path is the convergence trajectory. The fake score starts at psi_N
  (it already fits the initial student) and the target walks psi_{N-1}, ..., psi_1, one node per ``interval``
  generator updates, then the teacher psi_0 for the rest of the run:
  ``k(j) = max(N - 1 - floor(j / interval), 0)`` for stage-2 generator update j (:func:`target_index`).

The reference. main/degradation.py trains the guidance model (fake unet, initialised at the teacher) alone on the
samples of a generator it never updates, AdamW at ``--guidance_lr``, and saves its state every ``--log_iters`` 100 of
1000 updates: N = 10 (after updates 1, 101, ..., 901, as it saves before advancing its step counter; fastdiff records
at the end of each of N equal parts, the last being the fake score at the end). main/train_sd.py ``train`` loads checkpoint ``ckpt_num`` into the real unet at the start of every
iteration whose index is a multiple of ``--interval`` 1000, ``ckpt_num`` going one checkpoint back each time; one
iteration is one fake-score update and every ``--dfake_gen_update_ratio`` = 5th a generator update, so 200 generator
updates per node. The README's algorithm starts the fake score at the last checkpoint and the target at the one before
(``target = 1`` in the reversed path). fastdiff follows that algorithm with train_sd.py's switch timing and ends at the
teacher. Two quirks of the released train_sd.py are not followed: its guard ``ckpt_num >= self.step`` (both counted
from 24000) holds at the first switch only, and the file it loads is the guidance model's state dict (keys under
``fake_unet.`` / ``real_unet.``) read into the real unet with ``strict=False``.

Why a helper and not a wrapper objective: backtracking changes one thing in a distribution-matching objective, which
network is the real score (and, in stage 1, that the generator waits). DMD2 and SiD ask :meth:`Backtrack.real` for
their real score; a wrapper would have to re-declare every option of the objective it wraps, since the registry takes
an objective's config keys from its constructor. Stage 1 trains the objective's own fake score as the degrading copy:
it starts as the teacher (a copy, or a zero LoRA), learns the initial student with the objective's own fake-score loss
and optimizer, and ends as psi_N, where stage 2's fake score starts, so nothing is copied back. The trainer runs only
critic updates in stage 1 (:meth:`Backtrack.trains_generator`); its steps count in ``train.max_steps``, so a DisBack
run has the compute budget of the plain objective at the same step count.

Where the path lives: in host memory, as the fake score's trainable tensors, flattened: psi_1 .. psi_{N-1} as one
(N - 1, P) tensor on the CPU (psi_N is the fake score itself, psi_0 the teacher), allocated up front so checkpoints,
which keep it as ``backtrack_path``, load with a fixed shape; a resumed run therefore has exactly the path the
uninterrupted one had, with no second set of files beside the checkpoints to keep in step with pruning, overwrite and
resume. Only trainable tensors are kept: with a LoRA fake score (``objective.fake_lora_rank``) the adapters. The current
target is one more copy of those tensors on the fake score's device, substituted into the fake network by
``torch.func.functional_call`` (the frozen base weights are shared, not copied). Sizes at N = 10 (9 kept), float32:
fmnist-ddpm's 8.95M-parameter UNet 34 MiB per node, 307 MiB host; as a rank-16 LoRA (1.08M) 4.1 MiB, 37 MiB; Stable
Diffusion 1.5's 860M-parameter UNet 3.2 GiB per node, 29 GiB host as a full copy, so large teachers want a LoRA fake.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from ..models.denoiser import Denoiser


def target_index(step: int, checkpoints: int, degradation_steps: int, interval: int) -> int | None:
    """The path node the generator update at trainer ``step`` is trained toward: None in stage 1 (no generator update),
    k in N - 1 .. 1 for psi_k, 0 for the teacher."""
    if step < degradation_steps:
        return None
    return max(checkpoints - 1 - (step - degradation_steps) // interval, 0)


class PathStore(nn.Module):
    """psi_1 .. psi_{N-1} as rows of one CPU tensor: a module so checkpoints save and load it like a network."""

    def __init__(self, rows: int, numel: int, dtype: torch.dtype):
        super().__init__()
        self.register_buffer("psi", torch.zeros(rows, numel, dtype=dtype))


class Backtrack:
    """The degradation path of one objective's fake score and the target score along it.

    Args:
        fake: the objective's fake score (stage 1 trains it into the degrading copy).
        checkpoints: N, the path's recorded nodes psi_1 .. psi_N; 0 = off (the teacher is the target throughout).
        degradation_steps: trainer steps of stage 1, each the objective's critic updates with no generator update
            (reference: 1000 fake-score updates at 5 per generator update = 200). A multiple of N: psi_k is the fake
            score after step k * degradation_steps / N.
        interval: generator updates per path node in stage 2 (reference: --interval 1000 iterations / 5 = 200).
    """

    def __init__(self, fake: Denoiser | None, checkpoints: int = 0, degradation_steps: int = 200, interval: int = 200):
        if checkpoints < 0 or degradation_steps < 0 or interval < 1:
            raise ValueError("objective.backtrack and objective.degradation_steps must be >= 0 and "
                             "objective.backtrack_interval >= 1")
        if checkpoints and (degradation_steps < checkpoints or degradation_steps % checkpoints):
            raise ValueError(f"objective.degradation_steps ({degradation_steps}) must be a positive multiple of "
                             f"objective.backtrack ({checkpoints}): one path checkpoint every "
                             "degradation_steps / backtrack steps")
        self.fake, self.checkpoints, self.interval = fake, checkpoints, interval
        self.degradation_steps = degradation_steps if checkpoints else 0
        self.store = None
        self._cached: tuple[int, dict] | None = None  # (k, psi_k's tensors on the fake score's device)
        if not checkpoints:
            return
        if fake is None:
            raise ValueError("objective.backtrack needs a fake score")
        # Named at construction, while the trainable set is the objective's own (the trainer later toggles
        # requires_grad around generator updates).
        self.names = [(n, p.shape) for n, p in fake.named_parameters() if p.requires_grad]
        numel = sum(shape.numel() for _, shape in self.names)
        dtype = next(p.dtype for _, p in fake.named_parameters() if p.requires_grad)
        self.store = PathStore(checkpoints - 1, numel, dtype)  # not a submodule: .to(device) leaves it on the CPU

    @property
    def on(self) -> bool:
        return self.checkpoints > 0

    def target(self, step: int) -> int | None:
        return target_index(step, self.checkpoints, self.degradation_steps, self.interval) if self.on else 0

    def trains_generator(self, step: int) -> bool:
        """False in stage 1: the trainer runs only the critic updates (the initial student stays as it is)."""
        return step >= self.degradation_steps

    def after_step(self, step: int) -> None:
        """Record psi_k after stage-1 step ``step`` when it ends the k-th of N equal parts (psi_N stays in the fake)."""
        if not self.on or step >= self.degradation_steps:
            return
        every = self.degradation_steps // self.checkpoints
        k = (step + 1) // every
        if (step + 1) % every == 0 and k < self.checkpoints:
            params = dict(self.fake.named_parameters())
            with torch.no_grad():
                flat = torch.cat([params[n].detach().reshape(-1) for n, _ in self.names])
                self.store.psi[k - 1].copy_(flat.to(self.store.psi.device, self.store.psi.dtype))

    def node(self, k: int) -> dict[str, torch.Tensor]:
        """psi_k's trainable tensors on the fake score's device, by parameter name (cached: the target changes once
        every ``interval`` updates)."""
        if self._cached is None or self._cached[0] != k:
            device = next(self.fake.parameters()).device
            rows = self.store.psi[k - 1].to(device).split([shape.numel() for _, shape in self.names])
            # clones: each tensor its own aligned allocation, as the network's own parameters are
            self._cached = (k, {n: row.view(shape).clone() for (n, shape), row in zip(self.names, rows)})
        return self._cached[1]

    def real(self, teacher: Denoiser, step: int, x_t: torch.Tensor, sigma: torch.Tensor, cond=None) -> torch.Tensor:
        """The target score's x0 estimate for the generator update at ``step``: the teacher, or the fake network with
        psi_k's tensors, under the teacher's CFG scale (the reference loads the node into its guided real unet).
        Gradients reach ``x_t`` as through the teacher (SiD backpropagates through its real score)."""
        k = self.target(step)
        if not k:
            return teacher(x_t, sigma, cond)
        return functional_call(self.fake, self.node(k), (x_t, sigma, cond),
                               {"guidance_scale": teacher.guidance_scale}, strict=False)

    def state_modules(self) -> dict[str, nn.Module]:
        return {"backtrack_path": self.store} if self.on and self.store.psi.shape[0] else {}


class Backtracking:
    """What a distribution-matching :class:`~fastdiff.objectives.base.Objective` with ``self.backtrack`` (a
    :class:`Backtrack`) gains: its real score walks the path, the trainer skips its generator updates in stage 1, the
    path is recorded after each stage-1 step and kept in checkpoints. Listed before Objective in the class's bases."""

    backtrack: Backtrack

    def real_x0(self, x_t: torch.Tensor, sigma: torch.Tensor, cond=None) -> torch.Tensor:
        return self.backtrack.real(self.teacher, self.step, x_t, sigma, cond)

    def trains_generator(self) -> bool:
        return self.backtrack.trains_generator(self.step)

    def generator_updates(self, steps: int) -> int:
        return max(0, steps - self.backtrack.degradation_steps)  # the steps s < steps with trains_generator(s)

    def after_generator_step(self) -> None:
        super().after_generator_step()
        self.backtrack.after_step(self.step)

    def state_modules(self) -> dict[str, nn.Module]:
        return {**super().state_modules(), **self.backtrack.state_modules()}
