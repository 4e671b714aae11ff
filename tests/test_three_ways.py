"""Formula and gradient checks the three-ways audit found missing, each against a computation written here.

The project standard: "formula vs reference, gradient vs an independent computation on a tiny case, result on the
analytic teacher". These tests close cell 2 (the gradient) for cd (and its iCT recipe), hyper-sd's TSCD, meanflow,
reflow, agd, fada and scale_distill, cells 1 and 2 for sid on a guided teacher (SiD-LSG) and for cd with a guidance
range (LCM's guidance embedding), and cell 1 for sim (its reduction to SiD's reference formula).

Gaussian tests (cd, hyper-sd, meanflow, reflow): the analytic teacher with one mode, N(m*, 0.5^2 I) in 1 x 2 x 2, and
a student of the same family, N(m, e^{2 l} I), whose x0 estimate is Tweedie's formula
``y(x, sigma) = x - sigma^2 (x - m) / (e^{2 l} + sigma^2)`` (VE scale). Each objective's parameter gradient
(fastdiff's autograd through its surrogate loss, float32) is compared with float64 autograd of the loss transcribed
here from the reference formula, with the reference's stop-gradients; every network output there comes from
``tweedie64`` below, never from fastdiff's Denoiser or the objective's helpers. The other tests use the tiny UNets
of conftest.py / test_agd.py / test_fada.py / test_upscale.py and raw network calls in float64. A stop-gradient left
off, a wrong weight, target time, scale or distance changes these gradients by O(1) relative; float32 rounding by far
less (each test states its bound and what it measured).
"""
import copy
import math

import pytest
import torch

from fastdiff.models.analytic import GaussianMixtureModel
from fastdiff.models.denoiser import Denoiser
from fastdiff.models.schedule import VPSchedule
from fastdiff.objectives import build
from fastdiff.objectives.cd import ConsistencyDistillation
from fastdiff.objectives.hypersd import HyperSD
from test_fada import two_cond_teacher  # noqa: F401 - the fixture (class + text v-prediction teacher)

EPS32 = torch.finfo(torch.float32).eps
TEACHER_STD, STUDENT_STD = 0.5, 0.7


def gaussian(std: float, seed: int) -> GaussianMixtureModel:
    return GaussianMixtureModel(sample_size=2, weights=(1.0,), stds=(std,), mean_scale=1.0, seed=seed)


def r4(v: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, 1, 1, 1)


