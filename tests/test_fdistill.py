"""f-distill and Uni-Instruct: their weights against the paper / reference formulas, their gradients against autograd
of the divergences on Gaussians (exact density ratios), their reductions to DMD2 and SiD, and a tiny end-to-end run.

The Gaussian case is tests/test_objective_gradients.py's: generator x0 = mu + s z (theta = mu, log s) in 1x2x2, an
isotropic Gaussian teacher, a frozen copy of the generator's law as the fake score, 400k samples at one noise level.
"""
import json
import math
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDPMScheduler

from conftest import tiny_unet
from fastdiff.errors import FastdiffError
from fastdiff.models.denoiser import Denoiser
from fastdiff.models.schedule import schedule_from_scheduler
from fastdiff.objectives import DMD2, SiD, build
from fastdiff.objectives.base import noised, per_sample_mean
from fastdiff.objectives.fdistill import DIVERGENCES, DensityRatio, FDistill
from fastdiff.objectives.gan import GANHead, sida_generator_gan_loss
from fastdiff.objectives.sid import sid_loss
from fastdiff.objectives.uni_instruct import UniInstruct, di_loss, expanded_loss, expansion_weights
from test_export_e2e import TRAINERS, assert_pipeline_matches, distill_on_fake_images
from test_objective_gradients import (TAU, assert_mc_differ, assert_mc_equal, exact_denoisers, gaussian_case, grads,
                                      sample)

# The paper's f (Xu et al. 2025, Table 1; Uni-Instruct's Chi-Square), float64; h = f''(r) r^2 up to a constant.
PAPER_F = {
    "rkl": lambda r: -torch.log(r),
    "kl": lambda r: r * torch.log(r),
    "js": lambda r: r * torch.log(r) - (1 + r) * torch.log((1 + r) / 2),
    "sf": lambda r: (1 + r) * torch.log((1 + r) / (2 * r)),
    "sh": lambda r: (torch.sqrt(r) - 1) ** 2,
    "jf": lambda r: (r - 1) * torch.log(r),
    "neyman": lambda r: (1 - r) ** 2 / r,
    "chi2": lambda r: (r - 1) ** 2,
}
# Transcribed from NVlabs/FastGen fastgen/methods/distribution_matching/f_distill.py, all_f_div_weighting_function.
FASTGEN_H = {
    "rkl": lambda r: torch.ones_like(r),
    "kl": lambda r: r,
    "js": lambda r: 1 - 1 / (1 + r),
    "sf": lambda r: 1 / (1 + r),
    "neyman": lambda r: 1 / torch.clamp(r, min=1e-8),
    "sh": lambda r: r ** 0.5,
    "jf": lambda r: 1 + r,
}


def second_derivative(f, r):
    r = r.clone().requires_grad_(True)
    (d1,) = torch.autograd.grad(f(r).sum(), r, create_graph=True)
    (d2,) = torch.autograd.grad(d1.sum(), r)
    return d2


def test_h_is_f_second_derivative_times_r_squared_and_fastgens_table():
    r = torch.logspace(-1, math.log10(20), 50, dtype=torch.float64)  # the clamp range [0.1, 20]
    for name, f in PAPER_F.items():
        h = DIVERGENCES[name](r)
        expected = second_derivative(f, r) * r ** 2
        ratio = h / expected  # a constant (the batch normalisation removes it); float64, so 1e-12
        assert torch.allclose(ratio, ratio[0].expand_as(ratio), rtol=1e-12), name
        if name in FASTGEN_H:
            assert torch.allclose(h, FASTGEN_H[name](r), rtol=1e-15), name


def fastgen_ratio_weights(logits, position, bins, ema_rate, h, lower=0.1, upper=20.0, min_t=0.0, max_t=1.0):
    """FastGen f_distill.py ``_get_f_div_weighting_h``, transcribed (float64); returns (h, bins). ``position`` is
    FastGen's t, binned over its [min_t, max_t] (default [0, 1], where t is the position itself)."""
    ratio = torch.exp(torch.clamp(logits, min=-10.0, max=10.0))
    ratio = torch.clamp(ratio, lower, upper)
    n = len(bins)
    bin_width = (max_t - min_t) / n
    idx = ((position - min_t) / bin_width).floor().long().clamp(0, n - 1)
    cnt = torch.bincount(idx, minlength=n).double()
    ratio_sum = torch.bincount(idx, weights=ratio, minlength=n).double()
    valid = cnt > 0
    bins = bins.clone()
    bins[valid] = bins[valid] * ema_rate + (1 - ema_rate) * (ratio_sum / (cnt + 1e-6))[valid]
    ratio = ratio / (bins[idx] + 1e-6)
    out = h(ratio)
    return out / (out.sum() / len(out) + 1e-6), bins


