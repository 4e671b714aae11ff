"""Features checked by what they do, and the methods a run records where a setting can fall back.

Features: mixed precision on the CPU, gradient checkpointing, the time limit, SiD-LSG's fake-score guidance,
cd's skipping step, the negative prompt, ``lora_export`` lora / fused alone, the README's main command, and the
fused-AdamW non-finite skip (GPU). Recorded methods (metrics ``method_*`` and fastdiff.json ``methods``): the
fake score's LoRA rank (VSD's LoRA falls back to a full copy on teachers without LoRA targets), gradient
checkpointing per network, whether a LoRA student's adapters are exported as LoRA weights. Resuming with
another sigma_init, sampler or guidance scale is refused; another SiD alpha is logged.
"""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fastdiff.models.analytic import GaussianMixtureModel
from fastdiff.cli import main
from fastdiff.config import load_config
from fastdiff.training.networks import trainable_copy
from fastdiff.objectives import build
from fastdiff.models.teacher import load_teacher
from fastdiff.training import Trainer
from fastdiff.training.setup import student_like

FAST = ["train.max_steps=1", "train.batch_size=2", "objective.critic_updates=1", "train.checkpoint_every=1",
        "train.sample_every=1000", "train.num_sample_images=2", "train.log_every=1", "train.ema_decay=0"]
EPS32 = 1.2e-7  # float32 unit roundoff


def _cfg(teacher, out, *extra):
    return load_config(None, [f"teacher.path={teacher}", f"output_dir={out}", *FAST, *extra])


def _sets(*items):
    return [a for item in items for a in ("--set", item)]


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def gmm_teacher(tmp_path):
    """The analytic teacher: a ModelMixin with no attention or convolution layers and no gradient checkpointing."""
    path = tmp_path / "gmm"
    GaussianMixtureModel().save_teacher(path)
    return str(path)


# --- mixed precision, gradient checkpointing, time limit ------------------------------------------------------
@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one mixed-precision setting per process: a Trainer with another one needs it cleared
    (the process group, PartialState, is kept)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()


@pytest.mark.parametrize("mp,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_mixed_precision_runs_the_networks_in_half_precision_on_the_cpu(tiny_teacher, tmp_path, mp, dtype,
                                                                         fresh_accelerate_state):
    try:
        with torch.autocast("cpu", dtype=dtype):
            torch.nn.functional.conv2d(torch.ones(1, 1, 3, 3), torch.ones(1, 1, 1, 1))
    except RuntimeError as exc:
        pytest.skip(f"{mp} autocast on the CPU is not supported by this torch: {exc}")
    trainer = Trainer(_cfg(tiny_teacher, tmp_path / "run", f"train.mixed_precision={mp}", "train.max_steps=2"),
                      progress=False)
    if not trainer.accelerator.native_amp:  # accelerate: fp16 autocast on CUDA-like devices only
        assert trainer.methods_used()["mixed_precision_autocast"] is False  # recorded (and logged, next test)
        pytest.skip(f"accelerate runs no {mp} autocast on {trainer.accelerator.device.type}")
    assert trainer.methods_used()["mixed_precision_autocast"] is True
    seen = []
    trainer.generator.denoiser.model.conv_in.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    student0 = {n: p.detach().clone() for n, p in trainer.generator.denoiser.model.named_parameters()}
    trainer.fit(export=False)
    assert seen and set(seen) == {dtype}  # the student's first convolution ran in the half type at every call
    assert trainer.opt_g.scaler.is_enabled() == (mp == "fp16")  # fp16 scales the loss, bf16 does not
    moved = 0.0
    for n, p in trainer.generator.denoiser.model.named_parameters():
        assert p.dtype == torch.float32 and torch.isfinite(p).all(), n  # float32 master weights
        moved = max(moved, (p - student0[n]).abs().max().item())
    assert moved > 0 and all(r["skipped_updates"] == 0 for r in _metrics(tmp_path / "run"))


