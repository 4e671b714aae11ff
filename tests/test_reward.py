"""ReFL on the student (fastdiff/objectives/reward.py, Hyper-SD's human-feedback stage): the loss against ReFL.py's
formula, the late step, the gradient through the student's DDIM walk against an independent float64 autograd, the CLIP
reward against open_clip, decoded images for latent teachers, the reward rising under training, and weight 0 leaving
hyper-sd's loss bit-identical."""
import pytest
import torch
import torch.nn.functional as F

from fastdiff.models.analytic import GaussianMixtureModel
from fastdiff.models.denoiser import Denoiser
from fastdiff.models.schedule import VPSchedule
from fastdiff.objectives import build
from fastdiff.objectives.reward import ClipReward, RewardFeedback, late_step, refl_loss
from fastdiff.pipelines.pipeline_fastdiff_flow_map import step_timesteps

from conftest import TINY_CLIP_NAME  # noqa: F401 - the tiny_clip fixture registers this open_clip config

EPS32 = torch.finfo(torch.float32).eps
EPS64 = torch.finfo(torch.float64).eps
SPEC = "test_reward:brightness"  # this module's function, imported by name as a user's reward would be


def brightness(images: torch.Tensor, cond=None) -> torch.Tensor:
    """A differentiable reward: each image's mean value."""
    return images.flatten(1).mean(1)


def darkness(images: torch.Tensor, cond=None) -> torch.Tensor:
    """A reward against the teacher's pull (its mean is brighter than the student's)."""
    return -brightness(images)


def refl_reference(rewards: torch.Tensor, margin: float, grad_scale: float) -> torch.Tensor:
    """THUDM/ImageReward ImageReward/ReFL.py, Trainer.train: ``loss = F.relu(-rewards + 2); loss = loss.mean() *
    args.grad_scale`` (margin 2 there), in float64."""
    return F.relu(-rewards.double() + margin).mean() * grad_scale


def test_refl_loss_matches_the_reference_formula():
    torch.manual_seed(0)
    rewards = torch.randn(64, dtype=torch.float64) * 2  # about half below the margin 2... and some above
    for margin, weight in ((2.0, 1e-3), (0.5, 1.0), (-10.0, 3.0)):
        ours = refl_loss(rewards, margin, weight)
        want = refl_reference(rewards, margin, weight)
        # float64 sum of 64 terms of size <= |margin| + 8, then one division and one product
        assert (ours - want).abs() <= 70 * EPS64 * (abs(margin) + 8) * weight
    assert refl_loss(rewards, -10.0, 1.0) == 0  # every reward above the margin: the hinge is flat
    with_nan = torch.cat([rewards, torch.tensor([float("nan"), float("inf")], dtype=torch.float64)])
    assert refl_loss(with_nan, 2.0, 1.0) == refl_loss(rewards, 2.0, 1.0)  # non-finite rewards are dropped


def test_late_step_is_refls_last_quarter():
    """ReFL draws its graded step from 30..39 of 40; the same fraction of a K-step walk (K = 1, 2, 4: the last)."""
    torch.manual_seed(0)
    assert {late_step(40) for _ in range(2000)} == set(range(30, 40))
    assert {late_step(8) for _ in range(200)} == {6, 7}
    assert [{late_step(k) for _ in range(50)} for k in (1, 2, 4)] == [{0}, {1}, {3}]


def gaussian(std: float, seed: int) -> GaussianMixtureModel:
    return GaussianMixtureModel(sample_size=2, weights=(1.0,), stds=(std,), mean_scale=1.0, seed=seed)


def hyper(reward_weight=None, seed=0, reward=SPEC, **options):
    torch.manual_seed(seed)
    teacher_model, student_model = gaussian(0.5, 1), gaussian(0.7, 2)
    schedule = VPSchedule(teacher_model.scheduler().alphas_cumprod)
    teacher, student = Denoiser(teacher_model, schedule, "sample"), Denoiser(student_model, schedule, "sample")
    given = {} if reward_weight is None else {"reward": reward, "reward_weight": reward_weight}
    obj = build("hyper-sd", teacher, None, student=student, segments=[2, 1], stage_steps=[10], num_intervals=8,
                target_ema=0.0, **given, **options)
    return obj, teacher_model, student_model


