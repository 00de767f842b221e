"""Multi-label resamplers of the literature, each returning a :class:`cobalance.Plan`.

=====================  ==============================================  ===============================
function               method                                          runs
=====================  ==============================================  ===============================
:func:`ml_ros`         ML-ROS: clone samples of minority labels        one Python step per clone
:func:`ml_rus`         ML-RUS: delete samples of majority labels       one Python step per deletion
:func:`lp_ros`         LP-ROS: clone samples of rare labelsets         vectorised, exact bag counts
:func:`lp_rus`         LP-RUS: delete samples of frequent labelsets    vectorised, exact bag counts
:func:`repeat_factor`  repeat-factor sampling (LVIS)                   vectorised, systematic rounding
=====================  ==============================================  ===============================

Charte, Rivera, del Jesus and Herrera, "Addressing imbalance in multilabel
classification: measures and random resampling algorithms", Neurocomputing 163 (2015).
Gupta, Dollar and Girshick, "LVIS: A Dataset for Large Vocabulary Instance
Segmentation", CVPR 2019.

Every function takes a 0/1 label matrix or a :class:`cobalance.PatternTable` with its
sample -> pattern index; the labels are grouped into a table either way, so a sample's
labels are those of its pattern. When a table is given, the plan's ``pattern_counts``
are filled in from it.

ML-ROS and ML-RUS are sequential by nature: whether a bag takes part in the next round
depends on the label counts after each single clone or deletion. They run one Python
step per clone or deletion, costing O(labels of the sample) plus, for ML-RUS, an
O(n_classes) maximum when a label at the maximum count loses a sample; the uniforms
are fetched from the generator in blocks. LP-ROS and LP-RUS give each labelset bag an
integer count in closed form (exact integer arithmetic) and draw all samples at once.
"""

from __future__ import annotations

import math

import numpy as np

from .patterns import PatternTable
from .plan import Plan

__all__ = ["ml_ros", "ml_rus", "lp_ros", "lp_rus", "repeat_factor"]

#: Uniforms fetched from the generator at a time by the sequential ML methods.
_DRAW_BLOCK = 1 << 16

#: Largest intermediate value for which the labelset increments are computed in int64;
#: above it they are computed with Python integers (numpy object arrays), which are exact
#: at any size. Tests lower it to force the Python-integer path.
_INT64_BOUND = 1 << 62


# -- input checks --------------------------------------------------------------------


def _pattern_table(labels):
    """``(table, given)``: the labels grouped into a table; ``given`` when the caller passed one."""
    if isinstance(labels, PatternTable):
        if not labels.has_inverse:
            raise ValueError("labels is a PatternTable without its sample -> pattern index; "
                             "build it with keep_inverse=True")
        table, given = labels, True
    else:
        arr = np.asarray(labels)
        if arr.ndim == 2 and arr.shape[0] == 0:
            raise ValueError(f"labels must have at least one sample (row), got shape {arr.shape}")
        table, given = PatternTable.from_labels(arr), False
    if table.n_samples == 0:
        raise ValueError("labels must have at least one sample (row), got a table of 0 samples")
    return table, given


def _is_number(x) -> bool:
    """A real scalar, not a bool (``True`` as a percentage is a mistake, not 1)."""
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, (bool, np.bool_))


def _percentage(percentage, *, below_100: bool) -> float:
    expected = "a number in [0, 100)" if below_100 else "a finite number >= 0"
    if not _is_number(percentage):
        raise ValueError(f"percentage must be {expected}, got {percentage!r}")
    p = float(percentage)
    ok = 0.0 <= p < 100.0 if below_100 else 0.0 <= p < math.inf
    if not ok:
        raise ValueError(f"percentage must be {expected}, got {percentage!r}")
    return p


def _generator(random_state) -> np.random.Generator:
    try:
        return np.random.default_rng(random_state)
    except (TypeError, ValueError) as err:
        raise ValueError(f"random_state must be a non-negative integer, a numpy Generator or None, "
                         f"got {random_state!r}") from err


def _budget(n_samples: int, percentage: float) -> int:
    return int(math.floor(n_samples * percentage / 100.0))


def _plan(copies: np.ndarray, table, given: bool) -> Plan:
    return Plan.from_copies(copies, table if given else None)


# -- ML-ROS / ML-RUS -----------------------------------------------------------------


