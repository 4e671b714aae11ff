"""Rules of train.sharding fsdp's distributed paths (training/sharding.py and the trainer code that branches on it)
that the end-to-end comparisons in test_sharding*.py cannot see; each test names the mutants of a mutation audit
that survived those files and that it kills: which modules become FSDP units, when gradients are reduce-scattered
and weights resharded, the buffers and the shared LoRA base of copies and gathered networks, the clip over shards
and replicated heads, and the setup / checkpoint / trainer hooks. Networks: the conftest's tiny diffusers UNet (a
tiny DiT for buffers), on 2 forked gloo CPU processes where FSDP is needed (test_sharding's gloo_process), else plain
modules and stand-ins for the run."""
import contextlib
import copy
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from torch import nn

from conftest import tiny_unet
from fastdiff.errors import FastdiffError
from fastdiff.training import sharding
from test_sharding import EPS32, WORLD, forked, gloo_process

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")

_FORKED = {}  # what a test builds before the fork (the children inherit it)


def _on_two(worker, *args, limit: float = 60) -> list:
    """``worker(rank, port, folder, *args)`` on WORLD forked gloo processes; each returns a result, saved per rank.
    A process still running after ``limit`` seconds (a collective one process skipped) fails the test."""
    with tempfile.TemporaryDirectory() as folder:
        forked(_save_result, worker, folder, args, limit=limit, name=worker.__name__)
        return [torch.load(Path(folder) / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _save_result(rank, port, worker, folder, args):
    with gloo_process(rank, port) as acc:
        result = worker(rank, acc, folder, *args)
    torch.save(result, Path(folder) / f"rank{rank}.pt")


# --- Shards.shard: units, gradient sync, resharding ---------------------------------------------------------

def _units_worker(rank, acc, folder):
    from torch.distributed.fsdp import FSDPModule

    unet = tiny_unet()
    sharding.Shards(acc, "no").shard(unet, "student")
    return [isinstance(m, FSDPModule) for m in [*sharding.units(unet), unet]]


def test_every_block_part_of_a_sharded_network_is_an_fsdp_unit():
    """Mutant sh-2: only the root sharded (one unit: the whole network gathered at once, the transient the per-part
    units exist to avoid); outputs and gradients are unchanged, so only the units themselves show it."""
    for flags in _on_two(_units_worker):
        assert len(flags) > 5 and all(flags), flags


def _sync_worker(rank, acc, folder):
    unet = tiny_unet()
    shards = sharding.Shards(acc, "no")
    shards.shard(unet, "student")
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(rank))
    shards.set_gradient_sync(False)  # a micro-batch before the last
    unet(x, torch.tensor([3, 500])).sample.square().mean().backward()
    deferred = [p.grad is not None for p in unet.parameters()]
    shards.set_gradient_sync(True)  # the last one: everything accumulated is reduce-scattered now
    unet(x, torch.tensor([3, 500])).sample.square().mean().backward()
    return {"deferred": deferred, "reduced": [p.grad is not None and sharding.is_dtensor(p.grad)
                                             for p in unet.parameters()]}


def test_gradients_are_reduce_scattered_only_once_sync_is_on():
    """Mutant gs-3 (set_gradient_sync does nothing: every micro-batch reduce-scattered) gives the same gradient
    values, so the accumulation tests cannot see it: with sync off no sharded gradient exists yet (FSDP keeps the
    unsharded ones); the synced backward then leaves every one reduce-scattered."""
    for out in _on_two(_sync_worker):
        assert not any(out["deferred"]), out
        assert all(out["reduced"]), out


def _reshard_worker(rank, acc, folder):
    out = {}
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(rank))
    for role in sharding.RESHARD_AFTER_FORWARD:
        net = tiny_unet().requires_grad_(False)  # frozen, as the fake score in a generator update
        sharding.Shards(acc, "no").shard(net, role)
        with torch.no_grad():  # DMD2's generator update: the fake score is run, never differentiated
            net(x, torch.tensor([3, 500]))
        out[role] = all(sharding.is_dtensor(p) for p in net.parameters())  # gathered weights are plain tensors
    return out


