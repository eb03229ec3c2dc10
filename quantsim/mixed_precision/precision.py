"""Set quantizer groups to candidates with their encodings, cheaply.

Calibration observes float activations (:mod:`quantsim.calibration`), with the weights
fake-quantized at their bitwidths. So one calibration's statistics serve every activation
bitwidth:

* an activation quantizer's encoding at a bitwidth is computed once from the statistics the
  sim's calibration kept, then reused (the encoding it had is the entry at its bitwidth);
* a weight's encoding at a bitwidth comes from the weight through
  :class:`~quantsim.calibration.Calibration` (once per bitwidth, then reused);
* after every change the int32-bias rule runs over the layers again, from the weights'
  unwidened encodings, so each layer's weight scale is what a fresh calibration would give
  for the new input and output bitwidths.

While only activation bitwidths change, a setting's encodings are exactly what
``compute_encodings`` at those bitwidths gives. Where weight bitwidths change, the activation
statistics downstream were observed with the calibration's weights; :meth:`recalibrate` (one
run of the forward-pass callback) makes them exact for the weights as set, which the search
does once, for the point it keeps.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch

from quantsim.calibration import Calibration
from quantsim.encoding import Encoding
from quantsim.errors import CalibrationError
from quantsim.graph import eval_mode
from quantsim.mixed_precision.groups import QuantizerGroup
from quantsim.quantizer import Quantizer

Setting = Tuple[Optional[int], Optional[int]]


class GroupPrecision:
    """Bitwidths, encodings and on/off of the quantizers in ``groups`` of ``sim``.

    Args:
        sim: a calibrated :class:`~quantsim.QuantizationSimModel`.
        groups: its quantizer groups.
        forward_pass_callback: ``callback(model)``, run (once) to calibrate the groups'
            activation quantizers when the sim kept no statistics for some of them (a sim
            whose encodings were loaded from a file).
    """

    def __init__(self, sim, groups: List[QuantizerGroup],
                 forward_pass_callback: Optional[Callable[[Any], Any]]) -> None:
        self.sim = sim
        self.groups = groups
        named = dict(sim.named_quantizers())
        self.quantizers: Dict[str, Quantizer] = {n: named[n] for g in groups
                                                 for n in g.quantizers}
        self._params = {n for g in groups for n in g.parameter_quantizers}
        self._original = {n: (q.bitwidth, q.encoding, q.enabled)
                          for n, q in self.quantizers.items()}
        self._cache: Dict[Tuple[str, int], Encoding] = {
            (n, bw): enc for n, (bw, enc, _) in self._original.items() if enc is not None}
        self._ensure_statistics(forward_pass_callback)

    # -- calibration ----------------------------------------------------------------------------
    def _ensure_statistics(self, forward_pass_callback) -> None:
        """Calibrate the activation quantizers once if any of them has no statistics."""
        self._forward = forward_pass_callback
        self._observed_with = self.weight_bitwidths()
        if any(n not in self._params and not q.analyzer.has_stats
               for n, q in self.quantizers.items()):
            self.recalibrate()

    def weight_bitwidths(self) -> Dict[str, int]:
        """Parameter quantizer name -> bitwidth, for the group parameter quantizers."""
        return {n: self.quantizers[n].bitwidth for n in sorted(self._params)}

    @property
    def statistics_current(self) -> bool:
        """True when the activation statistics were observed with the weights' bitwidths as
        they are now set."""
        return self._observed_with == self.weight_bitwidths()

    def recalibrate(self) -> None:
        """Observe the group activation quantizers again (one run of the forward-pass
        callback, weights as now set) and recompute their encodings at their bitwidths; the
        encodings kept for other bitwidths are dropped.

        Raises:
            CalibrationError: no forward-pass callback, it raised, or it reached no data for
                some quantizer.
        """
        acts = [n for n in self.quantizers if n not in self._params]
        if self._forward is None:
            raise CalibrationError(
                "mixed precision: the activation quantizers need calibrating (no statistics "
                f"kept, e.g. {acts[:3]}, or weight bitwidths changed) and no "
                "forward_pass_callback was given")
        ids = {id(self.quantizers[n]) for n in acts}
        calibration = Calibration(self.sim.model, self.sim.graph, select=lambda q: id(q) in ids)
        calibration.begin()
        try:
            with eval_mode(self.sim.model), torch.no_grad():
                self._forward(self.sim.model)
        except Exception as exc:
            calibration.abort()
            raise CalibrationError(
                f"mixed precision: forward_pass_callback raised {type(exc).__name__}: {exc}"
            ) from exc
        unseen = calibration.finish()
        if unseen:
            raise CalibrationError(f"mixed precision: the forward_pass_callback did not reach "
                                   f"{unseen}")
        self._cache = {k: v for k, v in self._cache.items() if k[0] in self._params}
        for n in acts:
            q = self.quantizers[n]
            if q.enabled:
                self._cache[(n, q.bitwidth)] = q.encoding
        self._observed_with = self.weight_bitwidths()

    # -- setting --------------------------------------------------------------------------------
    def apply(self, settings: Dict[int, Setting], active: Optional[Iterable[int]] = None) -> None:
        """Set every group ``i`` in ``settings`` to its ``(activation bw, parameter bw)``
        (None: leave that kind alone) with its encodings, enable the groups in ``active``
        (default: all) and disable the others, then apply the int32-bias rule."""
        active_set = set(range(len(self.groups))) if active is None else set(active)
        new_weights: List[Tuple[str, int]] = []
        for i, group in enumerate(self.groups):
            act_bw, param_bw = settings.get(i, (None, None))
            for n in group.activation_quantizers:
                self._set_activation(n, act_bw)
            for n in group.parameter_quantizers:
                q = self.quantizers[n]
                if param_bw is not None and q.bitwidth != param_bw:
                    q.bitwidth = param_bw
                if (n, q.bitwidth) not in self._cache:
                    new_weights.append((n, q.bitwidth))
            for n in group.quantizers:
                self.quantizers[n].enabled = i in active_set
        self._encode_weights(new_weights)
        for n in self._params:   # unwidened weight encodings, then the rule on them
            q = self.quantizers[n]
            q.set_encoding(self._cache[(n, q.bitwidth)])
        _int32_bias_rule(self.sim)

    def _set_activation(self, name: str, bw: Optional[int]) -> None:
        q = self.quantizers[name]
        if bw is None or bw == q.bitwidth:
            return
        q.bitwidth = bw
        cached = self._cache.get((name, bw))
        if cached is not None:
            q.set_encoding(cached)
            return
        q.compute_encoding()
        self._cache[(name, bw)] = q.encoding

    def _encode_weights(self, todo: List[Tuple[str, int]]) -> None:
        """Encode weights at bitwidths not seen yet, from the weights; keep the unwidened
        encodings (read between ``begin``, which encodes, and ``finish``, which widens)."""
        if not todo:
            return
        ids = {id(self.quantizers[n]) for n, _ in todo}
        calibration = Calibration(self.sim.model, self.sim.graph, select=lambda q: id(q) in ids)
        calibration.begin()
        for n, bw in todo:
            self._cache[(n, bw)] = self.quantizers[n].encoding
        calibration.finish()

    def restore(self) -> None:
        """Every group quantizer back to the bitwidth, encoding and on/off it had."""
        for n, (bw, enc, enabled) in self._original.items():
            q = self.quantizers[n]
            q.bitwidth = bw
            if enc is not None:
                q.set_encoding(enc)
            q.enabled = enabled

    def bitwidths(self) -> Dict[str, int]:
        """Quantizer name -> current bitwidth, for the group quantizers."""
        return {n: q.bitwidth for n, q in self.quantizers.items()}


def _int32_bias_rule(sim) -> None:
    """Widen weight scales where a layer's int32 bias codes would overflow: the rule
    :meth:`Calibration.finish` applies, run on the current encodings without a calibration."""
    Calibration(sim.model, sim.graph, select=lambda q: False).apply_int32_bias_rule()
