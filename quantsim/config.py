"""Hardware config files: load, check and type them.

A hardware config (AIMET's format, ``docs/config.md``) says which quantizers a target runtime
has. :func:`load_config` reads one from a path, a built-in name or a dict, checks it against
``schemas/quantsim_config.schema.json`` (the one definition of the format) and against the
rules AIMET adds on top, and returns a :class:`HardwareConfig` of frozen dataclasses.

Booleans may be written as AIMET's strings ``"True"``/``"False"`` or as JSON ``true``/``false``;
they become real bools here, once, and nothing downstream sees a string. A key left out of the
file is ``None`` in the result, never ``False``: an absent key keeps the value of the level below
(precedence: defaults < params < op_type < supergroups < model_input < model_output).

Example:
    >>> cfg = load_config("per_channel")
    >>> cfg.op_type["Conv"].per_channel_quantization, cfg.params["bias"].is_quantized
    (True, False)
    >>> cfg.defaults.params.is_symmetric, cfg.defaults.ops.is_symmetric
    (True, None)
"""
from __future__ import annotations

import difflib
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import jsonschema
from jsonschema.exceptions import ValidationError, best_match

from quantsim import op_types
from quantsim.errors import ConfigError

_PACKAGE_DIR = Path(__file__).resolve().parent
#: The JSON Schema (2020-12) of the config format.
SCHEMA_PATH: Path = _PACKAGE_DIR / "schemas" / "quantsim_config.schema.json"
#: Names accepted by :func:`load_config` instead of a path, and the files they load.
BUILTIN_CONFIGS: Dict[str, Path] = {
    "default": _PACKAGE_DIR / "configs" / "default.json",
    "per_channel": _PACKAGE_DIR / "configs" / "per_channel.json",
    "htp": _PACKAGE_DIR / "configs" / "htp.json",
}
#: What ``load_config(None)`` loads: per-channel weights, as aimet-torch 2.x without a file.
DEFAULT_CONFIG: str = "per_channel"
#: ``supergroup_pass_list`` entries quantsim knows; others give a :class:`ConfigWarning`.
KNOWN_SUPERGROUP_PASSES: Tuple[str, ...] = ("MatmulAdd", "LayerNormalization", "RMSNormalization")


class ConfigWarning(UserWarning):
    """A config loads, but part of it will have no effect (unknown op type or pass name)."""


# ----------------------------------------------------------------------------------------------
# typed result
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ParamConfig:
    """Parameter-quantizer settings (``defaults.params``, ``params.<kind>``, ``op_type.*.params``).

    ``None`` means the key is absent and the lower level's value stays. ``block_size`` and
    ``decompressed_bw`` are quantsim's extension for per-block (LPBQ) weights
    (``docs/config.md``).
    """

    is_quantized: Optional[bool] = None
    is_symmetric: Optional[bool] = None
    block_size: Optional[int] = None
    decompressed_bw: Optional[int] = None


@dataclass(frozen=True)
class OpDefaults:
    """``defaults.ops``: activation-quantizer defaults. ``is_output_quantized`` is True or None."""

    is_output_quantized: Optional[bool] = None
    is_symmetric: Optional[bool] = None


@dataclass(frozen=True)
class KernelSpec:
    """A data type (``'int'`` or ``'float'``) and bitwidth from ``supported_kernels``."""

    bitwidth: int
    dtype: str


@dataclass(frozen=True)
class SupportedKernel:
    """One ``supported_kernels`` entry; ``param`` is None where an op-level entry omits it."""

    activation: KernelSpec
    param: Optional[KernelSpec] = None


@dataclass(frozen=True)
class EncodingConstraints:
    """Fixed output range of an op type; ``max`` None fixes only the lower end."""

    min: float
    max: Optional[float] = None


@dataclass(frozen=True)
class DefaultsConfig:
    """Level 1, ``defaults``: applies to every quantizer. ``None`` = key absent."""

    ops: OpDefaults = OpDefaults()
    params: ParamConfig = ParamConfig()
    strict_symmetric: Optional[bool] = None
    unsigned_symmetric: Optional[bool] = None
    per_channel_quantization: Optional[bool] = None
    supported_kernels: Tuple[SupportedKernel, ...] = ()
    hw_version: Optional[str] = None


