"""AGD (adapter guidance distillation): the loss against CFG computed by hand, the exact start at the teacher's
conditional prediction, a training run that cuts the single-pass error to CFG, and export through diffusers."""
import copy

import numpy as np
import pytest
import torch

from fastdiff import objectives
from fastdiff.inference.export import export_student
from fastdiff.inference.students import read_student_info, student_generator
from fastdiff.inference.sampling import guided_cond
from fastdiff.models.denoiser import Denoiser
from fastdiff.models.guidance import with_guidance_embedding
from fastdiff.models.lora import is_lora
from fastdiff.models.teacher import load_teacher
from fastdiff.pipelines import FastdiffClassConditionalPipeline
from fastdiff.pipelines.pipeline_fastdiff_class_conditional import guidance_embedding
from conftest import assert_same_uint8
from test_export_e2e import image_bound

RANGE = [1.5, 4.0]
EPS32 = torch.finfo(torch.float32).eps


def build(path: str, rank: int = 4, steps: int = 6):
    teacher = load_teacher(path, null_class=3)
    d = teacher.denoiser
    student = Denoiser(with_guidance_embedding(copy.deepcopy(teacher.model)), d.schedule, d.prediction_type)
    obj = objectives.build("agd", d, None, student=student, guidance_range=RANGE, adapter_rank=rank,
                           trajectory_steps=steps)
    return teacher, obj


def test_only_adapters_and_scale_embedding_train(tiny_cond_teacher):
    teacher, obj = build(tiny_cond_teacher)
    trained = [n for n, p in obj.student.model.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n or n == "cond_proj.weight" for n in trained)
    assert "cond_proj.weight" in trained and not any(p.requires_grad for p in teacher.model.parameters())


def test_agd_needs_a_range(tiny_cond_teacher):
    teacher = load_teacher(tiny_cond_teacher, null_class=3)
    d = teacher.denoiser
    student = Denoiser(with_guidance_embedding(copy.deepcopy(teacher.model)), d.schedule, d.prediction_type)
    with pytest.raises(ValueError, match="guidance_range"):
        objectives.build("agd", d, None, student=student)


def test_starts_as_the_teachers_conditional_prediction(tiny_cond_teacher):
    """Zero scale projection and B = 0 adapters add exact zeros: equal outputs at any w, up to float32 rounding."""
    teacher, obj = build(tiny_cond_teacher)
    torch.manual_seed(0)
    z, labels = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 0])
    t = torch.tensor([999, 600, 250, 10])
    w = torch.tensor([1.5, 2.0, 3.0, 4.0])
    with torch.no_grad():
        ours = obj.student.model(z, t, class_labels=labels, timestep_cond=guidance_embedding(w - 1, 256)).sample
        cond = teacher.model(z, t, class_labels=labels).sample
    # The added terms are exact zeros, but with several threads peft's wrapped layers may take another (equivalent)
    # float32 kernel than the plain ones: measured 0.62e-6 at |out| <= 1.27 on 2 threads (about 4 ulps), bit-equal on
    # one. Bound: 32 float32 ulps of the output's magnitude (a wrong start, e.g. a nonzero adapter, is >= 1e-3).
    assert (ours - cond).abs().max() <= 32 * torch.finfo(torch.float32).eps * cond.abs().max()


def test_loss_is_the_mse_to_cfg_computed_by_hand(tiny_cond_teacher):
    """The loss at given points equals the v-space MSE between one student pass and eps_u + w (eps_c - eps_u)
    from two raw teacher passes (the tiny teacher predicts v: the teacher's own prediction space)."""
    teacher, obj = build(tiny_cond_teacher)
    with torch.no_grad():  # move the adapters off zero so the student differs from the teacher
        for n, p in obj.student.model.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    torch.manual_seed(1)
    d = teacher.denoiser
    t = torch.tensor([900, 500, 120])
    sigma = d.schedule.sigma_at(t)
    z, labels = torch.randn(3, 1, 8, 8), torch.tensor([0, 2, 1])
    w = torch.tensor([1.5, 2.5, 4.0])
    with torch.no_grad():
        got = obj.loss_at(z, sigma, {"class_labels": labels}, w)
        v_c = teacher.model(z, t, class_labels=labels).sample.double()
        v_u = teacher.model(z, t, class_labels=torch.full_like(labels, 3)).sample.double()
        v_cfg = v_u + w.double().view(-1, 1, 1, 1) * (v_c - v_u)
        v_student = obj.student.model(z, t, class_labels=labels, timestep_cond=guidance_embedding(w - 1, 256)).sample
        want = ((v_student.double() - v_cfg) ** 2).flatten(1).mean(1)
    # Ours goes v -> x0 = a z - s v -> CFG in x0 -> difference, then divides the squared x0 difference by s^2
    # (the v-prediction loss weight (1 + sigma^2) / sigma^2 = 1 / s^2): about 10 float32 roundings, each of at most
    # eps32 x w x the largest magnitude met (z or v), turned back into v units by 1 / s. With e that bound on each
    # element's difference d, |mean((d + e)^2) - mean(d^2)| <= 2 max|d| e + e^2.
    s_t = d.schedule.noise_scale(sigma).double()
    big = float(w.max()) * max(float(t_.abs().max()) for t_ in (z, v_c, v_u, v_student))
    e = 10 * EPS32 * big / s_t
    diff = (v_student.double() - v_cfg).abs().flatten(1).max(1).values
    tol = 2 * diff * e + e ** 2
    assert want.min() > 1e-4 and ((got.double() - want).abs() <= tol).all(), (got - want, tol)


