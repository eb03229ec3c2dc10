"""Insert QuantizeLinear / DequantizeLinear pairs into an exported float ONNX graph.

Written with ``onnx.helper`` graph surgery, not by exporting torch fake-quant ops (those only
export 8-bit ranges). Where each pair goes mirrors what the sim quantizes:

===================  ======================================================================
quantizer            QDQ
===================  ======================================================================
parameter            on the initializer (float weights kept, ``conv1.weight -> Q -> DQ``);
                     per-axis with ``axis`` for per-channel encodings; blocked
                     (``axis=1``, ``block_size``, opset 21) for per-block ones, the
                     ``(C, blocks)`` scales repeated over a Conv kernel's spatial dims (a
                     sim block spans them); LPBQ as its effective block scales
output               after the tensor, for every consumer; a graph output keeps its name
                     (it becomes the DequantizeLinear output)
input                only on the edges into that module's nodes (other consumers of the
                     tensor see float, as in the sim); a module called more than once has
                     a pair on the edges into each call
data movement        tensors that only move a quantized tensor's values (MaxPool, Reshape,
                     Transpose, ...) get a pair with the same encoding; this changes no value
                     (the values are on the grid already) and lets runtimes keep them integer
fp16 (float)         Clip(+-65504) -> Cast(float16) -> Cast(float), exactly the sim's rounding
===================  ======================================================================

Zero points (FORMATS §4.4): the element type follows the encoding's grid: signed grids
(symmetric) use ``intB`` with zero point 0, unsigned grids (asymmetric, unsigned symmetric) use
``uintB`` with zero point ``-offset``. A grid narrower than the type (strict symmetric,
``[-127, 127]``) gets a Clip after the DequantizeLinear, so saturation matches the sim.

Opset: 8-bit graphs keep the float model's opset (default 20, which ORT loads at every
optimisation level); 4- and 16-bit types need opset 21 (``TOOLCHAIN.md`` §4/§5; ORT 1.32's
default optimisation level fails to load some opset-21 graphs with MaxPool, see ``docs/export.md``).
Other bitwidths have no ONNX type and raise :class:`~quantsim.errors.ExportError`.
"""
from __future__ import annotations

import heapq
import json
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from quantsim.encoding import Encoding
from quantsim.errors import ExportError

#: model metadata key: quantizer name -> the tensor holding its dequantized values.
QDQ_MAP_KEY = "quantsim.qdq_outputs"
_TYPES = {(4, True): TensorProto.INT4, (4, False): TensorProto.UINT4,
          (8, True): TensorProto.INT8, (8, False): TensorProto.UINT8,
          (16, True): TensorProto.INT16, (16, False): TensorProto.UINT16}
_FP16_MAX = 65504.0


@dataclass
class QdqPlan:
    """What to quantize, by tensor name (all names refer to the float graph).

    Attributes:
        params: initializer -> (quantizer name, encoding).
        tensors: activation tensor -> (quantizer name or None for data movement, encoding);
            quantized for all consumers. The tensors of one quantizer of a module called more
            than once come in call order.
        edges: input quantizer name -> one (tensor, consumer node indices, encoding) per call
            of its module, in call order.
    """

    params: Dict[str, Tuple[str, Encoding]] = field(default_factory=dict)
    tensors: Dict[str, Tuple[Optional[str], Encoding]] = field(default_factory=dict)
    edges: Dict[str, List[Tuple[str, List[int], Encoding]]] = field(default_factory=dict)

    def encodings(self):
        """Every encoding in the plan."""
        yield from (e for _, e in self.params.values())
        yield from (e for _, e in self.tensors.values())
        yield from (e for edges in self.edges.values() for _, _, e in edges)


