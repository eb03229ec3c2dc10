"""Encodings files: AIMET 0.6.1, 1.0.0, 2.0.0 and the module-keyed ``_torch.encodings`` layout.

Pure format code: :class:`~quantsim.encoding.Encoding` values in, JSON out, and back. Nothing
here knows about ``nn.Module``; the simulation maps names to quantizers.

Offsets (see ``docs/encodings.md``). ``o`` is the *internal* offset of an :class:`Encoding`
(``x = (q + o) * scale`` on its grid ``[qmin, qmax]``)::

    legacy offset  L  = o + qmin                0.6.1, 1.0.0, _torch.encodings (unsigned view)
    zero point     zp = -o                      2.0.0 (ONNX QuantizeLinear), omitted when 0
                      = -L             uintB    (asymmetric, unsigned symmetric)
                      = -L - 2^(b-1)   intB     (full signed grid: 0 for symmetric)

Strict symmetric is written as intB with zero point 0 too (2.0.0 has no strict flag).

Every document is validated against ``schemas/encodings.schema.json`` before it is written and
after it is read; errors are :class:`~quantsim.errors.EncodingsError` naming the file and the
JSON path.

Example:
    >>> import torch
    >>> from quantsim.encoding import Encoding
    >>> enc = Encoding(8, torch.tensor(0.5), torch.tensor(-128.0))
    >>> to_entry(enc, "input", "2.0.0")
    {'name': 'input', 'output_dtype': 'uint8', 'y_scale': 0.5, 'y_zero_point': 128}
    >>> from_entry(to_entry(enc, "input", "1.0.0"), "1.0.0") == enc
    True
"""
from __future__ import annotations

import functools
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from jsonschema import Draft202012Validator

from quantsim.atomic import atomic_write_text
from quantsim.encoding import INT_BITWIDTHS, Encoding
from quantsim.errors import EncodingsError, QuantizationSettingError

logger = logging.getLogger(__name__)

#: Versions quantsim reads and writes.
VERSIONS: Tuple[str, ...] = ("0.6.1", "1.0.0", "2.0.0")
#: Version written when none is given (aimet-torch 2.x default).
DEFAULT_VERSION = "1.0.0"
#: Layout name of the module-keyed ``_torch.encodings`` file (returned by :func:`detect_layout`).
TORCH_LAYOUT = "torch"
#: Bitwidths with a 2.0.0 ``output_dtype`` (``int32`` is for biases only).
ONNX_BITWIDTHS: Tuple[int, ...] = (4, 8, 16)
#: Floor of a statistical int32 bias scale (smallest normal float32), so zero biases stay valid.
BIAS_SCALE_FLOOR: float = float(torch.finfo(torch.float32).tiny)

SCHEMA_PATH = Path(__file__).with_name("schemas") / "encodings.schema.json"
PathLike = Union[str, "os.PathLike[str]"]
AnyEncoding = Union[Encoding, "Int32BiasEncoding"]


