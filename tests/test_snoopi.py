"""SNOOPI's PG-SB (fastdiff/objectives/snoopi.py): VSD with the real score's CFG scale drawn per sample per step."""
import copy
import json
import math

import pytest
import torch

from fastdiff.config import load_config
from fastdiff.models.lora import lora_rank
from fastdiff.models.teacher import load_teacher
from fastdiff.objectives import build
from fastdiff.objectives import dmd2 as dmd2_module
from fastdiff.training.networks import fake_score_model
from test_export_e2e import TRAINERS, assert_pipeline_matches, distill_on_fake_images

EPS32 = torch.finfo(torch.float32).eps


def denoisers(path):
    """The tiny class-conditional teacher (null class 3) and a fake score that differs from it, as a trained LoRA."""
    teacher = load_teacher(path, null_class=3)
    fake_model = copy.deepcopy(teacher.model)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in fake_model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    d = teacher.denoiser
    return d, type(d)(fake_model, d.schedule, d.prediction_type, null_class=3)


def fixed_noise(monkeypatch, x):
    """DMD2's noised() replaced by one fixed draw, so two objectives see the same x_t and sigma."""
    torch.manual_seed(1)
    sigma = torch.tensor([0.1, 0.7, 2.0, 9.0])
    eps = torch.randn_like(x)
    monkeypatch.setattr(dmd2_module, "noised", lambda x0, *args: (x0 + sigma.reshape(-1, 1, 1, 1) * eps, sigma))


def test_draws_lie_in_the_range_and_change_per_sample_and_step(tiny_cond_teacher, monkeypatch):
    teacher, fake = denoisers(tiny_cond_teacher)
    obj = build("pg-sb", teacher, fake, real_guidance_range=[2.0, 5.0])
    x = torch.randn(4, 1, 8, 8)
    fixed_noise(monkeypatch, x)
    cond = {"class_labels": torch.tensor([0, 1, 2, 0])}
    torch.manual_seed(5)
    draws = []
    for _ in range(3):
        _, logs = obj.generator_loss(x.clone().requires_grad_(True), cond)
        draws.append(obj.last_real_guidance)
        # the same float32 mean of 4 draws in [2, 5] (measured equal); 1e-6 is ~2 ulps of 5 for another sum order
        assert float(logs["real_guidance_mean"]) == pytest.approx(float(draws[-1].mean()), abs=1e-6)
    all_draws = torch.stack(draws)
    assert all_draws.min() >= 2.0 and all_draws.max() <= 5.0
    assert len(set(all_draws.flatten().tolist())) == all_draws.numel()  # every sample, every step its own scale
    torch.manual_seed(5)  # seeded: the same global RNG state gives the same scales
    obj.generator_loss(x.clone().requires_grad_(True), cond)
    assert torch.equal(obj.last_real_guidance, draws[0])
    # the teacher's fixed scale is back after each step
    assert teacher.guidance_scale == 1.0


def test_registered_defaults_and_bad_range(tiny_cond_teacher):
    teacher, fake = denoisers(tiny_cond_teacher)
    obj = build("pg-sb", teacher, fake)
    # SNOOPI's Table 6 (SD 1.5 / 2.1): kappa in (0.5, 4); Table 2: both scores guided
    assert obj.real_guidance_range == (0.5, 4.0) and obj.guide_fake and obj.weighting == "vsd"
    assert obj.critic_updates == 1
    assert obj.train_defaults() == {**build("vsd", teacher, fake).train_defaults(), "lr_generator": 1e-6}
    assert build("pg-sb", teacher, fake, real_guidance_range=[0.0, 0.5]).real_guidance_range == (0.0, 0.5)
    teacher.guidance_scale = 3.0  # a fixed scale beside the range would be silently replaced by the draws
    with pytest.raises(ValueError, match="teacher.guidance_scale 3.0 is not used by pg-sb"):
        build("pg-sb", teacher, fake)
    assert build("vsd", teacher, fake).teacher.guidance_scale == 3.0  # vsd is the one-fixed-scale objective
    teacher.guidance_scale = 1.0
    for bad in ([-0.5, 2.0], [3.0, 2.0], [1.0, 2.0, 3.0]):
        with pytest.raises(ValueError, match="real_guidance_range"):
            build("pg-sb", teacher, fake, real_guidance_range=bad)


