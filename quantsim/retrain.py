"""Whole-model quantization retraining: four calls around a :class:`QuantizationSimModel`.

The workflow (names and arguments as in the retrain APIs of vendor toolkits; ``config_defination``
keeps their spelling, ``config_definition`` is accepted too)::

    create_quant_retrain_config("retrain.json", model, x)          # 1. editable JSON per layer
    qmodel = create_quant_retrain_model("retrain.json", model, "record.json", x)
    opt = torch.optim.Adam(qmodel.parameters(), lr=1e-4)           # 2. ordinary training loop:
    for xb, yb in loader:                                          #    the first batch_num
        ...                                                        #    batches calibrate, then
    qmodel.eval(); qmodel(x_val)                                   #    ranges are learned;
                                                                   #    eval writes record.json
    save_quant_retrain_model("retrain.json", qmodel, "record.json", "out/net", x)
    # -> out/net_fake_quant_model.onnx, out/net_deploy_model.onnx

    # after an interruption (pth: torch.save(qmodel.state_dict()) or {"model": ..., ...}):
    qmodel = restore_quant_retrain_model("retrain.json", Net(), "record.json", x, "ckpt.pth",
                                         state_dict_name="model")

Everything is a facade over :class:`~quantsim.QuantizationSimModel`: the returned model is
``sim.model`` (a deep copy of the float model with quantizers), the sim lives in
:class:`QuantRetrainSession` on the model (:func:`get_retrain_session`), and its phases are
driven by two forward hooks on ``sim.model``:

==============  ===========  ===============================================================
phase           module mode  quantizers
==============  ===========  ===============================================================
calibration     train()      forwards 1..batch_num: every enabled quantizer observes (the
                             sim's ``calibrate`` state: values pass on fake-quantized with the
                             batch's own range); after forward ``batch_num`` the encodings are
                             computed (statistics merged across ranks under DDP)
training        train()      range-learning schemes: ``min``/``max`` are trained by the
                             optimizer; ``tf``/``tf_enhanced``: moving-average ranges
                             (quantsim.states' QAT rule)
inference       eval()       fake-quant with the current encodings; the first eval forward
                             after training writes them to ``record_file`` (atomic)
==============  ===========  ===============================================================

See ``docs/qat_modules.md`` (section "Whole-model retraining") for the config file, the
decisions and the limitations.
"""
from __future__ import annotations

import copy
import json
import os
import tempfile
import warnings
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import onnx
import torch
from torch import nn

from quantsim.atomic import atomic_write_text
from quantsim.encodings import write_torch_encodings
from quantsim.errors import (CalibrationError, CheckpointError, ConfigError,
                             QuantizationSettingError, UnsupportedModelError)
from quantsim.export.load import torch_encodings_file
from quantsim.export.qdq import widen_4bit_pairs
from quantsim.graph import run_forward
from quantsim.nn.qat.config import DST_TYPES, parse_bool  # the QAT modules' names and rules
from quantsim.op_types import is_data_movement
from quantsim.qat_convert import DEPLOY_SUFFIX, FAKE_QUANT_SUFFIX, ConvertedQATModel, convert_qat_model
from quantsim.quantizer import Quantizer
from quantsim.sim import QuantizationSimModel, QuantScheme
from quantsim.states import all_reduce_statistics
from quantsim.wrappers import param_axis

__all__ = ["RetrainConfig", "RetrainGlobalSettings", "RetrainLayerSettings", "QuantRetrainSession",
           "create_quant_retrain_config", "create_quant_retrain_model",
           "restore_quant_retrain_model", "save_quant_retrain_model", "get_retrain_session"]

PathLike = Union[str, os.PathLike]
#: Layer types the workflow quantizes (exact types), by the name the config file uses.
SUPPORTED_TYPES: Dict[str, type] = {"Linear": nn.Linear, "Conv2d": nn.Conv2d,
                                    "ConvTranspose2d": nn.ConvTranspose2d}
