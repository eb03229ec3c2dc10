"""The two quantizers of a single-operator QAT module, each a configured
:class:`~quantsim.quantizer.Quantizer` (``.quantizer``) with the schedule the module needs.

* :class:`LearnedClipQuantizer` (the layer's input): an asymmetric ``Quantizer`` whose range is
  learnable from the start (``set_learnable(init=...)``, so an optimizer built before training
  holds it). Training-mode forwards ``1..batch_num`` calibrate it: its ``tf`` analyzer observes
  the batch and the range becomes the running min/max with zero included (what aimet-torch sets
  a range-learning quantizer to), while the output is fake-quantized with that encoding as a
  constant. Later forwards are the ``Quantizer``'s own learnable forward, so the LSQ-style
  gradients reach ``min`` / ``max``.
* :class:`ArqWeightQuantizer` (``arq_retrain``, the weight): a symmetric ``Quantizer`` in the
  ``'qat'`` state with ``averaging_constant`` 1.0, so its range is the current weight's min/max
  on every forward (per tensor, or per output channel along the axis
  :func:`quantsim.op_types.param_axis` gives); the scale is a buffer, a constant for autograd,
  and the weight gets the straight-through gradient.

Checkpoints keep the names they always had: the input quantizer's range is ``clip_min`` /
``clip_max`` (the very ``Parameter`` s of its ``Quantizer``), its progress
``num_batches_calibrated``; the weight quantizer saves nothing, as its range is derived.

Inside ``torch.onnx.export`` both emit a ``QuantizeLinear``/``DequantizeLinear`` pair
(:func:`quantsim.export.qat_onnx.qdq_pair`) carrying the current scale and zero point, computed
with traceable ops.
"""
from __future__ import annotations

import warnings
from typing import Any, Tuple

import torch
from torch import nn

from quantsim.encoding import (
    Encoding,
    adjust_range,
    amin_amax,
    dequantize,
    fake_quantize,
    integer_grid,
    quantize,
    scale_offset_from_range,
)
from quantsim.errors import CalibrationError, ExportError
from quantsim.nn.qat.config import QATInputConfig, QATWeightConfig
from quantsim.quantizer import Quantizer, QuantizerRole, QuantizerState

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


def _export_qdq(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, q: Quantizer
                ) -> torch.Tensor:
    """The ONNX pair of ``q``'s grid, emitted while ``torch.onnx.export`` traces."""
    # imported here: the export package imports the sim, which imports quantsim.nn
    from quantsim.export.qat_onnx import qdq_pair

    return qdq_pair(x, scale.detach(), offset.detach(), *q.qmin_qmax, q.axis)


class OwnedQuantizer(Quantizer):
    """A :class:`Quantizer` whose state its owning QAT quantizer keeps: it writes and reads no
    ``state_dict`` entries of its own (its range is saved under the owner's names, everything
    else is derived), so QAT checkpoints keep their keys."""

    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        return

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        return