def test_every_role_reshards_after_a_forward_without_backward():
    """Mutant sh-4 (the fake score kept gathered after forward): a frozen fake score run without backward (DMD2's
    generator update) would stay gathered, a whole copy per process, with the frozen requires_grad flags, into the
    next critic update (sharding.RESHARD_AFTER_FORWARD). After a no-grad forward every role's parameters are the
    sharded DTensors again."""
    for out in _on_two(_reshard_worker):
        assert out == dict.fromkeys(sharding.RESHARD_AFTER_FORWARD, True), out


# --- copies, skeletons and gathered networks --------------------------------------------------------------------

def _dit():
    """A tiny DiT: its position table is a non-persistent buffer (to_empty empties it)."""
    from diffusers import Transformer2DModel

    torch.manual_seed(0)
    return Transformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                              num_layers=2, sample_size=8, patch_size=2, norm_type="ada_norm_zero",
                              num_embeds_ada_norm=10).requires_grad_(False).eval()


def _buffer_worker(rank, acc, folder):
    teacher = _dit()
    eager = copy.deepcopy(teacher)
    shards = sharding.Shards(acc, "no")
    shards.shard(teacher, "teacher")
    student = shards.copy_of(teacher, "student", trainable=True)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(rank))
    kw = {"timestep": torch.tensor([3, 500]), "class_labels": torch.tensor([1, 7])}
    with torch.no_grad():  # the gathered float32 weights are the eager ones: the same operations, bit for bit
        equal = torch.equal(student(x, **kw).sample, eager(x, **kw).sample)
    buffers = dict(eager.named_buffers())
    return {"buffers": {n: torch.equal(b, buffers[n]) for n, b in student.named_buffers()}, "equal": equal}


def test_a_copy_made_from_shards_has_the_teachers_buffers():
    """Mutant co-3 (copy_of leaves buffers as to_empty left them): the tiny UNet has no buffers, so the copy tests
    cannot see it; a DiT's position table must be the teacher's, and the copy's output the teacher's bit for bit."""
    for out in _on_two(_buffer_worker):
        assert out["buffers"] == {"pos_embed.pos_embed": True} and out["equal"], out


def _skeleton_worker(rank, acc, folder):
    unet = tiny_unet()
    shards = sharding.Shards(acc, "no")
    shards.shard(unet, "student")
    skeleton = shards.skeleton(unet)
    return {"type": type(skeleton).__name__, "sharded": sharding.is_sharded(skeleton),
            "meta": all(p.is_meta for p in skeleton.parameters())}


def test_the_skeleton_of_a_sharded_network_is_its_plain_weightless_structure():
    """Mutant sk-1 (skeleton returns the sharded network): export's check (check_exportable reads the class name,
    FSDP's is FSDPUNet2DModel) and the skeleton's attention setting would act on the FSDP module."""
    for out in _on_two(_skeleton_worker):
        assert out == {"type": "UNet2DModel", "sharded": False, "meta": True}, out


def _gathered_lora_worker(rank, acc, folder):
    teacher, student = _FORKED["lora"]
    shards = sharding.Shards(acc, "no")
    shards.shard(student, "student", set(teacher.parameters()))
    plain = shards.gathered(student)
    if plain is None:
        return None
    own = {id(p) for p in teacher.parameters()}
    base = [p for n, p in plain.named_parameters() if "lora_" not in n]
    return {"shared": all(id(p) in own for p in base), "meta": any(p.is_meta for p in plain.parameters())}


def test_a_gathered_lora_network_shares_the_teachers_base():
    """Mutants ga-2 (the base deep-copied: a second whole copy of the teacher on the main process) and wc-1 (the
    skeleton's base made meta: the gathered network cannot run; its exported adapters still look right): the
    gathered student's base parameters are the teacher's own tensors."""
    from fastdiff.models.lora import with_lora

    teacher = tiny_unet().requires_grad_(False)
    _FORKED["lora"] = (teacher, with_lora(teacher, 4, "student"))
    try:
        main, other = _on_two(_gathered_lora_worker)
    finally:
        _FORKED.clear()
    assert other is None and main == {"shared": True, "meta": False}, main


