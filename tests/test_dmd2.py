"""DMD2: generator gradient and fake-score loss against independent computations, GAN head, multi-step."""
import pytest
import torch
from diffusers import DDPMScheduler

from conftest import tiny_unet
from fastdiff.models.denoiser import Denoiser
from fastdiff.models.generator import Generator
from fastdiff.objectives import DMD2
from fastdiff.objectives.base import sample_sigma
from fastdiff.objectives.gan import GANHead
from fastdiff.models.schedule import schedule_from_scheduler


def _pair(pred="epsilon", num_class_embeds=None):
    sched = DDPMScheduler(prediction_type=pred)
    schedule = schedule_from_scheduler(sched)
    teacher = Denoiser(tiny_unet(num_class_embeds, seed=0).eval(), schedule, pred, null_class=num_class_embeds and num_class_embeds - 1)
    fake = Denoiser(tiny_unet(num_class_embeds, seed=1), schedule, pred, null_class=num_class_embeds and num_class_embeds - 1)
    return sched, teacher, fake


def test_generator_gradient_is_normalised_score_difference():
    sched, teacher, fake = _pair()
    obj = DMD2(teacher, fake)
    x = torch.randn(3, 1, 8, 8, requires_grad=True)
    torch.manual_seed(5)
    loss, _ = obj.generator_loss(x)
    loss.backward()

    # Written out plainly (DMD Eq. 7-8): same noise level and noise, then (x0_fake - x0_real) / mean|x - x0_real|.
    torch.manual_seed(5)
    sigma = sample_sigma(teacher.schedule, 3, 0.02, 0.98, "cpu")
    noise = torch.randn_like(x)
    with torch.no_grad():
        x_t = x + sigma.reshape(-1, 1, 1, 1) * noise
        real, fake_x0 = teacher(x_t, sigma), fake(x_t, sigma)
        weight = (x - real).abs().mean(dim=(1, 2, 3), keepdim=True)
        expected = (fake_x0 - real) / weight / x.numel()
    # the same network calls on the same inputs; only the normalisation and the 1 / numel scaling round in another
    # order (a few float32 operations, ~1e-6 relative where the difference itself is small; measured 4e-6 max)
    assert torch.allclose(x.grad, expected, rtol=1e-4, atol=1e-6 * expected.abs().max().item())
    assert int(teacher.schedule.timestep(sigma).min()) >= 20 and int(teacher.schedule.timestep(sigma).max()) <= 980


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_fake_loss_is_the_teachers_own_loss(pred):
    """The fake-score loss equals the teacher's native training loss (eps or v MSE), computed with diffusers."""
    sched, teacher, fake = _pair(pred)
    obj = DMD2(teacher, fake)
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    torch.manual_seed(7)
    loss = obj.fake_denoising_loss(x)
    torch.manual_seed(7)
    sigma = sample_sigma(fake.schedule, 4, 0.0, 1.0, "cpu")
    noise = torch.randn_like(x)
    t = fake.schedule.timestep(sigma).long()
    with torch.no_grad():
        out = fake.model(sched.add_noise(x, noise, t), t).sample
    target = noise if pred == "epsilon" else sched.get_velocity(x, noise, t)
    expected = ((out - target) ** 2).mean()
    # fastdiff works in x0 terms at sigma up to ~160 (t = 892 here): x0_hat = x_t - sigma eps_hat rounds to ~eps |x_t|
    # ~ 1.2e-7 x 5 sigma, i.e. ~6e-7 in eps units after the 1 / sigma^2 weight, against |eps_hat - eps| ~ 1: the MSE
    # agrees to ~1e-6 relative (measured 1e-7); rtol 1e-5.
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=0)


def test_cfg_on_the_real_score_only():
    sched, teacher, fake = _pair(num_class_embeds=4)
    teacher.guidance_scale = 3.0
    obj = DMD2(teacher, fake)
    x = torch.randn(2, 1, 8, 8)
    cond = {"class_labels": torch.tensor([0, 2])}
    sigma = teacher.schedule.sigma_at(torch.tensor([500, 500]))
    grad = obj.dm_gradient(x, x, sigma, cond)
    real = teacher(x, sigma, cond, guidance_scale=3.0)
    fake_x0 = fake(x, sigma, cond, guidance_scale=1.0)
    expected = (fake_x0 - real) / (x - real).abs().mean(dim=(1, 2, 3), keepdim=True)
    # the same calls; the division rounds alike up to operation order: a few float32 roundings (eps 1.2e-7) of the
    # largest value, 8 of them allowed (measured 2.4e-7 on values up to ~5, i.e. ~0.4 of one)
    eps32 = torch.finfo(torch.float32).eps
    assert torch.allclose(grad, expected, rtol=0, atol=8 * eps32 * float(expected.detach().abs().max()))


