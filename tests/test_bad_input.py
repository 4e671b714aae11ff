"""Bad input: one line on stderr saying what is wrong, exit status 2, nothing written, nothing existing changed.

The matrix (this file, plus the evaluation cases in test_fid.py / test_clip_score.py / test_eval_bench.py
and the run-state cases in test_reliability.py):

| area       | case                                              | expected message fragment                      |
|------------|---------------------------------------------------|------------------------------------------------|
| teacher    | teacher path does not exist                       | does not exist                                 |
| teacher    | folder without a diffusers model                  | no diffusers model found                       |
| teacher    | model folder without scheduler                    | no scheduler/scheduler_config.json             |
| config     | unknown objective                                 | unknown objective                              |
| config     | unknown config key                                | unknown config key                             |
| config     | wrong value type (int, float)                     | expected int / expected float                  |
| config     | negative batch size, zero max_steps / num_steps   | must be a positive integer                     |
| config     | zero max_nonfinite_steps                          | must be a positive integer                     |
| config     | unknown lr_schedule / mixed_precision / sampler   | must be ... or ...                             |
| config     | option that does not apply to the objective       | does not apply to dmd2                         |
| config     | ddim sampler with a truncated first level         | set student.sigma_init to null                 |
| config     | lora_export lora on a teacher without LoRA loading| set student.lora_export=fused                  |
| export     | a student no pipeline can take (analytic teacher) | not supported (before any training step)       |
| config     | config file missing / not a mapping               | not found / neither a file nor a named config / mapping |
| data       | data resolution != teacher resolution             | does not match the teacher's sample size       |
| data       | missing data folder for the GAN head              | is not a folder                                |
| data       | Fashion-MNIST folder missing / unknown split      | --data-path / fashion-mnist:test               |
| output     | non-empty output_dir without --resume/--overwrite | is not empty (the files are kept)              |
| output     | ref-stats over an existing file                   | --overwrite (the file is kept)                 |
| resume     | --resume latest with no checkpoints               | no readable checkpoint to resume from          |
| resume     | checkpoint from another config                    | was trained with objective.name='dmd2'         |
| CLI        | export of a folder that is not a run              | is not a fastdiff run folder                   |
| CLI        | sample / fid with --num or --batch-size <= 0      | must be positive                               |
| CLI        | sample of a missing folder (also with --levels)   | does not exist                                 |
| CLI        | model input without --steps / --num               | --steps / --num                                |
| CLI        | bad step list for the benchmark                   | comma-separated                                |
| evaluation | missing Inception weights file                    | no such file                                   |
| evaluation | images of another size than the reference        | pass --crop                                    |
| evaluation | RGBA images / 4-channel npz / float npz           | mode RGBA / 1 (grayscale) or 3 / uint8         |
| evaluation | channel count differs from the reference          | channel                                        |
| evaluation | reference from another extractor / resize mode    | extractor inception-... / resize mode ...      |
| evaluation | N larger than the folder                          | only 4 images                                  |
| evaluation | missing or corrupt reference file                 | no such file / not a fastdiff reference        |
| evaluation | images of mixed sizes in one folder               | differs from                                   |
| evaluation | crop larger than the image                        | --crop 9                                       |
| evaluation | empty prompt file / missing CLIP weights          | no prompts / --clip-weights                    |
| config     | nan / inf in a float setting                      | expected a finite number                       |
| config     | seed, Adam betas, grad_clip, weight decay, sigma_init, num_sample_images out of range | must be ... |
| config     | unknown data.name, data.resolution <= 0           | is not one of / must be positive               |
| teacher    | CFG on an unconditional teacher (any setting)     | needs a class- or text-conditional teacher     |
| teacher    | null class outside the labels; damaged model_index.json | is not one of / is not valid JSON        |
| student    | unconditional student.model, class teacher        | takes no class labels                          |
| output     | export --out the run (or above it); --out a file  | is the run folder itself / is a file           |
| CLI        | unknown device, cuda without a GPU                | is not a device / no CUDA GPU                  |
| resume     | damaged checkpoint named by step; damaged configs | cannot be read / invalid YAML / not a run config |
| files      | non-UTF-8 config / prompts; damaged fastdiff.json; truncated .npz; folder as --json | not UTF-8 / not valid JSON / zip / is a folder |
"""
import os
import subprocess
import sys

