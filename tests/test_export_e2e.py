"""End to end: distill -> checkpoint -> export -> load with diffusers -> same images as fastdiff's sampler."""
import json
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline

from fastdiff.cli import main
from fastdiff.inference.students import read_student_info, student_generator
from fastdiff.pipelines import FastdiffClassConditionalPipeline
from fastdiff.inference.sampling import guided_cond
from fastdiff.models.teacher import load_teacher
from fastdiff.training import Trainer

FAST = ["train.max_steps=2", "train.batch_size=2", "objective.critic_updates=1", "train.checkpoint_every=1",
        "train.sample_every=1", "train.num_sample_images=4", "train.log_every=1"]


# output_dir -> the Trainer that ran there (kept until its export is checked against it)
TRAINERS: dict = {}


def distill(teacher: str, out: Path, *extra: str) -> Path:
    """``fastdiff distill`` through the CLI, keeping the trainer so the export can be checked against it."""
    args = ["distill"]
    for item in [f"teacher.path={teacher}", f"output_dir={out}", *FAST, *extra]:
        args += ["--set", item]
    real_fit = Trainer.fit

    def fit(self, *a, **kw):
        TRAINERS[Path(self.out).resolve()] = self
        return real_fit(self, *a, **kw)

    with mock.patch.object(Trainer, "fit", fit):
        assert main(args) == 0
    return out


