"""A layer with its BatchNorm fused in, for quantization-aware training.

During QAT the BatchNorm should keep learning its statistics, yet the weights the hardware
sees are the *folded* ones (``w * gamma / sqrt(var + eps)``). The fused modules here do what
torch.ao's intrinsic QAT modules do:

* **train mode**: scale the weight by ``gamma / sqrt(running_var + eps)``, pass it through
  ``weight_fake_quant`` (identity unless a quantizer is set), run the layer, divide the scale
  back out, add the layer's bias and run the BatchNorm with *batch* statistics (which updates
  its running statistics);
* **eval mode**: run the layer with the folded weight and bias, the same numbers the folded
  export gives;
* :meth:`~_FusedBn.fold` returns the plain layer with the folded weight and bias.

An optional activation module (``nn.ReLU``, ``nn.ReLU6``...) runs after the BatchNorm.

:func:`fold_batch_norm_` holds the folding arithmetic (computed in float64) for these modules
and for :func:`quantsim.prepare.fold_all_batch_norms`.
"""
from __future__ import annotations

import copy
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from quantsim.errors import UnsupportedModelError

_BN = nn.modules.batchnorm._BatchNorm
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)

__all__ = ["ConvBn", "ConvTransposeBn", "LinearBn", "fuse_conv_bn", "fold_batch_norm_",
           "check_foldable", "FUSED_MODULES"]


def _out_channel_dim(layer: nn.Module) -> int:
    """The weight dimension that indexes output channels."""
    return 1 if isinstance(layer, _CONV_T) else 0


def check_foldable(layer: nn.Module, bn: nn.Module) -> None:
    """Raise if ``bn`` cannot be folded into ``layer``.

    Raises:
        UnsupportedModelError: not a conv/linear + BatchNorm pair, a grouped transposed
            convolution, a BatchNorm without running statistics, or a channel mismatch.
    """
    if not isinstance(layer, _CONV + _CONV_T + (nn.Linear,)):
        raise UnsupportedModelError(
            f"cannot fold BatchNorm into {type(layer).__name__}: only Conv1d/2d/3d, "
            "ConvTranspose1d/2d/3d and Linear layers take a folded BatchNorm")
    if not isinstance(bn, _BN):
        raise UnsupportedModelError(f"{type(bn).__name__} is not a BatchNorm module")
    if isinstance(layer, _CONV_T) and layer.groups != 1:
        raise UnsupportedModelError(
            f"cannot fold BatchNorm into a grouped {type(layer).__name__} "
            f"(groups={layer.groups}); keep the BatchNorm")
    if not bn.track_running_stats or bn.running_var is None:
        raise UnsupportedModelError(
            "cannot fold a BatchNorm built with track_running_stats=False: it always uses "
            "batch statistics")
    channels = layer.weight.shape[_out_channel_dim(layer)] * (
        layer.groups if isinstance(layer, _CONV_T) else 1)
    if channels != bn.num_features:
        raise UnsupportedModelError(
            f"{type(layer).__name__} has {channels} output channels but the BatchNorm "
            f"normalises {bn.num_features}")


