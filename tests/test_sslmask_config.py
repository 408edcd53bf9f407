"""Config loading: packaged defaults, overlays, --set parsing and type checks."""

from __future__ import annotations

import pytest

from sslmask.config import ConfigError, available_methods, diff, load_config, parse_set


def test_the_method_registry_is_the_one_list_and_each_method_ships_its_config():
    """Issue 45 item 3: the CLI listed every dash-less YAML as a method; now the registry
    (METHODS) is the list, and a registered method without its packaged config is a bug."""
    from importlib import resources

    from sslmask.methods import METHODS

    assert available_methods() == sorted(METHODS)
    for name, cls in METHODS.items():
        assert cls.name == name and resources.files("sslmask.configs").joinpath(f"{name}.yaml").is_file()
        assert load_config(name)["method"] == name
    packaged = {f.name[:-5] for f in resources.files("sslmask.configs").iterdir() if f.name.endswith(".yaml")}
    assert "base" in packaged and "base" not in available_methods()  # a config file alone is no method


def test_methods_and_overlay_precedence(tmp_path):
    assert available_methods() == ["byol", "dino", "harl", "lodisc", "mocov2", "mocov3", "scfs", "segas"]
    overlay = tmp_path / "o.yaml"
    overlay.write_text("optim:\n  lr: 0.5\ntrain:\n  epochs: 3\n")
    cfg = load_config("harl", str(overlay), ["optim.lr=1e-3", "harl.loss=mask"])
    assert cfg["optim"]["lr"] == pytest.approx(1e-3) and cfg["train"]["epochs"] == 3
    assert cfg["harl"]["loss"] == "mask" and cfg["harl"]["alpha_base"] == 0.7
    assert load_config("byol", "cpu-demo")["model"]["arch"] == "resnet_tiny"
    scfs = load_config("scfs")  # extends dino, which extends base
    assert scfs["dino"]["local_scale"] == [0.05, 0.25] and scfs["dino"]["student_temp"] == 0.1
    assert scfs["optim"]["lr"] == 0.1 and scfs["model"]["arch"] == "resnet50"
    segas = load_config("segas")  # extends mocov2: MoCo v2's recipe with HCSC's queue and a weak key
    assert segas["mocov2"] == {"queue": 16384, "temperature": 0.2, "weak_key": True, "shuffle_bn_batch": 32}
    assert segas["optim"]["lr"] == 0.03 and segas["ema"]["schedule"] == "constant"


def test_set_values_are_typed():
    assert parse_set("a.b=3") == {"a": {"b": 3}}
    assert parse_set("a=true") == {"a": True}
    cfg = load_config("byol", None, ["optim.weight_decay=0", "data.samples_per_epoch=1000"])
    assert cfg["optim"]["weight_decay"] == 0.0 and isinstance(cfg["optim"]["weight_decay"], float)
    assert cfg["data"]["samples_per_epoch"] == 1000


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["optim"], "expected KEY=VALUE"),
        (["optim=1"], "optim is a section"),
        (["train.epochs=many"], "train.epochs must be int"),
        (["train.compile=1"], "train.compile must be bool"),
        (["harl.alpha_base=0.5"], "unknown config key 'harl'"),
    ],
)
def test_bad_overrides(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("byol", None, overrides)


def test_bad_overlay_files(tmp_path):
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config("byol", str(tmp_path / "list.yaml"))
    (tmp_path / "other.yaml").write_text("method: harl\n")
    with pytest.raises(ConfigError, match="is for method 'harl', not 'byol'"):
        load_config("byol", str(tmp_path / "other.yaml"))
    with pytest.raises(ConfigError, match="unknown method 'simclr'"):
        load_config("simclr")
    with pytest.raises(ConfigError, match="unknown method 'base'"):
        load_config("base")  # what methods extend is not a method


def test_diff_lists_changed_keys():
    a = load_config("harl")
    b = load_config("harl", None, ["optim.lr=0.3", "train.epochs=5"])
    assert diff(a, b) == ["optim.lr", "train.epochs"]


def test_one_overlay_serves_every_method_of_a_comparison(tmp_path):
    """Another method's section in an overlay is left out for a method without it (moco-cpu's
    ``mocov2.queue`` when it trains BYOL); a misspelt section is still refused."""
    byol = load_config("byol", "moco-cpu")
    assert "mocov2" not in byol and byol["model"]["arch"] == "resnet_tiny"
    assert load_config("segas", "moco-cpu")["mocov2"]["queue"] == 2048  # segas extends mocov2
    assert "mocov3" not in load_config("dino", "vit-cpu")
    (tmp_path / "typo.yaml").write_text("mocov22:\n  queue: 8\n")
    with pytest.raises(ConfigError, match="unknown config key 'mocov22'"):
        load_config("mocov2", str(tmp_path / "typo.yaml"))
