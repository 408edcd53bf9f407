"""Recipes: the runner skips complete stages and records what ran; the demo runs end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from maskgen.cli import main
from maskgen.recipe import RecipeError, load_recipe

REPO = Path(__file__).resolve().parents[1]

SMALL = """
name: small
vars:
  out: {out}
  size: "3"
stages:
  - name: masks
    run: maskgen build --source sample --sample-size ${{size}} --no-photos --method center --out ${{out}}/b --executor local --no-progress
    outputs:
      - ${{out}}/b/report.json
  - name: check
    run: {python} -c "import pathlib; pathlib.Path('${{out}}/checked').write_text('ok')"
    outputs:
      - ${{out}}/checked
"""


def _recipe(tmp_path: Path, text: str = SMALL) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(text.format(out=tmp_path / "o", python=sys.executable))
    return path


def test_runs_skips_and_records(tmp_path, capsys):
    recipe = _recipe(tmp_path)
    assert main(["pipeline", str(recipe)]) == 0
    assert "ran 2 of 2 stages" in capsys.readouterr().err
    record = json.loads((tmp_path / "o" / "pipelines" / "small.json").read_text())
    assert [record["stages"][s]["status"] for s in ("masks", "check")] == ["done", "done"]
    assert record["stages"]["masks"]["returncode"] == 0 and record["stages"]["masks"]["seconds"] >= 0

    assert main(["pipeline", str(recipe)]) == 0
    err = capsys.readouterr().err
    assert "masks: complete, skipped" in err and "ran 0 of 2 stages" in err

    # a changed command is a different stage; a deleted output makes a stage incomplete
    (tmp_path / "o" / "checked").unlink()
    assert main(["pipeline", str(recipe), "--var", "size=4", "--dry-run"]) == 0
    assert "would run 2 of 2" in capsys.readouterr().err
    assert main(["pipeline", str(recipe)]) == 0
    assert "ran 1 of 2 stages" in capsys.readouterr().err
    assert main(["pipeline", str(recipe), "--force", "check"]) == 0
    assert "ran 1 of 2 stages" in capsys.readouterr().err


def test_failing_stage_is_recorded_and_stops_the_run(tmp_path, capsys):
    text = SMALL.replace("import pathlib;", "import sys; sys.exit(3);")
    recipe = _recipe(tmp_path, text)
    assert main(["pipeline", str(recipe)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith("stage 'check' failed (exit status 3)")
    record = json.loads((tmp_path / "o" / "pipelines" / "small.json").read_text())
    assert record["stages"]["masks"]["status"] == "done" and record["stages"]["check"]["status"] == "failed"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("stages: []\n", "non-empty 'stages' list"),
        ("stages:\n  - name: a\n    run: x ${nope}\n    outputs: [o]\n", "unknown variable ${nope}"),
        ("stages:\n  - name: a\n    run: x\n", "list the stage's 'outputs'"),
        (
            "stages:\n  - {name: a, run: x, outputs: [o]}\n  - {name: a, run: y, outputs: [o]}\n",
            "duplicate stage",
        ),
        ("stages:\n  - {name: a, run: x, outputs: [o], shell: true}\n", "unknown stage key 'shell'"),
        ("[1", "cannot read recipe"),
    ],
)
def test_bad_recipes(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(
        RecipeError, match=message.replace("$", r"\$").replace("{", r"\{").replace("(", r"\(")
    ):
        load_recipe(path)


def test_unknown_var_override_is_an_error(tmp_path):
    with pytest.raises(RecipeError, match="--var nope: the recipe has no such variable"):
        load_recipe(_recipe(tmp_path), {"nope": "1"})


def test_shipped_recipes_parse():
    for path in sorted((REPO / "pipelines").glob("*.yaml")):
        recipe = load_recipe(path)
        assert recipe.stages and all(s.outputs for s in recipe.stages), path


@pytest.mark.slow
def test_demo_pipeline_end_to_end(tmp_path):
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "maskgen.cli",
        "pipeline",
        str(REPO / "pipelines" / "demo.yaml"),
        "--var",
        f"out={out}",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((out / "demo" / "report.json").read_text())
    assert report["n_images"] == 212 and report["n_errors"] == 0
    assert 0.6 < report["miou"] <= 1 and 0 <= report["mae"] < 0.15  # DRFI on the synthetic scenes
    assert (out / "demo" / "report.html").stat().st_size > 1000
    log = [json.loads(line) for line in (out / "demo-harl" / "log.jsonl").read_text().splitlines()]
    train = [r for r in log if r["kind"] == "train"]
    assert train[-1]["step"] == 120 and train[-1]["loss"] < train[0]["loss"]
    knn = json.loads((out / "demo-harl" / "knn.json").read_text())
    linear = json.loads((out / "demo-harl" / "linear.json").read_text())
    assert knn["val"] == linear["val"] == 200 and knn["train"] == 212
    assert 0 <= knn["accuracy"]["k=20"]["top1"] <= 100 and 0 <= linear["accuracy"]["top1"] <= 100
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "ran 0 of 6 stages" in again.stderr


# the loop at a size that runs in a minute: synthetic scenes instead of the photo sets
TINY_LOOP = {
    "fit_source": "--source sample --sample-size 12 --no-photos",
    "eval_source": "--source sample --seed 2 --sample-size 6 --no-photos",
    "train_source": "--source sample --sample-size 24 --no-photos",
    "val_source": "--source sample --seed 1 --sample-size 12 --no-photos",
    "executor": "local",
    "ssl_sets": "--config cpu-demo --set data.image_size=32 --set train.epochs=1 --set data.batch_size=8 --set data.workers=0",
    "ssl2_sets": "--config cpu-demo --set data.image_size=32 --set train.epochs=1 --set data.batch_size=8 --set data.workers=0",
    "fit_sets": "--out-stride 16 --epochs 1 --batch-size 8 --short-side 32 --finetune all --decoder aspp --workers 0",
    "eval_size": "32",
}


@pytest.mark.slow
def test_bootstrap_loop_runs_every_stage_and_resumes(tmp_path):
    """pipelines/bootstrap.yaml as shipped, only its data and sizes made tiny: every round's
    masks are scored, every backbone feeds the next head, a second run skips everything."""
    out = tmp_path / "loop"
    cmd = [sys.executable, "-m", "maskgen.cli", "pipeline", str(REPO / "pipelines" / "bootstrap.yaml"),
           "--var", f"out={out}", *(a for k, v in TINY_LOOP.items() for a in ("--var", f"{k}={v}"))]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    for stage in ("r0-eval", "r1-eval", "r2-eval"):
        report = json.loads((out / stage / "report.json").read_text())
        assert report["n_with_gt"] == 6 and 0 <= report["miou"] <= 1, stage
    r1 = json.loads((out / "r1-deep" / "manifest.json").read_text())
    assert r1["method"] == "deep" and r1["n_samples"] == 24
    from maskgen.methods.deep.model import read_head_meta

    assert read_head_meta(out / "r2-head.safetensors")["teacher"] == "r1-deep"
    assert json.loads((out / "r2-ssl" / "knn.json").read_text())["train"] == 24
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "ran 0 of 13 stages" in again.stderr


def test_a_killed_pipeline_takes_its_running_stage_with_it(tmp_path):
    """Issue 47 item 8: after a SIGKILL of `maskgen pipeline` the running stage (a build) kept
    running and holding its lock; the stage now gets SIGTERM when the pipeline dies."""
    import os
    import signal
    import subprocess
    import sys
    import time

    pid_file = tmp_path / "stage.pid"
    stage = f"import os, pathlib, time; pathlib.Path({str(pid_file)!r}).write_text(str(os.getpid())); time.sleep(120)"
    recipe = tmp_path / "slow.yaml"
    recipe.write_text(f"stages:\n  - name: slow\n    run: {sys.executable} -c \"{stage}\"\n"
                      f"    outputs: [{tmp_path / 'never'}]\n")  # fmt: skip
    pipeline = subprocess.Popen([sys.executable, "-m", "maskgen.cli", "pipeline", str(recipe)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.time() + 60
        while not pid_file.exists() or not pid_file.read_text():
            assert time.time() < deadline and pipeline.poll() is None
            time.sleep(0.1)
        child = int(pid_file.read_text())
        pipeline.send_signal(signal.SIGKILL)
        pipeline.wait()
        deadline = time.time() + 15
        while time.time() < deadline:
            try:
                os.kill(child, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            os.kill(child, signal.SIGKILL)
            raise AssertionError("the stage outlived its pipeline")
    finally:
        pipeline.kill()
