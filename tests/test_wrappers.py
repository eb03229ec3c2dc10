"""quantsim.wrappers: the quantized classes and their float copies; a sim's model through the
ordinary torch round trips (deepcopy, pickling into a fresh process, state_dict, TorchScript
tracing, torch.compile); the cache of fake-quantized parameters and its size limit."""
from __future__ import annotations

import copy
import io
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from conftest import ROOT
from models import DigitsCNN, randomize_batch_norms
from quantsim import QuantizationSettingError
from quantsim.encoding import Encoding
from quantsim.nn.attention import QuantizableMultiheadAttention
from quantsim.nn.fused import ConvBn
from quantsim.prepare import fuse_all_conv_bn
from quantsim.quantizer import Quantizer
from quantsim.sim import QuantizationSimModel
from quantsim.wrappers import (QuantizationMixin, clear_param_cache, original_module,
                               param_cache_limit, quantize_module, quantizer_items,
                               set_param_cache_limit, unwrap_class)

pytestmark = pytest.mark.usefixtures("one_thread")


def _calibrated(model: nn.Module, x: torch.Tensor, data: torch.Tensor) -> QuantizationSimModel:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # functional ops and attention internals
        sim = QuantizationSimModel(model, x, quant_scheme="tf")
    sim.compute_encodings(lambda m, _: m(data), None)
    sim.model.eval()
    return sim


def digits_cnn() -> nn.Module:
    """A model class of the user's (tests/models.py), loaded from its module by pickle."""
    torch.manual_seed(0)
    return randomize_batch_norms(DigitsCNN()).eval()


def fused_attention_net() -> nn.Module:
    """Fused conv-BN-ReLU (quantsim.nn.ConvBn) and a transformer layer whose attention the
    sim replaces by QuantizableMultiheadAttention: torch and quantsim classes only."""
    torch.manual_seed(0)
    model = randomize_batch_norms(nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(2),
        nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True),
        nn.Flatten(), nn.Linear(128, 5))).eval()
    fuse_all_conv_bn(model, dummy_input=torch.zeros(1, 3, 4, 4))
    return model


MODELS = {"digits_cnn": (digits_cnn, (1, 8, 8)),
          "fused_attention": (fused_attention_net, (3, 4, 4))}


@pytest.fixture(scope="module", params=sorted(MODELS))
def sim_case(request):
    """(name, calibrated sim, a batch the sim was not calibrated on)."""
    make, shape = MODELS[request.param]
    g = torch.Generator().manual_seed(1)
    data, x = torch.randn(64, *shape, generator=g), torch.randn(16, *shape, generator=g)
    return request.param, _calibrated(make(), x[:2], data), x


@pytest.fixture
def default_cache_limit():
    """Tests that change the process-wide cache limit put the default back."""
    saved = param_cache_limit()
    yield
    set_param_cache_limit(saved)


# -- the quantized class --------------------------------------------------------------------------
def test_quantize_module_gives_the_instance_its_quantized_class():
    """The same object, now of Quantized<Cls>: a subclass of its float class (isinstance,
    parameter names and state_dict keys unchanged) with empty quantizer containers."""
    linear = nn.Linear(4, 3)
    weight, keys = linear.weight, list(linear.state_dict())
    assert quantize_module(linear) is linear
    assert type(linear).__name__ == "QuantizedLinear"
    assert type(linear).__module__ == "quantsim.wrappers"
    assert isinstance(linear, nn.Linear) and isinstance(linear, QuantizationMixin)
    assert linear.weight is weight and list(linear.state_dict()) == keys
    assert (len(linear.input_quantizers), len(linear.output_quantizers),
            len(linear.param_quantizers)) == (0, 0, 0)


def test_one_quantized_class_per_float_class_and_no_double_wrapping():
    a, b = quantize_module(nn.ReLU()), quantize_module(nn.ReLU())
    assert type(a) is type(b)
    a.output_quantizers.append(nn.Identity())
    assert quantize_module(a) is a and len(a.output_quantizers) == 1  # not reset
    assert type(a) is not type(quantize_module(nn.ReLU6()))


