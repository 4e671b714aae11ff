"""Attention backends through diffusers' own API, per model family (tiny configs built in code): which diffusers call
set them, how many attention modules each backend reached, that none is reported on a backend it does not run,
and that the outputs are those of diffusers' default processors. SDPA runs here; the xformers routing is checked
with the kernel check stubbed (no CUDA), and the xformers outputs where CUDA and xformers run (marked gpu)."""
import warnings

import pytest
import torch

from conftest import tiny_unet
from fastdiff.errors import FastdiffError
from fastdiff.models import attention as A


def _t(*values):
    return torch.tensor(values)


def build(family: str):
    """A tiny model of ``family`` (seeded) and the keyword inputs of one forward."""
    import diffusers as d

    torch.manual_seed(0)
    x, t, text = torch.randn(2, 4, 8, 8), _t(10, 500), torch.randn(2, 7, 32)
    unet = dict(block_out_channels=(16, 32), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), norm_num_groups=8,
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
    if family == "unet2d":
        return tiny_unet(), dict(sample=torch.randn(2, 1, 8, 8), timestep=t)
    if family == "sd":
        return (d.UNet2DConditionModel(cross_attention_dim=32, attention_head_dim=4, **unet),
                dict(sample=x, timestep=t, encoder_hidden_states=text))
    if family == "sdxl":
        return (d.UNet2DConditionModel(attention_head_dim=(2, 4), use_linear_projection=True, cross_attention_dim=32,
                                       addition_embed_type="text_time", addition_time_embed_dim=8,
                                       projection_class_embeddings_input_dim=6 * 8 + 32, **unet),
                dict(sample=x, timestep=t, encoder_hidden_states=text,
                     added_cond_kwargs={"text_embeds": torch.randn(2, 32), "time_ids": torch.randn(2, 6)}))
    if family == "sd3":  # SD3.5's q/k RMS norms and one dual-attention block
        return (d.SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8,
                                        num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32,
                                        pooled_projection_dim=16, out_channels=4, qk_norm="rms_norm",
                                        dual_attention_layers=(0,)),
                dict(hidden_states=x, encoder_hidden_states=text, pooled_projections=torch.randn(2, 16), timestep=t))
    if family == "pixart":
        return (d.PixArtTransformer2DModel(sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8,
                                           num_attention_heads=2, caption_channels=32, in_channels=4,
                                           cross_attention_dim=16, out_channels=8, attention_bias=True,
                                           num_embeds_ada_norm=1000, norm_type="ada_norm_single",
                                           norm_elementwise_affine=False, norm_eps=1e-6),
                dict(hidden_states=x, encoder_hidden_states=text, timestep=t,
                     added_cond_kwargs={"resolution": None, "aspect_ratio": None}))
    if family == "flux":
        return (d.FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                         attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(2, 2, 4)),
                dict(hidden_states=torch.randn(2, 16, 4), encoder_hidden_states=text,
                     pooled_projections=torch.randn(2, 16), timestep=_t(0.1, 0.7), img_ids=torch.randn(16, 3),
                     txt_ids=torch.zeros(7, 3), guidance=_t(3.5, 3.5)))
    if family == "sana":
        return (d.SanaTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=4,
                                         num_layers=2, num_cross_attention_heads=2, cross_attention_head_dim=4,
                                         cross_attention_dim=8, caption_channels=32, sample_size=8, patch_size=1),
                dict(hidden_states=x, encoder_hidden_states=text, timestep=t))
    if family == "dit":
        return (d.DiTTransformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=8, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=2, num_embeds_ada_norm=10,
                                        norm_num_groups=8),
                dict(hidden_states=x, timestep=t, class_labels=_t(1, 2)))
    raise ValueError(family)


# family -> (attention modules, the diffusers call for SDPA, for xformers, modules without a twin).
# Sana's linear self-attention and its own cross-attention processor have no xformers twin in diffusers 0.42
# (its enable_xformers would turn linear attention into softmax attention): they stay, reported as such.
FAMILIES = {
    "unet2d": (4, "Attention.set_processor", "enable_xformers_memory_efficient_attention", 0),
    "sd": (8, "set_attn_processor", "enable_xformers_memory_efficient_attention", 0),
    "sdxl": (8, "set_attn_processor", "enable_xformers_memory_efficient_attention", 0),
    "sd3": (3, "set_attn_processor", "enable_xformers_memory_efficient_attention", 0),
    "pixart": (4, "set_attn_processor", "enable_xformers_memory_efficient_attention", 0),
    "flux": (2, "set_attention_backend", "set_attention_backend", 0),
    "sana": (4, None, None, 4),
    "dit": (2, "Attention.set_processor", "enable_xformers_memory_efficient_attention", 0),
}