import pytest

from fastdiff.cli import main


def _distill(tmp_path, *sets):
    args = ["distill", "--set", f"output_dir={tmp_path / 'out'}", "--set", "train.max_steps=1"]
    for item in sets:
        args += ["--set", item]
    return main(args)


@pytest.mark.parametrize("sets,fragment", [
    (["teacher.path=/no/such/teacher"], "does not exist"),
    (["teacher.path={data}/file.txt"], "is a file, not a folder"),
    (["teacher.path={empty}"], "no diffusers model found"),
    (["teacher.path={no_scheduler}"], "no scheduler/scheduler_config.json"),
    (["teacher.path={teacher}", "objective.name=magic"], "unknown objective 'magic'"),
    (["teacher.path={teacher}", "train.bogus=1"], "unknown config key 'train.bogus'"),
    (["teacher.path={teacher}", "train.batch_size=big"], "train.batch_size: expected int"),
    (["teacher.path={teacher}", "objective.gan=true", "data.resolution=16", "data.path={data}"],
     "does not match the teacher's sample size"),
    (["teacher.path={teacher}", "objective.gan=true", "data.path=/no/data"], "is not a folder"),
    (["teacher.path={teacher}", "train.batch_size=-2"], "train.batch_size must be a positive integer, got -2"),
    (["teacher.path={teacher}", "train.max_steps=0"], "train.max_steps must be a positive integer, got 0"),
    (["teacher.path={teacher}", "train.max_nonfinite_steps=0"], "train.max_nonfinite_steps must be a positive"),
    (["teacher.path={teacher}", "train.lr_schedule=step"], "train.lr_schedule must be constant or cosine"),
    (["teacher.path={teacher}", "train.mixed_precision=fp8"], "train.mixed_precision must be no, bf16 or fp16"),
    (["teacher.path={teacher}", "student.sampler=euler"], "student.sampler must be lcm or ddim"),
    (["teacher.path={teacher}", "student.num_steps=0"], "student.num_steps must be a positive integer"),
    (["teacher.path={teacher}", "train.lr_generator=abc"], "train.lr_generator: expected float"),
    (["teacher.path={teacher}", "objective.c=0.1"], "objective.c does not apply to dmd2"),
    (["teacher.path={teacher}", "student.sampler=ddim", "student.sigma_init=2.5"], "set student.sigma_init to null"),
    (["teacher.path={teacher}", "student.lora_rank=2", "student.lora_export=lora"], "set student.lora_export=fused"),
    (["teacher.path={gmm}"], "export of GaussianMixtureModel students on a vp schedule is not supported"),
    # values torch would have refused mid-run, or trained on (found by a fuzzing pass, 2026-11-30)
    (["teacher.path={teacher}", "train.lr_generator=nan"], "train.lr_generator: expected a finite number"),
    (["teacher.path={teacher}", "objective.alpha=inf", "objective.name=sid"], "objective.alpha: expected a finite"),
    (["teacher.path={teacher}", "train.seed=-1"], "train.seed must be in [0, 2^32)"),
    (["teacher.path={teacher}", "train.adam_betas=[2, 0.999]"], "train.adam_betas must be two numbers in [0, 1)"),
    (["teacher.path={teacher}", "train.grad_clip=-1"], "train.grad_clip must be >= 0 (0: no clip)"),
    (["teacher.path={teacher}", "student.lora_alpha=8"], "student.lora_alpha must be positive and needs student.lora_rank"),
    (["teacher.path={teacher}", "student.lora_rank=4", "student.lora_alpha=-1"], "student.lora_alpha must be positive"),
    (["teacher.path={teacher}", "train.weight_decay=-0.1"], "train.weight_decay must be >= 0"),
    (["teacher.path={teacher}", "student.sigma_init=-1"], "student.sigma_init must be a positive number"),
    (["teacher.path={teacher}", "train.num_sample_images=0"], "train.num_sample_images must be a positive integer"),
    (["teacher.path={teacher}", "teacher.guidance_scale=3"], "needs a class- or text-conditional teacher"),
    (["teacher.path={teacher}", "objective.name=sid", "objective.fake_guidance=2"],
     "objective.fake_guidance 2.0 needs a class- or text-conditional teacher"),
    (["teacher.path={teacher}", "output_dir={data}/file.txt/run"], "is a file; give a folder"),
    (["teacher.path={teacher}", "data.name=fashion_mnist"], "data.name 'fashion_mnist' is not one of"),
    (["teacher.path={teacher}", "data.resolution=0"], "data.resolution must be positive or null"),
    (["teacher.path={teacher}", "student.num_steps=5000"], "is more than the teacher's 1000 timesteps"),
    (["teacher.path={teacher}", "objective.name=hyper-sd", "data.name=teacher", "objective.reward=clip"],
     "is applied with objective.reward_weight > 0"),
])
def test_distill_bad_input(tmp_path, capsys, tiny_teacher, sets, fragment):
    (tmp_path / "empty").mkdir()
    (tmp_path / "no_scheduler" / "unet").mkdir(parents=True)
    (tmp_path / "no_scheduler" / "unet" / "config.json").write_text("{}")
    (tmp_path / "data").mkdir()
    fill = {"empty": tmp_path / "empty", "no_scheduler": tmp_path / "no_scheduler", "teacher": tiny_teacher,
            "data": tmp_path / "data", "gmm": tmp_path / "gmm"}
    if any("{gmm}" in s for s in sets):
        from fastdiff.models.analytic import GaussianMixtureModel

        GaussianMixtureModel().save_teacher(tmp_path / "gmm")
    (tmp_path / "data" / "file.txt").write_text("not a folder")
    rc = _distill(tmp_path, *[s.format(**fill) for s in sets])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert fragment in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_non_empty_output_dir_is_kept(tmp_path, capsys, tiny_teacher):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    rc = _distill(tmp_path, f"teacher.path={tiny_teacher}")
    assert rc == 2 and "is not empty" in capsys.readouterr().err
    assert (out / "precious.txt").read_text() == "keep me" and len(list(out.iterdir())) == 1


