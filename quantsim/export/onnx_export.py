"""ONNX export of the float model with module-derived names, and the tensor -> quantizer map.

torch 2.13's default exporter (``dynamo=True``) names nodes after aten ops (``node_conv2d``)
and keeps the module path only in each node's ``metadata_props``; its default optimizer folds
BatchNorm, transposes Linear weights and merges equal initializers. quantsim therefore exports
with ``dynamo=True, optimize=False`` (every parameter keeps its PyTorch name as initializer name)
and then renames, so every node maps back to its module:

* **node**: ``/<module path, dots as slashes>/<OpType>``, e.g. ``/layer1/0/conv1/Conv``; nodes
  of functional ops in a container get the container's path (``/layer1/0/Add``), those at the top
  level just ``/<OpType>`` (``/Reshape``). Repeats get ``_1``, ``_2``, ... in graph order.
* **tensor**: ``<node name>_output_<i>``, e.g. ``/relu1/Relu_output_0`` (the TorchScript
  exporter's and AIMET's convention). Graph inputs keep their names (the forward's argument
  names, or ``input_names``); graph outputs are ``output`` / ``output_<i>`` unless
  ``output_names`` are given.
* **initializer**: the PyTorch parameter / buffer name (``conv1.weight``), untouched.

torch.export refuses some models the TorchScript-based exporter handles, above all Python
control flow on tensor values (``if x.mean() > 0:``). When the dynamo export fails,
:func:`export_onnx` exports with the TorchScript-based exporter instead
(:mod:`quantsim.export.torchscript_onnx` brings it to the same names) and issues one
:class:`ExporterFallbackWarning` naming the reason; when that fails too, an
:class:`ExportersFailedError` carries both causes.

A module reachable under several paths (``self.block`` that is also ``self.body[0]``) is named
by its first path in ``named_modules()`` order, whichever path the forward called it through:
its nodes, their tensors and its parameters' initializers (``block.weight``) alike.

Each node also carries ``quantsim.module`` (the module path) and ``quantsim.calls`` (which call
of each module on its scope stack it belongs to) in its ``metadata_props``, and the model
carries ``quantsim.quantizers`` (JSON: tensor name -> quantizer names), so a later
:func:`quantsim.export.load_encodings` resolves ONNX names without guessing.

:func:`tensor_map` is the one place that decides which ONNX tensor a quantizer stands for:
an output quantizer -> the module's output tensor (produced by its last node and used outside
it); an input quantizer -> the tensor that enters the module's nodes; a parameter quantizer ->
the initializer of the same name. A module called more than once (one ``nn.ReLU`` after
conv1, conv2 and fc1: nodes ``/relu/Relu``, ``/relu/Relu_1``, ``/relu/Relu_2``) has one set of
quantizers, which the sim applies in every call, so its activation quantizers stand for their
tensor in every call.
"""
from __future__ import annotations

import ast
import contextlib
import io
import json
import logging
import os
import re
import sys
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple

import onnx
import torch
from torch import nn

from quantsim.errors import ExportError
from quantsim.export import torchscript_onnx
from quantsim.graph import module_aliases, split_dummy_input
from quantsim.nn.fused import activation_destinations
from quantsim.wrappers import QuantizationMixin


#: opset of ``<prefix>.onnx`` unless ``onnx_export_args`` say otherwise (torch 2.13's default).
DEFAULT_OPSET = 20
#: keys ``onnx_export_args`` may hold.
EXPORT_ARG_KEYS = ("opset_version", "input_names", "output_names", "dynamic_axes", "dynamic_shapes")
#: model-level metadata key holding the tensor -> quantizer-names map (JSON).
QUANTIZER_MAP_KEY = "quantsim.quantizers"
#: node-level metadata key holding the module path.
MODULE_KEY = "quantsim.module"
#: model-level metadata key: which torch exporter wrote the graph (``dynamo`` / ``torchscript``).
EXPORTER_KEY = "quantsim.exporter"
#: node-level metadata key: which call of each module on the node's scope stack it belongs to
#: (JSON ``{module path: call index}``, 0-based, in call order).
CALLS_KEY = "quantsim.calls"
_NAME_KEEPING = {"dynamo": "torch's dynamo exporter, optimize=False",
                 "torchscript": "torch's TorchScript exporter, do_constant_folding=False and "
                                "keep_initializers_as_inputs=True"}
_SCOPES_KEY = "pkg.torch.onnx.name_scopes"
_KEEP_METADATA = (_SCOPES_KEY, "pkg.torch.onnx.class_hierarchy", CALLS_KEY)

