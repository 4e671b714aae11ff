"""Rules of the objectives that their own tests left open (found by mutation testing): the scale and condition draws
of AGD's trajectories and FADA's two scales, AYF-LMD's end point, DisBack's guided path node, LADD's head blocks
against StyleGAN-T and SCM-LADD's critic input, TDM's step inputs, Uni-Instruct's normalised weights, reflow's
explicit pseudo-Huber c, PSO's flow weight at t = 1 and its logged margin, and ReFL's margin and CLIP preprocessing.
Each test is small, on plain tensors or tiny networks built here, and says which rule it pins."""
import copy
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from fastdiff.models.analytic import GaussianMixtureModel
from fastdiff.models.denoiser import Denoiser
from fastdiff.models.schedule import FlowSchedule, VPSchedule
from fastdiff.objectives import agd as agd_module
from fastdiff.objectives import build
from fastdiff.objectives.agd import AdapterGuidanceDistillation
from fastdiff.objectives.ayf import AlignYourFlow
from fastdiff.objectives.disback import Backtrack
from fastdiff.objectives.fada import MultiGuidanceDistillation
from fastdiff.objectives.fdistill import DensityRatio, level_position
from fastdiff.objectives.ladd import DiscriminatorHead, LocalBatchNorm
from fastdiff.objectives.pso import denoising_errors, pso_loss
from fastdiff.objectives.reward import ClipReward, RewardFeedback
from fastdiff.objectives.uni_instruct import UniInstruct, expansion_weights
from fastdiff.models.trajectory import ODEState
from conftest import tiny_unet

EPS32 = torch.finfo(torch.float32).eps
SCHEDULE = VPSchedule(GaussianMixtureModel().scheduler().alphas_cumprod)  # linear DDPM table, T = 1000


