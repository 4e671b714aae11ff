"""``fastdiff``: distill, export and sample. User errors print one line and exit 2."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .errors import FastdiffError


def _device(name: str | None):
    import torch

    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def cmd_distill(args) -> None:
    from .config import load_config
    from .trainer import Trainer

    cfg = load_config(args.config, args.set or [])
    trainer = Trainer(cfg, resume=args.resume, overwrite=args.overwrite)
    out = trainer.fit()
    if out is not None:
        trainer.accelerator.print(f"student exported to {out}")


def cmd_export(args) -> None:
    from . import checkpoint as ckpt
    from .config import Config, _apply, _yaml
    from .trainer import Trainer

    run = Path(args.run_dir)
    config_file = run / "config.yaml"
    if not config_file.is_file():
        raise FastdiffError(f"{run} is not a fastdiff run folder (no config.yaml)")
    path = ckpt.find_checkpoint(run, args.checkpoint)
    cfg = Config()
    _apply(cfg, _yaml((path / "config.yaml").read_text()))
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise FastdiffError(f"--out {out} is not empty; pass --overwrite to replace it")
    cfg.output_dir = str(run)  # the run may have moved since it was trained
    trainer = Trainer(cfg, resume=path.name.split("-")[1])
    trainer.load(path.name.split("-")[1])  # exactly the checkpoint named, no fallback
    print(f"student exported to {trainer.export(out)}")


def cmd_sample(args) -> None:
    import torch

    from .export import read_student_info, student_generator
    from .sampling import sample_model, save_pngs
    from .teacher import load_teacher

    if args.num <= 0 or args.steps <= 0 or args.batch_size <= 0:
        raise FastdiffError("--num, --steps and --batch-size must be positive")
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise FastdiffError(f"--out {out} is not empty; pass --overwrite to write into it")
    from .embedded import resolve_teacher_path

    model_dir = resolve_teacher_path(args.model_dir)
    info = read_student_info(model_dir)
    loaded = load_teacher(model_dir)
    device = _device(args.device)
    loaded.model.to(device)
    model = student_generator(loaded, info) if info else loaded.denoiser
    guided = bool(getattr(loaded.model.config, "time_cond_proj_dim", None))
    if info and args.guidance_scale is not None and not guided:
        raise FastdiffError("--guidance-scale is for teachers and guidance-embedded students; "
                            "this student has its guidance distilled in")
    with torch.no_grad():
        for start, images in sample_model(model, loaded.sample_shape, args.num, args.steps, args.seed,
                                          args.batch_size, loaded.num_classes, device, args.guidance_scale):
            save_pngs(images, out, start)
    kind = f"{info['num_steps']}-step student" if info else "teacher (DDIM)"
    print(f"wrote {args.num} images from the {kind} at {args.steps} step(s) to {out}")


def cmd_bench(args) -> None:
    from . import bench_gmm

    objectives = [o.strip() for o in args.objectives.split(",") if o.strip()]
    if objectives == ["all"]:
        objectives = list(bench_gmm.SETTINGS)
    if args.json and not Path(args.json).resolve().parent.is_dir():
        raise FastdiffError(f"--json {args.json}: folder {Path(args.json).parent} does not exist")
    result = bench_gmm.run(objectives, args.steps, args.num_eval, args.seed, overrides=args.set or [])
    print(bench_gmm.table(result))
    if args.json:
        bench_gmm.write_json(result, args.json)
        print(f"wrote {args.json}")


def build_parser() -> argparse.ArgumentParser:
    from .config import named_configs

    p = argparse.ArgumentParser(prog="fastdiff", description="Distill a diffusers teacher into a one- or few-step student.")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("distill", help="train a student from a teacher",
                       description="Train a student. Configuration: a YAML file or a named config, then --set overrides.")
    d.add_argument("--config", help=f"YAML file or named config ({', '.join(named_configs())})")
    d.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.max_steps=100 (repeatable)")
    d.add_argument("--resume", metavar="latest|STEP", help="continue the run in output_dir from a checkpoint")
    d.add_argument("--overwrite", action="store_true", help="replace a non-empty output_dir")
    d.set_defaults(func=cmd_distill)

    e = sub.add_parser("export", help="export a run's checkpoint as a diffusers folder")
    e.add_argument("run_dir", help="the run folder (output_dir of fastdiff distill)")
    e.add_argument("--out", required=True, help="folder to write the diffusers student into")
    e.add_argument("--checkpoint", default="latest", help="'latest' or a step number (default: latest)")
    e.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    e.set_defaults(func=cmd_export)

    s = sub.add_parser("sample", help="write PNG samples from a student or a teacher folder")
    s.add_argument("model_dir", help="an exported student, or a teacher folder (diffusers layout)")
    s.add_argument("--num", type=int, required=True, help="number of images")
    s.add_argument("--steps", type=int, required=True, help="sampling steps (students: K-step sampler; teachers: DDIM)")
    s.add_argument("--out", required=True, help="folder for the PNG files")
    s.add_argument("--seed", type=int, default=0, help="noise seed; batch b uses seed + b (default 0)")
    s.add_argument("--batch-size", type=int, default=64, help="images per batch (default 64)")
    s.add_argument("--guidance-scale", type=float, default=None, help="teachers only: classifier-free guidance scale")
    s.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    s.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    s.set_defaults(func=cmd_sample)

    b = sub.add_parser("bench", help="benchmarks (gmm: every objective against the analytic teacher)")
    b.add_argument("suite", choices=["gmm"], help="gmm: one-step students vs an exact Gaussian mixture, on the CPU")
    b.add_argument("--objectives", default="dmd2,sid,sida,sim,vsd", help="comma-separated, or all (default: the five distribution-matching ones; "
                   "cd and scm are scored at 1, 2 and 4 steps)")
    b.add_argument("--steps", type=int, default=None, help="generator updates per objective (default: each its own)")
    b.add_argument("--num-eval", type=int, default=5000, help="samples scored per row (default 5000)")
    b.add_argument("--seed", type=int, default=0, help="seed for the teacher's samples, noise and training")
    b.add_argument("--json", default=None, help="also write the rows to this JSON file")
    b.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="config override for every objective run, e.g. --set objective.alpha=0.5 (repeatable)")
    b.set_defaults(func=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except FastdiffError as exc:
        print(f"fastdiff: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fastdiff: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
