"""YONOS-SR scale distillation (``fastdiff upscale``): the losses against independent float64 computations, the
one-step read-out against diffusers' DDIM step, a tiny StableDiffusionUpscalePipeline distilled, exported and
reloaded through diffusers with equal images, and the measured effect of both stages on a tiny case."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import tiny_pipelines as tp
from fastdiff.objectives.scale_distill import (data_target, decoder_loss, predicted_latent, scale_distill_loss,
                                               upscale_forward)
from fastdiff.training.upscale import low_res, prepare_low_res, upscale_images

LATENT = 8  # the tiny UNet's sample size; the two-block VAE makes the teacher an x2 upscaler (HR 16 x 16)


def tiny_upscale_unet(seed: int = 0):
    """The x4 upscaler's UNet shape in miniature: 4 latent + 3 low-res channels in, the noise level as a class."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(block_out_channels=(16, 32), layers_per_block=1, sample_size=LATENT, in_channels=7,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=4, norm_num_groups=8, num_class_embeds=1000)


def tiny_upscaler(path, prediction_type: str = "v_prediction"):
    """A StableDiffusionUpscalePipeline folder with stabilityai/stable-diffusion-x4-upscaler's schedulers (DDIM,
    scaled-linear betas 1e-4..0.02, v-prediction; low-res DDPM linear) and max_noise_level 350."""
    from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionUpscalePipeline

    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.0001, beta_end=0.02,
                              prediction_type=prediction_type, clip_sample=False)
    pipe = StableDiffusionUpscalePipeline(vae=tp.vae(scaling_factor=0.08333), text_encoder=tp.text_encoder(),
                                          tokenizer=tp.tokenizer(), unet=tiny_upscale_unet(),
                                          low_res_scheduler=DDPMScheduler(beta_start=0.0001, beta_end=0.02),
                                          scheduler=scheduler, max_noise_level=350)
    pipe.save_pretrained(path, safe_serialization=True)
    return str(path)


def image_folder(path, n: int = 6, size: int = 16, captions: bool = False, cycles=(0.5, 3.0), seed: int = 0):
    """Smooth random colour images (low-frequency sinusoids): detail that downsampling removes, learnable."""
    from PIL import Image

    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.linspace(0, 1, size), np.linspace(0, 1, size), indexing="ij")
    rows = []
    for i in range(n):
        channels = []
        for _ in range(3):
            fy, fx, phase = rng.uniform(*cycles), rng.uniform(*cycles), rng.uniform(0, 2 * np.pi)
            channels.append(0.5 + 0.45 * np.sin(2 * np.pi * (fy * yy + fx * xx) + phase))
        Image.fromarray((np.stack(channels, -1) * 255).round().astype(np.uint8)).save(path / f"{i:03d}.png")
        rows.append({"file_name": f"{i:03d}.png", "text": "a pattern" if i % 2 else "waves"})
    if captions:
        (path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def float64_case():
    """A float64 teacher and student (tiny upscaler UNets) and one batch of 3: (teacher, student, z0, noise, t,
    low_t, low_s, levels, text, alphas_cumprod), the timesteps and noise levels spanning the table, the low-resolution
    inputs in [-1, 1], the linear-beta table from its betas."""
    teacher, student = tiny_upscale_unet(0).double(), tiny_upscale_unet(1).double()
    g = torch.Generator().manual_seed(0)
    b = 3
    z0 = torch.randn(b, 4, LATENT, LATENT, generator=g, dtype=torch.float64)
    noise = torch.randn(z0.shape, generator=g, dtype=torch.float64)
    low_t, low_s = (torch.rand(b, 3, LATENT, LATENT, generator=g, dtype=torch.float64) * 2 - 1 for _ in range(2))
    text = torch.randn(b, 5, 32, generator=g, dtype=torch.float64)
    t, levels = torch.tensor([0, 411, 999]), torch.tensor([20, 0, 350])
    betas = torch.linspace(0.0001 ** 0.5, 0.02 ** 0.5, 1000, dtype=torch.float64) ** 2
    return teacher, student, z0, noise, t, low_t, low_s, levels, text, torch.cumprod(1 - betas, 0)


def test_scale_distill_loss_against_float64():
    """Eq. (1) recomputed independently in float64: z_t from the betas' own cumulative product, both UNet passes
    on the concatenated inputs, the mean over samples of each sample's mean squared difference."""
    teacher, student, z0, noise, t, low_t, low_s, levels, text, alphas_cumprod = float64_case()
    b = z0.shape[0]
    loss, logs = scale_distill_loss(student, teacher, alphas_cumprod, z0, noise, t, low_t, low_s, levels, text,
                                    "v_prediction")
    expected, data_errors = 0.0, 0.0
    for i in range(b):  # one sample at a time, written out
        a = float(alphas_cumprod[t[i]])
        z_t = a ** 0.5 * z0[i:i + 1] + (1 - a) ** 0.5 * noise[i:i + 1]
        with torch.no_grad():
            out_t = teacher(torch.cat([z_t, low_t[i:i + 1]], 1), t[i:i + 1], encoder_hidden_states=text[i:i + 1],
                            class_labels=levels[i:i + 1]).sample
            out_s = student(torch.cat([z_t, low_s[i:i + 1]], 1), t[i:i + 1], encoder_hidden_states=text[i:i + 1],
                            class_labels=levels[i:i + 1]).sample
        expected += float(((out_s - out_t) ** 2).mean()) / b
        v = a ** 0.5 * noise[i:i + 1] - (1 - a) ** 0.5 * z0[i:i + 1]  # the v target (Salimans & Ho)
        data_errors += float(((out_s - v) ** 2).sum())
    # float64 throughout: the two sides differ by rounding of ~1e4 operations per value (eps 2.2e-16), far below 1e-10.
    assert abs(float(loss.detach()) - expected) <= 1e-10 * expected
    assert abs(float(logs["student_mse_to_data"]) - data_errors / z0.numel()) <= 1e-10 * data_errors / z0.numel()
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())  # the teacher is only a target
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())


