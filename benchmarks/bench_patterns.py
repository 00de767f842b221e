"""Pattern grouping: cobalance.PatternTable against what a user would otherwise write.

Data: long-tailed labels, class c (1-based) present with probability 0.9 / c, seeded.
Shapes C in {9, 64, 300}. cobalance starts from the dense uint8 matrix and also
produces the inverse (sample -> pattern); pandas and polars get the keys already
bit-packed (their packing is not timed), as in the issue. numpy.unique(axis=0) and
torch.unique(dim=0) are slow: the default run gives them 1e5 rows (compare time per
row there), the full run the same N as every other path.

    PYTHONPATH=python .venv/bin/python -m pytest benchmarks/bench_patterns.py --benchmark-only
    COBALANCE_BENCH_FULL=1 PYTHONPATH=python .venv/bin/python -m pytest benchmarks/bench_patterns.py --benchmark-only

COBALANCE_BENCH_FULL=1 uses N = 1e7 (the slow paths too, one round each) and adds the
out-of-core check: PatternTable.from_chunks over a numpy.memmap of N = 1e8 rows.
Every benchmark checks its result against the number of patterns and the sorted
counts of one reference (numpy.unique on the packed keys).
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
import pytest

from cobalance import PatternTable

FULL = os.environ.get("COBALANCE_BENCH_FULL") == "1"
N = 10_000_000 if FULL else 1_000_000
# numpy.unique(axis=0), torch.unique(dim=0). They sort, so their time per row grows
# with N: measured here at C=64, numpy.unique took 9.98 s on 1e6 rows and 141.7 s on
# 1e7 (14.2x), so the full run times them on N itself rather than scaling 1e6 by 10.
N_SLOW = N if FULL else 100_000
N_OUT_OF_CORE = 100_000_000                 # FULL only: memmap, read by chunks
CHUNK_ROWS = 10_000_000
SHAPES = [9, 64, 300]
ROUNDS = 5
# Shapes whose rounds take milliseconds get more of them, every path alike: the
# minimum of 3 was still off by up to 2x on the VM this was measured on, where the
# first calls after the data is built fault in pages far more slowly.
FAST_SHAPES = {9}
FAST_ROUNDS = 15
SLOW_ROUNDS = 1 if FULL else 3   # sort-based alternatives, seconds each at N = 1e7
# The N = 1e8 memmap cases are compared per row with the N = 1e7 ones, so they get a
# warm-up round and a minimum too: a single cold round at C=64 took 2.53 s on this VM,
# the warm rounds 1.30-1.36 s (the kernel zeroing fresh pages).
OUT_OF_CORE_ROUNDS = 3


def long_tailed(n, c, seed=0, chunk=1 << 20, out=None):
    """Class c (1-based) present with probability 0.9 / c; uint8 0/1, row-major."""
    rng = np.random.default_rng(seed)
    p = (0.9 / np.arange(1, c + 1)).astype(np.float32)
    y = np.empty((n, c), np.uint8) if out is None else out
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        y[s:e] = rng.random((e - s, c), dtype=np.float32) < p
    return y


def pack_rows(y):
    """(n, c) 0/1 -> (n, ceil(c / 64)) uint64, class i = bit i % 64 of word i // 64."""
    n, c = y.shape
    w = (c + 63) // 64
    b = np.packbits(y, axis=1, bitorder="little")
    if b.shape[1] != 8 * w:
        b = np.pad(b, ((0, 0), (0, 8 * w - b.shape[1])))
    return np.ascontiguousarray(b).view(np.uint64).reshape(n, w)


