"""The Denoiser adapter: exact x0 for an oracle network under every schedule and prediction type, CFG,
and real diffusers networks of each kind (UNet2DModel, UNet2DConditionModel, DiT, SD3 transformer)."""
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler
from torch import nn

from fastdiff.models.denoiser import Denoiser
from fastdiff.models.schedule import FlowSchedule, VPSchedule, schedule_from_scheduler

EPS32 = torch.finfo(torch.float32).eps


class Oracle(nn.Module):
    """Knows x0 and the scheduler's own tables; answers with the exact target of its prediction type."""

    def __init__(self, x0, scheduler, prediction_type, per_class=None):
        super().__init__()
        self.x0, self.scheduler, self.prediction_type = x0, scheduler, prediction_type
        self.per_class = per_class  # optional (num_classes, *shape) x0 per class label
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, sample, timestep, class_labels=None, return_dict=True):
        x0 = self.x0 if class_labels is None else self.per_class[class_labels]
        if isinstance(self.scheduler, FlowMatchEulerDiscreteScheduler):
            t = (timestep.double() / 1000).reshape(-1, 1, 1, 1)
            eps = (sample.double() - (1 - t) * x0.double()) / t
            return ((eps - x0.double()).float(),)
        ac = self.scheduler.alphas_cumprod[timestep.round().long()].double().reshape(-1, 1, 1, 1)
        a, s = ac.sqrt(), (1 - ac).sqrt()
        eps = (sample.double() - a * x0.double()) / s
        out = {"epsilon": eps, "v_prediction": a * eps - s * x0.double(), "sample": x0.double()}[self.prediction_type]
        return (out.float(),)


VP_CASES = [(beta, pred) for beta in ("linear", "squaredcos_cap_v2") for pred in ("epsilon", "v_prediction", "sample")]


@pytest.mark.parametrize("beta,pred", VP_CASES)
def test_oracle_round_trip_vp(beta, pred):
    torch.manual_seed(0)
    sched = DDPMScheduler(beta_schedule=beta, prediction_type=pred)
    x0 = torch.randn(5, 1, 4, 4).clamp(-1, 1)
    d = Denoiser(Oracle(x0, sched, pred), schedule_from_scheduler(sched), pred)
    t = torch.tensor([0, 10, 250, 700, 999])
    sigma = d.schedule.sigma_at(t)
    x = x0 + sigma.reshape(-1, 1, 1, 1) * torch.randn_like(x0)
    err = (d(x, sigma) - x0).abs().flatten(1).max(1).values
    # x0 (|x0| <= 1) from float32 values: x0 = x - sigma eps for eps models rounds the VE input x (|x| ~ sigma |eps|,
    # up to 5e4 at the top of the cosine table: inherent to eps models, not the adapter); v and sample models see the
    # native input x a (|.| <= ~4). A few roundings of that magnitude, 8 eps32 of it: measured at most 1/16 of the
    # bound (1 ulp of x0 below sigma 13, 1e-3 at sigma 2e4); a 1% error in a_t or s_t is far above.
    mag = x.abs().flatten(1).max(1).values
    mag = mag if pred == "epsilon" else mag / (1 + sigma**2).sqrt()
    tol = 8 * EPS32 * (1 + mag)
    assert (err <= tol).all(), err


def test_oracle_round_trip_flow():
    torch.manual_seed(0)
    sched = FlowMatchEulerDiscreteScheduler()
    x0 = torch.randn(4, 1, 4, 4)
    d = Denoiser(Oracle(x0, sched, "flow"), schedule_from_scheduler(sched), "flow")
    t = torch.tensor([0.05, 0.3, 0.7, 0.95])
    sigma = (t / (1 - t)).float()
    x = x0 + sigma.reshape(-1, 1, 1, 1) * torch.randn_like(x0)
    # x0 = x_native - t v on native values of order |x0| + |eps| (<= ~7 here), a few float32 roundings plus t's
    # rounding times |v|: 16 eps32 of that magnitude (measured 1.2e-7 and 2.4e-7, 1-2 ulps of x0).
    tol = 16 * EPS32 * float(x0.abs().max() + 4)
    assert torch.allclose(d(x, sigma), x0, rtol=0, atol=tol)
    # t = 1 (sigma = inf) only exists in native coordinates: pure noise in, x0 out.
    out = d.denoise_native(torch.randn_like(x0), torch.full((4,), float("inf")))
    assert torch.allclose(out, x0, rtol=0, atol=tol)


