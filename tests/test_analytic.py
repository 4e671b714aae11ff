"""The analytic Gaussian-mixture teacher: exact denoiser (Tweedie, by autograd), diffusers round trip,
and the metrics that score students against the truth."""
import torch

from fastdiff.models.analytic import GaussianMixtureModel, sliced_wasserstein
from fastdiff.inference.sampling import ddim_sample
from fastdiff.models.teacher import load_teacher


def test_posterior_mean_is_tweedie():
    """E[x0 | x] = x + sigma^2 grad log p_sigma(x), with log p_sigma written out and differentiated by autograd."""
    gmm = GaussianMixtureModel()
    x = gmm.sample_true(6, torch.Generator().manual_seed(0)) + 0.7 * torch.randn(6, 1, 8, 8)
    sigma = torch.tensor([0.05, 0.3, 0.7, 1.5, 4.0, 20.0])
    x.requires_grad_(True)
    flat = x.reshape(6, -1).double()
    var = sigma.double().reshape(-1, 1) ** 2 + gmm.variances.double().reshape(1, -1)
    d2 = ((flat[:, None, :] - gmm.means.double()[None]) ** 2).sum(-1)
    logp = torch.logsumexp(gmm.log_weights.double() - 0.5 * d2 / var - 0.5 * 64 * (2 * torch.pi * var).log(), dim=1)
    (grad,) = torch.autograd.grad(logp.sum(), x)
    tweedie = x.detach() + sigma.reshape(-1, 1, 1, 1) ** 2 * grad
    # float32 model against float64 Tweedie: the model's logits reach ~200 in magnitude (32 log var at sigma = 20) and
    # round by ~eps32 x 200 = 2.4e-5 absolute, which moves the responsibilities, hence x0 (means of order 1), by as
    # much; 1e-4 is 4x that worst case (measured up to 6.6e-6 over 5 draws of x, 1 ulp at sigma <= 1.5).
    assert torch.allclose(gmm.posterior_mean(x.detach(), sigma), tweedie.float(), atol=1e-4)


def test_class_labels_select_a_mode_and_null_is_the_mixture():
    gmm = GaussianMixtureModel(class_conditional=True)
    x = torch.randn(3, 1, 8, 8)
    sigma = torch.full((3,), 2.0)
    # the null class masks no mode: the same operations on the same values, bit for bit
    assert torch.equal(gmm.posterior_mean(x, sigma, torch.tensor([4, 4, 4])), gmm.posterior_mean(x, sigma))
    one = gmm.posterior_mean(x, sigma, torch.tensor([2, 2, 2])).reshape(3, -1)
    s2 = gmm.variances[2]
    expected = (s2 * x.reshape(3, -1) + 4.0 * gmm.means[2]) / (s2 + 4.0)
    # one mode (responsibility exactly 1): a handful of float32 operations on values of order |expected| (~1.2) each
    # side; 16 eps32 of it (measured 1 ulp, 1.2e-7).
    assert torch.allclose(one, expected, rtol=0, atol=16 * torch.finfo(torch.float32).eps * float(expected.detach().abs().max()))


def test_saved_teacher_loads_through_the_adapter_and_ddim_reaches_the_truth(tmp_path):
    gmm = GaussianMixtureModel()
    gmm.save_teacher(tmp_path / "gmm")
    teacher = load_teacher(str(tmp_path / "gmm"))
    assert teacher.denoiser.prediction_type == "sample" and teacher.sample_shape == (1, 8, 8)
    n = 2000
    truth = gmm.sample_true(n, torch.Generator().manual_seed(1))
    floor = sliced_wasserstein(truth, gmm.sample_true(n, torch.Generator().manual_seed(2)))
    z = torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        one = ddim_sample(teacher.denoiser, z, 1)
        many = ddim_sample(teacher.denoiser, z, 100)
    err_many = (gmm.mode_weights(many) - gmm.log_weights.exp()).abs().max()
    # Seeded draws, the same on every machine (rounding can only move a sample lying on a mode boundary, 1 / n each).
    # 0.03 is 2.7 standard errors of a mode weight at n = 2000 (sqrt(0.4 x 0.6 / 2000) = 0.011) for a sampler of the
    # true mixture; measured 0.013.
    assert sliced_wasserstein(many, truth) < 2 * floor and err_many < 0.03
    assert sliced_wasserstein(one, truth) > 3 * floor  # one DDIM step collapses to the mean: the gap students close


def test_sliced_wasserstein_and_mode_weights():
    gmm = GaussianMixtureModel()
    a = gmm.sample_true(4000, torch.Generator().manual_seed(0))
    # exact seeded draws: 0.03 is 3.9 standard errors of a weight at n = 4000 (sqrt(0.4 x 0.6 / 4000) = 0.0077);
    # measured 0.0043
    assert (gmm.mode_weights(a) - torch.tensor([0.1, 0.2, 0.3, 0.4])).abs().max() < 0.03
    assert sliced_wasserstein(a, a) == 0.0
    assert sliced_wasserstein(a, a + 0.5) > 0.4  # a shift by 0.5 in every pixel moves every projection


def test_class_conditional_teacher_loads_with_its_classes_and_trains_a_fake_copy(tmp_path):
    GaussianMixtureModel(class_conditional=True).save_teacher(tmp_path / "gmm")
    teacher = load_teacher(str(tmp_path / "gmm"))
    assert teacher.num_classes == 4 and teacher.null_class == 4 and teacher.conditioning == "class"
    x = torch.randn(2, 1, 8, 8)
    sigma = torch.full((2,), 1.0)
    with torch.no_grad():
        one = teacher.denoiser(x, sigma, {"class_labels": torch.tensor([1, 1])})
        guided = teacher.denoiser(x, sigma, {"class_labels": torch.tensor([1, 1])}, guidance_scale=3.0)
    assert not torch.allclose(one, guided)  # CFG against the null class (the whole mixture) moves the estimate
    # The teacher is frozen; a copy is a trainable fake score of the same family.
    assert not any(p.requires_grad for p in teacher.model.parameters())
    import copy

    fake = copy.deepcopy(teacher.model).requires_grad_(True)
    loss = fake.posterior_mean(x, sigma).pow(2).mean()
    loss.backward()
    assert fake.means.grad is not None and fake.weight_logits.grad is not None and fake.log_stds.grad is not None
