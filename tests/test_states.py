"""Calibration / QAT / validation states and range-learning QAT."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from models import DuplicateReLU, SharedBlockNet, accuracy
from quantsim import QuantizationSimModel, UnsupportedModelError
from quantsim.encoding import MINIMUM_SCALE
from quantsim.errors import FakeQuantStateError
from quantsim.states import FakeQuantState, set_fake_quantize, set_high_precision_output


@pytest.fixture(scope="module")
def trained(trained_digits_cnn):
    return trained_digits_cnn


def test_state_cycle_and_mode_checks(trained, digits):
    """CALIBRATION needs eval, quantizes the weights and observes activations without changing
    them (quantsim.calibration); leaving it computes
    encodings; QAT needs train; a model evaluated in QAT state raises instead of silently
    leaving scales stuck."""
    x = digits[0][:128]
    sim = QuantizationSimModel(trained, x[:4], quant_scheme="tf")
    sim.model.train()
    with pytest.raises(FakeQuantStateError, match="eval"):
        set_fake_quantize(sim, FakeQuantState.CALIBRATION)
    sim.model.eval()
    set_fake_quantize(sim, FakeQuantState.CALIBRATION)
    reference = copy.deepcopy(trained)                   # quantized weights, float activations
    with torch.no_grad():
        for name, module in sim.named_qmodules():
            for pname, pq in module.param_quantizers.items():
                if pq.enabled:
                    p = reference.get_parameter(f"{name}.{pname}")
                    p.copy_(pq.encoding.fake_quantize(p))
        assert torch.equal(sim.model(x), reference(x))
    with pytest.raises(FakeQuantStateError, match="train"):
        set_fake_quantize(sim, FakeQuantState.QAT)
    sim.model.train()
    set_fake_quantize(sim, FakeQuantState.QAT)
    q = sim.model.conv1.input_quantizers[0]
    assert q.is_initialized and q.state == "qat"
    before = q.get_max().clone()
    sim.model(x * 3)                                    # moving average follows the data
    assert q.get_max() > before
    sim.model.eval()
    with pytest.raises(FakeQuantStateError, match="QAT"):
        sim.model(x)
    set_fake_quantize(sim, FakeQuantState.VALIDATION)
    frozen = q.get_max().clone()
    with torch.no_grad():
        sim.model(x * 10)
    assert torch.equal(q.get_max(), frozen)
    sim.model.train()
    with pytest.raises(FakeQuantStateError, match="VALIDATION"):
        sim.model(x)


def test_moving_average_constant(trained, digits):
    """In QAT the activation range moves by averaging_constant (default 0.01) per step."""
    x = digits[0][:64]
    sim = QuantizationSimModel(trained, x[:4], quant_scheme="tf")
    sim.compute_encodings(lambda m, _: m(x), None)
    q = sim.model.conv1.input_quantizers[0]
    assert q.averaging_constant == 0.01
    sim.model.train()
    set_fake_quantize(sim, FakeQuantState.QAT)
    old = float(q.get_max())
    sim.model(x * 2)
    expected = old * 0.99 + float((x * 2).max()) * 0.01
    assert abs(float(q.get_max()) - expected) < 2 * float(q.get_scale())


def test_high_precision_output(trained, digits):
    """The classifier head's output stays float when asked."""
    sim = QuantizationSimModel(trained, digits[0][:4])
    set_high_precision_output(sim, "fc")
    assert not sim.model.fc.output_quantizers[0].enabled
    with pytest.raises(UnsupportedModelError, match="not a quantized module"):
        set_high_precision_output(sim, "nope")


def test_high_precision_output_by_either_path():
    """A module reachable as self.block and self.body[0] may be named by either path."""
    sim = QuantizationSimModel(SharedBlockNet(), torch.randn(4, 8))
    set_high_precision_output(sim, "body.0")
    assert not sim.model.block.output_quantizers[0].enabled
    with pytest.raises(UnsupportedModelError, match=r"known: \['block', 'body.1', 'head'\]"):
        set_high_precision_output(sim, "body")


def test_range_learning_qat_recovers_w4(trained, digits):
    """W4A8 per-channel: a brief seeded QAT with learned ranges improves on PTQ; after every
    step scales stay > 0 and zero stays on the grid."""
    x_train, y_train, x_test, y_test = digits
    sim = QuantizationSimModel(trained, x_train[:4], quant_scheme="range_learning_tf",
                               default_param_bw=4)
    sim.compute_encodings(lambda m, _: m(x_train[:512]), None)
    ptq = accuracy(sim.model, x_test, y_test)
    opt = torch.optim.Adam(sim.model.parameters(), lr=1e-3)
    torch.manual_seed(0)
    sim.model.train()
    quantizers = [q for q in sim.quantizers() if q.enabled]
    for step in range(60):
        idx = torch.randint(0, len(x_train), (64,))
        opt.zero_grad()
        nn.functional.cross_entropy(sim.model(x_train[idx]), y_train[idx]).backward()
        opt.step()
        for q in quantizers:
            assert bool(torch.all(q.get_scale() >= MINIMUM_SCALE))
            offset = q.get_offset()
            qmin, qmax = q.qmin_qmax
            assert bool(torch.all((-offset >= qmin) & (-offset <= qmax)))
    sim.model.eval()
    qat = accuracy(sim.model, x_test, y_test)
    assert qat >= ptq - 0.005
    assert qat >= accuracy(trained, x_test, y_test) - 0.02


def test_qat_state_with_a_module_called_several_times():
    """A module called three times per forward (one ReLU after conv1, conv2 and fc1) trains in
    the QAT state: its moving-average observer rewrites the encoding between the calls, and
    the backward still finds the encodings each call used."""
    torch.manual_seed(0)
    model = DuplicateReLU()
    x = torch.randn(8, 3, 32, 32)
    sim = QuantizationSimModel(model, x, quant_scheme="tf")
    sim.compute_encodings(lambda m, _: m(x), None)
    sim.model.train()
    set_fake_quantize(sim, FakeQuantState.QAT)
    opt = torch.optim.SGD(sim.model.parameters(), lr=0.01)
    before = sim.model.conv1.weight.detach().clone()
    for _ in range(2):
        opt.zero_grad()
        sim.model(x).square().mean().backward()
        opt.step()
    assert not torch.equal(before, sim.model.conv1.weight)
    assert sim.model.relu.output_quantizers[0].state == "qat"


def test_check_mode_raises_only_where_the_state_needs_the_other_mode():
    """``Quantizer.check_mode``: a no-op without a required mode or in the required one; the
    error names the required mode otherwise (the kept-weight-codes path calls it directly)."""
    from quantsim.quantizer import Quantizer

    q = Quantizer(8)
    q.eval().check_mode()
    q.train().check_mode()
    q.required_mode = "train"
    q.check_mode()
    with pytest.raises(FakeQuantStateError, match=r"needs the model in train\(\) mode"):
        q.eval().check_mode()
