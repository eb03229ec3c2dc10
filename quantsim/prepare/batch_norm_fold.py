"""Fold BatchNorm into the layer before it, or fuse the pair for QAT.

A pair is found by running the model once (eval mode, no statistics change) with forward
hooks and a torch-function recorder: a BatchNorm folds into a Conv1d/2d/3d, a non-grouped
ConvTranspose1d/2d/3d or a Linear (with a 2-D output) when

* the BatchNorm's input is exactly the layer's output (the same tensor object),
* nothing else uses that output: no other module, no functional op, not a model output,
* both modules run once per forward (a reused layer cannot absorb one of its BatchNorms).

:func:`fold_all_batch_norms` (aimet_torch's signature) folds the running statistics into the
layer's weight and bias and replaces the BatchNorm by ``nn.Identity``;
:func:`fuse_all_conv_bn` replaces layer, BatchNorm and a following ReLU/ReLU6 by one fused
QAT module (:mod:`quantsim.nn.fused`) that keeps training the BatchNorm statistics.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from quantsim.checks import require_module
from quantsim.errors import QuantSimError, UnsupportedModelError
from quantsim.graph import eval_mode
from quantsim.nn.fused import (check_foldable, check_statistics, fold_batch_norm_, fuse_conv_bn,
                               relative_slot)
from quantsim.prepare._recording import RuntimeTrace, record_run

__all__ = ["ConvBnPair", "find_conv_bn_pairs", "fold_all_batch_norms", "fuse_all_conv_bn"]

Shapes = Union[Sequence[int], Sequence[Sequence[int]], None]
_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
           nn.ConvTranspose3d, nn.Linear)
_ACTIVATIONS = (nn.ReLU, nn.ReLU6)


@dataclass(frozen=True)
class ConvBnPair:
    """A foldable ``layer -> bn (-> activation)`` chain, by module path."""

    layer: str
    bn: str
    activation: Optional[str] = None


def _dummy(model: nn.Module, input_shapes: Shapes, dummy_input: Any) -> Any:
    if dummy_input is not None:
        return dummy_input
    if input_shapes is None:
        raise UnsupportedModelError(
            "fold_all_batch_norms: give input_shapes (e.g. (1, 3, 224, 224)) or a dummy_input")
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    if _is_shape(input_shapes):
        return torch.randn(*input_shapes, device=device)
    if isinstance(input_shapes, (list, tuple)) and input_shapes and all(
            _is_shape(s) for s in input_shapes):
        return tuple(torch.randn(*s, device=device) for s in input_shapes)
    raise UnsupportedModelError(
        f"fold_all_batch_norms: input_shapes must be one shape such as (1, 3, 224, 224) or a "
        f"list of shapes, each a tuple of positive ints; got {input_shapes!r:.80}")


def _is_shape(value: Any) -> bool:
    return isinstance(value, (list, tuple, torch.Size)) and len(value) > 0 and all(
        isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in value)


def _sole_leaf_consumer(trace: RuntimeTrace, tensor: torch.Tensor) -> Optional[str]:
    """The one leaf module that uses ``tensor`` when nothing else does."""
    if any(t is tensor for t in trace.outputs) or trace.op_uses(tensor):
        return None
    uses = trace.leaf_uses(tensor)
    return uses[0].name if len(uses) == 1 else None


def _pairs_from_trace(model: nn.Module, trace: RuntimeTrace) -> List[ConvBnPair]:
    producers = {}
    for call in trace.module_calls:
        if call.leaf:
            for t in call.outputs:
                producers[id(t)] = (call, t)
    pairs = []
    for call in trace.module_calls:
        if not (call.leaf and isinstance(call.module, nn.modules.batchnorm._BatchNorm)):
            continue
        if len(call.inputs) != 1 or trace.call_counts.get(call.name) != 1:
            continue
        found = producers.get(id(call.inputs[0]))
        if found is None or found[1] is not call.inputs[0]:
            continue
        layer_call, out = found
        layer = layer_call.module
        if not isinstance(layer, _LAYERS) or len(layer_call.outputs) != 1:
            continue
        if trace.call_counts.get(layer_call.name) != 1 or \
                _sole_leaf_consumer(trace, out) != call.name:
            continue
        if isinstance(layer, nn.Linear) and out.dim() != 2:
            continue
        try:
            check_foldable(layer, call.module)
        except UnsupportedModelError:
            continue
        pairs.append(ConvBnPair(layer_call.name, call.name,
                                _activation_after(trace, call)))
    return pairs


def _activation_after(trace: RuntimeTrace, bn_call) -> Optional[str]:
    if len(bn_call.outputs) != 1:
        return None
    name = _sole_leaf_consumer(trace, bn_call.outputs[0])
    if name is None or trace.call_counts.get(name) != 1:
        return None
    module = next(c.module for c in trace.module_calls if c.name == name)
    return name if isinstance(module, _ACTIVATIONS) else None


def find_conv_bn_pairs(model: nn.Module, input_shapes: Shapes = None,
                       dummy_input: Any = None) -> List[ConvBnPair]:
    """The foldable layer -> BatchNorm (-> ReLU/ReLU6) chains of ``model``, in call order.

    Args:
        model: the model (run once in eval mode; its modes are restored).
        input_shapes: shape(s) of random inputs, used when ``dummy_input`` is None.
        dummy_input: a tensor, tuple of positional inputs or dict (read by ``forward``'s
            signature: :func:`quantsim.graph.split_dummy_input`).

    Returns:
        One :class:`ConvBnPair` per foldable BatchNorm.

    Raises:
        UnsupportedModelError: ``model`` is not an ``nn.Module``, ``input_shapes`` is not a
            shape (or list of shapes), or the model's forward fails with the input.
    """
    require_module(model, "find_conv_bn_pairs(model=...)")
    if isinstance(model, nn.DataParallel):
        model = model.module
    dummy = _dummy(model, input_shapes, dummy_input)
    try:
        with eval_mode(model):
            trace = record_run(model, dummy, ops=True)
    except QuantSimError:
        raise
    except Exception as exc:  # noqa: BLE001 - the model's own forward: any error is its input's
        given = "dummy_input" if dummy_input is not None else f"input_shapes {input_shapes!r}"
        raise UnsupportedModelError(
            f"finding foldable BatchNorms: the model's forward failed with the {given} "
            f"({type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}); "
            "give the shapes (or dummy_input) the model takes") from exc
    return _pairs_from_trace(model, trace)


def _check_statistics(model: nn.Module, pairs: List[ConvBnPair]) -> None:
    """Every pair's BatchNorm folds to finite values; checked before any module changes."""
    for pair in pairs:
        check_statistics(model.get_submodule(pair.bn), f"module {pair.bn!r}")


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent_path), name, new)


