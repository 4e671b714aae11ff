"""A diffusers pipeline for text-to-image flow-map (MeanFlow-style) students of Stable Diffusion 3 teachers.

The components are StableDiffusion3Pipeline's (VAE, CLIP text encoders, optional T5); the network is fastdiff's
``FlowMapModel`` around the student's SD3Transformer2DModel, with one more input, ``r_timestep``: the timestep it
maps to (t = 1 is timestep 1000). The student's output is the average velocity u between the two times, so each
step is the Euler step of ``FlowMatchEulerDiscreteScheduler`` with u: ``z_r = z_t + (r - t) u(z_t, r, t)``. The K
levels are fastdiff's ``t_i = 1 - i / K`` (passed as ``sigmas``; the scheduler has shift 1), the last step maps to
the data (r = 0), and any ``num_inference_steps`` samples from the one network; ``timesteps`` (``t * 1000``,
highest first) samples on those levels instead.

No classifier-free guidance: the student learnt the teacher's guided velocity (fastdiff's ``meanflow`` objective
takes its target from the teacher at ``teacher.guidance_scale``), so one pass per step. Load with
``FastdiffFlowMapSD3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)`` (absent encoders
named, as diffusers wants) or ``DiffusionPipeline.from_pretrained(folder, custom_pipeline=
"pipeline_fastdiff_flow_map_sd3", trust_remote_code=True, ...)`` (this file, copied into the folder). The network's
class needs fastdiff installed and imported first (``from fastdiff import FlowMapModel``: diffusers loads a class
only from a module already imported).
"""
from __future__ import annotations

import numpy as np
import torch
from diffusers import StableDiffusion3Pipeline
from diffusers.pipelines.stable_diffusion_3 import StableDiffusion3PipelineOutput
from diffusers.utils.torch_utils import randn_tensor


class FastdiffFlowMapSD3Pipeline(StableDiffusion3Pipeline):
    # StableDiffusion3Pipeline's components, without its type hints: the network is a FlowMapModel
    def __init__(self, transformer, scheduler, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2,
                 text_encoder_3, tokenizer_3, image_encoder=None, feature_extractor=None):
        super().__init__(transformer, scheduler, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2,
                         text_encoder_3, tokenizer_3, image_encoder, feature_extractor)

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], num_inference_steps: int = 1, num_images_per_prompt: int = 1,
                 generator: torch.Generator | None = None, latents: torch.Tensor | None = None,
                 max_sequence_length: int = 256, output_type: str = "pil", return_dict: bool = True,
                 timesteps: list[float] | None = None):
        """Images for ``prompt`` in ``num_inference_steps`` map steps (any number, one student), or on the given
        ``timesteps``."""
        device = self._execution_device
        prompt_embeds, _, pooled, _ = self.encode_prompt(
            prompt=prompt, prompt_2=None, prompt_3=None, device=device, num_images_per_prompt=num_images_per_prompt,
            do_classifier_free_guidance=False, max_sequence_length=max_sequence_length)
        size = self.transformer.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        shape = (prompt_embeds.shape[0], self.transformer.config.in_channels, *size)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=prompt_embeds.dtype)
        latents = latents.to(device)
        steps = num_inference_steps
        T = self.scheduler.config.num_train_timesteps
        if timesteps is None and steps < 1:
            raise ValueError(f"num_inference_steps must be positive, got {steps}")
        sigmas = np.linspace(1.0, 1.0 / steps, steps) if timesteps is None else np.asarray(timesteps, float) / T
        if len(sigmas) == 0 or (np.diff(sigmas) >= 0).any() or sigmas[-1] <= 0 or sigmas[0] != 1:
            raise ValueError(f"timesteps {timesteps} must decrease strictly from {T} (pure noise) to above 0, "
                             f"e.g. {[T, round(0.3 * T)]}")
        self.scheduler.set_timesteps(sigmas=sigmas, device=device)
        timesteps = self.scheduler.timesteps
        for i, t in enumerate(self.progress_bar(timesteps)):
            r = timesteps[i + 1] if i + 1 < len(timesteps) else torch.zeros_like(t)  # the last step maps to the data
            u = self.transformer(hidden_states=latents, timestep=t.expand(latents.shape[0]),
                                 encoder_hidden_states=prompt_embeds, pooled_projections=pooled, r_timestep=r,
                                 return_dict=False)[0]
            latents = self.scheduler.step(u, t, latents, return_dict=False)[0]
        if output_type == "latent":
            image = latents
        else:
            latents = latents / self.vae.config.scaling_factor + self.vae.config.shift_factor
            image = self.image_processor.postprocess(self.vae.decode(latents, return_dict=False)[0],
                                                     output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return StableDiffusion3PipelineOutput(images=image)
