"""Bad input, second pass (2026-11-30): the eval scripts, `fastdiff bench` / `ref-stats`, the Python API the README
shows and the shapes of YAML configs, held to the standard "one line, what is wrong and how to fix it, non-zero exit
(2), nothing half-written, no data lost". Every test here failed on the code before its fix (a strict xfail first):
train_teacher.py deleted an existing --out, ref-stats could replace its own source, scripts made --out before
checking their inputs or found a bad --out only after the whole run, tracebacks for bad numbers and missing files,
the Python API failing deep inside on a wrong argument type, duplicate YAML keys and an empty --config accepted, and
bench flags silently ignored. The slow parts (training, Inception, benches) are replaced by fakes where the check
belongs before them."""
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import eval_script, tiny_unet
from test_quality_harness import _load_quality
from fastdiff.cli import main
from fastdiff.errors import FastdiffError


def _one_line(capsys, fragment=""):
    err = capsys.readouterr().err.strip()
    assert fragment in err and len(err.splitlines()) == 1, err
    return err


def _script_exit(module, argv, monkeypatch):
    """Run an eval script's main() as `python eval/NAME.py ARGV`; its exit status (0 when main returns)."""
    monkeypatch.setattr(sys, "argv", [f"{module.__name__}.py", *argv])
    try:
        rc = module.main()
    except SystemExit as exc:
        return exc.code
    return rc or 0


def _fake_fashion_mnist(folder: Path, n: int = 4) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "train-images-idx3-ubyte", "wb") as f:
        f.write(struct.pack(">HBBIII", 0, 8, 3, n, 28, 28) + np.zeros((n, 28, 28), np.uint8).tobytes())
    with open(folder / "train-labels-idx1-ubyte", "wb") as f:
        f.write(struct.pack(">HBBI", 0, 8, 1, n) + np.arange(n, dtype=np.uint8).tobytes())
    return folder


def _fake_reference(monkeypatch):
    """ref-stats without Inception: a fixed 4-feature reference, written by the real ReferenceStats.save."""
    import fastdiff.cli as cli
    import fastdiff.evaluation.evaluate as evaluate
    from fastdiff.evaluation.metrics import ReferenceStats

    ref = ReferenceStats(mu=np.zeros(4), sigma=np.eye(4), n=4, extractor="fake", resize="nv-bilinear",
                         image_shape=(1, 8, 8), name="fake4")
    monkeypatch.setattr(cli, "_extractor", lambda *a, **k: None)
    monkeypatch.setattr(evaluate, "make_reference", lambda *a, **k: ref)


def _images_npz(path: Path) -> Path:
    np.savez(path, images=np.full((4, 8, 8, 1), 7, np.uint8))
    return path


# --- data lost / half-written ----------------------------------------------------------------------------------------

def test_train_teacher_never_deletes_an_existing_out_folder(tmp_path, monkeypatch):
    tt = eval_script("train_teacher")
    monkeypatch.setattr(tt, "build", lambda conditional: (tiny_unet(), __import__("diffusers").DDPMScheduler()))
    data = _fake_fashion_mnist(tmp_path / "fmnist")
    out = tmp_path / "mine"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    rc = _script_exit(tt, ["--out", str(out), "--steps", "1", "--batch-size", "1", "--warmup", "1", "--log-every",
                           "1", "--data-path", str(data), "--device", "cpu"], monkeypatch)
    assert (out / "precious.txt").read_text() == "keep me"
    assert rc not in (0, None)


def test_ref_stats_out_equal_to_its_source_keeps_the_images(tmp_path, monkeypatch, capsys):
    _fake_reference(monkeypatch)
    source = _images_npz(tmp_path / "images.npz")
    before = source.read_bytes()
    rc = main(["ref-stats", str(source), "--out", str(source), "--overwrite", "--device", "cpu", "-q"])
    assert source.read_bytes() == before
    assert rc == 2
    _one_line(capsys, "--out")


def test_ref_stats_out_a_folder_is_one_line_and_leaves_no_tmp_file(tmp_path, monkeypatch, capsys):
    _fake_reference(monkeypatch)
    source = _images_npz(tmp_path / "images.npz")
    out = tmp_path / "stats.npz"
    out.mkdir()
    try:
        rc = main(["ref-stats", str(source), "--out", str(out), "--overwrite", "--device", "cpu", "-q"])
    finally:
        left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["images.npz", "stats.npz"], left
    assert rc == 2
    _one_line(capsys, "--out")


