"""Latent and text-to-image teachers, end to end on tiny pipelines built in code (tests/tiny_pipelines.py):
SD-style (UNet2DConditionModel, AutoencoderKL, CLIP text model, a local tokenizer), SDXL-style (two text
encoders, pooled embeddings and time ids), PixArt-style (T5 with attention masks), SD3-style flow matching
(SD3Transformer2DModel, two CLIP encoders) and DiT (class-conditional transformer, learned sigma).

Each runs a couple of distillation steps from the saved folder, exports, loads with the standard diffusers
pipeline class, and checks the pipeline's images equal fastdiff's own sampler for the same seed and prompts.
LoRA students export as LoRA weights that ``load_lora_weights`` applies to the teacher pipeline, and fused.
"""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import tiny_pipelines as tp
from conftest import assert_same_uint8
from fastdiff.cli import main
from fastdiff.errors import FastdiffError
from fastdiff.inference.sampling import load_sampler, sample_model

PROMPTS = ["a red shoe on a table", "a blue bag", "a green shirt"]
FAST = ["train.max_steps=2", "train.batch_size=2", "train.checkpoint_every=2", "train.sample_every=2",
        "train.num_sample_images=2", "train.log_every=1"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("t2i")
    return {"sd": str(tp.sd_pipeline(root / "sd")), "sd3": str(tp.sd3_pipeline(root / "sd3")),
            "sdxl": str(tp.sdxl_pipeline(root / "sdxl")), "pixart": str(tp.pixart_pipeline(root / "pixart")),
            "dit": str(tp.dit_pipeline(root / "dit")), "prompts": str(tp.prompts_file(root / "prompts.txt")),
            "images": str(tp.caption_folder(root / "images"))}


def distill(teacher: str, out: Path, *extra: str) -> Path:
    args = ["distill"]
    for item in [f"teacher.path={teacher}", f"output_dir={out}", *FAST, *extra]:
        args += ["--set", item]
    assert main(args) == 0
    return out / "student"


def ours(folder, steps: int, seed: int = 5, prompts=PROMPTS, labels=False, guidance=None) -> np.ndarray:
    """fastdiff's sampler (the one behind fastdiff sample / fid / clip-score) on an exported folder: its [0, 1] float
    images before the uint8 rounding (``assert_same`` rounds both sides)."""
    from unittest import mock

    from fastdiff.inference import sampling

    model, loaded = load_sampler(str(folder), "cpu", guidance)
    n = len(prompts)
    with mock.patch.object(sampling, "to_uint8", sampling.to_unit):
        (_, images), = list(sample_model(model, loaded, n, steps, seed, n, "cpu", guidance,
                                         None if labels else prompts))
    return images


def theirs(pipe, steps: int, seed: int = 5, prompts=PROMPTS, labels=False, guidance=0, **extra) -> np.ndarray:
    """The standard diffusers call: guidance off (or the embedded scale), the seed's generator; its [0, 1] float
    images, which diffusers' numpy_to_pil rounds as ``assert_same`` does."""
    kw = {"class_labels": list(range(len(prompts))), "guidance_scale": 1} if labels else \
        {"prompt": prompts, "guidance_scale": guidance, "generator": torch.Generator().manual_seed(seed)}
    if labels:
        torch.manual_seed(seed)
        kw["generator"] = torch.Generator().manual_seed(seed)
    return pipe(**kw, num_inference_steps=steps, output_type="np", **extra).images


# fastdiff's sampler and the diffusers pipeline compute the same float32 function with operations in another order
# (CFG batched or not, the embeddings' arithmetic, the VAE's batch), so their [0, 1] images agree to float rounding
# amplified through the networks, not exactly: measured max |a - b| 7.5e-7 (6 eps32) over the 61 comparisons of the
# tests that use it (AMD EPYC, 2026-11-30); the bound is 13x that. Exact uint8 equality would also require
# every value to land on the same side of a rounding boundary as on the machine that wrote the test.
IMAGE_BOUND = 1e-5


def assert_same(a: np.ndarray, b: np.ndarray, bound: float = IMAGE_BOUND) -> None:
    """The same uint8 images, as diffusers rounds them (numpy_to_pil), from float [0, 1] images that agree to
    ``bound``: equal levels except where a value lies within ``bound`` of a rounding boundary, which may round either
    way (conftest.assert_same_uint8). A uint8 argument is taken as rounded already; two uint8 arguments are exact."""
    assert a.shape == b.shape
    if a.dtype == np.uint8 and b.dtype == np.uint8:
        assert np.array_equal(a, b), f"max difference {np.abs(a.astype(int) - b.astype(int)).max()}"
        return
    if a.dtype == np.uint8 or b.dtype == np.uint8:  # rounded on one side: ties judged on the float side
        u8, f = (a, b) if a.dtype == np.uint8 else (b, a)
        assert_same_uint8(f, u8 / 255.0, bound)
        return
    assert float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max()) <= bound
    assert_same_uint8(a, b, bound)


