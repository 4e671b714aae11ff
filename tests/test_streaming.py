"""Streamed data (training/streaming.py): WebDataset-style tar shards and lazily read image folders, drawn as a
pure function of (seed, step, rank), disjoint across ranks, resumable, with memory independent of the data set."""
import io
import json
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from fastdiff.errors import FastdiffError
from fastdiff.training import streaming
from fastdiff.training.data import RealImages, decode_image, real_images_for
from fastdiff.training.streaming import StreamingImages, keyed_permutation


@pytest.fixture(autouse=True)
def _index_cache(tmp_path, monkeypatch):
    """Shard indexes are cached under $XDG_CACHE_HOME: keep them in the test's folder."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def png(seed: int, size: int = 8, mode: str = "L") -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3) if mode == "RGB" else (size, size))
    buf = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8), mode).save(buf, format="PNG")
    return buf.getvalue()


def write_shards(folder: Path, sizes=(5, 4), caption=True, label=True, start=0) -> Path:
    """Tar shards of ``sizes`` samples each: ``key.png`` (+ ``key.txt``, ``key.cls``), sample i made from seed i."""
    folder.mkdir(parents=True, exist_ok=True)
    i = start
    for s, count in enumerate(sizes):
        with tarfile.open(folder / f"shard-{s:04d}.tar", "w") as tar:
            for _ in range(count):
                members = {"png": png(i)}
                if caption:
                    members["txt"] = f"caption {i}".encode()
                if label:
                    members["cls"] = str(i % 3).encode()
                for ext, data in members.items():
                    info = tarfile.TarInfo(f"part/sample{i:05d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                i += 1
    return folder


def write_folder(folder: Path, n: int, size: int = 8) -> Path:
    folder.mkdir(parents=True)
    blob = png(0, size)  # one encoded image written n times: 20k files in a few seconds
    for i in range(n):
        (folder / f"{i:06d}.png").write_bytes(blob)
    return folder


def teacher(channels=1, size=8, num_classes=0, conditioning="none"):
    return SimpleNamespace(image_shape=(channels, size, size), num_classes=num_classes, conditioning=conditioning)


def data_cfg(path, name="webdataset", **kw):
    return SimpleNamespace(name=name, path=None if path is None else str(path), resolution=None,
                           stream=kw.pop("stream", False), buffer_size=kw.pop("buffer_size", 16), **kw)


def test_keyed_permutation_is_a_bijection_that_depends_on_the_key():
    for n in (1, 2, 3, 7, 8, 9, 100, 1023, 1025, 5000):  # odd and even bit counts, powers of two and one past
        p = keyed_permutation(np.arange(n), n, b"k")
        assert sorted(p.tolist()) == list(range(n)), n
    a, b = keyed_permutation(np.arange(1000), 1000, b"a"), keyed_permutation(np.arange(1000), 1000, b"b")
    assert (a != b).mean() > 0.9 and (a != np.arange(1000)).mean() > 0.9


def test_shards_read_images_captions_and_labels(tmp_path):
    shards = write_shards(tmp_path / "wds", sizes=(5, 4))
    real = real_images_for(data_cfg(shards), teacher(num_classes=3), seed=0)
    assert isinstance(real, StreamingImages) and len(real) == 9 and real.images.shape == (9, 1, 8, 8)
    for i in (0, 4, 5, 8):  # both shards, first and last member
        expected = torch.from_numpy(np.array(decode_image(io.BytesIO(png(i)), 8, 1)))
        assert torch.equal(real.images[[i]][0], expected)
    assert real.labels.tolist() == [i % 3 for i in range(9)]
    text = real_images_for(data_cfg(tmp_path / "wds" / "*.tar"), teacher(conditioning="text"), seed=0)  # a glob
    assert text.captions == [f"caption {i}" for i in range(9)] and text.labels is None
    x, labels, captions = text.batch(4, "cpu")
    assert x.shape == (4, 1, 8, 8) and x.dtype == torch.float32 and -1 <= x.min() and x.max() <= 1
    assert labels is None and all(c.startswith("caption ") for c in captions)


def test_shard_index_is_built_once_and_cached(tmp_path, monkeypatch):
    shards = write_shards(tmp_path / "wds")
    first = streaming.ShardSource(str(shards)).index
    assert len(list((tmp_path / "cache" / "fastdiff" / "shard-index").glob("*.npy"))) == 2
    monkeypatch.setattr(streaming, "scan_shard", lambda path: pytest.fail("rescanned a cached shard"))
    assert np.array_equal(streaming.ShardSource(str(shards)).index, first)
    # The index holds offsets, not bytes: 6 int64 per sample.
    assert first.shape == (9, 6) and first.dtype == np.int64


def test_draws_are_a_function_of_seed_step_and_rank(tmp_path):
    shards = write_shards(tmp_path / "wds", sizes=(40, 40))

    def draws(seed, rank=0, world=1, steps=range(3)):
        real = real_images_for(data_cfg(shards), teacher(), seed=seed)
        step = [0]
        real.follow(lambda: step[0], rank, world)
        out = {}
        for step[0] in steps:
            out[step[0]] = [real.next_indices(4).tolist() for _ in range(2)]
        return out

    a = draws(0)
    assert a == draws(0)  # a second reader, same draws
    assert a != draws(1)  # another seed
    assert a[0] != a[1] and a[0][0] != a[0][1]  # other steps, other draws within a step
    # Ranks of a 4-process run: disjoint within a step (4 ranks x 2 draws x 4 samples = 32 of 80).
    ranks = [draws(0, r, 4) for r in range(4)]
    for step in range(3):
        taken = [i for r in ranks for d in r[step] for i in d]
        assert len(taken) == len(set(taken)) == 32
    # Resume: a reader that starts at step 2 draws what the reader that ran from step 0 drew at step 2.
    assert draws(0, steps=[2])[2] == a[2]
    # Rank r of P draws what micro-batch r of a P-fold accumulation draws in one process.
    one = real_images_for(data_cfg(shards), teacher(), seed=0)
    one.follow(lambda: 1, 0, 1, accumulation=4)
    accumulated = [one.next_indices(4).tolist() for _ in range(8)]
    assert [ranks[r][1][0] for r in range(4)] == accumulated[:4]
    assert [ranks[r][1][1] for r in range(4)] == accumulated[4:]


def test_streamed_folder_matches_the_in_memory_folder(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(6):
        (folder / f"{i}.png").write_bytes(png(i, size=12, mode="RGB"))
    (folder / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"{i}.png", "text": f"t{i}"}) + "\n"
                                                   for i in range(6)))
    eager = real_images_for(data_cfg(folder, "imagefolder"), teacher(3, 8, conditioning="text"), seed=0)
    lazy = real_images_for(data_cfg(folder, "imagefolder", stream=True, buffer_size=2),
                           teacher(3, 8, conditioning="text"), seed=0)
    assert isinstance(lazy, StreamingImages) and lazy.captions == eager.captions
    idx = torch.tensor([5, 0, 3, 5])
    assert torch.equal(lazy.images[idx], eager.images[idx])
    assert len(lazy.images.buffer) == 2  # the LRU buffer never holds more than data.buffer_size images
    lazy.map_images(lambda x: x.float() * 2)  # e.g. VAE posteriors: a file-backed tensor, then drawn from
    assert torch.equal(lazy.images, eager.images.float() * 2)
    x, _, captions = lazy.batch(3, "cpu")
    assert x.shape == (3, 3, 8, 8) and len(captions) == 3


def test_bad_input_is_one_line(tmp_path):
    def error(cfg, t=teacher()):
        with pytest.raises(FastdiffError) as exc:
            real_images_for(cfg, t, seed=0)
        assert "\n" not in str(exc.value)
        return str(exc.value)

    assert "needs data.path" in error(data_cfg(None))
    (tmp_path / "empty").mkdir()
    assert "no .tar shards found" in error(data_cfg(tmp_path / "empty"))
    assert "no .tar shards found" in error(data_cfg(tmp_path / "missing"))
    bad = tmp_path / "bad"
    bad.mkdir()
    with tarfile.open(bad / "a.tar", "w") as tar:
        info = tarfile.TarInfo("s1.txt")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    assert "sample 's1' has no image" in error(data_cfg(bad))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.tar").write_bytes(b"not a tar" * 100)
    assert "not a readable uncompressed tar shard" in error(data_cfg(tmp_path / "junk"))
    no_cls = write_shards(tmp_path / "nocls", label=False)
    assert "needs a .cls file" in error(data_cfg(no_cls), teacher(num_classes=3))
    no_txt = write_shards(tmp_path / "notxt", caption=False)
    assert "needs a .txt caption" in error(data_cfg(no_txt), teacher(conditioning="text"))
    assert "outside the teacher's 0..1" in error(data_cfg(write_shards(tmp_path / "cls3")), teacher(num_classes=2))
    from fastdiff.config import load_config

    with pytest.raises(FastdiffError, match="data.buffer_size must be >= 0"):
        load_config(None, ["data.buffer_size=-1"])
    with pytest.raises(FastdiffError, match="data.stream applies to imagefolder"):
        load_config(None, ["data.stream=true"])  # fashion-mnist


SIZE = 256  # decoded size: 3 x 256 x 256 bytes an image, so decoding a folder whole would show in the peak


READ_FOLDER = """
import resource, sys
from types import SimpleNamespace
from fastdiff.training.data import real_images_for
cfg = SimpleNamespace(name="imagefolder", path=sys.argv[1], resolution=None, stream=True, buffer_size=64)
real = real_images_for(cfg, SimpleNamespace(image_shape=(3, {size}, {size}), num_classes=0, conditioning="none"), 0)
step = [0]
real.follow(lambda: step[0])
for step[0] in range(10):
    real.batch(32, "cpu")
