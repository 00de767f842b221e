"""Iterative stratification folds and repeat-factor sampling (numpy only)."""

import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from cobalance.training import (MultilabelStratifiedKFold, class_repeat_factors, iterative_stratification,
                                repeat_factor_copies, sample_repeat_factors)

labels_strategy = st.integers(0, 2**31 - 1).flatmap(
    lambda seed: st.tuples(st.just(seed), st.integers(6, 60), st.integers(1, 6), st.integers(2, 5)))


def _random_labels(seed, n, c, density=0.3):
    rng = np.random.default_rng(seed)
    return (rng.random((n, c)) < rng.uniform(0.05, 0.6, size=c) * density / 0.3).astype(np.uint8)


@settings(max_examples=60, deadline=None)
@given(labels_strategy)
def test_folds_disjoint_covering_and_rarest_class_even(args):
    seed, n, c, k = args
    y = _random_labels(seed, n, c)
    fold = iterative_stratification(y, k, random_state=seed)
    assert fold.shape == (n,) and set(np.unique(fold)) == set(range(k))
    tests = [set(np.flatnonzero(fold == j)) for j in range(k)]
    assert sum(len(t) for t in tests) == n and set().union(*tests) == set(range(n))
    # The rarest present label is spread first, while all folds still want it: within 1.
    counts = y.sum(axis=0)
    if (counts > 0).any():
        rarest = np.flatnonzero(counts == counts[counts > 0].min())
        spreads = [np.ptp(np.bincount(fold[y[:, r] > 0], minlength=k)) for r in rarest]
        assert min(spreads) <= 1
    # Same seed, same folds.
    np.testing.assert_array_equal(fold, iterative_stratification(y, k, random_state=seed))


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(2, 5))
def test_single_label_data_is_stratified_within_one(seed, k):
    rng = np.random.default_rng(seed)
    n, c = int(rng.integers(k, 80)), int(rng.integers(1, 6))
    y = np.zeros((n, c), dtype=np.uint8)
    y[np.arange(n), rng.integers(0, c, size=n)] = 1
    fold = iterative_stratification(y, k, random_state=seed)
    for cls in range(c):
        per_fold = np.bincount(fold[y[:, cls] == 1], minlength=k)
        ideal = y[:, cls].sum() / k
        assert np.all(np.abs(per_fold - ideal) < 1), (cls, per_fold, ideal)
    sizes = np.bincount(fold, minlength=k)
    assert np.ptp(sizes) <= c  # each class adds at most one of imbalance


def test_better_stratified_than_random_folds():
    rng = np.random.default_rng(0)
    y = (rng.random((300, 8)) < np.array([0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9])).astype(np.uint8)
    k = 3

    def label_distribution_error(fold):
        # Mean |count per fold - ideal| over folds and classes (Sechidis' LD spirit).
        ideal = y.sum(axis=0) / k
        return np.mean([np.abs(y[fold == j].sum(axis=0) - ideal) for j in range(k)])

    strat = np.mean([label_distribution_error(iterative_stratification(y, k, random_state=s)) for s in range(5)])
    random = np.mean([label_distribution_error(rng.permutation(np.arange(300) % k)) for _ in range(50)])
    assert strat < 0.5 * random, (strat, random)


def test_groups_never_straddle_and_match_ungrouped_for_unit_groups():
    rng = np.random.default_rng(1)
    groups = np.repeat(np.arange(20), rng.integers(1, 8, size=20))
    y = (rng.random((groups.size, 4)) < 0.2).astype(np.uint8)
    for mode in ("sum", "any"):
        cv = MultilabelStratifiedKFold(3, group_labels=mode, random_state=7)
        fold = cv.assign(y, groups)
        for g in np.unique(groups):
            assert np.unique(fold[groups == g]).size == 1
        seen = np.concatenate([test for _, test in cv.split(y, y, groups)])
        np.testing.assert_array_equal(np.sort(seen), np.arange(groups.size))
        for train, test in cv.split(y, y, groups):
            assert not set(groups[train]) & set(groups[test])
    unit = MultilabelStratifiedKFold(3, random_state=3)
    np.testing.assert_array_equal(unit.assign(y, np.arange(y.shape[0])), unit.assign(y))
    # group ids' spelling does not matter, only their first appearance order
    names = np.array([f"img{g:03d}" for g in groups])
    cv = MultilabelStratifiedKFold(3, random_state=7)
    np.testing.assert_array_equal(cv.assign(y, names), cv.assign(y, groups))


def test_sum_mode_balances_tile_counts_of_groups():
    # Every image has class 0; class 1 lives on a few tiles of some images: with
    # group_labels='sum' the tile counts of class 1 are spread evenly.
    groups = np.repeat(np.arange(12), 10)
    y = np.zeros((120, 2), dtype=np.uint8)
    y[:, 0] = 1
    heavy = np.arange(12) * 10
    for img, extra in zip(range(12), [9, 9, 9, 1, 1, 1, 1, 1, 1, 0, 0, 0]):
        y[heavy[img]:heavy[img] + extra, 1] = 1
    fold = MultilabelStratifiedKFold(3, group_labels="sum", random_state=0).assign(y, groups)
    per_fold = np.bincount(fold[y[:, 1] == 1], minlength=3)
    assert per_fold.tolist() == [11, 11, 11]