def forward(model, inputs):
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


def to_other_processors(model) -> int:
    """Move every module fastdiff sets off its default: classic ones to diffusers' explicit-softmax processors
    (AttnProcessor / AttnAddedKVProcessor; SD3's joint attention has none), dispatcher ones to the dispatcher's
    math-only SDPA backend. The number of modules moved."""
    from diffusers.models.attention_dispatch import AttentionBackendName
    from diffusers.models.attention_processor import (AttnAddedKVProcessor, AttnAddedKVProcessor2_0, AttnProcessor,
                                                      AttnProcessor2_0)

    classic = {AttnProcessor2_0: AttnProcessor, AttnAddedKVProcessor2_0: AttnAddedKVProcessor}
    moved = 0
    for _, m in A.attention_modules(model):
        if A.uses_dispatcher(m):
            m.processor._attention_backend = AttentionBackendName._NATIVE_MATH
            moved += 1
        elif type(m.processor) in classic:
            m.set_processor(classic[type(m.processor)]())
            moved += 1
    return moved


@pytest.mark.parametrize("family", list(FAMILIES))
def test_sdpa_through_diffusers_api_per_family(family):
    modules, via, _, untouched = FAMILIES[family]
    model, inputs = build(family)
    model.eval()
    assert len(A.attention_modules(model)) == modules
    default = forward(model, inputs)
    moved = to_other_processors(model)
    other = forward(model, inputs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        setting = A.set_attention(model, "auto")  # no CUDA here: auto means SDPA
    assert setting == (modules - untouched, 0, untouched, (via,) if via else ()), setting
    assert setting.backend == ("sdpa" if untouched < modules else "none")
    assert bool(untouched) == any("on their own processors" in str(w.message) for w in caught)
    assert [A.running_backend(m) for _, m in A.attention_modules(model)].count("sdpa") == modules - untouched
    # Back on diffusers' default processors (the same classes and kernels as built): the same outputs, bit for bit.
    assert torch.equal(forward(model, inputs), default), family
    # The explicit-softmax / math-only processors differ from SDPA by float32 rounding of the attention sums
    # (a few hundred operations per output): within 1e-5 of the outputs' magnitude (measured up to 7.7e-7).
    scale = float(default.abs().max())
    torch.testing.assert_close(other, default, rtol=0, atol=1e-5 * scale)
    assert moved == (0 if family in ("sd3", "sana") else modules)  # SD3's joint attention has only an SDPA processor


@pytest.fixture
def xformers_stubbed(monkeypatch):
    """xformers "usable" without CUDA, to check the routing: diffusers' own xformers switch is recorded and
    performed with fastdiff's twin table (it probes a CUDA kernel, so it cannot run here); diffusers' dispatcher
    is told it has xformers so ``set_attention_backend("xformers")`` runs for real."""
    from diffusers.models import attention_dispatch
    from diffusers.models.modeling_utils import ModelMixin

    monkeypatch.setattr(A, "xformers_status", lambda: (True, "stubbed"))
    calls = []

    def enable_xformers(model, attention_op=None):
        calls.append(type(model).__name__)
        for _, m in A.attention_modules(model):
            m.set_processor(A.classic_targets(m)[1]())

    monkeypatch.setattr(ModelMixin, "enable_xformers_memory_efficient_attention", enable_xformers)

    def dispatcher(has: bool):
        monkeypatch.setattr(A, "dispatcher_has_xformers", lambda: has)
        monkeypatch.setattr(attention_dispatch, "_CAN_USE_XFORMERS_ATTN", has)

    return calls, dispatcher


@pytest.mark.parametrize("family", list(FAMILIES))
def test_xformers_routing_per_family(family, xformers_stubbed):
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    calls, dispatcher = xformers_stubbed
    dispatcher(True)
    modules, _, via, untouched = FAMILIES[family]
    model, _ = build(family)
    active = _AttentionBackendRegistry._active_backend
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        setting = A.set_attention(model, "xformers")
    assert setting == (0, modules - untouched, untouched, (via,) if via else ()), setting
    assert setting.backend == ("xformers" if untouched < modules else "none")
    assert calls == ([type(model).__name__] if via == "enable_xformers_memory_efficient_attention" else [])
    assert _AttentionBackendRegistry._active_backend == active  # the process-wide default is left as it was
    assert [A.running_backend(m) for _, m in A.attention_modules(model)].count("xformers") == modules - untouched


def test_dispatcher_models_without_dispatcher_xformers_stay_on_sdpa_and_say_so(xformers_stubbed):
    """xformers usable for classic processors but not imported by diffusers' dispatcher: Flux's modules go to the
    native backend and are reported as SDPA, never as xformers."""
    _, dispatcher = xformers_stubbed
    dispatcher(False)
    model, _ = build("flux")
    with pytest.warns(UserWarning, match=r"FluxTransformer2DModel: sdpa \(asked for xformers\)"):
        setting = A.set_attention(model, "auto")
    assert setting == (2, 0, 0, ("set_attention_backend",)) and setting.backend == "sdpa"
    assert A.describe([setting]) == "sdpa"


def test_module_with_qk_norm_has_no_xformers_twin(xformers_stubbed):
    """The plain xformers processor applies no q/k norm: such a module goes to SDPA, the others to xformers, and the
    mix is set module by module (not through diffusers' model-wide switch, which would drop the norms)."""
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0, XFormersAttnProcessor

    calls, _ = xformers_stubbed
    model = torch.nn.ModuleDict({"plain": Attention(16, heads=2, dim_head=8),
                                 "normed": Attention(16, heads=2, dim_head=8, qk_norm="rms_norm")})
    assert A.classic_targets(model["normed"]) == (AttnProcessor2_0, None)
    with pytest.warns(UserWarning, match=r"xformers\+sdpa \(1 xformers, 1 sdpa\) \(asked for xformers\)"):
        setting = A.set_attention(model, "xformers")
    assert setting == (1, 1, 0, ("Attention.set_processor",)) and calls == []
    assert type(model["plain"].processor) is XFormersAttnProcessor
    assert type(model["normed"].processor) is AttnProcessor2_0


def test_describe_names_what_runs():
    S = A.AttentionSetting
    assert A.describe([S(4, 0, 0, ()), S(2, 0, 0, ())]) == "sdpa"
    assert A.describe([S(0, 8, 0, ()), S(0, 0, 4, ())]) == "xformers, 4 modules on their own processors"
    assert A.describe([S(0, 0, 4, ())]) == "none, 4 modules on their own processors"
    assert A.describe([S(0, 0, 0, ())]) == "none"  # no attention at all (an MLP denoiser)


def test_xformers_asked_for_without_its_kernels_is_a_clear_error():
    usable, why = A.xformers_status()
    if usable:
        pytest.skip("xformers runs here")
    assert why
    with pytest.raises(FastdiffError, match="train.attention=xformers: .*use auto or sdpa"):
        A.set_attention(tiny_unet(), "xformers")
    with pytest.raises(FastdiffError, match="train.attention must be one of auto, sdpa, xformers"):
        A.set_attention(tiny_unet(), "flash")


@pytest.mark.gpu
@pytest.mark.parametrize("family", list(FAMILIES))
def test_xformers_keeps_outputs_on_cuda(family):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    usable, why = A.xformers_status()
    if not usable:
        pytest.skip(why)
    modules, _, via, untouched = FAMILIES[family]
    model, inputs = build(family)
    model.eval().cuda()
    inputs = {k: v.cuda() if torch.is_tensor(v) else v for k, v in inputs.items()}
    default = forward(model, inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        setting = A.set_attention(model, "xformers")
    on_xformers = modules - untouched if via != "set_attention_backend" or A.dispatcher_has_xformers() else 0
    assert setting.xformers == on_xformers and setting.via == ((via,) if via else ()), setting
    # float32 both sides: xformers' online softmax and SDPA's kernels sum in another order; with ~100 terms per
    # attention sum and a few layers, rounding stays well under 1e-4 of the outputs' magnitude.
    scale = float(default.abs().max())
    torch.testing.assert_close(forward(model, inputs), default, rtol=0, atol=1e-4 * scale)


def test_dispatcher_modules_outside_a_diffusers_model_are_set_one_by_one():
    """A plain container of Flux attention modules (no ModelMixin): each module's own set_attention_backend."""
    from diffusers.models.attention_dispatch import AttentionBackendName
    from diffusers.models.transformers.transformer_flux import FluxAttention

    blocks = torch.nn.ModuleList([FluxAttention(16, heads=2, dim_head=8) for _ in range(3)])
    for b in blocks:
        b.processor._attention_backend = AttentionBackendName._NATIVE_MATH
    assert A.set_attention(blocks, "sdpa") == (3, 0, 0, ("AttentionModuleMixin.set_attention_backend",))
    assert all(b.processor._attention_backend == AttentionBackendName.NATIVE for b in blocks)


def _stand_in_xformers(root):
    """A folder to put first on PYTHONPATH: an xformers package that records, when it executes, whether torch was
    imported and a libcudart.so.12 loaded (fastdiff.cudart's record of it: portable, unlike /proc/self/maps), and an
    nvidia-cuda-runtime-cu12 layout whose libcudart.so.12 is any loadable shared object (_ctypes')."""
    import _ctypes
    import shutil

    (root / "xformers").mkdir(parents=True)
    (root / "xformers" / "__init__.py").write_text(
        "import sys\nSAW = ('torch' in sys.modules, sys.modules['fastdiff.cudart'].PRELOADED_BEFORE_XFORMERS)\n")
    lib = root / "nvidia" / "cuda_runtime" / "lib"
    lib.mkdir(parents=True)
    shutil.copy(_ctypes.__file__, lib / "libcudart.so.12")
    return root


def _probe(code: str, path) -> list[str]:
    import os
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join([str(path), *sys.path])})
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.split()


