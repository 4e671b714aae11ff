"""The first stage of multi-student distillation's smaller students (Song et al., "Multi-student Diffusion
Distillation for Better One-step Generators", arXiv 2410.23274, ICML 2025; no public code: built from the paper):
"a Teacher Score Matching pretraining, to provide stable initialization", then distribution matching
(``training.msd``), then the adversarial stage. ``fastdiff msd --warmup-steps N`` runs it
(``teacher_score_matching``): the student network, as a denoiser in the teacher's parametrisation, regresses the
teacher's output at the same noisy input,

    L_TSM = E_{c, x0, t, eps} [ w(sigma_t) || D_student(x0 + sigma_t eps, sigma_t, c) - D_teacher(x0 + sigma_t eps, sigma_t, c) ||^2 ],

with w the teacher's own loss weight (``Denoiser.loss_weight``: the squared error of the network's native output,
eps or v), i.e. the student's score matched to the teacher's, since s(x) = (D(x) - x) / sigma^2 and D is affine in
the native output. t is uniform over the teacher's training timesteps, c over the student's classes / prompts;
the teacher is the conditional one without guidance.
Deviation: the paper noises real data; here x0 is the teacher's own deterministic DDIM sample
(``WARMUP_TEACHER_STEPS`` steps) from seeded noise, so the warm-up is data-free like the distribution matching
after it (text runs have prompts, not images). The warmed network is saved as a diffusers folder beside the runs
and becomes the student's ``student.model``.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ..config import Config

WARMUP_TEACHER_STEPS = 8  # DDIM steps of the teacher samples the warm-up noises


def warm_up(cfg: Config, steps: int, lr: float, out: Path, overwrite: bool = False, log=print) -> Path:
    """``student.model`` after ``steps`` updates of ``teacher_score_matching`` on the student's classes / prompts,
    saved as a diffusers model folder in ``out`` (atomically, with warmup.json: settings and errors). A folder made
    with the same settings is kept: the warm-up is deterministic, so a rerun would remake it bit for bit."""
    from ..models.embedded import resolve_teacher_path
    from ..models.teacher import load_model, load_teacher
    from ..models.text import read_prompts
    from .networks import check_student

    prompts = read_prompts(cfg.data.prompts, "data.prompts") if cfg.data.prompts else None
    settings = {"steps": steps, "lr": lr, "batch_size": cfg.train.batch_size, "seed": cfg.train.seed,
                "model": str(Path(cfg.student.model).resolve()), "teacher": cfg.teacher.path,
                "classes": cfg.student.classes, "prompts": prompts}
    record = out / "warmup.json"
    if not overwrite and record.is_file() and json.loads(record.read_text())["settings"] == settings:
        log(f"warm-up: kept {out}")
        return out
    teacher = load_teacher(resolve_teacher_path(cfg.teacher.path))
    model = load_model(cfg.student.model).requires_grad_(True)
    check_student(model, teacher)
    log(f"warm-up: {steps} teacher-score-matching updates of {cfg.student.model} -> {out}")
    result = teacher_score_matching(teacher, model, steps, lr, cfg.train.batch_size, cfg.train.seed,
                                    cfg.student.classes, prompts)
    log(f"warm-up: regression error {result['error_before']:.4g} -> {result['error_after']:.4g}")
    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    (tmp / "warmup.json").write_text(json.dumps({"settings": settings, **result}, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def teacher_score_matching(teacher, model: torch.nn.Module, steps: int, lr: float, batch_size: int, seed: int,
                           classes: list[int] | None = None, prompts: list[str] | None = None,
                           eval_batches: int = 4, teacher_steps: int = WARMUP_TEACHER_STEPS) -> dict:
    """Train ``model`` (in place, Adam at ``lr``) to regress the teacher's output (the module docstring's L_TSM).
    Returns the loss of each update and the regression error on ``eval_batches`` held-out batches (their own seed)
    before and after. Every draw comes from generators seeded by ``seed``: the same call gives the same weights.
    ``teacher_steps``: the DDIM steps of the teacher samples that are noised."""
    from ..inference.sampling import ddim_sample
    from ..models.denoiser import Denoiser

    device = next(model.parameters()).device
    real = teacher.denoiser
    student = Denoiser(model, real.schedule, real.prediction_type, teacher.null_class)
    encode = None
    if prompts is not None:
        from ..models.text import PromptEncoder

        encode = PromptEncoder(teacher.pipeline, device=device)

    def batch(gen: torch.Generator):
        """(noisy x, sigma, condition, the teacher's x0 estimate, loss weight) of one batch, drawn from ``gen``."""
        cond = None
        if encode is not None:
            cond = encode([prompts[i] for i in torch.randint(len(prompts), (batch_size,), generator=gen).tolist()])
        elif teacher.num_classes:
            allowed = torch.as_tensor(classes if classes is not None else range(teacher.num_classes))
            cond = {"class_labels": allowed[torch.randint(len(allowed), (batch_size,), generator=gen)].to(device)}
        z = torch.randn((batch_size, *teacher.sample_shape), generator=gen).to(device)
        t = torch.randint(1, real.schedule.num_train_timesteps, (batch_size,), generator=gen)
        sigma = real.schedule.sigma_at(t).to(device)
        with torch.no_grad():
            x0 = ddim_sample(real, z, teacher_steps, cond)
            x = x0 + sigma.view(-1, *[1] * (x0.dim() - 1)) * torch.randn(x0.shape, generator=gen).to(device)
            target = real(x, sigma, cond)
        return x, sigma, cond, target, real.loss_weight(sigma)

    def loss(x, sigma, cond, target, weight) -> torch.Tensor:
        per_sample = ((student(x, sigma, cond) - target) ** 2).flatten(1).mean(1)
        return (weight * per_sample).mean()

    held_out = [batch(torch.Generator().manual_seed(seed + 1_000_003 + i)) for i in range(eval_batches)]

    def error() -> float:
        with torch.no_grad():
            return sum(float(loss(*b)) for b in held_out) / len(held_out)

    before = error()
    gen = torch.Generator().manual_seed(seed + 7)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        value = loss(*batch(gen))
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
        losses.append(float(value.detach()))
    model.eval()
    return {"error_before": before, "error_after": error(), "losses": losses}
