"""``choose_mixed_precision``: aimet-torch's automatic mixed precision on a quantsim sim.

1. **Groups** of quantizers that change together (:mod:`.groups`) and the candidates each
   may take (the config's ``supported_kernels`` unless ``use_all_amp_candidates``).
2. **Uniform points**: the eval score of the float model (every group off) and of each
   candidate applied everywhere (phase-2 callback). The best one is the baseline; the
   cheapest in bit-ops (ties: the better score) is the lowest.
3. **Phase 1**: each group's sensitivity: every group off but one, that one at each of its
   candidates other than the baseline (phase-1 callback). The entries are sorted from least
   to most sensitive (score, then higher bitwidths, then larger bit-ops saving, then model
   order: aimet-torch's order).
4. **Phase 2**: the path that flips the groups in that order, each point adding one flip; a
   search (:mod:`.search`) finds the cheapest point whose phase-2 score is within
   ``allowed_accuracy_drop`` of the float score. ``phase2_reverse`` starts from the lowest
   setting and raises the most sensitive groups first.
5. **Refinement** (``phase2_refine``): phase 2 keeps a prefix of one sorted list, so a group
   that only mattered alone stays raised. A backward elimination visits the groups phase 2
   left above their cheapest entry, least sensitive first, and lowers each to its phase-1
   entry when the phase-2 score still meets the target (one evaluation per group): the score
   never falls below the target and no quantizer's bitwidth rises.

The sim is left at the chosen point with its encodings as a calibration at those bitwidths
would give them (:mod:`.precision`); on an error it is put back as it was.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from quantsim.checks import require_flag
from quantsim.defs import as_callback
from quantsim.mixed_precision.cache import EvaluationCache, fingerprint
from quantsim.mixed_precision.candidates import (AMPSearchAlgo, Candidate, MixedPrecisionError,
                                                 Setting, bit_cost, parse_candidates,
                                                 setting_of)
from quantsim.mixed_precision.cost import CostModel, measure_mac_layers
from quantsim.mixed_precision.groups import QuantizerGroup, find_quantizer_groups, input_carriers
from quantsim.mixed_precision.precision import GroupPrecision
from quantsim.mixed_precision.report import (AccuracyEntry, ParetoEntry, ParetoList,
                                             SearchSummary, write_results)
from quantsim.mixed_precision.search import search
from quantsim.op_types import onnx_types_of
from quantsim.progress import progress

_WHERE = "choose_mixed_precision"


def choose_mixed_precision(
    sim,
    dummy_input: Any,
    candidates: Sequence[Tuple[Tuple[int, Any], Tuple[int, Any]]],
    eval_callback_for_phase1,
    eval_callback_for_phase2,
    allowed_accuracy_drop: Optional[float],
    results_dir: Union[str, os.PathLike],
    clean_start: bool,
    forward_pass_callback,
    use_all_amp_candidates: bool = False,
    phase2_reverse: bool = False,
    amp_search_algo: AMPSearchAlgo = AMPSearchAlgo.Binary,
    phase2_refine: bool = False,
) -> ParetoList:
    """Choose a bitwidth per quantizer group: the cheapest setting (in bit-ops) whose score
    stays within ``allowed_accuracy_drop`` of the float model's; aimet-torch 2.x's arguments
    and meaning (module docstring).

    Args:
        sim: a calibrated :class:`~quantsim.QuantizationSimModel`; changed in place.
        dummy_input: an input of the model, run once to count each layer's MACs.
        candidates: ``[((act bw, dtype), (param bw, dtype)), ...]``, at least two, integer
            (``QuantizationDataType.int`` or ``'int'``), e.g. W8A8 and W8A16.
        eval_callback_for_phase1: scores the model for phase 1 (a ``CallbackFunc`` or a
            callable taking the model; larger is better); may use less data than phase 2.
        eval_callback_for_phase2: scores the model for the uniform points and phase 2.
        allowed_accuracy_drop: the largest acceptable drop from the float score (same units
            as the scores), or None to evaluate the whole path (the Pareto curve) and keep
            its cheapest point.
        results_dir: folder for the JSON results, the plots and the evaluation cache.
        clean_start: forget the evaluations an earlier run cached in ``results_dir``; with
            False they are reused (the groups and candidates must be the same; the model, its
            encodings and the callbacks are the caller's to keep unchanged, as in aimet-torch).
        forward_pass_callback: calibration data (``CallbackFunc`` or ``callable(model)``),
            run only if the sim kept no calibration statistics for some activation quantizer
            (its last calibration's statistics serve every bitwidth); may be None otherwise.
        use_all_amp_candidates: ignore the config's ``supported_kernels`` and let every group
            take every candidate.
        phase2_reverse: start phase 2 from the lowest setting and raise the most sensitive
            groups first, to the first point that meets the target.
        amp_search_algo: :class:`AMPSearchAlgo` (``Binary``, aimet-torch's default;
            ``Interpolation``; ``BruteForce``, which evaluates every point).
        phase2_refine: after phase 2, lower each raised group again, least sensitive first,
            where the target still holds (one phase-2 evaluation per raised group; module
            docstring, step 5). Needs a target; ignored with ``allowed_accuracy_drop=None``.

    Returns:
        a :class:`~quantsim.mixed_precision.ParetoList`: the evaluated phase-2 points as
        aimet-torch returns them, ``(bit-ops relative to the baseline, score, group,
        candidate)``, then the refinement's points (each lowering one group, kept or not);
        ``print()`` shows the summary, ``.summary`` holds the choice. It is
        empty when no search was needed (the lowest candidate already meets the target, or
        even the best one does not: the sim is then set to that candidate; aimet-torch
        returns None there).

    Raises:
        MixedPrecisionError: a bad argument (named), no quantizer the search may change, or a
            callback that returns no number.
        CallbackError: a callback that is not callable.
        CalibrationError: statistics are missing and ``forward_pass_callback`` cannot supply
            them.
    """
    cands = parse_candidates(candidates)
    if not (hasattr(sim, "named_quantizers") and hasattr(sim, "graph")):
        raise MixedPrecisionError(f"{_WHERE}: sim must be a QuantizationSimModel, got "
                                  f"{type(sim).__name__}")
    phase1 = as_callback(eval_callback_for_phase1, "eval_callback_for_phase1")
    phase2 = as_callback(eval_callback_for_phase2, "eval_callback_for_phase2")
    forward = (None if forward_pass_callback is None
               else as_callback(forward_pass_callback, "forward_pass_callback"))
    drop = _check_drop(allowed_accuracy_drop)
    for flag, name in ((clean_start, "clean_start"), (use_all_amp_candidates,
                       "use_all_amp_candidates"), (phase2_reverse, "phase2_reverse"),
                       (phase2_refine, "phase2_refine")):
        require_flag(flag, name, _WHERE, MixedPrecisionError)
    algo = _check_algo(amp_search_algo)
    folder = _check_folder(results_dir)

    groups = find_quantizer_groups(sim)
    if not groups:
        raise MixedPrecisionError(
            f"{_WHERE}: the sim has no quantizer whose bitwidth the search may change (enabled, "
            "integer, not frozen, range not fixed by the config)")
    allowed = [_supported(sim, g, cands, use_all_amp_candidates) for g in groups]
    precision = GroupPrecision(sim, groups, forward)
    cost = CostModel(sim, measure_mac_layers(sim, dummy_input, input_carriers(sim)))
    cache = EvaluationCache(folder, fingerprint({
        "groups": [g.to_list() for g in groups], "candidates": [c.label() for c in cands],
        "allowed": [[c.label() for c in a] for a in allowed]}), clean_start)
    run = _Search(sim, groups, cands, allowed, precision, cost, cache, phase1, phase2)
    try:
        pareto = run.run(drop, algo, phase2_reverse, phase2_refine)
    except BaseException:
        precision.restore()
        raise
    write_results(folder, pareto)
    return pareto


def _check_drop(value: Any) -> Optional[float]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(
            value) or value < 0:
        raise MixedPrecisionError(f"{_WHERE}: allowed_accuracy_drop must be a finite number "
                                  f">= 0 or None, got {value!r}")
    return float(value)


def _check_algo(value: Any) -> AMPSearchAlgo:
    try:
        if isinstance(value, str):
            return AMPSearchAlgo[value]
        if isinstance(value, bool):
            raise ValueError(value)
        return AMPSearchAlgo(value)
    except (KeyError, ValueError):
        raise MixedPrecisionError(
            f"{_WHERE}: amp_search_algo must be one of {[a.name for a in AMPSearchAlgo]}, got "
            f"{value!r}") from None


def _check_folder(results_dir: Any) -> Path:
    if not isinstance(results_dir, (str, os.PathLike)):
        raise MixedPrecisionError(f"{_WHERE}: results_dir must be a folder path, got "
                                  f"{type(results_dir).__name__}")
    folder = Path(results_dir)
    if folder.exists() and not folder.is_dir():
        raise MixedPrecisionError(f"{_WHERE}: results_dir {folder} exists and is not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _supported(sim, group: QuantizerGroup, cands: List[Candidate],
               use_all: bool) -> List[Candidate]:
    """The candidates the config's ``supported_kernels`` allow for every module of ``group``
    (all of them with ``use_all``, or when the config lists no kernels for its modules)."""
    if use_all:
        return list(cands)
    modules = dict(sim.named_qmodules())
    config = sim.config
    has_params = bool(group.parameter_quantizers)
    allowed = list(cands)
    for name in group.modules:
        kernels = next((config.op_type[t].supported_kernels for t in onnx_types_of(modules[name])
                        if t in config.op_type and config.op_type[t].supported_kernels),
                       config.defaults.supported_kernels)
        if not kernels:
            continue
        allowed = [c for c in allowed if any(
            k.activation.dtype == "int" and k.activation.bitwidth == c.output_bw
            and (k.param is None or not has_params
                 or (k.param.dtype == "int" and k.param.bitwidth == c.param_bw))
            for k in kernels)]
    if not allowed:
        raise MixedPrecisionError(
            f"{_WHERE}: no candidate fits the supported_kernels of the config for {group}; "
            "pass use_all_amp_candidates=True to ignore them")
    return allowed


class _Search:
    """One run: the evaluations and the bookkeeping of the phases."""

    def __init__(self, sim, groups, cands, allowed, precision, cost, cache, phase1, phase2):
        self.sim, self.groups, self.cands, self.allowed = sim, groups, cands, allowed
        self.precision, self.cost, self.cache = precision, cost, cache
        self.callbacks = {"phase1": phase1, "phase2": phase2}
        self.counts = {"float": 0, "uniform": 0, "phase1": 0, "phase2": 0, "refine": 0,
                       "final": 0}
        self.kinds = [(bool(g.activation_quantizers), bool(g.parameter_quantizers))
                      for g in groups]

    # -- settings -------------------------------------------------------------------------------
    def setting(self, i: int, cand: Candidate) -> Setting:
        """What ``cand`` sets in group ``i``."""
        return setting_of(cand, *self.kinds[i])

    def uniform(self, cand: Candidate) -> Dict[int, Candidate]:
        """Every group at ``cand``, or at its first supported candidate where ``cand`` is not."""
        return {i: cand if cand in a else a[0] for i, a in enumerate(self.allowed)}

    def settings(self, choice: Dict[int, Candidate]) -> Dict[int, Setting]:
        """Group -> setting of a choice of candidates."""
        return {i: self.setting(i, c) for i, c in choice.items()}

    def cheapest_alike(self, i: int, cand: Candidate) -> Candidate:
        """The cheapest candidate of group ``i`` that sets the same bits there as ``cand`` (a
        weight-only group is W8A8, not W8A16, when both give its weights 8 bits)."""
        same = [c for c in self.allowed[i] if self.setting(i, c) == self.setting(i, cand)]
        return min(same, key=bit_cost) if same else cand

    def bits(self, choice: Dict[int, Candidate]) -> Dict[str, int]:
        """Quantizer name -> bitwidth under ``choice`` (None where a setting leaves it)."""
        out: Dict[str, int] = {}
        for i, c in choice.items():
            act, par = self.setting(i, c)
            out.update({n: act for n in self.groups[i].activation_quantizers})
            out.update({n: par for n in self.groups[i].parameter_quantizers})
        return out

    def bit_ops(self, choice: Dict[int, Candidate]) -> int:
        """Bit-ops with every group on at ``choice`` (computed, not run)."""
        return self.cost.bit_ops(self.bits(choice))

    # -- evaluation -----------------------------------------------------------------------------
    def evaluate(self, kind: str, phase: str, choice: Dict[int, Candidate],
                 active: Optional[List[int]] = None, recalibrated: bool = False) -> float:
        """Set the sim to ``choice`` with the ``active`` groups on (default all) and score it
        with the ``phase`` callback; a cached score is returned without setting anything.
        ``recalibrated``: the sim is already set, its activations calibrated for it."""
        settings = self.settings(choice)
        key = fingerprint({"callback": phase, "active": active, "recalibrated": recalibrated,
                           "settings": sorted(settings.items())})
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        if not recalibrated:
            self.precision.apply(settings, active)
        value = self.callbacks[phase](self.sim.model)
        try:
            score = float(value)
        except (TypeError, ValueError):
            raise MixedPrecisionError(
                f"{_WHERE}: eval_callback_for_{phase} must return a number, got "
                f"{type(value).__name__} {value!r:.60}") from None
        if math.isnan(score):
            raise MixedPrecisionError(f"{_WHERE}: eval_callback_for_{phase} returned NaN")
        self.counts[kind] += 1
        self.cache.put(key, score)
        return score

    # -- the run --------------------------------------------------------------------------------
    def run(self, drop: Optional[float], algo: AMPSearchAlgo, reverse: bool,
            refine: bool) -> ParetoList:
        """Uniform points, phase 1, phase 2 (and the refinement); leaves the sim at the
        chosen point."""
        with progress(desc="mixed precision: uniform candidates",
                      total=len(self.cands) + 1) as bar:
            fp32 = self.evaluate("float", "phase2", self.uniform(self.cands[0]), active=[])
            bar.update()
            scores = {}
            for c in self.cands:
                scores[c] = self.evaluate("uniform", "phase2", self.uniform(c))
                bar.update()
        baseline = max(self.cands, key=lambda c: scores[c])   # first of equal scores
        lowest = min(self.cands, key=lambda c: (self.bit_ops(self.uniform(c)), -scores[c]))
        target = None if drop is None else fp32 - drop
        base_choice = self.uniform(baseline)
        accuracy: List[AccuracyEntry] = []
        entries: List[ParetoEntry] = []
        note = ""
        if target is not None and scores[baseline] < target:
            choice, final = base_choice, scores[baseline]
            note = (f"even the best candidate {baseline.label()} scores {final:.6g}, below the "
                    f"target {target:.6g}: the sim is set to it, no search was run")
        elif target is not None and scores[lowest] >= target:
            choice, final = self.uniform(lowest), scores[lowest]
            note = (f"the cheapest candidate {lowest.label()} meets the target already: the "
                    "sim is set to it, no search was run")
        else:
            accuracy = self.phase1(baseline, base_choice)
            choice, final, entries = self.phase2(accuracy, base_choice, self.uniform(lowest),
                                                 scores, target, algo, reverse)
            if refine and target is not None:
                choice, final = self.refine(accuracy, choice, final, target, base_choice,
                                            entries)
        choice = {i: self.cheapest_alike(i, c) for i, c in choice.items()}
        self.precision.apply(self.settings(choice))
        if not self.precision.statistics_current:
            # weights changed bitwidth: observe the activations once more with them, so the
            # sim is exactly what a calibration at these bitwidths gives, and score that
            self.precision.recalibrate()
            final = self.evaluate("final", "phase2", choice, recalibrated=True)
        summary = SearchSummary(
            candidates=self.cands, groups=self.groups, fp32_score=fp32,
            candidate_scores={c.label(): scores[c] for c in self.cands}, baseline=baseline,
            target=target, final_score=final, chosen=choice,
            bitwidths=self.precision.bitwidths(), bit_ops=self.cost.bit_ops(),
            baseline_bit_ops=self.bit_ops(base_choice), memory_bits=self.cost.memory_bits(),
            baseline_memory_bits=self.cost.memory_bits(self.bits(base_choice)),
            evaluations=dict(self.counts),
            cached_evaluations=self.cache.hits, note=note)
        return ParetoList(entries, summary, accuracy)

    def phase1(self, baseline: Candidate, base_choice: Dict[int, Candidate]
               ) -> List[AccuracyEntry]:
        """Each group alone at each of its other settings: the sorted sensitivity list."""
        todo = []
        for i, allowed in enumerate(self.allowed):
            seen = {self.setting(i, base_choice[i])}
            for c in allowed:
                s = self.setting(i, c)
                if s not in seen:   # candidates that set the same bits here are one choice
                    seen.add(s)
                    todo.append((i, c))
        base_ops = self.bit_ops(base_choice)
        accuracy = []
        for i, c in progress(todo, desc="mixed precision: phase 1", unit="eval"):
            choice = dict(base_choice)
            choice[i] = c
            score = self.evaluate("phase1", "phase1", choice, active=[i])
            accuracy.append((self.groups[i], c, score, base_ops - self.bit_ops(choice)))
        order = {g: i for i, g in enumerate(self.groups)}
        accuracy.sort(key=lambda e: (-e[2], -(e[1].output_bw + e[1].param_bw), -e[3],
                                     order[e[0]]))
        return accuracy

    def refine(self, accuracy: List[AccuracyEntry], choice: Dict[int, Candidate],
               final: float, target: float, base_choice: Dict[int, Candidate],
               entries: List[ParetoEntry]) -> Tuple[Dict[int, Candidate], float]:
        """Backward elimination (module docstring, step 5): for each phase-1 entry, least
        sensitive first, move its group to the entry's candidate where that raises none of
        the group's bitwidths and lowers some, and keep the move where the phase-2 score still
        meets ``target``. Appends every evaluated point to ``entries``; returns the choice
        and its score."""
        index = {g: i for i, g in enumerate(self.groups)}
        base_ops = self.bit_ops(base_choice)
        todo = [(index[g], c) for g, c, _, _ in accuracy
                if _lower(self.setting(index[g], c), self.setting(index[g], choice[index[g]]))]
        for i, c in progress(todo, desc="mixed precision: refinement", unit="eval"):
            if not _lower(self.setting(i, c), self.setting(i, choice[i])):
                continue   # an earlier entry of this group went lower already
            trial = dict(choice)
            trial[i] = c
            value = self.evaluate("refine", "phase2", trial)
            ops = self.bit_ops(trial)
            entries.append((ops / base_ops if base_ops else 1.0, value, self.groups[i], c))
            if value >= target:
                choice, final = trial, value
        return choice, final

    def phase2(self, accuracy, base_choice, low_choice, scores, target, algo, reverse):
        """The path of cumulative flips and the search along it."""
        index = {g: i for i, g in enumerate(self.groups)}
        if reverse:
            # from the lowest setting up, most sensitive first: an entry raises its group to
            # the candidate of that group's next entry, or to the baseline after its last
            flips_desc = list(reversed(accuracy))
            start = dict(low_choice)
            flips = []
            for k, (g, c, score, red) in enumerate(flips_desc):
                later = next((e[1] for e in flips_desc[k + 1:] if e[0] == g), None)
                flips.append((g, later if later is not None else base_choice[index[g]]))
        else:
            start = dict(base_choice)
            flips = [(g, c) for g, c, _, _ in accuracy]
        start_ops = self.bit_ops(base_choice)
        points: Dict[int, ParetoEntry] = {}

        def choice_at(i: int) -> Dict[int, Candidate]:
            choice = dict(start)
            for g, c in flips[:i + 1]:
                choice[index[g]] = c
            return choice

        bar = progress(desc="mixed precision: phase 2", total=None, unit="eval")

        def score(i: int) -> float:
            choice = choice_at(i)
            value = self.evaluate("phase2", "phase2", choice)
            ops = self.bit_ops(choice)
            points[i] = (ops / start_ops if start_ops else 1.0, value, flips[i][0], flips[i][1])
            bar.update()
            return value

        n = len(flips)
        base_score = scores[max(self.cands, key=lambda c: scores[c])]
        low_score = scores[min(self.cands, key=lambda c: self.bit_ops(self.uniform(c)))]
        if target is None:   # the whole curve: every point, the cheapest kept
            algo, goal = AMPSearchAlgo.BruteForce, -math.inf
        else:
            goal = target
        with bar:
            chosen = search(algo, score, n, goal, reverse, low_score if reverse else base_score,
                            base_score if reverse else low_score)
        if 0 <= chosen < n:
            choice, final = choice_at(chosen), points[chosen][1]
        else:   # nothing on the path meets the target: the baseline
            choice, final = dict(base_choice), base_score
        return choice, final, [points[i] for i in sorted(points)]


def _lower(new: Setting, old: Setting) -> bool:
    """``new`` raises no bitwidth of ``old`` and lowers at least one (None: no such
    quantizers in the group)."""
    pairs = [(a, b) for a, b in zip(new, old) if a is not None and b is not None]
    return all(a <= b for a, b in pairs) and any(a < b for a, b in pairs)