def test_scale_distill_loss_is_zero_for_the_teacher_on_its_own_input():
    """A student that is the teacher, given the teacher's input, has nothing to learn: exactly zero."""
    teacher = tiny_upscale_unet(0)
    g = torch.Generator().manual_seed(1)
    z0 = torch.randn(2, 4, LATENT, LATENT, generator=g)
    low = torch.rand(2, 3, LATENT, LATENT, generator=g)
    from diffusers import DDPMScheduler

    args = (DDPMScheduler().alphas_cumprod, z0, torch.randn(z0.shape, generator=g), torch.tensor([5, 700]), low,
            low, torch.tensor([20, 20]), torch.randn(2, 5, 32, generator=g))
    assert float(scale_distill_loss(teacher, teacher, *args)[0].detach()) == 0.0
    assert float(scale_distill_loss(teacher, teacher, *args[:4], low, low.flip(0), *args[6:])[0].detach()) > 0


@pytest.mark.parametrize("prediction_type", ["v_prediction", "epsilon", "sample"])
def test_one_step_read_out_is_the_exported_ddim_step(prediction_type):
    """The one-step scheduler written into the export (trailing spacing, alpha_prev = 1) turns the network output at
    the top timestep into ``predicted_latent``'s x0 bit for bit; and that read-out inverts the data target."""
    from diffusers import DDIMScheduler

    from fastdiff.training.upscale import one_step_scheduler

    sched = one_step_scheduler(DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.0001, beta_end=0.02,
                                             prediction_type=prediction_type, clip_sample=True).config)
    sched.set_timesteps(1)
    assert sched.timesteps.tolist() == [999]
    g = torch.Generator().manual_seed(2)
    z, out = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    top = sched.timesteps[0]
    stepped = sched.step(out, top, z, eta=0.0).prev_sample
    assert torch.equal(stepped, predicted_latent(prediction_type, sched.alphas_cumprod[top], z, out))
    # with the exact data target as output, the read-out returns z0 (float64: rounding only, ~1e-15 x |z0| / sqrt(abar))
    z0, eps = torch.randn(2, 4, 8, 8, generator=g).double(), torch.randn(2, 4, 8, 8, generator=g).double()
    abar = sched.alphas_cumprod.double()
    t = torch.tensor([999, 999])
    z_t = abar[999].sqrt() * z0 + (1 - abar[999]).sqrt() * eps
    y = data_target(prediction_type, abar, z0, eps, t)
    assert torch.allclose(predicted_latent(prediction_type, abar[999], z_t, y), z0, rtol=0, atol=1e-12)


def test_decoder_loss_and_low_res_inputs():
    """Eq. (2) against numpy in float64; the low-res inputs: the teacher's (scale = VAE factor) is the plain
    antialiased bicubic downsample, the student's is coarser and upsampled back onto the same grid."""
    g = torch.Generator().manual_seed(3)
    decoded, hr = torch.randn(2, 3, 16, 16, generator=g), torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    expected = np.mean((decoded.double().numpy() - hr.double().numpy()) ** 2)
    # float32 mean of 1536 positive squares: each term's difference and square round by <= eps32 relative, the
    # pairwise sum adds ~11 levels of eps32 / 2: ~8e-7 relative at worst (measured 7e-8)
    assert abs(float(decoder_loss(decoded, hr)) - expected) <= 1e-6 * expected
    teacher_low, student_low = low_res(hr, 2, (8, 8)), low_res(hr, 4, (8, 8))
    assert teacher_low.shape == student_low.shape == (2, 3, 8, 8)
    plain = torch.nn.functional.interpolate(hr, size=(8, 8), mode="bicubic", antialias=True).clamp(-1, 1)
    assert torch.equal(teacher_low, plain)
    assert not torch.allclose(teacher_low, student_low)
    assert prepare_low_res(torch.rand(1, 3, 4, 4), 2).shape == (1, 3, 8, 8)


