"""Parity of the distribution-matching objectives (SiD / SiDA / SiD-LSG / SIM / DMD2) with their reference code.

Each test writes the reference's formula out (the file it comes from is named) and compares it with fastdiff's on
the same tensors: the same noise levels and noise (re-drawn from the same seed), the same networks.
Tolerances: float32 rounding, 1.2e-7 relative per operation, times the operations a value went through, times
the magnitude of the terms summed (not of their sum, which may cancel).
"""
import copy
import types

import pytest
import torch
import torch.nn as nn
from diffusers import DDPMScheduler

from conftest import tiny_unet
from fastdiff.config import Config, validate
from fastdiff.models.denoiser import Denoiser
from fastdiff.errors import FastdiffError
from fastdiff.objectives import SIM, SiD, build
from fastdiff.objectives.base import (default_fake_loss, default_sigma_grid, drop_conditions, edm_sigma,
                                      karras_grid, sample_sigma)
from fastdiff.objectives.gan import GANHead
from fastdiff.objectives.sid import FAKE_T_RANGE
from fastdiff.training.optim import Optimizer
from fastdiff.models.schedule import FlowSchedule, schedule_from_scheduler

EPS32 = 1.2e-7


def assert_close(ours, ref, scale, ops):
    """|ours - ref| <= float32 rounding of ``ops`` operations on terms of size ``scale`` (a number, or a tensor
    for elementwise bounds)."""
    bound = EPS32 * ops * torch.as_tensor(scale, dtype=torch.float64).detach()
    err = (ours.detach().double() - ref.detach().double()).abs()
    assert bool((err <= bound).all()), (float(err.max()), float(bound.min()))


def _pair(pred="sample", num_class_embeds=None):
    sched = DDPMScheduler(prediction_type=pred, clip_sample=False)
    schedule = schedule_from_scheduler(sched)
    null = num_class_embeds and num_class_embeds - 1
    teacher = Denoiser(tiny_unet(num_class_embeds, seed=0).eval(), schedule, pred, null_class=null)
    fake = Denoiser(tiny_unet(num_class_embeds, seed=1), schedule, pred, null_class=null)
    return sched, teacher, fake


def _sida():
    sched, teacher, fake = _pair("sample")
    head = GANHead(fake, "sida")  # SiDA's: y_D is the encoder output's channel mean, a logit per position
    # on the Karras grid, as SiDA's sida_loss.py draws its generator noise levels
    return teacher, fake, head, build("sida", teacher, fake, gan_head=head, sigma_grid="karras")


# --- item 1: SiDA's loss scales (mingyuanzhou/SiD, branch sida) --------------------------------------------------

@pytest.mark.parametrize("images_seen", [200_000, 200_064])
def test_sida_generator_loss_matches_reference(images_seen):
    """sida_training/sida_loss.py generator_share_encoder_loss + sida_training_loop.py (loss_scaling_G 100,
    loss_scaling_G_gan 0.01, 0.5/0.5 only once cur_nimg > 200k): fastdiff's loss is the reference's / (100 N)."""
    teacher, fake, head, obj = _sida()
    obj.images_seen = images_seen
    x = (0.5 * torch.randn(4, 1, 8, 8)).requires_grad_()
    torch.manual_seed(3)
    loss, logs = obj.generator_loss(x)
    loss.backward()

    torch.manual_seed(3)
    sigma = sample_sigma(teacher.schedule, 4, obj.min_t, obj.max_t, "cpu", obj.sigma_grid)
    y = x.detach().clone().requires_grad_()
    n = torch.randn_like(y) * sigma.reshape(-1, 1, 1, 1)
    y_real, y_fake, y_d = teacher(y + n, sigma), fake(y + n, sigma), head(y + n, sigma)
    with torch.no_grad():
        weight_factor = (y - y_real).abs().mean(dim=[1, 2, 3], keepdim=True).clip(min=1e-5)
    per_elem = (y_real - y_fake) * ((y_real - y) - 1.0 * (y_real - y_fake)) / weight_factor
    batch, numel = y.shape[0], y[0].numel()
    loss_g = per_elem.sum() * 100 / batch
    loss_gan = nn.BCEWithLogitsLoss()(y_d.clamp(-10, 10), torch.ones_like(y_d)) / weight_factor
    loss_gan = (loss_gan.mean(dim=[1, 2, 3], keepdim=True) * numel).sum() * 0.01 / batch
    ref = 0.5 * loss_g + 0.5 * loss_gan if images_seen > 200 * 1000 else loss_g
    ref.backward()

    scale = 100 * numel
    terms = float(per_elem.detach().abs().sum() * 100 / batch + loss_gan.detach().abs())
    assert_close(loss.detach() * scale, ref.detach(), terms, numel + 20)
    assert_close(x.grad * scale, y.grad, y.grad.abs().max(), numel + 20)
    assert float(loss_gan.detach()) > 0 and ("loss_gan_g" in logs)


