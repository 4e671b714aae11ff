"""Launched commands' rules, checked in one process without a launcher: P processes are played in turn (each
collective ``gather_object`` hands process 0 what the others sent at the same call; a barrier of process 0 runs the
others to the end) or, where each process checks after the last barrier (pairs), run as threads with a real barrier;
``accelerate.PartialState`` is a stand-in where ``_launched_part`` would join a group.
Inception's place is taken by a cheap stand-in extractor (exact float64 features), so nothing here needs weights.

Each test names the mutants of the launched code (a flipped comparison, a dropped barrier or argument, ...) that it
fails under; tests/test_fid.py and tests/test_eval_during_training.py hold the rest."""
import contextlib
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fastdiff import cli
from fastdiff.cli import main
from fastdiff.errors import FastdiffError
from fastdiff.evaluation.metrics import ReferenceStats

from conftest import TINY_CLIP_NAME, small_trainer


class StandIn:
    """Inception's place: 6 features per image, tanh of fixed float64 weights on its pixels (exact and cheap)."""

    num_features, extractor_id, resize = 6, "stand-in", "nv-bilinear"

    def __init__(self, *args, **kwargs):
        pass

    def to(self, device):
        return self

    def __call__(self, batch):
        x = batch.double().flatten(1) / 255
        w = torch.arange(x.shape[1] * 6, dtype=torch.float64).reshape(x.shape[1], 6).cos()
        return torch.tanh(x @ w)


class Played:
    """P launched processes played in turn in this one: ``rank`` is the one running now; ``gather`` stands for
    accelerate's ``gather_object([obj])``: a process other than 0 records what it sends (its result lists only its
    own object, the rest None: what it receives is never used), process 0 receives, at its k-th call, everyone's k-th
    object in process order. So the others must be played before process 0 reaches each gather."""

    def __init__(self, size: int = 2, device=torch.device("cpu")):
        self.size, self.rank, self.device = size, 0, device  # device: what _launched_part gives each process
        self.sent = {r: [] for r in range(size)}

    def gather(self, objects):
        assert isinstance(objects, list) and len(objects) == 1, objects  # gather_object([obj])
        self.sent[self.rank].append(objects[0])
        if self.rank == 0:
            k = len(self.sent[0]) - 1
            return [self.sent[r][k] for r in range(self.size)]
        return [objects[0] if r == self.rank else None for r in range(self.size)]

    @contextlib.contextmanager
    def as_rank(self, rank: int):
        before, self.rank = self.rank, rank
        try:
            yield
        finally:
            self.rank = before

    def install(self, monkeypatch, launched: bool = True):
        import accelerate.utils

        monkeypatch.setattr(accelerate.utils, "gather_object", self.gather)
        if launched:
            monkeypatch.setattr(cli, "_launched_part", lambda device: ((self.rank, self.size), self.device))


class Threads:
    """P launched processes as threads of this one, for code whose processes wait for each other: ``wait`` is a
    barrier (each call recorded by rank), ``gather`` a collective ``gather_object([obj])`` (everyone's, in process
    order, on every process), ``rank`` the calling thread's. ``run(fn)`` runs fn(rank) on each: {rank: its result or
    the exception it raised}."""

    def __init__(self, size: int = 2, parties: int | None = None):
        import threading

        self.size, self.local = size, threading.local()
        self.barrier = threading.Barrier(parties or size, timeout=5)  # one that never comes: broken, not hung
        self.box, self.waits = [None] * size, []

    @property
    def rank(self):
        return self.local.rank

    def wait(self):
        self.waits.append(self.rank)
        self.barrier.wait()

    def gather(self, objects):
        assert isinstance(objects, list) and len(objects) == 1, objects
        self.box[self.rank] = objects[0]
        self.barrier.wait()
        got = list(self.box)
        self.barrier.wait()
        return got

    def run(self, fn, ranks=None):
        """Each thread loads its models one at a time: diffusers builds them under accelerate's
        ``init_empty_weights``, which swaps ``nn.Module.register_parameter`` process-wide and puts back what it found.
        Two threads inside it at once could leave the meta-device version in place for good, and every module made
        later in this process (the forked FSDP tests' networks among them) had meta parameters: a flaky failure of
        tests that ran after these on the same pytest worker."""
        import threading

        import accelerate
        from torch import nn

        results, real, lock = {}, accelerate.init_empty_weights, threading.Lock()
        register = (nn.Module.register_parameter, nn.Module.register_buffer)

        @contextlib.contextmanager
        def one_at_a_time(*args, **kwargs):
            with lock, real(*args, **kwargs):
                yield

        def body(rank):
            self.local.rank = rank
            try:
                results[rank] = fn(rank)
            except BaseException as exc:  # noqa: BLE001 (the caller compares it)
                results[rank] = exc
        threads = [threading.Thread(target=body, args=(r,)) for r in (range(self.size) if ranks is None else ranks)]
        accelerate.init_empty_weights = one_at_a_time
        try:
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        finally:
            accelerate.init_empty_weights = real
        assert (nn.Module.register_parameter, nn.Module.register_buffer) == register, "a loader left its patch behind"
        return results