class LearnedClipQuantizer(nn.Module):
    """Input quantizer of a QAT module: calibrated over the first ``batch_num`` training
    batches, then learned (see the module docstring).

    * Training-mode forwards ``1..batch_num`` calibrate the ends the config does not give
      (``clip_min``, unless given or ``fixed_min``; ``clip_max``, unless given); the output is
      fake-quantized with the current range, with gradients to the input only.
    * Every later forward is ``self.quantizer``'s learnable forward: in training the output's
      gradients reach ``clip_min`` / ``clip_max`` (LSQ-style), so an optimizer learns them.
    * An eval-mode forward before any calibration raises :class:`CalibrationError`.

    State (the ``state_dict``): ``clip_max`` and ``clip_min`` (``self.quantizer``'s ``max`` and
    ``min``; with ``fixed_min`` the lower end is a buffer pinned at 0 and the quantizer's ``min``
    does not learn) and ``num_batches_calibrated``.

    Args:
        config: the ``retrain_data_config`` section.
        name: where the quantizer sits, used in messages.

    Example:
        >>> q = LearnedClipQuantizer(QATInputConfig(batch_num=1))
        >>> _ = q(torch.tensor([-1.0, 2.0]))          # training mode: calibrates
        >>> q.clip_min.item(), q.clip_max.item()
        (-1.0, 2.0)
    """

    def __init__(self, config: QATInputConfig, name: str = "") -> None:
        super().__init__()
        self.config = config
        q = OwnedQuantizer(config.bitwidth, symmetric=False, scheme="tf",
                            role=QuantizerRole.INPUT)
        q.set_learnable(True, init=(config.clip_min or 0.0, config.clip_max or 0.0))
        self.quantizer = q
        self.name = name
        self._calibrate_min = config.clip_min is None and not config.fixed_min
        self._calibrate_max = config.clip_max is None
        self.clip_max = q.max  # the same Parameter, under the name checkpoints use
        if config.fixed_min:
            q.min.requires_grad_(False)  # pinned at 0 (how aimet-torch fixes one end)
            self.register_buffer("clip_min", torch.tensor(0.0))
        else:
            self.clip_min = q.min
        self.register_buffer("num_batches_calibrated", torch.tensor(0, dtype=torch.long))
        self._seen = 0  # python mirror of num_batches_calibrated (readable during export)
        self._warned_negative = False
        q.initialized.fill_(self.ready)

    # -- state ------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        """Where the quantizer sits (``conv1.input_quantizer``), used in messages."""
        return self.quantizer.name

    @name.setter
    def name(self, value: str) -> None:
        self.quantizer.name = self.quantizer.analyzer.name = value

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
        q = self.quantizer
        q.max = self.clip_max  # load_state_dict(assign=True) puts in new Parameters: tie again
        if not self.config.fixed_min:
            q.min = self.clip_min
        q.initialized.fill_(self.ready)

    def encoding(self) -> Encoding:
        """The current encoding as an immutable :class:`~quantsim.encoding.Encoding`."""
        return self.quantizer.encoding

    # -- calibration --------------------------------------------------------------------------
    @torch.no_grad()
    def _calibrate(self, x: torch.Tensor) -> None:
        q = self.quantizer
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
        q.analyzer.observe(x)
        qmin, qmax = q.qmin_qmax
        lo, hi = q.analyzer.compute_range(qmax - qmin, symmetric=False)
        lo = lo if self._calibrate_min else q.min.detach()
        hi = hi if self._calibrate_max else q.max.detach()
        lo, hi = adjust_range(lo, hi, qmax - qmin, symmetric=False)
        if self._calibrate_min:
            q.min.copy_(lo)
        if self._calibrate_max:
            q.max.copy_(hi)
        q.initialized.fill_(True)
        self.num_batches_calibrated += 1
        self._seen += 1

    # -- forward ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantize ``x`` (calibrating first while in the first training batches)."""
        return self.forward_with_scale(x)[0]

    def forward_with_scale(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Like :meth:`forward`, also returning the scale used (for the bias scale)."""
        q = self.quantizer
        if torch.onnx.is_in_onnx_export():
            self._check_ready(ExportError, "exported")
            # the exported scale is a constant of the graph: no autograd node to trace
            scale, offset = scale_offset_from_range(q.min.detach(), q.max.detach(), *q.qmin_qmax,
                                                    symmetric=False)
            return _export_qdq(x, scale, offset, q), scale
        if self.training and self.calibrating:
            self._calibrate(x)
            encoding = q.encoding  # a constant: the clips get no gradient while calibrating
            return encoding.fake_quantize(x), encoding.scale
        self._check_ready(CalibrationError, "run in eval mode")
        return q(x), q.get_scale()

    def _check_ready(self, error: type, action: str) -> None:
        if not self.ready:
            raise error(
                f"QAT input quantizer {self.name or '<unnamed>'} cannot be {action} before "
                "calibration: run at least one training-mode forward (model.train()), or give "
                "clip_min/clip_max (or fixed_min with clip_max) in retrain_data_config"
            )

    def extra_repr(self) -> str:
        """dst_type, batch_num and the calibration progress."""
        return (f"{self.config.dst_type}, batch_num={self.config.batch_num}, "
                f"calibrated={self._seen}, fixed_min={self.config.fixed_min}")


class ArqWeightQuantizer(nn.Module):
    """``arq_retrain`` weight quantizer: a symmetric :class:`Quantizer` (``self.quantizer``)
    whose range is the current weight's min/max on every forward.

    ``scale = max(max / (2^(b-1) - 1), -min / 2^(b-1))`` on the signed grid
    ``[-2^(b-1), 2^(b-1) - 1]`` (:func:`~quantsim.encoding.adjust_range`'s symmetric rule),
    per tensor or per output channel. The scale is a constant for autograd and the weight gets
    a straight-through gradient (every weight lies inside its own range). Nothing is saved: the
    range follows the weight.

    Args:
        config: the ``retrain_weight_config`` section.
        channels: the weight's output channels (its size along ``axis``).
        axis: output-channel axis of the weight (:func:`quantsim.op_types.param_axis`: 0 for
            Conv/Linear, 1 for ConvTranspose); used only when ``config.channel_wise``.

    Example:
        >>> q = ArqWeightQuantizer(QATWeightConfig(), channels=3)
        >>> q(torch.tensor([-1.0, 0.5, 1.27])).tolist()[2]
        1.2699999809265137
    """

    def __init__(self, config: QATWeightConfig, channels: int, axis: int = 0) -> None:
        super().__init__()
        self.config = config
        shape, per_channel = ((channels,), axis) if config.channel_wise else ((), None)
        q = OwnedQuantizer(config.bitwidth, symmetric=True, shape=shape, axis=per_channel,
                            scheme="tf", role=QuantizerRole.PARAM)
        q.state = QuantizerState.QAT
        q.averaging_constant = 1.0  # the range is the current weight's own
        self.quantizer = q

    def encoding(self, weight: torch.Tensor) -> Encoding:
        """The encoding ``weight`` gets now (the quantizer follows it) as an
        :class:`~quantsim.encoding.Encoding`."""
        with torch.no_grad():
            self.quantizer(weight)
        return self.quantizer.encoding

    def _export_scale_offset(self, weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """What the ``'qat'`` state computes from ``weight``, as traceable ops (an
        :class:`Encoding` is built eagerly, which the dynamo exporter cannot trace)."""
        q = self.quantizer
        w = weight.detach().float()
        if q.axis is None:  # a one-row view: the dim= form exports to ONNX, dim-less does not
            lo, hi = (t.reshape(()) for t in amin_amax(w.reshape(1, -1), 0))
        else:
            lo, hi = amin_amax(w, q.axis)
        qmin, qmax = q.qmin_qmax
        lo, hi = adjust_range(lo, hi, qmax - qmin, symmetric=True)
        return scale_offset_from_range(lo, hi, qmin, qmax, symmetric=True)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        """Fake-quantize ``weight`` with its own current range."""
        return self.forward_with_scale(weight)[0]

    def forward_with_scale(self, weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Like :meth:`forward`, also returning the scale used (for the bias scale)."""
        if torch.onnx.is_in_onnx_export():
            scale, offset = self._export_scale_offset(weight)
            return _export_qdq(weight, scale, offset, self.quantizer), scale
        return self.quantizer(weight), self.quantizer.get_scale()

    def extra_repr(self) -> str:
        """dst_type (the grid and granularity are the quantizer's)."""
        return self.config.dst_type
