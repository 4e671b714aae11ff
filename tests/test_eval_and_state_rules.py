"""Rules of the evaluation (FID / KID / CLIP score), data and training-state code that a mutation audit found untested:
each test fails under a specific plausible bug (named in its docstring) that the rest of the suite let through.
All run on plain tensors or tiny randomly initialised networks, on the CPU, without weights or data sets."""
import io
import os
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from fastdiff.config import load_config
from fastdiff.evaluation.metrics import kernel_inception_distance
from conftest import small_trainer

EPS32 = np.finfo(np.float32).eps


# --- KID -------------------------------------------------------------------------------------------------------
def _mmd2(x, y):
    """The unbiased MMD^2 with KID's kernel (x.y / d + 1)^3, written out in float64."""
    d, n, m = x.shape[1], len(x), len(y)
    k = lambda a, b: (a @ b.T / d + 1) ** 3  # noqa: E731
    kxx, kyy = k(x, x), k(y, y)
    return ((kxx.sum() - np.trace(kxx)) / (n * (n - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
            - 2 * k(x, y).mean())


def test_kid_subset_size_is_capped_by_the_smaller_set():
    """Mutant: the subset size capped by the first set only (a 30-image sample against a 12-image reference
    asks for 20 of 12 and crashes). With the cap, subset_size 20 is subset_size 12, and on the whole smaller
    set each subset's MMD uses all of it."""
    rng = np.random.default_rng(0)
    f1, f2 = rng.standard_normal((30, 8)), rng.standard_normal((12, 8)) + 0.3
    assert kernel_inception_distance(f1, f2, subsets=4, subset_size=20) == \
        kernel_inception_distance(f1, f2, subsets=4, subset_size=12)
    assert kernel_inception_distance(f2, f1, subsets=4, subset_size=20) == \
        kernel_inception_distance(f2, f1, subsets=4, subset_size=12)


def test_kid_is_reproducible_for_a_seed_and_depends_on_it():
    """Mutant: the subsets drawn from an unseeded generator (a reported KID that changes from run to run)."""
    rng = np.random.default_rng(1)
    f1, f2 = rng.standard_normal((40, 8)), rng.standard_normal((40, 8)) + 0.2
    a = kernel_inception_distance(f1, f2, subsets=5, subset_size=10, seed=3)
    assert a == kernel_inception_distance(f1, f2, subsets=5, subset_size=10, seed=3)
    assert a != kernel_inception_distance(f1, f2, subsets=5, subset_size=10, seed=4)


def test_kid_std_is_the_population_std_over_subsets(monkeypatch):
    """Mutant: np.std(ddof=1). torchmetrics' KID reports ``kid_scores.std(unbiased=False)``; here the subsets are
    chosen by the test (a stand-in generator), so each subset's MMD^2 is known and the mean and std are exact
    up to float64 rounding of values ~1 (~1e-15); rel 1e-12 is far below the sqrt(2) factor ddof=1 gives."""
    import fastdiff.evaluation.metrics as metrics

    rng = np.random.default_rng(2)
    f1, f2 = rng.standard_normal((6, 4)), rng.standard_normal((6, 4)) + 0.5
    picks = [np.array([0, 1, 2]), np.array([3, 4, 5]), np.array([0, 2, 4]), np.array([1, 3, 5]),
             np.array([5, 0, 1]), np.array([2, 3, 4])]  # x1, y1, x2, y2, x3, y3

    class Chooser:
        def __init__(self):
            self.calls = iter(picks)

        def choice(self, n, m, replace):
            assert not replace and m == 3
            return next(self.calls)

    monkeypatch.setattr(metrics.np.random, "default_rng", lambda seed=None: Chooser())
    mean, std = metrics.kernel_inception_distance(f1, f2, subsets=3, subset_size=3)
    values = [_mmd2(f1[picks[2 * s]], f2[picks[2 * s + 1]]) for s in range(3)]
    assert mean == pytest.approx(np.mean(values), rel=1e-12)
    assert std == pytest.approx(np.sqrt(np.mean((np.array(values) - np.mean(values)) ** 2)), rel=1e-12)


# --- Inception preprocessing -----------------------------------------------------------------------------------
def _tf1_bilinear(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """TF1 ResizeBilinear (align_corners False, no half-pixel centres) of one channel, in float64: output pixel
    (i, j) reads input coordinate (i * h / out_h, j * w / out_w), clamped at the border."""
    h, w = img.shape
    out = np.empty((out_h, out_w))
    for i in range(out_h):
        sy = i * h / out_h
        y0 = int(np.floor(sy)); y1 = min(y0 + 1, h - 1); fy = sy - y0  # noqa: E702
        for j in range(out_w):
            sx = j * w / out_w
            x0 = int(np.floor(sx)); x1 = min(x0 + 1, w - 1); fx = sx - x0  # noqa: E702
            top = img[y0, x0] * (1 - fx) + img[y0, x1] * fx
            bottom = img[y1, x0] * (1 - fx) + img[y1, x1] * fx
            out[i, j] = top * (1 - fy) + bottom * fy
    return out


def test_nv_bilinear_of_a_non_square_image_is_tf1_resize():
    """Mutant: the horizontal shift computed from the height (1/h instead of 1/w), which square inputs hide.
    Tolerance as in test_fid.test_nv_bilinear_is_tf1_resize: affine_grid's float32 source coordinates are off by
    ~2 eps32 x the input size in pixels, which moves a value by that times the image's range; 8 eps32 x max(h, w)
    x range is ~4e-3 here, while a 1/20 - 1/36 shift misplaces samples by ~0.3 pixel (values move by ~50)."""
    from fastdiff.evaluation.inception import tf_bilinear

    img = np.random.default_rng(7).uniform(0, 255, (20, 36))
    ours = tf_bilinear(torch.from_numpy(img).float()[None, None], 48)[0, 0].numpy()
    bound = 8 * EPS32 * max(img.shape) * np.ptp(img)
    np.testing.assert_allclose(ours, _tf1_bilinear(img, 48, 48), rtol=0, atol=bound)


@pytest.fixture(scope="module")
def random_extractors():
    """InceptionFeatures in both resize modes around one randomly initialised pool_3 network (no weight file):
    what is tested is the preprocessing in front of the network, not its weights."""
    from fastdiff.evaluation import inception

    torch.manual_seed(0)
    net = inception.InceptionPool3().eval().requires_grad_(False)
    original = inception.load_inception
    inception.load_inception = lambda weights=None: (net, "random")
    try:
        return {mode: inception.InceptionFeatures(resize=mode) for mode in inception.RESIZE_MODES}
    finally:
        inception.load_inception = original


@pytest.mark.parametrize("mode", ["nv-bilinear", "clean-bicubic"])
def test_extractor_resizes_with_its_own_mode(random_extractors, mode):
    """Mutant: InceptionFeatures.forward picking the other resize (the features behind a reference labelled
    nv-bilinear made with PIL bicubic). The extractor on 28 x 28 grayscale uint8 images equals the network on the
    documented preprocessing: the named resize to 299, the gray channel repeated, channels-last, the same float32
    operations in the same order, hence bit-equal."""
    from fastdiff.evaluation.inception import pil_bicubic, tf_bilinear

    extractor = random_extractors[mode]
    x = torch.from_numpy(np.random.default_rng(3).integers(0, 256, (2, 1, 28, 28), dtype=np.uint8))
    resized = (tf_bilinear if mode == "nv-bilinear" else pil_bicubic)(x.float())
    expected = extractor.net(resized.expand(-1, 3, -1, -1).contiguous(memory_format=torch.channels_last))
    got = extractor(x)
    assert got.shape == (2, 2048)
    assert torch.equal(got, expected)


# --- evaluation image sources ----------------------------------------------------------------------------------
def _asymmetric(n, c, h, w):
    """uint8 images whose every pixel is distinct along H and along W (a transpose or a wrong offset shows)."""
    ramp = np.arange(n * c * h * w).reshape(n, c, h, w) % 251
    return ramp.astype(np.uint8)


def test_centre_crop_of_a_non_square_image_takes_the_middle_rows_and_columns():
    """Mutant: the top and left offsets swapped, which square images (every test's) hide."""
    from fastdiff.evaluation.images import centre_crop

    x = torch.from_numpy(_asymmetric(1, 1, 6, 10))
    assert torch.equal(centre_crop(x, 4), x[..., 1:5, 3:7])


def test_npz_of_channels_last_images_keeps_rows_and_columns(tmp_path):
    """Mutant: (N, H, W, C) arrays transposed to (N, C, W, H), i.e. every image mirrored about its diagonal, which
    changes FID silently for square images. Pixels must arrive exactly as stored."""
    from fastdiff.evaluation.images import open_source

    nchw = _asymmetric(3, 3, 5, 7)
    np.savez(tmp_path / "hwc.npz", images=nchw.transpose(0, 2, 3, 1))
    np.savez(tmp_path / "square.npz", images=_asymmetric(2, 3, 6, 6).transpose(0, 2, 3, 1))
    source = open_source(str(tmp_path / "hwc.npz"))
    assert source.shape == (3, 5, 7)
    assert np.array_equal(torch.cat(list(source.batches(None, 2))).numpy(), nchw)
    square = open_source(str(tmp_path / "square.npz"))
    assert np.array_equal(torch.cat(list(square.batches(None, 2))).numpy(), _asymmetric(2, 3, 6, 6))


def test_folder_of_rgb_images_keeps_rows_and_columns(tmp_path):
    """Mutant: a PNG's (H, W, C) pixels transposed to (C, W, H): mirrored images, silent for square ones."""
    from fastdiff.evaluation.images import open_source

    images = _asymmetric(2, 3, 6, 6)
    folder = tmp_path / "rgb"
    folder.mkdir()
    for i, img in enumerate(images):
        Image.fromarray(img.transpose(1, 2, 0)).save(folder / f"{i}.png")  # PNG is lossless
    got = torch.cat(list(open_source(str(folder)).batches(None, 4))).numpy()
    assert np.array_equal(got, images)


def test_array_source_yields_exactly_num_images(tmp_path):
    """Mutant: the last batch of an .npz / Fashion-MNIST source not cut at --num (FID of 10 images when 7 asked)."""
    from fastdiff.evaluation.images import open_source

    np.savez(tmp_path / "ten.npz", images=_asymmetric(10, 1, 4, 4))
    sizes = [len(b) for b in open_source(str(tmp_path / "ten.npz")).batches(7, 4)]
    assert sizes == [4, 3]


# --- CLIP score and the evaluate drivers -----------------------------------------------------------------------
@pytest.mark.parametrize("convention,expected", [("torchmetrics", [0.0, 25.0, 100.0]), ("cosine", [-0.5, 0.25, 1.0])])
def test_clip_score_convention_clamps_negative_cosines(convention, expected):
    """Mutant: the torchmetrics convention reported as 100 * cos, without max(cos, 0) (a random tiny CLIP's
    cosines happen to be positive, so the end-to-end tests cannot see it). The cosines are given here; 0.25 and
    0.5 are exact binary fractions, so the scores are exact."""
    from fastdiff.evaluation.clip_score import ClipScorer

    scorer = ClipScorer.__new__(ClipScorer)  # scores() reads only the convention and the cosines
    torch.nn.Module.__init__(scorer)
    scorer.convention = convention
    scorer.cosines = lambda images, prompts: torch.tensor([-0.5, 0.25, 1.0])
    assert scorer.scores(None, ["a", "b", "c"]).tolist() == expected


class _PromptScorer:
    """A stand-in CLIP scorer whose score of an image is the number written in its prompt."""
    convention, model_name = "cosine", "prompt-number"

    def scores(self, images, prompts):
        assert len(images) == len(prompts)
        return torch.tensor([float(p) for p in prompts], dtype=torch.float64)


def test_clip_score_pairs_each_batch_with_its_own_prompts(tmp_path):
    """Mutant: every batch scored against the first batch's prompts (per-image prompts, batch size < N)."""
    from fastdiff.evaluation.evaluate import clip_score
    from fastdiff.evaluation.images import open_source

    np.savez(tmp_path / "five.npz", images=_asymmetric(5, 3, 4, 4))
    result = clip_score(open_source(str(tmp_path / "five.npz")), _PromptScorer(), ["0", "1", "2", "3", "4"],
                        None, 2, progress=False)
    assert result["n"] == 5 and result["clip_score"] == 2.0  # mean of 0..4, exact in float64
    assert result["clip_score_std"] == pytest.approx(np.std([0, 1, 2, 3, 4]), rel=1e-15)


class _PixelFeatures(torch.nn.Module):
    """A stand-in for Inception in the interface ``evaluate`` uses: the first 6 pixels of each image as features
    (exact in float32, whatever the batching)."""
    extractor_id, resize, num_features = "pixels", "nv-bilinear", 6

    def forward(self, images):
        return images.flatten(1)[:, :6].float()


def test_evaluate_uses_the_requested_kid_subset_size(tmp_path):
    """Mutant: ``evaluate`` ignoring kid_subset_size (KID always on subsets of min(1000, N)). With the
    features exact, evaluate's KID is kernel_inception_distance's on the same features, bit for bit."""
    from fastdiff.evaluation.evaluate import evaluate, make_reference
    from fastdiff.evaluation.images import open_source

    rng = np.random.default_rng(5)
    np.savez(tmp_path / "real.npz", images=rng.integers(0, 256, (9, 1, 4, 4), dtype=np.uint8))
    fake = rng.integers(0, 200, (8, 1, 4, 4), dtype=np.uint8)
    np.savez(tmp_path / "fake.npz", images=fake)
    extractor = _PixelFeatures()
    ref = make_reference(open_source(str(tmp_path / "real.npz")), extractor, None, 4, progress=False)
    got = evaluate(open_source(str(tmp_path / "fake.npz")), ref, extractor, None, 3, kid_subset_size=3,
                   progress=False)
    features = fake.reshape(8, -1)[:, :6].astype(np.float32)
    kid, kid_std = kernel_inception_distance(features, ref.features, subset_size=3)
    assert (got["kid"], got["kid_std"]) == (kid, kid_std)
    assert kid != kernel_inception_distance(features, ref.features, subset_size=8)[0]


# --- streamed data: which samples a step draws, the shard index cache --------------------------------------------
def test_a_step_needing_more_samples_than_the_data_set_wraps_around_its_permutation():
    """Mutant: draw positions not reduced modulo the data set size. Three ranks drawing 5 of 10 samples each at one
    step: ranks 0 and 1 take the whole permutation between them, and rank 2 (positions 10..14) wraps around to
    what rank 0 takes, instead of landing on positions outside the permutation's domain."""
    from fastdiff.training.streaming import step_indices

    ranks = [step_indices(seed=0, step=3, draw=0, n=5, size=10, rank=r, world=3) for r in range(3)]
    assert all(len(set(d.tolist())) == 5 and d.min() >= 0 and d.max() < 10 for d in ranks)
    assert sorted(np.concatenate(ranks[:2]).tolist()) == list(range(10))
    assert ranks[2].tolist() == ranks[0].tolist()


def test_ranks_with_accumulation_draw_what_one_process_accumulating_all_their_micro_batches_draws():
    """Mutant: rank r's slot offset r instead of r x A, which the existing test (P ranks with A = 1, or one
    process with A = P) cannot see: with P = 2 ranks of A = 2 micro-batches, rank 1's first micro-batch would
    take rank 0's second one. Rank r's micro-batch j is micro-batch r A + j of one process accumulating P A."""
    from fastdiff.training.streaming import step_indices

    draws = {(r, j): step_indices(seed=1, step=5, draw=j, n=3, size=50, rank=r, world=2, accumulation=2).tolist()
             for r in range(2) for j in range(2)}
    one = [step_indices(seed=1, step=5, draw=j, n=3, size=50, accumulation=4).tolist() for j in range(4)]
    assert [draws[r, j] for r in range(2) for j in range(2)] == one
    taken = [i for d in draws.values() for i in d]
    assert len(set(taken)) == 12  # disjoint within the step


def _tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_shard_index_cache_is_not_reused_for_a_rewritten_shard_of_the_same_size(tmp_path, monkeypatch):
    """Mutant: the cache keyed by path and size only. A shard regenerated with the same byte size but other
    member sizes (offsets) must be rescanned: a stale index would read its images at the old offsets."""
    from fastdiff.training import streaming

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    shard = tmp_path / "s.tar"
    big, small = b"x" * 700, b"y" * 100  # 2 and 1 tar blocks: swapping them keeps the file size
    _tar(shard, [("a.png", big), ("b.png", small)])
    first = streaming.shard_index(str(shard))
    size = shard.stat().st_size
    _tar(shard, [("a.png", small), ("b.png", big)])
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))  # a later write
    assert shard.stat().st_size == size
    second = streaming.shard_index(str(shard))
    assert not np.array_equal(first, second)
    assert np.array_equal(second, streaming.scan_shard(str(shard)))


# --- real images for training --------------------------------------------------------------------------------------
def test_decode_image_centre_crops_a_non_square_image(tmp_path):
    """Mutant: decode_image's left / top crop offsets swapped (silent for square images, e.g. every test shard).
    A 6 x 10 (H x W) image to size 6 is not resized (the short side is 6) and keeps columns 2..7."""
    from fastdiff.training.data import decode_image

    img = _asymmetric(1, 1, 6, 10)[0, 0]
    Image.fromarray(img).save(tmp_path / "wide.png")
    assert np.array_equal(decode_image(str(tmp_path / "wide.png"), 6, 1)[0], img[:, 2:8])
    Image.fromarray(img.T.copy()).save(tmp_path / "tall.png")
    assert np.array_equal(decode_image(str(tmp_path / "tall.png"), 6, 1)[0], img.T[2:8, :])


def test_uint8_images_map_onto_the_model_range_as_fashion_mnist_does():
    """Mutant: uint8 -> [-1, 1] as x / 128 - 1 (white becomes 0.992). Image folders, shards and latent encodings
    read uint8 through as_model_range; Fashion-MNIST through to_model_range: both must give x / 127.5 - 1, equal in
    float32 (the same two operations), with 0 -> -1 and 255 -> 1 exactly."""
    from fastdiff.training.data import as_model_range, to_model_range

    pixels = np.arange(256, dtype=np.uint8).reshape(1, 16, 16)
    x = as_model_range(torch.from_numpy(pixels)[:, None])
    assert x.dtype == torch.float32 and x.min() == -1.0 and x.max() == 1.0
    assert torch.equal(x, to_model_range(pixels, 16))


def test_real_images_draw_every_image():
    """Mutant: torch.randint(len - 1) (an off-by-one that never draws the last image). 300 draws from 3 images
    miss one with probability 3 (2/3)^300 ~ 1e-52."""
    from fastdiff.training.data import RealImages

    images = torch.arange(3, dtype=torch.float32).view(3, 1, 1, 1)
    x, _, _ = RealImages(images, None, seed=0).batch(300, "cpu")
    assert sorted(set(x.flatten().tolist())) == [0.0, 1.0, 2.0]


# --- learning-rate schedule ------------------------------------------------------------------------------------------
def test_critic_schedule_advances_once_per_generator_update():
    """Mutant: the critic's schedule counting critic updates instead of generator updates (with 5 critic updates
    per generator update its warm-up would end 5x too early). After 5 critic steps = 1 generator update, the
    warm-up factor is (1 + 1) / 10: lr 2e-4 exactly up to float64 rounding of 1e-3 * 0.2."""
    from fastdiff.training.optim import Optimizer

    cfg = load_config(None, ["train.lr_warmup_steps=10", "train.adam_betas=[0.9, 0.999]", "train.weight_decay=0.0",
                             "train.grad_clip=0"])
    opt = Optimizer([torch.nn.Linear(2, 2)], 1e-3, cfg, fp16=False, steps_per_update=5)
    lrs = []
    for _ in range(10):
        lrs.append(opt.opt.param_groups[0]["lr"])
        opt.opt.step()  # no gradients: a no-op that keeps the scheduler from warning about the call order
        opt.schedule.step()
    assert lrs == pytest.approx([1e-4] * 5 + [2e-4] * 5, rel=1e-12)


# --- checkpoints: what a resume restores ---------------------------------------------------------------------------
def _trainer(teacher, out, *sets, resume=None):
    return small_trainer(teacher, out, "train.max_steps=4", "train.lr_generator=1e-3", *sets, resume=resume)


def _two_steps_and_a_checkpoint(teacher, out, *sets):
    from fastdiff.training.state import save_checkpoint

    run = _trainer(teacher, out, *sets)
    for _ in range(2):
        run.train_step()
        run.step += 1
    save_checkpoint(run)
    return run


def test_resume_restores_the_ema(tiny_teacher, tmp_path):
    """Mutant: the EMA left out of the checkpoint. Every resume test compares what the checkpoints hold, which
    then lacks the EMA on both sides; the exported student (the EMA) of a resumed run would restart from the
    student. After two updates (the EMA then differs from the student), a resumed trainer's EMA is the saved one."""
    run = _two_steps_and_a_checkpoint(tiny_teacher, tmp_path / "run", "train.ema_decay=0.9")
    saved = [e.detach().clone() for e in run.ema.parameters()]
    assert any(not torch.equal(e, p) for e, p in zip(saved, run.generator.denoiser.model.parameters()))
    resumed = _trainer(tiny_teacher, tmp_path / "run", "train.ema_decay=0.9", resume="latest")
    resumed.load("latest")
    assert resumed.step == 2
    assert all(torch.equal(a, b) for a, b in zip(saved, resumed.ema.parameters()))


def test_resume_restores_the_skipped_update_counters(tiny_teacher, tmp_path):
    """Mutant: the skipped-update counters not restored (train.max_nonfinite_steps would then count a
    non-finite streak from zero after every resume, and skipped_updates in metrics.jsonl would restart)."""
    run = _two_steps_and_a_checkpoint(tiny_teacher, tmp_path / "run")
    want = {key: 0 for key in run.skipped}
    for i, key in enumerate(run.skipped):  # as if updates had been skipped: distinct counts per counter
        want[key] = i + 2
        run.skipped[key].fill_(i + 2)
    from fastdiff.training.state import save_checkpoint

    save_checkpoint(run)
    resumed = _trainer(tiny_teacher, tmp_path / "run", resume="latest")
    resumed.load("latest")
    assert {key: int(v) for key, v in resumed.skipped.items()} == want


def test_resume_refuses_another_power_ema_width(tiny_teacher, tmp_path):
    """Mutant: train.ema_sigma_rel dropped from the settings a resume must keep: the checkpoint's EMA, averaged
    with one power profile, would silently continue with another."""
    from fastdiff.errors import FastdiffError

    _two_steps_and_a_checkpoint(tiny_teacher, tmp_path / "run", "train.ema_sigma_rel=0.1")
    resumed = _trainer(tiny_teacher, tmp_path / "run", "train.ema_sigma_rel=0.05", resume="latest")
    with pytest.raises(FastdiffError, match="was trained with train.ema_sigma_rel=0.1, this config has 0.05"):
        resumed.load("latest")
