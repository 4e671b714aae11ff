"""Focused checks found missing by a mutation audit of fastdiff/models (schedule, trajectory, consistency, flow_map,
guidance) and fastdiff/inference (schedulers, sampling, adaptive): each test pins one formula or rule that the rest of
the suite let change unnoticed. Plain tensors and tiny networks built in code; each runs in well under a second."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from torch import nn

from fastdiff.models.denoiser import Denoiser
from fastdiff.models.schedule import FlowSchedule, VPSchedule

EPS32 = torch.finfo(torch.float32).eps


class Recorder(nn.Module):
    """A stand-in network that records its inputs and answers ``0.3 * sample + timestep / 1000`` (any fixed,
    input-dependent output will do: the tests check what the samplers feed it)."""

    def __init__(self):
        super().__init__()
        self.samples, self.labels = [], []

    def forward(self, sample, timestep, class_labels=None, return_dict=True):
        self.samples.append(sample.clone())
        self.labels.append(None if class_labels is None else class_labels.clone())
        t = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1, *([1] * (sample.ndim - 1)))
        return (0.3 * sample + t / 1000,)


def vp_table():
    return DDPMScheduler().alphas_cumprod


# --- schedule.py ------------------------------------------------------------------------------------------------

def test_snapped_timestep_keeps_the_table_derivative():
    """A sigma read off the table maps to the integer timestep, but d t / d sigma stays the table's slope there
    (the snap is straight-through), so sCM's JVP sees the true time derivative on grid points too."""
    s = VPSchedule(vp_table())
    sigma = s.sigma_at(torch.tensor([10.0, 500.0])).requires_grad_(True)
    t = s.timestep(sigma)
    assert torch.equal(t.detach(), torch.tensor([10.0, 500.0]))
    (grad,) = torch.autograd.grad(t.sum(), sigma)
    log = s.sigmas.log()
    for i, k in enumerate((10, 500)):
        # sigma sits on a knot: the bracket on either side may be picked by float32 rounding of sigma
        sides = [1 / (float(sigma.detach()[i]) * float(log[j + 1] - log[j])) for j in (k - 1, k)]
        # float32 sigma and the float32 cast of the gradient: a few relative roundings of eps32 (1e-6 relative is
        # ~8 eps32); a zeroed derivative, or the wrong bracket (slopes differ by ~0.1% - 7%), is far outside
        assert any(abs(float(grad[i]) - d) <= 1e-6 * d for d in sides), (float(grad[i]), sides)


# --- denoiser.py ------------------------------------------------------------------------------------------------

class Fixed(nn.Module):
    """A network whose output is whatever ``self.out`` holds."""

    def __init__(self):
        super().__init__()
        self.out = None

    def forward(self, sample, timestep, return_dict=True):
        return (self.out,)


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "flow", "sample"])
def test_loss_weight_turns_x0_error_into_the_native_output_error(pred):
    """``loss_weight(sigma) * |x0(out1) - x0(out2)|^2 = |out1 - out2|^2`` for two network outputs at the same
    input: the weight is exactly the teacher's own loss on its native target (eps: 1/sigma^2, v: (1+sigma^2)/sigma^2,
    flow: 1/t^2 = ((1+sigma)/sigma)^2, sample: 1)."""
    schedule = FlowSchedule(1000) if pred == "flow" else VPSchedule(vp_table())
    net = Fixed()
    d = Denoiser(net, schedule, pred)
    sigma = torch.tensor([0.5, 2.0, 10.0])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 1, 4, 4, generator=g) * (1 + sigma.reshape(-1, 1, 1, 1))
    out1, out2 = torch.randn(3, 1, 4, 4, generator=g), torch.randn(3, 1, 4, 4, generator=g)
    net.out = out1
    x01 = d(x, sigma)
    net.out = out2
    x02 = d(x, sigma)
    lhs = d.loss_weight(sigma).double() * (x01 - x02).double().pow(2).flatten(1).sum(1)
    rhs = (out1 - out2).double().pow(2).flatten(1).sum(1)
    # x0 differences of float32 values of size <= ~30 (|x| + s |out| over a) against differences of size >= ~0.1:
    # a relative error of a few eps32 x 300 ~ 1e-4 at worst, squared and summed: 1e-3 relative; a wrong weight is
    # off by a factor (1 + sigma) or more
    torch.testing.assert_close(lhs, rhs, rtol=1e-3, atol=0)


# --- trajectory.py ----------------------------------------------------------------------------------------------

