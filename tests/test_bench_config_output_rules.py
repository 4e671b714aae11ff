"""Rules of the numbers the benches report (fastdiff bench gmm / speed / profile), of config validation and
merging, of what a run exports and of the dry run's memory estimate, each checked against an independent
computation (mutation audit, 2026-11-30). Plain tensors and fakes; every test runs in well under 3 s."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from fastdiff.bench import gmm as bench_gmm
from fastdiff.bench import profile as bench_profile
from fastdiff.bench import speed
from fastdiff.errors import FastdiffError
from fastdiff.models.analytic import GaussianMixtureModel, sliced_wasserstein


# ---------------------------------------------------------------- bench gmm

def _at_modes(gmm, counts):
    """Samples exactly at the mixture's means, counts[k] of mode k (each classified as its own mode)."""
    modes = torch.cat([torch.full((c,), k) for k, c in enumerate(counts)])
    return gmm.means.detach()[modes].reshape(len(modes), 1, 8, 8)


def test_gmm_score_reports_the_largest_absolute_mode_weight_error_to_six_decimals():
    gmm = GaussianMixtureModel()  # weights 0.1, 0.2, 0.3, 0.4
    counts = [600, 569, 500, 331]  # of 2000: weights 0.3, 0.2845, 0.25, 0.1655: errors +0.2, +0.0845, -0.05, -0.2345
    samples = _at_modes(gmm, counts)
    assert gmm.mode_weights(samples).tolist() == pytest.approx([0.3, 0.2845, 0.25, 0.1655], abs=1e-7)
    got = bench_gmm.score(samples, samples, gmm)
    # the largest error is the negative one (|-0.2345| > +0.2); float32 logits put ~1e-8 on it, below 6 decimals
    assert got["max_mode_weight_error"] == 0.2345
    assert got["sw2"] == 0.0  # a set against itself


def test_gmm_row_is_scored_over_the_floor_it_was_given():
    gmm = GaussianMixtureModel()
    truth = gmm.sample_true(200, torch.Generator().manual_seed(1))
    samples = gmm.sample_true(200, torch.Generator().manual_seed(2))
    rows, lines = [], []
    add = bench_gmm.row_recorder(rows, truth, gmm, 0.125, lines.append)
    add("x", samples, "objective", 7, 0.0)
    (row,) = rows
    assert row["sw2"] == sliced_wasserstein(samples, truth)  # the same float64 computation: exact
    assert row["sw2_over_floor"] == row["sw2"] / 0.125 and row["sw2_floor"] == 0.125 and row["steps"] == 7


def test_gmm_exact_floor_is_the_mean_and_sd_of_16_distinct_exact_draws_plus_the_old_single_draw():
    gmm = GaussianMixtureModel()
    seed, n = 3, 120
    truth = gmm.sample_true(n, torch.Generator().manual_seed(seed + 1))
    draws = [sliced_wasserstein(truth, gmm.sample_true(n, torch.Generator().manual_seed(10_000 * (seed + 1) + k)))
             for k in range(16)]
    mean = sum(draws) / 16
    sd = math.sqrt(sum((d - mean) ** 2 for d in draws) / 15)  # torch.std: Bessel's n - 1
    got = bench_gmm.exact_floor(gmm, truth, seed)
    # float64 sums of 16 values ~0.1-1: differences of a few ulps (1e-15); 1e-12 leaves ample room
    assert got["sw2_floor"] == pytest.approx(mean, rel=1e-12) and got["sw2_floor_sd"] == pytest.approx(sd, rel=1e-12)
    assert got["floor_draws"] == 16 and len(set(draws)) == 16
    single = sliced_wasserstein(truth, gmm.sample_true(n, torch.Generator().manual_seed(seed + 2)))
    assert got["sw2_floor_single"] == single and single > 0


