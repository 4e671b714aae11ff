"""f-distill's density-ratio statistics on 2 gloo CPU processes: the per-level bin counts and ratio sums and the sum of
``h`` are all-reduced (FastGen f_distill.py ``_get_f_div_weighting_h``, its ``world_size() > 1`` branches), so after
each step every process holds the same bins, equal to one process's on the whole batch, and ``h`` is normalised by
the global batch's mean. Without the all-reduce each process binned its own micro-batch and the bins (checkpointed
from the main process only) drifted apart. The weights go through ``FDistill.f_weights`` itself."""
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from diffusers import DDPMScheduler

from fastdiff.models.schedule import schedule_from_scheduler
from fastdiff.objectives.fdistill import DensityRatio, FDistill
from test_sharding import WORLD, forked, gloo_process

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")

BATCH, STEPS, EMA = 64, 3, 0.5  # the global batch; EMA 0.5 (FastGen's ImageNet-64) carries the bins over the steps
EPS32 = torch.finfo(torch.float32).eps


def _objective():
    """What ``FDistill.f_weights`` reads of its objective: the ratio module, the teacher's schedule, the drawn range."""
    schedule = schedule_from_scheduler(DDPMScheduler())
    return SimpleNamespace(ratio=DensityRatio(bins=10, ema_rate=EMA), teacher=SimpleNamespace(schedule=schedule),
                           min_t=0.02, max_t=0.98, divergence="js")


def _batch(step: int, schedule) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of one step: logits and noise levels. The two halves (one per process) differ: the first's
    levels fill bins 0-5 and its logits sit higher, the second's fill bins 4-8 (bin 9 stays empty), so per-process
    bins and means would differ from the global ones. One NaN logit in the second half stays out of every
    statistic."""
    g = torch.Generator().manual_seed(100 + step)
    half = BATCH // 2
    logits = torch.cat([4 * torch.randn(half, generator=g) + 1, 4 * torch.randn(half, generator=g) - 1])
    logits[half + 3] = float("nan")
    t = torch.cat([torch.randint(20, 560, (half,), generator=g), torch.randint(400, 860, (half,), generator=g)])
    return logits, schedule.sigma_at(t)


def _worker(rank: int, port: int, folder: str) -> None:
    with gloo_process(rank, port):
        obj = _objective()
        mine = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
        out = {"bins": [], "h": []}
        for step in range(STEPS):
            logits, sigma = _batch(step, obj.teacher.schedule)
            out["h"].append(FDistill.f_weights(obj, logits[mine], sigma[mine]))
            out["bins"].append(obj.ratio.bins.clone())
        torch.save(out, Path(folder) / f"rank{rank}.pt")


def test_ratio_bins_and_h_use_the_global_batch_on_every_process(tmp_path):
    """~3 s on one core (two forked processes and a gloo group)."""

    forked(_worker, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    obj = _objective()  # one process, the whole batch
    for step in range(STEPS):
        logits, sigma = _batch(step, obj.teacher.schedule)
        h = FDistill.f_weights(obj, logits, sigma)
        # The bins: the same on both processes and bit-equal to one process's. The all-reduced statistics are exact
        # in float64 whatever the order of summation: counts are integers, and each ratio is a float32 in [0.1, 20]
        # (a multiple of 2^-27, the ulp of float32 at 0.1) so sums of up to 64 of them (< 2^11) need 38 bits of the
        # 53; the float32 EMA after them is the same operations on the same values.
        for rank in ranks:
            assert torch.equal(rank["bins"][step], obj.ratio.bins), step
        assert (obj.ratio.bins != 1).sum() == 9 and obj.ratio.bins[9] == 1  # bins 0-8 seen, bin 9 never
        # h: each sample's ratio over the same bin mean gives the same float32 value of h on both sides; only the
        # mean it is divided by differs, by summation order: a float32 sum of n positive terms is within
        # (n - 1) eps / 2 relative of the exact sum (63 terms one process, 31 per half here; the float64 all-reduce
        # and the cast back add one rounding), so 64 eps bounds the relative difference of the normalised h
        # (measured: at most 1.1 eps).
        two = torch.cat([rank["h"][step] for rank in ranks])
        assert torch.isnan(two[BATCH // 2 + 3]) and torch.isnan(h[BATCH // 2 + 3])
        ok = ~torch.isnan(h)
        assert torch.allclose(two[ok], h[ok], rtol=64 * EPS32, atol=0), step
        # normalised by the global mean: the finite weights average 1 over the whole batch, not over each half
        assert abs(float(two[ok].double().mean()) - 1) <= 64 * EPS32
        halves = [float(part[~torch.isnan(part)].double().mean()) for part in two.chunk(WORLD)]
        assert max(abs(m - 1) for m in halves) > 0.05, halves