#: ONNX ops whose output holds only values of their first input (moved, selected, or copied),
#: so a quantized input stays on the same grid.
DATA_MOVEMENT_OPS = frozenset({
    "MaxPool", "GlobalMaxPool", "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze",
    "Identity", "Dropout", "Slice", "Gather", "Split", "Expand", "Tile", "DepthToSpace",
    "SpaceToDepth",
})
_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                onnx.TensorProto.BFLOAT16}
# inputs that only contribute a shape or a type, never values
_SHAPE_ONLY = {"Shape": None, "Size": None, "ConstantOfShape": None, "CastLike": {1}}


# ----------------------------------------------------------------------------------------------
# the clean export
# ----------------------------------------------------------------------------------------------
def normalize_export_args(onnx_export_args: Any) -> Dict[str, Any]:
    """Turn ``onnx_export_args`` (None, a dict, or an object with those attributes, such as
    AIMET's ``OnnxExportApiArgs``) into a dict of the allowed keys.

    Raises:
        ExportError: an unknown key.
    """
    if onnx_export_args is None:
        return {}
    if isinstance(onnx_export_args, dict):
        args = dict(onnx_export_args)
    else:
        args = {k: getattr(onnx_export_args, k) for k in EXPORT_ARG_KEYS
                if getattr(onnx_export_args, k, None) is not None}
    unknown = sorted(set(args) - set(EXPORT_ARG_KEYS))
    if unknown:
        raise ExportError(f"onnx_export_args: unknown key(s) {unknown}; allowed: {list(EXPORT_ARG_KEYS)}")
    opset = args.get("opset_version")
    if opset is not None and not (isinstance(opset, int) and 13 <= opset <= 23):
        raise ExportError(f"onnx_export_args: opset_version {opset!r}; allowed: 13..23")
    return args


class ExporterFallbackWarning(UserWarning):
    """torch.export could not capture the model; the TorchScript-based exporter was used."""


class ExportersFailedError(ExportError):
    """Neither of torch's ONNX exporters could export the model.

    Attributes:
        dynamo_error: what torch.export / the dynamo exporter raised.
        torchscript_error: what the TorchScript-based exporter raised.
    """

    def __init__(self, message: str, dynamo_error: BaseException, torchscript_error: BaseException) -> None:
        super().__init__(message)
        self.dynamo_error = dynamo_error
        self.torchscript_error = torchscript_error


def export_onnx(model: nn.Module, dummy_input: Any, export_args: Dict[str, Any]) -> onnx.ModelProto:
    """Export ``model`` (float, eval) and rename it (module docstring).

    torch's dynamo exporter first; when it fails (torch.export refuses Python control flow on
    tensor values, among others), the TorchScript-based exporter
    (:mod:`quantsim.export.torchscript_onnx`), with one :class:`ExporterFallbackWarning` that
    names the dynamo exporter's reason. The model's ``quantsim.exporter`` metadata says which
    exporter wrote it (``dynamo`` or ``torchscript``).

    Raises:
        ExportersFailedError: both exporters failed (both causes in the message and kept as
            attributes).
    """
    args, kwargs = split_dummy_input(model, dummy_input)
    opset = export_args.get("opset_version", DEFAULT_OPSET)
    aliases = module_aliases(model)
    try:
        (proto, stacks), exporter = _export_dynamo(model, args, kwargs, export_args, opset), "dynamo"
    except Exception as dynamo_error:  # the exporter raises many types; any one means: fall back
        reason = error_essence(dynamo_error)
        try:
            proto, stacks, notes = _export_torchscript(model, args, kwargs, export_args, opset)
        except Exception as torchscript_error:
            raise ExportersFailedError(
                f"neither ONNX exporter could export {type(model).__name__} (opset {opset}). "
                f"torch.export (dynamo): {reason}. TorchScript exporter: "
                f"{error_essence(torchscript_error)}", dynamo_error, torchscript_error) from torchscript_error
        for node, stack in zip(proto.graph.node, stacks):
            node.metadata_props.add(key=MODULE_KEY, value=stack[-1][0] if stack else "")
        exporter = "torchscript"
        traced = f" (the trace fixed: {'; '.join(notes[:3])})" if notes else ""
        warnings.warn(ExporterFallbackWarning(
            f"torch.export could not capture {type(model).__name__}: {reason}. Exported with the "
            "TorchScript-based exporter instead, which records only the branches this "
            f"dummy_input takes{traced}"), stacklevel=_caller_outside_quantsim())
    if export_args.get("output_names") is None:
        outs = proto.graph.output
        names = ["output"] if len(outs) == 1 else [f"output_{i}" for i in range(len(outs))]
        _rename_tensors(proto.graph, {o.name: n for o, n in zip(outs, names)})
    _tag_calls(proto, stacks, aliases)
    rename_by_module(proto, aliases)
    proto.metadata_props.add(key=EXPORTER_KEY, value=exporter)
    return proto


