"""A run built from its Config: teacher, data, prompts and latents, the student and its sampler, the fake score,
the objective, the EMA and the optimizers, on accelerate; plus the inputs each update draws."""
from __future__ import annotations

import copy
import datetime

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration, set_seed

from ..config import Config
from ..errors import FastdiffError
from ..machine import progress
from ..models.attention import set_attention
from ..models.embedded import resolve_teacher_path
from ..models.generator import Generator
from ..models.guidance import with_guidance_embedding
from ..models.lora import is_lora, lora_copy
from ..models.teacher import load_teacher
from ..models.text import PromptEncoder, PromptSampler, read_prompts
from ..objectives import entry, objective_class, teacher_options
from ..objectives.base import network_copies
from .data import RealImages, as_model_range, real_images_for
from .msd import draw_class_labels, restricted_to_classes
from .teacher_data import teacher_samples_for
from .networks import check_student, enable_gradient_checkpointing, fake_score_model, lora_export_mode, methods_used
from .networks import student_model_for
from .optim import Optimizer
from .sharding import refuse_accelerate_sharding, shard_run, shards_before_teacher, shards_for_setup
from .trackers import trackers_for
from .setup import (build_objective, check_objective_settings, objective_options, prepare_output_dir,
                    resolve_train_defaults, sigma_init, student_denoiser, student_like, uses_ema, uses_gan)


