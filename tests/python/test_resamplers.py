"""The multi-label resamplers against plain-loop references that follow the papers' pseudo-code."""

import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from cobalance import PatternTable
from cobalance import resamplers
from cobalance.resamplers import lp_ros, lp_rus, ml_ros, ml_rus, repeat_factor

FEATURES = Path(__file__).parents[2] / ".." / "shared" / "data" / "multilabel" / "features"


def skewed_labels(seed, n=240, presence=(0.6, 0.35, 0.15, 0.06, 0.03, 0.45, 0.01)):
    """0/1 labels whose columns have very different frequencies (a few rows may be empty)."""
    rng = np.random.default_rng(seed)
    return (rng.random((n, len(presence))) < np.asarray(presence)).astype(np.uint8)


def real_labels(name="emotions"):
    path = FEATURES / f"{name}.npz"
    if not path.exists():
        pytest.skip(f"shared multi-label feature set {path} is absent")
    with np.load(path) as z:
        return np.asarray(z["Y"], dtype=np.uint8)


def rows(labels):
    return [[int(v) for v in row] for row in np.asarray(labels)]


# -- references: plain Python, one step per pseudo-code line ------------------------------


def ref_imbalance(Y):
    """Label counts, IRLbl as a function of the current counts, and MeanIR of the original data."""
    n_classes = len(Y[0])
    counts = [sum(row[c] for row in Y) for c in range(n_classes)]
    present = [c for c in range(n_classes) if counts[c] > 0]

    def irlbl(c):
        return max(counts) / counts[c]

    mean_ir = math.fsum(irlbl(c) for c in present) / len(present)
    return counts, present, irlbl, mean_ir


def ref_ml_ros(labels, percentage, seed):
    """ML-ROS (Charte et al. 2015, algorithm 1); returns the copies and the bags still open."""
    Y = rows(labels)
    n, n_classes = len(Y), len(Y[0])
    rng = np.random.default_rng(seed)
    samples_to_clone = int(n * percentage / 100)
    counts, present, irlbl, mean_ir = ref_imbalance(Y)
    min_bags = [(c, [i for i in range(n) if Y[i][c]]) for c in present if irlbl(c) > mean_ir]
    copies = [1] * n
    while samples_to_clone > 0 and min_bags:
        for bag in list(min_bags):
            if samples_to_clone == 0:
                break
            label, members = bag
            x = members[min(int(rng.random() * len(members)), len(members) - 1)]
            copies[x] += 1
            for c in range(n_classes):
                counts[c] += Y[x][c]
            if irlbl(label) <= mean_ir:
                min_bags.remove(bag)
            samples_to_clone -= 1
    return copies, min_bags


def ref_ml_rus_outcomes(labels, percentage):
    """Every outcome of ML-RUS (with the no-empty-label rule) and its exact probability.

    Walks the tree of uniform choices among the deletable samples of each bag.
    """
    Y = rows(labels)
    n, n_classes = len(Y), len(Y[0])
    counts, present, irlbl_of, mean_ir = ref_imbalance(Y)
    maj_bags = [(c, [i for i in range(n) if Y[i][c]]) for c in present if irlbl_of(c) < mean_ir]
    outcomes = {}

    def irlbl(cnt, c):
        return max(cnt) / cnt[c]

    def walk(budget, bags, position, cnt, deleted, prob):
        if budget == 0 or not bags:
            key = frozenset(deleted)
            outcomes[key] = outcomes.get(key, Fraction(0)) + prob
            return
        if position == len(bags):  # next round
            walk(budget, [b for b in bags if b[1]], 0, cnt, deleted, prob)
            return
        label, members = bags[position]
        valid = [i for i in members if i not in deleted
                 and all(cnt[c] > 1 for c in range(n_classes) if Y[i][c])]
        if not valid:  # the bag leaves
            rest = bags[:position] + bags[position + 1:]
            walk(budget, rest, position, cnt, deleted, prob)
            return
        for x in valid:
            new_cnt = [cnt[c] - Y[x][c] for c in range(n_classes)]
            stays = irlbl(new_cnt, label) < mean_ir
            marked = [(b[0], b[1] if (j != position or stays) else []) for j, b in enumerate(bags)]
            walk(budget - 1, marked, position + 1, new_cnt, deleted | {x}, prob / len(valid))

    walk(int(n * percentage / 100), maj_bags, 0, counts, frozenset(), Fraction(1))
    return outcomes


