"""quantsim.export.integer_onnx: the IntegerModel as integer ONNX, bit-exact in ONNX Runtime."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from models import ResidualNet, randomize_batch_norms
from quantsim import QuantizationSimModel, check_deployable, convert
from quantsim.errors import ExportError
from quantsim.export.integer_onnx import export_integer_onnx
from test_convert import Net1d, OpsNet, _sim_of

pytestmark = pytest.mark.usefixtures("one_thread")

_INTEGER_OPS = {"ConvInteger", "MatMulInteger"}


def _run(path, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def _assert_bit_exact(int_model, x, tmp_path, name="model"):
    path = tmp_path / f"{name}.onnx"
    model = export_integer_onnx(int_model, str(path), x[:2])
    onnx.checker.check_model(onnx.load(str(path)))
    with torch.no_grad():
        expected = int_model(x).numpy()
    got = _run(path, x)
    assert got.dtype == expected.dtype and np.array_equal(got, expected), \
        f"max diff {np.abs(got.astype(np.float64) - expected).max()}"
    return {n.op_type for n in model.graph.node}


@pytest.fixture(scope="module")
def digits_sims(trained_digits_cnn, digits):
    x = digits[0]
    sims = {}
    for bitwidth in (8, 16):
        sim = QuantizationSimModel(trained_digits_cnn, x[:8], quant_scheme="tf",
                                   default_output_bw=bitwidth)
        sim.compute_encodings(lambda m, _: m(x[:512]), None)
        sims[bitwidth] = sim
    return sims


@pytest.mark.parametrize("bitwidth", [8, 16])
@pytest.mark.parametrize("rounding", ["half_to_even", "half_away_from_zero"])
@pytest.mark.parametrize("return_integers", [False, True], ids=["floats", "codes"])
def test_digits_cnn_bit_exact_in_onnxruntime(digits_sims, digits, tmp_path, bitwidth,
                                             rounding, return_integers):
    int_model = convert(digits_sims[bitwidth], rounding=rounding,
                        return_integers=return_integers)
    op_types = _assert_bit_exact(int_model, digits[2], tmp_path)
    assert _INTEGER_OPS <= op_types
    assert not {"QuantizeLinear", "DequantizeLinear", "Conv", "Gemm", "MatMul"} & op_types


@pytest.mark.parametrize("bitwidth, config, scheme", [
    (8, "per_channel", "tf"), (16, "per_channel", "tf"),
    (8, "default", "tf_enhanced"), (8, "htp", "percentile")])
def test_residual_net_bit_exact_in_onnxruntime(tmp_path, bitwidth, config, scheme):
    from quantsim.prepare import prepare_model
    torch.manual_seed(0)
    model = prepare_model(randomize_batch_norms(ResidualNet(width=8)).eval())
    x = torch.rand(32, 3, 16, 16)
    sim = QuantizationSimModel(model, x[:2], quant_scheme=scheme, default_output_bw=bitwidth,
                               config_file=config)
    sim.compute_encodings(lambda m, _: m(x[:16]), None)
    int_model = convert(sim)
    report = int_model.compare(sim, x[16:])
    assert report.deployable and report.output_within_1_lsb[0] >= 0.99, str(report)
    op_types = _assert_bit_exact(int_model, x, tmp_path)
    assert "ReduceSum" in op_types and "ConvInteger" in op_types


def test_ops_net_bit_exact_with_its_float_islands(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(64, 3, 8, 8)
    op_types = _assert_bit_exact(convert(_sim_of(OpsNet(), x)), x, tmp_path)
    assert {"Gather", "Softmax", "LayerNormalization", "Concat"} <= op_types
    assert "ConvTranspose" not in op_types  # as a ConvInteger over spread-out codes


_LAYER_CASES = {
    "same-padding": lambda: torch.nn.Sequential(
        torch.nn.Conv2d(4, 8, (4, 3), padding="same", dilation=(1, 2)), torch.nn.ReLU()),
    "strided-dilated": lambda: torch.nn.Sequential(
        torch.nn.Conv2d(4, 8, 3, stride=2, padding=2, dilation=2), torch.nn.ReLU()),
    "depthwise": lambda: torch.nn.Sequential(
        torch.nn.Conv2d(4, 4, 3, padding=1, groups=4), torch.nn.ReLU6(), torch.nn.Conv2d(4, 8, 1)),
    "grouped-padded-avgpool": lambda: torch.nn.Sequential(
        torch.nn.Conv2d(4, 8, (3, 1), padding=(1, 0), groups=2), torch.nn.AvgPool2d(2, padding=1)),
    "conv-transpose": lambda: torch.nn.Sequential(
        torch.nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1),
        torch.nn.Hardtanh(-0.5, 0.5)),
    "linear-on-3d": lambda: torch.nn.Sequential(
        torch.nn.Flatten(2), torch.nn.Linear(64, 16), torch.nn.SiLU(), torch.nn.Linear(16, 3)),
}


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")
@pytest.mark.parametrize("bitwidth", [8, 16])
@pytest.mark.parametrize("case", sorted(_LAYER_CASES))
def test_layer_variants_agree_with_the_sim_and_onnxruntime(tmp_path, case, bitwidth):
    torch.manual_seed(0)
    x = torch.randn(32, 4, 8, 8)
    sim = QuantizationSimModel(_LAYER_CASES[case]().eval(), x[:2], quant_scheme="tf",
                               default_output_bw=bitwidth)
    sim.compute_encodings(lambda m, _: m(x[:16]), None)
    int_model = convert(sim)
    report = int_model.compare(sim, x[16:])
    assert report.deployable and report.output_within_1_lsb[0] >= 0.99, str(report)
    _assert_bit_exact(int_model, x, tmp_path)


def test_conv1d_net_bit_exact(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(64, 4, 16)
    _assert_bit_exact(convert(_sim_of(randomize_batch_norms(Net1d()), x)), x, tmp_path)


def test_refuses_what_it_cannot_write(digits_sims, digits, tmp_path):
    with pytest.raises(ExportError, match="IntegerModel"):
        export_integer_onnx(torch.nn.Linear(2, 2), str(tmp_path / "x.onnx"), digits[2][:2])
    sim = QuantizationSimModel(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh(),
                                                   torch.nn.Linear(4, 2), torch.nn.Softplus()),
                               torch.randn(2, 4), quant_scheme="tf")
    sim.compute_encodings(lambda m, _: m(torch.randn(64, 4)), None)
    int_model = convert(sim)
    assert not int_model.report.float_ops  # Tanh / Softplus: lookup tables
    _assert_bit_exact(int_model, torch.randn(32, 4), tmp_path, "tables")
    sim = QuantizationSimModel(torch.nn.Sequential(torch.nn.Linear(4, 4),
                                                   torch.nn.LogSoftmax(dim=-1)),
                               torch.randn(2, 4), quant_scheme="tf")
    sim.compute_encodings(lambda m, _: m(torch.randn(64, 4)), None)
    with pytest.raises(ExportError, match="float island LogSoftmax"):
        export_integer_onnx(convert(sim), str(tmp_path / "x.onnx"), torch.randn(2, 4))
    assert not (tmp_path / "x.onnx").exists()


def test_horizon_flow_end_to_end(trained_digits_cnn, digits, tmp_path):
    """Digits CNN: fuse conv-BN -> calibrate -> QAT (W8A8) -> convert -> integer ONNX in ORT,
    with the accuracy of each stage in one table."""
    import copy

    from models import accuracy
    from quantsim import check_deployable
    from quantsim.prepare import fuse_all_conv_bn
    x_train, y_train, x_test, y_test = digits
    stages = {"float": accuracy(trained_digits_cnn, x_test, y_test)}
    model = copy.deepcopy(trained_digits_cnn)
    fuse_all_conv_bn(model, dummy_input=x_train[:2])
    stages["fused"] = accuracy(model, x_test, y_test)
    sim = QuantizationSimModel(model, x_train[:2], quant_scheme="tf")
    sim.compute_encodings(lambda m, _: m(x_train[:512]), None)
    stages["calibrated"] = accuracy(sim.model, x_test, y_test)
    torch.manual_seed(0)
    opt = torch.optim.Adam(sim.model.parameters(), lr=1e-3)
    sim.model.train()
    for idx in torch.split(torch.randperm(len(x_train)), 64):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(sim.model(x_train[idx]), y_train[idx]).backward()
        opt.step()
    sim.model.eval()
    stages["QAT W8A8"] = accuracy(sim.model, x_test, y_test)
    assert check_deployable(sim).deployable
    int_model = convert(sim)
    stages["fixed point"] = accuracy(int_model, x_test, y_test)
    path = tmp_path / "deploy.onnx"
    int_model.export_onnx(str(path), x_test[:2])
    deployed = _run(path, x_test)
    stages["ORT deploy"] = float((torch.from_numpy(deployed).argmax(1) == y_test).float().mean())
    table = "\n".join(f"| {stage} | {acc:.4f} |" for stage, acc in stages.items())
    print("| stage | accuracy |\n|---|---|\n" + table)
    with torch.no_grad():
        assert np.array_equal(deployed, int_model(x_test).numpy())
    assert stages["ORT deploy"] == stages["fixed point"]
    n = len(y_test)
    assert abs(stages["fixed point"] - stages["QAT W8A8"]) <= 2 / n, table
    assert abs(stages["fused"] - stages["float"]) <= 1 / n, table
    assert min(stages.values()) >= 0.95, table


def test_lpbq_weights_convert_exactly_and_plain_blocks_stay_float(tmp_path):
    """LPBQ block scales are integer multipliers of a channel scale, so code x multiplier is an
    integer weight on the channel's grid: the Conv / Linear accumulate in integers, within one
    LSB of the sim, bit-exact in ORT. Plain per-block scales differ inside one dot product:
    check_deployable names those layers and they run as float islands."""
    from quantsim.config_utils import (set_blockwise_quantization_for_weights,
                                       set_grouped_blockwise_quantization_for_weights)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(16, 8, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Flatten(), torch.nn.Linear(8 * 4 * 4, 10)).eval()
    x = torch.randn(64, 16, 4, 4)
    for grouped in (True, False):
        sim = QuantizationSimModel(model, x[:2], quant_scheme="tf")
        if grouped:
            set_grouped_blockwise_quantization_for_weights(
                sim, [torch.nn.Conv2d, torch.nn.Linear], bitwidth=4, symmetric=True,
                decompressed_bw=8, block_size=8)
        else:
            set_blockwise_quantization_for_weights(
                sim, [torch.nn.Conv2d, torch.nn.Linear], bitwidth=4, symmetric=True, block_size=8)
        sim.compute_encodings(lambda m, _: m(x[:32]), None)
        report = convert(sim).compare(sim, x[32:])
        if grouped:
            assert report.deployable and not report.float_ops, str(report)
            assert all(f >= 0.99 for f in report.output_within_1_lsb), str(report)
            ops = _assert_bit_exact(convert(sim), x[32:], tmp_path, "lpbq")
            assert _INTEGER_OPS <= ops
        else:
            blocked = [name for name, reason in check_deployable(sim).float_ops
                       if "per-block scales" in reason]
            assert blocked == ["0", "3"] and not report.deployable, str(report)
