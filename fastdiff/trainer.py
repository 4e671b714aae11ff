"""The training loop: alternating critic / generator updates on accelerate.

Per generator update: ``objective.critic_updates`` critic updates (fake score, GAN head) on fresh
generator samples, then one generator update, an EMA update, and (at their intervals) logs, a sample
grid and a checkpoint. Gradients are averaged across processes by hand (one all-reduce per
optimizer step), so the same code runs on one CPU or under ``accelerate launch`` on several GPUs, and
frozen networks can be called freely without a DDP wrapper getting in the way.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import shutil
import time
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from .config import Config, ObjectiveConfig, to_dict
from .data import as_model_range, real_images_for
from .denoiser import Denoiser
from .errors import FastdiffError
from .export import check_exportable, export_student
from .generator import Generator
from .consistency import consistency_start, network_view
from .guidance import with_guidance_embedding
from .objectives import NEEDS_GAN, build, objective_class
from .objectives.gan import GANHead
from .sampling import class_labels_for, guided_cond, save_grid, to_uint8
from .teacher import Teacher, load_teacher
from .embedded import resolve_teacher_path
from .attention import set_attention
from .lora import is_lora, lora_copy
from .networks import check_student, checkpoint_view, fake_score_model, student_model_for  # noqa: F401 - re-exported
from .networks import enable_gradient_checkpointing, lora_export_mode, methods_used
from .optim import Optimizer, lr_factor  # noqa: F401 - lr_factor re-exported
from .text import PromptEncoder, PromptSampler, read_prompts


def student_like(teacher: Teacher, model: torch.nn.Module) -> Denoiser:
    """A Denoiser for a trainable copy of the teacher (same schedule, parametrisation, null class)."""
    return network_view(model, teacher.denoiser)


DEFAULT_TIMESTEP_SCALING = 10.0  # LCM's


def timestep_scaling(cfg: Config) -> float | None:
    """The consistency boundary scalings' k for ``cd`` students (None: the student's x0 estimate is used as is)."""
    if cfg.objective.name != "cd":
        return None
    return cfg.objective.timestep_scaling or DEFAULT_TIMESTEP_SCALING


def student_denoiser(cfg: Config, teacher: Teacher, model: torch.nn.Module) -> Denoiser:
    """The student network as the objective sees it: plain, or with the consistency boundary condition (cd)."""
    return network_view(model, teacher.denoiser, timestep_scaling(cfg))


def sigma_init(cfg: Config, teacher: Teacher | None = None) -> float | None:
    """student.sigma_init with ``auto`` resolved: 2.5 for distribution matching on VP teachers; for consistency
    students ``consistency_start`` (1 / a_t <= 15 on epsilon VP teachers, else the top); the top for flow teachers.

    Flow students start at t = 1 (pure noise) as their pipelines do: there ``x0 = x - t v`` is well conditioned,
    unlike an epsilon student's ``x0 = (x - s eps) / a`` at the top of a VP schedule."""
    if cfg.student.sigma_init != "auto":
        return cfg.student.sigma_init
    if trains_on_data(cfg):
        return consistency_start(teacher.denoiser) if teacher is not None else None
    flow = teacher is not None and teacher.denoiser.schedule.kind == "flow"
    return None if flow else 2.5


def trains_on_data(cfg: Config) -> bool:
    return objective_class(cfg.objective.name).trains_on == "data"


def uses_gan(cfg: Config) -> bool:
    return cfg.objective.gan or cfg.objective.name in NEEDS_GAN