def _label_imbalance(class_counts: np.ndarray):
    """``(IRLbl, MeanIR)``: IRLbl is 0 for absent labels; ``(None, None)`` when no label is present."""
    present = class_counts > 0
    if not present.any():
        return None, None
    ir = np.zeros(class_counts.size, dtype=np.float64)
    ir[present] = class_counts.max() / class_counts[present]
    # fsum: a correctly rounded mean, so that "IRLbl > MeanIR" does not hinge on summation order
    mean_ir = math.fsum(ir[present].tolist()) / int(present.sum())
    return ir, mean_ir


def _label_bags(table, bag_labels: np.ndarray) -> list:
    """For each label of ``bag_labels`` (ascending), the samples containing it, ascending.

    Expands the (sample, label) pairs of the wanted labels only and sorts them by label
    once, so the cost is that of the pairs, not N per label.
    """
    indptr, indices = table.sparse_patterns()
    indptr = np.asarray(indptr, dtype=np.int64)
    indices = np.asarray(indices, dtype=np.int64)
    inverse = np.asarray(table.inverse, dtype=np.int64)
    n_patterns, n_samples = table.n_patterns, table.n_samples
    wanted = np.zeros(table.n_classes, dtype=bool)
    wanted[bag_labels] = True
    keep = wanted[indices]
    entry_pattern = np.repeat(np.arange(n_patterns, dtype=np.int64), np.diff(indptr))
    sub_labels = indices[keep]  # grouped by pattern
    sub_degree = np.bincount(entry_pattern[keep], minlength=n_patterns)
    sub_start = np.cumsum(sub_degree) - sub_degree
    lengths = sub_degree[inverse]
    pair_start = np.cumsum(lengths) - lengths
    n_pairs = int(lengths.sum())
    offset = np.arange(n_pairs, dtype=np.int64) - np.repeat(pair_start, lengths)
    pair_label = sub_labels[np.repeat(sub_start[inverse], lengths) + offset]
    pair_sample = np.repeat(np.arange(n_samples, dtype=np.int64), lengths)
    # stable: the samples of each label stay in ascending order
    members = pair_sample[np.argsort(pair_label, kind="stable")]
    sizes = np.bincount(pair_label, minlength=table.n_classes)[bag_labels]
    return np.split(members, np.cumsum(sizes)[:-1])


def _uniforms(rng: np.random.Generator, block: int):
    """Endless uniforms in [0, 1): the sequence of successive ``rng.random()`` calls, fetched in blocks."""
    while True:
        yield from rng.random(block).tolist()


class _PatternLabels:
    """Labels of a pattern as a Python list, built on first use (most patterns are never asked for)."""

    def __init__(self, table):
        indptr, indices = table.sparse_patterns()
        self._indptr, self._indices = np.asarray(indptr), np.asarray(indices)
        self._inverse = np.asarray(table.inverse)
        self._cache = {}

    def of_sample(self, s: int) -> list:
        p = int(self._inverse[s])
        found = self._cache.get(p)
        if found is None:
            found = self._cache[p] = self._indices[self._indptr[p]:self._indptr[p + 1]].tolist()
        return found


def _setting(labels, percentage, random_state, *, below_100: bool):
    """What Charte et al.'s four methods start from: the generator, the table (and
    whether it was given) and the budget in samples."""
    p = _percentage(percentage, below_100=below_100)
    rng = _generator(random_state)
    table, given = _pattern_table(labels)
    return rng, table, given, _budget(table.n_samples, p)


def _label_setting(labels, percentage, random_state, *, below_100: bool):
    """:func:`_setting` plus the label counts, IRLbl and MeanIR (ML-ROS and ML-RUS)."""
    rng, table, given, budget = _setting(labels, percentage, random_state, below_100=below_100)
    counts = np.asarray(table.class_counts(), dtype=np.int64)
    ir, mean_ir = _label_imbalance(counts)
    return rng, table, given, budget, counts, ir, mean_ir


