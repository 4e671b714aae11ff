"""Real images for GAN heads and consistency distillation: Fashion-MNIST (Debian's dataset-fashion-mnist IDX
layout), or a folder of images with captions (the Hugging Face imagefolder layout) for latent and
text-to-image teachers."""
from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import torch

from ..errors import FastdiffError

SPLITS = {"train": "train", "test": "t10k"}
FMNIST_ENV = "FASTDIFF_FASHION_MNIST"
FMNIST_DEFAULT = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist


def fashion_mnist_root(path: str | None, flag: str = "data.path") -> str:
    """The Fashion-MNIST folder: ``path`` when given, else ``$FASTDIFF_FASHION_MNIST``, else Debian's; a missing
    one is a one-line error saying the three ways to provide it."""
    root = path or os.environ.get(FMNIST_ENV) or FMNIST_DEFAULT
    if not Path(root).is_dir():
        how = f"{flag} DIR" if flag.startswith("--") else f"{flag}=DIR"
        raise FastdiffError(f"Fashion-MNIST: {root} is not a folder; pass {how}, set ${FMNIST_ENV}, or "
                            f"`apt-get install dataset-fashion-mnist` (installs it in {FMNIST_DEFAULT})")
    return root


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 8:
        raise FastdiffError(f"{path}: not an IDX file of unsigned bytes")
    ndim = data[3]
    dims = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise FastdiffError(f"{path}: truncated IDX file ({body.size} bytes for shape {dims})")
    return body.reshape(dims)