def test_gmm_bench_draws_truth_and_floor_from_their_own_seeds(tmp_path):
    """run() with no objectives: the teacher rows and the floor, which must be the floor of the truth set drawn with
    seed + 1 (the seed the docs and the stored results use)."""
    result = bench_gmm.run(objectives=(), num_eval=100, seed=0, work_dir=str(tmp_path), log=lambda s: None)
    gmm = GaussianMixtureModel()
    truth = gmm.sample_true(100, torch.Generator().manual_seed(1))
    assert result["sw2_floor"] == bench_gmm.exact_floor(gmm, truth, 0)["sw2_floor"]
    assert [r["objective"] for r in result["rows"]] == ["teacher-ddim-1", "teacher-ddim-2", "teacher-ddim-4"]


def test_gmm_consistency_objectives_start_from_a_teacher_copy_and_the_rest_from_the_ode_map():
    assert bench_gmm.is_consistency("cd") and not bench_gmm.is_consistency("dmd2")
    assert bench_gmm.init_kind("cd") == "denoiser" and bench_gmm.init_kind("dmd2") == "ode"
    assert bench_gmm.init_kind("tdm") == "denoiser"


def test_gmm_stage_students_are_scored_at_their_own_step_count_and_the_8_segment_one_at_4_too():
    calls = []

    class Fake:
        def __init__(self, k):
            self.k, self.sampler = k, "lcm"

        def __call__(self, z, num_steps):
            return (self.k, num_steps)

    add = lambda name, samples, kind, n, t0: calls.append((name, samples, kind))  # noqa: E731
    stages = {8: Fake(8), 2: Fake(2)}
    bench_gmm.score_stages(add, "h", stages, Fake("final"), torch.zeros(1), 5, 0.0)
    assert calls == [("h stage k8, 8 steps ddim", (8, 8), "stage"), ("h stage k8, 4 steps ddim", (8, 4), "stage"),
                     ("h stage k2, 2 steps ddim", (2, 2), "stage"), ("h, 8 steps ddim", ("final", 8), "objective")]
    assert all(s.sampler == "ddim" for s in stages.values())


# ---------------------------------------------------------------- bench speed / profile

def _clock(monkeypatch, times):
    it = iter(times)
    monkeypatch.setattr(speed.time, "perf_counter", lambda: next(it))


def test_matmul_peak_is_2n3_flops_over_the_best_repeat(monkeypatch):
    # CPU: 2 repeats of 3 matmuls of 1024 x 1024; the fake clock makes them take 3 s and then 1.5 s
    _clock(monkeypatch, [0.0, 3.0, 10.0, 11.5])
    peak, how = speed.matmul_peak(torch.device("cpu"))
    assert peak == 2 * 1024**3 / 0.5 and how == "fp32 1024x1024 matmul"


def test_timed_is_the_median_call(monkeypatch):
    _clock(monkeypatch, [0.0, 3.0, 10.0, 11.0, 20.0, 22.0])  # calls of 3, 1 and 2 s
    assert speed.timed(lambda: None, torch.device("cpu"), 3, 0) == 2.0


def test_training_row_ratios_mfu_and_images_per_second(monkeypatch):
    """A fake trainer, a fake clock (naive step 2 s, fastdiff's 0.5 s) and 1e9 FLOPs against a 1e10 FLOP/s peak."""
    def trainer(fast):
        p = torch.nn.Parameter(torch.zeros(1))
        return SimpleNamespace(cfg=SimpleNamespace(train=SimpleNamespace(lr_generator=1e-4, lr_critic=1e-4,
                                                                         compile=False)),
                               opt_g=SimpleNamespace(params=[p]), opt_c=None, train_step=lambda: None,
                               attention="sdpa")
    monkeypatch.setattr(speed, "make_trainer", lambda *a, **k: trainer(a[3]))
    monkeypatch.setattr(speed, "count_flops", lambda fn: 10**9)
    seconds = iter([2.0, 0.5])
    monkeypatch.setattr(speed, "timed", lambda *a, **k: next(seconds))
    (row,) = speed.training_rows("t", ["dmd2"], [4], 1, 0, torch.device("cpu"), 1e10, [])
    assert (row["naive_seconds"], row["fast_seconds"], row["flops_per_step"]) == (2.0, 0.5, 10**9)
    assert row["speedup"] == 4.0 and row["naive_images_per_second"] == 2.0 and row["fast_images_per_second"] == 8.0
    assert row["naive_mfu"] == 0.05 and row["fast_mfu"] == 0.2


