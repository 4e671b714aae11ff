"""TDM (fastdiff/objectives/tdm.py): the step-aware timestep intervals against the reference's arithmetic, the generator
gradient against the closed-form KL gradient of the matched trajectory marginal on Gaussians (float64), the reduction
to DMD2 at K = 1, the reference's loss formulas transcribed (Luo-Yihong/TDM train_tdm_demo.py) on the same tensors,
and a tiny SD run with a LoRA student that exports and reloads in diffusers at its 4 steps."""
import json
import math

import pytest
import torch
from torch import nn

from fastdiff.models.analytic import GaussianMixtureModel
from fastdiff.models.denoiser import Denoiser
from fastdiff.models.generator import Generator
from fastdiff.models.mlp import MLPDenoiser
from fastdiff.models.schedule import VPSchedule
from fastdiff.objectives import DMD2, build
from fastdiff.objectives import dmd2 as dmd2_module
from fastdiff.objectives.tdm import TDM
from conftest import bench_gmm_rows

SCHEDULE = VPSchedule(GaussianMixtureModel().scheduler().alphas_cumprod)  # linear DDPM table, T = 1000


class GaussianDenoiser(nn.Module):
    """E[x0 | x_t] of N(mean, var0 I) diffused to x_t = x0 + sigma eps, in float64 (Tweedie, written out):
    ``x - sigma^2 (x - mean) / (var0 + sigma^2)``. ``var0`` may be negative: only ``var0 + sigma^2``, the variance of
    x_t, enters, so any Gaussian law of x_t at a given sigma is one of these."""

    def __init__(self, mean: torch.Tensor, var0: torch.Tensor):
        super().__init__()
        self.schedule, self.mean, self.var0 = SCHEDULE, mean.double(), var0.double()

    def forward(self, x, sigma, cond=None, guidance_scale=None):
        s2 = sigma.double().reshape(-1, *[1] * (x.ndim - 1)) ** 2
        return x - s2 * (x - self.mean) / (self.var0 + s2)


class LinearStudent(nn.Module):
    """x0 = m + s x_native, float64: its parameters are theta."""

    def __init__(self):
        super().__init__()
        self.schedule = SCHEDULE
        self.m = nn.Parameter(torch.tensor([0.3, -0.2, 0.5, 0.1], dtype=torch.float64).reshape(1, 1, 2, 2))
        self.s = nn.Parameter(torch.tensor(0.8, dtype=torch.float64))

    def denoise_native(self, x_native, sigma, cond=None):
        return self.m + self.s * x_native


def mlp_generator(num_steps: int, sampler: str = "ddim", sigma_init=None, seed: int = 0) -> Generator:
    torch.manual_seed(seed)
    return Generator(Denoiser(MLPDenoiser(sample_size=2, in_channels=1, hidden=16, depth=2), SCHEDULE, "sample"),
                     num_steps, sigma_init, sampler)


def reference_intervals(total_steps: int, steps: int, use_separate: bool = True) -> list[tuple[int, int]]:
    """train_tdm_demo.py, per step from the top: ``timesteps_g = ind * total_steps // 4 - 1``, ``timesteps_mid =
    timesteps_g - total_steps // 4 + 1``, ``randint(max(20, timesteps_mid), timesteps_g - 10)`` (upper end exclusive;
    ``args.total_steps - 10`` without --use_separate), with its 4 written as ``steps``; inclusive bounds here."""
    out = []
    for ind in range(steps, 0, -1):
        t_g = ind * total_steps // steps - 1
        t_mid = t_g - total_steps // steps + 1
        upt = t_g - 10 if use_separate else total_steps - 10
        out.append((max(20, t_mid), upt - 1))
    return out


@pytest.mark.parametrize("steps, total, sampler, separate", [(4, 1000, "ddim", True), (2, 1000, "ddim", True),
                                                             (4, 900, "lcm", True), (4, 1000, "ddim", False)])
