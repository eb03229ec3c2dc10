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

Example:
    >>> model = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 4))
    >>> x = torch.randn(16, 8)
    >>> report = balance_activations(model, x, lambda m, _: m(x))
    >>> [(b.name, b.method, b.producer) for b in report.balanced]
    [('1', 'fold', '0')]
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.utils import _pytree as pytree

from quantsim.atomic import atomic_write_text
from quantsim.errors import BalanceError, BalanceRecordError, CalibrationError
from quantsim.graph import ModelGraph, eval_mode, leaf_modules, run_forward, trace
from quantsim.nn.elementwise import MatMul
from quantsim.op_types import register_op_type

__all__ = ["balance_activations", "apply_balance_record", "balance_factors", "BalanceReport",
           "BalancedLayer", "SkippedLayer", "ChannelScale", "ScaledInput", "BalanceError",
           "BalanceRecordError", "FACTOR_RANGE", "FLOAT_CHECK_RTOL"]

#: Every factor is clamped into this range.
FACTOR_RANGE: Tuple[float, float] = (1e-5, 1e5)
#: Largest change of a model output, relative to its largest magnitude, a step may cause.
FLOAT_CHECK_RTOL: float = 1e-4
RECORD_FORMAT, RECORD_VERSION = "quantsim.balance", 1

_CONSUMERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, MatMul)
_SUPPORTED = "Linear, MatMul (x @ parameter), Conv1d, Conv2d, Conv3d, ConvTranspose2d"
_NORMS = (nn.LayerNorm, nn.RMSNorm)
_CHANNEL_FIRST_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_TRANSPOSES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
#: f(x / s) == f(x) / s for s > 0, channel positions kept: a fold may look through these.
_COMMUTES = (nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.Identity, nn.Dropout, nn.Dropout1d,
             nn.Dropout2d, nn.Dropout3d, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d,
             nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d,
             nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
             nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)