def test_cuda_12_runtime_is_loaded_after_torch_and_before_xformers_first_import(tmp_path):
    """``import fastdiff`` imports neither torch nor xformers, and a lookup of xformers (diffusers' availability
    check) loads nothing; when xformers first executes, torch is imported, then ``libcudart.so.12`` loaded (torch is
    there when the runtime loads), then xformers runs. Meanwhile another thread imports numpy, which torch imports
    too: the work is done in the loader, under xformers' module lock, not in the finder under Python's global import
    lock, where it deadlocked (found by review: 5 hangs in 6 runs; a hang here ends at the 60 s timeout)."""
    probe = ("import sys, threading, importlib.util\nimport fastdiff, fastdiff.cudart as c\nreal, seen = c.preload_cudart12, []\n"
             "c.preload_cudart12 = lambda: (seen.append('torch' in sys.modules), real())[1]\n"
             "assert importlib.util.find_spec('xformers') is not None and 'torch' not in sys.modules\n"
             "t = threading.Thread(target=lambda: __import__('numpy'))\nt.start()\nimport xformers\nt.join()\n"
             "print(*xformers.SAW, *seen, c.PRELOADED_BEFORE_XFORMERS)")
    assert _probe(probe, _stand_in_xformers(tmp_path)) == ["True", "True", "True", "True"]


