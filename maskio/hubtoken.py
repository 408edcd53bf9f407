"""The one scrubber for everything that talks to the Hugging Face Hub, reading or writing.

A hostile or broken endpoint can echo the token back: in an ``X-HF-Warning`` header (which
``huggingface_hub`` logs itself), an ``X-Error-Message`` header or a redirect URL (both end up in
the exception text), or whoami's user name. Every command that contacts the Hub runs inside
``hub_guard``: the library's own logging and warnings are routed through the scrubber, and
every message built from the client's answers is scrubbed before it is printed.

The scrubber does not trust the text to hold the token verbatim. It first undoes what hides a
token from a plain search (NFKC; invisible, combining and filler characters; percent-encoding;
``\\uXXXX``-style escapes as a Python repr prints them), then finds the token's characters in
order with up to ``MAX_GAP`` characters of anything between each two, and replaces the span.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import sys
import unicodedata
import warnings
from collections.abc import Callable, Iterator
from urllib.parse import unquote

Scrub = Callable[[str], str]

MASK = "***"
DEFAULT_HUB_TIMEOUT = 15.0
MAX_GAP = 3  # characters of anything allowed between two of the token's characters
# letters by Unicode category that render as blank space (Hangul fillers, the blank Braille cell)
_BLANK_LETTERS = frozenset("\u115f\u1160\u3164\uffa0\u2800")
_INVISIBLE = frozenset({"Cf", "Mn", "Me", "Cs", "Co", "Cn"})
_ESCAPE = re.compile(r"\\(?:u([0-9a-fA-F]{4})|x([0-9a-fA-F]{2})|U([0-9a-fA-F]{8}))")


def _unescape(match: re.Match[str]) -> str:
    code = int(next(g for g in match.groups() if g), 16)
    return chr(code) if code <= sys.maxunicode else match.group(0)


def visible_text(text: str) -> str:
    """``text`` as a reader sees it: NFKC, percent- and backslash-escapes decoded (twice, for
    double encoding), and no character that shows nothing (format, combining, filler) or
    moves the terminal (control characters other than newline and tab)."""
    text = str(text)
    for _ in range(2):
        text = _ESCAPE.sub(_unescape, unquote(unicodedata.normalize("NFKC", text)))
    return "".join(
        c
        for c in unicodedata.normalize("NFKC", text)
        if c in "\n\t"
        or (
            unicodedata.category(c) not in _INVISIBLE
            and unicodedata.category(c) != "Cc"
            and c not in _BLANK_LETTERS
        )
    )


def _spans(text: str, token: str) -> list[tuple[int, int]]:
    """Where ``token``'s characters stand in ``text`` in order, at most MAX_GAP apart: a
    search over reachable end positions (no regex, so no catastrophic backtracking)."""
    spans: list[tuple[int, int]] = []
    i, n = 0, len(text)
    while i < n:
        i = text.find(token[0], i)
        if i < 0:
            break
        ends = {i}
        for char in token[1:]:
            ends = {p + d for p in ends for d in range(1, MAX_GAP + 2) if p + d < n and text[p + d] == char}
            if not ends:
                break
        if ends:
            end = max(ends) + 1
            spans.append((i, end))
            i = end
        else:
            i += 1
    return spans


def scrubber(token: str | None) -> Scrub:
    """A function that makes any text safe to print with ``token`` set; identity without one."""
    if not token:
        return lambda text: str(text)

    def scrub(text: str) -> str:
        text = visible_text(text).replace(token, MASK)
        for start, end in reversed(_spans(text, token)):
            text = text[:start] + MASK + text[end:]
        return text

    return scrub


def current_token() -> str | None:
    """The token huggingface_hub would send (HF_TOKEN, or the login cache)."""
    from huggingface_hub import get_token

    return get_token()


@contextlib.contextmanager
def scrubbed_hub_output(say: Callable[[str], None]) -> Iterator[None]:
    """While the block runs, whatever ``huggingface_hub`` would write itself (its logging, e.g.
    the server's ``X-HF-Warning`` headers, and Python warnings) goes through ``say`` instead of
    straight to stderr; ``say`` must scrub."""

    retries = RetryLines(say)

    class Echo(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            retries.say(f"huggingface_hub: {record.getMessage()}")

    lib = logging.getLogger("huggingface_hub")
    saved = lib.handlers[:], lib.propagate
    lib.handlers, lib.propagate = [Echo()], False
    try:
        with warnings.catch_warnings():
            warnings.showwarning = lambda message, *args, **kwargs: say(f"warning: {message}")
            yield
    finally:
        lib.handlers, lib.propagate = saved
        retries.close()


class RetryLines:
    """huggingface_hub logs two lines per retry of a failing request (``HTTP Error 500 thrown
    while requesting ...``, ``Retrying in 8s [Retry 3/5].``): 11 lines over 23 s on one 500.
    The first failure is said once; the retries after it are counted and summed up in one
    line when the block ends (or when another message comes)."""

    PATTERN = re.compile(
        r"huggingface_hub: (?:HTTP Error \d+|'.*') thrown while requesting|huggingface_hub: Retrying in "
    )

    def __init__(self, say: Callable[[str], None]):
        self._say, self.quiet = say, 0
        self._first: str | None = None

    def say(self, text: str) -> None:
        if not self.PATTERN.match(text):
            self.close()
            self._say(text)
        elif self._first is None:
            self._first = text
            self._say(f"{text} (retrying)")
        else:
            self.quiet += text.startswith("huggingface_hub: Retrying in ")

    def close(self) -> None:
        if self._first is not None and self.quiet:
            self._say(
                f"huggingface_hub: {self.quiet} retries after: {self._first.removeprefix('huggingface_hub: ')}"
            )
        self._first, self.quiet = None, 0


def _stderr(text: str) -> None:
    print(text, file=sys.stderr)


def hub_timeout() -> float:
    """Seconds one Hub request may wait for an answer: ``MASKGEN_HUB_TIMEOUT`` (default 15).
    huggingface_hub's shared client waits forever by default, so an endpoint that accepts the
    connection and never answers hung a command for good."""
    try:
        value = float(os.environ.get("MASKGEN_HUB_TIMEOUT", DEFAULT_HUB_TIMEOUT))
    except ValueError:
        value = DEFAULT_HUB_TIMEOUT
    return value if math.isfinite(value) and value > 0 else DEFAULT_HUB_TIMEOUT


def _bound_timeout(request) -> None:
    """An httpx request hook: every phase of the request waits at most ``hub_timeout()``,
    whatever the call passed (huggingface_hub passes ``timeout=None``, no limit, to its API
    calls, which a client-wide default cannot override)."""
    limit = hub_timeout()
    given = request.extensions.get("timeout") or {}
    request.extensions["timeout"] = {
        phase: limit if given.get(phase) is None else min(given[phase], limit)
        for phase in ("connect", "read", "write", "pool")
    }


@contextlib.contextmanager
def hub_guard(echo: Callable[[str], None] = _stderr) -> Iterator[Scrub]:
    """Run a block that talks to the Hub: yields the scrubber for the current token, prints the
    library's own output through it (with ``echo``), and bounds every request's wait."""
    from huggingface_hub import get_session

    session = get_session()
    hooks = session.event_hooks
    if _bound_timeout not in hooks["request"]:
        hooks["request"].append(_bound_timeout)
        session.event_hooks = hooks
    scrub = scrubber(current_token())
    with scrubbed_hub_output(lambda text: echo(scrub(text))):
        yield scrub


def first_line(exc: BaseException, scrub: Scrub = str) -> str:
    """An exception's first line of text, scrubbed as a whole before it is cut (a token split
    across two lines is still found); its type name when it has no text."""
    text = scrub(str(exc)).strip()
    return text.splitlines()[0] if text else type(exc).__name__
