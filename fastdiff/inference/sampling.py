"""Sampling for students (K-step generator) and teachers (deterministic DDIM), and PNG output."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..models.denoiser import Denoiser
from ..models.generator import Generator, step_sigmas


def class_labels_for(n: int, num_classes: int | None, device) -> dict | None:
    """Labels 0, 1, ..., cycling over the classes (None for unconditional models)."""
    if not num_classes:
        return None
    return {"class_labels": torch.arange(n, device=device) % num_classes}


@torch.no_grad()
def ddim_sample(denoiser: Denoiser, z: torch.Tensor, num_steps: int, cond: dict | None = None,
                guidance_scale: float | None = None) -> torch.Tensor:
    """Deterministic DDIM (eta = 0) from pure noise over the same K levels a K-step student uses
    (trailing spacing: 999, 499 for K=2), i.e. Euler on the probability-flow ODE in the VE scale."""
    sigmas = step_sigmas(denoiser, num_steps).to(z.device)
    x0 = denoiser.denoise_native(z, sigmas[0], cond, guidance_scale)
    for i in range(1, num_steps):
        if torch.isinf(sigmas[i - 1]):  # flow at t=1: the noise estimate is the input itself
            eps = z
        else:
            prev_x = z / denoiser.schedule.alpha(sigmas[i - 1])
            eps = (prev_x - x0) / sigmas[i - 1]
        x = x0 + sigmas[i] * eps
        z = x * denoiser.schedule.alpha(sigmas[i])
        x0 = denoiser.denoise_native(z, sigmas[i], cond, guidance_scale)
    return x0


def guided_cond(model, cond: dict | None, guidance_scale: float | None) -> dict | None:
    """Add the guidance embedding a guidance-distilled (LCM-style) student reads; other models: cond as is."""
    dim = getattr(getattr(model, "config", None), "time_cond_proj_dim", None)
    if not dim or cond is None:
        return cond
    from ..models.guidance import guided_condition

    scale = 1.0 if guidance_scale is None else guidance_scale
    first = next(v for k, v in cond.items() if torch.is_tensor(v) and not k.startswith("uncond_"))
    return guided_condition(cond, torch.full((len(first),), scale - 1.0), dim, first.device)


def to_unit(x0: torch.Tensor) -> np.ndarray:
    """[-1, 1] NCHW -> [0, 1] float NHWC, as diffusers' pipelines return ``output_type="np"``."""
    return (x0.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()


def to_uint8(x0: torch.Tensor) -> np.ndarray:
    """[-1, 1] NCHW -> uint8 NHWC, with the same rounding as diffusers' numpy_to_pil."""
    return (to_unit(x0) * 255).round().astype(np.uint8)


def save_pngs(images: np.ndarray, out: Path, start: int = 0) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(out / f"{start + i:06d}.png")


def save_grid(images: np.ndarray, path: Path, ncol: int | None = None) -> None:
    n, h, w, c = images.shape
    ncol = ncol or int(math.ceil(math.sqrt(n)))
    nrow = int(math.ceil(n / ncol))
    grid = np.zeros((nrow * h, ncol * w, c), dtype=np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, ncol)
        grid[r * h:(r + 1) * h, col * w:(col + 1) * w] = img
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid[..., 0] if c == 1 else grid).save(path)


class RouterSampler:
    """An MSD router folder (``fastdiff msd``) as ``fastdiff sample`` / ``fid`` see a model: sampled by its own router
    pipeline, each class label or prompt by its student. Batch b calls the pipeline with
    ``torch.Generator().manual_seed(seed + b)``, the labels ``start, start + 1, ...`` (mod the classes) or the batch's
    prompts, as ``sample_model`` feeds a single student."""

    FORMATS = ("fastdiff-msd-v1", "fastdiff-msd-text-v1")
    latents = None  # the router pipeline decodes its latents itself

    def __init__(self, folder: str, info: dict, device):
        from fastdiff.pipelines.pipeline_fastdiff_multi_student import (FastdiffMultiStudentPipeline,
                                                                         FastdiffMultiStudentTextPipeline)

        text = info["format"] == "fastdiff-msd-text-v1"
        cls = FastdiffMultiStudentTextPipeline if text else FastdiffMultiStudentPipeline
        self.pipe = cls.from_pretrained(folder).to(device)
        self.pipe.set_progress_bar_config(disable=True)
        self.conditioning, self.num_classes = ("text", None) if text else ("class", info["num_classes"])
        self.num_students, self.num_steps = len(self.pipe.students.nets), info["num_steps"]
        net = self.pipe.students.nets[0].config
        size = net.sample_size if isinstance(net.sample_size, int) else net.sample_size[0]
        if text:
            scale = 2 ** (len(self.pipe.vae.config.block_out_channels) - 1)
            self.image_shape = (self.pipe.vae.config.out_channels, size * scale, size * scale)
        else:
            self.image_shape = (net.in_channels, size, size)

    def sample(self, num: int, steps: int, seed: int, batch_size: int, prompts: list[str] | None = None,
               part: tuple[int, int] | None = None):
        for b, start in batch_starts(num, batch_size, part):
            n = min(batch_size, num - start)
            call = {"num_inference_steps": steps, "generator": torch.Generator().manual_seed(seed + b),
                    "output_type": "np"}
            if self.conditioning == "text":
                images = self.pipe(prompts[start:start + n], **call).images
            else:
                images = self.pipe(class_labels=(torch.arange(n) + start) % self.num_classes, **call).images
            yield start, (np.asarray(images) * 255).round().astype(np.uint8)


