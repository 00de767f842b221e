"""From real repeat counts to an integer resampling plan.

Two steps, both vectorised numpy (no Python loop over samples or patterns):

1. :func:`round_counts` turns real per-pattern repeat counts ``alpha`` into integers
   inside integer bounds with a fixed total (largest-remainder rounding).
2. :class:`Plan` spreads each pattern's integer count over the pattern's member
   samples: every member gets ``count // n_members`` copies and a seeded random subset
   of ``count % n_members`` members one more. An oversampled pattern therefore copies
   its members round-robin (no member is copied twice before every member is copied
   once), and an undersampled pattern (``count < n_members``) keeps a seeded random
   subset of its members.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import numpy as np

from ._atomic import atomic_savez, atomic_write_text

__all__ = ["Plan", "round_counts", "scale_to_total"]

_FORMAT = "cobalance.Plan"
_FORMAT_VERSION = 1


# -- rounding ------------------------------------------------------------------------


def _real_vector(a, name: str, n: Optional[int] = None) -> np.ndarray:
    arr = np.asarray(a, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got ndim={arr.ndim}")
    if n is not None and arr.shape[0] != n:
        raise ValueError(f"{name} must have length {n}, got {arr.shape[0]}")
    if np.isnan(arr).any():
        raise ValueError(f"{name} must not contain NaN (first at position {int(np.flatnonzero(np.isnan(arr))[0])})")
    return arr


def _bound_vector(b, name: str, n: int, fill: float) -> np.ndarray:
    if b is None:
        return np.full(n, fill, dtype=np.float64)
    arr = np.asarray(b, dtype=np.float64)
    if arr.ndim == 0:
        arr = np.full(n, float(arr))
    return _real_vector(arr, name, n)


def _solve_clipped_sum(offset, slope, lower, upper, total: float) -> float:
    """The ``t`` with ``sum(clip(offset + slope * t, lower, upper)) == total``.

    ``slope`` is non-negative, so the sum is a continuous, non-decreasing, piecewise
    linear function of ``t``; it is evaluated exactly at its sorted breakpoints and
    interpolated on the segment that contains ``total``. The caller guarantees
    ``sum(lower) <= total <= sum(upper)``.
    """
    moving = slope > 0
    fixed_sum = float(np.clip(offset[~moving], lower[~moving], upper[~moving]).sum())
    o, s, lo, hi = offset[moving], slope[moving], lower[moving], upper[moving]
    if o.size == 0:
        return 0.0
    t_lo = (lo - o) / s  # below it the term sits at its lower bound
    t_hi = (hi - o) / s  # above it at its upper bound (inf when unbounded)
    points = np.concatenate([t_lo, t_hi])
    slope_change = np.concatenate([s, -s])
    finite = np.isfinite(points)
    points, slope_change = points[finite], slope_change[finite]
    order = np.argsort(points, kind="stable")
    points, slope_change = points[order], slope_change[order]
    # value at the first breakpoint: every term at its lower bound
    value = fixed_sum + lo.sum() + np.concatenate(
        [[0.0], np.cumsum(np.cumsum(slope_change)[:-1] * np.diff(points))])
    k = int(np.searchsorted(value, total, side="left"))
    if k == 0:
        return float(points[0])
    if k >= value.size:
        # beyond the last finite breakpoint the remaining slope is that of the unbounded terms
        rest = float(np.cumsum(slope_change)[-1])
        return float(points[-1] + (total - value[-1]) / rest) if rest > 0 else float(points[-1])
    slope_k = float(np.cumsum(slope_change)[k - 1])
    return float(points[k - 1] + (total - value[k - 1]) / slope_k) if slope_k > 0 else float(points[k - 1])


def scale_to_total(alpha, lower, upper, total: float) -> np.ndarray:
    """Rescale real counts to a given total, keeping their ratios where the bounds allow.

    Returns ``clip(s * alpha, lower, upper)`` with the factor ``s`` chosen so that the
    entries sum to ``total``. Fractions that depend only on ``alpha / sum(alpha)`` are
    unchanged unless a bound becomes active. Where no factor reaches ``total`` (the
    entries with ``alpha_j > 0`` all sit at their upper bound, the others at their
    lower bound), the remainder is added as one common shift, clipped to the bounds
    (the nearest point in the L2 sense, as in :func:`round_counts`).

    Raises
    ------
    ValueError
        ``alpha`` negative, or ``total`` outside ``[sum(lower), sum(upper)]``.
    """
    a = _real_vector(alpha, "alpha")
    lo = _bound_vector(lower, "lower", a.size, 0.0)
    hi = _bound_vector(upper, "upper", a.size, np.inf)
    if (a < 0).any():
        raise ValueError(f"alpha must be non-negative, got {a[a < 0][0]!r}")
    _check_total(total, lo, hi)
    s = _solve_clipped_sum(np.zeros_like(a), a, lo, hi, float(total))
    out = np.clip(s * a, lo, hi)
    if out.sum() < total - 1e-9 * max(1.0, abs(total)):
        shift = _solve_clipped_sum(out, np.ones_like(out), lo, hi, float(total))
        out = np.clip(out + shift, lo, hi)
    return out


def _check_total(total, lo, hi):
    if not np.isfinite(total):
        raise ValueError(f"total must be finite, got {total!r}")
    if total < lo.sum() - 1e-9 * max(1.0, abs(lo.sum())) or total > hi.sum() + 1e-9 * max(1.0, abs(hi.sum())):
        raise ValueError(f"total = {total!r} is outside the range the bounds allow, "
                         f"[sum(lower), sum(upper)] = [{lo.sum()!r}, {hi.sum()!r}]")


def round_counts(alpha, lower=None, upper=None, total: Optional[int] = None) -> np.ndarray:
    """Round real repeat counts to integers with a fixed total inside integer bounds.

    Parameters
    ----------
    alpha : array-like of float, shape (K,)
        Real counts.
    lower, upper : scalar or array-like, shape (K,), optional
        Integer-valued bounds (default 0 and unbounded); non-integer bounds are
        tightened to ``ceil(lower)`` and ``floor(upper)``.
    total : int, optional
        Sum of the result. Default ``round(sum(clip(alpha, lower, upper)))``.

    Returns
    -------
    ndarray of int64, shape (K,)
        The integer vector ``c`` with ``lower <= c <= upper`` and ``sum(c) == total``
        that is closest to ``alpha`` in the L2 sense. It is computed as follows:
        ``alpha`` is projected onto ``{x : lower <= x <= upper, sum(x) == total}``
        (a uniform shift, clipped to the bounds; zero when ``total`` is the rounded
        clipped sum and no bound binds), then every entry is rounded down and the
        ``total - sum(floor)`` entries with the largest remainders are rounded up
        (largest remainder; ties go to the lower index). Each entry is therefore the
        floor or the ceiling of its projected value.

    Raises
    ------
    ValueError
        Wrong shape, NaN, ``lower > upper`` somewhere, or ``total`` not an integer
        inside ``[sum(lower), sum(upper)]``.
    """
    a = _real_vector(alpha, "alpha")
    lo = np.ceil(_bound_vector(lower, "lower", a.size, 0.0) - 1e-9)
    hi = np.floor(_bound_vector(upper, "upper", a.size, np.inf) + 1e-9)
    if (lo > hi).any():
        j = int(np.flatnonzero(lo > hi)[0])
        raise ValueError(f"lower must not exceed upper; at position {j} the integer bounds are "
                         f"[{lo[j]!r}, {hi[j]!r}]")
    if not np.isfinite(lo).all():
        raise ValueError("lower must be finite")
    if total is None:
        total = int(np.rint(np.clip(a, lo, hi).sum()))
    else:
        if not isinstance(total, (int, np.integer)) and not (isinstance(total, float) and total.is_integer()):
            raise ValueError(f"total must be an integer, got {total!r}")
        total = int(total)
    _check_total(total, lo, hi)
    if a.size == 0:
        return np.zeros(0, dtype=np.int64)
    shift = _solve_clipped_sum(a, np.ones_like(a), lo, hi, float(total))
    projected = np.clip(a + shift, lo, hi)
    base = np.clip(np.floor(projected), lo, hi)
    remainder = projected - base
    missing = total - int(base.sum())
    # rounding noise in the projection may leave `missing` one off the ideal count
    # of round-ups; candidates are the entries that can still go up
    room = base < hi
    n_room = int(room.sum())
    if missing < 0 or missing > n_room:
        raise ValueError(f"cannot reach total = {total} within the bounds")  # guarded by _check_total
    if missing:
        candidates = np.flatnonzero(room)
        # stable sort on the negated remainder: largest first, ties by lower index
        up = candidates[np.argsort(-remainder[candidates], kind="stable")[:missing]]
        base[up] += 1
    return base.astype(np.int64)


# -- plan ----------------------------------------------------------------------------


def sum_by_group(groups: np.ndarray, values: np.ndarray, n_groups: int) -> np.ndarray:
    """Exact int64 sums of non-negative integer ``values`` per group id.

    ``np.bincount`` (fast, float64 weights) when the grand total stays below 2**53,
    where float64 sums of integers are exact; ``np.add.at`` in int64 otherwise.
    """
    if values.size == 0 or int(values.sum()) < 2 ** 53:
        return np.rint(np.bincount(groups, weights=values, minlength=n_groups)).astype(np.int64)
    out = np.zeros(n_groups, dtype=np.int64)
    np.add.at(out, groups, values)
    return out


def _generator(random_state):
    if isinstance(random_state, np.random.Generator):
        return random_state
    if random_state is None or isinstance(random_state, (int, np.integer)):
        if random_state is not None and random_state < 0:
            raise ValueError(f"random_state must be a non-negative integer, a numpy Generator or None, "
                             f"got {random_state!r}")
        return np.random.default_rng(random_state)
    raise ValueError(f"random_state must be a non-negative integer, a numpy Generator or None, "
                     f"got {random_state!r}")


def _copies_from_pattern_counts(inverse: np.ndarray, members: np.ndarray, counts: np.ndarray,
                                rng: np.random.Generator) -> np.ndarray:
    """Per-sample copies: ``counts // members`` each, plus one for a random subset of ``counts % members``."""
    quotient = counts // np.maximum(members, 1)
    remainder = counts - quotient * members
    copies = quotient[inverse]
    partial = remainder[inverse] > 0
    chosen = np.flatnonzero(partial)
    if chosen.size:
        # Visit the members of the partially filled patterns in a seeded random order,
        # then group them by pattern with a stable sort: within each pattern the
        # members stay in random order, and the first `remainder` of them get one
        # more copy. A stable sort has a unique result, so the plan does not depend
        # on the sort algorithm, the machine or the numpy build. Small pattern ids
        # make numpy use its linear-time radix sort.
        shuffled = chosen[rng.permutation(chosen.size)]
        groups = inverse[shuffled]
        n_groups = counts.size
        small = np.uint16 if n_groups <= np.iinfo(np.uint16).max else (
            np.uint32 if n_groups <= np.iinfo(np.uint32).max else np.int64)
        order = np.argsort(groups.astype(small), kind="stable")
        sorted_groups = groups[order]
        partial_groups = np.flatnonzero(remainder > 0)  # ascending: the order after the sort
        lengths = members[partial_groups]
        starts = np.cumsum(lengths) - lengths
        rank = np.arange(sorted_groups.size, dtype=np.int64) - np.repeat(starts, lengths)
        extra = rank < remainder[sorted_groups]
        copies[shuffled[order[extra]]] += 1
    return copies


