"""Tests of quantsim.quantizer.Quantizer: states, calibration, per-channel, dtypes, range learning.

Every numeric expectation is built from :class:`quantsim.encoding.Encoding` (the one place the
arithmetic lives), so these tests check that the module wires the arithmetic correctly.
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from quantsim.encoding import MINIMUM_SCALE, Encoding
from conftest import requires_cuda
from quantsim.errors import CalibrationError, QuantizationSettingError
from quantsim.quantizer import Quantizer, QuantizerRole, QuantizerState



def calibrated(x: torch.Tensor, **kwargs) -> Quantizer:
    """A 'tf' quantizer that observed ``x`` and computed its encoding."""
    kwargs.setdefault("scheme", "tf")
    q = Quantizer(**kwargs)
    q.state = "observe"
    q(x)
    q.compute_encoding()
    q.state = "quantize"
    return q


def _channel_range(x: torch.Tensor, axis: int):
    flat = x.movedim(axis, 0).reshape(x.shape[axis], -1)
    return flat.amin(dim=1), flat.amax(dim=1)


# ----------------------------------------------------------------------------------------------
# states
# ----------------------------------------------------------------------------------------------
def test_observe_passes_through_and_collects():
    """'observe' returns its input unchanged and gathers the statistics."""
    q = Quantizer(8, scheme="tf", name="fc.output")
    q.state = "observe"
    x = torch.randn(64)
    assert q(x) is x
    assert q.analyzer.has_stats and not q.is_initialized


def test_compute_encoding_tf_equals_from_range_of_observed_min_max():
    """'tf': compute_encoding == Encoding.from_range(min, max) of everything observed, exactly."""
    torch.manual_seed(0)
    batches = [torch.randn(100) * 2 + 0.3, torch.randn(50) * 5, torch.rand(10) * 9]
    for symmetric in (False, True):
        q = Quantizer(8, symmetric=symmetric, scheme="tf")
        q.state = "observe"
        for b in batches:
            q(b)
        q.compute_encoding()
        all_x = torch.cat(batches)
        expected = Encoding.from_range(all_x.min(), all_x.max(), 8, symmetric=symmetric)
        assert q.encoding == expected
        q.state = "quantize"
        assert torch.equal(q(all_x), expected.fake_quantize(all_x))


def test_peer_vector_through_the_quantizer():
    """The FORMATS §2.3 tf vector: raw (-0.31027406, 0.49538109) -> scale 0.003159431740641594,
    offset -98."""
    q = calibrated(torch.tensor([-0.31027406, 0.1, 0.49538109]))
    assert float(q.get_scale()) == 0.003159431740641594 and int(q.get_offset()) == -98


def test_observe_passes_values_unchanged_and_merges_batches():
    """'observe' (how activations calibrate, as in aimet-torch 2.x) returns each batch as it is
    and the encoding covers every batch seen."""
    torch.manual_seed(1)
    q = Quantizer(8, scheme="tf")
    q.state = "observe"
    batches = [torch.randn(40), torch.randn(40) * 3]
    for x in batches:
        assert q(x) is x
    q.compute_encoding()
    all_x = torch.cat(batches)
    assert q.encoding == Encoding.from_range(all_x.min(), all_x.max(), 8)


def test_qat_moving_average():
    """'qat' (not learnable): the first batch sets the encoding from its range; each later
    batch moves the grid-aligned min/max by averaging_constant towards the batch range, and the
    output is fake-quantized with the updated encoding."""
    torch.manual_seed(3)
    q = Quantizer(8, scheme="tf")
    q.state = "qat"
    x1, x2 = torch.randn(50), torch.randn(50) * 4
    y1 = q(x1)
    first = Encoding.from_range(x1.min(), x1.max(), 8)
    assert q.encoding == first and torch.equal(y1, first.fake_quantize(x1))
    y2 = q(x2)
    c = q.averaging_constant
    second = Encoding.from_range(first.min * (1 - c) + x2.min() * c,
                                 first.max * (1 - c) + x2.max() * c, 8)
    assert q.encoding == second and torch.equal(y2, second.fake_quantize(x2))
    q.frozen = True
    q(x2 * 10)
    assert q.encoding == second


def test_quantize_state_uses_stored_encoding_only():
    """'quantize' does not change the encoding, whatever it sees."""
    q = calibrated(torch.linspace(-1, 1, 11))
    before = q.encoding
    x = torch.randn(30) * 10
    y = q(x)
    assert q.encoding == before and torch.equal(y, before.fake_quantize(x))


def test_disabled_quantizer_passes_through():
    """enabled=False returns the input object unchanged in every state and observes nothing."""
    q = Quantizer(8, scheme="tf")
    q.enabled = False
    x = torch.randn(10)
    for state in ("observe", "quantize", "qat"):
        q.state = state
        assert q(x) is x
    assert not q.analyzer.has_stats and not q.is_initialized


def test_state_and_role_are_checked():
    """A state or role outside the vocabulary is refused, naming the quantizer and the choices
    (a typo no longer turns the quantizer into a silent pass-through)."""
    q = Quantizer(8, name="conv1.output_quantizers.0", role="output")
    assert q.role is QuantizerRole.OUTPUT and q.state is QuantizerState.QUANTIZE
    with pytest.raises(QuantizationSettingError, match=r"conv1\.output_quantizers\.0.*state.*"
                                                       r"\['quantize', 'observe', 'qat'\]"):
        q.state = "calibrate"
    assert q.state == "quantize"
    with pytest.raises(QuantizationSettingError, match="role"):
        Quantizer(8, role="weights")


def test_settings_round_trip_and_refuse_bad_values():
    """settings() is plain JSON data; apply_settings() takes it back (learnable ranges get
    parameters for a state_dict) and refuses wrong types naming the key, changing nothing."""
    import json

    src = Quantizer(4, symmetric=True, shape=(3,), axis=0, scheme="tf", name="w",
                    role=QuantizerRole.PARAM)
    src.state = "observe"
    src(torch.randn(3, 5))
    src.compute_encoding()
    src.set_learnable(True)
    src.state, src.averaging_constant, src.frozen = "qat", 0.5, True
    settings = json.loads(json.dumps(src.settings()))
    dst = Quantizer(8, shape=(3,), axis=0, name="w")
    dst.apply_settings(settings)
    dst.load_state_dict(src.state_dict())
    assert dst.settings() == src.settings()
    assert dst.learnable and torch.equal(dst.get_scale(), src.get_scale())
    for key, value in [("enabled", "False"), ("bitwidth", 3), ("state", "calibrate"),
                       ("averaging_constant", 0), ("range_constraint", [None, "x"])]:
        fresh = Quantizer(8, name="w")
        before = fresh.settings()
        with pytest.raises(QuantizationSettingError, match="w"):
            fresh.apply_settings({**settings, key: value})
        assert fresh.settings() == before, key


def test_learnable_range_can_start_before_an_encoding():
    """set_learnable(init=...) gives an optimizer the parameters before calibration; the
    quantizer stays uncalibrated until an encoding arrives, which then fills them."""
    q = Quantizer(8, scheme="tf")
    with pytest.raises(CalibrationError, match="compute encodings"):
        q.set_learnable(True)
    q.set_learnable(True, init=(0.0, 0.0))
    assert q.learnable and not q.is_initialized
    q.set_encoding(Encoding.from_range(torch.tensor(-1.0), torch.tensor(1.0), 8))
    assert q.is_initialized and float(q.max) == pytest.approx(1.0, abs=float(q.get_scale()))


def test_integer_tensors_pass_through():
    """Non-float inputs (indices, masks) are never quantized."""
    q = calibrated(torch.randn(10))
    idx = torch.arange(5)
    assert q(idx) is idx


# ----------------------------------------------------------------------------------------------
# errors and invalidation
# ----------------------------------------------------------------------------------------------
def test_uncalibrated_quantizer_raises_naming_itself():
    """'quantize' without an encoding raises CalibrationError that names the quantizer and
    says how to fix it."""
    q = Quantizer(8, name="conv1.output_quantizers.0")
    with pytest.raises(CalibrationError, match=r"conv1\.output_quantizers\.0.*compute_encodings"):
        q(torch.randn(3))


def test_compute_encoding_without_data_raises_naming_itself():
    """compute_encoding() with nothing observed raises CalibrationError naming the quantizer."""
    q = Quantizer(8, scheme="tf", name="fc.weight")
    with pytest.raises(CalibrationError, match="fc.weight"):
        q.compute_encoding()


def test_bitwidth_change_invalidates_the_encoding():
    """Changing the bitwidth drops the encoding (forward then raises); setting the same
    bitwidth keeps it."""
    q = calibrated(torch.randn(20), name="act")
    before = q.encoding
    q.bitwidth = 8
    assert q.is_initialized and q.encoding == before
    q.bitwidth = 4
    assert not q.is_initialized and q.encoding is None
    with pytest.raises(CalibrationError, match="act"):
        q(torch.randn(3))
    q.state = "observe"
    q(torch.randn(20))
    q.compute_encoding()
    assert q.encoding.bitwidth == 4 and (q.encoding.qmin, q.encoding.qmax) == (0, 15)


# ----------------------------------------------------------------------------------------------
# encoding access
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("axis", [None, 0, 1])
def test_getters_are_consistent(symmetric, axis):
    """get_min == scale * (offset + qmin), get_max == scale * (offset + qmax) exactly, and all
    four equal the Encoding value; all are None before calibration."""
    torch.manual_seed(4)
    w = torch.randn(3, 5, 2) + 0.2
    shape = () if axis is None else (w.shape[axis],)
    q = Quantizer(8, symmetric=symmetric, shape=shape, axis=axis, scheme="tf")
    assert q.get_min() is None and q.get_max() is None
    assert q.get_scale() is None and q.get_offset() is None
    q.state = "observe"
    q(w)
    q.compute_encoding()
    qmin, qmax = q.qmin_qmax
    s, o = q.get_scale(), q.get_offset()
    assert torch.equal(q.get_min(), s * (o + qmin)) and torch.equal(q.get_max(), s * (o + qmax))
    enc = q.encoding
    assert torch.equal(enc.scale, s) and torch.equal(enc.offset, o)
    assert torch.equal(enc.min, q.get_min()) and torch.equal(enc.max, q.get_max())
    assert bool(torch.all(q.get_min() <= 0)) and bool(torch.all(q.get_max() >= 0))


@pytest.mark.parametrize("axis", [0, 1])
def test_per_channel_weights(axis):
    """Per-channel weight quantizers (axis 0: Conv/Linear, axis 1: ConvTranspose) equal
    Encoding.from_range of each channel's min/max, and qdq matches per channel."""
    torch.manual_seed(5)
    w = torch.randn(6, 4, 3, 3) * torch.linspace(0.01, 3, 6).reshape(6, 1, 1, 1)
    q = calibrated(w, bitwidth=8, symmetric=True, shape=(w.shape[axis],), axis=axis)
    lo, hi = _channel_range(w, axis)
    expected = Encoding.from_range(lo, hi, 8, symmetric=True, axis=axis)
    assert q.encoding == expected and q.encoding.axis == axis
    assert torch.equal(q(w), expected.fake_quantize(w))