def _tag_calls(model: onnx.ModelProto, stacks: Sequence[Sequence[Tuple[str, str]]],
              aliases: Optional[Mapping[str, str]] = None) -> None:
    """Tag each node with :data:`CALLS_KEY`: for every module on its scope stack, which call of
    that module the node belongs to (in place).

    ``stacks`` holds one stack per node, outermost first, of ``(module path, token)``: the
    tokens up to a module identify one of its calls (the dynamo exporter's module-stack keys
    ``relu``, ``relu@1``; the TorchScript exporter's scopes ``relu``, ``relu_1``). Calls are
    numbered in graph order, which both exporters emit in execution order, so call ``k`` of
    the graph is call ``k`` of the forward. Paths in ``aliases`` count as their module's
    first path, so calls through either path are calls of one module.
    """
    aliases = aliases or {}
    numbering: Dict[str, Dict[Tuple[str, ...], int]] = {}
    for node, stack in zip(model.graph.node, stacks):
        calls: Dict[str, int] = {}
        for level, (path, _) in enumerate(stack):
            if not path:
                continue
            module = aliases.get(path, path)
            seen = numbering.setdefault(module, {})
            calls[module] = seen.setdefault(tuple(t for _, t in stack[:level + 1]), len(seen))
        if calls:
            node.metadata_props.add(key=CALLS_KEY, value=json.dumps(calls, sort_keys=True))


def _export_dynamo(model: nn.Module, args: tuple, kwargs: Dict[str, Any], export_args: Dict[str, Any],
                   opset: int) -> Tuple[onnx.ModelProto, List[List[Tuple[str, str]]]]:
    """The dynamo export and, per node, its module stack for :func:`_tag_calls`."""
    options = dict(dynamo=True, optimize=False, verbose=False, opset_version=opset,
                   input_names=export_args.get("input_names"),
                   output_names=export_args.get("output_names"))
    if export_args.get("dynamic_shapes") is not None:
        options["dynamic_shapes"] = export_args["dynamic_shapes"]
    elif export_args.get("dynamic_axes") is not None:
        options["dynamic_axes"] = export_args["dynamic_axes"]
    # a failed capture prints its partial graph to stderr and logs "Unable to find user code";
    # export_onnx reports the failure itself
    shapes_log = logging.getLogger("torch.fx.experimental.symbolic_shapes")
    level = shapes_log.level
    shapes_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()), _torchlib_cache():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(model, exporter_args(args, kwargs), kwargs=kwargs or None,
                                        **options)
    finally:
        shapes_log.setLevel(level)
    return program.model_proto, _dynamo_stacks(program)


def _dynamo_stacks(program: Any) -> List[List[Tuple[str, str]]]:
    """Per ONNX node: ``(module path as called, module-stack key)``, outermost first, from the
    ``nn_module_stack`` of the fx node it was translated from (the last of its name scopes).
    The keys tell calls apart (``L__self__relu``, ``L__self__relu@1``); the name scopes keep
    only the paths."""
    exported = getattr(program, "exported_program", None)
    by_fx: Dict[str, List[Tuple[str, str]]] = {}
    if exported is not None:
        for fx_node in exported.graph.nodes:
            stack = fx_node.meta.get("nn_module_stack") or {}
            by_fx[fx_node.name] = [(str(value[0]), str(key)) for key, value in stack.items()]
    out = []
    for node in program.model_proto.graph.node:
        scopes = _name_scopes(node)
        out.append(by_fx.get(scopes[-1], []) if scopes else [])
    return out


def exporter_args(args: tuple, kwargs: Dict[str, Any]) -> tuple:
    """``args`` as the dynamo ``torch.onnx.export`` must get them: without keyword arguments it
    reads a trailing dict as the keyword arguments, so a dict that is the last positional
    argument gets an empty dict after it."""
    return args + ({},) if not kwargs and args and isinstance(args[-1], dict) else args


def _export_torchscript(model: nn.Module, args: tuple, kwargs: Dict[str, Any], export_args: Dict[str, Any],
                        opset: int) -> Tuple[onnx.ModelProto, List[List[Tuple[str, str]]], List[str]]:
    """:func:`quantsim.export.torchscript_onnx.export` with the inputs named as torch.export
    names them and ``dynamic_shapes`` turned into ``dynamic_axes``."""
    names = export_args.get("input_names") or torchscript_onnx.dynamo_input_names(model, args, kwargs)
    axes = export_args.get("dynamic_axes")
    if axes is None and export_args.get("dynamic_shapes") is not None:
        axes = torchscript_onnx.dynamic_axes_from_shapes(export_args["dynamic_shapes"], model,
                                                         args, kwargs, names)
    # the TorchScript exporter, too, reads a trailing positional dict as keyword arguments
    return torchscript_onnx.export(model, exporter_args(args, kwargs), kwargs, opset=opset,
                                   input_names=names, output_names=export_args.get("output_names"),
                                   dynamic_axes=axes)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# torch.export's pointer to the user's line: 'The following call raised this error:\n  File ...'
