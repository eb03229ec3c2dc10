"""What a mixed-precision search returns and writes: the Pareto list (aimet-torch's return
value, with a readable summary), its JSON files and PNG plots (matplotlib optional)."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from quantsim.atomic import atomic_write_text
from quantsim.mixed_precision.candidates import Candidate, bit_cost, setting_of
from quantsim.mixed_precision.groups import QuantizerGroup
from quantsim.plotting import matplotlib_available, new_figure, save_png

#: (quantizer group, candidate, phase-1 score, bit-ops reduction), aimet-torch's entry layout
AccuracyEntry = Tuple[QuantizerGroup, Candidate, float, int]
#: (bit-ops relative to the baseline, score, group flipped at this point, its candidate)
ParetoEntry = Tuple[float, float, QuantizerGroup, Candidate]


@dataclass
class SearchSummary:
    """The facts :class:`ParetoList` prints and ``mixed_precision.json`` holds."""

    candidates: List[Candidate]
    groups: List[QuantizerGroup]
    fp32_score: float
    candidate_scores: Dict[str, float]
    baseline: Candidate
    target: Optional[float]
    final_score: float
    #: group index -> the candidate it ends at
    chosen: Dict[int, Candidate]
    #: quantizer name -> bitwidth it ends at (group quantizers)
    bitwidths: Dict[str, int]
    bit_ops: int
    baseline_bit_ops: int
    memory_bits: int
    baseline_memory_bits: int
    evaluations: Dict[str, int]
    cached_evaluations: int
    note: str = ""
    files: Dict[str, str] = field(default_factory=dict)

    def activation_counts(self) -> Dict[int, int]:
        """Activation bitwidth -> number of group activation quantizers at it."""
        counts: Dict[int, int] = {}
        for g in self.groups:
            for n in g.activation_quantizers:
                counts[self.bitwidths[n]] = counts.get(self.bitwidths[n], 0) + 1
        return dict(sorted(counts.items()))

    def _setting(self, i: int, candidate: Candidate):
        g = self.groups[i]
        return setting_of(candidate, bool(g.activation_quantizers), bool(g.parameter_quantizers))

    def to_json(self) -> Dict[str, Any]:
        """Plain data (``mixed_precision.json``)."""
        return {
            "candidates": [c.label() for c in self.candidates],
            "baseline_candidate": self.baseline.label(),
            "fp32_score": self.fp32_score,
            "candidate_scores": self.candidate_scores,
            "target_score": self.target,
            "final_score": self.final_score,
            "bit_ops": self.bit_ops, "baseline_bit_ops": self.baseline_bit_ops,
            "memory_bits": self.memory_bits, "baseline_memory_bits": self.baseline_memory_bits,
            "evaluations": self.evaluations, "cached_evaluations": self.cached_evaluations,
            "note": self.note,
            "groups": [{"quantizers": g.to_list(), "candidate": self.chosen[i].label()}
                       for i, g in enumerate(self.groups)],
            "bitwidths": self.bitwidths,
        }

    def __str__(self) -> str:
        labels = " / ".join(c.label() for c in self.candidates)
        target = "none (whole curve)" if self.target is None else f">= {self.target:.6g}"
        per_candidate: Dict[str, int] = {}
        for c in self.chosen.values():
            per_candidate[c.label()] = per_candidate.get(c.label(), 0) + 1
        acts = self.activation_counts()
        n_acts = sum(acts.values())
        lines = [
            f"Mixed precision over {labels}: {len(self.groups)} quantizer groups",
            f"  float score {self.fp32_score:.6g}; uniform: " + ", ".join(
                f"{k} {v:.6g}" for k, v in self.candidate_scores.items())
            + f"; baseline {self.baseline.label()}; target {target}",
            f"  chosen: final score {self.final_score:.6g}; groups per candidate "
            + ", ".join(f"{k}: {v}" for k, v in sorted(per_candidate.items())),
            "  activation quantizers per bitwidth: " + ", ".join(
                f"{bw} bit: {n} ({100.0 * n / max(n_acts, 1):.1f}%)" for bw, n in acts.items()),
            f"  bit-ops {_ratio(self.bit_ops, self.baseline_bit_ops)} of the baseline's, "
            f"parameter memory {_ratio(self.memory_bits, self.baseline_memory_bits)}",
            "  evaluations: " + ", ".join(f"{k} {v}" for k, v in self.evaluations.items())
            + f" ({self.cached_evaluations} more read from the cache)",
        ]
        if self.note:
            lines.append(f"  note: {self.note}")
        cheapest = min(self.candidates, key=bit_cost)
        raised = [i for i, c in self.chosen.items() if self._setting(i, c)
                  != self._setting(i, cheapest)]
        if raised and len(raised) < len(self.groups):
            lines.append("  groups above the cheapest candidate:")
            for i in raised:
                lines.append(f"    {self.chosen[i].label()}  {', '.join(self.groups[i].quantizers)}")
        return "\n".join(lines)


def _ratio(value: int, base: int) -> str:
    return f"{value / base:.3f}" if base else "n/a"


class ParetoList(list):
    """aimet-torch's return value, a list of ``(relative bit-ops, score, group, candidate)``
    (the evaluated points of phase 2, in path order, then the refinement's points when
    ``phase2_refine`` was on), that also prints a summary.

    Attributes:
        summary: :class:`SearchSummary` (the choice, scores, costs, evaluation counts).
        accuracy_list: phase 1's ``(group, candidate, score, bit-ops reduction)``, least
            sensitive first.
    """

    def __init__(self, entries: List[ParetoEntry], summary: SearchSummary,
                 accuracy_list: List[AccuracyEntry]) -> None:
        super().__init__(entries)
        self.summary = summary
        self.accuracy_list = accuracy_list

    def __str__(self) -> str:
        return str(self.summary)

    def __repr__(self) -> str:
        return f"ParetoList({len(self)} points, final score {self.summary.final_score:.6g})"


# -- files --------------------------------------------------------------------------------------
def write_results(folder: Path, pareto: ParetoList) -> Dict[str, str]:
    """Write ``pareto_list.json``, ``accuracy_list.json``, ``mixed_precision.json`` and, with
    matplotlib, ``pareto_curve.png`` and ``quantizer_group_sensitivity.png`` into ``folder``;
    return ``{kind: file name}``."""
    s = pareto.summary
    files = {"pareto_list": "pareto_list.json", "accuracy_list": "accuracy_list.json",
             "summary": "mixed_precision.json"}
    _write_json(folder / files["pareto_list"], [
        {"relative_bit_ops": r, "eval_score": score, "candidate": c.label(), "group": g.to_list()}
        for r, score, g, c in pareto])
    _write_json(folder / files["accuracy_list"], [
        {"eval_score": score, "candidate": c.label(), "bit_ops_reduction": red,
         "group": g.to_list()} for g, c, score, red in pareto.accuracy_list])
    if matplotlib_available():
        files["pareto_curve"] = _plot_pareto(folder, pareto)
        if pareto.accuracy_list:
            files["sensitivity"] = _plot_sensitivity(folder, pareto)
    s.files = files
    _write_json(folder / files["summary"], s.to_json())
    return files


def _write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=1, allow_nan=True) + "\n")


def _plot_pareto(folder: Path, pareto: ParetoList) -> str:
    s = pareto.summary
    fig, ax = new_figure(7, 4.5, constrained=True)
    points = sorted((r, score) for r, score, _, _ in pareto if math.isfinite(score))
    if points:
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=4,
                label="evaluated points")
    ax.plot([s.bit_ops / s.baseline_bit_ops if s.baseline_bit_ops else 1.0], [s.final_score],
            marker="*", markersize=14, linestyle="none", label="chosen")
    if s.target is not None and math.isfinite(s.target):
        ax.axhline(s.target, linestyle="--", color="gray", label=f"target {s.target:.4g}")
    ax.set_xlabel("bit-ops relative to the baseline")
    ax.set_ylabel("eval score")
    ax.set_title("Mixed precision: score vs cost")
    ax.legend(fontsize=8)
    save_png(fig, folder / "pareto_curve.png")
    return "pareto_curve.png"


def _plot_sensitivity(folder: Path, pareto: ParetoList) -> str:
    s = pareto.summary
    index = {g: i for i, g in enumerate(s.groups)}
    by_candidate: Dict[str, List[Tuple[int, float]]] = {}
    for g, c, score, _ in pareto.accuracy_list:
        by_candidate.setdefault(c.label(), []).append((index[g], score))
    fig, ax = new_figure(10, 4.5, constrained=True)
    for label, pts in sorted(by_candidate.items()):
        pts.sort()
        finite = [(i, v) for i, v in pts if math.isfinite(v)]
        ax.plot([p[0] for p in finite], [p[1] for p in finite], marker="o", markersize=3,
                linestyle="none", label=f"only this group at {label}")
    if math.isfinite(s.fp32_score):
        ax.axhline(s.fp32_score, linestyle="--", color="gray", label="float")
    ax.set_xlabel("quantizer group (model order)")
    ax.set_ylabel("eval score (phase 1)")
    ax.set_title("Quantizer group sensitivity")
    ax.legend(fontsize=8)
    save_png(fig, folder / "quantizer_group_sensitivity.png")
    return "quantizer_group_sensitivity.png"
