"""cd's ``recipe: ict`` (Song & Dhariwal 2023) against formulas transcribed from Kinyugo/consistency_models
consistency_models/consistency_models.py (``lognormal_timestep_distribution``, ``improved_loss_weighting``,
``improved_timesteps_schedule``), on the analytic teacher."""
import math

import pytest
import torch

from fastdiff.models.analytic import GaussianMixtureModel
from fastdiff.models.denoiser import Denoiser
from fastdiff.models.schedule import VPSchedule
from fastdiff.objectives.cd import ConsistencyDistillation


def reference_lognormal_pdf(sigmas: torch.Tensor, mean: float = -1.1, std: float = 2.0) -> torch.Tensor:
    """``lognormal_timestep_distribution``'s probabilities of the pair (sigmas[t], sigmas[t + 1]), t = 0..N-1."""
    log = torch.log(sigmas.double())
    pdf = torch.erf((log[1:] - mean) / (std * math.sqrt(2))) - torch.erf((log[:-1] - mean) / (std * math.sqrt(2)))
    return pdf / pdf.sum()


def reference_weighting(sigmas: torch.Tensor) -> torch.Tensor:
    """``improved_loss_weighting``: 1 / (sigma_{t+1} - sigma_t) for the pair t."""
    return 1 / (sigmas[1:].double() - sigmas[:-1].double())


def reference_num_timesteps(k: int, total: int, s0: int = 10, s1: int = 1280) -> int:
    """``improved_timesteps_schedule``: grid points N(k) = min(s0 2^floor(k / K'), s1) + 1."""
    k_prime = math.floor(total / (math.log2(math.floor(s1 / s0)) + 1))
    return int(min(s0 * math.pow(2, math.floor(k / k_prime)), s1) + 1)


def ict(**options) -> ConsistencyDistillation:
    model = GaussianMixtureModel(sample_size=2, seed=0).requires_grad_(False)
    teacher = Denoiser(model, VPSchedule(model.scheduler().alphas_cumprod), "sample")
    student = Denoiser(GaussianMixtureModel(sample_size=2, seed=1), teacher.schedule, "sample")
    return ConsistencyDistillation(teacher, None, student, recipe="ict", **options)


def test_ict_index_distribution_matches_the_reference():
    """n = 400k draws on an 80-interval Karras grid. Each level's count is binomial: its frequency's standard error
    is sqrt(p (1 - p) / n) <= 8e-4; 5 standard errors per level (plus 1/n for the rarest levels, where the normal
    approximation is poor) fail a correct sampler with probability < 80 * 6e-7 over the 80 levels. A uniform index,
    or one shifted by a grid level, is off by > 10 standard errors on the most likely levels."""
    cd = ict(num_intervals=80, start_intervals=80)
    levels = cd.grid(80, "cpu")
    n = 400_000
    torch.manual_seed(0)
    counts = torch.bincount(cd.draw_index(levels, n), minlength=81).double()
    assert counts[0] == 0  # the student's level is never the boundary level
    freq, p = counts[1:] / n, reference_lognormal_pdf(levels)  # our index i is the reference's t + 1
    assert ((freq - p).abs() <= 5 * (p * (1 - p) / n).sqrt() + 1 / n).all()
    shifted = torch.cat([p[1:], p[:1]])
    assert ((freq - shifted).abs() > 10 * (p * (1 - p) / n).sqrt()).any()


def test_ict_weighting_matches_the_reference():
    """cd's loss with the recipe is the mean of the per-sample distances times the reference weights at the drawn
    pairs. Indices are fixed so the two computations see the same points; both in float64 from the same float32
    distances (weights are float32 in cd: 1e-6 relative covers their rounding)."""
    cd = ict(num_intervals=40, start_intervals=40)
    levels = cd.grid(40, "cpu")
    idx = torch.tensor([1, 2, 5, 17, 30, 40, 40, 3])
    cd.draw_index = lambda lv, n: idx
    x = cd.teacher.model.sample_true(len(idx), torch.Generator().manual_seed(1))
    torch.manual_seed(7)
    loss, _ = cd.generator_loss(x)
    torch.manual_seed(7)
    x_n = x + levels[idx].reshape(-1, 1, 1, 1) * torch.randn_like(x)
    distances = cd.loss_at(x_n, levels[idx], levels[idx - 1]).double()
    expected = (reference_weighting(levels)[idx - 1] * distances).mean()
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-6)
    unweighted = distances.mean()
    assert abs(float(loss.detach()) - float(unweighted)) > 0.5 * float(unweighted)  # the weighting matters here


def test_ict_curriculum_matches_the_reference():
    total = 8003  # K' = floor(8003 / 8) = 1000
    cd = ict(double_every=total // 8)
    for k in range(0, total + 1, 37):
        cd.step = k
        assert cd.intervals() == reference_num_timesteps(k, total) - 1  # N(k) counts points, cd intervals


def test_ict_recipe_settings_and_explicit_options_win():
    cd = ict()
    assert (cd.grid_kind, cd.index_sampling, cd.loss_weighting, cd.distance, cd.target) == \
        ("karras", "lognormal", "ict", "pseudo_huber", None)
    assert (cd.start_intervals, cd.num_intervals, cd.double_every, cd.p_mean, cd.p_std) == (10, 1280, 50_000, -1.1, 2.0)
    mine = ict(distance="l2", target_ema=0.5, p_mean=-0.5, grid="timesteps")
    assert (mine.distance, mine.target_ema, mine.p_mean, mine.grid_kind, mine.loss_weighting) == \
        ("l2", 0.5, -0.5, "timesteps", "ict")
    plain = ConsistencyDistillation(cd.teacher, None, cd.student)  # no recipe: cd's own defaults
    assert (plain.grid_kind, plain.index_sampling, plain.loss_weighting, plain.num_intervals, plain.target_ema) == \
        ("timesteps", "uniform", "uniform", 50, 0.95)
    with pytest.raises(ValueError, match="objective.recipe"):
        ConsistencyDistillation(cd.teacher, None, cd.student, recipe="ictx")