def test_gan_head_trains_critic_and_passes_gradient_to_the_generator():
    sched, teacher, fake = _pair(num_class_embeds=4)
    head = GANHead(fake)
    obj = DMD2(teacher, fake, gan_head=head)
    cond = {"class_labels": torch.tensor([0, 1])}
    x = torch.randn(2, 1, 8, 8)
    real = (torch.rand(2, 1, 8, 8) * 2 - 1, cond)
    loss, logs = obj.critic_loss(x, cond, real)
    loss.backward()
    assert "loss_gan_d" in logs and all(p.grad is not None for p in head.parameters())
    assert any(p.grad is not None for p in fake.parameters())

    fake.requires_grad_(False)
    for p in head.parameters():
        p.requires_grad_(False)
    xg = torch.randn(2, 1, 8, 8, requires_grad=True)
    loss, logs = obj.generator_loss(xg, cond)
    loss.backward()
    assert "loss_gan_g" in logs and xg.grad is not None and xg.grad.abs().sum() > 0


def test_backward_simulation_trains_the_later_steps():
    sched, teacher, _ = _pair()
    student = Denoiser(tiny_unet(seed=2), teacher.schedule, "epsilon")
    gen = Generator(student, num_steps=4)
    assert [int(t) for t in teacher.schedule.timestep(gen.sigmas)] == [999, 749, 499, 249]
    seen = set()
    for seed in range(12):
        torch.manual_seed(seed)
        k = int(torch.randint(4, (1,)))
        seen.add(k)
        z = torch.randn(2, 1, 8, 8)
        torch.manual_seed(seed)  # training_sample draws k first, as computed above
        out = gen.training_sample(z)
        out.sum().backward()
        assert out.shape == (2, 1, 8, 8)
    assert seen == {0, 1, 2, 3}
    assert all(p.grad is not None for p in student.model.parameters() if p.requires_grad)


def _loss_with_a_nan_sample(obj):
    """(clean batch, the batch with a NaN in sample 1 (its .grad filled), loss, logs) at noise seed 3; the NaN
    sample is counted once and the loss stays finite."""
    x = torch.randn(3, 1, 8, 8)
    bad = x.clone()
    bad[1, 0, 0, 0] = float("nan")
    bad.requires_grad_(True)
    torch.manual_seed(3)
    loss, logs = obj.generator_loss(bad)
    loss.backward()
    assert torch.isfinite(loss) and int(logs["nonfinite_samples"]) == 1
    return x, bad, loss, logs


