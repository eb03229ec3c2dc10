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

Modules: :mod:`~quantsim.analyzers.base` (the base class, merging and ``all_reduce``, ``tf``),
:mod:`~quantsim.analyzers.histograms` (histogram statistics, ``percentile``),
:mod:`~quantsim.analyzers.sqnr` (``tf_enhanced``'s search).
"""
from __future__ import annotations

from typing import Optional, Tuple

from quantsim.analyzers.base import EncodingAnalyzer, MinMaxAnalyzer, NonFiniteWarning
from quantsim.analyzers.histograms import PercentileAnalyzer
from quantsim.analyzers.sqnr import SqnrAnalyzer
from quantsim.errors import QuantizationSettingError

__all__ = ["EncodingAnalyzer", "MinMaxAnalyzer", "NonFiniteWarning", "PercentileAnalyzer",
           "SCHEMES", "SqnrAnalyzer", "create_analyzer"]

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
