"""PSO (objectives/pso.py, training/tune.py): the loss against Diffusion-DPO's, its gradient in closed form, and
``fastdiff tune`` end to end: distil, tune toward a folder of targets, export, reload with diffusers."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMPipeline, DDPMScheduler
from PIL import Image

from fastdiff.cli import main
from fastdiff.pipelines import FastdiffClassConditionalPipeline
from fastdiff.models.denoiser import Denoiser
from fastdiff.models.schedule import schedule_from_scheduler
from fastdiff.objectives.pso import pair_losses, pso_loss
from fastdiff.models.teacher import load_teacher

from conftest import by_default, tiny_unet
from test_export_e2e import assert_pipeline_matches, distill, fastdiff_images, image_bound, write_fake_fashion_mnist


def diffusion_dpo_loss(model_pred, ref_pred, target, beta_dpo):
    """Transcribed from SalesforceAIResearch/DiffusionDPO train.py (train_method 'dpo'): the first half of the batch
    is preferred (y_w), the second unpreferred (y_l), with the same noise and timestep; the MSE is on the network's
    own target (the noise, for its epsilon UNets)."""
    model_losses = (model_pred - target).pow(2).mean(dim=[1, 2, 3])
    model_losses_w, model_losses_l = model_losses.chunk(2)
    model_diff = model_losses_w - model_losses_l
    ref_losses = (ref_pred - target).pow(2).mean(dim=[1, 2, 3])
    ref_losses_w, ref_losses_l = ref_losses.chunk(2)
    ref_diff = ref_losses_w - ref_losses_l
    scale_term = -0.5 * beta_dpo
    inside_term = scale_term * (model_diff - ref_diff)
    return -1 * F.logsigmoid(inside_term).mean()


def test_pair_losses_equal_diffusion_dpo_in_float64():
    g = torch.Generator().manual_seed(0)
    target = torch.randn(6, 2, 3, 3, generator=g, dtype=torch.float64)
    model_pred = target + 0.3 * torch.randn(6, 2, 3, 3, generator=g, dtype=torch.float64)
    ref_pred = target + 0.3 * torch.randn(6, 2, 3, 3, generator=g, dtype=torch.float64)
    expected = diffusion_dpo_loss(model_pred, ref_pred, target, 20.0)
    ours = pair_losses((model_pred - target).square().flatten(1).mean(1),
                       (ref_pred - target).square().flatten(1).mean(1), 20.0).mean()
    assert 0.1 < float(expected) < 5  # the sigmoid is neither saturated nor flat here: a real comparison
    assert torch.allclose(ours, expected, rtol=1e-13, atol=0)  # float64, a dozen operations


class LinearEps(torch.nn.Module):
    """eps_hat = W x on the flattened native input (timestep ignored): a network whose gradient has a closed form."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = torch.nn.Parameter(weight.clone())

    def forward(self, sample, timestep, return_dict=False):
        return ((sample.flatten(1) @ self.weight.T).view_as(sample),)


def tiny_case():
    """A student and a frozen reference (different weights), 3 pairs of 1x2x2 images at two VP levels."""
    g = torch.Generator().manual_seed(1)
    schedule = schedule_from_scheduler(DDPMScheduler())
    w0 = torch.eye(4) + 0.2 * torch.randn(4, 4, generator=g)
    student = Denoiser(LinearEps(w0 + 0.1 * torch.randn(4, 4, generator=g)), schedule, "epsilon")
    reference = Denoiser(LinearEps(w0), schedule, "epsilon")
    x_target, x_reference = torch.randn(3, 1, 2, 2, generator=g), torch.randn(3, 1, 2, 2, generator=g)
    sigma = torch.tensor([0.5, 2.5, 2.5])
    noise = torch.randn(3, 1, 2, 2, generator=g)
    return student, reference, x_target, x_reference, sigma, noise


def native_inputs(x0, sigma, noise):
    """a x0 + s eps in float64, with a = 1 / sqrt(1 + sigma^2), s = sigma a (the VE -> native map)."""
    a = (1 / torch.sqrt(1 + sigma.double() ** 2)).view(-1, 1, 1, 1)
    return a * x0.double() + sigma.double().view(-1, 1, 1, 1) * a * noise.double()


