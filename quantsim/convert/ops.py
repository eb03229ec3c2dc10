"""The integer operations an :class:`~quantsim.convert.IntegerModel` is made of.

Each is a small module whose constants are buffers, so ``torch.jit.trace``, ``torch.export``
and the ONNX writer (:mod:`quantsim.export.integer_onnx`) see them. Codes travel between them in
the narrowest integer dtype of their grid (``uint8`` / ``int8`` / ``int16`` / ``int32``);
accumulators are int64 tensors (an int32 accumulator's values, kept in 64 bits so the product
with a 31-bit multiplier cannot overflow). Only :class:`Quantize` reads and only
:class:`Dequantize` / :class:`FloatIsland` produce floating-point tensors.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from quantsim.convert.fixed_point import rounding_right_shift
from quantsim.encoding import Encoding, dequantize, quantize


def _int64(values) -> torch.Tensor:
    return torch.as_tensor(values, dtype=torch.int64)


class Quantize(nn.Module):
    """Float input -> integer codes of a per-tensor encoding (``encoding.quantize``, the
    fake-quant simulation's own arithmetic, round half to even)."""

    def __init__(self, encoding: Encoding, dtype: torch.dtype) -> None:
        super().__init__()
        self.register_buffer("scale", encoding.scale.clone())
        self.register_buffer("offset", encoding.offset.clone())
        self.qmin, self.qmax, self.dtype = encoding.qmin, encoding.qmax, dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Codes of ``x``."""
        return quantize(x, self.scale, self.offset, self.qmin, self.qmax).to(self.dtype)


class Dequantize(nn.Module):
    """Codes, or an int64 accumulator with per-channel scales, -> float32 real values."""

    def __init__(self, scale: torch.Tensor, offset: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("scale", scale.to(torch.float32))
        self.register_buffer("offset", offset.to(torch.float32))

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        """``(q + offset) * scale``."""
        return dequantize(q, self.scale, self.offset)


class IntConv(nn.Module):
    """Conv1d/2d, ConvTranspose1d/2d or Linear on codes: int64 accumulator of
    ``(q + input_offset) * weight_codes`` (the bias is added by :class:`Requantize`).

    ``q + input_offset`` is the code measured from the code of real 0, so zero padding is real
    0 as in the float layer.
    """

    def __init__(self, kind: str, weight_codes: torch.Tensor, input_offset: int,
                 input_grid: Tuple[int, int], **options) -> None:
        super().__init__()
        self.kind = kind
        self.register_buffer("weight", weight_codes)
        self.input_offset = int(input_offset)
        self.input_grid = tuple(input_grid)
        self.options = options

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        """The int64 accumulator."""
        x = q.to(torch.int64) + self.input_offset
        w = self.weight.to(torch.int64)
        if self.kind == "linear":
            return F.linear(x, w)
        return getattr(F, self.kind)(x, w, None, **self.options)


class SumPool(nn.Module):
    """Window sums of ``q + input_offset`` (int64): the numerator of an average pool, divided
    by the window size in :class:`Requantize` (rounded with its tie rule)."""

    def __init__(self, input_offset: int, input_grid: Tuple[int, int], kernel_size, stride,
                 padding, dims: int, global_pool: bool) -> None:
        super().__init__()
        self.input_offset = int(input_offset)
        self.input_grid = tuple(input_grid)
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.dims, self.global_pool = dims, global_pool

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        """Window sums, int64."""
        x = q.to(torch.int64) + self.input_offset
        if self.global_pool:
            return x.sum(dim=tuple(range(-self.dims, 0)), keepdim=True)
        pool = F.avg_pool1d if self.dims == 1 else F.avg_pool2d
        if self.dims == 1:  # avg_pool1d has no divisor_override: a sum is a 1-row 2-d pool
            return F.avg_pool2d(x.unsqueeze(-2), (1, self.kernel_size[0]), (1, self.stride[0]),
                                (0, self.padding[0]), divisor_override=1).squeeze(-2)
        return pool(x, self.kernel_size, self.stride, self.padding, divisor_override=1)


class Requantize(nn.Module):
    """Integer terms -> codes of an output encoding, the one requantization of the model::

        acc  = (t_0 + o_0 + bias) * m_0 + sum_i (t_i + o_i) * m_i         int64
        code = clamp(round(acc / 2^shift) - o_out, lo, hi)                 tie rule: rounding

    ``m_i`` are int32 fixed-point multipliers of ``s_i / s_out`` sharing ``shift``
    (:func:`~quantsim.convert.fixed_point.quantize_multipliers`), per tensor or per channel;
    ``bias`` is the int32 bias (at the first term's scale, e.g. ``s_x * s_w``); ``[lo, hi]`` is
    the output grid narrowed by a folded ReLU / ReLU6 / clamp.
    """

    def __init__(self, offsets: Sequence[int], multipliers: Sequence[torch.Tensor],
                 shift: torch.Tensor, bias: Optional[torch.Tensor], output_offset: int,
                 lo: int, hi: int, dtype: torch.dtype, rounding: str,
                 channel_shape: Sequence[int]) -> None:
        super().__init__()
        self.offsets = [int(o) for o in offsets]
        for i, m in enumerate(multipliers):
            self.register_buffer(f"multiplier{i}", _int64(m).reshape(channel_shape))
        self.register_buffer("shift", _int64(shift).reshape(channel_shape))
        self.register_buffer("bias", None if bias is None
                             else _int64(bias).reshape(channel_shape))
        self.output_offset, self.lo, self.hi = int(output_offset), int(lo), int(hi)
        self.dtype, self.rounding = dtype, rounding
        self.num_terms = len(self.offsets)

    def multipliers(self):
        """The per-term multiplier buffers."""
        return [getattr(self, f"multiplier{i}") for i in range(self.num_terms)]

    def forward(self, *terms: torch.Tensor) -> torch.Tensor:
        """Codes of the output encoding."""
        acc = None
        for i, (t, m) in enumerate(zip(terms, self.multipliers())):
            x = t.to(torch.int64)
            if self.offsets[i]:
                x = x + self.offsets[i]
            if i == 0 and self.bias is not None:
                x = x + self.bias
            acc = x * m if acc is None else acc + x * m
        out = rounding_right_shift(acc, self.shift, self.rounding) - self.output_offset
        return out.clamp(self.lo, self.hi).to(self.dtype)


class ClampCodes(nn.Module):
    """ReLU / ReLU6 / clamp on codes of a fixed encoding: clamp to the codes of the bounds."""

    def __init__(self, lo: int, hi: int) -> None:
        super().__init__()
        self.lo, self.hi = int(lo), int(hi)

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        """Clamped codes, same dtype."""
        return q.clamp(self.lo, self.hi)


class LookupTable(nn.Module):
    """An elementwise activation (GELU, sigmoid, tanh...) on codes as a table with one output
    code per input code: ``table[q - qmin]``, computed at conversion as the sim computes it
    (dequantize, the float op, quantize), so it equals the sim's result bit for bit."""

    def __init__(self, table: torch.Tensor, qmin: int) -> None:
        super().__init__()
        self.register_buffer("table", table)
        self.qmin = int(qmin)

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        """Output codes, the table's dtype."""
        return self.table[q.to(torch.int64) - self.qmin]


class FloatIsland(nn.Module):
    """An op without an integer form, run in float between a dequantize and a quantize: the
    float module of the sim's layer (its quantizers stripped)."""

    def __init__(self, module: nn.Module, reason: str) -> None:
        super().__init__()
        self.module = module
        self.reason = reason

    def forward(self, *args, **kwargs):
        """The float op."""
        return self.module(*args, **kwargs)