def qdq_opset(plan: QdqPlan, base_opset: int) -> int:
    """The opset the QDQ model needs: >= 13 (per-axis), >= 21 for 4/16-bit types.

    Raises:
        ExportError: a bitwidth without ONNX QuantizeLinear type.
    """
    opset = max(base_opset, 13)
    for enc in plan.encodings():
        if enc.is_float:
            continue
        if enc.per_block:  # blocked Q/DQ (block_size attribute) exists from opset 21
            opset = max(opset, 21)
        if enc.bitwidth not in (4, 8, 16):
            raise ExportError(
                f"the QDQ model cannot hold a {enc.bitwidth}-bit encoding: ONNX QuantizeLinear "
                "has int4/uint4, int8/uint8 and int16/uint16 only; use those bitwidths, or "
                "skip the QDQ model (the .onnx and .encodings files do not need it)")
        if enc.bitwidth != 8:
            opset = max(opset, 21)
    return opset


def build_qdq_model(model: onnx.ModelProto, plan: QdqPlan, opset: int) -> onnx.ModelProto:
    """A copy of ``model`` with the plan's QDQ pairs, at ``opset`` (see the module docstring).

    The map quantizer name -> its dequantized tensors (one per call of its module, in call
    order; one for a parameter) is stored in ``metadata_props`` under :data:`QDQ_MAP_KEY`
    (used by :func:`quantsim.export.verify`).
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    builder = _Builder(g)
    consumers: Dict[str, List[onnx.NodeProto]] = {}
    for node in g.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    original_nodes = list(g.node)
    dq_of: Dict[str, List[str]] = {}
    alias: Dict[str, str] = {}  # tensor -> the name its consumers read now

    dims = {t.name: list(t.dims) for t in g.initializer}
    for init, (qname, enc) in plan.params.items():
        dq = builder.qdq(init, enc, init, shape=dims.get(init))
        _rewire(consumers.get(init, []), init, dq)
        alias[init] = dq
        dq_of[qname] = [dq]
    graph_outputs = {o.name for o in g.output}
    for tensor, (qname, enc) in plan.tensors.items():
        users = consumers.get(tensor, [])
        if tensor in graph_outputs:
            source = f"{tensor}_float"
            for node in g.node:
                for i, name in enumerate(node.output):
                    if name == tensor:
                        node.output[i] = source
            dq = builder.qdq(source, enc, tensor, final=tensor)
            _rewire(users, tensor, dq)
        else:
            dq = builder.qdq(tensor, enc, tensor)
            _rewire(users, tensor, dq)
        alias[tensor] = dq
        if qname is not None:
            dq_of.setdefault(qname, []).append(dq)
    for qname, edges in plan.edges.items():
        for tensor, nodes, enc in edges:
            current = alias.get(tensor, tensor)
            dq = builder.qdq(current, enc, f"{tensor}/{qname}")
            _rewire([original_nodes[i] for i in nodes], current, dq)
            dq_of.setdefault(qname, []).append(dq)
    g.node.extend(builder.nodes)
    g.initializer.extend(builder.initializers)
    _toposort(g)
    _set_opset(out, opset)
    for prop in list(out.metadata_props):
        if prop.key == QDQ_MAP_KEY:
            out.metadata_props.remove(prop)
    out.metadata_props.add(key=QDQ_MAP_KEY, value=json.dumps(dq_of, sort_keys=True))
    return out


def _rewire(nodes: List[onnx.NodeProto], old: str, new: str) -> None:
    for node in nodes:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new


class _Names:
    """Fresh names for a graph: none that an initializer, node, node output or graph input has."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self._taken = {i.name for i in graph.initializer} | {n.name for n in graph.node}
        for node in graph.node:
            self._taken.update(node.output)
        self._taken.update(i.name for i in graph.input)

    def unique(self, name: str) -> str:
        """``name``, or ``name_<k>`` with the first free ``k``; reserved from now on."""
        candidate, k = name, 1
        while candidate in self._taken:
            candidate, k = f"{name}_{k}", k + 1
        self._taken.add(candidate)
        return candidate