def test_pso_loss_on_a_student_equals_diffusion_dpo_on_its_eps_predictions():
    student, reference, x_target, x_reference, sigma, noise = tiny_case()
    beta = 30.0
    loss, logs = pso_loss(student, reference, x_target, x_reference, sigma, noise, beta=beta)
    # Diffusion-DPO on the raw eps predictions of the same inputs, in float64: the student's x0 / weight route is
    # checked against the network's own target (the noise), an independent path.
    x = torch.cat([native_inputs(x_target, sigma, noise), native_inputs(x_reference, sigma, noise)])
    pred = lambda d: (x.flatten(1) @ d.model.weight.detach().double().T).view_as(x)  # noqa: E731
    expected = diffusion_dpo_loss(pred(student), pred(reference), noise.double().repeat(2, 1, 1, 1), beta)
    assert 0.1 < float(expected) < 5
    # float32: x0 = (x - s eps_hat) / a and back, ~10 operations on values of magnitude <= 10 (1 / a at sigma 2.5
    # is 2.7), then the errors' differences times beta / 2 = 15: 1.2e-7 * 10 * 10 * 15 = 1.8e-4 on the loss, of
    # magnitude ~0.7; 5e-5 relative is well inside it (measured 7e-7) and far below any formula error (dropping the
    # weight moves the loss 48%).
    assert abs(loss.item() - expected.item()) <= 5e-5 * expected.item(), (loss.item(), expected.item())
    assert float(logs["pso_implicit_acc"]) in (0.0, 1 / 3, 2 / 3, 1.0)


def test_pso_gradient_matches_the_closed_form():
    student, reference, x_target, x_reference, sigma, noise = tiny_case()
    beta = 30.0
    loss, _ = pso_loss(student, reference, x_target, x_reference, sigma, noise, beta=beta)
    loss.backward()
    grad = student.model.weight.grad.double()

    # Closed form in float64: e(W) = mean_j (eps - W x)_j^2 has de/dW = -(2/n) (eps - W x) x^T; the pair loss
    # L_i = -log sigmoid(u_i), u_i = -beta/2 (Delta+_i - Delta-_i),
    # so dL_i/dW = (1 - sigmoid(u_i)) beta/2 (de+/dW - de-/dW)
    # (the reference's errors are constants); the loss is the mean over pairs.
    w, w0 = student.model.weight.detach().double(), reference.model.weight.detach().double()
    eps = noise.double().flatten(1)
    xs = [native_inputs(x0, sigma, noise).flatten(1) for x0 in (x_target, x_reference)]
    err = lambda m, x: ((eps - x @ m.T) ** 2).mean(1)  # noqa: E731
    de_dw = lambda x: torch.stack([-(2 / 4) * torch.outer(eps[i] - w @ x[i], x[i]) for i in range(3)])  # noqa: E731
    u = -beta / 2 * ((err(w, xs[0]) - err(w0, xs[0])) - (err(w, xs[1]) - err(w0, xs[1])))
    coef = (1 - torch.sigmoid(u)) * beta / 2
    expected = (coef.view(-1, 1, 1) * (de_dw(xs[0]) - de_dw(xs[1]))).mean(0)
    assert float(expected.abs().max()) > 0.1  # a gradient worth comparing
    # float32 forward and backward of ~20 operations on values <= 10, scaled by beta / 2 = 15:
    # 1.2e-7 * 20 * 10 * 15 = 3.6e-4 absolute bound, relative to the gradient's largest entry (measured 1.5e-6 on 2.05).
    assert float((grad - expected).abs().max()) <= 3.6e-4 * max(1.0, float(expected.abs().max())), (grad, expected)


# --- fastdiff tune end to end ---------------------------------------------------------------------------------------

