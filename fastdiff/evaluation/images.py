"""Where evaluation images come from: a folder of images, an .npz of uint8 images, Fashion-MNIST, or a model
folder (a student or a teacher) sampled on the fly. Every source yields uint8 (N, C, H, W) tensors."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from ..errors import FastdiffError
from ..inference.sampling import batch_starts

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
FMNIST_PREFIX = "fashion-mnist:"


@dataclass
class ImageSource:
    name: str                         # short label base, e.g. "fmnist-train" or a folder's name
    count: int | None                 # images available; None for a model (unlimited)
    shape: tuple[int, int, int]       # (C, H, W)
    read: Callable[..., Iterator[torch.Tensor]]  # (num, batch_size, part) -> uint8 batches (``batch_starts``)
    is_model: bool = False
    num_classes: int | None = None    # class-conditional models: image i has label i mod num_classes
    guidance_scale: float | None = None  # a sampled model's scale: the one given, or its own default (else None)

    def resolve_num(self, num: int | None) -> int:
        """How many images ``num`` means here (None: all of them), checked against what the source has."""
        if num is None:
            if self.count is None:
                raise FastdiffError(f"{self.name} is a model: pass --num N (how many images to sample)")
            return self.count
        if num <= 0:
            raise FastdiffError(f"--num must be positive, got {num}")
        if self.count is not None and num > self.count:
            raise FastdiffError(f"--num {num} but {self.name} has only {self.count} images")
        return num

    def batches(self, num: int | None, batch_size: int, crop: int | None = None,
                part: tuple[int, int] | None = None) -> Iterator[torch.Tensor]:
        """The images in batches; ``part=(i, P)``: only batches i, i + P, i + 2P, ... (process i of P's share)."""
        if batch_size <= 0:
            raise FastdiffError(f"--batch-size must be positive, got {batch_size}")
        for batch in self.read(self.resolve_num(num), batch_size, part):
            yield centre_crop(batch, crop) if crop else batch

    def cropped_shape(self, crop: int | None) -> tuple[int, int, int]:
        if crop is None:
            return self.shape
        c, h, w = self.shape
        if crop <= 0 or crop > min(h, w):
            raise FastdiffError(f"--crop {crop} must be between 1 and the image size {min(h, w)}")
        return c, crop, crop


def centre_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    return x[..., top:top + size, left:left + size]


def _array_batches(images: np.ndarray) -> Callable:
    def read(num, batch_size, part=None):
        for _, start in batch_starts(num, batch_size, part):
            yield torch.from_numpy(np.array(images[start:min(num, start + batch_size)]))
    return read


def _as_nchw(arr: np.ndarray, what: str) -> np.ndarray:
    if arr.dtype != np.uint8:
        raise FastdiffError(f"{what}: images must be uint8 in [0, 255], got dtype {arr.dtype}")
    if arr.ndim == 3:
        return arr[:, None]
    if arr.ndim == 4 and arr.shape[-1] in (1, 3):
        return arr.transpose(0, 3, 1, 2)
    if arr.ndim == 4 and arr.shape[1] in (1, 3):
        return arr
    raise FastdiffError(f"{what}: images of shape {arr.shape} are not (N, H, W), (N, H, W, C) or (N, C, H, W) "
                        "with 1 (grayscale) or 3 (RGB) channels")


def _npz_source(path: Path) -> ImageSource:
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = list(z.keys())
            key = next((k for k in ("images", "arr_0", "x") if k in keys), keys[0] if len(keys) == 1 else None)
            if key is None:
                raise FastdiffError(f"{path}: which array holds the images? name it 'images' (found {keys})")
            arr = _as_nchw(z[key], str(path))
    except (ValueError, OSError, EOFError) as exc:
        raise FastdiffError(f"{path}: not a readable .npz of images ({exc})") from None
    return ImageSource(path.stem, len(arr), tuple(arr.shape[1:]), _array_batches(arr))


def _read_image(file: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(file) as img:
            if img.mode not in ("L", "RGB"):
                raise FastdiffError(f"{file}: mode {img.mode} ({len(img.getbands())} channels); fastdiff reads "
                                    "8-bit grayscale (L) or RGB images")
            arr = np.asarray(img)
    except (UnidentifiedImageError, OSError) as exc:
        raise FastdiffError(f"{file}: not a readable image ({exc})") from None
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _folder_source(path: Path) -> ImageSource:
    files = sorted(f for f in path.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FastdiffError(f"{path}: no images ({', '.join(IMAGE_SUFFIXES)}) and not a model folder")
    shape = _read_image(files[0]).shape

    def read(num, batch_size, part=None):
        for _, start in batch_starts(num, batch_size, part):
            batch = []
            for f in files[start:min(num, start + batch_size)]:
                img = _read_image(f)
                if img.shape != shape:
                    raise FastdiffError(f"{f}: shape (C, H, W) {img.shape} differs from {files[0].name}'s {shape}; "
                                        "all images of a set must have one size and channel count")
                batch.append(img)
            yield torch.from_numpy(np.stack(batch))
    return ImageSource(path.name, len(files), shape, read)


def _fashion_mnist_source(spec: str, data_path: str | None) -> ImageSource:
    from ..training.data import fashion_mnist_root, load_fashion_mnist

    split = spec[len(FMNIST_PREFIX):]
    if split not in ("train", "test"):
        raise FastdiffError(f"{spec}: use fashion-mnist:train or fashion-mnist:test")
    images, _ = load_fashion_mnist(fashion_mnist_root(data_path, "--data-path"), split)
    return ImageSource(f"fmnist-{split}", len(images), (1, *images.shape[1:]), _array_batches(images[:, None]))


def model_sources(path: str, steps: list[int], seed: int, guidance_scale: float | None, device,
                  prompts: list[str] | None = None, levels=None) -> list[ImageSource]:
    """One source per step count, all sampling the same network (loaded once); text-to-image models sample
    image i from ``prompts[i]``."""
    from ..inference.sampling import check_prompts, load_sampler

    for k in steps:
        if k is None or k <= 0:
            raise FastdiffError(f"{path} is a model folder: pass --steps K (> 0) to sample it")
    model, loaded = load_sampler(path, device, guidance_scale, levels)
    if loaded.conditioning != "text":
        prompts = None  # class-conditional models pair prompts with classes (CLIP score), not samples
    check_prompts(loaded, prompts)  # before the slow part
    return [sampled_source(f"{Path(path).name}-{k}step", model, loaded, k, seed, device, guidance_scale, prompts)
            for k in steps]


def sampled_source(name: str, model, loaded, steps: int, seed: int, device, guidance_scale: float | None = None,
                   prompts: list[str] | None = None) -> ImageSource:
    """Images sampled on the fly by ``sample_model`` (its noise: one CPU generator per batch, seeded seed + batch
    index); ``loaded``: what describes the model (a loaded sampler, or a run's Teacher). With several prompts, one
    image each (so that many images); one prompt serves any number."""
    from .clip_score import prompts_for
    from ..inference.sampling import sample_model, sampling_guidance

    def read(num, batch_size, part=None):
        paired = prompts_for(prompts, num) if prompts else None
        for _, images in sample_model(model, loaded, num, steps, seed, batch_size, device, guidance_scale, paired,
                                      part):
            yield torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    count = len(prompts) if prompts and len(prompts) > 1 else None
    return ImageSource(name, count, loaded.image_shape, read, is_model=True, num_classes=loaded.num_classes,
                       guidance_scale=sampling_guidance(model, guidance_scale))


def is_model_folder(path: Path) -> bool:
    return (path / "model_index.json").is_file() or (path / "unet" / "config.json").is_file() or \
        (path / "config.json").is_file()


def open_source(spec: str, *, steps: int | None = None, seed: int = 0, guidance_scale: float | None = None,
                device=None, data_path: str | None = None, allow_model: bool = True,
                prompts: list[str] | None = None, levels=None) -> ImageSource:
    """Open SOURCE: ``fashion-mnist:train|test``, an ``.npz``, a folder of images, or a model folder."""
    if levels is not None and not (Path(spec).is_dir() and is_model_folder(Path(spec))):
        raise FastdiffError(f"--levels samples a flow-map student's folder; {spec} is not a model folder")
    from ..models.embedded import PREFIX, resolve_teacher_path

    path = Path(resolve_teacher_path(spec)) if spec.startswith(PREFIX) else Path(spec)
    model = path.is_dir() and is_model_folder(path)
    unused = [name for name, value in (("--steps", steps), ("--guidance-scale", guidance_scale)) if value is not None]
    if unused and not model:  # images are scored as they are: a sampling option would be silently ignored
        raise FastdiffError(f"{', '.join(unused)} sample a model; {spec} holds images: leave them out")
    if spec.startswith(FMNIST_PREFIX):
        return _fashion_mnist_source(spec, data_path)
    if path.is_file() and path.suffix == ".npz":
        return _npz_source(path)
    if path.is_dir() and is_model_folder(path):
        if not allow_model:
            raise FastdiffError(f"{spec} is a model folder; reference statistics come from real images "
                                "(a folder of images, an .npz or fashion-mnist:train)")
        return model_sources(str(path), [steps], seed, guidance_scale, device, prompts, levels)[0]
    if path.is_dir():
        return _folder_source(path)
    if path.exists():
        raise FastdiffError(f"{spec}: not a folder of images, an .npz of images or a model folder")
    raise FastdiffError(f"{spec}: no such file or folder (or use fashion-mnist:train / fashion-mnist:test)")
