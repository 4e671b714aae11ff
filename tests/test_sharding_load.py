"""train.sharding fsdp setup without full copies (training/sharding.py ``Shards.copy_of``, ``loads_into_shards``): on 2
gloo CPU processes the student, fake score and EMA made from the sharded teacher's slices hold exactly the slices of
the full copies an unsharded setup makes (``networks.trainable_copy``, deepcopy for the EMA), buffers included, and
compute the same outputs bit for bit. The network is the conftest's tiny diffusers UNet. And the teacher loaded
straight into shards (``load_sharded``) equals from_pretrained's slices, buffers and outputs, at a lower peak."""
import copy
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from conftest import tiny_unet
from fastdiff.config import Config
from fastdiff.training import sharding
from fastdiff.training.networks import trainable_copy
from test_sharding import WORLD, forked, gloo_process

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
    with gloo_process(rank, port) as acc:
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


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_copies_made_from_the_teachers_shards_equal_the_slices_of_full_copies(tmp_path, dtype):
    """bfloat16: a teacher in teacher.dtype bf16, whose float32 trainable copies cast each slice (exact: elementwise).
    ~10 s each on one core."""

    forked(_worker, str(tmp_path), dtype)
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
    (("objective.name=cd",), 2, True),                  # its target: a sharded copy of the student's
    (("objective.name=hyper-sd",), 2, True),            # cd's kind
    (("objective.name=meanflow",), 2, True),            # its flow-map embedding added before the student is sharded
    (("objective.name=ayf",), 2, True),                 # meanflow's kind
    (("objective.name=fada",), 2, False),               # its student wraps a whole copy of the teacher's network
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

    with gloo_process(rank, port) as acc:
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


@pytest.mark.slow  # memory peaks of whole networks: a few seconds
@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux's /proc/self/clear_refs")
def test_setup_from_shards_peaks_below_whole_copies(tmp_path):
    """Whole copies peak at four networks (teacher, student, fake score, EMA) before sharding; made from the shards,
    at the teacher whole plus three halves (2.5 copies; measured 142 against 258 MB). Required: at least one copy
    (61 MB) lower. ~15 s."""

    peaks = {}
    for from_shards in (True, False):
        folder = tmp_path / str(from_shards)
        folder.mkdir()
        forked(_setup_worker, str(folder), from_shards)
        peaks[from_shards] = [torch.load(folder / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    copy_mb = peaks[True][0]["copy"]
    for rank in range(WORLD):
        assert peaks[True][rank]["peak"] < peaks[False][rank]["peak"] - copy_mb, peaks


def _teacher_folder(path: Path, kind: str, split: bool) -> str:
    """A teacher folder: the tiny UNet (no buffers), or a tiny DiT (its position table is a non-persistent buffer,
    emptied by ``to_empty``); ``split``: weights in several safetensors files with an index."""
    from diffusers import DDPMScheduler, Transformer2DModel

    if kind == "sd":  # a pipeline folder: its UNet loads into shards, passed to the pipeline as its component
        from tiny_pipelines import sd_pipeline

        return str(sd_pipeline(path))
    if kind == "unet":
        net, folder = tiny_unet(), "unet"
    else:
        torch.manual_seed(0)
        net, folder = Transformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                         num_layers=2, sample_size=8, patch_size=2, norm_type="ada_norm_zero",
                                         num_embeds_ada_norm=10), "transformer"
    net.save_pretrained(path / folder, max_shard_size="20KB" if split else "10GB")
    DDPMScheduler().save_pretrained(path / "scheduler")
    assert (path / folder / (sharding.SAFETENSORS + ".index.json")).is_file() == split
    return str(path)


def _load_worker(rank: int, port: int, folder: str, out: str, kind: str, dtype: str, mutate: bool) -> None:
    from fastdiff.models.teacher import load_teacher

    with gloo_process(rank, port) as acc:
        eager = load_teacher(folder, dtype=getattr(torch, dtype)).model  # from_pretrained, whole
        shards = sharding.Shards(acc, "no")
        loaded = load_teacher(folder, dtype=getattr(torch, dtype), load_network=lambda cls, path, sub, dt:
                              sharding.load_sharded(shards, cls, path, sub, dt))
        teacher = loaded.model
        if mutate:  # one element of this process's slice off by one: the comparison must see it
            with torch.no_grad():
                first = next(p for p in teacher.parameters() if sharding.local(p).numel())
                sharding.local(first).view(-1)[0] += 1
        result = {"sharded": sharding.is_sharded(teacher), "training": teacher.training,
                  "buffers": [n for n, _ in teacher.named_buffers()], "bad": _mismatches(teacher, eager)}
        if kind == "sd":  # the pipeline holds the sharded UNet; its text encoder and VAE stay whole
            result["pipeline"] = [loaded.pipeline.unet is teacher, sharding.is_sharded(loaded.pipeline.text_encoder),
                                  sharding.is_sharded(loaded.pipeline.vae)]
        # (DiT: its first block's norm1.emb runs outside the block, so it is a unit of its own: CALLED_OUTSIDE)
        gen = torch.Generator().manual_seed(rank)
        x = torch.randn(2, *((1, 8, 8) if kind == "unet" else (4, 8, 8)), generator=gen).to(eager.dtype)
        cond = ({} if kind == "unet" else {"class_labels": torch.tensor([1, 7])} if kind == "dit" else
                {"encoder_hidden_states": torch.randn(2, 5, 32, generator=gen).to(eager.dtype)})
        with torch.no_grad():  # the gathered weights are the eager ones: the same operations in teacher.dtype
            result["equal"] = torch.equal(teacher(x, torch.tensor([3, 500]), **cond).sample,
                                          eager(x, torch.tensor([3, 500]), **cond).sample)
        torch.save(result, Path(out) / f"rank{rank}.pt")


def _load_on_two(tmp_path, kind, dtype, split, mutate=False) -> list[dict]:

    folder = _teacher_folder(tmp_path / "teacher", kind, split)
    forked(_load_worker, folder, str(tmp_path), kind, dtype, mutate)
    return [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD)]


