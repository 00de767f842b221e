"""Multi-label stratified K-fold cross-validation by iterative stratification.

The algorithm of Sechidis, Tsoumakas and Vlahavas, "On the Stratification of
Multi-Label Data" (ECML PKDD 2011): labels are handled rarest first; each example
carrying the current label goes to the fold that still wants most examples of that
label (ties: the fold that wants most examples overall, then a seeded random choice).
Rare labels are therefore spread first, while every fold still has room for them.

Groups (e.g. the tiles of one image) are kept whole: the unit that is assigned is the
group, its label vector is the number of its samples that carry each label
(``group_labels="sum"``, so folds get similar *tile* counts per class) or whether any
of them does (``"any"``, the image-level presence), and its size is its number of
samples. With counts, a label's examples are visited heaviest first (ties in the seeded
order), so that a large group placed last does not overshoot its fold. With unit groups
and 0/1 labels this is exactly the published algorithm.
"""

from __future__ import annotations

from typing import Iterator, Optional, Tuple

import numpy as np

__all__ = ["MultilabelStratifiedKFold", "iterative_stratification"]


def _check_labels(labels) -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim != 2:
        raise ValueError(f"labels must be a 2-D (n_samples, n_classes) array, got ndim={y.ndim}")
    if y.dtype == np.bool_:
        return y.astype(np.int64)
    if y.dtype.kind not in "iuf":
        raise ValueError(f"labels must hold non-negative numbers or booleans, got dtype {y.dtype}")
    if y.size and (not np.all(np.isfinite(y)) or (y < 0).any() or (y != np.round(y)).any()):
        bad = np.argwhere(~np.isfinite(y) | (y < 0) | (y != np.round(y)))[0]
        raise ValueError(f"labels must be non-negative integers (0/1 or counts), got {y[tuple(bad)]!r} "
                         f"at row {bad[0]}, column {bad[1]}")
    return y.astype(np.int64)


def _check_splits(n_splits) -> int:
    if not isinstance(n_splits, (int, np.integer)) or isinstance(n_splits, bool) or n_splits < 2:
        raise ValueError(f"n_splits must be an integer >= 2, got {n_splits!r}")
    return int(n_splits)


def iterative_stratification(labels, n_splits: int, *, sizes=None, random_state=None) -> np.ndarray:
    """Assign each example to one of ``n_splits`` folds of equal desired share.

    Parameters
    ----------
    labels : array-like, shape (n_examples, n_classes)
        0/1 presence, or non-negative integer counts (how many of an example's samples
        carry each class).
    n_splits : int
        Number of folds, >= 2.
    sizes : array-like of int, shape (n_examples,), optional
        Samples per example (default 1), used for the "wants most examples overall" tie
        break.
    random_state : int or numpy Generator, optional
        Seeds the processing order and the remaining ties.

    Returns
    -------
    ndarray of int64, shape (n_examples,)
        The fold of each example, in ``[0, n_splits)``. No fold is empty: a fold
        that has received nothing still wants the most of every label and overall, so
        it wins the next choice.

    Raises
    ------
    ValueError
        Bad labels or sizes, ``n_splits`` < 2, fewer examples than folds.
    """
    y = _check_labels(labels)
    k = _check_splits(n_splits)
    n, n_classes = y.shape
    if n < k:
        raise ValueError(f"need at least n_splits={k} examples (groups) to split, got {n}")
    if sizes is None:
        size = np.ones(n, dtype=np.int64)
    else:
        size = np.asarray(sizes)
        if size.shape != (n,) or size.dtype.kind not in "iu" or (size < 1).any():
            raise ValueError(f"sizes must be {n} positive integers, got shape {size.shape}, dtype {size.dtype}")
        size = size.astype(np.int64)
    rng = np.random.default_rng(random_state)

    # Desired amounts per fold; they go down as examples are assigned (may go negative).
    want_label = np.tile(y.sum(axis=0).astype(np.float64) / k, (k, 1))  # (k, C)
    want_total = np.full(k, size.sum() / k, dtype=np.float64)
    fold = np.full(n, -1, dtype=np.int64)
    # One seeded permutation fixes the order in which a label's examples are visited.
    order = rng.permutation(n)
    has = y[order] > 0  # (n, C), in visiting order
    unassigned = np.ones(n, dtype=bool)  # in visiting order

    def choose(candidates_want: np.ndarray) -> int:
        best = np.flatnonzero(candidates_want == candidates_want.max())
        if best.size > 1:
            totals = want_total[best]
            best = best[totals == totals.max()]
        return int(best[0] if best.size == 1 else rng.choice(best))

    while True:
        remaining = (has & unassigned[:, None]).sum(axis=0)
        live = np.flatnonzero(remaining > 0)
        if live.size == 0:
            break
        fewest = remaining[live].min()
        tied = live[remaining[live] == fewest]
        label = int(tied[0] if tied.size == 1 else rng.choice(tied))
        visit = np.flatnonzero(has[:, label] & unassigned)
        # Heaviest examples first (largest-first greedy): with counts, a large group
        # placed last could overshoot its fold. All equal for 0/1 labels, where the
        # seeded order alone decides, as in the published algorithm.
        visit = visit[np.argsort(-y[order[visit], label], kind="stable")]
        for pos in visit:
            j = choose(want_label[:, label])
            example = order[pos]
            fold[example] = j
            unassigned[pos] = False
            want_label[j] -= y[example]
            want_total[j] -= size[example]
    for pos in np.flatnonzero(unassigned):  # examples without any label
        best = np.flatnonzero(want_total == want_total.max())
        j = int(best[0] if best.size == 1 else rng.choice(best))
        example = order[pos]
        fold[example] = j
        want_total[j] -= size[example]

    return fold


