"""Find where quantization hurts: aimet-torch's ``QuantAnalyzer`` at its module path, and
:func:`analyze_sim` for a sim that is already calibrated.

An aimet-torch script ports by its imports::

    from quantsim.defs import CallbackFunc, QuantScheme
    from quantsim.quant_analyzer import QuantAnalyzer

    analyzer = QuantAnalyzer(model, dummy_input, CallbackFunc(calibrate, loader),
                             CallbackFunc(evaluate, val_loader))
    results = analyzer.analyze(QuantScheme.post_training_tf_enhanced, 8, 8,
                               config_file=None, results_dir="./analysis")
    print(results)                        # scores, sensitivity tables, worst quantizers

What is measured (``docs/analysis.md`` explains each number):

* the eval score of the float model, the quantized model, weights only and activations only;
* per layer: the eval score with only that layer's quantizers on, and with only its
  quantizers off (one calibration, flags restored after each evaluation);
* per quantizer, from one pass that runs every batch float and quantized: SQNR against the
  float model's same tensor, the quantizer's own SQNR, clipped fraction, observed range, the
  chosen encoding and a histogram; per layer, the output MSE against the float model.

Results come back as an :class:`~quantsim.analysis.results.AnalysisResults` (``print`` it)
and, given a ``results_dir``, as JSON plus PNG plots (with matplotlib, ``quantsim[plot]``).
"""
from __future__ import annotations

import numbers
import os
import sys
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from quantsim.analysis import plots
from quantsim.analysis.collect import (analyzed_layers, collect_statistics, evaluate,
                                       quantizers_enabled, sweep_layers)
from quantsim.analysis.results import AnalysisResults, QuantizerStats, json_text
from quantsim.atomic import atomic_write_text
from quantsim.checks import require_module
from quantsim.defs import CallbackFunc, EvalCallback, as_callback
from quantsim.errors import AnalysisError
from quantsim.plotting import matplotlib_available
from quantsim.quantizer import QuantizerRole
from quantsim.sim import QuantizationSimModel, QuantScheme

__all__ = ["AnalysisResults", "QuantAnalyzer", "QuantizerStats", "analyze_sim"]

#: The results document written into ``results_dir``.
RESULTS_FILE = "quant_analyzer_results.json"


