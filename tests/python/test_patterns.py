"""PatternTable against an independent brute-force reference (row -> tuple -> dict)."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cobalance import PatternTable
from conftest import read_multilabel

CLASS_COUNTS = [1, 7, 63, 64, 65, 1000]
# Above 2 * 2**15 rows the native core splits a batch between threads; the
# thread-invariance tests use more rows than that so that the split happens.
PARALLEL_ROWS = 70_000


# -- the reference ---------------------------------------------------------------------

def _group_rows(row_keys):
    """Groups of equal keys, in first-occurrence order: (first row, count) of each and every row's group."""
    ids: dict = {}
    first, counts, inverse = [], [], []
    for r, key in enumerate(row_keys):
        j = ids.get(key)
        if j is None:
            j = ids[key] = len(first)
            first.append(r)
            counts.append(0)
        counts[j] += 1
        inverse.append(j)
    return np.array(first, np.int64), np.array(counts, np.int64), np.array(inverse, np.int64)


def reference_table(labels):
    """Patterns in first-occurrence order, their counts and every row's pattern index."""
    y = np.asarray(labels).astype(bool)
    first, counts, inverse = _group_rows(tuple(row.tolist()) for row in y)
    return y[first].reshape(len(first), y.shape[1]), counts, inverse


def fast_reference_table(labels):
    """The same reference for large inputs: numpy.packbits rows as dict keys."""
    y = np.asarray(labels) != 0
    first, counts, inverse = _group_rows(row.tobytes() for row in np.packbits(y, axis=1))
    return y[first].reshape(len(first), y.shape[1]), counts, inverse


def assert_matches(table, labels, reference=reference_table):
    patterns, counts, inverse = reference(labels)
    n, c = np.shape(labels)
    assert table.n_samples == n
    assert table.n_classes == c
    assert table.n_patterns == len(counts) == len(table)
    np.testing.assert_array_equal(table.patterns, patterns)
    np.testing.assert_array_equal(table.counts, counts)
    np.testing.assert_array_equal(table.inverse, inverse)
    assert table.patterns.dtype == np.bool_ and table.patterns.shape == (len(counts), c)
    assert table.counts.dtype == np.int64 and table.inverse.dtype == np.int32
    # The packed form: class i is bit i % 64 of word i // 64.
    np.testing.assert_array_equal(table.packed, to_packed(patterns))
    np.testing.assert_array_equal(table.class_counts(), (np.asarray(labels) != 0).sum(axis=0, dtype=np.int64))


def long_tailed(n, c, seed):
    """Class c (1-based) present with probability 0.9 / c, as in the benchmarks."""
    rng = np.random.default_rng(seed)
    p = (0.9 / np.arange(1, c + 1)).astype(np.float32)
    return (rng.random((n, c), dtype=np.float32) < p).view(np.uint8)


