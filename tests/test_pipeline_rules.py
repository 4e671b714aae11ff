"""Rules of the exported students' pipelines (pipelines/*.py) and the export's model card that the end-to-end tests
leave open: each pipeline's guidance combination checked against raw network passes (class-conditional CFG with the
null class, the three-pass nested two-condition CFG in both orders with a given null text, the multi-student router
under CFG and its default labels), fastdiff's K-step levels where K does not divide the table, SD3 flow-map timestep
checks, NASA's processor on a normalised cross-attention and on a batch larger than its negatives, the NASA pipeline's
guidance checks, the flow-map pipeline's output types, and the card's absent components. Tiny networks built in
code; float64 references."""
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, LCMScheduler

import tiny_pipelines as tp
from conftest import tiny_unet
from fastdiff.pipelines import FastdiffClassConditionalPipeline, FastdiffMultiGuidancePipeline, FastdiffNASAPipeline
from fastdiff.pipelines.pipeline_fastdiff_flow_map import step_timesteps
from fastdiff.pipelines.pipeline_fastdiff_nasa import NASAAttnProcessor

EPS32 = torch.finfo(torch.float32).eps


def spy_step(pipe) -> list:
    """Record (model_output, t, sample) of every scheduler step the pipeline takes."""
    seen, step = [], pipe.scheduler.step

    def recorded(model_output, t, sample, *args, **kwargs):
        seen.append((model_output.detach().clone(), t, sample.detach().clone()))
        return step(model_output, t, sample, *args, **kwargs)

    pipe.scheduler.step = recorded
    return seen


def tolerance(scale: float, *passes: torch.Tensor) -> float:
    """Our single-pass references run batches of another size than the pipeline's concatenated CFG batch, so each of
    the tiny network's ~20 float32 layers may round the last bits differently: ~20 eps32 of the largest magnitude per
    pass, times the combination's coefficient sum (1 + 2 |s| per guided difference)."""
    return 20 * EPS32 * (1 + 2 * abs(scale)) * max(float(p.abs().max()) for p in passes)


# --- class-conditional pipeline: CFG with the null class, default labels ------------------------------------------


def class_pipeline():
    unet = tiny_unet(num_class_embeds=4, seed=1).eval()  # 3 classes + the null class (index 3)
    scheduler = DDIMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction", clip_sample=False)
    pipe = FastdiffClassConditionalPipeline(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("scale", [2.5, 0.0])  # 0: the unconditional prediction, not "no CFG"
def test_class_conditional_cfg_is_uncond_plus_scale_times_cond_minus_uncond_with_the_last_class_null(scale):
    pipe = class_pipeline()
    seen = spy_step(pipe)
    labels = torch.tensor([0, 2, 1])
    pipe(class_labels=labels, num_inference_steps=1, guidance_scale=scale, generator=torch.Generator().manual_seed(0),
         output_type="pt")
    (output, t, x), = seen
    with torch.no_grad():
        cond = pipe.unet(x, t, class_labels=labels).sample.double()
        uncond = pipe.unet(x, t, class_labels=torch.full_like(labels, 3)).sample.double()
    assert (cond - uncond).abs().max() > 1e-2  # the null class is seen: far above the tolerance below
    expected = uncond + scale * (cond - uncond)
    assert (output.double() - expected).abs().max() <= tolerance(scale, cond, uncond)


def test_class_conditional_default_labels_cycle_over_the_real_classes_only():
    pipe = class_pipeline()
    seen = []
    pipe.unet.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["class_labels"].tolist()),
                                        with_kwargs=True)
    pipe(batch_size=5, num_inference_steps=1, output_type="pt")
    assert seen == [[0, 1, 2, 0, 1]]  # never the null class 3


# --- multi-student router: CFG per student, default labels --------------------------------------------------------


