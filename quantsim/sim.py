"""``QuantizationSimModel``: a float model with quantizers, calibrated and ready to export.

Public names and arguments follow aimet_torch 2.x, so an AIMET script switches by changing its
imports::

    from quantsim import QuantizationSimModel, QuantScheme
    sim = QuantizationSimModel(model, dummy_input, quant_scheme=QuantScheme.post_training_tf)
    sim.compute_encodings(lambda m, _: m(calibration_batch), None)
    y = sim.model(x)                       # simulated int8 forward
"""
from __future__ import annotations

import copy
import enum
import warnings
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

import torch
from torch import nn

from quantsim import config as config_mod, progress
from quantsim.calibration import Calibration
from quantsim.checks import require_flag, require_module
from quantsim.encoding import validate_bitwidth, validate_data_type, validate_rounding
from quantsim.config_utils import block_weight_problem
from quantsim.errors import (CalibrationError, ConfigError, QuantizationSettingError,
                             UnsupportedModelError)
from quantsim.graph import ModelGraph, eval_mode, leaf_modules, trace
from quantsim.op_types import onnx_types_of, params_of
from quantsim.placement import Placement, QuantizerSetting, resolve
from quantsim.quantizer import Quantizer, QuantizerRole
from quantsim.tables import format_table
from quantsim.wrappers import (QuantizationMixin, is_registered, param_axis, quantize_module,
                               quantizer_items, record_model_size, unwrap_class)


class QuantScheme(enum.Enum):
    """Calibration schemes (aimet_common.defs values)."""

    post_training_tf = 1
    post_training_tf_enhanced = 2
    training_range_learning_with_tf_init = 3
    training_range_learning_with_tf_enhanced_init = 4
    post_training_percentile = 6

    @classmethod
    def parse(cls, value: Union["QuantScheme", str]) -> "QuantScheme":
        """Accept an enum member, its name, or the short aliases ``'tf'``, ``'tf_enhanced'``,
        ``'percentile'``, ``'range_learning_tf'``, ``'range_learning_tf_enhanced'``."""
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            key = value.strip().lower()
            if key in _SCHEME_ALIASES:
                return _SCHEME_ALIASES[key]
            if key in cls.__members__:
                return cls[key]
        allowed = sorted(set(_SCHEME_ALIASES) | set(cls.__members__))
        raise QuantizationSettingError(f"unknown quant_scheme {value!r}; allowed: {allowed}")

    @property
    def analyzer(self) -> str:
        """The calibration analyzer this scheme uses (``'tf'``, ``'tf_enhanced'``, ...)."""
        return {1: "tf", 2: "tf_enhanced", 3: "tf", 4: "tf_enhanced", 6: "percentile"}[self.value]

    @property
    def learns_ranges(self) -> bool:
        """True for the range-learning (QAT) schemes."""
        return self.value in (3, 4)


_SCHEME_ALIASES = {
    "tf": QuantScheme.post_training_tf,
    "tf_enhanced": QuantScheme.post_training_tf_enhanced,
    "percentile": QuantScheme.post_training_percentile,
    "range_learning_tf": QuantScheme.training_range_learning_with_tf_init,
    "range_learning_tf_enhanced": QuantScheme.training_range_learning_with_tf_enhanced_init,
}


class QuantizationDataType(enum.Enum):
    """Data type of simulated quantized values."""

    int = 1
    float = 2


#: Modules that do nothing at inference and so are left unwrapped.
_PASS_THROUGH = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
                 nn.AlphaDropout, nn.FeatureAlphaDropout)


def _is_leaf(module: nn.Module) -> bool:
    return next(module.children(), None) is None


