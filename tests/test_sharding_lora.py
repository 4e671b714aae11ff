"""train.sharding fsdp with LoRA networks (training/sharding.py) on 2 gloo CPU processes: a LoRA student and a LoRA
fake score on the teacher's shared base. The base stays whole (one copy per process, the teacher's own tensors);
each LoRA network is one FSDP unit whose adapters are sharded and whose gradients FSDP reduce-scatters. One update
equals the single-process update, and the adapters exported (and checkpointed) after it are what the
single-process run exports. The networks are the conftest's tiny diffusers UNet."""
import os
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from conftest import accelerate_launch, tiny_unet
from fastdiff.models.lora import AdapterWeights, lora_state_dict, with_lora
from fastdiff.training import sharding
from fastdiff.training.optim import Optimizer
from test_sharding import EPS32, LR, _cfg, _micro_batches, forked

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")

WORLD, ACCUM, MICRO = 2, 2, 2  # as test_sharding: a global batch of 8 in 2 x 2 micro-batches of 2
RANK = 4
# Float32 roundings per adapter gradient element that the two sides may do in another order: the sum over a
# micro-batch's samples (up to 4) and 8 x 8 positions, the rank-4 / up-to-16-channel inner products the chain rule
# passes through, and the WORLD x ACCUM micro-batch sums.
TERMS = 2 * MICRO * 8 * 8 + 16 + WORLD * ACCUM


def _networks():
    """The frozen teacher and a LoRA student and LoRA fake score on its tensors, adapters random (peft starts B at
    zero, which would leave A's first gradient exactly zero: nothing to compare)."""
    teacher = tiny_unet().requires_grad_(False)
    student, fake = with_lora(teacher, RANK, "student"), with_lora(teacher, RANK, "fake")
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for net in (student, fake):
            for name, p in net.named_parameters():
                if "lora_" in name:
                    p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return teacher, student, fake


def _loss(teacher, student, fake, x, t, target) -> torch.Tensor:
    """The student's sample judged by the fake score against the teacher (both read the student's output, as
    SiD's generator loss does): gradients reach both sets of adapters, through the frozen shared base."""
    out = student(x, t).sample
    return (out - target).square().mean() + (fake(out, t).sample - teacher(out, t).sample).square().mean()


def _adapters(net) -> dict:
    """A LoRA network's adapter parameters by name (DTensors when sharded)."""
    return {n: p for n, p in net.named_parameters() if "lora_" in n}


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if sharding.is_dtensor(t) else t).detach().clone()


def _backward(nets, opt, micro, shards=None) -> dict:
    """Accumulated gradients of ``micro``; returns the adapters', full size (collective when sharded)."""
    for a, (x, t, target) in enumerate(micro):
        if shards is not None:
            shards.set_gradient_sync(a == len(micro) - 1)
        opt.backward(_loss(*nets, x, t, target) / len(micro))
    return {f"{role}.{n}": _full(p.grad) for role, net in zip(("student", "fake"), nets[1:])
            for n, p in _adapters(net).items()}


def _update(nets, opt, micro, acc, shards=None) -> dict:
    """One accumulated AdamW update; returns the adapters' full gradients before the step."""
    grads = _backward(nets, opt, micro, shards)
    _, applied = opt.step(acc)
    assert bool(applied)
    return grads


def _global_batch(accum: int) -> list:
    """test_sharding's global batch of 8 as WORLD x ``accum`` micro-batches (rank r takes r * accum onwards)."""
    parts = _micro_batches(1)
    if accum == ACCUM:
        return parts
    return [tuple(torch.cat(z) for z in zip(*parts[i:i + 2])) for i in range(0, len(parts), 2)]  # 4 of 2 -> 2 of 4


_FORKED = {}  # networks built before the fork (peft's injection costs seconds per process on a busy core)


def _shard(acc, nets=None):
    """As shard_run does for LoRA networks: the teacher left whole, each LoRA network one unit, its base kept."""
    teacher, student, fake = nets or _networks()
    shards = sharding.Shards(acc, "no")
    base = set(teacher.parameters())
    shards.shard(student, "student", base)
    shards.shard(fake, "fake", base)
    return (teacher, student, fake), shards


