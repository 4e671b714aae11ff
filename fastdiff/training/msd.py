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
the training prompts (``data.prompts``) are clustered, ``cluster_prompts``: k-means (k-means++ start from a seeded
generator, Lloyd iterations in float64 until no centroid moves) on each prompt's mean text embedding
(``prompt_features``: the prompt embedding the UNet reads, averaged over its tokens); student k trains on cluster k's
prompts (its own ``data.prompts`` file), and the router sends a new prompt to the student of the nearest centroid,
the centroid being the mean feature of the student's prompts (the k-means fixed point). A file of K lists of prompts
gives the split by hand.

Smaller students (the paper's second use) take ``student.model`` (a diffusers model folder of another architecture).
The paper trains them in three stages, "a Teacher Score Matching pretraining, to provide stable initialization", then
distribution matching, then the adversarial stage. ``--warmup-steps N`` runs the first stage
(``teacher_score_matching``): the student network, as a denoiser in the teacher's parametrisation, regresses the
teacher's output at the same noisy input,

    L_TSM = E_{c, x0, t, eps} [ w(sigma_t) || D_student(x0 + sigma_t eps, sigma_t, c) - D_teacher(x0 + sigma_t eps, sigma_t, c) ||^2 ],

with w the teacher's own loss weight (``Denoiser.loss_weight``: the squared error of the network's native output,
eps or v), i.e. the student's score matched to the teacher's, since s(x) = (D(x) - x) / sigma^2 and D is affine in
the native output. t is uniform over the teacher's training timesteps, c over the student's classes / prompts;
the teacher is the conditional one without guidance.
Deviation: the paper noises real data; here x0 is the teacher's own deterministic DDIM sample
(``WARMUP_TEACHER_STEPS`` steps) from seeded noise, so the warm-up is data-free like the distribution matching
after it (text runs have prompts, not images). The warmed network is saved as a diffusers folder beside the runs
and becomes the student's ``student.model``.
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
from ..errors import FastdiffError

