"""A GAN head on the fake score's bottleneck (DMD2, Yin et al. 2024, Sec. 4.3; SiDA, Zhou et al. 2025).

The fake score network doubles as the discriminator's trunk: a forward hook reads its bottleneck (UNet
``mid_block`` output, or the image tokens of the middle transformer block) on noised images, and a read-out turns
it into logits. Two read-outs, each its reference's (``GANHead(readout=...)``):

- ``dmd2``: DMD2's ``cls_pred_branch`` (tianweiy/DMD2 ``main/sd_guidance.py``, ``main/edm/edm_guidance.py``) as
  FastGen's ``Discriminator_EDM`` generalises it to any bottleneck size (``fastgen/networks/discriminators.py``):
  4x4 stride-2 convolutions (+ GroupNorm + SiLU) halve the map until it is at most 4x4 (8x8 -> 4x4 for SD 1.5 and
  EDM-ImageNet's, 32 -> 16 -> 8 -> 4 for SDXL's), a convolution as large as the map (DMD2's 4x4 stride 4) takes it
  to 1x1, and a 1x1 convolution to one logit per image. dmd2, disback and f-distill use it.
- ``sida``: SiDA's discriminator has no head of its own (mingyuanzhou/SiD branch sida,
  ``sida_training/sida_networks.py``: ``logits = x.mean(dim=1, keepdim=True)`` on the encoder's output): the logit
  map is the bottleneck's channel mean, one logit per position, and the BCE terms average over the positions as
  ``nn.BCEWithLogitsLoss`` does. sid / sida and Uni-Instruct (SiDA's networks) use it.

On token features (transformers) the ``dmd2`` read-out is a mean over tokens and a two-layer MLP (DMD2 has no
transformer head); on flat features (the analytic teacher's per-mode responsibilities, no map) both read-outs are
that MLP. Non-saturating losses: generator ``softplus(-D(fake))``, discriminator ``softplus(-D(real)) +
softplus(D(fake))``. SiDA's forms weigh the same BCE terms by batch means: :func:`sida_generator_gan_loss` and
:func:`sida_discriminator_loss`.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from ..models.denoiser import Denoiser
from .base import kept_mean, only_finite


READOUTS = ("dmd2", "sida")


def image_features(output) -> torch.Tensor:
    """The image features of a block's output: UNet down blocks return (hidden, skips), joint (MM-DiT: SD3, Flux)
    blocks (text, image) with text None in SD3's last one; other blocks a tensor."""
    if torch.is_tensor(output):
        return output
    tensors = [o for o in output if torch.is_tensor(o)]
    if tensors and tensors[0].ndim == 4:
        return tensors[0]
    return tensors[-1]


def bottleneck_size(model: nn.Module, sample_size) -> tuple[int, int] | None:
    """(h, w) of a UNet's ``mid_block`` features for samples of ``sample_size`` (an int, (h, w), or None for the
    model's own ``config.sample_size``): each down block with a downsampler halves it, rounding up as a stride-2 3x3
    convolution with padding 1 does. None for models without down blocks."""
    if not getattr(model, "down_blocks", None):
        return None
    size = sample_size if sample_size is not None else getattr(model.config, "sample_size", None)
    if size is None:
        return None
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    for block in model.down_blocks:
        if getattr(block, "downsamplers", None):
            h, w = (h + 1) // 2, (w + 1) // 2
    return h, w


