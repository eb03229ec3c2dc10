"""Placement: which quantizers a sim enables, matched per call of every module.

The central model is the shape of aimet's ``ModelWithDuplicateReLU``: one ``nn.ReLU`` module runs
after conv1, conv2 and fc1, and a tensor-method ``.relu()`` follows fc2. Side by side with
aimet-torch 2.42 (same weights, data and per-channel config) both tools agree on the fusion:
each conv/fc -> relu call is a Conv+Relu / Gemm+Relu supergroup, so conv2's and fc1's outputs are
not quantized. They differ on the shared ReLU: aimet-torch removes every quantizer of a
parameterless module called more than once, so the three ReLU outputs (and, being fused, the
conv/fc outputs before them) stay float; no integer runtime executes that. quantsim keeps the
one quantizer, so every call's output is quantized with one encoding calibrated over all
calls, which is what a runtime executes with that module's encodings;
``quantsim.prepare.prepare_model`` gives each call its own module and encoding.
"""
from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models import DuplicateReLU
from quantsim.config import BUILTIN_CONFIGS
from quantsim.encoding import Encoding
from quantsim.prepare import prepare_model
from quantsim.sim import QuantizationSimModel


@pytest.fixture(scope="module")
def data():
    torch.manual_seed(0)
    model = DuplicateReLU().eval()
    return model, torch.randn(32, 3, 32, 32), torch.randn(16, 3, 32, 32)


def build(model, x, **kwargs) -> QuantizationSimModel:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return QuantizationSimModel(model, x[:1], **kwargs)


def enabled_activations(sim) -> set:
    return {n for n, q in sim.named_quantizers() if q.enabled and ".param_quantizers." not in n}


def with_config(**changes) -> dict:
    with open(BUILTIN_CONFIGS["per_channel"]) as f:
        config = json.load(f)
    config.update(changes)
    return config


# -- the shared ReLU ------------------------------------------------------------------------------
def test_each_call_of_a_shared_relu_closes_its_own_supergroup(data):
    """conv1 -> relu, conv2 -> relu (2nd call), fc1 -> relu (3rd call) all fuse: only the shared
    ReLU's output quantizer is on among them; fc2's output and fc3's input are quantized on
    both sides of the ``.relu()`` that quantsim does not see."""
    model, x, _ = data
    sim = build(model, x, quant_scheme="tf")
    assert set(sim.placement.supergroups) == {("conv1", "relu"), ("conv2", "relu"), ("fc1", "relu")}
    assert enabled_activations(sim) == {
        "conv1.input_quantizers.0", "relu.output_quantizers.0", "fc2.output_quantizers.0",
        "fc3.input_quantizers.0", "fc3.output_quantizers.0"}
    assert {n for n, q in sim.named_quantizers() if q.enabled and ".param_quantizers." in n} == {
        f"{m}.param_quantizers.weight" for m in ("conv1", "conv2", "fc1", "fc2", "fc3")}
    assert sim.placement.unquantized_arrivals == [("fc3", 0)]


@pytest.mark.parametrize("scheme", ["tf", "tf_enhanced"])
def test_shared_relu_simulation_is_its_definition(scheme, data):
    """The sim's output equals, bit for bit, the forward written out from the placement: every
    ReLU call rounds once, with the one shared encoding, right after its conv/fc (no rounding of
    conv2's or fc1's output); fc2's output and the ``.relu()`` result round separately."""
    model, x, x_eval = data
    sim = build(model, x, quant_scheme=scheme)
    sim.compute_encodings(lambda m, _: m(x), None)
    m = sim.model

    def weight(layer):
        return layer.param_quantizers["weight"](layer.weight)

    relu_q = m.relu.output_quantizers[0]
    with torch.no_grad():
        y = m.conv1.input_quantizers[0](x_eval)
        y = F.max_pool2d(relu_q(F.relu(F.conv2d(y, weight(m.conv1), m.conv1.bias))), 2, 2)
        y = F.max_pool2d(relu_q(F.relu(F.conv2d(y, weight(m.conv2), m.conv2.bias))), 2, 2)
        y = relu_q(F.relu(F.linear(torch.flatten(y, 1), weight(m.fc1), m.fc1.bias)))
        y = m.fc2.output_quantizers[0](F.linear(y, weight(m.fc2), m.fc2.bias))
        y = m.fc3.input_quantizers[0](F.relu(y))
        expected = m.fc3.output_quantizers[0](F.linear(y, weight(m.fc3), m.fc3.bias))
        assert torch.equal(sim.model(x_eval), expected)


def test_shared_relu_encoding_covers_every_call(data):
    """Scheme tf: the shared ReLU's encoding is the one of the union of what all three calls
    produced during calibration (not of the first or the last call alone), and in the
    calibrated sim every call's output lies on that one grid."""
    model, x, x_eval = data
    sim = build(model, x, quant_scheme="tf")
    relu = sim.model.relu
    seen = []
    handle = relu.register_forward_pre_hook(lambda _, args: seen.append(F.relu(args[0]).max()))
    sim.compute_encodings(lambda m, _: m(x), None)
    handle.remove()
    assert len(seen) == 3
    per_call = torch.stack(seen)
    assert float(per_call.min()) < float(per_call.max())  # the union differs from some call
    q = relu.output_quantizers[0]
    assert q.encoding == Encoding.from_range(0.0, per_call.max(), 8)

    outputs = []
    handle = relu.register_forward_hook(lambda _, __, out: outputs.append(out))
    with torch.no_grad():
        sim.model(x_eval)
    handle.remove()
    assert len(outputs) == 3
    scale, offset = q.encoding.scale, q.encoding.offset
    for out in outputs:
        steps = out / scale - offset
        # on the grid up to float32 rounding of out / scale (a few ulps of <= 255)
        assert torch.allclose(steps, steps.round(), rtol=0, atol=255 * 2 ** -20)
        assert int(steps.round().min()) >= 0 and int(steps.round().max()) <= 255