def recording_bars(monkeypatch, played=None, module=None, name="progress"):
    """Progress bars recorded (total, enabled, images counted, the rank that made it) instead of drawn."""
    import fastdiff.machine

    bars = []

    def progress(iterable=None, *, total=None, desc=None, unit="it", enabled=True):
        bar = SimpleNamespace(total=total, enabled=enabled, n=0, rank=played.rank if played else 0)

        def update(k=1):
            bar.n += k
        bar.update = update
        bars.append(bar)
        return contextlib.nullcontext(bar)
    monkeypatch.setattr(module or fastdiff.machine, name, progress)
    return bars


def _images(tmp_path, n=9):
    images = np.random.default_rng(0).integers(0, 256, (n, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "real.npz", images=images)
    return tmp_path / "real.npz"


# --- per_batch: the rounds, the gather and the timings ---------------------------------------------------------------

def test_per_batch_makes_each_share_and_the_main_process_consumes_all_in_batch_order(tmp_path, monkeypatch):
    """9 images in batches of 2 on 2 processes: process 1 makes batches 1, 3 (starts 2, 6), process 0 batches 0, 2, 4;
    only process 0 consumes, every batch in order, and returns the slowest process's timings; its bar counts its own
    share. Kills: E1 (count floored: the last batch lost), E4 (rounds of one batch), E5 (index <= count), E6 (start
    from the round, not the batch), E8 (the others consume too), E9 (the None guard dropped), E10 / E11 (who returns
    the timings), E12 (min of the timings), E13 (own timings only), E15 (bar total the whole count), E28 (gather of
    the object, not of [object])."""
    from fastdiff.evaluation import evaluate
    from fastdiff.evaluation.images import open_source

    source = open_source(str(_images(tmp_path)))
    played = Played(2)
    played.install(monkeypatch, launched=False)
    bars = recording_bars(monkeypatch, played, evaluate, "progress_bar")
    made, consumed = {0: [], 1: []}, {0: [], 1: []}

    def fn(batch, start):
        made[played.rank].append(start)
        return start, batch.clone()

    def run(rank):
        with played.as_rank(rank):
            return evaluate.per_batch(source, 9, 2, None, fn, consumed[rank].append, "x", True, (rank, 2))
    assert run(1) is None
    assert played.sent[1][-1].keys() == {"image_seconds", "feature_seconds"}
    played.sent[1][-1] = {"image_seconds": 1e6, "feature_seconds": 2e6}  # process 1 was the slow one
    timing = run(0)
    assert timing == {"image_seconds": 1e6, "feature_seconds": 2e6}
    assert made == {0: [0, 4, 8], 1: [2, 6]} and consumed[1] == []
    alone = list(source.batches(9, 2))
    assert [start for start, _ in consumed[0]] == [0, 2, 4, 6, 8]
    assert all(torch.equal(batch, a) for (_, batch), a in zip(consumed[0], alone))
    assert [(b.rank, b.total, b.n, b.enabled) for b in bars] == [(1, 4, 4, False), (0, 5, 5, True)]


# --- the launched CLI commands: ref-stats, fid, clip-score -----------------------------------------------------------

def _played_cli(played, argv, capsys):
    """``fastdiff ARGV`` as processes 1 .. P-1, then 0, would run it: (each process's exit code and stdout)."""
    codes, outs = {}, {}
    for rank in [*range(1, played.size), 0]:
        with played.as_rank(rank):
            codes[rank] = main([str(a) for a in argv])
        outs[rank] = capsys.readouterr().out
    return codes, outs


def test_launched_ref_stats_and_fid_are_one_process_s_written_once(tmp_path, monkeypatch, capsys):
    """`fastdiff ref-stats` and `fastdiff fid` on 2 played processes: process 1 writes and prints nothing, process 0
    writes the single process's statistics and scores (exactly: the same float64 sums in the same order) and says
    `processes: 2`. Kills: E18 (the others return their empty statistics), E19 / C23 (make_reference / cmd_ref_stats
    without the None check), E20 / C24 (the share not passed to source_features / make_reference), E21 / C25
    (evaluate / cmd_fid without the None check), E22 (processes = the rank), E23 / C26 (evaluate without the share),
    C29 (fid's extractor on the --device default, not on the process's device)."""
    devices = []
    monkeypatch.setattr(cli, "_extractor", lambda args, resize, device: (devices.append(device), StandIn())[1])
    real = _images(tmp_path)
    assert main([str(a) for a in ["ref-stats", real, "--out", tmp_path / "alone.npz", "--batch-size", "2",
                                  "--kid-features", "9", "-q"]]) == 0
    assert main([str(a) for a in ["fid", real, "--ref", tmp_path / "alone.npz", "--batch-size", "2", "--json",
                                  tmp_path / "alone.json", "-q"]]) == 0
    capsys.readouterr()
    played = Played(2)
    played.install(monkeypatch)
    codes, outs = _played_cli(played, ["ref-stats", real, "--out", tmp_path / "ref.npz", "--batch-size", "2",
                                       "--kid-features", "9", "-q"], capsys)
    assert codes == {1: 0, 0: 0} and outs[1] == "" and outs[0].startswith(f"wrote {tmp_path / 'ref.npz'}: 9 images")
    a, b = ReferenceStats.load(tmp_path / "alone.npz"), ReferenceStats.load(tmp_path / "ref.npz")
    assert np.array_equal(a.mu, b.mu) and np.array_equal(a.sigma, b.sigma) and np.array_equal(a.features, b.features)
    assert (a.n, a.name, a.image_shape) == (b.n, b.name, b.image_shape)

    played = Played(2, device=torch.device("cpu", 1))  # each process's own device, not the --device default
    played.install(monkeypatch)
    devices.clear()
    codes, outs = _played_cli(played, ["fid", real, "--ref", tmp_path / "alone.npz", "--batch-size", "2", "--json",
                                       tmp_path / "launched.json", "-q"], capsys)
    assert codes == {1: 0, 0: 0} and outs[1] == "" and outs[0].startswith("FID@9(real9, nv-bilinear) = ")
    alone, launched = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("alone", "launched"))
    assert launched["processes"] == 2 and "processes" not in alone and devices == [torch.device("cpu", 1)] * 2
    for key in ("fid", "kid", "kid_std", "n", "fid_label", "kid_label"):
        assert launched[key] == alone[key], key
    assert [item[0] for item in played.sent[1][:-1] if item is not None] == [1, 3]  # its batches only


