"""Plain-text tables: the one formatter behind ``print(sim)``, the conversion and analysis
reports, the demo and the command line."""
from __future__ import annotations

from typing import Iterable, Optional, Sequence


def format_table(header: Sequence[str], rows: Iterable[Sequence[object]],
                 right: Optional[Sequence[bool]] = None, rule: bool = True) -> str:
    """Align ``rows`` under ``header``, columns two spaces apart, trailing blanks dropped.

    Args:
        header: the column titles.
        rows: the cells (turned into text with ``str``).
        right: per column, True to right-align it (numbers); default all left-aligned.
        rule: a dashed line under the header.

    Example:
        >>> print(format_table(["name", "bits"], [("conv1", 8), ("fc", 16)], [False, True]))
        name   bits
        -----  ----
        conv1     8
        fc       16
    """
    table = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    right = list(right) if right is not None else [False] * len(header)
    lines = []
    for k, row in enumerate(table):
        cells = [c.rjust(w) if r else c.ljust(w) for c, w, r in zip(row, widths, right)]
        lines.append("  ".join(cells).rstrip())
        if k == 0 and rule:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