def _worker(rank: int, port: int, folder: str, full: bool, accum: int) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        acc = SimpleNamespace(device=torch.device("cpu"), num_processes=WORLD, is_main_process=rank == 0)
        (teacher, student, fake), shards = _shard(acc, _FORKED["first"])
        out = {"layout": _layout(teacher, student, fake)}
        opt = Optimizer([student, fake], LR, _cfg(), False)
        mine = _global_batch(accum)[rank * accum:(rank + 1) * accum]
        if not full:  # the gradients, and the export of the (not yet updated) gathered student
            out["grads"] = _backward((teacher, student, fake), opt, mine, shards)
        else:
            out["grads"] = _update((teacher, student, fake), opt, mine, acc, shards)
        # what a checkpoint holds of the student (its adapters gathered) and what the export writes
        out["checkpoint"] = {k: v.clone() for k, v in
                             sharding.full_state_dict(sharding.ShardedAdapterWeights(student)).items()}
        plain = shards.gathered(student)
        out["export"] = lora_state_dict(plain) if plain is not None else None
        if full:  # the checkpoint loaded into fresh sharded networks (each process cuts its shards) gathers back
            (_, again, _), _ = _shard(acc, _FORKED["second"])
            state = [out["checkpoint"]]
            dist.broadcast_object_list(state, src=0)  # every process reads the same file in a real resume
            sharding.ShardedAdapterWeights(again).load_state_dict(state[0])
            out["reloaded"] = {k: v.clone() for k, v in
                               sharding.full_state_dict(sharding.ShardedAdapterWeights(again)).items()}
        if rank == 0:
            torch.save(out, Path(folder) / "fsdp.pt")
    finally:
        dist.destroy_process_group()


def _layout(teacher, student, fake) -> dict:
    """One copy of the base: the LoRA networks' base parameters are the teacher's own (whole) tensors; adapters are
    DTensors of which this process holds about half."""
    teacher_params = {id(p) for p in teacher.parameters()}
    base = [p for net in (student, fake) for n, p in net.named_parameters() if "lora_" not in n]
    adapters = [p for net in (student, fake) for p in _adapters(net).values()]
    return {"base_is_teacher": all(id(p) in teacher_params and not sharding.is_dtensor(p) for p in base),
            "teacher_whole": not any(sharding.is_dtensor(p) for p in teacher.parameters()),
            "adapters_sharded": all(sharding.is_dtensor(p) for p in adapters),
            "adapter_elements_here": sum(p.to_local().numel() for p in adapters),
            "adapter_elements": sum(p.numel() for p in adapters)}


def _run_two_processes(folder: Path, nets, full: bool, accum: int) -> dict:
    """The 2-process run on deep copies of ``nets`` (as built before any update: the copies keep one shared base)."""
    import copy


    _FORKED.update(first=copy.deepcopy(nets), second=copy.deepcopy(nets) if full else None)
    try:  # fork: the children inherit the imported modules and these networks
        forked(_worker, str(folder), full, accum)
    finally:
        _FORKED.clear()
    return torch.load(folder / "fsdp.pt", weights_only=True)


def _magnitudes(nets, micro) -> dict:
    """Per adapter element, the mean |gradient| over the micro-batches: a bound on every partial sum of the update's
    gradient (each micro-batch's gradient is computed alike on both sides, from the same weights and samples)."""
    import copy

    teacher, student, fake = copy.deepcopy(nets)
    total = {}
    for x, t, target in micro:
        for net in (student, fake):
            net.zero_grad()
        _loss(teacher, student, fake, x, t, target).backward()
        for role, net in (("student", student), ("fake", fake)):
            for n, p in _adapters(net).items():
                total[f"{role}.{n}"] = total.get(f"{role}.{n}", 0) + p.grad.abs() / len(micro)
    return total


def _tolerance(magnitude: torch.Tensor) -> torch.Tensor:
    """TERMS additions that may round differently, each by at most EPS32 x a partial sum, which ``magnitude`` (the
    mean |micro-batch gradient|) stands for; x2, as both sides round."""
    return 2 * EPS32 * TERMS * magnitude


def _assert_weights_close(a: dict, b: dict, grads: dict, magnitudes: dict) -> None:
    """test_sharding's bound: after one AdamW step from equal weights an element's update lr g / (|g| + 1e-8) moves
    by at most lr 1e-8 dg / (|g| - dg + 1e-8)^2 when its gradient moves by dg < |g| (2 lr otherwise), plus the
    rounding of the update (lr x 4 EPS32) and of the new weight (2 EPS32 |w|)."""
    for name in b:
        g, dg = grads[name], _tolerance(magnitudes[name])
        room = (g.abs() - dg).clamp(min=0) + 1e-8
        bound = torch.where(g.abs() > dg, LR * 1e-8 * dg / room.square(), torch.full_like(g, 2 * LR))
        err = (a[name] - b[name]).abs()
        assert bool((err <= bound.clamp(max=2 * LR) + LR * 4 * EPS32 + 2 * EPS32 * b[name].abs()).all()), \
            (name, float(err.max()))


