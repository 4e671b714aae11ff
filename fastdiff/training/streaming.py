"""Real images read lazily: an image folder (``data.stream: true``) or WebDataset-style tar shards
(``data.name: webdataset``), decoded per batch with a bounded buffer, so memory does not grow with the data set.

What is held per sample is an index entry, not pixels: a file name (folders) or a few byte offsets (shards; the
tar headers are scanned once and the offsets cached on disk). Which samples a batch holds is a pure function of
(seed, step, rank, draw within the step): each step's samples are positions of a keyed pseudo-random permutation
of the data set (a Feistel network, O(1) memory whatever the size). The ``j``-th draw of ``n`` samples of rank
``r`` of ``P`` (with ``A`` accumulation micro-batches) takes the ``n`` positions of slot
``(j // A) P A + r A + j % A``: the slot of the global micro-batch index the training loop seeds its other streams
with, so rank ``r`` draws what micro-batch ``r`` of a ``P``-fold accumulation draws in one process (for objectives
that draw once per micro-batch). So ranks draw disjoint samples within a step (until a step needs more samples
than the data set has), and a run resumed at step ``k`` draws what a fresh run draws at step ``k`` without any
reader state in the checkpoint. Across steps samples are independent, as the in-memory loader's draws are.
"""
from __future__ import annotations

import glob
import hashlib
import io
import os
import tarfile
import tempfile
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from ..errors import FastdiffError
from .data import RealImages, as_model_range, decode_image, list_image_folder

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
FEISTEL_ROUNDS = 4
INDEX_VERSION = 1
# Index columns of a shard sample: byte offset and size of its image, caption (.txt) and class (.cls); -1 = absent.
IMG_OFF, IMG_SIZE, TXT_OFF, TXT_SIZE, CLS_OFF, CLS_SIZE = range(6)


# --- which samples a batch holds ---------------------------------------------------------------
def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 arrays (wrapping arithmetic): a cheap, well-mixed round function."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def keyed_permutation(positions: np.ndarray, n: int, key: bytes) -> np.ndarray:
    """Where each of ``positions`` (ints in [0, n)) goes under a pseudo-random permutation of [0, n) chosen by
    ``key``: a balanced Feistel network on the smallest even number of bits covering n, with cycle walking (values
    that land outside [0, n) are permuted again), which keeps it a bijection of [0, n) without storing it."""
    positions = np.asarray(positions, dtype=np.uint64)
    if n <= 1:
        return np.zeros(positions.shape, dtype=np.int64)
    half = ((n - 1).bit_length() + 1) // 2
    mask = np.uint64((1 << half) - 1)
    digest = hashlib.blake2b(key, digest_size=8 * FEISTEL_ROUNDS).digest()
    round_keys = [np.uint64(int.from_bytes(digest[8 * r:8 * r + 8], "little")) for r in range(FEISTEL_ROUNDS)]

    def permute(v):
        left, right = v >> np.uint64(half), v & mask
        for k in round_keys:
            left, right = right, left ^ (_mix(right ^ k) & mask)
        return (left << np.uint64(half)) | right

    out = permute(positions)
    outside = out >= np.uint64(n)
    while outside.any():  # the domain is < 4n, so each walk ends after a few rounds on average
        out[outside] = permute(out[outside])
        outside = out >= np.uint64(n)
    return out.astype(np.int64)


def step_indices(seed: int, step: int, draw: int, n: int, size: int, rank: int = 0, world: int = 1,
                 accumulation: int = 1) -> np.ndarray:
    """The ``n`` sample indices of draw ``draw`` of rank ``rank`` (of ``world``) at ``step`` (module docstring)."""
    slot = (draw // accumulation) * world * accumulation + rank * accumulation + draw % accumulation
    start = slot * n
    positions = (np.arange(start, start + n, dtype=np.int64) % size).astype(np.uint64)
    return keyed_permutation(positions, size, f"fastdiff-stream/{seed}/{step}".encode())


# --- where the bytes are -----------------------------------------------------------------------
class FolderSource:
    """An image folder's files, decoded when drawn."""

    def __init__(self, path: str):
        self.files, self.captions = list_image_folder(path)

    def __len__(self):
        return len(self.files)

    def open(self, i: int):
        return self.files[i]


def _sample_key(name: str) -> tuple[str, str]:
    """WebDataset's convention: a sample's key is the member path up to the first dot of its file name."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def scan_shard(path: str) -> np.ndarray:
    """(samples, 6) int64 index of one tar shard (see IMG_OFF...): the headers are read, not the contents."""
    rows, key, row = [], None, None

    def finish():
        if row is not None:
            if row[IMG_OFF] < 0:
                raise FastdiffError(f"{path}: sample {key!r} has no image ({', '.join(IMAGE_EXTS)})")
            rows.append(row)

    try:
        with tarfile.open(path, mode="r:") as tar:  # uncompressed: members are read at their offsets later
            while (member := tar.next()) is not None:
                tar.members = []  # tarfile keeps every header it read; an index must not grow with the shard
                if not member.isfile():
                    continue
                name_key, ext = _sample_key(member.name)
                if name_key != key:  # members of one sample are consecutive
                    finish()
                    key, row = name_key, [-1] * 6
                col = IMG_OFF if ext in IMAGE_EXTS else TXT_OFF if ext == "txt" else CLS_OFF if ext == "cls" else None
                if col is not None:
                    row[col], row[col + 1] = member.offset_data, member.size
    except (tarfile.TarError, OSError) as exc:
        raise FastdiffError(f"{path}: not a readable uncompressed tar shard ({exc})") from None
    finish()
    return np.array(rows, dtype=np.int64).reshape(-1, 6)


def _index_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fastdiff" / "shard-index"


def shard_index(path: str) -> np.ndarray:
    """A shard's index, from the cache when this file (path, size, mtime) was scanned before."""
    stat = os.stat(path)
    ident = f"{INDEX_VERSION}/{os.path.realpath(path)}/{stat.st_size}/{stat.st_mtime_ns}".encode()
    cached = _index_cache_dir() / (hashlib.blake2b(ident, digest_size=16).hexdigest() + ".npy")
    try:
        return np.load(cached)
    except (OSError, ValueError):
        pass
    index = scan_shard(path)
    try:  # best effort: a read-only cache only costs a rescan next time
        cached.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=cached.parent, suffix=".tmp", delete=False) as f:
            np.save(f, index)
        os.replace(f.name, cached)  # atomic: processes scanning the same shard at once never read half a file
    except OSError:
        pass
    return index