@pytest.mark.parametrize("ema_rate", [0.0, 0.5, 0.9])  # FastGen's CIFAR-10 0, ImageNet-64 0.5, and a slow EMA
def test_ratio_normalisation_matches_fastgen(ema_rate):
    """At 0.5 the EMA is symmetric in the old bins and the batch's means: 0 and 0.9 tell the two weights apart."""
    gen = torch.Generator().manual_seed(0)
    module = DensityRatio(bins=10, ema_rate=ema_rate)
    bins = torch.ones(10, dtype=torch.float64)
    for step in range(3):  # the EMA carries over steps
        logits = 4 * torch.randn(256, generator=gen, dtype=torch.float64)  # some beyond the clamps
        position = torch.rand(256, generator=gen, dtype=torch.float64) * 0.97  # bin 9 is often empty
        expected, bins = fastgen_ratio_weights(logits, position, bins, ema_rate, FASTGEN_H["js"])
        h = DIVERGENCES["js"](module(logits.float(), position.float()))
        h = h / h.mean()
        # FastGen's 1e-6 stabilisers shift values of order 1 by ~1e-6 (a fixed offset: 3.1e-6 - 3.3e-6 relative with
        # the module in float64 too); float32 rounding of a few operations adds <= 2e-7 (measured): rtol 1e-5 leaves
        # 30x that.
        assert torch.allclose(h.double(), expected, rtol=1e-5), step
        assert torch.allclose(module.bins.double(), bins, rtol=1e-5)


def test_level_position_and_f_weights_bin_over_dmd2s_range():
    """The bins cover the range the DMD levels are drawn from, DMD2's [0.02, 0.98] T, not [0, 1]: FastGen
    f_distill.py ``_get_f_div_weighting_h`` bins t over its ``[min_t, max_t]`` (``idx = ((t - min_t) / bin_width)
    .floor().clamp(0, bins - 1)``, ``bin_width = (max_t - min_t) / bins``), so fastdiff's ``level_position`` must be
    ``((t / T - min_t) / (max_t - min_t)).clamp(0, 1)``. On [0, 1] (the other tests) that is t itself.

    level_position: every timestep 0..999 of the teacher's table (``timestep`` snaps sigma_at's round trip to the
    integer), against the formula in float64: a subtraction and a division on values <= 1, a few eps64. f_weights:
    ``FDistill.f_weights`` (js, FastGen's default; EMA 0.5, two steps) against ``fastgen_ratio_weights`` with FastGen's
    own t and range. Timesteps exactly on a bin edge (t = 0.02 + 0.096 j) are left out of the draws: there FastGen's
    ``(t - min_t) / bin_width`` and fastdiff's ``position * bins`` round to either side (3 of the 11 edges differ),
    a choice no continuous t makes. The tolerance is test_ratio_normalisation_matches_fastgen's (FastGen's 1e-6
    stabilisers, a fixed ~3e-6 relative offset)."""
    from fastdiff.objectives.fdistill import level_position

    c, head = gan_case()
    fd = FDistill(c["teacher"], c["fake"], gan_head=head, ratio_ema_rate=0.5)
    assert (fd.min_t, fd.max_t, fd.divergence) == (0.02, 0.98, "js")
    schedule = c["teacher"].schedule
    T = schedule.num_train_timesteps
    ts = torch.arange(T)
    position = level_position(schedule, schedule.sigma_at(ts), 0.02, 0.98)
    expected = ((ts.double() / T - 0.02) / (0.98 - 0.02)).clamp(0, 1)
    eps64 = torch.finfo(torch.float64).eps
    assert float((position - expected).abs().max()) <= 4 * eps64
    assert float(position[20]) == 0 and float(position[980]) == 1 and float(position[21]) > 0

    off_edges = ts[((ts - 20) % 96 != 0) | (ts < 20) | (ts > 980)]
    gen = torch.Generator().manual_seed(0)
    bins = torch.ones(10, dtype=torch.float64)
    for step in range(2):
        t = off_edges[torch.randint(len(off_edges), (256,), generator=gen)]
        logits = 4 * torch.randn(256, generator=gen)
        h = fd.f_weights(logits, schedule.sigma_at(t))
        want, bins = fastgen_ratio_weights(logits.double(), t.double() / T, bins, 0.5, FASTGEN_H["js"],
                                           min_t=0.02, max_t=0.98)
        assert torch.allclose(h.double(), want, rtol=1e-5), step
        assert torch.allclose(fd.ratio.bins.double(), bins, rtol=1e-5), step


