"""Which ONNX op types a torch module stands for, as seen by the hardware config.

The hardware config (``docs/config.md``) names operators by **ONNX op type** (``Conv``, ``Gemm``,
``Relu``...), never by torch class. This module is the one table that links the two, after
aimet-torch's ``map_torch_types_to_onnx`` (``FORMATS.md`` §1.9), widened where a module has more
than one usual spelling: ``nn.LayerNorm`` answers to both the ONNX name ``LayerNormalization``
and AIMET's ``LayerNorm``, ``nn.GroupNorm`` to ``GroupNormalization`` and ``GroupNorm``.

* :data:`TORCH_TO_ONNX` maps module classes to tuples of ONNX names;
  :func:`register_op_type` adds entries (``quantsim.nn``'s elementwise modules and user modules).
* :func:`onnx_types_of` looks a module up, walking its MRO so subclasses (``LazyConv2d``,
  wrapped quantized modules) match their float parent; unknown modules give ``()``.
* :func:`is_data_movement` tells whether a module only moves or selects values (max-pool,
  flatten, dropout...), so its output can share its input's encoding.
* :func:`params_of` gives the tensors the module's op takes as parameters (what the config's
  ``params`` rules and the parameter quantizers address): the module's own floating-point
  parameters, or, for a class registered with ``params=`` (``quantsim.nn``'s fused conv-BN
  modules), the tensors it computes in their place (the folded weight and bias).
* :func:`output_types_of` gives the op types of the op that produces the module's output,
  which the output quantizers follow: the module's own, or, for a class registered with
  ``output_op=``, those of a submodule (a fused conv-BN-ReLU's ReLU).
* :func:`param_axis` gives the axis of a parameter that holds the op's output channels (where
  per-channel encodings run): 0 unless :func:`register_param_axes` says otherwise
  (``ConvTranspose`` weights keep output channels on axis 1). The sim's parameter quantizers
  and the QAT modules of :mod:`quantsim.nn.qat` both read it.
* :data:`KNOWN_ONNX_TYPES` holds every op name a config may use. Names outside it are a warning
  in ``op_type`` and an error inside a supergroup.

Example:
    >>> import torch
    >>> onnx_types_of(torch.nn.Linear(2, 3))
    ('Gemm', 'MatMul')
    >>> class MyLinear(torch.nn.Linear): pass
    >>> onnx_types_of(MyLinear)
    ('Gemm', 'MatMul')
    >>> is_data_movement(torch.nn.MaxPool2d(2)), is_data_movement(torch.nn.ReLU())
    (True, False)
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Set, Tuple, Type, Union

import torch
from torch import nn

#: A module's data-movement flag: a constant, or a test of the instance (``Upsample`` is pure
#: data movement only in ``nearest`` mode).
DataMovement = Union[bool, Callable[[nn.Module], bool]]

#: torch module class -> the ONNX op types it stands for (first = the usual ONNX export).
TORCH_TO_ONNX: Dict[Type[nn.Module], Tuple[str, ...]] = {}
_DATA_MOVEMENT: Dict[Type[nn.Module], DataMovement] = {}
#: A module's computed parameters, by name (see :func:`params_of`).
ParamsFn = Callable[[nn.Module], Dict[str, torch.Tensor]]
#: The submodule whose op produces a module's output, or None for the module itself.
OutputOpFn = Callable[[nn.Module], Optional[nn.Module]]
_PARAMS: Dict[Type[nn.Module], ParamsFn] = {}
_OUTPUT_OP: Dict[Type[nn.Module], OutputOpFn] = {}
#: torch module class -> {parameter name: axis of its output channels}, for the parameters
#: whose output channels are not on axis 0 (see :func:`param_axis`)
_PARAM_AXES: Dict[Type[nn.Module], Dict[str, int]] = {}
# the entries registered below, kept apart so the documented table ignores later registrations
_BUILTIN: Dict[Type[nn.Module], Tuple[Tuple[str, ...], DataMovement]] = {}

#: Operators of the standard ONNX domain (``ai.onnx``, as of onnx 1.23).
ONNX_STANDARD_OPS: Tuple[str, ...] = (
    "Abs", "Acos", "Acosh", "Add", "AffineGrid", "And", "ArgMax", "ArgMin", "Asin", "Asinh",
    "Atan", "Atanh", "Attention", "AveragePool", "BatchNormalization", "Bernoulli", "BitCast",
    "BitShift", "BitwiseAnd", "BitwiseNot", "BitwiseOr", "BitwiseXor", "BlackmanWindow", "Cast",
    "CastLike", "Ceil", "Celu", "CenterCropPad", "Clip", "Col2Im", "Compress", "Concat",
    "ConcatFromSequence", "Constant", "ConstantOfShape", "Conv", "ConvInteger", "ConvTranspose",
    "Cos", "Cosh", "CumProd", "CumSum", "DFT", "DeformConv", "DepthToSpace", "DequantizeLinear",
    "Det", "Div", "Dropout", "DynamicQuantizeLinear", "Einsum", "Elu", "Equal", "Erf", "Exp",
    "Expand", "EyeLike", "Flatten", "Floor", "GRU", "Gather", "GatherElements", "GatherND",
    "Gelu", "Gemm", "GlobalAveragePool", "GlobalLpPool", "GlobalMaxPool", "Greater",
    "GreaterOrEqual", "GridSample", "GroupNormalization", "HammingWindow", "HannWindow",
    "HardSigmoid", "HardSwish", "Hardmax", "Identity", "If", "ImageDecoder",
    "InstanceNormalization", "IsInf", "IsNaN", "LRN", "LSTM", "LayerNormalization", "LeakyRelu",
    "Less", "LessOrEqual", "Log", "LogSoftmax", "Loop", "LpNormalization", "LpPool", "MatMul",
    "MatMulInteger", "Max", "MaxPool", "MaxRoiPool", "MaxUnpool", "Mean",
    "MeanVarianceNormalization", "MelWeightMatrix", "Min", "Mish", "Mod", "Mul", "Multinomial",
    "Neg", "NegativeLogLikelihoodLoss", "NonMaxSuppression", "NonZero", "Not", "OneHot",
    "Optional", "OptionalGetElement", "OptionalHasElement", "Or", "PRelu", "Pad", "Pow",
    "QLinearConv", "QLinearMatMul", "QuantizeLinear", "RMSNormalization", "RNN", "RandomNormal",
    "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Range", "Reciprocal", "ReduceL1",
    "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin",
    "ReduceProd", "ReduceSum", "ReduceSumSquare", "RegexFullMatch", "Relu", "Reshape", "Resize",
    "ReverseSequence", "RoiAlign", "RotaryEmbedding", "Round", "STFT", "Scan", "Scatter",
    "ScatterElements", "ScatterND", "Selu", "SequenceAt", "SequenceConstruct", "SequenceEmpty",
    "SequenceErase", "SequenceInsert", "SequenceLength", "SequenceMap", "Shape", "Shrink",
    "Sigmoid", "Sign", "Sin", "Sinh", "Size", "Slice", "Softmax", "SoftmaxCrossEntropyLoss",
    "Softplus", "Softsign", "SpaceToDepth", "Split", "SplitToSequence", "Sqrt", "Squeeze",
    "StringConcat", "StringNormalizer", "StringSplit", "Sub", "Sum", "SwiGLU", "Swish", "Tan",
    "Tanh", "TensorScatter", "TfIdfVectorizer", "ThresholdedRelu", "Tile", "TopK", "Transpose",
    "Trilu", "Unique", "Unsqueeze", "Upsample", "Where", "Xor",
)

#: Names AIMET uses that are not standard ONNX ops (its spellings for norms and GELU, its
#: ChannelShuffle module).
AIMET_EXTRA_OPS: Tuple[str, ...] = ("GELU", "GroupNorm", "LayerNorm", "ChannelShuffle")

#: ONNX types of AIMET's elementwise modules (``FORMATS.md`` §1.9); ``quantsim.nn`` registers
#: its modules under these names. Listed here so configs naming them load before that import.
ELEMENTWISE_OPS: Tuple[str, ...] = (
    "Add", "Mul", "Sub", "Div", "MatMul", "Concat", "Cast", "Reshape", "Transpose", "Slice",
    "Split", "Pad", "Gather", "GatherND", "Expand", "Tile", "TopK", "NonZero",
    "ScatterElements", "ReduceMax", "ReduceMin", "ReduceMean", "RoiAlign", "NonMaxSuppression",
    "DepthToSpace", "Softmax",
)

#: Every op name a config may use; :func:`register_op_type` adds to it (the set is updated in
#: place, so holding a reference to it stays current).
KNOWN_ONNX_TYPES: Set[str] = set(ONNX_STANDARD_OPS) | set(AIMET_EXTRA_OPS) | set(ELEMENTWISE_OPS)


def register_op_type(
    module_cls: Type[nn.Module], *onnx_names: str, data_movement: DataMovement = False,
    params: Optional[ParamsFn] = None, output_op: Optional[OutputOpFn] = None,
) -> Type[nn.Module]:
    """Declare which ONNX op types a module class stands for.

    Registering a class again replaces its entry. Subclasses inherit the entry unless they
    are registered themselves. The names join :data:`KNOWN_ONNX_TYPES`.

    Args:
        module_cls: a subclass of ``torch.nn.Module``.
        *onnx_names: one or more op type names, as used in the config's ``op_type`` and
            ``supergroups`` (the usual ONNX export first).
        data_movement: True if the module only moves or selects values (reshape, permute,
            max-pool...), or a function of the module instance deciding it.
        params: for a module that computes its op's parameters in ``forward`` instead of
            holding them, a function of the instance returning them by name (see
            :func:`params_of`).
        output_op: for a module whose output comes from a submodule's op (an activation run
            last), a function of the instance returning that submodule, or None when the
            module's own op produces the output (see :func:`output_types_of`).

    Returns:
        ``module_cls`` unchanged.

    Raises:
        TypeError: ``module_cls`` is not an ``nn.Module`` subclass, or a name is not a string.
        ValueError: no name, or an empty name, was given.
    """
    if not (isinstance(module_cls, type) and issubclass(module_cls, nn.Module)):
        raise TypeError(f"register_op_type: expected an nn.Module subclass, got {module_cls!r}")
    if not onnx_names:
        raise ValueError(
            f"register_op_type({module_cls.__name__}): give at least one ONNX op type name, "
            "e.g. register_op_type(MyAdd, 'Add')"
        )
    for name in onnx_names:
        if not isinstance(name, str) or not name:
            raise TypeError(
                f"register_op_type({module_cls.__name__}): op type names must be non-empty "
                f"strings, got {name!r}"
            )
    if not (isinstance(data_movement, bool) or callable(data_movement)):
        raise TypeError(
            f"register_op_type({module_cls.__name__}): data_movement must be a bool or a "
            f"function of the module, got {data_movement!r}"
        )
    for arg, fn in (("params", params), ("output_op", output_op)):
        if fn is not None and not callable(fn):
            raise TypeError(f"register_op_type({module_cls.__name__}): {arg} must be a "
                            f"function of the module or None, got {fn!r}")
    TORCH_TO_ONNX[module_cls] = tuple(onnx_names)
    _DATA_MOVEMENT[module_cls] = data_movement
    for table, fn in ((_PARAMS, params), (_OUTPUT_OP, output_op)):
        if fn is None:
            table.pop(module_cls, None)
        else:
            table[module_cls] = fn
    KNOWN_ONNX_TYPES.update(onnx_names)
    return module_cls


def _registered_class(module: Union[nn.Module, Type[nn.Module]]) -> Optional[Type[nn.Module]]:
    """The nearest class in ``module``'s MRO that has an entry, or None."""
    cls = module if isinstance(module, type) else type(module)
    for base in cls.__mro__:
        if base in TORCH_TO_ONNX:
            return base
    return None