# --- AGD: the trajectories' scales, conditions and point layout --------------------------------------------------
def test_agd_trajectory_points_draw_w_in_range_take_batch_rows_and_index_step_major(monkeypatch):
    """agd.py trajectory_points: one w ~ U[lo, hi] per trajectory, trajectory j on batch row j's condition, and
    point index = step * m + trajectory. The teacher's trajectory is replaced by a spy whose states encode (step,
    trajectory), so every returned point can be decoded exactly (integers in float32)."""
    K, n, lo, hi = 3, 600, 1.5, 4.0  # m = 200 trajectories
    m = math.ceil(n / K)
    seen = {}

    def spy(denoiser, z, sigmas, cond, w):
        seen.update(cond=cond, w=w.clone(), m=z.shape[0])
        traj = torch.arange(z.shape[0], dtype=torch.float32).reshape(-1, 1)
        return [ODEState(sigmas[i], traj + 1000 * i, -(traj + 1000 * i)) for i in range(len(sigmas))]

    monkeypatch.setattr(agd_module, "ode_trajectory", spy)
    levels = torch.tensor([30.0, 3.0, 0.3])
    stub = SimpleNamespace(trajectory_steps=K, teacher=None, guidance=SimpleNamespace(range=(lo, hi)),
                           levels=lambda device: levels)
    labels = torch.arange(n) % 7 + 10 * (torch.arange(n) // 7)  # every row distinct
    torch.manual_seed(0)
    z, sigma, target, w, cond = AdapterGuidanceDistillation.trajectory_points(stub, n, (1,), {"class_labels": labels},
                                                                              "cpu")
    assert seen["m"] == m and torch.equal(seen["cond"]["class_labels"], labels[:m])
    ws = seen["w"]
    # U[1.5, 4.0] over 200 draws: the extremes lie within 0.1 of the ends with probability 1 - 2 (1 - 0.04)^200 > 0.999
    assert ws.min() >= lo and ws.max() <= hi and ws.min() < lo + 0.1 and ws.max() > hi - 0.1, (ws.min(), ws.max())
    step, traj = (z.flatten() // 1000).long(), (z.flatten() % 1000).long()
    assert torch.equal(target.flatten(), -z.flatten())
    assert torch.equal(sigma, levels[step]) and torch.equal(w, ws[traj])
    assert torch.equal(cond["class_labels"], labels[traj])
    assert len(set((1000 * step + traj).tolist())) == n  # n distinct points


# --- FADA: each condition's scale from its own range ------------------------------------------------------------
def test_fada_draws_each_scale_from_its_own_range():
    """fada.py draw_scales: class scale ~ U(class range), text scale ~ U(text range), per sample (disjoint ranges, 400
    draws: the ends are approached to within 5% of the width with probability > 0.999)."""
    stub = SimpleNamespace(class_range=(1.0, 2.0), text_range=(5.0, 9.0))
    torch.manual_seed(0)
    c, t = MultiGuidanceDistillation.draw_scales(stub, 400, "cpu")
    assert c.min() >= 1.0 and c.max() <= 2.0 and c.min() < 1.05 and c.max() > 1.95
    assert t.min() >= 5.0 and t.max() <= 9.0 and t.min() < 5.2 and t.max() > 8.8


# --- AYF-LMD: the teacher is read at the map's end point f^-(z, t, r) = z - (t - r) u -----------------------------
def test_ayf_lagrangian_target_reads_the_teacher_at_the_maps_end_point(tiny_teacher):
    """ayf.py target (lagrangian): ``v(f^-, r) + (t - r) du/dr`` with f^- = z + (r - t) u. The student's u, the
    teacher's v (here v(x) = 2 x) and du/dr (here 0) are replaced by closed forms, so the target is exactly
    2 (z - (t - r) u) up to float32 rounding of a few operations on values of order 3 (bound 16 eps32 x 3)."""
    from fastdiff.models.teacher import load_teacher

    d = load_teacher(tiny_teacher).denoiser
    student = Denoiser(copy.deepcopy(d.model), d.schedule, d.prediction_type)
    obj = AlignYourFlow(d, None, student, map_loss="lagrangian", tangent_warmup=0)
    torch.manual_seed(0)
    z = torch.randn(4, 1, 4, 4)
    t, r = torch.tensor([0.3, 0.5, 0.7, 0.9]), torch.tensor([0.1, 0.2, 0.4, 0.5])
    u = 0.5 * z + 1.0
    ends = []
    obj.student_velocity = lambda zz, tt, rts, cond: u
    obj.teacher_velocity = lambda x, rr, cond: ends.append(x) or 2 * x
    obj.du_dr = lambda zz, tt, rr, cond: torch.zeros_like(zz)
    got = obj.target(z, t, r, None, None)
    want = 2 * (z.double() - (t - r).double().reshape(-1, 1, 1, 1) * u.double())
    err = (got.double() - want).abs().max()
    assert err <= 16 * EPS32 * 3 * float(want.abs().max()), err
    assert torch.equal(torch.as_tensor(ends[0].shape), torch.as_tensor(z.shape))


# --- DisBack: the path node is read under the teacher's CFG scale ---------------------------------------------------
class ScaleRecorder(nn.Module):
    """x0 = p * x * guidance_scale: the output shows both the node's parameter and the scale it was called with."""

    def __init__(self):
        super().__init__()
        self.p = nn.Parameter(torch.tensor(1.0))

    def forward(self, x, sigma, cond=None, guidance_scale=1.0):
        return self.p * x * guidance_scale


def test_disback_path_node_is_read_with_the_teachers_guidance_scale():
    """disback.py Backtrack.real: psi_k is loaded into the fake network and called under the teacher's CFG scale (the
    reference loads the node into its guided real unet). The node is recorded at p = 1, the fake moves on to p = 3;
    at stage 2's first step (target psi_1) the real score is 1 * x * 2.5 exactly (products of small integers and
    2.5: exact in float32)."""
    fake = ScaleRecorder()
    back = Backtrack(fake, checkpoints=2, degradation_steps=2, interval=1)
    back.after_step(0)  # psi_1 = p = 1
    with torch.no_grad():
        fake.p.fill_(3.0)
    teacher = SimpleNamespace(guidance_scale=2.5)
    x = torch.tensor([[1.0, -2.0]])
    assert back.target(2) == 1
    assert torch.equal(back.real(teacher, 2, x, torch.ones(1)), 2.5 * x)


# --- LADD heads: StyleGAN-T's BatchNormLocal and residual block -----------------------------------------------------
def test_local_batch_norm_is_stylegan_ts_batch_norm_local():
    """ladd.py LocalBatchNorm against StyleGAN-T's ``BatchNormLocal`` transcribed in float64 (x viewed as (G, -1, C,
    L), mean and biased variance over samples and locations, eps 1e-5, affine). float32 ops on O(1) normalised values:
    bound 64 eps32 (a biased/unbiased swap changes them by sqrt(n/(n-1)) - 1 = 3% at n = 18)."""
    torch.manual_seed(0)
    bn = LocalBatchNorm(3, group=2)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.5, 2.0, -1.0]))
        bn.bias.copy_(torch.tensor([0.1, -0.3, 0.7]))
    h = torch.randn(4, 3, 3, 3) * torch.tensor([1.0, 3.0, 0.2]).reshape(1, 3, 1, 1) + 1.5
    with torch.no_grad():
        got = bn(h)
    x = h.double().reshape(4, 3, 9)  # (B, C, L)
    g = x.view(2, -1, 3, 9)
    mean = g.mean([1, 3], keepdim=True)
    var = g.var([1, 3], keepdim=True, unbiased=False)
    g = (g - mean) / torch.sqrt(var + 1e-5)
    want = (g * bn.weight.detach().double()[None, :, None] + bn.bias.detach().double()[None, :, None]).reshape(h.shape)
    assert (got.double() - want).abs().max() <= 64 * EPS32 * float(want.abs().max())
    # 5 samples in ceil(5 / 2) = 3 groups cannot be equal (the reference's view fails): groups of 2, 2, 1, each
    # normalised on its own (a group of one sample still averages over its locations)
    h5 = torch.randn(5, 3, 3, 3) + 1.5
    with torch.no_grad():
        got = bn(h5)
        want = torch.cat([bn(h5[0:2]), bn(h5[2:4]), bn(h5[4:5])])  # each a single group of its own
    assert torch.equal(got, want)
    bn8, h9 = LocalBatchNorm(3), torch.randn(9, 3, 2, 2)  # LADD's group of 8 at a per-process batch of 9: 5 + 4
    with torch.no_grad():
        assert torch.equal(bn8(h9), torch.cat([bn8(h9[:5]), bn8(h9[5:])]))