def _assert_grads_close(fsdp: dict, single: dict, magnitudes: dict) -> None:
    for name, g in single.items():
        err, tol = (fsdp[name] - g).abs(), _tolerance(magnitudes[name])
        assert bool((err <= tol).all()), (name, float(err.max()), float((err / tol).max()))
    # a sum instead of a mean over the processes would double the gradients: far outside the tolerance
    assert all(bool(((2 * fsdp[n] - g).abs() > 100 * _tolerance(magnitudes[n])).any()) for n, g in single.items())


def _check_layout(layout: dict) -> None:
    assert layout["base_is_teacher"] and layout["teacher_whole"] and layout["adapters_sharded"]
    # each process holds half of every adapter (dim 0 split in 2: rank-4 rows 2 + 2, output channels 4 + 4, ...)
    assert layout["adapter_elements_here"] * WORLD == layout["adapter_elements"]


def test_lora_networks_under_fsdp_share_one_base_and_take_the_single_process_gradients():
    """2 gloo processes (the base whole and shared, the adapters sharded), each a micro-batch of 4, against one process
    accumulating the same 2 micro-batches: the adapters' gradients agree to float32 summation order (measured: within
    1 % of the bound); the student gathered for export writes the single-process LoRA weights bit for bit.
    ~6.5 s on 2 shared cores, as test_sharding's gradient test."""
    nets = _networks()
    magnitudes = _magnitudes(nets, _micro_batches(1))
    with tempfile.TemporaryDirectory() as folder:  # no accumulation here (the slow test has it): one call each
        fsdp = _run_two_processes(Path(folder), nets, full=False, accum=1)
    _check_layout(fsdp["layout"])
    teacher, student, fake = nets
    opt = Optimizer([student, fake], LR, _cfg(), False)
    _assert_grads_close(fsdp["grads"], _backward(nets, opt, _global_batch(1)), magnitudes)
    single = lora_state_dict(student)
    assert fsdp["export"].keys() == single.keys()
    assert all(fsdp["export"][k].dtype == torch.float32 and torch.equal(fsdp["export"][k], v) for k, v in single.items())


def test_lora_update_under_fsdp_equals_single_process_and_exports_the_same_lora():
    """As above with 2 accumulated micro-batches of 2 per process (the reduce-scatter skipped until the last, against
    one process accumulating the 4), and the AdamW step: gradients, the updated adapters and the exported LoRA weights (peft's names, as
    diffusers' load_lora_weights reads) agree with the single-process run to float32 summation order; the export is
    exactly what the sharded run checkpoints, and a checkpoint loads back into fresh shards bit for bit. ~30 s on 2
    busy cores (the first AdamW step over DTensors is slow on the CPU)."""
    acc = SimpleNamespace(device=torch.device("cpu"), num_processes=1, is_main_process=True)
    nets = _networks()
    magnitudes = _magnitudes(nets, _micro_batches(1))
    with tempfile.TemporaryDirectory() as folder:
        fsdp = _run_two_processes(Path(folder), nets, full=True, accum=ACCUM)
    _check_layout(fsdp["layout"])
    teacher, student, fake = nets
    opt = Optimizer([student, fake], LR, _cfg(), False)
    grads = _update(nets, opt, _micro_batches(1), acc)
    _assert_grads_close(fsdp["grads"], grads, magnitudes)

    # the step: the student's adapters after one AdamW update, as a checkpoint holds them
    checkpoint = {f"student.{n}": v for n, v in fsdp["checkpoint"].items()}
    assert checkpoint.keys() == {f"student.{n}" for n in _adapters(student)}
    _assert_weights_close(checkpoint, {f"student.{n}": p.detach() for n, p in _adapters(student).items()}, grads,
                          magnitudes)

    # the export: peft names, shapes and dtypes of the single-process export, values the checkpointed weights exactly
    export, single = fsdp["export"], lora_state_dict(student)
    assert export.keys() == single.keys() and all(export[k].shape == single[k].shape for k in single)
    assert all(export[k].dtype == single[k].dtype == torch.float32 for k in single)
    # peft's name drops the adapter's name ("default"); the checkpointed weights were bounded above
    named = {k.replace(".default", ""): v for k, v in fsdp["checkpoint"].items()}
    assert named.keys() == export.keys() and all(torch.equal(export[k], v) for k, v in named.items())
    # resume: the full adapters cut into fresh shards gather back bit for bit
    assert all(torch.equal(fsdp["reloaded"][k], v) for k, v in fsdp["checkpoint"].items())


