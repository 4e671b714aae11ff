"""``fastdiff bench gmm``: train a one-step student with each objective from the analytic teacher and
score it against the exact target distribution.

Setup (all on the CPU, a few minutes):
- teacher: ``GaussianMixtureModel`` (4 modes in 1x8x8, weights 0.1..0.4), saved and loaded like any teacher;
- fake score: a trainable copy of the teacher (the mixture family, as real fake scores copy the teacher);
- student: an ``MLPDenoiser`` warm-started by regression on the teacher's deterministic ODE pairs
  (noise -> 200-step DDIM sample; DMD, Yin et al. 2024, Sec. 3.3 uses the same pairs as a loss). The warm
  start fixes how much noise space each mode gets; score-based objectives move mass between well-separated
  modes only through the few samples between them, so a student that starts with wrong mode weights
  keeps them for thousands of steps (measured: DMD2, SiD and SIM from a cold start all settle at weights
  0.34 / 0.37 for true 0.3 / 0.4). The table's "init" row shows what the warm start alone gives;
- consistency objectives (cd, scm) learn the whole ODE, not one map, so their student starts as what
  CD prescribes, a copy of the teacher: the MLP regressed onto the teacher's exact denoiser at every
  level ("init (teacher copy)" rows). They are scored at one, two and four steps, with fresh noise between
  steps (lcm) and with the implied noise (ddim: deterministic consistency sampling); progressive ones (hyper-sd)
  also with each finished stage's student at its own step count (``score_stages``);
- each objective then trains through the ordinary ``Trainer`` from its start.
Metrics on ``num_eval`` samples: sliced Wasserstein-2 to exact samples, its floor, and the largest error of a
mode's weight. The floor is what an exact sampler scores: the mean sw2 of ``FLOOR_DRAWS`` fresh exact sample sets
against the same truth set and directions. One draw (what the bench divided by before 2026-11-29, kept in the JSON
as ``sw2_floor_single``) is a noisy estimate: over 16 draws its sd is ~25% of the mean, and seed 0's single draw,
0.0207, sat 17% below its 16-draw mean, 0.0250, inflating every seed-0 ratio by 21% (eval/results/bench-gmm-cpu).
The teacher's own 1-, 2- and 4-step DDIM are rows too.
"""
from __future__ import annotations

import copy
import json
import tempfile
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..models.analytic import GaussianMixtureModel, sliced_wasserstein
from ..training.checkpoint import atomic_write_text
from ..machine import describe
from ..machine import progress as progress_bar
from ..config import Config, _apply, parse_override, validate
from ..models.denoiser import Denoiser
from ..errors import FastdiffError
from ..models.generator import Generator
from ..models.flow_map import FlowMapGenerator, flow_map_embedding
from ..models.mlp import MLPDenoiser
from ..inference.sampling import ddim_sample
from ..models.teacher import Teacher, load_teacher
from ..objectives import objective_class
from ..training import Trainer

DEFAULT_OBJECTIVES = ("dmd2", "sid", "sida", "sim", "vsd")
# Per objective: generator steps and objective settings. Every objective uses its own defaults except the
# update ratio: five fake-score updates per generator update (DMD2's two time-scale rule) for all, because
# with 1:1 updates the fake score lags the generator and that lag, not the objective, dominated the error
# (SIM at 1:1: 2.27 x floor, mode error 0.033; at 5:1: 1.71 x floor, 0.017; same start and seed).
SETTINGS = {name: {"steps": 400, "objective": {"critic_updates": 5}} for name in ("dmd2", "vsd", "sid", "sida", "sim")}
SETTINGS["vsd"]["objective"]["fake_lora_rank"] = 0  # the analytic teacher has no layers to put a LoRA on
# DisBack (dmd2 + backtracking) on dmd2's budget of 400 trainer steps, its stage 1 included (no generator updates
# there): the reference's proportions shortened, 4 path checkpoints over 40 stage-1 steps, 40 updates per node.
SETTINGS["disback"] = {"steps": 400, "objective": {"critic_updates": 5, "backtrack": 4, "degradation_steps": 40,
                                                   "backtrack_interval": 40}}