def write_targets(folder: Path, n: int = 4, size: int = 8) -> np.ndarray:
    """n grey-scale targets: a bright centred square on black, slightly different each. Returns them in [-1, 1]."""
    folder.mkdir(parents=True)
    images = []
    for i in range(n):
        img = np.zeros((size, size), dtype=np.uint8)
        img[2:6, 2:6] = 200 + 15 * i
        Image.fromarray(img).save(folder / f"t{i}.png")
        images.append(img.astype(np.float64) / 127.5 - 1)
    return np.stack(images)


def distance_to_targets(folder, targets: np.ndarray, steps: int, n: int = 64) -> float:
    """Mean over n samples (seed 5) of the RMS distance to the nearest target image, in [-1, 1] units."""
    samples = fastdiff_images(folder, steps, 5, n)[..., 0] * 2 - 1  # NHWC in [0, 1] -> [-1, 1]
    d = np.sqrt(((samples[:, None] - targets[None]) ** 2).mean(axis=(2, 3)))
    return float(d.min(axis=1).mean())


def tune_cli(student, targets, out, *settings, extra=()) -> None:
    args = ["tune", str(student), "--targets", str(targets), "--out", str(out), "--quiet", *extra]
    for item in settings:
        args += ["--set", item]
    assert main(args) == 0


def assert_tuned_export(student: Path, out: Path, labels=None) -> None:
    """The tuned folder: the student's layout and card plus the tune's settings, no local path, and diffusers'
    pipeline equal to fastdiff's sampler at 1 and 2 steps; its images differ from the untuned student's."""
    info = json.loads((out / "fastdiff.json").read_text())
    before = json.loads((student / "fastdiff.json").read_text())
    assert info["tuned"]["method"] == "pso" and info["tuned"]["targets"] == "targets"
    assert {k: info[k] for k in ("num_steps", "objective", "sampler", "top_timestep")} == \
        {k: before[k] for k in ("num_steps", "objective", "sampler", "top_timestep")}
    # the same teacher, named relative to the new folder
    assert (out / info["teacher_folder"]).resolve() == (student / before["teacher_folder"]).resolve()
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in student.iterdir())  # same layout
    assert "tune.pso" in (out / "README.md").read_text()
    assert str(out.parent.resolve()) not in (out / "fastdiff.json").read_text()  # no local absolute path
    n = 3 if labels is None else len(labels)
    for steps in (1, 2):
        rng = torch.Generator().manual_seed(11)
        if labels is None:
            ref = DDPMPipeline.from_pretrained(out)(batch_size=n, num_inference_steps=steps, output_type="np",
                                                    generator=rng).images
        else:
            ref = FastdiffClassConditionalPipeline.from_pretrained(out)(class_labels=labels, num_inference_steps=steps,
                                                                      output_type="np", generator=rng).images
        # [0, 1] images: the same network on the same inputs, float32 differences of a few operations (image_bound;
        # measured at most 2.4e-7)
        assert np.abs(fastdiff_images(out, steps, 11, n, labels) - ref).max() <= image_bound(out, n, 11)
    moved = np.abs(fastdiff_images(out, 2, 11, n, labels) - fastdiff_images(student, 2, 11, n, labels)).max()
    assert moved > 1e-3, moved  # the export holds the tuned weights, not the student's


@pytest.fixture(scope="module")
def tiny_student(tiny_teacher, tmp_path_factory) -> Path:
    """A two-step dmd2 student of the tiny epsilon teacher, distilled two updates and exported."""
    run = distill(tiny_teacher, tmp_path_factory.mktemp("pso") / "run", "student.num_steps=2",
                  "train.lr_generator=1e-3", "train.lr_warmup_steps=0")
    return run / "student"


def test_tune_exports_a_student_that_diffusers_reproduces(tiny_student, tmp_path):
    write_targets(tmp_path / "targets")
    out = tmp_path / "tuned"
    tune_cli(tiny_student, tmp_path / "targets", out, "steps=3", "lr=1e-3", "batch_size=2")
    assert_tuned_export(tiny_student, out)


