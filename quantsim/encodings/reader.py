"""Reading encodings files: JSON in, :class:`~quantsim.encoding.Encoding` values out.

:func:`load` detects the layout of a file (0.6.1, 1.0.0, 2.0.0 or the module-keyed
``_torch.encodings``), validates it against the schema and parses it into an
:class:`~quantsim.encodings.common.EncodingsFile`; :func:`from_entry` reads one entry. Offsets
are converted as :mod:`quantsim.encodings` describes. Per-block entries (1.0.0 ``PER_BLOCK`` /
``LPBQ``, 2.0.0 nested ``y_scale`` / ``per_block_int_scale``) become per-block encodings; a
1.0.0 ``PER_BLOCK`` entry records no channel count, so it is read as one row of blocks
``(1, N)`` that ``load_encodings`` lays out as the weight's ``(C, N / C)``; a 2.0.0 LPBQ entry
records no decompressed bitwidth, read as twice the bitwidth (aimet-torch's default).
Kinds quantsim does not simulate (2.1.0 meta ``y_scale``, float8, int2) are refused with an
:class:`~quantsim.errors.EncodingsError` naming the file and the JSON path.
"""
from __future__ import annotations

import json
import logging
import os
import re
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from quantsim.encoding import INT_BITWIDTHS, Encoding, integer_grid
from quantsim.encodings.common import (
    TORCH_LAYOUT,
    AnyEncoding,
    EncodingsFile,
    Int32BiasEncoding,
    PathLike,
    _check_version,
    _key,
    _short,
    _validate,
    _validate_against,
    detect_layout,
)
from quantsim.errors import EncodingsError, QuantizationSettingError

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# entries -> Encoding
# ----------------------------------------------------------------------------------------------
def from_entry(entry: Any, version: str, *, name: Optional[str] = None,
               axis: Optional[int] = None) -> Optional[AnyEncoding]:
    """Turn one file entry back into an encoding (validated against the schema first).

    Args:
        entry: a 0.6.1 list of per-channel dicts (a single dict is accepted too), or a 1.0.0 /
            2.0.0 entry dict.
        version: ``'0.6.1'``, ``'1.0.0'`` or ``'2.0.0'``.
        name: tensor name for messages (0.6.1 entries have none inside).
        axis: channel axis of per-channel 0.6.1 / 1.0.0 entries, which do not record it
            (default 0, the output-channel axis). 2.0.0 entries carry their own ``axis``.
            A 0.6.1 list of one item is per tensor; 1.0.0 says so in ``enc_type``.

    Returns:
        The encoding; ``None`` for a 0.6.1 entry without scale (``propagate_encodings`` marker).

    Raises:
        EncodingsError: malformed, or a kind quantsim does not simulate (2.1.0 meta
            ``y_scale``, float8, int2, 32-bit non-bias).
    """
    where = f"entry {name or (entry.get('name') if isinstance(entry, dict) else None)!r}"
    _check_version(version, where)
    if version == "0.6.1":
        entries = [entry] if isinstance(entry, dict) else entry
        _validate_against(entries, "entry_list_0_6_1", where)
        return _read_0_6_1(entries, where, axis, allow_marker=True)
    _validate_against(entry, f"entry_{version.replace('.', '_')}", where)
    if version == "1.0.0":
        return _read_1_0_0(entry, where, axis)
    return _read_2_0_0(entry, where)


# -- reading entries ---------------------------------------------------------------------------
def _as_bool(value: Any) -> bool:
    return value if isinstance(value, bool) else value == "True"


def _finite_positive(value: Any) -> bool:
    try:
        return 0 < float(value) < float("inf")
    except OverflowError:  # an int beyond float range
        return False


