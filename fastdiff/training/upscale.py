"""``fastdiff upscale``: YONOS-SR on a super-resolution teacher in StableDiffusionUpscalePipeline layout.

Stage 1, scale distillation (``objectives/scale_distill.py``, Eq. 1): the teacher is the pipeline as given, an
upscaler at its native magnification s (in this pipeline shape the low-res image sits on the latent grid, so s is
the VAE's factor: x2 for a two-block VAE, x4 for stabilityai's x4 upscaler). The student, a copy of the teacher's
UNet, learns the harder magnification ``factor * s`` (x2 teacher -> x4 student): its low-res input is the HR image
downsampled by ``factor * s`` and brought back to the latent grid by bicubic upsampling, and its target on each
noisy latent is the frozen teacher's prediction from the easier low-res input (downsampled by s only).

Stage 2, one step (Eq. 2): the student UNet is frozen and run as a one-step sampler (one DDIM step from the top
timestep, x0 read-out); the VAE decoder is fine-tuned so that this single step's decoded image matches the HR image,
as the paper fine-tunes the decoder on top of its frozen one-step U-Net.

Export: a StableDiffusionUpscalePipeline folder (student UNet, tuned VAE, the teacher's text encoder, tokenizer and
low-res scheduler) whose scheduler is a one-step DDIM (``timestep_spacing="trailing"``: its one step is the top
timestep; ``set_alpha_to_one``: that step returns the x0 read-out itself). Called with ``num_inference_steps=1,
guidance_scale=1`` on the low-res image upsampled by ``factor`` (``prepare_low_res``), diffusers' own pipeline
gives the images of ``upscale_images`` (tests/test_upscale.py: equal).

Like ``tune.py``, this is a loop of its own rather than a ``Trainer`` configuration: the Trainer's networks are
Denoisers of one noise language over one input, while an upscaler's input carries a second image (the low-res one,
with its own noise level) and its teacher and student differ in that input, not in the noise; one process, AdamW with
gradient clipping, float32 weights, no EMA.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import flat_config
from ..errors import FastdiffError
from ..machine import progress
from ..objectives.scale_distill import (decoder_loss, predicted_latent, scale_distill_loss, upscale_forward)
from .data import as_model_range, list_image_folder, load_image_folder

PIPELINE = "StableDiffusionUpscalePipeline"


@dataclass
class UpscaleConfig:
    """``fastdiff upscale --set KEY=VALUE`` keys."""

    factor: int = 2  # the student's magnification over the teacher's (x2 teacher -> x4 student)
    resolution: int = 0  # HR training size; 0: the teacher UNet's sample_size times the VAE factor
    steps: int = 200  # stage 1: scale-distillation updates of the student UNet
    decoder_steps: int = 100  # stage 2: decoder updates on the frozen student's one-step output (0: skip)
    batch_size: int = 4
    lr: float = 1e-5  # stage 1 (the UNet)
    decoder_lr: float = 1e-5  # stage 2 (the VAE decoder)
    noise_level: int = 20  # the low-res augmentation level (the pipeline's default), trained and written on the card
    prompt: str = ""  # the text condition when the image folder has no captions (metadata.jsonl)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    num_eval_images: int = 8  # PSNR of the one-step student against these HR images, before and after each stage
    target: str = "teacher"  # teacher: scale distillation (Eq. 1); data: the paper's baseline (standard loss at x k s)


def upscale_config(overrides: list[str]) -> UpscaleConfig:
    cfg = flat_config(UpscaleConfig(), overrides, positive=("factor", "batch_size", "num_eval_images"))
    if cfg.factor < 2:
        raise FastdiffError(f"factor must be at least 2 (the student's magnification over the teacher's), got "
                            f"{cfg.factor}")
    if cfg.steps < 0 or cfg.decoder_steps < 0 or cfg.resolution < 0:
        raise FastdiffError("steps, decoder_steps and resolution must not be negative")
    if cfg.target not in ("teacher", "data"):
        raise FastdiffError(f"target must be teacher (scale distillation) or data (the standard loss), got "
                            f"{cfg.target!r}")
    if cfg.lr <= 0 or cfg.decoder_lr <= 0:
        raise FastdiffError(f"lr and decoder_lr must be positive, got {cfg.lr}, {cfg.decoder_lr}")
    return cfg


def load_upscaler(folder: str):
    """The StableDiffusionUpscalePipeline in ``folder`` (float32); anything else is a one-line error."""
    index = Path(folder) / "model_index.json"
    if not index.is_file():
        raise FastdiffError(f"{folder} is not a diffusers pipeline folder (no model_index.json); fastdiff upscale "
                            f"needs a {PIPELINE} folder")
    name = json.loads(index.read_text()).get("_class_name")
    if name != PIPELINE:
        raise FastdiffError(f"{folder} holds a {name}; fastdiff upscale needs a {PIPELINE} folder")
    from diffusers import StableDiffusionUpscalePipeline

    pipe = StableDiffusionUpscalePipeline.from_pretrained(folder, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def one_step_scheduler(config):
    """DDIM with one step at the top timestep that returns its x0 read-out: ``trailing`` spacing puts the single
    step at T - 1, ``set_alpha_to_one`` makes the step's end alpha 1 (so x_prev = x0_hat exactly), no clipping."""
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(config, timestep_spacing="trailing", set_alpha_to_one=True, clip_sample=False,
                                     thresholding=False)