def test_launched_clip_score_is_one_process_s_reported_once(tiny_clip, tmp_path, monkeypatch, capsys):
    """`fastdiff clip-score` on 2 played processes, one prompt per image: process 1 reports nothing, process 0 the
    single process's mean and std exactly (the same float64 values in the same order) with `processes: 2`, each image
    scored against its own prompt. Kills: E6 (prompts paired by the round's start), E26 (no processes key), E27 / C28
    (clip_score without the share), C27 (cmd_clip_score without the None check)."""
    config, weights = tiny_clip
    images = np.random.default_rng(1).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "rgb.npz", images=images)
    (tmp_path / "p.txt").write_text("".join(f"prompt number {i}\n" for i in range(5)))
    common = ["--prompts", tmp_path / "p.txt", "--clip-model", TINY_CLIP_NAME, "--clip-config", config,
              "--clip-weights", weights, "--device", "cpu", "--batch-size", "2", "-q"]
    assert main([str(a) for a in ["clip-score", tmp_path / "rgb.npz", "--json", tmp_path / "alone.json", *common]]) == 0
    capsys.readouterr()
    played = Played(2)
    played.install(monkeypatch)
    codes, outs = _played_cli(played, ["clip-score", tmp_path / "rgb.npz", "--json", tmp_path / "launched.json",
                                       *common], capsys)
    assert codes == {1: 0, 0: 0} and outs[1] == "" and outs[0].startswith("CLIPScore@5(")
    alone, launched = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("alone", "launched"))
    assert launched.pop("processes") == 2 and launched == alone