@dataclass(frozen=True)
class OpTypeConfig:
    """Level 3, ``op_type.<ONNX type>``. ``None`` = key absent.

    ``is_input_quantized`` is True or None (False is rejected at load).
    """

    is_input_quantized: Optional[bool] = None
    is_output_quantized: Optional[bool] = None
    is_symmetric: Optional[bool] = None
    per_channel_quantization: Optional[bool] = None
    params: Dict[str, ParamConfig] = field(default_factory=dict)
    supported_kernels: Tuple[SupportedKernel, ...] = ()
    encoding_constraints: Optional[EncodingConstraints] = None


@dataclass(frozen=True)
class HardwareConfig:
    """A checked hardware config with real bools. Treat the dicts and lists as read-only.

    Attributes:
        defaults: level 1.
        params: level 2, per parameter kind (``'weight'``, ``'bias'``).
        op_type: level 3, per ONNX op type name.
        supergroups: level 4, fused chains of ONNX op types, in file order.
        model_input: level 5, True if model inputs are quantized (``model_input`` ``{}`` gives
            False: no change).
        model_output: level 6: True enables, False disables (a quantsim extension: AIMET only
            accepts True) the output quantizers of model outputs; None (``{}``): no change.
        supergroup_pass_list: named fusion passes (``[]`` when the key is absent).
        source: where it came from (a path, ``builtin:<name>`` or ``<dict>``); not compared.
    """

    defaults: DefaultsConfig
    params: Dict[str, ParamConfig]
    op_type: Dict[str, OpTypeConfig]
    supergroups: List[Tuple[str, ...]]
    model_input: bool
    model_output: Optional[bool]
    supergroup_pass_list: List[str] = field(default_factory=list)
    source: str = field(default="<dict>", compare=False)


ConfigSource = Union[str, "os.PathLike[str]", Mapping[str, Any], HardwareConfig, None]


# ----------------------------------------------------------------------------------------------
# loading
# ----------------------------------------------------------------------------------------------
def load_config(source: ConfigSource = None) -> HardwareConfig:
    """Read, check and type a hardware config.

    Args:
        source: a path (``str`` or ``Path``), a built-in name (``'default'``, ``'per_channel'``,
            ``'htp'``; a ``str`` equal to one is never taken as a path), a dict in the file's
            format, an already loaded :class:`HardwareConfig` (returned as is), or None for
            :data:`DEFAULT_CONFIG`.

    Returns:
        The typed config.

    Raises:
        ConfigError: the file is missing or not JSON, or the config breaks the schema or one of
            AIMET's rules. Each problem is one line ``<file>: <json.path>: <message>``; schema
            problems come all at once, the most likely cause first.

    Warns:
        ConfigWarning: an ``op_type`` key or a ``supergroup_pass_list`` entry quantsim does not
            know (it has no effect), or a key repeated inside one JSON object.
    """
    if isinstance(source, HardwareConfig):
        return source
    label, data = _read(DEFAULT_CONFIG if source is None else source)
    _check_schema(data, label)
    problems = _semantic_problems(data, label)
    if problems:
        raise ConfigError("\n".join(problems))
    _warn_unknown_names(data, label)
    return _build(data, label)


def read_config_document(source: ConfigSource = None) -> Dict[str, Any]:
    """The JSON document of a config source as written (no validation, string booleans kept):
    what a checkpoint stores so that :func:`load_config` can rebuild the same config."""
    return _read(DEFAULT_CONFIG if source is None else source)[1]


@lru_cache(maxsize=1)
def _schema_text() -> str:
    return SCHEMA_PATH.read_text(encoding="utf-8")


def config_schema() -> Dict[str, Any]:
    """A fresh copy of the config JSON Schema (draft 2020-12)."""
    return json.loads(_schema_text())


@lru_cache(maxsize=1)
def _validator() -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(config_schema())


