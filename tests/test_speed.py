"""GPU speed features on the CPU: attention backends reach every attention module and change nothing, the
xformers check says why it cannot run, compiled training equals eager, and ``fastdiff bench speed`` writes its
table. The xformers-versus-SDPA comparison itself needs CUDA (marked gpu)."""
import json

import pytest
import torch

import tiny_pipelines as tp
from conftest import tiny_unet
from fastdiff.attention import set_attention, xformers_status
from fastdiff.cli import main
from fastdiff.errors import FastdiffError


def test_sdpa_backend_reaches_every_attention_module_and_keeps_outputs(tmp_path):
    from diffusers.models.attention_processor import Attention

    from fastdiff.teacher import load_teacher

    for name, build in (("sd", tp.sd_pipeline), ("sd3", tp.sd3_pipeline), ("dit", tp.dit_pipeline)):
        t = load_teacher(str(build(tmp_path / name)))
        n_attn = sum(isinstance(m, Attention) for m in t.model.modules())
        x = torch.randn(2, *t.sample_shape)
        cond = ({"class_labels": torch.tensor([1, 2])} if t.num_classes else
                __import__("fastdiff.text", fromlist=["PromptEncoder"]).PromptEncoder(t.pipeline)(["a", "b"]))
        before = t.denoiser(x, torch.tensor(2.0), cond)
        backend, swapped, kept = set_attention(t.model, "auto")  # no CUDA here: auto means SDPA
        assert backend == "sdpa" and swapped == n_attn > 0 and kept == 0, name
        torch.testing.assert_close(t.denoiser(x, torch.tensor(2.0), cond), before, rtol=1e-5, atol=1e-5)
    unet = tiny_unet()
    assert set_attention(unet, "sdpa")[1] == sum(isinstance(m, Attention) for m in unet.modules()) > 0


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
def test_compiled_training_step_equals_eager(tiny_teacher, tmp_path):
    from fastdiff.config import load_config
    from fastdiff.trainer import Trainer

    def run(compile_, out):
        cfg = load_config(None, [f"teacher.path={tiny_teacher}", f"output_dir={out}", "train.batch_size=2",
                                 "objective.critic_updates=1", f"train.compile={str(compile_).lower()}",
                                 "train.channels_last=true", "train.max_steps=2"])
        trainer = Trainer(cfg, progress=False)
        for _ in range(2):
            trainer.train_step()
        return [p.detach().clone() for p in trainer.generator.denoiser.model.parameters()]

    for a, b in zip(run(False, tmp_path / "eager"), run(True, tmp_path / "compiled")):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


def test_bench_speed_writes_a_table_with_ratios(tiny_teacher, tmp_path, capsys):
    assert main(["bench", "speed", "--teacher", tiny_teacher, "--device", "cpu", "--batch-size", "2", "--steps", "1",
                 "--warmup", "0", "--sample-batch-sizes", "1,2", "--skip-compile", "--objectives", "dmd2",
                 "--set", "objective.critic_updates=1", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| dmd2 | 2 |" in out and "naive img/s" in out and "fp32 1024x1024 matmul, measured" in out
    (js,) = tmp_path.glob("speed-*.json")
    result = json.loads(js.read_text())
    row = result["training"][0]
    assert row["flops_per_step"] > 0 and row["speedup"] > 0 and 0 < row["fast_mfu"] < 1.5
    assert [r["batch_size"] for r in result["sampling"]] == [1, 2] and (tmp_path / js.name.replace(".json", ".md")).is_file()
    assert main(["bench", "speed", "--teacher", tiny_teacher, "--device", "cpu", "--batch-size", "0"]) == 2


@pytest.mark.gpu
def test_xformers_matches_sdpa_in_bf16_on_cuda(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    usable, why = xformers_status()
    if not usable:
        pytest.skip(why)
    from fastdiff.teacher import load_teacher

    for name, build in (("sd", tp.sd_pipeline), ("sd3", tp.sd3_pipeline)):
        t = load_teacher(str(build(tmp_path / name)), dtype=torch.bfloat16)
        t.model.to("cuda")
        x = torch.randn(4, *t.sample_shape, device="cuda")
        from fastdiff.text import PromptEncoder

        t.pipeline.to("cuda")
        cond = PromptEncoder(t.pipeline, device="cuda")(["a", "b", "c", "d"])
        set_attention(t.model, "sdpa")
        ref = t.denoiser(x, torch.tensor(2.0), cond)
        assert set_attention(t.model, "xformers")[0] == "xformers"
        torch.testing.assert_close(t.denoiser(x, torch.tensor(2.0), cond), ref, rtol=2e-2, atol=2e-2)
