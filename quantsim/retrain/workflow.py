"""The four workflow calls: write the retrain config of a model, build the retrain model
(create, or restore from a saved state), and save it as fake-quant and deploy ONNX models.
"""
from __future__ import annotations

import copy
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

import onnx
import torch
from torch import nn

from quantsim.errors import (CalibrationError, CheckpointError, QuantizationSettingError,
                             UnsupportedModelError)
from quantsim.export.qat_onnx import (DEPLOY_SUFFIX, FAKE_QUANT_SUFFIX, ConvertedQATModel,
                                      convert_qat_model)
from quantsim.export.qdq import widen_4bit_pairs
from quantsim.retrain.config import (PathLike, RetrainConfig, _apply_definition,
                                     _check_against_model, _read_json, _scan)
from quantsim.retrain.session import (QuantRetrainSession, _apply_layers, _unwrap,
                                      _warn_small_cin, get_retrain_session)
from quantsim.sim import QuantizationSimModel


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
        input_data: an input the model accepts (tensor, tuple of positional inputs, or dict
            read by ``forward``'s signature: :func:`quantsim.graph.split_dummy_input`); one
            forward in eval mode shows which layers run.
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