def _int_encoding(bitwidth: int, scales: Sequence[float], offsets: Sequence[int], symmetric: bool,
                  per_channel: bool, axis: Optional[int], where: str,
                  blocks: Optional[Tuple[int, Tuple[int, int]]] = None) -> AnyEncoding:
    """Rebuild an integer encoding from unsigned-view (legacy) offsets, checked as the writer
    checks what it writes: scales finite and > 0, a bitwidth quantsim simulates, and 0 on the
    grid (:func:`_check_zero_on_grid`). ``blocks``: ``(block_size, (C, blocks))`` of a
    per-block encoding (flat ``scales`` in row-major order)."""
    bitwidth = int(bitwidth)  # the schema let an integral float (8.0) through
    offsets = [int(o) for o in offsets]
    if len(scales) != len(offsets):
        raise EncodingsError(f"{where}: {len(scales)} scales but {len(offsets)} offsets")
    bad = [(i, s) for i, s in enumerate(scales) if not _finite_positive(s)]
    if bad:
        raise EncodingsError(f"{where}: scale[{bad[0][0]}] = {bad[0][1]!r}; every scale must be "
                             "finite and > 0")
    axis = (0 if axis is None else axis) if per_channel else None
    if bitwidth == 32:
        if symmetric and set(offsets) == {Int32BiasEncoding.legacy_offset}:
            return _make(Int32BiasEncoding, where, _tensor(scales, per_channel), axis)
        raise EncodingsError(
            f"{where}: 32-bit entries are read only as int32 biases (symmetric, offset -2^31); "
            f"quantsim simulates {INT_BITWIDTHS.start}..{INT_BITWIDTHS.stop - 1} bits"
        )
    _check_bitwidth(bitwidth, where)
    strict = unsigned = False
    half = 2 ** (bitwidth - 1)
    if symmetric and set(offsets) == {-half, 0}:
        # AIMET v1 unsigned_symmetric per channel: signed and unsigned channels. The unsigned
        # view with these offsets quantizes identically; only the symmetric flag is lost.
        logger.warning("%s: symmetric channels mix signed (%d) and unsigned (0) offsets; read as "
                       "asymmetric with the same grid", where, -half)
        symmetric = False
    if symmetric:
        kinds = {-half: "signed", -(half - 1): "strict", 0: "unsigned"}
        found = set(offsets)
        if len(found) != 1 or offsets[0] not in kinds:
            raise EncodingsError(
                f"{where}: is_sym is true but the offsets {sorted(found)[:4]} are not symmetric "
                f"legacy offsets; expected all {-half} (signed), all {-(half - 1)} (strict) or "
                "all 0 (unsigned symmetric)"
            )
        strict, unsigned = kinds[offsets[0]] == "strict", kinds[offsets[0]] == "unsigned"
        offsets = [0] * len(offsets)
    else:
        _check_zero_on_grid(bitwidth, scales, offsets, where)
    if blocks is not None:
        block_size, shape = blocks
        return _make(Encoding, where, bitwidth, _tensor(scales, True).reshape(shape),
                     _tensor(offsets, True).reshape(shape), symmetric, strict, unsigned, 0,
                     "int", block_size)
    return _make(Encoding, where, bitwidth, _tensor(scales, per_channel),
                 _tensor(offsets, per_channel), symmetric, strict, unsigned, axis, "int")


def _check_zero_on_grid(bitwidth: int, scales: Sequence[float], offsets: Sequence[int],
                        where: str) -> None:
    """An asymmetric grid ``(q + offset) * scale``, ``q`` in ``[0, 2^b - 1]``, must hold 0:
    ``-(2^b - 1) <= offset <= 0``. (An offset of +500 at 8 bits makes every value at least
    ``500 * scale``; no calibration or writer produces it.)"""
    qmin, qmax = integer_grid(bitwidth, symmetric=False)
    for i, o in enumerate(offsets):
        if not qmin <= -o <= qmax:
            try:
                span = (f" (it represents [{float(scales[i]) * (o + qmin):.6g}, "
                        f"{float(scales[i]) * (o + qmax):.6g}] only)")
            except OverflowError:
                span = ""
            raise EncodingsError(
                f"{where}: offset[{i}] = {_short(o)} leaves 0 off the {bitwidth}-bit grid"
                f"{span}; an asymmetric {bitwidth}-bit offset must be in {-qmax}..{-qmin}")


def _tensor(values: Sequence[float], per_channel: bool) -> torch.Tensor:
    t = torch.tensor([float(v) for v in values], dtype=torch.float32)
    return t if per_channel else t.reshape(())


def _make(cls: Any, where: str, *args: Any) -> Any:
    try:
        return cls(*args)
    except (QuantizationSettingError, EncodingsError) as exc:
        raise EncodingsError(f"{where}: {exc}") from None


