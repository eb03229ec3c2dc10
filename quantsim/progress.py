"""Progress bars for long operations (calibration, range search, sweeps, export).

One rule for all of them: a ``tqdm.auto`` bar (a widget in Jupyter, text in a terminal) that
appears only when the operation lasts longer than :data:`DELAY_S`, and never when
``QUANTSIM_PROGRESS=0`` or when stderr is neither a terminal nor a Jupyter kernel's stream
(CI logs, pipes). ``QUANTSIM_PROGRESS=1`` forces bars on, drawn at once (no delay). In a Jupyter
kernel without ``ipywidgets`` the bar is tqdm's text bar (``tqdm.auto`` would warn there).

Where the bars are: ``compute_encodings`` (forward passes of the model while the callback runs,
:func:`forward_passes`), the encodings computed at the end of a calibration (the tf_enhanced
and percentile searches), and the steps of an export.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from typing import Any, Iterable, Iterator, Optional, TypeVar

T = TypeVar("T")

#: Seconds an operation runs before its bar is drawn: quick calls stay silent.
DELAY_S = 1.0


def _forced() -> Optional[bool]:
    """``QUANTSIM_PROGRESS``: False (``0``/``false``/``no``/``off``), True (``1``/``true``/
    ``yes``/``on``), None when unset or anything else."""
    setting = os.environ.get("QUANTSIM_PROGRESS", "").strip().lower()
    if setting in ("0", "false", "no", "off"):
        return False
    if setting in ("1", "true", "yes", "on"):
        return True
    return None


def progress_enabled() -> bool:
    """Whether bars are drawn: ``QUANTSIM_PROGRESS`` (``0``/``1``) decides if set, else a
    terminal or a Jupyter kernel on stderr."""
    forced = _forced()
    if forced is not None:
        return forced
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
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)
    delay = 0.0 if _forced() else DELAY_S
    return _tqdm_class()(iterable, desc=desc, total=total, unit=unit, leave=leave, delay=delay,
                         file=sys.stderr, dynamic_ncols=True)


def _tqdm_class() -> Any:
    """``tqdm.auto``'s class where it can draw (a terminal; a kernel with ipywidgets), else
    tqdm's text bar (a kernel without ipywidgets, where ``tqdm.auto`` warns on import)."""
    if "ipykernel" in sys.modules and importlib.util.find_spec("ipywidgets") is None:
        from tqdm.std import tqdm
        return tqdm
    from tqdm.auto import tqdm
    return tqdm


def batch_total(data: Any) -> Optional[int]:
    """How many batches a calibration callback's argument holds, when that is clear: the
    length of a ``DataLoader``, or of a list / tuple of tensors (one batch each); else None
    (a count without a total is shown)."""
    import torch
    if isinstance(data, torch.utils.data.DataLoader):
        try:
            return len(data)
        except TypeError:  # an iterable dataset without __len__
            return None
    if isinstance(data, (list, tuple)) and data and all(isinstance(x, torch.Tensor) for x in data):
        return len(data)
    return None


@contextlib.contextmanager
def forward_passes(model: Any, desc: str, total: Optional[int] = None) -> Iterator[Any]:
    """A bar counting the forward passes of ``model`` (``nn.Module``) inside the block; yields
    the bar.

    The count comes from a forward pre-hook on ``model``, registered only while a bar can be
    drawn (so a silent run adds no hook). With a ``total`` that the passes outgrow, the bar
    drops the total and keeps counting.
    """
    if not progress_enabled():
        yield _Silent()
        return
    bar = progress(desc=desc, total=total, unit="batch")

    def count(_module: Any, _args: Any) -> None:
        if bar.total is not None and bar.n >= bar.total:
            bar.total = None
        bar.update(1)
    handle = model.register_forward_pre_hook(count)
    try:
        yield bar
    finally:
        handle.remove()
        bar.close()