def test_step_aware_intervals_are_the_references(steps, total, sampler, separate):
    # --total_steps 900 is the student starting at t = 899 (sigma_init there), which needs the lcm sampler here.
    sigma_init = None if total == 1000 else float(SCHEDULE.sigma_at(torch.tensor([total - 1]))[0])
    gen = mlp_generator(steps, sampler, sigma_init)
    teacher = Denoiser(GaussianMixtureModel(sample_size=2), SCHEDULE, "sample")
    obj = build("tdm", teacher, Denoiser(GaussianMixtureModel(sample_size=2), SCHEDULE, "sample"), student=gen,
                separate_intervals=separate)
    lo, hi = obj.intervals()
    assert list(zip(lo.tolist(), hi.tolist())) == reference_intervals(total, steps, separate)
    # The draws: 4000 per step cover each interval (<= 969 integers) end to end and stay inside it.
    k = torch.arange(steps).repeat_interleave(4000)
    t = SCHEDULE.timestep(obj.draw_levels(k)).round().long()
    for i in range(steps):
        drawn = t[k == i]
        assert drawn.min() == lo[i] and drawn.max() == hi[i]
        assert len(drawn.unique()) == hi[i] - lo[i] + 1 or hi[i] - lo[i] + 1 > 400  # (wide ones: not every integer)


@pytest.mark.parametrize("k, t", [(0, 700), (1, 300)])
def test_generator_gradient_is_the_kl_gradient_of_the_matched_marginal(k, t):
    """Step k of a 2-step ddim student, x0 = m + s x_k (x_k ~ N(0, I) native, independent of theta); its next state
    carried to level t is Gaussian, x_t = A x0 + B x_k + sqrt(sigma_t^2 - sigma_next^2) eps with A, B from the DDIM
    re-noising, so KL(q_t || p_t) against the teacher N(m*, tau^2 + sigma_t^2) is closed form and autograd gives its
    theta-gradient. TDM's surrogate (l2, vsd weight w = a_t s_t, fake score exact for q_t) passes its gradient
    through x0 only, d x_t / d theta = A d x0 / d theta, so its expectation is 2 w sigma_t^2 / (D A) grad KL."""
    torch.manual_seed(0)
    gen = mlp_generator(2)
    gen.denoiser = LinearStudent()
    student = gen.denoiser
    n, d, tau = 200_000, 4, 0.5
    m_star = torch.tensor([1.0, -0.5, 0.2, 0.7], dtype=torch.float64).reshape(1, 1, 2, 2)
    teacher = GaussianDenoiser(m_star, torch.tensor(tau ** 2))
    levels = torch.cat([gen.sigmas, torch.zeros(1)])
    a_k, s_k = (f(levels[k]).double() for f in (SCHEDULE.alpha, SCHEDULE.noise_scale))
    a_n, s_n = (f(levels[k + 1]).double() for f in (SCHEDULE.alpha, SCHEDULE.noise_scale))
    A, B = 1 - (s_n / a_n) * a_k / s_k, (s_n / a_n) / s_k  # x_next / a_n = a_n x0 + s_n (x_k - a_k x0) / s_k, / a_n
    sigma_t = SCHEDULE.sigma_at(torch.tensor([t])).double()
    var_t = sigma_t ** 2 - levels[k + 1].double() ** 2

    def q_moments():  # mean and variance of x_t per element
        return A * student.m, (A * student.s + B) ** 2 + var_t

    mean_q, v_q = q_moments()
    fake = GaussianDenoiser(mean_q.detach(), (v_q - sigma_t ** 2).detach())
    obj = TDM(teacher, fake, gen, weighting="vsd", distance="l2")

    x_k = torch.randn(n, 1, 2, 2, dtype=torch.float64)
    kk = torch.full((n,), k)
    x0, x_next, sigma_next = obj.student_step(x_k, kk, None)
    x_t, _, _ = obj.diffuse(x0.detach(), x_next, sigma_next.double(), sigma_t.expand(n))
    loss, _ = obj.matching_loss(x0, x_t, sigma_t.expand(n), None)
    got = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, [student.m, student.s])])

    v_p = tau ** 2 + sigma_t ** 2
    kl = (0.5 * (v_q / v_p - 1 + torch.log(v_p / v_q)) * d + ((mean_q - m_star) ** 2).sum() / (2 * v_p)).squeeze()
    grad_kl = torch.cat([g.reshape(-1) for g in torch.autograd.grad(kl, [student.m, student.s])])
    w = SCHEDULE.alpha(sigma_t) * SCHEDULE.noise_scale(sigma_t)
    want = 2 * w * sigma_t ** 2 / (d * A) * grad_kl

    # Tolerance: 6 standard errors of the Monte Carlo mean, from the per-sample terms written out (x_t detached):
    # 2 w / D * sum_d (y_fake - y_real) * d x0 / d theta, with d x0 / d m = 1 per element and d x0 / d s = x_k.
    with torch.no_grad():
        diff = fake(x_t, sigma_t.expand(n)) - teacher(x_t, sigma_t.expand(n))
        per = torch.cat([diff.reshape(n, d), (diff * x_k).sum(dim=(1, 2, 3)).reshape(n, 1)], 1) * 2 * w / d
    # the code's gradient is this per-sample mean (float64: a few hundred roundings of eps 1.1e-16)
    assert torch.allclose(got, per.mean(0), rtol=1e-10, atol=1e-12 * per.abs().max())
    se = per.std(0) / math.sqrt(n)
    assert ((got - want).abs() <= 6 * se).all(), (got, want, se)
    assert (want.abs() > 10 * se).any()  # the gradient is not lost in the noise