#: ``quant_scheme`` values: range-learning schemes train min/max, the others follow the data.
SCHEMES = ("range_learning_tf", "range_learning_tf_enhanced", "tf", "tf_enhanced")
CONFIG_VERSION = 1
#: Conv layers with at most this many input channels get an accuracy warning.
SMALL_CIN = 16
_SESSION_ATTR = "_quantsim_retrain_session"


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
def _unwrap(model: nn.Module, where: str) -> nn.Module:
    if isinstance(model, nn.DataParallel):
        raise UnsupportedModelError(
            f"{where}: torch.nn.DataParallel is not supported; pass the model itself and, for "
            "multi-GPU training, wrap the returned model in "
            "torch.nn.parallel.DistributedDataParallel instead")
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.module
    return model


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
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            run_forward(model, input_data)
    except Exception as exc:
        raise UnsupportedModelError(
            f"the model's forward failed with input_data ({type(exc).__name__}: {exc}); pass "
            "an input the model accepts (a tensor, a tuple of positional inputs, or a dict of "
            "keyword inputs)") from exc
    finally:
        for h in hooks:
            h.remove()
        for m, training in modes.items():
            m.training = training
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


def create_quant_retrain_config(config_file: PathLike, model: nn.Module, input_data: Any,
                                config_defination: Union[PathLike, Mapping[str, Any], None] = None,
                                *, config_definition: Union[PathLike, Mapping[str, Any], None] = None
                                ) -> RetrainConfig:
    """Write the editable retrain config of ``model`` to ``config_file`` (atomic).

    Every Linear, Conv2d and ConvTranspose2d gets an entry: ``skip``, ``weight_bitwidth``,
    ``activation_bitwidth``, ``channel_wise``. Layers that cannot be quantized (not called
    with ``input_data``, ``padding_mode`` other than zeros, a convolution input that is not
    4-D) are written with ``"skip": true`` and a ``note`` saying why.

    Args:
        config_file: the JSON file to write.
        model: the float model (``DistributedDataParallel`` is unwrapped).
        input_data: an input the model accepts (tensor, tuple of positional inputs, or dict of
            keyword inputs); one forward in eval mode shows which layers run.
        config_defination: overrides, a dict or a JSON file: global keys (``batch_num``,
            ``quant_scheme``, ``dst_type``, ``hardware_config``), defaults for every layer
            (``channel_wise``, ``weight_bitwidth``, ``activation_bitwidth``),
            ``skip_layers`` (names), ``skip_types`` (class names) and ``layers``
            (``{name: {skip, weight_bitwidth, activation_bitwidth, channel_wise}}``, which
            wins over the rest).
        config_definition: the same, spelled correctly (give one of the two).

    Returns:
        The written :class:`RetrainConfig`.

    Raises:
        QuantizationSettingError: both spellings given, an unknown key or value, a name that
            matches no layer. UnsupportedModelError: DataParallel, a failing forward, an
            override that un-skips a layer that cannot be quantized.

    Example:
        >>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(144, 2))
        >>> cfg = create_quant_retrain_config(tmp / "c.json", model, torch.randn(2, 1, 8, 8),
        ...                                   {"batch_num": 4, "skip_layers": ["2"]})  # doctest: +SKIP
        >>> cfg.layers["2"].skip                                                     # doctest: +SKIP
        True
    """
    if config_defination is not None and config_definition is not None:
        raise QuantizationSettingError(
            "create_quant_retrain_config: give config_defination or config_definition, not both")
    definition = config_definition if config_definition is not None else config_defination
    if definition is None:
        definition = {}
    elif not isinstance(definition, Mapping):
        definition = _read_json(definition, "config_definition")
    model = _unwrap(model, "create_quant_retrain_config")
    scanned = _scan(model, input_data)
    if not scanned:
        raise UnsupportedModelError(
            "create_quant_retrain_config: the model has no Linear, Conv2d or ConvTranspose2d "
            "layer to retrain")
    config = _apply_definition(definition, scanned)
    config.write(config_file)
    return config


