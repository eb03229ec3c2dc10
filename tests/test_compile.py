"""torch.compile(sim.model): one graph, no recompiles per call, the eager sim's results.

Two backends: ``aot_eager`` runs dynamo's graph (and AOTAutograd's backward) with the eager
kernels, so it must reproduce the eager sim bit for bit where the arithmetic is elementwise
(outputs, straight-through and weight gradients); the learnable-range gradients are sums, which
the graph adds in another order. ``inductor`` (the default backend users get) also fuses and
reorders the float ops around the quantizers (BatchNorm decomposed, the conv bias added in
another kernel), so a pre-quantization value can land one float32 ulp on the other side of a
rounding boundary: an output may then move by one step of its quantizer.
"""
from __future__ import annotations

import copy
import threading
import warnings

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

from quantsim.sim import QuantizationSimModel
from quantsim.wrappers import QuantizationMixin

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore::UserWarning")]

BATCH = 32
#: float32 unit roundoff
U32 = 2.0 ** -24


def _sim(model: nn.Module, digits, scheme: str) -> QuantizationSimModel:
    x_train = digits[0]
    sim = QuantizationSimModel(copy.deepcopy(model), x_train[:BATCH], quant_scheme=scheme,
                               default_output_bw=8, default_param_bw=8)
    sim.compute_encodings(lambda m, _: m(x_train[:256]), None)
    return sim


@pytest.fixture(scope="module")
def sims(trained_digits_cnn, digits):
    """Calibrated W8A8 sims of the digits CNN: fixed ranges (tf) and range learning."""
    return {scheme: _sim(trained_digits_cnn, digits, scheme)
            for scheme in ("tf", "range_learning_tf")}


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _output_step(sim: QuantizationSimModel) -> float:
    return float(sim.model.fc.output_quantizers[0].get_scale())


def _step(model: nn.Module, compiled, x, y):
    """One forward + backward of ``compiled`` (the model or its compiled form): the output
    and every gradient of ``model``'s parameters (quantizer ranges included)."""
    for p in model.parameters():
        p.grad = None
    out = compiled(x)
    nn.functional.cross_entropy(out, y).backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                          if p.grad is not None}


@pytest.mark.parametrize("scheme", ["tf", "range_learning_tf"])
def test_aot_eager_graph_is_the_eager_sim_bit_for_bit(sims, digits, scheme):
    """One graph per mode: no context variable, cache, host read or in-place shortcut breaks
    it (a graph break would show as a second compiled frame), and the second and third calls
    reuse it (a recompile would raise). Eval outputs, training outputs and weight gradients
    equal the eager sim's exactly; the range gradients (sums over the batch) agree to float32
    summation-order error."""
    sim = sims[scheme]
    x, y = digits[0][:BATCH], digits[1][:BATCH]
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(sim.model, backend=counter)
    sim.model.eval()
    with torch.no_grad():
        expected = sim.model(x)
        assert torch.equal(compiled(x), expected)
        with torch._dynamo.config.patch(error_on_recompile=True):
            assert torch.equal(compiled(x), expected) and torch.equal(compiled(x), expected)
    assert counter.frame_count == 1
    sim.model.train()
    try:
        out, grads = _step(sim.model, sim.model, x, y)
        with torch._dynamo.config.patch(error_on_recompile=False):
            c_out, c_grads = _step(sim.model, compiled, x, y)  # train mode: one new graph
        with torch._dynamo.config.patch(error_on_recompile=True):
            for _ in range(2):
                c_out, c_grads = _step(sim.model, compiled, x, y)
    finally:
        sim.model.eval()
    assert counter.frame_count == 2
    assert torch.equal(c_out, out)
    assert c_grads.keys() == grads.keys()
    for name, grad in grads.items():
        if name.endswith((".min", ".max")):
            # a sum of n = batch x features terms: |error| <= n u sum|terms|, and here the
            # terms share one sign within a few ulps of the sum, so n u |sum| bounds it
            n = x.shape[0] * 16 * 8 * 8
            torch.testing.assert_close(c_grads[name], grad, rtol=n * U32,
                                       atol=n * U32 * float(grad.abs().max()), msg=name)
        else:
            assert torch.equal(c_grads[name], grad), name


@pytest.mark.slow
def test_inductor_eval_matches_eager_and_never_recompiles(sims, digits):
    """The default backend: the outputs lie on the output quantizer's grid, within one step
    of the eager sim's (see the module docstring); calls 2 and 3 do not recompile."""
    sim = sims["tf"]
    x = digits[2][:64]
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(sim.model, backend=counter)
    step = _output_step(sim)
    with torch.no_grad():
        expected = sim.model(x)
        outs = [compiled(x)]
        with torch._dynamo.config.patch(error_on_recompile=True):
            outs += [compiled(x), compiled(x)]
    assert counter.frame_count == 1
    for out in outs:
        assert float((out - expected).abs().max()) <= step * (1 + 1e-6)
        assert torch.equal(out, outs[0])


