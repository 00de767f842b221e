"""Building a resampling plan from per-pattern counts: cobalance.Plan vs a per-pattern loop.

The alternative is what one writes by hand: group the samples by pattern (one sort),
then for every pattern repeat its members ``count // n`` times and draw the
``count % n`` extra members with ``rng.choice``. Both give per-sample copies that
differ by at most one within a pattern; the benchmark checks that and the totals.

N = 1e6 samples by default; COBALANCE_BENCH_PLAN_N=10000000 for the 1e7 shape.
"""

import os

import numpy as np
import pytest

from cobalance import PatternTable, Plan
from cobalance.plan import round_counts

N = int(os.environ.get("COBALANCE_BENCH_PLAN_N", 1_000_000))


SHAPES = {
    # 14 classes with long-tailed presence: ~1e3 distinct patterns
    "few_patterns": np.geomspace(0.5, 0.002, 14),
    # 40 classes at 5-25 %: ~7.5e5 distinct patterns at N = 1e6 (most of them rare)
    "many_patterns": np.linspace(0.05, 0.25, 40),
}


@pytest.fixture(scope="module", params=list(SHAPES))
def problem(request):
    rng = np.random.default_rng(0)
    presence = SHAPES[request.param]
    y = (rng.random((N, presence.size)) < presence).astype(np.uint8)
    table = PatternTable.from_labels(y)
    alpha = table.counts * rng.uniform(0.3, 4.0, table.n_patterns)
    counts = round_counts(alpha, 0, 50 * table.counts)
    print(f"{request.param}: N={N}, K={table.n_patterns}, N'={counts.sum()}")
    return table, counts


def per_pattern_loop(inverse, members, counts, seed):
    rng = np.random.default_rng(seed)
    order = np.argsort(inverse, kind="stable")
    starts = np.r_[0, np.cumsum(members)]
    copies = np.zeros(inverse.size, dtype=np.int64)
    for j in range(members.size):
        idx = order[starts[j]:starts[j + 1]]
        q, r = divmod(int(counts[j]), int(members[j]))
        copies[idx] = q
        if r:
            copies[rng.choice(idx, size=r, replace=False)] += 1
    return copies


def check(copies, table, counts):
    per_pattern = np.bincount(table.inverse, weights=copies, minlength=table.n_patterns)
    np.testing.assert_array_equal(per_pattern.astype(np.int64), counts)
    lo = np.full(table.n_patterns, np.iinfo(np.int64).max)
    hi = np.zeros(table.n_patterns, dtype=np.int64)
    np.minimum.at(lo, table.inverse, copies)
    np.maximum.at(hi, table.inverse, copies)
    assert np.all(hi - lo <= 1)


def test_plan_cobalance(benchmark, problem):
    table, counts = problem
    plan = benchmark(Plan.from_pattern_counts, table, counts, random_state=0)
    check(plan.copies, table, counts)
    assert plan.indices().size == counts.sum()


def test_plan_per_pattern_loop(benchmark, problem):
    table, counts = problem
    copies = benchmark(per_pattern_loop, np.asarray(table.inverse), np.asarray(table.counts), counts, 0)
    check(copies, table, counts)
