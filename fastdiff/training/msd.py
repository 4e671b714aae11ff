"""Multi-student distillation (MSD): Song, Lorraine, Nie, Kreis, Lucas, "Multi-student Diffusion Distillation for
Better One-step Generators" (arXiv 2410.23274, ICML 2025). No public training code: built from the paper.

The conditioning set C is split into K disjoint parts C_1..C_K and a router F: C -> {1..K} picks the student of a
condition. Student G_k is distilled on its part only, with an unchanged distribution-matching objective (the paper
uses DMD2's distribution matching, with its adversarial term as an option; any of fastdiff's works): with
c ~ p(c | c in C_k),

    grad_theta L_k = E_{z, c, t} [ w_t (s_fake,k(x_t, c) - s_real(x_t, c)) dG_k(z, c)/dtheta ],  x = G_k(z, c),

where the teacher's score s_real is the one conditional teacher shared by every student, and the fake score s_fake,k
is student k's own, trained by denoising score matching on G_k's samples of C_k alone. Restricting the conditions is
therefore all MSD asks of the trainer: ``student.classes`` draws the class labels of every generator sample (and so of
every fake-score update) from the student's part, and keeps only real data of those classes (GAN heads, data-trained
objectives). The one-step sampler of MSD is then x = G_{F(c)}(z, c): ``FastdiffMultiStudentPipeline``.

The partition: K contiguous blocks of labels (``contiguous_partition``, fastdiff's default, not checked against the
paper's own split of ImageNet) or any split given as a file of K lists. Text-to-image (Stable Diffusion) teachers:
the training prompts are clustered and routed by their text embeddings (``training.msd_text``).

Smaller students (the paper's second use) take ``student.model`` (a diffusers model folder of another architecture);
``--warmup-steps N`` first trains each by the paper's teacher score matching (``training.msd_warmup``), and the
warmed network becomes the student's ``student.model``.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import torch
import yaml

from ..config import Config, _apply, _yaml, validate
from ..errors import FastdiffError, read_text

PARTITION_FILE = "partition.json"  # beside the students' runs: the classes (or prompts) of each


def contiguous_partition(num_classes: int, k: int) -> list[list[int]]:
    """Classes 0..num_classes-1 in k contiguous blocks whose sizes differ by at most one (the first ones larger)."""
    if not 1 <= k <= num_classes:
        raise FastdiffError(f"--partitions must be between 1 and the teacher's {num_classes} classes, got {k}")
    size, extra = divmod(num_classes, k)
    bounds = [i * size + min(i, extra) for i in range(k + 1)]
    return [list(range(bounds[i], bounds[i + 1])) for i in range(k)]


def read_partition(path: str) -> list[list]:
    """A partition file: JSON or YAML, a list of K lists of class labels, or of prompts (one list per student)."""
    try:
        data = _yaml(read_text(path, "--partition-file"))
    except (OSError, yaml.YAMLError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__  # one line, as a config's YAML error
        raise FastdiffError(f"--partition-file {path}: not readable as JSON / YAML ({first})") from None
    if not isinstance(data, list) or not all(isinstance(part, list) for part in data):
        raise FastdiffError(f"--partition-file {path}: expected a list of lists of class labels, e.g. [[0, 1], [2]], "
                            "or of prompts")
    return data


def check_partition(parts: list[list[int]], num_classes: int) -> list[int]:
    """K non-empty, disjoint lists of labels 0..num_classes-1 that cover every class (each class needs a student).
    Returns the route: for every class label, the index of the part (student) that holds it."""
    seen: dict[int, int] = {}
    for k, part in enumerate(parts):
        if not part:
            raise FastdiffError(f"partition: student {k} has no classes")
        for c in part:
            if not isinstance(c, int) or isinstance(c, bool) or not 0 <= c < num_classes:
                raise FastdiffError(f"partition: student {k}'s class {c!r} is not a label 0..{num_classes - 1}")
            if c in seen:
                raise FastdiffError(f"partition: class {c} is in the parts of students {seen[c]} and {k}")
            seen[c] = k
    missing = [c for c in range(num_classes) if c not in seen]
    if missing:
        raise FastdiffError(f"partition: classes {missing} have no student (every class needs one)")
    return [seen[c] for c in range(num_classes)]


def check_classes(classes: list[int] | None, teacher) -> None:
    """``student.classes`` against the teacher: a class-conditional teacher, labels in range, no repeats."""
    if classes is None:
        return
    if not teacher.num_classes:
        raise FastdiffError("student.classes needs a class-conditional teacher; for text-to-image teachers give each "
                            "student its own prompts (data.prompts)")
    if not classes:
        raise FastdiffError("student.classes is empty; null trains on every class")
    bad = [c for c in classes if not 0 <= c < teacher.num_classes]
    if bad or len(set(classes)) != len(classes):
        raise FastdiffError(f"student.classes must be distinct labels 0..{teacher.num_classes - 1}, got {classes}")


def draw_class_labels(n: int, num_classes: int, classes: list[int] | None, device) -> torch.Tensor:
    """Uniform class labels for a batch of generator samples: over every class, or over ``student.classes``
    (the same single randint call either way, so runs without a partition draw exactly what they drew before)."""
    if classes is None:
        return torch.randint(num_classes, (n,), device=device)
    allowed = torch.as_tensor(classes, device=device)
    return allowed[torch.randint(len(classes), (n,), device=device)]


def restricted_to_classes(cfg: Config, teacher, real):
    """The run's real data restricted to ``student.classes`` (checked against the teacher here); data that is not
    a labelled in-memory set (streamed, the teacher's own samples, reflow pairs) is refused with a partition."""
    classes = cfg.student.classes
    check_classes(classes, teacher)
    if classes is None or real is None:
        return real
    from .data import RealImages

    if type(real) is not RealImages or real.labels is None:
        raise FastdiffError(f"student.classes with data.name {cfg.data.name}: only labelled in-memory data "
                            "(fashion-mnist, analytic) can be restricted to a student's classes")
    keep = torch.isin(real.labels, torch.as_tensor(classes, dtype=real.labels.dtype)).nonzero().squeeze(1)
    if not len(keep):
        raise FastdiffError(f"student.classes {classes}: the data has no image of these classes")
    return RealImages(real.images[keep], real.labels[keep], cfg.train.seed)


# --- fastdiff msd: K students, then one router pipeline -----------------------------------------------------------
def student_config(cfg: Config, part: list, out: Path) -> Config:
    """Student k's run: the shared config with its part (classes, or the file of its prompts beside the runs) and its
    own output folder."""
    child = copy.deepcopy(cfg)
    if part and isinstance(part[0], str):  # a prompt cluster: its own data.prompts (JSONL keeps any prompt intact)
        prompts = out.parent / f"{out.name}-prompts.jsonl"
        prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in part))
        _apply(child, {"data": {"prompts": str(prompts)}, "output_dir": str(out)})
    else:
        _apply(child, {"student": {"classes": list(part)}, "output_dir": str(out)})
    validate(child)
    return child


