"""The GAN head's two read-outs against their references (objectives/gan.py), and what it reads on joint blocks.

- ``dmd2``: tianweiy/DMD2 ``main/sd_guidance.py`` ``cls_pred_branch`` (SD 1.5: 8x8 bottleneck; SDXL: 32x32), written
  out layer by layer; fastdiff's branch, given the same weights, is the same function.
- ``sida``: mingyuanzhou/SiD branch sida ``sida_networks.py``: ``logits = x.mean(dim=1, keepdim=True)`` on the
  encoder's output, no parameters.
- SD3 / Flux joint blocks return (text, image): the head reads the image tokens (it once read the text stream).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import tiny_unet
from test_sharding import _Fake  # what the head reads of a fake score: its network and a call
from fastdiff.objectives.gan import GANHead, bottleneck_size, dmd2_branch, image_features


def _dmd2_reference(channels: int, sdxl: bool) -> nn.Sequential:
    """sd_guidance.py's cls_pred_branch with ``channels`` for its 1280 (32 groups as there)."""
    def block(k, s, p):
        return [nn.Conv2d(kernel_size=k, in_channels=channels, out_channels=channels, stride=s, padding=p),
                nn.GroupNorm(num_groups=32, num_channels=channels), nn.SiLU()]

    halvings = 3 if sdxl else 1  # 32 -> 16 -> 8 -> 4, or 8 -> 4
    layers = [layer for _ in range(halvings) for layer in block(4, 2, 1)]
    return nn.Sequential(*layers, *block(4, 4, 0), nn.Conv2d(kernel_size=1, in_channels=channels, out_channels=1,
                                                            stride=1, padding=0))


@pytest.mark.parametrize("sdxl,size", [(False, 8), (True, 32)])
def test_dmd2_branch_is_dmd2s_cls_pred_branch(sdxl, size):
    channels = 128  # 32 groups of 4, as DMD2's 32 groups of 40 at 1280
    ours, ref = dmd2_branch(channels, (size, size)), _dmd2_reference(channels, sdxl)
    assert [type(m) for m in ours] == [type(m) for m in ref]
    for a, b in zip(ours, ref):
        if isinstance(a, nn.Conv2d):
            assert (a.kernel_size, a.stride, a.padding) == (b.kernel_size, b.stride, b.padding)
        if isinstance(a, nn.GroupNorm):
            assert a.num_groups == b.num_groups == 32
    ref.load_state_dict(ours.state_dict())  # same layers, same names
    h = torch.randn(2, channels, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = ours(h)
        assert out.shape == (2, 1, 1, 1) and torch.equal(out, ref(h))


def test_dmd2_branch_on_small_maps_keeps_several_channels_per_group():
    """A map already 4x4 or smaller goes to 1x1 in one convolution; GroupNorm never has one channel a group (on the
    1x1 map it would output its bias, and the fake score would get no gradient)."""
    for size, channels in (((4, 4), 16), ((2, 2), 8), ((6, 6), 18), ((1, 1), 4)):
        branch = dmd2_branch(channels, size)
        norms = [m for m in branch if isinstance(m, nn.GroupNorm)]
        assert all(channels // m.num_groups >= 4 for m in norms)
        h = torch.randn(3, channels, *size, requires_grad=True)
        out = branch(h)
        assert out.shape == (3, 1, 1, 1)
        out.sum().backward()
        assert float(h.grad.abs().max()) > 0


def test_bottleneck_size_and_readouts_on_a_unet():
    unet = tiny_unet()  # 8x8 samples, one downsampler: a 4x4 mid block
    assert bottleneck_size(unet, None) == (4, 4) and bottleneck_size(unet, (16, 12)) == (8, 6)
    fake = _Fake(unet)
    x, t = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([10, 500, 900])
    kept = []
    handle = unet.mid_block.register_forward_hook(lambda m, a, out: kept.append(out))
    with torch.no_grad():
        sida, dmd2 = GANHead(fake, "sida"), GANHead(fake, "dmd2")
        assert not list(sida.parameters()) and list(dmd2.parameters())
        logits = sida(x, t)
        features = kept[-1]
        assert logits.shape == (3, 16) and torch.equal(logits, features.mean(dim=1, keepdim=True).flatten(1))
        assert torch.equal(dmd2(x, t), dmd2.branch(kept[-1]).flatten())
    handle.remove()
    with pytest.raises(ValueError, match="sized for a 8x8 bottleneck, the fake score gave 4x4"):
        GANHead(fake, "dmd2", sample_size=16)(x, t)
    with pytest.raises(ValueError, match="readout must be one of"):
        GANHead(fake, "hinge")


def test_joint_blocks_are_read_on_their_image_tokens():
    """SD3's JointTransformerBlock (and Flux's double-stream block) returns (text, image); the head's features are
    the image stream's tokens, 8 x 8 latent positions here, not the 5 text tokens."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    model = SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8,
                                  num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32,
                                  pooled_projection_dim=64, out_channels=4)
    head = GANHead(_Fake(model), "sida")
    with torch.no_grad(), head.reading():
        model(hidden_states=torch.randn(2, 4, 8, 8), encoder_hidden_states=torch.randn(2, 5, 32),
              pooled_projections=torch.randn(2, 64), timestep=torch.tensor([100, 700]))
    assert head._features.shape == (2, 64, 32)
    assert head.logits().shape == (2, 64)
    text, image = torch.zeros(2, 5, 3), torch.ones(2, 7, 3)
    assert image_features((text, image)) is image and image_features((None, image)) is image
    down = torch.zeros(2, 3, 4, 4)
    assert image_features((down, (down,))) is down  # UNet down blocks: (hidden, skips)


def test_objective_gan_readout_picks_the_read_out(tiny_teacher, tmp_path):
    """``objective.gan_readout`` (null: the objective's reference's) builds that head; it is refused where the run
    has no GAN head, and an unknown name at load."""
    from fastdiff.config import load_config
    from fastdiff.errors import FastdiffError
    from fastdiff.training import Trainer
    from test_export_e2e import write_fake_fashion_mnist

    data = tmp_path / "fmnist"
    write_fake_fashion_mnist(data, size=8)
    base = [f"teacher.path={tiny_teacher}", f"data.path={data}", "data.resolution=8", "train.batch_size=2"]
    for i, (sets, readout) in enumerate(((["objective.name=sida"], "sida"),
                                         (["objective.name=sida", "objective.gan_readout=dmd2"], "dmd2"),
                                         (["objective.gan=true"], "dmd2"),
                                         (["objective.gan=true", "objective.gan_readout=sida"], "sida"))):
        cfg = load_config(None, [*base, *sets, f"output_dir={tmp_path / f'run{i}'}"])
        head = Trainer(cfg, progress=False).objective.gan_head
        assert head.readout == readout and bool(list(head.parameters())) == (readout == "dmd2"), sets
    with pytest.raises(FastdiffError, match="objective dmd2 has none here: set objective.gan=true"):
        Trainer(load_config(None, [*base, "objective.gan_readout=sida", f"output_dir={tmp_path / 'x'}"]),
                progress=False)
    with pytest.raises(FastdiffError, match="must be dmd2 .* or sida"):
        load_config(None, [*base, "objective.gan_readout=mean"])
