"""NASA (pipelines/pipeline_fastdiff_nasa.py, SNOOPI arXiv 2412.02687): the processor against the paper's equation
computed by hand, alpha = 0 against diffusers' plain processor, and an exported SD-style student taking a negative
prompt in one pass per step."""
import json
import math

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

import tiny_pipelines as tp
from fastdiff.pipelines import FastdiffNASAPipeline
from fastdiff.pipelines.pipeline_fastdiff_nasa import NASAAttnProcessor, cross_attention_modules, steer_away


def attention(dtype=torch.float64, seed=0) -> Attention:
    torch.manual_seed(seed)
    attn = Attention(query_dim=8, cross_attention_dim=6, heads=2, dim_head=4, bias=True, out_bias=True)
    return attn.to(dtype).eval()


def by_hand(attn: Attention, h: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, alpha: float) -> torch.Tensor:
    """SNOOPI's NASA written out per sample and head: W_o (softmax(q k+^T / sqrt d) v+ - alpha softmax(q k-^T /
    sqrt d) v-) + b_o, with q, k, v the layer's own projections, heads split as contiguous blocks of d features."""
    def lin(layer, x):
        return x @ layer.weight.T + (layer.bias if layer.bias is not None else 0)

    d = attn.to_k.out_features // attn.heads
    out = []
    for b in range(h.shape[0]):
        nb = neg[b % neg.shape[0]]
        q, z = lin(attn.to_q, h[b]), []
        for i in range(attn.heads):
            cols = slice(i * d, (i + 1) * d)
            feats = []
            for c in (pos[b], nb):
                k, v = lin(attn.to_k, c)[:, cols], lin(attn.to_v, c)[:, cols]
                w = torch.exp(q[:, cols] @ k.T / math.sqrt(d))
                feats.append((w / w.sum(dim=1, keepdim=True)) @ v)
            z.append(feats[0] - alpha * feats[1])
        out.append(lin(attn.to_out[0], torch.cat(z, dim=1)))
    return torch.stack(out)


@pytest.mark.parametrize("alpha, negatives", [(0.7, 1), (1.5, 3)])
def test_processor_is_the_papers_equation(alpha, negatives):
    attn = attention()
    g = torch.Generator().manual_seed(1)
    h = torch.randn(3, 5, 8, generator=g, dtype=torch.float64)
    pos = torch.randn(3, 4, 6, generator=g, dtype=torch.float64)
    neg = torch.randn(negatives, 7, 6, generator=g, dtype=torch.float64)  # its own token count; shared or per sample
    ours = NASAAttnProcessor(neg, alpha)(attn, h, pos)
    # float64 throughout: the same sums in another order agree to ~1e-15 of values of order 1
    torch.testing.assert_close(ours, by_hand(attn, h, pos, neg, alpha), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="negative prompt embeddings for a batch"):
        NASAAttnProcessor(torch.randn(2, 7, 6, dtype=torch.float64), alpha)(attn, h, pos)


def test_alpha_zero_is_the_plain_processor_bit_for_bit():
    attn = attention(torch.float32)
    g = torch.Generator().manual_seed(2)
    h, pos = torch.randn(2, 9, 8, generator=g), torch.randn(2, 4, 6, generator=g)
    neg = torch.randn(1, 4, 6, generator=g)
    assert torch.equal(NASAAttnProcessor(neg, 0.0)(attn, h, pos), AttnProcessor2_0()(attn, h, pos))
    assert not torch.equal(NASAAttnProcessor(neg, 0.1)(attn, h, pos), AttnProcessor2_0()(attn, h, pos))


def test_steer_away_reaches_every_cross_attention_and_restores_them(tmp_path):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tp.sd_pipeline(tmp_path / "sd"), subfolder="unet").eval()
    modules = cross_attention_modules(unet)
    assert modules and all(name.endswith("attn2") for name, m in unet.named_modules() if m in modules)
    before = {name: p for name, p in unet.attn_processors.items()}
    g = torch.Generator().manual_seed(3)
    x, text = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 16, 32, generator=g)
    neg = torch.randn(1, 16, 32, generator=g)
    with torch.no_grad():
        plain = unet(x, 500, encoder_hidden_states=text).sample
        with steer_away(unet, neg, 0.0):
            assert sum(isinstance(p, NASAAttnProcessor) for p in unet.attn_processors.values()) == len(modules)
            zero = unet(x, 500, encoder_hidden_states=text).sample
        with steer_away(unet, neg, 0.8):
            steered = unet(x, 500, encoder_hidden_states=text).sample
    assert torch.equal(zero, plain)  # the whole UNet, alpha 0: bit for bit
    assert (steered - plain).abs().max() > 1e-3  # outputs of order 1: far above float32 rounding
    assert unet.attn_processors == before  # the same processor objects back


