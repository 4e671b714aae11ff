"""The trainer's step rules (gradient accumulation, which network a loss may train, the critic's clip, the skip and
image counters, the last step's log, the micro-batch seeds) and setup / export rules that other tests leave open,
each on the tiny teachers built in code (conftest) with a loss or an optimizer step observed where it matters."""
import json
import warnings
from pathlib import Path

import pytest
import torch

from fastdiff.config import load_config
from conftest import small_trainer


def _trainer(teacher, tmp_path, *sets):
    return small_trainer(teacher, tmp_path / "run", *sets)


def _grads_at_step(opt):
    """Wrap ``opt.step`` to keep a copy of each parameter's gradient as the step sees it (before zero_grad)."""
    seen = []
    step = opt.step

    def spy(accelerator, clip_value=None):
        seen.append(([None if p.grad is None else p.grad.clone() for p in opt.params], clip_value))
        return step(accelerator, clip_value)
    opt.step = spy
    return seen


def test_accumulated_gradient_is_the_mean_of_the_micro_batch_gradients(tiny_teacher, tmp_path):
    trainer = _trainer(tiny_teacher, tmp_path, "train.gradient_accumulation=2")
    params = trainer.opt_g.params
    seen = _grads_at_step(trainer.opt_g)

    def loss_of(x, cond, real):  # d loss / d p = 1 for every weight, in each micro-batch
        return sum(p.sum() for p in params) + 0 * x.sum(), {}
    trainer._update(trainer.opt_g, loss_of, False, "generator")
    grads, _ = seen[0]
    # 0.5 + 0.5 is exact in float32: the mean of two micro-batches, not their sum (2)
    assert all(torch.equal(g, torch.ones_like(g)) for g in grads)


def test_a_critic_update_leaves_no_gradient_on_the_generator(tiny_teacher, tmp_path):
    """Critic updates see the generator's samples without a graph (a GAN critic reads x undetached)."""
    trainer = _trainer(tiny_teacher, tmp_path)
    critic = trainer.opt_c.params

    def loss_of(x, cond, real):
        return sum(p.sum() for p in critic) + x.float().sum(), {}
    trainer._update(trainer.opt_c, loss_of, True, "critic0")
    assert all(p.grad is None for p in trainer.opt_g.params)


def test_the_generator_loss_does_not_train_the_critic(tiny_teacher, tmp_path):
    """A generator loss that reads the critic's weights leaves them without a gradient (a stale one would join the
    next critic update, whose zero_grad comes only after its step)."""
    trainer = _trainer(tiny_teacher, tmp_path)
    obj, critic = trainer.objective, trainer.opt_c.params
    obj.generator_loss = lambda x, cond, real=None: (x.float().mean() + sum(p.sum() for p in critic), {})
    trainer.train_step()
    assert all(p.grad is None and not p.requires_grad for p in critic)


def test_sida_critic_steps_clip_by_the_objectives_value(tiny_teacher, tmp_path):
    from test_export_e2e import write_fake_fashion_mnist

    data = tmp_path / "fmnist"
    write_fake_fashion_mnist(data, size=8)
    trainer = _trainer(tiny_teacher, tmp_path, "objective.name=sida", f"data.path={data}", "data.resolution=8")
    seen = _grads_at_step(trainer.opt_c)
    trainer._update(trainer.opt_c, trainer.objective.critic_loss, True, "critic0")
    clip = trainer.objective.critic_clip
    assert clip is not None and clip > 0 and seen[0][1] == clip
    g_seen = _grads_at_step(trainer.opt_g)
    trainer._update(trainer.opt_g, trainer.objective.generator_loss, False, "generator")
    assert g_seen[0][1] is None  # generator updates are not value-clipped


def test_images_seen_counts_the_updates_before_this_one(tiny_teacher, tmp_path):
    trainer = _trainer(tiny_teacher, tmp_path, "train.gradient_accumulation=2")
    obj = trainer.objective
    seen = []
    original = obj.generator_loss

    def recording(x, cond, real=None):
        seen.append(obj.images_seen)
        return original(x, cond, real)
    obj.generator_loss = recording
    trainer.step = 3
    trainer.train_step()
    assert obj.images_per_step == 4 and seen == [3 * 4, 3 * 4]  # batch 2 x accumulation 2, before step 3's images