class MultiGuidanceSampler:
    """A fada export (``FastdiffMultiGuidancePipeline``) as ``fastdiff sample`` / ``fid`` see a model: one pass a step
    at the export's two scales (fastdiff.json: the middle of each trained range, unless given), each image with a
    class label and a prompt, the prompts encoded by the teacher's text encoder (``PromptEncoder``, as in training).
    Batch b calls the pipeline with ``torch.Generator().manual_seed(seed + b)``, labels ``start, start + 1, ...``
    (mod the classes) and the batch's prompts, as ``sample_model`` feeds a single student."""

    FORMAT = "fastdiff-fada-v1"
    conditioning = "text"  # the prompts are what a user passes; the labels cycle over the classes
    latents = None

    def __init__(self, folder: str, info: dict, device, class_scale: float | None = None,
                 text_scale: float | None = None):
        from fastdiff.pipelines import FastdiffMultiGuidancePipeline

        from ..models.teacher import load_teacher
        from ..models.text import PromptEncoder
        from .students import teacher_location

        self.pipe = FastdiffMultiGuidancePipeline.from_pretrained(folder).to(device)
        self.pipe.set_progress_bar_config(disable=True)
        teacher = load_teacher(teacher_location(folder, info))
        self.text = PromptEncoder(teacher.pipeline, device=device, max_cached=0)  # each prompt is used once
        self.num_classes = info["num_classes"]
        self.scales = (info["class_guidance_scale"] if class_scale is None else class_scale,
                       info["text_guidance_scale"] if text_scale is None else text_scale)
        net = self.pipe.unet.config
        size = net.sample_size if isinstance(net.sample_size, int) else net.sample_size[0]
        self.image_shape = (net.in_channels, size, size)

    def sample(self, num: int, steps: int, seed: int, batch_size: int, prompts: list[str] | None = None,
               part: tuple[int, int] | None = None):
        for b, start in batch_starts(num, batch_size, part):
            n = min(batch_size, num - start)
            text = self.text(prompts[start:start + n])["encoder_hidden_states"]
            images = self.pipe((torch.arange(n) + start) % self.num_classes, text, class_guidance_scale=self.scales[0],
                               text_guidance_scale=self.scales[1], num_inference_steps=steps,
                               generator=torch.Generator().manual_seed(seed + b), output_type="np").images
            yield start, (np.asarray(images) * 255).round().astype(np.uint8)


def load_sampler(model_dir: str, device, guidance_scale: float | None = None, levels=None):
    """(sampler, loaded): an exported student's K-step Generator, or a teacher folder's Denoiser (DDIM); an MSD
    router or a fada export: its pipeline-driven sampler (``RouterSampler``, ``MultiGuidanceSampler``), both roles.

    A LoRA student folder loads its teacher (``teacher_folder`` in fastdiff.json) with the adapters applied by
    diffusers' ``load_lora_weights``, as a user of the teacher pipeline would. ``levels``: a flow-map student's
    sampling levels (``student_generator``)."""
    from ..models.embedded import resolve_teacher_path
    from ..errors import FastdiffError
    from .students import (check_guidance_in_range, load_flow_map_student, load_lora_student, read_student_info,
                           student_generator)
    from ..models.teacher import could_be_hub_id, load_teacher, require_condition

    model_dir = resolve_teacher_path(model_dir)
    if not Path(model_dir).is_dir() and not could_be_hub_id(model_dir):
        # before the --levels check below, which would call a missing folder a teacher
        what = "is a file" if Path(model_dir).exists() else "does not exist"
        raise FastdiffError(f"{model_dir} {what}: pass an exported student's or a teacher's folder")
    info = read_student_info(model_dir)
    if info:  # before the (possibly large) pipeline loads
        check_guidance_in_range(info, guidance_scale, "--guidance-scale")
    if levels is not None and not (info and info.get("flow_map")):
        raise FastdiffError(f"--levels is for flow-map students (objective meanflow or ayf); {model_dir} is "
                            f"{'a teacher' if not info else 'another kind of student'}, sampled on its own levels")
    if info and info.get("format") in RouterSampler.FORMATS:  # fastdiff msd: sampled by its own router pipeline
        if guidance_scale is not None:
            raise FastdiffError("--guidance-scale is for teachers and guidance-embedded students; an MSD router's "
                                "students have their guidance distilled in")
        router = RouterSampler(model_dir, info, device)
        return router, router
    if info and info.get("format") == MultiGuidanceSampler.FORMAT:  # fada: its own pipeline, both scales
        if guidance_scale is not None:
            raise FastdiffError("--guidance-scale is one scale; a fada export samples at the class and text scales "
                                "its fastdiff.json gives (class_guidance_scale, text_guidance_scale)")
        fada = MultiGuidanceSampler(model_dir, info, device)
        return fada, fada
    if info and info.get("flow_map") and info.get("pipeline_class"):  # text-to-image flow-map exports: own class
        loaded = load_flow_map_student(model_dir, info)
    elif info and info.get("export") == "lora":
        loaded = load_lora_student(model_dir, info)
    else:
        loaded = load_teacher(model_dir)
    (loaded.pipeline if loaded.pipeline is not None else loaded.model).to(device)  # a pipeline moves its network too
    guided = bool(getattr(loaded.model.config, "time_cond_proj_dim", None))
    if info and guidance_scale is not None and not guided:
        raise FastdiffError("--guidance-scale is for teachers and guidance-embedded students; "
                            "this student has its guidance distilled in")
    if not info and guidance_scale is not None and guidance_scale != 1:
        require_condition(loaded, f"--guidance-scale {guidance_scale}")
    return (student_generator(loaded, info, levels) if info else loaded.denoiser), loaded


