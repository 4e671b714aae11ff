"""Scale distillation for super-resolution (YONOS-SR): the losses of both stages, as small callables.

Noroozi et al. 2024, "You Only Need One Step: Fast Super-Resolution with Stable Diffusion via Scale Distillation"
(arXiv 2401.17258). No official code is public (no repository of the authors' holds it; searched by name), and
only the paper's abstract and summaries were readable here, so the formulas below are our transcription of the
method they describe, in diffusers' StableDiffusionUpscalePipeline terms. One difference on purpose: the paper
(built on Stable Diffusion) encodes the low-res image with the VAE encoder (z_l = E(x_l)); the upscale pipeline
concatenates it in pixels on the latent grid, and that is what we follow:

A super-resolution model is a latent diffusion UNet ``f`` that reads the noisy HR latent concatenated with the
noise-augmented low-resolution image ``c`` (on the latent grid) and the augmentation level ``n`` as class label:

    z_0 = s_vae E(x_h),    z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps                (VP forward process)
    c_s = sqrt(abar'_n) up(down_s(x_h)) + sqrt(1 - abar'_n) eps'                         (x_l at scale s, noised
                                                                                          by the low-res scheduler)
    standard loss:      L(theta) = E || y(z_0, eps, t) - f_theta(z_t, c_s, n, t) ||^2    (y: eps, v or z_0, the
                                                                                          teacher's prediction type)

Scale distillation (the paper's method; equation numbers here are ours): a teacher ``f_phi`` trained at a small
magnification s (the easier problem, x2) is frozen, and the student at the larger magnification k s (x4),
initialised from it (our choice), regresses the teacher's prediction on the SAME noisy latent instead of the data
target y:

    L_SD(theta) = E_{x_h, t, eps, eps'} || f_phi(z_t, c_s, n, t) - f_theta(z_t, c_{k s}, n, t) ||^2      (1)

The teacher's output depends on t, so the target adapts to the noise level (the abstract's reason (i)), and it is
more accurate than what the student could infer from the harder input (reason (ii)); the paper repeats the step
(x4 -> x8 ...). ``scale_distill_loss`` is (1) per sample, mean over elements, with one ``eps'`` and one ``n``
shared by the two inputs (they differ only in the degradation).

One step (the paper's second stage): with the distilled UNet good enough at ONE DDIM step from t = T, it is frozen
and the VAE decoder is fine-tuned on its single-step output:

    z_hat = x0-read-out of f_theta(z_T, c_{k s}, n, T),   z_T ~ N(0, I)                    (one DDIM step, eta 0)
    L_dec(psi) = E || D_psi(z_hat / s_vae) - x_h ||^2                                      (2)

``predicted_latent`` is the DDIM x0 read-out written as diffusers' DDIMScheduler.step writes it (so the exported
one-step pipeline reproduces it bit for bit); ``decoder_loss`` is (2) with the squared error in [-1, 1] pixels (the
paper's decoder objective may add perceptual / adversarial terms, which need pretrained networks not available
offline; not built). ``tests/test_upscale.py`` recomputes (1) and (2) independently in float64.
"""
from __future__ import annotations

import torch

from ..errors import FastdiffError


def noised_latent(alphas_cumprod: torch.Tensor, z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor):
    """``sqrt(abar_t) z0 + sqrt(1 - abar_t) eps`` per sample (t (B,) integer timesteps)."""
    abar = alphas_cumprod.to(z0.device, z0.dtype)[t].view(-1, *([1] * (z0.ndim - 1)))
    return abar.sqrt() * z0 + (1 - abar).sqrt() * noise


def data_target(prediction_type: str, alphas_cumprod: torch.Tensor, z0: torch.Tensor, noise: torch.Tensor,
                t: torch.Tensor) -> torch.Tensor:
    """The standard loss's target y: what the network predicts (eps, v or the clean latent)."""
    abar = alphas_cumprod.to(z0.device, z0.dtype)[t].view(-1, *([1] * (z0.ndim - 1)))
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return abar.sqrt() * noise - (1 - abar).sqrt() * z0
    if prediction_type == "sample":
        return z0
    raise FastdiffError(f"prediction_type {prediction_type!r} is not supported (epsilon, v_prediction, sample)")