# Consistency objectives: every update is one regression (no fake score), so more of them fit. Settings from a
# sweep (eval/results/bench-gmm-cpu/README.md): cd with Heun steps on an 18-interval Karras grid (the teacher's
# own Heun-18 chain is 1.22 x floor; a 50-step DDIM chain, cd's default, 1.85 x) and l2; scm with wider noise
# levels than sCM's images (ln sigma ~ N(0.5, 2^2)) so the top of the schedule, where one step starts, is trained.
# Both with a cosine learning rate.
SETTINGS["cd"] = {"steps": 4000, "objective": {"num_intervals": 18, "grid": "karras", "solver": "heun", "distance": "l2"},
                  "train": {"lr_generator": 5e-4, "lr_schedule": "cosine", "ema_decay": 0.999}}
# sCM's loss weighting (1 / sigma prior and the learned log-variance) is off here: with the widened noise levels it
# measured 4.68 x floor at one step (adaptive alone 6.01 x) against 2.47 x unweighted (eval/results/bench-gmm-cpu).
SETTINGS["scm"] = {"steps": 2000, "objective": {"tangent_warmup": 500, "p_mean": 0.5, "p_std": 2.0,
                                                "prior_weighting": False, "adaptive_weighting": False},
                   "train": {"lr_generator": 1e-3, "lr_schedule": "cosine", "ema_decay": 0.995}}
# rCM: the bench's scm settings (its sCM term) plus rCM's DMD term and 4:1 fake-score updates at their defaults.
SETTINGS["rcm"] = {"steps": 2000, "objective": {"tangent_warmup": 500, "p_mean": 0.5, "p_std": 2.0},
                   "train": {"lr_generator": 1e-3, "lr_schedule": "cosine", "ema_decay": 0.995}}
# f-distill and Uni-Instruct (their discriminators read the mixture's real samples, data.name analytic): 5:1 as the
# rest. Uni-Instruct's divergence weighting starts at 200k images in the reference, past this run's 102k, so here it
# starts half way (51200), after 1000 discriminator updates.
SETTINGS["fdistill"] = {"steps": 400, "objective": {"critic_updates": 5}}
SETTINGS["uni_instruct"] = {"steps": 400, "objective": {"critic_updates": 5, "gan_start_images": 51200}}
# SiDA's and Uni-Instruct's references hold the generator for its first 100k images, 98% of these 400 updates of 256;
# the bench measures the generator's loss within its budget, its fake score already kept up by the 5:1 updates, so
# no hold here.
for _name in ("sida", "uni_instruct"):
    SETTINGS[_name]["objective"]["generator_hold_images"] = 0
# Reflow (Lee et al. 2024): the teacher copy regressed on 32k (noise, Heun-40 sample) pairs of the teacher's ODE
# (``fastdiff pairs``), U-shaped t and pseudo-Huber as the paper; lr and schedule as the bench's cd. Its Euler
# sampler is the "ddim" rows. 6000 updates: at 2000 one step was 8.3 x floor and two Euler steps 4.4 x; at 6000
# 2.9 x and 1.5 x (AMD EPYC, 1 thread, seed 0).
SETTINGS["reflow"] = {"steps": 6000, "objective": {}, "student": {"sampler": "ddim"},
                      "pairs": {"num": 32768, "steps": 40, "sampler": "heun"},
                      "train": {"lr_generator": 5e-4, "lr_schedule": "cosine", "ema_decay": 0.999,
                                "lr_warmup_steps": 0}}