def tweedie64(mean: torch.Tensor, log_std: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """E[x0 | x] for x0 ~ N(mean, e^{2 log_std} I), x = x0 + sigma eps (VE), in float64; differentiable in
    (mean, log_std). Written from the Gaussian's posterior, independent of fastdiff's analytic model."""
    s2 = r4(sigma.double()) ** 2
    var = (2 * log_std.double()).exp().reshape(())
    return x.double() - s2 * (x.double() - mean.double().reshape(1, 1, 2, 2)) / (var + s2)


def leaf64(model: GaussianMixtureModel) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's (m, l) as float64 leaves with gradient (the float64 twin of its parameters)."""
    return (model.means.detach().double().clone().requires_grad_(True),
            model.log_stds.detach().double().clone().requires_grad_(True))


def vp_table(model: GaussianMixtureModel) -> torch.Tensor:
    """sigma_t = sqrt((1 - acp_t) / acp_t) of the model's DDPM table, float64, from diffusers' alphas_cumprod."""
    acp = model.scheduler().alphas_cumprod.double()
    return ((1 - acp) / acp).sqrt()


def analytic_pair(seed_teacher: int = 1, seed_student: int = 2):
    """(teacher model, student model, teacher Denoiser, student Denoiser) on the teacher's VP table."""
    teacher_model, student_model = gaussian(TEACHER_STD, seed_teacher), gaussian(STUDENT_STD, seed_student)
    teacher_model.requires_grad_(False)
    student_model.weight_logits.requires_grad_(False)  # one mode: its weight has no gradient to compare
    schedule = VPSchedule(teacher_model.scheduler().alphas_cumprod)
    return (teacher_model, student_model, Denoiser(teacher_model, schedule, "sample"),
            Denoiser(student_model, schedule, "sample"))


def assert_grads_close(ours, ref, bound):
    """Each parameter's float32 gradient within ``bound`` (per parameter tensor, absolute) of the float64 one; the
    bound must be well below the gradient itself, so the comparison can see an O(1) relative change."""
    for name, a, b, tol in zip(("means", "log_stds"), ours, ref, bound):
        err = float((a.double() - b).abs().max())
        assert err <= tol, (name, err, tol)
        assert tol < 0.01 * float(b.abs().max()), (name, tol, float(b.abs().max()))


def rounding_bound(x_n, sigma, m, log_std, delta, distance, weight=None, ops=16):
    """Bound on |float32 gradient - float64 gradient| per parameter tensor (means, log_stds) of a loss
    ``mean_i w_i d(delta_i)`` whose delta_i = pred_i - sg(target_i) is computed in float32 on VE values up to |x_n|.

    Each delta element is off by at most E_i = ``ops`` eps32 (max|x_n,i| + 1) (float32 rounding of the inputs and of
    ``ops`` operations on values of that size: the teacher's step from sigma ~157 cancels terms of size |x_n|). A
    delta error moves d's gradient in pred by A_i E_i per element (l2: A = 2 / D; pseudo-Huber, whose gradient is
    delta / |delta|: A = sqrt(D) / |delta_i|), and that reaches a parameter through |d pred / d theta|: <= 1 for a
    mean, and for log_std at most J_i = max_e 2 v s^2 |x_n - m| / (v + s^2)^2 summed over the D elements."""
    d = delta.shape[1]
    e = ops * EPS32 * (x_n.detach().abs().flatten(1).amax(1) + 1)
    a = torch.full_like(e, 2 / d) if distance == "l2" else math.sqrt(d) / delta.detach().norm(dim=1)
    w = torch.ones_like(e) if weight is None else weight.detach()
    v, s2 = float((2 * log_std.detach()).exp()), sigma.double() ** 2
    j_l = (2 * v * s2 * (x_n.detach() - m.detach().reshape(1, 1, 2, 2)).abs().flatten(1).amax(1) / (v + s2) ** 2)
    return float((w * a * e).mean()), float((w * a * e * d * j_l).mean())


# --- cd (and its iCT recipe): the parameter gradient -------------------------------------------------------------

CD_CASES = {
    # cd's defaults but a short grid: l2 (LCM's), an EMA target network distinct from the student
    "l2-ema-target": dict(num_intervals=8, target_ema=0.5),
    # iCT's online target: the student itself under stop-gradient (Song & Dhariwal 2023)
    "l2-online-target": dict(num_intervals=8, target_ema=0.0),
    # recipe ict: Karras grid of 10 intervals (its curriculum's start), pseudo-Huber, weight 1 / (s_i - s_{i-1})
    "ict": dict(recipe="ict"),
}


@pytest.mark.parametrize("case", list(CD_CASES))
def test_cd_parameter_gradient_equals_float64_transcription(case):
    """cd's parameter gradient against float64 autograd of CM's loss (Song et al. 2023, Eq. 7 / Alg. 2; LCM's DDIM
    solver; iCT's weighting and pseudo-Huber distance), transcribed: the teacher's Euler (DDIM) step
    ``x_prev = x_n + (s_prev - s)(x_n - D_teacher(x_n, s)) / s`` and the target network's output at it under
    stop-gradient; the gradient flows through the student's ``f(x_n, s)`` only. Levels are recomputed from the DDPM
    table (and Karras' rho = 7 formula for ict), the noise replayed from the same seed, the grid index fixed."""
    teacher_model, student_model, teacher, student = analytic_pair()
    cd = ConsistencyDistillation(teacher, None, student, **CD_CASES[case])
    if cd.target is not None:
        with torch.no_grad():  # a target network unlike the student (as after EMA updates)
            cd.target.model.means.add_(0.3)
    batch = 64
    x = teacher_model.sample_true(batch, torch.Generator().manual_seed(3))
    n = cd.intervals()
    sig = vp_table(teacher_model)
    table = sig[torch.round(torch.arange(n + 1, dtype=torch.float64) * 999 / n).long()]
    if case == "ict":
        lo, hi = table[0], table[-1]
        frac = torch.arange(n + 1, dtype=torch.float64) / n
        levels = (lo ** (1 / 7) + frac * (hi ** (1 / 7) - lo ** (1 / 7))) ** 7
    else:
        levels = table
    i = torch.randint(1, n + 1, (batch,), generator=torch.Generator().manual_seed(5))
    cd.draw_index = lambda _levels, _n: i  # the index draw is tests/test_ict.py's; the same i on both sides
    torch.manual_seed(7)
    loss, _ = cd.generator_loss(x)
    ours = torch.autograd.grad(loss, [student_model.means, student_model.log_stds])

    torch.manual_seed(7)
    eps = torch.randn_like(x).double()
    s, s_prev = levels[i], levels[i - 1]
    x_n = x.double() + r4(s) * eps
    t_mean, t_log = teacher_model.means.detach(), teacher_model.log_stds.detach()
    with torch.no_grad():
        x_prev = x_n + r4(s_prev - s) * (x_n - tweedie64(t_mean, t_log, x_n, s)) / r4(s)
        target_net = cd.target.model if cd.target is not None else student_model
        target = tweedie64(target_net.means.detach(), target_net.log_stds.detach(), x_prev, s_prev)
    m, l = leaf64(student_model)
    delta = (tweedie64(m, l, x_n, s) - target).flatten(1)
    if case == "ict":
        c = 0.00054 * math.sqrt(4)
        per_sample = ((delta.pow(2).sum(1) + c * c).sqrt() - c) / (s - s_prev)
    else:
        per_sample = delta.pow(2).mean(1)
    ref = torch.autograd.grad(per_sample.mean(), [m, l])
    # float32 rounding (rounding_bound), 16 operations a delta element goes through on values of size |x_n|: the
    # native input and its VE read-out (3), the teacher's x0 and Euler step (6), the target's and the student's
    # Tweedie read-outs (3 each), the difference (1). Measured 1e-7 of the gradient; the bound is 4e-4 of it (l2) and
    # 8e-3 (ict, whose 1 / (s_i - s_{i-1}) weights and unit-norm pseudo-Huber gradient inflate it at the low levels)
    bound = rounding_bound(x_n, s, m, l, delta, "pseudo_huber" if case == "ict" else "l2",
                           1 / (s - s_prev) if case == "ict" else None, ops=16)
    assert_grads_close(ours, ref, bound)


# --- hyper-sd: TSCD's parameter gradient -------------------------------------------------------------------------

@pytest.mark.parametrize("distance", ["l2", "pseudo_huber"])
def test_hyper_sd_tscd_parameter_gradient_equals_float64_transcription(distance):
    """Hyper-SD's TSCD (Ren et al. 2024, Sec. 3.1): in segment [edge, upper) the student's DDIM map of x_t to the
    segment's lower edge must equal the target network's map of the teacher's DDIM step x_t -> x_t' (t' = max(t -
    skip, edge)), the target under stop-gradient. Transcribed in float64: ``to_edge(x, s, y) = a(s_e) (y + s_e / s
    (x - y))`` (DDIM's deterministic map, native scale at the edge), the target being ``a(s_e) x_t'`` when the ODE
    step reached the edge; gradient through the student's own map only. Two segments of four intervals, skip 2, an
    EMA target distinct from the student."""
    teacher_model, student_model, teacher, student = analytic_pair()
    obj = HyperSD(teacher, None, student, segments=[2, 1], stage_steps=[1], num_intervals=8, target_ema=0.5,
                  distance=distance, skip=2)
    with torch.no_grad():
        obj.target.model.means.add_(0.3)
    batch = 128
    x = teacher_model.sample_true(batch, torch.Generator().manual_seed(3))
    # LCM's DDIM-solver grid (hypersd.py): t_0 = 0, t_i = round(i (999 + 1) / N) - 1
    grid_t = torch.cat([torch.zeros(1), torch.round(torch.arange(1, 9, dtype=torch.float64) * 1000 / 8) - 1]).long()
    levels = vp_table(teacher_model)[grid_t]
    i = torch.randint(1, 9, (batch,), generator=torch.Generator().manual_seed(5))
    obj.draw_index = lambda _levels, _n: i
    torch.manual_seed(7)
    loss, _ = obj.generator_loss(x)
    ours = torch.autograd.grad(loss, [student_model.means, student_model.log_stds])

    torch.manual_seed(7)
    eps = torch.randn_like(x).double()
    edge = (i - 1) // 4 * 4  # two segments of 4 intervals: lower edges 0 and 4
    prev = torch.maximum(i - 2, edge)
    assert set(edge.tolist()) == {0, 4} and (prev == edge).any() and (prev > edge).any()
    s, s_prev = levels[i], levels[prev]
    s_e = torch.where(edge > 0, levels[edge], torch.zeros_like(s))
    a_e = r4(1 / (1 + s_e ** 2).sqrt())
    x_n = x.double() + r4(s) * eps
    with torch.no_grad():
        x_prev = x_n + r4(s_prev - s) * (x_n - tweedie64(teacher_model.means, teacher_model.log_stds, x_n, s)) / r4(s)
        y_prev = tweedie64(obj.target.model.means.detach(), obj.target.model.log_stds.detach(), x_prev, s_prev)
        mapped = a_e * (y_prev + r4(s_e / s_prev) * (x_prev - y_prev))
        target = torch.where(r4((prev == edge) & (edge > 0)), a_e * x_prev, mapped)
    m, l = leaf64(student_model)
    y = tweedie64(m, l, x_n, s)
    delta = (a_e * (y + r4(s_e / s) * (x_n - y)) - target).flatten(1)
    if distance == "l2":
        per_sample = delta.pow(2).mean(1)
    else:
        c = 0.00054 * math.sqrt(4)
        per_sample = (delta.pow(2).sum(1) + c * c).sqrt() - c
    ref = torch.autograd.grad(per_sample.mean(), [m, l])
    # float32 rounding (rounding_bound): cd's 16 operations plus the two maps to the edge (4 each). Measured 3e-7 of
    # the gradient; the bound is 4e-4 (l2) and 3e-3 (pseudo-Huber) of it. (With the grid off by one timestep, t_i =
    # round(i 999 / N) instead of LCM's, the levels move by 0.5% and the gradients by 1e-3: this sees that.)
    assert_grads_close(ours, ref, rounding_bound(x_n, s, m, l, delta, distance, ops=24))


# --- meanflow: the parameter gradient at r = 0 --------------------------------------------------------------------

def flow_velocity64(mean, log_std, z, t):
    """A Gaussian's velocity in flow units, u(z, t) = (z - E[x0 | x]) / t with x = z / (1 - t) at sigma = t / (1 - t)
    (MeanFlow's v for the teacher; the one-time student's average velocity to the data, r = 0), float64."""
    return (z - tweedie64(mean, log_std, z / r4(1 - t), t / (1 - t))) / r4(t)


class GaussianStudent(torch.nn.Module):
    """One Gaussian's exact x0 estimate as a VP "sample"-prediction network, differentiable in forward mode too (the
    analytic mixture's cdist has no forward-mode derivative, which MeanFlow's JVP needs): native input a x, sigma read
    back from the timestep on the table, x0 = m + v / (v + sigma^2) (x - m)."""

    def __init__(self, like: GaussianMixtureModel):
        super().__init__()
        self.means = torch.nn.Parameter(like.means.detach().clone())
        self.log_stds = torch.nn.Parameter(like.log_stds.detach().clone())
        self._schedule = like._schedule

    def forward(self, sample, timestep, class_labels=None, return_dict=True):
        t = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1).expand(sample.shape[0])
        sigma = r4(self._schedule.sigma_at(t))
        x = sample * torch.sqrt(1 + sigma ** 2)
        m, v = self.means.reshape(1, *sample.shape[1:]), (2 * self.log_stds).exp()
        return (m + v / (v + sigma ** 2) * (x - m),)


