"""Why consistency distillation on the linear-beta epsilon teacher (embedded:fmnist-ddpm) produces noise (issue 26).

Test-sized measurements on the CPU, written to eval/results/consistency-cpu/diagnose.json (+ .md):

1. At initialisation (student = target = teacher), per noise level: 1 / a_t, the teacher's x0 error against the
   real image, the cd loss of one teacher step, the norm of that loss's gradient in the student's weights, and how
   far the student's x0 moves per unit of weight change along that gradient (the x0 "gain" of a step).
2. Short cd runs (``--steps`` generator updates, batch 8, the trainer's optimizer settings) in variants: the issue's
   setting (lr 1e-4), a smaller lr (1e-5), the top timesteps excluded (grid and first sampling level at t <= 700),
   and other student heads; per run the loss, the generator gradient norm, and the one-step sample's RMS distance
   to the teacher's 25-step DDIM sample from the same noise (the ODE end point a consistency model should reach).

    python eval/consistency_diagnose.py --data-path /work/shared/datasets/fashion-mnist --steps 60
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import torch

from fastdiff.config import Config
from fastdiff.errors import script_main
from fastdiff.training.data import load_fashion_mnist, to_model_range
from fastdiff.models.denoiser import expand
from fastdiff.models.embedded import resolve_teacher_path
from fastdiff.objectives.cd import ConsistencyDistillation
from fastdiff.training.optim import Optimizer
from fastdiff.models.teacher import load_teacher

ROOT = Path(__file__).resolve().parent


def teacher_ddim(teacher, z, top: int, steps: int = 25) -> torch.Tensor:
    """The teacher's deterministic DDIM (Euler in the VE scale) from native noise z at timestep ``top`` to 0."""
    d = teacher.denoiser
    ts = torch.linspace(top, 0, steps + 1).round()
    sig = d.schedule.sigma_at(ts)
    x = z / d.schedule.alpha(sig[0])
    with torch.no_grad():
        for s, s_next in zip(sig[:-1], sig[1:]):
            x0 = d(x, s.expand(len(x)))
            x = x0 + (x - x0) * (s_next / s)
    return x