def test_one_step_tdm_is_dmd2_with_its_timestep_range(monkeypatch):
    """K = 1: the trajectory is the one-step sample, its next state the sample itself, x_t = x0 + sigma eps on
    [20, t_0 - 11]; the generator gradient is DMD2's on the same (x0, x_t, sigma) times 2 (the reference's mse/wf
    against DMD2's 0.5 mse surrogate)."""
    teacher = Denoiser(GaussianMixtureModel(sample_size=2, seed=1).requires_grad_(False), SCHEDULE, "sample")
    fake = Denoiser(GaussianMixtureModel(sample_size=2, seed=2).requires_grad_(False), SCHEDULE, "sample")
    gen = mlp_generator(1, "lcm")
    obj = TDM(teacher, fake, gen, distance="l2")
    lo, hi = obj.intervals()
    assert (lo.tolist(), hi.tolist()) == ([20], [988])
    torch.manual_seed(5)
    like = torch.zeros(64, 1, 2, 2)
    x0, x_t, sigma, mixed, eps = obj.trajectory_sample(like, None)
    torch.manual_seed(5)
    x_one = gen.training_sample(torch.randn_like(like))
    assert torch.equal(x0, x_one)
    # x_t - x0 = sigma eps: sigma from float64 sqrt(sigma^2), rounded to float32, then one product and one sum
    assert torch.allclose(x_t, x0.detach() + sigma.reshape(-1, 1, 1, 1) * eps, rtol=0, atol=4e-7 * x_t.abs().max())
    t = SCHEDULE.timestep(sigma).round()
    assert t.min() >= 20 and t.max() <= 988
    params = list(gen.denoiser.model.parameters())
    tdm_loss, _ = obj.matching_loss(x0, x_t, sigma, None)
    g_tdm = torch.autograd.grad(tdm_loss, params)
    monkeypatch.setattr(dmd2_module, "noised", lambda x, *a, **kw: (x_t, sigma))
    dmd_loss, _ = DMD2(teacher, fake, min_t=0.02, max_t=0.988).generator_loss(x_one, None)
    g_dmd = torch.autograd.grad(dmd_loss, params)
    for a, b in zip(g_tdm, g_dmd):
        # TDM's 1 / wf in float64, DMD2's in float32: a few float32 roundings (eps 1.2e-7) of each gradient entry
        assert torch.allclose(a, 2 * b, rtol=1e-5, atol=1e-5 * b.abs().max())