def test_meanflow_parameter_gradient_equals_float64_transcription():
    """MeanFlow (Geng et al. 2025, Eq. 8-10; FastGen ``mean_flow.py`` with ``use_cd``) at r = 0 (``consistency_ratio``
    1: a one-time student, the map to the data): the target ``v - (t - r) d/dt u`` with the teacher's velocity v and
    the total derivative of the student's own u along (v, 1), under stop-gradient, and the adaptive weight
    ``sg(1 / (||delta||^2 + c)^p)`` at p = 0.5, c = 0.01 (fastdiff's defaults). Transcribed in float64: v and u from the
    Gaussians' closed forms (``flow_velocity64``), d/dt u by float64 forward-mode autograd of that closed form; the
    gradient flows through u only. Levels t from 0.05 to 0.9, fixed."""
    from fastdiff.objectives.meanflow import MeanFlow

    teacher_model, gaussian_student, teacher, _ = analytic_pair()
    student_model = GaussianStudent(gaussian_student)
    student = Denoiser(student_model, teacher.schedule, "sample")
    obj = MeanFlow(teacher, None, student, consistency_ratio=1.0, flow_matching_ratio=0.0, tangent="jvp",
                   tangent_warmup=0)
    batch = 32
    gen = torch.Generator().manual_seed(3)
    t = torch.linspace(0.05, 0.9, batch, dtype=torch.float64)
    sigma_t = t / (1 - t)
    x0 = teacher_model.sample_true(batch, gen)
    x_t = x0 + r4(sigma_t.float()) * torch.randn(x0.shape, generator=gen)
    per_sample, _ = obj.loss_at(x_t, sigma_t, torch.zeros_like(sigma_t))
    ours = torch.autograd.grad(per_sample.mean(), [student_model.means, student_model.log_stds])

    tf = (sigma_t.float() / (1 + sigma_t.float())).double()  # t as fastdiff rounds it (float32), then float64
    z = x_t.double() / r4(1 + sigma_t)
    m, l = leaf64(student_model)
    with torch.no_grad():
        v = flow_velocity64(teacher_model.means, teacher_model.log_stds, z, tf)
        _, du_dt = torch.func.jvp(lambda zz, tt: flow_velocity64(m.detach(), l.detach(), zz, tt), (z, tf),
                                  (v, torch.ones_like(tf)))
        target = v - r4(tf) * du_dt  # r = 0
    delta = (flow_velocity64(m, l, z, tf) - target).flatten(1)
    total = delta.pow(2).sum(1)
    ref = torch.autograd.grad(((total.detach() + 0.01) ** -0.5 * total).mean(), [m, l])
    # float32: z = x_t / (1 + sigma) and its VE point z / (1 - t) round at |x_t| (sigma <= 9 here), u and v are
    # differences of O(|z|) terms divided by t >= 0.05, and the JVP runs ~20 float32 operations: delta elements are
    # good to ~20 eps32 |x_t| / t (5e-4 here at most); the weighted gradient 2 delta / sqrt(|delta|^2 + c) moves by at
    # most 2 / sqrt(c) = 20 times that, through |du/dm| <= 1 / t (and |du/dl| <= |x_n - m| / t, a few times more).
    err = 20 * EPS32 * x_t.double().abs().flatten(1).amax(1) / t
    scale = 20 * err / t * (1 + (x_t.double() - m.detach().reshape(1, 1, 2, 2)).abs().flatten(1).amax(1))
    bound = float(scale.mean())
    assert_grads_close(ours, ref, (bound, 4 * bound))


