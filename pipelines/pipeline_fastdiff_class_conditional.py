"""A diffusers pipeline for class-conditional ``UNet2DModel`` students and teachers.

diffusers ships no pipeline for a class-conditional UNet2DModel, so fastdiff exports one. It is the
DDPM pipeline with class labels (and optional classifier-free guidance with the null class, the last
class embedding). Load it with ``FastdiffClassConditionalPipeline.from_pretrained(folder)``, or without
fastdiff installed via
``DiffusionPipeline.from_pretrained(folder, custom_pipeline=folder, trust_remote_code=True)`` (the folder
holds a copy of this file as pipeline.py; read it before trusting it).
"""
from __future__ import annotations

import math

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput, ModelMixin, SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor


def guidance_embedding(w: torch.Tensor, dim: int = 256) -> torch.Tensor:
    """Sinusoidal embedding of the guidance weight ``w = guidance_scale - 1`` (scaled by 1000, as LCM feeds it),
    shape (B, dim): the input of a guidance-distilled student's ``timestep_cond``."""
    w = torch.as_tensor(w, dtype=torch.float32).reshape(-1) * 1000.0
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=w.device) / (half - 1))
    angles = w[:, None] * freqs[None, :]
    emb = torch.cat([angles.sin(), angles.cos()], dim=1)
    return torch.nn.functional.pad(emb, (0, dim % 2))


class FastdiffClassConditionalPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "unet"

    # unet: a class-conditional UNet2DModel, or fastdiff's GuidanceEmbeddedUNet (a guidance-distilled student)
    def __init__(self, unet: ModelMixin, scheduler: SchedulerMixin):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    @property
    def num_classes(self) -> int:
        return self.unet.config.num_class_embeds - 1  # the last embedding is the null class

    @torch.no_grad()
    def __call__(self, class_labels=None, batch_size: int = 1, num_inference_steps: int = 1,
                 guidance_scale: float = 1.0, generator: torch.Generator | None = None,
                 output_type: str = "pil", return_dict: bool = True):
        """Generate images of the given classes (default: 0, 1, ..., cycling over the classes)."""
        device = self._execution_device
        if class_labels is None:
            class_labels = torch.arange(batch_size) % self.num_classes
        labels = torch.as_tensor(class_labels, device=device).long().reshape(-1)
        size = self.unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        shape = (len(labels), self.unet.config.in_channels, *size)
        image = randn_tensor(shape, generator=generator, device=device, dtype=self.unet.dtype)
        null = torch.full_like(labels, self.unet.config.num_class_embeds - 1)

        # A guidance-distilled student (LCM-style) takes the scale as an embedding: one pass, no CFG.
        embed_dim = getattr(self.unet.config, "time_cond_proj_dim", None)
        w_emb = None
        if embed_dim:
            w_emb = guidance_embedding(torch.full((len(labels),), guidance_scale - 1.0), embed_dim).to(device)

        self.scheduler.set_timesteps(num_inference_steps)
        for t in self.progress_bar(self.scheduler.timesteps):
            if w_emb is not None:
                output = self.unet(image, t, class_labels=labels, timestep_cond=w_emb).sample
            elif guidance_scale == 1.0:
                output = self.unet(image, t, class_labels=labels).sample
            else:
                both = self.unet(torch.cat([image, image]), t, class_labels=torch.cat([null, labels])).sample
                uncond, cond = both.chunk(2)
                output = uncond + guidance_scale * (cond - uncond)
            image = self.scheduler.step(output, t, image, generator=generator).prev_sample

        image = (image / 2 + 0.5).clamp(0, 1)
        if output_type != "pt":
            image = image.cpu().permute(0, 2, 3, 1).float().numpy()
            if output_type == "pil":
                image = self.numpy_to_pil(image)
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)
