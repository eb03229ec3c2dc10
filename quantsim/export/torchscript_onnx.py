"""ONNX export through torch's TorchScript-based exporter, named like the dynamo export.

:func:`quantsim.export.onnx_export.export_onnx` falls back to this exporter when torch.export
cannot capture a model, typically Python control flow on tensor values (``if x.mean() > 0:``).
The TorchScript exporter runs the forward once and records the operations along the branches
that ``dummy_input`` takes. Its raw output differs from the dynamo export in ways that would
break the name alignment, and this module undoes each:

* **parameters**: ``do_constant_folding=False`` keeps weights in their own initializers (no
  folded BatchNorm or transposed Linear weights); ``keep_initializers_as_inputs=True`` turns
  off the exporter's merging of equal-valued initializers (it replaced ``ln2.weight`` by an
  ``Identity`` of ``ln1.weight``). The parameters are then removed from the graph inputs again,
  so every parameter is an initializer under its PyTorch name and nothing else.
* **graph inputs**: named as torch.export names them (:func:`dynamo_input_names`) instead of
  ``input.1`` / ``onnx::Conv_0``; torch.export's ``dynamic_shapes`` translate to the
  ``dynamic_axes`` this exporter takes (:func:`dynamic_axes_from_shapes`).
* **node -> module**: nodes are named after scopes, ``/enc/enc.0/layers.0/MatMul`` for module
  ``enc.0.layers.0``. Each scope component is torch's *unqualified* module name (the qualified
  name from its last non-numeric atom on: ``layers.0``, and just ``first`` for
  ``blocks.first``), and a module's second call gets ``_1`` appended to its scope. These names
  are lossy, so :class:`ScopeResolver` walks each one down the module tree, among the modules
  that actually ran (recorded with a global forward pre-hook during the export). The scopes
  as written (``relu_1``) are kept with each node's modules: they tell the calls of a module
  called more than once apart.
* **value_info**: the exporter writes none; ONNX shape inference fills it, so integer tensors
  (shapes, indices) are not mistaken for float activations.
"""
from __future__ import annotations

import contextlib
import inspect
import io
import re
import warnings
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

import onnx
import torch
from torch import nn
from torch.utils import _pytree as pytree

from quantsim.errors import ExportError

#: a repeated call's scope: ``<scope>_<k>``.
REPEAT_SUFFIX = re.compile(r"(.+)_\d+")


def dynamo_input_names(model: nn.Module, args: tuple, kwargs: Dict[str, Any]) -> List[str]:
    """Graph-input names as torch.export gives them: the forward's argument names, a tensor
    nested in a tuple / list / dict named by its path (``pair_0``, ``d_mask``); tensors only.

    Example:
        >>> class Two(nn.Module):
        ...     def forward(self, x, pair):
        ...         return x + pair[0] * pair[1]
        >>> t = torch.zeros(1)
        >>> dynamo_input_names(Two(), (t, (t, t)), {})
        ['x', 'pair_0', 'pair_1']
    """
    leaves, _ = pytree.tree_flatten_with_path(_call_inputs(model, args, kwargs))
    names: List[str] = []
    for path, leaf in leaves:
        if not isinstance(leaf, torch.Tensor):
            continue
        name = "_".join(_key_text(k) for k in path)
        base, k = name, 1
        while name in names:
            name, k = f"{base}_{k}", k + 1
        names.append(name)
    return names


