"""The ONNX form of the single-operator QAT modules (:mod:`quantsim.nn.qat`): the Q/DQ pairs
they emit while ``torch.onnx.export`` traces them, and the conversion of that export into a
fake-quant and a deploy model.

**Emitting** (:func:`qdq_pair`, called by the modules' quantizers inside ``torch.onnx.export``):
one ``QuantizeLinear``/``DequantizeLinear`` pair per quantized input and weight, carrying the
current scale and zero point; each bias already lies on its int32 grid. Only 8-bit containers
are written: a 4-bit grid is stored in the 8-bit container of its sign after a clamp to its own
range (:func:`quantsim.export.qdq.container_grid` / :func:`~quantsim.export.qdq.grid_bounds`,
the rule :func:`~quantsim.export.qdq.widen_4bit_pairs` applies to a sim's QDQ model).

**Converting** (:func:`convert_qat_model`) writes:

* ``<prefix>_fake_quant_model.onnx``: the exported graph with every constant sub-graph (the
  scale arithmetic the TorchScript exporter leaves unfolded) evaluated into initializers;
  float weights, QDQ everywhere; symmetric weights use uint8 codes with zero point 128 by
  default (same values as int8; see :func:`convert_qat_model`). It simulates the quantized
  model in ONNX Runtime.
* ``<prefix>_deploy_model.onnx``: the same graph with each weight stored as its integer codes
  (int8 by default) feeding a ``DequantizeLinear``, and each bias of a Conv/ConvTranspose/Gemm
  whose input and weight are quantized stored as int32 codes with scale
  ``input_scale * weight_scale``. ORT fuses such groups into integer kernels where it can.

Both are saved with embedded weights (no external data), pass ``onnx.checker`` and are loaded
once in ONNX Runtime before returning. Integer codes come from :func:`quantsim.encoding.quantize`.
``quantsim.qat_convert`` is this module's former name and still imports from it.
"""
from __future__ import annotations

import os
import warnings
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import onnx
import torch
from google.protobuf.message import DecodeError
from onnx import helper, numpy_helper

from quantsim.encoding import quantize
from quantsim.errors import ExportError
from quantsim.export.qdq import container_grid, grid_bounds

#: ops never evaluated at conversion time (the QDQ pairs themselves; random ops).
_NEVER_FOLD = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "RandomNormal",
               "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
               "Bernoulli"}
#: layers whose float bias the deploy model stores as int32 codes.
_BIAS_OPS = ("Conv", "ConvTranspose", "Gemm")
#: weight code dtypes the converter writes.
WEIGHT_DTYPES = ("int8", "uint8")
FAKE_QUANT_SUFFIX = "_fake_quant_model.onnx"
DEPLOY_SUFFIX = "_deploy_model.onnx"


