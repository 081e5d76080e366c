"""Griffe extension: a docstring's ``Example:`` section is read as an examples section.

The project's docstrings head their runnable examples ``Example:`` (Google style); griffe reads
only ``Examples:`` as a section of ``>>>`` snippets and would otherwise treat the singular as an
admonition of Markdown text. Listed under the mkdocstrings handler's ``extensions`` option.
"""

from __future__ import annotations

import re

import griffe

_EXAMPLE = re.compile(r"^(\s*)Example:[ \t]*$", re.MULTILINE)


class ExampleSections(griffe.Extension):
    """Rename ``Example:`` section titles to ``Examples:`` before the docstring is parsed."""

    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _EXAMPLE.sub(r"\1Examples:", obj.docstring.value)