# TDM: a 4-step student on its deterministic (ddim) trajectory, as the reference samples; it starts, as the reference's
# student does, as a copy of the teacher (the denoiser warm start), scored at its own step count. Measured (seed 0,
# 400 updates; the start, 4 ddim steps: 5.81 x floor, mode error 0.047): ddim + huber (the reference) 5.25 x, 0.079;
# ddim + l2 4.08 x, 0.069 (without the importance weight 3.64 x, 0.044); lcm + l2 3.08 x, 0.020 (800 updates: 3.90 x, 0.031);
# lcm + huber 6.61 x, 0.099 (huber's c = 1e-3 is a sign gradient).
SETTINGS["tdm"] = {"steps": 400, "objective": {"critic_updates": 5}, "student": {"num_steps": 4, "sampler": "ddim"},
                   "init": "denoiser"}
# BOOT: data-free bootstrapping; its student starts as the paper's, a copy of the teacher (the denoiser warm start),
# and reads g(eps, 0) at sigma_init 2.5 (the trainer's auto; objectives/boot.py). lr and schedule as the bench's cd.
SETTINGS["boot"] = {"steps": 4000, "objective": {}, "student": {"sigma_init": 2.5}, "init": "denoiser",
                    "train": {"lr_generator": 5e-4, "lr_schedule": "cosine", "ema_decay": 0.999}}
# MeanFlow: one two-time student sampled with K map steps (models/flow_map.py); the bench's scm noise levels and
# learning rate (t and r from ln sigma ~ N(0.5, 2^2), so the top, where one step starts, is trained) and FastGen's
# buckets, 25% r = t and 25% r = 0 (AnyFlow's; the paper's 75% r = t: 17.1 / 7.41 / 3.89 x floor at 1 / 2 / 4 steps
# at p = 1); plain L2 (adaptive_power 0): 4.20 / 3.36 / 3.79 x at 2000 updates, where the paper's p = 1 weight left
# the one-step map at the teacher's (21.7 / 3.62 / 2.35 x; 500 updates: p = 1 20.5 / 4.82 / 2.75, p = 0.5 4.42 /
# 3.43 / 4.00, p = 0 4.42 / 3.11 / 3.55; eval/results/bench-gmm-cpu/meanflow-variants.jsonl). Then (16-draw floor):
# the (t - r) du/dt term warmed up over 500 updates (as the bench's scm): on from the first update it wrecks the
# student's low levels (its r = t denoiser at sigma 0.5 ends 0.22 RMS from the teacher's; 0.06 warmed up), and with
# the warm-up 2000 updates are no plateau. 1 / 2 / 4 steps, seeds 0 / 1 / 2: 2000 updates without warm-up 3.47 / 2.78
# / 3.13, 3.52 / 2.63 / 2.99, 3.31 / 2.77 / 2.96 x; with it 3.11 / 2.14 / 1.17, 3.28 / 2.20 / 0.86, 3.09 / 2.44 /
# 1.33; 4000 updates with it 2.06 / 1.67 / 1.30, 2.34 / 1.76 / 1.63, 2.07 / 1.89 / 1.55 x (2-step mode-weight error
# 0.013 / 0.017 / 0.020). README's "MeanFlow's 2-step miss, part 2", eval/results/bench-gmm-cpu/meanflow-part2.jsonl.
SETTINGS["meanflow"] = {"steps": 4000, "objective": {"p_mean": 0.5, "p_std": 2.0, "flow_matching_ratio": 0.25,
                                                     "consistency_ratio": 0.25, "adaptive_power": 0.0,
                                                     "tangent_warmup": 500},
                        "train": {"lr_generator": 1e-3, "lr_schedule": "cosine", "ema_decay": 0.995}}
