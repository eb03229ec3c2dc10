"""Fused conv/linear-BN modules inside a QuantizationSimModel: simulated as their folded layer
(bit for bit what a sim of the folded model computes), trained with BatchNorm statistics in
QAT, exported exactly as the folded model is."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import torch
from torch import nn

import quantsim.nn as qnn
from conftest import DEVICES
from models import accuracy, digits_data, randomize_batch_norms, train
from quantsim import FakeQuantState, load_checkpoint, save_checkpoint, set_fake_quantize
from quantsim.export import export, load_encodings, verify
from quantsim.nn.fused import activation_destinations
from quantsim.op_types import output_types_of, params_of, register_op_type
from quantsim.prepare import fold_all_batch_norms, fuse_all_conv_bn
from quantsim.sim import QuantizationSimModel

pytestmark = pytest.mark.usefixtures("one_thread")
DYNAMIC_BATCH = {"input_names": ["input"], "dynamic_axes": {"input": {0: "batch"}}}


def chain_model() -> nn.Sequential:
    """Every kind of foldable chain: conv-BN-ReLU, grouped conv without bias-BN-ReLU6,
    transposed conv-BN (then a Hardswish, which is not fused), linear-BN."""
    torch.manual_seed(0)
    return randomize_batch_norms(nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=2, bias=False), nn.BatchNorm2d(8), nn.ReLU6(),
        nn.ConvTranspose2d(8, 4, 2, stride=2), nn.BatchNorm2d(4), nn.Hardswish(),
        nn.Flatten(), nn.Linear(4 * 16 * 16, 6), nn.BatchNorm1d(6))).eval()


def fused_and_folded(model: nn.Module, x: torch.Tensor):
    """The model prepared both ways: fuse_all_conv_bn (QAT) and fold_all_batch_norms."""
    fused, folded = copy.deepcopy(model), copy.deepcopy(model)
    pairs = fuse_all_conv_bn(fused, dummy_input=x)
    assert len(fold_all_batch_norms(folded, None, dummy_input=x)) == len(pairs)
    return fused, folded


def calibrated(model: nn.Module, x: torch.Tensor, data: torch.Tensor, **kwargs):
    sim = QuantizationSimModel(model, x, quant_scheme=kwargs.pop("quant_scheme", "tf"), **kwargs)
    sim.compute_encodings(lambda m, _: m(data), None)
    return sim


def folded_name(qname: str, destinations) -> str:
    """The folded sim's name for a fused sim's quantizer: a fused module's output quantizer
    is the one of its activation, which the folded model keeps at its own place."""
    module, _, rest = qname.partition(".output_quantizers.")
    if rest and module in destinations:
        return f"{destinations[module]}.output_quantizers.{rest}"
    return qname


@pytest.fixture(scope="module")
def chain():
    model = chain_model()
    x = torch.randn(2, 3, 8, 8)
    return model, x, fused_and_folded(model, x), torch.randn(32, 3, 8, 8)


# -- the sim: one quantized module, typed as its layer --------------------------------------------
def test_fused_modules_are_quantized_as_their_layer(chain):
    """Each fused module is one quantized module (children not wrapped): its weight and bias
    quantizers act on the folded tensors (per output channel of the folded weight: axis 1
    for the transposed conv), its output quantizer after the activation follows the
    activation's op type."""
    _, x, (fused, _), data = chain
    sim = calibrated(fused, x, data, config_file="per_channel")
    names = [n for n, _ in sim.named_qmodules()]
    assert names == ["0", "3", "6", "8", "9", "10"]  # Identity slots are not wrapped
    conv, gconv, convt, linear = (sim.model[i] for i in (0, 3, 6, 10))
    assert isinstance(conv, qnn.ConvBn) and isinstance(linear, qnn.LinearBn)
    for module, axis in ((conv, 0), (gconv, 0), (convt, 1), (linear, 0)):
        weight_q = module.param_quantizers["weight"]
        folded = params_of(module)["weight"]
        assert weight_q.axis == axis and tuple(weight_q.shape) == (folded.shape[axis],)
        assert not module.param_quantizers["bias"].enabled  # the config keeps biases float
        assert set(params_of(module)) == {"weight", "bias"}
    assert output_types_of(conv) == ("Relu",) and output_types_of(gconv) == ("Clip",)
    assert output_types_of(convt) == ("ConvTranspose",)
    assert not any(".layer." in n or ".bn." in n for n, _ in sim.named_quantizers())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config,scheme", [("per_channel", "tf"), ("default", "tf_enhanced"),
                                           ("htp", "tf")])
