"""Where a training step's time goes: ``torch.profiler`` over a few steps, the self time of every kernel (GPU) or
operator (CPU) put into a few kinds, and the kernels that took most.

This is the evidence ``fastdiff bench speed --profile`` records beside an MFU figure: a step that spends most of
its time in matrix kernels is limited by them, one that spends it in normalisations, elementwise kernels and copies
is memory-bound, and more batch or fusion (not a faster matmul) is what would raise its MFU.
"""
from __future__ import annotations

import torch

# (kind, name fragments), first match wins: kernel names on CUDA (cuBLAS / CUTLASS / cuDNN / inductor's Triton
# kernels / PyTorch's own), operator names on CPUs. Attention comes first (its kernels also hold gemm-like parts),
# random numbers before norms ("normal_"), inductor's fused pointwise kernels before copies ("..._to_copy_add...").
KINDS = (
    ("attention", ("attention", "fmha", "flash", "sdpa", "xformers", "mem_eff")),
    ("matmul / conv", ("gemm", "conv", "cutlass", "nvjet", "xmma", "cudnn", "wgrad", "dgrad", "aten::mm", "aten::bmm",
                       "aten::addmm", "aten::baddbmm", "matmul")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("random", ("normal", "uniform", "philox", "randn", "randint")),
    ("reduction / norm", ("norm", "triton_red", "triton_per", "reduce", "aten::sum", "aten::mean", "welford")),
    ("elementwise", ("triton_poi",)),
    ("copy / layout", ("copy", "memcpy", "memset", "cat", "transpose", "permute", "contiguous", "fill")),
    ("elementwise", ("elementwise", "vectorized", "unrolled", "silu", "gelu", "aten::mul", "aten::add", "aten::sub",
                     "aten::div", "lerp", "aten::exp", "aten::where")),
)


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, fragments in KINDS:
        if any(f in low for f in fragments):
            return kind
    return "other"


def profile_step(step, device: torch.device, steps: int | None = None, top: int = 10) -> dict:
    """Profile ``steps`` calls of ``step`` (already warmed up): per kind, its share of the summed self time; the
    ``top`` kernels / operators by self time (name cut to 80 characters, milliseconds per step, calls per step).
    ``steps`` defaults to 3 on a GPU and 1 on a CPU: a CPU step records every operator (~23k events for the tests'
    tiny-UNet dmd2 step), which torch.profiler tables in Python at ~3 s per step (one AMD EPYC core: 3.5 s for 1
    step, 8.2 s for 3), while the CPU time per step barely moves between steps (125 vs 128 ms there)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    steps = (3 if cuda else 1) if steps is None else steps
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize(device)
    events = []
    for e in prof.key_averages():
        # GPU: kernels carry device self time; CPU: operators (autograd wrappers have ~0 self time of their own)
        t = e.self_device_time_total if cuda else e.self_cpu_time_total
        if t > 0 and (not cuda or e.device_type == torch.autograd.DeviceType.CUDA):
            events.append((e.key, t, e.count))
    total = sum(t for _, t, _ in events) or 1.0
    shares: dict[str, float] = {}
    for name, t, _ in events:
        shares[kind_of(name)] = shares.get(kind_of(name), 0.0) + t / total
    events.sort(key=lambda e: -e[1])
    return {"timed": "device kernels" if cuda else "CPU operators", "steps": steps,
            "milliseconds_per_step": total / 1e3 / steps,
            "shares": dict(sorted(shares.items(), key=lambda kv: -kv[1])),
            "top": [{"name": n[:80], "kind": kind_of(n), "milliseconds_per_step": t / 1e3 / steps,
                     "calls_per_step": c / steps} for n, t, c in events[:top]]}


def profile_table(objective: str, prof: dict) -> list[str]:
    """Markdown lines: the kinds' shares, then the top kernels."""
    kinds = ", ".join(f"{k} {100 * v:.0f}%" for k, v in prof["shares"].items())
    lines = [f"**{objective}**: {prof['milliseconds_per_step']:.1f} ms of {prof['timed']} per step: {kinds}", "",
             "| kernel / operator | kind | ms per step | calls per step |", "|---|---|---|---|"]
    lines += [f"| `{t['name']}` | {t['kind']} | {t['milliseconds_per_step']:.2f} | {t['calls_per_step']:.0f} |"
              for t in prof["top"]]
    return lines
