"""Single-operator QAT modules: Conv2d, ConvTranspose2d, Conv3d and Linear with built-in
quantization of their input and weight.

Each class subclasses its torch layer (same constructor arguments, plus ``config``), owns an
``input_quantizer`` (:class:`LearnedClipQuantizer`) and a ``weight_quantizer``
(:class:`ArqWeightQuantizer`), both configured :class:`~quantsim.quantizer.Quantizer` s, and is
registered against its float class in :data:`QAT_MODULES`: the one place that says which float
class gets which QAT class (:func:`quantsim.nn.qat.replace_with_qat` uses it). The weight's
output-channel axis is :func:`quantsim.op_types.param_axis`, the table the sim's per-channel
quantizers read too.

Switching quantization off (``module.quantize = False`` or
:func:`quantization_disabled`) makes ``forward`` the float layer's own ``forward``: outputs are
bit-identical to the float module, and nothing is calibrated.

The bias is simulated on the int32 grid of scale ``input_scale * weight_scale``
(:func:`~quantsim.nn.qat.quantizers.fake_quantize_bias`), as integer runtimes store it; the
deploy ONNX stores exactly those int32 codes.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Tuple, Type, TypeVar, Union

import torch
from torch import nn
from torch.nn import functional as F

from quantsim.errors import QuantizationSettingError, UnsupportedModelError
from quantsim.nn.qat.config import QATConfig
from quantsim.op_types import param_axis
from quantsim.nn.qat.quantizers import (
    ArqWeightQuantizer,
    LearnedClipQuantizer,
    fake_quantize_bias,
)

ConfigLike = Union[None, Mapping[str, Any], QATConfig]

#: float class -> QAT class, filled by :func:`register_qat`.
QAT_MODULES: Dict[Type[nn.Module], Type["QATModuleMixin"]] = {}

_T = TypeVar("_T", bound=type)


def register_qat(float_cls: Type[nn.Module]) -> Callable[[_T], _T]:
    """Class decorator: register a QAT class as the replacement of ``float_cls``."""

    def wrap(qat_cls: _T) -> _T:
        QAT_MODULES[float_cls] = qat_cls
        qat_cls.FLOAT_CLASS = float_cls
        return qat_cls

    return wrap


def qat_class_for(float_cls: type) -> Type["QATModuleMixin"]:
    """The QAT class registered for ``float_cls``.

    Raises:
        UnsupportedModelError: naming the supported classes and how to add one.
    """
    try:
        return QAT_MODULES[float_cls]
    except KeyError:
        raise UnsupportedModelError(
            f"no QAT module is registered for {float_cls.__name__}; supported: "
            f"{sorted(c.__name__ for c in QAT_MODULES)} (register one with "
            "@quantsim.nn.qat.register_qat(<float class>))"
        ) from None


def _check_padding_mode(padding_mode: str, where: str) -> None:
    if padding_mode != "zeros":
        raise UnsupportedModelError(
            f"{where}: padding_mode {padding_mode!r} is not supported; QAT modules need "
            "padding_mode='zeros' (pad explicitly with F.pad before the layer instead)"
        )


class QATModuleMixin:
    """What the four QAT classes share: config, quantizers, the ``quantize`` switch.

    Attributes:
        quantize: when False, ``forward`` is exactly the float layer's ``forward``.
        qat_config: the parsed :class:`~quantsim.nn.qat.config.QATConfig`.
    """

    FLOAT_CLASS: Type[nn.Module]

    def _init_qat(self, config: ConfigLike) -> None:
        self.qat_config = QATConfig.coerce(config)
        self.check_config(self.qat_config)
        axis = param_axis(self, "weight")
        device = self.weight.device
        self.input_quantizer = LearnedClipQuantizer(self.qat_config.data).to(device)
        self.weight_quantizer = ArqWeightQuantizer(
            self.qat_config.weight, self.weight.shape[axis], axis).to(device)
        self.quantize = True

    @classmethod
    def check_config(cls, config: QATConfig) -> None:
        """Refuse config options this layer type cannot honour (none by default)."""

    @classmethod
    def check_float(cls, module: nn.Module, config: ConfigLike = None) -> None:
        """Raise if ``module`` cannot become this QAT class (wrong type, a restriction).

        Raises:
            UnsupportedModelError: wrong type, ``padding_mode`` other than ``'zeros'``, ...
            QuantizationSettingError: a config option this layer type does not support.
        """
        if not isinstance(module, cls.FLOAT_CLASS) or isinstance(module, QATModuleMixin):
            raise UnsupportedModelError(
                f"{cls.__name__}.from_float expects a {cls.FLOAT_CLASS.__name__}, "
                f"got {type(module).__name__}"
            )
        cls.check_config(QATConfig.coerce(config))
        _check_padding_mode(getattr(module, "padding_mode", "zeros"), cls.__name__)

    @staticmethod
    def _float_kwargs(module: nn.Module) -> Dict[str, Any]:  # pragma: no cover - overridden
        raise NotImplementedError

    @classmethod
    def from_float(cls, module: nn.Module, config: ConfigLike = None) -> "QATModuleMixin":
        """Build the QAT module from a float layer: copies hyper-parameters, weight and bias.

        The copy has its own parameters (same values, dtype, device, ``requires_grad``) and the
        float layer's training mode; the float layer is left untouched.

        Args:
            module: a layer of :attr:`FLOAT_CLASS`.
            config: a retrain config dict (see :mod:`quantsim.nn.qat.config`) or ``None``.

        Raises:
            UnsupportedModelError, QuantizationSettingError: see :meth:`check_float`.
        """
        cls.check_float(module, config)
        qat = cls(**cls._float_kwargs(module), config=config,
                  device=module.weight.device, dtype=module.weight.dtype)
        with torch.no_grad():
            for name in ("weight", "bias"):
                src = getattr(module, name)
                if src is not None:
                    getattr(qat, name).copy_(src)
                    getattr(qat, name).requires_grad_(src.requires_grad)
        qat.train(module.training)
        return qat

    def _qat_operands(
        self, x: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """Quantized input, weight and (int32-grid) bias."""
        x_q, x_scale = self.input_quantizer.forward_with_scale(x)
        w_q, w_scale = self.weight_quantizer.forward_with_scale(self.weight)
        bias = None if self.bias is None else fake_quantize_bias(self.bias, x_scale, w_scale)
        return x_q, w_q, bias

    def extra_repr(self) -> str:
        """The float layer's description plus the ``quantize`` switch."""
        return super().extra_repr() + f", quantize={self.quantize}"