def sid_reference_per_element(sched, teacher, fake, x, alpha: float, seed: int):
    """(y, per-element loss) of mingyuanzhou/SiD training/sid_loss.py ``generator_loss`` in float64 from raw UNet calls
    on an epsilon teacher: ``(y_r - y_f)((y_r - y) - alpha (y_r - y_f)) / weight_factor``, weight_factor = mean|y - y_r|
    clipped at 1e-5 without gradient, y_real / y_fake SiD-LSG's ``sid_sd_denoise`` (``add_noise`` at integer t, then
    (x_t - sqrt(1 - acp) eps) / sqrt(acp)). The draws are fastdiff's after ``torch.manual_seed(seed)``: integer
    timesteps in [0, 0.8 * 1000] of the table, then the noise (float32, as fastdiff's randn_like(x)). y = x in
    float64, with gradient."""
    batch = x.shape[0]
    torch.manual_seed(seed)
    t = torch.randint(0, 801, (batch,))
    noise = torch.randn(x.shape).double()
    real_net, fake_net = copy.deepcopy(teacher.model).double(), copy.deepcopy(fake.model).double()
    acp = sched.alphas_cumprod.double()[t].reshape(-1, 1, 1, 1)
    y = x.detach().double().requires_grad_()
    x_t = acp.sqrt() * y + (1 - acp).sqrt() * noise
    y_real = (x_t - (1 - acp).sqrt() * real_net(x_t, t).sample) / acp.sqrt()
    y_fake = (x_t - (1 - acp).sqrt() * fake_net(x_t, t).sample) / acp.sqrt()
    with torch.no_grad():
        weight_factor = (y - y_real).abs().mean(dim=[1, 2, 3], keepdim=True).clip(min=1e-5)
    return y, (y_real - y_fake) * ((y_real - y) - alpha * (y_real - y_fake)) / weight_factor


def test_sid_generator_loss_at_defaults_matches_reference_on_an_epsilon_teacher():
    """SiD's generator loss at sid's defaults (alpha 1.2, t <= 0.8 on the teacher's own DDPM table) on an epsilon
    teacher, against the reference written out in float64 from raw UNet calls:
    mingyuanzhou/SiD training/sid_loss.py ``generator_loss`` (the per-element loss, weight_factor = mean|y - y_real|
    clipped at 1e-5 without gradient) and training/sid_training_loop.py (``loss.sum().mul(loss_scaling_G /
    batch_gpu_total)``, sid_train.py ``--lsg`` 100); on a VP epsilon teacher y_real / y_fake are SiD-LSG's
    training/sid_util ``sid_sd_denoise``: ``add_noise`` at integer timestep t, then the scheduler's
    ``pred_original_sample`` (x_t - sqrt(1 - acp) eps) / sqrt(acp).
    Units: fastdiff's loss is a mean over elements, summed over samples / B, so reference = fastdiff * 100 N (N
    elements per sample), and so are the gradients on x."""
    sched, teacher, fake = _pair("epsilon")
    obj = build("sid", teacher, fake)
    assert (obj.alpha, obj.min_t, obj.max_t, obj.sigma_grid) == (1.2, 0.0, 0.8, "teacher")
    batch = 6
    torch.manual_seed(13)
    x = (0.5 * torch.randn(batch, 1, 8, 8)).requires_grad_()
    torch.manual_seed(14)
    loss, logs = obj.generator_loss(x)
    loss.backward()

    y, per_elem = sid_reference_per_element(sched, teacher, fake, x, alpha=1.2, seed=14)
    ref = per_elem.sum() * 100 / batch
    ref.backward()

    unit = 100 * x[0].numel()
    # The reference is float64; fastdiff runs float32: the native input a (x + sigma eps) rounded twice, ~20 UNet
    # layers forward and again backward, the x0 conversion (3 ops) and the loss (5 ops), each a rounding of the
    # largest term: 64 roundings (measured: ~1 on the loss, ~8 on the gradient).
    terms = per_elem.detach().abs().sum() * 100 / batch
    assert_close(loss.detach() * unit, ref.detach(), terms, 64)
    assert_close(logs["loss_sid"] * unit, ref.detach(), terms, 64)
    assert_close(x.grad * unit, y.grad, y.grad.abs().max(), 64)
    assert float(ref.detach().abs()) > 100 * EPS32 * 64 * float(terms)  # the loss is not rounding noise


