"""data.name teacher (TBCM-style image-free data): the samples follow the teacher's distribution, batches are
deterministic per seed, a resumed run equals an uninterrupted one, the disk cache keeps to its bound, and cd trains
on a class-conditional teacher without any data.path."""
import pytest
import torch
from safetensors.torch import load_file, save_file

from fastdiff.cli import main
from fastdiff.errors import FastdiffError
from fastdiff.models.analytic import GaussianMixtureModel
from fastdiff.models.teacher import load_teacher
from fastdiff.training.teacher_data import CHUNK, TeacherSamples

N = 4096


@pytest.fixture(scope="module")
def gmm_teachers(tmp_path_factory):
    root = tmp_path_factory.mktemp("gmm")
    out = {}
    for cond in (False, True):
        GaussianMixtureModel(class_conditional=cond).save_teacher(root / str(cond))
        out[cond] = load_teacher(str(root / str(cond)))
    return out


def _truth(gmm):
    return gmm.means.detach().double(), gmm.variances.detach().double(), gmm.log_weights.detach().double().exp()


def test_class_samples_have_each_modes_mean_and_variance(gmm_teachers):
    """Label k's samples against mode k, N(mu_k, s_k^2 I) in d = 64 dimensions. Heun with 40 Karras levels
    (79 teacher evaluations) is close enough to the exact ODE that only sampling error and a small,
    measured discretisation bias remain; 25 DDIM levels are not (the second check)."""
    teacher = gmm_teachers[True]
    mu, var, _ = _truth(teacher.model)
    x, labels, captions = TeacherSamples(teacher, 40, sampler="heun").batch(N, "cpu")
    assert captions is None and labels.shape == (N,) and set(labels.tolist()) == {0, 1, 2, 3}
    x = x.reshape(N, -1).double()
    d = x.shape[1]
    for k in range(4):
        xk = x[labels == k]
        n = len(xk)
        # n |mean - mu_k|^2 / s_k^2 ~ chi2(64) for exact samples: P(> 120) = 2e-5 (measured 48-88).
        assert n * ((xk.mean(0) - mu[k]) ** 2).sum() / var[k] < 120
        # Variance ratio: sampling sd sqrt(2 / (n d)) ~ 0.0055, so 5 sd = 0.028, plus the Heun-40 discretisation
        # bias measured at 0.019-0.031 on this teacher (1.02-1.03 x): 0.06.
        ratio = ((xk - xk.mean(0)) ** 2).sum() / ((n - 1) * d) / var[k]
        assert abs(ratio - 1) < 0.06, (k, float(ratio))
        assert (teacher.model.assign_modes(xk.float()) == k).all()
    # The test can fail: 25 DDIM levels keep only 37-58% of each mode's variance (Euler contracts at low sigma).
    x, labels, _ = TeacherSamples(teacher, 25, sampler="ddim").batch(1024, "cpu")
    x = x.reshape(1024, -1).double()
    ratio = ((x[labels == 0] - x[labels == 0].mean(0)) ** 2).sum() / ((labels == 0).sum() - 1) / d / var[0]
    assert ratio < 0.8


def test_unconditional_samples_have_the_mixtures_mean_and_weights(gmm_teachers):
    teacher = gmm_teachers[False]
    mu, var, w = _truth(teacher.model)
    x, labels, _ = TeacherSamples(teacher, 40, seed=1).batch(N, "cpu")
    assert labels is None
    x = x.reshape(N, -1).double()
    # Mode weights: each count is binomial, sd sqrt(w (1 - w) / N) <= 0.0078; 4.5 sd (two-sided 7e-6 per mode).
    err = (teacher.model.mode_weights(x.float()).double() - w).abs()
    assert (err < 4.5 * (w * (1 - w) / N).sqrt()).all(), err
    # Hotelling with the exact covariance sum_k w_k (s_k^2 I + mu_k mu_k^T) - m m^T: N diff^T C^-1 diff ~ chi2(64).
    m = w @ mu
    eye = torch.eye(mu.shape[1], dtype=torch.float64)
    cov = (w[:, None, None] * (var[:, None, None] * eye + mu[:, :, None] * mu[:, None, :])).sum(0) - torch.outer(m, m)
    diff = x.mean(0) - m
    assert N * diff @ torch.linalg.solve(cov, diff) < 120  # P(chi2_64 > 120) = 2e-5; measured 55


def test_batches_are_deterministic_per_seed_and_follow_the_rng_state(gmm_teachers):
    teacher = gmm_teachers[True]
    for cache in (None, 300):  # fresh samples; a pool of 300 (two chunks, the second partial) in memory
        a, b, c = (TeacherSamples(teacher, 4, seed=s, cache_size=cache) for s in (0, 0, 1))
        first, same = a.batch(8, "cpu"), b.batch(8, "cpu")
        assert torch.equal(first[0], same[0]) and torch.equal(first[1], same[1])
        assert not torch.equal(first[0], c.batch(8, "cpu")[0])
        state = a.rng.get_state()  # what the checkpoint saves (Run._generators: "data")
        nxt = a.batch(8, "cpu")
        fresh = TeacherSamples(teacher, 4, seed=0, cache_size=cache)
        fresh.rng.set_state(state)
        again = fresh.batch(8, "cpu")
        assert torch.equal(nxt[0], again[0]) and torch.equal(nxt[1], again[1])