def _gathered_everywhere_worker(rank, acc, folder):
    plain_net, (teacher, lora) = _FORKED["nets"]
    out = {}
    for name, net, keep in (("plain", plain_net, set()), ("lora", lora, set(teacher.parameters()))):
        shards = sharding.Shards(acc, "no")
        shards.shard(net, "student", keep)
        everywhere = shards.gathered(net, everywhere=True)
        on_main = shards.gathered(net)  # the grid's and export's copy, as before
        own = {id(p) for p in teacher.parameters()}
        x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            out[name] = {"state": {k: v.clone() for k, v in everywhere.state_dict().items()},
                         "main_state": None if on_main is None else on_main.state_dict(),
                         "sharded": sharding.is_sharded(everywhere), "output": everywhere(x, 500).sample,
                         "base_shared": all(id(p) in own for n, p in everywhere.named_parameters() if "lora_" not in n)}
    return out


def test_a_student_gathered_everywhere_is_the_main_process_copy_on_each():
    """train.eval_every on a sharded run samples on every process from ``gathered(model, everywhere=True)``: each
    process's copy is plain (unsharded), its state the main process's gathered copy bit for bit, and its output the
    same on both processes; a LoRA network's copy shares the teacher's base there too (no second teacher)."""
    from fastdiff.models.lora import with_lora

    teacher = tiny_unet().requires_grad_(False)
    with torch.no_grad():
        for q in teacher.parameters():  # not the init's zero / one tensors: the gather must move real values
            q.add_(torch.randn(q.shape, generator=torch.Generator().manual_seed(q.numel())) * 0.01)
    lora = with_lora(teacher, 4, "student")
    with torch.no_grad():
        for n, q in lora.named_parameters():
            if "lora_B" in n:  # zero at init: the adapters would not show in the output
                q.normal_(0, 0.1, generator=torch.Generator().manual_seed(q.numel()))
    _FORKED["nets"] = (copy.deepcopy(teacher).requires_grad_(True), (teacher, lora))
    try:
        rows = _on_two(_gathered_everywhere_worker)
    finally:
        _FORKED.clear()
    for name in ("plain", "lora"):
        main, other = rows[0][name], rows[1][name]
        assert other["main_state"] is None and main["main_state"] is not None
        assert not main["sharded"] and not other["sharded"], name
        assert main["base_shared"] == other["base_shared"] == (name == "lora"), name
        for state in (main["state"], other["state"]):
            assert state.keys() == main["main_state"].keys(), name
            for k, v in main["main_state"].items():
                assert torch.equal(state[k].cpu(), v), (name, k)
        assert torch.equal(main["output"], other["output"]), name


# --- clip_grad_norm over shards and replicated heads --------------------------------------------------------

def _grads(seed: int) -> tuple[nn.Module, nn.Module]:
    """The UNet and a replicated head, their gradients set to fixed normal draws (scaled 0.1 for the head)."""
    unet, head = tiny_unet(), nn.Linear(3, 2)
    g = torch.Generator().manual_seed(seed)
    for p in unet.parameters():
        p.grad = torch.randn(p.shape, generator=g)
    for p in head.parameters():
        p.grad = 0.1 * torch.randn(p.shape, generator=g)
    return unet, head


def _clip_worker(rank, acc, folder, max_norm, clip_value):
    from torch.distributed.tensor import distribute_tensor

    unet, head = _grads(0)
    full = {n: p.grad for n, p in unet.named_parameters()}
    sharding.Shards(acc, "no").shard(unet, "student")
    for n, p in unet.named_parameters():  # this process's slice of the same gradient
        p.grad = distribute_tensor(full[n], p.device_mesh, p.placements, src_data_rank=None)
    params = [*unet.parameters(), *head.parameters()]
    norm = sharding.clip_grad_norm(params, max_norm, clip_value)
    return {"norm": float(norm), "grads": [p.grad.full_tensor() if sharding.is_dtensor(p.grad) else p.grad.clone()
                                           for p in params]}


