"""Class-presence pattern tables: unique label sets, their counts, and each sample's pattern."""

from __future__ import annotations

import os
from typing import Iterable, Optional, Sequence

import numpy as np

from . import _core, _provenance
from ._arguments import class_count as _check_n_classes
from ._arguments import thread_count as _threads
from ._atomic import atomic_savez
from ._strict import exact_sum_fits, npz_fields, npz_int, npz_int_vector, npz_str, open_npz

__all__ = ["PatternTable"]

_FORMAT = "cobalance.PatternTable"
_FORMAT_VERSION = 1


def _as_dense_labels(labels, name: str = "labels") -> np.ndarray:
    """A C-contiguous uint8 view of a 0/1 matrix; copies only when dtype or layout differ."""
    arr = np.asarray(labels)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (n_samples, n_classes) array, got ndim={arr.ndim}")
    if arr.dtype == np.bool_:
        arr = arr.view(np.uint8)
    elif arr.dtype != np.uint8:
        if arr.dtype.kind not in "iuf":
            raise ValueError(f"{name} must hold 0/1 numbers or booleans, got dtype {arr.dtype}")
        if arr.size:
            bad = (arr != 0) & (arr != 1)
            if bad.any():
                r, c = np.argwhere(bad)[0]
                raise ValueError(f"{name} must be 0 or 1, got {arr[r, c].item()!r} at row {r}, column {c}")
        arr = arr.astype(np.uint8)
    return np.ascontiguousarray(arr)


def _frame_labels(frame):
    """``(matrix, column names)`` of a pandas or polars DataFrame of 0/1 label columns.

    Boolean (also pandas' nullable ``boolean``), integer, float and categorical columns
    (with 0/1 or boolean categories) are accepted; a missing value is an error naming
    the column and row.
    """
    names = [str(c) for c in frame.columns]
    columns = []
    for name, key in zip(names, frame.columns):
        col = frame[key]
        if getattr(col.dtype, "name", None) == "category":  # pandas categorical: its values, not its codes
            col = col.astype(col.cat.categories.dtype)
        missing = col.isna() if hasattr(col, "isna") else col.is_null()
        if bool(missing.any()):
            row = int(np.flatnonzero(np.asarray(missing))[0])
            raise ValueError(f"labels column {name!r} has a missing value at row {row}; expected 0/1 or booleans")
        values = np.asarray(col.to_numpy())
        if values.dtype == object:  # e.g. pandas' nullable boolean / Int columns without missing values
            try:
                values = values.astype(np.float64)
            except (TypeError, ValueError) as err:
                raise ValueError(f"labels column {name!r} must hold 0/1 numbers or booleans: {err}") from None
        columns.append(values)
    matrix = np.column_stack(columns) if columns else np.zeros((len(frame), 0), dtype=np.uint8)
    return matrix, names