_RAISED_AT = re.compile(r'The following call raised this error:\s*File "([^"]+)", line (\d+), in (\S+)\n'
                        r'[ \t]*(\S[^\n]*)')
_TORCH_DIR = os.path.dirname(torch.__file__)
_QUANTSIM_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def error_essence(exc: BaseException, limit: int = 400) -> str:
    """One line saying why an exporter failed: the root cause's type and first line, and the
    user's source line when torch names it (or the traceback shows it).

    Example:
        >>> try:
        ...     raise RuntimeError("wrapper") from ValueError("the reason\\nmore detail")
        ... except RuntimeError as exc:
        ...     error_essence(exc).split(" (at ")[0]
        'ValueError: the reason'
    """
    chain = [exc]
    while chain[-1].__cause__ is not None and chain[-1].__cause__ not in chain:
        chain.append(chain[-1].__cause__)
    root = chain[-1]
    lines = [ln.strip() for ln in _ANSI.sub("", str(root)).splitlines() if ln.strip()]
    text = f"{type(root).__name__}: {' '.join(lines[0].split())}" if lines else type(root).__name__
    if len(text) > limit:
        text = text[:limit - 3] + "..."
    for err in chain:
        found = _RAISED_AT.search(_ANSI.sub("", str(err)))
        if found:
            return f"{text} (at {found[1]}:{found[2]} in {found[3]}: {found[4].strip()})"
    frames = [f for f in traceback.extract_tb(root.__traceback__)
              if not f.filename.startswith((_TORCH_DIR, _QUANTSIM_DIR))]
    if frames:
        f = frames[-1]
        return f"{text} (at {f.filename}:{f.lineno} in {f.name}: {(f.line or '').strip()})"
    return text


def _caller_outside_quantsim() -> int:
    """``stacklevel`` that attributes a warning issued by our caller to the first frame outside
    quantsim (the user's ``sim.export(...)`` line)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(_QUANTSIM_DIR + os.sep):
        frame, level = frame.f_back, level + 1
    return level


_REGISTRIES: Dict[int, Any] = {}


@contextlib.contextmanager
def _torchlib_cache():
    """Reuse torch's ONNX op registry between exports (building it costs ~5 s per export).

    torch 2.13 rebuilds the registry from onnxscript's torchlib on every ``torch.onnx.export``
    call (parsing the source of ~500 functions). The registry is read-only during an export
    without ``custom_translation_table``, so one per opset is kept. Private torch API: when it
    is not there, exports run uncached.
    """
    try:
        from torch.onnx._internal.exporter import _registration
        original = _registration.ONNXRegistry.__dict__["from_torchlib"]
    except (ImportError, KeyError):
        yield
        return
    build = original.__get__(None, _registration.ONNXRegistry)

    def cached(*args, opset_version=None, **kwargs):
        key = opset_version if opset_version is not None else -1
        if key not in _REGISTRIES:
            _REGISTRIES[key] = build(**({"opset_version": opset_version} if opset_version else {}))
        return _REGISTRIES[key]

    _registration.ONNXRegistry.from_torchlib = cached
    try:
        yield
    finally:
        _registration.ONNXRegistry.from_torchlib = original


def node_module(node: onnx.NodeProto) -> str:
    """Module path of a node: our ``quantsim.module`` tag, else the dynamo exporter's name
    scopes, else the node name (``/layer1/0/conv1/Conv`` or the TorchScript exporter's
    ``/layer1/layer1.0/conv1/Conv``)."""
    meta = {p.key: p.value for p in node.metadata_props}
    if MODULE_KEY in meta:
        return meta[MODULE_KEY]
    if meta.get(_SCOPES_KEY):
        parts = _name_scopes(node)
        # ['', 'layer1', 'layer1.0', 'layer1.0.conv1', 'conv2d_1']: the last is the fx node,
        # the others module paths. The root's '' is missing when the exported model is itself
        # an fx GraphModule (a prepared model): ['layer1.0.conv1', 'conv2d_1'], ['add_1']
        return parts[-2] if len(parts) >= 2 else ""
    if node.name.startswith("/"):
        parts = node.name.strip("/").split("/")[:-1]
        dotted = [i for i, p in enumerate(parts) if "." in p]
        return ".".join(parts[dotted[-1]:] if dotted else parts)
    return ""


def _name_scopes(node: onnx.NodeProto) -> List[str]:
    """The dynamo exporter's name scopes of a node (``[]`` when it has none)."""
    for prop in node.metadata_props:
        if prop.key == _SCOPES_KEY:
            try:
                parts = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return []
            return [str(p) for p in parts] if isinstance(parts, list) else []
    return []