def init_diagnostics(teacher, real: torch.Tensor, levels: list[int], n: int = 8) -> list[dict]:
    d = teacher.denoiser
    student = copy.deepcopy(d).requires_grad_(True)
    student.model.requires_grad_(True)
    cd = ConsistencyDistillation(d, None, student, target_ema=0.0, num_intervals=50)
    params = [p for p in student.model.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(0)
    rows = []
    for t in levels:
        x0 = real[torch.randint(len(real), (n,), generator=gen)]
        eps = torch.randn(x0.shape, generator=gen)
        sig = d.schedule.sigma_at(torch.tensor([float(t)] * n))
        sig_prev = d.schedule.sigma_at(torch.tensor([float(max(t - 20, 0))] * n))  # one interval of a 50-grid
        x = x0 + expand(sig, x0) * eps
        with torch.no_grad():
            err = (d(x, sig) - x0).flatten(1).pow(2).mean(1).sqrt().mean().item()
        student.model.zero_grad()
        loss = cd.loss_at(x, sig, sig_prev).mean()
        loss.backward()
        grad = torch.sqrt(sum(p.grad.pow(2).sum() for p in params)).item()
        # x0 gain: change of the student's x0 for a weight step of norm 1e-3 along the normalised gradient.
        with torch.no_grad():
            before = student(x, sig)
            for p in params:
                p -= 1e-3 * p.grad / grad
            after = student(x, sig)
            for p in params:
                p += 1e-3 * p.grad / grad
        gain = ((after - before).flatten(1).pow(2).mean(1).sqrt().mean() / 1e-3).item()
        rows.append({"timestep": t, "sigma": float(sig[0]), "inv_a": float((1 + sig[0] ** 2).sqrt()),
                     "teacher_x0_rmse": err, "cd_loss": loss.item(), "grad_norm": grad, "x0_gain": gain})
        print(rows[-1], flush=True)
    return rows


def short_run(teacher, real, *, steps: int, lr: float, top: int, head: str = "teacher", batch: int = 8,
              betas=(0.9, 0.999), seed: int = 0, z: torch.Tensor, ref: torch.Tensor) -> dict:
    """cd for ``steps`` updates with the trainer's optimizer; loss, grad norm and one-step ODE-target error."""
    from fastdiff.models.consistency import ConsistencyDenoiser

    torch.manual_seed(seed)
    d = teacher.denoiser
    model = copy.deepcopy(teacher.model).float().requires_grad_(True).train()
    student = ConsistencyDenoiser(model, d.schedule, d.prediction_type if head == "teacher" else head,
                                  timestep_scaling=10.0)
    cd = ConsistencyDistillation(d, None, student)
    if top < d.schedule.num_train_timesteps - 1:  # the grid's top level at timestep `top`
        cd.grid = lambda n, device: d.schedule.sigma_at(torch.linspace(0, top, n + 1, dtype=torch.float64).round())
    cfg = Config()
    cfg.train.lr_generator, cfg.train.adam_betas, cfg.train.weight_decay, cfg.train.lr_warmup_steps = lr, list(betas), 0.01, 0
    opt = Optimizer([model], lr, cfg, False)
    gen = torch.Generator().manual_seed(seed)
    log = []
    sig_top = d.schedule.sigma_at(torch.tensor([float(top)]))

    def one_step_error():
        with torch.no_grad():
            x0 = student.denoise_native(z, sig_top.expand(len(z)))
        return (x0 - ref).flatten(1).pow(2).mean(1).sqrt().mean().item()

    start_err = one_step_error()
    t0 = time.time()
    for step in range(steps):
        x = real[torch.randint(len(real), (batch,), generator=gen)]
        cd.step = step
        loss, _ = cd.generator_loss(x)
        opt.backward(loss)
        norm, _ = opt.step(_OneProcess())
        cd.after_generator_step()
        log.append({"step": step + 1, "loss": loss.item(), "grad_norm": float(norm)})
    return {"lr": lr, "top": top, "head": head, "betas": list(betas), "steps": steps, "seconds": time.time() - t0,
            "loss_first10": sum(r["loss"] for r in log[:10]) / 10, "loss_last10": sum(r["loss"] for r in log[-10:]) / 10,
            "loss_max": max(r["loss"] for r in log), "grad_norm_median": sorted(r["grad_norm"] for r in log)[len(log) // 2],
            "grad_norm_max": max(r["grad_norm"] for r in log),
            "one_step_ode_rmse_start": start_err, "one_step_ode_rmse_end": one_step_error(), "log": log}


class _OneProcess:
    num_processes = 1


@script_main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default="embedded:fmnist-ddpm")
    p.add_argument("--data-path", default="/work/shared/datasets/fashion-mnist")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--variants", default="issue,base,lr1e-5,top700,top700-lr1e-5,v_prediction,sample")
    p.add_argument("--out", default=str(ROOT / "results" / "consistency-cpu" / "diagnose.json"))
    p.add_argument("--keep-init", action="store_true", help="reuse the init section of an existing --out file")
    args = p.parse_args(argv)
    out = Path(args.out)
    previous = json.loads(out.read_text()) if out.is_file() else {}
    torch.manual_seed(0)
    teacher = load_teacher(resolve_teacher_path(args.teacher))
    images, _ = load_fashion_mnist(args.data_path, "train")
    real = to_model_range(images[:2000], teacher.sample_shape[-1])
    levels = [20, 100, 300, 500, 600, 700, 800, 900, 950, 999]
    result = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
              "python": sys.version.split()[0], "date": time.strftime("%Y-%m-%d"), "teacher": args.teacher,
              "init": previous["init"] if args.keep_init else init_diagnostics(teacher, real, levels),
              "runs": previous.get("runs", {}) if args.keep_init else {}}
    z = torch.randn(16, *teacher.sample_shape, generator=torch.Generator().manual_seed(123))
    refs = {}
    variants = {"issue": dict(lr=1e-4, top=999, betas=(0.0, 0.999)), "base": dict(lr=1e-4, top=999), "lr1e-5": dict(lr=1e-5, top=999),
                "top700": dict(lr=1e-4, top=700), "top700-lr1e-5": dict(lr=1e-5, top=700),
                "top727": dict(lr=1e-4, top=727), "top727-lr1e-5": dict(lr=1e-5, top=727),
                "v_prediction": dict(lr=1e-4, top=999, head="v_prediction"),
                "sample": dict(lr=1e-4, top=999, head="sample")}
    for name in args.variants.split(","):
        v = variants[name]
        if v["top"] not in refs:
            refs[v["top"]] = teacher_ddim(teacher, z, v["top"])
        run = short_run(teacher, real, steps=args.steps, z=z, ref=refs[v["top"]], **v)
        print(name, {k: val for k, val in run.items() if k != "log"}, flush=True)
        result["runs"][name] = run
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))  # after every variant: a slow machine keeps what it measured
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
