"""Planning for activation balancing: what to balance, with which statistics, and where.

Collects every consumer's per-input-channel maximum over the calibration callback, checks
which layers can be balanced (and why not), groups the layers that read the same tensor so
that they share factors, and finds the producer that can absorb a group's division by ``s``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from quantsim.errors import CalibrationError
from quantsim.graph import ModelGraph, preserved_modes
from quantsim.nn.elementwise import MatMul
from quantsim.prepare.balance_scaling import (_channel_max, _in_layout, _input_axis, _Model,
                                              _producer_axis, _producer_channels,
                                              _producer_tensors)

__all__: List[str] = []  # internals of quantsim.prepare.balance

_CONSUMERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, MatMul)
_SUPPORTED = "Linear, MatMul (x @ parameter), Conv1d, Conv2d, Conv3d, ConvTranspose2d"
#: f(x / s) == f(x) / s for s > 0, channel positions kept: a fold may look through these.
_COMMUTES = (nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.Identity, nn.Dropout, nn.Dropout1d,
             nn.Dropout2d, nn.Dropout3d, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d,
             nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d,
             nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
             nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)


# ----------------------------------------------------------------------------------------------
# calibration statistics
# ----------------------------------------------------------------------------------------------
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
    try:
        with preserved_modes(model), torch.no_grad():
            callback(model, args)
    except Exception as exc:
        raise CalibrationError(
            f"forward_pass_callback raised {type(exc).__name__}: {exc}; the model is "
            "unchanged") from exc
    finally:
        for h in handles:
            h.remove()
    return stats


# ----------------------------------------------------------------------------------------------
# planning
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
