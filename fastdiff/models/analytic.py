"""The analytic teacher: a Gaussian mixture whose denoiser is exact at every noise level.

For data ``x0 ~ sum_k w_k N(mu_k, s_k^2 I)`` and ``x = x0 + sigma eps``:
``E[x0 | x] = sum_k r_k(x) (s_k^2 x + sigma^2 mu_k) / (s_k^2 + sigma^2)`` with ``r_k`` the posterior
responsibilities under ``N(mu_k, (s_k^2 + sigma^2) I)``. The model is a diffusers ``ModelMixin`` that
predicts x0 (``prediction_type="sample"``) from the native VP input, so it is saved, loaded and wrapped
exactly like a real teacher; its target distribution is known, so one-step students can be scored
against the truth (sliced Wasserstein-2, mode weights). Class-conditional variant: class k is mode k,
the last label is the null class (the whole mixture).
"""
from __future__ import annotations

import math

import torch
from diffusers import ConfigMixin, DDPMPipeline, DDPMScheduler, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from .schedule import VPSchedule


class GaussianMixtureModel(ModelMixin, ConfigMixin):
    """Exact x0-predictor of an isotropic Gaussian mixture over images of shape (C, H, W).

    Args:
        sample_size, in_channels: image shape (``in_channels x sample_size x sample_size``).
        weights, stds: per-mode weight and standard deviation (len = number of modes).
        mean_scale, seed: means are ``mean_scale * N(0, I)`` drawn with this seed, then fixed (saved).
        class_conditional: if true, ``class_labels`` k selects mode k; label ``num_modes`` is the null class.
        beta_* / num_train_timesteps: the DDPM table mapping timesteps to noise levels (as its scheduler).
    """

    @register_to_config
    def __init__(self, sample_size: int = 8, in_channels: int = 1, weights=(0.1, 0.2, 0.3, 0.4),
                 stds=(0.1, 0.15, 0.2, 0.1), mean_scale: float = 0.6, seed: int = 0,
                 class_conditional: bool = False, num_train_timesteps: int = 1000,
                 beta_start: float = 1e-4, beta_end: float = 0.02, beta_schedule: str = "linear"):
        super().__init__()
        if len(weights) != len(stds):
            raise ValueError("weights and stds need one entry per mode")
        dim = in_channels * sample_size * sample_size
        means = mean_scale * torch.randn(len(weights), dim, generator=torch.Generator().manual_seed(seed))
        # Parameters, not buffers: the teacher is frozen by load_teacher, and a trainable copy is a fake
        # score of exactly the teacher's family (how DMD2 and SiD initialise theirs from real teachers).
        self.means = torch.nn.Parameter(means)
        self.weight_logits = torch.nn.Parameter(torch.tensor(weights, dtype=torch.float64).log().float())
        self.log_stds = torch.nn.Parameter(torch.tensor(stds, dtype=torch.float64).log().float())
        self._schedule = VPSchedule(self.scheduler().alphas_cumprod)
        self.num_class_embeds = len(weights) + 1 if class_conditional else None
        # Features a GAN head reads (gan.py hooks ``mid_block``): per-mode log responsibilities and
        # squared distances per dimension, which see both mode weights and spreads.
        self.mid_block = torch.nn.Identity()
        self.bottleneck_channels = 2 * len(weights)

    @property
    def log_weights(self) -> torch.Tensor:
        return self.weight_logits.log_softmax(0)

    @property
    def variances(self) -> torch.Tensor:
        return (2 * self.log_stds).exp()

    @property
    def num_modes(self) -> int:
        return len(self.config.weights)

    def scheduler(self) -> DDPMScheduler:
        c = self.config
        return DDPMScheduler(num_train_timesteps=c.num_train_timesteps, beta_start=c.beta_start, beta_end=c.beta_end,
                             beta_schedule=c.beta_schedule, prediction_type="sample", clip_sample=False)

    def posterior_mean(self, x: torch.Tensor, sigma: torch.Tensor, class_labels=None) -> torch.Tensor:
        """E[x0 | x] for VE-scale x at noise level sigma (per sample), differentiable in x."""
        b = x.shape[0]
        flat = x.reshape(b, -1).float()
        var = sigma.float().reshape(b, 1) ** 2 + self.variances.reshape(1, -1)  # (B, K)
        d2 = torch.cdist(flat, self.means) ** 2
        logits = self._log_joint(flat, var, d2)
        if class_labels is not None:
            k = class_labels.reshape(b, 1)
            pick = torch.nn.functional.one_hot(k.clamp(max=self.num_modes - 1).squeeze(1), self.num_modes).bool()
            logits = torch.where((k < self.num_modes) & ~pick, torch.full_like(logits, -math.inf), logits)
        self.mid_block(torch.cat([logits.log_softmax(dim=1).clamp(min=-50), d2 / (var * flat.shape[1])], dim=1))
        r = logits.softmax(dim=1)  # (B, K)
        shrink = (self.variances / var)  # s_k^2 / (s_k^2 + sigma^2)
        x0 = (r * shrink).sum(1, keepdim=True) * flat + (r * (1 - shrink)) @ self.means
        return x0.reshape(x.shape)

    def forward(self, sample: torch.Tensor, timestep, class_labels=None, return_dict: bool = True):
        t = torch.as_tensor(timestep, device=sample.device, dtype=torch.float32).reshape(-1).expand(sample.shape[0])
        sigma = self._schedule.sigma_at(t)
        a = torch.rsqrt(1 + sigma.double() ** 2).float().reshape(-1, 1, 1, 1)
        x0 = self.posterior_mean(sample.float() / a, sigma, class_labels)
        return Transformer2DModelOutput(sample=x0) if return_dict else (x0,)

    @torch.no_grad()
    def sample_true(self, n: int, generator: torch.Generator | None = None, class_labels=None) -> torch.Tensor:
        """Exact samples of the mixture (of mode k for class label k)."""
        if class_labels is None:
            modes = torch.multinomial(self.log_weights.exp(), n, replacement=True, generator=generator)
        else:
            modes = torch.as_tensor(class_labels).reshape(-1)
        noise = torch.randn(n, self.means.shape[1], generator=generator)
        x = self.means[modes] + self.variances[modes].sqrt().reshape(-1, 1) * noise
        c, s = self.config.in_channels, self.config.sample_size
        return x.reshape(n, c, s, s)

    @torch.no_grad()
    def assign_modes(self, x: torch.Tensor) -> torch.Tensor:
        """Most likely mode of each clean sample."""
        return self.posterior_logits(x).argmax(dim=1)

    def posterior_logits(self, x: torch.Tensor) -> torch.Tensor:
        """log w_k + log N(x; mu_k, s_k^2 I) up to a constant, for clean samples."""
        return self._log_joint(x.reshape(x.shape[0], -1).float(), self.variances.reshape(1, -1))

    def _log_joint(self, flat: torch.Tensor, var: torch.Tensor, d2: torch.Tensor | None = None) -> torch.Tensor:
        """log w_k + log N(flat; mu_k, var_k I) up to a constant; var is (B or 1, K), d2 = |flat - mu_k|^2."""
        d2 = torch.cdist(flat, self.means) ** 2 if d2 is None else d2
        return self.log_weights - 0.5 * d2 / var - 0.5 * flat.shape[1] * var.log()

    @torch.no_grad()
    def mode_weights(self, x: torch.Tensor) -> torch.Tensor:
        return torch.bincount(self.assign_modes(x), minlength=self.num_modes).float() / x.shape[0]

    def save_teacher(self, path) -> None:
        """Write a DDPMPipeline-style folder (``unet/`` + ``scheduler/``) that ``load_teacher`` reads."""
        DDPMPipeline(unet=self, scheduler=self.scheduler()).save_pretrained(path)


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, num_projections: int = 512, seed: int = 0) -> float:
    """Sliced Wasserstein-2 between two equal-size sample sets: sqrt(mean over random directions of W2^2 in 1D)."""
    a, b = a.reshape(a.shape[0], -1).double(), b.reshape(b.shape[0], -1).double()
    if a.shape != b.shape:
        raise ValueError("sliced_wasserstein needs two sample sets of the same size and dimension")
    dirs = torch.randn(a.shape[1], num_projections, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    dirs /= dirs.norm(dim=0, keepdim=True)
    pa, _ = (a @ dirs).sort(dim=0)
    pb, _ = (b @ dirs).sort(dim=0)
    return float(((pa - pb) ** 2).mean().sqrt())