def test_fp16_without_autocast_is_logged_and_recorded(tiny_teacher, tmp_path, capsys, fresh_accelerate_state):
    run = tmp_path / "run"
    if torch.cuda.is_available():
        pytest.skip("fp16 autocast runs on CUDA")
    assert main(["distill", *_sets(f"teacher.path={tiny_teacher}", f"output_dir={run}", *FAST,
                                   "train.mixed_precision=fp16")]) == 0
    assert "train.mixed_precision fp16: accelerate has no fp16 autocast on cpu; training runs in float32" in \
        capsys.readouterr().out
    assert json.loads((run / "student" / "fastdiff.json").read_text())["methods"]["mixed_precision_autocast"] is False
    assert _metrics(run)[-1]["method_mixed_precision_autocast"] == 0.0


def _gradients(teacher, out, checkpointing: bool):
    """Gradients of one generator loss (student) and one critic loss (fake score), and how often the student's
    first ResNet ran."""
    trainer = Trainer(_cfg(teacher, out, "objective.name=sid", f"train.gradient_checkpointing={checkpointing}"),
                      progress=False)
    student, fake = trainer.generator.denoiser.model, trainer.objective.fake.model
    calls = []
    student.down_blocks[0].resnets[0].register_forward_pre_hook(lambda *a: calls.append(torch.is_grad_enabled()))
    torch.manual_seed(0)
    z, cond = trainer._inputs(2)
    x = trainer.generator.training_sample(z, cond)
    trainer.objective.generator_loss(x, cond)[0].backward()
    torch.manual_seed(1)
    trainer.objective.critic_loss(x.detach(), cond)[0].backward()
    grads = {f"{k}/{n}": p.grad.clone() for k, net in (("g", student), ("f", fake))
             for n, p in net.named_parameters() if p.grad is not None}
    return grads, calls, trainer.methods_used()


def test_gradient_checkpointing_gives_the_same_gradients(tiny_teacher, tmp_path):
    plain, calls_plain, methods_plain = _gradients(tiny_teacher, tmp_path / "a", False)
    ckpt, calls_ckpt, methods = _gradients(tiny_teacher, tmp_path / "b", True)
    # Checkpointing really ran: the forward's activations were not kept, the ResNet ran again (the SiD loss
    # backpropagates through the student once, so twice in all), and the run records it for both networks.
    assert len(calls_plain) == 1 and len(calls_ckpt) == 2
    assert methods == {"fake_score_lora_rank": 0, "gradient_checkpointing_generator": True,
                       "gradient_checkpointing_fake_score": True}
    assert methods_plain == {"fake_score_lora_rank": 0}
    assert plain.keys() == ckpt.keys() and len(plain) > 20
    for k, g in plain.items():
        # The recomputed forward runs the same kernels on the same inputs, so activations are bit-identical; only
        # the order in which backward accumulates a parameter's gradient may change, a few roundings of the
        # largest entry at most (here they agree bit for bit on the CPUs tried).
        tol = 16 * EPS32 * g.abs().max().item()
        assert (ckpt[k] - g).abs().max().item() <= tol, k


def test_gradient_checkpointing_on_a_network_without_it_is_logged_and_recorded(gmm_teacher, tmp_path, capsys):
    trainer = Trainer(_cfg(gmm_teacher, tmp_path / "run", "objective.name=vsd", "train.gradient_checkpointing=true"),
                      progress=False)
    out = capsys.readouterr().out
    # VSD's LoRA fake score falls back to a full copy here (the analytic teacher has no layers to adapt): said and kept.
    assert "vsd: the fake score is a full trainable copy of the teacher, not a rank-16 LoRA" in out
    assert "GaussianMixtureModel (the generator) does not support it" in out
    assert "GaussianMixtureModel (the fake score) does not support it" in out
    trainer.fit(export=False)
    row = _metrics(tmp_path / "run")[-1]
    assert {k: v for k, v in row.items() if k.startswith("method_")} == {
        "method_fake_score_lora_rank": 0.0, "method_gradient_checkpointing_generator": 0.0,
        "method_gradient_checkpointing_fake_score": 0.0}


def test_vsd_lora_fake_score_and_checkpointing_are_recorded_in_the_export(tiny_teacher, tmp_path):
    run = tmp_path / "run"
    assert main(["distill", *_sets(f"teacher.path={tiny_teacher}", f"output_dir={run}", *FAST, "objective.name=vsd",
                                   "train.gradient_checkpointing=true")]) == 0
    methods = {"fake_score_lora_rank": 16, "gradient_checkpointing_generator": True,
               "gradient_checkpointing_fake_score": True}
    assert json.loads((run / "student" / "fastdiff.json").read_text())["methods"] == methods
    assert {k[len("method_"):]: v for k, v in _metrics(run)[-1].items() if k.startswith("method_")} == methods


