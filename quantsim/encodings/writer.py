"""Writing encodings files: :class:`~quantsim.encoding.Encoding` values in, JSON out.

Entries of every version (:func:`to_entry`, the int32 bias entries), the tensor-name-keyed
documents (:func:`to_json_dict`, :func:`write`), the module-keyed ``_torch.encodings`` document
(:func:`torch_json_dict`, :func:`write_torch_encodings`) and the ``quantizer_args`` dict. Offsets
are converted as :mod:`quantsim.encodings` describes; strict symmetric is written as intB with
zero point 0 too (2.0.0 has no strict flag). Per-block encodings are ``PER_BLOCK`` / ``LPBQ``
entries in 1.0.0 and nested ``y_scale`` (``per_block_int_scale`` + ``per_channel_float_scale``
for LPBQ) in 2.0.0, as aimet-torch 2.x writes them; 0.6.1 lists every block (LPBQ: its
effective scale). Files are validated, then written atomically.
"""
from __future__ import annotations

import json
import logging
from typing import Any, Dict, List, Optional, Union

import torch

from quantsim.atomic import atomic_write_text
from quantsim.encoding import Encoding
from quantsim.encodings.common import (
    DEFAULT_VERSION,
    ONNX_BITWIDTHS,
    TORCH_LAYOUT,
    AnyEncoding,
    EncodingsFile,
    Int32BiasEncoding,
    PathLike,
    _check_version,
    _validate,
)
from quantsim.errors import EncodingsError, QuantizationSettingError

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# Encoding -> entries
# ----------------------------------------------------------------------------------------------
def to_entry(enc: AnyEncoding, name: str,
             version: str) -> Union[Dict[str, Any], List[Dict[str, Any]]]:
    """Turn one encoding into its file entry.

    Args:
        enc: an :class:`Encoding` or :class:`Int32BiasEncoding`.
        name: tensor name (inside the entry for 1.0.0 / 2.0.0; used in messages for 0.6.1).
        version: ``'0.6.1'`` (returns the list of per-channel dicts, also used by
            ``_torch.encodings``), ``'1.0.0'`` or ``'2.0.0'`` (return a dict).

    Raises:
        EncodingsError: the encoding cannot be expressed in ``version`` (e.g. a bitwidth without
            2.0.0 ``output_dtype``, an fp16 encoding in 2.0.0, a symmetric encoding with offset).
    """
    where = f"entry {name!r}"
    _check_version(version, where)
    if version == "0.6.1":
        return _entry_0_6_1(enc, where)
    if version == "1.0.0":
        return _entry_1_0_0(enc, name, where)
    return _entry_2_0_0(enc, name, where)


def bias_entry(name: str, input_scale: Any, weight_scale: Any, axis: int = 0) -> Dict[str, Any]:
    """2.0.0 int32 bias entry, analytic rule ``y_scale[c] = input_scale * weight_scale[c]``.

    Per channel (with ``axis``) when ``weight_scale`` is a 1-d tensor or a per-channel Encoding.

    Example:
        >>> bias_entry("fc.bias", 0.5, 0.25)
        {'name': 'fc.bias', 'output_dtype': 'int32', 'y_scale': 0.125}
    """
    return _entry_2_0_0(Int32BiasEncoding.from_scales(input_scale, weight_scale, axis), name,
                        f"entry {name!r}")


def bias_entry_from_values(name: str, bias: torch.Tensor, per_channel: bool = True,
                           axis: int = 0) -> Dict[str, Any]:
    """2.0.0 int32 bias entry, statistical fallback ``y_scale = max(|b| / 2^31, floor)``."""
    return _entry_2_0_0(Int32BiasEncoding.from_bias(bias, per_channel, axis), name,
                        f"entry {name!r}")