def _check_bitwidth(bitwidth: int, where: str) -> None:
    if bitwidth not in INT_BITWIDTHS:
        raise EncodingsError(
            f"{where}: integer bitwidth {_short(bitwidth)} is not supported; allowed: "
            f"{INT_BITWIDTHS.start}..{INT_BITWIDTHS.stop - 1} (32 only for int32 biases)"
        )


def _read_float(bitwidth: int, where: str) -> Encoding:
    if bitwidth != 16:
        raise EncodingsError(f"{where}: float bitwidth {bitwidth} is not supported; allowed: 16")
    return Encoding.float16()


def _read_0_6_1(entries: List[Dict[str, Any]], where: str, axis: Optional[int],
                allow_marker: bool) -> Optional[AnyEncoding]:
    first = entries[0]
    for key in ("bitwidth", "dtype", "is_symmetric"):
        if len({json.dumps(e.get(key)) for e in entries}) > 1:
            raise EncodingsError(f"{where}: channels disagree on {key!r}")
    if first.get("dtype", "int") == "float":
        if len(entries) != 1:
            raise EncodingsError(
                f"{where}: a float encoding has exactly one item, got {len(entries)}"
            )
        return _read_float(first["bitwidth"], where)
    if any("scale" not in e for e in entries):
        if allow_marker and all("scale" not in e for e in entries):
            return None  # propagate_encodings marker: bitwidth/dtype only
        raise EncodingsError(f"{where}: missing required key 'scale'")
    return _int_encoding(first["bitwidth"], [e["scale"] for e in entries],
                         [e["offset"] for e in entries], _as_bool(first["is_symmetric"]),
                         len(entries) > 1, axis, where)


def _read_1_0_0(entry: Dict[str, Any], where: str, axis: Optional[int]) -> AnyEncoding:
    enc_type = entry["enc_type"]
    if enc_type in ("PER_BLOCK", "LPBQ") and entry["dtype"] != "INT":
        raise EncodingsError(f"{where}: {enc_type} entries must have dtype INT")
    if enc_type == "LPBQ":
        return _read_lpbq_1_0_0(entry, where)
    if enc_type == "PER_BLOCK":
        n = len(entry["scale"])
        return _int_encoding(entry["bw"], entry["scale"], entry["offset"],
                             _as_bool(entry["is_sym"]), True, 0, where,
                             (entry["block_size"], (1, n)))
    if entry["dtype"] == "FLOAT":
        return _read_float(entry["bw"], where)
    if enc_type == "PER_TENSOR" and len(entry["scale"]) != 1:
        raise EncodingsError(
            f"{where}: PER_TENSOR needs exactly one scale, got {len(entry['scale'])}"
        )
    return _int_encoding(entry["bw"], entry["scale"], entry["offset"], _as_bool(entry["is_sym"]),
                         enc_type == "PER_CHANNEL", axis, where)


