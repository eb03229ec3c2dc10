"""Check a QDQ ONNX model against an encodings file, without the sim (``quantsim verify``).

:func:`check_qdq_model` pairs every ``QuantizeLinear`` / ``DequantizeLinear`` of the model with
the file's encoding of the tensor it quantizes and checks two things:

* **statically**, that the pair's scale and zero point are the encoding's: scales equal as
  float32 numbers, zero points equal to ``-offset``, and an element type that holds the
  encoding's grid (``intB`` for a signed grid, ``uintB`` for an unsigned one; a 4-bit grid may
  sit in an 8-bit container, :func:`quantsim.export.qdq.container_grid`);
* **at run time** (ONNX Runtime, CPU, optimizations disabled, on the given or seeded random
  inputs), that every value the pair's consumers read lies on the encoding's grid: an integer
  code ``v / scale - offset`` within ``[qmin, qmax]``.

The tensor a pair quantizes is found by walking back from its ``QuantizeLinear`` input through
what the QDQ exporter inserts (``Clip`` of a narrow or 4-bit grid, an earlier pair on the same
tensor, a graph output renamed ``<name>_float``, a 4-bit weight clamped into
``<name>_clamped``), and through the data-movement map the export stores in the model
(``quantsim.quantizers`` metadata) for tensors the file does not list.

Example:
    >>> report = check_qdq_model("out/model_qdq.onnx", "out/model.encodings")  # doctest: +SKIP
    >>> report.ok, len(report.pairs)                                            # doctest: +SKIP
    (True, 12)
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Tuple, Union

import numpy as np
import onnx
from onnx import numpy_helper

from quantsim.encoding import Encoding
from quantsim.encodings import EncodingsFile, PathLike, load
from quantsim.errors import EncodingsError, ExportError
from quantsim.export.onnx_export import stored_quantizer_map
from quantsim.export.qdq import container_grid
from quantsim.export.verify import run_onnx, with_outputs

#: suffixes the QDQ exporter gives renamed tensors (graph outputs, clamped 4-bit weights)
_RENAMES = ("_float", "_clamped")


@dataclass
class PairCheck:
    """One Q/DQ pair: the tensor it quantizes and what was found wrong (empty: agrees)."""

    node: str
    tensor: Optional[str]
    problems: List[str] = field(default_factory=list)
    elements: int = 0


@dataclass
class GridReport:
    """Result of :func:`check_qdq_model`.

    Attributes:
        pairs: one check per ``QuantizeLinear`` node, graph order.
        unmatched: pairs whose tensor has no encoding in the file (node names).
        unused: file encodings no pair uses (integer ones; int32 biases and fp16 entries have
            no pair by design and are not listed).
        inputs: the model inputs fed, name -> shape.
        general: problems of the model as a whole (no pair matches any encoding).
    """

    pairs: List[PairCheck] = field(default_factory=list)
    unmatched: List[str] = field(default_factory=list)
    unused: List[str] = field(default_factory=list)
    inputs: Dict[str, Tuple[int, ...]] = field(default_factory=dict)
    general: List[str] = field(default_factory=list)

    @property
    def problems(self) -> List[str]:
        """One line per problem: ``<node> (<tensor>): <what>``, then :attr:`general`."""
        return [f"{p.node} ({p.tensor}): {msg}" for p in self.pairs for msg in p.problems] + \
            self.general

    @property
    def ok(self) -> bool:
        """True when every matched pair agrees with the file and keeps its values on the grid."""
        return not self.problems


def check_qdq_model(model: Union[PathLike, onnx.ModelProto],
                    encodings: Union[PathLike, Mapping, EncodingsFile],
                    inputs: Optional[Mapping[str, np.ndarray]] = None,
                    seed: int = 0) -> GridReport:
    """Check ``model``'s Q/DQ pairs against ``encodings`` (module docstring).

    Args:
        model: a QDQ ONNX model (path or loaded).
        encodings: an ONNX-keyed encodings file (0.6.1, 1.0.0 or 2.0.0; path, dict or read).
        inputs: graph input name -> array; missing inputs are drawn from a seeded standard
            normal (floats) or as zeros (integers), symbolic dimensions as 1.
        seed: seed of the random inputs.

    Raises:
        ExportError: the model cannot be read, an input is unknown or has the wrong rank,
            or ONNX Runtime cannot run the model.
        EncodingsError: the encodings file is malformed or module-keyed (``_torch.encodings``
            names modules, not the graph's tensors).
    """
    proto = _load_model(model)
    file = encodings if isinstance(encodings, EncodingsFile) else load(encodings)
    if file.torch_layout:
        raise EncodingsError("a module-keyed _torch.encodings file names modules, not the QDQ "
                             "model's tensors; check the ONNX-keyed <prefix>.encodings instead")
    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    consumers: Dict[str, List[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    tmap = stored_quantizer_map(proto)
    moved = tmap.propagated if tmap is not None else {}
    table = {**file.activation, **file.param}

    report = GridReport()
    readouts: List[Tuple[PairCheck, Encoding, str]] = []  # (check, encoding, tensor to read)
    used = set()
    for node in graph.node:
        if node.op_type != "QuantizeLinear":
            continue
        tensor = _origin(node.input[0], table, producer, moved)
        check = PairCheck(node.name or node.output[0], tensor)
        report.pairs.append(check)
        enc = table.get(tensor) if tensor is not None else None
        if enc is None or enc.is_float:
            report.unmatched.append(check.node)
            continue
        used.add(tensor)
        check.problems += _static_problems(node, enc, inits)
        read = _read_point(node, consumers)
        if read is None:
            check.problems.append("no DequantizeLinear reads this QuantizeLinear")
        else:
            readouts.append((check, enc, read))
    report.unused = [n for n, e in table.items() if n not in used and not e.is_float]
    if not used and report.unused:
        report.general.append(
            f"no QuantizeLinear of the model quantizes a tensor of the encodings file "
            f"({len(report.pairs)} pair(s) in the model); is it the <prefix>_qdq.onnx of the "
            "export that wrote this file?")
    if readouts:
        feeds = _feeds(graph, inits, inputs or {}, seed)
        report.inputs = {k: tuple(v.shape) for k, v in feeds.items()}
        values = _run_model(proto, [r for _, _, r in readouts], feeds)
        for check, enc, read in readouts:
            check.elements = int(values[read].size)
            check.problems += _grid_problems(values[read], enc)
    return report


def _load_model(model: Union[PathLike, onnx.ModelProto]) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    try:
        return onnx.load(os.fspath(model))
    except OSError as exc:
        raise ExportError(f"{model}: cannot read the ONNX model: {exc.strerror or exc}") from exc
    except Exception as exc:  # protobuf's DecodeError: not an ONNX file
        raise ExportError(f"{model}: not an ONNX model ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else 'unreadable'})") from exc


def _origin(name: str, table: Mapping[str, Encoding], producer: Mapping[str, onnx.NodeProto],
            moved: Mapping[str, str]) -> Optional[str]:
    """The file's name for the tensor a ``QuantizeLinear`` input carries (module docstring),
    or None when the file has no encoding for it."""
    seen = set()
    while name not in table:
        if name in seen:
            return None
        seen.add(name)
        node = producer.get(name)
        if node is not None and node.op_type in ("Clip", "QuantizeLinear", "DequantizeLinear"):
            name = node.input[0]
        elif name in moved:
            name = moved[name]
        else:
            base = next((name[: -len(s)] for s in _RENAMES if name.endswith(s)), None)
            if base is None:
                return None
            name = base
    return name


def _array(inits: Mapping[str, onnx.TensorProto], name: str) -> Optional[np.ndarray]:
    t = inits.get(name)
    return None if t is None else numpy_helper.to_array(t)


def _static_problems(node: onnx.NodeProto, enc: Encoding,
                     inits: Mapping[str, onnx.TensorProto]) -> List[str]:
    """Scale, zero point and element type of the pair against ``enc``."""
    scale = _array(inits, node.input[1])
    zp_init = inits.get(node.input[2]) if len(node.input) > 2 else None
    if scale is None:
        return ["the scale is computed in the graph, not an initializer; not checked"]
    out = []
    expected_scale = enc.scale.numpy().astype(np.float32).reshape(-1)
    got_scale = scale.astype(np.float32).reshape(-1)
    if got_scale.shape != expected_scale.shape:
        out.append(f"{got_scale.size} scale(s), the encoding has {expected_scale.size}")
        return out
    if not np.array_equal(got_scale, expected_scale):
        i = int(np.argmax(got_scale != expected_scale))
        out.append(f"scale[{i}] = {float(got_scale[i]):.9g}, the encoding's is "
                   f"{float(expected_scale[i]):.9g}")
    expected_zp = -enc.offset.numpy().astype(np.int64).reshape(-1)
    got_zp = (numpy_helper.to_array(zp_init).astype(np.int64).reshape(-1)
              if zp_init is not None else np.zeros_like(expected_zp))
    if got_zp.shape == expected_zp.shape and not np.array_equal(got_zp, expected_zp):
        i = int(np.argmax(got_zp != expected_zp))
        out.append(f"zero point[{i}] = {int(got_zp[i])}, the encoding's is {int(expected_zp[i])}")
    if zp_init is not None:
        out += _type_problems(zp_init.data_type, enc)
    return out


def _type_problems(elem: int, enc: Encoding) -> List[str]:
    """The element type must hold the grid: the encoding's bitwidth, or an 8-bit container."""
    np_type = onnx.helper.tensor_dtype_to_np_dtype(elem)
    name = onnx.TensorProto.DataType.Name(elem).lower()
    bits = {"int4": 4, "uint4": 4}.get(name, np.dtype(np_type).itemsize * 8)
    signed = name.startswith("int")
    wanted_signed = enc.qmin < 0
    if signed != wanted_signed:
        return [f"element type {name} for a {'signed' if wanted_signed else 'unsigned'} grid "
                f"[{enc.qmin}, {enc.qmax}]"]
    if bits == enc.bitwidth:
        return []
    if bits == 8 and enc.bitwidth < 8:
        lo, hi = container_grid(enc.qmin, enc.qmax)
        if (lo < 0) == signed:
            return []
    return [f"element type {name} for an encoding of {enc.bitwidth} bits"]


def _read_point(q: onnx.NodeProto, consumers: Mapping[str, List[onnx.NodeProto]]
                ) -> Optional[str]:
    """The tensor the pair's consumers read: the DequantizeLinear output, or the Clip after it
    (a grid narrower than the type)."""
    dq = next((n for n in consumers.get(q.output[0], []) if n.op_type == "DequantizeLinear"),
              None)
    if dq is None:
        return None
    after = consumers.get(dq.output[0], [])
    if len(after) == 1 and after[0].op_type == "Clip" and after[0].input[0] == dq.output[0]:
        return after[0].output[0]
    return dq.output[0]


def _feeds(graph: onnx.GraphProto, inits: Mapping[str, onnx.TensorProto],
           given: Mapping[str, np.ndarray], seed: int) -> Dict[str, np.ndarray]:
    """Every graph input: ``given`` where named, else seeded random of the declared shape."""
    declared = [i for i in graph.input if i.name not in inits]
    names = {i.name for i in declared}
    unknown = sorted(set(given) - names)
    if unknown:
        raise ExportError(f"inputs {unknown} are not inputs of the model; its inputs: "
                          f"{sorted(names)}")
    rng = np.random.default_rng(seed)
    feeds = {}
    for value in declared:
        ttype = value.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(ttype.elem_type)
        dims = [d.dim_value if d.HasField("dim_value") else 1 for d in ttype.shape.dim]
        if value.name in given:
            arr = np.asarray(given[value.name])
            fixed = [d.dim_value if d.HasField("dim_value") else None for d in ttype.shape.dim]
            if arr.ndim != len(fixed) or any(f not in (None, n) for f, n in zip(fixed, arr.shape)):
                shown = ["?" if f is None else f for f in fixed]
                raise ExportError(f"input {value.name!r} has shape {list(arr.shape)}; the model "
                                  f"takes shape {shown} (? = any size)")
            feeds[value.name] = arr.astype(dtype, copy=False)
        elif np.issubdtype(dtype, np.floating):
            feeds[value.name] = rng.standard_normal(dims).astype(dtype)
        else:
            feeds[value.name] = np.zeros(dims, dtype=dtype)
    return feeds


def _run_model(model: onnx.ModelProto, tensors: List[str], feeds: Dict[str, np.ndarray]
               ) -> Dict[str, np.ndarray]:
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise ExportError("checking a QDQ model needs onnxruntime: pip install onnxruntime") from exc
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        return run_onnx(ort, with_outputs(model, tensors), feeds, options)
    except Exception as exc:  # ORT raises its own exception types
        raise ExportError(f"ONNX Runtime cannot run the model: "
                          f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc


def _grid_problems(values: np.ndarray, enc: Encoding) -> List[str]:
    """Values must be codes of ``enc``: ``v / scale - offset`` an integer in ``[qmin, qmax]``.

    DequantizeLinear computes ``(q - zp) * scale`` in float32, a relative error of at most
    2^-24 of ``|q - zp|``; dividing back in float64 adds nothing comparable, so a code is an
    integer to within ``2^-22 * (|code| + 1)`` (a margin of 4x over that bound).
    """
    v = np.asarray(values, dtype=np.float64)
    if not v.size:
        return []
    scale = enc.scale.numpy().astype(np.float64)
    offset = enc.offset.numpy().astype(np.float64)
    block = getattr(enc, "block_size", None)
    if block is not None:  # (C, K / block) along dimensions 0 and 1
        shape = list(scale.shape) + [1] * (v.ndim - 2)
        scale = np.repeat(scale, block, axis=1).reshape([shape[0], -1] + shape[2:])
        offset = np.repeat(offset, block, axis=1).reshape(scale.shape)
    elif scale.ndim == 1:
        shape = [1] * v.ndim
        shape[enc.axis % v.ndim] = -1
        scale, offset = scale.reshape(shape), offset.reshape(shape)
    steps = v / scale
    nearest = np.round(steps)
    off_grid = np.abs(steps - nearest) > 2.0 ** -22 * (np.abs(steps) + 1)
    codes = nearest - offset
    outside = (codes < enc.qmin) | (codes > enc.qmax)
    out = []
    if off_grid.any():
        i = int(np.argmax(off_grid.reshape(-1)))
        out.append(f"{int(off_grid.sum())}/{v.size} values off the grid (e.g. "
                   f"{float(v.reshape(-1)[i]):.9g} = {steps.reshape(-1)[i]:.6f} steps)")
    if outside.any():
        i = int(np.argmax(outside.reshape(-1)))
        out.append(f"{int(outside.sum())}/{v.size} values outside the grid [{enc.qmin}, "
                   f"{enc.qmax}] (e.g. code {int(codes.reshape(-1)[i])})")
    return out
