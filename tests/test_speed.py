"""GPU speed features on the CPU: attention backends reach every attention module and change nothing, the
xformers check says why it cannot run, compiled training equals eager, and ``fastdiff bench speed`` writes its
table. The xformers-versus-SDPA comparison itself needs CUDA (marked gpu)."""
import json

import pytest
import torch

import tiny_pipelines as tp
from conftest import tiny_unet
from fastdiff.models.attention import set_attention, xformers_status
from fastdiff.cli import main
from fastdiff.errors import FastdiffError


def test_sdpa_backend_reaches_every_attention_module_and_keeps_outputs(tmp_path):
    from diffusers.models.attention_processor import Attention

    from fastdiff.models.teacher import load_teacher

    for name, build in (("sd", tp.sd_pipeline), ("sd3", tp.sd3_pipeline), ("dit", tp.dit_pipeline)):
        t = load_teacher(str(build(tmp_path / name)))
        n_attn = sum(isinstance(m, Attention) for m in t.model.modules())
        x = torch.randn(2, *t.sample_shape)
        cond = ({"class_labels": torch.tensor([1, 2])} if t.num_classes else
                __import__("fastdiff.models.text", fromlist=["PromptEncoder"]).PromptEncoder(t.pipeline)(["a", "b"]))
        classic = _to_classic_processors(t.model)  # SD3's joint attention has no pre-SDPA processor: stays
        assert classic == (0 if name == "sd3" else n_attn), name
        with torch.no_grad():
            before = t.denoiser(x, torch.tensor(2.0), cond)
        backend, swapped, kept = set_attention(t.model, "auto")  # no CUDA here: auto means SDPA
        assert backend == "sdpa" and swapped == n_attn > 0 and kept == 0, name
        assert not any(type(m.processor).__name__ in ("AttnProcessor", "AttnAddedKVProcessor")
                       for m in t.model.modules() if isinstance(m, Attention)), name
        with torch.no_grad():
            after = t.denoiser(x, torch.tensor(2.0), cond)
        # Classic (explicit softmax) and SDPA attention differ by float32 rounding of a few hundred operations
        # per output: 1e-5 of the outputs' magnitude (measured: 4e-7 relative on SD, 2e-7 on DiT; SD3 has no
        # classic processor, so its swap is SDPA to SDPA and equal).
        scale = float(before.abs().max())
        torch.testing.assert_close(after, before, rtol=0, atol=1e-5 * scale)
    unet = tiny_unet()
    assert set_attention(unet, "sdpa")[1] == sum(isinstance(m, Attention) for m in unet.modules()) > 0


def _to_classic_processors(model) -> int:
    """Put every attention module whose processor has a pre-SDPA twin on it (diffusers' explicit-softmax
    AttnProcessor / AttnAddedKVProcessor); the number of modules changed."""
    from diffusers.models.attention_processor import (Attention, AttnAddedKVProcessor, AttnAddedKVProcessor2_0,
                                                      AttnProcessor, AttnProcessor2_0)

    classic = {AttnProcessor2_0: AttnProcessor, AttnAddedKVProcessor2_0: AttnAddedKVProcessor}
    changed = 0
    for m in model.modules():
        if isinstance(m, Attention) and type(m.processor) in classic:
            m.set_processor(classic[type(m.processor)]())
            changed += 1
    return changed


def test_sdpa_replaces_the_classic_attention_processors():
    """A model left on diffusers' pre-SDPA processor (AttnProcessor) moves to its SDPA twin, not to itself."""
    from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

    unet = tiny_unet()
    attention = [m for m in unet.modules() if isinstance(m, Attention)]
    for m in attention:
        m.set_processor(AttnProcessor())
    assert set_attention(unet, "sdpa")[1:] == (len(attention), 0)
    assert all(type(m.processor) is AttnProcessor2_0 for m in attention)


def test_xformers_asked_for_without_its_kernels_is_a_clear_error():
    usable, why = xformers_status()
    if usable:
        pytest.skip("xformers runs here")
    assert why
    with pytest.raises(FastdiffError, match="train.attention=xformers: .*use auto or sdpa"):
        set_attention(tiny_unet(), "xformers")


