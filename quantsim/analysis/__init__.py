"""Quantization analysis: where a quantized model loses accuracy.

The public entry points live in :mod:`quantsim.quant_analyzer` (aimet-torch's module path):
``QuantAnalyzer`` and ``analyze_sim``. This package holds their parts: :mod:`.collect` (the
one statistics pass and the sensitivity sweeps), :mod:`.results` (the results object, JSON and
table) and :mod:`.plots` (PNG plots, optional matplotlib).
"""
from quantsim.analysis.results import AnalysisResults, Histogram, QuantizerStats

__all__ = ["AnalysisResults", "Histogram", "QuantizerStats"]
