"""CLI extras: --version, reference statistics from other tools (EDM / clean-fid / torch-fidelity mu/sigma .npz,
labelled foreign) and progress bars (on a terminal, off with --quiet)."""
import io
import json
import sys

import numpy as np
import pytest
import torch

from fastdiff import __version__
from fastdiff.cli import main
from fastdiff.evaluation.evaluate import evaluate
from fastdiff.evaluation.images import open_source
from fastdiff.evaluation.inception import STANDARD_ID
from fastdiff.evaluation.metrics import ReferenceStats


class Projection(torch.nn.Module):
    """A stand-in feature extractor (a fixed projection of the pixels) with the standard network's id: what is
    tested here is the reference file, not Inception."""

    num_features = 16
    resize = "nv-bilinear"
    extractor_id = STANDARD_ID

    def __init__(self):
        super().__init__()
        self.w = torch.randn(64, self.num_features, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def forward(self, images):
        return images.flatten(1).double() / 255 @ self.w


class Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture
def images(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "gen.npz"
    np.savez(path, images=rng.integers(0, 256, (40, 8, 8), dtype=np.uint8))
    return path


@pytest.fixture
def statistics(tmp_path):
    """The same reference statistics in fastdiff's format (with KID features) and in EDM's (mu and sigma only)."""
    rng = np.random.default_rng(1)
    feats = Projection()(torch.from_numpy(rng.integers(0, 256, (50, 1, 8, 8), dtype=np.uint8))).numpy()
    mu, sigma = feats.mean(0), np.cov(feats, rowvar=False)
    own = tmp_path / "own.npz"
    ReferenceStats(mu=mu, sigma=sigma, n=50, extractor=STANDARD_ID, resize="nv-bilinear", image_shape=(1, 8, 8),
                   name="real50", features=feats.astype(np.float32)).save(own)
    edm = tmp_path / "cifar10-32x32.npz"
    np.savez(edm, mu=mu, sigma=sigma)  # NVlabs/edm fid.py `ref` writes exactly these two keys
    return own, edm


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"fastdiff {__version__}"


def test_fid_against_edm_npz_equals_fid_against_the_same_statistics(images, statistics):
    own, edm = statistics
    source = open_source(str(images))
    mine = evaluate(source, ReferenceStats.load(own), Projection(), None, 16)
    foreign_ref = ReferenceStats.load(edm)
    theirs = evaluate(source, foreign_ref, Projection(), None, 16)
    # float64 statistics on both sides, the same arithmetic: equal to rounding (1e-9 relative is far above it)
    assert mine["fid"] > 1e-3 and theirs["fid"] == pytest.approx(mine["fid"], rel=1e-9)
    assert foreign_ref.origin == "foreign:edm-npz" and foreign_ref.mu.dtype == np.float64
    assert theirs["fid_label"] == "FID@40(cifar10-32x32 foreign:edm-npz, nv-bilinear)"
    assert mine["fid_label"] == "FID@40(real50, nv-bilinear)" and mine["reference_format"] == "fastdiff"
    assert "kid" in mine and "kid" not in theirs and "mu/sigma only" in theirs["kid_unavailable"]


def test_cli_fid_labels_a_foreign_reference_and_says_why_no_kid(images, statistics, tmp_path, capsys, monkeypatch):
    import fastdiff.cli

    monkeypatch.setattr(fastdiff.cli, "_extractor", lambda args, resize, device: Projection())
    _, edm = statistics
    assert main(["fid", str(images), "--ref", str(edm), "--json", str(tmp_path / "r.json")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("FID@40(cifar10-32x32 foreign:edm-npz, nv-bilinear) = ") and "KID" not in lines[0]
    assert sum(line.startswith("KID unavailable") for line in lines) == 1
    assert json.loads((tmp_path / "r.json").read_text())["reference_format"] == "foreign:edm-npz"


def test_foreign_formats_are_told_apart_and_never_saved_as_fastdiffs(tmp_path, capsys):
    mu, sigma = np.zeros(4), np.eye(4)
    clean = tmp_path / "cifar10_clean_train_32.npz"  # clean-fid's <name>_<mode>_<split>_<res>.npz
    np.savez(clean, mu=mu, sigma=sigma)
    ref = ReferenceStats.load(clean)
    assert (ref.origin, ref.resize) == ("foreign:clean-fid-npz", "clean-bicubic")
    legacy = tmp_path / "cifar10_legacy_tensorflow_train_32.npz"
    np.savez(legacy, mu=mu, sigma=sigma)
    assert ReferenceStats.load(legacy).resize == "nv-bilinear"
    assert ReferenceStats.load(clean, "torch-fidelity").origin == "foreign:torch-fidelity-npz"
    with pytest.raises(Exception, match="not saved as fastdiff"):
        ref.save(tmp_path / "copy.npz")
    np.savez(tmp_path / "x_legacy_pytorch_train_32.npz", mu=mu, sigma=sigma)
    extra = tmp_path / "adm.npz"
    np.savez(extra, mu=mu, sigma=sigma, mu_s=mu)
    np.savez(tmp_path / "bad.npz", mu=mu, sigma=np.eye(3))
    cases = {"x_legacy_pytorch_train_32.npz": "legacy_pytorch", "adm.npz": "--ref-format",
             "bad.npz": "not a mean and its covariance", "clean.npz": None}
    np.savez(tmp_path / "clean.npz", mu=mu, sigma=sigma)
    for name, message in cases.items():
        argv = ["fid", str(tmp_path), "--ref", str(tmp_path / name)]
        if message is None:  # an EDM file read as fastdiff's own is refused, not guessed
            argv += ["--ref-format", "fastdiff"]
            message = "not a fastdiff reference"
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, (name, err)
    assert ReferenceStats.load(extra, "edm").origin == "foreign:edm-npz"


def test_progress_bars_on_a_terminal_and_off_with_quiet(tiny_teacher, tmp_path, monkeypatch):
    def sample(*extra):
        term = Terminal()
        monkeypatch.setattr(sys, "stderr", term)
        assert main(["sample", tiny_teacher, "--num", "3", "--steps", "1", "--batch-size", "2", "--out",
                     str(tmp_path / "png"), "--overwrite", *extra]) == 0
        return term.getvalue()

    bar = sample()
    assert "sample: 100%" in bar and "3/3" in bar
    assert sample("--quiet") == ""
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a terminal: no bar either
    assert main(["sample", tiny_teacher, "--num", "1", "--steps", "1", "--out", str(tmp_path / "png"),
                 "--overwrite"]) == 0
    assert sys.stderr.getvalue() == ""


def test_evaluation_bars_count_images(images, statistics, monkeypatch):
    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    evaluate(open_source(str(images)), ReferenceStats.load(statistics[0]), Projection(), None, 16)
    assert "Inception features: 100%" in term.getvalue() and "40/40" in term.getvalue()


def test_ref_stats_reads_a_foreign_statistics_file_and_writes_nothing(tmp_path, capsys):
    """``fastdiff ref-stats`` on another tool's mu/sigma file says what it is and how to use it; --out is untouched."""
    edm = tmp_path / "cifar10-32x32.npz"
    np.savez(edm, mu=np.zeros(8), sigma=np.eye(8))
    out = tmp_path / "ours.npz"
    assert main(["ref-stats", str(edm), "--out", str(out)]) in (0, None)
    said = capsys.readouterr().out
    assert "foreign:edm-npz" in said and "8 features" in said and f"fid --ref {edm}" in said
    assert not out.exists()