def test_against_iterstrat_when_installed():
    iterstrat = pytest.importorskip("iterstrat.ml_stratifiers")
    rng = np.random.default_rng(2)
    y = (rng.random((200, 5)) < 0.2).astype(int)
    ours = iterative_stratification(y, 3, random_state=0)
    theirs = np.empty(200, dtype=int)
    for j, (_, test) in enumerate(iterstrat.MultilabelStratifiedKFold(3, shuffle=True, random_state=0).split(y, y)):
        theirs[test] = j
    ideal = y.sum(axis=0) / 3
    err = lambda f: np.mean([np.abs(y[f == j].sum(axis=0) - ideal) for j in range(3)])  # noqa: E731
    assert err(ours) <= err(theirs) + 1.0


def test_fold_bad_input():
    with pytest.raises(ValueError, match="n_splits must be an integer >= 2"):
        iterative_stratification(np.ones((4, 2)), 1)
    with pytest.raises(ValueError, match="need at least n_splits=3 examples"):
        iterative_stratification(np.ones((2, 2)), 3)
    with pytest.raises(ValueError, match=r"non-negative integers.*-1"):
        iterative_stratification(np.array([[1, -1], [0, 1]]), 2)
    with pytest.raises(ValueError, match="2-D"):
        iterative_stratification(np.ones(5), 2)
    with pytest.raises(ValueError, match="groups must have one entry per sample"):
        MultilabelStratifiedKFold(2).assign(np.ones((4, 1)), [0, 1])
    with pytest.raises(ValueError, match="group_labels must be"):
        MultilabelStratifiedKFold(2, group_labels="max").assign(np.ones((4, 1)))
    with pytest.raises(ValueError, match="need at least n_splits=3 examples"):
        MultilabelStratifiedKFold(3, random_state=0).assign(np.ones((3, 1)), [0, 0, 1])
    with pytest.raises(ValueError, match="sizes must be 2 positive integers"):
        iterative_stratification(np.ones((2, 1)), 2, sizes=[1, 0])


# -- repeat-factor sampling ----------------------------------------------------------------


def _rfs_reference(y, t, seed):
    """detectron2's RepeatFactorTrainingSampler steps, written as plain loops."""
    n, c = y.shape
    freq = [sum(y[i][k] for i in range(n)) / n for k in range(c)]
    cat_rep = [max(1.0, math.sqrt(t / f)) if f > 0 else 1.0 for f in freq]
    rep = []
    for i in range(n):
        r = 1.0
        for k in range(c):
            if y[i][k]:
                r = max(r, cat_rep[k])
        rep.append(r)
    u = np.random.default_rng(seed).random(n)
    copies = [int(math.floor(r)) + (1 if u[i] < r - math.floor(r) else 0) for i, r in enumerate(rep)]
    return np.array(cat_rep), np.array(rep), np.array(copies)


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 2**31 - 1), st.floats(0.01, 1.0))
def test_rfs_matches_reference(seed, t):
    rng = np.random.default_rng(seed)
    y = (rng.random((int(rng.integers(1, 40)), int(rng.integers(1, 6)))) < rng.uniform(0.01, 0.8)).astype(np.uint8)
    cat_rep, rep, copies = _rfs_reference(y, t, seed)
    np.testing.assert_allclose(class_repeat_factors(y, t), cat_rep, rtol=1e-12)
    np.testing.assert_allclose(sample_repeat_factors(y, t), rep, rtol=1e-12)
    np.testing.assert_array_equal(repeat_factor_copies(y, t, random_state=seed), copies)


def test_rfs_expected_copies_equal_repeat_factor():
    y = np.zeros((4000, 2), dtype=np.uint8)
    y[:40, 0] = 1  # f = 0.01 -> r = sqrt(0.25 / 0.01) = 5
    y[40:440, 1] = 1  # f = 0.1 -> r = sqrt(2.5) = 1.58
    copies = repeat_factor_copies(y, 0.25, random_state=0)
    assert np.all(copies[:40] == 5)
    assert copies[40:440].mean() == pytest.approx(math.sqrt(2.5), abs=0.06)
    assert np.all(copies[440:] == 1)


def test_rfs_plan_from_copies():
    cobalance = pytest.importorskip("cobalance")
    if not hasattr(cobalance, "Plan"):
        pytest.skip("cobalance.Plan is not available in this build")
    from cobalance.training import repeat_factor_plan

    y = np.array([[1, 0], [0, 1], [0, 1], [0, 1]], dtype=np.uint8)
    plan = repeat_factor_plan(y, 1.0, random_state=0)
    np.testing.assert_array_equal(plan.copies, repeat_factor_copies(y, 1.0, random_state=0))
    assert plan.copies[0] == 2  # f = 0.25 -> r = 2 exactly


def test_rfs_bad_input():
    with pytest.raises(ValueError, match=r"threshold must be in \(0, 1\]"):
        class_repeat_factors(np.ones((2, 2)), 0.0)
    with pytest.raises(ValueError, match=r"must be 0 or 1, got .*2.* at row 0, column 0"):
        repeat_factor_copies(np.array([[2]]), 0.5)
    with pytest.raises(ValueError, match="at least one sample"):
        repeat_factor_copies(np.zeros((0, 2)), 0.5)


def test_training_package_imports_without_torch():
    # Folds and repeat-factor sampling need only numpy: importing the package (and the
    # experiment module's names) must not pull in torch.
    import os
    import subprocess
    import sys

    from conftest import PACKAGE_PARENT

    code = ("import sys, cobalance.training as t; t.MultilabelStratifiedKFold; "
            "from cobalance.training import experiment; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    env = dict(os.environ, PYTHONPATH=str(PACKAGE_PARENT))
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
