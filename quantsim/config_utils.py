"""Per-block weight quantization of a built sim: aimet-torch 2.x's ``config_utils`` calls.

``aimet_torch.quantsim.config_utils`` -> ``quantsim.config_utils``, same signatures::

    set_blockwise_quantization_for_weights(sim, [torch.nn.Linear], bitwidth=4,
                                           symmetric=True, block_size=64)
    set_grouped_blockwise_quantization_for_weights(sim, [torch.nn.Linear], bitwidth=4,
                                                   symmetric=True, decompressed_bw=8,
                                                   block_size=64)
    sim.compute_encodings(...)

``arg`` picks the modules: a list of module types, a list of modules of ``sim.model``, or a
predicate ``module -> bool``. The weight quantizer of each picked module becomes per-block
(one encoding per output channel and block of ``block_size`` input features / input channels,
:func:`quantsim.encoding.block_rows`) with the given bitwidth and symmetry; its encoding is
dropped, so calibrate (or load encodings) afterwards. Modules that a type list or predicate
picks but whose weight quantizer is disabled (the config leaves their weights in float, or
``exclude_layers_from_quantization``) are left as they are, as aimet-torch leaves modules
without a weight quantizer; a module named in a list of modules must have one.

Per-block weights suit Linear and Conv1d/2d/3d layers (and their fused conv-BN / linear-BN
forms), whose weights hold output channels on dimension 0 and inputs on dimension 1.
"""
from __future__ import annotations

from typing import Any, Callable, List, Optional, Tuple

from torch import nn

from quantsim.encoding import block_shape, validate_bitwidth, validate_block_size, \
    validate_decompressed_bw
from quantsim.errors import QuantizationSettingError
from quantsim.nn.fused import ConvBn, LinearBn
from quantsim.op_types import params_of
from quantsim.quantizer import Quantizer

#: Module types whose weights can be quantized per block (output channels on dimension 0,
#: input features / channels on dimension 1).
BLOCK_WEIGHT_TYPES: Tuple[type, ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, ConvBn,
                                        LinearBn)

_WHERE = "set_blockwise_quantization_for_weights"
_WHERE_LPBQ = "set_grouped_blockwise_quantization_for_weights"


def set_blockwise_quantization_for_weights(sim: Any, arg: Any, bitwidth: int, symmetric: bool,
                                           block_size: int) -> None:
    """Make the weight quantizers of the modules ``arg`` picks per-block.

    Args:
        sim: a :class:`quantsim.QuantizationSimModel`.
        arg: a list of module types, a list of modules of ``sim.model``, or a callable
            ``module -> bool`` (called with each quantized module).
        bitwidth: integer bitwidth of the weight values (4..31; 4 for W4A16).
        symmetric: signed symmetric grid (usual for weights) or asymmetric.
        block_size: input features (Linear) or input channels (Conv) per block; must divide
            every picked weight's dimension 1.

    Raises:
        QuantizationSettingError: a bad bitwidth / block size / ``arg``; a picked module whose
            type has no per-block weight (ConvTranspose, Embedding, ...) or whose weight's
            dimension 1 is not a multiple of ``block_size`` (the module is named). Nothing is
            changed then.
    """
    bitwidth = validate_bitwidth(bitwidth, "int", _WHERE)
    symmetric = _flag(symmetric, "symmetric", _WHERE)
    block_size = _block_size(block_size, _WHERE)
    for q, shape in _weight_quantizers(sim, arg, block_size, _WHERE):
        _configure(q, bitwidth, symmetric, block_size, shape, None)


def set_grouped_blockwise_quantization_for_weights(
        sim: Any, arg: Any, bitwidth: int, symmetric: bool, decompressed_bw: int,
        block_size: int, block_grouping: int = -1) -> None:
    """Make the weight quantizers of the modules ``arg`` picks LPBQ (low-power blockwise).

    Each block of ``block_size`` inputs of an output channel has ``bitwidth``-bit values and a
    scale that is an integer multiplier in ``[1, 2^(decompressed_bw - bitwidth)]`` times one
    float scale per output channel (:func:`quantsim.encoding.lpbq_scale`); a runtime stores
    the multipliers in ``decompressed_bw - bitwidth`` bits and computes in
    ``decompressed_bw``-bit integers.

    Args:
        sim, arg, bitwidth, block_size: as :func:`set_blockwise_quantization_for_weights`.
        symmetric: must be True (LPBQ grids are signed symmetric).
        decompressed_bw: bitwidth of value x multiplier (8 for int4 values), ``bitwidth``..31.
        block_grouping: blocks sharing one float scale: -1 (all blocks of a channel, the only
            grouping the encodings formats hold) or the number of blocks per channel.

    Raises:
        QuantizationSettingError: as :func:`set_blockwise_quantization_for_weights`, and for
            ``symmetric=False``, a bad ``decompressed_bw`` or another block grouping.
    """
    bitwidth = validate_bitwidth(bitwidth, "int", _WHERE_LPBQ)
    if _flag(symmetric, "symmetric", _WHERE_LPBQ) is not True:
        raise QuantizationSettingError(
            f"{_WHERE_LPBQ}: LPBQ needs symmetric=True (its grids are signed symmetric)")
    decompressed_bw = validate_decompressed_bw(decompressed_bw, bitwidth, _WHERE_LPBQ)
    if decompressed_bw is None:
        raise QuantizationSettingError(f"{_WHERE_LPBQ}: decompressed_bw is required")
    block_size = _block_size(block_size, _WHERE_LPBQ)
    if isinstance(block_grouping, bool) or not isinstance(block_grouping, int):
        raise QuantizationSettingError(
            f"{_WHERE_LPBQ}: block_grouping must be an integer (-1: all blocks of a channel), "
            f"got {block_grouping!r}")
    picked = _weight_quantizers(sim, arg, block_size, _WHERE_LPBQ)
    for (q, shape), name in zip(picked, _names(sim, picked)):
        blocks = block_shape(shape, block_size)[1]
        if block_grouping not in (-1, blocks):
            raise QuantizationSettingError(
                f"{_WHERE_LPBQ}: {name}: block_grouping {block_grouping} is not supported; "
                f"allowed: -1 or {blocks} (all blocks of a channel share its float scale, as "
                "the encodings formats' LPBQ entries store)")
    for q, shape in picked:
        _configure(q, bitwidth, True, block_size, shape, decompressed_bw)


