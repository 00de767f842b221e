import itertools
import json

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from cobalance import PatternTable, Plan
from cobalance.plan import round_counts, scale_to_total


# -- rounding against brute force ------------------------------------------------------


def brute_force_rounding(alpha, lower, upper, total):
    """Smallest L2 distance to alpha over all integer vectors in the box with the given sum."""
    best = np.inf
    for c in itertools.product(*[range(lo, hi + 1) for lo, hi in zip(lower, upper)]):
        if sum(c) == total:
            best = min(best, float(np.sum((np.array(c) - alpha) ** 2)))
    return best


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_round_counts_is_the_closest_integer_vector(data):
    k = data.draw(st.integers(1, 4))
    lower = np.array(data.draw(st.lists(st.integers(0, 3), min_size=k, max_size=k)))
    width = np.array(data.draw(st.lists(st.integers(0, 4), min_size=k, max_size=k)))
    upper = lower + width
    alpha = np.array(data.draw(st.lists(st.floats(0, 9, allow_nan=False), min_size=k, max_size=k)))
    total = data.draw(st.integers(int(lower.sum()), int(upper.sum())))
    c = round_counts(alpha, lower, upper, total)
    assert c.dtype == np.int64
    assert c.sum() == total
    assert np.all(c >= lower) and np.all(c <= upper)
    assert np.sum((c - alpha) ** 2) == pytest.approx(brute_force_rounding(alpha, lower, upper, total),
                                                   abs=1e-9)


def test_round_counts_default_total_is_largest_remainder():
    alpha = np.array([1.6, 2.3, 0.7, 4.4])  # sum 9.0
    c = round_counts(alpha)
    # textbook largest remainder: floors 1 2 0 4 (7), two round-ups to the largest remainders .7, .6
    np.testing.assert_array_equal(c, [2, 2, 1, 4])


def test_round_counts_ties_go_to_lower_index():
    np.testing.assert_array_equal(round_counts([0.5, 0.5, 0.5, 0.5], total=2), [1, 1, 0, 0])


def test_round_counts_respects_bounds_when_alpha_is_outside():
    c = round_counts([10.0, 0.0, 3.0], lower=[0, 2, 0], upper=[4, 5, 5], total=9)
    assert c.sum() == 9 and c[0] == 4 and c[1] >= 2


@pytest.mark.parametrize("kwargs, match", [
    (dict(alpha=[1.0, np.nan]), "NaN"),
    (dict(alpha=[[1.0]]), "1-D"),
    (dict(alpha=[1.0, 2.0], lower=[3, 0], upper=[2, 5]), "lower must not exceed upper"),
    (dict(alpha=[1.0, 2.0], upper=[1, 1], total=5), "total = 5"),
    (dict(alpha=[1.0, 2.0], total=2.5), "total must be an integer"),
    (dict(alpha=[1.0, 2.0], lower=[0, 0, 0]), "lower must have length 2"),
])
def test_round_counts_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        round_counts(**kwargs)


def test_scale_to_total_keeps_ratios_and_bounds():
    a = np.array([1.0, 2.0, 3.0])
    np.testing.assert_allclose(scale_to_total(a, 0, np.inf, 12.0), [2, 4, 6])
    out = scale_to_total(a, 0, [10, 10, 4], 14.0)
    assert out.sum() == pytest.approx(14.0)
    assert out[2] == pytest.approx(4.0)
    assert out[1] / out[0] == pytest.approx(2.0)
    with pytest.raises(ValueError, match="total"):
        scale_to_total(a, 0, 1, 5.0)
    # no factor reaches the total when the entries with alpha > 0 are all capped: the
    # rest is spread as a common shift over the others (the L2-nearest such vector)
    out = scale_to_total([0.0, 5.0, 0.0, 0.0], 0, [10, 2, 1, 10], 9.0)
    np.testing.assert_allclose(out, [3.0, 2.0, 1.0, 3.0])


@settings(max_examples=80, deadline=None)
@given(st.data())
def test_scale_to_total_property(data):
    k = data.draw(st.integers(1, 6))
    alpha = np.array(data.draw(st.lists(st.floats(0.01, 50), min_size=k, max_size=k)))
    lower = np.array(data.draw(st.lists(st.floats(0, 5), min_size=k, max_size=k)))
    upper = lower + np.array(data.draw(st.lists(st.floats(0, 40), min_size=k, max_size=k)))
    total = data.draw(st.floats(lower.sum(), upper.sum()))
    out = scale_to_total(alpha, lower, upper, total)
    assert out.sum() == pytest.approx(total, rel=1e-9, abs=1e-9)
    assert np.all(out >= lower - 1e-9) and np.all(out <= upper + 1e-9)
    # the entries strictly inside their bounds share one factor
    inside = (out > lower + 1e-7) & (out < upper - 1e-7)
    if inside.sum() >= 2:
        ratios = out[inside] / alpha[inside]
        np.testing.assert_allclose(ratios, ratios[0], rtol=1e-7)


