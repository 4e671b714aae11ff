"""A diffusers pipeline for flow-map (MeanFlow-style) students: any number of steps from one network.

The student (fastdiff's ``FlowMapModel``) takes a second time, ``r_timestep``: the level it maps to. Each step maps
the current sample from timestep t to the next timestep of the schedule, ``z_r = z_t - (t - r) u(z_t, r, t)``, and
the last step maps to the data (r = 0). That step is the deterministic DDIM step (eta 0) with the student's x0
estimate at (t, r), so the scheduler is diffusers' ``DDIMScheduler`` with trailing timesteps and
``set_alpha_to_one``; this pipeline only adds the r of each call. Load it with
``FastdiffFlowMapPipeline.from_pretrained(folder)`` (fastdiff installed: the network is ``fastdiff.FlowMapModel``,
imported first, ``from fastdiff import FlowMapModel``: diffusers loads a class only from a module already imported).
"""
from __future__ import annotations

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput, ModelMixin, SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor


class FastdiffFlowMapPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "unet"

    def __init__(self, unet: ModelMixin, scheduler: SchedulerMixin):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    @torch.no_grad()
    def __call__(self, batch_size: int = 1, num_inference_steps: int = 1, class_labels=None,
                 generator: torch.Generator | None = None, output_type: str = "pil", return_dict: bool = True):
        """Generate ``batch_size`` images (or one per class label) in ``num_inference_steps`` map steps."""
        device = self._execution_device
        labels = None
        if class_labels is not None:
            labels = torch.as_tensor(class_labels, device=device).long().reshape(-1)
            batch_size = len(labels)
        size = self.unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        shape = (batch_size, self.unet.config.in_channels, *size)
        image = randn_tensor(shape, generator=generator, device=device, dtype=self.unet.dtype)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        for i, t in enumerate(self.progress_bar(timesteps)):
            r = timesteps[i + 1] if i + 1 < len(timesteps) else torch.zeros_like(t)  # the last step maps to the data
            kwargs = {} if labels is None else {"class_labels": labels}
            output = self.unet(image, t, r_timestep=r, **kwargs).sample
            image = self.scheduler.step(output, t, image, eta=0.0).prev_sample
        image = (image / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).float().numpy()
        if output_type == "pil":
            image = self.numpy_to_pil(image)
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)
