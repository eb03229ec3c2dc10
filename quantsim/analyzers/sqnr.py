"""Scheme ``tf_enhanced``: the candidate encoding with the least weighted noise on a histogram."""
from __future__ import annotations

import numbers
from typing import Optional, Tuple

import torch

from quantsim.analyzers.base import Stats, _check_int
from quantsim.analyzers.histograms import _bin_geometry, _bin_positions, _HistogramAnalyzer
from quantsim.encoding import MINIMUM_SCALE, rounding_error_in_steps
from quantsim.errors import QuantizationSettingError

#: Elements of the (channels x candidates x bins) noise tensor evaluated at once.
_NOISE_ELEMENTS = 1 << 20
#: Bins of the (channels x bins) histograms compacted at once (its temporaries, float64
#: prefix sums included, take ~100 bytes per bin: 128 channels of 2048 bins, ~25 MB).
_COMPACT_ELEMENTS = 1 << 18


class SqnrAnalyzer(_HistogramAnalyzer):
    """Scheme ``tf_enhanced`` (aimet-torch 2.x ``SqnrEncodingAnalyzer``).

    Searches candidate encodings for the lowest noise on the histogram, taking every bin's
    count at its midpoint: ``sum(count * (mid - qdq(mid))^2)``, where errors of clipped bins
    count ``gamma`` times. Candidates on the observed range ``[min, max]`` (zero included),
    ``d = (max - min) / N``:

    * asymmetric: steps ``k * d / (D - 1)``, ``k = 1..D``, times ``O - 1`` offsets evenly from
      ``-N`` to 0 plus the observed offset ``round(min / d)``; each candidate range is cut to
      the observed one (step and offset recomputed);
    * symmetric: steps ``k * 2 * max(|min|, max) / N / (S - 1)``, ``k = 1..S``, offset
      ``(-N) // 2``.

    So rare outliers are clipped when that lowers the noise; the bulk of the data never is.

    Args:
        axis: channel axis, None per tensor.
        num_bins: histogram bins per channel.
        asymmetric_delta_candidates: ``D``.
        symmetric_delta_candidates: ``S``.
        offset_candidates: ``O`` (at most ``N + 2`` are used).
        gamma: weight of clipping noise (1 is plain squared error).
        name: used in warnings.

    Example:
        >>> a = SqnrAnalyzer()
        >>> a.observe(torch.cat([torch.randn(10000), torch.tensor([100.0])]))
        >>> float(a.compute_range(255, symmetric=False)[1]) < 100
        True
    """

    def __init__(self, axis: Optional[int] = None, num_bins: int = 2048,
                 asymmetric_delta_candidates: int = 17, symmetric_delta_candidates: int = 101,
                 offset_candidates: int = 21, gamma: float = 3.0, name: str = "") -> None:
        super().__init__(axis, num_bins, name)
        self.asymmetric_delta_candidates = _check_int(
            self, "asymmetric_delta_candidates", asymmetric_delta_candidates, 2)
        self.symmetric_delta_candidates = _check_int(
            self, "symmetric_delta_candidates", symmetric_delta_candidates, 2)
        self.offset_candidates = _check_int(self, "offset_candidates", offset_candidates, 3)
        if isinstance(gamma, bool) or not isinstance(gamma, numbers.Real) or not gamma > 0:
            raise QuantizationSettingError(f"{self._label}: gamma must be > 0, got {gamma!r}")
        self.gamma = float(gamma)

    def _compute(self, stats: Stats, num_steps: int, symmetric: bool):
        lo = stats["min"].clamp(max=0)
        hi = torch.maximum(stats["max"].clamp(min=0), lo + MINIMUM_SCALE * num_steps)
        if symmetric:
            deltas, offsets = self._symmetric_candidates(lo, hi, num_steps)
        else:
            deltas, offsets = self._asymmetric_candidates(lo, hi, num_steps)
        noise = self._noise(stats, deltas, offsets, num_steps, shared_offset=symmetric)
        best = noise.argmin(dim=1, keepdim=True)
        delta, offset = deltas.gather(1, best).squeeze(1), offsets.gather(1, best).squeeze(1)
        return offset * delta, (offset + num_steps) * delta

    def _asymmetric_candidates(self, lo, hi, num_steps):
        """``(C, D * O)`` steps and offsets, each range cut to the observed one."""
        full = (hi - lo) / num_steps
        observed = torch.round(lo / full)
        floor, ceil = full * observed, full * (observed + num_steps)
        k = torch.arange(1, self.asymmetric_delta_candidates + 1, device=lo.device)
        deltas = full[:, None] * k / (self.asymmetric_delta_candidates - 1)
        count = min(num_steps + 2, self.offset_candidates) - 1
        spread = torch.round(torch.linspace(-num_steps, 0, count, device=lo.device))
        offsets = torch.cat([spread.expand(lo.shape[0], -1), observed[:, None]], dim=1)
        cand_lo = deltas[:, :, None] * offsets[:, None, :]
        cand_hi = cand_lo + deltas[:, :, None] * num_steps
        cand_lo = torch.maximum(cand_lo, floor[:, None, None])
        cand_hi = torch.minimum(cand_hi, ceil[:, None, None])
        deltas = ((cand_hi - cand_lo) / num_steps).clamp_(min=MINIMUM_SCALE)
        offsets = torch.round(cand_lo / deltas)
        return deltas.flatten(1), offsets.flatten(1)

    def _symmetric_candidates(self, lo, hi, num_steps):
        """``(C, S)`` steps with the fixed offset ``(-N) // 2``."""
        full = 2 * torch.maximum(hi, -lo) / num_steps
        k = torch.arange(1, self.symmetric_delta_candidates + 1, device=lo.device)
        deltas = full[:, None] * k / (self.symmetric_delta_candidates - 1)
        deltas = deltas.clamp_(min=MINIMUM_SCALE)
        return deltas, torch.full_like(deltas, (-num_steps) // 2)

    def _noise(self, stats: Stats, deltas, offsets, num_steps, shared_offset: bool) -> torch.Tensor:
        """``(C, K)`` weighted noise of every candidate ``(deltas[c, k], offsets[c, k])``.

        The squared qdq error of every bin midpoint (clipped values included) is summed a
        cache-sized block of channels at once; clipped bins then get their extra ``gamma - 1``
        share in closed form from prefix sums (the clipped bins of a row are a prefix and a
        suffix of its sorted midpoints). Only non-empty bins are evaluated: a weight row of a
        few hundred values fills a small part of its 2048 bins. Channels are compacted a
        block at a time (the bins of a weight with thousands of channels would otherwise make
        several copies of its histograms), every row to the same width, so a row's noise
        does not depend on the block it is in. ``shared_offset``: every candidate has the
        offset ``offsets[0, 0]`` (symmetric search)."""
        counts = stats["counts"]
        width = _compact_width(counts)
        step = max(1, _NOISE_ELEMENTS // (deltas.shape[1] * width))
        block = max(step, _COMPACT_ELEMENTS // counts.shape[1] // step * step)
        offset = float(offsets[0, 0]) if shared_offset and offsets.numel() else None
        parts = []
        for b in range(0, counts.shape[0], block):
            rows = slice(b, b + block)
            mids, cnt = _nonempty_bins(stats["lo"][rows], stats["hi"][rows],
                                       counts[rows].to(torch.float32), width)
            d, o = deltas[rows], offsets[rows]
            noise = torch.cat([
                _squared_error(mids[i:i + step], cnt[i:i + step], d[i:i + step],
                               o[i:i + step] if offset is None else offset, num_steps)
                for i in range(0, d.shape[0], step)])
            if self.gamma != 1.0:
                noise = noise + (self.gamma - 1.0) * _clipping_error(
                    mids, cnt, d, o, num_steps).to(noise.dtype)
            parts.append(noise)
        return torch.cat(parts)


def _squared_error(mids, counts, deltas, offsets, num_steps) -> torch.Tensor:
    """``(c, K)``: ``sum_b counts[c, b] * (mids[c, b] - qdq_k(mids[c, b]))^2`` for the
    candidates ``(deltas[c, k], offsets[c, k])`` (``offsets`` may be one number)."""
    off = offsets[:, :, None] if isinstance(offsets, torch.Tensor) else offsets
    errors = rounding_error_in_steps(mids[:, None, :] / deltas[:, :, None], off, 0, num_steps)
    # mul_ + sum, not bmm: batched matrix-vector products are several times slower on CPU
    return errors.square_().mul_(counts[:, None, :]).sum(dim=2) * deltas.square()


def _clipping_error(mids, counts, deltas, offsets, num_steps) -> torch.Tensor:
    """``(C, K)`` float64: the squared error of the clipped bins alone, per candidate.

    A bin clips when its midpoint lies more than half a step outside the grid
    ``[offset * delta, (offset + num_steps) * delta]``; its error is the distance to that end.
    ``mids`` must ascend along each row. Sums of ``count``, ``count * m`` and
    ``count * m^2`` over the clipped prefix and suffix give the error without a pass over
    the bins per candidate."""
    m, c = mids.to(torch.float64), counts.to(torch.float64)
    zero = m.new_zeros(m.shape[0], 1)
    prefix = [torch.cat([zero, p.cumsum(1)], dim=1) for p in (c, c * m, c * m * m)]
    d, o = deltas.to(torch.float64), offsets.to(torch.float64)
    low_end, high_end = o * d, (o + num_steps) * d
    below = torch.searchsorted(m, low_end - 0.5 * d)  # bins with m < low_end - d / 2
    above = torch.searchsorted(m, high_end + 0.5 * d, right=True)  # first m > high_end + d / 2

    def error(ends: torch.Tensor, sums: list) -> torch.Tensor:
        return (sums[2] - 2 * ends * sums[1] + ends * ends * sums[0]).clamp_(min=0)

    low = error(low_end, [p.gather(1, below) for p in prefix])
    high = error(high_end, [p[:, -1:] - p.gather(1, above) for p in prefix])
    return low + high


def _compact_width(counts: torch.Tensor) -> int:
    """How many bins per row :func:`_nonempty_bins` keeps: the most non-empty bins of any
    row, or all of them when that is most (the compaction would not pay). Counted a block
    of rows at a time: summing a whole (channels x bins) mask makes an int64 copy of it."""
    num_bins = counts.shape[1]
    rows = max(1, _COMPACT_ELEMENTS // num_bins)
    width = max([int((counts[r:r + rows] > 0).sum(dim=1).max())
                 for r in range(0, counts.shape[0], rows)] + [1])
    return num_bins if width > 0.75 * num_bins else width


def _nonempty_bins(lo: torch.Tensor, hi: torch.Tensor, counts: torch.Tensor,
                   width: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Midpoints and counts of the bins of each row that hold data, in order, in rows of
    ``width`` (:func:`_compact_width`; all bins when it is their number).

    Shorter rows are padded with zero-count bins at ``hi`` (past every midpoint), so rows
    still ascend and the padding adds no error."""
    num_bins = counts.shape[1]
    if width == num_bins:
        return _bin_positions(lo, hi, num_bins,
                              torch.arange(num_bins, device=counts.device) + 0.5), counts
    nonempty = counts > 0
    filled = nonempty.sum(dim=1)
    rows, cols = nonempty.nonzero(as_tuple=True)
    slots = torch.arange(rows.numel(), device=counts.device) - (filled.cumsum(0) - filled)[rows]
    origin, bin_width = _bin_geometry(lo, hi, num_bins)
    mids = (origin + bin_width * num_bins)[:, None].repeat(1, width)
    mids[rows, slots] = origin[rows] + bin_width[rows] * (cols.to(lo.dtype) + 0.5)
    packed = counts.new_zeros(counts.shape[0], width)
    packed[rows, slots] = counts[rows, cols]
    return mids, packed