def test_adaptive_fid_missing_student_is_one_line_and_makes_no_out(tmp_path, monkeypatch, capsys):
    af = eval_script("adaptive_fid")
    out = tmp_path / "out"
    rc = _script_exit(af, ["--out", str(out), "--student", str(tmp_path / "missing"), "--ref",
                           str(tmp_path / "missing.npz"), "--num", "4"], monkeypatch)
    assert not out.exists()
    assert rc == 2
    _one_line(capsys, "missing")


def test_cpu_ladder_missing_data_is_one_line_and_makes_no_out(tmp_path, monkeypatch, capsys):
    cl = eval_script("cpu_ladder")
    out = tmp_path / "out"
    rc = _script_exit(cl, ["--out", str(out), "--data-path", str(tmp_path / "missing"), "--objectives", "dmd2",
                           "--updates", "1"], monkeypatch)
    assert not out.exists()
    assert rc == 2
    _one_line(capsys, "Fashion-MNIST")


def test_teacher_vs_student_out_a_file_is_refused_before_the_run(tmp_path, monkeypatch, capsys):
    tvs = eval_script("teacher_vs_student")
    ran = []
    monkeypatch.setattr(tvs, "run", lambda *a, **k: ran.append(1) or {"rows": []})
    monkeypatch.setattr(tvs, "table", lambda result: "")
    out = tmp_path / "results.txt"
    out.write_text("keep me")
    try:
        rc = tvs.main(["--teacher", "embedded:fmnist-ddpm", "--ref", str(tmp_path / "r.npz"), "--num", "4",
                       "--out", str(out)])
    except FileExistsError:
        rc = None
    assert out.read_text() == "keep me"
    assert rc == 2 and not ran
    _one_line(capsys, "--out")


# --- tracebacks -------------------------------------------------------------------------------------------------------

def test_adaptive_nfe_zero_num_is_one_line(tmp_path, monkeypatch, capsys):
    an = eval_script("adaptive_nfe")
    rc = _script_exit(an, ["--num", "0", "--out", str(tmp_path / "out")], monkeypatch)
    assert rc == 2 and not (tmp_path / "out").exists()
    _one_line(capsys, "--num")


def test_adaptive_fid_render_without_results_is_one_line(tmp_path, monkeypatch, capsys):
    af = eval_script("adaptive_fid")
    rc = _script_exit(af, ["--render", "--out", str(tmp_path / "out")], monkeypatch)
    assert rc == 2
    _one_line(capsys, "adaptive_fid.json")


def test_cpu_ladder_render_without_results_is_one_line(tmp_path, monkeypatch, capsys):
    cl = eval_script("cpu_ladder")
    rc = _script_exit(cl, ["--render", "--out", str(tmp_path / "out")], monkeypatch)
    assert rc == 2
    _one_line(capsys, "ladder.json")


def test_consistency_check_missing_data_is_one_line(tmp_path, capsys):
    cc = eval_script("consistency_cpu_check")
    try:
        rc = cc.main(["--work", str(tmp_path / "work"), "--data-path", str(tmp_path / "missing"), "--objectives",
                      "cd", "--out", str(tmp_path / "check.json")])
    except AssertionError:
        rc = None
    assert rc == 2
    _one_line(capsys, "Fashion-MNIST")


def test_fmnist_quality_bad_nfe_is_one_line(tmp_path, capsys):
    fq = _load_quality()
    with pytest.raises(SystemExit) as exc:
        fq.main(["--next", "--plan", "--nfe", "x", "--out", str(tmp_path / "o"), "--work", str(tmp_path / "w")])
    assert exc.value.code == 2
    _one_line(capsys, "--nfe")


def test_fmnist_quality_missing_configs_folder_is_one_line(tmp_path, capsys):
    fq = _load_quality()
    with pytest.raises(SystemExit) as exc:
        fq.main(["--next", "--plan", "--configs", str(tmp_path / "missing"), "--out", str(tmp_path / "o"), "--work",
                 str(tmp_path / "w")])
    assert exc.value.code == 2
    _one_line(capsys, "--configs")


def test_train_teacher_missing_data_is_one_line(tmp_path, monkeypatch, capsys):
    tt = eval_script("train_teacher")
    out = tmp_path / "teacher"
    try:
        rc = _script_exit(tt, ["--out", str(out), "--steps", "1", "--batch-size", "1", "--data-path",
                               str(tmp_path / "missing"), "--device", "cpu"], monkeypatch)
    except FastdiffError:
        rc = None
    assert rc == 2 and not out.exists()
    _one_line(capsys, "Fashion-MNIST")


@pytest.mark.parametrize("config", [{"train": {"max_steps": 1}}, "quickstart", None])
def test_trainer_refuses_what_is_not_a_config(config):
    from fastdiff.training import Trainer

    with pytest.raises(FastdiffError, match="load_config"):
        Trainer(config)


