"""The eval hot path of wrapped modules: in-place output quantization, cached encodings and
quantized parameters, and parameters observed once per calibration.

Each shortcut must give exactly what the plain path gives and must never touch a tensor that
something else can still see.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from conftest import DEVICES
from quantsim import FakeQuantState, kernels, set_fake_quantize, wrappers
from quantsim.encoding import Encoding
from quantsim.quantizer import Quantizer
from quantsim.sim import QuantizationSimModel


@pytest.fixture(autouse=True)
def _seeded():
    """Every test draws the same data whatever ran before it."""
    torch.manual_seed(1234)


class PassThrough(nn.Module):
    """A user module that returns its input object."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return x


class KeepsAView(nn.Module):
    """A user module whose output has a view stored elsewhere."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        y = torch.sin(3 * x)  # nonlinear: not on any grid the input was on
        self.first_row = y[:1]
        return y


class KeepsTheOutput(nn.Module):
    """A user module that keeps a reference to the very tensor it returns."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        self.last = torch.tanh(x)
        return self.last


class Chain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 8)
        self.identity = PassThrough()
        self.view = KeepsAView()
        self.keep = KeepsTheOutput()
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.relu(self.keep(self.view(self.identity(self.linear(x)))))


def _chain_sim(x: torch.Tensor) -> QuantizationSimModel:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the generic-wrapper warning for the user modules
        sim = QuantizationSimModel(Chain(), x, quant_scheme="tf")
    for _, q in sim.named_quantizers():
        q.enabled = True  # every output quantized, even after Identity
    sim.compute_encodings(lambda m, _: m(x), None)
    return sim.model.eval()


def _output_quantizer(module: nn.Module):
    return module.output_quantizers[0]


def test_outputs_that_something_else_holds_are_not_overwritten():
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    model = _chain_sim(x)
    with torch.no_grad():
        model(x)
        # the view another object keeps and the tensor another attribute keeps are the float
        # results, untouched by the output quantizers that quantized what was returned
        float_view = model.view.first_row.clone()
        float_kept = model.keep.last.clone()
        q_view, q_keep = _output_quantizer(model.view), _output_quantizer(model.keep)
        quantized_view_input = model.identity(model.linear(x))
        expected_view = torch.sin(3 * quantized_view_input)[:1]
        assert torch.equal(float_view, expected_view)
        assert not torch.equal(float_view, q_view(float_view))  # quantizing would change it
        assert torch.equal(float_kept, model.keep.last)
        assert not torch.equal(float_kept, q_keep(float_kept))


def test_a_module_returning_its_input_leaves_the_input_alone():
    x = torch.randn(4, 8)
    model = _chain_sim(x)
    module = model.identity
    module.input_quantizers[0].enabled = False
    y = torch.randn(4, 8)
    before = y.clone()
    with torch.no_grad():
        out = module(y)
    assert torch.equal(y, before)
    assert torch.equal(out, _output_quantizer(module)(before))


class Broadcasts(nn.Module):
    """Returns a fresh (not a view) tensor whose rows share memory (stride 0)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return torch.empty_strided(x.shape, (0, 1)).fill_(0.3)


def test_an_output_with_self_overlapping_memory_is_copied():
    x = torch.randn(4, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sim = QuantizationSimModel(nn.Sequential(nn.Linear(8, 8), Broadcasts()), x,
                                   quant_scheme="tf")
    for _, q in sim.named_quantizers():
        q.enabled = True
    sim.compute_encodings(lambda m, _: m(x), None)
    with torch.no_grad():
        out = sim.model.eval()(x)
    assert torch.equal(out, _output_quantizer(sim.model[1])(torch.full((4, 8), 0.3)))


def _count_in_place(monkeypatch) -> list:
    """Record the tensors the in-place kernel overwrites."""
    calls = []
    real = kernels.qdq_per_tensor_
    monkeypatch.setattr(kernels, "qdq_per_tensor_", lambda x, *a: calls.append(x) or real(x, *a))
    return calls


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_in_place_and_copying_paths_agree_bit_for_bit(monkeypatch, context, device):
    x = torch.randn(16, 8)
    model = _chain_sim(x).to(device)
    x = x.to(device)
    in_place = _count_in_place(monkeypatch)
    with context():
        fast = model(x)
    # linear and relu return fresh results; the user modules' results are held elsewhere
    assert len(in_place) == 2 and all(t.device.type == device for t in in_place)
    monkeypatch.setattr(wrappers.QuantizationMixin, "_may_overwrite", lambda self, t: False)
    with context():
        plain = model(x)
    assert len(in_place) == 2 and torch.equal(fast, plain)


def test_no_in_place_while_autograd_records(monkeypatch):
    x = torch.randn(4, 8)
    model = _chain_sim(x)
    in_place = _count_in_place(monkeypatch)
    model(x).sum().backward()
    assert in_place == [] and model.linear.weight.grad is not None


def test_quantizer_hooks_still_run_on_the_in_place_path():
    x = torch.randn(4, 8)
    model = _chain_sim(x)
    seen = []
    _output_quantizer(model.relu).register_forward_hook(lambda m, i, o: seen.append(o))
    with torch.no_grad():
        out = model(x)
    assert len(seen) == 1 and torch.equal(seen[0], out)


class Doubles(nn.Module):
    """A user module whose forward allocates its result."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return x * 2