def test_original_module_is_a_float_copy_sharing_the_tensors():
    """Float class, same parameter and buffer tensors, none of the wrapper's state, and its
    own dicts: replacing a parameter of the copy leaves the quantized module alone."""
    bn = nn.BatchNorm1d(4)
    quantize_module(bn)
    bn.output_quantizers.append(Quantizer(8))
    clone = original_module(bn)
    assert type(clone) is nn.BatchNorm1d and not isinstance(clone, QuantizationMixin)
    assert clone.weight is bn.weight and clone.running_mean is bn.running_mean
    assert list(clone.state_dict()) == list(nn.BatchNorm1d(4).state_dict())
    assert not {"_qparam_cache", "_plan"} & set(vars(clone))
    clone.weight = nn.Parameter(torch.zeros(4))
    assert bn.weight is not clone.weight and "output_quantizers" in bn._modules
    plain = nn.ReLU()
    assert original_module(plain) is plain


def test_quantizer_items_and_unwrap_class():
    linear = quantize_module(nn.Linear(4, 3))
    a, b, c = nn.Identity(), nn.Identity(), nn.Identity()
    linear.input_quantizers.append(a)
    linear.output_quantizers.append(b)
    linear.param_quantizers["weight"] = c
    assert list(quantizer_items(linear)) == [
        ("input_quantizers.0", a), ("output_quantizers.0", b), ("param_quantizers.weight", c)]
    assert list(quantizer_items(nn.Linear(4, 3))) == []
    assert unwrap_class(linear) is nn.Linear and unwrap_class(nn.Linear(4, 3)) is None


# -- copies ---------------------------------------------------------------------------------------
def test_deepcopy_computes_the_same_and_shares_nothing(sim_case):
    """A deep copy of sim.model gives the same outputs, has its own parameters and
    quantizers, and starts without cached quantized weights (they are derived data)."""
    _, sim, x = sim_case
    with torch.no_grad():
        expected = sim.model(x)  # fills the originals' caches
        dup = copy.deepcopy(sim.model)
        assert all(not m._qparam_cache for m in dup.modules() if isinstance(m, QuantizationMixin))
        assert torch.equal(dup(x), expected)
    originals = dict(sim.model.named_parameters())
    assert all(p is not originals[n] for n, p in dup.named_parameters())
    name, q = next((n, q) for n, q in sim.named_quantizers() if q.enabled and q.axis is None)
    dup_q = dup.get_submodule(name)
    dup_q.set_encoding(Encoding.from_range(torch.tensor(-0.25), torch.tensor(0.25), q.bitwidth))
    assert not torch.equal(q.get_scale(), dup_q.get_scale())


