"""Reward feedback learning (ReFL) on a student's own samples: Hyper-SD's human-feedback stage (Ren et al. 2024,
arXiv 2404.13686, Sec. 3.2) on ReFL (Xu et al. 2023, "ImageReward", reference code THUDM/ImageReward
``ImageReward/ReFL.py``).

ReFL (``ReFL.py`` ``Trainer.train``): sample with the model being tuned, without gradient, through a 40-step DDPM
schedule up to a step drawn uniformly from 30..39 (the last quarter of the trajectory), predict x0 there with
gradient, decode it through the VAE, map it to [0, 1] (``image / 2 + 0.5``, clamped), resize and normalise it as CLIP
does, score it with the reward model r (ImageReward) and minimise

    L_ReFL = grad_scale * mean_i relu(margin - r_i),   margin 2, grad_scale 1e-3 (ReFL.py's defaults).

Hyper-SD applies this to the accelerated student: a hinge ``relu(alpha_d - r_d)`` per reward model d (the LAION
aesthetic predictor and ImageReward), summed, plus a structure term: the distance between an instance-segmentation
model's (SOLO) outputs on a real image and on the student's x0 prediction from that image noised.

What is built here: one reward (``objective.reward``: ``clip``, open_clip image-text cosine with a fixed prompt,
weights from a local file only; or a user function ``module:function`` taking (images in [-1, 1], cond) and returning
one reward per image), the hinge with one margin
(``reward_margin``, ReFL's 2) and ReFL's weight (``reward_weight`` = ReFL's ``grad_scale``; 0, the default, is off and
builds nothing). The sample is the student's own K-step deterministic (DDIM) walk, K the segment count of the current
Hyper-SD stage, stopped at a step drawn from the last quarter as ReFL (``late_step``: 30..39 for K = 40, the last step
for K <= 4), x0 taken there with gradient; latent teachers' x0 is decoded through the VAE with gradient.
Not built: the aesthetic predictor, ImageReward or SOLO themselves (no weights here; a user function can wrap one),
a hinge per reward model summed (a function returning a sum of rewards has one hinge over the sum), nor the
segmentation structure term (it needs a real image per sample). ReFL.py feeds its graded UNet call the step
index (30..39) as the timestep; here the network sees the level the sample is at.
"""
from __future__ import annotations

import importlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..models.denoiser import Denoiser
from ..models.generator import Generator

REFL_MARGIN = 2.0  # ReFL.py: relu(-rewards + 2)
LATE_FRACTION = 0.75  # ReFL.py: the graded step is drawn from randint(30, 39) of 40, the last quarter
DEFAULT_CLIP_MODEL = "ViT-B-32"


def refl_loss(rewards: torch.Tensor, margin: float = REFL_MARGIN, weight: float = 1.0) -> torch.Tensor:
    """ReFL's loss ``weight * mean relu(margin - r)`` over the samples whose reward is finite."""
    ok = torch.isfinite(rewards.detach())
    hinge = torch.where(ok, F.relu(margin - rewards), torch.zeros_like(rewards))
    return weight * hinge.sum() / ok.sum().clamp(min=1)


def late_step(num_steps: int) -> int:
    """A step of a K-step trajectory drawn uniformly from its last quarter, ``floor(3K / 4) .. K - 1`` (ReFL's 30..39
    of 40); a CPU draw from the global stream."""
    first = int(LATE_FRACTION * num_steps)
    return int(torch.randint(first, num_steps, (1,)).item())


def prediction_at(sampler: Generator, z: torch.Tensor, cond, step: int) -> torch.Tensor:
    """The sampler's x0 estimate at ``step`` (0-based) from native noise z: the earlier steps without gradient, as
    at inference (ReFL's ``torch.no_grad`` loop), the graded prediction with it."""
    sigmas, x_native = sampler.sigmas, z
    with torch.no_grad():
        for i in range(step):
            x0 = sampler.denoiser.denoise_native(x_native, sigmas[i], cond)
            x_native = sampler.next_input(x_native, x0, sigmas[i], sigmas[i + 1], lambda: torch.randn_like(z))
    return sampler.denoiser.denoise_native(x_native, sigmas[step], cond)


def decode_with_grad(latents, x: torch.Tensor) -> torch.Tensor:
    """Latents -> images in [-1, 1] through the VAE with gradient (``models.latent.Latents.decode`` is no-grad);
    the same scale and shift. The VAE joins the latents' device the first time (the run parks it on the CPU)."""
    vae = latents.vae
    if vae.device != x.device:
        vae.to(x.device)
    z = x.to(vae.dtype) / latents.scale + latents.shift
    return vae.decode(z, return_dict=False)[0].float()


