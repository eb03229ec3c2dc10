"""Which functional ops become which quantizable modules.

One table, read by :func:`~quantsim.prepare.prepare_model` (to rewrite fx nodes) and by
:class:`~quantsim.prepare.ModelValidator` (to name what would stay unquantized):

* elementwise arithmetic: ``+ - * / ** // @``, ``torch.add/sub/mul/div/pow/matmul/bmm``,
  their tensor methods -> :mod:`quantsim.nn` ``Add``, ``Sub``, ``Mul``, ``Div``, ``Pow``,
  ``MatMul``;
* ``torch.cat`` (``concat``, ``concatenate``) -> ``Concat(dim)``; ``torch.exp/sqrt/mean/sum``
  -> ``Exp``, ``Sqrt``, ``Mean``, ``Sum``;
* activations, softmax and pooling (``F.relu``, ``torch.relu``, ``x.relu()``, ``F.gelu``,
  ``F.softmax``, ``torch.softmax``, ``x.softmax(dim)``, ``F.adaptive_avg_pool2d``,
  ``F.max_pool2d``...) -> the ``torch.nn`` module with the same arguments (``nn.ReLU``,
  ``nn.GELU(approximate)``, ``nn.Softmax(dim)``, ``nn.AdaptiveAvgPool2d(output_size)``...);
* data movement, only when asked (``convert_data_movement``): ``view``/``reshape`` ->
  ``Reshape``, ``permute`` -> ``Permute``, ``transpose`` -> ``Transpose``, ``flatten`` ->
  ``nn.Flatten``.

A call whose arguments the module cannot express exactly (``torch.add(x, y, alpha=2)``,
``F.softmax(x, dtype=...)``, ``out=``) is left alone, so a prepared model always computes
the same numbers.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from quantsim.nn import elementwise as ew

#: (module, args, kwargs) to call instead of the functional op, or None when not expressible.
Built = Optional[Tuple[nn.Module, tuple, dict]]

__all__ = ["OpSpec", "FUNCTION_OPS", "METHOD_OPS", "spec_for", "runtime_op_name",
           "PARAMETRIC_FUNCTIONS", "COMPUTE_OP_NAMES", "MODULE_NAMES"]


@dataclass(frozen=True)
class OpSpec:
    """How one functional op becomes a module.

    Attributes:
        name: short op name used in new module names (``layer1_0_add``).
        build: ``(args, kwargs) -> (module, args, kwargs)`` or None if not expressible.
        data_movement: only converted when data-movement conversion is on.
        operands: how many leading arguments are tensor operands (one must be a tensor).
    """

    name: str
    build: Callable[[tuple, dict], Built]
    data_movement: bool = False
    operands: int = 1


def _binary(cls: type, allowed: Sequence[str] = ()) -> Callable[[tuple, dict], Built]:
    def build(args: tuple, kwargs: dict) -> Built:
        extra = dict(kwargs)
        if len(args) > 2 or (extra.pop("alpha", 1) != 1) or set(extra) - set(allowed):
            return None
        if len(args) < 2:
            if "other" not in extra:
                return None
            args = (args[0], extra.pop("other"))
        return cls(**extra), tuple(args), {}
    return build


def _unary(cls: type) -> Callable[[tuple, dict], Built]:
    def build(args: tuple, kwargs: dict) -> Built:
        return (cls(), tuple(args), {}) if len(args) == 1 and not kwargs else None
    return build


def _passthrough(cls: type) -> Callable[[tuple, dict], Built]:
    def build(args: tuple, kwargs: dict) -> Built:
        return None if "out" in kwargs else (cls(), tuple(args), dict(kwargs))
    return build


def _cat(args: tuple, kwargs: dict) -> Built:
    extra = dict(kwargs)
    tensors = args[0] if args else extra.pop("tensors", None)
    dim = args[1] if len(args) > 1 else extra.pop("dim", 0)
    if extra or not isinstance(tensors, (list, tuple)) or not isinstance(dim, int):
        return None
    return ew.Concat(dim), tuple(tensors), {}


def _activation(cls: type, params: Sequence[Tuple[str, Any]],
                fixed: Sequence[str] = ()) -> Callable[[tuple, dict], Built]:
    """``F.fn(input, *params)`` -> ``cls(**params)``; ``fixed`` params must keep their default
    (``dtype`` of softmax) and ``_``-prefixed ones are ignored."""
    names = [p for p, _ in params]

    def build(args: tuple, kwargs: dict) -> Built:
        if not args or len(args) - 1 > len(params) or set(kwargs) - set(names):
            return None
        values = dict(params)
        values.update(zip(names, args[1:]))
        values.update(kwargs)
        if any(values[p] != dict(params)[p] for p in fixed):
            return None
        ctor = {k: v for k, v in values.items() if k not in fixed and not k.startswith("_")}
        if any(isinstance(v, torch.fx.Node) for v in ctor.values()):
            return None
        return cls(**ctor), (args[0],), {}
    return build


def _shape_op(cls: type) -> Callable[[tuple, dict], Built]:
    def build(args: tuple, kwargs: dict) -> Built:
        if kwargs or not args:
            return None
        return cls(), tuple(args), {}
    return build


def _flatten(args: tuple, kwargs: dict, default_start: int = 0) -> Built:
    values = {"start_dim": default_start, "end_dim": -1}
    values.update(zip(("start_dim", "end_dim"), args[1:]))
    values.update(kwargs)
    if set(values) != {"start_dim", "end_dim"} or not all(
            isinstance(v, int) for v in values.values()):
        return None
    return nn.Flatten(values["start_dim"], values["end_dim"]), (args[0],), {}


_ADD = OpSpec("add", _binary(ew.Add), operands=2)
_SUB = OpSpec("sub", _binary(ew.Sub), operands=2)
_MUL = OpSpec("mul", _binary(ew.Mul), operands=2)
_DIV = OpSpec("div", _binary(ew.Div, ("rounding_mode",)), operands=2)
_FLOORDIV = OpSpec("floordiv", lambda a, k: (ew.Div("floor"), tuple(a), {})
                   if len(a) == 2 and not k else None, operands=2)
_POW = OpSpec("pow", _binary(ew.Pow), operands=2)
_MATMUL = OpSpec("matmul", _binary(ew.MatMul), operands=2)
_EXP, _SQRT = OpSpec("exp", _unary(ew.Exp)), OpSpec("sqrt", _unary(ew.Sqrt))
_MEAN, _SUM = OpSpec("mean", _passthrough(ew.Mean)), OpSpec("sum", _passthrough(ew.Sum))
_CAT = OpSpec("cat", _cat)
_SOFTMAX = OpSpec("softmax", _activation(nn.Softmax, [("dim", None), ("_stacklevel", 3),
                                                       ("dtype", None)], fixed=("dtype",)))
_LOG_SOFTMAX = OpSpec("log_softmax", _activation(
    nn.LogSoftmax, [("dim", None), ("_stacklevel", 3), ("dtype", None)], fixed=("dtype",)))
# torch.softmax / Tensor.softmax take (dim, dtype) with no _stacklevel
_SOFTMAX_T = OpSpec("softmax", _activation(nn.Softmax, [("dim", None), ("dtype", None)],
                                           fixed=("dtype",)))
_LOG_SOFTMAX_T = OpSpec("log_softmax", _activation(
    nn.LogSoftmax, [("dim", None), ("dtype", None)], fixed=("dtype",)))
_RELU = OpSpec("relu", _activation(nn.ReLU, [("inplace", False)]))
_SIGMOID = OpSpec("sigmoid", _activation(nn.Sigmoid, []))
_TANH = OpSpec("tanh", _activation(nn.Tanh, []))
_GELU = OpSpec("gelu", _activation(nn.GELU, [("approximate", "none")]))
_RESHAPE = OpSpec("reshape", _shape_op(ew.Reshape), data_movement=True)
_PERMUTE = OpSpec("permute", _shape_op(ew.Permute), data_movement=True)
_TRANSPOSE = OpSpec("transpose", _shape_op(ew.Transpose), data_movement=True)

_AVG_POOL = [("kernel_size", None), ("stride", None), ("padding", 0), ("ceil_mode", False),
             ("count_include_pad", True), ("divisor_override", None)]
_MAX_POOL = [("kernel_size", None), ("stride", None), ("padding", 0), ("dilation", 1),
             ("ceil_mode", False), ("return_indices", False)]

#: fx ``call_function`` target -> spec
FUNCTION_OPS: Dict[Callable, OpSpec] = {
    operator.add: _ADD, torch.add: _ADD,
    operator.sub: _SUB, torch.sub: _SUB, torch.subtract: _SUB,
    operator.mul: _MUL, torch.mul: _MUL, torch.multiply: _MUL,
    operator.truediv: _DIV, torch.div: _DIV, torch.divide: _DIV, torch.true_divide: _DIV,
    operator.floordiv: _FLOORDIV,
    operator.pow: _POW, torch.pow: _POW,
    operator.matmul: _MATMUL, torch.matmul: _MATMUL, torch.bmm: _MATMUL,
    torch.exp: _EXP, torch.sqrt: _SQRT, torch.mean: _MEAN, torch.sum: _SUM,
    torch.cat: _CAT, torch.concat: _CAT, torch.concatenate: _CAT,
    F.softmax: _SOFTMAX, torch.softmax: _SOFTMAX_T,
    F.log_softmax: _LOG_SOFTMAX, torch.log_softmax: _LOG_SOFTMAX_T,
    F.relu: _RELU, torch.relu: _RELU,
    F.relu6: OpSpec("relu6", _activation(nn.ReLU6, [("inplace", False)])),
    F.gelu: _GELU,
    F.silu: OpSpec("silu", _activation(nn.SiLU, [("inplace", False)])),
    F.sigmoid: _SIGMOID, torch.sigmoid: _SIGMOID,
    F.tanh: _TANH, torch.tanh: _TANH,
    F.leaky_relu: OpSpec("leaky_relu", _activation(
        nn.LeakyReLU, [("negative_slope", 0.01), ("inplace", False)])),
    F.elu: OpSpec("elu", _activation(nn.ELU, [("alpha", 1.0), ("inplace", False)])),
    F.hardtanh: OpSpec("hardtanh", _activation(
        nn.Hardtanh, [("min_val", -1.0), ("max_val", 1.0), ("inplace", False)])),
    F.hardswish: OpSpec("hardswish", _activation(nn.Hardswish, [("inplace", False)])),
    F.hardsigmoid: OpSpec("hardsigmoid", _activation(nn.Hardsigmoid, [("inplace", False)])),
    F.mish: OpSpec("mish", _activation(nn.Mish, [("inplace", False)])),
    F.softplus: OpSpec("softplus", _activation(nn.Softplus, [("beta", 1.0),
                                                               ("threshold", 20.0)])),
    F.adaptive_avg_pool1d: OpSpec("adaptive_avg_pool", _activation(
        nn.AdaptiveAvgPool1d, [("output_size", None)])),
    F.adaptive_avg_pool2d: OpSpec("adaptive_avg_pool", _activation(
        nn.AdaptiveAvgPool2d, [("output_size", None)])),
    F.adaptive_avg_pool3d: OpSpec("adaptive_avg_pool", _activation(
        nn.AdaptiveAvgPool3d, [("output_size", None)])),
    F.avg_pool2d: OpSpec("avg_pool", _activation(nn.AvgPool2d, _AVG_POOL)),
    F.max_pool2d: OpSpec("max_pool", _activation(nn.MaxPool2d, _MAX_POOL)),
    torch.reshape: _RESHAPE, torch.permute: _PERMUTE, torch.transpose: _TRANSPOSE,
    torch.flatten: OpSpec("flatten", _flatten, data_movement=True),
}

#: fx ``call_method`` name -> spec (``x.add(y)``, ``x.softmax(-1)``...)
METHOD_OPS: Dict[str, OpSpec] = {
    "add": _ADD, "sub": _SUB, "subtract": _SUB, "mul": _MUL, "multiply": _MUL,
    "div": _DIV, "divide": _DIV, "true_divide": _DIV, "pow": _POW,
    "matmul": _MATMUL, "bmm": _MATMUL, "exp": _EXP, "sqrt": _SQRT, "mean": _MEAN,
    "sum": _SUM, "softmax": _SOFTMAX_T, "log_softmax": _LOG_SOFTMAX_T, "relu": _RELU,
    "sigmoid": _SIGMOID, "tanh": _TANH,
    "view": _RESHAPE, "reshape": _RESHAPE, "permute": _PERMUTE, "transpose": _TRANSPOSE,
    "flatten": OpSpec("flatten", _flatten, data_movement=True),
}


def spec_for(kind: str, target: Any) -> Optional[OpSpec]:
    """The spec for an fx node's ``(op, target)``, or None."""
    if kind == "call_function":
        try:
            return FUNCTION_OPS.get(target)
        except TypeError:  # unhashable target
            return None
    if kind == "call_method":
        return METHOD_OPS.get(target)
    return None


