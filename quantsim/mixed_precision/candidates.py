"""Mixed-precision candidates: ``((activation bw, dtype), (parameter bw, dtype))`` pairs as
aimet-torch takes them, checked once, and what one candidate means for one quantizer group."""
from __future__ import annotations

import enum
from typing import Any, List, NamedTuple, Optional, Sequence, Tuple

from quantsim.encoding import validate_bitwidth
from quantsim.errors import QuantizationSettingError
from quantsim.sim import QuantizationDataType


class MixedPrecisionError(QuantizationSettingError):
    """An argument of :func:`quantsim.mixed_precision.choose_mixed_precision` is not allowed,
    or a callback returned something that is not a number."""


class AMPSearchAlgo(enum.IntEnum):
    """How phase 2 finds the cheapest point of the sensitivity-ordered path that meets the
    target (aimet-torch's values)."""

    #: every point evaluated (the whole Pareto curve); the cheapest that meets the target wins
    BruteForce = 1
    #: bisection whose pivot interpolates the scores of the bracket's ends
    Interpolation = 2
    #: plain bisection (aimet-torch's default)
    Binary = 3


class Candidate(NamedTuple):
    """``((activation bitwidth, dtype), (parameter bitwidth, dtype))``."""

    activation: Tuple[int, QuantizationDataType]
    param: Tuple[int, QuantizationDataType]

    @property
    def output_bw(self) -> int:
        """The activation bitwidth."""
        return self.activation[0]

    @property
    def param_bw(self) -> int:
        """The parameter bitwidth."""
        return self.param[0]

    def label(self) -> str:
        """``W8A16`` style."""
        return f"W{self.param_bw}A{self.output_bw}"


#: what a candidate sets in one group: (activation bw or None, parameter bw or None)
Setting = Tuple[Optional[int], Optional[int]]

_DTYPES = {"int": QuantizationDataType.int, "float": QuantizationDataType.float}


def _dtype(value: Any, where: str) -> QuantizationDataType:
    if isinstance(value, QuantizationDataType):
        dtype = value
    elif isinstance(value, str) and value.lower() in _DTYPES:
        dtype = _DTYPES[value.lower()]
    else:
        raise MixedPrecisionError(f"{where}: data type must be QuantizationDataType.int or "
                                  f"'int', got {value!r}")
    if dtype is not QuantizationDataType.int:
        raise MixedPrecisionError(
            f"{where}: float candidates are not supported (a quantizer's data type is fixed "
            "when the sim is built); use integer bitwidths")
    return dtype


def _pair(value: Any, where: str) -> Tuple[int, QuantizationDataType]:
    if not (isinstance(value, (tuple, list)) and len(value) == 2):
        raise MixedPrecisionError(f"{where}: expected (bitwidth, data type), got {value!r}")
    bw, dtype = value
    if isinstance(bw, bool) or not isinstance(bw, int):
        raise MixedPrecisionError(f"{where}: bitwidth must be an int, got {bw!r}")
    try:
        validate_bitwidth(bw, "int", where)
    except QuantizationSettingError as exc:
        raise MixedPrecisionError(str(exc)) from exc
    return bw, _dtype(dtype, where)


def parse_candidates(candidates: Any) -> List[Candidate]:
    """Check ``candidates`` and return them as :class:`Candidate` values, in the given order.

    Raises:
        MixedPrecisionError: not a list of at least two distinct
            ``((act bw, dtype), (param bw, dtype))`` pairs with integer bitwidths the sim
            allows; the message names the entry at fault.
    """
    if isinstance(candidates, (str, bytes)) or not isinstance(candidates, Sequence):
        raise MixedPrecisionError(
            "candidates must be a list of ((activation bw, dtype), (param bw, dtype)) pairs, "
            f"got {type(candidates).__name__}")
    out: List[Candidate] = []
    for i, entry in enumerate(candidates):
        where = f"candidates[{i}]"
        if not (isinstance(entry, (tuple, list)) and len(entry) == 2):
            raise MixedPrecisionError(
                f"{where}: expected ((activation bw, dtype), (param bw, dtype)), got {entry!r}")
        cand = Candidate(_pair(entry[0], f"{where}[0] (activation)"),
                         _pair(entry[1], f"{where}[1] (parameter)"))
        if cand in out:
            raise MixedPrecisionError(f"{where}: {cand.label()} is listed twice")
        out.append(cand)
    if len(out) < 2:
        raise MixedPrecisionError(
            f"candidates: at least two are needed to choose between, got {len(out)}")
    return out


def setting_of(candidate: Candidate, has_activations: bool, has_params: bool) -> Setting:
    """What ``candidate`` sets in a group with (or without) activation and parameter
    quantizers: two candidates that agree on these are the same choice for that group."""
    return (candidate.output_bw if has_activations else None,
            candidate.param_bw if has_params else None)


def bit_cost(candidate: Candidate) -> int:
    """Activation bits x parameter bits: orders candidates by cost per MAC."""
    return candidate.output_bw * candidate.param_bw