def _read(source: Any) -> Tuple[str, Any]:
    """The label used in messages and the parsed JSON value of ``source``."""
    if isinstance(source, Mapping):
        try:
            return "<dict>", json.loads(json.dumps(source))
        except (TypeError, ValueError) as err:
            raise ConfigError(f"<dict>: not JSON-serialisable: {err}") from err
        except RecursionError as err:
            raise ConfigError(f"<dict>: nested too deeply to be a config ({_DEPTH_HINT})") from err
    if isinstance(source, str) and source in BUILTIN_CONFIGS:
        return f"builtin:{source}", _parse(BUILTIN_CONFIGS[source], f"builtin:{source}")
    if not isinstance(source, (str, os.PathLike)):
        raise ConfigError(
            f"config source must be a path, a built-in name ({_builtin_names()}) or a dict, "
            f"got {type(source).__name__}"
        )
    path = Path(source)
    try:
        is_file = path.is_file()
    except OSError as err:  # a name too long for the file system, a loop of links
        raise ConfigError(f"config file cannot be opened: {_short_path(source)}: "
                          f"{err.strerror or err}") from err
    if not is_file:
        what = "is a directory, not a file" if path.is_dir() else "not found"
        hint = _did_you_mean(path.stem, BUILTIN_CONFIGS)
        raise ConfigError(
            f"config file {what}: {source}{hint}; built-in configs (pass the name instead of a "
            f"path): {_builtin_names()}"
        )
    return str(source), _parse(path, str(source))


#: how deep a config nests, for the message about one that nests far deeper
_DEPTH_HINT = "a hardware config nests a few levels"


def _short_path(source: Any) -> str:
    text = os.fsdecode(source)
    return text if len(text) <= 120 else f"{text[:100]}... ({len(text)} characters)"


def _builtin_names() -> str:
    return ", ".join(sorted(BUILTIN_CONFIGS))


def _parse(path: Path, label: str) -> Any:
    duplicates: List[str] = []

    def pairs(items: List[Tuple[str, Any]]) -> Dict[str, Any]:
        keys = [k for k, _ in items]
        duplicates.extend(sorted({k for k in keys if keys.count(k) > 1}))
        return dict(items)

    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{label}: cannot read config file: {err}") from err
    try:
        data = json.loads(text, object_pairs_hook=pairs)
    except json.JSONDecodeError as err:
        raise ConfigError(
            f"{label}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}"
        ) from err
    except RecursionError as err:
        raise ConfigError(f"{label}: JSON nested too deeply to read ({_DEPTH_HINT})") from err
    except ValueError as err:  # Python's limit on the digits of an integer
        raise ConfigError(f"{label}: a number in the file cannot be read: {err}") from err
    for key in duplicates:
        _warn(f"{label}: key {key!r} appears twice in one JSON object; the last value is used")
    return data


# ----------------------------------------------------------------------------------------------
# checking
# ----------------------------------------------------------------------------------------------
def _check_schema(data: Any, label: str) -> None:
    errors = list(_validator().iter_errors(data))
    if not errors:
        return
    first = best_match(errors)
    rest = sorted(
        (e for e in errors if e is not first), key=lambda e: (_path(e.absolute_path), e.message)
    )
    lines = [line for err in [first, *rest] for line in _describe(err, label)]
    if len(lines) > 1:
        lines[1:] = [f"{len(lines) - 1} more problem(s):"] + ["  " + line for line in lines[1:]]
    raise ConfigError("\n".join(lines))


def _describe(err: ValidationError, label: str) -> List[str]:
    """One ``<file>: <json.path>: <message>`` line per problem in ``err``."""
    where = list(err.absolute_path)
    if err.validator == "additionalProperties" and err.validator_value is False:
        allowed = sorted(err.schema.get("properties", {}))
        return [
            f"{label}: {_path(where + [key])}: unknown key {key!r} at {_path(where)}; "
            f"allowed: {', '.join(allowed)}{_did_you_mean(key, allowed)}"
            for key in sorted(set(err.instance) - set(allowed))
        ]
    if err.validator == "minItems":
        return [
            f"{label}: {_path(where)}: {_show(err.instance)} has {len(err.instance)} item(s); "
            f"at least {err.validator_value} required"
        ]
    if err.validator == "enum":
        options = ", ".join(_show(v) for v in err.validator_value)
        return [f"{label}: {_path(where)}: {_show(err.instance)} is not one of [{options}]"]
    return [f"{label}: {_path(where)}: {err.message}"]