def single_pass_error(obj, points) -> float:
    z, sigma, target, w, cond = points
    with torch.no_grad():
        return float(obj.loss_at(z, sigma, cond, w, target).mean())


def test_training_cuts_the_single_pass_error_to_cfg(tiny_cond_teacher):
    """Held-out points of CFG trajectories at w in the range: the adapted single pass's error to CFG falls."""
    teacher, obj = build(tiny_cond_teacher, steps=6)
    torch.manual_seed(0)
    labels = {"class_labels": torch.arange(64) % 3}
    held_out = obj.trajectory_points(64, (1, 8, 8), labels, "cpu")
    before = single_pass_error(obj, held_out)
    params = [p for p in obj.student.model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-2)
    x = torch.zeros(16, 1, 8, 8)  # the data batch: only its size and labels are read
    for step in range(20):
        loss, logs = obj.generator_loss(x, {"class_labels": torch.arange(16) % 3})
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = single_pass_error(obj, held_out)
    print(f"single-pass error to CFG: {before:.5f} -> {after:.5f}")
    # measured (seeds 0-2 of the held-out draw and training): 0.67 - 0.72 of the start left after 20 updates; a
    # step that does not train, or trains toward the wrong target, leaves 1 or more
    assert after < 0.85 * before, (before, after)