def test_sampling_row_flops_per_image_and_mfu(tiny_teacher, monkeypatch):
    monkeypatch.setattr(speed, "count_flops", lambda fn: 3000)
    monkeypatch.setattr(speed, "timed", lambda *a, **k: 0.25)
    (row,) = speed.sampling_rows(tiny_teacher, [3], 1, 0, torch.device("cpu"), 1e6, compile_sampler=False)
    assert row["flops_per_image"] == 1000 and row["eager_images_per_second"] == 12.0
    assert row["eager_mfu"] == 3000 / 0.25 / 1e6  # the whole batch's FLOPs in the batch's time


def test_ablation_row_reusing_fastdiffs_step_is_a_ratio_to_the_naive_step():
    main = {"attention": "sdpa", "compile": False, "fast_seconds": 0.5}
    rows = speed.ablation_rows("t", "dmd2", 4, 1, 0, torch.device("cpu"), [], 2.0, speed.Budget(-1.0), [], "/nonexistent",
                               main=main)
    reused = [r for r in rows if "same_as" in r]
    assert reused and reused[0]["speedup"] == 4.0 and reused[0]["images_per_second"] == 8.0


def test_profile_step_reports_times_and_calls_per_step():
    a = torch.randn(64, 64)
    prof = bench_profile.profile_step(lambda: torch.mm(a, a), torch.device("cpu"), steps=4, top=1000)
    (mm,) = [t for t in prof["top"] if t["name"] == "aten::mm"]
    assert mm["calls_per_step"] == 1 and mm["kind"] == "matmul / conv"
    # every event is in ``top``: the per-step total is the sum of theirs (float64 sums of a few terms: 1e-9 relative)
    assert prof["milliseconds_per_step"] == pytest.approx(sum(t["milliseconds_per_step"] for t in prof["top"]), rel=1e-9)


def test_gmm_bench_refuses_fewer_than_100_eval_samples():
    with pytest.raises(FastdiffError, match="--num-eval must be at least 100"):
        bench_gmm.run(objectives=(), num_eval=99)


# ---------------------------------------------------------------- config

from fastdiff.config import load_config  # noqa: E402


@pytest.mark.parametrize("overrides", [
    ["train.checkpoint_limit=0"], ["train.seed=4294967296"], ["train.lr_generator=0"], ["train.lr_critic=0.0"],
    ["train.adam_betas=[0.9, 1.0]"], ["train.ema_decay=1.0"], ["train.ema_sigma_rel=0.285"],
    ["objective.min_t=0.5", "objective.max_t=0.5"], ["data.teacher_steps=1"], ["train.lr_generator=.inf"],
    ["train.grad_clip=-.inf"], ["train.batch_size=true"], ["student.sigma_init=0"], ["train.time_limit_minutes=0"],
    ["student.lora_rank=4", "student.lora_alpha=0"], ["objective.name=fada", "data.name=imagefolder",
                                                      "data.tier_weights=[-0.5, 1.0]"],
])
def test_config_refuses_values_at_the_edge_of_their_range(overrides):
    with pytest.raises(FastdiffError):
        load_config(None, overrides)


def test_config_accepts_the_values_just_inside_those_ranges():
    cfg = load_config(None, ["train.seed=4294967295", "train.ema_sigma_rel=0.27", "train.adam_betas=[0, 0.999]",
                             "objective.min_t=0.0", "objective.max_t=1.0", "data.teacher_steps=2",
                             "train.grad_clip=0", "output_dir=runs/a=b"])
    assert cfg.train.seed == 2**32 - 1 and cfg.output_dir == "runs/a=b"  # a value may hold '='
    assert load_config(None, ["train.ema_decay=0"]).train.ema_decay == 0.0