def test_pickled_model_loads_in_a_process_that_never_built_a_sim(sim_case, tmp_path):
    """torch.save(sim.model) + torch.load(weights_only=False) in a fresh interpreter: the
    quantized classes are rebuilt from their float classes (nothing generated exists there
    before loading), and the loaded model computes exactly what the sim computes."""
    name, sim, x = sim_case
    with torch.no_grad():
        expected = sim.model(x)
    path = tmp_path / "model.pt"
    torch.save(sim.model, path)
    torch.save({"x": x, "expected": expected,
                "types": [type(m).__name__ for m in sim.model.modules()]}, tmp_path / "io.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        torch.set_num_threads({torch.get_num_threads()})
        from quantsim import wrappers
        assert not wrappers._QUANTIZED_CLASSES, "a quantized class exists before loading"
        model = torch.load({str(path)!r}, weights_only=False)
        ref = torch.load({str(tmp_path / 'io.pt')!r})
        assert [type(m).__name__ for m in model.modules()] == ref["types"]
        assert any(isinstance(m, wrappers.QuantizationMixin) for m in model.modules())
        with torch.no_grad():
            assert torch.equal(model(ref["x"]), ref["expected"]), "outputs differ"
        """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), str(ROOT)]))
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=300)
    if name == "fused_attention":
        assert isinstance(sim.model[0], ConvBn)
        assert isinstance(sim.model[4].self_attn, QuantizableMultiheadAttention)


def test_pickle_holds_no_cached_quantized_weights():
    """The cache is derived data: a pickled sim.model after an eval forward is the float
    model's size plus the quantizers, not another copy of every weight."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256)).eval()
    x = torch.randn(8, 256)
    sim = _calibrated(copy.deepcopy(model), x, x)
    with torch.no_grad():
        sim.model(x)
    assert all(m._qparam_cache for m in (sim.model[0], sim.model[2]))

    def size(m: nn.Module) -> int:
        buf = io.BytesIO()
        torch.save(m, buf)
        return buf.tell()

    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    assert size(sim.model) - size(model) < weights / 4


def test_state_dict_loads_into_a_fresh_sim(sim_case):
    """torch.save(sim.model.state_dict()) restores weights and encodings into a fresh,
    uncalibrated sim built around a differently initialized model of the same kind."""
    name, sim, x = sim_case
    buf = io.BytesIO()
    torch.save(sim.model.state_dict(), buf)
    buf.seek(0)
    torch.manual_seed(123)  # other weights than the sim's
    fresh_model = MODELS[name][0]()
    for p in fresh_model.parameters():
        nn.init.normal_(p)
    fresh = _uncalibrated(fresh_model, x[:2])
    fresh.model.load_state_dict(torch.load(buf))
    fresh.model.eval()
    with torch.no_grad():
        assert torch.equal(fresh.model(x), sim.model(x))


def _uncalibrated(model: nn.Module, x: torch.Tensor) -> QuantizationSimModel:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return QuantizationSimModel(model, x, quant_scheme="tf")


# -- TorchScript and torch.compile ----------------------------------------------------------------
def test_jit_trace_under_no_grad_records_the_sim(sim_case):
    """torch.jit.trace under no_grad, straight after calibration (cold caches): torch's own
    re-trace check passes (no cached tensor enters the graph as a constant), the traced
    module computes what the sim computes on other inputs, and survives jit.save / load."""
    name, sim, x = sim_case
    fresh = copy.deepcopy(sim.model)  # no cached values anywhere
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(fresh, x[:2])  # check_trace=True re-traces with warm caches
        buf = io.BytesIO()
        torch.jit.save(traced, buf)
        buf.seek(0)
        loaded = torch.jit.load(buf)
        expected = sim.model(x)
        assert torch.equal(traced(x), expected)
        assert torch.equal(loaded(x), expected)


@pytest.mark.slow
def test_torch_compile_matches_eager_within_one_step():
    """torch.compile(sim.model) computes the simulated model: every output within one step
    of the output quantizer of eager (inductor may fuse the float arithmetic before the
    last quantizer differently, moving a value across a rounding boundary)."""
    torch._dynamo.reset()
    sim = _calibrated(digits_cnn(), torch.randn(2, 1, 8, 8), torch.randn(64, 1, 8, 8))
    x = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        eager = sim.model(x)
        compiled = torch.compile(sim.model)(x)
    step = float(sim.model.fc.output_quantizers[0].get_scale())
    assert (compiled - eager).abs().max() <= step * (1 + 1e-6)
    assert (compiled != eager).float().mean() < 0.01  # boundary cases only


# -- the cache of fake-quantized parameters -------------------------------------------------------
def _cached(module: nn.Module) -> set:
    return set(module._qparam_cache)


def test_parameters_above_the_cache_limit_are_fake_quantized_per_call(default_cache_limit):
    """Only parameters of at most the limit's elements keep their quantized copy; the
    outputs are bit-identical either way (the same arithmetic runs)."""
    torch.manual_seed(0)
    x = torch.randn(8, 64)
    sim = _calibrated(nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4)), x, x)
    big, small = sim.model[0], sim.model[2]  # 2048 and 128 weight elements
    assert param_cache_limit() == 1 << 20  # the documented default
    with torch.no_grad():
        unlimited = sim.model(x)
        assert _cached(big) == _cached(small) == {"weight"}
        set_param_cache_limit(1000)
        limited = sim.model(x)
        assert _cached(big) == set() and _cached(small) == {"weight"}  # dropped on next use
        assert torch.equal(limited, unlimited)
        set_param_cache_limit(0)
        assert torch.equal(sim.model(x), unlimited) and _cached(small) == set()
        set_param_cache_limit(None)
        sim.model(x)
        assert _cached(big) == _cached(small) == {"weight"}
        clear_param_cache(sim.model)
        assert _cached(big) == _cached(small) == set()


def test_embedding_tables_are_cached_whatever_their_size(default_cache_limit):
    """A lookup reads a few rows: the table (1600 elements) keeps its quantized copy above the
    limit, a Linear weight (256) does not."""
    torch.manual_seed(0)
    ids = torch.randint(0, 100, (4, 6))
    sim = _calibrated(nn.Sequential(nn.Embedding(100, 16), nn.Linear(16, 16)), ids, ids)
    set_param_cache_limit(100)
    with torch.no_grad():
        sim.model(ids)
    assert _cached(sim.model[0]) == {"weight"} and _cached(sim.model[1]) == set()