def check_objective_settings(cfg: Config, teacher: Teacher) -> None:
    """Settings the objective's constructor does not see but that only make sense for some objectives."""
    o = cfg.objective
    if o.timestep_scaling is not None and o.name != "cd":
        raise FastdiffError(f"objective.timestep_scaling does not apply to {o.name}")
    if teacher.denoiser.schedule.kind == "flow" and sigma_init(cfg, teacher) is not None:
        raise FastdiffError("flow-matching students start from pure noise (t = 1), as their pipelines do: "
                            "set student.sigma_init to null or auto")
    if cfg.student.sampler == "ddim" and sigma_init(cfg, teacher) is not None and not trains_on_data(cfg):
        raise FastdiffError("student.sampler ddim starts at the top of the schedule: set student.sigma_init to null")
    if uses_gan(cfg) and not objective_class(o.name).uses_fake_score:
        raise FastdiffError(f"objective.gan does not apply to {o.name} (the GAN head sits on a fake score)")
    if cfg.student.lora_rank and (cfg.student.model or o.guidance_range is not None):
        raise FastdiffError("student.lora_rank adapts the teacher's own weights: it cannot be combined with "
                            "student.model or objective.guidance_range")
    pipe = teacher.pipeline
    if cfg.student.lora_rank and cfg.student.lora_export != "fused" and pipe is not None \
            and not hasattr(type(pipe), "save_lora_weights"):
        raise FastdiffError(f"{type(pipe).__name__} cannot load LoRA weights: set student.lora_export=fused")
    if cfg.student.lora_rank and cfg.student.lora_export == "lora" and pipe is None:
        raise FastdiffError(f"{cfg.teacher.path} has no pipeline that loads LoRA weights (DDPMPipeline and fastdiff's "
                            "class-conditional pipeline take a full UNet): set student.lora_export=fused")


def build_objective(cfg: Config, teacher: Teacher, fake: Denoiser | None, student: Denoiser):
    o = cfg.objective
    try:
        gan_head = GANHead(fake) if uses_gan(cfg) else None
        options = {k: getattr(o, k) for k in OBJECTIVE_OPTIONS}
        if trains_on_data(cfg):  # consistency students train up to the level they sample from
            options["sigma_max"] = sigma_init(cfg, teacher)
        if teacher.conditioning == "text":  # the papers' text-to-image settings where the config leaves them open
            if o.name == "dmd2" and options["critic_updates"] is None:
                # DMD2's experiments/ scripts: --dfake_gen_update_ratio 10 for SD1.5, 5 for SDXL (and ImageNet)
                options["critic_updates"] = 5 if "XL" in type(teacher.pipeline).__name__ else 10
            if o.name == "sid" and options["alpha"] is None:
                options["alpha"] = 1.0  # SiD-LSG (Zhou et al. 2024b) uses alpha 1 for Stable Diffusion
        return build(o.name, teacher.denoiser, fake, gan_head=gan_head, student=student, **options)
    except ValueError as exc:
        raise FastdiffError(str(exc)) from exc


# train.* keys whose null means "the objective's reference" (Objective.train_defaults), and what fills the rest.
TRAIN_FALLBACKS = {"adam_betas": [0.9, 0.999], "weight_decay": 0.01, "lr_warmup_steps": 0}


def resolve_train_defaults(cfg: Config, objective) -> None:
    """Fill the train.* keys left null with the objective's reference values (in place, so checkpoints and the
    export record what the run used)."""
    defaults = {**TRAIN_FALLBACKS, **objective.train_defaults()}
    for key, value in defaults.items():
        if getattr(cfg.train, key) is None:
            setattr(cfg.train, key, value)


def ema_beta(step: int, global_batch: int, train) -> float:
    """The generator EMA's decay for update ``step`` (0-based): ``train.ema_decay`` when set, else SiD's / EDM's
    half-life in images, ramped up to ``ema_rampup`` x the images seen before this update
    (sid_training_loop.py: ``0.5 ** (batch / max(min(halflife, nimg * rampup), 1e-8))``). The first update's beta
    is 0, so the EMA never keeps the student's starting weights."""
    if train.ema_decay is not None:
        return train.ema_decay
    halflife = train.ema_halflife_kimg * 1000
    if train.ema_rampup is not None:
        halflife = min(halflife, step * global_batch * train.ema_rampup)
    return 0.5 ** (global_batch / max(halflife, 1e-8))


def uses_ema(train) -> bool:
    return train.ema_decay != 0 if train.ema_decay is not None else train.ema_halflife_kimg > 0


# Config fields passed to the objective's constructor (the rest shape the networks or the trainer).
OBJECTIVE_OPTIONS = tuple(f.name for f in dataclasses.fields(ObjectiveConfig)
                          if f.name not in ("name", "gan", "fake_lora_rank", "timestep_scaling"))