def onnx_types_of(module: Union[nn.Module, Type[nn.Module]]) -> Tuple[str, ...]:
    """The ONNX op types a module (instance or class) stands for; ``()`` when unknown."""
    cls = _registered_class(module)
    return TORCH_TO_ONNX[cls] if cls is not None else ()


def is_data_movement(module: Union[nn.Module, Type[nn.Module]]) -> bool:
    """Whether the module only moves or selects values (its outputs are among its inputs).

    Given a class, a flag that depends on the instance (``Upsample``'s mode) counts as False.
    Unknown modules give False.
    """
    cls = _registered_class(module)
    if cls is None:
        return False
    flag = _DATA_MOVEMENT[cls]
    if isinstance(flag, bool):
        return flag
    return False if isinstance(module, type) else bool(flag(module))


def params_of(module: nn.Module) -> Dict[str, torch.Tensor]:
    """The floating-point tensors ``module``'s op takes as parameters, by name.

    These are what the config's ``params`` rules and the sim's parameter quantizers address:
    the module's own floating-point parameters, unless its class was registered with
    ``params=`` (:func:`register_op_type`), which computes them (``quantsim.nn``'s fused
    conv-BN modules give their folded ``weight`` and ``bias``).

    Example:
        >>> sorted(params_of(torch.nn.Linear(2, 3)))
        ['bias', 'weight']
    """
    cls = _registered_class(module)
    if cls is not None and cls in _PARAMS:
        return _PARAMS[cls](module)
    return {n: p for n, p in module.named_parameters(recurse=False) if p.is_floating_point()}