def test_losses_are_the_references_formulas_on_the_same_tensors():
    """train_tdm_demo.py transcribed: ``add_noise`` / ``Predictor.add_noise`` / ``obtain_mixed_noise`` for x_t and
    the mixed noise, ``loss_instruct`` (huber and mse, CFG'd teacher) and ``loss_score`` (min-SNR 5, importance
    weight), all in float64 on native VP tensors, against TDM's own functions on the same tensors."""
    g = torch.Generator().manual_seed(3)
    n = 6
    ac = SCHEDULE.alphas_cumprod.double()
    alpha_s, sigma_s = ac.sqrt(), (1 - ac).sqrt()
    t_mid = torch.tensor([750, 500, 250, 0, 500, 750])
    t = torch.tensor([900, 600, 300, 100, 700, 751])
    x0 = torch.randn(n, 4, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    model_eps = torch.randn(n, 4, 3, 3, generator=g, dtype=torch.float64)
    rand_noise = torch.randn(n, 4, 3, 3, generator=g, dtype=torch.float64)
    sd, sd_uncond, fake_latents = (torch.randn(n, 4, 3, 3, generator=g, dtype=torch.float64) for _ in range(3))
    cfg, huber_c = 4.5, 1e-3

    def ex(v, ts):
        return v[ts].reshape(-1, 1, 1, 1)

    # --- the reference ---------------------------------------------------------------------------------------
    x_mid_native = ex(alpha_s, t_mid) * x0.detach() + ex(sigma_s, t_mid) * model_eps  # DDPMScheduler.add_noise
    a_m, s_m, a_t, s_t = ex(alpha_s, t_mid), ex(sigma_s, t_mid), ex(alpha_s, t), ex(sigma_s, t)
    beta = (s_t ** 2 - (a_t / a_m * s_m) ** 2) ** 0.5
    x_t_native = x_mid_native / a_m * a_t + beta * rand_noise  # Predictor.add_noise
    mixed_ref = (model_eps / a_m * a_t * s_m + beta * rand_noise) / s_t  # Predictor.obtain_mixed_noise
    coop = x0.detach() + (sd - fake_latents) + (cfg - 1) * (sd - sd_uncond)
    sd_cfg = sd + (cfg - 1) * (sd - sd_uncond)
    wf = (x0.double() - sd_cfg.double()).abs().mean(dim=[1, 2, 3], keepdim=True).detach()
    huber_ref = torch.mean((torch.sqrt((x0 - coop) ** 2 + huber_c ** 2) - huber_c) / wf)
    mse_ref = (torch.nn.functional.mse_loss(x0, coop, reduction="none") / wf).mean()
    is_weight = torch.exp(-0.5 * (mixed_ref ** 2).view(n, -1).mean(dim=1)) / torch.exp(
        -0.5 * (rand_noise ** 2).view(n, -1).mean(dim=1))
    snr = torch.minimum((alpha_s[t] / sigma_s[t]) ** 2, torch.full((n,), 5.0, dtype=torch.float64))
    score_ref = (torch.nn.functional.mse_loss(fake_latents, x0.detach(), reduction="none").mean(dim=[1, 2, 3])
                 * snr * is_weight).mean()

    # --- TDM on the same tensors (VE scale: divide native by a) ----------------------------------------------
    class Returns(nn.Module):  # a network stand-in: the given x0 estimate (CFG is the Denoiser's, tested elsewhere)
        def __init__(self, out):
            super().__init__()
            self.out, self.schedule = out, SCHEDULE

        def forward(self, x, sigma, cond=None, guidance_scale=None):
            return self.out

    obj = TDM(Returns(sd_cfg), Returns(fake_latents), mlp_generator(4))
    ve = ((1 - ac) / ac).sqrt()
    sig_mid = torch.where(t_mid > 0, ve[t_mid], ve[0])  # the reference's state at t_mid = 0 is add_noise at 0 too
    x_t, mixed, _ = _diffuse_with(obj, x0.detach(), x_mid_native / a_m, sig_mid, ve[t], rand_noise)
    # float64, a dozen operations on values of order 10: 1e-12 relative
    assert torch.allclose(x_t * a_t, x_t_native, rtol=1e-12, atol=1e-12)
    assert torch.allclose(mixed, mixed_ref, rtol=1e-12, atol=1e-12)

    for distance, ref in (("huber", huber_ref), ("l2", mse_ref)):
        obj.distance = distance
        loss, _ = obj.matching_loss(x0, x_t, ve[t], None)
        assert torch.allclose(loss, ref, rtol=1e-12)
        (g_ref,), (g_ours,) = torch.autograd.grad(ref, [x0]), torch.autograd.grad(loss, [x0])
        assert torch.allclose(g_ours, g_ref, rtol=1e-10, atol=1e-14)
    w = obj.fake_weight(ve[t], mixed, rand_noise)
    score = (((fake_latents - x0.detach()) ** 2).mean(dim=[1, 2, 3]) * w).mean()
    assert torch.allclose(score, score_ref, rtol=1e-12)


def _diffuse_with(obj: TDM, x0, x_next, sigma_next, sigma_t, noise):
    """``obj.diffuse`` with its fresh draw replaced by ``noise`` (same shape and dtype)."""
    real = torch.randn_like
    torch.randn_like = lambda like, *a, **kw: noise
    try:
        return obj.diffuse(x0, x_next, sigma_next, sigma_t)
    finally:
        torch.randn_like = real


def test_critic_trains_the_fake_score_on_trajectory_states():
    teacher = Denoiser(GaussianMixtureModel(sample_size=2, seed=1).requires_grad_(False), SCHEDULE, "sample")
    fake_model = GaussianMixtureModel(sample_size=2, seed=2)
    gen = mlp_generator(4)
    obj = build("tdm", teacher, Denoiser(fake_model, SCHEDULE, "sample"), student=gen)
    loss, logs = obj.critic_loss(torch.zeros(16, 1, 2, 2))
    loss.backward()
    assert torch.isfinite(loss) and "loss_fake" in logs
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in fake_model.parameters())
    assert all(p.grad is None for p in gen.parameters())
    with pytest.raises(ValueError, match="step_margin"):
        build("tdm", teacher, Denoiser(fake_model, SCHEDULE, "sample"), student=gen, step_margin=300)


