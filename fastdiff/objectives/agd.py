"""AGD: adapter guidance distillation (Jensen et al. 2025, "Efficient Distillation of Classifier-Free Guidance
using Adapters", arXiv 2503.07274; reference code cristianpjensen/agd, ``agd/dit/train.py`` and
``agd/dit/sample_trajectories.py``).

CFG costs two passes per sampling step: ``eps_cfg = eps_u + w (eps_c - eps_u)`` (the paper's Eq. 1, with w the
guidance scale). AGD keeps the teacher frozen and trains small adapters so that ONE pass of the adapted network,
told w, returns eps_cfg for every w in a range (the paper's Eq. 3: ``L = E || eps_theta(x_t, t, c, w) -
eps_cfg(x_t, t, c, w) ||^2``, the reference's ``--loss l2``, ``F.mse_loss(eps_student, eps_cfg)``). Its other
point (Sec. 3.2) is where x_t comes from: the reference samples the teacher's own CFG-guided trajectories
(``sample_trajectories.py``: one w ~ U[1, 6] per trajectory, every step's input and CFG output stored) and trains on
those points, not on noised data, so training sees the inputs the guided sampler will see.

What fastdiff does, and where it differs:
- adapters: LoRA (``models.lora``'s targets, rank ``adapter_rank``, B = 0 at init) injected into the student network
  in place, plus the LCM-style scale embedding of ``models.guidance`` (``cond_proj``, zero at init; the trainer adds
  it to the student because ``objective.guidance_range`` is set). Everything else is frozen, so at init the adapted
  network equals the teacher's conditional prediction exactly. The reference's adapters are its own blocks (additive
  / attention adapters fed a timestep, label and w embedding); ours are the ones diffusers pipelines already load.
- trajectories: made on the fly by the teacher, deterministic DDIM (eta = 0) on the teacher's timesteps
  (``models.trajectory``, the sampler of ``data.name: teacher`` and the reflow pairs, on finite levels), one w per
  trajectory uniform in ``guidance_range``. All K points of ceil(n / K) trajectories are made and
  n of them drawn, so a batch of n points costs about n CFG evaluations (the reference stores 1000-step DDPM
  trajectories ahead of training instead).
- loss: the MSE in the teacher's own prediction space (eps, v or velocity), written in x0 terms through
  ``Denoiser.loss_weight`` (CFG is linear, so the x0 combination equals the eps one); the target is detached.
No images: the trainer passes noise as ``x`` (as for BOOT and TDM), used only for its size, and draws the conditions
as for distribution matching (class labels uniform, text teachers' ``data.prompts``; the reference's trajectories
take every class ``--num-per-class`` times, no images either); the student samples with the teacher's own deterministic sampler from the top
(``student.sampler: ddim``).
Training: the reference's optimiser and no EMA (``train_defaults``); checkpoints keep the adapters and the scale
embedding (``state_modules``); the export merges the adapters into the guidance-embedded network, which the
exported pipeline calls once per step with its ``guidance_scale``.
"""
from __future__ import annotations

import math

import torch

from ..models.denoiser import Denoiser
from ..models.guidance import guided_condition
from ..models.lora import is_lora, lora_targets
from ..models.trajectory import ddim_levels, ode_trajectory
from .base import Objective, finite_mean, per_sample_mean
from .guidance import TeacherGuidance
from .registry import register


# agd/utils/training_loop.py get_opt_scheduler and train.py: AdamW lr 1e-4, no weight decay, 500 warm-up steps, no EMA,
# no gradient clip (backward, then opt.step())
AGD_OPTIMIZER = {"lr_generator": 1e-4, "weight_decay": 0.0, "adam_betas": [0.9, 0.999], "lr_warmup_steps": 500,
                 "ema_decay": 0.0, "grad_clip": 0.0}


def attach_adapters(model: torch.nn.Module, rank: int) -> torch.nn.Module:
    """LoRA adapters (rank r, alpha r, B = 0) in place on a guidance-embedded network; then only the adapters and
    the scale embedding (``cond_proj``) train."""
    from ..models.guidance_unet import GuidanceEmbeddedUNet  # a diffusers model: imported once one exists

    base = model.unet if isinstance(model, GuidanceEmbeddedUNet) else model
    if not is_lora(base):
        from peft import LoraConfig, inject_adapter_in_model

        config = LoraConfig(r=rank, lora_alpha=rank, target_modules=lora_targets(base), init_lora_weights=True)
        if hasattr(base, "add_adapter"):
            base.add_adapter(config)
        else:
            inject_adapter_in_model(config, base)
    for name, p in model.named_parameters():
        trainable = "lora_" in name or "cond_proj" in name
        p.requires_grad_(trainable)
        if trainable:
            p.data = p.data.float()
    return model


def take(cond, idx: torch.Tensor):
    """The rows ``idx`` of every tensor of a condition (nested dicts too)."""
    if cond is None:
        return None
    return {k: take(v, idx) if isinstance(v, dict) else (v[idx] if torch.is_tensor(v) else v) for k, v in cond.items()}