def test_gradient_at_each_drawn_scale_is_vsd_at_that_scale(tiny_cond_teacher, monkeypatch):
    """With ``guide_fake`` off, sample i's generator gradient equals vsd's row i with ``teacher.guidance_scale = w_i``
    (its own draw).

    Exact: both run the same teacher and fake forwards on the same batch (x_t, sigma, labels); they differ only in
    ``x0_u + w (x0_c - x0_u)`` with w a float32 (B,) tensor broadcast vs the same float32 value as a Python scalar,
    the same single rounding per element; the loss is a per-sample sum, so row i depends on sample i alone."""
    teacher, fake = denoisers(tiny_cond_teacher)
    cond = {"class_labels": torch.tensor([0, 1, 2, 1])}
    x = torch.randn(4, 1, 8, 8)
    fixed_noise(monkeypatch, x)
    obj = build("pg-sb", teacher, fake, real_guidance_range=[1.5, 7.0], guide_fake=False)
    xs = x.clone().requires_grad_(True)
    (ours,) = torch.autograd.grad(obj.generator_loss(xs, cond)[0], xs)
    scales = obj.last_real_guidance
    assert ours.abs().max() > 0
    vsd = build("vsd", teacher, fake)
    for i, w in enumerate(scales.tolist()):
        teacher.guidance_scale = w
        xv = x.clone().requires_grad_(True)
        (ref,) = torch.autograd.grad(vsd.generator_loss(xv, cond)[0], xv)
        assert torch.equal(ours[i], ref[i]), (i, w, (ours[i] - ref[i]).abs().max())
        # and the scale matters: at another scale row i differs
        teacher.guidance_scale = w + 1.0
        xo = x.clone().requires_grad_(True)
        (other,) = torch.autograd.grad(vsd.generator_loss(xo, cond)[0], xo)
        assert not torch.allclose(ours[i], other[i])
    teacher.guidance_scale = 1.0


def test_unconditional_call_is_vsd(tiny_teacher, monkeypatch):
    """Without a condition CFG is the identity (cond = uncond): no draw, vsd's gradient exactly (the unconditional
    tiny DDPM teacher, as the GMM benchmark's)."""
    teacher, fake = denoisers(tiny_teacher)
    x = torch.randn(4, 1, 8, 8)
    fixed_noise(monkeypatch, x)
    grads = []
    for name in ("pg-sb", "vsd"):
        xs = x.clone().requires_grad_(True)
        grads.append(torch.autograd.grad(build(name, teacher, fake).generator_loss(xs, None)[0], xs)[0])
    assert torch.equal(*grads)


def test_pg_sb_trains_exports_and_loads(tiny_cond_teacher, tmp_path):
    run, logs = distill_on_fake_images(tiny_cond_teacher, tmp_path, "objective.name=pg-sb",
                                       "objective.real_guidance_range=[2.0,4.0]", "teacher.guidance_scale=1.0")
    assert all(math.isfinite(v) for row in logs for v in row.values() if isinstance(v, (int, float)))
    assert all(2.0 <= row["real_guidance_mean"] <= 4.0 for row in logs)
    assert json.loads((run / "student" / "fastdiff.json").read_text())["objective"] == "pg-sb"
    assert run.resolve() in TRAINERS
    assert_pipeline_matches(run / "student", labels=[0, 1, 2])


