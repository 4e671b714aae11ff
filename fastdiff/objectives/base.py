"""What every objective shares: the networks it reads, noise-level sampling, the fake-score loss."""
from __future__ import annotations

import contextlib
import contextvars
import copy

import torch
from torch import nn

from ..models.denoiser import Denoiser, expand
from ..models.schedule import FlowSchedule, VPSchedule
from ..models.trajectory import KARRAS_POINTS, karras_grid, schedule_range


SIGMA_GRIDS = ("teacher", "karras", "shifted")


def sample_sigma(schedule: VPSchedule | FlowSchedule, n: int, lo: float, hi: float, device,
                 grid: str = "teacher") -> torch.Tensor:
    """Noise levels at timesteps drawn uniformly from [lo, hi] * T (integers for discrete VP teachers).

    grid "teacher": the teacher's own table (DDPM timesteps; uniform t for flow teachers, FastGen's Flux / SD 1.5
    ``time_dist_type = "uniform"``).
    grid "karras": integer indices in [lo, hi] * 1000 of :func:`karras_grid` (DMD2 edm_guidance.py).
    grid "shifted" (flow teachers): uniform t through the teacher schedule's shift, ``s t / (1 + (s - 1) t)``, the
    levels its scheduler visits (FastGen's ``time_dist_type = "shifted"``, its Wan / Cosmos DMD2 configs; rCM's
    ``p_D``); the same as "teacher" at shift 1.
    """
    if grid == "karras":
        idx = torch.randint(int(lo * KARRAS_POINTS), min(int(hi * KARRAS_POINTS), KARRAS_POINTS - 1) + 1, (n,),
                            device=device)
        return karras_grid(schedule, device)[idx]
    if grid not in SIGMA_GRIDS:
        raise ValueError(f"sigma_grid must be one of {', '.join(SIGMA_GRIDS)}, got {grid!r}")
    T = schedule.num_train_timesteps
    if isinstance(schedule, VPSchedule):
        if grid == "shifted":
            raise ValueError(shifted_needs_flow(schedule))
        t = torch.randint(int(lo * T), min(int(hi * T), T - 1) + 1, (n,), device=device)
        return schedule.sigma_at(t)
    t = lo + (hi - lo) * torch.rand(n, dtype=torch.float64, device=device)
    t = t.clamp(1.0 / T, 1 - 1e-4)  # flow: stay off t = 1, where sigma is infinite
    if grid == "shifted":  # the clamp's 1/T becomes the schedule's own smallest level
        t = schedule.shift * t / (1 + (schedule.shift - 1) * t)
    return (t / (1 - t)).float()


def shifted_needs_flow(schedule) -> str:
    return (f"objective.sigma_grid shifted applies the shift of a flow teacher's schedule; this teacher's is a "
            f"{schedule.kind} table: use teacher or karras")