def test_ddim_levels_round_fractional_timesteps_to_the_table():
    """K = 3 on a 1000-step table: linspace(999, 0, 3) = 999, 499.5, 0 is rounded (half to even, as numpy's
    round in diffusers' "linspace" spacing) onto the table: timestep 500, not the interpolated 499.5."""
    from fastdiff.models.trajectory import ddim_levels

    vp = VPSchedule(vp_table())
    assert torch.equal(ddim_levels(vp, 3), vp.sigma_at(torch.tensor([999.0, 500.0, 0.0])))
    assert np.linspace(999, 0, 3).round().tolist() == [999.0, 500.0, 0.0]


# --- consistency.py ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("raw_top,start", [(726, 719), (727, 727), (728, 727), (735, 735)])
def test_consistency_start_is_the_highest_multiple_of_8_table_length(raw_top, start):
    """The epsilon student's first timestep: the highest t with 1 / a_t <= 15, snapped down so that the truncated
    table's length t + 1 is a multiple of 8. Tables built so the last level with 1 / a_t <= 15 is ``raw_top``
    (alphas_cumprod = 225^(-t / (raw_top + 1/2)): a_t^2 >= 1/225 exactly up to raw_top)."""
    from fastdiff.models.consistency import consistency_start

    t = torch.arange(1000, dtype=torch.float64)
    ac = torch.exp(-math.log(225.0) * t / (raw_top + 0.5))
    schedule = VPSchedule(ac)
    ok = torch.nonzero((1 + schedule.sigmas**2).sqrt() <= 15.0).flatten()
    assert int(ok[-1]) == raw_top  # the table is what the test means it to be
    sigma = consistency_start(Denoiser(Recorder(), schedule, "epsilon"))
    assert sigma == float(schedule.sigma_at(torch.tensor([start]))[0])
    assert (start + 1) % 8 == 0


# --- flow_map.py ------------------------------------------------------------------------------------------------

def test_per_sample_r_under_cfg_repeats_the_batch_in_halves():
    """Under CFG the network sees [uncond; cond], twice the batch: a per-sample r must follow the same layout,
    [r; r], not each r twice in a row."""
    from fastdiff.models.flow_map import TargetTimeEmbedding

    torch.manual_seed(0)
    emb = TargetTimeEmbedding(16, 4, None)
    nn.init.normal_(emb.proj.weight)  # a non-zero projection, so the features show in the output
    r = torch.tensor([100.0, 700.0, 300.0])
    emb.pending = r
    out = emb.embedding(6, torch.zeros(6, 4))
    emb.pending = torch.cat([r, r])
    assert torch.equal(out, emb.embedding(6, torch.zeros(6, 4)))
    assert not torch.equal(out[1], out[3])  # r differs between samples 1 and 0 of the second half


# --- schedulers.py ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_non_consistency_lcm_export_has_no_boundary_mix(k):
    """A non-cd student's LCMScheduler uses a huge timestep_scaling: at every timestep it steps on, c_out is 1 in
    float32 and c_skip is so small that c_skip * x moves no x0 of magnitude >= 1e-3 for |x| <= 1e4 (c_skip * 1e4
    below eps32 * 1e-3 / 2, half an ulp): each step is the student's plain x0. LCM's k = 10 would leave c_skip
    ~1e-7 at timestep 124, i.e. a visible mix."""
    from fastdiff.inference.schedulers import student_scheduler

    sched = student_scheduler(DDPMScheduler(), "epsilon")
    sched.set_timesteps(k)
    for t in sched.timesteps:
        c_skip, c_out = sched.get_scalings_for_boundary_condition_discrete(t)
        assert float(c_out) == 1.0
        assert float(c_skip) * 1e4 < EPS32 * 1e-3 / 2, (int(t), float(c_skip))


# --- sampling.py ------------------------------------------------------------------------------------------------

def test_flow_ddim_step_from_pure_noise_reuses_the_noise():
    """ddim_sample on a flow teacher, K = 2 (t = 1, then 1/2): at t = 1 the input is the noise itself, so the step
    to t = 1/2 feeds (1 - t) x0 + t z with the first x0 = z - v and the same z."""
    from fastdiff.inference.sampling import ddim_sample

    net = Recorder()
    d = Denoiser(net, FlowSchedule(1000), "flow")
    z = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    ddim_sample(d, z, 2)
    assert len(net.samples) == 2 and torch.equal(net.samples[0], z)
    x0 = z - (0.3 * z + 1.0)  # timestep 1000 at t = 1: v = 0.3 z + 1
    expected = 0.5 * x0 + 0.5 * z
    # float32: a handful of roundings on values of order |z| + 1 <= ~5: 8 eps32 of that
    torch.testing.assert_close(net.samples[1], expected, rtol=0, atol=8 * EPS32 * float(expected.abs().max() + 1))


