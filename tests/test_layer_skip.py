"""Layer distillation (Presto-L, models/layer_skip.py): a student without some of its teacher's transformer blocks.

- the student with blocks removed computes what the full transformer computes with those blocks replaced by the
  identity (Presto's skip), also after save_pretrained / from_pretrained of the smaller transformer, per family;
  SD3's reference is diffusers' own ``skip_layers`` forward argument;
- a tiny SD3 pipeline distilled with dmd2 into a 2-step student that skips a block exports a transformer with
  ``num_layers`` reduced, which StableDiffusion3Pipeline loads and samples to fastdiff's uint8 images;
- the student's per-step FLOPs against the full student's (torch's flop counter, same inputs);
- budget-conditioned students (``student.layer_budget``): at each budget the student equals the full transformer
  with that budget's blocks as identities and its embedding row in the token layer's bias (budget 0 starts as the
  teacher), training draws every budget, and the export at the export budget is bit for bit the student there;
- bad input: indices out of range, the final block, DiT's block 0, a UNet teacher, LoRA weights export, budgets.
"""
import copy
import json

import pytest
import torch
from torch import nn

import tiny_pipelines as tp
from conftest import tiny_unet
from fastdiff.errors import FastdiffError
from fastdiff.models.layer_skip import (budget_blocks, drop_blocks, exportable, forward_flops, num_blocks,
                                       with_layer_budget)


def _t(*values):
    return torch.tensor(values, dtype=torch.float64)


def build(family: str):
    """A tiny float64 transformer of ``family`` with 3-4 blocks (seeded), the blocks to skip, and forward inputs."""
    import diffusers as d

    torch.manual_seed(0)
    x, t, text = torch.randn(2, 4, 8, 8), _t(10, 500), torch.randn(2, 7, 32)
    if family == "sd3":  # SD3.5's dual-attention blocks: their indices must follow the kept blocks
        model = d.SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, num_layers=4, attention_head_dim=8,
                                        num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32,
                                        pooled_projection_dim=16, out_channels=4, qk_norm="rms_norm",
                                        dual_attention_layers=(0, 2))
        inputs, skip = dict(hidden_states=x, encoder_hidden_states=text, pooled_projections=torch.randn(2, 16),
                            timestep=t), [1, 2]
    elif family == "pixart":
        model = d.PixArtTransformer2DModel(sample_size=8, num_layers=3, patch_size=2, attention_head_dim=8,
                                           num_attention_heads=2, caption_channels=32, in_channels=4,
                                           cross_attention_dim=16, out_channels=8, attention_bias=True,
                                           num_embeds_ada_norm=1000, norm_type="ada_norm_single",
                                           norm_elementwise_affine=False, norm_eps=1e-6)
        inputs, skip = dict(hidden_states=x, encoder_hidden_states=text, timestep=t,
                            added_cond_kwargs={"resolution": None, "aspect_ratio": None}), [0, 1]
    elif family == "dit":
        model = d.DiTTransformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=8, num_layers=3,
                                        attention_head_dim=8, num_attention_heads=2, num_embeds_ada_norm=10,
                                        norm_num_groups=8)
        inputs, skip = dict(hidden_states=x, timestep=t, class_labels=torch.tensor([1, 2])), [1]
    elif family == "flux":  # two double-stream then two single-stream blocks: one of each skipped
        model = d.FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=2, num_single_layers=2,
                                         attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(2, 2, 4))
        inputs, skip = dict(hidden_states=torch.randn(2, 16, 4), encoder_hidden_states=text,
                            pooled_projections=torch.randn(2, 16), timestep=_t(0.1, 0.7), img_ids=torch.randn(16, 3),
                            txt_ids=torch.zeros(7, 3), guidance=_t(3.5, 3.5)), [1, 2]
    elif family == "sana":
        model = d.SanaTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=4,
                                         num_layers=3, num_cross_attention_heads=2, cross_attention_head_dim=4,
                                         cross_attention_dim=8, caption_channels=32, sample_size=8, patch_size=1)
        inputs, skip = dict(hidden_states=x, encoder_hidden_states=text, timestep=t), [1]
    else:
        raise ValueError(family)
    inputs = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs.items()}
    return model.double().eval(), skip, inputs


class Identity(nn.Module):
    """A skipped block: the hidden state (and a joint block's text stream) passes unchanged, as in Presto."""

    def __init__(self, joint: bool):
        super().__init__()
        self.joint = joint

    def forward(self, hidden_states, *args, **kwargs):
        return (kwargs["encoder_hidden_states"], hidden_states) if self.joint else hidden_states


def with_identities(model: nn.Module, skip: list[int]) -> nn.Module:
    """The full network with the skipped blocks replaced by the identity (execution order over the block lists)."""
    net, start = copy.deepcopy(model), 0
    for attr in ("transformer_blocks", "single_transformer_blocks"):
        blocks = getattr(net, attr, None)
        if blocks is None:
            continue
        joint = type(net).__name__ in ("SD3Transformer2DModel", "FluxTransformer2DModel")
        for i in range(len(blocks)):
            if start + i in skip:
                blocks[i] = Identity(joint)
        start += len(blocks)
    return net