class MultilabelStratifiedKFold:
    """K-fold cross-validation that keeps class shares similar in every fold.

    Test folds are disjoint and together cover every sample; with ``groups`` a group
    never straddles a training and a test part.

    Parameters
    ----------
    n_splits : int
        Number of folds, >= 2.
    group_labels : {"sum", "any"}
        How a group's label vector is formed from its samples' (see the module doc).
    random_state : int, optional
        Seed; the same seed and data give the same folds.
    """

    def __init__(self, n_splits: int = 3, *, group_labels: str = "sum", random_state: Optional[int] = None):
        self.n_splits = n_splits
        self.group_labels = group_labels
        self.random_state = random_state

    def get_n_splits(self, X=None, y=None, groups=None) -> int:
        """The number of folds (scikit-learn's splitter protocol; the arguments are ignored)."""
        return _check_splits(self.n_splits)

    def assign(self, labels, groups=None) -> np.ndarray:
        """The test fold of every sample, int64 of shape (n_samples,).

        Parameters
        ----------
        labels : array-like, shape (n_samples, n_classes)
            0/1 class presence per sample.
        groups : array-like, shape (n_samples,), optional
            Group id of each sample (any hashable numbers or strings).
        """
        y = _check_labels(labels)
        if self.group_labels not in ("sum", "any"):
            raise ValueError(f"group_labels must be 'sum' or 'any', got {self.group_labels!r}")
        if groups is None:
            return iterative_stratification(y, self.n_splits, random_state=self.random_state)
        g = np.asarray(groups)
        if g.shape != (y.shape[0],):
            raise ValueError(f"groups must have one entry per sample ({y.shape[0]}), got shape {g.shape}")
        # Groups numbered by first appearance, so the folds do not depend on id spelling.
        _, first, inverse = np.unique(g, return_index=True, return_inverse=True)
        rank = np.empty(first.size, dtype=np.int64)
        rank[np.argsort(first, kind="stable")] = np.arange(first.size)
        group_of = rank[inverse]
        n_groups = first.size
        group_y = np.zeros((n_groups, y.shape[1]), dtype=np.int64)
        np.add.at(group_y, group_of, (y > 0).astype(np.int64))
        if self.group_labels == "any":
            group_y = (group_y > 0).astype(np.int64)
        sizes = np.bincount(group_of, minlength=n_groups)
        group_fold = iterative_stratification(group_y, self.n_splits, sizes=sizes,
                                              random_state=self.random_state)
        return group_fold[group_of]

    def split(self, X, y=None, groups=None) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
        """Yield ``(train_indices, test_indices)`` for each fold, both sorted int64.

        scikit-learn's splitter protocol, so the splitter works as ``cv=`` of
        ``cross_validate``, ``GridSearchCV`` and the like.

        Parameters
        ----------
        X : array-like of shape (n_samples, ...)
            The features: only their number of rows is used. When ``y`` is None, ``X``
            is taken as the label matrix (``split(labels)``).
        y : array-like of shape (n_samples, n_classes), optional
            0/1 class presence per sample, the labels stratified on.
        groups : array-like of shape (n_samples,), optional
            Group id of each sample.
        """
        labels = X if y is None else y
        if hasattr(labels, "toarray"):  # scipy.sparse
            labels = labels.toarray()
        if y is not None:
            n_x = X.shape[0] if hasattr(X, "shape") else len(X)
            if n_x != np.shape(labels)[0]:
                raise ValueError(f"X and y must have the same number of samples, got {n_x} and "
                                 f"{np.shape(labels)[0]}")
        fold = self.assign(labels, groups)
        for j in range(_check_splits(self.n_splits)):
            yield np.flatnonzero(fold != j), np.flatnonzero(fold == j)
