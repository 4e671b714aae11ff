"""FID / KID of an image source against reference statistics, and the reference statistics themselves."""
from __future__ import annotations

import time

from ..errors import FastdiffError
from ..machine import progress as progress_bar
from ..inference.sampling import share_size
from .images import ImageSource
from .inception import InceptionFeatures
from .metrics import FeatureStats, ReferenceStats, count_label, frechet_distance, kernel_inception_distance

DEFAULT_KID_FEATURES = 5000


def per_batch(source: ImageSource, num: int, batch_size: int, crop: int | None, fn, consume, desc: str,
              progress: bool = True, part: tuple[int, int] | None = None) -> dict | None:
    """``consume(fn(batch, start))`` for each batch of the source's first ``num`` images, in batch order, one batch
    at a time (memory does not grow with ``num``); returns timings (seconds spent producing images, i.e. sampling
    for a model, and seconds in ``fn``). ``progress``: a bar on a terminal's stderr (``fastdiff.machine.progress``).

    ``part=(i, P)`` (collective: every process calls it): process i makes batches i, i + P, ..., and in each round
    of P batches the main process (i = 0) receives the round's results and consumes them in batch order, so what it
    computes is one process's to the last bit; it returns the slowest process's timings, the others None."""
    count, (rank, size) = -(-num // batch_size), part or (0, 1)
    timing = {"image_seconds": 0.0, "feature_seconds": 0.0}
    batches = source.batches(num, batch_size, crop, part)
    with progress_bar(total=share_size(num, batch_size, part), desc=desc, unit="img",
                      enabled=progress and rank == 0) as bar:
        for first in range(0, count, size):  # one round: batches first .. first + size - 1
            index, item = first + rank, None
            if index < count:
                t0 = time.perf_counter()
                batch = next(batches)
                t1 = time.perf_counter()
                item = (index, fn(batch, index * batch_size))
                timing["image_seconds"] += t1 - t0
                timing["feature_seconds"] += time.perf_counter() - t1
                bar.update(len(batch))
            items = [item] if part is None else _gathered(item)  # process order: batch order within a round
            for it in items if rank == 0 else ():
                if it is not None:
                    consume(it[1])
    if part is None:
        return timing
    timings = _gathered(timing)
    return {k: max(t[k] for t in timings) for k in timing} if rank == 0 else None


def _gathered(obj) -> list:
    """Every process's ``obj``, in process order, on every process (collective)."""
    from accelerate.utils import gather_object

    return gather_object([obj])


def source_features(source: ImageSource, extractor: InceptionFeatures, num: int | None, batch_size: int,
                    crop: int | None = None, keep: int = 0, progress: bool = True,
                    part: tuple[int, int] | None = None) -> tuple[FeatureStats | None, dict]:
    """Stream the source through the extractor: float64 statistics, the first ``keep`` features and timings
    (``per_batch``; with ``part``, on the main process only: (None, None) on the others)."""
    what = "sampling + Inception" if source.is_model else "Inception features"
    stats = FeatureStats(extractor.num_features, keep)
    timing = per_batch(source, source.resolve_num(num), batch_size, crop, lambda batch, start: extractor(batch).cpu(),
                       stats.add, what, progress, part)
    return (stats, timing) if timing is not None else (None, None)


def make_reference(source: ImageSource, extractor: InceptionFeatures, num: int | None, batch_size: int,
                   kid_features: int = DEFAULT_KID_FEATURES, crop: int | None = None,
                   progress: bool = True, part: tuple[int, int] | None = None) -> ReferenceStats | None:
    """Reference statistics of ``source`` (with ``part``: on the main process, None on the others)."""
    stats, _ = source_features(source, extractor, num, batch_size, crop, keep=kid_features, progress=progress,
                               part=part)
    if stats is None:
        return None
    mu, sigma = stats.mean_cov()
    return ReferenceStats(mu=mu, sigma=sigma, n=stats.n, extractor=extractor.extractor_id, resize=extractor.resize,
                          image_shape=source.cropped_shape(crop), name=f"{source.name}{count_label(stats.n)}",
                          features=stats.features())


def evaluate(source: ImageSource, ref: ReferenceStats, extractor: InceptionFeatures, num: int | None,
             batch_size: int, crop: int | None = None, kid_subset_size: int = 1000, progress: bool = True,
             part: tuple[int, int] | None = None) -> dict | None:
    """FID and KID of ``num`` images from ``source`` against ``ref``; refuses a mismatched extractor, resize mode,
    channel count or image size before any image is made. ``part=(i, P)``: process i of P makes its share of the
    images (``source_features``) and the main process scores them all; the others get None."""
    ref.check_images(extractor.resize, source.cropped_shape(crop))
    ref.check_extractor(extractor.extractor_id)
    num = source.resolve_num(num)
    t0 = time.perf_counter()
    no_kid = ref.kid_unavailable()  # then no features are kept
    stats, timing = source_features(source, extractor, num, batch_size, crop, keep=0 if no_kid else num,
                                    progress=progress, part=part)
    if stats is None:
        return None
    mu, sigma = stats.mean_cov()
    fid = frechet_distance(mu, sigma, ref.mu, ref.sigma, factor1=stats.cov_factor())
    result = {"fid_label": ref.label("FID", stats.n), "fid": fid, "n": stats.n, "reference": ref.name,
              "reference_format": ref.origin, "reference_n": ref.n, "resize": ref.resize, "extractor": ref.extractor,
              "input": source.name}
    if no_kid is None:
        kid, kid_std = kernel_inception_distance(stats.features(), ref.features, subset_size=kid_subset_size)
        result.update(kid_label=ref.label("KID", stats.n), kid=kid, kid_std=kid_std)
    else:
        result["kid_unavailable"] = no_kid
    if part is not None:
        result["processes"] = part[1]
    result.update(timing, total_seconds=time.perf_counter() - t0)
    if source.is_model and timing["image_seconds"] > 0:
        result["images_per_second"] = stats.n / timing["image_seconds"]
    return result


def check_positive(**values) -> None:
    for name, value in values.items():
        if value is not None and value <= 0:
            raise FastdiffError(f"--{name.replace('_', '-')} must be positive, got {value}")


def clip_score(source: ImageSource, scorer, prompts: list[str], num: int | None, batch_size: int,
               crop: int | None = None, progress: bool = True, part: tuple[int, int] | None = None) -> dict | None:
    """Mean CLIP score of ``num`` images against their prompts (see ``fastdiff.evaluation.clip_score.prompts_for``);
    with ``part`` (``per_batch``), on the main process only, None on the others."""
    import numpy as np

    from .clip_score import prompts_for

    num = source.resolve_num(num)
    paired = prompts_for(prompts, num, source.num_classes)
    values = []
    if per_batch(source, num, batch_size, crop,
                 lambda batch, start: scorer.scores(batch, paired[start:start + len(batch)]).cpu().numpy(),
                 values.append, "CLIP score", progress, part) is None:
        return None
    values = np.concatenate(values).astype(np.float64)
    unit = "100*max(cos,0)" if scorer.convention == "torchmetrics" else "cosine"
    return {"clip_score_label": f"CLIPScore@{count_label(len(values))}({scorer.model_name}, {unit})",
            "clip_score": float(values.mean()), "clip_score_std": float(values.std()), "n": len(values),
            "convention": scorer.convention, "input": source.name, **({"processes": part[1]} if part else {})}
