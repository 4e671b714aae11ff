"""The text-to-image papers' objectives on a Stable Diffusion teacher, end to end: SwiftBrush's vsd and SNOOPI's
pg-sb, SIM, SiDA, sCM and rCM, LADD and Hyper-SD's DMD stage (dmd2, sid and cd: tests/test_text_to_image.py).

Each trains two updates on the tiny SD pipeline (tests/tiny_pipelines.py), exports, and the export loads in
diffusers' own ``StableDiffusionPipeline``, whose uint8 images equal fastdiff's sampler on the exported folder at 1,
2 and 4 steps, and at one step the trainer's own in-memory student (so the export holds the weights that trained,
not a copy of the teacher's or a stale checkpoint's).
"""
import json

import pytest
import torch

import tiny_pipelines as tp
from conftest import by_default
from fastdiff.config import load_config
from fastdiff.inference.sampling import to_uint8
from fastdiff.training import Trainer
from test_text_to_image import FAST, PROMPTS, assert_same, changed, ours, theirs


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("t2i-objectives")
    return {"sd": str(tp.sd_pipeline(root / "sd")), "prompts": str(tp.prompts_file(root / "prompts.txt")),
            "images": str(tp.caption_folder(root / "images"))}


# what they train on besides prompts: captioned images (consistency terms; SiDA's GAN head reads real images)
ON_IMAGES = {"scm", "rcm", "hyper-sd-dmd", "sida"}
OBJECTIVES = ["vsd", "pg-sb", "sim", "sida", "scm", "rcm", "ladd", "hyper-sd-dmd"]


# By default one of each kind: a LoRA fake score (vsd), a GAN head on real images (sida), sCM + DMD (rcm), stages
# (hyper-sd-dmd); pg-sb, sim, scm and ladd behind the slow marker (their losses train on the tiny pixel teachers by
# default: test_objectives_improve, test_objectives_e2e, test_ladd, test_snoopi).
@pytest.mark.parametrize("objective", by_default(OBJECTIVES, OBJECTIVES, {"vsd", "sida", "rcm", "hyper-sd-dmd"}))
def test_objective_on_stable_diffusion_exports_what_trained(files, tmp_path, objective):
    from diffusers import StableDiffusionPipeline

    data = ["data.name=imagefolder", f"data.path={files['images']}"] if objective in ON_IMAGES else \
        [f"data.prompts={files['prompts']}"]
    critic = [] if objective == "scm" else ["objective.critic_updates=1"]  # scm has no critic
    if objective == "sida":  # no 100k-image hold in a 2-step run
        critic.append("objective.generator_hold_images=0")
    cfg = load_config(None, [f"teacher.path={files['sd']}", f"output_dir={tmp_path / 'run'}", *FAST, *data, *critic,
                             f"objective.name={objective}", "train.lr_generator=1e-3",
                             "train.lr_warmup_steps=0", "train.ema_decay=0.5"])  # an EMA far from the raw student
    trainer = Trainer(cfg, progress=False)
    student = trainer.fit()
    assert changed(student, files["sd"], "unet") > 0
    info = json.loads((student / "fastdiff.json").read_text())
    assert info["pipeline_class"] == "StableDiffusionPipeline" and info["objective"] == objective
    pipe = StableDiffusionPipeline.from_pretrained(student)
    for steps in (1, 2, 4):
        assert_same(ours(student, steps), theirs(pipe, steps))
    with torch.no_grad():  # the trainer's own student on the pipeline's noise for seed 5 (theirs' default)
        z = torch.randn((len(PROMPTS), *trainer.teacher.sample_shape), generator=torch.Generator().manual_seed(5))
        x = trainer.teacher.latents.decode(trainer.export_generator()(z, trainer.text(PROMPTS)))
    assert_same(to_uint8(x), theirs(pipe, 1))


def aligned_global_rng(seed: int, n: int, shape: tuple) -> None:
    """Put torch's global RNG where fastdiff's seeded generator is after the initial noise: SD3's and Sana's pipelines
    give ``scheduler.step`` no generator, so a K > 1 student's re-noising draws from the global RNG there."""
    rng = torch.Generator().manual_seed(seed)
    torch.randn((n, *shape), generator=rng)
    torch.set_rng_state(rng.get_state())


def test_presets_step_counts_reproduce_in_diffusers(files, tmp_path):
    """The presets' multi-step students at their step counts, equal to fastdiff's uint8 images: sd3-sid's 4-step sid
    on SD3 at 4 steps (a flow export's scheduler is set for its K, ``shift_terminal = 1/K``; its re-noising comes from
    the global RNG, aligned here: a plain call is the same law, not the same draws) and sdxl-dmd2-lora's 4-step LoRA
    dmd2 on SDXL at 1, 2 and 4 (the teacher's pipeline with ``load_lora_weights`` and the exported LCMScheduler)."""
    import numpy as np
    from diffusers import LCMScheduler, StableDiffusion3Pipeline, StableDiffusionXLPipeline

    from test_text_to_image import distill

    sd3, sdxl = tp.sd3_pipeline(tmp_path / "sd3"), tp.sdxl_pipeline(tmp_path / "sdxl")
    student = distill(str(sd3), tmp_path / "sid", "objective.name=sid", f"data.prompts={files['prompts']}",
                      "student.num_steps=4", "train.lr_generator=1e-3")
    pipe = StableDiffusion3Pipeline.from_pretrained(student, text_encoder_3=None, tokenizer_3=None)
    shape = (4, tp.LATENT, tp.LATENT)
    aligned_global_rng(5, len(PROMPTS), shape)
    assert_same(ours(student, 4), theirs(pipe, 4))
    torch.manual_seed(0)  # the global RNG elsewhere: other re-noising draws, other images
    assert not np.array_equal(ours(student, 4), theirs(pipe, 4))

    lora = distill(str(sdxl), tmp_path / "lora", "objective.name=dmd2", f"data.prompts={files['prompts']}",
                   "objective.critic_updates=1", "student.num_steps=4", "student.lora_rank=4",
                   "objective.fake_lora_rank=4", "train.lr_generator=1e-2", "train.lr_critic=1e-2")
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl)
    plain = theirs(pipe, 4)
    pipe.load_lora_weights(str(lora))
    pipe.scheduler = LCMScheduler.from_pretrained(lora, subfolder="scheduler")
    for steps in (1, 2, 4):  # SDXL's pipeline passes its generator to the scheduler: no alignment needed
        assert_same(ours(lora, steps), theirs(pipe, steps))
    assert not np.array_equal(plain, theirs(pipe, 4))


