"""The measurements of a quantization analysis on a calibrated sim.

* :func:`collect_statistics`: one pass over the data that runs every batch twice, float
  (parameter quantizers off, activation quantizers handing their input on) and quantized, and
  compares each quantized tensor with the float one as it is produced: SQNR against the float
  model, each quantizer's own SQNR, clipped fraction, observed range and a histogram
  (:mod:`quantsim.analyzers`' histogram statistics), plus each layer's output MSE. Only one
  batch's float tensors are held at a time.
* :func:`sweep_layers`: the eval metric with only one layer's quantizers on (or off), for
  every layer, one calibration reused.
* :func:`quantizers_enabled`: the context that switches quantizers and always restores them.

A layer is a quantized module with at least one enabled quantizer; layers are ordered by their
first call in the sim's trace.
"""
from __future__ import annotations

import contextlib
import functools
import numbers
from collections import defaultdict
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from quantsim.analysis.results import Histogram, QuantizerStats
from quantsim.analyzers import create_analyzer
from quantsim.defs import CallbackFunc
from quantsim.encoding import channel_view
from quantsim.errors import AnalysisError
from quantsim.graph import eval_mode, float_leaves
from quantsim.metrics import run_batch, sqnr_from_sums, squared_sums
from quantsim.op_types import params_of
from quantsim.progress import progress
from quantsim.quantizer import Quantizer, QuantizerRole
from quantsim.wrappers import quantizer_items

#: Bins of the per-quantizer histograms.
HISTOGRAM_BINS = 256

_ROLE = {QuantizerRole.PARAM: "param", QuantizerRole.INPUT: "input",
         QuantizerRole.OUTPUT: "output"}


# -- which quantizers -----------------------------------------------------------------------------
def analyzed_layers(sim, ignore: Sequence[str] = ()) -> Dict[str, nn.Module]:
    """``{name: module}`` of the quantized modules with an enabled quantizer, in call order
    (modules the trace never saw last), without the ``ignore``d names."""
    order = {}
    for call in sim.graph.calls:
        order.setdefault(call.name, len(order))
    layers = [(n, m) for n, m in sim.named_qmodules()
              if n not in ignore and any(q.enabled for _, q in quantizer_items(m))]
    layers.sort(key=lambda nm: order.get(nm[0], len(order)))
    return dict(layers)


def _enabled_quantizers(layers: Dict[str, nn.Module]) -> Iterator[Tuple[str, str, Quantizer]]:
    """``(layer, quantizer name, quantizer)`` of the enabled quantizers, parameters first."""
    for layer, module in layers.items():
        items = [(s, q) for s, q in quantizer_items(module) if q.enabled]
        items.sort(key=lambda sq: sq[1].role is not QuantizerRole.PARAM)
        for suffix, q in items:
            yield layer, f"{layer}.{suffix}", q


@contextlib.contextmanager
def quantizers_enabled(sim, keep: Callable[[str, Quantizer], bool]) -> Iterator[None]:
    """Within the block, each enabled quantizer ``q`` named ``name`` stays on only if
    ``keep(name, q)``; disabled ones stay off. Every flag is restored on exit, also when the
    block raises."""
    before = [(q, q.enabled) for q in sim.quantizers()]
    try:
        for name, q in sim.named_quantizers():
            if q.enabled and not keep(name, q):
                q.enabled = False
        yield
    finally:
        for q, flag in before:
            if q.enabled != flag:
                q.enabled = flag


# -- evaluation -----------------------------------------------------------------------------------
def evaluate(eval_callback: CallbackFunc, model: nn.Module) -> float:
    """``eval_callback(model)`` in eval mode without grad (modes restored), as a float.

    Raises:
        AnalysisError: the callback returned something that is not a real number.
    """
    with eval_mode(model), torch.no_grad():
        score = eval_callback(model)
    if isinstance(score, torch.Tensor) and score.numel() == 1:
        score = score.item()
    if isinstance(score, bool) or not isinstance(score, numbers.Real):
        raise AnalysisError(f"eval_callback must return a number (accuracy, cosine, -loss), "
                            f"got {type(score).__name__} {score!r:.60}")
    return float(score)


def sweep_layers(sim, eval_callback: CallbackFunc, sweep: str,
                 layers: Dict[str, nn.Module]) -> Dict[str, float]:
    """The eval score per layer, in ``layers``' order.

    ``sweep='enabled'``: only that layer's (enabled) quantizers on; ``'disabled'``: every
    enabled quantizer on except that layer's. The quantizers' flags are restored after each
    evaluation and when the callback raises.
    """
    owner = {id(q): layer for layer, _, q in _enabled_quantizers(layers)}
    scores = {}
    for layer in progress(list(layers), desc=f"per-layer analysis ({sweep})", unit="layer"):
        if sweep == "enabled":
            keep = (lambda _n, q, layer=layer: owner.get(id(q)) == layer)
        else:
            keep = (lambda _n, q, layer=layer: owner.get(id(q)) != layer)
        with quantizers_enabled(sim, keep):
            scores[layer] = evaluate(eval_callback, sim.model)
    return scores


