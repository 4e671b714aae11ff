"""A diffusers pipeline for text-to-image flow-map (MeanFlow-style) students of Stable Diffusion teachers.

The components are StableDiffusionPipeline's (VAE, CLIP text encoder and tokenizer, optional safety checker); the
network is fastdiff's ``FlowMapModel`` around the student's UNet2DConditionModel, with one more input,
``r_timestep``: the timestep it maps to. Each step maps the latents from timestep t to the next timestep of the
schedule, ``z_r = z_t - (t - r) u(z_t, r, t)``, the last one to the data (r = 0). That is the deterministic DDIM step
(eta 0) with the student's x0 estimate at (t, r), taken from diffusers' ``DDIMScheduler`` and re-noised to r as in
``FastdiffFlowMapPipeline`` (fastdiff's levels), and any ``num_inference_steps`` samples from the one network;
``timesteps`` (highest first, from the student's first) samples on those levels instead.

No classifier-free guidance: the student learnt the teacher's guided velocity (fastdiff's ``meanflow`` objective
takes its target from the teacher at ``teacher.guidance_scale``), so one pass per step. Load with
``FastdiffFlowMapSDPipeline.from_pretrained(folder)`` or ``DiffusionPipeline.from_pretrained(folder, custom_pipeline=
"pipeline_fastdiff_flow_map_sd", trust_remote_code=True)`` (this file, copied into the folder). The network's class
needs fastdiff installed and imported first (``from fastdiff import FlowMapModel``: diffusers loads a class only
from a module already imported).
"""
from __future__ import annotations

import torch
from diffusers import StableDiffusionPipeline
from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from fastdiff.pipelines.pipeline_fastdiff_flow_map import map_levels, map_step  # the network needs fastdiff anyway


class FastdiffFlowMapSDPipeline(StableDiffusionPipeline):
    # StableDiffusionPipeline's components, without its type hints: the network is a FlowMapModel, not a UNet
    def __init__(self, vae, text_encoder, tokenizer, unet, scheduler, safety_checker, feature_extractor,
                 image_encoder=None, requires_safety_checker: bool = True):
        super().__init__(vae, text_encoder, tokenizer, unet, scheduler, safety_checker, feature_extractor,
                         image_encoder, requires_safety_checker)

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], num_inference_steps: int = 1, num_images_per_prompt: int = 1,
                 generator: torch.Generator | None = None, latents: torch.Tensor | None = None,
                 output_type: str = "pil", return_dict: bool = True, timesteps: list[int] | None = None):
        """Images for ``prompt`` in ``num_inference_steps`` map steps (any number, one student), or on the given
        ``timesteps``."""
        device = self._execution_device
        prompt_embeds, _ = self.encode_prompt(prompt, device, num_images_per_prompt, False)
        size = self.unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        shape = (prompt_embeds.shape[0], self.unet.config.in_channels, *size)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=prompt_embeds.dtype)
        latents = latents.to(device) * self.scheduler.init_noise_sigma
        levels = map_levels(self.scheduler, num_inference_steps, timesteps, device)
        for i, t in enumerate(self.progress_bar(levels)):
            r = levels[i + 1] if i + 1 < len(levels) else torch.zeros_like(t)  # the last step maps to the data
            output = self.unet(latents, t, encoder_hidden_states=prompt_embeds, r_timestep=r).sample
            latents = map_step(self.scheduler, output, t, r, latents)
        if output_type == "latent":
            image, nsfw = latents, None
        else:
            image = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False)[0]
            image, nsfw = self.run_safety_checker(image, device, prompt_embeds.dtype)
        denormalize = [True] * image.shape[0] if nsfw is None else [not flagged for flagged in nsfw]
        image = self.image_processor.postprocess(image, output_type=output_type, do_denormalize=denormalize)
        self.maybe_free_model_hooks()
        if not return_dict:
            return image, nsfw
        return StableDiffusionPipelineOutput(images=image, nsfw_content_detected=nsfw)
