"""Run configuration: a method's YAML shipped with the package, an optional overlay file,
then ``--set section.key=value`` overrides. Unknown keys and wrong types are errors."""

from __future__ import annotations

import contextlib
import copy
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from maskio.errors import KeyValueError
from maskio.keyvalue import parse_value, split_pair
from maskio.safeload import UnsafeDocument, safe_yaml
from sslmask.settings import MAX_IMAGE_SIZE, SHARED_SECTIONS, ConfigError, closest

__all__ = ["MAX_IMAGE_SIZE", "ConfigError", "available_methods", "diff", "load_config", "validate"]


def available_methods() -> list[str]:
    """The registered methods (``sslmask.methods.METHODS``, the one registry), each with its
    packaged ``configs/NAME.yaml``; a config file alone (an overlay) is not a method."""
    from sslmask.methods import METHODS

    return sorted(METHODS)


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
            raise ConfigError(f"{where}: unknown config key {full!r}{closest(key, list(base), prefix)}")
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
            overlay = safe_yaml(path.read_text()) or {}
        except (OSError, yaml.YAMLError, UnsafeDocument) as exc:
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


def validate(cfg: dict[str, Any]) -> None:
    """One ConfigError line naming the first bad value: every section is built as its typed
    class (``sslmask.settings``: the shared ones, and those the method declares)."""
    from sslmask.methods import METHODS

    name = cfg.get("method")
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    for section in (*SHARED_SECTIONS, *METHODS[name].sections):
        section.of(cfg)


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
