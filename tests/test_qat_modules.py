"""Single-operator QAT modules (quantsim.nn.qat) and the ONNX converter (quantsim.qat_convert).

Each test's docstring states the invariant it checks. Training runs on scikit-learn's offline
``load_digits`` with one intra-op thread (tiny models are several times slower with two
threads on a shared 2-core machine).
"""
from __future__ import annotations

import copy
import io
import os
import warnings
from typing import Dict, List

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from conftest import DEVICES
from quantsim.encoding import Encoding, fake_quantize, integer_grid
from quantsim.errors import (
    CalibrationError,
    ExportError,
    QuantizationSettingError,
    UnsupportedModelError,
)
from quantsim.nn.qat import (
    QAT_MODULES,
    Conv2dQAT,
    Conv3dQAT,
    ConvTranspose2dQAT,
    LinearQAT,
    QATConfig,
    QATInputConfig,
    QATWeightConfig,
    quantization_disabled,
    replace_with_qat,
)
from quantsim.export.qdq import QdqPlan, build_qdq_model, qdq_opset, widen_4bit_pairs
from quantsim.op_types import param_axis, register_param_axes
from quantsim.qat_convert import _cpu_lacks_vnni, convert_qat_model
from quantsim.quantizer import Quantizer
from quantsim.wrappers import register_quantized


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: small tensors, one thread

DISABLE_ALL = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
ENABLE_ALL = ort.GraphOptimizationLevel.ORT_ENABLE_ALL  # ORT's default

CONV_CFG = {"retrain_data_config": {"batch_num": 10},
            "retrain_weight_config": {"channel_wise": True}}
RELU_CONV_CFG = {"retrain_data_config": {"batch_num": 10, "fixed_min": True},
                 "retrain_weight_config": {"channel_wise": True}}
