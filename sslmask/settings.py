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

import dataclasses
import functools
from dataclasses import dataclass, fields
from typing import Any, ClassVar, TypeVar, get_type_hints

from maskio.settings import SettingError, checked, closest, setting
from sslmask.optim import CLIP_MODES, DECAY_EXCLUDE, OPTIMIZERS

__all__ = ["ConfigError", "Section", "closest", "setting"]  # setting, closest: maskio's, re-exported


class ConfigError(Exception):
    """A config that cannot be used (unknown method or key, wrong type, unreadable file)."""


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
            try:
                kwargs[f.name] = checked(key, values[f.name], hints[f.name], f.metadata)
            except SettingError as exc:
                raise ConfigError(str(exc)) from None
        out = cls(**kwargs)
        try:
            out.check()
        except ValueError as exc:
            raise ConfigError(f"{cls.section}.{exc}") from None
        return out

    def check(self) -> None:
        """Relations between fields; a ValueError whose text starts with the field's name."""

    def as_dict(self) -> dict[str, Any]:
        """The section as its config mapping (lists copied, so the mapping can be edited)."""
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value


_hints = functools.cache(get_type_hints)  # a section's field types, read once per class


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
    """A run's whole config, parsed and checked once (``sslmask.config.parse``): the shared
    sections the training loop reads and the method's own sections (``sections``, in the
    order the method declares them), all typed. Methods are built from it and read their
    section with ``section(Kind)``; ``to_config`` gives back the plain mapping a checkpoint
    and ``config.yaml`` save, so saved runs stay readable without this package."""

    method: str
    data: DataSettings
    model: ModelSettings
    optim: OptimSettings
    ema: EMASettings
    train: TrainSettings
    monitor: MonitorSettings
    sections: tuple[Section, ...] = ()
    # each section's keys in the order its YAML gave them, so a saved config.yaml reads as the
    # packaged file does (the values do not depend on it)
    key_order: tuple[tuple[str, tuple[str, ...]], ...] = dataclasses.field(
        default=(), compare=False, repr=False
    )

    @classmethod
    def parse(cls, cfg: dict[str, Any], own: tuple[type[Section], ...]) -> RunSettings:
        """``cfg`` (a merged config mapping) with ``own``, the method's section classes."""
        shared = (section.of(cfg) for section in SHARED_SECTIONS)
        order = tuple((name, tuple(keys)) for name, keys in cfg.items() if isinstance(keys, dict))
        return cls(
            cfg["method"], *shared, sections=tuple(section.of(cfg) for section in own), key_order=order
        )

    def section(self, kind: type[S]) -> S:
        """The method's section of class ``kind`` (e.g. ``HARLSettings``)."""
        for section in self.sections:
            if type(section) is kind:
                return section
        raise ConfigError(f"a {self.method} config has no {kind.section!r} section")

    def replace(self, section: str, **values: Any) -> RunSettings:
        """A copy with ``values`` changed in the shared ``section``, checked as loading checks them."""
        old = getattr(self, section)
        return dataclasses.replace(self, **{section: type(old).from_dict({**old.as_dict(), **values})})

    def to_config(self) -> dict[str, Any]:
        """The plain mapping (method, shared sections, the method's own), as a run saves it."""
        shared = (getattr(self, s.section) for s in SHARED_SECTIONS)
        out = {"method": self.method, **{s.section: s.as_dict() for s in (*shared, *self.sections)}}
        for name, keys in self.key_order:
            if name in out and set(keys) == set(out[name]):
                out[name] = {key: out[name][key] for key in keys}
        return out