def test_the_xformers_hook_leaves_other_finders_their_turn(tmp_path):
    """A finder that serves xformers itself (a zip, a frozen app, a vendored wheel), ahead of the path: the hook,
    put in front of it, finds xformers through it on the first try and still runs torch and the runtime first (it
    once removed itself mid-lookup, and that lookup skipped the finder behind it: ImportError)."""
    probe = ("import importlib.abc, importlib.machinery, sys\n"
             "class Serves(importlib.abc.MetaPathFinder, importlib.abc.Loader):\n"
             "    def find_spec(self, name, path=None, target=None):\n"
             "        return importlib.machinery.ModuleSpec(name, self) if name == 'xformers' else None\n"
             "    def create_module(self, spec):\n        return None\n"
             "    def exec_module(self, module):\n        module.SAW = 'torch' in sys.modules\n"
             "sys.meta_path.insert(0, Serves())\nimport fastdiff, fastdiff.cudart as c\nimport xformers\n"
             "print(xformers.SAW, c.PRELOADED_BEFORE_XFORMERS, type(sys.meta_path[0]).__name__)")
    # the stand-in folder is on the path too (so the hook is installed), but Serves answers first
    assert _probe(probe, _stand_in_xformers(tmp_path)) == ["True", "True", "_BeforeXformers"]


def test_a_failed_first_xformers_import_leaves_the_hook_armed(tmp_path):
    """If torch fails to import during xformers' first import (here a stand-in torch that raises once), the next
    import of xformers still gets torch and the runtime first (the hook once marked itself done before the work,
    and the second import ran xformers with neither; found by review)."""
    root = _stand_in_xformers(tmp_path)
    (root / "torch").mkdir()
    (root / "torch" / "__init__.py").write_text(
        "import os\nmarker = os.path.join(os.path.dirname(__file__), 'failed-once')\nif not os.path.exists(marker):\n"
        "    open(marker, 'w').close()\n    raise ImportError('a transient failure')\n")
    probe = ("import fastdiff, fastdiff.cudart as c\ntry:\n    import xformers\nexcept ImportError as e:\n    print('first:', e.args[0].split()[1])\n"
             "import xformers\nprint(*xformers.SAW)")
    assert _probe(probe, root) == ["first:", "transient", "True", "True"]