RELU_LINEAR_CFG = {"retrain_data_config": {"batch_num": 10, "fixed_min": True}}


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits():
    """load_digits as (N, 1, 8, 8) floats in [0, 1]; a stratified 1437 / 360 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]
    xtr, xte, ytr, yte = train_test_split(x, d.target, test_size=360, random_state=0,
                                          stratify=d.target)
    return tuple(torch.tensor(a) for a in (xtr, ytr, xte, yte))


def lenet(conv=nn.Conv2d, linear=nn.Linear, conv_cfgs=None, linear_cfgs=None) -> nn.Sequential:
    """conv-relu-pool x2, linear-relu-linear for 8x8 digits (configs only for QAT classes)."""
    c1, c2, l1, l2 = (conv_cfgs or [{}] * 2) + (linear_cfgs or [{}] * 2)
    kw = (lambda cfg: {"config": cfg}) if conv is not nn.Conv2d else (lambda cfg: {})
    return nn.Sequential(
        conv(1, 16, 3, padding=1, **kw(c1)), nn.ReLU(), nn.MaxPool2d(2),
        conv(16, 32, 3, padding=1, **kw(c2)), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        linear(128, 64, **kw(l1)), nn.ReLU(), linear(64, 10, **kw(l2)),
    )


def batches(n: int, epochs: int, seed: int, size: int = 32) -> List[torch.Tensor]:
    """The index batches of ``epochs`` seeded shuffles of ``n`` samples."""
    g = torch.Generator().manual_seed(seed)
    return [perm[i:i + size] for _ in range(epochs)
            for perm in [torch.randperm(n, generator=g)] for i in range(0, n, size)]


def fit(model: nn.Module, x, y, epochs: int, lr: float, seed: int = 0) -> nn.Module:
    """Adam + one-cycle schedule over seeded shuffles."""
    plan = batches(len(x), epochs, seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=len(plan))
    model.train()
    for idx in plan:
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


def accuracy(model: nn.Module, x, y) -> float:
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def export(model: nn.Module, x: torch.Tensor, path: str, dynamo: bool) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (x,), path, dynamo=dynamo, external_data=False,
                          input_names=["x"], dynamic_axes={"x": {0: "batch"}}, verbose=False)
    return path


def run_ort(path: str, x: torch.Tensor, level) -> np.ndarray:
    so = ort.SessionOptions()
    so.graph_optimization_level = level
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


def _activation_dq_outputs(path: str) -> List[str]:
    """Outputs of the DequantizeLinear nodes of activations (not weights/biases), in order."""
    graph = onnx.load(path).graph
    consts = {t.name for t in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    return [n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"
            and n.input[0] not in consts and producers[n.input[0]].input[0] not in consts]


def _ort_with_outputs(path: str, x: torch.Tensor, names: List[str]) -> List[np.ndarray]:
    model = onnx.load(path)
    model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names)
    so = ort.SessionOptions()
    so.graph_optimization_level = DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})


def _torch_quantized_inputs(model: nn.Module, x: torch.Tensor):
    """(quantized input, scale) of every QAT module, in execution order."""
    seen = []

    def hook(mod, args):
        seen.append((mod.input_quantizer(args[0]), mod.input_quantizer.encoding().scale))

    handles = [m.register_forward_pre_hook(hook) for m in model.modules()
               if hasattr(m, "input_quantizer")]
    with torch.no_grad():
        model.eval()(x)
    for h in handles:
        h.remove()
    return seen


def assert_agrees(path: str, model: nn.Module, x: torch.Tensor, level) -> Dict[str, float]:
    """ORT agrees with PyTorch up to one-step rounding differences at the quantizers.

    Without graph optimizations, the model input is quantized identically and fewer than 1% of
    the codes of every later quantizer differ (a near-tie flips by one step when ORT sums in
    another order; the flip then propagates, so downstream codes may move by more). At any
    level, at least 99% of the output elements equal PyTorch's up to float rounding.
    """
    with torch.no_grad():
        ref = model.eval()(x).numpy()
    stats: Dict[str, float] = {}
    if level == DISABLE_ALL:
        names = _activation_dq_outputs(path)
        outs = _ort_with_outputs(path, x, names)
        out, acts = outs[0], outs[1:]
        expected = _torch_quantized_inputs(model, x)
        assert len(acts) == len(expected), (names, len(expected))
        for i, (name, got, (want, scale)) in enumerate(zip(names, acts, expected)):
            steps = np.abs(got - want.numpy()) / float(scale)
            differ = float(np.mean(steps > 0.5))
            stats[f"{name} codes differ"] = differ
            assert differ < (1e-2 if i else 1e-9), f"{name}: {differ:.3%} of the codes differ"
    else:
        out = run_ort(path, x, level)
    diff = np.abs(out - ref)
    exact = float(np.mean(diff <= 1e-5 * max(1.0, float(np.abs(ref).max()))))
    assert exact >= 0.99, (f"{os.path.basename(path)} at {level}: {exact:.3%} of the outputs "
                           f"agree, max diff {diff.max()}")
    stats.update(max_diff=float(diff.max()), exact=exact)
    return stats


def calibrated(model: nn.Module, x: torch.Tensor, steps: int = 3) -> nn.Module:
    """Calibrate on ``x``, then move the clips off the data's extremes as training would.

    Calibrated-only clips sit on the previous layer's output lattice (the max of
    ``s_x * s_w * integer``), which makes exact rounding ties at the next quantizer common;
    with ties, ORT and PyTorch legitimately round differently after summing in another order.
    """
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            model(x)
        for m in model.modules():
            if hasattr(m, "input_quantizer"):
                m.input_quantizer.clip_max.mul_(1.0137)
    return model.eval()


# ----------------------------------------------------------------------------------------------
# acceptance: training on digits
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def qat_lenet(digits):
    xtr, ytr, xte, yte = digits
    torch.manual_seed(0)
    model = lenet(Conv2dQAT, LinearQAT, [CONV_CFG, RELU_CONV_CFG], [RELU_LINEAR_CFG] * 2)
    fit(model, xtr, ytr, epochs=5, lr=1e-2)
    return model, accuracy(model, xte, yte)


@pytest.fixture(scope="module")
def finetuned(digits):
    xtr, ytr, xte, yte = digits
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))
    fit(model, xtr, ytr, epochs=4, lr=1e-2, seed=1)
    float_acc = accuracy(model, xte, yte)
    model, swapped = replace_with_qat(model, CONV_CFG, types=[nn.Conv2d])
    model, more = replace_with_qat(model, {"retrain_data_config": {"batch_num": 10}})
    fit(model, xtr, ytr, epochs=2, lr=1e-3, seed=2)
    return model, float_acc, accuracy(model, xte, yte), swapped + more


@pytest.mark.slow
def test_lenet_from_scratch_reaches_95_percent(qat_lenet):
    """A LeNet built from QAT modules trains from scratch to >= 95% test accuracy."""
    model, acc = qat_lenet
    print(f"QAT LeNet from scratch: {acc:.4f}")
    assert acc >= 0.95
    assert all(int(m.input_quantizer.num_batches_calibrated) == 10
               for m in model if hasattr(m, "input_quantizer"))


@pytest.mark.slow
def test_finetune_via_replace_with_qat_within_one_point(finetuned):
    """Fine-tuning a float CNN after replace_with_qat ends within 1 pt of the float accuracy."""
    model, float_acc, qat_acc, swapped = finetuned
    print(f"float {float_acc:.4f}  QAT fine-tuned {qat_acc:.4f}")
    assert swapped == ["0", "4", "9", "11"]
    assert isinstance(model[0], Conv2dQAT) and isinstance(model[11], LinearQAT)
    assert qat_acc >= float_acc - 0.01


# ----------------------------------------------------------------------------------------------
# acceptance: ONNX export and conversion
# ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_lenet_dynamo_export_converts_and_agrees(qat_lenet, digits, tmp_path):
    """The dynamo export carries the learned factors; both converted files load, pass the
    checker, embed their weights, and agree with PyTorch in ORT (optimizations off and default)."""
    model, _ = qat_lenet
    x = digits[2]
    path = export(model, x[:8], str(tmp_path / "lenet.onnx"), dynamo=True)
    fq, deploy = convert_qat_model(path, str(tmp_path / "out" / "lenet"),
                                   deploy_weight_dtype="uint8")
    assert fq.endswith("lenet_fake_quant_model.onnx") and deploy.endswith("lenet_deploy_model.onnx")
    assert sorted(os.listdir(tmp_path / "out")) == sorted(map(os.path.basename, (fq, deploy)))

    graph = onnx.load(fq).graph
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    q_in = next(n for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "x")
    enc = model[0].input_quantizer.encoding()
    assert inits[q_in.input[1]] == pytest.approx(float(enc.scale), rel=0, abs=0)
    assert int(inits[q_in.input[2]]) == -int(enc.offset)
    q_w = next(n for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "0.weight")
    w_enc = model[0].weight_quantizer.encoding(model[0].weight)
    np.testing.assert_array_equal(inits[q_w.input[1]], w_enc.scale.numpy())

    dgraph = onnx.load(deploy).graph
    int_weights = [t for t in dgraph.initializer if t.data_type == onnx.TensorProto.UINT8
                   and len(t.dims) > 1]
    assert len(int_weights) == 4
    assert not any(t.name.endswith("weight") for t in dgraph.initializer)
    for p in (fq, deploy):
        for level in (DISABLE_ALL, ENABLE_ALL):
            assert_agrees(p, model, x, level)


@pytest.mark.slow
def test_finetuned_torchscript_export_converts_and_agrees(finetuned, digits, tmp_path):
    """The TorchScript export (unfolded scale arithmetic) converts too and agrees in ORT."""
    model = finetuned[0]
    x = digits[2]
    path = export(model, x[:8], str(tmp_path / "ft.onnx"), dynamo=False)
    fq, deploy = convert_qat_model(path, str(tmp_path / "ft"), deploy_weight_dtype="uint8")
    ops = {n.op_type for n in onnx.load(fq).graph.node}
    assert ops <= {"QuantizeLinear", "DequantizeLinear", "Conv", "BatchNormalization", "Relu",
                   "MaxPool", "Flatten", "Gemm"}, ops
    for p in (fq, deploy):
        for level in (DISABLE_ALL, ENABLE_ALL):
            assert_agrees(p, model, x, level)


def _mixed_model(dst_type: str) -> nn.Module:
    cw = {"retrain_data_config": {"batch_num": 2, "dst_type": dst_type},
          "retrain_weight_config": {"channel_wise": True, "dst_type": dst_type}}
    pt = {"retrain_data_config": {"batch_num": 2, "dst_type": dst_type},
          "retrain_weight_config": {"dst_type": dst_type}}
    return nn.Sequential(
        nn.Unflatten(1, (1, 4)), Conv3dQAT(1, 4, (2, 3, 3), padding=(0, 1, 1), config=cw),
        nn.Flatten(1, 2), nn.ReLU(), ConvTranspose2dQAT(12, 6, 2, stride=2, config=cw),
        ConvTranspose2dQAT(6, 3, 3, padding=1, config=pt), nn.ReLU(), nn.Flatten(),
        LinearQAT(3 * 16 * 16, 10, config=pt))


@pytest.mark.parametrize("dst_type", ["INT8", "INT4"])
def test_conv3d_convtranspose_export_agrees(dst_type, tmp_path):
    """Conv3dQAT and ConvTranspose2dQAT (per channel and per tensor) export, convert and agree
    in ORT at both optimization levels; INT4 grids travel in 8-bit containers."""
    torch.manual_seed(0)
    x = torch.randn(32, 4, 8, 8)
    model = calibrated(_mixed_model(dst_type), x)
    path = export(model, x[:2], str(tmp_path / "m.onnx"), dynamo=False)
    fq, deploy = convert_qat_model(path, str(tmp_path / "m"), deploy_weight_dtype="uint8")
    for p in (fq, deploy):
        for level in (DISABLE_ALL, ENABLE_ALL):
            assert_agrees(p, model, x, level)
    if dst_type == "INT4":
        codes = [onnx.numpy_helper.to_array(t).astype(int) - 128
                 for t in onnx.load(deploy).graph.initializer
                 if t.data_type == onnx.TensorProto.UINT8 and len(t.dims) > 1]
        assert len(codes) == 4 and all(c.min() >= -8 and c.max() <= 7 for c in codes)


def test_int8_deploy_model(tmp_path):
    """The default deploy model holds int8 weight codes (zero point 0) and int32 bias codes;
    it agrees with PyTorch in ORT without optimizations, and at the default level on CPUs
    whose fused U8S8 kernels do not saturate (VNNI)."""
    torch.manual_seed(0)
    x = torch.randn(32, 4, 8, 8)
    model = calibrated(_mixed_model("INT8"), x)
    path = export(model, x[:2], str(tmp_path / "m.onnx"), dynamo=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fq, deploy = convert_qat_model(path, str(tmp_path / "m"))
    graph = onnx.load(deploy).graph
    dtypes = {t.name: t.data_type for t in graph.initializer}
    weights = [t for t in graph.initializer if len(t.dims) > 1]
    assert {t.data_type for t in weights} == {onnx.TensorProto.INT8}
    biases = [n for n in graph.node if n.op_type == "DequantizeLinear"
              and dtypes.get(n.input[0]) == onnx.TensorProto.INT32]
    assert len(biases) == 4
    assert_agrees(deploy, model, x, DISABLE_ALL)
    if _cpu_lacks_vnni():
        pytest.skip("ORT's fused U8S8 kernels saturate on this CPU (AVX2 without VNNI)")
    assert_agrees(deploy, model, x, ENABLE_ALL)


def test_convert_refuses_a_model_without_qdq(tmp_path):
    """A float export (or quantization switched off) is refused with a clear error."""
    model = calibrated(nn.Sequential(LinearQAT(4, 2)), torch.randn(8, 4))
    with quantization_disabled(model):
        path = export(model, torch.randn(2, 4), str(tmp_path / "f.onnx"), dynamo=False)
    with pytest.raises(ExportError, match="no QuantizeLinear/DequantizeLinear"):
        convert_qat_model(path, str(tmp_path / "f"))
    with pytest.raises(ExportError, match="deploy_weight_dtype='int16'"):
        convert_qat_model(path, str(tmp_path / "f"), deploy_weight_dtype="int16")


def test_export_before_calibration_is_refused(tmp_path):
    """Exporting a QAT module that never saw a training batch names the fix."""
    with pytest.raises(ExportError, match="before calibration"):
        export(nn.Sequential(LinearQAT(4, 2)), torch.randn(2, 4), str(tmp_path / "u.onnx"),
               dynamo=False)


# ----------------------------------------------------------------------------------------------
# from_float and the quantize switch
# ----------------------------------------------------------------------------------------------
FLOAT_LAYERS = {
    "conv2d": (lambda: nn.Conv2d(3, 4, 3, stride=2, padding=1, groups=1), (2, 3, 9, 9)),
    "conv2d_grouped": (lambda: nn.Conv2d(4, 8, 3, groups=2, dilation=2, bias=False), (2, 4, 9, 9)),
    "conv3d": (lambda: nn.Conv3d(2, 3, (1, 3, 3), dilation=(1, 2, 1)), (1, 2, 3, 9, 9)),
    "convT": (lambda: nn.ConvTranspose2d(3, 2, 3, stride=2, output_padding=1), (2, 3, 5, 5)),
    "linear": (lambda: nn.Linear(5, 3), (4, 7, 5)),
}


@pytest.mark.parametrize("name", sorted(FLOAT_LAYERS))
def test_from_float_with_quantization_off_equals_float(name):
    """from_float copies weight, bias and hyper-parameters: quantization off gives the float
    module's output bit for bit (switch and context manager); on, it differs."""
    make, shape = FLOAT_LAYERS[name]
    torch.manual_seed(0)
    fl = make()
    x = torch.randn(shape)
    qat = QAT_MODULES[type(fl)].from_float(fl)
    assert qat.weight is not fl.weight and torch.equal(qat.weight, fl.weight)
    with quantization_disabled(qat):
        assert torch.equal(qat(x), fl(x))
    assert qat.quantize and int(qat.input_quantizer.num_batches_calibrated) == 0
    qat.quantize = False
    assert torch.equal(qat(x), fl(x))
    qat.quantize = True
    assert not torch.equal(qat(x), fl(x))