# ----------------------------------------------------------------------------------------------
# the pairs the QAT modules emit while torch.onnx.export traces them
# ----------------------------------------------------------------------------------------------
def qdq_pair(
    x: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor,
    qmin: int,
    qmax: int,
    axis: Optional[int] = None,
) -> torch.Tensor:
    """Export-time form of :func:`quantsim.encoding.fake_quantize`: a QuantizeLinear /
    DequantizeLinear pair in the ONNX graph (call it only inside ``torch.onnx.export``).

    * dynamo exporter (``torch.onnx.export(..., dynamo=True)``, the default): the two ONNX nodes
      are emitted directly with ``torch.onnx.ops.symbolic`` (works with dynamic shapes);
    * TorchScript exporter (``dynamo=False``): torch's ``fake_quantize_per_{tensor,channel}_affine``,
      which that exporter turns into the same pair.

    The ONNX zero point is ``-offset``. Only 8-bit containers are written (TOOLCHAIN §3: ORT
    loads opset <= 20 QDQ graphs at every optimization level): a narrower grid (INT4) goes into
    the 8-bit container of its sign (:func:`~quantsim.export.qdq.container_grid`) after a clamp
    to the grid's real range (:func:`~quantsim.export.qdq.grid_bounds`), so the pair computes
    exactly the narrow fake-quant.

    Args:
        x: the tensor to quantize.
        scale, offset: 0-d (per tensor) or 1-d along ``axis``, without gradient.
        qmin, qmax: the internal grid (see :func:`quantsim.encoding.integer_grid`).
        axis: channel axis of ``x`` for per-channel encodings.

    Raises:
        ExportError: the grid does not fit an 8-bit container.
    """
    container = container_grid(qmin, qmax)
    zero_point = torch.round(-offset)
    if (qmin, qmax) != container:
        x = torch.clamp(x, *grid_bounds(scale, zero_point, qmin, qmax, x.dim(), axis))
    if torch.jit.is_tracing():  # the TorchScript exporter
        zp = zero_point.to(torch.int32)
        if axis is None:
            return torch.fake_quantize_per_tensor_affine(x, scale, zp, *container)
        return torch.fake_quantize_per_channel_affine(x, scale, zp, axis, *container)
    qdtype = torch.uint8 if container[0] == 0 else torch.int8
    zp = zero_point.to(qdtype)
    scale = scale.to(x.dtype)
    attrs = {} if axis is None else {"axis": axis}
    q = torch.onnx.ops.symbolic("QuantizeLinear", (x, scale, zp), attrs, dtype=qdtype,
                                shape=x.shape)
    return torch.onnx.ops.symbolic("DequantizeLinear", (q, scale, zp), attrs, dtype=x.dtype,
                                   shape=x.shape)


# ----------------------------------------------------------------------------------------------
# the converter
# ----------------------------------------------------------------------------------------------
class ConvertedQATModel(NamedTuple):
    """Paths written by :func:`convert_qat_model` (unpacks as ``fake_quant, deploy``)."""

    fake_quant_path: str
    deploy_path: str


# ----------------------------------------------------------------------------------------------
# small graph helpers
# ----------------------------------------------------------------------------------------------
def _initializers(graph: onnx.GraphProto) -> Dict[str, onnx.TensorProto]:
    return {t.name: t for t in graph.initializer}


