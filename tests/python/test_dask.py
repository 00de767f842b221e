"""cobalance.dask against a brute-force numpy grouping, locally and on worker processes."""

from __future__ import annotations

import gzip
import pickle

import numpy as np
import pytest

da = pytest.importorskip("dask.array")
dd = pytest.importorskip("dask.dataframe")
pd = pytest.importorskip("pandas")
distributed = pytest.importorskip("distributed")

from cobalance import PatternTable  # noqa: E402
from cobalance.dask import DaskPatternTable, apply_plan, pattern_table  # noqa: E402
from conftest import multilabel_path  # noqa: E402



def reference_grouping(y):
    """Patterns in order of first occurrence, their counts and each row's pattern (numpy only)."""
    y = np.asarray(y, dtype=np.uint8)
    if len(y) == 0:
        return np.zeros((0, y.shape[1]), bool), np.zeros(0, np.int64), np.zeros(0, np.int64)
    uniq, first, inv, counts = np.unique(y, axis=0, return_index=True, return_inverse=True, return_counts=True)
    order = np.argsort(first)  # sorted-unique id -> first-occurrence rank
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return uniq[order].astype(bool), counts[order].astype(np.int64), rank[inv.ravel()].astype(np.int64)


def assert_matches_reference(table: PatternTable, y):
    patterns, counts, inverse = reference_grouping(y)
    np.testing.assert_array_equal(table.patterns, patterns)
    np.testing.assert_array_equal(table.counts, counts)
    np.testing.assert_array_equal(table.inverse, inverse)
    assert table.n_samples == len(y)


def random_labels(rng, n, c, density=0.05, n_distinct=None):
    if n_distinct is None:
        return (rng.random((n, c)) < density).astype(np.uint8)
    pool = (rng.random((n_distinct, c)) < density).astype(np.uint8)
    return pool[rng.integers(0, n_distinct, n)]


def load_multilabel(name):
    with gzip.open(multilabel_path(name), "rt") as f:
        frame = pd.read_csv(f)
    return frame


@pytest.fixture(scope="module")
def client():
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                       dashboard_address=None, worker_dashboard_address=None)
    c = distributed.Client(cluster)
    yield c
    c.close()
    cluster.close()


# -- single process (synchronous scheduler) ------------------------------------------


@pytest.mark.parametrize("n, c, rows, split_every", [
    (1000, 5, 1000, 8),   # one partition: no merge
    (1000, 5, 97, 2),     # deep binary tree, ragged last chunk
    (1000, 70, 50, 3),    # two 64-bit words per pattern
    (1000, 130, 333, 8),  # three words
    (20, 3, 1, 4),        # one row per partition
])
def test_array_equals_reference(n, c, rows, split_every):
    rng = np.random.default_rng(n + c + rows)
    y = random_labels(rng, n, c, density=0.1, n_distinct=min(40, n))
    result = pattern_table(da.from_array(y, chunks=(rows, c)), split_every=split_every)
    assert isinstance(result, DaskPatternTable)
    assert result.inverse.chunks[0] == da.from_array(y, chunks=(rows, c)).chunks[0]
    table = result.compute(scheduler="sync")
    assert_matches_reference(table, y)
    # The table alone, without the inverse, has the same patterns and counts.
    alone = result.compute_table(scheduler="sync")
    assert not alone.has_inverse
    np.testing.assert_array_equal(alone.packed, table.packed)
    np.testing.assert_array_equal(alone.counts, table.counts)


def test_any_chunking_equals_reference():
    hypothesis = pytest.importorskip("hypothesis")
    from hypothesis import strategies as st

    @hypothesis.settings(max_examples=25, deadline=None, derandomize=True)
    @hypothesis.given(n=st.integers(0, 120), c=st.integers(1, 70), rows=st.integers(1, 50),
                      split_every=st.integers(2, 5), n_distinct=st.integers(1, 12), seed=st.integers(0, 2**16))
    def check(n, c, rows, split_every, n_distinct, seed):
        rng = np.random.default_rng(seed)
        y = random_labels(rng, n, c, density=0.3, n_distinct=n_distinct)
        table = pattern_table(da.from_array(y, chunks=(rows, c)), split_every=split_every).compute(scheduler="sync")
        assert_matches_reference(table, y)

    check()