def test_generator_gradient_matches_swiftbrush_with_per_sample_cfg(tiny_cond_teacher):
    """PG-SB at its defaults (range [0.5, 4], both scores guided) against SwiftBrush's generator update written out
    from raw network calls in float64 (VinAIResearch/SwiftBrush ``train_swiftbrush.py``; SNOOPI's PG-SB: the CFG scale
    drawn per sample, for the teacher and the LoRA teacher alike, its Table 2): x_t = sqrt(acp) x + sqrt(1 - acp) eps
    at integer t in [20, 980]; each network's eps with the labels and with the null label, ``eps_cfg = eps_u + w_i
    (eps_c - eps_u)`` for the teacher and for the LoRA fake score; ``grad = s_t^2 (eps_cfg - eps_fake_cfg)`` (s_t^2 = 1 - acp, README's VSD row); ``loss = 0.5 mse(x, sg(x - grad))``,
    mean over every element. fastdiff's loss is in the same units (per-sample element means summed / B).

    The teacher is the tiny v-prediction one, so each eps is ``s x_t + a v``. w_i are re-drawn here from the same seed
    in fastdiff's order (timesteps, noise, then the scales) and must equal the ones the objective used."""
    teacher = load_teacher(tiny_cond_teacher, null_class=3)
    fake_net = fake_score_model(load_config(None, ["objective.name=pg-sb"]), teacher)
    assert lora_rank(fake_net) == 64  # SNOOPI's Table 6
    torch.manual_seed(0)
    with torch.no_grad():  # a trained LoRA: the zero-initialised up projections moved
        for name, p in fake_net.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    d = teacher.denoiser
    obj = build("pg-sb", d, type(d)(fake_net, d.schedule, d.prediction_type, null_class=3))
    lo, hi = obj.real_guidance_range
    assert (lo, hi) == (0.5, 4.0)
    batch, labels = 4, torch.tensor([0, 1, 2, 1])
    torch.manual_seed(21)
    x = torch.randn(batch, 1, 8, 8).requires_grad_(True)
    torch.manual_seed(22)
    loss, _ = obj.generator_loss(x, {"class_labels": labels})
    loss.backward()

    torch.manual_seed(22)
    t = torch.randint(20, 981, (batch,))
    noise = torch.randn(batch, 1, 8, 8).double()  # float32 draw, as fastdiff's randn_like
    w = lo + (hi - lo) * torch.rand(batch)
    assert torch.equal(w, obj.last_real_guidance)
    # per-sample scales: inside the range and all different (a per-batch scalar draw would fail below)
    assert bool((w >= lo).all() and (w <= hi).all()) and len(set(w.tolist())) == batch
    acp = teacher.scheduler.alphas_cumprod.double()[t].reshape(-1, 1, 1, 1)
    a, s = acp.sqrt(), (1 - acp).sqrt()
    real64, fake64 = copy.deepcopy(teacher.model).double(), copy.deepcopy(fake_net).double()
    y = x.detach().double().requires_grad_(True)
    x_t = (a * y + s * noise).detach()
    with torch.no_grad():
        v_c = real64(x_t, t, class_labels=labels).sample
        v_u = real64(x_t, t, class_labels=torch.full_like(labels, 3)).sample  # the null label
        v_f = fake64(x_t, t, class_labels=labels).sample
        v_fu = fake64(x_t, t, class_labels=torch.full_like(labels, 3)).sample
        eps_c, eps_u, eps_f, eps_fu = (s * x_t + a * v for v in (v_c, v_u, v_f, v_fu))

    def reference(scales):
        w_ = scales.double().reshape(-1, 1, 1, 1)
        grad = s ** 2 * ((eps_u + w_ * (eps_c - eps_u)) - (eps_fu + w_ * (eps_f - eps_fu)))
        y.grad = None
        value = 0.5 * torch.nn.functional.mse_loss(y, (y - grad).detach())
        value.backward()
        return value.detach(), y.grad.clone()

    ref_loss, ref_grad = reference(w)
    # fastdiff is float32 (the reference float64). Per sample: the native input and x0 = a x_t - s v rounded, each
    # pass's output off by a few roundings of |x_t| + |v|, the CFG combination multiplying the two teacher errors by up
    # to w (1 + 2 w for each of the two guided scores), times the VSD weight a s: 16 roundings of that; then the
    # surrogate's x - (x - grad), two roundings of |x|; all over numel (the mean). Measured: under 1 of the first part.
    mags = torch.stack([v.abs().amax(dim=(1, 2, 3)) for v in (v_c, v_u, v_f, v_fu)]).amax(0) + x_t.abs().amax(dim=(1, 2, 3))
    per_sample = 16 * (a * s).flatten() * 2 * (1 + 2 * w.double()) * mags + 2 * y.detach().abs().amax(dim=(1, 2, 3))
    bound = EPS32 * per_sample.reshape(-1, 1, 1, 1) / x.numel()
    assert bool(((x.grad.double() - ref_grad).abs() <= bound).all()), float((x.grad.double() - ref_grad).abs().max())
    # The loss 0.5 mean(d^2), d = numel * grad_x: an error numel * bound on each d moves it by at most
    # numel * sum(|ref_grad| bound), plus the float32 mean's own rounding (a few eps of the loss).
    loss_bound = x.numel() * float((ref_grad.abs() * bound).sum()) + 16 * EPS32 * float(ref_loss)
    assert abs(float(loss.detach()) - float(ref_loss)) <= loss_bound
    # the scales matter: one scale for the whole batch (the batch mean of the draws) is far outside the bound
    _, batch_scalar = reference(w.mean().expand(batch))
    assert float(((x.grad.double() - batch_scalar).abs() - bound).max()) > 100 * float(bound.max())


