"""DisBack (objectives/disback.py): the target schedule against the reference's loop, the degradation path (recorded
exactly, lowering the copy's loss on the initial student's samples), the real score it gives DMD2 and SiD, and a run
through the trainer that resumes mid-stage, exports and reloads."""
import copy
import json

import pytest
import torch

from fastdiff import objectives
from fastdiff.models.analytic import GaussianMixtureModel
from fastdiff.models.denoiser import Denoiser
from fastdiff.models.generator import Generator
from fastdiff.models.mlp import MLPDenoiser
from fastdiff.models.schedule import VPSchedule
from fastdiff.objectives.disback import target_index


def reference_targets(n: int, degradation: int, interval: int, steps: int) -> list:
    """Transcribed from DisBack main/train_sd.py ``train``: ``ckpt_num`` starts at ``--start_target_num`` and, at the
    start of each iteration whose index is a multiple of ``--interval``, goes one saved checkpoint back (``-= 100``,
    the degradation run's ``--log_iters``) and is loaded as the real unet. Numbered here as path nodes: the count
    starts at N (the README's ``s_phi = path_backtracking[0]``, so the first load is ``target = 1``, psi_{N-1}), and
    the guard lets it reach the teacher, node 0, and stay there. Stage 1's steps (None) come first in fastdiff's run."""
    ckpt_num, out = n, [None] * degradation
    for index in range(steps - degradation):
        if index % interval == 0 and ckpt_num > 0:
            ckpt_num -= 1
        out.append(ckpt_num)
    return out


@pytest.mark.parametrize("n,degradation,interval", [(10, 200, 200), (3, 6, 1), (4, 8, 3), (1, 5, 7)])
def test_target_schedule_is_the_reference_loop(n, degradation, interval):
    steps = degradation + (n + 2) * interval
    assert [target_index(s, n, degradation, interval) for s in range(steps)] == reference_targets(
        n, degradation, interval, steps)


def gmm_case(name="disback", seed=0, **options):
    """The bench's 4-mode mixture teacher, its trainable copy as the fake score, and an untrained MLP one-step student
    (its samples are nowhere near the teacher's modes)."""
    torch.manual_seed(seed)
    gmm = GaussianMixtureModel().requires_grad_(False)
    schedule = VPSchedule(gmm.scheduler().alphas_cumprod)
    teacher = Denoiser(gmm, schedule, "sample")
    fake = Denoiser(copy.deepcopy(gmm).requires_grad_(True), schedule, "sample")
    student = Generator(Denoiser(MLPDenoiser(sample_size=8, hidden=64, depth=2), schedule, "sample"), 1, 2.5)
    obj = objectives.build(name, teacher, fake, **options)
    return obj, teacher, fake, student


def stage1(obj, student, steps, lr=3e-2):
    """Stage 1 as the trainer runs it: the objective's critic updates on the frozen student's samples, then
    ``after_generator_step``; returns the fake score's weights after each step."""
    opt = torch.optim.Adam(obj.fake.parameters(), lr=lr, betas=(0.0, 0.999))
    states = []
    for step in range(steps):
        obj.step = step
        assert not obj.trains_generator()
        for _ in range(obj.critic_updates):
            with torch.no_grad():
                x = student.training_sample(torch.randn(256, 1, 8, 8))
            loss, _ = obj.critic_loss(x)
            opt.zero_grad()
            loss.backward()
            opt.step()
        obj.after_generator_step()
        states.append(copy.deepcopy(obj.fake.state_dict()))
    return states


def denoising_loss(denoise, x, sigmas, noise) -> float:
    """Mean x0 error of a denoiser on the student's samples at fixed levels and noise (the same for every node)."""
    with torch.no_grad():
        return sum(float(((denoise(x + s * e, torch.full((len(x),), s)) - x) ** 2).mean())
                   for s, e in zip(sigmas, noise)) / len(sigmas)


