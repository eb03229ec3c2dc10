"""Histogram statistics (``tf_enhanced`` and ``percentile``): per-channel counts over a range
that grows with the data, and the ``percentile`` scheme."""
from __future__ import annotations

import numbers
from typing import Optional, Tuple

import torch
import torch.distributed as dist

from quantsim.analyzers.base import EncodingAnalyzer, Stats, _all_reduce_range, _check_int
from quantsim.errors import CalibrationError, QuantizationSettingError

#: Elements binned per step of the histogram loop (keeps the index tensor in cache and the
#: temporaries at a few MB).
_BLOCK_ELEMENTS = 1 << 18


def _add_histogram(counts: torch.Tensor, rows: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                   finite: Optional[torch.Tensor]) -> None:
    """Add to ``counts`` (float64 ``(C, num_bins)``, in place) the counts of each row of
    ``rows`` in ``num_bins`` equal bins over ``[lo, hi]`` per row.

    Values on or past the last edge land in the last bin. Entries where ``finite`` is False
    are not counted. Blocks of rows (or slices of one long row) with at most
    :data:`_BLOCK_ELEMENTS` values and bins are binned at a time, so the temporaries stay
    small whatever the number of channels: no ``(C, num_bins)`` tensor is made besides
    ``counts``.
    """
    channels, length = rows.shape
    num_bins = counts.shape[1]
    seen = lo <= hi
    origin = torch.where(seen, lo, torch.zeros_like(lo))[:, None]
    per_unit = torch.where(seen, num_bins / (hi - lo), torch.zeros_like(lo))[:, None]
    row_step = max(1, _BLOCK_ELEMENTS // max(length, num_bins, 1))
    col_step = max(1, _BLOCK_ELEMENTS // row_step)
    for r in range(0, channels, row_step):
        n = min(row_step, channels - r)
        dump = n * num_bins  # one extra bin that collects the non-finite entries
        itype = torch.int32 if dump < 2**31 - 1 else torch.int64
        base = (torch.arange(n, device=rows.device) * num_bins).to(itype)[:, None]
        for c in range(0, length, col_step):
            block = rows[r:r + n, c:c + col_step]
            idx = ((block - origin[r:r + n]) * per_unit[r:r + n]).to(itype)
            idx.clamp_(0, num_bins - 1).add_(base)
            if finite is not None:
                idx.masked_fill_(~finite[r:r + n, c:c + col_step], dump)
            binned = torch.bincount(idx.reshape(-1), minlength=dump + 1)
            counts[r:r + n].add_(binned[:dump].view(n, num_bins))


def _rebin(counts: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
           new_lo: torch.Tensor, new_hi: torch.Tensor) -> torch.Tensor:
    """Spread histograms over ``[lo, hi]`` onto the same number of bins over a wider range.

    Each source bin is split between the (at most two) destination bins it overlaps, in
    proportion to the overlap, so the total count of every row is conserved. Rows whose range
    is unchanged, or that hold no data yet, are returned as they are.
    """
    rows = ((lo != new_lo) | (hi != new_hi)) & (lo <= hi)
    if not bool(rows.any()):
        return counts
    idx = rows.nonzero().squeeze(1)
    out = counts.clone()
    out[idx] = _rebin_rows(counts[idx], lo[idx], hi[idx], new_lo[idx], new_hi[idx])
    return out


def _rebin_rows(counts: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                new_lo: torch.Tensor, new_hi: torch.Tensor) -> torch.Tensor:
    """:func:`_rebin` of rows that all change range (float64 arithmetic)."""
    num_bins = counts.shape[1]
    lo, hi, new_lo, new_hi = (t.to(torch.float64)[:, None] for t in (lo, hi, new_lo, new_hi))
    width, new_width = (hi - lo) / num_bins, (new_hi - new_lo) / num_bins
    starts = lo + width * torch.arange(num_bins, dtype=torch.float64, device=counts.device)
    pos = (starts - new_lo) / new_width
    first = pos.floor().clamp_(0, num_bins - 1)
    share = ((first + 1 - pos) * (new_width / width)).clamp_(0, 1)
    part = counts * share
    out = torch.zeros_like(counts)
    out.scatter_add_(1, first.long(), part)
    out.scatter_add_(1, (first + 1).clamp_(max=num_bins - 1).long(), counts - part)
    return out


def _widen_degenerate(lo: torch.Tensor, hi: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Give zero-width ranges a width (+-0.5 as aimet-torch, more where 0.5 is below an ulp)."""
    pad = (lo.abs() * 2.0**-16).clamp_(min=0.5)
    same = lo == hi
    return torch.where(same, lo - pad, lo), torch.where(same, hi + pad, hi)


def _bin_geometry(lo: torch.Tensor, hi: torch.Tensor,
                  num_bins: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per row: where bin 0 starts and how wide bins are (both 0 for rows without data)."""
    seen = lo <= hi
    origin = torch.where(seen, lo, torch.zeros_like(lo))
    width = torch.where(seen, (hi - lo) / num_bins, torch.zeros_like(lo))
    return origin, width


def _bin_positions(lo: torch.Tensor, hi: torch.Tensor, num_bins: int,
                   at: torch.Tensor) -> torch.Tensor:
    """Positions ``lo + at * (hi - lo) / num_bins`` per row (0 for rows without data)."""
    origin, width = _bin_geometry(lo, hi, num_bins)
    return origin[:, None] + width[:, None] * at


class _HistogramAnalyzer(EncodingAnalyzer):
    """Per-channel histograms over a growing range; ``lo``/``hi`` are the bin range and
    ``min``/``max`` the observed finite extremes (they differ only for constant data)."""

    def __init__(self, axis: Optional[int] = None, num_bins: int = 2048, name: str = "") -> None:
        super().__init__(axis, name)
        self.num_bins = _check_int(self, "num_bins", num_bins, 1)

    def _check_compatible(self, other: "EncodingAnalyzer") -> None:
        super()._check_compatible(other)
        if other.num_bins != self.num_bins:
            raise CalibrationError(
                f"{self._label}: cannot merge {other.num_bins} bins into {self.num_bins}")

    def _empty_stats(self, channels: int, device: torch.device) -> Stats:
        stats = super()._empty_stats(channels, device)
        return {**stats, "lo": stats["min"].clone(), "hi": stats["max"].clone(),
                "counts": torch.zeros(channels, self.num_bins, dtype=torch.float64, device=device)}

    def _update(self, stats, rows, batch_min, batch_max, finite) -> Stats:
        lo, hi = _widen_degenerate(torch.minimum(stats["lo"], batch_min),
                                   torch.maximum(stats["hi"], batch_max))
        counts = _rebin(stats["counts"], stats["lo"], stats["hi"], lo, hi)
        # in place, also into the old statistics' tensor when the range stayed: they are
        # replaced by the result, and a second (C, num_bins) tensor would double the memory
        _add_histogram(counts, rows, lo, hi, finite)
        return {"min": torch.minimum(stats["min"], batch_min),
                "max": torch.maximum(stats["max"], batch_max), "lo": lo, "hi": hi, "counts": counts}

    def _merge(self, ours: Stats, theirs: Stats) -> Stats:
        lo, hi = torch.minimum(ours["lo"], theirs["lo"]), torch.maximum(ours["hi"], theirs["hi"])
        counts = (_rebin(ours["counts"], ours["lo"], ours["hi"], lo, hi)
                  + _rebin(theirs["counts"], theirs["lo"], theirs["hi"], lo, hi))
        return {"min": torch.minimum(ours["min"], theirs["min"]),
                "max": torch.maximum(ours["max"], theirs["max"]),
                "lo": lo, "hi": hi, "counts": counts}

    def _all_reduce(self, stats: Stats, group) -> Stats:
        lo, hi = _all_reduce_range(torch.cat([stats["lo"], stats["min"]]),
                                   torch.cat([stats["hi"], stats["max"]]), group)
        channels = stats["lo"].shape[0]
        counts = _rebin(stats["counts"], stats["lo"], stats["hi"], lo[:channels], hi[:channels])
        dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=group)
        return {"min": lo[channels:], "max": hi[channels:], "lo": lo[:channels],
                "hi": hi[:channels], "counts": counts}


class PercentileAnalyzer(_HistogramAnalyzer):
    """Scheme ``percentile``: clip the ``100 - p`` % largest and smallest values.

    ``max`` is the left edge of the bin where the cumulative count reaches ``p`` % and ``min``
    the left edge of the bin where it reaches ``100 - p`` % (aimet-torch 2.x); ``p = 100``
    gives the observed min and max.

    Args:
        axis: channel axis, None per tensor.
        num_bins: histogram bins per channel.
        percentile: ``p`` in [50, 100].
        name: used in warnings.

    Example:
        >>> a = PercentileAnalyzer(percentile=99.0)
        >>> a.observe(torch.arange(1001.0))
        >>> [round(float(v)) for v in a.compute_range(255, symmetric=False)]
        [10, 990]
    """

    def __init__(self, axis: Optional[int] = None, num_bins: int = 2048,
                 percentile: float = 100.0, name: str = "") -> None:
        super().__init__(axis, num_bins, name)
        self.set_percentile(percentile)

    def set_percentile(self, p: float) -> None:
        """Set the percentile ``p``.

        Raises:
            QuantizationSettingError: ``p`` is not a number in [50, 100].
        """
        if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 50 <= p <= 100:
            raise QuantizationSettingError(
                f"{self._label}: percentile must be a number in [50, 100], got {p!r}")
        self.percentile = float(p)

    def _compute(self, stats: Stats, num_steps: int, symmetric: bool):
        if self.percentile == 100:
            return stats["min"], stats["max"]
        cum = stats["counts"].cumsum(dim=1)
        total = cum[:, -1:]
        share = self.percentile / 100
        top = torch.searchsorted(cum, total * share).clamp_(max=self.num_bins - 1)
        bottom = torch.searchsorted(cum, total * (1 - share)).clamp_(max=self.num_bins - 1)
        edges = _bin_positions(stats["lo"], stats["hi"], self.num_bins,
                               torch.cat([bottom, top], dim=1).float())
        return torch.maximum(edges[:, 0], stats["min"]), torch.minimum(edges[:, 1], stats["max"])