def _semantic_problems(data: Dict[str, Any], label: str) -> List[str]:
    """AIMET's rules beyond the schema, on schema-valid data; one line per problem."""
    out: List[str] = []
    only_true = "only True is supported (as in AIMET); set it to True or leave the key out"
    ops = data["defaults"]["ops"]
    if "is_input_quantized" in ops:
        out.append(
            f"{label}: defaults.ops.is_input_quantized: not supported in defaults (as in AIMET); "
            "enable input quantizers per op type (op_type.<name>.is_input_quantized) or for "
            "model inputs (model_input.is_input_quantized)"
        )
    if _flag(ops.get("is_output_quantized")) is False:
        out.append(
            f"{label}: defaults.ops.is_output_quantized: False: {only_true} (absent leaves "
            "outputs unquantized; op_type.<name>.is_output_quantized disables one op type)"
        )
    out += _kernel_problems(data["defaults"].get("supported_kernels", ()), "defaults", label)
    param_levels = [("defaults.params", data["defaults"]["params"])]
    param_levels += [(f"params.{k}", v) for k, v in data["params"].items()]
    param_levels += [(f"op_type.{n}.params.{k}", v) for n, op in data["op_type"].items()
                     for k, v in op.get("params", {}).items()]
    for where, param in param_levels:
        if "decompressed_bw" in param and "block_size" not in param:
            out.append(f"{label}: {where}.decompressed_bw: LPBQ needs block_size in the same "
                       "entry (per-block weights)")
    for name, op in data["op_type"].items():
        where = f"op_type.{name}"
        if _flag(op.get("is_input_quantized")) is False:
            out.append(f"{label}: {where}.is_input_quantized: False: {only_true}")
        out += _kernel_problems(op.get("supported_kernels", ()), where, label)
        out += _constraint_problems(op.get("encoding_constraints"), where, label)
    if _flag(data["model_input"].get("is_input_quantized")) is False:
        out.append(f"{label}: model_input.is_input_quantized: False: {only_true}")
    known = op_types.KNOWN_ONNX_TYPES
    for i, group in enumerate(data["supergroups"]):
        for j, name in enumerate(group["op_list"]):
            if name not in known:
                out.append(
                    f"{label}: supergroups[{i}].op_list[{j}]: unknown op type {name!r}"
                    f"{_op_hint(name)}; supergroup entries must be ONNX op types known to "
                    "quantsim.op_types (KNOWN_ONNX_TYPES; add one with register_op_type)"
                )
    return out


def _kernel_problems(kernels: Sequence[Dict[str, Any]], where: str, label: str) -> List[str]:
    out = []
    for i, kernel in enumerate(kernels):
        for role in ("activation", "param"):
            spec = kernel.get(role)
            if spec and spec["dtype"] == "float" and spec["bitwidth"] not in (16, 32):
                out.append(
                    f"{label}: {where}.supported_kernels[{i}].{role}.bitwidth: float kernels "
                    f"must have bitwidth 16 or 32, got {spec['bitwidth']}"
                )
    return out


def _constraint_problems(
    constraints: Optional[Dict[str, float]], where: str, label: str
) -> List[str]:
    if constraints is None:
        return []
    low, high = constraints["min"], constraints.get("max")
    path = f"{label}: {where}.encoding_constraints"
    if not all(_finite(v) for v in (low, high) if v is not None):
        return [f"{path}: min and max must be finite numbers, got min={low}, max={high}"]
    if high is not None and low >= high:
        return [f"{path}: min ({low}) must be less than max ({high})"]
    return []


