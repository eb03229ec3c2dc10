"""One calibration path for every way a sim is calibrated.

``QuantizationSimModel.compute_encodings``, ``set_fake_quantize(CALIBRATION)`` and the retrain
workflow's calibration batches all run a :class:`Calibration`, with aimet-torch 2.x's semantics:

1. **begin**: every parameter encoding is computed from its weight; the weights are then
   fake-quantized with those encodings in every calibration forward. Every input and output
   quantizer forgets its statistics and *observes*: it records its tensor and hands the float
   values on unchanged, so no statistic downstream carries upstream quantization noise.
2. the user's forwards run;
3. **finish**: statistics are merged across ranks (torch.distributed), every activation
   quantizer that saw data computes its encoding with the scheme, parameter encodings are
   recomputed if a weight changed meanwhile (the retrain workflow trains while it calibrates),
   and the weight scale of each Conv / ConvTranspose / Linear with a bias is widened where its
   int32 bias codes would overflow (:func:`quantsim.encoding.int32_bias_weight_scale`).
   Quantizers that saw no data are reported, not guessed.

A calibration that fails half way is undone with :meth:`Calibration.abort`, which puts back
the parameter encodings taken at ``begin``.
"""
from __future__ import annotations

import warnings
import weakref
from typing import Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn

from quantsim import progress
from quantsim.encoding import Encoding, int32_bias_weight_scale
from quantsim.graph import ModelGraph
from quantsim.nn.fused import ConvBn, ConvTransposeBn, LinearBn
from quantsim.op_types import is_data_movement, params_of
from quantsim.quantizer import Quantizer, QuantizerState
from quantsim.wrappers import QuantizationMixin, quantizer_items

#: layers whose bias a runtime stores as int32 codes at scale ``input_scale * weight_scale``
#: (fused conv-BN modules run as their folded layer)
_INT32_BIAS_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                      nn.ConvTranspose3d, nn.Linear, ConvBn, ConvTransposeBn, LinearBn)


def quantized_modules(model: nn.Module) -> Dict[str, nn.Module]:
    """Name -> quantized module of ``model`` (each module once, by its first path)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantizationMixin)}


def calibrates(q: Quantizer) -> bool:
    """True for a quantizer whose encoding calibration sets: enabled, not frozen, and not pinned
    at both ends by the config's encoding constraints."""
    return q.enabled and not q.frozen and not q.has_fixed_range