# -- writing entries ---------------------------------------------------------------------------
def _legacy_offsets(enc: Encoding, where: str) -> List[int]:
    """Legacy offsets ``o + qmin`` as exact Python ints (float32 cannot hold them above 2^24)."""
    values = enc.offset.reshape(-1).tolist()
    if any(not float(v).is_integer() for v in values):
        raise EncodingsError(f"{where}: offsets must be integers to be written, got {values[:4]}")
    offsets = [int(v) for v in values]
    if enc.symmetric and any(offsets):
        raise EncodingsError(
            f"{where}: a symmetric encoding must have internal offset 0, got {offsets[:4]}; "
            "write it as an asymmetric encoding instead"
        )
    return [o + enc.qmin for o in offsets]


def _floats(t: torch.Tensor) -> List[float]:
    # float32 -> the exact double; json writes its shortest repr, which reads back bit-exactly.
    return [float(v) for v in t.reshape(-1).tolist()]


def _entry_0_6_1(enc: AnyEncoding, where: str) -> List[Dict[str, Any]]:
    if isinstance(enc, Int32BiasEncoding):
        return [{"bitwidth": 32, "dtype": "int", "is_symmetric": "True", "max": mx, "min": mn,
                 "offset": enc.legacy_offset, "scale": s}
                for s, mn, mx in zip(_floats(enc.scale), _floats(enc.scale * float(enc.qmin)),
                                     _floats(enc.scale * float(enc.qmax)))]
    _check_encoding(enc, where)
    if enc.is_float:
        return [{"bitwidth": enc.bitwidth, "dtype": "float"}]
    offsets = _legacy_offsets(enc, where)
    mins, maxs = _floats(enc.min), _floats(enc.max)
    if any(abs(v) == float("inf") for v in mins + maxs):
        raise EncodingsError(f"{where}: min/max overflow float32 (scale {_floats(enc.scale)[:4]})")
    sym = "True" if enc.symmetric else "False"
    return [{"bitwidth": enc.bitwidth, "dtype": "int", "is_symmetric": sym, "max": mx,
             "min": mn, "offset": o, "scale": s}
            for s, o, mn, mx in zip(_floats(enc.scale), offsets, mins, maxs)]


def _entry_1_0_0(enc: AnyEncoding, name: str, where: str) -> Dict[str, Any]:
    if isinstance(enc, Int32BiasEncoding):
        scales = _floats(enc.scale)
        return {"bw": 32, "dtype": "INT",
                "enc_type": "PER_CHANNEL" if enc.per_channel else "PER_TENSOR", "is_sym": True,
                "name": name, "offset": [enc.legacy_offset] * len(scales), "scale": scales}
    _check_encoding(enc, where)
    if enc.is_float:
        return {"bw": enc.bitwidth, "dtype": "FLOAT", "enc_type": "PER_TENSOR", "name": name}
    if enc.is_lpbq:  # bw: value x multiplier; scale/offset: per channel; offset -2^(bw-1)
        channels = enc.channel_scale.numel()
        return {"block_size": enc.block_size, "bw": enc.decompressed_bw,
                "compressed_bw": enc.bitwidth, "dtype": "INT", "enc_type": "LPBQ",
                "is_sym": True, "name": name,
                "offset": [-(2 ** (enc.decompressed_bw - 1))] * channels,
                "per_block_int_scale": [int(v) for v in enc.per_block_int_scale.reshape(-1)
                                        .tolist()],
                "scale": _floats(enc.channel_scale)}
    if enc.per_block:
        return {"block_size": enc.block_size, "bw": enc.bitwidth, "dtype": "INT",
                "enc_type": "PER_BLOCK", "is_sym": bool(enc.symmetric), "name": name,
                "offset": _legacy_offsets(enc, where), "scale": _floats(enc.scale)}
    return {"bw": enc.bitwidth, "dtype": "INT",
            "enc_type": "PER_CHANNEL" if enc.per_channel else "PER_TENSOR",
            "is_sym": bool(enc.symmetric), "name": name,
            "offset": _legacy_offsets(enc, where), "scale": _floats(enc.scale)}