def _consumers(graph: onnx.GraphProto) -> Dict[str, List[onnx.NodeProto]]:
    out: Dict[str, List[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            out.setdefault(name, []).append(node)
    return out


def _producers(graph: onnx.GraphProto) -> Dict[str, onnx.NodeProto]:
    return {o: node for node in graph.node for o in node.output}


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _unique(graph: onnx.GraphProto, base: str) -> str:
    taken = {t.name for t in graph.initializer} | {o for n in graph.node for o in n.output}
    taken |= {i.name for i in graph.input}
    name, k = base, 1
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    return name


def _set_nodes(graph: onnx.GraphProto, nodes: Sequence[onnx.NodeProto]) -> None:
    """Replace the node list (copies first: references into a repeated field are fragile)."""
    copies = []
    for node in nodes:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copies.append(copy)
    del graph.node[:]
    graph.node.extend(copies)


def _prune(graph: onnx.GraphProto) -> None:
    """Drop nodes and initializers nothing reaches from the graph outputs."""
    live = {o.name for o in graph.output}
    keep: List[onnx.NodeProto] = []
    for node in reversed(graph.node):
        if any(o in live for o in node.output):
            keep.append(node)
            live.update(i for i in node.input if i)
    _set_nodes(graph, keep[::-1])
    inits = [t for t in graph.initializer if t.name in live]
    del graph.initializer[:]
    graph.initializer.extend(inits)
    vis = [v for v in graph.value_info if v.name in live]
    del graph.value_info[:]
    graph.value_info.extend(vis)


# ----------------------------------------------------------------------------------------------
# constant folding of the sub-graphs the exporter left (TorchScript exports, optimize=False)
# ----------------------------------------------------------------------------------------------
def fold_constants(model: onnx.ModelProto) -> int:
    """Evaluate every node whose inputs are all constant (Q/DQ nodes excepted) into initializers.

    The TorchScript exporter leaves the scale arithmetic of the QAT quantizers as ops on
    initializers; this makes every Q/DQ scale and zero point a plain initializer. Evaluated with
    ``onnx.reference`` (numpy float32, the same IEEE operations torch ran).

    Returns:
        The number of nodes folded.
    """
    from onnx.reference import ReferenceEvaluator

    graph = model.graph
    nodes = list(graph.node)
    const = {t.name for t in graph.initializer}
    outputs = {o.name for o in graph.output}
    folded_at = []
    for k, node in enumerate(nodes):
        if (node.op_type in _NEVER_FOLD or node.domain not in ("", "ai.onnx")
                or any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                       for a in node.attribute)
                or any(o in outputs for o in node.output)):
            continue
        if all(i == "" or i in const for i in node.input):
            folded_at.append(k)
            const.update(o for o in node.output if o)
    if not folded_at:
        return 0
    folded = [nodes[k] for k in folded_at]
    skip = set(folded_at)
    rest = [n for k, n in enumerate(nodes) if k not in skip]
    produced = {o for n in folded for o in n.output if o}
    needed = sorted({i for n in rest for i in n.input if i in produced})
    if needed:
        used = {i for n in folded for i in n.input}
        sub = helper.make_graph(
            folded, "fold", [], [helper.make_empty_tensor_value_info(n) for n in needed],
            [t for t in graph.initializer if t.name in used])
        sub_model = helper.make_model(sub, opset_imports=list(model.opset_import),
                                      ir_version=model.ir_version)
        values = ReferenceEvaluator(sub_model).run(needed, {})
        for name, value in zip(needed, values):
            graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
    _set_nodes(graph, rest)
    _prune(graph)
    return len(folded_at)


# ----------------------------------------------------------------------------------------------
# QDQ discovery and the deploy rewrite
# ----------------------------------------------------------------------------------------------
class _WeightQDQ(NamedTuple):
    quant: onnx.NodeProto
    dequants: List[onnx.NodeProto]


def _qdq_pairs(graph: onnx.GraphProto) -> Tuple[List[_WeightQDQ], int]:
    """Weight Q/DQ pairs (Q input is a float initializer) and the number of activation pairs."""
    inits = _initializers(graph)
    consumers = _consumers(graph)
    weights, activations = [], 0
    for node in graph.node:
        if node.op_type != "QuantizeLinear":
            continue
        users = consumers.get(node.output[0], [])
        if not users or any(u.op_type != "DequantizeLinear" for u in users):
            continue
        src = inits.get(node.input[0])
        if src is not None and src.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16,
                                                 onnx.TensorProto.DOUBLE):
            weights.append(_WeightQDQ(node, users))
        else:
            activations += 1
    return weights, activations


def _qparams(graph: onnx.GraphProto, node: onnx.NodeProto, ndim: int):
    """(scale, zero_point, axis or None) of a Q/DQ node whose parameters are initializers."""
    inits = _initializers(graph)
    if node.input[1] not in inits or (len(node.input) > 2 and node.input[2]
                                      and node.input[2] not in inits):
        raise ExportError(
            f"convert_qat_model: {node.op_type} {node.name!r} has a scale or zero point that is "
            "not a constant; export the model in eval mode with torch.onnx.export"
        )
    scale = numpy_helper.to_array(inits[node.input[1]])
    zp = (numpy_helper.to_array(inits[node.input[2]]) if len(node.input) > 2 and node.input[2]
          else np.zeros_like(scale, dtype=np.uint8))
    if scale.size == 1:  # the TorchScript exporter writes per-tensor parameters as shape (1,)
        return scale.reshape(()), zp.reshape(()), None
    return scale, zp, _attr(node, "axis", 1) % max(ndim, 1)