def prepare_output_dir(cfg: Config, resume: str | None, overwrite: bool) -> Path:
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise FastdiffError(f"output_dir {out} exists and is not a folder")
    if resume is None and out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise FastdiffError(f"output_dir {out} is not empty; pass --resume latest to continue it "
                                "or --overwrite to replace it")
    return out


# Settings that decide which networks a run has and what their weights mean.
RESUME_KEYS = ("teacher.path", "student.model", "student.num_steps", "student.lora_rank", "objective.name", "objective.gan",
               "objective.fake_lora_rank", "objective.guidance_range", "objective.timestep_scaling", "train.ema_decay",
               "objective.adaptive_weighting",  # scm: whether checkpoints hold the logvar head
               "train.ema_halflife_kimg", "train.ema_rampup",
               # what the student means: its first noise level and its multi-step sampler
               "student.sigma_init", "student.sampler",
               # the distribution it is trained towards (for cd, the scale distilled in); fastdiff.json records one
               "teacher.guidance_scale", "objective.fake_guidance", "objective.fake_train_guidance")
# Allowed to change on resume, with a logged line: SiD's alpha weights the two terms of the generator gradient,
# whose fixed point (fake score = teacher score) does not depend on it, so the checkpoint's networks keep their meaning.
LOGGED_RESUME_KEYS = ("objective.alpha",)


def changed_keys(saved: dict, now: dict, keys):
    """(key, before, after) for each dotted ``section.name`` key whose value differs between two config dicts."""
    for key in keys:
        section, name = key.split(".")
        before, after = saved.get(section, {}).get(name), now[section][name]
        if before != after:
            yield key, before, after