def _node_calls(node: onnx.NodeProto) -> Dict[str, int]:
    """A node's :data:`CALLS_KEY` tag (``{}`` when it has none or it is malformed)."""
    for prop in node.metadata_props:
        if prop.key == CALLS_KEY:
            try:
                calls = json.loads(prop.value)
            except ValueError:
                return {}
            if isinstance(calls, dict):
                return {str(m): k for m, k in calls.items() if isinstance(k, int)}
    return {}


def node_name_for(module: str, op_type: str) -> str:
    """The documented naming rule: ``/layer1/0/conv1/Conv`` (``/Conv`` at the top level)."""
    return "/" + "/".join(module.split(".") + [op_type]) if module else f"/{op_type}"


def rename_by_module(model: onnx.ModelProto, aliases: Optional[Mapping[str, str]] = None) -> None:
    """Rename nodes and their output tensors after the module each node belongs to (in place).

    Graph inputs, graph outputs and initializers keep their names, except that module paths in
    ``aliases`` (:func:`quantsim.graph.module_aliases`) become the first path of their module,
    in node names and initializer names alike. Node metadata is reduced to the exporter's name
    scopes and class hierarchy (stack traces dropped), ``quantsim.calls`` where the export
    tagged it, plus ``quantsim.module``.
    """
    graph = model.graph
    aliases = aliases or {}
    renames: Dict[str, str] = {}
    for init in graph.initializer:
        owner, _, leaf = init.name.rpartition(".")
        if owner in aliases:
            renames[init.name] = f"{aliases[owner]}.{leaf}"
    keep = {i.name for i in graph.input} | {o.name for o in graph.output} | {
        renames.get(i.name, i.name) for i in graph.initializer}
    used: Dict[str, int] = {}
    for node in graph.node:
        module = node_module(node)
        module = aliases.get(module, module)
        base = node_name_for(module, node.op_type)
        count = used.get(base, 0)
        used[base] = count + 1
        node.name = base if count == 0 else f"{base}_{count}"
        meta = {p.key: p.value for p in node.metadata_props if p.key in _KEEP_METADATA}
        meta[MODULE_KEY] = module
        del node.metadata_props[:]
        for key, value in meta.items():
            node.metadata_props.add(key=key, value=value)
        for i, out in enumerate(node.output):
            if out and out not in keep:
                renames[out] = f"{node.name}_output_{i}"
    _rename_tensors(graph, renames)


def _rename_tensors(graph: onnx.GraphProto, renames: Dict[str, str]) -> None:
    if not renames:
        return
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in renames:
                node.input[i] = renames[name]
        for i, name in enumerate(node.output):
            if name in renames:
                node.output[i] = renames[name]
    for vi in list(graph.value_info) + list(graph.output) + list(graph.input):
        if vi.name in renames:
            vi.name = renames[vi.name]
    for init in graph.initializer:
        if init.name in renames:
            init.name = renames[init.name]


