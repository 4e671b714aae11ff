"""Sana teachers (diffusers' ``SanaPipeline``): what sets them apart from the other text-to-image families.

- Prompts: Gemma2's last hidden states and attention mask, from the pipeline's own ``encode_prompt`` called with the
  values its ``__call__`` uses (the "complex human instruction" prefixed to the positive prompt only, then the first
  and last 299 tokens kept; captions lower-cased, not cleaned; 300 tokens). They are read from the ``__call__``
  signature, so fastdiff feeds the student exactly what the exported pipeline will.
- Schedule: the Sana folders on the hub ship ``DPMSolverMultistepScheduler`` with ``prediction_type="flow_prediction"``,
  ``use_flow_sigmas=True`` and ``flow_shift``: rectified flow ``x_t = (1 - t) x0 + t eps``, velocity prediction, the
  network fed ``t * T`` (times the transformer's ``timestep_scale``, as the pipeline does). Some ship
  ``FlowMatchEulerDiscreteScheduler``, which fastdiff reads like SD3's.
- Latents: ``AutoencoderDC`` (deterministic encoder, ``scaling_factor``, no shift; ``latent.py``).
- Export: ``FlowMatchEulerDiscreteScheduler`` (``inference/schedulers.py: flow_scheduler``). DPMSolver's flow sigmas for K
  steps start at the shifted ``1 - 1/T``, never at t = 1 where the student starts, and it cannot re-noise with fresh
  noise; the Euler scheduler with shift 1 and ``shift_terminal = 1/K`` gives the student's levels ``1 - i/K`` exactly.
"""
from __future__ import annotations

import inspect

from ..errors import FastdiffError

# Resolution bins of SanaPipeline (transformer sample sizes it bins for; other sizes need use_resolution_binning=False).
BINNED_SAMPLE_SIZES = (16, 32, 64, 128)


def prompt_kwargs(pipe) -> dict:
    """``encode_prompt`` keywords as ``SanaPipeline.__call__`` passes them by default."""
    params = inspect.signature(type(pipe).__call__).parameters
    return {k: params[k].default for k in ("clean_caption", "max_sequence_length", "complex_human_instruction")}


def flow_shift(scheduler) -> float | None:
    """The shift of a DPMSolverMultistepScheduler set up for flow matching (None for other schedulers).

    DPMSolver calls it ``flow_shift`` (FlowMatch schedulers: ``shift``); without ``use_flow_sigmas`` its sigmas would
    come from a DDPM beta table the flow network was never trained on, so that configuration is refused."""
    cfg = scheduler.config
    if getattr(cfg, "prediction_type", None) != "flow_prediction":
        return None
    if not getattr(cfg, "use_flow_sigmas", False):
        raise FastdiffError(f"{type(scheduler).__name__} with prediction_type flow_prediction needs use_flow_sigmas=True "
                            "(as Sana's scheduler config sets it)")
    return float(getattr(cfg, "flow_shift", None) or 1.0)


def call_args(transformer, vae_scale_factor: int) -> str:
    """The keywords the exported card's SanaPipeline call needs: the student's own image size (the pipeline's
    default is 1024 px whatever the model), and no resolution binning for sample sizes Sana has no bins for."""
    size = transformer.config.sample_size * vae_scale_factor
    binning = "" if transformer.config.sample_size in BINNED_SAMPLE_SIZES else ", use_resolution_binning=False"
    return f", height={size}, width={size}{binning}"