def _as_index(a, name: str) -> np.ndarray:
    arr = np.asarray(a)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got ndim={arr.ndim}")
    if arr.size and arr.dtype.kind not in "iu":
        raise ValueError(f"{name} must hold integers, got dtype {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=np.int64)


def _check_list_classes(n_classes) -> int:
    """n_classes for from_lists: _check_n_classes, and at most what a table holds (the
    core's limit, checked here too so that values beyond int64 get the same message)."""
    n_classes = _check_n_classes(n_classes)
    if n_classes > _core.MAX_CLASSES:
        raise ValueError(f"n_classes = {n_classes} is more than a pattern table holds (at most 2^32 - 1 = "
                         f"{_core.MAX_CLASSES} classes: the balancing problem numbers classes in 32 bits, and each "
                         f"pattern takes ceil(n_classes / 64) * 8 bytes, here {(n_classes + 63) // 64 * 8})")
    return n_classes


class PatternTable(_provenance.Recorded):
    """Unique class-presence vectors of a dataset.

    A sample's class-presence vector has bit ``i`` set when the sample contains
    class ``i``. Identical vectors form one *pattern*. Patterns are numbered in order
    of first occurrence, so a table depends only on the samples and their order,
    never on the number of threads.

    Build one with :meth:`from_labels`, :meth:`from_packed`, :meth:`from_lists`,
    :meth:`from_masks` or :meth:`from_chunks`; combine partitions with :meth:`merge`.

    Attributes
    ----------
    patterns : ndarray of bool, shape (n_patterns, n_classes)
    packed : ndarray of uint64, shape (n_patterns, ceil(n_classes / 64))
        The patterns bit-packed: class ``i`` is bit ``i % 64`` of word ``i // 64``.
    counts : ndarray of int64, shape (n_patterns,)
    inverse : ndarray of int32, shape (n_samples,)
        Pattern index of every sample (absent when built with ``keep_inverse=False``).
        32-bit: a table holds at most 2^31 - 1 patterns; counts are int64.
    class_names : list of str
    provenance : dict or None
        Where the table came from (e.g. the source file, its format and the scan
        options), as JSON values; saved inside the file by :meth:`save` and read back
        by :meth:`load`. None when not set (:func:`cobalance.labels.read_labels` and
        the command line fill it). It takes no part in ``==``.
    """

    def __init__(self, native: "_core.PatternTable", class_names: Optional[Sequence[str]] = None):
        self._native = native
        # The default names ("0", "1", ...) are made on first use: made here, a table of
        # 10**8 classes from from_lists would hold 10**8 strings (about 6 GB) at once.
        self._names = None if class_names is None else _class_names(class_names, native.n_classes)

    @property
    def class_names(self) -> list:
        if self._names is None:
            self._names = _class_names(None, self._native.n_classes)
        return self._names

    @class_names.setter
    def class_names(self, names) -> None:
        self._names = _class_names(names, self._native.n_classes)

    # -- construction -------------------------------------------------------------

    @classmethod
    def from_labels(cls, labels, *, class_names=None, keep_inverse: bool = True,
                    n_threads: Optional[int] = None) -> "PatternTable":
        """Group the rows of a dense 0/1 label matrix.

        Parameters
        ----------
        labels : array-like or DataFrame, shape (n_samples, n_classes)
            bool or uint8 (viewed without a copy when C-contiguous); other integer or
            float dtypes are checked for 0/1 and converted (a copy). A pandas or polars
            DataFrame (boolean, nullable boolean, numeric or 0/1 categorical columns;
            converted, a copy) gives its column names as the class names.
        class_names : sequence of str, optional
            Overrides a DataFrame's column names.
        keep_inverse : bool
            Keep the sample -> pattern index (4 bytes per sample).
        n_threads : int, optional
            Threads to use; default all cores. The result is the same for any value.

        Raises
        ------
        ValueError
            Not 2-D, zero columns, a missing value in a DataFrame, or a value other
            than 0/1 (the message names it).
        """
        if hasattr(labels, "columns") and hasattr(labels, "to_numpy"):
            labels, names = _frame_labels(labels)
            class_names = names if class_names is None else class_names
        y = _as_dense_labels(labels)
        if y.shape[1] == 0:
            raise ValueError("labels must have at least one column (n_classes >= 1), got shape "
                             f"{y.shape}")
        n_classes = y.shape[1]
        builder = _core.PatternTableBuilder(n_classes, keep_inverse, _threads(n_threads))
        builder.add_dense(y)
        return cls(builder.finish(), class_names)

    @classmethod
    def from_packed(cls, words, n_classes: int, *, class_names=None, keep_inverse: bool = True,
                    n_threads: Optional[int] = None) -> "PatternTable":
        """Group bit-packed rows (n_samples x ceil(n_classes / 64) uint64 words).

        Class ``i`` is bit ``i % 64`` of word ``i // 64``; bits at or beyond
        ``n_classes`` must be zero. A 1-D array is taken as one word per row when
        ``n_classes <= 64``. A C-contiguous uint64 or int64 array is viewed, not
        copied; other layouts are copied.

        Raises
        ------
        ValueError
            Not 64-bit integers (e.g. the bytes of ``numpy.packbits``), the wrong
            number of words per row, or a bit set at or beyond ``n_classes``.
        """
        n_classes = _check_n_classes(n_classes)
        w = np.asarray(words)
        if w.ndim == 1 and n_classes <= 64:
            w = w.reshape(-1, 1)
        if w.ndim != 2:
            raise ValueError(f"words must be 2-D (n_samples, n_words), got ndim={w.ndim}")
        if w.dtype.kind not in "iu" or w.dtype.itemsize != 8:
            raise ValueError(f"words must be 64-bit integers (uint64 or int64), got dtype {w.dtype}")
        n_words = (n_classes + 63) // 64
        if w.shape[1] != n_words:
            raise ValueError(f"words must have ceil(n_classes / 64) = {n_words} words per row, got {w.shape[1]}")
        w = np.ascontiguousarray(w).view(np.uint64)
        builder = _core.PatternTableBuilder(n_classes, keep_inverse, _threads(n_threads))
        builder.add_packed(w)
        return cls(builder.finish(), class_names)

    @classmethod
    def from_lists(cls, indptr, indices, n_classes: int, *, class_names=None,
                   keep_inverse: bool = True, n_threads: Optional[int] = None) -> "PatternTable":
        """Group sparse label lists in CSR form (e.g. ``scipy.sparse.csr_matrix``'s).

        The classes of sample ``r`` are ``indices[indptr[r]:indptr[r + 1]]``, in any
        order (a class listed twice counts once). Arrays are converted to int64 (a copy
        unless already int64 and contiguous).

        Time and memory are O(nnz + n_samples) plus ``ceil(n_classes / 64) * 8`` bytes
        per distinct pattern, not per sample: with many classes the rows are grouped by
        their sets of classes before any is packed. Ctrl-C stops the grouping
        (KeyboardInterrupt).

        Raises
        ------
        ValueError
            ``n_classes`` not a positive integer or above 2**32 - 1 (what a table holds:
            class numbers are 32-bit in the balancing problem, and each pattern takes
            ``ceil(n_classes / 64) * 8`` bytes, 512 MiB at the limit), ``indptr``
            decreasing or not ending at ``len(indices)``, or a class index outside
            ``[0, n_classes)`` (the message names it and its row).
        """
        n_classes = _check_list_classes(n_classes)
        builder = _core.PatternTableBuilder(n_classes, keep_inverse, _threads(n_threads))
        builder.add_lists(_as_index(indptr, "indptr"), _as_index(indices, "indices"))
        return cls(builder.finish(), class_names)

    @classmethod
    def from_sparse(cls, matrix, **kwargs) -> "PatternTable":
        """Group the rows of a scipy.sparse matrix (any nonzero entry means present).

        The matrix is not modified: when it holds explicit zeros or duplicate
        entries, a canonical copy is made; otherwise its CSR arrays are used as they are
        (converted to int64 when narrower, a copy of the index arrays). Costs as
        :meth:`from_lists`: nothing per sample depends on the number of columns.
        """
        csr = matrix.tocsr()
        if not csr.has_canonical_format or (csr.data == 0).any():
            csr = csr.copy()
            csr.sum_duplicates()
            csr.eliminate_zeros()
        return cls.from_lists(csr.indptr, csr.indices, csr.shape[1], **kwargs)

    @classmethod
    def from_chunks(cls, chunks: Iterable, n_classes: Optional[int] = None, *, class_names=None,
                    keep_inverse: bool = True, n_threads: Optional[int] = None,
                    n_samples: Optional[int] = None) -> "PatternTable":
        """Group dense label chunks added one after another (out-of-core input).

        Each chunk is an (n_i, n_classes) 0/1 array, e.g. slices of a ``numpy.memmap``.
        The result equals :meth:`from_labels` on the concatenation.

        ``n_samples``, when known (the memmap's length), is a speed hint: the first
        chunk then sizes the hash table for the patterns expected over all the rows,
        instead of growing it as later chunks bring new patterns. The result does not
        depend on it.
        """
        if n_samples is not None and (isinstance(n_samples, bool) or not isinstance(n_samples, (int, np.integer))
                                      or n_samples < 0):
            raise ValueError(f"n_samples must be a non-negative integer or None (not known), got {n_samples!r}")
        builder = None
        for i, chunk in enumerate(chunks):
            y = _as_dense_labels(chunk, f"chunk {i}")
            if builder is not None and y.shape[1] != n_classes:
                raise ValueError(f"chunk {i} has {y.shape[1]} columns, expected n_classes = {n_classes}")
            if builder is None:
                n_classes = _check_n_classes(n_classes if n_classes is not None else y.shape[1])
                builder = _core.PatternTableBuilder(n_classes, keep_inverse, _threads(n_threads))
                if n_samples is not None:
                    builder.expect_samples(n_samples)
            builder.add_dense(y)
        if builder is None:
            if n_classes is None:
                raise ValueError("from_chunks got no chunks; pass n_classes to build an empty table")
            builder = _core.PatternTableBuilder(_check_n_classes(n_classes), keep_inverse, _threads(n_threads))
        return cls(builder.finish(), class_names)

    @classmethod
    def merge(cls, tables: Sequence["PatternTable"], *, n_threads: Optional[int] = None) -> "PatternTable":
        """Merge tables of consecutive partitions, in order.

        The result equals the table of the concatenated samples: same patterns in the
        same order, counts summed, inverse indices referring to the merged patterns.
        Named tables must name their classes alike (the same names in the same
        order); a table with the default names ``"0", "1", ...`` (built without
        ``class_names``) merges with any, and the result keeps the names given.

        Raises
        ------
        ValueError
            No table, an entry that is not a PatternTable, or tables that differ in
            their number of classes or their class names (both lists are named).
        """
        tables = list(tables)
        if not tables:
            raise ValueError("merge needs at least one table")
        for i, t in enumerate(tables):
            if not isinstance(t, PatternTable):
                raise ValueError(f"tables[{i}] must be a PatternTable, got {type(t).__name__}")
            if t.n_classes != tables[0].n_classes:
                raise ValueError(f"tables[{i}] has {t.n_classes} classes, tables[0] has {tables[0].n_classes}")
        default = _class_names(None, tables[0].n_classes)
        named = [(i, t.class_names) for i, t in enumerate(tables) if t.class_names != default]
        for i, names in named[1:]:
            if names != named[0][1]:
                first = named[0][0]
                raise ValueError(f"tables[{i}] names its classes {names}, but tables[{first}] names them "
                                 f"{named[0][1]}; merge needs the same class names in the same order")
        native = _core.merge_tables([t._native for t in tables], _threads(n_threads))
        return cls(native, named[0][1] if named else default)

    @classmethod
    def from_masks(cls, masks, *, n_classes: int, class_names=None, **scan_options) -> "PatternTable":
        """Scan segmentation masks and group their class presence (see :func:`cobalance.scan_masks`)."""
        from .masks import scan_masks

        scan = scan_masks(masks, n_classes=n_classes, **scan_options)
        table = cls.from_labels(scan.presence, class_names=class_names)
        table.mask_scan = scan
        return table

    # -- attributes ----------------------------------------------------------------

    @property
    def n_classes(self) -> int:
        return self._native.n_classes

    @property
    def n_patterns(self) -> int:
        return self._native.n_patterns

    @property
    def n_samples(self) -> int:
        return self._native.n_samples

    @property
    def packed(self) -> np.ndarray:
        return self._native.packed()

    @property
    def counts(self) -> np.ndarray:
        return self._native.counts()

    @property
    def has_inverse(self) -> bool:
        return self._native.has_inverse

    @property
    def inverse(self) -> np.ndarray:
        if not self._native.has_inverse:
            raise AttributeError("this table was built with keep_inverse=False")
        return self._native.inverse()

    @property
    def patterns(self) -> np.ndarray:
        """Dense (n_patterns, n_classes) bool copy of the patterns."""
        return self._native.dense().view(np.bool_)

    def sparse_patterns(self):
        """The patterns in CSR form: ``(indptr, indices)`` (int64)."""
        return self._native.sparse()

    def class_counts(self) -> np.ndarray:
        """Number of samples containing each class (int64, length n_classes)."""
        return self._native.class_counts()

    def class_presence(self) -> np.ndarray:
        """Fraction of samples containing each class (float64, length n_classes)."""
        n = self.n_samples
        counts = self.class_counts().astype(np.float64)
        return counts / n if n else np.zeros_like(counts)

    def __len__(self) -> int:
        return self.n_patterns

    def __repr__(self) -> str:
        return (f"PatternTable(n_samples={self.n_samples}, n_classes={self.n_classes}, "
                f"n_patterns={self.n_patterns})")

    def __eq__(self, other) -> bool:
        if not isinstance(other, PatternTable):
            return NotImplemented
        # two tables with the default names compare without making them
        same_names = (self._names is None and other._names is None) or self.class_names == other.class_names
        same = (self.n_classes == other.n_classes and same_names
                and np.array_equal(self.packed, other.packed) and np.array_equal(self.counts, other.counts)
                and self.has_inverse == other.has_inverse)
        return same and (not self.has_inverse or np.array_equal(self.inverse, other.inverse))

    __hash__ = None  # mutable-array container

    def __reduce__(self):
        return (_restore, (self._native, self.class_names, self._provenance))

    # -- persistence ---------------------------------------------------------------

    def save(self, path) -> None:
        """Write the table to an ``.npz`` file (atomically: temporary name, then rename).

        The :attr:`provenance`, when set, is stored as the JSON text array ``provenance``.
        """
        arrays = dict(
            format=np.array(_FORMAT),
            version=np.array(_FORMAT_VERSION),
            n_classes=np.array(self.n_classes),
            packed=self.packed,
            counts=self.counts,
            class_names=np.array(self.class_names, dtype=str),
        )
        if self.has_inverse:
            arrays["inverse"] = self.inverse
        if self._provenance is not None:
            arrays["provenance"] = np.array(_provenance.to_text(self._provenance))
        atomic_savez(path, arrays)

    @classmethod
    def load(cls, path) -> "PatternTable":
        """Read a table written by :meth:`save`; the content is validated.

        Every array must have the dtype and shape :meth:`save` gives it (integers
        stored as integers, the patterns as 64-bit words, one name per class), and
        the arrays must agree with each other as :meth:`from_labels` would build them;
        a stored provenance must be a JSON object.

        Raises
        ------
        ValueError
            The file is not a pattern-table ``.npz`` (not a zip archive, truncated,
            arrays missing or unknown, pickled objects), has an unknown format
            version, or its arrays contradict each other (duplicate patterns, counts
            that do not match the inverse). The message names the file and the array.
        FileNotFoundError
            No file at ``path`` (other ``OSError`` where it cannot be opened).
        """
        name = os.fspath(path)
        where = repr(name)
        with open_npz(name, "pattern-table") as archive:
            if "format" not in archive.files:
                raise ValueError(f"{where} is not a cobalance pattern-table file (it has no 'format' array)")
            fields = npz_fields(archive, name, "pattern-table",
                                ("format", "version", "n_classes", "packed", "counts", "class_names"),
                                ("inverse", "provenance"))
        if npz_str(fields["format"], where, "format") != _FORMAT:
            raise ValueError(f"{where} is not a cobalance pattern-table file (its format is "
                             f"{str(fields['format'])[:40]!r}, expected {_FORMAT!r})")
        version = npz_int(fields["version"], where, "version", low=-2 ** 63)
        if not 1 <= version <= _FORMAT_VERSION:
            raise ValueError(f"{where} has format version {version}; this cobalance reads 1 to {_FORMAT_VERSION}")
        n_classes = npz_int(fields["n_classes"], where, "n_classes", low=1)
        names = fields["class_names"]
        if names.dtype.kind != "U" or names.shape != (n_classes,):
            raise ValueError(f"{where}: class_names must be {n_classes} texts (n_classes), got dtype {names.dtype}, "
                             f"shape {names.shape}")
        if names.dtype.itemsize == 0 and n_classes > 1:  # all empty: refused before a loop over them
            raise ValueError(f"{where}: class_names must be unique, got {n_classes} empty names")
        n_words = (n_classes + 63) // 64
        packed = fields["packed"]
        if packed.dtype.kind not in "iu" or packed.dtype.itemsize != 8 or packed.ndim != 2 \
                or packed.shape[1] != n_words:
            raise ValueError(f"{where}: packed must be 64-bit integers of shape (n_patterns, {n_words}) for "
                             f"n_classes = {n_classes}, got dtype {packed.dtype}, shape {packed.shape}")
        packed = np.ascontiguousarray(packed).view(np.uint64)
        counts = npz_int_vector(fields["counts"], where, "counts")
        if counts.size and counts.min() < 1:
            j = int(np.argmin(counts))
            raise ValueError(f"{where}: counts must be positive, got {counts[j]} for pattern {j}")
        try:
            exact_sum_fits(counts, "counts")
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        inverse = fields.get("inverse")
        if inverse is not None:
            inverse = npz_int_vector(inverse, where, "inverse")
        provenance = fields.get("provenance")
        provenance = None if provenance is None else _provenance.from_npz_text(provenance, where)
        try:
            native = _core.PatternTable.from_parts(n_classes, packed, counts, inverse)
            table = cls(native, [str(s) for s in names])
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        table._provenance = provenance
        return table


def _restore(native, class_names, provenance=None):
    table = PatternTable(native, class_names)
    table._provenance = provenance
    return table


def _class_names(names, n_classes: int) -> list:
    if names is None:
        return [str(i) for i in range(n_classes)]
    names = [str(n) for n in names]
    if len(names) != n_classes:
        raise ValueError(f"class_names has {len(names)} entries, expected n_classes = {n_classes}")
    if len(set(names)) != len(names):
        raise ValueError(f"class_names must be unique, got {names}")
    return names
