"""Modules for functional tensor ops, so a module-level quantizer wrapper can see them.

A quantizer wrapper only quantizes the inputs and outputs of *modules*. ``x + y``,
``torch.cat`` or ``q @ k`` inside a ``forward`` have no module, so they would stay in floating
point. Each class below is a stateless module whose ``forward`` is exactly the op (same torch
call, bit-identical result); :func:`quantsim.prepare.prepare_model` rewrites functional calls
into them, or a model can use them directly.

========================  =====================================  ==================  =========
module                    forward                                ONNX op type        moves data
========================  =====================================  ==================  =========
:class:`Add`              ``x + y``                              ``Add``             no
:class:`Sub`              ``x - y``                              ``Sub``             no
:class:`Mul`              ``x * y``                              ``Mul``             no
:class:`Div`              ``x / y`` (``torch.div`` with a mode)  ``Div``             no
:class:`Pow`              ``x ** y``                             ``Pow``             no
:class:`MatMul`           ``torch.matmul(x, y)``                 ``MatMul``          no
:class:`Exp`              ``torch.exp(x)``                       ``Exp``             no
:class:`Sqrt`             ``torch.sqrt(x)``                      ``Sqrt``            no
:class:`Mean`             ``torch.mean(x, ...)``                 ``ReduceMean``      no
:class:`Sum`              ``torch.sum(x, ...)``                  ``ReduceSum``       no
:class:`Concat`           ``torch.cat(xs, dim)``                 ``Concat``          no
:class:`Reshape`          ``x.reshape(*shape)``                  ``Reshape``         yes
:class:`Permute`          ``x.permute(*dims)``                   ``Transpose``       yes
:class:`Transpose`        ``x.transpose(dim0, dim1)``            ``Transpose``       yes
========================  =====================================  ==================  =========

Non-tensor arguments (a scalar operand, a target shape computed from ``x.shape``) are passed
at call time, exactly as in the original expression. Softmax and the activations use the
``torch.nn`` classes (``nn.Softmax``, ``nn.ReLU``, ``nn.GELU``...).

Example:
    >>> import torch
    >>> add = Add()
    >>> add(torch.ones(2), torch.ones(2))
    tensor([2., 2.])
    >>> Concat(dim=1)(torch.zeros(1, 2), torch.ones(1, 1)).shape
    torch.Size([1, 3])
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from quantsim.errors import UnsupportedModelError

Shape = Union[int, Sequence[int], torch.Size]

__all__ = [
    "Add", "Sub", "Mul", "Div", "Pow", "MatMul", "Exp", "Sqrt", "Mean", "Sum", "Concat",
    "Reshape", "Permute", "Transpose", "ELEMENTWISE_MODULES",
]


class Add(nn.Module):
    """``x + y`` as a module (ONNX ``Add``).

    Example:
        >>> Add()(torch.tensor([1.0]), 2.0)
        tensor([3.])
    """

    def forward(self, x: Any, y: Any) -> Any:
        """Return ``x + y``."""
        return x + y


class Sub(nn.Module):
    """``x - y`` as a module (ONNX ``Sub``).

    Example:
        >>> Sub()(torch.tensor([3.0]), 1.0)
        tensor([2.])
    """

    def forward(self, x: Any, y: Any) -> Any:
        """Return ``x - y``."""
        return x - y


class Mul(nn.Module):
    """``x * y`` as a module (ONNX ``Mul``).

    Example:
        >>> Mul()(torch.tensor([3.0]), 2.0)
        tensor([6.])
    """

    def forward(self, x: Any, y: Any) -> Any:
        """Return ``x * y``."""
        return x * y


class Div(nn.Module):
    """``x / y`` (or ``torch.div(x, y, rounding_mode=...)``) as a module (ONNX ``Div``).

    Args:
        rounding_mode: ``None`` for true division, or ``'trunc'`` / ``'floor'`` as in
            :func:`torch.div`.

    Example:
        >>> Div()(torch.tensor([3.0]), 2.0)
        tensor([1.5000])
    """

    def __init__(self, rounding_mode: Optional[str] = None) -> None:
        super().__init__()
        if rounding_mode not in (None, "trunc", "floor"):
            raise UnsupportedModelError(
                f"Div: rounding_mode must be None, 'trunc' or 'floor', got {rounding_mode!r}"
            )
        self.rounding_mode = rounding_mode

    def forward(self, x: Any, y: Any) -> Any:
        """Return ``x / y`` rounded as configured."""
        if self.rounding_mode is None:
            return x / y
        return torch.div(x, y, rounding_mode=self.rounding_mode)

    def extra_repr(self) -> str:
        return "" if self.rounding_mode is None else f"rounding_mode={self.rounding_mode!r}"


class Pow(nn.Module):
    """``x ** y`` as a module (ONNX ``Pow``).

    Example:
        >>> Pow()(torch.tensor([3.0]), 2)
        tensor([9.])
    """

    def forward(self, x: Any, y: Any) -> Any:
        """Return ``x ** y``."""
        return x ** y


class MatMul(nn.Module):
    """``torch.matmul(x, y)`` (also ``x @ y`` and ``torch.bmm``) as a module (ONNX ``MatMul``).

    Example:
        >>> MatMul()(torch.ones(2, 3), torch.ones(3, 4)).shape
        torch.Size([2, 4])
    """

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Return the matrix product of ``x`` and ``y``."""
        return torch.matmul(x, y)


class Exp(nn.Module):
    """``torch.exp(x)`` as a module (ONNX ``Exp``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``exp(x)``."""
        return torch.exp(x)