# Align Your Flow (AYF-EMD by default; objective.map_loss lagrangian for LMD): meanflow's levels, buckets and learning
# rate, with AYF's normalised tangent in place of MeanFlow's weight. 500 updates (seed 0): EMD 4.43 / 3.39 / 4.00 x floor
# at 1 / 2 / 4 steps (meanflow p = 0.5: 4.42 / 3.43 / 4.00, the same target), LMD 6.88 / 6.00 / 5.01 x.
# With its tangent warm-up (500, now its default as meanflow's), 2000 updates, seeds 0 / 1: 2.92 / 2.03 / 1.38 and
# 2.64 / 1.84 / 0.98 x at 1 / 2 / 4 steps, against 2.39 / 2.35 / 2.82 and 2.62 / 2.32 / 2.30 x without.
SETTINGS["ayf"] = {"steps": 2000, "objective": {"p_mean": 0.5, "p_std": 2.0, "flow_matching_ratio": 0.25,
                                                "consistency_ratio": 0.25},
                   "train": {"lr_generator": 1e-3, "lr_schedule": "cosine", "ema_decay": 0.995}}
# Hyper-SD: TSCD on a 40-interval LCM grid (edges at the 8-, 4-, 2-step sampler's levels) with cd's Heun steps, l2 and
# learning rate; segments 8 -> 4 -> 2 -> 1, 1000 updates each. Its segments are walked by the ddim rows.
SETTINGS["hyper-sd"] = {"steps": 4000, "objective": {"num_intervals": 40, "solver": "heun", "distance": "l2",
                                                     "segments": [8, 4, 2, 1], "stage_steps": [1000, 1000, 1000]},
                        "train": {"lr_generator": 5e-4, "lr_schedule": "cosine", "ema_decay": 0.999}}
SETTINGS["hyper-sd-dmd"] = {**SETTINGS["hyper-sd"], "objective": {**SETTINGS["hyper-sd"]["objective"]}}
SAMPLING_STEPS = (1, 2, 4)  # consistency students are scored at these step counts
# The MLP student per start. A consistency function must be right at every noise level, not at one:
# regressing the 256x3 MLP straight onto exact consistency targets (Heun-200 chains, 4000 cosine steps)
# gave 2.35 / 1.94 x floor at one / two steps, a 512x4 one 2.04 / 1.64 x, so consistency students get that.
STUDENT = {"ode": {}, "denoiser": {"hidden": 512, "depth": 4}}
TRAIN = {"batch_size": 256, "lr_generator": 1e-4, "lr_critic": 3e-3, "ema_decay": 0.99, "weight_decay": 0.0,
         "adam_betas": [0.0, 0.999], "checkpoint_every": 10**9, "sample_every": 10**9, "checkpoint_limit": 1}


def warm_start(teacher: Teacher, out: Path, kind: str = "ode", num_pairs: int = 16384, steps: int = 2500,
               ode_steps: int = 200, seed: int = 0, hidden: int = 256, depth: int = 3, progress: bool = False) -> Path:
    """Fit an MLP by regression and save it as a model folder.

    kind "ode": the one-step map z -> teacher ODE sample (200-step DDIM from the top).
    kind "denoiser": the teacher's exact x0 estimate at every training timestep (a copy of the teacher).
    """
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the MLP's initial weights
    c, s, _ = teacher.sample_shape
    cfg = teacher.model.config
    model = MLPDenoiser(sample_size=s, in_channels=c, hidden=hidden, depth=depth, num_train_timesteps=cfg.num_train_timesteps,
                        beta_start=cfg.beta_start, beta_end=cfg.beta_end, beta_schedule=cfg.beta_schedule)
    student = Denoiser(model, teacher.denoiser.schedule, teacher.denoiser.prediction_type)
    if kind == "ode":
        z = torch.randn(num_pairs, *teacher.sample_shape, generator=gen)
        target = ddim_sample(teacher.denoiser, z, ode_steps)
        one_step = Generator(student, 1, None)

        def loss_of(idx):
            return ((one_step.training_sample(z[idx]) - target[idx]) ** 2).mean()
    else:
        x0 = teacher.model.sample_true(num_pairs, gen)
        table = teacher.denoiser.schedule

        def loss_of(idx):
            sigma = table.sigma_at(torch.randint(table.num_train_timesteps, (len(idx),), generator=gen))
            x = x0[idx] + sigma.reshape(-1, 1, 1, 1) * torch.randn(x0[idx].shape, generator=gen)
            with torch.no_grad():
                target = teacher.denoiser(x, sigma)
            return ((student(x, sigma) - target) ** 2).mean()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    decay = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)  # the low final lr sharpens mode boundaries
    for _ in progress_bar(range(steps), desc=f"warm start ({kind})", unit="step", enabled=progress):
        loss = loss_of(torch.randint(num_pairs, (256,), generator=gen))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        decay.step()
    model.save_pretrained(out)
    return out