@pytest.mark.parametrize("objective,sampler,data", [
    ("cd", "ddim", "images"), ("rcm", "lcm", "images"), ("scm", "lcm", "teacher")])
def test_one_consistency_student_on_sd3_samples_k_1_2_4_in_diffusers(files, tmp_path, objective, sampler, data):
    """A one-step consistency student of an SD3 teacher (scm: image-free, on the teacher's own samples for the
    training prompts, TBCM's setting) samples any K: the export's ``scheduler_k{K}/`` folders (its own scheduler
    holds K = 1) give StableDiffusion3Pipeline fastdiff's levels t = 1 - i/K at K = 2 and 4, with
    images equal to fastdiff's sampler's up to one uint8 level on 0.5% of values (Euler steps and fastdiff's
    re-noising are the same arithmetic in another order, so a value on a rounding boundary may flip on another CPU;
    measured here: equal; the fresh-noise sampler's draws come from the global RNG, aligned)."""
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    from test_text_to_image import distill

    sd3 = tp.sd3_pipeline(tmp_path / "sd3")
    source = ["data.name=imagefolder", f"data.path={files['images']}"] if data == "images" else \
        ["data.name=teacher", "data.teacher_steps=2", f"data.prompts={files['prompts']}"]
    student = distill(str(sd3), tmp_path / "run", f"objective.name={objective}", *source,
                      f"student.sampler={sampler}", "train.lr_generator=1e-3",
                      *(["objective.critic_updates=1"] if objective == "rcm" else []))
    assert sorted(p.name for p in student.glob("scheduler_k*")) == ["scheduler_k2", "scheduler_k4", "scheduler_k8"]
    assert 'subfolder="scheduler_k2"' in (student / "README.md").read_text()  # the card says how to use them
    pipe = StableDiffusion3Pipeline.from_pretrained(student, text_encoder_3=None, tokenizer_3=None)
    for steps in (1, 2, 4):
        if steps > 1:
            pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(student, subfolder=f"scheduler_k{steps}")
        pipe.scheduler.set_timesteps(steps)
        # float32 levels of order 1 from a linspace and a stretch: 8 eps32 (measured: a few ulps at most)
        np.testing.assert_allclose(pipe.scheduler.sigmas.numpy(), [1 - i / steps for i in range(steps + 1)],
                                   rtol=0, atol=8 * np.finfo(np.float32).eps)
        aligned_global_rng(5, len(PROMPTS), (4, tp.LATENT, tp.LATENT))
        a, b = ours(student, steps), theirs(pipe, steps)
        diff = np.abs(a.astype(int) - b.astype(int))
        assert diff.max() <= 1 and (diff > 0).mean() <= 0.005, (steps, diff.max(), (diff > 0).mean())


def test_reflow_on_sd3_pairs_exports_euler_steps_in_diffusers(files, tmp_path):
    """Reflow on a flow teacher with text: ``fastdiff pairs`` samples the SD3 teacher's ODE for the prompts, the
    student trains on the straight lines and exports a FlowMatchEuler export (deterministic Euler steps) that
    StableDiffusion3Pipeline samples at 1, 2 and 4 steps as fastdiff does (one uint8 level on 0.5% of values)."""
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    from test_text_to_image import distill

    sd3 = tp.sd3_pipeline(tmp_path / "sd3")
    pairs = tmp_path / "pairs"
    assert main_pairs(str(sd3), pairs, files["prompts"]) == 0
    student = distill(str(sd3), tmp_path / "run", "objective.name=reflow", "data.name=pairs", f"data.path={pairs}",
                      f"data.prompts={files['prompts']}", "student.sampler=ddim", "train.lr_generator=1e-3")
    assert changed(student, str(sd3), "transformer") > 0
    pipe = StableDiffusion3Pipeline.from_pretrained(student, text_encoder_3=None, tokenizer_3=None)
    for steps in (1, 2, 4):
        if steps > 1:
            pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(student, subfolder=f"scheduler_k{steps}")
        a, b = ours(student, steps), theirs(pipe, steps)
        diff = np.abs(a.astype(int) - b.astype(int))
        assert diff.max() <= 1 and (diff > 0).mean() <= 0.005, (steps, diff.max(), (diff > 0).mean())


def main_pairs(teacher: str, out, prompts: str) -> int:
    from fastdiff.cli import main

    return main(["pairs", "--teacher", teacher, "--out", str(out), "--num", "6", "--steps", "3", "--prompts", prompts,
                 "-q"])
