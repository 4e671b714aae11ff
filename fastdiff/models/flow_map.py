"""Two-time (flow-map) students: a second time r enters the network through an added, zero-initialised embedding.

A flow-map student predicts the average velocity between two times of the probability-flow ODE (MeanFlow, Geng et
al. 2025), ``u(z_t, r, t) = 1/(t - r) int_r^t v(z_s, s) ds``, so one network samples with any number of steps:
``z_r = z_t - (t - r) u(z_t, r, t)`` along a grid ending at r = 0. fastdiff keeps its Denoiser view: the student's
x0 estimate D(x, sigma; r) gives, in flow units (``z = x / (1 + sigma)``, ``t = sigma / (1 + sigma)``),
``u = (z - D) / t``. Then one map step is ``z_r = (r / t) z + (1 - r / t) D``, which is exactly a deterministic DDIM
step from t to r with the x0 estimate D: a flow-map sampler is the ``ddim`` Generator whose network is told, at each
step, the level it steps to, and diffusers' DDIMScheduler reproduces it once the pipeline passes that level.

How r enters (the LCM guidance-embedding pattern of ``models/guidance.py``): ``proj(features(r))`` is added to the
input of the network's timestep MLP (UNets: ``time_proj`` features into ``time_embedding``; SD3's transformer: its
``time_text_embed.time_proj`` features into ``time_text_embed.timestep_embedder``, whose output is then added to the
pooled-text projection; fastdiff's MLP: added to its first layer's output), with ``proj`` zero-initialised, so the
student starts as the teacher: at every r its output is the teacher's, i.e. ``u(z, r, t) = v(z, t)``. r is given
in the network's native timestep units (the VP table's timestep, ``t * T`` for flow teachers); the data end
(sigma = 0) is timestep 0. The embedding is added to the student network in place (``add_flow_map_embedding``)
so the trainer's optimizer, EMA and checkpoints carry it; the export saves the network as
:class:`.flow_map_model.FlowMapModel`, whose forward takes ``r_timestep`` (pixel students in
``FastdiffFlowMapPipeline``, SD / SD3 ones in ``FastdiffFlowMapSDPipeline`` / ``FastdiffFlowMapSD3Pipeline``).
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..lazy import lazy_names
from .denoiser import Denoiser
from .generator import Generator, flow_time_levels

# diffusers (and fastdiff's diffusers models) are imported on first use below, when a network exists: the objectives
# import this module, and config checks import the objectives, which then answer without loading diffusers.

# FlowMapModel lived here (a diffusers model: it moved so that importing this module does not load diffusers)
__getattr__, __dir__ = lazy_names(__name__, __package__, {"FlowMapModel": ".flow_map_model"}, globals())

MLP_FEATURES = 64  # sinusoidal features of r for fastdiff's MLP (UNets reuse their own time_proj)


class TargetTimeEmbedding(nn.Module):
    """``proj(features(r))``, zero at the start; ``pending`` holds the r (native timesteps) of the current call."""

    def __init__(self, features: int, width: int, time_proj: nn.Module | None):
        super().__init__()
        self.proj = nn.Linear(features, width, bias=False)
        nn.init.zeros_(self.proj.weight)
        self.features = features
        self._time_proj = [time_proj]  # a list: the network's own module, not registered twice
        self.pending: torch.Tensor | None = None

    def embedding(self, batch: int, like: torch.Tensor) -> torch.Tensor:
        r = torch.zeros(1, device=like.device) if self.pending is None else self.pending.to(like.device)
        r = r.reshape(-1).float()
        r = r.expand(batch) if r.numel() == 1 else r.repeat(batch // r.numel())  # CFG: [uncond, cond] halves
        proj = self._time_proj[0]
        if proj is not None:
            feats = proj(r)
        else:
            from diffusers.models.embeddings import get_timestep_embedding

            feats = get_timestep_embedding(r, self.features, flip_sin_to_cos=True)
        return self.proj(feats.to(self.proj.weight.dtype)).to(like.dtype)

    def add_to_input(self, module, args):
        return (args[0] + self.embedding(args[0].shape[0], args[0]),) + tuple(args[1:])

    def add_to_output(self, module, args, output):
        return output + self.embedding(output.shape[0], output)


def flow_map_embedding(model: nn.Module) -> TargetTimeEmbedding | None:
    """The r embedding of a flow-map network (in place or a :class:`.flow_map_model.FlowMapModel`), or None."""
    found = getattr(model, "flow_map_r", None) or getattr(getattr(model, "base", None), "flow_map_r", None)
    return found if isinstance(found, TargetTimeEmbedding) else None


def add_flow_map_embedding(model: nn.Module) -> nn.Module:
    """Give ``model`` a zero-initialised r input, in place (idempotent): UNet2DModel / UNet2DConditionModel get it
    beside their timestep features, SD3Transformer2DModel beside the timestep features of its ``time_text_embed``
    (the timestep MLP whose output is added to the pooled-text projection), fastdiff's MLPDenoiser after its first
    layer. Other networks: ValueError."""
    import diffusers

    from .mlp import MLPDenoiser

    if flow_map_embedding(model) is not None:
        return model
    device = next(model.parameters(), torch.empty(0)).device
    # A weightless (meta) network keeps the new layer where it is made (None: not moved): with its initial values,
    # which a sharded copy in the making slices (training/sharding.py Shards.copy_of), or on meta under
    # init_empty_weights (from_pretrained).
    device = None if device.type == "meta" else device
    if hasattr(model, "time_embedding") and hasattr(model, "time_proj"):
        width = model.time_embedding.linear_1.in_features
        model.flow_map_r = TargetTimeEmbedding(width, width, model.time_proj).to(device)
        model.time_embedding.register_forward_pre_hook(model.flow_map_r.add_to_input)
    elif isinstance(model, diffusers.SD3Transformer2DModel):  # r beside t, into the time half of time_text_embed
        embed = model.time_text_embed
        width = embed.timestep_embedder.linear_1.in_features
        model.flow_map_r = TargetTimeEmbedding(width, width, embed.time_proj).to(device)
        embed.timestep_embedder.register_forward_pre_hook(model.flow_map_r.add_to_input)
    elif isinstance(model, MLPDenoiser):
        model.flow_map_r = TargetTimeEmbedding(MLP_FEATURES, model.net[0].out_features, None).to(device)
        model.net[0].register_forward_hook(model.flow_map_r.add_to_output)
    else:
        raise ValueError("a flow-map student needs a UNet2DModel, UNet2DConditionModel, SD3Transformer2DModel or "
                         f"MLPDenoiser to add the second time to, got {type(model).__name__}")
    return model


@contextlib.contextmanager
def target_time(model: nn.Module, r_timestep: torch.Tensor | None):
    """Within the block, ``model`` (a flow-map network) maps to time ``r_timestep`` (native units; (B,) or scalar)."""
    emb = flow_map_embedding(model)
    if emb is None:
        raise ValueError(f"{type(model).__name__} has no flow-map embedding (add_flow_map_embedding)")
    before, emb.pending = emb.pending, r_timestep
    try:
        yield
    finally:
        emb.pending = before


def r_timestep(schedule, sigma_r: torch.Tensor) -> torch.Tensor:
    """Native timestep fed for the target level sigma_r (float32; sigma 0, the data end, is timestep 0)."""
    sigma_r = torch.as_tensor(sigma_r, dtype=torch.float32).reshape(-1)
    return schedule.model_timestep(sigma_r)


LEVELS = ("table", "flow")


def native_timesteps(schedule, sigmas: torch.Tensor) -> list:
    """The timesteps a pipeline takes for these levels: integers on a VP table, ``t * T`` for flow teachers."""
    t = schedule.timestep(sigmas.cpu())
    return [int(v) for v in t.round().tolist()] if schedule.kind == "vp" else [float(v) for v in t.double().tolist()]


def native_sigmas(schedule, timesteps: list) -> torch.Tensor:
    """The levels of native timesteps (``native_timesteps``' inverse): the VP table's sigmas; for flow teachers
    ``t = timesteps / T`` as the network is fed it (after any shift, unlike ``FlowSchedule.sigma_at``)."""
    ts = torch.tensor(timesteps, dtype=torch.float64)
    if schedule.kind == "vp":
        return schedule.sigma_at(ts)
    t = ts / schedule.num_train_timesteps
    return torch.where(t >= 1, torch.full_like(t, float("inf")), t / (1 - t)).float()


class FlowMapGenerator(Generator):
    """Any-K flow-map sampling from one student: on K levels, each step maps z_t to the next level r with
    ``z_r = z_t - (t - r) u(z_t, r, t)`` (the last to r = 0, the data), i.e. the deterministic ``ddim`` step with
    the student told r. Args as :class:`Generator` (the sampler is ddim), and ``levels``:

    - "table" (default): a K-step student's levels (``step_sigmas``: on a VP table its trailing timesteps, e.g.
      sigma 157.4 / 3.42 at K = 2); the exported pipelines' schedulers step on them by default.
    - "flow": uniform in flow time below the first level (``flow_time_levels``; a flow teacher's own table rule),
      on a VP table snapped to its integer timesteps (a student starting at 999: 999 / 256 at K = 2, 999 / 470 / 256
      / 97 at K = 4; an epsilon teacher's, starting at 727: 727 / 234 and 727 / 428 / 234 / 89), so the exported
      pipelines reproduce them when given ``timesteps=generator.timesteps(K)``. On ``fastdiff bench gmm``
      (tangent warm-up 500; 2000 updates, seeds 0 / 1 / 2, before the snapping) two steps on these levels measured
      0.88 / 1.16 / 1.17 x floor against the table's 2.14 / 2.20 / 2.44 x (the student's map to the data from 3.42
      is its weakest); after 4000 updates 1.29 / 1.69 / 1.55 against 1.67 / 1.76 / 1.89, and four steps worse than
      the table's (1.78 / 2.39 / 1.74 against 1.30 / 1.63 / 1.55). The better levels follow where a given
      student's maps are accurate, so the table's stay the default (eval/results/bench-gmm-cpu/README.md,
      "MeanFlow's 2-step miss, part 2").
    - a sequence of K native timesteps, highest first, the first the student's own (VP: integers, e.g.
      ``[999, 300]``; flow teachers: ``t * T``): explicit levels, as the pipelines' ``timesteps`` argument.
    """

    def __init__(self, denoiser: Denoiser, num_steps: int = 1, sigma_init: float | None = None, levels="table"):
        if isinstance(levels, str) and levels not in LEVELS:
            raise ValueError(f"flow-map levels must be one of {', '.join(LEVELS)} or a list of timesteps, "
                             f"got {levels!r}")
        super().__init__(denoiser, num_steps, sigma_init, sampler="ddim")
        self.level_rule = levels if isinstance(levels, str) else self._checked(levels)

    def _checked(self, timesteps) -> list:
        """Explicit levels: strictly decreasing native timesteps above 0 (the last step maps to the data), the
        first the student's first (the sampler starts from pure noise, which is right only there)."""
        schedule = self.denoiser.schedule
        ts = [float(t) for t in timesteps]
        if schedule.kind == "vp":
            if any(t != int(t) for t in ts):
                raise ValueError(f"timesteps {timesteps} must be integers on a VP teacher's table")
            ts = [int(t) for t in ts]
        first = native_timesteps(schedule, super().levels(1))[0]
        if not ts or any(a <= b for a, b in zip(ts, ts[1:])) or ts[-1] <= 0 or ts[0] != first:
            raise ValueError(f"timesteps {list(timesteps)} must decrease strictly, stay above 0 and start at the "
                             f"student's first timestep {first}, e.g. {[first, round(first * 0.3)]}")
        return ts

    def levels(self, num_steps: int | None = None) -> torch.Tensor:
        if not isinstance(self.level_rule, str):  # explicit: K is their number
            if num_steps not in (None, len(self.level_rule)):
                raise ValueError(f"this sampler's {len(self.level_rule)} explicit timesteps "
                                 f"{self.level_rule} take {len(self.level_rule)} steps, not {num_steps}")
            return native_sigmas(self.denoiser.schedule, self.level_rule).to(self.sigmas.device)
        sigmas = super().levels(num_steps)
        if self.level_rule == "table":
            return sigmas
        flow = flow_time_levels(sigmas[0].cpu(), len(sigmas))
        schedule = self.denoiser.schedule
        if schedule.kind == "vp":  # on the table's integer timesteps, so that an exported pipeline takes them
            snapped = native_timesteps(schedule, flow)
            if any(a <= b for a, b in zip(snapped, snapped[1:])) or snapped[-1] < 1:
                raise ValueError(f'levels="flow" at K = {len(snapped)} collapse on the table\'s integer timesteps '
                                 f"({snapped}): use fewer steps or explicit timesteps")
            flow[1:] = native_sigmas(schedule, snapped[1:])
        return flow.to(sigmas.device)

    def timesteps(self, num_steps: int | None = None) -> list:
        """The K levels as the native timesteps the exported pipelines take (``timesteps=...``)."""
        if not isinstance(self.level_rule, str):
            self.levels(num_steps)  # the step-count check
            return list(self.level_rule)
        return native_timesteps(self.denoiser.schedule, self.levels(num_steps))

    def forward(self, z: torch.Tensor, cond: dict | None = None, num_steps: int | None = None,
                rng: torch.Generator | None = None) -> torch.Tensor:
        sigmas = self.levels(num_steps)
        model, schedule = self.denoiser.model, self.denoiser.schedule
        x_native = x0 = z
        for i, sigma in enumerate(sigmas):
            last = i + 1 == len(sigmas)
            target = torch.zeros(()) if last else sigmas[i + 1]
            with target_time(model, r_timestep(schedule, target).to(z.device)):
                x0 = self.denoiser.denoise_native(x_native, sigma, cond)
            if not last:
                x_native = self.next_input(x_native, x0, sigma, sigmas[i + 1], None)
        return x0
