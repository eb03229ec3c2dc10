"""Tests of quantsim.encoding: the quantization arithmetic.

Property tests (hypothesis) cover every encoding kind (asymmetric, symmetric, strict symmetric,
unsigned symmetric), bitwidths 4..31, per tensor and per channel along a random axis. Golden
vectors come from real aimet-torch 2.x files (``tests/data/aimet``; the format's §2.3/§2.4), and the
``nearest`` rounding is checked against ONNX Runtime's QuantizeLinear/DequantizeLinear.

Float32 rounding bound used below (``ERR_ULPS``): inside the grid, ``|x - qdq(x)|`` is at most
``scale / 2`` plus the rounding of the float operations: ``x / s`` (relative 2^-24, i.e. at most
``2^-24 |x|`` once scaled back), ``q * s`` (``2^-24 |x|``), the float64 -> float32 cast at wide
bitwidths (``2^-24 |x|``) and the float32 rounding of the grid end ``max`` itself (``2^-24 |x|``):
``scale / 2 + 4 * 2^-24 * |x|``. Below ~20 bits this extra term is far smaller than the scale;
above, one float32 ulp of ``x`` can exceed the grid step, so the bound has to allow it.
"""
from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quantsim.encoding import (
    MINIMUM_SCALE,
    Encoding,
    fake_quantize,
    fake_quantize_range,
    integer_grid,
    scale_offset_from_range,
)

