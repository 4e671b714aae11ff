"""BOOT (fastdiff/objectives/boot.py): the bootstrapping target is one teacher DDIM step of the student's own previous
estimate, the top step starts from the exact signal of x_T = eps, g(eps, 0) is the one-step generator's sample, a
short run on the analytic teacher moves g(eps, 0) toward the exact ODE endpoint, and a run on a tiny diffusers teacher
exports a pipeline that reproduces it image for image."""
import math

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline

from fastdiff.inference.students import read_student_info, student_generator
from fastdiff.inference.sampling import to_uint8
from fastdiff.models.analytic import GaussianMixtureModel
from fastdiff.models.denoiser import Denoiser
from fastdiff.models.generator import Generator
from fastdiff.models.mlp import MLPDenoiser
from fastdiff.models.schedule import VPSchedule
from fastdiff.models.teacher import load_teacher
from fastdiff.objectives import build
from test_export_e2e import TRAINERS, assert_pipeline_matches, distill, image_bound
from conftest import bench_gmm_rows

STD = 0.5  # the teacher: one Gaussian mode N(mu, STD^2 I), whose denoiser and ODE are closed-form


def case(num_intervals: int = 8, seed: int = 0):
    gmm = GaussianMixtureModel(sample_size=2, weights=(1.0,), stds=(STD,), mean_scale=1.0, seed=3).requires_grad_(False)
    schedule = VPSchedule(gmm.scheduler().alphas_cumprod)
    teacher = Denoiser(gmm, schedule, "sample")
    torch.manual_seed(seed)
    mlp = MLPDenoiser(sample_size=2, in_channels=1, hidden=32, depth=2)
    student = Denoiser(mlp, schedule, "sample")
    obj = build("boot", teacher, None, student=student, sigma_max=2.5, num_intervals=num_intervals)
    return obj, gmm, mlp