def ml_ros(labels, percentage=25, *, random_state=None) -> Plan:
    """ML-ROS: clone random samples of the minority labels until they reach MeanIR.

    Charte, Rivera, del Jesus and Herrera (Neurocomputing 163, 2015), algorithm ML-ROS.
    With ``count(l)`` the number of samples containing label ``l``, the imbalance ratio
    of a present label is ``IRLbl(l) = max_l' count(l') / count(l)``, and ``MeanIR`` is
    its mean over the present labels, computed once on the original data. Each label
    with ``IRLbl > MeanIR`` forms a *minority bag*: the original samples containing it.
    The budget is ``floor(N * percentage / 100)`` clones. In rounds, every remaining bag
    in label order clones one of its samples, picked uniformly; the label counts grow by
    the clone's labels, and a bag whose label's IRLbl (current maximum count over its
    current count) has fallen to ``MeanIR`` or below leaves. Cloning stops when the
    budget is spent or no bag remains, so the plan adds *fewer* clones than the budget
    when every bag reaches ``MeanIR`` first.

    Parameters
    ----------
    labels : array-like of shape (N, C) or PatternTable
        0/1 or bool label matrix, or a pattern table with its sample -> pattern index.
    percentage : float, default 25
        Clone budget as a percentage of N; any finite value >= 0 (above 100 the data
        set may more than double).
    random_state : int, numpy Generator or None
        Seeds the picks. Clone ``k`` (counted over all rounds) uses the ``k``-th uniform
        ``u`` of the generator and takes sample ``floor(u * size)`` of its bag, the bag
        listed in ascending sample order.

    Returns
    -------
    Plan
        ``copies`` is 1 plus the number of clones of each sample; no sample is dropped.
        ``pattern_counts`` is filled in when ``labels`` is a table.

    Raises
    ------
    ValueError
        ``labels`` not 2-D, not 0/1, without rows or columns, a table without inverse;
        ``percentage`` negative or not finite; a bad ``random_state``.

    Notes
    -----
    Bags hold the original samples only; clones are not added to them. Cloning stops
    as soon as the budget is spent, also in the middle of a round, so it is never
    exceeded. A data set without any label, or whose labels are all equally frequent,
    has no minority bag and gets the identity plan.
    """
    rng, table, given, budget, counts, ir, mean_ir = _label_setting(labels, percentage, random_state, below_100=False)
    n = table.n_samples
    copies = np.ones(n, dtype=np.int64)
    if budget == 0 or ir is None:
        return _plan(copies, table, given)
    minority = np.flatnonzero(ir > mean_ir)
    bags = [(int(label), members, members.size) for label, members in zip(minority, _label_bags(table, minority))]
    labels_of = _PatternLabels(table)
    count = counts.tolist()
    top = max(count)
    draw = _uniforms(rng, min(budget, _DRAW_BLOCK))
    clones = []
    left = budget
    while left and bags:
        still = []
        for bag in bags:
            label, members, size = bag
            s = int(members[min(int(next(draw) * size), size - 1)])
            clones.append(s)
            for c in labels_of.of_sample(s):
                count[c] += 1
                if count[c] > top:
                    top = count[c]
            left -= 1
            if top / count[label] > mean_ir:
                still.append(bag)
            if not left:
                break
        bags = still
    copies += np.bincount(np.asarray(clones, dtype=np.int64), minlength=n)
    return _plan(copies, table, given)


