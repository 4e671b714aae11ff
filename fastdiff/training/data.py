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
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
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
    (checkpointable). Images are float in [-1, 1] (or uint8, converted per batch). ``weights``: optional per-image
    loss weights (FADA's quality tiers, :func:`tier_sample_weights`), drawn with the images by :meth:`weighted_batch`."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | None, seed: int = 0,
                 captions: list[str] | None = None, weights: torch.Tensor | None = None):
        if weights is not None and len(weights) != len(images):
            raise FastdiffError(f"{len(weights)} sample weights for {len(images)} images")
        self.images, self.labels, self.captions, self.weights = images, labels, captions, weights
        self.rng = torch.Generator().manual_seed(seed)

    def __len__(self):
        return len(self.images)

    def map_images(self, fn, chunk: int = 32, rank: int = 0, world: int = 1, device=None) -> None:
        """Replace every image by ``fn`` of it, ``chunk`` images at a time (e.g. latent teachers' VAE posteriors,
        computed once instead of every step). The batches drawn afterwards follow the same random stream.

        With ``world`` processes, process ``rank`` maps every ``world``-th chunk and the chunks are all-gathered
        (through ``device``: the accelerator's, which the process group's backend needs), so each process does 1/P
        of the work and every process ends with every result."""
        n, mapped = len(self.images), None
        for start in range(0, n, chunk * world):
            mine = start + rank * chunk
            piece = fn(self.images[mine:mine + chunk]) if mine < n else None
            pieces = [piece] if world == 1 else _all_gather_chunks(piece, chunk, world, device)
            if mapped is None:  # filled in place: no second copy at the end
                mapped = self._mapped_storage((n, *pieces[0].shape[1:]), pieces[0].dtype)
            for q, part in enumerate(pieces):
                lo = start + q * chunk
                if lo < n:
                    mapped[lo:min(n, lo + chunk)] = part[:min(n, lo + chunk) - lo].cpu()
        self.images = mapped

    def _mapped_storage(self, shape, dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype)

    def batch(self, n: int, device) -> tuple[torch.Tensor, torch.Tensor | None, list[str] | None]:
        """(images, labels or None, captions or None)."""
        return self._draw(n, device)[:3]

    def weighted_batch(self, n: int, device):
        """(images, labels or None, captions or None, per-sample weights or None): the same draw as :meth:`batch`."""
        return (*self.batch(n, device), None) if self.weights is None else self._draw(n, device)

    def _draw(self, n: int, device):
        idx = torch.randint(len(self.images), (n,), generator=self.rng)
        x = as_model_range(self.images[idx].to(device))
        labels = self.labels[idx].to(device) if self.labels is not None else None
        captions = [self.captions[i] for i in idx.tolist()] if self.captions is not None else None
        weights = self.weights[idx].to(device) if self.weights is not None else None
        return x, labels, captions, weights


def tier_sample_weights(tiers, tier_weights: list[float]) -> torch.Tensor:
    """FADA's mixed supervision (Zhong et al. 2025): each image's ground-truth loss weight, ``tier_weights[k]`` for
    an image of quality tier k (0 = the best data, e.g. what the teacher was trained on; 1 = the broader, moderate
    set). float32 (N,)."""
    tiers = torch.as_tensor(tiers).long().reshape(-1)
    if not tier_weights or any(w < 0 for w in tier_weights):
        raise FastdiffError(f"tier weights must be a non-empty list of non-negative numbers, got {tier_weights}")
    if len(tiers) and (int(tiers.min()) < 0 or int(tiers.max()) >= len(tier_weights)):
        raise FastdiffError(f"quality tiers must lie in 0..{len(tier_weights) - 1} (one weight each), found "
                            f"{int(tiers.min())}..{int(tiers.max())}")
    return torch.tensor(tier_weights, dtype=torch.float32)[tiers]


def read_tiers(path: str) -> torch.Tensor | None:
    """The ``"tier"`` of each line of an image folder's metadata.jsonl (the order :func:`list_image_folder` gives
    the images), or None when the folder has no metadata or no line names a tier; every line must then name one."""
    return read_metadata_ints(path, "tier")