def score(samples: torch.Tensor, truth: torch.Tensor, gmm: GaussianMixtureModel) -> dict:
    weights_error = (gmm.mode_weights(samples).double() - gmm.log_weights.detach().double().exp()).abs().max()
    # Rounded to 1e-6: weights are counts / n, and float32 logits would turn 0.0200 into 0.02000001.
    return {"sw2": sliced_wasserstein(samples, truth), "max_mode_weight_error": round(float(weights_error), 6)}


def train_objective(name: str, teacher_dir: Path, init_dir: Path, out: Path, steps: int, seed: int,
                    overrides=(), stages: dict | None = None) -> Trainer:
    """The trained Trainer; ``stages`` (a dict) receives each finished stage's student generator by segment count
    (progressive objectives: hyper-sd's per-step-count students)."""
    data = {"name": "analytic"}
    if "pairs" in SETTINGS[name]:  # reflow: the teacher's ODE pairs, made once per seed under the work folder
        from ..training.pairs import make_pairs

        spec = SETTINGS[name]["pairs"]
        folder = teacher_dir.parent / f"pairs-{seed}"
        make_pairs(str(teacher_dir), folder, spec["num"], spec["steps"], batch_size=4096, seed=seed,
                   sampler=spec["sampler"], device="cpu")
        data = {"name": "pairs", "path": str(folder)}
    cfg = Config()
    _apply(cfg, {"teacher": {"path": str(teacher_dir)},
                 "student": {"model": str(init_dir), "sigma_init": None, "num_steps": 1,
                             **SETTINGS[name].get("student", {})},
                 "objective": {"name": name, **SETTINGS[name]["objective"]},
                 "data": data,
                 "train": {**TRAIN, **SETTINGS[name].get("train", {}), "max_steps": steps, "log_every": steps,
                           "seed": seed},
                 "output_dir": str(out)})
    for item in overrides:  # --set: the user's changes win over the benchmark's settings
        _apply(cfg, parse_override(item))
    validate(cfg)
    trainer = Trainer(cfg, overwrite=True, progress=False)
    keep = None if stages is None else lambda k: stages.__setitem__(k, copy.deepcopy(trainer.export_generator()))
    trainer.fit(export=False, on_stage_end=keep)
    return trainer


def score_stages(add, name: str, stages: dict, final, z: torch.Tensor, n: int, t0: float) -> None:
    """Each stage's student at its own step count on the deterministic sampler its segments are walked by (the
    8-segment one at 4 steps too), and the final student at 8 steps beside the 8-segment one."""
    for k, student in stages.items():
        student.sampler = "ddim"
        for steps in (k, 4) if k == 8 else (k,):
            with torch.no_grad():
                add(f"{name} stage k{k}, {steps} steps ddim", student(z, num_steps=steps), "stage", n, t0)
    if 8 in stages:
        with torch.no_grad():
            add(f"{name}, 8 steps ddim", final(z, num_steps=8), "objective", n, t0)


def row_recorder(rows: list, truth: torch.Tensor, gmm, floor: float, log):
    """``add(name, samples, kind, train_steps, t0)``: score samples against the mixture, append the row, log a line."""
    def add(name: str, samples: torch.Tensor, kind: str, train_steps: int, t0: float) -> None:
        row = {"objective": name, "kind": kind, **score(samples, truth, gmm), "sw2_floor": floor,
               "steps": train_steps, "seconds": round(time.time() - t0, 1)}
        row["sw2_over_floor"] = row["sw2"] / floor
        rows.append(row)
        with tqdm.external_write_mode():  # the line above any bar on the terminal, not through it
            log(f"  {name}: sw2 {row['sw2']:.4f} ({row['sw2_over_floor']:.2f} x floor), "
                f"max mode-weight error {row['max_mode_weight_error']:.4f}, {row['seconds']} s")
    return add