class QuantAnalyzer:
    """Analyze a float model's sensitivity to quantization (aimet-torch 2.x's class).

    Args:
        model: the float model (left untouched: the sim wraps a copy). Fold batch norms first
            if the deployed model will have them folded (:mod:`quantsim.prepare`), as for the
            sim itself.
        dummy_input: an input the model accepts (see ``QuantizationSimModel``).
        forward_pass_callback: runs calibration data through a model: a
            :class:`~quantsim.defs.CallbackFunc` or a callable ``f(model)`` /
            ``f(model, None)``. Its data also feeds the statistics pass unless
            :meth:`enable_per_layer_mse_loss` names other data.
        eval_callback: returns the model's score, larger is better (accuracy, cosine,
            ``-loss``); same forms. :mod:`quantsim.metrics` has ready ones.
        modules_to_ignore: modules (of ``model``) or their names to leave unquantized and out
            of the analysis.

    Raises:
        UnsupportedModelError: ``model`` is not a module.
        CallbackError: a callback is not callable.
        AnalysisError: ``modules_to_ignore`` is not a list, or names no module of ``model``.
    """

    def __init__(self, model: nn.Module, dummy_input: Any, forward_pass_callback: EvalCallback,
                 eval_callback: EvalCallback,
                 modules_to_ignore: Optional[Sequence[Union[nn.Module, str]]] = None) -> None:
        self._model = require_module(model, "QuantAnalyzer(model=...)")
        self._dummy_input = dummy_input
        self._forward_pass_callback = as_callback(forward_pass_callback, "forward_pass_callback")
        self._eval_callback = as_callback(eval_callback, "eval_callback")
        self._ignored = _module_names(model, modules_to_ignore, "QuantAnalyzer")
        self._unlabeled_dataset_iterable: Optional[Iterable] = None
        self._num_batches: Optional[int] = None
        self._cache: Optional[Tuple[Any, tuple, Tuple[List[QuantizerStats], Dict, int]]] = None
        #: the calibrated sim of the last :meth:`analyze` call
        self.sim: Optional[QuantizationSimModel] = None
        #: the results of the last :meth:`analyze` call
        self.results: Optional[AnalysisResults] = None

    # -- configuration ---------------------------------------------------------------------------
    def enable_per_layer_mse_loss(self, unlabeled_dataset_iterable: Iterable,
                                  num_batches: int) -> None:
        """Run the statistics pass (SQNR, clipping, histograms, per-layer MSE) over the first
        ``num_batches`` batches of ``unlabeled_dataset_iterable`` instead of the calibration
        callback's data. Each batch is passed to the model as ``dummy_input`` is.

        Raises:
            AnalysisError: ``num_batches`` is not a positive integer, the iterable is not
                iterable (or is a one-shot iterator), or it has fewer than ``num_batches``
                batches.
        """
        if isinstance(num_batches, bool) or not isinstance(num_batches, numbers.Integral) \
                or num_batches < 1:
            raise AnalysisError(f"enable_per_layer_mse_loss: num_batches must be a positive "
                                f"integer, got {num_batches!r}")
        if not isinstance(unlabeled_dataset_iterable, Iterable) or isinstance(
                unlabeled_dataset_iterable, (torch.Tensor, str, bytes, dict)) \
                or iter(unlabeled_dataset_iterable) is unlabeled_dataset_iterable:
            raise AnalysisError(
                "enable_per_layer_mse_loss: unlabeled_dataset_iterable must be a re-iterable "
                f"collection of model inputs (a list, a DataLoader), got "
                f"{type(unlabeled_dataset_iterable).__name__}")
        if hasattr(unlabeled_dataset_iterable, "__len__") \
                and len(unlabeled_dataset_iterable) < num_batches:
            raise AnalysisError(
                f"enable_per_layer_mse_loss: cannot take {num_batches} batches from an "
                f"iterable of {len(unlabeled_dataset_iterable)}")
        self._unlabeled_dataset_iterable = unlabeled_dataset_iterable
        self._num_batches = int(num_batches)

    # -- the whole analysis ------------------------------------------------------------------------
    def analyze(self, quant_scheme: Union[QuantScheme, str] = QuantScheme.post_training_tf_enhanced,
                default_param_bw: int = 8, default_output_bw: int = 8,
                config_file: Union[str, dict, None] = None,
                results_dir: Union[str, os.PathLike] = "./tmp/") -> AnalysisResults:
        """Build and calibrate a sim once, then measure everything (see the module docstring)
        and write it into ``results_dir``: ``quant_analyzer_results.json`` (all numbers),
        aimet-torch's per-part JSON files and, with matplotlib, PNG plots.

        Returns:
            the results (also kept as ``self.results``; the sim as ``self.sim``).

        Raises:
            QuantizationSettingError, ConfigError: as ``QuantizationSimModel``.
            CalibrationError: the forward-pass callback failed.
            AnalysisError: ``results_dir`` is not a writable folder, or the eval callback
                returned something other than a number.
        """
        sim = self.create_sim(quant_scheme, default_param_bw, default_output_bw, config_file)
        self.sim = sim
        self.results = analyze_sim(sim, self._analysis_data(), self._eval_callback, results_dir,
                                   float_model=self._model, num_batches=self._num_batches)
        return self.results

    def create_sim(self,
                   quant_scheme: Union[QuantScheme, str] = QuantScheme.post_training_tf_enhanced,
                   default_param_bw: int = 8, default_output_bw: int = 8,
                   config_file: Union[str, dict, None] = None) -> QuantizationSimModel:
        """The sim :meth:`analyze` analyzes: built on a copy of the model, ``modules_to_ignore``
        excluded, calibrated once with the forward-pass callback."""
        sim = QuantizationSimModel(self._model, self._dummy_input, quant_scheme=quant_scheme,
                                   default_output_bw=default_output_bw,
                                   default_param_bw=default_param_bw, config_file=config_file)
        if self._ignored:
            sim.exclude_layers_from_quantization(self._ignored)
        sim.compute_encodings(self._forward_pass_callback.func, self._forward_pass_callback.args)
        return sim

    # -- the parts, on a calibrated sim ------------------------------------------------------------
    def check_model_sensitivity_to_quantization(
            self, sim: QuantizationSimModel) -> Tuple[float, float, float]:
        """``(float score, weights-only score, activations-only score)``."""
        scores = model_scores(sim, self._eval_callback, self._model)
        return (scores["fp32_score"], scores["weight_quantized_score"],
                scores["activation_quantized_score"])

    def perform_per_layer_analysis_by_enabling_quant_wrappers(
            self, sim: QuantizationSimModel, results_dir: Union[str, os.PathLike]
    ) -> Dict[str, float]:
        """``{layer: score}`` with only that layer's quantizers on, in call order; writes
        ``per_layer_quant_enabled.json`` (and ``.png``)."""
        return self._sweep(sim, "enabled", results_dir)

    def perform_per_layer_analysis_by_disabling_quant_wrappers(
            self, sim: QuantizationSimModel, results_dir: Union[str, os.PathLike]
    ) -> Dict[str, float]:
        """``{layer: score}`` with all quantizers on except that layer's, in call order;
        writes ``per_layer_quant_disabled.json`` (and ``.png``)."""
        return self._sweep(sim, "disabled", results_dir)

    def export_per_layer_encoding_min_max_range(
            self, sim: QuantizationSimModel, results_dir: Union[str, os.PathLike]
    ) -> Tuple[Dict[str, Dict[str, List[float]]], Dict[str, Dict[str, List[float]]]]:
        """``(weights, activations)``: ``{quantizer: {'min': [...], 'max': [...]}}`` (one entry
        per channel); writes ``min_max_ranges/weights.json`` / ``activations.json`` (and
        ``.png``, with the observed ranges)."""
        stats = self._statistics(sim)[0]
        folder = _results_folder(results_dir)
        return _write_min_max(stats, folder, matplotlib_available(), [])

    def export_per_layer_stats_histogram(self, sim: QuantizationSimModel,
                                         results_dir: Union[str, os.PathLike]) -> List[str]:
        """Histograms of what each quantizer saw, chosen range marked:
        ``activations_pdf/<quantizer>.png`` and ``weights_pdf/<layer>/<param>.png`` (needs
        matplotlib). Returns the files written (relative to ``results_dir``)."""
        stats = self._statistics(sim)[0]
        folder = _results_folder(results_dir)
        if not matplotlib_available():
            print(plots.NO_MATPLOTLIB_NOTE, file=sys.stderr)
            return []
        return [f for f in (plots.plot_histogram(q, folder) for q in stats) if f]

    def export_per_layer_mse_loss(self, sim: QuantizationSimModel,
                                  results_dir: Union[str, os.PathLike]) -> Dict[str, float]:
        """``{layer: MSE}`` of each layer's output against the float model on the data of
        :meth:`enable_per_layer_mse_loss`; writes ``per_layer_mse_loss.json`` (and ``.png``).

        Raises:
            AnalysisError: :meth:`enable_per_layer_mse_loss` was not called.
        """
        if self._unlabeled_dataset_iterable is None:
            raise AnalysisError("export_per_layer_mse_loss: call enable_per_layer_mse_loss("
                                "unlabeled_dataset_iterable, num_batches) first")
        mse = self._statistics(sim)[1]
        folder = _results_folder(results_dir)
        _write_json(folder, "per_layer_mse_loss.json", mse)
        if matplotlib_available():
            plots.plot_layer_mse(mse, folder)
        return mse

    def export_per_layer_sqnr(self, sim: QuantizationSimModel,
                              results_dir: Union[str, os.PathLike]) -> List[QuantizerStats]:
        """Per-quantizer statistics (SQNR against float, own SQNR, clipping, ranges), worst own
        SQNR first; writes ``per_quantizer_sqnr.json`` (and ``.png``)."""
        stats, mse, calls = self._statistics(sim)
        folder = _results_folder(results_dir)
        results = _base_results(sim)
        results.quantizers, results.layer_mse, results.num_batches = stats, mse, calls
        _write_json(folder, "per_quantizer_sqnr.json",
                    {q.name: {"sqnr_db": q.sqnr_db, "quantizer_sqnr_db": q.quantizer_sqnr_db,
                              "clipped_fraction": q.clipped_fraction} for q in stats})
        if matplotlib_available():
            plots.plot_sqnr(results, folder)
        return results.worst_quantizers()

    # -- helpers -----------------------------------------------------------------------------------
    def _analysis_data(self) -> Any:
        if self._unlabeled_dataset_iterable is not None:
            return self._unlabeled_dataset_iterable
        return self._forward_pass_callback

    def _sweep(self, sim: QuantizationSimModel, sweep: str,
               results_dir: Union[str, os.PathLike]) -> Dict[str, float]:
        folder = _results_folder(results_dir)
        scores = sweep_layers(sim, self._eval_callback, sweep, analyzed_layers(sim))
        _write_json(folder, f"per_layer_quant_{sweep}.json", scores)
        if matplotlib_available():
            results = _base_results(sim)
            setattr(results, f"per_layer_{sweep}", scores)
            plots.plot_sweep(results, sweep, folder)
        return scores

    def _statistics(self, sim: QuantizationSimModel):
        """The statistics pass on ``sim``, reused while its quantizers stay as they were."""
        key = tuple((q.enabled, q.version_key()) for q in sim.quantizers())
        if self._cache is None or self._cache[0] is not sim or self._cache[1] != key:
            value = collect_statistics(sim, self._analysis_data(), analyzed_layers(sim),
                                       self._num_batches)
            self._cache = (sim, key, value)
        return self._cache[2]