def low_res(x: torch.Tensor, scale: int, grid: tuple[int, int]) -> torch.Tensor:
    """The HR images ``x`` ([-1, 1]) downsampled by ``scale`` (bicubic, antialiased) and brought to the latent grid
    (bicubic upsampling when the scale is above the VAE's factor): an upscaler's low-res input at that scale."""
    size = (x.shape[-2] // scale, x.shape[-1] // scale)
    low = x if size == tuple(x.shape[-2:]) else F.interpolate(x, size=size, mode="bicubic", antialias=True,
                                                              align_corners=False)
    if size != tuple(grid):
        low = F.interpolate(low, size=tuple(grid), mode="bicubic", align_corners=False)
    return low.clamp(-1, 1)


def prepare_low_res(image: torch.Tensor, factor: int) -> torch.Tensor:
    """A low-res image batch ([0, 1], NCHW) at the student's magnification made ready for the exported pipeline:
    bicubic upsampling by ``factor`` onto the latent grid, as the student was trained."""
    up = F.interpolate(image, scale_factor=factor, mode="bicubic", align_corners=False)
    return up.clamp(0, 1)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean PSNR (dB) of images in [0, 1] (per image, then averaged), in float64."""
    mse = (a.double() - b.double()).square().flatten(1).mean(1).clamp_min(1e-20)
    return float((10 * torch.log10(1.0 / mse)).mean())


class UpscaleData:
    """The HR images ([-1, 1]) with their prompts; each batch also gives both low-res inputs, noise-augmented."""

    def __init__(self, folder: str, pipe, resolution: int, teacher_scale: int, factor: int, noise_level: int,
                 prompt: str, device, flag: str = "--images"):
        if not Path(folder).is_dir():
            raise FastdiffError(f"{flag} {folder} is not a folder")
        _, captions = list_image_folder(folder, flag)  # bad folders fail here, before anything loads
        images, _ = load_image_folder(folder, resolution, 3, flag)
        self.images = as_model_range(images).to(device)
        self.captions = captions or [prompt] * len(images)
        self.pipe, self.device = pipe, device
        self.grid = (resolution // teacher_scale, resolution // teacher_scale)
        self.teacher_scale, self.student_scale = teacher_scale, teacher_scale * factor
        self.noise_level = noise_level
        self._text: dict[str, torch.Tensor] = {}

    def __len__(self):
        return len(self.images)

    def text(self, prompts: list[str]) -> torch.Tensor:
        """Prompt embeddings through the pipeline's own ``encode_prompt`` (no CFG), each prompt encoded once."""
        for p in set(prompts) - set(self._text):
            with torch.no_grad():
                self._text[p] = self.pipe.encode_prompt(p, self.device, 1, False)[0]
        return torch.cat([self._text[p] for p in prompts])

    def batch(self, idx: torch.Tensor, rng: torch.Generator, teacher: bool = True):
        """(x_h, text, noised low-res at the teacher's scale or None, noised low-res at the student's, levels)."""
        x = self.images[idx.to(self.images.device)]
        text = self.text([self.captions[i] for i in idx.tolist()])
        levels = torch.full((len(idx),), self.noise_level, dtype=torch.long, device=self.device)
        noise = _draw((len(idx), x.shape[1], *self.grid), rng, self.device)  # eps', shared by both inputs
        add = self.pipe.low_res_scheduler.add_noise
        student = add(low_res(x, self.student_scale, self.grid), noise, levels)
        teacher_in = add(low_res(x, self.teacher_scale, self.grid), noise, levels) if teacher else None
        return x, text, teacher_in, student, levels


def _draw(shape, rng: torch.Generator, device) -> torch.Tensor:
    """Noise from the CPU generator (the same draws on every device), moved to ``device``."""
    return torch.randn(tuple(shape), generator=rng).to(device)


def one_step_latent(unet, scheduler, low: torch.Tensor, levels: torch.Tensor, text: torch.Tensor,
                    z_top: torch.Tensor) -> torch.Tensor:
    """The one-step sampler's clean latent: the network at the top timestep on pure noise, x0 read-out."""
    top = torch.tensor(scheduler.config.num_train_timesteps - 1, device=z_top.device)
    out = upscale_forward(unet, z_top, low, top, levels, text)
    return predicted_latent(scheduler.config.prediction_type, scheduler.alphas_cumprod.to(z_top.device)[top],
                            z_top, out)


@torch.no_grad()
def upscale_images(pipe, image: torch.Tensor, prompt: str | list[str], generator: torch.Generator,
                   noise_level: int = 20) -> torch.Tensor:
    """fastdiff's one-step sampler for an exported (or any) upscale pipeline: ``image`` in [0, 1] on the latent grid
    (``prepare_low_res`` for a student), the same noise draws in the same order as the pipeline (low-res noise,
    then the latent); returns images in [0, 1]."""
    from diffusers.utils.torch_utils import randn_tensor

    device = pipe.unet.device
    prompts = [prompt] * len(image) if isinstance(prompt, str) else list(prompt)
    text = pipe.encode_prompt(prompts, device, 1, False)[0]
    low = pipe.image_processor.preprocess(image).to(dtype=text.dtype, device=device)
    level = torch.tensor([noise_level], dtype=torch.long, device=device)
    low = pipe.low_res_scheduler.add_noise(low, randn_tensor(low.shape, generator=generator, device=device,
                                                             dtype=text.dtype), level)
    levels = torch.cat([level] * low.shape[0])
    shape = (len(prompts), pipe.vae.config.latent_channels, *low.shape[2:])
    z_top = randn_tensor(shape, generator=generator, device=device, dtype=text.dtype)
    z0 = one_step_latent(pipe.unet, one_step_scheduler(pipe.scheduler.config), low, levels, text, z_top)
    decoded = pipe.vae.decode(z0 / pipe.vae.config.scaling_factor, return_dict=False)[0]
    return (decoded / 2 + 0.5).clamp(0, 1)


class Evaluation:
    """PSNR against the HR images of a fixed set, with fixed noise: the student's one-step output at its scale,
    the teacher's at its own (easier) scale, and bicubic upsampling of the student's low-res input."""

    def __init__(self, data: UpscaleData, n: int, seed: int, unet_scheduler):
        self.data, self.scheduler = data, unet_scheduler
        self.idx = torch.arange(min(n, len(data)))
        rng = torch.Generator().manual_seed(seed + 999)
        self.x, self.text, self.teacher_low, self.student_low, self.levels = data.batch(self.idx, rng)
        latent_shape = (len(self.idx), data.pipe.vae.config.latent_channels, *data.grid)
        self.z_top = _draw(latent_shape, rng, data.device)
        self.hr = (self.x / 2 + 0.5).clamp(0, 1)
        vae = data.pipe.vae
        with torch.no_grad():  # Eq. (1) at fixed draws: timesteps spread over the schedule, one noise each
            self.z0 = vae.encode(self.x).latent_dist.sample(rng) * vae.config.scaling_factor
        num_t = data.pipe.scheduler.config.num_train_timesteps
        self.t = torch.linspace(0, num_t - 1, len(self.idx)).round().long().to(data.device)
        self.noise = _draw(self.z0.shape, rng, data.device)

    @torch.no_grad()
    def distill_loss(self, student, teacher) -> float:
        """Eq. (1) on the fixed set at fixed timesteps and noise: what stage 1 minimises, measured."""
        loss, _ = scale_distill_loss(student, teacher, self.data.pipe.scheduler.alphas_cumprod, self.z0, self.noise,
                                     self.t, self.teacher_low, self.student_low, self.levels, self.text)
        return float(loss)

    @torch.no_grad()
    def one_step(self, unet, vae, teacher: bool = False) -> float:
        low = self.teacher_low if teacher else self.student_low
        z0 = one_step_latent(unet, self.scheduler, low, self.levels, self.text, self.z_top)
        decoded = vae.decode(z0 / vae.config.scaling_factor, return_dict=False)[0]
        return psnr((decoded / 2 + 0.5).clamp(0, 1), self.hr)

    @torch.no_grad()
    def latent_gap(self, student, teacher) -> float:
        """Mean squared distance between the student's one-step latent from its low-res input and the teacher's
        from its easier one (same noise): what Eq. (1) pulls together, seen at the sampler's own step."""
        z_s = one_step_latent(student, self.scheduler, self.student_low, self.levels, self.text, self.z_top)
        z_t = one_step_latent(teacher, self.scheduler, self.teacher_low, self.levels, self.text, self.z_top)
        return float((z_s.double() - z_t.double()).square().mean())

    def bicubic(self) -> float:
        lr = low_res(self.x, self.data.student_scale, [s // self.data.student_scale for s in self.x.shape[-2:]])
        up = F.interpolate(lr, size=tuple(self.x.shape[-2:]), mode="bicubic", align_corners=False)
        return psnr((up / 2 + 0.5).clamp(0, 1), self.hr)


def _step(loss: torch.Tensor, opt, params, clip: float) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, clip)
    opt.step()


def distill_scale(pipe, student, data: UpscaleData, cfg: UpscaleConfig, rng: torch.Generator, show_progress=True):
    """Stage 1: ``cfg.steps`` updates of Eq. (1); the teacher (``pipe.unet``) stays frozen. Returns the last logs."""
    teacher, vae = pipe.unet, pipe.vae
    scheduler = pipe.scheduler
    num_t = scheduler.config.num_train_timesteps
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    logs = {}
    with progress(total=cfg.steps, desc="upscale: scale distillation", unit="step", enabled=show_progress) as bar:
        for _ in range(cfg.steps):
            idx = torch.randint(len(data), (cfg.batch_size,), generator=rng)
            x, text, teacher_low, student_low, levels = data.batch(idx, rng)
            with torch.no_grad():
                z0 = vae.encode(x).latent_dist.sample(rng) * vae.config.scaling_factor
            t = torch.randint(num_t, (cfg.batch_size,), generator=rng).to(x.device)
            noise = _draw(z0.shape, rng, x.device)
            loss, logs = scale_distill_loss(student, teacher if cfg.target == "teacher" else None,
                                            scheduler.alphas_cumprod, z0, noise, t, teacher_low,
                                            student_low, levels, text, scheduler.config.prediction_type)
            _step(loss, opt, params, cfg.grad_clip)
            bar.update(1)
            bar.set_postfix({k: f"{float(v):.3g}" for k, v in logs.items()})
    return {k: float(v) for k, v in logs.items()}


def tune_decoder(student, vae, scheduler, data: UpscaleData, cfg: UpscaleConfig, rng: torch.Generator,
                 show_progress=True):
    """Stage 2: ``cfg.decoder_steps`` updates of Eq. (2) on the decoder (and post-quant conv); the student UNet is
    frozen and run as the one-step sampler."""
    student.requires_grad_(False).eval()
    vae.requires_grad_(False)
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.decoder_lr, weight_decay=cfg.weight_decay)
    logs = {}
    with progress(total=cfg.decoder_steps, desc="upscale: one-step decoder", unit="step",
                  enabled=show_progress) as bar:
        for _ in range(cfg.decoder_steps):
            idx = torch.randint(len(data), (cfg.batch_size,), generator=rng)
            x, text, _, student_low, levels = data.batch(idx, rng, teacher=False)
            z_top = _draw((len(idx), vae.config.latent_channels, *data.grid), rng, x.device)
            with torch.no_grad():
                z0 = one_step_latent(student, scheduler, student_low, levels, text, z_top)
            loss = decoder_loss(vae.decode(z0 / vae.config.scaling_factor, return_dict=False)[0], x)
            _step(loss, opt, params, cfg.grad_clip)
            logs = {"loss_decoder": float(loss.detach())}
            bar.update(1)
            bar.set_postfix({k: f"{v:.3g}" for k, v in logs.items()})
    vae.requires_grad_(False)
    return logs


def upscale(teacher_dir: str, images_dir: str, out: str, cfg: UpscaleConfig, device=None, show_progress=True,
            log=print, eval_dir: str | None = None) -> Path:
    """Both stages on the teacher in ``teacher_dir`` and the HR images of ``images_dir``; the student exported to
    ``out`` (with the PSNR measured before and after each stage in its ``fastdiff.json``, on the first
    ``num_eval_images`` of ``eval_dir``, held-out HR images, or else of the training images)."""
    if Path(out).resolve() == Path(teacher_dir).resolve():
        raise FastdiffError("the output folder is the teacher folder itself; give another folder")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    pipe = load_upscaler(teacher_dir)
    scale = pipe.vae_scale_factor
    resolution = cfg.resolution or pipe.unet.config.sample_size * scale
    if resolution % (scale * cfg.factor) or (resolution // scale) % scale:
        raise FastdiffError(f"resolution {resolution} must be a multiple of {scale * cfg.factor} (the student's "
                            f"magnification) and of {scale * scale} (the pipeline rounds its low-res input to "
                            f"multiples of the VAE factor {scale})")
    if not 0 <= cfg.noise_level <= pipe.config.max_noise_level:
        raise FastdiffError(f"noise_level must be in [0, {pipe.config.max_noise_level}] (the pipeline's "
                            f"max_noise_level), got {cfg.noise_level}")
    data = UpscaleData(images_dir, pipe, resolution, scale, cfg.factor, cfg.noise_level, cfg.prompt, device)
    held_out = eval_dir and UpscaleData(eval_dir, pipe, resolution, scale, cfg.factor, cfg.noise_level, cfg.prompt,
                                        device, "--eval-images")
    pipe.to(device)
    pipe.unet.requires_grad_(False).eval()
    pipe.vae.requires_grad_(False).eval()
    pipe.text_encoder.requires_grad_(False)
    student = copy.deepcopy(pipe.unet).requires_grad_(True).train()  # the x(k s) student starts as the x s teacher
    one_step = one_step_scheduler(pipe.scheduler.config)
    rng = torch.Generator().manual_seed(cfg.seed)
    evaluation = Evaluation(held_out or data, cfg.num_eval_images, cfg.seed, one_step)
    measured = {"psnr_bicubic": evaluation.bicubic(),
                "psnr_teacher_own_scale": evaluation.one_step(pipe.unet, pipe.vae, teacher=True),
                "psnr_start": evaluation.one_step(student, pipe.vae),
                "latent_gap_start": evaluation.latent_gap(student, pipe.unet),
                "distill_loss_start": evaluation.distill_loss(student, pipe.unet)}
    stage1 = distill_scale(pipe, student, data, cfg, rng, show_progress) if cfg.steps else {}
    measured["psnr_after_scale_distillation"] = evaluation.one_step(student, pipe.vae)
    measured["latent_gap_after_scale_distillation"] = evaluation.latent_gap(student, pipe.unet)
    measured["distill_loss_after_scale_distillation"] = evaluation.distill_loss(student, pipe.unet)
    vae = copy.deepcopy(pipe.vae)  # the teacher's VAE stays as it was (it encodes the HR images of stage 1)
    stage2 = tune_decoder(student, vae, one_step, data, cfg, rng, show_progress) if cfg.decoder_steps else {}
    measured["psnr_after_decoder"] = evaluation.one_step(student, vae)
    log("one-step PSNR (dB) against the HR images: " + ", ".join(f"{k[5:]} {v:.2f}" for k, v in measured.items()
                                                                 if k.startswith("psnr")))
    log(f"scale-distillation loss (Eq. 1, fixed draws): {measured['distill_loss_start']:.4g} -> "
        f"{measured['distill_loss_after_scale_distillation']:.4g}; one-step latent gap to the teacher: "
        f"{measured['latent_gap_start']:.4g} -> {measured['latent_gap_after_scale_distillation']:.4g}")
    info = {"method": "yonos-sr", "teacher_folder": str(Path(teacher_dir).resolve()), "teacher_scale": scale,
            "student_scale": scale * cfg.factor, "factor": cfg.factor, "resolution": resolution,
            "noise_level": cfg.noise_level, "num_inference_steps": 1, "guidance_scale": 1.0,
            "measured": measured, "measured_on": "held-out images" if held_out else "training images",
            "last_logs": {**stage1, **stage2}, "settings": dataclasses.asdict(cfg)}
    return export_upscaler(pipe, student, vae, one_step, info, out)


def export_upscaler(pipe, student, vae, scheduler, info: dict, out: str) -> Path:
    """The student as a StableDiffusionUpscalePipeline folder (one-step scheduler) with ``fastdiff.json`` and a card,
    written atomically (``inference.export.write_atomically``); nothing is written for an upscaler gone non-finite."""
    from ..inference.export import write_atomically

    if not math.isfinite(info["measured"]["psnr_after_decoder"]):
        raise FastdiffError("the upscaler gives non-finite images after its decoder fine-tuning; nothing was written "
                            "(lower decoder_lr)")
    final = Path(out)
    return write_atomically(final, lambda folder: _write_upscaler(pipe, student, vae, scheduler, info, folder, final))


def _write_upscaler(pipe, student, vae, scheduler, info: dict, folder: Path, final: Path) -> None:
    from diffusers import StableDiffusionUpscalePipeline

    m = info["measured"]
    exported = StableDiffusionUpscalePipeline(vae=vae.cpu().eval(), text_encoder=pipe.text_encoder.cpu(),
                                              tokenizer=pipe.tokenizer, unet=student.cpu().eval(),
                                              low_res_scheduler=pipe.low_res_scheduler, scheduler=scheduler,
                                              max_noise_level=pipe.config.max_noise_level)
    exported.save_pretrained(folder, safe_serialization=True)
    (folder / "fastdiff.json").write_text(json.dumps(info, indent=2) + "\n")
    (folder / "README.md").write_text(
        f"# x{info['student_scale']} one-step upscaler (YONOS-SR, fastdiff)\n\n"
        f"Scale-distilled from the x{info['teacher_scale']} teacher `{Path(info['teacher_folder']).name}`, then its "
        f"VAE decoder fine-tuned on the one-step output.\n\n```python\n"
        f"import torch.nn.functional as F\nfrom diffusers import StableDiffusionUpscalePipeline\n"
        f"pipe = StableDiffusionUpscalePipeline.from_pretrained(\"{final.name}\")\n"
        f"# low_res: NCHW in [0, 1] at 1/{info['student_scale']} of the output size, upsampled x{info['factor']} "
        f"first (bicubic), as in training\n"
        f"image = F.interpolate(low_res, scale_factor={info['factor']}, mode=\"bicubic\").clamp(0, 1)\n"
        f"out = pipe(prompt=\"\", image=image, num_inference_steps=1, guidance_scale=1.0, "
        f"noise_level={info['noise_level']}).images\n```\n\n"
        f"One-step PSNR against HR images ({info['measured_on']}, up to {info['settings']['num_eval_images']}): "
        f"bicubic {m['psnr_bicubic']:.2f} dB, start {m['psnr_start']:.2f}, after scale distillation "
        f"{m['psnr_after_scale_distillation']:.2f}, after the decoder {m['psnr_after_decoder']:.2f}.\n")
