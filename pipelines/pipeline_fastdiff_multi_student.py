"""Diffusers pipelines for multi-student distillation (MSD; Song et al. 2024, arXiv 2410.23274): K students, each
distilled on its own part of the conditions, behind one router that sends every condition to its student.

Class-conditional teachers: ``FastdiffMultiStudentPipeline`` routes each class label by a table. Text-to-image
(Stable Diffusion) teachers: ``FastdiffMultiStudentTextPipeline`` routes each prompt to the student whose prompt
cluster has the nearest centroid (``prompt_features``: the mean over tokens of the prompt embedding the UNet reads,
float64; the centroids are a buffer of ``PromptRoutedStudents``, saved in its safetensors file).

The K networks live in one component, ``MultiStudentUNet`` (one safetensors file, each student's config in its
config.json), so the folder loads with ``FastdiffMultiStudentPipeline.from_pretrained(folder)`` and needs no remote
code. Sampling is ``FastdiffClassConditionalPipeline``'s (the same noise draw, scheduler and CFG), with each step's
network output assembled per student: a batch whose labels all go to one student is computed exactly as that
student's own pipeline computes it, bit for bit.
"""
from __future__ import annotations

import diffusers
import numpy as np
import torch
from diffusers import ConfigMixin, DiffusionPipeline, ImagePipelineOutput, ModelMixin, SchedulerMixin
from diffusers.configuration_utils import register_to_config
from diffusers.utils.torch_utils import randn_tensor


def networks_from_configs(configs: list, default: str, owner: str) -> torch.nn.ModuleList:
    """The students' networks, each built (weightless) from its saved config by its diffusers class name; only
    diffusers' own classes, so a router folder runs no code of its own."""
    nets = []
    for config in configs:
        config = dict(config)
        name = config.pop("_class_name", default)
        cls = getattr(diffusers, name, None)
        if cls is None:
            raise ValueError(f"{owner}: {name} is not a diffusers model class")
        nets.append(cls.from_config(config))
    return torch.nn.ModuleList(nets)

class MultiStudentUNet(ModelMixin, ConfigMixin):
    """K diffusers networks and the router: ``class_to_student[c]`` is the student of class label c.

    Args:
        students: each student's diffusers config (with its ``_class_name``, a diffusers model class).
        class_to_student: for every real class label, the index of its student.
    """

    @register_to_config
    def __init__(self, students: list, class_to_student: list):
        super().__init__()
        self.nets = nets = networks_from_configs(students, "UNet2DModel", "MultiStudentUNet")
        if any(not 0 <= k < len(nets) for k in class_to_student):
            raise ValueError(f"class_to_student names a student outside 0..{len(nets) - 1}: {class_to_student}")

    @property
    def num_classes(self) -> int:
        return len(self.config.class_to_student)

    def student_of(self, labels: torch.Tensor) -> torch.Tensor:
        """The student index of each class label."""
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"class labels must be in 0..{self.num_classes - 1}, got {labels.tolist()}")
        table = torch.as_tensor(self.config.class_to_student, device=labels.device)
        return table[labels]

    def classes_of(self, student: int) -> list[int]:
        return [c for c, k in enumerate(self.config.class_to_student) if k == student]


class FastdiffMultiStudentPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "students"

    def __init__(self, students: MultiStudentUNet, scheduler: SchedulerMixin):
        super().__init__()
        self.register_modules(students=students, scheduler=scheduler)

    @property
    def num_classes(self) -> int:
        return self.students.num_classes

    @staticmethod
    def _output(unet, image, t, labels, guidance_scale: float) -> torch.Tensor:
        """One student's network output, as FastdiffClassConditionalPipeline computes it (CFG with the null class,
        the last class embedding, when guidance_scale is not 1)."""
        if guidance_scale == 1.0:
            return unet(image, t, class_labels=labels).sample
        null = torch.full_like(labels, unet.config.num_class_embeds - 1)
        both = unet(torch.cat([image, image]), t, class_labels=torch.cat([null, labels])).sample
        uncond, cond = both.chunk(2)
        return uncond + guidance_scale * (cond - uncond)

    @torch.no_grad()
    def __call__(self, class_labels=None, batch_size: int = 1, num_inference_steps: int = 1,
                 guidance_scale: float = 1.0, generator: torch.Generator | list | None = None,
                 output_type: str = "pil", return_dict: bool = True):
        """Generate images of the given classes (default: 0, 1, ..., cycling over the classes), each by its student."""
        device = self._execution_device
        if class_labels is None:
            class_labels = torch.arange(batch_size) % self.num_classes
        labels = torch.as_tensor(class_labels, device=device).long().reshape(-1)
        route = self.students.student_of(labels)
        first = self.students.nets[0]
        size = first.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        shape = (len(labels), first.config.in_channels, *size)
        image = randn_tensor(shape, generator=generator, device=device, dtype=first.dtype)
        groups = [(k, (route == k).nonzero().squeeze(1)) for k in range(len(self.students.nets))]
        groups = [(k, idx) for k, idx in groups if len(idx)]

        self.scheduler.set_timesteps(num_inference_steps)
        for t in self.progress_bar(self.scheduler.timesteps):
            if len(groups) == 1:  # one student: its own pipeline's call on the whole batch
                k, _ = groups[0]
                output = self._output(self.students.nets[k], image, t, labels, guidance_scale)
            else:
                output = torch.empty_like(image)
                for k, idx in groups:
                    output[idx] = self._output(self.students.nets[k], image[idx], t, labels[idx], guidance_scale)
            # One scheduler step on the whole batch: multi-step re-noising draws the noise the student's own
            # pipeline would for the same batch.
            image = self.scheduler.step(output, t, image, generator=generator).prev_sample

        image = (image / 2 + 0.5).clamp(0, 1)
        if output_type != "pt":
            image = image.cpu().permute(0, 2, 3, 1).float().numpy()
            if output_type == "pil":
                image = self.numpy_to_pil(image)
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)


