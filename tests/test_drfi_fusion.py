"""DRFI's learned fusion of levels (maskgen/methods/drfi/fusion.py): the constrained fit against a
brute-force search, the weights' path from `maskgen drfi fit --fusion learned` into the model
file and into the maps, and uniform fusion left exactly as it was."""

from __future__ import annotations

import io
import itertools
import json

import numpy as np
import pytest

from maskgen.methods.drfi import fit
from maskgen.methods.drfi.features import pixel_features
from maskgen.methods.drfi.fusion import FUSION_KEY, fusion_weights, simplex_least_squares
from maskgen.methods.drfi.method import DRFI, SHIPPED_MODELS, describe_level, level_values
from maskgen.methods.drfi.refine import LevelGraph
from maskgen.methods.drfi.scoring import Forest, ModelError
from maskgen.methods.drfi.segment import MULTI_LEVELS, segment_levels
from maskgen.sources import make_source
from maskgen.sources.synthetic import render_scene


def brute_force(x, y, w, step=0.005):
    """The best weights on a grid over the 3-simplex."""
    best, arg = np.inf, None
    grid = np.arange(0, 1 + step / 2, step)
    for a, b in itertools.product(grid, grid):
        if a + b > 1 + 1e-12:
            continue
        v = np.array([a, b, max(0.0, 1 - a - b)])
        loss = (w * (x @ v - y) ** 2).sum()
        if loss < best:
            best, arg = loss, v
    return arg, best


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_simplex_least_squares_finds_the_constrained_minimum(seed):
    rng = np.random.default_rng(seed)
    x = rng.random((200, 3))
    truth = np.array([0.9, -0.4, 0.5]) if seed == 0 else rng.dirichlet(np.ones(3))  # seed 0: off the simplex
    y = x @ truth + 0.05 * rng.normal(size=200)
    w = rng.random(200)
    got = simplex_least_squares(x, y, w)
    assert got.min() >= 0 and abs(got.sum() - 1) < 1e-12
    grid, best = brute_force(x, y, w)
    loss = (w * (x @ got - y) ** 2).sum()
    assert loss <= best + 1e-9 and np.abs(got - grid).max() < 0.02


def test_exact_combination_is_recovered():
    x = np.random.default_rng(3).random((100, 3))
    got = simplex_least_squares(x, x @ np.array([0.7, 0.3, 0.0]), np.ones(100))
    np.testing.assert_allclose(got, [0.7, 0.3, 0.0], atol=1e-6)


def scene_graph():
    rgb = render_scene(4, 7)[0]
    pix = pixel_features(rgb)
    labels = segment_levels(rgb, MULTI_LEVELS)
    described = [describe_level(pix, lab, True) for lab in labels]
    graph = LevelGraph.build(pix, labels, [st for _, st in described])
    scorer = DRFI().scorers[0]
    return graph, [level_values([scorer.score(f, st)]) for f, st in described]


def test_uniform_weights_are_the_plain_average():
    graph, values = scene_graph()
    np.testing.assert_allclose(graph.refine(values, np.full(3, 1 / 3)), graph.refine(values), atol=1e-9)
    only_finest = graph.refine(values, np.array([1.0, 0.0, 0.0]))
    assert not np.allclose(only_finest, graph.refine(values))  # the weights are used


def model_with(tmp_path, fusion: dict) -> str:
    """The shipped default forest with a fusion entry added to its info."""
    forest = Forest.load(SHIPPED_MODELS["default"])
    forest.info = {**forest.info, FUSION_KEY: fusion}
    path = tmp_path / "m.npz"
    forest.save(path)
    return str(path)


