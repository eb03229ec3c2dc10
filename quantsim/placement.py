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
* an input that arrives unquantized (from a functional op such as ``x + y``, a constant or a
  buffer) gets an input quantizer, when activations are quantized at all; a data-movement op
  fed that way so passes on quantized values.
* a module's additive-mask inputs (``mask_inputs``: the attention mask of
  :class:`~quantsim.nn.AttentionMaskAdd`, 0 or ``-inf``, which no grid holds) get no quantizer
  at any level, and neither does its output: a runtime applies the mask as a select, so the
  output is the other input (already quantized) or masked.

The fold rule, supergroups and arrivals are matched per *call*, because the exported graph has
one node per call and a runtime fuses node chains. A module called more than once (one
``nn.ReLU`` after several convs) has one set of quantizers, so a setting that depends on the call
changes only where every call agrees: ``conv2 -> relu`` (the relu's second call) fuses, turning
conv2's output quantizer off, while the shared relu keeps its output quantizer, which then
quantizes every call's output with one encoding. A module called more than once can end a chain
but not start or continue one (which of its calls produced a tensor is not traced).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Set, Tuple

from torch import nn

from quantsim.config import HardwareConfig
from quantsim.graph import ModelGraph
from quantsim.op_types import is_data_movement, onnx_types_of, output_types_of, params_of

_FOLDABLE_INTO = ("Conv", "ConvTranspose", "Gemm")


@dataclass
class QuantizerSetting:
    """How one quantizer is created (bitwidth and data type come from the sim defaults)."""

    enabled: bool = False
    symmetric: bool = False
    per_channel: bool = False
    constraint: Optional[Tuple[Optional[float], Optional[float]]] = None
    #: per-block weights (config extension: ``block_size``, LPBQ ``decompressed_bw``)
    block_size: Optional[int] = None
    decompressed_bw: Optional[int] = None


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
    return list(params_of(module))


def _apply_defaults(config: HardwareConfig, n_in: int, n_out: int, params: List[str]) -> ModuleSettings:
    ops, prm = config.defaults.ops, config.defaults.params
    act_sym = _set(ops.is_symmetric, False)
    out_on = _set(ops.is_output_quantized, False)
    per_channel = _set(config.defaults.per_channel_quantization, False)
    return ModuleSettings(
        inputs=[QuantizerSetting(False, act_sym) for _ in range(n_in)],
        outputs=[QuantizerSetting(out_on, act_sym) for _ in range(n_out)],
        params={p: QuantizerSetting(_set(prm.is_quantized, False), _set(prm.is_symmetric, False),
                                    per_channel, None, prm.block_size, prm.decompressed_bw)
                for p in params},
    )


def _apply_param_rules(rules, settings: ModuleSettings) -> None:
    for pname, rule in rules.items():
        s = settings.params.get(pname)
        if s is not None:
            s.enabled = _set(rule.is_quantized, s.enabled)
            s.symmetric = _set(rule.is_symmetric, s.symmetric)
            if rule.block_size is not None:  # the two come together (config check)
                s.block_size, s.decompressed_bw = rule.block_size, rule.decompressed_bw


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
        _apply_op_type(config, types[name], ModuleSettings(s.inputs, [], s.params))
        # outputs follow the op that produces them (a fused conv-BN-ReLU's ReLU)
        _apply_op_type(config, output_types_of(module), ModuleSettings([], s.outputs, {}))
        settings[name] = s
    placement = Placement(settings, _set(config.defaults.strict_symmetric, False),
                          _set(config.defaults.unsigned_symmetric, False))
    folds = _apply_fold_rule(graph, modules, types, placement)
    _apply_supergroups(config, graph, types, placement, folds)
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


def _calls_of(graph: ModelGraph) -> Dict[str, List[int]]:
    """Module name -> indices of its calls in ``graph.calls``."""
    calls: Dict[str, List[int]] = {}
    for index, call in enumerate(graph.calls):
        calls.setdefault(call.name, []).append(index)
    return calls


def _fusable_successor(graph: ModelGraph, name: str) -> Optional[int]:
    """The call (index in ``graph.calls``) a runtime can fuse after ``name``: ``name`` runs once
    and its only output is read once per forward, directly (no view), as input 0 of that call,
    and is no model output. The reader may run several times; only this call of it qualifies."""
    consumer = graph.sole_consumer(name)
    if consumer is None or graph.call_counts.get(name, 0) != 1:
        return None
    for index, call in enumerate(graph.calls):
        src = call.inputs[0] if call.name == consumer and call.inputs else None
        if src is not None and src.kind == "module" and src.producer == name \
                and src.output_index == 0 and not src.is_view:
            return index
    return None


def _apply_fold_rule(graph, modules, types, placement: Placement) -> Dict[int, int]:
    """Conv/ConvTranspose/Linear -> BatchNorm: the BN is treated as folded into its producer.

    Returns producer call -> BN call. The producer's output quantizer moves to the BN; the BN's
    input and parameter quantizers go off only when every call of the BN is folded (a BN that
    also runs unfolded still needs them there).
    """
    settings = placement.modules
    calls = _calls_of(graph)
    folds: Dict[int, int] = {}
    carried: Dict[str, bool] = {}  # BN -> whether a producer folded into it quantized its output
    for name in list(settings):
        if not any(t in _FOLDABLE_INTO for t in types[name]):
            continue
        module = modules[name]
        if "ConvTranspose" in types[name] and getattr(module, "groups", 1) != 1:
            continue
        bn_call = _fusable_successor(graph, name)
        bn = graph.calls[bn_call].name if bn_call is not None else None
        if bn not in settings or "BatchNormalization" not in types.get(bn, ()):
            continue
        producer = settings[name]
        if not (producer.outputs and settings[bn].outputs):
            continue
        folds[calls[name][0]] = bn_call
        carried[bn] = carried.get(bn, False) or producer.outputs[0].enabled
        producer.outputs[0].enabled = False
        placement.folded.append((name, bn))
    folded_calls = set(folds.values())
    for bn, on in carried.items():
        folded = settings[bn]
        if all(c in folded_calls for c in calls[bn]):
            for s in folded.inputs:
                s.enabled = False
            for s in folded.params.values():
                s.enabled = False
            folded.outputs[0].enabled = on
        else:
            folded.outputs[0].enabled = folded.outputs[0].enabled or on
    return folds


def _apply_supergroups(config, graph, types, placement: Placement, folds: Dict[int, int]) -> None:
    """Chains of calls matching a supergroup keep only the last op's output quantizer; a module's
    quantizer goes off only when the chains cover every call of it."""
    settings = placement.modules
    folded_calls = set(folds.values())
    fused_output: Set[int] = set()  # calls whose output stays inside a chain
    fused_input: Set[int] = set()   # calls whose input comes from inside a chain

    def next_call(index: int) -> Optional[int]:
        nxt = _fusable_successor(graph, graph.calls[folds.get(index, index)].name)
        if nxt is None or nxt in folded_calls or graph.calls[nxt].name not in settings:
            return None
        return nxt

    for pattern in config.supergroups:
        for start, call in enumerate(graph.calls):
            if start in folded_calls or call.name not in settings or \
                    pattern[0] not in types[call.name]:
                continue
            chain = [start]
            for op in pattern[1:]:
                nxt = next_call(chain[-1])
                if nxt is None or op not in types[graph.calls[nxt].name]:
                    break
                chain.append(nxt)
            if len(chain) != len(pattern):
                continue
            placement.supergroups.append(tuple(graph.calls[c].name for c in chain))
            fused_output.update(folds.get(c, c) for c in chain[:-1])
            fused_input.update(chain[1:])
    for name, indices in _calls_of(graph).items():
        if name not in settings:
            continue
        if all(c in fused_output for c in indices):
            for q in settings[name].outputs:
                q.enabled = False
        if all(c in fused_input for c in indices):
            for q in settings[name].inputs:
                q.enabled = False


def _mask_inputs(module: nn.Module) -> Tuple[int, ...]:
    """The module's additive-mask inputs (its ``mask_inputs``), kept float with its output."""
    return tuple(getattr(module, "mask_inputs", ()))


def _place_for_runtime(config, graph: ModelGraph, modules, placement: Placement) -> None:
    """No requantization after data movement; an input that arrives unquantized in any call
    gets an input quantizer (a shared module's then applies to all its calls); additive-mask
    inputs and the masked sum get none."""
    settings = placement.modules
    activations_on = _set(config.defaults.ops.is_output_quantized, False)
    for name, s in settings.items():
        masks = _mask_inputs(modules[name])
        for i in masks:
            if i < len(s.inputs):
                s.inputs[i].enabled = False
        if masks:
            for q in s.outputs:
                q.enabled = False
    for call in graph.calls:
        if call.name not in settings:
            continue
        s = settings[call.name]
        masks = _mask_inputs(modules[call.name])
        for i, src in enumerate(call.inputs):
            if i in masks:
                continue
            # module outputs are quantized by their producer (or inside its supergroup), data
            # movement passes that on, and model inputs follow the model_input rule
            if activations_on and src is not None and src.kind == "other" \
                    and i < len(s.inputs) and not s.inputs[i].enabled:
                s.inputs[i].enabled = True
                placement.unquantized_arrivals.append((call.name, i))
        if is_data_movement(modules[call.name]):
            for q in s.outputs:
                q.enabled = False
