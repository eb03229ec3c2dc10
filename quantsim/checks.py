"""Type checks of public-API arguments that several entry points share.

Python's truthiness turns ``strict="False"`` into True and a function passed as a model fails
deep inside with an ``AttributeError``; these checks refuse such arguments where they enter,
with an error of the caller's type naming the argument and what is allowed.
"""
from __future__ import annotations

from typing import Any, Optional, Type

from torch import nn

from quantsim.errors import QuantSimError, UnsupportedModelError


def require_module(model: Any, where: str) -> nn.Module:
    """Return ``model`` if it is an ``nn.Module`` instance.

    Raises:
        UnsupportedModelError: naming ``where`` and what was passed (a class, a function, ...).
    """
    if isinstance(model, nn.Module):
        return model
    if isinstance(model, type):
        got = f"the class {model.__name__} itself (pass an instance: {model.__name__}(...))"
    else:
        got = f"a {type(model).__name__} ({model!r:.60})"
    raise UnsupportedModelError(f"{where}: expected a torch.nn.Module instance, got {got}")


def require_flag(value: Any, name: str, where: str, error: Type[QuantSimError],
                 optional: bool = False) -> Optional[bool]:
    """Return ``value`` if it is a bool (or None when ``optional``).

    Raises:
        error: naming ``where``, the argument and its value; strings such as ``"False"``
            are refused, not read by truthiness.
    """
    if isinstance(value, bool) or (optional and value is None):
        return value
    allowed = "True, False or None" if optional else "True or False"
    raise error(f"{where}: {name} must be {allowed}, got {type(value).__name__} {value!r}")