def ml_rus(labels, percentage=25, *, random_state=None) -> Plan:
    """ML-RUS: delete random samples of the majority labels until they reach MeanIR.

    Charte, Rivera, del Jesus and Herrera (Neurocomputing 163, 2015), algorithm ML-RUS.
    ``IRLbl`` and ``MeanIR`` as in :func:`ml_ros`, on the original data. Each present
    label with ``IRLbl < MeanIR`` forms a *majority bag* (the samples containing it).
    The budget is ``floor(N * percentage / 100)`` deletions. In rounds, every remaining
    bag in label order deletes one of its samples not yet deleted, picked uniformly; the
    label counts drop by the sample's labels, and a
    bag whose label's IRLbl has risen to ``MeanIR`` or above leaves. Deletion stops when
    the budget is spent or no bag remains, so fewer samples than the budget may go.

    Parameters
    ----------
    labels : array-like of shape (N, C) or PatternTable
        0/1 or bool label matrix, or a pattern table with its sample -> pattern index.
    percentage : float, default 25
        Deletion budget as a percentage of N, in [0, 100).
    random_state : int, numpy Generator or None
        Seeds the picks. A pick draws ``u`` and looks at entry ``floor(u * n)`` of the
        bag's ``n`` remaining candidates; a candidate that cannot be deleted (already
        deleted through another bag, or protected, see Notes) is removed from the bag
        and the pick draws again, so the chosen sample is uniform over the deletable ones.

    Returns
    -------
    Plan
        ``copies`` is 0 for a deleted sample and 1 otherwise.
        ``pattern_counts`` is filled in when ``labels`` is a table.

    Raises
    ------
    ValueError
        ``labels`` not 2-D, not 0/1, without rows or columns, a table without inverse;
        ``percentage`` outside [0, 100); a bad ``random_state``.

    Notes
    -----
    Deviation from the paper, for safety: a sample whose deletion would leave one of
    its labels with no sample at all is never deleted (a majority sample may carry a
    rare label), and a bag with no deletable sample left leaves. Label counts only fall,
    so a sample once protected stays protected.
    """
    rng, table, given, budget, counts, ir, mean_ir = _label_setting(labels, percentage, random_state, below_100=True)
    n = table.n_samples
    copies = np.ones(n, dtype=np.int64)
    if budget == 0 or ir is None:
        return _plan(copies, table, given)
    majority = np.flatnonzero((counts > 0) & (ir < mean_ir))
    # [label, candidates, number of candidates left]; candidates are swap-removed in place
    bags = [[int(label), members.copy(), members.size]
            for label, members in zip(majority, _label_bags(table, majority))]
    labels_of = _PatternLabels(table)
    count = counts.tolist()
    top = max(count)
    deleted = bytearray(n)
    draw = _uniforms(rng, min(budget, _DRAW_BLOCK))
    left = budget
    while left and bags:
        still = []
        for bag in bags:
            label, members, size = bag
            chosen = -1
            while size:
                i = min(int(next(draw) * size), size - 1)
                s = int(members[i])
                # the candidate leaves the bag either way: deleted now, or never deletable
                size -= 1
                members[i] = members[size]
                sample_labels = labels_of.of_sample(s)
                if not deleted[s] and all(count[c] > 1 for c in sample_labels):
                    chosen = s
                    break
            bag[2] = size
            if chosen < 0:
                continue
            deleted[chosen] = 1
            touched_top = False
            for c in sample_labels:
                touched_top = touched_top or count[c] == top
                count[c] -= 1
            if touched_top:  # the maximum can only fall when a label at the maximum fell
                top = max(count)
            left -= 1
            if top / count[label] < mean_ir:
                still.append(bag)
            if not left:
                break
        bags = still
    copies[np.frombuffer(bytes(deleted), dtype=np.uint8).astype(bool)] = 0
    return _plan(copies, table, given)


# -- LP-ROS / LP-RUS -----------------------------------------------------------------


def _bag_increments(scaled_gaps: np.ndarray, scaled_budget: int, scale: int) -> np.ndarray:
    """Integer per-bag counts of the LP methods, exactly.

    The bags, in processing order, have real gaps ``scaled_gaps / scale`` to the mean
    bag size (non-decreasing, since bags are processed from the one nearest the mean)
    and share the budget ``scaled_budget / scale``. Bag ``i`` gets the real increment
    ``min(gap_i, remaining / bags_left)``. Once a bag takes the plain share, the share
    stays the same and the gaps only grow, so every later bag takes it too: the first
    ``k`` bags get their gaps, the rest equal shares. The real increments become
    integers as ``floor(S_i) - floor(S_{i-1})`` with ``S`` their cumulative sum, all in
    integers scaled by ``scale`` (and ``bags_left``), so no float rounding can move a
    floor.
    """
    m = scaled_gaps.size
    if m == 0:
        return np.zeros(0, dtype=np.int64)
    bound = max(2 * scaled_budget, int(scaled_gaps.max()) + scale) * m
    dtype = np.int64 if bound < _INT64_BOUND else object
    g = scaled_gaps.astype(dtype)
    ends = np.cumsum(g)
    before = ends - g
    bags_left = np.arange(m, 0, -1).astype(dtype)
    capped = g * bags_left <= scaled_budget - before
    k = m if capped.all() else int(np.argmin(capped))
    floors = np.empty(m, dtype=dtype)
    floors[:k] = ends[:k] // scale
    if k < m:
        spent = int(before[k])
        rest, share_count = scaled_budget - spent, m - k
        steps = np.arange(1, share_count + 1).astype(dtype)
        floors[k:] = (spent * share_count + steps * rest) // (scale * share_count)
    return np.diff(floors, prepend=0).astype(np.int64)


def _pattern_members(table):
    """``(members, starts)``: samples grouped by pattern (ascending within), and each group's start."""
    inverse = np.asarray(table.inverse)
    sizes = np.asarray(table.counts, dtype=np.int64)
    members = np.argsort(inverse, kind="stable").astype(np.int64)
    return members, np.cumsum(sizes) - sizes