# ----------------------------------------------------------------------------------------------
# the sim behind the model
# ----------------------------------------------------------------------------------------------
def _data_quantizer(sim: QuantizationSimModel, qmodules: Dict[str, nn.Module],
                    layer: str) -> Optional[str]:
    """Name of the enabled quantizer whose encoding the data entering ``layer`` has: its own
    input quantizer, else the output quantizer upstream (through data-movement modules)."""
    module = qmodules[layer]
    if module.input_quantizers and module.input_quantizers[0].enabled:
        return f"{layer}.input_quantizers.0"
    call = sim.graph.first_call(layer)
    source = call.inputs[0] if call is not None and call.inputs else None
    for _ in range(64):
        if source is None or source.kind != "module" or source.producer not in qmodules:
            return None
        name, producer = source.producer, qmodules[source.producer]
        outs = producer.output_quantizers
        if source.output_index < len(outs) and outs[source.output_index].enabled:
            return f"{name}.output_quantizers.{source.output_index}"
        if not is_data_movement(producer):
            return None
        if producer.input_quantizers and producer.input_quantizers[0].enabled:
            return f"{name}.input_quantizers.0"
        call = sim.graph.first_call(name)
        source = call.inputs[0] if call is not None and call.inputs else None
    return None


def _set_channel_wise(module: nn.Module, channel_wise: bool) -> None:
    """Replace the weight quantizer by a per-channel / per-tensor one with the same settings."""
    old = module.param_quantizers["weight"]
    if (old.axis is not None) == channel_wise or old.data_type != "int":
        return
    weight = module._parameters["weight"]
    axis = param_axis(module, "weight") if channel_wise else None
    new = Quantizer(bitwidth=old.bitwidth, symmetric=old.symmetric,
                    shape=(weight.shape[axis],) if channel_wise else (), axis=axis,
                    rounding=old.rounding, data_type=old.data_type, strict=old.strict,
                    unsigned_symmetric=old.unsigned_symmetric, scheme=old.scheme, name=old.name)
    new.enabled = old.enabled
    if old.range_constraint != (None, None):
        new.set_range_constraint(*old.range_constraint)
    module.param_quantizers["weight"] = new.to(weight.device)


def _apply_layers(sim: QuantizationSimModel, config: RetrainConfig) -> None:
    qmodules = dict(sim.named_qmodules())
    quantizers = dict(sim.named_quantizers())
    skipped = [n for n, s in config.layers.items() if s.skip and n in qmodules]
    if skipped:
        sim.exclude_layers_from_quantization(skipped)
    data_bits: Dict[str, Tuple[str, int]] = {}
    for name, s in config.layers.items():
        if s.skip or name not in qmodules:
            continue
        module = qmodules[name]
        if "weight" in module.param_quantizers:
            _set_channel_wise(module, s.channel_wise)
            module.param_quantizers["weight"].bitwidth = s.weight_bitwidth
        qname = _data_quantizer(sim, qmodules, name)
        if qname is None:
            continue
        other = data_bits.get(qname)
        if other is not None and other[1] != s.activation_bitwidth:
            raise QuantizationSettingError(
                f"layers {other[0]!r} and {name!r} read the same quantized tensor ({qname}) but "
                f"ask for activation_bitwidth {other[1]} and {s.activation_bitwidth}; give them "
                "the same value")
        data_bits[qname] = (name, s.activation_bitwidth)
        quantizers[qname].bitwidth = s.activation_bitwidth


def _warn_small_cin(config: RetrainConfig, scanned) -> None:
    small = [f"{n} (Cin={scanned[n][0].in_channels})" for n, s in config.layers.items()
             if not s.skip and isinstance(scanned[n][0], (nn.Conv2d, nn.ConvTranspose2d))
             and scanned[n][0].in_channels <= SMALL_CIN]
    if small:
        warnings.warn(
            f"convolutions with at most {SMALL_CIN} input channels may lose accuracy on "
            f"integer hardware: {small}; check their accuracy, or skip them in the config",
            UserWarning, stacklevel=4)


