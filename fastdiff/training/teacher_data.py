"""Image-free training data (``data.name: teacher``): samples of the teacher's own deterministic sampler.

TBCM (Tang et al. 2025, "Image-Free Timestep Distillation via Continuous-Time Consistency with Trajectory-Sampled
Pairs", arXiv 2511.20410, hustvl/TBCM ``train_scripts/train_tbcm.py``) trains a consistency student without a data
set: the teacher samples from pure noise along a route of noise levels, and the training points come from that
trajectory. Here the trajectory's endpoint x0 (``models.trajectory``: DDIM, eta = 0, on a VP teacher; Euler on a
flow teacher; or EDM's Heun) takes the place of a real image, and the objective noises it exactly as it noises real
images. That the points are the teacher's own samples is what TBCM's argument rests on (training and inference see
the same distribution); feeding TBCM's intermediate (x_t, t) points to the loss directly would change the
objectives' inputs, which this source does not do.

Two modes, both with the ``.batch(n, device)`` interface of ``data.RealImages`` and one ``rng`` that the
checkpoint saves (``Run._generators``), so a resumed run draws the same batches as an uninterrupted one:
- ``data.cache_size`` null: every batch is fresh, n noises (and labels / prompts) drawn from ``rng`` and
  sampled by the teacher, so ``rng`` is the whole state;
- ``data.cache_size`` N: a pool of N samples, split into chunks whose noise comes from a seed of their own
  (derived from ``train.seed`` and the chunk's index), each generated the first time a batch draws from it
  and written to ``data.cache_dir``, then kept memory-mapped (``pairs.map_shard``: the pool's pages are the
  files', not the process's memory); batches draw pool indices from ``rng``. A chunk's content does not depend
  on when it was made, so resume stays exact whether a chunk was read from disk or made again.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import FastdiffError, require_folder_path
from ..models.trajectory import SAMPLERS, ode_sample, trajectory_levels
from .pairs import draw_conditions, map_shard

CHUNK = 256  # pool samples generated together and stored in one file
CACHE_DIR = "teacher-samples"  # under output_dir when data.cache_dir is null
MANIFEST = "manifest.json"
REMAKE_CHUNK = "delete it; the run makes it again"  # a pool chunk's content depends only on its seed


def _chunk_seed(seed: int, index: int) -> int:
    """A seed per chunk, independent of the other chunks and of the order chunks are made in."""
    return int.from_bytes(hashlib.sha256(f"fastdiff-teacher-data/{seed}/{index}".encode()).digest()[:7], "big")


class TeacherSamples:
    """Training samples from the teacher's deterministic sampler (see the module docstring)."""

    def __init__(self, teacher, num_steps: int = 25, guidance_scale: float | None = None, seed: int = 0,
                 cache_size: int | None = None, cache_dir: str | Path | None = None, prompts: list[str] | None = None,
                 sampler: str = "heun"):
        if sampler not in SAMPLERS:
            raise FastdiffError(f"data.teacher_sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
        self.sampler = sampler
        self.teacher, self.num_steps, self.guidance_scale, self.seed = teacher, num_steps, guidance_scale, seed
        self.prompts = prompts
        if teacher.conditioning == "text" and not prompts:
            raise FastdiffError("data.name teacher on a text-to-image teacher needs data.prompts (one prompt a line)")
        self.rng = torch.Generator().manual_seed(seed)
        self.captions = None  # no data set captions: text teachers' prompts are data.prompts
        self.cache_size = cache_size
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._chunks: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._opened = False  # the folder is checked at the first chunk: nothing is written before training starts

    # --- drawing -----------------------------------------------------------------------------------
    def _draw_conditions(self, n: int, gen: torch.Generator) -> torch.Tensor | None:
        """Class labels uniform over the real classes, or prompt indices uniform over data.prompts."""
        return draw_conditions(self.teacher, n, gen, self.prompts)

    def _cond(self, drawn: torch.Tensor | None, device, encode):
        if drawn is None:
            return None
        if self.teacher.num_classes:
            return {"class_labels": drawn.to(device)}
        if encode is None:
            raise FastdiffError("data.name teacher: a text-to-image teacher's samples need its prompt encoder")
        return encode(self._captions(drawn))

    def _captions(self, drawn: torch.Tensor) -> list[str]:
        return [self.prompts[i] for i in drawn.tolist()]

    def _sample(self, z: torch.Tensor, drawn, device, encode) -> torch.Tensor:
        denoiser = self.teacher.denoiser
        return ode_sample(denoiser, z.to(device), trajectory_levels(denoiser.schedule, self.num_steps, self.sampler),
                          self._cond(drawn, device, encode), self.guidance_scale, self.sampler == "heun").float()

    def batch(self, n: int, device, encode=None) -> tuple[torch.Tensor, torch.Tensor | None, list[str] | None]:
        """(samples, labels or None, prompts or None) like ``RealImages.batch``; ``encode`` turns prompts into the
        teacher's condition (text-to-image teachers only)."""
        if self.cache_size is None:  # fresh samples: the noise and conditions come from rng itself
            drawn = self._draw_conditions(n, self.rng)
            z = torch.randn((n, *self.teacher.sample_shape), generator=self.rng)
            x = self._sample(z, drawn, device, encode)
        else:
            idx = torch.randint(self.cache_size, (n,), generator=self.rng)
            x = torch.empty((n, *self.teacher.sample_shape))
            drawn = torch.empty(n, dtype=torch.long) if self._conditional else None
            for c in idx.div(CHUNK, rounding_mode="floor").unique().tolist():
                rows = (idx // CHUNK) == c
                samples, conds = self._chunk(c, device, encode)
                x[rows] = samples[idx[rows] - c * CHUNK]
                if drawn is not None:
                    drawn[rows] = conds[idx[rows] - c * CHUNK]
            x = x.to(device)
        labels = drawn.to(device) if drawn is not None and self.teacher.num_classes else None
        captions = self._captions(drawn) if drawn is not None and not self.teacher.num_classes else None
        return x, labels, captions

    # --- the pool ------------------------------------------------------------------------------------
    @property
    def _conditional(self) -> bool:
        return bool(self.teacher.num_classes or self.prompts)

    def _chunk(self, c: int, device, encode) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Chunk c of the pool (CPU tensors): from memory, else from disk, else sampled now (and stored)."""
        if c in self._chunks:
            return self._chunks[c]
        if self.cache_dir is not None and not self._opened:
            self._open_cache()
            self._opened = True
        path = self.cache_dir / f"chunk-{c:05d}.safetensors" if self.cache_dir is not None else None
        if path is None or not path.is_file():
            n = min(CHUNK, self.cache_size - c * CHUNK)
            gen = torch.Generator().manual_seed(_chunk_seed(self.seed, c))
            drawn = self._draw_conditions(n, gen)
            z = torch.randn((n, *self.teacher.sample_shape), generator=gen)
            x = self._sample(z, drawn, device, encode).cpu()
            if path is None:  # no cache folder: the pool lives in memory
                self._chunks[c] = (x, drawn)
                return self._chunks[c]
            tmp = path.with_name(f".{path.name}.tmp")
            save_file({"x": x.contiguous()} | ({"cond": drawn} if drawn is not None else {}), str(tmp))
            tmp.replace(path)  # a reader never sees half a chunk
        stored = map_shard(path, REMAKE_CHUNK)  # the file's pages, not the process's memory
        self._chunks[c] = (stored["x"], stored.get("cond"))
        return self._chunks[c]

    def _key(self) -> dict:
        """What a stored chunk's content depends on: another value means other samples."""
        t = self.teacher
        prompts = hashlib.sha256("\n".join(self.prompts).encode()).hexdigest() if self.prompts else None
        return {"teacher": str(Path(t.path).resolve()) if Path(t.path).exists() else str(t.path),
                "sampler": self.sampler, "steps": self.num_steps, "guidance_scale": self.guidance_scale, "seed": self.seed,
                "cache_size": self.cache_size, "chunk": CHUNK, "shape": list(t.sample_shape),
                "num_classes": t.num_classes, "prompts": prompts, "dtype": str(t.dtype)}

    def _open_cache(self) -> None:
        """Use the folder's chunks if they were made with the same settings; else empty it of chunks first, so
        the folder never holds more than cache_size samples (chunk files only, nothing else is touched)."""
        require_folder_path(self.cache_dir, "data.cache_dir")
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        manifest = self.cache_dir / MANIFEST
        key = self._key()
        try:
            same = json.loads(manifest.read_text()) == key
        except (OSError, ValueError):
            same = False
        if not same:
            for old in self.cache_dir.glob("chunk-*.safetensors"):
                old.unlink()
            manifest.write_text(json.dumps(key, indent=1))


def teacher_samples_for(cfg, teacher, out: Path) -> TeacherSamples:
    """The ``data.name: teacher`` source of a run (``data.teacher_*`` and ``data.cache_*`` keys)."""
    from ..models.text import read_prompts

    d = cfg.data
    # null: the teacher's Denoiser's own scale (teacher.guidance_scale, or a guidance-embedded teacher's embedding)
    guidance = d.teacher_guidance
    cache_dir = None
    if d.cache_size is not None:
        cache_dir = Path(d.cache_dir) if d.cache_dir else Path(out) / CACHE_DIR
    prompts = read_prompts(d.prompts, "data.prompts") if d.prompts and teacher.conditioning == "text" else None
    return TeacherSamples(teacher, d.teacher_steps, guidance, cfg.train.seed, d.cache_size, cache_dir, prompts,
                          d.teacher_sampler)
