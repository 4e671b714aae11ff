"""The objectives by name. Each objective file registers its class; its constructor is its configuration.

An objective's typed keyword parameters are its ``objective.*`` config keys (``alpha: float = 1.2`` becomes
``objective.alpha``, null meaning the objective's own default); the trainer supplies the networks (``teacher``,
``fake``, ``student``, ``gan_head``) and, for consistency students, ``sigma_max``. So adding an objective is one file
that ends with ``register("name", Class)``, plus its test: config, trainer and CLI find it here.
"""
from __future__ import annotations

import inspect
import types
import typing
from dataclasses import dataclass, field

# Constructor parameters the trainer fills in: not config keys.
SUPPLIED = ("self", "teacher", "fake", "student", "gan_head", "sigma_max")


@dataclass(frozen=True)
class Entry:
    """One name users can put in ``objective.name``: a class and the defaults that make this variant of it."""

    name: str
    cls: type
    defaults: dict = field(default_factory=dict)
    needs_gan: bool = False  # trains a GAN head on real data (so the run loads data)
    fake_lora_rank: int | None = None  # the fake score as a LoRA of this rank on the teacher (None: a full copy)

    def options(self) -> dict[str, object]:
        """Config key -> type, from the constructor's annotations."""
        hints = typing.get_type_hints(self.cls.__init__)
        params = inspect.signature(self.cls.__init__).parameters
        return {name: hints.get(name, typing.Any) for name, p in params.items()
                if name not in SUPPLIED and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}

    def arguments(self, options: dict) -> dict:
        """The values the constructor gets: its own defaults, under this variant's, under the ``options`` that are
        set (None = default)."""
        params = inspect.signature(self.cls.__init__).parameters
        own = {k: params[k].default for k in self.options() if params[k].default is not params[k].empty}
        return {**own, **self.defaults, **{k: v for k, v in options.items() if v is not None}}


OBJECTIVES: dict[str, Entry] = {}


def register(name: str, cls: type, defaults: dict | None = None, needs_gan: bool = False,
             fake_lora_rank: int | None = None) -> type:
    """Make ``cls`` available as ``objective.name: name`` (with ``defaults`` replacing its constructor's; a
    ``fake_lora_rank`` makes its fake score a LoRA on the teacher unless the config sets objective.fake_lora_rank)."""
    if name in OBJECTIVES and OBJECTIVES[name].cls is not cls:
        raise ValueError(f"objective {name!r} is registered twice ({OBJECTIVES[name].cls.__name__}, {cls.__name__})")
    entry = Entry(name, cls, dict(defaults or {}), needs_gan, fake_lora_rank)
    unknown = sorted(set(entry.defaults) - set(entry.options()))
    if unknown:
        raise ValueError(f"objective {name!r}: defaults for parameters {cls.__name__} does not take: {unknown}")
    OBJECTIVES[name] = entry
    return cls


def option_types() -> dict[str, object]:
    """Every objective's config keys with their types (one type per key across objectives)."""
    types: dict[str, object] = {}
    for entry in OBJECTIVES.values():
        for key, tp in entry.options().items():
            known = types.setdefault(key, tp)
            if _normal(known) != _normal(tp):
                raise TypeError(f"objective.{key} has type {known} in one objective and {tp} in {entry.cls.__name__}")
    return types


def _normal(tp):
    """A type with Optional removed and list[X] / typing.List[X] made equal, for comparing declarations."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = tuple(a for a in args if a is not type(None))
        return _normal(rest[0]) if len(rest) == 1 else tuple(_normal(a) for a in rest)
    if typing.get_origin(tp) is list:
        return ("list", tuple(_normal(a) for a in args))
    return tp