@pytest.mark.parametrize("kind,dtype,split", [("unet", "float32", False), ("unet", "bfloat16", True),
                                              ("dit", "float32", True), ("dit", "bfloat16", False),
                                              ("sd", "bfloat16", False)])
def test_teacher_loaded_into_shards_equals_the_slices_of_from_pretrained(tmp_path, kind, dtype, split):
    """Each process's slices (read memory-mapped from one or several safetensors files, cast to teacher.dtype),
    its buffers (the DiT's position table) and the UNets' forward outputs equal from_pretrained's whole teacher
    bit for bit; in a pipeline folder too (sd). ~8 s each on one core."""
    for out in _load_on_two(tmp_path, kind, dtype, split):
        assert out["sharded"] and not out["training"]
        assert out["bad"] == [] and out["equal"], out
        assert out["buffers"] == (["pos_embed.pos_embed"] if kind == "dit" else [])
        assert out.get("pipeline", [True, False, False]) == [True, False, False]


def test_a_changed_slice_is_seen(tmp_path):
    """The comparison above can fail: one element changed in each process's slices. ~8 s."""
    for out in _load_on_two(tmp_path, "unet", "float32", False, mutate=True):
        assert len(out["bad"]) == 1 and not out["equal"], out


def test_bin_weights_and_renamed_tensors_load_whole(tmp_path):
    """No safetensors (.bin), or tensor names the network does not have: ``load_sharded`` declines (None, before
    touching the shards) and the teacher loads whole."""
    from diffusers import UNet2DModel
    from safetensors.torch import save_file

    tiny_unet().save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert sharding.load_sharded(None, UNet2DModel, str(tmp_path), "bin", torch.float32) is None
    tiny_unet().save_pretrained(tmp_path / "renamed")
    file = tmp_path / "renamed" / sharding.SAFETENSORS
    from safetensors.torch import load_file

    state = load_file(file)
    state["old." + next(iter(state))] = state.pop(next(iter(state)))
    save_file(state, file)
    assert sharding.load_sharded(None, UNet2DModel, str(tmp_path), "renamed", torch.float32, log=lambda _: None) is None


def _load_peak_worker(rank: int, port: int, folder: str, out: str, into_shards: bool) -> None:
    """Peak resident memory above where it started while loading the teacher: into shards, or whole (then
    sharded, as before)."""
    import ctypes

    from fastdiff.models.teacher import load_teacher

    with gloo_process(rank, port) as acc:
        shards = sharding.Shards(acc, "no")
        import accelerate  # noqa: F401 - only the sharded way imports it: imported before measuring, for both
        import safetensors.torch  # noqa: F401

        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
        start = _rss_mb("VmRSS")
        hook = (lambda cls, path, sub, dt: sharding.load_sharded(shards, cls, path, sub, dt)) if into_shards else None
        teacher = load_teacher(folder, load_network=hook).model
        if not into_shards:
            shards.shard(teacher, "teacher")
        torch.save({"peak": _rss_mb("VmHWM") - start, "sharded": sharding.is_sharded(teacher)},
                   Path(out) / f"rank{rank}.pt")


@pytest.mark.slow  # memory peaks of whole networks: a few seconds
@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux's /proc/self/clear_refs")
def test_loading_into_shards_peaks_below_a_whole_load(tmp_path):
    """A 15.8M-parameter UNet (60 MB in float32): loaded whole, each process holds at least the whole copy; into
    shards, its half and the pages of its own rows of the file. Required: at least 40% of a copy (24 MB) lower.
    ~15 s."""
    from diffusers import DDPMScheduler

    torch.manual_seed(0)
    net = tiny_unet().__class__(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(128, 256),
                                layers_per_block=2, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8, attention_head_dim=8)
    copy_mb = sum(p.numel() for p in net.parameters()) * 4 / 2**20
    net.save_pretrained(tmp_path / "teacher" / "unet")
    DDPMScheduler().save_pretrained(tmp_path / "teacher" / "scheduler")
    del net
    peaks = {}
    for into_shards in (True, False):
        out = tmp_path / str(into_shards)
        out.mkdir()
        forked(_load_peak_worker, str(tmp_path / "teacher"), str(out), into_shards)
        peaks[into_shards] = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    for rank in range(WORLD):
        assert peaks[True][rank]["sharded"] and peaks[False][rank]["sharded"]
        assert peaks[True][rank]["peak"] < peaks[False][rank]["peak"] - 0.4 * copy_mb, (peaks, copy_mb)


def test_a_corrupt_network_file_in_a_pipeline_folder_is_one_line(tmp_path):
    """The pipeline branch of ``load_teacher`` (SD-style folders) reads the denoising network through the hook before
    the pipeline loads: a truncated safetensors file there is the same one-line error as elsewhere, not a traceback."""
    import tiny_pipelines as tp
    from fastdiff.errors import FastdiffError
    from fastdiff.models.teacher import load_teacher

    folder = tp.sd_pipeline(tmp_path / "sd")
    file = folder / "unet" / sharding.SAFETENSORS
    file.write_bytes(file.read_bytes()[:100])
    with pytest.raises(FastdiffError, match=r"could not load the unet of .*sd'") as error:
        load_teacher(str(folder), load_network=lambda cls, path, sub, dt: sharding.load_sharded(None, cls, path, sub, dt))
    assert "\n" not in str(error.value)
