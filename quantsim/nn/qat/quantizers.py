"""The two quantizers a single-operator QAT module holds.

* :class:`LearnedClipQuantizer` (the layer's input): an asymmetric grid whose clip range
  ``[clip_min, clip_max]`` is first calibrated from the min/max of the first ``batch_num``
  training batches and then learned as ``nn.Parameter`` s, LSQ-style: the gradients come from
  :func:`quantsim.encoding.fake_quantize` through :func:`~quantsim.encoding.adjust_range` and
  :func:`~quantsim.encoding.scale_offset_from_range` (``round`` is straight-through there).
* :class:`ArqWeightQuantizer` (``arq_retrain``, the weight): a symmetric grid whose scale is
  recomputed from the current weight on every forward, per tensor or per output channel, and
  treated as a constant by autograd (the weight itself gets the straight-through gradient).

Both export to ONNX as a ``QuantizeLinear``/``DequantizeLinear`` pair carrying the current
scale and zero point (:func:`export_fake_quantize`, used only inside ``torch.onnx.export``).
"""
from __future__ import annotations

import warnings
from typing import Optional, Tuple

import torch
from torch import nn

from quantsim.encoding import (
    Encoding,
    adjust_range,
    amin_amax,
    channel_view,
    dequantize,
    fake_quantize,
    integer_grid,
    quantize,
    scale_offset_from_range,
)
from quantsim.errors import CalibrationError, ExportError
from quantsim.nn.qat.config import RetrainDataConfig, RetrainWeightConfig


def export_fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor,
    qmin: int,
    qmax: int,
    axis: Optional[int] = None,
) -> torch.Tensor:
    """Export-time twin of :func:`quantsim.encoding.fake_quantize`: a QuantizeLinear /
    DequantizeLinear pair in the ONNX graph.

    * dynamo exporter (``torch.onnx.export(..., dynamo=True)``, the default): the two ONNX nodes
      are emitted directly with ``torch.onnx.ops.symbolic`` (works with dynamic shapes);
    * TorchScript exporter (``dynamo=False``): torch's ``fake_quantize_per_{tensor,channel}_affine``,
      which that exporter turns into the same pair.

    The ONNX zero point is ``-offset``; only 8-bit containers are written (TOOLCHAIN §3: ORT
    loads opset <= 20 QDQ graphs at every optimization level). A narrower grid (INT4) is stored
    in the 8-bit container of its sign, preceded by a clamp to the grid's real range, so the pair
    computes exactly the narrow fake-quant; weights need no clamp (their range is their own
    min/max, so their codes never leave the narrow grid).

    Args:
        x: the tensor to quantize.
        scale, offset: 0-d (per tensor) or 1-d along ``axis``, without gradient.
        qmin, qmax: the internal grid (see :func:`quantsim.encoding.integer_grid`).
        axis: channel axis of ``x`` for per-channel encodings.

    Raises:
        ExportError: the grid does not fit an 8-bit container.
    """
    container = (0, 255) if qmin >= 0 else (-128, 127)
    if qmin < container[0] or qmax > container[1]:
        raise ExportError(
            f"QAT export: grid [{qmin}, {qmax}] does not fit an 8-bit ONNX QuantizeLinear; "
            "allowed dst_type for export: INT8, INT4"
        )
    zero_point = torch.round(-offset)
    if (qmin, qmax) != container:
        lo = dequantize(torch.full_like(scale, qmin), scale, offset)
        hi = dequantize(torch.full_like(scale, qmax), scale, offset)
        x = torch.clamp(x, channel_view(lo, x.dim(), axis), channel_view(hi, x.dim(), axis))
    if torch.jit.is_tracing():  # the TorchScript exporter
        zp = zero_point.to(torch.int32)
        if axis is None:
            return torch.fake_quantize_per_tensor_affine(x, scale, zp, *container)
        return torch.fake_quantize_per_channel_affine(x, scale, zp, axis, *container)
    qdtype = torch.uint8 if container[0] == 0 else torch.int8
    zp = zero_point.to(qdtype)
    scale = scale.to(x.dtype)
    attrs = {} if axis is None else {"axis": axis}
    q = torch.onnx.ops.symbolic("QuantizeLinear", (x, scale, zp), attrs, dtype=qdtype,
                                shape=x.shape)
    return torch.onnx.ops.symbolic("DequantizeLinear", (q, scale, zp), attrs, dtype=x.dtype,
                                   shape=x.shape)


#: Bitwidth of the bias grid (int32, as integer runtimes and ORT's QLinearConv store it).
BIAS_BITWIDTH = 32