def predicted_latent(prediction_type: str, alpha_prod_t: torch.Tensor, sample: torch.Tensor,
                     model_output: torch.Tensor) -> torch.Tensor:
    """The clean-latent estimate of one network output, with DDIMScheduler.step's own arithmetic (same operations,
    same order), so one exported DDIM step from t = T to the end (alpha_prev = 1) returns exactly this."""
    beta_prod_t = 1 - alpha_prod_t
    if prediction_type == "epsilon":
        return (sample - beta_prod_t ** (0.5) * model_output) / alpha_prod_t ** (0.5)
    if prediction_type == "v_prediction":
        return (alpha_prod_t ** 0.5) * sample - (beta_prod_t ** 0.5) * model_output
    if prediction_type == "sample":
        return model_output
    raise FastdiffError(f"prediction_type {prediction_type!r} is not supported (epsilon, v_prediction, sample)")


def upscale_forward(unet, z: torch.Tensor, low_res: torch.Tensor, t, noise_level: torch.Tensor,
                    text: torch.Tensor) -> torch.Tensor:
    """One pass of an upscale UNet as StableDiffusionUpscalePipeline makes it: latent and low-res image
    concatenated on channels, the augmentation level as class label, the prompt through cross-attention."""
    return unet(torch.cat([z, low_res.to(z.dtype)], dim=1), t, encoder_hidden_states=text,
                class_labels=noise_level, return_dict=False)[0]


def scale_distill_loss(student, teacher, alphas_cumprod: torch.Tensor, z0: torch.Tensor, noise: torch.Tensor,
                       t: torch.Tensor, low_res_teacher: torch.Tensor, low_res_student: torch.Tensor,
                       noise_level: torch.Tensor, text: torch.Tensor, prediction_type: str | None = None):
    """(loss, logs): Eq. (1), the mean over the batch of the per-sample mean squared difference between the frozen
    teacher's prediction from its (easier) low-res input and the student's from its own, at the same z_t. With
    ``prediction_type`` the logs also hold the student's error to the data target y (what the standard loss would
    regress), and the teacher's, for comparison. ``teacher=None`` is the paper's baseline instead: the standard loss
    at the student's scale, target y (needs ``prediction_type``)."""
    z_t = noised_latent(alphas_cumprod, z0, noise, t)
    if teacher is None:
        if prediction_type is None:
            raise FastdiffError("the data-target baseline (no teacher) needs the prediction_type")
        target = data_target(prediction_type, alphas_cumprod, z0, noise, t)
    else:
        with torch.no_grad():
            target = upscale_forward(teacher, z_t, low_res_teacher, t, noise_level, text)
    pred = upscale_forward(student, z_t, low_res_student, t, noise_level, text)
    per_sample = (_wide(pred) - _wide(target)).square().flatten(1).mean(1)
    logs = {"loss_scale_distill": per_sample.mean().detach()}
    if prediction_type is not None:
        y = _wide(data_target(prediction_type, alphas_cumprod, z0, noise, t))
        logs["student_mse_to_data"] = (_wide(pred.detach()) - y).square().mean()
        logs["teacher_mse_to_data"] = (_wide(target) - y).square().mean()
    return per_sample.mean(), logs


def decoder_loss(decoded: torch.Tensor, x_high: torch.Tensor) -> torch.Tensor:
    """Eq. (2): mean squared error of the decoded one-step output against the HR images, in [-1, 1] pixels."""
    return (_wide(decoded) - _wide(x_high)).square().mean()


def _wide(x: torch.Tensor) -> torch.Tensor:
    """Half-precision outputs squared in float32; float32 and float64 ones as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
