"""PSO: pairwise sample optimisation, the loss that tunes an already distilled few-step student.

Miao et al. 2024, "Tuning Timestep-Distilled Diffusion Model Using Pairwise Sample Optimization" (arXiv 2410.03190,
ICLR 2025), Sec. 3. A target image ``x0+`` (the data the student is tuned toward: a style, a concept, preferred
images) is paired with a reference image ``x0-`` sampled from the student itself under the same condition ``c``. The
student's few-step sampler is an MDP over its own K noise levels; each step's policy is a Gaussian around the
re-noised x0 estimate, so a step's log-likelihood is, up to constants, minus the denoising error at that level. With
the frozen initial student ``theta_0`` as the reference policy, a Bradley-Terry model on the two samples' likelihood
ratios gives (one level ``k ~ U{1..K}`` and one noise ``eps`` shared by the pair, as Diffusion-DPO shares them):

    x_k(x0)        = a_k x0 + s_k eps                                     (the student's native input at level k)
    l_theta(x0)    = w_k * mean |D_theta(x_k(x0), sigma_k, c) - x0|^2     (the network's own denoising loss)
    Delta_theta(x0) = l_theta(x0) - l_theta0(x0)                          (relative to the frozen initial student)
    L_PSO(theta)   = - E log sigmoid( -beta/2 * [ Delta_theta(x0+) - Delta_theta(x0-) ] )

``w_k`` (``Denoiser.loss_weight``) turns the x0 error into the error of what the network predicts: ``|eps -
eps_hat|^2`` for epsilon students (``w = 1 / sigma^2``), ``v`` for v-prediction ones, the velocity for flow students
(``1 / t^2``, 1 at t = 1 where the first flow level is pure noise); so on an epsilon student the loss is Diffusion-DPO's
exactly, restricted to the student's own levels. Minimising it raises the likelihood of the targets relative to the
student's own samples, measured against where the student started, which is what keeps its few-step ability: the
reference samples pin down what it already does. At theta = theta_0 the gradient is ``beta/4`` times that of
``l(x0+) - l(x0-)``: denoise toward the targets, away from the current samples.

Offline PSO draws ``x0-`` from the frozen initial student; online PSO from the current one (both are the paper's;
``training/tune.py`` runs either). Reference code: the PSO authors' code is not public (no repository of theirs holds
it); the loss is transcribed from the Diffusion-DPO reference that PSO generalises, SalesforceAIResearch/DiffusionDPO
``train.py`` (``model_diff - ref_diff`` of the per-sample MSEs, ``scale_term = -0.5 * beta_dpo``, ``-logsigmoid``;
shared noise and timestep per pair; its SDXL-Turbo branch already trains on the distilled model's 4 timesteps only).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models.denoiser import Denoiser, expand


def pair_losses(student_errors: torch.Tensor, reference_errors: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-pair PSO losses from per-sample denoising errors laid out ``[targets; references]`` (2N,) for the student
    and for the frozen reference network: ``-logsigmoid(-beta/2 (Delta(x0+) - Delta(x0-)))``, shape (N,)."""
    delta = student_errors - reference_errors  # Delta_theta: the student's error relative to its start
    delta_target, delta_reference = delta.chunk(2)
    return -F.logsigmoid(-0.5 * beta * (delta_target - delta_reference))


def denoising_errors(denoiser: Denoiser, x0: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor,
                     cond: dict | None = None) -> torch.Tensor:
    """``w(sigma) * mean |D(a x0 + s eps, sigma) - x0|^2`` per sample: the network's own denoising loss at the given
    levels (sigma (B,), possibly infinite for a flow student's first level)."""
    schedule = denoiser.schedule
    x_native = expand(schedule.alpha(sigma), x0) * x0 + expand(schedule.noise_scale(sigma), x0) * noise
    x0_hat = denoiser.denoise_native(x_native, sigma, cond)
    # At sigma = inf (flow, t = 1) the velocity weight (1 + sigma)^2 / sigma^2 is its limit 1.
    weight = torch.where(torch.isinf(sigma), torch.ones_like(sigma), denoiser.loss_weight(sigma)).to(x0_hat)
    return weight * (x0_hat - x0).square().flatten(1).mean(1)


def pso_loss(student: Denoiser, reference: Denoiser, x_target: torch.Tensor, x_reference: torch.Tensor,
             sigma: torch.Tensor, noise: torch.Tensor, cond: dict | None = None, beta: float = 5000.0):
    """(loss, logs): the mean PSO loss of N (target, reference) pairs at levels ``sigma`` (N,) with noise ``noise``
    (shared by each pair); ``cond`` is the pairs' common condition (N rows), or None. Both pairs' halves go through
    each network in one batch, as Diffusion-DPO does; the frozen reference network runs without gradient."""
    x0 = torch.cat([x_target, x_reference])
    sigma2, noise2 = sigma.repeat(2), noise.repeat(2, *([1] * (noise.ndim - 1)))
    cond2 = None if cond is None else {k: _twice(v) for k, v in cond.items()}
    errors = denoising_errors(student, x0, sigma2, noise2, cond2)
    with torch.no_grad():
        ref_errors = denoising_errors(reference, x0, sigma2, noise2, cond2)
    losses = pair_losses(errors, ref_errors, beta)
    target_err, reference_err = errors.detach().chunk(2)
    delta_target, delta_reference = (errors.detach() - ref_errors).chunk(2)
    margin = delta_reference - delta_target  # > 0: the targets gained on the references since the start
    logs = {"loss_pso": losses.mean().detach(), "pso_margin": margin.mean(),
            "pso_implicit_acc": (margin > 0).float().mean(), "mse_target": target_err.mean(),
            "mse_reference": reference_err.mean()}
    return losses.mean(), logs


def _twice(value):
    """A condition entry for the [targets; references] batch (tensors repeated on the batch axis)."""
    if isinstance(value, dict):
        return {k: _twice(v) for k, v in value.items()}
    return torch.cat([value, value]) if torch.is_tensor(value) and value.ndim > 0 else value