def test_fused_sim_equals_folded_sim_bit_for_bit(chain, config, scheme, device):
    """Same calibration data: the same quantizers are enabled (a fused module's output
    quantizer standing for its activation's), every encoding is equal and the eval outputs are
    bit-identical; htp's Relu encoding constraint reaches the fused module's output."""
    _, x, (fused, folded), data = chain
    x, data = x.to(device), data.to(device)
    sims = [calibrated(copy.deepcopy(m).to(device), x, data, config_file=config,
                       quant_scheme=scheme) for m in (fused, folded)]
    destinations = activation_destinations(sims[0].model)
    assert destinations == {"0": "2", "3": "5"}
    enabled = [{n: q for n, q in s.named_quantizers() if q.enabled} for s in sims]
    renamed = {folded_name(n, destinations): q for n, q in enabled[0].items()}
    assert sorted(renamed) == sorted(enabled[1])
    for name, q in renamed.items():
        assert q.encoding == enabled[1][name].encoding, name
    if config == "htp":
        assert renamed["2.output_quantizers.0"].range_constraint[0] == 0.0
    with torch.no_grad():
        outs = [s.model(data) for s in sims]
    assert torch.equal(outs[0], outs[1])


def test_hand_fused_without_activation_joins_the_supergroup():
    """A fused module followed by a ReLU module is the Conv of a Conv+Relu supergroup (its
    output quantizer off), as the folded conv is; sims and outputs agree bit for bit."""
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(3, 4, 3), randomize_batch_norms(nn.BatchNorm2d(4))
    fused = nn.Sequential(qnn.ConvBn(conv, bn), nn.ReLU()).eval()
    folded = nn.Sequential(fused[0].folded_layer(), nn.ReLU()).eval()
    x, data = torch.randn(2, 3, 8, 8), torch.randn(16, 3, 8, 8)
    sims = [calibrated(m, x, data) for m in (fused, folded)]
    for sim in sims:
        assert [n for n, q in sim.named_quantizers() if q.enabled] == [
            "0.input_quantizers.0", "0.param_quantizers.weight", "1.output_quantizers.0"]
    assert sims[0].model[0].param_quantizers["weight"].encoding == \
        sims[1].model[0].param_quantizers["weight"].encoding
    with torch.no_grad():
        assert torch.equal(sims[0].model(data), sims[1].model(data))


@pytest.mark.parametrize("device", DEVICES)
def test_eval_reuses_the_folded_weight_until_a_source_changes(chain, device):
    """Without grad the folded weight is computed once and then kept, like a parameter: the
    same tensor, updated in place (its version moves) when the layer's weight, the BatchNorm's
    affine parameters or its running statistics change (a train-mode forward moves those
    without touching their version counters); the weight quantizer then sees the new values."""
    _, x, (fused, _), data = chain
    x, data = x.to(device), data.to(device)
    sim = calibrated(copy.deepcopy(fused).to(device), x, data)
    conv = sim.model[0]
    seen = []
    conv.param_quantizers["weight"].register_forward_hook(lambda _q, args, _o: seen.append(args[0]))

    def folded_now():
        with torch.no_grad():
            sim.model(data[:2])
        return conv.folded_parameters()["weight"].detach()  # grad mode: computed afresh

    cached = params_of(conv)["weight"]
    version = cached._version
    assert torch.equal(cached, folded_now())
    calls = len(seen)
    folded_now()
    assert len(seen) == calls  # nothing changed: the quantized weight comes from the cache
    changes = [
        lambda: sim.model.train()(data).sum(),                    # running statistics
        lambda: conv.layer.weight.mul_(1.5),                       # an optimizer-like step
        lambda: conv.bn.load_state_dict({**conv.bn.state_dict(),
                                         "weight": conv.bn.weight.detach() * 2}),
    ]
    for change in changes:
        with torch.no_grad():
            change()
        sim.model.eval()
        calls = len(seen)
        expected = folded_now()
        assert params_of(conv)["weight"] is cached and cached._version > version
        assert torch.equal(cached, expected)
        assert len(seen) == calls + 1 and seen[-1] is cached  # quantized again, once
        folded_now()
        assert len(seen) == calls + 1
        version = cached._version