@pytest.mark.parametrize("num_steps", [4, 8])
def test_gradient_through_the_student_equals_float64_autograd(num_steps):
    """The ReFL gradient on the student's means: the student's DDIM walk (no gradient before the drawn step, Tweedie's
    formula for its x0 estimates) rebuilt in float64 from the schedule's table, differentiated by autograd."""
    obj, _, student_model = hyper(1.0)
    term = obj.refl
    alphas_cumprod = student_model.scheduler().alphas_cumprod.double()
    n, std = 256, 0.7
    torch.manual_seed(3)  # loss(): the noise first, then the late step
    z = torch.randn(n, 1, 2, 2)
    step = int(torch.randint(int(0.75 * num_steps), num_steps, (1,)).item())
    ab = alphas_cumprod[torch.tensor(step_timesteps(1000, num_steps))]
    a, s = ab.sqrt(), (1 - ab).sqrt()  # native x_t = a x0 + s eps; VE sigma = s / a
    means = student_model.means.detach().double().reshape(1, 1, 2, 2).clone().requires_grad_(True)

    def x0_of(x_native, i, m):
        x, var = x_native / a[i], (s[i] / a[i]) ** 2
        return x - var * (x - m) / (std ** 2 + var)

    x_native = z.double()
    for i in range(step):  # ReFL's no-grad part of the walk
        y = x0_of(x_native, i, means.detach())
        x_native = a[i + 1] * y + s[i + 1] * (x_native - a[i] * y) / s[i]
    rewards = brightness(x0_of(x_native, step, means))
    margin = float(rewards.detach().median()) + 1e-3  # about half the samples on the flat side of the hinge
    gap = (rewards.detach() - margin).abs().min()
    assert gap > 1e-5  # no sample so close to the kink that float32 could put it on the other side
    want = torch.autograd.grad(refl_reference(rewards, margin, 0.25), means)[0].reshape(-1)
    term.margin, term.weight = margin, 0.25
    torch.manual_seed(3)
    loss, logs = term.loss(obj.student, torch.zeros(n, 1, 2, 2), None, num_steps, None)
    ours = torch.autograd.grad(loss, student_model.means)[0].reshape(-1)
    # the float32 loss: a mean of n hinge values of size ~|margin|, 84 x eps32 of slack for the walk's rounding
    assert abs(float(loss.detach()) - float(refl_reference(rewards.detach(), margin, 0.25))) <= 1e-5 * (abs(margin) + 1)
    # float32 through ~10 operations per step over up to 8 steps, x_native up to ~4 (|means| ~ 1, noise): gradients
    # are means of n values of size <= 0.25 / 4; 100 x eps32 relative
    assert ((ours.double() - want).abs() <= 100 * EPS32 * want.abs().max()).all() and want.abs().max() > 1e-3
    assert logs["loss_refl"] == loss.detach()


def test_weight_zero_leaves_hyper_sd_bit_identical():
    """reward_weight 0 (the default) builds no reward term and draws nothing more: the loss, its gradient and the RNG
    state after it equal those of a hyper-sd built without the keys, in both stages."""
    plain, teacher_model, _ = hyper(None)
    off, _, _ = hyper(0.0)
    assert off.refl is None and plain.refl is None
    x = teacher_model.sample_true(64, torch.Generator().manual_seed(1))
    for step in (0, 10):
        got = []
        for obj in (plain, off):
            obj.step = step
            torch.manual_seed(5)
            loss, logs = obj.generator_loss(x)
            grads = torch.autograd.grad(loss, list(obj.student.parameters()), allow_unused=True)
            got.append((loss, logs, grads, torch.rand(1)))
        (l1, g1, d1, r1), (l2, g2, d2, r2) = got
        assert torch.equal(l1, l2) and g1.keys() == g2.keys() and "loss_refl" not in g1 and torch.equal(r1, r2)
        assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(d1, d2))


