"""A diffusers pipeline for multi-student distillation (MSD; Song et al. 2024, arXiv 2410.23274): K class-conditional
students, each distilled on its own part of the classes, behind one router that sends every class label to its student.

The K networks live in one component, ``MultiStudentUNet`` (one safetensors file, each student's config in its
config.json), so the folder loads with ``FastdiffMultiStudentPipeline.from_pretrained(folder)`` and needs no remote
code. Sampling is ``FastdiffClassConditionalPipeline``'s (the same noise draw, scheduler and CFG), with each step's
network output assembled per student: a batch whose labels all go to one student is computed exactly as that
student's own pipeline computes it, bit for bit.
"""
from __future__ import annotations

import diffusers
import torch
from diffusers import ConfigMixin, DiffusionPipeline, ImagePipelineOutput, ModelMixin, SchedulerMixin
from diffusers.configuration_utils import register_to_config
from diffusers.utils.torch_utils import randn_tensor


class MultiStudentUNet(ModelMixin, ConfigMixin):
    """K diffusers networks and the router: ``class_to_student[c]`` is the student of class label c.

    Args:
        students: each student's diffusers config (with its ``_class_name``, a diffusers model class).
        class_to_student: for every real class label, the index of its student.
    """

    @register_to_config
    def __init__(self, students: list, class_to_student: list):
        super().__init__()
        nets = []
        for config in students:
            config = dict(config)
            name = config.pop("_class_name", "UNet2DModel")
            cls = getattr(diffusers, name, None)
            if cls is None:
                raise ValueError(f"MultiStudentUNet: {name} is not a diffusers model class")
            nets.append(cls.from_config(config))
        self.nets = torch.nn.ModuleList(nets)
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
