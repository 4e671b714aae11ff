"""LADD: latent adversarial diffusion distillation (Sauer et al. 2024, "Fast High-Resolution Image Synthesis with
Latent Adversarial Diffusion Distillation", SD3-Turbo), alone and as SANA-Sprint's sCM + LADD hybrid (Chen et al.
2025, "SANA-Sprint", Eq. 9-10).

The discriminator is the frozen teacher itself: forward hooks read its features at several layers (UNets: every down
block and the mid block; transformers: every ``head_every``-th block; models with neither but a ``mid_block``, such as
the analytic teacher: that one) and a small trainable head per layer turns them into per-location logits. Both sides
are noised before the teacher sees them, at ``ln sigma ~ N(disc_p_mean, disc_p_std^2)``: that is LADD's logit-normal
``pi(t; m, s)`` on the flow time (``logit t = ln sigma``), and SANA-Sprint's ``logit_normal_trigflow`` discriminator
levels (``t = atan(sigma / sd)``; sd tan t is fastdiff's VE sigma). Hinge losses (LADD Eq. 1-2, as ADD):

    critic:    0.5 * (E[relu(1 - D(x_real,t))] + E[relu(1 + D(x_fake,t))])
    generator: -E[D(x_fake,t)]                   (adversarial_loss "logistic": the non-saturating BCE forms)

each expectation over samples and the head's locations, then averaged over the heads (with equal token counts, as on
a transformer, this is the reference's mean over the concatenated logits).

The "real" side (``real_source``): by default (``teacher``) it needs no data: LADD trains on the teacher's own samples
("synthetic data", Sec. 3.2), which fastdiff draws on the fly with the teacher's deterministic DDIM / Euler sampler at
``teacher_steps`` levels and the teacher's CFG, once per critic update and with the same conditions as the generator's
batch. With ``data`` it is a batch of the configured data set (``data.name``; latents for latent teachers), with that
batch's own conditions, noised as the fake side is: real images are what ADD (Sauer et al. 2023, LADD's predecessor)
trains its discriminator on, and what SANA-Sprint's hybrid trains its heads against. The trainer then loads the data
as it does for objectives that train on data (``Run._real``, passed to ``critic_loss`` as ``real``). The generator
gradient runs through the frozen teacher's activations into the sample; the teacher's parameters get none (the
trainer freezes them; the objective never trains them).

Reference code (read, not copied): NVlabs/Sana ``train_scripts/train_scm_ladd.py`` (G and D phases, hinge /
cross-entropy losses, ``adv_lambda`` 0.5 with ``scm_lambda`` 1, discriminator levels ``logit_mean_discriminator`` -0.6,
``logit_std_discriminator`` 1.0), ``diffusion/model/nets/sana_ladd.py`` (hooks on the transformer blocks, one head per
hooked block, heads without the class / text projection) and ``diffusion/model/nets/ladd_blocks.py`` (the head:
StyleGAN-T's ``DiscHead``: spectrally normalised 1x1 conv + local batch norm + LeakyReLU, a residual k=9 circular conv
block, a 1x1 conv to one logit per token); the same in huggingface/diffusers
``examples/research_projects/sana/train_sana_sprint_diffusers.py`` (``head_block_ids`` 2, 8, 14, 19 of 20 blocks).
fastdiff's heads on UNet feature maps use 2-d convolutions (k=1, residual 3x3): the reference has only transformers.
Defaults (changed from LADD's m = 1 and the trainer's 1e-5 critic lr, measured on the CPU ladder's class-conditional
v-prediction teacher fmnist-cond-vpred, CFG 2, batch 8): ``disc_p_mean`` -0.6 (Sana's ``logit_mean_discriminator``;
the paper's 1 was chosen for SD3's 128x128 latents, and at its median sigma e = 2.7 a 32x32 image is mostly noise)
and ``train.lr_critic`` 3e-4 (``HEAD_LR``). With the old ones the discriminator stayed at chance for all 100 ladder
updates (loss_ladd_d 1.01-1.03; hinge at chance is 1) while Adam moved the student at full step along the untrained
heads' direction: 150.0 -> 166.7 FID@1k (the embedded teacher's 175.5 -> 149.9 came with the same chance-level
discriminator). Held-out mean logit gap real - fake after 40 head updates on fixed pools (48 teacher samples and 48
starting-student samples drawn as the ladder's run draws them; heads trained on 32 of each, the gap on 8 others x 2
noise draws): lr 1e-5: 0.001 (m = 1) / 0.010 (m = -0.6); 1e-4: 0.031 / 0.111; 3e-4: 0.084 / 0.276; 1e-3 (m = -0.6):
0.560. With the new defaults the same ladder run gives 150.0 -> 128.4 (KID 0.1314 -> 0.0701). The class condition
reaches the discriminator through the teacher's pass (the heads read the class-conditioned UNet's features: another
label changes them by 9-70% relative per layer), with the same labels on the real and fake sides and one unguided
pass per side (no CFG batch doubling).
Not implemented: the reference's optional R1 penalty on the head inputs, misaligned pairs, and LADD's conditioning
of the heads on the noise level / pooled text (Sana's heads are unconditional too).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from ..errors import FastdiffError
from ..inference.sampling import ddim_sample
from ..models.denoiser import Denoiser, expand
from ..models.generator import step_sigmas
from .base import Objective, edm_sigma, finite_mean
from .gan import bottleneck_channels, discriminator_gan_loss, image_features
from .registry import register
from .scm import SIGMA_DATA, ContinuousConsistency

ADVERSARIAL_LOSSES = ("hinge", "logistic")
# The heads' learning rate (train.lr_critic when the config leaves it null), 30x the generator's 1e-5: at 1e-5 (the
# fallback, and Sana's 2e-6 for both sides) the heads learn nothing in a short run and the generator follows a fixed
# random direction of the teacher's features (see LADD's docstring, "Defaults").
HEAD_LR = 3e-4
HEAD_TRAIN = {"lr_critic": HEAD_LR, "grad_clip": 0.1}  # the heads' rate, and Sana's clip on both phases (train_scm_ladd.py)
REAL_SOURCES = ("teacher", "data")  # what the discriminator's real side is (LADD.real_source)


# --- which teacher layers the heads read ---------------------------------------------------------------------------
def feature_modules(model: nn.Module, head_every: int = 1) -> list[nn.Module]:
    """The teacher modules whose outputs the heads read, in forward order.

    UNets: every down block and the mid block. Transformers: blocks ``head_every - 1, 2 head_every - 1, ...`` of
    ``transformer_blocks`` (the last block when there are fewer than ``head_every``). Otherwise a ``mid_block``."""
    if head_every < 1:
        raise FastdiffError(f"objective.head_every must be >= 1, got {head_every}")
    down = getattr(model, "down_blocks", None)
    if down is not None and len(down) > 0:
        mid = getattr(model, "mid_block", None)
        return [*down, *([mid] if mid is not None else [])]
    blocks = getattr(model, "transformer_blocks", None)
    if blocks is not None and len(blocks) > 0:
        picked = [blocks[i] for i in range(head_every - 1, len(blocks), head_every)]
        return picked or [blocks[len(blocks) - 1]]
    if getattr(model, "mid_block", None) is not None:
        return [model.mid_block]
    raise FastdiffError(f"{type(model).__name__} has no down/mid blocks or transformer blocks for LADD's heads")


def head_shapes(model: nn.Module, count: int) -> list[tuple[int, int]]:
    """(channels, spatial dims) of the features at :func:`feature_modules`' layers, from the model's config:
    UNet block ``i`` outputs ``block_out_channels[i]`` maps (the mid block the last); transformer blocks tokens of
    ``heads x head_dim``; a bare ``mid_block`` (the analytic teacher) ``bottleneck_channels`` per sample."""
    cfg = getattr(model, "config", None)
    if getattr(model, "down_blocks", None) is not None and len(model.down_blocks) > 0:
        out = list(cfg.block_out_channels)
        return [(c, 2) for c in out] + [(out[-1], 2)] * (count - len(out))
    if getattr(model, "transformer_blocks", None) is not None and len(model.transformer_blocks) > 0:
        return [(cfg.num_attention_heads * cfg.attention_head_dim, 1)] * count
    return [(bottleneck_channels(model), 0)]


class LocalBatchNorm(nn.Module):
    """Batch norm over groups of consecutive samples and all locations, no running statistics (StyleGAN-T's
    ``BatchNormLocal``, as Sana's ladd_blocks.py): the head sees how a sample differs from its group. A batch of B
    makes ``ceil(B / group)`` groups; where they cannot be equal (B = 9, 11, 13, 17, ...: the reference's reshape
    fails there) their sizes differ by one (``torch.tensor_split``), so any per-process batch size trains."""

    def __init__(self, channels: int, group: int = 8, eps: float = 1e-5):
        super().__init__()
        self.group, self.eps = group, eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b = h.shape[0]
        groups = -(-b // self.group)
        if b % groups:
            return torch.cat([self._normalise(part, 1) for part in torch.tensor_split(h, groups)])
        return self._normalise(h, groups)

    def _normalise(self, h: torch.Tensor, groups: int) -> torch.Tensor:
        c = h.shape[1]
        g = h.reshape(groups, -1, c, h[0, 0].numel())  # (groups, samples, C, locations)
        mean = g.mean(dim=(1, 3), keepdim=True)
        var = g.var(dim=(1, 3), keepdim=True, unbiased=False)
        g = (g - mean) / torch.sqrt(var + self.eps)
        g = g * self.weight[:, None] + self.bias[:, None]
        return g.reshape(h.shape)


class DiscriminatorHead(nn.Module):
    """Per-location logits from one layer's features: a spectrally normalised 1x1 block, a residual block with a
    wider kernel (k=9 circular over tokens, 3x3 over feature maps), a 1x1 projection to one logit. Feature vectors
    without locations (B, C) get the same layers as 1x1 convolutions on one location."""

    def __init__(self, channels: int, spatial_dims: int):
        super().__init__()
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv1d
        wide = 3 if spatial_dims == 2 else (9 if spatial_dims == 1 else 1)

        def block(k: int) -> nn.Sequential:
            return nn.Sequential(spectral_norm(conv(channels, channels, k, padding=k // 2, padding_mode="circular")),
                                 LocalBatchNorm(channels), nn.LeakyReLU(0.2))

        self.first, self.residual = block(1), block(wide)
        self.out = spectral_norm(conv(channels, 1, 1))
        self.spatial_dims = spatial_dims

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """(B, locations) logits; h is (B, C, H, W), tokens (B, N, C), or (B, C)."""
        if self.spatial_dims == 1:
            h = h.transpose(1, 2)  # tokens -> (B, C, N)
        elif self.spatial_dims == 0:
            h = h.unsqueeze(2)  # (B, C, 1)
        h = self.first(h)
        h = (self.residual(h) + h) / 2 ** 0.5
        return self.out(h).flatten(1)


class TeacherDiscriminator(nn.Module):
    """Heads on the frozen teacher's features. Owns only the heads' parameters; the teacher stays outside them.

    The hooks keep features only inside :meth:`features`, so every other teacher pass (sampling, sCM targets, CFG)
    costs nothing extra. The heads (channels differ per
    layer and model family) are sized by :func:`head_shapes`."""

    def __init__(self, teacher: Denoiser, head_every: int = 1):
        super().__init__()
        self._teacher = [teacher]  # a list keeps the teacher out of this module's parameters and state
        self.modules_read = feature_modules(teacher.model, head_every)
        self.heads = nn.ModuleList()
        self._features: list[torch.Tensor] | None = None
        for m in self.modules_read:
            m.register_forward_hook(self._keep)

    def _keep(self, module, args, output):
        if self._features is not None:
            self._features.append(image_features(output))

    @contextmanager
    def reading(self):
        self._features = []
        try:
            yield
        finally:
            self._features = None

    def features(self, x_t: torch.Tensor, sigma: torch.Tensor, cond: dict | None) -> list[torch.Tensor]:
        """The hooked layers' outputs for the teacher's pass at (x_t, sigma), conditioned, without CFG."""
        with self.reading():
            self._teacher[0](x_t, sigma, cond, guidance_scale=1.0)
            feats = self._features
        if len(feats) != len(self.modules_read):
            raise FastdiffError(f"LADD read {len(feats)} teacher features, expected {len(self.modules_read)}")
        return feats

    def logits(self, x_t: torch.Tensor, sigma: torch.Tensor, cond: dict | None) -> list[torch.Tensor]:
        """One (B, locations) logit tensor per hooked layer."""
        return [head(h.float()) for head, h in zip(self.heads, self.features(x_t, sigma, cond))]


# --- losses (Sana train_scm_ladd.py; LADD Eq. 1-2) -----------------------------------------------------------------
def hinge_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """``0.5 (mean relu(1 - D(real)) + mean relu(1 + D(fake)))``."""
    return 0.5 * (F.relu(1 - logits_real).mean() + F.relu(1 + logits_fake).mean())


def hinge_generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """``-mean D(fake)``."""
    return -logits_fake.mean()


def logistic_generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating: ``BCE(D(fake), 1) = mean softplus(-D(fake))``."""
    return F.softplus(-logits_fake).mean()


def critic_terms(real: list[torch.Tensor], fake: list[torch.Tensor], loss: str) -> torch.Tensor:
    """The discriminator loss averaged over the heads."""
    one = hinge_discriminator_loss if loss == "hinge" else discriminator_gan_loss
    return torch.stack([one(r, f) for r, f in zip(real, fake)]).mean()


def generator_terms(fake: list[torch.Tensor], loss: str) -> torch.Tensor:
    one = hinge_generator_loss if loss == "hinge" else logistic_generator_loss
    return torch.stack([one(f) for f in fake]).mean()


class Adversary(nn.Module):
    """What LADD and the sCM hybrid share: the teacher discriminator, its noise levels and its two losses."""

    def __init__(self, teacher: Denoiser, head_every: int, disc_p_mean: float, disc_p_std: float,
                 adversarial_loss: str):
        super().__init__()
        if adversarial_loss not in ADVERSARIAL_LOSSES:
            raise FastdiffError(f"objective.adversarial_loss must be one of {', '.join(ADVERSARIAL_LOSSES)}, "
                                f"got {adversarial_loss!r}")
        if disc_p_std < 0:
            raise FastdiffError(f"objective.disc_p_std must be >= 0, got {disc_p_std}")
        self.disc = TeacherDiscriminator(teacher, head_every)
        self.schedule = teacher.schedule
        self.p_mean, self.p_std, self.loss = disc_p_mean, disc_p_std, adversarial_loss
        self.build_heads(teacher)

    def build_heads(self, teacher: Denoiser) -> None:
        """One head per hooked layer, sized from the model's config (so the critic's optimizer sees them)."""
        device = next(iter(teacher.model.parameters())).device
        for channels, dims in head_shapes(teacher.model, len(self.disc.modules_read)):
            self.disc.heads.append(DiscriminatorHead(channels, dims).to(device))

    def noised(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sigma = edm_sigma(self.schedule, x.shape[0], x.device, self.p_mean, self.p_std)
        return x + expand(sigma, x) * torch.randn_like(x), sigma

    def generator_loss(self, x: torch.Tensor, cond) -> torch.Tensor:
        """The adversarial generator loss of samples x (with their graph): heads frozen in eval mode, so the
        spectral norms' power iterations move only while the critic trains (Sana: ``disc.eval()`` in phase G)."""
        x_t, sigma = self.noised(x.float())
        was = self.disc.training
        self.disc.eval()
        try:
            return generator_terms(self.disc.logits(x_t, sigma, cond), self.loss)
        finally:
            self.disc.train(was)

    def critic_loss(self, fake: torch.Tensor, real: torch.Tensor, fake_cond, real_cond) -> torch.Tensor:
        """Both sides noised at the same levels (Sana's default ``diff_timesteps_D`` off)."""
        sigma = edm_sigma(self.schedule, fake.shape[0], fake.device, self.p_mean, self.p_std)
        fake_t = fake.detach().float() + expand(sigma, fake) * torch.randn_like(fake)
        real_t = real.detach().float() + expand(sigma, real) * torch.randn_like(real)
        with torch.no_grad():  # the teacher's pass needs no graph: only the heads train here
            feats_fake = self.disc.features(fake_t, sigma, fake_cond)
            feats_real = self.disc.features(real_t, sigma, real_cond)
        logits_fake = [head(h.float()) for head, h in zip(self.disc.heads, feats_fake)]
        logits_real = [head(h.float()) for head, h in zip(self.disc.heads, feats_real)]
        return critic_terms(logits_real, logits_fake, self.loss)


class LADD(Objective):
    """Args:
        teacher: the frozen teacher: the discriminator's trunk and, without real data, the source of "real" samples.
        head_every: on transformers, a head on every ``head_every``-th block (Sana: 4 heads on 20 blocks).
        disc_p_mean, disc_p_std: ``ln sigma ~ N(mean, std^2)`` of the discriminator's input noise (LADD's logit-normal
            pi(t; m, s) on flow time; the paper's m = 1, s = 1 biases it to high noise, which it found to favour
            global structure on SD3's latents; default SANA-Sprint's -0.6, 1.0: see "Defaults" above).
        teacher_steps: DDIM / Euler steps of the teacher's samples, the "real" side with ``real_source`` teacher.
        real_source: the discriminator's real side: "teacher" (its own samples, the paper's setting, no data needed)
            or "data" (the trainer's batch of ``data.name`` images with their conditions).
        adversarial_loss: "hinge" (LADD, Sana's default) or "logistic" (non-saturating BCE, Sana's "cross entropy").
        critic_updates: head updates per generator update (Sana alternates 1:1).
    """

    uses_fake_score = False

    def __init__(self, teacher: Denoiser, fake=None, critic_updates: int = 1, gan_head=None, head_every: int = 1,
                 disc_p_mean: float = -0.6, disc_p_std: float = 1.0, teacher_steps: int = 4,
                 adversarial_loss: str = "hinge", real_source: str = "teacher"):
        super().__init__(teacher, None, critic_updates, None)
        if teacher_steps < 1:
            raise FastdiffError(f"objective.teacher_steps must be >= 1, got {teacher_steps}")
        if real_source not in REAL_SOURCES:
            raise FastdiffError(f"objective.real_source must be one of {', '.join(REAL_SOURCES)}, got {real_source!r}")
        self.teacher_steps, self.real_source = teacher_steps, real_source
        self.adversary = Adversary(teacher, head_every, disc_p_mean, disc_p_std, adversarial_loss)

    @classmethod
    def reads_real_images(cls, options) -> bool:
        return options.real_source == "data"  # the discriminator's real side is the trainer's data batch

    def train_defaults(self) -> dict:
        """The heads' lr ``HEAD_LR`` (the trainer's AdamW otherwise): see the module's "Defaults"; Sana's gradient
        clip 0.1 on both phases (``train_scm_ladd.py``, ``gradient_clip``)."""
        return dict(HEAD_TRAIN)

    def critic_modules(self) -> list[nn.Module]:
        return [self.adversary.disc.heads]

    def state_modules(self) -> dict[str, nn.Module]:
        return {"ladd_heads": self.adversary.disc.heads}

    @torch.no_grad()
    def teacher_samples(self, like: torch.Tensor, cond) -> torch.Tensor:
        """The teacher's own samples for the batch's conditions, from fresh noise (its CFG scale)."""
        return ddim_sample(self.teacher, torch.randn_like(like.float()), self.teacher_steps, cond)

    def generator_loss(self, x, cond=None, real=None):
        loss = self.adversary.generator_loss(x, cond)
        return loss, {"loss_ladd_g": loss.detach()}

    def critic_loss(self, x, cond=None, real=None):
        """Fake: the generator's samples x; real: the teacher's samples for the same conditions, or (``real_source``
        data) the data batch ``real = (images, their conditions)`` the trainer passes."""
        if self.real_source == "teacher":
            real_x, real_cond = self.teacher_samples(x, cond), cond
        elif real is None:
            raise FastdiffError("objective.real_source data: the critic got no real images (the trainer passes a batch "
                                "of data.name; a caller of critic_loss must pass real=(images, conditions))")
        else:
            real_x, real_cond = real
        loss = self.adversary.critic_loss(x, real_x, cond, real_cond)
        return loss, {"loss_ladd_d": loss.detach()}


class SCMLADD(ContinuousConsistency):
    """SANA-Sprint's hybrid: sCM's loss plus ``ladd_weight`` times LADD's generator loss on the student's x0 estimate
    ``pred_x_0 = cos(t) x_t - sin(t) sd F`` of a noised copy of the data batch, the heads trained 1:1 on such
    estimates (fake) against the data batch itself (real).

    Which estimate (Sana's ``train_largest_timestep``, on in its shipped SANA-Sprint configs and in diffusers'
    ``train_sana_sprint_diffusers.py`` recipe, with ``largest_timestep_prob`` 0.5): a second student pass at fresh
    levels drawn as the sCM term's, each replaced by the student's first sampling level (Sana's t = pi / 2, pure
    noise; fastdiff's top is ``step_sigmas(student, 1)``) with probability ``largest_timestep_prob``, on fresh noise;
    so half the adversarial signal is on the one-step sample the student is used for. In the critic phase the same:
    the sCM levels, the top with that probability, fresh noise. ``largest_timestep_prob`` 0 is Sana's flag off: the
    estimate from the sCM term's own forward (no second pass).

    Args (beyond :class:`~fastdiff.objectives.scm.ContinuousConsistency`'s):
        ladd_weight: the adversarial term's weight (Sana: ``adv_lambda`` 0.5 with ``scm_lambda`` 1).
        largest_timestep_prob: probability of the student's top level for the adversarial estimate (Sana: 0.5).
        head_every, disc_p_mean, disc_p_std, adversarial_loss, critic_updates: as :class:`LADD` (Sana's -0.6, 1.0).

    The sCM term is fastdiff's ``scm`` (tangent normalised by its RMS + c, as sCM-mnist and FastGen); Sana's
    ``train_scm_ladd.py`` divides by the tangent's L2 norm + c, which shrinks the normalised tangent by sqrt(D) for
    D elements per sample (README parity table).
    """

    def __init__(self, teacher: Denoiser, fake, student: Denoiser, gan_head=None, ladd_weight: float = 0.5,
                 largest_timestep_prob: float = 0.5, head_every: int = 1, disc_p_mean: float = -0.6, disc_p_std: float = 1.0,
                 adversarial_loss: str = "hinge", critic_updates: int = 1, tangent: str = "auto",
                 tangent_warmup: int = 10_000, tangent_norm: float = 0.1, fd_step: float = 3e-4, p_mean: float = -1.0,
                 p_std: float = 1.4, guidance_range: list[float] | None = None, prior_weighting: bool = True,
                 adaptive_weighting: bool = True, sigma_max: float | None = None):
        # sCM's options, spelled out: the registry reads config keys from this signature.
        super().__init__(teacher, fake, student, None, tangent, tangent_warmup, tangent_norm, fd_step, p_mean, p_std,
                         guidance_range, prior_weighting, adaptive_weighting, sigma_max)
        if ladd_weight < 0 or critic_updates < 1:
            raise FastdiffError("objective.ladd_weight must be >= 0 and critic_updates >= 1")
        if not 0 <= largest_timestep_prob <= 1:
            raise FastdiffError(f"objective.largest_timestep_prob must be in [0, 1], got {largest_timestep_prob}")
        self.ladd_weight = ladd_weight
        self.largest_timestep_prob = largest_timestep_prob
        self.critic_updates = critic_updates
        self.adversary = Adversary(teacher, head_every, disc_p_mean, disc_p_std, adversarial_loss)
        self._kept_F = None

    def train_defaults(self) -> dict:
        """sCM's optimizer, with the heads at LADD's ``HEAD_LR``: at the trainer's 1e-5 they stayed at chance here too
        (loss_ladd_d 1.036 -> 1.011 over the CPU ladder's 100 updates on the embedded teacher); Sana's clip 0.1."""
        return {**super().train_defaults(), **HEAD_TRAIN}

    def critic_modules(self) -> list[nn.Module]:
        return [self.adversary.disc.heads]

    def state_modules(self) -> dict[str, nn.Module]:
        return {**super().state_modules(), "ladd_heads": self.adversary.disc.heads}

    def F(self, x_t, t, cond):
        out = super().F(x_t, t, cond)
        if torch.is_grad_enabled() and out.requires_grad:  # the sCM term's own pass (JVPs run without a graph)
            self._kept_F = out
        return out

    def adversarial_estimate(self, x, t_scm, student_cond):
        """The student's x0 estimate of fresh noised copies of x (Sana's ``train_largest_timestep``): levels drawn
        as the sCM term's (``t_scm``: the critic phase passes its draw), the student's top level with probability
        ``largest_timestep_prob``; from the native input, so a flow student's top (pure noise) needs no division."""
        sigma = SIGMA_DATA * torch.tan(t_scm.double())
        top = step_sigmas(self.student, 1, self.sigma_max).to(x.device, torch.float64)[0]
        sigma = torch.where(torch.rand(x.shape[0], device=x.device) < self.largest_timestep_prob, top, sigma)
        schedule = self.student.schedule
        x_native = expand(schedule.alpha(sigma), x) * x + expand(schedule.noise_scale(sigma), x) * torch.randn_like(x)
        return self.student.denoise_native(x_native.float(), sigma.float(), student_cond).float()

    def generator_loss(self, x, cond=None, real=None):
        x = x.detach().float()
        t = self.sample_time(x.shape[0], x.device)
        x_t = expand(torch.cos(t), x) * x + expand(torch.sin(t), x) * SIGMA_DATA * torch.randn_like(x)
        scale, student_cond = self.guidance.draw(x.shape[0], cond, x.device)
        self._kept_F = None
        per_sample, rms = self.loss_at(x_t, t, cond, scale, student_cond)
        scm = finite_mean(self.weighted(per_sample, t))
        F_theta, self._kept_F = self._kept_F, None
        if self.largest_timestep_prob > 0:  # a second pass (Sana's train_largest_timestep)
            x0 = self.adversarial_estimate(x, self.sample_time(x.shape[0], x.device), student_cond)
        else:  # the sCM term's own forward
            x0 = expand(torch.cos(t), x) * x_t - expand(torch.sin(t), x) * SIGMA_DATA * F_theta
        adv = self.adversary.generator_loss(x0, cond)
        logs = {"loss_scm": scm.detach(), "loss_scm_unweighted": finite_mean(per_sample.detach()),
                "tangent_rms": rms.mean().detach(), "loss_ladd_g": adv.detach()}
        return scm + self.ladd_weight * adv, logs

    def critic_loss(self, x, cond=None, real=None):
        """Fake: the student's x0 estimate at a noised copy of the data batch x; real: x itself (Sana's phase D)."""
        x = x.detach().float()
        t = self.sample_time(x.shape[0], x.device)
        _, student_cond = self.guidance.draw(x.shape[0], cond, x.device)
        with torch.no_grad():
            if self.largest_timestep_prob > 0:
                x0 = self.adversarial_estimate(x, t, student_cond)
            else:
                cos, sin = expand(torch.cos(t), x), expand(torch.sin(t), x)
                x_t = cos * x + sin * SIGMA_DATA * torch.randn_like(x)
                x0 = self.student(x_t / cos, SIGMA_DATA * torch.tan(t), student_cond)
        loss = self.adversary.critic_loss(x0, x, cond, cond)
        return loss, {"loss_ladd_d": loss.detach()}


register("ladd", LADD)
register("scm-ladd", SCMLADD)
