"""Text-to-image training on 2 gloo CPU processes takes the single-process update (issue 19).

A tiny SD pipeline (tiny_pipelines.sd_pipeline), dmd2 with a LoRA student and a LoRA fake score on the teacher's
shared base: 2 processes at batch 2 each against one process accumulating 2 micro-batches of 2. Every micro-batch
draws its noise, prompts and timesteps from (seed, step, update, global index) (loop.Trainer._seed_micro_batch, which
also reseeds the PromptSampler), so both runs see the same global batch, and the first update's gradients (the
critic's, and the generator's, which reads the critic's first update) differ by float summation order only.

A 1.4 relative difference in the student's update once seen here was not the text path: the student's LoRA was built
before the run seeds torch, from a generator each process seeds at random, so every process (and every run) started
from other ``lora_A`` adapters; ``with_lora(seed=train.seed)`` fixed that (tests/test_resume_lora.py). Measured
before that fix: noise, prompts, timesteps and the fake score's weights bit-equal, the critic's gradient equal, the
generator's 1.35-1.43 relative apart; after it: both gradients bit-equal (one thread per process)."""
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import tiny_pipelines as tp
from fastdiff.config import load_config
from test_sharding import EPS32, as_launched, forked

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")

WORLD = 2
# Float32 reductions a gradient element passes through that the two sides may order differently (another thread
# count, another all-reduce): the sum over a micro-batch's 2 x 8 x 8 latent positions, and per layer of the backward
# chain (the tiny UNet's ~10 layers) a 3 x 3 convolution's sum over up to 32 channels (288 terms); plus the
# WORLD-term average. Each term rounds by at most EPS32 relative, on both sides: 2 x EPS32 x TERMS ~ 7e-4 relative.
TERMS = 2 * 8 * 8 + 10 * 9 * 32 + WORLD
TOLERANCE = 2 * EPS32 * TERMS


def _config(teacher: Path, prompts: Path, out: Path, accumulation: int):
    items = [f"teacher.path={teacher}", f"output_dir={out}", f"data.prompts={prompts}", "objective.name=dmd2",
             "objective.critic_updates=1", "train.batch_size=2", f"train.gradient_accumulation={accumulation}",
             "student.lora_rank=4", "objective.fake_lora_rank=4", "train.lr_warmup_steps=0", "train.ema_decay=0",
             "train.lr_generator=1e-3", "train.lr_critic=1e-3", "train.num_sample_images=2", "train.report_to=none"]
    return load_config(None, items)


def _first_update(cfg) -> dict:
    """One generator update (after its critic update): what each micro-batch drew, and the gradients AdamW applies
    (averaged over the processes, before the step)."""
    from fastdiff.training import Trainer

    trainer = Trainer(cfg, progress=False)
    out = {"noise": [], "prompts": [], "critic": None, "generator": None}
    draw_inputs, draw_prompts = trainer._inputs, trainer.prompts.batch

    def inputs(n):
        z, cond = draw_inputs(n)
        out["noise"].append(z.clone())
        return z, cond

    def prompts(n):
        drawn = draw_prompts(n)
        out["prompts"].append(list(drawn))
        return drawn

    trainer._inputs, trainer.prompts.batch = inputs, prompts
    for role, opt in (("critic", trainer.opt_c), ("generator", trainer.opt_g)):
        def record(_optimizer, _args, _kwargs, role=role, params=opt.params):
            out[role] = torch.cat([p.grad.flatten() for p in params if p.grad is not None]).clone()
        opt.opt.register_step_pre_hook(record)
    trainer.train_step()
    return out


def _worker(rank: int, port: int, folder: str) -> None:
    as_launched(rank, port)
    root = Path(folder)
    torch.manual_seed(1000 + rank)  # a real process's generator starts at random: what is built unseeded differs
    try:
        out = _first_update(_config(root / "sd", root / "prompts.txt", root / "two", 1))
        gathered = [None] * WORLD
        dist.all_gather_object(gathered, {k: out[k] for k in ("noise", "prompts")})
        if rank == 0:
            torch.save({**out, "ranks": gathered}, root / "two.pt")
    finally:
        dist.destroy_process_group()


def _two_processes(folder: Path) -> dict:

    # fork: the children inherit the imported modules (spawn re-imports torch, diffusers and transformers)
    forked(_worker, str(folder))
    return torch.load(folder / "two.pt", weights_only=True)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_two_text_processes_take_the_single_process_first_update(tmp_path):
    """Rank r draws what micro-batch r of the accumulating process draws (noise and prompts exactly: seeded RNG
    draws, no arithmetic), and the critic's and generator's averaged gradients agree within TOLERANCE (measured:
    bit-equal). Each process starts torch's generator elsewhere, as real processes do, so a network built unseeded
    (the student's LoRA before with_lora's seed: generator 1.36 relative apart) fails here; so do gradients summed
    instead of averaged (1.0) and a prompt stream not reseeded per micro-batch (other prompts). ~6-9 s on 2 busy
    cores (two tiny SD trainers built in the forked processes, one in this one)."""
    from accelerate.state import AcceleratorState

    tp.sd_pipeline(tmp_path / "sd")
    tp.prompts_file(tmp_path / "prompts.txt")
    two = _two_processes(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers: the same reduction order where the kernels allow it
    try:
        AcceleratorState._reset_state(reset_partial_state=True)
        torch.manual_seed(999)  # as each worker: another start of torch's generator than theirs
        one = _first_update(_config(tmp_path / "sd", tmp_path / "prompts.txt", tmp_path / "one", WORLD))
    finally:
        torch.set_num_threads(threads)
    # one process: critic micro-batches 0, 1 then generator 0, 1; rank r: critic r then generator r
    order = [(0, 0), (1, 0), (0, 1), (1, 1)]  # (rank, draw) in the single process's order
    assert [two["ranks"][r]["prompts"][i] for r, i in order] == one["prompts"]
    assert all(torch.equal(two["ranks"][r]["noise"][i], z) for (r, i), z in zip(order, one["noise"]))
    assert len(set(map(tuple, one["prompts"]))) > 1  # the micro-batches drew other prompts: the draw is per index
    for role in ("critic", "generator"):
        assert float(one[role].norm()) > 0, role
        assert _relative(two[role], one[role]) <= TOLERANCE, (role, _relative(two[role], one[role]))