def _partition(cfg: Config, parts: list[list] | int) -> list[list]:
    """The checked partition of the teacher's conditions: K class blocks, K prompt clusters, or the given lists."""
    from ..models.embedded import resolve_teacher_path
    from ..models.teacher import load_teacher
    from ..models.text import pipeline_family, read_prompts
    from .msd_text import check_prompt_partition, cluster_prompts

    if cfg.student.classes is not None:
        raise FastdiffError("fastdiff msd sets student.classes per student from the partition; leave it null")
    teacher = load_teacher(resolve_teacher_path(cfg.teacher.path))  # let go when this returns
    if teacher.num_classes:
        parts = contiguous_partition(teacher.num_classes, parts) if isinstance(parts, int) else parts
        check_partition(parts, teacher.num_classes)
        return parts
    if teacher.conditioning != "text" or pipeline_family(teacher.pipeline) != "sd":
        raise FastdiffError(f"fastdiff msd needs a class-conditional or a Stable Diffusion (StableDiffusionPipeline) "
                            f"teacher; {cfg.teacher.path} is {teacher.conditioning}-conditioned "
                            f"({type(teacher.pipeline).__name__ if teacher.pipeline is not None else 'no pipeline'})")
    if isinstance(parts, int):
        if not cfg.data.prompts:
            raise FastdiffError("fastdiff msd on a text-to-image teacher clusters the training prompts: give "
                                "data.prompts FILE")
        parts = cluster_prompts(teacher.pipeline, read_prompts(cfg.data.prompts, "data.prompts"), parts, cfg.train.seed)
    check_prompt_partition(parts)
    return parts