def prompt_features(pipe, prompts: list[str]) -> torch.Tensor:
    """The routing feature of each prompt: the text encoder's prompt embedding as ``pipe.encode_prompt`` makes it for
    the UNet (tokens padded to the tokenizer's length), averaged over the tokens in float64. (B, D)."""
    embeds = pipe.encode_prompt(list(prompts), pipe._execution_device, 1, False)[0]
    return embeds.double().mean(dim=1).cpu()


def nearest_centroid(features: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid (squared Euclidean distance, float64; the lowest index on a tie)."""
    d = ((features.double()[:, None, :] - centroids.double().to(features.device)[None]) ** 2).sum(-1)
    return d.argmin(dim=1)


class PromptRoutedStudents(ModelMixin, ConfigMixin):
    """K diffusers networks (the students) and the centroids of their prompt clusters, one row per student.

    Args:
        students: each student's diffusers config (with its ``_class_name``, a diffusers model class).
        feature_dim: the width of the routing feature (the text encoder's hidden size).
    """

    @register_to_config
    def __init__(self, students: list, feature_dim: int):
        super().__init__()
        self.nets = nets = networks_from_configs(students, "UNet2DConditionModel", "PromptRoutedStudents")
        self.register_buffer("centroids", torch.zeros(len(nets), feature_dim, dtype=torch.float64))


class FastdiffMultiStudentTextPipeline(DiffusionPipeline):
    """K Stable Diffusion students behind a prompt router: each prompt is generated by ``StableDiffusionPipeline``
    with its student's UNet and the shared VAE, text encoder, tokenizer and scheduler. A batch whose prompts all go
    to one student is that student's own pipeline call, bit for bit; a mixed batch draws the whole batch's initial
    noise first (from ``generator``, as the student's pipeline would for that batch) and runs each student on its
    rows, or, with one generator per image, gives each group its images' generators."""

    model_cpu_offload_seq = "text_encoder->students->vae"

    def __init__(self, students: PromptRoutedStudents, vae, text_encoder, tokenizer, scheduler: SchedulerMixin):
        super().__init__()
        self.register_modules(students=students, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                              scheduler=scheduler)

    def student_pipeline(self, k: int):
        """Student k as a plain ``StableDiffusionPipeline`` (the shared components, its UNet)."""
        return diffusers.StableDiffusionPipeline(vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer,
                                                 unet=self.students.nets[k], scheduler=self.scheduler,
                                                 safety_checker=None, feature_extractor=None,
                                                 requires_safety_checker=False)

    @torch.no_grad()
    def route(self, prompts) -> torch.Tensor:
        """The student index of each prompt: its nearest centroid."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        return nearest_centroid(prompt_features(self.student_pipeline(0), prompts), self.students.centroids)

    @torch.no_grad()
    def __call__(self, prompt, num_inference_steps: int = 1, guidance_scale: float = 0.0,
                 generator: torch.Generator | list | None = None, output_type: str = "pil", return_dict: bool = True,
                 **kwargs):
        """Generate ``num_images_per_prompt`` images per prompt (default 1), each by its prompt's student (other
        arguments go to ``StableDiffusionPipeline``; guidance off by default: the students' guidance is distilled
        in)."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        route = self.route(prompts)
        groups = [(k, (route == k).nonzero().squeeze(1).tolist()) for k in range(len(self.students.nets))]
        groups = [(k, idx) for k, idx in groups if idx]
        call = dict(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, **kwargs)
        if len(groups) == 1:  # one student: its own pipeline's call on the whole batch
            return self.student_pipeline(groups[0][0])(prompt=prompts, generator=generator, output_type=output_type,
                                                       return_dict=return_dict, **call)
        if kwargs.get("latents") is not None or kwargs.get("prompt_embeds") is not None:
            raise ValueError("a batch routed to several students takes prompts, not latents / prompt_embeds")
        per_prompt = kwargs.get("num_images_per_prompt") or 1
        total = len(prompts) * per_prompt  # images in the pipeline's order: each prompt's images together
        if isinstance(generator, list) and len(generator) != total:
            raise ValueError(f"{len(generator)} generators for {total} images ({len(prompts)} prompts x "
                             f"num_images_per_prompt {per_prompt}): give one per image, or one for the batch")
        latents = None
        if not isinstance(generator, list):  # the whole batch's first noise, as one student's pipeline draws it
            first = self.students.nets[0]
            size = first.config.sample_size
            shape = (total, first.config.in_channels, size, size)
            latents = randn_tensor(shape, generator=generator, device=self._execution_device,
                                   dtype=self.text_encoder.dtype)
        parts = {}
        for k, idx in groups:
            rows = [i * per_prompt + j for i in idx for j in range(per_prompt)]  # its prompts' images
            gen = [generator[r] for r in rows] if isinstance(generator, list) else generator
            sub = None if latents is None else latents[rows]
            out = self.student_pipeline(k)(prompt=[prompts[i] for i in idx], generator=gen, latents=sub,
                                           output_type="pt" if output_type == "pt" else "np", **call).images
            parts.update(zip(rows, out))
        stack = torch.stack if output_type == "pt" else np.stack
        image = stack([parts[r] for r in range(total)])
        if output_type == "pil":
            image = self.numpy_to_pil(image)
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)
