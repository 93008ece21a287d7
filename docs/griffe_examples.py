"""A griffe extension for the API reference: fastmeta's docstrings head their doctests
``Example:`` (singular), which griffe's Google-style parser does not know as a section
name (it knows ``Examples:``). Without this, the ``>>>`` lines would be rendered as prose
and ``x[0]`` read as a Markdown link."""

from __future__ import annotations

import re
from typing import Any

import griffe

_EXAMPLE = re.compile(r"^(?P<indent>[ \t]*)Example:[ \t]*$", re.MULTILINE)


class ExampleSections(griffe.Extension):
    """Rename ``Example:`` section headings to ``Examples:`` before parsing."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _EXAMPLE.sub(r"\g<indent>Examples:", obj.docstring.value)