# --- reflow: the parameter gradient --------------------------------------------------------------------------------

def test_reflow_parameter_gradient_equals_float64_transcription():
    """Rectified-flow regression (sangyun884/rfpp ``train.py``: ``zt = (1 - t) x + t z; target = z - x``; velocity
    ``(zt - D(zt / (1 - t), t / (1 - t))) / t``, ``EDMPrecondVel``) with the paper's pseudo-Huber distance
    ``sqrt(|d|^2 + c^2) - c``, c = 0.00054 sqrt(D), on a VP teacher: the line's noise end is the one through the
    student's first level s (x1 = (z sqrt(1 + s^2) - x0) / s, ``reflow.py``). The parameter gradient in float64 by
    autograd of that transcription through the Gaussian student's Tweedie x0, at fixed t."""
    teacher_model, student_model, teacher, student = analytic_pair()
    obj = build("reflow", teacher, None, student=student)
    batch = 32
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(batch, 1, 2, 2, generator=gen)
    x0 = teacher_model.sample_true(batch, gen)
    t = torch.linspace(0.05, 0.95, batch, dtype=torch.float64)
    obj.draw_t = lambda n, device: t
    loss, _ = obj.generator_loss(torch.stack([z, x0], 1))
    ours = torch.autograd.grad(loss, [student_model.means, student_model.log_stds])

    s = float(vp_table(teacher_model)[-1])  # the student's first level: the top of the table
    x1 = (z.double() * math.sqrt(1 + s * s) - x0.double()) / s
    x_t = r4(t) * x1 + r4(1 - t) * x0.double()
    m, l = leaf64(student_model)
    v_pred = (x_t - tweedie64(m, l, x_t / r4(1 - t), t / (1 - t))) / r4(t)
    delta = (v_pred - (x1 - x0.double())).flatten(1)
    c = 0.00054 * math.sqrt(4)
    ref = torch.autograd.grad(((delta.pow(2).sum(1) + c * c).sqrt() - c).mean(), [m, l])
    # float32: x_t and its VE point x_t / (1 - t) round at |x_t| / (1 - t) (<= 20 |x_t|), the native scaling and the
    # student's read-out add a few operations on it, and v divides by t >= 0.05: delta elements are good to ~10 eps32
    # |x_t| / (t (1 - t)); the pseudo-Huber gradient, a unit vector, turns by that over |delta|, through
    # |dv/dm| <= 1 / t (|dv/dl| <= |x_t / (1 - t) - m| / t).
    err = 10 * EPS32 * x_t.abs().flatten(1).amax(1) / (t * (1 - t))
    turn = err * 2 / delta.detach().norm(dim=1) / t
    far = 1 + (x_t / r4(1 - t) - m.detach().reshape(1, 1, 2, 2)).abs().flatten(1).amax(1)
    assert_grads_close(ours, ref, (float(turn.mean()), float((turn * far).mean())))


# --- sid on a guided teacher (SiD-LSG): the generator loss and its gradient -------------------------------------