class Trainer:
    """Builds every piece of a run from a Config and runs it. See ``fit``."""

    def __init__(self, cfg: Config, resume: str | None = None, overwrite: bool = False, progress: bool = True):
        self.cfg = cfg
        self.progress = progress
        self.out = prepare_output_dir(cfg, resume, overwrite)
        self.resume = resume
        self.overwrite = overwrite
        teacher_path = resolve_teacher_path(cfg.teacher.path)
        # Everything that can fail on bad input happens before anything is written.
        self.teacher = load_teacher(teacher_path, cfg.teacher.guidance_scale, cfg.teacher.null_class,
                                    getattr(torch, cfg.teacher.dtype))
        check_objective_settings(cfg, self.teacher)
        needs_data = uses_gan(cfg) or trains_on_data(cfg)
        self.real = real_images_for(cfg.data, self.teacher, cfg.train.seed) if needs_data else None
        self.prompts = self._training_prompts()
        student_model = student_model_for(cfg, self.teacher)
        check_student(student_model, self.teacher)
        if cfg.objective.guidance_range is not None and not getattr(student_model.config, "time_cond_proj_dim", None):
            try:  # LCM-style: the student reads the guidance scale from an embedding
                student_model = with_guidance_embedding(student_model)
            except ValueError as exc:
                raise FastdiffError(str(exc)) from exc

        mp = cfg.train.mixed_precision
        self.accelerator = Accelerator(
            mixed_precision=mp, log_with="tensorboard",
            project_config=ProjectConfiguration(project_dir=str(self.out), logging_dir=str(self.out / "logs")))
        if mp != "no" and not self.accelerator.native_amp:  # accelerate's fp16 needs an accelerator
            self.accelerator.print(f"train.mixed_precision {mp}: accelerate has no {mp} autocast on "
                                   f"{self.accelerator.device.type}; training runs in float32")
        # The same seed on every process: replicated networks (fake score, GAN head, LoRA) start identical.
        set_seed(cfg.train.seed, device_specific=False)
        torch.set_float32_matmul_precision("high")  # TF32 on GPUs that have it: fp32 runs stay fast
        device = self.accelerator.device
        teacher = self.teacher
        teacher.model.to(device)
        self.text = None
        if self.prompts is not None:
            self.text = self._prompt_encoder(device)
        if self.teacher.latents is not None and self.real is not None:
            self._prepare_latents(device)

        student_model = student_model.to(device)
        self.generator = Generator(student_denoiser(cfg, teacher, student_model), cfg.student.num_steps, sigma_init(cfg, teacher),
                                   cfg.student.sampler)
        fake = None
        if objective_class(cfg.objective.name).uses_fake_score:
            fake = student_like(teacher, fake_score_model(cfg, teacher, self.accelerator.print).to(device))
        self.attention = self._prepare_networks(teacher.model, student_model, fake.model if fake else None)
        self.objective = build_objective(cfg, teacher, fake, self.generator.denoiser).to(device)
        resolve_train_defaults(cfg, self.objective)
        self.ema = None
        if uses_ema(cfg.train):  # a LoRA student's EMA keeps its own adapters and shares the base
            self.ema = lora_copy(student_model) if is_lora(student_model) else copy.deepcopy(student_model)
            self.ema.requires_grad_(False).eval()
        self._ema_pairs = []  # (EMA parameter, trained parameter): a LoRA student's adapters only
        if self.ema is not None:
            ema_params = dict(self.ema.named_parameters())
            self._ema_pairs = [(ema_params[n], p) for n, p in student_model.named_parameters() if p.requires_grad]
        self.opt_g = Optimizer([student_model, *self.objective.generator_modules()], cfg.train.lr_generator, cfg,
                               mp == "fp16")
        critic = self.objective.critic_modules()
        # The critic's schedule follows generator updates, of which each has critic_updates critic steps.
        self.opt_c = (Optimizer(critic, cfg.train.lr_critic, cfg, mp == "fp16", self.objective.critic_updates)
                      if critic else None)
        self.step = 0
        # Non-finite updates not applied, counted on the device (read at log steps, so no step waits for it).
        self.skipped = {k: torch.zeros((), dtype=torch.long, device=device) for k in ("generator", "critic", "consecutive")}
        if lora_export_mode(cfg, teacher) != cfg.student.lora_export and cfg.student.lora_rank:
            self.accelerator.print(f"student.lora_export {cfg.student.lora_export}: {cfg.teacher.path} has no pipeline "
                                   "that loads LoRA weights; the LoRA student is exported fused")

    def methods_used(self) -> dict:
        """Where a setting can fall back, what this run does (see ``networks.methods_used``)."""
        fake = self.objective.fake
        methods = methods_used(self.cfg, self.teacher, self.objective, self.generator.denoiser.model,
                               fake.model if fake is not None else None)
        if self.cfg.train.mixed_precision != "no":  # whether the networks really run under bf16 / fp16 autocast
            methods["mixed_precision_autocast"] = self.accelerator.native_amp
        return methods

    # --- inputs ---------------------------------------------------------------------------------
    def _training_prompts(self) -> PromptSampler | None:
        """Text-to-image teachers: prompts from data.prompts, else the captions of the image data."""
        if self.teacher.conditioning != "text":
            if self.cfg.data.prompts:
                raise FastdiffError(f"data.prompts is for text-to-image teachers; {self.cfg.teacher.path} is "
                                    f"{self.teacher.conditioning}-conditioned")
            return None
        if self.cfg.data.prompts:
            prompts = read_prompts(self.cfg.data.prompts, "data.prompts")
        elif self.real is not None and self.real.captions is not None:
            prompts = self.real.captions
        else:
            raise FastdiffError("a text-to-image teacher needs training prompts: set data.prompts to a text file "
                                "(one prompt per line) or a JSONL file")
        return PromptSampler(prompts, self.cfg.train.seed)

    def _prepare_latents(self, device) -> None:
        """Real images for a latent teacher: their VAE posteriors computed once (data.cache_latents), after which
        the VAE leaves the accelerator; or the VAE stays there to encode every batch."""
        latents = self.teacher.latents
        latents.vae.to(device)
        if self.cfg.data.cache_latents:
            self.real.map_images(lambda x: latents.posterior(as_model_range(x.to(device))).cpu())
            latents.vae.to("cpu")

    def _prompt_encoder(self, device) -> PromptEncoder:
        """Encode every training prompt once, then move the text encoders off the accelerator (prompt sets larger
        than the cache are encoded per batch, with the encoders kept on the accelerator)."""
        pipe = self.teacher.pipeline
        encoders = [m for k, m in pipe.components.items() if k.startswith("text_encoder") and m is not None]
        for m in encoders:
            m.to(device)
        text = PromptEncoder(pipe, self.cfg.data.negative_prompt, device)
        prompts = list(self.prompts.prompts)
        if self.real is not None and self.real.captions is not None:
            prompts += self.real.captions
        prompts = list(dict.fromkeys(prompts + self._sample_prompts()))
        if len(prompts) <= text.max_cached:
            text.encode_all(prompts)
            for m in encoders:
                m.to("cpu")
        return text

    def _sample_prompts(self) -> list[str]:
        prompts = self.prompts.prompts
        return [prompts[i % len(prompts)] for i in range(self.cfg.train.num_sample_images)]

    def _inputs(self, n: int):
        device = self.accelerator.device
        z = torch.randn((n, *self.teacher.sample_shape), device=device)
        cond = None
        if self.teacher.num_classes:
            cond = {"class_labels": torch.randint(self.teacher.num_classes, (n,), device=device)}
        elif self.text is not None:
            cond = self.text(self.prompts.batch(n))
        return z, cond

    def _real(self, n: int):
        """A batch of real data as the teacher sees it (latents for latent teachers) and its condition."""
        if self.real is None:
            return None
        x, labels, captions = self.real.batch(n, self.accelerator.device)
        latents = self.teacher.latents
        if latents is not None:  # the same draws of the data RNG whether the posteriors are cached or not
            x = latents.sample(x, self.real.rng) if self.cfg.data.cache_latents else latents.encode(x, self.real.rng)
        if self.teacher.num_classes:
            return x, {"class_labels": labels}
        return x, (self.text(captions) if self.text is not None else None)

    # --- state ----------------------------------------------------------------------------------
    def _modules(self) -> dict:
        modules = {"generator": checkpoint_view(self.generator.denoiser.model), **self.objective.state_modules()}
        if self.objective.fake is not None:
            modules["fake"] = checkpoint_view(self.objective.fake.model)
        if self.ema is not None:
            modules["ema"] = checkpoint_view(self.ema)
        if self.objective.gan_head is not None:
            modules["gan_head"] = self.objective.gan_head
        return modules

    def _generators(self) -> dict:
        gens = {"data": self.real.rng} if self.real is not None else {}
        if self.prompts is not None:
            gens["prompts"] = self.prompts.rng
        return gens

    def save(self) -> None:
        if not self.accelerator.is_main_process:
            return
        state = {"step": self.step, "skipped": {k: int(v) for k, v in self.skipped.items()}, "opt_g": self.opt_g.state_dict(),
                 "opt_c": self.opt_c.state_dict() if self.opt_c else None, "rng": ckpt.rng_state(self._generators())}
        path = ckpt.write_checkpoint(self.out, self.step, self._modules(), state, self.cfg.train.checkpoint_limit)
        (path / "config.yaml").write_text(yaml.safe_dump(to_dict(self.cfg), sort_keys=False))

    def check_resume_config(self) -> None:
        """A checkpoint only fits the networks its own config built: refuse another teacher, objective or student."""
        saved_file = self.out / "config.yaml"
        if not saved_file.is_file():
            return
        saved, now = yaml.safe_load(saved_file.read_text()) or {}, to_dict(self.cfg)
        for key, before, after in changed_keys(saved, now, RESUME_KEYS):
            raise FastdiffError(f"{self.out} was trained with {key}={before!r}, this config has {after!r}; resume "
                                f"with the run's own config ({saved_file}) or start a new output_dir")
        for key, before, after in changed_keys(saved, now, LOGGED_RESUME_KEYS):
            self.accelerator.print(f"resuming with {key}={after!r}; the run was trained with {before!r} until now")

    def load(self, which: str) -> None:
        self.check_resume_config()
        if which == "latest":
            path, state = ckpt.load_latest_valid(self.out, self._modules())
        else:
            path = ckpt.find_checkpoint(self.out, which)
            state = ckpt.load_checkpoint(path, self._modules())
        self.opt_g.load_state_dict(state["opt_g"])
        if self.opt_c is not None:
            self.opt_c.load_state_dict(state["opt_c"])
        ckpt.set_rng_state(state["rng"], self._generators())
        self.step = state["step"]
        for key, value in state.get("skipped", {}).items():
            self.skipped[key].fill_(int(value))
        self.accelerator.print(f"resumed from {path}")

    # --- one step ---------------------------------------------------------------------------------
    def _seed_micro_batch(self, phase: str, index: int) -> None:
        key = f"{self.cfg.train.seed}/{self.step}/{phase}/{index}".encode()
        seed = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1
        torch.manual_seed(seed)
        # Every stream a micro-batch draws from (real images, training prompts), each offset so no two coincide.
        for offset, gen in enumerate(self._generators().values()):
            gen.manual_seed(seed + offset)

    def _update(self, opt: Optimizer, loss_of, critic: bool, phase: str):
        """One optimizer step over ``gradient_accumulation`` micro-batches of fresh generator samples.

        Critic updates see detached samples and real images; generator updates backpropagate into the sample.
        Objectives that train on data (consistency distillation) get a batch of real images instead.
        """
        accum, n = self.cfg.train.gradient_accumulation, self.cfg.train.batch_size
        acc = self.accelerator
        split = acc.num_processes * accum > 1
        for a in range(accum):
            if split:
                # A global batch split over processes or accumulation draws each micro-batch's randomness from
                # (seed, step, update, global index): rank r of P processes draws exactly what micro-batch r of a
                # P-fold accumulation draws in one process. A single micro-batch draws from the global stream,
                # whose state the checkpoint restores (so results of unsplit runs are unchanged by this).
                self._seed_micro_batch(phase, acc.process_index * accum + a)
            with self.accelerator.autocast():
                if self.objective.trains_on == "data":
                    x, cond = self._real(n)
                else:
                    z, cond = self._inputs(n)
                    with torch.set_grad_enabled(not critic):
                        x = self.generator.training_sample(z, cond)
                loss, logs = loss_of(x, cond, self._real(n) if critic else None)
            opt.backward(loss / accum)
        return logs, opt.step(self.accelerator, self.objective.critic_clip if critic else None)

    def train_step(self) -> dict:
        obj = self.objective
        obj.step = self.step
        global_batch = self.cfg.train.batch_size * self.cfg.train.gradient_accumulation * self.accelerator.num_processes
        obj.images_seen = self.step * global_batch  # before this update, as SiD's cur_nimg
        logs = {}
        critic_params = self.opt_c.params if self.opt_c else []
        for p in critic_params:
            p.requires_grad_(True)
        for u in range(obj.critic_updates):
            part, (logs["grad_norm_critic"], applied) = self._update(self.opt_c, obj.critic_loss, True, f"critic{u}")
            logs.update(part)
            self.skipped["critic"] += ~applied
        for p in critic_params:  # the generator's loss reads the critic; it must not train it
            p.requires_grad_(False)
        part, (logs["grad_norm_generator"], applied) = self._update(self.opt_g, obj.generator_loss, False, "generator")
        logs.update(part)
        self.skipped["generator"] += ~applied
        self.skipped["consecutive"] = torch.where(applied, 0, self.skipped["consecutive"] + 1)
        logs["skipped_updates"] = self.skipped["generator"] + self.skipped["critic"]
        obj.after_generator_step()
        if self._ema_pairs:
            beta = ema_beta(self.step, global_batch, self.cfg.train)
            with torch.no_grad():
                for e, p in self._ema_pairs:
                    e.lerp_(p, 1 - beta)
        return logs

    def _prepare_networks(self, teacher_model, student_model, fake_model) -> str:
        """Gradient checkpointing (trainable networks), attention backend, channels-last and torch.compile on the
        networks a step runs; returns the attention backend.

        ``nn.Module.compile`` compiles in place, so parameter names (checkpoints, EMA pairs) stay as they are.
        A fake score carrying the GAN head's forward hook is left eager (the hook keeps features aside)."""
        t = self.cfg.train
        backend = "sdpa"
        for net in (n for n in (teacher_model, student_model, fake_model) if n is not None):
            if t.gradient_checkpointing and net is not teacher_model:
                name = "generator" if net is student_model else "fake score"
                enable_gradient_checkpointing(net, name, self.accelerator.print)
            backend, _, _ = set_attention(net, t.attention)
            if t.channels_last:
                net.to(memory_format=torch.channels_last)
            if t.compile and not (net is fake_model and uses_gan(self.cfg)):
                net.compile()
        self.accelerator.print(f"attention: {backend}")
        return backend

    def _out_of_time(self, start: float) -> bool:
        """train.time_limit_minutes reached (the main process decides, so every process stops at the same step)."""
        limit = self.cfg.train.time_limit_minutes
        if limit is None:
            return False
        over = time.time() - start > 60 * limit
        if self.accelerator.num_processes == 1:
            return over
        flag = torch.tensor(float(over), device=self.accelerator.device)  # one sync a step, only with a time limit
        torch.distributed.broadcast(flag, 0)
        return bool(flag)

    def _check_divergence(self) -> None:
        """Stop after ``train.max_nonfinite_steps`` generator updates in a row were skipped (read at log steps).
        Skipped updates leave the weights as they were, so every checkpoint holds finite weights."""
        consecutive = int(self.skipped["consecutive"])
        if consecutive >= self.cfg.train.max_nonfinite_steps:
            last = ckpt.checkpoint_dirs(self.out)
            raise FastdiffError(
                f"training stopped at step {self.step}: {consecutive} generator updates in a row had "
                f"non-finite gradients (train.max_nonfinite_steps); the last good checkpoint is "
                f"{last[-1] if last else 'none'}; lower train.lr_generator / train.lr_critic and resume from it")

    # --- outputs ----------------------------------------------------------------------------------
    def sample_grid(self) -> None:
        if not self.accelerator.is_main_process:
            return
        n = self.cfg.train.num_sample_images
        rng = torch.Generator().manual_seed(self.cfg.train.seed + 12345)
        z = torch.randn((n, *self.teacher.sample_shape), generator=rng).to(self.accelerator.device)
        cond = class_labels_for(n, self.teacher.num_classes, self.accelerator.device)
        if self.text is not None:
            cond = self.text(self._sample_prompts())
        gen = self._export_generator()
        g_range = self.cfg.objective.guidance_range
        cond = guided_cond(gen.denoiser.model, cond, sum(g_range) / 2 if g_range else None)
        with torch.no_grad(), self.accelerator.autocast():
            x0 = gen(z, cond, rng=rng)
            latents = self.teacher.latents
            if latents is not None:  # the VAE visits the accelerator for the grid only, unless training encodes
                home = latents.vae.device
                latents.vae.to(self.accelerator.device)
                x0 = latents.decode(x0)
                latents.vae.to(home)
        ncol = self.teacher.num_classes or None
        save_grid(to_uint8(x0), self.out / "samples" / f"step-{self.step:08d}.png", ncol=ncol)

    def _student_weights(self) -> torch.nn.Module:
        """The weights users get: the EMA when enabled, else the raw generator."""
        return self.ema if self.ema is not None else self.generator.denoiser.model

    def _export_generator(self) -> Generator:
        model = self._student_weights()
        return Generator(student_denoiser(self.cfg, self.teacher, model), self.cfg.student.num_steps,
                         sigma_init(self.cfg, self.teacher), self.cfg.student.sampler)

    def export(self, out: Path | None = None) -> Path | None:
        if not self.accelerator.is_main_process:
            return None
        model = self._student_weights()
        if not is_lora(model):  # a LoRA student's export reads its adapters and merges into a fresh model
            model = copy.deepcopy(model).cpu().eval()
        info = {**export_info(self.cfg, self.step, self.ema is not None, self.teacher), "methods": self.methods_used()}
        return export_student(model, self.teacher, info, out or self.out / "student")

    def fit(self, export: bool = True) -> Path | None:
        cfg, acc = self.cfg, self.accelerator
        if export:  # an export that cannot succeed fails now, not after training
            check_exportable(self._student_weights(), self.teacher)
        if self.resume:
            self.load(self.resume)
        elif self.overwrite and acc.is_main_process and self.out.exists():
            shutil.rmtree(self.out)
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        acc.init_trackers("fastdiff")
        bar = tqdm(total=cfg.train.max_steps, initial=self.step, disable=not (acc.is_main_process and self.progress), desc="distill")
        if acc.is_main_process:
            keep_metrics_upto(self.out / "metrics.jsonl", self.step)
        metrics = open(self.out / "metrics.jsonl", "a") if acc.is_main_process else None
        try:
            start, first_step = time.time(), self.step
            while self.step < cfg.train.max_steps:
                logs = self.train_step()
                self.step += 1
                bar.update(1)
                if self.step % cfg.train.log_every == 0 or self.step == cfg.train.max_steps:
                    # Logging waits for the device; on CUDA nothing else in the step does.
                    self._check_divergence()
                    values = {k: float(v) for k, v in logs.items()}
                    values["images_per_second"] = ((self.step - first_step) * cfg.train.batch_size * acc.num_processes
                                                   * cfg.train.gradient_accumulation) / max(time.time() - start, 1e-9)
                    values.update({f"method_{k}": float(v) for k, v in self.methods_used().items()})
                    acc.log(values, step=self.step)
                    bar.set_postfix({k: f"{v:.3g}" for k, v in values.items() if k.startswith("loss")})
                    if metrics:
                        metrics.write(json.dumps({"step": self.step, **values}) + "\n")
                        metrics.flush()
                if self.step % cfg.train.sample_every == 0:
                    self.sample_grid()
                out_of_time = self._out_of_time(start)
                if self.step % cfg.train.checkpoint_every == 0 or self.step == cfg.train.max_steps or out_of_time:
                    self.save()
                acc.wait_for_everyone()
                if out_of_time:
                    acc.print(f"train.time_limit_minutes reached at step {self.step}: stopping")
                    break
        finally:  # an error message starts on its own line, and the log is flushed
            bar.close()
            if metrics:
                metrics.close()
        acc.end_training()
        if not export:
            return None
        self.sample_grid()
        return self.export()