class ClipReward(nn.Module):
    """open_clip image-text cosine of images in [-1, 1] against one fixed prompt, differentiable in the images.

    Preprocessing as ReFL.py's: ``x / 2 + 0.5`` clamped to [0, 1], bicubic resize of the short side to the model's size
    (antialiased), centre crop, the model's mean and std; grey images repeat to 3 channels. ``model``: an open_clip
    name, or a JSON config file (its name is the file's stem); ``weights``: a local file, never a download.
    """

    def __init__(self, model: str | None, weights: str | None, prompt: str | None):
        super().__init__()
        import open_clip

        model = model or DEFAULT_CLIP_MODEL
        if model.endswith(".json"):
            if not Path(model).is_file():
                raise ValueError(f"objective.reward_clip_model {model}: no such file")
            open_clip.add_model_config(model)
            model = Path(model).stem
        if model not in open_clip.list_models():
            raise ValueError(f"objective.reward_clip_model: unknown open_clip model {model!r} (a name such as "
                             "ViT-B-32, or a JSON config file)")
        if not weights or not Path(weights).is_file():
            raise ValueError(f"objective.reward clip needs objective.reward_path, a local weights file (got {weights})")
        try:
            if not weights.endswith(".safetensors"):  # refuse pickled code before open_clip sees the file
                torch.load(weights, map_location="cpu", weights_only=True)
            self.model = open_clip.create_model(model, pretrained=weights, weights_only=True)
        except Exception as exc:  # noqa: BLE001 - a bad file becomes one line
            raise ValueError(f"objective.reward_path {weights}: cannot load CLIP {model}: "
                             f"{str(exc).splitlines()[0][:200]}") from None
        self.model.eval().requires_grad_(False)
        cfg = self.model.visual.preprocess_cfg
        self.size = cfg["size"] if isinstance(cfg["size"], int) else cfg["size"][0]
        self.register_buffer("mean", torch.tensor(cfg["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg["std"]).view(1, 3, 1, 1), persistent=False)
        with torch.no_grad():
            text = self.model.encode_text(open_clip.get_tokenizer(model)([prompt or ""])).float()
        self.register_buffer("text", F.normalize(text, dim=-1), persistent=False)

    def train(self, mode: bool = True):
        return super().train(False)  # a frozen scorer: no dropout whatever the trainer's mode

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float() / 2 + 0.5).clamp(0, 1)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        h, w = x.shape[-2:]
        if min(h, w) != self.size:
            scale = self.size / min(h, w)
            size = (max(self.size, int(h * scale)), max(self.size, int(w * scale)))
            x = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False)
        top, left = (x.shape[-2] - self.size + 1) // 2, (x.shape[-1] - self.size + 1) // 2
        x = x[..., top:top + self.size, left:left + self.size]
        return (x - self.mean) / self.std

    def forward(self, images: torch.Tensor, cond=None) -> torch.Tensor:
        features = F.normalize(self.model.encode_image(self.preprocess(images)).float(), dim=-1)
        return features @ self.text[0]


def load_reward(spec: str, path: str | None = None, clip_model: str | None = None, prompt: str | None = None):
    """``clip`` (:class:`ClipReward`) or ``module:function``: a function imported from an installed module or one on
    ``sys.path``, called as ``f(images, cond)`` with images in [-1, 1] (decoded for latent teachers, not clamped),
    returning one reward per image."""
    if spec == "clip":
        return ClipReward(clip_model, path, prompt)
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ValueError(f"objective.reward must be clip or module:function, got {spec!r}")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"objective.reward {spec}: {exc}") from None
    if not callable(fn):
        raise ValueError(f"objective.reward {spec} is not callable")
    return fn


class RewardFeedback(nn.Module):
    """The ReFL term of a student that samples: ``weight * mean relu(margin - r(images))`` on the x0 prediction at a
    late step of the student's K-step deterministic walk. ``latents`` (a ``models.latent.Latents``, set by the trainer
    for latent teachers) decodes that prediction to images first."""

    def __init__(self, reward: str, weight: float, margin: float | None = None, path: str | None = None,
                 clip_model: str | None = None, prompt: str | None = None):
        super().__init__()
        self.score = load_reward(reward, path, clip_model, prompt)  # an nn.Module (clip) follows the objective's .to
        self.weight, self.margin = weight, REFL_MARGIN if margin is None else margin
        self.latents = None

    def images(self, x0: torch.Tensor) -> torch.Tensor:
        return x0.float() if self.latents is None else decode_with_grad(self.latents, x0)

    def loss(self, student: Denoiser, like: torch.Tensor, cond, num_steps: int, sigma_init: float | None):
        """(loss, logs) on ``like.shape[0]`` fresh samples of the student's ``num_steps``-step DDIM walk."""
        sampler = Generator(student, num_steps, sigma_init, "ddim").to(like.device)
        z = torch.randn_like(like, dtype=torch.float32)
        x0 = prediction_at(sampler, z, cond, late_step(num_steps))
        rewards = self.score(self.images(x0), cond).float().reshape(-1)
        loss = refl_loss(rewards, self.margin, self.weight)
        return loss, {"loss_refl": loss.detach(), "reward": rewards.detach().mean()}