def _entry_2_0_0(enc: AnyEncoding, name: str, where: str, rank: int = 2) -> Dict[str, Any]:
    if isinstance(enc, Int32BiasEncoding):
        entry: Dict[str, Any] = {"name": name, "output_dtype": "int32"}
        entry["y_scale"] = _floats(enc.scale) if enc.per_channel else float(enc.scale)
        if enc.per_channel:
            entry["axis"] = enc.axis
        return entry
    _check_encoding(enc, where)
    if enc.is_float:
        raise EncodingsError(
            f"{where}: fp16 encodings have no 2.0.0 entry (ONNX QuantizeLinear has no float16 "
            "output); they are left out of 2.0.0 files - write 1.0.0 to keep them"
        )
    b = enc.bitwidth
    if b not in ONNX_BITWIDTHS:
        raise EncodingsError(
            f"{where}: bitwidth {b} has no 2.0.0 output_dtype; allowed: int4/uint4, int8/uint8, "
            "int16/uint16 (int32 for biases only) - write version 1.0.0 or 0.6.1 for other "
            "bitwidths"
        )
    signed = enc.symmetric and not enc.unsigned
    _legacy_offsets(enc, where)  # integrality / symmetric-offset checks
    zps = [-int(v) for v in enc.offset.reshape(-1).tolist()]  # zp = -internal offset
    lo, hi = (-(2 ** (b - 1)), 2 ** (b - 1) - 1) if signed else (0, 2**b - 1)
    if any(not lo <= z <= hi for z in zps):
        raise EncodingsError(f"{where}: zero point(s) {zps[:4]} out of the "
                             f"{_onnx_dtype(signed, b)} range [{lo}, {hi}]")
    entry = {"name": name, "output_dtype": _onnx_dtype(signed, b)}
    if enc.per_block:  # nested lists of the weight's rank, axis = the block axis (aimet-torch)
        trailing = [1] * max(0, rank - 2)
        if enc.is_lpbq:
            entry["per_block_int_scale"] = enc.per_block_int_scale.to(torch.int64).reshape(
                *enc.scale.shape, *trailing).tolist()
            entry["per_channel_float_scale"] = enc.channel_scale.reshape(
                -1, 1, *trailing).tolist()
        else:
            entry["y_scale"] = enc.scale.reshape(*enc.scale.shape, *trailing).tolist()
            if any(zps):
                entry["y_zero_point"] = (-enc.offset).to(torch.int64).reshape(
                    *enc.scale.shape, *trailing).tolist()
        entry["axis"] = 1
        entry["block_size"] = enc.block_size
        return entry
    entry["y_scale"] = _floats(enc.scale) if enc.per_channel else float(enc.scale)
    if any(zps):
        entry["y_zero_point"] = zps if enc.per_channel else zps[0]
    if enc.per_channel:
        entry["axis"] = enc.axis
    return entry


def _onnx_dtype(signed: bool, bitwidth: int) -> str:
    """2.0.0 ``output_dtype`` name: ``intB`` for signed grids, ``uintB`` otherwise."""
    return f"{'' if signed else 'u'}int{bitwidth}"


def _check_encoding(enc: Any, where: str) -> None:
    if not isinstance(enc, Encoding):
        raise EncodingsError(f"{where}: expected an Encoding, got {type(enc).__name__}")


# ----------------------------------------------------------------------------------------------
# documents
# ----------------------------------------------------------------------------------------------
def _producer(file: EncodingsFile) -> Dict[str, str]:
    if file.producer is not None:
        return dict(file.producer)
    from quantsim import __version__  # late: quantsim/__init__ may import this module

    return {"package": "quantsim", "version": __version__}


def _name(name: Any, where: str) -> str:
    if not isinstance(name, str) or not name:
        raise EncodingsError(f"{where}: tensor names must be non-empty strings, got {name!r}")
    return name


def _common(file: EncodingsFile, doc: Dict[str, Any]) -> Dict[str, Any]:
    doc["excluded_layers"] = list(file.excluded_layers)
    if file.quantizer_args:
        doc["quantizer_args"] = dict(file.quantizer_args)
    return doc