def test_time_limit_stops_checkpoints_and_exports(tiny_teacher, tmp_path, capsys):
    run = tmp_path / "run"
    # 1e-9 minutes is over after the first step, far before max_steps or the checkpoint interval.
    args = _sets(f"teacher.path={tiny_teacher}", f"output_dir={run}", *FAST, "train.max_steps=1000",
                 "train.checkpoint_every=500", "train.log_every=500", "train.time_limit_minutes=1e-9")
    assert main(["distill", *args]) == 0
    assert "train.time_limit_minutes reached at step 1: stopping" in capsys.readouterr().out
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-00000001"]
    assert json.loads((run / "student" / "fastdiff.json").read_text())["train_step"] == 1


# --- SiD-LSG guidance, cd's skipping step ---------------------------------------------------------------------
def _x0_v(model, schedule, x, sigma, labels):
    """By hand: the x0 estimate of a v-prediction UNet at VE noise level sigma (x_native = a x, x0 = a x_n - s v)."""
    a = (1 / torch.sqrt(1 + sigma.double() ** 2)).float().view(-1, 1, 1, 1)
    s = (sigma.double() / torch.sqrt(1 + sigma.double() ** 2)).float().view(-1, 1, 1, 1)
    x_native = x * a
    v = model(x_native, schedule.model_timestep(sigma), class_labels=labels).sample
    return a * x_native - s * v


def _cfg_x0(model, schedule, x, sigma, labels, null, g):
    uncond = _x0_v(model, schedule, x, sigma, torch.full_like(labels, null))
    return uncond + g * (_x0_v(model, schedule, x, sigma, labels) - uncond)


def test_sid_lsg_fake_guidance_is_what_the_fake_score_sees(tiny_cond_teacher):
    """fake_guidance guides the fake score in the generator loss, fake_train_guidance while it trains: the fake
    score's output in each loss equals a hand-made CFG of its network's two passes at that scale (and the teacher
    stays unguided)."""
    teacher = load_teacher(tiny_cond_teacher)
    d = teacher.denoiser
    torch.manual_seed(3)
    fake_model = trainable_copy(teacher.model)
    with torch.no_grad():  # a fake score that differs from the teacher, so guidance changes it
        for p in fake_model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    fake = student_like(teacher, fake_model)
    calls = {"fake": [], "teacher": []}

    def record(name, denoiser):
        forward = denoiser.forward

        def recording(x_t, sigma, cond=None, guidance_scale=None):
            out = forward(x_t, sigma, cond, guidance_scale)
            calls[name].append((x_t.detach(), sigma.detach(), cond, guidance_scale, out.detach()))
            return out
        denoiser.forward = recording

    record("fake", fake)
    record("teacher", d)
    obj = build("sid", d, fake, fake_guidance=2.5, fake_train_guidance=4.0)
    x = torch.randn(3, 1, 8, 8)
    labels = torch.tensor([0, 1, 2])
    torch.manual_seed(0)
    obj.generator_loss(x, {"class_labels": labels})
    (x_t, sigma, cond, g, out), = calls["fake"]
    assert g == 2.5 and all(c[3] in (None, 1.0) for c in calls["teacher"])
    with torch.no_grad():
        hand = _cfg_x0(fake_model, d.schedule, x_t, sigma, cond["class_labels"], teacher.null_class, 2.5)
        # The objective batches CFG's two passes into one call, so the network's reductions (a few hundred terms)
        # may sum in another order: at most ~800 roundings (eps 1.2e-7) of the largest x0, i.e. 1e-4 relative.
        assert (out - hand).abs().max() <= 1e-4 * max(1.0, hand.abs().max().item())
        unguided = _x0_v(fake_model, d.schedule, x_t, sigma, cond["class_labels"])
        assert (hand - unguided).abs().max() > 1e-2 * hand.abs().max()  # guidance changes what the fake score says
    calls["fake"].clear()
    torch.manual_seed(1)
    obj.critic_loss(x, {"class_labels": labels})
    (x_t, sigma, cond, g, out), = calls["fake"]
    assert g == 4.0
    with torch.no_grad():
        hand = _cfg_x0(fake_model, d.schedule, x_t, sigma, cond["class_labels"], teacher.null_class, 4.0)
        assert (out - hand).abs().max() <= 1e-4 * max(1.0, hand.abs().max().item())


