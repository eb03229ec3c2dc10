"""quantsim.metrics: SQNR and cosine arithmetic (hypothesis) and the ready eval callbacks."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from quantsim.errors import AnalysisError, UnsupportedModelError
from quantsim.metrics import (EmbeddingCosine, OutputSQNR, cosine_rows, sqnr_db,
                              sqnr_from_sums, squared_sums)
from quantsim.sim import QuantizationSimModel

_values = st.lists(st.floats(-1e3, 1e3, allow_nan=False, width=32), min_size=1, max_size=64)


@settings(max_examples=60, deadline=None)
@given(_values, st.floats(1e-3, 10.0), st.integers(0, 2**31 - 1))
def test_sqnr_is_the_power_ratio(values, noise_scale, seed):
    x = torch.tensor(values, dtype=torch.float32)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)) * noise_scale
    y = x + noise
    signal = sum(float(v) ** 2 for v in x.double())
    err = sum(float(a - b) ** 2 for a, b in zip(x.double(), y.double()))
    got = sqnr_db(x, y)
    if err == 0:
        assert got == math.inf
    elif signal == 0:
        assert got == -math.inf
    else:
        # the difference is rounded to float32 (relative 2^-24, so the noise sum moves by at
        # most 2^-23 relative), the squares are summed in float64: 10/ln 10 * 2^-23 < 6e-7 dB
        assert got == pytest.approx(10 * math.log10(signal / err), abs=6e-7)


@settings(max_examples=40, deadline=None)
@given(st.lists(_values, min_size=1, max_size=4), st.integers(0, 2**31 - 1))
def test_sums_pool_over_batches(batches, seed):
    """SQNR of pooled sums equals the SQNR of the concatenated tensors (not a mean of dB)."""
    g = torch.Generator().manual_seed(seed)
    xs = [torch.tensor(b) for b in batches]
    ys = [x + torch.randn(x.shape, generator=g) for x in xs]
    sums = [squared_sums(x, y) for x, y in zip(xs, ys)]
    pooled = sqnr_from_sums(sum(s for s, _ in sums), sum(n for _, n in sums))
    assert pooled == pytest.approx(sqnr_db(torch.cat(xs), torch.cat(ys)), rel=1e-9, abs=1e-9)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 5), st.integers(1, 8), st.integers(0, 2**31 - 1),
       st.floats(0.01, 100.0))
def test_cosine_rows(n, d, seed, scale):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    cos = cosine_rows(a, b)
    assert cos.shape == (n,) and cos.dtype == torch.float64
    assert bool(((cos >= -1) & (cos <= 1)).all())
    # invariant under positive scaling (in float64, so the scaled rows stay exact to 1e-16),
    # symmetric, 1 for a row against itself
    assert torch.allclose(cosine_rows(a.double() * scale, b), cos, atol=1e-12)
    assert torch.allclose(cosine_rows(b, a), cos, atol=1e-12)
    assert torch.allclose(cosine_rows(a, a), torch.ones(n, dtype=torch.float64), atol=1e-12)
    ref = torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=1)
    assert torch.allclose(cos, ref, atol=1e-12)


def test_zero_rows_and_edge_values():
    z = torch.zeros(2, 3)
    assert torch.equal(cosine_rows(z, z), torch.ones(2, dtype=torch.float64))
    assert torch.equal(cosine_rows(z, torch.ones(2, 3)), torch.zeros(2, dtype=torch.float64))
    assert sqnr_from_sums(1.0, 0.0) == math.inf and sqnr_from_sums(0.0, 1.0) == -math.inf
    assert sqnr_db(torch.tensor([1.0, 1.0]), torch.tensor([1.1, 0.9])) == pytest.approx(20.0)


@pytest.fixture(scope="module")
def model_and_sim():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    batches = [torch.randn(10, 8) for _ in range(2)]
    sim = QuantizationSimModel(model, batches[0], quant_scheme="tf", default_output_bw=4,
                               default_param_bw=4)
    sim.compute_encodings(lambda m, _: [m(b) for b in batches], None)
    return model, batches, sim


def test_output_sqnr_callback(model_and_sim):
    model, batches, sim = model_and_sim
    metric = OutputSQNR(model, batches)
    assert metric(model) == math.inf
    with torch.no_grad():
        quantized = torch.cat([sim.model(b) for b in batches])
        reference = torch.cat([model(b) for b in batches])
    assert metric(sim.model) == pytest.approx(sqnr_db(reference, quantized), rel=1e-12)
    assert metric(sim.model, None) == metric(sim.model)     # aimet-style (model, args) call


def test_embedding_cosine_callback(model_and_sim):
    model, batches, sim = model_and_sim
    mean = EmbeddingCosine(model, batches)
    low = EmbeddingCosine(model, batches, reduction="min")
    assert mean(model) == pytest.approx(1.0, abs=1e-12)
    with torch.no_grad():
        cos = torch.cat([cosine_rows(model(b), sim.model(b)) for b in batches])
    assert mean(sim.model) == pytest.approx(float(cos.mean()), abs=1e-12)
    assert low(sim.model) == pytest.approx(float(cos.min()), abs=1e-12)
    assert mean.cosines(sim.model).shape == (20,)
    # a pipeline's own pooling: the first 2 features only
    pooled = EmbeddingCosine(model, batches, embed=lambda m, b: m(b)[:, :2])
    with torch.no_grad():
        cos2 = torch.cat([cosine_rows(model(b)[:, :2], sim.model(b)[:, :2]) for b in batches])
    assert pooled(sim.model) == pytest.approx(float(cos2.mean()), abs=1e-12)


def test_metric_bad_arguments(model_and_sim):
    model, batches, _ = model_and_sim
    with pytest.raises(UnsupportedModelError, match="OutputSQNR"):
        OutputSQNR(lambda x: x, batches)
    with pytest.raises(AnalysisError, match="one-shot iterator"):
        OutputSQNR(model, iter(batches))
    with pytest.raises(AnalysisError, match="wrap a single batch"):
        OutputSQNR(model, batches[0])
    with pytest.raises(AnalysisError, match="empty"):
        EmbeddingCosine(model, [])
    with pytest.raises(AnalysisError, match="reduction must be one of"):
        EmbeddingCosine(model, batches, reduction="max")
    with pytest.raises(AnalysisError, match="embed must be a callable"):
        EmbeddingCosine(model, batches, embed="mean")
    with pytest.raises(AnalysisError, match="shapes differ"):
        sqnr_db(torch.ones(3), torch.ones(4))
    metric = OutputSQNR(model, batches)
    with pytest.raises(AnalysisError, match="float tensors"):
        metric(_TwoOutputs(model))


class _TwoOutputs(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):  # noqa: D102
        y = self.inner(x)
        return y, y
