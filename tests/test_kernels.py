"""Tests of quantsim.kernels: the eager and torch.compile backends of the fake-quant pass.

One test body runs on every backend (``TestBackend``) against an independent numpy reference;
the compiled backend is also compared with eager bit for bit. torch.compile costs seconds per
variant, so every compiled test uses the same four variants: per tensor (1-d view) and per
channel (3-d view), each for float32 and float16 inputs.
"""
from __future__ import annotations

import contextlib
import warnings

import numpy as np
import pytest
import torch

from conftest import requires_cuda
from quantsim import kernels
from quantsim.encoding import Encoding


SHAPE = (4, 3, 5, 6)  # per channel along axis 1 -> canonical (4, 3, 30)


@pytest.fixture
def use_backend():
    """Select a backend for one test and restore the previous one afterwards."""
    before = kernels.get_backend()
    yield kernels.set_backend
    kernels.set_backend(before)


@contextlib.contextmanager
def no_fallback_warning():
    """Fail if quantsim warns that it fell back from the compiled kernel to eager."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    ours = [str(w.message) for w in caught if "quantsim" in str(w.message)]
    assert not ours, ours


def _data(dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Random values spanning beyond the grids below, with exact ties (k + 0.5) * s mixed in."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=g) * 3
    ties = (torch.randint(-300, 300, SHAPE, generator=g) + 0.5) * 0.0234375  # exact in fp32
    x = torch.where(torch.rand(SHAPE, generator=g) < 0.3, ties, x)
    return x.to(dtype)


def _encodings():
    per_tensor = Encoding(8, torch.tensor(0.0234375), torch.tensor(-100.0))
    per_channel = Encoding(8, torch.tensor([0.0234375, 0.01, 0.05]), torch.zeros(3),
                           symmetric=True, axis=1)
    return {"per_tensor": per_tensor, "per_channel": per_channel}


def _reference(x: torch.Tensor, enc: Encoding) -> torch.Tensor:
    """numpy float32: clamp(round_half_even(x / s) - o, qmin, qmax) + o, times s."""
    xf = x.float().numpy()
    shape = [1] * xf.ndim
    if enc.axis is not None:
        shape[enc.axis] = -1
    s = enc.scale.numpy().reshape(shape)
    o = enc.offset.numpy().reshape(shape)
    q = np.clip(np.round(xf / s) - o, enc.qmin, enc.qmax)
    out = ((q + o) * s).astype(np.float32)
    return torch.from_numpy(out).to(x.dtype)


@pytest.mark.parametrize("backend", ["eager", "compiled"])
class TestBackend:
    """The same checks on every backend (STYLE 11)."""

    @pytest.mark.parametrize("layout", ["per_tensor", "per_channel"])
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
    def test_matches_reference(self, backend, layout, dtype, use_backend):
        """qdq equals the numpy float32 reference bit for bit, including .5 ties (half to
        even), and keeps the input dtype."""
        use_backend(backend)
        enc = _encodings()[layout]
        x = _data(dtype)
        with no_fallback_warning():
            y = enc.fake_quantize(x)
        assert y.dtype == dtype and y.shape == x.shape
        assert torch.equal(y, _reference(x, enc))
        assert not kernels._compile_failed

    def test_ties_round_half_to_even(self, backend, use_backend):
        """x / s = k + 0.5 rounds to the even neighbour, as ONNX QuantizeLinear does."""
        use_backend(backend)
        s = 0.0234375
        halves = torch.tensor([-3.5, -2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 3.5, 4.5])
        x = torch.zeros(SHAPE)
        x.view(-1)[: halves.numel()] = halves * s
        enc = Encoding(8, torch.tensor(s), torch.tensor(-128.0))
        codes = enc.fake_quantize(x).view(-1)[: halves.numel()] / s
        assert codes.tolist() == [-4.0, -2.0, -2.0, 0.0, 0.0, 2.0, 2.0, 4.0, 4.0]


@pytest.mark.parametrize("layout", ["per_tensor", "per_channel"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_compiled_equals_eager_bit_for_bit(layout, dtype, use_backend):
    """Random data of several seeds: compiled qdq == eager qdq bit for bit, no fallback."""
    enc = _encodings()[layout]
    for seed in range(3):
        x = _data(dtype, seed)
        use_backend("eager")
        eager = enc.fake_quantize(x)
        use_backend("compiled")
        with no_fallback_warning():
            compiled = enc.fake_quantize(x)
        assert torch.equal(compiled, eager)
    assert not kernels._compile_failed


def test_auto_uses_compiled_only_for_large_tensors(use_backend, monkeypatch):
    """'auto' sends tensors of >= AUTO_MIN_ELEMENTS elements to the compiled kernel."""
    calls = []

    def spy(x, s, lo, hi):
        calls.append(x.numel())
        return kernels._eager_nearest(x, s, lo, hi)

    monkeypatch.setattr(kernels, "_run_compiled", spy)
    monkeypatch.setattr(kernels, "_compile_failed", False)
    use_backend("auto")
    enc = _encodings()["per_tensor"]
    enc.fake_quantize(torch.randn(kernels.AUTO_MIN_ELEMENTS - 1))
    assert calls == []
    enc.fake_quantize(torch.randn(kernels.AUTO_MIN_ELEMENTS))
    assert calls == [kernels.AUTO_MIN_ELEMENTS]
    use_backend("eager")
    enc.fake_quantize(torch.randn(kernels.AUTO_MIN_ELEMENTS))
    assert len(calls) == 1


def test_compile_failure_falls_back_to_eager_with_one_warning(use_backend, monkeypatch):
    """If the compiled kernel cannot be built, results come from eager (identical) and one
    warning names the cause; later calls stay silent."""
    def broken():
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(kernels, "_get_compiled", broken)
    monkeypatch.setattr(kernels, "_compile_failed", False)
    enc = _encodings()["per_channel"]
    x = _data(torch.float32)
    use_backend("eager")
    expected = enc.fake_quantize(x)
    use_backend("compiled")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = [enc.fake_quantize(x) for _ in range(3)]
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages
    assert "falling back to eager" in messages[0] and "no C++ compiler found" in messages[0]
    assert all(torch.equal(r, expected) for r in results)
    assert kernels._compile_failed


def test_stochastic_rounding_ignores_the_backend(use_backend, monkeypatch):
    """Stochastic rounding runs eagerly on every backend (the compiled kernel is nearest only)."""
    monkeypatch.setattr(kernels, "_run_compiled",
                        lambda *a: pytest.fail("stochastic rounding must not compile"))
    use_backend("compiled")
    enc = _encodings()["per_tensor"]
    torch.manual_seed(0)
    y = enc.fake_quantize(_data(torch.float32), rounding="stochastic")
    assert y.shape == SHAPE


def test_set_backend_rejects_unknown_names(use_backend):
    """An unknown backend name is refused with the allowed names."""
    with pytest.raises(ValueError, match="allowed.*auto.*eager.*compiled"):
        kernels.set_backend("fast")
    assert kernels.get_backend() in kernels.BACKENDS


@requires_cuda
@pytest.mark.parametrize("backend", ["eager", "compiled"])
def test_cuda_matches_cpu(backend, use_backend):
    """On CUDA both backends give the CPU result bit for bit (IEEE division and rounding)."""
    use_backend(backend)
    for enc in _encodings().values():
        x = _data(torch.float32)
        assert torch.equal(enc.fake_quantize(x.cuda()).cpu(), enc.fake_quantize(x))


# ----------------------------------------------------------------------------------------------
# the training passes (qdq_train / qdq_backward)
# ----------------------------------------------------------------------------------------------
def _training_pass(enc: Encoding, x: torch.Tensor, grad: torch.Tensor, lsq: bool):
    """qdq_train then qdq_backward for an encoding, as fake_quantize runs them."""
    out, inside, ds = kernels.qdq_train(x, enc.scale, enc.offset, enc.qmin, enc.qmax, enc.axis,
                                        "nearest", lsq)
    grad_x, sum_ds, sum_out = kernels.qdq_backward(grad, inside, ds)
    return out, inside, ds, grad_x, sum_ds, sum_out


def _sum_bound(grad: torch.Tensor, ds: torch.Tensor, inside: torch.Tensor, enc: Encoding):
    """Two orders of summing the same n products differ by at most 2 n u sum|terms| (float32)."""
    g = grad.float().reshape(inside.shape).double()
    n = g.numel() // enc.scale.numel()
    dims = (0, 2) if g.dim() == 3 else (0,)
    terms_ds = (g * ds.double()).abs().sum(dim=dims)
    terms_out = (g * (1 - inside.double())).abs().sum(dim=dims)
    return 2 * n * 2.0**-24 * terms_ds, 2 * n * 2.0**-24 * terms_out


@pytest.mark.parametrize("layout,dtype,lsq", [
    ("per_tensor", torch.float32, False), ("per_tensor", torch.float32, True),
    ("per_channel", torch.float32, False), ("per_channel", torch.float32, True),
    ("per_tensor", torch.float16, True)])
def test_training_passes_compiled_equal_eager(layout, dtype, lsq, use_backend):
    """The compiled training passes give eager's output, mask, LSQ factors and input gradient
    bit for bit (ties and clipped values included), and its scale / offset sums within float32
    summation rounding (inductor adds in another order)."""
    enc = _encodings()[layout]
    for seed in range(2):
        x = _data(dtype, seed)
        x.view(-1)[:2] = torch.tensor([float("inf"), -float("inf")])
        grad = torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed)).to(dtype)
        use_backend("eager")
        eager = _training_pass(enc, x, grad, lsq)
        use_backend("compiled")
        with no_fallback_warning():
            compiled = _training_pass(enc, x, grad, lsq)
        for a, b in zip(eager[:4], compiled[:4]):
            assert (a is None and b is None) or torch.equal(a, b)
        assert torch.equal(eager[0], enc.fake_quantize(x))
        if lsq:
            bound_ds, bound_out = _sum_bound(grad, eager[2], eager[1], enc)
            assert bool(((eager[4].double() - compiled[4].double()).abs() <= bound_ds).all())
            assert bool(((eager[5].double() - compiled[5].double()).abs() <= bound_out).all())
            assert bool(torch.isfinite(eager[2]).all())  # infinite inputs: their clipped code
    assert not kernels._compile_failed


def test_range_learning_compiled_equals_eager(use_backend):
    """fake_quantize_range end to end (asymmetric per tensor and per channel, symmetric per
    channel): the compiled backend gives eager's output and input gradient bit for bit and its
    min / max gradients within float32 rounding of the sums."""
    from quantsim.encoding import fake_quantize_range

    x = _data(torch.float32)
    grad = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    ranges = [(None, False, torch.tensor(-2.5), torch.tensor(3.0)),
              (1, False, torch.tensor([-1.0, -0.5, -2.0]), torch.tensor([1.0, 2.0, 0.75])),
              (1, True, torch.tensor([-1.0, -0.5, -2.0]), torch.tensor([1.0, 2.0, 0.75]))]
    for axis, symmetric, lo, hi in ranges:
        qmin, qmax = (-128, 127) if symmetric else (0, 255)
        results = {}
        for backend in ("eager", "compiled"):
            use_backend(backend)
            xr, lr, hr = (t.clone().requires_grad_() for t in (x, lo, hi))
            with no_fallback_warning():
                y = fake_quantize_range(xr, lr, hr, qmin, qmax, symmetric, axis)
                y.backward(grad)
            results[backend] = (y.detach(), xr.grad, lr.grad, hr.grad)
        eager, compiled = results["eager"], results["compiled"]
        assert torch.equal(eager[0], compiled[0]) and torch.equal(eager[1], compiled[1])
        # the two sums per channel differ by at most 2 n u of the sums of |terms|, which are
        # at most n max|g| max|ds| (|ds| <= 255 here); min / max take them with coefficients
        # of at most 1 (1/N, |min/s| / N <= 1, 1 for the offset's share of min)
        n = x.numel() // lo.numel()
        tol = 3 * 2 * n * 2.0**-24 * n * float(grad.abs().max()) * 255
        for a, b in zip(eager[2:], compiled[2:]):
            torch.testing.assert_close(a, b, rtol=0, atol=tol)
    assert not kernels._compile_failed


def test_auto_compiles_training_passes_from_their_own_threshold(use_backend, monkeypatch):
    """'auto' sends training passes of >= AUTO_MIN_ELEMENTS_TRAIN elements to the compiled
    kernels (forward, and backward with LSQ sums); a backward without sums (one product) and
    a stochastic forward never compile."""
    calls = []

    def spy(get, *args):
        calls.append((get().__name__, args[0].numel()))
        return None  # then the eager path runs, as after a failed compile

    monkeypatch.setattr(kernels, "_try_compiled", spy)
    monkeypatch.setattr(kernels, "_compile", lambda fn: fn)
    use_backend("auto")
    enc = _encodings()["per_tensor"]
    small, large = kernels.AUTO_MIN_ELEMENTS_TRAIN - 1, kernels.AUTO_MIN_ELEMENTS_TRAIN
    for n in (small, large):
        x, g = torch.randn(n), torch.randn(n)
        for lsq in (False, True):
            _, inside, ds = kernels.qdq_train(x, enc.scale, enc.offset, 0, 255, None,
                                              "nearest", lsq)
            kernels.qdq_backward(g, inside, ds)
        kernels.qdq_train(x, enc.scale, enc.offset, 0, 255, None, "stochastic", True)
    assert calls == [("_train_nearest", large), ("_train_nearest", large),
                     ("_backward_sums", large)]


def test_training_compile_failure_falls_back_to_eager(use_backend, monkeypatch):
    """A training pass whose kernel cannot be compiled runs eagerly (identical results) after
    one warning naming the cause."""
    enc = _encodings()["per_channel"]
    x = _data(torch.float32)
    grad = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    use_backend("eager")
    expected = _training_pass(enc, x, grad, True)

    def broken(fn):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(kernels, "_compile", broken)
    monkeypatch.setattr(kernels, "_compile_failed", False)
    use_backend("compiled")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = [_training_pass(enc, x, grad, True) for _ in range(2)]
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "no C++ compiler found" in messages[0], messages
    for result in results:
        assert all(torch.equal(a, b) for a, b in zip(result, expected))


@requires_cuda
@pytest.mark.parametrize("backend", ["eager", "compiled"])
def test_cuda_training_passes_match_cpu(backend, use_backend):
    """On CUDA the training passes give the CPU output, mask, LSQ factors and input gradient
    bit for bit (the CPU's per-tensor clamp bounds are Python floats, CUDA's tensors)."""
    use_backend(backend)
    for enc in _encodings().values():
        x = _data(torch.float32)
        grad = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
        cpu = _training_pass(enc, x, grad, True)
        cuda_enc = Encoding(enc.bitwidth, enc.scale, enc.offset, enc.symmetric, axis=enc.axis)
        out, inside, ds = kernels.qdq_train(x.cuda(), cuda_enc.scale.cuda(),
                                            cuda_enc.offset.cuda(), enc.qmin, enc.qmax,
                                            enc.axis, "nearest", True)
        grad_x, _, _ = kernels.qdq_backward(grad.cuda(), inside, ds)
        for a, b in zip((out, inside, ds, grad_x), cpu[:4]):
            assert torch.equal(a.cpu(), b)
