"""The retrain config: its file format (dataclasses, validation, reading and writing) and how
it is derived from and checked against the layers of a model.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from quantsim.atomic import atomic_write_text
from quantsim.errors import ConfigError, QuantizationSettingError, UnsupportedModelError
from quantsim.graph import eval_mode, run_forward
from quantsim.nn.qat.config import DST_TYPES, parse_bool  # the QAT modules' names and rules

PathLike = Union[str, os.PathLike]
#: Layer types the workflow quantizes (exact types), by the name the config file uses.
SUPPORTED_TYPES: Dict[str, type] = {"Linear": nn.Linear, "Conv2d": nn.Conv2d,
                                    "ConvTranspose2d": nn.ConvTranspose2d}
#: ``quant_scheme`` values: range-learning schemes train min/max, the others follow the data.
SCHEMES = ("range_learning_tf", "range_learning_tf_enhanced", "tf", "tf_enhanced")
CONFIG_VERSION = 1


# ----------------------------------------------------------------------------------------------
# the config file
# ----------------------------------------------------------------------------------------------
def _choice(value: Any, allowed, where: str) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise QuantizationSettingError(f"{where}: {value!r} is not allowed; allowed: {list(allowed)}")
    return value


def _bitwidth(value: Any, where: str) -> int:
    if isinstance(value, bool) or value not in DST_TYPES.values():
        raise QuantizationSettingError(
            f"{where}: bitwidth {value!r} is not allowed; allowed: {sorted(DST_TYPES.values())} "
            "(the ONNX files hold 8-bit containers)")
    return int(value)


def _keys(section: Any, allowed, where: str) -> Mapping[str, Any]:
    if not isinstance(section, Mapping):
        raise QuantizationSettingError(f"{where}: expected a JSON object, got {type(section).__name__}")
    unknown = sorted(set(section) - set(allowed))
    if unknown:
        raise QuantizationSettingError(f"{where}: unknown key(s) {unknown}; allowed: {list(allowed)}")
    return section


@dataclass(frozen=True)
class RetrainGlobalSettings:
    """The ``global`` section of a retrain config.

    Example:
        >>> RetrainGlobalSettings.from_dict({"batch_num": 4}).bitwidth
        8
    """

    batch_num: int = field(default=10, metadata={
        "description": "training-mode forwards that calibrate before ranges are trained"})
    quant_scheme: str = field(default="range_learning_tf", metadata={
        "description": f"one of {SCHEMES}; range_learning_* train min/max"})
    dst_type: str = field(default="INT8", metadata={
        "description": "'INT8' or 'INT4': bitwidth of every quantizer no layer entry sets"})
    hardware_config: Optional[str] = field(default=None, metadata={
        "description": "QuantizationSimModel config_file (built-in name or path); null: default"})

    @property
    def bitwidth(self) -> int:
        """Bitwidth of ``dst_type``."""
        return DST_TYPES[self.dst_type]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "global") -> "RetrainGlobalSettings":
        """Validate one ``global`` section (missing keys take the defaults).

        Raises:
            QuantizationSettingError: naming the key, the value and what is allowed.
        """
        d = {**asdict(cls()), **_keys(d, [f.name for f in fields(cls)], where)}
        n = d["batch_num"]
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise QuantizationSettingError(f"{where}.batch_num: an integer >= 1, got {n!r}")
        hw = d["hardware_config"]
        if hw is not None and not isinstance(hw, str):
            raise QuantizationSettingError(f"{where}.hardware_config: a string or null, got {hw!r}")
        return cls(n, _choice(d["quant_scheme"], SCHEMES, f"{where}.quant_scheme"),
                   _choice(d["dst_type"], DST_TYPES, f"{where}.dst_type"), hw)


@dataclass(frozen=True)
class RetrainLayerSettings:
    """One entry of the ``layers`` section (a Linear, Conv2d or ConvTranspose2d).

    Example:
        >>> RetrainLayerSettings.from_dict({"type": "Linear", "skip": "True"}).skip
        True
    """

    type: str = field(metadata={"description": "layer class; checked against the model"})
    skip: bool = field(default=False, metadata={
        "description": "true: every quantizer of the layer is disabled"})
    weight_bitwidth: int = field(default=8, metadata={"description": "4 or 8"})
    activation_bitwidth: int = field(default=8, metadata={
        "description": "4 or 8: the quantizer of the data entering the layer"})
    channel_wise: bool = field(default=True, metadata={
        "description": "one weight scale per output channel"})
    note: Optional[str] = field(default=None, metadata={
        "description": "why create_quant_retrain_config skipped the layer (informative)"})

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "layer") -> "RetrainLayerSettings":
        """Validate one layer entry (``type`` required, the rest defaults).

        Raises:
            QuantizationSettingError: naming the key, the value and what is allowed.
        """
        _keys(d, [f.name for f in fields(cls)], where)
        if "type" not in d:
            raise QuantizationSettingError(f"{where}: 'type' is required ({list(SUPPORTED_TYPES)})")
        d = {**{f.name: f.default for f in fields(cls) if f.name != "type"}, **d}
        note = d["note"]
        if note is not None and not isinstance(note, str):
            raise QuantizationSettingError(f"{where}.note: a string or null, got {note!r}")
        return cls(_choice(d["type"], SUPPORTED_TYPES, f"{where}.type"),
                   parse_bool(d["skip"], f"{where}.skip"),
                   _bitwidth(d["weight_bitwidth"], f"{where}.weight_bitwidth"),
                   _bitwidth(d["activation_bitwidth"], f"{where}.activation_bitwidth"),
                   parse_bool(d["channel_wise"], f"{where}.channel_wise"), note)

    def to_dict(self) -> Dict[str, Any]:
        """The JSON entry (``note`` only when set)."""
        out = asdict(self)
        if out["note"] is None:
            del out["note"]
        return out


@dataclass(frozen=True)
class RetrainConfig:
    """A parsed retrain config file: ``{"version": 1, "global": {...}, "layers": {...}}``.

    Example:
        >>> cfg = RetrainConfig.from_dict({"version": 1, "global": {"dst_type": "INT4"},
        ...                                "layers": {"fc": {"type": "Linear"}}})
        >>> cfg.global_settings.bitwidth, cfg.layers["fc"].skip
        (4, False)
    """

    global_settings: RetrainGlobalSettings
    layers: Dict[str, RetrainLayerSettings]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "retrain config") -> "RetrainConfig":
        """Validate a whole config.

        Raises:
            QuantizationSettingError: an unknown key, a wrong value, another version.
        """
        _keys(d, ("version", "global", "layers"), where)
        if d.get("version", CONFIG_VERSION) != CONFIG_VERSION:
            raise QuantizationSettingError(
                f"{where}.version: {d['version']!r}; this quantsim reads version {CONFIG_VERSION}")
        layers = d.get("layers", {})
        if not isinstance(layers, Mapping):
            raise QuantizationSettingError(f"{where}.layers: expected a JSON object of layers")
        return cls(RetrainGlobalSettings.from_dict(d.get("global", {}), f"{where}.global"),
                   {name: RetrainLayerSettings.from_dict(entry, f"{where}.layers[{name!r}]")
                    for name, entry in layers.items()})

    def to_dict(self) -> Dict[str, Any]:
        """The JSON document."""
        return {"version": CONFIG_VERSION, "global": asdict(self.global_settings),
                "layers": {n: s.to_dict() for n, s in self.layers.items()}}

    @classmethod
    def load(cls, path: PathLike) -> "RetrainConfig":
        """Read and validate a config file.

        Raises:
            ConfigError: missing or not JSON. QuantizationSettingError: invalid content.
        """
        return cls.from_dict(_read_json(path, "retrain config"), str(path))

    def write(self, path: PathLike) -> None:
        """Write the config atomically (indented JSON)."""
        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=2) + "\n")


def _read_json(path: PathLike, what: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{what} not found: {path}") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{what} {path}: not readable JSON: {exc}") from None


# ----------------------------------------------------------------------------------------------
# which layers, and whether they are supported
# ----------------------------------------------------------------------------------------------
def _scan(model: nn.Module, input_data: Any) -> Dict[str, Tuple[nn.Module, Optional[str]]]:
    """Supported layers of ``model`` -> (module, reason it cannot be quantized or None).

    Runs one forward with ``input_data`` in eval mode under ``no_grad`` (modes restored) to
    see which layers run and the rank of each convolution's input.
    """
    layers = {n: m for n, m in model.named_modules() if type(m) in SUPPORTED_TYPES.values()}
    ranks: Dict[str, List[int]] = {n: [] for n in layers}
    hooks = [m.register_forward_pre_hook(
        lambda _m, args, n=n: ranks[n].append(args[0].dim() if args and torch.is_tensor(args[0])
                                              else -1)) for n, m in layers.items()]
    try:
        with eval_mode(model), torch.no_grad():
            run_forward(model, input_data)
    except Exception as exc:
        raise UnsupportedModelError(
            f"the model's forward failed with input_data ({type(exc).__name__}: {exc}); pass "
            "an input the model accepts (a tensor, a tuple of positional inputs, or a dict: "
            "keyword arguments when its keys name forward's parameters, else the one "
            "positional argument)") from exc
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for name, module in layers.items():
        reason = None
        if not ranks[name]:
            reason = "not called by the model's forward with input_data"
        elif isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
            if module.padding_mode != "zeros":
                reason = f"padding_mode={module.padding_mode!r}; only 'zeros' is supported"
            elif any(r != 4 for r in ranks[name]):
                reason = (f"input of rank {sorted(set(ranks[name]))}; only 4-D NCHW inputs are "
                          "supported")
        out[name] = (module, reason)
    return out


def _default_layer(module: nn.Module, bits: int, channel_wise: bool, reason: Optional[str]
                   ) -> RetrainLayerSettings:
    kind = type(module).__name__
    if isinstance(module, nn.ConvTranspose2d) and module.groups > 1:
        channel_wise = False  # output channels of different groups would share a scale
    return RetrainLayerSettings(kind, reason is not None, bits, bits, channel_wise, reason)


_DEFINITION_GLOBALS = tuple(f.name for f in fields(RetrainGlobalSettings))
_DEFINITION_KEYS = _DEFINITION_GLOBALS + ("channel_wise", "weight_bitwidth",
                                          "activation_bitwidth", "skip_layers", "skip_types",
                                          "layers")
_LAYER_OVERRIDES = ("skip", "weight_bitwidth", "activation_bitwidth", "channel_wise")


def _name_list(value: Any, where: str) -> List[str]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise QuantizationSettingError(f"{where}: a list of names, got {value!r}")
    return list(value)


def _apply_definition(definition: Mapping[str, Any], scanned) -> RetrainConfig:
    """The config for ``scanned`` layers with ``definition``'s overrides (docs: the table)."""
    d = _keys(definition, _DEFINITION_KEYS, "config_definition")
    glob = RetrainGlobalSettings.from_dict({k: d[k] for k in _DEFINITION_GLOBALS if k in d},
                                           "config_definition")
    bits = glob.bitwidth
    w_bits = _bitwidth(d.get("weight_bitwidth", bits), "config_definition.weight_bitwidth")
    a_bits = _bitwidth(d.get("activation_bitwidth", bits), "config_definition.activation_bitwidth")
    cw = parse_bool(d.get("channel_wise", True), "config_definition.channel_wise")
    layers = {}
    for name, (module, reason) in scanned.items():
        entry = _default_layer(module, bits, cw, reason)
        layers[name] = replace(entry, weight_bitwidth=w_bits, activation_bitwidth=a_bits)
    skip = set(_name_list(d.get("skip_layers", []), "config_definition.skip_layers"))
    _known(skip, layers, "config_definition.skip_layers")
    for kind in _name_list(d.get("skip_types", []), "config_definition.skip_types"):
        _choice(kind, SUPPORTED_TYPES, "config_definition.skip_types")
        matched = {n for n, s in layers.items() if s.type == kind}
        if not matched:
            raise QuantizationSettingError(
                f"config_definition.skip_types: the model has no {kind} layer to skip")
        skip |= matched
    for name in skip:
        layers[name] = replace(layers[name], skip=True)
    per_layer = d.get("layers", {})
    if not isinstance(per_layer, Mapping):
        raise QuantizationSettingError("config_definition.layers: expected {name: {...}}")
    _known(set(per_layer), layers, "config_definition.layers")
    for name, override in per_layer.items():
        _keys(override, _LAYER_OVERRIDES, f"config_definition.layers[{name!r}]")
        merged = {**layers[name].to_dict(), **override}
        layers[name] = RetrainLayerSettings.from_dict(merged, f"config_definition.layers[{name!r}]")
    config = RetrainConfig(glob, layers)
    _check_supported(config, scanned, "config_definition")
    return config


