"""FID and KID on Inception features, statistics in float64, and reference statistics files.

FID: Heusel et al. 2017, d^2 = |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)).
KID: Binkowski et al. 2018, unbiased MMD^2 with the kernel k(x, y) = (x.y / d + 1)^3, averaged over subsets.
"""
from __future__ import annotations

import datetime
import os
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import FastdiffError


class FeatureStats:
    """Streaming mean and covariance in float64; keeps the first ``keep`` features for KID, and every feature in
    float64 while there are no more than the feature size (``cov_factor``)."""

    def __init__(self, dim: int = 2048, keep: int = 0):
        self.n = 0
        self.sum = np.zeros(dim, dtype=np.float64)
        self.outer = np.zeros((dim, dim), dtype=np.float64)
        self.keep = keep
        self.kept: list[np.ndarray] = []
        self.rows: list[np.ndarray] | None = []  # None once n exceeds dim

    def add(self, features: torch.Tensor | np.ndarray) -> None:
        f = features.detach().cpu().double().numpy() if torch.is_tensor(features) else np.asarray(features, np.float64)
        self.n += len(f)
        self.sum += f.sum(0)
        self.outer += f.T @ f
        have = sum(len(k) for k in self.kept)
        if have < self.keep:
            self.kept.append(f[: self.keep - have].astype(np.float32))
        if self.rows is not None and self.n <= len(self.sum):
            self.rows.append(f.copy())  # a copy: the caller's array may be a buffer it reuses
        else:
            self.rows = None

    def cov_factor(self) -> np.ndarray | None:
        """F (n x dim) with F'F the covariance, (features - mean) / sqrt(n - 1), while n <= dim; else None."""
        if self.rows is None or self.n < 2:
            return None
        rows = np.concatenate(self.rows)
        return (rows - self.sum / self.n) / np.sqrt(self.n - 1)

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        if self.n < 2:
            raise FastdiffError(f"FID needs at least 2 images, got {self.n}")
        mu = self.sum / self.n
        cov = (self.outer - self.n * np.outer(mu, mu)) / (self.n - 1)
        return mu, (cov + cov.T) / 2

    def features(self) -> np.ndarray:
        return np.concatenate(self.kept) if self.kept else np.zeros((0, len(self.sum)), np.float32)