def to_json_dict(file: EncodingsFile, version: str = DEFAULT_VERSION) -> Dict[str, Any]:
    """Build the tensor-name-keyed document of ``version`` and validate it against the schema.

    0.6.1 / 1.0.0 put :attr:`EncodingsFile.bias` among the parameters (bw 32, symmetric);
    2.0.0 writes activations, parameters, then int32 biases in one list and leaves fp16
    encodings, ``excluded_layers`` and ``quantizer_args`` out (logged).

    Raises:
        EncodingsError: unknown version, an encoding the version cannot express, or a document
            that fails the schema.
    """
    _check_version(version, "to_json_dict")
    clash = sorted(set(file.param) & set(file.bias))
    if clash:
        raise EncodingsError(f"param_encodings: {clash[0]!r} is both in param and in bias")
    groups = (("activation_encodings", file.activation),
              ("param_encodings", {**file.param, **file.bias}))
    if version == "0.6.1":
        doc: Dict[str, Any] = {"version": version}
        for key, encs in groups:
            doc[key] = {_name(n, key): _entry_0_6_1(e, f"{key}[{n!r}]") for n, e in encs.items()}
        doc = _common(file, doc)
    elif version == "1.0.0":
        doc = {"version": version}
        for key, encs in groups:
            doc[key] = [_entry_1_0_0(e, _name(n, key), f"{key}[{n!r}]") for n, e in encs.items()]
        doc = _common(file, doc)
        doc["producer"] = _producer(file)
    else:
        doc = {"producer": _producer(file), "version": version, "encodings": []}
        floats, seen = [], set()
        for n, e in [*file.activation.items(), *file.param.items(), *file.bias.items()]:
            if n in seen:
                raise EncodingsError(f"encodings: {n!r} appears twice; 2.0.0 names must be unique")
            seen.add(n)
            if isinstance(e, Encoding) and e.is_float:
                floats.append(n)
                continue
            doc["encodings"].append(_entry_2_0_0(e, _name(n, "encodings"), f"encodings[{n!r}]",
                                                 file.param_ranks.get(n, 2)))
        if floats:
            logger.warning("2.0.0 has no fp16 entries; left out: %s", ", ".join(floats))
        if file.excluded_layers or file.quantizer_args:
            logger.info("2.0.0 files carry no excluded_layers/quantizer_args; left out")
    _validate(doc, version, "<to_json_dict>")
    return doc


def torch_json_dict(file: EncodingsFile, version: str = DEFAULT_VERSION) -> Dict[str, Any]:
    """Build the module-keyed ``_torch.encodings`` document (FORMATS §4.2) and validate it.

    Uses :attr:`EncodingsFile.module_activation` and :attr:`EncodingsFile.param` (int32 biases
    are export-only and not written here); ``version`` is only the label in the file.
    """
    _check_version(version, "torch_json_dict")
    acts: Dict[str, Dict[str, Dict[int, Any]]] = {}
    for module, slots in file.module_activation.items():
        _name(module, "activation_encodings")
        for slot, by_index in slots.items():
            if slot not in ("input", "output"):
                raise EncodingsError(
                    f"activation_encodings[{module!r}]: slot {slot!r}; allowed: input, output"
                )
            for idx, enc in by_index.items():
                if isinstance(idx, bool) or not str(idx).isdigit():
                    raise EncodingsError(f"activation_encodings[{module!r}][{slot!r}]: "
                                         f"index {idx!r} is not an integer >= 0")
                where = f"activation_encodings[{module!r}][{slot!r}][{idx}]"
                entry = _entry_0_6_1(enc, where)[0]
                acts.setdefault(module, {}).setdefault(slot, {})[int(idx)] = entry
    params = {_name(n, "param_encodings"): _entry_0_6_1(e, f"param_encodings[{n!r}]")
              for n, e in file.param.items()}
    doc = _common(file, {"version": version, "activation_encodings": acts,
                         "param_encodings": params})
    doc["producer"] = _producer(file)
    # validate the JSON form (integer indices become strings when written)
    _validate(json.loads(json.dumps(doc)), TORCH_LAYOUT, "<torch_json_dict>")
    return doc