def test_sida_critic_loss_matches_reference():
    """sida_loss.py fakescore_discriminator_share_encoder_loss + sida_training_loop.py: EDM loss summed over
    elements, plus lambda(sigma) (BCE(real) + BCE(fake)) / 2 with one sigma and one noise for real and fake;
    fastdiff's loss (and every critic gradient) is the reference's / N, and its clip value 1 / N."""
    teacher, fake, head, obj = _sida()
    params = [p for m in obj.critic_modules() for p in m.parameters()]
    x, real = 0.5 * torch.randn(4, 1, 8, 8), 0.5 * torch.randn(4, 1, 8, 8)
    torch.manual_seed(4)
    loss, logs = obj.critic_loss(x, None, (real, None))
    loss.backward()
    ours = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None

    torch.manual_seed(4)
    sigma = (torch.randn([4, 1, 1, 1]) * 1.2 - 1.2).exp()
    lo, hi = teacher.schedule.sigma_min, teacher.schedule.sigma_max
    assert lo < float(sigma.min()) and float(sigma.max()) < hi  # fastdiff clamps to the table; this draw is inside
    weight = (sigma ** 2 + 0.5 ** 2) / (sigma * 0.5) ** 2
    n = torch.randn_like(x) * sigma
    y_fake, logit_fake = fake(x + n, sigma.flatten()), head(x + n, sigma.flatten())
    logit_real = head(real + n, sigma.flatten())
    bce = nn.BCEWithLogitsLoss()
    loss_fake_score = (weight * (y_fake - x) ** 2).sum() / 4
    loss_d = (weight * (bce(logit_real, torch.ones_like(logit_real)) + bce(logit_fake, torch.zeros_like(logit_fake)))
              / 2).sum() / 4
    ref = loss_fake_score + loss_d
    ref.backward()

    numel = x[0].numel()
    assert_close(loss.detach() * numel, ref.detach(), loss_fake_score + loss_d, numel + 20)
    largest = max(float(p.grad.abs().max()) for p in params)
    for g, p in zip(ours, params):
        if float(p.grad.abs().max()) < 1e-5 * largest:
            continue  # zero by invariance (attention key biases, biases before a GroupNorm): rounding noise only
        # backward sums over batch, pixels and channels: at most ~1000 terms per weight
        assert_close(g * numel, p.grad, p.grad.abs().max(), 1000)
    assert obj.critic_clip == pytest.approx(1 / numel)
    assert float(logs["loss_gan_d"]) > 0


def test_critic_gradients_are_clipped_by_value_before_the_norm():
    """sida_training_loop.py: clip_grad_value_(fake_score.parameters(), 1) before the optimizer step."""
    w = nn.Parameter(torch.zeros(2))
    train = types.SimpleNamespace(adam_betas=[0.0, 0.999], weight_decay=0.0, grad_clip=10.0, lr_warmup_steps=0,
                                  lr_schedule="constant", max_steps=10)
    opt = Optimizer([types.SimpleNamespace(parameters=lambda: [w])], 1e-3, types.SimpleNamespace(train=train), False)
    single = types.SimpleNamespace(num_processes=1)
    for clip, expected in ((None, (5.0 ** 2 + 0.5 ** 2) ** 0.5), (1.0, (1.0 + 0.5 ** 2) ** 0.5)):
        w.grad = torch.tensor([5.0, -0.5])
        norm, applied = opt.step(single, clip)
        # the float32 norm of two values: a few roundings of eps32 / 2 relative; 1e-6 is 8 eps32
        assert bool(applied) and float(norm) == pytest.approx(expected, rel=1e-6)


def test_sida_resolved_defaults():
    teacher, fake, head, obj = _sida()
    assert (obj.alpha, obj.gan_weight, obj.gan_generator_weight, obj.gan_critic_weight) == (1.0, 0.5, 1e-4, 1.0)
    assert (obj.gan_start_images, obj.critic_clip_value) == (200_000, 1.0)
    with pytest.raises(ValueError, match="gan_start_images does not apply to dmd2"):
        build("dmd2", teacher, fake, gan_start_images=0)
    for key, bad in (("sigma_grid", "linear"), ("fake_loss", "l1"), ("gan_start_images", -1),
                     ("critic_clip_value", -1.0)):
        cfg = Config()
        setattr(cfg.objective, key, bad)
        with pytest.raises(FastdiffError, match=f"objective.{key}"):
            validate(cfg)