def test_sid_lsg_guided_generator_loss_and_gradient_match_the_reference(tiny_cond_teacher):
    """SiD-LSG's generator loss at the defaults a guided teacher gets (kappa_2 = kappa_4 = teacher.guidance_scale 2,
    alpha 1, t = randint(20, 980)), against mingyuanzhou/SiD-LSG training/sid_loss.py ``generator_loss`` and
    sid_training_loop.py written out in float64 from raw UNet calls on the class-conditional v-prediction teacher:
    ``add_noise`` at integer t, x0 = sqrt(acp) x_t - sqrt(1 - acp) v (the v-scheduler's ``pred_original_sample``), CFG
    ``x0_u + kappa (x0_c - x0_u)`` for the real score (kappa_4) and the fake score (kappa_2) alike, the null class as
    the unconditional input, ``(y_r - y_f)((y_r - y) - alpha (y_r - y_f)) / weight_factor`` summed x 100 / N. The loss
    and its gradient on the generator's output agree with the reference's autograd (fastdiff's units: the reference /
    (100 D)). tests/test_parity_dm.py covers the unguided loss; tests/test_sid_guided.py only the defaults and the
    zero at fake = teacher."""
    from fastdiff.config import load_config
    from fastdiff.models.teacher import load_teacher
    from fastdiff.training.setup import build_objective, student_like

    teacher = load_teacher(tiny_cond_teacher, 2.0)
    cfg = load_config(None, [f"teacher.path={tiny_cond_teacher}", "teacher.guidance_scale=2.0", "objective.name=sid"])
    fake = student_like(teacher, copy.deepcopy(teacher.model))
    torch.manual_seed(0)
    with torch.no_grad():  # a fake score that is not the teacher
        for p in fake.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    obj = build_objective(cfg, teacher, fake, None)
    assert (obj.alpha, obj.fake_guidance, teacher.denoiser.guidance_scale) == (1.0, 2.0, 2.0)
    batch, null = 6, teacher.denoiser.null_class
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    x = (0.5 * torch.randn(batch, 1, 8, 8, generator=torch.Generator().manual_seed(13))).requires_grad_()
    torch.manual_seed(14)
    loss, _ = obj.generator_loss(x, {"class_labels": labels})
    loss.backward()

    torch.manual_seed(14)
    t = torch.randint(20, 980, (batch,))
    noise = torch.randn(batch, 1, 8, 8).double()
    acp = teacher.scheduler.alphas_cumprod.double()[t].reshape(-1, 1, 1, 1)
    y = x.detach().double().requires_grad_()
    x_t = acp.sqrt() * y + (1 - acp).sqrt() * noise

    def guided_x0(net, kappa):
        x0 = [acp.sqrt() * x_t - (1 - acp).sqrt() * net(x_t, t, class_labels=c).sample
              for c in (torch.full_like(labels, null), labels)]
        return x0[0] + kappa * (x0[1] - x0[0])

    y_real = guided_x0(copy.deepcopy(teacher.model).double(), 2.0)
    y_fake = guided_x0(copy.deepcopy(fake.model).double(), 2.0)
    with torch.no_grad():
        weight_factor = (y - y_real).abs().mean(dim=[1, 2, 3], keepdim=True).clip(min=1e-5)
    per_elem = (y_real - y_fake) * ((y_real - y) - 1.0 * (y_real - y_fake)) / weight_factor
    ref = per_elem.sum() * 100 / batch
    ref.backward()
    unit = 100 * x[0].numel()
    # float32 against float64: the native input (2 roundings), two UNet passes of ~20 layers per score forward and
    # backward, CFG (3 ops), the loss (5 ops): 64 roundings of the largest term, as test_parity_dm.py's SiD test
    # (measured there ~1 on the loss, ~8 on the gradient)
    terms = float(per_elem.detach().abs().sum() * 100 / batch)
    assert abs(float(loss.detach()) * unit - float(ref.detach())) <= 64 * EPS32 * terms
    assert float(ref.detach().abs()) > 100 * 64 * EPS32 * terms  # the loss is not rounding noise
    g_ours, g_ref = x.grad.double() * unit, y.grad
    assert float((g_ours - g_ref).abs().max()) <= 64 * EPS32 * float(g_ref.abs().max())


# --- agd / fada / scale_distill: single-pass regressions onto a frozen target ------------------------------------

def vjp_close(loss, outputs, residual, params, slack=10):
    """The parameter gradient of ``loss`` (fastdiff's, float32) against the hand-derived one: for a mean over B
    samples of D-element mean squared differences ``mean((out - sg(target))^2)``, d/dtheta is the vector-Jacobian
    product of the student's output ``outputs`` with ``2 (out - target) / (B D)`` (``residual`` is out - target, from
    the raw networks in float64). Returns (relative error, the bound used): the residual computed from float32
    passes is off by at most ``rel`` of itself (the caller's rounding estimate), and a linear VJP of an error that
    size moves the gradient by about ``rel`` of it; ``slack`` (10) allows for cancellation between samples."""
    ours = torch.autograd.grad(loss, params, retain_graph=True)
    b, d = residual.shape[0], residual[0].numel()
    hand = torch.autograd.grad(outputs, params, grad_outputs=(2 * residual / (b * d)).to(outputs.dtype))
    num = sum(float((a.double() - h.double()).pow(2).sum()) for a, h in zip(ours, hand)) ** 0.5
    den = sum(float(h.double().pow(2).sum()) for h in hand) ** 0.5
    assert den > 0
    return num / den


