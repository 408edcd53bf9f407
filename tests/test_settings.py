"""Typed config sections (sslmask.settings): each check against the values it must let through
and those it must refuse, and every packaged config against its sections."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest

from sslmask.config import ConfigError, available_methods, load_config, load_settings, parse, saved_settings
from sslmask.methods import METHODS, build_method
from sslmask.settings import SHARED_SECTIONS, FallbackBand, Section, setting


@dataclass(frozen=True)
class Toy(FallbackBand):
    section = "toy"
    count: int = setting(ge=1)
    rate: float = setting(gt=0, lt=1)
    mode: str = setting(choices=("a", "b"))
    sizes: list[int] | None = setting(ge=2)
    flag: bool = setting()


GOOD = {
    "count": 3,
    "rate": 0.5,
    "mode": "a",
    "sizes": [2, 5],
    "flag": True,
    "fallback_min": 0.0,
    "fallback_max": 1,
}


def test_a_good_section_is_typed_and_frozen():
    toy = Toy.from_dict(GOOD)
    assert toy.fallback_max == 1.0 and isinstance(toy.fallback_max, float) and toy.sizes == [2, 5]
    assert Toy.from_dict({**GOOD, "sizes": None}).sizes is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        toy.count = 4


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"count": 0}, "toy.count=0: must be >= 1"),
        ({"rate": 1.0}, r"toy.rate=1.0: must be in \(0, 1\)"),
        ({"rate": 0}, r"toy.rate=0.0: must be in \(0, 1\)"),
        ({"rate": float("nan")}, "toy.rate=nan: must be in"),
        ({"mode": "c"}, "toy.mode='c': must be one of a, b"),
        ({"sizes": [2, 1]}, r"toy.sizes=\[2, 1\]: must be >= 2"),
        ({"sizes": 3}, "toy.sizes must be a list, got 3"),
        ({"count": 2.5}, "toy.count must be int, got 2.5"),
        ({"count": True}, "toy.count must be int, got True"),
        ({"flag": 1}, "toy.flag must be bool, got 1"),
        ({"mode": None}, "toy.mode must be str, got None"),
        ({"fallback_min": 0.9, "fallback_max": 0.1}, "toy.fallback_min=0.9 must be below fallback_max=0.1"),
        ({"cuont": 3}, "unknown config key 'toy.cuont'; did you mean 'toy.count'"),
    ],
)
def test_each_bad_value_is_one_line_naming_its_key(change, message):
    with pytest.raises(ConfigError, match=message) as info:
        Toy.from_dict({**GOOD, **change})
    assert "\n" not in str(info.value)


def test_a_missing_key_is_named():
    with pytest.raises(ConfigError, match="toy.flag: missing from the config"):
        Toy.from_dict({k: v for k, v in GOOD.items() if k != "flag"})


@pytest.mark.parametrize("method", available_methods())
def test_every_packaged_config_fits_its_sections_exactly(method):
    cfg = load_config(method)
    sections = (*SHARED_SECTIONS, *METHODS[method].sections)
    assert sorted(s.section for s in sections) == sorted(k for k in cfg if k != "method")
    for s in sections:
        assert sorted(f.name for f in dataclasses.fields(s)) == sorted(cfg[s.section]), s.section
        assert isinstance(s.of(cfg), Section)


def test_a_misspelt_key_names_its_section_and_the_closest_key():
    with pytest.raises(ConfigError, match="unknown config key 'optim.lrr'; did you mean 'optim.lr'"):
        load_config("byol", None, ["optim.lrr=0.1"])
    with pytest.raises(ConfigError, match="unknown config key 'harl.alpha'; did you mean 'harl.alpha_base'"):
        load_config("harl", None, ["harl.alpha=0.5"])
    with pytest.raises(ConfigError, match="unknown config key 'trian'; did you mean 'train'"):
        load_config("byol", None, ["trian.epochs=3"])


def test_a_value_the_merge_cannot_type_is_refused_by_its_section():
    """A key whose default is null takes any type at the merge; its section still checks it."""
    with pytest.raises(ConfigError, match="segas.prototypes must be a list, got 'many'"):
        load_config("segas", None, ["segas.prototypes=many"])
    with pytest.raises(ConfigError, match="data.samples_per_epoch=0: must be >= 1"):
        load_config("byol", None, ["data.samples_per_epoch=0"])


# ---------------------------------------------------------------- one mechanism for both packages


def test_maskio_settings_type_and_range_text():
    from maskio.settings import SettingError, checked, range_text

    limits = {"ge": 0, "gt": None, "le": 2**32 - 1, "lt": None, "choices": None}
    assert range_text(limits) == "in [0, 4294967295]"  # not 4.29497e+09
    assert range_text({"ge": None, "gt": 0, "le": None, "lt": 1e-6}) == "in (0, 1e-06)"
    assert checked("t", 0.5, float | str, {}) == 0.5 and checked("t", "otsu", float | str, {}) == "otsu"
    assert checked("n", 3, int | None, limits) == 3 and checked("n", None, int | None, limits) is None
    for value, message in [
        (True, "n must be int"),
        (2**32, "n=4294967296: must be in"),
        (1.0, "n must be int"),
    ]:
        with pytest.raises(SettingError, match=message):
            checked("n", value, int, limits)


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ({"shard_size": 0}, "--shard-size=0: must be >= 1"),
        ({"workers": 0}, "--workers=0: must be >= 1"),
        ({"limit": 0}, "--limit=0: must be >= 1"),
        ({"max_pixels": -5}, "--max-pixels=-5: must be >= 1"),
        ({"seed": -1}, "--seed=-1: must be in [0, 4294967295]"),
        ({"image_format": "png"}, "--image-format='png': must be one of keep, jpg, none"),
        ({"executor": "dask"}, "--executor='dask': must be one of ray, local"),
        ({"fallback": "zero"}, "--fallback='zero': must be one of center, keep"),
        ({"progress": "yes"}, "--progress must be bool, got 'yes'"),
        ({"workers": 2.0}, "--workers must be int, got 2.0"),
    ],
)
def test_build_options_check_what_their_fields_declare(option, message):
    """A Python caller gets the check the CLI gets, from the same declaration."""
    from maskgen.pipeline import BuildError, BuildOptions

    with pytest.raises(BuildError) as info:
        BuildOptions(source="sample", source_config={}, method="center", out="o", **option)
    assert str(info.value) == message


def test_build_cli_options_are_derived_from_the_build_options():
    """Every setting field of BuildOptions is a `maskgen build` option with the field's default,
    choices and range: one declaration, no second copy to drift."""
    import click

    from maskgen.cli import build
    from maskgen.pipeline import BuildOptions

    params = {p.name: p for p in build.params}
    settings = [f for f in dataclasses.fields(BuildOptions) if "help" in f.metadata]
    assert len(settings) >= 12
    for f in settings:
        p = params[f.name]
        assert p.default == f.default and p.help == f.metadata["help"], f.name
        if f.metadata["choices"] is not None:
            assert tuple(p.type.choices) == tuple(f.metadata["choices"]), f.name
        elif isinstance(p.type, click.IntRange):
            assert (p.type.min, p.type.max) == (f.metadata["ge"], f.metadata["le"]), f.name


@pytest.mark.parametrize(
    ("method", "params", "message"),
    [
        ("deep", {"gpu_share": 1.5}, "--param gpu_share=1.5: must be a number in (0, 1]"),
        ("deep", {"precision": "fp8"}, "--param precision='fp8': must be one of auto, fp32, bf16"),
        ("deep", {"decode": "gpu"}, "--param decode='gpu': must be one of auto, pil, device"),
        ("drfi", {"levels": "nine"}, "--param levels='nine': must be one of harl, multi, multi6, drfi15"),
        ("drfi", {"fusion": "mean"}, "--param fusion='mean': must be one of auto, uniform, learned"),
        ("center", {"sigma": 0}, "--param sigma=0: must be a number > 0"),
    ],
)
def test_method_params_are_checked_by_the_same_mechanism(method, params, message):
    from maskgen.methods import make_method

    with pytest.raises(ValueError) as info:
        make_method(method, params)
    assert str(info.value) == message


# --- one typed RunSettings from the YAML to the method (issue 45 item 1) ---

OVERLAYS = (None, "cpu-demo", "moco-cpu", "dino-cpu", "vit-cpu", "imagenette-cpu")


@pytest.mark.parametrize("method", available_methods())
def test_settings_give_back_exactly_the_mapping_they_were_parsed_from(method):
    """``to_config`` is what a run saves: equal to the merged YAML, value for value and type for
    type, so a saved config.yaml is what it was before RunSettings existed."""
    from sslmask import config

    for overlay in OVERLAYS:
        cfg = config._merged(method, overlay, ())  # the YAML files merged, before any parsing
        settings = parse(cfg)
        back = settings.to_config()
        assert back == cfg, overlay
        assert [(k, list(v) if isinstance(v, dict) else v) for k, v in back.items()] == [
            (k, list(v) if isinstance(v, dict) else v) for k, v in cfg.items()
        ]  # in the YAML's order too: a saved config.yaml reads as before
        for name, section in cfg.items():
            if isinstance(section, dict):
                assert {k: type(v) for k, v in back[name].items()} == {k: type(v) for k, v in section.items()}
        assert parse(back) == settings


@pytest.mark.parametrize("method", available_methods())
def test_a_method_is_built_from_settings_and_holds_no_mapping(method):
    sets = ["model.proj_hidden=32", "model.pred_hidden=32", "model.proj_dim=16"]
    if method in ("mocov3", "lodisc"):
        sets.append("model.arch=vit_micro")
    settings = load_settings(method, "cpu-demo", sets)
    built = build_method(settings)
    assert built.settings is settings and not hasattr(built, "cfg")
    plain = [k for k, v in vars(built).items() if isinstance(v, dict) and not k.startswith("_")]
    assert plain == [], plain  # the YAML's mapping does not reach a method
    for kind in METHODS[method].sections:
        assert isinstance(settings.section(kind), kind)


def test_a_section_the_method_lacks_is_one_line():
    from sslmask.methods.harl import HARLSettings

    with pytest.raises(ConfigError, match="a byol config has no 'harl' section"):
        load_settings("byol").section(HARLSettings)


def test_replace_checks_the_new_value_as_loading_does():
    settings = load_settings("byol")
    assert settings.replace("data", images="2024").data.images == "2024"  # a path, kept a string
    assert settings.data.images is None  # frozen: the original is unchanged
    with pytest.raises(ConfigError, match="data.batch_size=0: must be >= 1"):
        settings.replace("data", batch_size=0)


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("data.batch_size=0", r"--set data.batch_size=0: data.batch_size=0: must be >= 1"),
        ("optim.lr=fast", r"--set optim.lr=fast: optim.lr must be float, got 'fast'"),
        ("train.compile=1", r"--set train.compile=1: train.compile must be bool, got 1"),
        ("optim.lr.x=1", r"--set optim.lr.x=1: optim.lr is a setting, not a section"),
        ("optim=1", r"--set optim=1: optim is a section, got 1"),
    ],
)
def test_a_bad_set_names_where_it_came_from_and_the_range(item, message):
    with pytest.raises(ConfigError, match=message):
        load_settings("byol", None, [item])


def test_what_yaml_gives_for_a_number_is_typed_by_the_field(tmp_path):
    """YAML 1.1 reads 1e-3 as a string, and 2.0 for an int field means 2."""
    overlay = tmp_path / "o.yaml"
    overlay.write_text("optim:\n  lr: 1e-3\ntrain:\n  epochs: 2.0\n")
    settings = load_settings("byol", str(overlay))
    assert settings.optim.lr == 0.001 and isinstance(settings.optim.lr, float)
    assert settings.train.epochs == 2 and isinstance(settings.train.epochs, int)
    assert isinstance(settings.to_config()["train"]["epochs"], int)
    with pytest.raises(ConfigError, match=r"o2.yaml: train.epochs must be int, got 2.5"):
        (tmp_path / "o2.yaml").write_text("train:\n  epochs: 2.5\n")
        load_settings("byol", str(tmp_path / "o2.yaml"))


def test_an_old_runs_config_reads_back_with_todays_defaults_for_new_keys():
    """A run saved before ``segas.mu`` and ``segas.q2_from`` existed (and with a key since
    removed) is rebuilt for evaluation: the new keys take their packaged default, the old
    spelling ``max`` still reads, the removed key is dropped; what it saved is still checked."""
    old = load_config("segas")
    del old["segas"]["q2_from"]
    old["segas"]["mu"] = "max"
    old["segas"]["a_key_since_removed"] = 1
    settings = saved_settings(old)
    segas = settings.to_config()["segas"]
    assert segas["q2_from"] == load_config("segas")["segas"]["q2_from"] and segas["mu"] == "max"
    assert "a_key_since_removed" not in segas
    old["data"]["batch_size"] = 0
    with pytest.raises(ConfigError, match="data.batch_size=0"):
        saved_settings(old)
    with pytest.raises(ConfigError, match="unknown method 'nope'"):
        saved_settings({"method": "nope"})
