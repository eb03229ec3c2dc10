"""Run a model once and record what its modules and functional ops did.

Forward hooks see every module call (its inputs, outputs, how often it ran); a
``TorchFunctionMode`` sees every torch function and tensor method (``x + y``, ``torch.cat``,
``F.relu``...) together with the module whose ``forward`` code issued it. BatchNorm folding
uses this to find conv -> BN pairs, the validator to find unquantized functional ops and
reused modules, and ``prepare_model`` to get example inputs for each submodule.

Modules without children and modules from ``quantsim`` itself count as *leaves*: the ops
inside them belong to that module and are not recorded as functional ops of a container.
"""
from __future__ import annotations

import sys
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from quantsim.graph import run_forward

__all__ = ["ModuleCall", "OpCall", "RuntimeTrace", "record_run", "is_leaf_module",
           "tensors_in"]

# frames from these files are skipped when looking for the line of user code that ran an op
_INTERNAL_FILES = ("/torch/", "/quantsim/prepare/", "/quantsim/nn/")


def is_leaf_module(module: nn.Module) -> bool:
    """A module whose internals are its own business: no children, or a quantsim module."""
    return next(iter(module.children()), None) is None or \
        type(module).__module__.startswith("quantsim.")


def tensors_in(obj: Any) -> List[torch.Tensor]:
    """The tensors of a (nested) structure, in pytree order."""
    return [t for t in pytree.tree_leaves(obj) if isinstance(t, torch.Tensor)]


def user_location(skip: Tuple[str, ...] = _INTERNAL_FILES) -> str:
    """``file:line in function`` of the innermost caller frame outside torch and quantsim."""
    frame = sys._getframe(1)
    while frame is not None:
        filename = frame.f_code.co_filename.replace("\\", "/")
        if not any(part in filename for part in skip):
            return f"{frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}"
        frame = frame.f_back
    return "<unknown>"


@dataclass
class ModuleCall:
    """One call of a module."""

    name: str
    module: nn.Module
    leaf: bool
    inputs: List[torch.Tensor]
    outputs: List[torch.Tensor] = field(default_factory=list)


@dataclass
class OpCall:
    """One torch function or tensor method called directly by a container's ``forward``."""

    func: Callable
    name: str
    owner: str
    location: str
    inputs: List[torch.Tensor]
    outputs: List[torch.Tensor]

    @property
    def touches_float(self) -> bool:
        """Whether a floating-point tensor goes in or comes out."""
        return any(t.is_floating_point() for t in self.inputs + self.outputs)


@dataclass
class RuntimeTrace:
    """What one forward pass showed (tensors are kept alive so identities stay valid)."""

    module_calls: List[ModuleCall] = field(default_factory=list)
    op_calls: List[OpCall] = field(default_factory=list)
    call_counts: Dict[str, int] = field(default_factory=dict)
    #: module name -> (args, kwargs, output) of its first call, detached copies
    examples: Dict[str, Tuple[tuple, dict, Any]] = field(default_factory=dict)
    outputs: List[torch.Tensor] = field(default_factory=list)
    names: Dict[int, str] = field(default_factory=dict)

    def leaf_uses(self, tensor: torch.Tensor) -> List[ModuleCall]:
        """Leaf module calls that took ``tensor`` as a direct input."""
        return [c for c in self.module_calls if c.leaf and any(t is tensor for t in c.inputs)]

    def op_uses(self, tensor: torch.Tensor) -> List[OpCall]:
        """Container-level op calls that took ``tensor`` as an input."""
        return [c for c in self.op_calls if any(t is tensor for t in c.inputs)]


def _detached(obj: Any) -> Any:
    return pytree.tree_map(
        lambda x: x.detach().clone() if isinstance(x, torch.Tensor) else x, obj)