@pytest.mark.parametrize("what", ["zero steps", "negative steps", "more steps than timesteps", "float steps",
                                  "a Teacher"])
def test_generator_refuses_bad_arguments(tiny_teacher, what):
    from fastdiff import Generator, load_teacher

    teacher = load_teacher(tiny_teacher)
    args = {"zero steps": (teacher.denoiser, 0), "negative steps": (teacher.denoiser, -2),
            "more steps than timesteps": (teacher.denoiser, 5000), "float steps": (teacher.denoiser, 2.5),
            "a Teacher": (teacher, 1)}[what]
    with pytest.raises(FastdiffError):
        Generator(*args)


@pytest.mark.parametrize("call", ["config not a str", "override not a str"])
def test_load_config_refuses_wrong_argument_types(call):
    from fastdiff.config import load_config

    with pytest.raises(FastdiffError):
        load_config(123) if call == "config not a str" else load_config(None, [None])


# --- silently wrong (exit 0 on bad input) -----------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["train:\n  max_steps: 1\n  max_steps: 5\n",
                                  "train:\n  max_steps: 1\ntrain:\n  batch_size: 2\n"])
def test_config_with_a_duplicate_key_is_refused(tmp_path, capsys, text):
    config = tmp_path / "dup.yaml"
    config.write_text(text)
    rc = main(["distill", "--config", str(config), "--dry-run"])
    assert rc == 2
    _one_line(capsys, "max_steps" if "max_steps: 5" in text else "train")


def test_empty_config_name_is_refused(capsys):
    rc = main(["distill", "--config", "", "--dry-run"])
    assert rc == 2
    _one_line(capsys, "--config")


def test_bench_msd_zero_steps_is_refused(monkeypatch, capsys):
    import fastdiff.bench.msd as bench_msd

    ran = []
    monkeypatch.setattr(bench_msd, "run", lambda *a, **k: ran.append(a) or {})
    monkeypatch.setattr(bench_msd, "table", lambda result: "")
    rc = main(["bench", "msd", "--partitions", "1", "--steps", "0", "--num-eval", "100", "-q"])
    assert rc == 2 and not ran
    _one_line(capsys, "--steps")


def test_bench_speed_json_is_written_or_refused(tmp_path, monkeypatch, capsys):
    import fastdiff.bench.speed as bench_speed

    monkeypatch.setattr(bench_speed, "run", lambda *a, **k: {"rows": []})
    monkeypatch.setattr(bench_speed, "table", lambda result: "")
    target = tmp_path / "speed.json"
    rc = main(["bench", "speed", "--device", "cpu", "--skip-compile", "--steps", "1", "--json", str(target), "-q"])
    if rc == 2:
        _one_line(capsys, "--json")
    else:
        assert rc == 0 and target.is_file()


def test_memory_negative_width_is_refused(tmp_path, monkeypatch, capsys):
    mem = eval_script("memory")
    built = []
    monkeypatch.setattr(mem, "build_teacher", lambda *a, **k: built.append(a) or (_ for _ in ()).throw(
        RuntimeError("got past the argument checks")))
    try:
        rc = _script_exit(mem, ["--width", "-1", "--work", str(tmp_path / "w"), "--out", str(tmp_path / "o")],
                          monkeypatch)
    except RuntimeError:
        rc = None
    assert rc == 2 and not built
    _one_line(capsys, "--width")


@pytest.mark.parametrize("argv,flag", [(["gmm", "--objectives", ","], "--objectives"),
                                       (["msd", "--partitions", ","], "--partitions")])
def test_bench_lists_that_name_nothing_are_refused(argv, flag, capsys):
    """`bench gmm --objectives ','` and `bench msd --partitions ','` ran no student and exited 0."""
    assert main(["bench", *argv, "-q"]) == 2
    _one_line(capsys, flag)


@pytest.mark.parametrize("extra,fragment", [(["--next", "--budget-minutes", "-5"], "--budget-minutes"),
                                            (["--rows", "nosuch"], "nosuch")])
def test_fmnist_quality_bad_budget_and_unknown_rows_exit_2(tmp_path, capsys, extra, fragment):
    """A negative --budget-minutes was accepted; an unknown --rows was one line but exit status 1."""
    fq = _load_quality()
    with pytest.raises(SystemExit) as exc:
        fq.main([*extra, "--plan", "--out", str(tmp_path / "o"), "--work", str(tmp_path / "w")])
    assert exc.value.code == 2
    _one_line(capsys, fragment)