def _find(root: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (root / name).is_file():
            return root / name
    raise FastdiffError(f"{root}: missing {stem}.gz; point data.path at a Fashion-MNIST folder "
                        "(apt-get install dataset-fashion-mnist puts one in /usr/share/datasets/fashion-mnist)")


def load_fashion_mnist(path: str | None, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (N, 28, 28) and int64 labels (N,)."""
    root = Path(fashion_mnist_root(path))
    if split not in SPLITS:
        raise FastdiffError(f"data.split must be one of {sorted(SPLITS)}, got {split!r}")
    prefix = SPLITS[split]
    images = _read_idx(_find(root, f"{prefix}-images-idx3-ubyte"))
    labels = _read_idx(_find(root, f"{prefix}-labels-idx1-ubyte")).astype(np.int64)
    if len(images) != len(labels):
        raise FastdiffError(f"{path}: {len(images)} images but {len(labels)} labels")
    return images, labels


def to_model_range(images: np.ndarray, resolution: int) -> torch.Tensor:
    """uint8 (N, H, W) -> float (N, 1, R, R) in [-1, 1], padded with -1 (black) as the teachers were trained."""
    x = torch.from_numpy(np.array(images, copy=True)).float().div(127.5).sub(1.0).unsqueeze(1)
    pad = resolution - x.shape[-1]
    if pad < 0 or pad % 2:
        raise FastdiffError(f"images of size {x.shape[-1]} cannot be padded to resolution {resolution}")
    if pad:
        x = torch.nn.functional.pad(x, (pad // 2,) * 4, value=-1.0)
    return x


def as_model_range(x: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float in [-1, 1]; float tensors are already there."""
    return x.float().div(127.5).sub(1.0) if x.dtype == torch.uint8 else x


class RealImages:
    """Random batches of real images with their labels or captions, drawn with a dedicated torch.Generator
    (checkpointable). Images are float in [-1, 1] (or uint8, converted per batch)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | None, seed: int = 0,
                 captions: list[str] | None = None):
        self.images, self.labels, self.captions = images, labels, captions
        self.rng = torch.Generator().manual_seed(seed)

    def __len__(self):
        return len(self.images)

    def map_images(self, fn, chunk: int = 32) -> None:
        """Replace every image by ``fn`` of it, ``chunk`` images at a time (e.g. latent teachers' VAE posteriors,
        computed once instead of every step). The batches drawn afterwards follow the same random stream."""
        first = fn(self.images[:chunk])
        mapped = first.new_empty((len(self.images), *first.shape[1:]))  # filled in place: no second copy at the end
        mapped[:len(first)] = first
        for i in range(chunk, len(self.images), chunk):
            mapped[i:i + chunk] = fn(self.images[i:i + chunk])
        self.images = mapped

    def batch(self, n: int, device) -> tuple[torch.Tensor, torch.Tensor | None, list[str] | None]:
        """(images, labels or None, captions or None)."""
        idx = torch.randint(len(self.images), (n,), generator=self.rng)
        x = as_model_range(self.images[idx].to(device))
        labels = self.labels[idx].to(device) if self.labels is not None else None
        captions = [self.captions[i] for i in idx.tolist()] if self.captions is not None else None
        return x, labels, captions


def load_image_folder(path: str, size: int, channels: int = 3) -> tuple[torch.Tensor, list[str] | None]:
    """uint8 (N, C, size, size) images, each resized (shortest side, bicubic) and centre-cropped, and their
    captions from ``metadata.jsonl`` ({"file_name": ..., "text": ...} per line) when the folder has one."""
    from PIL import Image

    if path is None:
        raise FastdiffError("data.name imagefolder needs data.path: a folder of images (with metadata.jsonl captions "
                            "for text-to-image teachers)")
    root = Path(path)
    if not root.is_dir():
        raise FastdiffError(f"data.path {path!r} is not a folder")
    meta = root / "metadata.jsonl"
    captions = None
    if meta.is_file():
        import json

        try:
            rows = [json.loads(line) for line in meta.read_text(encoding="utf-8").splitlines() if line.strip()]
            files = [root / r["file_name"] for r in rows]
            captions = [str(r["text"] if "text" in r else r["caption"]) for r in rows]
        except (ValueError, KeyError, TypeError) as exc:
            raise FastdiffError(f"{meta}: each line needs \"file_name\" and \"text\" ({exc})") from None
    else:
        files = sorted(f for f in root.iterdir() if f.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp", ".bmp"))
    if not files:
        raise FastdiffError(f"data.path {path}: no images (png, jpg, webp, bmp) found")
    out = torch.empty((len(files), channels, size, size), dtype=torch.uint8)  # filled in place: one copy in memory
    pixels = out.numpy()
    for i, f in enumerate(files):
        try:
            img = Image.open(f).convert("RGB" if channels == 3 else "L")
        except (OSError, ValueError) as exc:
            raise FastdiffError(f"{f}: not a readable image ({exc})") from None
        scale = size / min(img.size)
        w, h = max(size, round(img.width * scale)), max(size, round(img.height * scale))
        img = img.resize((w, h), Image.BICUBIC)
        left, top = (w - size) // 2, (h - size) // 2
        arr = np.asarray(img.crop((left, top, left + size, top + size)))
        pixels[i] = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return out, captions


ANALYTIC_SAMPLES = 50_000


def real_images_for(data_cfg, teacher, seed: int) -> RealImages:
    """Load the configured data set and check it against the teacher's sample shape.

    ``analytic``: exact samples of the analytic teacher's mixture (labels = modes), for GAN heads in benchmarks.
    """
    if data_cfg.name == "analytic":
        if not hasattr(teacher.model, "sample_true"):
            raise FastdiffError("data.name analytic needs the analytic (Gaussian-mixture) teacher")
        rng = torch.Generator().manual_seed(seed + 1)
        modes = torch.multinomial(teacher.model.log_weights.exp(), ANALYTIC_SAMPLES, replacement=True, generator=rng)
        images = teacher.model.sample_true(ANALYTIC_SAMPLES, rng, class_labels=modes)
        return RealImages(images, modes, seed)
    channels, height, width = teacher.image_shape
    if data_cfg.name == "imagefolder":
        if data_cfg.resolution not in (None, height) or height != width:
            raise FastdiffError(f"data.resolution {data_cfg.resolution} does not match the teacher's image size "
                                f"{height}x{width}")
        if teacher.num_classes:
            raise FastdiffError("data.name imagefolder has no class labels; a class-conditional teacher needs "
                                "labelled data (fashion-mnist)")
        images, captions = load_image_folder(data_cfg.path, height, channels)
        if teacher.conditioning == "text" and captions is None:
            raise FastdiffError(f"data.path {data_cfg.path}: a text-to-image teacher needs captions "
                                "(metadata.jsonl with file_name and text)")
        return RealImages(images, None, seed, captions if teacher.conditioning == "text" else None)
    if data_cfg.name != "fashion-mnist":
        raise FastdiffError(f"data.name {data_cfg.name!r} is not supported; use fashion-mnist, imagefolder, analytic or teacher")
    resolution = data_cfg.resolution or height
    if resolution != height or height != width:
        raise FastdiffError(f"data.resolution {resolution} does not match the teacher's sample size {height}x{width}")
    if channels != 1:
        raise FastdiffError(f"fashion-mnist has 1 channel but the teacher makes {channels}-channel images; "
                            "use data.name=imagefolder with data.path pointing at a folder of images")
    images, labels = load_fashion_mnist(data_cfg.path, data_cfg.split)
    return RealImages(to_model_range(images, resolution), torch.from_numpy(labels), seed)