def distill_on_fake_images(teacher: str, tmp_path: Path, *extra: str, distill_fn=None) -> tuple[Path, list[dict]]:
    """``distill`` (or ``distill_fn``) on six fake Fashion-MNIST images with CFG 2 on the real score: the run folder
    and its logged rows."""
    data = tmp_path / "fmnist"
    write_fake_fashion_mnist(data, size=6)
    run = (distill_fn or distill)(teacher, tmp_path / "run", f"data.path={data}", "teacher.guidance_scale=2.0", *extra)
    return run, [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def trainer_images(trainer, steps, seed, n, labels=None, guidance_scale=None):
    """The trainer's own in-memory generator (EMA or raw weights, as exported) on a pipeline's noise for seed."""
    gen = trainer.export_generator().eval()
    rng = torch.Generator().manual_seed(seed)
    z = torch.randn((n, *trainer.teacher.sample_shape), generator=rng)
    cond = None if labels is None else {"class_labels": torch.tensor(labels)}
    cond = guided_cond(trainer.teacher.model, cond, guidance_scale)
    with torch.no_grad():
        x0 = gen(z, cond, num_steps=steps, rng=rng)
    return (x0 / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def fastdiff_images(folder, steps, seed, n, labels=None, guidance_scale=None):
    """fastdiff's own K-step sampler on the noise a diffusers pipeline draws for this seed."""
    teacher = load_teacher(folder)
    gen = student_generator(teacher, read_student_info(folder))
    rng = torch.Generator().manual_seed(seed)
    z = torch.randn((n, *teacher.sample_shape), generator=rng)
    cond = None if labels is None else {"class_labels": torch.tensor(labels)}
    cond = guided_cond(teacher.model, cond, guidance_scale)
    with torch.no_grad():
        x0 = gen(z, cond, num_steps=steps, rng=rng)
    return (x0 / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def image_bound(student, n: int, seed: int, guidance_scale=None) -> float:
    """How far diffusers' pipeline and fastdiff's sampler may differ on images in [0, 1] (max |difference|).

    Both run the same network on the same input and differ only in how the scheduler rounds a_t, s_t (1 ulp) and
    orders its float32 operations: a few eps32 per step times the magnitude x0 is formed from, ``(|x| + s |eps|) / a``
    for an epsilon student (1 / a up to 157 at the top of a linear table, where a fixed 1e-5 failed on an AMD EPYC:
    1.9e-5) and ``a |x| + s |v|`` (no 1 / a) for v and sample students; x0 -> image halves it. With |x| <= max|z| and
    s |eps| ~ |x| at the top level that is ``max|z| / a`` (a = 1 but for epsilon); 8 roundings at the first level
    and as many over the later ones (smaller 1 / a): 16 eps32 of it. CFG in the pipeline (a student without the
    scale embedded) sums two predictions with weights up to 2 w - 1. Measured on the tiny teachers: at most 1/15
    of the bound (3.9e-7 against 6e-6 and more)."""
    teacher = load_teacher(str(student))
    info = read_student_info(student)
    inv_a = 1.0
    if info.get("prediction_type") == "epsilon" and info.get("top_timestep") is not None:
        sigma_top = teacher.denoiser.schedule.sigma_at(torch.tensor([float(info["top_timestep"])]))
        inv_a = float((1 + sigma_top.double() ** 2).sqrt())
    z = torch.randn((n, *teacher.sample_shape), generator=torch.Generator().manual_seed(seed))
    cfg = guidance_scale is not None and not info.get("guidance_embedded")
    weight = max(1.0, 2 * guidance_scale - 1) if cfg else 1.0
    return 16 * torch.finfo(torch.float32).eps * float(z.abs().max()) * inv_a * weight


def assert_pipeline_matches(student: Path, labels=None, guidance_scale=None):
    """diffusers' pipeline for the exported folder equals fastdiff's sampler at 1, 2 and 4 steps (to
    ``image_bound``): both the one rebuilt from the folder and, when the folder is a run's ``student/``, the
    trainer's own generator."""
    n = 3 if labels is None else len(labels)
    trainer = TRAINERS.pop(Path(student).resolve().parent, None) if Path(student).name == "student" else None
    bound = image_bound(student, n, 11, guidance_scale)
    for steps in (1, 2, 4):
        if labels is None:
            pipe = DDPMPipeline.from_pretrained(student)
            ref = pipe(batch_size=n, num_inference_steps=steps, generator=torch.Generator().manual_seed(11),
                       output_type="np").images
        else:
            pipe = FastdiffClassConditionalPipeline.from_pretrained(student)
            extra = {} if guidance_scale is None else {"guidance_scale": guidance_scale}
            ref = pipe(class_labels=labels, num_inference_steps=steps, generator=torch.Generator().manual_seed(11),
                       output_type="np", **extra).images
        ours = fastdiff_images(student, steps, 11, n, labels, guidance_scale)
        assert np.abs(ours - ref).max() <= bound, (steps, np.abs(ours - ref).max(), bound)
        if trainer is not None:
            live = trainer_images(trainer, steps, 11, n, labels, guidance_scale)
            assert np.abs(live - ref).max() <= bound, ("trainer", steps, np.abs(live - ref).max(), bound)


def test_unconditional_distill_export_and_diffusers_load(tiny_teacher, tmp_path):
    # A learning rate that moves the student well past the image bound (1.5e-5 here, see image_bound) in two steps
    # (the defaults' warm-up leaves it within 1.2e-5 of the teacher), so an export of the wrong weights cannot pass.
    run = distill(tiny_teacher, tmp_path / "run", "train.lr_generator=1e-3", "train.lr_warmup_steps=0")
    student = run / "student"
    assert (run / "samples").is_dir() and list((run / "samples").glob("*.png"))
    assert [p.name for p in sorted((run / "checkpoints").iterdir())] == ["step-00000001", "step-00000002"]
    assert (run / "logs").is_dir() and (run / "metrics.jsonl").read_text().count("\n") == 2
    info = json.loads((student / "fastdiff.json").read_text())
    assert info["objective"] == "dmd2" and info["num_steps"] == 1
    assert "dmd2" in (student / "README.md").read_text()
    assert run.resolve() in TRAINERS  # so the export is checked against the trainer's own generator too
    assert_pipeline_matches(student)

    # The student really trained: its weights moved away from the teacher's.
    teacher_w = load_teacher(tiny_teacher).model.state_dict()
    student_w = DDPMPipeline.from_pretrained(student).unet.state_dict()
    assert max(float((teacher_w[k] - student_w[k]).abs().max()) for k in teacher_w) > 1e-4

    # export from a checkpoint gives the same folder contents
    assert main(["export", str(run), "--out", str(tmp_path / "exp"), "--checkpoint", "2"]) == 0
    assert_pipeline_matches(tmp_path / "exp")

    # sample: PNGs from the student and from the teacher
    assert main(["sample", str(student), "--num", "5", "--steps", "1", "--out", str(tmp_path / "s"),
                 "--batch-size", "2"]) == 0
    assert len(list((tmp_path / "s").glob("*.png"))) == 5
    assert main(["sample", tiny_teacher, "--num", "2", "--steps", "3", "--out", str(tmp_path / "t")]) == 0
    assert len(list((tmp_path / "t").glob("*.png"))) == 2


def test_class_conditional_multistep_with_gan(tiny_cond_teacher, tmp_path):
    data = tmp_path / "fmnist"
    write_fake_fashion_mnist(data, size=6)
    run = distill(tiny_cond_teacher, tmp_path / "run", "student.num_steps=2", "objective.gan=true",
                  f"data.path={data}", "teacher.guidance_scale=2.0")
    student = run / "student"
    assert json.loads((student / "fastdiff.json").read_text())["num_steps"] == 2
    assert (student / "pipeline.py").is_file()
    from diffusers import DiffusionPipeline  # the copied pipeline.py loads without fastdiff's import path

    plain = DiffusionPipeline.from_pretrained(student, custom_pipeline=str(student), trust_remote_code=True)
    assert type(plain).__name__ == "FastdiffClassConditionalPipeline"
    assert run.resolve() in TRAINERS
    assert_pipeline_matches(student, labels=[0, 1, 2, 0])
    assert main(["sample", str(student), "--num", "3", "--steps", "2", "--out", str(tmp_path / "s")]) == 0


def test_resume_continues_from_the_checkpoint(tiny_teacher, tmp_path):
    run = distill(tiny_teacher, tmp_path / "run")
    args = ["distill", "--resume", "latest"]
    for item in [f"teacher.path={tiny_teacher}", f"output_dir={run}", *FAST, "train.max_steps=3"]:
        args += ["--set", item]
    assert main(args) == 0
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


@pytest.mark.parametrize("name", ["fmnist-ddpm", "fmnist-cond-vpred"])
def test_reference_teachers(shared_teacher, tmp_path, name):
    """A few DMD2 steps on the real reference teachers, exported and reproduced by diffusers."""
    teacher = shared_teacher(name)
    extra = ["train.batch_size=2", "train.max_steps=1"]
    if name == "fmnist-cond-vpred":
        extra.append("teacher.guidance_scale=2.0")
    run = distill(teacher, tmp_path / "run", *extra)
    labels = [3, 7] if name == "fmnist-cond-vpred" else None
    n = 2
    student = run / "student"
    if labels is None:
        ref = DDPMPipeline.from_pretrained(student)(batch_size=n, num_inference_steps=1,
                                                    generator=torch.Generator().manual_seed(0), output_type="np").images
    else:
        ref = FastdiffClassConditionalPipeline.from_pretrained(student)(
            class_labels=labels, num_inference_steps=1, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert np.abs(fastdiff_images(student, 1, 0, n, labels) - ref).max() <= image_bound(student, n, 0)


def write_fake_fashion_mnist(folder: Path, size: int = 28, n: int = 16) -> None:
    """A small data set in Fashion-MNIST's gzipped IDX layout."""
    import gzip
    import struct

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix in ("train", "t10k"):
        images = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
        with gzip.open(folder / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
            f.write(struct.pack(">BBBBIII", 0, 0, 8, 3, n, size, size) + images.tobytes())
        with gzip.open(folder / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(struct.pack(">BBBBI", 0, 0, 8, 1, n) + rng.integers(0, 3, n, dtype=np.uint8).tobytes())