class _Builder:
    """Creates QDQ nodes and their scale / zero-point initializers with unique names."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.nodes: List[onnx.NodeProto] = []
        self.initializers: List[onnx.TensorProto] = []
        self._unique = _Names(graph).unique

    def qdq(self, source: str, enc: Encoding, base: str, final: Optional[str] = None,
            shape: Optional[List[int]] = None) -> str:
        """Append the pair (or the fp16 casts) reading ``source`` (of ``shape``, needed for
        per-block encodings); return the output name."""
        if enc.is_float:
            return self._fp16(source, base, final)
        qmin, qmax = enc.qmin, enc.qmax
        signed = qmin < 0
        elem = _TYPES[(enc.bitwidth, signed)]
        scale_t, zp_t = enc.scale, -enc.offset
        dims = [scale_t.numel()] if enc.per_channel else []
        axis = {"axis": int(enc.axis)} if enc.per_channel else {}
        if enc.per_block:
            scale_t, zp_t, dims = _blocked(enc, base, shape)
            axis = {"axis": 1, "block_size": int(enc.block_size)}
        zp_values = [int(v) for v in zp_t.reshape(-1).tolist()]
        scale_values = [float(v) for v in scale_t.reshape(-1).tolist()]
        scale = self._unique(f"{base}_scale")
        zp = self._unique(f"{base}_zero_point")
        self.initializers.append(helper.make_tensor(scale, TensorProto.FLOAT, dims, scale_values))
        self.initializers.append(helper.make_tensor(zp, elem, dims, zp_values))
        q_out = self._unique(f"{base}_quantized")
        type_lo = -(2 ** (enc.bitwidth - 1)) if signed else 0
        type_hi = 2 ** (enc.bitwidth - 1) - 1 if signed else 2 ** enc.bitwidth - 1
        narrow = qmin > type_lo or qmax < type_hi
        dq_out = final if final is not None and not narrow else self._unique(f"{base}_dequantized")
        self.nodes.append(helper.make_node("QuantizeLinear", [source, scale, zp], [q_out],
                                           name=self._unique(f"{base}_QuantizeLinear"), **axis))
        self.nodes.append(helper.make_node("DequantizeLinear", [q_out, scale, zp], [dq_out],
                                           name=self._unique(f"{base}_DequantizeLinear"), **axis))
        if not narrow:
            return dq_out
        return self._clip(dq_out, enc, base, final)

    def _clip(self, source: str, enc: Encoding, base: str, final: Optional[str]) -> str:
        """Clip to the encoding's grid (narrower than the integer type)."""
        if enc.per_channel or enc.per_block:
            raise ExportError(
                f"{base}: a per-channel encoding on a grid narrower than its ONNX type "
                f"([{enc.qmin}, {enc.qmax}] at {enc.bitwidth} bits, e.g. strict symmetric) has "
                "no QDQ form; use the full grid for per-channel quantizers")
        lo = self._unique(f"{base}_grid_min")
        hi = self._unique(f"{base}_grid_max")
        self.initializers.append(helper.make_tensor(lo, TensorProto.FLOAT, [], [float(enc.min)]))
        self.initializers.append(helper.make_tensor(hi, TensorProto.FLOAT, [], [float(enc.max)]))
        out = final if final is not None else self._unique(f"{base}_clipped")
        self.nodes.append(helper.make_node("Clip", [source, lo, hi], [out],
                                           name=self._unique(f"{base}_Clip")))
        return out

    def _fp16(self, source: str, base: str, final: Optional[str]) -> str:
        lo = self._unique(f"{base}_fp16_min")
        hi = self._unique(f"{base}_fp16_max")
        self.initializers.append(helper.make_tensor(lo, TensorProto.FLOAT, [], [-_FP16_MAX]))
        self.initializers.append(helper.make_tensor(hi, TensorProto.FLOAT, [], [_FP16_MAX]))
        clipped = self._unique(f"{base}_fp16_clipped")
        half = self._unique(f"{base}_fp16")
        out = final if final is not None else self._unique(f"{base}_fp16_float")
        self.nodes.append(helper.make_node("Clip", [source, lo, hi], [clipped],
                                           name=self._unique(f"{base}_Clip")))
        self.nodes.append(helper.make_node("Cast", [clipped], [half], to=TensorProto.FLOAT16,
                                           name=self._unique(f"{base}_CastToFloat16")))
        self.nodes.append(helper.make_node("Cast", [half], [out], to=TensorProto.FLOAT,
                                           name=self._unique(f"{base}_CastToFloat")))
        return out