def fake_quantize_bias(
    bias: torch.Tensor, input_scale: torch.Tensor, weight_scale: torch.Tensor
) -> torch.Tensor:
    """Put ``bias`` on the int32 grid of scale ``input_scale * weight_scale``.

    Integer runtimes add the bias to the int32 accumulator, so it is stored as int32 codes of
    that scale (ORT quantizes a float bias the same way when it fuses QLinearConv); simulating
    it keeps PyTorch, the fake-quant ONNX and the deploy ONNX in agreement, which matters at
    INT4 where the scale is coarse. Straight-through gradient to ``bias``; the scale is treated
    as a constant.

    Args:
        bias: the layer's float bias ``(C_out,)``.
        input_scale: the input quantizer's scale (0-d).
        weight_scale: the weight scale, 0-d or ``(C_out,)`` (then the bias grid is per channel).

    Returns:
        The bias rounded to the nearest multiple of the scale (half to even), as ``bias.dtype``.
    """
    scale = input_scale.detach() * weight_scale.detach()
    axis = 0 if scale.dim() == 1 else None
    offset = torch.zeros_like(scale)
    qmin, qmax = integer_grid(BIAS_BITWIDTH, symmetric=True)
    if torch.onnx.is_in_onnx_export():  # plain ops (no autograd.Function), folded to a constant
        codes = quantize(bias.detach(), scale, offset, qmin, qmax, axis)
        return dequantize(codes, scale, offset, axis).to(bias.dtype)
    return fake_quantize(bias, scale, offset, qmin, qmax, axis)