def test_sida_and_uni_instruct_hold_the_generator_as_their_references():
    """sida_training_loop.py and Uni_Instruct's fsim_training_loop.py step the generator only ``if use_gan is False or
    cur_nimg > 100 * 1000``, cur_nimg counting images before the step: at batch 256 steps 0..390 are held (390 x 256 =
    99840) and step 391 (100096) is the first update. With DisBack's stage 1 as well, a step trains only past both."""
    teacher, fake, head, obj = _sida()
    assert obj.generator_hold_images == 100_000
    assert build("sid", teacher, fake).generator_hold_images == 0
    uni = build("uni_instruct", teacher, fake, gan_head=head)
    disback = build("sida", teacher, fake, gan_head=head, backtrack=2, degradation_steps=500, backtrack_interval=10)
    for o in (obj, uni, disback):
        o.images_per_step = 256
    for step in (0, 1, 389, 390, 391, 392, 499, 500, 501, 2000):
        for o in (obj, uni, disback):
            o.step, o.images_seen = step, step * 256
        reference = step * 256 > 100 * 1000
        assert obj.trains_generator() == reference and uni.trains_generator() == reference, step
        assert disback.trains_generator() == (reference and step >= 500), step
        trains = sum(s * 256 > 100_000 for s in range(step))
        assert obj.generator_updates(step) == uni.generator_updates(step) == trains, step
        assert disback.generator_updates(step) == sum(s * 256 > 100_000 and s >= 500 for s in range(step)), step
    with pytest.raises(ValueError, match="generator_hold_images"):
        build("sida", teacher, fake, gan_head=head, generator_hold_images=-1)


def test_sida_generator_held_in_a_run_then_trained(tiny_teacher, tmp_path, capsys):
    """A run with a 4-image hold at batch 2: steps 0, 1, 2 (0, 2, 4 images seen) leave the student as it started
    (the teacher copy), step 3 moves it; the export counts one generator update; the hold is announced."""
    from safetensors.torch import load_file

    from test_consistency import distill
    from test_export_e2e import write_fake_fashion_mnist

    write_fake_fashion_mnist(tmp_path / "fmnist", size=8)
    run = distill(tiny_teacher, tmp_path / "run", "objective.name=sida", f"data.path={tmp_path / 'fmnist'}",
                  "data.resolution=8", "objective.generator_hold_images=4", "train.max_steps=4", "train.ema_decay=0",
                  "train.checkpoint_limit=4")
    assert "held still for its first 4 images (3 steps)" in capsys.readouterr().out

    def generator(step):
        return load_file(str(run / "checkpoints" / f"step-{step:08d}" / "generator.safetensors"))

    start = {k: v for k, v in tiny_teacher_weights(tiny_teacher).items()}
    for step in (1, 2, 3):
        assert all(torch.equal(v, start[k]) for k, v in generator(step).items()), step
    assert any(not torch.equal(v, start[k]) for k, v in generator(4).items())
    info = (run / "student" / "fastdiff.json").read_text()
    assert '"generator_updates": 1' in info


def tiny_teacher_weights(path) -> dict:
    from fastdiff.models.teacher import load_teacher

    return {k: v.float() for k, v in load_teacher(path).model.state_dict().items()}


# --- item 4: the fake-score loss on VP teachers (mingyuanzhou/SiD-LSG) -------------------------------------------