def test_repr_is_readable():
    """repr names bitwidth, kind, granularity and the numbers (or 'uncalibrated'); a learnable
    quantizer's repr does not trip autograd warnings."""
    q = Quantizer(8, scheme="tf")
    assert "int8 asym per-tensor" in repr(q) and "uncalibrated" in repr(q)
    q = calibrated(torch.tensor([-1.0, 2.0]))
    text = repr(q)
    assert "scale=0.0117647" in text and "offset=-85" in text and "min=-1" in text
    pc = Quantizer(4, symmetric=True, shape=(3,), axis=0)
    assert "int4 sym per-channel(axis=0)" in repr(pc)
    assert repr(Quantizer(16, data_type="float")).startswith("Quantizer(float16")
    q.set_learnable(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert "offset=-85" in repr(q)


# ----------------------------------------------------------------------------------------------
# dtypes and float simulation
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_keep_their_dtype(dtype):
    """float16/bfloat16 inputs come out in their dtype in every state; values equal the float32
    computation cast back."""
    torch.manual_seed(6)
    x = (torch.randn(64) * 2).to(dtype)
    q = Quantizer(8, scheme="tf")
    for state in ("observe", "qat"):
        q.state = state
        assert q(x).dtype == dtype
    q.compute_encoding()
    q.state = "quantize"
    y = q(x)
    assert y.dtype == dtype
    assert torch.equal(y, q.encoding.fake_quantize(x.float()).to(dtype))
    fq = Quantizer(16, data_type="float")
    assert fq(x).dtype == dtype


def test_float16_simulation():
    """data_type float: equals x.half().float() inside the fp16 range, saturates at +-65504
    beyond, keeps NaN, and needs no calibration."""
    q = Quantizer(16, data_type="float", name="fp16")
    assert q.is_initialized and q.encoding == Encoding.float16()
    torch.manual_seed(7)
    x = torch.randn(1000) * 1000
    assert torch.equal(q(x), x.half().float())
    big = torch.tensor([65504.0, 65519.0, 65520.0, 1e6, math.inf, -1e6, -math.inf])
    assert q(big).tolist() == [65504.0, 65504.0, 65504.0, 65504.0, 65504.0, -65504.0, -65504.0]
    assert math.isnan(float(q(torch.tensor(math.nan))))
    tiny = torch.tensor([1e-8, 6e-8, -3e-5])  # fp16 subnormals / underflow
    assert torch.equal(q(tiny), tiny.half().float())
    q.state = "observe"
    assert torch.equal(q(big), big)


# ----------------------------------------------------------------------------------------------
# gradients and range learning
# ----------------------------------------------------------------------------------------------
def test_straight_through_gradient_through_the_quantizer():
    """Gradient 1 inside the grid, 0 outside (STE), through the module."""
    q = calibrated(torch.tensor([-1.0, 1.0]))
    x = torch.tensor([-3.0, -0.5, 0.0, 0.7, 2.0], requires_grad=True)
    q(x).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]