@settings(max_examples=15, deadline=None)
@given(cin=st.integers(1, 4), cout=st.integers(1, 4), k=st.integers(1, 3),
       stride=st.integers(1, 2), pad=st.integers(0, 1), bias=st.booleans())
def test_conv2d_qat_off_matches_float_for_any_hyperparameters(cin, cout, k, stride, pad, bias):
    """For any Conv2d hyper-parameters, Conv2dQAT.from_float with quantize=False is exact."""
    fl = nn.Conv2d(cin, cout, k, stride, pad, bias=bias)
    qat = Conv2dQAT.from_float(fl)
    qat.quantize = False
    x = torch.randn(2, cin, 6, 6)
    assert torch.equal(qat(x), fl(x))


def test_weight_quantizer_is_the_symmetric_encoding_of_the_weight():
    """arq_retrain equals Encoding.from_range(min, max, symmetric) of the current weight,
    per tensor and per output channel (axis 1 for ConvTranspose)."""
    torch.manual_seed(0)
    for qat, axis in ((Conv2dQAT(3, 4, 3, config=CONV_CFG), 0),
                      (ConvTranspose2dQAT(3, 4, 3, config=CONV_CFG), 1),
                      (LinearQAT(6, 5), None)):
        w = qat.weight.detach()
        if axis is None:
            lo, hi = w.min(), w.max()
        else:
            flat = w.movedim(axis, 0).reshape(w.shape[axis], -1)
            lo, hi = flat.min(1).values, flat.max(1).values
        enc = Encoding.from_range(lo, hi, bitwidth=8, symmetric=True, axis=axis)
        assert torch.equal(qat.weight_quantizer(qat.weight), enc.fake_quantize(w))
        assert qat.weight_quantizer.encoding(qat.weight) == enc