# ----------------------------------------------------------------------------------------------
# int32 bias encodings (2.0.0 export only; FORMATS §2.9)
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Int32BiasEncoding:
    """Symmetric int32 encoding of a bias, written for the runtime (not simulated).

    Grid ``[-2^31, 2^31 - 1]``, zero point 0 (legacy offset ``-2^31``); ``scale`` is a float32
    0-d tensor (per tensor) or ``(C,)`` along ``axis`` (per channel).

    Example:
        >>> b = Int32BiasEncoding.from_scales(0.5, torch.tensor([0.25, 0.125]))
        >>> b.scale.tolist(), b.axis
        ([0.125, 0.0625], 0)
    """

    scale: torch.Tensor
    axis: Optional[int] = None

    bitwidth = 32
    qmin = -(2**31)
    qmax = 2**31 - 1
    legacy_offset = -(2**31)

    def __post_init__(self) -> None:
        scale = torch.as_tensor(self.scale, dtype=torch.float32).detach().cpu()
        if scale.dim() > 1 or (scale.dim() == 1 and self.axis is None):
            raise EncodingsError(
                f"int32 bias: scale must be 0-d or 1-d with an axis, got shape {tuple(scale.shape)}"
            )
        if not bool(torch.all(scale > 0)) or not bool(torch.all(torch.isfinite(scale))):
            raise EncodingsError(
                f"int32 bias: every scale must be finite and > 0, got {scale.tolist()[:4]}"
            )
        object.__setattr__(self, "scale", scale)

    @property
    def per_channel(self) -> bool:
        """True when there is one scale per channel."""
        return self.scale.dim() == 1

    @classmethod
    def from_scales(cls, input_scale: Any, weight_scale: Any, axis: int = 0) -> "Int32BiasEncoding":
        """Analytic rule: ``scale[c] = input_scale * weight_scale[c]`` in float32.

        Args:
            input_scale: per-tensor scale of the layer input (float, 0-d tensor or Encoding).
            weight_scale: weight scale(s) (float, 0-d/1-d tensor or Encoding); per channel when 1-d.
            axis: channel axis of the bias (always 0 for a 1-d bias).
        """
        s_in = torch.as_tensor(getattr(input_scale, "scale", input_scale), dtype=torch.float32)
        s_w = torch.as_tensor(getattr(weight_scale, "scale", weight_scale), dtype=torch.float32)
        if s_in.numel() != 1:
            raise EncodingsError(
                f"int32 bias: the input encoding must be per tensor, got {s_in.numel()} scales"
            )
        scale = s_in.reshape(()) * s_w
        return cls(scale, axis if scale.dim() == 1 else None)

    @classmethod
    def from_bias(cls, bias: torch.Tensor, per_channel: bool = True,
                  axis: int = 0) -> "Int32BiasEncoding":
        """Statistical fallback: ``scale = max(|bias| / 2^31, floor)``.

        Per tensor (``per_channel=False``) the largest ``|bias|`` over channels is used.
        """
        mag = torch.as_tensor(bias, dtype=torch.float32).detach().abs().reshape(-1)
        if not per_channel:
            mag = mag.max() if mag.numel() else torch.tensor(0.0)
        scale = (mag / 2.0**31).clamp(min=BIAS_SCALE_FLOOR)
        return cls(scale, axis if scale.dim() == 1 else None)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Int32BiasEncoding):
            return NotImplemented
        return self.axis == other.axis and self.scale.tolist() == other.scale.tolist()

    def __repr__(self) -> str:
        return f"Int32BiasEncoding({self.scale.numel()} scale(s), axis={self.axis})"


# ----------------------------------------------------------------------------------------------
# the file
# ----------------------------------------------------------------------------------------------
@dataclass
class EncodingsFile:
    """Contents of one encodings file, independent of its version.

    Attributes:
        version: version the file was read as (or is meant to be written as).
        activation: ONNX tensor name -> encoding.
        param: PyTorch parameter name (``conv1.weight``) -> encoding.
        bias: parameter name -> int32 bias encoding (export only; 2.0.0 by default).
        excluded_layers: module names excluded from quantization.
        quantizer_args: global settings (see :func:`quantizer_args`); None when absent.
        producer: ``{"package", "version"}``; None -> quantsim's when written.
        module_activation: ``_torch.encodings`` layout: module name -> ``{"input"|"output":
            {index: encoding}}``.
        torch_layout: True when read from a module-keyed ``_torch.encodings`` file.

    Example:
        >>> f = EncodingsFile(activation={"input": Encoding.float16()})
        >>> to_json_dict(f, "1.0.0")["activation_encodings"]
        [{'bw': 16, 'dtype': 'FLOAT', 'enc_type': 'PER_TENSOR', 'name': 'input'}]
    """

    version: str = DEFAULT_VERSION
    activation: Dict[str, Encoding] = field(default_factory=dict)
    param: Dict[str, Encoding] = field(default_factory=dict)
    bias: Dict[str, Int32BiasEncoding] = field(default_factory=dict)
    excluded_layers: List[str] = field(default_factory=list)
    quantizer_args: Optional[Dict[str, Any]] = None
    producer: Optional[Dict[str, str]] = None
    module_activation: Dict[str, Dict[str, Dict[int, Encoding]]] = field(default_factory=dict)
    torch_layout: bool = False


