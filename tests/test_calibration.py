"""The one calibration path (quantsim.calibration): aimet-torch 2.x's semantics, checked against a
reference computed from the definition, for compute_encodings and the CALIBRATION state."""
from __future__ import annotations

import copy
from collections import defaultdict
from typing import Dict, List

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from models import randomize_batch_norms
from quantsim import QuantizationSimModel
from quantsim.analyzers import create_analyzer
from quantsim.encoding import INT32_BIAS_STEPS, MIN_REQUANT_SCALE, Encoding, int32_bias_weight_scale
from quantsim.errors import CalibrationError
from quantsim.states import FakeQuantState, set_fake_quantize

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(trained_digits_cnn):
    return trained_digits_cnn


def _batches(digits) -> List[torch.Tensor]:
    return [digits[0][i:i + 64] for i in range(0, 256, 64)]


def observed_in_float(float_model: nn.Module, sim: QuantizationSimModel,
                      batches: List[torch.Tensor]) -> Dict[str, List[torch.Tensor]]:
    """The definition of calibration: the float model with each weight fake-quantized with its
    own (the sim's) parameter encoding, run in eval mode; every enabled activation quantizer of
    the sim sees its module's float input / output. Returns quantizer name -> tensors seen."""
    ref = copy.deepcopy(float_model).eval()
    modules = dict(ref.named_modules())
    with torch.no_grad():
        for name, qmodule in sim.named_qmodules():
            for pname, q in qmodule.param_quantizers.items():
                if q.enabled:
                    p = getattr(modules[name], pname)
                    p.copy_(q.encoding.fake_quantize(p))
    seen: Dict[str, List[torch.Tensor]] = defaultdict(list)
    hooks = []
    for name, qmodule in sim.named_qmodules():
        ins = [i for i, q in enumerate(qmodule.input_quantizers) if q.enabled]
        outs = [i for i, q in enumerate(qmodule.output_quantizers) if q.enabled]

        def hook(_m, args, out, name=name, ins=ins, outs=outs):
            for i in ins:
                seen[f"{name}.input_quantizers.{i}"].append(args[i].detach().clone())
            for i in outs:
                seen[f"{name}.output_quantizers.{i}"].append(out.detach().clone())
        hooks.append(modules[name].register_forward_hook(hook))
    with torch.no_grad():
        for x in batches:
            ref(x)
    for h in hooks:
        h.remove()
    return seen


def _calibrate(sim: QuantizationSimModel, batches: List[torch.Tensor]) -> None:
    def callback(model, _):
        for x in batches:
            model(x)
    sim.compute_encodings(callback, None)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).abs() / b.abs().clamp(min=1e-30)).max())


def test_tf_encodings_equal_the_definition(trained, digits):
    """Scheme tf: every activation encoding is the min/max of the float tensor that quantizer
    sees when only the weights are quantized (to 1e-6 relative: float32 division order)."""
    batches = _batches(digits)
    sim = QuantizationSimModel(trained, batches[0], quant_scheme="tf")
    _calibrate(sim, batches)
    seen = observed_in_float(trained, sim, batches)
    activations = {n: q for n, q in sim.named_quantizers()
                   if q.enabled and ".param_quantizers." not in n}
    assert set(seen) == set(activations) and len(seen) >= 4
    for name, q in activations.items():
        data = torch.cat([t.flatten() for t in seen[name]])
        ref = Encoding.from_range(data.min(), data.max(), q.bitwidth, q.symmetric, q.strict,
                                  q.unsigned_symmetric)
        assert _rel(q.encoding.scale, ref.scale) <= 1e-6, name
        assert torch.equal(q.encoding.offset, ref.offset), name


