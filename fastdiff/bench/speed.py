"""``fastdiff bench speed``: training-step and one-step-sampling throughput, FLOPs, MFU and peak memory.

For each objective the same step runs twice in one process:

- **naive**: the loop a user writes first: fp32 networks, bf16 autocast on GPUs, eager, the models' default
  attention, foreach AdamW, ``loss.item()`` every step;
- **fastdiff**: ``Trainer.train_step`` with the fast settings (bf16 autocast and bf16 frozen networks on GPUs,
  ``torch.compile``, channels-last, the attention backend ``auto`` picks, fused AdamW, no host sync).

FLOPs per step are counted once with ``torch.utils.flop_counter`` (the same for both), MFU is achieved FLOP/s
over a matmul peak measured here (bf16 on GPUs, fp32 on CPUs), and the sampling rows time the one-step
generator eager and compiled (CUDA graphs on GPUs) at each batch size.

``ablate`` adds, per objective, fastdiff's step with each attention backend that runs here (SDPA, and xformers where
its kernels run) eager and compiled (compiled on GPUs only), each as a ratio to the same naive step, and records
whether ``auto`` picked the backend measured faster with fastdiff's own compile setting (ablation rows run after
the sampling rows: they are the longest part, three trainers per objective on a GPU, fastdiff's own setting being
the training row's timing again). ``time_budget`` (seconds)
stops starting new rows once spent: the rows not run are listed in ``skipped``, and ``on_row`` receives the partial
result after every row, so a run cut short still leaves its table. ``profile`` adds where each fastdiff step's
time goes (``bench.profile``); each row records its own wall time, compiling included.
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch

from ..errors import FastdiffError
from .profile import profile_step, profile_table

# google/ddpm-cifar10-32's unet/config.json, every key that shapes the network or its numerics. Its
# "attention_head_dim": null makes each attention one head over all channels (1 x 256 at 16x16); UNet2DModel's own
# default (8) would cut the same layers into 32 heads of 8 channels, a shape that tensor-core attention kernels
# run far below their speed, so leaving it out skews the attention rows of the speed table.
CIFAR_UNET = dict(sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
                  block_out_channels=(128, 256, 256, 256),
                  down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                  attention_head_dim=None, norm_eps=1e-6, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1)


def synthetic_teacher(name: str, folder: Path) -> str:
    """``synthetic:ddpm-cifar``: google/ddpm-cifar10-32's UNet shape (35.7M parameters), random weights."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    if name != "ddpm-cifar":
        raise FastdiffError(f"unknown synthetic teacher {name!r}; known: ddpm-cifar")
    torch.manual_seed(0)
    DDPMPipeline(unet=UNet2DModel(**CIFAR_UNET), scheduler=DDPMScheduler()).save_pretrained(folder)
    return str(folder)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device) -> tuple[float, str]:
    """Best FLOP/s of square matmuls: bf16 n=8192 on GPUs, fp32 n=1024 on CPUs."""
    cuda = device.type == "cuda"
    n, dtype = (8192, torch.bfloat16) if cuda else (1024, torch.float32)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    best = float("inf")
    for _ in range(3 if cuda else 2):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(10 if cuda else 3):
            a @ b
        sync(device)
        best = min(best, (time.perf_counter() - t0) / (10 if cuda else 3))
    return 2 * n**3 / best, f"{'bf16' if cuda else 'fp32'} {n}x{n} matmul"