def _conv_kwargs(module: nn.Module) -> Dict[str, Any]:
    return dict(in_channels=module.in_channels, out_channels=module.out_channels,
                kernel_size=module.kernel_size, stride=module.stride, padding=module.padding,
                dilation=module.dilation, groups=module.groups, bias=module.bias is not None,
                padding_mode=module.padding_mode)


@register_qat(nn.Conv2d)
class Conv2dQAT(QATModuleMixin, nn.Conv2d):
    """``nn.Conv2d`` that quantizes its input and weight during training.

    Takes ``nn.Conv2d``'s arguments (``padding_mode`` must be ``'zeros'``) and ``config``.

    Args:
        config: retrain config (see :mod:`quantsim.nn.qat.config`); ``None``: defaults.

    Example:
        >>> conv = Conv2dQAT(1, 4, 3, config={"retrain_data_config": {"batch_num": 1}})
        >>> conv(torch.rand(2, 1, 8, 8)).shape
        torch.Size([2, 4, 6, 6])
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Any, stride: Any = 1,
                 padding: Any = 0, dilation: Any = 1, groups: int = 1, bias: bool = True,
                 padding_mode: str = "zeros", device: Any = None, dtype: Any = None,
                 config: ConfigLike = None) -> None:
        _check_padding_mode(padding_mode, type(self).__name__)
        nn.Conv2d.__init__(self, in_channels, out_channels, kernel_size, stride, padding,
                           dilation, groups, bias, padding_mode, device, dtype)
        self._init_qat(config)

    _float_kwargs = staticmethod(_conv_kwargs)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """Convolve the quantized input with the quantized weight (float bias)."""
        if not self.quantize:
            return nn.Conv2d.forward(self, input)
        x, w, b = self._qat_operands(input)
        return self._conv_forward(x, w, b)


@register_qat(nn.Conv3d)
class Conv3dQAT(QATModuleMixin, nn.Conv3d):
    """``nn.Conv3d`` that quantizes its input and weight during training.

    Restriction: the depth dilation must be 1 (``dilation=(1, h, w)``).

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
            padding_mode, device, dtype: as ``nn.Conv3d`` (``padding_mode`` must be ``'zeros'``).
        config: retrain config (see :mod:`quantsim.nn.qat.config`); ``None``: defaults.

    Example:
        >>> conv = Conv3dQAT(1, 2, 3, config={"retrain_data_config": {"batch_num": 1}})
        >>> conv(torch.rand(1, 1, 4, 5, 5)).shape
        torch.Size([1, 2, 2, 3, 3])
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Any, stride: Any = 1,
                 padding: Any = 0, dilation: Any = 1, groups: int = 1, bias: bool = True,
                 padding_mode: str = "zeros", device: Any = None, dtype: Any = None,
                 config: ConfigLike = None) -> None:
        _check_padding_mode(padding_mode, type(self).__name__)
        nn.Conv3d.__init__(self, in_channels, out_channels, kernel_size, stride, padding,
                           dilation, groups, bias, padding_mode, device, dtype)
        if self.dilation[0] != 1:
            raise UnsupportedModelError(
                f"Conv3dQAT: dilation in depth must be 1, got dilation={tuple(self.dilation)}; "
                "allowed: (1, h, w)"
            )
        self._init_qat(config)

    _float_kwargs = staticmethod(_conv_kwargs)

    @classmethod
    def check_float(cls, module: nn.Module, config: ConfigLike = None) -> None:  # noqa: D102
        super().check_float(module, config)
        if module.dilation[0] != 1:
            raise UnsupportedModelError(
                f"Conv3dQAT: dilation in depth must be 1, got dilation={tuple(module.dilation)}; "
                "allowed: (1, h, w)"
            )

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """Convolve the quantized input with the quantized weight (float bias)."""
        if not self.quantize:
            return nn.Conv3d.forward(self, input)
        x, w, b = self._qat_operands(input)
        return self._conv_forward(x, w, b)