# -- the statistics pass --------------------------------------------------------------------------
class _Tally:
    """Running sums of one quantizer's comparisons."""

    def __init__(self, name: str) -> None:
        self.signal = self.noise = 0.0        # float tensor^2, (quantized - float)^2
        self.own_signal = self.own_noise = 0.0  # input^2, (output - input)^2
        self.compared = 0                     # values compared with the float tensor
        self.clipped = 0
        self.numel = 0
        self.histogram = create_analyzer("percentile", num_bins=HISTOGRAM_BINS, name=name)

    def add(self, x: torch.Tensor, out: torch.Tensor, reference: Optional[torch.Tensor],
            quantizer: Quantizer) -> None:
        s, n = squared_sums(x, out)
        self.own_signal += s
        self.own_noise += n
        if reference is not None and reference.shape == out.shape:
            if reference is not x:   # a parameter is its own float reference
                s, n = squared_sums(reference, out)
            self.signal += s
            self.noise += n
            self.compared += out.numel()
        self.numel += x.numel()
        encoding = quantizer.encoding
        if encoding is not None and not encoding.is_float:
            # clipped: farther than half a step outside the grid, where the error exceeds
            # rounding's (values within half a step of an end round onto it)
            half = channel_view(encoding.scale, x.dim(), quantizer.axis).to(x.device) / 2
            lo = channel_view(encoding.min, x.dim(), quantizer.axis).to(x.device) - half
            hi = channel_view(encoding.max, x.dim(), quantizer.axis).to(x.device) + half
            self.clipped += int(((x < lo) | (x > hi)).sum())
        self.histogram.observe(x)

    def stats(self, layer: str, name: str, q: Quantizer) -> QuantizerStats:
        encoding = q.encoding
        if encoding is None or encoding.is_float:
            enc_min = enc_max = None
        else:
            enc_min = [float(v) for v in encoding.min.reshape(-1)]
            enc_max = [float(v) for v in encoding.max.reshape(-1)]
        observed = self.histogram.observed_range()
        hist = None
        if observed is not None:
            st = self.histogram.state_dict_stats()
            hist = Histogram(float(st["lo"][0]), float(st["hi"][0]),
                             [float(c) for c in st["counts"][0]])
        return QuantizerStats(
            name=name, layer=layer, role=_ROLE[q.role], bitwidth=q.bitwidth,
            symmetric=bool(q.symmetric), per_channel=q.axis is not None,
            encoding_min=enc_min, encoding_max=enc_max,
            observed_min=None if observed is None else float(observed[0][0]),
            observed_max=None if observed is None else float(observed[1][0]),
            clipped_fraction=(self.clipped / self.numel if self.numel and enc_min is not None
                              else None),
            sqnr_db=sqnr_from_sums(self.signal, self.noise) if self.compared else None,
            quantizer_sqnr_db=sqnr_from_sums(self.own_signal, self.own_noise)
            if self.numel else None,
            mse=self.noise / self.compared if self.compared else None,
            numel=self.numel, histogram=hist)