def test_clip_score_pairs_each_batch_with_its_own_prompts(tiny_clip, tmp_path):
    """clip_score in batches of 2 of 5 images with 5 prompts: batch b's images against prompts 2b, 2b + 1, the same
    scorer calls by hand, so the same float32 values and float64 mean exactly. Kills: E25 (every batch paired with
    the first prompts)."""
    from fastdiff.evaluation.clip_score import ClipScorer
    from fastdiff.evaluation.evaluate import clip_score
    from fastdiff.evaluation.images import open_source

    config, weights = tiny_clip
    scorer = ClipScorer(TINY_CLIP_NAME, weights, config)
    images = np.random.default_rng(2).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "rgb.npz", images=images)
    prompts = ["a red shoe", "a blue bag", "a green hat", "a black coat", "a white sock"]
    result = clip_score(open_source(str(tmp_path / "rgb.npz")), scorer, prompts, None, 2, progress=False)
    batches = torch.from_numpy(images).permute(0, 3, 1, 2)
    by_hand = np.concatenate([scorer.scores(batches[s:s + 2], prompts[s:s + 2]).cpu().numpy()
                              for s in (0, 2, 4)]).astype(np.float64)
    assert result["clip_score"] == float(by_hand.mean()) and result["n"] == 5


def test_kid_subset_size_reaches_the_kid(tmp_path):
    """evaluate's kid_subset_size is the subset size its KID is drawn with. Kills: E24 (not passed on: 1000)."""
    from fastdiff.evaluation.evaluate import evaluate, make_reference, source_features
    from fastdiff.evaluation.images import open_source
    from fastdiff.evaluation.metrics import kernel_inception_distance

    source = open_source(str(_images(tmp_path)))
    ref = make_reference(source, StandIn(), 9, 2, kid_features=9, progress=False)
    stats, _ = source_features(source, StandIn(), 9, 2, keep=9, progress=False)
    result = evaluate(source, ref, StandIn(), 9, 2, kid_subset_size=4, progress=False)
    small = kernel_inception_distance(stats.features(), ref.features, subset_size=4)
    assert (result["kid"], result["kid_std"]) == small != kernel_inception_distance(stats.features(), ref.features)


# --- _launched_part and the barrier ----------------------------------------------------------------------------------

class FakeState:
    """accelerate.PartialState's place: the group a launched process would join (records its cpu flag and barriers)."""
    made, waits, size = [], [], 2

    def __init__(self, cpu=False, **kwargs):
        FakeState.made.append(cpu)
        self.num_processes, self.process_index = FakeState.size, 1
        self.device = torch.device("cpu") if cpu else torch.device("cuda", 1)

    def wait_for_everyone(self):
        FakeState.waits.append(1)


def test_launched_part_joins_the_group_and_gives_each_process_its_device(monkeypatch):
    """Under WORLD_SIZE=2 (a GPU machine pretended): process 1 of 2 on the launcher's GPU for it with no --device or
    --device cuda; on the CPU (and the group joined as CPU processes) with --device cpu; a group of another size is
    refused; alone (WORLD_SIZE 1) no group is joined. Kills: C1 (world < 1), C2 (every cuda refused), C3 (--device
    cuda not the launcher's GPU for the process), C5 (--device cpu does not join as CPU processes), C6 (a smaller
    group let through), C7 (share swapped)."""
    import accelerate

    monkeypatch.setattr(accelerate, "PartialState", FakeState)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    monkeypatch.setattr(FakeState, "made", [])
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert cli._launched_part("cpu") == (None, torch.device("cpu")) and FakeState.made == []
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli._launched_part(None) == ((1, 2), torch.device("cuda", 1))
    assert cli._launched_part("cuda") == ((1, 2), torch.device("cuda", 1))
    assert cli._launched_part("cpu") == ((1, 2), torch.device("cpu"))
    assert FakeState.made == [False, False, True]
    for size in (1, 3):
        monkeypatch.setattr(FakeState, "size", size)
        with pytest.raises(FastdiffError, match=f"launched on 2 processes but joined a group of {size}"):
            cli._launched_part(None)