def _integer_codes(x: np.ndarray, scale: np.ndarray, zp: np.ndarray, axis: Optional[int],
                   dtype: np.dtype) -> np.ndarray:
    """``QuantizeLinear(x, scale, zp)`` as numpy codes of ``dtype``, via encoding.quantize."""
    info = np.iinfo(dtype)
    codes = quantize(torch.tensor(np.asarray(x, dtype=np.float32)),
                     torch.tensor(np.asarray(scale, dtype=np.float32)),
                     -torch.tensor(np.asarray(zp, dtype=np.float64)),
                     int(info.min), int(info.max), axis)
    return codes.numpy().astype(dtype)


def _unsigned_weight_zero_point(graph: onnx.GraphProto, pair: _WeightQDQ) -> None:
    """Give a signed weight Q/DQ pair the uint8 zero point ``zp + 128`` (same real values).

    ORT's fused U8S8 integer kernels saturate int16 partial sums on x86 CPUs without VNNI
    (AVX2 ``vpmaddubsw``); U8U8 kernels do not, so uint8 weights run correctly everywhere.
    """
    inits = _initializers(graph)
    w = numpy_helper.to_array(inits[pair.quant.input[0]])
    scale, zp, _ = _qparams(graph, pair.quant, w.ndim)
    if zp.dtype != np.int8:
        return
    name = _unique(graph, pair.quant.input[0] + "_zero_point_u8")
    graph.initializer.append(numpy_helper.from_array((zp.astype(np.int16) + 128).astype(np.uint8),
                                                     name))
    for node in [pair.quant, *pair.dequants]:
        while len(node.input) < 3:
            node.input.append("")
        node.input[2] = name
    stale = [v for v in graph.value_info if v.name == pair.quant.output[0]]  # typed int8
    for v in stale:
        graph.value_info.remove(v)


def _store_weight_codes(graph: onnx.GraphProto, pair: _WeightQDQ) -> None:
    inits = _initializers(graph)
    w = numpy_helper.to_array(inits[pair.quant.input[0]])
    scale, zp, axis = _qparams(graph, pair.quant, w.ndim)
    name = _unique(graph, pair.quant.input[0] + "_quantized")
    graph.initializer.append(numpy_helper.from_array(_integer_codes(w, scale, zp, axis, zp.dtype),
                                                     name))
    for dq in pair.dequants:
        dq.input[0] = name  # the QuantizeLinear is now dead; _prune drops it


def _bias_axis(node: onnx.NodeProto) -> int:
    """Axis of the layer's weight that holds its output channels."""
    if node.op_type == "ConvTranspose":
        return 1
    if node.op_type == "Gemm":
        return 0 if _attr(node, "transB", 0) else 1
    return 0


def _quantize_bias(graph: onnx.GraphProto, node: onnx.NodeProto) -> Optional[onnx.NodeProto]:
    """Store the float bias of a quantized layer as int32 codes; return the DequantizeLinear.

    The caller inserts the returned node (inserting here would move the node references the
    caller iterates over).
    """
    inits, producers = _initializers(graph), _producers(graph)
    if len(node.input) < 3 or node.input[2] not in inits:
        return None
    x_dq, w_dq = producers.get(node.input[0]), producers.get(node.input[1])
    if not (x_dq and w_dq and x_dq.op_type == w_dq.op_type == "DequantizeLinear"
            and w_dq.input[0] in inits):
        return None
    s_x, _, x_axis = _qparams(graph, x_dq, 0)
    w_codes = inits[w_dq.input[0]]
    s_w, _, w_axis = _qparams(graph, w_dq, len(w_codes.dims))
    if x_axis is not None or (w_axis is not None and (
            w_axis != _bias_axis(node) or _attr(node, "group", 1) != 1)):
        return None
    bias = numpy_helper.to_array(inits[node.input[2]])
    bias_scale = (np.float32(s_x) * s_w.astype(np.float32)).astype(np.float32)
    zp = np.zeros_like(bias_scale, dtype=np.int32)
    codes = _integer_codes(bias, bias_scale, zp, 0 if bias_scale.ndim else None, np.int32)
    base = node.input[2]
    names = [_unique(graph, f"{base}_quantized"), _unique(graph, f"{base}_scale"),
             _unique(graph, f"{base}_zero_point")]
    for name, value in zip(names, (codes, bias_scale, zp)):
        graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
    out = _unique(graph, f"{base}_dequantized")
    attrs = {"axis": 0} if bias_scale.ndim else {}
    node.input[2] = out
    return helper.make_node("DequantizeLinear", names, [out], name=out, **attrs)


