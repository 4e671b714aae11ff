"""Rules of the analytic teacher, the teacher loader, the student generator, the MLP student, reflow's pairs and the
teacher-sample pool that the rest of the suite left open (found by a mutation audit, 2026-11-30): each test pins one
formula or one rule against an independent computation (float64 quadrature, closed forms, seeded re-draws)."""
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler
from safetensors.torch import load_file, save_file
from torch import nn

import tiny_pipelines as tp
from fastdiff.errors import FastdiffError
from fastdiff.models.analytic import GaussianMixtureModel
from fastdiff.models.denoiser import Denoiser
from fastdiff.models.generator import step_sigmas, top_timestep
from fastdiff.models.mlp import MLPDenoiser
from fastdiff.models.schedule import FlowSchedule, VPSchedule
from fastdiff.models.teacher import could_be_hub_id, load_teacher
from fastdiff.models.trajectory import ode_sample, trajectory_levels
from fastdiff.training import sharding
from fastdiff.training.pairs import make_pairs, map_shard, shard_seed
from fastdiff.training.teacher_data import CHUNK, TeacherSamples, _chunk_seed

EPS32 = torch.finfo(torch.float32).eps


def _gmm_1d(weights=(0.3, 0.7), stds=(0.2, 0.5), means=(-1.0, 1.5), **kw):
    gmm = GaussianMixtureModel(sample_size=1, in_channels=1, weights=weights, stds=stds, **kw)
    with torch.no_grad():
        gmm.means.copy_(torch.tensor(means).reshape(-1, 1))
    return gmm


def test_analytic_denoiser_from_native_input_is_the_quadrature_posterior_mean():
    """E[x0 | x] of the 1-d mixture 0.3 N(-1, 0.2^2) + 0.7 N(1.5, 0.5^2) by float64 quadrature (the prior times the
    likelihood N(x; x0, sigma^2) on a fine x0 grid), from the configured weights, stds and means only, against the
    model's forward on the native VP input a x (a = 1 / sqrt(1 + sigma^2)) at five timesteps of its DDPM table."""
    w, s, mu = (0.3, 0.7), (0.2, 0.5), (-1.0, 1.5)
    gmm = _gmm_1d(w, s, mu)
    grid = torch.linspace(-8, 8, 200001, dtype=torch.float64)  # step 8e-5; the integrands are smooth on it
    prior = sum(wk * torch.exp(-0.5 * ((grid - m) / sk) ** 2) / sk for wk, sk, m in zip(w, s, mu))
    for t in (5, 100, 300, 600, 999):
        sigma = gmm._schedule.sigma_at(torch.tensor([t])).double()
        x = torch.linspace(-3, 3, 7, dtype=torch.float64) * (1 + sigma)  # spans both modes at every noise level
        post = prior[None] * torch.exp(-0.5 * ((x[:, None] - grid[None]) / sigma) ** 2)
        ref = (post * grid).sum(1) / post.sum(1)
        native = (x / torch.sqrt(1 + sigma ** 2)).float().reshape(-1, 1, 1, 1)
        with torch.no_grad():
            out = gmm(native, torch.full((7,), t), return_dict=False)[0].reshape(-1).double()
        # float32 model: the native input rounds by eps32 x |x| (<= 3 x 158 at t = 999, times the shrink factor
        # ~1e-5 there) and a few float32 operations on values <= 3.3; 1e-5 is ~30 eps32 x 3.3 (measured <= 6e-7).
        assert (out - ref).abs().max() < 1e-5, (t, (out - ref).abs().max())


def test_sample_true_modes_have_the_configured_means_and_stds():
    """Exact mixture samples: label k's samples are N(mu_k, s_k^2) with the configured s_k (not s_k^2)."""
    gmm = _gmm_1d()
    n = 20000
    for k, (m, s) in enumerate(zip((-1.0, 1.5), (0.2, 0.5))):
        x = gmm.sample_true(n, torch.Generator().manual_seed(k), class_labels=torch.full((n,), k)).double().reshape(-1)
        # sample sd has relative standard error 1 / sqrt(2 n) = 0.005: 0.03 is 6 of them; the mean's error is
        # s / sqrt(n) <= 0.0035, 0.02 is 5.6 of those.
        assert abs(float(x.std()) / s - 1) < 0.03 and abs(float(x.mean()) - m) < 0.02