def test_sigma_timestep_round_trip_is_exact_on_the_grid():
    s = VPSchedule(DDPMScheduler().alphas_cumprod)
    t = torch.arange(0, 1000)
    assert torch.equal(s.timestep(s.sigma_at(t)), t.float())
    mid = s.timestep(s.sigma_at(torch.tensor([10.5])))
    # sigma is returned in float32 (relative rounding eps32 / 2), which moves the recovered timestep by that over the
    # log-sigma step between t = 10 and 11 (0.068), plus t's own float32 rounding (10.5 eps32): 10x that is 3e-5 of a
    # timestep (measured 0), far below a half-step error.
    slope = float((s.sigmas[11] / s.sigmas[10]).log())
    assert abs(mid.item() - 10.5) <= 10 * EPS32 * (1 / slope + 10.5)
    # alpha = rsqrt(1 + sigma^2) from the float32 sigma against the sqrt of the float32 table: two or three relative
    # roundings of eps32 / 2 (measured 1.19e-7 relative, 1 eps32); 10 eps32 relative, a_t spanning 6e-3 .. 1.
    torch.testing.assert_close(s.alpha(s.sigma_at(t)), DDPMScheduler().alphas_cumprod.sqrt(), rtol=10 * EPS32, atol=0)
    f = FlowSchedule(1000, shift=3.0)
    assert f.sigma_max == float("inf") and f.sigma_min > 0


def test_classifier_free_guidance_combines_predictions():
    sched = DDPMScheduler(prediction_type="epsilon")
    per_class = torch.randn(4, 1, 4, 4)
    oracle = Oracle(None, sched, "epsilon", per_class=per_class)
    d = Denoiser(oracle, schedule_from_scheduler(sched), "epsilon", null_class=3)
    labels = torch.tensor([0, 1, 2])
    sigma = d.schedule.sigma_at(torch.tensor([300, 300, 300]))
    x = torch.randn(3, 1, 4, 4)
    g = 2.5
    guided = d(x, sigma, {"class_labels": labels}, guidance_scale=g)
    cond = d(x, sigma, {"class_labels": labels})
    uncond = d(x, sigma, {"class_labels": torch.full_like(labels, 3)})
    # the guided x0 combines eps (then x0) while this combines x0's: a few float32 roundings of values up to
    # |uncond| + g |cond - uncond|; 16 eps32 of that (measured 0).
    scale = float((uncond.abs() + g * (cond - uncond).abs()).max())
    assert torch.allclose(guided, uncond + g * (cond - uncond), rtol=0, atol=16 * EPS32 * scale)
    with pytest.raises(ValueError, match="null class"):
        Denoiser(oracle, d.schedule, "epsilon")(x, sigma, {"class_labels": labels}, guidance_scale=2.0)


def test_matches_diffusers_scheduler_x0():
    """Our x0 equals the pred_original_sample of diffusers' own DDIM step (eps and v teachers)."""
    from conftest import tiny_unet

    for pred in ("epsilon", "v_prediction"):
        unet = tiny_unet().eval()
        sched = DDIMScheduler(prediction_type=pred, clip_sample=False)
        sched.set_timesteps(10)
        d = Denoiser(unet, schedule_from_scheduler(sched), pred)
        x = torch.randn(2, 1, 8, 8)
        t = sched.timesteps[3]
        with torch.no_grad():
            out = unet(x, t).sample
            ref = sched.step(out, t, x).pred_original_sample
            ours = d.denoise_native(x, d.schedule.sigma_at(t.reshape(1)).expand(2))
        # x0 = (x - s out) / a (v: a x - s out) with a, s rounded another way: a few float32 roundings of
        # (|x| + |out|) / a (a = 0.16 at t = 600: ~20); 8 eps32 of it, 2e-5 (measured 0: bit for bit here).
        scale = float((x.abs().max() + out.abs().max()) / sched.alphas_cumprod[t].sqrt())
        assert torch.allclose(ours, ref, rtol=0, atol=8 * EPS32 * scale)