@pytest.mark.parametrize("flags,fragment", [
    (["--warmup", "-1"], "--warmup must be >= 0"),
    (["--steps", "0"], "--steps must be positive"),
    (["--batch-size", "2,0"], "--batch-size must be positive"),
    (["--sample-batch-sizes", "0"], "--sample-batch-sizes must be positive"),
    (["--time-budget", "0"], "--time-budget must be positive"),
])
def test_bench_speed_refuses_counts_out_of_range(tiny_teacher, capsys, flags, fragment):
    """Checked before any timing starts: one line, exit 2."""
    assert main(["bench", "speed", "--teacher", tiny_teacher, "--device", "cpu", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and len(err.splitlines()) == 1, err


def test_export_and_sample_bad_input(tmp_path, capsys, tiny_teacher):
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "is not a fastdiff run folder" in capsys.readouterr().err
    assert main(["sample", tiny_teacher, "--num", "0", "--steps", "1", "--out", str(tmp_path / "s")]) == 2
    assert "must be positive" in capsys.readouterr().err
    for extra in ([], ["--levels", "flow"]):  # --levels once answered that a missing folder "is a teacher"
        assert main(["sample", str(tmp_path / "nope"), "--num", "2", "--steps", "2", "--out", str(tmp_path / "s"),
                     *extra]) == 2
        err = capsys.readouterr().err
        assert "nope does not exist" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "s").exists() and not (tmp_path / "x").exists()


def test_config_file_and_resume_bad_input(tmp_path, capsys, tiny_teacher):
    (tmp_path / "list.yaml").write_text("[1, 2]\n")
    cases = [(["distill", "--config", str(tmp_path / "nope.yaml")], "nope.yaml not found"),
             (["distill", "--config", str(tmp_path / "list.yaml")], "the top level must be a mapping"),
             (["distill", "--set", f"teacher.path={tiny_teacher}", "--set", f"output_dir={tmp_path / 'o'}",
               "--resume", "latest"], "no readable checkpoint to resume from")]
    for argv, fragment in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert fragment in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


def test_cli_process_exit_code_and_no_traceback(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "fastdiff", "distill", "--set", "teacher.path=/nope",
                           "--set", f"output_dir={tmp_path / 'o'}"], capture_output=True, text=True, env=env)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["fastdiff: error: teacher path '/nope' does not exist; "
                                                "pass a local diffusers folder (teacher.path)"]
    assert not (tmp_path / "o").exists()