def lp_ros(labels, percentage=25, *, random_state=None) -> Plan:
    """LP-ROS: clone random samples of the labelsets rarer than the mean labelset.

    Charte, Rivera, del Jesus and Herrera (Neurocomputing 163, 2015), algorithm LP-ROS
    (label powerset). Samples with identical label vectors form a labelset bag; with K
    labelsets, ``meanSize = N / K``, and the bags smaller than ``meanSize`` are the
    minority bags. The budget ``B = floor(N * percentage / 100)`` is spread over them
    from the largest to the smallest: each gets the real increment
    ``min(meanSize - size, remaining / bags_left)``, so what a bag filled up to
    ``meanSize`` leaves over goes to the smaller ones. The real increments become
    integers as ``floor(S_i) - floor(S_{i-1})`` with ``S`` their running sum (computed
    exactly), which add up to ``floor(sum of increments)``; each bag clones that many
    samples drawn uniformly with replacement.

    Parameters
    ----------
    labels : array-like of shape (N, C) or PatternTable
        0/1 or bool label matrix, or a pattern table with its sample -> pattern index.
    percentage : float, default 25
        Clone budget as a percentage of N; any finite value >= 0. Fewer clones are made
        when the budget exceeds what fills every minority bag to ``meanSize``.
    random_state : int, numpy Generator or None
        Seeds the draws: one uniform ``u`` per clone, bag by bag in processing order;
        the clone is the bag's sample ``floor(u * size)``, the bag listed in ascending
        sample order.

    Returns
    -------
    Plan
        ``copies`` is 1 plus the clones of each sample; no sample is dropped.

    Raises
    ------
    ValueError
        ``labels`` not 2-D, not 0/1, without rows or columns, a table without inverse;
        ``percentage`` negative or not finite; a bad ``random_state``.

    Notes
    -----
    Bags of equal size are processed in order of their labelset's first occurrence.
    """
    rng, table, given, budget = _setting(labels, percentage, random_state, below_100=False)
    n, n_sets = table.n_samples, table.n_patterns
    copies = np.ones(n, dtype=np.int64)
    sizes = np.asarray(table.counts, dtype=np.int64)
    minority = np.flatnonzero(sizes * n_sets < n)
    order = minority[np.argsort(-sizes[minority], kind="stable")]
    increments = _bag_increments(n - sizes[order] * n_sets, budget * n_sets, n_sets)
    n_clones = int(increments.sum())
    if n_clones:
        members, starts = _pattern_members(table)
        bag = np.repeat(order, increments)
        bag_size = sizes[bag]
        pick = np.minimum((rng.random(n_clones) * bag_size).astype(np.int64), bag_size - 1)
        copies += np.bincount(members[starts[bag] + pick], minlength=n)
    return _plan(copies, table, given)


def lp_rus(labels, percentage=25, *, random_state=None) -> Plan:
    """LP-RUS: delete random samples of the labelsets more frequent than the mean labelset.

    Charte, Rivera, del Jesus and Herrera (Neurocomputing 163, 2015), algorithm LP-RUS.
    Labelset bags and ``meanSize = N / K`` as in :func:`lp_ros`; the bags larger than
    ``meanSize`` are the majority bags. The budget ``B = floor(N * percentage / 100)``
    deletions is spread over them from the smallest to the largest: each gets the real
    decrement ``min(size - meanSize, remaining / bags_left)``, made integer as in
    :func:`lp_ros`, and loses that many samples drawn uniformly without replacement.
    A majority bag keeps at least one sample (its decrement is below its size).

    Parameters
    ----------
    labels : array-like of shape (N, C) or PatternTable
        0/1 or bool label matrix, or a pattern table with its sample -> pattern index.
    percentage : float, default 25
        Deletion budget as a percentage of N, in [0, 100).
    random_state : int, numpy Generator or None
        Seeds the draws: one uniform key per member of every majority bag, bag by bag
        in processing order and members in ascending sample order; a bag deletes its
        members with the smallest keys (ties to the lower sample).

    Returns
    -------
    Plan
        ``copies`` is 0 for a deleted sample and 1 otherwise.

    Raises
    ------
    ValueError
        ``labels`` not 2-D, not 0/1, without rows or columns, a table without inverse;
        ``percentage`` outside [0, 100); a bad ``random_state``.

    Notes
    -----
    Bags of equal size are processed in order of their labelset's first occurrence.
    """
    rng, table, given, budget = _setting(labels, percentage, random_state, below_100=True)
    n, n_sets = table.n_samples, table.n_patterns
    copies = np.ones(n, dtype=np.int64)
    sizes = np.asarray(table.counts, dtype=np.int64)
    majority = np.flatnonzero(sizes * n_sets > n)
    order = majority[np.argsort(sizes[majority], kind="stable")]
    decrements = _bag_increments(sizes[order] * n_sets - n, budget * n_sets, n_sets)
    if decrements.sum():
        members, starts = _pattern_members(table)
        bag_sizes = sizes[order]
        bag_of = np.repeat(np.arange(order.size), bag_sizes)
        bag_start = np.cumsum(bag_sizes) - bag_sizes
        rank_in_bag = np.arange(bag_of.size, dtype=np.int64) - np.repeat(bag_start, bag_sizes)
        samples = members[np.repeat(starts[order], bag_sizes) + rank_in_bag]
        keys = rng.random(samples.size)
        # sorted by bag, then key: position j holds the rank_in_bag[j]-th smallest key of bag bag_of[j]
        by_key = np.lexsort((keys, bag_of))
        copies[samples[by_key[rank_in_bag < decrements[bag_of]]]] = 0
    return _plan(copies, table, given)