@pytest.mark.parametrize("scheme", ["tf_enhanced", "percentile"])
def test_searching_schemes_equal_the_definition(trained, digits, scheme):
    """tf_enhanced / percentile: the analyzer of the scheme fed the definition's float tensors
    gives the sim's range within one step of the reference grid (the search's resolution)."""
    batches = _batches(digits)
    sim = QuantizationSimModel(trained, batches[0], quant_scheme=scheme)
    _calibrate(sim, batches)
    seen = observed_in_float(trained, sim, batches)
    for name, q in sim.named_quantizers():
        if not q.enabled or ".param_quantizers." in name:
            continue
        analyzer = create_analyzer(scheme)
        for t in seen[name]:
            analyzer.observe(t)
        qmin, qmax = q.qmin_qmax
        lo, hi = analyzer.compute_range(qmax - qmin, q.symmetric and not q._unsigned)
        ref = Encoding.from_range(lo, hi, q.bitwidth, q.symmetric, q.strict,
                                  q.unsigned_symmetric)
        step = float(ref.scale)
        assert abs(float(q.get_min()) - float(ref.min)) <= step, name
        assert abs(float(q.get_max()) - float(ref.max)) <= step, name


def test_activations_pass_float_values_while_calibrating(trained, digits):
    """The callback sees the float model with quantized weights: no activation noise."""
    batches = _batches(digits)
    sim = QuantizationSimModel(trained, batches[0], quant_scheme="tf")
    ref = copy.deepcopy(trained).eval()
    outputs = []

    def callback(model, _):
        outputs.append(model(batches[0]))
    sim.compute_encodings(callback, None)
    with torch.no_grad():
        for name, module in ref.named_modules():
            qmodule = dict(sim.named_qmodules()).get(name)
            if qmodule is None:
                continue
            for pname, q in qmodule.param_quantizers.items():
                if q.enabled:
                    getattr(module, pname).copy_(q.encoding.fake_quantize(getattr(module, pname)))
        assert torch.equal(outputs[0], ref(batches[0]))


def test_calibration_state_equals_compute_encodings(trained, digits):
    """set_fake_quantize(CALIBRATION) -> forwards -> VALIDATION takes the same path: the same
    encodings, bit for bit, and the same float-valued forwards."""
    batches = _batches(digits)
    a = QuantizationSimModel(trained, batches[0], quant_scheme="tf_enhanced")
    _calibrate(a, batches)
    b = QuantizationSimModel(trained, batches[0], quant_scheme="tf_enhanced")
    b.model.eval()
    set_fake_quantize(b, FakeQuantState.CALIBRATION)
    with torch.no_grad():
        for x in batches:
            b.model(x)
    set_fake_quantize(b, FakeQuantState.VALIDATION)
    qa, qb = dict(a.named_quantizers()), dict(b.named_quantizers())
    for name, q in qa.items():
        if q.enabled:
            assert torch.equal(q.get_scale(), qb[name].get_scale()), name
            assert torch.equal(q.get_offset(), qb[name].get_offset()), name