@pytest.mark.parametrize("symmetric", [False, True])
def test_set_learnable_exposes_min_max_parameters(symmetric):
    """set_learnable(True) turns min/max into nn.Parameters (grid-aligned ends) keeping the
    encoding (offset equal, scale within 1 float32 ulp); both get finite, non-zero gradients."""
    torch.manual_seed(8)
    x = torch.randn(200)
    q = calibrated(x, symmetric=symmetric)
    before = q.encoding
    q.set_learnable(True)
    params = dict(q.named_parameters())
    assert set(params) == {"min", "max"}
    assert all(isinstance(p, nn.Parameter) and p.requires_grad for p in params.values())
    assert torch.equal(q.min.detach(), before.min) and torch.equal(q.max.detach(), before.max)
    assert torch.equal(q.get_offset().detach(), before.offset)
    scale = float(q.get_scale().detach())
    assert abs(scale - float(before.scale)) <= math.ulp(float(before.scale))
    loss = ((q(x * 1.3) - x * 1.3) ** 2).sum()
    loss.backward()
    for p in (q.min, q.max):
        assert p.grad is not None and bool(torch.isfinite(p.grad).all()) and float(p.grad) != 0


def test_learnable_per_channel_gradients():
    """Per-channel learnable ranges get one finite gradient per channel."""
    torch.manual_seed(9)
    w = torch.randn(3, 8) * torch.tensor([[0.5], [1.0], [2.0]])
    q = calibrated(w, symmetric=True, shape=(3,), axis=0)
    q.set_learnable(True)
    ((q(w * 1.2) - w) ** 2).sum().backward()
    assert q.min.grad.shape == (3,) and bool(torch.isfinite(q.max.grad).all())