KINDS = ("asymmetric", "symmetric", "strict", "unsigned")
KIND_ARGS = {
    "asymmetric": {},
    "symmetric": {"symmetric": True},
    "strict": {"symmetric": True, "strict": True},
    "unsigned": {"symmetric": True, "unsigned_symmetric": True},
}
ERR_ULPS = 4 * 2.0**-24
PROPERTY = settings(max_examples=50, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


def make_encoding(kind: str, bitwidth: int, lo, hi, axis=None) -> Encoding:
    return Encoding.from_range(torch.as_tensor(lo), torch.as_tensor(hi), bitwidth, axis=axis,
                               **KIND_ARGS[kind])


def bview(t: torch.Tensor, x: torch.Tensor, axis) -> torch.Tensor:
    """Broadcast an encoding-shaped tensor against ``x``."""
    if axis is None or t.dim() == 0:
        return t
    shape = [1] * x.dim()
    shape[axis] = -1
    return t.reshape(shape)


@st.composite
def cases(draw, per_channel=None, kinds=KINDS, bitwidths=st.integers(4, 31)):
    """(encoding, input tensor, axis, generator) for a random kind, bitwidth and range.

    Ranges span 1e-6 .. 1e6 in magnitude; ~1/8 of them are degenerate (min == max). Inputs mix
    values inside the grid, beyond it, exact grid points, exact ties and zeros.
    """
    kind = draw(st.sampled_from(kinds))
    bitwidth = draw(bitwidths)
    if per_channel is None:
        per_channel = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    if per_channel:
        ndim = draw(st.integers(1, 3))
        shape = tuple(draw(st.lists(st.integers(1, 4), min_size=ndim, max_size=ndim)))
        axis = draw(st.integers(0, ndim - 1))
        channels = shape[axis]
    else:
        shape, axis, channels = (draw(st.integers(1, 40)),), None, 1
    mag = 10.0 ** torch.randint(-6, 7, (channels,), generator=g).float()
    a = torch.rand(channels, generator=g) * mag
    b = torch.rand(channels, generator=g) * mag
    if kind == "unsigned":
        lo, hi = torch.minimum(a, b), torch.maximum(a, b)
    else:
        lo, hi = -a, b
    if draw(st.integers(0, 7)) == 0:  # degenerate: min == max
        lo = hi.clone()
    if not per_channel:
        lo, hi = lo[0], hi[0]
    enc = make_encoding(kind, bitwidth, lo, hi, axis)
    x = sample_inputs(enc, shape, axis, g)
    return enc, x, axis, g


def sample_inputs(enc: Encoding, shape, axis, g: torch.Generator, reps: int = 8) -> torch.Tensor:
    """Inputs of ``shape + (reps,)`` (``axis`` keeps its meaning) mixing values inside and
    beyond the grid, exact grid points, exact ties (k + 0.5) * s and zeros."""
    shape = tuple(shape) + (reps,)
    like = torch.empty(shape)
    s, lo, hi = (bview(t, like, axis) for t in (enc.scale, enc.min, enc.max))
    width = hi - lo
    u = torch.rand(shape, generator=g)
    kind = torch.randint(0, 5, shape, generator=g)
    inside = torch.minimum(torch.maximum(lo + u * width, lo), hi)
    outside = lo + (u * 3 - 1) * width
    code = torch.round(inside / s)
    x = torch.where(kind == 0, inside, outside)
    x = torch.where(kind == 2, code * s, x)
    x = torch.where(kind == 3, (code + 0.5) * s, x)
    return torch.where(kind == 4, torch.zeros_like(x), x)


def in_grid_mask(enc: Encoding, x: torch.Tensor, axis) -> torch.Tensor:
    return (x >= bview(enc.min, x, axis)) & (x <= bview(enc.max, x, axis))


# ----------------------------------------------------------------------------------------------
# properties
# ----------------------------------------------------------------------------------------------
@PROPERTY
@given(cases())
def test_zero_is_exactly_representable(case):
    """0.0 is on every grid: fake_quantize(0) == 0 exactly and quantize(0) == -offset."""
    enc, x, axis, _ = case
    zeros = torch.zeros_like(x)
    assert torch.equal(enc.fake_quantize(zeros), zeros)
    q = enc.quantize(zeros)
    assert torch.equal(q, (-bview(enc.offset, x, axis)).to(q.dtype).expand_as(q))
    assert bool(torch.all(enc.min <= 0)) and bool(torch.all(enc.max >= 0))


@pytest.mark.parametrize("lo", [-4.0, -1.0, -3.7, -1e-3, -123.4])
def test_zero_stays_on_the_grid_for_all_negative_ranges(lo):
    """Asymmetric ranges [lo, 0] put the offset at its bound -qmax; 0 must stay on the grid
    at every bitwidth, also beyond 2^24 steps where float32 cannot hold -qmax itself."""
    for bitwidth in range(4, 32):
        enc = make_encoding("asymmetric", bitwidth, lo, 0.0)
        assert 0 <= -int(enc.offset) <= enc.qmax, bitwidth
        assert float(enc.fake_quantize(torch.tensor(0.0))) == 0.0, bitwidth
        assert float(enc.max) >= 0.0


@PROPERTY
@given(cases())
def test_codes_are_integers_on_the_grid(case):
    """quantize() returns integral codes within [qmin, qmax], whatever the input (incl. +-1e30)."""
    enc, x, axis, _ = case
    x = torch.cat([x, torch.full_like(x, 1e30), torch.full_like(x, -1e30)], dim=-1)
    q = enc.quantize(x)
    assert torch.equal(q, torch.round(q))
    assert int(q.min()) >= enc.qmin and int(q.max()) <= enc.qmax
    assert (enc.qmin, enc.qmax) == integer_grid(enc.bitwidth, enc.symmetric, enc.strict,
                                                enc.unsigned)


@PROPERTY
@given(cases())
def test_dequantize_of_quantize_equals_fake_quantize(case):
    """dequantize(quantize(x)) == fake_quantize(x) (float32 inputs; one formula, two paths)."""
    enc, x, _, _ = case
    assert torch.equal(enc.dequantize(enc.quantize(x)).to(torch.float32), enc.fake_quantize(x))


def test_wide_grid_ends_equal_saturated_qdq():
    """At 25 bits ``offset + qmax`` needs 25 significant bits: min/max must be computed in the
    grid's float64 precision like qdq itself, not rounded in float32 (found by hypothesis)."""
    enc = Encoding.from_range(torch.tensor([-9329.3, -881930.0]), torch.tensor([1166.1, 448761.7]),
                              bitwidth=25, axis=0)
    probe = torch.ones(2, 1)
    assert torch.equal(enc.fake_quantize(probe * 1e30).reshape(2), enc.max)
    assert torch.equal(enc.fake_quantize(probe * -1e30).reshape(2), enc.min)
    float32_end = enc.scale * (enc.offset + enc.qmax)  # the old, rounded computation
    assert not torch.equal(float32_end, enc.max)


@PROPERTY
@given(cases())
def test_error_at_most_half_a_step_inside_the_grid(case):
    """Inside [min, max]: |x - qdq(x)| <= scale/2 + 4 * 2^-24 * |x| (float32 rounding, see
    the module docstring). Beyond the grid, qdq saturates: every input above it gives the
    output of +1e30, which is exactly enc.max at every bitwidth (both are computed in the
    grid's compute precision), and likewise below."""
    enc, x, axis, _ = case
    y = enc.fake_quantize(x)
    s = bview(enc.scale, x, axis).double()
    err = (x.double() - y.double()).abs()
    bound = s / 2 + ERR_ULPS * x.double().abs()
    inside = in_grid_mask(enc, x, axis)
    assert bool(torch.all((err <= bound) | ~inside)), float((err - bound)[inside].max())
    lo, hi = bview(enc.min, x, axis).double(), bview(enc.max, x, axis).double()
    margin = s + 2.0**-22 * torch.maximum(lo.abs(), hi.abs())  # clear of the float32 grid ends
    above, below = x.double() > hi + margin, x.double() < lo - margin
    probe = bview(torch.ones_like(enc.scale), x, axis)
    top, bottom = enc.fake_quantize(probe * 1e30), enc.fake_quantize(probe * -1e30)
    assert torch.equal(y[above], top.expand_as(y)[above])
    assert torch.equal(y[below], bottom.expand_as(y)[below])
    top, bottom = top.reshape(enc.max.shape), bottom.reshape(enc.min.shape)
    assert torch.equal(top, enc.max) and torch.equal(bottom, enc.min)


@PROPERTY
@given(cases())
def test_fake_quantize_is_idempotent(case):
    """qdq(qdq(x)) == qdq(x) bit for bit, inside and outside the grid, at every bitwidth."""
    enc, x, _, _ = case
    y = enc.fake_quantize(x)
    assert torch.equal(enc.fake_quantize(y), y)


@pytest.mark.parametrize("kind", KINDS)
def test_fake_quantize_is_idempotent_at_every_bitwidth(kind):
    """qdq(qdq(x)) == qdq(x) for 64 random ranges (one per channel) per bitwidth 4..31, with
    inputs at and beyond the grid ends, where codes are largest and x / s least precise."""
    g = torch.Generator().manual_seed(99)
    channels = 64
    for bitwidth in range(4, 32):
        mag = 10.0 ** torch.randint(-4, 5, (channels,), generator=g).float()
        a, b = (torch.rand(channels, generator=g) * mag for _ in range(2))
        lo, hi = (torch.minimum(a, b), torch.maximum(a, b)) if kind == "unsigned" else (-a, b)
        enc = make_encoding(kind, bitwidth, lo, hi, axis=0)
        ends = torch.stack([enc.min, enc.max], dim=1)
        x = torch.cat([ends, ends * 1.5, ends * (1 - 1e-6), ends * (1 - 1e-3),
                       sample_inputs(enc, (channels,), 0, g, reps=32)], dim=1)
        y = enc.fake_quantize(x)
        assert torch.equal(enc.fake_quantize(y), y), bitwidth


@PROPERTY
@given(cases(per_channel=True))
def test_per_channel_equals_per_tensor_slice_by_slice(case):
    """A per-channel encoding is C per-tensor encodings: quantize and qdq of each slice with
    that channel's (scale, offset) are bit-identical to the per-channel result."""
    enc, x, axis, _ = case
    y = enc.fake_quantize(x)
    q = enc.quantize(x)
    for c in range(enc.scale.numel()):
        one = Encoding(enc.bitwidth, enc.scale[c], enc.offset[c], enc.symmetric, enc.strict,
                       enc.unsigned)
        xs = x.select(axis, c)
        assert torch.equal(one.fake_quantize(xs), y.select(axis, c))
        assert torch.equal(one.quantize(xs), q.select(axis, c))


@PROPERTY
@given(cases())
def test_from_range_of_raw_data_per_channel_matches_per_tensor(case):
    """from_range with per-channel (min, max) of raw data equals per-tensor from_range channel by
    channel: same scale and offset bit for bit (unsigned symmetric on non-negative data)."""
    enc, x, axis, g = case
    if axis is None:
        return
    kind = ("unsigned" if enc.unsigned else "strict" if enc.strict
            else "symmetric" if enc.symmetric else "asymmetric")
    data = x.movedim(axis, 0).reshape(x.shape[axis], -1)
    data = data.abs() if kind == "unsigned" else data
    lo, hi = data.amin(dim=1), data.amax(dim=1)
    per_channel = make_encoding(kind, enc.bitwidth, lo, hi, axis)
    for c in range(lo.numel()):
        per_tensor = make_encoding(kind, enc.bitwidth, lo[c], hi[c])
        assert per_tensor.unsigned == per_channel.unsigned
        assert float(per_tensor.scale) == float(per_channel.scale[c])
        assert float(per_tensor.offset) == float(per_channel.offset[c])


@PROPERTY
@given(kind=st.sampled_from(KINDS), bitwidth=st.integers(4, 31),
       value=st.floats(-1e6, 1e6, width=32, allow_subnormal=False))
def test_degenerate_range_gives_valid_encoding(kind, bitwidth, value):
    """min == max (any value) gives a finite scale > 0 and a grid holding 0 and the value."""
    if kind == "unsigned":
        value = abs(value)
    enc = make_encoding(kind, bitwidth, value, value)
    assert math.isfinite(float(enc.scale)) and float(enc.scale) >= MINIMUM_SCALE
    assert float(enc.fake_quantize(torch.tensor(0.0))) == 0.0
    x = torch.tensor(value)
    err = abs(float(enc.fake_quantize(x)) - value)
    assert err <= float(enc.scale) / 2 + ERR_ULPS * abs(value)


@pytest.mark.parametrize("kind", KINDS)
def test_all_zero_range_gives_minimum_scale(kind):
    """An all-zero tensor (dead channel) gets scale == MINIMUM_SCALE == 2^-23 exactly, at every
    bitwidth, per tensor and per channel (FORMATS §2.2: seen in a real 1.0.0 file)."""
    assert MINIMUM_SCALE == 1.1920928955078125e-07
    for bitwidth in range(4, 32):
        enc = make_encoding(kind, bitwidth, 0.0, 0.0)
        assert float(enc.scale) == 1.1920928955078125e-07, bitwidth
        assert float(enc.fake_quantize(torch.tensor(0.0))) == 0.0
        pc = make_encoding(kind, bitwidth, torch.tensor([0.0, -1.0]), torch.tensor([0.0, 1.0]),
                           axis=0) if kind != "unsigned" else make_encoding(
            kind, bitwidth, torch.tensor([0.0, 0.0]), torch.tensor([0.0, 1.0]), axis=0)
        assert float(pc.scale[0]) == 1.1920928955078125e-07


def test_infinite_range_end_is_clamped_to_float32():
    """An infinite end of an asymmetric range is clamped to float32 max: finite scale, 0 exact.
    (A symmetric grid over +-float32 max overflows (max' - min') and is refused by Encoding.)"""
    for lo, hi in ((-math.inf, 1.0), (-1.0, math.inf)):
        enc = Encoding.from_range(torch.tensor(lo), torch.tensor(hi), 8)
        assert math.isfinite(float(enc.scale)) and float(enc.scale) > 0
        assert float(enc.fake_quantize(torch.tensor(0.0))) == 0.0


# ----------------------------------------------------------------------------------------------
# stochastic rounding
# ----------------------------------------------------------------------------------------------
@PROPERTY
@given(cases())
def test_stochastic_rounding_picks_a_neighbouring_grid_point(case):
    """Stochastic codes are floor(x/s) or floor(x/s) + 1 (then clamped to the grid)."""
    enc, x, axis, g = case
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (), generator=g)))
    q = enc.quantize(x, rounding="stochastic").double()
    o = bview(enc.offset, x, axis).double()

    def is_neighbour(dtype):  # x/s is computed in float32 or float64, depending on the grid
        v = (x.to(dtype) / bview(enc.scale, x, axis).to(dtype)).double()
        lo = torch.clamp(torch.floor(v) - o, enc.qmin, enc.qmax)
        hi = torch.clamp(torch.floor(v) + 1 - o, enc.qmin, enc.qmax)
        return (q == lo) | (q == hi)

    ok = (q == torch.round(q)) & (is_neighbour(torch.float32) | is_neighbour(torch.float64))
    assert bool(ok.all()), (x[~ok].tolist(), q[~ok].tolist())
    y = enc.fake_quantize(x, rounding="stochastic")
    nearest = enc.fake_quantize(x)
    s = bview(enc.scale, x, axis).double()
    assert bool(torch.all((y.double() - nearest.double()).abs() <= s * (1 + 2**-20)
                          + ERR_ULPS * x.double().abs()))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bitwidth", [4, 8, 16])
