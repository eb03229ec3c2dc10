"""What the encodings reader and writer share: the formats' vocabulary and their schema.

Versions and layout names, the in-memory file (:class:`EncodingsFile`, :class:`Int32BiasEncoding`),
layout detection (:func:`detect_layout`) and schema validation. Every document is validated
against ``schemas/encodings.schema.json`` before it is written and after it is read; errors are
:class:`~quantsim.errors.EncodingsError` naming the file and the JSON path.
"""
from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple, Union

import torch
from jsonschema import Draft202012Validator

from quantsim.encoding import Encoding
from quantsim.errors import EncodingsError

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

SCHEMA_PATH = Path(__file__).parent.with_name("schemas") / "encodings.schema.json"
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
        param_ranks: parameter name -> its tensor's rank (export); 2.0.0 per-block entries are
            written with that many dimensions, as aimet-torch writes them (a Conv2d weight's
            ``(C, blocks, 1, 1)``); 2 where absent.

    Example:
        >>> from quantsim.encodings import to_json_dict
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
    param_ranks: Dict[str, int] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------
# layouts and schema validation with readable errors
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


def validate(doc: Any, layout: Optional[str] = None, source: str = "<dict>") -> None:
    """Validate a parsed document against the schema (of ``layout`` if given, else detected).

    Raises:
        EncodingsError: ``"<source>: <json path>: <what was expected>, got <value>"``.
    """
    _validate(doc, layout or detect_layout(doc, source), source)


def schema_problems(doc: Any, layout: Optional[str] = None) -> List[str]:
    """Every schema violation of a parsed document, as ``"<json path>: <what was expected>,
    got <value>"``, ordered by path, each once (``[]``: the document fits the schema).

    Args:
        doc: the parsed JSON document.
        layout: ``'0.6.1'``, ``'1.0.0'``, ``'2.0.0'`` or ``'torch'``; detected when None.

    Raises:
        EncodingsError: the layout cannot be detected (:func:`detect_layout`).
    """
    validator = _validator(_LAYOUT_DEFS[layout or detect_layout(doc)])
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    return list(dict.fromkeys(": ".join(_explain(e)) for e in errors))


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
    try:
        text = repr(value)
    except ValueError:  # an int (or a container of one) beyond str()'s digit limit
        text = f"<a number too long to print, type {type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_version(version: Any, where: str) -> None:
    if version not in VERSIONS:
        raise EncodingsError(f"{where}: unknown encodings version {_short(version)}; "
                             f"allowed: {', '.join(VERSIONS)}")