def test_tdm_lora_student_trains_exports_and_diffusers_reproduces_it_at_4_steps(tmp_path):
    from diffusers import StableDiffusionPipeline

    import tiny_pipelines as tp
    from test_text_to_image import assert_same, distill, ours, theirs

    sd, prompts = tp.sd_pipeline(tmp_path / "sd"), tp.prompts_file(tmp_path / "prompts.txt")
    folder = distill(str(sd), tmp_path / "run", f"data.prompts={prompts}", "objective.name=tdm",
                     "student.num_steps=4", "student.sampler=ddim", "student.sigma_init=null", "student.lora_rank=4",
                     "student.lora_export=fused", "train.lr_generator=1e-2", "train.lr_critic=1e-2",
                     "train.ema_decay=0", "train.max_steps=1", "train.checkpoint_every=1", "train.sample_every=1000")
    logs = [json.loads(line) for line in (folder.parent / "metrics.jsonl").read_text().splitlines()]
    assert {"loss_tdm", "loss_fake"} <= set(logs[-1]) and all(math.isfinite(v) for v in logs[-1].values())
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    mine = ours(folder, 4)
    assert_same(theirs(pipe, 4), mine)
    # the student trained: its fused UNet is not the teacher's
    teacher_unet = StableDiffusionPipeline.from_pretrained(sd).unet.state_dict()
    assert any(not torch.equal(v, teacher_unet[k]) for k, v in pipe.unet.state_dict().items())


@pytest.mark.slow  # 270 s on one shared core (the teacher-copy warm start, then 400 updates)
def test_bench_gmm_tdm_row(tmp_path):
    """eval/results/bench-gmm-cpu/README.md, "TDM" (seed 0, 4 ddim steps, 400 updates; distance l2, the default since
    the seed sweep): bench-tdm-l2-seed0.json (AMD EPYC, 1 thread, 2026-11-30; seed 1 reproduced bench-tdm-l2-seed1.json
    to the last digit). TDM misses the bar (2 x floor, 0.02) and this asserts what was measured: sw2 0.0663 (2.65 x the
    16-draw floor, 0.0250) / 0.038 (seeds 1, 2: 2.86 x / 0.037, 2.48 x / 0.060), better than its start (the teacher
    copy at 4 steps, 6.34 x / 0.061) and than the teacher's 4-step DDIM (5.10 x / 0.038). The reference's pseudo-Huber
    (--set objective.distance=huber, bench-tdm-huber-seed0.json, same day) measures 4.07 x / 0.072 at this seed: it
    fails here."""
    rows = bench_gmm_rows(tmp_path, "--objectives", "tdm")
    r = rows["tdm, 4 steps"]
    # room for runs that differ only in their random streams (the seeds span 0.4 x floor) and one sampling error of a
    # mode weight at n = 5000 (0.007), as the other slow bench tests
    assert r["sw2"] <= (2.65 + 0.5) * r["sw2_floor"] and r["max_mode_weight_error"] <= 0.038 + 0.007, r
    assert r["sw2"] < rows["init (teacher copy), 4 steps"]["sw2"] and r["sw2"] < rows["teacher-ddim-4"]["sw2"], rows
    # the README's verdict: a miss on both counts (seed 0 as seeds 1 and 2); if this fails, the README is out of date
    assert r["sw2"] > 2 * r["sw2_floor"] and r["max_mode_weight_error"] > 0.02, r


def test_tdm_clips_its_student_only(tiny_teacher, tmp_path):
    """train_tdm_demo.py clips the student's gradients at --max_grad_norm 1 and never the fake score's."""
    import math

    from fastdiff.config import load_config
    from fastdiff.training import Trainer

    cfg = load_config(None, [f"teacher.path={tiny_teacher}", "objective.name=tdm", "train.batch_size=2",
                             f"output_dir={tmp_path / 'run'}", "train.report_to=none"])
    run = Trainer(cfg, progress=False)
    assert (run.opt_g.clip, run.opt_c.clip) == (1.0, math.inf)
