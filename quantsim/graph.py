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
import inspect
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Set, Tuple

import torch
from torch import nn
from torch.utils import _pytree as pytree

from quantsim.errors import DummyInputError, UnsupportedModelError


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


class KeywordInputs(dict):
    """A ``dummy_input`` that is always passed as keyword arguments: ``forward(**inputs)``.

    Only needed where :func:`split_dummy_input` finds a plain dict ambiguous (a ``forward`` that
    takes ``*args, **kwargs``, or keys only ``**kwargs`` would take); a one-element tuple
    ``(inputs,)`` is the positional choice.

    Example:
        >>> KeywordInputs(input_ids=torch.ones(1, 4, dtype=torch.long))
        KeywordInputs({'input_ids': tensor([[1, 1, 1, 1]])})
    """

    def __repr__(self) -> str:
        return f"KeywordInputs({dict.__repr__(self)})"


def forward_signature(model: nn.Module) -> Optional[inspect.Signature]:
    """The signature of ``model.forward`` without ``self`` (None if it cannot be read).

    A ``forward`` that takes only ``*args, **kwargs`` and sits in front of a base class's own
    ``forward`` (a mixin handing its arguments to ``super().forward``, as quantsim's
    quantized-module wrapper does) is looked through to that base class's signature.
    """
    try:
        own = inspect.signature(model.forward)
        if "forward" in vars(model) or not _takes_anything(own):
            return own
        for cls in type(model).__mro__:
            fn = cls.__dict__.get("forward")
            if fn is not None and cls is not nn.Module:
                sig = inspect.signature(fn.__get__(model, cls))
                if not _takes_anything(sig):
                    return sig
        return own
    except (TypeError, ValueError):  # builtins and C extensions without signature metadata
        return None


def _takes_anything(sig: inspect.Signature) -> bool:
    """True for ``(*args, **kwargs)``-style signatures that name no parameter."""
    return all(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in sig.parameters.values())


def _binds(sig: inspect.Signature, args: tuple, kwargs: Dict[str, Any]) -> bool:
    try:
        sig.bind(*args, **kwargs)
    except TypeError:
        return False
    return True


