"""The sim behind a retrain model: quantizers set up from the config, and the forward hooks of
:class:`QuantRetrainSession` that drive calibration, range training and the record file.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from quantsim.calibration import Calibration, calibrates, data_quantizer
from quantsim.encodings import write_torch_encodings
from quantsim.errors import CalibrationError, QuantizationSettingError, UnsupportedModelError
from quantsim.export.load import torch_encodings_file
from quantsim.op_types import params_of
from quantsim.quantizer import Quantizer
from quantsim.retrain.config import PathLike, RetrainConfig
from quantsim.sim import QuantizationSimModel, QuantScheme
from quantsim.states import FakeQuantState, apply_phase
from quantsim.wrappers import param_axis

#: Conv layers with at most this many input channels get an accuracy warning.
SMALL_CIN = 16
_SESSION_ATTR = "_quantsim_retrain_session"


def _unwrap(model: nn.Module, where: str) -> nn.Module:
    if isinstance(model, nn.DataParallel):
        raise UnsupportedModelError(
            f"{where}: torch.nn.DataParallel is not supported; pass the model itself and, for "
            "multi-GPU training, wrap the returned model in "
            "torch.nn.parallel.DistributedDataParallel instead")
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.module
    return model


def _set_channel_wise(module: nn.Module, channel_wise: bool) -> None:
    """Replace the weight quantizer by a per-channel / per-tensor one with the same settings."""
    old = module.param_quantizers["weight"]
    if (old.axis is not None) == channel_wise or old.data_type != "int":
        return
    weight = params_of(module)["weight"]
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
        qname = data_quantizer(qmodules, sim.graph, name)
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
        self._phase: Optional[FakeQuantState] = None
        self._zero_hooks: list = []
        self._calibration: Optional[Calibration] = None
        self.learns_ranges = QuantScheme.parse(config.global_settings.quant_scheme).learns_ranges
        if self.learns_ranges:  # trainable min/max exist from the start, for the optimizer
            for _, q in self._calibrated_quantizers():
                q.set_learnable(True, init=(0.0, 0.0))  # calibration sets the values
        self._hooks: list = []
        self.attach()

    @property
    def batch_num(self) -> int:
        """Training forwards that calibrate."""
        return self.config.global_settings.batch_num

    @property
    def calibrated(self) -> bool:
        """True once ``batch_num`` training forwards ran and their encodings were computed (or
        a restore loaded encodings); asking completes a calibration that is due."""
        self.complete_calibration()
        return self.batches_seen >= self.batch_num and self._calibration is None

    def complete_calibration(self) -> None:
        """Compute the encodings once ``batch_num`` calibration forwards ran.

        This runs before the next forward (or when :attr:`calibrated` is asked), not inside the
        last calibration forward: that forward's backward still needs the weight encodings it
        used, which finishing may change in place.

        Raises:
            CalibrationError: quantizers saw no data; calibration starts again with the next
                training forward.
        """
        if self._calibration is not None and self.batches_seen >= self.batch_num:
            self._finish_calibration()

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
        return [(n, q) for n, q in self.sim.named_quantizers() if _retrain_calibrates(q)]

    # -- hooks ----------------------------------------------------------------------------------
    def _before(self, module: nn.Module, args: Any) -> None:
        self.complete_calibration()
        if module.training:
            self._enter(FakeQuantState.QAT if self.calibrated else FakeQuantState.CALIBRATION)
        elif not self.calibrated:
            raise CalibrationError(
                f"the retrain model is still calibrating: {self.batches_seen} of batch_num="
                f"{self.batch_num} training-mode forwards have run; run more training batches "
                "(model.train()) before evaluating it")
        else:
            if self._phase is not FakeQuantState.VALIDATION:
                self._enter(FakeQuantState.VALIDATION)
                self.write_record()

    def _after(self, module: nn.Module, args: Any, output: Any) -> None:
        if not module.training:
            return
        self.batches_seen += 1

    def _enter(self, phase: FakeQuantState) -> None:
        if phase == self._phase:
            return
        for h in self._zero_hooks:
            h.remove()
        self._zero_hooks = []
        if phase is FakeQuantState.CALIBRATION:
            if self._calibration is None:
                self._calibration = Calibration(self.sim.model, self.sim.graph,
                                                _retrain_calibrates)
                self._calibration.begin()
            for _, q in self._calibrated_quantizers():
                if q.learnable:  # a zero gradient: DDP sees every parameter used
                    self._zero_hooks.append(q.register_forward_hook(_touch_range))
        else:
            apply_phase([q for q in self.sim.quantizers() if q.enabled], phase)
        self._phase = phase

    def _finish_calibration(self) -> None:
        missing = self._calibration.finish()
        self._calibration = None
        self._phase = None
        if missing:
            self.batches_seen = 0  # not calibrated: saving stays refused until a new calibration
            raise CalibrationError(
                f"{len(missing)} enabled quantizer(s) saw no data in the {self.batch_num} "
                f"calibration batches: {missing[:10]}; skip their layers in the config")

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
        self._calibration = None
        self._phase = None


def _retrain_calibrates(q: Quantizer) -> bool:
    """The retrain workflow calibrates integer quantizers only (fp16 ones need no encoding)."""
    return calibrates(q) and q.data_type == "int"


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
