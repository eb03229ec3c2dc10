"""Trace a model once to learn which module feeds which.

Forward hooks on every leaf module record, in call order, where each tensor input came from:

* ``model_input``: a tensor of ``dummy_input`` (or a view of one);
* ``module``: the output of a traced leaf module (or a view of it: ``view``/``reshape``/
  ``permute``/slicing share storage, so the values are the producer's, unchanged);
* ``other``: anything else: the result of a functional op or tensor method (``x + y``,
  ``torch.cat``), a constant, a buffer. Such a tensor reaches the consumer unquantized.

This works on any model that runs (no torch.fx restrictions), which is what placement needs.
"""
from __future__ import annotations

import contextlib
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Set, Tuple

import torch
from torch import nn
from torch.utils import _pytree as pytree

from quantsim.errors import UnsupportedModelError


@dataclass(frozen=True)
class Source:
    """Where a tensor came from: ``kind`` in {'model_input', 'module', 'other'}."""

    kind: str
    producer: Optional[str] = None
    output_index: int = 0
    is_view: bool = False


@dataclass
class ModuleCall:
    """One call of a leaf module during the trace."""

    name: str
    module: nn.Module
    inputs: List[Optional[Source]]  # per flattened positional input; None: not a float tensor
    num_outputs: int                 # float tensors in the flattened output


@dataclass
class ModelGraph:
    """What one traced forward pass showed."""

    calls: List[ModuleCall] = field(default_factory=list)
    #: (producer, output index) -> [(consumer, input index), ...], one entry per use in any call
    consumers: Dict[Tuple[str, int], List[Tuple[str, int]]] = field(
        default_factory=lambda: defaultdict(list))
    #: (producer, output index) that are (views of) model outputs
    model_outputs: Set[Tuple[str, int]] = field(default_factory=set)
    #: module name -> number of calls in one forward
    call_counts: Dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def first_call(self, name: str) -> Optional[ModuleCall]:
        """The first recorded call of module ``name`` (None if it never ran)."""
        for call in self.calls:
            if call.name == name:
                return call
        return None

    def sole_consumer(self, name: str) -> Optional[str]:
        """The module that reads ``name``'s only output, if it is read exactly once per forward
        (by one input of one call; every call of a module called more than once counts)."""
        uses = self.consumers.get((name, 0), [])
        if len(uses) != 1 or (name, 0) in self.model_outputs:
            return None
        return uses[0][0]


def float_leaves(obj: Any) -> List[torch.Tensor]:
    """The floating-point tensors in a (nested) structure, in pytree order."""
    return [t for t in pytree.tree_leaves(obj) if isinstance(t, torch.Tensor)
            and t.is_floating_point()]


def _storage_key(t: torch.Tensor) -> int:
    try:
        return t.untyped_storage().data_ptr()
    except RuntimeError:  # tensors without storage (e.g. some subclasses)
        return -1