def test_launched_part_refuses_devices_a_launcher_does_not_give_out(monkeypatch):
    """Under WORLD_SIZE=2 (a GPU machine pretended): a device type other than cpu / cuda is refused before any group
    is joined (was the mutation audit's C4 survivor: it ran every process there); --device cuda under
    ``accelerate launch --cpu`` is refused (it ran on the CPU without a word), and without --device the launcher's
    --cpu is followed; --device cpu:0 joins as a CPU process."""
    import accelerate

    monkeypatch.setattr(accelerate, "PartialState", FakeState)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(FakeState, "made", [])
    monkeypatch.setattr(FakeState, "size", 2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    with pytest.raises(FastdiffError, match="--device meta under a launcher: launched processes run on cpu or cuda"):
        cli._launched_part("meta")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    with pytest.raises(FastdiffError, match="--device cuda but the launcher was told to use the CPU"):
        cli._launched_part("cuda")
    assert FakeState.made == []
    assert cli._launched_part(None) == ((1, 2), torch.device("cpu"))
    assert cli._launched_part("cpu") == ((1, 2), torch.device("cpu"))
    monkeypatch.delenv("ACCELERATE_USE_CPU")
    # cpu:0 is a CPU too: the group joined as CPU processes (gloo), no GPU taken (found by review: it joined NCCL)
    assert cli._launched_part("cpu:0") == ((1, 2), torch.device("cpu", 0))
    assert FakeState.made == [True, True, True]


def test_the_barrier_is_the_group_s_and_nothing_alone(monkeypatch):
    """Kills: C8 (the barrier taken alone and skipped launched)."""
    import accelerate

    monkeypatch.setattr(accelerate, "PartialState", FakeState)
    monkeypatch.setattr(FakeState, "waits", [])
    cli._wait_for_everyone(None)
    assert FakeState.waits == []
    cli._wait_for_everyone((1, 2))
    assert FakeState.waits == [1]


# --- fastdiff sample and pairs launched ------------------------------------------------------------------------------

def _barriers(played, monkeypatch, others):
    """cli._wait_for_everyone played: process 0's first barrier runs ``others()`` (the other processes, to their end);
    every process's barriers are recorded."""
    seen = []

    def wait(part):
        seen.append(played.rank)
        if played.rank == 0 and seen.count(0) == 1:
            others()
    monkeypatch.setattr(cli, "_wait_for_everyone", wait)
    return seen


def test_launched_sample_writes_the_single_process_images_each_its_share(tiny_teacher, tmp_path, monkeypatch, capsys):
    """`fastdiff sample` (5 images, batches of 2) on 2 played processes: process 1 writes batch 1 into staging and
    leaves it there, process 0 batches 0 and 2 and moves all in: the single process's PNGs, byte for byte; each
    process passes both barriers and counts its own share on a bar, process 0's drawn. A process whose images never
    reach staging (another machine) is an error that leaves --out empty. Kills: C9 (main inverted), C11 / C12 (a
    barrier dropped), C13 (the others count staging too), C14 (too few images let through), C15 (the others remove
    staging), C16 (the share not passed to sample_model)."""
    import fastdiff.inference.sampling as sampling

    argv = ["sample", tiny_teacher, "--num", "5", "--steps", "1", "--batch-size", "2", "--device", "cpu"]
    assert main([*argv, "--out", str(tmp_path / "alone"), "-q"]) == 0
    played = Played(2)
    played.install(monkeypatch)
    saves = []
    save = sampling.save_pngs
    monkeypatch.setattr(sampling, "save_pngs", lambda images, folder, start: (saves.append((played.rank, start)),
                                                                              save(images, folder, start)))
    bars = recording_bars(monkeypatch, played)
    codes = {}

    def process_1():
        with played.as_rank(1):
            codes[1] = main([*argv, "--out", str(tmp_path / "launched")])
    seen = _barriers(played, monkeypatch, process_1)
    codes[0] = main([*argv, "--out", str(tmp_path / "launched")])
    assert codes == {1: 0, 0: 0}, capsys.readouterr().err
    names = sorted(p.name for p in (tmp_path / "alone").iterdir())
    assert names == [f"{i:06d}.png" for i in range(5)] == sorted(p.name for p in (tmp_path / "launched").iterdir())
    for name in names:
        assert (tmp_path / "alone" / name).read_bytes() == (tmp_path / "launched" / name).read_bytes()
    assert not list(tmp_path.glob(".*partial"))
    assert sorted(saves) == [(0, 0), (0, 4), (1, 2)] and sorted(seen) == [0, 0, 1, 1]
    assert sorted((b.rank, b.total, b.n, b.enabled) for b in bars) == [(0, 3, 3, True), (1, 2, 2, False)]

    seen = _barriers(played, monkeypatch, lambda: None)  # process 1 on a machine whose staging process 0 never sees
    assert main([*argv, "--out", str(tmp_path / "lost"), "-q"]) == 2
    assert "only 3 of 5 images reached" in capsys.readouterr().err and not (tmp_path / "lost").exists()
    assert not list(tmp_path.glob(".*partial"))


@pytest.fixture(scope="module")
def gmm_dir(tmp_path_factory):
    from fastdiff.models.analytic import GaussianMixtureModel

    path = tmp_path_factory.mktemp("gmm-cond")
    GaussianMixtureModel(class_conditional=True).save_teacher(path)
    return path


PAIRS = dict(num=300, steps=4, shard_size=128, batch_size=50, sampler="ddim")  # 3 shards: 128, 128, 44 rows


def _same_shards(a, b, n=3):
    from fastdiff.training.pairs import shard_name

    for i in range(n):
        x, y = load_file(str(a / shard_name(i))), load_file(str(b / shard_name(i)))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), i