def test_router_under_cfg_is_each_students_own_guided_pipeline_and_cycles_over_classes(tmp_path):
    from test_msd import _router

    router, (s0, s1) = _router(tmp_path, small_second=True)

    def images(pipe, seed=3, **kw):
        return pipe(num_inference_steps=1, generator=torch.Generator().manual_seed(seed), output_type="np", **kw).images

    # one student's batch under CFG: its own FastdiffClassConditionalPipeline's images, bit for bit
    assert np.array_equal(images(router, class_labels=[0, 2], guidance_scale=2.5),
                          images(s0, class_labels=[0, 2], guidance_scale=2.5))
    assert np.array_equal(images(router, class_labels=[1], guidance_scale=2.5),
                          images(s1, class_labels=[1], guidance_scale=2.5))
    assert not np.array_equal(images(s0, class_labels=[0, 2], guidance_scale=2.5), images(s0, class_labels=[0, 2]))
    # no labels: 0, 1, 2, 0, 1 (the 3 classes of the table, not the 2 students)
    assert np.array_equal(images(router, batch_size=5), images(router, class_labels=[0, 1, 2, 0, 1]))


# --- the nested two-condition CFG of FastdiffMultiGuidancePipeline (the teacher's three passes) -------------------


@pytest.mark.parametrize("order", ["class_first", "text_first"])
def test_multi_guidance_teacher_pipeline_is_nested_cfg_of_raw_passes_with_the_given_null_text(order):
    from test_fada import NULL, TEXT_DIM, TEXT_LEN, two_condition_unet

    unet = two_condition_unet().eval()
    scheduler = DDIMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction", clip_sample=False)
    pipe = FastdiffMultiGuidancePipeline(unet=unet, scheduler=scheduler, guidance_order=order)
    pipe.set_progress_bar_config(disable=True)
    seen = spy_step(pipe)
    g = torch.Generator().manual_seed(4)
    labels = torch.tensor([0, 2])
    text, null_text = 3 * torch.randn(2, TEXT_LEN, TEXT_DIM, generator=g), torch.randn(2, TEXT_LEN, TEXT_DIM, generator=g)
    s_c, s_t = 3.0, 1.5  # different, so swapped scales are seen
    pipe(labels, text, negative_prompt_embeds=null_text, class_guidance_scale=s_c, text_guidance_scale=s_t,
         num_inference_steps=1, generator=g, output_type="pt")
    (output, t, x), = seen
    null_label = torch.full_like(labels, NULL)

    def v(lab, txt):
        with torch.no_grad():
            return unet(x, t, encoder_hidden_states=txt, class_labels=lab).sample.double()

    v00, v_ct = v(null_label, null_text), v(labels, text)
    if order == "class_first":  # InstructPix2Pix Eq. 3, the class in the image condition's role
        v_c0 = v(labels, null_text)
        expected = v00 + s_c * (v_c0 - v00) + s_t * (v_ct - v_c0)
    else:
        v_0t = v(null_label, text)
        expected = v00 + s_t * (v_0t - v00) + s_c * (v_ct - v_0t)
    # the given null text matters: with zeros instead the combination moves well past the tolerance
    assert (v(null_label, torch.zeros_like(text)) - v00).abs().max() > 1e-2
    assert (output.double() - expected).abs().max() <= tolerance(s_c + s_t, v00, v_ct)


# --- flow-map levels -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [3, 6, 7])
def test_step_timesteps_round_down_as_lcm_where_k_does_not_divide_the_table(k):
    if k == 3:
        assert step_timesteps(1000, 3) == [999, 666, 333]  # the docstring's example (DDIM's trailing grid has 332)
    lcm = LCMScheduler(original_inference_steps=1000)
    lcm.set_timesteps(k)
    assert step_timesteps(1000, k) == lcm.timesteps.tolist()


