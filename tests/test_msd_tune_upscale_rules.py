"""Rules of multi-student distillation (k-means seeding, prompt clustering, the teacher-score-matching warm-up), of
``fastdiff tune`` (what PSO is fed) and of ``fastdiff upscale`` (PSNR, the low-res inputs, the stage-1 target, the
input checks) that the end-to-end tests do not pin down: each test here fails on a plausible bug in that rule."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fastdiff.errors import FastdiffError
from fastdiff.training import msd_text
from fastdiff.training.msd_text import cluster_prompts, kmeans

from test_pso import tiny_student, write_targets  # noqa: F401  (tiny_student: a module fixture, used below)
from test_upscale import image_folder, tiny_upscaler
from test_attention import xformers_stubbed  # noqa: F401  (a fixture, used below)


# --- msd ------------------------------------------------------------------------------------------------------------
def test_an_exported_student_counts_as_finished_only_for_its_own_classes(tmp_path):
    """A rerun of fastdiff msd keeps a student's export only when it was trained on the part the new partition
    gives it; an export of other classes (another partition over the same folder) is not finished."""
    from fastdiff.config import Config, _apply
    from fastdiff.training.msd import _finished

    run = tmp_path / "student-0"
    (run / "student").mkdir(parents=True)
    (run / "student" / "fastdiff.json").write_text("{}")
    (run / "config.yaml").write_text("student:\n  classes: [0, 1]\n")
    for classes, finished in (([0, 1], True), ([2], False), ([0], False)):
        child = Config()
        _apply(child, {"student": {"classes": classes}})
        assert _finished(run, child) is finished, classes


def test_partition_route_sends_each_class_to_the_student_whose_part_holds_it():
    """The router's table (``class_to_student``) is each class's part index: [[2], [0, 1]] routes classes 0 and 1 to
    student 1 and class 2 to student 0 (a reversed table, caught before only by the slow end-to-end test)."""
    from fastdiff.training.msd import check_partition

    assert check_partition([[2], [0, 1]], 3) == [1, 1, 0]
    assert check_partition([[0, 3], [1], [2, 4]], 5) == [0, 1, 2, 0, 2]


# --- msd_text -------------------------------------------------------------------------------------------------------
def test_kmeans_plus_plus_draws_the_second_centre_with_probability_proportional_to_squared_distance():
    """Rows 0, 1, 3 on a line; max_iter=0 returns the k-means++ seeding itself. Whenever the first centre is row 0,
    the second is row 2 with probability D^2-weighted 9 / (1 + 9) = 0.9 (D-weighted it would be 3 / 4). Over the
    seeds whose first centre is row 0 (~1/3 of 600: ~200 draws, standard deviation of the frequency ~0.021), the
    frequency is within 0.06 (~3 sd) of 0.9 and far from 0.75."""
    x = torch.tensor([[0.0], [1.0], [3.0]], dtype=torch.float64)
    picks = []
    for seed in range(600):
        _, centroids = kmeans(x, 2, seed, max_iter=0)
        if float(centroids[0, 0]) == 0.0:
            picks.append(float(centroids[1, 0]) == 3.0)
    assert len(picks) > 120
    assert abs(np.mean(picks) - 0.9) < 0.06, np.mean(picks)


def test_a_prompt_repeated_before_the_others_is_clustered_by_its_own_feature(monkeypatch):
    """cluster_prompts clusters the distinct prompts: a prompt repeated at the head of the file must not shift the
    features of the prompts after it. Features (1-D): b = 0, a = 10, c = 10.5, so k = 2 gives {b} and {a, c}."""
    feature = {"b": 0.0, "a": 10.0, "c": 10.5}
    monkeypatch.setattr(msd_text, "text_features",
                        lambda pipe, prompts: torch.tensor([[feature[p]] for p in prompts], dtype=torch.float64))
    parts = cluster_prompts(None, ["b", "b", "b", "a", "c", "b"], 2, seed=0)
    assert sorted(map(sorted, parts)) == [["a", "c"], ["b", "b", "b", "b"]]


def _student_run(run: Path, export_from: Path, prompts: list[str]) -> None:
    """A finished SD student run as assemble_text_router reads it: student/ (the pipeline), fastdiff.json,
    config.yaml naming its prompts file."""
    import shutil

    shutil.copytree(export_from, run / "student")
    (run / "student" / "fastdiff.json").write_text(json.dumps({
        "pipeline_class": "StableDiffusionPipeline", "num_steps": 1, "objective": "dmd2", "teacher": "tiny-sd"}))
    (run / "prompts.txt").write_text("\n".join(prompts) + "\n")
    (run / "config.yaml").write_text(f"data:\n  prompts: {run / 'prompts.txt'}\n")


def test_text_router_centroids_are_the_means_over_each_students_distinct_prompts(tmp_path):
    """A student's centroid is the mean routing feature of its distinct prompts (the k-means fixed point of the
    clustering, which counts each prompt once), however often a prompt repeats in its training file. Compared in
    float64 (features are float64 means; the same rows averaged: equal to ~1e-16 relative, 1e-12 is far above)."""
    import tiny_pipelines as tp
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    from fastdiff.training.msd_text import assemble_text_router, text_features

    sd = tp.sd_pipeline(tmp_path / "sd")
    parts = [["a red shoe", "a red shoe", "a red shoe", "a blue bag"], ["zzzz qqqq", "xxxx"]]
    runs = [tmp_path / f"student-{k}" for k in range(2)]
    for run, part in zip(runs, parts):
        _student_run(run, Path(sd), part)
    assemble_text_router(runs, tmp_path / "router")
    centroids = load_file(str(tmp_path / "router" / "students" / "diffusion_pytorch_model.safetensors"))["centroids"]
    pipe = StableDiffusionPipeline.from_pretrained(sd, safety_checker=None, requires_safety_checker=False)
    for k, part in enumerate(parts):
        expected = text_features(pipe, list(dict.fromkeys(part))).mean(0)
        assert torch.allclose(centroids[k].double(), expected, rtol=0, atol=1e-12 * float(expected.abs().max()))


# --- models/text.py ---------------------------------------------------------------------------------------------------
def test_prompt_cache_fills_up_to_max_cached_inclusive(tmp_path):
    """max_cached is the number of prompts the cache holds: exactly that many are cached, one more is encoded for its
    batch only (and equals the cached encoding)."""
    import tiny_pipelines as tp
    from diffusers import StableDiffusionPipeline

    from fastdiff.models.text import PromptEncoder

    pipe = StableDiffusionPipeline.from_pretrained(tp.sd_pipeline(tmp_path / "sd"), safety_checker=None,
                                                   requires_safety_checker=False)
    encoder = PromptEncoder(pipe, max_cached=2)
    encoder(["a red shoe", "a blue bag"])
    assert sorted(encoder.cache) == ["a blue bag", "a red shoe"]
    got = encoder(["a green shirt"])
    assert len(encoder.cache) == 2
    expected = PromptEncoder(pipe)(["a green shirt"])
    assert torch.equal(got["encoder_hidden_states"], expected["encoder_hidden_states"])


def test_prompt_files_skip_blank_lines(tmp_path):
    from fastdiff.models.text import read_prompts

    (tmp_path / "p.txt").write_text("a red shoe\n\n   \n  a blue bag  \n\n")
    assert read_prompts(tmp_path / "p.txt") == ["a red shoe", "a blue bag"]
    (tmp_path / "p.jsonl").write_text('{"prompt": "x"}\n\n{"text": "y"}\n')
    assert read_prompts(tmp_path / "p.jsonl") == ["x", "y"]


def test_pixart_micro_conditions_only_for_the_1024_pixel_transformer():
    """PixArt-alpha's transformer reads resolution / aspect ratio only at sample size 128 (1024 px with the x8 VAE):
    there they are the default image size (1024, 1024) and ratio 1, as its pipeline passes them; other sizes get
    None."""
    from types import SimpleNamespace

    from fastdiff.models.text import PromptEncoder

    encoder = PromptEncoder.__new__(PromptEncoder)  # only pipe and device are read
    encoder.device = torch.device("cpu")
    for size, expected in ((128, 1024), (32, None)):
        encoder.pipe = SimpleNamespace(transformer=SimpleNamespace(config=SimpleNamespace(sample_size=size)),
                                       vae_scale_factor=8)
        got = encoder._pixart_micro_conditions(3, torch.float32)
        if expected is None:
            assert got == {"resolution": None, "aspect_ratio": None}
        else:
            assert torch.equal(got["resolution"], torch.full((3, 2), 1024.0))
            assert torch.equal(got["aspect_ratio"], torch.ones(3, 1))


# --- msd_warmup -----------------------------------------------------------------------------------------------------
def _small_student(tmp_path):
    from diffusers import UNet2DModel

    torch.manual_seed(6)
    UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(4, 8), layers_per_block=1,
                down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                norm_num_groups=4, num_class_embeds=4).save_pretrained(tmp_path / "small")
    return str(tmp_path / "small")


def test_warm_up_regresses_the_teacher_at_noised_teacher_samples_of_the_students_classes(
        tiny_cond_teacher, tmp_path, monkeypatch):
    """With no update (steps=0), the held-out error is L_TSM itself: recorded from the teacher's calls, every
    condition is one of the student's classes, the noisy input is the teacher's DDIM sample plus sigma times unit
    Gaussian noise, and the error is mean_b w(sigma_b) |D_student - D_teacher|^2 with the teacher's own loss weight
    (recomputed here in float64; the float32 loss of 2 x 4 x 64 squares rounds to ~1e-6 relative, 1e-5 allowed)."""
    from fastdiff.inference import sampling
    from fastdiff.models.denoiser import Denoiser
    from fastdiff.models.teacher import load_model, load_teacher
    from fastdiff.training.msd_warmup import teacher_score_matching

    teacher = load_teacher(tiny_cond_teacher)
    real = teacher.denoiser
    samples, calls, inside = [], [], [False]
    ddim = sampling.ddim_sample

    def recording_ddim(denoiser, z, steps, cond=None, *a, **kw):
        inside[0] = True
        try:
            x0 = ddim(denoiser, z, steps, cond, *a, **kw)
        finally:
            inside[0] = False
        samples.append(x0)
        return x0

    def hook(module, args, output):
        if not inside[0]:
            calls.append((args, output))

    monkeypatch.setattr(sampling, "ddim_sample", recording_ddim)
    handle = real.register_forward_hook(hook)
    model = load_model(_small_student(tmp_path))
    try:
        result = teacher_score_matching(teacher, model, 0, 1e-3, 4, 0, [0, 2], eval_batches=2, teacher_steps=2)
    finally:
        handle.remove()
    assert len(samples) == len(calls) == 2
    student = Denoiser(model, real.schedule, real.prediction_type, teacher.null_class)
    errors = []
    for x0, ((x, sigma, cond), target) in zip(samples, calls):
        assert set(cond["class_labels"].tolist()) <= {0, 2}
        unit = ((x - x0) / sigma.view(-1, 1, 1, 1)).double()
        assert 0.8 < float(unit.std()) < 1.2, float(unit.std())  # 256 unit normals: sd of the std ~0.045
        with torch.no_grad():
            per_sample = ((student(x, sigma, cond).double() - target.double()) ** 2).flatten(1).mean(1)
        errors.append(float((real.loss_weight(sigma).double() * per_sample).mean()))
    expected = sum(errors) / len(errors)
    assert abs(result["error_before"] - expected) <= 1e-5 * expected, (result["error_before"], expected)


def test_warm_up_folder_is_kept_only_for_the_same_settings(tiny_cond_teacher, tmp_path):
    """A warm-up folder made with other settings (here another learning rate) is remade, not kept."""
    from fastdiff.config import load_config
    from fastdiff.training.msd_warmup import warm_up

    from test_export_e2e import FAST

    cfg = load_config(None, [f"teacher.path={tiny_cond_teacher}", f"output_dir={tmp_path / 'run'}", *FAST,
                             f"student.model={_small_student(tmp_path)}", "student.classes=[0, 2]",
                             "train.batch_size=2"])
    out = tmp_path / "warm"
    warm_up(cfg, 1, 1e-3, out, log=lambda *a: None)
    first = json.loads((out / "warmup.json").read_text())
    warm_up(cfg, 1, 1e-3, out, log=lambda *a: None)
    assert json.loads((out / "warmup.json").read_text()) == first  # same settings: kept
    warm_up(cfg, 1, 5e-2, out, log=lambda *a: None)
    assert json.loads((out / "warmup.json").read_text())["settings"]["lr"] == 5e-2  # other settings: remade


# --- tune -----------------------------------------------------------------------------------------------------------
def test_tune_feeds_pso_the_targets_and_the_frozen_students_samples(tiny_student, tmp_path, monkeypatch):
    """Offline PSO: every update's preferred images are targets, its references are sampled by the frozen initial
    student (the tuned one samples only the card's grid), the reference policy keeps the initial weights while the
    tuned one moves, and beta is the configured one."""
    from fastdiff.training import tune as tune_mod

    targets = torch.as_tensor(write_targets(tmp_path / "targets"), dtype=torch.float64)  # (4, 8, 8) in [-1, 1]
    made, sampled, fed = [], [], []
    original_generator, original_loss = tune_mod.student_generator, tune_mod.pso_loss

    def tagged_generator(loaded, info, levels=None):
        gen = original_generator(loaded, info, levels)
        name = ("frozen", "tuned")[len(made)]
        made.append(name)

        class Recording(type(gen)):
            def __call__(self, *a, **kw):
                sampled.append(name)
                return super().__call__(*a, **kw)

        gen.__class__ = Recording
        return gen

    def recording_loss(policy, reference, x_target, x_reference, sigma, noise, cond, beta):
        fed.append(dict(x_target=x_target.detach().clone(), beta=beta, same=policy.model is reference.model,
                        reference={n: p.detach().clone() for n, p in reference.model.named_parameters()},
                        policy={n: p.detach().clone() for n, p in policy.model.named_parameters()}))
        return original_loss(policy, reference, x_target, x_reference, sigma, noise, cond, beta)

    monkeypatch.setattr(tune_mod, "student_generator", tagged_generator)
    monkeypatch.setattr(tune_mod, "pso_loss", recording_loss)
    cfg = tune_mod.tune_config(["steps=3", "batch_size=2", "lr=1e-2", "beta=7", "num_sample_images=2"])
    tune_mod.tune(str(tiny_student), str(tmp_path / "targets"), str(tmp_path / "out"), cfg, device="cpu",
                  show_progress=False, log=lambda *a: None)
    assert made == ["frozen", "tuned"]
    assert sampled == ["frozen"] * 3 + ["tuned"]  # three updates' references, then the card's grid
    assert len(fed) == 3 and all(f["beta"] == 7 and not f["same"] for f in fed)
    for f in fed:  # PNG targets: uint8 / 127.5 - 1 in float32, within 1e-6 of the float64 values
        distance = (f["x_target"][:, 0].double()[:, None] - targets[None]).abs().flatten(2).max(-1).values
        assert (distance.min(1).values <= 1e-6).all()
        assert all(torch.equal(f["reference"][n], fed[0]["reference"][n]) for n in f["reference"])
    assert any(not torch.equal(fed[-1]["policy"][n], fed[0]["policy"][n]) for n in fed[0]["policy"])


def test_tune_class_label_must_be_one_of_the_students_classes(tiny_cond_teacher, tmp_path):
    from fastdiff.models.teacher import load_teacher
    from fastdiff.training.tune import Targets

    write_targets(tmp_path / "targets")
    loaded = load_teacher(tiny_cond_teacher)  # 3 classes
    assert Targets(str(tmp_path / "targets"), loaded, 2, "cpu").label == 2
    for bad in (3, -1, None):
        with pytest.raises(FastdiffError, match="class_label=K"):
            Targets(str(tmp_path / "targets"), loaded, bad, "cpu")


# --- upscale --------------------------------------------------------------------------------------------------------
def test_psnr_is_the_mean_over_images_of_ten_log10_of_one_over_the_mse():
    """Two images with known MSEs 1e-2 and 1e-4: 20 dB and 40 dB, mean 30 dB (float64 throughout; 1e-9 dB)."""
    from fastdiff.training.upscale import psnr

    b = torch.zeros(2, 3, 4, 4, dtype=torch.float64)
    a = torch.stack([torch.full((3, 4, 4), 0.1, dtype=torch.float64), torch.full((3, 4, 4), 0.01, dtype=torch.float64)])
    assert abs(psnr(a, b) - 30.0) < 1e-9
    assert abs(psnr(a[:1], b[:1]) - 20.0) < 1e-9


@pytest.fixture(scope="module")
def upscaler(tmp_path_factory):
    from fastdiff.training.upscale import load_upscaler

    root = tmp_path_factory.mktemp("upscaler")
    teacher = tiny_upscaler(root / "teacher")
    return teacher, load_upscaler(teacher), image_folder(root / "hr", n=4, size=24)


def test_upscale_inputs_are_one_noise_on_both_scales_and_the_student_scale_is_the_product(upscaler):
    """An x2 teacher with factor 3: the student's low-res input is the HR image downsampled x6 (2 * 3, not 2 + 3),
    and both inputs carry the same low-res noise eps' (Eq. 1 compares the two at equal noise)."""
    from fastdiff.training.upscale import UpscaleData, low_res

    _, pipe, folder = upscaler
    data = UpscaleData(folder, pipe, 24, 2, 3, 20, "", "cpu")
    assert data.student_scale == 6 and data.grid == (12, 12)
    idx = torch.tensor([0, 2])
    x, _, teacher_in, student_in, levels = data.batch(idx, torch.Generator().manual_seed(5))
    noise = torch.randn((2, 3, 12, 12), generator=torch.Generator().manual_seed(5))
    add = pipe.low_res_scheduler.add_noise
    assert torch.equal(teacher_in, add(low_res(x, 2, (12, 12)), noise, levels))
    assert torch.equal(student_in, add(low_res(x, 6, (12, 12)), noise, levels))


@pytest.mark.parametrize("target", ["teacher", "data"])
def test_stage_one_target_is_the_teacher_or_the_data(upscaler, target, monkeypatch):
    """target=teacher distils from the frozen teacher UNet; target=data is the paper's baseline: no teacher."""
    import copy

    from fastdiff.training import upscale as up

    _, pipe, folder = upscaler
    data = up.UpscaleData(folder, pipe, 16, 2, 2, 20, "", "cpu")
    teachers = []
    original = up.scale_distill_loss

    def recording(student, teacher, *a, **kw):
        teachers.append(teacher)
        return original(student, teacher, *a, **kw)

    monkeypatch.setattr(up, "scale_distill_loss", recording)
    cfg = up.upscale_config(["steps=1", "batch_size=1", f"target={target}"])
    up.distill_scale(pipe, copy.deepcopy(pipe.unet), data, cfg, torch.Generator().manual_seed(0), False)
    assert teachers == [pipe.unet if target == "teacher" else None]



def test_decoder_stage_decodes_the_one_step_latent_divided_by_the_vae_scaling_factor(upscaler, monkeypatch):
    """Stage 2 (Eq. 2) decodes the student's one-step latent as the pipeline does, z0 / scaling_factor (0.08333 on
    the tiny x2 VAE, as on stabilityai's x4 upscaler). Decoding z0 itself trained the decoder on latents 12x too
    large, which only the slow PSNR test noticed."""
    import copy

    from fastdiff.training import upscale as up

    _, pipe, folder = upscaler
    data = up.UpscaleData(folder, pipe, 16, 2, 2, 20, "", "cpu")
    vae = copy.deepcopy(pipe.vae)
    z0 = torch.randn((1, vae.config.latent_channels, *data.grid), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = vae.decode(z0 / vae.config.scaling_factor, return_dict=False)[0]
    decoded = []
    monkeypatch.setattr(up, "one_step_latent", lambda *a, **kw: z0)
    monkeypatch.setattr(up, "decoder_loss", lambda image, x: decoded.append(image.detach()) or image.square().mean())
    cfg = up.upscale_config(["decoder_steps=1", "batch_size=1"])
    up.tune_decoder(copy.deepcopy(pipe.unet), vae, None, data, cfg, torch.Generator().manual_seed(0), False)
    assert vae.config.scaling_factor != 1 and len(decoded) == 1
    # The same decoder on the same input in one process: the same float32 operations, so equal up to the few ulps
    # autograd's graph recording could change in kernel choice (none on CPU); 1e-6 relative is 8 float32 ulps.
    torch.testing.assert_close(decoded[0], expected, rtol=1e-6, atol=1e-6 * float(expected.abs().max()))


def test_evaluation_timesteps_spread_over_the_schedule_rounded_to_the_nearest(upscaler):
    """The fixed evaluation set's timesteps are linspace(0, T - 1, n) rounded (499.5 -> 500 at n = 3, T = 1000),
    not floored, so the set is symmetric about the middle of the schedule."""
    from fastdiff.training import upscale as up

    _, pipe, folder = upscaler
    data = up.UpscaleData(folder, pipe, 16, 2, 2, 20, "", "cpu")
    evaluation = up.Evaluation(data, 3, 0, up.one_step_scheduler(pipe.scheduler.config))
    T = pipe.scheduler.config.num_train_timesteps
    assert (T - 1) % 2 == 1  # the middle one lies half-way between two timesteps: rounding and flooring differ
    assert evaluation.t.tolist() == [0, round((T - 1) / 2), T - 1]

def test_upscale_checks_resolution_and_noise_level_bounds(upscaler, tmp_path):
    """resolution 18 with factor 3 is a multiple of 6 but its low-res grid (9) is not a multiple of the VAE factor:
    refused. noise_level is allowed up to the pipeline's max_noise_level (350) inclusive, not beyond."""
    from fastdiff.training.upscale import upscale, upscale_config

    teacher, _, folder = upscaler
    quiet = dict(device="cpu", show_progress=False, log=lambda *a: None)
    with pytest.raises(FastdiffError, match="must be a multiple of 6"):
        upscale(teacher, folder, str(tmp_path / "a"), upscale_config(["factor=3", "resolution=18"]), **quiet)
    with pytest.raises(FastdiffError, match="noise_level must be in"):
        upscale(teacher, folder, str(tmp_path / "b"), upscale_config(["noise_level=351"]), **quiet)
    cfg = upscale_config(["noise_level=350", "steps=0", "decoder_steps=0", "num_eval_images=1"])
    out = upscale(teacher, folder, str(tmp_path / "c"), cfg, **quiet)
    assert json.loads((Path(out) / "fastdiff.json").read_text())["noise_level"] == 350


# --- models/layer_skip.py, models/attention.py ------------------------------------------------------------------------
def test_dual_attention_indices_follow_the_kept_blocks_when_an_earlier_block_is_dropped(tmp_path):
    """SD3.5-style dual attention on block 2 of 0..3; dropping block 0 makes it block 1 of the kept three. The
    reloaded transformer equals the one with block 0 replaced by the identity (float64, same operations: equal)."""
    import copy

    import diffusers as d

    from fastdiff.models.layer_skip import drop_blocks
    from test_layer_skip import _t, with_identities

    torch.manual_seed(0)
    x, t, text = torch.randn(2, 4, 8, 8), _t(10, 500), torch.randn(2, 7, 32)
    model = d.SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, num_layers=4, attention_head_dim=8,
                                    num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32,
                                    pooled_projection_dim=16, out_channels=4, dual_attention_layers=(2,)
                                    ).double().eval()
    inputs = dict(hidden_states=x.double(), encoder_hidden_states=text.double(),
                  pooled_projections=torch.randn(2, 16).double(), timestep=t)
    student = drop_blocks(copy.deepcopy(model), [0])
    assert tuple(student.config.dual_attention_layers) == (1,)
    student.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path).double().eval()
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).sample, with_identities(model, [0])(**inputs).sample)