def test_column_chunks_are_rechunked():
    rng = np.random.default_rng(1)
    y = random_labels(rng, 500, 12, density=0.3)
    table = pattern_table(da.from_array(y, chunks=(64, 5))).compute(scheduler="sync")
    assert_matches_reference(table, y)


def test_bool_and_float_inputs_and_empty_partitions():
    rng = np.random.default_rng(2)
    y = random_labels(rng, 300, 4, density=0.4)
    ybool = da.from_array(y.astype(bool), chunks=(50, 4))
    assert_matches_reference(pattern_table(ybool).compute(scheduler="sync"), y)
    # A filter leaves the second partition empty and every chunk size unknown.
    x = da.from_array(y.astype(np.float32), chunks=(40, 4))
    rows = da.arange(len(y), chunks=40)
    keep = (rows < 40) | (rows >= 80)
    filtered = x[keep]
    assert np.isnan(filtered.chunks[0]).all()
    kept = np.r_[0:40, 80:len(y)]
    assert_matches_reference(pattern_table(filtered).compute(scheduler="sync"), y[kept])


def test_unique_rows_worst_case():
    # Every sample its own pattern: the maps carry as much as the inverse.
    n = 600
    y = np.array([[(i >> b) & 1 for b in range(10)] for i in range(n)], dtype=np.uint8)[::-1]
    table = pattern_table(da.from_array(y, chunks=37), split_every=2).compute(scheduler="sync")
    assert table.n_patterns == n
    assert_matches_reference(table, y)


def test_dataframe_equals_reference_and_takes_column_names():
    rng = np.random.default_rng(3)
    y = random_labels(rng, 800, 6, density=0.2)
    frame = pd.DataFrame(y, columns=[f"class_{i}" for i in range(6)])
    result = pattern_table(dd.from_pandas(frame, npartitions=9), split_every=4)
    assert result.class_names == list(frame.columns)
    table = result.compute(scheduler="sync")
    assert table.class_names == list(frame.columns)
    assert_matches_reference(table, y)


def test_keep_inverse_false_gives_a_delayed_table():
    rng = np.random.default_rng(4)
    y = random_labels(rng, 200, 3, density=0.5)
    table = pattern_table(da.from_array(y, chunks=30), keep_inverse=False).compute(scheduler="sync")
    patterns, counts, _ = reference_grouping(y)
    np.testing.assert_array_equal(table.patterns, patterns)
    np.testing.assert_array_equal(table.counts, counts)


@pytest.mark.parametrize("name", ["emotions", "yeast", "enron"])
def test_real_data_equals_reference(name):
    frame = load_multilabel(name)
    result = pattern_table(dd.from_pandas(frame, npartitions=5), split_every=2)
    table = result.compute(scheduler="threads")
    assert table.class_names == list(frame.columns)
    assert_matches_reference(table, frame.to_numpy())


def test_bad_input_messages():
    y = da.zeros((10, 3), chunks=5, dtype=np.uint8)
    with pytest.raises(ValueError, match="dask.array.Array or dask.dataframe.DataFrame"):
        pattern_table(np.zeros((10, 3)))
    with pytest.raises(ValueError, match="2-D"):
        pattern_table(da.zeros(10, chunks=5))
    with pytest.raises(ValueError, match="split_every"):
        pattern_table(y, split_every=1)
    with pytest.raises(ValueError, match="class_names has 2 entries"):
        pattern_table(y, class_names=["a", "b"])
    bad = da.from_array(np.array([[0, 1, 0]] * 2 + [[0, 2, 0]] * 2), chunks=2)
    with pytest.raises(ValueError, match="partition 1: labels must be 0 or 1"):
        pattern_table(bad).compute(scheduler="sync")


# -- apply_plan -------------------------------------------------------------------------


class _PlanLike:
    def __init__(self, copies):
        self.copies = copies