def train_students(cfg: Config, parts: list[list] | int, overwrite: bool = False, resume: bool = False,
                   progress: bool = True, log=print, warmup_steps: int = 0, warmup_lr: float = 1e-4) -> Path:
    """``fastdiff msd``: one student per part under ``output_dir/student-K`` (each an ordinary run, exported to its
    ``student/``), then the router pipeline in ``output_dir/router``. ``parts``: the partition (lists of class labels,
    or of prompts for a text teacher), or K (``contiguous_partition`` / ``cluster_prompts``). A student whose run
    already holds its export is kept (rerun to finish an interrupted msd); ``resume``: a student's unfinished run
    continues from its latest checkpoint. ``warmup_steps``: first train each (smaller, ``student.model``) student by
    teacher score matching (``warm_up``), kept in ``output_dir/student-K-warmup``."""
    from .loop import Trainer
    from .msd_warmup import warm_up

    if warmup_steps < 0 or (warmup_steps and not cfg.student.model):
        raise FastdiffError("--warmup-steps warms up a student of another (smaller) architecture: give student.model "
                            "(a copy of the teacher already is the teacher), and a step count >= 0")
    parts = _partition(cfg, parts)
    root = Path(cfg.output_dir)
    recorded = root / PARTITION_FILE
    if recorded.is_file() and json.loads(recorded.read_text()) != parts and not overwrite:
        raise FastdiffError(f"{root} holds students of another partition ({recorded}); pass --overwrite to replace them")
    runs = [root / f"student-{k}" for k in range(len(parts))]
    for run in runs:  # every refusal before anything is written (an exported run is checked against its part below)
        if not (run / "student").is_dir():
            _refuse_unfinished(run, overwrite, resume)
    root.mkdir(parents=True, exist_ok=True)
    recorded.write_text(json.dumps(parts) + "\n")
    if overwrite:  # students of a larger earlier partition would sit beside the new ones, unrouted
        remove_extra_students(root, len(parts))
    for k, (part, run) in enumerate(zip(parts, runs)):
        what = f"{len(part)} prompts" if isinstance(part[0], str) else f"classes {part}"
        child = student_config(cfg, part, run)
        if not overwrite and _finished(run, child):
            log(f"student {k} ({what}): already exported in {run / 'student'}, kept")
            continue
        _refuse_unfinished(run, overwrite, resume)
        again = resume and (run / "checkpoints").is_dir()
        if warmup_steps:
            folder = warm_up(child, warmup_steps, warmup_lr, root / f"student-{k}-warmup", overwrite, log)
            _apply(child, {"student": {"model": str(folder)}})
        log(f"student {k} of {len(parts)}: {what} -> {run}")
        Trainer(child, resume="latest" if again else None, overwrite=overwrite, progress=progress).fit()
    return assemble_router(runs, root / "router")


def _refuse_unfinished(run: Path, overwrite: bool, resume: bool) -> None:
    """A student's folder holding a run that neither --overwrite replaces nor --resume continues."""
    again = resume and (run / "checkpoints").is_dir()
    if run.is_dir() and any(run.iterdir()) and not (overwrite or again):
        raise FastdiffError(f"{run} holds an unfinished student; pass --resume to continue it from its latest "
                            "checkpoint or --overwrite to retrain every student")


def _finished(run: Path, child: Config) -> bool:
    """The run holds its export, trained on the part ``child`` gives it (same classes / prompts)."""
    from ..models.text import read_prompts

    config = run / "config.yaml"
    if not (run / "student" / "fastdiff.json").is_file() or not config.is_file():
        return False
    done = Config()
    _apply(done, _yaml(config.read_text()))
    if child.student.classes is not None:
        return done.student.classes == child.student.classes
    return bool(done.data.prompts) and Path(done.data.prompts).is_file() and \
        read_prompts(done.data.prompts) == read_prompts(child.data.prompts)


def remove_extra_students(root: Path, count: int) -> None:
    """Delete the ``student-K`` run folders (and their ``-warmup`` folders) with K >= ``count`` under ``root``: what
    an earlier partition into more students left. Nothing else there is touched."""
    for stale in root.glob("student-*"):
        index = stale.name.removeprefix("student-").removesuffix("-warmup")
        if stale.is_dir() and index.isdigit() and int(index) >= count:
            shutil.rmtree(stale)