@pytest.mark.parametrize("max_norm,clip_value", [(5.0, 1.0), (1e4, None)])
def test_clip_grad_norm_over_shards_and_a_replicated_head_is_torchs(max_norm, clip_value):
    """Mutants cl-1 (value clip to [0, c]), cl-4 (the norm coefficient not capped at 1: small gradients scaled up)
    and cl-5 (the replicated head not rescaled): torch's clip_grad_value_ then clip_grad_norm_ on the whole
    gradients, in float64, is the reference. (5, 1): both clips act (the norm after the value clip is ~153);
    (1e4, None): nothing changes (norm ~212). The float32 norm sums ~4.5e4 squares (EPS32 x 4.5e4 relative at most,
    test_sharding's bound); each clipped gradient is g x coefficient, off by that plus 2 roundings."""
    unet, head = _grads(0)
    params = []  # float64 copies holding the same gradients
    for p in (*unet.parameters(), *head.parameters()):
        params.append(nn.Parameter(p.detach().double()))
        params[-1].grad = p.grad.double()
    if clip_value:
        torch.nn.utils.clip_grad_value_(params, clip_value)
    norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    terms = sum(p.numel() for p in params)
    rel = EPS32 * terms
    for out in _on_two(_clip_worker, max_norm, clip_value):
        assert abs(out["norm"] / norm - 1) < rel, (out["norm"], norm)
        for got, p in zip(out["grads"], params, strict=True):
            want = p.grad
            assert bool(((got.double() - want).abs() <= (rel + 2 * EPS32) * want.abs() + 1e-30).all())


# --- load_sharded ----------------------------------------------------------------------------------------------

def test_a_class_keeping_float32_modules_loads_whole(tmp_path):
    """Mutant ls-1 (the _keep_in_fp32_modules guard dropped): such a class (T5-style) must decline load_sharded
    (None, before touching the shards), as from_pretrained keeps those modules float32 and load_sharded does not."""
    from diffusers import UNet2DModel

    class KeepsFloat32(UNet2DModel):
        _keep_in_fp32_modules = ["conv_in"]

    tiny_unet().save_pretrained(tmp_path / "unet")
    assert sharding.load_sharded(None, KeepsFloat32, str(tmp_path), "unet", torch.bfloat16) is None


# --- setup hooks ------------------------------------------------------------------------------------------------

def test_a_run_on_teacher_samples_loads_its_teacher_whole(monkeypatch):
    """Mutant sb-1: with data.name teacher the teacher makes samples during setup on the main process alone, so it
    must not load into shards (a sharded forward is collective): Shards, but no load hook. Other data: the hook."""
    from fastdiff.config import load_config

    monkeypatch.setattr(sharding, "Shards", lambda *args: "shards")
    acc = SimpleNamespace(num_processes=2)
    cfg = load_config(None, ["train.sharding=fsdp", "data.name=teacher"])
    assert sharding.shards_before_teacher(cfg, acc) == ("shards", None)
    shards, hook = sharding.shards_before_teacher(load_config(None, ["train.sharding=fsdp"]), acc)
    assert shards == "shards" and callable(hook)


def test_a_teacher_loaded_whole_is_sharded_before_copies_are_made():
    """Mutant sf-1: a teacher load_sharded declined (loaded whole) must be sharded by shards_for_setup, or copy_of
    finds no skeleton for it."""
    calls = []
    run = SimpleNamespace(shards=SimpleNamespace(shard=lambda model, role: calls.append((model, role))),
                          teacher=SimpleNamespace(model=tiny_unet()))
    assert sharding.shards_for_setup(run) is run.shards
    assert calls == [(run.teacher.model, "teacher")]


def _stub_run(cfg, **kw):
    return SimpleNamespace(cfg=cfg, shards=None, ema=None, accelerator=SimpleNamespace(num_processes=2),
                           generator=SimpleNamespace(denoiser=SimpleNamespace(model=nn.Linear(1, 1))),
                           objective=SimpleNamespace(fake=None, state_modules=dict, name="dmd2"), **kw)


@pytest.mark.parametrize("setting,message", [("train.mixed_precision=fp16", "not fp16"),
                                             ("train.compile=true", "train.compile is not supported")])