def keep_metrics_upto(path: Path, step: int) -> None:
    """On resume, drop the log lines a crashed run wrote after its last checkpoint (they are redone)."""
    if not path.is_file():
        return

    def logged_step(line: str) -> float:
        try:
            return json.loads(line).get("step", 0)
        except ValueError:  # half a line written when the process was killed
            return float("inf")

    lines = path.read_text().splitlines()
    kept = [line for line in lines if line.strip() and logged_step(line) <= step]
    if len(kept) != len(lines):
        ckpt.atomic_write_text(path, "".join(line + "\n" for line in kept))


def export_info(cfg: Config, step: int, ema: bool, teacher: Teacher) -> dict:
    return {"teacher": cfg.teacher.path, "teacher_folder": str(Path(teacher.path).resolve()) if Path(teacher.path).is_dir()
            else teacher.path, "lora_rank": cfg.student.lora_rank, "lora_export": cfg.student.lora_export,
            "objective": cfg.objective.name, "num_steps": cfg.student.num_steps,
            "sigma_init": sigma_init(cfg, teacher), "timestep_scaling": timestep_scaling(cfg), "sampler": cfg.student.sampler, "train_step": step, "ema": ema,
            "settings": {"teacher.guidance_scale": cfg.teacher.guidance_scale,
                         "objective": to_dict(cfg)["objective"], "train.batch_size": cfg.train.batch_size,
                         "train.lr_generator": cfg.train.lr_generator, "train.lr_critic": cfg.train.lr_critic,
                         "train.mixed_precision": cfg.train.mixed_precision, "train.ema_decay": cfg.train.ema_decay,
                         "train.ema_halflife_kimg": cfg.train.ema_halflife_kimg, "train.ema_rampup": cfg.train.ema_rampup}}
