"""Run configuration: a method's YAML shipped with the package, an optional overlay file,
then ``--set section.key=value`` overrides. Unknown keys and wrong types are errors."""

from __future__ import annotations

import contextlib
import copy
import math
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from maskio.errors import KeyValueError
from maskio.keyvalue import parse_value, split_pair


class ConfigError(Exception):
    """A config that cannot be used (unknown method or key, wrong type, unreadable file)."""


BASE = "base"


def available_methods() -> list[str]:
    files = resources.files("sslmask.configs").iterdir()
    names = (f.name[:-5] for f in files if f.name.endswith(".yaml") and "-" not in f.name)
    return sorted(n for n in names if n != BASE)


def _packaged(name: str) -> dict[str, Any]:
    """A packaged config with its ``extends`` chain resolved (the child adds and overrides keys)."""
    cfg = yaml.safe_load(resources.files("sslmask.configs").joinpath(f"{name}.yaml").read_text())
    parent = cfg.pop("extends", None)
    if parent is None:
        return cfg
    merged = _packaged(parent)
    _extend(merged, cfg)
    return merged


def _extend(base: dict[str, Any], child: dict[str, Any]) -> None:
    for key, value in child.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _extend(base[key], value)
        else:
            base[key] = value


def default_config(method: str) -> dict[str, Any]:
    if method not in available_methods():
        raise ConfigError(f"unknown method {method!r}; choose from {', '.join(available_methods())}")
    cfg = _packaged(method)
    return {"method": cfg.pop("method"), **cfg}


def packaged_overlay(name: str) -> Path | None:
    """A config overlay shipped with the package (``cpu-demo``), by name."""
    path = resources.files("sslmask.configs").joinpath(f"{name}.yaml")
    return Path(str(path)) if path.is_file() else None


def _check_type(key: str, old: Any, new: Any, where: str) -> Any:
    if old is None or new is None:
        return new
    if isinstance(new, str) and isinstance(old, (int, float)) and not isinstance(old, bool):
        with contextlib.suppress(ValueError):  # YAML 1.1 reads "1e-3" (no dot) as a string
            new = float(new)
    if isinstance(old, bool) != isinstance(new, bool):
        raise ConfigError(f"{where}: {key} must be {type(old).__name__}, got {new!r}")
    if isinstance(old, float) and isinstance(new, int):
        return float(new)
    if isinstance(old, int) and isinstance(new, float) and new.is_integer():
        return int(new)
    if type(old) is not type(new) and not (isinstance(old, (int, float)) and isinstance(new, (int, float))):
        raise ConfigError(f"{where}: {key} must be {type(old).__name__}, got {new!r}")
    return new


def _merge(base: dict[str, Any], overlay: dict[str, Any], where: str, prefix: str = "") -> None:
    for key, value in overlay.items():
        full = f"{prefix}{key}"
        if key not in base:
            raise ConfigError(f"{where}: unknown config key {full!r}")
        if isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: {full} is a section, got {value!r}")
            _merge(base[key], value, where, f"{full}.")
        else:
            base[key] = _check_type(full, base[key], value, where)


def parse_set(item: str) -> dict[str, Any]:
    """``"optim.lr=0.1"`` -> ``{"optim": {"lr": 0.1}}`` (values typed by ``maskio.keyvalue``)."""
    try:
        key, raw = split_pair(item, "--set")
    except KeyValueError as exc:
        raise ConfigError(str(exc)) from None
    value = parse_value(raw) if raw.strip() else None
    out: dict[str, Any] = {}
    node = out
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def load_config(
    method: str, config_file: str | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> dict:
    cfg = copy.deepcopy(default_config(method))
    if config_file:
        path = Path(config_file)
        if not path.is_file() and packaged_overlay(config_file) is not None:
            path = packaged_overlay(config_file)
        try:
            overlay = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"{config_file}: cannot read config ({exc})".replace("\n", " ")) from exc
        if not isinstance(overlay, dict):
            raise ConfigError(f"{config_file}: a config file must be a mapping")
        if overlay.get("method", method) != method:
            raise ConfigError(f"{config_file}: is for method {overlay['method']!r}, not {method!r}")
        overlay.pop("method", None)
        _merge(cfg, _shared_overlay(overlay, cfg), str(config_file))
    for item in overrides:
        _merge(cfg, parse_set(item), f"--set {item}")
    validate(cfg)
    return cfg