def test_shard_run_refuses_fp16_and_compile_with_one_line(setting, message):
    """Mutant sr-1 (the fp16 refusal inverted): a run that did not load into shards (a LoRA student, here) with fp16
    or compile under fsdp stops with one line before anything is sharded."""
    from fastdiff.config import load_config

    cfg = load_config(None, ["train.sharding=fsdp", setting, "student.lora_rank=4"])
    with pytest.raises(FastdiffError, match=message) as error:
        sharding.shard_run(_stub_run(cfg, teacher=SimpleNamespace(model=nn.Linear(1, 1))), log=lambda _: None)
    assert "\n" not in str(error.value)


def _shard_run_worker(rank, acc, folder):
    from fastdiff.config import load_config
    from fastdiff.training.networks import trainable_copy

    teacher, student = _FORKED["lora"]
    fake, target = trainable_copy(teacher), copy.deepcopy(trainable_copy(teacher)).requires_grad_(False)
    cfg = load_config(None, ["train.sharding=fsdp", "student.lora_rank=4"])
    run = _stub_run(cfg, teacher=SimpleNamespace(model=teacher))
    run.accelerator = acc
    run.generator.denoiser.model = student
    run.objective = SimpleNamespace(fake=SimpleNamespace(model=fake), state_modules=lambda: {"cd_target": target})
    shards = sharding.shard_run(run, log=lambda _: None)
    return {"teacher_whole": not sharding.is_sharded(teacher) and not any(map(sharding.is_dtensor,
                                                                             teacher.parameters())),
            "student_adapters": all(sharding.is_dtensor(p) == ("lora_" in n) for n, p in student.named_parameters()),
            "fake": all(map(sharding.is_dtensor, fake.parameters())),
            "target": all(map(sharding.is_dtensor, target.parameters())),
            "networks": len(shards.networks)}


def test_shard_run_keeps_a_lora_base_whole_and_shards_full_networks_and_the_target():
    """Mutants sr-2 (the teacher sharded although it is the LoRA student's base) and sr-4 (an objective's state
    module, cd's target, never sharded): a LoRA student on the teacher, a full fake score and a full target."""
    from fastdiff.models.lora import with_lora

    teacher = tiny_unet().requires_grad_(False)
    _FORKED["lora"] = (teacher, with_lora(teacher, 4, "student"))
    try:
        results = _on_two(_shard_run_worker)
    finally:
        _FORKED.clear()
    for out in results:
        assert out == {"teacher_whole": True, "student_adapters": True, "fake": True, "target": True,
                       "networks": 3}, out


# --- gathered_student, the trainer, checkpoints -------------------------------------------------------------

def test_gathered_student_gathers_once_per_block_and_resets():
    """Mutants gst-1 (a nested block gathers again: the export inside fit's final block would gather after
    end_training ended the process group) and gst-2 (the flag left set: later sample grids use no gathered copy)."""
    gathered = []
    run = SimpleNamespace(accelerator=SimpleNamespace(device=torch.device("cpu")), gathered_student=None,
                          student_weights=lambda: "ema",
                          shards=SimpleNamespace(gathering=False,
                                                 gathered=lambda model, everywhere=False:
                                                 gathered.append((model, everywhere)) or nn.Linear(1, 1)))
    with sharding.gathered_student(run, everywhere=True):  # an evaluation split over the processes
        first = run.gathered_student
        with sharding.gathered_student(run):  # the export of student-best/ inside it
            assert run.gathered_student is first
    assert gathered == [("ema", True)] and run.gathered_student is None and run.shards.gathering is False
    with sharding.gathered_student(run):  # the next sample grid gathers afresh, on the main process
        pass
    assert gathered == [("ema", True), ("ema", False)]