def _call_inputs(model: nn.Module, args: tuple, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """Argument name -> value of one forward call (as torch.export binds it)."""
    try:
        bound = dict(inspect.signature(model.forward).bind_partial(*args).arguments)
    except (TypeError, ValueError):  # no introspectable signature: name by position
        bound = {f"args_{i}": a for i, a in enumerate(args)}
    return {**bound, **kwargs}


def _key_text(key: Any) -> str:
    for attr in ("key", "idx", "name"):  # MappingKey, SequenceKey, GetAttrKey
        if hasattr(key, attr):
            return re.sub(r"[^a-zA-Z0-9]", "_", str(getattr(key, attr))).lower()
    return re.sub(r"[^a-zA-Z0-9]", "_", str(key)).lower()


def dynamic_axes_from_shapes(dynamic_shapes: Any, model: nn.Module, args: tuple,
                             kwargs: Dict[str, Any], names: Sequence[str]) -> Dict[str, Dict[int, str]]:
    """Translate torch.export's ``dynamic_shapes`` into the TorchScript exporter's
    ``dynamic_axes`` (keyed by ``names``, the graph-input names in flattening order).

    ``dynamic_shapes`` is a dict keyed by the forward's argument names or a tuple / list in
    argument order; each entry mirrors its input, with ``{dim: Dim or name}`` or a per-dim list
    at each tensor. A dimension named by a ``Dim`` keeps its name; ``Dim.AUTO`` /
    ``Dim.DYNAMIC`` become ``<input>_dim<i>``; ``None`` and ``Dim.STATIC`` stay static.

    Raises:
        ExportError: the structure does not mirror the inputs.
    """
    inputs = _call_inputs(model, args, kwargs)
    if isinstance(dynamic_shapes, dict):
        specs = dynamic_shapes
    elif isinstance(dynamic_shapes, (tuple, list)):
        specs = dict(zip(inputs, dynamic_shapes))
    else:
        raise ExportError(f"onnx_export_args: dynamic_shapes must be a dict or a tuple, not "
                          f"{type(dynamic_shapes).__name__}")
    unknown = sorted(set(specs) - set(inputs))
    if unknown:
        raise ExportError(f"onnx_export_args: dynamic_shapes names {unknown}, which are not "
                          f"inputs of this call; inputs: {list(inputs)}")
    per_tensor: List[Any] = []
    for arg, value in inputs.items():
        _mirror(value, specs.get(arg), per_tensor, arg)
    axes: Dict[str, Dict[int, str]] = {}
    for name, spec in zip(names, per_tensor):
        dims = dict(enumerate(spec)) if isinstance(spec, (tuple, list)) else dict(spec or {})
        named = {int(d): _dim_name(v, name, int(d)) for d, v in dims.items()}
        named = {d: n for d, n in named.items() if n is not None}
        if named:
            axes[name] = named
    return axes


def _mirror(value: Any, spec: Any, out: List[Any], where: str) -> None:
    """Append the spec of each tensor in ``value`` (pytree order) to ``out``."""
    if isinstance(value, torch.Tensor):
        out.append(spec)
        return
    if isinstance(value, dict):
        children = list(value.items())
    elif isinstance(value, (tuple, list)):
        children = list(enumerate(value))
    else:
        return  # not a tensor and no container: not a graph input
    for key, child in children:
        if spec is None:
            sub = None
        elif isinstance(spec, dict) and isinstance(value, dict):
            sub = spec.get(key)
        elif isinstance(spec, (tuple, list)) and not isinstance(value, dict) and key < len(spec):
            sub = spec[key]
        else:
            raise ExportError(f"onnx_export_args: dynamic_shapes for {where!r} does not mirror "
                              f"the input's structure ({type(value).__name__})")
        _mirror(child, sub, out, f"{where}[{key!r}]")


def _dim_name(value: Any, input_name: str, dim: int) -> Optional[str]:
    if value is None:
        return None
    if isinstance(value, str):
        return value
    hint = str(getattr(value, "name", "")).upper()  # torch.export.Dim.AUTO / DYNAMIC / STATIC
    if hint == "STATIC":
        return None
    if hint in ("AUTO", "DYNAMIC"):
        return f"{input_name}_dim{dim}"
    return str(getattr(value, "__name__", f"{input_name}_dim{dim}"))


def _unqualified_name(qualified: str) -> str:
    """torch's scope name of a module: its qualified name from the last non-numeric atom on
    (``layer1.0`` stays, ``blocks.first`` -> ``first``, ``enc.1.0`` stays)."""
    atoms = qualified.split(".")
    for i in range(len(atoms) - 1, -1, -1):
        if not atoms[i].isnumeric():
            return ".".join(atoms[i:])
    return qualified


class ScopeResolver:
    """Module paths of a TorchScript-exported node, from its scoped name (module docstring).

    Args:
        model: the exported model.
        called: ``id()`` of each module that ran during the export.
    """

    def __init__(self, model: nn.Module, called: Set[int]) -> None:
        self._ids: Dict[str, int] = {}     # every path (a shared module has several) -> id
        self._first: Dict[int, str] = {}   # id -> its first path, the one torch names scopes by
        for path, module in model.named_modules(remove_duplicate=False):
            self._ids[path] = id(module)
            self._first.setdefault(id(module), path)
        self._called = called
        self._by_scope: Dict[str, List[str]] = {}
        for path, ident in self._ids.items():
            if path and ident in called:
                self._by_scope.setdefault(_unqualified_name(self._first[ident]), []).append(path)

    def stack_of(self, node: onnx.NodeProto) -> List[Tuple[str, str]]:
        """``(module, scope)`` for each scope of ``node``'s name, outermost first: the module by
        its first path in ``named_modules()`` (the last one produced ``node``; none: the root,
        or no scope), and the scope as the exporter wrote it. The scopes up to a module tell
        its calls apart (``relu`` and ``relu_1``; the exporter marks a repeated call on the
        innermost scope only, so the calls of a module whose nodes lie in its submodules'
        scopes look alike).

        Raises:
            ExportError: a scope that fits no module that ran, or several.
        """
        if not node.name.startswith("/"):
            return []  # nodes the exporter created outside any module scope
        scopes = node.name.split("/")[1:-1]
        current = ""
        stack: List[Tuple[str, str]] = []
        for i, scope in enumerate(scopes):
            found = self._child(current, scope, node)
            repeat = REPEAT_SUFFIX.fullmatch(scope)
            if found is None and i == len(scopes) - 1 and repeat:  # a repeated call: <scope>_<k>
                found = self._child(current, repeat.group(1), node)
            if found is None:
                raise ExportError(
                    f"the TorchScript exporter's node {node.name!r}: scope {scope!r} matches no "
                    f"module that ran inside {current or 'the model'}; cannot key its encodings")
            current = found
            stack.append((self._first[self._ids[current]], scope))
        return stack

    def _child(self, current: str, scope: str, node: onnx.NodeProto) -> Optional[str]:
        """The path of the module that ran directly inside ``current`` (perhaps through
        containers that did not run, such as a ModuleList or ModuleDict) whose scope name is
        ``scope``."""
        fits = [p for p in self._by_scope.get(scope, []) if self._directly_inside(p, current)]
        if len({self._ids[p] for p in fits}) > 1:  # decide by the parameters the node reads
            by_param = [p for p in fits  # parameters are named by their module's first path
                        if any(i.startswith(self._first[self._ids[p]] + ".") for i in node.input)]
            fits = by_param if len({self._ids[p] for p in by_param}) == 1 else fits
        if len({self._ids[p] for p in fits}) > 1:
            raise ExportError(
                f"the TorchScript exporter's node {node.name!r}: scope {scope!r} fits modules "
                f"{sorted(fits)}, which its names cannot tell apart; give them distinct "
                "attribute names, or make the model exportable by torch.export")
        return fits[0] if fits else None

    def _directly_inside(self, path: str, current: str) -> bool:
        if current and not path.startswith(current + "."):
            return False
        atoms = path.split(".")
        depth = len(current.split(".")) if current else 0
        between = (".".join(atoms[:k]) for k in range(depth + 1, len(atoms)))
        return not any(self._ids.get(p) in self._called for p in between)


def export(model: nn.Module, args: tuple, kwargs: Dict[str, Any], *, opset: int,
           input_names: Sequence[str], output_names: Optional[Sequence[str]],
           dynamic_axes: Optional[Dict[str, Any]]
           ) -> Tuple[onnx.ModelProto, List[List[Tuple[str, str]]], List[str]]:
    """Export ``model`` (float, eval) with the TorchScript-based exporter (module docstring).

    ``args`` and ``kwargs`` are passed to ``torch.onnx.export`` as they are; ``input_names``
    name the graph inputs (see :func:`dynamo_input_names`).

    Returns:
        ``(model proto, module stack per node, trace notes)``: each stack is
        :meth:`ScopeResolver.stack_of` (its last module is the node's module); the notes are
        the distinct ``TracerWarning`` messages with their source locations, i.e. where the
        trace fixed a value-dependent decision.

    Raises:
        ExportError: a node whose scope names no module unambiguously. Exceptions of torch's
            exporter propagate.
    """
    called: Set[int] = set()

    def record(module: nn.Module, _inputs: Any) -> None:
        called.add(id(module))

    buffer = io.BytesIO()
    handle = nn.modules.module.register_module_forward_pre_hook(record)
    try:
        with warnings.catch_warnings(record=True) as caught, \
                contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("always")
            torch.onnx.export(model, args, buffer, kwargs=kwargs or None, dynamo=False,
                              opset_version=opset, input_names=list(input_names),
                              output_names=list(output_names) if output_names else None,
                              dynamic_axes=dynamic_axes, do_constant_folding=False,
                              keep_initializers_as_inputs=True, verbose=False)
    finally:
        handle.remove()
    proto = onnx.load_from_string(buffer.getvalue())
    params = {i.name for i in proto.graph.initializer}
    graph_inputs = [i for i in proto.graph.input if i.name not in params]
    del proto.graph.input[:]
    proto.graph.input.extend(graph_inputs)
    proto = onnx.shape_inference.infer_shapes(proto)
    resolver = ScopeResolver(model, called)
    stacks = [resolver.stack_of(node) for node in proto.graph.node]
    notes = list(dict.fromkeys(  # first sentence only: the rest is the same boilerplate
        f"{w.filename}:{w.lineno}: {str(w.message).split('. ')[0].strip()}" for w in caught
        if issubclass(w.category, torch.jit.TracerWarning)))
    return proto, stacks, notes