@pytest.mark.parametrize("spatial_dims, shape", [(2, (8, 4, 3, 3)), (1, (8, 5, 4)), (0, (8, 4))])
def test_discriminator_head_residual_is_scaled_by_one_over_sqrt2(spatial_dims, shape):
    """ladd.py DiscriminatorHead: ``out((residual(h) + h) / sqrt 2)``, h = first(features): StyleGAN-T's
    ``ResidualBlock`` (``(fn(x) + x) / np.sqrt(2)``) as Sana's ladd_blocks.py. Eval mode freezes the spectral norms'
    power iteration, so the blocks called one by one give the same weights; same float32 ops: bound 8 eps32 x |out|."""
    torch.manual_seed(0)
    channels = shape[-1] if spatial_dims == 1 else shape[1]
    head = DiscriminatorHead(channels, spatial_dims).eval()
    with torch.no_grad():
        head(torch.randn(shape))  # spectral norm's first call
        feats = torch.randn(shape)
        got = head(feats)
        h = feats.transpose(1, 2) if spatial_dims == 1 else (feats.unsqueeze(2) if spatial_dims == 0 else feats)
        first = head.first(h)
        want = head.out((head.residual(first) + first) / math.sqrt(2)).flatten(1)
    assert got.shape == want.shape
    assert (got - want).abs().max() <= 8 * EPS32 * float(want.abs().max() + 1), (got - want).abs().max()