def test_real_networks_of_each_kind():
    """Real diffusers networks against hand computations on their own outputs: epsilon -> x0 on the DDPM table
    and CFG on text (UNet2DConditionModel), the learned-variance half dropped and class CFG with the null class
    (DiT), and SD3's shifted flow schedule (the scheduler's own sigmas and timesteps) with x0 = x - t v.
    Each side runs the same network on the same input, so they differ by a few float32 operations on values of
    order 1-10: tolerance 1e-5 of the values' magnitude."""
    from diffusers import DiTTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel

    def close(a, b):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5 * float(b.abs().max()))

    torch.manual_seed(0)
    ddpm = DDPMScheduler()
    vp = schedule_from_scheduler(ddpm)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                layers_per_block=1, cross_attention_dim=8, norm_num_groups=4, attention_head_dim=2,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    text = {"encoder_hidden_states": torch.randn(2, 3, 8), "uncond_encoder_hidden_states": torch.zeros(2, 3, 8)}
    d = Denoiser(unet, vp, "epsilon")
    x = torch.randn(2, 4, 8, 8)
    t = torch.tensor([100, 600])
    sigma = vp.sigma_at(t)  # on the table: the network must get exactly these integer timesteps
    a = ddpm.alphas_cumprod[t].sqrt().reshape(-1, 1, 1, 1)
    s = (1 - ddpm.alphas_cumprod[t]).sqrt().reshape(-1, 1, 1, 1)
    native = a * x  # x is VE: x0 + sigma eps; the network sees a x0 + s eps = a x

    def x0_of(model, **kw):
        with torch.no_grad():
            return (native - s * model(native, t, **kw).sample[:, :4]) / a

    with torch.no_grad():
        cond_x0, guided = d(x, sigma, text), d(x, sigma, text, guidance_scale=3.0)
    close(cond_x0, x0_of(unet, encoder_hidden_states=text["encoder_hidden_states"]))
    uncond_x0 = x0_of(unet, encoder_hidden_states=text["uncond_encoder_hidden_states"])
    close(guided, uncond_x0 + 3.0 * (cond_x0 - uncond_x0))

    dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=4, in_channels=4, out_channels=8,
                                num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=5, norm_num_groups=4)
    d = Denoiser(dit, vp, "epsilon", null_class=5)
    with torch.no_grad():
        guided = d(x, sigma, {"class_labels": torch.tensor([0, 4])}, guidance_scale=2.0)
    assert guided.shape == x.shape  # the learned-variance half (channels 4-7) is dropped
    cond_x0 = x0_of(lambda *a_, **k: dit(*a_, **k), class_labels=torch.tensor([0, 4]))
    uncond_x0 = x0_of(lambda *a_, **k: dit(*a_, **k), class_labels=torch.tensor([5, 5]))
    close(guided, uncond_x0 + 2.0 * (cond_x0 - uncond_x0))

    sd3 = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=4,
                                num_attention_heads=2, joint_attention_dim=8, caption_projection_dim=8,
                                pooled_projection_dim=6, out_channels=4, pos_embed_max_size=8)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    flow = schedule_from_scheduler(scheduler)
    d = Denoiser(sd3, flow, "flow")
    cond = {"encoder_hidden_states": torch.randn(2, 3, 8), "pooled_projections": torch.randn(2, 6)}
    # The shift by hand: unshifted u = 0.25 -> t = 3 u / (1 + 2 u) = 0.5; the lowest level is the scheduler's own.
    # rel 1e-6 (8 eps32) here and below: float32 round trips of values of order 1 with at most 2-3 roundings of
    # eps32 / 2 each (measured 0, 4e-8, 2.4e-8).
    assert float(flow.t_of(flow.sigma_at(torch.tensor([250.0])))) == pytest.approx(0.5, rel=1e-6)
    assert float(flow.t_of(torch.tensor(flow.sigma_min, dtype=torch.float64))) == pytest.approx(scheduler.sigma_min, rel=1e-6)
    scheduler.set_timesteps(4)  # the pipeline's shifted levels: t = 3 u / (1 + 2 u), timestep = t T
    for timestep, t_flow in zip(scheduler.timesteps, scheduler.sigmas[:-1]):
        assert float(timestep) == pytest.approx(1000 * float(t_flow), rel=1e-6)
        sig = (t_flow / (1 - t_flow)).reshape(1) if t_flow < 1 else torch.tensor([float("inf")])
        x_native = (1 - t_flow) * x + t_flow * torch.randn_like(x)
        with torch.no_grad():
            v = sd3(hidden_states=x_native, timestep=timestep.expand(2), **cond).sample
            close(d.denoise_native(x_native, sig, cond), x_native - t_flow * v)
    with torch.no_grad():
        assert torch.isfinite(d.denoise_native(x, torch.tensor(float("inf")), cond)).all()