#: functional ops with weights: prepare leaves them, the validator asks for the module
PARAMETRIC_FUNCTIONS: Dict[str, str] = {
    "linear": "nn.Linear", "conv1d": "nn.Conv1d", "conv2d": "nn.Conv2d",
    "conv3d": "nn.Conv3d", "conv_transpose2d": "nn.ConvTranspose2d", "layer_norm": "nn.LayerNorm",
    "batch_norm": "nn.BatchNorm2d", "group_norm": "nn.GroupNorm", "embedding": "nn.Embedding",
    "multi_head_attention_forward": "quantsim.nn.QuantizableMultiheadAttention",
}

_DUNDER = {"truediv": "div", "floordiv": "floordiv", "rsub": "sub", "rtruediv": "div",
           "rfloordiv": "floordiv", "rmatmul": "matmul", "rpow": "pow", "radd": "add",
           "rmul": "mul", "rdiv": "div"}

#: runtime function name (``__name__``, dunders stripped) -> op name, for compute ops
_RUNTIME_NAMES: Dict[str, str] = {
    **{name: spec.name for name, spec in METHOD_OPS.items() if not spec.data_movement},
    **{getattr(fn, "__name__", "").lstrip("_"): spec.name
       for fn, spec in FUNCTION_OPS.items() if not spec.data_movement},
}
_RUNTIME_NAMES.update({"sub": "sub", "mul": "mul", "add": "add", "matmul": "matmul"})

