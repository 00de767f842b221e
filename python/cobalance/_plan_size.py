"""How large and how spread a balanced plan is: sizes, their forms and checks, Kish
effective size, repeat-factor counts and the gamma search on the effective-size floor.

Internal to :class:`cobalance.Balancer` (and the command line's ``--n-samples-out``).
"""

from __future__ import annotations

import math
from numbers import Integral, Real

import numpy as np

__all__ = ["MAX_SIZE", "effective_size", "raise_weight_to_floor", "repeat_factor_counts",
           "size_keeping_lower_bounds", "check_size", "size_form"]

#: The largest balanced size: the counts are real numbers in float64, exact up to it.
MAX_SIZE = 2 ** 53


def effective_size(counts, alpha) -> float:
    """Kish effective size ``S^2 / sum c^2`` once each pattern's ``alpha_j`` copies are spread evenly."""
    copies = np.floor(alpha / counts * (1.0 + 1e-12) + 1e-12)
    square_sum = float(np.sum(counts * copies * copies + (alpha - copies * counts) * (2.0 * copies + 1.0)))
    return float(alpha.sum()) ** 2 / square_sum if square_sum > 0 else 0.0


def raise_weight_to_floor(solve, gamma, floor, size_of, *, max_doublings: int = 12, rel: float = 0.05):
    """The smallest weight (to ``rel``) whose solution's effective size reaches ``floor``.

    Doubles the weight until the floor holds, then bisects (in log) between the last
    failing and the first passing weight. Returns ``(weight, solution)``; where no
    weight up to ``gamma * 2**max_doublings`` reaches it, the largest one tried.
    """
    low, high, passing = gamma, None, None
    for _ in range(max_doublings):
        trial = low * 2.0
        run = solve(trial)
        if size_of(run) >= floor:
            high, passing = trial, run
            break
        low = trial
    if high is None:
        return low, run
    while high / low > 1.0 + rel:
        mid = float(np.sqrt(low * high))
        run = solve(mid)
        if size_of(run) >= floor:
            high, passing = mid, run
        else:
            low = mid
    return high, passing


def repeat_factor_counts(table, counts, target, total: float) -> np.ndarray:
    """Per-pattern counts ``n_j r_j`` of repeat-factor sampling towards a target, summing to ``total``.

    ``r_j = max(1, max_{c in j} sqrt(t d_c / f_c))`` over the pattern's classes with
    presence and target above 0 (LVIS's ``sqrt(t / f_c)`` with the presence taken
    relative to the target); the sum is non-decreasing in ``t``, which bisection finds.
    Where ``total`` is at most N (or no class qualifies) the counts themselves.
    """
    presence = np.asarray(table.class_presence(), dtype=np.float64)
    indptr, indices = table.sparse_patterns()
    indptr = np.asarray(indptr, dtype=np.int64)
    indices = np.asarray(indices, dtype=np.int64)
    usable = (presence > 0) & (target > 0)
    if total <= counts.sum() or not usable.any() or indices.size == 0:
        return counts.copy()
    # per pattern, the largest d_c / f_c among its classes (0 where none is usable)
    ratio = np.where(usable, target / np.where(usable, presence, 1.0), 0.0)
    rows = np.repeat(np.arange(counts.size), np.diff(indptr))
    worst = np.zeros(counts.size)
    np.maximum.at(worst, rows, ratio[indices])

    def size(t):
        return float(np.sum(counts * np.maximum(1.0, np.sqrt(t * worst))))

    lo, hi = 0.0, 1.0 / max(float(worst.max()), 1e-300)
    while size(hi) < total and hi < 1e300:
        hi *= 4.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if size(mid) < total else (lo, mid)
        if hi - lo <= 1e-13 * hi:
            break
    return counts * np.maximum(1.0, np.sqrt(hi * worst))


def size_keeping_lower_bounds(alpha, lower):
    """The smallest total ``S`` with ``S * p_j >= lower_j`` for ``p = alpha / sum(alpha)``.

    That is ``max_j lower_j / p_j`` over the patterns with a positive lower bound: at
    any smaller size the direction ``p`` would put some pattern below its bound. A
    pattern with ``p_j = 0`` but ``lower_j > 0`` makes it infinite (the caller clips).
    """
    p = alpha / alpha.sum()
    bounded = lower > 0
    if not bounded.any():
        return 0.0
    with np.errstate(divide="ignore"):
        return float(np.max(lower[bounded] / p[bounded]))


def check_size(total, lo_int, hi_int, what):
    if total > MAX_SIZE:
        raise ValueError(f"{what}{total} is beyond the largest balanced size, 2**53 = {MAX_SIZE} (the counts are "
                         f"real numbers in float64, exact up to it)")
    if not lo_int.sum() <= total <= hi_int.sum():
        raise ValueError(f"{what}{total} is outside what the per-pattern bounds allow, "
                         f"[{int(lo_int.sum())}, {hi_int.sum():.0f}]")
    if total == 0:
        raise ValueError("the balanced set would be empty (all counts at 0); forbid undersampling or "
                         "set n_samples_out / min_count")


def size_form(value):
    """``("count", int)`` or ``("ratio", float)``: the forms ``n_samples_out`` takes.

    An integer, an integer-valued float (``806.0``), or a ratio of the original size as
    a string: ``"1.25x"`` or ``"125%"``. ValueError names the value otherwise.
    """
    expected = ("a positive integer (or integer-valued float), a ratio of the original size such as '1.25x' or "
                "'125%', or None")
    if isinstance(value, str):
        text = value.strip()
        scale = 100.0 if text.endswith("%") else 1.0 if text.lower().endswith("x") else None
        try:
            ratio = float(text[:-1]) / scale if scale is not None else None
        except ValueError:
            ratio = None
        if ratio is None or not math.isfinite(ratio) or ratio <= 0:
            raise ValueError(f"n_samples_out must be {expected}, got {value!r}")
        return "ratio", ratio
    if isinstance(value, bool) or not isinstance(value, (Integral, Real)):
        raise ValueError(f"n_samples_out must be {expected}, got {value!r}")
    if not isinstance(value, Integral) and (not math.isfinite(value) or value != int(value)):
        raise ValueError(f"n_samples_out must be {expected}, got {value!r} (for a ratio write '{value}x')")
    if value < 1:
        raise ValueError(f"n_samples_out must be {expected}, got {value!r}")
    if value > MAX_SIZE:
        raise ValueError(f"n_samples_out must be at most 2**53 (exact in float64), got {value!r}")
    return "count", int(value)
