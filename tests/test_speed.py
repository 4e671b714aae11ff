"""GPU speed features on the CPU: compiled training equals eager, and ``fastdiff bench speed`` writes its table.
The attention backends are tested in test_attention.py."""
import json

import pytest
import torch

from fastdiff.cli import main


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


def test_bench_speed_ablation_rows_and_time_budget(tiny_teacher, tmp_path, capsys):
    """--ablate times fastdiff's step per attention backend that runs here (SDPA only on a CPU, eager only), as a
    ratio to the same naive step; --time-budget stops starting rows and lists the ones not run."""
    common = ["bench", "speed", "--teacher", tiny_teacher, "--device", "cpu", "--batch-size", "2", "--steps", "1",
              "--warmup", "0", "--sample-batch-sizes", "1", "--skip-compile", "--objectives", "dmd2",
              "--set", "objective.critic_updates=1"]
    assert main(common + ["--ablate", "--out", str(tmp_path)]) == 0
    (js,) = tmp_path.glob("speed-*.json")
    row = json.loads(js.read_text())["training"][0]
    assert [(a["attention"], a["compile"]) for a in row["ablation"]] == [("sdpa", False)]
    assert row["ablation"][0]["speedup"] > 0 and row["auto_check"] is None  # one backend: nothing to compare
    # fastdiff's own setting (here SDPA, eager) is the training row's timing again, not a second trainer
    assert (row["attention"], row["compile"]) == ("sdpa", False) and "same_as" in row["ablation"][0]
    assert row["ablation"][0]["seconds"] == row["fast_seconds"]
    from fastdiff.bench.speed import Budget, ablation_rows  # without a training row to reuse: a trainer of its own

    (built,) = ablation_rows(tiny_teacher, "dmd2", 2, 1, 0, torch.device("cpu"), ["objective.critic_updates=1"],
                             1.0, Budget(None), [], str(tmp_path / "ablation"))
    assert built["seconds"] > 0 and built["wall_seconds"] >= built["seconds"] and "same_as" not in built
    assert "| dmd2 | sdpa | eager | " in capsys.readouterr().out
    assert main(common + ["--time-budget", "1e-6"]) == 0
    out = capsys.readouterr().out
    assert "Not run (time budget of 0 s spent): dmd2, sampling batch 1" in out and "| dmd2 | 2 |" not in out


def test_auto_check_compares_autos_pick_with_the_fastest_backend_of_the_same_compile_setting():
    from fastdiff.bench.speed import auto_check

    rows = [{"attention": "sdpa", "compile": False, "seconds": 2.0}, {"attention": "xformers", "compile": False,
                                                                      "seconds": 1.0},
            {"attention": "sdpa", "compile": True, "seconds": 0.5}]
    assert auto_check("xformers", rows) == {"auto": "xformers", "fastest": "xformers", "compiled": False,
                                            "agrees": True}
    assert auto_check("sdpa", rows)["agrees"] is False
    assert auto_check("sdpa", rows, compiled=True) is None  # one compiled backend: nothing to compare
    rows.append({"attention": "xformers", "compile": True, "seconds": 0.6})
    assert auto_check("sdpa", rows, compiled=True) == {"auto": "sdpa", "fastest": "sdpa", "compiled": True,
                                                       "agrees": True}


def test_auto_attention_is_sdpa_for_compiled_networks():
    """Measured on the H200: compiled steps ran faster with SDPA than with xformers (eval/results/speed-nvidia-h200.md),
    so ``auto`` picks SDPA for a network that will be compiled, whatever xformers can do."""
    from fastdiff.models.attention import resolve_backend, xformers_status

    assert resolve_backend("auto", compiled=True) == "sdpa"
    assert resolve_backend("auto") == ("xformers" if xformers_status()[0] else "sdpa")
    assert resolve_backend("sdpa", compiled=False) == "sdpa"


