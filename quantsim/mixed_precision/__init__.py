"""Automatic mixed precision: per quantizer group, the cheapest candidate bitwidths whose
eval score stays within an allowed drop from the float model's (aimet-torch's
``aimet_torch.mixed_precision.choose_mixed_precision``).

    from quantsim.mixed_precision import choose_mixed_precision
    candidates = [((8, QuantizationDataType.int), (8, QuantizationDataType.int)),
                  ((16, QuantizationDataType.int), (8, QuantizationDataType.int))]
    pareto = choose_mixed_precision(sim, dummy_input, candidates, eval_phase1, eval_phase2,
                                    allowed_accuracy_drop=0.01, results_dir="amp",
                                    clean_start=True, forward_pass_callback=calibrate)
    print(pareto)          # the summary; the list itself is aimet-torch's Pareto list

Parts: :mod:`.candidates` (checking candidates), :mod:`.groups` (which quantizers change
together), :mod:`.cost` (bit-ops and memory), :mod:`.precision` (setting groups with their
encodings), :mod:`.search` (phase 2's searches), :mod:`.cache` (evaluations kept in
``results_dir``), :mod:`.report` (the return value, JSON and plots), :mod:`.algo` (the run).
"""
from quantsim.mixed_precision.algo import choose_mixed_precision
from quantsim.mixed_precision.candidates import AMPSearchAlgo, Candidate, MixedPrecisionError
from quantsim.mixed_precision.groups import QuantizerGroup, find_quantizer_groups
from quantsim.mixed_precision.report import ParetoList, SearchSummary

__all__ = ["AMPSearchAlgo", "Candidate", "MixedPrecisionError", "ParetoList", "QuantizerGroup",
           "SearchSummary", "choose_mixed_precision", "find_quantizer_groups"]