class _OpRecorder(TorchFunctionMode):
    """Records ops whose innermost running module is a container (or outside any module)."""

    def __init__(self, trace: RuntimeTrace, stack: List[Tuple[str, bool]]) -> None:
        super().__init__()
        self.trace, self.stack = trace, stack

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.stack and self.stack[-1][1]:
            return out  # inside a leaf module: its own business
        owner = self.stack[-1][0] if self.stack else ""
        name = getattr(func, "__name__", repr(func))
        self.trace.op_calls.append(OpCall(func, name, owner, user_location(),
                                          tensors_in((args, kwargs)), tensors_in(out)))
        return out


def record_run(model: nn.Module, dummy_input: Any, *, examples: bool = False,
               ops: bool = False) -> RuntimeTrace:
    """Run ``model`` once on ``dummy_input`` (no grad) and record its module calls.

    Args:
        model: the model; its training mode is left as is.
        dummy_input: a tensor, a tuple of positional inputs or a dict (read by ``forward``'s
            signature: :func:`quantsim.graph.split_dummy_input`).
        examples: keep detached copies of each module's first inputs and output.
        ops: also record functional ops issued by container ``forward`` code.

    Returns:
        The :class:`RuntimeTrace`.
    """
    trace = RuntimeTrace()
    stack: List[Tuple[str, bool]] = []
    names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    trace.names = names

    def pre_hook(module, args, kwargs):
        name = names.get(id(module), "")
        leaf = is_leaf_module(module) and module is not model
        inside_leaf = bool(stack) and stack[-1][1]
        stack.append((name, leaf or inside_leaf))
        if inside_leaf:
            return None
        trace.call_counts[name] = trace.call_counts.get(name, 0) + 1
        trace.module_calls.append(ModuleCall(name, module, leaf, tensors_in((args, kwargs))))
        if examples and name not in trace.examples:
            trace.examples[name] = (_detached(args), _detached(kwargs), None)
        return None

    def post_hook(module, args, kwargs, output):
        name, _ = stack.pop()
        if stack and stack[-1][1]:
            return None
        for call in reversed(trace.module_calls):
            if call.module is module and not call.outputs:
                call.outputs = tensors_in(output)
                break
        if examples and trace.examples.get(name, (0, 0, 0))[2] is None:
            a, k, _ = trace.examples[name]
            trace.examples[name] = (a, k, _detached(output))
        return None

    with ExitStack() as stack_ctx, torch.no_grad():
        for module in set(model.modules()):
            stack_ctx.enter_context(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
            stack_ctx.enter_context(module.register_forward_hook(post_hook, with_kwargs=True))
        if ops:
            stack_ctx.enter_context(_OpRecorder(trace, stack))
        output = run_forward(model, dummy_input)
    trace.outputs = tensors_in(output)
    return trace


def float_outputs_equal(a: Any, b: Any) -> Optional[str]:
    """None when ``a`` and ``b`` have the same structure and bit-identical tensors, else why not."""
    la, sa = pytree.tree_flatten(a)
    lb, sb = pytree.tree_flatten(b)
    if sa != sb:
        return f"output structure differs ({type(a).__name__} vs {type(b).__name__})"
    for i, (x, y) in enumerate(zip(la, lb)):
        if isinstance(x, torch.Tensor) != isinstance(y, torch.Tensor):
            return f"output leaf {i}: tensor vs non-tensor"
        if isinstance(x, torch.Tensor):
            if x.shape != y.shape or x.dtype != y.dtype:
                return f"output leaf {i}: {tuple(x.shape)}/{x.dtype} vs {tuple(y.shape)}/{y.dtype}"
            if not torch.equal(x, y) and not (x.is_floating_point() and torch.equal(
                    torch.nan_to_num(x), torch.nan_to_num(y))):
                diff = (x.double() - y.double()).abs().max().item()
                return f"output leaf {i} differs by up to {diff:.3g}"
        elif x != y:
            return f"output leaf {i}: {x!r} vs {y!r}"
    return None
