"""``prepare_model``: rewrite a model so that every op a quantizer must see is a module.

Steps (aimet_torch's ``prepare_model`` contract, plus what transformers need):

1. ``nn.MultiheadAttention`` -> :class:`~quantsim.nn.QuantizableMultiheadAttention`;
2. trace the model with torch.fx (:mod:`quantsim.prepare.tracing`); if the whole model does
   not trace, trace each child instead, recursively, and keep what does not trace as it is;
3. in every traced piece: decompose ``F.scaled_dot_product_attention``, turn functional ops
   into modules, un-share modules called more than once (:mod:`quantsim.prepare.rewrite`);
4. with a ``dummy_input``, check every rewritten piece against the original: bit for bit, or
   to float rounding where attention was decomposed. A piece that fails the check is not
   used (its children are tried instead).

A ``dummy_input`` is optional for models torch.fx traces symbolically. It is what makes
Python control flow on shapes traceable (HuggingFace models): the piece is traced on the
example and specialised to its branch decisions, which are logged.
"""
from __future__ import annotations

import copy
import inspect
import logging
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Type

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from quantsim.errors import UnsupportedModelError
from quantsim.nn.attention import replace_multihead_attention
from quantsim.prepare._recording import RuntimeTrace, float_outputs_equal, record_run
from quantsim.prepare.functional import COMPUTE_OP_NAMES, runtime_op_name
from quantsim.prepare.rewrite import RewriteStats, rewrite_graph_module
from quantsim.prepare.tracing import clone_example, trace_module

__all__ = ["prepare_model", "PrepareReport"]

logger = logging.getLogger("quantsim.prepare")

#: tolerance for pieces whose attention was decomposed (float re-association only)
_ATTENTION_RTOL, _ATTENTION_ATOL = 1e-4, 1e-5


@dataclass
class PrepareReport:
    """What :func:`prepare_model` did; also stored as ``prepared._quantsim_prepare_report``.

    Attributes:
        traced: module paths replaced by a rewritten GraphModule ('' = the whole model).
        untraced: module path -> why it could not be traced (its children were tried).
        unconverted_ops: ops that stay functional, as ``"path: op at file:line"``.
        specializations: module path -> decisions fixed on the dummy input.
        stats: module path -> :class:`~quantsim.prepare.rewrite.RewriteStats`.
    """

    traced: List[str] = field(default_factory=list)
    untraced: Dict[str, str] = field(default_factory=dict)
    unconverted_ops: List[str] = field(default_factory=list)
    specializations: Dict[str, List[str]] = field(default_factory=dict)
    stats: Dict[str, RewriteStats] = field(default_factory=dict)


class _Context:
    def __init__(self, leaf, examples: Optional[Dict[str, Tuple]], concrete_args,
                 data_movement: bool) -> None:
        self.leaf = leaf
        self.examples = examples
        self.concrete_args = concrete_args
        self.data_movement = data_movement
        self.report = PrepareReport()
        self.taken: set = set()


def _is_torch_leaf(module: nn.Module) -> bool:
    name = type(module).__module__
    composite = (nn.Sequential, nn.ModuleList, nn.ModuleDict, nn.TransformerEncoderLayer,
                 nn.TransformerDecoderLayer, nn.TransformerEncoder, nn.TransformerDecoder,
                 nn.Transformer)
    return (name.startswith("torch.nn") or name.startswith("torch.ao.nn")) and \
        not isinstance(module, composite) and not isinstance(module, fx.GraphModule)


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _close(got: Any, expected: Any) -> Optional[str]:
    lg, sg = pytree.tree_flatten(got)
    le, se = pytree.tree_flatten(expected)
    if sg != se:
        return "output structure changed"
    for g, e in zip(lg, le):
        if isinstance(e, torch.Tensor):
            if not torch.allclose(g, e, rtol=_ATTENTION_RTOL, atol=_ATTENTION_ATOL,
                                  equal_nan=True):
                return f"output differs by up to {(g - e).abs().max().item():.3g}"
    return None


