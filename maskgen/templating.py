"""The one template engine of maskgen's outputs (report.html, the dataset card): Jinja2, with
the templates in ``maskgen/templates``. A missing value is an error (StrictUndefined), never
an empty string in a published card."""

from __future__ import annotations

import functools

import jinja2


@functools.cache
def _environment(html: bool) -> jinja2.Environment:
    # HTML is autoescaped, so no path, key or error text from a build (a file may be named
    # ``<script>``) reaches the page unescaped; Markdown is written as given, to the byte
    return jinja2.Environment(
        loader=jinja2.PackageLoader("maskgen", "templates"),
        autoescape=html,
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=not html,
    )


def template(name: str) -> jinja2.Template:
    """The template ``name`` of ``maskgen/templates`` (``.html`` ones autoescaped)."""
    return _environment(name.endswith(".html")).get_template(name)
