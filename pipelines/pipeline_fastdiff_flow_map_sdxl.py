"""A diffusers pipeline for text-to-image flow-map (MeanFlow-style) students of Stable Diffusion XL teachers.

The components are StableDiffusionXLPipeline's (VAE, two CLIP text encoders and tokenizers, optional watermarker);
the network is fastdiff's ``FlowMapModel`` around the student's UNet2DConditionModel, with one more input,
``r_timestep``: the timestep it maps to. As ``FastdiffFlowMapSDPipeline``: each step maps the latents from timestep
t to the next one of the schedule, the last to the data, which is the deterministic DDIM step with the student's x0
estimate at (t, r), so any ``num_inference_steps`` samples from the one network; ``timesteps`` (highest first, from
the student's first) samples on those levels instead. The added conditions are SDXL's defaults, as fastdiff trains
with them: the pooled text embedding and the time ids of the default image size (original = target size, no crop).

No classifier-free guidance: the student learnt the teacher's guided velocity, so one pass per step. Load with
``FastdiffFlowMapSDXLPipeline.from_pretrained(folder)`` or ``DiffusionPipeline.from_pretrained(folder,
custom_pipeline="pipeline_fastdiff_flow_map_sdxl", trust_remote_code=True)`` (this file, copied into the folder). The
network's class needs fastdiff installed and imported first (``from fastdiff import FlowMapModel``).
"""
from __future__ import annotations

import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.pipelines.stable_diffusion_xl import StableDiffusionXLPipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from fastdiff.pipelines.pipeline_fastdiff_flow_map import map_levels, map_step  # the network needs fastdiff anyway


class FastdiffFlowMapSDXLPipeline(StableDiffusionXLPipeline):
    # StableDiffusionXLPipeline's components, without its type hints: the network is a FlowMapModel, not a UNet
    def __init__(self, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet, scheduler, image_encoder=None,
                 feature_extractor=None, force_zeros_for_empty_prompt: bool = True, add_watermarker: bool | None = None):
        super().__init__(vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet, scheduler, image_encoder,
                         feature_extractor, force_zeros_for_empty_prompt, add_watermarker)

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], num_inference_steps: int = 1, num_images_per_prompt: int = 1,
                 generator: torch.Generator | None = None, latents: torch.Tensor | None = None,
                 output_type: str = "pil", return_dict: bool = True, timesteps: list[int] | None = None):
        """Images for ``prompt`` in ``num_inference_steps`` map steps (any number, one student), or on the given
        ``timesteps``."""
        device = self._execution_device
        prompt_embeds, _, pooled, _ = self.encode_prompt(prompt=prompt, device=device,
                                                         num_images_per_prompt=num_images_per_prompt,
                                                         do_classifier_free_guidance=False)
        size = self.default_sample_size * self.vae_scale_factor
        # _get_add_time_ids' values (original size, crop corner, target size) without its check, which reads the
        # UNet's add_embedding: the FlowMapModel holds it in .base
        time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=prompt_embeds.dtype, device=device)
        added = {"text_embeds": pooled, "time_ids": time_ids.repeat(prompt_embeds.shape[0], 1)}
        shape = (prompt_embeds.shape[0], self.unet.config.in_channels, self.default_sample_size,
                 self.default_sample_size)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=prompt_embeds.dtype)
        latents = latents.to(device) * self.scheduler.init_noise_sigma
        levels = map_levels(self.scheduler, num_inference_steps, timesteps, device)
        for i, t in enumerate(self.progress_bar(levels)):
            r = levels[i + 1] if i + 1 < len(levels) else torch.zeros_like(t)  # the last step maps to the data
            output = self.unet(latents, t, encoder_hidden_states=prompt_embeds, added_cond_kwargs=added,
                               r_timestep=r).sample
            latents = map_step(self.scheduler, output, t, r, latents)
        image = latents if output_type == "latent" else self._decode(latents)
        if output_type != "latent":
            if self.watermark is not None:
                image = self.watermark.apply_watermark(image)
            image = self.image_processor.postprocess(image, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return StableDiffusionXLPipelineOutput(images=image)

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        """The VAE's image of the latents as StableDiffusionXLPipeline decodes them: upcast where a float16 VAE
        overflows, the latents' mean and std undone where the VAE records them."""
        upcast = self.vae.dtype == torch.float16 and self.vae.config.force_upcast
        if upcast:
            self.upcast_vae()
        latents = latents.to(next(iter(self.vae.post_quant_conv.parameters())).dtype)
        mean, std = getattr(self.vae.config, "latents_mean", None), getattr(self.vae.config, "latents_std", None)
        if mean is not None and std is not None:
            mean, std = (torch.tensor(v).view(1, -1, 1, 1).to(latents) for v in (mean, std))
            latents = latents * std / self.vae.config.scaling_factor + mean
        else:
            latents = latents / self.vae.config.scaling_factor
        image = self.vae.decode(latents, return_dict=False)[0]
        if upcast:
            self.vae.to(dtype=torch.float16)
        return image