def test_upscale_end_to_end_reloads_through_diffusers(tmp_path):
    """``fastdiff upscale`` on a tiny x2 teacher: a few updates of both stages, exported; diffusers' own pipeline
    from the folder, at one step, gives fastdiff's sampler's images exactly (same float32 operations)."""
    from diffusers import StableDiffusionUpscalePipeline

    from fastdiff.cli import main

    teacher = tiny_upscaler(tmp_path / "teacher")
    images = image_folder(tmp_path / "hr", n=4, captions=True)
    out = tmp_path / "student"
    assert main(["upscale", teacher, "--images", images, "--out", str(out), "--quiet", "--device", "cpu",
                 "--set", "steps=2", "--set", "decoder_steps=2", "--set", "batch_size=2", "--set", "lr=1e-3",
                 "--set", "num_eval_images=2"]) == 0
    info = json.loads((out / "fastdiff.json").read_text())
    assert (info["teacher_scale"], info["student_scale"]) == (2, 4)
    assert set(info["measured"]) >= {"psnr_start", "psnr_after_scale_distillation", "psnr_after_decoder"}
    pipe = StableDiffusionUpscalePipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    teacher_pipe = StableDiffusionUpscalePipeline.from_pretrained(teacher)
    moved = [not torch.equal(a, b) for a, b in zip(pipe.unet.parameters(), teacher_pipe.unet.parameters())]
    assert any(moved)  # stage 1 trained the UNet
    assert not torch.equal(pipe.vae.decoder.conv_out.weight, teacher_pipe.vae.decoder.conv_out.weight)  # stage 2
    assert torch.equal(pipe.vae.encoder.conv_in.weight, teacher_pipe.vae.encoder.conv_in.weight)
    low = prepare_low_res(torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(4)), 2)  # x4 input
    prompts = ["waves", "a pattern"]
    ours = upscale_images(pipe, low, prompts, torch.Generator().manual_seed(7), noise_level=20)
    theirs = pipe(prompt=prompts, image=low, num_inference_steps=1, guidance_scale=1.0, noise_level=20,
                  generator=torch.Generator().manual_seed(7), output_type="pt").images
    assert ours.shape == theirs.shape == (2, 3, 16, 16)
    assert torch.equal(ours, theirs)
    # and uint8 as PIL writes them
    as_uint8 = (ours.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    pil = pipe(prompt=prompts, image=low, num_inference_steps=1, guidance_scale=1.0, noise_level=20,
               generator=torch.Generator().manual_seed(7), output_type="np").images
    assert np.array_equal(as_uint8, (pil * 255).round().astype(np.uint8))


def test_upscale_rejects_bad_input(tmp_path, capsys):
    """One-line errors before anything trains: not an upscale pipeline, a factor below 2, --out the teacher."""
    from fastdiff.cli import main

    folder = tmp_path / "not-a-pipeline"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    base = ["upscale", str(folder), "--images", str(folder), "-q"]
    for extra, message in [(["--out", str(tmp_path / "o")], "needs a StableDiffusionUpscalePipeline folder"),
                           (["--out", str(tmp_path / "o"), "--set", "factor=1"], "factor must be at least 2"),
                           (["--out", str(folder), "--overwrite"], "is the teacher folder itself")]:
        assert main(base + extra) == 2
        assert message in capsys.readouterr().err


def test_upscale_forward_is_the_pipeline_input():
    """The UNet call the losses make is the pipeline's: latent then low-res channels, level as class label."""
    unet = tiny_upscale_unet(0)
    g = torch.Generator().manual_seed(5)
    z, low, text = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 3, 8, 8, generator=g), torch.randn(1, 5, 32)
    direct = unet(torch.cat([z, low], 1), 10, encoder_hidden_states=text, class_labels=torch.tensor([20])).sample
    assert torch.equal(upscale_forward(unet, z, low, 10, torch.tensor([20]), text), direct)


def test_a_non_finite_upscaler_writes_nothing_and_keeps_the_old_export(tmp_path):
    """The non-finite check runs before anything is written: an earlier export in --out stays as it was, and no
    temporary folder is left."""
    from fastdiff.errors import FastdiffError
    from fastdiff.training.upscale import export_upscaler

    out = tmp_path / "upscaler"
    out.mkdir()
    (out / "fastdiff.json").write_text("{}")
    with pytest.raises(FastdiffError, match="non-finite images .* nothing was written"):
        export_upscaler(None, None, None, None, {"measured": {"psnr_after_decoder": float("nan")}}, str(out))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["upscaler"] and (out / "fastdiff.json").read_text() == "{}"