def test_agd_parameter_gradient_is_the_single_pass_regression_onto_cfg(tiny_cond_teacher):
    """AGD (cristianpjensen/agd ``train.py``, ``--loss l2``; Jensen et al. 2025 Eq. 3): the adapters' gradient is
    that of ``mean (v_student(w) - sg(v_u + w (v_c - v_u)))^2`` in the teacher's prediction space (v here) through the
    one student pass alone, the CFG target from two raw teacher passes in float64. fastdiff computes the loss in x0
    space times the teacher's loss weight (1 / s^2 for v): equal in exact arithmetic, so the gradient must be the VJP
    of the student's v with 2 (v_s - v_cfg) / (B D)."""
    from fastdiff.pipelines.pipeline_fastdiff_class_conditional import guidance_embedding
    from test_agd import build as agd_build

    teacher, obj = agd_build(tiny_cond_teacher)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in obj.student.model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    params = [p for p in obj.student.model.parameters() if p.requires_grad]
    d = teacher.denoiser
    t = torch.tensor([900, 500, 120])
    sigma = d.schedule.sigma_at(t)
    z, labels = torch.randn(3, 1, 8, 8), torch.tensor([0, 2, 1])
    w = torch.tensor([1.5, 2.5, 4.0])
    loss = obj.loss_at(z, sigma, {"class_labels": labels}, w).mean()
    with torch.no_grad():
        v_c = teacher.model(z, t, class_labels=labels).sample.double()
        v_u = teacher.model(z, t, class_labels=torch.full_like(labels, 3)).sample.double()
        v_cfg = v_u + w.double().view(-1, 1, 1, 1) * (v_c - v_u)
    v_s = obj.student.model(z, t, class_labels=labels, timestep_cond=guidance_embedding(w - 1, 256)).sample
    residual = v_s.detach().double() - v_cfg
    # the residual in fastdiff's units: v -> x0 = a z - s v, CFG in x0, difference, / s: ~10 float32 roundings of
    # w_max x the largest magnitude (test_agd.py's bound), over s_t; relative to the smallest sample's RMS residual
    s_t = d.schedule.noise_scale(sigma).double()
    big = float(w.max()) * max(float(v.abs().max()) for v in (z, v_c, v_u, v_s.detach()))
    rel = float((10 * EPS32 * big / s_t).max() / residual.flatten(1).pow(2).mean(1).sqrt().min())
    err = vjp_close(loss, v_s, residual, params)
    assert err <= 10 * rel and 10 * rel < 1e-2, (err, rel)


@pytest.mark.parametrize("order", ["class_first", "text_first"])
def test_fada_parameter_gradient_is_the_single_pass_regression_onto_nested_cfg(order, two_cond_teacher):  # noqa: F811
    """FADA's distillation term (the nested two-condition CFG of instruct-pix2pix ``CFGDenoiser.forward`` as the target
    of one student pass told both scales): the adapters' gradient is the VJP of the student's v with
    2 (v_s - sg(v_nested)) / (B D), the target from raw teacher passes in float64 (test_fada.py's transcription)."""
    from test_fada import build as fada_build, nested_cfg_v, perturb, student_v, three_draws

    teacher, obj = fada_build(two_cond_teacher, order)
    torch.manual_seed(0)
    perturb(obj)
    params = [p for p in obj.student.model.parameters() if p.requires_grad]
    t, sigma, z, cond, labels, text, s_class, s_text = three_draws(teacher)
    loss = obj.loss_at(z, sigma, cond, s_class, s_text).mean()
    v_cfg = nested_cfg_v(teacher.model, z, t, labels, text, s_class, s_text, order)
    v_s = student_v(obj, z, t, labels, text, s_class, s_text)  # float64 view of the float32 pass, with graph
    residual = v_s.detach() - v_cfg
    # test_fada.py's rounding estimate per element (10 roundings, combination coefficients <= 2 s_max + 1)
    s_t = teacher.denoiser.schedule.noise_scale(sigma).double()
    e = 10 * EPS32 * (2 * 4.0 + 1) * max(float(m.abs().max()) for m in (z, v_cfg, v_s.detach())) / s_t
    rel = float(e.max() / residual.flatten(1).pow(2).mean(1).sqrt().min())
    err = vjp_close(loss, v_s, residual, params)
    assert err <= 10 * rel and 10 * rel < 1e-2, (err, rel)


def test_scale_distill_parameter_gradient_is_the_vjp_onto_the_teachers_output():
    """YONOS-SR's scale distillation (Eq. 1): the student's gradient is the VJP of its own output with
    2 (out_s - sg(out_t)) / (B D) at the same z_t, the teacher's output a constant (float64 throughout, so the two
    agree to float64 rounding: ~1e4 operations per value at eps64 2.2e-16; bound 1e-10 relative)."""
    from fastdiff.objectives.scale_distill import scale_distill_loss
    from test_upscale import float64_case

    teacher, student, z0, noise, t, low_t, low_s, levels, text, acp = float64_case()
    loss, _ = scale_distill_loss(student, teacher, acp, z0, noise, t, low_t, low_s, levels, text)
    a = acp[t].reshape(-1, 1, 1, 1)
    z_t = a.sqrt() * z0 + (1 - a).sqrt() * noise
    with torch.no_grad():
        out_t = teacher(torch.cat([z_t, low_t], 1), t, encoder_hidden_states=text, class_labels=levels).sample
    out_s = student(torch.cat([z_t, low_s], 1), t, encoder_hidden_states=text, class_labels=levels).sample
    err = vjp_close(loss, out_s, out_s.detach() - out_t, list(student.parameters()))
    assert err <= 1e-10, err


# --- cd with a guidance range (LCM's guidance embedding): formula and gradient -----------------------------------

def lcm_guidance_scale_embedding(w: torch.Tensor, embedding_dim: int) -> torch.Tensor:
    """diffusers examples/consistency_distillation/train_lcm_distill_sd_wds.py ``guidance_scale_embedding``
    (transcribed, float64): w x 1000, sin / cos of w times 10000^(-k / (half - 1))."""
    w = w.double() * 1000.0
    half_dim = embedding_dim // 2
    emb = math.log(10000.0) / (half_dim - 1)
    emb = torch.exp(torch.arange(half_dim, dtype=torch.float64) * -emb)
    emb = w[:, None] * emb[None, :]
    return torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)