def _shared_overlay(overlay: dict[str, Any], cfg: dict[str, Any]) -> dict[str, Any]:
    """An overlay without the sections of other methods that ``cfg``'s method lacks: one overlay
    serves a whole comparison (``moco-cpu`` sets ``mocov2.queue`` and also trains BYOL). Any
    other unknown key is still refused, so a typo never passes silently."""
    methods = set(available_methods())
    return {k: v for k, v in overlay.items() if k in cfg or k not in methods}


# The largest view or evaluation side: 4096 px is 16x ImageNet's 224 and still fits in memory;
# a mistyped 100000 would ask for tens of GB before failing.
MAX_IMAGE_SIZE = 4096

# The range of every shared numeric key: (low, high, low_open, high_open); None = unbounded.
# Method sections check their own keys when the method is built.
RANGES: dict[str, tuple[float | None, float | None, bool, bool]] = {
    "data.image_size": (16, MAX_IMAGE_SIZE, False, False),
    "data.batch_size": (1, None, False, False),
    "data.workers": (0, None, False, False),
    "data.samples_per_epoch": (1, None, False, False),
    "data.crop_min_scale": (0, 1, True, False),
    "data.min_fg": (0, 1, False, True),
    "model.proj_hidden": (1, None, False, False),
    "model.proj_dim": (1, None, False, False),
    "model.pred_hidden": (1, None, False, False),
    "optim.lr": (0, None, True, False),
    "optim.weight_decay": (0, None, False, False),
    "optim.weight_decay_end": (0, None, False, False),
    "optim.momentum": (0, 1, False, True),
    "optim.warmup_epochs": (0, None, False, False),
    "optim.final_lr": (0, None, False, False),
    "optim.grad_clip": (0, None, False, False),
    "ema.tau_base": (0, 1, False, False),
    "train.epochs": (1, None, False, False),
    "train.ckpt_every": (1, None, False, False),
    "train.log_every": (1, None, False, False),
    "train.max_nan_skips": (0, None, False, False),
    "monitor.knn_every": (0, None, False, False),
    "monitor.knn_k": (1, None, False, False),
    "monitor.knn_holdout": (0, 1, True, True),
}
DECAY_EXCLUDE = ("auto", "none", "bias_norm", "bias_norm_tokens")  # sslmask.optim.param_groups
CLIP_MODES = ("global", "per_tensor")  # sslmask.optim.clip_gradients
CHOICES: dict[str, tuple[Any, ...]] = {
    "model.out_stride": (16, 32),
    "optim.decay_exclude": DECAY_EXCLUDE,
    "optim.clip_mode": CLIP_MODES,
    "ema.schedule": ("cosine", "constant"),
}


def _range_text(low, high, low_open: bool, high_open: bool) -> str:
    if high is None:
        return f"{'>' if low_open else '>='} {low:g}"
    return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


def validate(cfg: dict[str, Any]) -> None:
    """One ConfigError line naming the first key outside its range (``RANGES``, ``CHOICES``)."""

    def get(key: str) -> Any:
        section, name = key.split(".")
        return cfg.get(section, {}).get(name)

    for key, (low, high, low_open, high_open) in RANGES.items():
        value = get(key)
        if value is None:
            continue
        bad = not math.isfinite(value) or value < low or (low_open and value == low)
        if high is not None:
            bad = bad or value > high or (high_open and value == high)
        if bad:
            raise ConfigError(f"{key}={value}: must be {_range_text(low, high, low_open, high_open)}")
    for key, choices in CHOICES.items():
        if get(key) not in choices:
            raise ConfigError(f"{key}={get(key)!r}: must be one of {', '.join(map(str, choices))}")
    init = cfg.get("model", {}).get("init")
    if init is not None and not (isinstance(init, str) and init):
        raise ConfigError(f"model.init={init!r}: must be a checkpoint path or null")
    snaps = cfg["train"].get("snapshot_epochs") or []
    epochs = cfg["train"]["epochs"]
    if not all(isinstance(e, int) and not isinstance(e, bool) and 1 <= e <= epochs for e in snaps):
        raise ConfigError(
            f"train.snapshot_epochs={snaps}: must be whole epochs in [1, train.epochs={epochs}]"
        )


def diff(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two configs."""
    keys = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            keys += diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            keys.append(f"{prefix}{k}")
    return keys