def check_prompts(loaded, prompts: list[str] | None) -> None:
    """A text-to-image model samples from prompts; other models take none."""
    from ..errors import FastdiffError

    if loaded.conditioning == "text" and not prompts:
        raise FastdiffError("this is a text-to-image model: pass --prompts FILE (one prompt per line)")
    if loaded.conditioning != "text" and prompts:
        kind = "unconditional" if loaded.conditioning == "none" else f"{loaded.conditioning}-conditioned"
        raise FastdiffError(f"--prompts is for text-to-image models; this one is {kind}")


def batch_starts(num: int, batch_size: int, part: tuple[int, int] | None = None):
    """(index, first image) of each batch of ``num`` images; with ``part=(i, P)`` only those whose index is i mod P
    (process i of P's share: a batch is the same images whichever process makes it)."""
    for b, start in enumerate(range(0, num, batch_size)):
        if part is None or b % part[1] == part[0]:
            yield b, start


def share_size(num: int, batch_size: int, part: tuple[int, int] | None = None) -> int:
    """How many of the ``num`` images ``batch_starts(num, batch_size, part)``'s batches hold (a progress bar's total)."""
    return sum(min(batch_size, num - start) for _, start in batch_starts(num, batch_size, part))


def is_main(part: tuple[int, int] | None) -> bool:
    """Whether this process reports and writes: alone, or process 0 of a launched group."""
    return part is None or part[0] == 0


def sampling_guidance(model, guidance_scale: float | None) -> float | None:
    """The scale ``sample_model`` samples ``model`` at: ``guidance_scale``, else a guidance-embedded student's own
    default (``students.embedded_guidance_default``, set on its generator), else None."""
    return guidance_scale if guidance_scale is not None else getattr(model, "default_guidance", None)


@torch.no_grad()
def sample_model(model: Generator | Denoiser, loaded, num: int, steps: int, seed: int, batch_size: int, device,
                 guidance_scale: float | None = None, prompts: list[str] | None = None,
                 part: tuple[int, int] | None = None):
    """Yield (start, uint8 images): a student Generator samples K steps, a teacher Denoiser runs DDIM.

    Each batch draws its noise from ``torch.Generator().manual_seed(seed + batch_index)`` on the CPU, the
    way diffusers pipelines draw it, so a batch equals the exported pipeline's output for that seed (with the
    batch's prompts, for text-to-image models: image i gets ``prompts[i]``). Latents are decoded by the VAE.
    ``part=(i, P)``: only the batches whose index is i mod P (process i of P's share; each batch is the same
    images whichever process samples it).
    """
    check_prompts(loaded, prompts)
    if isinstance(model, (RouterSampler, MultiGuidanceSampler)):  # pipeline-driven: their own conditions
        yield from model.sample(num, steps, seed, batch_size, prompts, part)
        return
    num_classes, latents = loaded.num_classes, loaded.latents
    text = None
    if prompts:
        from ..models.text import PromptEncoder

        text = PromptEncoder(loaded.pipeline, device=device, max_cached=0)  # each prompt is used once: no cache
    scale = sampling_guidance(model, guidance_scale)
    for b, start in batch_starts(num, batch_size, part):
        n = min(batch_size, num - start)
        rng = torch.Generator().manual_seed(seed + b)
        z = torch.randn((n, *loaded.sample_shape), generator=rng).to(device)
        cond = class_labels_for(n, num_classes, device)
        if cond is not None:
            cond["class_labels"] = (cond["class_labels"] + start) % num_classes
        if text is not None:
            cond = text(prompts[start:start + n])
        if isinstance(model, Generator):
            x0 = model(z, guided_cond(model.denoiser.model, cond, scale), num_steps=steps, rng=rng)
        else:
            x0 = ddim_sample(model, z, steps, cond, guidance_scale)
        if latents is not None:
            x0 = latents.decode(x0)
        yield start, to_uint8(x0)
