"""FADA: multi-CFG distillation with mixed supervision (Zhong et al., "FADA: Fast Diffusion Avatar Synthesis with
Mixed-Supervised Multi-CFG Distillation", CVPR 2025, arXiv 2412.16915). No code is public (searched: no repository,
the project page fadavatar.github.io has demos only), and the method section's equations could not be retrieved
here, so this file is written from the paper's abstract and summary plus the standard nested multi-condition CFG;
every formula below is ours and says where it comes from.

The teacher has two conditions (FADA: a reference image and audio; here a class label and a text embedding, the
layout of ``pipelines.pipeline_fastdiff_multi_guidance``) and samples with nested CFG, three passes a step ("the
threefold inference runs caused by multi-CFG", FADA's abstract), in InstructPix2Pix's form (Brooks et al. 2023,
Eq. 3; reference code timothybrooks/instruct-pix2pix ``edit_cli.py``, ``CFGDenoiser.forward``: the image condition
guided first, the text second), here with the class guided first by default:
    eps = eps(0, 0) + s_c (eps(c, 0) - eps(0, 0)) + s_t (eps(c, t) - eps(c, 0))          (guidance_order class_first)
    eps = eps(0, 0) + s_t (eps(0, t) - eps(0, 0)) + s_c (eps(c, t) - eps(0, t))          (text_first)
FADA distils this into one pass whose scales are inputs ("multi-CFG distillation with learnable tokens"): here each
condition's scale gets its own learnable embedding, the LCM-style sinusoidal embedding of ``s - 1`` (Luo et al. 2023,
Sec. 4.2) through a zero-initialised projection added to the timestep embedding (diffusers' ``time_cond_proj_dim``,
the two embeddings side by side, ``scales_embedding``). FADA's tokens enter its network as tokens; ours enter where
diffusers' UNet2DConditionModel already takes a guidance embedding, so the student exports as a stock diffusers model.

Everything else is AGD's machinery (``objectives.agd``): LoRA adapters (B = 0) on the frozen student copy plus the
zero scale projection, so the student starts as the teacher's fully conditional prediction exactly; the loss is the
teacher's prediction-space MSE (``Denoiser.loss_weight``; CFG is affine in the prediction with weights summing to 1,
so combining x0 estimates equals combining eps or v). One (s_c, s_t) per sample, uniform in the two ranges.

Mixed supervision (FADA's "mixed-supervised loss ... to leverage data of varying quality"; the paper distils on a
broad moderate-quality set next to the high-quality data its teacher saw): the training points are real images
noised at a level uniform on the teacher's table, and each sample i adds a ground-truth term weighted by its
quality tier's weight lambda_i:
    L_i = w(sigma) [ |D_s(x_i; c, s) - D_cfg(x_i; c, s)|^2 + lambda_i |D_s(x_i; c, 1, 1) - x0_i|^2 ]
The ground-truth term reads the student at s = (1, 1) (the unguided conditional prediction, whose data target is
the clean image; a guided prediction has none), so lambda_i > 0 costs one more student pass. lambda comes per sample
from the data (``cond["sample_weight"]``, ``training.data.tier_sample_weights``) or else is ``data_weight`` for
all; lambda = 0 is pure distillation. FADA balances its terms adaptively; fixed tier weights are ours.
"""
from __future__ import annotations

import copy

import torch

from ..models.denoiser import Denoiser, expand
from ..models.guidance import with_guidance_embedding
from ..models.lora import merged_model
from .agd import AGD_OPTIMIZER, attach_adapters
from .base import Objective, finite_mean, noised, per_sample_mean
from .registry import register

CLASS_KEY = "class_labels"
WEIGHT_KEY = "sample_weight"  # per-sample ground-truth weight in a condition dict; never passed to a network
SCALE_DIM = 256  # per scale: the student's time_cond_proj_dim is twice this


def fada_student(teacher: Denoiser, dim: int = 2 * SCALE_DIM) -> Denoiser:
    """The student: a copy of the teacher's UNet2DConditionModel with ``time_cond_proj_dim = dim`` (both scale
    embeddings, zero projection: it starts as the teacher)."""
    return Denoiser(with_guidance_embedding(copy.deepcopy(teacher.model), dim), teacher.schedule,
                    teacher.prediction_type, teacher.null_class)


def check_range(name: str, r) -> tuple[float, float]:
    if r is None or len(r) != 2 or not 1.0 <= float(r[0]) <= float(r[1]):
        raise ValueError(f"objective.{name} must be [lo, hi] with 1 <= lo <= hi, got {r}")
    return float(r[0]), float(r[1])


