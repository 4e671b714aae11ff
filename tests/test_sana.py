"""Sana teachers (SanaPipeline) end to end on a tiny pipeline built in code (tests/tiny_pipelines.py: sana_pipeline):
SanaTransformer2DModel, AutoencoderDC latents, a Gemma2 encoder with a local character-level tokenizer, and the
flow scheduler real Sana folders ship (DPMSolverMultistepScheduler, flow_prediction on flow sigmas, flow_shift 3).

Prompt encoding must be the pipeline's own (complex human instruction and all), the teacher's Denoiser must be the
scheduler's own x0 arithmetic, and an exported student must be reproduced image for image by SanaPipeline.
"""
import json

import numpy as np
import pytest
import torch

import tiny_pipelines as tp
from test_text_to_image import PROMPTS, assert_same, changed, distill, ours, run_model_card, theirs

SIZE = tp.SANA_LATENT * 4  # the tiny DC-AE's three stages: images 4x the latent size


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("sana")
    return {"sana": str(tp.sana_pipeline(root / "sana")), "prompts": str(tp.prompts_file(root / "prompts.txt")),
            "images": str(tp.caption_folder(root / "images", size=SIZE))}


def sana(pipe, steps: int, **kw) -> np.ndarray:
    """SanaPipeline at the student's own size (its default is 1024 px), no resolution bins for this tiny size."""
    return theirs(pipe, steps, height=SIZE, width=SIZE, use_resolution_binning=False, **kw)


def assert_reproduced(student, pipe, steps: int) -> None:
    """fastdiff's images equal SanaPipeline's with the transformer frozen as fastdiff freezes it, and differ by at most
    one uint8 level from the pipeline as loaded (from_pretrained leaves weights with requires_grad=True).

    Why the two: Sana's linear attention hands ``to_out`` a transposed, non-contiguous tensor, and torch's Linear on
    such an input takes another matmul path when the weight requires grad (even under no_grad): the latents then
    differ by about one float32 ulp (2.4e-7 on |x| ~ 4), which flips a uint8 level where a pixel sits on a rounding
    boundary. With the flag equal, every operation is the same and the images are equal bit for bit."""
    mine = ours(student, steps)
    as_loaded, flags = sana(pipe, steps), [p.requires_grad for p in pipe.transformer.parameters()]
    pipe.transformer.requires_grad_(False)
    assert_same(mine, sana(pipe, steps))
    for p, flag in zip(pipe.transformer.parameters(), flags):
        p.requires_grad_(flag)
    assert np.abs(mine.astype(int) - as_loaded.astype(int)).max() <= 1


def test_sana_prompt_encoding_is_the_pipelines_own(files):
    """PromptEncoder calls encode_prompt as SanaPipeline.__call__ does: the complex human instruction before the
    positive prompt (not the negative), 300 tokens kept; the result is bitwise the pipeline's own."""
    import inspect

    from fastdiff.models.teacher import load_teacher
    from fastdiff.models.text import PromptEncoder, pipeline_family

    pipe = load_teacher(files["sana"]).pipeline
    assert pipeline_family(pipe) == "sana"
    cond = PromptEncoder(pipe)(PROMPTS)
    instruction = inspect.signature(type(pipe).__call__).parameters["complex_human_instruction"].default
    pos, mask, neg, neg_mask = pipe.encode_prompt(PROMPTS, negative_prompt="", complex_human_instruction=instruction)
    for ours_, theirs_ in ((cond["encoder_hidden_states"], pos), (cond["encoder_attention_mask"], mask),
                           (cond["uncond_encoder_hidden_states"], neg), (cond["uncond_encoder_attention_mask"], neg_mask)):
        assert ours_.shape == theirs_.shape and torch.equal(ours_, theirs_)
    assert pos.shape == (3, 300, 16)
    # The instruction is there: the pipeline pads instruction + prompt to n - 2 + 300 tokens (n: the instruction's
    # own) and keeps <bos> and the last 299, which here hold the prompt's tokens (the instruction's closing space
    # merges into the prompt's first word, as in " " + prompt alone). Gemma is causal: those tokens' states differ
    # from " " + prompt's alone only through the instruction before them...
    spaced, spaced_mask, _, _ = pipe.encode_prompt([" " + p for p in PROMPTS], complex_human_instruction=None)
    assert torch.equal(mask, spaced_mask)
    for i, n in enumerate(mask.sum(1).tolist()):  # attended: <bos> (position 0, alike in both), then the prompt
        assert torch.equal(pos[i, 0], spaced[i, 0]) and not torch.equal(pos[i, 1:n], spaced[i, 1:n]), i
    # ...and none of it in the negative: <bos> alone (the empty prompt) is attended.
    assert neg_mask.sum(1).tolist() == [1, 1, 1]