def timed(fn, device, steps: int, warmup: int) -> float:
    """Median seconds per call after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def peak_memory(device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def reset_memory(device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def count_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def make_trainer(teacher: str, objective: str, batch: int, fast: bool, device, overrides: list[str], out: str):
    from ..config import load_config
    from ..training import Trainer

    cuda = device.type == "cuda"
    settings = [f"teacher.path={teacher}", f"objective.name={objective}", f"train.batch_size={batch}",
                f"output_dir={out}", "train.ema_decay=0.999", "train.max_steps=1000000",
                f"train.mixed_precision={'bf16' if cuda else 'no'}"]
    if fast:
        on_gpu = str(cuda).lower()
        settings += ["train.attention=auto", f"train.compile={on_gpu}", f"train.channels_last={on_gpu}",
                     f"train.cudnn_benchmark={on_gpu}", f"teacher.dtype={'bfloat16' if cuda else 'float32'}"]
    else:
        settings += ["train.attention=sdpa"]
    cfg = load_config(None, settings + list(overrides))
    torch.backends.cudnn.benchmark = False  # a global flag: an earlier fast trainer must not speed up a naive one
    # A fresh dynamo cache per trainer: every row compiles the same diffusers forward for new modules (and dtypes),
    # and past dynamo's recompile limit (8) later rows would silently run eager (seen on the H200 with --ablate).
    torch._dynamo.reset()
    return Trainer(cfg, overwrite=True, progress=False)


def naive_step(trainer, opts: dict):
    """One update of the objective the plain way (what ``Trainer.train_step`` replaces): eager, foreach AdamW,
    the same clipping and EMA, the loss read back every step."""
    obj, gen, acc = trainer.objective, trainer.generator, trainer.accelerator
    n = trainer.cfg.train.batch_size
    critic = trainer.opt_c.params if trainer.opt_c else []
    for p in critic:
        p.requires_grad_(True)
    for _ in range(obj.critic_updates_now()):  # as Trainer.train_step (rCM runs none in its warm-up)
        z, cond = trainer._inputs(n)
        with acc.autocast():
            with torch.no_grad():
                x = gen.training_sample(z, cond)
            loss, _ = obj.critic_loss(x, cond, trainer._real(n))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(critic, trainer.opt_c.clip)  # the run's clip (inf: none)
        opts["critic"].step()
        opts["critic"].zero_grad(set_to_none=True)
        float(loss.detach())
    for p in critic:
        p.requires_grad_(False)
    z, cond = trainer._inputs(n)
    with acc.autocast():
        loss, _ = obj.generator_loss(gen.training_sample(z, cond), cond, None)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trainer.opt_g.params, trainer.opt_g.clip)
    opts["generator"].step()
    opts["generator"].zero_grad(set_to_none=True)
    with torch.no_grad():
        for e, p in trainer._ema_pairs:
            e.lerp_(p, 1 - trainer.cfg.train.ema_decay)
    return float(loss.detach())


class Budget:
    """Seconds left for starting rows (None: no limit)."""

    def __init__(self, seconds: float | None):
        self.end = None if seconds is None else time.monotonic() + seconds

    def spent(self) -> bool:
        return self.end is not None and time.monotonic() > self.end


def ablation_settings(device) -> list[tuple[str, bool]]:
    """(attention, compile) pairs to time: SDPA and, where its kernels run, xformers; compiled on GPUs only (on a CPU
    compiling the step takes longer than any timing it would change)."""
    from ..models.attention import xformers_status

    backends = ["sdpa"] + (["xformers"] if xformers_status()[0] else [])
    compiles = [False, True] if device.type == "cuda" else [False]
    return [(a, c) for a in backends for c in compiles]


def ablation_rows(teacher: str, name: str, batch: int, steps: int, warmup: int, device, overrides: list[str],
                  t_naive: float, budget: Budget, skipped: list, tmp: str, main: dict | None = None) -> list[dict]:
    """fastdiff's step per (attention, compile) setting. ``main``: the training row of the same objective and batch;
    the setting fastdiff's own step ran with is that row's timing again, not a second trainer (on a GPU a compiled
    trainer costs the bench most of a minute, and the 2-minute bench cannot spare one per objective)."""
    rows = []
    for attention, compiled in ablation_settings(device):
        label = f"{name} {attention} {'compiled' if compiled else 'eager'}"
        if main and (main["attention"], main["compile"]) == (attention, compiled):
            t = main["fast_seconds"]
            rows.append({"objective": name, "attention": attention, "compile": compiled, "seconds": t,
                         "images_per_second": batch / t, "speedup": t_naive / t, "same_as": "fastdiff's step above"})
            continue
        if budget.spent():
            skipped.append(label)
            continue
        start = time.monotonic()
        trainer = make_trainer(teacher, name, batch, True, device, overrides + [f"train.attention={attention}",
                               f"train.compile={str(compiled).lower()}"], f"{tmp}/{attention}-{compiled}")
        t = timed(trainer.train_step, device, steps, warmup + (2 if compiled else 0))
        del trainer
        rows.append({"objective": name, "attention": attention, "compile": compiled, "seconds": t,
                     "images_per_second": batch / t, "speedup": t_naive / t,
                     "wall_seconds": time.monotonic() - start})  # what the row cost the bench, compiling included
    return rows


def auto_check(fast_attention: str, ablation: list[dict], compiled: bool = False) -> dict | None:
    """Which backend ``auto`` chose against the one measured fastest with the same compile setting as fastdiff's
    step (``auto`` decides by it); None when only one backend ran that way."""
    same = {r["attention"]: r["seconds"] for r in ablation if r["compile"] == compiled}
    if len(same) < 2:
        return None
    fastest = min(same, key=same.get)
    return {"auto": fast_attention, "fastest": fastest, "compiled": compiled,
            "agrees": fast_attention.split(",")[0].strip() == fastest}


def training_rows(teacher: str, objectives: list[str], batches: list[int], steps: int, warmup: int, device,
                  peak: float, overrides: list[str], progress: bool = False, budget: Budget | None = None,
                  skipped: list | None = None, on_row=None, profile: bool = False) -> list[dict]:
    """A row per (batch, objective), batches outermost: the first batch's rows for every objective come first."""
    from ..machine import progress as progress_bar

    budget, skipped = budget or Budget(None), skipped if skipped is not None else []
    rows = []
    pairs = [(batch, name) for batch in batches for name in objectives]
    for batch, name in progress_bar(pairs, desc="bench speed: training", unit="row", enabled=progress):
        if budget.spent():
            skipped.append(name if len(batches) == 1 else f"{name} batch {batch}")
            continue
        start = time.monotonic()
        with tempfile.TemporaryDirectory() as tmp:
            naive = make_trainer(teacher, name, batch, False, device, overrides, f"{tmp}/naive")
            lr = naive.cfg.train
            opts = {"generator": torch.optim.AdamW(naive.opt_g.params, lr=lr.lr_generator, foreach=True),
                    "critic": torch.optim.AdamW(naive.opt_c.params if naive.opt_c else
                                                [torch.nn.Parameter(torch.zeros(1, device=device))],
                                                lr=lr.lr_critic, foreach=True)}
            flops = count_flops(naive.train_step)
            reset_memory(device)
            t_naive = timed(lambda n=naive: naive_step(n, opts), device, steps, warmup)  # bound now: deleted below
            mem_naive = peak_memory(device)
            del naive
            fast = make_trainer(teacher, name, batch, True, device, overrides, f"{tmp}/fast")
            reset_memory(device)
            t_fast = timed(fast.train_step, device, steps, warmup + (2 if device.type == "cuda" else 0))
            mem_fast = peak_memory(device)
            attention, compiled = fast.attention, fast.cfg.train.compile
            prof = profile_step(fast.train_step, device) if profile else None
            del fast
        row = {"objective": name, "batch_size": batch, "flops_per_step": flops,
               "naive_seconds": t_naive, "fast_seconds": t_fast,
               "naive_images_per_second": batch / t_naive, "fast_images_per_second": batch / t_fast,
               "speedup": t_naive / t_fast, "naive_mfu": flops / t_naive / peak, "fast_mfu": flops / t_fast / peak,
               "naive_peak_mb": mem_naive, "fast_peak_mb": mem_fast, "attention": attention, "compile": compiled,
               "wall_seconds": time.monotonic() - start}
        if prof:
            row["profile"] = prof
        rows.append(row)
        if on_row:
            on_row(rows)
    return rows


