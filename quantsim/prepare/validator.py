"""``ModelValidator``: find what a quantization simulation cannot handle, before building it.

``ModelValidator.validate_model(model, model_input)`` runs the model once and returns a
:class:`ValidationResult`, truthy when there is nothing to fix (aimet_torch's
``validate_model`` returns a bool; the result works the same in an ``if``). Each
:class:`Finding` names the module, the code location where there is one, and the fix.

========================  ======================================================================
kind                      what
========================  ======================================================================
``data_parallel``         the model is wrapped in ``torch.nn.DataParallel``
``functional_op``         a compute op in a ``forward`` (``x + y``, ``torch.cat``, ``F.relu``,
                          ``@``) that no module wraps, so it would stay unquantized
``untraceable``           such ops sit in code torch.fx cannot trace, so ``prepare_model``
                          cannot turn them into modules
``functional_layer``      a weighted op called functionally (``F.linear``, ``F.conv2d``...)
``reused_module``         a module called more than once per forward (one set of quantizers
                          would serve several places)
``padding_mode``          a convolution with ``padding_mode != 'zeros'``, which the QAT layers
                          refuse
``shared_weight``         one parameter held by two layers (tied weights)
``unsupported_module``    ``nn.MultiheadAttention`` (fused; its ops are invisible)
``no_op_type``            a leaf module with no ONNX op type mapping, so the hardware config
                          cannot address it
========================  ======================================================================

Functional ops are found at run time (a ``TorchFunctionMode`` sees every call together with
the module whose ``forward`` issued it), so the check works on models torch.fx cannot trace;
torch.fx is only asked whether ``prepare_model`` could fix them.
"""
from __future__ import annotations

import linecache
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch  # noqa: F401  (used by the docstring example)
from torch import nn

from quantsim.graph import eval_mode
from quantsim.op_types import onnx_types_of
from quantsim.prepare._recording import RuntimeTrace, is_leaf_module, record_run
from quantsim.prepare.functional import (
    COMPUTE_OP_NAMES,
    MODULE_NAMES,
    PARAMETRIC_FUNCTIONS,
    runtime_op_name,
)
from quantsim.prepare.tracing import trace_module

__all__ = ["Finding", "ValidationResult", "ModelValidator"]

Check = Callable[[nn.Module, Any, RuntimeTrace], List["Finding"]]


@dataclass(frozen=True)
class Finding:
    """One problem: what it is, where, and how to fix it."""

    kind: str
    module: str
    message: str
    fix: str
    location: Optional[str] = None

    def __str__(self) -> str:
        where = f" ({self.location})" if self.location else ""
        return f"[{self.kind}] {self.module or '<model>'}{where}: {self.message}. Fix: {self.fix}"


@dataclass
class ValidationResult:
    """All findings; truthy when there are none."""

    findings: List[Finding] = field(default_factory=list)

    def __bool__(self) -> bool:
        return not self.findings

    def of_kind(self, kind: str) -> List[Finding]:
        """The findings of one kind."""
        return [f for f in self.findings if f.kind == kind]

    def __str__(self) -> str:
        if not self.findings:
            return "model is valid for quantization simulation"
        return "\n".join(str(f) for f in self.findings)


def _module_fix(name: str) -> str:
    return MODULE_NAMES.get(name, "a module")


def _traceable(model: nn.Module, owner: str, trace: RuntimeTrace,
               cache: Dict[str, Tuple[bool, str]]) -> Tuple[bool, str]:
    """``(True, how)`` if prepare_model could trace ``owner``, else ``(False, why not)``."""
    if owner not in cache:
        module = model.get_submodule(owner)
        leaf = lambda m: type(m).__module__.startswith("quantsim.")  # noqa: E731
        result = trace_module(module, leaf, trace.examples.get(owner))
        if result.graph_module is None:
            cache[owner] = (False, result.error or "not traceable")
        else:
            cache[owner] = (True, "prepare_model(model, dummy_input=...)" if result.concrete
                            else "prepare_model(model)")
    return cache[owner]


def _augmented_assignment(location: str) -> bool:
    """Whether the source line at ``file:line in fn`` is ``x += y`` style (torch.fx records
    it as an ordinary op, unlike a method call ``x.add_(y)``)."""
    path, _, rest = location.rpartition(":")
    try:
        text = linecache.getline(path, int(rest.split()[0]))
    except (ValueError, IndexError):
        return False
    return re.search(r"(\+|-|\*|/|@|\*\*|//)=", text) is not None


