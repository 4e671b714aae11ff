"""Reflow pairs: (noise, teacher sample) couplings of the teacher's deterministic ODE, stored as sharded files.

Reflow (Liu et al. 2023; improved by Lee et al. 2024, "Improving the Training of Rectified Flows", reference code
sangyun884/rfpp ``generate_edm.py``) regresses a student onto straight lines between a noise z and the sample the
teacher's probability-flow ODE carries it to. ``fastdiff pairs`` makes those pairs once, with the sampler that
``data.name: teacher`` uses (``models.trajectory.ode_sample`` on its ``trajectory_levels``: deterministic DDIM
/ Euler, or EDM's Heun), from native noise z at the sampler's first level (the top of the teacher's table; t = 1
for ddim on flow teachers):

    out/manifest.json                 teacher, sampler, steps, guidance, seed, count, shard size, sample shape, ...
    out/pairs-00000.safetensors       "noise" (n, *shape), "sample" (n, *shape), "cond" (n,) int64 when conditional

Each shard draws its noise (and class / prompt index, uniform) from a seed of its own, derived from ``--seed`` and
its index, so its content does not depend on which shards exist or on the order they were made: a rerun after an
interruption keeps the complete shards and makes the rest, and the result equals an uninterrupted run. A shard is
written under a temporary name and renamed when complete, so a reader never sees half a shard; only one shard is in
memory at a time. ``data.name: pairs`` (``PairSamples``) reads the folder back for ``objective.name: reflow``,
memory-mapped: a batch reads its rows from the files, so a run's memory does not grow with the number of pairs.
"""
from __future__ import annotations

import hashlib
import json
import math
import struct
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import FastdiffError, read_json_object, refuse_replacing, require_folder_path
from ..inference.sampling import batch_starts, is_main
from ..models.trajectory import SAMPLERS, ode_sample, trajectory_levels

MANIFEST = "manifest.json"
FORMAT = "fastdiff-pairs/1"


def shard_name(index: int) -> str:
    return f"pairs-{index:05d}.safetensors"


def shard_seed(seed: int, index: int) -> int:
    """A seed per shard, independent of the other shards and of the order shards are made in."""
    return int.from_bytes(hashlib.sha256(f"fastdiff-pairs/{seed}/{index}".encode()).digest()[:7], "big")


def pairs_key(teacher, teacher_path: str, num: int, steps: int, sampler: str, shard_size: int, seed: int,
              guidance: float | None, prompts: list[str] | None) -> dict:
    """The manifest: what a shard's content depends on (another value means other pairs), and the count."""
    return {"format": FORMAT, "teacher": teacher_path, "sampler": sampler, "steps": steps, "guidance": guidance,
            "seed": seed, "count": num, "shard_size": shard_size, "num_shards": math.ceil(num / shard_size),
            "shape": list(teacher.sample_shape), "conditioning": teacher.conditioning,
            "num_classes": teacher.num_classes, "prompts": prompts, "dtype": str(teacher.dtype)}


def draw_conditions(teacher, n: int, gen: torch.Generator, prompts: list[str] | None) -> torch.Tensor | None:
    """Class labels uniform over the real classes, or prompt indices uniform over the prompts; None unconditional."""
    if teacher.num_classes:
        return torch.randint(teacher.num_classes, (n,), generator=gen)
    if prompts:
        return torch.randint(len(prompts), (n,), generator=gen)
    return None


