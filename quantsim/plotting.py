"""PNG figures for the reports (analysis, mixed precision, the demo) with matplotlib, the
optional ``quantsim[plot]`` extra.

Figures are ``matplotlib.figure.Figure`` objects (no pyplot: no global state, no GUI backend)
written atomically; callers check :func:`matplotlib_available` first and write JSON only
without it.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Tuple

from quantsim.atomic import atomic_write


def matplotlib_available() -> bool:
    """True when matplotlib can be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def new_figure(width: float = 10.0, height: float = 4.5,
               constrained: bool = False) -> Tuple[Any, Any]:
    """A ``(figure, axes)`` pair of ``width`` x ``height`` inches (``constrained``: matplotlib's
    constrained layout, which fits legends and labels)."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width, height), layout="constrained" if constrained else None)
    return fig, fig.subplots()


def save_png(fig: Any, path: Path, tight: bool = False, dpi: int = 90) -> None:
    """Write ``fig`` to ``path`` as PNG atomically; ``tight`` fits the margins to long tick
    labels (several times slower than a fixed layout)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight" if tight else None)
    atomic_write(Path(path), lambda f: f.write(buf.getvalue()))