@pytest.mark.slow
def test_tune_a_class_conditional_student(tiny_cond_teacher, tmp_path):
    student = distill(tiny_cond_teacher, tmp_path / "run", "student.num_steps=2", "train.lr_generator=1e-3",
                      "train.lr_warmup_steps=0") / "student"
    write_targets(tmp_path / "targets")
    assert main(["tune", str(student), "--targets", str(tmp_path / "targets"), "--quiet"]) == 2  # no class_label
    tune_cli(student, tmp_path / "targets", tmp_path / "tuned", "steps=3", "lr=1e-3", "batch_size=2", "class_label=1")
    assert_tuned_export(student, tmp_path / "tuned", labels=[0, 1, 2])


@pytest.mark.slow
def test_tuning_moves_the_samples_toward_the_targets(tmp_path):
    """A student that starts grey (an x0-predicting tiny UNet with a zero output layer: every sample is 0) tuned
    toward bright squares on black. Measured (seed 0, 40 updates, lr 1e-3, beta 5, batch 4, 2 steps): mean RMS distance
    of 64 samples to the nearest target 0.912 -> 0.659 offline, -> 0.249 online; beta 50: 0.647, Diffusion-DPO's
    5000: 0.871 (the sigmoid saturates within a few updates on pixel errors this size)."""
    unet = tiny_unet()
    torch.nn.init.zeros_(unet.conv_out.weight)
    torch.nn.init.zeros_(unet.conv_out.bias)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(prediction_type="sample", clip_sample=False)
                 ).save_pretrained(tmp_path / "teacher")
    student = distill(str(tmp_path / "teacher"), tmp_path / "run", "student.num_steps=2") / "student"
    targets = write_targets(tmp_path / "targets")
    before = distance_to_targets(student, targets, 2)
    after = {}
    for online in (False, True):
        out = tmp_path / f"tuned-{online}"
        tune_cli(student, tmp_path / "targets", out, "steps=40", "lr=1e-3", "beta=5", f"online={online}")
        after[online] = distance_to_targets(out, targets, 2)
    print(f"PSO: mean RMS distance to the nearest target {before:.3f} -> {after[False]:.3f} (offline), "
          f"{after[True]:.3f} (online)")
    assert before > 0.9  # grey samples: RMS ~0.94 from the targets
    assert after[False] < 0.8 * before and after[True] < 0.5 * before, (before, after)


def test_tune_a_guidance_embedded_student_at_one_scale(tiny_cond_teacher, tmp_path):
    """A student distilled for a range of CFG scales (objective.guidance_range: LCM's embedding, a
    GuidanceEmbeddedUNet) is tuned at one scale, its range's middle unless --set guidance_scale=W: the references are
    sampled and both networks told that scale (the network refuses a call without it). The export is the same
    FastdiffClassConditionalPipeline, equal to fastdiff's sampler at that scale, with that scale's images moved."""
    data = tmp_path / "fmnist"
    write_fake_fashion_mnist(data, size=6)
    from test_consistency import distill as distill_cd  # no critic keys: cd has no fake score

    student = distill_cd(tiny_cond_teacher, tmp_path / "run", "objective.name=cd", f"data.path={data}",
                         "objective.guidance_range=[1.0, 3.0]", "train.max_steps=1") / "student"
    write_targets(tmp_path / "targets")
    for name, extra in (("middle", ()), ("at-3", ("guidance_scale=3",))):
        out = tmp_path / name
        tune_cli(student, tmp_path / "targets", out, "steps=3", "lr=1e-3", "batch_size=2", "class_label=1", *extra)
        scale = 3.0 if extra else 2.0
        info = json.loads((out / "fastdiff.json").read_text())
        assert info["tuned"]["guidance_scale"] == info["settings"]["tune.pso"]["guidance_scale"] == scale
        assert f"guidance_scale={scale}" in (out / "README.md").read_text()  # the card's call shows it
        assert_pipeline_matches(out, labels=[0, 1, 2], guidance_scale=scale)
        moved = np.abs(fastdiff_images(out, 1, 11, 3, [0, 1, 2], scale)
                       - fastdiff_images(student, 1, 11, 3, [0, 1, 2], scale)).max()
        assert moved > 1e-3, (name, moved)
    # the same seed and targets, only the scale differs: the two tunes trained differently (a tune that ignored
    # the scale would give equal weights; found by review)
    assert any(not torch.equal(a, b) for a, b in zip(*(load_teacher(str(tmp_path / n)).model.state_dict().values()
                                                     for n in ("middle", "at-3"))))