class Shape:
    """Data of one shape and its reference answer, built once per module."""

    def __init__(self, c, n):
        self.c, self.n = c, n
        self.y = long_tailed(n, c, seed=c)
        self.words = pack_rows(self.y)
        self.key1 = np.ascontiguousarray(self.words[:, 0]) if self.words.shape[1] == 1 else None
        rows = self.words.view(np.dtype((np.void, self.words.shape[1] * 8))).ravel()
        _, counts = np.unique(rows, return_counts=True)
        self.k = len(counts)
        self.sorted_counts = np.sort(counts)

    def check_counts(self, counts):
        counts = np.asarray(counts)
        assert len(counts) == self.k
        np.testing.assert_array_equal(np.sort(counts), self.sorted_counts)

    def check_grouping(self, inverse, counts, n=None):
        """inverse groups equal rows together and only them; counts match."""
        n = self.n if n is None else n
        inverse = np.asarray(inverse).reshape(-1)
        assert len(inverse) == n
        counts = np.asarray(counts)
        np.testing.assert_array_equal(np.bincount(inverse, minlength=len(counts)), counts)
        # The first row of each group stands for it: every row equals its group's.
        first = np.full(len(counts), -1, np.int64)
        order = np.arange(n - 1, -1, -1)
        first[inverse[order]] = order
        assert (first >= 0).all()
        np.testing.assert_array_equal(self.words[first[inverse]], self.words[:n])
        if n == self.n:
            self.check_counts(counts)
        else:
            assert len(np.unique(self.words[:n].view(np.dtype((np.void, self.words.shape[1] * 8))))) == len(counts)


_shapes = {}


@pytest.fixture(scope="module", params=SHAPES, ids=[f"C={c}" for c in SHAPES])
def shape(request):
    c = request.param
    if c not in _shapes:
        _shapes.clear()  # one shape in memory at a time (C=300 at N=1e7 is 3 GB dense)
        _shapes[c] = Shape(c, N)
    return _shapes[c]


def run(benchmark, fn, rounds=None):
    """Time fn; rounds default to ROUNDS, FAST_ROUNDS for the groups of FAST_SHAPES."""
    if rounds is None:
        rounds = FAST_ROUNDS if benchmark.group in {f"C={c}" for c in FAST_SHAPES} else ROUNDS
    return benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=1 if rounds > 1 else 0)


# -- cobalance ---------------------------------------------------------------------------

def test_cobalance_dense_with_inverse(benchmark, shape):
    benchmark.group = f"C={shape.c}"
    benchmark.extra_info.update(n=shape.n, patterns=shape.k, threads="all")
    t = run(benchmark, lambda: PatternTable.from_labels(shape.y))
    shape.check_grouping(t.inverse, t.counts)
    np.testing.assert_array_equal(t.packed[t.inverse[:1000]], shape.words[:1000])


def test_cobalance_dense_with_inverse_1_thread(benchmark, shape):
    benchmark.group = f"C={shape.c}"
    benchmark.extra_info.update(n=shape.n, patterns=shape.k, threads=1)
    t = run(benchmark, lambda: PatternTable.from_labels(shape.y, n_threads=1))
    shape.check_grouping(t.inverse, t.counts)


def test_cobalance_dense_counts_only(benchmark, shape):
    benchmark.group = f"C={shape.c}"
    benchmark.extra_info.update(n=shape.n, patterns=shape.k, threads="all")
    t = run(benchmark, lambda: PatternTable.from_labels(shape.y, keep_inverse=False))
    shape.check_counts(t.counts)


def test_cobalance_packed_with_inverse(benchmark, shape):
    benchmark.group = f"C={shape.c}"
    benchmark.extra_info.update(n=shape.n, patterns=shape.k, threads="all")
    t = run(benchmark, lambda: PatternTable.from_packed(shape.words, shape.c))
    shape.check_grouping(t.inverse, t.counts)


# -- the read-once floor -------------------------------------------------------------

def test_floor_read_packed_once(benchmark, shape):
    """Reading the packed keys once (an OR over all words): no grouping can beat it."""
    benchmark.group = f"C={shape.c}"
    words = shape.words.reshape(-1)
    acc = run(benchmark, lambda: np.bitwise_or.reduce(words))
    assert acc == np.bitwise_or.reduce(shape.words, axis=None)