def test_fdistill_weight_is_the_f_divergence_gradient_on_gaussians():
    """sum(h(r) * DMD gradient) against autograd of D_f(p_real || p_fake) = E_fake[f(r)] at one noise level, with
    the exact ratio; the VSD weighting makes the per-level factor the constant a s sigma^2 (as for the KL test)."""
    c = gaussian_case()
    sigma = c["sigma"][0]
    a, s_t = 1 / torch.sqrt(1 + sigma ** 2), sigma / torch.sqrt(1 + sigma ** 2)
    dmd = DMD2(c["teacher"], c["fake"], weighting="vsd")
    for name in ("kl", "js"):
        def surrogate(case, weighted=True):
            x, x_t = sample(case)
            h = DIVERGENCES[name](exact_log_ratio(case, x_t).detach().exp()).reshape(-1, 1, 1, 1)
            g = dmd.dm_gradient(x, x_t, case["sigma"], None)
            # unweighted: DMD's direction scaled by the mean weight
            return grads((x * g * (h if weighted else h.mean())).sum() / x.shape[0], case)

        def expected(case):  # the divergence's gradient on the same samples
            x, x_t = sample(case)
            return a * s_t * sigma ** 2 * grads(PAPER_F[name](exact_log_ratio(case, x_t).exp()).mean(), case)

        # Monte Carlo agreement within 6 standard errors (test_objective_gradients.py's chunked helper); the ratio
        # weights widen the spread (standard error 1.2% of the gradient here), so 2% sharpness: 12% would fail
        assert_mc_equal(surrogate, expected, c, expected(c).norm(), sharpness=0.02)
        # The weight matters: DMD's unweighted direction (scaled by the mean weight) is off.
        assert_mc_differ(lambda case: surrogate(case, weighted=False), expected, c)


def exact_log_ratio(c, x_t):
    """log p_real,t(x_t) - log p_fake,t(x_t) for the two diffused Gaussians (depends on theta through p_fake)."""
    s2 = c["sigma"][0] ** 2
    v_q, v_p = TAU ** 2 + s2, c["log_s"].exp() ** 2 + s2
    d_q = ((x_t - c["m"]) ** 2).flatten(1).sum(1)
    d_p = ((x_t - c["mu"].reshape(1, 1, 2, 2)) ** 2).flatten(1).sum(1)
    return -d_q / (2 * v_q) + d_p / (2 * v_p) - 2 * torch.log(v_q / v_p)  # 4 dimensions


def gan_case():
    c = gaussian_case()
    return c, GANHead(c["fake"])


def dm_step(obj, x, seed):
    torch.manual_seed(seed)
    loss, logs = obj.generator_loss(x)
    (gx,) = torch.autograd.grad(loss, x)
    return loss, gx, logs