def tweedie(x_ve: torch.Tensor, rho: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """E[x0 | x] of N(mu, STD^2 I) at VE level rho, float64."""
    r2 = rho.reshape(-1, 1, 1, 1) ** 2
    return mu + STD**2 * (x_ve - mu) / (STD**2 + r2)


def test_target_is_one_teacher_ddim_step_of_the_students_previous_estimate():
    obj, gmm, _ = case()
    eps = torch.randn(6, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    n = torch.tensor([1, 2, 3, 5, 7, 7])  # below the top: the student's estimate is the starting point
    y_t, target = obj.bootstrap_target(eps, n)
    with torch.no_grad():
        assert torch.equal(y_t, obj.student.denoise_native(eps, obj.net_levels[n]))  # g(eps, t_n), under no grad
    # Independently, in float64: the probability-flow ODE's Euler step in the VE scale (DDIM) from the VE state
    # x_t = y_t + rho_t eps to rho_s, with the exact Tweedie denoiser; the signal at s is x_s - rho_s eps.
    rho_t, rho_s = obj.levels[n].double(), obj.levels[n - 1].double()
    e, y = eps.double(), y_t.double()
    x_t = y + rho_t.reshape(-1, 1, 1, 1) * e
    f = tweedie(x_t, rho_t, gmm.means[0].double().reshape(1, 1, 2, 2))
    x_s = x_t + ((rho_s - rho_t) / rho_t).reshape(-1, 1, 1, 1) * (x_t - f)
    expected = x_s - rho_s.reshape(-1, 1, 1, 1) * e
    # float32 rounding of the objective's path: the teacher reads x_t in the VE scale (|x_t| <= rho_t |eps| + |y|,
    # up to 50 here), ~16 operations from there to the target: 1.2e-7 x 16 x that magnitude.
    scale = float(x_t.abs().max())
    assert (target.double() - expected).abs().max() <= 1.2e-7 * 16 * scale
    assert (target - y_t).abs().min() > 0  # a real step, not the identity


def test_the_top_step_starts_from_the_exact_signal_of_x_T_equal_eps():
    obj, gmm, mlp = case()
    for p in mlp.parameters():  # a student that returns NaN: the top step must not read it
        p.data.fill_(float("nan"))
    eps = torch.randn(4, 1, 2, 2, generator=torch.Generator().manual_seed(2))
    top = torch.full((4,), obj.num_intervals)
    y_T, target = obj.bootstrap_target(eps, top)
    # y_T = (x_T - s_T eps) / a_T with x_T = eps (native): the signal DDIM starts from.
    rho_T = obj.levels[-1].double()
    a_T = 1 / torch.sqrt(1 + rho_T**2)
    assert (y_T.double() - eps.double() * (1 - a_T * rho_T) / a_T).abs().max() <= 1.2e-7 * 4 * float(eps.abs().max())
    # The target is the teacher's first DDIM step from the native x_T = eps (VE state eps / a_T), float64.
    x_T = eps.double() / a_T
    rho_s = obj.levels[-2].double()
    f = tweedie(x_T, rho_T.reshape(1), gmm.means[0].double().reshape(1, 1, 2, 2))
    x_s = x_T + (rho_s - rho_T) / rho_T * (x_T - f)
    expected = x_s - rho_s * eps.double()
    assert torch.isfinite(target).all()
    # float32 path through the VE state x_T (|x_T| = rho_T |eps| ~ 157 x 3): 1.2e-7 x 16 operations x that magnitude.
    assert (target.double() - expected).abs().max() <= 1.2e-7 * 16 * float(x_T.abs().max())


def test_g_at_zero_is_the_one_step_generators_sample_and_the_loss_trains_only_the_student():
    obj, _, mlp = case()
    eps = torch.randn(5, 1, 2, 2)
    with torch.no_grad():
        one_step = Generator(obj.student, 1, 2.5)(eps)
        assert torch.equal(obj.student_signal(eps, torch.zeros(5, dtype=torch.long)), one_step)
    assert math.isclose(float(obj.net_levels[-1]), float(obj.levels[-1]))  # t = T: the network's top level
    loss, logs = obj.generator_loss(torch.zeros(16, 1, 2, 2))
    loss.backward()
    assert {"loss_boot", "loss_boot_unweighted"} <= set(logs)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in mlp.parameters())


def test_loss_matches_oftsr_transcription_of_the_boot_loss():
    """yuanzhi-zhu/OFTSR ``distill_fm.py`` (``distil_loss == 'boot'``), transcribed on the same draws: with data time
    tau (x = tau x1 + (1 - tau) x0, noise at tau = 0; here tau = 1 / (1 + rho)) and s later than t in tau,
    ``delta = (1 - t (1 - s) / (s (1 - t))) / (s - t) * (s - t)``, loss ``mean(1 / delta^2 * mse(y_s, sg(y_t +
    delta (teacher - y_t))))``; the teacher term is the paper's x0 estimate f at (y_t, t) (OFTSR's flow variant puts
    a teacher Euler step there), and OFTSR's ``+ 1e-6`` guard on ``s - t`` is left out (it only rescales delta by
    ``1 - 1e-6 / (s - t)``)."""
    obj, gmm, _ = case()
    x = torch.zeros(32, 1, 2, 2)
    torch.manual_seed(7)
    loss = obj.generator_loss(x)[0].detach()
    torch.manual_seed(7)  # the objective's draws, in its order: eps, then the grid index
    eps, n = torch.randn(x.shape), torch.randint(1, obj.num_intervals + 1, (32,))
    with torch.no_grad():
        y_t, _ = obj.bootstrap_target(eps, n)
        y_s = obj.student_signal(eps, n - 1)
        rho_t, rho_s = obj.levels[n], obj.levels[n - 1]
        x_t = obj.teacher.schedule.alpha(rho_t).reshape(-1, 1, 1, 1) * y_t \
            + obj.teacher.schedule.noise_scale(rho_t).reshape(-1, 1, 1, 1) * eps
        f = obj.teacher.denoise_native(x_t, rho_t)
    t, s = 1 / (1 + rho_t.double()), 1 / (1 + rho_s.double())  # OFTSR's t < s (s nearer the data)
    t_step = s - t
    labmda_t = (1 - (t * (1 - s)) / (s * (1 - t))) / t_step
    delta = (labmda_t * t_step).float().reshape(-1, 1, 1, 1)
    reference = (1 / delta**2 * (y_s - (y_t + delta * (f - y_t))) ** 2).mean()
    # float32: the two compute delta in different orders (relative 1e-7 x 1 / delta^2's amplification ~ 2 / delta,
    # delta >= 0.3 on this grid) and sum 128 terms: 1.2e-7 x 128 x 10 x the loss.
    assert abs(float(loss) - float(reference)) <= 1.2e-7 * 128 * 10 * float(reference)


def test_gradient_is_the_transcriptions_with_the_target_stopped():
    """The same transcription with gradient: OFTSR computes the bootstrap target (the student's y_t and the teacher's
    step from it) without gradient, so the student's parameters get d/dtheta of ``1 / delta^2 mse(y_s, sg(target))``
    through y_s alone. A target left attached (its y_t carries the student's gradient too) would differ."""
    obj, gmm, mlp = case()
    x = torch.zeros(32, 1, 2, 2)
    params = list(mlp.parameters())
    torch.manual_seed(7)
    got = torch.autograd.grad(obj.generator_loss(x)[0], params)
    torch.manual_seed(7)
    eps, n = torch.randn(x.shape), torch.randint(1, obj.num_intervals + 1, (32,))
    with torch.no_grad():
        y_t, _ = obj.bootstrap_target(eps, n)
        rho_t, rho_s = obj.levels[n], obj.levels[n - 1]
        x_t = obj.teacher.schedule.alpha(rho_t).reshape(-1, 1, 1, 1) * y_t \
            + obj.teacher.schedule.noise_scale(rho_t).reshape(-1, 1, 1, 1) * eps
        f = obj.teacher.denoise_native(x_t, rho_t)
    y_s = obj.student_signal(eps, n - 1)  # with gradient
    t, s = 1 / (1 + rho_t.double()), 1 / (1 + rho_s.double())
    delta = ((1 - (t * (1 - s)) / (s * (1 - t))) / (s - t) * (s - t)).float().reshape(-1, 1, 1, 1)
    want = torch.autograd.grad((1 / delta**2 * (y_s - (y_t + delta * (f - y_t))) ** 2).mean(), params,
                               retain_graph=True)
    # float32: the same student pass; the residual's factor 2 / delta^2 / numel differs by the rounding of delta
    # (computed in another order: 1e-7 relative x 1 / delta^2's amplification ~ 2 / delta <= 7): 1e-5 of the largest
    # element covers it ~10x.
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5 * float(w.abs().max()))
    # a target with the student's gradient left in (y_t attached) changes it
    top = (n == obj.num_intervals).reshape(-1, 1, 1, 1)
    y_t_live = torch.where(top, obj.top_signal(eps), obj.student_signal(eps, n))
    attached = torch.autograd.grad((1 / delta**2 * (y_s - (y_t_live + delta * (f - y_t_live))) ** 2).mean(), params,
                                   allow_unused=True)
    assert any(a is not None and (a - w).abs().max() > 1e-3 * w.abs().max() for a, w in zip(attached, want))