def ref_labelset_bags(Y):
    bags = {}
    for i, row in enumerate(Y):
        bags.setdefault(tuple(row), []).append(i)  # dict order: first occurrence
    return list(bags.values())


def ref_lp_counts(bag_sizes, mean_size, budget):
    """The integer per-bag counts from the real increments ``min(gap, remaining / bags left)``."""
    remaining, running, done, out = Fraction(budget), Fraction(0), 0, []
    for i, (size) in enumerate(bag_sizes):
        inc = min(abs(size - mean_size), remaining / (len(bag_sizes) - i))
        remaining -= inc
        running += inc
        out.append(math.floor(running) - done)
        done += out[-1]
    return out


def ref_lp_ros(labels, percentage, seed):
    Y = rows(labels)
    n = len(Y)
    bags = ref_labelset_bags(Y)
    mean_size = Fraction(n, len(bags))
    minority = sorted([b for b in bags if len(b) < mean_size], key=lambda b: -len(b))
    counts = ref_lp_counts([len(b) for b in minority], mean_size, int(n * percentage / 100))
    rng = np.random.default_rng(seed)
    copies = [1] * n
    for bag, k in zip(minority, counts):
        for _ in range(k):
            copies[bag[min(int(rng.random() * len(bag)), len(bag) - 1)]] += 1
    return copies, minority, counts


def ref_lp_rus(labels, percentage, seed):
    Y = rows(labels)
    n = len(Y)
    bags = ref_labelset_bags(Y)
    mean_size = Fraction(n, len(bags))
    majority = sorted([b for b in bags if len(b) > mean_size], key=len)
    counts = ref_lp_counts([len(b) for b in majority], mean_size, int(n * percentage / 100))
    rng = np.random.default_rng(seed)
    copies = [1] * n
    for bag, k in zip(majority, counts):
        keys = [rng.random() for _ in bag]
        for j in sorted(range(len(bag)), key=lambda j: keys[j])[:k]:
            copies[bag[j]] = 0
    return copies, majority, counts


def ref_repeat_factors(labels, t):
    Y = rows(labels)
    n, n_classes = len(Y), len(Y[0])
    f = [sum(row[c] for row in Y) / n for c in range(n_classes)]
    r_class = [max(1.0, math.sqrt(t / f[c])) if f[c] > 0 else 1.0 for c in range(n_classes)]
    return [max([r_class[c] for c in range(n_classes) if row[c]], default=1.0) for row in Y]


def ref_systematic(factors, u=Fraction(1, 2)):
    out, running, before = [], Fraction(0), 0
    for r in factors:
        running += Fraction(r)
        now = math.floor(running + u)
        out.append(now - before)
        before = now
    return out


def mean_ir(labels, copies):
    counts = np.asarray(copies, dtype=np.float64) @ np.asarray(labels, dtype=np.float64)
    present = counts > 0
    return float(np.mean(counts.max() / counts[present]))


# -- ML-ROS ---------------------------------------------------------------------------------


GENTLE = (0.7, 0.4, 0.25, 0.1, 0.1, 0.06, 0.04, 0.3)  # several minority labels, many rounds


@pytest.mark.parametrize("presence", [None, GENTLE])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("percentage", [5, 25, 60])
def test_ml_ros_matches_the_reference(seed, percentage, presence):
    Y = skewed_labels(seed) if presence is None else skewed_labels(seed, presence=presence)
    plan = ml_ros(Y, percentage, random_state=seed + 10)
    expected, _ = ref_ml_ros(Y, percentage, seed + 10)
    np.testing.assert_array_equal(plan.copies, expected)
    assert plan.n_dropped == 0


def test_ml_ros_fetches_uniforms_in_blocks_without_changing_the_draws(monkeypatch):
    monkeypatch.setattr(resamplers, "_DRAW_BLOCK", 3)
    Y = skewed_labels(4)
    np.testing.assert_array_equal(ml_ros(Y, 40, random_state=5).copies, ref_ml_ros(Y, 40, 5)[0])


def test_ml_ros_clones_only_minority_samples_and_spends_the_budget_or_closes_every_bag():
    Y = skewed_labels(7, n=400)
    counts, present, irlbl, m = ref_imbalance(rows(Y))
    minority = [c for c in present if irlbl(c) > m]
    for percentage, seed in [(2, 0), (10, 1), (80, 2)]:
        plan = ml_ros(Y, percentage, random_state=seed)
        cloned = np.flatnonzero(plan.copies > 1)
        assert np.all(Y[np.ix_(cloned, minority)].any(axis=1))
        budget = int(len(Y) * percentage / 100)
        _, open_bags = ref_ml_ros(Y, percentage, seed)
        if plan.n_duplicates < budget:
            assert open_bags == []
        else:
            assert plan.n_duplicates == budget
    # a large budget closes every bag before it is spent
    assert ml_ros(Y, 80, random_state=2).n_duplicates < int(len(Y) * 0.8)