def test_bias_is_simulated_on_the_int32_grid():
    """The bias the layer adds is a multiple of input_scale * weight_scale."""
    torch.manual_seed(0)
    fc = LinearQAT(4, 3, config={"retrain_data_config": {"clip_min": -1.0, "clip_max": 1.0}})
    fc.eval()
    x = torch.rand(2, 4)
    s = fc.input_quantizer.encoding().scale * fc.weight_quantizer.encoding(fc.weight).scale
    y = fc(x)
    xq, wq = fc.input_quantizer(x), fc.weight_quantizer(fc.weight)
    bq = y - xq @ wq.T
    codes = bq.double() / s.double()
    assert torch.allclose(codes, codes.round(), atol=1e-3)
    assert torch.allclose(bq, fc.bias.detach().expand_as(bq), atol=float(s))


# ----------------------------------------------------------------------------------------------
# the learned input range
# ----------------------------------------------------------------------------------------------
def test_calibration_then_learning():
    """The first batch_num training batches set the clips to the running min/max (no clip
    gradients); later batches give the clips gradients; eval does not calibrate."""
    fc = LinearQAT(2, 1, config={"retrain_data_config": {"batch_num": 2}})
    q = fc.input_quantizer
    fc(torch.tensor([[-1.0, 0.5]])).sum().backward()
    assert (q.clip_min.item(), q.clip_max.item()) == (-1.0, 0.5) and q.clip_max.grad is None
    fc(torch.tensor([[-0.5, 3.0]])).sum().backward()
    assert (q.clip_min.item(), q.clip_max.item()) == (-1.0, 3.0) and q.clip_max.grad is None
    assert not q.calibrating
    fc(torch.tensor([[-2.0, 5.0]])).sum().backward()
    assert (q.clip_min.item(), q.clip_max.item()) == (-1.0, 3.0)
    assert q.clip_max.grad is not None and q.clip_min.grad is not None
    assert int(q.num_batches_calibrated) == 2


