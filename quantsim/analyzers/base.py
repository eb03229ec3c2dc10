"""The analyzer base class: observing, merging across analyzers and processes, and turning
statistics into a raw range; plus ``tf``'s min/max analyzer, the simplest statistics."""
from __future__ import annotations

import math
import numbers
import warnings
from abc import ABC, abstractmethod
from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist

from quantsim.errors import CalibrationError, QuantizationSettingError

Stats = Dict[str, torch.Tensor]


class NonFiniteWarning(UserWarning):
    """Observed data held NaN or +-inf values; they were left out of the statistics."""


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

    # -- public API ---------------------------------------------------------------------------
    @property
    def has_stats(self) -> bool:
        """True once at least one finite value has been observed."""
        return self._stats is not None

    def observed_range(self) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """The finite ``(min, max)`` seen so far, ``(C,)`` each (1 per tensor); None before any
        data. Channels without finite data hold ``(+inf, -inf)``."""
        return None if self._stats is None else (self._stats["min"], self._stats["max"])

    def reset(self) -> None:
        """Forget every statistic."""
        self._stats = None

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


def _check_int(owner: EncodingAnalyzer, what: str, value, minimum: int) -> int:
    if not _is_int(value) or value < minimum:
        raise QuantizationSettingError(
            f"{owner._label}: {what} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