def sample_darkness(obj, num_steps: int) -> float:
    """Mean darkness of the student's num_steps-step DDIM samples from fixed noise."""
    from fastdiff.models.generator import Generator

    sampler = Generator(obj.student, num_steps, None, "ddim")
    with torch.no_grad():
        return float(darkness(sampler(torch.randn(512, 1, 2, 2, generator=torch.Generator().manual_seed(9)))).mean())


def test_reward_rises_under_training():
    """20 Adam updates (lr 2e-2) of hyper-sd (10 in each stage, k = 2 then 1) with ReFL on darkness (weight 1, margin
    10: the hinge always active), against the same updates without it; TSCD alone pulls toward the teacher, whose mean
    is brighter (0.40 against the student's -0.34). Measured (these seeds): the 1-step samples' darkness goes
    0.339 -> 0.551 with ReFL and 0.339 -> 0.010 without (2 steps: 0.338 -> 0.549 and 0.009)."""
    results = {}
    for weight in (None, 1.0):
        obj, teacher_model, _ = hyper(weight, reward="test_reward:darkness", reward_margin=10.0)
        opt = torch.optim.Adam(obj.student.parameters(), lr=2e-2)
        start = (sample_darkness(obj, 1), sample_darkness(obj, 2))
        x = teacher_model.sample_true(64, torch.Generator().manual_seed(1))
        torch.manual_seed(0)
        for step in range(20):
            obj.step = step
            loss, _ = obj.generator_loss(x)
            opt.zero_grad()
            loss.backward()
            opt.step()
        results[weight] = start, (sample_darkness(obj, 1), sample_darkness(obj, 2))
    (start, plain), (start_refl, refl) = results[None], results[1.0]
    assert start_refl == start and 0.3 < start[0] < 0.4  # the same student at the start
    assert refl[0] > start[0] + 0.15 and refl[1] > start[1] + 0.15  # ReFL raises the reward at 1 and 2 steps
    assert plain[0] < start[0] - 0.2 and plain[1] < start[1] - 0.2  # where TSCD alone lowers it


def test_clip_reward_is_open_clips_cosine_and_differentiable(tiny_clip, tmp_path):
    """At the model's size the reward is open_clip's own image-text cosine of (x / 2 + 1/2 - mean) / std; on grey 16x16
    images (resized, 3 channels) a few gradient steps on the pixels raise it."""
    import open_clip

    config, weights = tiny_clip
    reward = ClipReward(config, weights, "a photo of a shoe")
    model = open_clip.create_model(TINY_CLIP_NAME, pretrained=weights).eval()
    images = torch.rand(4, 3, 32, 32) * 1.8 - 0.9
    mean, std = torch.tensor(model.visual.preprocess_cfg["mean"]), torch.tensor(model.visual.preprocess_cfg["std"])
    with torch.no_grad():
        img = F.normalize(model.encode_image((images / 2 + 0.5 - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)), dim=-1)
        txt = F.normalize(model.encode_text(open_clip.get_tokenizer(TINY_CLIP_NAME)(["a photo of a shoe"])), dim=-1)
        # the same float32 encoders on the same inputs (measured equal); slack: a 32-term dot product of unit vectors
        assert ((reward(images) - (img @ txt[0])).abs() <= 32 * EPS32).all()
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot load CLIP"):  # an unreadable file: one line
        ClipReward(config, str(bad), "a photo")
    grey = (torch.rand(4, 1, 16, 16) - 0.5).requires_grad_(True)
    before = reward(grey).detach()
    for _ in range(5):
        (grad,) = torch.autograd.grad(reward(grey).sum(), grey)
        grey = (grey + 0.05 * grad / grad.abs().max()).detach().requires_grad_(True)
    assert (reward(grey) > before).all()
    assert not any(p.requires_grad for p in reward.parameters())