def test_prepare_model_gives_each_call_its_own_relu(data):
    """prepare_model un-shares the ReLU and turns ``.relu()`` into a module: every call then has
    its own encoding and fc2 -> relu fuses as well, so no activation is rounded twice."""
    model, x, _ = data
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_model(model)
    sim = build(prepared, x, quant_scheme="tf")
    relus = {n for n, mod in sim.model.named_modules() if isinstance(mod, nn.ReLU)}
    assert len(relus) == 4
    assert all(sim.graph.call_counts[n] == 1 for n in relus)
    assert enabled_activations(sim) == {"conv1.input_quantizers.0", "fc3.output_quantizers.0"} | {
        f"{n}.output_quantizers.0" for n in relus}
    assert not sim.placement.unquantized_arrivals


# -- per-call rules for any shared module ---------------------------------------------------------
class _SharedAfterAdd(nn.Module):
    """A shared ReLU whose first call follows a conv and whose second reads a functional add."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.conv(x))
        return self.relu(y + x)


def test_unquantized_arrival_in_a_later_call_gets_an_input_quantizer():
    """The add result reaches the ReLU's second call unquantized: the shared input quantizer is
    enabled (it then rounds the first call's input too: one module, one set of quantizers)."""
    sim = build(_SharedAfterAdd(), torch.randn(2, 2, 6, 6))
    assert sim.placement.unquantized_arrivals == [("relu", 0)]
    assert sim.model.relu.input_quantizers[0].enabled
    assert not sim.model.conv.output_quantizers[0].enabled  # conv -> relu still fuses


class _SharedRelu(nn.Module):
    """conv1 -> relu -> conv2 -> (pool) -> relu: the second call fused or not."""

    def __init__(self, pool: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 2, 3, padding=1)
        self.conv2 = nn.Conv2d(2, 2, 3, padding=1)
        self.pool = nn.MaxPool2d(2) if pool else None
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(self.relu(self.conv1(x)))
        return self.relu(self.pool(y) if self.pool is not None else y)


@pytest.mark.parametrize("pool, input_on", [(False, False), (True, True)])
def test_shared_module_input_quantizer_off_only_when_every_call_is_fused(pool, input_on):
    """With ``op_type.Relu.is_input_quantized``, a ReLU fused in every call has its input
    quantizer off; when one call reads a MaxPool (not fused) the shared quantizer stays on."""
    config = with_config(op_type={"Relu": {"is_input_quantized": "True"}})
    sim = build(_SharedRelu(pool), torch.randn(2, 2, 8, 8), config_file=config)
    assert sim.model.relu.input_quantizers[0].enabled is input_on
    assert not sim.model.conv1.output_quantizers[0].enabled
    assert sim.model.conv2.output_quantizers[0].enabled is pool


class _SharedConv(nn.Module):
    """One conv called twice, each call followed by its own ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.relu1, self.relu2 = nn.ReLU(), nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu2(self.conv(self.relu1(self.conv(x))))


def test_shared_module_does_not_start_a_chain():
    """Which call of a shared conv produced a tensor is not traced, so it starts no supergroup:
    its output quantizer stays on (each call rounds before its ReLU)."""
    sim = build(_SharedConv(), torch.randn(2, 2, 6, 6))
    assert sim.placement.supergroups == []
    assert sim.model.conv.output_quantizers[0].enabled


class _SharedBatchNorm(nn.Module):
    """One BatchNorm after conv1 and after conv2, or (``after_add``) after an add."""

    def __init__(self, after_add: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 2, 3, padding=1)
        self.conv2 = nn.Conv2d(2, 2, 3, padding=1)
        self.bn = nn.BatchNorm2d(2)
        self.after_add = after_add

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv1(x))
        z = self.conv2(y)
        return self.bn(z + x if self.after_add else z)


def test_shared_batch_norm_folds_per_call():
    """A BN folded after each of its calls loses its input and parameter quantizers; one that
    also runs after an add keeps its weight quantizer (that call runs a real BatchNorm)."""
    x = torch.randn(2, 2, 6, 6)
    both = build(_SharedBatchNorm(after_add=False), x)
    assert sorted(both.placement.folded) == [("conv1", "bn"), ("conv2", "bn")]
    assert not both.model.bn.param_quantizers["weight"].enabled
    assert not both.model.conv1.output_quantizers[0].enabled
    assert not both.model.conv2.output_quantizers[0].enabled
    assert both.model.bn.output_quantizers[0].enabled

    partly = build(_SharedBatchNorm(after_add=True), x)
    assert partly.placement.folded == [("conv1", "bn")]
    assert partly.model.bn.param_quantizers["weight"].enabled
    assert partly.model.bn.input_quantizers[0].enabled  # the add result arrives unquantized
    assert not partly.model.conv1.output_quantizers[0].enabled
    assert partly.model.conv2.output_quantizers[0].enabled