def make_pairs(teacher_path: str, out: str | Path, num: int, steps: int = 40, shard_size: int = 4096,
               batch_size: int = 256, seed: int = 0, guidance: float | None = None, sampler: str = "heun",
               prompts_file: str | None = None, device=None, overwrite: bool = False, on_shard=None,
               part: tuple[int, int] | None = None, wait=None) -> tuple[int, int]:
    """Write (or complete) the pairs folder ``out``; returns (shards made now, shards that were already there).

    ``guidance``: CFG scale of the teacher's ODE (None = the teacher's own, 1 = none). ``on_shard(rows)`` is called
    after each shard (progress bars). ``part=(i, P)``, on P launched processes: process i makes shards i, i + P, ...
    (a shard's content depends on its index only); the main one (i = 0) prepares the folder first, and ``wait()``,
    a barrier, holds the others until it has, and all of them at the end until every shard is written (each then
    checks that it sees them all: several machines need a shared folder); the counts are then this process's."""
    from ..models.embedded import resolve_teacher_path
    from ..models.teacher import load_teacher, require_condition
    from ..models.text import read_prompts

    if num <= 0 or steps < 2 or shard_size <= 0 or batch_size <= 0:
        raise FastdiffError("--num, --shard-size and --batch-size must be positive and --steps at least 2")
    if sampler not in SAMPLERS:
        raise FastdiffError(f"--sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    path = resolve_teacher_path(teacher_path)
    teacher = load_teacher(path)
    prompts = read_prompts(prompts_file) if prompts_file else None
    if (teacher.conditioning == "text") != bool(prompts):
        raise FastdiffError("--prompts FILE is for text-to-image teachers, and they need it (one prompt a line)")
    if guidance is not None and guidance != 1:
        require_condition(teacher, f"--guidance {guidance}")
    resolved = str(Path(path).resolve()) if Path(path).exists() else str(path)
    levels = trajectory_levels(teacher.denoiser.schedule, steps, sampler)  # refuses too many ddim steps: first
    key = pairs_key(teacher, resolved, num, steps, sampler, shard_size, seed, guidance, prompts)
    out = Path(out)
    refuse_replacing(out, "--out", {"teacher": path, "prompts file": prompts_file})
    if is_main(part):
        _open_folder(out, key, overwrite)  # may empty it (--overwrite): before any other process writes
    if part is not None:
        wait()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    (teacher.pipeline if teacher.pipeline is not None else teacher.model).to(device)  # a pipeline moves its VAE, encoders
    encode = None
    if prompts:
        from ..models.text import PromptEncoder

        text = PromptEncoder(teacher.pipeline, device=device, max_cached=0)
        encode = lambda idx: text([prompts[i] for i in idx.tolist()])  # noqa: E731
    made = kept = 0
    for index, start in batch_starts(num, shard_size, part):  # shards are batches of the pairs: this process's
        target = out / shard_name(index)
        rows = min(shard_size, num - start)
        if target.is_file():
            kept += 1
        else:
            tensors = _make_shard(teacher, rows, shard_seed(seed, index), levels, sampler, batch_size, guidance,
                                  prompts, encode, device)
            tmp = target.with_name(f".{target.name}.tmp")
            save_file(tensors, str(tmp))
            tmp.replace(target)  # complete or absent: never half a shard under the final name
            made += 1
        if on_shard is not None:
            on_shard(rows)
    if part is not None:
        wait()  # every process's shards are written
        missing = [i for i in range(key["num_shards"]) if not (out / shard_name(i)).is_file()]
        if missing:  # processes on other machines wrote where this one cannot see
            raise FastdiffError(f"{out}: {len(missing)} of {key['num_shards']} shards are not there after every "
                                "process finished: launched on several machines, --out must be on a filesystem "
                                "they share")
    return made, kept


@torch.no_grad()
def _make_shard(teacher, rows: int, seed: int, levels, sampler: str, batch_size: int, guidance, prompts, encode,
                device) -> dict:
    gen = torch.Generator().manual_seed(seed)
    cond_idx = draw_conditions(teacher, rows, gen, prompts)
    noise = torch.randn((rows, *teacher.sample_shape), generator=gen)
    sample = torch.empty_like(noise)
    for start in range(0, rows, batch_size):
        part = slice(start, start + batch_size)
        cond = None
        if cond_idx is not None:
            cond = encode(cond_idx[part]) if encode else {"class_labels": cond_idx[part].to(device)}
        sample[part] = ode_sample(teacher.denoiser, noise[part].to(device), levels, cond, guidance,
                                  heun=sampler == "heun").float().cpu()
    return {"noise": noise, "sample": sample} | ({"cond": cond_idx} if cond_idx is not None else {})


def _open_folder(out: Path, key: dict, overwrite: bool) -> None:
    """Create ``out`` with its manifest, or continue one made with the same settings; stale temporary files go."""
    require_folder_path(out, "--out")
    manifest = out / MANIFEST
    if manifest.is_file():
        try:
            old = json.loads(manifest.read_text())
        except ValueError:
            old = None
        if old != key:
            if not overwrite and not isinstance(old, dict):
                raise FastdiffError(f"{manifest} is damaged (not a JSON object); use another folder, or --overwrite to "
                                    "make the pairs again")
            if not overwrite:
                changed = sorted(k for k in key if old.get(k) != key[k])
                raise FastdiffError(f"--out {out} holds pairs made with other settings ({', '.join(changed)}); "
                                    "use another folder, or --overwrite to replace them")
            for old_shard in out.glob("pairs-*.safetensors"):
                old_shard.unlink()
    elif out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FastdiffError(f"--out {out} is not empty and holds no pairs manifest; use an empty folder")
    out.mkdir(parents=True, exist_ok=True)
    for tmp in out.glob(".pairs-*.tmp"):
        tmp.unlink()
    from .checkpoint import atomic_write_text

    atomic_write_text(manifest, json.dumps(key, indent=1))


REMAKE = "delete it and rerun `fastdiff pairs` with the same options to make it again"


def _damaged(path: Path, why: str, remedy: str = REMAKE) -> FastdiffError:
    return FastdiffError(f"{path} cannot be read ({why}); {remedy}")


# safetensors' dtype names for what pairs shards hold (float32 noise and samples, int64 conditions) and kin
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32}


