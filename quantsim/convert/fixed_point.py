"""Integer requantization arithmetic: fixed-point multipliers, rounding right shifts, grids.

A real rescaling factor ``M`` (e.g. ``s_in * s_w / s_out``) is stored the way gemmlowp and
TFLite store it: an int32 multiplier ``m`` with ``2^30 <= |m| < 2^31`` and a right shift ``n``,
``M ~= m * 2^-n`` (relative error below ``2^-31``). Requantizing an integer accumulator ``a``
is then ``round(a * m / 2^n)``: one int64 product and one rounding right shift, with the tie
rule a setting (:data:`ROUNDING`):

* ``'half_to_even'``: ties go to the even integer (``torch.round``, ONNX ``QuantizeLinear``,
  what the fake-quant simulation does);
* ``'half_away_from_zero'``: ties go away from zero (TFLite's and gemmlowp's
  ``RoundingDivideByPOT``).

Several inputs summed into one output (``Add``, ``Sub``) share one shift per output channel,
chosen for the largest factor, so the sum is rounded once.

Every function here takes and returns integer tensors; the float64 factors are turned into
integers once, when a model is converted.
"""
from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import torch

from quantsim.errors import QuantizationSettingError

#: tie rules of :func:`rounding_right_shift`
ROUNDING: Tuple[str, ...] = ("half_to_even", "half_away_from_zero")
#: bits of a fixed-point multiplier's magnitude: ``2^30 <= |m| < 2^31``
MULTIPLIER_BITS = 31
#: largest right shift used (an int64 product has 63 magnitude bits)
MAX_SHIFT = 62


def validate_rounding(rounding: str, where: str = "convert") -> str:
    """Check a requantization tie rule; allowed: :data:`ROUNDING`."""
    if rounding not in ROUNDING:
        raise QuantizationSettingError(
            f"{where}: rounding {rounding!r} is not supported; allowed: {list(ROUNDING)}")
    return rounding


def quantize_multipliers(factors: Sequence[torch.Tensor]) -> Tuple[List[torch.Tensor],
                                                                    torch.Tensor]:
    """Fixed-point form of real factors that are summed into one output.

    Args:
        factors: float64 tensors of one shape (0-d, or one value per output channel); a zero or
            negative factor is allowed (a BatchNorm with a negative gain flips the sign).

    Returns:
        ``(multipliers, shift)``: int64 tensors (one per factor, values of int32 range) and the
        shared right shift (int64, same shape), so that ``factor ~= multiplier * 2^-shift``;
        the largest ``|factor|`` of each channel gets a multiplier in ``[2^30, 2^31)``.

    Raises:
        QuantizationSettingError: a factor of ``2^31`` or more (no right shift represents it)
            or a non-finite one.
    """
    stacked = torch.stack([f.to(torch.float64) for f in factors])
    if not bool(torch.isfinite(stacked).all()):
        raise QuantizationSettingError(f"requantization factors must be finite, got {stacked}")
    largest = stacked.abs().amax(dim=0)
    # frexp: largest = f * 2^e with f in [0.5, 1); a multiplier in [2^30, 2^31) needs shift 31 - e
    _, exponent = torch.frexp(torch.where(largest > 0, largest, torch.ones_like(largest)))
    shift = (MULTIPLIER_BITS - exponent.to(torch.int64)).clamp(max=MAX_SHIFT)
    if bool((shift < 0).any()):
        raise QuantizationSettingError(
            f"a requantization factor of {float(largest.max()):.6g} is >= 2^31; the encodings "
            "of this layer's input, weight and output are inconsistent")
    multipliers = torch.round(stacked * torch.pow(2.0, shift.to(torch.float64))).to(torch.int64)
    # rounding can reach 2^31 exactly: halve it and the shift (same value)
    overflow = multipliers.abs().amax(dim=0) >= 2**MULTIPLIER_BITS
    if bool(overflow.any()):
        shift = torch.where(overflow, shift - 1, shift)
        multipliers = torch.round(stacked * torch.pow(2.0, shift.to(torch.float64))
                                  ).to(torch.int64)
    return list(multipliers.unbind(0)), shift


def rounding_right_shift(x: torch.Tensor, shift: torch.Tensor, rounding: str) -> torch.Tensor:
    """``round(x / 2^shift)`` of int64 ``x`` with the tie rule ``rounding`` (shift >= 0,
    broadcasting against ``x``), in integer operations only."""
    floor = torch.bitwise_right_shift(x, shift)  # arithmetic shift: floor division
    remainder = x - torch.bitwise_left_shift(floor, shift)
    half = torch.bitwise_left_shift(torch.ones_like(shift), (shift - 1).clamp(min=0))
    half = torch.where(shift > 0, half, torch.zeros_like(half))  # shift 0: nothing to round
    if rounding == "half_to_even":
        up = (remainder > half) | ((remainder == half) & (half > 0)
                                   & (torch.bitwise_and(floor, 1) == 1))
    else:  # half away from zero: a tie rounds up for x >= 0 and down (stays at floor) below
        up = (remainder > half) | ((remainder == half) & (half > 0) & (x >= 0))
    return floor + up.to(torch.int64)


def dtype_for_grid(qmin: int, qmax: int) -> torch.dtype:
    """The narrowest torch integer dtype that holds every code of ``[qmin, qmax]``."""
    for dtype in (torch.uint8, torch.int8, torch.int16, torch.int32):
        info = torch.iinfo(dtype)
        if info.min <= qmin and qmax <= info.max:
            return dtype
    return torch.int64


def factor_error(factor: float, multiplier: int, shift: int) -> float:
    """Relative error of ``multiplier * 2^-shift`` as ``factor`` (for the report)."""
    if factor == 0:
        return 0.0
    return abs(multiplier * math.pow(2.0, -shift) - factor) / abs(factor)