class Plan:
    """Integer copies of every sample: the balanced dataset as an index list.

    Build one with :meth:`from_pattern_counts` (what :class:`cobalance.Balancer`
    does), :meth:`from_copies` (any per-sample sampler, e.g. repeat-factor sampling)
    or :meth:`identity`.

    Attributes
    ----------
    n_samples : int
        Size of the original dataset, N.
    n_samples_out : int
        Size of the balanced dataset, N' = ``copies.sum()``.
    copies : ndarray of int64, shape (N,)
        Copies of each sample in the balanced dataset (0 = dropped, 1 = kept once).
    pattern_counts : ndarray of int64, shape (K,) or None
        Copies per pattern (``None`` for a plan made from copies without a table).
    copy_index : ndarray of int64, shape (N',)
        Aligned with :meth:`indices`: 0 for a sample's original, ``k`` for its k-th
        duplicate (augmentation pipelines use it to leave originals untouched).
    """

    def __init__(self, copies, pattern_counts=None):
        self.copies = _check_copies(copies)
        self.pattern_counts = None if pattern_counts is None else np.ascontiguousarray(pattern_counts, dtype=np.int64)
        if self.pattern_counts is not None and int(self.pattern_counts.sum()) != int(self.copies.sum()):
            raise ValueError(f"pattern_counts sum to {int(self.pattern_counts.sum())} but copies to "
                             f"{int(self.copies.sum())}")
        self._copy_index = None

    # -- construction -------------------------------------------------------------

    @classmethod
    def from_pattern_counts(cls, table, pattern_counts, *, random_state=None) -> "Plan":
        """Spread integer per-pattern counts over the samples of each pattern.

        Parameters
        ----------
        table : PatternTable
            Must have its sample -> pattern index (``keep_inverse=True``).
        pattern_counts : array-like of int, shape (n_patterns,)
            Non-negative copies per pattern, e.g. from :func:`round_counts`.
        random_state : int, numpy Generator or None
            Seeds the choice of which members get the remainder copies. The same
            seed gives the same plan on any machine and thread count.

        Returns
        -------
        Plan
            Member ``s`` of pattern ``j`` gets ``c_j // n_j`` copies, plus one if it is
            among the ``c_j % n_j`` members picked at random for pattern ``j``.

        Raises
        ------
        ValueError
            Wrong length, negative or non-integer counts, table without inverse.
        """
        if not table.has_inverse:
            raise ValueError("table must keep its sample -> pattern index (built with keep_inverse=True)")
        counts = np.asarray(pattern_counts)
        if counts.ndim != 1 or counts.shape[0] != table.n_patterns:
            raise ValueError(f"pattern_counts must have shape ({table.n_patterns},), got {counts.shape}")
        if counts.size and counts.dtype.kind not in "iu":
            if counts.dtype.kind != "f" or not np.all(np.isfinite(counts)) or not np.all(counts == np.round(counts)):
                raise ValueError(f"pattern_counts must hold integers, got dtype {counts.dtype}")
        counts = counts.astype(np.int64)
        if (counts < 0).any():
            j = int(np.flatnonzero(counts < 0)[0])
            raise ValueError(f"pattern_counts must be non-negative, got {counts[j]} for pattern {j}")
        rng = _generator(random_state)
        copies = _copies_from_pattern_counts(np.asarray(table.inverse), np.asarray(table.counts, dtype=np.int64),
                                             counts, rng)
        return cls(copies, counts)

    @classmethod
    def from_copies(cls, copies, table=None) -> "Plan":
        """A plan from per-sample copies (for samplers that decide per sample).

        Parameters
        ----------
        copies : array-like of int, shape (N,)
            Non-negative copies of each sample (copied to int64).
        table : PatternTable, optional
            When given (with its inverse), ``pattern_counts`` is filled in.
        """
        copies = _check_copies(copies)
        pattern_counts = None
        if table is not None:
            if not table.has_inverse:
                raise ValueError("table must keep its sample -> pattern index (built with keep_inverse=True)")
            if table.n_samples != copies.size:
                raise ValueError(f"copies has {copies.size} entries but the table has {table.n_samples} samples")
            pattern_counts = sum_by_group(np.asarray(table.inverse), copies, table.n_patterns)
        return cls(copies, pattern_counts)

    @classmethod
    def identity(cls, n_samples: int) -> "Plan":
        """The plan that keeps each of ``n_samples`` samples once."""
        if not isinstance(n_samples, (int, np.integer)) or n_samples < 0:
            raise ValueError(f"n_samples must be a non-negative integer, got {n_samples!r}")
        return cls(np.ones(int(n_samples), dtype=np.int64))

    # -- views ---------------------------------------------------------------------

    @property
    def n_samples(self) -> int:
        return int(self.copies.size)

    @property
    def n_samples_out(self) -> int:
        return int(self.copies.sum())

    def indices(self) -> np.ndarray:
        """The balanced index list (int64, length N'), in sample order.

        Sample ``s`` appears ``copies[s]`` times, its entries adjacent; shuffle it
        (or use a sampler) for training.
        """
        return np.repeat(np.arange(self.copies.size, dtype=np.int64), self.copies)

    @property
    def copy_index(self) -> np.ndarray:
        if self._copy_index is None:
            ends = np.cumsum(self.copies)
            starts = ends - self.copies
            self._copy_index = np.arange(self.n_samples_out, dtype=np.int64) - np.repeat(starts, self.copies)
        return self._copy_index

    @property
    def n_dropped(self) -> int:
        """Samples with no copy."""
        return int(np.count_nonzero(self.copies == 0))

    @property
    def n_duplicates(self) -> int:
        """Entries beyond each sample's first: ``sum(max(copies - 1, 0))``."""
        return int(np.maximum(self.copies - 1, 0).sum())

    def __len__(self) -> int:
        return self.n_samples_out

    def __repr__(self) -> str:
        return (f"Plan(n_samples={self.n_samples}, n_samples_out={self.n_samples_out}, "
                f"duplicates={self.n_duplicates}, dropped={self.n_dropped})")

    def __eq__(self, other) -> bool:
        if not isinstance(other, Plan):
            return NotImplemented
        if (self.pattern_counts is None) != (other.pattern_counts is None):
            return False
        same_counts = self.pattern_counts is None or np.array_equal(self.pattern_counts, other.pattern_counts)
        return same_counts and np.array_equal(self.copies, other.copies)

    __hash__ = None  # mutable-array container

    # -- persistence ---------------------------------------------------------------

    def save(self, path) -> str:
        """Write the plan atomically; the format follows the suffix.

        ``.json`` writes a text file, anything else an ``.npz`` (``.npz`` is appended
        when missing). Both hold the format name, version, per-sample copies and
        per-pattern counts, and load back exactly. Returns the written path.
        """
        path = os.fspath(path)
        if path.endswith(".json"):
            doc = {
                "format": _FORMAT,
                "version": _FORMAT_VERSION,
                "n_samples": self.n_samples,
                "n_samples_out": self.n_samples_out,
                "copies": self.copies.tolist(),
                "pattern_counts": None if self.pattern_counts is None else self.pattern_counts.tolist(),
            }
            atomic_write_text(path, json.dumps(doc, separators=(",", ":")))
            return path
        arrays = dict(format=np.array(_FORMAT), version=np.array(_FORMAT_VERSION), copies=self.copies)
        if self.pattern_counts is not None:
            arrays["pattern_counts"] = self.pattern_counts
        return atomic_savez(path, arrays)

    @classmethod
    def load(cls, path) -> "Plan":
        """Read a plan written by :meth:`save` (``.json`` or ``.npz`` by suffix)."""
        name = os.fspath(path)
        if name.endswith(".json"):
            with open(name, encoding="utf-8") as f:
                doc = json.load(f)
            if not isinstance(doc, dict) or doc.get("format") != _FORMAT:
                raise ValueError(f"{name!r} is not a cobalance plan file")
            _check_version(doc.get("version"), name)
            copies = np.array(doc["copies"], dtype=np.int64)
            counts = doc.get("pattern_counts")
            counts = None if counts is None else np.array(counts, dtype=np.int64)
            if "n_samples" in doc and int(doc["n_samples"]) != copies.size:
                raise ValueError(f"{name!r}: n_samples = {doc['n_samples']} but {copies.size} copies are stored")
        else:
            with np.load(name, allow_pickle=False) as z:
                if "format" not in z or str(z["format"]) != _FORMAT:
                    raise ValueError(f"{name!r} is not a cobalance plan file")
                _check_version(int(z["version"]), name)
                copies = np.array(z["copies"], dtype=np.int64)
                counts = np.array(z["pattern_counts"], dtype=np.int64) if "pattern_counts" in z else None
        if counts is not None and counts.sum() != copies.sum():
            raise ValueError(f"{name!r}: pattern_counts sum to {counts.sum()} but copies to {copies.sum()}")
        return cls(copies, counts)


def _check_version(version, name):
    if not isinstance(version, (int, np.integer)) or version < 1 or version > _FORMAT_VERSION:
        raise ValueError(f"{name!r} has plan format version {version!r}; this cobalance reads 1 to {_FORMAT_VERSION}")


def _check_copies(copies) -> np.ndarray:
    arr = np.asarray(copies)
    if arr.ndim != 1:
        raise ValueError(f"copies must be 1-D, got ndim={arr.ndim}")
    if arr.size and arr.dtype.kind not in "iu":
        raise ValueError(f"copies must hold integers, got dtype {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.int64)
    if arr.size and arr.min() < 0:
        s = int(np.argmin(arr))
        raise ValueError(f"copies must be non-negative, got {arr[s]} for sample {s}")
    return arr