def read_labels(path: str) -> torch.Tensor | None:
    """The class ``"label"`` of each image of a folder's metadata.jsonl, as :func:`read_tiers` reads tiers."""
    return read_metadata_ints(path, "label")


def read_metadata_ints(path: str, key: str) -> torch.Tensor | None:
    import json

    meta = Path(path) / "metadata.jsonl"
    if not meta.is_file():
        return None
    with open(meta, encoding="utf-8") as lines:
        rows = [json.loads(line) for line in lines if line.strip()]
    if not any(key in row for row in rows):
        return None
    missing = [row.get("file_name") for row in rows if key not in row]
    if missing:
        raise FastdiffError(f"{meta}: {len(missing)} lines without a \"{key}\" (e.g. {missing[0]}); give every "
                            "image one")
    return torch.tensor([int(row[key]) for row in rows], dtype=torch.long)


def _all_gather_chunks(piece: torch.Tensor | None, chunk: int, world: int, device) -> list[torch.Tensor]:
    """Every process's ``piece`` (None where a process had nothing left to map), padded to ``chunk`` rows."""
    import torch.distributed as dist

    meta = [None if piece is None else (tuple(piece.shape[1:]), piece.dtype)]
    dist.broadcast_object_list(meta, src=0)  # rank 0 always has a piece while any process has one
    shape, dtype = meta[0]
    padded = torch.zeros((chunk, *shape), dtype=dtype, device=device)
    if piece is not None:
        padded[:len(piece)] = piece.to(device)
    out = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(out, padded)
    return out


def load_image_folder(path: str, size: int, channels: int = 3,
                      setting: str = "data.path") -> tuple[torch.Tensor, list[str] | None]:
    """uint8 (N, C, size, size) images, each resized (shortest side, bicubic) and centre-cropped, and their
    captions from ``metadata.jsonl`` ({"file_name": ..., "text": ...} per line) when the folder has one; errors
    name the folder by ``setting`` (the config key or flag it came from)."""
    files, captions = list_image_folder(path, setting)
    out = torch.empty((len(files), channels, size, size), dtype=torch.uint8)  # filled in place: one copy in memory
    pixels = out.numpy()
    for i, f in enumerate(files):
        pixels[i] = decode_image(f, size, channels)
    return out, captions


