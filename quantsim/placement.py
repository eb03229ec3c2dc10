"""Decide which quantizers exist and how they are set, from the config and the traced graph.

Levels are applied in order, each overwriting the previous (FORMATS.md §1.10):

1. ``defaults`` (ops, params, per-channel, strict / unsigned symmetric)
2. ``params`` (by parameter name)
3. ``op_type`` (by ONNX op type of the module, incl. per-op params and encoding constraints)
4. ``supergroups`` and the Conv/Linear -> BatchNorm fold rule
5. ``model_input``
6. ``model_output``

Then placement follows what a target runtime executes:

* ops that only move or select values (MaxPool, Flatten, Dropout, ...) get no quantizer: their
  output is as quantized as their input;
* an input that arrives unquantized (from a functional op such as ``x + y``, a constant, or a
  data-movement chain that started unquantized) gets an input quantizer, when activations are
  quantized at all.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Set, Tuple

from torch import nn

from quantsim.config import HardwareConfig
from quantsim.graph import ModelGraph
from quantsim.op_types import is_data_movement, onnx_types_of

_FOLDABLE_INTO = ("Conv", "ConvTranspose", "Gemm")


@dataclass
class QuantizerSetting:
    """How one quantizer is created (bitwidth and data type come from the sim defaults)."""

    enabled: bool = False
    symmetric: bool = False
    per_channel: bool = False
    constraint: Optional[Tuple[Optional[float], Optional[float]]] = None


@dataclass
class ModuleSettings:
    """The quantizers of one wrapped module."""

    inputs: List[QuantizerSetting]
    outputs: List[QuantizerSetting]
    params: Dict[str, QuantizerSetting]


@dataclass
class Placement:
    """The result: settings per module plus what the user should hear about."""

    modules: Dict[str, ModuleSettings]
    strict_symmetric: bool = False
    unsigned_symmetric: bool = False
    #: (consumer, input index) whose input arrives from a non-module op and is quantized there
    unquantized_arrivals: List[Tuple[str, int]] = field(default_factory=list)
    #: (producer, bn) pairs treated as folded
    folded: List[Tuple[str, str]] = field(default_factory=list)
    #: matched supergroups, each a tuple of module names
    supergroups: List[Tuple[str, ...]] = field(default_factory=list)


def _set(value: Optional[bool], current: bool) -> bool:
    """A config key that is absent keeps the lower level's value."""
    return current if value is None else bool(value)


def _module_params(module: nn.Module) -> List[str]:
    return [n for n, p in module.named_parameters(recurse=False) if p.is_floating_point()]


def _apply_defaults(config: HardwareConfig, n_in: int, n_out: int, params: List[str]) -> ModuleSettings:
    ops, prm = config.defaults.ops, config.defaults.params
    act_sym = _set(ops.is_symmetric, False)
    out_on = _set(ops.is_output_quantized, False)
    per_channel = _set(config.defaults.per_channel_quantization, False)
    return ModuleSettings(
        inputs=[QuantizerSetting(False, act_sym) for _ in range(n_in)],
        outputs=[QuantizerSetting(out_on, act_sym) for _ in range(n_out)],
        params={p: QuantizerSetting(_set(prm.is_quantized, False), _set(prm.is_symmetric, False),
                                    per_channel) for p in params},
    )


def _apply_param_rules(rules, settings: ModuleSettings) -> None:
    for pname, rule in rules.items():
        s = settings.params.get(pname)
        if s is not None:
            s.enabled = _set(rule.is_quantized, s.enabled)
            s.symmetric = _set(rule.is_symmetric, s.symmetric)


def _apply_op_type(config: HardwareConfig, types: Tuple[str, ...], settings: ModuleSettings) -> None:
    rules = [config.op_type[t] for t in types if t in config.op_type]
    per_channel_votes = [r.per_channel_quantization for r in rules
                         if r.per_channel_quantization is not None]
    if per_channel_votes:
        for s in settings.params.values():
            s.per_channel = any(per_channel_votes)
    for rule in rules:
        for s in settings.inputs:
            s.enabled = _set(rule.is_input_quantized, s.enabled)
            s.symmetric = _set(rule.is_symmetric, s.symmetric)
        for s in settings.outputs:
            s.enabled = _set(rule.is_output_quantized, s.enabled)
            s.symmetric = _set(rule.is_symmetric, s.symmetric)
            if rule.encoding_constraints is not None:
                s.constraint = (rule.encoding_constraints.min, rule.encoding_constraints.max)
        _apply_param_rules(rule.params, settings)


