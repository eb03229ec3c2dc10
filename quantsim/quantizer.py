"""``Quantizer``: the module that holds one tensor's quantization settings and encoding.

A quantizer sits on an input, an output or a parameter of a wrapped module. Its forward pass
depends on its *state*:

=============  ==================================================================
``quantize``   fake-quantize with the stored encoding (simulation, validation)
``observe``    observe statistics; pass values on unchanged (how activation quantizers
               calibrate, as in aimet-torch 2.x: see :mod:`quantsim.calibration`)
``qat``        observe a moving average of min/max and fake-quantize (fine-tuning)
=============  ==================================================================

The encoding lives in buffers (``scale``, ``offset``) or, when ranges are learnable,
in ``nn.Parameter`` s ``min`` and ``max`` from which scale and offset are derived every step
(so gradients reach them). All arithmetic comes from :mod:`quantsim.encoding`.
"""
from __future__ import annotations

import enum
import math
from typing import Any, Dict, Optional, Tuple, Union

import torch
from torch import nn
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks

from quantsim import kernels
from quantsim.analyzers import EncodingAnalyzer, create_analyzer
from quantsim.encoding import (
    FLOAT32_MAX_STEPS,
    Encoding,
    amin_amax,
    block_rows,
    block_shape,
    fake_quantize,
    fake_quantize_float,
    fake_quantize_range,
    grid_point,
    integer_grid,
    lpbq_scale,
    scale_offset_from_range,
    validate_bitwidth,
    validate_block_size,
    validate_data_type,
    validate_decompressed_bw,
    validate_rounding,
)
from quantsim.errors import CalibrationError, FakeQuantStateError, QuantizationSettingError

class QuantizerRole(str, enum.Enum):
    """What a quantizer quantizes: a parameter, a module input or a module output."""

    PARAM = "param"
    INPUT = "input"
    OUTPUT = "output"


class QuantizerState(str, enum.Enum):
    """What a quantizer's forward does (the table in the module docstring). A ``str`` enum, so
    ``q.state == "quantize"`` reads as before."""

    QUANTIZE = "quantize"
    OBSERVE = "observe"
    QAT = "qat"


#: Plain-data settings of a quantizer (:meth:`Quantizer.settings`); the encoding itself lives in
#: its state_dict
_SETTINGS = ("enabled", "bitwidth", "symmetric", "strict", "unsigned_symmetric", "rounding",
             "frozen", "state", "required_mode", "fake_quant_state", "averaging_constant",
             "scheme", "range_constraint", "role", "learnable", "grid_unsigned")
#: Settings of per-block (and LPBQ) granularity; optional in :meth:`Quantizer.apply_settings`
#: (checkpoints written before per-block quantization lack them)
_BLOCK_SETTINGS = ("shape", "block_size", "decompressed_bw")

#: Bumped whenever any quantizer is enabled or disabled, so quantized modules can cache which
#: of their quantizers are active instead of asking each one on every call.
_ENABLED_GENERATION = [0]


def enabled_generation() -> int:
    """A counter that changes whenever any quantizer's ``enabled`` flag changes."""
    return _ENABLED_GENERATION[0]


def _checked(kind: type, value: Any, name: str, what: str):
    """``kind(value)`` for an enum member or its value, else a typed error naming the place."""
    try:
        return kind(value)
    except ValueError:
        allowed = [m.value for m in kind]
        raise QuantizationSettingError(
            f"{name or 'Quantizer'}: {what} must be one of {allowed}, got {value!r}") from None


