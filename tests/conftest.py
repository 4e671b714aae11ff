"""Shared fixtures: tiny diffusers teachers built in code (never from the hub) and the reference teachers."""
import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:  # README's `-n 2`: split the cores between the workers, or the
    # workers' OpenMP threads (torch's default: one per core each) fight over them; 2 cores with 2 workers of 2
    # threads each ran the suite in 864 s against 155 s with 1 thread each and 250 s in one process
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, _cores // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))
    # diffusers copies a custom pipeline's file into HF_MODULES_CACHE (truncate, write) and imports it from there:
    # one folder per worker, or a worker may import the file while the other rewrites it (subprocesses inherit it)
    import tempfile
    os.environ["HF_MODULES_CACHE"] = tempfile.mkdtemp(prefix=f"hf-modules-{os.environ['PYTEST_XDIST_WORKER']}-")

import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
TEACHERS = SHARED / "teachers"


def eval_script(name: str):
    """``eval/NAME.py`` loaded as a fresh module (the eval scripts are files to run, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"eval_{name}", Path(__file__).resolve().parents[1] / "eval" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def by_default(cases, ids, keep):
    """Parametrize values for a family check: the cases whose id is in ``keep`` run in the default suite, the rest
    (the same check on more families, objectives or settings) behind the slow marker (``pytest -m slow``), so the
    default suite stays within its 5 minutes on 2 cores while every case still runs somewhere."""
    unknown = set(keep) - set(ids)
    assert not unknown, f"kept ids that are no case: {sorted(unknown)}"
    return [pytest.param(*(case if isinstance(case, tuple) else (case,)), id=i,
                         marks=() if i in keep else pytest.mark.slow) for case, i in zip(cases, ids)]


def accelerate_launch(*argv, processes: int = 2):
    """``fastdiff ARGV`` under ``accelerate launch`` on ``processes`` CPU processes (gloo), one thread each: the real
    launcher, each process a fresh interpreter (~10 s of imports each on 2 cores; test_sharding.cli_on_processes forks
    them instead). Asserts it exited 0; the CompletedProcess."""
    import subprocess
    import sys

    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
              "--main_process_port", "0",  # 0: a free port (test workers run side by side)
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "fastdiff"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(launch + list(map(str, argv)), env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def tiny_unet(num_class_embeds=None, sample_size=8, seed=0) -> UNet2DModel:
    torch.manual_seed(seed)
    return UNet2DModel(sample_size=sample_size, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                       layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4, attention_head_dim=4,
                       num_class_embeds=num_class_embeds)


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory) -> str:
    """Unconditional eps-prediction DDPM pipeline folder (linear betas, clip_sample as the reference)."""
    path = tmp_path_factory.mktemp("tiny-ddpm")
    DDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler(clip_sample=True)).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_cond_teacher(tmp_path_factory) -> str:
    """Class-conditional v-prediction teacher, unet/ + scheduler/ only (3 classes + the null class)."""
    path = tmp_path_factory.mktemp("tiny-cond")
    tiny_unet(num_class_embeds=4, seed=1).save_pretrained(path / "unet")
    DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction", clip_sample=False
                  ).save_pretrained(path / "scheduler")
    return str(path)


TINY_CLIP_NAME = "fastdiff-tiny-clip"
TINY_CLIP = {"embed_dim": 32,
             "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    """(config file, safetensors weights) of a random tiny open_clip model."""
    import json

    import open_clip
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("clip")
    config = root / f"{TINY_CLIP_NAME}.json"
    config.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(str(config))
    torch.manual_seed(0)
    model = open_clip.create_model(TINY_CLIP_NAME)
    weights = root / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    return str(config), str(weights)


@pytest.fixture
def shared_teacher():
    def get(name):
        path = TEACHERS / name
        if not (path / "unet" / "config.json").is_file():
            pytest.skip(f"reference teacher {path} not present")
        return str(path)

    return get


def small_trainer(teacher, out, *sets: str, resume=None):
    """A Trainer on ``teacher`` writing to ``out``: batch 2, 2 updates, one critic update each, no checkpoint, grid or
    log on the way (``sets`` override any of it; ``resume``: continue ``out``'s run, else it is overwritten)."""
    from fastdiff.config import load_config
    from fastdiff.training import Trainer

    cfg = load_config(None, [f"teacher.path={teacher}", f"output_dir={out}", "train.batch_size=2", "train.max_steps=2",
                             "objective.critic_updates=1", "train.checkpoint_every=100", "train.sample_every=100",
                             "train.log_every=100", *sets])
    return Trainer(cfg, resume=resume, overwrite=resume is None, progress=False)


def bench_gmm_rows(tmp_path, *args: str) -> dict:
    """``fastdiff bench gmm ARGS`` with its JSON under tmp_path: the rows by name (the slow bench tests' first step)."""
    import json

    from fastdiff.cli import main

    out = tmp_path / "bench-gmm.json"
    assert main(["bench", "gmm", *args, "--json", str(out)]) == 0
    return {r["objective"]: r for r in json.loads(out.read_text())["rows"]}


def assert_same_uint8(a, b, bound: float) -> None:
    """Two images in [0, 1] that should agree to ``bound`` give the same uint8 images, except where a value lies
    within ``bound`` of a rounding boundary (255 x ~ n + 1/2): there either rounding is right, and which one a CPU's
    kernels land on is not the code's property, so those values may differ by one level. It checks the uint8 images
    only (one side may be uint8 / 255 already); a caller with two float images asserts max |a - b| <= bound itself."""
    import numpy as np

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    ua, ub = (a * 255).round(), (b * 255).round()
    tie = np.abs((a * 255) % 1 - 0.5) <= 255 * bound
    assert np.abs(ua - ub).max() <= 1 and np.array_equal(ua[~tie], ub[~tie]), \
        f"{int((ua != ub).sum())} values differ, {int((ua[~tie] != ub[~tie]).sum())} of them away from a tie"