def fold_all_batch_norms(model: nn.Module, input_shapes: Shapes,
                         dummy_input: Any = None) -> List[Tuple[nn.Module, nn.Module]]:
    """Fold every foldable BatchNorm into the conv / linear layer before it, in place.

    The layer's weight and bias absorb the BatchNorm's running statistics (computed in
    float64) and the BatchNorm is replaced by ``nn.Identity``; eval-mode outputs are unchanged
    up to float rounding. BatchNorms that cannot fold are left alone.

    Args:
        model: the model to modify (an ``nn.DataParallel`` is unwrapped).
        input_shapes: shape(s) of random inputs, e.g. ``(1, 3, 224, 224)``; may be None when
            ``dummy_input`` is given.
        dummy_input: a tensor, tuple of positional inputs or dict (read by ``forward``'s
            signature: :func:`quantsim.graph.split_dummy_input`).

    Returns:
        ``[(layer, bn), ...]``: the layer modules and the BatchNorm modules folded into them.

    Raises:
        UnsupportedModelError: neither ``input_shapes`` nor ``dummy_input`` was given, or see
            :func:`find_conv_bn_pairs`.
        BatchNormFoldError: a BatchNorm whose ``running_var + eps`` is not > 0 (e.g. ``eps=0``
            and a dead channel), named by its path; the model is left unchanged.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).eval()
        >>> pairs = fold_all_batch_norms(net, (1, 3, 16, 16))
        >>> [type(m).__name__ for m in net]
        ['Conv2d', 'Identity', 'ReLU']
    """
    if isinstance(model, nn.DataParallel):
        model = model.module
    pairs = find_conv_bn_pairs(model, input_shapes, dummy_input)
    _check_statistics(model, pairs)
    folded = []
    for pair in pairs:
        layer, bn = model.get_submodule(pair.layer), model.get_submodule(pair.bn)
        fold_batch_norm_(layer, bn)
        _replace(model, pair.bn, nn.Identity())
        folded.append((layer, bn))
    return folded


def fuse_all_conv_bn(model: nn.Module, input_shapes: Shapes = None,
                     dummy_input: Any = None) -> List[ConvBnPair]:
    """Replace each foldable layer -> BatchNorm (-> ReLU/ReLU6) chain by a fused QAT module.

    The layer's attribute gets the :class:`~quantsim.nn.ConvBn` / ``ConvTransposeBn`` /
    ``LinearBn``; the BatchNorm's and the activation's attributes get ``nn.Identity``. In
    train mode the fused module keeps updating the BatchNorm statistics. A
    QuantizationSimModel of the fused model quantizes the folded weight, and its export is
    that of the model :func:`fold_all_batch_norms` makes (the fused module remembers where
    its activation was, :attr:`~quantsim.nn.fused._FusedBn.activation_slot`); outside a sim,
    ``.fold()`` gives the plain layer.

    Args:
        model: the model to modify in place.
        input_shapes: shape(s) of random inputs, used when ``dummy_input`` is None.
        dummy_input: a tensor, tuple of positional inputs or dict (read by ``forward``'s
            signature: :func:`quantsim.graph.split_dummy_input`).

    Returns:
        The fused chains.

    Raises:
        UnsupportedModelError: see :func:`find_conv_bn_pairs`.
        BatchNormFoldError: as :func:`fold_all_batch_norms`; the model is left unchanged.
    """
    if isinstance(model, nn.DataParallel):
        model = model.module
    pairs = find_conv_bn_pairs(model, input_shapes, dummy_input)
    _check_statistics(model, pairs)
    for pair in pairs:
        layer, bn = model.get_submodule(pair.layer), model.get_submodule(pair.bn)
        act = model.get_submodule(pair.activation) if pair.activation else None
        fused = fuse_conv_bn(layer, bn, act)
        _replace(model, pair.layer, fused)
        _replace(model, pair.bn, nn.Identity())
        if pair.activation:
            _replace(model, pair.activation, nn.Identity())
            # export puts the activation back there, as fold_all_batch_norms leaves it
            fused.activation_slot = relative_slot(pair.layer, pair.activation)
    return pairs