def test_floor_read_dense_once(benchmark, shape):
    """Reading the dense uint8 input once, which cobalance starts from."""
    benchmark.group = f"C={shape.c}"
    flat = shape.y.reshape(-1)
    flat = flat[: len(flat) // 8 * 8].view(np.uint64)
    acc = run(benchmark, lambda: np.bitwise_or.reduce(flat))
    assert acc & ~np.uint64(0x0101010101010101) == 0


# -- what a user would otherwise write ------------------------------------------------

def test_numpy_unique_axis0(benchmark, shape):
    """numpy.unique(Y, axis=0, ...) on the dense matrix; N_SLOW rows."""
    benchmark.group = f"C={shape.c}"
    benchmark.extra_info.update(n=N_SLOW)
    y = shape.y[:N_SLOW]
    u, inv, counts = run(benchmark, lambda: np.unique(y, axis=0, return_inverse=True, return_counts=True),
                         rounds=1)
    shape.check_grouping(inv, counts, n=N_SLOW)


def test_numpy_packbits_unique(benchmark, shape):
    """numpy.packbits, then numpy.unique on the packed keys (one uint64 or a void row)."""
    benchmark.group = f"C={shape.c}"
    benchmark.extra_info.update(n=shape.n)
    y = shape.y

    def group():
        w = pack_rows(y)
        keys = w[:, 0] if w.shape[1] == 1 else w.view(np.dtype((np.void, w.shape[1] * 8))).ravel()
        return np.unique(keys, return_inverse=True, return_counts=True)

    u, inv, counts = run(benchmark, group, rounds=SLOW_ROUNDS)
    shape.check_grouping(inv, counts)


def test_torch_unique_dim0(benchmark, shape):
    """torch.unique(dim=0) on the dense matrix; N_SLOW rows."""
    torch = pytest.importorskip("torch")
    benchmark.group = f"C={shape.c}"
    benchmark.extra_info.update(n=N_SLOW)
    t = torch.from_numpy(shape.y[:N_SLOW])
    u, inv, counts = run(benchmark, lambda: torch.unique(t, dim=0, return_inverse=True, return_counts=True),
                         rounds=1)
    shape.check_grouping(inv.numpy(), counts.numpy(), n=N_SLOW)


def test_pandas_factorize_packed(benchmark, shape):
    """pandas.factorize on packed keys (with inverse); several words: groupby.ngroup."""
    pd = pytest.importorskip("pandas")
    benchmark.group = f"C={shape.c}"
    benchmark.extra_info.update(n=shape.n)
    if shape.key1 is not None:
        codes, uniques = run(benchmark, lambda: pd.factorize(shape.key1))
        counts = np.bincount(codes)
    else:
        df = pd.DataFrame(shape.words, columns=[f"w{i}" for i in range(shape.words.shape[1])])
        codes = run(benchmark, lambda: df.groupby(list(df.columns), sort=False).ngroup().to_numpy(),
                    rounds=SLOW_ROUNDS)
        counts = np.bincount(codes)
    shape.check_grouping(codes, counts)


def test_pandas_value_counts_packed(benchmark, shape):
    """pandas value_counts on packed keys (counts only), the issue's fastest at C=9."""
    pd = pytest.importorskip("pandas")
    benchmark.group = f"C={shape.c}"
    benchmark.extra_info.update(n=shape.n)
    if shape.key1 is not None:
        s = pd.Series(shape.key1)
        counts = run(benchmark, lambda: s.value_counts(sort=False))
    else:
        df = pd.DataFrame(shape.words, columns=[f"w{i}" for i in range(shape.words.shape[1])])
        counts = run(benchmark, lambda: df.value_counts(sort=False), rounds=SLOW_ROUNDS)
    shape.check_counts(counts.to_numpy())


def test_polars_group_by_packed(benchmark, shape):
    """polars group_by on packed keys (counts only), the issue's fastest at C=64 and 300."""
    pl = pytest.importorskip("polars")
    benchmark.group = f"C={shape.c}"
    benchmark.extra_info.update(n=shape.n)
    df = pl.DataFrame({f"w{i}": shape.words[:, i] for i in range(shape.words.shape[1])})
    cols = df.columns
    out = run(benchmark, lambda: df.group_by(cols).len())
    shape.check_counts(out["len"].to_numpy())


# -- out of core (FULL only) --------------------------------------------------------------

@pytest.fixture(scope="module", params=[9, 64], ids=["C=9", "C=64"])
def memmap_labels(request):
    """N = 1e8 long-tailed rows in a numpy.memmap on disk (FULL only)."""
    if not FULL:
        pytest.skip("set COBALANCE_BENCH_FULL=1 for the N = 1e8 memmap check")
    c = request.param
    with tempfile.TemporaryDirectory(dir=os.environ.get("COBALANCE_BENCH_TMP")) as tmp:
        path = os.path.join(tmp, "labels.u8")
        mm = np.memmap(path, dtype=np.uint8, mode="w+", shape=(N_OUT_OF_CORE, c))
        for s in range(0, N_OUT_OF_CORE, CHUNK_ROWS):
            long_tailed(CHUNK_ROWS, c, seed=c * 1000 + s // CHUNK_ROWS, out=mm[s:s + CHUNK_ROWS])
        mm.flush()
        del mm
        yield c, np.memmap(path, dtype=np.uint8, mode="r", shape=(N_OUT_OF_CORE, c))


def test_floor_read_memmap_1e8(benchmark, memmap_labels):
    """Reading the N = 1e8 memmap once, chunk by chunk: the floor of the next test."""
    c, data = memmap_labels
    benchmark.group = f"out-of-core C={c}"
    benchmark.extra_info.update(n=N_OUT_OF_CORE, chunk_rows=CHUNK_ROWS)

    def read():
        acc = np.uint64(0)
        for s in range(0, N_OUT_OF_CORE, CHUNK_ROWS):
            flat = np.asarray(data[s:s + CHUNK_ROWS]).reshape(-1)
            acc |= np.bitwise_or.reduce(flat[: len(flat) // 8 * 8].view(np.uint64))
        return acc

    assert run(benchmark, read, rounds=OUT_OF_CORE_ROUNDS) & ~np.uint64(0x0101010101010101) == 0


_memmap_reference = {}


def memmap_reference(c, data):
    """Sorted packed keys and their counts over the memmap: per-chunk numpy.unique on
    packed keys, then the union, weighted (computed once per shape)."""
    if c not in _memmap_reference:
        _memmap_reference.clear()
        keys, weights = [], []
        for s in range(0, N_OUT_OF_CORE, CHUNK_ROWS):
            u, cnt = np.unique(pack_rows(np.asarray(data[s:s + CHUNK_ROWS]))[:, 0], return_counts=True)
            keys.append(u)
            weights.append(cnt)
        u, inv = np.unique(np.concatenate(keys), return_inverse=True)
        _memmap_reference[c] = u, np.bincount(inv, weights=np.concatenate(weights)).astype(np.int64)
    return _memmap_reference[c]


@pytest.mark.parametrize("hint", [True, False], ids=["n_samples given", "n_samples not given"])
def test_cobalance_from_chunks_memmap_1e8(benchmark, memmap_labels, hint):
    """N = 1e8 rows from the memmap, grouped by chunks of 1e7 (counts only: an
    8e8-byte inverse would not change the picture); compare per row with N = 1e7.
    With the memmap's length passed as n_samples, the table is sized once from the
    first chunk; without it, it grows as later chunks bring new patterns."""
    c, data = memmap_labels
    benchmark.group = f"out-of-core C={c}"
    benchmark.extra_info.update(n=N_OUT_OF_CORE, chunk_rows=CHUNK_ROWS, n_samples_hint=hint)

    def group():
        chunks = (data[s:s + CHUNK_ROWS] for s in range(0, N_OUT_OF_CORE, CHUNK_ROWS))
        return PatternTable.from_chunks(chunks, n_classes=c, keep_inverse=False,
                                        n_samples=N_OUT_OF_CORE if hint else None)

    t = run(benchmark, group, rounds=OUT_OF_CORE_ROUNDS)
    assert t.n_samples == N_OUT_OF_CORE
    u, counts = memmap_reference(c, data)
    assert t.n_patterns == len(u)
    order = np.argsort(t.packed[:, 0])
    np.testing.assert_array_equal(t.packed[order, 0], u)
    np.testing.assert_array_equal(t.counts[order], counts)