def run_model_card(folder: Path) -> None:
    """Execute the Python block of the exported model card from inside the folder, as a user would."""
    import os
    import re

    code = re.search(r"```python\n(.*?)```", (Path(folder) / "README.md").read_text(), re.S).group(1)
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        scope = {}
        exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - our own generated card
        assert len(scope["images"]) >= 1
    finally:
        os.chdir(cwd)


def changed(folder, teacher: str, model_folder: str) -> float:
    """Largest weight change of the exported network against the teacher's (a student must have trained)."""
    from safetensors.torch import load_file

    name = "diffusion_pytorch_model.safetensors"
    a, b = load_file(f"{folder}/{model_folder}/{name}"), load_file(f"{teacher}/{model_folder}/{name}")
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.mark.parametrize("objective", ["dmd2", "sid", "cd"])
def test_sd_distill_export_matches_stable_diffusion_pipeline(files, tmp_path, objective):
    from diffusers import StableDiffusionPipeline

    data = [f"data.prompts={files['prompts']}", "objective.critic_updates=1"] if objective != "cd" else \
        ["data.name=imagefolder", f"data.path={files['images']}"]  # cd trains on captioned images
    student = distill(files["sd"], tmp_path / "run", f"objective.name={objective}", *data,
                      "train.lr_generator=1e-3", "train.ema_decay=0")
    assert changed(student, files["sd"], "unet") > 0
    info = json.loads((student / "fastdiff.json").read_text())
    assert info["pipeline_class"] == "StableDiffusionPipeline" and info["scheduler_class"] == "LCMScheduler"
    pipe = StableDiffusionPipeline.from_pretrained(student)
    for steps in (1, 2):
        assert_same(ours(student, steps), theirs(pipe, steps))
    assert (tmp_path / "run" / "samples").is_dir()  # grids are decoded by the VAE
    run_model_card(student)


def test_lcm_style_guidance_embedding_for_sd_students(files, tmp_path):
    """objective.guidance_range on a text teacher: the student is rebuilt with diffusers' time_cond_proj_dim
    (zero-initialised), and StableDiffusionPipeline feeds it the embedded scale from guidance_scale (no CFG)."""
    from diffusers import StableDiffusionPipeline

    student = distill(files["sd"], tmp_path / "run", "objective.name=cd", "data.name=imagefolder",
                      f"data.path={files['images']}", "objective.guidance_range=[1.0,4.0]", "train.lr_generator=1e-2",
                      "train.ema_decay=0")
    pipe = StableDiffusionPipeline.from_pretrained(student)
    assert pipe.unet.config.time_cond_proj_dim == 256
    for scale in (1.0, 3.0):
        assert_same(ours(student, 1, guidance=scale), theirs(pipe, 1, guidance=scale))
    assert not np.array_equal(theirs(pipe, 1, guidance=1.0), theirs(pipe, 1, guidance=3.0))
    run_model_card(student)