def sampler_targets(denoiser, num_steps: int, shape=(1, 8, 8), levels="table") -> dict[float, torch.Tensor]:
    """{level sigma: the r the flow-map network is told there}, read from FlowMapGenerator.forward's own calls (a
    forward pre-hook records the embedding's pending r at each of its K network calls)."""
    from fastdiff.models.flow_map import FlowMapGenerator, flow_map_embedding

    generator = FlowMapGenerator(denoiser, num_steps, levels=levels)
    told = []
    hook = denoiser.model.register_forward_pre_hook(
        lambda module, args: told.append(flow_map_embedding(module).pending.clone()))
    try:
        with torch.no_grad():
            generator(torch.zeros(1, *shape, dtype=next(denoiser.model.parameters()).dtype))
    finally:
        hook.remove()
    levels = generator.levels(num_steps)
    assert len(told) == len(levels)
    return {float(sigma): r for sigma, r in zip(levels, told)}


def test_a_flow_map_student_is_scored_at_the_map_its_sampler_takes(tiny_teacher):
    """For a flow-map (meanflow) student, PSO's level k is a map step: inside tune.mapping_to_next_level both
    networks are told what FlowMapGenerator tells them at that level, and the loss equals the mean of the pairs'
    losses computed one by one, each network told that pair's r (as recorded from the sampler) by hand (float64: the
    same operations on other batch sizes, rel 1e-12); told the data end instead, the loss differs, so the level told
    is what is scored."""
    import copy

    from fastdiff.models.flow_map import add_flow_map_embedding, target_time
    from fastdiff.models.generator import step_sigmas
    from fastdiff.training.tune import mapping_to_next_level

    teacher = load_teacher(tiny_teacher)
    torch.manual_seed(0)
    networks = []
    for _ in range(2):  # student and frozen reference, their r embeddings random (zero would make r irrelevant)
        net = add_flow_map_embedding(copy.deepcopy(teacher.model)).double()
        torch.nn.init.normal_(net.flow_map_r.proj.weight, std=0.3)
        networks.append(net)
    student, reference = (Denoiser(n, teacher.denoiser.schedule, teacher.denoiser.prediction_type) for n in networks)
    levels = step_sigmas(student, 3)
    told = sampler_targets(student, 3)
    assert sorted(told) == sorted(float(s) for s in levels)
    k = torch.tensor([0, 1, 2, 1])
    x_target, x_reference, noise = (torch.randn(4, 1, 8, 8, dtype=torch.float64) for _ in range(3))
    with mapping_to_next_level(networks, student, levels, k):
        loss, _ = pso_loss(student, reference, x_target, x_reference, levels[k], noise, beta=50.0)
    by_hand = []
    for i in range(4):
        r = told[float(levels[k[i]])]
        with target_time(networks[0], r), target_time(networks[1], r):
            pair, _ = pso_loss(student, reference, x_target[i:i + 1], x_reference[i:i + 1], levels[k[i:i + 1]],
                               noise[i:i + 1], beta=50.0)
        by_hand.append(pair)
    assert loss.item() == pytest.approx(torch.stack(by_hand).mean().item(), rel=1e-12)
    with target_time(networks[0], torch.zeros(())), target_time(networks[1], torch.zeros(())):
        to_data, _ = pso_loss(student, reference, x_target, x_reference, levels[k], noise, beta=50.0)
    assert abs(to_data.item() - loss.item()) > 1e-6 * abs(loss.item())


@pytest.fixture(scope="module")
def meanflow_student(tiny_teacher, tmp_path_factory) -> Path:
    """A two-step meanflow student (one update) and a folder of targets beside it."""
    from test_consistency import distill as distill_consistency  # no critic keys: meanflow has no fake score

    root = tmp_path_factory.mktemp("meanflow_student")
    write_fake_fashion_mnist(root / "fmnist", size=6)
    write_targets(root / "targets")
    return distill_consistency(tiny_teacher, root / "run", "objective.name=meanflow", f"data.path={root / 'fmnist'}",
                               "data.resolution=8", "student.num_steps=2", "train.max_steps=1") / "student"


