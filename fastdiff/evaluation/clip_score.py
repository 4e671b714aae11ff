"""CLIP score with open_clip: the cosine between an image's and its prompt's embeddings.

Convention (stated in every result): ``torchmetrics`` (default) reports 100 * max(cos, 0), as
torchmetrics' ``CLIPScore`` and Hessel et al. 2021 (with w = 100 instead of 2.5); ``cosine`` reports the raw cosine.
Weights are a local file (``.safetensors`` or a ``weights_only`` torch file); a pretrained tag such as
``openai`` downloads only on a machine with a network and without HF_HUB_OFFLINE.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import FastdiffError
from ..machine import offline

CONVENTIONS = ("torchmetrics", "cosine")


def prompts_for(prompts: list[str], num_images: int, num_classes: int | None = None) -> list[str]:
    """Pair prompts with images: one per image, one for all, or (class-conditional models) one per class,
    image i having label i mod C as fastdiff's sampler assigns them."""
    if len(prompts) == num_images:
        return prompts
    if len(prompts) == 1:
        return prompts * num_images
    if num_classes and len(prompts) == num_classes:
        return [prompts[i % num_classes] for i in range(num_images)]
    per_class = f", or {num_classes} (one per class)" if num_classes else ""
    raise FastdiffError(f"{len(prompts)} prompts for {num_images} images: give {num_images} (one per image), "
                        f"1 (the same for all){per_class}")


class ClipScorer(torch.nn.Module):
    def __init__(self, model_name: str, weights: str | None, config: str | None = None,
                 convention: str = "torchmetrics", random_weights: bool = False):
        super().__init__()
        import open_clip

        if convention not in CONVENTIONS:
            raise FastdiffError(f"CLIP score convention {convention!r} is not one of {', '.join(CONVENTIONS)}")
        if config:
            if not Path(config).is_file():
                raise FastdiffError(f"--clip-config {config}: no such file")
            open_clip.add_model_config(config)
        if model_name not in open_clip.list_models():
            raise FastdiffError(f"unknown open_clip model {model_name!r}; e.g. ViT-B-32, or pass --clip-config FILE.json")
        if weights is None and not random_weights:
            raise FastdiffError("CLIP score needs weights: pass --clip-weights FILE (open_clip ships configs, not weights)")
        if weights and not Path(weights).is_file() and (os.sep in weights or offline()):
            raise FastdiffError(f"--clip-weights {weights}: no such file")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                if weights and Path(weights).is_file() and not weights.endswith(".safetensors"):
                    # open_clip retries torch.load without weights_only on a TypeError; refuse unsafe files first.
                    torch.load(weights, map_location="cpu", weights_only=True)
                self.model = open_clip.create_model(model_name, pretrained=weights, weights_only=True)
        except Exception as exc:  # noqa: BLE001 - a bad file or tag becomes one line
            raise FastdiffError(f"could not load CLIP {model_name} from {weights}: {str(exc).splitlines()[0][:200]}") from None
        self.model.eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(model_name)
        cfg = self.model.visual.preprocess_cfg
        self.size = cfg["size"] if isinstance(cfg["size"], int) else cfg["size"][0]
        self.register_buffer("mean", torch.tensor(cfg["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg["std"]).view(1, 3, 1, 1), persistent=False)
        self.convention = convention
        self.model_name = model_name

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 1 or 3, H, W) -> CLIP input as open_clip's own transform makes it: shortest side resized to the
        model's size (long side truncated, as torchvision's Resize does), bicubic with antialiasing on the uint8
        image (PIL resizes in uint8 too), centre crop with a rounded offset, then the model's mean/std. torchvision's
        tensor ops are within one uint8 level of open_clip's PIL path (tests/test_clip_score.py)."""
        from torchvision.transforms.v2 import functional as TF

        x = images.to(self.mean.device)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if min(x.shape[-2:]) != self.size:
            x = TF.resize(x, self.size, interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
        x = TF.center_crop(x, [self.size, self.size]).float() / 255.0
        return (x - self.mean) / self.std

    @torch.no_grad()
    def cosines(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        if len(prompts) != len(images):
            raise FastdiffError(f"{len(prompts)} prompts for {len(images)} images")
        img = F.normalize(self.model.encode_image(self.preprocess(images)).float(), dim=-1)
        txt = F.normalize(self.model.encode_text(self.tokenizer(prompts).to(self.mean.device)).float(), dim=-1)
        return (img * txt).sum(-1)

    def scores(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        cos = self.cosines(images, prompts)
        return 100.0 * cos.clamp(min=0) if self.convention == "torchmetrics" else cos