def _verify(gm: fx.GraphModule, example: Tuple, stats: RewriteStats) -> Optional[str]:
    """None if the rewritten module still reproduces the example output."""
    args, kwargs, expected = clone_example(example)
    try:
        with torch.no_grad():
            got = gm(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001
        return f"the rewritten module fails on the example ({type(exc).__name__}: {exc})"
    if stats.decomposed_attention:
        return _close(got, expected)
    return float_outputs_equal(got, expected)


def _optional_arguments(module: nn.Module) -> List[str]:
    """Names of ``forward`` parameters that have a default (or are ``*args``/``**kwargs``)."""
    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in params
            if p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def _copy_plain_attributes(source: nn.Module, target: nn.Module) -> None:
    """Keep the flags and config objects a parent's code may read from a replaced child."""
    for key, value in vars(source).items():
        if key.startswith("_") or key == "training" or hasattr(target, key):
            continue
        if isinstance(value, (nn.Module, torch.Tensor)):
            continue
        setattr(target, key, value)


def _prepare(module: nn.Module, path: str, ctx: _Context) -> nn.Module:
    """The prepared replacement of ``module`` (possibly ``module`` with prepared children)."""
    if path and (ctx.leaf(module) or _is_torch_leaf(module)):
        return module
    example = None if ctx.examples is None else ctx.examples.get(path)
    optional = _optional_arguments(module) if path and example is None else []
    if ctx.examples is not None and example is None and path:
        # never called on the dummy input (a ModuleList, an unused branch): nothing to check
        # a trace against, but its children may have run
        result = None
    elif optional:
        # symbolic tracing would take `if arg is None:` as False for every optional argument,
        # and without an example nothing would catch a graph the parent then calls wrongly
        result = None
        ctx.report.untraced[path] = (
            f"not traced without a dummy_input: forward has optional arguments {optional}")
    else:
        result = trace_module(module, ctx.leaf, example, ctx.concrete_args if not path else None)
    if result is not None and result.graph_module is not None:
        gm = result.graph_module
        stats = rewrite_graph_module(gm, ctx.data_movement, ctx.taken)
        problem = None if example is None or not stats.changed else _verify(gm, example, stats)
        if problem is None:
            if not stats.changed and path:
                return module
            _copy_plain_attributes(module, gm)
            ctx.taken.update(stats.module_ids)
            ctx.report.traced.append(path)
            ctx.report.stats[path] = stats
            if result.specializations:
                ctx.report.specializations[path] = result.specializations
            return gm
        ctx.report.untraced[path] = f"rewritten graph rejected: {problem}"
        logger.warning("prepare_model: rewriting %r changed its output (%s); its children "
                       "are prepared instead", path or "<model>", problem)
    elif result is not None:
        ctx.report.untraced[path] = result.error or "not traceable"
    for name, child in list(module.named_children()):
        new = _prepare(child, _join(path, name), ctx)
        if new is not child:
            setattr(module, name, new)
    return module


def _leaf_predicate(work: nn.Module, original: nn.Module,
                    modules_to_exclude: Optional[Iterable[nn.Module]],
                    classes: Optional[Sequence[Type[nn.Module]]]):
    names = {id(m): n for n, m in original.named_modules(remove_duplicate=False)}
    excluded = set()
    for m in modules_to_exclude or ():
        if id(m) not in names:
            raise UnsupportedModelError(
                f"prepare_model: modules_to_exclude holds a {type(m).__name__} that is not a "
                "submodule of the model")
        excluded.add(id(work.get_submodule(names[id(m)])))
    classes = tuple(classes or ())

    def leaf(m: nn.Module) -> bool:
        return id(m) in excluded or (bool(classes) and isinstance(m, classes)) or \
            type(m).__module__.startswith("quantsim.")
    return leaf


def _unconverted(trace: RuntimeTrace, report: PrepareReport) -> None:
    """List the compute ops that the prepared model still runs functionally."""
    for call in trace.op_calls:
        name, _ = runtime_op_name(call.func)
        if name in COMPUTE_OP_NAMES and call.touches_float:
            report.unconverted_ops.append(
                f"{call.owner or '<model>'}: {name} at {call.location}")


def prepare_model(model: nn.Module, modules_to_exclude: Optional[List[nn.Module]] = None,
                  module_classes_to_exclude: Optional[List[Type[nn.Module]]] = None,
                  concrete_args: Optional[Dict[str, Any]] = None, *,
                  dummy_input: Any = None, convert_data_movement: bool = False,
                  inplace: bool = False) -> nn.Module:
    """Rewrite ``model`` so functional ops become modules a quantizer wrapper can see.

    Args:
        model: the float model.
        modules_to_exclude: submodules (of ``model``) not to trace into; kept as they are.
        module_classes_to_exclude: module classes not to trace into.
        concrete_args: fixed values for some ``forward`` arguments of the whole model
            (``torch.fx.symbolic_trace`` semantics).
        dummy_input: an input as ``model`` takes it (tensor, tuple of positional inputs,
            or dict read by ``forward``'s signature: :func:`quantsim.graph.split_dummy_input`).
            Enables example-guided tracing of code that branches on shapes, and the check of
            every rewritten piece against the original.
        convert_data_movement: also turn ``view``/``reshape``/``permute``/``transpose``/
            ``flatten`` into modules (``Reshape``, ``Permute``, ``Transpose``, ``nn.Flatten``).
        inplace: modify ``model`` itself instead of a deep copy.

    Returns:
        A ``torch.fx.GraphModule`` when the whole model traces, else the model with its
        traceable submodules replaced by prepared GraphModules. Outputs equal the original's
        bit for bit, except where attention was decomposed (equal to float rounding).
        ``_quantsim_prepare_report`` on the result holds a :class:`PrepareReport`.

    Raises:
        UnsupportedModelError: ``model`` is an ``nn.DataParallel``, or an excluded module is
            not part of it.

    Example:
        >>> class Net(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.fc = nn.Linear(4, 4)
        ...     def forward(self, x):
        ...         return torch.relu(self.fc(x)) + x
        >>> prepared = prepare_model(Net())
        >>> sorted(n for n, _ in prepared.named_children())
        ['add', 'fc', 'relu']
    """
    if isinstance(model, nn.DataParallel):
        raise UnsupportedModelError(
            "prepare_model: torch.nn.DataParallel is not supported; prepare model.module and "
            "use torch.nn.parallel.DistributedDataParallel for multi-GPU runs")
    work = model if inplace else copy.deepcopy(model)
    leaf = _leaf_predicate(work, model, modules_to_exclude, module_classes_to_exclude)
    work = replace_multihead_attention(work)
    modes = {id(m): m.training for m in work.modules()}
    work.eval()
    trace = None if dummy_input is None else record_run(work, dummy_input, examples=True)
    ctx = _Context(leaf, None if trace is None else trace.examples, concrete_args,
                   convert_data_movement)
    try:
        prepared = _prepare(work, "", ctx)
    except BaseException:
        _restore_modes(work, modes, model.training)
        raise
    _restore_modes(prepared, modes, model.training)
    if dummy_input is not None:
        _unconverted(record_run(prepared, dummy_input, ops=True), ctx.report)
    _log(ctx.report)
    prepared._quantsim_prepare_report = ctx.report
    return prepared


def _restore_modes(prepared: nn.Module, modes: Dict[int, bool], default: bool) -> None:
    """Give every module back its training flag; new modules take their parent's."""
    def visit(module: nn.Module, parent_mode: bool) -> None:
        mode = modes.get(id(module), parent_mode)
        module.training = mode
        for child in module.children():
            visit(child, mode)
    visit(prepared, modes.get(id(prepared), default))


def _log(report: PrepareReport) -> None:
    for path in report.traced:
        stats = report.stats[path]
        logger.info("prepare_model: %s traced; converted %s, decomposed %d attention(s), "
                    "unshared %s", path or "<model>", dict(stats.converted),
                    stats.decomposed_attention, stats.unshared)
    for path, notes in report.specializations.items():
        logger.info("prepare_model: %s specialised on the dummy input: %s",
                    path or "<model>", "; ".join(notes))
    if report.unconverted_ops:
        logger.warning(
            "prepare_model: %d functional op(s) remain unquantizable (code that does not "
            "trace): %s. Untraceable modules: %s", len(report.unconverted_ops),
            "; ".join(report.unconverted_ops[:10]),
            "; ".join(f"{p or '<model>'}: {e}" for p, e in report.untraced.items()))