def test_a_registered_user_type_is_quantized_in_place(monkeypatch):
    """register_fresh_output opts a user type into the in-place path (modules quantized after
    the registration); the result equals the copying path's."""
    x = torch.randn(4, 8)
    monkeypatch.setattr(wrappers, "_FRESH_OUTPUT_TYPES", set(wrappers._FRESH_OUTPUT_TYPES))
    wrappers.register_fresh_output(Doubles)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the generic-wrapper warning for the user module
        sim = QuantizationSimModel(nn.Sequential(Doubles()), x, quant_scheme="tf",
                                   config_file="default")
    sim.compute_encodings(lambda m, _: m(x), None)
    in_place = _count_in_place(monkeypatch)
    with torch.no_grad():
        fast = sim.model(x)
    assert len(in_place) == 1 and in_place[0] is fast
    monkeypatch.setattr(wrappers.QuantizationMixin, "_may_overwrite", lambda self, t: False)
    with torch.no_grad():
        assert torch.equal(sim.model(x), fast)


def test_a_forward_hook_that_keeps_the_output_sees_what_the_module_returned(monkeypatch):
    """A user hook keeping a module's output: that module's output is not overwritten in place,
    and what the hook kept is what the module returned, also after later modules ran."""
    x = torch.randn(4, 8)
    model = _chain_sim(x)
    kept = []
    model.linear.register_forward_hook(lambda m, i, o: kept.append(o))
    in_place = _count_in_place(monkeypatch)
    with torch.no_grad():
        model(x)
        returned = model.linear(x)
    assert len(in_place) == 1  # the relu of the whole forward; never the hooked linear
    assert torch.equal(kept[0], returned) and torch.equal(kept[1], returned)
    q = _output_quantizer(model.linear)
    assert torch.equal(returned, q(returned))  # on the grid


def test_an_in_place_activation_is_not_quantized_over_its_input():
    """ReLU(inplace=True) returns its input object: the quantizer must not overwrite a tensor
    the caller holds (torch's ReLU still rectifies it, as without quantsim)."""
    x = torch.randn(16, 8)
    sim = QuantizationSimModel(nn.Sequential(nn.ReLU(inplace=True)), x.clone(),
                               quant_scheme="tf", config_file="default")
    sim.compute_encodings(lambda m, _: m(x.clone()), None)
    sim.model[0].input_quantizers[0].enabled = False  # the ReLU gets the caller's tensor
    held = x.clone()
    with torch.no_grad():
        out = sim.model(held)
    assert torch.equal(held, torch.relu(x))                 # rectified, not quantized
    assert torch.equal(out, _output_quantizer(sim.model[0])(torch.relu(x)))


