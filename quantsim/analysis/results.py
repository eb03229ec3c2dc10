"""What a quantization analysis found, as plain data: per-quantizer statistics, the sensitivity
sweeps, the baseline scores; JSON in and out (schema ``schemas/analysis_results.schema.json``)
and a readable table from ``print(results)``."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match

from quantsim.atomic import atomic_write_text
from quantsim.errors import AnalysisError
from quantsim.tables import format_table

#: Version of the results document; bumped when a field changes meaning.
FORMAT_VERSION = 1
SCHEMA_PATH = Path(__file__).parent.parent / "schemas" / "analysis_results.schema.json"
#: The sweeps: ``'enabled'`` (only one layer quantized) and ``'disabled'`` (all but one).
SWEEPS = ("enabled", "disabled")
#: Keys :meth:`AnalysisResults.worst_quantizers` can rank by (lower is worse for all).
SQNR_KEYS = ("quantizer_sqnr_db", "sqnr_db")


@dataclass
class Histogram:
    """Counts of the values a quantizer saw in equal bins over ``[lo, hi]``.

    Counts can be fractional: when a later batch widened the range, the earlier counts were
    spread onto the wider bins in proportion to the overlap (:mod:`quantsim.analyzers`).
    """

    lo: float
    hi: float
    counts: List[float]

    def edges(self) -> List[float]:
        """The ``len(counts) + 1`` bin edges."""
        n = len(self.counts)
        return [self.lo + (self.hi - self.lo) * i / n for i in range(n + 1)]


@dataclass
class QuantizerStats:
    """One enabled quantizer: its encoding, what it saw, and how much noise it made.

    Attributes:
        name: ``'<layer>.input_quantizers.0'``, ``'.output_quantizers.0'``,
            ``'.param_quantizers.weight'`` (as ``sim.named_quantizers()``).
        layer: the quantized module's name.
        role: ``'param'``, ``'input'`` or ``'output'``.
        bitwidth, symmetric, per_channel: the quantizer's settings.
        encoding_min, encoding_max: the chosen range, one entry per channel (one per tensor);
            None for float (fp16) quantizers.
        observed_min, observed_max: the extremes of the values the quantizer saw in the
            analysis pass (in the quantized model, so upstream quantization included).
        clipped_fraction: share of those values more than half a step outside
            ``[encoding_min, encoding_max]`` (their error exceeds rounding's).
        sqnr_db: SQNR of the quantizer's output against the float model's same tensor (noise
            of this quantizer and of everything upstream), pooled over the batches.
        quantizer_sqnr_db: SQNR of the quantizer's output against its own input: the noise
            this quantizer alone adds. Equal to ``sqnr_db`` for parameters.
        mse: mean squared error of the quantizer's output against the float tensor.
        numel: values seen (summed over batches and calls).
        histogram: the values seen, with the chosen range to mark on it.
    """

    name: str
    layer: str
    role: str
    bitwidth: int
    symmetric: bool
    per_channel: bool
    encoding_min: Optional[List[float]]
    encoding_max: Optional[List[float]]
    observed_min: Optional[float]
    observed_max: Optional[float]
    clipped_fraction: Optional[float]
    sqnr_db: Optional[float]
    quantizer_sqnr_db: Optional[float]
    mse: Optional[float]
    numel: int
    histogram: Optional[Histogram] = None

    @property
    def is_activation(self) -> bool:
        """True for input and output quantizers."""
        return self.role != "param"


@dataclass
class AnalysisResults:
    """Everything one analysis measured (see ``docs/analysis.md`` for each number).

    Attributes:
        quant_scheme, default_param_bw, default_output_bw: the sim's settings.
        fp32_score: the eval metric of the float model (None without an eval callback).
        quantized_score: of the sim as calibrated.
        weight_quantized_score: with only the parameter quantizers on (W<bw>A32).
        activation_quantized_score: with only the activation quantizers on (W32A<bw>).
        per_layer_enabled: ``{layer: score}`` with only that layer's quantizers on, call order.
        per_layer_disabled: ``{layer: score}`` with all but that layer's quantizers on.
        quantizers: per-quantizer statistics, in call order (parameters first within a layer).
        layer_mse: ``{layer: MSE of its first output against the float model's}``.
        num_batches: model calls in the statistics pass.
        files: files written into the results folder, relative to it.
    """

    quant_scheme: str
    default_param_bw: int
    default_output_bw: int
    fp32_score: Optional[float] = None
    quantized_score: Optional[float] = None
    weight_quantized_score: Optional[float] = None
    activation_quantized_score: Optional[float] = None
    per_layer_enabled: Dict[str, float] = field(default_factory=dict)
    per_layer_disabled: Dict[str, float] = field(default_factory=dict)
    quantizers: List[QuantizerStats] = field(default_factory=list)
    layer_mse: Dict[str, float] = field(default_factory=dict)
    num_batches: int = 0
    files: List[str] = field(default_factory=list)

    # -- rankings -------------------------------------------------------------------------------
    def sensitivity(self, sweep: str = "enabled") -> List[Tuple[str, float]]:
        """``(layer, score)`` of a sweep, worst first: lowest score for ``'enabled'`` (that
        layer alone costs the most), highest for ``'disabled'`` (leaving it out recovers the
        most). Ties keep call order.

        Raises:
            AnalysisError: ``sweep`` is not ``'enabled'`` or ``'disabled'``.
        """
        if sweep not in SWEEPS:
            raise AnalysisError(f"sensitivity: sweep must be one of {SWEEPS}, got {sweep!r}")
        scores = self.per_layer_enabled if sweep == "enabled" else self.per_layer_disabled
        sign = 1.0 if sweep == "enabled" else -1.0
        return sorted(scores.items(), key=lambda kv: sign * _sort_value(kv[1]))

    def worst_quantizers(self, key: str = "quantizer_sqnr_db", n: Optional[int] = None,
                         role: Optional[str] = None) -> List[QuantizerStats]:
        """Quantizers by ascending SQNR (worst first); quantizers without a value last.

        Args:
            key: ``'quantizer_sqnr_db'`` (the noise each quantizer adds: where it is made) or
                ``'sqnr_db'`` (against the float model: where it has accumulated).
            n: how many (all by default).
            role: only ``'param'``, ``'input'`` or ``'output'`` quantizers, or
                ``'activation'`` for inputs and outputs.

        Raises:
            AnalysisError: an unknown ``key`` or ``role``.
        """
        if key not in SQNR_KEYS:
            raise AnalysisError(f"worst_quantizers: key must be one of {SQNR_KEYS}, got {key!r}")
        roles = {"param": ("param",), "input": ("input",), "output": ("output",),
                 "activation": ("input", "output"), None: ("param", "input", "output")}
        if role not in roles:
            raise AnalysisError(f"worst_quantizers: role must be one of "
                                f"{[r for r in roles if r]} or None, got {role!r}")
        chosen = [q for q in self.quantizers if q.role in roles[role]]
        ranked = sorted(chosen, key=lambda q: _sort_value(getattr(q, key), missing=math.inf))
        return ranked if n is None else ranked[:n]

    # -- JSON -----------------------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        """A JSON-ready dict (non-finite numbers as the strings ``'inf'``, ``'-inf'``,
        ``'nan'``, so the file is strict JSON)."""
        doc = _encode(asdict(self))
        return {"format_version": FORMAT_VERSION, **doc}

    @classmethod
    def from_dict(cls, doc: Dict[str, Any]) -> "AnalysisResults":
        """The inverse of :meth:`to_dict`.

        Raises:
            AnalysisError: ``doc`` does not match the schema (the message names the field).
        """
        _validate(doc, "results document")
        data = _decode({k: v for k, v in doc.items() if k != "format_version"})
        quantizers = []
        for q in data.pop("quantizers"):
            hist = q.pop("histogram")
            quantizers.append(QuantizerStats(**q, histogram=None if hist is None
                                             else Histogram(**hist)))
        return cls(**data, quantizers=quantizers)

    def save(self, path: Union[str, Path]) -> Path:
        """Write the results as JSON to ``path``, atomically.

        Raises:
            AnalysisError: the file cannot be written (the message names it).
        """
        path = Path(path)
        try:
            atomic_write_text(path, json_text(self.to_dict()))
        except OSError as exc:
            raise AnalysisError(f"cannot write analysis results to {path}: {exc}") from exc
        return path

    @classmethod
    def load(cls, path: Union[str, Path]) -> "AnalysisResults":
        """Read results written by :meth:`save`.

        Raises:
            AnalysisError: the file is missing, not JSON, or not a results document.
        """
        path = Path(path)
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise AnalysisError(f"cannot read analysis results from {path}: {exc}") from exc
        try:
            return cls.from_dict(doc)
        except AnalysisError as exc:
            raise AnalysisError(f"{path}: {exc}") from None

    # -- presentation ---------------------------------------------------------------------------
    def __str__(self) -> str:
        lines = [f"Quantization analysis ({self.quant_scheme}, W{self.default_param_bw}"
                 f"A{self.default_output_bw}, {self.num_batches} batch(es))"]
        scores = [("float", self.fp32_score), ("quantized", self.quantized_score),
                  (f"weights only (W{self.default_param_bw}A32)", self.weight_quantized_score),
                  (f"activations only (W32A{self.default_output_bw})",
                   self.activation_quantized_score)]
        if any(v is not None for _, v in scores):
            lines.append("eval score: " + ", ".join(f"{k} {_fmt(v)}" for k, v in scores
                                                    if v is not None))
        for sweep, what in (("enabled", "only this layer quantized, worst first"),
                            ("disabled", "all but this layer quantized, worst first")):
            ranked = self.sensitivity(sweep)
            if ranked:
                lines += ["", f"Per-layer sensitivity ({what}):",
                          format_table(["layer", "score"], [(n, _fmt(s)) for n, s in ranked])]
        if self.quantizers:
            rows = [(q.name, str(q.bitwidth), _fmt(q.quantizer_sqnr_db), _fmt(q.sqnr_db),
                     _fmt(q.clipped_fraction, pct=True), _range(q.observed_min, q.observed_max),
                     _range(_lowest(q.encoding_min), _highest(q.encoding_max)))
                    for q in self.worst_quantizers()]
            lines += ["", "Quantizers, worst own SQNR first (dB):",
                      format_table(["quantizer", "bw", "own SQNR", "vs float", "clipped",
                                    "observed", "encoding"], rows)]
        return "\n".join(lines)


def json_text(value: Any) -> str:
    """``value`` as strict JSON text (non-finite numbers as ``'inf'``, ``'-inf'``, ``'nan'``)."""
    return json.dumps(_encode(value), indent=1, allow_nan=False) + "\n"


# -- helpers --------------------------------------------------------------------------------------
def _sort_value(v: Optional[float], missing: float = math.inf) -> float:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return missing
    return v


def _fmt(v: Optional[float], pct: bool = False) -> str:
    if v is None:
        return "-"
    if pct:
        return f"{100 * v:.3g}%"
    return f"{v:.4g}"


def _range(lo: Optional[float], hi: Optional[float]) -> str:
    return "-" if lo is None or hi is None else f"[{lo:.4g}, {hi:.4g}]"


def _lowest(values: Optional[List[float]]) -> Optional[float]:
    return None if not values else min(values)


def _highest(values: Optional[List[float]]) -> Optional[float]:
    return None if not values else max(values)


_NONFINITE = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}


def _encode(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {k: _encode(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_encode(v) for v in obj]
    return obj


#: fields that hold text, never an encoded number (a layer may be called "nan")
_TEXT_FIELDS = frozenset({"name", "layer", "role", "quant_scheme", "files"})


def _decode(obj: Any, key: Optional[str] = None) -> Any:
    if isinstance(obj, str) and obj in _NONFINITE and key not in _TEXT_FIELDS:
        return _NONFINITE[obj]
    if isinstance(obj, dict):
        return {k: _decode(v, k) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v, key) for v in obj]
    return obj


@lru_cache(maxsize=1)
def _validator() -> Draft202012Validator:
    return Draft202012Validator(json.loads(SCHEMA_PATH.read_text()))


def _validate(doc: Any, what: str) -> None:
    error = best_match(_validator().iter_errors(doc))
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "(top level)"
        raise AnalysisError(f"{what} is not valid at {where}: {error.message}")