# -- repeat-factor sampling ----------------------------------------------------------


def _pattern_max(table, per_class: np.ndarray, empty: float) -> np.ndarray:
    """Per pattern, the largest ``per_class`` value among its classes (``empty`` for none)."""
    indptr, indices = table.sparse_patterns()
    indptr = np.asarray(indptr, dtype=np.int64)
    out = np.full(table.n_patterns, empty, dtype=np.float64)
    filled = np.flatnonzero(np.diff(indptr) > 0)
    if filled.size:
        out[filled] = np.maximum.reduceat(per_class[np.asarray(indices, dtype=np.int64)], indptr[filled])
    return out


def _threshold_for_size(table, presence: np.ndarray, n_samples_out: int) -> float:
    """The ``t`` whose sample factors ``max(1, sqrt(t / f_c))`` add up to ``n_samples_out``.

    With ``s = sqrt(t)`` and ``g = max_c f_c ** -0.5`` over a sample's classes, the
    factor is ``max(1, s * g)``, so the total is piecewise linear in ``s`` with a
    breakpoint at each ``1 / g``; it is solved exactly on the segment holding the target.
    """
    n = table.n_samples
    seen = presence > 0
    inv_root = np.zeros(presence.size)
    inv_root[seen] = 1.0 / np.sqrt(presence[seen])
    g = _pattern_max(table, inv_root, 0.0)
    weight = np.asarray(table.counts, dtype=np.float64)
    live = g > 0
    if not live.any():
        raise ValueError(f"n_samples_out = {n_samples_out} cannot be reached: no sample has a class, so every "
                         f"repeat factor is 1 and the plan has {n} samples")
    order = np.argsort(-g[live], kind="stable")
    g, weight = g[live][order], weight[live][order]
    active_weight = np.cumsum(weight)
    active_slope = np.cumsum(weight * g)
    # total at breakpoint j (s = 1 / g_j): the first j patterns above 1, the rest at 1
    s_break = 1.0 / g
    total_at = n - np.concatenate([[0.0], active_weight[:-1]]) + s_break * np.concatenate([[0.0], active_slope[:-1]])
    j = max(int(np.searchsorted(total_at, n_samples_out, side="right")) - 1, 0)
    s = (n_samples_out - n + active_weight[j]) / active_slope[j]
    return s * s


