"""torch.fx tracing for preparation: symbolic, or guided by example inputs.

:func:`trace_module` first tries plain symbolic tracing. When that fails (Python control flow
on tensor values or shapes, ``len(x)``, ``*x.shape`` unpacking, ``torch.finfo(x.dtype)``...)
and example inputs are known, it traces again with a *concrete* tracer: every proxy carries the
value the op produces on the example, so ``if q_len > 1:`` or ``(*x.shape[:-1], -1)`` are
decided on the example. The graph is then *specialised* to those decisions; each one is
recorded (:attr:`TraceResult.specializations`) with the line of code that made it. Only
decisions on shapes, ranks and dtypes are taken this way: a branch on tensor *values*
(``if x.sum() > 0:``, ``int(x.max())``) still fails the trace, because another input could
take the other branch.

Arguments that hold no tensor (``None``, flags, ints) are fixed to the example's value; the
traced module keeps its original signature so callers need not change.

Both tracers keep torch.nn layers, modules from ``quantsim`` and the caller's excluded modules
as leaves, but trace into the composite ``nn.Transformer*`` layers so their residual adds
become visible.
"""
from __future__ import annotations

import inspect
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from quantsim.prepare._recording import float_outputs_equal
from quantsim.prepare.tracers import (
    DATA,
    FX_FILES,
    VALUE,
    ConcreteTracer,
    PrepareTracer,
    ReloadTracer,
    check_fixed_argument,
    guard_fixed_arguments,
)

__all__ = ["TraceResult", "trace_module", "VALUE", "KIND", "failure_location", "clone_example",
           "check_fixed_argument"]

#: ``node.meta`` key: what a node produced on the example: 'float', 'tensor' or 'other'
KIND = "quantsim_kind"


@dataclass
class TraceResult:
    """The outcome of tracing one module.

    Attributes:
        graph_module: the traced module, or None on failure.
        error: why tracing failed (with the user code location), or None.
        concrete: True if the example-guided tracer produced it.
        specializations: ``"file:line: what was fixed"`` for every decision taken on the example.
    """

    graph_module: Optional[fx.GraphModule] = None
    error: Optional[str] = None
    concrete: bool = False
    specializations: List[str] = field(default_factory=list)


def failure_location(exc: BaseException) -> str:
    """``file:line in fn`` of the innermost traceback frame outside torch.fx and quantsim."""
    frames = traceback.extract_tb(exc.__traceback__)
    for frame in reversed(frames):
        name = frame.filename.replace("\\", "/")
        if not any(part in name for part in FX_FILES):
            return f"{frame.filename}:{frame.lineno} in {frame.name} ({frame.line})"
    return "<unknown location>"


def _resolve_string_annotations(module: nn.Module, graph: fx.Graph) -> None:
    """Turn the string type hints fx copied from ``forward`` into types, or drop them.

    Under ``from __future__ import annotations`` every hint is a string; fx keeps it on the
    placeholder / output node, and the generated code then names a global whose value is a
    string, which ``torch.package`` (pickling a GraphModule) cannot import. Hints are only
    documentation on the generated ``forward``, so one that does not resolve is dropped.
    """
    namespace = getattr(inspect.unwrap(type(module).forward), "__globals__", {})
    for node in graph.nodes:
        if isinstance(node.type, str):
            try:
                node.type = eval(node.type, dict(namespace))  # noqa: S307 - the user's own hint
            except Exception:  # noqa: BLE001 - unresolvable: keep no hint
                node.type = None


def _graph_module(tracer: fx.Tracer, module: nn.Module, graph: fx.Graph) -> fx.GraphModule:
    """The GraphModule, with the original's non-persistent buffers kept out of state_dict."""
    _resolve_string_annotations(module, graph)
    graph._tracer_cls = ReloadTracer  # what unpickling re-traces the generated code with
    gm = fx.GraphModule(tracer.root, graph, class_name=type(module).__name__)
    copies = dict(gm.named_modules())
    for path, original in module.named_modules():
        target = copies.get(path)
        if target is None:
            continue
        for name in original._non_persistent_buffers_set:
            if name in target._buffers:
                target._non_persistent_buffers_set.add(name)
    return gm