def split_conditions(teacher: Denoiser, cond: dict, class_first: bool) -> tuple[dict, dict, dict]:
    """(null, first-guided only, both): the three conditions of nested CFG. The class condition is ``class_labels``
    (null: the teacher's null class); the text condition is every other key (null: its ``uncond_`` entry)."""
    full = {k: v for k, v in cond.items() if not k.startswith("uncond_") and k != WEIGHT_KEY}
    if CLASS_KEY not in full or len(full) < 2:
        raise ValueError("objective fada needs two conditions: class_labels and a text condition "
                         f"(encoder_hidden_states with uncond_encoder_hidden_states); got {sorted(full)}")
    null = teacher.null_cond({k: v for k, v in cond.items() if k != WEIGHT_KEY}, len(full[CLASS_KEY]))
    first = {k: (v if (k == CLASS_KEY) == class_first else null[k]) for k, v in full.items()}
    return null, first, full


def _cat(conds: list[dict]) -> dict:
    out = {}
    for key, value in conds[0].items():
        out[key] = _cat([c[key] for c in conds]) if isinstance(value, dict) else torch.cat([c[key] for c in conds])
    return out


def pipeline_rules():
    """The exported pipeline's module, whose rules the student trains to (guidance orders, nested CFG, the scales'
    embedding): imported on first use, as it brings diffusers and config checks import every objective."""
    from fastdiff.pipelines import pipeline_fastdiff_multi_guidance

    return pipeline_fastdiff_multi_guidance


def multi_cfg(teacher: Denoiser, x_native: torch.Tensor, sigma: torch.Tensor, cond: dict, class_scale: torch.Tensor,
              text_scale: torch.Tensor, class_first: bool = True) -> torch.Tensor:
    """The teacher's nested two-condition CFG as an x0 estimate: its three passes as one batch of 3B."""
    null, first, full = split_conditions(teacher, cond, class_first)
    n = x_native.shape[0]
    x0 = teacher.denoise_native(torch.cat([x_native] * 3), torch.cat([sigma.expand(n)] * 3),
                                _cat([null, first, full]), 1.0)
    s_first, s_second = (class_scale, text_scale) if class_first else (text_scale, class_scale)
    uncond, only_first, both = x0.chunk(3)
    return pipeline_rules().nested_guidance(uncond, only_first, both, expand(s_first, x0), expand(s_second, x0))


def scales_condition(cond: dict, class_scale: torch.Tensor, text_scale: torch.Tensor, dim: int, device) -> dict:
    """The student's condition: the conditions (no ``uncond_`` entries) plus both scales' embedding (computed on the
    scales' device, as the pipeline does, then moved)."""
    kept = {k: v for k, v in cond.items() if not k.startswith("uncond_") and k != WEIGHT_KEY}
    return {**kept, "timestep_cond": pipeline_rules().scales_embedding(class_scale, text_scale, dim).to(device)}