def map_shard(path: Path, remedy: str = REMAKE) -> dict:
    """One pairs shard's tensors as views of the file, memory-mapped (private, read-only use): rows are read from disk
    when indexed, and the pages stay file-backed (the OS evicts them as needed), not the process's own memory.

    The safetensors layout: an 8-byte little-endian header length N, N bytes of JSON (per tensor dtype, shape and
    byte offsets into the data after the header), then the data. A file cut short (an interrupted copy, a full disk)
    or with a damaged header is a one-line error naming it and ending with ``remedy``."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        start = 8 + n
        spans = {k: (_DTYPES[v["dtype"]], list(v["shape"]), *v["data_offsets"]) for k, v in header.items()}
    except (ValueError, KeyError, TypeError, AttributeError, struct.error):
        raise _damaged(path, "no safetensors header", remedy) from None
    if any(begin < 0 or end > size - start or math.prod(shape) * dtype.itemsize != end - begin
           for dtype, shape, begin, end in spans.values()):
        raise _damaged(path, "shorter than its header says", remedy)
    raw = torch.from_file(str(path), shared=False, size=size, dtype=torch.uint8)
    tensors = {}
    for key, (dtype, shape, begin, end) in spans.items():
        part = raw[start + begin:start + end]
        if (start + begin) % dtype.itemsize:  # a view needs aligned storage: copy this one (safetensors aligns them)
            part = part.clone()
        tensors[key] = part.view(dtype).reshape(shape)
    return tensors


class PairSamples:
    """``data.name: pairs``: random batches of stored pairs, with the ``.batch(n, device, encode)`` interface of
    ``TeacherSamples`` and one checkpointed ``rng``. A batch's "image" is the pair stacked on dim 1,
    ``(n, 2, *shape)``: [:, 0] the noise, [:, 1] the teacher's sample (what ``objective.name: reflow`` reads).
    The shards are memory-mapped (:func:`map_shard`): a batch reads its rows from them, the same rows for the same
    ``rng`` as from loaded shards."""

    def __init__(self, path: str | None, teacher, seed: int = 0):
        if path is None or not (Path(path) / MANIFEST).is_file():
            raise FastdiffError(f"data.name pairs needs data.path: a folder made by `fastdiff pairs` (no {MANIFEST} "
                                f"in {path})")
        root = Path(path)
        key = read_json_object(root / MANIFEST, "rerun `fastdiff pairs` with --overwrite to make the pairs again")
        if key.get("format") != FORMAT:
            raise FastdiffError(f"{root / MANIFEST}: not a fastdiff pairs manifest")
        if list(key["shape"]) != list(teacher.sample_shape) or key["num_classes"] != teacher.num_classes:
            raise FastdiffError(f"data.path {path}: pairs of shape {key['shape']} with {key['num_classes']} classes, "
                                f"but the teacher makes {list(teacher.sample_shape)} with {teacher.num_classes}")
        missing = [i for i in range(key["num_shards"]) if not (root / shard_name(i)).is_file()]
        if missing:
            raise FastdiffError(f"data.path {path}: {len(missing)} of {key['num_shards']} shards missing; rerun "
                                "`fastdiff pairs` with the same options to finish them")
        self.shards = [map_shard(root / shard_name(i)) for i in range(key["num_shards"])]
        for i, shard in enumerate(self.shards):
            if not {"noise", "sample"} <= shard.keys():
                raise FastdiffError(f"{root / shard_name(i)} holds {sorted(shard)}, not a pairs shard's noise and "
                                    f"sample; {REMAKE}")
        rows = [len(s["noise"]) for s in self.shards]
        size = key["shard_size"]
        uneven = any(len(s["sample"]) != r or ("cond" in s) != ("cond" in self.shards[0])
                     for s, r in zip(self.shards, rows))
        if sum(rows) != key["count"] or any(r != size for r in rows[:-1]) or uneven:
            raise FastdiffError(f"data.path {path}: {sum(rows)} pairs in shards of {sorted(set(rows))} rows on disk, "
                                f"the manifest says {key['count']} in shards of {size}; rerun `fastdiff pairs` with "
                                "--overwrite to make them again")
        self.count, self.shard_size = key["count"], size
        self.conditional = "cond" in self.shards[0]
        self.prompts = key.get("prompts")
        self.captions = self.prompts  # the prompts a run encodes up front (text teachers)
        self.rng = torch.Generator().manual_seed(seed)

    def __len__(self):
        return self.count

    def rows(self, key: str, idx: torch.Tensor) -> torch.Tensor:
        """Rows ``idx`` (indices over all pairs, in order) of one stored tensor, read from the shards they sit in."""
        shard, local = idx // self.shard_size, idx % self.shard_size
        out = torch.empty((len(idx), *self.shards[0][key].shape[1:]), dtype=self.shards[0][key].dtype)
        for s in shard.unique().tolist():
            mine = shard == s
            out[mine] = self.shards[s][key][local[mine]]
        return out

    def batch(self, n: int, device, encode=None) -> tuple[torch.Tensor, torch.Tensor | None, list[str] | None]:
        """(pairs (n, 2, *shape), labels or None, prompts or None)."""
        idx = torch.randint(self.count, (n,), generator=self.rng)
        x = torch.stack([self.rows("noise", idx), self.rows("sample", idx)], dim=1).to(device)
        if not self.conditional:
            return x, None, None
        cond = self.rows("cond", idx)
        if self.prompts:
            return x, None, [self.prompts[i] for i in cond.tolist()]
        return x, cond.to(device), None
