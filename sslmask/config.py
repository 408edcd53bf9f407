"""Run configuration: a method's YAML shipped with the package, an optional overlay file,
then ``--set section.key=value`` overrides. Unknown keys and wrong types are errors."""

from __future__ import annotations

import contextlib
import copy
from dataclasses import fields
from importlib import resources
from pathlib import Path
from typing import Any, get_args, get_type_hints

import yaml

from maskio.errors import KeyValueError
from maskio.keyvalue import parse_value, split_pair
from maskio.safeload import UnsafeDocument, safe_yaml
from maskio.settings import SettingError, checked
from sslmask.settings import MAX_IMAGE_SIZE, SHARED_SECTIONS, ConfigError, RunSettings, Section, closest

__all__ = [
    "MAX_IMAGE_SIZE",
    "ConfigError",
    "RunSettings",
    "available_methods",
    "diff",
    "load_config",
    "load_settings",
    "parse",
    "saved_settings",
]


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


def _yaml_number(value: Any, hint: Any) -> Any:
    """What YAML and ``--set`` give for a number, as the field's type wants it: YAML 1.1 reads
    "1e-3" (no dot) as a string, and "2.0" for an int field means 2."""
    if isinstance(value, str) and float in get_args(hint) + (hint,):
        with contextlib.suppress(ValueError):
            return float(value)
    if isinstance(value, float) and value.is_integer() and int in get_args(hint) + (hint,):
        return int(value)
    return value


def _section_classes(method: str) -> dict[str, type[Section]]:
    """Section name -> class, for the shared sections and those ``method`` declares."""
    from sslmask.methods import METHODS

    own = METHODS[method].sections if method in METHODS else ()
    return {cls.section: cls for cls in (*SHARED_SECTIONS, *own)}


def _merge(base: dict[str, Any], overlay: dict[str, Any], where: str) -> None:
    """``overlay`` into ``base``, every key known and every value checked as its setting
    declares it (``sslmask.settings``), the message naming where it came from."""
    classes = _section_classes(base["method"])
    for name, values in overlay.items():
        if name not in base:
            raise ConfigError(f"{where}: unknown config key {name!r}{closest(name, list(base))}")
        if not isinstance(base[name], dict) or name not in classes:
            raise ConfigError(f"{where}: {name} is not a section one can set")
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: {name} is a section, got {values!r}")
        base[name].update(_checked_values(classes[name], base[name], values, where))


def _checked_values(kind: type[Section], current: dict[str, Any], values: dict[str, Any], where: str) -> dict:
    known = {f.name: f for f in fields(kind)}
    hints = get_type_hints(kind)
    out = {}
    for key, value in values.items():
        full = f"{kind.section}.{key}"
        if key not in current or key not in known:
            raise ConfigError(
                f"{where}: unknown config key {full!r}{closest(key, list(current), kind.section + '.')}"
            )
        if isinstance(value, dict):
            raise ConfigError(f"{where}: {full} is a setting, not a section; got {value!r}")
        try:
            out[key] = checked(full, _yaml_number(value, hints[key]), hints[key], known[key].metadata)
        except SettingError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    return out


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


def load_settings(
    method: str, config_file: str | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> RunSettings:
    """The method's packaged config, the overlay file, then ``--set`` overrides, each value
    checked as it is merged; then the whole parsed once into typed settings."""
    return parse(_merged(method, config_file, overrides))


def load_config(
    method: str, config_file: str | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> dict[str, Any]:
    """The same, as the plain mapping a run saves (``load_settings(...).to_config()``)."""
    return load_settings(method, config_file, overrides).to_config()


def _merged(method: str, config_file: str | None, overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
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
    return cfg


def _shared_overlay(overlay: dict[str, Any], cfg: dict[str, Any]) -> dict[str, Any]:
    """An overlay without the sections of other methods that ``cfg``'s method lacks: one overlay
    serves a whole comparison (``moco-cpu`` sets ``mocov2.queue`` and also trains BYOL). Any
    other unknown key is still refused, so a typo never passes silently."""
    methods = set(available_methods())
    return {k: v for k, v in overlay.items() if k in cfg or k not in methods}


def parse(cfg: dict[str, Any]) -> RunSettings:
    """A merged config mapping as typed settings, or one ConfigError line naming the first bad
    value: every section is built as its class (the shared ones and those the method declares)."""
    from sslmask.methods import METHODS

    name = cfg.get("method")
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    unknown = [key for key in cfg if key != "method" and key not in _section_classes(name)]
    if unknown:
        raise ConfigError(f"unknown config section {unknown[0]!r} for method {name}")
    return RunSettings.parse(cfg, METHODS[name].sections)


def saved_settings(saved: dict[str, Any]) -> RunSettings:
    """A saved run's config (checkpoint, config.yaml) as settings. A run saved before a key
    existed gets that key's packaged default, and a key since removed is dropped, so every old
    run can be rebuilt for evaluation; the values it did save are checked as any config's."""
    method = saved.get("method")
    if method not in available_methods():
        raise ConfigError(f"unknown method {method!r}; choose from {', '.join(available_methods())}")
    cfg = copy.deepcopy(default_config(method))
    for name, values in saved.items():
        if isinstance(values, dict) and isinstance(cfg.get(name), dict):
            cfg[name].update({k: v for k, v in values.items() if k in cfg[name]})
    return parse(cfg)


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
