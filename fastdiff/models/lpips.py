"""LPIPS (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual Metric"; reference
richzhang/PerceptualSimilarity, the ``lpips`` package: ``lpips.py`` ``LPIPS``, ``pretrained_networks.py`` ``vgg16``),
the VGG variant, built offline from a local weights file:

    x -> (x - shift) / scale                      (ScalingLayer; inputs in [-1, 1])
    f_l = VGG16 features after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3   (torchvision ``features`` 3, 8, 15, 22, 29)
    n_l = f_l / (|f_l|_channels + 1e-10)           (unit norm per position across channels)
    d(x, y) = sum_l mean_{h,w} ( w_l . (n_l(x) - n_l(y))^2 )   (1x1 "lin" conv, non-negative weights, no bias)

The architecture is torchvision's ``vgg16`` built without weights; the weights come only from the user's file (no
download): a safetensors file or a ``.pth`` (``torch.load(weights_only=True)``) with the ``lpips`` package's key names
(``net.slice{1..5}.{i}.weight|bias`` holding torchvision's feature index i, ``lin{0..4}.model.1.weight``);
torchvision's own ``features.{i}.*`` names are accepted for the VGG part.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import FastdiffError

SHIFT = (-0.030, -0.088, -0.188)  # lpips ScalingLayer: the ImageNet mean in [-1, 1] units
SCALE = (0.458, 0.448, 0.450)     # ... and the ImageNet std in the same units
RELU_ENDS = (4, 9, 16, 23, 30)    # torchvision vgg16().features slice ends: relu1_2 .. relu5_3 are at end - 1
CHANNELS = (64, 128, 256, 512, 512)
RESIZE = 224                      # rfpp train.py upsamples both images to 224 (bilinear) before LPIPS
EPS = 1e-10                       # lpips normalize_tensor


def _vgg_features() -> nn.Sequential:
    """torchvision's ``vgg16().features`` up to relu5_3 (its config "D"), without building the 100M-parameter head."""
    from torchvision.models.vgg import cfgs, make_layers
    return make_layers(cfgs["D"])[:RELU_ENDS[-1]]


def _read(path: str) -> dict[str, torch.Tensor]:
    p = Path(path)
    if not p.is_file():
        raise FastdiffError(f"objective.lpips_path: no file at {path} (give a local LPIPS-VGG weights file)")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(p))
        state = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as err:  # any unreadable file is the user's input problem: one line
        raise FastdiffError(f"objective.lpips_path: cannot read {path}: {type(err).__name__}") from None
    if not isinstance(state, dict):
        raise FastdiffError(f"objective.lpips_path: {path} holds no state dict")
    return state


def _split(state: dict[str, torch.Tensor], path: str) -> tuple[dict, dict]:
    """(torchvision features state dict, lin state dict) from the lpips package's (or torchvision's) key names."""
    features, lins = {}, {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        if m := re.fullmatch(r"net\.slice\d\.(\d+)\.(weight|bias)", key) or re.fullmatch(
                r"features\.(\d+)\.(weight|bias)", key):
            features[f"{m.group(1)}.{m.group(2)}"] = value
        elif m := re.fullmatch(r"lin(\d)\.model\.1\.weight", key):
            lins[f"{m.group(1)}.weight"] = value
    if not features or len(lins) != len(CHANNELS):
        raise FastdiffError(f"objective.lpips_path: {path} lacks the VGG16 features or the 5 lin layers "
                            "(lpips key names net.sliceK.i.*, linK.model.1.weight)")
    return features, lins


class LPIPS(nn.Module):
    """LPIPS-VGG distance per sample, ``(n,)``, between images in [-1, 1]; frozen (gradients flow to the inputs)."""

    def __init__(self, features: dict[str, torch.Tensor], lins: dict[str, torch.Tensor], resize: int | None = RESIZE):
        super().__init__()
        self.net = _vgg_features()
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in CHANNELS)
        try:
            self.net.load_state_dict(features)
            self.lins.load_state_dict(lins)
        except RuntimeError as err:
            raise FastdiffError(f"objective.lpips_path: weights do not fit LPIPS-VGG16: "
                                f"{str(err).splitlines()[0]}") from None
        if any((lin.weight < 0).any() for lin in self.lins):
            raise FastdiffError("objective.lpips_path: negative lin weights (LPIPS's lin layers are non-negative)")
        # float64 constants, cast to the weights' dtype in forward (a float32 buffer would round them for .double())
        self.register_buffer("shift", torch.tensor(SHIFT, dtype=torch.float64).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE, dtype=torch.float64).view(1, 3, 1, 1), persistent=False)
        self.resize = resize
        self.requires_grad_(False).eval()

    @classmethod
    def from_file(cls, path: str, resize: int | None = RESIZE) -> "LPIPS":
        return cls(*_split(_read(path), path), resize=resize)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Grey -> 3 channels; bilinear to ``resize`` (VGG's receptive field needs it on 28-32 px images)."""
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise FastdiffError(f"LPIPS needs images (n, 1 or 3, h, w) in [-1, 1], got shape {tuple(x.shape)}")
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if self.resize is not None and tuple(x.shape[-2:]) != (self.resize, self.resize):
            x = F.interpolate(x, size=self.resize, mode="bilinear")
        return x

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        dtype = self.lins[0].weight.dtype
        both = torch.cat([self.prepare(x.to(dtype)), self.prepare(y.to(dtype))])
        h = (both - self.shift.to(dtype)) / self.scale.to(dtype)
        total, start = 0, 0
        for end, lin in zip(RELU_ENDS, self.lins):
            h = self.net[start:end](h)
            start = end
            unit = h / (h.pow(2).sum(dim=1, keepdim=True).sqrt() + EPS)
            a, b = unit.chunk(2)
            total = total + lin((a - b).pow(2)).mean(dim=(1, 2, 3))
        return total