def test_bench_speed_profile_and_batch_list(tiny_teacher, tmp_path, capsys):
    """--profile records where fastdiff's step goes (kinds' shares of the profiled self time, the top operators);
    --batch-size takes several batches, a row each, batches outermost."""
    assert main(["bench", "speed", "--teacher", tiny_teacher, "--device", "cpu", "--batch-size", "2,3", "--steps", "1",
                 "--warmup", "0", "--sample-batch-sizes", "1", "--skip-compile", "--objectives", "dmd2",
                 "--set", "objective.critic_updates=1", "--profile", "--out", str(tmp_path)]) == 0
    (js,) = tmp_path.glob("speed-*.json")
    rows = json.loads(js.read_text())["training"]
    assert [r["batch_size"] for r in rows] == [2, 3]
    prof = rows[0]["profile"]
    # shares are fractions of one sum: they add to 1 up to float64 rounding of a few dozen terms (1e-12 is ~1e4 eps)
    assert abs(sum(prof["shares"].values()) - 1) < 1e-12 and prof["milliseconds_per_step"] > 0
    assert "matmul / conv" in prof["shares"] and 0 < len(prof["top"]) <= 10  # a UNet step convolves
    tops = [t["milliseconds_per_step"] for t in prof["top"]]
    assert tops == sorted(tops, reverse=True)
    assert "Where fastdiff's step goes, batch 2:" in capsys.readouterr().out
    assert main(["bench", "speed", "--teacher", tiny_teacher, "--device", "cpu", "--batch-size", "2,x"]) == 2


def test_profile_kinds_classify_kernel_names():
    from fastdiff.bench.profile import kind_of

    assert kind_of("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64") == "matmul / conv"
    assert kind_of("pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits>") == "attention"
    assert kind_of("triton_poi_fused__to_copy_add_mul_silu_0") == "elementwise"
    assert kind_of("triton_red_fused_native_group_norm_1") == "reduction / norm"
    assert kind_of("void at::native::(anonymous namespace)::normal_kernel") == "random"
    assert kind_of("void at::native::elementwise_kernel<128, 2, copy_kernel>") == "copy / layout"  # a dtype cast
    assert kind_of("void at::native::vectorized_elementwise_kernel<4, silu_kernel>") == "elementwise"
    assert kind_of("Memcpy HtoD (Pageable -> Device)") == "copy / layout"
    assert kind_of("aten::convolution_backward") == "matmul / conv"
    assert kind_of("something_new") == "other"


def test_cudnn_benchmark_on_for_the_config_that_asks_off_for_naive_steps(tiny_teacher, tmp_path):
    """train.cudnn_benchmark switches cuDNN's per-shape algorithm search on (a global flag); the bench turns it off
    before every trainer, so a fast row before a naive one cannot speed the naive one up."""
    from fastdiff.bench.speed import make_trainer

    saved = torch.backends.cudnn.benchmark
    try:
        torch.backends.cudnn.benchmark = True
        make_trainer(tiny_teacher, "sid", 2, False, torch.device("cpu"), [], str(tmp_path / "naive"))
        assert torch.backends.cudnn.benchmark is False
        make_trainer(tiny_teacher, "sid", 2, False, torch.device("cpu"), ["train.cudnn_benchmark=true"],
                     str(tmp_path / "asked"))
        assert torch.backends.cudnn.benchmark is True
    finally:
        torch.backends.cudnn.benchmark = saved


def test_synthetic_cifar_teacher_has_google_ddpm_cifar10_shape(tmp_path):
    """The speed table's teacher is google/ddpm-cifar10-32's network: its config's values, transcribed here (the hub's
    unet/config.json), reach the saved UNet, above all one attention head over the 256 channels, not 32 x 8."""
    from diffusers import UNet2DModel
    from fastdiff.bench.speed import synthetic_teacher

    google = {"block_out_channels": [128, 256, 256, 256], "layers_per_block": 2, "attention_head_dim": None,
              "norm_eps": 1e-06, "norm_num_groups": 32, "downsample_padding": 0, "flip_sin_to_cos": False,
              "freq_shift": 1, "act_fn": "silu", "time_embedding_type": "positional", "mid_block_scale_factor": 1,
              "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
              "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"], "sample_size": 32}
    unet = UNet2DModel.from_pretrained(synthetic_teacher("ddpm-cifar", tmp_path / "t"), subfolder="unet")
    assert {k: unet.config[k] if not isinstance(unet.config[k], tuple) else list(unet.config[k]) for k in google} == google
    assert sum(p.numel() for p in unet.parameters()) == 35_746_307  # this shape's count (google's model: 35.7M)
    heads = {(m.heads, m.inner_dim // m.heads) for m in unet.modules() if type(m).__name__ == "Attention"}
    assert heads == {(1, 256)}