class QuantizationSimModel:
    """Simulates quantization of ``model`` on a target described by a hardware config.

    Args:
        model: the float model. Left untouched unless ``in_place``.
        dummy_input: an input the model accepts, used once to trace which module feeds which:
            a tuple or list is spread over ``forward``'s positional arguments; a dict is its keyword
            arguments when every key names a parameter of ``forward``, else (as in aimet-torch)
            its one positional argument; anything else is the one positional argument (the
            rule: :func:`quantsim.graph.split_dummy_input`).
        quant_scheme: a :class:`QuantScheme` or its name/alias (``'tf'``, ``'tf_enhanced'``,
            ``'percentile'``).
        rounding_mode: ``'nearest'`` or ``'stochastic'``.
        default_output_bw: bitwidth of activation quantizers (4..31; 16 for float).
        default_param_bw: bitwidth of parameter quantizers.
        in_place: wrap ``model`` itself instead of a deep copy.
        config_file: a hardware config path, a built-in name (``'default'``, ``'per_channel'``,
            ``'htp'``), a dict, or None for the built-in ``'per_channel'`` config (what
            aimet-torch 2.x uses without a file).
        default_data_type: ``QuantizationDataType.int`` or ``.float`` (fp16 simulation).

    A module reachable under several paths (``self.block`` also placed in ``self.body``) is one
    quantized module with one set of quantizers, named by its first path in
    ``model.named_modules()`` order.

    Raises:
        UnsupportedModelError: ``model`` is not an ``nn.Module`` instance (a class, a
            function), a DataParallel model, or a forward that fails with dummy_input.
        DummyInputError: a dict dummy_input that ``forward``'s signature reads both ways (or
            neither); the message names both readings and how to choose one.
        ConfigError: the config file is missing or invalid.
        QuantizationSettingError: a bitwidth, scheme, rounding mode or data type not allowed,
            or an ``in_place`` that is not a bool.

    Example:
        >>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU())
        >>> x = torch.randn(8, 1, 8, 8)
        >>> sim = QuantizationSimModel(model, x, quant_scheme='tf')
        >>> sim.compute_encodings(lambda m, _: m(x), None)
        >>> sim.model(x).shape
        torch.Size([8, 4, 6, 6])
    """

    def __init__(
        self,
        model: nn.Module,
        dummy_input: Any,
        quant_scheme: Union[QuantScheme, str] = QuantScheme.post_training_tf_enhanced,
        rounding_mode: str = "nearest",
        default_output_bw: int = 8,
        default_param_bw: int = 8,
        in_place: bool = False,
        config_file: Union[str, dict, None] = None,
        default_data_type: Union[QuantizationDataType, str] = QuantizationDataType.int,
    ) -> None:
        _refuse_data_parallel(require_module(model, "QuantizationSimModel(model=...)"))
        require_flag(in_place, "in_place", "QuantizationSimModel", QuantizationSettingError)
        self._quant_scheme = QuantScheme.parse(quant_scheme)
        self._rounding = validate_rounding(rounding_mode, "QuantizationSimModel")
        self._data_type = validate_data_type(default_data_type, "QuantizationSimModel")
        self._output_bw = validate_bitwidth(default_output_bw, self._data_type, "default_output_bw")
        self._param_bw = validate_bitwidth(default_param_bw, self._data_type, "default_param_bw")
        self._percentile: Optional[float] = None
        #: modules passed to exclude_layers_from_quantization (written to encodings files)
        self.excluded_layers: List[str] = []
        #: what the sim was built with (checkpoints rebuild it from these)
        self.dummy_input = dummy_input
        self.init_kwargs: Dict[str, Any] = dict(
            quant_scheme=self._quant_scheme.name, rounding_mode=self._rounding,
            default_output_bw=self._output_bw, default_param_bw=self._param_bw,
            default_data_type=self._data_type)
        self.config: config_mod.HardwareConfig = config_mod.load_config(
            config_mod.DEFAULT_CONFIG if config_file is None else config_file)
        self.init_kwargs["config_file"] = config_mod.read_config_document(config_file)
        self.model = model if in_place else copy.deepcopy(model)
        _replace_attention(self.model)
        leaves = leaf_modules(self.model, lambda m: _is_leaf(m) or is_registered(m))
        leaves = {n: m for n, m in leaves.items() if not isinstance(m, _PASS_THROUGH)}
        self.graph: ModelGraph = trace(self.model, dummy_input, leaves)
        self.placement: Placement = resolve(self.config, self.graph, leaves)
        self._wrap(leaves)
        self._warn_about(leaves)

    # -- construction ---------------------------------------------------------------------------
    def _new_quantizer(self, name: str, role: QuantizerRole, setting: QuantizerSetting,
                       bitwidth: int, shape=(), axis=None) -> Quantizer:
        q = Quantizer(
            bitwidth=bitwidth, symmetric=setting.symmetric, shape=shape, axis=axis,
            rounding=self._rounding, data_type=self._data_type,
            strict=self.placement.strict_symmetric,
            unsigned_symmetric=self.placement.unsigned_symmetric,
            scheme=self._quant_scheme.analyzer, name=name, role=role)
        q.enabled = setting.enabled
        if setting.constraint is not None and self._data_type == "int":
            q.set_range_constraint(*setting.constraint)
        return q

    def _config_blocks(self, name: str, module: nn.Module, q: Quantizer,
                       setting: QuantizerSetting, shape: Tuple[int, ...]) -> None:
        """The config's per-block weights (docs/config.md): where the module type and shape
        allow, else noted for one warning."""
        problem = block_weight_problem(module, shape, setting.block_size)
        if problem is not None or self._data_type != "int":
            self._unblocked.append(f"{name}: {problem or 'float data type'}")
            return
        try:
            q.set_block_size(setting.block_size, shape, setting.decompressed_bw)
        except QuantizationSettingError as exc:  # LPBQ of an asymmetric weight, bad bitwidths
            raise ConfigError(f"config block_size / decompressed_bw for {name}.weight: "
                              f"{exc}") from None

    def _wrap(self, leaves: Dict[str, nn.Module]) -> None:
        self._unblocked: List[str] = []
        for name, module in leaves.items():
            s = self.placement.modules[name]
            quantize_module(module)
            for i, setting in enumerate(s.inputs):
                module.input_quantizers.append(self._new_quantizer(
                    f"{name}.input_quantizers.{i}", QuantizerRole.INPUT, setting,
                    self._output_bw))
            for i, setting in enumerate(s.outputs):
                module.output_quantizers.append(self._new_quantizer(
                    f"{name}.output_quantizers.{i}", QuantizerRole.OUTPUT, setting,
                    self._output_bw))
            params = params_of(module)
            for pname, setting in s.params.items():
                param = params[pname]
                axis = param_axis(module, pname) if setting.per_channel and param.dim() else None
                shape = (param.shape[axis],) if axis is not None else ()
                q = module.param_quantizers[pname] = self._new_quantizer(
                    f"{name}.param_quantizers.{pname}", QuantizerRole.PARAM, setting,
                    self._param_bw, shape, axis)
                if setting.block_size is not None and pname == "weight":
                    self._config_blocks(name, module, q, setting, tuple(param.shape))
        if self._unblocked:
            warnings.warn(
                "the config's block_size leaves these weights at their per-channel / per-tensor "
                f"granularity: {self._unblocked[:10]}", stacklevel=3)
        record_model_size(self.model)  # the param cache's model limit (wrappers)
        # a quantizer lives on the device of its module (or the model's, for parameterless ones)
        model_ref = next(self.model.parameters(), None)
        for name, module in leaves.items():
            ref = next(module.parameters(recurse=False), model_ref)
            if ref is not None:
                for _, q in quantizer_items(module):
                    q.to(ref.device)

    def _warn_about(self, leaves: Dict[str, nn.Module]) -> None:
        unknown = sorted({unwrap_class(m).__name__ for m in leaves.values()
                          if not onnx_types_of(m) and not is_registered(m)})
        if unknown:
            warnings.warn(
                f"quantsim does not know the module type(s) {unknown}: they get a generic "
                "quantizer wrapper (tensor inputs/outputs and float parameters quantized with "
                "the config's defaults). Register them with quantsim.op_types.register_op_type "
                "to apply op_type rules.", stacklevel=3)
        never_called = [n for n in leaves if self.graph.call_counts.get(n, 0) == 0]
        if never_called:
            for n in never_called:
                for _, q in quantizer_items(leaves[n]):
                    q.enabled = False
            warnings.warn(
                f"modules never called with dummy_input have their quantizers disabled: "
                f"{never_called}", stacklevel=3)
        shared = sorted(n for n, c in self.graph.call_counts.items() if c > 1)
        if shared:
            warnings.warn(
                f"modules called more than once per forward share one set of quantizers "
                f"(statistics of all calls merge into one encoding): {shared}. "
                "quantsim.prepare.prepare_model gives each call its own module.", stacklevel=3)
        if self.placement.unquantized_arrivals:
            places = [f"{n} input {i}" for n, i in self.placement.unquantized_arrivals]
            warnings.warn(
                "tensors computed by functional ops or tensor methods (e.g. `x + y`, "
                "torch.cat) are not simulated; their results are quantized where a module "
                f"consumes them: {places}. quantsim.prepare.prepare_model turns such ops into "
                "quantizable modules.", stacklevel=3)

    # -- introspection --------------------------------------------------------------------------
    def named_qmodules(self) -> Iterator[Tuple[str, nn.Module]]:
        """``(name, module)`` for every quantized module of ``sim.model``."""
        for name, module in self.model.named_modules():
            if isinstance(module, QuantizationMixin):
                yield name, module

    def qmodules(self) -> Iterator[nn.Module]:
        """The quantized modules of ``sim.model``."""
        for _, module in self.named_qmodules():
            yield module

    def named_quantizers(self) -> Iterator[Tuple[str, Quantizer]]:
        """``(name, quantizer)`` pairs, e.g. ``('conv1.param_quantizers.weight', q)``."""
        for name, module in self.named_qmodules():
            for suffix, q in quantizer_items(module):
                yield f"{name}.{suffix}", q

    def quantizers(self) -> Iterator[Quantizer]:
        """Every quantizer of the sim."""
        for _, q in self.named_quantizers():
            yield q

    @property
    def quant_scheme(self) -> QuantScheme:
        """The calibration scheme."""
        return self._quant_scheme

    # -- calibration ----------------------------------------------------------------------------
    def set_percentile_value(self, percentile_value: float) -> None:
        """Percentile (50..100) used by the ``percentile`` scheme."""
        if self._quant_scheme is not QuantScheme.post_training_percentile:
            raise QuantizationSettingError(
                "set_percentile_value applies to quant_scheme=post_training_percentile, not "
                f"{self._quant_scheme.name}")
        for q in self.quantizers():
            q.analyzer.set_percentile(percentile_value)
        self._percentile = percentile_value

    def compute_encodings(self, forward_pass_callback: Callable[[nn.Module, Any], Any],
                          forward_pass_callback_args: Any = None) -> None:
        """Calibrate: run ``forward_pass_callback(sim.model, args)`` while quantizers observe,
        then compute every enabled quantizer's encoding with the scheme.

        aimet-torch 2.x's semantics (:mod:`quantsim.calibration`): parameter encodings come
        from the weights, which are fake-quantized with them while the callback runs; every
        input and output quantizer observes its tensor and hands the float values on
        unchanged. Afterwards weight scales are widened where a layer's int32 bias codes would
        overflow. The callback runs in eval mode under ``torch.no_grad()``; every module's
        train/eval mode is restored afterwards.

        Raises:
            CalibrationError: the callback raised (every encoding is put back as it was), or
                enabled quantizers saw no data (listed by name).
        """
        calibration = Calibration(self.model, self.graph)
        calibration.begin()
        try:
            with eval_mode(self.model), torch.no_grad(), progress.forward_passes(
                    self.model, "compute_encodings", progress.batch_total(forward_pass_callback_args)):
                forward_pass_callback(self.model, forward_pass_callback_args)
        except Exception as exc:
            calibration.abort()
            raise CalibrationError(
                f"forward_pass_callback raised {type(exc).__name__}: {exc}; no encodings were "
                "computed and the sim is unchanged") from exc
        missing = calibration.finish()
        if missing:
            raise CalibrationError(
                f"{len(missing)} enabled quantizer(s) saw no data during calibration: {missing}. "
                "Make the callback run the model over inputs that reach them, or disable them "
                "(e.g. sim.model.<module>.input_quantizers[0].enabled = False).")
        if self._quant_scheme.learns_ranges:
            for q in self.quantizers():
                if q.enabled and q.is_initialized:
                    q.set_learnable(True)

    def exclude_layers_from_quantization(self, layers: List[Union[str, nn.Module]]) -> None:
        """Disable every quantizer of the given modules (names, any of a module's paths, or
        module objects); export lists them, by first path, in ``excluded_layers``."""
        if not isinstance(layers, (list, tuple, set)):
            hint = " (wrap it in a list)" if isinstance(layers, (str, nn.Module)) else ""
            raise UnsupportedModelError(
                "exclude_layers_from_quantization: layers must be a list of module names or "
                f"modules, got {type(layers).__name__} {layers!r:.60}{hint}")
        first_names = {m: n for n, m in self.named_qmodules()}
        by_path = {n: m for n, m in self.model.named_modules(remove_duplicate=False)
                   if m in first_names}
        for layer in layers:
            module = by_path.get(layer) if isinstance(layer, str) else layer
            name = first_names.get(module) if isinstance(module, nn.Module) else None
            if name is None:
                raise UnsupportedModelError(
                    f"exclude_layers_from_quantization: {layer!r} is not a quantized module of "
                    f"sim.model; quantized modules: {sorted(first_names.values())[:20]}")
            for _, q in quantizer_items(module):
                q.enabled = False
            if name not in self.excluded_layers:
                self.excluded_layers.append(name)

    # -- export and encodings -------------------------------------------------------------------
    def export(self, path: str, filename_prefix: str, dummy_input: Any,
               onnx_export_args: Optional[dict] = None, propagate_encodings: bool = False,
               export_to_torchscript: bool = False, encoding_version: str = "1.0.0"):
        """Write ``<prefix>.pth``, ``.onnx``, ``.encodings``, ``_torch.encodings`` and
        ``_qdq.onnx`` into ``path`` atomically; see :func:`quantsim.export.export`."""
        from quantsim.export import export
        return export(self, path, filename_prefix, dummy_input, onnx_export_args,
                      propagate_encodings, export_to_torchscript, encoding_version)

    def load_encodings(self, encodings: Any, strict: bool = True, partial: bool = True,
                       requires_grad: Optional[bool] = None, allow_overwrite: bool = True):
        """Apply an encodings file or dict (any version, ONNX- or module-keyed); aimet-torch
        2.x's meaning of each flag; see :func:`quantsim.export.load_encodings`."""
        from quantsim.export import load_encodings
        return load_encodings(self, encodings, strict, partial, requires_grad, allow_overwrite)

    def save_encodings_to_json(self, path: str, filename_prefix: str):
        """Write the module-keyed encodings (aimet-torch's ``_torch.encodings`` layout)."""
        from quantsim.export import save_encodings_to_json
        return save_encodings_to_json(self, path, filename_prefix)

    # -- presentation ---------------------------------------------------------------------------
    def __str__(self) -> str:
        rows = [("quantizer", "bitwidth", "symmetric", "per-channel", "min", "max", "scale",
                 "offset")]
        for name, q in self.named_quantizers():
            if not q.enabled:
                continue
            enc = q.encoding
            per_channel = "yes" if q.axis is not None else "no"
            if q.block_size is not None:
                per_channel = f"block {q.block_size}" + (" LPBQ" if q.decompressed_bw else "")
            if enc is None:
                values = ("-",) * 4
            elif enc.is_float:
                values = ("fp16",) + ("-",) * 3
            elif enc.per_channel or enc.per_block:
                values = (f"{float(enc.min.min()):.4g}", f"{float(enc.max.max()):.4g}",
                          f"[{float(enc.scale.min()):.3g}..{float(enc.scale.max()):.3g}]",
                          f"[{int(enc.offset.min())}..{int(enc.offset.max())}]")
            else:
                values = (f"{float(enc.min):.4g}", f"{float(enc.max):.4g}",
                          f"{float(enc.scale):.4g}", f"{int(enc.offset)}")
            rows.append((name, str(q.bitwidth), str(q.symmetric), per_channel) + values)
        return (f"QuantizationSimModel ({self._quant_scheme.name}, config "
                f"{self.config.source}): {len(rows) - 1} enabled quantizers\n"
                + format_table(rows[0], rows[1:]))

    def __repr__(self) -> str:
        return f"QuantizationSimModel(scheme={self._quant_scheme.name}, model={type(self.model).__name__})"


def _refuse_data_parallel(model: nn.Module) -> None:
    if isinstance(model, nn.DataParallel):
        raise UnsupportedModelError(
            "torch.nn.DataParallel is not supported: pass the underlying model (model.module) "
            "and, for multi-GPU training, wrap sim.model in "
            "torch.nn.parallel.DistributedDataParallel instead")


def _replace_attention(model: nn.Module) -> None:
    """Swap nn.MultiheadAttention for a quantizable equivalent (same float outputs)."""
    if not any(isinstance(m, nn.MultiheadAttention) for m in model.modules()):
        return
    from quantsim.nn.attention import replace_multihead_attention
    replace_multihead_attention(model)
