"""The single source of truth for quantization arithmetic.

Convention (as aimet-torch 2.x and ``docs/concepts.md``)::

    q      = clamp(round(x / scale) - offset, qmin, qmax)      quantize
    x_hat  = (q + offset) * scale                               dequantize
    min    = scale * (offset + qmin),  max = scale * (offset + qmax)

``round`` is round-half-to-even (``torch.round``, ONNX ``QuantizeLinear``) for ``nearest`` and
``floor(v + u), u ~ U[0, 1)`` for ``stochastic``. The *internal* grid depends on the mode:

============================  =====================================  ================
mode                          grid [qmin, qmax]                      internal offset
============================  =====================================  ================
asymmetric                    [0, 2^b - 1]                           round(min/scale)
symmetric (signed)            [-2^(b-1), 2^(b-1) - 1]                0
strict symmetric              [-(2^(b-1) - 1), 2^(b-1) - 1]          0
unsigned symmetric (min>=0)   [0, 2^b - 1]                           0
============================  =====================================  ================

Files written for AIMET tools use the *unsigned view*, ``legacy_offset = offset + qmin``
(``-128`` for 8-bit symmetric); see :meth:`Encoding.legacy_offset`.

Everything that quantizes (the quantizer modules, the analyzers' noise search, the QAT modules,
the QDQ exporter's reference) calls the functions here; nothing re-derives the maths.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch

from quantsim import kernels
from quantsim.errors import QuantizationSettingError

#: Smallest scale an encoding may have (float32 machine epsilon, as aimet-torch 2.x).
MINIMUM_SCALE: float = torch.finfo(torch.float32).eps
#: Rounding modes accepted everywhere a rounding mode is configurable.
ROUNDING_MODES: Tuple[str, ...] = ("nearest", "stochastic")
#: Integer bitwidths quantsim simulates.
INT_BITWIDTHS = range(4, 32)
#: Float bitwidths quantsim simulates (IEEE half precision).
FLOAT_BITWIDTHS = (16,)
DATA_TYPES = ("int", "float")

TensorLike = Union[torch.Tensor, float, Sequence[float]]


# ----------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------
def validate_bitwidth(bitwidth: Any, data_type: str = "int", where: str = "quantizer") -> int:
    """Check a bitwidth for a data type and return it as ``int``.

    Args:
        bitwidth: the requested bitwidth.
        data_type: ``'int'`` (4..31 allowed) or ``'float'`` (16 allowed).
        where: what the setting belongs to, used in the error message.

    Raises:
        QuantizationSettingError: naming ``where``, the value and what is allowed.
    """
    data_type = validate_data_type(data_type, where)
    if isinstance(bitwidth, bool) or not isinstance(bitwidth, (int,)) and not (
        isinstance(bitwidth, float) and bitwidth.is_integer()
    ):
        raise QuantizationSettingError(f"{where}: bitwidth must be an integer, got {bitwidth!r}")
    bitwidth = int(bitwidth)
    if data_type == "int" and bitwidth not in INT_BITWIDTHS:
        raise QuantizationSettingError(
            f"{where}: integer bitwidth {bitwidth} is not supported; allowed: 4..31"
        )
    if data_type == "float" and bitwidth not in FLOAT_BITWIDTHS:
        raise QuantizationSettingError(
            f"{where}: float bitwidth {bitwidth} is not supported; allowed: 16 (IEEE half)"
        )
    return bitwidth


def validate_data_type(data_type: Any, where: str = "quantizer") -> str:
    """Normalise a data type (``'int'``, ``'float'`` or an enum whose name is one) to a string."""
    name = getattr(data_type, "name", data_type)
    name = str(name).lower() if name is not None else name
    if name not in DATA_TYPES:
        raise QuantizationSettingError(
            f"{where}: data type {data_type!r} is not supported; allowed: 'int', 'float'"
        )
    return name


def validate_rounding(rounding: Any, where: str = "quantizer") -> str:
    """Check a rounding mode; allowed: ``'nearest'`` and ``'stochastic'``."""
    if rounding not in ROUNDING_MODES:
        raise QuantizationSettingError(
            f"{where}: rounding mode {rounding!r} is not supported; allowed: {list(ROUNDING_MODES)}"
        )
    return rounding


# ----------------------------------------------------------------------------------------------
# grids and ranges
# ----------------------------------------------------------------------------------------------
def integer_grid(
    bitwidth: int, symmetric: bool, strict: bool = False, unsigned: bool = False
) -> Tuple[int, int]:
    """Return the internal integer grid ``(qmin, qmax)`` of an encoding mode.

    Args:
        bitwidth: 4..31.
        symmetric: signed symmetric grid when True (unless ``unsigned``).
        strict: symmetric grid without the extra negative code (``[-127, 127]`` at 8 bit).
        unsigned: symmetric encoding of non-negative data on ``[0, 2^b - 1]``.
    """
    if not symmetric or unsigned:
        return 0, 2**bitwidth - 1
    half = 2 ** (bitwidth - 1)
    return (-(half - 1) if strict else -half), half - 1


def adjust_range(
    min_val: torch.Tensor, max_val: torch.Tensor, num_steps: int, symmetric: bool
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Make an observed range encodable; the one place range adjustment is written.

    1. include zero (so 0.0 is exactly representable);
    2. clamp infinities to half the float32 range each side (the scale stays finite);
    3. widen a range narrower than ``num_steps * MINIMUM_SCALE`` (aimet-torch 2.x rule);
    4. for symmetric grids, pick ``delta = max(max / pos, -min / neg)`` and return the
       grid-aligned ``(-neg * delta, pos * delta)`` with ``pos = floor(N/2)``, ``neg = ceil(N/2)``.

    Args:
        min_val, max_val: float32 tensors of the encoding shape.
        num_steps: ``qmax - qmin``.
        symmetric: apply the symmetric rule.

    Returns:
        ``(min, max)`` float32 tensors, same shape as the inputs.
    """
    # half the float32 range each side, so that max - min (hence the scale) stays finite
    fmax = torch.finfo(torch.float32).max / 2
    min_val = torch.as_tensor(min_val, dtype=torch.float32).clamp(min=-fmax, max=0.0)
    max_val = torch.as_tensor(max_val, dtype=torch.float32).clamp(min=0.0, max=fmax)
    min_val = torch.nan_to_num(min_val, nan=0.0)
    max_val = torch.nan_to_num(max_val, nan=0.0)
    too_narrow = ((max_val - min_val) / num_steps < MINIMUM_SCALE).to(torch.float32)
    step = MINIMUM_SCALE * too_narrow
    pos, neg = num_steps // 2, (num_steps + 1) // 2
    if symmetric:
        max_val = max_val + pos * step
        min_val = min_val - neg * step
        delta = torch.maximum(max_val / pos, -min_val / neg)
        min_val, max_val = -neg * delta, pos * delta
    else:
        max_val = max_val + num_steps * step
    return min_val.clamp(min=-fmax), max_val.clamp(max=fmax)