def test_stochastic_rounding_is_unbiased(kind, bitwidth):
    """The mean of many stochastic qdq of a fixed value is the value (seeded; 6 sigma), and
    every sample is one of its two neighbouring grid points."""
    enc = make_encoding(kind, bitwidth, 0.0 if kind == "unsigned" else -1.0, 2.0)
    s = float(enc.scale)
    torch.manual_seed(1234)
    n = 40_000
    for frac in (0.0, 0.1, 0.5, 0.77):
        x = torch.tensor((3 + frac) * s, dtype=torch.float32)
        y = enc.fake_quantize(x.expand(n).contiguous(), rounding="stochastic")
        below = enc.fake_quantize(torch.tensor(3 * s))
        above = enc.fake_quantize(torch.tensor(4 * s))
        assert bool(torch.all((y == below) | (y == above)))
        p = float(x) / s - 3
        sigma = s * math.sqrt(max(p * (1 - p), 1e-12) / n)
        assert abs(float(y.double().mean()) - float(x)) <= 6 * sigma + 1e-6 * s
        if frac == 0.0:
            assert bool(torch.all(y == below))


# ----------------------------------------------------------------------------------------------
# golden vectors (FORMATS §2.3 / §2.4, aimet-torch 2.x peer files)
# ----------------------------------------------------------------------------------------------
def test_peer_vector_symmetric_weight():
    """conv1.weight ch 0: min -0.18642368912696838 -> scale 0.0014564350713044405 (= |min|/128),
    min' = min exactly, max' = 0.1849672496318817, legacy offset -128 (FORMATS §2.4)."""
    enc = Encoding.from_range(torch.tensor(-0.18642368912696838), torch.tensor(0.1), 8,
                              symmetric=True)
    assert float(enc.scale) == 0.0014564350713044405
    assert float(enc.min) == -0.18642368912696838
    assert float(enc.max) == 0.1849672496318817
    assert int(enc.offset) == 0 and int(enc.legacy_offset) == -128
    per_channel = Encoding.from_range(torch.tensor([-0.18642368912696838, -0.5]),
                                      torch.tensor([0.1, 0.2]), 8, symmetric=True, axis=0)
    assert float(per_channel.scale[0]) == 0.0014564350713044405


def test_peer_vector_tf_asymmetric():
    """tf scheme fc.output raw (-0.31027406, 0.49538109) -> scale 0.003159431740641594,
    offset -98 (FORMATS §2.3)."""
    enc = Encoding.from_range(torch.tensor(-0.31027406), torch.tensor(0.49538109), 8)
    assert float(enc.scale) == 0.003159431740641594
    assert int(enc.offset) == -98 and int(enc.legacy_offset) == -98
    assert (enc.qmin, enc.qmax) == (0, 255)


def test_peer_vector_grid_ends():
    """Grid ends of peer encodings: s=0.030594557523727417, o=-128 -> min' -3.9161033630371094,
    max' 3.8855088; s=0.0031666315626353025, o=-98 -> min' -0.3103299, max' 0.4971612."""
    enc = Encoding(8, torch.tensor(0.030594557523727417), torch.tensor(-128.0))
    assert float(enc.min) == -3.9161033630371094
    # the 7-digit values are as printed in FORMATS: equal to within half a unit of the last digit
    assert math.isclose(float(enc.max), 3.8855088, rel_tol=0, abs_tol=1e-7)
    enc = Encoding(8, torch.tensor(0.0031666315626353025), torch.tensor(-98.0))
    assert math.isclose(float(enc.min), -0.3103299, rel_tol=0, abs_tol=1e-7)
    assert math.isclose(float(enc.max), 0.4971612, rel_tol=0, abs_tol=1e-7)


@PROPERTY
@given(bitwidth=st.integers(4, 31), strict=st.booleans(),
       lo=st.floats(-1e4, 0, width=32), hi=st.floats(0, 1e4, width=32))
def test_symmetric_scale_is_max_of_both_sides(bitwidth, strict, lo, hi):
    """v2 symmetric rule: delta = max(max/pos, -min/neg); the grid ends are -neg*delta and
    pos*delta and scale = (max' - min')/N in float32 (aimet-torch 2.x recomputes the scale from
    the grid ends), which is delta to within 1 float32 ulp. Ranges narrower than N * 2^-23 are
    widened first (test_all_zero_range...), so they are left out here."""
    steps = 2**bitwidth - 1 - int(strict)
    pos, neg = steps // 2, (steps + 1) // 2
    if (hi - lo) / steps < 2 * MINIMUM_SCALE:
        return
    enc = Encoding.from_range(torch.tensor(lo), torch.tensor(hi), bitwidth, symmetric=True,
                              strict=strict)
    t_lo, t_hi = torch.tensor(lo, dtype=torch.float32), torch.tensor(hi, dtype=torch.float32)
    delta = torch.maximum(t_hi / pos, -t_lo / neg)
    assert float(enc.scale) == float((pos * delta - (-neg * delta)) / steps)
    ulp = float(torch.nextafter(delta, torch.tensor(math.inf)) - delta)
    assert abs(float(enc.scale) - float(delta)) <= ulp
    assert int(enc.offset) == 0
    assert int(enc.legacy_offset) == -neg


