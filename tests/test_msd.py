"""Multi-student distillation (training/msd.py, pipelines/pipeline_fastdiff_multi_student.py): the partition, the
class restriction on what a student's training sees, the router pipeline, and `fastdiff msd` end to end."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import LCMScheduler, UNet2DModel

from fastdiff.cli import main
from fastdiff.config import load_config
from fastdiff.errors import FastdiffError
from fastdiff.pipelines import FastdiffClassConditionalPipeline, FastdiffMultiStudentPipeline, MultiStudentUNet
from fastdiff.training import Trainer
from fastdiff.training.msd import check_partition, contiguous_partition, draw_class_labels

from conftest import assert_same_uint8, tiny_unet
from test_export_e2e import FAST, write_fake_fashion_mnist


def test_contiguous_partition_and_its_checks():
    assert contiguous_partition(10, 3) == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert contiguous_partition(3, 3) == [[0], [1], [2]]
    with pytest.raises(FastdiffError, match="--partitions"):
        contiguous_partition(3, 4)
    check_partition([[2, 0], [1]], 3)
    for parts, message in (([[0, 1], [1, 2]], "class 1 is in"), ([[0], [2]], r"classes \[1\] have no student"),
                           ([[0, 1, 2], []], "no classes"), ([[0, 1, 3]], "not a label")):
        with pytest.raises(FastdiffError, match=message):
            check_partition(parts, 3)


def test_labels_without_a_partition_are_drawn_as_before():
    """student.classes null draws exactly the labels the trainer drew before MSD (same call, same stream)."""
    torch.manual_seed(3)
    before = torch.randint(10, (64,))
    torch.manual_seed(3)
    assert torch.equal(draw_class_labels(64, 10, None, "cpu"), before)
    torch.manual_seed(3)
    drawn = draw_class_labels(4000, 10, [7, 2], "cpu")
    assert set(drawn.tolist()) == {2, 7} and abs(float((drawn == 7).float().mean()) - 0.5) < 0.05  # 4 sigma at n=4000


def test_student_only_sees_its_classes(tiny_cond_teacher, tmp_path):
    """Every condition the objective gets (generator samples, fake-score updates, the GAN head's real images) is one
    of student.classes; the real data holds only those classes."""
    data = tmp_path / "fmnist"
    write_fake_fashion_mnist(data, size=6, n=64)
    cfg = load_config(None, [f"teacher.path={tiny_cond_teacher}", f"output_dir={tmp_path / 'run'}", *FAST,
                             "train.max_steps=2", "objective.critic_updates=1", "objective.gan=true",
                             "train.checkpoint_every=100", "train.sample_every=100",
                             f"data.path={data}", "student.classes=[2, 0]", "train.batch_size=8"])
    trainer = Trainer(cfg, progress=False)
    assert set(trainer.real.labels.tolist()) == {0, 2} and len(trainer.real) < 64
    seen = {"generator": [], "critic": [], "real": []}
    obj = trainer.objective
    gen_loss, critic_loss = obj.generator_loss, obj.critic_loss

    def record_gen(x, cond, real):
        seen["generator"] += cond["class_labels"].tolist()
        return gen_loss(x, cond, real)

    def record_critic(x, cond, real):
        seen["critic"] += cond["class_labels"].tolist()
        seen["real"] += real[1]["class_labels"].tolist()
        return critic_loss(x, cond, real)

    obj.generator_loss, obj.critic_loss = record_gen, record_critic
    trainer.fit(export=False)
    assert len(seen["generator"]) == 2 * 8 and len(seen["critic"]) == len(seen["real"]) == 2 * 8
    for name, labels in seen.items():  # >= 16 seeded uniform draws from {0, 2}: both appear
        assert set(labels) == {0, 2}, name


def test_bad_student_classes_are_one_line_errors(tiny_cond_teacher, tiny_teacher, tmp_path):
    base = [f"output_dir={tmp_path / 'run'}", *FAST]
    for teacher, classes, message in ((tiny_cond_teacher, "[0, 3]", "distinct labels 0..2"),
                                      (tiny_cond_teacher, "[1, 1]", "distinct labels"),
                                      (tiny_teacher, "[0]", "class-conditional teacher")):
        cfg = load_config(None, [f"teacher.path={teacher}", f"student.classes={classes}", *base])
        with pytest.raises(FastdiffError, match=message):
            Trainer(cfg, progress=False)
    # Data that cannot be restricted to the student's classes (here the teacher's own samples, of every class).
    cfg = load_config(None, [f"teacher.path={tiny_cond_teacher}", "student.classes=[0]", "objective.name=cd",
                             "data.name=teacher", *[b for b in base if "critic_updates" not in b]])
    with pytest.raises(FastdiffError, match="only labelled in-memory data"):
        Trainer(cfg, progress=False)


def _router(tmp_path, small_second=False):
    """Two tiny class-conditional students (3 classes + null; the second optionally narrower) behind a router that
    sends classes 0 and 2 to student 0 and class 1 to student 1, saved and loaded with from_pretrained."""
    first = tiny_unet(num_class_embeds=4, seed=5)
    if small_second:
        torch.manual_seed(6)
        second = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(4, 8),
                             layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                             up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4, num_class_embeds=4)
    else:
        second = tiny_unet(num_class_embeds=4, seed=6)
    scheduler = LCMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction", clip_sample=False,
                             original_inference_steps=1000, timestep_scaling=1e9)
    configs = [{"_class_name": "UNet2DModel", **{k: v for k, v in u.config.items() if not k.startswith("_")}}
               for u in (first, second)]
    model = MultiStudentUNet(students=configs, class_to_student=[0, 1, 0])
    for net, unet in zip(model.nets, (first, second)):
        net.load_state_dict(unet.state_dict())
    FastdiffMultiStudentPipeline(students=model, scheduler=scheduler).save_pretrained(tmp_path / "router")
    own = [FastdiffClassConditionalPipeline(unet=u.eval(), scheduler=scheduler) for u in (first, second)]
    return FastdiffMultiStudentPipeline.from_pretrained(tmp_path / "router"), own


@pytest.mark.parametrize("steps", [1, 2])
def test_router_sends_each_class_to_its_student(tmp_path, steps):
    router, (s0, s1) = _router(tmp_path, small_second=True)
    files = sorted(p.name for p in (tmp_path / "router").rglob("*") if p.is_file())
    assert any(f.endswith(".safetensors") for f in files) and not any(f.endswith((".bin", ".py")) for f in files)

    def images(pipe, labels, seed):
        gen = torch.Generator().manual_seed(seed) if isinstance(seed, int) else [torch.Generator().manual_seed(s) for s in seed]
        return pipe(class_labels=labels, num_inference_steps=steps, generator=gen, output_type="np").images

    # A batch of one student's classes: exactly its own pipeline's images for the same seed (bit for bit).
    assert np.array_equal(images(router, [0, 2, 2, 0], 7), images(s0, [0, 2, 2, 0], 7))
    assert np.array_equal(images(router, [1, 1], 8), images(s1, [1, 1], 8))
    # A mixed batch with one generator per image: each image is its student's, made alone from that image's seed.
    # Compared as uint8 images and within 1e-5 on [0, 1]: the student runs on a sub-batch of another size, whose
    # float32 kernels may round the last bits differently (a few ulps of values <= 1, far below 1/255; measured at
    # most 5.4e-7, 1e-5 is ~80 ulps of 1).
    labels, seeds = [0, 1, 2, 1], [11, 12, 13, 14]
    mixed = images(router, labels, seeds)
    for i, (label, seed) in enumerate(zip(labels, seeds)):
        alone = images(s1 if label == 1 else s0, [label], [seed])[0]
        assert np.abs(mixed[i] - alone).max() <= 1e-5
        assert_same_uint8(mixed[i], alone, 1e-5)  # uint8: equal but at rounding ties
    # The two students really differ, so the routing is seen.
    assert not np.allclose(images(s0, [1], 9), images(s1, [1], 9), atol=1e-3)
    with pytest.raises(ValueError, match="class labels must be in 0..2"):
        router(class_labels=[3])


@pytest.mark.slow  # 12 s on a loaded 2-core CPU: two runs, two exports, the router
def test_msd_end_to_end(tiny_cond_teacher, tmp_path):
    """`fastdiff msd` with K = 2 on the tiny class-conditional teacher: two students trained a few updates on their
    classes, the router exported, reloaded, and equal to each student's own exported pipeline; a rerun keeps them."""
    out = tmp_path / "msd"
    args = ["msd", "--partitions", "2", "--quiet"]
    for item in [f"teacher.path={tiny_cond_teacher}", f"output_dir={out}", *FAST, "train.lr_generator=1e-3",
                 "train.lr_warmup_steps=0", "train.checkpoint_every=100", "train.sample_every=100"]:
        args += ["--set", item]
    assert main(args) == 0
    info = json.loads((out / "router" / "fastdiff.json").read_text())
    assert info["partition"] == [[0, 1], [2]] and info["format"] == "fastdiff-msd-v1"
    assert (out / "router" / info["teacher"]).resolve() == Path(tiny_cond_teacher).resolve()  # relative to the router
    assert [json.loads((out / f"student-{k}" / "student" / "fastdiff.json").read_text())["train_step"]
            for k in (0, 1)] == [2, 2]
    router = FastdiffMultiStudentPipeline.from_pretrained(out / "router")
    students = [FastdiffClassConditionalPipeline.from_pretrained(out / f"student-{k}" / "student") for k in (0, 1)]
    for labels, k in (([0, 1, 1], 0), ([2, 2], 1)):
        ours = router(class_labels=labels, generator=torch.Generator().manual_seed(3), output_type="np").images
        own = students[k](class_labels=labels, generator=torch.Generator().manual_seed(3), output_type="np").images
        assert np.array_equal(ours, own)
    # The two students trained apart: their weights differ (both started as the teacher).
    w0, w1 = (s.unet.state_dict() for s in students)
    assert max(float((w0[n] - w1[n]).abs().max()) for n in w0) > 1e-4
    stamp = (out / "student-0" / "metrics.jsonl").stat().st_mtime_ns
    assert main(args) == 0  # finished students are kept, the router rebuilt
    assert (out / "student-0" / "metrics.jsonl").stat().st_mtime_ns == stamp
    assert main(args[:2] + ["3"] + args[3:]) == 2  # another partition over the same folder: refused
    partition = out / "partition.json"
    assert json.loads(partition.read_text()) == [[0, 1], [2]]  # and its record untouched
    # Runs trained by hand, assembled in another order: student 0 is now the one of class 2.
    assert main(["msd", "--assemble", str(out / "student-1"), str(out / "student-0"), "--out", str(tmp_path / "r")]) == 0
    again = FastdiffMultiStudentPipeline.from_pretrained(tmp_path / "r")
    assert again.students.config.class_to_student == [1, 1, 0]
    seeds = [4, 5]
    ours = again(class_labels=[2, 0], generator=[torch.Generator().manual_seed(s) for s in seeds],
                 output_type="np").images
    for i, (label, k) in enumerate(((2, 1), (0, 0))):  # uint8-equal to each student alone (see the routing test)
        own = students[k](class_labels=[label], generator=[torch.Generator().manual_seed(seeds[i])],
                          output_type="np").images
        assert np.array_equal((ours[i] * 255).round(), (own[0] * 255).round())
    # --overwrite with fewer students: the extra student's run goes (it would sit unrouted beside the new one)
    assert main(args[:2] + ["1"] + args[3:] + ["--overwrite"]) == 0
    assert not (out / "student-1").exists() and json.loads(partition.read_text()) == [[0, 1, 2]]


def test_msd_refuses_an_unfinished_student_before_training_any(tiny_cond_teacher, tmp_path):
    """Student 1's folder holds an unfinished run: refused before student 0 trains or the partition is recorded
    (it once trained student 0 first, then stopped at student 1)."""
    out = tmp_path / "msd"
    (out / "student-1").mkdir(parents=True)
    (out / "student-1" / "notes.txt").write_text("mine")
    args = ["msd", "--partitions", "2", "--quiet", "--set", f"teacher.path={tiny_cond_teacher}",
            "--set", f"output_dir={out}", *(a for item in FAST for a in ("--set", item))]
    assert main(args) == 2
    assert sorted(p.name for p in out.iterdir()) == ["student-1"]
    assert (out / "student-1" / "notes.txt").read_text() == "mine"


def test_msd_command_refuses_bad_input(tiny_teacher, tiny_cond_teacher, tmp_path):
    base = ["--quiet", "--set", f"output_dir={tmp_path / 'msd'}"]
    assert main(["msd", "--set", f"teacher.path={tiny_cond_teacher}", *base]) == 2  # neither option
    assert main(["msd", "--partitions", "2", "--set", f"teacher.path={tiny_teacher}", *base]) == 2  # unconditional
    parts = tmp_path / "parts.json"
    parts.write_text("[[0, 1], [1, 2]]")
    assert main(["msd", "--partition-file", str(parts), "--set", f"teacher.path={tiny_cond_teacher}", *base]) == 2
    assert main(["msd", "--assemble", str(tmp_path), "--out", str(tmp_path / "r")]) == 2  # not a finished run
    assert not (tmp_path / "msd" / "student-0").exists()


def test_bench_msd_rows(capsys, tmp_path):
    """`fastdiff bench msd` runs K = 1 and 2 students on the class-conditional mixture and prints a row each, after
    the teacher's and the start's (2 updates: the rows' numbers are not quality claims), and --json keeps them (it
    raised KeyError 'seed' once the whole run was done)."""
    assert main(["bench", "msd", "--partitions", "1,2", "--steps", "2", "--num-eval", "100", "--quiet",
                 "--json", str(tmp_path / "msd.json")]) == 0
    out = capsys.readouterr().out
    for row in ("teacher-ddim-1", "start (teacher copy)", "msd K=1 (dmd2)", "msd K=2 (dmd2)"):
        assert row in out
    saved = json.loads((tmp_path / "msd.json").read_text())
    assert saved["seed"] == 0 and [r["objective"] for r in saved["rows"]][-2:] == ["msd K=1 (dmd2)", "msd K=2 (dmd2)"]
    assert main(["bench", "msd", "--partitions", "5"]) == 2  # the mixture has 4 modes