class QuantRetrainSession:
    """The sim behind a retrain model, and the forward hooks that drive its phases.

    Attributes:
        sim: the :class:`~quantsim.QuantizationSimModel`; ``sim.model`` is the retrain model.
        config: the :class:`RetrainConfig` it was built from.
        record_file: where eval forwards write the encodings.
        batches_seen: training-mode forwards so far (calibration ends at ``batch_num``).

    Example:
        >>> session = get_retrain_session(qmodel)                 # doctest: +SKIP
        >>> session.calibrated, session.sim.model is qmodel       # doctest: +SKIP
        (True, True)
    """

    def __init__(self, sim: QuantizationSimModel, config: RetrainConfig, record_file: PathLike):
        self.sim = sim
        self.config = config
        self.record_file = Path(record_file)
        self.batches_seen = 0
        self._phase: Optional[str] = None
        self._zero_hooks: list = []
        self.learns_ranges = QuantScheme.parse(config.global_settings.quant_scheme).learns_ranges
        if self.learns_ranges:  # trainable min/max exist from the start, for the optimizer
            for _, q in self._calibrated_quantizers():
                q.initialized.fill_(True)
                q.set_learnable(True)
                q.initialized.fill_(False)
        self._hooks: list = []
        self.attach()

    @property
    def batch_num(self) -> int:
        """Training forwards that calibrate."""
        return self.config.global_settings.batch_num

    @property
    def calibrated(self) -> bool:
        """True once ``batch_num`` training forwards ran (or a restore loaded encodings)."""
        return self.batches_seen >= self.batch_num

    def attach(self) -> None:
        """Put the session and its forward hooks on ``sim.model``."""
        if not self._hooks:
            self._hooks = [self.sim.model.register_forward_pre_hook(self._before),
                           self.sim.model.register_forward_hook(self._after)]
        setattr(self.sim.model, _SESSION_ATTR, self)

    def detach(self) -> None:
        """Take the session and its hooks off ``sim.model`` (export pickles the model)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self.sim.model.__dict__.pop(_SESSION_ATTR, None)

    def _calibrated_quantizers(self) -> List[Tuple[str, Quantizer]]:
        return [(n, q) for n, q in self.sim.named_quantizers()
                if q.enabled and q.data_type == "int" and not q.frozen and not q.has_fixed_range]

    # -- hooks ----------------------------------------------------------------------------------
    def _before(self, module: nn.Module, args: Any) -> None:
        if module.training:
            self._enter("train" if self.calibrated else "calibrate")
        elif not self.calibrated:
            raise CalibrationError(
                f"the retrain model is still calibrating: {self.batches_seen} of batch_num="
                f"{self.batch_num} training-mode forwards have run; run more training batches "
                "(model.train()) before evaluating it")
        else:
            if self._phase != "eval":
                self._enter("eval")
                self.write_record()

    def _after(self, module: nn.Module, args: Any, output: Any) -> None:
        if not module.training:
            return
        self.batches_seen += 1
        if self.batches_seen == self.batch_num:
            self._finish_calibration()

    def _enter(self, phase: str) -> None:
        if phase == self._phase:
            return
        for h in self._zero_hooks:
            h.remove()
        self._zero_hooks = []
        if phase == "calibrate":
            for _, q in self._calibrated_quantizers():
                if self.batches_seen == 0:
                    q.reset_statistics()
                q.state = "calibrate"
                if q.learnable:  # a zero gradient: DDP sees every parameter used
                    self._zero_hooks.append(q.register_forward_hook(_touch_range))
        else:
            for name, q in self.sim.named_quantizers():
                if q.enabled:
                    q.state = "quantize"
            if phase == "train" and not self.learns_ranges:  # quantsim.states' QAT rule
                for name, q in self._calibrated_quantizers():
                    q.state = "qat"
                    if ".param_quantizers." in name:
                        q.averaging_constant = 1.0  # weights: follow the current weights
        self._phase = phase

    def _finish_calibration(self) -> None:
        params = {id(q) for m in self.sim.qmodules() for q in m.param_quantizers.values()}
        active = self._calibrated_quantizers()
        acts = [(n, q) for n, q in active if id(q) not in params]
        all_reduce_statistics([q for _, q in acts])
        missing = [n for n, q in acts if not q.analyzer.has_stats]
        if missing:
            self.batches_seen = self.batch_num - 1  # not calibrated: saving stays refused
            raise CalibrationError(
                f"{len(missing)} enabled quantizer(s) saw no data in the {self.batch_num} "
                f"calibration batches: {missing[:10]}; skip their layers in the config")
        for _, module in self.sim.named_qmodules():
            for pname, q in module.param_quantizers.items():
                if q.enabled and q.data_type == "int" and not q.frozen and not q.has_fixed_range:
                    q.reset_statistics()
                    q.analyzer.observe(module._parameters[pname].detach())
        for _, q in active:
            q.compute_encoding()
        self._phase = None

    # -- records --------------------------------------------------------------------------------
    def write_record(self, path: Optional[PathLike] = None) -> Path:
        """Write the current encodings (module-keyed ``_torch.encodings`` layout) atomically to
        ``path`` (default :attr:`record_file`); under torch.distributed only rank 0 writes."""
        target = Path(path) if path is not None else self.record_file
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_rank() != 0:
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        write_torch_encodings(target, torch_encodings_file(self.sim))
        return target

    def mark_calibrated(self) -> None:
        """Treat calibration as done (the encodings were loaded)."""
        self.batches_seen = max(self.batches_seen, self.batch_num)
        self._phase = None


def _touch_range(q: Quantizer, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
    if not torch.is_grad_enabled():
        return output
    return output + 0.0 * (q.min.sum() + q.max.sum()).to(output.dtype)


def get_retrain_session(model: nn.Module, where: str = "get_retrain_session"
                        ) -> QuantRetrainSession:
    """The :class:`QuantRetrainSession` of a model returned by create/restore (DDP unwrapped).

    Raises:
        UnsupportedModelError: ``model`` did not come from create/restore_quant_retrain_model.
    """
    session = getattr(_unwrap(model, where), _SESSION_ATTR, None)
    if session is None:
        raise UnsupportedModelError(
            f"{where}: this model did not come from create_quant_retrain_model or "
            "restore_quant_retrain_model; pass the model they returned")
    return session


def _build(config_file: PathLike, model: nn.Module, record_file: PathLike, input_data: Any,
           where: str) -> QuantRetrainSession:
    config = RetrainConfig.load(config_file)
    work = copy.deepcopy(_unwrap(model, where))
    scanned = _scan(work, input_data)
    _check_against_model(config, scanned, f"{where}: {config_file}")
    g = config.global_settings
    # the sim traces in eval mode, so BatchNorm statistics are not updated
    sim = QuantizationSimModel(work, input_data, quant_scheme=g.quant_scheme,
                               default_output_bw=g.bitwidth, default_param_bw=g.bitwidth,
                               in_place=True, config_file=g.hardware_config)
    _apply_layers(sim, config)
    _warn_small_cin(config, scanned)
    return QuantRetrainSession(sim, config, record_file)


def create_quant_retrain_model(config_file: PathLike, model: nn.Module, record_file: PathLike,
                               input_data: Any) -> nn.Module:
    """The model to retrain: a copy of ``model`` with quantizers set up from ``config_file``.

    Train it with an ordinary loop (build the optimizer on its parameters, which include the
    learnable ranges). Its first ``batch_num`` training-mode forwards calibrate; then ranges
    are trained. An eval-mode forward after training writes the encodings to ``record_file``.

    Args:
        config_file: written by :func:`create_quant_retrain_config`, possibly edited.
        model: the float model (not modified). ``DistributedDataParallel`` is unwrapped:
            wrap the returned model in DDP yourself.
        record_file: encodings JSON written by eval forwards and by the save.
        input_data: an input the model accepts (used to trace it).

    Returns:
        ``sim.model`` (the sim: :func:`get_retrain_session`).

    Raises:
        ConfigError / QuantizationSettingError: an unreadable or invalid config, or one made
            for another model. UnsupportedModelError: DataParallel, a layer marked unsupported
            that is not skipped.
    """
    return _build(config_file, model, record_file, input_data, "create_quant_retrain_model").sim.model


def _state_dict_from(payload: Any, pth_file: PathLike, state_dict_name: Optional[str]
                     ) -> Dict[str, torch.Tensor]:
    if state_dict_name is not None:
        if not isinstance(payload, Mapping) or state_dict_name not in payload:
            keys = sorted(payload) if isinstance(payload, Mapping) else type(payload).__name__
            raise CheckpointError(f"{pth_file}: no {state_dict_name!r} entry; it holds {keys}")
        payload = payload[state_dict_name]
    if not isinstance(payload, Mapping) or not all(torch.is_tensor(v) for v in payload.values()):
        keys = sorted(payload)[:10] if isinstance(payload, Mapping) else type(payload).__name__
        raise CheckpointError(
            f"{pth_file}: not a state_dict (keys {keys}); pass state_dict_name= when the "
            "state_dict is one entry of a larger dict")
    if payload and all(k.startswith("module.") for k in payload):  # saved from a DDP wrapper
        payload = {k[len("module."):]: v for k, v in payload.items()}
    return dict(payload)


def restore_quant_retrain_model(config_file: PathLike, model: nn.Module, record_file: PathLike,
                                input_data: Any, pth_file: PathLike,
                                state_dict_name: Optional[str] = None) -> nn.Module:
    """Resume an interrupted retrain: rebuild the retrain model and load its saved state.

    ``pth_file`` holds ``retrain_model.state_dict()`` (or a dict with it under
    ``state_dict_name``, e.g. next to an optimizer state); it is read with
    ``torch.load(weights_only=True)``. With the quantizer entries, weights and encodings
    resume exactly. A float-only state_dict takes the encodings from ``record_file``. Saved
    before calibration ended (or no encodings anywhere), calibration runs again for the next
    ``batch_num`` training batches (statistics are not saved).

    Args:
        config_file: the config the interrupted run used.
        model: a float instance of the architecture (its weights are overwritten).
        record_file: the record file; later eval forwards write to it.
        input_data: an input the model accepts.
        pth_file: the saved state.
        state_dict_name: key of the state_dict inside ``pth_file``'s dict.

    Returns:
        The retrain model, as :func:`create_quant_retrain_model` returns it.

    Raises:
        CheckpointError: unreadable file, missing ``state_dict_name``, or keys / shapes that
            do not fit the model (named).
    """
    session = _build(config_file, model, record_file, input_data, "restore_quant_retrain_model")
    try:
        payload = torch.load(pth_file, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"pth file not found: {pth_file}") from None
    except Exception as exc:  # noqa: BLE001 - unpickling errors come in many types
        raise CheckpointError(f"{pth_file}: not readable with torch.load(weights_only=True): "
                              f"{exc}") from exc
    state = _state_dict_from(payload, pth_file, state_dict_name)
    target = session.sim.model
    quantizer_keys = {k for k in target.state_dict() if "_quantizers." in k}
    try:
        result = target.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise CheckpointError(f"{pth_file} does not fit the model built from {config_file}: "
                              f"{exc}") from exc
    float_missing = [k for k in result.missing_keys if k not in quantizer_keys]
    if float_missing or result.unexpected_keys:
        raise CheckpointError(
            f"{pth_file} does not fit the model built from {config_file}: missing "
            f"{float_missing[:10]}, unexpected {result.unexpected_keys[:10]}")
    has_quantizers = not (quantizer_keys & set(result.missing_keys))
    if has_quantizers and all(q.is_initialized for _, q in session._calibrated_quantizers()):
        session.mark_calibrated()
    elif not has_quantizers and Path(record_file).is_file():
        session.sim.load_encodings(str(record_file))
        session.mark_calibrated()
    else:
        warnings.warn(
            f"{pth_file} holds no finished calibration (saved before batch_num="
            f"{session.batch_num} training batches, or without quantizer state and no record "
            f"file): the next {session.batch_num} training batches calibrate again",
            UserWarning, stacklevel=2)
    return target


# ----------------------------------------------------------------------------------------------
# saving the ONNX models
# ----------------------------------------------------------------------------------------------
def _dynamic_batch(input_data: Any) -> Any:
    """``dynamic_shapes`` with a dynamic axis 0 for every tensor input."""
    def spec(x: Any) -> Any:
        return {0: torch.export.Dim.DYNAMIC} if torch.is_tensor(x) and x.dim() else None
    if isinstance(input_data, tuple):
        return tuple(spec(x) for x in input_data)
    if isinstance(input_data, dict):
        return {k: spec(v) for k, v in input_data.items()}
    return (spec(input_data),)


def save_quant_retrain_model(config_file: PathLike, model: nn.Module, record_file: PathLike,
                             save_path: PathLike, input_data: Any, *,
                             deploy_weight_dtype: str = "int8",
                             onnx_export_args: Optional[dict] = None) -> ConvertedQATModel:
    """Write the retrained model as ONNX: ``<save_path>_fake_quant_model.onnx`` (float weights,
    QuantizeLinear/DequantizeLinear pairs) and ``<save_path>_deploy_model.onnx`` (integer
    weight codes feeding DequantizeLinear, int32 biases); both run in ONNX Runtime. The
    encodings are written to ``record_file`` too. Each file is replaced atomically.

    Both come from the sim's export (``sim.export``'s ``_qdq.onnx``) and
    :func:`quantsim.convert_qat_model`; 4-bit pairs are stored in 8-bit containers
    (each 4-bit pair becomes an 8-bit pair plus a clamp to the 16 levels). The batch axis is dynamic unless ``onnx_export_args`` say
    otherwise.

    Args:
        config_file: the config the model was created with (checked).
        model: the retrain model (or its DDP wrapper).
        record_file: encodings JSON to write.
        save_path: path prefix of the two files; folders are created.
        input_data: an input the model accepts, on the model's device.
        deploy_weight_dtype: ``'int8'`` or ``'uint8'`` weight codes in the deploy model (see
            :func:`quantsim.convert_qat_model` on CPUs without VNNI).
        onnx_export_args: passed to ``sim.export``.

    Returns:
        ``(fake_quant_path, deploy_path)``.

    Raises:
        CalibrationError: fewer than ``batch_num`` training batches ran. QuantizationSettingError:
            ``config_file`` differs from the model's. ExportError: the export failed.
    """
    session = get_retrain_session(model, "save_quant_retrain_model")
    config = RetrainConfig.load(config_file)
    if config != session.config:
        raise QuantizationSettingError(
            f"save_quant_retrain_model: {config_file} differs from the config the model was "
            "created with; pass that config (edits take effect in a new create call)")
    if not session.calibrated:
        raise CalibrationError(
            f"save_quant_retrain_model: calibration is not finished: {session.batches_seen} of "
            f"batch_num={session.batch_num} training batches have run; train at least "
            f"{session.batch_num - session.batches_seen} more batches before saving")
    session.write_record(record_file)
    args = dict(onnx_export_args or {})
    if "dynamic_shapes" not in args and "dynamic_axes" not in args:
        args["dynamic_shapes"] = _dynamic_batch(input_data)
    prefix = Path(save_path)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    session.detach()
    try:
        with tempfile.TemporaryDirectory(prefix=f".{prefix.name}.", dir=prefix.parent) as tmp:
            files = session.sim.export(tmp, "model", input_data, onnx_export_args=args)
            qdq_model = onnx.load(str(files.qdq_onnx))
            widen_4bit_pairs(qdq_model, args.get("opset_version", 20))
            staged = convert_qat_model(qdq_model, os.path.join(tmp, "out"),
                                       deploy_weight_dtype=deploy_weight_dtype)
            out = ConvertedQATModel(f"{prefix}{FAKE_QUANT_SUFFIX}", f"{prefix}{DEPLOY_SUFFIX}")
            os.replace(staged.fake_quant_path, out.fake_quant_path)
            os.replace(staged.deploy_path, out.deploy_path)
    finally:
        session.attach()
    return out