def output_types_of(module: nn.Module) -> Tuple[str, ...]:
    """The ONNX op types of the op that produces ``module``'s output, whose config rules its
    output quantizers follow: :func:`onnx_types_of` of the submodule that the class's
    ``output_op`` function names (a fused conv-BN-ReLU's ReLU), else of the module itself."""
    cls = _registered_class(module)
    if cls is not None and cls in _OUTPUT_OP:
        inner = _OUTPUT_OP[cls](module)
        if inner is not None:
            return onnx_types_of(inner)
    return onnx_types_of(module)


def register_param_axes(module_cls: Type[nn.Module], **param_axes: int) -> Type[nn.Module]:
    """Declare the axis that holds the output channels of parameters of ``module_cls`` whose
    output channels are not on axis 0 (``register_param_axes(nn.ConvTranspose2d, weight=1)``).

    Adds to the class's earlier declarations; subclasses inherit them (see :func:`param_axis`).

    Returns:
        ``module_cls`` unchanged.

    Raises:
        TypeError: ``module_cls`` is not an ``nn.Module`` subclass, or an axis is not an int.
    """
    if not (isinstance(module_cls, type) and issubclass(module_cls, nn.Module)):
        raise TypeError(f"register_param_axes: expected an nn.Module subclass, got {module_cls!r}")
    bad = {n: a for n, a in param_axes.items() if isinstance(a, bool) or not isinstance(a, int)}
    if bad:
        raise TypeError(f"register_param_axes({module_cls.__name__}): axes must be ints, got {bad}")
    _PARAM_AXES.setdefault(module_cls, {}).update(param_axes)
    return module_cls