class _StatisticsPass:
    """Hooks that run each call of ``sim.model`` float then quantized and compare the two."""

    def __init__(self, sim, layers: Dict[str, nn.Module]) -> None:
        self.sim = sim
        self.layers = layers
        self.entries = list(_enabled_quantizers(layers))
        # the float run turns off every enabled quantizer of the sim, analyzed or not
        self.enabled = [(name, q) for name, q in sim.named_quantizers() if q.enabled]
        self.tallies = {name: _Tally(name) for _, name, _ in self.entries}
        self.layer_sums: Dict[str, List[float]] = defaultdict(lambda: [0.0, 0])
        self.calls = 0
        self._phase: Optional[str] = None
        self._float: Dict[str, List[torch.Tensor]] = defaultdict(list)
        self._cursor: Dict[str, int] = defaultdict(int)

    # hooks ---------------------------------------------------------------------------------
    def _quantizer_hook(self, name: str):
        def hook(q: Quantizer, inputs: tuple, out: torch.Tensor):
            x = inputs[0]
            if self._phase == "float":
                self._float[name].append(x.detach().clone())  # later ops may modify it in place
                return None
            if self._phase == "quantized" and name in self.tallies:
                self.tallies[name].add(x.detach(), out.detach(), self._next_float(name), q)
            return None
        return hook

    def _layer_hook(self, layer: str):
        key = f"{layer}#output"

        def hook(_module: nn.Module, _inputs: tuple, out: Any):
            leaves = float_leaves(out)
            if not leaves or self._phase is None:
                return
            if self._phase == "float":
                self._float[key].append(leaves[0].detach().clone())
                return
            reference = self._next_float(key)
            if reference is not None and reference.shape == leaves[0].shape:
                _, noise = squared_sums(reference, leaves[0])
                sums = self.layer_sums[layer]
                sums[0] += noise
                sums[1] += reference.numel()
        return hook

    def _next_float(self, key: str) -> Optional[torch.Tensor]:
        """The float tensor recorded at the same call of the same place (None if the float
        run took another path)."""
        i = self._cursor[key]
        self._cursor[key] = i + 1
        recorded = self._float.get(key, ())
        return recorded[i] if i < len(recorded) else None

    # running -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """Hooks on the quantizers and layers, and ``sim.model.forward`` running both passes."""
        model = self.sim.model
        handles = [q.register_forward_hook(self._quantizer_hook(name))
                   for name, q in self.enabled if q.role is not QuantizerRole.PARAM]
        handles += [m.register_forward_hook(self._layer_hook(n)) for n, m in self.layers.items()]
        own_forward = model.__dict__.get("forward")
        forward = model.forward
        params = [q for _, q in self.enabled if q.role is QuantizerRole.PARAM]
        activations = [q for _, q in self.enabled if q.role is not QuantizerRole.PARAM]

        @functools.wraps(forward)   # keeps forward's signature for split_dummy_input
        def both(*args, **kwargs):
            self._float.clear()
            self._cursor.clear()
            self._phase = "float"
            try:
                for q in params:
                    q.enabled = False
                for q in activations:   # still called (their hooks record), nothing computed
                    q.forward = _hand_on
                forward(*args, **kwargs)
            finally:
                for q in params:
                    q.enabled = True
                for q in activations:
                    del q.forward
            self._phase = "quantized"
            try:
                out = forward(*args, **kwargs)
            finally:
                self._phase = None
                self._float.clear()
            self.calls += 1
            return out

        model.forward = both
        try:
            yield
        finally:
            if own_forward is None:
                del model.forward
            else:
                model.forward = own_forward
            for h in handles:
                h.remove()

    def param_statistics(self) -> None:
        """Parameters need no data: compare each with its fake-quantized self once."""
        for layer, name, q in self.entries:
            if q.role is QuantizerRole.PARAM:
                param = params_of(self.layers[layer])[name.rsplit(".", 1)[1]].detach()
                with torch.no_grad():
                    self.tallies[name].add(param, q(param), param, q)

    def results(self) -> Tuple[List[QuantizerStats], Dict[str, float]]:
        """Per-quantizer statistics (call order) and per-layer output MSE."""
        stats = [self.tallies[name].stats(layer, name, q) for layer, name, q in self.entries]
        mse = {layer: noise / count for layer, (noise, count) in self.layer_sums.items() if count}
        return stats, mse


def _hand_on(x: torch.Tensor) -> torch.Tensor:
    """A quantizer's forward in the float run: the float model's tensor, unchanged."""
    return x


def collect_statistics(sim, data: Any, layers: Dict[str, nn.Module],
                       num_batches: Optional[int] = None
                       ) -> Tuple[List[QuantizerStats], Dict[str, float], int]:
    """Run the statistics pass (see the module docstring).

    Args:
        sim: a calibrated ``QuantizationSimModel``.
        data: a :class:`~quantsim.defs.CallbackFunc` that runs ``sim.model`` over data (a
            forward-pass callback), or an iterable of model inputs (each passed as
            :func:`quantsim.metrics.run_batch` does).
        layers: what :func:`analyzed_layers` returned.
        num_batches: with an iterable, use at most this many batches.

    Returns:
        ``(quantizer statistics, {layer: output MSE}, number of model calls)``.

    Raises:
        AnalysisError: the data ran the model zero times.
    """
    not_ready = [name for name, q in sim.named_quantizers()
                 if q.enabled and (q.state != "quantize" or not q.is_initialized)]
    if not_ready:
        raise AnalysisError(
            f"{len(not_ready)} enabled quantizer(s) are not calibrated and quantizing: "
            f"{not_ready[:10]}; run sim.compute_encodings() (or load_encodings) first, and put "
            "a QAT sim in the VALIDATION phase (quantsim.states.set_fake_quantize)")
    run = _StatisticsPass(sim, layers)
    run.param_statistics()
    model = sim.model
    with run.installed(), eval_mode(model), torch.no_grad():
        if isinstance(data, CallbackFunc):
            data(model)
        else:
            batches = data if num_batches is None else _first(data, num_batches)
            for batch in progress(batches, desc="analysis pass", unit="batch"):
                run_batch(model, batch)
    if run.calls == 0 and any(q.role is not QuantizerRole.PARAM for _, _, q in run.entries):
        raise AnalysisError("the analysis data never called the model: the forward-pass "
                            "callback or the batches must run sim.model at least once")
    stats, mse = run.results()
    return stats, mse, run.calls


def _first(batches: Iterable[Any], n: int) -> Iterator[Any]:
    for i, batch in enumerate(batches):
        if i >= n:
            return
        yield batch

