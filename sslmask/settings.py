"""Typed config sections: each section of a run's config is a frozen dataclass whose fields
carry their own checks (``setting(ge=..., choices=...)``), built once when the YAML is loaded.

Why dataclasses: the standard library's, frozen, with typed fields a method reads as
attributes, no new dependency, and no change to what is saved. The values themselves, with
the papers they come from, stay in the packaged YAML files (``sslmask/configs``), which
``extends:``, ``--config`` and ``--set`` merge as before; a section class says what each key
may hold. The run's config travels (checkpoint, ``config.yaml``) as the plain mapping, so
every saved run loads unchanged.
"""

from __future__ import annotations

import difflib
import functools
import math
import types
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, TypeVar, Union, get_args, get_origin, get_type_hints

from sslmask.optim import CLIP_MODES, DECAY_EXCLUDE, OPTIMIZERS


class ConfigError(Exception):
    """A config that cannot be used (unknown method or key, wrong type, unreadable file)."""


def setting(*, ge=None, gt=None, le=None, lt=None, choices: tuple[Any, ...] | None = None) -> Any:
    """A field that must be >= ge, > gt, <= le, < lt and/or one of ``choices`` (None: not checked).
    The value itself comes from the YAML: a section field has no default."""
    return field(metadata={"ge": ge, "gt": gt, "le": le, "lt": lt, "choices": choices})


def closest(name: str, valid: list[str], prefix: str = "") -> str:
    """``"; did you mean 'section.key'?"`` for the valid name nearest a misspelt one, or ``""``."""
    match = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
    return f"; did you mean '{prefix}{match[0]}'?" if match else ""


S = TypeVar("S", bound="Section")


@dataclass(frozen=True)
class Section:
    """A config section; subclasses are frozen dataclasses naming their ``section``."""

    section: ClassVar[str] = ""

    @classmethod
    def of(cls: type[S], cfg: dict[str, Any]) -> S:
        """This section of a whole config mapping, checked."""
        if not isinstance(cfg.get(cls.section), dict):
            raise ConfigError(f"the config has no {cls.section!r} section")
        return cls.from_dict(cfg[cls.section])

    @classmethod
    def from_dict(cls: type[S], values: dict[str, Any]) -> S:
        hints = _hints(cls)
        names = [f.name for f in fields(cls)]
        for key in values:
            if key not in names:
                raise ConfigError(
                    f"unknown config key '{cls.section}.{key}'{closest(key, names, cls.section + '.')}"
                )
        kwargs = {}
        for f in fields(cls):
            key = f"{cls.section}.{f.name}"
            if f.name not in values:
                raise ConfigError(f"{key}: missing from the config")
            kwargs[f.name] = _typed(key, values[f.name], hints[f.name])
            _check_limits(key, kwargs[f.name], f.metadata)
        out = cls(**kwargs)
        try:
            out.check()
        except ValueError as exc:
            raise ConfigError(f"{cls.section}.{exc}") from None
        return out

    def check(self) -> None:
        """Relations between fields; a ValueError whose text starts with the field's name."""


_hints = functools.cache(get_type_hints)  # a section's field types, read once per class


def _typed(key: str, value: Any, hint: Any) -> Any:
    """``value`` as ``hint`` says (int, float, bool, str, list[...], X | None), or a ConfigError."""
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (hint,) = [a for a in args if a is not type(None)]
        origin, args = get_origin(hint), get_args(hint)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [_typed(key, v, args[0]) for v in value]
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }[hint]
    if not ok:
        raise ConfigError(f"{key} must be {hint.__name__}, got {value!r}")
    return float(value) if hint is float else value


def _range_text(m: dict[str, Any]) -> str:
    low = f"[{m['ge']:g}" if m["ge"] is not None else f"({m['gt']:g}" if m["gt"] is not None else None
    high = f"{m['le']:g}]" if m["le"] is not None else f"{m['lt']:g})" if m["lt"] is not None else None
    if high is None:
        return f">= {m['ge']:g}" if m["ge"] is not None else f"> {m['gt']:g}"
    if low is None:
        return f"<= {m['le']:g}" if m["le"] is not None else f"< {m['lt']:g}"
    return f"in {low}, {high}"


