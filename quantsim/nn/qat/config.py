"""The config of the single-operator QAT modules (:mod:`quantsim.nn.qat`): typed, validated,
with defaults. Not the retrain workflow's config file (:mod:`quantsim.retrain.config`), which
reuses :data:`DST_TYPES` and :func:`parse_bool` from here.

A config is a dict of two sections (every key optional, unknown keys rejected)::

    {
        "retrain_data_config": {            # the layer's input (activations)
            "dst_type": "INT8",             # "INT8" | "INT4"
            "batch_num": 10,                # training batches that calibrate the clip range
            "fixed_min": False,             # pin the lower clip at 0 (non-negative data)
            "clip_min": None,               # explicit initial lower clip (<= 0), skips calibrating it
            "clip_max": None,               # explicit initial upper clip (>= 0), skips calibrating it
        },
        "retrain_weight_config": {
            "dst_type": "INT8",             # "INT8" | "INT4"
            "weights_retrain_algo": "arq_retrain",
            "channel_wise": False,          # one scale per output channel
        },
    }

Booleans may be given as AIMET-style strings ``"True"`` / ``"False"``; they become real bools
here, once. :meth:`QATConfig.from_dict` is the only parser; modules hold the frozen result.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Dict, Mapping, Optional, Union

from quantsim.errors import QuantizationSettingError

#: Supported ``dst_type`` values and their bitwidths.
DST_TYPES: Dict[str, int] = {"INT8": 8, "INT4": 4}
#: Supported ``weights_retrain_algo`` values.
WEIGHT_ALGOS = ("arq_retrain",)
DATA_SECTION = "retrain_data_config"
WEIGHT_SECTION = "retrain_weight_config"


def parse_bool(value: Any, where: str) -> bool:
    """A bool from JSON ``true``/``false`` or AIMET's strings ``"True"``/``"False"`` (any case).

    Raises:
        QuantizationSettingError: anything else, naming ``where``.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise QuantizationSettingError(
        f"{where}: expected a bool (or the string 'True'/'False'), got {value!r}"
    )


def _dst_type(value: Any, where: str) -> str:
    if not isinstance(value, str) or value.upper() not in DST_TYPES:
        raise QuantizationSettingError(
            f"{where}: dst_type {value!r} is not supported; allowed: {list(DST_TYPES)}"
        )
    return value.upper()


def _optional_float(value: Any, where: str) -> Optional[float]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise QuantizationSettingError(f"{where}: expected a finite number or None, got {value!r}")
    return float(value)


def _check_keys(section: Mapping[str, Any], cls: type, where: str) -> None:
    if not isinstance(section, Mapping):
        raise QuantizationSettingError(f"{where}: expected a dict, got {type(section).__name__}")
    allowed = [f.name for f in fields(cls)]
    unknown = sorted(set(section) - set(allowed))
    if unknown:
        raise QuantizationSettingError(f"{where}: unknown key(s) {unknown}; allowed: {allowed}")


@dataclass(frozen=True)
class QATInputConfig:
    """How a QAT module quantizes its input (``retrain_data_config``).

    Example:
        >>> QATInputConfig.from_dict({"batch_num": 2, "fixed_min": "True"}).fixed_min
        True
    """

    dst_type: str = field(default="INT8", metadata={"description": "'INT8' or 'INT4' (asymmetric)"})
    batch_num: int = field(
        default=10, metadata={"description": "training batches whose min/max initialise the clips"}
    )
    fixed_min: bool = field(
        default=False, metadata={"description": "pin the lower clip at 0 and do not learn it"}
    )
    clip_min: Optional[float] = field(
        default=None, metadata={"description": "initial lower clip (<= 0); None: calibrate it"}
    )
    clip_max: Optional[float] = field(
        default=None, metadata={"description": "initial upper clip (>= 0); None: calibrate it"}
    )

    @property
    def bitwidth(self) -> int:
        """Bitwidth of ``dst_type``."""
        return DST_TYPES[self.dst_type]

    @classmethod
    def from_dict(cls, section: Mapping[str, Any], where: str = DATA_SECTION) -> "QATInputConfig":
        """Validate ``section`` and fill in the defaults.

        Raises:
            QuantizationSettingError: naming the key, the value and what is allowed.
        """
        _check_keys(section, cls, where)
        d = {**{f.name: f.default for f in fields(cls)}, **section}
        batch_num = d["batch_num"]
        if isinstance(batch_num, bool) or not isinstance(batch_num, int) or batch_num < 1:
            raise QuantizationSettingError(
                f"{where}.batch_num: must be an integer >= 1, got {batch_num!r}"
            )
        fixed_min = parse_bool(d["fixed_min"], f"{where}.fixed_min")
        clip_min = _optional_float(d["clip_min"], f"{where}.clip_min")
        clip_max = _optional_float(d["clip_max"], f"{where}.clip_max")
        if clip_min is not None and clip_min > 0:
            raise QuantizationSettingError(
                f"{where}.clip_min: must be <= 0 (the range always includes zero), got {clip_min}"
            )
        if clip_max is not None and clip_max < 0:
            raise QuantizationSettingError(
                f"{where}.clip_max: must be >= 0 (the range always includes zero), got {clip_max}"
            )
        if clip_min is not None and clip_max is not None and not clip_min < clip_max:
            raise QuantizationSettingError(
                f"{where}: clip_min ({clip_min}) must be smaller than clip_max ({clip_max})"
            )
        if fixed_min and clip_min not in (None, 0.0):
            raise QuantizationSettingError(
                f"{where}.clip_min: fixed_min=True pins the lower clip at 0; clip_min must be "
                f"None or 0, got {clip_min}"
            )
        return cls(_dst_type(d["dst_type"], f"{where}.dst_type"), batch_num, fixed_min,
                   clip_min, clip_max)


