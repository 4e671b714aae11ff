"""Flux teachers (FluxPipeline: FluxTransformer2DModel on packed latents, CLIP pooled + T5 text, a guidance-distilled
variant with ``guidance_embeds``, FLUX.1's dynamically shifted flow schedule), end to end on a tiny pipeline built in
code (tests/tiny_pipelines.py): loaded, distilled, exported as a FluxPipeline folder whose own sampling gives
fastdiff's images, uint8 for uint8.
"""
import json

import numpy as np
import pytest
import torch

import tiny_pipelines as tp
from test_text_to_image import PROMPTS, assert_same, changed, distill, ours, run_model_card, theirs
from fastdiff.errors import FastdiffError


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux")
    return {"flux": str(tp.flux_pipeline(root / "flux")), "prompts": str(tp.prompts_file(root / "prompts.txt")),
            "plain": str(tp.flux_pipeline(root / "plain", guidance_embeds=False)),
            "images": str(tp.caption_folder(root / "images"))}


def flux_call(pipe, steps: int, guidance: float, seed: int = 5):
    """FluxPipeline at the tiny teacher's size. Its scheduler.step gets no generator: a stochastic (re-noising)
    step draws from torch's global RNG, so that RNG is put where fastdiff's seeded generator is after drawing the
    initial noise; the pipeline then re-noises with the numbers fastdiff's sampler draws."""
    rng = torch.Generator().manual_seed(seed)
    torch.randn((len(PROMPTS), 4, tp.LATENT, tp.LATENT), generator=rng)
    torch.set_rng_state(rng.get_state())
    return theirs(pipe, steps, seed, guidance=guidance, height=2 * tp.LATENT, width=2 * tp.LATENT)


def direct_call(teacher, x, t: float, cond: dict, guidance: float | None):
    """The transformer called as FluxPipeline calls it (its own pack / ids / unpack helpers), on unpacked x."""
    from diffusers import FluxPipeline

    b, c, h, w = x.shape
    text = cond["encoder_hidden_states"]
    out = teacher.model(hidden_states=FluxPipeline._pack_latents(x, b, c, h, w),
                        timestep=torch.full((b,), t * 1000) / 1000, pooled_projections=cond["pooled_projections"],
                        guidance=None if guidance is None else torch.full([1], guidance).expand(b),
                        encoder_hidden_states=text, txt_ids=torch.zeros(text.shape[1], 3),
                        img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", x.dtype),
                        return_dict=False)[0]
    return FluxPipeline._unpack_latents(out, h * teacher.latents.factor, w * teacher.latents.factor,
                                        teacher.latents.factor)


def test_flux_distill_export_matches_flux_pipeline(files, tmp_path):
    """One-step DMD2 on the guidance-distilled teacher; the export is a FluxPipeline fed the same guidance value;
    its 1-step and 2-step images are fastdiff's (2 steps: fresh noise between steps, in FluxPipeline's packed
    layout)."""
    from diffusers import FluxPipeline

    student = distill(files["flux"], tmp_path / "run", "objective.name=dmd2", f"data.prompts={files['prompts']}",
                      "objective.critic_updates=1", "train.lr_generator=1e-3", "train.ema_decay=0",
                      "teacher.guidance_scale=3")
    assert changed(student, files["flux"], "transformer") > 0
    info = json.loads((student / "fastdiff.json").read_text())
    assert info["pipeline_class"] == "FluxPipeline" and info["embedded_guidance"] == 3.0
    assert info["call_args"] == ", height=16, width=16"  # FluxPipeline's default would be 256 px here
    assert "guidance_scale=3.0, height=16, width=16" in (student / "README.md").read_text()
    pipe = FluxPipeline.from_pretrained(student)
    assert not pipe.scheduler.config.use_dynamic_shifting and pipe.scheduler.config.shift == 1.0
    for steps in (1, 2):
        assert_same(ours(student, steps), flux_call(pipe, steps, guidance=3.0))
    assert not np.array_equal(flux_call(pipe, 1, guidance=3.0), flux_call(pipe, 1, guidance=1.0))  # embedding used
    run_model_card(student)