def _check_limits(key: str, value: Any, m: Any) -> None:
    if not m or value is None:
        return
    if m["choices"] is not None and value not in m["choices"]:
        raise ConfigError(f"{key}={value!r}: must be one of {', '.join(map(str, m['choices']))}")
    limited = [m[k] is not None for k in ("ge", "gt", "le", "lt")]
    for v in value if isinstance(value, list) else [value]:
        if not any(limited) or isinstance(v, str):
            continue
        bad = not math.isfinite(v)
        bad |= (m["ge"] is not None and v < m["ge"]) or (m["gt"] is not None and v <= m["gt"])
        bad |= (m["le"] is not None and v > m["le"]) or (m["lt"] is not None and v >= m["lt"])
        if bad:
            raise ConfigError(f"{key}={value}: must be {_range_text(m)}")


# The largest view or evaluation side: 4096 px is 16x ImageNet's 224 and still fits in memory;
# a mistyped 100000 would ask for tens of GB before failing.
MAX_IMAGE_SIZE = 4096


@dataclass(frozen=True)
class FallbackBand(Section):
    """The foreground band inside which a mask-aware term applies (else the method's plain loss)."""

    fallback_min: float = setting(ge=0, le=1)
    fallback_max: float = setting(ge=0, le=1)

    def check(self) -> None:
        if not self.fallback_min < self.fallback_max:
            raise ValueError(
                f"fallback_min={self.fallback_min} must be below fallback_max={self.fallback_max}"
            )


@dataclass(frozen=True)
class DataSettings(Section):
    section = "data"
    image_size: int = setting(ge=16, le=MAX_IMAGE_SIZE)
    batch_size: int = setting(ge=1)
    workers: int = setting(ge=0)
    samples_per_epoch: int | None = setting(ge=1)
    crop_min_scale: float = setting(gt=0, le=1)
    min_fg: float = setting(ge=0, lt=1)
    images: str | None = setting()


@dataclass(frozen=True)
class ModelSettings(Section):
    section = "model"
    arch: str = setting()
    out_stride: int = setting(choices=(16, 32))
    proj_hidden: int = setting(ge=1)
    proj_dim: int = setting(ge=1)
    pred_hidden: int = setting(ge=1)
    init: str | None = setting()

    def check(self) -> None:
        if self.init == "":
            raise ValueError("init='': must be a checkpoint path or null")


@dataclass(frozen=True)
class OptimSettings(Section):
    section = "optim"
    name: str = setting(choices=OPTIMIZERS)
    lr: float = setting(gt=0)
    weight_decay: float = setting(ge=0)
    weight_decay_end: float | None = setting(ge=0)
    momentum: float = setting(ge=0, lt=1)
    warmup_epochs: int = setting(ge=0)
    final_lr: float = setting(ge=0)
    grad_clip: float = setting(ge=0)
    clip_mode: str = setting(choices=CLIP_MODES)
    decay_exclude: str = setting(choices=DECAY_EXCLUDE)


@dataclass(frozen=True)
class EMASettings(Section):
    section = "ema"
    tau_base: float = setting(ge=0, le=1)
    schedule: str = setting(choices=("cosine", "constant"))


@dataclass(frozen=True)
class TrainSettings(Section):
    section = "train"
    epochs: int = setting(ge=1)
    seed: int = setting(ge=0, le=2**32 - 1)  # numpy's and torch's generators take 32 or 64 bits
    amp: str = setting(choices=("auto", "bf16", "fp16", "none"))
    channels_last: bool = setting()
    compile: bool = setting()
    sync_bn: bool = setting()
    deterministic: bool = setting()
    ckpt_every: int = setting(ge=1)
    snapshot_epochs: list[int] = setting(ge=1)
    log_every: int = setting(ge=1)
    max_nan_skips: int = setting(ge=0)

    def check(self) -> None:
        if any(e > self.epochs for e in self.snapshot_epochs):
            raise ValueError(
                f"snapshot_epochs={self.snapshot_epochs}: must be whole epochs in [1, train.epochs={self.epochs}]"
            )


@dataclass(frozen=True)
class MonitorSettings(Section):
    section = "monitor"
    knn_every: int = setting(ge=0)
    knn_k: int = setting(ge=1)
    knn_holdout: float = setting(gt=0, lt=1)


SHARED_SECTIONS: tuple[type[Section], ...] = (
    DataSettings,
    ModelSettings,
    OptimSettings,
    EMASettings,
    TrainSettings,
    MonitorSettings,
)


@dataclass(frozen=True)
class RunSettings:
    """The sections every run has, typed: what the training loop reads."""

    method: str
    data: DataSettings
    model: ModelSettings
    optim: OptimSettings
    ema: EMASettings
    train: TrainSettings
    monitor: MonitorSettings

    @classmethod
    def of(cls, cfg: dict[str, Any]) -> RunSettings:
        return cls(cfg["method"], *(section.of(cfg) for section in SHARED_SECTIONS))