# --- SCM-LADD critic (largest_timestep_prob 0): the fake is the student's x0 at the trig-noised data ----------------
def test_scm_ladd_critic_fake_side_is_the_students_estimate_at_x_t_over_cos():
    """ladd.py SCMLADD.critic_loss (Sana's phase D with ``train_largest_timestep`` off): x_t = cos t x + sin t sd eps,
    fake = the student's x0 estimate of the VE point x_t / cos t at sigma = sd tan t. Rebuilt from the same random
    stream (the sCM level draw, then the noise); the same network on the same float32 inputs: equal to 1e-6 of the
    largest value (a few float32 roundings of the division)."""
    from test_ladd import vp_denoiser

    teacher = vp_denoiser(tiny_unet(num_class_embeds=4), "v_prediction", null_class=3)
    student = vp_denoiser(tiny_unet(num_class_embeds=4, seed=2), "v_prediction", null_class=3)
    obj = build("scm-ladd", teacher, None, student=student, largest_timestep_prob=0.0, tangent="jvp")
    seen = []
    obj.adversary.critic_loss = lambda fake, real, fc, rc: seen.append((fake, real)) or torch.zeros(())
    cond = {"class_labels": torch.tensor([0, 1, 2, 1])}
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(5)
    obj.critic_loss(x, cond)
    torch.manual_seed(5)
    t = obj.sample_time(4, x.device)
    cos, sin = torch.cos(t).reshape(-1, 1, 1, 1), torch.sin(t).reshape(-1, 1, 1, 1)
    x_t = cos * x + sin * 0.5 * torch.randn_like(x)
    with torch.no_grad():
        want = student(x_t / cos, 0.5 * torch.tan(t), cond)
    fake, real = seen[0]
    assert torch.equal(real, x)
    torch.testing.assert_close(fake, want, rtol=0, atol=1e-6 * float(want.abs().max()))


# --- TDM: each sample's step input is the student's own state after k steps -----------------------------------------
def test_tdm_step_inputs_are_the_students_states_after_k_steps():
    """tdm.py step_inputs (the reference's ``generate_new``): sample j's input is the deterministic DDIM walk's state
    after k_j student steps from z (k = 0: z itself), every k of 0..K-1 present. The walk is recomputed here on the
    whole batch with the same calls: bit-equal."""
    from test_tdm import mlp_generator

    gen = mlp_generator(4)
    teacher = Denoiser(GaussianMixtureModel(sample_size=2), SCHEDULE, "sample")
    obj = build("tdm", teacher, Denoiser(GaussianMixtureModel(sample_size=2), SCHEDULE, "sample"), student=gen)
    torch.manual_seed(0)
    z = torch.randn(6, 1, 2, 2)
    k = torch.tensor([0, 1, 2, 3, 0, 2])
    got = obj.step_inputs(z, k, None)
    states, x = [z], z
    with torch.no_grad():
        for i in range(3):
            x0 = gen.denoiser.denoise_native(x, gen.sigmas[i], None)
            x = gen.next_input(x, x0, gen.sigmas[i], gen.sigmas[i + 1], lambda: torch.randn_like(z))
            states.append(x)
    for j, kj in enumerate(k.tolist()):
        assert torch.equal(got[j], states[kj][j]), (j, kj)


# --- Uni-Instruct: all three expansion weights over the batch mean of g -----------------------------------------------
@pytest.mark.parametrize("divergence", ["kl", "js"])
def test_uni_instruct_weights_are_the_expansion_over_the_batch_mean_of_g(divergence):
    """uni_instruct.py weights: (g, r g', r^2 g'') of the discriminator's ratio, EACH divided by the batch mean of g
    (the gradient's overall scale; dividing only g would change the mix of SiD, Fisher and DI parts). The ratio is
    recomputed by an identical fresh DensityRatio; float32 division of float32 values: bound 4 eps32 relative."""
    torch.manual_seed(0)
    logits = torch.randn(16) * 2
    sigma = SCHEDULE.sigma_at(torch.randint(0, 800, (16,)))
    # no per-level bins (ratio_bins 0): with them the kl g = r has batch mean 1 exactly and the division is invisible
    stub = SimpleNamespace(ratio=DensityRatio(bins=0), teacher=SimpleNamespace(schedule=SCHEDULE), min_t=0.0, max_t=0.8,
                           divergence=divergence)
    got = UniInstruct.weights(stub, logits, sigma)
    r = DensityRatio(bins=0)(logits, level_position(SCHEDULE, sigma, 0.0, 0.8))
    parts = expansion_weights(divergence, r)
    mean = parts[0].mean()
    assert abs(float(mean) - 1) > 0.1, mean  # a real normalisation is compared
    for g_got, g_raw in zip(got, parts):
        want = g_raw / mean
        assert (g_got - want).abs().max() <= 4 * EPS32 * float(want.abs().max()), (g_got - want).abs().max()