def repeat_factor(labels, threshold=None, *, n_samples_out=None, random_state=None) -> Plan:
    """Repeat-factor sampling (LVIS) with deterministic systematic rounding.

    Gupta, Dollar and Girshick, "LVIS" (CVPR 2019): class ``c`` present in a fraction
    ``f_c`` of the samples gets ``r_c = max(1, sqrt(t / f_c))`` (1 when it never
    occurs); a sample gets the largest ``r_c`` among its classes (1 when it has none).
    The real factors become integers by systematic rounding: with ``R_i`` their running
    sum in sample order, sample ``i`` gets ``floor(R_i + u) - floor(R_{i-1} + u)``
    copies, which is ``floor(r_i)`` or ``ceil(r_i)``, never below 1.

    Parameters
    ----------
    labels : array-like of shape (N, C) or PatternTable
        0/1 or bool label matrix, or a pattern table with its sample -> pattern index.
    threshold : float in (0, 1], optional
        ``t``: classes present in fewer than this fraction of samples are repeated.
        The plan then has ``round(sum_i r_i)`` samples (halves round up).
    n_samples_out : int >= N, optional
        Size of the plan instead: ``t`` (which may exceed 1 here) is solved so that
        ``sum_i r_i == n_samples_out``, exactly on the piecewise-linear total, and the
        plan has exactly ``n_samples_out`` samples. Give exactly one of ``threshold``
        and ``n_samples_out``.
    random_state : int, numpy Generator or None
        ``None``: the offset is ``u = 0.5``. Otherwise ``u`` is drawn uniformly, by one
        ``random()`` call, from the offsets that give the plan its size (an interval of
        length at least 1/2 inside [0, 1)), so the size does not depend on the seed.

    Returns
    -------
    Plan
        ``copies`` of every sample, each ``floor(r_i)`` or ``ceil(r_i)``.

    Raises
    ------
    ValueError
        ``labels`` not 2-D, not 0/1, without rows or columns, a table without inverse;
        both or neither of ``threshold`` and ``n_samples_out``; ``threshold`` outside
        (0, 1]; ``n_samples_out`` not an integer, below N, or above N when no sample
        has a class; a bad ``random_state``.

    Notes
    -----
    LVIS rounds each factor stochastically and independently (see
    :mod:`cobalance.training.rfs`), so the epoch size varies; systematic rounding keeps
    each sample within one copy of ``r_i`` and fixes the total. The fractional parts
    are rounded to multiples of at most 2**-32 before the running sum so that it is
    exact in integers.
    """
    if (threshold is None) == (n_samples_out is None):
        raise ValueError(f"give exactly one of threshold and n_samples_out, got threshold={threshold!r}, "
                         f"n_samples_out={n_samples_out!r}")
    if threshold is not None:
        if not _is_number(threshold) or not 0.0 < float(threshold) <= 1.0:
            raise ValueError(f"threshold must be a number in (0, 1], got {threshold!r}")
    elif isinstance(n_samples_out, (bool, np.bool_)) or not isinstance(n_samples_out, (int, np.integer)):
        raise ValueError(f"n_samples_out must be an integer, got {n_samples_out!r}")
    rng = _generator(random_state)
    table, given = _pattern_table(labels)
    n = table.n_samples
    presence = np.asarray(table.class_counts(), dtype=np.int64) / n
    if n_samples_out is not None:
        n_samples_out = int(n_samples_out)
        if n_samples_out < n:
            raise ValueError(f"n_samples_out must be at least the number of samples, {n}, got {n_samples_out}")
        if n_samples_out == n:
            return _plan(np.ones(n, dtype=np.int64), table, given)
        t = _threshold_for_size(table, presence, n_samples_out)
    else:
        t = float(threshold)
    seen = presence > 0
    class_factor = np.ones(presence.size)
    class_factor[seen] = np.maximum(1.0, np.sqrt(t / presence[seen]))
    factor = _pattern_max(table, class_factor, 1.0)[np.asarray(table.inverse)]

    whole = np.floor(factor)
    # fractions as integers on a grid of 1/scale, so the running sum is exact in int64
    scale = min(1 << 32, (1 << 62) // n)
    frac = np.minimum(np.rint((factor - whole) * scale).astype(np.int64), scale - 1)
    running = np.cumsum(frac)
    total_frac = int(running[-1])
    base = int(whole.sum())
    # extras = floor((total_frac + offset) / scale); the offsets giving the target form [low, high)
    extras = (total_frac + scale // 2) // scale if n_samples_out is None else n_samples_out - base
    low, high = max(0, extras * scale - total_frac), min(scale, (extras + 1) * scale - total_frac)
    if low >= high:
        raise RuntimeError(f"repeat_factor: the factors add up to {base + total_frac / scale!r}, too far from "
                           f"{base + extras} to round to it; please report this")
    if random_state is None:
        offset = min(max(scale // 2, low), high - 1)
    else:
        offset = low + min(int(rng.random() * (high - low)), high - low - 1)
    floors = (running + offset) // scale
    copies = whole.astype(np.int64) + np.diff(floors, prepend=0)
    return _plan(copies, table, given)