def test_cd_guidance_range_loss_and_gradient_match_lcm(tiny_cond_teacher):
    """cd with ``guidance_range`` [2, 4] against LCM's guided loss (Luo et al. 2023, Alg. 1; diffusers
    train_lcm_distill_sd_wds.py, transcribed in float64 from raw UNet calls on the class-conditional v-prediction
    teacher): w ~ U[w_min, w_max] per sample in LCM's form ``cond + w (cond - uncond)`` (fastdiff's CFG scale minus 1),
    the student and the target network told ``guidance_scale_embedding(w)``, the teacher's DDIMSolver step from the
    guided x0 and eps (``pred_x0 = a x - s v``, ``pred_eps = a v + s x`` for v-prediction), LCM's boundary scalings
    (timestep_scaling 10), ``F.mse_loss``. Both the loss and the student's parameter gradient (float64 autograd of the
    transcription through a float64 copy of the student; the target under no_grad) must agree. The grid stops at
    t = 899 (sigma 6.4: this cosine table's sigma at 999 is 2e4, where the x0 read-out amplifies float32 rounding
    1 / a_t = 2e4 times)."""
    from fastdiff.models.consistency import ConsistencyDenoiser
    from fastdiff.models.guidance import with_guidance_embedding
    from fastdiff.pipelines.pipeline_fastdiff_class_conditional import guidance_embedding
    from fastdiff.models.teacher import load_teacher

    teacher = load_teacher(tiny_cond_teacher)
    d = teacher.denoiser
    null = d.null_class
    torch.manual_seed(0)
    net = with_guidance_embedding(copy.deepcopy(teacher.model).requires_grad_(True))
    with torch.no_grad():  # a student unlike the teacher, whose scale embedding matters
        for p in net.parameters():
            p.add_(0.02 * torch.randn_like(p))
        net.cond_proj.weight.normal_(0, 0.05)
    student = ConsistencyDenoiser(net, d.schedule, d.prediction_type, null_class=null, timestep_scaling=10.0)
    sigma_top = float(d.schedule.sigma_at(torch.tensor([899.0]))[0])
    cd = ConsistencyDistillation(d, None, student, guidance_range=[2.0, 4.0], sigma_max=sigma_top)
    assert (cd.num_intervals, cd.solver, cd.distance, cd.top) == (50, "ddim", "l2", 899)
    with torch.no_grad():  # a target network distinct from the student
        for p in cd.target.model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    batch = 6
    x = torch.rand(batch, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    params = [p for p in net.parameters()]
    torch.manual_seed(3)
    loss, _ = cd.generator_loss(x, {"class_labels": labels})
    ours = torch.autograd.grad(loss, params)

    torch.manual_seed(3)
    i = torch.randint(1, 51, (batch,))
    eps = torch.randn_like(x).double()
    w_scale = 2.0 + 2.0 * torch.rand(batch)  # fastdiff's CFG scale; LCM's w is scale - 1
    w = w_scale.double() - 1
    grid = torch.round(torch.arange(51, dtype=torch.float64) * 899 / 50).long()
    t_n, t_prev = grid[i], grid[i - 1]
    acp = teacher.scheduler.alphas_cumprod.double()
    a_n, s_n = r4(acp[t_n].sqrt()), r4((1 - acp[t_n]).sqrt())
    a_p, s_p = r4(acp[t_prev].sqrt()), r4((1 - acp[t_prev]).sqrt())
    w_emb = lcm_guidance_scale_embedding(w, 256)
    assert torch.allclose(guidance_embedding(w_scale - 1, 256).double(), w_emb, rtol=0, atol=1e-3)  # float32 angles
    student64 = copy.deepcopy(net).double()
    teacher64, target64 = copy.deepcopy(teacher.model).double(), copy.deepcopy(cd.target.model).double()

    def scalings(t):
        scaled = 10.0 * t.double()
        return r4(0.25 / (scaled ** 2 + 0.25)), r4(scaled / (scaled ** 2 + 0.25) ** 0.5)

    noisy = a_n * x.double() + s_n * eps
    with torch.no_grad():
        v_c = teacher64(noisy, t_n, class_labels=labels).sample
        v_u = teacher64(noisy, t_n, class_labels=torch.full_like(labels, null)).sample
        x0_c, x0_u = a_n * noisy - s_n * v_c, a_n * noisy - s_n * v_u
        e_c, e_u = a_n * v_c + s_n * noisy, a_n * v_u + s_n * noisy
        pred_x0, pred_eps = x0_c + r4(w) * (x0_c - x0_u), e_c + r4(w) * (e_c - e_u)
        x_prev = a_p * pred_x0 + s_p * pred_eps  # DDIMSolver.ddim_step
        v_t = target64(x_prev, t_prev, class_labels=labels, timestep_cond=w_emb).sample
        c_skip, c_out = scalings(t_prev)
        target = c_skip * x_prev + c_out * (a_p * x_prev - s_p * v_t)
    v_s = student64(noisy, t_n, class_labels=labels, timestep_cond=w_emb).sample
    c_skip, c_out = scalings(t_n)
    model_pred = c_skip * noisy + c_out * (a_n * noisy - s_n * v_s)
    ref = ((model_pred - target) ** 2).mean()
    theirs = torch.autograd.grad(ref, list(student64.parameters()))
    # float32 against float64 (as test_consistency.py's LCM test): x0 read-outs at t <= 899 amplify the native
    # input's rounding by 1 / a_t <= 6.5, ~10 operations and three UNet passes to each output; 1e-4 relative on the
    # loss (measured ~1e-7) and, the gradient being the same computation backward through one UNet, 1e-3 of its norm
    # (measured ~1e-6), while a wrong scale, embedding, solver step or level changes both by O(1)
    assert abs(float(loss.detach()) - float(ref.detach())) <= 1e-4 * float(ref.detach())
    num = sum(float((a.double() - b).pow(2).sum()) for a, b in zip(ours, theirs)) ** 0.5
    den = sum(float(b.pow(2).sum()) for b in theirs) ** 0.5
    assert num <= 1e-3 * den, (num, den)


# --- sim: the surrogate against SiD's reference formula, its special case ------------------------------------------

def test_sim_at_a_quadratic_distance_has_sids_reference_gradient():
    """SIM (Luo et al. 2024, Sec. 3.3: "SiD is a special case of SIM", d = ||.||^2): with a pseudo-Huber constant c
    much larger than the score difference, d'(delta) = delta / sqrt(|delta|^2 + c^2) is delta / c to O(|delta|^2 /
    c^2), so c x SIM's generator gradient must be the gradient of SiD's loss at alpha = 0.5, written out from
    mingyuanzhou/SiD training/sid_loss.py ``generator_loss`` (``(y_r - y_f)((y_r - y) - alpha (y_r - y_f)) /
    weight_factor``, weight_factor = mean|y - y_r| without gradient) in float64 from raw UNet calls (an epsilon teacher
    and a different fake score, SiD's t <= 0.8 of the table, the same draws). No public SIM code exists; this pins
    fastdiff's derived surrogate (sim.py) to the reference it generalises, and tests/test_objective_gradients.py checks
    the pseudo-Huber case against autograd of the divergence."""
    from diffusers import DDPMScheduler

    from conftest import tiny_unet
    from fastdiff.models.schedule import schedule_from_scheduler
    from fastdiff.objectives import SIM
    from test_parity_dm import sid_reference_per_element

    sched = DDPMScheduler(prediction_type="epsilon", clip_sample=False)
    schedule = schedule_from_scheduler(sched)
    teacher = Denoiser(tiny_unet(seed=0).eval(), schedule, "epsilon")
    fake = Denoiser(tiny_unet(seed=1), schedule, "epsilon")
    c = 1e4
    obj = SIM(teacher, fake, c=c)
    assert (obj.min_t, obj.max_t, obj.sigma_grid) == (0.0, 0.8, "teacher")
    batch = 6
    x = (0.5 * torch.randn(batch, 1, 8, 8, generator=torch.Generator().manual_seed(13))).requires_grad_()
    torch.manual_seed(14)
    loss, _ = obj.generator_loss(x)
    (loss * c).backward()

    y, per_elem = sid_reference_per_element(sched, teacher, fake, x, alpha=0.5, seed=14)
    # fastdiff's units: a mean over elements, summed over samples / B (SiD's sum x 100 / B is 100 D times that)
    (per_elem.flatten(1).mean(1).sum() / batch).backward()
    # float32 against float64 through two UNets (64 roundings of the largest gradient term, as test_parity_dm.py's SiD
    # test) plus the quadratic approximation's relative error |delta|^2 / c^2 < 1e-8 here
    g_ref = y.grad
    assert float((x.grad.double() - g_ref).abs().max()) <= 64 * EPS32 * float(g_ref.abs().max())
    assert float(g_ref.abs().max()) > 0


def test_fada_mixed_supervised_gradient_with_tier_weights(two_cond_teacher):  # noqa: F811
    """FADA's full generator loss with per-image tier weights lambda_i (mean_i [distill_i + lambda_i data_i]): its
    adapters' gradient is the VJP of the student's two passes, the one told the drawn scales with
    2 (v_s - sg(v_nested)) / (B D) and the one at s = (1, 1) with 2 lambda_i (v_s1 - v_data) / (B D), v_data the v
    target of the clean image ``(a z - x0) / s``, every target from raw passes in float64 at the replayed draws."""
    from fastdiff.models.denoiser import expand
    from fastdiff.objectives.base import noised
    from test_fada import build as fada_build, conditions, nested_cfg_v, perturb, student_v

    teacher, obj = fada_build(two_cond_teacher)
    torch.manual_seed(0)
    perturb(obj)
    params = [p for p in obj.student.model.parameters() if p.requires_grad]
    d = teacher.denoiser
    batch = 4
    x = torch.rand(batch, 1, 8, 8, generator=torch.Generator().manual_seed(4)) * 2 - 1
    weight = torch.tensor([0.0, 1.0, 0.25, 0.5])
    cond = conditions(batch, weight)
    torch.manual_seed(5)
    loss, _ = obj.generator_loss(x, cond)
    ours = torch.autograd.grad(loss, params)

    torch.manual_seed(5)  # replay the draws in generator_loss's order: level and noise, then the two scales
    x_t, sigma = noised(x, d.schedule, 0.0, 1.0, obj.sigma_grid)
    s_class, s_text = obj.draw_scales(batch, "cpu")
    a, s = r4(d.schedule.alpha(sigma).double()), r4(d.schedule.noise_scale(sigma).double())
    z = x_t * expand(d.schedule.alpha(sigma), x_t)
    t = d.schedule.model_timestep(sigma)
    labels, text = cond["class_labels"], cond["encoder_hidden_states"]
    v_cfg = nested_cfg_v(teacher.model, z, t, labels, text, s_class, s_text, "class_first")
    v_s = student_v(obj, z, t, labels, text, s_class, s_text)
    ones = torch.ones(batch)
    v_s1 = student_v(obj, z, t, labels, text, ones, ones)
    v_data = (a * z.double() - x.double()) / s
    dim = x[0].numel()
    r_distill, r_data = v_s.detach() - v_cfg, v_s1.detach() - v_data
    hand = torch.autograd.grad([v_s, v_s1], params, grad_outputs=[2 * r_distill / (batch * dim),
                                                                   2 * r4(weight.double()) * r_data / (batch * dim)])
    num = sum(float((g.double() - h).pow(2).sum()) for g, h in zip(ours, hand)) ** 0.5
    den = sum(float(h.pow(2).sum()) for h in hand) ** 0.5
    # test_fada.py's rounding estimate per element (10 roundings, coefficients <= 2 s_max + 1 = 9, in v units / s),
    # relative to the smallest RMS residual of either term; 10x for cancellation between samples and terms
    e = 10 * EPS32 * 9 * max(float(m.abs().max()) for m in (z, v_cfg, v_s.detach(), v_data)) / s.flatten()
    rms = torch.cat([r_distill.flatten(1).pow(2).mean(1).sqrt(), r_data.flatten(1).pow(2).mean(1).sqrt()[weight > 0]])
    rel = float(e.max() / rms.min())
    assert num <= 10 * rel * den and 10 * rel < 1e-2, (num / den, rel)