def test_sample_model_continues_class_labels_and_seeds_across_batches():
    """Batches of 2 from 5 images: labels 0, 1 | 2, 0 | 1 (the cycle continues), noise from seed + batch index."""
    from types import SimpleNamespace

    from fastdiff.inference.sampling import sample_model

    net = Recorder()
    d = Denoiser(net, VPSchedule(vp_table()), "sample")
    loaded = SimpleNamespace(num_classes=3, latents=None, sample_shape=(1, 4, 4), conditioning="class")
    starts = [s for s, _ in sample_model(d, loaded, num=5, steps=1, seed=7, batch_size=2, device="cpu")]
    assert starts == [0, 2, 4]
    assert [lab.tolist() for lab in net.labels] == [[0, 1], [2, 0], [1]]
    for b, seen in enumerate(net.samples):
        assert torch.equal(seen, torch.randn((len(seen), 1, 4, 4), generator=torch.Generator().manual_seed(7 + b)))


# --- adaptive.py ------------------------------------------------------------------------------------------------

def test_sdedit_renoises_with_alpha_on_x0_and_noise_scale_on_noise():
    """refine at sigma = 3 (where a_t = 1/sqrt(10) and s_t = 3/sqrt(10) differ): the teacher's first input is
    a x0 + s eps at the snapped level; at the top of the table it is the noise alone."""
    from fastdiff.inference.adaptive import refine, refine_levels

    net = Recorder()
    teacher = Denoiser(net, VPSchedule(vp_table()), "sample")
    x0 = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    refine(teacher, x0, noise, 2, sigma_refine=3.0)
    level = float(refine_levels(teacher, 2, 3.0)[0])
    assert abs(level - 3.0) < 0.1  # snapped to a training timestep near sigma = 3
    a, s = 1 / math.sqrt(1 + level**2), level / math.sqrt(1 + level**2)
    # float32 products and a sum on values of order |x0| + 3 |eps| (<= ~15): 4 eps32 of that
    torch.testing.assert_close(net.samples[0], a * x0 + s * noise, rtol=0, atol=4 * EPS32 * 15)
    net.samples.clear()
    refine(teacher, x0, noise, 2, sigma_refine=teacher.schedule.sigma_max)  # the top: pure noise, as sampling
    assert torch.equal(net.samples[0], noise)
    # a flow teacher's top is sigma = inf: the same as None (it was t = inf / inf = NaN, a NaN sample without error)
    flow = Denoiser(Recorder(), FlowSchedule(1000), "flow")
    assert torch.equal(refine_levels(flow, 2, float("inf")), refine_levels(flow, 2, None))
    top = refine(flow, x0, noise, 2, sigma_refine=flow.schedule.sigma_max)
    assert torch.equal(top, refine(flow, x0, noise, 2)) and bool(torch.isfinite(top).all())
    # below the top, uniform in flow time under sigma_refine: 0.5 is t = 1/3, then t = 1/6, sigma 0.2 (float64 t and
    # back, one float32 rounding: 1 ulp)
    levels = refine_levels(flow, 2, 0.5)
    assert float(levels[0]) == 0.5 and abs(float(levels[1]) - 0.2) <= EPS32 * 0.2


def test_threshold_of_a_higher_is_better_critic_refines_the_low_scores():
    """With a higher-is-better critic (e.g. CLIP score), threshold 0.5 refines the samples scoring below 0.5."""
    from fastdiff.inference.adaptive import AdaptiveSampler, CallableCritic
    from fastdiff.models.generator import Generator

    teacher = Denoiser(Recorder(), VPSchedule(vp_table()), "sample")
    critic = CallableCritic(lambda x0, cond: torch.tensor([0.9, 0.1, 0.6, 0.4]), higher_is_better=True)
    sampler = AdaptiveSampler(Generator(teacher), teacher, critic, threshold=0.5, teacher_steps=1)
    assert sampler.select(torch.tensor([0.9, 0.1, 0.6, 0.4])).tolist() == [False, True, False, True]
    lower = AdaptiveSampler(Generator(teacher), teacher, CallableCritic(lambda x0, c: x0), threshold=0.5,
                            teacher_steps=1)
    assert lower.select(torch.tensor([0.9, 0.1, 0.6, 0.4])).tolist() == [True, False, True, False]