def test_apply_plan_array_matches_numpy_repeat():
    rng = np.random.default_rng(5)
    y = random_labels(rng, 400, 5, density=0.3)
    copies = rng.integers(0, 4, len(y))
    x = da.from_array(y, chunks=(61, 2))
    out = apply_plan(x, _PlanLike(copies))
    assert out.shape == (int(copies.sum()), 5)  # chunk sizes known from the copies
    assert out.numblocks[0] == x.numblocks[0]
    np.testing.assert_array_equal(out.compute(scheduler="sync"), np.repeat(y, copies, axis=0))


def test_apply_plan_dataframe_and_dask_copies():
    rng = np.random.default_rng(6)
    y = random_labels(rng, 300, 4, density=0.3)
    frame = pd.DataFrame(y, columns=list("abcd"), index=np.arange(300) * 10)
    ddf = dd.from_pandas(frame, npartitions=6)
    copies = rng.integers(0, 3, len(y))
    expected = frame.iloc[np.repeat(np.arange(len(frame)), copies)]
    out = apply_plan(ddf, copies)
    assert out.npartitions == ddf.npartitions
    pd.testing.assert_frame_equal(out.compute(scheduler="sync"), expected)
    # Copies derived per partition from the dask inverse: per-pattern copies looked up.
    result = pattern_table(ddf)
    per_pattern = np.arange(result.compute_table(scheduler="sync").n_patterns) % 3
    lazy_copies = result.inverse.map_blocks(lambda inv: per_pattern[inv], dtype=np.int64)
    pattern_of = reference_grouping(y)[2]
    expected2 = frame.iloc[np.repeat(np.arange(len(frame)), per_pattern[pattern_of])]
    pd.testing.assert_frame_equal(apply_plan(ddf, lazy_copies).compute(scheduler="sync"), expected2)


def test_apply_plan_bad_copies():
    x = da.zeros((10, 2), chunks=5)
    with pytest.raises(ValueError, match="10 rows"):
        apply_plan(x, np.ones(9, dtype=int))
    with pytest.raises(ValueError, match=">= 0"):
        apply_plan(x, -np.ones(10, dtype=int))
    with pytest.raises(ValueError, match="integers"):
        apply_plan(x, np.ones(10))


# -- worker processes ------------------------------------------------------------------


def test_native_table_pickles():
    rng = np.random.default_rng(7)
    y = random_labels(rng, 100, 70, density=0.1)
    table = PatternTable.from_labels(y, class_names=[f"c{i}" for i in range(70)])
    assert pickle.loads(pickle.dumps(table)) == table


def test_distributed_equals_reference_on_random_data(client):
    rng = np.random.default_rng(8)
    y = random_labels(rng, 5000, 20, density=0.1, n_distinct=300)
    result = pattern_table(da.from_array(y, chunks=(400, 20)), split_every=3)
    table = result.compute()  # the client is the default scheduler
    assert_matches_reference(table, y)


def test_distributed_real_data_and_apply_plan(client):
    frame = load_multilabel("yeast")
    ddf = dd.from_pandas(frame, npartitions=8)
    persisted = pattern_table(ddf).persist()
    # The inverse partitions live in the worker processes, not in this one.
    distributed.wait([persisted.table, persisted.inverse])
    holders = client.who_has(persisted.inverse)
    assert len(holders) == 8 and all(len(w) >= 1 for w in holders.values())
    table = persisted.compute()
    assert_matches_reference(table, frame.to_numpy())
    copies = np.random.default_rng(9).integers(0, 3, len(frame))
    balanced = apply_plan(ddf, copies).compute()
    pd.testing.assert_frame_equal(balanced, frame.iloc[np.repeat(np.arange(len(frame)), copies)])


def test_distributed_workers_return_pattern_tables(client):
    # A PatternTable made on a worker process travels back by pickling.
    rng = np.random.default_rng(10)
    y = random_labels(rng, 50, 5, density=0.3)
    future = client.submit(PatternTable.from_labels, y, class_names=list("vwxyz"))
    table = future.result()
    assert table.class_names == list("vwxyz")
    assert_matches_reference(table, y)