def list_image_folder(path: str, setting: str = "data.path") -> tuple[list[str], list[str] | None]:
    """The image files of a folder (metadata.jsonl's order, else sorted by name) and their captions, if any: plain
    strings, read line by line, since a streamed folder keeps this list (and only this) for the whole run."""
    if path is None:
        raise FastdiffError("data.name imagefolder needs data.path: a folder of images (with metadata.jsonl captions "
                            "for text-to-image teachers)")
    root = Path(path)
    if not root.is_dir():
        raise FastdiffError(f"{setting} {path!r} is not a folder")
    meta = root / "metadata.jsonl"
    captions = None
    if meta.is_file():
        import json

        files, captions = [], []
        try:
            with open(meta, encoding="utf-8") as lines:
                for row in (json.loads(line) for line in lines if line.strip()):
                    files.append(os.path.join(root, row["file_name"]))
                    captions.append(str(row["text"] if "text" in row else row["caption"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise FastdiffError(f"{meta}: each line needs \"file_name\" and \"text\" ({exc})") from None
    else:
        with os.scandir(root) as entries:
            files = sorted(e.path for e in entries if os.path.splitext(e.name)[1].lower() in IMAGE_SUFFIXES)
    if not files:
        raise FastdiffError(f"{setting} {path}: no images (png, jpg, webp, bmp) found")
    return files, captions


def decode_image(source, size: int, channels: int, name=None) -> np.ndarray:
    """uint8 (C, size, size): an image file (a path or a binary file object) resized (shortest side, bicubic) and
    centre-cropped."""
    from PIL import Image

    try:
        img = Image.open(source).convert("RGB" if channels == 3 else "L")
    except (OSError, ValueError) as exc:
        raise FastdiffError(f"{name or source}: not a readable image ({exc})") from None
    scale = size / min(img.size)
    w, h = max(size, round(img.width * scale)), max(size, round(img.height * scale))
    img = img.resize((w, h), Image.BICUBIC)
    left, top = (w - size) // 2, (h - size) // 2
    arr = np.asarray(img.crop((left, top, left + size, top + size)))
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


ANALYTIC_SAMPLES = 50_000


def takes_text(teacher) -> bool:
    """Whether the teacher reads text: a text-to-image one, or a class-conditional one with a text encoder as well
    (FADA's two conditions)."""
    return teacher.conditioning == "text" or getattr(teacher.pipeline, "text_encoder", None) is not None


def real_images_for(data_cfg, teacher, seed: int) -> RealImages:
    """Load the configured data set and check it against the teacher's sample shape.

    ``analytic``: exact samples of the analytic teacher's mixture (labels = modes), for GAN heads in benchmarks.
    """
    if data_cfg.name == "pairs":  # reflow: `fastdiff pairs` output, (noise, teacher sample) (training/pairs.py)
        from .pairs import PairSamples

        return PairSamples(data_cfg.path, teacher, seed)
    if data_cfg.name == "analytic":
        if not hasattr(teacher.model, "sample_true"):
            raise FastdiffError("data.name analytic needs the analytic (Gaussian-mixture) teacher")
        rng = torch.Generator().manual_seed(seed + 1)
        modes = torch.multinomial(teacher.model.log_weights.exp(), ANALYTIC_SAMPLES, replacement=True, generator=rng)
        images = teacher.model.sample_true(ANALYTIC_SAMPLES, rng, class_labels=modes)
        return RealImages(images, modes, seed)
    channels, height, width = teacher.image_shape
    if data_cfg.name in ("imagefolder", "webdataset"):
        if data_cfg.resolution not in (None, height) or height != width:
            raise FastdiffError(f"data.resolution {data_cfg.resolution} does not match the teacher's image size "
                                f"{height}x{width}")
    if data_cfg.name == "webdataset" or (data_cfg.name == "imagefolder" and data_cfg.stream):
        from .streaming import streaming_images_for  # decoded per batch: memory independent of the data set

        return streaming_images_for(data_cfg, teacher, seed, height)
    if data_cfg.name == "imagefolder":
        labels = read_labels(data_cfg.path) if teacher.num_classes else None
        if teacher.num_classes and labels is None:
            raise FastdiffError("data.name imagefolder has no class labels; a class-conditional teacher needs "
                                "labelled data (fashion-mnist, or a \"label\" per image in metadata.jsonl)")
        images, captions = load_image_folder(data_cfg.path, height, channels)
        if teacher.conditioning == "text" and captions is None:
            raise FastdiffError(f"data.path {data_cfg.path}: a text-to-image teacher needs captions "
                                "(metadata.jsonl with file_name and text)")
        weights = None
        if getattr(data_cfg, "tier_weights", None) is not None:
            tiers = read_tiers(data_cfg.path)
            if tiers is None:
                raise FastdiffError(f"data.tier_weights: {data_cfg.path} has no quality tiers (a \"tier\" per image in "
                                    "metadata.jsonl)")
            weights = tier_sample_weights(tiers, data_cfg.tier_weights)
        return RealImages(images, labels, seed, captions if takes_text(teacher) else None, weights)
    if data_cfg.name != "fashion-mnist":
        raise FastdiffError(f"data.name {data_cfg.name!r} is not supported; use fashion-mnist, imagefolder, "
                            "webdataset, analytic or teacher")
    resolution = data_cfg.resolution or height
    if resolution != height or height != width:
        raise FastdiffError(f"data.resolution {resolution} does not match the teacher's sample size {height}x{width}")
    if channels != 1:
        raise FastdiffError(f"fashion-mnist has 1 channel but the teacher makes {channels}-channel images; "
                            "use data.name=imagefolder with data.path pointing at a folder of images")
    images, labels = load_fashion_mnist(data_cfg.path, data_cfg.split)
    return RealImages(to_model_range(images, resolution), torch.from_numpy(labels), seed)