@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_fake_loss_on_vp_teachers_matches_sid_lsg(pred):
    """SiD-LSG training/sid_training_loop.py: t = randint(20, 980); eps MSE, or for v-prediction the v MSE times
    snr / (snr + 1); summed over elements. fastdiff's default (``eps``) is that / N."""
    sched, teacher, fake = _pair(pred)
    obj = SiD(teacher, fake)
    assert obj.fake_loss == "eps" and obj.sigma_grid == "teacher"
    x = torch.rand(6, 1, 8, 8) * 2 - 1
    torch.manual_seed(5)
    loss, _ = obj.critic_loss(x)

    torch.manual_seed(5)
    timesteps = torch.randint(20, 980, (6,))
    noise = torch.randn_like(x)
    with torch.no_grad():
        out = fake.model(sched.add_noise(x, noise, timesteps), timesteps).sample
    if pred == "v_prediction":
        ac = sched.alphas_cumprod[timesteps].reshape(-1, 1, 1, 1)
        snr = ac / (1 - ac)
        per_elem = (out - sched.get_velocity(x, noise, timesteps)) ** 2 * snr / (snr + 1)
    else:
        per_elem = (out - noise) ** 2
    ref = per_elem.sum() / 6
    # inputs re-rounded through sigma (1e-7 relative), amplified by the net and x0 <-> eps/v conversions
    assert_close(loss * x[0].numel(), ref, ref, 800)


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_default_fake_loss_weight_is_bounded_on_vp_teachers(pred):
    """In the epsilon teacher's own units the default weight is 1 at every noise level; EDM's lambda on the same
    teacher weighs the eps error by 1 + 4 sigma^2, unbounded over the table."""
    _, teacher, fake = _pair(pred)
    obj = SiD(teacher, fake)
    sigma, weight = obj.fake_noise_levels(20000, "cpu", obj.fake_loss, FAKE_T_RANGE)
    t = teacher.schedule.timestep(sigma)
    assert int(t.min()) == 20 and int(t.max()) == 979
    eps_units = weight.double() * sigma.double() ** 2
    assert float(eps_units.max() / eps_units.min()) <= 1 + 4 * EPS32  # a few roundings of sigma^-2 * sigma^2
    sigma_e, weight_e = obj.fake_noise_levels(20000, "cpu", "edm")
    edm_eps_units = weight_e.double() * sigma_e.double() ** 2
    assert float(edm_eps_units.max() / edm_eps_units.min()) > 100


def test_fake_loss_defaults_per_teacher_family():
    for pred, expected in (("sample", "edm"), ("epsilon", "eps"), ("v_prediction", "eps")):
        _, teacher, fake = _pair(pred)
        assert default_fake_loss(teacher) == expected
        assert SiD(teacher, fake).fake_loss == SIM(teacher, fake).fake_loss == expected
        assert build("dmd2", teacher, fake).fake_loss == "teacher"  # DMD2: the teacher's own loss
        assert SiD(teacher, fake, fake_loss="edm").fake_loss == "edm"


# --- item 5: SiD-LSG condition dropout ----------------------------------------------------------------------------

def test_condition_dropout_matches_sid_lsg():
    """SiD-LSG sid_training_loop.py: bool_tensor = torch.rand(len(contexts)) < 0.1 -> the null condition."""
    _, _, fake = _pair("epsilon", num_class_embeds=4)
    labels = torch.randint(0, 3, (1000,))
    torch.manual_seed(6)
    ours = drop_conditions(fake, {"class_labels": labels}, 0.1)["class_labels"]
    torch.manual_seed(6)
    drop = torch.rand(1000) < 0.1
    assert torch.equal(ours, torch.where(drop, torch.full_like(labels, 3), labels))
    assert 50 < int(drop.sum()) < 150

    text, uncond = torch.randn(1000, 5, 4), torch.randn(1000, 5, 4)
    torch.manual_seed(6)
    out = drop_conditions(fake, {"encoder_hidden_states": text, "uncond_encoder_hidden_states": uncond}, 0.1)
    assert torch.equal(out["encoder_hidden_states"], torch.where(drop.reshape(-1, 1, 1), uncond, text))
    assert out["uncond_encoder_hidden_states"] is uncond


@pytest.mark.parametrize("scales,drops", [((1.0, 1.0), False), ((2.0, 1.0), True), ((1.0, 2.0), True)])
def test_condition_dropout_only_when_a_fake_guidance_scale_is_not_one(scales, drops, monkeypatch):
    """``cfg_train_fake != 1 or cfg_eval_fake != 1`` turns the dropout on, only in the fake score's update."""
    _, teacher, fake = _pair("epsilon", num_class_embeds=4)
    obj = SiD(teacher, fake, fake_guidance=scales[0], fake_train_guidance=scales[1])
    seen, forward = [], fake.forward
    monkeypatch.setattr(fake, "forward", lambda x, s, cond=None, guidance_scale=None: (
        seen.append(cond["class_labels"]), forward(x, s, cond, guidance_scale))[1])
    labels, x = torch.randint(0, 3, (64,)), torch.randn(64, 1, 8, 8)
    torch.manual_seed(8)
    obj.critic_loss(x, {"class_labels": labels})
    torch.manual_seed(8)
    expected = torch.where(torch.rand(64) < 0.1, torch.full_like(labels, 3), labels) if drops else labels
    assert torch.equal(seen[0], expected) and drops == (not torch.equal(seen[0], labels))
    seen.clear()
    obj.generator_loss(x, {"class_labels": labels})
    assert torch.equal(seen[0], labels)  # the generator loss keeps every condition