def test_a_module_with_only_a_q_norm_has_no_xformers_twin():
    """The plain xformers processor applies neither norm: one q (or k) norm alone already rules it out."""
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0, XFormersAttnProcessor

    from fastdiff.models import attention as A

    for drop in ("norm_k", "norm_q"):
        module = Attention(16, heads=2, dim_head=8, qk_norm="rms_norm")
        setattr(module, drop, None)
        assert A.classic_targets(module) == (AttnProcessor2_0, None)
    assert A.classic_targets(Attention(16, heads=2, dim_head=8)) == (AttnProcessor2_0, XFormersAttnProcessor)


def test_xformers_switch_is_not_used_when_a_module_has_no_twin(xformers_stubbed):
    """An SD UNet with one module on a processor of its own (no xformers twin): diffusers' model-wide xformers switch
    would map that module too, so the twinned modules are set through set_attn_processor and the other keeps its
    processor, counted as untouched."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    from fastdiff.models import attention as A
    from test_attention import build

    class OwnProcessor(AttnProcessor2_0):
        pass

    calls, dispatcher = xformers_stubbed
    dispatcher(True)
    model, _ = build("sd")
    name, own = A.attention_modules(model)[0]
    own.set_processor(OwnProcessor())
    with pytest.warns(UserWarning, match="1 modules on their own processors"):
        setting = A.set_attention(model, "xformers")
    assert calls == [] and setting == (0, 7, 1, ("set_attn_processor",)), (calls, setting)
    assert type(own.processor) is OwnProcessor


def test_an_emptied_kmeans_cluster_restarts_at_the_row_farthest_from_its_own_centroid():
    """k-means' restart rule (hard to reach through ``kmeans`` itself: random cases never empty a cluster in a way
    that changes the result): squared distances to the own centroid 1, 25, 4, 0 here, so row 1, not the nearest."""
    from fastdiff.training.msd_text import farthest_row

    x = torch.tensor([[1.0, 0.0], [0.0, 5.0], [12.0, 0.0], [10.0, 0.0]], dtype=torch.float64)
    centroids = torch.tensor([[0.0, 0.0], [10.0, 0.0]], dtype=torch.float64)
    assert farthest_row(x, centroids, torch.tensor([0, 0, 1, 1])) == 1


def test_overwrite_removes_only_the_students_beyond_the_new_partition(tmp_path):
    """``fastdiff msd --overwrite`` with 2 parts where 4 students were: student-2, student-3 and student-2-warmup go
    (with K == the new count among them); student-0, student-1, their warm-up and anything not a student run stay."""
    from fastdiff.training.msd import remove_extra_students

    names = ["student-0", "student-1", "student-1-warmup", "student-2", "student-2-warmup", "student-3", "student-x"]
    for name in names:
        (tmp_path / name).mkdir()
    (tmp_path / "student-9.txt").write_text("a file, not a run")
    remove_extra_students(tmp_path, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student-0", "student-1", "student-1-warmup", "student-9.txt",
                                                           "student-x"]