@pytest.fixture
def told_levels(monkeypatch) -> list:
    """Each pso_loss call of tune(): (its pairs' levels, the r each network is told then, the reference denoiser)."""
    from fastdiff.models.flow_map import flow_map_embedding
    from fastdiff.training import tune as tune_module

    calls = []

    def recording(student, reference, x_target, x_reference, sigma, *args, **kwargs):
        told = [flow_map_embedding(d.model).pending for d in (student, reference)]
        calls.append((sigma.clone(), *(None if r is None else r.clone() for r in told), reference))
        return pso_loss(student, reference, x_target, x_reference, sigma, *args, **kwargs)

    monkeypatch.setattr(tune_module, "pso_loss", recording)
    return calls


def assert_told_as_sampled(calls, levels: str, updates: int) -> set:
    """Every pair of every update was scored at one of the sampler's levels, both networks told the r the sampler
    tells them there; returns the levels scored."""
    assert len(calls) == updates
    expected = sampler_targets(calls[0][3], 2, levels=levels)
    for sigma, student_r, reference_r, _ in calls:
        want = torch.cat([expected[float(s)].reshape(-1) for s in sigma])
        assert student_r is not None and reference_r is not None
        assert torch.equal(student_r.reshape(-1), want) and torch.equal(reference_r.reshape(-1), want)
    return {float(s) for sigma, *_ in calls for s in sigma}


def test_tune_a_flow_map_student_for_every_step_count(meanflow_student, tmp_path, told_levels):
    """A two-step meanflow student tuned exports as the same FastdiffFlowMapPipeline folder, which diffusers samples
    at K = 1, 2, 4 as fastdiff's any-K sampler does (floats within image_bound), with its images moved from the
    student's. In every update both networks were told, for each pair, the r its sampler tells them at that pair's
    level (recorded as pso_loss is called)."""
    from fastdiff.pipelines import FastdiffFlowMapPipeline

    student, out = meanflow_student, tmp_path / "tuned"
    tune_cli(student, student.parent.parent / "targets", out, "steps=3", "lr=1e-3", "batch_size=2")
    info = json.loads((out / "fastdiff.json").read_text())
    assert info["flow_map"] and info["tuned"]["method"] == "pso" and info["num_steps"] == 2
    assert "timesteps" not in info["tuned"]
    assert_told_as_sampled(told_levels, "table", 3)
    pipe = FastdiffFlowMapPipeline.from_pretrained(out)
    for steps in (1, 2, 4):
        ref = pipe(batch_size=3, num_inference_steps=steps, generator=torch.Generator().manual_seed(11),
                   output_type="np").images
        assert np.abs(fastdiff_images(out, steps, 11, 3) - ref).max() <= image_bound(out, 3, 11), steps
    moved = np.abs(fastdiff_images(out, 2, 11, 3) - fastdiff_images(student, 2, 11, 3)).max()
    assert moved > 1e-3, moved


def test_tune_a_flow_map_student_on_its_flow_levels(meanflow_student, tmp_path, told_levels):
    """levels=flow: PSO scores the pairs on the flow levels (727 / 234 for this epsilon student, not the table's),
    the references are sampled on them, both networks told the r the flow-level sampler tells them; fastdiff.json and
    the card give the timesteps= that samples as tuned. A student that is no flow map refuses levels in one line."""
    from fastdiff.models.flow_map import FlowMapGenerator

    student, out = meanflow_student, tmp_path / "tuned"
    tune_cli(student, student.parent.parent / "targets", out, "steps=4", "lr=1e-3", "batch_size=2", "levels=flow")
    scored = assert_told_as_sampled(told_levels, "flow", 4)
    generator = FlowMapGenerator(told_levels[0][3], 2, levels="flow")
    assert scored <= {float(s) for s in generator.levels()} and len(scored) == 2  # 8 pairs: both drawn
    info = json.loads((out / "fastdiff.json").read_text())
    table = FlowMapGenerator(told_levels[0][3], 2).timesteps()
    assert info["tuned"]["timesteps"] == generator.timesteps() == [727, 234] != table  # table: [727, 363]
    assert "timesteps=[727, 234]" in (out / "README.md").read_text()