# -- ML-RUS ---------------------------------------------------------------------------------


def tiny_rus_labels():
    # label 0 is frequent; sample 3 also carries label 3, which nothing else has (protected)
    return np.array([
        [1, 0, 0, 0], [1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 0, 1], [1, 0, 1, 0],
        [1, 0, 0, 0], [0, 1, 0, 0], [1, 1, 1, 0], [0, 0, 1, 0], [1, 0, 0, 0],
    ], dtype=np.uint8)


def test_ml_rus_follows_the_reference_distribution():
    Y = tiny_rus_labels()
    percentage = 40  # 4 deletions
    outcomes = ref_ml_rus_outcomes(Y, percentage)
    n_runs = 3000
    rng = np.random.default_rng(123)
    seen = {}
    deleted_freq = np.zeros(len(Y))
    for _ in range(n_runs):
        copies = ml_rus(Y, percentage, random_state=rng).copies
        key = frozenset(np.flatnonzero(copies == 0).tolist())
        assert key in outcomes  # every outcome is one the pseudo-code can produce
        seen[key] = seen.get(key, 0) + 1
        deleted_freq += copies == 0
    expected = np.zeros(len(Y))
    for key, prob in outcomes.items():
        for i in key:
            expected[i] += float(prob)
    sigma = np.sqrt(np.maximum(expected * (1 - expected), 1e-12) / n_runs)
    assert np.all(np.abs(deleted_freq / n_runs - expected) <= 5 * sigma + 1e-9)
    assert expected[3] == 0 and deleted_freq[3] == 0  # the only sample of label 3 stays


def test_ml_rus_deletes_only_majority_samples_and_never_empties_a_label():
    for seed in range(4):
        Y = skewed_labels(seed, n=300)
        counts, present, irlbl, m = ref_imbalance(rows(Y))
        majority = [c for c in present if irlbl(c) < m]
        for percentage in (5, 30, 90):
            plan = ml_rus(Y, percentage, random_state=seed)
            gone = plan.copies == 0
            assert set(np.unique(plan.copies)) <= {0, 1}
            assert np.all(Y[np.ix_(gone, majority)].any(axis=1))
            assert plan.n_dropped <= int(len(Y) * percentage / 100)
            kept = plan.copies @ Y
            assert np.all(kept[np.asarray(counts) > 0] > 0)


def test_ml_rus_with_a_small_budget_deletes_from_the_first_majority_bags():
    Y = skewed_labels(9, n=200)
    counts, present, irlbl, m = ref_imbalance(rows(Y))
    first = [c for c in present if irlbl(c) < m][0]
    for seed in range(20):
        plan = ml_rus(Y, 0.5, random_state=seed)  # floor(200 * 0.5 / 100) = 1 deletion
        assert plan.n_dropped == 1
        assert Y[np.flatnonzero(plan.copies == 0)[0], first] == 1


# -- LP-ROS / LP-RUS -------------------------------------------------------------------------


def per_bag_change(copies, bags):
    return [int(sum(abs(copies[i] - 1) for i in bag)) for bag in bags]


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("percentage", [3, 25, 70, 99])
def test_lp_ros_matches_the_reference(seed, percentage):
    Y = skewed_labels(seed, n=150 + 37 * seed)
    plan = lp_ros(Y, percentage, random_state=seed)
    expected, bags, counts = ref_lp_ros(Y, percentage, seed)
    np.testing.assert_array_equal(plan.copies, expected)
    assert per_bag_change(plan.copies, bags) == counts
    assert plan.n_dropped == 0
    # only samples of labelsets rarer than the mean are cloned
    table = PatternTable.from_labels(Y)
    mean_size = Fraction(len(Y), table.n_patterns)
    cloned = np.flatnonzero(plan.copies > 1)
    assert all(table.counts[table.inverse[i]] < mean_size for i in cloned)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("percentage", [3, 25, 70, 99])
def test_lp_rus_matches_the_reference(seed, percentage):
    Y = skewed_labels(seed, n=150 + 37 * seed)
    plan = lp_rus(Y, percentage, random_state=seed)
    expected, bags, counts = ref_lp_rus(Y, percentage, seed)
    np.testing.assert_array_equal(plan.copies, expected)
    assert per_bag_change(plan.copies, bags) == counts
    assert all(any(plan.copies[i] for i in bag) for bag in bags)  # every bag keeps a sample