def _read_lpbq_1_0_0(entry: Dict[str, Any], where: str) -> Encoding:
    """1.0.0 LPBQ: ``bw`` decompressed, ``compressed_bw`` the values', ``scale`` per channel,
    ``offset`` all ``-2^(bw-1)``, ``per_block_int_scale`` the flat multipliers."""
    channels, ints = len(entry["scale"]), entry["per_block_int_scale"]
    if not _as_bool(entry["is_sym"]) or set(entry["offset"]) != {-(2 ** (entry["bw"] - 1))}:
        raise EncodingsError(f"{where}: LPBQ entries are symmetric with every offset "
                             f"-2^(bw-1) = {-(2 ** (entry['bw'] - 1))}")
    if len(entry["offset"]) != channels or not ints or len(ints) % channels:
        raise EncodingsError(
            f"{where}: LPBQ needs one offset per scale (channel) and a multiple of {channels} "
            f"per_block_int_scale values, got {len(entry['offset'])} and {len(ints)}")
    _check_bitwidth(entry["compressed_bw"], where)
    return _lpbq(ints, entry["scale"], entry["compressed_bw"], entry["bw"], entry["block_size"],
                 (channels, len(ints) // channels), where)


def _lpbq(ints: Any, channel_scale: Any, bitwidth: int, decompressed_bw: int, block_size: int,
          shape: Tuple[int, int], where: str) -> Encoding:
    try:
        scales = torch.tensor(channel_scale, dtype=torch.float64).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise EncodingsError(f"{where}: per-channel scales are not a rectangular list: "
                             f"{exc}") from None
    if scales.numel() != shape[0] or not bool(torch.all((scales > 0) & (scales < float("inf")))):
        raise EncodingsError(f"{where}: LPBQ needs {shape[0]} per-channel scales, each finite "
                             f"and > 0, got {scales.numel()}")
    try:
        multipliers = torch.as_tensor(ints, dtype=torch.float32).reshape(shape)
    except RuntimeError as exc:
        raise EncodingsError(f"{where}: per_block_int_scale does not hold {shape[0]} channels "
                             f"of {shape[1]} blocks: {exc}") from None
    return _make(Encoding.lpbq, where, multipliers, scales.to(torch.float32), int(bitwidth),
                 int(decompressed_bw), int(block_size))


def _block_tensor(value: Any, what: str, where: str) -> torch.Tensor:
    """A nested 2.0.0 per-block list as ``(C, blocks)``: aimet-torch writes the weight's rank
    (``(C, blocks, 1, 1)`` for a Conv2d), trailing dims of 1 are dropped."""
    try:
        t = torch.tensor(value, dtype=torch.float64)
    except (TypeError, ValueError) as exc:
        raise EncodingsError(f"{where}: {what} is not a rectangular nested list: {exc}") from None
    while t.dim() > 2 and t.shape[-1] == 1:
        t = t.squeeze(-1)
    if t.dim() != 2:
        raise EncodingsError(f"{where}: {what} must be (channels, blocks) (trailing 1s "
                             f"allowed), got shape {list(t.shape)}")
    return t


def _read_blocks_2_0_0(entry: Dict[str, Any], where: str, unsigned: bool, b: int) -> Encoding:
    if entry.get("axis") != 1 or "block_size" not in entry:
        raise EncodingsError(f"{where}: per-block entries need axis 1 (the block axis of a "
                             f"(C, K, ...) weight) and block_size, got axis {entry.get('axis')}")
    if "per_block_int_scale" in entry:
        if unsigned or "y_zero_point" in entry:
            raise EncodingsError(f"{where}: LPBQ entries are signed symmetric (intB, no "
                                 "y_zero_point)")
        ints = _block_tensor(entry["per_block_int_scale"], "per_block_int_scale", where)
        _check_bitwidth(b, where)
        return _lpbq(ints, entry["per_channel_float_scale"], b, min(2 * b, INT_BITWIDTHS[-1]),
                     entry["block_size"], tuple(ints.shape), where)
    scale = _block_tensor(entry["y_scale"], "y_scale", where)
    zp = entry.get("y_zero_point", 0)
    zps = _block_tensor(zp, "y_zero_point", where) if isinstance(zp, list) else \
        torch.full_like(scale, float(zp))
    if zps.shape != scale.shape or not bool(torch.all(zps == zps.round())):
        raise EncodingsError(f"{where}: y_zero_point must be integers shaped as y_scale")
    _check_bitwidth(b, where)
    half = 2 ** (b - 1)
    legacy = (-zps if unsigned else -zps - half).to(torch.int64).reshape(-1).tolist()
    symmetric = not unsigned and not bool(torch.any(zps != 0))
    return _int_encoding(b, scale.reshape(-1).tolist(), legacy, symmetric, True, 0, where,
                         (entry["block_size"], tuple(scale.shape)))


_ONNX_INT = re.compile(r"(u?)int([0-9]+)")


def _integral(value: Any) -> bool:
    """An int, or a float holding one (``3.0``); never a bool or a list."""
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and value.is_integer())


def _read_2_0_0(entry: Dict[str, Any], where: str) -> AnyEncoding:
    lpbq = "per_block_int_scale" in entry or "per_channel_float_scale" in entry
    if lpbq and not ("per_block_int_scale" in entry and "per_channel_float_scale" in entry
                     and "y_scale" not in entry):
        raise EncodingsError(f"{where}: an LPBQ entry has per_block_int_scale and "
                             "per_channel_float_scale and no y_scale")
    y_scale = entry.get("y_scale")
    if isinstance(y_scale, dict):
        raise EncodingsError(
            f"{where}: y_scale is a 2.1.0 meta encoding (double-quantized scale, LPBQ/NVFP4); "
            "not supported - quantsim reads 2.0.0 entries (LPBQ as per_block_int_scale + "
            "per_channel_float_scale)"
        )
    dtype = entry["output_dtype"]
    match = _ONNX_INT.fullmatch(dtype)
    if match is None:
        raise EncodingsError(f"{where}: output_dtype {dtype!r} is not supported; quantsim reads "
                             "int4/uint4/int8/uint8/int16/uint16 and int32 (biases)")
    unsigned, b = bool(match.group(1)), int(match.group(2))
    nested = isinstance(y_scale, list) and any(isinstance(v, list) for v in y_scale)
    if lpbq or "block_size" in entry or nested:
        return _read_blocks_2_0_0(entry, where, unsigned, b)
    axis = entry.get("axis")
    scales = y_scale if isinstance(y_scale, list) else [y_scale]
    if axis is None and len(scales) != 1:
        raise EncodingsError(f"{where}: a list y_scale of {len(scales)} values needs 'axis'")
    per_channel = axis is not None
    zp = entry.get("y_zero_point", 0)
    zps = zp if isinstance(zp, list) else [zp] * len(scales)
    if len(zps) != len(scales) or not all(_integral(z) for z in zps):
        raise EncodingsError(
            f"{where}: y_zero_point must be integer(s) matching y_scale, got {_short(zp)}"
        )
    zps = [int(z) for z in zps]
    if b == 32 and not unsigned:
        if any(zps):
            raise EncodingsError(
                f"{where}: int32 (bias) entries must have zero point 0, got {zps[:4]}"
            )
        return _make(Int32BiasEncoding, where, _tensor(scales, per_channel), axis)
    _check_bitwidth(b, where)
    half = 2 ** (b - 1)
    lo, hi = (0, 2**b - 1) if unsigned else (-half, half - 1)
    if any(not lo <= z <= hi for z in zps):
        raise EncodingsError(
            f"{where}: y_zero_point {_short(zps[:4])} out of the {dtype} range [{lo}, {hi}]"
        )
    # signed with zero point 0 -> signed symmetric; otherwise asymmetric on the unsigned view
    symmetric = not unsigned and not any(zps)
    legacy = [-z for z in zps] if unsigned else [-z - half for z in zps]
    return _int_encoding(b, scales, legacy, symmetric, per_channel, axis, where)


# ----------------------------------------------------------------------------------------------
# documents
# ----------------------------------------------------------------------------------------------
def load(source: Union[PathLike, Mapping[str, Any]], *,
         param_names: Optional[Iterable[str]] = None) -> EncodingsFile:
    """Read any supported encodings file (or an already parsed dict).

    The layout is detected from ``version`` and the shape (FORMATS §4.4): ``encodings`` ->
    2.0.0; dicts -> 0.6.1, or ``_torch.encodings`` when activation values are
    ``{"input"|"output": ...}``; lists -> 1.0.0. The document is validated against the schema.

    Args:
        source: path of a JSON file, or a dict.
        param_names: 2.0.0 only (one flat list): names to put in :attr:`EncodingsFile.param`.
            Without it an entry is a parameter when it has ``axis`` or its name ends in
            ``.weight``/``.bias``. int32 entries always go to :attr:`EncodingsFile.bias`.

    Raises:
        EncodingsError: naming the file and the JSON path, e.g.
            ``model.encodings: param_encodings[3].scale: expected a list of numbers, got 'abc'``.
    """
    doc, label = _read_source(source)
    layout = detect_layout(doc, label)
    _validate(doc, layout, label)
    if layout == "2.0.0":
        return _parse_2_0_0(doc, label, None if param_names is None else set(param_names))
    if layout == "1.0.0":
        return _parse_1_0_0(doc, label)
    return _parse_dict_layout(doc, label, layout)


def _read_source(source: Union[PathLike, Mapping[str, Any]]) -> Tuple[Any, str]:
    if not isinstance(source, (str, os.PathLike)):
        return (dict(source) if isinstance(source, Mapping) else source), "<dict>"
    label = str(source)
    if "\0" in os.fsdecode(source):
        raise EncodingsError(f"{label!r}: a file path cannot hold a NUL character")

    def reject(constant: str) -> None:
        raise EncodingsError(f"{label}: {constant} is not valid JSON (non-finite number)")

    try:
        with open(source, encoding="utf-8") as fh:
            return json.load(fh, parse_constant=reject), label
    except OSError as exc:
        raise EncodingsError(f"{label}: cannot read: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise EncodingsError(f"{label}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at "
                             f"offset {exc.start}); encodings files are UTF-8 JSON") from exc
    except json.JSONDecodeError as exc:
        raise EncodingsError(f"{label}: not valid JSON: {exc.msg} (line {exc.lineno}, "
                             f"column {exc.colno})") from exc
    except RecursionError as exc:
        raise EncodingsError(f"{label}: JSON nested too deeply to read (an encodings file "
                             "nests a few levels)") from exc
    except ValueError as exc:  # Python's limit on the digits of an integer
        raise EncodingsError(f"{label}: a number in the file cannot be read: {exc}") from exc


def _parse_1_0_0(doc: Dict[str, Any], label: str) -> EncodingsFile:
    out = _file_meta(doc, "1.0.0")
    for key in ("activation_encodings", "param_encodings"):
        for i, entry in enumerate(doc[key]):
            where = f"{label}: {key}[{i}] ({entry['name']!r})"
            enc = _read_1_0_0(entry, where, None)
            _put(out, key, entry["name"], enc, where)
    return out


def _parse_2_0_0(doc: Dict[str, Any], label: str, param_names: Optional[set]) -> EncodingsFile:
    out = _file_meta(doc, "2.0.0")
    for i, entry in enumerate(doc["encodings"]):
        name = entry["name"]
        where = f"{label}: encodings[{i}] ({name!r})"
        enc = _read_2_0_0(entry, where)
        if param_names is not None:
            is_param = name in param_names
        else:
            is_param = "axis" in entry or name.rsplit(".", 1)[-1] in ("weight", "bias")
        _put(out, "param_encodings" if is_param else "activation_encodings", name, enc, where)
    return out


def _parse_dict_layout(doc: Dict[str, Any], label: str, layout: str) -> EncodingsFile:
    out = _file_meta(doc, doc.get("version", "0.6.1"))
    out.torch_layout = layout == TORCH_LAYOUT
    for name, entries in doc["param_encodings"].items():
        where = f"{label}: param_encodings{_key(name)}"
        enc = _read_0_6_1(entries, where, None, allow_marker=False)
        _put(out, "param_encodings", name, enc, where)
    for name, value in doc["activation_encodings"].items():
        where = f"{label}: activation_encodings{_key(name)}"
        if not out.torch_layout:
            enc = _read_0_6_1(value, where, None, allow_marker=True)
            if enc is not None:
                _put(out, "activation_encodings", name, enc, where)
            continue
        slots = out.module_activation.setdefault(name, {})
        for slot, by_index in value.items():
            for idx, entry in by_index.items():
                w = f"{where}.{slot}{_key(idx)}"
                enc = _read_0_6_1([entry], w, None, allow_marker=False)
                if not isinstance(enc, Encoding):
                    raise EncodingsError(f"{w}: int32 bias encodings are not activation encodings")
                slots.setdefault(slot, {})[int(idx)] = enc
    return out


def _file_meta(doc: Dict[str, Any], version: str) -> EncodingsFile:
    args = doc.get("quantizer_args")
    if args is not None:
        args = {k: (_as_bool(v) if k in ("is_symmetric", "per_channel_quantization") else v)
                for k, v in args.items()}
    producer = doc.get("producer")
    return EncodingsFile(version=version, excluded_layers=list(doc.get("excluded_layers", [])),
                         quantizer_args=args, producer=dict(producer) if producer else None)


def _put(out: EncodingsFile, key: str, name: str, enc: AnyEncoding, where: str) -> None:
    if isinstance(enc, Int32BiasEncoding):
        target: Dict[str, Any] = out.bias
    else:
        target = out.param if key == "param_encodings" else out.activation
    taken = (out.param, out.bias) if target is not out.activation else (out.activation,)
    if any(name in t for t in taken):
        raise EncodingsError(f"{where}: {name!r} appears twice")
    target[name] = enc