def test_stage1_records_the_path_and_lowers_the_copys_loss_on_student_samples():
    n, degradation = 4, 40
    obj, teacher, fake, student = gmm_case(backtrack=n, degradation_steps=degradation, backtrack_interval=5,
                                           critic_updates=1)
    states = stage1(obj, student, degradation)
    x = student.training_sample(torch.randn(4096, 1, 8, 8, generator=torch.Generator().manual_seed(1))).detach()
    sigmas = [0.05, 0.2, 0.5, 1.0, 2.0]
    noise = [torch.randn(x.shape, generator=torch.Generator().manual_seed(10 + i)) for i in range(len(sigmas))]
    losses = [denoising_loss(teacher, x, sigmas, noise)]
    for k in range(1, n):
        # psi_k is the fake score after step k * 40 / 4 - 1, exactly; the real score at a stage-2 step targeting it
        # is that network (the same tensors in the same operations: bit-equal).
        snapshot = copy.deepcopy(fake)
        snapshot.load_state_dict(states[k * degradation // n - 1])
        step = next(s for s in range(degradation, degradation + 100) if obj.backtrack.target(s) == k)
        obj.step = step
        x_t, sigma = x[:64] + 0.3 * noise[0][:64], torch.full((64,), 0.3)
        assert torch.equal(obj.real_x0(x_t, sigma), snapshot(x_t, sigma)), k
        losses.append(denoising_loss(snapshot, x, sigmas, noise))
    losses.append(denoising_loss(fake, x, sigmas, noise))  # psi_N: the fake score itself
    # Measured, seeds 0-2: 0.137 (teacher psi_0), 0.058, 0.031, 0.020, 0.014 (psi_4), each within 0.002; the bound is
    # about 3x the measured 0.105 ratio: a path that did not move, moved away or was recorded out of order fails.
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.3 * losses[0], losses


@pytest.mark.parametrize("name", ["disback", "sid"])
def test_stage2_real_score_is_the_path_node(name):
    """A stage-2 generator loss (DMD2's and SiD's) with target psi_k gives the gradient the plain objective gives
    with psi_k as its teacher (same noise draws); stage 1 gives the generator no gradient."""
    n, degradation = 3, 6
    options = {"backtrack": n, "degradation_steps": degradation, "backtrack_interval": 2, "critic_updates": 1}
    obj, teacher, fake, student = gmm_case(name, **options)
    states = stage1(obj, student, degradation)
    z = torch.randn(8, 1, 8, 8)
    obj.step = 0
    loss, logs = obj.generator_loss(student.training_sample(z))
    loss.backward()
    assert logs == {} and all(p.grad is None for p in student.denoiser.parameters())
    for step, k in ((degradation, 2), (degradation + 2, 1), (degradation + 4, 0)):
        obj.step = step
        assert obj.backtrack.target(step) == k
        node = teacher
        if k:  # psi_k: the fake score after step k * 6 / 3 - 1 of stage 1
            node = copy.deepcopy(fake)
            node.load_state_dict(states[k * degradation // n - 1])
        plain = objectives.build("dmd2" if name == "disback" else name, node, fake, critic_updates=1)
        grads = []
        for o in (obj, plain):
            x = student.training_sample(z).detach().requires_grad_(True)
            torch.manual_seed(3)
            o.generator_loss(x)[0].backward()
            grads.append(x.grad)
        assert torch.equal(grads[0], grads[1]), (name, step)


def test_lora_fake_score_keeps_only_its_adapters():
    """vsd's LoRA fake score: the path holds the adapters alone, and the real score at a node is the LoRA network
    with that node's adapters (the shared base untouched)."""
    from diffusers import DDPMScheduler

    from conftest import tiny_unet
    from fastdiff.models.lora import with_lora
    from fastdiff.models.schedule import schedule_from_scheduler

    schedule = schedule_from_scheduler(DDPMScheduler())
    base = tiny_unet().requires_grad_(False)
    teacher = Denoiser(base, schedule, "epsilon")
    fake = Denoiser(with_lora(base, 4, "objective.fake_lora_rank"), schedule, "epsilon")
    obj = objectives.build("vsd", teacher, fake, backtrack=2, degradation_steps=2, backtrack_interval=1)
    adapters = [p for p in fake.parameters() if p.requires_grad]
    assert obj.backtrack.store.psi.shape == (1, sum(p.numel() for p in adapters)) and adapters
    opt = torch.optim.Adam(adapters, lr=1e-2)
    student = Generator(Denoiser(tiny_unet(seed=5), schedule, "epsilon"), 1, 2.5)
    snapshots = []
    for step in range(2):
        obj.step = step
        with torch.no_grad():
            x = student.training_sample(torch.randn(4, 1, 8, 8))
        loss, _ = obj.critic_loss(x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        obj.after_generator_step()
        snapshots.append(copy.deepcopy(fake))
    obj.step = 2  # stage 2's first update: psi_1, the LoRA after stage-1 step 0
    x_t, sigma = torch.randn(3, 1, 8, 8), torch.full((3,), 0.7)
    with torch.no_grad():
        node, want, last = obj.real_x0(x_t, sigma), snapshots[0](x_t, sigma), fake(x_t, sigma)
    # Not bit-equal: with substituted adapters peft's layers take another kernel path (measured 3.6e-7 at |x0| 2.9,
    # about 1.5 float32 ulps); 32 ulps of the output's magnitude. The adapters' own change is far above that.
    tol = 32 * 1.2e-7 * float(want.abs().max())
    assert float((node - want).abs().max()) <= tol
    assert float((want - last).abs().max()) > 100 * tol  # the adapters moved after step 0


def test_options_are_checked():
    with pytest.raises(ValueError, match="positive multiple of objective.backtrack"):
        gmm_case(backtrack=4, degradation_steps=10)
    with pytest.raises(ValueError, match="backtrack_interval >= 1"):
        gmm_case(backtrack=2, degradation_steps=4, backtrack_interval=0)


@pytest.mark.slow  # 18 s on the loaded 2-core CPU (two runs, a resume, an export): as the other trainer e2e tests
def test_run_resumes_mid_stage_exports_and_reloads(tiny_teacher, tmp_path):
    """Through the trainer: 3 stage-1 steps (psi_1, psi_2 recorded after steps 0 and 1, psi_3 the fake score), then
    targets psi_2 and psi_1. A run stopped after step 1 (mid stage 1: psi_1 in its checkpoint, psi_2 not yet) and
    resumed equals the uninterrupted one in student, fake score and path; the student does not move in stage 1; the
    export records 2 generator updates in 5 steps, reloads in diffusers and matches fastdiff's sampler."""
    from diffusers import UNet2DModel
    from safetensors.torch import load_file

    from fastdiff.cli import main
    from test_consistency import FAST
    from test_export_e2e import assert_pipeline_matches, distill

    # Checkpoints only where each run stops (the trainer always saves its last step): the test's cost is mostly saves.
    common = ["objective.name=disback", "objective.backtrack=3", "objective.degradation_steps=3",
              "objective.backtrack_interval=1", "objective.critic_updates=1", "train.lr_generator=1e-3",
              "train.lr_critic=1e-3", "train.lr_warmup_steps=0", "train.checkpoint_every=100", "train.sample_every=100"]
    whole = distill(tiny_teacher, tmp_path / "whole", *common, "train.max_steps=5")
    part = distill(tiny_teacher, tmp_path / "part", *common, "train.max_steps=1")
    teacher = UNet2DModel.from_pretrained(tiny_teacher, subfolder="unet").state_dict()
    student = load_file(part / "checkpoints" / "step-00000001" / "generator.safetensors")
    assert all(torch.equal(student[k], teacher[k]) for k in student)  # stage 1: the initial student, untouched
    args = ["distill", "--resume", "latest"]
    for item in [f"teacher.path={tiny_teacher}", f"output_dir={part}", *FAST, *common, "train.max_steps=5"]:
        args += ["--set", item]
    assert main(args) == 0
    for sub in ("generator", "fake", "backtrack_path"):
        a = load_file(whole / "checkpoints" / "step-00000005" / f"{sub}.safetensors")
        b = load_file(part / "checkpoints" / "step-00000005" / f"{sub}.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a), sub
        if sub == "generator":
            assert any(not torch.equal(a[k], student[k]) for k in a)  # stage 2 trains it
    assert bool((b["psi"] != 0).any(dim=1).all())  # psi_1 and psi_2 recorded
    rows = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    assert [("loss_dm" in r, "grad_norm_generator" in r) for r in rows] == [(False, False)] * 3 + [(True, True)] * 2
    info = json.loads((whole / "student" / "fastdiff.json").read_text())
    assert (info["train_step"], info["generator_updates"]) == (5, 2)  # the rows with a generator gradient, above
    assert_pipeline_matches(whole / "student")
