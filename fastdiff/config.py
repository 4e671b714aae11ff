"""Typed run configuration: YAML file + ``--set key=value`` overrides into dataclasses.

Unknown keys and values of the wrong type are one-line errors naming the key.
"""
from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import re

import yaml

from .errors import FastdiffError, read_text
from .configs import named_configs

DEFAULT_TEACHER = "embedded:fmnist-ddpm"
DTYPES = ("float32", "bfloat16", "float16")


class _Loader(yaml.SafeLoader):
    """YAML 1.2 booleans: only true/false. YAML 1.1 would read ``mixed_precision: no`` as False. A key given twice
    in one mapping is an error (PyYAML keeps the last silently, so an edit above a forgotten line would not apply)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: its keys may be overridden
                continue
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} given twice (line {key_node.start_mark.line + 1})", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_Loader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:bool"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))


def _yaml(text: str):
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


@dataclass
class TeacherConfig:
    path: str = DEFAULT_TEACHER  # local diffusers folder, hub id, or embedded:<name>
    guidance_scale: float = 1.0  # CFG on the real score (teacher); 1 = none
    null_class: typing.Optional[int] = None  # class label meaning "no class"; default: the last embedding
    # Precision of every frozen network (teacher, VAE, text encoders): float32 | bfloat16 | float16. Trainable
    # copies (student, fake score) are always float32 master weights; a LoRA's frozen base is shared, in this dtype.
    dtype: str = "float32"


@dataclass
class StudentConfig:
    num_steps: int = 1  # sampling steps the student is trained for (multi-step: backward simulation)
    # First noise level (VE sigma; snapped to a training timestep on VP teachers); null = the top of the schedule.
    # auto: 2.5 for distribution matching, as in SiD (at the top of a linear DDPM schedule an eps student's x0 is
    # eps * 157, which diverged in our H100 runs); the top for consistency students, which learn every level.
    sigma_init: typing.Union[float, str, None] = "auto"
    # A diffusers model folder to start the student from (predicting in the teacher's parametrisation);
    # null = a copy of the teacher, as DMD2 and SiD do.
    model: typing.Optional[str] = None
    # Multi-step sampling: lcm (fresh noise between steps, exported as LCMScheduler) or ddim (the noise the step
    # implies: deterministic consistency sampling, exported as DDIMScheduler; needs the top of the schedule).
    sampler: str = "lcm"
    # LoRA student: rank of adapters on the teacher's attention / projection layers (0 = train all weights).
    # The frozen base is the teacher's own tensors (not a copy); exported as LoRA weights for the teacher pipeline.
    lora_rank: int = 0
    # LoRA scale alpha / rank; null = alpha = rank (scale 1). DMD2's SDXL LoRA: --lora_alpha 8 at rank 64. Exported
    # LoRA files carry the scale folded into lora_B, so load_lora_weights applies the trained delta.
    lora_alpha: typing.Optional[float] = None
    lora_export: str = "both"  # lora (weights for load_lora_weights) | fused (a full pipeline) | both
    # Multi-student distillation (`fastdiff msd`, training/msd.py): the class labels this student is distilled on,
    # its part of a class-conditional teacher's classes. Its samples, its fake score and its real data see only these.
    # null = every class.
    classes: typing.Optional[typing.List[int]] = None
    # Layer distillation (Presto-L): transformer blocks of the teacher the student drops (execution order; Flux:
    # double then single blocks; the final block stays). Exported with num_layers reduced. models/layer_skip.py
    skip_layers: typing.List[int] = field(default_factory=list)
    # Budget-conditioned layer distillation: each training forward drops b ~ U{0..layer_budget} blocks (those before
    # the final one) with a learned budget embedding; sample grids and the export use export_budget (null = the max).
    layer_budget: int = 0
    export_budget: typing.Optional[int] = None


def _objective_config() -> type:
    """The ``objective`` section: ``name``, the keys that shape the run's networks (``gan``, ``gan_readout``,
    ``fake_lora_rank``), and every registered objective's constructor options (``fastdiff.objectives.registry``),
    each defaulting to null = "that objective's own default" (shown per objective in the README). A key another
    objective takes is refused by :func:`validate`."""
    from .objectives import option_types

    fields = [("name", str, field(default="dmd2")),  # a registered objective (fastdiff.objectives.OBJECTIVES)
              ("gan", bool, field(default=False)),  # GAN head on the fake score's bottleneck (needs data)
              # its read-out: dmd2 (DMD2's conv branch) or sida (SiDA's channel mean); null = the objective's own
              ("gan_readout", typing.Optional[str], field(default=None)),
              # fake score as a LoRA on the teacher (vsd: 16); 0 = full copy
              ("fake_lora_rank", typing.Optional[int], field(default=None))]
    fields += [(key, _optional(tp), field(default=None)) for key, tp in option_types().items()]
    return dataclasses.make_dataclass("ObjectiveConfig", fields, namespace={"__doc__": _objective_config.__doc__})


def _optional(tp):
    return tp if type(None) in typing.get_args(tp) else typing.Optional[tp]


ObjectiveConfig = _objective_config()
RUN_SHAPE_KEYS = ("name", "gan", "gan_readout", "fake_lora_rank")  # objective.* keys the trainer reads, not the objective


@dataclass
class DataConfig:
    # fashion-mnist | imagefolder (images + metadata.jsonl captions) | analytic (exact samples of the analytic teacher)
    # | teacher (image-free, TBCM: samples of the teacher's own deterministic sampler; training/teacher_data.py)
    # | webdataset (tar shards: data.path a folder or glob of .tar; image + optional .txt / .cls per sample; streamed)
    # | pairs (objective reflow only: the (noise, teacher sample) folder of `fastdiff pairs` in data.path)
    name: str = "fashion-mnist"
    # fashion-mnist: null = $FASTDIFF_FASHION_MNIST, else /usr/share/datasets/fashion-mnist (Debian's package)
    path: typing.Optional[str] = None
    split: str = "train"
    resolution: typing.Optional[int] = None  # None = the teacher's image size (Fashion-MNIST is padded with -1)
    # imagefolder: decode images per batch instead of loading the folder (webdataset always streams); streamed
    # data keeps at most buffer_size decoded images in memory (an LRU buffer; 0 = none). training/streaming.py
    stream: bool = False
    buffer_size: int = 256
    # Text-to-image teachers: training prompts (one per line, or JSONL with "prompt"/"text"); null = the captions
    # of an imagefolder data set.
    prompts: typing.Optional[str] = None
    negative_prompt: typing.Optional[str] = None  # the unconditional prompt for CFG; null = the pipeline's default
    # objective fada (FADA's mixed supervision): [w0, w1], the ground-truth loss weight of an image of quality tier 0
    # / 1 ("tier" in the imagefolder's metadata.jsonl); null = objective.data_weight for every image.
    tier_weights: typing.Optional[typing.List[float]] = None
    # Latent teachers: encode the real images with the VAE once, at the start, and draw each step's latents from
    # the stored posteriors (the VAE then leaves the accelerator); false = encode every batch.
    cache_latents: bool = True
    # data.name teacher: the teacher's deterministic sampler (heun: EDM's second order on Karras levels; ddim: DDIM
    # eta 0 on VP teachers, Euler on flow ones) with this many levels, at this guidance scale (null =
    # teacher.guidance_scale); class-conditional teachers get uniform random labels, text teachers data.prompts.
    # On the analytic teacher 25 ddim levels keep 37-58% of a mode's variance, heun 40 levels 102-103%.
    teacher_sampler: str = "heun"
    teacher_steps: int = 25
    teacher_guidance: typing.Optional[float] = None
    # null = fresh teacher samples every batch; N = a pool of N samples, made chunk by chunk when first drawn and
    # stored under cache_dir (null = output_dir/teacher-samples), which never holds more than N samples.
    cache_size: typing.Optional[int] = None
    cache_dir: typing.Optional[str] = None


@dataclass
class TrainConfig:
    max_steps: int = 1000  # generator updates
    time_limit_minutes: typing.Optional[float] = None  # stop (checkpoint, export) after this much training time
    batch_size: int = 64  # per process and per micro-batch
    gradient_accumulation: int = 1
    seed: int = 0
    # null = the objective's reference (Objective.train_defaults), else 1e-5
    lr_generator: typing.Optional[float] = None
    lr_critic: typing.Optional[float] = None
    lr_schedule: str = "constant"  # constant | cosine (to 0 at max_steps), for both optimizers
    # null = the objective's reference (Objective.train_defaults; README's parity table): dmd2 warms up for
    # 500 fake-score iterations as DMD2's scripts do, the others start at once.
    lr_warmup_steps: typing.Optional[int] = None  # linear warm-up of both learning rates, in generator updates
    # null = the objective's reference: (0.9, 0.999) for dmd2 / vsd / cd (PyTorch's default, DMD2's and LCM's
    # scripts), (0, 0.999) for sid / sida / sim (SiD's sid_train.py)
    adam_betas: typing.Optional[typing.List[float]] = None
    weight_decay: typing.Optional[float] = None  # null = the objective's reference: 0.01 (AdamW, DMD2), 0 for SiD (Adam)
    # gradient-norm clip; null = the objective's reference (Objective.train_defaults): none (0) for SiD, sCM, rCM,
    # reflow, AGD, whose references never clip; LCM's 1 for cd; Sana's 0.1 for ladd; DMD2's 10 otherwise (README)
    grad_clip: typing.Optional[float] = None  # 0 = no clip (the norm is still logged)
    # Generator EMA as SiD / EDM keep it: a half-life in images, ramped up to ema_rampup x the images seen so far
    # (so a short run never exports its start: the start's weight falls to 0 at the first update).
    ema_halflife_kimg: float = 500.0  # SiD's --ema 0.5 (Mimg); 0 disables the EMA
    ema_rampup: typing.Optional[float] = 0.05  # null = no ramp-up
    ema_decay: typing.Optional[float] = None  # a fixed per-update decay instead of the half-life (0 disables the EMA)
    # EDM2's power-function EMA instead of the half-life (rCM's PowerEMA, rate 0.1): its relative width sigma_rel
    ema_sigma_rel: typing.Optional[float] = None
    # progressive objectives (hyper-sd): the EMA set to the student when a stage ends (after its export), so the next
    # stage's EMA averages only that stage's updates; not at the run's last update (measured: eval/results/bench-gmm-cpu/README.md, Hyper-SD)
    ema_stage_restart: bool = True
    mixed_precision: str = "no"  # no | bf16 | fp16
    # none (every process holds every network) | fsdp (PyTorch FSDP2: student, EMA, fake score and teacher sharded
    # per block over the processes; training/sharding.py)
    sharding: str = "none"
    checkpoint_every: int = 500
    checkpoint_limit: int = 3  # how many checkpoints to keep
    max_nonfinite_steps: int = 20  # consecutive skipped (non-finite) updates before the run stops
    gradient_checkpointing: bool = False  # recompute activations of the trainable networks in backward (less memory)
    attention: str = "auto"  # auto (SDPA when compiled, else xformers where its kernels run, else SDPA) | sdpa | xformers
    compile: bool = False  # torch.compile the teacher, fake score and generator networks
    channels_last: bool = False  # channels-last memory format for convolutional networks (faster convs on GPUs)
    # cuDNN times its convolution algorithms per input shape and keeps the fastest (EDM's training loop does by
    # default); two GPU runs may then differ in the last bits (as they may anyway where kernels use atomics)
    cudnn_benchmark: bool = False
    sample_every: int = 500
    num_sample_images: int = 64
    log_every: int = 10
    # Experiment trackers (accelerate): tensorboard (output_dir/logs) | wandb (pip install wandb) | none | all
    # (tensorboard, and wandb when installed). Scalars every log_every steps, sample grids as images.
    report_to: str = "tensorboard"
    # FID / KID while training (`fastdiff distill`, as SiD's and EDM's loops measure it): at the start, every
    # eval_every generator updates (0 = never) and at the last one, the student the run exports (the EMA where
    # kept, float32) samples eval_images images the way `fastdiff fid STUDENT --steps K --seed S --batch-size B`
    # does (S = train.seed, B = train.batch_size), scored against eval_reference (statistics from `fastdiff
    # ref-stats`), images centre-cropped to eval_crop first (the Fashion-MNIST teachers make 32x32 padded images of
    # 28x28 data); eval_inception: the Inception weights (null: as `fastdiff fid` finds them). eval_keep_best: the
    # lowest-FID student also exported to output_dir/student-best.
    eval_every: int = 0
    eval_reference: typing.Optional[str] = None
    eval_images: int = 10000
    eval_crop: typing.Optional[int] = None
    eval_inception: typing.Optional[str] = None
    eval_keep_best: bool = False
    # text-to-image students: the prompts they sample from (a file, one per line or JSONL; one per image or one for
    # all), as `fastdiff fid STUDENT --prompts FILE` takes them
    eval_prompts: typing.Optional[str] = None


@dataclass
class Config:
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output_dir: str = "runs/fastdiff"


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


class _NotFinite(FastdiffError):
    """A number that is nan or inf: reported as such even where the field also takes other types."""


def _coerce(key: str, value, tp):
    """Check (and gently convert) a value against a dataclass field type; raise FastdiffError naming key."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        finite = None  # a number that is not finite: say so rather than list the types
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except _NotFinite as e:
                finite = e
            except FastdiffError:
                pass
        if finite is not None:
            raise finite
        raise FastdiffError(f"{key}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if origin in (list, typing.List):
        (item,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise FastdiffError(f"{key}: expected a list, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            if not math.isfinite(number):  # no setting means nan or inf; torch would fail later, or train on it
                raise _NotFinite(f"{key}: expected a finite number, got {value!r}")
            return number
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    else:
        return value
    raise FastdiffError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def _apply(obj, updates: dict, prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in updates.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise FastdiffError(f"unknown config key {full!r}; known keys here: {', '.join(sorted(names))}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise FastdiffError(f"{full}: expected a section (mapping), got {value!r}")
            _apply(current, value, full + ".")
        else:
            setattr(obj, key, _coerce(full, value, hints[key]))


def _merged(base: dict, child: dict) -> dict:
    """``child`` over ``base``: sections merge key by key, every other value of the child replaces the base's."""
    out = dict(base)
    for key, value in child.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _read_yaml(name_or_path: str, _chain: tuple = ()) -> dict:
    """A config file or named config as a dict; ``base: other`` (a named config, or a file path relative to this
    file's folder) is read first, recursively, and this config merged over it. A cycle is refused."""
    path = Path(name_or_path)
    key = str(path.resolve()) if path.is_file() else name_or_path
    if key in _chain:
        names = [Path(k).name if "/" in k else k for k in (*_chain, key)]
        raise FastdiffError(f"config {name_or_path}: base cycle {' -> '.join(names)}")
    data = _read_one_yaml(name_or_path)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str) or not base:
        raise FastdiffError(f"config {name_or_path}: base must be a config name or file, got {base!r}")
    if path.is_file() and (path.parent / base).is_file():
        base = str(path.parent / base)
    return _merged(_read_yaml(base, (*_chain, key)), data)


def _read_one_yaml(name_or_path: str) -> dict:
    path = Path(name_or_path)
    if path.is_file():
        text = read_text(path, "config")
    else:
        if path.name != name_or_path or path.suffix in (".yaml", ".yml"):  # a path, not a name: no named-config lookup
            named = path.stem if path.suffix in (".yaml", ".yml") and path.stem in named_configs() else None
            hint = f" (the named config is --config {named}, without {path.suffix})" if named else ""
            raise FastdiffError(f"config file {name_or_path} not found{hint}")  # a name joined as a path could escape
        packaged = resources.files("fastdiff.configs") / f"{name_or_path}.yaml"
        if not packaged.is_file():
            raise FastdiffError(
                f"config {name_or_path!r} is neither a file nor a named config ({', '.join(named_configs())})")
        text = packaged.read_text()
    try:
        data = _yaml(text) or {}
    except yaml.YAMLError as exc:
        raise FastdiffError(f"config {name_or_path}: invalid YAML ({str(exc).splitlines()[0]})") from exc
    if not isinstance(data, dict):
        raise FastdiffError(f"config {name_or_path}: the top level must be a mapping of sections")
    return data


def check_seed(seed: int, name: str) -> None:
    """A seed every command takes alike: [0, 2^32) (torch's generators take 64 bits; a batch b draws seed + b)."""
    if not 0 <= seed < 2**32:
        raise FastdiffError(f"{name} must be in [0, 2^32), got {seed}")


def flat_config(cfg, overrides: list[str], positive: tuple[str, ...]):
    """A command's own flat settings (``fastdiff tune`` / ``upscale``): ``key=value`` overrides applied to ``cfg``
    (unknown keys and bad types refused), then the ``positive`` keys checked; returns ``cfg``."""
    for item in overrides:
        _apply(cfg, parse_override(item))
    for key in positive:
        if getattr(cfg, key) <= 0:
            raise FastdiffError(f"{key} must be positive, got {getattr(cfg, key)}")
    for key in ("weight_decay", "grad_clip"):  # torch refuses the first with a traceback, trains on the second
        if getattr(cfg, key, 0) < 0:
            raise FastdiffError(f"{key} must be 0 or more, got {getattr(cfg, key)}")
    check_seed(getattr(cfg, "seed", 0), "seed")
    return cfg


def parse_override(item: str) -> dict:
    """``a.b.c=value`` -> nested dict; the value is read as YAML (numbers, booleans, lists, null)."""
    if "=" not in item:
        raise FastdiffError(f"--set {item!r}: expected key=value, e.g. --set train.max_steps=100")
    key, raw = item.split("=", 1)
    try:
        value = _yaml(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    nested: dict = {}
    node = nested
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return nested


DATA_NAMES = ("fashion-mnist", "imagefolder", "webdataset", "analytic", "teacher", "pairs")


def validate(cfg: Config) -> None:
    """Range checks that types alone cannot express."""
    t = cfg.train
    positive = {"train.max_steps": t.max_steps, "train.batch_size": t.batch_size,
                "train.gradient_accumulation": t.gradient_accumulation, "train.checkpoint_every": t.checkpoint_every,
                "train.sample_every": t.sample_every, "train.log_every": t.log_every,
                "train.checkpoint_limit": t.checkpoint_limit, "student.num_steps": cfg.student.num_steps,
                "train.max_nonfinite_steps": t.max_nonfinite_steps, "train.num_sample_images": t.num_sample_images}
    o = cfg.objective
    if o.critic_updates is not None:
        positive["objective.critic_updates"] = o.critic_updates
    for key, value in positive.items():
        if value <= 0:
            raise FastdiffError(f"{key} must be a positive integer, got {value}")
    sigma = cfg.student.sigma_init
    if (isinstance(sigma, str) and sigma != "auto") or (not isinstance(sigma, str) and sigma is not None
                                                        and not (0 < sigma < math.inf)):
        raise FastdiffError(f"student.sigma_init must be a positive number, null (the top) or auto, got {sigma!r}")
    check_seed(t.seed, "train.seed")
    for key in ("lr_generator", "lr_critic", "weight_decay", "grad_clip"):  # grad_clip 0: no clip
        value = getattr(t, key)
        if value is not None and (value < 0 or (value == 0 and key.startswith("lr_"))):
            raise FastdiffError(f"train.{key} must be {'positive' if key.startswith('lr_') else '>= 0'}"
                                f"{' (0: no clip)' if key == 'grad_clip' else ''}, got {value}")
    if t.adam_betas is not None and (len(t.adam_betas) != 2 or not all(0 <= b < 1 for b in t.adam_betas)):
        raise FastdiffError(f"train.adam_betas must be two numbers in [0, 1), got {t.adam_betas}")
    if t.eval_every < 0 or t.eval_images < 2 or (t.eval_crop is not None and t.eval_crop <= 0):
        raise FastdiffError(f"train.eval_every must be >= 0 (0 = never), train.eval_images at least 2 (a covariance) "
                            f"and train.eval_crop positive; got {t.eval_every}, {t.eval_images}, {t.eval_crop}")
    if t.eval_every and not t.eval_reference:
        raise FastdiffError("train.eval_every needs train.eval_reference: statistics of real images, made once with "
                            "`fastdiff ref-stats IMAGES --out ref.npz`")
    if (t.eval_keep_best or t.eval_prompts) and not t.eval_every:
        raise FastdiffError(f"train.{'eval_keep_best' if t.eval_keep_best else 'eval_prompts'} is for the FIDs "
                            "measured while training: set train.eval_every too")
    if t.time_limit_minutes is not None and t.time_limit_minutes <= 0:
        raise FastdiffError(f"train.time_limit_minutes must be positive, got {t.time_limit_minutes}")
    d = cfg.data
    if d.name not in DATA_NAMES:  # checked here too: objectives that read no data would otherwise ignore a typo
        raise FastdiffError(f"data.name {d.name!r} is not one of {', '.join(DATA_NAMES)}")
    if d.resolution is not None and d.resolution <= 0:
        raise FastdiffError(f"data.resolution must be positive or null (the teacher's size), got {d.resolution}")
    if d.teacher_sampler not in ("ddim", "heun") or d.teacher_steps < 2 or (d.cache_size is not None and d.cache_size <= 0):
        raise FastdiffError(f"data.teacher_sampler must be heun or ddim, data.teacher_steps >= 2 and data.cache_size "
                            f"positive or null; got {d.teacher_sampler!r}, {d.teacher_steps}, {d.cache_size}")
    if d.buffer_size < 0:
        raise FastdiffError(f"data.buffer_size must be >= 0 (0 = no buffer), got {d.buffer_size}")
    if d.tier_weights is not None and (len(d.tier_weights) != 2 or min(d.tier_weights) < 0):
        raise FastdiffError(f"data.tier_weights must be two non-negative numbers [tier 0, tier 1], "
                            f"got {d.tier_weights}")
    if d.tier_weights is not None and (cfg.objective.name != "fada" or d.name != "imagefolder" or d.stream):
        raise FastdiffError("data.tier_weights applies to objective fada on data.name imagefolder (not streamed), "
                            "whose metadata.jsonl gives each image a \"tier\"")
    if d.stream and d.name not in ("imagefolder", "webdataset"):
        raise FastdiffError(f"data.stream applies to imagefolder (webdataset always streams), not {d.name}")
    if (d.name == "pairs") != (cfg.objective.name == "reflow"):
        raise FastdiffError("objective.name reflow trains on data.name pairs (a `fastdiff pairs` folder), and only it")
    if t.lr_schedule not in ("constant", "cosine"):
        raise FastdiffError(f"train.lr_schedule must be constant or cosine, got {t.lr_schedule!r}")
    if t.lr_warmup_steps is not None and t.lr_warmup_steps < 0:
        raise FastdiffError(f"train.lr_warmup_steps must be >= 0, got {t.lr_warmup_steps}")
    if cfg.student.sampler not in ("lcm", "ddim"):
        raise FastdiffError(f"student.sampler must be lcm or ddim, got {cfg.student.sampler!r}")
    if t.report_to not in ("tensorboard", "wandb", "none", "all"):
        raise FastdiffError(f"train.report_to must be tensorboard, wandb, none or all, got {t.report_to!r}")
    if t.attention not in ("auto", "sdpa", "xformers"):
        raise FastdiffError(f"train.attention must be auto, sdpa or xformers, got {t.attention!r}")
    if cfg.teacher.dtype not in DTYPES:
        raise FastdiffError(f"teacher.dtype must be one of {', '.join(DTYPES)}, got {cfg.teacher.dtype!r}")
    if cfg.student.layer_budget < 0 or (cfg.student.layer_budget and (cfg.student.skip_layers or cfg.student.lora_rank)):
        raise FastdiffError(f"student.layer_budget must be >= 0 and cannot be combined with student.skip_layers or "
                            f"student.lora_rank; got {cfg.student.layer_budget}")
    if cfg.student.export_budget is not None and not cfg.student.layer_budget:
        raise FastdiffError("student.export_budget needs student.layer_budget (a budget-conditioned student)")
    if cfg.student.skip_layers and cfg.student.lora_rank and cfg.student.lora_export != "fused":
        raise FastdiffError("student.skip_layers with student.lora_rank: adapters for the teacher's blocks do not fit "
                            "the smaller transformer; set student.lora_export=fused")
    if cfg.student.lora_rank < 0:
        raise FastdiffError(f"student.lora_rank must be 0 (full student) or positive, got {cfg.student.lora_rank}")
    if cfg.student.lora_alpha is not None and (cfg.student.lora_alpha <= 0 or not cfg.student.lora_rank):
        raise FastdiffError(f"student.lora_alpha must be positive and needs student.lora_rank, got "
                            f"{cfg.student.lora_alpha} at rank {cfg.student.lora_rank}")
    if cfg.student.lora_export not in ("lora", "fused", "both"):
        raise FastdiffError(f"student.lora_export must be lora, fused or both, got {cfg.student.lora_export!r}")
    if t.mixed_precision not in ("no", "bf16", "fp16"):
        raise FastdiffError(f"train.mixed_precision must be no, bf16 or fp16, got {t.mixed_precision!r}")
    if t.sharding not in ("none", "fsdp"):
        raise FastdiffError(f"train.sharding must be none or fsdp, got {t.sharding!r}")
    if t.sharding == "fsdp" and t.channels_last:  # FSDP2 shards only contiguous parameters
        raise FastdiffError("train.channels_last does not run with train.sharding fsdp (FSDP shards contiguous "
                            "parameters only): set one of them off")
    if t.ema_decay is not None and not 0.0 <= t.ema_decay < 1.0:
        raise FastdiffError(f"train.ema_decay must be in [0, 1), got {t.ema_decay}")
    if t.ema_sigma_rel is not None and not 0.0 < t.ema_sigma_rel < 0.28:  # gamma = 0 at sigma_rel 0.2887
        raise FastdiffError(f"train.ema_sigma_rel must be in (0, 0.28) (EDM2's power EMA: 0.05 - 0.15 is typical), "
                            f"got {t.ema_sigma_rel}")
    if t.ema_sigma_rel is not None and t.ema_decay is not None:
        raise FastdiffError("train.ema_sigma_rel and train.ema_decay are two EMA rules: set one of them")
    if t.ema_halflife_kimg < 0 or (t.ema_rampup is not None and t.ema_rampup <= 0):
        raise FastdiffError("train.ema_halflife_kimg must be >= 0 and train.ema_rampup positive or null")
    if t.weight_decay is not None and t.weight_decay < 0:
        raise FastdiffError(f"train.weight_decay must be >= 0, got {t.weight_decay}")
    lo, hi = 0.0 if o.min_t is None else o.min_t, 1.0 if o.max_t is None else o.max_t
    if not 0.0 <= lo < hi <= 1.0:
        raise FastdiffError("objective.min_t and objective.max_t must satisfy 0 <= min_t < max_t <= 1")
    from .objectives.base import FAKE_LOSSES, SIGMA_GRIDS

    if o.fake_loss not in (None, *FAKE_LOSSES):
        raise FastdiffError(f"objective.fake_loss must be one of {', '.join(FAKE_LOSSES)}, got {o.fake_loss!r}")
    if o.sigma_grid not in (None, *SIGMA_GRIDS):
        raise FastdiffError(f"objective.sigma_grid must be one of {', '.join(SIGMA_GRIDS)}, got {o.sigma_grid!r}")
    from .objectives.gan import READOUTS

    if o.gan_readout is not None and o.gan_readout not in READOUTS:
        raise FastdiffError(f"objective.gan_readout must be dmd2 (DMD2's conv branch) or sida (SiDA's channel mean), "
                            f"got {o.gan_readout!r}")
    if o.gan_start_images is not None and o.gan_start_images < 0:
        raise FastdiffError(f"objective.gan_start_images must be >= 0, got {o.gan_start_images}")
    if o.critic_clip_value is not None and o.critic_clip_value < 0:
        raise FastdiffError(f"objective.critic_clip_value must be >= 0 (0 = off), got {o.critic_clip_value}")
    if o.fake_lora_rank is not None and o.fake_lora_rank < 0:
        raise FastdiffError(f"objective.fake_lora_rank must be 0 (full copy) or positive, got {o.fake_lora_rank}")
    if o.guidance_range is not None and len(o.guidance_range) != 2:
        raise FastdiffError(f"objective.guidance_range must be [lo, hi], got {o.guidance_range}")
    if o.timestep_scaling is not None and o.timestep_scaling <= 0:
        raise FastdiffError(f"objective.timestep_scaling must be positive, got {o.timestep_scaling}")
    if o.c is not None and o.c <= 0:
        raise FastdiffError(f"objective.c must be positive, got {o.c}")
    from .objectives import OBJECTIVES

    if o.name not in OBJECTIVES:
        raise FastdiffError(f"unknown objective {o.name!r}; choose one of: {', '.join(sorted(OBJECTIVES))}")
    takes = OBJECTIVES[o.name].options()
    for key, value in dataclasses.asdict(o).items():
        if value is not None and key not in RUN_SHAPE_KEYS and key not in takes:
            raise FastdiffError(f"objective.{key} does not apply to {o.name}")


def load_config(config: str | None = None, overrides: list[str] | tuple = ()) -> Config:
    cfg = Config()
    if config is not None:
        if not isinstance(config, (str, os.PathLike)) or not str(config):  # '' is an unset shell variable, say
            raise FastdiffError(f"--config {config!r}: give a YAML file or a named config ({', '.join(named_configs())})")
        _apply(cfg, _read_yaml(str(config)))
    if isinstance(overrides, str) or not all(isinstance(item, str) for item in overrides):
        raise FastdiffError(f"overrides must be a list of 'key=value' strings, got {overrides!r}")
    for item in overrides:
        _apply(cfg, parse_override(item))
    validate(cfg)
    return cfg


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)