# --- item 6: noise-level grids ------------------------------------------------------------------------------------

def test_karras_grid_matches_dmd2_and_sid_within_the_teacher_range():
    """DMD2 main/edm/edm_guidance.py: flip(get_sigmas_karras(1000, sigma_min, sigma_max, rho=7)), indexed by
    randint(min_step, min(max_step + 1, 1000)); SiD training/sid_loss.py: the same curve at 1 - rnd_t."""
    _, teacher, _ = _pair("sample")
    schedule = teacher.schedule
    lo, hi = schedule.sigma_min, schedule.sigma_max
    ramp = torch.linspace(0, 1, 1000, dtype=torch.float64)
    min_inv, max_inv = lo ** (1 / 7), hi ** (1 / 7)
    dmd2 = torch.flip((max_inv + ramp * (min_inv - max_inv)) ** 7, dims=[0])
    grid = karras_grid(schedule)
    assert_close(grid.double(), dmd2, dmd2, 8)  # one float32 rounding (the rest in float64)
    # inside the table, up to the float32 rounding of its float64 ends
    assert float(grid.min()) >= lo * (1 - EPS32) and float(grid.max()) <= hi * (1 + EPS32)
    assert bool((grid[1:] > grid[:-1]).all())
    rnd_t = torch.arange(1000, dtype=torch.float64) / 999
    sid = (max_inv + (1 - rnd_t) * (min_inv - max_inv)) ** 7
    assert_close(grid.double(), sid, sid, 8)

    torch.manual_seed(9)
    ours = sample_sigma(schedule, 512, 0.02, 0.98, "cpu", "karras")
    torch.manual_seed(9)
    ref = dmd2[torch.randint(int(0.02 * 1000), min(int(0.98 * 1000) + 1, 1000), [512])]
    assert_close(ours.double(), ref, ref, 8)


def test_sigma_grid_defaults_per_teacher_family():
    for pred, expected in (("sample", "teacher"), ("epsilon", "teacher"), ("v_prediction", "teacher")):
        _, teacher, fake = _pair(pred)
        assert default_sigma_grid(teacher) == expected
        for name in ("dmd2", "sid", "sida", "sim"):
            head = GANHead(fake, "sida") if name == "sida" else None
            assert build(name, teacher, fake, gan_head=head).sigma_grid == expected
        assert build("sid", teacher, fake, sigma_grid="karras").sigma_grid == "karras"
    with pytest.raises(ValueError, match="sigma_grid does not apply to cd"):
        build("cd", teacher, None, student=fake, sigma_grid="karras")


def test_shifted_grid_draws_the_flow_schedules_shifted_levels():
    """``sigma_grid: shifted`` (FastGen's ``time_dist_type = "shifted"``): t' = s t / (1 + (s - 1) t), which in
    the VE scale is the unshifted sigma times s (t' / (1 - t') = s t / (1 - t)), an identity independent of the
    code's formula; its smallest level is the schedule's own sigma_min. Only flow schedules have a shift."""
    schedule = FlowSchedule(1000, shift=3.0)
    torch.manual_seed(4)
    plain = sample_sigma(schedule, 4096, 0.0, 1.0, "cpu", "teacher")
    torch.manual_seed(4)
    shifted = sample_sigma(schedule, 4096, 0.0, 1.0, "cpu", "shifted")
    # both round a float64 value to float32 once: 2 float32 roundings of a value of size `shifted`
    assert_close(shifted, 3.0 * plain.double(), shifted, 2)
    assert float(shifted.min()) >= schedule.sigma_min * (1 - 2 * EPS32)
    torch.manual_seed(4)
    assert torch.equal(sample_sigma(FlowSchedule(1000, shift=1.0), 64, 0.0, 1.0, "cpu", "shifted"), plain[:64])
    _, teacher, fake = _pair("epsilon")
    with pytest.raises(ValueError, match="shift of a flow teacher's schedule; this teacher's is a vp table"):
        build("dmd2", teacher, fake, sigma_grid="shifted")
    cfg = Config()
    cfg.objective.sigma_grid = "shifted"
    validate(cfg)


def test_edm_fake_loss_levels_stay_in_the_teacher_range():
    _, teacher, _ = _pair("sample")
    sigma = edm_sigma(teacher.schedule, 20000, "cpu")
    lo, hi = teacher.schedule.sigma_min, teacher.schedule.sigma_max  # float64 ends, rounded once to float32
    assert float(sigma.min()) >= lo * (1 - EPS32) and float(sigma.max()) <= hi * (1 + EPS32)


