"""Peak memory of one DMD2 / SiD training step for an SD1.5-shaped UNet (random weights), with and without a
LoRA fake score (sharing the teacher's weights) and gradient checkpointing.

Each row runs in a fresh process: it builds a text-to-image teacher folder (the SD1.5 UNet config, scaled by
--width, a small VAE and a CLIP text encoder of SD1.5's width), starts fastdiff's Trainer on it and runs two
training steps (the first allocates the optimizer states). On a GPU the figure is
``torch.cuda.max_memory_allocated``; on the CPU it is the process's peak resident memory (VmHWM), which
also counts the Python runtime and libraries, so compare rows rather than read absolute numbers there.

    python eval/memory.py --out eval/results/memory-cpu                    # CPU: width 0.2, latent 32
    python eval/memory.py --width 1 --latent 64 --batch-size 4 --out eval/results/memory-h100  # on a GPU

``--processes 2`` measures the FSDP rows instead: DMD2 and SiD (full fake score), and DMD2 with a LoRA student
and a LoRA fake score (rank 16 at width 0.2: the adapters' share of rank 64 at full width; on the shared base), on
2 processes, replicated (``train.sharding none``) against sharded (``fsdp``), launched with ``accelerate launch``
(gloo on the CPU); ``--networks full``, ``lora`` or ``copies`` (cd, meanflow) runs only those rows. The figure per
row is the largest over the processes of the peak during the two steps: VmHWM reset after setup
(``/proc/self/clear_refs``, after ``malloc_trim`` returns freed pages); the setup peak is shown too (under fsdp
the teacher loads straight into shards, the student and fake score are made from its shards; the VAE and text
encoder load whole).

    python eval/memory.py --processes 2 --out eval/results/memory-fsdp-cpu       # CPU: width 0.2, latent 32
    python eval/memory.py --processes 2 --networks lora --out eval/results/memory-fsdp-lora-cpu
    python eval/memory.py --processes 2 --networks copies --out eval/results/memory-fsdp-copies-cpu

``--sd15-gpu`` is the GPU row of issue 19 in one command: the full SD1.5 shape (width 1, latent 64) at batch 4 on
one GPU, DMD2 with a full fake score (gradient checkpointing off and on) and SiD; a row after the first starts only
within ``--time-budget`` seconds, and the table is written after every row (eval/gpu_round.sh runs it with
MEMORY_ROW=1):

    python eval/memory.py --sd15-gpu --out eval/results/memory-sd15-h200
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from fastdiff.errors import FastdiffError, require_folder_path, script_main

ROWS = [(obj, fake, ckpt) for obj in ("dmd2", "sid") for fake in (0, 64) for ckpt in (False, True)]
# (objective, student LoRA rank, fake score LoRA rank, sharding): full networks, then LoRA ones on the shared base
FSDP_ROWS = [(obj, lora, lora, sharding) for obj, lora in (("dmd2", 0), ("sid", 0), ("dmd2", 16))
             for sharding in ("none", "fsdp")]
# objectives that keep a copy of the student (cd's EMA target) or add a layer to it (meanflow's flow-map embedding):
# under fsdp both are set up from the teacher's shards too (sharding.Shards.copy_of); no fake score
COPY_ROWS = [(obj, 0, 0, sharding) for obj in ("cd", "meanflow") for sharding in ("none", "fsdp")]
NETWORKS = {"dmd2": "full student + full fake", "sid": "full student + full fake",
            "cd": "full student + EMA target", "meanflow": "full student + flow-map embedding"}
SD15_GPU_ROWS = [("dmd2", 0, False), ("dmd2", 0, True), ("sid", 0, False)]  # --sd15-gpu


def sd15_unet_config(width: float, latent: int) -> dict:
    """SD1.5's UNet2DConditionModel config with channel widths scaled (multiples of 32 for its GroupNorms)."""
    channels = [max(32, int(round(c * width / 32)) * 32) for c in (320, 640, 1280, 1280)]
    return dict(sample_size=latent, in_channels=4, out_channels=4, block_out_channels=channels, layers_per_block=2,
                down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, cross_attention_dim=768,
                attention_head_dim=8, norm_num_groups=32)