def split_dummy_input(model: nn.Module, dummy_input: Any) -> Tuple[tuple, Dict[str, Any]]:
    """``(args, kwargs)`` with which ``model`` is called on ``dummy_input`` (the one rule that
    the sim, export, verify and prepare share).

    As in aimet-torch, a tuple or a list is spread over the positional arguments (a list that
    only fits ``forward`` as one argument, ``forward(self, xs: List[Tensor])``, is that
    argument) and anything else but a dict is the single positional argument. A dict is read
    from ``forward``'s signature:

    * keyword arguments (``forward(**d)``) when every key names a parameter of ``forward`` and
      the call binds (``forward(self, input_ids, attention_mask=None)``, Hugging Face models);
    * otherwise the one positional argument (``forward(d)``, as aimet-torch passes it) when
      only that binds (``forward(self, inputs)`` reading ``inputs['x']``);
    * keyword arguments when only they bind (some keys land in ``**kwargs``).

    :class:`KeywordInputs` always means keyword arguments; ``(d,)`` always means positional.

    Raises:
        DummyInputError: a dict that binds both ways though some key is no parameter name
            (``forward(self, x, **kwargs)`` with ``{'x': .., 'mask': ..}``, ``forward(self,
            *args, **kwargs)``), or that binds neither way.
    """
    if isinstance(dummy_input, KeywordInputs):
        return (), dict(dummy_input)
    if isinstance(dummy_input, tuple):
        return dummy_input, {}
    if not isinstance(dummy_input, (dict, list)):
        return (dummy_input,), {}
    sig = forward_signature(model)
    if isinstance(dummy_input, list):
        if sig is not None and not _binds(sig, tuple(dummy_input), {}) \
                and _binds(sig, (dummy_input,), {}):
            return (dummy_input,), {}
        return tuple(dummy_input), {}
    if sig is None:  # nothing to read: aimet-torch's reading
        return (dummy_input,), {}
    positional = _binds(sig, (dummy_input,), {})
    keywords = all(isinstance(k, str) for k in dummy_input) and _binds(sig, (), dummy_input)
    named = {p.name for p in sig.parameters.values()
             if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    if keywords and (not positional or set(dummy_input) <= named):
        return (), dict(dummy_input)
    if positional and not keywords:
        return (dummy_input,), {}
    keys = list(dummy_input)
    where = f"{type(model).__name__}.forward{sig}"
    if positional:
        raise DummyInputError(
            f"dummy_input: a dict with keys {keys} fits {where} both as its one positional "
            "argument (forward(dummy_input)) and as keyword arguments (forward(**dummy_input)), "
            "and the two calls differ. Choose: pass (dummy_input,) for the positional reading, "
            "or quantsim.KeywordInputs(dummy_input) for the keyword reading.")
    raise DummyInputError(
        f"dummy_input: a dict with keys {keys} fits {where} neither as its one positional "
        "argument nor as keyword arguments. Pass a tuple of positional inputs, or a dict whose "
        "keys are forward's parameter names.")


def run_forward(model: nn.Module, dummy_input: Any) -> Any:
    """Call ``model`` with ``dummy_input`` as the sim does (see :func:`split_dummy_input`)."""
    args, kwargs = split_dummy_input(model, dummy_input)
    return model(*args, **kwargs)


def trace(model: nn.Module, dummy_input: Any, leaves: Dict[str, nn.Module]) -> ModelGraph:
    """Run ``model`` once on ``dummy_input`` with hooks on ``leaves`` and return the graph.

    The pass runs in eval mode under ``no_grad`` (so BatchNorm statistics and the like are not
    touched); every module's train/eval mode is restored afterwards.

    Raises:
        DummyInputError: a dict ``dummy_input`` that :func:`split_dummy_input` cannot read.
        UnsupportedModelError: the forward pass with ``dummy_input`` failed (the cause chained).
    """
    args, kwargs = split_dummy_input(model, dummy_input)
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

    for t in float_leaves((args, kwargs)):
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
            output = model(*args, **kwargs)
    except Exception as exc:
        raise UnsupportedModelError(
            f"the model's forward failed with dummy_input, passed {_reading(args, kwargs)} "
            f"({type(exc).__name__}: {exc}); pass a dummy_input the model accepts: a tensor, a "
            "tuple of positional inputs, or a dict (keyword arguments when its keys name "
            "forward's parameters, else the one positional argument; see "
            "quantsim.graph.split_dummy_input)") from exc
    finally:
        for h in handles:
            h.remove()
    for t in float_leaves(output):
        src = source_of(t)
        if src.kind == "module":
            graph.model_outputs.add((src.producer, src.output_index))
    return graph


def _reading(args: tuple, kwargs: Dict[str, Any]) -> str:
    """How a call passes its inputs, for messages."""
    if kwargs:
        return f"as keyword arguments {list(kwargs)}"
    if len(args) == 1:
        return f"as the one positional argument (a {type(args[0]).__name__})"
    return f"as {len(args)} positional arguments"


def leaf_modules(model: nn.Module, is_leaf: Callable[[nn.Module], bool]) -> Dict[str, nn.Module]:
    """Named modules for which ``is_leaf`` holds, without descending into them.

    A module reachable under several paths (assigned as an attribute and also placed in an
    ``nn.Sequential``) is listed once, under its first path in ``model.named_modules()`` order;
    :func:`module_aliases` maps its other paths to that one.
    """
    found: Dict[str, nn.Module] = {}
    seen: Set[int] = {id(model)}

    def visit(prefix: str, module: nn.Module) -> None:
        for child_name, child in module.named_children():
            if id(child) in seen:
                continue
            seen.add(id(child))
            name = f"{prefix}.{child_name}" if prefix else child_name
            if is_leaf(child):
                found[name] = child
            else:
                visit(name, child)

    visit("", model)
    return found


def module_aliases(model: nn.Module) -> Dict[str, str]:
    """Every further path of a module reachable under several paths -> its first path (the
    one ``model.named_modules()`` yields), submodules of such a module included.

    Example:
        >>> block = nn.Linear(2, 2)
        >>> model = nn.Module()
        >>> model.block, model.body = block, nn.Sequential(block, nn.ReLU())
        >>> module_aliases(model)
        {'body.0': 'block'}
    """
    first: Dict[int, str] = {}
    aliases: Dict[str, str] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        canonical = first.setdefault(id(module), name)
        if canonical != name:
            aliases[name] = canonical
    return aliases