def _to_deploy(model: onnx.ModelProto, weights: Sequence[_WeightQDQ],
               quantize_bias: bool) -> Tuple[int, int]:
    graph = model.graph
    for pair in weights:
        _store_weight_codes(graph, pair)
    if not quantize_bias:
        return len(weights), 0
    bias_nodes = [dq for dq in (_quantize_bias(graph, n) for n in graph.node
                                if n.op_type in _BIAS_OPS) if dq is not None]
    _set_nodes(graph, bias_nodes + list(graph.node))  # they read initializers only: go first
    return len(weights), len(bias_nodes)


# ----------------------------------------------------------------------------------------------
# the public entry point
# ----------------------------------------------------------------------------------------------
def _save_checked(model: onnx.ModelProto, path: str, verify: bool) -> None:
    onnx.save_model(model, path, save_as_external_data=False)
    try:
        onnx.checker.check_model(path, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"convert_qat_model: {path} fails onnx.checker: {exc}") from exc
    if verify:
        import onnxruntime as ort

        try:
            ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - any load failure is reported the same way
            raise ExportError(
                f"convert_qat_model: ONNX Runtime cannot load {path} with default options: "
                f"{exc}. (Opset-21 QDQ graphs hit an ORT bug at the default optimisation level; "
                "export at opset <= 20.)"
            ) from exc


def _tag(model: onnx.ModelProto, kind: str) -> None:
    for p in list(model.metadata_props):
        if p.key == "quantsim.qat_convert":
            model.metadata_props.remove(p)
    helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props},
                                   "quantsim.qat_convert": kind})


def _check_dtype(value: str, where: str) -> str:
    if value not in WEIGHT_DTYPES:
        raise ExportError(f"convert_qat_model: {where}={value!r} is not supported; allowed: "
                          f"{list(WEIGHT_DTYPES)}")
    return value