def resolve(
    config: HardwareConfig, graph: ModelGraph, modules: Dict[str, nn.Module]
) -> Placement:
    """Compute every wrapped module's quantizer settings (see the module docstring)."""
    settings: Dict[str, ModuleSettings] = {}
    types: Dict[str, Tuple[str, ...]] = {}
    for name, module in modules.items():
        call = graph.first_call(name)
        n_in = len(call.inputs) if call else 0
        n_out = call.num_outputs if call else 0
        s = _apply_defaults(config, n_in, n_out, _module_params(module))
        _apply_param_rules(config.params, s)
        types[name] = onnx_types_of(module)
        _apply_op_type(config, types[name], s)
        settings[name] = s
    placement = Placement(settings, _set(config.defaults.strict_symmetric, False),
                          _set(config.defaults.unsigned_symmetric, False))
    _apply_fold_rule(graph, modules, types, placement)
    _apply_supergroups(config, graph, types, placement)
    if config.model_input:
        for consumer, index in _model_input_consumers(graph):
            if consumer in settings and index < len(settings[consumer].inputs):
                settings[consumer].inputs[index].enabled = True
    if config.model_output is not None:
        for producer, index in graph.model_outputs:
            if producer in settings and index < len(settings[producer].outputs):
                settings[producer].outputs[index].enabled = bool(config.model_output)
    _place_for_runtime(config, graph, modules, placement)
    return placement


def _model_input_consumers(graph: ModelGraph):
    seen: Set[Tuple[str, int]] = set()
    for call in graph.calls:
        for i, src in enumerate(call.inputs):
            if src is not None and src.kind == "model_input" and (call.name, i) not in seen:
                seen.add((call.name, i))
                yield call.name, i


def _direct_successor(graph: ModelGraph, name: str) -> Optional[str]:
    """The only consumer of ``name``'s output, fed directly (no view, single call each)."""
    consumer = graph.sole_consumer(name)
    if consumer is None or graph.call_counts.get(name, 0) != 1:
        return None
    call = graph.first_call(consumer)
    src = call.inputs[0] if call and call.inputs else None
    if src is None or src.kind != "module" or src.producer != name or src.is_view:
        return None
    return consumer


def _apply_fold_rule(graph, modules, types, placement: Placement) -> None:
    """Conv/ConvTranspose/Linear -> BatchNorm: the BN is treated as folded into its producer."""
    settings = placement.modules
    for name in list(settings):
        if not any(t in _FOLDABLE_INTO for t in types[name]):
            continue
        module = modules[name]
        if "ConvTranspose" in types[name] and getattr(module, "groups", 1) != 1:
            continue
        bn = _direct_successor(graph, name)
        if bn is None or "BatchNormalization" not in types.get(bn, ()):
            continue
        producer, folded = settings[name], settings[bn]
        for s in folded.inputs:
            s.enabled = False
        for s in folded.params.values():
            s.enabled = False
        if producer.outputs and folded.outputs:
            folded.outputs[0].enabled = producer.outputs[0].enabled
            producer.outputs[0].enabled = False
        placement.folded.append((name, bn))


def _apply_supergroups(config, graph, types, placement: Placement) -> None:
    """Straight chains matching a supergroup keep only the last op's output quantizer."""
    settings = placement.modules
    fold_end = {p: bn for p, bn in placement.folded}
    folded_bns = set(fold_end.values())

    def next_node(name: str) -> Optional[str]:
        succ = _direct_successor(graph, fold_end.get(name, name))
        return succ if succ in settings and succ not in folded_bns else None

    for pattern in config.supergroups:
        for start in settings:
            if start in folded_bns or pattern[0] not in types[start]:
                continue
            chain = [start]
            for op in pattern[1:]:
                nxt = next_node(chain[-1])
                if nxt is None or op not in types[nxt]:
                    break
                chain.append(nxt)
            if len(chain) != len(pattern):
                continue
            placement.supergroups.append(tuple(chain))
            for i, member in enumerate(chain):
                s = settings[fold_end.get(member, member)] if i < len(chain) - 1 else settings[member]
                if i < len(chain) - 1:
                    for q in s.outputs:
                        q.enabled = False
                if i > 0:
                    for q in settings[member].inputs:
                        q.enabled = False


def _place_for_runtime(config, graph: ModelGraph, modules, placement: Placement) -> None:
    """No requantization after data movement; quantize inputs that arrive unquantized."""
    settings = placement.modules
    activations_on = _set(config.defaults.ops.is_output_quantized, False)
    quantized_out: Dict[Tuple[str, int], bool] = {}
    seen: Set[str] = set()
    for call in graph.calls:
        if call.name in seen or call.name not in settings:
            continue
        seen.add(call.name)
        s = settings[call.name]
        arrives = []
        for i, src in enumerate(call.inputs):
            if src is None or i >= len(s.inputs):
                arrives.append(True)
                continue
            if src.kind == "other":
                ok = False
            elif src.kind == "module":
                ok = quantized_out.get((src.producer, src.output_index), True)
            else:
                ok = True  # model inputs follow the model_input rule
            if not ok and activations_on and not s.inputs[i].enabled:
                s.inputs[i].enabled = True
                if src.kind == "other":
                    placement.unquantized_arrivals.append((call.name, i))
            arrives.append(ok or s.inputs[i].enabled)
        if is_data_movement(modules[call.name]):
            for q in s.outputs:
                q.enabled = False
            for j in range(len(s.outputs)):
                quantized_out[(call.name, j)] = all(arrives) if arrives else True