@pytest.mark.parametrize("bad", [-1, 1.5, True, "1000"])
def test_bad_cache_limit_is_refused(bad, default_cache_limit):
    with pytest.raises(QuantizationSettingError, match="max_elements"):
        set_param_cache_limit(bad)
    assert param_cache_limit() == 1 << 20
    with pytest.raises(QuantizationSettingError, match="codes must be True or False"):
        set_param_cache_limit(codes=1)


# -- above the limits: integer codes --------------------------------------------------------------
def _codes(module: nn.Module) -> dict:
    return {name: entry[1].dtype for name, entry in module._qcodes_cache.items()}


def _linear_with_weight_quantizer(granularity: str, bitwidth: int, symmetric: bool,
                                  seed: int) -> nn.Module:
    """A quantized Linear(64 -> 8) whose weight (with clipped values, zeros and exact grid
    points) has an encoding of ``granularity`` calibrated on a narrower range."""
    g = torch.Generator().manual_seed(seed)
    lin = quantize_module(nn.Linear(64, 8))
    with torch.no_grad():
        w = lin.weight
        w.copy_(torch.randn(8, 64, generator=g))
        w[0, :4] = torch.tensor([0.0, -1e-9, 1e-9, -0.0])
    lpbq = granularity == "lpbq"
    block = 16 if granularity in ("block", "lpbq") else None
    axis = None if granularity == "tensor" else 0
    if block is not None:
        lo, hi = torch.aminmax(w.detach().reshape(8, 4, 16), dim=2)
    elif axis == 0:
        lo, hi = torch.aminmax(w.detach(), dim=1)
    else:
        lo, hi = torch.aminmax(w.detach())
    bw = 4 if lpbq else bitwidth
    enc = Encoding.from_range(lo * 0.8, hi * 0.8, bw, symmetric or lpbq, axis=axis,
                              block_size=block, decompressed_bw=8 if lpbq else None)
    q = Quantizer(bw, symmetric or lpbq, shape=tuple(enc.scale.shape), axis=axis,
                  block_size=block, decompressed_bw=8 if lpbq else None)
    q.set_encoding(enc)
    lin.param_quantizers["weight"] = q
    with torch.no_grad():  # exact grid points (ties of the rounding included) in row 1
        w[1] = enc.fake_quantize(w.detach())[1] * 1.5
    return lin


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(["tensor", "channel", "block", "lpbq"]), st.sampled_from([4, 8, 16]),
       st.booleans(), st.integers(0, 2**31 - 1))
def test_weights_above_the_limits_are_kept_as_codes_with_the_fake_quantized_values(
        granularity, bitwidth, symmetric, seed):
    """Above the limits a weight keeps its integer codes in the narrowest integer dtype and
    each eval call dequantizes them: the same float32 values as fake-quantizing the weight
    (per tensor, channel, block and LPBQ; 4-, 8- and 16-bit grids, signed and unsigned), the
    bits too once the sign of zero is set aside (``x + 0.0`` turns -0.0 into 0.0). Grids
    that fit no 16-bit integer (unsigned 16-bit) keep no codes and give the same values."""
    lin = _linear_with_weight_quantizer(granularity, bitwidth, symmetric, seed)
    q, w = lin.param_quantizers["weight"], lin.weight
    try:
        set_param_cache_limit(0)
        with torch.no_grad():
            expected = q(w)
            got = lin._quantized_params()["weight"]
            again = lin._quantized_params()["weight"]  # from the kept codes
    finally:
        set_param_cache_limit()
    qmin, qmax = q.qmin_qmax  # an unsigned 16-bit grid fits no 16-bit integer: no codes
    dtype = next((t for t in (torch.int8, torch.uint8, torch.int16)
                  if torch.iinfo(t).min <= qmin and qmax <= torch.iinfo(t).max), None)
    assert _codes(lin) == ({} if dtype is None else {"weight": dtype})
    assert lin._qparam_cache == {}
    for value in (got, again):
        assert value.dtype == torch.float32 and torch.equal(value, expected)
        assert torch.equal((value + 0.0).view(torch.int32), (expected + 0.0).view(torch.int32))