def scale_offset_from_range(
    min_val: torch.Tensor, max_val: torch.Tensor, qmin: int, qmax: int, symmetric: bool
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Derive ``(scale, offset)`` from an adjusted range (aimet-torch 2.x, float32).

    ``scale = (max - min) / (qmax - qmin)`` floored at :data:`MINIMUM_SCALE`;
    ``offset = round(min / scale) - qmin`` for asymmetric grids (clamped so that 0 stays on the
    grid), 0 for symmetric ones. Differentiable (``round`` is straight-through), so learnable
    ranges train through it; see :func:`_range_encoding_backward` for the gradients.
    """
    if torch.is_grad_enabled() and (min_val.requires_grad or max_val.requires_grad):
        return _ScaleOffsetFromRange.apply(min_val, max_val, qmin, qmax, symmetric)
    return _range_encoding(min_val, max_val, qmin, qmax, symmetric)[:2]


def _range_constants(qmin: int, qmax: int, dtype: torch.dtype, device: torch.device):
    """``(steps, floor, qmin, offset_lo, offset_hi, zero)`` as 0-d tensors: the numbers of the
    range arithmetic, which runs on tiny tensors once per quantizer and step, where a Python
    number would cost a scalar conversion per op (the values, hence the results, are the same).
    Cached, except inside torch.compile, whose graph makes them (dynamo warns at a cache)."""
    if torch.compiler.is_compiling():
        return _new_range_constants(qmin, qmax, dtype, device)
    return _cached_range_constants(qmin, qmax, dtype, device)


def _new_range_constants(qmin: int, qmax: int, dtype: torch.dtype, device: torch.device):
    low, high = _offset_bounds(qmin, qmax)
    return tuple(torch.tensor(v, dtype=dtype, device=device)
                 for v in (qmax - qmin, MINIMUM_SCALE, qmin, low, high, 0))


_cached_range_constants = functools.lru_cache(maxsize=None)(_new_range_constants)


def _range_encoding(min_val: torch.Tensor, max_val: torch.Tensor, qmin: int, qmax: int,
                    symmetric: bool):
    """``(scale, offset, masks)``: :func:`scale_offset_from_range`'s values (no autograd) and
    what :func:`_range_encoding_backward` needs: whether the scale is above its floor, and
    (asymmetric grids) ``min / scale`` and whether the offset is inside its clamp."""
    steps, floor, q_min, low, high, _ = _range_constants(qmin, qmax, min_val.dtype,
                                                         min_val.device)
    raw = torch.sub(max_val, min_val).div_(steps)
    scale = torch.maximum(raw, floor)
    scale_learns = raw >= floor
    if symmetric:
        return scale, torch.zeros_like(scale), (scale_learns, None, None)
    ratio = min_val / scale
    unclamped = torch.round(ratio).sub_(q_min)
    offset = torch.clamp(unclamped, low, high)
    return scale, offset, (scale_learns, ratio, offset == unclamped)


def _range_encoding_backward(scale: torch.Tensor, masks: tuple, grad_scale: torch.Tensor,
                             grad_offset: Optional[torch.Tensor], qmin: int, qmax: int
                             ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(grad_min, grad_max)`` of :func:`scale_offset_from_range`, in closed form.

    ``scale`` takes its gradient while ``(max - min) / (qmax - qmin)`` is at or above the
    floor, and passes it on as ``+1/N`` to ``max`` and ``-1/N`` to ``min``; the offset
    ``round(min / scale) - qmin`` passes its gradient (``round`` straight-through) while
    inside its clamp, to ``min`` as ``1 / scale`` and to ``scale`` as ``-min / scale^2``.
    ``scale`` and ``masks`` are what :func:`_range_encoding` returned for the range.
    """
    scale_learns, ratio, offset_learns = masks
    steps, _, _, _, _, zero = _range_constants(qmin, qmax, scale.dtype, scale.device)
    from_offset = None
    if ratio is not None and grad_offset is not None:
        grad_ratio = torch.where(offset_learns, grad_offset, zero)
        grad_scale = torch.addcmul(grad_scale, grad_ratio, ratio / scale, value=-1)
        from_offset = grad_ratio / scale
    grad_max = torch.where(scale_learns, grad_scale, zero) / steps
    return (-grad_max if from_offset is None else from_offset - grad_max), grad_max


class _ScaleOffsetFromRange(torch.autograd.Function):
    """:func:`scale_offset_from_range` as one autograd node."""

    @staticmethod
    def forward(ctx, min_val, max_val, qmin, qmax, symmetric):  # noqa: D102
        scale, offset, masks = _range_encoding(min_val, max_val, qmin, qmax, symmetric)
        if symmetric:
            ctx.mark_non_differentiable(offset)
        ctx.save_for_backward(scale, *masks)
        ctx.grid = (qmin, qmax)
        return scale, offset

    @staticmethod
    def backward(ctx, grad_scale, grad_offset):  # noqa: D102
        scale, *masks = ctx.saved_tensors
        return _range_encoding_backward(scale, masks, grad_scale, grad_offset, *ctx.grid) + (
            None, None, None)


#: Largest |int32 bias code| allowed when widening weight scales: 2^31 less a margin of 2^15 for
#: the float rounding of ``bias / (input_scale * weight_scale)`` (aimet-torch 2.x's margin).
INT32_BIAS_STEPS = 2**31 - 2**15

#: Smallest requantization scale ``input_scale * weight_scale / output_scale`` kept: runtimes
#: that store it as a float exponent misread scales at or below 2^-24 (aimet-torch 2.x's floor).
MIN_REQUANT_SCALE = 2.0 ** -23.5


def int32_bias_weight_scale(
    weight_scale: torch.Tensor,
    bias: torch.Tensor,
    input_scale: torch.Tensor,
    output_scale: Optional[torch.Tensor] = None,
    output_offset: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The weight scale widened (never narrowed) so that a runtime's int32 arithmetic holds.

    A layer ``y = x W + b`` runs on integer hardware as ``round((xW + b_q) * s')`` with the
    bias stored as int32 codes ``b_q = round(b / (s_x s_w))`` and requantization scale
    ``s' = s_x s_w / s_y``. With a tiny weight scale (a channel of near-zero weights and a
    sizeable bias) those codes overflow. The scale per channel is raised to the least value
    that keeps, in turn:

    1. ``|b| / (s_x s_w) <= INT32_BIAS_STEPS`` (the bias fits int32);
    2. ``s_x s_w / s_y >= MIN_REQUANT_SCALE`` (the requantization scale stays representable),
       when the output has an encoding;
    3. the accumulator bias with the output offset folded in,
       ``round(b / (s_x s_w)) + round(o_y s_y / (s_x s_w))``, fits int32 as in 1.

    Args:
        weight_scale: per tensor (0-d) or per output channel (``(C,)``).
        bias: the float bias (``(C,)``); a per-tensor weight scale uses its largest magnitude.
        input_scale: the scale of the layer's (per-tensor) input encoding.
        output_scale, output_offset: the output encoding, if the output is quantized.

    Returns:
        The adjusted weight scale, shape and dtype of ``weight_scale`` (computed in float64).
    """
    s_w = weight_scale.detach().to(torch.float64)
    s_x = input_scale.detach().to(torch.float64).reshape(())
    b = bias.detach().to(torch.float64)
    b = b.abs().amax() if s_w.dim() == 0 else b.reshape(s_w.shape)
    s_w = torch.maximum(s_w, b.abs() / (INT32_BIAS_STEPS * s_x))
    if output_scale is not None and output_offset is not None:
        s_y = output_scale.detach().to(torch.float64).reshape(())
        o_y = output_offset.detach().to(torch.float64).reshape(())
        s_w = torch.maximum(s_w, MIN_REQUANT_SCALE * s_y / s_x)
        bias_scale = s_x * s_w
        accumulator = torch.round(b / bias_scale) + torch.round(o_y * s_y / bias_scale)
        s_w = torch.maximum(s_w, (accumulator * bias_scale).abs() / (INT32_BIAS_STEPS * s_x))
    return s_w.to(weight_scale.dtype).reshape(weight_scale.shape)


def _offset_bounds(qmin: int, qmax: int) -> Tuple[int, int]:
    """The clamp bounds of an asymmetric offset: 0 stays on the grid, in float32."""
    return _float32_toward_zero(-qmax), _float32_toward_zero(-qmin)


def _float32_toward_zero(v: int) -> int:
    """``v`` with its low bits cleared so float32 holds it exactly (rounded toward zero).

    Beyond 2^24 float32 rounds ``-qmax`` to the nearest even integer, which can be ``-qmax - 1``
    and would push 0 off the grid; a bound rounded toward zero keeps it on.
    """
    drop = max(0, abs(v).bit_length() - 24)
    return (abs(v) >> drop << drop) * (1 if v >= 0 else -1)


def channel_view(t: torch.Tensor, ndim: int, axis: Optional[int]) -> torch.Tensor:
    """Reshape a per-channel vector so it broadcasts along ``axis`` of an ``ndim`` tensor."""
    if axis is None or t.dim() == 0:
        return t
    shape = [1] * ndim
    shape[axis] = -1
    return t.reshape(shape)


def block_rows(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """The *block view* of a weight: ``(C, K, *rest)`` as ``(C * K / block_size, -1)`` rows.

    Per-block granularity splits dimension 1 (a Linear weight's input features, a Conv weight's
    input channels) into blocks of ``block_size``, one encoding per (output channel, block);
    a block spans the kernel's spatial dimensions too. Row ``c * (K / block_size) + k`` of the
    view holds block ``k`` of channel ``c``, so a ``(C, K / block_size)`` encoding flattened in
    row-major order is a per-channel encoding of the view along axis 0: every per-channel path
    (fake-quant kernels, analyzers, gradients) serves blocks unchanged. A view, not a copy, for
    contiguous ``x``.

    Raises:
        QuantizationSettingError: ``x`` has fewer than 2 dimensions or dimension 1 is not a
            multiple of ``block_size``.
    """
    if x.dim() < 2 or x.shape[1] % block_size:
        raise QuantizationSettingError(
            f"per-block quantization: a tensor of shape {tuple(x.shape)} has no dimension 1 "
            f"divisible into blocks of {block_size}")
    return x.reshape(x.shape[0] * (x.shape[1] // block_size), -1)


def block_shape(shape: Sequence[int], block_size: int) -> Tuple[int, int]:
    """The encoding shape ``(C, K / block_size)`` of per-block quantization of a weight of
    ``shape`` ``(C, K, *rest)``; see :func:`block_rows` for the errors."""
    if len(shape) < 2 or shape[1] % block_size:
        raise QuantizationSettingError(
            f"per-block quantization: a weight of shape {tuple(shape)} has no dimension 1 "
            f"divisible into blocks of {block_size}")
    return int(shape[0]), int(shape[1]) // block_size


def validate_block_size(block_size: Any, where: str = "quantizer") -> Optional[int]:
    """Check a block size (None, or an integer >= 1) and return it."""
    if block_size is None:
        return None
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise QuantizationSettingError(
            f"{where}: block_size must be a positive integer (the input features per block) or "
            f"None, got {block_size!r}")
    return block_size


def validate_decompressed_bw(decompressed_bw: Any, bitwidth: int,
                             where: str = "quantizer") -> Optional[int]:
    """Check an LPBQ decompressed bitwidth (None, or ``bitwidth``..31) and return it."""
    if decompressed_bw is None:
        return None
    if (isinstance(decompressed_bw, bool) or not isinstance(decompressed_bw, int)
            or not bitwidth <= decompressed_bw <= INT_BITWIDTHS[-1]):
        raise QuantizationSettingError(
            f"{where}: decompressed_bw must be an integer in {bitwidth}..{INT_BITWIDTHS[-1]} "
            f"(at least the bitwidth {bitwidth}), got {decompressed_bw!r}")
    return decompressed_bw


def lpbq_scale(block_scale: torch.Tensor, bitwidth: int, decompressed_bw: int
               ) -> Tuple[torch.Tensor, torch.Tensor]:
    """LPBQ: block scales as an integer multiplier times one float scale per channel.

    With ``steps = 2^(decompressed_bw - bitwidth)``, the channel scale is the largest block
    scale of the channel over ``steps`` and each block's multiplier is
    ``clamp(round(block / channel), 1, steps)`` (aimet-torch 2.x's grouped-block rule, all
    blocks of a channel in one group). Differentiable: the rounding is straight-through, so
    learnable ranges train through it.

    Args:
        block_scale: ``(C, blocks)`` scales of a per-block encoding.
        bitwidth, decompressed_bw: the bitwidth of the values and of value x multiplier.

    Returns:
        ``(scale, channel_scale)``: the effective ``(C, blocks)`` scales (multiplier x channel
        scale) and the ``(C,)`` channel scales.
    """
    steps = 2 ** (decompressed_bw - bitwidth)
    channel = block_scale.amax(dim=1, keepdim=True) / steps
    ratio = block_scale / channel
    multiplier = torch.round(ratio).clamp(1, steps)
    if ratio.requires_grad:
        multiplier = ratio + (multiplier - ratio).detach()
    return multiplier * channel, channel.squeeze(1)


def amin_amax(x: torch.Tensor, axis: Optional[int], block_size: Optional[int] = None
              ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Min and max of ``x`` per tensor (``axis=None``), per slice along ``axis``, or per block
    (``block_size``: ``(C, blocks)`` results, see :func:`block_rows`)."""
    if block_size is not None:
        lo, hi = torch.aminmax(block_rows(x.detach(), block_size), dim=1)
        shape = block_shape(x.shape, block_size)
        return lo.reshape(shape), hi.reshape(shape)
    if axis is None:
        return torch.aminmax(x)
    flat = x.detach().movedim(axis, 0).reshape(x.shape[axis], -1)
    return torch.aminmax(flat, dim=1)


# ----------------------------------------------------------------------------------------------
# quantize / dequantize / fake-quantize
# ----------------------------------------------------------------------------------------------
#: Widest grid (qmax - qmin) computed in float32; wider grids use float64 (see _compute_dtype).
FLOAT32_MAX_STEPS = 2**21


def _compute_dtype(qmin: int, qmax: int) -> torch.dtype:
    # aimet-torch 2.x's stability rule: float32 only while eps32 <= 0.25 / (qmax - qmin), i.e.
    # grids of at most 2^21 steps (<= 21 bits); beyond, x / s has too few fractional bits in
    # float32 (qdq stops being idempotent at 23-24 bits), so wider grids compute in float64.
    return torch.float32 if qmax - qmin <= FLOAT32_MAX_STEPS else torch.float64


def grid_point(scale: torch.Tensor, offset: torch.Tensor, code: int,
               grid: Tuple[int, int]) -> torch.Tensor:
    """The float32 value ``scale * (offset + code)`` of an integer code of ``grid``, computed in
    the precision fake-quantization uses for that grid, so it equals what qdq returns there
    (in float32, ``offset + code`` rounds once grids pass 2^24 steps)."""
    dtype = _compute_dtype(*grid)
    return (scale.to(dtype) * (offset.to(dtype) + code)).to(scale.dtype)


def _on_blocks(fn, x: torch.Tensor, block_size: int, scale: torch.Tensor,
               offset: torch.Tensor, *args) -> torch.Tensor:
    """``fn`` (a per-channel function of this module) over the block view of ``x`` with the
    ``(C, blocks)`` encoding flattened to the view's channels; the result in ``x``'s shape."""
    rows = block_rows(x, block_size)
    offset = None if offset is None else offset.reshape(-1)
    return fn(rows, scale.reshape(-1), offset, *args).reshape(x.shape)


def quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor,
    qmin: int,
    qmax: int,
    axis: Optional[int] = None,
    rounding: str = "nearest",
    block_size: Optional[int] = None,
) -> torch.Tensor:
    """Integer codes ``clamp(round(x / scale) - offset, qmin, qmax)`` as a float tensor
    (``block_size``: per-block ``(C, blocks)`` scale and offset, see :func:`block_rows`)."""
    if block_size is not None:
        return _on_blocks(quantize, x, block_size, scale, offset, qmin, qmax, 0, rounding)
    if rounding != "nearest":
        validate_rounding(rounding, "quantize")
    dtype = _compute_dtype(qmin, qmax)
    s = channel_view(scale.to(dtype), x.dim(), axis)
    o = channel_view(offset.to(dtype), x.dim(), axis)
    v = x.to(dtype) / s
    v = torch.round(v) if rounding == "nearest" else torch.floor(v + torch.rand_like(v))
    return (v - o).clamp_(qmin, qmax)


def dequantize(
    q: torch.Tensor, scale: torch.Tensor, offset: Optional[torch.Tensor],
    axis: Optional[int] = None, block_size: Optional[int] = None,
) -> torch.Tensor:
    """Real values ``(q + offset) * scale`` (float32, or float64 for float64 codes;
    ``block_size``: per block, as :func:`quantize`). ``q`` may be an integer tensor (codes
    kept compactly; they convert exactly); ``offset`` None means a zero offset (one pass
    fewer, the same values)."""
    if block_size is not None:
        return _on_blocks(dequantize, q, block_size, scale, offset, 0)
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    s = channel_view(scale.to(dtype), q.dim(), axis)
    o = None if offset is None else channel_view(offset.to(dtype), q.dim(), axis)
    if q.dtype == dtype:  # q.to(dtype) would be q itself: the caller's tensor
        return q * s if o is None else (q + o).mul_(s)
    # a converted copy, updated in place: a mixed-dtype op would run a slower casting loop
    v = q.to(dtype)
    return (v if o is None else v.add_(o)).mul_(s)


def rounding_error_in_steps(t: torch.Tensor, offset: Union[float, torch.Tensor], qmin: int,
                            qmax: int) -> torch.Tensor:
    """``t - (clamp(round(t) - offset, qmin, qmax) + offset)`` for ``t = x / scale``.

    The qdq error of :func:`quantize` / :func:`dequantize` measured in steps (multiply by
    ``scale`` for real units), computed in place in ``t`` (which it returns); ``offset`` is a
    number or broadcasts against ``t``. Values that clip have ``|error| > 0.5``. Calibration
    searches evaluate it for many candidate scales at once, so it avoids ``quantize``'s copies.
    """
    if isinstance(offset, torch.Tensor):
        codes = torch.round(t).sub_(offset).clamp_(qmin, qmax).add_(offset)
    else:  # one offset for all: the clamp bounds are scalars, two passes fewer
        codes = torch.round(t).clamp_(offset + qmin, offset + qmax)
    return t.sub_(codes)


def _fake_quantize_forward(x, scale, offset, qmin, qmax, axis, rounding, lsq):
    """``(out, inside, ds)`` of :func:`quantsim.kernels.qdq_train` for an encoding (autograd
    does not record inside a Function's forward); ``offset`` None: a symmetric grid's 0."""
    dtype = _compute_dtype(qmin, qmax)
    if scale.dtype != dtype:
        scale = scale.to(dtype)
    if offset is not None and offset.dtype != dtype:
        offset = offset.to(dtype)
    return kernels.qdq_train(x, scale, offset, qmin, qmax, axis, rounding, lsq)


def _fake_quantize_backward(grad, inside, ds, scale, need_x, need_scale, need_offset):
    """``(grad_x, grad_scale, grad_offset)`` from one pass over ``grad`` (None where not
    needed): straight-through for ``x``, LSQ for ``scale`` and ``offset``, from what
    :func:`_fake_quantize_forward` kept."""
    grad_x, sum_ds, sum_out = kernels.qdq_backward(grad, inside, ds, need_offset)
    grad_s = grad_o = None
    if need_scale:  # d qdq / ds: round(x/s) - x/s inside the grid, the clamped code outside
        grad_s = _as_encoding(sum_ds, scale)
    if need_offset:  # d qdq / do: s outside the grid, 0 inside
        grad_o = _as_encoding(sum_out * _as_encoding(scale, sum_out), scale)
    return grad_x if need_x else None, grad_s, grad_o


def _as_encoding(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` with ``like``'s shape and dtype (no op where it has them: this runs per step)."""
    if t.shape != like.shape:
        t = t.reshape(like.shape)
    return t if t.dtype == like.dtype else t.to(like.dtype)


class _FakeQuantize(torch.autograd.Function):
    """qdq with straight-through input gradients and LSQ-style scale/offset gradients."""

    @staticmethod
    def forward(ctx, x, scale, offset, qmin, qmax, axis, rounding):  # noqa: D102
        lsq = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        out, inside, ds = _fake_quantize_forward(x, scale, offset, qmin, qmax, axis, rounding,
                                                 lsq)
        ctx.save_for_backward(inside, ds, scale if lsq else None)
        return out

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        return _fake_quantize_backward(grad, *ctx.saved_tensors, *ctx.needs_input_grad[:3]
                                       ) + (None,) * 4


class _FakeQuantizeRange(torch.autograd.Function):
    """:class:`_FakeQuantize` with the encoding :func:`scale_offset_from_range` derives from a
    learnable range: one node for the range, the qdq and all three gradients."""

    @staticmethod
    def forward(ctx, x, min_val, max_val, qmin, qmax, symmetric, axis, rounding):  # noqa: D102
        scale, offset, masks = _range_encoding(min_val, max_val, qmin, qmax, symmetric)
        lsq = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        out, inside, ds = _fake_quantize_forward(x, scale, None if symmetric else offset, qmin,
                                                 qmax, axis, rounding, lsq)
        ctx.save_for_backward(inside, ds, scale, *masks)
        ctx.grid = (qmin, qmax, symmetric, lsq)
        return out

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        qmin, qmax, symmetric, lsq = ctx.grid
        inside, ds, scale, *masks = ctx.saved_tensors
        grad_x, grad_s, grad_o = _fake_quantize_backward(
            grad, inside, ds, scale, ctx.needs_input_grad[0], lsq, lsq and not symmetric)
        if not lsq:
            return grad_x, None, None, None, None, None, None, None
        grad_min, grad_max = _range_encoding_backward(scale, masks, grad_s, grad_o, qmin, qmax)
        return grad_x, grad_min, grad_max, None, None, None, None, None


def fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor,
    qmin: int,
    qmax: int,
    axis: Optional[int] = None,
    rounding: str = "nearest",
    block_size: Optional[int] = None,
) -> torch.Tensor:
    """Quantize-dequantize ``x`` in one pass; output has ``x``'s dtype.

    Gradients (when autograd records): straight-through to ``x`` inside the grid and zero
    outside; LSQ-style to ``scale`` (``clamp(round(x/s), o+qmin, o+qmax) - x/s * inside``) and to
    ``offset`` (``s`` outside the grid), summed over the elements that share them. The forward
    pass keeps a mask (and, when ``scale`` or ``offset`` learns, the per-element scale factor)
    so that the backward pass is one pass over the gradient.

    Args:
        x: input of any float dtype.
        scale, offset: 0-d tensors (per tensor) or 1-d along ``axis`` (per channel), one shape.
        qmin, qmax: the integer grid.
        axis: channel axis of ``x`` for per-channel encodings.
        rounding: ``'nearest'`` (half to even) or ``'stochastic'`` (whose gradients use the
            nearest code).
        block_size: per-block encodings: ``scale`` and ``offset`` are ``(C, blocks)`` over
            dimension 1 of ``x`` split into blocks of this size (:func:`block_rows`); the
            gradients are then per block.
    """
    if block_size is not None:
        return _on_blocks(fake_quantize, x, block_size, scale, offset, qmin, qmax, 0, rounding)
    if rounding != "nearest":
        validate_rounding(rounding, "fake_quantize")
    if torch.is_grad_enabled() and (
        x.requires_grad or scale.requires_grad or offset.requires_grad
    ):
        return _FakeQuantize.apply(x, scale, offset, qmin, qmax, axis, rounding)
    dtype = _compute_dtype(qmin, qmax)
    s = channel_view(scale.to(dtype), x.dim(), axis)
    o = channel_view(offset.to(dtype), x.dim(), axis)
    return kernels.qdq(x, s, o, qmin, qmax, rounding)


def fake_quantize_range(
    x: torch.Tensor,
    min_val: torch.Tensor,
    max_val: torch.Tensor,
    qmin: int,
    qmax: int,
    symmetric: bool,
    axis: Optional[int] = None,
    rounding: str = "nearest",
    block_size: Optional[int] = None,
) -> torch.Tensor:
    """:func:`fake_quantize` with the encoding :func:`scale_offset_from_range` derives from the
    range ``(min_val, max_val)`` (range learning).

    The result and the gradients are those of ``fake_quantize(x, *scale_offset_from_range(...))``
    under autograd, computed in one autograd node: the scale / offset sums come from the same
    pass over the gradient as the input gradient, and reach ``min_val`` and ``max_val`` through
    :func:`_range_encoding_backward`.

    Args:
        x: input of any float dtype.
        min_val, max_val: the range, 0-d (per tensor) or 1-d along ``axis`` (per channel).
        qmin, qmax: the integer grid.
        symmetric: the grid is signed symmetric (offset 0).
        axis: channel axis of ``x`` for per-channel ranges.
        rounding: ``'nearest'`` (half to even) or ``'stochastic'``.
        block_size: per-block ranges ``(C, blocks)``, as :func:`fake_quantize`.
    """
    if block_size is not None:
        return _on_blocks(fake_quantize_range, x, block_size, min_val, max_val, qmin, qmax,
                          symmetric, 0, rounding)
    if rounding != "nearest":
        validate_rounding(rounding, "fake_quantize_range")
    if torch.is_grad_enabled() and (
        x.requires_grad or min_val.requires_grad or max_val.requires_grad
    ):
        return _FakeQuantizeRange.apply(x, min_val, max_val, qmin, qmax, symmetric, axis,
                                        rounding)
    scale, offset = scale_offset_from_range(min_val, max_val, qmin, qmax, symmetric)
    return fake_quantize(x, scale, offset, qmin, qmax, axis, rounding)


def fake_quantize_float(x: torch.Tensor, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """Simulate a float format: round to ``dtype`` (nearest even) and back, saturating.

    Values beyond the format's largest finite value saturate to it (a runtime that stores
    fp16 activations clips rather than producing inf); NaN stays NaN. Straight-through gradient.
    """
    limit = torch.finfo(dtype).max
    out = x.clamp(-limit, limit).to(dtype).to(x.dtype)
    if torch.is_grad_enabled() and x.requires_grad:
        return x + (out - x).detach()
    return out


# ----------------------------------------------------------------------------------------------
# the Encoding value
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Encoding:
    """An immutable quantization encoding: what a runtime needs to quantize one tensor.

    Integer encodings hold ``scale`` and ``offset`` as float32 tensors of the encoding shape:
    0-d per tensor, ``(C,)`` per channel along ``axis``, ``(C, K / block_size)`` per block
    (``axis`` 0, blocks of ``block_size`` along dimension 1: :func:`block_rows`). Float
    encodings (fp16 simulation) hold neither.

    LPBQ (low-power blockwise) encodings are per-block symmetric encodings whose block scales
    are an integer multiplier in ``[1, 2^(decompressed_bw - bitwidth)]`` times a per-channel
    float scale ``channel_scale`` (``(C,)``); ``scale`` holds the products
    (:func:`lpbq_scale`), :attr:`per_block_int_scale` the multipliers.

    Example:
        >>> enc = Encoding.from_range(torch.tensor(-1.0), torch.tensor(2.0), bitwidth=8)
        >>> enc.qmin, enc.qmax, int(enc.offset)
        (0, 255, -85)
        >>> enc.fake_quantize(torch.tensor([0.0, 1.0])).tolist()[0]
        0.0
    """

    bitwidth: int
    scale: Optional[torch.Tensor] = None
    offset: Optional[torch.Tensor] = None
    symmetric: bool = False
    strict: bool = False
    unsigned: bool = False
    axis: Optional[int] = None
    data_type: str = "int"
    block_size: Optional[int] = None
    decompressed_bw: Optional[int] = None
    channel_scale: Optional[torch.Tensor] = None
    _grid: Tuple[int, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        data_type = validate_data_type(self.data_type, "Encoding")
        object.__setattr__(self, "data_type", data_type)
        validate_bitwidth(self.bitwidth, data_type, "Encoding")
        if data_type == "float":
            object.__setattr__(self, "_grid", (0, 0))
            return
        if self.scale is None or self.offset is None:
            raise QuantizationSettingError("Encoding: an int encoding needs scale and offset")
        scale = torch.as_tensor(self.scale, dtype=torch.float32).detach().cpu()
        offset = torch.as_tensor(self.offset, dtype=torch.float32).detach().cpu()
        if scale.shape != offset.shape:
            raise QuantizationSettingError(
                f"Encoding: scale shape {tuple(scale.shape)} != offset shape {tuple(offset.shape)}"
            )
        validate_block_size(self.block_size, "Encoding")
        if self.block_size is not None:
            if scale.dim() != 2 or self.axis != 0:
                raise QuantizationSettingError(
                    "Encoding: a per-block scale is (channels, blocks) with axis 0, got shape "
                    f"{tuple(scale.shape)} and axis {self.axis}")
        elif scale.dim() > 1 or (scale.dim() == 1 and self.axis is None):
            raise QuantizationSettingError(
                "Encoding: scale must be 0-d (per tensor) or 1-d with an axis (per channel), "
                f"got shape {tuple(scale.shape)} and axis {self.axis}"
            )
        self._check_lpbq(scale)
        if not bool(torch.all(scale > 0)) or not bool(torch.all(torch.isfinite(scale))):
            bad = scale.reshape(-1)[~((scale > 0) & torch.isfinite(scale)).reshape(-1)]
            raise QuantizationSettingError(
                f"Encoding: every scale must be finite and > 0, got {bad[:4].tolist()}")
        object.__setattr__(self, "scale", scale)
        object.__setattr__(self, "offset", offset)
        object.__setattr__(
            self, "_grid", integer_grid(self.bitwidth, self.symmetric, self.strict, self.unsigned)
        )

    def _check_lpbq(self, scale: torch.Tensor) -> None:
        """Validate the LPBQ fields (and store ``channel_scale`` as float32 on the CPU)."""
        if self.decompressed_bw is None and self.channel_scale is None:
            return
        validate_decompressed_bw(self.decompressed_bw, self.bitwidth, "Encoding")
        if self.block_size is None or not self.symmetric or self.unsigned:
            raise QuantizationSettingError(
                "Encoding: LPBQ (decompressed_bw / channel_scale) needs a signed symmetric "
                "per-block encoding")
        if self.channel_scale is None:
            raise QuantizationSettingError("Encoding: an LPBQ encoding needs channel_scale")
        channel = torch.as_tensor(self.channel_scale, dtype=torch.float32).detach().cpu()
        if tuple(channel.shape) != (scale.shape[0],) or not bool(
                torch.all((channel > 0) & torch.isfinite(channel))):
            raise QuantizationSettingError(
                f"Encoding: LPBQ channel_scale must hold {scale.shape[0]} finite scales > 0, "
                f"got shape {tuple(channel.shape)}")
        object.__setattr__(self, "channel_scale", channel)

    # -- constructors ---------------------------------------------------------------------------
    @classmethod
    def from_range(
        cls,
        min_val: TensorLike,
        max_val: TensorLike,
        bitwidth: int = 8,
        symmetric: bool = False,
        strict: bool = False,
        unsigned_symmetric: bool = False,
        axis: Optional[int] = None,
        block_size: Optional[int] = None,
        decompressed_bw: Optional[int] = None,
    ) -> "Encoding":
        """Build the encoding for an observed range (per tensor, per channel along ``axis``, or
        per block: ``(C, blocks)`` ranges with ``block_size``, LPBQ with ``decompressed_bw``).

        The range goes through :func:`adjust_range`; with ``unsigned_symmetric`` a symmetric
        encoding of data whose minimum is >= 0 (in every channel) uses the unsigned grid
        (never for LPBQ, which is signed by definition).
        """
        bitwidth = validate_bitwidth(bitwidth, "int", "Encoding")
        min_val = torch.as_tensor(min_val, dtype=torch.float32).detach().cpu()
        max_val = torch.as_tensor(max_val, dtype=torch.float32).detach().cpu()
        lpbq = decompressed_bw is not None
        unsigned = bool(symmetric and unsigned_symmetric and not lpbq
                        and bool(torch.all(min_val >= 0)))
        qmin, qmax = integer_grid(bitwidth, symmetric, strict, unsigned)
        grid_symmetric = symmetric and not unsigned
        lo, hi = adjust_range(min_val, max_val, qmax - qmin, grid_symmetric)
        scale, offset = scale_offset_from_range(lo, hi, qmin, qmax, grid_symmetric)
        channel = None
        if lpbq:
            validate_decompressed_bw(decompressed_bw, bitwidth, "Encoding")
            scale, channel = lpbq_scale(scale, bitwidth, decompressed_bw)
        return cls(bitwidth, scale, offset, symmetric, strict, unsigned, axis, "int",
                   block_size, decompressed_bw, channel)

    @classmethod
    def lpbq(cls, per_block_int_scale: TensorLike, channel_scale: TensorLike, bitwidth: int,
             decompressed_bw: int, block_size: int, strict: bool = False) -> "Encoding":
        """An LPBQ encoding from its parts: ``(C, blocks)`` integer multipliers (each in
        ``[1, 2^(decompressed_bw - bitwidth)]``) and ``(C,)`` float channel scales."""
        ints = torch.as_tensor(per_block_int_scale, dtype=torch.float32)
        channel = torch.as_tensor(channel_scale, dtype=torch.float32).reshape(-1)
        steps = 2 ** (validate_decompressed_bw(decompressed_bw, bitwidth, "Encoding")
                      - bitwidth)
        if ints.dim() != 2 or not bool(torch.all((ints == ints.round()) & (ints >= 1)
                                                 & (ints <= steps))):
            raise QuantizationSettingError(
                f"Encoding: LPBQ per_block_int_scale must be (channels, blocks) integers in "
                f"1..{steps}, got shape {tuple(ints.shape)}")
        return cls(bitwidth, ints * channel[:, None], torch.zeros_like(ints), True, strict,
                   False, 0, "int", block_size, decompressed_bw, channel)

    @classmethod
    def float16(cls) -> "Encoding":
        """The fp16 simulation encoding (no scale or offset)."""
        return cls(bitwidth=16, data_type="float")

    # -- derived values -------------------------------------------------------------------------
    @property
    def is_float(self) -> bool:
        """True for a float (fp16) encoding."""
        return self.data_type == "float"

    @property
    def qmin(self) -> int:
        """Lowest integer code of the internal grid."""
        return self._grid[0]

    @property
    def qmax(self) -> int:
        """Highest integer code of the internal grid."""
        return self._grid[1]

    @property
    def per_channel(self) -> bool:
        """True when the encoding has one scale per slice along ``axis``."""
        return self.scale is not None and self.scale.dim() == 1

    @property
    def per_block(self) -> bool:
        """True when the encoding has one scale per block (``block_size``; LPBQ included)."""
        return self.block_size is not None

    @property
    def is_lpbq(self) -> bool:
        """True for an LPBQ encoding (integer block multipliers x per-channel scales)."""
        return self.decompressed_bw is not None

    @property
    def per_block_int_scale(self) -> Optional[torch.Tensor]:
        """LPBQ: the ``(C, blocks)`` integer multipliers ``scale / channel_scale`` (float32
        integers); None otherwise."""
        if not self.is_lpbq:
            return None
        return torch.round(self.scale / self.channel_scale[:, None])

    @property
    def min(self) -> torch.Tensor:
        """Grid-aligned minimum ``scale * (offset + qmin)``."""
        return grid_point(self.scale, self.offset, self.qmin, self._grid)

    @property
    def max(self) -> torch.Tensor:
        """Grid-aligned maximum ``scale * (offset + qmax)``."""
        return grid_point(self.scale, self.offset, self.qmax, self._grid)

    @property
    def legacy_offset(self) -> torch.Tensor:
        """Offset in the unsigned view of AIMET's 0.6.1 / 1.0.0 files: ``offset + qmin``.

        float64, so that it is exact at every bitwidth (float32 rounds ``-(2^30 - 1)``).
        """
        return self.offset.to(torch.float64) + self.qmin

    # -- arithmetic -----------------------------------------------------------------------------
    def quantize(self, x: torch.Tensor, rounding: str = "nearest") -> torch.Tensor:
        """Integer codes of ``x`` on the internal grid."""
        return quantize(x, self.scale.to(x.device), self.offset.to(x.device),
                        self.qmin, self.qmax, self.axis, rounding, self.block_size)

    def dequantize(self, q: torch.Tensor) -> torch.Tensor:
        """Real values of codes ``q``."""
        return dequantize(q, self.scale.to(q.device), self.offset.to(q.device), self.axis,
                          self.block_size)

    def fake_quantize(self, x: torch.Tensor, rounding: str = "nearest") -> torch.Tensor:
        """Quantize-dequantize ``x`` with this encoding."""
        if self.is_float:
            return fake_quantize_float(x)
        return fake_quantize(x, self.scale.to(x.device), self.offset.to(x.device),
                             self.qmin, self.qmax, self.axis, rounding, self.block_size)

    # -- serialisation --------------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        """A JSON-able dict that :meth:`from_dict` turns back into an equal encoding."""
        if self.is_float:
            return {"data_type": "float", "bitwidth": self.bitwidth}
        out = {
            "data_type": "int",
            "bitwidth": self.bitwidth,
            "symmetric": self.symmetric,
            "strict": self.strict,
            "unsigned": self.unsigned,
            "axis": self.axis,
            "scale": self.scale.tolist(),
            "offset": self.offset.to(torch.int64).tolist(),
        }
        if self.per_block:
            out["block_size"] = self.block_size
        if self.is_lpbq:
            out["decompressed_bw"] = self.decompressed_bw
            out["channel_scale"] = self.channel_scale.tolist()
        return out

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "Encoding":
        """Inverse of :meth:`to_dict`."""
        if d.get("data_type", "int") == "float":
            return cls(bitwidth=int(d["bitwidth"]), data_type="float")
        return cls(
            bitwidth=int(d["bitwidth"]),
            scale=torch.tensor(d["scale"], dtype=torch.float32),
            offset=torch.tensor(d["offset"], dtype=torch.float32),
            symmetric=bool(d.get("symmetric", False)),
            strict=bool(d.get("strict", False)),
            unsigned=bool(d.get("unsigned", False)),
            axis=d.get("axis"),
            block_size=d.get("block_size"),
            decompressed_bw=d.get("decompressed_bw"),
            channel_scale=d.get("channel_scale"),
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Encoding):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        if self.is_float:
            return f"Encoding(float{self.bitwidth})"
        kind = "sym" if self.symmetric else "asym"
        kind += "-strict" if self.strict else ""
        kind += "-unsigned" if self.unsigned else ""
        if self.per_block:
            lpbq = f", LPBQ decompressed_bw={self.decompressed_bw}" if self.is_lpbq else ""
            return (f"Encoding(int{self.bitwidth} {kind}, block_size={self.block_size}, "
                    f"{self.scale.shape[0]} channels x {self.scale.shape[1]} blocks{lpbq})")
        if self.per_channel:
            return (f"Encoding(int{self.bitwidth} {kind}, axis={self.axis}, "
                    f"{self.scale.numel()} channels)")
        return (f"Encoding(int{self.bitwidth} {kind}, scale={float(self.scale):.6g}, "
                f"offset={int(self.offset)}, min={float(self.min):.6g}, max={float(self.max):.6g})")
