"""The schedulers an exported student carries, configured so diffusers' pipelines step on fastdiff's levels.

VP students get diffusers' ``LCMScheduler`` configured so the pipeline reproduces fastdiff's K-step
sampler exactly: ``original_inference_steps = T`` gives the same K timesteps, ``clip_sample = False``
matches fastdiff (the pipeline clamps the final image anyway), and ``timestep_scaling`` is the one the
student was trained with: a consistency-distilled (cd) student's boundary scalings (LCM's k, 10 by
default), or, for every other student, a huge value that makes ``c_out = 1`` in float32 and ``c_skip`` about
1e-19 (``c_skip * x`` is below half an ulp of any x0 of size 1e-3 or more), so each step is the student's plain x0
estimate. Then re-noising with fresh noise, as in fastdiff.
The ``ddim`` sampler exports a trailing ``DDIMScheduler``; flow students ``FlowMatchEulerDiscreteScheduler``.
"""
from __future__ import annotations

from pathlib import Path

from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler, LCMScheduler


def _table_config(teacher_scheduler) -> dict:
    """The teacher scheduler's noise table (betas, prediction type), without its sampling options."""
    config = dict(teacher_scheduler.config)
    for key in ("clip_sample", "thresholding", "timestep_spacing", "variance_type", "steps_offset",
                "original_inference_steps", "timestep_scaling"):
        config.pop(key, None)
    return config


def _truncated_table_config(teacher_scheduler, top_timestep: int | None) -> dict:
    """The teacher's table; for a student starting at timestep t0 < T-1, its first t0 + 1 betas, so the table is
    the teacher's, truncated, and its top timestep is t0."""
    config = _table_config(teacher_scheduler)
    T = config["num_train_timesteps"]
    if top_timestep is not None and top_timestep < T - 1:
        T = top_timestep + 1
        config.update(num_train_timesteps=T, trained_betas=[float(b) for b in teacher_scheduler.betas[:T]])
    return config


def student_scheduler(teacher_scheduler, prediction_type: str, top_timestep: int | None = None,
                      timestep_scaling: float | None = None) -> LCMScheduler:
    """LCMScheduler reproducing fastdiff's K-step sampler, on the table truncated at the student's first timestep."""
    config = _truncated_table_config(teacher_scheduler, top_timestep)
    T = config["num_train_timesteps"]
    # steps_offset 1: unused by LCM and trailing DDIM, but SD pipelines rewrite (and warn about) any other value.
    return LCMScheduler.from_config(config, original_inference_steps=T, timestep_scaling=timestep_scaling or 1e9, steps_offset=1,
                                    clip_sample=False,
                                    thresholding=False, prediction_type=prediction_type)


def deterministic_scheduler(teacher_scheduler, prediction_type: str, top_timestep: int | None = None) -> DDIMScheduler:
    """DDIMScheduler (eta 0, trailing timesteps) reproducing the ``ddim`` sampler from the student's first timestep
    t0 (the table truncated there): its K timesteps equal the LCM rule's whenever K divides t0 + 1 (1, 2, 4, 5, 8, ...
    for 1000; consistency students on epsilon teachers start where t0 + 1 is a multiple of 8)."""
    config = _truncated_table_config(teacher_scheduler, top_timestep)
    return DDIMScheduler.from_config(config, timestep_spacing="trailing", clip_sample=False, thresholding=False, steps_offset=1,
                                     set_alpha_to_one=True, prediction_type=prediction_type)


def flow_scheduler(teacher_scheduler, num_steps: int, sampler: str) -> FlowMatchEulerDiscreteScheduler:
    """FlowMatchEulerDiscreteScheduler whose K levels are fastdiff's flow levels ``t_i = 1 - i/K``.

    With shift 1 the scheduler's K timesteps are ``linspace(1, 1/T, K)``; ``shift_terminal = 1/K`` stretches
    them so the last is 1/K, which makes them exactly ``1 - i/K``. One step is ``x0 = z - v`` at t = 1, the
    same arithmetic as fastdiff. ``lcm`` students re-noise with fresh noise (``stochastic_sampling``), ``ddim``
    ones take Euler steps, which equal fastdiff's deterministic re-noising algebraically."""
    extra = {"shift_terminal": 1.0 / num_steps} if num_steps > 1 else {"shift_terminal": None}
    return FlowMatchEulerDiscreteScheduler.from_config(
        teacher_scheduler.config, shift=1.0, use_dynamic_shifting=False, invert_sigmas=False, use_karras_sigmas=False,
        use_exponential_sigmas=False, use_beta_sigmas=False, stochastic_sampling=sampler == "lcm" and num_steps > 1,
        **extra)