def analyze_sim(sim: QuantizationSimModel, data: Any, eval_callback: Optional[EvalCallback] = None,
                results_dir: Union[str, os.PathLike, None] = None, *,
                modules_to_ignore: Optional[Sequence[Union[nn.Module, str]]] = None,
                float_model: Optional[nn.Module] = None, num_batches: Optional[int] = None,
                plot: bool = True, histograms: bool = True) -> AnalysisResults:
    """Analyze a sim that is already calibrated (the sim is left as it was).

    Args:
        sim: a calibrated ``QuantizationSimModel``.
        data: what the statistics pass runs: a forward-pass callback
            (:class:`~quantsim.defs.CallbackFunc` or callable taking the model) or an
            iterable of model inputs (each passed as ``dummy_input`` is).
        eval_callback: the metric (larger is better); without it only the statistics are
            measured (no scores, no sweeps).
        results_dir: where to write JSON and plots; None writes nothing.
        modules_to_ignore: modules of ``sim.model`` or their names to leave out of the
            sweeps and statistics (their quantizers stay as they are).
        float_model: the float model for the float score; by default ``sim.model`` with
            every quantizer off (the same float computation).
        num_batches: with an iterable ``data``, use at most this many batches.
        plot: write PNG plots when matplotlib is installed.
        histograms: with ``plot``, one histogram PNG per quantizer too.

    Raises:
        AnalysisError: ``data`` is neither a callback nor an iterable, enabled quantizers are
            not calibrated, the eval callback returns no number, ``results_dir`` is a file.
        CallbackError: ``eval_callback`` is not callable.
    """
    if not isinstance(sim, QuantizationSimModel):
        raise AnalysisError(f"analyze_sim: sim must be a QuantizationSimModel, got "
                            f"{type(sim).__name__}")
    data = _analysis_data(data)
    evaluator = None if eval_callback is None else as_callback(eval_callback, "eval_callback")
    if float_model is not None:
        require_module(float_model, "analyze_sim(float_model=...)")
    if num_batches is not None and (isinstance(num_batches, bool) or not isinstance(
            num_batches, numbers.Integral) or num_batches < 1):
        raise AnalysisError(f"analyze_sim: num_batches must be a positive integer or None, "
                            f"got {num_batches!r}")
    folder = None if results_dir is None else _results_folder(results_dir)
    layers = analyzed_layers(sim, _module_names(sim.model, modules_to_ignore, "analyze_sim"))

    results = _base_results(sim)
    if evaluator is not None:
        for key, value in model_scores(sim, evaluator, float_model).items():
            setattr(results, key, value)
        results.per_layer_enabled = sweep_layers(sim, evaluator, "enabled", layers)
        results.per_layer_disabled = sweep_layers(sim, evaluator, "disabled", layers)
    results.quantizers, results.layer_mse, results.num_batches = collect_statistics(
        sim, data, layers, num_batches)
    if folder is not None:
        _write_results(results, folder, plot, histograms)
    return results