def edm_sigma(schedule, n: int, device, p_mean: float = -1.2, p_std: float = 1.2,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """EDM's training noise levels, ``ln sigma ~ N(p_mean, p_std^2)`` (Karras et al. 2022, Table 1), kept inside
    the teacher's own range so every level maps to a timestep it was trained on."""
    lo, hi = schedule_range(schedule)
    return (torch.randn(n, device=device, dtype=dtype) * p_std + p_mean).exp().clamp(lo, hi)


def finite_samples(*tensors: torch.Tensor) -> torch.Tensor:
    """Per-sample mask: True where every element of every tensor is finite (SiD masks the rest)."""
    ok = torch.ones(tensors[0].shape[0], dtype=torch.bool, device=tensors[0].device)
    for t in tensors:
        ok &= torch.isfinite(t.detach()).reshape(t.shape[0], -1).all(dim=1)
    return ok


def only_finite(ok: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors with the samples outside ``ok`` replaced by zeros.

    A select, not boolean indexing: indexing needs the count of kept samples on the host (a device sync every
    step) and changes shapes under ``torch.compile``. The select's backward passes exactly zero to a dropped
    sample, so a NaN computed from it never reaches the networks' gradients.
    """
    return tuple(torch.where(ok.reshape(-1, *([1] * (t.ndim - 1))), t, torch.zeros_like(t)) for t in tensors)


def kept_mean(ok: torch.Tensor, per_sample: torch.Tensor) -> torch.Tensor:
    """Mean of per-sample values over the samples in ``ok`` (the others are dropped by a select)."""
    return only_finite(ok, per_sample)[0].sum() / ok.sum().clamp(min=1)


def finite_mean(per_sample: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of a per-sample loss over the samples where it is finite (optionally weighted per sample)."""
    return kept_mean(finite_samples(per_sample), per_sample if weight is None else weight * per_sample)


def per_sample_mean(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).mean(dim=1)


def noised(x: torch.Tensor, schedule, lo: float, hi: float, grid: str = "teacher") -> tuple[torch.Tensor, torch.Tensor]:
    """(x + sigma * eps, sigma) with sigma drawn by ``sample_sigma`` over [lo, hi] on ``grid``, then fresh eps."""
    sigma = sample_sigma(schedule, x.shape[0], lo, hi, x.device, grid)
    return x + expand(sigma, x) * torch.randn_like(x), sigma


def default_sigma_grid(teacher: Denoiser) -> str:
    """The noise-level grid of the teacher family's reference. DMD2 main/edm/edm_guidance.py and SiD
    training/sid_loss.py index Karras' rho=7 curve because their EDM teachers were trained on log-normal sigma,
    not on a table; every teacher fastdiff loads comes with the DDPM table (or flow t) it was trained on uniformly,
    whatever it predicts, and for those DMD2 main/sd_guidance.py and SiD-LSG training/sid_training_loop.py draw
    ``randint`` timesteps of the table: "teacher". "karras" is opt-in (EDM-trained weights behind a VP table);
    on the analytic teacher it also measured worse (bench gmm, sida 4.57 x floor against 1.62 x)."""
    return "teacher"


def default_fake_loss(teacher: Denoiser) -> str:
    """The fake-score loss of SiD's family per teacher parametrisation: "edm" on x0 (EDM-like) teachers as SiD
    (training/sid_loss.py ``__call__``); "eps" on epsilon and v teachers as SiD-LSG (training/sid_training_loop.py:
    the eps MSE, and for v-prediction the v MSE times snr/(snr+1), which is the same eps MSE); the teacher's own
    flow-matching loss on flow teachers."""
    return {"sample": "edm", "epsilon": "eps", "v_prediction": "eps"}.get(teacher.prediction_type, "teacher")


FAKE_LOSSES = ("teacher", "edm", "eps")


def drop_conditions(denoiser: Denoiser, cond: dict | None, rate: float) -> dict | None:
    """``cond`` with each sample's condition replaced by the null one (null class or ``uncond_*`` entries, the
    ones CFG uses) with probability ``rate``; the ``uncond_*`` entries themselves are kept."""
    if not cond or rate <= 0:
        return cond
    first = next(v for v in cond.values() if torch.is_tensor(v))
    null = denoiser.null_cond(cond, first.shape[0])
    drop = torch.rand(first.shape[0], device=first.device) < rate

    def pick(kept, dropped):
        if isinstance(kept, dict):
            return {k: pick(v, dropped[k]) for k, v in kept.items()}
        if not torch.is_tensor(kept):
            return kept
        return torch.where(drop.reshape(-1, *[1] * (kept.ndim - 1)), dropped.to(kept.dtype), kept)

    return {k: pick(v, null[k]) if k in null else v for k, v in cond.items()}


_NETWORK_COPIER = contextvars.ContextVar("network_copier", default=None)


def copy_network(denoiser: Denoiser, role: str) -> Denoiser:
    """A copy of the student that an objective keeps beside it (``role``: "target", cd's EMA target network): a
    deepcopy, or what the run building the objective makes it with (``network_copies``: under train.sharding fsdp
    a sharded copy made from the student's shards, as the run's EMA is)."""
    copier = _NETWORK_COPIER.get()
    return copy.deepcopy(denoiser) if copier is None else copier(denoiser, role)


@contextlib.contextmanager
def network_copies(copier):
    """Within the block, ``copy_network`` calls ``copier(denoiser, role)`` (the run, around the constructor)."""
    token = _NETWORK_COPIER.set(copier)
    try:
        yield
    finally:
        _NETWORK_COPIER.reset(token)


class Objective(nn.Module):
    """Base class: ``generator_loss`` and ``critic_loss`` return (loss, logs); no optimizer inside.

    Trainable modules that belong to the critic side (fake score, GAN head) are the objective's
    ``critic_modules``; the trainer gives them their own optimizer.

    ``trains_on``: what the trainer passes as ``x`` to ``generator_loss``: "generator" samples (distribution
    matching) or "data" (consistency distillation, which noises real images and needs no fake score).
    ``step``: the generator update about to run, set by the trainer (schedules such as sCM's warm-up read it);
    ``images_seen``: generator images trained on before it (step x global batch; SiDA's GAN start reads it);
    ``images_per_step``: that global batch, set by the trainer when it builds the objective (0: not known).
    ``sigma_grid``: where noise levels come from (:func:`sample_sigma`); None = :func:`default_sigma_grid`.
    ``critic_clip``: when set by the objective, the trainer clips critic gradients by this value (SiDA).
    ``uses_generator_sample``: whether the losses read the trainer's generator sample (``trains_on`` "generator");
    False for objectives that run their own student pass (BOOT, TDM): the trainer then skips that student forward
    and passes the noise ``z`` as ``x``, of which they read only the batch's shape and device.
    ``needs_sigma_init``: the constructor takes ``sigma_max`` = ``student.sigma_init`` (as consistency objectives,
    ``trains_on`` "data", always do): BOOT reads its one-step sample g(eps, 0) there.
    ``sampler``: the ``student.sampler`` the objective needs (None: either), with ``sampler_reason`` saying why;
    ``fused_export_reason``: why its LoRA student cannot be exported as a LoRA file (None: it can);
    ``attaches_adapters``: its student is always a LoRA, with adapters the objective attaches itself (AGD).
    ``tf32``: whether float32 matmuls and convolutions may run in TF32 on GPUs that have it (fast, 10-bit mantissa);
    False for objectives that differentiate the networks along time (a JVP or a finite difference: sCM, rCM,
    MeanFlow), which FastGen trains with TF32 off (``tf32_enabled = False`` in config_scm.py, config_mean_flow.py).
    ``critic_grad_clip``: the critic optimizer's gradient-norm clip where the reference clips it otherwise than the
    generator (0: none, TDM's fake score); None = ``train.grad_clip`` for both.
    ``samples_student``: the constructor's ``student`` is the run's K-step sampler (a ``models.generator.Generator``
    on the same levels and re-noising as the run's), not the bare student Denoiser: TDM runs the trajectory itself.
    ``gan_readout``: the read-out of its GAN head on the fake score (``gan.GANHead``): DMD2's branch, or SiDA's
    parameter-free channel mean (sid, sida, Uni-Instruct).
    """

    trains_on = "generator"
    uses_fake_score = True
    uses_generator_sample = True
    needs_sigma_init = False
    samples_student = False
    sampler: str | None = None
    sampler_reason = ""
    fused_export_reason: str | None = None
    attaches_adapters = False
    critic_grad_clip: float | None = None
    gan_readout = "dmd2"
    tf32 = True
    step = 0
    images_seen = 0
    images_per_step = 0
    critic_clip: float | None = None

    @classmethod
    def reads_real_images(cls, options) -> bool:
        """Whether the trainer must load ``data.name`` for this objective, given its ``objective.*`` config section
        (``trains_on`` "data"; LADD with ``real_source: data``). GAN heads need data too; the trainer adds them."""
        return cls.trains_on == "data"

    def trains_generator(self) -> bool:
        """Whether the update about to run (``step``) includes the generator's: False for DisBack's stage 1, whose
        updates train only the critic, and while SiDA / Uni-Instruct hold their generator still."""
        return True

    def generator_updates(self, steps: int) -> int:
        """Generator updates among the first ``steps`` trainer steps (all of them but the ``trains_generator`` False
        ones: DisBack's stage 1, SiDA's hold)."""
        return steps

    def critic_updates_now(self) -> int:
        """Critic updates in the update about to run (``step``): ``critic_updates``; rCM runs none during its
        tangent warm-up, when no generator loss reads the fake score."""
        return self.critic_updates

    def __init__(self, teacher: Denoiser, fake: Denoiser | None, critic_updates: int, gan_head: nn.Module | None = None,
                 sigma_grid: str | None = None):
        super().__init__()
        self.teacher = teacher
        self.fake = fake
        self.critic_updates = critic_updates
        self.gan_head = gan_head
        if sigma_grid not in (None, *SIGMA_GRIDS):
            raise ValueError(f"sigma_grid must be one of {', '.join(SIGMA_GRIDS)}, got {sigma_grid!r}")
        if sigma_grid == "shifted" and not isinstance(teacher.schedule, FlowSchedule):
            raise ValueError(shifted_needs_flow(teacher.schedule))  # at setup, not at the first step
        self.sigma_grid = sigma_grid or default_sigma_grid(teacher)

    @classmethod
    def teacher_defaults(cls, teacher) -> dict:
        """Option values for this kind of loaded teacher (a :class:`~fastdiff.models.teacher.Teacher`) where the
        config leaves them null, e.g. the papers' text-to-image settings."""
        return {}

    @classmethod
    def boundary_timestep_scaling(cls, options: dict) -> float | None:
        """The consistency boundary scalings' k the student network is wrapped with (``network_view``), from
        this objective's options; None: the student's x0 estimate is used as is."""
        return None

    @classmethod
    def prepare_student(cls, model: nn.Module, options: dict) -> None:
        """Change the student network in place the way the constructor will (a layer it adds: MeanFlow's flow-map
        embedding). Setup calls it on a student it makes from the teacher's shards (train.sharding fsdp,
        ``Shards.copy_of``) before sharding it, so the layer is sharded with the rest; elsewhere the constructor
        makes the change itself. ``options``: the values the constructor gets (``Entry.arguments``)."""

    def train_defaults(self) -> dict:
        """Values for the ``train.*`` keys a config leaves null, as this objective's reference code trains
        (the trainer fills the rest from ``TRAIN_FALLBACKS``: AdamW (0.9, 0.999), weight decay 0.01, no warm-up)."""
        return {}

    def teacher_train_defaults(self, teacher) -> dict:
        """``train_defaults`` that depend on the teacher (a ``models.teacher.Teacher``), over them: SiD-LSG's rate for
        text teachers."""
        return {}

    def critic_modules(self) -> list[nn.Module]:
        return [m for m in (self.fake, self.gan_head) if m is not None]

    def generator_modules(self) -> list[nn.Module]:
        """Trainable modules of the objective that the generator's optimizer updates (sCM's adaptive weighting);
        list them in ``state_modules`` too, so checkpoints keep them."""
        return []

    def state_modules(self) -> dict[str, nn.Module]:
        """Modules the objective updates itself (a consistency target network) and checkpoints must keep."""
        return {}

    def after_generator_step(self) -> None:
        """Called after each generator optimizer step (e.g. to move an EMA target network)."""

    def stage_ends(self) -> dict[int, int]:
        """{generator updates done when a stage of a progressive objective ends: the step count its student serves};
        the trainer exports each such stage's student (Hyper-SD's per-step-count LoRAs). None by default."""
        return {}

    def fake_noise_levels(self, n: int, device, weighting: str, t_range=(0.0, 1.0)) -> tuple[torch.Tensor, torch.Tensor]:
        """(sigma, per-sample weight of ``|x0_hat - x0|^2``) for the fake-score loss ``weighting``.

        "teacher": the teacher's own loss (its target: eps, v, x0 or velocity), timesteps uniform in ``t_range``
        on ``sigma_grid``. "eps": the epsilon MSE, weight 1 / sigma^2, on the same timesteps (SiD-LSG).
        "edm": EDM's loss, ``(sigma^2 + sd^2) / (sigma sd)^2`` with log-normal sigma (Karras et al. 2022, Eq. 8
        and Table 1), as SiD trains its fake score.
        """
        if weighting == "edm":
            sigma = edm_sigma(self.fake.schedule, n, device)
            return sigma, (sigma ** 2 + 0.25) / (0.25 * sigma ** 2)  # sigma_data = 0.5
        if weighting not in FAKE_LOSSES:
            raise ValueError(f"fake_loss must be one of {', '.join(FAKE_LOSSES)}, got {weighting!r}")
        sigma = sample_sigma(self.fake.schedule, n, *t_range, device, self.sigma_grid)
        weight = sigma.double() ** -2 if weighting == "eps" else self.fake.loss_weight(sigma)
        return sigma, weight.float().to(device)

    def fake_denoising_loss(self, x: torch.Tensor, cond=None, weighting: str = "teacher",
                            guidance_scale: float = 1.0, t_range=(0.0, 1.0)) -> torch.Tensor:
        """Denoising loss of the fake score on generator samples x (detached), written in x0 terms, with the
        noise levels and weights of :meth:`fake_noise_levels`; mean over elements and finite samples.
        guidance_scale: CFG on the fake score's own prediction while it trains (SiD-LSG's kappa_1).
        """
        x = x.detach().float()
        sigma, weight = self.fake_noise_levels(x.shape[0], x.device, weighting, t_range)
        x_t = x + expand(sigma, x) * torch.randn_like(x)
        x0_hat = self.fake(x_t, sigma, cond, guidance_scale=guidance_scale)
        return finite_mean(per_sample_mean((x0_hat - x) ** 2), weight)

    def generator_loss(self, x: torch.Tensor, cond=None, real=None):
        raise NotImplementedError

    def critic_loss(self, x: torch.Tensor, cond=None, real=None):
        raise NotImplementedError