# ----------------------------------------------------------------------------------------------
# graph index
# ----------------------------------------------------------------------------------------------
@dataclass
class GraphIndex:
    """Producers, consumers and tensor kinds of one ONNX graph."""

    graph: onnx.GraphProto
    modules: List[str]                                  # per node
    producer: Dict[str, int] = field(default_factory=dict)
    consumers: Dict[str, List[Tuple[int, int]]] = field(default_factory=dict)
    initializers: Set[str] = field(default_factory=set)
    inputs: List[str] = field(default_factory=list)
    outputs: List[str] = field(default_factory=list)
    activations: Set[str] = field(default_factory=set)   # depend on a graph input
    floats: Set[str] = field(default_factory=set)         # known float element type
    typed: Set[str] = field(default_factory=set)          # known element type
    calls: List[Dict[str, int]] = field(default_factory=list)  # per node: module -> call (CALLS_KEY)

    @classmethod
    def build(cls, model: onnx.ModelProto, aliases: Optional[Mapping[str, str]] = None
              ) -> "GraphIndex":
        """Index ``model.graph`` (top level only); node module paths in ``aliases`` count as
        the first path of their module (:func:`quantsim.graph.module_aliases`)."""
        g = model.graph
        aliases = aliases or {}
        idx = cls(g, [aliases.get(m, m) for m in map(node_module, g.node)])
        idx.calls = [{aliases.get(m, m): k for m, k in _node_calls(node).items()} for node in g.node]
        idx.initializers = {i.name for i in g.initializer}
        idx.inputs = [i.name for i in g.input if i.name not in idx.initializers]
        idx.outputs = [o.name for o in g.output]
        for vi in list(g.input) + list(g.value_info) + list(g.output):
            if vi.type.tensor_type.elem_type:
                idx.typed.add(vi.name)
            if vi.type.tensor_type.elem_type in _FLOAT_TYPES:
                idx.floats.add(vi.name)
        for init in g.initializer:
            if init.data_type in _FLOAT_TYPES:
                idx.floats.add(init.name)
        live = set(idx.inputs)
        for n_i, node in enumerate(g.node):
            for k, name in enumerate(node.input):
                if name:
                    idx.consumers.setdefault(name, []).append((n_i, k))
            if any(name in live for name in node.input):
                live.update(o for o in node.output if o)
            for name in node.output:
                if name:
                    idx.producer[name] = n_i
        idx.activations = live
        return idx

    def nodes_of(self, module: str, *also: str) -> List[int]:
        """Indices of the nodes of ``module`` (and of the modules ``also`` names) and their
        submodules, in graph order."""
        scopes = (module,) + also
        prefixes = tuple(m + "." for m in scopes)
        return [i for i, m in enumerate(self.modules) if m in scopes or m.startswith(prefixes)]

    def calls_of(self, module: str, *also: str, count: int = 1) -> List[List[int]]:
        """The nodes of ``module`` (:meth:`nodes_of`) split into its calls, in call order.

        A graph quantsim exported is split by the nodes' :data:`CALLS_KEY` tags (a node
        without one joins the call before it). An untagged graph (another tool's export, the
        name-only view of ``export_to_torchscript``) is split into runs of consecutive nodes
        when ``count``, the number of calls the sim traced, is above 1 and there are exactly
        that many runs; otherwise its nodes are one call.
        """
        nodes = self.nodes_of(module, *also)
        scopes = (module,) + also
        if any(self.calls[i] for i in nodes):
            groups: Dict[int, List[int]] = {}
            call = 0
            for i in nodes:
                call = next((self.calls[i][s] for s in scopes if s in self.calls[i]), call)
                groups.setdefault(call, []).append(i)
            return list(groups.values())  # first-seen order: graph order, i.e. call order
        if count > 1:
            runs: List[List[int]] = []
            for i in nodes:  # exporter-made constants between two nodes do not end a run
                if runs and all(self.graph.node[j].op_type == "Constant"
                                for j in range(runs[-1][-1] + 1, i)):
                    runs[-1].append(i)
                else:
                    runs.append([i])
            if len(runs) == count:
                return runs
        return [nodes] if nodes else []

    def io_of(self, nodes: Sequence[int]) -> Tuple[List[str], List[str], List[str]]:
        """``(inputs, outputs, intermediates)`` float activation tensors of a set of nodes (one
        call of a module, with those of the modules exported in its place).

        inputs: entering from outside (first use order; shape/type-only uses ignored);
        outputs: produced inside and used outside or graph outputs (production order);
        intermediates: produced inside and used only inside.
        """
        inside = set(nodes)
        graph_outputs = set(self.outputs)
        inputs: List[str] = []
        outputs: List[str] = []
        intermediates: List[str] = []
        for n_i in nodes:
            node = self.graph.node[n_i]
            only_shape = _SHAPE_ONLY.get(node.op_type, ())
            for k, name in enumerate(node.input):
                if not name or name not in self.activations or self.producer.get(name) in inside:
                    continue
                if only_shape is None or k in only_shape:
                    continue
                if self._is_float(name) and name not in inputs:
                    inputs.append(name)
            if node.op_type == "Constant":
                continue
            for name in node.output:
                if not name or not self._is_float(name):
                    continue
                used_outside = any(c not in inside for c, _ in self.consumers.get(name, []))
                if used_outside or name in graph_outputs:
                    outputs.append(name)  # constant-derived too (e.g. a position embedding)
                elif self.consumers.get(name) and name in self.activations:
                    intermediates.append(name)
        return inputs, outputs, intermediates

    def _is_float(self, name: str) -> bool:
        # value_info is complete for dynamo and (shape-inferred) TorchScript exports; an
        # unknown type counts as float
        return name in self.floats or name not in self.typed

    def data_movement_successors(self, tensor: str, stop: Set[str]) -> List[str]:
        """Tensors that carry ``tensor``'s values through data-movement ops (transitively),
        not passing tensors in ``stop`` (quantized by a quantizer of their own)."""
        found: List[str] = []
        todo = [tensor]
        while todo:
            t = todo.pop()
            for n_i, k in self.consumers.get(t, []):
                node = self.graph.node[n_i]
                if k != 0 or node.op_type not in DATA_MOVEMENT_OPS:
                    continue
                for out in node.output:
                    if out and out not in found and out not in stop and out not in self.initializers:
                        found.append(out)
                        todo.append(out)
        return found


