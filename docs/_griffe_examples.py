"""griffe extension for the API reference: read a docstring's ``Example:`` section as examples.

The package's docstrings head their doctests ``Example:`` (singular). griffe's Google parser
knows only ``Examples:`` as a section and takes ``Example:`` for an admonition, whose body is
rendered as prose, so the ``>>>`` lines would lose their code formatting. This extension
renames the heading before parsing; the source stays as it is.
"""
import re
from typing import Any

import griffe

_EXAMPLE_HEADING = re.compile(r"^(\s*)Example:[ \t]*$", re.MULTILINE)


class ExampleSections(griffe.Extension):
    """Rewrite ``Example:`` headings to ``Examples:`` in every loaded docstring."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        """Called by griffe once per loaded object, after its members are loaded."""
        if obj.docstring is not None:
            obj.docstring.value = _EXAMPLE_HEADING.sub(r"\1Examples:", obj.docstring.value)
