"""Shared definitions under aimet-torch's names (``aimet_common.defs``).

An aimet-torch script imports ``CallbackFunc``, ``QuantScheme`` and ``QuantizationDataType``
from ``aimet_common.defs``; ``from quantsim.defs import ...`` gives the same names here.
"""
from __future__ import annotations

from typing import Any, Callable, Union

import torch.nn as nn

from quantsim.errors import CallbackError
from quantsim.sim import QuantizationDataType, QuantScheme

__all__ = ["CallbackFunc", "EvalCallback", "QuantizationDataType", "QuantScheme", "as_callback"]


class CallbackFunc:
    """A callback and the argument handed to it, as aimet-torch scripts pass them.

    ``CallbackFunc(func, func_callback_args)(model)`` calls ``func(model, func_callback_args)``.

    Args:
        func: ``func(model, args)``; an evaluation callback returns a number (accuracy, cosine,
            ``-loss``: larger is better), a forward-pass callback runs calibration data.
        func_callback_args: whatever ``func`` needs besides the model (a data loader, a count).
    """

    def __init__(self, func: Callable[[nn.Module, Any], Any], func_callback_args: Any = None):
        if not callable(func):
            raise CallbackError(f"CallbackFunc: func must be callable, got {type(func).__name__}")
        self.func = func
        self.args = func_callback_args

    def __call__(self, model: nn.Module) -> Any:
        """Run ``func(model, func_callback_args)``."""
        return self.func(model, self.args)

    def __repr__(self) -> str:
        name = getattr(self.func, "__qualname__", type(self.func).__name__)
        return f"CallbackFunc({name}, {self.args!r})"


#: What the analysis and mixed-precision entry points accept as a callback.
EvalCallback = Union[CallbackFunc, Callable[[nn.Module], Any], Callable[[nn.Module, Any], Any]]


def as_callback(callback: EvalCallback, name: str) -> CallbackFunc:
    """Normalize ``callback`` to a :class:`CallbackFunc`.

    A :class:`CallbackFunc` is returned as is; a plain callable is called as ``callback(model)``
    (one argument) or, when its signature takes two, ``callback(model, None)`` as aimet-torch
    calls callbacks whose args are ``None``.

    Raises:
        CallbackError: ``callback`` is not callable (a ``TypeError`` too); the message names
            the argument ``name``.
    """
    if isinstance(callback, CallbackFunc):
        return callback
    if not callable(callback):
        raise CallbackError(f"{name} must be a CallbackFunc or a callable taking the model, "
                        f"got {type(callback).__name__}")
    import inspect
    try:
        params = [p for p in inspect.signature(callback).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
                  and p.default is p.empty]
        takes_two = len(params) >= 2
    except (TypeError, ValueError):   # builtins without a signature: call with the model only
        takes_two = False
    if takes_two:
        return CallbackFunc(callback, None)
    return CallbackFunc(lambda model, _args: callback(model), None)