#: op names (as :func:`runtime_op_name` gives them) that prepare turns into modules
COMPUTE_OP_NAMES = frozenset(_RUNTIME_NAMES.values()) | {"scaled_dot_product_attention"}

#: op name -> the module that replaces it, for messages
MODULE_NAMES: Dict[str, str] = {
    **{op: f"quantsim.nn.{cls}" for op, cls in (
        ("add", "Add"), ("sub", "Sub"), ("mul", "Mul"), ("div", "Div"), ("floordiv", "Div"),
        ("pow", "Pow"), ("matmul", "MatMul"), ("exp", "Exp"), ("sqrt", "Sqrt"),
        ("mean", "Mean"), ("sum", "Sum"), ("cat", "Concat"))},
    **{op: f"nn.{cls}" for op, cls in (
        ("relu", "ReLU"), ("relu6", "ReLU6"), ("gelu", "GELU"), ("silu", "SiLU"),
        ("sigmoid", "Sigmoid"), ("tanh", "Tanh"), ("leaky_relu", "LeakyReLU"), ("elu", "ELU"),
        ("hardtanh", "Hardtanh"), ("hardswish", "Hardswish"), ("hardsigmoid", "Hardsigmoid"),
        ("mish", "Mish"), ("softplus", "Softplus"), ("softmax", "Softmax"),
        ("log_softmax", "LogSoftmax"), ("adaptive_avg_pool", "AdaptiveAvgPool2d"),
        ("avg_pool", "AvgPool2d"), ("max_pool", "MaxPool2d"))},
    "scaled_dot_product_attention": "MatMul, Mul, Add and nn.Softmax modules",
}


def runtime_op_name(func: Callable) -> Tuple[str, bool]:
    """The table's op name for a function seen by a ``TorchFunctionMode``, and whether it is
    an in-place method (``x.add_(y)``; torch reports ``x += y`` the same way).

    Names outside the table come back normalised but otherwise unchanged (``linear``)."""
    name = getattr(func, "__name__", "")
    inplace = False
    if name.startswith("__") and name.endswith("__"):
        name = name[2:-2]
        if name.startswith("i") and name[1:] in _RUNTIME_NAMES or name[1:] in _DUNDER:
            name = name[1:]
    elif name.endswith("_") and not name.startswith("_"):
        name, inplace = name[:-1], True
    name = _DUNDER.get(name, name).lstrip("_")
    return _RUNTIME_NAMES.get(name, name), inplace