@pytest.mark.slow
def test_compiled_training_step_equals_eager(tiny_teacher, tmp_path, monkeypatch):
    """Compiled + channels-last training computes the eager, contiguous gradients.

    Compared: each optimizer's first gradient (the same weights and batch on both sides), not weights after
    Adam steps: Adam's first update is about lr x sign(gradient), so rounding flips the update of every
    near-zero gradient (measured: updates differ by 0.28 of their norm after two steps) and an lr-sized
    tolerance on the weights would pass any change smaller than the whole update."""
    from fastdiff.training import optim
    from fastdiff.config import load_config
    from fastdiff.training import Trainer

    first = {}
    real_step = optim.Optimizer.step

    def recording_step(self, accelerator, clip_value=None):
        if id(self) not in first:
            first[id(self)] = torch.cat([p.grad.detach().flatten().clone() for p in self.params if p.grad is not None])
        return real_step(self, accelerator, clip_value)

    monkeypatch.setattr(optim.Optimizer, "step", recording_step)

    def gradients(fast, out, seed=0):
        first.clear()
        flag = str(fast).lower()
        cfg = load_config(None, [f"teacher.path={tiny_teacher}", f"output_dir={out}", "train.batch_size=2",
                                 "objective.critic_updates=1", f"train.compile={flag}", f"train.channels_last={flag}",
                                 "train.max_steps=1", f"train.seed={seed}", "train.lr_critic=1e-2"])
        trainer = Trainer(cfg, progress=False)
        trainer.train_step()
        return first[id(trainer.opt_g)], first[id(trainer.opt_c)]

    eager = gradients(False, tmp_path / "eager")
    compiled = gradients(True, tmp_path / "compiled")
    other_seed = gradients(False, tmp_path / "seed1", seed=1)
    # Summation order differs (fused kernels, NHWC convolutions). The critic's gradient is a plain loss gradient:
    # float32 rounding over ~1e3-term sums, ~1e-6 relative (measured 8e-7; bound 1e-5). The generator's is DMD2's
    # difference of two networks' outputs that agree to ~1e-3 of their size after one critic update (lr 1e-2 so
    # the difference is not rounding alone), which scales rounding up ~1e3 times (measured 3.6e-4 compiled +
    # channels-last, 4.0e-4 channels-last alone; bound 3e-3). Another batch differs by ~1.
    for e, c, o, bound in zip(eager, compiled, other_seed, (3e-3, 1e-5)):
        diff, apart = float((c - e).norm() / e.norm()), float((o - e).norm() / e.norm())
        assert diff < bound and apart > 0.3, (diff, apart)


def test_bench_speed_writes_a_table_with_ratios(tiny_teacher, tmp_path, capsys):
    assert main(["bench", "speed", "--teacher", tiny_teacher, "--device", "cpu", "--batch-size", "2", "--steps", "1",
                 "--warmup", "0", "--sample-batch-sizes", "1,2", "--skip-compile", "--objectives", "dmd2",
                 "--set", "objective.critic_updates=1", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| dmd2 | 2 |" in out and "naive img/s" in out and "fp32 1024x1024 matmul, measured" in out
    (js,) = tmp_path.glob("speed-*.json")
    result = json.loads(js.read_text())
    row = result["training"][0]
    assert row["flops_per_step"] > 0 and row["speedup"] > 0
    # MFU is achieved FLOP/s over the best measured matmul FLOP/s: a fraction, never above 1 (a value above would
    # mean the peak was mis-measured or the FLOPs over-counted). Measured here: about 5e-3 (a tiny UNet at batch 2).
    mfus = [row["naive_mfu"], row["fast_mfu"], *(r["eager_mfu"] for r in result["sampling"])]
    assert all(0 < m <= 1 for m in mfus), mfus
    assert [r["batch_size"] for r in result["sampling"]] == [1, 2] and (tmp_path / js.name.replace(".json", ".md")).is_file()
    assert main(["bench", "speed", "--teacher", tiny_teacher, "--device", "cpu", "--batch-size", "0"]) == 2


@pytest.mark.gpu
def test_xformers_matches_sdpa_in_bf16_on_cuda(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    usable, why = xformers_status()
    if not usable:
        pytest.skip(why)
    from fastdiff.models.teacher import load_teacher

    for name, build in (("sd", tp.sd_pipeline), ("sd3", tp.sd3_pipeline)):
        t = load_teacher(str(build(tmp_path / name)), dtype=torch.bfloat16)
        t.model.to("cuda")
        x = torch.randn(4, *t.sample_shape, device="cuda")
        from fastdiff.models.text import PromptEncoder

        t.pipeline.to("cuda")
        cond = PromptEncoder(t.pipeline, device="cuda")(["a", "b", "c", "d"])
        set_attention(t.model, "sdpa")
        _to_classic_processors(t.model)  # start from the explicit-softmax processors where they exist (not SD3)
        with torch.no_grad():
            ref = t.denoiser(x, torch.tensor(2.0), cond)
        assert set_attention(t.model, "xformers")[0] == "xformers"
        assert all("XFormers" in type(m.processor).__name__ for m in t.model.modules() if hasattr(m, "processor"))
        torch.testing.assert_close(t.denoiser(x, torch.tensor(2.0), cond), ref, rtol=2e-2, atol=2e-2)
