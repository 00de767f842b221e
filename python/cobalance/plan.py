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

from . import _provenance
from ._atomic import atomic_savez, atomic_write_text
from ._strict import (INT64_MAX, exact_sum, exact_sum_fits, json_int, json_int_list, npz_fields, npz_int,
                      npz_int_vector, npz_str, open_npz, read_json)

__all__ = ["Plan", "round_counts", "scale_to_total"]

_FORMAT = "cobalance.Plan"
_FORMAT_VERSION = 1
#: Largest total :func:`round_counts` accepts: it works in float64, whose integers are
#: exact up to 2**53.
_MAX_ROUNDED_TOTAL = 2 ** 53


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
        clipped_sum = float(np.clip(a, lo, hi).sum())
        if not clipped_sum <= _MAX_ROUNDED_TOTAL:
            raise ValueError(f"alpha clipped to the bounds sums to {clipped_sum!r}, beyond the largest total "
                             f"round_counts handles exactly, 2**53 = {_MAX_ROUNDED_TOTAL}")
        total = int(np.rint(clipped_sum))
    else:
        if isinstance(total, (bool, np.bool_)) or (
                not isinstance(total, (int, np.integer)) and not (isinstance(total, float) and total.is_integer())):
            raise ValueError(f"total must be an integer, got {total!r}")
        total = int(total)
        if total > _MAX_ROUNDED_TOTAL:
            raise ValueError(f"total must be at most 2**53 = {_MAX_ROUNDED_TOTAL} (integers exact in float64), "
                             f"got {total}")
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
    where float64 sums of integers are exact; ``np.add.at`` in int64 otherwise (the
    caller guarantees that the grand total fits int64).
    """
    if values.size == 0 or exact_sum(values) < 2 ** 53:
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


class Plan(_provenance.Recorded):
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
    provenance : dict or None
        Where the plan came from (e.g. the table's path and SHA-256, the target, the
        balancer's options), as JSON values; saved inside the file by :meth:`save`
        and read back by :meth:`load`. None (the default) when not set. The command
        line fills it; it takes no part in ``==``.
    """

    def __init__(self, copies, pattern_counts=None):
        """A plan from per-sample copies and, optionally, the per-pattern counts they sum to.

        Raises
        ------
        ValueError
            ``copies`` or ``pattern_counts`` not 1-D arrays of non-negative integers
            (booleans and floats are refused), their totals beyond int64, or
            ``pattern_counts`` not summing to the same total as ``copies``.
        """
        self.copies = _check_copies(copies)
        total = exact_sum(self.copies)
        self.pattern_counts = None
        if pattern_counts is not None:
            self.pattern_counts = _check_counts(pattern_counts, "pattern_counts")
            counts_total = exact_sum(self.pattern_counts)
            if counts_total != total:
                raise ValueError(f"pattern_counts sum to {counts_total} but copies to {total}")
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
            Wrong length, negative or non-integer counts, counts summing beyond
            int64, table without inverse.
        """
        if not table.has_inverse:
            raise ValueError("table must keep its sample -> pattern index (built with keep_inverse=True)")
        counts = np.asarray(pattern_counts)
        if counts.ndim != 1 or counts.shape[0] != table.n_patterns:
            raise ValueError(f"pattern_counts must have shape ({table.n_patterns},), got {counts.shape}")
        counts = _check_counts(counts, "pattern_counts", integral_floats=True)
        # the copies sum to the same total: refused here, before it wraps in the spread
        exact_sum_fits(counts, "pattern_counts")
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

        Raises
        ------
        ValueError
            ``copies`` not non-negative integers, their total beyond int64, or a
            table without its inverse or of another length.
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

    def indices(self, order: str = "sorted", *, random_state=None) -> np.ndarray:
        """The balanced index list (int64, length N').

        Parameters
        ----------
        order : {"sorted", "shuffled"}
            ``"sorted"`` (default): in sample order, sample ``s`` appearing
            ``copies[s]`` times with its entries adjacent - shuffle it (or use a
            sampler) before training on it in this order. ``"shuffled"``: the same
            entries in a random order drawn from ``random_state``.
        random_state : int, numpy Generator or None
            Seed of the shuffled order (the same seed gives the same order); ignored
            for ``"sorted"``.

        Raises
        ------
        ValueError
            ``order`` not one of the two, or a bad ``random_state``.
        """
        if order not in ("sorted", "shuffled"):
            raise ValueError(f"order must be 'sorted' or 'shuffled', got {order!r}")
        idx = np.repeat(np.arange(self.copies.size, dtype=np.int64), self.copies)
        if order == "shuffled":
            _generator(random_state).shuffle(idx)
        return idx

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
        per-pattern counts, and, when set, the :attr:`provenance` (the ``.json``'s
        ``"provenance"`` object, the ``.npz``'s ``provenance`` array of JSON text);
        they load back exactly. Returns the written path.
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
            if self._provenance is not None:
                doc["provenance"] = self._provenance
            atomic_write_text(path, json.dumps(doc, separators=(",", ":")))
            return path
        arrays = dict(format=np.array(_FORMAT), version=np.array(_FORMAT_VERSION), copies=self.copies)
        if self.pattern_counts is not None:
            arrays["pattern_counts"] = self.pattern_counts
        if self._provenance is not None:
            arrays["provenance"] = np.array(_provenance.to_text(self._provenance))
        return atomic_savez(path, arrays)

    @classmethod
    def load(cls, path) -> "Plan":
        """Read a plan written by :meth:`save` (``.json`` or ``.npz`` by suffix).

        The file is checked as strictly as the constructor checks its arguments:
        copies and counts must be stored as integers (not floats, not booleans),
        non-negative, with totals that agree with each other and with the stored
        sizes; the format name and version must be known; a provenance, when
        stored, must be a JSON object.

        Raises
        ------
        ValueError
            The file is not a plan file or contradicts itself (the message names the
            file, the field and what was expected).
        OSError
            The file cannot be opened (``FileNotFoundError`` when it does not exist).
        """
        name = os.fspath(path)
        if name.endswith(".json"):
            return _load_json(cls, name)
        return _load_npz(cls, name)


_JSON_FIELDS = ("format", "version", "n_samples", "n_samples_out", "copies", "pattern_counts")
#: Fields a plan's JSON may hold besides :data:`_JSON_FIELDS`.
_JSON_OPTIONAL = ("provenance",)


def _load_json(cls, name: str) -> "Plan":
    doc = read_json(name, "plan")
    if not isinstance(doc, dict) or doc.get("format") != _FORMAT:
        got = doc.get("format") if isinstance(doc, dict) else doc
        raise ValueError(f"{name!r} is not a cobalance plan file (its format is {_shown_format(got)}, "
                         f"expected {_FORMAT!r})")
    _check_version(doc.get("version"), name)
    missing = [key for key in _JSON_FIELDS if key not in doc]
    if missing:
        raise ValueError(f"{name!r} is not a complete cobalance plan file: the field(s) "
                         f"{', '.join(map(repr, missing))} are missing")
    unknown = [key for key in doc if key not in _JSON_FIELDS + _JSON_OPTIONAL]
    if unknown:
        raise ValueError(f"{name!r}: unknown field(s) {', '.join(repr(k[:40]) for k in unknown[:5])} in a plan "
                         f"file (it holds {', '.join(_JSON_FIELDS + _JSON_OPTIONAL)})")
    provenance = doc.get("provenance")
    if provenance is not None:
        provenance = _provenance.from_json_value(provenance, repr(name))
    copies = json_int_list(doc["copies"], repr(name), "copies")
    counts = doc["pattern_counts"]
    counts = None if counts is None else json_int_list(counts, repr(name), "pattern_counts")
    plan = _construct(cls, copies, counts, name)
    n_samples = json_int(doc["n_samples"], repr(name), "n_samples")
    if n_samples != plan.n_samples:
        raise ValueError(f"{name!r}: n_samples = {n_samples} but {plan.n_samples} copies are stored")
    n_samples_out = json_int(doc["n_samples_out"], repr(name), "n_samples_out")
    if n_samples_out != plan.n_samples_out:
        raise ValueError(f"{name!r}: n_samples_out = {n_samples_out} but the stored copies sum to "
                         f"{plan.n_samples_out}")
    plan._provenance = provenance  # decoded from JSON: already plain JSON values
    return plan


def _load_npz(cls, name: str) -> "Plan":
    where = repr(name)
    with open_npz(name, "plan") as archive:
        if "format" not in archive.files:
            raise ValueError(f"{where} is not a cobalance plan file (it has no 'format' array)")
        fields = npz_fields(archive, name, "plan", ("format", "version", "copies"), ("pattern_counts", "provenance"))
    if npz_str(fields["format"], where, "format") != _FORMAT:
        raise ValueError(f"{where} is not a cobalance plan file (its format is "
                         f"{_shown_format(str(fields['format']))}, expected {_FORMAT!r})")
    _check_version(npz_int(fields["version"], where, "version", low=-INT64_MAX - 1), name)
    copies = npz_int_vector(fields["copies"], where, "copies")
    counts = fields.get("pattern_counts")
    counts = None if counts is None else npz_int_vector(counts, where, "pattern_counts")
    provenance = fields.get("provenance")
    provenance = None if provenance is None else _provenance.from_npz_text(provenance, where)
    plan = _construct(cls, copies, counts, name)
    plan._provenance = provenance
    return plan


def _construct(cls, copies, counts, name: str) -> "Plan":
    """The constructor's checks, with the file named in their message."""
    try:
        return cls(copies, counts)
    except ValueError as e:
        raise ValueError(f"{name!r}: {e}") from None


def _shown_format(value) -> str:
    if isinstance(value, str):
        return repr(value[:40])
    return "missing" if value is None else f"not a text ({type(value).__name__})"


def _check_version(version, name):
    if isinstance(version, (bool, np.bool_)) or not isinstance(version, (int, np.integer)) \
            or version < 1 or version > _FORMAT_VERSION:
        shown = repr(version) if isinstance(version, (int, float, str, type(None))) else type(version).__name__
        raise ValueError(f"{name!r} has plan format version {shown[:40]}; this cobalance reads 1 to "
                         f"{_FORMAT_VERSION}")


def _check_counts(values, name: str, *, integral_floats: bool = False) -> np.ndarray:
    """Non-negative integers that int64 holds, as a contiguous int64 array.

    ``integral_floats``: finite floats with integer values are accepted too (as
    :func:`round_counts`'s callers may pass them); booleans never are.
    """
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got ndim={arr.ndim}")
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    kind = arr.dtype.kind
    if kind == "f" and integral_floats:
        bad = ~np.isfinite(arr) | (arr != np.round(arr)) | (arr < 0) | (arr >= 2.0 ** 63)
        if bad.any():
            j = int(np.flatnonzero(bad)[0])
            raise ValueError(f"{name} must hold non-negative integers below 2**63, got {arr[j].item()!r} at "
                             f"position {j}")
    elif kind not in "iu":
        raise ValueError(f"{name} must hold integers, got dtype {arr.dtype}")
    elif kind == "u" and int(arr.max()) > INT64_MAX:
        j = int(np.argmax(arr))
        raise ValueError(f"{name} must hold integers below 2**63, got {int(arr[j])} at position {j}")
    arr = np.ascontiguousarray(arr, dtype=np.int64)
    if arr.min() < 0:
        j = int(np.argmin(arr))
        raise ValueError(f"{name} must be non-negative, got {arr[j]} at position {j}")
    return arr


def _check_copies(copies) -> np.ndarray:
    arr = np.asarray(copies)
    if arr.ndim != 1:
        raise ValueError(f"copies must be 1-D, got ndim={arr.ndim}")
    if arr.size and arr.dtype.kind not in "iu":
        raise ValueError(f"copies must hold integers, got dtype {arr.dtype}")
    if arr.size and arr.dtype.kind == "u" and int(arr.max()) > INT64_MAX:
        s = int(np.argmax(arr))
        raise ValueError(f"copies must hold integers below 2**63, got {int(arr[s])} for sample {s}")
    arr = np.ascontiguousarray(arr, dtype=np.int64)
    if arr.size and arr.min() < 0:
        s = int(np.argmin(arr))
        raise ValueError(f"copies must be non-negative, got {arr[s]} for sample {s}")
    # n_samples_out, indices() and copy_index count in int64
    exact_sum_fits(arr, "copies")
    return arr
