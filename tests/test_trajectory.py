"""The teacher's deterministic ODE (fastdiff/models/trajectory.py): the iterator's last state is exactly what the
sampler of ``data.name: teacher`` and the reflow pairs returned before it moved there (DDIM and Heun), and a DDIM
step is the closed form x_s = a_s x0 + s_s eps in float64."""
import pytest
import torch
from diffusers import DDPMScheduler

from fastdiff.models.denoiser import Denoiser
from fastdiff.models.schedule import FlowSchedule, VPSchedule
from fastdiff.models.teacher import load_teacher
from fastdiff.models.trajectory import ddim_levels, ode_sample, ode_trajectory, trajectory_levels


@torch.no_grad()
def old_ode_sample(denoiser, z, sigmas, cond=None, guidance_scale=None, heun=False):
    """The loop ``training/teacher_data.py`` ran as ``ode_sample`` before the trajectory code was shared (commit
    62d7dc4), kept here as the reference the shared iterator must reproduce bit for bit."""
    schedule = denoiser.schedule

    def d(x_native, sigma):
        x0 = denoiser.denoise_native(x_native, sigma, cond, guidance_scale)
        x = x_native if torch.isinf(sigma) else x_native / schedule.alpha(sigma)
        return (x_native if torch.isinf(sigma) else (x - x0) / sigma), x, x0

    slope, x, x0 = d(z, sigmas[0])
    for i in range(1, len(sigmas)):
        x_next = x0 + sigmas[i] * slope
        if heun and not torch.isinf(sigmas[i - 1]):
            slope_next, _, _ = d(x_next * schedule.alpha(sigmas[i]), sigmas[i])
            x_next = x + (sigmas[i] - sigmas[i - 1]) * (slope + slope_next) / 2
        slope, x, x0 = d(x_next * schedule.alpha(sigmas[i]), sigmas[i])
    return x0


@pytest.mark.parametrize("sampler", ["ddim", "heun"])
@pytest.mark.parametrize("kind", ["eps", "v-cfg", "flow"])
def test_last_state_is_the_old_ode_sample_bit_for_bit(tiny_teacher, tiny_cond_teacher, sampler, kind):
    cond, guidance = None, None
    if kind == "v-cfg":  # class-conditional v-prediction teacher under CFG
        denoiser = load_teacher(tiny_cond_teacher, null_class=3).denoiser
        cond, guidance = {"class_labels": torch.tensor([0, 1, 2])}, 2.0
    else:
        denoiser = load_teacher(tiny_teacher).denoiser
        if kind == "flow":  # the UNet read as a velocity model: the ddim levels start at sigma = inf
            denoiser = Denoiser(denoiser.model, FlowSchedule(1000), "flow")
    sigmas = trajectory_levels(denoiser.schedule, 4, sampler)
    assert torch.isinf(sigmas[0]) == (kind == "flow" and sampler == "ddim")
    z = torch.randn((3, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    states = list(ode_trajectory(denoiser, z, sigmas, cond, guidance, heun=sampler == "heun"))
    assert [float(s.sigma) for s in states] == sigmas.tolist() and torch.equal(states[0].x, z)
    old = old_ode_sample(denoiser, z, sigmas, cond, guidance, heun=sampler == "heun")
    assert torch.equal(states[-1].x0, old) and torch.equal(ode_sample(denoiser, z, sigmas, cond, guidance,
                                                                       sampler == "heun"), old)


class Smooth(torch.nn.Module):
    """A stand-in x0 estimate, nonlinear in its input and level, float64 throughout."""

    def __init__(self, schedule):
        super().__init__()
        self.schedule = schedule

    def denoise_native(self, x_native, sigma, cond=None, guidance_scale=None):
        return torch.tanh(0.7 * x_native) + 0.1 * torch.atan(sigma)


@pytest.mark.parametrize("kind", ["vp", "flow"])
def test_a_ddim_step_is_the_closed_form_in_float64(kind):
    """Each DDIM step keeps the level's x0 and implied eps: x_s = a_s x0 + s_s eps, eps = (x_t - a_t x0) / s_t
    (at sigma = inf, flow's t = 1, eps is the native noise itself)."""
    if kind == "vp":
        schedule = VPSchedule(DDPMScheduler().alphas_cumprod)
        sigmas = schedule.sigmas[torch.tensor([999, 700, 420, 90, 0])]  # the float64 table, highest first
    else:
        schedule = FlowSchedule(1000)
        sigmas = torch.cat([torch.tensor([torch.inf]), schedule.sigma_at(torch.tensor([800, 400, 50])).double()])
    z = torch.randn((4, 1, 8, 8), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    states = list(ode_trajectory(Smooth(schedule), z, sigmas))
    assert len(states) == len(sigmas) and all(s.x.dtype == torch.float64 for s in states)
    for now, nxt in zip(states, states[1:]):
        a, s = schedule.alpha(now.sigma), schedule.noise_scale(now.sigma)
        eps = z if torch.isinf(now.sigma) else (now.x - a * now.x0) / s
        closed = schedule.alpha(nxt.sigma) * now.x0 + schedule.noise_scale(nxt.sigma) * eps
        # float64 rounding: ~10 operations on values of size <= 5 (2.2e-16 x 10 x 5 ~ 1e-14)
        assert (nxt.x - closed).abs().max() <= 1e-13 * max(1.0, float(closed.abs().max()))
        assert torch.equal(nxt.x0, Smooth(schedule).denoise_native(nxt.x, nxt.sigma))


def test_ddim_levels_are_the_teachers_linspace_timesteps():
    vp = VPSchedule(DDPMScheduler().alphas_cumprod)
    assert torch.equal(ddim_levels(vp, 4), vp.sigma_at(torch.tensor([999.0, 666.0, 333.0, 0.0])))
    flow = FlowSchedule(1000)
    assert torch.equal(ddim_levels(flow, 3), flow.sigma_at(torch.tensor([1000.0, 500.5, 1.0])))
    assert torch.isinf(ddim_levels(flow, 3)[0])
    finite = ddim_levels(flow, 3, finite=True)  # AGD's: whole timesteps, the top below t = 1, the end above 0
    assert torch.equal(finite, flow.sigma_at(torch.tensor([999.0, 500.0, 1.0]))) and torch.isfinite(finite).all()