def sampling_rows(teacher: str, batches: list[int], steps: int, warmup: int, device, peak: float,
                  compile_sampler: bool = True, progress: bool = False, budget: Budget | None = None,
                  skipped: list | None = None, on_row=None) -> list[dict]:
    """One-step sampling of a student-shaped generator (the teacher's network at sigma_init 2.5)."""
    from ..machine import progress as progress_bar
    from ..models.generator import Generator
    from ..models.teacher import load_teacher

    cuda = device.type == "cuda"
    loaded = load_teacher(teacher, dtype=torch.bfloat16 if cuda else torch.float32)
    model = loaded.model.to(device)
    if cuda:
        model.to(memory_format=torch.channels_last)
    # fixed shapes, so cuDNN's per-shape algorithm search pays off (as fastdiff's training step has it); set here,
    # not left to whichever trainer ran last, so eager and compiled rows run the same convolutions
    torch.backends.cudnn.benchmark = cuda
    gen = Generator(loaded.denoiser, 1, 2.5).to(device)
    rows = []
    budget, skipped = budget or Budget(None), skipped if skipped is not None else []
    for batch in progress_bar(batches, desc="bench speed: sampling", unit="batch size", enabled=progress):
        if budget.spent():
            skipped.append(f"sampling batch {batch}")
            continue
        start = time.monotonic()
        z = torch.randn((batch, *loaded.sample_shape), device=device)
        cond = {"class_labels": torch.arange(batch, device=device) % loaded.num_classes} if loaded.num_classes else None

        def eager():
            with torch.no_grad():
                return gen(z, cond)
        flops = count_flops(eager)
        t_eager = timed(eager, device, steps, warmup)
        row = {"batch_size": batch, "eager_images_per_second": batch / t_eager, "flops_per_image": flops / batch,
               "eager_mfu": flops / t_eager / peak}
        if compile_sampler:  # CUDA graphs on GPUs ("reduce-overhead"): batch 1 is launch-bound without them
            torch._dynamo.reset()  # the training rows' compiles must not count toward this one's recompile limit
            compiled_gen = torch.compile(gen, mode="reduce-overhead" if cuda else None, dynamic=False)

            def compiled():
                with torch.no_grad():
                    return compiled_gen(z, cond).clone()
            t_compiled = timed(compiled, device, steps, warmup + 3)
            row.update(compiled_images_per_second=batch / t_compiled, speedup=t_eager / t_compiled,
                       compiled_mfu=flops / t_compiled / peak)
        row["wall_seconds"] = time.monotonic() - start
        rows.append(row)
        if on_row:
            on_row(rows)
    return rows