def test_sd3_flow_map_pipeline_refuses_timesteps_not_from_pure_noise_or_not_decreasing(tmp_path):
    from fastdiff.pipelines import FastdiffFlowMapSD3Pipeline

    pipe = FastdiffFlowMapSD3Pipeline.from_pretrained(tp.sd3_pipeline(tmp_path / "sd3"), text_encoder_3=None,
                                                      tokenizer_3=None)
    for bad in ([800, 300], [1000, 1000, 300], [1000, 0]):  # the checks run before the network is called
        with pytest.raises(ValueError, match="must decrease strictly from 1000"):
            pipe("a red shoe", timesteps=bad, output_type="latent")


# --- NASA ----------------------------------------------------------------------------------------------------------


def test_nasa_processor_normalises_the_negative_prompt_like_the_positive_one():
    """A cross-attention with ``cross_attention_norm`` (norm_cross): the negative's keys and values come from the
    normalised negative embeddings, as the positive's from the normalised prompt (SNOOPI: the layer's own
    projections of c-)."""
    from diffusers.models.attention_processor import Attention

    from test_nasa import by_hand

    torch.manual_seed(0)
    attn = Attention(query_dim=8, cross_attention_dim=6, heads=2, dim_head=4, bias=True, out_bias=True,
                     cross_attention_norm="layer_norm").double().eval()
    with torch.no_grad():  # a norm that is not the identity at init
        attn.norm_cross.weight.normal_()
        attn.norm_cross.bias.normal_()
    g = torch.Generator().manual_seed(1)
    h = torch.randn(2, 5, 8, generator=g, dtype=torch.float64)
    pos = 3 + 2 * torch.randn(2, 4, 6, generator=g, dtype=torch.float64)  # far from normalised
    neg = -2 + 3 * torch.randn(1, 7, 6, generator=g, dtype=torch.float64)
    with torch.no_grad():
        ours = NASAAttnProcessor(neg, 0.8)(attn, h, pos)
        ref = by_hand(attn, h, attn.norm_cross(pos), attn.norm_cross(neg), 0.8)
    # float64 throughout, values of order 1: the same sums in another order agree to ~1e-15
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)


def test_nasa_processor_tiles_per_image_negatives_over_a_larger_batch():
    """B- negatives for a batch of m B- (a CFG-doubled batch): image b takes negative b mod B-, both halves alike."""
    from test_nasa import attention, by_hand

    attn = attention()
    g = torch.Generator().manual_seed(5)
    h = torch.randn(4, 5, 8, generator=g, dtype=torch.float64)
    pos = torch.randn(4, 4, 6, generator=g, dtype=torch.float64)
    neg = torch.randn(2, 7, 6, generator=g, dtype=torch.float64)
    with torch.no_grad():
        ours = NASAAttnProcessor(neg, 1.2)(attn, h, pos)
    # by_hand pairs image b with neg[b % 2]; float64 as in test_nasa
    torch.testing.assert_close(ours, by_hand(attn, h, pos, neg, 1.2), rtol=1e-12, atol=1e-12)


def test_nasa_pipeline_guidance_checks(tmp_path):
    """Without guidance_scale the call takes StableDiffusionPipeline's default (7.5, CFG): refused with a negative
    prompt; a guidance-embedded student (time_cond_proj_dim) takes any scale in its one pass."""
    from diffusers import UNet2DConditionModel

    pipe = FastdiffNASAPipeline.from_pretrained(tp.sd_pipeline(tmp_path / "sd"))
    pipe.set_progress_bar_config(disable=True)
    with pytest.raises(ValueError, match="guidance_scale <= 1"):
        pipe(["a red shoe"], negative_prompt="blurry", num_inference_steps=1, output_type="latent")
    torch.manual_seed(0)
    embedded = UNet2DConditionModel.from_config({**pipe.unet.config, "time_cond_proj_dim": 8}).eval()
    student = FastdiffNASAPipeline(**{**pipe.components, "unet": embedded})
    student.set_progress_bar_config(disable=True)
    calls = []
    embedded.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
    out = student(["a red shoe"], negative_prompt="blurry", nasa_scale=0.5, guidance_scale=3.0, num_inference_steps=1,
                  output_type="latent").images
    assert calls == [1] and torch.isfinite(out).all()  # one pass, no CFG doubling


