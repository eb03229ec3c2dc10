"""PNG plots of analysis results (matplotlib, the ``quantsim[plot]`` extra).

Figures come from :mod:`quantsim.plotting` (no pyplot, written atomically); without
matplotlib the analysis writes JSON only.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from quantsim.analysis.results import AnalysisResults, QuantizerStats
from quantsim.plotting import new_figure, save_png
from quantsim.progress import progress

#: The line printed (once per analysis) when plots are skipped.
NO_MATPLOTLIB_NOTE = ("quantsim analysis: matplotlib is not installed, so only JSON results "
                      "were written; pip install 'quantsim[plot]' for the PNG plots")


def _save(fig, folder: Path, relative: str, tight: bool = True) -> str:
    """Write ``fig`` as ``folder / relative`` (PNG) and return ``relative``."""
    save_png(fig, folder / relative, tight)
    return relative


def _finite(values: Sequence[Optional[float]]) -> List[float]:
    """Values for a plot: None and NaN as gaps (NaN), +-inf clipped to the finite extremes."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    top, bottom = (max(finite), min(finite)) if finite else (0.0, 0.0)
    out = []
    for v in values:
        if v is None or math.isnan(v):
            out.append(math.nan)
        else:
            out.append(top if v == math.inf else bottom if v == -math.inf else v)
    return out


def _layer_axis(ax, names: Sequence[str]) -> None:
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=90, fontsize=max(3, min(8, 400 // max(len(names), 1))))


def plot_sweep(results: AnalysisResults, sweep: str, folder: Path) -> str:
    """``per_layer_quant_<sweep>.png``: the score per layer in call order, with the float and
    the quantized score as lines."""
    scores = results.per_layer_enabled if sweep == "enabled" else results.per_layer_disabled
    fig, ax = new_figure()
    names = list(scores)
    ax.plot(range(len(names)), _finite(list(scores.values())), marker="o", markersize=3,
            label="only this layer quantized" if sweep == "enabled"
            else "all but this layer quantized")
    for value, label, style in ((results.fp32_score, "float", "--"),
                                (results.quantized_score, "quantized", ":")):
        if value is not None and math.isfinite(value):
            ax.axhline(value, linestyle=style, color="gray", label=f"{label} {value:.4g}")
    _layer_axis(ax, names)
    ax.set_ylabel("eval score")
    ax.set_title(f"Per-layer sensitivity (quantizers {sweep} one layer at a time)")
    ax.legend(fontsize=8)
    return _save(fig, folder, f"per_layer_quant_{sweep}.png")


def plot_sqnr(results: AnalysisResults, folder: Path) -> str:
    """``per_quantizer_sqnr.png``: each quantizer's own SQNR and its SQNR against the float
    model, in call order (activations above, parameters below)."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(12, 8))
    axes = fig.subplots(2, 1, gridspec_kw={"hspace": 0.9})
    for ax, activations in zip(axes, (True, False)):
        chosen = [q for q in results.quantizers if q.is_activation == activations]
        names = [q.name for q in chosen]
        ax.plot(range(len(chosen)), _finite([q.quantizer_sqnr_db for q in chosen]),
                marker="o", markersize=3, linestyle="none", label="own noise")
        if activations:
            ax.plot(range(len(chosen)), _finite([q.sqnr_db for q in chosen]), marker="x",
                    markersize=3, linewidth=0.8, label="against the float model")
        _layer_axis(ax, names)
        ax.set_ylabel("SQNR (dB)")
        ax.set_title("activation quantizers" if activations else "parameter quantizers")
        ax.legend(fontsize=8)
    return _save(fig, folder, "per_quantizer_sqnr.png")


def plot_min_max(quantizers: List[QuantizerStats], title: str, folder: Path) -> str:
    """``min_max_ranges/<title>.png``: each quantizer's chosen range (bars) and the observed
    one (markers)."""
    fig, ax = new_figure()
    x = range(len(quantizers))
    lows = _finite([min(q.encoding_min) if q.encoding_min else None for q in quantizers])
    highs = _finite([max(q.encoding_max) if q.encoding_max else None for q in quantizers])
    ax.bar(x, [h - lo for lo, h in zip(lows, highs)], bottom=lows, alpha=0.5,
           label="encoding range")
    ax.plot(x, _finite([q.observed_min for q in quantizers]), "v", markersize=3,
            label="observed min")
    ax.plot(x, _finite([q.observed_max for q in quantizers]), "^", markersize=3,
            label="observed max")
    _layer_axis(ax, [q.name for q in quantizers])
    ax.set_title(f"Encoding min-max ranges: {title}")
    ax.legend(fontsize=8)
    return _save(fig, folder, f"min_max_ranges/{title}.png")


def plot_histogram(q: QuantizerStats, folder: Path) -> Optional[str]:
    """The histogram of the values ``q`` saw with its chosen range marked:
    ``activations_pdf/<name>.png`` or ``weights_pdf/<layer>/<param>.png``."""
    if q.histogram is None:
        return None
    fig, ax = new_figure(7, 3.5)
    fig.subplots_adjust(left=0.1, right=0.97, bottom=0.14, top=0.9)
    edges = q.histogram.edges()
    ax.stairs(q.histogram.counts, edges, fill=True, alpha=0.6, label="values seen")
    if q.encoding_min is not None:
        lo, hi = min(q.encoding_min), max(q.encoding_max)
        what = "encoding range (channel extremes)" if q.per_channel else "encoding range"
        ax.axvline(lo, color="red", linestyle="--", label=what)
        ax.axvline(hi, color="red", linestyle="--")
    ax.set_yscale("log" if max(q.histogram.counts, default=0) > 0 else "linear")
    clipped = "" if q.clipped_fraction is None else f", clipped {100 * q.clipped_fraction:.3g}%"
    ax.set_title(f"{q.name} ({q.bitwidth} bit{clipped})", fontsize=9)
    ax.legend(fontsize=7)
    if q.is_activation:
        relative = f"activations_pdf/{q.name}.png"
    else:
        relative = f"weights_pdf/{q.layer}/{q.name.rsplit('.', 1)[1]}.png"
    return _save(fig, folder, relative, tight=False)


def plot_layer_mse(mse: Dict[str, float], folder: Path) -> str:
    """``per_layer_mse_loss.png``: each layer's output MSE against the float model."""
    fig, ax = new_figure()
    names = list(mse)
    ax.plot(range(len(names)), _finite(list(mse.values())), marker="o", markersize=3)
    _layer_axis(ax, names)
    ax.set_yscale("log" if any(v > 0 for v in mse.values()) else "linear")
    ax.set_ylabel("MSE")
    ax.set_title("Per-layer output MSE against the float model")
    return _save(fig, folder, "per_layer_mse_loss.png")


def plot_all(results: AnalysisResults, folder: Path, histograms: bool = True) -> List[str]:
    """Every plot the results support; returns the files written (relative to ``folder``)."""
    files = []
    for sweep in ("enabled", "disabled"):
        if (results.per_layer_enabled if sweep == "enabled" else results.per_layer_disabled):
            files.append(plot_sweep(results, sweep, folder))
    if results.quantizers:
        files.append(plot_sqnr(results, folder))
        for title, activations in (("activations", True), ("weights", False)):
            chosen = [q for q in results.quantizers if q.is_activation == activations]
            if chosen:
                files.append(plot_min_max(chosen, title, folder))
    if results.layer_mse:
        files.append(plot_layer_mse(results.layer_mse, folder))
    if histograms:
        for q in progress(results.quantizers, desc="histogram plots", unit="plot"):
            written = plot_histogram(q, folder)
            if written is not None:
                files.append(written)
    return files