@pytest.mark.parametrize("bitwidth", [4, 8, 16, 31])
def test_legacy_offset(bitwidth):
    """Unsigned-view offsets: symmetric -2^(b-1) (-128 at 8 bit), strict -(2^(b-1)-1) (-127),
    unsigned symmetric 0, asymmetric = internal offset."""
    half = 2 ** (bitwidth - 1)
    sym = make_encoding("symmetric", bitwidth, -1.0, 1.0)
    strict = make_encoding("strict", bitwidth, -1.0, 1.0)
    unsigned = make_encoding("unsigned", bitwidth, 0.0, 1.0)
    asym = make_encoding("asymmetric", bitwidth, -1.0, 3.0)
    assert int(sym.legacy_offset) == -half and (sym.qmin, sym.qmax) == (-half, half - 1)
    assert int(strict.legacy_offset) == -(half - 1)
    assert (strict.qmin, strict.qmax) == (-(half - 1), half - 1)
    assert int(unsigned.legacy_offset) == 0 and unsigned.unsigned
    assert (unsigned.qmin, unsigned.qmax) == (0, 2 * half - 1)
    assert int(asym.legacy_offset) == int(asym.offset) < 0
    if bitwidth == 8:
        assert (int(sym.legacy_offset), int(strict.legacy_offset)) == (-128, -127)
        assert int(asym.offset) == -64


def test_unsigned_symmetric_falls_back_to_signed_for_negative_data():
    """unsigned_symmetric applies only when min >= 0 (in every channel); else the signed rule."""
    enc = Encoding.from_range(torch.tensor(-0.1), torch.tensor(1.0), 8, symmetric=True,
                              unsigned_symmetric=True)
    assert not enc.unsigned and (enc.qmin, enc.qmax) == (-128, 127)
    enc = Encoding.from_range(torch.tensor(0.0), torch.tensor(1.0), 8, symmetric=True,
                              unsigned_symmetric=True)
    assert enc.unsigned and float(enc.scale) == float(torch.tensor(1.0) / 255)
    enc = Encoding.from_range(torch.tensor([0.0, -1.0]), torch.tensor([1.0, 1.0]), 8,
                              symmetric=True, unsigned_symmetric=True, axis=0)
    assert not enc.unsigned


# ----------------------------------------------------------------------------------------------
# value semantics
# ----------------------------------------------------------------------------------------------
@PROPERTY
@given(cases())
def test_to_dict_from_dict_round_trip(case):
    """Encoding.from_dict(to_dict()) == the encoding, also through JSON text; same qdq."""
    enc, x, _, _ = case
    d = enc.to_dict()
    again = Encoding.from_dict(json.loads(json.dumps(d)))
    assert again == enc and again.to_dict() == d
    assert torch.equal(again.scale, enc.scale) and torch.equal(again.offset, enc.offset)
    assert torch.equal(again.fake_quantize(x), enc.fake_quantize(x))


def test_float_encoding_round_trip_and_equality():
    """The fp16 encoding round-trips and equals only itself."""
    f = Encoding.float16()
    assert Encoding.from_dict(f.to_dict()) == f and f.is_float
    assert f != make_encoding("asymmetric", 16, -1.0, 1.0)
    assert repr(f) == "Encoding(float16)"


def test_encoding_equality():
    """Equality is by value: same settings and bit-identical scale/offset; any change differs."""
    base = Encoding(8, torch.tensor(0.1), torch.tensor(-3.0))
    assert base == Encoding(8, 0.1, -3.0)
    assert base != Encoding(8, torch.nextafter(torch.tensor(0.1), torch.tensor(1.0)), -3.0)
    assert base != Encoding(8, 0.1, -4.0)
    assert base != Encoding(16, 0.1, -3.0)
    assert base != Encoding(8, 0.1, 0.0, symmetric=True)
    assert Encoding(8, 0.1, 0.0, symmetric=True) != Encoding(8, 0.1, 0.0, symmetric=True,
                                                             strict=True)
    pc = Encoding(8, torch.tensor([0.1, 0.2]), torch.tensor([0.0, 0.0]), True, axis=0)
    assert pc == Encoding(8, torch.tensor([0.1, 0.2]), torch.tensor([0.0, 0.0]), True, axis=0)
    assert pc != Encoding(8, torch.tensor([0.1, 0.2]), torch.tensor([0.0, 0.0]), True, axis=1)
    assert (base == "not an encoding") is False
    with pytest.raises(dataclasses.FrozenInstanceError):
        base.bitwidth = 4


def test_repr_is_readable():
    """repr shows bitwidth, kind and the numbers (per tensor) or the channel count."""
    text = repr(Encoding.from_range(torch.tensor(-1.0), torch.tensor(2.0), 8))
    assert "int8" in text and "asym" in text and "offset=-85" in text
    pc = Encoding.from_range(torch.tensor([-1.0, -2.0]), torch.tensor([1.0, 2.0]), 4,
                             symmetric=True, axis=0)
    assert "axis=0" in repr(pc) and "2 channels" in repr(pc)


# ----------------------------------------------------------------------------------------------
# gradients (FORMATS §2.7)
# ----------------------------------------------------------------------------------------------
def _small_case(per_channel: bool):
    torch.manual_seed(7)
    if per_channel:
        x = torch.randn(3, 6) * 2
        scale = torch.tensor([0.05, 0.1, 0.2])
        offset = torch.tensor([-128.0, -100.0, -20.0])
        axis = 0
    else:
        x = torch.randn(12) * 2
        scale, offset, axis = torch.tensor(0.05), torch.tensor(-100.0), None
    x[..., 0] = 100.0   # far above the grid
    x[..., 1] = -100.0  # far below the grid
    return x, scale, offset, axis


@pytest.mark.parametrize("per_channel", [False, True])
def test_straight_through_input_gradient(per_channel):
    """dL/dx = upstream gradient inside the grid, 0 outside (STE)."""
    x, scale, offset, axis = _small_case(per_channel)
    x = x.requires_grad_()
    g = torch.randn_like(x)
    fake_quantize(x, scale, offset, 0, 255, axis).backward(g)
    s, o = bview(scale, x, axis), bview(offset, x, axis)
    code = torch.round(x.detach() / s) - o
    inside = (code >= 0) & (code <= 255)
    assert bool((~inside).any()) and bool(inside.any())
    assert torch.equal(x.grad, torch.where(inside, g, torch.zeros_like(g)))