@dataclass(frozen=True)
class QATWeightConfig:
    """How a QAT module quantizes its weight (``retrain_weight_config``).

    Example:
        >>> QATWeightConfig.from_dict({"channel_wise": True}).channel_wise
        True
    """

    dst_type: str = field(default="INT8", metadata={"description": "'INT8' or 'INT4' (symmetric)"})
    weights_retrain_algo: str = field(
        default="arq_retrain", metadata={"description": "'arq_retrain' (the only algorithm)"}
    )
    channel_wise: bool = field(
        default=False, metadata={"description": "one scale per output channel (not for Linear)"}
    )

    @property
    def bitwidth(self) -> int:
        """Bitwidth of ``dst_type``."""
        return DST_TYPES[self.dst_type]

    @classmethod
    def from_dict(
        cls, section: Mapping[str, Any], where: str = WEIGHT_SECTION
    ) -> "QATWeightConfig":
        """Validate ``section`` and fill in the defaults.

        Raises:
            QuantizationSettingError: naming the key, the value and what is allowed.
        """
        _check_keys(section, cls, where)
        d = {**{f.name: f.default for f in fields(cls)}, **section}
        algo = d["weights_retrain_algo"]
        if algo not in WEIGHT_ALGOS:
            raise QuantizationSettingError(
                f"{where}.weights_retrain_algo: {algo!r} is not supported; allowed: "
                f"{list(WEIGHT_ALGOS)}"
            )
        return cls(_dst_type(d["dst_type"], f"{where}.dst_type"), algo,
                   parse_bool(d["channel_wise"], f"{where}.channel_wise"))


@dataclass(frozen=True)
class QATConfig:
    """The whole config of one QAT module: its input (data) and weight sections.

    Example:
        >>> cfg = QATConfig.from_dict({"retrain_weight_config": {"dst_type": "INT4"}})
        >>> cfg.data.bitwidth, cfg.weight.bitwidth
        (8, 4)
    """

    data: QATInputConfig = field(default_factory=QATInputConfig)
    weight: QATWeightConfig = field(default_factory=QATWeightConfig)

    @classmethod
    def from_dict(cls, config: Optional[Mapping[str, Any]]) -> "QATConfig":
        """Parse a config dict (``None`` or ``{}``: all defaults).

        Raises:
            QuantizationSettingError: an unknown section or key, or a bad value.
        """
        if config is None:
            return cls()
        if not isinstance(config, Mapping):
            raise QuantizationSettingError(
                f"QAT config: expected a dict with {[DATA_SECTION, WEIGHT_SECTION]}, "
                f"got {type(config).__name__}"
            )
        unknown = sorted(set(config) - {DATA_SECTION, WEIGHT_SECTION})
        if unknown:
            raise QuantizationSettingError(
                f"QAT config: unknown section(s) {unknown}; allowed: {[DATA_SECTION, WEIGHT_SECTION]}"
            )
        return cls(QATInputConfig.from_dict(config.get(DATA_SECTION, {})),
                   QATWeightConfig.from_dict(config.get(WEIGHT_SECTION, {})))

    @classmethod
    def coerce(cls, config: Union[None, Mapping[str, Any], "QATConfig"]) -> "QATConfig":
        """Return ``config`` itself if it is a :class:`QATConfig`, else parse it."""
        return config if isinstance(config, QATConfig) else cls.from_dict(config)

    def to_dict(self) -> Dict[str, Dict[str, Any]]:
        """The config as a plain dict that :meth:`from_dict` accepts."""
        return {
            DATA_SECTION: {f.name: getattr(self.data, f.name) for f in fields(self.data)},
            WEIGHT_SECTION: {f.name: getattr(self.weight, f.name) for f in fields(self.weight)},
        }