def test_unet_teacher_last_class_embedding_is_the_null_class(tiny_cond_teacher):
    """A UNet with num_class_embeds = 4 has 3 real classes and the null class 3 (the last row), which CFG uses."""
    teacher = load_teacher(tiny_cond_teacher)
    assert (teacher.num_classes, teacher.null_class, teacher.denoiser.null_class) == (3, 3, 3)
    assert load_teacher(tiny_cond_teacher, null_class=0).denoiser.null_class == 0  # an explicit choice is kept


def test_null_class_outside_the_label_table_is_refused(tiny_cond_teacher):
    """Labels 0..3 exist (3 classes + null); 4 is one past the table and -1 is no label: both one-line errors."""
    for bad in (4, -1):
        with pytest.raises(FastdiffError, match=f"null_class {bad} is not one of"):
            load_teacher(tiny_cond_teacher, null_class=bad)


def test_dit_teacher_null_class_is_the_extra_label_row(tmp_path):
    """DiT's label table has num_embeds_ada_norm real classes plus one null row (diffusers' DiTPipeline feeds
    class_null = num_embeds_ada_norm, 1000 on ImageNet): the tiny DiT (10 classes) has null class 10."""
    teacher = load_teacher(str(tp.dit_pipeline(tmp_path / "dit")))
    assert (teacher.num_classes, teacher.null_class, teacher.denoiser.null_class) == (10, 10, 10)


def test_guidance_below_one_on_an_unconditional_teacher_is_refused(tiny_teacher):
    """Any scale other than 1 is CFG (0.5 extrapolates toward the unconditional output): it needs a condition."""
    for scale in (0.5, 2.0):
        with pytest.raises(FastdiffError, match="needs a class- or text-conditional teacher"):
            load_teacher(tiny_teacher, guidance_scale=scale)