def run(teacher: str, objectives: list[str], batch: int | list[int], sample_batches: list[int], steps: int,
        warmup: int, device: torch.device, overrides: list[str], compile_sampler: bool = True, progress: bool = False,
        ablate: bool = False, time_budget: float | None = None, on_partial=None, profile: bool = False) -> dict:
    """The bench; ``on_partial(result)`` after every row (a run stopped by ``time_budget`` or killed keeps them).
    ``batch``: one training batch or several (a row each; the ablation runs at the first); ``profile``: record
    where each fastdiff step's time goes (``bench.profile``)."""
    batches = [batch] if isinstance(batch, int) else list(batch)
    from ..models.embedded import resolve_teacher_path
    from ..machine import describe, today, versions

    budget = Budget(time_budget)
    result = {"device": describe(device), "versions": versions(), "date": today(), "training": [], "sampling": [],
              "skipped": [], "time_budget_seconds": time_budget}

    def saw(key):
        def update(rows):
            result[key] = list(rows)
            if on_partial:
                on_partial(result)
        return update

    with tempfile.TemporaryDirectory() as tmp:
        if teacher.startswith("synthetic:"):
            teacher = synthetic_teacher(teacher.split(":", 1)[1], Path(tmp) / "teacher")
        else:
            teacher = resolve_teacher_path(teacher)
        peak, peak_how = matmul_peak(device)
        result.update(matmul_peak_flops=peak, matmul_peak=peak_how)
        training_rows(teacher, objectives, batches, steps, warmup, device, peak, overrides, progress, budget,
                      result["skipped"], saw("training"), profile)
        sampling_rows(teacher, sample_batches, steps, warmup, device, peak, compile_sampler, progress, budget,
                      result["skipped"], saw("sampling"))
        # Last: the ablation is the longest part (three more compiled trainers per objective on a GPU, the fourth
        # setting being fastdiff's own step) and the least needed
        for row in [r for r in result["training"] if r["batch_size"] == batches[0]] if ablate else []:
            row["ablation"] = ablation_rows(teacher, row["objective"], batches[0], steps, warmup, device,
                                            list(overrides), row["naive_seconds"], budget, result["skipped"],
                                            f"{tmp}/ablation", main=row)
            row["auto_check"] = auto_check(row["attention"], row["ablation"], compiled=device.type == "cuda")
            saw("training")(result["training"])
    return result


