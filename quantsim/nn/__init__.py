"""Quantizable modules: functional ops as modules, attention, fused conv-BN, QAT layers.

* :mod:`quantsim.nn.elementwise`: ``Add``, ``Sub``, ``Mul``, ``Div``, ``Pow``, ``MatMul``,
  ``Exp``, ``Sqrt``, ``Mean``, ``Sum``, ``Concat``, ``Reshape``, ``Permute``, ``Transpose``;
* :mod:`quantsim.nn.attention`: ``QuantizableMultiheadAttention``,
  ``replace_multihead_attention``, ``AttentionMaskAdd`` (an additive attention mask, simulated as a select);
* :mod:`quantsim.nn.fused`: ``ConvBn``, ``ConvTransposeBn``, ``LinearBn`` (BatchNorm fused
  into the layer for QAT, simulated and exported folded by a QuantizationSimModel),
  ``fuse_conv_bn``, ``FoldedLayer``;
* :mod:`quantsim.nn.qat`: single-operator QAT layers (``Conv2dQAT``...).

Importing this package registers the ONNX op types of these modules with
:mod:`quantsim.op_types`.
"""
from quantsim.nn.attention import (
    AttentionMaskAdd,
    QuantizableMultiheadAttention,
    attention_mask_to_bias,
    causal_attention_bias,
    replace_multihead_attention,
)
from quantsim.nn.elementwise import (
    ELEMENTWISE_MODULES,
    Add,
    Concat,
    Div,
    Exp,
    MatMul,
    Mean,
    Mul,
    Permute,
    Pow,
    Reshape,
    Sqrt,
    Sub,
    Sum,
    Transpose,
)
from quantsim.nn.fused import (FUSED_MODULES, ConvBn, ConvTransposeBn, FoldedLayer, LinearBn,
                               folded_params, fuse_conv_bn, fused_activation)


def _register_op_types() -> None:
    """Tell :mod:`quantsim.op_types` which ONNX op types our modules stand for (and, for the
    fused conv-BN modules, their computed parameters and their output's op)."""
    from quantsim.op_types import register_op_type

    for cls, (names, data_movement) in ELEMENTWISE_MODULES.items():
        register_op_type(cls, *names, data_movement=data_movement)
    for cls, (names, data_movement) in FUSED_MODULES.items():
        register_op_type(cls, *names, data_movement=data_movement, params=folded_params,
                         output_op=fused_activation)


_register_op_types()

from quantsim.nn.qat import (  # noqa: E402  (after the registrations above)
    Conv2dQAT,
    Conv3dQAT,
    ConvTranspose2dQAT,
    LinearQAT,
    QATConfig,
    quantization_disabled,
    replace_with_qat,
)

__all__ = [
    "Add", "Sub", "Mul", "Div", "Pow", "MatMul", "Exp", "Sqrt", "Mean", "Sum", "Concat",
    "Reshape", "Permute", "Transpose", "QuantizableMultiheadAttention", "AttentionMaskAdd",
    "replace_multihead_attention", "attention_mask_to_bias", "causal_attention_bias",
    "ConvBn", "ConvTransposeBn", "LinearBn", "FoldedLayer", "fuse_conv_bn", "Conv2dQAT",
    "Conv3dQAT", "ConvTranspose2dQAT", "LinearQAT", "QATConfig", "quantization_disabled",
    "replace_with_qat",
]