def test_fdistill_at_reverse_kl_is_dmd2_exactly_and_weights_dmd2_otherwise():
    c, head = gan_case()
    x = sample(c)[0][:64].detach().requires_grad_(True)
    dmd2 = DMD2(c["teacher"], c["fake"], gan_head=head)
    loss, gx, _ = dm_step(dmd2, x, 5)
    loss_f, gx_f, logs = dm_step(FDistill(c["teacher"], c["fake"], divergence="rkl", gan_head=head), x, 5)
    assert torch.equal(loss, loss_f) and torch.equal(gx, gx_f)
    assert logs["h_min"] == logs["h_max"] == 1

    # js: DMD2's DM gradient times h(exp(logit)) / mean, the logit read at the same x_t (no bins here).
    fd = FDistill(c["teacher"], c["fake"], divergence="js", gan_head=head, ratio_bins=0)
    torch.manual_seed(6)
    x_t = x.detach() + 3 * torch.randn_like(x)
    sigma = torch.full((64,), 3.0)
    grad = fd.dm_gradient(x, x_t, sigma, None)
    with torch.no_grad():
        h = FASTGEN_H["js"](head(x_t, sigma).double().clamp(-10, 10).exp().clamp(0.1, 20))
    expected = dmd2.dm_gradient(x, x_t, sigma, None) * (h / h.mean()).float().reshape(-1, 1, 1, 1)
    assert h.std() > 1e-3 * h.mean()  # the weights do differ per sample
    # float32: the weight and the product each round once (a few eps of the values compared): 1e-6 of the largest
    # is ~8 eps32 (measured 1e-7 of it).
    assert torch.allclose(grad, expected, rtol=1e-6, atol=1e-6 * expected.abs().max())


def test_fdistill_update_ratio_and_optimizer_are_fastgens(tiny_teacher):
    """NVlabs/FastGen's f-distill trains the student on iterations ``iteration % student_update_freq == 0`` (counted
    from 1) and the fake score and discriminator on the others (methods/distribution_matching/dmd2.py
    ``single_train_step``): ``student_update_freq`` 5 (configs/methods/config_dmd2.py, kept by config_f_distill.py and
    SDXL/config_f_distill.py) is 4 critic updates per generator update, SD15/config_f_distill.py's 10 is 9. Its
    three schedulers have ``warm_up_steps [0]`` (config_f_distill.py); the optimizer is BaseOptimizerConfig's AdamW
    (0.9, 0.999), weight decay 0.01, as dmd2's. dmd2 keeps DMD2's 5 / 10 and 500 / critic_updates warm-up."""
    from fastdiff.config import load_config
    from fastdiff.objectives import teacher_options
    from fastdiff.training.setup import resolve_train_defaults

    c, head = gan_case()
    obj = build("fdistill", c["teacher"], c["fake"], gan_head=head)
    assert obj.critic_updates == 4
    assert obj.train_defaults() == {"adam_betas": [0.9, 0.999], "weight_decay": 0.01, "lr_warmup_steps": 0}
    assert build("dmd2", c["teacher"], c["fake"]).train_defaults()["lr_warmup_steps"] == 500 // 5
    cfg = load_config(None, [f"teacher.path={tiny_teacher}", "objective.name=fdistill"])
    resolve_train_defaults(cfg, obj)
    assert (cfg.train.adam_betas, cfg.train.weight_decay, cfg.train.lr_warmup_steps) == ([0.9, 0.999], 0.01, 0)
    # text teachers (teacher_defaults reads the conditioning and the pipeline's class name): one fewer than dmd2's
    for pipeline, dmd2, fdistill in (("StableDiffusionPipeline", 10, 9), ("StableDiffusionXLPipeline", 5, 4)):
        teacher = SimpleNamespace(conditioning="text", pipeline=type(pipeline, (), {})())
        assert teacher_options("dmd2", teacher, {"critic_updates": None})["critic_updates"] == dmd2
        assert teacher_options("fdistill", teacher, {"critic_updates": None})["critic_updates"] == fdistill
        assert teacher_options("fdistill", teacher, {"critic_updates": 7})["critic_updates"] == 7  # a set value wins
    teacher = SimpleNamespace(conditioning="class", pipeline=None)
    assert teacher_options("fdistill", teacher, {"critic_updates": None})["critic_updates"] is None  # the 4 above


def test_objectives_need_a_gan_head_and_known_divergences():
    c = gaussian_case()
    with pytest.raises(FastdiffError, match="GAN head"):
        FDistill(c["teacher"], c["fake"])
    with pytest.raises(FastdiffError, match="GAN head"):
        UniInstruct(c["teacher"], c["fake"])
    with pytest.raises(FastdiffError, match="divergence"):
        FDistill(c["teacher"], c["fake"], divergence="tv", gan_head=GANHead(c["fake"]))