def assemble_router(runs: list[str | Path], out: str | Path) -> Path:
    """One ``FastdiffMultiStudentPipeline`` folder from K finished student runs (each ``fastdiff distill`` with its
    ``student.classes``; their ``student/`` exports): the students' networks in one ``MultiStudentUNet``, the shared
    scheduler, and fastdiff.json / README.md. Written atomically."""
    from fastdiff.pipelines import FastdiffClassConditionalPipeline, FastdiffMultiStudentPipeline, MultiStudentUNet

    runs = [Path(r) for r in runs]
    found = []
    for run in runs:
        if not (run / "student" / "fastdiff.json").is_file() or not (run / "config.yaml").is_file():
            raise FastdiffError(f"{run} is not a finished fastdiff run (no config.yaml or student/fastdiff.json)")
        found.append(json.loads((run / "student" / "fastdiff.json").read_text()))
    if not all(info.get("num_classes") for info in found):
        from .msd_text import assemble_text_router

        return assemble_text_router(runs, out)
    parts, pipes, infos = [], [], []
    for run in runs:
        export = run / "student"
        cfg = Config()
        _apply(cfg, _yaml((run / "config.yaml").read_text()))
        info = json.loads((export / "fastdiff.json").read_text())
        if not info.get("num_classes") or info.get("guidance_embedded") or info.get("flow_map"):
            raise FastdiffError(f"{export}: the router takes class-conditional students of the class-conditional "
                                "pipeline (not guidance-embedded or flow-map ones)")
        parts.append(cfg.student.classes if cfg.student.classes is not None else list(range(info["num_classes"])))
        pipes.append(FastdiffClassConditionalPipeline.from_pretrained(export))
        infos.append(info)
    num_classes = infos[0]["num_classes"]
    route = check_partition(parts, num_classes)
    teachers = {teacher_from(run / "student", info, Path(out)) for run, info in zip(runs, infos)}
    if len(teachers) > 1:
        raise FastdiffError(f"the students were distilled from different teachers ({', '.join(sorted(teachers))})")
    for run, info, pipe in zip(runs, infos, pipes):
        if (info["num_classes"], info["num_steps"]) != (num_classes, infos[0]["num_steps"]):
            raise FastdiffError(f"{run}: {info['num_classes']} classes, {info['num_steps']} steps; the first "
                                f"student has {num_classes}, {infos[0]['num_steps']}")
        if dict(pipe.scheduler.config) != dict(pipes[0].scheduler.config):
            raise FastdiffError(f"{run}: its scheduler differs from {runs[0]}'s (another teacher table or first "
                                "noise level); one router samples every student with one scheduler")
        if type(pipe.unet).__name__ != "UNet2DModel":
            raise FastdiffError(f"{run}: the router takes UNet2DModel students, not {type(pipe.unet).__name__}")
    configs = [{"_class_name": type(p.unet).__name__, **{k: v for k, v in p.unet.config.items()
                                                          if not k.startswith("_")}} for p in pipes]
    model = MultiStudentUNet(students=configs, class_to_student=route)
    for net, pipe in zip(model.nets, pipes):
        net.load_state_dict(pipe.unet.state_dict())
    router = FastdiffMultiStudentPipeline(students=model.eval(), scheduler=pipes[0].scheduler)
    info = {"format": "fastdiff-msd-v1", "teacher": teachers.pop(), "objective": infos[0]["objective"],
            "num_steps": infos[0]["num_steps"], "num_classes": num_classes, "partition": parts,
            "students": [{"classes": part, "run": os.path.relpath(run.resolve(), Path(out).resolve()),
                          "parameters": sum(p.numel() for p in pipe.unet.parameters())}
                         for part, run, pipe in zip(parts, runs, pipes)]}
    return write_router(router, info, Path(out), _card(info))


def teacher_from(export: Path, info: dict, out: Path) -> str:
    """The teacher as a student's export records it (a hub id, an ``embedded:`` name, or a folder relative to that
    export), with a folder made relative to the router's folder instead."""
    folder = export / str(info.get("teacher_folder", ""))
    if info.get("teacher_folder") and not str(info["teacher_folder"]).startswith("embedded:") and folder.is_dir():
        return os.path.relpath(folder.resolve(), out.resolve())
    return str(info["teacher"])


def write_router(router, info: dict, out: Path, card: str, extra: dict | None = None) -> Path:
    """The router folder, written atomically: the pipeline, fastdiff.json, the README.md ``card`` and ``extra``
    files (name: text)."""
    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    router.save_pretrained(tmp, safe_serialization=True)
    (tmp / "fastdiff.json").write_text(json.dumps(info, indent=2))
    (tmp / "README.md").write_text(card)
    for name, text in (extra or {}).items():
        (tmp / name).write_text(text)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def _card(info: dict) -> str:
    rows = "\n".join(f"| {k} | {s['classes']} | {s['parameters']:,} |" for k, s in enumerate(info["students"]))
    return f"""---
library_name: diffusers
tags: [fastdiff, msd, {info['objective']}, distillation]
---
# {len(info['students'])} one-step students distilled with fastdiff msd (multi-student distillation)

- teacher: `{info['teacher']}`
- objective: `{info['objective']}`, {info['num_steps']} sampling step(s) trained for

| student | classes | parameters |
|---|---|---|
{rows}

## Use

```python
from fastdiff.pipelines import FastdiffMultiStudentPipeline
pipe = FastdiffMultiStudentPipeline.from_pretrained(".")
images = pipe(class_labels=[0, 1, 2], num_inference_steps={info['num_steps']}).images  # each label by its student
```
"""