def test_base_config_resolves_relative_to_its_file_and_the_child_wins_key_by_key(tmp_path, monkeypatch):
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "parent.yaml").write_text("train:\n  batch_size: 7\n  max_steps: 9\nobjective:\n  critic_updates: 3\n")
    (sub / "child.yaml").write_text("base: parent.yaml\ntrain:\n  max_steps: 5\n")
    (tmp_path / "parent.yaml").write_text("train:\n  batch_size: 99\n")  # the same name beside the cwd
    monkeypatch.chdir(tmp_path)
    cfg = load_config(str(sub / "child.yaml"))
    assert (cfg.train.batch_size, cfg.train.max_steps, cfg.objective.critic_updates) == (7, 5, 3)


# ---------------------------------------------------------------- dry run memory estimate

from fastdiff.training import dry_run  # noqa: E402


def test_memory_estimate_ema_covers_the_student_only_and_shared_storage_counts_once():
    student, fake = torch.nn.Linear(4, 5), torch.nn.Linear(2, 3)  # 25 and 9 float32 trainable parameters
    base = torch.nn.Linear(10, 10).requires_grad_(False)  # 110 frozen float32
    alias = [torch.nn.Parameter(p.data, requires_grad=False) for p in base.parameters()]  # other objects, same storage
    rows = [("teacher", list(base.parameters())), ("student", [*student.parameters(), *alias]),
            ("fake score", list(fake.parameters()))]
    got = {k: v * dry_run.GIB for k, v in dry_run.memory_estimate(rows, ema=True).items()}
    assert got == {"frozen weights": 440, "trainable weights": 136, "gradients": 136, "adam states": 272, "ema": 100,
                   "total": 1084}


def test_parameter_rows_count_trainable_and_frozen_apart_and_heads_once():
    teacher = SimpleNamespace(model=torch.nn.Linear(3, 3).requires_grad_(False), pipeline=None)
    student, head = torch.nn.Linear(4, 5), torch.nn.Linear(2, 1)
    rows = dry_run._rows(teacher, student, None, [student, head])  # the student's own modules are no extra row
    assert [(name, len(params)) for name, params in rows] == [("teacher", 2), ("student", 2), ("objective heads", 2)]
    assert dry_run._count([*student.parameters(), *teacher.model.parameters()]) == (25, 12)


# ---------------------------------------------------------------- run outputs

import contextlib  # noqa: E402

from fastdiff.training import outputs  # noqa: E402


def test_sample_grid_uses_the_middle_guidance_scale_and_a_column_per_class(tmp_path, monkeypatch):
    seen = {}
    def guided_cond(model, cond, scale):
        seen["scale"] = scale
        return cond

    monkeypatch.setattr(outputs, "guided_cond", guided_cond)
    real_save = outputs.save_grid
    monkeypatch.setattr(outputs, "save_grid", lambda images, path, ncol=None: (seen.setdefault("ncol", ncol),
                                                                                 real_save(images, path, ncol)))
    monkeypatch.setattr(outputs, "log_image", lambda acc, name, image, step: seen.setdefault("shape", image.shape))

    class Gen(torch.nn.Module):  # a module, as the Generator: the grid samples it in eval mode
        denoiser = SimpleNamespace(model=None)

        def forward(self, z, cond, rng=None):
            seen["training"] = self.training  # dropout off, as in the exported pipeline
            return torch.zeros(z.shape[0], 1, 4, 4)

    run = SimpleNamespace(
        accelerator=SimpleNamespace(is_main_process=True, device=torch.device("cpu"), autocast=contextlib.nullcontext),
        cfg=SimpleNamespace(train=SimpleNamespace(num_sample_images=6, seed=0),
                            objective=SimpleNamespace(name="dmd2", guidance_range=[2.0, 5.0])),
        teacher=SimpleNamespace(sample_shape=(1, 4, 4), num_classes=3, latents=None), text=None,
        export_generator=Gen, out=tmp_path, step=4)
    outputs.sample_grid(run)
    assert seen == {"scale": 3.5, "ncol": 3, "shape": (8, 12, 1), "training": False}  # 6 images of 4x4: 2 rows x 3 classes
    assert (tmp_path / "samples" / "step-00000004.png").is_file()