class Run:
    """Builds every piece of a run from a Config (``Trainer`` runs it). Everything that can fail on bad input
    fails here, before anything is written."""

    def __init__(self, cfg: Config, resume: str | None = None, overwrite: bool = False, progress: bool = True):
        if not isinstance(cfg, Config):  # a dict or a preset name fails deep inside otherwise
            raise FastdiffError(f"Trainer takes a Config, got {type(cfg).__name__}; make one with "
                                "fastdiff.config.load_config(path_or_name, ['key=value', ...])")
        self.cfg = cfg
        self.progress = progress
        self.out = prepare_output_dir(cfg, resume, overwrite)
        self.resume = resume
        self.overwrite = overwrite
        refuse_accelerate_sharding()  # an accelerate config asking for FSDP / DeepSpeed / Megatron: train.sharding
        # The process group first (multi-node): every later step (latent encoding, data, sharding) knows its rank.
        # The teacher loads on every process at once (hub downloads share huggingface_hub's file-locked cache; a
        # main-process-first barrier would leave the others waiting forever when the main one stops on bad input).
        mp = cfg.train.mixed_precision
        # train.eval_every: the processes sample their shares, then the main one scores and may export student-best/
        # alone while the others wait in a barrier, which NCCL's default 10-minute timeout could end on an SD-size
        # student (a slow disk, FID's matrix square root on the CPU)
        waits = [InitProcessGroupKwargs(timeout=datetime.timedelta(hours=2))] if cfg.train.eval_every else []
        self.accelerator = Accelerator(
            mixed_precision=mp, log_with=trackers_for(cfg.train.report_to) or None, kwargs_handlers=waits,
            project_config=ProjectConfiguration(project_dir=str(self.out), logging_dir=str(self.out / "logs")))
        refuse_accelerate_sharding(self.accelerator.distributed_type)
        teacher_path = resolve_teacher_path(cfg.teacher.path)
        # Everything that can fail on bad input happens before anything is written.
        # train.sharding fsdp: the teacher's network loaded straight into shards where it can be (sharding.py)
        self.shards, load_network = shards_before_teacher(cfg, self.accelerator, self.accelerator.print)
        self.teacher = load_teacher(teacher_path, cfg.teacher.guidance_scale, cfg.teacher.null_class,
                                    getattr(torch, cfg.teacher.dtype), load_network)
        check_objective_settings(cfg, self.teacher)
        needs_data = uses_gan(cfg) or objective_class(cfg.objective.name).reads_real_images(cfg.objective)
        self.real = None
        if needs_data:  # data.name teacher: image-free, the teacher's own samples (TBCM)
            self.real = (teacher_samples_for(cfg, self.teacher, self.out) if cfg.data.name == "teacher"
                         else real_images_for(cfg.data, self.teacher, cfg.train.seed))
        self.real = restricted_to_classes(cfg, self.teacher, self.real)  # student.classes: one MSD student's part
        self.prompts = self._training_prompts()
        # train.sharding fsdp: the teacher sharded now and the full copies below made from its shards (sharding.py)
        self.shards = shards_for_setup(self, self.accelerator.print)
        # (made from the shards: the objective's change to the student network first, so it is sharded with it)
        student_model = (self.shards.copy_of(self.teacher.model, "student", trainable=True,
                                             prepare=self._student_changes()) if self.shards
                         else student_model_for(cfg, self.teacher))
        check_student(student_model, self.teacher)
        if cfg.objective.guidance_range is not None and not getattr(student_model.config, "time_cond_proj_dim", None):
            try:  # LCM-style: the student reads the guidance scale from an embedding
                student_model = with_guidance_embedding(student_model)
            except ValueError as exc:
                raise FastdiffError(str(exc)) from exc

        if mp != "no" and not self.accelerator.native_amp:  # accelerate's fp16 needs an accelerator
            self.accelerator.print(f"train.mixed_precision {mp}: accelerate has no {mp} autocast on "
                                   f"{self.accelerator.device.type}; training runs in float32")
        # The same seed on every process: replicated networks (fake score, GAN head, LoRA) start identical.
        set_seed(cfg.train.seed, device_specific=False)
        # TF32 on GPUs that have it, so fp32 runs stay fast, except for objectives that differentiate along time
        tf32 = objective_class(cfg.objective.name).tf32
        torch.set_float32_matmul_precision("high" if tf32 else "highest")
        torch.backends.cudnn.allow_tf32 = tf32
        if cfg.train.cudnn_benchmark:  # only ever switched on: a caller's own setting is kept otherwise
            torch.backends.cudnn.benchmark = True
        device = self.accelerator.device
        teacher = self.teacher
        teacher.model.to(device)
        self.text = None
        if self.prompts is not None:
            self.text = self._prompt_encoder(device)
        if hasattr(self.real, "follow"):  # streamed data: each batch's samples from (seed, step, rank) alone
            self.real.follow(lambda: self.step, self.accelerator.process_index, self.accelerator.num_processes,
                             cfg.train.gradient_accumulation)
        if self.teacher.latents is not None and isinstance(self.real, RealImages):  # teacher samples are latents
            self._prepare_latents(device)

        student_model = student_model.to(device)
        self.generator = Generator(student_denoiser(cfg, teacher, student_model), cfg.student.num_steps, sigma_init(cfg, teacher),
                                   cfg.student.sampler)
        fake = None
        if objective_class(cfg.objective.name).uses_fake_score:
            fake_model = (self.shards.copy_of(teacher.model, "fake", trainable=True) if self.shards
                          else fake_score_model(cfg, teacher, self.accelerator.print))
            fake = student_like(teacher, fake_model.to(device))
        self.attention = self._prepare_networks(teacher.model, student_model, fake.model if fake else None)
        # cd's target: a copy of the student, sharded as the EMA below when setup makes networks from shards
        with network_copies(self._sharded_copy if self.shards else None):
            self.objective = build_objective(cfg, teacher, fake, self.generator.denoiser).to(device)
        self.objective.images_per_step = (cfg.train.batch_size * cfg.train.gradient_accumulation
                                          * self.accelerator.num_processes)
        self._say_generator_hold()
        resolve_train_defaults(cfg, self.objective, teacher)
        self.ema = None
        if uses_ema(cfg.train):  # a LoRA student's EMA keeps its own adapters and shares the base
            self.ema = (lora_copy(student_model) if is_lora(student_model) else
                        self.shards.copy_of(student_model, "ema", trainable=False) if self.shards
                        else copy.deepcopy(student_model))
            self.ema.requires_grad_(False).eval()
        # train.sharding fsdp: before the EMA pairs and optimizers take the (then sharded) parameters
        self.shards = shard_run(self, self.accelerator.print)
        self.gathered_student = None  # a sharded run's student gathered whole for a grid or the export
        self._ema_pairs = []  # (EMA parameter, trained parameter): a LoRA student's adapters only
        if self.ema is not None:
            ema_params = dict(self.ema.named_parameters())
            self._ema_pairs = [(ema_params[n], p) for n, p in student_model.named_parameters() if p.requires_grad]
        scale_loss = mp == "fp16" and self.accelerator.native_amp  # fp16 autocast runs: its gradients need scaling
        self.opt_g = Optimizer([student_model, *self.objective.generator_modules()], cfg.train.lr_generator, cfg,
                               scale_loss)
        critic = self.objective.critic_modules()
        # The critic's schedule follows generator updates, of which each has critic_updates critic steps.
        self.opt_c = (Optimizer(critic, cfg.train.lr_critic, cfg, scale_loss, self.objective.critic_updates,
                                self.objective.critic_grad_clip) if critic else None)
        self.step = 0
        # train.eval_every: what scores the student (fastdiff.evaluation.during_training, attached by `fastdiff
        # distill`, a layer above this one) and the lowest FID so far (checkpointed, for train.eval_keep_best)
        self.evaluator = None
        self.best_fid = float("inf")
        # Non-finite updates not applied, counted on the device (read at log steps, so no step waits for it).
        self.skipped = {k: torch.zeros((), dtype=torch.long, device=device) for k in ("generator", "critic", "consecutive")}
        mode = lora_export_mode(cfg, teacher)
        if mode is not None and mode != cfg.student.lora_export:
            reason = self.objective.fused_export_reason
            why = (f"objective {cfg.objective.name}: {reason}" if reason
                   else f"{cfg.teacher.path} has no pipeline that loads LoRA weights")
            self.accelerator.print(f"student.lora_export {cfg.student.lora_export}: {why}; the LoRA student is "
                                   "exported fused")

    def _say_generator_hold(self) -> None:
        """SiDA / Uni-Instruct hold the generator still at first (their references' 100k images): say so, and say
        when the whole run lies inside the hold (the student would come out unchanged)."""
        held = getattr(self.objective, "held_steps", 0)
        if not held:
            return
        hold = self.objective.generator_hold_images
        name, steps = self.cfg.objective.name, self.cfg.train.max_steps
        self.accelerator.print(f"{name}: the generator is held still for its first {hold} images ({held} steps) while "
                               "the fake score trains, as the reference; objective.generator_hold_images=0 starts it at "
                               "once" + (f" (all {steps} steps of train.max_steps lie inside the hold: the student "
                                         "will not change)" if steps <= held else ""))

    def _student_changes(self):
        """``Objective.prepare_student`` of this run's objective, with the options its constructor gets."""
        e = entry(self.cfg.objective.name)
        options = e.arguments(teacher_options(e.name, self.teacher, objective_options(self.cfg)))

        def prepare(model):
            try:
                e.cls.prepare_student(model, options)
            except ValueError as exc:
                raise FastdiffError(str(exc)) from exc
        return prepare

    def _sharded_copy(self, denoiser, role: str):
        """A copy of the student an objective keeps (``objectives.base.copy_network``) when setup makes its networks
        from shards: a sharded copy of the student's (frozen, ``role`` "target")."""
        model = self.shards.copy_of(denoiser.model, role, trainable=False)
        set_attention(model, self.cfg.train.attention)  # as the student's (a deepcopy would carry it over)
        return copy.deepcopy(denoiser, {id(denoiser.model): model})  # the same view (boundary scalings) on it

    def methods_used(self) -> dict:
        """Where a setting can fall back, what this run does (see ``networks.methods_used``)."""
        fake = self.objective.fake
        methods = methods_used(self.cfg, self.teacher, self.objective, self.generator.denoiser.model,
                               fake.model if fake is not None else None)
        if self.cfg.train.mixed_precision != "no":  # whether the networks really run under bf16 / fp16 autocast
            methods["mixed_precision_autocast"] = self.accelerator.native_amp
        if self.cfg.train.sharding == "fsdp":  # False on one process: nothing to shard
            methods["fsdp_sharded"] = self.shards is not None
        return methods


    # --- inputs ---------------------------------------------------------------------------------
    def _training_prompts(self) -> PromptSampler | None:
        """Text-to-image teachers (and fada's class + text ones): prompts from data.prompts, else the captions of
        the image data."""
        if self.teacher.conditioning != "text" and self.cfg.objective.name != "fada":
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
            main = self.accelerator.is_main_process
            with progress(total=len(self.real.images), desc="caching latents", unit="img", enabled=self.progress and main) as bar:
                acc = self.accelerator
                def encode(x):
                    posterior = latents.posterior(as_model_range(x.to(device))).cpu()
                    bar.update(len(x) * acc.num_processes)  # the main process sees its 1/P share
                    return posterior
                # Each process encodes 1/P of the images; the posteriors are all-gathered (data.py).
                self.real.map_images(encode, rank=acc.process_index, world=acc.num_processes, device=device)
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
        prompts = list(dict.fromkeys(prompts + self.sample_prompts()))
        if len(prompts) <= text.max_cached:
            text.encode_all(prompts)
            for m in encoders:
                m.to("cpu")
        return text

    def sample_prompts(self) -> list[str]:
        prompts = self.prompts.prompts
        return [prompts[i % len(prompts)] for i in range(self.cfg.train.num_sample_images)]

    def _inputs(self, n: int):
        device = self.accelerator.device
        z = torch.randn((n, *self.teacher.sample_shape), device=device)
        cond = None
        if self.teacher.num_classes:
            cond = {"class_labels": draw_class_labels(n, self.teacher.num_classes, self.cfg.student.classes, device)}
        elif self.text is not None:
            cond = self.text(self.prompts.batch(n))
        return z, cond

    def _real(self, n: int):
        """A batch of real data as the teacher sees it (latents for latent teachers) and its condition."""
        if self.real is None:
            return None
        weights = None  # per-image loss weights (data.tier_weights): the draw is batch()'s either way
        if not isinstance(self.real, RealImages):  # the teacher's samples: already in its (latent) sample space
            x, labels, captions = self.real.batch(n, self.accelerator.device, self.text)
            latents = None
        else:
            x, labels, captions, weights = self.real.weighted_batch(n, self.accelerator.device)
            latents = self.teacher.latents
        if latents is not None:  # the same draws of the data RNG whether the posteriors are cached or not
            x = latents.sample(x, self.real.rng) if self.cfg.data.cache_latents else latents.encode(x, self.real.rng)
        if self.teacher.num_classes:
            cond = {"class_labels": labels}
            if self.text is not None:  # fada's second condition: the images' captions, else training prompts
                cond.update(self.text(captions if captions is not None else self.prompts.batch(n)))
        else:
            cond = self.text(captions) if self.text is not None else None
        if weights is not None:
            cond = {**(cond or {}), "sample_weight": weights}
        return x, cond


    def _generators(self) -> dict:
        gens = {"data": self.real.rng} if self.real is not None else {}
        if self.prompts is not None:
            gens["prompts"] = self.prompts.rng
        return gens


    def _prepare_networks(self, teacher_model, student_model, fake_model) -> str:
        """Gradient checkpointing (trainable networks), attention backend, channels-last and torch.compile on the
        networks a step runs; returns what the attention modules run (``models.attention.describe``).

        ``nn.Module.compile`` compiles in place, so parameter names (checkpoints, EMA pairs) stay as they are.
        A fake score carrying the GAN head's forward hook is left eager (the hook keeps features aside)."""
        from ..models.attention import describe as describe_attention

        t = self.cfg.train
        settings = []
        for net in (n for n in (teacher_model, student_model, fake_model) if n is not None):
            if t.gradient_checkpointing and net is not teacher_model:
                name = "generator" if net is student_model else "fake score"
                enable_gradient_checkpointing(net, name, self.accelerator.print)
            compiled = t.compile and not (net is fake_model and uses_gan(self.cfg))
            settings.append(set_attention(net, t.attention, compiled))
            if t.channels_last:
                net.to(memory_format=torch.channels_last)
            if compiled:
                net.compile()
        backend = describe_attention(settings)  # what the modules run, with those left on their own processors
        self.accelerator.print(f"attention: {backend}")
        return backend


    def student_weights(self) -> torch.nn.Module:
        """The weights users get: the EMA when enabled, else the raw generator."""
        if self.gathered_student is not None:
            return self.gathered_student
        return self.ema if self.ema is not None else self.generator.denoiser.model

    def export_generator(self) -> Generator:
        """The student as its export samples it (sample grids, train.eval_every): a two-time (flow-map) student
        with map steps told r, as its pipeline; others with student.sampler."""
        from ..models import flux
        from ..models.flow_map import FlowMapGenerator, flow_map_embedding

        model = self.student_weights()
        denoiser, top = student_denoiser(self.cfg, self.teacher, model), sigma_init(self.cfg, self.teacher)
        if flow_map_embedding(model) is not None:
            return FlowMapGenerator(denoiser, self.cfg.student.num_steps, top)
        cls = flux.FluxGenerator if flux.takes_packed_latents(model) else Generator  # FluxPipeline's noise layout
        return cls(denoiser, self.cfg.student.num_steps, top, self.cfg.student.sampler)