def test_outputs_devices_and_files_that_are_not_what_they_should_be(tmp_path, capsys, tiny_teacher):
    """Export into (or above) its own run folder once replaced the run with the student (checkpoints gone, exit 0);
    --out a file, an unknown or absent device, a damaged checkpoint named by step, a non-UTF-8 config, a damaged
    fastdiff.json, a truncated .npz and a folder as --json were tracebacks. Each is one line, exit 2, nothing
    changed."""
    import shutil

    import numpy as np
    import torch

    run = tmp_path / "run"
    assert main(["distill", "--set", f"teacher.path={tiny_teacher}", "--set", f"output_dir={run}",
                 "--set", "train.max_steps=1", "--set", "train.batch_size=2", "--set", "train.checkpoint_every=1",
                 "--set", "train.sample_every=100", "--set", "train.num_sample_images=2", "-q"]) == 0
    before = sorted(str(p.relative_to(run)) for p in run.rglob("*"))
    damaged = tmp_path / "damaged"
    shutil.copytree(run, damaged)
    (damaged / "checkpoints" / "step-00000001" / "generator.safetensors").write_bytes(b"\0" * 100)
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "latin1.yaml").write_bytes("train: {seed: 0}  # caf\xe9\n".encode("latin-1"))
    broken = tmp_path / "broken-student"
    shutil.copytree(run / "student", broken)
    (broken / "fastdiff.json").write_text("{")
    np.savez(tmp_path / "ok.npz", mu=np.zeros(3), sigma=np.eye(3))
    (tmp_path / "trunc.npz").write_bytes((tmp_path / "ok.npz").read_bytes()[:200])
    student = str(run / "student")
    cases = [
        (["export", str(run), "--out", str(run), "--overwrite"], "is the run folder itself"),
        (["export", str(run), "--out", str(tmp_path), "--overwrite"], "which writing it would replace"),
        (["export", str(run), "--out", str(tmp_path / "a_file")], "a_file is a file; give a folder"),
        (["sample", student, "--num", "1", "--steps", "1", "--out", str(tmp_path / "s"), "--device", "magic"],
         "--device 'magic' is not a device torch knows"),
        (["tune", student, "--targets", str(run / "samples"), "--out", str(tmp_path / "t"), "--device", "magic"],
         "--device 'magic' is not a device torch knows"),
        (["upscale", tiny_teacher, "--images", str(run / "samples"), "--out", str(tmp_path / "u"), "--device", "magic"],
         "--device 'magic' is not a device torch knows"),
        (["sample", tiny_teacher, "--num", "1", "--steps", "1", "--out", str(tmp_path / "s"),
          "--guidance-scale", "3"], "--guidance-scale 3.0 needs a class- or text-conditional teacher"),
        (["export", str(damaged), "--out", str(tmp_path / "e"), "--checkpoint", "1"], "cannot be read"),
        (["distill", "--config", str(tmp_path / "latin1.yaml")], "is not UTF-8 text"),
        (["sample", str(broken), "--num", "1", "--steps", "1", "--out", str(tmp_path / "s")], "is not valid JSON"),
        (["fid", str(run / "samples"), "--ref", str(tmp_path / "trunc.npz")], "File is not a zip file"),
        (["fid", str(run / "samples"), "--ref", str(tmp_path / "ok.npz"), "--json", str(tmp_path)],
         "is a folder; give a file name"),
        (["pairs", "--teacher", tiny_teacher, "--num", "2", "--out", str(tmp_path / "p"), "--guidance", "3"],
         "--guidance 3.0 needs a class- or text-conditional teacher"),
        (["sample", tiny_teacher, "--num", "2", "--steps", "1", "--out", str(tmp_path / "s"), "--prompts",
          str(tmp_path / "a_file")], "--prompts is for text-to-image models; this one is unconditional"),
    ]
    if not torch.cuda.is_available():
        cases.append((["sample", student, "--num", "1", "--steps", "1", "--out", str(tmp_path / "s"), "--device",
                       "cuda"], "no CUDA GPU is available here"))
    no_config = tmp_path / "no-config"  # the run's config.yaml deleted: the checkpoint's own copy is compared
    shutil.copytree(run, no_config)
    (no_config / "config.yaml").unlink()
    cases.append((["distill", "--set", f"teacher.path={tiny_teacher}", "--set", f"output_dir={no_config}", "--set",
                   "objective.name=sid", "--resume", "latest"], "was trained with objective.name='dmd2'"))
    bad_config = tmp_path / "bad-config"  # a run whose checkpoint config / run config is damaged
    shutil.copytree(run, bad_config)
    (bad_config / "checkpoints" / "step-00000001" / "config.yaml").write_text("[1")
    (bad_config / "config.yaml").write_text("[1, 2]\n")
    bad_index = tmp_path / "bad-index"
    shutil.copytree(tiny_teacher, bad_index)
    (bad_index / "model_index.json").write_text("{")
    cases += [
        (["export", str(bad_config), "--out", str(tmp_path / "e")], "invalid YAML"),
        (["distill", "--set", f"teacher.path={tiny_teacher}", "--set", f"output_dir={bad_config}", "--resume",
          "latest"], "is not a run config"),
        (["sample", str(bad_index), "--num", "1", "--steps", "1", "--out", str(tmp_path / "s")], "is not valid JSON"),
    ]
    for argv, fragment in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert fragment in err and len(err.splitlines()) == 1, (argv, err)
    assert sorted(str(p.relative_to(run)) for p in run.rglob("*")) == before  # the run is intact
    assert not any((tmp_path / name).exists() for name in ("s", "e", "p"))