def test_make_pairs_shares_the_shards_after_the_main_process_prepared_the_folder(gmm_dir, tmp_path):
    """make_pairs on 2 processes (threads, ``wait`` a barrier): process 0 opens the folder before anyone writes,
    process 1 makes shard 1, process 0 shards 0 and 2: the single process's folder, shard for shard; each passes two
    barriers and counts its own shards. On 3 processes whose third never wrote (another machine), the last shard's
    absence is an error on each. Kills: P1 (the main process does not open the folder), P2 / P4 (a barrier dropped),
    P3 (the other shards made), P5 (the missing check inverted), P6 (the last shard not checked)."""
    from fastdiff.training.pairs import make_pairs

    assert make_pairs(str(gmm_dir), tmp_path / "alone", **PAIRS) == (3, 0)
    procs = Threads(2)
    made = procs.run(lambda rank: make_pairs(str(gmm_dir), tmp_path / "launched", **PAIRS, part=(rank, 2),
                                             wait=procs.wait))
    assert made == {0: (2, 0), 1: (1, 0)} and sorted(procs.waits) == [0, 0, 1, 1]
    _same_shards(tmp_path / "alone", tmp_path / "launched")
    assert json.loads((tmp_path / "alone" / "manifest.json").read_text()) == \
        json.loads((tmp_path / "launched" / "manifest.json").read_text())

    procs = Threads(3, parties=2)  # process 2 writes where processes 0 and 1 cannot see
    out = procs.run(lambda rank: make_pairs(str(gmm_dir), tmp_path / "three", **PAIRS, part=(rank, 3),
                                            wait=procs.wait), ranks=(0, 1))
    for rank in (0, 1):
        assert isinstance(out[rank], FastdiffError), out
        assert "1 of 3 shards are not there after every process finished" in str(out[rank])


