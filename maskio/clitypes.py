"""Option types both command lines share."""

from __future__ import annotations

import math

import click


class Finite(click.FloatRange):
    """A float range that also refuses NaN and infinities (which compare false with every
    bound, so click's own range lets them through: a NaN loss weight trained a head on NaN)."""

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number
