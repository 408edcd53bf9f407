"""Issue 44 item 1: the Hub token is never printed on the read path (hf:// sources), and the
scrubber shared with the publish path finds the token however a hostile server disguises it
(issue 47 item 5)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hub_standin import TOKEN, seed, start
from test_publish import hub_cli

from maskgen.cli import main
from maskgen.publish.stage import stage
from maskio.hubtoken import scrubber, visible_text

SPEC = "hf://datasets/org/masks"


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """A stand-in Hub holding a published center build of 9 sample images."""
    tmp = tmp_path_factory.mktemp("published")
    out = tmp / "b"
    assert main(["build", "--source", "sample", "--sample-size", "9", "--no-photos", "--method", "center",
                 "--out", str(out), "--shard-size", "3", "--executor", "local", "--no-progress"]) == 0  # fmt: skip
    server, state, base = start()
    seed(state, "org/masks", stage(out, "org/masks").folder)
    yield state, base
    server.shutdown()


def read_commands(tmp):
    """Every command that reads an hf:// source, with the arguments it needs to get there."""
    return {
        "sslmask inspect": ("sslmask", "inspect", SPEC),
        "sslmask train": (
            "sslmask",
            "train",
            SPEC,
            "--method",
            "byol",
            "--config",
            "cpu-demo",
            "--out",
            str(tmp / "run"),
            "--set",
            "train.epochs=1",
        ),  # fmt: skip
        "sslmask eval knn": (
            "sslmask",
            "eval",
            "knn",
            "--checkpoint",
            "random",
            "--arch",
            "resnet18",
            "--train",
            SPEC,
            "--val",
            SPEC,
            "--workers",
            "0",
        ),  # fmt: skip
        "maskgen eval": ("maskgen", "eval", SPEC, "--gt", str(tmp)),
        "maskgen deep fit": (
            "maskgen",
            "deep",
            "fit",
            "--shards",
            SPEC,
            "--backbone",
            "random",
            "--arch",
            "resnet18",
            "--out",
            str(tmp / "head.safetensors"),
        ),  # fmt: skip
    }


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["error_message", "redirect"])
@pytest.mark.parametrize("command", list(read_commands(Path("."))))
def test_a_hostile_hub_never_gets_the_token_printed_by_a_reader(published, tmp_path, mode, command):
    """An X-Error-Message header and a redirect URL holding the token both reached stderr inside
    the one-line download error; now the line is scrubbed, and still one line."""
    state, base = published
    state.hostile = mode
    try:
        tool, *args = read_commands(tmp_path)[command]
        res = hub_cli(tool, *args, home=tmp_path / "hf", endpoint=base)
    finally:
        state.hostile = None
    printed = res.stderr + res.stdout
    assert TOKEN not in printed and TOKEN not in visible_text(printed), printed
    lines = res.stderr.strip().splitlines()
    assert res.returncode != 0 and len(lines) == 1 and "Traceback" not in printed, res.stderr
    assert SPEC in lines[0] and "***" in lines[0], lines[0]
    assert not any(TOKEN in p.read_text(errors="replace") for p in tmp_path.rglob("*") if p.is_file()
                   and "hf" not in p.relative_to(tmp_path).parts[:1])  # fmt: skip


@pytest.mark.slow
def test_a_warning_header_with_the_token_is_scrubbed_on_the_read_path(published, tmp_path):
    """huggingface_hub logs an X-HF-Warning header itself; it printed the token verbatim."""
    state, base = published
    state.hostile = "warning"
    try:
        res = hub_cli("sslmask", "inspect", SPEC, home=tmp_path / "hf", endpoint=base)
    finally:
        state.hostile = None
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["samples"] == 9
    assert TOKEN not in res.stderr + res.stdout and "your token is ***" in res.stderr, res.stderr