def test_bad_settings_are_errors():
    obj, _, _ = case()
    with pytest.raises(ValueError, match="sigma_init"):
        build("boot", obj.teacher, None, student=obj.student)  # no sampling level below the top
    with pytest.raises(ValueError, match="loss_weighting"):
        build("boot", obj.teacher, None, student=obj.student, sigma_max=2.5, loss_weighting="ict")


def test_short_training_moves_g_at_zero_toward_the_exact_ode_endpoint():
    """150 updates (about 2 s): the RMS error of g(eps, 0) to the exact probability-flow endpoint falls from the
    random student's 0.62-0.66 to 0.334-0.336 (seeds 0-3, x86-64), against 0.50 for the best noise-blind answer
    (the mode's mean; the endpoint's spread is STD) and 0.155 for the 8-step DDIM chain BOOT converges to."""
    obj, gmm, mlp = case(num_intervals=8)
    eps = torch.randn(2000, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    mu = gmm.means[0].double().reshape(1, 1, 2, 2)
    rho_T, rho_0 = obj.levels[-1].double(), obj.levels[0].double()
    # Exact ODE of one Gaussian from native x_T = eps: x(rho) = mu + (x_T - mu) sqrt(STD^2 + rho^2) / sqrt(STD^2 + rho_T^2)
    x_T = eps.double() * torch.sqrt(1 + rho_T**2)
    endpoint = mu + (x_T - mu) * torch.sqrt(STD**2 + rho_0**2) / torch.sqrt(STD**2 + rho_T**2) - rho_0 * eps.double()

    def error() -> float:
        with torch.no_grad():
            g = obj.student_signal(eps, torch.zeros(len(eps), dtype=torch.long)).double()
        return float(((g - endpoint) ** 2).mean().sqrt())

    before = error()
    opt = torch.optim.Adam(mlp.parameters(), lr=3e-3)
    for _ in range(150):
        loss, _ = obj.generator_loss(torch.zeros(256, 1, 2, 2))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = error()
    blind = float(((mu - endpoint) ** 2).mean().sqrt())
    assert after < 0.65 * before, (before, after)
    assert after < 0.8 * blind, (after, blind)  # it learned the noise -> sample map, not only the mean


def test_boot_trains_exports_and_diffusers_reproduces_it(tiny_teacher, tmp_path):
    run = distill(tiny_teacher, tmp_path / "run", "objective.name=boot", "objective.critic_updates=null",
                  "objective.num_intervals=10", "train.lr_generator=1e-3", "train.lr_warmup_steps=0")
    student = run / "student"
    info = read_student_info(student)
    assert info["objective"] == "boot" and info["num_steps"] == 1 and math.isclose(info["sigma_init"], 2.5)
    trainer = TRAINERS[run.resolve()]
    # One-step images as uint8: diffusers' pipeline for the folder, fastdiff's sampler for it, the trainer's g(eps, 0).
    pipe = DDPMPipeline.from_pretrained(student)
    ref = pipe(batch_size=3, num_inference_steps=1, generator=torch.Generator().manual_seed(5), output_type="np").images
    z = torch.randn((3, 1, 8, 8), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ours = student_generator(load_teacher(str(student)), info)(z)
        exported = trainer.export_generator()(z)  # g(eps, 0) of the weights the run exports

    # Equal uint8 images: the float images agree to image_bound (1.5e-5 here: the same network, a few float32
    # operations ordered differently), so only a value within that x 255 of a rounding boundary (x.5) may round to
    # the neighbour level.
    ref_u8 = (ref * 255).round().astype(np.uint8)
    near_tie = np.abs((ref * 255) % 1 - 0.5) < 255 * image_bound(student, 3, 5)
    for images in (to_uint8(ours), to_uint8(exported)):
        assert np.array_equal(images[~near_tie], ref_u8[~near_tie])
        assert np.abs(images.astype(int) - ref_u8).max() <= 1
    teacher_w, student_w = load_teacher(tiny_teacher).model.state_dict(), pipe.unet.state_dict()
    assert any(not torch.equal(teacher_w[k], student_w[k]) for k in teacher_w)  # it trained: not the teacher's weights
    assert_pipeline_matches(student)  # and the image_bound check of every exported student (1, 2 and 4 steps)


def test_boot_refuses_a_flow_teacher():
    from fastdiff.models.schedule import FlowSchedule

    obj, _, _ = case()
    flow = Denoiser(obj.teacher.model, FlowSchedule(1000), "flow")
    with pytest.raises(ValueError, match="VP teacher"):
        build("boot", flow, None, student=obj.student, sigma_max=2.5)


@pytest.mark.parametrize("sets", [["objective.name=boot", "objective.num_intervals=10"],
                                  ["objective.name=tdm", "student.num_steps=1"]], ids=["boot", "tdm"])
def test_the_trainer_makes_no_generator_sample_for_objectives_that_run_their_own(tiny_teacher, tmp_path, sets):
    """BOOT and TDM run their own student pass (``uses_generator_sample`` False): the trainer's sample, which they
    never read, is no longer made. Two updates equal bit for bit those of the old loop (forced back on here, the
    sample made and ignored), with one student forward fewer per optimizer update (TDM: its critic's and its
    generator's). One-step students: the skipped sample drew nothing from the RNG (a K-step sample draws its step,
    so there only the random stream shifts)."""
    from fastdiff.config import load_config
    from fastdiff.training import Trainer

    def two_updates(out, make_sample: bool):
        cfg = load_config(None, [f"teacher.path={tiny_teacher}", f"output_dir={out}", "train.batch_size=2",
                                 "train.lr_generator=1e-3", "train.lr_critic=1e-3", "train.lr_warmup_steps=0",
                                 "train.ema_decay=0.5", *sets])
        trainer = Trainer(cfg, progress=False)
        assert trainer.objective.uses_generator_sample is False
        trainer.objective.uses_generator_sample = make_sample  # True: the loop as it was
        calls = []
        trainer.generator.denoiser.model.register_forward_hook(lambda *_: calls.append(1))
        logs, forwards = [], []
        for _ in range(2):
            before = len(calls)
            logs.append({k: torch.as_tensor(v).clone() for k, v in trainer.train_step().items()})
            trainer.step += 1
            forwards.append(len(calls) - before)
        weights = {**trainer.generator.denoiser.model.state_dict(),
                   **{f"ema.{k}": v for k, v in trainer.ema.state_dict().items()}}
        return logs, forwards, weights, trainer.objective.critic_updates + 1

    new_logs, new_forwards, new_weights, updates = two_updates(tmp_path / "new", False)
    old_logs, old_forwards, old_weights, _ = two_updates(tmp_path / "old", True)
    assert [old - new for old, new in zip(old_forwards, new_forwards)] == [updates, updates]
    for new, old in zip(new_logs, old_logs):
        assert new.keys() == old.keys() and all(torch.equal(new[k], old[k]) for k in new)
    assert new_weights.keys() == old_weights.keys()
    assert all(torch.equal(new_weights[k], old_weights[k]) for k in new_weights)


@pytest.mark.slow
def test_bench_gmm_boot_row(tmp_path):
    """eval/results/bench-gmm-cpu/README.md, "reflow, BOOT, Hyper-SD and MeanFlow" (seed 0, 4000 updates; about 3
    minutes on one core): BOOT misses the bar at one step (3.75 x floor, mode weights within 0.021; its ceiling, the
    50-interval DDIM chain it bootstraps toward, is 2.12 x) but its one step beats the teacher's 4-step DDIM (sw2
    0.0775 against 0.127). This asserts what was measured, with room for the seeds' spread (~0.3 x floor)."""
    rows = bench_gmm_rows(tmp_path, "--objectives", "boot")
    r = rows["boot"]
    assert r["sw2"] < rows["teacher-ddim-4"]["sw2"] and r["sw2"] <= 4.25 * r["sw2_floor"], r
    assert r["max_mode_weight_error"] <= 0.027, r  # 0.02 plus one sampling error of a weight (0.007 at n = 5000)