# --- reflow: an explicit huber_c is the pseudo-Huber's c -----------------------------------------------------------
def test_reflow_explicit_huber_c_is_the_pseudo_huber_c():
    """reflow.py generator_loss with ``huber_c`` given: ``mean(sqrt(|d|^2 + c^2) - c)`` of the velocity error d (rfpp's
    pseudo-Huber). Float32 sqrt of values ~ c^2 + |d|^2: bound 8 eps32 x (c + |d|)."""
    from test_reflow import LineOracle, _pairs

    z, x0, pairs = _pairs()
    schedule = FlowSchedule(1000)
    teacher = Denoiser(nn.Identity(), schedule, "flow")
    student = Denoiser(LineOracle(x0 + 0.05, z, schedule), schedule, "flow")  # off the line: d != 0
    c = 0.3
    obj = build("reflow", teacher, None, student=student, huber_c=c)
    t = torch.tensor([0.1, 0.3, 0.5, 0.6, 0.8, 0.9], dtype=torch.float64)
    _, v_pred, target = obj.regression(pairs, None, t)
    obj.draw_t = lambda n, device: t
    loss, _ = obj.generator_loss(pairs)
    d = (v_pred - target).double().flatten(1)
    want = ((d.pow(2).sum(1) + c * c).sqrt() - c).mean()
    assert float(want) > 1e-3
    assert abs(float(loss) - float(want)) <= 8 * EPS32 * float(c + d.pow(2).sum(1).sqrt().max())


# --- PSO: the first flow level's weight and the logged margin ------------------------------------------------------
class Halver(nn.Module):
    def __init__(self, schedule, gain=0.5):
        super().__init__()
        self.schedule, self.gain = schedule, gain

    def denoise_native(self, x, sigma, cond=None):
        return self.gain * x

    def loss_weight(self, sigma):
        return (((1 + sigma.double()) / sigma.double()) ** 2).float()  # the flow weight: nan at sigma = inf


def test_pso_flow_error_at_t_one_has_weight_one():
    """pso.py denoising_errors: at sigma = inf (a flow student's first level, pure noise) the velocity weight's limit
    1; elsewhere the student's loss weight. Same float32 ops as the code: bound 4 eps32 relative."""
    student = Halver(FlowSchedule(1000))
    torch.manual_seed(0)
    x0, noise = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    sigma = torch.tensor([math.inf, 1.0])
    got = denoising_errors(student, x0, sigma, noise)
    top = (0.5 * noise[0] - x0[0]).square().mean()  # x_native = noise at t = 1
    mid = 4.0 * (0.5 * (0.5 * x0[1] + 0.5 * noise[1]) - x0[1]).square().mean()  # t = 1/2: weight ((1 + 1) / 1)^2
    assert torch.isfinite(got).all() and float(top) > 0.1
    torch.testing.assert_close(got, torch.stack([top, mid]), rtol=4 * EPS32, atol=0)


def test_pso_logged_margin_is_reference_delta_minus_target_delta():
    """pso.py logs: ``pso_margin = mean(Delta(x0-) - Delta(x0+))`` (> 0: the targets gained on the references since
    the start) and the implicit accuracy its sign. A student that denoises one half better than the frozen one and
    the other worse, checked against denoising_errors computed here (the same calls: equal to float32 rounding)."""
    schedule = SCHEDULE
    student, reference = Halver(schedule, 0.0), Halver(schedule, 1.0)
    torch.manual_seed(0)
    x_target = torch.randn(3, 1, 4, 4) * 0.1  # small images: the zero student beats the identity (noisy) reference
    x_reference = torch.randn(3, 1, 4, 4) * 3.0  # large ones: it loses to it there
    sigma, noise = torch.full((3,), 0.5), torch.randn(3, 1, 4, 4)
    _, logs = pso_loss(student, reference, x_target, x_reference, sigma, noise, beta=1.0)
    x0 = torch.cat([x_target, x_reference])
    delta = denoising_errors(student, x0, sigma.repeat(2), noise.repeat(2, 1, 1, 1)) - denoising_errors(
        reference, x0, sigma.repeat(2), noise.repeat(2, 1, 1, 1))
    d_target, d_reference = delta.chunk(2)
    margin = d_reference - d_target
    assert (margin > 0).all()
    torch.testing.assert_close(logs["pso_margin"], margin.mean(), rtol=1e-6, atol=0)
    assert float(logs["pso_implicit_acc"]) == 1.0


