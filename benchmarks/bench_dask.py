"""Pattern tables on Dask: time against partitions and worker processes.

Compared with what a user would otherwise run: the single-process native table
(``PatternTable.from_labels``), numpy's ``np.unique(axis=0, return_inverse=True)``, and
a Dask dataframe ``groupby(columns).size()`` (counts only: no first-occurrence order,
no per-sample inverse).

Default size: 400,000 samples x 24 classes, about 2,000 distinct patterns. Set
``COBALANCE_BENCH_DASK_N`` for more samples. Data are persisted on the cluster before
timing, as they would be after loading from storage; the timed part is the grouping
and, for ``cobalance.dask``, the inverse aligned with the partitions.

Run::

    PYTHONPATH=python .venv/bin/python -m pytest benchmarks/bench_dask.py --benchmark-only
"""

from __future__ import annotations

import os

import numpy as np
import pytest

da = pytest.importorskip("dask.array")
dd = pytest.importorskip("dask.dataframe")
pd = pytest.importorskip("pandas")
distributed = pytest.importorskip("distributed")

from cobalance import PatternTable  # noqa: E402
from cobalance.dask import pattern_table  # noqa: E402

N = int(os.environ.get("COBALANCE_BENCH_DASK_N", 400_000))
C = 24
N_DISTINCT = 2_000


@pytest.fixture(scope="module")
def labels():
    rng = np.random.default_rng(2024)
    pool = (rng.random((N_DISTINCT, C)) < rng.uniform(0.02, 0.4, C)).astype(np.uint8)
    # a skewed pattern frequency, as in real multi-label data
    weights = 1.0 / np.arange(1, N_DISTINCT + 1) ** 1.1
    return pool[rng.choice(N_DISTINCT, size=N, p=weights / weights.sum())]


@pytest.fixture(scope="module")
def local_table(labels):
    return PatternTable.from_labels(labels)


@pytest.fixture(scope="module", params=[1, 2], ids=lambda w: f"{w}workers")
def client(request):
    cluster = distributed.LocalCluster(n_workers=request.param, threads_per_worker=1, processes=True,
                                       host="127.0.0.1", dashboard_address=None, worker_dashboard_address=None)
    c = distributed.Client(cluster)
    yield c
    c.close()
    cluster.close()


def _same(table, reference):
    np.testing.assert_array_equal(table.packed, reference.packed)
    np.testing.assert_array_equal(table.counts, reference.counts)
    np.testing.assert_array_equal(table.inverse, reference.inverse)


def test_local_native(benchmark, labels, local_table):
    benchmark.group = "dask-alternatives"
    table = benchmark.pedantic(PatternTable.from_labels, args=(labels,), kwargs={"n_threads": 1}, rounds=5)
    _same(table, local_table)


def test_local_numpy_unique(benchmark, labels, local_table):
    benchmark.group = "dask-alternatives"
    uniq, inverse, counts = benchmark.pedantic(
        lambda: np.unique(labels, axis=0, return_inverse=True, return_counts=True), rounds=3)
    assert len(uniq) == local_table.n_patterns
    np.testing.assert_array_equal(np.sort(counts), np.sort(local_table.counts))


@pytest.mark.parametrize("n_partitions", [4, 16, 64])
def test_dask_sync_partitions(benchmark, labels, local_table, n_partitions):
    benchmark.group = "dask-partitions (sync scheduler, one process)"
    x = da.from_array(labels, chunks=(-(-N // n_partitions), C))
    table = benchmark.pedantic(lambda: pattern_table(x).compute(scheduler="sync"), rounds=3, warmup_rounds=1)
    _same(table, local_table)


def _fresh_persisted(client, labels, n_partitions):
    """Setup of one round: the labels under a new name, already in the workers' memory.

    A new name per round keeps a round from reusing the previous round's results
    (the graph's keys are deterministic, so equal inputs would give equal keys).
    """
    counter = _fresh_persisted.rounds = getattr(_fresh_persisted, "rounds", 0) + 1
    x = da.from_array(labels, chunks=(-(-N // n_partitions), C), name=f"bench-labels-{n_partitions}-{counter}")
    x = client.persist(x)
    distributed.wait(x)
    return (x,), {}


@pytest.mark.parametrize("n_partitions", [4, 16, 64])
def test_dask_cluster(benchmark, client, labels, local_table, n_partitions):
    """Table and inverse gathered to the client (8 bytes per sample cross the network)."""
    n_workers = len(client.scheduler_info()["workers"])
    benchmark.group = f"dask-cluster ({n_workers} worker processes)"
    table = benchmark.pedantic(lambda x: pattern_table(x).compute(),
                               setup=lambda: _fresh_persisted(client, labels, n_partitions), rounds=3)
    _same(table, local_table)


@pytest.mark.parametrize("n_partitions", [16])
def test_dask_cluster_inverse_stays(benchmark, client, labels, local_table, n_partitions):
    """The scale-out use: only the table comes back; the inverse stays on the workers."""
    n_workers = len(client.scheduler_info()["workers"])
    benchmark.group = f"dask-cluster ({n_workers} worker processes)"

    def run(x):
        result = pattern_table(x).persist()
        distributed.wait(result.inverse)
        return result.table.compute(), result

    table, result = benchmark.pedantic(run, setup=lambda: _fresh_persisted(client, labels, n_partitions),
                                       rounds=3)
    np.testing.assert_array_equal(table.packed, local_table.packed)
    np.testing.assert_array_equal(table.counts, local_table.counts)
    np.testing.assert_array_equal(result.inverse.compute(), local_table.inverse)


def test_dask_dataframe_groupby(benchmark, client, labels, local_table):
    n_workers = len(client.scheduler_info()["workers"])
    benchmark.group = f"dask-cluster ({n_workers} worker processes)"
    frame = pd.DataFrame(labels, columns=[f"c{i}" for i in range(C)])

    def setup():
        ddf = client.persist(dd.from_pandas(frame.copy(), npartitions=16))
        distributed.wait(ddf)
        return (ddf,), {}

    sizes = benchmark.pedantic(lambda ddf: ddf.groupby(list(frame.columns)).size().compute(), setup=setup,
                               rounds=3)
    np.testing.assert_array_equal(np.sort(sizes.to_numpy()), np.sort(local_table.counts))