def model_scores(sim: QuantizationSimModel, eval_callback: CallbackFunc,
                 float_model: Optional[nn.Module] = None) -> Dict[str, float]:
    """The eval score of the float model, of the sim, of weights only and of activations only
    (keys as :class:`AnalysisResults`' fields); the sim's quantizers are restored."""
    if float_model is not None:
        fp32 = evaluate(eval_callback, float_model)
    else:
        with quantizers_enabled(sim, lambda _n, _q: False):
            fp32 = evaluate(eval_callback, sim.model)
    with quantizers_enabled(sim, lambda _n, q: q.role is QuantizerRole.PARAM):
        weights = evaluate(eval_callback, sim.model)
    with quantizers_enabled(sim, lambda _n, q: q.role is not QuantizerRole.PARAM):
        activations = evaluate(eval_callback, sim.model)
    return {"fp32_score": fp32, "quantized_score": evaluate(eval_callback, sim.model),
            "weight_quantized_score": weights, "activation_quantized_score": activations}


# -- helpers ---------------------------------------------------------------------------------------
def _analysis_data(data: Any) -> Any:
    """A CallbackFunc for a callback, the iterable itself for batches."""
    if isinstance(data, nn.Module):
        raise AnalysisError("analyze_sim: data must be a forward-pass callback or an iterable "
                            f"of model inputs, got the module {type(data).__name__} (pass "
                            "the data, not a model)")
    if isinstance(data, CallbackFunc) or (callable(data) and not isinstance(data, Iterable)):
        return as_callback(data, "data")
    if isinstance(data, Iterable) and not isinstance(data, (torch.Tensor, str, bytes, dict)):
        return data
    raise AnalysisError("analyze_sim: data must be a forward-pass callback (CallbackFunc or "
                        "callable taking the model) or an iterable of model inputs (a list of "
                        f"batches; wrap a single batch in a list), got {type(data).__name__}")