# SD by default; SDXL and SD3 (their re-export's only differences: the pipeline class and absent components, which
# test_flow_map_export checks on their first export) behind the slow marker
@pytest.mark.parametrize("kind", by_default(["sd", "sdxl", "sd3"], ["sd", "sdxl", "sd3"], {"sd"}))
def test_tune_a_text_to_image_flow_map_student(kind, tmp_path):
    """An SD / SDXL / SD3-style two-step meanflow student (its own FastdiffFlowMapSD*Pipeline folder) tuned toward
    captioned targets is re-exported as that folder, the teacher's components kept: `fastdiff sample`'s path gives the
    reloaded pipeline's uint8 images at K = 1, 2, 4, moved from the student's."""
    import importlib

    import tiny_pipelines as tp
    from test_flow_map_export import PIPELINES, sample_cli_images

    name, _, _, absent = PIPELINES[kind]
    teacher = str(getattr(tp, f"{kind}_pipeline")(tmp_path / kind))
    args = ["distill"]
    for item in [f"teacher.path={teacher}", f"output_dir={tmp_path / 'run'}", "train.max_steps=1",
                 "train.batch_size=2", "train.num_sample_images=2", "objective.name=meanflow", "student.num_steps=2",
                 "data.name=imagefolder", f"data.path={tp.caption_folder(tmp_path / 'images')}",
                 "train.lr_generator=1e-2", "train.ema_decay=0"]:
        args += ["--set", item]
    assert main(args) == 0
    student = tmp_path / "run" / "student"
    tp.caption_folder(tmp_path / "targets", n=4)
    out = tmp_path / "tuned"
    tune_cli(student, tmp_path / "targets", out, "steps=2", "lr=1e-3", "batch_size=2")
    info = json.loads((out / "fastdiff.json").read_text())
    assert info["pipeline_class"] == name and info["tuned"]["method"] == "pso"
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in student.iterdir())
    cls = getattr(importlib.import_module("fastdiff.pipelines"), name)
    tuned = sample_cli_images(out, cls.from_pretrained(out, **absent))
    before = sample_cli_images(student, cls.from_pretrained(student, **absent), steps=(2,))
    assert np.abs(tuned[2].astype(int) - before[2].astype(int)).max() > 0  # the tuned weights were exported