@pytest.mark.parametrize("sets,fragment", [
    (["teacher.null_class=99", "teacher.guidance_scale=2"], "teacher.null_class 99 is not one of"),
    (["student.model={uncond}/unet"], "student.model takes no class labels but the teacher is class-conditional"),
])
def test_class_conditional_teacher_bad_input(tmp_path, capsys, tiny_teacher, tiny_cond_teacher, sets, fragment):
    """A null class outside the label table, and an unconditional student for a class-conditional teacher: both
    failed inside the first forward pass, after the run folder was written."""
    rc = _distill(tmp_path, f"teacher.path={tiny_cond_teacher}", *[s.format(uncond=tiny_teacher) for s in sets])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and fragment in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_damaged_pairs_shard_and_a_file_as_cache_dir(tmp_path, capsys, tiny_teacher):
    """A truncated `fastdiff pairs` shard and a file given as the teacher-sample cache folder were tracebacks; a
    damaged pairs manifest read as pairs "made with other settings"."""
    import shutil

    pairs = tmp_path / "pairs"
    assert main(["pairs", "--teacher", tiny_teacher, "--out", str(pairs), "--num", "4", "--steps", "3", "-q"]) == 0
    damaged = tmp_path / "damaged-manifest"  # a pairs folder whose manifest.json is not JSON
    shutil.copytree(pairs, damaged)
    (damaged / "manifest.json").write_text("{")
    assert main(["pairs", "--teacher", tiny_teacher, "--out", str(damaged), "--num", "4", "--steps", "3", "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert "is damaged (not a JSON object)" in err and len(err.splitlines()) == 1, err
    (tmp_path / "a-file").write_text("keep")  # --out under a file: named, nothing written, the file kept
    assert main(["pairs", "--teacher", tiny_teacher, "--out", str(tmp_path / "a-file" / "p"), "--num", "4",
                 "--steps", "3", "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{tmp_path / 'a-file'} is a file" in err and len(err.splitlines()) == 1, err
    assert (tmp_path / "a-file").read_text() == "keep"
    assert _distill(tmp_path, f"teacher.path={tiny_teacher}", "objective.name=reflow", "data.name=pairs",
                    "student.sampler=ddim", f"data.path={damaged}") == 2
    err = capsys.readouterr().err.strip()
    assert "is not valid JSON" in err and len(err.splitlines()) == 1, err
    shard = next(pairs.glob("pairs-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:100])
    (tmp_path / "a_file").write_text("x")
    for sets, fragment in ((["objective.name=reflow", "data.name=pairs", "student.sampler=ddim", f"data.path={pairs}"],
                            "delete it and rerun `fastdiff pairs`"),
                           (["objective.name=cd", "data.name=teacher", "data.cache_size=4",
                             f"data.cache_dir={tmp_path / 'a_file'}"], "is a file; give a folder")):
        assert _distill(tmp_path, f"teacher.path={tiny_teacher}", "train.batch_size=2", *sets) == 2
        err = capsys.readouterr().err.strip()
        assert fragment in err and len(err.splitlines()) == 1, err


def test_input_found_bad_while_running_leaves_no_run_folder(tmp_path, capsys, tiny_teacher):
    """A streamed image folder is read per batch, so a corrupt image surfaces only in the first step, after the run
    folder was written: the one-line error, and the folder this call made removed (the same command works again
    without --overwrite). A folder that held something before is left as it was."""
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    for i in range(4):
        Image.new("L", (8, 8), color=40 * i).save(images / f"{i}.png")
    (images / "4.png").write_bytes(b"not a png")
    sets = ["objective.gan=true", "data.name=imagefolder", "data.stream=true", f"data.path={images}",
            "data.resolution=8", "train.batch_size=5", f"teacher.path={tiny_teacher}"]
    assert _distill(tmp_path, *sets) == 2
    err = capsys.readouterr().err.strip()
    assert "4.png" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    assert main(["distill", *[a for s in sets + [f"output_dir={tmp_path / 'out'}", "train.max_steps=1"]
                              for a in ("--set", s)], "--overwrite"]) == 2
    assert (tmp_path / "out").is_dir()  # not made by this call: kept


def test_sampling_options_on_images_are_refused(tmp_path, capsys):
    """fid / clip-score score an image folder as it is: --steps, --guidance-scale (and fid's --prompts) would be
    silently ignored, so they are refused."""
    from PIL import Image

    from fastdiff.evaluation.images import open_source
    from fastdiff.errors import FastdiffError

    (tmp_path / "imgs").mkdir()
    Image.new("L", (8, 8)).save(tmp_path / "imgs" / "0.png")
    for kwargs in ({"steps": 4}, {"guidance_scale": 2.0}):
        with pytest.raises(FastdiffError, match="sample a model; .* holds images"):
            open_source(str(tmp_path / "imgs"), **kwargs)
    open_source(str(tmp_path / "imgs"), prompts=["a shoe"])  # clip-score pairs prompts with images