def _module_names(model: nn.Module, modules: Optional[Sequence[Union[nn.Module, str]]],
                  where: str) -> List[str]:
    """Names (first paths) of ``modules``, given as modules of ``model`` or names."""
    if modules is None:
        return []
    if not isinstance(modules, (list, tuple, set)):
        raise AnalysisError(f"{where}: modules_to_ignore must be a list of modules or names, "
                            f"got {type(modules).__name__}")
    by_module = {}
    for name, module in model.named_modules(remove_duplicate=False):
        by_module.setdefault(id(module), name)
    paths = {name: by_module[id(m)] for name, m in model.named_modules(remove_duplicate=False)}
    names = []
    for m in modules:
        name = paths.get(m) if isinstance(m, str) else by_module.get(id(m))
        if name is None:
            raise AnalysisError(f"{where}: modules_to_ignore entry {m!r:.80} is not a module of "
                                f"the model (modules: {sorted(paths)[:12]}...)")
        names.append(name)
    return names


def _base_results(sim: QuantizationSimModel) -> AnalysisResults:
    kwargs = sim.init_kwargs
    return AnalysisResults(quant_scheme=sim.quant_scheme.name,
                           default_param_bw=int(kwargs["default_param_bw"]),
                           default_output_bw=int(kwargs["default_output_bw"]))


def _results_folder(results_dir: Union[str, os.PathLike]) -> Path:
    if not isinstance(results_dir, (str, os.PathLike)):
        raise AnalysisError(f"results_dir must be a folder path, got "
                            f"{type(results_dir).__name__}")
    folder = Path(results_dir).absolute()
    if folder.exists() and not folder.is_dir():
        raise AnalysisError(f"results_dir {folder} exists and is not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise AnalysisError(f"cannot create results_dir {folder}: {exc}") from exc
    return folder


def _write_json(folder: Path, relative: str, value: Any) -> str:
    """``value`` as JSON at ``folder/relative``, atomically (non-finite numbers as strings)."""
    try:
        atomic_write_text(folder / relative, json_text(value))
    except OSError as exc:
        raise AnalysisError(f"cannot write {folder / relative}: {exc}") from exc
    return relative


def _write_min_max(stats: List[QuantizerStats], folder: Path, draw: bool, files: List[str]):
    ranges = {True: {}, False: {}}
    for q in stats:
        if q.encoding_min is not None:
            ranges[q.is_activation][q.name] = {"min": q.encoding_min, "max": q.encoding_max}
    for title, activations in (("weights", False), ("activations", True)):
        files.append(_write_json(folder, f"min_max_ranges/{title}.json", ranges[activations]))
        chosen = [q for q in stats if q.is_activation == activations]
        if draw and chosen:
            files.append(plots.plot_min_max(chosen, title, folder))
    return ranges[False], ranges[True]


def _write_results(results: AnalysisResults, folder: Path, plot: bool, histograms: bool) -> None:
    """Every file of an analysis: the aimet-torch-named parts, the plots, then the results
    document listing them."""
    files: List[str] = []
    for sweep in ("enabled", "disabled"):
        scores = getattr(results, f"per_layer_{sweep}")
        if scores:
            files.append(_write_json(folder, f"per_layer_quant_{sweep}.json", scores))
    if results.layer_mse:
        files.append(_write_json(folder, "per_layer_mse_loss.json", results.layer_mse))
    _write_min_max(results.quantizers, folder, False, files)
    if plot:
        if matplotlib_available():
            files += plots.plot_all(results, folder, histograms)
        else:
            print(plots.NO_MATPLOTLIB_NOTE, file=sys.stderr)
    results.files = files + [RESULTS_FILE]
    results.save(folder / RESULTS_FILE)