@contextlib.contextmanager
def preserved_modes(model: nn.Module) -> Iterator[nn.Module]:
    """Restore every module's own train/eval flag (not just the root's) after the block,
    whatever the block, or a user callback it runs, sets."""
    modes = {m: m.training for m in model.modules()}
    try:
        yield model
    finally:
        for m, training in modes.items():
            m.training = training


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode for the block; every module's own train/eval flag is restored
    afterwards (not just the root's)."""
    with preserved_modes(model):
        model.eval()
        yield model


def split_dummy_input(dummy_input: Any) -> Tuple[tuple, Dict[str, Any]]:
    """``(args, kwargs)`` of a ``dummy_input``: a tuple is the positional arguments, a dict the
    keyword arguments, anything else the single positional argument."""
    if isinstance(dummy_input, tuple):
        return dummy_input, {}
    if isinstance(dummy_input, dict):
        return (), dict(dummy_input)
    return (dummy_input,), {}


def run_forward(model: nn.Module, dummy_input: Any) -> Any:
    """Call ``model`` with ``dummy_input`` as the sim does (see :func:`split_dummy_input`)."""
    args, kwargs = split_dummy_input(dummy_input)
    return model(*args, **kwargs)


def trace(model: nn.Module, dummy_input: Any, leaves: Dict[str, nn.Module],
          forward: Callable[[nn.Module, Any], Any] = run_forward) -> ModelGraph:
    """Run ``model`` once on ``dummy_input`` with hooks on ``leaves`` and return the graph.

    The pass runs in eval mode under ``no_grad`` (so BatchNorm statistics and the like are not
    touched); every module's train/eval mode is restored afterwards.

    Raises:
        UnsupportedModelError: the forward pass with ``dummy_input`` failed (the cause chained).
    """
    graph = ModelGraph()
    produced: Dict[int, Source] = {}
    storages: Dict[int, Source] = {}
    keep_alive: List[torch.Tensor] = []  # ids must not be reused during the trace

    def remember(t: torch.Tensor, source: Source) -> None:
        keep_alive.append(t)
        produced[id(t)] = source
        key = _storage_key(t)
        if key not in (-1, 0):
            storages.setdefault(key, source)

    def source_of(t: torch.Tensor) -> Source:
        if id(t) in produced:
            return produced[id(t)]
        base = storages.get(_storage_key(t))
        if base is not None:
            return Source(base.kind, base.producer, base.output_index, is_view=True)
        return Source("other")

    for t in float_leaves(dummy_input):
        remember(t, Source("model_input"))

    pending: Dict[str, List[List[Optional[Source]]]] = defaultdict(list)

    def pre_hook(name: str):
        def hook(module, args, kwargs):
            sources = []
            for leaf in pytree.tree_leaves(args):
                if isinstance(leaf, torch.Tensor) and leaf.is_floating_point():
                    sources.append(source_of(leaf))
                elif isinstance(leaf, torch.Tensor):
                    sources.append(None)
            pending[name].append(sources)
        return hook

    def post_hook(name: str):
        def hook(module, args, kwargs, output):
            sources = pending[name].pop()
            outs = float_leaves(output)
            index = graph.call_counts[name]
            graph.call_counts[name] += 1
            graph.calls.append(ModuleCall(name, module, sources, len(outs)))
            for i, src in enumerate(sources):
                if src is not None and src.kind == "module":
                    graph.consumers[(src.producer, src.output_index)].append((name, i))
            for i, t in enumerate(outs):
                remember(t, Source("module", name, i))
        return hook

    handles = []
    for name, module in leaves.items():
        handles.append(module.register_forward_pre_hook(pre_hook(name), with_kwargs=True))
        handles.append(module.register_forward_hook(post_hook(name), with_kwargs=True))
    try:
        with eval_mode(model), torch.no_grad():
            output = forward(model, dummy_input)
    except Exception as exc:
        raise UnsupportedModelError(
            f"the model's forward failed with dummy_input ({type(exc).__name__}: {exc}); "
            "pass a dummy_input the model accepts (a tensor, a tuple of positional inputs, or a "
            "dict of keyword inputs)") from exc
    finally:
        for h in handles:
            h.remove()
    for t in float_leaves(output):
        src = source_of(t)
        if src.kind == "module":
            graph.model_outputs.add((src.producer, src.output_index))
    return graph


def leaf_modules(model: nn.Module, is_leaf: Callable[[nn.Module], bool]) -> Dict[str, nn.Module]:
    """Named modules for which ``is_leaf`` holds, without descending into them."""
    found: Dict[str, nn.Module] = {}

    def visit(prefix: str, module: nn.Module) -> None:
        for child_name, child in module.named_children():
            name = f"{prefix}.{child_name}" if prefix else child_name
            if is_leaf(child):
                found[name] = child
            else:
                visit(name, child)

    visit("", model)
    return found