PARTITION_FILE = "partition.json"  # beside the students' runs: the classes (or prompts) of each
WARMUP_TEACHER_STEPS = 8  # DDIM steps of the teacher samples the warm-up noises


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
        data = _yaml(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise FastdiffError(f"--partition-file {path}: not readable as JSON / YAML ({exc})") from None
    if not isinstance(data, list) or not all(isinstance(part, list) for part in data):
        raise FastdiffError(f"--partition-file {path}: expected a list of lists of class labels, e.g. [[0, 1], [2]], "
                            "or of prompts")
    return data


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
            else:  # the row farthest from its own centroid starts this cluster again
                far = ((x - centroids[assign]) ** 2).sum(-1).argmax()
                moved[j], assign[far] = x[far], j
        if torch.equal(moved, centroids):
            break
        centroids = moved
    return nearest_centroid(x, centroids), centroids


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


def check_partition(parts: list[list[int]], num_classes: int) -> None:
    """K non-empty, disjoint lists of labels 0..num_classes-1 that cover every class (each class needs a student)."""
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

    if warmup_steps < 0 or (warmup_steps and not cfg.student.model):
        raise FastdiffError("--warmup-steps warms up a student of another (smaller) architecture: give student.model "
                            "(a copy of the teacher already is the teacher), and a step count >= 0")
    parts = _partition(cfg, parts)
    root = Path(cfg.output_dir)
    recorded = root / PARTITION_FILE
    if recorded.is_file() and json.loads(recorded.read_text()) != parts and not overwrite:
        raise FastdiffError(f"{root} holds students of another partition ({recorded}); pass --overwrite to replace them")
    root.mkdir(parents=True, exist_ok=True)
    recorded.write_text(json.dumps(parts) + "\n")
    runs = []
    for k, part in enumerate(parts):
        run = root / f"student-{k}"
        runs.append(run)
        what = f"{len(part)} prompts" if isinstance(part[0], str) else f"classes {part}"
        child = student_config(cfg, part, run)
        if not overwrite and _finished(run, child):
            log(f"student {k} ({what}): already exported in {run / 'student'}, kept")
            continue
        again = resume and (run / "checkpoints").is_dir()
        if run.is_dir() and any(run.iterdir()) and not (overwrite or again):
            raise FastdiffError(f"{run} holds an unfinished student; pass --resume to continue it from its latest "
                                "checkpoint or --overwrite to retrain every student")
        if warmup_steps:
            folder = warm_up(child, warmup_steps, warmup_lr, root / f"student-{k}-warmup", overwrite, log)
            _apply(child, {"student": {"model": str(folder)}})
        log(f"student {k} of {len(parts)}: {what} -> {run}")
        Trainer(child, resume="latest" if again else None, overwrite=overwrite, progress=progress).fit()
    return assemble_router(runs, root / "router")


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


# --- the smaller student's first stage: teacher score matching ----------------------------------------------------
def warm_up(cfg: Config, steps: int, lr: float, out: Path, overwrite: bool = False, log=print) -> Path:
    """``student.model`` after ``steps`` updates of ``teacher_score_matching`` on the student's classes / prompts,
    saved as a diffusers model folder in ``out`` (atomically, with warmup.json: settings and errors). A folder made
    with the same settings is kept: the warm-up is deterministic, so a rerun would remake it bit for bit."""
    from ..models.embedded import resolve_teacher_path
    from ..models.teacher import load_model, load_teacher
    from ..models.text import read_prompts
    from .networks import check_student

    prompts = read_prompts(cfg.data.prompts, "data.prompts") if cfg.data.prompts else None
    settings = {"steps": steps, "lr": lr, "batch_size": cfg.train.batch_size, "seed": cfg.train.seed,
                "model": str(Path(cfg.student.model).resolve()), "teacher": cfg.teacher.path,
                "classes": cfg.student.classes, "prompts": prompts}
    record = out / "warmup.json"
    if not overwrite and record.is_file() and json.loads(record.read_text())["settings"] == settings:
        log(f"warm-up: kept {out}")
        return out
    teacher = load_teacher(resolve_teacher_path(cfg.teacher.path))
    model = load_model(cfg.student.model).requires_grad_(True)
    check_student(model, teacher)
    log(f"warm-up: {steps} teacher-score-matching updates of {cfg.student.model} -> {out}")
    result = teacher_score_matching(teacher, model, steps, lr, cfg.train.batch_size, cfg.train.seed,
                                    cfg.student.classes, prompts)
    log(f"warm-up: regression error {result['error_before']:.4g} -> {result['error_after']:.4g}")
    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    (tmp / "warmup.json").write_text(json.dumps({"settings": settings, **result}, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def teacher_score_matching(teacher, model: torch.nn.Module, steps: int, lr: float, batch_size: int, seed: int,
                           classes: list[int] | None = None, prompts: list[str] | None = None,
                           eval_batches: int = 4, teacher_steps: int = WARMUP_TEACHER_STEPS) -> dict:
    """Train ``model`` (in place, Adam at ``lr``) to regress the teacher's output (the module docstring's L_TSM).
    Returns the loss of each update and the regression error on ``eval_batches`` held-out batches (their own seed)
    before and after. Every draw comes from generators seeded by ``seed``: the same call gives the same weights.
    ``teacher_steps``: the DDIM steps of the teacher samples that are noised."""
    from ..inference.sampling import ddim_sample
    from ..models.denoiser import Denoiser

    device = next(model.parameters()).device
    real = teacher.denoiser
    student = Denoiser(model, real.schedule, real.prediction_type, teacher.null_class)
    encode = None
    if prompts is not None:
        from ..models.text import PromptEncoder

        encode = PromptEncoder(teacher.pipeline, device=device)

    def batch(gen: torch.Generator):
        """(noisy x, sigma, condition, the teacher's x0 estimate, loss weight) of one batch, drawn from ``gen``."""
        cond = None
        if encode is not None:
            cond = encode([prompts[i] for i in torch.randint(len(prompts), (batch_size,), generator=gen).tolist()])
        elif teacher.num_classes:
            allowed = torch.as_tensor(classes if classes is not None else range(teacher.num_classes))
            cond = {"class_labels": allowed[torch.randint(len(allowed), (batch_size,), generator=gen)].to(device)}
        z = torch.randn((batch_size, *teacher.sample_shape), generator=gen).to(device)
        t = torch.randint(1, real.schedule.num_train_timesteps, (batch_size,), generator=gen)
        sigma = real.schedule.sigma_at(t).to(device)
        with torch.no_grad():
            x0 = ddim_sample(real, z, teacher_steps, cond)
            x = x0 + sigma.view(-1, *[1] * (x0.dim() - 1)) * torch.randn(x0.shape, generator=gen).to(device)
            target = real(x, sigma, cond)
        return x, sigma, cond, target, real.loss_weight(sigma)

    def loss(x, sigma, cond, target, weight) -> torch.Tensor:
        per_sample = ((student(x, sigma, cond) - target) ** 2).flatten(1).mean(1)
        return (weight * per_sample).mean()

    held_out = [batch(torch.Generator().manual_seed(seed + 1_000_003 + i)) for i in range(eval_batches)]

    def error() -> float:
        with torch.no_grad():
            return sum(float(loss(*b)) for b in held_out) / len(held_out)

    before = error()
    gen = torch.Generator().manual_seed(seed + 7)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        value = loss(*batch(gen))
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
        losses.append(float(value.detach()))
    model.eval()
    return {"error_before": before, "error_after": error(), "losses": losses}


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
    check_partition(parts, num_classes)
    teachers = {_teacher_from(run / "student", info, Path(out)) for run, info in zip(runs, infos)}
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
    route = [0] * num_classes
    for k, part in enumerate(parts):
        for c in part:
            route[c] = k
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
    return _write(router, info, Path(out))


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
    teachers = {_teacher_from(run / "student", info, Path(out)) for run, info in zip(runs, infos)}
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
    return _write(router, info, Path(out), {PARTITION_FILE: json.dumps(parts, indent=1) + "\n"})


def _teacher_from(export: Path, info: dict, out: Path) -> str:
    """The teacher as a student's export records it (a hub id, an ``embedded:`` name, or a folder relative to that
    export), with a folder made relative to the router's folder instead."""
    folder = export / str(info.get("teacher_folder", ""))
    if info.get("teacher_folder") and not str(info["teacher_folder"]).startswith("embedded:") and folder.is_dir():
        return os.path.relpath(folder.resolve(), out.resolve())
    return str(info["teacher"])


def _write(router, info: dict, out: Path, extra: dict | None = None) -> Path:
    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    router.save_pretrained(tmp, safe_serialization=True)
    (tmp / "fastdiff.json").write_text(json.dumps(info, indent=2))
    (tmp / "README.md").write_text(_card(info) if info.get("num_classes") else _text_card(info))
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