def test_fixed_min_and_explicit_clips():
    """fixed_min pins clip_min at 0 as a buffer; explicit clips skip calibration entirely."""
    fc = LinearQAT(2, 1, config={"retrain_data_config": {"fixed_min": "True", "batch_num": 1}})
    names = dict(fc.named_parameters())
    assert "input_quantizer.clip_min" not in names and "input_quantizer.clip_max" in names
    fc(torch.tensor([[0.0, 2.0]]))
    assert fc.input_quantizer.clip_min.item() == 0.0 and fc.input_quantizer.clip_max.item() == 2.0

    fc = LinearQAT(2, 1, config={"retrain_data_config": {"clip_min": -1.0, "clip_max": 1.0}})
    fc.eval()(torch.ones(1, 2))  # usable in eval without any training batch
    fc.train()(torch.full((1, 2), 9.0))
    assert (fc.input_quantizer.clip_min.item(), fc.input_quantizer.clip_max.item()) == (-1.0, 1.0)
    enc = fc.input_quantizer.encoding()
    assert (enc.qmin, enc.qmax) == integer_grid(8, symmetric=False)


def test_int4_input_grid():
    """INT4 activations use the 16-level asymmetric grid of quantsim.encoding."""
    fc = LinearQAT(2, 1, config={"retrain_data_config": {"dst_type": "INT4", "batch_num": 1}})
    x = torch.linspace(-1, 1, 50).reshape(25, 2)
    fc(x)
    fc.eval()
    xq = fc.input_quantizer(x)
    enc = fc.input_quantizer.encoding()
    assert xq.unique().numel() <= 16 and (enc.qmin, enc.qmax) == (0, 15)
    assert torch.equal(xq, fake_quantize(x, enc.scale, enc.offset, 0, 15))


def test_eval_before_calibration_raises():
    """An uncalibrated input quantizer refuses to run in eval mode, naming the fix."""
    with pytest.raises(CalibrationError, match="training-mode forward"):
        LinearQAT(2, 1).eval()(torch.ones(1, 2))


def test_non_finite_calibration_batch_raises():
    """A calibration batch with inf/NaN is refused with the batch number."""
    with pytest.raises(CalibrationError, match="batch 1 holds non-finite"):
        LinearQAT(2, 1)(torch.tensor([[float("nan"), 1.0]]))