@settings(max_examples=80, deadline=None)
@given(st.data())
def test_scale_to_total_reaches_the_total_with_zero_entries(data):
    k = data.draw(st.integers(1, 6))
    alpha = np.array(data.draw(st.lists(st.one_of(st.just(0.0), st.floats(0.01, 50)), min_size=k, max_size=k)))
    lower = np.array(data.draw(st.lists(st.floats(0, 5), min_size=k, max_size=k)))
    upper = lower + np.array(data.draw(st.lists(st.floats(0, 40), min_size=k, max_size=k)))
    total = data.draw(st.floats(lower.sum(), upper.sum()))
    out = scale_to_total(alpha, lower, upper, total)
    assert out.sum() == pytest.approx(total, rel=1e-9, abs=1e-9)
    assert np.all(out >= lower - 1e-9) and np.all(out <= upper + 1e-9)


# -- plans ------------------------------------------------------------------------------


def random_table(seed, n=400, c=5, p=0.3):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, c)) < p).astype(np.uint8)
    return PatternTable.from_labels(y), y


def random_counts(table, seed):
    rng = np.random.default_rng(seed)
    n = table.counts
    return rng.integers(0, 4 * n + 3)  # under- and oversampled patterns, some dropped


def test_plan_copies_follow_pattern_counts_round_robin():
    table, _ = random_table(1)
    counts = random_counts(table, 2)
    plan = Plan.from_pattern_counts(table, counts, random_state=3)
    inv = table.inverse
    for j in range(table.n_patterns):
        members = plan.copies[inv == j]
        assert members.sum() == counts[j]
        # round-robin: copies within a pattern differ by at most one
        assert members.max() - members.min() <= 1
        assert members.min() == counts[j] // table.counts[j]
    np.testing.assert_array_equal(plan.pattern_counts, counts)
    assert plan.n_samples == table.n_samples and plan.n_samples_out == counts.sum()


def test_plan_indices_consistent_with_copies():
    table, _ = random_table(4)
    plan = Plan.from_pattern_counts(table, random_counts(table, 5), random_state=0)
    idx = plan.indices()
    assert idx.dtype == np.int64 and idx.size == plan.n_samples_out
    np.testing.assert_array_equal(np.bincount(idx, minlength=plan.n_samples), plan.copies)
    # copy_index counts the occurrences of each sample seen so far (a plain loop as reference)
    seen = {}
    expected = []
    for s in idx.tolist():
        expected.append(seen.get(s, 0))
        seen[s] = seen.get(s, 0) + 1
    np.testing.assert_array_equal(plan.copy_index, expected)
    assert plan.n_dropped == int((plan.copies == 0).sum())
    assert plan.n_duplicates == int(np.maximum(plan.copies - 1, 0).sum())


def test_plan_seed_determinism_and_seed_dependence():
    table, _ = random_table(6)
    counts = random_counts(table, 7)
    a = Plan.from_pattern_counts(table, counts, random_state=11)
    b = Plan.from_pattern_counts(table, counts, random_state=11)
    c = Plan.from_pattern_counts(table, counts, random_state=12)
    assert a == b
    assert not np.array_equal(a.copies, c.copies)
    np.testing.assert_array_equal(a.pattern_counts, c.pattern_counts)


def test_undersampled_subset_is_uniform():
    # one pattern of 10 members keeps 3: over many seeds every member is kept ~30 % of the time
    table = PatternTable.from_labels(np.ones((10, 1), dtype=np.uint8))
    kept = np.zeros(10)
    for seed in range(2000):
        kept += Plan.from_pattern_counts(table, [3], random_state=seed).copies
    np.testing.assert_allclose(kept / 2000, 0.3, atol=0.05)


def test_plan_from_copies_and_identity():
    table, _ = random_table(8)
    rng = np.random.default_rng(0)
    copies = rng.integers(0, 5, table.n_samples)
    plan = Plan.from_copies(copies, table)
    np.testing.assert_array_equal(plan.pattern_counts, np.bincount(table.inverse, weights=copies).astype(int))
    assert Plan.from_copies(copies).pattern_counts is None
    ident = Plan.identity(7)
    np.testing.assert_array_equal(ident.indices(), np.arange(7))
    np.testing.assert_array_equal(ident.copy_index, np.zeros(7))
    with pytest.raises(ValueError, match="non-negative"):
        Plan.from_copies([1, -1])
    with pytest.raises(ValueError, match="integers"):
        Plan.from_copies([1.5])
    with pytest.raises(ValueError, match="entries"):
        Plan.from_copies([1, 2], table)
    with pytest.raises(ValueError, match="pattern_counts must have shape"):
        Plan.from_pattern_counts(table, [1, 2])
    with pytest.raises(ValueError, match="non-negative"):
        Plan.from_pattern_counts(table, -np.ones(table.n_patterns, dtype=int))
    with pytest.raises(ValueError, match="random_state"):
        Plan.from_pattern_counts(table, table.counts, random_state="x")