# ----------------------------------------------------------------------------------------------
# Encoding <-> entries
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
        EncodingsError: malformed, or a kind quantsim does not simulate (LPBQ, per-block,
            2.1.0 meta ``y_scale``, float8, int2, 32-bit non-bias).
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
    return {"bw": enc.bitwidth, "dtype": "INT",
            "enc_type": "PER_CHANNEL" if enc.per_channel else "PER_TENSOR",
            "is_sym": bool(enc.symmetric), "name": name,
            "offset": _legacy_offsets(enc, where), "scale": _floats(enc.scale)}


def _entry_2_0_0(enc: AnyEncoding, name: str, where: str) -> Dict[str, Any]:
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


# -- reading entries ---------------------------------------------------------------------------
def _as_bool(value: Any) -> bool:
    return value if isinstance(value, bool) else value == "True"


def _int_encoding(bitwidth: int, scales: Sequence[float], offsets: Sequence[int], symmetric: bool,
                  per_channel: bool, axis: Optional[int], where: str) -> AnyEncoding:
    """Rebuild an integer encoding from unsigned-view (legacy) offsets."""
    offsets = [int(o) for o in offsets]
    if len(scales) != len(offsets):
        raise EncodingsError(f"{where}: {len(scales)} scales but {len(offsets)} offsets")
    bad = [(i, s) for i, s in enumerate(scales) if not 0 < float(s) < float("inf")]
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
    return _make(Encoding, where, bitwidth, _tensor(scales, per_channel),
                 _tensor(offsets, per_channel), symmetric, strict, unsigned, axis, "int")


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
            f"{where}: integer bitwidth {bitwidth} is not supported; allowed: "
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
    if enc_type in ("PER_BLOCK", "LPBQ"):
        raise EncodingsError(
            f"{where}: enc_type {enc_type!r} is not supported; quantsim reads PER_TENSOR and "
            "PER_CHANNEL"
        )
    if entry["dtype"] == "FLOAT":
        return _read_float(entry["bw"], where)
    if enc_type == "PER_TENSOR" and len(entry["scale"]) != 1:
        raise EncodingsError(
            f"{where}: PER_TENSOR needs exactly one scale, got {len(entry['scale'])}"
        )
    return _int_encoding(entry["bw"], entry["scale"], entry["offset"], _as_bool(entry["is_sym"]),
                         enc_type == "PER_CHANNEL", axis, where)


_ONNX_INT = re.compile(r"(u?)int([0-9]+)")


def _read_2_0_0(entry: Dict[str, Any], where: str) -> AnyEncoding:
    if "per_block_int_scale" in entry or "per_channel_float_scale" in entry:
        raise EncodingsError(f"{where}: LPBQ encodings (per_block_int_scale) are not supported")
    y_scale = entry.get("y_scale")
    if isinstance(y_scale, dict):
        raise EncodingsError(
            f"{where}: y_scale is a 2.1.0 meta encoding (double-quantized scale, LPBQ/NVFP4); "
            "not supported - quantsim reads per-tensor and per-channel 2.0.0 entries"
        )
    nested = isinstance(y_scale, list) and any(isinstance(v, list) for v in y_scale)
    if "block_size" in entry or nested:
        raise EncodingsError(f"{where}: per-block encodings (block_size) are not supported")
    dtype = entry["output_dtype"]
    match = _ONNX_INT.fullmatch(dtype)
    if match is None:
        raise EncodingsError(f"{where}: output_dtype {dtype!r} is not supported; quantsim reads "
                             "int4/uint4/int8/uint8/int16/uint16 and int32 (biases)")
    unsigned, b = bool(match.group(1)), int(match.group(2))
    axis = entry.get("axis")
    scales = y_scale if isinstance(y_scale, list) else [y_scale]
    if axis is None and len(scales) != 1:
        raise EncodingsError(f"{where}: a list y_scale of {len(scales)} values needs 'axis'")
    per_channel = axis is not None
    zp = entry.get("y_zero_point", 0)
    zps = zp if isinstance(zp, list) else [zp] * len(scales)
    if len(zps) != len(scales) or any(isinstance(z, list) or not float(z).is_integer()
                                      for z in zps):
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
            f"{where}: y_zero_point {zps[:4]} out of the {dtype} range [{lo}, {hi}]"
        )
    # signed with zero point 0 -> signed symmetric; otherwise asymmetric on the unsigned view
    symmetric = not unsigned and not any(zps)
    legacy = [-z for z in zps] if unsigned else [-z - half for z in zps]
    return _int_encoding(b, scales, legacy, symmetric, per_channel, axis, where)


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
            doc["encodings"].append(_entry_2_0_0(e, _name(n, "encodings"), f"encodings[{n!r}]"))
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