def _bn_scale_shift(bn: nn.Module) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(gamma / sqrt(var + eps), beta - mean * scale)`` in float64."""
    var = bn.running_var.detach().double()
    mean = bn.running_mean.detach().double()
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(var)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(var)
    scale = gamma / torch.sqrt(var + bn.eps)
    return scale, beta - mean * scale


def _view_for_weight(vec: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    shape = [1] * layer.weight.dim()
    shape[_out_channel_dim(layer)] = -1
    return vec.reshape(shape)


def fold_batch_norm_(layer: nn.Module, bn: nn.Module) -> None:
    """Fold ``bn`` (its running statistics) into ``layer``'s weight and bias, in place.

    After this, ``layer(x)`` equals ``bn.eval()(layer_before(x))``. A missing bias is created.

    Args:
        layer: a Conv1d/2d/3d, non-grouped ConvTranspose1d/2d/3d or Linear.
        bn: the BatchNorm that followed it.

    Raises:
        UnsupportedModelError: see :func:`check_foldable`.
    """
    check_foldable(layer, bn)
    scale, shift = _bn_scale_shift(bn)
    weight = layer.weight.detach().double() * _view_for_weight(scale, layer)
    bias = shift if layer.bias is None else layer.bias.detach().double() * scale + shift
    with torch.no_grad():
        layer.weight.copy_(weight.to(layer.weight.dtype))
        if layer.bias is None:
            layer.bias = nn.Parameter(bias.to(layer.weight.dtype))
        else:
            layer.bias.copy_(bias.to(layer.bias.dtype))


class _FusedBn(nn.Module):
    """A layer, its BatchNorm and an optional activation, trained as one folded layer.

    Args:
        layer: the conv / linear layer (its ``weight`` and ``bias`` stay the float ones).
        bn: the BatchNorm after it; its statistics keep updating in train mode.
        activation: an optional module applied last.

    Attributes:
        weight_fake_quant: called on the folded weight before use (identity by default);
            a quantization wrapper puts its weight quantizer here.
    """

    def __init__(self, layer: nn.Module, bn: nn.Module,
                 activation: Optional[nn.Module] = None) -> None:
        super().__init__()
        check_foldable(layer, bn)
        self.layer, self.bn = layer, bn
        self.activation = activation if activation is not None else nn.Identity()
        self.weight_fake_quant: Callable[[torch.Tensor], torch.Tensor] = _identity

    @property
    def weight(self) -> torch.Tensor:
        """The layer's (unfolded) weight."""
        return self.layer.weight

    def _scale(self) -> torch.Tensor:
        var = self.bn.running_var
        gamma = self.bn.weight if self.bn.weight is not None else torch.ones_like(var)
        return gamma / torch.sqrt(var + self.bn.eps)

    def _run(self, x: torch.Tensor, weight: torch.Tensor,
             bias: Optional[torch.Tensor]) -> torch.Tensor:
        layer = self.layer
        if isinstance(layer, nn.Linear):
            return F.linear(x, weight, bias)
        if isinstance(layer, _CONV_T):
            return F.__dict__[f"conv_transpose{layer.weight.dim() - 2}d"](
                x, weight, bias, layer.stride, layer.padding, layer.output_padding,
                layer.groups, layer.dilation)
        return layer._conv_forward(x, weight, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Folded layer in eval mode; layer + batch-statistics BatchNorm in train mode."""
        scale = self._scale()
        weight = self.weight_fake_quant(self.layer.weight * _view_for_weight(scale, self.layer))
        if not self.training:
            bias = self.layer.bias if self.layer.bias is not None else torch.zeros_like(scale)
            shift = self.bn.bias if self.bn.bias is not None else torch.zeros_like(scale)
            return self.activation(self._run(
                x, weight, (bias - self.bn.running_mean) * scale + shift))
        y = self._run(x, weight, None)
        channel_shape = [1] * y.dim()
        channel_shape[1] = -1
        y = y / scale.reshape(channel_shape)
        if self.layer.bias is not None:
            y = y + self.layer.bias.reshape(channel_shape)
        return self.activation(self.bn(y))

    def fold(self) -> nn.Module:
        """The plain layer with the BatchNorm folded in (a copy), followed by the activation
        if there is one (then an ``nn.Sequential(layer, activation)``)."""
        layer = copy.deepcopy(self.layer)
        fold_batch_norm_(layer, self.bn)
        if isinstance(self.activation, nn.Identity):
            return layer
        return nn.Sequential(layer, copy.deepcopy(self.activation))


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


class ConvBn(_FusedBn):
    """Conv1d/2d/3d + BatchNorm (+ activation) for QAT; see :mod:`quantsim.nn.fused`.

    Example:
        >>> conv, bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        >>> fused = ConvBn(conv, bn, nn.ReLU())
        >>> y = fused(torch.randn(2, 3, 8, 8))        # train mode: bn statistics update
        >>> folded = fused.eval().fold()               # nn.Sequential(conv, relu)
        >>> x = torch.randn(1, 3, 8, 8)
        >>> torch.allclose(folded(x), fused(x), atol=1e-5)
        True
    """


class ConvTransposeBn(_FusedBn):
    """Non-grouped ConvTranspose1d/2d/3d + BatchNorm (+ activation) for QAT."""


class LinearBn(_FusedBn):
    """Linear + BatchNorm1d (+ activation) for QAT (the Linear output must be ``(N, C)``)."""


def fuse_conv_bn(layer: nn.Module, bn: nn.Module,
                 activation: Optional[nn.Module] = None) -> _FusedBn:
    """The fused QAT module for ``layer`` followed by ``bn`` (and ``activation``).

    Args:
        layer: Conv1d/2d/3d, non-grouped ConvTranspose1d/2d/3d or Linear.
        bn: the BatchNorm that consumes the layer's output.
        activation: e.g. ``nn.ReLU()`` or ``nn.ReLU6()``; None for none.

    Returns:
        A :class:`ConvBn`, :class:`ConvTransposeBn` or :class:`LinearBn` sharing the given
        modules (not copies) and in ``layer``'s training mode.

    Raises:
        UnsupportedModelError: the pair cannot be folded (see :func:`check_foldable`).
    """
    cls = LinearBn if isinstance(layer, nn.Linear) else (
        ConvTransposeBn if isinstance(layer, _CONV_T) else ConvBn)
    return cls(layer, bn, activation).train(layer.training)


#: fused class -> (ONNX op types, data movement), registered by ``quantsim.nn``
FUSED_MODULES = {
    ConvBn: (("Conv",), False),
    ConvTransposeBn: (("ConvTranspose",), False),
    LinearBn: (("Gemm", "MatMul"), False),
}
