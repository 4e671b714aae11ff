"""Each objective's generator gradient against an independent computation, on Gaussians.

Generator: x0 = mu + s z (theta = mu, log s) in 1x2x2. Teacher: an isotropic Gaussian (the analytic
teacher with one mode). At a fixed noise level sigma both diffused laws are Gaussian, so their denoisers
are written out by hand here, and the divergences are differentiated by autograd with the generator's
own score depending on theta. The objectives' surrogates instead see a *frozen* fake score (the analytic
teacher's code with the generator's parameters) and get theta-dependence only through x_t; the score
identities say both gradients agree in expectation, so they are compared on 400k samples.
"""
import math

import torch

from fastdiff.models.analytic import GaussianMixtureModel
from fastdiff.models.denoiser import Denoiser
from fastdiff.objectives import DMD2
from fastdiff.objectives.base import per_sample_mean
from fastdiff.objectives.sid import sid_loss
from fastdiff.objectives.sim import sim_loss
from fastdiff.models.schedule import VPSchedule

N = 400_000
TAU = 0.5  # teacher std


def gaussian_case(t: int = 300, seed: int = 0):
    teacher_model = GaussianMixtureModel(sample_size=2, weights=(1.0,), stds=(TAU,), mean_scale=1.0, seed=1)
    teacher_model.requires_grad_(False)
    schedule = VPSchedule(teacher_model.scheduler().alphas_cumprod)
    teacher = Denoiser(teacher_model, schedule, "sample")
    mu = torch.tensor([0.3, -0.2, 0.5, 0.1], requires_grad=True)
    log_s = torch.tensor(math.log(0.8), requires_grad=True)
    fake_model = GaussianMixtureModel(sample_size=2, weights=(1.0,), stds=(0.8,), mean_scale=1.0, seed=1)
    with torch.no_grad():
        fake_model.means.copy_(mu.reshape(1, 4))
    fake_model.requires_grad_(False)
    fake = Denoiser(fake_model, schedule, "sample")
    g = torch.Generator().manual_seed(seed)
    z, eps = torch.randn(N, 1, 2, 2, generator=g), torch.randn(N, 1, 2, 2, generator=g)
    sigma = schedule.sigma_at(torch.full((N,), t)).float()
    return dict(teacher=teacher, fake=fake, mu=mu, log_s=log_s, z=z, eps=eps, sigma=sigma,
                m=teacher_model.means.reshape(1, 1, 2, 2))


def sample(c):
    x = c["mu"].reshape(1, 1, 2, 2) + c["log_s"].exp() * c["z"]
    return x, x + c["sigma"].reshape(-1, 1, 1, 1) * c["eps"]


def exact_denoisers(c, x_t):
    """Tweedie for Gaussians, written independently of fastdiff: y = x - sigma^2 (x - mean) / (var + sigma^2)."""
    s2 = c["sigma"][: x_t.shape[0]].reshape(-1, 1, 1, 1) ** 2
    y_real = x_t - s2 * (x_t - c["m"]) / (TAU ** 2 + s2)
    y_gen = x_t - s2 * (x_t - c["mu"].reshape(1, 1, 2, 2)) / (c["log_s"].exp() ** 2 + s2)  # depends on theta
    return y_real, y_gen


def grads(value, c):
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(value, [c["mu"], c["log_s"]], retain_graph=True)])


CHUNKS = 50  # the N samples in 50 equal chunks: the spread of the chunk means gives the Monte Carlo error


def chunk(c, j: int) -> dict:
    n = N // CHUNKS
    return dict(c, z=c["z"][j * n:(j + 1) * n], eps=c["eps"][j * n:(j + 1) * n], sigma=c["sigma"][j * n:(j + 1) * n])


def mc_difference(estimate, exact, c):
    """Mean and standard error, per parameter, of ``estimate - exact`` over the chunks of ``c``'s samples.
    ``estimate(case)``: a gradient that is a mean over the case's samples; ``exact``: the gradient it should equal in
    expectation, a vector or a function of the same samples (then the difference's noise is what counts). The chunk
    means are equal-weight, so their mean is the full-sample difference. Float32 rounding of 8000-sample means is
    ~1e-6 relative, far below the Monte Carlo error compared against."""
    diffs = torch.stack([estimate(chunk(c, j)) - (exact(chunk(c, j)) if callable(exact) else exact)
                         for j in range(CHUNKS)])
    return diffs.mean(0), diffs.std(0) / math.sqrt(CHUNKS)


def assert_mc_equal(estimate, exact, c, scale, sharpness=0.01):
    """Agreement within 6 standard errors per parameter, with a sharp enough estimate to mean something: the
    standard error below ``sharpness`` x ``scale`` (the exact gradient's norm; 1%: a 6% difference would fail)."""
    mean, se = mc_difference(estimate, exact, c)
    assert se.norm() <= sharpness * scale, (se, scale)
    assert (mean.abs() <= 6 * se).all(), (mean, se)


def assert_mc_differ(estimate, exact, c):
    """The check has teeth: ``estimate`` is off ``exact`` by more than 6 standard errors in some parameter."""
    mean, se = mc_difference(estimate, exact, c)
    assert (mean.abs() > 6 * se).any(), (mean, se)