def _significant(w: np.ndarray) -> np.ndarray:
    """Eigenvalues below the rounding level of the largest are zero: their square roots would turn 1e-16
    noise into 1e-8 per null direction, and a 2048-d covariance from N < 2048 images has thousands."""
    floor = np.abs(w).max(initial=0.0) * len(w) * np.finfo(np.float64).eps
    return np.where(w > floor, w, 0.0)


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(_significant(w))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2, factor1: np.ndarray | None = None) -> float:
    """tr((S1 S2)^(1/2)) as the sum of square roots of the eigenvalues of S1^(1/2) S2 S1^(1/2): that matrix is
    symmetric PSD with the eigenvalues of S1 S2, so the trace stays real and exact when N < 2048 makes the
    covariances singular (where scipy's sqrtm of the product returns complex noise).

    ``factor1``: F (k x d) with S1 = F'F and k <= d (``FeatureStats.cov_factor``, a few images scored while
    training). The non-zero eigenvalues of S1 S2 = F'F S2 are those of the k x k symmetric PSD F S2 F', so the two
    d x d eigendecompositions (seconds at d = 2048) become one k x k one; the same trace in exact arithmetic."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
        raise FastdiffError(f"feature sizes differ ({mu1.shape[0]} vs {mu2.shape[0]}); both sides need the same extractor")
    if factor1 is not None:
        middle = factor1 @ s2 @ factor1.T
    else:
        root = _psd_sqrt(s1)
        middle = root @ s2 @ root
    trace_sqrt = np.sqrt(_significant(np.linalg.eigvalsh((middle + middle.T) / 2))).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2.0 * trace_sqrt)


def kernel_inception_distance(f1: np.ndarray, f2: np.ndarray, subsets: int = 100, subset_size: int = 1000,
                              seed: int = 0) -> tuple[float, float]:
    """Mean and standard deviation over ``subsets`` draws of the unbiased MMD^2 (subset size capped by N)."""
    f1, f2 = np.asarray(f1, np.float64), np.asarray(f2, np.float64)
    m = min(subset_size, len(f1), len(f2))
    if m < 2:
        raise FastdiffError(f"KID needs at least 2 features on each side, got {len(f1)} and {len(f2)}")
    d = f1.shape[1]
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(subsets):
        x = f1[rng.choice(len(f1), m, replace=False)]
        y = f2[rng.choice(len(f2), m, replace=False)]
        kxx, kyy, kxy = ((a @ b.T / d + 1.0) ** 3 for a, b in ((x, x), (y, y), (x, y)))
        off = m * (m - 1)
        values.append((kxx.sum() - np.trace(kxx)) / off + (kyy.sum() - np.trace(kyy)) / off - 2.0 * kxy.mean())
    return float(np.mean(values)), float(np.std(values))


def count_label(n: int) -> str:
    """10000 -> '10k', 1500 -> '1.5k', 500 -> '500'."""
    if n >= 1000 and n % 100 == 0:
        return f"{n // 1000}k" if n % 1000 == 0 else f"{n / 1000:g}k"
    return str(n)


# Reference statistics other tools write: an .npz holding only mu and sigma of the TF Inception 2015-12-05 pool
# features, and the resize mode (fastdiff's name) each tool's features were made with.
#   edm:            NVlabs/edm fid.py `ref` (np.savez(mu=, sigma=)); NVIDIA's detector resizes as TF1 bilinear.
#                   pytorch-fid / TTUR files are the same format and resize.
#   torch-fidelity: its fid_statistics_file .npz; it resizes with TF1 bilinear (interpolate_bilinear_2d_like_tensorflow1x).
#   clean-fid:      cleanfid's <name>_<mode>_<split>_<res>.npz; mode clean = PIL bicubic, legacy_tensorflow = TF1
#                   bilinear, legacy_pytorch = torch bilinear (not one of fastdiff's resize modes).
FOREIGN_RESIZE = {"edm": "nv-bilinear", "torch-fidelity": "nv-bilinear", "clean-fid": "clean-bicubic"}
CLEAN_FID_MODES = {"clean": "clean-bicubic", "legacy_tensorflow": "nv-bilinear", "legacy_pytorch": None}
REF_FORMATS = ("auto", "fastdiff", *FOREIGN_RESIZE)
_CLEAN_FID_NAME = re.compile(r"_(clean|legacy_tensorflow|legacy_pytorch)_")


def check_statistics_path(path) -> None:
    """Where reference statistics may be written: an .npz file name (not a folder) in an existing folder."""
    path = Path(path)
    if not path.name.endswith(".npz"):
        raise FastdiffError(f"--out {path}: reference statistics are an .npz file")
    if path.is_dir():
        raise FastdiffError(f"--out {path} is a folder; give an .npz file name")
    if not path.resolve().parent.is_dir():
        raise FastdiffError(f"--out {path}: folder {path.parent} does not exist")


@dataclass
class ReferenceStats:
    """What ``fastdiff ref-stats`` writes: statistics, KID features and how they were made; or, labelled
    ``foreign:<tool>-npz``, another tool's mu/sigma file (no features, image size or count)."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int | None
    extractor: str
    resize: str
    image_shape: tuple[int, int, int] | None  # (C, H, W) of the source images, before any resize
    name: str
    features: np.ndarray = field(default_factory=lambda: np.zeros((0, 2048), np.float32))
    origin: str = "fastdiff"  # or foreign:edm-npz, foreign:clean-fid-npz, foreign:torch-fidelity-npz

    @property
    def foreign(self) -> bool:
        return self.origin != "fastdiff"

    def label(self, metric: str, n: int) -> str:
        """e.g. FID@10k(train60k, nv-bilinear); FID@10k(cifar10-32x32 foreign:edm-npz, nv-bilinear)."""
        name = f"{self.name} {self.origin}" if self.foreign else self.name
        return f"{metric}@{count_label(n)}({name}, {self.resize})"

    def kid_unavailable(self) -> str | None:
        """Why KID cannot be computed against this reference (None: it can)."""
        if self.foreign:
            return (f"KID unavailable: the {self.origin} reference holds mu/sigma only and KID needs Inception "
                    "features; make a reference with `fastdiff ref-stats` for KID")
        if len(self.features) < 2:
            return "KID unavailable: the reference was made with --kid-features 0"
        return None

    def save(self, path: str | Path) -> None:
        if self.foreign:  # never written out as if fastdiff had made it
            raise FastdiffError(f"a {self.origin} reference is not saved as fastdiff reference statistics")
        path = Path(path)
        check_statistics_path(path)
        tmp = path.with_name(path.name + ".tmp.npz")
        try:
            np.savez(tmp, mu=self.mu, sigma=self.sigma, n=self.n, extractor=self.extractor, resize=self.resize,
                     image_shape=np.array(self.image_shape), name=self.name, features=self.features,
                     created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
            os.replace(tmp, path)  # never a half-written reference
        finally:
            tmp.unlink(missing_ok=True)

    @classmethod
    def load(cls, path: str | Path, fmt: str = "auto") -> "ReferenceStats":
        """fastdiff's own file, or (``fmt`` auto: by its keys and clean-fid's file names) another tool's mu/sigma."""
        path = Path(path)
        if fmt not in REF_FORMATS:
            raise FastdiffError(f"--ref-format {fmt!r} is not one of {', '.join(REF_FORMATS)}")
        if not path.is_file():
            raise FastdiffError(f"--ref {path}: no such file; make one with `fastdiff ref-stats SOURCE --out {path}`")
        try:
            with np.load(path, allow_pickle=False) as z:
                if "extractor" in z.files and fmt in ("auto", "fastdiff"):
                    return cls(mu=z["mu"], sigma=z["sigma"], n=int(z["n"]), extractor=str(z["extractor"]),
                               resize=str(z["resize"]), image_shape=tuple(int(v) for v in z["image_shape"]),
                               name=str(z["name"]), features=z["features"])
                if fmt == "fastdiff" or not {"mu", "sigma"} <= set(z.files):
                    raise KeyError(f"keys {', '.join(z.files)}")
                return cls._foreign(path, fmt, set(z.files), z["mu"], z["sigma"])
        except (KeyError, ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
            raise FastdiffError(f"--ref {path}: not a fastdiff reference-statistics file nor an EDM / clean-fid / "
                                f"torch-fidelity mu/sigma .npz ({exc})") from None

    @classmethod
    def _foreign(cls, path: Path, fmt: str, keys: set, mu: np.ndarray, sigma: np.ndarray) -> "ReferenceStats":
        clean_mode = _CLEAN_FID_NAME.search(path.stem)
        if fmt == "auto":
            if clean_mode:
                fmt = "clean-fid"
            elif keys == {"mu", "sigma"}:
                fmt = "edm"
            else:
                raise FastdiffError(f"--ref {path}: mu/sigma with other keys ({', '.join(sorted(keys - {'mu', 'sigma'}))}); "
                                    "pass --ref-format edm, clean-fid or torch-fidelity to say which tool wrote it")
        resize = FOREIGN_RESIZE[fmt]
        if fmt == "clean-fid" and clean_mode:
            resize = CLEAN_FID_MODES[clean_mode.group(1)]
            if resize is None:
                raise FastdiffError(f"--ref {path}: clean-fid legacy_pytorch statistics resize with torch bilinear, "
                                    "which fastdiff does not implement; use clean or legacy_tensorflow statistics")
        mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
        if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
            raise FastdiffError(f"--ref {path}: mu {mu.shape} and sigma {sigma.shape} are not a mean and its covariance")
        from .inception import STANDARD_ID  # every one of these tools uses the TF Inception 2015-12-05 weights

        return cls(mu=mu, sigma=sigma, n=None, extractor=STANDARD_ID, resize=resize, image_shape=None,
                   name=path.stem, features=np.zeros((0, len(mu)), np.float32), origin=f"foreign:{fmt}-npz")

    def check_extractor(self, extractor: str) -> None:
        if extractor != self.extractor:
            raise FastdiffError(f"the reference was made with extractor {self.extractor}, these features with "
                                f"{extractor}; remake the reference with the same Inception weights")

    def check_images(self, resize: str, image_shape: tuple[int, int, int]) -> None:
        """Before any image is made: the same resize mode, channel count and size as the reference."""
        if resize != self.resize:
            raise FastdiffError(f"the reference was made with resize mode {self.resize}, not {resize}; "
                                f"use --resize {self.resize} or remake the reference")
        if self.image_shape is None:  # a foreign mu/sigma file does not say what images it came from
            return
        if image_shape[0] != self.image_shape[0]:
            raise FastdiffError(f"images have {image_shape[0]} channel(s) but the reference was made from "
                                f"{self.image_shape[0]}-channel images; compare like with like")
        if tuple(image_shape[1:]) != tuple(self.image_shape[1:]):
            h, w = self.image_shape[1:]
            raise FastdiffError(f"images are {image_shape[1]}x{image_shape[2]} but the reference was made from "
                                f"{h}x{w} images; pass --crop {h} to centre-crop, or remake the reference")
