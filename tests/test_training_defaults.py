"""Training defaults as the reference code has them: the generator EMA (SiD's ramped half-life), each objective's
optimizer settings (DMD2's and SiD's scripts), DMD2's critic-update counts, and backward simulation that re-noises
as the sampler does, and README's table of them."""
import ast
import math
import re
from pathlib import Path

import pytest
import torch

from fastdiff.config import load_config
from fastdiff.models.denoiser import Denoiser
from fastdiff.models.generator import Generator
from fastdiff.training.setup import ema_beta, resolve_train_defaults
from conftest import small_trainer, tiny_unet


def sid_reference_ema_beta(cur_nimg, batch_size, ema_halflife_kimg, ema_rampup_ratio):
    """mingyuanzhou/SiD, training/sid_training_loop.py, 'Update EMA.' (transcribed)."""
    ema_halflife_nimg = ema_halflife_kimg * 1000
    if ema_rampup_ratio is not None:
        ema_halflife_nimg = min(ema_halflife_nimg, cur_nimg * ema_rampup_ratio)
    return 0.5 ** (batch_size / max(ema_halflife_nimg, 1e-8))


@pytest.mark.parametrize("halflife,rampup", [(500.0, 0.05), (2.0, 0.05), (500.0, None), (0.1, 0.2)])
def test_ema_beta_is_sids(halflife, rampup):
    train = load_config(None, [f"train.ema_halflife_kimg={halflife}", f"train.ema_rampup={rampup}" if rampup
                               else "train.ema_rampup=null"]).train
    for step in (0, 1, 7, 100, 5000):
        # SiD counts cur_nimg before the update it is about to average in: step * batch here.
        assert ema_beta(step, 64, train) == sid_reference_ema_beta(step * 64, 64, halflife, rampup)


def rcm_reference_ema_beta(iteration: int, s: float) -> float:
    """NVlabs/rcm, rcm/models/t2v_model_distill_rcm.py: ``ema_exp_coefficient`` (in ``__init__``) and ``ema_beta``
    with ``iteration_shift`` 0 (rcm/configs/defaults/ema.py), transcribed."""
    import numpy as np

    ema_exp_coefficient = np.roots([1, 7, 16 - s**-2, 12 - s**-2]).real.max()
    if iteration < 1:
        return 0.0
    return (1 - 1 / (iteration + 1)) ** (ema_exp_coefficient + 1)


