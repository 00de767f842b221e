"""Pattern tables of Dask collections, and plans applied back to them.

The grouping runs where the data lives: every partition is grouped by the native core
in its own task, the partial tables (patterns and counts only, never per-sample data)
are merged up a tree of tasks, and each partition's sample -> pattern index is then
rewritten to the merged numbering by a map that travels back down the same tree. The
result equals :meth:`cobalance.PatternTable.from_labels` on the whole matrix: same
patterns in the same order, same counts, same inverse.

What travels between workers
----------------------------
* up the tree: one ``(packed patterns, counts)`` pair per task, a few bytes per
  *pattern* of the partitions below it;
* down the tree: one int64 map per task, 8 bytes per pattern of that task's subtree;
* nothing per *sample* leaves the worker holding the partition unless the inverse is
  computed or gathered by the caller.

Requires ``dask[array]`` (and ``dask[dataframe]`` for dataframes); install with
``pip install cobalance[dask]``.
"""

from __future__ import annotations

import numbers
from typing import List, Optional, Sequence

import numpy as np

from . import _core
from .patterns import PatternTable

__all__ = ["DaskPatternTable", "pattern_table", "apply_plan"]


def _require_dask():
    try:
        import dask
        import dask.array as da
    except ImportError as exc:  # pragma: no cover - exercised only without dask installed
        raise ImportError("cobalance.dask needs dask: pip install 'cobalance[dask]'") from exc
    return dask, da


def _is_dask_dataframe(obj) -> bool:
    try:
        import dask.dataframe as dd
    except ImportError:
        return False
    return isinstance(obj, dd.DataFrame)


def _is_dask_array(obj) -> bool:
    try:
        import dask.array as da
    except ImportError:
        return False
    return isinstance(obj, da.Array)


# -- tasks (module-level functions so that worker processes can unpickle them) ---------


def _block_table(block, partition: int, n_classes: int, n_threads: int) -> PatternTable:
    """The table of one partition, with its local inverse (kept on the worker)."""
    values = block.to_numpy() if hasattr(block, "to_numpy") else np.asarray(block)
    if values.ndim != 2 or values.shape[1] != n_classes:
        raise ValueError(f"partition {partition} has shape {values.shape}, expected (n, {n_classes})")
    if values.shape[0] == 0:
        return PatternTable(_core.PatternTableBuilder(n_classes, True, 1).finish())
    try:
        return PatternTable.from_labels(values, n_threads=n_threads)
    except ValueError as exc:  # name the partition: rows are counted within it
        raise ValueError(f"partition {partition}: {exc}") from None


def _summary(table: PatternTable):
    """What a partition sends up the tree: its patterns and counts, not its inverse."""
    return np.array(table.packed), np.array(table.counts)


def _merge_summaries(n_classes: int, *children):
    """Merge consecutive partial tables; also return each child's pattern -> merged map.

    Feeding the children's patterns to a builder in order numbers the merged patterns
    by first occurrence over the concatenated samples, because each child already
    numbers its own patterns that way. The builder's inverse over those pattern rows is
    exactly the child -> merged map.
    """
    builder = _core.PatternTableBuilder(n_classes, True, 1)
    for packed, _ in children:
        builder.add_packed(np.ascontiguousarray(packed, dtype=np.uint64))
    merged = builder.finish()
    flat_map = np.array(merged.inverse())
    counts = np.zeros(merged.n_patterns, dtype=np.int64)
    maps = []
    start = 0
    for packed, child_counts in children:
        m = flat_map[start:start + len(packed)]
        start += len(packed)
        np.add.at(counts, m, child_counts)
        maps.append(m)
    return (np.array(merged.packed()), counts), maps


def _node_summary(node):
    return node[0]


def _child_final_map(parent_final: Optional[np.ndarray], node, k: int) -> np.ndarray:
    """Child ``k``'s pattern -> root pattern map, composed through its parent."""
    m = node[1][k]
    return m if parent_final is None else parent_final[m]


def _identity_map(summary) -> np.ndarray:
    return np.arange(len(summary[0]), dtype=np.int32)


def _block_inverse(final_map: np.ndarray, table: PatternTable) -> np.ndarray:
    return final_map[table.inverse] if table.n_samples else np.zeros(0, dtype=np.int32)