def all_reduce_statistics(quantizers: Iterable[Quantizer]) -> None:
    """With an initialized process group, make every rank's statistics the merged ones, so
    every rank computes identical encodings (no-op otherwise)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    for q in quantizers:
        q.analyzer.all_reduce_()


def data_quantizer(qmodules: Dict[str, nn.Module], graph: Optional[ModelGraph],
                   layer: str, index: int = 0) -> Optional[str]:
    """Name of the enabled quantizer whose encoding the data entering input ``index`` of
    ``layer`` (first call) carries: its own input quantizer, else, following the traced graph,
    the output quantizer upstream (through data-movement modules such as MaxPool or Flatten).
    None when the data is unquantized or, without a graph, when the layer has no input
    quantizer on."""
    module = qmodules[layer]
    if index < len(module.input_quantizers) and module.input_quantizers[index].enabled:
        return f"{layer}.input_quantizers.{index}"
    call = graph.first_call(layer) if graph is not None else None
    source = call.inputs[index] if call is not None and index < len(call.inputs) else None
    for _ in range(len(qmodules)):   # a chain of data-movement modules, never a cycle
        if source is None or source.kind != "module" or source.producer not in qmodules:
            return None
        name, producer = source.producer, qmodules[source.producer]
        outs = producer.output_quantizers
        if source.output_index < len(outs) and outs[source.output_index].enabled:
            return f"{name}.output_quantizers.{source.output_index}"
        if not is_data_movement(producer):
            return None
        if producer.input_quantizers and producer.input_quantizers[0].enabled:
            return f"{name}.input_quantizers.0"
        call = graph.first_call(name)
        source = call.inputs[0] if call is not None and call.inputs else None
    return None


_Snapshot = Tuple[Dict[str, torch.Tensor], bool, bool, bool]

#: parameter quantizer -> (identity, version) of the weight a calibration in progress encoded;
#: kept beside the quantizers so that a calibration finished by another ``Calibration`` object
#: (set_fake_quantize's CALIBRATION -> QAT / VALIDATION) re-encodes weights that changed
_ENCODED_WEIGHTS: "weakref.WeakKeyDictionary[Quantizer, Tuple[int, int]]" = \
    weakref.WeakKeyDictionary()


class Calibration:
    """One calibration of the quantizers of ``model`` (see the module docstring).

    Args:
        model: a model with quantized modules (``sim.model``).
        graph: the sim's traced graph; it lets the int32-bias rule find a layer's input
            encoding upstream. Without it only a layer's own input quantizer is used (what
            aimet-torch 2.x sees while calibrating).
        select: calibrate only the quantizers for which it returns True (default: all that
            :func:`calibrates`).

    Example:
        >>> cal = Calibration(sim.model, sim.graph)                          # doctest: +SKIP
        >>> cal.begin(); run_batches(sim.model); missing = cal.finish()      # doctest: +SKIP
    """

    def __init__(self, model: nn.Module, graph: Optional[ModelGraph] = None,
                 select=calibrates) -> None:
        self.qmodules = quantized_modules(model)
        self.graph = graph
        #: (name, module, parameter name, quantizer) of the parameters calibrated
        self.params: List[Tuple[str, nn.Module, str, Quantizer]] = []
        #: (name, quantizer) of the input and output quantizers calibrated
        self.activations: List[Tuple[str, Quantizer]] = []
        for name, module in self.qmodules.items():
            for pname, q in module.param_quantizers.items():
                if select(q) and q.data_type == "int" and params_of(module).get(pname) is not None:
                    self.params.append((f"{name}.param_quantizers.{pname}", module, pname, q))
            for kind in ("input_quantizers", "output_quantizers"):
                for i, q in enumerate(getattr(module, kind)):
                    if select(q):
                        self.activations.append((f"{name}.{kind}.{i}", q))
        self._saved: Dict[int, _Snapshot] = {}

    # -- the three steps ------------------------------------------------------------------------
    def begin(self) -> None:
        """Compute parameter encodings from the weights; set activation quantizers observing."""
        self._saved = {id(q): _snapshot(q) for _, _, _, q in self.params}
        for _, module, pname, q in self.params:
            self._encode_weight(params_of(module)[pname], q)
        for _, q in self.activations:
            q.reset_statistics()
            q.state = QuantizerState.OBSERVE

    def finish(self) -> List[str]:
        """Turn what the activation quantizers observed into encodings; return the names of
        the integer quantizers that saw no data (their encodings are left as they were)."""
        observing = [(n, q) for n, q in self.activations if q.state is QuantizerState.OBSERVE]
        begun = [(m, p, q) for _, m, p, q in self.params if q in _ENCODED_WEIGHTS]
        if not observing and not begun:
            return []  # nothing was calibrating (e.g. a state change after compute_encodings)
        for _, q in observing:
            q.state = QuantizerState.QUANTIZE
        integer = [(n, q) for n, q in observing if q.data_type == "int"]
        all_reduce_statistics([q for _, q in integer])
        missing = []
        for name, q in progress.progress(integer, desc="computing encodings", unit="quantizer"):
            if q.analyzer.has_stats:
                q.compute_encoding()
            else:
                missing.append(name)
        for module, pname, q in begun:  # weights trained meanwhile (retrain) are re-encoded
            param = params_of(module)[pname]
            if _ENCODED_WEIGHTS.pop(q) != (id(param), param._version):
                self._encode_weight(param, q)
                _ENCODED_WEIGHTS.pop(q)
        self.apply_int32_bias_rule()
        self._saved = {}
        return missing

    def abort(self) -> None:
        """Undo :meth:`begin`: parameter encodings as they were, activations quantizing."""
        for _, q in self.activations:
            if q.state is QuantizerState.OBSERVE:
                q.state = QuantizerState.QUANTIZE
        for _, _, _, q in self.params:
            _ENCODED_WEIGHTS.pop(q, None)
            saved = self._saved.get(id(q))
            if saved is not None:
                _restore(q, saved)
        self._saved = {}

    # -- parts ----------------------------------------------------------------------------------
    @staticmethod
    def _encode_weight(param: torch.Tensor, q: Quantizer) -> None:
        q.reset_statistics()
        q.observe(param)  # per block: the block view
        q.compute_encoding()
        q.reset_statistics()  # a weight's statistics are not kept between calibrations
        _ENCODED_WEIGHTS[q] = (id(param), param._version)

    def apply_int32_bias_rule(self) -> None:
        """Widen the weight scales of Conv / ConvTranspose / Linear layers whose bias would not
        fit the runtime's int32 bias codes (:func:`~quantsim.encoding.int32_bias_weight_scale`),
        from the current encodings; :meth:`finish` calls it, and code that changes bitwidths
        after a calibration (mixed precision) calls it again."""
        named = {f"{n}.{suffix}": q for n, m in self.qmodules.items()
                 for suffix, q in quantizer_items(m)}
        for name, module in self.qmodules.items():
            bias = params_of(module).get("bias")
            weight_q = named.get(f"{name}.param_quantizers.weight")
            if not isinstance(module, _INT32_BIAS_LAYERS) or bias is None or weight_q is None:
                continue
            enc = weight_q.encoding if weight_q.enabled else None
            source = data_quantizer(self.qmodules, self.graph, name)
            input_enc = named[source].encoding if source is not None else None
            if (not _per_tensor_int(input_enc) or enc is None or enc.is_float
                    or enc.per_block):  # block scales: the runtime's bias rule is per channel
                continue
            out_q = module.output_quantizers[0] if module.output_quantizers else None
            out_enc = out_q.encoding if out_q is not None and out_q.enabled else None
            out_enc = out_enc if _per_tensor_int(out_enc) else None
            scale = int32_bias_weight_scale(
                enc.scale, bias, input_enc.scale,
                None if out_enc is None else out_enc.scale,
                None if out_enc is None else out_enc.offset)
            if torch.equal(scale, enc.scale):
                continue
            if weight_q.frozen or weight_q.has_fixed_range:
                warnings.warn(
                    f"{name}: its int32 bias codes overflow with the weight encoding, which is "
                    "frozen or fixed by the config, so it was left as it is", stacklevel=3)
                continue
            weight_q.set_encoding(Encoding(enc.bitwidth, scale, enc.offset, enc.symmetric,
                                           enc.strict, enc.unsigned, enc.axis))


def _per_tensor_int(enc: Optional[Encoding]) -> bool:
    return enc is not None and not enc.is_float and not enc.per_channel


def _snapshot(q: Quantizer) -> _Snapshot:
    state = {k: v.detach().clone() for k, v in q.state_dict().items()}
    return state, q.symmetric, q.strict, q._unsigned


def _restore(q: Quantizer, saved: _Snapshot) -> None:
    state, q.symmetric, q.strict, q._unsigned = saved
    q.load_state_dict(state)  # copies in place: the version counters move, caches refresh