def _resume_run(digits, split_at=None) -> Dict[str, torch.Tensor]:
    xtr, ytr = digits[0][:256], digits[1][:256]
    torch.manual_seed(3)
    cfg = [{"retrain_data_config": {"batch_num": 3},
            "retrain_weight_config": {"channel_wise": True}}] * 2
    model = lenet(Conv2dQAT, LinearQAT, cfg, [{"retrain_data_config": {"batch_num": 3}}] * 2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    plan = batches(len(xtr), 2, seed=4, size=32)
    for step, idx in enumerate(plan):
        if step == split_at:  # save, rebuild from scratch, load, continue
            buf = io.BytesIO()
            torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
            buf.seek(0)
            state = torch.load(buf, weights_only=True)
            torch.manual_seed(99)
            model = lenet(Conv2dQAT, LinearQAT, cfg, [{"retrain_data_config": {"batch_num": 3}}] * 2)
            opt = torch.optim.Adam(model.parameters(), lr=1e-2)
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
        model.train()
        loss = nn.functional.cross_entropy(model(xtr[idx]), ytr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_state_dict_resume_mid_training_is_identical(digits):
    """Saving model + optimizer state mid-calibration and mid-training, then loading into a
    fresh model and continuing, gives exactly the factors of an uninterrupted run."""
    straight = _resume_run(digits)
    assert {k for k in straight if "clip" in k or "num_batches" in k} >= {
        "0.input_quantizer.clip_min", "0.input_quantizer.clip_max",
        "0.input_quantizer.num_batches_calibrated"}
    for split in (2, 7):
        resumed = _resume_run(digits, split_at=split)
        for k, v in straight.items():
            assert torch.equal(v, resumed[k]), (split, k)


# ----------------------------------------------------------------------------------------------
# restrictions and config validation
# ----------------------------------------------------------------------------------------------
def test_restriction_padding_mode():
    """padding_mode other than 'zeros' is refused by the constructor, from_float and the swap."""
    with pytest.raises(UnsupportedModelError, match="padding_mode 'reflect' is not supported"):
        Conv2dQAT(1, 1, 3, padding=1, padding_mode="reflect")
    with pytest.raises(UnsupportedModelError, match="padding_mode 'circular'"):
        Conv2dQAT.from_float(nn.Conv2d(1, 1, 3, padding=1, padding_mode="circular"))
    model = nn.Sequential(nn.Conv2d(1, 1, 3, padding=1, padding_mode="replicate"))
    with pytest.raises(UnsupportedModelError, match=r"layer '0'.*skip=\['0'\]"):
        replace_with_qat(model)
    assert type(model[0]) is nn.Conv2d  # nothing swapped


def test_restriction_conv3d_depth_dilation():
    """Conv3dQAT needs dilation 1 in depth."""
    with pytest.raises(UnsupportedModelError, match=r"dilation in depth must be 1.*\(2, 1, 1\)"):
        Conv3dQAT(1, 1, 3, dilation=(2, 1, 1))
    with pytest.raises(UnsupportedModelError, match="dilation in depth must be 1"):
        Conv3dQAT.from_float(nn.Conv3d(1, 1, 3, dilation=2))
    Conv3dQAT(1, 1, 3, dilation=(1, 2, 2))


def test_restriction_linear_channel_wise():
    """LinearQAT refuses channel_wise=True."""
    cfg = {"retrain_weight_config": {"channel_wise": True}}
    with pytest.raises(QuantizationSettingError, match="LinearQAT: .*channel_wise=True"):
        LinearQAT(2, 2, config=cfg)
    with pytest.raises(QuantizationSettingError, match="channel_wise"):
        replace_with_qat(nn.Sequential(nn.Linear(2, 2)), cfg)


def test_restriction_grouped_convtranspose_channel_wise():
    """ConvTranspose2dQAT refuses channel_wise with groups > 1."""
    with pytest.raises(QuantizationSettingError, match="groups=2"):
        ConvTranspose2dQAT(4, 4, 2, groups=2, config=CONV_CFG)


def test_restriction_shared_weight_or_bias():
    """A layer sharing its weight or bias with another layer (tied or reused) is refused,
    naming both places; nothing is swapped."""
    emb, fc = nn.Embedding(10, 4), nn.Linear(4, 10)
    fc.weight = emb.weight
    model = nn.Sequential(emb, fc)
    with pytest.raises(UnsupportedModelError, match=r"layer '1' shares its weight with "
                                                    r"\['0.weight', '1.weight'\]"):
        replace_with_qat(model)
    conv = nn.Conv2d(1, 1, 3, padding=1)
    model = nn.Sequential(conv, nn.ReLU(), conv)
    with pytest.raises(UnsupportedModelError, match="shares its weight"):
        replace_with_qat(model)
    assert model[0] is conv
    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    b.bias = a.bias
    with pytest.raises(UnsupportedModelError, match="shares its bias"):
        replace_with_qat(nn.Sequential(a, b))


def test_replace_with_qat_types_skip_and_top_level():
    """types and skip select what is swapped; a skip name that matches nothing is an error;
    a bare supported layer comes back as its QAT module."""
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Sequential(nn.Conv2d(2, 2, 1)), nn.Flatten(),
                          nn.Linear(2, 2))
    model, swapped = replace_with_qat(model, types=[nn.Conv2d], skip=["1"])
    assert swapped == ["0"] and type(model[1][0]) is nn.Conv2d and type(model[3]) is nn.Linear
    assert model[0].input_quantizer.name == "0.input_quantizer"
    with pytest.raises(QuantizationSettingError, match=r"skip name\(s\) \['nope'\]"):
        replace_with_qat(model, skip=["nope"])
    with pytest.raises(UnsupportedModelError, match="no QAT module is registered for ReLU"):
        replace_with_qat(model, types=[nn.ReLU])
    qat, swapped = replace_with_qat(nn.Linear(3, 2))
    assert isinstance(qat, LinearQAT) and swapped == [""]


@pytest.mark.parametrize("config, match", [
    ({"retrain_data_config": {"batch_size": 1}},
     r"retrain_data_config: unknown key\(s\) \['batch_size'\]; allowed: \['dst_type'"),
    ({"retrain_data_config": {"dst_type": "INT16"}},
     r"retrain_data_config.dst_type: dst_type 'INT16' is not supported; allowed: \['INT8', 'INT4'\]"),
    ({"retrain_weight_config": {"dst_type": 8}}, r"retrain_weight_config.dst_type"),
    ({"retrain_data_config": {"batch_num": 0}},
     r"retrain_data_config.batch_num: must be an integer >= 1, got 0"),
    ({"retrain_data_config": {"batch_num": True}}, r"batch_num: must be an integer >= 1"),
    ({"retrain_data_config": {"fixed_min": "yes"}}, r"fixed_min: expected a bool"),
    ({"retrain_data_config": {"clip_min": 0.5}}, r"clip_min: must be <= 0"),
    ({"retrain_data_config": {"clip_max": -1}}, r"clip_max: must be >= 0"),
    ({"retrain_data_config": {"clip_min": float("nan")}}, r"clip_min: expected a finite"),
    ({"retrain_data_config": {"fixed_min": True, "clip_min": -1.0}}, r"fixed_min=True pins"),
    ({"retrain_weight_config": {"weights_retrain_algo": "ulq_retrain"}},
     r"weights_retrain_algo: 'ulq_retrain' is not supported; allowed: \['arq_retrain'\]"),
    ({"retrain_weight_config": {"channel_wise": 1}}, r"channel_wise: expected a bool"),
    ({"retrain_config": {}}, r"unknown section\(s\) \['retrain_config'\]"),
    ([1, 2], r"expected a dict"),
])
def test_config_validation(config, match):
    """Each bad config value is refused with the key path and what is allowed."""
    with pytest.raises(QuantizationSettingError, match=match):
        Conv2dQAT(1, 1, 1, config=config)


def test_config_defaults_and_round_trip():
    """Missing keys take the issue's defaults; string booleans become bools; to_dict
    round-trips."""
    cfg = QATConfig.from_dict({"retrain_weight_config": {"channel_wise": "False"}})
    assert cfg.to_dict() == {
        "retrain_data_config": {"dst_type": "INT8", "batch_num": 10, "fixed_min": False,
                                "clip_min": None, "clip_max": None},
        "retrain_weight_config": {"dst_type": "INT8", "weights_retrain_algo": "arq_retrain",
                                  "channel_wise": False},
    }
    assert QATConfig.from_dict(cfg.to_dict()) == cfg == QATConfig.coerce(cfg)


# ----------------------------------------------------------------------------------------------
# the quantizers are configured Quantizers; one registry; one 4-bit rule; the old import path
# ----------------------------------------------------------------------------------------------
def test_quantizers_are_configured_quantizers():
    """The input quantizer is an asymmetric, learnable, ``tf``-calibrated Quantizer whose
    min/max are the clip parameters (fixed_min: min pinned, not trained); the weight quantizer
    a symmetric Quantizer in the 'qat' state with averaging constant 1, per channel along the
    axis quantsim.op_types.param_axis gives the float class."""
    int4_relu = {"retrain_data_config": {"dst_type": "INT4", "fixed_min": True}}
    for qat, bits in ((Conv2dQAT(3, 4, 3, config=CONV_CFG), 8),
                      (ConvTranspose2dQAT(3, 5, 3, config=CONV_CFG), 8),
                      (LinearQAT(6, 2, config=int4_relu), 4)):
        iq, wq = qat.input_quantizer, qat.weight_quantizer
        assert isinstance(iq.quantizer, Quantizer) and isinstance(wq.quantizer, Quantizer)
        s = iq.quantizer.settings()
        assert (s["bitwidth"], s["symmetric"], s["learnable"], s["role"], s["scheme"],
                s["state"]) == (bits, False, True, "input", "tf", "quantize")
        assert iq.clip_max is iq.quantizer.max
        if iq.config.fixed_min:
            assert not iq.quantizer.min.requires_grad and float(iq.quantizer.min) == 0.0
        else:
            assert iq.clip_min is iq.quantizer.min and iq.clip_min.requires_grad
        s = wq.quantizer.settings()
        assert (s["symmetric"], s["state"], s["averaging_constant"], s["role"]) == (
            True, "qat", 1.0, "param")
        axis = param_axis(qat.FLOAT_CLASS, "weight")
        if qat.qat_config.weight.channel_wise:
            assert wq.quantizer.axis == axis and wq.quantizer.shape == (qat.weight.shape[axis],)
        else:
            assert wq.quantizer.axis is None and wq.quantizer.shape == ()
    assert param_axis(nn.ConvTranspose2d, "weight") == 1 and param_axis(nn.Conv2d, "weight") == 0


def test_state_dict_keys_unchanged_and_assign_load_keeps_the_tie():
    """The state_dict holds what QAT checkpoints always held (the layer, clip_min, clip_max,
    num_batches_calibrated; nothing of the weight quantizer); load_state_dict(assign=True)
    leaves clip_min / clip_max the quantizer's own range, so training goes on identically."""
    torch.manual_seed(0)
    conv = Conv2dQAT(1, 2, 3, config={"retrain_data_config": {"batch_num": 1}})
    assert set(conv.state_dict()) == {
        "weight", "bias", "input_quantizer.clip_max", "input_quantizer.clip_min",
        "input_quantizer.num_batches_calibrated"}
    relu = LinearQAT(2, 2, config={"retrain_data_config": {"fixed_min": True}})
    assert float(relu.state_dict()["input_quantizer.clip_min"]) == 0.0
    x = torch.randn(4, 1, 6, 6)
    conv(x)  # calibrates
    twin = Conv2dQAT(1, 2, 3, config={"retrain_data_config": {"batch_num": 1}})
    twin.load_state_dict(conv.state_dict(), assign=True)
    iq = twin.input_quantizer
    assert iq.clip_min is iq.quantizer.min and iq.clip_max is iq.quantizer.max
    assert not iq.calibrating and iq.quantizer.is_initialized
    for m in (conv, twin):
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        m(x).square().sum().backward()
        opt.step()
    for k, v in conv.state_dict().items():
        assert torch.equal(v, twin.state_dict()[k]), k


def test_module_called_twice_before_backward():
    """A QAT module applied twice in one forward trains: the weight quantizer's range is
    rewritten in place by the second call, yet the gradients equal those of two copies (the
    weight and bias exactly; a clip's gradient may sum its per-call terms in another order,
    so up to float32 rounding of that sum)."""
    torch.manual_seed(0)
    cfg = {"retrain_data_config": {"clip_min": -1.0, "clip_max": 1.5}}
    fc = LinearQAT(4, 4, config=cfg)
    a, b = copy.deepcopy(fc), copy.deepcopy(fc)
    x1, x2 = torch.randn(3, 4), torch.randn(3, 4) * 3
    fc(fc(x1) + x2).sum().backward()
    y = a(x1)
    b(y + x2).sum().backward()
    for name, p in fc.named_parameters():
        pa, pb = dict(a.named_parameters())[name], dict(b.named_parameters())[name]
        if "clip" in name:  # a handful of float32 terms per call, summed in another order
            bound = 7 * torch.finfo(torch.float32).eps * float(pa.grad.abs() + pb.grad.abs())
            torch.testing.assert_close(p.grad, pa.grad + pb.grad, rtol=0, atol=bound)
        else:
            assert torch.equal(p.grad, pa.grad + pb.grad), name
    calibrating = LinearQAT(4, 4, config={"retrain_data_config": {"batch_num": 2}})
    calibrating(calibrating(x1) + x2).sum().backward()
    assert int(calibrating.input_quantizer.num_batches_calibrated) == 2


def test_learned_clip_past_zero_reads_as_aimet_torch_reads_it():
    """A learned clip_min above 0 is not snapped back to 0 (the old rule, which also cut its
    gradient): as for every learnable range in quantsim and aimet-torch, scale is
    (clip_max - clip_min) / 255 and the offset is clamped so that 0 stays on the grid, so the
    grid is [0, clip_max - clip_min] and clip_min keeps a gradient."""
    fc = LinearQAT(2, 1, config={"retrain_data_config": {"clip_min": 0.0, "clip_max": 2.0}})
    with torch.no_grad():
        fc.input_quantizer.clip_min.fill_(0.5)
    enc = fc.input_quantizer.encoding()
    assert int(enc.offset) == 0 and float(enc.min) == 0.0
    assert float(enc.max) == pytest.approx(1.5, rel=1e-6)
    fc(torch.tensor([[0.2, 1.9]])).sum().backward()
    assert float(fc.input_quantizer.clip_min.grad) != 0.0


class _Transposed(nn.ConvTranspose2d):
    """A ConvTranspose2d subclass registered with the sim without naming axes."""


def test_one_table_of_parameter_axes():
    """op_types.param_axis is the one table of output-channel axes: the sim's registry writes
    to it, subclasses inherit a parent's axis, and bad declarations are refused."""
    register_quantized(_Transposed)
    assert param_axis(_Transposed(2, 3, 1), "weight") == 1  # inherited, not reset to 0
    assert param_axis(_Transposed, "bias") == 0
    with pytest.raises(TypeError, match="axes must be ints"):
        register_param_axes(_Transposed, weight="1")
    with pytest.raises(TypeError, match="nn.Module subclass"):
        register_param_axes(int, weight=1)


def _qdq_outputs(path_or_model, x: torch.Tensor) -> np.ndarray:
    so = ort.SessionOptions()
    so.graph_optimization_level = DISABLE_ALL
    model = path_or_model if isinstance(path_or_model, str) else \
        path_or_model.SerializeToString()
    sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


@pytest.mark.parametrize("channel_wise", [False, True])
def test_int4_containers_follow_the_sim_rule(channel_wise, tmp_path):
    """The INT4 pairs a QAT layer exports are what widen_4bit_pairs makes of the sim's 4-bit
    QDQ model with the same encodings (one rule: 8-bit container of the grid's sign, clamp to
    the grid's range): in ORT both give the same outputs, equal to PyTorch's."""
    torch.manual_seed(0)
    int4 = {"retrain_data_config": {"dst_type": "INT4", "clip_min": -1.0, "clip_max": 2.0},
            "retrain_weight_config": {"dst_type": "INT4", "channel_wise": channel_wise}}
    conv = Conv2dQAT(2, 3, 1, bias=False, config=int4).eval()
    x = torch.randn(4, 2, 3, 3) * 2
    path = export(nn.Sequential(conv), x, str(tmp_path / "c.onnx"), dynamo=False)
    fq, _ = convert_qat_model(path, str(tmp_path / "c"), fake_quant_weight_dtype="int8")

    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Conv", ["x", "w"], ["y"])], "conv",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 2, 3, 3])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 3, 3, 3])],
        [onnx.numpy_helper.from_array(conv.weight.detach().numpy(), "w")])
    plan = QdqPlan(params={"w": ("w_q", conv.weight_quantizer.encoding(conv.weight))},
                   tensors={"x": ("x_q", conv.input_quantizer.encoding())})
    sim_qdq = build_qdq_model(onnx.helper.make_model(
        graph, opset_imports=[onnx.helper.make_opsetid("", 20)]), plan, qdq_opset(plan, 20))
    assert widen_4bit_pairs(sim_qdq, 20) == 2
    onnx.checker.check_model(sim_qdq, full_check=True)
    assert sim_qdq.opset_import[0].version == 20

    got_qat, got_sim = _qdq_outputs(fq, x), _qdq_outputs(sim_qdq, x)
    np.testing.assert_array_equal(got_qat, got_sim)
    with torch.no_grad():
        want = conv(x).numpy()
    np.testing.assert_allclose(got_sim, want, rtol=0, atol=1e-5 * float(np.abs(want).max()))


