"""Multi-student distillation (``training.msd``) for text-to-image (Stable Diffusion) teachers: the training prompts
(``data.prompts``) are clustered, ``cluster_prompts``: k-means (k-means++ start from a seeded generator, Lloyd
iterations in float64 until no centroid moves) on each prompt's mean text embedding (``prompt_features``: the prompt
embedding the UNet reads, averaged over its tokens); student k trains on cluster k's prompts (its own
``data.prompts`` file), and the router (``assemble_text_router``) sends a new prompt to the student of the nearest
centroid, the centroid being the mean feature of the student's prompts (the k-means fixed point). A file of K lists
of prompts gives the split by hand.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..config import Config, _apply, _yaml
from ..errors import FastdiffError
from .msd import PARTITION_FILE, teacher_from, write_router  # msd imports this module only inside its functions


def check_prompt_partition(parts: list[list]) -> None:
    """K non-empty lists of prompts (strings), no prompt in two of them."""
    seen: dict[str, int] = {}
    for k, part in enumerate(parts):
        if not part:
            raise FastdiffError(f"partition: student {k} has no prompts")
        for p in part:
            if not isinstance(p, str) or not p.strip():
                raise FastdiffError(f"partition: student {k}'s entry {p!r} is not a prompt (a text teacher's "
                                    "partition lists prompts)")
            if seen.setdefault(p, k) != k:
                raise FastdiffError(f"partition: prompt {p!r} is in the parts of students {seen[p]} and {k}")


def kmeans(features: torch.Tensor, k: int, seed: int, max_iter: int = 300) -> tuple[torch.Tensor, torch.Tensor]:
    """(assignment (N,), centroids (k, D)) of k-means on the rows of ``features`` in float64: k-means++ seeding from
    ``torch.Generator().manual_seed(seed)``, then Lloyd iterations until the centroids stop moving (then every row is
    assigned to its nearest centroid and every centroid is its cluster's mean). A cluster left empty takes the row
    farthest from its centroid. Deterministic: the same rows and seed give the same result."""
    from fastdiff.pipelines.pipeline_fastdiff_multi_student import nearest_centroid

    x = features.double()
    gen = torch.Generator().manual_seed(seed)
    centroids = x[torch.randint(len(x), (1,), generator=gen)]
    for _ in range(1, k):
        d2 = ((x[:, None] - centroids[None]) ** 2).sum(-1).min(dim=1).values
        if not d2.sum() > 0:
            raise FastdiffError(f"--partitions {k}: the prompts have only {len(centroids)} distinct text embeddings")
        centroids = torch.cat([centroids, x[torch.multinomial(d2 / d2.sum(), 1, generator=gen)]])
    for _ in range(max_iter):
        assign = nearest_centroid(x, centroids)
        moved = centroids.clone()
        for j in range(k):
            members = x[assign == j]
            if len(members):
                moved[j] = members.mean(dim=0)
            else:
                far = farthest_row(x, centroids, assign)
                moved[j], assign[far] = x[far], j
        if torch.equal(moved, centroids):
            break
        centroids = moved
    return nearest_centroid(x, centroids), centroids


def farthest_row(x: torch.Tensor, centroids: torch.Tensor, assign: torch.Tensor) -> int:
    """The row farthest from its own centroid: where k-means starts a cluster that was left empty again."""
    return int(((x - centroids[assign]) ** 2).sum(-1).argmax())


def text_features(pipe, prompts: list[str], batch_size: int = 64) -> torch.Tensor:
    """``prompt_features`` (the router's routing feature) of many prompts, in batches."""
    from fastdiff.pipelines.pipeline_fastdiff_multi_student import prompt_features

    with torch.no_grad():
        return torch.cat([prompt_features(pipe, prompts[i:i + batch_size]) for i in range(0, len(prompts), batch_size)])


def cluster_prompts(pipe, prompts: list[str], k: int, seed: int) -> list[list[str]]:
    """The training prompts in k clusters of their mean text embeddings (k-means, ``kmeans``); each prompt (every
    occurrence of it, in file order) in the part of its cluster, the parts in cluster order."""
    distinct = list(dict.fromkeys(prompts))
    if not 1 <= k <= len(distinct):
        raise FastdiffError(f"--partitions must be between 1 and the {len(distinct)} distinct prompts, got {k}")
    assign, _ = kmeans(text_features(pipe, distinct), k, seed)
    cluster = dict(zip(distinct, assign.tolist()))
    return [[p for p in prompts if cluster[p] == j] for j in range(k)]


def assemble_text_router(runs: list[Path], out: str | Path) -> Path:
    """One ``FastdiffMultiStudentTextPipeline`` folder from K finished runs of a Stable Diffusion teacher, each trained
    on its own prompts (``data.prompts``): the students' UNets in one ``PromptRoutedStudents`` whose centroids are the
    mean routing features of each student's prompts, the shared VAE / text encoder / tokenizer / scheduler, and
    fastdiff.json, partition.json (the prompts of each student) and README.md."""
    from diffusers import StableDiffusionPipeline

    from fastdiff.pipelines.pipeline_fastdiff_multi_student import (FastdiffMultiStudentTextPipeline,
                                                                     PromptRoutedStudents)
    from ..models.text import read_prompts

    parts, pipes, infos = [], [], []
    for run in runs:
        export = run / "student"
        info = json.loads((export / "fastdiff.json").read_text())
        if info.get("export") == "lora":  # LoRA students exported both ways carry the fused pipeline in fused/
            export = export / "fused"
        if info.get("pipeline_class") != "StableDiffusionPipeline" or not (export / "model_index.json").is_file() \
                or info.get("guidance_embedded") or info.get("flow_map"):
            raise FastdiffError(f"{run}: the router takes class-conditional students or full StableDiffusionPipeline "
                                "students (not guidance-embedded, flow-map or LoRA-only ones)")
        cfg = Config()
        _apply(cfg, _yaml((run / "config.yaml").read_text()))
        if not cfg.data.prompts or not Path(cfg.data.prompts).is_file():
            raise FastdiffError(f"{run}: its training prompts (data.prompts {cfg.data.prompts}) are not there; the "
                                "router's centroids are the mean features of each student's prompts")
        parts.append(read_prompts(cfg.data.prompts, "data.prompts"))
        pipes.append(StableDiffusionPipeline.from_pretrained(export, safety_checker=None, requires_safety_checker=False))
        infos.append(info)
    check_prompt_partition(parts)
    teachers = {teacher_from(run / "student", info, Path(out)) for run, info in zip(runs, infos)}
    if len(teachers) > 1:
        raise FastdiffError(f"the students were distilled from different teachers ({', '.join(sorted(teachers))})")
    first = pipes[0]
    for run, info, pipe in zip(runs, infos, pipes):
        if info["num_steps"] != infos[0]["num_steps"] or dict(pipe.scheduler.config) != dict(first.scheduler.config):
            raise FastdiffError(f"{run}: its steps or scheduler differ from {runs[0]}'s; one router samples every "
                                "student with one scheduler")
        for name in ("text_encoder", "vae"):
            a, b = getattr(pipe, name).state_dict(), getattr(first, name).state_dict()
            if a.keys() != b.keys() or any(not torch.equal(a[n], b[n]) for n in a):
                raise FastdiffError(f"{run}: its {name} differs from {runs[0]}'s (the router shares one)")
    configs = [{"_class_name": type(p.unet).__name__, **{k: v for k, v in p.unet.config.items()
                                                          if not k.startswith("_")}} for p in pipes]
    centroids = torch.stack([text_features(first, list(dict.fromkeys(part))).mean(dim=0) for part in parts])
    model = PromptRoutedStudents(students=configs, feature_dim=centroids.shape[1])
    for net, pipe in zip(model.nets, pipes):
        net.load_state_dict(pipe.unet.state_dict())
    model.centroids.copy_(centroids)
    router = FastdiffMultiStudentTextPipeline(students=model.eval(), vae=first.vae, text_encoder=first.text_encoder,
                                              tokenizer=first.tokenizer, scheduler=first.scheduler)
    info = {"format": "fastdiff-msd-text-v1", "routing": "nearest prompt centroid", "teacher": teachers.pop(),
            "objective": infos[0]["objective"], "num_steps": infos[0]["num_steps"], "num_classes": None,
            "students": [{"prompts": len(part), "run": os.path.relpath(run.resolve(), Path(out).resolve()),
                          "parameters": sum(p.numel() for p in pipe.unet.parameters())}
                         for part, run, pipe in zip(parts, runs, pipes)]}
    return write_router(router, info, Path(out), _text_card(info), {PARTITION_FILE: json.dumps(parts, indent=1) + "\n"})


def _text_card(info: dict) -> str:
    rows = "\n".join(f"| {k} | {s['prompts']} | {s['parameters']:,} |" for k, s in enumerate(info["students"]))
    return f"""---
library_name: diffusers
tags: [fastdiff, msd, {info['objective']}, distillation, text-to-image]
---
# {len(info['students'])} one-step Stable Diffusion students distilled with fastdiff msd (prompt clusters)

- teacher: `{info['teacher']}`
- objective: `{info['objective']}`, {info['num_steps']} sampling step(s) trained for
- routing: each prompt goes to the student whose prompt cluster's centroid (the mean of its training prompts' mean
  text embeddings, `students/` safetensors) is nearest to the prompt's own; the prompts of each are in partition.json

| student | training prompts | parameters |
|---|---|---|
{rows}

## Use

```python
from fastdiff.pipelines.pipeline_fastdiff_multi_student import FastdiffMultiStudentTextPipeline
pipe = FastdiffMultiStudentTextPipeline.from_pretrained(".")
images = pipe(["a photo of a cat", "a red car"], num_inference_steps={info['num_steps']}).images  # each by its student
```
"""
