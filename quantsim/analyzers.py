"""Encoding analyzers: collect statistics of observed tensors and turn them into a raw range.

An analyzer knows nothing about modules. It is fed tensors (:meth:`EncodingAnalyzer.observe`),
can be merged with another analyzer or across processes, and finally returns a raw
``(min, max)`` that the caller passes to :meth:`quantsim.encoding.Encoding.from_range`.

* ``tf`` -> :class:`MinMaxAnalyzer`: the running min and max.
* ``tf_enhanced`` -> :class:`SqnrAnalyzer`: the candidate range with the lowest clipping and
  rounding noise on a histogram.
* ``percentile`` -> :class:`PercentileAnalyzer`: the ``p``-th and ``(100 - p)``-th percentiles
  of a histogram.

Statistics are kept per tensor (``axis=None``) or per slice along ``axis``. Histograms hold
``(C, num_bins)`` counts over a per-channel range that grows with the data: when a batch falls
outside it, the old counts are spread proportionally onto the wider bins. NaN and +-inf are
left out of every statistic, with a :class:`NonFiniteWarning`.
"""
from __future__ import annotations

import math
import numbers
import warnings
from abc import ABC, abstractmethod
from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist

from quantsim.encoding import MINIMUM_SCALE, rounding_error_in_steps
from quantsim.errors import CalibrationError, QuantizationSettingError

Stats = Dict[str, torch.Tensor]

#: Elements binned per step of the histogram loop (keeps the index tensor in cache).
_BLOCK_ELEMENTS = 1 << 20
#: Elements of the (channels x candidates x bins) noise tensor evaluated at once.
_NOISE_ELEMENTS = 1 << 20


class NonFiniteWarning(UserWarning):
    """Observed data held NaN or +-inf values; they were left out of the statistics."""