def _configure(q: Quantizer, bitwidth: int, symmetric: bool, block_size: int,
               shape: Tuple[int, ...], decompressed_bw) -> None:
    q.bitwidth = bitwidth
    q.symmetric = symmetric
    q.set_block_size(block_size, shape, decompressed_bw)


def _flag(value: Any, name: str, where: str) -> bool:
    if not isinstance(value, bool):
        raise QuantizationSettingError(
            f"{where}: {name} must be True or False, got {type(value).__name__} {value!r}")
    return value


def _block_size(block_size: Any, where: str) -> int:
    if validate_block_size(block_size, where) is None:
        raise QuantizationSettingError(
            f"{where}: block_size must be a positive integer (inputs per block), got None")
    return block_size


def _condition(arg: Any, sim: Any, where: str) -> Tuple[Callable[[nn.Module], bool], bool]:
    """aimet-torch's three forms of ``arg`` as a predicate over modules, and whether ``arg``
    names the modules one by one."""
    if isinstance(arg, (list, tuple)):
        if not arg:
            raise QuantizationSettingError(
                f"{where}: arg is an empty list; pass module types, modules or a predicate")
        if all(isinstance(a, type) and issubclass(a, nn.Module) for a in arg):
            types = tuple(arg)
            return (lambda m: isinstance(m, types)), False
        if all(isinstance(a, nn.Module) for a in arg):
            known = {id(m) for m in sim.qmodules()}
            foreign = [type(a).__name__ for a in arg if id(a) not in known]
            if foreign:
                raise QuantizationSettingError(
                    f"{where}: arg holds modules that are not quantized modules of sim.model: "
                    f"{foreign[:5]} (pass modules of sim.model, e.g. sim.model.fc1)")
            ids = {id(a) for a in arg}
            return (lambda m: id(m) in ids), True
        raise QuantizationSettingError(
            f"{where}: a list arg must hold only torch.nn.Module types or only modules of "
            f"sim.model, got {[type(a).__name__ for a in arg][:5]}")
    if callable(arg):
        return arg, False
    raise QuantizationSettingError(
        f"{where}: arg must be a list of module types, a list of modules or a callable "
        f"module -> bool, got {type(arg).__name__}")


def _weight_quantizers(sim: Any, arg: Any, block_size: int, where: str
                       ) -> List[Tuple[Quantizer, Tuple[int, ...]]]:
    """``(weight quantizer, weight shape)`` of each picked module, all checked first."""
    condition, named = _condition(arg, sim, where)
    picked = []
    for name, module in sim.named_qmodules():
        if not condition(module):
            continue
        q = module.param_quantizers["weight"] if "weight" in module.param_quantizers else None
        if (q is None or not q.enabled) and named:
            raise QuantizationSettingError(
                f"{where}: {name} has no {'enabled ' if q is not None else ''}weight "
                "quantizer to make per-block (pass modules with quantized weights: Linear, "
                "Conv1d/2d/3d)")
        if q is None or not q.enabled:
            continue  # weights left in float (config, excluded layer): aimet-torch skips too
        shape = tuple(params_of(module)["weight"].shape)
        problem = block_weight_problem(module, shape, block_size)
        if problem is not None:
            raise QuantizationSettingError(f"{where}: {name}: {problem}")
        picked.append((q, shape))
    return picked


def block_weight_problem(module: nn.Module, shape: Tuple[int, ...], block_size: int
                         ) -> Optional[str]:
    """Why the weight (of ``shape``) of ``module`` cannot be quantized per block of
    ``block_size`` inputs, or None when it can."""
    if not isinstance(module, BLOCK_WEIGHT_TYPES):
        float_cls = next((c for c in type(module).__mro__[1:] if c.__module__ != __name__
                          and issubclass(c, nn.Module) and "Quantized" not in c.__name__),
                         type(module))
        return (f"a {float_cls.__name__} has no per-block weight; allowed: "
                f"{[t.__name__ for t in BLOCK_WEIGHT_TYPES]} (output channels on dimension 0, "
                "inputs on dimension 1)")
    if len(shape) < 2 or shape[1] % block_size:
        return (f"weight of shape {list(shape)} has {shape[1] if len(shape) > 1 else 0} inputs "
                f"(dimension 1), not a multiple of block_size {block_size}")
    return None


def _names(sim: Any, picked: List[Tuple[Quantizer, Tuple[int, ...]]]) -> List[str]:
    """The module names of ``picked`` (for messages)."""
    by_id = {id(module.param_quantizers["weight"]): name for name, module in sim.named_qmodules()
             if "weight" in module.param_quantizers}
    return [by_id[id(q)] for q, _ in picked]
