"""Teacher recipe: train a Fashion-MNIST diffusers teacher of the reference teachers' family.

The recipe of ``../shared/teachers`` (their README): 28x28 images in [-1, 1] padded with -1 to 32x32, random
horizontal flips; ``UNet2DModel`` (64, 128, 128, 128) with attention at 8x8, 8.95M parameters; DDPM with 1000
timesteps; AdamW lr 2e-4 with 500 warm-up steps, batch 512, bf16 autocast, gradient clip 1.0, about 5,100 steps;
EMA 0.9995, whose weights are saved.

    python eval/train_teacher.py --out teachers/fmnist-ddpm                      # unconditional, epsilon
    python eval/train_teacher.py --conditional --out teachers/fmnist-cond-vpred  # classes + null, v, cosine

The unconditional teacher is written as a ``DDPMPipeline`` folder (linear betas, ``clip_sample=True``), the
conditional one as ``unet/`` + ``scheduler/`` (``squaredcos_cap_v2``, v-prediction; label 10 is the null class,
dropped in for 10% of the labels so classifier-free guidance works). On an H100 the default 5,100 steps take a few
minutes; ``--steps 3 --batch-size 8`` runs on a CPU as a smoke test.
"""
from __future__ import annotations

import argparse
import copy
import math
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fastdiff.errors import FastdiffError, refuse_replacing, require_folder_path, script_main  # noqa: E402

UNET = dict(sample_size=32, in_channels=1, out_channels=1, block_out_channels=(64, 128, 128, 128), layers_per_block=2,
            down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"), attention_head_dim=8)
NUM_CLASSES = 10


def build(conditional: bool):
    from diffusers import DDPMScheduler, UNet2DModel

    unet = UNet2DModel(**UNET, num_class_embeds=NUM_CLASSES + 1 if conditional else None)
    scheduler = (DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction", clip_sample=False)
                 if conditional else DDPMScheduler(beta_schedule="linear", clip_sample=True))
    return unet, scheduler


def target(scheduler, x0, noise, t):
    if scheduler.config.prediction_type == "v_prediction":
        return scheduler.get_velocity(x0, noise, t)
    return noise


def train(args) -> Path:
    from fastdiff.training.data import load_fashion_mnist, to_model_range
    from fastdiff.machine import describe

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(args.seed)
    images, labels = load_fashion_mnist(args.data_path, "train")
    data = to_model_range(images, 32).to(device)
    labels = torch.from_numpy(labels).to(device)
    unet, scheduler = build(args.conditional)
    unet.to(device).train()
    ema = copy.deepcopy(unet).requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, fused=device.type == "cuda" or None)
    warm = lambda s: min(1.0, (s + 1) / args.warmup)  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warm)
    alphas = scheduler.alphas_cumprod.to(device)
    scheduler.alphas_cumprod = alphas  # get_velocity indexes it on the batch's device
    bf16 = device.type == "cuda"
    t0 = time.time()
    for step in range(args.steps):
        idx = torch.randint(len(data), (args.batch_size,), device=device)
        x0 = data[idx]
        flip = torch.rand(len(x0), device=device) < 0.5
        x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
        noise = torch.randn_like(x0)
        t = torch.randint(scheduler.config.num_train_timesteps, (len(x0),), device=device)
        xt = scheduler.add_noise(x0, noise, t)
        cond = {}
        if args.conditional:
            y = labels[idx]
            cond["class_labels"] = torch.where(torch.rand(len(y), device=device) < 0.1, NUM_CLASSES, y)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            pred = unet(xt, t, **cond).sample
        loss = torch.nn.functional.mse_loss(pred.float(), target(scheduler, x0, noise, t))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        with torch.no_grad():
            for e, p in zip(ema.parameters(), unet.parameters()):
                e.lerp_(p, 1 - args.ema)
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            print(f"step {step + 1}/{args.steps} loss {loss.item():.4f} ({time.time() - t0:.0f} s)", flush=True)
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.cpu()
    return save(ema.cpu().eval(), scheduler, Path(args.out), args, describe(device), time.time() - t0)


def save(unet, scheduler, out: Path, args, machine: str, seconds: float) -> Path:
    """Write the teacher folder atomically, with a README of how it was made."""
    from diffusers import DDPMPipeline

    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    if args.conditional:
        unet.save_pretrained(tmp / "unet", safe_serialization=True)
        scheduler.save_pretrained(tmp / "scheduler")
    else:
        DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp, safe_serialization=True)
    params = sum(p.numel() for p in unet.parameters()) / 1e6
    (tmp / "README.md").write_text(
        f"# Fashion-MNIST teacher (fastdiff eval/train_teacher.py)\n\n"
        f"- {'class-conditional (10 classes + null 10), v-prediction, squaredcos_cap_v2' if args.conditional else 'unconditional, epsilon, linear betas'}\n"
        f"- UNet2DModel, {params:.2f}M parameters; {args.steps} steps at batch {args.batch_size}, lr {args.lr}, "
        f"EMA {args.ema} (saved)\n- trained on {machine} in {seconds:.0f} s, seed {args.seed}\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


@script_main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="teacher folder to write")
    p.add_argument("--conditional", action="store_true", help="class-conditional v-prediction teacher")
    p.add_argument("--steps", type=int, default=5100)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--warmup", type=int, default=500)
    p.add_argument("--ema", type=float, default=0.9995)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--data-path", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--device", default=None)
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    args = p.parse_args()
    if min(args.steps, args.batch_size, args.warmup, args.log_every) <= 0:
        raise FastdiffError("--steps, --batch-size, --warmup and --log-every must be positive")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise FastdiffError(f"--lr must be a positive number, got {args.lr}")
    if not 0 <= args.ema < 1:
        raise FastdiffError(f"--ema must be in [0, 1), got {args.ema}")
    out = Path(args.out)  # checked before training, not replaced unasked after it
    require_folder_path(out, "--out")
    refuse_replacing(out, "--out", {"data": args.data_path})
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise FastdiffError(f"--out {out} is not empty; pass --overwrite to replace it")
    print(f"wrote {train(args)}")


if __name__ == "__main__":
    main()