def param_axis(module: Union[nn.Module, Type[nn.Module]], param_name: str) -> int:
    """The axis of parameter ``param_name`` that holds the output channels of ``module`` (an
    instance or a class): what the nearest class in its MRO declared with
    :func:`register_param_axes`, else 0.

    Example:
        >>> param_axis(torch.nn.ConvTranspose2d(2, 3, 1), "weight")
        1
        >>> param_axis(torch.nn.Conv2d, "weight")
        0
    """
    cls = module if isinstance(module, type) else type(module)
    for base in cls.__mro__:
        axes = _PARAM_AXES.get(base)
        if axes is not None and param_name in axes:
            return axes[param_name]
    return 0


def _nearest_upsample(module: nn.Module) -> bool:
    return getattr(module, "mode", "nearest") == "nearest"


def _builtin(names: Tuple[str, ...], classes: str, data_movement: DataMovement = False) -> None:
    """Register the ``torch.nn`` classes named in ``classes`` (those this torch has)."""
    for cls_name in classes.split():
        cls = getattr(nn, cls_name, None)
        if cls is not None:
            register_op_type(cls, *names, data_movement=data_movement)
            _BUILTIN[cls] = (names, data_movement)


# --- the built-in table: aimet-torch's entries first, then the obvious ONNX equivalents -----
_builtin(("Conv",), "Conv1d Conv2d Conv3d")
_builtin(("ConvTranspose",), "ConvTranspose1d ConvTranspose2d ConvTranspose3d")
for _cls in (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d):
    register_param_axes(_cls, weight=1)  # (in, out / groups, *kernel): output channels on axis 1