def to_packed(y):
    y = np.asarray(y).astype(bool)
    n, c = y.shape
    b = np.packbits(y, axis=1, bitorder="little")
    b = np.pad(b, ((0, 0), (0, 8 * ((c + 63) // 64) - b.shape[1])))
    return np.ascontiguousarray(b).view(np.uint64).reshape(n, (c + 63) // 64)


def to_lists(y):
    y = np.asarray(y).astype(bool)
    rows, cols = np.nonzero(y)
    indptr = np.zeros(len(y) + 1, np.int64)
    np.cumsum(np.bincount(rows, minlength=len(y)), out=indptr[1:])
    return indptr, cols.astype(np.int64)


def assert_same_table(a, b):
    assert a == b
    np.testing.assert_array_equal(a.packed, b.packed)
    np.testing.assert_array_equal(a.counts, b.counts)
    if a.has_inverse:
        np.testing.assert_array_equal(a.inverse, b.inverse)


# -- hypothesis strategies ---------------------------------------------------------

@st.composite
def label_matrices(draw, max_rows=60):
    c = draw(st.sampled_from(CLASS_COUNTS))
    n = draw(st.integers(0, max_rows))
    kind = draw(st.sampled_from(["random", "long_tailed", "all_zero", "all_equal", "distinct"]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    if kind == "random":
        p = draw(st.sampled_from([0.05, 0.5, 0.95]))
        y = rng.random((n, c)) < p
    elif kind == "long_tailed":
        y = long_tailed(n, c, seed).astype(bool)
    elif kind == "all_zero":
        y = np.zeros((n, c), bool)
    elif kind == "all_equal":
        y = np.repeat(rng.random((1, c)) < 0.5, n, axis=0)
    else:  # every row distinct (C = 1 has only two distinct rows)
        n = min(n, 2 ** min(c, 20))
        seen, rows = set(), []
        while len(rows) < n:
            row = rng.random(c) < 0.5
            if row.tobytes() not in seen:
                seen.add(row.tobytes())
                rows.append(row)
        y = np.array(rows, bool).reshape(n, c)
    return y.astype(np.uint8)


FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- results equal the reference -----------------------------------------------------

@FAST
@given(label_matrices())
def test_from_labels_equals_reference(y):
    assert_matches(PatternTable.from_labels(y), y)


@FAST
@given(label_matrices())
def test_dense_packed_lists_sparse_agree(y):
    pytest.importorskip("scipy")
    import scipy.sparse as sp

    n, c = y.shape
    dense = PatternTable.from_labels(y)
    assert_same_table(dense, PatternTable.from_labels(y.astype(bool)))
    assert_same_table(dense, PatternTable.from_packed(to_packed(y), c))
    indptr, indices = to_lists(y)
    assert_same_table(dense, PatternTable.from_lists(indptr, indices, c))
    assert_same_table(dense, PatternTable.from_sparse(sp.csr_matrix(y)))
    assert_same_table(dense, PatternTable.from_sparse(sp.coo_matrix(y)))


@FAST
@given(label_matrices(), st.data())
def test_chunked_equals_one_shot_equals_merged(y, data):
    n, c = y.shape
    cuts = sorted(data.draw(st.lists(st.integers(0, n), max_size=6), label="cuts"))
    bounds = [0, *cuts, n]
    chunks = [y[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    one_shot = PatternTable.from_labels(y)
    assert_same_table(one_shot, PatternTable.from_chunks(iter(chunks), n_classes=c))
    parts = [PatternTable.from_labels(ch) for ch in chunks]

    def tree_merge(tables):
        # A random binary tree of merges over consecutive partitions.
        if len(tables) == 1:
            return tables[0]
        split = data.draw(st.integers(1, len(tables) - 1), label="split")
        return PatternTable.merge([tree_merge(tables[:split]), tree_merge(tables[split:])])

    assert_same_table(one_shot, tree_merge(parts))
    assert_same_table(one_shot, PatternTable.merge(parts))
    counts_only = PatternTable.merge([PatternTable.from_labels(ch, keep_inverse=False) for ch in chunks])
    assert not counts_only.has_inverse
    np.testing.assert_array_equal(counts_only.packed, one_shot.packed)
    np.testing.assert_array_equal(counts_only.counts, one_shot.counts)


@FAST
@given(label_matrices(), st.sampled_from([1, 2, 3, 8]))
def test_thread_count_does_not_change_small_tables(y, n_threads):
    assert_same_table(PatternTable.from_labels(y, n_threads=1), PatternTable.from_labels(y, n_threads=n_threads))


@pytest.mark.parametrize("c", [1, 7, 16, 17, 63, 64, 65, 300])
def test_parallel_paths_equal_reference(c):
    n = PARALLEL_ROWS * 2 + 17 if c <= 65 else PARALLEL_ROWS + 17  # wide rows: two blocks suffice
    y = long_tailed(n, c, seed=c)
    # Rare patterns that first occur late, in the second thread's block, and a
    # pattern that occurs only in the last row.
    y[n - 1] = 1
    y[n // 2 + 3, :] = 0
    y[n // 2 + 3, c - 1] = 1
    reference = fast_reference_table(y)
    single = PatternTable.from_labels(y, n_threads=1)
    assert_matches(single, y, reference=lambda _: reference)
    for n_threads in (2, 3, 8):
        assert_same_table(single, PatternTable.from_labels(y, n_threads=n_threads))
    assert_same_table(single, PatternTable.from_packed(to_packed(y), c, n_threads=3))
    indptr, indices = to_lists(y)
    assert_same_table(single, PatternTable.from_lists(indptr, indices, c, n_threads=3))
    # Streaming: chunks of uneven sizes, the later ones large enough to be split.
    chunks = [y[:1000], y[1000:PARALLEL_ROWS + 5000], y[PARALLEL_ROWS + 5000:]]
    assert_same_table(single, PatternTable.from_chunks(chunks, n_threads=2))
    merged = PatternTable.merge([PatternTable.from_labels(ch, n_threads=2) for ch in chunks], n_threads=2)
    assert_same_table(single, merged)
    counts_only = PatternTable.from_labels(y, keep_inverse=False, n_threads=2)
    np.testing.assert_array_equal(counts_only.counts, single.counts)
    np.testing.assert_array_equal(counts_only.packed, single.packed)


@pytest.mark.parametrize("c", range(1, 17))
def test_few_classes_across_pack_batches(c):
    # Up to 16 classes the rows of a batch (256 rows) are packed as one bit stream;
    # row counts that end inside a 64-byte block, a batch boundary and the last row
    # of the input, against the reference.
    rng = np.random.default_rng(100 + c)
    for n in (1, 3, 255, 256, 257, 511, 3 * 256 + 5):
        y = (rng.random((n, c)) < 0.4).astype(np.uint8)
        assert_matches(PatternTable.from_labels(y, n_threads=1), y, reference=fast_reference_table)


@pytest.mark.parametrize("c", [1, 9, 16])
@pytest.mark.parametrize("row", [0, 255, 256, 3 * 256 + 4])
def test_bad_value_at_a_pack_batch_edge(c, row):
    y = (np.random.default_rng(c).random((3 * 256 + 5, c)) < 0.4).astype(np.uint8)
    y[row, c - 1] = 2
    for n_threads in (1, 2):
        with pytest.raises(ValueError, match=f"got 2 at row {row}, column {c - 1}"):
            PatternTable.from_labels(y, n_threads=n_threads)


@pytest.mark.parametrize("c", [5, 9, 130])
@pytest.mark.parametrize("row", [0, 255, 256, PARALLEL_ROWS * 2 + 3])
def test_bad_packed_row_at_a_batch_edge(c, row):
    # Packed rows are tested for bits past n_classes once per batch of 256 rows; the
    # first bad row is still the one named, whatever the threads.
    words = to_packed(long_tailed(PARALLEL_ROWS * 3, c, seed=c))
    past = np.uint64(1) << np.uint64(c % 64)  # the first bit past n_classes
    words[row, -1] |= past
    words[-1, -1] |= past  # and a later bad row
    for n_threads in (1, 2, 3):
        with pytest.raises(ValueError, match=f"packed row {row} has bits set at or beyond n_classes = {c}"):
            PatternTable.from_packed(words, c, n_threads=n_threads)


def assert_matches_kept_or_not(t, y, reference, keep_inverse):
    """t (built with or without the inverse) equals the reference table of y."""
    if keep_inverse:
        assert_matches(t, y, reference=lambda _: reference)
    else:
        np.testing.assert_array_equal(t.counts, reference[1])
        np.testing.assert_array_equal(t.patterns, reference[0])


def assert_matches_with_and_without_inverse(y, reference, thread_counts):
    """from_labels(y) equals the reference for each thread count, inverse kept or not."""
    for n_threads in thread_counts:
        for keep_inverse in (True, False):
            t = PatternTable.from_labels(y, n_threads=n_threads, keep_inverse=keep_inverse)
            assert_matches_kept_or_not(t, y, reference, keep_inverse)


@pytest.mark.parametrize("c", [40, 300])
def test_few_patterns_of_many_classes_in_parallel(c):
    # Few distinct patterns over many classes: the blocks of rows are grouped in
    # parallel against a hashed index. The opening rows use one set of patterns and
    # the rest another (most rows of every block are new to the index), with a few
    # one-off rows late in the batch.
    rng = np.random.default_rng(c)
    n = PARALLEL_ROWS * 3
    first_set = rng.random((20, c)) < 0.3
    second_set = rng.random((30, c)) < 0.3
    y = second_set[rng.integers(0, 30, n)]
    y[: n // 4] = first_set[rng.integers(0, 20, n // 4)]
    for r in rng.integers(n // 2, n, 25):
        y[r] = rng.random(c) < 0.5
    y = y.view(np.uint8)
    reference = fast_reference_table(y)
    assert_matches_with_and_without_inverse(y, reference, (1, 2, 3, 4))
    chunks = [y[:n // 3], y[n // 3:]]
    assert_same_table(PatternTable.from_labels(y), PatternTable.from_chunks(chunks, n_threads=2))


@pytest.mark.parametrize("c", [65, 128, 200])
def test_wide_keys_inserted_by_all_threads_equal_reference(c):
    # Many patterns over more than 64 classes: the threads insert in parallel, each
    # into its own regions of the index, chunk by chunk. Against the reference, for
    # every thread count, input kind and stream split, with a pattern first seen
    # in the last row and rows that repeat patterns first seen chunks earlier.
    n = PARALLEL_ROWS * 2 + 101
    y = long_tailed(n, c, seed=200 + c)
    y[n - 1] = 1
    y[n // 3 :: 97] = y[5000]
    reference = fast_reference_table(y)
    for n_threads in (1, 2, 3, 4):
        t = PatternTable.from_labels(y, n_threads=n_threads)
        assert_matches(t, y, reference=lambda _: reference)
    packed = PatternTable.from_packed(to_packed(y), c, n_threads=2)
    assert_matches(packed, y, reference=lambda _: reference)
    indptr, indices = to_lists(y)
    assert_matches(PatternTable.from_lists(indptr, indices, c, n_threads=3), y, reference=lambda _: reference)
    streamed = PatternTable.from_chunks([y[:20_000], y[20_000:90_000], y[90_000:]], n_threads=2)
    assert_matches(streamed, y, reference=lambda _: reference)
    for hint in (n, 3 * n, n // 10):  # the table sized from the first chunk for `hint` rows
        streamed = PatternTable.from_chunks([y[:20_000], y[20_000:90_000], y[90_000:]], n_threads=2, n_samples=hint)
        assert_matches(streamed, y, reference=lambda _: reference)
    counts_only = PatternTable.from_labels(y, keep_inverse=False, n_threads=2)
    np.testing.assert_array_equal(counts_only.counts, reference[1])
    np.testing.assert_array_equal(counts_only.patterns, reference[0])


@pytest.mark.parametrize("c", [24, 64])
def test_one_word_keys_whose_table_outgrows_its_estimate(c):
    # Keys of one word, many new patterns: one thread inserts every row (inline
    # while the table has room). The opening rows draw from 512 patterns, so the
    # table is sized for few, and every later row is new: the table grows many
    # times during the batch. Some late rows repeat patterns of both parts.
    rng = np.random.default_rng(c)
    n = PARALLEL_ROWS * 3
    if c < 64:
        codes = rng.choice(1 << c, size=n, replace=False).astype(np.uint64)
    else:  # 64-bit draws: a repeat is possible but unlikely, and the reference counts it
        codes = rng.integers(0, np.iinfo(np.uint64).max, size=n, dtype=np.uint64, endpoint=True)
    codes[:4096] = codes[:512][rng.integers(0, 512, 4096)]
    codes[n // 2 :: 50] = codes[4096 + 7]
    codes[n // 2 + 1 :: 70] = codes[3]
    bits = (codes[:, None] >> np.arange(c, dtype=np.uint64)) & np.uint64(1)
    y = bits.astype(np.uint8)
    reference = fast_reference_table(y)
    assert_matches_with_and_without_inverse(y, reference, (1, 2, 3))
    streamed = PatternTable.from_chunks([y[:5000], y[5000:100_000], y[100_000:]], n_threads=2)
    assert_matches(streamed, y, reference=lambda _: reference)
    # The table sized from the first chunk for `hint` rows; 10**12 checks that its
    # growth past the first chunk's own estimate is capped (2^41 slots otherwise).
    for hint in (n, 4 * n, n // 10, 10**12):
        for keep in (True, False):
            streamed = PatternTable.from_chunks([y[:5000], y[5000:100_000], y[100_000:]], n_threads=2,
                                                n_samples=hint, keep_inverse=keep)
            assert_matches_kept_or_not(streamed, y, reference, keep)


@pytest.mark.parametrize("n_threads", [1, 2])
def test_every_row_distinct_in_parallel(n_threads):
    n = PARALLEL_ROWS * 2
    words = np.random.default_rng(5).permutation(n).astype(np.uint64).reshape(n, 1)
    t = PatternTable.from_packed(words, 64, n_threads=n_threads)
    np.testing.assert_array_equal(t.inverse, np.arange(n))
    np.testing.assert_array_equal(t.packed, words)
    np.testing.assert_array_equal(t.counts, np.ones(n, np.int64))


def test_hundred_thousand_classes():
    # Sparse label lists over 100,000 classes: reference on sets of class ids.
    rng = np.random.default_rng(11)
    c = 100_000
    rows = [tuple(sorted(set(rng.integers(0, c, rng.integers(0, 4)).tolist()))) for _ in range(300)]
    rows += rows[:100]  # repeats
    rows.append((c - 1,))
    ids, counts, inverse, first = {}, [], [], []
    for r, row in enumerate(rows):
        j = ids.setdefault(row, len(ids))
        if j == len(counts):
            counts.append(0)
            first.append(row)
        counts[j] += 1
        inverse.append(j)
    indptr = np.cumsum([0] + [len(r) for r in rows])
    indices = np.array([i for r in rows for i in r], np.int64)
    t = PatternTable.from_lists(indptr, indices, c)
    np.testing.assert_array_equal(t.counts, counts)
    np.testing.assert_array_equal(t.inverse, inverse)
    p_indptr, p_indices = t.sparse_patterns()
    assert [tuple(p_indices[a:b].tolist()) for a, b in zip(p_indptr[:-1], p_indptr[1:])] == first
    dense = np.zeros((len(rows), c), np.uint8)
    for r, row in enumerate(rows):
        dense[r, list(row)] = 1
    assert_same_table(t, PatternTable.from_labels(dense))
    assert_same_table(t, PatternTable.from_packed(to_packed(dense), c))


@pytest.mark.parametrize("n_threads", [2, 3])
def test_wide_sparse_rows_in_parallel(n_threads):
    # 5,000 classes (79 words per pattern), mostly distinct rows: the threaded
    # insertion path with wide keys, against the same set-based reference.
    rng = np.random.default_rng(12)
    c, n = 5000, PARALLEL_ROWS + 1000
    sizes = rng.integers(0, 4, n)
    indptr = np.concatenate([[0], np.cumsum(sizes)])
    indices = rng.integers(0, c, indptr[-1])
    ids, inverse = {}, np.empty(n, np.int64)
    for r in range(n):
        inverse[r] = ids.setdefault(frozenset(indices[indptr[r]:indptr[r + 1]].tolist()), len(ids))
    t = PatternTable.from_lists(indptr, indices, c, n_threads=n_threads)
    np.testing.assert_array_equal(t.inverse, inverse)
    np.testing.assert_array_equal(t.counts, np.bincount(inverse))
    assert_same_table(t, PatternTable.from_lists(indptr, indices, c, n_threads=1))


@pytest.mark.parametrize("name", ["emotions", "yeast", "scene", "enron", "medical", "genbase"])
def test_real_multilabel_data(name):
    _, names, y = read_multilabel(name)
    assert y.shape[1] == len(names)
    table = PatternTable.from_labels(y, class_names=names)
    assert_matches(table, y)
    assert table.class_names == names
    np.testing.assert_allclose(table.class_presence(), y.mean(axis=0))
    indptr, indices = to_lists(y)
    assert_same_table(table, PatternTable.from_lists(indptr, indices, y.shape[1], class_names=names))


def test_sparse_accessor_and_class_presence():
    y = np.array([[1, 0, 1], [0, 0, 0], [1, 0, 1], [0, 1, 0]], np.uint8)
    t = PatternTable.from_labels(y)
    indptr, indices = t.sparse_patterns()
    np.testing.assert_array_equal(indptr, [0, 2, 2, 3])
    np.testing.assert_array_equal(indices, [0, 2, 1])
    np.testing.assert_allclose(t.class_presence(), [0.5, 0.25, 0.5])
    empty = PatternTable.from_labels(np.zeros((0, 3), np.uint8))
    np.testing.assert_array_equal(empty.class_presence(), [0.0, 0.0, 0.0])
    assert empty.n_patterns == 0 and empty.patterns.shape == (0, 3)


def test_from_sparse_handles_explicit_zeros_and_duplicates_without_touching_the_input():
    sp = pytest.importorskip("scipy.sparse")
    m = sp.csr_matrix((np.array([1, 0, 1, 1]), np.array([0, 1, 2, 2]), np.array([0, 2, 4])), shape=(2, 3))
    data_before, indices_before = m.data.copy(), m.indices.copy()
    t = PatternTable.from_sparse(m)
    np.testing.assert_array_equal(t.patterns, [[True, False, False], [False, False, True]])
    np.testing.assert_array_equal(m.data, data_before)
    np.testing.assert_array_equal(m.indices, indices_before)


def test_from_packed_accepts_one_word_per_row_as_1d():
    words = np.array([3, 0, 3, 1], np.uint64)
    t = PatternTable.from_packed(words, 2)
    np.testing.assert_array_equal(t.inverse, [0, 1, 0, 2])
    assert_same_table(t, PatternTable.from_packed(words.view(np.int64), 2))


def test_from_chunks_over_memmap(tmp_path):
    y = long_tailed(5000, 12, seed=3)
    mm = np.lib.format.open_memmap(tmp_path / "y.npy", mode="w+", dtype=np.uint8, shape=y.shape)
    mm[:] = y
    mm.flush()
    ro = np.load(tmp_path / "y.npy", mmap_mode="r")
    t = PatternTable.from_chunks((ro[i:i + 777] for i in range(0, len(ro), 777)))
    assert_matches(t, y)
    with pytest.raises(ValueError, match="n_classes"):
        PatternTable.from_chunks(iter([]))
    empty = PatternTable.from_chunks(iter([]), n_classes=4)
    assert empty.n_samples == 0 and empty.n_classes == 4
    assert_same_table(t, PatternTable.from_chunks((ro[i:i + 777] for i in range(0, len(ro), 777)), n_samples=len(ro)))
    for bad in (-1, 2.5, "5000", True):
        with pytest.raises(ValueError, match="n_samples must be a non-negative integer"):
            PatternTable.from_chunks([y], n_samples=bad)


# -- persistence ---------------------------------------------------------------------

@settings(max_examples=25, deadline=None)
@given(label_matrices(max_rows=30), st.booleans())
def test_save_load_round_trip_is_exact(tmp_path_factory, y, keep_inverse):
    path = tmp_path_factory.mktemp("save") / "table.npz"
    names = [f"class {i}" for i in range(y.shape[1])]
    t = PatternTable.from_labels(y, class_names=names, keep_inverse=keep_inverse)
    t.save(path)
    back = PatternTable.load(path)
    assert back == t
    assert back.class_names == names
    assert back.has_inverse == keep_inverse
    np.testing.assert_array_equal(back.packed, t.packed)
    np.testing.assert_array_equal(back.counts, t.counts)


def test_save_adds_suffix_and_leaves_no_temporary(tmp_path):
    t = PatternTable.from_labels(np.eye(3, dtype=np.uint8))
    t.save(tmp_path / "plain")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain.npz"]
    assert PatternTable.load(tmp_path / "plain.npz") == t


def test_load_rejects_foreign_and_corrupted_files(tmp_path):
    t = PatternTable.from_labels(long_tailed(200, 10, seed=1))
    good = tmp_path / "good.npz"
    t.save(good)
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"this is not a zip archive")
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    foreign = tmp_path / "foreign.npz"
    np.savez(foreign, a=np.arange(3))
    for path in (garbage, truncated, foreign):
        with pytest.raises(ValueError, match="pattern-table file"):
            PatternTable.load(path)
    # Well-formed archives whose content contradicts itself.
    with np.load(good) as z:
        arrays = dict(z)
    for key, value in [("counts", arrays["counts"] + 1), ("packed", np.zeros_like(arrays["packed"])),
                       ("inverse", arrays["inverse"][::-1].copy() * 0 + 10**6),
                       ("n_classes", np.array(3)), ("version", np.array(99))]:
        bad = tmp_path / f"bad_{key}.npz"
        np.savez(bad, **{**arrays, key: value})
        with pytest.raises(ValueError):
            PatternTable.load(bad)


def test_load_reads_64_bit_inverse_and_rejects_entries_beyond_32_bits(tmp_path):
    # Files whose inverse is int64 (as written before the inverse became int32) load
    # to the same table; an entry that int32 cannot hold is named, not wrapped.
    t = PatternTable.from_labels(long_tailed(300, 12, seed=4))
    with np.load(_saved(t, tmp_path / "t.npz")) as z:
        arrays = dict(z)
    assert arrays["inverse"].dtype == np.int32
    wide = tmp_path / "wide.npz"
    np.savez(wide, **{**arrays, "inverse": arrays["inverse"].astype(np.int64)})
    assert PatternTable.load(wide) == t
    beyond = arrays["inverse"].astype(np.int64)
    beyond[7] += 2**32  # wraps to a valid index if narrowed without a check
    bad = tmp_path / "beyond.npz"
    np.savez(bad, **{**arrays, "inverse": beyond})
    with pytest.raises(ValueError, match=r"inverse\[7\] = 42949"):
        PatternTable.load(bad)
    floats = tmp_path / "floats.npz"
    np.savez(floats, **{**arrays, "inverse": arrays["inverse"].astype(np.float64)})
    with pytest.raises(ValueError, match="inverse must hold integers"):
        PatternTable.load(floats)


def _saved(t, path):
    t.save(path)
    return path


@FAST
@given(label_matrices(max_rows=30), st.booleans())
def test_pickle_round_trip(y, keep_inverse):
    t = PatternTable.from_labels(y, class_names=[f"c{i}" for i in range(y.shape[1])], keep_inverse=keep_inverse)
    back = pickle.loads(pickle.dumps(t))
    assert back == t and back.class_names == t.class_names and back.has_inverse == keep_inverse


# -- zero copy -----------------------------------------------------------------------

def test_outputs_are_read_only_views_of_the_table():
    t = PatternTable.from_labels(long_tailed(1000, 70, seed=2))
    for name in ("packed", "counts", "inverse"):
        a, b = getattr(t, name), getattr(t, name)
        assert np.shares_memory(a, b), name
        assert not a.flags.writeable, name
    # patterns is documented as a copy.
    assert not np.shares_memory(t.patterns, t.patterns)
    view = t.inverse
    del t
    assert view.sum() >= 0  # the view keeps the table alive


def _python_allocated_bytes(fn):
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        result = fn()
        return result, tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


def test_contiguous_inputs_are_not_copied():
    # numpy reports its buffers to tracemalloc; a copy of the input would show up.
    n, c = 200_000, 20
    y = long_tailed(n, c, seed=4)
    big = y.nbytes // 4
    _, grown = _python_allocated_bytes(lambda: PatternTable.from_labels(y, keep_inverse=False))
    assert grown < big
    _, grown = _python_allocated_bytes(lambda: PatternTable.from_labels(y.view(np.bool_), keep_inverse=False))
    assert grown < big
    words = to_packed(y)
    _, grown = _python_allocated_bytes(lambda: PatternTable.from_packed(words, c, keep_inverse=False))
    assert grown < words.nbytes // 4
    indptr, indices = to_lists(y)
    _, grown = _python_allocated_bytes(lambda: PatternTable.from_lists(indptr, indices, c, keep_inverse=False))
    assert grown < indices.nbytes // 4
    # A strided input is copied (documented), which the same probe sees.
    _, grown = _python_allocated_bytes(lambda: PatternTable.from_labels(np.asfortranarray(y), keep_inverse=False))
    assert grown >= y.nbytes


# -- bad input -----------------------------------------------------------------------

@pytest.mark.parametrize("labels, match", [
    (np.zeros(5, np.uint8), "labels.*2-D"),
    (np.zeros((2, 3, 4), np.uint8), "labels.*2-D"),
    (np.array([["a", "b"]]), "labels.*dtype"),
    (np.zeros((2, 2), complex), "labels.*dtype"),
    (np.zeros((2, 2), object), "labels.*dtype"),
    (np.array([[0, 2], [1, 1]], np.uint8), "labels.*2 at row 0, column 1"),
    (np.array([[0, 1], [1, -1]], np.int64), r"labels.*-1 at row 1, column 1"),
    (np.array([[0.5, 1.0]]), r"labels.*0.5 at row 0, column 0"),
    (np.zeros((4, 0), np.uint8), "n_classes >= 1"),
])
def test_bad_dense_labels(labels, match):
    with pytest.raises(ValueError, match=match):
        PatternTable.from_labels(labels)


@pytest.mark.parametrize("c, kind", [(9, "long_tailed"), (64, "long_tailed"), (64, "uniform"), (130, "uniform")])
def test_bad_dense_value_is_reported_at_its_row_whatever_the_threads(c, kind):
    # Few patterns (parallel blocks), many patterns of one word (one thread
    # inserting while the others pack ahead) and of wider keys (threads inserting
    # into their own regions) report the same first bad value.
    if kind == "uniform":
        y = (np.random.default_rng(7).random((PARALLEL_ROWS * 3, c)) < 0.5).view(np.uint8)
    else:
        y = long_tailed(PARALLEL_ROWS * 3, c, seed=7)
    y[PARALLEL_ROWS * 2 + 11, 4] = 3
    y[PARALLEL_ROWS * 2 + 50, 1] = 7
    for n_threads in (1, 2, 3):
        with pytest.raises(ValueError, match=f"got 3 at row {PARALLEL_ROWS * 2 + 11}, column 4"):
            PatternTable.from_labels(y, n_threads=n_threads)
    # A bad value in a later chunk names its row in the whole stream.
    with pytest.raises(ValueError, match=f"got 3 at row {PARALLEL_ROWS * 2 + 11}, column 4"):
        PatternTable.from_chunks([y[:1000], y[1000:]], n_threads=2)


def test_first_bad_block_is_reported_whatever_thread_ran_it():
    # Few patterns: the rows are split into blocks that the threads take from a
    # counter; of bad values in two blocks, the earlier row is named, every time.
    y = long_tailed(PARALLEL_ROWS * 3, 9, seed=9)
    y[40_000, 2] = 3
    y[200_000, 5] = 4
    for n_threads in (2, 3, 4):
        for _ in range(5):
            with pytest.raises(ValueError, match="got 3 at row 40000, column 2"):
                PatternTable.from_labels(y, n_threads=n_threads)


@pytest.mark.parametrize("c, kind", [(9, "long_tailed"), (64, "uniform"), (200, "uniform")])
def test_failed_batch_leaves_the_builder_unchanged(c, kind):
    from cobalance import _core

    if kind == "uniform":
        y = (np.random.default_rng(8).random((PARALLEL_ROWS * 3, c)) < 0.5).view(np.uint8)
    else:
        y = long_tailed(PARALLEL_ROWS * 3, c, seed=8)
    bad = y.copy()
    bad[-1, 0] = 2
    for n_threads in (1, 2, 3):
        b = _core.PatternTableBuilder(c, True, n_threads)
        b.add_dense(y[:5000])
        with pytest.raises(ValueError, match="labels must be 0 or 1"):
            b.add_dense(bad)
        assert b.n_samples == 5000
        b.add_dense(y[5000:])
        assert_same_table(PatternTable(b.finish()), PatternTable.from_labels(y))


@pytest.mark.parametrize("words, n_classes, match", [
    (np.array([[1], [1 << 5]], np.uint64), 5, "packed row 1 has bits set at or beyond n_classes = 5"),
    (np.array([[0, 1]], np.uint64), 64, "words.*1 words per row, got 2"),
    (np.zeros((2, 1), np.float64), 5, "words.*dtype"),
    (np.zeros((2, 1), np.uint8), 5, "words.*dtype"),
    (np.zeros((2, 1, 1), np.uint64), 5, "words.*ndim"),
    (np.zeros((2, 1), np.uint64), 0, "n_classes"),
])
def test_bad_packed(words, n_classes, match):
    with pytest.raises(ValueError, match=match):
        PatternTable.from_packed(words, n_classes)


@pytest.mark.parametrize("indptr, indices, n_classes, match", [
    ([0, 1, 2], [0, 5], 5, "class index 5 in row 1"),
    ([0, 1, 2], [0, -1], 5, "class index -1 in row 1"),
    ([0, 2, 1], [0, 1], 5, "indptr must be non-decreasing"),
    ([0, 1, 3], [0, 1], 5, "does not match len\\(indices\\)"),
    ([], [], 5, "indptr must have at least one entry"),
    ([[0, 1]], [0], 5, "indptr must be 1-D"),
    ([0, 1], [[0]], 5, "indices must be 1-D"),
    ([0, 1], [0.5], 5, "indices must hold integers"),
    ([0.0, 1.0], [0], 5, "indptr must hold integers"),
    ([0, 1], [0], 0, "n_classes"),
])
def test_bad_lists(indptr, indices, n_classes, match):
    with pytest.raises(ValueError, match=match):
        PatternTable.from_lists(np.array(indptr), np.array(indices), n_classes)


def test_bad_arguments():
    y = np.eye(3, dtype=np.uint8)
    with pytest.raises(ValueError, match="n_threads"):
        PatternTable.from_labels(y, n_threads=0)
    with pytest.raises(ValueError, match="class_names"):
        PatternTable.from_labels(y, class_names=["a", "b"])
    with pytest.raises(ValueError, match="class_names"):
        PatternTable.from_labels(y, class_names=["a", "a", "b"])
    with pytest.raises(ValueError, match="chunk.*columns"):
        PatternTable.from_chunks([y, np.eye(4, dtype=np.uint8)])
    with pytest.raises(ValueError, match="merge needs at least one table"):
        PatternTable.merge([])
    with pytest.raises(ValueError, match=r"tables\[1\] has 4 classes"):
        PatternTable.merge([PatternTable.from_labels(y), PatternTable.from_labels(np.eye(4, dtype=np.uint8))])
    with pytest.raises(ValueError, match=r"tables\[1\] must be a PatternTable"):
        PatternTable.merge([PatternTable.from_labels(y), y])


GROUPING_TESTS = ("from_labels_equals_reference or dense_packed_lists_sparse_agree or chunked_equals_one_shot "
                  "or parallel_paths_equal_reference or few_patterns_of_many_classes or wide_keys_inserted "
                  "or hundred_thousand_classes or wide_sparse_rows or real_multilabel_data "
                  "or failed_batch_leaves_the_builder_unchanged")


@pytest.mark.skipif(os.environ.get("COBALANCE_TEST_HASH_BITS") is not None, reason="already the inner run")
def test_grouping_when_distinct_keys_share_hashes():
    # The grouping tests above once more in a process where the hashes of keys of
    # several words keep 10 bits (COBALANCE_TEST_HASH_BITS): distinct keys then share
    # hashes all the time, so every path must tell them apart by the whole key
    # (with 64-bit hashes, about once in 4e5 groupings of 1e7 distinct rows).
    env = dict(os.environ, COBALANCE_TEST_HASH_BITS="10")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
                           "-k", GROUPING_TESTS], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and " failed" not in proc.stdout


# -- DataFrames: column names become class names -------------------------------------


def test_from_labels_dataframe_columns_become_class_names():
    from cobalance import Balancer

    pd = pytest.importorskip("pandas")
    frame = pd.DataFrame({
        "cat": [1, 0, 1, 1],
        "dog": pd.array([True, False, False, True], dtype="boolean"),
        "bird": pd.Categorical([0, 1, 0, 0]),
        "fish": [0.0, 1.0, 0.0, 1.0],
    })
    table = PatternTable.from_labels(frame)
    assert table.class_names == ["cat", "dog", "bird", "fish"]
    reference = np.array([[1, 1, 0, 0], [0, 0, 1, 1], [1, 0, 0, 0], [1, 1, 0, 1]], dtype=np.uint8)
    np.testing.assert_array_equal(table.patterns[table.inverse], reference.astype(bool))
    assert PatternTable.from_labels(frame, class_names=list("abcd")).class_names == list("abcd")
    assert Balancer().fit(frame).report_.to_dict()["classes"][0]["name"] == "cat"


def test_from_labels_dataframe_errors_name_the_column():
    pd = pytest.importorskip("pandas")
    with pytest.raises(ValueError, match="column 'dog' has a missing value at row 1"):
        PatternTable.from_labels(pd.DataFrame({"dog": pd.array([True, None], dtype="boolean")}))
    with pytest.raises(ValueError, match="column 'a' must hold 0/1"):
        PatternTable.from_labels(pd.DataFrame({"a": ["x", "y"]}))
    with pytest.raises(ValueError, match="must be 0 or 1, got 2"):
        PatternTable.from_labels(pd.DataFrame({"a": [0, 2]}))


def test_from_labels_polars_columns_become_class_names():
    pl = pytest.importorskip("polars")
    table = PatternTable.from_labels(pl.DataFrame({"a": [True, False], "b": [1, 1]}))
    assert table.class_names == ["a", "b"]
    np.testing.assert_array_equal(table.class_presence(), [0.5, 1.0])


# -- label lists over many classes: nothing per sample depends on n_classes -------------


def test_from_lists_over_1e8_classes_takes_memory_per_pattern_not_per_class():
    # Two rows over 10**8 classes: two patterns of 12.5 MB each, instead of a packed
    # row per sample (the builder's row buffers) and 10**8 default class names (6 GB);
    # peak memory measured in a fresh process (tracemalloc does not see the core).
    code = """if True:
        import resource, sys
        import numpy as np
        import scipy.sparse as sp
        from cobalance import PatternTable
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t = PatternTable.from_lists([0, 2, 3], [99_999_999, 5, 99_999_999], 10**8)
        s = PatternTable.from_sparse(sp.csr_matrix(([1, 1, 1], ([0, 0, 1], [5, 99_999_999, 99_999_999])),
                                                   shape=(2, 10**8)))
        grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
        indptr, indices = t.sparse_patterns()
        print(t.n_classes, t.n_samples, t.counts.tolist(), t.inverse.tolist(), indptr.tolist(), indices.tolist(),
              t == s, int(grown_mb < 500), round(grown_mb))
    """
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fields = proc.stdout.split()
    assert fields[:-1] == ["100000000", "2", "[1,", "1]", "[0,", "1]", "[0,", "2,", "3]", "[5,", "99999999,",
                           "99999999]", "True", "1"], proc.stdout


@pytest.mark.parametrize("n_classes", [2**32, 10**12, 10**30])
def test_from_lists_beyond_what_a_table_holds_names_n_classes_and_the_limit(n_classes):
    with pytest.raises(ValueError, match=rf"n_classes = {n_classes} is more than a pattern table holds "
                                         r"\(at most 2\^32 - 1 = 4294967295 classes.*here "
                                         rf"{(n_classes + 63) // 64 * 8}\)"):
        PatternTable.from_lists([0, 1], [0], n_classes)


def test_from_sparse_beyond_what_a_table_holds():
    sp = pytest.importorskip("scipy.sparse")
    with pytest.raises(ValueError, match="n_classes = 4294967296 is more than a pattern table holds"):
        PatternTable.from_sparse(sp.csr_matrix(([1], ([0], [7])), shape=(1, 2**32)))


@pytest.mark.parametrize("keep_inverse", [True, False])
def test_from_lists_over_many_classes_in_any_order_with_repeats(keep_inverse):
    # Rows listing their classes unsorted and repeated, over 10**6 classes (grouped by
    # their sets, never packed per row): the reference groups frozensets.
    rng = np.random.default_rng(21)
    c = 10**6
    pool = [rng.integers(0, c, rng.integers(0, 5)) for _ in range(40)]
    rows = [rng.permutation(np.concatenate([s, s[: rng.integers(0, len(s) + 1)]])) for s in
            (pool[i] for i in rng.integers(0, len(pool), 3000))]
    indptr = np.concatenate([[0], np.cumsum([len(r) for r in rows])])
    indices = np.concatenate(rows).astype(np.int64)
    first, counts, inverse = _group_rows(frozenset(r.tolist()) for r in rows)
    t = PatternTable.from_lists(indptr, indices, c, keep_inverse=keep_inverse)
    np.testing.assert_array_equal(t.counts, counts)
    if keep_inverse:
        np.testing.assert_array_equal(t.inverse, inverse)
    p_indptr, p_indices = t.sparse_patterns()
    assert [p_indices[a:b].tolist() for a, b in zip(p_indptr[:-1], p_indptr[1:])] == \
        [sorted(set(rows[r].tolist())) for r in first]
    with pytest.raises(ValueError, match=f"class index {c} in row 2 is outside"):
        PatternTable.from_lists([0, 1, 2, 4], [0, 1, 5, c], c)