@pytest.mark.parametrize("family", ["sd3", "pixart", "dit", "flux", "sana"])
def test_dropped_blocks_equal_identity_skip_and_reload(family, tmp_path):
    model, skip, inputs = build(family)
    student = drop_blocks(copy.deepcopy(model), skip)
    assert num_blocks(student) == num_blocks(model) - len(skip)
    student.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path).double().eval()
    assert num_blocks(reloaded) == num_blocks(student)
    with torch.no_grad():
        reference = with_identities(model, skip)(**inputs).sample
        if family == "sd3":  # diffusers' own block skipping (skip-layer guidance) is the same function
            assert torch.equal(reference, model(**inputs, skip_layers=skip).sample)
        ours, loaded = student(**inputs).sample, reloaded(**inputs).sample
        full = model(**inputs).sample
    # The same float64 operations in the same order on the same tensors: equal to the last bit.
    assert torch.equal(ours, reference) and torch.equal(loaded, reference)
    assert not torch.equal(full, reference)  # the skipped blocks did change the output: the test can fail
    if family == "sd3":  # kept blocks 0 and 3 of 0..3; block 0 had dual attention, block 2 (dropped) too
        assert tuple(reloaded.config.dual_attention_layers) == (0,) and reloaded.config.num_layers == 2
    if family == "flux":
        assert (reloaded.config.num_layers, reloaded.config.num_single_layers) == (1, 1)


def token_layer(model: nn.Module) -> nn.Module:
    for path in ("pos_embed.proj", "patch_embed.proj", "x_embedder"):
        try:
            return model.get_submodule(path)
        except AttributeError:
            pass
    raise ValueError(type(model).__name__)


@pytest.mark.parametrize("family", ["sd3", "pixart", "dit", "flux", "sana"])
def test_budget_student_is_the_skipped_transformer_with_its_budget_bias(family, tmp_path):
    model, _, inputs = build(family)
    total = num_blocks(model)
    budgets = total - 2  # DiT keeps block 0 as well as the final block
    student = with_layer_budget(copy.deepcopy(model), budgets, export_budget=1)
    with torch.no_grad():
        student.fastdiff_budget = 0  # zero-initialised embedding: bias + 0 is the bias, so exactly the teacher
        assert torch.equal(student(**inputs).sample, model(**inputs).sample)
        token_layer(student).embedding.normal_()
        for budget in range(budgets + 1):
            student.fastdiff_budget = budget
            reference = with_identities(model, budget_blocks(total, budget))
            layer = token_layer(reference)
            layer.bias.copy_(layer.bias + token_layer(student).embedding[budget])  # the forward's own addition
            assert torch.equal(student(**inputs).sample, reference(**inputs).sample), budget
            assert num_blocks(student) == total  # the dropped blocks are back after the call
        student.fastdiff_budget = None
        plain = exportable(student.eval())  # eval mode: the export budget (1)
        assert num_blocks(plain) == total - 1 and type(plain) is type(model)
        plain.save_pretrained(tmp_path)
        assert torch.equal(plain(**inputs).sample, student(**inputs).sample)
        # The reload holds the same tensors (float64 files) in the smaller architecture. (Its forward is not compared:
        # from_pretrained in float64 rebuilds SD3's sin-cos position buffer in float64, .double() casts float32's.)
        reloaded = type(model).from_pretrained(tmp_path, torch_dtype=torch.float64)
        assert num_blocks(reloaded) == total - 1
        theirs, ours = reloaded.state_dict(), plain.state_dict()
        assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in ours)
    assert student.fastdiff_last_budget == 1


def test_budget_training_draws_every_budget_and_trains_its_row():
    model, _, inputs = build("sd3")
    student = with_layer_budget(model, 2).train()
    torch.manual_seed(0)
    seen = set()
    for _ in range(12):  # P(a budget of 3 never drawn in 12) < 3 (2/3)^12 = 0.8%; seeded, so fixed here
        with torch.no_grad():
            student(**inputs)
        seen.add(student.fastdiff_last_budget)
    assert seen == {0, 1, 2}
    student(**inputs).sample.square().mean().backward()
    grad = token_layer(student).embedding.grad
    drawn = student.fastdiff_last_budget
    assert grad[drawn].abs().sum() > 0 and all(grad[b].abs().sum() == 0 for b in range(3) if b != drawn)
    with torch.no_grad():
        student.eval()(**inputs)
    assert student.fastdiff_last_budget == 2  # eval mode: the export budget, by default the largest


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_per_step_flops_lose_exactly_the_skipped_blocks(family):
    """Per-step cost: the student's forward counts the full forward's FLOPs less those its skipped blocks counted
    in it (torch's flop counter per module, integers): the blocks are not run, and nothing else changes."""
    from torch.utils.flop_counter import FlopCounterMode

    model, skip, inputs = build(family)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(**inputs)
    per_module = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    names = [f"{attr}.{i}" for attr in ("transformer_blocks", "single_transformer_blocks")
             for i in range(len(getattr(model, attr, ())))]
    skipped = sum(per_module[f"{type(model).__name__}.{names[i]}"] for i in skip)
    full = counter.get_total_flops()
    student = forward_flops(drop_blocks(copy.deepcopy(model), skip), **inputs)
    assert student == full - skipped and 0 < skipped < full
    print(f"{family}: {len(skip)} of {len(names)} blocks skipped: {student / full:.3f} of the full FLOPs per step")