# -- loading -----------------------------------------------------------------------------------
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


def detect_layout(doc: Any, label: str = "<dict>") -> str:
    """Return ``'0.6.1'``, ``'1.0.0'``, ``'2.0.0'`` or ``'torch'`` for a parsed document.

    Raises:
        EncodingsError: not an object, an unknown ``version``, or a version that contradicts
            the shape.
    """
    if not isinstance(doc, dict):
        raise EncodingsError(f"{label}: expected a JSON object at the top level, got {_short(doc)}")
    version = doc.get("version")
    if version is not None and version not in VERSIONS:
        raise EncodingsError(f"{label}: version: unknown encodings version {_short(version)}; "
                             f"allowed: {', '.join(VERSIONS)}")
    acts, params = doc.get("activation_encodings"), doc.get("param_encodings")
    if "encodings" in doc:
        layout = "2.0.0"
    elif isinstance(acts, dict) or isinstance(params, dict):
        nested = isinstance(acts, dict) and any(isinstance(v, dict) for v in acts.values())
        layout = TORCH_LAYOUT if nested or version in ("1.0.0", "2.0.0") else "0.6.1"
    elif isinstance(acts, list) or isinstance(params, list):
        layout = "1.0.0"
    else:
        raise EncodingsError(f"{label}: cannot tell the layout: expected 'encodings' (2.0.0) or "
                             "'activation_encodings' and 'param_encodings' (0.6.1, 1.0.0, _torch)")
    if version is not None and layout != TORCH_LAYOUT and version != layout:
        raise EncodingsError(f"{label}: version says {version} but the layout is that of {layout}")
    return layout