# --- the model card --------------------------------------------------------------------------------------------------


def test_flow_map_card_names_the_absent_components_in_both_load_calls():
    from fastdiff.inference.model_card import model_card_body

    info = dict(num_steps=1, pipeline_class="FastdiffFlowMapSD3Pipeline", scheduler_class="FlowMatchEulerDiscreteScheduler",
                absent_components=["text_encoder_3", "tokenizer_3"], num_classes=0, flow_map=True, teacher="t/sd3",
                objective="meanflow", train_step=2, ema=False, settings={})
    body = model_card_body(info)
    assert 'FastdiffFlowMapSD3Pipeline.from_pretrained(".", text_encoder_3=None, tokenizer_3=None)' in body
    assert 'trust_remote_code=True, text_encoder_3=None, tokenizer_3=None)' in body


def test_fada_card_calls_with_each_default_scale_in_its_own_argument():
    from fastdiff.inference.model_card import multi_guidance_card

    info = dict(class_guidance_range=[1.0, 4.0], text_guidance_range=[1.0, 8.0], class_guidance_scale=2.0,
                text_guidance_scale=5.0, teacher="t/fada", guidance_order="class_first", train_step=2,
                objective="fada")
    text = str(multi_guidance_card(info))
    assert "class_guidance_scale=2.0," in text and "text_guidance_scale=5.0," in text


def test_is_hub_id_takes_owner_name_but_not_relative_or_existing_local_paths(tmp_path, monkeypatch):
    from fastdiff.inference.export_format import is_hub_id

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "student").mkdir(parents=True)
    assert is_hub_id("stabilityai/sd-turbo") and is_hub_id("owner/name.v2")
    for local in ("./student", "../student", "~/student", "/abs/student", "runs/student", "a/b/c", "plain"):
        assert not is_hub_id(local), local


def test_guidance_embedded_class_card_imports_the_network_class_before_loading():
    """diffusers resolves model_index.json's fastdiff class only from sys.modules: the card imports it first (the
    slow test_consistency run executes such a card in a fresh interpreter; this is its fast check)."""
    from fastdiff.inference.model_card import model_card_body

    info = dict(num_steps=2, num_classes=3, guidance_embedded=True, teacher="t/cond", objective="cd", train_step=1,
                ema=False, settings={})
    usage = model_card_body(info).split("```python\n")[1].split("```")[0]
    imports, load = usage.index("from fastdiff import GuidanceEmbeddedUNet"), usage.index(".from_pretrained(")
    assert imports < load and "guidance_scale=2.0" in usage


def test_flow_map_pipeline_output_types_are_one_image_in_three_forms():
    """output_type "pt" is a (B, C, H, W) tensor in [0, 1], as diffusers' pipelines return (it once gave the numpy
    array regardless), "np" the same values as (B, H, W, C), "pil" those as uint8 images."""
    from fastdiff.models.flow_map import add_flow_map_embedding
    from fastdiff.models.flow_map_model import FlowMapModel
    from fastdiff.pipelines.pipeline_fastdiff_flow_map import FastdiffFlowMapPipeline

    pipe = FastdiffFlowMapPipeline(unet=FlowMapModel.wrap(add_flow_map_embedding(tiny_unet())), scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    out = {kind: pipe(batch_size=2, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                      output_type=kind).images for kind in ("pt", "np", "pil")}
    assert isinstance(out["pt"], torch.Tensor) and out["pt"].shape == (2, 1, 8, 8)
    assert torch.equal(out["pt"].permute(0, 2, 3, 1), torch.from_numpy(out["np"]))  # the same float32 values
    assert np.array_equal(np.stack([np.asarray(im) for im in out["pil"]]),
                          (out["np"][..., 0] * 255).round().astype(np.uint8))