def images(pipe, prompts, **kw) -> np.ndarray:
    return pipe(prompts, num_inference_steps=1, guidance_scale=0, generator=torch.Generator().manual_seed(4),
                output_type="np", **kw).images


def test_sd_pipeline_takes_a_negative_prompt_in_one_pass(tmp_path):
    """An SD-shaped folder (the layout fastdiff exports SD students in) through FastdiffNASAPipeline."""
    from diffusers import DiffusionPipeline, StableDiffusionPipeline

    folder = tp.sd_pipeline(tmp_path / "sd")
    pipe = FastdiffNASAPipeline.from_pretrained(folder)
    prompts = ["a red shoe", "a blue bag"]
    calls = []
    hook = pipe.unet.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
    steered = images(pipe, prompts, negative_prompt="blurry", nasa_scale=1.0)
    hook.remove()
    assert calls == [len(prompts)]  # one UNet pass, no CFG batch doubling
    plain = images(StableDiffusionPipeline.from_pretrained(folder), prompts)
    assert np.array_equal(images(pipe, prompts), plain)  # no negative prompt: the standard pipeline exactly
    assert np.array_equal(images(pipe, prompts, negative_prompt="blurry", nasa_scale=0), plain)
    # images in [0, 1]; measured 0.04 on this random network: the negative prompt moves it well past rounding
    assert np.abs(steered - plain).max() > 1e-3
    per_prompt = images(pipe, prompts, negative_prompt=["blurry", "a red shoe"], nasa_scale=1.0)
    assert np.array_equal(per_prompt[0], steered[0]) and not np.array_equal(per_prompt[1], steered[1])
    # with several images per prompt each image gets its own prompt's negative (the first prompt's two images are
    # the first prompt's alone: the same leading noise draws, every network per sample)
    two_each = images(pipe, prompts, negative_prompt=["blurry", "a red shoe"], nasa_scale=1.0, num_images_per_prompt=2)
    first_alone = images(pipe, prompts[:1], negative_prompt="blurry", nasa_scale=1.0, num_images_per_prompt=2)
    # batch 4 against 2 runs other float32 kernel blockings: measured 1e-7; 1e-5 (images in [0, 1]) is far below
    # the 0.04 a negative prompt moves them, so a wrong pairing of images and negatives cannot pass
    assert np.abs(two_each[:2] - first_alone).max() <= 1e-5
    assert all(isinstance(p, AttnProcessor2_0) for p in pipe.unet.attn_processors.values())  # restored
    with pytest.raises(ValueError, match="guidance_scale <= 1"):
        pipe(prompts, negative_prompt="blurry", num_inference_steps=1, guidance_scale=7.5)
    # without fastdiff's import path: diffusers loads the pipeline file itself as a custom pipeline
    from fastdiff.pipelines import pipeline_fastdiff_nasa

    loose = DiffusionPipeline.from_pretrained(folder, custom_pipeline=pipeline_fastdiff_nasa.__file__,
                                              trust_remote_code=True)
    assert type(loose).__name__ == "FastdiffNASAPipeline"
    assert np.array_equal(images(loose, prompts, negative_prompt="blurry", nasa_scale=1.0), steered)


@pytest.mark.slow
def test_exported_sd_student_takes_a_negative_prompt(tmp_path):
    from diffusers import StableDiffusionPipeline

    from test_text_to_image import distill

    teacher = str(tp.sd_pipeline(tmp_path / "sd"))
    student = distill(teacher, tmp_path / "run", "objective.name=dmd2", "objective.critic_updates=1",
                      f"data.prompts={tp.prompts_file(tmp_path / 'prompts.txt')}", "train.max_steps=1")
    info = json.loads((student / "fastdiff.json").read_text())
    assert info["pipeline_class"] == "StableDiffusionPipeline" and info["scheduler_class"] == "LCMScheduler"
    assert "FastdiffNASAPipeline" in (student / "README.md").read_text()
    pipe = FastdiffNASAPipeline.from_pretrained(student)
    prompts = ["a red shoe on a table", "a blue bag"]
    plain = images(StableDiffusionPipeline.from_pretrained(student), prompts)
    assert np.array_equal(images(pipe, prompts), plain)
    # measured 0.041 (images in [0, 1]) with nasa_scale 1 on this student
    assert np.abs(images(pipe, prompts, negative_prompt="blurry", nasa_scale=1.0) - plain).max() > 1e-3