def test_launched_pairs_reports_everyone_s_counts_once(gmm_dir, tmp_path, monkeypatch):
    """`fastdiff pairs` on 2 processes (threads): the single process's folder; process 0 prints the summed counts,
    process 1 nothing; each counts its own rows on a bar, process 0's drawn. Kills: C19 (bar total of every shard),
    C20 (the share not passed to make_pairs), C21 (who prints inverted), C22 (process 0's counts only)."""
    argv = ["pairs", "--teacher", str(gmm_dir), "--num", "300", "--shard-size", "128", "--batch-size", "50",
            "--steps", "4", "--sampler", "ddim", "--device", "cpu"]
    assert main([*argv, "--out", str(tmp_path / "alone"), "-q"]) == 0
    import accelerate.utils

    procs = Threads(2)
    monkeypatch.setattr(accelerate.utils, "gather_object", procs.gather)
    monkeypatch.setattr(cli, "_launched_part", lambda device: ((procs.rank, 2), torch.device("cpu")))
    monkeypatch.setattr(cli, "_wait_for_everyone", lambda part: procs.wait())
    printed = []
    monkeypatch.setattr(cli, "print", lambda *a, **kw: printed.append((procs.rank, " ".join(map(str, a)))),
                        raising=False)
    bars = recording_bars(monkeypatch, procs)
    codes = procs.run(lambda rank: main([*argv, "--out", str(tmp_path / "launched")]))
    assert codes == {0: 0, 1: 0} and sorted(procs.waits) == [0, 0, 1, 1]
    assert printed == [(0, f"{tmp_path / 'launched'}: 300 pairs (3 shards made now, 0 already there)")]
    _same_shards(tmp_path / "alone", tmp_path / "launched")
    assert sorted((b.rank, b.total, b.n, b.enabled) for b in bars) == [(0, 172, 172, True), (1, 128, 128, False)]


# --- the pipeline-driven samplers' shares ----------------------------------------------------------------------------

def test_a_fada_sampler_s_share_is_every_pth_batch_with_its_seed_labels_and_prompts():
    """MultiGuidanceSampler.sample(part=(1, 2)) on 7 images in batches of 2 calls its pipeline for batches 1 and 3
    exactly as alone (seed + b, labels start.. mod the classes, the batch's prompts). Kills: S5 (the share ignored)."""
    from fastdiff.inference.sampling import MultiGuidanceSampler

    calls = []
    sampler = MultiGuidanceSampler.__new__(MultiGuidanceSampler)
    sampler.num_classes, sampler.scales = 3, (1.5, 2.5)
    sampler.text = lambda prompts: {"encoder_hidden_states": list(prompts)}

    def pipe(labels, text, *, generator, **kwargs):
        calls.append((labels.tolist(), text, generator.initial_seed(), kwargs["class_guidance_scale"]))
        return SimpleNamespace(images=np.zeros((len(text), 8, 8, 1), np.float32))
    sampler.pipe = pipe
    prompts = [f"p{i}" for i in range(7)]
    starts = [start for start, _ in sampler.sample(7, 2, 10, 2, prompts, part=(1, 2))]
    share = list(calls)
    calls.clear()
    list(sampler.sample(7, 2, 10, 2, prompts))
    assert starts == [2, 6] and share == calls[1::2] and [c[2] for c in share] == [11, 13]


# --- train.eval_every on several processes ---------------------------------------------------------------------------

@pytest.fixture
def stand_in_reference(tmp_path):
    ref = tmp_path / "ref.npz"
    features = np.random.default_rng(0).standard_normal((12, 6)).astype(np.float32)
    ReferenceStats(mu=np.zeros(6), sigma=np.eye(6), n=12, extractor="stand-in", resize="nv-bilinear",
                   image_shape=(1, 8, 8), name="x12", features=features).save(ref)
    return ref


def _processes(monkeypatch, rank, size):
    from accelerate import Accelerator

    monkeypatch.setattr(Accelerator, "num_processes", property(lambda self: size))
    monkeypatch.setattr(Accelerator, "process_index", property(lambda self: rank))
    monkeypatch.setattr(Accelerator, "is_main_process", property(lambda self: rank == 0))


def test_the_evaluator_s_share_comes_from_the_accelerator_sharded_or_not(
        tiny_teacher, stand_in_reference, tmp_path, monkeypatch):
    """On 2 processes, process 1's evaluator takes share (1, 2) and loads its extractor, replicated or sharded (run.shards
    set: the student is gathered on every process for it); alone it takes none. Kills: D3 (share swapped), D4 (the
    others load no extractor), and a sharded run left to the main process (before 2026-12-01 it was)."""
    from fastdiff.evaluation import during_training
    from fastdiff.evaluation.during_training import TrainingEvaluator

    monkeypatch.setattr(during_training, "InceptionFeatures", StandIn)
    trainer = small_trainer(tiny_teacher, tmp_path / "run", "train.eval_every=1",
                            f"train.eval_reference={stand_in_reference}", "train.eval_images=4")
    _processes(monkeypatch, 1, 2)
    evaluator = TrainingEvaluator(trainer)
    assert evaluator.part == (1, 2) and evaluator.every_process and isinstance(evaluator.extractor, StandIn)
    trainer.shards = object()
    evaluator = TrainingEvaluator(trainer)
    assert evaluator.part == (1, 2) and evaluator.every_process and isinstance(evaluator.extractor, StandIn)
    _processes(monkeypatch, 0, 1)
    evaluator = TrainingEvaluator(trainer)
    assert evaluator.part is None and not evaluator.every_process and isinstance(evaluator.extractor, StandIn)