# -- QAT --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits_net():
    """A float CNN trained briefly on digits, so that QAT starts from settled BN statistics."""
    x_train, y_train, x_test, y_test = digits_data()
    torch.manual_seed(0)
    net = train(nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU6(),
        nn.Flatten(), nn.Linear(16 * 4 * 4, 10), nn.BatchNorm1d(10)), x_train, y_train, epochs=2)
    return net, (x_train, y_train, x_test, y_test)


@pytest.mark.parametrize("flow", ["compute_encodings", "set_fake_quantize"])
def test_qat_through_the_fused_sim(digits_net, flow, tmp_path):
    """Train mode on real data (digits), after AIMET's compute_encodings (fixed weight
    encodings) or through Horizon's CALIBRATION / QAT / VALIDATION states (weight ranges
    follow the folded weight): SGD steps move the float weights, the BatchNorm statistics
    keep updating from the batches, the weight the layer computes with is the folded weight
    on its quantizer's grid, the model stays accurate, and the export after QAT (with the
    updated statistics folded) runs on ORT as the sim does."""
    x_train, y_train, x_test, y_test = digits_net[1]
    net = copy.deepcopy(digits_net[0])
    fuse_all_conv_bn(net, dummy_input=x_train[:8])
    sim = QuantizationSimModel(net, x_train[:8], quant_scheme="tf", config_file="per_channel")
    if flow == "compute_encodings":
        sim.compute_encodings(lambda m, _: m(x_train[:256]), None)
    else:
        sim.model.eval()
        set_fake_quantize(sim, FakeQuantState.CALIBRATION)
        with torch.no_grad():
            sim.model(x_train[:256])
        set_fake_quantize(sim, FakeQuantState.VALIDATION)  # computes the encodings
    before = accuracy(sim.model, x_test, y_test)
    conv = sim.model[0]
    weight, mean, var = (t.detach().clone() for t in (conv.layer.weight, conv.bn.running_mean,
                                                      conv.bn.running_var))
    tracked = int(conv.bn.num_batches_tracked)
    used = []
    hook = conv.param_quantizers["weight"].register_forward_hook(
        lambda _q, args, out: used.append((args[0].detach(), out.detach())))
    opt = torch.optim.SGD(sim.model.parameters(), lr=0.01, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    sim.model.train()
    if flow == "set_fake_quantize":
        set_fake_quantize(sim, FakeQuantState.QAT)
    steps = 30
    for _ in range(steps):
        idx = torch.randint(0, len(x_train), (64,), generator=g)
        loss = nn.functional.cross_entropy(sim.model(x_train[idx]), y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    hook.remove()
    sim.model.eval()
    if flow == "set_fake_quantize":
        set_fake_quantize(sim, FakeQuantState.VALIDATION)
    assert not torch.equal(conv.layer.weight, weight)
    assert int(conv.bn.num_batches_tracked) == tracked + steps
    assert not torch.equal(conv.bn.running_mean, mean) and not torch.equal(conv.bn.running_var, var)
    assert len(used) == steps
    folded, quantized = used[-1]
    enc = conv.param_quantizers["weight"].encoding
    shape = (-1, 1, 1, 1)
    scale, offset = enc.scale.reshape(shape), enc.offset.reshape(shape)
    codes = quantized / scale - offset
    # (code + offset) * scale and the division back each round once in float32 (|code| <= 256)
    fuzz = 256 * 2.0 ** -22
    assert (codes - codes.round()).abs().max() <= fuzz
    codes = codes.round()
    # the nearest grid point of the folded weight, clamped to the grid's ends outside its range
    below, above = folded < enc.min.reshape(shape), folded > enc.max.reshape(shape)
    inside = ~(below | above)
    assert ((quantized - folded).abs() / scale)[inside].max() <= 0.5 + fuzz
    assert (codes[below] == enc.qmin).all() and (codes[above] == enc.qmax).all()
    if flow == "set_fake_quantize":
        assert inside.all()  # QAT state: the weight's range is the current folded weight's
    after = accuracy(sim.model, x_test, y_test)
    print(f"\nQAT on digits ({flow}): test accuracy {before:.4f} -> {after:.4f}")
    assert after >= before - 0.02
    files = export(sim, tmp_path, "qat", x_test[:8], onnx_export_args=DYNAMIC_BATCH)
    report = verify(sim, files.qdq_onnx, x_test)
    assert report.max_diff_lsb <= 1.001, str(report)


def test_checkpoint_of_a_fused_sim(tmp_path):
    """save_checkpoint / load_checkpoint around a freshly fused float model resume the sim:
    same BatchNorm statistics, same encodings, same outputs."""
    model = chain_model()
    x = torch.randn(2, 3, 8, 8)
    fused = copy.deepcopy(model)
    fuse_all_conv_bn(fused, dummy_input=x)
    sim = calibrated(fused, x, torch.randn(16, 3, 8, 8))
    sim.model.train()
    sim.model(torch.randn(8, 3, 8, 8)).sum().backward()  # a QAT step's statistics update
    sim.model.eval()
    save_checkpoint(sim, tmp_path / "run.qsim")
    fresh = copy.deepcopy(model)
    fuse_all_conv_bn(fresh, dummy_input=x)
    loaded = load_checkpoint(tmp_path / "run.qsim", model=fresh)
    torch.testing.assert_close(loaded.model[0].bn.running_var, sim.model[0].bn.running_var,
                               rtol=0, atol=0)
    data = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded.model(data), sim.model(data))


# -- export ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def exported(chain, tmp_path_factory):
    _, x, (fused, folded), data = chain
    out = {}
    for name, model in (("fused", fused), ("folded", folded)):
        sim = calibrated(model, x, data, config_file="per_channel")
        root = tmp_path_factory.mktemp(name)
        out[name] = (sim, export(sim, root / "v1", "m", x, onnx_export_args=DYNAMIC_BATCH),
                     export(sim, root / "v2", "m", x, onnx_export_args=DYNAMIC_BATCH,
                            encoding_version="2.0.0", propagate_encodings=True))
    return x, data, out


def test_export_equals_the_folded_models_export(exported):
    """The fused sim exports exactly what a sim of the folded model exports: the same
    encodings files (keys and values, 1.0.0, and 2.0.0 with its int32 biases and propagated
    encodings), the same
    state dict, and ONNX graphs that pass onnx.checker with the same node and initializer
    names."""
    _, _, out = exported
    fused, folded = out["fused"], out["folded"]
    for i in (1, 2):
        a = json.loads(Path(fused[i].encodings).read_text())
        b = json.loads(Path(folded[i].encodings).read_text())
        assert a == b
    names = [e["name"] for e in json.loads(Path(fused[1].encodings).read_text())
             ["activation_encodings"]]
    assert names == ["input", "/2/Relu_output_0", "/5/Clip_output_0", "/6/ConvTranspose_output_0",
                     "/8/HardSwish_output_0", "output"]
    models = [onnx.load(str(files[1].onnx)) for files in (fused, folded)]
    for model in models:
        onnx.checker.check_model(model, full_check=True)
    assert [n.name for n in models[0].graph.node] == [n.name for n in models[1].graph.node]
    assert sorted(i.name for i in models[0].graph.initializer) == \
        sorted(i.name for i in models[1].graph.initializer)
    states = [torch.load(files[1].state_dict, weights_only=True) for files in (fused, folded)]
    assert sorted(states[0]) == sorted(states[1])
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_export_runs_on_ort_as_the_sim(exported):
    """ORT runs the fused sim's QDQ model as the sim computes it (quantsim.verify)."""
    _, data, out = exported
    sim, files, _ = out["fused"]
    report = verify(sim, files.qdq_onnx, data)
    assert report.max_diff_lsb <= 1.001, str(report)
    assert report.isolated_max_diff_lsb <= 1.001, str(report)
    assert report.quantizers and all(q.max_diff_lsb <= 1.001 for q in report.quantizers)


def test_exported_pth_is_the_folded_torch_model(exported):
    """<prefix>.pth holds plain torch modules (loads without quantsim) that compute the
    folded model; the sim itself still holds the fused modules."""
    _, data, out = exported
    sim, files, _ = out["fused"]
    _, folded_files, _ = out["folded"]
    script = (
        "import sys, torch\n"
        f"m = torch.load({str(files.pth)!r}, weights_only=False)\n"
        "assert not any(k.startswith('quantsim') for k in sys.modules), 'quantsim imported'\n"
        "assert [type(c).__name__ for c in m] == ['Conv2d', 'Identity', 'ReLU', 'Conv2d', "
        "'Identity', 'ReLU6', 'ConvTranspose2d', 'Identity', 'Hardswish', 'Flatten', 'Linear', "
        "'Identity']\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=120)
    assert isinstance(sim.model[0], qnn.ConvBn)
    clean = torch.load(files.pth, weights_only=False)
    reference = torch.load(folded_files.pth, weights_only=False)
    with torch.no_grad():
        assert torch.equal(clean(data), reference(data))


@pytest.mark.parametrize("which", ["encodings", "torch_encodings"])
def test_encodings_load_back_into_a_fused_sim(exported, which):
    """Both encodings files of a fused sim load into a fresh, uncalibrated fused sim of the
    same model and give it the same encodings and outputs."""
    x, data, out = exported
    sim, files, files_v2 = out["fused"]
    fresh = QuantizationSimModel(fused_and_folded(chain_model(), x)[0], x, quant_scheme="tf",
                                 config_file="per_channel")
    path = getattr(files, which)
    loaded = load_encodings(fresh, path)
    expected = {n for n, q in sim.named_quantizers() if q.enabled}
    assert set(loaded) == expected
    for name, q in fresh.named_quantizers():
        if q.enabled:
            assert q.encoding == dict(sim.named_quantizers())[name].encoding, name
    with torch.no_grad():
        assert torch.equal(fresh.model(data), sim.model(data))
    if which == "encodings":  # 2.0.0 lists parameters and activations in one list
        again = QuantizationSimModel(fused_and_folded(chain_model(), x)[0], x, quant_scheme="tf",
                                     config_file="per_channel")
        # (2.0.0 also keys the Flatten's output, so its quantizer gets the same encoding)
        assert expected <= set(load_encodings(again, files_v2.encodings))
        with torch.no_grad():
            assert torch.equal(again.model(data), sim.model(data))


@pytest.mark.parametrize("which", ["encodings", "encodings_dict", "torch_encodings"])
def test_folded_models_encodings_load_into_a_fused_sim(exported, which):
    """Encodings of the folded model (computed by its own sim) initialise a fused sim for QAT:
    its ONNX-keyed file, with its graph or read by name rule (a dict, no graph), and its
    module-keyed file, whose activation entry names the activation's own module."""
    x, data, out = exported
    fused_sim = out["fused"][0]
    files = out["folded"][1]
    fresh = QuantizationSimModel(fused_and_folded(chain_model(), x)[0], x, quant_scheme="tf",
                                 config_file="per_channel")
    source = {"encodings": files.encodings, "torch_encodings": files.torch_encodings,
              "encodings_dict": json.loads(Path(files.encodings).read_text())}[which]
    loaded = load_encodings(fresh, source)
    assert set(loaded) == {n for n, q in fused_sim.named_quantizers() if q.enabled}
    with torch.no_grad():
        assert torch.equal(fresh.model(data), fused_sim.model(data))


def test_hand_built_fused_module_with_activation_exports_as_folded_layer(tmp_path):
    """A fused module built by hand has no place of its own for its activation: it exports
    as a quantsim.nn.FoldedLayer (weight and bias under the fused module's path, the
    activation inside), and the QDQ model agrees with the sim."""
    torch.manual_seed(0)
    block = qnn.fuse_conv_bn(nn.Conv2d(3, 4, 3), randomize_batch_norms(nn.BatchNorm2d(4)),
                             nn.ReLU())
    model = nn.Sequential(block, nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()
    x, data = torch.randn(2, 3, 8, 8), torch.randn(16, 3, 8, 8)
    sim = calibrated(model, x, data, config_file="per_channel")
    assert activation_destinations(sim.model) == {}
    files = export(sim, tmp_path, "m", x, onnx_export_args=DYNAMIC_BATCH)
    doc = json.loads(files.encodings.read_text())
    assert [e["name"] for e in doc["param_encodings"]] == ["0.weight", "2.weight"]
    assert [e["name"] for e in doc["activation_encodings"]] == [
        "input", "/0/activation/Relu_output_0", "output"]
    clean = torch.load(files.pth, weights_only=False)
    assert type(clean[0]) is qnn.FoldedLayer and type(clean[0].activation) is nn.ReLU
    with torch.no_grad():
        torch.testing.assert_close(clean(data), model(data), rtol=1e-5, atol=1e-5)
    report = verify(sim, files.qdq_onnx, data)
    assert report.max_diff_lsb <= 1.001, str(report)


def test_register_op_type_checks_its_functions():
    """params= and output_op= must be functions of the module."""
    class Custom(nn.Module):
        pass

    with pytest.raises(TypeError, match="params must be a function"):
        register_op_type(Custom, "Conv", params={"weight": torch.zeros(1)})
    with pytest.raises(TypeError, match="output_op must be a function"):
        register_op_type(Custom, "Conv", output_op="relu")