_builtin(("Gemm", "MatMul"), "Linear")
_builtin(("BatchNormalization",), "BatchNorm1d BatchNorm2d BatchNorm3d")
_builtin(("InstanceNormalization",), "InstanceNorm1d InstanceNorm2d InstanceNorm3d")
_builtin(("GroupNormalization", "GroupNorm"), "GroupNorm")
_builtin(("LayerNormalization", "LayerNorm"), "LayerNorm")
_builtin(("RMSNormalization",), "RMSNorm")
_builtin(("LRN",), "LocalResponseNorm")
_builtin(("Relu",), "ReLU")
_builtin(("Clip",), "ReLU6 Hardtanh")
_builtin(("LeakyRelu",), "LeakyReLU")
_builtin(("PRelu",), "PReLU")
_builtin(("HardSwish",), "Hardswish")
_builtin(("HardSigmoid",), "Hardsigmoid")
_builtin(("GELU", "Gelu"), "GELU")
_builtin(("Elu",), "ELU")
_builtin(("Selu",), "SELU")
_builtin(("Celu",), "CELU")
_builtin(("Mish",), "Mish")
_builtin(("Swish",), "SiLU")
_builtin(("Sigmoid",), "Sigmoid")
_builtin(("Tanh",), "Tanh")
_builtin(("Softmax",), "Softmax")
_builtin(("LogSoftmax",), "LogSoftmax")
_builtin(("Softplus",), "Softplus")
_builtin(("Softsign",), "Softsign")
_builtin(("MaxPool",), "MaxPool1d MaxPool2d MaxPool3d", data_movement=True)
_builtin(("GlobalMaxPool", "MaxPool"), "AdaptiveMaxPool1d AdaptiveMaxPool2d AdaptiveMaxPool3d",
         data_movement=True)
_builtin(("AveragePool",), "AvgPool1d AvgPool2d AvgPool3d")
_builtin(("GlobalAveragePool", "AveragePool"),
         "AdaptiveAvgPool1d AdaptiveAvgPool2d AdaptiveAvgPool3d")
_builtin(("Dropout",), "Dropout Dropout1d Dropout2d Dropout3d AlphaDropout FeatureAlphaDropout",
         data_movement=True)
_builtin(("Identity",), "Identity", data_movement=True)
_builtin(("Flatten",), "Flatten", data_movement=True)
_builtin(("Reshape",), "Unflatten", data_movement=True)
_builtin(("Pad",), "ZeroPad1d ZeroPad2d ZeroPad3d ConstantPad1d ConstantPad2d ConstantPad3d")
_builtin(("Pad",), "ReflectionPad1d ReflectionPad2d ReflectionPad3d ReplicationPad1d "
         "ReplicationPad2d ReplicationPad3d CircularPad1d CircularPad2d CircularPad3d",
         data_movement=True)
_builtin(("Gather",), "Embedding")
_builtin(("Upsample", "Resize"), "Upsample", data_movement=_nearest_upsample)
_builtin(("Upsample", "Resize"), "UpsamplingNearest2d", data_movement=True)
_builtin(("Upsample", "Resize"), "UpsamplingBilinear2d")
_builtin(("DepthToSpace",), "PixelShuffle", data_movement=True)
_builtin(("SpaceToDepth",), "PixelUnshuffle", data_movement=True)
_builtin(("ChannelShuffle",), "ChannelShuffle", data_movement=True)
_builtin(("LSTM",), "LSTM")
_builtin(("GRU",), "GRU")
_builtin(("RNN",), "RNN")


def op_type_table_markdown() -> str:
    """The built-in module table as Markdown, as ``docs/config.md`` shows it.

    Only the entries this module registers itself are listed, so the text does not depend on
    what else has been imported. ``python -m quantsim.op_types`` prints it.
    """
    groups: Dict[Tuple[Tuple[str, ...], str], List[str]] = {}
    for cls in sorted(_BUILTIN, key=lambda c: c.__name__.lower()):
        onnx_names, flag = _BUILTIN[cls]
        moves = "yes" if flag is True else ("no" if flag is False else "if mode='nearest'")
        groups.setdefault((onnx_names, moves), []).append(f"`nn.{cls.__name__}`")
    rows = ["| torch module(s) | config op type(s) | data movement |", "|---|---|---|"]
    for (onnx_names, moves), classes in groups.items():
        names = ", ".join(f"`{n}`" for n in onnx_names)
        rows.append(f"| {', '.join(classes)} | {names} | {moves} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":  # pragma: no cover
    print(op_type_table_markdown(), end="")