@pytest.mark.parametrize("name", ["kl", "js", "chi2", "jf"])
def test_uni_instruct_gradient_is_half_the_expanded_divergence_gradient(name):
    """The surrogate (networks and ratio frozen, alpha 0.5) against autograd of 1/2 E_fake[g(r) mean(delta^2)], where
    the generator's density enters the ratio, the fake denoiser and the sampling."""
    c = gaussian_case(t=300)

    def surrogate(case, full=True):
        x, x_t = sample(case)
        y_real, y_fake = case["teacher"](x_t, case["sigma"]), case["fake"](x_t, case["sigma"])
        g, rg1, r2g2 = expansion_weights(name, exact_log_ratio(case, x_t).detach().exp())
        norm = per_sample_mean((x - y_real).abs()).detach()
        if not full:  # the g-weighted SiD part alone (the reference's forward-KL loss)
            return grads((g * sid_loss(x, y_real, y_fake, 0.5) * norm).mean(), case)
        return grads((expanded_loss(x, y_real, y_fake, case["sigma"], g, rg1, r2g2, alpha=0.5) * norm).mean(), case)

    def divergence(case):
        x, x_t = sample(case)
        y_real_exact, y_gen = exact_denoisers(case, x_t)
        weight = DIVERGENCES[name](exact_log_ratio(case, x_t).exp())
        return grads(0.5 * (weight * per_sample_mean((y_gen - y_real_exact) ** 2)).mean(), case)

    # Monte Carlo agreement within 6 standard errors (test_objective_gradients.py's chunked helper)
    assert_mc_equal(surrogate, divergence, c, divergence(c).norm())
    # The ratio's terms matter: the g-weighted SiD part alone is off.
    assert_mc_differ(lambda case: surrogate(case, full=False), divergence, c)


def test_uni_instruct_at_reverse_kl_is_sid_and_its_di_part_is_dmd2():
    c = gaussian_case()
    x = sample(c)[0][:64].detach().requires_grad_(True)
    # Reverse KL: g = 1, g' = g'' = 0, so the objective's loss is SiD's (same alpha, its GAN term weighted 0).
    loss_s, gx_s, _ = dm_step(SiD(c["teacher"], c["fake"], alpha=1.2), x, 3)
    for expansion in ("reference", "exact"):
        uni = UniInstruct(c["teacher"], c["fake"], divergence="rkl", alpha=1.2, expansion=expansion,
                          gan_head=GANHead(c["fake"]), gan_start_images=0, gan_generator_weight=0.0)
        uni.images_seen = 1
        loss_u, gx_u, _ = dm_step(uni, x, 3)
        assert torch.equal(loss_u, loss_s) and torch.equal(gx_u, gx_s), expansion

    # The Diff-Instruct part at weight 1 is DMD2's generator gradient (same x_t: same seed, DMD2 draws first).
    dmd2 = DMD2(c["teacher"], c["fake"])
    _, gx_d, _ = dm_step(dmd2, x, 4)
    torch.manual_seed(4)
    x_t, sigma = noised(x.detach(), dmd2.teacher.schedule, dmd2.min_t, dmd2.max_t, dmd2.sigma_grid)
    y_real, y_fake = c["teacher"](x_t, sigma), c["fake"](x_t, sigma)
    norm = per_sample_mean((x - y_real).abs()).detach()
    (gx_di,) = torch.autograd.grad(di_loss(x, y_real, y_fake, torch.ones(64), norm).sum() / 64, x)
    # DMD2 forms x - (x - grad): one rounding of x's magnitude per element (float32), divided by N * B.
    tol = 4 * 1.2e-7 * (x.abs().max() + gx_d.abs().max() * 4 * 64) / (4 * 64)
    assert (gx_di - gx_d).abs().max() <= tol