# ----------------------------------------------------------------------------------------------
# histogram helpers (vectorised over channels)
# ----------------------------------------------------------------------------------------------
def _histogram(rows: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, num_bins: int,
               finite: Optional[torch.Tensor]) -> torch.Tensor:
    """Counts of each row of ``rows`` in ``num_bins`` equal bins over ``[lo, hi]`` per row.

    Values on or past the last edge land in the last bin. Entries where ``finite`` is False
    are not counted. Returns float64 counts of shape ``(C, num_bins)``.
    """
    channels, length = rows.shape
    seen = lo <= hi
    origin = torch.where(seen, lo, torch.zeros_like(lo))[:, None]
    per_unit = torch.where(seen, num_bins / (hi - lo), torch.zeros_like(lo))[:, None]
    dump = channels * num_bins  # one extra bin that collects the non-finite entries
    itype = torch.int32 if dump < 2**31 - 1 else torch.int64
    base = (torch.arange(channels, device=rows.device) * num_bins).to(itype)[:, None]
    total = torch.zeros(dump + 1, dtype=torch.int64, device=rows.device)
    step = max(1, _BLOCK_ELEMENTS // channels)
    for start in range(0, length, step):
        block = rows[:, start:start + step]
        idx = ((block - origin) * per_unit).to(itype).clamp_(0, num_bins - 1).add_(base)
        if finite is not None:
            idx.masked_fill_(~finite[:, start:start + step], dump)
        total += torch.bincount(idx.reshape(-1), minlength=dump + 1)
    return total[:dump].reshape(channels, num_bins).to(torch.float64)


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


# ----------------------------------------------------------------------------------------------
# the base class
# ----------------------------------------------------------------------------------------------
class EncodingAnalyzer(ABC):
    """Collects statistics of observed tensors and computes a raw ``(min, max)`` from them.

    Args:
        axis: channel axis of the observed tensors for per-channel statistics; None (default)
            for one statistic over the whole tensor.
        name: what the analyzer belongs to (e.g. a quantizer's path), used in warnings.

    Example:
        >>> a = MinMaxAnalyzer()
        >>> a.observe(torch.tensor([-1.0, 3.0]))
        >>> [float(v) for v in a.compute_range(num_steps=255, symmetric=False)]
        [-1.0, 3.0]
    """

    def __init__(self, axis: Optional[int] = None, name: str = "") -> None:
        if axis is not None and (isinstance(axis, bool) or not isinstance(axis, int)):
            raise QuantizationSettingError(
                f"{type(self).__name__}: axis must be an int or None, got {axis!r}")
        self.axis = axis
        self.name = name
        self._stats: Optional[Stats] = None
        self._generation = 0

    # -- public API ---------------------------------------------------------------------------
    @property
    def has_stats(self) -> bool:
        """True once at least one finite value has been observed."""
        return self._stats is not None

    @property
    def generation(self) -> int:
        """A counter that changes whenever the statistics change (observe, merge, reset)."""
        return self._generation

    def reset(self) -> None:
        """Forget every statistic."""
        self._stats = None
        self._generation += 1

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        """Add a batch to the statistics.

        Args:
            x: a tensor of any float dtype on any device. NaN and +-inf are left out (with a
                :class:`NonFiniteWarning`); a batch without finite values changes nothing.

        Raises:
            CalibrationError: ``x`` has no ``axis`` or a channel count different from before.
        """
        rows = self._rows(x)
        if rows.numel() == 0:
            return
        batch_min, batch_max, finite = self._finite_range(rows)
        if finite is not None and not bool(finite.any()):
            return
        if self._stats is None:
            self._stats = self._empty_stats(rows.shape[0], rows.device)
        self._stats = self._update(self._stats, rows, batch_min, batch_max, finite)
        self._generation += 1

    @torch.no_grad()
    def compute_range(self, num_steps: int, symmetric: bool) -> Tuple[torch.Tensor, torch.Tensor]:
        """The raw range for a grid of ``num_steps`` steps.

        Args:
            num_steps: ``qmax - qmin`` of the target grid (255 for 8 bit, 254 strict symmetric).
            symmetric: whether the caller will build a symmetric encoding.

        Returns:
            ``(min, max)`` float32 tensors: 0-d per tensor, ``(C,)`` per channel. Channels
            that saw no finite value get ``(0, 0)``. Pass them to ``Encoding.from_range``.

        Raises:
            QuantizationSettingError: ``num_steps`` is not a positive integer.
            CalibrationError: nothing was observed.
        """
        if not _is_int(num_steps) or num_steps <= 0:
            raise QuantizationSettingError(
                f"{self._label}: num_steps must be a positive integer, got {num_steps!r}")
        if self._stats is None:
            raise CalibrationError(
                f"{self._label}: no statistics to compute a range from; "
                "observe() finite data first")
        lo, hi = self._compute(self._stats, int(num_steps), bool(symmetric))
        seen = self._stats["min"] <= self._stats["max"]
        lo = torch.where(seen, lo, torch.zeros_like(lo)).to(torch.float32)
        hi = torch.where(seen, hi, torch.zeros_like(hi)).to(torch.float32)
        return (lo.reshape(()), hi.reshape(())) if self.axis is None else (lo, hi)

    def state_dict_stats(self) -> Dict[str, torch.Tensor]:
        """Copies of the mergeable statistics (empty before anything was observed).

        Every tensor has the channel count as first dimension (1 per tensor).
        """
        return {} if self._stats is None else {k: v.clone() for k, v in self._stats.items()}

    @torch.no_grad()
    def merge_(self, other: "EncodingAnalyzer") -> None:
        """Merge ``other``'s statistics into this analyzer, as if it had seen both streams.

        Raises:
            CalibrationError: ``other`` is a different kind of analyzer, or has other channels.
        """
        self._check_compatible(other)
        if other._stats is None:
            return
        device = (self._stats or other._stats)["min"].device
        theirs = {k: v.to(device) for k, v in other._stats.items()}
        self._generation += 1
        if self._stats is None:
            self._stats = {k: v.clone() for k, v in theirs.items()}
            return
        self._check_channels(theirs["min"].shape[0], "merge_")
        self._stats = self._merge(self._stats, theirs)

    @torch.no_grad()
    def all_reduce_(self, group: Optional[dist.ProcessGroup] = None) -> None:
        """Make every rank's statistics the merge of all ranks' (no-op without torch.distributed).

        Every rank of ``group`` must call it, also ranks that observed nothing.

        Raises:
            CalibrationError: ranks observed different channel counts.
        """
        if not (dist.is_available() and dist.is_initialized()):
            return
        device = self._stats["min"].device if self._stats is not None else _collective_device(group)
        channels = _agree_on_channels(self._channels, device, group, self._label)
        if channels == 0:
            return
        if self._stats is None:
            self._stats = self._empty_stats(channels, device)
        self._stats = self._all_reduce(self._stats, group)
        self._generation += 1

    # -- helpers ------------------------------------------------------------------------------
    @property
    def _label(self) -> str:
        return f"{type(self).__name__}({self.name!r})" if self.name else type(self).__name__

    @property
    def _channels(self) -> int:
        return 0 if self._stats is None else int(self._stats["min"].shape[0])

    def _check_compatible(self, other: "EncodingAnalyzer") -> None:
        if type(other) is not type(self):
            raise CalibrationError(
                f"{self._label}: cannot merge statistics of a {type(other).__name__}")

    def _check_channels(self, channels: int, where: str) -> None:
        if self._stats is not None and channels != self._channels:
            raise CalibrationError(
                f"{self._label}.{where}: {channels} channels along axis {self.axis}, but the "
                f"statistics so far have {self._channels}; use one analyzer per tensor shape")

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as float32 ``(C, elements)``: one row per channel (one row per tensor)."""
        x = x.detach()
        if self.axis is None:
            return x.reshape(1, -1).float()
        if not -x.dim() <= self.axis < x.dim():
            raise CalibrationError(
                f"{self._label}: channel axis {self.axis} does not exist in a tensor of shape "
                f"{tuple(x.shape)}")
        self._check_channels(x.shape[self.axis], "observe")
        return x.movedim(self.axis, 0).reshape(x.shape[self.axis], -1).float()

    def _finite_range(
        self, rows: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """Per-row min and max of the finite values, and the finite mask (None if all finite)."""
        if rows.shape[0] == 1:  # a full reduction runs on every thread, a row-wise one may not
            batch_min, batch_max = (t.reshape(1) for t in torch.aminmax(rows))
        else:
            batch_min, batch_max = torch.aminmax(rows, dim=1)
        if bool(torch.isfinite(batch_min).all() & torch.isfinite(batch_max).all()):
            return batch_min, batch_max, None
        finite = torch.isfinite(rows)
        dropped = rows.numel() - int(finite.sum())
        warnings.warn(
            f"{self._label}: left {dropped} non-finite value(s) (NaN or +-inf) of {rows.numel()} "
            "out of the statistics", NonFiniteWarning, stacklevel=4)
        inf = torch.tensor(math.inf, device=rows.device)
        return (torch.where(finite, rows, inf).amin(dim=1),
                torch.where(finite, rows, -inf).amax(dim=1), finite)

    # -- what each scheme defines -------------------------------------------------------------
    def _empty_stats(self, channels: int, device: torch.device) -> Stats:
        """Statistics of ``channels`` channels that have seen nothing (min +inf, max -inf)."""
        return {"min": torch.full((channels,), math.inf, device=device),
                "max": torch.full((channels,), -math.inf, device=device)}

    @abstractmethod
    def _update(self, stats: Stats, rows: torch.Tensor, batch_min: torch.Tensor,
                batch_max: torch.Tensor, finite: Optional[torch.Tensor]) -> Stats:
        """``stats`` after a batch of ``(C, elements)`` rows with these finite ranges."""

    @abstractmethod
    def _merge(self, ours: Stats, theirs: Stats) -> Stats:
        """The statistics of both streams."""

    @abstractmethod
    def _all_reduce(self, stats: Stats, group: Optional[dist.ProcessGroup]) -> Stats:
        """The merge of every rank's statistics."""

    @abstractmethod
    def _compute(self, stats: Stats, num_steps: int,
                 symmetric: bool) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per-channel raw ``(min, max)`` of shape ``(C,)``."""


def _collective_device(group: Optional[dist.ProcessGroup]) -> torch.device:
    """Where a rank without statistics puts its tensors for a collective of ``group``."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _agree_on_channels(channels: int, device: torch.device,
                       group: Optional[dist.ProcessGroup], label: str) -> int:
    """The channel count of the ranks that observed data (0 if none did)."""
    nothing = 2**62
    t = torch.tensor([channels, -(channels or nothing)], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    most, fewest = int(t[0]), -int(t[1])
    if fewest != nothing and fewest != most:
        raise CalibrationError(
            f"{label}.all_reduce_: ranks observed between {fewest} and {most} channels")
    return most


def _all_reduce_range(lo: torch.Tensor, hi: torch.Tensor,
                      group: Optional[dist.ProcessGroup]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Elementwise min of ``lo`` and max of ``hi`` over the ranks, in one collective."""
    packed = torch.stack([lo, -hi])
    dist.all_reduce(packed, op=dist.ReduceOp.MIN, group=group)
    return packed[0], -packed[1]


# ----------------------------------------------------------------------------------------------
# tf: min/max
# ----------------------------------------------------------------------------------------------
class MinMaxAnalyzer(EncodingAnalyzer):
    """Scheme ``tf``: the running minimum and maximum (per channel along ``axis``).

    Example:
        >>> a = MinMaxAnalyzer(axis=0)
        >>> a.observe(torch.tensor([[1.0, 2.0], [-3.0, 0.5]]))
        >>> a.compute_range(255, symmetric=False)
        (tensor([ 1., -3.]), tensor([2.0000, 0.5000]))
    """

    def _update(self, stats, rows, batch_min, batch_max, finite) -> Stats:
        return {"min": torch.minimum(stats["min"], batch_min),
                "max": torch.maximum(stats["max"], batch_max)}

    def _merge(self, ours: Stats, theirs: Stats) -> Stats:
        return self._update(ours, None, theirs["min"], theirs["max"], None)

    def _all_reduce(self, stats: Stats, group) -> Stats:
        lo, hi = _all_reduce_range(stats["min"], stats["max"], group)
        return {"min": lo, "max": hi}

    def _compute(self, stats: Stats, num_steps: int, symmetric: bool):
        return stats["min"], stats["max"]


# ----------------------------------------------------------------------------------------------
# histogram-based schemes
# ----------------------------------------------------------------------------------------------
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
        counts = counts + _histogram(rows, lo, hi, self.num_bins, finite)
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
        few hundred values fills a small part of its 2048 bins. ``shared_offset``: every
        candidate has the offset ``offsets[0, 0]`` (symmetric search)."""
        mids, counts = _nonempty_bins(stats["lo"], stats["hi"], stats["counts"].to(torch.float32))
        step = max(1, _NOISE_ELEMENTS // (deltas.shape[1] * mids.shape[1]))
        offset = float(offsets[0, 0]) if shared_offset and offsets.numel() else None
        noise = torch.cat([
            _squared_error(mids[i:i + step], counts[i:i + step], deltas[i:i + step],
                           offsets[i:i + step] if offset is None else offset, num_steps)
            for i in range(0, deltas.shape[0], step)])
        if self.gamma != 1.0:
            noise = noise + (self.gamma - 1.0) * _clipping_error(
                mids, counts, deltas, offsets, num_steps).to(noise.dtype)
        return noise


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


def _nonempty_bins(lo: torch.Tensor, hi: torch.Tensor,
                   counts: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Midpoints and counts of the bins of each row that hold data, in order, cut to the
    widest row's count.

    Shorter rows are padded with zero-count bins at ``hi`` (past every midpoint), so rows
    still ascend and the padding adds no error. Histograms that fill most of their bins are
    returned whole (the compaction would not pay)."""
    num_bins = counts.shape[1]
    nonempty = counts > 0
    filled = nonempty.sum(dim=1)
    width = max(int(filled.max()) if counts.numel() else 0, 1)
    if width > 0.75 * num_bins:
        return _bin_positions(lo, hi, num_bins,
                              torch.arange(num_bins, device=counts.device) + 0.5), counts
    rows, cols = nonempty.nonzero(as_tuple=True)
    slots = torch.arange(rows.numel(), device=counts.device) - (filled.cumsum(0) - filled)[rows]
    origin, bin_width = _bin_geometry(lo, hi, num_bins)
    mids = (origin + bin_width * num_bins)[:, None].repeat(1, width)
    mids[rows, slots] = origin[rows] + bin_width[rows] * (cols.to(lo.dtype) + 0.5)
    packed = counts.new_zeros(counts.shape[0], width)
    packed[rows, slots] = counts[rows, cols]
    return mids, packed


# ----------------------------------------------------------------------------------------------
# factory and validation
# ----------------------------------------------------------------------------------------------
_SCHEMES = {"tf": MinMaxAnalyzer, "tf_enhanced": SqnrAnalyzer, "percentile": PercentileAnalyzer}
#: Calibration schemes :func:`create_analyzer` accepts.
SCHEMES: Tuple[str, ...] = tuple(_SCHEMES)


def create_analyzer(scheme: str, axis: Optional[int] = None, **kwargs) -> EncodingAnalyzer:
    """Build the analyzer of a calibration scheme.

    Args:
        scheme: ``'tf'``, ``'tf_enhanced'`` or ``'percentile'``.
        axis: channel axis, None per tensor.
        **kwargs: passed to the analyzer (``name``, ``num_bins``, ``percentile``, ...).

    Raises:
        QuantizationSettingError: unknown scheme.

    Example:
        >>> type(create_analyzer("percentile", percentile=99.9)).__name__
        'PercentileAnalyzer'
    """
    if not isinstance(scheme, str) or scheme not in _SCHEMES:
        raise QuantizationSettingError(
            f"unknown calibration scheme {scheme!r}; allowed: {list(SCHEMES)}")
    return _SCHEMES[scheme](axis=axis, **kwargs)


def _check_int(owner: EncodingAnalyzer, what: str, value, minimum: int) -> int:
    if not _is_int(value) or value < minimum:
        raise QuantizationSettingError(
            f"{owner._label}: {what} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