@pytest.mark.parametrize("name", ["sid", "sim"])
def test_nonfinite_samples_are_masked_without_host_sync(name):
    """A NaN sample is dropped by a select (no boolean indexing, so no device sync): the loss is the other
    samples' sum over the full batch, and their gradients stay finite. (The dropped sample's own gradient passes
    back through the networks as 0 x NaN; a NaN there makes the update non-finite, and the trainer skips it.)"""
    from fastdiff.objectives import SIM, SiD

    _, teacher, fake = _pair()
    obj = (SiD if name == "sid" else SIM)(teacher, fake)
    x, bad, loss, logs = _loss_with_a_nan_sample(obj)
    assert torch.isfinite(bad.grad[[0, 2]]).all() and bad.grad[[0, 2]].abs().sum() > 0
    # The same value as the two finite samples alone, divided by the batch of 3.
    torch.manual_seed(3)
    keep = torch.tensor([0, 2])
    ref, _ = obj.generator_loss(x)
    torch.manual_seed(3)
    sigma = sample_sigma(teacher.schedule, 3, obj.min_t, obj.max_t, "cpu")
    noise = torch.randn_like(x)
    x_t = x + sigma.reshape(-1, 1, 1, 1) * noise
    from fastdiff.objectives.sid import sid_loss
    from fastdiff.objectives.sim import sim_loss

    with torch.no_grad():
        y_r, y_f = teacher(x_t[keep], sigma[keep]), fake(x_t[keep], sigma[keep])
        per = sid_loss(x[keep], y_r, y_f, obj.alpha) if name == "sid" else sim_loss(x[keep], x_t[keep], y_r, y_f, obj.c)
    # the networks on the 2 kept samples against the batch of 3 (other float32 kernel blockings) and the sum in
    # another order: a few roundings of per-sample terms up to 0.2, i.e. ~1e-7 x 0.2; rtol 1e-5 (~80 eps32 of the
    # loss, 0.03 - 0.07 here) plus atol 1e-7 for a loss whose terms cancel (measured 0 for sid and sim)
    torch.testing.assert_close(loss.detach(), per.sum() / 3, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("weighting", ["dmd", "vsd"])
def test_dmd2_and_vsd_mask_nonfinite_samples(weighting, monkeypatch):
    """A NaN sample (or a NaN teacher output) is dropped and counted, as SiD / SIM do, not zeroed: the loss is
    the other samples' 0.5 |grad|^2 over the full batch, their gradients are those of the clean batch, and the
    dropped sample gets exactly zero (the surrogate has no graph through the networks)."""
    _, teacher, fake = _pair()
    obj = DMD2(teacher, fake, weighting=weighting)
    x, bad, loss, logs = _loss_with_a_nan_sample(obj)
    assert torch.equal(bad.grad[1], torch.zeros_like(bad.grad[1]))
    # Reference: the DM gradient of the two finite samples at the same noise, 0.5 mean(grad^2) summed / 3.
    torch.manual_seed(3)
    sigma = sample_sigma(teacher.schedule, 3, obj.min_t, obj.max_t, "cpu", obj.sigma_grid)
    x_t = x + sigma.reshape(-1, 1, 1, 1) * torch.randn_like(x)
    keep = torch.tensor([0, 2])
    g = obj.dm_gradient(x[keep], x_t[keep], sigma[keep], None)
    # float32 sums of 64 squares per sample: relative rounding ~ 64 x 1.2e-7; rtol 1e-5 covers it.
    torch.testing.assert_close(loss.detach(), 0.5 * g.pow(2).mean(dim=(1, 2, 3)).sum() / 3, rtol=1e-5, atol=0)
    # d loss / d x = grad / numel of the batch, per kept sample. g here comes from the networks on 2 samples, the
    # loss's from 3 (other kernel blockings): roundings of the largest element, not of each (elementwise relative
    # error reached 1.9e-6 on the smallest ones); 16 eps32 of the largest (measured 1 eps32 of it).
    want = g / x.numel()
    eps32 = torch.finfo(torch.float32).eps
    torch.testing.assert_close(bad.grad[keep], want, rtol=0, atol=16 * eps32 * float(want.abs().max()))

    # A teacher that returns NaN for one sample: counted, not hidden as a zero gradient.
    real_forward = teacher.forward

    def nan_teacher(x_in, sig, cond=None, guidance_scale=None):
        out = real_forward(x_in, sig, cond, guidance_scale)
        return torch.where(torch.arange(len(out)).reshape(-1, 1, 1, 1) == 2, float("nan"), out)

    monkeypatch.setattr(teacher, "forward", nan_teacher)
    x2 = x.clone().requires_grad_(True)
    loss2, logs2 = obj.generator_loss(x2)
    loss2.backward()
    assert torch.isfinite(loss2) and int(logs2["nonfinite_samples"]) == 1
    assert torch.equal(x2.grad[2], torch.zeros_like(x2.grad[2])) and x2.grad[:2].abs().sum() > 0


def test_text_teachers_get_dmd2_scripts_update_ratio_and_gan_weight():
    """experiments/sdv1.5 and sdxl scripts: --dfake_gen_update_ratio 10 / 5 and --gen_cls_loss_weight 1e-3 / 5e-3
    (ImageNet's 3e-3 stays the constructor default for other teachers); a value the config sets wins."""
    from types import SimpleNamespace

    from fastdiff.objectives import teacher_options

    unset = {"critic_updates": None, "gan_generator_weight": None}
    for pipeline, ratio, weight in (("StableDiffusionPipeline", 10, 1e-3), ("StableDiffusionXLPipeline", 5, 5e-3)):
        teacher = SimpleNamespace(conditioning="text", pipeline=type(pipeline, (), {})())
        got = teacher_options("dmd2", teacher, dict(unset))
        assert (got["critic_updates"], got["gan_generator_weight"]) == (ratio, weight), pipeline
        assert teacher_options("dmd2", teacher, {**unset, "gan_generator_weight": 2e-3})["gan_generator_weight"] == 2e-3
    assert teacher_options("dmd2", SimpleNamespace(conditioning="class", pipeline=None), dict(unset)) == unset


EPS32 = torch.finfo(torch.float32).eps
EPS64 = torch.finfo(torch.float64).eps


def _fixed_gan_noising(obj, monkeypatch, timesteps):
    """Replace ``obj.gan_noised`` (a random level over the whole schedule, then fresh noise) by fixed levels and a
    fixed noise per call; each call's (sigma, noise) is recorded in call order so a test can rebuild the head's
    inputs exactly. The noised sample keeps its graph to x, as the real one does."""
    gen = torch.Generator().manual_seed(123)
    calls = []

    def fixed(x):
        sigma = obj.teacher.schedule.sigma_at(torch.tensor(timesteps[: x.shape[0]]))
        noise = torch.randn(x.shape, generator=gen)
        calls.append((sigma, noise))
        return x + sigma.reshape(-1, 1, 1, 1) * noise, sigma

    monkeypatch.setattr(obj, "gan_noised", fixed)
    return calls


def test_generator_gan_term_is_dmd2s_non_saturating_loss(monkeypatch):
    """The generator's GAN term against tianweiy/DMD2 main/sd_guidance.py ``compute_generator_clean_cls_loss``
    (``gen_cls_loss = F.softplus(-pred_realism_on_fake_with_grad).mean()``) and main/train_sd.py
    (``generator_loss += gen_cls_loss * gen_cls_loss_weight``): loss = loss_dm + gan_generator_weight *
    softplus(-D).mean(), with D the head's logits on the same noised sample. The sign is what matters: softplus(D)
    instead would differ by weight * mean(D) and push the generator away from "real"; a step along the term's
    gradient must raise every sample's logit.

    The noising is fixed (``gan_noised`` patched), so the head sees bitwise the same inputs here and in the
    objective: the logits are equal and only softplus (float32 there, float64 here), the mean over 4 samples and
    the weighted sum round, a few eps32 of the (positive) terms; 8 eps32 of them is allowed."""
    sched, teacher, fake = _pair(num_class_embeds=4)
    head = GANHead(fake)
    obj = DMD2(teacher, fake, gan_head=head, gan_generator_weight=0.3, gan_critic_weight=0.07)
    calls = _fixed_gan_noising(obj, monkeypatch, [50, 300, 600, 900])
    cond = {"class_labels": torch.tensor([0, 1, 2, 0])}
    torch.manual_seed(0)
    x = torch.randn(4, 1, 8, 8, requires_grad=True)
    torch.manual_seed(3)
    loss, logs = obj.generator_loss(x, cond)
    assert len(calls) == 1
    sigma, noise = calls[0]
    with torch.no_grad():
        logits = head(x.detach() + sigma.reshape(-1, 1, 1, 1) * noise, sigma, cond).double()
    gen_cls_loss = torch.nn.functional.softplus(-logits).mean()  # DMD2's, in float64
    assert abs(float(logs["loss_gan_g"]) - float(gen_cls_loss)) <= 8 * EPS32 * float(gen_cls_loss)
    expected = logs["loss_dm"].double() + 0.3 * gen_cls_loss
    assert abs(float(loss.detach()) - float(expected)) <= 8 * EPS32 * float(expected)
    # Teeth: the wrong sign would move the loss by 0.3 * mean(D), far above the bound.
    assert 0.3 * abs(float(logits.mean())) > 1e4 * 8 * EPS32 * float(expected)

    # The direction: with the DM gradient switched off, a small step down the loss raises each sample's logit
    # (each logit depends on its own sample only; the step is 1e-2 at the largest element, a first-order change).
    monkeypatch.setattr(obj, "dm_gradient", lambda x, x_t, sigma, cond, *a, **k: torch.zeros_like(x))
    x2 = x.detach().clone().requires_grad_(True)
    loss2, _ = obj.generator_loss(x2, cond)
    (grad,) = torch.autograd.grad(loss2, x2)
    sigma2, noise2 = calls[1]
    step = x2.detach() - 1e-2 * grad / grad.abs().max()
    with torch.no_grad():
        before = head(x2.detach() + sigma2.reshape(-1, 1, 1, 1) * noise2, sigma2, cond)
        after = head(step + sigma2.reshape(-1, 1, 1, 1) * noise2, sigma2, cond)
    assert (after > before).all(), (before, after)


def test_critic_gan_term_uses_the_critic_weight_and_dmd2s_discriminator_loss(monkeypatch):
    """The critic loss against tianweiy/DMD2 main/sd_guidance.py ``compute_guidance_clean_cls_loss``
    (``F.softplus(pred_realism_on_fake).mean() + F.softplus(-pred_realism_on_real).mean()``) and main/train_sd.py
    (``guidance_loss += guidance_cls_loss * guidance_cls_loss_weight``): loss = loss_fake + gan_critic_weight *
    that, with the critic's weight (here 0.07), not the generator's (0.3): DMD2's defaults differ (1e-2 and 3e-3),
    and nothing else ties the critic loss to its parts.

    Same draws: the fake-score loss is re-drawn from the same seed (critic_loss computes it first, the GAN noising
    is patched and draws nothing), so it is the same computation and compared exactly. The logits are bitwise the
    objective's (same inputs); softplus, two means over 4 and the weighted sum round a few eps32 of the (positive)
    terms: 8 eps32 allowed."""
    sched, teacher, fake = _pair(num_class_embeds=4)
    head = GANHead(fake)
    obj = DMD2(teacher, fake, gan_head=head, gan_generator_weight=0.3, gan_critic_weight=0.07)
    calls = _fixed_gan_noising(obj, monkeypatch, [50, 300, 600, 900])
    cond = {"class_labels": torch.tensor([0, 1, 2, 0])}
    cond_real = {"class_labels": torch.tensor([2, 2, 1, 0])}
    torch.manual_seed(0)
    x, x_real = torch.randn(4, 1, 8, 8), torch.rand(4, 1, 8, 8) * 2 - 1
    torch.manual_seed(5)
    loss, logs = obj.critic_loss(x, cond, (x_real, cond_real))
    torch.manual_seed(5)
    with torch.no_grad():
        loss_fake = obj.fake_denoising_loss(x, cond, obj.fake_loss)
        (s_f, n_f), (s_r, n_r) = calls
        pred_realism_on_fake = head(x + s_f.reshape(-1, 1, 1, 1) * n_f, s_f, cond).double()
        pred_realism_on_real = head(x_real + s_r.reshape(-1, 1, 1, 1) * n_r, s_r, cond_real).double()
    F = torch.nn.functional
    guidance_cls_loss = F.softplus(pred_realism_on_fake).mean() + F.softplus(-pred_realism_on_real).mean()
    assert torch.equal(logs["loss_fake"], loss_fake)
    assert abs(float(logs["loss_gan_d"]) - float(guidance_cls_loss)) <= 8 * EPS32 * float(guidance_cls_loss)
    expected = loss_fake.double() + 0.07 * guidance_cls_loss
    assert abs(float(loss.detach()) - float(expected)) <= 8 * EPS32 * float(expected)
    # Teeth: the generator's weight instead moves the loss by 0.23 * guidance_cls_loss (~0.3), far above the bound.
    assert 0.23 * float(guidance_cls_loss) > 1e4 * 8 * EPS32 * float(expected)


def test_discriminator_gan_loss_is_bce_on_real_as_one_and_fake_as_zero():
    """``discriminator_gan_loss`` against torch's ``BCEWithLogitsLoss`` on (real, 1) + (fake, 0), which is what
    tianweiy/DMD2 main/sd_guidance.py ``compute_guidance_clean_cls_loss`` computes as
    ``softplus(fake).mean() + softplus(-real).mean()``; on its own so DMD2's discriminator does not rest on LADD's
    test. Logits of both signs, in float64, up to |15|: F.softplus switches to the identity above its threshold 20,
    dropping log1p(e^-x) <= 2e-9, which float64 would see. Both sides are a handful of float64 operations and a mean
    over 7 values per term: 16 eps64 of the summed magnitudes allowed."""
    from fastdiff.objectives.gan import discriminator_gan_loss

    real = torch.tensor([-15.0, -4.0, -0.3, 0.0, 0.6, 3.5, 12.0], dtype=torch.float64)
    fake = torch.tensor([-11.0, -2.5, -0.7, 0.2, 1.0, 6.0, 15.0], dtype=torch.float64)
    bce = torch.nn.BCEWithLogitsLoss()
    ref = bce(real, torch.ones_like(real)) + bce(fake, torch.zeros_like(fake))
    ours = discriminator_gan_loss(real, fake)
    assert abs(float(ours) - float(ref)) <= 16 * EPS64 * float(ref)
    # teeth: flipping either sign moves the loss by that side's mean logit (-0.46 real, 1.14 fake here)
    assert abs(float(discriminator_gan_loss(-real, fake)) - float(ref)) > 0.1
    assert abs(float(discriminator_gan_loss(real, -fake)) - float(ref)) > 0.1