def _known(names, layers: Mapping[str, Any], where: str) -> None:
    unknown = sorted(set(names) - set(layers))
    if unknown:
        raise QuantizationSettingError(
            f"{where}: {unknown} are not Linear/Conv2d/ConvTranspose2d layers of the model; "
            f"layers: {sorted(layers)}")


def _check_supported(config: RetrainConfig, scanned, where: str) -> None:
    for name, s in config.layers.items():
        module, reason = scanned[name]
        if not s.skip and reason is not None:
            raise UnsupportedModelError(
                f"{where}: layer {name!r} cannot be quantized ({reason}); set \"skip\": true "
                "for it")
        if (not s.skip and s.channel_wise and isinstance(module, nn.ConvTranspose2d)
                and module.groups > 1):
            raise QuantizationSettingError(
                f"{where}: layer {name!r}: channel_wise with groups={module.groups} would let "
                "output channels of different groups share a scale; set channel_wise false")


def _check_against_model(config: RetrainConfig, scanned, where: str) -> None:
    missing = sorted(set(scanned) - set(config.layers))
    extra = sorted(set(config.layers) - set(scanned))
    if missing or extra:
        raise QuantizationSettingError(
            f"{where}: the config does not describe this model (made for another one?); layers "
            f"of the model not in the config: {missing[:10]}; in the config but not "
            f"Linear/Conv2d/ConvTranspose2d layers of the model: {extra[:10]}")
    for name, s in config.layers.items():
        actual = type(scanned[name][0]).__name__
        if s.type != actual:
            raise QuantizationSettingError(
                f"{where}: layer {name!r} is a {actual}, the config says {s.type}")
    _check_supported(config, scanned, where)