def test_a_missing_bare_name_is_a_missing_folder_not_a_hub_id(tmp_path, monkeypatch):
    """Only ``owner/name`` may be a hub id: a bare missing name is a missing local folder, whatever the network."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert could_be_hub_id("owner/name") and not could_be_hub_id("teacher") and not could_be_hub_id("a/b/c")
    with pytest.raises(FastdiffError, match="'teacher' does not exist"):
        load_teacher("teacher")
    with pytest.raises(FastdiffError, match="HF_HUB_OFFLINE"):
        load_teacher("owner/name")


# --- reflow pairs ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gmm_class_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("gmm-class")
    GaussianMixtureModel(class_conditional=True).save_teacher(path)
    return path


def _make(teacher_dir, out, **kw):
    args = dict(num=10, steps=2, shard_size=4, batch_size=4, sampler="ddim", device="cpu") | kw
    return make_pairs(str(teacher_dir), out, **args)


def _load_shards(out):
    return [load_file(str(p)) for p in sorted(Path(out).glob("pairs-*.safetensors"))]


def test_each_shard_draws_its_own_noise(gmm_class_dir, tmp_path):
    """Shard i's noise comes from shard_seed(seed, i): no two shards repeat each other's noise (or their pairs)."""
    _make(gmm_class_dir, tmp_path / "p")
    shards = _load_shards(tmp_path / "p")
    assert [len(s["noise"]) for s in shards] == [4, 4, 2]
    for i, s in enumerate(shards):  # labels first, then the noise, from the shard's own generator
        gen = torch.Generator().manual_seed(shard_seed(0, i))
        torch.randint(4, (len(s["noise"]),), generator=gen)
        assert torch.equal(s["noise"], torch.randn(s["noise"].shape, generator=gen)), i
    assert not torch.equal(shards[0]["noise"][:2], shards[2]["noise"])


def test_overwrite_with_other_settings_remakes_every_shard(gmm_class_dir, tmp_path):
    """--overwrite with another seed deletes the old shards first: none of seed 0's pairs survive under seed 1."""
    out = tmp_path / "p"
    _make(gmm_class_dir, out)
    _make(gmm_class_dir, out, seed=1, overwrite=True)
    _make(gmm_class_dir, tmp_path / "fresh", seed=1)
    for a, b in zip(_load_shards(out), _load_shards(tmp_path / "fresh"), strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_pairs_follow_the_guided_ode(gmm_class_dir, tmp_path):
    """--guidance 3: each pair's sample is the teacher's guided ODE from the pair's noise and label."""
    _make(gmm_class_dir, tmp_path / "p", num=4, guidance=3.0)
    (shard,) = _load_shards(tmp_path / "p")
    teacher = load_teacher(str(gmm_class_dir))
    levels = trajectory_levels(teacher.denoiser.schedule, 2, "ddim")
    guided = ode_sample(teacher.denoiser, shard["noise"], levels, {"class_labels": shard["cond"]}, 3.0, heun=False)
    plain = ode_sample(teacher.denoiser, shard["noise"], levels, {"class_labels": shard["cond"]}, None, heun=False)
    # the same float32 operations on the same batch: equal up to a few ulp of values <= ~4 (1e-5 is ~20 ulp)
    assert (guided - shard["sample"]).abs().max() < 1e-5
    assert (plain - shard["sample"]).abs().max() > 1e-2  # the check can fail: guidance moves the samples


def test_a_shard_cut_by_less_than_its_header_is_one_line(tmp_path):
    """A shard missing its last 8 bytes (fewer than the header's length) is still 'shorter than its header says'."""
    path = tmp_path / "pairs-00000.safetensors"
    noise = torch.randn(4, 1, 8, 8)
    save_file({"noise": noise, "sample": torch.randn(4, 1, 8, 8)}, str(path))
    assert torch.equal(map_shard(path)["noise"], noise)  # the whole file reads back
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(FastdiffError, match="shorter than its header says"):
        map_shard(path)


# --- the student generator ------------------------------------------------------------------------------------


def _vp_denoiser():
    return Denoiser(nn.Identity(), VPSchedule(DDPMScheduler().alphas_cumprod), "sample")


def test_top_timestep_is_the_nearest_table_timestep_not_the_one_below():
    """sigma_init between two table levels starts at the nearer one (rounded, not truncated): sigma at the fractional
    timesteps 600.8 and 600.2 (log-linear between the table's levels) snap to 601 and 600."""
    d = _vp_denoiser()
    for frac, nearest in ((600.8, 601), (600.2, 600), (998.7, 999)):
        sigma = float(d.schedule.sigma_at(torch.tensor([frac], dtype=torch.float64)))
        assert top_timestep(d, sigma) == nearest, frac
        assert torch.equal(step_sigmas(d, 1, sigma), d.schedule.sigma_at(torch.tensor([nearest])))


def test_flow_student_levels_start_at_t_1_or_at_the_given_sigma_init():
    """On a flow schedule the first level is pure noise (sigma = inf, t = 1), or sigma_init when the library caller
    gives one (the trainer refuses sigma_init on flow teachers, training/setup.py), and the later levels divide its
    flow time: sigma 0.5 is t = 1/3, so K = 2 goes on to t = 1/6, sigma 0.2 (it once went on to t = 1/2, sigma 1,
    a noisier second level than the first)."""
    d = Denoiser(nn.Identity(), FlowSchedule(1000, 1.0), "flow")
    assert torch.isinf(step_sigmas(d, 1)[0]) and float(step_sigmas(d, 1, 0.5)[0]) == 0.5
    assert step_sigmas(d, 2).tolist() == [float("inf"), 1.0]
    # float64 t = sigma / (1 + sigma) and back, rounded to float32 once: within one float32 ulp of 0.2
    levels = step_sigmas(d, 2, 0.5)
    assert float(levels[0]) == 0.5 and abs(float(levels[1]) - 0.2) <= torch.finfo(torch.float32).eps * 0.2


# --- data.name: teacher -----------------------------------------------------------------------------------------


def test_teacher_pool_rows_are_their_chunks_guided_samples(gmm_class_dir):
    """A pool of 300 (chunks of 256 and 44) with guidance 3: every batch row is row ``i - 256 c`` of chunk c, the
    guided ODE sample from chunk c's own seed (its labels, then its noise), with that row's label."""
    teacher = load_teacher(str(gmm_class_dir))
    src = TeacherSamples(teacher, 2, guidance_scale=3.0, seed=7, cache_size=300, sampler="ddim")
    x, labels, _ = src.batch(64, "cpu")
    levels = trajectory_levels(teacher.denoiser.schedule, 2, "ddim")
    pool, conds = [], []
    for c, n in enumerate((CHUNK, 300 - CHUNK)):
        gen = torch.Generator().manual_seed(_chunk_seed(7, c))
        cond = torch.randint(4, (n,), generator=gen)
        z = torch.randn((n, 1, 8, 8), generator=gen)
        pool.append(ode_sample(teacher.denoiser, z, levels, {"class_labels": cond}, 3.0, heun=False))
        conds.append(cond)
    idx = torch.randint(300, (64,), generator=torch.Generator().manual_seed(7))
    assert (idx >= CHUNK).any() and (idx < CHUNK).any()  # both chunks are drawn from
    expected = torch.cat(pool)[idx]
    # the same float32 operations, row by row (the analytic denoiser is per sample): a few ulp of values <= ~4
    assert (x - expected).abs().max() < 1e-5 and torch.equal(labels, torch.cat(conds)[idx])


# --- the analytic benchmark's MLP student --------------------------------------------------------------------------


def test_mlp_denoiser_is_edm_preconditioned():
    """Karras et al. 2022, Table 1 with sigma_data = 0.5, written out in float64: from the native input a x (VE x),
    x0 = c_skip x + c_out F(c_in x, log(sigma) / 4), c_skip = sd^2 / (s^2 + sd^2), c_out = s sd / sqrt(s^2 + sd^2),
    c_in = 1 / sqrt(s^2 + sd^2), F the model's own MLP."""
    torch.manual_seed(0)
    model = MLPDenoiser(sample_size=2, hidden=16, depth=2)
    t = torch.tensor([10, 400, 999])
    sigma = model._schedule.sigma_at(t).double().reshape(-1, 1)
    x = torch.randn(3, 4, dtype=torch.float64) * (1 + sigma)
    native = (x / torch.sqrt(1 + sigma ** 2)).float()
    with torch.no_grad():
        out = model(native.reshape(3, 1, 2, 2), t, return_dict=False)[0].reshape(3, 4).double()
        total = sigma ** 2 + 0.25
        net = model.net.double()
        ref = 0.25 / total * x + sigma * 0.5 / total.sqrt() * net(torch.cat([x / total.sqrt(), sigma.log() / 4], 1))
    # float32 model against float64: the native input and c_in x, c_skip x (all O(1)) round by eps32 each, then a
    # 2-layer MLP of 16 units adds a few dozen roundings of O(1) values: 64 eps32 x the output's size (~2.2) is
    # ~60x the measured 2.9e-7, and far below what a wrong coefficient moves (c_out alone differs by 2x).
    assert (out - ref).abs().max() < 64 * EPS32 * max(1.0, float(ref.abs().max()))


# --- fsdp units (pure helper) ---------------------------------------------------------------------------------------


def test_every_block_of_a_deep_block_list_is_its_own_unit():
    """12 transformer blocks (SD3 has 24, Flux 19 + 38): block 1 must not swallow blocks 10 and 11 by name prefix."""
    net = nn.Module()
    net.transformer_blocks = nn.ModuleList([nn.Linear(2, 2) for _ in range(12)])
    assert sharding.units(net) == list(net.transformer_blocks)