@pytest.mark.parametrize("sigma_rel", [0.1, 0.05, 0.2])
def test_power_ema_is_rcms_and_edm2s(sigma_rel):
    """``train.ema_sigma_rel``: rcm's PowerEMA beta per student iteration; its gamma has EDM2's relative width,
    ``sigma_rel = sqrt((g + 1) / ((g + 2)^2 (g + 3)))`` (Karras et al. 2024, Eq. 3), checked in float64."""
    from fastdiff.training.setup import power_ema_exponent

    train = load_config(None, [f"train.ema_sigma_rel={sigma_rel}"]).train
    for step in (0, 1, 2, 7, 100, 5000):
        assert ema_beta(step, 64, train) == rcm_reference_ema_beta(step, sigma_rel)
    g = power_ema_exponent(sigma_rel)
    assert abs(math.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3))) - sigma_rel) < 1e-12
    if sigma_rel == 0.1:
        assert abs(g - 6.94) < 0.01  # the value EDM2 quotes for sigma_rel 0.10
    # The averaged weights: a power-function profile over the iterates, p_t proportional to t^gamma
    n = 200
    weights = [1 - ema_beta(s, 64, train) for s in range(n)]
    for s in range(n):
        weights[s] *= math.prod(ema_beta(k, 64, train) for k in range(s + 1, n))
    ratio = weights[n - 1] / weights[n // 2 - 1]
    assert abs(ratio - 2 ** g) < 0.05 * 2 ** g  # t^gamma between t = n/2 and n, up to discretisation


@pytest.mark.parametrize("sets,fragment", [(["train.ema_sigma_rel=0.3"], "must be in (0, 0.28)"),
                                           (["train.ema_sigma_rel=0.1", "train.ema_decay=0.99"], "two EMA rules")])
def test_power_ema_bad_settings(sets, fragment):
    from fastdiff.errors import FastdiffError

    with pytest.raises(FastdiffError, match=re.escape(fragment)):
        load_config(None, sets)


def start_weight(steps: int, batch: int, train) -> float:
    """Weight of the student's initial parameters in the EMA after ``steps`` updates (product of the betas)."""
    return math.prod(ema_beta(s, batch, train) for s in range(steps))


def test_default_ema_never_exports_the_start():
    default = load_config(None).train
    assert default.ema_decay is None and default.ema_halflife_kimg == 500 and default.ema_rampup == 0.05
    # A default-length run (1000 updates of 64 images) and a short one keep none of the start: the first beta is 0.
    assert start_weight(1000, 64, default) == 0.0 and start_weight(10, 8, default) == 0.0
    # The weight of the first 5% of a default-length run in the exported EMA is below 5%: products of the betas
    # after update 50, i.e. what is left of everything averaged in up to then.
    tail = math.prod(ema_beta(s, 64, default) for s in range(50, 1000))
    assert tail < 0.05, tail
    # What the issue was about: the old fixed decay 0.999 kept 37% of the start after 1000 updates.
    fixed = load_config(None, ["train.ema_decay=0.999"]).train
    assert abs(start_weight(1000, 64, fixed) - 0.999 ** 1000) < 1e-12 and start_weight(1000, 64, fixed) > 0.36


def _trainer(teacher, tmp_path, *sets):
    return small_trainer(teacher, tmp_path / "run", "train.lr_generator=1e-3", *sets)


@pytest.mark.parametrize("sets,beta_range", [([], (0, 1e-5)), (["train.ema_sigma_rel=0.1"], (0.003, 0.005))])
def test_first_ema_update_copies_the_student_and_later_ones_average(tiny_teacher, tmp_path, sets, beta_range):
    trainer = _trainer(tiny_teacher, tmp_path, *sets)
    student = trainer.generator.denoiser.model
    start = {k: v.clone() for k, v in student.state_dict().items()}
    trainer.train_step()
    trainer.step += 1
    for (name, e), p in zip(trainer.ema.named_parameters(), student.parameters()):
        assert torch.equal(e, p), name  # beta 0: lerp_(p, 1) writes p exactly
    assert any(not torch.equal(start[n], p) for n, p in student.named_parameters())
    ema_before = [e.clone() for e in trainer.ema.parameters()]
    trainer.train_step()
    beta = ema_beta(1, 2, trainer.cfg.train)  # 0.5 ** (2 / (2 * 0.05)), or 0.5 ** (gamma + 1): float64
    assert beta_range[0] < beta < beta_range[1]
    for e0, e, p in zip(ema_before, trainer.ema.parameters(), student.parameters()):
        # lerp in float32: |error| <= a few eps of the magnitudes involved
        tol = 4 * torch.finfo(torch.float32).eps * (e0.abs() + p.abs()).max().item() + 1e-30
        assert (e - (beta * e0.double() + (1 - beta) * p.double()).float()).abs().max() <= tol


@pytest.mark.parametrize("name,betas,wd,warmup", [("dmd2", [0.9, 0.999], 0.01, 100), ("vsd", [0.9, 0.999], 0.0, 0),
                                                  ("sid", [0.0, 0.999], 0.0, 0), ("sim", [0.0, 0.999], 0.0, 0),
                                                  ("cd", [0.9, 0.999], 0.01, 0)])
def test_objective_optimizer_defaults(name, betas, wd, warmup, tiny_teacher, tmp_path):
    sets = [f"objective.name={name}", "objective.critic_updates=5"] if name == "dmd2" else [f"objective.name={name}"]
    cfg = load_config(None, [f"teacher.path={tiny_teacher}", *sets])
    from fastdiff.objectives import OBJECTIVES

    cls, variant = OBJECTIVES[name].cls, OBJECTIVES[name].defaults
    obj = cls.__new__(cls)  # train_defaults reads only the settings it names
    obj.critic_updates, obj.weighting = (5 if name == "dmd2" else 1), variant.get("weighting", "dmd")
    resolve_train_defaults(cfg, obj)
    assert (cfg.train.adam_betas, cfg.train.weight_decay, cfg.train.lr_warmup_steps) == (betas, wd, warmup)
    # Values a config gives are kept.
    cfg = load_config(None, [f"teacher.path={tiny_teacher}", *sets, "train.adam_betas=[0.5, 0.9]",
                             "train.weight_decay=0.1", "train.lr_warmup_steps=3"])
    resolve_train_defaults(cfg, obj)
    assert (cfg.train.adam_betas, cfg.train.weight_decay, cfg.train.lr_warmup_steps) == ([0.5, 0.9], 0.1, 3)


def test_trainer_uses_the_resolved_optimizer(tiny_teacher, tmp_path):
    trainer = _trainer(tiny_teacher, tmp_path, "objective.name=sid")
    group = trainer.opt_g.opt.param_groups[0]
    assert group["betas"] == (0.0, 0.999) and group["weight_decay"] == 0.0
    trainer = _trainer(tiny_teacher, tmp_path, "objective.critic_updates=5")
    group = trainer.opt_g.opt.param_groups[0]
    assert group["betas"] == (0.9, 0.999) and group["weight_decay"] == 0.01
    assert trainer.cfg.train.lr_warmup_steps == 100 and group["lr"] == pytest.approx(1e-3 / 100, rel=1e-12)


@pytest.mark.parametrize("sampler", ["ddim", "lcm"])
def test_backward_simulation_renoises_as_the_sampler_does(sampler):
    """The input of the trained step is exactly the one the sampler feeds that step on the same noise and the same
    RNG draws: the implied noise (ddim, deterministic) or fresh noise (lcm). Before backward simulation honoured
    the sampler, ddim students were trained on lcm-style fresh-noise inputs (the ddim case failed)."""
    from diffusers import DDPMScheduler

    from fastdiff.models.schedule import schedule_from_scheduler

    schedule = schedule_from_scheduler(DDPMScheduler())
    student = Denoiser(tiny_unet(seed=2), schedule, "epsilon")
    gen = Generator(student, num_steps=4, sampler=sampler)
    inputs = []
    hook = student.model.register_forward_pre_hook(
        lambda m, args, kwargs: inputs.append(kwargs["sample"].detach().clone()), with_kwargs=True)
    z = torch.randn(2, 1, 8, 8)
    checked = 0
    for seed in range(40):
        torch.manual_seed(seed)
        k = int(torch.randint(4, (1,)))
        if k == 0:
            continue
        inputs.clear()
        with torch.no_grad():
            gen(z)  # the sampler's own trajectory from z; lcm's fresh noise comes from the global RNG after k's draw
        sampled = [x.clone() for x in inputs]
        inputs.clear()
        torch.manual_seed(seed)
        gen.training_sample(z)  # draws k, then the same fresh noise as the sampler
        assert len(inputs) == k + 1 and torch.equal(inputs[-1], sampled[k]), k
        checked += 1
    assert checked >= 10
    hook.remove()


def test_fashion_mnist_is_found_where_the_readme_says(tmp_path, monkeypatch):
    """data.path null: $FASTDIFF_FASHION_MNIST, else Debian's folder; missing: one line naming all three ways."""
    from fastdiff.training.data import FMNIST_DEFAULT, fashion_mnist_root
    from fastdiff.errors import FastdiffError

    assert load_config(None).data.path is None
    monkeypatch.setenv("FASTDIFF_FASHION_MNIST", str(tmp_path))
    assert fashion_mnist_root(None) == str(tmp_path)
    monkeypatch.delenv("FASTDIFF_FASHION_MNIST")
    import os

    if os.path.isdir(FMNIST_DEFAULT):
        assert fashion_mnist_root(None) == FMNIST_DEFAULT
    else:
        with pytest.raises(FastdiffError) as err:
            fashion_mnist_root(None)
        msg = str(err.value)
        assert "\n" not in msg and all(s in msg for s in ("data.path=DIR", "FASTDIFF_FASHION_MNIST",
                                                           "apt-get install dataset-fashion-mnist"))
    with pytest.raises(FastdiffError, match="--data-path DIR"):
        fashion_mnist_root(str(tmp_path / "nowhere"), "--data-path")


README = Path(__file__).resolve().parents[1] / "README.md"


def readme_defaults(key: str) -> dict[str, list[str]]:
    """The per-objective defaults README's configuration table gives for ``key``: its row's 'null = the
    objective's reference: NAMES VALUES (why); ...' (or, for a row without that phrase, its default column) read
    as {objective: [value, ...]}, with 'others' for every objective not named."""
    row = next(line for line in README.read_text().splitlines() if line.startswith(f"| `{key}`"))
    text = row.split(" | ")[-1].rstrip(" |") if "null = the objective's reference: " in row else row.split(" | ")[1]
    text = text.split("null = the objective's reference: ")[-1]
    text = re.sub(r" \([A-Za-z][^()]*\)", "", text)  # the reasons in brackets (values in brackets start with a digit)
    out = {}
    for group in text.split("; "):
        names, values = re.fullmatch(r"((?:[a-z_\-0-9]+, )*[a-z_\-0-9]+) (.+)", group.strip()).groups()
        for name in names.split(", "):
            assert name not in out, f"README names {name} twice in {key}'s row"
            out[name] = [v.strip(" `") for v in re.split(r",? and |, (?![^()]*\))", values)]
    return out


def resolved_defaults(name: str) -> dict:
    """What resolve_train_defaults fills in for ``objective.name: name`` at the objective's own defaults on a
    class-conditional teacher (an instance built without a model: train_defaults reads only its settings)."""
    from fastdiff.objectives import OBJECTIVES
    from fastdiff.training.setup import TRAIN_FALLBACKS

    entry = OBJECTIVES[name]
    obj = entry.cls.__new__(entry.cls)
    obj.__dict__.update({"weighting": "dmd", **entry.arguments({})})
    return {**TRAIN_FALLBACKS, "ema_decay": None, **obj.train_defaults(), "critic_updates": obj.critic_updates
            if "critic_updates" in entry.arguments({}) else None}


def test_readme_lists_every_objectives_training_defaults():
    """The configuration table's per-objective defaults (optimizer, learning rates, warm-up, EMA, critic updates)
    are what the trainer fills in, for every registered objective: a default changed in code and not in README
    (or the reverse) fails here."""
    from fastdiff.objectives import OBJECTIVES

    rows = {key: readme_defaults(key) for key in ("train.adam_betas", "train.lr_generator", "train.lr_schedule",
                                                  "train.ema_decay", "objective.critic_updates", "train.grad_clip")}
    unknown = {k: sorted(set(r) - set(OBJECTIVES) - {"others"}) for k, r in rows.items()}
    assert not any(unknown.values()), f"README names objectives that are not registered: {unknown}"
    assert set(rows["train.adam_betas"]) == set(OBJECTIVES), "README's optimizer row must name every objective"
    for name in OBJECTIVES:
        got = resolved_defaults(name)
        readme = {k: r.get(name, r.get("others")) for k, r in rows.items()}
        betas, wd = readme["train.adam_betas"]
        assert (ast.literal_eval(betas), float(wd)) == (tuple(got["adam_betas"]), got["weight_decay"]), name
        assert [float(v) for v in readme["train.lr_generator"]] == [got["lr_generator"], got["lr_critic"]], name
        (warmup,) = readme["train.lr_schedule"]
        assert (500 // got["critic_updates"] if warmup == "500 / critic_updates" else int(warmup)) == \
            got["lr_warmup_steps"], name
        ema = readme["train.ema_decay"][0]
        assert (None if ema == "the half-life above" else float(ema)) == got["ema_decay"], name
        assert float(readme["train.grad_clip"][0]) == got["grad_clip"], name
        if got["critic_updates"] is not None:
            assert int(readme["objective.critic_updates"][0]) == got["critic_updates"], name


def test_tf32_is_off_for_objectives_that_differentiate_along_time(tiny_teacher, tmp_path):
    """FastGen trains sCM and MeanFlow with TF32 off (``tf32_enabled = False``): their tangents are JVPs or finite
    differences of the networks, which a 10-bit mantissa would blur. The run sets matmul precision and cuDNN's TF32
    per objective (both process-wide, so every run sets them)."""
    from fastdiff.config import load_config
    from fastdiff.objectives import objective_class
    from fastdiff.training import Trainer
    from test_export_e2e import write_fake_fashion_mnist

    assert [n for n in ("scm", "rcm", "scm-ladd", "meanflow", "ayf", "dmd2", "cd") if not objective_class(n).tf32] == \
        ["scm", "rcm", "scm-ladd", "meanflow", "ayf"]
    write_fake_fashion_mnist(tmp_path / "fmnist", size=8)
    for name, precision in (("scm", "highest"), ("dmd2", "high"), ("meanflow", "highest")):
        cfg = load_config(None, [f"teacher.path={tiny_teacher}", f"objective.name={name}", "train.batch_size=2",
                                 f"data.path={tmp_path / 'fmnist'}", "data.resolution=8",
                                 f"output_dir={tmp_path / name}", "train.report_to=none"])
        Trainer(cfg, progress=False)
        assert torch.get_float32_matmul_precision() == precision, name
        assert torch.backends.cudnn.allow_tf32 == (precision == "high"), name


def test_each_objectives_gradient_clip_reaches_its_optimizers(tiny_teacher, tmp_path):
    """train.grad_clip null resolves to the reference's clip per objective (0 = none, an infinite bound that still
    measures the norm): reflow none (rfpp), cd LCM's 1, dmd2 DMD2's 10, tdm 1 on the student and none on its fake
    score (train_tdm_demo.py), ladd Sana's 0.1; a set value wins; and an unclipped gradient is left as it is."""
    import types

    from fastdiff.config import load_config
    from fastdiff.training import Trainer
    from fastdiff.training.optim import Optimizer
    from test_export_e2e import write_fake_fashion_mnist

    write_fake_fashion_mnist(tmp_path / "fmnist", size=8)
    common = [f"teacher.path={tiny_teacher}", "train.batch_size=2", f"data.path={tmp_path / 'fmnist'}",
              "data.resolution=8", "train.report_to=none"]
    for name, extra, generator, critic in (("cd", [], 1.0, None), ("dmd2", [], 10.0, 10.0), ("tdm", [], 1.0, math.inf),
                                           ("sid", [], math.inf, math.inf), ("dmd2", ["train.grad_clip=3"], 3.0, 3.0)):
        cfg = load_config(None, [*common, f"objective.name={name}", f"output_dir={tmp_path / name}", *extra])
        run = Trainer(cfg, progress=False)
        assert run.opt_g.clip == generator, name
        assert (run.opt_c.clip if run.opt_c else None) == critic, name
    w = torch.nn.Parameter(torch.zeros(2))
    train = types.SimpleNamespace(adam_betas=[0.9, 0.999], weight_decay=0.0, grad_clip=0.0, lr_warmup_steps=0,
                                  lr_schedule="constant", max_steps=10)
    opt = Optimizer([types.SimpleNamespace(parameters=lambda: [w])], 1e-3, types.SimpleNamespace(train=train), False)
    w.grad = torch.tensor([300.0, -400.0])
    norm, applied = opt.step(types.SimpleNamespace(num_processes=1))
    assert bool(applied) and float(norm) == 500.0 and opt.clip == math.inf
    # Adam's first moment after one step is (1 - beta1) x the gradient it was given: the whole, unclipped one
    assert torch.allclose(opt.opt.state[w]["exp_avg"], torch.tensor([30.0, -40.0]), rtol=1e-6)