class Quantizer(nn.Module):
    """Fake-quantizes one tensor (per tensor, per channel along ``axis``, or per block).

    Args:
        bitwidth: 4..31 for ``int``, 16 for ``float``.
        symmetric: signed symmetric grid (weights, typically) or asymmetric (activations).
        shape: encoding shape: ``()`` per tensor, ``(C,)`` per channel, ``(C, K / block_size)``
            per block.
        axis: channel axis of the quantized tensor when per channel (0 per block).
        rounding: ``'nearest'`` (half to even) or ``'stochastic'``.
        data_type: ``'int'`` or ``'float'`` (fp16 simulation, needs no calibration).
        strict: strict symmetric grid (``[-127, 127]`` at 8 bit).
        unsigned_symmetric: symmetric quantizers of non-negative data use ``[0, 2^b - 1]``.
        scheme: calibration scheme: ``'tf'``, ``'tf_enhanced'`` or ``'percentile'``.
        name: where the quantizer sits (``conv1.param_quantizers.weight``), used in messages.
        role: a :class:`QuantizerRole` (what the sim placed it on), or None for a stand-alone
            quantizer.
        block_size: per-block granularity of a weight ``(C, K, ...)``: one encoding per output
            channel and block of ``block_size`` along dimension 1
            (:func:`quantsim.encoding.block_rows`); ``shape`` is then ``(C, K / block_size)``.
        decompressed_bw: LPBQ (per block, symmetric): block scales are integer multipliers in
            ``[1, 2^(decompressed_bw - bitwidth)]`` times a per-channel float scale
            (:func:`quantsim.encoding.lpbq_scale`).

    Example:
        >>> q = Quantizer(bitwidth=8, symmetric=False, scheme='tf')
        >>> q.state = 'observe'; _ = q(torch.linspace(-1, 1, 100)); q.compute_encoding()
        >>> q.state = 'quantize'; y = q(torch.tensor([0.5]))
        >>> float(q.get_scale()) == 2 / 255
        True
    """

    def __init__(
        self,
        bitwidth: int = 8,
        symmetric: bool = False,
        shape: Tuple[int, ...] = (),
        axis: Optional[int] = None,
        rounding: str = "nearest",
        data_type: str = "int",
        strict: bool = False,
        unsigned_symmetric: bool = False,
        scheme: str = "tf_enhanced",
        name: str = "",
        role: Optional[Union[QuantizerRole, str]] = None,
        block_size: Optional[int] = None,
        decompressed_bw: Optional[int] = None,
    ) -> None:
        super().__init__()
        self.name = name
        self.data_type = validate_data_type(data_type, name or "Quantizer")
        self._bitwidth = validate_bitwidth(bitwidth, self.data_type, name or "Quantizer")
        self.symmetric = bool(symmetric)
        self.strict = bool(strict)
        self.unsigned_symmetric = bool(unsigned_symmetric)
        self.rounding = validate_rounding(rounding, name or "Quantizer")
        self.block_size, self.decompressed_bw = self._check_granularity(
            shape, axis, block_size, decompressed_bw)
        self.shape = tuple(shape)
        self.axis = axis if len(shape) == 1 else (0 if block_size is not None else None)
        self._enabled = True
        self.role: Optional[QuantizerRole] = None if role is None else _checked(
            QuantizerRole, role, name, "role")
        self._state = QuantizerState.QUANTIZE
        self.frozen = False
        #: 'train' / 'eval': the module mode this quantizer's state requires (quantsim.states)
        self.required_mode: Optional[str] = None
        self.fake_quant_state: Optional[str] = None
        #: Smoothing factor of the moving-average min/max observed in the ``qat`` state.
        self.averaging_constant = 0.01
        self._unsigned = False
        #: (min, max) fixed by the config's encoding_constraints; either may be None
        self.range_constraint: Tuple[Optional[float], Optional[float]] = (None, None)
        self.register_buffer("scale", torch.ones(self.shape))
        self.register_buffer("offset", torch.zeros(self.shape))
        #: LPBQ: the per-channel float scale of the block scales (None otherwise)
        self.register_buffer("channel_scale", torch.ones(self.shape[:1])
                             if self.decompressed_bw is not None else None)
        self.register_buffer("initialized", torch.tensor(self.data_type == "float"))
        #: Python copy of ``initialized``, kept by the methods that change the encoding (and
        #: refreshed by ``is_initialized``), so that a forward can check for an encoding
        #: without reading a tensor's value: no device sync per QAT step, and no graph break
        #: under torch.compile (dynamo guards on the flag instead)
        self._encoded = self.data_type == "float"
        self._fast_cache = None
        self.register_parameter("min", None)
        self.register_parameter("max", None)
        self.analyzer: EncodingAnalyzer = self._create_analyzer(scheme)
        self.scheme = scheme

    def _check_granularity(self, shape, axis, block_size, decompressed_bw
                           ) -> Tuple[Optional[int], Optional[int]]:
        """Validate the encoding shape against axis / block settings (typed errors)."""
        where = self.name or "Quantizer"
        block_size = validate_block_size(block_size, where)
        if block_size is None:
            if decompressed_bw is not None:
                raise QuantizationSettingError(
                    f"{where}: decompressed_bw (LPBQ) needs a block_size")
            if len(shape) > 1 or (len(shape) == 1 and axis is None):
                raise QuantizationSettingError(
                    f"{where}: shape must be () or (channels,) with an axis, got {shape}")
            return None, None
        if len(shape) != 2 or axis not in (None, 0) or self.data_type != "int":
            raise QuantizationSettingError(
                f"{where}: per-block quantization needs an int quantizer of shape "
                f"(channels, blocks) with axis 0, got shape {shape}, axis {axis}, "
                f"data type {self.data_type}")
        decompressed_bw = validate_decompressed_bw(decompressed_bw, self._bitwidth, where)
        if decompressed_bw is not None and not self.symmetric:
            raise QuantizationSettingError(
                f"{where}: LPBQ (decompressed_bw) needs a symmetric quantizer")
        return block_size, decompressed_bw

    def set_block_size(self, block_size: int, weight_shape: Tuple[int, ...],
                       decompressed_bw: Optional[int] = None) -> None:
        """Switch to per-block granularity (LPBQ with ``decompressed_bw``) for a weight of
        ``weight_shape``; the encoding is dropped (calibrate or load encodings again) and a
        learnable range becomes fixed.

        Raises:
            QuantizationSettingError: a block size that does not divide the weight's
                dimension 1, a bad ``decompressed_bw``, LPBQ on an asymmetric quantizer.
        """
        where = self.name or "Quantizer"
        if validate_block_size(block_size, where) is None:
            raise QuantizationSettingError(f"{where}: block_size must be a positive integer")
        try:
            shape = block_shape(tuple(weight_shape), block_size)
        except QuantizationSettingError as exc:
            raise QuantizationSettingError(f"{where}: {exc}") from None
        self._set_granularity(shape, block_size, decompressed_bw)

    def _set_granularity(self, shape: Tuple[int, ...], block_size: Optional[int],
                         decompressed_bw: Optional[int]) -> None:
        """Re-shape the encoding buffers for ``shape`` / blocks (the encoding is dropped)."""
        block_size, decompressed_bw = self._check_granularity(
            shape, 0 if shape else None, block_size, decompressed_bw)
        device = self.scale.device
        self.min = self.max = None
        self.shape, self.block_size = tuple(shape), block_size
        self.decompressed_bw = decompressed_bw
        self.axis = 0 if shape else None
        self.scale = torch.ones(self.shape, device=device)
        self.offset = torch.zeros(self.shape, device=device)
        self.channel_scale = (torch.ones(self.shape[:1], device=device)
                              if decompressed_bw is not None else None)
        self.initialized.fill_(False)
        _ = self.is_initialized  # refreshes what caches the flag
        self.analyzer = self._create_analyzer(self.scheme)

    def _create_analyzer(self, scheme: str, **analyzer_kwargs) -> EncodingAnalyzer:
        """The analyzer of ``scheme`` for this quantizer's granularity. Per block, unless told
        otherwise: histograms (tf_enhanced, percentile) get ``block_size`` bins (a block holds
        that many values per input row; 2048 float64 bins per block would take 256x the memory
        of a 64-value block of float32 weights), and tf_enhanced searches 26 symmetric steps
        (4% of the range apart; 9 x 11 asymmetric) instead of 101 (17 x 21): the search runs
        once per block, and on a 512 x 1024 weight in blocks of 64 this took it from 7.8 s to
        1.8 s for a 0.2% higher squared error (docs/config.md)."""
        if self.block_size is not None and scheme in ("tf_enhanced", "percentile"):
            analyzer_kwargs.setdefault("num_bins", min(2048, max(self.block_size, 16)))
        if self.block_size is not None and scheme == "tf_enhanced":
            for key, value in (("symmetric_delta_candidates", 26),
                               ("asymmetric_delta_candidates", 9), ("offset_candidates", 11)):
                analyzer_kwargs.setdefault(key, value)
        return create_analyzer(scheme, axis=self.axis, name=self.name, **analyzer_kwargs)

    # -- settings -------------------------------------------------------------------------------
    @property
    def bitwidth(self) -> int:
        """Bitwidth of the quantized values; changing it invalidates the encoding."""
        return self._bitwidth

    @bitwidth.setter
    def bitwidth(self, value: int) -> None:
        value = validate_bitwidth(value, self.data_type, self.name or "Quantizer")
        if value != self._bitwidth and self.data_type == "int":
            self.initialized.fill_(False)
            self._encoded = False
        self._bitwidth = value

    @property
    def state(self) -> QuantizerState:
        """What the forward does: ``'quantize'``, ``'observe'`` or ``'qat'``
        (:class:`QuantizerState`); anything else is refused when set."""
        return self._state

    @state.setter
    def state(self, value: Union[QuantizerState, str]) -> None:
        self._state = _checked(QuantizerState, value, self.name, "state")

    @property
    def enabled(self) -> bool:
        """False makes the quantizer pass values through unchanged."""
        return self._enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self._enabled = bool(value)
        _ENABLED_GENERATION[0] += 1

    @property
    def learnable(self) -> bool:
        """True when ``min`` / ``max`` are trainable parameters (range learning)."""
        return self.min is not None

    @property
    def qmin_qmax(self) -> Tuple[int, int]:
        """The internal integer grid ``(qmin, qmax)``."""
        return integer_grid(self._bitwidth, self.symmetric, self.strict, self._unsigned)

    def encoding_tensors(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The tensors the encoding is read from: ``(min, max)`` or ``(scale, offset)``, and
        ``initialized``. A cache keyed by :meth:`version_key` must hold these to pin their ids."""
        lo, buffers = self._parameters["min"], self._buffers
        if lo is not None:
            return lo, self._parameters["max"], buffers["initialized"]
        return buffers["scale"], buffers["offset"], buffers["initialized"]

    def version_key(self) -> tuple:
        """Changes whenever the fake-quant result for a fixed input may change (cache key).

        Built from the identities and version counters of :meth:`encoding_tensors` (any
        in-place change or replacement shows) and the settings, never from tensor values, so
        it costs no device synchronisation: it runs on every eval forward."""
        a, b, c = self.encoding_tensors()
        return (id(a), a._version, id(b), b._version, id(c), c._version, self._enabled,
                self._bitwidth, self.symmetric, self.strict, self._unsigned, self.rounding,
                self._state, self.data_type, self.axis, self.block_size, self.decompressed_bw)

    def set_range_constraint(self, min_val: Optional[float], max_val: Optional[float]) -> None:
        """Pin the encoding range (config ``encoding_constraints``).

        With both bounds the encoding is fixed now and calibration leaves it alone; with only
        one, calibration computes the other.
        """
        self.range_constraint = (min_val, max_val)
        if self.has_fixed_range:
            self.set_encoding(self._encoding_from_range(
                torch.tensor(min_val).expand(self.shape), torch.tensor(max_val).expand(self.shape)))

    @property
    def has_fixed_range(self) -> bool:
        """True when ``encoding_constraints`` fix both ends of the range."""
        return None not in self.range_constraint

    def set_scheme(self, scheme: str, **analyzer_kwargs) -> None:
        """Use another calibration scheme (drops collected statistics)."""
        self.analyzer = self._create_analyzer(scheme, **analyzer_kwargs)
        self.scheme = scheme

    # -- encoding access (aimet-torch names) ----------------------------------------------------
    @property
    def _grid_symmetric(self) -> bool:
        """The grid is signed symmetric (offset 0); unsigned symmetric grids are not."""
        return self.symmetric and not self._unsigned

    def _scale_offset(self) -> Tuple[torch.Tensor, torch.Tensor]:
        return self._scale_offset_channel()[:2]

    def _scale_offset_channel(self):
        """``(scale, offset, channel_scale)``: the encoding's tensors, derived from the range
        when learnable (LPBQ: the compressed block scales); ``channel_scale`` None but LPBQ."""
        if self.learnable:
            qmin, qmax = self.qmin_qmax
            scale, offset = scale_offset_from_range(self.min, self.max, qmin, qmax,
                                                    self._grid_symmetric)
            if self.decompressed_bw is None:
                return scale, offset, None
            scale, channel = lpbq_scale(scale, self._bitwidth, self.decompressed_bw)
            return scale, offset, channel
        return self.scale, self.offset, self.channel_scale

    def get_scale(self) -> Optional[torch.Tensor]:
        """Scale of the current encoding (None before calibration)."""
        return self._scale_offset()[0] if self.is_initialized else None

    def get_offset(self) -> Optional[torch.Tensor]:
        """Internal offset of the current encoding (None before calibration)."""
        return self._scale_offset()[1] if self.is_initialized else None

    def get_min(self) -> Optional[torch.Tensor]:
        """Grid-aligned minimum ``scale * (offset + qmin)`` (None before calibration)."""
        if not self.is_initialized or self.data_type == "float":
            return None
        scale, offset = self._scale_offset()
        return grid_point(scale, offset, self.qmin_qmax[0], self.qmin_qmax)

    def get_max(self) -> Optional[torch.Tensor]:
        """Grid-aligned maximum ``scale * (offset + qmax)`` (None before calibration)."""
        if not self.is_initialized or self.data_type == "float":
            return None
        scale, offset = self._scale_offset()
        return grid_point(scale, offset, self.qmin_qmax[1], self.qmin_qmax)

    @property
    def is_initialized(self) -> bool:
        """True once the quantizer has an encoding (float quantizers always do)."""
        value = bool(self.initialized)
        self.__dict__["_encoded"] = value  # a direct write to the buffer shows here too
        return value

    @property
    def encoding(self) -> Optional[Encoding]:
        """The current encoding as an immutable :class:`Encoding` value."""
        if self.data_type == "float":
            return Encoding.float16()
        if not self.is_initialized:
            return None
        # copies: an Encoding is a value, unchanged when this quantizer gets another one later
        scale, offset, channel = (None if t is None else t.detach().clone()
                                  for t in self._scale_offset_channel())
        return Encoding(self._bitwidth, scale, offset, self.symmetric, self.strict,
                        self._unsigned, self.axis, "int", self.block_size, self.decompressed_bw,
                        channel)

    def set_encoding(self, encoding: Encoding) -> None:
        """Adopt ``encoding`` (its settings must match this quantizer's)."""
        where = self.name or "Quantizer"
        if encoding.is_float != (self.data_type == "float"):
            raise QuantizationSettingError(
                f"{where}: encoding data type {encoding.data_type} != quantizer {self.data_type}")
        if encoding.is_float:
            return
        if tuple(encoding.scale.shape) != self.shape:
            raise QuantizationSettingError(
                f"{where}: encoding shape {tuple(encoding.scale.shape)} != quantizer shape "
                f"{self.shape}")
        if encoding.bitwidth != self._bitwidth:
            raise QuantizationSettingError(
                f"{where}: encoding bitwidth {encoding.bitwidth} != quantizer bitwidth "
                f"{self._bitwidth}")
        if (encoding.block_size, encoding.decompressed_bw) != (self.block_size,
                                                               self.decompressed_bw):
            raise QuantizationSettingError(
                f"{where}: encoding block_size / decompressed_bw ({encoding.block_size}, "
                f"{encoding.decompressed_bw}) != the quantizer's ({self.block_size}, "
                f"{self.decompressed_bw})")
        self.symmetric, self.strict, self._unsigned = (
            encoding.symmetric, encoding.strict, encoding.unsigned)
        with torch.no_grad():
            device = self.scale.device
            self.scale.copy_(encoding.scale.to(device))
            self.offset.copy_(encoding.offset.to(device))
            if encoding.is_lpbq:
                self.channel_scale.copy_(encoding.channel_scale.to(device))
            if self.learnable:
                self.min.copy_(encoding.min.to(device))
                self.max.copy_(encoding.max.to(device))
        self.initialized.fill_(True)
        self._encoded = True

    def set_learnable(self, learnable: bool = True, init: Optional[Tuple[Any, Any]] = None
                      ) -> None:
        """Make ``min``/``max`` trainable parameters (range learning) or freeze them back.

        Args:
            learnable: True to train the range, False to fix the current encoding.
            init: the ``(min, max)`` the parameters start from, for a quantizer whose encoding
                arrives later (an optimizer must see the parameters before calibration or
                ``load_state_dict`` fills them); ``initialized`` is left as it is. Default: the
                current encoding.

        Raises:
            CalibrationError: no ``init`` and no encoding yet.
        """
        if learnable == self.learnable or self.data_type == "float":
            return
        if not learnable:
            encoding = self.encoding
            self.min = self.max = None
            if encoding is not None:
                self.set_encoding(encoding)
            return
        if init is not None:
            lo, hi = (torch.as_tensor(v, dtype=torch.float32, device=self.scale.device)
                      .expand(self.shape).clone() for v in init)
        elif not self.is_initialized:
            raise CalibrationError(
                f"{self.name or 'Quantizer'}: compute encodings before making ranges learnable")
        else:
            lo, hi = self.get_min().detach().clone(), self.get_max().detach().clone()
        self.min, self.max = nn.Parameter(lo), nn.Parameter(hi)

    # -- plain-data settings (checkpoints) ------------------------------------------------------
    def settings(self) -> Dict[str, Any]:
        """This quantizer's settings as plain data (JSON types): everything but the encoding
        tensors, which its ``state_dict`` holds. :meth:`apply_settings` takes them back."""
        out: Dict[str, Any] = {}
        for key in _SETTINGS:
            value = self._unsigned if key == "grid_unsigned" else getattr(self, key)
            out[key] = value.value if isinstance(value, enum.Enum) else value
        out["range_constraint"] = list(self.range_constraint)
        out.update(shape=list(self.shape), block_size=self.block_size,
                   decompressed_bw=self.decompressed_bw)
        return out

    def apply_settings(self, settings: Dict[str, Any]) -> None:
        """Adopt :meth:`settings` (e.g. from a checkpoint), each value checked; learnable
        ranges get parameters to load a state_dict into.

        Raises:
            QuantizationSettingError: a key is missing or a value is not allowed; the message
                names the quantizer and the key. Nothing is changed then.
        """
        where = self.name or "Quantizer"
        missing = [k for k in _SETTINGS if k not in settings]
        if missing:
            raise QuantizationSettingError(f"{where}: settings lack {missing}")
        s = settings
        flags = {k: s[k] for k in ("enabled", "symmetric", "strict", "unsigned_symmetric",
                                   "frozen", "learnable", "grid_unsigned")}
        bad = [k for k, v in flags.items() if not isinstance(v, bool)]
        constraint = s["range_constraint"]
        if not (isinstance(constraint, (list, tuple)) and len(constraint) == 2 and all(
                v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)
                              and math.isfinite(v)) for v in constraint)):
            bad.append("range_constraint")
        if not (isinstance(s["averaging_constant"], (int, float))
                and 0 < s["averaging_constant"] <= 1):
            bad.append("averaging_constant")
        if s["required_mode"] not in (None, "train", "eval"):
            bad.append("required_mode")
        if s["fake_quant_state"] is not None and not isinstance(s["fake_quant_state"], str):
            bad.append("fake_quant_state")
        if bad:
            raise QuantizationSettingError(
                f"{where}: settings {bad} have values not allowed: "
                f"{ {k: s[k] for k in bad} }")
        bitwidth = validate_bitwidth(s["bitwidth"], self.data_type, where)
        granularity = self._settings_granularity(s, bitwidth)
        rounding = validate_rounding(s["rounding"], where)
        state = _checked(QuantizerState, s["state"], where, "state")
        role = None if s["role"] is None else _checked(QuantizerRole, s["role"], where, "role")
        if s["scheme"] != self.scheme:
            self.set_scheme(s["scheme"])
        self._bitwidth, self.rounding, self._state, self.role = bitwidth, rounding, state, role
        self.symmetric = flags["symmetric"]
        if granularity != (self.shape, self.block_size, self.decompressed_bw):
            self._set_granularity(*granularity)
        self.enabled = flags["enabled"]
        for key in ("symmetric", "strict", "unsigned_symmetric", "frozen"):
            setattr(self, key, flags[key])
        self._unsigned = flags["grid_unsigned"]
        self.range_constraint = tuple(constraint)
        self.averaging_constant = float(s["averaging_constant"])
        self.required_mode, self.fake_quant_state = s["required_mode"], s["fake_quant_state"]
        if flags["learnable"]:
            self.set_learnable(True, init=(0.0, 0.0))  # values arrive with load_state_dict

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._encoded = bool(self.initialized)

    def __setstate__(self, state: Dict[str, Any]) -> None:
        super().__setstate__(state)
        self._encoded = bool(self.initialized)  # pickles made before the flag existed

    def _settings_granularity(self, s: Dict[str, Any], bitwidth: int):
        """``(shape, block_size, decompressed_bw)`` of settings ``s`` (this quantizer's where
        ``s`` predates per-block settings), checked; typed errors name the key."""
        where = self.name or "Quantizer"
        if not all(k in s for k in _BLOCK_SETTINGS):
            return self.shape, self.block_size, self.decompressed_bw
        shape = s["shape"]
        if not (isinstance(shape, (list, tuple)) and len(shape) <= 2 and all(
                isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape)):
            raise QuantizationSettingError(
                f"{where}: settings ['shape'] must be a list of at most 2 positive integers, "
                f"got {shape!r}")
        shape = tuple(shape)
        if s["block_size"] is None and shape != self.shape:
            raise QuantizationSettingError(
                f"{where}: settings shape {list(shape)} != the quantizer's {list(self.shape)}")
        block_size = validate_block_size(s["block_size"], where)
        if s["decompressed_bw"] is not None:
            validate_decompressed_bw(s["decompressed_bw"], bitwidth, where)
        return shape, block_size, s["decompressed_bw"]

    # -- calibration ----------------------------------------------------------------------------
    def observe(self, x: torch.Tensor) -> None:
        """Add ``x`` to the calibration statistics (per block: its block view)."""
        x = x.detach()
        self.analyzer.observe(x if self.block_size is None else block_rows(x, self.block_size))

    def reset_statistics(self) -> None:
        """Forget collected statistics."""
        self.analyzer.reset()

    def compute_encoding(self) -> None:
        """Turn the collected statistics into the encoding (no-op when frozen or disabled).

        Raises:
            CalibrationError: the quantizer saw no data.
        """
        if self.frozen or self.data_type == "float" or self.has_fixed_range:
            return
        if not self.analyzer.has_stats:
            raise CalibrationError(f"{self.name or 'Quantizer'}: saw no data during calibration")
        # Symmetric encodings of non-negative data use the unsigned grid when allowed; the
        # range search must then look at [0, hi] ranges, not at signed ones (tf_enhanced).
        unsigned = self.symmetric and self.unsigned_symmetric and bool(
            torch.all(self.analyzer.observed_range()[0] >= 0))
        qmin, qmax = integer_grid(self._bitwidth, self.symmetric, self.strict, unsigned)
        lo, hi = self.analyzer.compute_range(qmax - qmin, self.symmetric and not unsigned)
        fixed_lo, fixed_hi = self.range_constraint
        lo = lo if fixed_lo is None else torch.full_like(lo, fixed_lo)
        hi = hi if fixed_hi is None else torch.full_like(hi, fixed_hi)
        self.set_encoding(self._encoding_from_range(lo.reshape(self.shape),
                                                    hi.reshape(self.shape)))

    def _encoding_from_range(self, lo: torch.Tensor, hi: torch.Tensor) -> Encoding:
        """The encoding of this quantizer's settings for the range ``(lo, hi)``."""
        return Encoding.from_range(lo, hi, self._bitwidth, self.symmetric, self.strict,
                                   self.unsigned_symmetric, self.axis, self.block_size,
                                   self.decompressed_bw)

    def _observe_moving_average(self, x: torch.Tensor) -> None:
        """QAT observer: exponential moving average of min/max into the encoding."""
        lo, hi = amin_amax(x.detach().float(), self.axis, self.block_size)
        if self.is_initialized:
            c = self.averaging_constant
            lo = self.get_min().detach() * (1 - c) + lo * c
            hi = self.get_max().detach() * (1 - c) + hi * c
        self.set_encoding(self._encoding_from_range(lo, hi))

    # -- forward --------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Observe and/or fake-quantize ``x`` according to :attr:`state`.

        Under ``torch.compile`` the same arithmetic runs without the eval caches (the graph
        computes the constants from the buffers) and the encoding check reads a Python flag
        (see ``_encoded``), so a calibrated model compiles to one graph."""
        if not self._enabled or not x.is_floating_point():
            return x
        if self.required_mode is not None:  # the hot path skips the call
            self.check_mode()
        state = self._state
        compiling = torch.compiler.is_compiling()
        if state == "quantize" and self.axis is None and not compiling and not (
                x.requires_grad and torch.is_grad_enabled()):
            fast = self._per_tensor_constants()  # the eval hot path
            if fast is not None:
                return kernels.qdq_per_tensor(x, *fast)
        if self.data_type == "float":
            return x if state == "observe" else fake_quantize_float(x)
        if state == "observe":
            self.observe(x)
            return x
        if state == "qat" and not self.learnable and not self.frozen:
            self._observe_moving_average(x)
        elif not (self._encoded or (self.learnable if compiling else self.is_initialized)):
            # the flag says no: eager reads the buffer (written directly by someone?); a
            # compiled forward cannot, and lets learnable ranges (always set) through
            raise CalibrationError(
                f"{self.name or 'Quantizer'} has no encoding: run compute_encodings() (or "
                "load_encodings()) first, or disable it with .enabled = False")
        qmin, qmax = self.qmin_qmax
        lo = self._parameters["min"]
        if lo is not None and self.decompressed_bw is not None:
            # learnable LPBQ: the block scales pass through the (straight-through) compression
            scale, offset = self._scale_offset()
            return fake_quantize(x, scale, offset, qmin, qmax, self.axis, self.rounding,
                                 self.block_size)
        if lo is not None:  # learnable: one autograd node from (min, max) to the gradients
            return fake_quantize_range(x, lo, self._parameters["max"], qmin, qmax,
                                       self._grid_symmetric, self.axis, self.rounding,
                                       self.block_size)
        # fixed ranges: autograd saves no encoding tensor (only the STE mask and step factor),
        # so the 'qat' observer may rewrite the buffers before an earlier call's backward
        return fake_quantize(x, self.scale, self.offset, qmin, qmax, self.axis, self.rounding,
                             self.block_size)

    def forward_owned(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` for a tensor that nothing else references: may overwrite ``x``.

        Wrappers call it for a module's fresh output; any case other than the eval hot path
        (and a quantizer with hooks, which expect a module call) goes through ``self(x)``."""
        if (self._enabled and self._state == "quantize" and self.axis is None
                and not (x.requires_grad and torch.is_grad_enabled())
                and not (self._forward_hooks or self._forward_pre_hooks
                         or _global_forward_hooks or _global_forward_pre_hooks)):
            if self.required_mode is not None:
                self.check_mode()
            fast = self._per_tensor_constants()
            if fast is not None:
                return kernels.qdq_per_tensor_(x, *fast)
        return self(x)

    def _per_tensor_constants(self):
        """``(scale, lo, hi, tensors)`` for the eval hot path, or None where it does not apply.

        Applies to a calibrated, fixed-range, per-tensor, round-to-nearest integer quantizer
        whose grid fits float32 arithmetic. The values are those
        :func:`quantsim.kernels.qdq_per_tensor` takes, recomputed only when :meth:`version_key`
        changes, so an eval forward neither re-derives the encoding nor synchronises with the
        device."""
        key = self.version_key()
        cached = self._fast_cache
        # torch.jit.trace records how the constants derive from the buffers: a cached copy
        # would enter the graph as a constant, and only when warm (the trace check fails)
        if cached is not None and cached[0] == key and not torch.jit.is_tracing():
            return cached[1]
        value = None
        if (self.rounding == "nearest" and self.data_type == "int" and not self.learnable
                and self.is_initialized):
            qmin, qmax = self.qmin_qmax
            if qmax - qmin <= FLOAT32_MAX_STEPS:
                scale, offset = self.scale.reshape(()), float(self.offset)
                tensors = (scale, (self.offset + qmin).reshape(()),
                           (self.offset + qmax).reshape(()))
                value = (scale, offset + qmin, offset + qmax, tensors)
        self._fast_cache = (key, value, self.encoding_tensors())  # pins the ids in key
        return value

    def check_mode(self) -> None:
        """Raise :class:`FakeQuantStateError` when the fake-quant state requires train() or
        eval() mode and the quantizer is in the other one; nothing without such a state. Code
        that uses the quantizer's encoding without calling it (kept weight codes) calls this."""
        if self.required_mode is None:
            return
        mode = "train" if self.training else "eval"
        if mode != self.required_mode:
            raise FakeQuantStateError(
                f"{self.name or 'Quantizer'}: fake-quant state {self.fake_quant_state} needs the "
                f"model in {self.required_mode}() mode but it is in {mode}() mode; call "
                f"model.{self.required_mode}() or switch state with quantsim.set_fake_quantize "
                "(CALIBRATION and VALIDATION need eval(), QAT needs train())")

    def extra_repr(self) -> str:
        if self.data_type == "float":
            return f"float{self._bitwidth}, enabled={self.enabled}"
        kind = "sym" if self.symmetric else "asym"
        gran = f"per-channel(axis={self.axis})" if self.axis is not None else "per-tensor"
        if self.block_size is not None:
            gran = f"per-block(block_size={self.block_size}" + (
                f", LPBQ decompressed_bw={self.decompressed_bw})"
                if self.decompressed_bw is not None else ")")
        text = f"int{self._bitwidth} {kind} {gran}, enabled={self.enabled}"
        if self.is_initialized and self.axis is None:
            with torch.no_grad():  # learnable ranges: no autograd warning on float()
                text += (f", scale={float(self.get_scale()):.6g}, offset={int(self.get_offset())}"
                         f", min={float(self.get_min()):.6g}, max={float(self.get_max()):.6g}")
        elif not self.is_initialized:
            text += ", uncalibrated"
        return text
