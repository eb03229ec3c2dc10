"""Progress bars for long operations (calibration, range search, sweeps, export).

One rule for all of them: a ``tqdm.auto`` bar (a widget in Jupyter, text in a terminal) that
appears only when the operation lasts longer than :data:`DELAY_S`, and never when
``QUANTSIM_PROGRESS=0`` or when stderr is neither a terminal nor a Jupyter kernel's stream
(CI logs, pipes). ``QUANTSIM_PROGRESS=1`` forces bars on.
"""
from __future__ import annotations

import os
import sys
from typing import Iterable, Iterator, Optional, TypeVar

T = TypeVar("T")

#: Seconds an operation runs before its bar is drawn: quick calls stay silent.
DELAY_S = 1.0


def progress_enabled() -> bool:
    """Whether bars are drawn: ``QUANTSIM_PROGRESS`` (``0``/``1``) decides if set, else a
    terminal or a Jupyter kernel on stderr."""
    setting = os.environ.get("QUANTSIM_PROGRESS", "").strip().lower()
    if setting in ("0", "false", "no", "off"):
        return False
    if setting in ("1", "true", "yes", "on"):
        return True
    stream = sys.stderr
    try:
        if stream is not None and stream.isatty():
            return True
    except (AttributeError, ValueError):   # closed or replaced streams
        return False
    return type(stream).__module__.startswith("ipykernel")


class _Silent:
    """The bar used when progress is off: same calls, no output, no tqdm import."""

    def __init__(self, iterable: Optional[Iterable] = None):
        self._iterable = iterable

    def __iter__(self) -> Iterator:
        return iter(self._iterable if self._iterable is not None else ())

    def update(self, n: int = 1) -> None:
        """Ignore a step."""

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        """Ignore a status text."""

    def close(self) -> None:
        """Nothing to close."""

    def __enter__(self) -> "_Silent":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(iterable: Optional[Iterable[T]] = None, *, desc: str, total: Optional[int] = None,
             unit: str = "it", leave: bool = False):
    """A bar over ``iterable`` (or a manual one when ``iterable`` is None: call ``update``).

    Without a known ``total`` (an unsized iterable) tqdm shows a count and a rate instead of a
    percentage. Use as ``for x in progress(xs, desc=...)`` or ``with progress(desc=...) as bar``.
    """
    if not progress_enabled():
        return _Silent(iterable)
    from tqdm.auto import tqdm
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)
    return tqdm(iterable, desc=desc, total=total, unit=unit, leave=leave, delay=DELAY_S,
                file=sys.stderr, dynamic_ncols=True)