# --- ReFL: the configured margin, CLIP preprocessing clamps ---------------------------------------------------------
def unit_reward(images, cond=None):
    """A reward of 1 for every image (loaded by ``module:function`` from this file)."""
    return torch.ones(images.shape[0]) + 0 * images.flatten(1).sum(1)


def test_refl_uses_the_configured_margin():
    """reward.py RewardFeedback: ``weight * mean relu(margin - r)`` with ``reward_margin`` when given (ReFL's 2 only
    when not): r = 1, margin 1.5, weight 0.1 gives 0.05 (the default margin would give 0.1)."""
    torch.manual_seed(0)
    from test_tdm import mlp_generator

    student = mlp_generator(2).denoiser
    feedback = RewardFeedback("test_objective_rules:unit_reward", 0.1, margin=1.5)
    loss, logs = feedback.loss(student, torch.zeros(3, 1, 2, 2), None, 2, None)
    assert abs(float(loss.detach()) - 0.05) <= 4 * EPS32 and float(logs["reward"]) == 1.0
    default = RewardFeedback("test_objective_rules:unit_reward", 0.1)
    assert abs(float(default.loss(student, torch.zeros(3, 1, 2, 2), None, 2, None)[0].detach()) - 0.1) <= 4 * EPS32


def test_clip_preprocessing_clamps_images_to_the_unit_range():
    """reward.py ClipReward.preprocess (ReFL.py's ``image / 2 + 0.5`` clamped to [0, 1], then the model's mean and
    std; grey repeated to 3 channels), on images beyond [-1, 1] at the model's size (no resize, no crop)."""
    stub = SimpleNamespace(size=4, mean=torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1),
                           std=torch.tensor([0.5, 0.25, 2.0]).view(1, 3, 1, 1))
    images = torch.linspace(-3, 3, 16).reshape(1, 1, 4, 4)
    got = ClipReward.preprocess(stub, images)
    want = ((images / 2 + 0.5).clamp(0, 1).expand(-1, 3, -1, -1) - stub.mean) / stub.std
    assert torch.equal(got, want)


# --- TeacherGuidance (cd, hyper-sd, scm): scales in the range, the student told w - 1 -------------------------------
def guidance_stubs(dim=8):
    teacher = SimpleNamespace(null_class=3, _accepted=())
    student = SimpleNamespace(model=SimpleNamespace(config=SimpleNamespace(time_cond_proj_dim=dim)))
    return teacher, student


def test_teacher_guidance_draws_scales_in_range_and_embeds_w_minus_one():
    """guidance.py TeacherGuidance.draw: w ~ U[lo, hi] per example (LCM's range), the student's condition the
    embedding of w - 1 (diffusers' LCM convention, as the exported pipeline embeds guidance_scale - 1); the same
    function on the same w: bit-equal. 400 draws reach within 5% of each end with probability > 0.999."""
    from fastdiff.pipelines.pipeline_fastdiff_class_conditional import guidance_embedding
    from fastdiff.objectives.guidance import TeacherGuidance

    guidance = TeacherGuidance(*guidance_stubs(), guidance_range=[2.0, 6.0])
    labels = torch.arange(400) % 3
    torch.manual_seed(0)
    w, cond = guidance.draw(400, {"class_labels": labels}, "cpu")
    assert w.min() >= 2.0 and w.max() <= 6.0 and w.min() < 2.2 and w.max() > 5.8
    assert torch.equal(cond["class_labels"], labels)
    assert torch.equal(cond["timestep_cond"], guidance_embedding(w - 1.0, 8))


def test_teacher_guidance_refuses_scales_below_one():
    """guidance.py: a range must satisfy 1 <= lo <= hi (a CFG scale below 1 extrapolates away from the condition; the
    guidance embedding of w - 1 is trained on w >= 1)."""
    from fastdiff.objectives.guidance import TeacherGuidance

    with pytest.raises(ValueError, match="1 <= lo <= hi"):
        TeacherGuidance(*guidance_stubs(), guidance_range=[0.5, 2.0])
    with pytest.raises(ValueError, match="1 <= lo <= hi"):
        TeacherGuidance(*guidance_stubs(), guidance_range=[3.0, 2.0])
    assert TeacherGuidance(*guidance_stubs(), guidance_range=[1.0, 1.0]).range == (1.0, 1.0)
