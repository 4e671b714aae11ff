"""A diffusers pipeline for flow-map (MeanFlow-style) students: any number of steps from one network.

The student (fastdiff's ``FlowMapModel``) takes a second time, ``r_timestep``: the level it maps to. Each step maps
the current sample from timestep t to the next timestep of the schedule, ``z_r = z_t - (t - r) u(z_t, r, t)``, and
the last step maps to the data (r = 0). That step is the deterministic DDIM step (eta 0) with the student's x0
estimate at (t, r): diffusers' ``DDIMScheduler`` gives the x0 estimate (``pred_original_sample``), which is
re-noised to r with the noise the step implies (``add_noise``). The K levels are fastdiff's (``map_levels``; DDIM's
own trailing grid is one timestep off where K does not divide the table), or those given as ``timesteps``
(highest first, from the student's first timestep: fastdiff's ``FlowMapGenerator(levels=...)``, e.g. its
``levels="flow"``). Load it with
``FastdiffFlowMapPipeline.from_pretrained(folder)`` (fastdiff installed: the network is ``fastdiff.FlowMapModel``,
imported first, ``from fastdiff import FlowMapModel``: diffusers loads a class only from a module already imported).
"""
from __future__ import annotations

import numpy as np
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
            image = map_step(self.scheduler, output, t, r, image)
        image = (image / 2 + 0.5).clamp(0, 1)
        if output_type != "pt":  # "pt": a (B, C, H, W) tensor, as diffusers' own pipelines
            image = image.cpu().permute(0, 2, 3, 1).float().numpy()
            if output_type == "pil":
                image = self.numpy_to_pil(image)
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)


def step_timesteps(num_train_timesteps: int, num_steps: int) -> list[int]:
    """fastdiff's K-step levels on a VP table: LCMScheduler's K timesteps with ``original_inference_steps = T``
    (evenly spaced from T - 1, rounded down: 999 / 666 / 333 at K = 3, where DDIM's trailing grid has 332)."""
    reversed_grid = np.arange(num_train_timesteps)[::-1]
    idx = np.floor(np.linspace(0, num_train_timesteps, num=num_steps, endpoint=False)).astype(np.int64)
    return [int(t) for t in reversed_grid[idx]]


def map_levels(scheduler, num_inference_steps: int, timesteps, device) -> torch.Tensor:
    """The K levels: ``step_timesteps`` on the (truncated) table, or the given ``timesteps``, checked."""
    top = len(scheduler.alphas_cumprod) - 1
    if timesteps is None:
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be positive, got {num_inference_steps}")
        timesteps = step_timesteps(top + 1, num_inference_steps)
    given = torch.as_tensor(timesteps, device=device)
    levels = given.long()
    if levels.ndim != 1 or len(levels) == 0 or (levels != given).any() or (levels[1:] >= levels[:-1]).any() \
            or levels[-1] <= 0 or levels[0] != top:  # the first: pure noise is right only at the top
        raise ValueError(f"timesteps {list(timesteps)} must be integers decreasing strictly from the student's first "
                         f"timestep {top} to above 0, e.g. {[top, round(top * 0.3)]}")
    scheduler.set_timesteps(len(levels), device=device)  # DDIMScheduler.step needs its step count set
    return levels


def map_step(scheduler, output, t, r, sample):
    """One map step to r: DDIMScheduler's x0 estimate re-noised to r with the implied noise (DDIM's own step would
    go to its trailing grid's next timestep, not r)."""
    x0 = scheduler.step(output, t, sample, eta=0.0).pred_original_sample
    if r == 0:
        return x0
    a_t = scheduler.alphas_cumprod[t].to(sample.device)  # float32: 1 - a_t in fp16 would lose its digits
    noise = (sample.float() - a_t.sqrt() * x0.float()) / (1 - a_t).sqrt()
    return scheduler.add_noise(x0.float(), noise, r.reshape(1)).to(sample.dtype)
