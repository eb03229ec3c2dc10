"""What a conversion did, layer by layer, and what would not convert (``check_deployable``)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from quantsim.tables import format_table


@dataclass
class LayerReport:
    """One requantization of the integer model (or one float island).

    Attributes:
        name: the sim's module (or traced op) whose output this is.
        op: the integer ops that compute it, e.g. ``'ConvInteger2d + BatchNorm + ReLU ->
            requantize int8'``.
        multiplier: ``(min, max)`` of the int32 fixed-point multipliers (over channels/terms).
        shift: ``(min, max)`` of the right shifts.
        bitwidth: of the output codes.
        integer: False for a float island (dequantize -> float op -> quantize).
        note: why it is a float island, or a warning (e.g. a possible int32 overflow).
        max_diff_lsb: largest ``|integer code - sim code|`` at this output with the step
            fed the sim's codes (its own arithmetic), from
            :meth:`quantsim.convert.IntegerModel.compare` (None until compared, or where the
            sim has no quantizer at that point).
        within_1_lsb: fraction of this output's codes within one LSB of the sim's (same run).
        chained_max_diff_lsb: as ``max_diff_lsb`` with the integer model run end to end
            (differences of earlier steps carried along).
        chained_within_1_lsb: the fraction within one LSB in that run.
        bias_step: where an int32 bias is added, the largest accumulator step in output
            steps (the bias is rounded to an accumulator step: above 2, outputs can move by
            up to half of it from the sim's float bias).
    """

    name: str
    op: str
    multiplier: Optional[Tuple[int, int]] = None
    shift: Optional[Tuple[int, int]] = None
    bitwidth: Optional[int] = None
    integer: bool = True
    note: str = ""
    max_diff_lsb: Optional[float] = None
    within_1_lsb: Optional[float] = None
    chained_max_diff_lsb: Optional[float] = None
    chained_within_1_lsb: Optional[float] = None
    bias_step: Optional[float] = None


@dataclass
class ConversionReport:
    """The plan and, after :meth:`~quantsim.convert.IntegerModel.compare`, the measured
    agreement of an integer model with its sim.

    Attributes:
        layers: one entry per requantization / float island, in execution order.
        float_ops: ``(name, reason)`` of every op that runs in float (no integer form, or the
            sim leaves its input unquantized so there is no grid to compute on).
        issues: ``(name, reason)`` of every place where the sim's quantization does not map
            onto integer arithmetic one to one (reported, never raised, by
            :func:`~quantsim.convert.check_deployable`).
        warnings: ``(name, text)``, e.g. accumulators that may exceed int32 in the worst case.
        output_max_diff_lsb: per model output, the largest difference from the sim in output
            LSBs (after ``compare``).
        output_within_1_lsb: per model output, the fraction within one LSB (after ``compare``).
    """

    layers: List[LayerReport] = field(default_factory=list)
    float_ops: List[Tuple[str, str]] = field(default_factory=list)
    issues: List[Tuple[str, str]] = field(default_factory=list)
    warnings: List[Tuple[str, str]] = field(default_factory=list)
    output_max_diff_lsb: List[Optional[float]] = field(default_factory=list)
    output_within_1_lsb: List[Optional[float]] = field(default_factory=list)

    @property
    def deployable(self) -> bool:
        """True when every op has an integer form and nothing needed a float fallback."""
        return not self.float_ops and not self.issues

    def to_dict(self) -> Dict[str, Any]:
        """A JSON-able dict of the report."""
        return asdict(self)

    def __str__(self) -> str:
        rows = [("layer", "op", "multiplier", "shift", "bits", "max diff (LSB)", "<=1 LSB",
                 "chained max", "chained <=1")]
        for r in self.layers:
            rows.append((
                r.name, r.op if r.integer else f"FLOAT: {r.op}",
                "-" if r.multiplier is None else f"{r.multiplier[0]}..{r.multiplier[1]}",
                "-" if r.shift is None else f"{r.shift[0]}..{r.shift[1]}",
                "-" if r.bitwidth is None else str(r.bitwidth),
                _number(r.max_diff_lsb), _percent(r.within_1_lsb),
                _number(r.chained_max_diff_lsb), _percent(r.chained_within_1_lsb)))
        lines = [f"Integer conversion: {len(self.layers)} steps, "
                 f"{'deployable' if self.deployable else 'NOT fully integer'}",
                 format_table(rows[0], rows[1:])]
        for title, entries in (("float ops", self.float_ops), ("issues", self.issues),
                               ("warnings", self.warnings)):
            if entries:
                lines.append(f"{title}:")
                lines.extend(f"  {name}: {why}" for name, why in entries)
        if self.output_max_diff_lsb:
            lines.append("model outputs vs sim (LSB): " + ", ".join(
                "-" if d is None else f"max {d:g}, {100 * f:.2f}% <= 1"
                for d, f in zip(self.output_max_diff_lsb, self.output_within_1_lsb)))
        return "\n".join(lines)


def _number(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:g}"


def _percent(v: Optional[float]) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"