def _read_source(source: Union[PathLike, Mapping[str, Any]]) -> Tuple[Any, str]:
    if not isinstance(source, (str, os.PathLike)):
        return (dict(source) if isinstance(source, Mapping) else source), "<dict>"
    label = str(source)

    def reject(constant: str) -> None:
        raise EncodingsError(f"{label}: {constant} is not valid JSON (non-finite number)")

    try:
        with open(source, encoding="utf-8") as fh:
            return json.load(fh, parse_constant=reject), label
    except OSError as exc:
        raise EncodingsError(f"{label}: cannot read: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise EncodingsError(f"{label}: not valid JSON: {exc.msg} (line {exc.lineno}, "
                             f"column {exc.colno})") from None


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


# ----------------------------------------------------------------------------------------------
# schema validation with readable errors
# ----------------------------------------------------------------------------------------------
_LAYOUT_DEFS = {"0.6.1": "file_0_6_1", "1.0.0": "file_1_0_0", "2.0.0": "file_2_0_0",
                TORCH_LAYOUT: "file_torch"}


@functools.lru_cache(maxsize=None)
def schema() -> Dict[str, Any]:
    """The encodings JSON Schema (``schemas/encodings.schema.json``) as a dict."""
    with open(SCHEMA_PATH, encoding="utf-8") as fh:
        return json.load(fh)


@functools.lru_cache(maxsize=None)
def _validator(definition: Optional[str]) -> Draft202012Validator:
    full = schema()
    if definition is None:
        return Draft202012Validator(full)
    return Draft202012Validator({"$schema": full["$schema"], "$defs": full["$defs"],
                                 "$ref": f"#/$defs/{definition}"})


def validate(doc: Any, layout: Optional[str] = None, source: str = "<dict>") -> None:
    """Validate a parsed document against the schema (of ``layout`` if given, else detected).

    Raises:
        EncodingsError: ``"<source>: <json path>: <what was expected>, got <value>"``.
    """
    _validate(doc, layout or detect_layout(doc, source), source)


def _validate(doc: Any, layout: str, source: str) -> None:
    _validate_against(doc, _LAYOUT_DEFS[layout], source)


def _validate_against(doc: Any, definition: str, source: str) -> None:
    errors = list(_validator(definition).iter_errors(doc))
    if errors:
        err = min(errors, key=lambda e: len(e.absolute_path))
        path, message = _explain(err)
        raise EncodingsError(f"{source}: {path}: {message}")


def _explain(err: Any) -> Tuple[str, str]:
    while err.validator in ("anyOf", "oneOf") and err.context:
        deeper = [e for e in err.context if len(e.absolute_path) > len(err.absolute_path)]
        if not deeper:
            break
        err = max(deeper, key=lambda e: len(e.absolute_path))
    path = _json_path(err.absolute_path)
    kind, value, inst, sch = err.validator, err.validator_value, err.instance, err.schema
    if kind == "required":
        missing = [k for k in value if k not in inst]
        return path, f"missing required key {missing[0]!r}"
    if kind == "dependentRequired":
        for key, needed in value.items():
            missing = [k for k in needed if key in inst and k not in inst]
            if missing:
                return path, f"missing key {missing[0]!r} (required with {key!r})"
    if kind == "additionalProperties" and value is False:
        extra = sorted(k for k in inst if k not in sch.get("properties", {}))
        return path, f"unknown key {extra[0]!r}; allowed: {', '.join(sch.get('properties', {}))}"
    if kind == "pattern" and "propertyNames" in err.schema_path:
        return path, f"key {_short(inst)} is not an index (expected digits: '0', '1', ...)"
    if kind in ("type", "anyOf", "oneOf", "enum", "const"):
        return path, f"expected {_describe(sch)}, got {_short(inst)}"
    if kind in ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum"):
        return path, f"{_short(inst)} is out of range ({kind} {value})"
    if kind == "minItems":
        return path, f"expected at least {value} item(s), got {_short(inst)}"
    if kind == "minLength":
        return path, f"expected a non-empty string, got {_short(inst)}"
    return path, err.message


_NOUNS = {"number": "a number", "integer": "an integer", "string": "a string",
          "boolean": "a boolean", "object": "an object", "array": "a list", "null": "null"}
_PLURALS = {"a number": "numbers", "an integer": "integers", "a string": "strings",
            "a boolean": "booleans", "an object": "objects"}


def _describe(sch: Dict[str, Any]) -> str:
    """Short human text for what a (sub)schema accepts (its ``title`` when it has one)."""
    if "title" in sch:
        return sch["title"]
    if "$ref" in sch:
        return _describe(schema()["$defs"][sch["$ref"].rsplit("/", 1)[-1]])
    if "const" in sch:
        return repr(sch["const"])
    if "enum" in sch:
        return "one of " + ", ".join(repr(v) for v in sch["enum"])
    for key in ("anyOf", "oneOf"):
        if key in sch:
            return " or ".join(_describe(s) for s in sch[key])
    kind = sch.get("type")
    if kind == "array" and isinstance(sch.get("items"), dict):
        inner = _describe(sch["items"])
        return f"a list of {_PLURALS.get(inner, inner)}"
    return _NOUNS.get(kind, "a valid value") if isinstance(kind, str) else "a valid value"


def _json_path(parts: Iterable[Any]) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else _key(part, first=not out)
    return out or "(top level)"


def _key(key: Any, first: bool = False) -> str:
    if isinstance(key, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
        return key if first else f".{key}"
    return f"[{key!r}]"


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_version(version: Any, where: str) -> None:
    if version not in VERSIONS:
        raise EncodingsError(f"{where}: unknown encodings version {_short(version)}; "
                             f"allowed: {', '.join(VERSIONS)}")


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