def test_fake_score_guided_by_the_same_draw_and_trained_with_null_conditions(tiny_cond_teacher, monkeypatch):
    """guide_fake (the default): the fake score's x0 is ``x0f_u + w_i (x0f_c - x0f_u)`` with the real score's own
    draw w_i, from two separate fake-score calls here (labels, null label); its denoising loss sees the null class
    for about 10% of the samples (SiD-LSG's rate), and none with guide_fake off or in plain vsd."""
    teacher, fake = denoisers(tiny_cond_teacher)
    cond = {"class_labels": torch.tensor([0, 1, 2, 1])}
    x = torch.randn(4, 1, 8, 8)
    fixed_noise(monkeypatch, x)
    obj = build("pg-sb", teacher, fake)
    x_t, sigma = dmd2_module.noised(x, None)
    torch.manual_seed(3)
    grad = obj.dm_gradient(x, x_t, sigma, cond)
    w = obj.last_real_guidance.reshape(-1, 1, 1, 1)
    with torch.no_grad():
        null = {"class_labels": torch.full((4,), 3)}
        real = teacher(x_t, sigma, null) + w * (teacher(x_t, sigma, cond) - teacher(x_t, sigma, null))
        fake_cfg = fake(x_t, sigma, null) + w * (fake(x_t, sigma, cond) - fake(x_t, sigma, null))
        sched = teacher.schedule
        ref = (sched.alpha(sigma) * sched.noise_scale(sigma)).reshape(-1, 1, 1, 1) * (fake_cfg - real)
    # the same float32 networks; CFG combined in another order than Denoiser's (a few roundings of |x0| (1 + 2 w))
    bound = 16 * EPS32 * (1 + 2 * w) * torch.stack([real.abs(), fake_cfg.abs()]).amax() * sched.alpha(sigma).reshape(-1, 1, 1, 1)
    assert bool(((grad - ref).abs() <= bound * sched.noise_scale(sigma).reshape(-1, 1, 1, 1) + 1e-30).all())
    unguided = build("pg-sb", teacher, fake, guide_fake=False)
    torch.manual_seed(3)
    assert not torch.allclose(unguided.dm_gradient(x, x_t, sigma, cond), grad)

    seen = []
    forward = type(fake).forward

    def spy(self, x_, sigma_, c=None, guidance_scale=None):
        if self is fake and c:
            seen.append(c["class_labels"].clone())
        return forward(self, x_, sigma_, c, guidance_scale)

    monkeypatch.setattr(type(fake), "forward", spy)
    labels = {"class_labels": torch.zeros(2000, dtype=torch.long)}
    samples = torch.randn(2000, 1, 8, 8)
    torch.manual_seed(4)
    for name, kwargs, expect in (("pg-sb", {}, 0.1), ("pg-sb", {"guide_fake": False}, 0.0), ("vsd", {}, 0.0)):
        seen.clear()
        build(name, teacher, fake, **kwargs).critic_loss(samples, labels)
        share = float((torch.cat(seen) == 3).double().mean())
        # binomial sd at n = 2000, p = 0.1: 0.0067; 5 sd
        assert abs(share - expect) <= (0.034 if expect else 0.0), (name, kwargs, share)