def test_codes_follow_the_parameter_the_encoding_and_the_limits(default_cache_limit):
    """Kept codes are rebuilt when the weight changes in place or is replaced and when the
    encoding changes; raising the limits moves the weight to the float copy, ``codes=False``
    keeps nothing, and copies of the module start without codes."""
    lin = _linear_with_weight_quantizer("block", 4, True, 0)
    q = lin.param_quantizers["weight"]
    x = torch.randn(3, 64)
    set_param_cache_limit(0)

    def check() -> None:
        with torch.no_grad():
            expected = nn.functional.linear(x, q(lin.weight), lin.bias)
            assert torch.equal(lin(x), expected)

    check()
    first = lin._qcodes_cache["weight"][1]
    with torch.no_grad():
        lin.weight.mul_(0.5)
    check()
    assert lin._qcodes_cache["weight"][1] is not first
    lin.weight = nn.Parameter(torch.randn(8, 64), requires_grad=False)
    check()
    enc = q.encoding
    q.set_encoding(Encoding.from_range(enc.min * 2, enc.max * 2, 4, True, axis=0,
                                       block_size=16))
    check()
    assert copy.deepcopy(lin)._qcodes_cache == {} and _codes(lin) == {"weight": torch.int8}
    clear_param_cache(lin)
    assert _codes(lin) == {}
    set_param_cache_limit(codes=False)
    check()
    assert _codes(lin) == {} and lin._qparam_cache != {}  # under the default limits: float copy
    set_param_cache_limit(0, codes=False)
    check()
    assert _codes(lin) == {} and lin._qparam_cache == {}
    set_param_cache_limit(0)
    check()
    assert _codes(lin) == {"weight": torch.int8}
    set_param_cache_limit()
    check()
    assert _codes(lin) == {"weight": torch.int8} and set(lin._qparam_cache) == {"weight"}


class _DequantizeSizes:
    """Records the element count of every tensor ``quantsim.wrappers`` dequantizes."""

    def __init__(self):
        from quantsim import wrappers
        self.sizes, self._real = [], wrappers.dequantize

    def __call__(self, q, *args, **kwargs):
        self.sizes.append(q.numel())
        return self._real(q, *args, **kwargs)


@settings(max_examples=30, deadline=None)
@given(st.sampled_from(["tensor", "channel", "block", "lpbq"]), st.sampled_from([4, 8, 16]),
       st.booleans(), st.integers(0, 2**31 - 1))
def test_large_linear_weights_are_encoded_and_multiplied_by_row_slices(
        granularity, bitwidth, symmetric, seed):
    """Above the cache limits and the row-slice size, a Linear's codes are built and its
    product computed a slice of output features at a time (no whole dequantized weight): the
    codes equal the whole weight's, and each output element is the dot product of the input
    with the fake-quantized weight's row, within float32 summation error (BLAS may order the
    sum differently for a slice; measured equal here)."""
    from unittest import mock

    from quantsim import wrappers
    from quantsim.encoding import quantize

    lin = _linear_with_weight_quantizer(granularity, bitwidth, symmetric, seed)
    q, w = lin.param_quantizers["weight"], lin.weight
    if q.qmin_qmax[1] > 32767:  # no 16-bit integer holds the grid: the per-call path
        return
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(seed))
    recorder = _DequantizeSizes()
    try:
        set_param_cache_limit(0)
        with mock.patch.object(wrappers, "_ROW_SLICE_ELEMENTS", 130), \
                mock.patch.object(wrappers, "dequantize", recorder), torch.no_grad():
            got = lin(x)
            again = lin(x)
    finally:
        set_param_cache_limit()
    with torch.no_grad():
        wq = q(w)
        expected = nn.functional.linear(x, wq, lin.bias)
        bound = 64 * torch.finfo(torch.float32).eps * (x.abs() @ wq.abs().T + lin.bias.abs())
        codes = quantize(w, q.scale, q.offset, *q.qmin_qmax, q.axis, "nearest", q.block_size)
    assert recorder.sizes and max(recorder.sizes) <= 2 * 64  # two rows of 64 per slice
    assert torch.equal(lin._qcodes_cache["weight"][1].to(torch.float32), codes)
    for out in (got, again):
        assert out.shape == expected.shape and out.dtype == torch.float32
        assert bool(((out - expected).abs() <= bound).all())


