"""A diffusers pipeline for class-conditional ``UNet2DModel`` students and teachers.

diffusers ships no pipeline for a class-conditional UNet2DModel, so fastdiff exports one. It is the
DDPM pipeline with class labels (and optional classifier-free guidance with the null class, the last
class embedding). Load it with ``FastdiffClassConditionalPipeline.from_pretrained(folder)``, or without
fastdiff installed via
``DiffusionPipeline.from_pretrained(folder, custom_pipeline=folder, trust_remote_code=True)`` (the folder
holds a copy of this file as pipeline.py; read it before trusting it).
"""
from __future__ import annotations

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput, SchedulerMixin, UNet2DModel
from diffusers.utils.torch_utils import randn_tensor


class FastdiffClassConditionalPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "unet"

    def __init__(self, unet: UNet2DModel, scheduler: SchedulerMixin):
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

        self.scheduler.set_timesteps(num_inference_steps)
        for t in self.progress_bar(self.scheduler.timesteps):
            if guidance_scale == 1.0:
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