def _blocked(enc: Encoding, base: str, shape: Optional[List[int]]):
    """``(scale, zero point, dims)`` of a blocked Q/DQ pair (axis 1) for a weight of ``shape``:
    ONNX gives the scale the weight's rank, one value per block of dimension 1 and per index of
    every other dimension, so a sim block (all of a Conv kernel's spatial positions) repeats
    its scale over the trailing dims."""
    if shape is None or len(shape) < 2 or shape[1] != enc.scale.shape[1] * enc.block_size \
            or shape[0] != enc.scale.shape[0]:
        raise ExportError(
            f"{base}: a per-block encoding ({tuple(enc.scale.shape)} blocks of "
            f"{enc.block_size}) fits only a weight initializer of shape (C, blocks x "
            f"block_size, ...), got {shape}")
    trailing = [1] * (len(shape) - 2)
    full = list(enc.scale.shape) + list(shape[2:])
    scale = enc.scale.reshape(list(enc.scale.shape) + trailing).expand(full)
    zero_point = (-enc.offset).reshape(list(enc.scale.shape) + trailing).expand(full)
    return scale, zero_point, full


#: the 4-bit ONNX types and their integer grids
_FOUR_BIT = {TensorProto.INT4: (-8, 7), TensorProto.UINT4: (0, 15)}


def container_grid(qmin: int, qmax: int) -> Tuple[int, int]:
    """The code range of the 8-bit ONNX type that stores the integer grid ``[qmin, qmax]``:
    uint8's ``(0, 255)`` for a grid without negative codes, int8's ``(-128, 127)`` otherwise.

    A narrower grid (4 bits) keeps its values in that container when the tensor is first
    clamped to :func:`grid_bounds`. This is the one rule for 4-bit pairs in 8-bit containers:
    :func:`widen_4bit_pairs` applies it to a QDQ model, the QAT modules' export
    (:mod:`quantsim.export.qat_onnx`) while tracing.

    Raises:
        ExportError: the grid does not fit 8 bits.
    """
    container = (0, 255) if qmin >= 0 else (-128, 127)
    if qmin < container[0] or qmax > container[1]:
        raise ExportError(f"the integer grid [{qmin}, {qmax}] does not fit an 8-bit ONNX "
                          "QuantizeLinear; only grids of up to 8 bits have an 8-bit container")
    return container


def grid_bounds(scale: Any, zero_point: Any, qmin: int, qmax: int, ndim: int = 0,
                axis: Optional[int] = None) -> Tuple[Any, Any]:
    """The real values of the end codes of the grid ``[qmin, qmax]``:
    ``(scale * (qmin - zero_point), scale * (qmax - zero_point))``, what a tensor is clamped to
    before the QuantizeLinear of an 8-bit container (:func:`container_grid`).

    Args:
        scale, zero_point: numpy arrays or torch tensors (ONNX's zero point, ``-offset``), 0-d
            or 1-d per channel.
        qmin, qmax: the grid.
        ndim, axis: for a per-channel scale, the rank of the quantized tensor and its channel
            axis; the bounds are shaped to broadcast along it.
    """
    lo, hi = scale * (qmin - zero_point), scale * (qmax - zero_point)
    if axis is not None and lo.ndim == 1:
        shape = [1] * ndim
        shape[axis] = -1
        lo, hi = lo.reshape(shape), hi.reshape(shape)
    return lo, hi