def test_row_slices_leave_training_traces_and_small_weights_to_the_regular_path(
        default_cache_limit):
    """Gradients (a trainable weight), a weight below the slice size and a cached weight take
    the regular forward: the same output, gradients reach the weight."""
    from unittest import mock

    from quantsim import wrappers

    lin = _linear_with_weight_quantizer("channel", 8, True, 5)
    x = torch.randn(4, 64)
    recorder = _DequantizeSizes()
    with mock.patch.object(wrappers, "_ROW_SLICE_ELEMENTS", 130), \
            mock.patch.object(wrappers, "dequantize", recorder):
        set_param_cache_limit(0)
        lin(x).sum().backward()  # autograd: fake-quantized per call, no codes
        assert lin.weight.grad is not None and recorder.sizes == [] and _codes(lin) == {}
        set_param_cache_limit()
        with torch.no_grad():
            lin(x)  # cached: no codes
        assert recorder.sizes == [] and set(lin._qparam_cache) == {"weight"}
    set_param_cache_limit(0)
    with torch.no_grad():
        lin(x)  # 512 elements, under the default slice size: one dequantized weight
    assert _codes(lin) == {"weight": torch.int8}


@pytest.mark.parametrize("symmetric", [True, False])
def test_uncached_per_channel_embeddings_dequantize_only_the_rows_looked_up(
        default_cache_limit, symmetric):
    """An uncached table with a per-row encoding looks its codes up and dequantizes those rows
    with their rows' encodings: the bits of fake-quantizing the whole table then looking up,
    index errors as the float module's."""
    from unittest import mock

    from quantsim import wrappers

    torch.manual_seed(0)
    emb = quantize_module(nn.Embedding(50, 16, padding_idx=0))
    lo, hi = torch.aminmax(emb.weight.detach(), dim=1)
    enc = Encoding.from_range(lo * 0.7, hi * 0.7, 8, symmetric, axis=0)
    q = Quantizer(8, symmetric, shape=(50,), axis=0)
    q.set_encoding(enc)
    emb.param_quantizers["weight"] = q
    emb._model_size = 1  # above the model limit below: the table is not cached
    ids = torch.randint(0, 50, (3, 7))
    recorder = _DequantizeSizes()
    try:
        set_param_cache_limit(0, model_max_elements=0)
        with mock.patch.object(wrappers, "dequantize", recorder), torch.no_grad():
            got = emb(ids)
            with pytest.raises(IndexError):
                emb(torch.tensor([50]))
    finally:
        set_param_cache_limit()
    with torch.no_grad():
        expected = nn.functional.embedding(ids, q(emb.weight)) + 0.0
    assert recorder.sizes == [ids.numel() * 16] and emb._qparam_cache == {}
    assert torch.equal((got + 0.0).view(torch.int32), expected.view(torch.int32))


def test_weights_that_cannot_be_kept_as_codes_are_fake_quantized_per_call(default_cache_limit):
    """A NaN in the weight, a grid wider than 16 bits and a learnable range keep no codes
    and give the fake-quantized weight, as before."""
    lin = _linear_with_weight_quantizer("channel", 8, False, 1)
    q = lin.param_quantizers["weight"]
    set_param_cache_limit(0)
    with torch.no_grad():
        lin.weight[2, 5] = float("nan")
        torch.testing.assert_close(lin._quantized_params()["weight"], q(lin.weight), rtol=0,
                                   atol=0, equal_nan=True)
    assert _codes(lin) == {}
    learned = _linear_with_weight_quantizer("tensor", 8, True, 4)
    learned.param_quantizers["weight"].set_learnable()
    with torch.no_grad():
        assert torch.equal(learned._quantized_params()["weight"],
                           learned.param_quantizers["weight"](learned.weight))
    assert _codes(learned) == {}
    wide = _linear_with_weight_quantizer("tensor", 20, True, 2)
    with torch.no_grad():
        assert torch.equal(wide._quantized_params()["weight"], wide.param_quantizers["weight"](
            wide.weight))
    assert _codes(wide) == {}


def test_threads_sharing_kept_codes_get_the_single_thread_result(default_cache_limit):
    """Codes are built and replaced whole: threads running the module while one of them
    changes the limits (dropping and rebuilding the codes) all get the same output."""
    import threading

    lin = _linear_with_weight_quantizer("lpbq", 4, True, 3)
    x = torch.randn(5, 64)
    set_param_cache_limit(0)
    with torch.no_grad():
        expected = lin(x)
    failures = []

    def run(toggle: bool) -> None:
        for i in range(200):
            if toggle:
                clear_param_cache(lin)
            with torch.no_grad():
                if not torch.equal(lin(x), expected):
                    failures.append(i)
                    return

    threads = [threading.Thread(target=run, args=(t,)) for t in (True, False, False)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