def test_a_flow_map_students_safety_checker_is_exported_and_kept_by_tune(tmp_path):
    """An SD teacher with a safety checker: its meanflow student's FastdiffFlowMapSDPipeline folder carries the
    checker, its feature extractor and requires_safety_checker, and so does the folder `fastdiff tune` re-exports
    (from the loaded student's components), the checker's weights the teacher's bit for bit; diffusers runs it
    (nsfw_content_detected is a list, not None as without a checker)."""
    from safetensors.torch import load_file

    import tiny_pipelines as tp
    from fastdiff.pipelines import FastdiffFlowMapSDPipeline

    teacher = tp.sd_pipeline(tmp_path / "sd", with_safety_checker=True)
    args = ["distill"]
    for item in [f"teacher.path={teacher}", f"output_dir={tmp_path / 'run'}", "train.max_steps=1",
                 "train.batch_size=2", "train.num_sample_images=2", "objective.name=meanflow", "student.num_steps=2",
                 "data.name=imagefolder", f"data.path={tp.caption_folder(tmp_path / 'images')}"]:
        args += ["--set", item]
    assert main(args) == 0
    student = tmp_path / "run" / "student"
    tp.caption_folder(tmp_path / "targets", n=4)
    out = tmp_path / "tuned"
    tune_cli(student, tmp_path / "targets", out, "steps=1", "lr=1e-3", "batch_size=2")
    weights = lambda folder: load_file(folder / "safety_checker" / "model.safetensors")  # noqa: E731
    theirs = weights(teacher)
    for folder in (student, out):
        index = json.loads((folder / "model_index.json").read_text())
        assert index["safety_checker"][1] == "StableDiffusionSafetyChecker", folder
        assert index["feature_extractor"][1] == "CLIPImageProcessor" and index["requires_safety_checker"], folder
        ours = weights(folder)
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), folder
    pipe = FastdiffFlowMapSDPipeline.from_pretrained(out)
    result = pipe(["a shirt"], num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np")
    assert result.nsfw_content_detected == [False]


def test_tune_refuses_bad_input_in_one_line(tiny_student, tiny_teacher, tmp_path, capsys):
    write_targets(tmp_path / "targets")
    (tmp_path / "empty").mkdir()
    cases = [
        (["tune", str(tiny_student), "--targets", str(tmp_path / "missing")], "is not a folder"),
        (["tune", str(tiny_student), "--targets", str(tmp_path / "empty")], "no images"),
        (["tune", tiny_teacher, "--targets", str(tmp_path / "targets")], "not an exported fastdiff student"),
        (["tune", str(tmp_path / "nowhere"), "--targets", str(tmp_path / "targets")], "is not a folder"),
        (["tune", str(tiny_student), "--targets", str(tmp_path / "targets"), "--set", "stepz=3"], "unknown config key"),
        (["tune", str(tiny_student), "--targets", str(tmp_path / "targets"), "--set", "beta=0"], "must be positive"),
        (["tune", str(tiny_student), "--targets", str(tmp_path / "targets"), "--set", "class_label=1"],
         "class_label is for class-conditional students"),
        (["tune", str(tiny_student), "--targets", str(tmp_path / "targets"), "--set", "guidance_scale=2"],
         "guidance_scale is for guidance-embedded students"),
        (["tune", str(tiny_student), "--targets", str(tmp_path / "targets"), "--set", "guidance_scale=nan"],
         "guidance_scale: expected a finite number"),
        (["tune", str(tiny_student), "--targets", str(tmp_path / "targets"), "--set", "levels=karras"],
         "levels 'karras': use table, flow or timesteps"),
        (["tune", str(tiny_student), "--targets", str(tmp_path / "targets"), "--set", "levels=flow"],
         "levels is for flow-map students"),
    ]
    for args, message in cases:
        assert main([*args, "--out", str(tmp_path / "out"), "--quiet"]) == 2, args
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / "out").exists()  # nothing written
    same = ["tune", str(tiny_student), "--targets", str(tmp_path / "targets"), "--out", str(tiny_student), "--quiet"]
    assert main([*same, "--overwrite"]) == 2 and "the student folder itself" in capsys.readouterr().err
    assert (tiny_student / "fastdiff.json").is_file()  # the student is left as it was


@pytest.mark.slow
def test_tune_a_text_to_image_latent_student(tmp_path):
    """SD-style student: targets VAE-encoded, references sampled with the targets' captions, exported as the same
    StableDiffusionPipeline folder, whose images equal fastdiff's sampler (uint8, as the text-to-image tests)."""
    import tiny_pipelines as tp
    from diffusers import StableDiffusionPipeline
    from test_text_to_image import assert_same, ours, theirs
    from test_text_to_image import distill as distill_t2i

    teacher = str(tp.sd_pipeline(tmp_path / "sd"))
    student = distill_t2i(teacher, tmp_path / "run", f"data.prompts={tp.prompts_file(tmp_path / 'p.txt')}",
                          "objective.critic_updates=1", "student.num_steps=2")
    tp.caption_folder(tmp_path / "targets", n=4)
    tune_cli(student, tmp_path / "targets", tmp_path / "tuned", "steps=3", "lr=1e-3", "batch_size=2")
    out = tmp_path / "tuned"
    info = json.loads((out / "fastdiff.json").read_text())
    assert info["pipeline_class"] == "StableDiffusionPipeline" and info["tuned"]["method"] == "pso"
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in student.iterdir())
    pipe = StableDiffusionPipeline.from_pretrained(out)
    for steps in (1, 2):
        assert_same(ours(out, steps), theirs(pipe, steps))
    assert not np.array_equal(ours(out, 2), ours(student, 2))  # the tuned weights were exported