# ----------------------------------------------------------------------------------------------
# tensor -> quantizer map
# ----------------------------------------------------------------------------------------------
@dataclass
class TensorMap:
    """How the ONNX graph's tensors relate to the sim's quantizers.

    A module called more than once has one set of quantizers and one group of nodes per call:
    each of its activation quantizers stands for its tensor in every call.

    Attributes:
        activations: tensor -> quantizer names (output quantizers first, then input quantizers
            of modules that consume it); a module's calls are added in call order.
        params: initializer name -> parameter quantizer name.
        input_edges: input quantizer name -> one ``(tensor, node indices of the module's call
            consuming it)`` per call, in call order; the QDQ model quantizes only those edges,
            as the sim does.
        intermediates: tensor inside a multi-node module -> that call's output tensor
            (``propagate_encodings``).
        propagated: tensor downstream of data-movement ops -> the output-quantized tensor whose
            values it carries.
        module_inputs: module name -> the input tensors of its first call (all, quantized or
            not).
        missing: quantizer names with no tensor in the graph (module vanished, or unused).
    """

    activations: Dict[str, List[str]] = field(default_factory=dict)
    params: Dict[str, str] = field(default_factory=dict)
    input_edges: Dict[str, List[Tuple[str, List[int]]]] = field(default_factory=dict)
    intermediates: Dict[str, str] = field(default_factory=dict)
    propagated: Dict[str, str] = field(default_factory=dict)
    module_inputs: Dict[str, List[str]] = field(default_factory=dict)
    missing: List[str] = field(default_factory=list)

    def quantizer_to_tensor(self) -> Dict[str, str]:
        """Quantizer name -> the (first) tensor it stands for."""
        out: Dict[str, str] = {}
        for tensor, names in self.activations.items():
            for n in names:
                out.setdefault(n, tensor)
        for tensor, n in self.params.items():
            out.setdefault(n, tensor)
        return out

    def to_json(self) -> str:
        """The ``quantsim.quantizers`` metadata value."""
        doc = {"activations": self.activations, "params": self.params,
               "intermediates": self.intermediates, "propagated": self.propagated}
        return json.dumps(doc, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "TensorMap":
        """Inverse of :meth:`to_json` (edges and missing are not stored)."""
        doc = json.loads(text)
        return cls(activations={k: list(v) for k, v in doc.get("activations", {}).items()},
                   params=dict(doc.get("params", {})),
                   intermediates=dict(doc.get("intermediates", {})),
                   propagated=dict(doc.get("propagated", {})))


def qmodules(model: nn.Module) -> Dict[str, nn.Module]:
    """Name -> quantized module of a sim's model."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantizationMixin)}


def tensor_map(sim: Any, model: onnx.ModelProto) -> TensorMap:
    """Map every quantizer of ``sim`` to the ONNX tensor it quantizes in ``model``.

    ``model`` is an export of ``sim``'s float model renamed by :func:`rename_by_module` (or
    any graph whose nodes carry the exporter's name scopes). Disabled quantizers are mapped too,
    so encodings written by a sim with another config still load. The activation quantizers of
    a module called more than once are mapped to their tensor in each call
    (:meth:`GraphIndex.calls_of`): the sim quantizes every call with them.
    """
    aliases = module_aliases(sim.model)
    index = GraphIndex.build(model, aliases)
    paths: Dict[str, List[str]] = {}  # a module's first path -> all its paths
    for alias, first in aliases.items():
        paths.setdefault(first, [first]).append(alias)
    tmap = TensorMap()
    modules = qmodules(sim.model)
    # a fused conv-BN-activation exports as its folded layer plus the activation in its own place
    also = {name: (dest,) for name, dest in activation_destinations(sim.model).items()}
    counts = getattr(getattr(sim, "graph", None), "call_counts", None) or {}
    calls = {name: index.calls_of(name, *also.get(name, ()), count=counts.get(name, 1))
             for name in modules}
    ios = {name: [index.io_of(nodes) for nodes in calls[name]] for name in modules}
    for name, module in modules.items():
        tmap.module_inputs[name] = ios[name][0][0] if ios[name] else []
        for i, _ in enumerate(module.output_quantizers):
            qname = f"{name}.output_quantizers.{i}"
            tensors = [outputs[i] for _, outputs, _ in ios[name] if i < len(outputs)]
            for tensor in tensors:
                tmap.activations.setdefault(tensor, []).append(qname)
            if not tensors:
                tmap.missing.append(qname)
        # a fused chain keys as the folded model does: its activation's inner tensors, not the
        # layer's output inside the chain (which the folded model's supergroup leaves unkeyed)
        activation_nodes = set(index.nodes_of(*also[name])) if name in also else None
        for _, outputs, intermediates in ios[name]:
            if activation_nodes is not None:
                intermediates = [t for t in intermediates
                                 if index.producer.get(t) in activation_nodes]
            if outputs and intermediates:
                for t in intermediates:
                    tmap.intermediates[t] = outputs[-1]
        for pname in module.param_quantizers:
            # a foreign graph may name a shared module's parameter after another of its paths
            found = [f"{path}.{pname}" if path else pname for path in paths.get(name, [name])]
            found = [full for full in found if full in index.initializers]
            if found:
                tmap.params[found[0]] = f"{name}.param_quantizers.{pname}"
            else:
                tmap.missing.append(f"{name}.param_quantizers.{pname}")
    for name, module in modules.items():  # input quantizers after every output quantizer
        for i, _ in enumerate(module.input_quantizers):
            qname = f"{name}.input_quantizers.{i}"
            edges = [(inputs[i], nodes) for nodes, (inputs, _, _) in zip(calls[name], ios[name])
                     if i < len(inputs)]
            for tensor, _ in edges:
                names = tmap.activations.setdefault(tensor, [])
                if qname not in names:  # two calls may read one tensor
                    names.append(qname)
            if edges:
                tmap.input_edges[qname] = edges
            else:
                tmap.missing.append(qname)
    # data movement carries the values of an enabled output quantizer; input quantizers
    # quantize one edge only, the tensor itself stays float
    quantizers = dict(sim.named_quantizers())
    quantized = {t for t, names in tmap.activations.items()
                 if any(".output_quantizers." in n and quantizers[n].enabled for n in names)}
    for tensor in tmap.activations:
        if tensor in quantized:
            for moved in index.data_movement_successors(tensor, quantized):
                tmap.propagated.setdefault(moved, tensor)
    return tmap


def graph_tensor_names(model: onnx.ModelProto) -> Set[str]:
    """Every tensor name of the top-level graph (inputs, outputs, initializers, node outputs)."""
    g = model.graph
    names = {i.name for i in g.input} | {o.name for o in g.output} | {i.name for i in g.initializer}
    for node in g.node:
        names.update(o for o in node.output if o)
    return names


def check_param_names(model: onnx.ModelProto, expected: Iterable[str]) -> None:
    """Raise :class:`ExportError` when a parameter of a module that is in the graph is not an
    initializer of the same name (exporter drift). Parameters of modules that left no node in
    the graph (unused outputs, removed by the exporter) are not errors: their quantizers are
    reported as missing by :func:`tensor_map`.
    """
    index = GraphIndex.build(model)
    present = set(index.modules)
    lost = []
    for name in expected:
        module = name.rpartition(".")[0]
        in_graph = any(m == module or m.startswith(module + ".") for m in present) if module else True
        if in_graph and name not in index.initializers:
            lost.append(name)
    if lost:
        exporter = {p.key: p.value for p in model.metadata_props}.get(EXPORTER_KEY, "dynamo")
        raise ExportError(
            f"the ONNX export lost the names of {len(lost)} parameter(s): {sorted(lost)[:8]}; their "
            f"encodings could not be keyed. This is exporter drift (quantsim exports with "
            f"{_NAME_KEEPING[exporter]} to keep names); report it with your torch version")


def attach_quantizer_map(model: onnx.ModelProto, tmap: TensorMap) -> None:
    """Store ``tmap`` in the model's ``metadata_props`` under :data:`QUANTIZER_MAP_KEY`."""
    for prop in list(model.metadata_props):
        if prop.key == QUANTIZER_MAP_KEY:
            model.metadata_props.remove(prop)
    model.metadata_props.add(key=QUANTIZER_MAP_KEY, value=tmap.to_json())


def stored_quantizer_map(model: onnx.ModelProto) -> Optional[TensorMap]:
    """The map stored by :func:`attach_quantizer_map`, or None."""
    for prop in model.metadata_props:
        if prop.key == QUANTIZER_MAP_KEY:
            return TensorMap.from_json(prop.value)
    return None


_OUTPUT_SUFFIX = re.compile(r"_output_\d+$")


def module_from_tensor_name(name: str, known: Sequence[str]) -> Optional[Tuple[str, str]]:
    """``(module, op_type)`` for a module-derived tensor name, else None.

    Reads both quantsim's ``/layer1/0/conv1/Conv_output_0`` and the TorchScript exporter's
    (AIMET's) ``/layer1/layer1.0/conv1/Conv_output_0``, repeated calls included (quantsim's
    ``/relu/Relu_1_output_0``, the TorchScript exporter's ``/relu_1/Relu_output_0``);
    ``known`` lists module names to accept.
    """
    if not name.startswith("/") or not _OUTPUT_SUFFIX.search(name):
        return None
    parts = _OUTPUT_SUFFIX.sub("", name).strip("/").split("/")
    op = re.sub(r"_\d+$", "", parts[-1])
    scopes = parts[:-1]
    candidates = []
    repeat = torchscript_onnx.REPEAT_SUFFIX.fullmatch(scopes[-1]) if scopes else None
    for scoped in [scopes] + ([scopes[:-1] + [repeat.group(1)]] if repeat else []):
        candidates.append(".".join(scoped))
        dotted = [i for i, s in enumerate(scoped) if "." in s]
        if dotted:
            candidates.append(".".join(scoped[dotted[-1]:]))
    for cand in candidates:
        if cand in known:
            return cand, op
    return ("", op) if not scopes else (candidates[0], op)