def test_two_threads_running_one_sim_keep_the_float_weights():
    """Parameter substitution mutates nothing shared: two threads running the same sim (with
    and without autograd) get the single-thread results and the module keeps its float
    parameters (the optimizer's, state_dict's and export's)."""
    import threading

    x = torch.randn(16, 8)
    model = _chain_sim(x)
    weight = model.linear._parameters["weight"]
    with torch.no_grad():
        expected = model(x)
    failures = []

    def run(grad: bool) -> None:
        for _ in range(200):
            with torch.set_grad_enabled(grad):
                y = model(x)
            if not torch.equal(y.detach(), expected):
                failures.append(grad)
                return

    threads = [threading.Thread(target=run, args=(g,)) for g in (False, True, False)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    assert model.linear._parameters["weight"] is weight
    assert model.linear.weight is weight


def test_no_reference_counting_or_private_tensor_calls_in_the_package():
    """The in-place rule rests on the module and public tensor properties, never on counts of
    references (which change with interpreters, frames and hooks)."""
    import pathlib

    import quantsim
    root = pathlib.Path(quantsim.__file__).parent
    for path in root.rglob("*.py"):
        text = path.read_text()
        for needle in ("getrefcount", "_use_count", "_storage_Use_Count",
                       "_debug_has_internal_overlap"):
            assert needle not in text, f"{path}: {needle}"


# -- caches ---------------------------------------------------------------------------------------
def test_output_cache_follows_encoding_changes_and_replaced_buffers():
    x = torch.randn(4, 8)
    model = _chain_sim(x)
    q = _output_quantizer(model.linear)
    with torch.no_grad():
        y = model.linear(x)
        q.set_encoding(Encoding.from_range(torch.tensor(-0.5), torch.tensor(0.5), 8))
        y_narrow = model.linear(x)
        assert float(y_narrow.abs().max()) <= 0.5 + float(q.get_scale()) < float(y.abs().max())
        coarse = torch.full_like(q.scale, 0.25)
        while coarse._version < q.scale._version:  # same version counter: only identity differs
            coarse.add_(0.0)
        q.scale = coarse  # a new tensor, not an in-place change
        y_coarse = model.linear(x)
        assert torch.equal(y_coarse, torch.round(y_coarse / 0.25) * 0.25)
        q.load_state_dict({**q.state_dict(), "scale": torch.tensor(0.125)})
        y_fine = model.linear(x)
        assert torch.equal(y_fine, torch.round(y_fine / 0.125) * 0.125)
        assert not torch.equal(y_fine, y_coarse)


def test_quantized_parameter_cache_follows_the_parameter():
    x = torch.randn(4, 8)
    lin = _chain_sim(x).linear

    def uncached():
        lin._qparam_cache.clear()
        return lin(x)

    with torch.no_grad():
        assert torch.equal(lin(x), lin(x))
        lin.weight.mul_(0.5)  # in place: the version counter moves
        assert torch.equal(lin(x), uncached())
        lin.weight = nn.Parameter(torch.randn(8, 8) * 0.01)  # a new object
        assert torch.equal(lin(x), uncached())
        lin.param_quantizers["weight"].set_encoding(  # a new weight encoding
            Encoding.from_range(-torch.full((8,), 0.01), torch.full((8,), 0.01), 8,
                                symmetric=True, axis=0))
        assert torch.equal(lin(x), uncached())


# -- calibration ----------------------------------------------------------------------------------
def _observe_counter(quantizer) -> list:
    calls = []
    real = quantizer.analyzer.observe
    quantizer.analyzer.observe = lambda t: calls.append(t.clone()) or real(t)
    return calls


@pytest.mark.parametrize("scheme", ["tf", "tf_enhanced", "percentile"])
def test_weights_are_encoded_once_per_calibration(scheme):
    """set_fake_quantize(CALIBRATION) encodes each weight once, on entry (quantsim.calibration):
    the calibration forwards fake-quantize it without observing it again, whatever their
    number, and the encoding is that of the weight alone."""
    batches = [torch.randn(4, 8) for _ in range(5)]
    torch.manual_seed(0)
    sim = QuantizationSimModel(nn.Sequential(nn.Linear(8, 8)), batches[0], quant_scheme=scheme)
    sim.model.eval()
    wq = sim.model[0].param_quantizers["weight"]
    calls = _observe_counter(wq)
    set_fake_quantize(sim, FakeQuantState.CALIBRATION)
    with torch.no_grad():
        for b in batches:
            sim.model(b)
    set_fake_quantize(sim, FakeQuantState.VALIDATION)
    assert len(calls) == 1 and torch.equal(calls[0], sim.model[0].weight)
    alone = Quantizer(8, symmetric=True, shape=(8,), axis=0, scheme=scheme)
    alone.state = "observe"
    alone(sim.model[0].weight.detach())
    alone.compute_encoding()
    assert torch.equal(wq.get_scale(), alone.get_scale())


def test_a_weight_that_changes_during_calibration_is_encoded_again():
    """Leaving CALIBRATION re-encodes a weight that changed since entry, and only then."""
    torch.manual_seed(0)
    sim = QuantizationSimModel(nn.Sequential(nn.Linear(8, 8)), torch.randn(2, 8), quant_scheme="tf")
    sim.model.eval()
    lin = sim.model[0]
    calls = _observe_counter(lin.param_quantizers["weight"])
    set_fake_quantize(sim, FakeQuantState.CALIBRATION)
    with torch.no_grad():
        sim.model(torch.randn(2, 8))
        lin.weight.mul_(3.0)
        sim.model(torch.randn(2, 8))
    set_fake_quantize(sim, FakeQuantState.VALIDATION)
    set_fake_quantize(sim, FakeQuantState.VALIDATION)   # nothing calibrating: nothing encoded
    assert len(calls) == 2
    assert torch.equal(calls[1], calls[0] * 3.0)
    assert torch.equal(lin.param_quantizers["weight"].get_max(),
                       Encoding.from_range(*torch.aminmax(lin.weight.detach(), dim=1), 8, True,
                                           axis=0).max)


def test_kernel_in_place_variant_matches_the_copying_one():
    x = torch.randn(1000) * 3
    scale = torch.tensor(0.02)
    args = (scale, -128.0, 127.0, (scale, torch.tensor(-128.0), torch.tensor(127.0)))
    expected = kernels.qdq_per_tensor(x, *args)
    y = x.clone()
    out = kernels.qdq_per_tensor_(y, *args)
    assert out is y and torch.equal(out, expected)
