"""train.sharding fsdp setup without full copies (training/sharding.py ``Shards.copy_of``, ``loads_into_shards``): on 2
gloo CPU processes the student, fake score and EMA made from the sharded teacher's slices hold exactly the slices of
the full copies an unsharded setup makes (``networks.trainable_copy``, deepcopy for the EMA), buffers included, and
compute the same outputs bit for bit. The network is the conftest's tiny diffusers UNet."""
import copy
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from conftest import tiny_unet
from fastdiff.config import Config
from fastdiff.training import sharding
from fastdiff.training.networks import trainable_copy
from test_sharding import WORLD, _free_port

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")


def _mine(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This process's slice of a full tensor, cut as the sharded ``like`` is (plain tensors: the whole tensor)."""
    if not sharding.is_dtensor(like):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None).to_local()


def _mismatches(sharded: torch.nn.Module, eager: torch.nn.Module) -> list[str]:
    """Names whose local slice, dtype or trainability differ from the eager network's (parameters and buffers)."""
    bad = []
    full = dict(eager.named_parameters())
    for name, p in sharded.named_parameters():
        q = full[name]
        mine = sharding.local(p)
        if mine.dtype != q.dtype or p.requires_grad != q.requires_grad or not torch.equal(mine, _mine(q.detach(), p)):
            bad.append(name)
    buffers = dict(eager.named_buffers())
    bad += [name for name, b in sharded.named_buffers() if b.dtype != buffers[name].dtype
            or not torch.equal(b, buffers[name])]
    if set(full) != {n for n, _ in sharded.named_parameters()}:
        bad.append("parameter names")
    return bad


def _worker(rank: int, port: int, folder: str, dtype: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        acc = SimpleNamespace(device=torch.device("cpu"), num_processes=WORLD, is_main_process=rank == 0)
        # the teacher as a run loads it (frozen, in teacher.dtype), and what an unsharded setup copies from it
        teacher = tiny_unet().to(getattr(torch, dtype)).requires_grad_(False).eval()
        eager_student = trainable_copy(teacher)
        eager_ema = copy.deepcopy(eager_student).requires_grad_(False).eval()  # as Run makes it
        shards = sharding.Shards(acc, "no")
        shards.shard(teacher, "teacher")
        student = shards.copy_of(teacher, "student", trainable=True)
        fake = shards.copy_of(teacher, "fake", trainable=True)
        ema = shards.copy_of(student, "ema", trainable=False)
        out = {"sharded": [sharding.is_sharded(m) for m in (student, fake, ema)],
               "training": [student.training, fake.training, ema.training],
               "student": _mismatches(student, eager_student), "fake": _mismatches(fake, eager_student),
               "ema": _mismatches(ema, eager_ema)}
        x, t = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(rank)), torch.tensor([3, 500])
        with torch.no_grad():  # the gathered weights are the eager ones: the same float32 operations
            out["outputs"] = [torch.equal(m(x, t).sample, eager_student(x, t).sample) for m in (student, fake, ema)]
        torch.save(out, Path(folder) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_copies_made_from_the_teachers_shards_equal_the_slices_of_full_copies(tmp_path, dtype):
    """bfloat16: a teacher in teacher.dtype bf16, whose float32 trainable copies cast each slice (exact: elementwise).
    ~10 s each on one core."""
    import torch.multiprocessing as mp

    ctx = mp.start_processes(_worker, args=(_free_port(), str(tmp_path), dtype), nprocs=WORLD, start_method="fork",
                             join=False)
    while not ctx.join(timeout=120):
        pass
    for rank in range(WORLD):
        out = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert out["sharded"] == [True] * 3 and out["training"] == [True, True, False]
        assert out["student"] == [] and out["fake"] == [] and out["ema"] == [], out
        assert out["outputs"] == [True] * 3


def _cfg(*overrides) -> Config:
    from fastdiff.config import load_config

    return load_config(None, ["train.sharding=fsdp", *overrides])


@pytest.mark.parametrize("overrides,processes,loads", [
    ((), 2, True),                                      # dmd2, full student and fake score
    (("objective.name=sid",), 2, True),
    ((), 1, False),                                     # one process: nothing is sharded
    (("train.sharding=none",), 2, False),
    (("student.lora_rank=4",), 2, False),               # LoRAs keep the teacher whole as their base
    (("objective.name=vsd",), 2, False),                # vsd's fake score is a rank-16 LoRA by default
    (("objective.name=cd",), 2, False),                 # its constructor deepcopies the student (target)
    (("objective.name=hyper-sd",), 2, False),           # cd's kind
    (("objective.name=meanflow",), 2, False),           # adds a flow-map embedding to the student
    (("train.channels_last=true",), 2, False),
    (("student.skip_layers=[1]",), 2, False),
])
def test_which_runs_load_into_shards(overrides, processes, loads):
    assert sharding.loads_into_shards(_cfg(*overrides), processes) is loads


def _rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise AssertionError(field)


def _setup_worker(rank: int, port: int, folder: str, from_shards: bool) -> None:
    """One setup's peak resident memory above where it started: a teacher, then a student, fake score and EMA,
    made from the teacher's shards or (as before, and for the networks that still do) whole and sharded after."""
    import ctypes

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        acc = SimpleNamespace(device=torch.device("cpu"), num_processes=WORLD, is_main_process=rank == 0)
        shards = sharding.Shards(acc, "no")
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM starts again from the current resident size
        start = _rss_mb("VmRSS")
        torch.manual_seed(0)  # 15.8M parameters: 60 MB per float32 copy, well above the allocator's noise
        teacher = tiny_unet().__class__(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(128, 256),
                                        layers_per_block=2, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                        up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8,
                                        attention_head_dim=8).requires_grad_(False)
        if from_shards:
            shards.shard(teacher, "teacher")
            student = shards.copy_of(teacher, "student", trainable=True)
            fake = shards.copy_of(teacher, "fake", trainable=True)
            ema = shards.copy_of(student, "ema", trainable=False)
        else:
            student, fake = trainable_copy(teacher), trainable_copy(teacher)
            ema = copy.deepcopy(student).requires_grad_(False)
            for net, role in ((teacher, "teacher"), (student, "student"), (fake, "fake"), (ema, "ema")):
                shards.shard(net, role)
        copy_mb = sum(p.numel() for p in teacher.parameters()) * 4 / 2**20  # full sizes (DTensor numel is global)
        torch.save({"peak": _rss_mb("VmHWM") - start, "copy": copy_mb}, Path(folder) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux's /proc/self/clear_refs")
def test_setup_from_shards_peaks_below_whole_copies(tmp_path):
    """Whole copies peak at four networks (teacher, student, fake score, EMA) before sharding; made from the shards,
    at the teacher whole plus three halves (2.5 copies; measured 142 against 258 MB). Required: at least one copy
    (61 MB) lower. ~15 s."""
    import torch.multiprocessing as mp

    peaks = {}
    for from_shards in (True, False):
        folder = tmp_path / str(from_shards)
        folder.mkdir()
        ctx = mp.start_processes(_setup_worker, args=(_free_port(), str(folder), from_shards), nprocs=WORLD,
                                 start_method="fork", join=False)
        while not ctx.join(timeout=120):
            pass
        peaks[from_shards] = [torch.load(folder / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    copy_mb = peaks[True][0]["copy"]
    for rank in range(WORLD):
        assert peaks[True][rank]["peak"] < peaks[False][rank]["peak"] - copy_mb, peaks