def check_functional_ops(model: nn.Module, _: Any, trace: RuntimeTrace) -> List[Finding]:
    """Compute ops and weighted ops issued by container ``forward`` code."""
    findings, cache, untraceable = [], {}, set()
    for call in trace.op_calls:
        name, inplace = runtime_op_name(call.func)
        if not call.touches_float:
            continue
        owner_module = model.get_submodule(call.owner)
        if isinstance(owner_module, nn.MultiheadAttention):
            continue  # reported once as unsupported_module
        if name in PARAMETRIC_FUNCTIONS:
            findings.append(Finding(
                "functional_layer", call.owner, f"functional {name} has no quantizable module",
                f"call a {PARAMETRIC_FUNCTIONS[name]} module instead", call.location))
            continue
        if name not in COMPUTE_OP_NAMES:
            continue
        inplace = inplace and not _augmented_assignment(call.location)
        ok, how = (False, "") if inplace else _traceable(model, call.owner, trace, cache)
        if inplace:
            fix = (f"write it out of place (x = x {name} y) so prepare_model can turn it into "
                   f"{_module_fix(name)}")
        elif ok:
            fix = f"run quantsim.prepare.{how}: it becomes {_module_fix(name)}"
        else:
            reason = how
            fix = f"use {_module_fix(name)} there by hand (prepare_model cannot trace it)"
            if call.owner not in untraceable:
                untraceable.add(call.owner)
                findings.append(Finding(
                    "untraceable", call.owner, f"torch.fx cannot trace this module: {reason}",
                    "make its forward traceable (no Python control flow on tensor values), "
                    "pass prepare_model a dummy_input, or exclude it and use quantsim.nn "
                    "modules in its forward"))
        findings.append(Finding("functional_op", call.owner,
                                f"{'in-place ' if inplace else ''}{name} would stay unquantized",
                                fix, call.location))
    return findings


def check_reused_modules(model: nn.Module, _: Any, trace: RuntimeTrace) -> List[Finding]:
    """Leaf modules called more than once in one forward."""
    findings = []
    for call in trace.module_calls:
        count = trace.call_counts.get(call.name, 0)
        if call.leaf and count > 1 and not any(f.module == call.name for f in findings):
            findings.append(Finding(
                "reused_module", call.name, f"called {count} times in one forward",
                "give each call its own module (prepare_model un-shares them)"))
    return findings


def check_layer_settings(model: nn.Module, _: Any, __: RuntimeTrace) -> List[Finding]:
    """Settings the QAT layers refuse: non-zero padding modes and tied weights."""
    findings = []
    for name, module in model.named_modules():
        mode = getattr(module, "padding_mode", "zeros")
        if isinstance(module, nn.modules.conv._ConvNd) and mode != "zeros":
            findings.append(Finding(
                "padding_mode", name, f"padding_mode={mode!r} is not supported by the QAT "
                "layers", "pad explicitly with an nn.ReflectionPad/ReplicationPad/CircularPad "
                "module and use padding_mode='zeros' with padding=0"))
    owners: Dict[int, List[str]] = defaultdict(list)
    for module_name, module in model.named_modules(remove_duplicate=True):
        for pname, param in module.named_parameters(recurse=False, remove_duplicate=False):
            owners[id(param)].append(f"{module_name}.{pname}" if module_name else pname)
    for names in owners.values():
        if len(names) > 1:
            findings.append(Finding(
                "shared_weight", names[0].rpartition(".")[0],
                f"one parameter is shared by {', '.join(names)}",
                "untie the weights (clone the parameter) or quantize only one of the layers"))
    return findings


def check_modules(model: nn.Module, _: Any, trace: RuntimeTrace) -> List[Finding]:
    """Fused attention and leaf modules with no op type mapping."""
    findings = []
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            findings.append(Finding(
                "unsupported_module", name, "nn.MultiheadAttention runs as one fused op",
                "quantsim.nn.replace_multihead_attention(model) (prepare_model does it)"))
        elif is_leaf_module(module) and module is not model and not onnx_types_of(module) \
                and next(module.children(), None) is None:
            if trace.call_counts.get(name, 0) == 0:
                continue
            findings.append(Finding(
                "no_op_type", name, f"{type(module).__name__} has no ONNX op type mapping",
                f"quantsim.op_types.register_op_type({type(module).__name__}, '<OnnxOpType>')"))
    return findings


class ModelValidator:
    """Runs the checks; ``add_check`` adds a custom one.

    Example:
        >>> class Net(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.fc = nn.Linear(4, 4)
        ...     def forward(self, x):
        ...         return torch.relu(self.fc(x))
        >>> result = ModelValidator.validate_model(Net(), torch.randn(2, 4))
        >>> bool(result), result.findings[0].kind
        (False, 'functional_op')
    """

    _checks: List[Check] = [check_functional_ops, check_reused_modules, check_layer_settings,
                            check_modules]

    @classmethod
    def add_check(cls, check: Check) -> None:
        """Register ``check(model, model_input, trace) -> [Finding, ...]``."""
        cls._checks = cls._checks + [check]

    @classmethod
    def validate_model(cls, model: nn.Module, model_input: Any, **_: Any) -> ValidationResult:
        """Run ``model`` once on ``model_input`` (eval mode, no grad) and collect findings.

        Args:
            model: the model to check.
            model_input: a tensor, a tuple of positional inputs or a dict (read by
                ``forward``'s signature: :func:`quantsim.graph.split_dummy_input`).

        Returns:
            A :class:`ValidationResult`, truthy when clean.
        """
        findings: List[Finding] = []
        if isinstance(model, nn.DataParallel):
            findings.append(Finding(
                "data_parallel", "", "torch.nn.DataParallel is not supported",
                "use torch.nn.parallel.DistributedDataParallel (one process per device), or "
                "pass model.module"))
            model = model.module
        with eval_mode(model):
            trace = record_run(model, model_input, examples=True, ops=True)
            for check in cls._checks:
                findings.extend(check(model, model_input, trace))
        return ValidationResult(findings)