class Sqrt(nn.Module):
    """``torch.sqrt(x)`` as a module (ONNX ``Sqrt``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``sqrt(x)``."""
        return torch.sqrt(x)


class Mean(nn.Module):
    """``torch.mean(x, dim, keepdim)`` as a module (ONNX ``ReduceMean``).

    Example:
        >>> Mean()(torch.tensor([[1.0, 3.0]]), -1, keepdim=True)
        tensor([[2.]])
    """

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Return ``torch.mean(x, *args, **kwargs)``."""
        return torch.mean(x, *args, **kwargs)


class Sum(nn.Module):
    """``torch.sum(x, dim, keepdim)`` as a module (ONNX ``ReduceSum``)."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Return ``torch.sum(x, *args, **kwargs)``."""
        return torch.sum(x, *args, **kwargs)


class Concat(nn.Module):
    """``torch.cat(xs, dim)`` as a module taking the tensors as separate inputs (ONNX ``Concat``).

    Each tensor is its own positional input, so a wrapper can quantize each one.

    Args:
        dim: the dimension to concatenate along.

    Example:
        >>> Concat(dim=0)(torch.ones(1), torch.zeros(2))
        tensor([1., 0., 0.])
    """

    def __init__(self, dim: int = 0) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        """Concatenate the inputs along ``self.dim``."""
        return torch.cat(xs, dim=self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


def _shape_args(args: Tuple[Any, ...]) -> Tuple[Any, ...]:
    """``f(x, 2, 3)`` and ``f(x, (2, 3))`` both mean the shape ``(2, 3)``."""
    if len(args) == 1 and isinstance(args[0], (tuple, list, torch.Size)):
        return tuple(args[0])
    return args


class Reshape(nn.Module):
    """``x.reshape(*shape)`` as a module (ONNX ``Reshape``, data movement).

    The shape comes from the constructor or, as in ``x.view(b, -1)``, from the call (the call
    wins). ``view`` calls are prepared into this module too: the values are the same.

    Args:
        shape: a default target shape.

    Example:
        >>> Reshape()(torch.zeros(2, 3), 3, 2).shape
        torch.Size([3, 2])
        >>> Reshape((6,))(torch.zeros(2, 3)).shape
        torch.Size([6])
    """

    def __init__(self, shape: Optional[Shape] = None) -> None:
        super().__init__()
        self.shape = None if shape is None else _shape_args((shape,))

    def forward(self, x: torch.Tensor, *shape: Any) -> torch.Tensor:
        """Return ``x`` reshaped to the call's shape, else the constructor's."""
        target = _shape_args(shape) if shape else self.shape
        if target is None:
            raise UnsupportedModelError(
                "Reshape: no target shape; give one to Reshape(shape) or in the call"
            )
        return x.reshape(*target)

    def extra_repr(self) -> str:
        return "" if self.shape is None else f"shape={self.shape}"


class Permute(nn.Module):
    """``x.permute(*dims)`` as a module (ONNX ``Transpose``, data movement).

    Args:
        dims: a default permutation; dims given in the call win.

    Example:
        >>> Permute((1, 0))(torch.zeros(2, 3)).shape
        torch.Size([3, 2])
    """

    def __init__(self, dims: Optional[Sequence[int]] = None) -> None:
        super().__init__()
        self.dims = None if dims is None else tuple(dims)

    def forward(self, x: torch.Tensor, *dims: Any) -> torch.Tensor:
        """Return ``x`` with its dimensions permuted."""
        order = _shape_args(dims) if dims else self.dims
        if order is None:
            raise UnsupportedModelError(
                "Permute: no permutation; give one to Permute(dims) or in the call"
            )
        return x.permute(*order)

    def extra_repr(self) -> str:
        return "" if self.dims is None else f"dims={self.dims}"


class Transpose(nn.Module):
    """``x.transpose(dim0, dim1)`` as a module (ONNX ``Transpose``, data movement).

    Args:
        dim0: default first dimension.
        dim1: default second dimension.

    Example:
        >>> Transpose(-2, -1)(torch.zeros(2, 3, 4)).shape
        torch.Size([2, 4, 3])
    """

    def __init__(self, dim0: Optional[int] = None, dim1: Optional[int] = None) -> None:
        super().__init__()
        self.dim0, self.dim1 = dim0, dim1

    def forward(self, x: torch.Tensor, dim0: Optional[int] = None,
                dim1: Optional[int] = None) -> torch.Tensor:
        """Return ``x`` with ``dim0`` and ``dim1`` swapped (call arguments win)."""
        d0 = self.dim0 if dim0 is None else dim0
        d1 = self.dim1 if dim1 is None else dim1
        if d0 is None or d1 is None:
            raise UnsupportedModelError(
                "Transpose: two dimensions are needed; give them to Transpose(dim0, dim1) "
                "or in the call"
            )
        return x.transpose(d0, d1)

    def extra_repr(self) -> str:
        return "" if self.dim0 is None else f"dim0={self.dim0}, dim1={self.dim1}"


#: module class -> (ONNX op types, data movement), registered by ``quantsim.nn`` at import.
ELEMENTWISE_MODULES = {
    Add: (("Add",), False),
    Sub: (("Sub",), False),
    Mul: (("Mul",), False),
    Div: (("Div",), False),
    Pow: (("Pow",), False),
    MatMul: (("MatMul",), False),
    Exp: (("Exp",), False),
    Sqrt: (("Sqrt",), False),
    Mean: (("ReduceMean",), False),
    Sum: (("ReduceSum",), False),
    Concat: (("Concat",), False),
    Reshape: (("Reshape",), True),
    Permute: (("Transpose",), True),
    Transpose: (("Transpose",), True),
}