@register_qat(nn.ConvTranspose2d)
class ConvTranspose2dQAT(QATModuleMixin, nn.ConvTranspose2d):
    """``nn.ConvTranspose2d`` that quantizes its input and weight during training.

    The weight is ``(in, out / groups, kh, kw)``, so ``channel_wise`` scales run along axis 1;
    ``channel_wise`` with ``groups > 1`` is refused (output channels of different groups would
    share a scale).

    Args:
        in_channels, out_channels, kernel_size, stride, padding, output_padding, groups, bias,
            dilation, padding_mode, device, dtype: as ``nn.ConvTranspose2d``.
        config: retrain config (see :mod:`quantsim.nn.qat.config`); ``None``: defaults.

    Example:
        >>> up = ConvTranspose2dQAT(2, 1, 2, stride=2, config={"retrain_data_config": {"batch_num": 1}})
        >>> up(torch.rand(1, 2, 3, 3)).shape
        torch.Size([1, 1, 6, 6])
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Any, stride: Any = 1,
                 padding: Any = 0, output_padding: Any = 0, groups: int = 1, bias: bool = True,
                 dilation: Any = 1, padding_mode: str = "zeros", device: Any = None,
                 dtype: Any = None, config: ConfigLike = None) -> None:
        _check_padding_mode(padding_mode, type(self).__name__)
        nn.ConvTranspose2d.__init__(self, in_channels, out_channels, kernel_size, stride, padding,
                                    output_padding, groups, bias, dilation, padding_mode,
                                    device, dtype)
        self._check_groups(groups, QATConfig.coerce(config))
        self._init_qat(config)

    @staticmethod
    def _check_groups(groups: int, config: QATConfig) -> None:
        if groups > 1 and config.weight.channel_wise:
            raise QuantizationSettingError(
                f"ConvTranspose2dQAT: retrain_weight_config.channel_wise=True needs groups=1, "
                f"got groups={groups}; use channel_wise=False for grouped transposed convs"
            )

    @staticmethod
    def _float_kwargs(module: nn.Module) -> Dict[str, Any]:
        kwargs = _conv_kwargs(module)
        kwargs["output_padding"] = module.output_padding
        return kwargs

    @classmethod
    def check_float(cls, module: nn.Module, config: ConfigLike = None) -> None:  # noqa: D102
        super().check_float(module, config)
        cls._check_groups(module.groups, QATConfig.coerce(config))

    def forward(self, input: torch.Tensor, output_size: Optional[list] = None) -> torch.Tensor:
        """Transposed convolution of the quantized input with the quantized weight."""
        if not self.quantize:
            return nn.ConvTranspose2d.forward(self, input, output_size)
        output_padding = self._output_padding(input, output_size, self.stride, self.padding,
                                              self.kernel_size, 2, self.dilation)
        x, w, b = self._qat_operands(input)
        return F.conv_transpose2d(x, w, b, self.stride, self.padding, output_padding,
                                  self.groups, self.dilation)


@register_qat(nn.Linear)
class LinearQAT(QATModuleMixin, nn.Linear):
    """``nn.Linear`` that quantizes its input and weight during training.

    Restriction: ``channel_wise=True`` is refused (one weight scale per layer).

    Args:
        in_features, out_features, bias, device, dtype: as ``nn.Linear``.
        config: retrain config (see :mod:`quantsim.nn.qat.config`); ``None``: defaults.

    Example:
        >>> fc = LinearQAT(4, 2, config={"retrain_data_config": {"batch_num": 1}})
        >>> fc(torch.rand(3, 4)).shape
        torch.Size([3, 2])
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 device: Any = None, dtype: Any = None, config: ConfigLike = None) -> None:
        nn.Linear.__init__(self, in_features, out_features, bias, device, dtype)
        self._init_qat(config)

    @classmethod
    def check_config(cls, config: QATConfig) -> None:  # noqa: D102
        if config.weight.channel_wise:
            raise QuantizationSettingError(
                "LinearQAT: retrain_weight_config.channel_wise=True is not supported for Linear "
                "layers; allowed: channel_wise=False (one weight scale per layer)"
            )

    @staticmethod
    def _float_kwargs(module: nn.Module) -> Dict[str, Any]:
        return dict(in_features=module.in_features, out_features=module.out_features,
                    bias=module.bias is not None)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """``x_q @ w_q.T + bias``."""
        if not self.quantize:
            return nn.Linear.forward(self, input)
        x, w, b = self._qat_operands(input)
        return F.linear(x, w, b)


def qat_modules(model: nn.Module) -> Iterator[QATModuleMixin]:
    """Every QAT module inside ``model`` (``model`` itself included)."""
    return (m for m in model.modules() if isinstance(m, QATModuleMixin))


@contextlib.contextmanager
def quantization_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run every QAT module of ``model`` as its float layer inside the ``with`` block.

    Restores each module's previous ``quantize`` flag on exit, even after an exception.

    Example:
        >>> fc = LinearQAT(4, 2)
        >>> with quantization_disabled(fc):
        ...     y = fc(torch.ones(1, 4))       # float, no calibration
        >>> fc.quantize
        True
    """
    saved = [(m, m.quantize) for m in qat_modules(model)]
    try:
        for m, _ in saved:
            m.quantize = False
        yield model
    finally:
        for m, flag in saved:
            m.quantize = flag