# --- item 7: DMD2's GAN noise levels over the whole schedule ------------------------------------------------------

@pytest.mark.parametrize("pred", ["epsilon", "sample"])
def test_dmd2_gan_noise_levels_cover_the_whole_schedule(pred):
    """DMD2 compute_cls_logits with --diffusion_gan_max_timestep 1000: timesteps = randint(0, 1000);
    main/sd_guidance.py noises with scheduler.add_noise, main/edm/edm_guidance.py with karras_sigmas[t]."""
    sched, teacher, fake = _pair(pred)
    # sd_guidance.py on its DDPM table; edm_guidance.py on its Karras grid
    obj = build("dmd2", teacher, fake, gan_head=GANHead(fake), sigma_grid="teacher" if pred == "epsilon" else "karras")
    x = torch.rand(256, 1, 8, 8) * 2 - 1
    torch.manual_seed(10)
    x_t, sigma = obj.gan_noised(x)
    torch.manual_seed(10)
    timesteps = torch.randint(0, 1000, [256])
    noise = torch.randn_like(x)
    if pred == "epsilon":
        ref = sched.add_noise(x, noise, timesteps)
        ours = x_t * teacher.schedule.alpha(sigma).reshape(-1, 1, 1, 1)
        assert torch.equal(teacher.schedule.timestep(sigma).long(), timesteps)
        assert_close(ours, ref, ref.abs().max(), 8)
    else:
        ref_sigma = karras_grid(teacher.schedule)[timesteps]
        assert torch.equal(sigma, ref_sigma)
        assert_close(x_t, x + ref_sigma.reshape(-1, 1, 1, 1) * noise, x_t.abs().max(), 4)
    assert int(timesteps.min()) < 20 and int(timesteps.max()) > 980  # beyond the DM range [0.02, 0.98]


def test_dmd2_gan_calls_use_the_whole_schedule(monkeypatch):
    _, teacher, fake = _pair("epsilon")
    head = GANHead(fake)
    obj = build("dmd2", teacher, fake, gan_head=head)
    seen, forward = [], head.forward
    monkeypatch.setattr(head, "forward", lambda x, s, cond=None: (seen.append(s), forward(x, s, cond))[1])
    torch.manual_seed(12)
    x = torch.rand(256, 1, 8, 8) * 2 - 1
    obj.critic_loss(x, None, (x.clone(), None))
    obj.generator_loss(x.clone().requires_grad_())
    assert len(seen) == 3
    for s in seen:
        t = teacher.schedule.timestep(s)
        assert float(t.min()) < 20 and float(t.max()) > 980


def test_karras_grid_draws_small_noise_levels_more_often_than_the_ddpm_table():
    """README's figure: on the linear-beta DDPM table sigma < 0.1 is 2.7% of the timesteps, 13.1% of the grid."""
    schedule = schedule_from_scheduler(DDPMScheduler())
    assert float((schedule.sigmas < 0.1).double().mean()) == pytest.approx(0.027)
    assert float((karras_grid(schedule) < 0.1).double().mean()) == pytest.approx(0.131)


# --- sample_sigma on flow teachers: the draw's clamp ------------------------------------------------------------

def test_flow_sigma_draws_are_clamped_off_both_ends(monkeypatch):
    """``sample_sigma`` on a flow teacher (grid "teacher", fastdiff/objectives/base.py): t uniform on [lo, hi],
    clamped to [1/T, 1 - 1e-4], sigma = t / (1 - t). No reference repository has this rule; the test transcribes
    fastdiff's own (the function's docstring and comment): the lower end 1/T is FlowSchedule's t_min at shift 1 (the
    lowest of diffusers' FlowMatchEulerDiscreteScheduler training levels t = k/T), the upper end keeps sigma finite
    (t = 1 is pure noise, sigma = inf). It sets the largest level of every flow-teacher draw with hi near 1: DMD2's
    fake-score loss (t_range (0, 1)), its GAN noising and FADA's.

    ``torch.rand`` is patched to return 0, 1/2 and 1 - 1e-9, the ends and the middle of its range; the sigmas are
    1/999, 1 and (1 - 1e-4) / 1e-4 = 9999, computed here in float64. fastdiff's value is that float64 quotient
    rounded once to float32 (half an eps32 relative); eps32 allowed. Then 10^5 real draws (seeded): the largest t is
    above 1 - 1e-4 (a miss has probability e^-10), so the largest sigma is the clamp's 9999, well past the 99 a
    clamp at 1 - 1e-2 would give."""
    from fastdiff.models.schedule import FlowSchedule

    schedule = FlowSchedule(1000)
    eps32 = torch.finfo(torch.float32).eps
    for u, t in ((0.0, 1 / 1000), (0.5, 0.5), (1 - 1e-9, 1 - 1e-4)):
        def rand(n, dtype=None, device=None, u=u, **_):
            return torch.full((n,), u, dtype=dtype, device=device)

        monkeypatch.setattr(torch, "rand", rand)
        sigma = sample_sigma(schedule, 3, 0.0, 1.0, "cpu")
        expected = t / (1 - t)
        assert sigma.dtype == torch.float32
        assert float((sigma.double() - expected).abs().max()) <= eps32 * expected, (u, sigma, expected)
    monkeypatch.undo()
    torch.manual_seed(0)
    sigma = sample_sigma(schedule, 100_000, 0.0, 1.0, "cpu")
    assert float(sigma.max()) > 99
    assert abs(float(sigma.max()) - 9999) <= eps32 * 9999
    assert float(sigma.min()) >= (1 - eps32) / 999  # and none below the lower clamp's 1/999