class LearnedClipQuantizer(nn.Module):
    """Asymmetric input quantizer with a calibrated, then learned, clip range.

    State (all in the ``state_dict``): ``clip_max`` (parameter), ``clip_min`` (parameter, or a
    buffer fixed at 0 when ``fixed_min``) and ``num_batches_calibrated`` (buffer).

    * Training-mode forwards ``1..batch_num`` *calibrate*: the clips become the running
      min/max of the data seen so far (a clip given in the config is kept instead) and the
      output is fake-quantized with them, with gradients to the input only.
    * Every later forward fake-quantizes with the current clips; in training the gradients of
      the output reach ``clip_min``/``clip_max`` (LSQ-style), so an optimizer learns them.
    * An eval-mode forward before any calibration raises :class:`CalibrationError`.

    Args:
        config: the ``retrain_data_config`` section.
        name: where the quantizer sits, used in messages.

    Example:
        >>> q = LearnedClipQuantizer(RetrainDataConfig(batch_num=1))
        >>> _ = q(torch.tensor([-1.0, 2.0]))          # training mode: calibrates
        >>> q.clip_min.item(), q.clip_max.item()
        (-1.0, 2.0)
    """

    def __init__(self, config: RetrainDataConfig, name: str = "") -> None:
        super().__init__()
        self.config = config
        self.name = name
        self.qmin, self.qmax = integer_grid(config.bitwidth, symmetric=False)
        self._calibrate_min = config.clip_min is None and not config.fixed_min
        self._calibrate_max = config.clip_max is None
        self.clip_max = nn.Parameter(torch.tensor(config.clip_max or 0.0))
        if config.fixed_min:
            self.register_buffer("clip_min", torch.tensor(0.0))
        else:
            self.clip_min = nn.Parameter(torch.tensor(config.clip_min or 0.0))
        self.register_buffer("num_batches_calibrated", torch.tensor(0, dtype=torch.long))
        self._seen = 0  # python mirror of num_batches_calibrated (readable during export)
        self._warned_negative = False

    # -- state ------------------------------------------------------------------------------
    @property
    def needs_calibration(self) -> bool:
        """True when at least one clip comes from data rather than from the config."""
        return self._calibrate_min or self._calibrate_max

    @property
    def calibrating(self) -> bool:
        """True while training-mode forwards still calibrate the clips."""
        return self.needs_calibration and self._seen < self.config.batch_num

    @property
    def ready(self) -> bool:
        """True when the clips hold usable values (calibrated at least once, or given)."""
        return not self.needs_calibration or self._seen > 0

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: D401
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._seen = int(self.num_batches_calibrated)

    # -- arithmetic ---------------------------------------------------------------------------
    def scale_offset(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Scale and offset of the current clips (differentiable w.r.t. the clips)."""
        lo, hi = adjust_range(self.clip_min, self.clip_max, self.qmax - self.qmin, symmetric=False)
        return scale_offset_from_range(lo, hi, self.qmin, self.qmax, symmetric=False)

    def encoding(self) -> Encoding:
        """The current encoding as an immutable :class:`~quantsim.encoding.Encoding`."""
        with torch.no_grad():
            scale, offset = self.scale_offset()
        return Encoding(self.config.bitwidth, scale, offset, symmetric=False)

    def _observe(self, x: torch.Tensor) -> None:
        lo, hi = amin_amax(x.detach().float(), None)
        if not (torch.isfinite(lo) and torch.isfinite(hi)):
            raise CalibrationError(
                f"QAT input quantizer {self.name or '<unnamed>'}: calibration batch "
                f"{self._seen + 1} holds non-finite values (min={float(lo)}, max={float(hi)})"
            )
        if self.config.fixed_min and lo < 0 and not self._warned_negative:
            self._warned_negative = True
            warnings.warn(
                f"QAT input quantizer {self.name or '<unnamed>'}: fixed_min=True but the data "
                f"has negative values (min {float(lo):.4g}); they are clipped to 0"
            )
        first = self._seen == 0
        if self._calibrate_min:
            self.clip_min.copy_(lo if first else torch.minimum(self.clip_min, lo))
        if self._calibrate_max:
            self.clip_max.copy_(hi if first else torch.maximum(self.clip_max, hi))
        self.num_batches_calibrated += 1
        self._seen += 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantize ``x`` (calibrating first while in the first training batches)."""
        return self.forward_with_scale(x)[0]

    def forward_with_scale(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Like :meth:`forward`, also returning the scale used (for the bias scale)."""
        if torch.onnx.is_in_onnx_export():
            self._check_ready(ExportError, "exported")
            scale, offset = (t.detach() for t in self.scale_offset())
            return export_fake_quantize(x, scale, offset, self.qmin, self.qmax), scale
        if self.training and self.calibrating:
            with torch.no_grad():
                self._observe(x)
                scale, offset = self.scale_offset()
            return fake_quantize(x, scale, offset, self.qmin, self.qmax), scale
        self._check_ready(CalibrationError, "run in eval mode")
        scale, offset = self.scale_offset()
        return fake_quantize(x, scale, offset, self.qmin, self.qmax), scale

    def _check_ready(self, error: type, action: str) -> None:
        if not self.ready:
            raise error(
                f"QAT input quantizer {self.name or '<unnamed>'} cannot be {action} before "
                "calibration: run at least one training-mode forward (model.train()), or give "
                "clip_min/clip_max (or fixed_min with clip_max) in retrain_data_config"
            )

    def extra_repr(self) -> str:
        """Grid, batch_num and the calibration progress."""
        return (f"{self.config.dst_type}, grid=[{self.qmin}, {self.qmax}], "
                f"batch_num={self.config.batch_num}, calibrated={self._seen}, "
                f"fixed_min={self.config.fixed_min}")


class ArqWeightQuantizer(nn.Module):
    """``arq_retrain`` weight quantizer: symmetric, recomputed from the weight every forward.

    ``scale`` comes from the weight's current min/max (per tensor, or per output channel along
    ``axis``) through :func:`~quantsim.encoding.adjust_range` with the signed symmetric grid
    ``[-2^(b-1), 2^(b-1) - 1]``, so ``scale = max(max / (2^(b-1) - 1), -min / 2^(b-1))``. It holds
    no state; the scale is a constant for autograd and the weight gets a straight-through
    gradient (every weight lies inside its own range).

    Args:
        config: the ``retrain_weight_config`` section.
        axis: output-channel axis of the weight (0 for Conv/Linear, 1 for ConvTranspose);
            used only when ``config.channel_wise``.

    Example:
        >>> q = ArqWeightQuantizer(RetrainWeightConfig(), axis=0)
        >>> q(torch.tensor([-1.0, 0.5, 1.27])).tolist()[2]
        1.2699999809265137
    """

    def __init__(self, config: RetrainWeightConfig, axis: int = 0) -> None:
        super().__init__()
        self.config = config
        self.qmin, self.qmax = integer_grid(config.bitwidth, symmetric=True)
        self.axis: Optional[int] = axis if config.channel_wise else None

    def scale_offset(self, weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Scale and (zero) offset for ``weight`` as it is now; no gradient."""
        w = weight.detach().float()
        if self.axis is None:  # a one-row view: the dim= form exports to ONNX, dim-less does not
            lo, hi = amin_amax(w.reshape(1, -1), 0)
            lo, hi = lo.reshape(()), hi.reshape(())
        else:
            lo, hi = amin_amax(w, self.axis)
        lo, hi = adjust_range(lo, hi, self.qmax - self.qmin, symmetric=True)
        return scale_offset_from_range(lo, hi, self.qmin, self.qmax, symmetric=True)

    def encoding(self, weight: torch.Tensor) -> Encoding:
        """The encoding ``weight`` gets now, as an :class:`~quantsim.encoding.Encoding`."""
        scale, offset = self.scale_offset(weight)
        return Encoding(self.config.bitwidth, scale, offset, symmetric=True, axis=self.axis)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        """Fake-quantize ``weight`` with its own current range."""
        return self.forward_with_scale(weight)[0]

    def forward_with_scale(self, weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Like :meth:`forward`, also returning the scale used (for the bias scale)."""
        scale, offset = self.scale_offset(weight)
        if torch.onnx.is_in_onnx_export():
            out = export_fake_quantize(weight, scale, offset, self.qmin, self.qmax, self.axis)
        else:
            out = fake_quantize(weight, scale, offset, self.qmin, self.qmax, self.axis)
        return out, scale

    def extra_repr(self) -> str:
        """Grid and granularity."""
        where = "per tensor" if self.axis is None else f"per channel (axis {self.axis})"
        return f"{self.config.dst_type}, grid=[{self.qmin}, {self.qmax}], {where}"