@pytest.mark.parametrize("per_channel", [False, True])
def test_lsq_scale_and_offset_gradients_match_closed_form(per_channel):
    """d/ds = sum g * (clamp(round(x/s), o+qmin, o+qmax) - x/s * inside) and
    d/do = sum g * s * (1 - inside), summed per channel; also equal to autograd through the
    straight-through expression clamp(round_ste(x/s), o+qmin, o+qmax) * s."""
    x, scale, offset, axis = _small_case(per_channel)
    scale = scale.clone().requires_grad_()
    offset = offset.clone().requires_grad_()
    g = torch.randn_like(x)
    y = fake_quantize(x, scale, offset, 0, 255, axis)
    y.backward(g)
    assert torch.isfinite(scale.grad).all() and torch.isfinite(offset.grad).all()

    xd, gd = x.double(), g.double()
    s, o = bview(scale.detach().double(), x, axis), bview(offset.detach().double(), x, axis)
    v = xd / s
    inside = ((torch.round(v) - o) >= 0) & ((torch.round(v) - o) <= 255)
    ds = gd * (torch.clamp(torch.round(v), o, o + 255) - v * inside)
    do = gd * s * (~inside)
    reduce = (lambda t: t.sum()) if axis is None else (lambda t: t.sum(dim=1))
    torch.testing.assert_close(scale.grad.double(), reduce(ds), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(offset.grad.double(), reduce(do), rtol=1e-5, atol=1e-6)

    # the same through plain autograd with a straight-through round (float64)
    s2 = scale.detach().double().requires_grad_()
    o2 = offset.detach().double().requires_grad_()
    sv, ov = bview(s2, x, axis), bview(o2, x, axis)
    v2 = xd / sv
    r = v2 + (torch.round(v2) - v2).detach()
    q = torch.maximum(torch.minimum(r - ov, torch.tensor(255.0, dtype=torch.float64)),
                      torch.tensor(0.0, dtype=torch.float64))
    ((q + ov) * sv * gd).sum().backward()
    torch.testing.assert_close(scale.grad.double(), s2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(offset.grad.double(), o2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y.detach().double(), ((q + ov) * sv).detach(), rtol=0, atol=1e-6)


def test_gradients_on_float16_input_keep_dtype():
    """A float16 input gets a float16 output and a float16 gradient."""
    x = (torch.randn(20) * 3).half().requires_grad_()
    enc = Encoding.from_range(torch.tensor(-1.0), torch.tensor(1.0), 8)
    y = fake_quantize(x, enc.scale, enc.offset, enc.qmin, enc.qmax)
    assert y.dtype == torch.float16
    y.sum().backward()
    assert x.grad.dtype == torch.float16


# ----------------------------------------------------------------------------------------------
# the fused gradient pass against the op-by-op reference
# ----------------------------------------------------------------------------------------------
# The reference is the arithmetic as quantsim wrote it before the fused pass, kept here and
# nowhere in the package: the range becomes (scale, offset) through autograd ops (``round``
# straight-through), and one autograd node recomputes the STE/LSQ gradients from ``x``.
def _toward_zero(v: int) -> int:
    """The offset clamp bound: ``v`` rounded toward zero to a float32-exact integer."""
    drop = max(0, abs(v).bit_length() - 24)
    return int(math.copysign(abs(v) >> drop << drop, v))


def reference_scale_offset(lo, hi, qmin: int, qmax: int, symmetric: bool):
    """(scale, offset) of a learnable range, op by op under autograd."""
    scale = ((hi - lo) / (qmax - qmin)).clamp(min=MINIMUM_SCALE)
    if symmetric:
        return scale, torch.zeros_like(scale)
    ratio = lo / scale
    offset = ratio + (torch.round(ratio) - ratio).detach() - qmin
    return scale, offset.clamp(_toward_zero(-qmax), _toward_zero(-qmin))


def _reference_dtype(qmin: int, qmax: int) -> torch.dtype:
    return torch.float32 if qmax - qmin <= 2**21 else torch.float64


def _reduce(t: torch.Tensor, axis, shape) -> torch.Tensor:
    if len(shape) == 0:
        return t.sum()
    return t.movedim(axis, 0).reshape(t.shape[axis], -1).sum(dim=1)


class ReferenceFakeQuantize(torch.autograd.Function):
    """qdq (nearest) with the STE input gradient and the LSQ scale / offset gradients."""

    @staticmethod
    def forward(ctx, x, scale, offset, qmin, qmax, axis):  # noqa: D102
        dtype = _reference_dtype(qmin, qmax)
        s = bview(scale.detach().to(dtype), x, axis)
        o = bview(offset.detach().to(dtype), x, axis)
        ctx.save_for_backward(x, scale, offset)
        ctx.grid = (qmin, qmax, axis)
        return (torch.round(x.to(dtype) / s).clamp(o + qmin, o + qmax) * s).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        x, scale, offset = ctx.saved_tensors
        qmin, qmax, axis = ctx.grid
        dtype = _reference_dtype(qmin, qmax)
        s = bview(scale.detach().to(dtype), x, axis)
        o = bview(offset.detach().to(dtype), x, axis)
        lo, hi = o + qmin, o + qmax
        v = x.detach().to(dtype) / s
        r = torch.round(v)
        inside = (r >= lo) & (r <= hi)
        g = grad.to(dtype)
        g_inside = torch.where(inside, g, 0.0)
        ds = torch.where(inside, r - v, r.clamp(lo, hi))
        grad_s = _reduce(g * ds, axis, scale.shape).reshape(scale.shape).to(scale.dtype)
        outside = _reduce(g - g_inside, axis, offset.shape).reshape(offset.shape)
        grad_o = (outside * scale.detach().to(dtype)).to(offset.dtype)
        return g_inside.to(x.dtype), grad_s, grad_o, None, None, None


def reference_range_grads(x, lo, hi, qmin, qmax, symmetric, axis, grad):
    """(dx, dmin, dmax) of the reference, and the (scale, offset) it derived."""
    x, lo, hi = (t.detach().clone().requires_grad_() for t in (x, lo, hi))
    scale, offset = reference_scale_offset(lo, hi, qmin, qmax, symmetric)
    ReferenceFakeQuantize.apply(x, scale, offset, qmin, qmax, axis).backward(grad)
    return x.grad, lo.grad, hi.grad, scale.detach(), offset.detach()


def gradient_tolerance(x, scale, offset, qmin, qmax, axis, grad, symmetric, lo):
    """Bounds on |fused - reference| for (dmin, dmax) from float arithmetic alone.

    The two differ only in the order of the sums over the elements that share a scale (any
    order of ``n`` float additions is within ``(n - 1) u sum|terms|`` of the exact sum, so two
    orders are within twice that) and in the order of the few float ops that carry the sums to
    ``min`` / ``max`` (a few ``u`` of the magnitudes involved each)."""
    dtype = _reference_dtype(qmin, qmax)
    u = 2.0**-24 if dtype == torch.float32 else 2.0**-53
    u32 = 2.0**-24
    s = bview(scale.detach().to(dtype), x, axis)
    o = bview(offset.detach().to(dtype), x, axis)
    v = x.detach().to(dtype) / s
    r = torch.round(v)
    inside = (r >= o + qmin) & (r <= o + qmax)
    ds = torch.where(inside, r - v, r.clamp(o + qmin, o + qmax)).double()
    g = grad.double()
    shape = scale.shape
    n = x.numel() // max(1, scale.numel())
    sum_abs_s = _reduce((g * ds).abs(), axis, shape).reshape(shape)
    sum_abs_o = _reduce((g * (~inside)).abs(), axis, shape).reshape(shape)
    sd = scale.detach().double()
    g_s = _reduce(g * ds, axis, shape).reshape(shape)
    g_o = _reduce(g * (~inside), axis, shape).reshape(shape) * sd
    e_s = 2 * n * u * sum_abs_s + u32 * g_s.abs()
    e_o = (2 * n * u * sum_abs_o + u32 * sum_abs_o) * sd + u32 * g_o.abs()
    steps = qmax - qmin
    if symmetric:
        e_max = (e_s + 4 * u32 * g_s.abs()) / steps
        return e_max, e_max
    ratio_s = (lo.detach().double() / sd) / sd
    e_max = (e_s + ratio_s.abs() * e_o + 8 * u32 * (g_s.abs() + (g_o * ratio_s).abs())) / steps
    e_min = e_o / sd + e_max + 8 * u32 * ((g_o / sd).abs() + (g_s.abs() + (g_o * ratio_s).abs())
                                         / steps)
    return e_min, e_max


@st.composite
def range_cases(draw):
    """A learnable range as training leaves it: an encoding's ends moved by random factors
    (sometimes crossed or collapsed below the minimum scale), inputs around it, and a grid."""
    enc, x, axis, g = draw(cases())
    symmetric = enc.symmetric and not enc.unsigned
    lo, hi = enc.min.clone(), enc.max.clone()
    how = draw(st.sampled_from(["aligned", "moved", "moved", "crossed", "collapsed"]))
    if how == "moved":
        lo = lo * (0.5 + torch.rand(lo.shape, generator=g)) - 0.01 * torch.rand(lo.shape,
                                                                                generator=g)
        hi = hi * (0.5 + torch.rand(hi.shape, generator=g)) + 0.01 * torch.rand(hi.shape,
                                                                                generator=g)
    elif how == "crossed":
        lo, hi = hi.abs() + 0.5, -lo.abs() - 0.25
    elif how == "collapsed":
        hi = lo + MINIMUM_SCALE * torch.rand(lo.shape, generator=g)
    dtype = draw(st.sampled_from([torch.float32, torch.float32, torch.float16]))
    if dtype == torch.float16:
        x = x.clamp(-6e4, 6e4)
    rounding = draw(st.sampled_from(["nearest", "nearest", "stochastic"]))
    grad = torch.randn(x.shape, generator=g).to(dtype)
    return x.to(dtype), lo, hi, enc.qmin, enc.qmax, symmetric, axis, grad, rounding


def _check_against_reference(x, lo, hi, qmin, qmax, symmetric, axis, grad, dx, dmin, dmax):
    ref_dx, ref_min, ref_max, scale, offset = reference_range_grads(
        x, lo, hi, qmin, qmax, symmetric, axis, grad)
    assert dx.dtype == x.dtype and dmin.shape == lo.shape and dmax.shape == hi.shape
    assert torch.equal(dx, ref_dx)  # g where on the grid, 0 elsewhere: no arithmetic
    e_min, e_max = gradient_tolerance(x, scale, offset, qmin, qmax, axis, grad, symmetric, lo)
    assert bool(((dmin.double() - ref_min.double()).abs() <= e_min).all()), (dmin, ref_min, e_min)
    assert bool(((dmax.double() - ref_max.double()).abs() <= e_max).all()), (dmax, ref_max, e_max)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(range_cases())
def test_range_learning_gradients_match_op_by_op_reference(case):
    """fake_quantize_range's one fused node gives the op-by-op reference's gradients: dx
    exactly, dmin / dmax within the float32 rounding of their sums; the values are those of
    fake_quantize with the derived encoding, bit for bit. Every grid kind, bitwidths 4..31
    (float64 arithmetic beyond 21 bits), per tensor and per channel, float16 inputs,
    stochastic rounding (its gradients use the nearest code, as before)."""
    x, lo, hi, qmin, qmax, symmetric, axis, grad, rounding = case
    xr, lor, hir = (t.clone().requires_grad_() for t in (x, lo, hi))
    torch.manual_seed(0)
    y = fake_quantize_range(xr, lor, hir, qmin, qmax, symmetric, axis, rounding)
    y.backward(grad)
    scale, offset = scale_offset_from_range(lo, hi, qmin, qmax, symmetric)
    torch.manual_seed(0)
    assert torch.equal(y.detach(), fake_quantize(x, scale, offset, qmin, qmax, axis, rounding))
    _check_against_reference(x, lo, hi, qmin, qmax, symmetric, axis, grad,
                             xr.grad, lor.grad, hir.grad)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(range_cases())
def test_scale_offset_gradients_match_reference(case):
    """fake_quantize with a trainable (scale, offset) pair (the QAT modules' use) gives the
    reference's dx exactly and its d scale / d offset within float32 summation rounding."""
    x, lo, hi, qmin, qmax, symmetric, axis, grad, _ = case
    scale, offset = scale_offset_from_range(lo, hi, qmin, qmax, symmetric)
    xr, sr, orr = (t.clone().requires_grad_() for t in (x, scale, offset))
    fake_quantize(xr, sr, orr, qmin, qmax, axis).backward(grad)
    xf, sf, of = (t.clone().requires_grad_() for t in (x, scale, offset))
    ReferenceFakeQuantize.apply(xf, sf, of, qmin, qmax, axis).backward(grad)
    assert torch.equal(xr.grad, xf.grad)
    dtype = _reference_dtype(qmin, qmax)
    u = 2.0**-24 if dtype == torch.float32 else 2.0**-53
    n = x.numel() // max(1, scale.numel())
    s = bview(scale.to(dtype), x, axis)
    o = bview(offset.to(dtype), x, axis)
    v = x.to(dtype) / s
    r = torch.round(v)
    inside = (r >= o + qmin) & (r <= o + qmax)
    ds = torch.where(inside, r - v, r.clamp(o + qmin, o + qmax)).double()
    g = grad.double()
    bound_s = _reduce((g * ds).abs(), axis, scale.shape).reshape(scale.shape)
    bound_o = _reduce((g * (~inside)).abs(), axis, scale.shape).reshape(scale.shape)
    tol_s = 2 * n * u * bound_s + 2.0**-24 * sf.grad.double().abs()
    tol_o = (2 * n * u * bound_o) * scale.double() + 2.0**-24 * of.grad.double().abs()
    assert bool(((sr.grad.double() - sf.grad.double()).abs() <= tol_s).all())
    assert bool(((orr.grad.double() - of.grad.double()).abs() <= tol_o).all())


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(range_cases())
def test_scale_offset_from_range_gradients_match_reference(case):
    """scale_offset_from_range as one autograd node (what the QAT modules train through):
    the reference's values bit for bit and its d/dmin, d/dmax for any upstream gradients
    within a few float32 roundings of the terms (the same ops, the same order)."""
    _, lo, hi, qmin, qmax, symmetric, _, _, _ = case
    g = torch.Generator().manual_seed(int(qmax) % 1000)
    g_s, g_o = torch.randn(lo.shape, generator=g), torch.randn(lo.shape, generator=g)
    results = []
    for derive in (scale_offset_from_range, reference_scale_offset):
        lor, hir = lo.clone().requires_grad_(), hi.clone().requires_grad_()
        scale, offset = derive(lor, hir, qmin, qmax, symmetric)
        ((scale * g_s).sum() + (offset * g_o).sum()).backward()
        results.append((scale.detach(), offset.detach(), lor.grad, hir.grad))
    (s1, o1, dmin1, dmax1), (s2, o2, dmin2, dmax2) = results
    assert torch.equal(s1, s2) and torch.equal(o1, o2)
    ratio_s = (lo.double() / s2.double()).abs() / s2.double()
    terms = g_s.double().abs() + (g_o.double() * ratio_s).abs()
    tol_max = 4 * 2.0**-24 * terms / (qmax - qmin)
    tol_min = tol_max + 4 * 2.0**-24 * (g_o.double() / s2.double()).abs()
    assert bool(((dmax1.double() - dmax2.double()).abs() <= tol_max).all())
    assert bool(((dmin1.double() - dmin2.double()).abs() <= tol_min).all())


@pytest.mark.parametrize("learn_x,learn_range", [(True, False), (False, True)])
def test_range_learning_with_frozen_inputs(learn_x, learn_range):
    """Only what requires a gradient gets one: a frozen range (x trains) or a constant input
    (an input quantizer on the model's input: the range trains), each as the reference."""
    torch.manual_seed(3)
    qmin, qmax = integer_grid(8, symmetric=False)
    x = torch.randn(4, 6) * 2
    lo, hi = torch.tensor([-1.0, -2.0, -0.5, -3.0]), torch.tensor([1.0, 0.5, 2.5, 3.0])
    grad = torch.randn(4, 6)
    xr = x.clone().requires_grad_(learn_x)
    lor, hir = lo.clone().requires_grad_(learn_range), hi.clone().requires_grad_(learn_range)
    fake_quantize_range(xr, lor, hir, qmin, qmax, False, 0).backward(grad)
    ref_dx, ref_min, ref_max, scale, offset = reference_range_grads(x, lo, hi, qmin, qmax,
                                                                    False, 0, grad)
    assert (xr.grad is not None) == learn_x and (lor.grad is not None) == learn_range
    if learn_x:
        assert torch.equal(xr.grad, ref_dx)
    else:
        e_min, e_max = gradient_tolerance(x, scale, offset, qmin, qmax, 0, grad, False, lo)
        assert bool(((lor.grad.double() - ref_min.double()).abs() <= e_min).all())
        assert bool(((hir.grad.double() - ref_max.double()).abs() <= e_max).all())


@pytest.mark.parametrize("symmetric", [False, True])
def test_range_gradients_of_infinite_and_nan_inputs(symmetric):
    """An infinite input clips: no input gradient, and its clipped code reaches the range as
    in the reference (finite); a NaN input gives no input gradient and NaN range gradients,
    as the reference does."""
    qmin, qmax = integer_grid(8, symmetric)
    lo, hi = torch.tensor(-1.5), torch.tensor(2.0)
    x = torch.tensor([float("inf"), -float("inf"), 0.3, -4.0, 1.2])
    grad = torch.tensor([0.5, -1.0, 2.0, 0.25, -0.75])
    xr, lor, hir = (t.clone().requires_grad_() for t in (x, lo, hi))
    fake_quantize_range(xr, lor, hir, qmin, qmax, symmetric).backward(grad)
    assert bool(torch.isfinite(lor.grad)) and bool(torch.isfinite(hir.grad))
    assert xr.grad.tolist()[:2] == [0.0, 0.0]
    _check_against_reference(x, lo, hi, qmin, qmax, symmetric, None, grad,
                             xr.grad, lor.grad, hir.grad)
    x[2] = float("nan")
    xr, lor, hir = (t.clone().requires_grad_() for t in (x, lo, hi))
    fake_quantize_range(xr, lor, hir, qmin, qmax, symmetric).backward(grad)
    ref_dx, ref_min, ref_max, _, _ = reference_range_grads(x, lo, hi, qmin, qmax, symmetric,
                                                           None, grad)
    assert torch.equal(xr.grad, ref_dx) and float(xr.grad[2]) == 0.0
    assert bool(torch.isnan(lor.grad)) and bool(torch.isnan(ref_min))
    assert bool(torch.isnan(hir.grad)) and bool(torch.isnan(ref_max))


@pytest.mark.parametrize("per_channel", [False, True])
def test_range_gradients_pass_gradcheck_where_smooth(per_channel):
    """Where the output is a smooth function of the range (a symmetric grid with every input
    clipped: ``qmin * s`` or ``qmax * s`` with ``s = (max - min) / N``; or a collapsed range
    held at the minimum scale), the fused gradients equal float64 finite differences. A 24-bit
    grid makes the arithmetic float64 throughout."""
    qmin, qmax = integer_grid(24, symmetric=True)
    if per_channel:
        lo = torch.tensor([-1.0, -2.0, -0.5], dtype=torch.float64)
        hi = torch.tensor([1.5, 2.0, 0.25], dtype=torch.float64)
        x = torch.tensor([[5.0, -7.0], [-9.0, 3.0], [3.0, -4.0]], dtype=torch.float64)
        axis = 0
    else:
        lo, hi = torch.tensor(-1.0, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64)
        x, axis = torch.tensor([5.0, -3.0, 9.0, -2.5], dtype=torch.float64), None
    for low, high in ((lo, hi), (lo, lo + 1e-9)):  # the second range sits on the scale floor
        args = tuple(t.clone().requires_grad_() for t in (x, low, high))
        assert torch.autograd.gradcheck(
            lambda x_, lo_, hi_: fake_quantize_range(x_, lo_, hi_, qmin, qmax, True, axis),
            args, eps=1e-7, atol=1e-9, rtol=1e-7)


@pytest.mark.parametrize("per_channel", [False, True])
def test_scale_offset_gradients_pass_gradcheck_where_smooth(per_channel):
    """With every input clipped, fake_quantize is ``(offset + qmin or qmax) * scale``, smooth in
    both: its LSQ gradients equal float64 finite differences (24-bit grid, float64)."""
    qmin, qmax = integer_grid(24, symmetric=False)
    if per_channel:  # grids [-500, 8.4e6] and [-1.25e6, 2.9e6]
        scale = torch.tensor([0.5, 0.25], dtype=torch.float64)
        offset = torch.tensor([-1000.0, -5e6], dtype=torch.float64)
        x = torch.tensor([[-600.0, 1e7, 9e6], [-2e6, 4e6, -1.3e6]], dtype=torch.float64)
        axis = 0
    else:
        scale, offset = (torch.tensor(0.5, dtype=torch.float64),
                         torch.tensor(-1000.0, dtype=torch.float64))
        x, axis = torch.tensor([-600.0, 1e7, -4e3], dtype=torch.float64), None
    args = tuple(t.clone().requires_grad_() for t in (x, scale, offset))
    # the outputs reach 8e6 (float64 ulp 2e-9): eps 1e-3 keeps the difference quotients
    # within ~1e-6 of the derivatives
    assert torch.autograd.gradcheck(
        lambda x_, s_, o_: fake_quantize(x_, s_, o_, qmin, qmax, axis), args,
        eps=1e-3, atol=1e-5, rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# ONNX Runtime parity
# ----------------------------------------------------------------------------------------------
try:
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
except ImportError:  # the rest of this file still runs
    ort = None
requires_ort = pytest.mark.skipif(ort is None, reason="needs onnx and onnxruntime")

ONNX_DTYPES = {} if ort is None else {
    ("int", 4): TensorProto.INT4, ("uint", 4): TensorProto.UINT4,
    ("int", 8): TensorProto.INT8, ("uint", 8): TensorProto.UINT8,
    ("int", 16): TensorProto.INT16, ("uint", 16): TensorProto.UINT16,
}


def ort_qdq(x: torch.Tensor, scale, zero_point, dtype, axis=None) -> torch.Tensor:
    """Run QuantizeLinear -> DequantizeLinear (opset 21, optimizations off) on ``x``."""
    scale = np.asarray(scale, dtype=np.float32)
    zp = np.asarray(zero_point, dtype=np.int64)
    kw = {} if axis is None else {"axis": axis}
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"], **kw),
             helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"], **kw)]
    inits = [numpy_helper.from_array(scale, "s"),
             helper.make_tensor("zp", dtype, list(zp.shape), zp.reshape(-1).tolist())]
    graph = helper.make_graph(
        nodes, "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x.shape))], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)],
                              ir_version=10)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(["y"], {"x": x.numpy()})[0])


def onnx_mapping(enc: Encoding, signed_activations: bool = False):
    """(dtype, y_zero_point) of an encoding per FORMATS §4.4 (from the legacy offset)."""
    legacy = enc.legacy_offset.to(torch.int64)
    half = 2 ** (enc.bitwidth - 1)
    if enc.symmetric and not enc.unsigned:
        return ONNX_DTYPES[("int", enc.bitwidth)], -legacy - half  # 0
    if signed_activations:
        return ONNX_DTYPES[("int", enc.bitwidth)], -legacy - half
    return ONNX_DTYPES[("uint", enc.bitwidth)], -legacy


TIE_SCALES = [3 / 128, 5 / 256, 1 / 16, 7 / 1024]  # few mantissa bits: (k + 0.5) * s is exact


def tie_inputs(enc: Encoding, axis, channels: int, g: torch.Generator) -> torch.Tensor:
    """Exact ties (k + 0.5) * s for every code k from 3 below the grid to 3 above (for 16-bit
    per-axis grids: the 7 codes around each channel's grid ends and 4096 random others), plus
    grid points and random values, as a tensor whose ``axis`` has ``channels`` entries."""
    codes_lo = int((enc.offset.min() + enc.qmin)) - 3
    codes_hi = int((enc.offset.max() + enc.qmax)) + 3
    k = torch.arange(codes_lo, codes_hi + 1, dtype=torch.float64)
    if channels > 1 and k.numel() > 8192:
        ends = torch.cat([enc.offset.double() + enc.qmin, enc.offset.double() + enc.qmax])
        ends = (ends.reshape(-1, 1) + torch.arange(-3, 4).double()).reshape(-1)
        middle = k[torch.randperm(k.numel(), generator=g)[:4096]]
        k = torch.cat([ends, middle]).unique()
    n = k.numel()
    cols = []
    for c in range(channels):
        s = float(enc.scale.reshape(-1)[c])
        ties = ((k + 0.5) * s).float()
        assert torch.equal(ties / torch.tensor(s, dtype=torch.float32), (k + 0.5).float())
        grid = (k * s).float()
        rnd = (torch.rand(n, generator=g, dtype=torch.float64) * (codes_hi - codes_lo + 6)
               + codes_lo - 3) * s
        cols.append(torch.stack([ties, grid, rnd.float()]))  # (3, n)
    x = torch.stack(cols)  # (C, 3, n)
    return x if axis is None else x.movedim(0, axis)


ORT_CASES = [  # (kind, bitwidth, signed activations)
    ("asymmetric", 8, False), ("asymmetric", 8, True), ("symmetric", 8, False),
    ("unsigned", 8, False), ("asymmetric", 16, False), ("symmetric", 16, False),
    ("unsigned", 16, False), ("asymmetric", 4, False), ("symmetric", 4, False),
    ("unsigned", 4, False), ("asymmetric", 4, True), ("asymmetric", 16, True),
]


@requires_ort
@pytest.mark.parametrize("per_axis", [False, True])
@pytest.mark.parametrize("kind,bitwidth,signed", ORT_CASES)
def test_nearest_matches_onnxruntime_at_ties(kind, bitwidth, signed, per_axis):
    """qdq(x) == ORT DequantizeLinear(QuantizeLinear(x)) bit for bit, including every exact .5
    tie (both round half to even) and values beyond the grid, for int/uint 4, 8 and 16 (the
    4-bit graphs output only the dequantized float)."""
    g = torch.Generator().manual_seed(bitwidth * 10 + per_axis)
    n = 2**bitwidth - 1
    channels = len(TIE_SCALES) if per_axis else 1
    scales = torch.tensor(TIE_SCALES[:channels])
    if kind == "asymmetric":
        offsets = -torch.tensor([0, n // 3, n // 2, n])[:channels].float()
        offsets = offsets if per_axis else torch.tensor([-(n // 3)], dtype=torch.float32)
    else:
        offsets = torch.zeros(channels)
    args = KIND_ARGS[kind]
    axis = 1 if per_axis else None
    enc = Encoding(bitwidth, scales if per_axis else scales[0],
                   offsets if per_axis else offsets[0], args.get("symmetric", False),
                   unsigned=kind == "unsigned", axis=axis)
    dtype, zp = onnx_mapping(enc, signed)
    x = tie_inputs(enc, axis, channels, g)
    if not per_axis:
        x = x[0]
    ours = enc.fake_quantize(x)
    theirs = ort_qdq(x, enc.scale.numpy(), zp.numpy(), dtype, axis)
    assert torch.equal(ours, theirs), int((ours != theirs).sum())


@requires_ort
@given(kind=st.sampled_from(["asymmetric", "symmetric", "unsigned"]),
       bitwidth=st.sampled_from([4, 8, 16]), per_axis=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
@settings(max_examples=25, deadline=None)
def test_nearest_matches_onnxruntime_random(kind, bitwidth, per_axis, seed):
    """Encodings from random ranges (arbitrary float32 scales) and random data: qdq == ORT."""
    g = torch.Generator().manual_seed(seed)
    channels = 3 if per_axis else 1
    mag = 10.0 ** torch.randint(-3, 3, (channels,), generator=g).float()
    a, b = torch.rand(channels, generator=g) * mag, torch.rand(channels, generator=g) * mag
    lo, hi = (torch.minimum(a, b), torch.maximum(a, b)) if kind == "unsigned" else (-a, b)
    axis = 1 if per_axis else None
    enc = make_encoding(kind, bitwidth, lo if per_axis else lo[0], hi if per_axis else hi[0],
                        axis)
    x = (torch.randn(2, channels, 50, generator=g) * 1.5 * mag.reshape(1, -1, 1))
    if not per_axis:
        x = x.reshape(-1)
    dtype, zp = onnx_mapping(enc)
    ours = enc.fake_quantize(x)
    theirs = ort_qdq(x, enc.scale.numpy(), zp.numpy(), dtype, axis)
    assert torch.equal(ours, theirs), int((ours != theirs).sum())