def _cpu_lacks_vnni() -> bool:
    """Best effort: an x86 Linux CPU with AVX2 but no VNNI (ORT's U8S8 kernels saturate)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(next((ln for ln in f if ln.startswith("flags")), "").split())
    except OSError:
        return False
    return "avx2" in flags and not flags & {"avx512_vnni", "avx_vnni", "amx_int8"}


def convert_qat_model(
    onnx_path: Union[str, os.PathLike, onnx.ModelProto],
    save_prefix: Union[str, os.PathLike],
    deploy_weight_dtype: str = "int8",
    fake_quant_weight_dtype: str = "uint8",
    quantize_bias: bool = True,
    verify: bool = True,
) -> ConvertedQATModel:
    """Write the fake-quant and deploy ONNX models of an exported QAT model.

    Symmetric weights are exported as int8 codes with zero point 0. The same real values can be
    stored as uint8 codes with zero point 128: ONNX Runtime's fused U8S8 kernels (uint8
    activations x int8 weights) saturate on x86 CPUs without VNNI (AVX2 only) and give wrong
    results there, while its U8U8 kernels are exact everywhere. Hence the defaults: the
    fake-quant model (ORT accuracy simulation) uses uint8 weights, the deploy model int8.

    Args:
        onnx_path: the file ``torch.onnx.export`` wrote for a model holding QAT modules (in
            eval mode, quantization on), or the loaded ``ModelProto``. Either exporter works;
            ``dynamo=True`` (the default) keeps the parameter names.
        save_prefix: path prefix; parent folders are created.
        deploy_weight_dtype: ``'int8'`` (zero point 0) or ``'uint8'`` (zero point 128) codes
            in the deploy model; use ``'uint8'`` to run it in ORT on a CPU without VNNI.
        fake_quant_weight_dtype: the same choice for the weight Q/DQ pairs of the fake-quant
            model.
        quantize_bias: store the bias of each Conv/ConvTranspose/Gemm whose input and weight
            are quantized as int32 codes (scale ``input_scale * weight_scale``) in the deploy
            model, as integer kernels (and ORT's fused QLinearConv) use it; False keeps it
            float.
        verify: load both files in ONNX Runtime (default options) before returning.

    Returns:
        ``(fake_quant_path, deploy_path)``: ``<prefix>_fake_quant_model.onnx`` and
        ``<prefix>_deploy_model.onnx``.

    Raises:
        ExportError: ``onnx_path`` is missing or not an ONNX model, no Q/DQ pair in the model
            (quantization was off, or no QAT module), a non-constant weight scale, a bad dtype,
            a file that fails ``onnx.checker`` or ORT.

    Example:
        >>> # torch.onnx.export(model.eval(), (x,), "m.onnx", external_data=False)
        >>> # fake_quant, deploy = convert_qat_model("m.onnx", "out/m")
    """
    _check_dtype(deploy_weight_dtype, "deploy_weight_dtype")
    _check_dtype(fake_quant_weight_dtype, "fake_quant_weight_dtype")
    if isinstance(onnx_path, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(onnx_path)
    else:
        if not isinstance(onnx_path, (str, os.PathLike)) or not os.path.isfile(onnx_path):
            raise ExportError(f"convert_qat_model: no such ONNX file: {onnx_path!r}")
        try:
            model = onnx.load(os.fspath(onnx_path))
        except DecodeError as exc:
            raise ExportError(f"convert_qat_model: {onnx_path} is not an ONNX model (protobuf "
                              f"cannot parse it: {exc})") from exc
        if not model.HasField("graph"):  # an empty file parses as an empty ModelProto
            raise ExportError(f"convert_qat_model: {onnx_path} is not an ONNX model (no graph)")
    fold_constants(model)
    weights, activations = _qdq_pairs(model.graph)
    if not weights and not activations:
        raise ExportError(
            "convert_qat_model: the model has no QuantizeLinear/DequantizeLinear pair; export a "
            "model holding QAT modules with quantization on (module.quantize=True, outside "
            "quantization_disabled)"
        )
    if deploy_weight_dtype == "int8" and weights and _cpu_lacks_vnni():
        warnings.warn(
            "convert_qat_model: this CPU has AVX2 but no VNNI; ONNX Runtime's fused U8S8 "
            "kernels saturate here, so the int8 deploy model may disagree with the simulation "
            "when run in ORT on this machine (pass deploy_weight_dtype='uint8' to run it here)",
            stacklevel=2,
        )
    prefix = os.fspath(save_prefix)
    if os.path.dirname(prefix):
        os.makedirs(os.path.dirname(prefix), exist_ok=True)
    paths = ConvertedQATModel(prefix + FAKE_QUANT_SUFFIX, prefix + DEPLOY_SUFFIX)

    deploy = onnx.ModelProto()
    deploy.CopyFrom(model)
    for target, dtype, kind in ((model, fake_quant_weight_dtype, "fake_quant"),
                                (deploy, deploy_weight_dtype, "deploy")):
        pairs, _ = _qdq_pairs(target.graph)
        if dtype == "uint8":
            for pair in pairs:
                _unsigned_weight_zero_point(target.graph, pair)
        if kind == "deploy":
            _to_deploy(target, _qdq_pairs(target.graph)[0], quantize_bias)
        _prune(target.graph)
        _tag(target, kind)
        _save_checked(target, paths.fake_quant_path if kind == "fake_quant" else paths.deploy_path,
                      verify)
    return paths