def test_a_finite_update_resets_the_consecutive_skip_count(tiny_teacher, tmp_path):
    trainer = _trainer(tiny_teacher, tmp_path)
    obj = trainer.objective
    original = obj.generator_loss

    def nan_at_step_0(x, cond, real=None):
        loss, logs = original(x, cond, real)
        return (loss * float("nan") if obj.step == 0 else loss), logs
    obj.generator_loss = nan_at_step_0
    trainer.train_step()
    assert int(trainer.skipped["consecutive"]) == 1 and int(trainer.skipped["generator"]) == 1
    trainer.step = 1
    trainer.train_step()
    assert int(trainer.skipped["consecutive"]) == 0 and int(trainer.skipped["generator"]) == 1


def test_the_last_step_is_logged_when_off_the_log_interval(tiny_teacher, tmp_path):
    trainer = _trainer(tiny_teacher, tmp_path, "train.max_steps=3", "train.log_every=2")
    trainer.fit(export=False)
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 3]


def test_micro_batch_seeds_give_each_data_stream_its_own_seed(tiny_teacher, tmp_path):
    trainer = _trainer(tiny_teacher, tmp_path)
    gens = {"data": torch.Generator(), "prompts": torch.Generator()}
    trainer._generators = lambda: gens

    def seeds(phase, index):
        trainer._seed_micro_batch(phase, index)
        return [g.initial_seed() for g in gens.values()]
    a = seeds("critic0", 1)
    assert a[0] != a[1]  # two streams seeded alike would draw the same numbers
    assert seeds("critic0", 1) == a and seeds("critic0", 0) != a and seeds("generator", 1) != a


def test_auto_sigma_init_is_2_5_for_distribution_matching_on_vp_teachers(tiny_teacher):
    from fastdiff.models.teacher import load_teacher
    from fastdiff.training.setup import sigma_init

    teacher = load_teacher(tiny_teacher)
    assert sigma_init(load_config(None, [f"teacher.path={tiny_teacher}"]), teacher) == 2.5
    ddim = load_config(None, [f"teacher.path={tiny_teacher}", "student.sampler=ddim"])
    assert sigma_init(ddim, teacher) is None


def test_latents_subtract_the_vae_shift_before_scaling_and_decode_inverts_it():
    """diffusers' pipelines (SD3, Flux): ``latents = (z - shift) * scale``, decoded from ``latents / scale + shift``."""
    from tiny_pipelines import vae
    from fastdiff.models.latent import Latents

    latents = Latents(vae(shift_factor=0.1159, scaling_factor=0.3611))
    mean = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    z = latents.sample(torch.cat([mean, torch.zeros_like(mean)], dim=1))  # std 0: the draw is the mean
    expected = (mean.double() - 0.1159) * 0.3611
    # float32: one subtraction and one product, each rounding by <= eps/2 of values below 4
    assert (z.double() - expected).abs().max() <= 4 * 2 * torch.finfo(torch.float32).eps
    seen = []
    latents.vae.decode = lambda x, return_dict=False: (seen.append(x) or (x,))
    latents.decode(z)
    assert (seen[0].double() - mean.double()).abs().max() <= 8 * 4 * torch.finfo(torch.float32).eps


def test_export_dtype_without_a_variant_casts_the_pipeline_weights(tiny_teacher, tmp_path):
    from safetensors.torch import load_file
    from test_hub_export import export

    out = export(tiny_teacher, tmp_path / "fp16", dtype="fp16")
    weights = load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))  # no variant: the plain name
    assert weights and all(v.dtype == torch.float16 for v in weights.values())


def test_exported_consistency_student_samples_with_its_boundary_scalings(tiny_teacher):
    """fastdiff.json's timestep_scaling (cd students) is applied by the K-step sampler of the exported folder."""
    from fastdiff.inference.students import student_generator
    from fastdiff.models.consistency import network_view
    from fastdiff.models.teacher import load_teacher

    loaded = load_teacher(tiny_teacher)
    gen = student_generator(loaded, {"num_steps": 2, "timestep_scaling": 10.0, "sampler": "lcm"})
    x = torch.randn(2, *loaded.sample_shape, generator=torch.Generator().manual_seed(0))
    # the lowest level (timestep 0): the boundary, where c_skip = 0.25 / ((10 t)^2 + 0.25) is 1 and c_out 0
    sigma = torch.tensor(loaded.denoiser.schedule.sigma_min)
    with torch.no_grad():
        got = gen.denoiser.denoise_native(x, sigma)
        want = network_view(loaded.model, loaded.denoiser, 10.0).denoise_native(x, sigma)
        plain = network_view(loaded.model, loaded.denoiser, None).denoise_native(x, sigma)
    assert torch.equal(got, want) and not torch.allclose(got, plain, atol=1e-3)