def _final_table(summary, n_classes: int, class_names) -> PatternTable:
    packed, counts = summary
    native = _core.PatternTable.from_parts(n_classes, np.ascontiguousarray(packed, dtype=np.uint64).reshape(
        -1, max(1, (n_classes + 63) // 64)), np.ascontiguousarray(counts, dtype=np.int64), None)
    return PatternTable(native, class_names)


def _with_inverse(table: PatternTable, inverse: np.ndarray) -> PatternTable:
    native = _core.PatternTable.from_parts(table.n_classes, np.ascontiguousarray(table.packed),
                                           np.ascontiguousarray(table.counts),
                                           np.ascontiguousarray(inverse, dtype=np.int64))
    return PatternTable(native, table.class_names)


# -- public API -----------------------------------------------------------------------


class DaskPatternTable:
    """A lazily computed pattern table of a Dask collection.

    Attributes
    ----------
    table : dask.delayed.Delayed
        Computes to a :class:`~cobalance.PatternTable` with patterns and counts but no
        inverse (small: its size depends on the number of patterns, not samples).
    inverse : dask.array.Array of int32, shape (n_samples,)
        Each sample's pattern index in ``table``, one chunk per input partition (chunk
        sizes are unknown, ``nan``, when the input's partition lengths are unknown, as
        for most dask dataframes).
    class_names : list of str
    n_partitions : int
    """

    def __init__(self, table, inverse, class_names: List[str]):
        self.table = table
        self.inverse = inverse
        self.class_names = list(class_names)

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    @property
    def n_partitions(self) -> int:
        return self.inverse.numblocks[0]

    def compute(self, **compute_kwargs) -> PatternTable:
        """Compute the table and its inverse in one pass and return a local PatternTable.

        The partitions are grouped once even though both outputs depend on them.
        ``compute_kwargs`` go to :func:`dask.compute` (e.g. ``scheduler=``).
        """
        dask, _ = _require_dask()
        table, inverse = dask.compute(self.table, self.inverse, **compute_kwargs)
        return _with_inverse(table, inverse)

    def compute_table(self, **compute_kwargs) -> PatternTable:
        """Compute only the patterns and counts (the inverse stays uncomputed)."""
        return self.table.compute(**compute_kwargs)

    def persist(self, **persist_kwargs) -> "DaskPatternTable":
        """Persist the table and the inverse (in distributed memory when on a cluster)."""
        dask, _ = _require_dask()
        table, inverse = dask.persist(self.table, self.inverse, **persist_kwargs)
        return DaskPatternTable(table, inverse, self.class_names)

    def __repr__(self) -> str:
        return f"DaskPatternTable(n_classes={self.n_classes}, n_partitions={self.n_partitions})"


def pattern_table(labels, *, class_names: Optional[Sequence[str]] = None, keep_inverse: bool = True,
                  split_every: int = 8, n_threads: int = 1):
    """Group the rows of a Dask 0/1 label matrix, partition by partition.

    Parameters
    ----------
    labels : dask.array.Array or dask.dataframe.DataFrame
        ``(n_samples, n_classes)`` of 0/1 numbers or booleans. A dask array chunked
        along the columns is rechunked to whole rows first (``rechunk({1: -1})``);
        a dataframe's columns are the classes (all of them, in order).
    class_names : sequence of str, optional
        Default: the dataframe's column names, or ``"0", "1", ...`` for an array.
    keep_inverse : bool
        When False, return only the delayed table (no per-sample index).
    split_every : int
        Fan-in of the merge tree (partial tables merged per task), at least 2.
    n_threads : int
        Native threads per task. Dask already runs one task per worker thread, so the
        default 1 avoids oversubscription; the result does not depend on it.

    Returns
    -------
    DaskPatternTable
        When ``keep_inverse`` is True; ``.compute()`` gives a PatternTable equal to
        ``PatternTable.from_labels(labels.compute())``.
    dask.delayed.Delayed
        When ``keep_inverse`` is False: computes to a PatternTable without inverse.

    Raises
    ------
    ValueError
        Not a dask array or dataframe, not 2-D, no columns, ``class_names`` of the wrong
        length, a bad ``split_every``; a value other than 0/1 raises when computed.
    """
    dask, da = _require_dask()
    if not isinstance(split_every, numbers.Integral) or split_every < 2:
        raise ValueError(f"split_every must be an integer >= 2, got {split_every!r}")
    if not isinstance(n_threads, numbers.Integral) or n_threads < 1:
        raise ValueError(f"n_threads must be a positive integer, got {n_threads!r}")
    if _is_dask_dataframe(labels):
        columns = [str(c) for c in labels.columns]
        n_classes = len(columns)
        default_names = columns
        blocks = list(labels.to_delayed())
        row_chunks = (np.nan,) * len(blocks)
    elif _is_dask_array(labels):
        if labels.ndim != 2:
            raise ValueError(f"labels must be a 2-D (n_samples, n_classes) dask array, got ndim={labels.ndim}")
        n_classes = labels.shape[1]
        if labels.numblocks[1] > 1:
            labels = labels.rechunk({1: -1})
        default_names = None
        blocks = list(labels.to_delayed()[:, 0])
        row_chunks = labels.chunks[0]
    else:
        raise ValueError("labels must be a dask.array.Array or dask.dataframe.DataFrame, got "
                         f"{type(labels).__name__}; use PatternTable.from_labels for in-memory data")
    if n_classes < 1:
        raise ValueError("labels must have at least one column (n_classes >= 1)")
    names = default_names if class_names is None else class_names
    # Validate the names now, on the client, rather than inside a task.
    names = PatternTable(_core.PatternTableBuilder(n_classes, False, 1).finish(), names).class_names

    delayed = dask.delayed
    leaves = [delayed(_block_table, pure=True)(b, i, n_classes, int(n_threads)) for i, b in enumerate(blocks)]
    level = [delayed(_summary, pure=True)(t) for t in leaves]

    # Upward pass: merge consecutive groups of `split_every` summaries, level by level,
    # remembering every merge node so that the maps can be sent back down.
    levels = []  # levels[d][g] = (node, children count) at depth d from the leaves
    while len(level) > 1:
        nodes, parents = [], []
        for start in range(0, len(level), split_every):
            group = level[start:start + split_every]
            node = delayed(_merge_summaries, pure=True)(n_classes, *group)
            nodes.append((node, len(group)))
            parents.append(delayed(_node_summary, pure=True)(node))
        levels.append(nodes)
        level = parents
    root_summary = level[0]
    table = delayed(_final_table, pure=True)(root_summary, n_classes, names)
    if not keep_inverse:
        return table

    # Downward pass: every node's final map is its parent's final map composed with the
    # node's own child map; the root's is the identity (None avoids an arange task).
    finals = [None]
    for nodes in reversed(levels):
        child_finals = []
        for (node, n_children), parent_final in zip(nodes, finals):
            for k in range(n_children):
                child_finals.append(delayed(_child_final_map, pure=True)(parent_final, node, k))
        finals = child_finals
    if finals == [None]:  # a single partition: nothing was merged
        finals = [delayed(_identity_map, pure=True)(root_summary)]

    parts = [da.from_delayed(delayed(_block_inverse, pure=True)(f, t), shape=(n,), dtype=np.int32)
             for f, t, n in zip(finals, leaves, row_chunks)]
    inverse = da.concatenate(parts, axis=0) if len(parts) > 1 else parts[0]
    return DaskPatternTable(table, inverse, names)


def _plan_copies(plan):
    copies = getattr(plan, "copies", plan)
    if _is_dask_array(copies):
        if copies.ndim != 1:
            raise ValueError(f"copies must be 1-D, got ndim={copies.ndim}")
        return copies
    arr = np.asarray(copies)
    if arr.ndim != 1:
        raise ValueError(f"copies must be 1-D (one count per sample), got ndim={arr.ndim}")
    if arr.size and arr.dtype.kind not in "iu":
        raise ValueError(f"copies must hold integers, got dtype {arr.dtype}")
    if arr.size and arr.min() < 0:
        raise ValueError(f"copies must be >= 0, got {arr.min()} at sample {int(np.argmin(arr))}")
    return arr.astype(np.int64, copy=False)


def _repeat_rows(block, copies):
    copies = np.asarray(copies, dtype=np.int64)
    if len(copies) != len(block):
        raise ValueError(f"a partition has {len(block)} rows but {len(copies)} copies")
    if hasattr(block, "iloc"):
        return block.iloc[np.repeat(np.arange(len(block)), copies)]
    return np.repeat(block, copies, axis=0)


def _slice_copies(copies, lengths, n_rows):
    if len(copies) != n_rows:
        raise ValueError(f"the plan has {len(copies)} per-sample copies but the collection has {n_rows} rows")
    bounds = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return [copies[bounds[i]:bounds[i + 1]] for i in range(len(lengths))]


def apply_plan(collection, plan):
    """Repeat every row of a Dask collection by its planned number of copies.

    Each partition is repeated in its own task with its slice of the copies, so the
    balanced collection (``copies.sum()`` rows) is never assembled in one process. Row
    order is kept: the copies of a sample are adjacent and samples stay in order, as
    ``np.repeat(x, copies, axis=0)``.

    Parameters
    ----------
    collection : dask.array.Array or dask.dataframe.DataFrame or dask.dataframe.Series
        Rows are samples, in the order the plan was fitted on.
    plan : cobalance.Plan or array-like of int or dask.array.Array
        Anything with a ``copies`` attribute (one non-negative integer per sample), or
        the copies themselves. A dask array of copies must be chunked like the
        collection's rows (e.g. derived from :attr:`DaskPatternTable.inverse`).

    Returns
    -------
    Same kind as ``collection``, with as many partitions. For a dask array with known
    chunks and in-memory copies the output chunk sizes are known; otherwise ``nan``.

    Raises
    ------
    ValueError
        Copies not 1-D, negative, non-integer, or not one per row (for a dataframe the
        row count is checked when computed unless its divisions give it).
    """
    dask, da = _require_dask()
    copies = _plan_copies(plan)
    delayed = dask.delayed
    if _is_dask_array(collection):
        arr = collection
        if arr.ndim < 1:
            raise ValueError("collection must have at least one dimension (rows)")
        if arr.ndim > 1 and any(nb > 1 for nb in arr.numblocks[1:]):
            arr = arr.rechunk({d: -1 for d in range(1, arr.ndim)})
        blocks = arr.to_delayed().reshape(arr.numblocks[0])
        lengths = arr.chunks[0]
        if _is_dask_array(copies):
            copy_parts = copies.rechunk((lengths,)) if not np.isnan(lengths).any() else copies
            if copy_parts.numblocks[0] != len(lengths):
                raise ValueError(f"copies has {copy_parts.numblocks[0]} chunks, the collection has {len(lengths)}")
            copy_parts = list(copy_parts.to_delayed())
            out_lengths = [np.nan] * len(lengths)
        else:
            if np.isnan(lengths).any():
                raise ValueError("collection has unknown chunk sizes; call compute_chunk_sizes() first")
            copy_parts = _slice_copies(copies, lengths, int(sum(lengths)))
            out_lengths = [int(c.sum()) for c in copy_parts]
        tail = arr.shape[1:]
        parts = [da.from_delayed(delayed(_repeat_rows, pure=True)(b, c), shape=(n,) + tail, dtype=arr.dtype)
                 for b, c, n in zip(blocks, copy_parts, out_lengths)]
        return da.concatenate(parts, axis=0) if len(parts) > 1 else parts[0]

    try:
        import dask.dataframe as dd
    except ImportError as exc:  # pragma: no cover
        raise ImportError("apply_plan on dataframes needs dask[dataframe]") from exc
    if not isinstance(collection, (dd.DataFrame, dd.Series)):
        raise ValueError("collection must be a dask array, DataFrame or Series, got "
                         f"{type(collection).__name__}")
    blocks = list(collection.to_delayed())
    if _is_dask_array(copies):
        if copies.numblocks[0] != len(blocks):
            raise ValueError(f"copies has {copies.numblocks[0]} chunks, the collection has {len(blocks)} partitions")
        copy_parts = list(copies.to_delayed())
    else:
        # Partition lengths are needed to slice in-memory copies; they cost one pass.
        lengths = collection.map_partitions(len).compute()
        copy_parts = _slice_copies(copies, list(lengths), int(sum(lengths)))
    parts = [delayed(_repeat_rows, pure=True)(b, c) for b, c in zip(blocks, copy_parts)]
    return dd.from_delayed(parts, meta=collection._meta, verify_meta=False)