def run(objectives=DEFAULT_OBJECTIVES, steps: int | None = None, num_eval: int = 5000, seed: int = 0,
        work_dir: str | None = None, log=print, overrides=(), progress: bool = False) -> dict:
    """The table's rows; ``progress``: bars on a terminal's stderr over the warm starts and the objectives."""
    unknown = [o for o in objectives if o not in SETTINGS]
    if unknown:
        raise FastdiffError(f"--objectives: unknown {unknown[0]!r}; choose from {', '.join(SETTINGS)}")
    if num_eval < 100 or (steps is not None and steps <= 0):
        raise FastdiffError("--num-eval must be at least 100 and --steps positive")
    for item in overrides:  # a wrong key fails now, not after the warm start
        _apply(Config(), parse_override(item))
    start = time.time()
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        tmp = Path(tmp)
        gmm = GaussianMixtureModel()
        gmm.save_teacher(tmp / "teacher")
        teacher = load_teacher(str(tmp / "teacher"))
        truth = gmm.sample_true(num_eval, torch.Generator().manual_seed(seed + 1))
        floors = exact_floor(gmm, truth, seed)
        floor = floors["sw2_floor"]
        z = torch.randn(num_eval, *teacher.sample_shape, generator=torch.Generator().manual_seed(seed + 3))
        rows = []

        add = row_recorder(rows, truth, gmm, floor, log)

        for k in (1, 2, 4):
            t0 = time.time()
            add(f"teacher-ddim-{k}", ddim_sample(teacher.denoiser, z, k), "teacher", 0, t0)
        inits = {}
        for kind, label in (("ode", "init (ODE regression)"), ("denoiser", "init (teacher copy)")):
            if not any(init_kind(o) == kind for o in objectives):
                continue
            t0 = time.time()
            inits[kind] = warm_start(teacher, tmp / f"init-{kind}", kind, seed=seed, progress=progress, **STUDENT[kind])
            init_gen = Generator(Denoiser(MLPDenoiser.from_pretrained(inits[kind]), teacher.denoiser.schedule, "sample"))
            for k in SAMPLING_STEPS if kind == "denoiser" else (1,):
                with torch.no_grad():
                    add(label + ("" if k == 1 else f", {k} steps"), init_gen(z, num_steps=k, rng=eval_rng(seed)),
                        "init", 0, t0)
        for name in progress_bar(objectives, desc="bench gmm", unit="objective", enabled=progress):
            t0 = time.time()
            n = steps or SETTINGS[name]["steps"]
            init = inits[init_kind(name)]
            stages = {}
            student = train_objective(name, tmp / "teacher", init, tmp / name, n, seed, overrides,
                                      stages).export_generator()
            flow_map = flow_map_embedding(student.denoiser.model) is not None
            if flow_map:  # a meanflow student: K map steps to the next level, one student for every K
                student = FlowMapGenerator(student.denoiser, student.num_steps, student.sigma_init)
            student.eval()
            for k in SAMPLING_STEPS if is_consistency(name) else (student.num_steps,):
                with torch.no_grad():
                    samples = student(z, num_steps=k, rng=eval_rng(seed))
                add(name if k == 1 else f"{name}, {k} steps", samples, "objective", n, t0)
            if flow_map:  # the same student on levels uniform in flow time (FlowMapGenerator's levels="flow")
                flow = FlowMapGenerator(student.denoiser, student.num_steps, student.sigma_init, levels="flow").eval()
                for k in SAMPLING_STEPS[1:]:
                    with torch.no_grad():
                        add(f"{name}, {k} steps, flow levels {flow.timesteps(k)}", flow(z, num_steps=k), "objective",
                            n, t0)
            if is_consistency(name) and not flow_map:  # the deterministic consistency sampler (student.sampler: ddim)
                student.sampler = "ddim"
                for k in SAMPLING_STEPS[1:]:
                    with torch.no_grad():
                        add(f"{name}, {k} steps ddim", student(z, num_steps=k), "objective", n, t0)
                score_stages(add, name, stages, student, z, n, t0)
    return {"machine": describe("cpu"),
            "overrides": list(overrides), "num_eval": num_eval, "seed": seed, **floors, "seconds": round(time.time() - start, 1), "rows": rows}