def find_shards(path: str | None) -> list[str]:
    if not path:
        raise FastdiffError("data.name webdataset needs data.path: a folder or glob of .tar shards")
    shards = sorted(glob.glob(os.path.join(path, "*.tar"))) if os.path.isdir(path) else sorted(glob.glob(path))
    shards = [s for s in shards if s.endswith(".tar") and os.path.isfile(s)]
    if not shards:
        raise FastdiffError(f"data.path {path}: no .tar shards found")
    return shards


class ShardSource:
    """Samples of WebDataset-style tar shards, read at their byte offsets (one open file per shard, per thread)."""

    def __init__(self, path: str):
        self.shards = find_shards(path)
        indexes = [shard_index(s) for s in self.shards]
        self.index = np.concatenate(indexes)
        self.shard_of = np.repeat(np.arange(len(indexes), dtype=np.int32), [len(i) for i in indexes])
        if not len(self.index):
            raise FastdiffError(f"data.path {path}: the shards hold no samples")
        self._local = threading.local()

    def __len__(self):
        return len(self.index)

    def _read(self, i: int, col: int) -> bytes | None:
        offset, size = self.index[i, col], self.index[i, col + 1]
        if offset < 0:
            return None
        files = self._local.__dict__.setdefault("files", {})
        shard = int(self.shard_of[i])
        if shard not in files:
            if len(files) >= 8:  # a few open shards per thread, not one per shard
                files.pop(next(iter(files))).close()
            files[shard] = open(self.shards[shard], "rb")
        f = files[shard]
        f.seek(int(offset))
        return f.read(int(size))

    def open(self, i: int):
        return io.BytesIO(self._read(i, IMG_OFF))

    def name(self, i: int) -> str:
        return f"{self.shards[self.shard_of[i]]}@{self.index[i, IMG_OFF]}"

    def captions(self) -> list[str]:
        out = []
        for i in range(len(self)):
            text = self._read(i, TXT_OFF)
            if text is None:
                raise FastdiffError(f"{self.name(i)}: a text-to-image teacher needs a .txt caption with every sample")
            out.append(text.decode("utf-8").strip())
        return out

    def labels(self, num_classes: int) -> torch.Tensor:
        out = np.empty(len(self), dtype=np.int64)
        for i in range(len(self)):
            raw = self._read(i, CLS_OFF)
            try:
                out[i] = int(raw.decode().strip())
            except (AttributeError, ValueError):
                raise FastdiffError(f"{self.name(i)}: a class-conditional teacher needs a .cls file holding an "
                                    "integer class with every sample") from None
            if not 0 <= out[i] < num_classes:
                raise FastdiffError(f"{self.name(i)}: class {out[i]} is outside the teacher's 0..{num_classes - 1}")
        return torch.from_numpy(out)