def test_every_process_takes_part_in_a_replicated_evaluation(tiny_teacher, tmp_path, monkeypatch):
    """Trainer.evaluate calls the evaluator on a process other than the main one when it is every_process's, on the
    main one always, and on no other otherwise. Kills: L1 (the others skip it: the main process waits at the gather
    for ever), L2 (the main one skips an every-process evaluation)."""
    import io

    trainer = small_trainer(tiny_teacher, tmp_path / "run")
    calls = []
    for rank, every, called in ((1, True, True), (0, True, True), (1, False, False), (0, False, True)):
        _processes(monkeypatch, rank, 2)
        trainer.evaluator = type("E", (), {"every_process": every, "__call__": lambda self, run: calls.append(1)})()
        calls.clear()
        trainer.evaluate(io.StringIO())
        assert bool(calls) == called, (rank, every)


def _mode_hooks(gen):
    """Record, at each forward of any of ``gen``'s modules, whether it was in training mode."""
    seen = []
    for m in gen.modules():
        m.register_forward_pre_hook(lambda module, args: seen.append(module.training))
    return seen


def test_evaluations_and_grids_run_the_student_in_eval_mode_and_restore_it(tiny_teacher, stand_in_reference, tmp_path,
                                                                           monkeypatch):
    """A student in training mode is sampled in eval mode (dropout off, as its export) by train.eval_every and by the
    sample grids, and is in training mode again after. Kills: D7 (the evaluator without as_exported), O4 (the grid
    without it)."""
    from fastdiff.evaluation import during_training
    from fastdiff.evaluation.during_training import TrainingEvaluator
    from fastdiff.training.outputs import sample_grid

    monkeypatch.setattr(during_training, "InceptionFeatures", StandIn)
    trainer = small_trainer(tiny_teacher, tmp_path / "run", "train.eval_every=1",
                            f"train.eval_reference={stand_in_reference}", "train.eval_images=4",
                            "train.num_sample_images=2")
    gen = trainer.export_generator()
    monkeypatch.setattr(trainer, "export_generator", lambda: gen)
    seen = _mode_hooks(gen)
    gen.train()
    result = TrainingEvaluator(trainer)(trainer)
    assert result["n"] == 4 and seen and not any(seen) and gen.training
    seen.clear()
    sample_grid(trainer)
    assert seen and not any(seen) and all(m.training for m in gen.modules())


def test_as_exported_restores_each_submodule_s_own_mode():
    """A network partly in eval mode (a frozen part) leaves as_exported as it came in, module by module, and is in
    eval mode inside. Kills: O5 (every module left in training mode)."""
    from fastdiff.training.outputs import as_exported

    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5), torch.nn.Sequential(torch.nn.Linear(2, 2)))
    net[2].eval()
    before = [m.training for m in net.modules()]
    with as_exported(net):
        assert not any(m.training for m in net.modules())
    assert [m.training for m in net.modules()] == before == [True, True, True, False, False]


def test_a_config_path_that_is_not_there_is_never_looked_up_as_a_named_config(tmp_path, monkeypatch):
    """--config with a path (a folder in it, or a .yaml / .yml name) that is no file stops as not found; a bare name is
    looked up among the named configs. Kills: K3 (a .yml name looked up as named config "x.yml")."""
    from fastdiff.config import load_config

    monkeypatch.chdir(tmp_path)
    for name in ("missing.yaml", "missing.yml", "some/dir/missing", str(tmp_path / "missing")):
        with pytest.raises(FastdiffError, match=f"^config file {name} not found$"):
            load_config(name)
    with pytest.raises(FastdiffError, match="'missing' is neither a file nor a named config"):
        load_config("missing")