@pytest.mark.parametrize("family,skip,fragment", [
    ("sd3", [4], "out of range: SD3Transformer2DModel has blocks 0..3"),
    ("sd3", [-1], "out of range"),
    ("sd3", [3], "the final block (3) is kept"),
    ("flux", [3], "the final block (3) is kept"),
    ("dit", [0], "block 0 cannot be skipped"),
])
def test_bad_skip_indices(family, skip, fragment):
    model, _, _ = build(family)
    with pytest.raises(FastdiffError, match=None) as err:
        drop_blocks(model, skip)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_unet_teacher_is_refused():
    with pytest.raises(FastdiffError) as err:
        drop_blocks(tiny_unet(), [0])
    assert "needs a transformer teacher" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(FastdiffError, match="needs a transformer teacher"):
        with_layer_budget(tiny_unet(), 1)


@pytest.mark.parametrize("family,budgets,export,fragment", [
    ("sd3", 4, None, "has 4 blocks, so 1..3"),
    ("sd3", 2, 3, "student.export_budget must be in 0..2"),
    ("dit", 2, None, "block 0 cannot be skipped"),
])
def test_bad_budgets(family, budgets, export, fragment):
    model, _, _ = build(family)
    with pytest.raises(FastdiffError) as err:
        with_layer_budget(model, budgets, export)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_distill_bad_input_is_one_line(tmp_path, capsys, tiny_teacher):
    from fastdiff.cli import main

    cases = [([f"teacher.path={tiny_teacher}", "student.skip_layers=[0]"], "needs a transformer teacher"),
             ([f"teacher.path={tiny_teacher}", "student.skip_layers=[0]", "student.lora_rank=2"],
              "set student.lora_export=fused"),
             ([f"teacher.path={tiny_teacher}", "student.layer_budget=1"], "needs a transformer teacher"),
             ([f"teacher.path={tiny_teacher}", "student.layer_budget=1", "student.skip_layers=[0]"],
              "cannot be combined with student.skip_layers"),
             ([f"teacher.path={tiny_teacher}", "student.export_budget=1"], "needs student.layer_budget")]
    for i, (sets, fragment) in enumerate(cases):
        args = ["distill", "--set", f"output_dir={tmp_path / str(i)}", "--set", "train.max_steps=1"]
        for s in sets:
            args += ["--set", s]
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert fragment in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / str(i)).exists()  # refused before anything is written


@pytest.mark.slow  # 13 s each on a shared core; the default suite keeps the per-family save / reload equality above
@pytest.mark.parametrize("layers", ["student.skip_layers=[0]", "student.layer_budget=1"])
def test_layer_and_step_distilled_sd3_student_exports_a_smaller_transformer(tmp_path, layers):
    """dmd2 with a 2-step student (backward simulation) that skips block 0 of the tiny SD3 teacher's 2 (fixed, or
    budget-conditioned over budgets 0 and 1 and exported at 1): the export's transformer has one block,
    StableDiffusion3Pipeline loads it and its images equal fastdiff's sampler's (uint8)."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    from test_text_to_image import PROMPTS, assert_same, distill, ours, theirs

    teacher = tp.sd3_pipeline(tmp_path / "sd3")
    student = distill(str(teacher), tmp_path / "run", "objective.name=dmd2", "objective.critic_updates=1",
                      f"data.prompts={tp.prompts_file(tmp_path / 'prompts.txt')}", "student.num_steps=2", layers,
                      "train.lr_generator=1e-3")
    config = json.loads((student / "transformer" / "config.json").read_text())
    assert config["num_layers"] == 1
    full = SD3Transformer2DModel.from_pretrained(teacher / "transformer")
    small = SD3Transformer2DModel.from_pretrained(student / "transformer")
    # The student's one block is the teacher's block 1 (the final one, text-stream free), trained for 2 updates.
    assert small.transformer_blocks[0].context_pre_only and full.transformer_blocks[1].context_pre_only
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in full.parameters())
    pipe = StableDiffusion3Pipeline.from_pretrained(student, text_encoder_3=None, tokenizer_3=None)
    # SD3's pipeline gives scheduler.step no generator: its re-noising draws from torch's global RNG, put where
    # fastdiff's seeded generator is after the initial noise (as tests/test_flux.py does for FluxPipeline).
    rng = torch.Generator().manual_seed(5)
    torch.randn((len(PROMPTS), 4, tp.LATENT, tp.LATENT), generator=rng)
    torch.set_rng_state(rng.get_state())
    assert_same(ours(student, 2), theirs(pipe, 2, seed=5))