def trace_module(module: nn.Module, leaf: Callable[[nn.Module], bool],
                 example: Optional[Tuple[tuple, dict, Any]] = None,
                 concrete_args: Optional[Dict[str, Any]] = None) -> TraceResult:
    """Trace ``module`` into a GraphModule, checking it against ``example`` when given.

    Args:
        module: the module to trace (in the mode it should be traced in).
        leaf: ``module -> bool``: modules not to trace into (besides torch.nn layers).
        example: ``(args, kwargs, output)`` of one real call; enables the concrete tracer
            and the check that the graph reproduces ``output`` bit for bit.
        concrete_args: passed to symbolic tracing (``torch.fx`` semantics).

    Returns:
        A :class:`TraceResult`; ``graph_module`` is None when both tracers failed or the
        traced graph did not reproduce the example output.
    """
    errors: List[str] = []
    try:
        tracer = PrepareTracer(leaf)
        graph = tracer.trace(module, concrete_args)
        gm = _graph_module(tracer, module, graph)
        problem = None if example is None else _check(gm, example, annotate=True)
        if problem is None:
            return TraceResult(gm)
        errors.append(f"symbolic trace: {problem}")
    except Exception as exc:  # noqa: BLE001 - any failure means "try something else"
        errors.append(f"symbolic trace failed at {failure_location(exc)}: "
                      f"{type(exc).__name__}: {exc}")
    if example is None:
        return TraceResult(error=errors[-1])
    try:
        ctracer = ConcreteTracer(leaf, example[0], example[1])
        graph = ctracer.trace(module)
        for node in graph.nodes:
            node.meta.pop(DATA, None)
            if VALUE in node.meta:
                node.meta[KIND] = _describe(node.meta.pop(VALUE))
        guard_fixed_arguments(graph, ctracer.fixed)
        gm = _graph_module(ctracer, module, graph)
        problem = _check(gm, example)
        if problem is None:
            return TraceResult(gm, concrete=True, specializations=ctracer.specializations)
        errors.append(f"example-guided trace: {problem}")
    except Exception as exc:  # noqa: BLE001
        errors.append(f"example-guided trace failed at {failure_location(exc)}: "
                      f"{type(exc).__name__}: {exc}")
    return TraceResult(error="; ".join(errors))


def clone_example(example: Tuple[tuple, dict, Any]) -> Tuple[tuple, dict, Any]:
    """A copy of an example whose tensors a run may modify in place."""
    return pytree.tree_map(
        lambda x: x.clone() if isinstance(x, torch.Tensor) else x, example)


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return "float" if value.is_floating_point() else "tensor"
    return "other"


class _Annotator(fx.Interpreter):
    """Runs a graph and records in ``node.meta[KIND]`` what each node produced."""

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        n.meta[KIND] = _describe(out)
        return out


def _positional(gm: fx.GraphModule, args: tuple, kwargs: dict) -> List[Any]:
    """The call's arguments in placeholder order."""
    sig = inspect.signature(gm.forward)
    bound = sig.bind(*args, **kwargs)
    bound.apply_defaults()
    values: List[Any] = []
    for param in sig.parameters.values():
        value = bound.arguments[param.name]
        if param.kind == param.VAR_POSITIONAL:
            values.extend(value)
        else:
            values.append(value)
    return values


def _check(gm: fx.GraphModule, example: Tuple[tuple, dict, Any],
           annotate: bool = False) -> Optional[str]:
    """None if ``gm`` reproduces the example output exactly, else the difference.

    With ``annotate``, runs through an interpreter that fills ``node.meta[KIND]``.
    """
    args, kwargs, expected = clone_example(example)
    try:
        with torch.no_grad():
            if annotate:
                got = _Annotator(gm).run(*_positional(gm, args, kwargs))
            else:
                got = gm(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001
        return f"the traced graph fails on the example ({type(exc).__name__}: {exc})"
    problem = float_outputs_equal(got, expected)
    return None if problem is None else f"the traced graph's {problem}"
