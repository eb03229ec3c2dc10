"""Phase 2's searches along the path of cumulative flips.

Point ``i`` of the path applies flips ``0..i``. Going forward (from the baseline down) the
scores fall as ``i`` grows and the answer is the **last** point that meets the target; in
reverse (from the lowest setting up) they rise and it is the **first**. ``-1`` stands for the
path's start and ``n`` for its end, both known (not evaluated here). Each search calls
``score(i)`` only for points it needs, so a cache behind ``score`` makes reruns free.
"""
from __future__ import annotations

import math
from typing import Callable

from quantsim.mixed_precision.candidates import AMPSearchAlgo

Score = Callable[[int], float]


def search(algo: AMPSearchAlgo, score: Score, n: int, target: float, ascending: bool,
           start_score: float, end_score: float) -> int:
    """The chosen point of a path of ``n`` points (``-1``: none is good enough going forward,
    i.e. stay at the start; ``n``: none going in reverse, i.e. go to the end, the baseline).

    Args:
        algo: bisection, interpolation or brute force (:class:`AMPSearchAlgo`).
        score: evaluates point ``i`` (``0 <= i < n``).
        target: the lowest acceptable score.
        ascending: True in reverse (scores rise along the path).
        start_score, end_score: the scores before the first and after the last point, used
            by the interpolation only (the search never assumes they meet the target).
    """
    if n == 0:
        return n if ascending else -1
    if algo is AMPSearchAlgo.BruteForce:
        return _brute_force(score, n, target, ascending)
    interpolate = algo is AMPSearchAlgo.Interpolation
    # invariant: ok(lo) is False and ok(hi) is True going in reverse; ok(lo) True, ok(hi) False
    # going forward (the sentinels -1 and n are never evaluated)
    lo, hi = -1, n
    s_lo, s_hi = start_score, end_score
    while hi - lo > 1:
        mid = _pivot(lo, hi, s_lo, s_hi, target) if interpolate else (lo + hi) // 2
        s_mid = score(mid)
        if (s_mid >= target) == ascending:
            hi, s_hi = mid, s_mid
        else:
            lo, s_lo = mid, s_mid
    return hi if ascending else lo


def _pivot(lo: int, hi: int, s_lo: float, s_hi: float, target: float) -> int:
    """The point where the line through the bracket's scores crosses ``target``, kept strictly
    inside the bracket (the midpoint when the scores give no finite slope)."""
    span = s_hi - s_lo
    if not (math.isfinite(span) and math.isfinite(target)) or span == 0:
        return (lo + hi) // 2
    mid = int(round(lo + (hi - lo) * (target - s_lo) / span))
    return min(max(mid, lo + 1), hi - 1)


def _brute_force(score: Score, n: int, target: float, ascending: bool) -> int:
    """Evaluate every point; the cheapest one that meets the target (the last going forward,
    the first in reverse), whether or not the scores are monotonic."""
    meets = [i for i in range(n) if score(i) >= target]
    if ascending:
        return meets[0] if meets else n
    return meets[-1] if meets else -1