def is_consistency(name: str) -> bool:
    return objective_class(name).trains_on == "data"


def init_kind(name: str) -> str:
    """The warm start an objective's student gets: "denoiser" (a teacher copy) or "ode" (the one-step map)."""
    return "denoiser" if is_consistency(name) else SETTINGS[name].get("init", "ode")


FLOOR_DRAWS = 16  # the floor's standard error is then ~6% of it (one draw: ~25%)


def exact_floor(gmm, truth: torch.Tensor, seed: int) -> dict:
    """The floor (module doc): the mean sw2 of FLOOR_DRAWS exact sample sets against ``truth``, their sd, and the
    single draw the bench used before (``seed + 2``). The draws' streams are apart from every other of the bench."""
    n = truth.shape[0]
    draws = torch.tensor([sliced_wasserstein(truth, gmm.sample_true(n, torch.Generator().manual_seed(
        10_000 * (seed + 1) + k))) for k in range(FLOOR_DRAWS)], dtype=torch.float64)
    single = sliced_wasserstein(truth, gmm.sample_true(n, torch.Generator().manual_seed(seed + 2)))
    return {"sw2_floor": float(draws.mean()), "sw2_floor_sd": float(draws.std()), "floor_draws": FLOOR_DRAWS,
            "sw2_floor_single": single}


def eval_rng(seed: int) -> torch.Generator:
    """The re-noising noise of multi-step evaluation samples (the same for every row)."""
    return torch.Generator().manual_seed(seed + 4)


def table(result: dict) -> str:
    changed = f", --set {' '.join(result['overrides'])}" if result["overrides"] else ""
    lines = [f"fastdiff bench gmm: few-step students vs the exact mixture (n = {result['num_eval']}, "
             f"{result['machine']}, {result['seconds']} s{changed})",
             f"{'objective':<30}{'sw2':>8}{'/floor':>8}{'max |w err|':>13}{'steps':>7}{'seconds':>9}"]
    for r in result["rows"]:
        lines.append(f"{r['objective']:<30}{r['sw2']:>8.4f}{r['sw2_over_floor']:>8.2f}"
                     f"{r['max_mode_weight_error']:>13.4f}{r['steps']:>7}{r['seconds']:>9}")
    lines.append(f"floor (mean sw2 of {result['floor_draws']} exact sample sets against the same truth): sw2 "
                 f"{result['sw2_floor']:.4f} (sd {result['sw2_floor_sd']:.4f}); target: sw2 <= 2 x floor, "
                 "|w err| <= 0.02, better than teacher-ddim-4")
    return "\n".join(lines)


def write_json(result: dict, path: str) -> None:
    keep = ("objective", "sw2", "sw2_floor", "max_mode_weight_error", "kind", "steps", "seconds")
    rows = [{k: r[k] for k in keep} for r in result["rows"]]
    # the seed draws the floor's and the scores' samples too (the mixture is fixed): rows compare within one seed
    meta = {k: result[k] for k in ("machine", "overrides", "num_eval", "seed", "sw2_floor", "sw2_floor_sd",
                                   "floor_draws", "sw2_floor_single", "seconds") if k in result}
    atomic_write_text(Path(path), json.dumps({**meta, "rows": rows}, indent=2))