try:  # this interpreter's own peak: getrusage's would include the parent's size at the fork before exec
    print(next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")) * 1024)
except OSError:  # no procfs (not Linux)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def _peak_rss(folder: Path) -> int:
    """Peak resident set size (bytes) of a fresh interpreter that reads the folder lazily at SIZE px RGB and draws
    10 batches of 32 (VmHWM: in a long test process, getrusage's peak carried the 10 GB the parent had reached). A fresh process rather than a fork: both measurements start from the same imports, and a fork
    of the test process could inherit a lock held by one of its threads (the suite's earlier tests start some)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", READ_FOLDER.format(size=SIZE), str(folder)], capture_output=True,
                         text=True, timeout=300, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    return int(out.stdout.split()[-1])


def _assert_rss_independent_of_size(tmp_path, big: int):
    small_rss = _peak_rss(write_folder(tmp_path / "small", 200))
    big_rss = _peak_rss(write_folder(tmp_path / "big", big))
    # The test can fail: the big folder decoded whole would exceed the 10% margin.
    assert big * 3 * SIZE * SIZE > 0.1 * small_rss
    assert big_rss < 1.1 * small_rss, (small_rss, big_rss)


@pytest.mark.slow  # 16 s: fresh interpreters reading a 20k-image folder; the default suite must fit 5 minutes
def test_peak_memory_does_not_grow_with_the_folder(tmp_path):
    _assert_rss_independent_of_size(tmp_path, 2000)


@pytest.mark.slow
def test_peak_memory_of_a_20k_image_folder(tmp_path):
    _assert_rss_independent_of_size(tmp_path, 20_000)


def test_distill_from_webdataset_shards_and_resume(tiny_teacher, tmp_path):
    """``fastdiff distill`` (cd: every update trains on data) from a shard folder; a run stopped after step 1 and
    resumed ends bit-identical to one that ran straight through (the draws need no reader state in the checkpoint)."""
    from safetensors.torch import load_file

    from fastdiff.cli import main

    shards = write_shards(tmp_path / "wds", sizes=(6, 6), caption=False, label=False)

    def distill(out, steps, *extra):
        items = [f"teacher.path={tiny_teacher}", f"output_dir={out}", "objective.name=cd", "data.name=webdataset",
                 f"data.path={shards}", f"train.max_steps={steps}", "train.batch_size=4", "train.checkpoint_every=1",
                 "train.log_every=1", "train.sample_every=1000", "train.num_sample_images=2", "train.ema_decay=0",
                 "train.lr_generator=1e-3"]
        assert main(["distill", *[a for item in items for a in ("--set", item)], *extra]) == 0
        return out

    straight = distill(tmp_path / "straight", 3)
    rows = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(np.isfinite(v) for row in rows for v in row.values())
    assert (straight / "student" / "fastdiff.json").is_file()
    part = distill(tmp_path / "part", 1)
    distill(part, 3, "--resume", "latest")
    name = "checkpoints/step-00000003/generator.safetensors"
    a, b = (load_file(str(run / name)) for run in (straight, part))
    start = load_file(str(straight / "checkpoints/step-00000001/generator.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], start[k]) for k in a)  # steps 2 and 3 did train


def test_latent_teacher_streams_a_captioned_folder(tmp_path):
    """A tiny Stable Diffusion teacher on a streamed folder: the VAE posteriors cached once (file-backed) give the
    latents that encoding every batch gives (the same indices and posterior noise per draw)."""
    import tiny_pipelines as tp

    from fastdiff.config import load_config
    from fastdiff.training import Trainer

    sd, images = tp.sd_pipeline(tmp_path / "sd"), tp.caption_folder(tmp_path / "images")

    def batches(cache: bool):
        cfg = load_config(None, [f"teacher.path={sd}", f"output_dir={tmp_path / str(cache)}", "objective.name=cd",
                                 "data.name=imagefolder", f"data.path={images}", "data.stream=true",
                                 f"data.cache_latents={str(cache).lower()}"])
        trainer = Trainer(cfg, progress=False)
        return [trainer._real(4) for _ in range(3)], trainer

    (cached, trainer), (encoded, _) = batches(True), batches(False)
    assert isinstance(trainer.real, StreamingImages) and trainer.real.images.shape[1:] == (8, tp.LATENT, tp.LATENT)
    for (x, cond), (y, cond_y) in zip(cached, encoded):
        assert x.shape == (4, 4, tp.LATENT, tp.LATENT)
        # The same VAE on the same pixels, batched differently: float32 rounding of a few hundred operations on
        # latents of magnitude ~1 (1.2e-7 x 1 x 1e2 ~ 1e-5; measured: equal, latents up to 0.8).
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cond["encoder_hidden_states"], cond_y["encoder_hidden_states"])
    assert not torch.allclose(cached[0][0], cached[1][0])  # successive draws are other samples


def _map_on_rank(rank: int, world: int, store: str, make, pipe) -> None:
    """A forked gloo process: map ``make()``'s images 4 at a time as process ``rank`` of ``world``."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    real, mapped_rows = make(), []

    def fn(x):  # another shape and dtype, as VAE posteriors have
        mapped_rows.append(len(x))
        return torch.cat([x.float() * 2 + 1, x.float().flip(-1)], dim=1)

    real.map_images(fn, chunk=4, rank=rank, world=world, device="cpu")
    pipe.send((real.images.numpy().copy(), sum(mapped_rows)))  # numpy: torch would share it through the child
    dist.destroy_process_group()


@pytest.mark.parametrize("source", ["memory", "shards"])
def test_latent_encoding_is_split_over_ranks(source, tmp_path):
    """With 2 processes each maps every other chunk (20 and 17 of 37 images) and both end with every result, equal
    to what one process maps alone (the same function on the same images: bit-identical)."""
    import multiprocessing

    shards = write_shards(tmp_path / "wds", sizes=(20, 17), caption=False, label=False)
    pixels = torch.randint(0, 256, (37, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))

    def make():
        if source == "memory":
            return RealImages(pixels.clone(), None)
        return real_images_for(data_cfg(shards), teacher(), seed=0)

    alone = make()
    alone.map_images(lambda x: torch.cat([x.float() * 2 + 1, x.float().flip(-1)], dim=1), chunk=4)
    ctx = multiprocessing.get_context("fork")
    pipes, children = [], []
    for rank in range(2):
        receive, send = ctx.Pipe(duplex=False)
        child = ctx.Process(target=_map_on_rank, args=(rank, 2, str(tmp_path / "pg"), make, send))
        child.start()
        pipes.append(receive)
        children.append(child)
    assert all(pipe.poll(120) for pipe in pipes), "a child process failed (its traceback is above)"
    results = [pipe.recv() for pipe in pipes]
    for child in children:
        child.join(30)
    assert [rows for _, rows in results] == [20, 17]
    for mapped, _ in results:
        assert mapped.shape == (37, 2, 8, 8) and torch.equal(torch.from_numpy(mapped), alone.images)


@pytest.mark.slow
def test_two_processes_draw_what_one_accumulating_process_draws(tiny_teacher, tmp_path):
    """Two gloo CPU processes (test_sharding.cli_on_processes) streaming shards at batch 2 each against one process
    accumulating two micro-batches of 2 (cd: one draw per micro-batch): the same global batch, so the first update's
    gradient norm agrees to float32 summation order (~1e4 terms x 1.2e-7 ~ 1e-3 relative); a run whose ranks drew
    the same samples, like one process at batch 2, sees another batch and misses by far more."""

    shards = write_shards(tmp_path / "wds", sizes=(16, 16), caption=False, label=False)
    items = ["objective.name=cd", "data.name=webdataset", f"data.path={shards}", "train.max_steps=1",
             "train.batch_size=2", "train.log_every=1", "train.sample_every=1000", "train.num_sample_images=2",
             "train.ema_decay=0", f"teacher.path={tiny_teacher}"]

    def sets(out, *extra):
        return [a for item in [*items, f"output_dir={out}", *extra] for a in ("--set", item)]

    def grad_norm(out):
        return json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["grad_norm_generator"]

    from test_sharding import cli_on_processes

    cli_on_processes("distill", *sets(tmp_path / "two"))
    from fastdiff.cli import main

    assert main(["distill", *sets(tmp_path / "acc", "train.gradient_accumulation=2")]) == 0
    assert main(["distill", *sets(tmp_path / "half")]) == 0
    two, acc, half = (grad_norm(tmp_path / r) for r in ("two", "acc", "half"))
    assert abs(two / acc - 1) < 1e-3, (two, acc)
    assert abs(half / acc - 1) > 1e-2, (half, acc)