def build_teacher(path: Path, width: float, latent: int) -> int:
    """Write the teacher pipeline folder; returns the UNet's parameter count."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tiny_pipelines import tokenizer  # a local character-level CLIP tokenizer (no hub)

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**sd15_unet_config(width, latent))
    text = CLIPTextModel(CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=768,
                                        intermediate_size=3072, num_attention_heads=12, num_hidden_layers=1,
                                        vocab_size=514, max_position_embeddings=77))
    vae = AutoencoderKL(block_out_channels=(8, 16), latent_channels=4, norm_num_groups=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                          steps_offset=1)
    StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text, tokenizer=tokenizer(77), scheduler=sched,
                            safety_checker=None, feature_extractor=None, requires_safety_checker=False
                            ).save_pretrained(path)
    return sum(p.numel() for p in unet.parameters())


def peak_rss_mb(field: str = "VmHWM") -> float:
    """The process's peak resident memory (VmHWM), or its current one (field VmRSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak_rss() -> bool:
    """Start VmHWM again from the current resident size (Linux: 5 > /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def run_row(args) -> dict:
    """One configuration, in this process: build the trainer, two steps, report memory and time."""
    import torch

    from fastdiff.config import load_config
    from fastdiff.training import Trainer

    prompts = Path(args.teacher).parent / "prompts.txt"
    prompts.write_text("a photo of a cat\na watercolor of a lighthouse\n")
    cuda = torch.cuda.is_available()
    libraries = peak_rss_mb("VmRSS")  # the process before any network: Python, torch, diffusers
    cfg = load_config(None, [
        f"teacher.path={args.teacher}", f"data.prompts={prompts}", f"output_dir={args.run_dir}",
        f"objective.name={args.objective}",
        *([f"objective.fake_lora_rank={args.fake_lora}", "objective.critic_updates=1"]
          if args.objective in ("dmd2", "sid") else  # cd and meanflow train no fake score, and learn from samples:
          ["data.name=teacher", "data.teacher_sampler=ddim", "data.teacher_steps=2"]),  # the teacher's (2 DDIM steps)
        f"student.lora_rank={args.student_lora}",
        f"train.gradient_checkpointing={str(args.checkpointing).lower()}", f"train.batch_size={args.batch_size}",
        f"train.mixed_precision={'bf16' if cuda else 'no'}", f"teacher.dtype={'bfloat16' if cuda else 'float32'}",
        "train.ema_decay=0", "train.max_steps=2", "train.checkpoint_every=1000", "train.sample_every=1000",
        f"train.sharding={args.sharding}", "train.report_to=none"])
    trainer = Trainer(cfg, overwrite=True, progress=False)
    if cuda:
        torch.cuda.synchronize()
        base = held = torch.cuda.memory_allocated() / 2**20
        torch.cuda.reset_peak_memory_stats()
    else:
        base = held = peak_rss_mb()
        if args.sharding != "none" or args.processes > 1:  # the steps' own peak (setup builds networks whole):
            import ctypes  # hand the pages freed by sharding back to the system, then restart the high-water mark

            ctypes.CDLL("libc.so.6").malloc_trim(0)
            held = peak_rss_mb("VmRSS")  # what setup left: the (sharded) networks, the text encoder, libraries
            reset_peak_rss()
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        trainer.train_step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else peak_rss_mb()
    return {"objective": args.objective, "fake_lora_rank": args.fake_lora, "student_lora_rank": args.student_lora,
            "sharding": args.sharding,
            "process": trainer.accelerator.process_index, "libraries_mb": round(libraries, 1), "gradient_checkpointing": args.checkpointing,
            "after_setup_mb": round(base, 1), "held_after_setup_mb": round(held, 1), "peak_mb": round(peak, 1),
            "step_seconds": round(times[-1], 3),
            "trainable_parameters": sum(p.numel() for p in trainer.opt_g.params + (trainer.opt_c.params if trainer.opt_c else []))}


@script_main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=float, default=None,
                   help="channel width relative to SD1.5 (1 = the real shape; default 0.2, --sd15-gpu 1)")
    p.add_argument("--latent", type=int, default=None,
                   help="latent size (SD1.5 at 512 px: 64; default 32, --sd15-gpu 64)")
    p.add_argument("--batch-size", type=int, default=None, help="default 1, --sd15-gpu 4")
    p.add_argument("--out", default=None, help="folder for table.md and results.json")
    p.add_argument("--work", default="/tmp/fastdiff-memory", help="scratch folder (teacher, runs)")
    p.add_argument("--processes", type=int, default=1, help="2: the FSDP rows (replicated vs sharded)")
    p.add_argument("--networks", choices=("all", "full", "lora", "copies"), default="all",
                   help="FSDP rows: full networks, LoRA ones on the shared base, cd / meanflow (a target copy, an "
                        "added layer), or all")
    p.add_argument("--sd15-gpu", action="store_true",
                   help="issue 19's GPU row: width 1, latent 64, batch 4 (unless given), DMD2 (checkpointing off / on) "
                        "and SiD")
    p.add_argument("--time-budget", type=float, default=None, help="seconds: start no row after this")
    # objective fake_lora checkpointing sharding [student_lora]
    p.add_argument("--row", nargs="+", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    shape = (1.0, 64, 4) if args.sd15_gpu else (0.2, 32, 1)  # a shape given on the command line wins (smoke tests)
    args.width, args.latent, args.batch_size = (given if given is not None else default for given, default in
                                                zip((args.width, args.latent, args.batch_size), shape))
    if not (args.width > 0 and args.latent > 0 and args.batch_size > 0 and args.processes >= 1):
        raise FastdiffError("--width, --latent and --batch-size must be positive and --processes at least 1")
    if args.out:  # a file here was found only after every row
        require_folder_path(args.out, "--out")
    work = Path(args.work)
    args.teacher = str(work / "teacher")
    if args.row:  # child process: one configuration, one JSON line
        args.objective, args.fake_lora, args.checkpointing = args.row[0], int(args.row[1]), args.row[2] == "1"
        args.sharding = args.row[3]
        args.student_lora = int(args.row[4]) if len(args.row) > 4 else 0
        args.run_dir = str(work / f"run-{'-'.join(args.row)}-p{args.processes}")
        # one write per line (atomic on a pipe below 4 KiB): print's separate newline let 2 processes' lines merge
        sys.stdout.write("ROW " + json.dumps(run_row(args)) + "\n")
        sys.stdout.flush()
        return
    if args.processes > 1:
        return fsdp_rows(args, work)

    work.mkdir(parents=True, exist_ok=True)
    params = build_teacher(work / "teacher", args.width, args.latent)
    rows, start = [], time.time()
    for obj, fake, ckpt in SD15_GPU_ROWS if args.sd15_gpu else ROWS:
        if rows and args.time_budget is not None and time.time() - start > args.time_budget:
            print(f"--time-budget {args.time_budget:.0f} s reached: rows from {obj} fake_lora={fake} on not run")
            break
        cmd = [sys.executable, __file__, "--width", str(args.width), "--latent", str(args.latent), "--batch-size",
               str(args.batch_size), "--work", str(work), "--row", obj, str(fake), "1" if ckpt else "0", "none"]
        res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        line = next((ln for ln in res.stdout.splitlines() if ln.startswith("ROW ")), None)
        if line is None:
            raise SystemExit(f"row {obj} fake_lora={fake} checkpointing={ckpt} failed:\n{res.stderr[-2000:]}")
        rows.append(json.loads(line[4:]))
        print(rows[-1], flush=True)
        single_rows_table(args, params, rows)  # after every row: a run stopped at a time limit keeps what it measured


def single_rows_table(args, params: int, rows: list[dict]) -> None:
    from fastdiff.machine import describe

    import torch

    cuda = torch.cuda.is_available()  # where the rows ran (each child measures on CUDA when it is there)
    machine = describe("cuda" if cuda else "cpu")
    unit = "GPU max_memory_allocated" if cuda else "process VmHWM"
    lines = [f"# Peak memory of one training step, SD1.5-shaped UNet ({params / 1e6:.0f}M parameters, width "
             f"{args.width}, latent {args.latent}, batch {args.batch_size})", "", f"machine: {machine}", "",
             f"memory: {unit}", "",
             "| objective | fake score | checkpointing | after setup MB | peak MB | step s | trainable params |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        fake = f"LoRA r{r['fake_lora_rank']} (shared base)" if r["fake_lora_rank"] else "full copy"
        lines.append(f"| {r['objective']} | {fake} | {'on' if r['gradient_checkpointing'] else 'off'} | "
                     f"{r['after_setup_mb']:.0f} | {r['peak_mb']:.0f} | {r['step_seconds']:.2f} | "
                     f"{r['trainable_parameters'] / 1e6:.1f}M |")
    write_table(args, lines, {"unet_parameters": params, "width": args.width, "latent": args.latent,
                              "batch_size": args.batch_size, "machine": machine, "rows": rows})


def write_table(args, lines: list[str], result: dict) -> None:
    """Print the table; with --out, write it (table.md) and the rows (results.json)."""
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "table.md").write_text(table)
        (out / "results.json").write_text(json.dumps(result, indent=2, default=str))


def fsdp_rows(args, work: Path) -> None:
    """Replicated vs FSDP-sharded rows on ``args.processes`` processes (one launch per row); per row, the largest
    peak over the processes."""
    import torch

    from fastdiff.machine import describe

    work.mkdir(parents=True, exist_ok=True)
    params = build_teacher(work / "teacher", args.width, args.latent)
    cuda = torch.cuda.is_available()
    # CPU: a fixed mmap threshold, so freed tensors leave the resident set at once (glibc's adaptive threshold keeps
    # them in its heap, and the high-water mark then counts allocator slack rather than what the run holds)
    cpu_env = {"ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **({} if cuda else cpu_env)}
    rows = []
    chosen = {"all": FSDP_ROWS + COPY_ROWS, "full": [r for r in FSDP_ROWS if not r[1]],
              "lora": [r for r in FSDP_ROWS if r[1]], "copies": COPY_ROWS}[args.networks]
    for obj, student_lora, fake_lora, sharding in chosen:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(args.processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", __file__, "--width",
               str(args.width), "--latent", str(args.latent), "--batch-size", str(args.batch_size), "--work", str(work),
               "--processes", str(args.processes), "--row", obj, str(fake_lora), "0", sharding, str(student_lora)]
        res = subprocess.run(cmd, capture_output=True, text=True, env=env)
        found = [json.loads(ln[4:]) for ln in res.stdout.splitlines() if ln.startswith("ROW ")]
        if len(found) != args.processes:
            raise SystemExit(f"row {obj} lora={student_lora} sharding={sharding} failed:\n{res.stderr[-2000:]}")
        rows.append({**max(found, key=lambda r: r["peak_mb"]), "setup_mb": max(r["after_setup_mb"] for r in found)})
        print(rows[-1], flush=True)
    unit = "GPU max_memory_allocated" if cuda else "process VmHWM (the steps' peak: reset after setup)"
    machine = describe("cuda" if cuda else "cpu")
    lines = [f"# Peak memory per process, {args.processes} processes, SD1.5-shaped UNet ({params / 1e6:.0f}M "
             f"parameters, width {args.width}, latent {args.latent}, batch {args.batch_size} per process)", "",
             f"machine: {machine}", "", f"memory: {unit}, the largest over the processes", "",
             "above libraries: the peak minus the process's resident memory before any network was built (Python, "
             "torch, diffusers; CPU only)", "",
             "held after setup: the resident memory when the steps start (CPU: after malloc_trim; what the networks, "
             "the text encoder and the libraries hold)", "",
             "| objective | networks | sharding | setup peak MB | held after setup MB | step peak MB | vs replicated "
             "| above libraries MB | vs replicated | step s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        base = next(b for b in rows if b["objective"] == r["objective"] and b["sharding"] == "none"
                    and b["student_lora_rank"] == r["student_lora_rank"])
        nets = (f"LoRA r{r['student_lora_rank']} student + LoRA r{r['fake_lora_rank']} fake (shared base)"
                if r["student_lora_rank"] else NETWORKS[r["objective"]])
        own, base_own = r["peak_mb"] - r["libraries_mb"], base["peak_mb"] - base["libraries_mb"]
        lines.append(f"| {r['objective']} | {nets} | {r['sharding']} | {r['setup_mb']:.0f} | "
                     f"{r['held_after_setup_mb']:.0f} | {r['peak_mb']:.0f} | "
                     f"{100 * (r['peak_mb'] / base['peak_mb'] - 1):+.0f}% | {own:.0f} | {100 * (own / base_own - 1):+.0f}% | "
                     f"{r['step_seconds']:.2f} |")
    write_table(args, lines, {"unet_parameters": params, "width": args.width, "latent": args.latent,
                              "batch_size": args.batch_size, "processes": args.processes, "machine": machine,
                              "rows": rows})


if __name__ == "__main__":
    main()