def test_export_reloads_in_diffusers_as_a_one_pass_guided_sampler(tiny_cond_teacher, tmp_path):
    teacher, obj = build(tiny_cond_teacher)
    with torch.no_grad():
        for p in obj.student.model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    assert is_lora(obj.student.model)
    info = {"teacher": tiny_cond_teacher, "teacher_folder": tiny_cond_teacher, "objective": "agd", "num_steps": 8,
            "sigma_init": None, "sampler": "ddim", "train_step": 0, "ema": False, "settings": {}}
    out = export_student(obj.student.model, teacher, info, tmp_path / "agd")
    pipe = FastdiffClassConditionalPipeline.from_pretrained(out)
    assert type(pipe.unet).__name__ == "GuidanceEmbeddedUNet" and not is_lora(pipe.unet)
    calls = []
    pipe.unet.register_forward_hook(lambda *a: calls.append(1))
    labels, steps, w = [0, 1, 2], 8, 3.0
    ref = pipe(class_labels=labels, num_inference_steps=steps, guidance_scale=w,
               generator=torch.Generator().manual_seed(5), output_type="np").images
    assert len(calls) == steps  # one pass per step: CFG's second pass is gone
    loaded = load_teacher(str(out))
    gen = student_generator(loaded, read_student_info(out))
    rng = torch.Generator().manual_seed(5)
    z = torch.randn((3, *loaded.sample_shape), generator=rng)
    cond = guided_cond(loaded.model, {"class_labels": torch.tensor(labels)}, w)
    with torch.no_grad():
        ours = gen(z, cond, num_steps=steps, rng=rng)
    ours = (ours / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    bound = image_bound(out, 3, 5, w)
    assert np.abs(ours - ref).max() <= bound
    assert_same_uint8(ours, ref, bound)  # uint8: equal but at rounding ties
    # and the exported network is the trained one: the adapted student's own single pass
    with torch.no_grad():
        t = torch.tensor([500])
        emb = guidance_embedding(torch.tensor([w - 1]), 256)
        a = obj.student.model(z[:1], t, class_labels=torch.tensor([1]), timestep_cond=emb).sample
        b = pipe.unet(z[:1], t, class_labels=torch.tensor([1]), timestep_cond=emb).sample
    # merged weights W + BA against W x + B A x: a few float32 roundings per layer on values of magnitude |a|, a
    # tiny UNet's ~1e3 roundings at most: 1e-4 relative (~800 eps32; measured 4.2e-7), far below a lost adapter (O(1))
    assert (a - b).abs().max() <= 1e-4 * a.abs().max()


def test_distill_checkpoint_export_and_diffusers_load(tiny_cond_teacher, tmp_path):
    """``fastdiff distill`` with objective.name=agd, no images (the trajectories are the teacher's): the scale
    embedding is checkpointed beside the adapters, and the exported folder loads in diffusers and samples what
    fastdiff's single-pass DDIM sampler samples."""
    from safetensors.torch import load_file

    from fastdiff.cli import main
    from test_export_e2e import fastdiff_images

    run = tmp_path / "run"
    sets = [f"teacher.path={tiny_cond_teacher}", f"output_dir={run}", "data.path=/no/images/here",
            "objective.name=agd", "objective.guidance_range=[1.0, 4.0]", "objective.trajectory_steps=4",
            "objective.adapter_rank=2", "student.sampler=ddim", "student.num_steps=4", "train.max_steps=2",
            "train.batch_size=4", "train.lr_generator=1e-2", "train.lr_warmup_steps=0", "train.checkpoint_every=2",
            "train.sample_every=2", "train.num_sample_images=3", "train.log_every=1"]
    assert main(["distill", *[a for s in sets for a in ("--set", s)]]) == 0
    ckpt = run / "checkpoints" / "step-00000002"
    embedding = load_file(ckpt / "agd_scale_embedding.safetensors")["weight"]
    adapters = load_file(ckpt / "generator.safetensors")
    assert embedding.abs().sum() > 0 and adapters and all("lora_" in k for k in adapters)
    pipe = FastdiffClassConditionalPipeline.from_pretrained(run / "student")
    assert type(pipe.unet).__name__ == "GuidanceEmbeddedUNet" and torch.equal(pipe.unet.cond_proj.weight, embedding)
    teacher_w = load_teacher(tiny_cond_teacher).model.state_dict()
    assert any(not torch.equal(v, teacher_w[k]) for k, v in pipe.unet.unet.state_dict().items())  # LoRA merged in
    ref = pipe(class_labels=[0, 1, 2], num_inference_steps=4, guidance_scale=3.0,
               generator=torch.Generator().manual_seed(11), output_type="np").images
    ours = fastdiff_images(run / "student", 4, 11, 3, [0, 1, 2], 3.0)
    # the same network on the same inputs: float32 differences of a few operations on images in [0, 1]
    # (test_export_e2e.image_bound: 5.7e-6 for this v student; measured 3e-7)
    assert np.abs(ours - ref).max() <= image_bound(run / "student", 3, 11, 3.0)


def test_an_ema_owns_its_scale_embedding_and_averages_it(tiny_cond_teacher, tmp_path):
    """With train.ema_decay set, the EMA of the LoRA student copies what trains (adapters and ``cond_proj``) and
    shares only the frozen base: an update moves the live scale embedding, the EMA's follows the EMA rule
    ``e <- beta e + (1 - beta) p`` exactly, and the checkpoint keeps the EMA's own. (It once shared ``cond_proj``
    with the student, and freezing the EMA froze the student's: the scale embedding never trained.)"""
    from fastdiff.config import load_config
    from fastdiff.training import Trainer
    from fastdiff.training.state import checkpoint_modules

    cfg = load_config(None, [f"teacher.path={tiny_cond_teacher}", f"output_dir={tmp_path / 'run'}",
                             "objective.name=agd", "student.sampler=ddim", "objective.guidance_range=[1.0, 4.0]",
                             "objective.trajectory_steps=4",
                             "objective.adapter_rank=2", "train.batch_size=4", "train.lr_generator=1e-2",
                             "train.lr_warmup_steps=0", "train.ema_decay=0.5"])
    trainer = Trainer(cfg, progress=False)
    live, ema = trainer.generator.denoiser.model.cond_proj.weight, trainer.ema.cond_proj.weight
    assert live is not ema and live.requires_grad and any(p is live for p in trainer.opt_g.params)
    ema_params = dict(trainer.ema.named_parameters())
    for name, p in trainer.generator.denoiser.model.named_parameters():  # the frozen base shared, the rest copied
        assert (ema_params[name] is p) != p.requires_grad, name
    ema_before = ema.detach().clone()
    trainer.train_step()
    assert live.detach().abs().max() > 0  # zero at init: the update moved it
    assert torch.equal(ema, ema_before.lerp(live.detach(), 0.5)) and not torch.equal(ema, live)
    saved = checkpoint_modules(trainer)["ema"].state_dict()
    assert torch.equal(saved["cond_proj.weight"], ema) and all(k == "cond_proj.weight" or "lora_" in k for k in saved)