def test_calibration_runs_in_eval_mode_and_restores_modes(digits):
    """A sim left in train mode calibrates with BatchNorm's running statistics and without
    dropout (as aimet-torch does): the statistics do not move, the encodings do not depend on
    the RNG, and every module's mode is restored."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.5),
                          nn.Flatten(), nn.Linear(8 * 36, 10))
    randomize_batch_norms(model)
    x = digits[0][:64]
    sims = []
    for seed in (1, 2):
        sim = QuantizationSimModel(model, x, quant_scheme="tf")
        sim.model.train()
        stats = sim.model[1].running_mean.clone()
        torch.manual_seed(seed)
        sim.compute_encodings(lambda m, _: m(x), None)
        assert torch.equal(sim.model[1].running_mean, stats)
        assert all(m.training for m in sim.model.modules())
        sims.append(sim)
    for (name, qa), (_, qb) in zip(*(s.named_quantizers() for s in sims)):
        if qa.enabled:
            assert torch.equal(qa.get_scale(), qb.get_scale()), name


def test_failed_callback_leaves_every_encoding_as_it_was(trained, digits):
    """'the sim is unchanged' holds: parameter encodings recomputed on entry are put back."""
    batches = _batches(digits)
    sim = QuantizationSimModel(trained, batches[0], quant_scheme="tf")
    _calibrate(sim, batches)
    before = {n: (q.get_scale().clone(), q.get_offset().clone())
              for n, q in sim.named_quantizers() if q.enabled}
    with torch.no_grad():
        sim.model.conv1.weight.mul_(3)      # calibration would now change conv1's weight encoding

    def failing(model, _):
        model(batches[0])
        raise RuntimeError("data loader died")
    with pytest.raises(CalibrationError, match="data loader died.*unchanged"):
        sim.compute_encodings(failing, None)
    for name, q in sim.named_quantizers():
        if q.enabled:
            assert q.state == "quantize", name
            assert torch.equal(q.get_scale(), before[name][0]), name
            assert torch.equal(q.get_offset(), before[name][1]), name


# -- the int32 bias rule ------------------------------------------------------------------------
def _bias_codes(bias, input_scale, weight_scale):
    return (bias.double() / (input_scale.double() * weight_scale.double())).round()


def test_weight_scale_widens_where_int32_bias_codes_overflow():
    """A Linear with a dead output channel (zero weights) and a sizeable bias: its weight scale
    is the minimum, so the bias codes overflow int32; calibration widens that channel's scale
    just enough, and leaves the others alone."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 4))
    with torch.no_grad():
        model[0].weight[2].zero_()
        model[0].bias.copy_(torch.tensor([0.1, -0.2, 5.0, 0.3]))
    x = torch.randn(32, 16)
    sim = QuantizationSimModel(model, x, quant_scheme="tf", default_output_bw=16)
    sim.compute_encodings(lambda m, _: m(x), None)
    wq = sim.model[0].param_quantizers["weight"]
    in_scale = sim.model[0].input_quantizers[0].get_scale()
    codes = _bias_codes(model[0].bias, in_scale, wq.get_scale())
    assert codes.abs().max() <= INT32_BIAS_STEPS
    naive = Encoding.from_range(*torch.aminmax(model[0].weight.detach(), dim=1), 8, True,
                                axis=0)
    assert _bias_codes(model[0].bias, in_scale, naive.scale)[2].abs() > 2**31  # it would overflow
    assert torch.equal(wq.get_scale()[[0, 1, 3]], naive.scale[[0, 1, 3]])
    assert wq.get_scale()[2] > naive.scale[2]


@settings(max_examples=200, deadline=None)
@given(w=st.floats(1e-12, 1.0), b=st.floats(-1e3, 1e3), sx=st.floats(1e-6, 1.0),
       sy=st.floats(1e-6, 10.0), oy=st.integers(-65535, 0))
def test_int32_bias_weight_scale_properties(w, b, sx, sy, oy):
    """Never narrower; the bias and the accumulator bias fit int32; the requantization scale
    stays above its floor; unchanged when nothing overflows."""
    ws, bias = torch.tensor([w]), torch.tensor([b])
    sx_t, sy_t, oy_t = torch.tensor(sx), torch.tensor(sy), torch.tensor(float(oy))
    out = int32_bias_weight_scale(ws, bias, sx_t, sy_t, oy_t).double()
    assert out >= ws.double()
    bias_scale = sx * out
    # float32 rounding of the returned scale moves the codes by at most a relative 2^-23
    slack = 1 + 2 ** -22
    assert abs(b) / bias_scale <= INT32_BIAS_STEPS * slack
    acc = torch.round(b / bias_scale) + torch.round(oy * sy / bias_scale)
    assert acc.abs() <= INT32_BIAS_STEPS * slack + 1
    assert sx * out / sy >= MIN_REQUANT_SCALE / slack
    if (abs(b) / (sx * w) < 2**30 and sx * w / sy > 2 * MIN_REQUANT_SCALE
            and abs(oy * sy / (sx * w)) < 2**30):
        assert torch.equal(out.float(), ws)