def test_skipped_updates_counts_critic_skips_too(tiny_teacher, tmp_path):
    trainer = _trainer(tiny_teacher, tmp_path)
    obj = trainer.objective
    original = obj.critic_loss

    def nan_critic(x, cond=None, real=None):
        loss, logs = original(x, cond, real)
        return loss * float("nan"), logs
    obj.critic_loss = nan_critic
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logs = trainer.train_step()
    assert int(trainer.skipped["critic"]) == 1 and int(trainer.skipped["generator"]) == 0
    assert int(logs["skipped_updates"]) == 1
    # the skipped update still steps its schedule, on purpose: torch's "scheduler before optimizer" warning is noise
    assert not [w for w in caught if "lr_scheduler" in str(w.message)]


@pytest.mark.parametrize("sets,keeps", [(["train.ema_decay=0"], False), (["train.ema_halflife_kimg=0"], False),
                                        (["train.ema_decay=0.99"], True), ([], True),
                                        (["train.ema_halflife_kimg=0", "train.ema_sigma_rel=0.1"], True)])
def test_an_ema_is_kept_only_when_it_averages(tiny_teacher, tmp_path, sets, keeps):
    from fastdiff.training.setup import uses_ema

    cfg = load_config(None, sets)
    assert uses_ema(cfg.train) == keeps


def test_encoded_latents_are_the_vae_posterior_draw_in_the_teachers_scale():
    """``Latents.encode`` draws what diffusers' ``latent_dist.sample(generator)`` draws (mean + std x noise), shifted
    and scaled: the posterior cached for ``data.cache_latents`` holds the std, not the variance."""
    from tiny_pipelines import vae
    from fastdiff.models.latent import Latents

    model = vae(shift_factor=0.1159, scaling_factor=0.3611)
    latents = Latents(model)
    images = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    got = latents.encode(images, torch.Generator().manual_seed(2))
    with torch.no_grad():
        dist = model.encode(images).latent_dist
        assert (dist.std - 1).abs().max() > 0.01  # std and variance differ here
        want = (dist.sample(torch.Generator().manual_seed(2)).double() - 0.1159) * 0.3611
    # float32: the draw (one product, one sum of values below ~4) and the shift / scale: a few eps of 4
    assert (got.double() - want).abs().max() <= 16 * 4 * torch.finfo(torch.float32).eps


def test_lora_adapts_every_layer_lcm_lora_names_including_resnet_shortcuts():
    """The 14 names of diffusers' train_lcm_distill_lora_sdxl.py ``lora_target_modules`` (transcribed), each adapted
    where the model has it."""
    from fastdiff.models.lora import lora_targets, with_lora
    from diffusers import UNet2DConditionModel

    reference = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                 "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj"]
    unet = UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4,
                                out_channels=4, cross_attention_dim=8, norm_num_groups=4, attention_head_dim=2,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    names = [n for n, _ in unet.named_modules()]
    present = {t for t in reference if any(n.endswith(t) for n in names)}
    assert "conv_shortcut" in present and set(lora_targets(unet)) == present
    net = with_lora(unet, 2, "student.lora_rank", seed=0)
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in net.named_modules() if n.endswith(".lora_A")}
    assert {n for n in names if any(n.endswith(t) for t in reference)} <= adapted


def test_embedded_teacher_names_resolve_to_the_packaged_folder():
    from fastdiff.errors import FastdiffError
    from fastdiff.inference.students import teacher_location
    from fastdiff.models.embedded import embedded_teachers, resolve_teacher_path

    assert "fmnist-ddpm" in embedded_teachers()
    folder = resolve_teacher_path("embedded:fmnist-ddpm")
    assert folder.endswith("fmnist-ddpm") and (Path(folder) / "model_index.json").is_file()
    assert teacher_location("/nowhere", {"teacher_folder": "embedded:fmnist-ddpm"}) == folder
    with pytest.raises(FastdiffError, match="no embedded teacher 'nope'"):
        resolve_teacher_path("embedded:nope")


def test_export_drops_local_model_paths_and_keeps_hub_ids(tmp_path):
    from fastdiff.inference.export import _drop_local_names

    (tmp_path / "unet").mkdir()
    config = {"_name_or_path": str(tmp_path / "teacher"),
              "nested": [{"name_or_path": "/abs/x"}, {"_name_or_path": "org/m"}]}
    (tmp_path / "unet" / "config.json").write_text(json.dumps(config))
    (tmp_path / "model_index.json").write_text(json.dumps({"_name_or_path": "org/tiny-ddpm", "unet": ["a", "b"]}))
    _drop_local_names(tmp_path)
    assert json.loads((tmp_path / "unet" / "config.json").read_text()) == {"nested": [{}, {"_name_or_path": "org/m"}]}
    assert json.loads((tmp_path / "model_index.json").read_text())["_name_or_path"] == "org/tiny-ddpm"