def test_two_step_lora_student_loads_with_load_lora_weights(files, tmp_path):
    """A 2-step LoRA student (DMD2's backward simulation) on the guidance-distilled teacher: the teacher pipeline with
    the exported adapters and scheduler, and the fused folder, sample fastdiff's images."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    out = distill(files["flux"], tmp_path / "run", f"data.prompts={files['prompts']}", "student.lora_rank=4",
                  "objective.fake_lora_rank=4", "train.lr_generator=1e-2", "train.lr_critic=1e-2",
                  "teacher.guidance_scale=3", "student.num_steps=2")
    pipe = FluxPipeline.from_pretrained(files["flux"])
    plain = flux_call(pipe, 2, guidance=3.0)
    pipe.load_lora_weights(str(out))
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(out, subfolder="scheduler")
    with_lora = flux_call(pipe, 2, guidance=3.0)
    assert not np.array_equal(plain, with_lora)  # the adapters did train
    assert_same(ours(out, 2), with_lora)
    assert_same(ours(out / "fused", 2), with_lora)


def test_exported_scheduler_gives_fastdiff_levels_under_flux_sigmas_and_mu(files):
    """FluxPipeline calls set_timesteps(K, sigmas=linspace(1, 1/K, K), mu=calculate_shift(tokens)): the exported
    scheduler (shift 1, no dynamic shift, no shift_terminal) turns them into fastdiff's timesteps exactly."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    from fastdiff.inference.schedulers import flow_scheduler, flux_scheduler
    from fastdiff.models.generator import step_sigmas
    from fastdiff.models.teacher import load_teacher

    teacher = load_teacher(files["flux"])
    d = teacher.denoiser
    for k in range(1, 9):
        sched = flux_scheduler(teacher.scheduler, k, "lcm")
        sched.set_timesteps(k, sigmas=np.linspace(1.0, 1 / k, k), mu=calculate_shift(16))
        assert torch.equal(sched.timesteps, d.schedule.model_timestep(step_sigmas(d, k))), k
        if k in (3, 5):  # flow_scheduler's shift_terminal (for SD3, which passes no sigmas) would be an ulp off here
            stretched = flow_scheduler(teacher.scheduler, k, "lcm")
            stretched.set_timesteps(k, sigmas=np.linspace(1.0, 1 / k, k), mu=calculate_shift(16))
            assert not torch.equal(stretched.timesteps, sched.timesteps)


def test_dynamic_shift_resolved_at_the_teachers_size(files):
    """FLUX.1's scheduler shifts by exp(mu) with mu from the packed token count; the teacher's FlowSchedule uses that
    shift, so its noise levels are the ones the teacher's own scheduler gives at that size."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    from fastdiff.models.teacher import load_teacher

    teacher = load_teacher(files["flux"])
    assert teacher.sample_shape == (4, tp.LATENT, tp.LATENT) and teacher.image_shape == (3, 16, 16)
    mu = calculate_shift((tp.LATENT // 2) ** 2)
    t = np.linspace(1.0, 0.02, 50)
    sched = teacher.scheduler
    sched.set_timesteps(50, sigmas=t, mu=mu)
    sigma = teacher.denoiser.schedule.sigma_at(torch.from_numpy(t * 1000)).double()  # VE sigma = t' / (1 - t')
    ours = torch.where(torch.isinf(sigma), torch.ones_like(sigma), sigma / (1 + sigma))
    # The scheduler's t' is float32 from ~4 float32 operations (exp(mu) / (exp(mu) + 1/t - 1)); fastdiff's sigma is
    # float32 from a float64 formula (t' from it: relative error <= 6e-8). So 5 x 1.2e-7 relative covers both.
    torch.testing.assert_close(ours, sched.sigmas[:-1].double(), rtol=5 * 1.2e-7, atol=0)


def test_packed_denoiser_call_equals_direct_transformer_call(files):
    """The Denoiser packs, builds ids and unpacks around the transformer: bitwise the pipeline's own call."""
    from fastdiff.models.teacher import load_teacher
    from fastdiff.models.text import PromptEncoder

    teacher = load_teacher(files["flux"], guidance_scale=2.5)
    cond = PromptEncoder(teacher.pipeline)(PROMPTS[:2])
    x = torch.randn(2, *teacher.sample_shape, generator=torch.Generator().manual_seed(0))
    for t in (1.0, 0.5):
        sigma = torch.tensor(float("inf") if t == 1.0 else t / (1 - t))
        with torch.no_grad():
            got = teacher.denoiser.raw(x, sigma.expand(2), cond)
            want = direct_call(teacher, x, t, cond, 2.5)
        assert torch.equal(got, want)


def test_guidance_distilled_teacher_reads_guidance_scale_through_the_embedding(files):
    """guidance_embeds teachers: teacher.guidance_scale is the embedding's input (one pass, no CFG), and copies of
    the network (the student, the fake score) are fed the same value; a teacher without the embedding keeps CFG."""
    from fastdiff.models.consistency import network_view
    from fastdiff.models.flux import embedded_guidance
    from fastdiff.models.teacher import load_teacher
    from fastdiff.models.text import PromptEncoder
    from fastdiff.training.networks import trainable_copy

    x0 = {}
    for g in (1.0, 4.0):
        teacher = load_teacher(files["flux"], guidance_scale=g)
        assert teacher.denoiser.guidance_scale == 1.0 and embedded_guidance(teacher.model) == g
        cond = PromptEncoder(teacher.pipeline)(PROMPTS[:2])
        x = torch.randn(2, *teacher.sample_shape, generator=torch.Generator().manual_seed(1))  # native, at t = 0.5
        with torch.no_grad():
            x0[g] = teacher.denoiser.denoise_native(x, torch.tensor(1.0), cond)
            direct = x - 0.5 * direct_call(teacher, x, 0.5, cond, g)  # x0 = x_t - t v, as the Denoiser computes it
            copy = network_view(trainable_copy(teacher.model), teacher.denoiser).denoise_native(x, torch.tensor(1.0), cond)
        assert torch.equal(x0[g], direct)
        assert torch.equal(copy, x0[g])
    assert not torch.allclose(x0[1.0], x0[4.0])
    plain = load_teacher(files["plain"], guidance_scale=4.0)
    assert plain.denoiser.guidance_scale == 4.0 and embedded_guidance(plain.model) is None