def test_uni_instruct_trains_on_the_ratio_weighted_sid_loss():
    """expansion "reference" (the default): g(r) / mean(g) times SiD's loss, plus SiDA's GAN term at full weight."""
    c, head = gan_case()
    x = sample(c)[0][:64].detach().requires_grad_(True)
    uni = UniInstruct(c["teacher"], c["fake"], divergence="js", gan_head=head, gan_start_images=0, ratio_bins=0)
    uni.images_seen = 1
    loss, gx, _ = dm_step(uni, x, 7)
    torch.manual_seed(7)
    x_t, sigma = noised(x, uni.teacher.schedule, uni.min_t, uni.max_t, uni.sigma_grid)
    y_real, y_fake, logits = c["teacher"](x_t, sigma), c["fake"](x_t, sigma), head(x_t, sigma)
    g = FASTGEN_H["js"](logits.detach().clamp(-10, 10).exp().clamp(0.1, 20))
    assert g.std() > 1e-3 * g.mean()
    norm = per_sample_mean((x - y_real).abs()).detach()
    expected = (g / g.mean() * sid_loss(x, y_real, y_fake, 1.0)).mean()
    expected = expected + 1e-4 * sida_generator_gan_loss(logits, norm, torch.ones(64, dtype=torch.bool))
    (gx_expected,) = torch.autograd.grad(expected, x)
    # float32, the same operations in another order: a few roundings of the largest gradient element; 1e-5 is ~80
    # eps32 (measured 6e-8 relative on the loss, 9e-8 of the largest gradient element).
    assert torch.allclose(loss, expected, rtol=1e-5)
    assert torch.allclose(gx, gx_expected, rtol=1e-5, atol=1e-5 * gx_expected.abs().max())


@pytest.mark.parametrize("name, extra", [("fdistill", ["objective.ratio_bins=0", "objective.divergence=kl"]),
                                         ("uni_instruct", ["objective.gan_start_images=0", "objective.ratio_bins=0",
                                                           "objective.generator_hold_images=1"])])
def test_objective_trains_exports_and_loads(name, extra, tiny_cond_teacher, tmp_path):
    run, logs = distill_on_fake_images(tiny_cond_teacher, tmp_path, f"objective.name={name}", *extra)
    assert all(math.isfinite(v) for row in logs for v in row.values() if isinstance(v, (int, float)))
    assert "loss_gan_g" in logs[-1] and "loss_gan_d" in logs[-1]
    assert ("h_max" if name == "fdistill" else "loss_uni") in logs[-1]
    assert json.loads((run / "student" / "fastdiff.json").read_text())["objective"] == name
    assert run.resolve() in TRAINERS
    assert_pipeline_matches(run / "student", labels=[0, 1, 2])


EPS32 = torch.finfo(torch.float32).eps


RATIO = [0.5, 1.5, 0.75, 1.25]  # exact in float32, mean exactly 1


@pytest.mark.parametrize("images_seen, ratio", [(200_000, RATIO), (200_064, RATIO), (200_064, [0.0] * 4)],
                         ids=["sid-phase", "ratio-weighted", "gan-term-alone"])