# --- SiDA's generator GAN term: its logit clamp -------------------------------------------------------------------

@pytest.mark.parametrize("shape", ["per-image", "map"])
def test_sida_generator_gan_term_clamps_logits_at_ten(shape):
    """``sida_generator_gan_loss`` against mingyuanzhou/SiD (branch sida) sida_training/sida_loss.py
    ``generator_share_encoder_loss`` (``loss_gan = BCEWithLogitsLoss()(y_D.clamp(-10, 10), ones) / weight_factor``)
    and sida_training_loop.py (``loss_gan.mean(dim=[1, 2, 3]) * N``, summed over the batch, ``* loss_scaling_G_gan /
    batch_gpu_total``), written out on logits far outside the clamp (|D| = 30) and inside it. Units (the function's
    docstring): fastdiff's term is the reference's / (0.01 N), i.e. BCE(clamp(D), 1) * sum(1 / weight_factor) / B.
    The parity test on the objective sees a fresh head's |D| < 1, where any clamp above 1 agrees; here a clamp at
    +-1 would give softplus(1) = 1.31 where +-10 gives 10.00005.

    ``per-image``: one logit per image; ``map``: SiDA's read-out, the encoder output's channel mean, a (B, 1, h, w)
    map in the reference and (B, positions) for fastdiff. The reference runs in float64; fastdiff in float32:
    softplus, a mean over <= 16 positions and 3 samples (<= 5 rounding levels), 1 / norm, its sum and two products,
    each a rounding of the positive terms' size: 16 eps32 of the result."""
    gen = torch.Generator().manual_seed(0)
    if shape == "per-image":
        y_d = torch.tensor([-30.0, -5.0, -0.5, 0.5, 5.0, 30.0], dtype=torch.float64).reshape(6, 1, 1, 1)
    else:  # 3 images, 4x4 maps spanning [-30, 30]
        y_d = torch.linspace(-30, 30, 48, dtype=torch.float64)[torch.randperm(48, generator=gen)].reshape(3, 1, 4, 4)
    batch = y_d.shape[0]
    weight_factor = torch.tensor([0.3, 0.7, 1.1, 0.05, 2.0, 0.9], dtype=torch.float64)[:batch].reshape(-1, 1, 1, 1)
    numel = 64  # N: elements of a sample (the generator's image), any value: it cancels in the units
    loss_gan = torch.nn.BCEWithLogitsLoss()(y_d.clamp(-10, 10), torch.ones_like(y_d)) / weight_factor
    loss_gan = (loss_gan.mean(dim=[1, 2, 3], keepdim=True) * numel).sum() * 0.01 / batch
    ref = loss_gan / (0.01 * numel)

    from fastdiff.objectives.gan import sida_generator_gan_loss

    logits = y_d.float().flatten(1) if shape == "map" else y_d.float().flatten()
    ok = torch.ones(batch, dtype=torch.bool)
    ours = sida_generator_gan_loss(logits, weight_factor.flatten().float(), ok)
    assert_close(ours, ref, ref, 16)
    # teeth: the largest logits are past the clamp, and clamping at +-1 instead would change the value by > 10%
    assert float(y_d.abs().max()) > 10
    at_one = torch.nn.BCEWithLogitsLoss()(y_d.clamp(-1, 1), torch.ones_like(y_d)) * (1 / weight_factor).sum() / batch
    assert abs(float(at_one - ref)) > 0.1 * float(ref)