def flux_scheduler(teacher_scheduler, num_steps: int, sampler: str) -> FlowMatchEulerDiscreteScheduler:
    """``flow_scheduler`` for FluxPipeline, which passes ``sigmas = linspace(1, 1/K, K)`` (fastdiff's levels
    ``t = 1 - i/K``, the same float32 values) and ``mu``: shift 1 without dynamic shifting leaves them as given (mu is
    then unused), and no ``shift_terminal``, whose stretch would move them by an ulp (K = 3, 5, 6, 7). An ``lcm``
    student re-noises with fresh noise at every K it is called with (at K = 1 the step's noise is multiplied by 0)."""
    config = flow_scheduler(teacher_scheduler, num_steps, sampler).config
    return FlowMatchEulerDiscreteScheduler.from_config(config, shift_terminal=None,
                                                       stochastic_sampling=sampler == "lcm")


def scheduler_for(teacher, info: dict):
    """The scheduler an exported student samples with (see the module docstring and ``flow_scheduler``)."""
    prediction = teacher.denoiser.prediction_type
    if type(teacher.pipeline).__name__ == "FluxPipeline":
        return flux_scheduler(teacher.scheduler, info["num_steps"], info.get("sampler", "lcm"))
    if teacher.denoiser.schedule.kind == "flow":
        source = teacher.scheduler
        if "FlowMatch" not in type(source).__name__:  # DPMSolver on flow sigmas (Sana): only its table length carries
            source = FlowMatchEulerDiscreteScheduler(num_train_timesteps=source.config.num_train_timesteps)
        return flow_scheduler(source, info["num_steps"], info.get("sampler", "lcm"))
    if info.get("sampler") == "ddim":
        return deterministic_scheduler(teacher.scheduler, prediction, info["top_timestep"])
    return student_scheduler(teacher.scheduler, prediction, info["top_timestep"], info.get("timestep_scaling"))


def tcd_scheduler(scheduler):
    """Hyper-SD's sampler beside the exact one: diffusers' TCDScheduler on the exported table, its K timesteps
    fastdiff's for every K (``original_inference_steps`` = the table length). Its step count and ``eta`` (TCD's gamma)
    are call arguments, so one config serves 1, 2, 4 and 8 steps; at eta 0 its steps are the DDIM sampler's except the
    last, which stops at timestep 0 (``a_0 x0 + s_0 eps``) instead of returning x0."""
    from diffusers import TCDScheduler

    return TCDScheduler.from_config(scheduler.config, original_inference_steps=scheduler.config.num_train_timesteps)


# step counts a flow export's per-K schedulers are written for (``scheduler_k{K}/``), beside the student's own
FLOW_STEP_COUNTS = (1, 2, 4, 8)


def flow_schedulers_per_k(info: dict) -> bool:
    """Whether an export needs ``scheduler_k{K}/`` folders: SD3- and Sana-style flow exports, whose scheduler holds K
    (``shift_terminal = 1/K``); FluxPipeline passes every K's levels itself."""
    return info.get("scheduler_class") == "FlowMatchEulerDiscreteScheduler" and \
        info.get("pipeline_class") != "FluxPipeline"


def save_extra_schedulers(scheduler, folder: Path, info: dict) -> None:
    """Beside a pipeline or LoRA export: a hyper-sd student's TCD scheduler in ``scheduler_tcd/``; a flow export's
    scheduler for each other K of ``FLOW_STEP_COUNTS`` in ``scheduler_k{K}/`` (a consistency student samples any K,
    and SD3's and Sana's pipelines take the levels from the scheduler's config)."""
    if str(info.get("objective", "")).startswith("hyper-sd"):
        tcd_scheduler(scheduler).save_pretrained(folder / "scheduler_tcd")
    if flow_schedulers_per_k(info):
        for k in FLOW_STEP_COUNTS:
            if k != info["num_steps"]:
                flow_scheduler(scheduler, k, info.get("sampler", "lcm")).save_pretrained(folder / f"scheduler_k{k}")