def dmd2_branch(channels: int, size: tuple[int, int]) -> nn.Sequential:
    """DMD2's ``cls_pred_branch`` for a ``size`` map (see the module docstring): (B, C, h, w) -> (B, 1, 1, 1)."""
    # DMD2's 32 groups (768, 1280 channels); on narrower networks the most groups up to 32 with at least 4 channels
    # each (FastGen's _get_optimal_groups keeps 4 a group too). Never one channel a group: on the final 1x1 map
    # GroupNorm would then output its bias alone, and no gradient would reach the fake score.
    groups = max(g for g in range(1, 33) if channels % g == 0 and channels // g >= min(4, channels))

    def block(kernel, stride, padding):
        return [nn.Conv2d(channels, channels, kernel, stride, padding), nn.GroupNorm(groups, channels), nn.SiLU()]

    h, w = size
    layers = []
    while min(h, w) > 4:
        layers += block(4, 2, 1)
        h, w = h // 2, w // 2
    layers += block((h, w), (h, w), 0)  # DMD2's 4x4 stride-4 convolution when the map is 4x4
    return nn.Sequential(*layers, nn.Conv2d(channels, 1, 1))


def bottleneck_module(model: nn.Module) -> nn.Module:
    if getattr(model, "mid_block", None) is not None:
        return model.mid_block
    blocks = getattr(model, "transformer_blocks", None)
    if blocks is not None and len(blocks) > 0:
        return blocks[len(blocks) // 2]
    raise ValueError(f"{type(model).__name__} has no mid_block or transformer_blocks for a GAN head")


def bottleneck_channels(model: nn.Module) -> int:
    if getattr(model, "bottleneck_channels", None):  # models that say it (the analytic teacher)
        return model.bottleneck_channels
    cfg = model.config
    if getattr(cfg, "block_out_channels", None):
        return cfg.block_out_channels[-1]
    return cfg.num_attention_heads * cfg.attention_head_dim


def _is_fsdp_root(model: nn.Module) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


class GANHead(nn.Module):
    """Logits from the fake score's bottleneck features; owns only the read-out's parameters.

    ``readout``: ``dmd2`` or ``sida`` (module docstring). ``sample_size``: the spatial size of the samples the
    fake score sees (None: its config's ``sample_size``), which sizes DMD2's branch on a UNet."""

    def __init__(self, fake: Denoiser, readout: str = "dmd2", sample_size=None):
        super().__init__()
        if readout not in READOUTS:
            raise ValueError(f"GAN head readout must be one of {', '.join(READOUTS)}, got {readout!r}")
        channels = bottleneck_channels(fake.model)
        self.readout = readout
        self.size = bottleneck_size(fake.model, sample_size)
        if readout == "dmd2" and self.size is not None:
            self.branch = dmd2_branch(channels, self.size)
        elif self.size is None:  # tokens or flat features
            self.mlp = nn.Sequential(nn.Linear(channels, channels), nn.SiLU(), nn.Linear(channels, 1))
        self._fake = [fake]  # a list keeps the fake score out of this module's parameters
        self._features = None
        self._capturing = False  # other fake-score passes (DM gradient, fake loss) keep nothing
        bottleneck_module(fake.model).register_forward_hook(self._keep)

    def _keep(self, module, args, output):
        if self._capturing:
            features = image_features(output)
            self._features = features
            root = self._fake[0].model
            if features.requires_grad and _is_fsdp_root(root):
                # train.sharding fsdp: FSDP gathers a unit's weights again in backward when the gradient reaches
                # the unit's output. The root unit's output is the fake score's x0, which the head does not use,
                # so that never happens, and backward would reach the root's own layers (conv_in, the time
                # embedding) with their weights freed after forward. The features lead there: gather on them.
                features.register_hook(lambda grad: root.unshard())

    @contextmanager
    def reading(self):
        """Keep the bottleneck features of the fake-score pass run inside, for :meth:`logits`: one pass then gives
        both the fake score's x0 and the logits (SiDA's ``return_flag='encoder_decoder'``)."""
        self._capturing = True
        try:
            yield
        finally:
            self._capturing = False

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict | None = None) -> torch.Tensor:
        with self.reading():
            self._fake[0](x, sigma, cond)
        return self.logits()

    def logits(self) -> torch.Tensor:
        """Logits from the features the last :meth:`reading` pass kept: (B,) per image (``dmd2``, flat features) or
        (B, positions), one per map position or token (``sida``)."""
        h, self._features = self._features.float(), None
        if h.ndim == 4 and self.readout == "dmd2" and self.size is None:
            raise ValueError(f"{type(self._fake[0].model).__name__} has no down blocks or sample_size to size DMD2's "
                             "GAN branch by: build the head with the samples' size (sample_size)")
        if h.ndim == 4 and self.readout == "dmd2" and tuple(h.shape[-2:]) != self.size:
            raise ValueError(f"the GAN head was sized for a {self.size[0]}x{self.size[1]} bottleneck, the fake score "
                             f"gave {h.shape[-2]}x{h.shape[-1]}: build it with the samples' size (sample_size)")
        if h.ndim > 2 and self.readout == "sida":  # SiDA: the channel mean at every position, no parameters
            return (h.mean(dim=1) if h.ndim == 4 else h.mean(dim=2)).flatten(1)
        if h.ndim == 4:
            return self.branch(h).flatten()
        if h.ndim == 3:  # tokens (B, N, D)
            h = h.mean(dim=1)
        return self.mlp(h).squeeze(1)


def per_sample_logits(logits: torch.Tensor) -> torch.Tensor:
    """A logit map's per-sample mean: (B,) from (B,) or (B, positions)."""
    return logits.flatten(1).mean(dim=1) if logits.ndim > 1 else logits


def per_sample_softplus(logits: torch.Tensor) -> torch.Tensor:
    """``softplus`` per logit, averaged over each sample's positions (BCEWithLogits' mean, per sample)."""
    values = F.softplus(logits)
    return values.flatten(1).mean(dim=1) if values.ndim > 1 else values


def discriminator_gan_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean()


def sida_generator_gan_loss(logits_fake: torch.Tensor, norm: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    """SiDA's generator GAN term: ``BCE(clamp(D, -10, 10), real)`` averaged over the kept samples, times
    ``sum_kept(1 / norm) / B`` with norm = mean|x - y_r| per sample (sida_loss.py divides the batch-mean BCE by each
    sample's weight_factor; the loop sums over samples and divides by the batch). ``ok``: samples kept."""
    (logits,) = only_finite(ok, logits_fake.float())
    bce = kept_mean(ok, per_sample_softplus(-logits.clamp(-10, 10)))
    return bce * only_finite(ok, 1 / norm)[0].sum() / ok.shape[0]


def sida_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor, weight: torch.Tensor,
                            ok: torch.Tensor) -> torch.Tensor:
    """SiDA's discriminator loss: ``sum_kept(lambda(sigma)) / B * (BCE(D(real), 1) + BCE(D(fake), 0)) / 2``, the
    BCEs averaged over the kept samples, lambda the fake-score loss weight at the shared noise level."""
    real, fake, weight = only_finite(ok, logits_real.float(), logits_fake.float(), weight)
    bce = (kept_mean(ok, per_sample_softplus(-real)) + kept_mean(ok, per_sample_softplus(fake))) / 2
    return weight.sum() / ok.shape[0] * bce