def test_sana_teacher_is_the_schedulers_own_flow_arithmetic(files):
    """The teacher's Denoiser reads DPMSolver's flow config (flow_prediction, flow_shift) and returns the x0 that the
    scheduler's own convert_model_output computes from the same network output, at the scheduler's own timesteps."""
    from fastdiff.models.teacher import load_teacher
    from fastdiff.models.text import PromptEncoder

    teacher = load_teacher(files["sana"])
    d, scheduler = teacher.denoiser, teacher.scheduler
    assert d.prediction_type == "flow" and d.schedule.shift == 3.0 and teacher.conditioning == "text"
    assert teacher.latents.factor == 4 and teacher.latents.shift == 0.0 and teacher.image_shape == (3, SIZE, SIZE)
    cond = PromptEncoder(teacher.pipeline)(PROMPTS[:2])
    z = torch.randn((2, *teacher.sample_shape), generator=torch.Generator().manual_seed(0))
    scheduler.set_timesteps(4)
    for i in range(3):
        scheduler._step_index = i
        s = scheduler.sigmas[i]  # the flow t of this step: x = (1 - t) x0 + t eps
        sigma = (s.double() / (1 - s.double())).float()
        timestep = d.schedule.model_timestep(sigma.expand(2))
        # DPMSolver feeds the network int(t * T) (its timesteps are int64); fastdiff the continuous t * T, as the
        # exported FlowMatchEuler scheduler does: 1000 t to within a float32 ulp of 1000 (6e-5) and a round trip.
        assert abs(timestep[0].item() - 1000 * s.item()) < 2e-4 and int(timestep[0]) == scheduler.timesteps[i]
        out = teacher.model(z, encoder_hidden_states=cond["encoder_hidden_states"],
                            encoder_attention_mask=cond["encoder_attention_mask"], timestep=timestep,
                            return_dict=False)[0]
        x0_scheduler = scheduler.convert_model_output(out, sample=z)  # flow_prediction: sample - t * v
        x0_ours = d.denoise_native(z, sigma, cond)
        # The same network output; t differs at most by float32 rounding of sigma -> t (a few ulp of t <= 1, 1.2e-7
        # each), times |v| <= 10 here: 4 * 1.2e-7 * 10 ~ 5e-6.
        assert out.abs().max() < 10
        torch.testing.assert_close(x0_ours, x0_scheduler, rtol=0, atol=5e-6)
    # A transformer with timestep_scale (SanaPipeline multiplies the timestep by it before the call) gets it too.
    from fastdiff.models.denoiser import Denoiser

    teacher.model.register_to_config(timestep_scale=0.5)
    scaled = Denoiser(teacher.model, d.schedule, "flow")
    half = teacher.model(z, encoder_hidden_states=cond["encoder_hidden_states"], timestep=torch.full((2,), 500.0),
                         encoder_attention_mask=cond["encoder_attention_mask"], return_dict=False)[0]
    assert torch.equal(scaled.raw(z, torch.full((2,), float("inf")), cond), half)
    assert not torch.equal(d.raw(z, torch.full((2,), float("inf")), cond), half)


@pytest.mark.parametrize("steps", [1, 2])
def test_sana_dmd2_student_exports_as_sana_pipeline(files, tmp_path, steps):
    """dmd2 students (1 and 2 steps) exported as SanaPipeline folders: SanaPipeline.from_pretrained's own sampling
    gives fastdiff's images, uint8 for uint8. The export's scheduler is FlowMatchEulerDiscreteScheduler (shift 1,
    shift_terminal 1/K, fresh noise between steps), whose K levels are the student's t = 1 - i/K; the teacher's
    DPMSolver flow sigmas start below t = 1 (at the shifted 1 - 1/T) and could not reproduce them."""
    from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, SanaPipeline

    student = distill(files["sana"], tmp_path / "run", "objective.name=dmd2", f"data.prompts={files['prompts']}",
                      "objective.critic_updates=1", "train.lr_generator=1e-3", f"student.num_steps={steps}")
    assert changed(student, files["sana"], "transformer") > 0
    info = json.loads((student / "fastdiff.json").read_text())
    assert info["pipeline_class"] == "SanaPipeline" and info["scheduler_class"] == "FlowMatchEulerDiscreteScheduler"
    assert info["call_args"] == f", height={SIZE}, width={SIZE}, use_resolution_binning=False"
    pipe = SanaPipeline.from_pretrained(student)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    assert "flow_shift" not in pipe.scheduler.config  # only the table length came from the teacher's DPMSolver
    assert pipe.scheduler.config.stochastic_sampling == (steps > 1)  # fresh noise between steps, as the student
    pipe.scheduler.set_timesteps(steps)
    assert pipe.scheduler.sigmas.tolist() == [1 - i / steps for i in range(steps)] + [0.0]
    assert_reproduced(student, pipe, steps)
    run_model_card(student)
    teacher_scheduler = DPMSolverMultistepScheduler.from_pretrained(files["sana"], subfolder="scheduler")
    teacher_scheduler.set_timesteps(1)
    assert teacher_scheduler.sigmas[0] < 1  # why the export cannot keep the teacher's scheduler