def test_lp_counts_spread_the_leftover_of_filled_bags():
    # labelset sizes 6, 2, 1 (meanSize 3), budget floor(9 * 34 / 100) = 3: the size-2 bag
    # is capped at 1 (not 3 / 2), and its leftover goes to the size-1 bag, which gets 2
    Y = np.array([[1, 0]] * 6 + [[0, 1]] * 2 + [[1, 1]], dtype=np.uint8)
    assert per_bag_change(lp_ros(Y, 34, random_state=0).copies, [[6, 7], [8]]) == [1, 2]
    # the mirror for LP-RUS: sizes 1, 4, 7 (meanSize 4), budget floor(12 * 25 / 100) = 3:
    # the size-4 bag is not a majority bag, the size-7 bag loses min(3, 3) = 3
    Y = np.array([[1, 1]] + [[0, 1]] * 4 + [[1, 0]] * 7, dtype=np.uint8)
    assert per_bag_change(lp_rus(Y, 25, random_state=0).copies, [list(range(5, 12))]) == [3]


def test_lp_counts_are_exact_with_python_integers(monkeypatch):
    Y = skewed_labels(5, n=333)
    int64_plans = [f(Y, 37, random_state=1) for f in (lp_ros, lp_rus)]
    monkeypatch.setattr(resamplers, "_INT64_BOUND", 0)
    assert [f(Y, 37, random_state=1) for f in (lp_ros, lp_rus)] == int64_plans


# -- shared behaviour ------------------------------------------------------------------------


ALL_RANDOM = [ml_ros, ml_rus, lp_ros, lp_rus]


@pytest.mark.parametrize("method", ALL_RANDOM)
def test_mean_ir_falls_on_a_skewed_set(method):
    Y = skewed_labels(3, n=400)
    plan = method(Y, 20, random_state=0)
    assert mean_ir(Y, plan.copies) < mean_ir(Y, np.ones(len(Y)))


@pytest.mark.parametrize("method", ALL_RANDOM)
def test_seeded_determinism(method):
    Y = skewed_labels(8, n=300)
    assert method(Y, 30, random_state=4) == method(Y, 30, random_state=4)
    assert method(Y, 30, random_state=4) != method(Y, 30, random_state=5)


@pytest.mark.parametrize("method", ALL_RANDOM + [lambda y, p, random_state: repeat_factor(y, 0.2)])
def test_pattern_table_input_gives_the_same_plan_with_pattern_counts(method):
    Y = skewed_labels(6)
    table = PatternTable.from_labels(Y)
    from_labels = method(Y, 25, random_state=3)
    from_table = method(table, 25, random_state=3)
    np.testing.assert_array_equal(from_table.copies, from_labels.copies)
    assert from_labels.pattern_counts is None
    np.testing.assert_array_equal(from_table.pattern_counts,
                                  np.bincount(table.inverse, weights=from_table.copies).astype(np.int64))


@pytest.mark.parametrize("method", ALL_RANDOM)
def test_zero_percentage_and_label_free_data_give_the_identity(method):
    Y = skewed_labels(0)
    assert method(Y, 0, random_state=0).n_duplicates == 0 == method(Y, 0, random_state=0).n_dropped
    assert method(np.zeros((5, 3), dtype=bool), 50, random_state=0).n_samples_out == 5


def test_real_set_against_the_references():
    Y = real_labels("emotions")
    np.testing.assert_array_equal(ml_ros(Y, 25, random_state=1).copies, ref_ml_ros(Y, 25, 1)[0])
    np.testing.assert_array_equal(lp_ros(Y, 25, random_state=1).copies, ref_lp_ros(Y, 25, 1)[0])
    np.testing.assert_array_equal(lp_rus(Y, 25, random_state=1).copies, ref_lp_rus(Y, 25, 1)[0])
    plan = ml_rus(Y, 25, random_state=1)
    assert np.all((plan.copies @ Y)[Y.sum(axis=0) > 0] > 0)
    for method in ALL_RANDOM:
        assert mean_ir(Y, method(Y, 25, random_state=1).copies) < mean_ir(Y, np.ones(len(Y)))
    factors = ref_repeat_factors(Y, 0.3)
    np.testing.assert_array_equal(repeat_factor(Y, 0.3).copies, ref_systematic(factors))


