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
calibration     train()      forwards 1..batch_num: quantsim.calibration's path (weights
                             encoded and fake-quantized, activations observed and passed on
                             in float); once forward ``batch_num`` ran (at the next forward)
                             the encodings are computed (statistics merged across ranks)
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

from quantsim.retrain.config import RetrainConfig, RetrainGlobalSettings, RetrainLayerSettings
from quantsim.retrain.session import QuantRetrainSession, get_retrain_session
from quantsim.retrain.workflow import (create_quant_retrain_config, create_quant_retrain_model,
                                       restore_quant_retrain_model, save_quant_retrain_model)

__all__ = ["RetrainConfig", "RetrainGlobalSettings", "RetrainLayerSettings", "QuantRetrainSession",
           "create_quant_retrain_config", "create_quant_retrain_model",
           "restore_quant_retrain_model", "save_quant_retrain_model", "get_retrain_session"]