def test_drfi_uses_the_models_weights_for_its_levels_only(tmp_path):
    rgb = render_scene(4, 7)[0]
    entry = {"levels": "multi", "refine": True, "weights": [1.0, 0.0, 0.0], "photos": 2}
    model = model_with(tmp_path, entry)
    learned = DRFI(model=model)
    assert learned.params["fusion"] == [1.0, 0.0, 0.0]
    assert DRFI(model=model, fusion="learned").params["fusion"] == [1.0, 0.0, 0.0]
    uniform = DRFI(model=model, fusion="uniform")
    assert "fusion" not in uniform.params
    np.testing.assert_array_equal(uniform.saliency(rgb), DRFI().saliency(rgb))  # the default, unchanged
    assert not np.array_equal(learned.saliency(rgb), uniform.saliency(rgb))
    assert "fusion" not in DRFI(model=model, refine=0).params  # fitted for refine=1 only
    assert "fusion" not in DRFI(model=model, levels="multi6").params
    with pytest.raises(ValueError, match="fusion=learned: .* no fusion weights for levels=multi6"):
        DRFI(model=model, levels="multi6", fusion="learned")
    with pytest.raises(ValueError, match="--param fusion=.mean.: must be one of auto, uniform, learned"):
        DRFI(fusion="mean")


@pytest.mark.parametrize(
    "entry",
    [
        {"levels": "multi", "refine": True, "weights": [0.5, 0.6, -0.1]},
        {"levels": "multi", "refine": True, "weights": [0.5, 0.2]},
        {"levels": "multi", "refine": True, "weights": "even"},
        {"levels": "multi", "refine": True, "weights": [0.5, float("nan"), 0.5]},
    ],
)
def test_a_malformed_fusion_entry_is_refused_on_load(tmp_path, entry):
    path = model_with(tmp_path, entry)
    with pytest.raises(ModelError, match="fusion weights must be"):
        Forest.load(path)


def test_fit_learns_weights_without_changing_the_forest():
    source = make_source("sample", {"sample_size": 4, "seed": 3})
    kw = dict(n_estimators=4, log=io.StringIO())
    plain = fit.fit_drfi(source, "sample", fit.FitRecipe(labels="gt", levels="multi", limit=8), **kw)
    fused = fit.fit_drfi(
        source, "sample", fit.FitRecipe(labels="gt", levels="multi", limit=8, fusion="learned"), **kw
    )
    for name in ("feature", "threshold", "left", "right", "value", "roots"):
        np.testing.assert_array_equal(getattr(plain, name), getattr(fused, name))
    entry = fused.info[FUSION_KEY]
    assert (
        entry["levels"] == "multi"
        and entry["refine"] is True
        and entry["photos"] == fused.info["images"] >= 4
    )
    weights = fusion_weights(json.loads(json.dumps(fused.info)), "multi", 3, True)
    assert weights is not None and weights.min() >= 0 and abs(weights.sum() - 1) < 1e-9
    assert FUSION_KEY not in plain.info
    with pytest.raises(ValueError, match="needs ground truth"):
        fit.FitRecipe(labels="pseudo", fusion="learned", limit=2)


def test_cli_fits_fused_model_and_a_build_records_its_weights(tmp_path, capsys):
    from maskgen.cli import main

    model = tmp_path / "fused.npz"
    fit_args = ["drfi", "fit", "--source", "sample", "--sample-size", "3", "--labels", "gt", "--trees", "4"]
    assert main([*fit_args, "--fusion", "learned", "--out", str(model)]) == 0
    weights = Forest.load(model).info[FUSION_KEY]["weights"]
    out = tmp_path / "out"
    build = ["build", "--source", "sample", "--sample-size", "2", "--method", "drfi", "--executor", "local",
             "--no-progress", "--param", f"model={model}", "--param", "fusion=learned"]  # fmt: skip
    assert main([*build, "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["method_params"]["fusion"] == [round(w, 6) for w in weights]
    capsys.readouterr()
    assert (
        main([*fit_args, "--labels", "pseudo", "--fusion", "learned", "--out", str(tmp_path / "x.npz")]) != 0
    )
    assert "needs ground truth" in capsys.readouterr().err