def test_uni_instruct_generator_loss_at_defaults_matches_reference(images_seen, ratio, monkeypatch):
    """uni_instruct at its defaults (forward KL, expansion "reference", alpha 1, SiDA's GAN term) against
    a-little-hoof/Uni_Instruct, written out: fsim_training/fsim_loss.py ``generator_share_encoder_loss`` (per element
    ``(y_r - y_f)(y_f - y) / weight_factor``, ``loss_gan = BCE(clamp(y_D, -10, 10), 1) / weight_factor``) and
    fsim_training_loop.py with fsim_train.py's defaults (``--divergence Forward-KL``, ``--variance_reduction`` off,
    ``--lsg`` 100, ``--lsg_gan`` 0.01): ``loss_gan`` averaged over pixels times N; once ``cur_nimg > 200k``
    ``(loss * density_ratio).sum() * 100 / B + loss_gan.sum() * 0.01 / B`` with the ratio without gradient, before it
    ``loss.sum() * 100 / B`` alone. Units: reference = fastdiff * 100 N (N elements per sample).

    The ratio is given (the objective's DensityRatio returns it): the reference's own ``-L / (1 - L)`` of its GAN loss
    L is a difference fastdiff makes on purpose (README's Uni-Instruct row). Its mean is 1, where fastdiff's
    normalisation by the batch mean of g = r (forward KL) is the identity. Noise levels as fastdiff draws them (the
    teacher's table, t <= 0.8); the tiny sample-prediction UNet stands for the reference's EDM x0 networks. A zero
    ratio (both sides: g = 0) leaves SiDA's GAN term alone, so its gradient path (through the logits of the fake
    score's pass into x) is compared at its own scale; beside the SiD term it is below the tolerance."""
    schedule = schedule_from_scheduler(DDPMScheduler(prediction_type="sample", clip_sample=False))
    teacher = Denoiser(tiny_unet(seed=0).eval(), schedule, "sample")
    fake = Denoiser(tiny_unet(seed=1), schedule, "sample")
    head = GANHead(fake, "sida")  # SiDA's networks: y_D is the encoder output's channel mean, a logit per position
    obj = build("uni_instruct", teacher, fake, gan_head=head)
    assert (obj.divergence, obj.expansion, obj.alpha, obj.gan_generator_weight) == ("kl", "reference", 1.0, 1e-4)
    assert (obj.min_t, obj.max_t, obj.sigma_grid, obj.gan_start_images) == (0.0, 0.8, "teacher", 200_000)
    ratio = torch.tensor(ratio)
    monkeypatch.setattr(obj.ratio, "forward", lambda logits, position: ratio.clone())
    obj.images_seen = images_seen
    batch = 4
    torch.manual_seed(31)
    x = (0.5 * torch.randn(batch, 1, 8, 8)).requires_grad_()
    torch.manual_seed(32)
    loss, logs = obj.generator_loss(x)
    loss.backward()

    torch.manual_seed(32)
    sigma = schedule.sigma_at(torch.randint(0, 801, (batch,)))  # integer timesteps in [0, 0.8 * 1000]
    y = x.detach().clone().requires_grad_()
    n = torch.randn_like(y) * sigma.reshape(-1, 1, 1, 1)
    y_real, y_fake, y_d = teacher(y + n, sigma), fake(y + n, sigma), head(y + n, sigma)
    with torch.no_grad():
        weight_factor = (y - y_real).abs().mean(dim=[1, 2, 3], keepdim=True).clip(min=1e-5)
    per_elem = (y_real - y_fake) * (y_fake - y) / weight_factor
    numel = y[0].numel()
    loss_gan = torch.nn.BCEWithLogitsLoss()(y_d.clamp(-10, 10), torch.ones_like(y_d)) / weight_factor
    loss_gan = loss_gan.mean(dim=[1, 2, 3], keepdim=True) * numel
    if images_seen > 200 * 1000:
        density_ratio = ratio.reshape(-1, 1, 1, 1)
        ref = (per_elem * density_ratio).sum() * 100 / batch + loss_gan.sum() * 0.01 / batch
        terms = (per_elem * density_ratio).detach().abs().sum() * 100 / batch + loss_gan.detach().sum() * 0.01 / batch
    else:
        ref = per_elem.sum() * 100 / batch
        terms = per_elem.detach().abs().sum() * 100 / batch
    ref.backward()

    unit = 100 * numel
    # The same float32 network outputs on both sides (same inputs, same calls); only the elementwise arithmetic
    # (~6 ops per term, the ratio and unit products) and the order of the sums (~log2(256) = 8 levels) differ:
    # 16 roundings of the terms' magnitude (measured: under 1).
    assert_close_eps(loss.detach() * unit, ref.detach(), terms, 16)
    # Gradients: those roundings carried back through the same networks, which mix elements (sums over ~1000 terms
    # per weight, ~20 layers): 32 roundings of the largest gradient element (measured: under 2).
    assert_close_eps(x.grad * unit, y.grad, y.grad.abs().max(), 32)
    assert ("loss_uni" in logs) == (images_seen > 200 * 1000)
    assert float(y.grad.abs().max()) > 0
    if images_seen > 200 * 1000 and ratio.any():
        # the GAN term's value is not below the tolerance: leaving it out of the reference would be caught
        assert float(loss_gan.detach().sum() * 0.01 / batch) > 10 * EPS32 * 16 * float(terms)


def assert_close_eps(ours, ref, scale, ops):
    """|ours - ref| <= float32 eps x ``ops`` roundings x ``scale``."""
    err = (ours.detach().double() - ref.detach().double()).abs().max()
    assert float(err) <= EPS32 * ops * float(scale), (float(err), EPS32 * ops * float(scale))