def table(result: dict) -> str:
    lines = [f"# fastdiff bench speed: {result['device']}", "",
             f"{result['date']}, " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()) +
             f"; MFU against {result['matmul_peak_flops'] / 1e12:.1f} TFLOP/s ({result['matmul_peak']}, measured)", "",
             "| objective | batch | GFLOP/step | naive img/s | fastdiff img/s | ratio | naive MFU | fastdiff MFU | "
             "naive peak MB | fastdiff peak MB | attention |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    mb = lambda v: "n/a" if v is None else f"{v:.0f}"  # noqa: E731 - CPU runs have no allocator peak
    for r in result["training"]:
        lines.append(f"| {r['objective']} | {r['batch_size']} | {r['flops_per_step'] / 1e9:.1f} | "
                     f"{r['naive_images_per_second']:.1f} | {r['fast_images_per_second']:.1f} | {r['speedup']:.2f}x | "
                     f"{100 * r['naive_mfu']:.1f}% | {100 * r['fast_mfu']:.1f}% | {mb(r['naive_peak_mb'])} | "
                     f"{mb(r['fast_peak_mb'])} | {r['attention']} |")
    ablation = [a for r in result["training"] for a in r.get("ablation", [])]
    if ablation:
        lines += ["", "| objective | attention | step | fastdiff img/s | ratio to naive |", "|---|---|---|---|---|"]
        lines += [f"| {a['objective']} | {a['attention']} | {'compiled' if a['compile'] else 'eager'} | "
                  f"{a['images_per_second']:.1f}{' (the row above)' if 'same_as' in a else ''} | {a['speedup']:.2f}x |"
                  for a in ablation]
        for r in result["training"]:
            check = r.get("auto_check")
            if check:
                how = "compiled" if check.get("compiled") else "eager"
                lines.append(f"\n{r['objective']}: `auto` chose {check['auto']}; {how} {check['fastest']} measured "
                             f"faster: {'agrees' if check['agrees'] else 'DISAGREES'}")
    for r in result["training"]:
        if r.get("profile"):
            lines += ["", f"Where fastdiff's step goes, batch {r['batch_size']}:"] + profile_table(r["objective"],
                                                                                                  r["profile"])
    lines += ["", "| one-step sampling, batch | eager img/s | compiled img/s | ratio | GFLOP/image | compiled MFU |",
              "|---|---|---|---|---|---|"]
    for r in result["sampling"]:
        compiled = (f"{r['compiled_images_per_second']:.1f} | {r['speedup']:.2f}x" if "speedup" in r else "not run | -")
        mfu = r.get("compiled_mfu", r["eager_mfu"])
        lines.append(f"| {r['batch_size']} | {r['eager_images_per_second']:.1f} | {compiled} | "
                     f"{r['flops_per_image'] / 1e9:.2f} | {100 * mfu:.1f}% |")
    walls = ([f"{r['objective']} batch {r['batch_size']} {r['wall_seconds']:.0f} s" for r in result["training"]
              if "wall_seconds" in r] +
             [f"sampling batch {r['batch_size']} {r['wall_seconds']:.0f} s" for r in result["sampling"]
              if "wall_seconds" in r] +
             [f"{a['objective']} {a['attention']} {'compiled' if a['compile'] else 'eager'} {a['wall_seconds']:.0f} s"
              for a in ablation if "wall_seconds" in a])
    if walls:
        lines += ["", "What each row cost the bench (compiling included): " + ", ".join(walls)]
    if result.get("skipped"):
        lines += ["", f"Not run (time budget of {result['time_budget_seconds']:.0f} s spent): "
                  + ", ".join(result["skipped"])]
    return "\n".join(lines) + "\n"


def write(result: dict, out_dir: str) -> tuple[Path, Path]:
    """eval/results/speed-<device>.md and .json (the device name made file-safe)."""
    from ..training.checkpoint import atomic_write_text

    slug = "".join(c if c.isalnum() else "-" for c in result["device"].split(",")[0].lower()).strip("-")
    while "--" in slug:
        slug = slug.replace("--", "-")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md, js = out / f"speed-{slug}.md", out / f"speed-{slug}.json"
    atomic_write_text(md, table(result))
    atomic_write_text(js, json.dumps(result, indent=2))
    return md, js
