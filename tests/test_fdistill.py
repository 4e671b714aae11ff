"""f-distill and Uni-Instruct: their weights against the paper / reference formulas, their gradients against autograd
of the divergences on Gaussians (exact density ratios), their reductions to DMD2 and SiD, and a tiny end-to-end run.

The Gaussian case is tests/test_objective_gradients.py's: generator x0 = mu + s z (theta = mu, log s) in 1x2x2, an
isotropic Gaussian teacher, a frozen copy of the generator's law as the fake score, 400k samples at one noise level.
"""
import json
import math

import pytest
import torch

from fastdiff.errors import FastdiffError
from fastdiff.objectives import DMD2, SiD
from fastdiff.objectives.base import noised, per_sample_mean
from fastdiff.objectives.fdistill import DIVERGENCES, DensityRatio, FDistill
from fastdiff.objectives.gan import GANHead, sida_generator_gan_loss
from fastdiff.objectives.sid import sid_loss
from fastdiff.objectives.uni_instruct import UniInstruct, di_loss, expanded_loss, expansion_weights
from test_export_e2e import TRAINERS, assert_pipeline_matches, distill_on_fake_images
from test_objective_gradients import N, TAU, assert_close, exact_denoisers, gaussian_case, grads, sample

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


def fastgen_ratio_weights(logits, position, bins, ema_rate, h, lower=0.1, upper=20.0):
    """FastGen f_distill.py ``_get_f_div_weighting_h``, transcribed (float64; t range [0, 1]); returns (h, bins)."""
    ratio = torch.exp(torch.clamp(logits, min=-10.0, max=10.0))
    ratio = torch.clamp(ratio, lower, upper)
    n = len(bins)
    idx = (position / (1.0 / n)).floor().long().clamp(0, n - 1)
    cnt = torch.bincount(idx, minlength=n).double()
    ratio_sum = torch.bincount(idx, weights=ratio, minlength=n).double()
    valid = cnt > 0
    bins = bins.clone()
    bins[valid] = bins[valid] * ema_rate + (1 - ema_rate) * (ratio_sum / (cnt + 1e-6))[valid]
    ratio = ratio / (bins[idx] + 1e-6)
    out = h(ratio)
    return out / (out.sum() / len(out) + 1e-6), bins


def test_ratio_normalisation_matches_fastgen():
    gen = torch.Generator().manual_seed(0)
    module = DensityRatio(bins=10, ema_rate=0.5)
    bins = torch.ones(10, dtype=torch.float64)
    for step in range(3):  # the EMA carries over steps
        logits = 4 * torch.randn(256, generator=gen, dtype=torch.float64)  # some beyond the clamps
        position = torch.rand(256, generator=gen, dtype=torch.float64) * 0.97  # bin 9 is often empty
        expected, bins = fastgen_ratio_weights(logits, position, bins, 0.5, FASTGEN_H["js"])
        h = DIVERGENCES["js"](module(logits.float(), position.float()))
        h = h / h.mean()
        # FastGen's 1e-6 stabilisers shift values of order 1 by ~1e-6; float32 rounding of a few operations 1e-6.
        assert torch.allclose(h.double(), expected, rtol=1e-5), step
        assert torch.allclose(module.bins.double(), bins, rtol=1e-5)


def test_fdistill_weight_is_the_f_divergence_gradient_on_gaussians():
    """sum(h(r) * DMD gradient) against autograd of D_f(p_real || p_fake) = E_fake[f(r)] at one noise level, with
    the exact ratio; the VSD weighting makes the per-level factor the constant a s sigma^2 (as for the KL test)."""
    c = gaussian_case()
    x, x_t = sample(c)
    g = DMD2(c["teacher"], c["fake"], weighting="vsd").dm_gradient(x, x_t, c["sigma"], None)
    sigma = c["sigma"][0]
    a, s_t = 1 / torch.sqrt(1 + sigma ** 2), sigma / torch.sqrt(1 + sigma ** 2)
    for name in ("kl", "js"):
        log_r = exact_log_ratio(c, x_t)
        h = DIVERGENCES[name](log_r.detach().exp()).reshape(-1, 1, 1, 1)
        surrogate = grads((x * g * h).sum() / N, c)
        expected = a * s_t * sigma ** 2 * grads(PAPER_F[name](log_r.exp()).mean(), c)
        assert_close(surrogate, expected)  # measured: 1.1% (kl), 0.4% (js) on 400k samples
        # The weight matters: DMD's unweighted direction (scaled by the mean weight) is 24-42% off.
        unweighted = grads((x * g).sum() / N, c) * h.mean()
        assert (unweighted - expected).norm() > 0.1 * expected.norm()


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
    # float32: the weight and the product each round once (a few eps of the values compared).
    assert torch.allclose(grad, expected, rtol=1e-6, atol=1e-6 * expected.abs().max())


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
    x, x_t = sample(c)
    y_real, y_fake = c["teacher"](x_t, c["sigma"]), c["fake"](x_t, c["sigma"])
    log_r = exact_log_ratio(c, x_t)
    g, rg1, r2g2 = expansion_weights(name, log_r.detach().exp())
    norm = per_sample_mean((x - y_real).abs()).detach()
    surrogate = grads((expanded_loss(x, y_real, y_fake, c["sigma"], g, rg1, r2g2, alpha=0.5) * norm).mean(), c)
    y_real_exact, y_gen = exact_denoisers(c, x_t)
    divergence = 0.5 * (DIVERGENCES[name](log_r.exp()) * per_sample_mean((y_gen - y_real_exact) ** 2)).mean()
    assert_close(surrogate, grads(divergence, c))  # measured within 0.3% (Monte Carlo on 400k samples)
    # The ratio's terms matter: the g-weighted SiD part alone (the reference's forward-KL loss) is off by 15-48% here.
    partial = grads((g * sid_loss(x, y_real, y_fake, 0.5) * norm).mean(), c)
    assert (partial - grads(divergence, c)).norm() > 0.1 * grads(divergence, c).norm()


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
    # float32, the same operations in another order: a few roundings of the largest gradient element.
    assert torch.allclose(loss, expected, rtol=1e-5)
    assert torch.allclose(gx, gx_expected, rtol=1e-5, atol=1e-5 * gx_expected.abs().max())


@pytest.mark.parametrize("name, extra", [("fdistill", ["objective.ratio_bins=0", "objective.divergence=kl"]),
                                         ("uni_instruct", ["objective.gan_start_images=0", "objective.ratio_bins=0"])])
def test_objective_trains_exports_and_loads(name, extra, tiny_cond_teacher, tmp_path):
    run, logs = distill_on_fake_images(tiny_cond_teacher, tmp_path, f"objective.name={name}", *extra)
    assert all(math.isfinite(v) for row in logs for v in row.values() if isinstance(v, (int, float)))
    assert "loss_gan_g" in logs[-1] and "loss_gan_d" in logs[-1]
    assert ("h_max" if name == "fdistill" else "loss_uni") in logs[-1]
    assert json.loads((run / "student" / "fastdiff.json").read_text())["objective"] == name
    assert run.resolve() in TRAINERS
    assert_pipeline_matches(run / "student", labels=[0, 1, 2])