def test_sdxl_added_conditions_and_export(files, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from fastdiff.models.teacher import load_teacher
    from fastdiff.models.text import PromptEncoder

    teacher = load_teacher(files["sdxl"])
    cond = PromptEncoder(teacher.pipeline)(PROMPTS[:2])
    added = cond["added_cond_kwargs"]
    assert added["text_embeds"].shape == (2, 32) and added["time_ids"].tolist() == [[16, 16, 0, 0, 16, 16]] * 2
    assert not cond["uncond_added_cond_kwargs"]["text_embeds"].any()  # SDXL zeroes the empty negative prompt
    student = distill(files["sdxl"], tmp_path / "run", f"data.prompts={files['prompts']}", "objective.critic_updates=1",
                      "train.lr_generator=1e-3", "teacher.guidance_scale=3")
    pipe = StableDiffusionXLPipeline.from_pretrained(student)
    assert_same(ours(student, 1), theirs(pipe, 1))
    run_model_card(student)


def test_flow_transformer_distill_export_matches_sd3_pipeline(files, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    student = distill(files["sd3"], tmp_path / "run", "objective.name=dmd2", f"data.prompts={files['prompts']}",
                      "objective.critic_updates=1",
                      "train.lr_generator=1e-3")
    info = json.loads((student / "fastdiff.json").read_text())
    assert info["scheduler_class"] == "FlowMatchEulerDiscreteScheduler" and info["sigma_init"] is None
    card = (student / "README.md").read_text()
    assert 'StableDiffusion3Pipeline.from_pretrained(".", text_encoder_3=None, tokenizer_3=None)' in card
    run_model_card(student)
    pipe = StableDiffusion3Pipeline.from_pretrained(student, text_encoder_3=None, tokenizer_3=None)
    assert_same(ours(student, 1), theirs(pipe, 1))
    # A 2-step consistency student (deterministic sampler = Euler steps at t = 1, 1/2).
    student = distill(files["sd3"], tmp_path / "cd", "objective.name=cd", "data.name=imagefolder",
                      f"data.path={files['images']}", "student.num_steps=2", "student.sampler=ddim")
    pipe = StableDiffusion3Pipeline.from_pretrained(student, text_encoder_3=None, tokenizer_3=None)
    # float32 levels of order 1 (exactly representable; the scheduler's linspace and shift round at most a few ulps):
    # 1e-6 is 8 eps32 (measured: equal)
    np.testing.assert_allclose(pipe.scheduler.set_timesteps(2) or pipe.scheduler.sigmas.numpy(), [1.0, 0.5, 0.0],
                               atol=1e-6)
    a, b = ours(student, 2), theirs(pipe, 2)
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1  # Euler = fastdiff's re-noising up to float rounding


def test_pixart_t5_teacher_distill_export_matches_pipeline(files, tmp_path):
    """A PixArt-style transformer with a T5 encoder (attention masks, micro-conditions, learned sigma)."""
    from diffusers import PixArtAlphaPipeline

    student = distill(files["pixart"], tmp_path / "run", "objective.name=sid", f"data.prompts={files['prompts']}",
                      "train.lr_generator=1e-3", "teacher.guidance_scale=2")
    assert changed(student, files["pixart"], "transformer") > 0
    pipe = PixArtAlphaPipeline.from_pretrained(student)
    for steps in (1, 2):
        assert_same(ours(student, steps), theirs(pipe, steps, use_resolution_binning=False))
    run_model_card(student)


def test_dit_distill_export_matches_dit_pipeline(files, tmp_path):
    from diffusers import DiTPipeline

    student = distill(files["dit"], tmp_path / "run", "objective.name=sid", "train.lr_generator=1e-3")
    pipe = DiTPipeline.from_pretrained(student)
    assert_same(ours(student, 1, labels=True), theirs(pipe, 1, labels=True))
    run_model_card(student)


# scale 1, and DMD2's SDXL kind of scale (alpha / rank = 0.25 here): slow, as an alpha folded into the exported lora_B
# and loaded by load_lora_weights is checked by test_run_samples_as_export's sd-lora-alpha and flux-lora-alpha
@pytest.mark.parametrize("alpha", [None, pytest.param(1.0, marks=pytest.mark.slow)])
def test_lora_student_loads_with_load_lora_weights_and_fused(files, tmp_path, alpha):
    """A LoRA student (student.lora_alpha: its scale alpha / rank, folded into lora_B in the exported file, which
    diffusers loads at scale 1) samples the same in fastdiff, through load_lora_weights and fused."""
    from diffusers import LCMScheduler, StableDiffusionPipeline

    from fastdiff.models.lora import is_lora
    from fastdiff.training import Trainer
    from fastdiff.config import load_config

    cfg = load_config(None, [f"teacher.path={files['sd']}", f"output_dir={tmp_path / 'run'}", *FAST,
                             "train.checkpoint_every=1",
                             f"data.prompts={files['prompts']}", "student.lora_rank=4", "objective.fake_lora_rank=4",
                             "train.lr_generator=1e-2", "train.lr_critic=1e-2",
                             *([f"student.lora_alpha={alpha}"] if alpha else [])])
    trainer = Trainer(cfg, progress=False)
    scalings = {v for m in trainer.generator.denoiser.model.modules() for v in getattr(m, "scaling", {}).values()}
    assert scalings == {1.0 if alpha is None else alpha / 4}
    teacher_params = {p.data_ptr() for p in trainer.teacher.model.parameters()}
    student_net, fake_net = trainer.generator.denoiser.model, trainer.objective.fake.model
    assert is_lora(student_net) and is_lora(fake_net)
    # One copy of the base weights: student, fake score and EMA point at the teacher's own tensors.
    for net in (student_net, fake_net, trainer.ema):
        base = [p for n, p in net.named_parameters() if "lora_" not in n]
        assert base and all(p.data_ptr() in teacher_params and not p.requires_grad for p in base)
    out = trainer.fit()
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "fastdiff.json", "fused",
                                                    "pytorch_lora_weights.safetensors", "samples.png", "scheduler"]
    ckpt = sorted((tmp_path / "run" / "checkpoints").iterdir())[-1]
    from safetensors.torch import load_file

    assert all("lora_" in k for k in load_file(str(ckpt / "generator.safetensors")))  # adapters only

    # The user's path: the teacher pipeline + load_lora_weights + the exported scheduler.
    pipe = StableDiffusionPipeline.from_pretrained(files["sd"])
    plain = theirs(pipe, 1)
    pipe.load_lora_weights(str(out))
    pipe.scheduler = LCMScheduler.from_pretrained(out, subfolder="scheduler")
    with_lora = theirs(pipe, 1)
    assert_same(ours(out, 1), with_lora)
    assert_same(ours(out / "fused", 1), with_lora)
    assert_same(theirs(StableDiffusionPipeline.from_pretrained(out / "fused"), 1), with_lora)
    assert not np.array_equal(plain, with_lora)  # the adapters did train
    run_model_card(out)
    run_model_card(out / "fused")
    # The trainer's own EMA student (in memory) samples what the export samples.
    with torch.no_grad():
        gen = trainer.export_generator()
        text = trainer.text(PROMPTS)
        z = torch.randn((3, *trainer.teacher.sample_shape), generator=torch.Generator().manual_seed(5))
        x = trainer.teacher.latents.decode(gen(z, text))
    from fastdiff.inference.sampling import to_uint8

    assert_same(to_uint8(x), with_lora)

    # Resume from the adapters-only checkpoint of step 1 and continue to step 2: the same adapters as before.
    final = {n: p.detach().clone() for n, p in student_net.named_parameters() if "lora_" in n}
    again = Trainer(cfg, resume="1", progress=False)
    again.fit(export=False)
    for n, p in again.generator.denoiser.model.named_parameters():
        if "lora_" in n:
            torch.testing.assert_close(p, final[n], rtol=0, atol=0)


def test_clip_score_of_text_to_image_student(files, tmp_path, tiny_clip):
    student = distill(files["sd"], tmp_path / "run", f"data.prompts={files['prompts']}")
    config, weights = tiny_clip
    out = tmp_path / "clip.json"
    assert main(["clip-score", str(student), "--prompts", files["prompts"], "--steps", "1", "--clip-config", config,
                 "--clip-model", "fastdiff-tiny-clip", "--clip-weights", weights, "--json", str(out),
                 "--device", "cpu"]) == 0
    result = json.loads(out.read_text())
    assert result["n"] == 6 and 0 <= result["clip_score"] <= 100
    assert result["clip_score_label"].startswith("CLIPScore@6(fastdiff-tiny-clip")
    # The same number by hand: fastdiff sample's PNGs (image i from prompt i) scored by the same scorer.
    from fastdiff.evaluation.clip_score import ClipScorer
    from fastdiff.models.text import read_prompts

    assert main(["sample", str(student), "--num", "6", "--steps", "1", "--out", str(tmp_path / "png"),
                 "--prompts", files["prompts"], "--device", "cpu"]) == 0
    from PIL import Image

    images = np.stack([np.asarray(Image.open(tmp_path / "png" / f"{i:06d}.png")) for i in range(6)])
    scorer = ClipScorer("fastdiff-tiny-clip", weights, config)
    scores = scorer.scores(torch.from_numpy(images).permute(0, 3, 1, 2), read_prompts(files["prompts"]))
    # the same float32 scores (~40) averaged in another order: 1e-4 is ~20 eps32 of them (measured: equal)
    assert abs(scores.double().mean().item() - result["clip_score"]) < 1e-4


def test_text_teacher_errors(files, tmp_path, capsys):
    def run(*items):
        args = ["distill"]
        for item in [f"output_dir={tmp_path / 'x'}", *FAST, *items]:
            args += ["--set", item]
        code = main(args)
        return code, capsys.readouterr().err

    cases = [
        ([f"teacher.path={files['sd']}"], "needs training prompts: set data.prompts"),
        ([f"teacher.path={files['sd']}", "data.prompts=/no/prompts.txt"], "data.prompts /no/prompts.txt: no such file"),
        ([f"teacher.path={files['dit']}", f"data.prompts={files['prompts']}"], "data.prompts is for text-to-image"),
        ([f"teacher.path={files['sd']}", "objective.name=cd"], "fashion-mnist has 1 channel"),
        ([f"teacher.path={files['dit']}", "student.lora_rank=2"], "DiTPipeline cannot load LoRA weights"),
        ([f"teacher.path={files['sd3']}", f"data.prompts={files['prompts']}", "student.sigma_init=2.5"],
         "flow-matching students start from pure noise"),
        ([f"teacher.path={files['sd']}", f"data.prompts={files['prompts']}", "teacher.dtype=float8"],
         "teacher.dtype must be one of"),
    ]
    for items, message in cases:
        code, err = run(*items)
        assert code == 2 and message in err, (items, err[-800:])
    assert not (tmp_path / "x").exists()
    with pytest.raises(FastdiffError, match="pass --prompts"):
        model, loaded = load_sampler(files["sd"], "cpu")
        list(sample_model(model, loaded, 1, 1, 0, 1, "cpu"))


def test_prompt_sets_larger_than_the_cache_are_encoded_per_batch(files):
    from fastdiff.models.teacher import load_teacher
    from fastdiff.models.text import PromptEncoder

    pipe = load_teacher(files["sd"]).pipeline
    cached = PromptEncoder(pipe)(PROMPTS)
    small = PromptEncoder(pipe, max_cached=2)
    got = small(PROMPTS)
    assert len(small.cache) == 0
    for key in ("encoder_hidden_states", "uncond_encoder_hidden_states"):
        torch.testing.assert_close(got[key], cached[key])


def test_cached_posteriors_draw_what_encoding_each_batch_draws(files):
    """data.cache_latents: the VAE posterior stored once, then sampled with the data RNG, gives the latents that
    encoding every batch gives, draw for draw."""
    from fastdiff.models.teacher import load_teacher

    latents = load_teacher(files["sd"]).latents
    images = torch.rand(3, 3, 2 * tp.LATENT, 2 * tp.LATENT) * 2 - 1
    cached = torch.cat([latents.posterior(images[i:i + 1]) for i in range(3)])
    assert cached.shape == (3, 8, tp.LATENT, tp.LATENT)
    drawn = latents.sample(cached, torch.Generator().manual_seed(3))
    encoded = latents.encode(images, torch.Generator().manual_seed(3))
    # the same VAE on the same pixels in batches of 1 and 3: float32 rounding of a few hundred operations on latents
    # up to ~0.7 (1.2e-7 x 1e2 ~ 1e-5; measured 1.8e-7)
    torch.testing.assert_close(drawn, encoded, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(drawn, latents.encode(images, torch.Generator().manual_seed(4)))


def test_trainer_draws_the_same_real_latents_with_and_without_the_cache(files, tmp_path):
    """CD on an SD teacher: the real latents of three successive batches are the same draws whether the posteriors
    are cached at the start (the VAE then leaves for the CPU) or every batch is encoded. (Trained weights are no
    test of this: Adam's first steps turn rounding-level gradient differences into whole learning-rate steps.)"""
    from fastdiff.config import load_config
    from fastdiff.training import Trainer

    def batches(cache: bool) -> tuple[list, Trainer]:
        cfg = load_config(None, [f"teacher.path={files['sd']}", f"output_dir={tmp_path / str(cache)}", *FAST,
                                 "objective.name=cd", "data.name=imagefolder", f"data.path={files['images']}",
                                 f"data.cache_latents={str(cache).lower()}"])
        trainer = Trainer(cfg, progress=False)
        return [trainer._real(4) for _ in range(3)], trainer

    (cached, trainer), (encoded, _) = batches(True), batches(False)
    assert trainer.real.images.shape[1:] == (8, tp.LATENT, tp.LATENT)  # (mean, std) posteriors, not pixels
    assert trainer.teacher.latents.vae.device.type == "cpu"
    for (x, cond), (y, cond_y) in zip(cached, encoded):
        assert x.shape == (4, 4, tp.LATENT, tp.LATENT)
        # as above: the same VAE batched differently, latents up to ~0.8 (measured: equal)
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cond["encoder_hidden_states"], cond_y["encoder_hidden_states"])
    assert not torch.allclose(cached[0][0], cached[1][0])  # successive batches are new draws


def test_split_batches_draw_prompts_by_global_micro_batch_index(files, tmp_path):
    """A global batch split over processes or accumulation: micro-batch i draws its prompts from (step, phase, i)
    alone, so rank r of a DDP run draws what micro-batch r of an accumulated run draws, and ranks differ."""
    from fastdiff.config import load_config
    from fastdiff.training import Trainer

    prompts = tmp_path / "many.txt"
    prompts.write_text("\n".join(f"prompt number {i}" for i in range(50)))
    cfg = load_config(None, [f"teacher.path={files['sd']}", f"output_dir={tmp_path / 'run'}", *FAST,
                             f"data.prompts={prompts}", "train.gradient_accumulation=2"])
    trainer = Trainer(cfg, progress=False)

    def drawn(index: int) -> list[str]:
        trainer._seed_micro_batch("generator", index)
        return trainer.prompts.batch(8)

    first, second = drawn(0), drawn(1)
    assert first != second
    assert drawn(0) == first and drawn(1) == second