# ----------------------------------------------------------------------------------------------
# modules
# ----------------------------------------------------------------------------------------------
class ChannelScale(nn.Module):
    """Multiplies its input by a per-channel vector along ``dim`` (a negative axis).

    Balancing inserts it with ``inv_scale = 1 / s`` where no producer absorbs the factors,
    and with ``inv_scale = s`` to compensate a module that reads a balanced tensor. It
    exports as an ONNX ``Mul`` by a constant.

    Example:
        >>> ChannelScale(torch.tensor([1.0, 0.5]), dim=-1)(torch.ones(1, 2))
        tensor([[1.0000, 0.5000]])
    """

    def __init__(self, inv_scale: torch.Tensor, dim: int = -1) -> None:
        super().__init__()
        if dim >= 0:
            raise BalanceError(f"ChannelScale: dim must be negative (from the end), got {dim}")
        self.dim = dim
        self.register_buffer("inv_scale", torch.as_tensor(inv_scale).detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``x * inv_scale`` broadcast along ``dim``."""
        shape = [1] * (-self.dim)
        shape[0] = -1
        return x * self.inv_scale.to(x.dtype).view(shape)

    def extra_repr(self) -> str:  # noqa: D102
        return f"channels={self.inv_scale.numel()}, dim={self.dim}"


class ScaledInput(nn.Module):
    """Runs ``layer`` with its ``index``-th tensor input (pytree order) passed through
    ``scale`` first; keyword arguments go to ``layer`` unchanged.

    Example:
        >>> m = ScaledInput(nn.Identity(), ChannelScale(torch.tensor([2.0])))
        >>> m(torch.ones(1, 1))
        tensor([[2.]])
    """

    def __init__(self, layer: nn.Module, scale: ChannelScale, index: int = 0) -> None:
        super().__init__()
        self.scale = scale
        self.layer = layer
        self.index = index

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Scale the chosen input, then call the wrapped layer."""
        leaves, spec = pytree.tree_flatten(args)
        seen = 0
        for j, leaf in enumerate(leaves):
            if isinstance(leaf, torch.Tensor):
                if seen == self.index:
                    leaves[j] = self.scale(leaf)
                    break
                seen += 1
        return self.layer(*pytree.tree_unflatten(leaves, spec), **kwargs)


register_op_type(ChannelScale, "Mul")


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
# the maths
# ----------------------------------------------------------------------------------------------
def balance_factors(act_max: torch.Tensor, weight_max: torch.Tensor, alpha: float = 0.5,
                    factor_range: Tuple[float, float] = FACTOR_RANGE) -> torch.Tensor:
    """``s = act_max ** alpha / weight_max ** (1 - alpha)``, per input channel.

    Channels with a zero or non-finite statistic get ``1``; the result is clamped to
    ``factor_range``. Returns float32.
    """
    a = act_max.detach().to(torch.float64)
    w = weight_max.detach().to(torch.float64)
    s = a.clamp_min(0) ** alpha / w.clamp_min(0) ** (1.0 - alpha)
    ok = (a > 0) & (w > 0) & torch.isfinite(a) & torch.isfinite(w) & torch.isfinite(s)
    s = torch.where(ok, s, torch.ones_like(s)).clamp(*factor_range)
    return s.to(torch.float32)


def _input_axis(module: nn.Module) -> int:
    """Channel axis (negative) of the consumer's activation input."""
    if isinstance(module, (_CONVS, nn.ConvTranspose2d)):
        return -(len(module.kernel_size) + 1)
    return -1


def _in_layout(module: nn.Module, w: torch.Tensor) -> Tuple[List[int], List[int]]:
    """(view of the weight, broadcast shape of s) such that ``w.view(v) * s.view(b)`` scales
    input channels; the input channel index is row-major over the non-1 entries of ``b``."""
    if isinstance(module, nn.Linear):
        return list(w.shape), [1, w.shape[1]]
    if isinstance(module, MatMul):
        return list(w.shape), [w.shape[0], 1]
    if isinstance(module, nn.ConvTranspose2d):
        return list(w.shape), [w.shape[0]] + [1] * (w.dim() - 1)
    g = module.groups
    k = list(w.shape[2:])
    return [g, w.shape[0] // g, w.shape[1]] + k, [g, 1, w.shape[1]] + [1] * len(k)


def _out_layout(module: nn.Module, w: torch.Tensor) -> Tuple[List[int], List[int]]:
    """As :func:`_in_layout`, for a producer's output channels (weight or bias)."""
    if w.dim() == 1 or isinstance(module, _NORMS):
        return list(w.shape), [1] * (w.dim() - 1) + [w.shape[-1]]
    if isinstance(module, _CONV_TRANSPOSES):
        g = module.groups
        k = list(w.shape[2:])
        return [g, w.shape[0] // g, w.shape[1]] + k, [g, 1, w.shape[1]] + [1] * len(k)
    return list(w.shape), [w.shape[0]] + [1] * (w.dim() - 1)


def _channel_max(w: torch.Tensor, layout: Tuple[List[int], List[int]]) -> torch.Tensor:
    view, bshape = layout
    dims = [d for d, n in enumerate(bshape) if n == 1]
    v = w.detach().abs().to(torch.float32).reshape(view)
    return (v.amax(dim=dims) if dims else v).reshape(-1)


def _rescale_(t: torch.Tensor, layout, factors: torch.Tensor) -> None:
    """``t`` *= factors along the layout's channels, in place."""
    view, bshape = layout
    f = factors.to(device=t.device, dtype=torch.float32).reshape(bshape)
    t.data.copy_((t.data.to(torch.float32).reshape(view) * f).reshape(t.shape).to(t.dtype))


# ----------------------------------------------------------------------------------------------
# layers: consumers and producers
# ----------------------------------------------------------------------------------------------
def _consumer_restriction(module: nn.Module) -> Optional[str]:
    """Why a supported-type consumer cannot be balanced (None: it can)."""
    if isinstance(module, nn.Conv3d) and module.dilation[0] != 1:
        return (f"Conv3d with dilation {module.dilation[0]} in depth: only dilation 1 in depth "
                "is supported")
    if isinstance(module, nn.Conv2d) and module.groups == module.in_channels > 1 and \
            tuple(module.dilation) != (1, 1):
        return (f"depthwise Conv2d with dilation {tuple(module.dilation)}: only dilation 1 is "
                "supported")
    if isinstance(module, nn.ConvTranspose2d) and tuple(module.dilation) != (1, 1):
        return (f"ConvTranspose2d with dilation {tuple(module.dilation)}: only dilation 1 is "
                "supported")
    return None


def _producer_axis(module: nn.Module, ndim: int) -> Optional[int]:
    """Negative channel axis of the producer's output, or None if it cannot absorb factors."""
    if isinstance(module, _NORMS):
        return -1 if getattr(module, "weight", None) is not None else None
    if isinstance(module, _CHANNEL_FIRST_NORMS):
        return 1 - ndim if module.weight is not None else None
    if isinstance(module, nn.Linear):
        return -1
    if isinstance(module, _CONVS + _CONV_TRANSPOSES):
        return -(len(module.kernel_size) + 1)
    if isinstance(module, ChannelScale):
        return module.dim
    return None


def _producer_tensors(module: nn.Module) -> List[torch.Tensor]:
    if isinstance(module, ChannelScale):
        return [module.inv_scale]
    return [p for p in (module.weight, getattr(module, "bias", None)) if p is not None]


def _producer_channels(module: nn.Module) -> int:
    if isinstance(module, ChannelScale):
        return module.inv_scale.numel()
    return int(module.weight.shape[-1] if isinstance(module, _NORMS) else
               module.weight.shape[1] * module.groups
               if isinstance(module, _CONV_TRANSPOSES) else module.weight.shape[0])


# ----------------------------------------------------------------------------------------------
# the model: names, parameters, calibration, float check
# ----------------------------------------------------------------------------------------------
class _Model:
    """Name lookups, in-place edits with undo, and the float check for one model."""

    def __init__(self, model: nn.Module, dummy_input: Any = None) -> None:
        self.model = model
        self.dummy_input = dummy_input
        self.undo: List[Callable[[], None]] = []
        names: Dict[int, List[str]] = {}
        for n, m in model.named_modules(remove_duplicate=False):
            names.setdefault(id(m), []).append(n)
        self.module_names = names
        params: Dict[int, List[str]] = {}
        for n, p in model.named_parameters(remove_duplicate=False):
            params.setdefault(id(p), []).append(n)
        self.param_names = params
        self.reference = self.outputs() if dummy_input is not None else None

    def get(self, name: str) -> Optional[nn.Module]:
        try:
            return self.model.get_submodule(name)
        except AttributeError:
            return None

    def parameter(self, name: str) -> Optional[torch.Tensor]:
        owner, _, attr = name.rpartition(".")
        module = self.get(owner)
        return getattr(module, attr, None) if module is not None else None

    def scale_(self, t: torch.Tensor, layout, factors: torch.Tensor) -> None:
        saved = t.data.clone()
        self.undo.append(lambda: t.data.copy_(saved))
        _rescale_(t, layout, factors)

    def wrap(self, name: str, inv_scale: torch.Tensor, dim: int, index: int = 0) -> None:
        parent_name, _, child = name.rpartition(".")
        parent = self.model.get_submodule(parent_name)
        original = parent._modules[child]
        ref = next(iter(original.parameters()), inv_scale)
        scale = ChannelScale(inv_scale.to(torch.float32), dim).to(ref.device)
        parent._modules[child] = ScaledInput(original, scale, index)
        self.undo.append(lambda: parent._modules.__setitem__(child, original))

    def rollback(self, mark: int) -> None:
        while len(self.undo) > mark:
            self.undo.pop()()

    def outputs(self) -> List[torch.Tensor]:
        with eval_mode(self.model), torch.no_grad():
            return [t.detach().clone() for t in _tensors(run_forward(self.model,
                                                                     self.dummy_input))]

    def output_change(self) -> float:
        now = self.outputs()
        if len(now) != len(self.reference):
            return float("inf")
        worst = 0.0
        for a, b in zip(self.reference, now):
            if a.shape != b.shape:
                return float("inf")
            if not a.is_floating_point() or a.numel() == 0:
                continue
            diff = (a.double() - b.double()).abs().max().item()
            scale = max(a.double().abs().max().item(), 1e-12)
            worst = max(worst, diff / scale)
        return worst if worst == worst else float("inf")


def _tensors(obj: Any) -> List[torch.Tensor]:
    """The tensors of a model output, including mappings such as HuggingFace ModelOutput."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, Mapping):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    return []


@dataclass
class _Stats:
    act_max: Optional[torch.Tensor] = None
    ndim: int = 0
    calls: int = 0
    weight_ids: set = field(default_factory=set)
    problem: Optional[str] = None


def _calibrate(consumers: Dict[str, nn.Module], callback, args, model: nn.Module
               ) -> Dict[str, _Stats]:
    """Per-input-channel max |x| of every consumer over the callback's forward passes."""
    stats = {n: _Stats() for n in consumers}

    def hook(name: str, module: nn.Module):
        axis = _input_axis(module)

        def pre(mod, a, kw):
            st = stats[name]
            x = a[0] if a else kw.get("input")
            if isinstance(module, MatMul):
                x = a[0] if len(a) == 2 else None
                st.weight_ids.add(id(a[1]) if len(a) == 2 else None)
            if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < -axis:
                st.problem = "its input is not a floating-point tensor with a channel axis"
                return
            c = x.detach().abs().to(torch.float32).movedim(axis, 0).reshape(x.shape[axis], -1)
            m = c.amax(dim=1).cpu() if c.numel() else torch.zeros(x.shape[axis])
            if st.act_max is not None and st.act_max.shape != m.shape:
                st.problem = "its input's channel count changes between calls"
                return
            st.act_max = m if st.act_max is None else torch.maximum(st.act_max, m)
            st.ndim = x.dim()
            st.calls += 1
        return pre

    handles = [m.register_forward_pre_hook(hook(n, m), with_kwargs=True)
               for n, m in consumers.items()]
    modes = {m: m.training for m in model.modules()}
    try:
        with torch.no_grad():
            callback(model, args)
    except Exception as exc:
        raise CalibrationError(
            f"forward_pass_callback raised {type(exc).__name__}: {exc}; the model is "
            "unchanged") from exc
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    return stats


# ----------------------------------------------------------------------------------------------
# planning
# ----------------------------------------------------------------------------------------------
@dataclass
class _Layer:
    name: str
    module: nn.Module
    weight: torch.Tensor
    weight_name: str
    act_max: torch.Tensor
    ndim: int

    @property
    def layout(self):
        return _in_layout(self.module, self.weight)

    @property
    def weight_max(self) -> torch.Tensor:
        return _channel_max(self.weight, self.layout)


@dataclass
class _Fold:
    producer: str
    through: List[str]
    compensate: List[Tuple[str, int]]


def _weight_of(layer: nn.Module, name: str, stats: _Stats, m: _Model
               ) -> Tuple[Optional[torch.Tensor], str, str]:
    """(weight tensor, its parameter name, problem)."""
    if not isinstance(layer, MatMul):
        return layer.weight, f"{name}.weight", ""
    if len(stats.weight_ids) != 1 or None in stats.weight_ids:
        return None, "", "MatMul is not always called as x @ W with the same parameter W"
    pnames = m.param_names.get(next(iter(stats.weight_ids)))
    if not pnames:
        return None, "", ("MatMul's second operand is not a parameter (activation @ activation "
                          "or W @ x): only x @ W with a parameter W is supported")
    w = m.parameter(pnames[0])
    if w is None or w.dim() != 2:
        return None, "", f"MatMul's parameter operand {pnames[0]} is not 2-D"
    return w, pnames[0], ""


def _check_layer(name: str, module: nn.Module, stats: _Stats, m: _Model
                 ) -> Tuple[Optional[_Layer], str]:
    """The layer ready to balance, or why it cannot be."""
    reason = _consumer_restriction(module)
    if reason:
        return None, reason
    if len(m.module_names.get(id(module), [])) > 1:
        return None, f"the module is registered under several names {m.module_names[id(module)]}"
    if stats.problem:
        return None, stats.problem
    if stats.calls == 0 or stats.act_max is None:
        return None, "it was never called by forward_pass_callback"
    w, wname, problem = _weight_of(module, name, stats, m)
    if w is None:
        return None, problem
    if not w.is_floating_point():
        return None, f"its weight has dtype {w.dtype}"
    others = [n for n in m.param_names.get(id(w), []) if n != wname]
    if others:
        return None, f"its weight is shared with {others}: scaling it would change them"
    if not bool(torch.isfinite(stats.act_max).all()):
        return None, "its input had inf or nan values during calibration"
    channels = _channel_max(w, _in_layout(module, w)).numel()
    if channels != stats.act_max.numel():
        return None, f"its input has {stats.act_max.numel()} channels, its weight {channels}"
    return _Layer(name, module, w, wname, stats.act_max, stats.ndim), ""


def _groups(layers: List[_Layer], graph: ModelGraph) -> List[List[_Layer]]:
    """Layers reading the same module output directly (once per forward) share factors; the
    others stand alone. Ordered by first call."""
    order = {}
    for i, call in enumerate(graph.calls):
        order.setdefault(call.name, i)
    by_source: Dict[Tuple, List[_Layer]] = {}
    for layer in sorted(layers, key=lambda l: order.get(l.name, 0)):
        call = graph.first_call(layer.name)
        src = call.inputs[0] if call and call.inputs else None
        key: Tuple = (layer.name,)
        if src is not None and src.kind == "module" and not src.is_view and \
                graph.call_counts.get(layer.name) == 1:
            key = (src.producer, src.output_index, layer.ndim, _input_axis(layer.module),
                   layer.act_max.numel())
        by_source.setdefault(key, []).append(layer)
    return list(by_source.values())


def _plan_fold(group: List[_Layer], graph: ModelGraph, m: _Model, leaves: Dict[str, nn.Module],
               folded: set) -> Tuple[Optional[_Fold], str]:
    """Where the group's division by s can go, or why nowhere."""
    members = {g.name for g in group}
    first = group[0]
    if graph.call_counts.get(first.name, 0) != 1:
        return None, f"it runs {graph.call_counts.get(first.name, 0)} times per forward"
    call = graph.first_call(first.name)
    src = call.inputs[0] if call.inputs else None
    through: List[str] = []
    readers: List[Tuple[str, int]] = []
    while True:
        if src is None or src.kind != "module":
            what = "a model input" if src is not None and src.kind == "model_input" else \
                "computed by a functional op (or a constant)"
            whose = f"the input of {through[-1]}" if through else "its input"
            return None, f"{whose} is {what}"
        name = src.producer
        if src.is_view or src.output_index != 0:
            return None, f"its input is a view or a secondary output of {name}"
        if graph.call_counts.get(name, 0) != 1:
            return None, f"{name} runs {graph.call_counts.get(name, 0)} times per forward"
        if (name, 0) in graph.model_outputs:
            return None, f"{name}'s output is also a model output"
        readers += [r for r in graph.consumers.get((name, 0), []) if r[0] not in members
                    and (not through or r[0] != through[-1])]
        module = leaves.get(name)
        if not isinstance(module, _COMMUTES):
            break
        through.append(name)
        nxt = graph.first_call(name)
        src = nxt.inputs[0] if nxt.inputs else None
    if name in folded:
        return None, f"{name} already absorbed the factors of another group"
    axis = _producer_axis(module, first.ndim)
    if axis is None:
        return None, f"{name} ({type(module).__name__}) cannot absorb per-channel factors"
    if axis != _input_axis(first.module):
        return None, (f"{name}'s channel axis {axis} is not the consumer's input channel axis "
                      f"{_input_axis(first.module)}")
    if _producer_channels(module) != first.act_max.numel():
        return None, (f"{name} has {_producer_channels(module)} channels, the consumer's input "
                      f"{first.act_max.numel()}")
    for t in _producer_tensors(module):
        if len(m.param_names.get(id(t), [])) > 1:
            return None, f"{name}'s parameters are shared ({m.param_names[id(t)]})"
    compensate = []
    for reader, index in readers:
        if reader in through:
            continue
        if graph.call_counts.get(reader, 0) != 1 or \
                len(m.module_names.get(id(leaves.get(reader)), [])) != 1:
            return None, f"{reader} also reads the scaled tensor and runs more than once"
        if graph.first_call(reader).inputs[index].is_view:
            return None, f"{reader} also reads a view (reshape, slice...) of the scaled tensor"
        compensate.append((reader, index))
    return _Fold(name, through, compensate), ""


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


def _entry(layer: _Layer, method: str, factors: torch.Tensor, fold: Optional[_Fold] = None,
           producer: Optional[nn.Module] = None, group: Sequence[str] = ()) -> Dict[str, Any]:
    return {
        "type": type(layer.module).__name__,
        "weight": layer.weight_name,
        "weight_shape": list(layer.weight.shape),
        "axis": _input_axis(layer.module),
        "method": method,
        "producer": None if fold is None else {
            "name": fold.producer, "type": type(producer).__name__,
            "channels": _producer_channels(producer)},
        "through": [] if fold is None else list(fold.through),
        "compensate": [] if fold is None else [list(c) for c in fold.compensate],
        "group": list(group) or [layer.name],
        "factors": factors.tolist(),
    }


def _write_record(path: Union[str, os.PathLike], record: Dict[str, Any]) -> None:
    """Write ``record`` as JSON atomically."""
    atomic_write_text(path, json.dumps(record, indent=1))


# ----------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------
def _is_leaf(module: nn.Module) -> bool:
    return next(module.children(), None) is None


def _check_model(model: nn.Module) -> None:
    from quantsim.wrappers import QuantizationMixin

    for name, module in model.named_modules():
        if isinstance(module, QuantizationMixin):
            raise BalanceError(
                f"{name or 'the model'} is already wrapped for quantization simulation: "
                "balance the float model first, then build QuantizationSimModel from it")


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
        dummy_input: an input the model accepts (tensor, tuple, or dict of keyword inputs);
            used to trace which module feeds which and for the float check.
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


def apply_balance_record(model: nn.Module, record_file: Union[str, os.PathLike]) -> None:
    """Re-apply the factors of a record written by :func:`balance_activations` to a fresh
    copy of the model (same architecture, not yet balanced), in place.

    Raises:
        BalanceRecordError: the file is missing or malformed, or the model does not match it
            (the mismatching layer names are listed).
    """
    record = _read_record(record_file)
    _check_model(model)
    m = _Model(model)
    problems: List[str] = []

    def expect(name: str, type_name: str, what: str) -> Optional[nn.Module]:
        module = m.get(name)
        if module is None:
            problems.append(f"{name}: no such module ({what})")
        elif type(module).__name__ != type_name:
            problems.append(f"{name}: record has {type_name}, model has "
                            f"{type(module).__name__} ({what})")
            return None
        return module

    weights: Dict[str, torch.Tensor] = {}
    for name, e in record["layers"].items():
        module = expect(name, e["type"], "balanced layer")
        if module is None:
            continue
        w = m.parameter(e["weight"])
        if w is None or list(w.shape) != list(e["weight_shape"]):
            problems.append(f"{name}: weight {e['weight']} has shape "
                            f"{None if w is None else list(w.shape)}, record "
                            f"{e['weight_shape']}")
            continue
        weights[name] = w
        if e["producer"] is not None:
            p = expect(e["producer"]["name"], e["producer"]["type"], f"producer of {name}")
            if p is not None and _producer_channels(p) != e["producer"]["channels"]:
                problems.append(f"{e['producer']['name']}: {_producer_channels(p)} channels, "
                                f"record {e['producer']['channels']}")
            for reader, _ in e["compensate"]:
                if m.get(reader) is None:
                    problems.append(f"{reader}: no such module (reads {e['producer']['name']})")
    if problems:
        raise BalanceRecordError(
            f"balance record {os.fspath(record_file)} does not match the model "
            f"({len(problems)} problem(s)): " + "; ".join(sorted(set(problems)))
            + ". Was it written for another architecture, or is the model already balanced?")
    done: set = set()
    for name, e in record["layers"].items():
        module = m.get(name)
        factors = torch.tensor(e["factors"], dtype=torch.float32)
        layout = _in_layout(module, weights[name])
        if e["method"] == "channel_scale":
            m.wrap(name, 1.0 / factors.double(), e["axis"])
        else:
            producer_name = e["producer"]["name"]
            if producer_name not in done:
                done.add(producer_name)
                producer = m.get(producer_name)
                for t in _producer_tensors(producer):
                    m.scale_(t, _out_layout(producer, t), 1.0 / factors.double())
                for reader, index in e["compensate"]:
                    m.wrap(reader, factors, e["axis"], index)
        m.scale_(weights[name], layout, factors)


def _read_record(path: Union[str, os.PathLike]) -> Dict[str, Any]:
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, ValueError) as exc:
        raise BalanceRecordError(f"cannot read balance record {os.fspath(path)}: {exc}") from exc
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT or \
            record.get("version") != RECORD_VERSION or not isinstance(record.get("layers"), dict):
        raise BalanceRecordError(
            f"{os.fspath(path)} is not a balance record (expected format {RECORD_FORMAT!r}, "
            f"version {RECORD_VERSION}, and a 'layers' object)")
    keys = {"type", "weight", "weight_shape", "axis", "method", "producer", "through",
            "compensate", "group", "factors"}
    for name, e in record["layers"].items():
        missing = keys - set(e) if isinstance(e, dict) else keys
        if missing or e["method"] not in ("fold", "channel_scale"):
            raise BalanceRecordError(f"{os.fspath(path)}: entry {name!r} is malformed "
                                     f"(missing {sorted(missing)} or bad method)")
    return record
