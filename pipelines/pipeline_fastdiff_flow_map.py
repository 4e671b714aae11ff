"""A diffusers pipeline for flow-map (MeanFlow-style) students: any number of steps from one network.

The student (fastdiff's ``FlowMapModel``) takes a second time, ``r_timestep``: the level it maps to. Each step maps
the current sample from timestep t to the next timestep of the schedule, ``z_r = z_t - (t - r) u(z_t, r, t)``, and
the last step maps to the data (r = 0). That step is the deterministic DDIM step (eta 0) with the student's x0
estimate at (t, r), so the scheduler is diffusers' ``DDIMScheduler`` with trailing timesteps and
``set_alpha_to_one``; this pipeline only adds the r of each call. ``timesteps`` (a list, highest first, the first
the scheduler's top) samples on those levels instead (fastdiff's ``FlowMapGenerator(levels=...)``, e.g. its
``levels="flow"``): each step then takes the student's x0 estimate from the scheduler and re-noises it to the next
level with the noise the step implies, the same deterministic step. Load it with
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
                 generator: torch.Generator | None = None, output_type: str = "pil", return_dict: bool = True,
                 timesteps: list[int] | None = None):
        """Generate ``batch_size`` images (or one per class label) in ``num_inference_steps`` map steps (or on the
        given ``timesteps``)."""
        device = self._execution_device
        labels = None
        if class_labels is not None:
            labels = torch.as_tensor(class_labels, device=device).long().reshape(-1)
            batch_size = len(labels)
        size = self.unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        shape = (batch_size, self.unet.config.in_channels, *size)
        image = randn_tensor(shape, generator=generator, device=device, dtype=self.unet.dtype)
        levels = map_levels(self.scheduler, num_inference_steps, timesteps, device)
        for i, t in enumerate(self.progress_bar(levels)):
            r = levels[i + 1] if i + 1 < len(levels) else torch.zeros_like(t)  # the last step maps to the data
            kwargs = {} if labels is None else {"class_labels": labels}
            output = self.unet(image, t, r_timestep=r, **kwargs).sample
            image = map_step(self.scheduler, output, t, r, image, timesteps is not None)
        image = (image / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).float().numpy()
        if output_type == "pil":
            image = self.numpy_to_pil(image)
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)


def map_levels(scheduler, num_inference_steps: int, timesteps, device) -> torch.Tensor:
    """The scheduler's K trailing timesteps, or the given ones (checked: decreasing, within its table)."""
    if timesteps is None:
        scheduler.set_timesteps(num_inference_steps, device=device)
        return scheduler.timesteps
    given = torch.as_tensor(timesteps, device=device)
    levels = given.long()
    top = len(scheduler.alphas_cumprod) - 1
    if levels.ndim != 1 or len(levels) == 0 or (levels != given).any() or (levels[1:] >= levels[:-1]).any() \
            or levels[-1] <= 0 or levels[0] > top:
        raise ValueError(f"timesteps {list(timesteps)} must be integers decreasing strictly within (0, {top}]")
    scheduler.set_timesteps(len(levels), device=device)  # DDIMScheduler.step needs its step count set
    return levels


def map_step(scheduler, output, t, r, sample, given: bool):
    """One map step to r: DDIMScheduler's own step on its levels; on given ones, its x0 estimate re-noised to r
    with the implied noise (the same deterministic step: DDIM's own would step to its trailing grid, not r)."""
    if not given:
        return scheduler.step(output, t, sample, eta=0.0).prev_sample
    x0 = scheduler.step(output, t, sample, eta=0.0).pred_original_sample
    if r == 0:
        return x0
    a_t = scheduler.alphas_cumprod[t].to(sample.device, sample.dtype)
    noise = (sample - a_t.sqrt() * x0) / (1 - a_t).sqrt()
    return scheduler.add_noise(x0, noise, r.reshape(1))