def test_export_passes_the_last_grid_at_or_before_the_step_and_a_stage_step_count(tmp_path, monkeypatch):
    (tmp_path / "samples").mkdir()
    for step in (10, 20, 30):
        (tmp_path / "samples" / f"step-{step:08d}.png").write_bytes(b"")
    got = {}
    monkeypatch.setattr(outputs, "export_info", lambda cfg, step, ema, teacher: {"num_steps": 1, "train_step": step})
    monkeypatch.setattr(outputs, "export_student",
                        lambda model, teacher, info, out, sample_grid=None, **o: got.update(info=info, grid=sample_grid))
    run = SimpleNamespace(accelerator=SimpleNamespace(is_main_process=True), student_weights=lambda: torch.nn.Linear(1, 1),
                          cfg=SimpleNamespace(objective=SimpleNamespace(name="dmd2")), ema=None, teacher=None,
                          methods_used=lambda: [], objective=SimpleNamespace(generator_updates=lambda s: s),
                          out=tmp_path, step=20)
    outputs.export_run(run, num_steps=4)
    assert got["grid"].name == "step-00000020.png" and got["info"]["num_steps"] == 4


def test_fada_export_records_the_middle_of_each_guidance_range_as_its_default_scale(tmp_path, monkeypatch):
    import json

    from fastdiff.inference import export, model_card, schedulers
    from fastdiff.objectives import fada

    monkeypatch.setattr(fada, "export_multi_guidance", lambda *a: None)
    monkeypatch.setattr(schedulers, "deterministic_scheduler", lambda *a: None)
    monkeypatch.setattr(export, "_portable", lambda info, where, teacher: info)
    monkeypatch.setattr(model_card, "multi_guidance_card", lambda info: SimpleNamespace(save=lambda path: None))
    monkeypatch.setattr(export, "_write_folder", lambda out, fill, teacher: fill(out) or out)
    o = SimpleNamespace(guidance_order=None, class_guidance_range=[1.0, 4.0], text_guidance_range=[2.0, 8.0])
    teacher = SimpleNamespace(num_classes=3, null_class=3, path="t", scheduler=None,
                              denoiser=SimpleNamespace(prediction_type="epsilon"))
    run = SimpleNamespace(cfg=SimpleNamespace(objective=o, teacher=SimpleNamespace(path="t")), step=5, teacher=teacher,
                          methods_used=lambda: [])
    outputs.export_fada(run, None, tmp_path)
    info = json.loads((tmp_path / "fastdiff.json").read_text())
    assert (info["class_guidance_scale"], info["text_guidance_scale"], info["guidance_order"]) == (2.5, 5.0, "class_first")


def test_bench_speed_ablates_the_first_training_batch_only(monkeypatch):
    from fastdiff.models import embedded

    monkeypatch.setattr(embedded, "resolve_teacher_path", lambda t: t)
    monkeypatch.setattr(speed, "matmul_peak", lambda device: (1.0, "fake"))

    def training_rows(teacher, objectives, batches, *rest):
        rest[8]([{"objective": "dmd2", "batch_size": b, "naive_seconds": 1.0, "attention": "sdpa"} for b in batches])

    calls = []
    monkeypatch.setattr(speed, "training_rows", training_rows)
    monkeypatch.setattr(speed, "sampling_rows", lambda *a: None)
    monkeypatch.setattr(speed, "ablation_rows", lambda teacher, name, batch, *a, **k: calls.append(batch) or [])
    result = speed.run("t", ["dmd2"], [2, 3], [], 1, 0, torch.device("cpu"), [], ablate=True)
    assert calls == [2] and [("ablation" in r) for r in result["training"]] == [True, False]