class AdapterGuidanceDistillation(Objective):
    """Args:
        teacher: the frozen teacher Denoiser (conditional: CFG needs its null condition).
        student: the student Denoiser, a guidance-embedded copy of the teacher; adapters are attached here.
        guidance_range: [lo, hi], the CFG scales distilled (uniform per trajectory); required (the reference DiT
            run samples [1, 6]).
        adapter_rank: LoRA rank of the adapters.
        trajectory_steps: K, DDIM steps of each teacher trajectory the training points are taken from.
    """

    uses_fake_score = False
    uses_generator_sample = False  # its own points: the teacher's trajectories
    sampler = "ddim"
    sampler_reason = "distils CFG into the teacher's own deterministic sampler, which its export runs"
    fused_export_reason = "its scale embedding is not a LoRA weight, so a LoRA file would lose it"
    attaches_adapters = True

    def __init__(self, teacher: Denoiser, fake, student: Denoiser, gan_head=None,
                 guidance_range: list[float] | None = None, adapter_rank: int = 8, trajectory_steps: int = 25):
        super().__init__(teacher, None, 0, None)
        if guidance_range is None:
            raise ValueError("objective agd needs objective.guidance_range, the CFG scales to distil, e.g. [1.0, 6.0]")
        if adapter_rank < 1 or trajectory_steps < 1:
            raise ValueError("objective.adapter_rank and objective.trajectory_steps must be positive")
        self.guidance = TeacherGuidance(teacher, student, guidance_range)
        self.student = student
        self.trajectory_steps = trajectory_steps
        attach_adapters(student.model, adapter_rank)
        self.teacher.requires_grad_(False)

    def train_defaults(self) -> dict:
        """The reference's optimiser (``agd/utils/training_loop.py`` ``get_opt_scheduler`` and ``train.py``'s
        defaults): AdamW at lr 1e-4 without weight decay, a linear warm-up over a tenth of its 5000 steps (its cosine
        decay afterwards is not reproduced), and no EMA (its checkpoints are the trained adapters themselves)."""
        return dict(AGD_OPTIMIZER)

    def state_modules(self) -> dict[str, torch.nn.Module]:
        """The scale embedding: a LoRA student's checkpoint keeps only its ``lora_`` weights (``AdapterWeights``),
        so the trained ``cond_proj`` is checkpointed here."""
        from ..models.guidance_unet import GuidanceEmbeddedUNet

        model = self.student.model
        proj = model.cond_proj if isinstance(model, GuidanceEmbeddedUNet) else model.time_embedding.cond_proj
        return {"agd_scale_embedding": proj}

    def levels(self, device) -> torch.Tensor:
        """The K DDIM levels, highest first (``models.trajectory.ddim_levels``): the teacher's timesteps
        round(linspace(T - 1, 0, K)) (down to 1 on a flow teacher, whose t = 0 is sigma = 0, where the velocity loss
        weight is infinite)."""
        return ddim_levels(self.teacher.schedule, self.trajectory_steps, finite=True).float().to(device)

    @torch.no_grad()
    def trajectory_points(self, n: int, shape: tuple, cond, device):
        """n points of the teacher's CFG-guided DDIM trajectories: (native inputs, sigma, CFG x0 there, w, cond).

        ceil(n / K) trajectories from fresh noise, each with its own w and the condition of one batch row."""
        K, d = self.trajectory_steps, self.teacher
        m = math.ceil(n / K)
        rows = torch.arange(m, device=device)
        traj_cond = take(cond, rows)
        lo, hi = self.guidance.range
        w = lo + (hi - lo) * torch.rand(m, device=device)
        sigmas = self.levels(device)
        z = torch.randn((m, *shape), device=device)
        states = list(ode_trajectory(d, z, sigmas, traj_cond, w))  # DDIM (eta = 0): K CFG evaluations
        inputs, targets = [s.x for s in states], [s.x0 for s in states]
        pick = torch.randperm(K * m, device=device)[:n]  # point index = step * m + trajectory
        step, traj = pick // m, pick % m
        return (torch.stack(inputs).flatten(0, 1)[pick], sigmas[step], torch.stack(targets).flatten(0, 1)[pick],
                w[traj], take(traj_cond, traj))

    def loss_at(self, z: torch.Tensor, sigma: torch.Tensor, cond, w: torch.Tensor,
                target: torch.Tensor | None = None) -> torch.Tensor:
        """Per-sample loss at native inputs z: the teacher's prediction-space MSE between one pass of the adapted
        student told w and the teacher's CFG output at scale w (``target``, else computed here; no gradient)."""
        if target is None:
            with torch.no_grad():
                target = self.teacher.denoise_native(z, sigma, cond, w)
        student_cond = guided_condition(cond, w - 1.0, self.guidance.embed_dim, z.device)
        pred = self.student.denoise_native(z, sigma, student_cond)
        return self.teacher.loss_weight(sigma) * per_sample_mean((pred - target.detach()) ** 2)

    def generator_loss(self, x, cond=None, real=None):
        z, sigma, target, w, point_cond = self.trajectory_points(x.shape[0], tuple(x.shape[1:]), cond, x.device)
        loss = finite_mean(self.loss_at(z, sigma, point_cond, w, target))
        return loss, {"loss_agd": loss.detach()}


register("agd", AdapterGuidanceDistillation)