def test_disk_cache_keeps_to_its_bound_and_is_reused(gmm_teachers, tmp_path):
    teacher = gmm_teachers[True]
    size = CHUNK + 44
    src = TeacherSamples(teacher, 4, cache_size=size, cache_dir=tmp_path)
    x, labels, _ = src.batch(512, "cpu")  # draws from both chunks
    files = sorted(tmp_path.glob("chunk-*.safetensors"))
    assert len(files) == 2 and sum(len(load_file(str(f))["x"]) for f in files) == size
    # The same settings read the stored chunks (made to differ on disk here, to see they are read, not remade).
    stored = load_file(str(files[0]))
    save_file({"x": stored["x"] + 100.0, "cond": stored["cond"]}, str(files[0]))
    reread = TeacherSamples(teacher, 4, cache_size=size, cache_dir=tmp_path).batch(512, "cpu")[0]
    shift = (reread - x).abs().amax(dim=(1, 2, 3))  # the same seed draws the same indices: 100 on chunk 0's rows
    assert set(shift.tolist()) == {0.0, 100.0}
    # Other settings (another seed) empty the folder of chunks first: never more than cache_size samples there.
    other = TeacherSamples(teacher, 4, seed=5, cache_size=100, cache_dir=tmp_path)
    other.batch(16, "cpu")
    files = list(tmp_path.glob("chunk-*.safetensors"))
    assert len(files) == 1 and len(load_file(str(files[0]))["x"]) == 100
    assert not list(tmp_path.glob(".*.tmp"))
    # A chunk cut short (a full disk, a copy stopped half way) is one line naming it, read memory-mapped or not.
    files[0].write_bytes(files[0].read_bytes()[:-64])
    with pytest.raises(FastdiffError, match=r"chunk-00000.safetensors cannot be read \(shorter than its header says\); "
                                            r"delete it; the run makes it again"):
        TeacherSamples(teacher, 4, seed=5, cache_size=100, cache_dir=tmp_path).batch(16, "cpu")


def test_text_teacher_needs_prompts(gmm_teachers):
    class TextTeacher:
        conditioning, num_classes = "text", None

    with pytest.raises(FastdiffError, match="data.prompts"):
        TeacherSamples(TextTeacher())


def _distill(teacher, out, steps, *extra, resume=False):
    items = [f"teacher.path={teacher}", f"output_dir={out}", f"train.max_steps={steps}", "train.batch_size=2",
             "objective.name=cd", "data.name=teacher", "data.teacher_steps=4", "train.checkpoint_every=2",
             "train.log_every=1", "train.sample_every=1000", "train.num_sample_images=2", "train.lr_generator=1e-2",
             *extra]
    return main(["distill", *(["--resume", "latest"] if resume else []),
                 *[a for item in items for a in ("--set", item)]])


def _state(run, step):
    folder = run / "checkpoints" / f"step-{step:08d}"
    out = {f"{p.stem}/{k}": v for p in sorted(folder.glob("*.safetensors")) for k, v in load_file(str(p)).items()}
    out["rng"] = torch.load(folder / "state.pt", weights_only=True)["rng"]["generators"]["data"]
    return out


@pytest.mark.parametrize("cache", [[], ["data.cache_size=6"]], ids=["fresh", "cached"])
def test_cd_trains_on_teacher_samples_and_resumes_exactly(tiny_cond_teacher, tmp_path, cache):
    """No data.path anywhere: cd on the class-conditional teacher's own samples; stopping at step 2 and resuming
    gives bit-identical weights and data RNG at step 4 (the RNG is in the checkpoint; cached chunks are read
    back from disk by the resumed process)."""
    assert _distill(tiny_cond_teacher, tmp_path / "whole", 4, *cache) == 0
    assert _distill(tiny_cond_teacher, tmp_path / "split", 2, *cache) == 0
    assert _distill(tiny_cond_teacher, tmp_path / "split", 4, *cache, resume=True) == 0
    whole, split = _state(tmp_path / "whole", 4), _state(tmp_path / "split", 4)
    assert whole.keys() == split.keys() and all(torch.equal(whole[k], split[k]) for k in whole)
    start = _state(tmp_path / "whole", 2)
    assert any(not torch.equal(whole[k], start[k]) for k in whole if k.startswith("generator"))  # it trained
    chunks = list((tmp_path / "split" / "teacher-samples").glob("chunk-*.safetensors"))
    assert len(chunks) == (1 if cache else 0)
    assert (tmp_path / "whole" / "student").is_dir()  # exported
