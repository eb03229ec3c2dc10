"""What a mixed-precision setting costs: bit-operations and parameter memory.

* **bit-ops**: for every layer that multiplies and accumulates (Conv, ConvTranspose, Linear
  and the fused conv-BN layers by their weight; a two-input ``MatMul`` module), its MACs in one
  forward of ``dummy_input`` times the bitwidth of each multiplied operand. MACs are measured
  once, with forward hooks on ``sim.model`` (every call counted); the bitwidths are read from
  the quantizers as they are set, so the cost of any setting is a sum, no forward.
* **memory**: parameter count times parameter bitwidth, over every parameter a quantized
  module has a quantizer for.

An operand that is not quantized counts 32 bits (float), one with a float (fp16) quantizer 16.
Element-wise ops, normalizations and gathers are not counted (no multiplies of two operands
that a kernel's bitwidth prices; aimet-torch counts the same layers).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from quantsim.graph import eval_mode, float_leaves, run_forward
from quantsim.op_types import onnx_types_of, param_axis, params_of
from quantsim.quantizer import Quantizer

_WEIGHT_LAYERS = frozenset({"Conv", "ConvTranspose", "Gemm"})
FLOAT_BITS = 32


@dataclass(frozen=True)
class MacLayer:
    """A layer whose MACs are priced: its MACs per forward and the quantizers of its two
    multiplied operands (None: unquantized)."""

    name: str
    macs: int
    operands: Tuple[Optional[str], Optional[str]]


def _weight_macs(module: nn.Module, inputs: List[torch.Tensor], output: torch.Tensor) -> int:
    weight = params_of(module).get("weight")
    if weight is None or weight.dim() < 2:
        return 0
    per_output = weight.numel() // weight.shape[0]
    # Conv / Linear: weight (out, in / groups, *kernel): each output element takes in*kernel
    # MACs; ConvTranspose: weight (in, out / groups, *kernel): each input element gives them
    if param_axis(module, "weight") == 0:
        return output.numel() * per_output
    return inputs[0].numel() * per_output if inputs else 0


def measure_mac_layers(sim, dummy_input: Any,
                       carriers: Dict[Tuple[str, int], Optional[str]]) -> List[MacLayer]:
    """Run ``sim.model`` once on ``dummy_input`` (eval mode, no grad) with hooks on the
    quantized modules and return the layers that multiply and accumulate, in sim order.

    ``carriers`` maps ``(module, input index)`` to the quantizer carrying that input
    (:func:`quantsim.mixed_precision.groups.input_carriers`)."""
    macs: Dict[str, int] = {}
    kinds: Dict[str, str] = {}
    handles = []
    for name, module in sim.named_qmodules():
        types = set(onnx_types_of(module))
        if types & _WEIGHT_LAYERS and "weight" in params_of(module):
            kinds[name] = "weight"
        elif "MatMul" in types and not params_of(module):
            kinds[name] = "matmul"
        else:
            continue

        def hook(mod, args, out, name=name):
            ins, outs = float_leaves(args), float_leaves(out)
            if not outs:
                return
            if kinds[name] == "weight":
                n = _weight_macs(mod, ins, outs[0])
            else:   # (..., m, k) @ (..., k, n): k MACs per output element
                n = outs[0].numel() * (ins[0].shape[-1] if ins and ins[0].dim() else 1)
            macs[name] = macs.get(name, 0) + int(n)

        handles.append(module.register_forward_hook(hook))
    try:
        with eval_mode(sim.model), torch.no_grad():
            run_forward(sim.model, dummy_input)
    finally:
        for h in handles:
            h.remove()
    layers = []
    for name, kind in kinds.items():
        if not macs.get(name):
            continue
        first = carriers.get((name, 0))
        second = (f"{name}.param_quantizers.weight" if kind == "weight"
                  else carriers.get((name, 1)))
        layers.append(MacLayer(name, macs[name], (first, second)))
    return layers


def operand_bits(q: Optional[Quantizer]) -> int:
    """Bits of an operand as its quantizer stores it: the bitwidth when enabled (16 for fp16),
    else :data:`FLOAT_BITS`."""
    if q is None or not q.enabled:
        return FLOAT_BITS
    return 16 if q.data_type == "float" else q.bitwidth


class CostModel:
    """Bit-ops and parameter memory of ``sim`` as its quantizers are set at each call."""

    def __init__(self, sim, layers: List[MacLayer]) -> None:
        self.layers = layers
        self._quantizers = dict(sim.named_quantizers())
        self._params: List[Tuple[str, int]] = []
        for name, module in sim.named_qmodules():
            values = params_of(module)
            for pname in module.param_quantizers:
                if values.get(pname) is not None:
                    self._params.append((f"{name}.param_quantizers.{pname}",
                                         values[pname].numel()))

    @property
    def total_macs(self) -> int:
        """MACs of one forward of the dummy input."""
        return sum(layer.macs for layer in self.layers)

    def _bits(self, name: Optional[str], bits: Optional[Dict[str, int]]) -> int:
        if name is not None and bits is not None and bits.get(name) is not None:
            return bits[name]
        return operand_bits(self._quantizers.get(name) if name is not None else None)

    def bit_ops(self, bits: Optional[Dict[str, int]] = None) -> int:
        """Sum over MAC layers of MACs x bits of operand 1 x bits of operand 2; ``bits``
        (quantizer name -> bitwidth, taken as enabled) overrides the quantizers' state."""
        return sum(layer.macs * self._bits(layer.operands[0], bits)
                   * self._bits(layer.operands[1], bits) for layer in self.layers)

    def memory_bits(self, bits: Optional[Dict[str, int]] = None) -> int:
        """Parameter count x parameter bits over the quantized modules' parameters; ``bits``
        overrides as in :meth:`bit_ops`."""
        return sum(n * self._bits(name, bits) for name, n in self._params)
