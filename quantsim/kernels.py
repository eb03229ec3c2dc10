"""The fake-quant pass: one expression, two ways to run it.

``qdq`` computes ``clamp(round(x / s), o + qmin, o + qmax) * s`` (identical to
``(clamp(round(x / s) - o, qmin, qmax) + o) * s`` for integer ``o``) and returns it in ``x``'s
dtype. Backends:

* ``eager``: four in-place torch ops over one fresh buffer. Always available.
* ``compiled``: the same Python expression through ``torch.compile`` (inductor), which fuses it
  into a single pass over memory (~2-4x faster on CPU). The first call in a process compiles
  (seconds; inductor caches on disk for later processes). Any compile failure falls back to
  ``eager`` with one warning.

The backend is chosen by :func:`set_backend` or the ``QUANTSIM_KERNEL`` environment variable
(``auto`` | ``eager`` | ``compiled``). ``auto`` (default) uses ``compiled`` for tensors of at
least :data:`AUTO_MIN_ELEMENTS` elements, where the fused pass pays for itself, and ``eager``
below. Both backends produce bit-identical results (tested).
"""
from __future__ import annotations

import os
import warnings
from typing import Callable, Optional

import torch

BACKENDS = ("auto", "eager", "compiled")
#: ``auto`` sends tensors at least this large to the compiled kernel. Measured in-model on a
#: 2-core CPU: eager wins up to 2^18 elements (activations still in cache, and the compiled
#: call has ~40 us of fixed cost), the two tie at 2^19..2^21, compiled is ~3x faster beyond.
AUTO_MIN_ELEMENTS = 1 << 21

_backend: str = os.environ.get("QUANTSIM_KERNEL", "auto")
_compiled: Optional[Callable] = None
_compile_failed = False


def set_backend(name: str) -> None:
    """Select the fake-quant backend: ``'auto'``, ``'eager'`` or ``'compiled'``."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; allowed: {list(BACKENDS)}")
    _backend = name


def get_backend() -> str:
    """The backend selected now (``'auto'``, ``'eager'`` or ``'compiled'``)."""
    return _backend


def _nearest(x: torch.Tensor, s: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    # The one expression both backends run. Division (not multiplication by 1/s) matches ONNX
    # QuantizeLinear exactly at rounding ties.
    return (torch.round(x.to(s.dtype) / s).clamp(lo, hi) * s).to(x.dtype)


def _eager_nearest(x: torch.Tensor, s: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    v = torch.div(x.to(s.dtype), s)
    v.round_().clamp_(lo, hi).mul_(s)
    return v.to(x.dtype)


def _get_compiled() -> Optional[Callable]:
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(_nearest, dynamic=True)
    return _compiled


def _canonical(x: torch.Tensor, s: torch.Tensor):
    """View ``x`` as 1-d (per tensor) or 3-d ``(pre, C, post)`` (per channel).

    Keeps the number of compiled variants small whatever the tensor rank.
    """
    if s.numel() == 1:
        return x.reshape(-1), s.reshape(()), None
    axis = next(i for i, n in enumerate(s.shape) if n != 1)
    pre = 1
    for n in x.shape[:axis]:
        pre *= n
    return x.reshape(pre, x.shape[axis], -1), s.reshape(1, -1, 1), axis


def qdq(
    x: torch.Tensor, s: torch.Tensor, o: torch.Tensor, qmin: int, qmax: int, rounding: str = "nearest"
) -> torch.Tensor:
    """Quantize-dequantize ``x``; ``s`` and ``o`` already broadcast against ``x``.

    No autograd handling here: :func:`quantsim.encoding.fake_quantize` owns the gradients.
    """
    lo = o + qmin
    hi = o + qmax
    if rounding != "nearest":
        v = x.to(s.dtype) / s
        v = torch.floor(v + torch.rand_like(v)).clamp_(lo, hi).mul_(s)
        return v.to(x.dtype)
    use_compiled = _backend == "compiled" or (
        _backend == "auto" and x.numel() >= AUTO_MIN_ELEMENTS
    )
    if use_compiled and not _compile_failed:
        return _run_compiled(x, s, lo, hi)
    return _eager_nearest(x, s, lo, hi)


def qdq_per_tensor(x: torch.Tensor, scale: torch.Tensor, lo: float, hi: float,
                   tensors: tuple) -> torch.Tensor:
    """Per-tensor nearest qdq in float32 (the eval hot path).

    ``scale`` is a 0-d float32 tensor, ``lo`` / ``hi`` the clamp bounds ``o + qmin`` /
    ``o + qmax`` as Python floats, ``tensors`` the three values as 0-d tensors for the
    compiled kernel. The argument types are chosen for speed on small tensors (a Python float
    costs a scalar wrap in ``div`` / ``mul_``, a tensor bound makes ``clamp_`` take a slow
    broadcasting kernel); the arithmetic is that of :func:`qdq`, bit for bit.
    """
    use_compiled = _backend == "compiled" or (
        _backend == "auto" and x.numel() >= AUTO_MIN_ELEMENTS
    )
    if use_compiled and not _compile_failed:
        return _run_compiled(x, *tensors)
    if x.dtype == torch.float32:
        v = torch.div(x, scale)
        return v.round_().clamp_(lo, hi).mul_(scale)
    v = torch.div(x.float(), scale)
    return v.round_().clamp_(lo, hi).mul_(scale).to(x.dtype)


def qdq_per_tensor_(x: torch.Tensor, scale: torch.Tensor, lo: float, hi: float,
                    tensors: tuple) -> torch.Tensor:
    """:func:`qdq_per_tensor` that overwrites a float32 ``x`` (no new buffer, and the data is
    still in cache from the op that produced it) where the eager backend runs; returns the
    result, which is ``x`` itself in that case."""
    if x.dtype != torch.float32 or _backend == "compiled" or (
            _backend == "auto" and x.numel() >= AUTO_MIN_ELEMENTS and not _compile_failed):
        return qdq_per_tensor(x, scale, lo, hi, tensors)
    return x.div_(scale).round_().clamp_(lo, hi).mul_(scale)


def _run_compiled(x: torch.Tensor, s: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    global _compile_failed
    shape = x.shape
    xc, sc, _ = _canonical(x, s)
    loc = lo.reshape(sc.shape) if lo.numel() > 1 else lo.reshape(())
    hic = hi.reshape(sc.shape) if hi.numel() > 1 else hi.reshape(())
    try:
        return _get_compiled()(xc, sc, loc, hic).reshape(shape)
    except Exception as exc:  # inductor missing a compiler, an unsupported device, ...
        _compile_failed = True
        warnings.warn(
            f"quantsim: the compiled fake-quant kernel is unavailable ({type(exc).__name__}: "
            f"{exc}); falling back to eager torch ops (slower, identical results)."
        )
        return _eager_nearest(x, s, lo, hi)
