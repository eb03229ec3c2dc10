"""The whole-model retrain workflow (quantsim.retrain) on scikit-learn's digits.

Each test's docstring states the invariant it checks. Training runs with one intra-op thread
(tiny models are slower with two on a shared 2-core machine); runs are short (a few dozen
batches), which is enough for the invariants.
"""
from __future__ import annotations

import json
import socket
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.distributed as dist
from torch import nn

from models import DigitsCNN, accuracy, digits_data, train
from quantsim.errors import (CalibrationError, CheckpointError, ConfigError,
                             QuantizationSettingError, UnsupportedModelError)
from quantsim.retrain import (RetrainConfig, create_quant_retrain_config,
                              create_quant_retrain_model, get_retrain_session,
                              restore_quant_retrain_model, save_quant_retrain_model)

pytestmark = [pytest.mark.filterwarnings(
    "ignore:convolutions with at most 16 input channels", "ignore:convert_qat_model. this CPU",
    "ignore::DeprecationWarning", "ignore::FutureWarning"), pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def data():
    return digits_data()


@pytest.fixture(scope="module")
def float_model(data):
    """DigitsCNN trained in float (4 epochs)."""
    torch.manual_seed(0)
    return train(DigitsCNN(), data[0], data[1], epochs=4)


def _batches(n: int, size: int = 64, seed: int = 1, total: int = 1437):
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(total, generator=g)
    return [perm[(i * size) % total:(i * size) % total + size] for i in range(n)]


def _steps(model, opt, x, y, batches):
    model.train()
    for idx in batches:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()


def _setup(tmp_path, model, x, definition=None, name="c"):
    cfg, rec = tmp_path / f"{name}.json", tmp_path / f"{name}_record.json"
    create_quant_retrain_config(cfg, model, x[:8], definition)
    return cfg, rec, create_quant_retrain_model(cfg, model, rec, x[:8])


def _ort(path, x, level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
    so = ort.SessionOptions()
    so.graph_optimization_level = level
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


# ----------------------------------------------------------------------------------------------
# end to end
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def int8_run(tmp_path_factory, data, float_model):
    """config -> model -> 20 QAT batches -> eval (writes the record) -> save."""
    x, y, xt, _ = data
    tmp = tmp_path_factory.mktemp("int8")
    cfg, rec, q = _setup(tmp, float_model, x, {"batch_num": 5})
    _steps(q, torch.optim.Adam(q.parameters(), lr=1e-3), x, y, _batches(20))
    q.eval()
    with torch.no_grad():
        logits = q(xt)
    paths = save_quant_retrain_model(cfg, q, rec, tmp / "out" / "net", x[:1])
    return q, rec, paths, logits


def test_end_to_end_accuracy_and_record(int8_run, data, float_model):
    """The retrained int8 model keeps the float accuracy within 2 points; the record file
    holds an encoding for every enabled quantizer, equal to the sim's."""
    q, rec, _, _ = int8_run
    _, _, xt, yt = data
    assert accuracy(q, xt, yt) >= accuracy(float_model, xt, yt) - 0.02
    doc = json.loads(rec.read_text())
    sim = get_retrain_session(q).sim
    enabled = [n for n, qz in sim.named_quantizers() if qz.enabled]
    assert len(enabled) == 7
    assert doc["param_encodings"]["fc.weight"][0]["bitwidth"] == 8
    scale = doc["activation_encodings"]["fc"]["output"]["0"]["scale"]
    assert scale == pytest.approx(float(q.fc.output_quantizers[0].get_scale().detach()), rel=1e-6)


@pytest.mark.parametrize("level", [ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                                   ort.GraphOptimizationLevel.ORT_ENABLE_ALL])
def test_onnx_files_agree_with_pytorch(int8_run, data, level):
    """Both ONNX files run in ORT; argmax agreement >= 99 % and logits within 2 LSB of the
    output quantizer (the fake-quant model is exact without ORT's fusions; the deploy model's
    int32 bias, and fused kernels, flip a few roundings by one step)."""
    q, _, paths, logits = int8_run
    lsb = float(q.fc.output_quantizers[0].get_scale().detach())
    xt = data[2]
    for path in paths:
        out = _ort(path, xt, level)
        diff = np.abs(out - logits.numpy()) / lsb
        assert (out.argmax(1) == logits.numpy().argmax(1)).mean() >= 0.99, path
        assert diff.max() <= 2.01, (path, diff.max())
        assert (diff > 0.01).mean() < 0.05, path
    fake_quant = onnx.load(paths.fake_quant_path)
    deploy = onnx.load(paths.deploy_path)
    assert sum(n.op_type == "QuantizeLinear" for n in fake_quant.graph.node) >= 7
    int8 = [t for t in deploy.graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert {t.name.split("_")[0] for t in int8} >= {"conv1.weight", "conv2.weight", "fc.weight"}
    if level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL:  # no fusions: float sums only
        diff = np.abs(_ort(paths.fake_quant_path, xt, level) - logits.numpy()) / lsb
        assert diff.max() <= 1.01 and (diff > 0.01).mean() < 0.01


def test_int4_save_runs_in_ort(tmp_path, data, float_model):
    """dst_type INT4: the 4-bit pairs are stored in 8-bit containers (opset 20), the weight
    codes of the deploy model lie in [-8, 7], and ORT agrees with PyTorch within 2 LSB, with
    >= 99 % argmax agreement without ORT's fusions and >= 98 % with them (fused kernels
    requantize directly; one-step flips weigh more on a 16-level grid)."""
    x, y, xt, _ = data
    cfg, rec, q = _setup(tmp_path, float_model, x, {"batch_num": 3, "dst_type": "INT4"})
    _steps(q, torch.optim.Adam(q.parameters(), lr=1e-3), x, y, _batches(6))
    q.eval()
    with torch.no_grad():
        logits = q(xt).numpy()
    paths = save_quant_retrain_model(cfg, q, rec, tmp_path / "int4", x[:1])
    deploy = onnx.load(paths.deploy_path)
    assert deploy.opset_import[0].version == 20
    codes = [onnx.numpy_helper.to_array(t) for t in deploy.graph.initializer
             if t.data_type == onnx.TensorProto.INT8]
    assert codes and all(c.min() >= -8 and c.max() <= 7 for c in codes)
    lsb = float(q.fc.output_quantizers[0].get_scale().detach())
    for path in paths:
        for level, agree in ((ort.GraphOptimizationLevel.ORT_DISABLE_ALL, 0.99),
                             (ort.GraphOptimizationLevel.ORT_ENABLE_ALL, 0.98)):
            out = _ort(path, xt, level)
            assert (out.argmax(1) == logits.argmax(1)).mean() >= agree, (path, level)
            assert np.abs(out - logits).max() / lsb <= 2.01, (path, level)


# ----------------------------------------------------------------------------------------------
# resuming
# ----------------------------------------------------------------------------------------------
def test_resume_gives_the_same_factors(tmp_path, data, float_model):
    """Interrupted after 8 of 14 batches (state_dict + optimizer saved), restored into a fresh
    float model, the run ends with the same record file and state_dict as an uninterrupted one."""
    x, y, xt, _ = data
    batches = _batches(14, size=32, seed=3)
    cfg = tmp_path / "c.json"
    create_quant_retrain_config(cfg, float_model, x[:8], {"batch_num": 4})

    q = create_quant_retrain_model(cfg, float_model, tmp_path / "full.json", x[:8])
    opt = torch.optim.Adam(q.parameters(), lr=1e-3)
    _steps(q, opt, x, y, batches)
    with torch.no_grad():
        q.eval()(xt[:16])

    q1 = create_quant_retrain_model(cfg, float_model, tmp_path / "part.json", x[:8])
    opt1 = torch.optim.Adam(q1.parameters(), lr=1e-3)
    _steps(q1, opt1, x, y, batches[:8])
    torch.save({"model": q1.state_dict(), "optimizer": opt1.state_dict()}, tmp_path / "ck.pth")
    del q1, opt1

    torch.manual_seed(123)
    q2 = restore_quant_retrain_model(cfg, DigitsCNN(), tmp_path / "part.json", x[:8],
                                     tmp_path / "ck.pth", state_dict_name="model")
    assert get_retrain_session(q2).calibrated
    opt2 = torch.optim.Adam(q2.parameters(), lr=1e-3)
    opt2.load_state_dict(torch.load(tmp_path / "ck.pth", weights_only=True)["optimizer"])
    _steps(q2, opt2, x, y, batches[8:])
    with torch.no_grad():
        q2.eval()(xt[:16])
    assert (tmp_path / "full.json").read_text() == (tmp_path / "part.json").read_text()
    full, resumed = q.state_dict(), q2.state_dict()
    assert full.keys() == resumed.keys()
    assert all(torch.equal(full[k], resumed[k]) for k in full)


def test_restore_from_float_weights_takes_the_record(tmp_path, data, float_model):
    """A float-only state_dict (saved from a DDP wrapper: 'module.' keys) takes its encodings
    from the record file: the restored quantizers equal the recorded ones."""
    x, y, _, _ = data
    cfg, rec, q = _setup(tmp_path, float_model, x, {"batch_num": 2})
    _steps(q, torch.optim.SGD(q.parameters(), lr=1e-2), x, y, _batches(3))
    with torch.no_grad():
        q.eval()(x[:4])
    floats = {f"module.{k}": v for k, v in float_model.state_dict().items()}
    torch.save(floats, tmp_path / "float.pth")
    r = restore_quant_retrain_model(cfg, DigitsCNN(), rec, x[:8], tmp_path / "float.pth")
    assert get_retrain_session(r).calibrated
    for (name, a), (_, b) in zip(get_retrain_session(q).sim.named_quantizers(),
                                 get_retrain_session(r).sim.named_quantizers()):
        if a.enabled:
            torch.testing.assert_close(b.get_scale(), a.get_scale(), rtol=1e-6, atol=0, msg=name)


def test_restore_during_calibration_calibrates_again(tmp_path, data, float_model):
    """A state saved before batch_num batches restores uncalibrated (warning), and the next
    batch_num training batches calibrate it."""
    x, y, _, _ = data
    cfg, rec, q = _setup(tmp_path, float_model, x, {"batch_num": 3})
    _steps(q, torch.optim.SGD(q.parameters(), lr=1e-2), x, y, _batches(1))
    torch.save(q.state_dict(), tmp_path / "early.pth")
    with pytest.warns(UserWarning, match="calibrate again"):
        r = restore_quant_retrain_model(cfg, DigitsCNN(), rec, x[:8], tmp_path / "early.pth")
    session = get_retrain_session(r)
    assert not session.calibrated
    _steps(r, torch.optim.SGD(r.parameters(), lr=1e-2), x, y, _batches(3))
    assert session.calibrated and r.fc.output_quantizers[0].is_initialized


def test_restore_refuses_foreign_files(tmp_path, data, float_model):
    """A pth without the named entry, or for another architecture, is a CheckpointError
    naming the problem."""
    x = data[0]
    cfg, rec, _ = _setup(tmp_path, float_model, x)
    torch.save({"weights": float_model.state_dict()}, tmp_path / "a.pth")
    with pytest.raises(CheckpointError, match="state_dict_name"):
        restore_quant_retrain_model(cfg, DigitsCNN(), rec, x[:8], tmp_path / "a.pth")
    with pytest.raises(CheckpointError, match="'model' entry"):
        restore_quant_retrain_model(cfg, DigitsCNN(), rec, x[:8], tmp_path / "a.pth", "model")
    torch.save({"fc.weight": torch.zeros(3, 3)}, tmp_path / "b.pth")
    with pytest.raises(CheckpointError, match="does not fit"):
        restore_quant_retrain_model(cfg, DigitsCNN(), rec, x[:8], tmp_path / "b.pth")


# ----------------------------------------------------------------------------------------------
# phases and errors
# ----------------------------------------------------------------------------------------------
def test_save_or_eval_before_batch_num_is_an_error(tmp_path, data, float_model):
    """Before batch_num training batches, eval forwards and saving raise CalibrationError
    saying how many batches ran; no ONNX file is written."""
    x, y, _, _ = data
    cfg, rec, q = _setup(tmp_path, float_model, x, {"batch_num": 4})
    _steps(q, torch.optim.SGD(q.parameters(), lr=1e-2), x, y, _batches(2))
    with pytest.raises(CalibrationError, match="2 of batch_num=4"):
        save_quant_retrain_model(cfg, q, rec, tmp_path / "net", x[:1])
    with pytest.raises(CalibrationError, match="still calibrating"):
        q.eval()(x[:2])
    assert not list(tmp_path.glob("net*")) and not rec.exists()


def test_calibration_then_learned_ranges(tmp_path, data, float_model):
    """Forwards 1..batch_num calibrate (ranges appear once the last one has run: before the next
    forward, or when the session is asked; min/max get no gradient before); then the optimizer
    moves min/max."""
    x, y, _, _ = data
    cfg, rec, q = _setup(tmp_path, float_model, x, {"batch_num": 3})
    oq = q.relu1.output_quantizers[0]
    opt = torch.optim.Adam(q.parameters(), lr=1e-2)
    _steps(q, opt, x, y, _batches(2))
    assert not oq.is_initialized and not oq.max.grad.abs().sum()
    _steps(q, opt, x, y, _batches(1, seed=5))
    assert get_retrain_session(q).calibrated and oq.is_initialized
    before = oq.max.detach().clone()
    _steps(q, opt, x, y, _batches(2, seed=6))
    assert not torch.equal(before, oq.max.detach())


def test_tf_scheme_follows_the_data(tmp_path, data, float_model):
    """quant_scheme 'tf': no trainable ranges; after calibration, training forwards move the
    activation ranges (moving average) and eval forwards do not."""
    x, y, _, _ = data
    cfg, rec, q = _setup(tmp_path, float_model, x, {"batch_num": 2, "quant_scheme": "tf"})
    assert not any(".min" in n or ".max" in n for n, _ in q.named_parameters())
    _steps(q, torch.optim.SGD(q.parameters(), lr=1e-2), x, y, _batches(2))
    assert get_retrain_session(q).calibrated
    oq = q.relu2.output_quantizers[0]
    scale = oq.get_scale().clone()
    _steps(q, torch.optim.SGD(q.parameters(), lr=1e-2), x, y, _batches(1, seed=9))
    moved = oq.get_scale().clone()
    assert not torch.equal(scale, moved)
    with torch.no_grad():
        q.eval()(x[:64])
    assert torch.equal(moved, oq.get_scale())


def test_data_parallel_is_refused(tmp_path, data, float_model):
    """DataParallel is refused by every entry point, with a pointer to DDP."""
    x = data[0]
    dp = nn.DataParallel(float_model)
    with pytest.raises(UnsupportedModelError, match="DistributedDataParallel"):
        create_quant_retrain_config(tmp_path / "c.json", dp, x[:8])
    cfg, rec, _ = _setup(tmp_path, float_model, x)
    with pytest.raises(UnsupportedModelError, match="DistributedDataParallel"):
        create_quant_retrain_model(cfg, dp, rec, x[:8])
    with pytest.raises(UnsupportedModelError, match="DistributedDataParallel"):
        save_quant_retrain_model(cfg, dp, rec, tmp_path / "n", x[:1])


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed missing")
def test_ddp_single_rank(tmp_path, data):
    """A DDP-wrapped float model is unwrapped; the retrain model wrapped in DDP (default
    find_unused_parameters=False) trains through calibration and writes its record."""
    x, y, _, _ = data
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        wrapped = nn.parallel.DistributedDataParallel(DigitsCNN())
        cfg, rec, q = _setup(tmp_path, wrapped, x, {"batch_num": 2})
        ddp = nn.parallel.DistributedDataParallel(q)
        _steps(ddp, torch.optim.Adam(ddp.parameters(), lr=1e-3), x, y, _batches(4, size=32))
        with torch.no_grad():
            ddp.eval()(x[:8])
        assert get_retrain_session(ddp).calibrated and rec.is_file()
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------
# the config file
# ----------------------------------------------------------------------------------------------
def test_edited_skip_disables_the_layer(tmp_path, data, float_model):
    """Setting "skip": true for conv2 in the written file (AIMET string booleans accepted)
    disables every quantizer of conv2 and lists it in excluded_layers; the others stay."""
    x = data[0]
    cfg = tmp_path / "c.json"
    create_quant_retrain_config(cfg, float_model, x[:8])
    doc = json.loads(cfg.read_text())
    doc["layers"]["conv2"]["skip"] = "True"
    cfg.write_text(json.dumps(doc))
    q = create_quant_retrain_model(cfg, float_model, tmp_path / "r.json", x[:8])
    sim = get_retrain_session(q).sim
    assert not any(qz.enabled for n, qz in sim.named_quantizers() if n.startswith("conv2."))
    assert q.conv1.param_quantizers["weight"].enabled and q.fc.param_quantizers["weight"].enabled
    assert sim.excluded_layers == ["conv2"]


def test_layer_settings_reach_the_quantizers(tmp_path, data, float_model):
    """weight_bitwidth sets the weight quantizer, activation_bitwidth the quantizer of the data
    entering the layer (conv2's input comes from relu1 through the max-pool), channel_wise
    false makes the weight per tensor."""
    x = data[0]
    definition = {"layers": {"conv2": {"weight_bitwidth": 4, "activation_bitwidth": 4},
                             "fc": {"channel_wise": False}}}
    _, _, q = _setup(tmp_path, float_model, x, definition)
    assert q.conv2.param_quantizers["weight"].bitwidth == 4
    assert q.relu1.output_quantizers[0].bitwidth == 4
    assert q.conv1.input_quantizers[0].bitwidth == 8
    assert q.fc.param_quantizers["weight"].axis is None
    assert q.conv1.param_quantizers["weight"].axis == 0


def test_config_definition_overrides(tmp_path, data, float_model):
    """Global keys, skip_types and per-layer entries apply (per-layer wins); the JSON file
    round-trips into the same RetrainConfig."""
    x = data[0]
    cfg = tmp_path / "c.json"
    written = create_quant_retrain_config(
        cfg, float_model, x[:8], config_definition={
            "batch_num": 7, "dst_type": "INT4", "quant_scheme": "range_learning_tf_enhanced",
            "skip_types": ["Conv2d"], "layers": {"conv1": {"skip": False}}})
    assert written == RetrainConfig.load(cfg)
    g = written.global_settings
    assert (g.batch_num, g.bitwidth, g.quant_scheme) == (7, 4, "range_learning_tf_enhanced")
    assert [n for n, s in written.layers.items() if s.skip] == ["conv2"]
    assert written.layers["fc"].weight_bitwidth == 4


@pytest.mark.parametrize("definition,error,match", [
    ({"batch_num": 0}, QuantizationSettingError, "batch_num"),
    ({"dst_type": "INT2"}, QuantizationSettingError, "dst_type"),
    ({"skip_layers": ["nope"]}, QuantizationSettingError, "nope"),
    ({"skip_types": ["ConvTranspose2d"]}, QuantizationSettingError, "no ConvTranspose2d"),
    ({"layers": {"fc": {"weight_bitwidth": 6}}}, QuantizationSettingError, "bitwidth 6"),
    ({"colour": "red"}, QuantizationSettingError, "colour"),
])
def test_bad_definitions_are_refused(tmp_path, data, float_model, definition, error, match):
    """Every bad override raises, naming the key or value; nothing is written."""
    with pytest.raises(error, match=match):
        create_quant_retrain_config(tmp_path / "c.json", float_model, data[0][:8], definition)
    assert not (tmp_path / "c.json").exists()


def test_config_file_checks(tmp_path, data, float_model):
    """Both spellings at once, an unknown key in the file, a missing file, a config made for
    another model, and a different config at save time are all refused."""
    x = data[0]
    cfg = tmp_path / "c.json"
    with pytest.raises(QuantizationSettingError, match="not both"):
        create_quant_retrain_config(cfg, float_model, x[:8], {}, config_definition={})
    create_quant_retrain_config(cfg, float_model, x[:8])
    doc = json.loads(cfg.read_text())
    doc["layers"]["fc"]["bias_bitwidth"] = 8
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    with pytest.raises(QuantizationSettingError, match="bias_bitwidth"):
        create_quant_retrain_model(tmp_path / "bad.json", float_model, tmp_path / "r", x[:8])
    with pytest.raises(ConfigError, match="not found"):
        create_quant_retrain_model(tmp_path / "none.json", float_model, tmp_path / "r", x[:8])
    other = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with pytest.raises(QuantizationSettingError, match="another one"):
        create_quant_retrain_model(cfg, other, tmp_path / "r", x[:8])


class _Reflect(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pad_conv = nn.Conv2d(1, 4, 3, padding=1, padding_mode="reflect")
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 64, 10)

    def forward(self, x):  # noqa: D102
        return self.fc(torch.flatten(self.conv(self.pad_conv(x)), 1))


def test_unsupported_layers_are_skipped_and_small_cin_warns(tmp_path, data):
    """A reflect-padded conv is written skipped with a note; un-skipping it is an
    UnsupportedModelError; convolutions with Cin <= 16 warn, naming them."""
    x = data[0]
    cfg = tmp_path / "c.json"
    written = create_quant_retrain_config(cfg, _Reflect(), x[:8])
    assert written.layers["pad_conv"].skip and "padding_mode" in written.layers["pad_conv"].note
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        create_quant_retrain_model(cfg, _Reflect(), tmp_path / "r.json", x[:8])
    assert any("conv (Cin=4)" in str(w.message) for w in caught)
    doc = json.loads(cfg.read_text())
    doc["layers"]["pad_conv"]["skip"] = False
    cfg.write_text(json.dumps(doc))
    with pytest.raises(UnsupportedModelError, match="pad_conv"):
        create_quant_retrain_model(cfg, _Reflect(), tmp_path / "r.json", x[:8])