@pytest.mark.parametrize("suffix", [".npz", ".json"])
def test_plan_save_load_round_trip(tmp_path, suffix):
    table, _ = random_table(9)
    plan = Plan.from_pattern_counts(table, random_counts(table, 10), random_state=1)
    path = tmp_path / f"plan{suffix}"
    plan.save(path)
    back = Plan.load(path)
    assert back == plan
    assert back.copies.dtype == np.int64
    np.testing.assert_array_equal(back.indices(), plan.indices())
    bare = Plan.from_copies(plan.copies)
    bare.save(tmp_path / f"bare{suffix}")
    assert Plan.load(tmp_path / f"bare{suffix}") == bare
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")] == []


@pytest.mark.parametrize("suffix", [".npz", ".json"])
def test_plan_provenance_is_saved_inside_the_file(tmp_path, suffix):
    plan = Plan.from_copies([1, 2, 0])
    assert plan.provenance is None
    origin = {"table": {"path": "/data/t.npz", "sha256": "ab" * 32}, "target": [0.5, 0.25], "seed": 3,
              "pair": (1, 2), "nothing": None, "ok": True}
    plan.provenance = origin
    origin["seed"] = 99  # the plan holds a copy: later edits of the caller's dict do not reach it
    assert plan.provenance["seed"] == 3 and plan.provenance["pair"] == [1, 2]
    path = tmp_path / f"plan{suffix}"
    plan.save(path)
    back = Plan.load(path)
    # what json would give: the tuple a list, the rest as set
    assert back.provenance == json.loads(json.dumps({**origin, "seed": 3}))
    assert back == plan  # the provenance takes no part in equality
    back.provenance = None
    back.save(path)
    assert Plan.load(path).provenance is None


@pytest.mark.parametrize("value, match", [
    ([1, 2], "provenance must be a dict"),
    ({"x": float("nan")}, "no NaN or infinity"),
    ({"x": np.arange(3)}, "JSON values only"),
    ({1: "x"}, None),  # json turns the int key into "1": accepted as what json stores
])
def test_plan_provenance_must_be_json(value, match):
    plan = Plan.from_copies([1])
    if match is None:
        plan.provenance = value
        assert plan.provenance == {"1": "x"}
        return
    with pytest.raises(ValueError, match=match):
        plan.provenance = value
    assert plan.provenance is None


def test_plan_load_rejects_foreign_and_future_files(tmp_path):
    (tmp_path / "x.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="not a cobalance plan"):
        Plan.load(tmp_path / "x.json")
    (tmp_path / "y.json").write_text(json.dumps({"format": "cobalance.Plan", "version": 99, "copies": []}))
    with pytest.raises(ValueError, match="version 99"):
        Plan.load(tmp_path / "y.json")
    np.savez(tmp_path / "z.npz", copies=np.ones(3, dtype=np.int64))
    with pytest.raises(ValueError, match="not a cobalance plan"):
        Plan.load(tmp_path / "z.npz")


def test_plan_handles_a_large_table_vectorised():
    rng = np.random.default_rng(0)
    y = (rng.random((200_000, 6)) < 0.2).astype(np.uint8)
    table = PatternTable.from_labels(y)
    counts = round_counts(table.counts * rng.uniform(0.5, 3.0, table.n_patterns))
    plan = Plan.from_pattern_counts(table, counts, random_state=0)
    assert plan.n_samples_out == counts.sum()
    np.testing.assert_array_equal(np.bincount(table.inverse, weights=plan.copies).astype(np.int64), counts)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 60), st.integers(1, 4), st.integers(0, 2 ** 31), st.integers(0, 5))
def test_plan_invariants_property(n, c, seed, scale):
    rng = np.random.default_rng(seed)
    table = PatternTable.from_labels((rng.random((n, c)) < 0.5).astype(np.uint8))
    counts = rng.integers(0, scale * table.counts + 2)
    plan = Plan.from_pattern_counts(table, counts, random_state=seed)
    np.testing.assert_array_equal(np.bincount(plan.indices(), minlength=n), plan.copies)
    for j in range(table.n_patterns):
        members = plan.copies[table.inverse == j]
        assert members.sum() == counts[j] and members.max() - members.min() <= 1