def test_latent_teachers_reward_sees_decoded_images():
    """With the VAE handed down (as the trainer does for latent teachers) the reward scores
    ``vae.decode(x0 / scale + shift)``, and the gradient reaches the latent x0 through the decoder."""
    import tiny_pipelines as tp
    from fastdiff.models.latent import Latents

    latents = Latents(tp.vae())
    term = RewardFeedback(SPEC, 1.0)
    term.latents = latents
    x0 = torch.randn(2, 4, 8, 8, requires_grad=True)
    images = term.images(x0)
    with torch.no_grad():
        want = latents.vae.decode(x0 / latents.scale + latents.shift, return_dict=False)[0]
    assert images.shape == want.shape and images.shape[-1] == 8 * latents.factor and torch.equal(images, want)
    (grad,) = torch.autograd.grad(brightness(images).sum(), x0)
    assert torch.isfinite(grad).all() and grad.abs().max() > 0


SEEN = []


def probed_brightness(images: torch.Tensor, cond=None) -> torch.Tensor:
    """brightness, recording what the reward was given (the trainer run below reads it back)."""
    SEEN.append((tuple(images.shape), images.requires_grad))
    return brightness(images)


@pytest.mark.parametrize("latent", [False, True])
def test_build_objective_hands_the_vae_down(latent):
    """The trainer's build_objective gives the ReFL term the teacher's VAE wrapper (None for a pixel teacher)."""
    from types import SimpleNamespace

    import tiny_pipelines as tp
    from fastdiff.config import load_config
    from fastdiff.models.latent import Latents
    from fastdiff.training.setup import build_objective

    obj, _, _ = hyper(None)
    teacher = SimpleNamespace(denoiser=obj.teacher, latents=Latents(tp.vae()) if latent else None)
    cfg = load_config(None, ["objective.name=hyper-sd", f"objective.reward={SPEC}", "objective.reward_weight=0.5"])
    built = build_objective(cfg, teacher, None, obj.student)
    assert built.refl.weight == 0.5 and built.refl.latents is teacher.latents


@pytest.mark.slow
def test_trainer_hands_the_vae_down_on_a_latent_teacher(tmp_path):
    """fastdiff distill on a tiny SD pipeline with ReFL: the reward sees decoded 3-channel images at the VAE's size,
    with gradient, and the run logs the ReFL loss and reward."""
    import json

    import tiny_pipelines as tp
    from test_text_to_image import distill

    SEEN.clear()
    sd = str(tp.sd_pipeline(tmp_path / "sd"))
    out = distill(sd, tmp_path / "run", "objective.name=hyper-sd", "objective.segments=[2,1]",
                  "objective.stage_steps=[1]", "data.name=imagefolder", f"data.path={tp.caption_folder(tmp_path / 'img')}",
                  "student.sampler=ddim", "objective.reward=test_reward:probed_brightness", "objective.reward_weight=1.0")
    rows = [json.loads(line) for line in (out.parent / "metrics.jsonl").read_text().splitlines()]
    assert all("loss_refl" in r and "reward" in r for r in rows) and [r["segments"] for r in rows][:2] == [2, 1]
    latent = tp.LATENT
    assert SEEN and all(shape[1:] == (3, latent * 2, latent * 2) and grad for shape, grad in SEEN), SEEN


@pytest.mark.parametrize("options, message", [
    ({"reward_weight": 0.1}, "needs objective.reward"),
    ({"reward": SPEC, "reward_weight": -1.0}, "must be >= 0"),
    ({"reward": "brightness", "reward_weight": 1.0}, "clip or module:function"),
    ({"reward": "test_reward:nothing", "reward_weight": 1.0}, "has no attribute"),
    ({"reward": "clip", "reward_weight": 1.0, "reward_path": "/nonexistent.safetensors"}, "local weights file"),
])
def test_bad_reward_options(options, message):
    obj, _, _ = hyper(None)
    with pytest.raises(ValueError, match=message):
        build("hyper-sd", obj.teacher, None, student=obj.student, num_intervals=8, **options)