def test_vsd_and_dmd_gradient_is_the_kl_gradient():
    c = gaussian_case()
    obj = DMD2(c["teacher"], c["fake"], weighting="vsd")

    def surrogate(case):
        x, x_t = sample(case)
        g = obj.dm_gradient(x, x_t, case["sigma"], None)
        return grads((x * g).sum() / x.shape[0], case)  # d/dx of 0.5 |x - sg(x - g)|^2 is g

    sigma = c["sigma"][0]
    a, s_t = 1 / torch.sqrt(1 + sigma ** 2), sigma / torch.sqrt(1 + sigma ** 2)
    v_p, v_q = c["log_s"].exp() ** 2 + sigma ** 2, TAU ** 2 + sigma ** 2
    kl = 0.5 * (4 * (v_p / v_q - 1 + torch.log(v_q / v_p)) + ((c["mu"] - c["m"].reshape(4)) ** 2).sum() / v_q)
    # VSD weights the score difference by a s sigma^2 (eps-space w(t) = s_t^2, see dmd2.py).
    exact = (a * s_t * sigma ** 2 * grads(kl, c)).detach()
    assert_mc_equal(surrogate, exact, c, exact.norm())
    assert_mc_differ(surrogate, 1.06 * exact, c)  # sharp enough to see a 6% error
    # DMD: the same direction, normalised per sample by mean|x - y_real| (the reference formula, written out), in
    # float64 against fastdiff's float32: both sides are O(1) after a few tens of float32 operations and one division
    # by mean|x - y_real| (here >= 0.05), so the float32 side is within 1e-4 relative; measured 2e-7.
    x, x_t = sample(c)
    dmd = DMD2(c["teacher"], c["fake"]).dm_gradient(x[:64], x_t[:64], c["sigma"][:64], None).double()
    y_real, y_gen = (y.double() for y in exact_denoisers(c, x_t[:64].double()))
    weight = (x[:64].double() - y_real).abs().mean(dim=(1, 2, 3), keepdim=True)
    assert weight.min() > 0.05
    expected = ((y_gen - y_real) / weight).detach()
    torch.testing.assert_close(dmd, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_sid_at_alpha_half_is_half_the_fisher_divergence_gradient():
    c = gaussian_case()

    def surrogate(alpha):
        def estimate(case):
            x, x_t = sample(case)
            y_real, y_fake = case["teacher"](x_t, case["sigma"]), case["fake"](x_t, case["sigma"])
            norm = per_sample_mean((x - y_real).abs()).detach()
            return grads((sid_loss(x, y_real, y_fake, alpha=alpha) * norm).mean(), case)
        return estimate

    def half_fisher(case):  # on the same samples: the difference's Monte Carlo error is what the check sees
        x, x_t = sample(case)
        y_real_exact, y_gen = exact_denoisers(case, x_t)
        return 0.5 * grads(per_sample_mean((y_real_exact - y_gen) ** 2).mean(), case)

    assert_mc_equal(surrogate(0.5), half_fisher, c, half_fisher(c).norm())
    assert_mc_differ(surrogate(1.2), half_fisher, c)  # alpha matters: SiD's 1.2 is not the Fisher gradient


def test_sim_gradient_is_the_pseudo_huber_divergence_gradient():
    c = gaussian_case(t=200)
    for c_huber in (0.05, 1.0):
        def surrogate(case):
            x, x_t = sample(case)
            y_real, y_fake = case["teacher"](x_t, case["sigma"]), case["fake"](x_t, case["sigma"])
            norm = per_sample_mean((x - y_real).abs()).detach()
            return grads((sim_loss(x, x_t, y_real, y_fake, c_huber) * norm).mean(), case)

        def divergence(case):
            x, x_t = sample(case)
            y_real_exact, y_gen = exact_denoisers(case, x_t)
            return grads((per_sample_mean((y_gen - y_real_exact) ** 2).add(c_huber ** 2).sqrt() - c_huber).mean(),
                         case)

        assert_mc_equal(surrogate, divergence, c, divergence(c).norm())


def test_sim_without_the_implicit_term_is_wrong():
    """The check has teeth: dropping the score-identity term (u . sg(y_f - x0)) breaks the agreement."""
    c = gaussian_case(t=200)

    def naive(case):
        x, x_t = sample(case)
        y_real, y_fake = case["teacher"](x_t, case["sigma"]), case["fake"](x_t, case["sigma"])
        delta = y_fake - y_real
        u = delta / per_sample_mean(delta ** 2).add(0.05 ** 2).sqrt().reshape(-1, 1, 1, 1)
        return grads(-per_sample_mean(u.detach() * (y_real - x_t)).mean(), case)

    def divergence(case):
        x, x_t = sample(case)
        y_real_exact, y_gen = exact_denoisers(case, x_t)
        return grads((per_sample_mean((y_gen - y_real_exact) ** 2).add(0.05 ** 2).sqrt() - 0.05).mean(), case)

    assert_mc_differ(naive, divergence, c)