def test_a_plain_lora_checkpoint_view_loads_full_adapters():
    """Unsharded runs keep models.lora's view; the sharded view (ShardedAdapterWeights) loads the same full tensors
    into plain parameters alike (copy_full_ on a whole tensor is a copy)."""
    _, student, _ = _networks()
    _, other, _ = _networks()
    with torch.no_grad():
        for p in _adapters(other).values():
            p.add_(1.0)
    state = AdapterWeights(other).state_dict()
    sharding.ShardedAdapterWeights(student).load_state_dict(state)
    assert all(torch.equal(p, state[n]) for n, p in _adapters(student).items())


@pytest.mark.slow
def test_fsdp_lora_run_exports_the_single_process_lora(tmp_path):
    """The whole trainer on a tiny SD pipeline (dmd2, LoRA student and LoRA fake score on the shared base, EMA): 2 FSDP
    processes at batch 2 against one process accumulating 2 micro-batches of 2. The exported
    pytorch_lora_weights.safetensors has the single-process file's names, shapes and dtypes, and its values are the
    sharded run's last EMA checkpoint (gathered) exactly. The fake score's adapters (the critic's updates) equal the
    single-process ones to the trainer-level bound of test_sharding's full-network run, 2e-2 relative (measured
    1.6e-3). The student's own update is compared at the unit level above (and, replicated, in
    test_text_processes.py: bit-equal gradients at step 1). The 1.4 relative difference once measured here for the
    student, with train.sharding none as with fsdp, was its LoRA adapters starting from an unseeded generator in
    each process (fixed: ``with_lora(..., seed=train.seed)``, tests/test_resume_lora.py). ~2.5 minutes on 2 cores."""
    from safetensors.torch import load_file

    import tiny_pipelines as tp
    from fastdiff.cli import main
    from test_sharding import _sets

    teacher, prompts = tp.sd_pipeline(tmp_path / "sd"), tp.prompts_file(tmp_path / "prompts.txt")
    # no warm-up: dmd2's would scale the first two updates' learning rates to ~1e-6 of lr, leaving the adapters at
    # rounding level (the LoRA fake score starts as the teacher, so the generator's gradient starts near zero)
    extra = [f"data.prompts={prompts}", "student.lora_rank=4", "objective.fake_lora_rank=4", "student.lora_export=lora",
             "train.lr_warmup_steps=0"]
    two, one = tmp_path / "two", tmp_path / "one"
    accelerate_launch("distill", *_sets(teacher, two, 2, "train.sharding=fsdp", *extra))  # the real launcher, once
    assert main(["distill", *_sets(teacher, one, 2, "train.gradient_accumulation=2", *extra)]) == 0

    import json
    first = json.loads((two / "metrics.jsonl").read_text().splitlines()[0])
    assert first["method_fsdp_sharded"] == 1.0 and first["method_fake_score_lora_rank"] == 4.0
    a, b = (load_file(str(r / "student" / "pytorch_lora_weights.safetensors")) for r in (two, one))
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape and a[k].dtype == b[k].dtype for k in b)
    # the export is the sharded run's EMA adapters (gathered) exactly; diffusers' names: unet.<module>.lora_A.weight
    ema = load_file(str(two / "checkpoints" / "step-00000002" / "ema.safetensors"))
    named = {"unet." + k.replace(".default", ""): v for k, v in ema.items()}
    assert named.keys() == a.keys() and all(torch.equal(a[k], v) for k, v in named.items())
    # lora_B starts at zero: its value is the fake score's whole update
    x, y = (load_file(str(r / "checkpoints" / "step-00000002" / "fake.safetensors")) for r in (two, one))
    ups = [k for k in y if "lora_B" in k]
    dx, dy = (torch.cat([w[k].flatten() for k in ups]) for w in (x, y))
    assert float(dy.norm()) > 1e-3 and float((dx - dy).norm() / dy.norm()) < 2e-2