def test_cd_skip_steps_the_teacher_over_k_grid_intervals(tiny_teacher):
    teacher = load_teacher(tiny_teacher)
    student = student_like(teacher, trainable_copy(teacher.model))
    cfg = load_config(None, ["objective.name=cd", "objective.skip=3", "objective.num_intervals=10"])
    obj = build("cd", teacher.denoiser, None, student=student, skip=cfg.objective.skip,
                num_intervals=cfg.objective.num_intervals)
    steps = []

    def teacher_step(x, sigma, sigma_next, cond, scale):
        steps.append((sigma.clone(), sigma_next.clone()))
        return x

    obj.teacher_step = teacher_step
    x = torch.randn(64, 1, 8, 8)
    torch.manual_seed(0)
    obj.generator_loss(x)
    levels = obj.grid(10, "cpu")
    torch.manual_seed(0)  # the objective's first draw: the grid index n in [1, N]
    n = torch.randint(1, 11, (64,))
    (sigma, sigma_next), = steps
    assert torch.equal(sigma, levels[n]) and torch.equal(sigma_next, levels[(n - 3).clamp(min=0)])
    assert (n > 3).any() and (n <= 3).any()  # both cases: three intervals down, and clamped at the grid's bottom


# --- text-to-image: negative prompt, LoRA export modes ------------------------------------------------------
@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    import tiny_pipelines as tp

    root = tmp_path_factory.mktemp("sd")
    return {"sd": str(tp.sd_pipeline(root / "sd")), "prompts": str(tp.prompts_file(root / "prompts.txt"))}


