"""benchmarks/mask_dose.py: arms parse as documented, a gain is the paired per-seed difference
to the twin (mean and standard error, checked by hand), and the report reads its results."""

from __future__ import annotations

import json
import math
import sys
from argparse import Namespace
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from mask_dose import paired_gain, parse_arm, report  # noqa: E402 -- a benchmark, found through sys.path


def test_arms_parse():
    assert parse_arm("0.7=/b/gt0.7", "harl") == ("0.7", "/b/gt0.7", "harl", [])
    assert parse_arm("byol=/b/gt1:byol", "harl") == ("byol", "/b/gt1", "byol", [])
    assert parse_arm("crop=/b/gt1:byol:data.min_fg=0.2", "harl") == (
        "crop",
        "/b/gt1",
        "byol",
        ["data.min_fg=0.2"],
    )
    assert parse_arm("x=/b:data.min_fg=0.2", "harl") == ("x", "/b", "harl", ["data.min_fg=0.2"])
    with pytest.raises(SystemExit, match="expected LABEL=BUILD"):
        parse_arm("no-build", "harl")


def test_gain_is_the_paired_difference_over_shared_seeds():
    arm = [
        {"seed": 0, "knn20": 30.0},
        {"seed": 1, "knn20": 34.0},
        {"seed": 2, "knn20": 33.0},
        {"seed": 5, "knn20": 1.0},
    ]
    twin = [{"seed": 0, "knn20": 29.0}, {"seed": 1, "knn20": 31.0}, {"seed": 2, "knn20": 33.0}]
    mean, se, n = paired_gain(arm, twin, "knn20")
    diffs = [1.0, 3.0, 0.0]
    sd = math.sqrt(sum((d - 4 / 3) ** 2 for d in diffs) / 2)
    assert n == 3 and mean == pytest.approx(4 / 3) and se == pytest.approx(sd / math.sqrt(3))


def test_report_prints_one_row_per_arm(tmp_path, capsys):
    rows = [{"arm": a, "seed": s, "mask_miou": m, "knn20": k + s, "linear": k + 1}
            for a, m, k in (("byol", None, 30.0), ("exact", 1.0, 32.0), ("random", None, 20.0)) for s in (0, 1)]  # fmt: skip
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    report(Namespace(out=str(tmp_path), twin_label="byol", png=None, title=""))
    lines = capsys.readouterr().out.splitlines()
    exact = next(line for line in lines if line.startswith("| exact"))
    assert "| 1.000 | 2 |" in exact and "+2.0 ± 0.0" in exact
    assert next(line for line in lines if line.startswith("| byol")).endswith("|  |  |")
