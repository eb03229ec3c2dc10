"""Tests of quantsim.analyzers: statistics -> raw range (schemes tf, tf_enhanced, percentile)."""
import os
import socket
import tempfile
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st

from quantsim.analyzers import (
    MinMaxAnalyzer,
    NonFiniteWarning,
    PercentileAnalyzer,
    SqnrAnalyzer,
    create_analyzer,
)
from quantsim.analyzers.histograms import _rebin
from conftest import requires_cuda
from quantsim.encoding import Encoding
from quantsim.errors import CalibrationError, QuantizationSettingError

FAST = settings(max_examples=25, deadline=None)
SCHEMES = ["tf", "tf_enhanced", "percentile"]
# Small histograms keep the property tests fast; the maths does not depend on the bin count.
SMALL = {"tf": {}, "tf_enhanced": {"num_bins": 64},
         "percentile": {"num_bins": 64, "percentile": 90.0}}


def _analyzer(scheme, axis=None, **kwargs):
    return create_analyzer(scheme, axis=axis, **{**SMALL[scheme], **kwargs})


def _seeded(seed, *shape, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def _sqnr_db(x, lo, hi, symmetric=False):
    enc = Encoding.from_range(lo, hi, bitwidth=8, symmetric=symmetric)
    noise = (x - enc.fake_quantize(x)).pow(2).sum()
    return float(10 * torch.log10(x.pow(2).sum() / noise))


def _range_of(scheme, *batches, symmetric=False, axis=None, **kwargs):
    a = _analyzer(scheme, axis, **kwargs)
    for b in batches:
        a.observe(b)
    return a.compute_range(255, symmetric)


# ----------------------------------------------------------------------------------------------
# tf
# ----------------------------------------------------------------------------------------------
@FAST
@given(seed=st.integers(0, 2**16), batches=st.integers(1, 4), channels=st.integers(1, 5))
def test_tf_is_exact_running_min_max(seed, batches, channels):
    """tf returns exactly the min and max over all batches, per tensor and per channel."""
    data = [_seeded(seed + i, channels, 7, scale=i + 1) for i in range(batches)]
    both = torch.cat(data, dim=1)
    lo, hi = _range_of("tf", *data)
    assert lo.shape == () and lo == both.min() and hi == both.max()
    lo, hi = _range_of("tf", *data, axis=0)
    assert torch.equal(lo, both.amin(dim=1)) and torch.equal(hi, both.amax(dim=1))


def test_tf_range_has_the_encoding_shape_and_dtype():
    """Per tensor the range is 0-d, per channel (C,) along any axis; always float32."""
    x = torch.randn(2, 3, 4, dtype=torch.float16)
    for axis, shape in ((None, ()), (1, (3,)), (-1, (4,))):
        lo, hi = _range_of("tf", x, axis=axis)
        assert lo.shape == hi.shape == shape and lo.dtype == hi.dtype == torch.float32


# ----------------------------------------------------------------------------------------------
# merge and per-channel consistency
# ----------------------------------------------------------------------------------------------
@FAST
@given(seed=st.integers(0, 2**16), scheme=st.sampled_from(SCHEMES), symmetric=st.booleans())
def test_merge_equals_one_analyzer_seeing_both_streams(seed, scheme, symmetric):
    """merge_(B) after A == observe(A) then observe(B), exactly when B's range covers A's."""
    a_data, b_data = _seeded(seed, 3, 50), _seeded(seed + 1, 3, 80, scale=2.0)
    b_data[:, 0], b_data[:, 1] = 10.0, -10.0  # B's range covers A's in every channel
    merged, other = _analyzer(scheme, axis=0), _analyzer(scheme, axis=0)
    merged.observe(a_data)
    other.observe(b_data)
    merged.merge_(other)
    single = _analyzer(scheme, axis=0)
    single.observe(a_data)
    single.observe(b_data)
    for key, value in single.state_dict_stats().items():
        assert torch.equal(merged.state_dict_stats()[key], value), key
    for m, s in zip(merged.compute_range(255, symmetric), single.compute_range(255, symmetric)):
        assert torch.equal(m, s)


@FAST
@given(seed=st.integers(0, 2**16), shift=st.floats(-3, 3))
def test_merge_of_disjoint_ranges_is_close_to_one_stream(seed, shift):
    """With arbitrary ranges a merged histogram keeps the total count and the exact min/max,
    and its percentile range is within two bins of the single-stream one."""
    a_data, b_data = _seeded(seed, 200), _seeded(seed + 1, 300) + shift
    merged, other = _analyzer("percentile"), _analyzer("percentile")
    merged.observe(a_data)
    other.observe(b_data)
    merged.merge_(other)
    single = _analyzer("percentile")
    single.observe(a_data)
    single.observe(b_data)
    ms, ss = merged.state_dict_stats(), single.state_dict_stats()
    assert float(ms["counts"].sum()) == pytest.approx(500, rel=1e-12)
    for key in ("min", "max", "lo", "hi"):
        assert torch.equal(ms[key], ss[key])
    bin_width = float(ss["hi"] - ss["lo"]) / 64
    for m, s in zip(merged.compute_range(255, False), single.compute_range(255, False)):
        assert abs(float(m - s)) <= 2 * bin_width + 1e-6


def test_merge_into_empty_and_from_empty():
    """Merging into an empty analyzer copies the stats; merging an empty one changes nothing."""
    full, empty = _analyzer("tf_enhanced"), _analyzer("tf_enhanced")
    full.observe(torch.randn(100))
    before = full.state_dict_stats()
    full.merge_(empty)
    empty.merge_(full)
    for key, value in before.items():
        assert torch.equal(full.state_dict_stats()[key], value)
        assert torch.equal(empty.state_dict_stats()[key], value)


def test_merge_rejects_other_kinds_and_shapes():
    """Merging another scheme, bin count or channel count raises CalibrationError."""
    a = _analyzer("tf_enhanced", axis=0)
    a.observe(torch.randn(3, 4))
    others = [_analyzer("tf", axis=0), SqnrAnalyzer(axis=0, num_bins=32),
              _analyzer("tf_enhanced", axis=0)]
    for other in others:
        other.observe(torch.randn(2, 4))
        with pytest.raises(CalibrationError):
            a.merge_(other)


@FAST
@given(seed=st.integers(0, 2**16), scheme=st.sampled_from(SCHEMES), symmetric=st.booleans(),
       batches=st.integers(1, 3))
def test_per_channel_equals_per_tensor_slice_by_slice(seed, scheme, symmetric, batches):
    """Channel c of a per-channel analyzer gives the range a per-tensor one gives on slice c."""
    data = [_seeded(seed + i, 6, 4, 5, scale=1 + i + torch.arange(4.0)[None, :, None])
            for i in range(batches)]
    lo, hi = _range_of(scheme, *data, symmetric=symmetric, axis=1)
    for c in range(4):
        slo, shi = _range_of(scheme, *[d[:, c] for d in data], symmetric=symmetric)
        assert lo[c] == slo and hi[c] == shi


# ----------------------------------------------------------------------------------------------
# histograms
# ----------------------------------------------------------------------------------------------
@FAST
@given(seed=st.integers(0, 2**16), lo=st.floats(-100, 100), width=st.floats(1e-3, 100),
       grow_lo=st.floats(0, 100), grow_hi=st.floats(0, 100))
def test_rebin_conserves_counts(seed, lo, width, grow_lo, grow_hi):
    """Re-binning onto a wider range keeps every row's total and never makes a count negative."""
    counts = torch.rand(3, 50, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    counts = (counts * 1000).floor()
    old_lo = torch.full((3,), lo)
    old_hi = old_lo + width
    new_lo, new_hi = old_lo - grow_lo * torch.arange(3.0), old_hi + grow_hi
    out = _rebin(counts, old_lo, old_hi, new_lo, new_hi)
    assert torch.all(out >= 0)
    torch.testing.assert_close(out.sum(dim=1), counts.sum(dim=1), rtol=1e-12, atol=0)


def test_rebin_moves_counts_to_where_the_values_are():
    """A bin that lands inside one wider bin moves there whole; one straddling an edge splits."""
    counts = torch.tensor([[0.0, 8.0, 0.0, 4.0]], dtype=torch.float64)  # bins of [0, 4]
    out = _rebin(counts, torch.tensor([0.0]), torch.tensor([4.0]), torch.tensor([-4.0]),
                 torch.tensor([4.0]))  # bins of width 2 over [-4, 4]
    assert out.tolist() == [[0.0, 0.0, 8.0, 4.0]]
    out = _rebin(counts, torch.tensor([0.0]), torch.tensor([4.0]), torch.tensor([-1.0]),
                 torch.tensor([5.0]))  # width 1.5: edges -1, 0.5, 2, 3.5, 5
    torch.testing.assert_close(out, torch.tensor([[0.0, 8.0, 2.0, 2.0]], dtype=torch.float64))


def test_histogram_counts_every_finite_value_once():
    """After several growing batches the histogram holds exactly as many counts as values."""
    a = SqnrAnalyzer(axis=0, num_bins=128)
    for scale in (1.0, 0.5, 4.0, 2.0):
        a.observe(torch.randn(5, 1000) * scale)
    counts = a.state_dict_stats()["counts"]
    torch.testing.assert_close(counts.sum(dim=1), torch.full((5,), 4000.0, dtype=torch.float64),
                               rtol=1e-12, atol=0)


def test_constant_data_gives_its_value():
    """Constant data (a zero-width histogram) gives (3, 3) for tf and percentile 99 and the
    range (0, ~3) for tf_enhanced, whose candidates include zero."""
    x = torch.full((100,), 3.0)
    for lo, hi in (_range_of("tf", x), _range_of("percentile", x, percentile=99.0)):
        assert float(lo) == float(hi) == 3.0
    lo, hi = _range_of("tf_enhanced", x)
    assert float(lo) == 0.0 and float(hi) == pytest.approx(3.0, rel=0.02)


# ----------------------------------------------------------------------------------------------
# tf_enhanced
# ----------------------------------------------------------------------------------------------
def _student_t3(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g) / (torch.randn(3, n, generator=g).pow(2).mean(0)).sqrt()


def _gain_db(x, symmetric):
    tf = _sqnr_db(x, *_range_of("tf", x, symmetric=symmetric), symmetric)
    a = SqnrAnalyzer()
    a.observe(x)
    lo, hi = a.compute_range(255, symmetric)
    return _sqnr_db(x, lo, hi, symmetric) - tf, float(lo), float(hi)


@pytest.mark.parametrize("symmetric", [False, True])
def test_tf_enhanced_clips_rare_outliers(symmetric):
    """Two values at +-50 sigma in a million: tf_enhanced clips them, keeps the bulk (+-5 sigma)
    and gains >= 3 dB SQNR over tf."""
    x = _seeded(0, 1_000_000)
    x[0], x[1] = 50.0, -50.0
    gain, lo, hi = _gain_db(x, symmetric)
    assert gain >= 3.0 and -50 < lo < -5 and 5 < hi < 50


@pytest.mark.parametrize("symmetric", [False, True])
def test_tf_enhanced_beats_tf_on_heavy_tails(symmetric):
    """On Student-t (3 dof) data tf_enhanced trims the tails and gains >= 0.5 dB SQNR over tf."""
    x = _student_t3(200_000, seed=0)
    gain, lo, hi = _gain_db(x, symmetric)
    assert gain >= 0.5 and max(-lo, hi) < float(x.abs().max())


def test_tf_enhanced_keeps_outliers_that_carry_much_energy():
    """0.1 % of values at +-50 sigma hold most of the energy: clipping them would cost more than
    it saves, so tf_enhanced keeps them (range reaches +-49) and loses nothing against tf."""
    x = _seeded(0, 100_000)
    x[::1000] = 50.0 * torch.sign(_seeded(1, 100))
    gain, lo, hi = _gain_db(x, symmetric=False)
    assert gain >= -0.1 and lo < -49 and hi > 49


@pytest.mark.parametrize("symmetric", [False, True])
def test_tf_enhanced_matches_tf_on_uniform_data(symmetric):
    """On uniform data (nothing worth clipping) tf_enhanced is within 1 dB SQNR of tf."""
    x = torch.rand(200_000, generator=torch.Generator().manual_seed(1)) * 2 - 0.5
    tf = _sqnr_db(x, *_range_of("tf", x, symmetric=symmetric), symmetric)
    a = SqnrAnalyzer()
    a.observe(x)
    assert abs(_sqnr_db(x, *a.compute_range(255, symmetric), symmetric) - tf) < 1.0


def test_tf_enhanced_symmetric_range_lies_on_the_symmetric_grid():
    """The symmetric result is (-128 d, 127 d): from_range reproduces d without widening."""
    a = SqnrAnalyzer()
    a.observe(_seeded(3, 10_000))
    lo, hi = a.compute_range(255, symmetric=True)
    enc = Encoding.from_range(lo, hi, 8, symmetric=True)
    torch.testing.assert_close(enc.min, lo)
    torch.testing.assert_close(enc.max, hi)


def _oracle_noise(mids, counts, delta, offset, num_steps, gamma=3.0):
    """FORMATS 3.3 noise of one candidate, written out plainly in float64."""
    q = torch.round(mids / delta) - offset
    clipped = (q < 0) | (q > num_steps)
    err = (q.clamp(0, num_steps) + offset) * delta - mids
    return float((counts * err**2 * torch.where(clipped, gamma, 1.0)).sum())


def _oracle_candidates(lo, hi, num_steps, symmetric):
    """FORMATS 3.3 candidate (delta, offset) pairs, one at a time."""
    if symmetric:
        full = 2 * max(hi, -lo) / num_steps
        for k in range(1, 102):
            yield max(full * k / 100, 2**-23), (-num_steps) // 2
        return
    full = (hi - lo) / num_steps
    observed = round(lo / full)
    floor, ceil = full * observed, full * (observed + num_steps)
    for k in range(1, 18):
        delta = full * k / 16
        for offset in [round(-num_steps + i * num_steps / 19) for i in range(20)] + [observed]:
            cand_lo = max(delta * offset, floor)
            cand_hi = min(delta * (offset + num_steps), ceil)
            step = max((cand_hi - cand_lo) / num_steps, 2**-23)
            yield step, round(cand_lo / step)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_tf_enhanced_finds_the_brute_force_optimum(symmetric, seed):
    """The vectorised search picks a candidate whose noise equals the minimum a plain loop over
    the FORMATS 3.3 candidates finds on the same histogram."""
    x = _seeded(seed, 5000) + 0.5
    x[:3] = torch.tensor([12.0, -9.0, 15.0])
    a = SqnrAnalyzer(num_bins=128)
    a.observe(x)
    stats = {k: v.double()[0] for k, v in a.state_dict_stats().items()}
    width = (stats["hi"] - stats["lo"]) / 128
    mids = stats["lo"] + width * (torch.arange(128, dtype=torch.float64) + 0.5)
    lo, hi = min(float(stats["min"]), 0.0), max(float(stats["max"]), 0.0)
    best = min(_oracle_noise(mids, stats["counts"], d, o, 255)
               for d, o in _oracle_candidates(lo, hi, 255, symmetric))
    got_lo, got_hi = (float(v) for v in a.compute_range(255, symmetric))
    delta = (got_hi - got_lo) / 255
    got = _oracle_noise(mids, stats["counts"], delta, round(got_lo / delta), 255)
    assert got == pytest.approx(best, rel=1e-4)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("gamma", [1.0, 3.0])
def test_tf_enhanced_per_channel_sparse_histograms_find_the_brute_force_optimum(symmetric, gamma):
    """Rows of a few dozen values fill few of their 512 bins (as weight rows fill their 2048):
    the search evaluates only non-empty bins and adds the clipping weight in closed form, and
    still picks, per channel, a candidate whose plain float64 noise is the minimum."""
    g = torch.Generator().manual_seed(7)
    rows = [torch.randn(n, generator=g) * s for n, s in ((9, 0.1), (40, 1.0), (300, 0.02))]
    width = max(len(r) for r in rows)
    data = torch.stack([torch.cat([r, r[:1].expand(width - len(r))]) for r in rows])
    data[1, :2] = torch.tensor([7.0, -5.0])  # outliers worth clipping in one row
    a = SqnrAnalyzer(axis=0, num_bins=512, gamma=gamma)
    a.observe(data)
    stats = {k: v.double() for k, v in a.state_dict_stats().items()}
    assert int((stats["counts"] > 0).sum(dim=1).max()) < 0.75 * 512  # the compacted path
    got_lo, got_hi = a.compute_range(255, symmetric)
    for c in range(3):
        width = (stats["hi"][c] - stats["lo"][c]) / 512
        mids = stats["lo"][c] + width * (torch.arange(512, dtype=torch.float64) + 0.5)
        counts = stats["counts"][c]
        lo, hi = min(float(stats["min"][c]), 0.0), max(float(stats["max"][c]), 0.0)
        best = min(_oracle_noise(mids, counts, d, o, 255, gamma)
                   for d, o in _oracle_candidates(lo, hi, 255, symmetric))
        delta = (float(got_hi[c]) - float(got_lo[c])) / 255
        got = _oracle_noise(mids, counts, delta, round(float(got_lo[c]) / delta), 255, gamma)
        assert got == pytest.approx(best, rel=1e-4), c


def test_percentile_clips_where_asked():
    """p = 99 on an even grid over [0, 1] gives (0.01, 0.99) to within a bin; p = 100 is min/max."""
    x = torch.linspace(0, 1, 100_001)
    lo, hi = _range_of("percentile", x, percentile=99.0, num_bins=2048)
    assert float(lo) == pytest.approx(0.01, abs=1 / 2048)
    assert float(hi) == pytest.approx(0.99, abs=1 / 2048)
    lo, hi = _range_of("percentile", x * 4 - 1, percentile=100.0)
    assert float(lo) == -1.0 and float(hi) == 3.0


@pytest.mark.parametrize("p", [30, 49.9, 100.5, 101, "99", True])
def test_bad_percentile_is_refused(p):
    """A percentile outside [50, 100] (or not a number) raises QuantizationSettingError."""
    with pytest.raises(QuantizationSettingError, match=r"\[50, 100\]"):
        PercentileAnalyzer(percentile=p)
    with pytest.raises(QuantizationSettingError):
        PercentileAnalyzer().set_percentile(p)


# ----------------------------------------------------------------------------------------------
# non-finite values
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", SCHEMES)
def test_non_finite_values_are_dropped_with_a_warning(scheme):
    """NaN and +-inf are left out (range == that of the finite values) and a NonFiniteWarning
    with the count and the analyzer's name is raised."""
    clean = _seeded(5, 4, 100)
    dirty = clean.clone()
    dirty[0, :3] = float("nan")
    dirty[1, 0], dirty[2, 5] = float("inf"), -float("inf")
    keep = torch.isfinite(dirty)
    for axis in (None, 0):
        a = _analyzer(scheme, axis, name="layer1.input")
        with pytest.warns(NonFiniteWarning, match=r"layer1.input.*\b5 non-finite"):
            a.observe(dirty)
        lo, hi = a.compute_range(255, False)
        rows = [clean[keep]] if axis is None else [clean[c][keep[c]] for c in range(4)]
        for c, row in enumerate(rows):
            want_lo, want_hi = _range_of(scheme, row)
            assert lo.reshape(-1)[c] == want_lo and hi.reshape(-1)[c] == want_hi


def test_all_non_finite_data_contributes_nothing():
    """A batch without finite values leaves no stats; a channel that never saw one gets (0, 0)."""
    a = SqnrAnalyzer(num_bins=64)
    with pytest.warns(NonFiniteWarning):
        a.observe(torch.full((10,), float("nan")))
    assert not a.has_stats
    a.observe(torch.tensor([1.0, 2.0]))
    before = a.state_dict_stats()
    with pytest.warns(NonFiniteWarning):
        a.observe(torch.tensor([float("inf"), -float("inf")]))
    assert all(torch.equal(v, a.state_dict_stats()[k]) for k, v in before.items())
    b = SqnrAnalyzer(axis=0, num_bins=64)
    x = torch.randn(3, 10)
    x[1] = float("nan")
    with pytest.warns(NonFiniteWarning):
        b.observe(x)
    lo, hi = b.compute_range(255, False)
    assert lo[1] == 0 and hi[1] == 0 and hi[0] > 0 and hi[2] > 0


def test_finite_data_raises_no_warning():
    """Clean data never warns."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for scheme in SCHEMES:
            _range_of(scheme, torch.randn(100))


# ----------------------------------------------------------------------------------------------
# errors and the factory
# ----------------------------------------------------------------------------------------------
def test_unknown_scheme_lists_the_allowed_ones():
    """An unknown scheme raises QuantizationSettingError naming it and every allowed scheme."""
    with pytest.raises(QuantizationSettingError, match=r"'mse'.*'tf'.*'tf_enhanced'.*'percentile'"):
        create_analyzer("mse")


def test_factory_passes_settings_through():
    """create_analyzer builds the scheme's class with the axis and keyword settings given."""
    a = create_analyzer("percentile", axis=1, percentile=99.5, num_bins=10, name="w")
    assert isinstance(a, PercentileAnalyzer)
    assert (a.axis, a.percentile, a.num_bins, a.name) == (1, 99.5, 10, "w")
    assert isinstance(create_analyzer("tf"), MinMaxAnalyzer)
    assert isinstance(create_analyzer("tf_enhanced", gamma=1.0), SqnrAnalyzer)


def test_usage_errors_are_typed():
    """No stats, a bad num_steps, a missing axis or a changed channel count raise typed errors."""
    a = MinMaxAnalyzer(axis=2)
    with pytest.raises(CalibrationError, match="no statistics"):
        a.compute_range(255, False)
    with pytest.raises(CalibrationError, match="axis 2"):
        a.observe(torch.randn(3, 4))
    a.observe(torch.randn(1, 2, 3))
    with pytest.raises(CalibrationError, match="4 channels"):
        a.observe(torch.randn(1, 2, 4))
    with pytest.raises(QuantizationSettingError, match="num_steps"):
        a.compute_range(0, False)
    with pytest.raises(QuantizationSettingError, match="num_bins"):
        SqnrAnalyzer(num_bins=0)
    a.reset()
    assert not a.has_stats and a.state_dict_stats() == {}


def test_all_reduce_without_distributed_is_a_no_op():
    """all_reduce_ leaves the stats alone when torch.distributed is not initialized."""
    a = SqnrAnalyzer(num_bins=16)
    a.observe(torch.randn(50))
    before = a.state_dict_stats()
    a.all_reduce_()
    assert all(torch.equal(v, a.state_dict_stats()[k]) for k, v in before.items())


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("scheme", SCHEMES)
def test_cuda_matches_cpu(scheme):
    """On CUDA every scheme gives the CPU range (per tensor and per channel), also with NaNs."""
    x = _seeded(7, 8, 1000, scale=3.0)
    x[2, 5] = float("nan")
    for axis in (None, 0):
        with pytest.warns(NonFiniteWarning):
            want = _range_of(scheme, x, axis=axis, symmetric=True)
        with pytest.warns(NonFiniteWarning):
            got = _range_of(scheme, x.cuda(), axis=axis, symmetric=True)
        for g, w in zip(got, want):
            assert g.device.type == "cuda"
            torch.testing.assert_close(g.cpu(), w, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# two processes
# ----------------------------------------------------------------------------------------------
def _rank_data(rank):
    """Per-rank batches; rank 1's range covers rank 0's in every channel."""
    x = _seeded(10 + rank, 4, 300, scale=1.0 + rank)
    if rank == 1:
        x[:, 0], x[:, 1] = 10.0, -10.0
    return x


_CASES = [(scheme, axis) for scheme in SCHEMES for axis in (None, 0)]


def _worker(rank, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        results = {}
        for scheme, axis in _CASES:
            a = _analyzer(scheme, axis)
            a.observe(_rank_data(rank))
            a.all_reduce_()
            lonely = _analyzer(scheme, axis)  # only rank 0 observes
            if rank == 0:
                lonely.observe(_rank_data(0))
            lonely.all_reduce_()
            results[(scheme, axis)] = [a.compute_range(255, s) for s in (False, True)] + \
                [lonely.compute_range(255, False)]
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_all_reduce_over_two_gloo_processes():
    """After all_reduce_ both ranks hold the stats of one analyzer that saw both ranks' data:
    min/max exactly, histogram ranges to 1e-6; a rank that saw nothing gets the other's stats."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_worker, args=(_free_port(), out_dir), nprocs=2, join=True)
        results = [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(2)]
    for scheme, axis in _CASES:
        expected = [_range_of(scheme, _rank_data(0), _rank_data(1), axis=axis, symmetric=s)
                    for s in (False, True)] + [_range_of(scheme, _rank_data(0), axis=axis)]
        for rank in range(2):
            for got, want in zip(results[rank][(scheme, axis)], expected):
                if scheme == "tf":
                    assert all(torch.equal(g, w) for g, w in zip(got, want))
                else:
                    for g, w in zip(got, want):
                        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7)