def test_negative_prompt_is_the_unconditional_cfg_input(sd, tmp_path):
    negative = "blurry, low quality"
    trainer = Trainer(_cfg(sd["sd"], tmp_path / "run", f"data.prompts={sd['prompts']}",
                           f"data.negative_prompt={negative}", "teacher.guidance_scale=3.0"), progress=False)
    pipe = trainer.teacher.pipeline

    def embed(text):  # by hand: the pipeline's tokenizer padded to its length, the text encoder's last hidden state
        ids = pipe.tokenizer([text], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            return pipe.text_encoder(ids)[0][0]

    cond = trainer.text(["a red shoe on a table", "a blue bag"])
    uncond = cond["uncond_encoder_hidden_states"]
    # The same ids through the same text encoder, batched differently: a few hundred float32 roundings (eps 1.2e-7)
    # of the largest hidden state (LayerNorm outputs, order one) at most: 1e-5 of it.
    want = embed(negative)
    for row in uncond:
        assert (row - want).abs().max() <= 1e-5 * max(1.0, want.abs().max().item())
    assert (embed(negative) - embed("")).abs().max() > 1e-2  # not the default empty prompt
    # The teacher's CFG uses it: x0_neg + g (x0_cond - x0_neg), the unconditional pass fed the negative prompt.
    d = trainer.teacher.denoiser
    x, sigma = torch.randn(2, *trainer.teacher.sample_shape), torch.tensor([0.5, 3.0])
    with torch.no_grad():
        guided = d(x, sigma, cond)
        x0_c = d(x, sigma, {"encoder_hidden_states": cond["encoder_hidden_states"]}, guidance_scale=1.0)
        x0_n = d(x, sigma, {"encoder_hidden_states": uncond.contiguous()}, guidance_scale=1.0)
    hand = x0_n + 3.0 * (x0_c - x0_n)
    # One batched pass against two single passes, then the CFG sum: ~800 roundings (eps 1.2e-7) of the largest x0.
    assert (guided - hand).abs().max() <= 1e-4 * max(1.0, hand.abs().max().item())


def test_lora_export_lora_alone_and_fused_alone(sd, tmp_path):
    from diffusers import LCMScheduler, StableDiffusionPipeline

    from fastdiff.inference.sampling import to_uint8
    from test_text_to_image import PROMPTS, assert_same, theirs

    cfg = _cfg(sd["sd"], tmp_path / "run", f"data.prompts={sd['prompts']}", "student.lora_rank=4",
               "student.lora_export=lora", "objective.fake_lora_rank=4", "train.lr_generator=1e-2")
    trainer = Trainer(cfg, progress=False)
    lora = trainer.fit()
    cfg.student.lora_export = "fused"
    fused = trainer.export(tmp_path / "fused")
    assert sorted(p.name for p in lora.iterdir()) == ["README.md", "fastdiff.json", "pytorch_lora_weights.safetensors",
                                                     "samples.png", "scheduler"]
    assert not (fused / "pytorch_lora_weights.safetensors").exists() and (fused / "unet").is_dir()
    info_lora, info_fused = (json.loads((f / "fastdiff.json").read_text()) for f in (lora, fused))
    assert info_lora["methods"]["lora_weights_exported"] and not info_fused["methods"]["lora_weights_exported"]
    # Both load as the README says and sample what the trainer's own student samples on the same noise.
    with torch.no_grad():
        z = torch.randn((3, *trainer.teacher.sample_shape), generator=torch.Generator().manual_seed(5))
        mine = to_uint8(trainer.teacher.latents.decode(trainer.export_generator()(z, trainer.text(PROMPTS))))
    pipe = StableDiffusionPipeline.from_pretrained(sd["sd"])
    pipe.load_lora_weights(str(lora))
    pipe.scheduler = LCMScheduler.from_pretrained(lora, subfolder="scheduler")
    assert_same(theirs(pipe, 1), mine)
    # The file adapts every layer kind of LCM-LoRA's / DMD2's list the UNet has, the convolutions included
    from safetensors.torch import load_file

    from fastdiff.models.lora import LORA_TARGETS

    keys = list(load_file(lora / "pytorch_lora_weights.safetensors"))
    names = [n for n, _ in trainer.teacher.model.named_modules()]
    present = {t for t in LORA_TARGETS if any(n.endswith("." + t) for n in names)}
    assert {"conv_shortcut", "time_emb_proj", "ff.net.0.proj", "downsamplers.0.conv"} <= present
    assert {t for t in present if any(f".{t}.lora_A" in k for k in keys)} == present
    assert_same(theirs(StableDiffusionPipeline.from_pretrained(fused), 1), mine)


def test_lora_export_on_a_pixel_teacher_is_fused_and_says_so(tiny_teacher, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["distill", *_sets(f"teacher.path={tiny_teacher}", f"output_dir={run}", *FAST,
                                   "student.lora_rank=2")]) == 0
    out = capsys.readouterr().out
    assert "student.lora_export both: " in out and "the LoRA student is exported fused" in out
    info = json.loads((run / "student" / "fastdiff.json").read_text())
    assert info["methods"]["lora_weights_exported"] is False
    assert _metrics(run)[-1]["method_lora_weights_exported"] == 0.0


# --- the README's main command, export checked before training, resume --------------------------------------
@pytest.mark.slow
def test_readme_main_command_on_the_embedded_teacher(tmp_path):
    from diffusers import DDPMPipeline

    run = tmp_path / "quickstart"
    assert main(["distill", "--config", "quickstart", *_sets("train.max_steps=2", f"output_dir={run}")]) == 0
    pipe = DDPMPipeline.from_pretrained(run / "student")  # as the exported model card says
    images = pipe(batch_size=4, num_inference_steps=1, generator=torch.Generator().manual_seed(0)).images
    arrays = np.stack([np.asarray(im) for im in images])
    assert arrays.shape[0] == 4 and arrays.std() > 0
    assert json.loads((run / "student" / "fastdiff.json").read_text())["train_step"] == 2


def test_an_export_that_cannot_succeed_fails_before_training(gmm_teacher, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["distill", *_sets(f"teacher.path={gmm_teacher}", f"output_dir={run}", *FAST)]) == 2
    assert "export of GaussianMixtureModel students on a vp schedule is not supported" in capsys.readouterr().err
    assert not run.exists()  # no step ran, nothing was written


def test_resume_refuses_another_sigma_init_sampler_or_guidance_and_logs_alpha(tiny_cond_teacher, tmp_path, capsys):
    run = tmp_path / "run"  # a class-conditional teacher: guidance on an unconditional one is refused before resume
    base = [f"teacher.path={tiny_cond_teacher}", f"output_dir={run}", *FAST, "objective.name=sid", "student.sigma_init=null"]
    assert main(["distill", *_sets(*base)]) == 0
    for change, shown in (("student.sigma_init=1.0", "student.sigma_init=None, this config has 1.0"),
                          ("student.sampler=ddim", "student.sampler='lcm', this config has 'ddim'"),
                          ("teacher.guidance_scale=2.0", "teacher.guidance_scale=1.0, this config has 2.0"),
                          ("objective.fake_guidance=2.0", "objective.fake_guidance=None, this config has 2.0")):
        capsys.readouterr()
        assert main(["distill", *_sets(*base, "train.max_steps=2", change), "--resume", "latest"]) == 2, change
        assert f"was trained with {shown}" in capsys.readouterr().err, change
    assert main(["distill", *_sets(*base, "train.max_steps=2", "objective.alpha=1.0"), "--resume", "latest"]) == 0
    assert "resuming with objective.alpha=1.0; the run was trained with None until now" in capsys.readouterr().out
    assert [r["step"] for r in _metrics(run)] == [1, 2]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_adamw_skips_a_non_finite_gradient_without_a_host_sync():
    from accelerate import Accelerator

    from fastdiff.training.optim import Optimizer

    cfg = load_config(None, ["train.lr_generator=1e-2", "train.adam_betas=[0.9, 0.999]", "train.weight_decay=0.01",
                             "train.lr_warmup_steps=0"])
    torch.manual_seed(0)
    net = torch.nn.Linear(8, 8).cuda()
    opt = Optimizer([net], 1e-2, cfg, fp16=False)
    assert opt.opt.defaults["fused"]  # the path under test: the skip happens inside the fused kernel
    acc = Accelerator()

    def step(bad: bool):
        net(torch.randn(4, 8, device="cuda")).square().mean().backward()
        if bad:
            net.weight.grad[0, 0] = float("nan")
        return opt.step(acc)

    step(False)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    state = {n: {k: v.clone() for k, v in opt.opt.state[p].items()} for n, p in net.named_parameters()}
    norm, applied = step(True)
    assert not bool(applied) and not torch.isfinite(norm)
    for n, p in net.named_parameters():  # parameters, step counts and moments exactly as before
        assert torch.equal(p, before[n]), n
        for k, v in opt.opt.state[p].items():
            assert torch.equal(v, state[n][k]), (n, k)
    assert float(opt.opt.state[net.weight]["step"]) == 1
    norm, applied = step(False)
    assert bool(applied) and float(opt.opt.state[net.weight]["step"]) == 2
    assert not torch.equal(net.weight, before["weight"])


@pytest.mark.parametrize("tangent,jvp", [("auto", True), ("finite_difference", False)])
def test_scm_tangent_method_is_recorded(tiny_teacher, tmp_path, tangent, jvp):
    from test_export_e2e import write_fake_fashion_mnist

    data = tmp_path / "fmnist"
    write_fake_fashion_mnist(data, size=8)
    run = tmp_path / "run"
    sets = [s for s in FAST if not s.startswith("objective.critic_updates")]  # scm has no critic
    assert main(["distill", *_sets(f"teacher.path={tiny_teacher}", f"output_dir={run}", *sets, "objective.name=scm",
                                   f"objective.tangent={tangent}", f"data.path={data}")]) == 0
    assert json.loads((run / "student" / "fastdiff.json").read_text())["methods"] == {"tangent_jvp": jvp}
    assert _metrics(run)[-1]["method_tangent_jvp"] == float(jvp)


def test_gradient_checkpointing_reaches_the_unet_inside_a_guidance_embedded_student(tiny_cond_teacher, tmp_path):
    from test_export_e2e import write_fake_fashion_mnist

    from fastdiff.training.networks import is_checkpointing

    data = tmp_path / "fmnist"
    write_fake_fashion_mnist(data, size=8)
    sets = [s for s in FAST if not s.startswith("objective.critic_updates")]
    trainer = Trainer(load_config(None, [f"teacher.path={tiny_cond_teacher}", f"output_dir={tmp_path / 'run'}", *sets,
                                         "objective.name=cd", "objective.guidance_range=[1, 3]", f"data.path={data}",
                                         "train.gradient_checkpointing=true"]), progress=False)
    student = trainer.generator.denoiser.model
    assert type(student).__name__ == "GuidanceEmbeddedUNet"  # a wrapper without checkpointing of its own
    assert is_checkpointing(student.unet) and trainer.methods_used() == {"gradient_checkpointing_generator": True}
