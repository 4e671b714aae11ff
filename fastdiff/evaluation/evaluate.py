"""FID / KID of an image source against reference statistics, and the reference statistics themselves."""
from __future__ import annotations

import time

from ..errors import FastdiffError
from ..machine import progress as progress_bar
from .images import ImageSource
from .inception import InceptionFeatures
from .metrics import FeatureStats, ReferenceStats, count_label, frechet_distance, kernel_inception_distance

DEFAULT_KID_FEATURES = 5000


def source_features(source: ImageSource, extractor: InceptionFeatures, num: int | None, batch_size: int,
                    crop: int | None = None, keep: int = 0, progress: bool = True) -> tuple[FeatureStats, dict]:
    """Stream the source through the extractor: float64 statistics, the first ``keep`` features and timings
    (seconds spent producing images, i.e. sampling for a model, and seconds spent in the extractor).
    ``progress``: a bar on a terminal's stderr (see ``fastdiff.machine.progress``)."""
    stats = FeatureStats(extractor.num_features, keep)
    timing = {"image_seconds": 0.0, "feature_seconds": 0.0}
    batches = source.batches(num, batch_size, crop)
    what = "sampling + Inception" if source.is_model else "Inception features"
    with progress_bar(total=source.resolve_num(num), desc=what, unit="img", enabled=progress) as bar:
        while True:
            t0 = time.perf_counter()
            batch = next(batches, None)
            t1 = time.perf_counter()
            if batch is None:
                break
            stats.add(extractor(batch))
            timing["image_seconds"] += t1 - t0
            timing["feature_seconds"] += time.perf_counter() - t1
            bar.update(len(batch))
    return stats, timing


def make_reference(source: ImageSource, extractor: InceptionFeatures, num: int | None, batch_size: int,
                   kid_features: int = DEFAULT_KID_FEATURES, crop: int | None = None,
                   progress: bool = True) -> ReferenceStats:
    stats, _ = source_features(source, extractor, num, batch_size, crop, keep=kid_features, progress=progress)
    mu, sigma = stats.mean_cov()
    return ReferenceStats(mu=mu, sigma=sigma, n=stats.n, extractor=extractor.extractor_id, resize=extractor.resize,
                          image_shape=source.cropped_shape(crop), name=f"{source.name}{count_label(stats.n)}",
                          features=stats.features())


def evaluate(source: ImageSource, ref: ReferenceStats, extractor: InceptionFeatures, num: int | None,
             batch_size: int, crop: int | None = None, kid_subset_size: int = 1000, progress: bool = True) -> dict:
    """FID and KID of ``num`` images from ``source`` against ``ref``; refuses a mismatched extractor, resize mode,
    channel count or image size before any image is made."""
    ref.check_images(extractor.resize, source.cropped_shape(crop))
    ref.check_extractor(extractor.extractor_id)
    num = source.resolve_num(num)
    t0 = time.perf_counter()
    no_kid = ref.kid_unavailable()  # then no features are kept
    stats, timing = source_features(source, extractor, num, batch_size, crop, keep=0 if no_kid else num,
                                    progress=progress)
    result = scores(stats, ref, source.name, kid_subset_size)
    result.update(timing, total_seconds=time.perf_counter() - t0)
    if source.is_model and timing["image_seconds"] > 0:
        result["images_per_second"] = stats.n / timing["image_seconds"]
    return result


def scores(stats: FeatureStats, ref: ReferenceStats, name: str, kid_subset_size: int = 1000) -> dict:
    """FID (and KID where ``ref`` keeps features) of the images behind ``stats`` against ``ref``."""
    no_kid = ref.kid_unavailable()
    mu, sigma = stats.mean_cov()
    fid = frechet_distance(mu, sigma, ref.mu, ref.sigma)
    result = {"fid_label": ref.label("FID", stats.n), "fid": fid, "n": stats.n, "reference": ref.name,
              "reference_format": ref.origin, "reference_n": ref.n, "resize": ref.resize, "extractor": ref.extractor,
              "input": name}
    if no_kid is None:
        kid, kid_std = kernel_inception_distance(stats.features(), ref.features, subset_size=kid_subset_size)
        result.update(kid_label=ref.label("KID", stats.n), kid=kid, kid_std=kid_std)
    else:
        result["kid_unavailable"] = no_kid
    return result


def check_positive(**values) -> None:
    for name, value in values.items():
        if value is not None and value <= 0:
            raise FastdiffError(f"--{name.replace('_', '-')} must be positive, got {value}")


def clip_score(source: ImageSource, scorer, prompts: list[str], num: int | None, batch_size: int,
               crop: int | None = None, progress: bool = True) -> dict:
    """Mean CLIP score of ``num`` images against their prompts (see ``fastdiff.evaluation.clip_score.prompts_for``)."""
    import numpy as np

    from .clip_score import prompts_for

    num = source.resolve_num(num)
    paired = prompts_for(prompts, num, source.num_classes)
    values, start = [], 0
    with progress_bar(total=num, desc="CLIP score", unit="img", enabled=progress) as bar:
        for batch in source.batches(num, batch_size, crop):
            values.append(scorer.scores(batch, paired[start:start + len(batch)]).cpu().numpy())
            start += len(batch)
            bar.update(len(batch))
    values = np.concatenate(values).astype(np.float64)
    unit = "100*max(cos,0)" if scorer.convention == "torchmetrics" else "cosine"
    return {"clip_score_label": f"CLIPScore@{count_label(len(values))}({scorer.model_name}, {unit})",
            "clip_score": float(values.mean()), "clip_score_std": float(values.std()), "n": len(values),
            "convention": scorer.convention, "input": source.name}
