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
below — except the in-place eval pass over a module's fresh output (:func:`qdq_per_tensor_`),
which stays eager at any size, for memory. Both backends produce bit-identical results (tested).

Training (autograd records) runs the same arithmetic as two fused passes, on the same backend
(``auto`` compiles them from :data:`AUTO_MIN_ELEMENTS_TRAIN` elements):

* :func:`qdq_train` (forward): the result, the straight-through mask ``inside`` and, when the
  scale or offset learns, the per-element LSQ factor ``ds``, computed together (one loop
  when compiled);
* :func:`qdq_backward`: the input gradient ``grad * inside`` and the per-channel sums
  ``sum(grad * ds)`` and ``sum(grad * (1 - inside))``, likewise.

Inside a caller's ``torch.compile`` (``torch.compile(sim.model)``) every entry point returns the
one expression itself, whatever the backend: the caller's inductor fuses it with the
neighbouring ops (a nested compiled kernel, a cache or a host read would break its graph).

Nothing is recomputed from ``x`` in the backward pass, and masks are float tensors of ``x``'s
dtype (CPU kernels for bool tensors, ``torch.where`` in particular, are several times slower
than float arithmetic). Elementwise results are bit-identical across backends; the sums agree
to float rounding (inductor adds in another order, as eager's own sums do across thread
counts).
"""
from __future__ import annotations

import functools
import math
import os
import warnings
from typing import Callable, Optional, Tuple, Union

import torch

BACKENDS = ("auto", "eager", "compiled")
#: ``auto`` sends tensors at least this large to the compiled kernel. Measured in-model on a
#: 2-core CPU: eager wins up to 2^18 elements (activations still in cache, and the compiled
#: call has ~40 us of fixed cost), the two tie at 2^19..2^21, compiled is ~3x faster beyond.
AUTO_MIN_ELEMENTS = 1 << 21
#: The same for the training passes (:func:`qdq_train`, :func:`qdq_backward` with sums), which
#: fuse several more eager passes. Measured on the same CPU (one thread): the compiled forward
#: wins from 2^17 elements, the backward from 2^18; in a ResidualNet train step (2^19-element
#: activations) compiling them takes range learning from 2.0x to 1.9x the float step.
AUTO_MIN_ELEMENTS_TRAIN = 1 << 17

_backend: str = os.environ.get("QUANTSIM_KERNEL", "auto")
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


@functools.lru_cache(maxsize=None)
def _compile(fn: Callable) -> Callable:
    return torch.compile(fn, dynamic=True)


def _get_compiled() -> Optional[Callable]:
    return _compile(_nearest)


def _wants_compiled(numel: int, auto_min: int = AUTO_MIN_ELEMENTS) -> bool:
    """Whether the backend selection sends a tensor of ``numel`` elements to torch.compile
    (``auto_min``: the size from which ``auto`` does)."""
    return not _compile_failed and (
        _backend == "compiled" or (_backend == "auto" and numel >= auto_min))


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
    if rounding == "nearest" and torch.compiler.is_compiling():
        return _nearest(x, s, lo, hi)
    if rounding != "nearest":
        v = x.to(s.dtype) / s
        v = torch.floor(v + torch.rand_like(v)).clamp_(lo, hi).mul_(s)
        return v.to(x.dtype)
    if _wants_compiled(x.numel()):
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
    if _wants_compiled(x.numel()):
        return _run_compiled(x, *tensors)
    if x.dtype == torch.float32:
        v = torch.div(x, scale)
        return v.round_().clamp_(lo, hi).mul_(scale)
    v = torch.div(x.float(), scale)
    return v.round_().clamp_(lo, hi).mul_(scale).to(x.dtype)


def qdq_per_tensor_(x: torch.Tensor, scale: torch.Tensor, lo: float, hi: float,
                    tensors: tuple) -> torch.Tensor:
    """:func:`qdq_per_tensor` that overwrites a float32 ``x`` (no new buffer, and the data is
    still in cache from the op that produced it) unless the backend is ``compiled``; returns
    the result, which is ``x`` itself in that case. ``auto`` stays eager here whatever the
    size: the fused kernel would allocate an ``x``-sized result and load inductor (~200 MB of
    RSS once per process), which for an LLM's logits (16M elements on a 56M-parameter decoder)
    cost more memory than the model's weights while the eager passes ran faster in the
    forward (benchmarks/llm.py)."""
    if x.dtype != torch.float32 or (_backend == "compiled" and not _compile_failed):
        return qdq_per_tensor(x, scale, lo, hi, tensors)
    return x.div_(scale).round_().clamp_(lo, hi).mul_(scale)


def _run_compiled(x: torch.Tensor, s: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    shape = x.shape
    xc, sc, _ = _canonical(x, s)
    out = _try_compiled(_get_compiled, xc, sc, _like(lo, sc), _like(hi, sc))
    return _eager_nearest(x, s, lo, hi) if out is None else out.reshape(shape)


def _like(t: torch.Tensor, canonical_s: torch.Tensor) -> torch.Tensor:
    """A per-channel constant in the canonical layout of :func:`_canonical` (0-d per tensor)."""
    return t.reshape(canonical_s.shape) if t.numel() > 1 else t.reshape(())


def _try_compiled(get: Callable[[], Callable], *args):
    """``get()(*args)``, or None after switching to eager for good (with one warning)."""
    global _compile_failed
    try:
        return get()(*args)
    except Exception as exc:  # inductor missing a compiler, an unsupported device, ...
        _compile_failed = True
        warnings.warn(
            f"quantsim: the compiled fake-quant kernel is unavailable ({type(exc).__name__}: "
            f"{exc}); falling back to eager torch ops (slower, identical results)."
        )
        return None


# ----------------------------------------------------------------------------------------------
# training: the forward pass keeps what the backward pass needs
# ----------------------------------------------------------------------------------------------
Bound = Union[float, torch.Tensor]


def _train_nearest(x: torch.Tensor, s: torch.Tensor, lo: Bound, hi: Bound, lsq: bool):
    # The one expression both backends run, in the canonical layout: (out, inside, ds). With
    # lsq, an infinite v becomes the largest finite value first (it clips to the same end), so
    # that v * 0 cannot turn its factor, the clipped code, into NaN; NaN stays NaN.
    v = x.to(s.dtype) / s
    if lsq:
        v = torch.nan_to_num(v, nan=math.nan)
    r = torch.round(v)
    c = r.clamp(lo, hi)
    inside = (c == r).to(s.dtype)
    ds = c - v * inside if lsq else None  # r - v on the grid, the clipped code elsewhere
    return (c * s).to(x.dtype), inside.to(x.dtype), ds


def _eager_train_nearest(x: torch.Tensor, s: torch.Tensor, lo: Bound, hi: Bound, lsq: bool):
    # _train_nearest in as few new buffers as it can: each result overwrites an input it no
    # longer needs (inside overwrites the codes, ds the quotients, out the clamped codes).
    v = torch.div(x if x.dtype == s.dtype else x.to(s.dtype), s)
    ds = None
    if lsq:
        r = torch.round(v.nan_to_num_(nan=math.nan))
        c = torch.clamp(r, lo, hi)
        inside = torch.eq(c, r, out=r)
        ds = torch.addcmul(c, v, inside, value=-1, out=v)
    else:
        c = torch.clamp(v.round_(), lo, hi)
        inside = torch.eq(c, v, out=v)
    out = c.mul_(s)
    if x.dtype != s.dtype:
        out, inside = out.to(x.dtype), inside.to(x.dtype)
    return out, inside, ds


def _backward_sums(grad: torch.Tensor, inside: torch.Tensor, ds: torch.Tensor, need_out: bool):
    # The one expression of the backward pass with ds, in the canonical layout (1-d or
    # (pre, C, post)): the input gradient, the sum of grad * ds and that of grad where the
    # value clipped (grad - grad * inside is exactly grad there and 0 elsewhere).
    grad_x = grad * inside
    g = grad.to(ds.dtype)
    dims = (0, 2) if g.dim() == 3 else (0,)
    sum_out = (g - grad_x.to(ds.dtype)).sum(dim=dims) if need_out else None
    return grad_x, (g * ds).sum(dim=dims), sum_out


def _eager_backward_sums(grad: torch.Tensor, inside: torch.Tensor, ds: torch.Tensor,
                         need_out: bool):
    # _backward_sums; per tensor (float32), one dot product instead of a product and its sum.
    if grad.dim() != 1 or grad.dtype != ds.dtype:
        return _backward_sums(grad, inside, ds, need_out)
    grad_x = grad * inside
    return grad_x, torch.dot(grad, ds), (grad - grad_x).sum() if need_out else None


def qdq_train(x: torch.Tensor, scale: torch.Tensor, offset: Optional[torch.Tensor], qmin: int,
              qmax: int, axis: Optional[int] = None, rounding: str = "nearest",
              lsq: bool = False) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """The forward pass of fake-quantization under autograd: ``(out, inside, ds)``.

    ``scale`` and ``offset`` have the encoding's shape (0-d per tensor, ``(C,)`` along ``axis``)
    and the dtype to compute in; ``offset`` None is a symmetric grid's 0 (the clamp bounds are
    then ``qmin`` and ``qmax`` themselves). ``out`` is :func:`qdq`'s result (``x``'s shape and
    dtype).
    ``inside`` is 1 where the code ``round(x / s)`` lies on the grid ``[o + qmin, o + qmax]``
    (the straight-through estimator passes the gradient there) and 0 elsewhere, in ``x``'s
    dtype. With ``lsq``, ``ds`` is each element's derivative of ``qdq(x)`` with respect to
    ``s`` (LSQ): ``round(x / s) - x / s`` on the grid, the clipped code elsewhere, in the
    compute dtype; else None. ``inside`` and ``ds`` are in the layout :func:`qdq_backward`
    takes (opaque to callers). Stochastic rounding gives ``out`` its random codes while the
    mask and ``ds`` come from the nearest code.
    """
    if offset is None:
        offset = torch.zeros_like(scale) if rounding != "nearest" else None
    if scale.numel() == 1:
        xc = x.reshape(-1)
        sc = scale if scale.dim() == 0 else scale.reshape(())
        oc = offset if offset is None or offset.dim() == 0 else offset.reshape(())
    else:
        axis = x.dim() - 1 if axis is None else axis  # broadcast along the last axis
        pre = 1
        for n in x.shape[:axis]:
            pre *= n
        xc, sc = x.reshape(pre, x.shape[axis], -1), scale.reshape(1, -1, 1)
        oc = None if offset is None else offset.reshape(1, -1, 1)
    result = None
    if torch.compiler.is_compiling():
        result = (_train_nearest(xc, sc, float(qmin), float(qmax), lsq) if oc is None
                  else _train_nearest(xc, sc, oc + qmin, oc + qmax, lsq))
    elif rounding == "nearest" and _wants_compiled(x.numel(), AUTO_MIN_ELEMENTS_TRAIN):
        oc_t = torch.zeros_like(sc) if oc is None else oc
        result = _try_compiled(lambda: _compile(_train_nearest), xc, sc, oc_t + qmin,
                               oc_t + qmax, lsq)
    if result is None:
        if oc is None:  # numbers as bounds: a much faster clamp
            lo, hi = float(qmin), float(qmax)
        elif oc.dim() == 0 and x.device.type == "cpu":
            lo, hi = _float_bounds(oc, qmin, qmax)
        else:
            lo, hi = oc + qmin, oc + qmax
        result = _eager_train_nearest(xc, sc, lo, hi, lsq)
    out, inside, ds = result
    if rounding != "nearest":
        view = (sc if sc.dim() == 0 else scale.reshape([-1 if i == axis else 1
                                                         for i in range(x.dim())]))
        return qdq(x, view, offset.reshape(view.shape), qmin, qmax, rounding), inside, ds
    return out.view(x.shape), inside, ds


def _float_bounds(offset: torch.Tensor, qmin: int, qmax: int) -> Tuple[float, float]:
    """``o + qmin`` and ``o + qmax`` of a 0-d CPU offset as Python floats, equal to the sums
    in the offset's dtype: exact in float64, and exact in float32 for integral offsets of
    magnitude <= 2^23 (every encoding's, on grids of <= 2^21 steps); others are summed there."""
    o = offset.item()
    if offset.dtype == torch.float64 or (o.is_integer() and abs(o) <= 2**23):
        return o + qmin, o + qmax
    return float(offset + qmin), float(offset + qmax)


def qdq_backward(grad: torch.Tensor, inside: torch.Tensor, ds: Optional[torch.Tensor],
                 need_out: bool = True
                 ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Gradients from what :func:`qdq_train` kept: ``(grad_x, sum_ds, sum_out)``.

    ``grad_x = grad * inside`` (``grad``'s shape and dtype). With ``ds``: ``sum_ds`` is the sum
    of ``grad * ds`` and (with ``need_out``) ``sum_out`` that of ``grad`` where the value
    clipped, per channel (``(C,)``) or over everything (0-d), in ``ds``'s dtype; None
    otherwise. Without ``ds`` the pass is one multiplication, which nothing can fuse: it always
    runs eagerly.
    """
    g = grad.reshape(inside.shape)
    if ds is None:
        return (g * inside).view(grad.shape), None, None
    result = None
    if torch.compiler.is_compiling():
        result = _backward_sums(g, inside, ds, need_out)
    elif _wants_compiled(g.numel(), AUTO_MIN_ELEMENTS_TRAIN):
        result = _try_compiled(lambda: _compile(_backward_sums), g, inside, ds, need_out)
    if result is None:
        result = _eager_backward_sums(g, inside, ds, need_out)
    grad_x, sum_ds, sum_out = result
    return grad_x.view(grad.shape), sum_ds, sum_out