@pytest.mark.parametrize("symmetric", [False, True])
def test_training_keeps_scale_positive_and_zero_exact(symmetric):
    """SGD steps on min/max (including steps that push min above 0 and max below min) keep
    scale >= MINIMUM_SCALE, integral offsets with 0 on the grid, and qdq(0) == 0."""
    torch.manual_seed(10)
    x = torch.randn(256) * 2
    q = calibrated(x, symmetric=symmetric)
    q.set_learnable(True)
    q.state = "qat"
    opt = torch.optim.SGD(q.parameters(), lr=0.5)
    qmin, qmax = q.qmin_qmax

    def check():
        s, o = q.get_scale().detach(), q.get_offset().detach()
        assert float(s) >= MINIMUM_SCALE and math.isfinite(float(s))
        assert float(o) == round(float(o)) and qmin <= -float(o) <= qmax
        assert float(q(torch.zeros(1)).detach()) == 0.0

    for step in range(15):
        target = x * (3.0 if step < 8 else 0.01)  # widen, then shrink hard
        loss = ((q(x * 3.0) - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        check()
    with torch.no_grad():  # adversarial: min > 0 and max < min
        q.min.fill_(0.5)
        q.max.fill_(-0.25)
    check()


def test_set_learnable_false_freezes_back():
    """set_learnable(False) removes the parameters and keeps the learned encoding in buffers."""
    q = calibrated(torch.randn(50))
    q.set_learnable(True)
    with torch.no_grad():
        q.max.add_(0.5)
    learned = q.encoding
    q.set_learnable(False)
    assert not q.learnable and list(q.parameters()) == []
    assert q.encoding == learned


def test_set_learnable_before_calibration_raises():
    """Ranges can only become learnable once there is an encoding."""
    with pytest.raises(CalibrationError, match="act0"):
        Quantizer(8, name="act0").set_learnable(True)


# ----------------------------------------------------------------------------------------------
# CUDA
# ----------------------------------------------------------------------------------------------
@requires_cuda
@pytest.mark.parametrize("axis", [None, 0])
def test_cuda_matches_cpu(axis):
    """A quantizer moved to CUDA gives the CPU result bit for bit (calibration and qdq)."""
    torch.manual_seed(11)
    w = torch.randn(4, 16)
    shape = () if axis is None else (4,)
    cpu = calibrated(w, symmetric=True, shape=shape, axis=axis)
    gpu = Quantizer(8, symmetric=True, shape=shape, axis=axis, scheme="tf").cuda()
    gpu.state = "observe"
    gpu(w.cuda())
    gpu.compute_encoding()
    gpu.state = "quantize"
    assert gpu.encoding == cpu.encoding
    assert torch.equal(gpu(w.cuda()).cpu(), cpu(w))
    assert gpu(w.cuda().half()).dtype == torch.float16


@requires_cuda
def test_cuda_learnable_gradients():
    """Range learning runs on CUDA with finite gradients."""
    q = calibrated(torch.randn(64)).cuda()
    q.set_learnable(True)
    x = torch.randn(64, device="cuda")
    ((q(x * 2) - x) ** 2).sum().backward()
    assert bool(torch.isfinite(q.min.grad).all()) and bool(torch.isfinite(q.max.grad).all())


@pytest.mark.parametrize("scheme", ["tf", "tf_enhanced", "percentile"])
def test_unsigned_symmetric_applies_to_non_negative_data_with_every_scheme(scheme):
    """A symmetric quantizer of ReLU-like data with unsigned_symmetric uses [0, 255] (half the
    step of the signed grid) whatever the scheme; tf_enhanced searches [0, hi] ranges for it."""
    x = torch.relu(torch.randn(20000, generator=torch.Generator().manual_seed(0)))
    noise = {}
    for unsigned_symmetric in (True, False):
        q = Quantizer(bitwidth=8, symmetric=True, unsigned_symmetric=unsigned_symmetric,
                      scheme=scheme)
        q.state = "observe"
        q(x)
        q.compute_encoding()
        q.state = "quantize"
        enc = q.encoding
        assert enc.unsigned == unsigned_symmetric
        if unsigned_symmetric:
            assert float(enc.min) == 0.0 and enc.qmax - enc.qmin == 255
        noise[unsigned_symmetric] = float((q(x) - x).pow(2).mean())
    assert noise[True] < 0.5 * noise[False]
    q = Quantizer(bitwidth=8, symmetric=True, unsigned_symmetric=True, scheme=scheme)
    q.state = "observe"
    q(x - 0.01)  # a little negative data: the signed grid again
    q.compute_encoding()
    assert not q.encoding.unsigned


def test_an_encoding_is_a_value_not_a_view_of_the_quantizer():
    """An Encoding read from a quantizer keeps its numbers when the quantizer gets another."""
    q = calibrated(torch.randn(100))
    enc = q.encoding
    scale = enc.scale.clone()
    q.set_encoding(Encoding.from_range(torch.tensor(-5.0), torch.tensor(5.0), 8))
    assert torch.equal(enc.scale, scale) and not torch.equal(q.get_scale(), scale)