def test_plan_constructor_checks_consistency():
    with pytest.raises(ValueError, match="pattern_counts sum to 3 but copies to 2"):
        Plan([1, 1], pattern_counts=[3])
    table = PatternTable.from_labels(np.eye(3, dtype=np.uint8), keep_inverse=False)
    with pytest.raises(ValueError, match="keep_inverse"):
        Plan.from_pattern_counts(table, [1, 1, 1])


# -- overflow ----------------------------------------------------------------------------------


def test_plan_totals_beyond_int64_are_refused_not_wrapped():
    table = PatternTable.from_labels((np.random.default_rng(0).random((60, 5)) < 0.3).astype(np.uint8))
    k = table.n_patterns
    with pytest.raises(ValueError, match=r"pattern_counts sum to \d+, beyond the int64 limit"):
        Plan.from_pattern_counts(table, np.full(k, 2 ** 62))  # n_samples_out wrapped
    total = k * 2 ** 62
    with pytest.raises(ValueError, match=str(total)):
        Plan.from_pattern_counts(table, np.full(k, 2 ** 62))
    with pytest.raises(ValueError, match="copies sum to 9223372036854775808"):
        Plan([2 ** 62, 2 ** 62])
    with pytest.raises(ValueError, match="copies sum to"):
        Plan.from_copies(np.full(4, 2 ** 62))
    with pytest.raises(ValueError, match="below 2\\*\\*63"):
        Plan(np.array([2 ** 63], dtype=np.uint64))
    with pytest.raises(ValueError, match="pattern_counts must hold non-negative integers below 2\\*\\*63"):
        Plan.from_pattern_counts(table, np.full(k, 1e30))
    # the largest total that fits is kept exactly
    big = Plan([2 ** 62, 2 ** 62 - 1])
    assert big.n_samples_out == 2 ** 63 - 1


def test_round_counts_refuses_totals_float64_cannot_hold():
    with pytest.raises(ValueError, match=r"total must be at most 2\*\*53 = 9007199254740992"):
        round_counts([1.0, 2.0], total=2 ** 53 + 1)
    with pytest.raises(ValueError, match=r"sums to 1e\+30, beyond the largest total"):
        round_counts([1e30, 1.0])
    with pytest.raises(ValueError, match="total must be an integer, got True"):
        round_counts([1.0, 2.0], total=True)
    np.testing.assert_array_equal(round_counts([2.0 ** 52, 2.0 ** 52], total=2 ** 53), [2 ** 52, 2 ** 52])


@pytest.mark.parametrize("counts, match", [
    ([1.0, 2.0], "pattern_counts must hold integers"),
    ([True, True, True], "pattern_counts must hold integers"),
    ([-1, 4], "pattern_counts must be non-negative, got -1 at position 0"),
    ([[1, 2]], "pattern_counts must be 1-D"),
])
def test_plan_constructor_checks_pattern_counts_as_strictly_as_copies(counts, match):
    # pattern_counts were cast to int64 without a check: 1.9 became 1, -1 passed
    with pytest.raises(ValueError, match=match):
        Plan([1, 2, 0], counts)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 2 ** 63 - 1), max_size=6) | st.lists(st.integers(0, 2 ** 61), max_size=6))
def test_plan_totals_are_exact_or_refused(copies):
    # Python's integers are the reference: no int64 wrap-around in between
    total = sum(copies)
    if total > 2 ** 63 - 1:
        with pytest.raises(ValueError, match=f"copies sum to {total}, beyond the int64 limit"):
            Plan(np.array(copies, dtype=np.int64))
    else:
        assert Plan(np.array(copies, dtype=np.int64), [total]).n_samples_out == total


def test_plan_indices_shuffled_is_a_seeded_permutation_of_sorted():
    plan = Plan([2, 0, 3, 1])
    sorted_ = plan.indices()
    np.testing.assert_array_equal(sorted_, [0, 0, 2, 2, 2, 3])
    np.testing.assert_array_equal(plan.indices("sorted"), sorted_)
    shuffled = plan.indices("shuffled", random_state=5)
    np.testing.assert_array_equal(np.sort(shuffled), sorted_)
    np.testing.assert_array_equal(shuffled, plan.indices("shuffled", random_state=5))
    orders = {tuple(plan.indices("shuffled", random_state=s)) for s in range(20)}
    assert len(orders) > 1
    reference = sorted_.copy()
    np.random.default_rng(5).shuffle(reference)
    np.testing.assert_array_equal(shuffled, reference)
    with pytest.raises(ValueError, match="order must be 'sorted' or 'shuffled', got 'random'"):
        plan.indices("random")
