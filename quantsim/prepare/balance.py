"""Activation balancing: move per-channel activation outliers into the weights (SmoothQuant).

Targets quantize activations per tensor but weights per output channel, so a few activation
channels with large values make the activation grid coarse for all the others. For a consumer
``y = W x`` (Linear, Conv, ``x @ W``) and positive factors ``s`` over its input channels::

    y = (s * W) (x / s)            exactly, in real arithmetic

With ``s_j = max|x_j| ** alpha / max|W_j| ** (1 - alpha)`` (over calibration data and over
the weight slice that multiplies input channel ``j``) the activation ``x / s`` has flatter
channels and ``s * W`` takes the difficulty, which per-channel weight quantization absorbs.

Where the division by ``s`` goes, in order of preference:

========================================  ===================================================
the consumer's input comes from           ``x / s`` is computed by
========================================  ===================================================
LayerNorm / RMSNorm / BatchNorm /         the producer's affine weight and bias (divided by
GroupNorm (affine), Linear, Conv,         ``s`` along its output channels); ReLU, LeakyReLU,
ConvTranspose, ChannelScale               PReLU, Dropout, Identity and pooling in between
                                          commute with a positive per-channel scale
anything else (a model input, a           an inserted :class:`ChannelScale` (``x * (1/s)``),
functional op, GELU, a producer whose     wrapping the consumer in :class:`ScaledInput`
output other layers use too)
========================================  ===================================================

A producer absorbs the factors only when every module that reads its output is either a
balanced consumer of the group (they share one ``s``, from the max over the group: q/k/v after
one LayerNorm) or can be *compensated*: a module reading the scaled tensor (a residual ``Add``
after :func:`quantsim.prepare.prepare_model`) is wrapped in :class:`ScaledInput` with
``x * s``. Uses that the hook trace cannot see (functional ops such as ``x + y`` in
``forward``) are caught by a float check: after each change the model runs on
``dummy_input`` and must reproduce the original outputs to :data:`FLOAT_CHECK_RTOL` (relative
to each output's largest magnitude); a fold that fails it is undone and a ChannelScale used
instead.

Factors: ``0`` or non-finite statistics give ``s_j = 1`` (the channel is left alone), and
every factor is clamped to :data:`FACTOR_RANGE` = ``[1e-5, 1e5]``.

Supported consumers and restrictions (others are skipped and listed with the reason, or
refused with :class:`BalanceError` when named in ``modules``):

* ``nn.Linear``; :class:`quantsim.nn.MatMul` computing ``x @ W`` with ``W`` a 2-D parameter
  (the second operand; ``W @ x`` and activation x activation are skipped);
* ``nn.Conv1d`` / ``nn.Conv2d``, any groups (each input channel belongs to one group, so its
  factor scales that group's slice of the weight); depthwise ``Conv2d`` needs dilation 1;
* ``nn.Conv3d`` with dilation 1 in depth;
* ``nn.ConvTranspose2d`` with dilation 1 (its weight is ``[in, out/groups, kh, kw]``: input
  channels on axis 0);
* a layer whose weight parameter is shared with another module is skipped.

The entry point: :func:`balance_activations` and its report are here; the factors and the
model edits are in :mod:`quantsim.prepare.balance_scaling`, the statistics and the plan in
:mod:`quantsim.prepare.balance_planning`, the JSON record and :func:`apply_balance_record` in
:mod:`quantsim.prepare.balance_record`.

Example:
    >>> model = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 4))
    >>> x = torch.randn(16, 8)
    >>> report = balance_activations(model, x, lambda m, _: m(x))
    >>> [(b.name, b.method, b.producer) for b in report.balanced]
    [('1', 'fold', '0')]
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from quantsim.errors import BalanceError, BalanceRecordError
from quantsim.graph import leaf_modules, trace
from quantsim.prepare.balance_planning import (_CONSUMERS, _SUPPORTED, _calibrate,
                                               _check_layer, _Fold, _groups, _Layer,
                                               _plan_fold)
from quantsim.prepare.balance_record import (RECORD_FORMAT, RECORD_VERSION, _entry,
                                             _write_record, apply_balance_record)
from quantsim.prepare.balance_scaling import (FACTOR_RANGE, ChannelScale, ScaledInput,
                                              _check_model, _input_axis, _Model, _out_layout,
                                              _producer_tensors, balance_factors)

__all__ = ["balance_activations", "apply_balance_record", "balance_factors", "BalanceReport",
           "BalancedLayer", "SkippedLayer", "ChannelScale", "ScaledInput", "BalanceError",
           "BalanceRecordError", "FACTOR_RANGE", "FLOAT_CHECK_RTOL"]

#: Largest change of a model output, relative to its largest magnitude, a step may cause.
FLOAT_CHECK_RTOL: float = 1e-4


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BalancedLayer:
    """One balanced consumer: how its factors were applied and what they look like."""

    name: str
    layer_type: str
    method: str  # 'fold' (absorbed by `producer`) or 'channel_scale' (inserted module)
    producer: Optional[str]
    group: Tuple[str, ...]
    channels: int
    factor_min: float
    factor_median: float
    factor_max: float
    clamped: int  # factors that hit FACTOR_RANGE
    #: for 'channel_scale': why no producer absorbed the factors
    note: str = ""


@dataclass(frozen=True)
class SkippedLayer:
    """A supported-type layer left as it is, and why."""

    name: str
    layer_type: str
    reason: str


@dataclass
class BalanceReport:
    """What :func:`balance_activations` did (``str(report)`` prints a table)."""

    alpha: float
    balanced: List[BalancedLayer] = field(default_factory=list)
    skipped: List[SkippedLayer] = field(default_factory=list)
    #: "module input i" entries wrapped with x * s to keep other readers of a folded tensor
    compensated: List[str] = field(default_factory=list)
    record_file: Optional[str] = None
    #: largest output change of the balanced model on dummy_input, relative
    max_output_change: float = 0.0

    def __str__(self) -> str:
        lines = [f"balance_activations(alpha={self.alpha}): {len(self.balanced)} balanced, "
                 f"{len(self.skipped)} skipped, max output change {self.max_output_change:.2e}"]
        for b in self.balanced:
            via = f"fold into {b.producer}" if b.method == "fold" else "ChannelScale"
            lines.append(f"  {b.name} ({b.layer_type}, {via}): s in [{b.factor_min:.3g}, "
                         f"{b.factor_max:.3g}], median {b.factor_median:.3g}"
                         + (f", {b.clamped} clamped" if b.clamped else "")
                         + (f" [{b.note}]" if b.note else ""))
        for s in self.skipped:
            lines.append(f"  skipped {s.name} ({s.layer_type}): {s.reason}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# applying
# ----------------------------------------------------------------------------------------------
def _apply_fold(m: _Model, fold: _Fold, producer: nn.Module, layers: List[_Layer],
                factors: torch.Tensor, axis: int) -> None:
    for t in _producer_tensors(producer):
        m.scale_(t, _out_layout(producer, t), 1.0 / factors.double())
    for reader, index in fold.compensate:
        m.wrap(reader, factors, axis, index)
    for layer in layers:
        m.scale_(layer.weight, layer.layout, factors)


def _apply_channel_scale(m: _Model, layer: _Layer, factors: torch.Tensor) -> None:
    m.wrap(layer.name, 1.0 / factors.double(), _input_axis(layer.module))
    m.scale_(layer.weight, layer.layout, factors)


def _summary(layer: _Layer, method: str, producer: Optional[str], group: Sequence[str],
             factors: torch.Tensor, note: str = "") -> BalancedLayer:
    lo, hi = FACTOR_RANGE
    return BalancedLayer(layer.name, type(layer.module).__name__, method, producer, tuple(group),
                         factors.numel(), float(factors.min()), float(factors.median()),
                         float(factors.max()), int(((factors <= lo) | (factors >= hi)).sum()),
                         note)


# ----------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------
def _is_leaf(module: nn.Module) -> bool:
    return next(module.children(), None) is None


def _explicit(modules: Sequence[str], model: nn.Module, leaves: Dict[str, nn.Module]
              ) -> List[str]:
    if isinstance(modules, str):
        modules = [modules]
    named = dict(model.named_modules())
    for name in modules:
        if name not in named:
            import difflib
            close = difflib.get_close_matches(name, list(leaves), n=3)
            raise BalanceError(f"modules: there is no module named {name!r}"
                               + (f"; did you mean {close}?" if close else ""))
        module = named[name]
        if isinstance(module, ScaledInput):
            raise BalanceError(f"modules: {name} is already balanced (a ScaledInput wrapper)")
        if not isinstance(module, _CONSUMERS) or name not in leaves:
            raise BalanceError(f"modules: {name} is a {type(module).__name__}; "
                               f"balance_activations supports {_SUPPORTED}")
    return list(dict.fromkeys(modules))


def balance_activations(
    model: nn.Module,
    dummy_input: Any,
    forward_pass_callback: Callable[[nn.Module, Any], Any],
    forward_pass_callback_args: Any = None,
    alpha: float = 0.5,
    modules: Optional[Sequence[str]] = None,
    record_file: Optional[Union[str, os.PathLike]] = None,
    insert_channel_scales: bool = True,
) -> BalanceReport:
    """Balance the activations of ``model`` in place (see the module docstring).

    Args:
        model: the float model (not yet wrapped by QuantizationSimModel). Edited in place:
            weights and producer affine parameters rescaled, :class:`ScaledInput` wrappers
            inserted where needed; its float outputs stay the same.
        dummy_input: an input the model accepts (tensor, tuple, or dict read by ``forward``'s
            signature: :func:`quantsim.graph.split_dummy_input`); used to trace which module
            feeds which and for the float check.
        forward_pass_callback: ``callback(model, args)`` running calibration data through the
            model, as for ``QuantizationSimModel.compute_encodings``.
        forward_pass_callback_args: passed to the callback.
        alpha: migration strength in [0, 1]: 0 leaves activations to absorb everything,
            1 moves all of the activation range into the weights.
        modules: names of the layers to balance (default: every supported layer). A named
            layer that cannot be balanced is an error instead of a skip.
        record_file: where to write the factors as JSON, for :func:`apply_balance_record`.
        insert_channel_scales: when no producer can absorb a layer's factors, insert a
            :class:`ChannelScale` (True) or skip the layer (False).

    Returns:
        A :class:`BalanceReport`.

    Raises:
        BalanceError: ``alpha`` outside [0, 1], a quantized model, or a layer named in
            ``modules`` that is missing, unsupported or breaks a restriction.
        CalibrationError: the callback raised (the model is unchanged).
        UnsupportedModelError: the forward with ``dummy_input`` failed.
    """
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise BalanceError(f"alpha must be a number in [0, 1], got {alpha!r}")
    _check_model(model)
    leaves = leaf_modules(model, _is_leaf)
    explicit = modules is not None
    names = _explicit(modules, model, leaves) if explicit else \
        [n for n, leaf in leaves.items() if isinstance(leaf, _CONSUMERS)]
    graph = trace(model, dummy_input, leaves)  # runs in eval mode, restores modes
    m = _Model(model, dummy_input)
    if not m.reference:
        raise BalanceError("the model's output for dummy_input holds no tensor: the float "
                           "check that guards every change needs one")
    stats = _calibrate({n: leaves[n] for n in names}, forward_pass_callback,
                       forward_pass_callback_args, model)
    report = BalanceReport(alpha=float(alpha),
                           record_file=None if record_file is None else os.fspath(record_file))
    layers = []
    for name in names:
        layer, reason = _check_layer(name, leaves[name], stats[name], m)
        if layer is None:
            if explicit:
                raise BalanceError(f"cannot balance {name} ({type(leaves[name]).__name__}): "
                                   f"{reason}")
            report.skipped.append(SkippedLayer(name, type(leaves[name]).__name__, reason))
        else:
            layers.append(layer)
    entries: Dict[str, Dict[str, Any]] = {}
    folded: set = set()
    try:
        for group in _groups(layers, graph):
            _balance_group(group, graph, m, leaves, folded, alpha, insert_channel_scales,
                           explicit, report, entries)
    except BaseException:
        m.rollback(0)
        raise
    report.max_output_change = m.output_change()
    if record_file is not None:
        _write_record(record_file, {"format": RECORD_FORMAT, "version": RECORD_VERSION,
                                    "alpha": float(alpha), "factor_range": list(FACTOR_RANGE),
                                    "layers": entries})
    return report


def _balance_group(group, graph, m: _Model, leaves, folded, alpha, insert, explicit,
                   report: BalanceReport, entries) -> None:
    mark = len(m.undo)
    act = torch.stack([g.act_max for g in group]).amax(0)
    wmax = torch.stack([g.weight_max for g in group]).amax(0)
    factors = balance_factors(act, wmax, alpha)
    fold, why = _plan_fold(group, graph, m, leaves, folded)
    if fold is not None:
        producer = leaves[fold.producer]
        _apply_fold(m, fold, producer, group, factors, _input_axis(group[0].module))
        change = m.output_change()
        if change <= FLOAT_CHECK_RTOL:
            folded.add(fold.producer)
            names = [g.name for g in group]
            report.compensated += [f"{r} input {i}" for r, i in fold.compensate]
            for g in group:
                report.balanced.append(_summary(g, "fold", fold.producer, names, factors))
                entries[g.name] = _entry(g, "fold", factors, fold, producer, names)
            return
        m.rollback(mark)
        why = (f"folding into {fold.producer} changed the outputs by {change:.2e} (relative): "
               "something the trace cannot see (a functional op) also reads its output")
    for g in group:
        if not insert:
            reason = f"no producer can absorb the factors ({why}) and insert_channel_scales=False"
            if explicit:
                raise BalanceError(f"cannot balance {g.name}: {reason}")
            report.skipped.append(SkippedLayer(g.name, type(g.module).__name__, reason))
            continue
        own = balance_factors(g.act_max, g.weight_max, alpha)
        layer_mark = len(m.undo)
        _apply_channel_scale(m, g, own)
        change = m.output_change()
        if change > FLOAT_CHECK_RTOL:
            m.rollback(layer_mark)
            reason = (f"the outputs changed by {change:.2e} (relative) after scaling its "
                      "weight: is the weight also used outside the layer?")
            if explicit:
                raise BalanceError(f"cannot balance {g.name}: {reason}")
            report.skipped.append(SkippedLayer(g.name, type(g.module).__name__, reason))
            continue
        report.balanced.append(_summary(g, "channel_scale", None, [g.name], own, why))
        entries[g.name] = _entry(g, "channel_scale", own)