def _finite(value: float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond float range
        return False


def _warn_unknown_names(data: Dict[str, Any], label: str) -> None:
    for name in data["op_type"]:
        if name not in op_types.KNOWN_ONNX_TYPES:
            _warn(
                f"{label}: op_type.{name}: unknown op type {name!r}{_op_hint(name)}; it matches no "
                "module unless one is registered with quantsim.op_types.register_op_type"
            )
    for i, name in enumerate(data.get("supergroup_pass_list", ())):
        if name not in KNOWN_SUPERGROUP_PASSES:
            _warn(
                f"{label}: supergroup_pass_list[{i}]: unknown pass {name!r}"
                f"{_did_you_mean(name, KNOWN_SUPERGROUP_PASSES)}; it is ignored. Known passes: "
                f"{', '.join(KNOWN_SUPERGROUP_PASSES)}"
            )


def _warn(message: str) -> None:
    warnings.warn(message, ConfigWarning, stacklevel=4)


# ----------------------------------------------------------------------------------------------
# building the typed config (the one place where "True"/"False" become bools)
# ----------------------------------------------------------------------------------------------
def _flag(value: Union[str, bool, None]) -> Optional[bool]:
    """``"True"``/``True`` -> True, ``"False"``/``False`` -> False, absent -> None."""
    return None if value is None else value in ("True", True)


def _param(d: Mapping[str, Any]) -> ParamConfig:
    return ParamConfig(_flag(d.get("is_quantized")), _flag(d.get("is_symmetric")),
                       d.get("block_size"), d.get("decompressed_bw"))


def _kernels(entries: Iterable[Mapping[str, Any]]) -> Tuple[SupportedKernel, ...]:
    def spec(d: Optional[Mapping[str, Any]]) -> Optional[KernelSpec]:
        return None if d is None else KernelSpec(int(d["bitwidth"]), d["dtype"])

    return tuple(SupportedKernel(spec(e["activation"]), spec(e.get("param"))) for e in entries)


def _op_type(d: Mapping[str, Any]) -> OpTypeConfig:
    ec = d.get("encoding_constraints")
    return OpTypeConfig(
        is_input_quantized=_flag(d.get("is_input_quantized")),
        is_output_quantized=_flag(d.get("is_output_quantized")),
        is_symmetric=_flag(d.get("is_symmetric")),
        per_channel_quantization=_flag(d.get("per_channel_quantization")),
        params={k: _param(v) for k, v in d.get("params", {}).items()},
        supported_kernels=_kernels(d.get("supported_kernels", ())),
        encoding_constraints=None if ec is None else EncodingConstraints(
            float(ec["min"]), None if ec.get("max") is None else float(ec["max"])
        ),
    )


def _build(data: Dict[str, Any], label: str) -> HardwareConfig:
    d, ops = data["defaults"], data["defaults"]["ops"]
    defaults = DefaultsConfig(
        ops=OpDefaults(_flag(ops.get("is_output_quantized")), _flag(ops.get("is_symmetric"))),
        params=_param(d["params"]),
        strict_symmetric=_flag(d.get("strict_symmetric")),
        unsigned_symmetric=_flag(d.get("unsigned_symmetric")),
        per_channel_quantization=_flag(d.get("per_channel_quantization")),
        supported_kernels=_kernels(d.get("supported_kernels", ())),
        hw_version=d.get("hw_version"),
    )
    return HardwareConfig(
        defaults=defaults,
        params={k: _param(v) for k, v in data["params"].items()},
        op_type={k: _op_type(v) for k, v in data["op_type"].items()},
        supergroups=[tuple(g["op_list"]) for g in data["supergroups"]],
        model_input=_flag(data["model_input"].get("is_input_quantized")) is True,
        model_output=_flag(data["model_output"].get("is_output_quantized")),
        supergroup_pass_list=list(data.get("supergroup_pass_list", ())),
        source=label,
    )


# ----------------------------------------------------------------------------------------------
# message helpers
# ----------------------------------------------------------------------------------------------
def _path(parts: Iterable[Union[str, int]]) -> str:
    """``['supergroups', 0, 'op_list']`` -> ``supergroups[0].op_list``; ``[]`` -> ``top level``."""
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "top level"


def _show(value: Any) -> str:
    """A value as a JSON user reads it: strings quoted, booleans ``true``/``false``."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, str):
        return repr(value)
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _did_you_mean(name: str, candidates: Iterable[str]) -> str:
    candidates = list(candidates)
    folded = [c for c in candidates if c.lower() == name.lower()]
    close = folded or difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _op_hint(name: str) -> str:
    """Suggest ONNX names for a torch class name (``Conv2d``) or a near miss (``Rleu``)."""
    for cls, names in op_types.TORCH_TO_ONNX.items():
        if cls.__name__ == name:
            return f" (that is a torch class; its op types are {', '.join(map(repr, names))})"
    return _did_you_mean(name, sorted(op_types.KNOWN_ONNX_TYPES))