def test_the_trainer_syncs_gradients_on_the_last_micro_batch_only():
    """Mutant lp-1 (sync on the first micro-batch): the trainer's accumulation loop; every end-to-end FSDP test
    runs one micro-batch per process, where first and last coincide."""
    from fastdiff.training.loop import Trainer

    calls = []
    stub = SimpleNamespace(
        cfg=SimpleNamespace(train=SimpleNamespace(gradient_accumulation=3, batch_size=1)),
        accelerator=SimpleNamespace(num_processes=2, process_index=0, autocast=contextlib.nullcontext),
        shards=SimpleNamespace(set_gradient_sync=calls.append), _seed_micro_batch=lambda phase, i: None,
        objective=SimpleNamespace(trains_on="generator", uses_generator_sample=False, critic_clip=None),
        _inputs=lambda n: (torch.zeros(n, 1), None), _real=lambda n: None)
    opt = SimpleNamespace(backward=lambda loss: None, step=lambda acc, clip: (torch.tensor(0.0), torch.tensor(True)))
    Trainer._update(stub, opt, lambda x, cond, real: (torch.zeros(()), {}), False, "generator")
    assert calls == [False, False, True]


def test_fit_checks_the_export_on_the_sharded_students_skeleton():
    """Mutant lp-2 (check_exportable on the sharded module): FSDP's class (FSDPUNet2DModel) is not an exportable
    one, so every sharded run would stop before training; the skeleton is the plain UNet2DModel."""
    from fastdiff.training.loop import Trainer

    class Stop(Exception):
        pass

    class FSDPUNet2DModel(nn.Module):  # the name FSDP gives a sharded UNet2DModel's class
        pass

    class Stub:
        cfg, accelerator = SimpleNamespace(train=SimpleNamespace(eval_every=0)), SimpleNamespace()
        objective = SimpleNamespace(stage_ends=dict)
        teacher = SimpleNamespace(pipeline=None, denoiser=SimpleNamespace(schedule=SimpleNamespace(kind="vp")))
        shards = SimpleNamespace(skeleton=lambda weights: tiny_unet())
        export_stage = None

        def student_weights(self):
            return FSDPUNet2DModel()

        @property
        def resume(self):  # what fit reads right after the check
            raise Stop

    with pytest.raises(Stop):
        Trainer.fit(Stub())


def _load_weights_worker(rank, acc, folder, file):
    from fastdiff.training.checkpoint import load_weights

    unet = tiny_unet()
    sharding.Shards(acc, "no").shard(unet, "student")
    load_weights(unet, Path(file))
    return sharding.full_state_dict(unet)


def test_load_weights_cuts_a_full_checkpoint_into_shards(tmp_path):
    """Mutant ck-1 (a sharded network loads with nn.Module.load_state_dict): the trainer's checkpoint loader on a
    sharded network keeps each process's slice of the file's full tensors; gathered back they are the file's."""
    from safetensors.torch import load_file, save_file

    file = tmp_path / "generator.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_unet(seed=1).state_dict().items()}, str(file))
    saved = load_file(str(file))
    main, other = _on_two(_load_weights_worker, str(file))
    assert other == {} and main.keys() == saved.keys() and all(torch.equal(main[k], v) for k, v in saved.items())


def _checkpoint_worker(rank, acc, folder):
    from safetensors.torch import load_file

    from fastdiff.training.optim import Optimizer
    from fastdiff.training.state import save_checkpoint
    from test_sharding import _cfg

    unet = tiny_unet()
    sharding.Shards(acc, "no").shard(unet, "student")
    cfg = _cfg()
    run = SimpleNamespace(accelerator=acc, shards="sharded", cfg=cfg, ema=None, opt_c=None, step=1,
                          skipped={}, _generators=dict, out=Path(folder) / "run", best_fid=float("inf"),
                          generator=SimpleNamespace(denoiser=SimpleNamespace(model=unet)),
                          objective=SimpleNamespace(state_modules=dict, fake=None, gan_head=None),
                          opt_g=Optimizer([unet], 1e-3, cfg, False))
    save_checkpoint(run)
    return load_file(str(run.out / "checkpoints" / "step-00000001" / "generator.safetensors")) if rank == 0 else None


def test_a_sharded_checkpoint_is_gathered_by_every_process():
    """Mutant st-1 (the other processes return before the collective gather): the main process then waits in the
    all-gather for a peer that left (gloo's closed connection, or the 60 s deadline). Clean: the checkpoint holds
    the full weights."""
    main, other = _on_two(_checkpoint_worker)
    want = tiny_unet().state_dict()
    assert other is None
    assert main.keys() == want.keys() and all(torch.equal(main[k], v) for k, v in want.items())