class MultiGuidanceDistillation(Objective):
    """Args:
        teacher: the frozen two-condition teacher Denoiser (class labels with its null class, and text).
        student: a copy of the teacher with a two-scale embedding (``fada_student``); adapters are attached here.
        class_guidance_range, text_guidance_range: [lo, hi] of each condition's scale, drawn uniformly per sample.
        guidance_order: ``class_first`` or ``text_first``: which condition the nested CFG guides first.
        adapter_rank: LoRA rank of the adapters (AGD's).
        data_weight: lambda of the ground-truth term for samples whose data carry no tier weight (0: distil only).
    """

    trains_on = "data"
    uses_fake_score = False

    def __init__(self, teacher: Denoiser, fake, student: Denoiser, gan_head=None,
                 class_guidance_range: list[float] | None = None, text_guidance_range: list[float] | None = None,
                 guidance_order: str = "class_first", adapter_rank: int = 8, data_weight: float = 0.0):
        super().__init__(teacher, None, 0, None)
        self.class_range = check_range("class_guidance_range", class_guidance_range)
        self.text_range = check_range("text_guidance_range", text_guidance_range)
        orders = pipeline_rules().GUIDANCE_ORDERS
        if guidance_order not in orders:
            raise ValueError(f"objective.guidance_order must be one of {orders}, got {guidance_order!r}")
        if adapter_rank < 1 or data_weight < 0:
            raise ValueError("objective.adapter_rank must be positive and objective.data_weight non-negative")
        if teacher.null_class is None:
            raise ValueError("objective fada needs the teacher's null class (teacher.null_class)")
        self.embed_dim = getattr(getattr(student.model, "config", None), "time_cond_proj_dim", None)
        if not self.embed_dim:
            raise ValueError("objective fada needs a student with a two-scale embedding (fada_student: "
                             "time_cond_proj_dim)")
        self.class_first = guidance_order == "class_first"
        self.student = student
        self.data_weight = data_weight
        attach_adapters(student.model, adapter_rank)
        self.teacher.requires_grad_(False)

    def train_defaults(self) -> dict:
        """AGD's (its reference's optimiser): AdamW lr 1e-4, no weight decay, 500 warm-up steps, no EMA."""
        return dict(AGD_OPTIMIZER)

    def state_modules(self) -> dict[str, torch.nn.Module]:
        """The scale projection (a LoRA checkpoint keeps only ``lora_`` weights)."""
        return {"fada_scale_embedding": self.student.model.time_embedding.cond_proj}

    def draw_scales(self, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        (c_lo, c_hi), (t_lo, t_hi) = self.class_range, self.text_range
        class_scale = c_lo + (c_hi - c_lo) * torch.rand(n, device=device)
        return class_scale, t_lo + (t_hi - t_lo) * torch.rand(n, device=device)

    def student_condition(self, cond: dict, n: int, class_scale: float | None = None,
                          text_scale: float | None = None) -> dict:
        """The student's condition for sampling at fixed scales (default: the middle of each range), e.g. the
        trainer's sample grid."""
        device = cond["class_labels"].device
        scales = [torch.full((n,), sum(r) / 2 if s is None else s) for s, r in
                  ((class_scale, self.class_range), (text_scale, self.text_range))]
        return scales_condition(cond, *scales, self.embed_dim, device)

    def student_pass(self, z, sigma, cond, class_scale, text_scale) -> torch.Tensor:
        return self.student.denoise_native(z, sigma, scales_condition(cond, class_scale, text_scale, self.embed_dim,
                                                                      z.device))

    def loss_at(self, z: torch.Tensor, sigma: torch.Tensor, cond: dict, class_scale: torch.Tensor,
                text_scale: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        """Per-sample distillation loss at native inputs z: prediction-space MSE between one student pass told both
        scales and the teacher's nested CFG at those scales (``target``, else computed here; no gradient)."""
        if target is None:
            with torch.no_grad():
                target = multi_cfg(self.teacher, z, sigma, cond, class_scale, text_scale, self.class_first)
        pred = self.student_pass(z, sigma, cond, class_scale, text_scale)
        return self.teacher.loss_weight(sigma) * per_sample_mean((pred - target.detach()) ** 2)

    def data_loss_at(self, z: torch.Tensor, sigma: torch.Tensor, cond: dict, x0: torch.Tensor) -> torch.Tensor:
        """Per-sample ground-truth loss: the student at s = (1, 1) against the clean image, in the same units."""
        ones = torch.ones(z.shape[0], device=z.device)
        pred = self.student_pass(z, sigma, cond, ones, ones)
        return self.teacher.loss_weight(sigma) * per_sample_mean((pred - x0) ** 2)

    def generator_loss(self, x, cond=None, real=None):
        if not cond:
            raise ValueError("objective fada needs conditioned data (class labels and text)")
        weight = cond.get(WEIGHT_KEY)
        weight = (torch.full((x.shape[0],), self.data_weight, device=x.device) if weight is None
                  else weight.to(x.device).float())
        x_t, sigma = noised(x, self.teacher.schedule, 0.0, 1.0, self.sigma_grid)
        z = x_t * expand(self.teacher.schedule.alpha(sigma), x_t)
        class_scale, text_scale = self.draw_scales(x.shape[0], x.device)
        distill = self.loss_at(z, sigma, cond, class_scale, text_scale)
        logs = {"loss_fada_cfg": distill.detach().mean()}
        per_sample = distill
        if bool((weight > 0).any()):
            data = self.data_loss_at(z, sigma, cond, x)
            per_sample = distill + weight * data
            logs["loss_fada_data"] = data.detach().mean()
        loss = finite_mean(per_sample)
        return loss, {**logs, "loss_fada": loss.detach()}


def export_multi_guidance(student_model: torch.nn.Module, scheduler, out, guidance_order: str = "class_first"):
    """Save the student (adapters merged into its weights) as a :class:`FastdiffMultiGuidancePipeline` folder with
    ``scheduler`` (e.g. the teacher's DDIMScheduler); returns the folder."""
    pipe = pipeline_rules().FastdiffMultiGuidancePipeline(unet=merged_model(student_model), scheduler=scheduler,
                                                           guidance_order=guidance_order)
    pipe.save_pretrained(out)
    return out


register("fada", MultiGuidanceDistillation)

__all__ = ["MultiGuidanceDistillation", "export_multi_guidance", "fada_student", "multi_cfg"]