def test_old_import_paths_keep_working():
    """quantsim.convert_qat_model and quantsim.qat_convert name the converter that now lives in
    quantsim.export.qat_onnx; the config sections' old names still resolve, with a warning."""
    import quantsim
    from quantsim import qat_convert
    from quantsim.export import qat_onnx
    from quantsim.nn import qat

    assert quantsim.convert_qat_model is qat_convert.convert_qat_model is \
        qat_onnx.convert_qat_model
    assert qat_convert.ConvertedQATModel is qat_onnx.ConvertedQATModel
    for old, new in (("RetrainDataConfig", QATInputConfig), ("RetrainWeightConfig",
                                                             QATWeightConfig)):
        with pytest.warns(DeprecationWarning, match=f"{old} is now quantsim.nn.qat.{new.__name__}"):
            assert getattr(qat, old) is new
    with pytest.raises(AttributeError):
        qat.NoSuchName  # noqa: B018


@pytest.mark.parametrize("device", DEVICES)
def test_train_step_on_device(device):
    """On any device the quantizers live with the layer: calibration, a learned step and eval
    run there, and the encodings equal the CPU run's (min/max and scalar arithmetic are exact)."""
    torch.manual_seed(0)
    x = torch.randn(8, 2, 6, 6)
    cfg = {"retrain_data_config": {"batch_num": 1}, "retrain_weight_config": {"channel_wise": True}}
    start = Conv2dQAT(2, 4, 3, config=cfg).state_dict()
    runs = {}
    for dev in ("cpu", device):
        conv = Conv2dQAT(2, 4, 3, config=cfg, device=dev)
        conv.load_state_dict(start)
        assert conv.input_quantizer.clip_max.device.type == torch.device(dev).type
        assert conv.weight_quantizer.quantizer.scale.device.type == torch.device(dev).type
        conv(x.to(dev))  # calibration
        encodings = (conv.input_quantizer.encoding(), conv.weight_quantizer.encoding(conv.weight))
        conv(x.to(dev)).square().mean().backward()
        assert conv.input_quantizer.clip_max.grad is not None
        with torch.no_grad():
            conv.eval()(x.to(dev))
        runs[dev] = encodings
    assert runs["cpu"] == runs[device]