@pytest.mark.slow
def test_inductor_range_learning_trains_like_eager(sims, digits):
    """Range learning through inductor: forward within one output step, backward reaches every
    parameter and range, an SGD step changes the loss as the eager step does, and the second
    and third steps reuse the compiled graphs."""
    sim = copy.deepcopy(sims["range_learning_tf"].model)  # the steps below train it
    x, y = digits[0][:BATCH], digits[1][:BATCH]
    compiled = torch.compile(sim)
    sim.train()
    out, grads = _step(sim, sim, x, y)
    c_out, c_grads = _step(sim, compiled, x, y)
    with torch._dynamo.config.patch(error_on_recompile=True):
        _step(sim, compiled, x, y)
        c_out2, c_grads2 = _step(sim, compiled, x, y)
    assert torch.equal(c_out, c_out2)
    step = float(sim.fc.output_quantizers[0].get_scale())
    assert float((c_out - out).abs().max()) <= step * (1 + 1e-6)
    assert c_grads.keys() == grads.keys() and any(n.endswith(".min") for n in grads)
    for name, grad in grads.items():
        if name == "conv1.bias":  # before a training-mode BatchNorm: 0 up to rounding noise
            continue
        # inductor's float ops may move a pre-quantization value across a clip boundary,
        # which switches that element's straight-through gradient: compare in aggregate
        cos = nn.functional.cosine_similarity(c_grads[name].flatten(), grad.flatten(), dim=0)
        assert torch.isfinite(c_grads[name]).all() and (grad.abs().max() == 0 or cos > 0.99), name


def test_threads_sharing_a_compiled_sim_keep_the_float_weights(sims, digits):
    """Two threads run the compiled sim and one the eager sim at once: every output is the
    single-thread result and the float parameters stay in ``_parameters`` (issue 15 item 8)."""
    sim = sims["tf"]
    x = digits[2][:BATCH]
    compiled = torch.compile(sim.model, backend="aot_eager")
    floats = {n: p for n, p in sim.model.named_parameters()}
    with torch.no_grad():
        expected = sim.model(x)
        compiled(x)
    errors = []

    def run(fn):
        try:
            with torch.no_grad():
                for _ in range(30):
                    if not torch.equal(fn(x), expected):
                        errors.append("output differs")
        except Exception as exc:  # reported below
            errors.append(repr(exc))

    threads = [threading.Thread(target=run, args=(f,))
               for f in (compiled, compiled, sim.model)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors[:3]
    assert all(p is floats[n] and type(p) is nn.Parameter
               for n, p in sim.model.named_parameters())
    assert all(m.__dict__.get("_traced_params") is None
               for m in sim.model.modules() if isinstance(m, QuantizationMixin))


def test_uncalibrated_quantizer_is_refused_under_compile(digits):
    """The encoding check survives compilation: a sim used before compute_encodings raises
    the eager sim's CalibrationError naming the quantizer."""
    from quantsim.errors import CalibrationError
    sim = QuantizationSimModel(nn.Sequential(nn.Linear(64, 10)).eval(), torch.randn(2, 64),
                               default_output_bw=8, default_param_bw=8)
    compiled = torch.compile(sim.model, backend="aot_eager")
    with pytest.raises(CalibrationError, match="has no encoding"), torch.no_grad():
        compiled(torch.randn(2, 64))


def test_new_encodings_reach_the_compiled_model(sims, digits):
    """The graph reads the encodings from the quantizers' buffers when it runs: after an
    encoding changes (here: one quantizer re-encoded to a narrower range) the compiled model
    computes the eager sim's new outputs, without recompiling."""
    from quantsim.encoding import Encoding
    sim = copy.deepcopy(sims["tf"])
    x = digits[2][:BATCH]
    compiled = torch.compile(sim.model, backend="aot_eager")
    quantizer = sim.model.relu1.output_quantizers[0]
    with torch.no_grad():
        before = compiled(x)
        quantizer.set_encoding(Encoding.from_range(torch.tensor(0.0), quantizer.get_max() / 2,
                                                   quantizer.bitwidth))
        with torch._dynamo.config.patch(error_on_recompile=True):
            after = compiled(x)
        assert torch.equal(after, sim.model(x)) and not torch.equal(after, before)