@pytest.mark.parametrize(
    "disguised",
    [
        TOKEN,
        f"{TOKEN[:5]}\u200b{TOKEN[5:]}",  # zero-width space (format character)
        f"{TOKEN[:5]}\u034f{TOKEN[5:]}",  # combining grapheme joiner
        f"{TOKEN[:5]}\u3164{TOKEN[5:]}",  # Hangul filler: a letter by category, blank on screen
        f"{TOKEN[:5]}\\u200b{TOKEN[5:]}",  # a Python repr's escape
        TOKEN.replace("_", "%5F"),  # percent-encoded
        TOKEN.replace("_", "%255F"),  # encoded twice
        "\uff48\uff46" + TOKEN[2:],  # fullwidth letters (NFKC folds them)
        " ".join(TOKEN),  # spaced out
        f"{TOKEN[:9]}\n{TOKEN[9:]}",  # split across two lines
    ],
)
def test_the_scrubber_finds_a_disguised_token(disguised):
    scrub = scrubber(TOKEN)
    said = scrub(f"user name: {disguised} (done)")
    assert said.startswith("user name: ***") and said.endswith(" (done)"), said
    assert TOKEN[3:12] not in said and TOKEN[-8:] not in said


def test_the_scrubber_leaves_other_text_alone():
    scrub = scrubber(TOKEN)
    text = "maskgen: 12/40 files on the Hub, https://example.org/datasets/org/masks"
    assert scrub(text) == text
    assert scrubber(None)(text) == text
    # a long hostile text of the token's first characters stays fast and unchanged in length order
    noise = ("hf_st" * 20_000) + "end"
    assert scrub(noise).endswith("end")


@pytest.mark.slow
def test_a_silent_endpoint_is_a_bounded_wait_then_one_line(tmp_path):
    """Issue 47 item 4: an endpoint that accepts and never answers hung hf:// reads and publish
    for good (the client's API calls pass no timeout); now each request waits at most
    MASKGEN_HUB_TIMEOUT seconds."""
    import os
    import subprocess
    import sys
    import time

    from hub_standin import start_silent
    from test_publish import REPO

    silent, base = start_silent()
    out = tmp_path / "b"
    assert main(["build", "--source", "sample", "--sample-size", "3", "--no-photos", "--method", "center",
                 "--out", str(out), "--executor", "local", "--no-progress"]) == 0  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT=base, HF_TOKEN=TOKEN, HF_HUB_DISABLE_XET="1",
               MASKGEN_HUB_TIMEOUT="1", PYTHONPATH=str(REPO))  # fmt: skip
    try:
        for args in (
            ["sslmask.cli", "inspect", SPEC],
            ["maskgen.cli", "publish", str(out), "--repo", "org/x"],
        ):
            started = time.perf_counter()
            res = subprocess.run(
                [sys.executable, "-m", *args], capture_output=True, text=True, env=env, timeout=120
            )
            assert time.perf_counter() - started < 60, args
            lines = [line for line in res.stderr.splitlines() if "error" in line]
            assert res.returncode == 1 and len(lines) == 1 and "timed out" in lines[0], res.stderr
            assert "Traceback" not in res.stderr
    finally:
        silent.stop()


def test_retry_logging_of_a_failing_request_is_one_line_and_a_count():
    """Issue 47 item 8: publish printed 11 retry lines over 23 s on one 500."""
    import logging

    from maskio.hubtoken import scrubbed_hub_output

    lines: list[str] = []
    log = logging.getLogger("huggingface_hub.utils._http")
    with scrubbed_hub_output(lines.append):
        for n in range(1, 6):
            log.warning("HTTP Error 500 thrown while requesting POST http://hub/api/x")
            log.warning(f"Retrying in {2**n}s [Retry {n}/5].")
        log.warning("something else")
    assert lines == [
        "huggingface_hub: HTTP Error 500 thrown while requesting POST http://hub/api/x (retrying)",
        "huggingface_hub: 5 retries after: HTTP Error 500 thrown while requesting POST http://hub/api/x",
        "huggingface_hub: something else",
    ]
