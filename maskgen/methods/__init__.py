"""Registry of mask methods: ``--method NAME`` -> class."""

from __future__ import annotations

import inspect
from typing import Any

from maskgen.methods.base import Resources, SaliencyMethod
from maskgen.methods.center import CenterPrior
from maskgen.methods.deep import DeepSaliency
from maskgen.methods.drfi import DRFI
from maskgen.methods.truth import SourceMasks

METHODS: dict[str, type[SaliencyMethod]] = {
    CenterPrior.name: CenterPrior,
    DRFI.name: DRFI,
    DeepSaliency.name: DeepSaliency,
    SourceMasks.name: SourceMasks,
}


def make_method(name: str, params: dict[str, Any] | None = None) -> SaliencyMethod:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(sorted(METHODS))}")
    cls = METHODS[name]
    params = params or {}
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValueError(
            f"--param {unknown[0]}: {name} has no such parameter; "
            + (f"it takes {', '.join(accepted)}" if accepted else "it takes none")
        )
    return cls(**cls.canonical_args(params))


__all__ = ["METHODS", "Resources", "SaliencyMethod", "make_method"]