@pytest.mark.parametrize("objective", ["sid", "scm"])
def test_sana_sid_and_scm_students_match_sana_pipeline(files, tmp_path, objective):
    """SiD (generator samples, prompts) and sCM (noised real images through the DC-AE encoder, JVP through Sana's
    linear attention) on the Sana teacher, exported and reproduced by SanaPipeline at one step."""
    from diffusers import SanaPipeline

    data = [f"data.prompts={files['prompts']}"] if objective == "sid" else \
        ["data.name=imagefolder", f"data.path={files['images']}", "objective.tangent=jvp"]
    student = distill(files["sana"], tmp_path / "run", f"objective.name={objective}", *data, "train.lr_generator=1e-3")
    assert changed(student, files["sana"], "transformer") > 0
    pipe = SanaPipeline.from_pretrained(student)
    assert_reproduced(student, pipe, 1)


def test_sana_euler_folders_and_refusals(files, tmp_path):
    """A Sana folder shipping FlowMatchEulerDiscreteScheduler loads alike (its shift); DPMSolver flow_prediction without
    flow sigmas, and Sana pipelines other than SanaPipeline, are refused with one line."""
    from diffusers import DPMSolverMultistepScheduler

    from fastdiff.errors import FastdiffError
    from fastdiff.models.teacher import load_teacher
    from fastdiff.models.text import pipeline_family

    euler = load_teacher(str(tp.sana_pipeline(tmp_path / "euler", scheduler="euler")))
    assert euler.denoiser.prediction_type == "flow" and euler.denoiser.schedule.shift == 3.0
    teacher = load_teacher(files["sana"])
    teacher.scheduler.save_pretrained(tmp_path / "sched")
    bad = DPMSolverMultistepScheduler.from_pretrained(tmp_path / "sched", use_flow_sigmas=False)
    bad.save_pretrained(tmp_path / "bad" / "scheduler")
    for part in ("transformer", "vae", "text_encoder", "tokenizer", "model_index.json"):
        (tmp_path / "bad" / part).symlink_to(f"{files['sana']}/{part}")
    with pytest.raises(FastdiffError, match="needs use_flow_sigmas=True"):
        load_teacher(str(tmp_path / "bad"))

    class SanaSprintPipeline:  # a Sana pipeline with other inputs (timestep_scale, guidance embedding, SCM scheduler)
        pass

    with pytest.raises(FastdiffError, match=r"^SanaSprintPipeline: fastdiff encodes prompts for .*Sana.*not supported$"):
        pipeline_family(SanaSprintPipeline())


@pytest.mark.slow
def test_sana_lora_student_loads_with_load_lora_weights_and_fused(files, tmp_path):
    """A LoRA student of the Sana teacher: SanaPipeline's own load_lora_weights plus the exported scheduler, and the
    fused folder, both give fastdiff's images (transformer frozen as fastdiff's: see assert_reproduced)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SanaPipeline

    out = distill(files["sana"], tmp_path / "run", f"data.prompts={files['prompts']}", "student.lora_rank=4",
                  "objective.fake_lora_rank=4", "train.lr_generator=1e-2", "train.lr_critic=1e-2")
    assert (out / "pytorch_lora_weights.safetensors").is_file() and (out / "fused").is_dir()
    pipe = SanaPipeline.from_pretrained(files["sana"])
    plain = sana(pipe, 1)
    pipe.load_lora_weights(str(out))
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(out, subfolder="scheduler")
    assert_reproduced(out, pipe, 1)
    assert not np.array_equal(plain, sana(pipe, 1))  # the adapters did train
    assert_reproduced(out / "fused", SanaPipeline.from_pretrained(out / "fused"), 1)
    run_model_card(out)
