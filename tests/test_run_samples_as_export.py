"""The run samples its student as its export does, for every teacher family tests/tiny_pipelines.py builds.

Sample grids and ``train.eval_every`` sample ``Trainer.export_generator()``, the in-memory student; ``fastdiff
sample / fid / clip-score`` sample the exported folder (``load_sampler`` + ``sample_model``). The two must give the
same images, or evaluations during training score other images than the export's. A bug of exactly this kind: a
two-step Flux student ("lcm" sampler) re-noised between steps in the unpacked layout in memory and in FluxPipeline's
packed layout in its export (tests/test_flux.py has that single check). Here, for SD (epsilon and v-prediction),
SDXL, SD3, PixArt, DiT (class-conditional), Sana and Flux (with and without guidance_embeds), a one-step student,
two-step students with the lcm (re-noising) and ddim samplers, and LoRA students (adapters loaded by diffusers'
``load_lora_weights``, with alpha = rank and alpha = 2 rank, or fused into the weights) each give the export's
images, uint8 for uint8, with seed 7 and the same prompts.

A training step barely moves a tiny student (the DMD2 gradient is ~0 while the fake score still equals the teacher; a
LoRA's zero-initialised B stays ~1e-5), so the student and its EMA get seeded perturbations of their trainable
weights before ``fit``, and each case checks that its images differ from the teacher's: equality is not two copies of
the teacher agreeing. The EMA keeps half of its own (train.ema_decay=0.5; the default half-life's first update copies
the raw student), so sampling the raw weights on one side would not pass either.

Refused by fastdiff with a one-line message, so not run: a LoRA student exported as LoRA weights
(student.lora_export both / lora) for PixArt and DiT ("... cannot load LoRA weights: set student.lora_export=fused");
those run with lora_export=fused.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import tiny_pipelines as tp
from conftest import assert_same_uint8, by_default

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

PROMPTS = ["a red shoe on a table", "a blue bag", "a green shirt"]

# family: (builder, the diffusers / transformers classes it needs, text-to-image, extra run settings)
FAMILIES = {
    "sd": (tp.sd_pipeline, ["StableDiffusionPipeline", "UNet2DConditionModel"], True, []),
    "sd-v": (lambda path: tp.sd_pipeline(path, "v_prediction"), ["StableDiffusionPipeline"], True, []),
    "sdxl": (tp.sdxl_pipeline, ["StableDiffusionXLPipeline"], True, []),
    "sd3": (tp.sd3_pipeline, ["StableDiffusion3Pipeline", "SD3Transformer2DModel"], True, []),
    "pixart": (tp.pixart_pipeline, ["PixArtAlphaPipeline", "PixArtTransformer2DModel", "T5EncoderModel"], True, []),
    "dit": (tp.dit_pipeline, ["DiTPipeline", "DiTTransformer2DModel"], False, []),
    "sana": (tp.sana_pipeline, ["SanaPipeline", "SanaTransformer2DModel", "AutoencoderDC", "Gemma2Model"], True, []),
    # guidance-distilled (FLUX.1-dev style): the student is fed the embedded guidance it trained with
    "flux": (tp.flux_pipeline, ["FluxPipeline", "FluxTransformer2DModel", "T5EncoderModel"], True,
             ["teacher.guidance_scale=3"]),
    "flux-plain": (lambda path: tp.flux_pipeline(path, guidance_embeds=False),
                   ["FluxPipeline", "FluxTransformer2DModel", "T5EncoderModel"], True, []),
}
LORA = ["student.num_steps=2", "student.lora_rank=4", "objective.fake_lora_rank=4"]  # lcm: re-noises too
SETTINGS = {
    "1step": ["student.num_steps=1"],
    "2step-lcm": ["student.num_steps=2", "student.sampler=lcm"],  # fresh noise between steps: its layout matters
    # the ddim sampler starts at the top of the schedule (sigma_init auto resolves to it, on VP teachers too)
    "2step-ddim": ["student.num_steps=2", "student.sampler=ddim"],
    "lora": LORA,  # exported as LoRA weights (and fused/), sampled through load_lora_weights on the teacher
    "lora-alpha": [*LORA, "student.lora_alpha=8"],  # scale 2, folded into the exported lora_B
    "lora-fused": [*LORA, "student.lora_export=fused"],  # adapters merged into the exported weights
}
CASES = [(family, setting) for family in FAMILIES for setting in ("1step", "2step-lcm", "2step-ddim")]
CASES += [(family, "lora") for family in ("sd", "sd-v", "sdxl", "sd3", "sana", "flux", "flux-plain")]
CASES += [("sd", "lora-alpha"), ("flux", "lora-alpha")]
CASES += [(family, "lora-fused") for family in ("sd", "pixart", "dit", "flux")]

# A fused export's weights are W + scale B A (models/lora.py merged_model), summed once; in memory the peft layer
# computes W x + scale B (A x): another float32 order. Measured here, max |ours - export| in [0, 1] image units:
# 3.6e-7 (sd), 2.7e-7 (pixart), 2.4e-7 (dit), 5.7e-7 (flux); uint8 equal on this CPU, but a value that close to a
# rounding tie may round either way on another one. Every other case is equal bit for bit, in float32 too.
FUSED_BOUND = 2e-6


def available(name: str) -> bool:
    for module in (diffusers, transformers):
        try:
            if hasattr(module, name):
                return True
        except Exception:  # a lazy import whose own dependency is missing
            pass
    return False


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """Each tiny teacher folder, built once for the module (at its first use), and the training prompts file."""
    root = tmp_path_factory.mktemp("families")
    built = {}

    def get(family: str) -> str:
        if family not in built:
            build, needs, _, _ = FAMILIES[family]
            missing = [name for name in needs if not available(name)]
            if missing:
                pytest.skip(f"this diffusers / transformers has no {', '.join(missing)}")
            built[family] = str(build(root / family))
        return built[family]

    get.prompts = str(tp.prompts_file(root / "prompts.txt"))
    return get


def perturb(trainer) -> None:
    """Seeded perturbations of the student's trainable weights and, another one, of its EMA: LoRA adapters get
    N(0, 0.05^2) added, a full student's weights are scaled by 1 + N(0, 0.05^2)."""
    trainable = [n for n, p in trainer.generator.denoiser.model.named_parameters() if p.requires_grad]
    for seed, net in enumerate((trainer.generator.denoiser.model, trainer.ema)):
        params, g = dict(net.named_parameters()), torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name in trainable:
                p = params[name]
                noise = 0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype)
                p.add_(noise if "lora_" in name else p * noise)