def widen_4bit_pairs(model: onnx.ModelProto, opset: int = 20) -> int:
    """Store the 4-bit Q/DQ pairs of a QDQ model in 8-bit containers, with the same values.

    Each int4/uint4 zero point becomes int8/uint8 (:func:`container_grid`); the 16-level range
    is kept by clamping to :func:`grid_bounds`: a weight initializer is clamped to its
    (per-channel) grid range, an activation gets a ``Clip`` before its ``QuantizeLinear``.
    ONNX Runtime 1.32 then loads the model at every optimisation level (it refuses a uint4
    MaxPool input at opset 21), at ``opset`` when no other type needs 21.

    Returns:
        The number of pairs widened.
    """
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    names = _Names(g)
    widened, zero_points = 0, set()
    for node in list(g.node):
        zp = inits.get(node.input[2]) if node.op_type == "QuantizeLinear" and len(node.input) > 2 else None
        if zp is None or zp.data_type not in _FOUR_BIT:
            continue
        qmin, qmax = _FOUR_BIT[zp.data_type]
        scale = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
        zero = numpy_helper.to_array(zp).astype(np.float32)
        source = inits.get(node.input[0])
        if source is not None:
            w = numpy_helper.to_array(source)
            axis = None
            if scale.ndim:
                axis = next((a.i for a in node.attribute if a.name == "axis"), 1) % w.ndim
            lo, hi = grid_bounds(scale, zero, qmin, qmax, w.ndim, axis)
            block = next((a.i for a in node.attribute if a.name == "block_size"), 0)
            if block:  # blocked pair: one bound per block, spread over its elements
                lo, hi = np.repeat(lo, block, axis=axis), np.repeat(hi, block, axis=axis)
            name = names.unique(f"{node.input[0]}_clamped")
            g.initializer.append(numpy_helper.from_array(np.clip(w, lo, hi).astype(w.dtype), name))
            node.input[0] = name
        else:
            if scale.size != 1:
                raise ExportError(f"{node.name}: a per-channel 4-bit activation has no 8-bit form")
            lo, hi = grid_bounds(scale, zero, qmin, qmax)
            lo_n, hi_n = names.unique(f"{node.name}_min"), names.unique(f"{node.name}_max")
            out = names.unique(f"{node.input[0]}_clipped4")
            g.initializer.extend([numpy_helper.from_array(np.float32(lo.reshape(())), lo_n),
                                  numpy_helper.from_array(np.float32(hi.reshape(())), hi_n)])
            g.node.append(helper.make_node("Clip", [node.input[0], lo_n, hi_n], [out],
                                           name=names.unique(f"{node.name}_Clip4")))
            node.input[0] = out
        zero_points.add(zp.name)
        widened += 1
    for name in zero_points:
        old = inits[name]
        signed = container_grid(*_FOUR_BIT[old.data_type])[0] < 0
        values = numpy_helper.to_array(old).astype(np.int32)
        old.CopyFrom(helper.make_tensor(name, _TYPES[(8, signed)], list(old.dims),
                                        values.reshape(-1).tolist()))
    _toposort(g)  # the Clips were appended; they must run before their QuantizeLinear
    quantized = {n.output[0] for n in g.node if n.op_type == "QuantizeLinear"}
    for v in [v for v in g.value_info if v.name in quantized]:
        g.value_info.remove(v)
    wide_types = {TensorProto.INT4, TensorProto.UINT4, TensorProto.INT16, TensorProto.UINT16}
    blocked = any(a.name == "block_size" for n in g.node for a in n.attribute)
    if widened and not blocked and not any(t.data_type in wide_types for t in g.initializer):
        _set_opset(model, max(13, opset))  # (blocked pairs exist from opset 21 only)
    return widened


def _toposort(graph: onnx.GraphProto) -> None:
    """Order nodes so every input is produced before use (stable: original order otherwise)."""
    nodes = list(graph.node)
    produced_by: Dict[str, int] = {}
    for i, node in enumerate(nodes):
        for out in node.output:
            produced_by[out] = i
    deps = [{produced_by[n] for n in node.input if n in produced_by} for node in nodes]
    users: Dict[int, List[int]] = {}
    for i, ds in enumerate(deps):
        for d in ds:
            users.setdefault(d, []).append(i)
    remaining = [len(ds) for ds in deps]
    ready = [i for i, r in enumerate(remaining) if r == 0]
    heapq.heapify(ready)
    order: List[int] = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for u in users.get(i, []):
            remaining[u] -= 1
            if remaining[u] == 0:
                heapq.heappush(ready, u)
    if len(order) != len(nodes):
        raise ExportError("QDQ insertion produced a cycle in the ONNX graph (internal error)")
    del graph.node[:]
    graph.node.extend(nodes[i] for i in order)


def _set_opset(model: onnx.ModelProto, opset: int) -> None:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            imp.version = opset
            return
    model.opset_import.add(domain="", version=opset)