def test_pipeline_family_names_flux_and_refuses_other_flux_pipelines(files):
    from fastdiff.models.teacher import load_teacher
    from fastdiff.models.text import pipeline_family

    assert pipeline_family(load_teacher(files["plain"]).pipeline) == "flux"
    with pytest.raises(FastdiffError, match=r"^FluxKontextPipeline: fastdiff encodes prompts for .*PixArt, Flux"):
        pipeline_family(type("FluxKontextPipeline", (), {})())


@pytest.mark.parametrize("objective", ["sid", "scm"])
def test_flux_sid_and_scm_students_export(files, tmp_path, objective):
    """SiD (generator samples) and sCM (captioned images through the VAE, JVP through the transformer) on the
    teacher without a guidance embedding (CFG on the teacher for SiD)."""
    from diffusers import FluxPipeline

    data = [f"data.prompts={files['prompts']}", "teacher.guidance_scale=2"] if objective == "sid" else \
        ["data.name=imagefolder", f"data.path={files['images']}"]
    student = distill(files["plain"], tmp_path / "run", f"objective.name={objective}", *data,
                      "train.lr_generator=1e-3", "train.ema_decay=0")
    assert changed(student, files["plain"], "transformer") > 0
    assert json.loads((student / "fastdiff.json").read_text())["embedded_guidance"] is None
    pipe = FluxPipeline.from_pretrained(student)
    assert_same(ours(student, 1), flux_call(pipe, 1, guidance=0))



def test_the_run_samples_a_two_step_flux_student_as_its_export_does(files, tmp_path):
    """Sample grids and train.eval_every sample ``export_generator``; for a 2-step Flux student it re-noises between
    steps in FluxPipeline's packed layout, as the export's sampler (``fastdiff fid``) does. It once took the
    unpacked layout, so evaluations during training scored other images than ``fastdiff fid`` of the export."""
    from fastdiff.config import load_config
    from fastdiff.inference.sampling import load_sampler, sample_model
    from fastdiff.models.flux import FluxGenerator
    from fastdiff.training import Trainer
    from test_text_to_image import FAST

    cfg = load_config(None, [f"teacher.path={files['flux']}", f"output_dir={tmp_path / 'run'}", *FAST,
                             f"data.prompts={files['prompts']}", "teacher.guidance_scale=3", "student.num_steps=2"])
    trainer = Trainer(cfg, overwrite=True, progress=False)
    out = trainer.fit()
    gen = trainer.export_generator().eval()
    assert isinstance(gen, FluxGenerator) and gen.sampler == "lcm"
    exported, loaded = load_sampler(str(out), torch.device("cpu"))
    with torch.no_grad():
        ours = next(sample_model(gen, trainer.teacher, 3, 2, 7, 3, "cpu", prompts=PROMPTS))[1]
        theirs = next(sample_model(exported, loaded, 3, 2, 7, 3, "cpu", prompts=PROMPTS))[1]
    assert np.array_equal(ours, theirs)  # uint8: the same network, noise and steps in the same float32 order


def test_tune_a_flux_student(files, tmp_path):
    """`fastdiff tune` (PSO) on a 2-step Flux student of the guidance-distilled teacher: targets VAE-encoded with
    Flux's shift and scale, references sampled with the targets' captions and the student's embedded guidance, the
    export the same FluxPipeline folder (the guidance value kept), whose 1- and 2-step images are fastdiff's; the
    tuned weights, not the student's, are in it."""
    from diffusers import FluxPipeline

    from fastdiff.cli import main

    student = distill(files["flux"], tmp_path / "run", "objective.name=dmd2", f"data.prompts={files['prompts']}",
                      "objective.critic_updates=1", "teacher.guidance_scale=3", "student.num_steps=2")
    out = tmp_path / "tuned"
    assert main(["tune", str(student), "--targets", files["images"], "--out", str(out), "--quiet", "--set", "steps=3",
                 "--set", "lr=1e-3", "--set", "batch_size=2"]) == 0
    info = json.loads((out / "fastdiff.json").read_text())
    assert info["pipeline_class"] == "FluxPipeline" and info["embedded_guidance"] == 3.0
    assert info["tuned"]["method"] == "pso" and "guidance_scale" not in info["tuned"]
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in student.iterdir())
    pipe = FluxPipeline.from_pretrained(out)
    for steps in (1, 2):
        assert_same(ours(out, steps), flux_call(pipe, steps, guidance=3.0))
    assert not np.array_equal(ours(out, 2), ours(student, 2))
    bad = main(["tune", str(student), "--targets", files["images"], "--out", str(tmp_path / "bad"), "--quiet", "--set",
                "guidance_scale=2"])
    assert bad == 2 and not (tmp_path / "bad").exists()  # its guidance value is fixed: 3.0, as distilled