def images(model, loaded, steps: int, prompts) -> np.ndarray:
    """``sample_model``'s 3 images of seed 7 as [0, 1] floats before its uint8 rounding (``uint8`` rounds them
    as it does)."""
    from unittest import mock

    from fastdiff.inference import sampling

    with torch.no_grad(), mock.patch.object(sampling, "to_uint8", sampling.to_unit):
        return next(sampling.sample_model(model, loaded, 3, steps, 7, 3, torch.device("cpu"), prompts=prompts))[1]


def uint8(unit: np.ndarray) -> np.ndarray:
    return (unit * 255).round().astype(np.uint8)  # fastdiff.inference.sampling.to_uint8's rounding


# Every family and every setting once by default (twelve cases: each family's layout, each sampler and LoRA form);
# the other cross-products behind the slow marker.
DEFAULT = {"sd-2step-lcm", "sd-v-2step-ddim", "sdxl-1step", "sd3-2step-lcm", "pixart-2step-ddim", "dit-2step-lcm",
           "sana-1step", "flux-2step-ddim", "flux-plain-1step", "sd-lora", "flux-lora-alpha", "flux-lora-fused"}


@pytest.mark.parametrize("family,setting", by_default(CASES, [f"{f}-{s}" for f, s in CASES], DEFAULT))
def test_the_run_samples_its_student_as_its_export_does(family, setting, teachers, tmp_path):
    from fastdiff.config import load_config
    from fastdiff.inference.sampling import load_sampler
    from fastdiff.training import Trainer

    if setting.startswith("lora"):
        pytest.importorskip("peft")
    teacher = teachers(family)
    _, _, text, extra = FAMILIES[family]
    cfg = load_config(None, [f"teacher.path={teacher}", f"output_dir={tmp_path / 'run'}", "train.max_steps=1",
                             "train.batch_size=2", "train.ema_decay=0.5", "objective.critic_updates=1",
                             "train.checkpoint_every=100", "train.sample_every=100", "train.log_every=100",
                             *([f"data.prompts={teachers.prompts}"] if text else []), *extra, *SETTINGS[setting]])
    trainer = Trainer(cfg, overwrite=True, progress=False)
    perturb(trainer)
    out = trainer.fit()  # exports the student folder
    steps, prompts = cfg.student.num_steps, (PROMPTS if text else None)
    gen = trainer.export_generator().eval()
    ours = images(gen, trainer.teacher, steps, prompts)
    theirs = images(*load_sampler(str(out), torch.device("cpu")), steps, prompts)
    if setting == "lora-fused":
        assert np.abs(ours - theirs).max() <= FUSED_BOUND
        assert_same_uint8(ours, theirs, FUSED_BOUND)  # uint8: equal but at rounding ties
    else:  # uint8: the same network, noise and steps in the same float32 order
        differ = int((uint8(ours) != uint8(theirs)).sum())
        assert differ == 0, (f"{differ} of {ours.size} uint8 values differ; max |difference| in [0, 1]: "
                             f"{np.abs(ours - theirs).max():.3g}")
    # the teacher's own weights on the same sampler: the uint8 check can tell the student from them
    plain = type(gen)(trainer.teacher.denoiser, gen.num_steps, gen.sigma_init, gen.sampler)
    assert not np.array_equal(uint8(ours), uint8(images(plain, trainer.teacher, steps, prompts))), \
        "the student samples as its teacher: the check above proves nothing"