# --- decoded images ----------------------------------------------------------------------------
class LazyImages:
    """``source``'s images as a read-only (N, C, size, size) uint8 sequence: indexing decodes, keeping the last
    ``buffer_size`` decoded images in an LRU buffer (so memory is bounded by the buffer, not the data set)."""

    def __init__(self, source, size: int, channels: int, buffer_size: int):
        self.source, self.size, self.channels, self.buffer_size = source, size, channels, buffer_size
        self.buffer: OrderedDict[int, np.ndarray] = OrderedDict()
        self._pool = None

    def __len__(self):
        return len(self.source)

    @property
    def shape(self):
        return (len(self), self.channels, self.size, self.size)

    def _decode(self, i: int) -> np.ndarray:
        name = getattr(self.source, "name", lambda j: None)(i)
        return decode_image(self.source.open(i), self.size, self.channels, name)

    def __getitem__(self, idx) -> torch.Tensor:
        if isinstance(idx, (int, np.integer)):
            return self[[idx]][0]
        if isinstance(idx, slice):
            idx = range(*idx.indices(len(self)))
        wanted = [int(i) for i in (idx.tolist() if hasattr(idx, "tolist") else idx)]
        decoded = {i: self.buffer[i] for i in wanted if i in self.buffer}
        missing = list(dict.fromkeys(i for i in wanted if i not in decoded))
        if len(missing) > 1:  # PIL releases the GIL while decoding: a few threads keep up with a training step
            self._pool = self._pool or ThreadPoolExecutor(min(8, os.cpu_count() or 1))
            decoded.update(zip(missing, self._pool.map(self._decode, missing)))
        else:
            decoded.update((i, self._decode(i)) for i in missing)
        out = torch.empty((len(wanted), self.channels, self.size, self.size), dtype=torch.uint8)
        pixels_out = out.numpy()
        for row, i in enumerate(wanted):
            pixels = decoded[i]
            pixels_out[row] = pixels
            if self.buffer_size:
                self.buffer[i] = pixels
                self.buffer.move_to_end(i)
                if len(self.buffer) > self.buffer_size:
                    self.buffer.popitem(last=False)
        return out


class StreamingImages(RealImages):
    """Batches of lazily read images (see the module docstring for which samples each batch holds). ``rng`` is
    kept for what a batch draws besides its indices (latent posterior samples)."""

    def __init__(self, images: LazyImages, labels, seed: int, captions=None):
        super().__init__(images, labels, seed, captions)
        self.seed = seed
        self.rank, self.world, self.accumulation = 0, 1, 1
        self._step_of = lambda: 0
        self._step, self._draw = None, 0

    def follow(self, step_of, rank: int = 0, world: int = 1, accumulation: int = 1) -> None:
        """Tie the draws to a run: ``step_of()`` is its current step; this process is ``rank`` of ``world``, each
        update taking ``accumulation`` micro-batches."""
        self._step_of, self.rank, self.world, self.accumulation = step_of, rank, world, accumulation

    def next_indices(self, n: int) -> np.ndarray:
        step = self._step_of()
        if step != self._step:  # draws are counted within a step, so a resumed run starts each step at draw 0
            self._step, self._draw = step, 0
        idx = step_indices(self.seed, step, self._draw, n, len(self.images), self.rank, self.world, self.accumulation)
        self._draw += 1
        return idx

    def batch(self, n: int, device):
        idx = self.next_indices(n)
        x = as_model_range(self.images[torch.from_numpy(idx)].to(device))
        labels = self.labels[idx].to(device) if self.labels is not None else None
        captions = [self.captions[i] for i in idx.tolist()] if self.captions is not None else None
        return x, labels, captions

    def _mapped_storage(self, shape, dtype) -> torch.Tensor:
        """``map_images`` (e.g. VAE posteriors) fills a file-backed tensor in the temp folder: the results are paged
        in from disk as batches read them, not held in memory."""
        numel = int(np.prod(shape))
        with tempfile.NamedTemporaryFile(prefix="fastdiff-mapped-", suffix=".bin") as f:
            f.truncate(numel * torch.empty((), dtype=dtype).element_size())
            mapped = torch.from_file(f.name, shared=True, size=numel, dtype=dtype)  # the mapping outlives the name
        return mapped.view(shape)


def streaming_images_for(data_cfg, teacher, seed: int, image_size: int) -> StreamingImages:
    """``data.name: webdataset`` or a streamed ``imagefolder``: labels (.cls) for class-conditional teachers,
    captions (.txt or metadata.jsonl) for text-to-image ones, read once; images decoded per batch."""
    channels = teacher.image_shape[0]
    if data_cfg.name == "webdataset":
        source = ShardSource(data_cfg.path)
        labels = source.labels(teacher.num_classes) if teacher.num_classes else None
        captions = source.captions() if teacher.conditioning == "text" else None
    else:
        source = FolderSource(data_cfg.path)
        if teacher.num_classes:
            raise FastdiffError("data.name imagefolder has no class labels; a class-conditional teacher needs "
                                "labelled data (fashion-mnist, or webdataset shards with .cls files)")
        labels, captions = None, source.captions
        if teacher.conditioning == "text" and captions is None:
            raise FastdiffError(f"data.path {data_cfg.path}: a text-to-image teacher needs captions "
                                "(metadata.jsonl with file_name and text)")
        captions = captions if teacher.conditioning == "text" else None
    images = LazyImages(source, image_size, channels, data_cfg.buffer_size)
    return StreamingImages(images, labels, seed, captions)