# -- repeat-factor sampling ----------------------------------------------------------------


@pytest.mark.parametrize("t", [0.01, 0.1, 0.37, 1.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_repeat_factor_threshold_matches_systematic_rounding_of_the_factors(t, seed):
    Y = skewed_labels(seed, n=200)
    factors = ref_repeat_factors(Y, t)
    plan = repeat_factor(Y, t)
    np.testing.assert_array_equal(plan.copies, ref_systematic(factors))
    assert plan.n_samples_out == math.floor(math.fsum(factors) + 0.5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_repeat_factor_seeded_offsets_keep_floor_or_ceil_and_the_total(seed):
    Y = skewed_labels(seed, n=200)
    factors = np.array(ref_repeat_factors(Y, 0.4))
    total = math.floor(math.fsum(factors) + 0.5)
    plans = [repeat_factor(Y, 0.4, random_state=s) for s in (seed, seed, seed + 100)]
    for plan in plans:
        assert np.all((plan.copies == np.floor(factors)) | (plan.copies == np.ceil(factors)))
        assert plan.n_samples_out == total
    assert plans[0] == plans[1]
    assert plans[0] != plans[2]


def ref_threshold_for_size(Y, n_samples_out):
    lo, hi = 1e-12, 1.0
    while math.fsum(ref_repeat_factors(Y, hi)) < n_samples_out:
        hi *= 4
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if math.fsum(ref_repeat_factors(Y, mid)) < n_samples_out else (lo, mid)
        if hi - lo <= 1e-13 * hi:
            break
    return hi


@pytest.mark.parametrize("n_samples_out", [201, 260, 333, 1000])
@pytest.mark.parametrize("random_state", [None, 7])
def test_repeat_factor_hits_n_samples_out(n_samples_out, random_state):
    Y = skewed_labels(2, n=200)
    plan = repeat_factor(Y, n_samples_out=n_samples_out, random_state=random_state)
    assert plan.n_samples_out == n_samples_out
    factors = np.array(ref_repeat_factors(Y, ref_threshold_for_size(Y, n_samples_out)))
    assert math.fsum(factors) == pytest.approx(n_samples_out, rel=1e-9)
    assert np.all(plan.copies >= np.floor(factors - 1e-6)) and np.all(plan.copies <= np.ceil(factors + 1e-6))
    assert plan.copies.min() >= 1


def test_repeat_factor_n_samples_out_equal_to_n_is_the_identity():
    Y = skewed_labels(2, n=50)
    assert repeat_factor(Y, n_samples_out=50).n_duplicates == 0


# -- bad input -------------------------------------------------------------------------------


Y_OK = skewed_labels(0, n=20)


@pytest.mark.parametrize("call, match", [
    (lambda: ml_ros(np.ones(5)), "2-D"),
    (lambda: ml_ros([[0, 2], [1, 0]]), "got 2"),
    (lambda: ml_rus(np.zeros((0, 3))), r"at least one sample.*\(0, 3\)"),
    (lambda: lp_ros(Y_OK, -1), r"\[0, 100\)|>= 0.*-1"),
    (lambda: lp_ros(Y_OK, float("nan")), "nan"),
    (lambda: ml_rus(Y_OK, 100), r"\[0, 100\), got 100"),
    (lambda: lp_rus(Y_OK, "10"), "got '10'"),
    (lambda: ml_ros(Y_OK, random_state=-1), "got -1"),
    (lambda: ml_ros(Y_OK, random_state="seed"), "got 'seed'"),
    (lambda: ml_ros(PatternTable.from_labels(Y_OK, keep_inverse=False)), "keep_inverse"),
    (lambda: repeat_factor(Y_OK), "exactly one.*threshold=None, n_samples_out=None"),
    (lambda: repeat_factor(Y_OK, 0.5, n_samples_out=30), "exactly one.*n_samples_out=30"),
    (lambda: repeat_factor(Y_OK, 0), r"\(0, 1\], got 0"),
    (lambda: repeat_factor(Y_OK, 1.5), "got 1.5"),
    (lambda: repeat_factor(Y_OK, n_samples_out=19), "at least the number of samples, 20, got 19"),
    (lambda: repeat_factor(Y_OK, n_samples_out=30.5), "integer, got 30.5"),
    (lambda: repeat_factor(np.zeros((5, 3)), n_samples_out=6), "n_samples_out = 6 cannot be reached"),
])
def test_bad_input_names_the_value(call, match):
    with pytest.raises(ValueError, match=match):
        call()