def write(path: PathLike, file: EncodingsFile, version: str = DEFAULT_VERSION) -> None:
    """Validate and atomically write the tensor-name-keyed encodings file of ``version``.

    1.0.0 / 0.6.1 are written with sorted keys and indent 4 (as aimet-torch), 2.0.0 in the
    peer order (producer, version, encodings) with indent 2. Floats are the float32 values'
    shortest repr, so they read back bit-exactly. On any error the existing file is untouched.

    Raises:
        EncodingsError: see :func:`to_json_dict`; or the file cannot be written.
    """
    doc = to_json_dict(file, version)
    _atomic_write(path, _dumps(doc, sort=version != "2.0.0"))


def write_torch_encodings(path: PathLike, file: EncodingsFile,
                          version: str = DEFAULT_VERSION) -> None:
    """Validate and atomically write the module-keyed ``_torch.encodings`` file."""
    _atomic_write(path, _dumps(torch_json_dict(file, version), sort=True))


def _dumps(doc: Dict[str, Any], sort: bool) -> str:
    try:
        return json.dumps(doc, sort_keys=sort, indent=4 if sort else 2, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise EncodingsError(f"cannot serialise the encodings: {exc}") from None


def _atomic_write(path: PathLike, text: str) -> None:
    try:
        atomic_write_text(path, text)
    except OSError as exc:
        raise EncodingsError(f"{path}: cannot write: {exc}") from None


# ----------------------------------------------------------------------------------------------
# quantizer_args (FORMATS §4.5)
# ----------------------------------------------------------------------------------------------
_SCHEMES = ("post_training_tf", "post_training_tf_enhanced", "training_range_learning_with_tf_init",
            "training_range_learning_with_tf_enhanced_init", "training_range_learning",
            "post_training_percentile")
_SCHEME_ALIASES = {
    "tf": "post_training_tf", "tf_enhanced": "post_training_tf_enhanced",
    "percentile": "post_training_percentile",
    "training_range_learning_with_tf_init": "post_training_tf",
    "training_range_learning_with_tf_enhanced_init": "post_training_tf_enhanced",
}


def quantizer_args(quant_scheme: Any = "post_training_tf_enhanced", *,
                   activation_bitwidth: int = 8, param_bitwidth: int = 8, dtype: Any = "int",
                   param_symmetric: Optional[bool] = None,
                   per_channel_quantization: bool = False) -> Dict[str, Any]:
    """The ``quantizer_args`` dict of 0.6.1 / 1.0.0 files (informative, real JSON booleans).

    Args:
        quant_scheme: scheme name, alias (``'tf'``, ``'tf_enhanced'``, ``'percentile'``) or an
            enum member whose ``name`` is one; range-learning schemes are written as their
            initialisation scheme (as aimet-torch does).
        activation_bitwidth, param_bitwidth: default bitwidths.
        dtype: ``'int'`` or ``'float'`` (or an enum whose name is one).
        param_symmetric: config ``defaults.params.is_symmetric``; None -> the per-channel flag
            (AIMET's rule when the config does not say).
        per_channel_quantization: config ``defaults.per_channel_quantization``.

    Example:
        >>> quantizer_args("tf", per_channel_quantization=True)["quant_scheme"]
        'post_training_tf'
    """
    name = str(getattr(quant_scheme, "name", quant_scheme))
    name = _SCHEME_ALIASES.get(name, name)
    if name not in _SCHEMES:
        raise QuantizationSettingError(
            f"quantizer_args: unknown quant_scheme {quant_scheme!r}; allowed: "
            f"{', '.join(_SCHEMES)} or the aliases 'tf', 'tf_enhanced', 'percentile'"
        )
    dtype_name = str(getattr(dtype, "name", dtype)).lower()
    if dtype_name not in ("int", "float"):
        raise QuantizationSettingError(f"quantizer_args: dtype {dtype!r}; allowed: 'int', 'float'")
    sym = per_channel_quantization if param_symmetric is None else param_symmetric
    return {"activation_bitwidth": int(activation_bitwidth), "dtype": dtype_name,
            "is_symmetric": bool(sym), "param_bitwidth": int(param_bitwidth),
            "per_channel_quantization": bool(per_channel_quantization), "quant_scheme": name}
