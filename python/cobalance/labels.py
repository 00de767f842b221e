"""Reading label files: CSV, ``.npy``, ``.npz`` and Parquet, chunk by chunk, into a :class:`PatternTable`.

A label file holds one row per sample and one 0/1 column per class:

=========  ==================================================================================
format     what is read
=========  ==================================================================================
csv        a header row of class names, then 0/1 cells (``.csv``, ``.csv.gz``, ``.tsv``,
           ``.tsv.gz``; tab-separated for ``.tsv``). Read with pandas when installed, else
           the ``csv`` module.
npy        a 2-D array (memory-mapped, so only one chunk is in memory at a time)
npz        the array ``labels`` (or the archive's only array) and optional ``class_names``
parquet    the file's columns, one batch at a time (needs pyarrow)
=========  ==================================================================================

:func:`iter_label_chunks` streams the rows as checked 0/1 ``uint8`` chunks of at most
``chunk_rows`` rows; :func:`read_labels` groups them into a :class:`PatternTable`
whose :attr:`~PatternTable.provenance` names the file, its format, its columns and
its SHA-256. Every value is checked once, in the chunk it arrives in: a cell that is
not 0 or 1 (a 2, an empty cell, a word) is a ``ValueError`` naming the file, the row
(the first data row is row 1; a CSV header is not counted) and the column.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence

import numpy as np

from ._provenance import file_sha256
from ._version import __version__
from .patterns import PatternTable

__all__ = ["LABEL_FORMATS", "CHUNK_ROWS", "LabelChunks", "label_format", "iter_label_chunks", "read_labels"]

#: The formats :func:`read_labels` reads.
LABEL_FORMATS = ("csv", "npy", "npz", "parquet")

#: Rows per chunk by default (bounded memory on large inputs).
CHUNK_ROWS = 1 << 16

_SUFFIXES = ((".csv", "csv"), (".csv.gz", "csv"), (".tsv", "csv"), (".tsv.gz", "csv"), (".npy", "npy"),
             (".npz", "npz"), (".parquet", "parquet"), (".pq", "parquet"))


def _one_line(text) -> str:
    return " ".join(str(text).split())


def label_format(path, format: Optional[str] = None) -> str:
    """The format of a label file: ``format`` when given (checked), else from the file name.

    Raises
    ------
    ValueError
        ``format`` not one of :data:`LABEL_FORMATS`, or a name whose suffix says nothing.
    """
    if format is not None:
        if format not in LABEL_FORMATS:
            raise ValueError(f"format must be one of {', '.join(LABEL_FORMATS)}, got {format!r}")
        return format
    name = Path(path).name.lower()
    for suffix, kind in _SUFFIXES:
        if name.endswith(suffix):
            return kind
    raise ValueError(f"cannot tell the format of {str(path)!r} from its name; pass format= "
                     f"({', '.join(LABEL_FORMATS)})")


class LabelChunks:
    """The checked chunks of one label file (see :func:`iter_label_chunks`); iterate once.

    Attributes
    ----------
    path : pathlib.Path
    format : str
        One of :data:`LABEL_FORMATS`.
    class_names : list of str
        One per column of the chunks (``class_names`` given, else the file's).
    columns : list of str
        The file's names of the columns read, in the order read (``"0"``, ``"1"``, ...
        for an ``.npy`` or an ``.npz`` without ``class_names``).
    n_rows : int or None
        The number of rows when the format tells it before reading (not for CSV).
    chunk_rows : int
    """

    def __init__(self, path: Path, format: str, class_names: List[str], columns: List[str], n_rows: Optional[int],
                 chunk_rows: int, blocks: Iterator):
        self.path, self.format = path, format
        self.class_names, self.columns, self.n_rows, self.chunk_rows = class_names, columns, n_rows, chunk_rows
        self._blocks = blocks

    @property
    def n_chunks(self) -> Optional[int]:
        """How many chunks iterating gives, when :attr:`n_rows` is known."""
        return None if self.n_rows is None else -(-self.n_rows // self.chunk_rows)

    def __iter__(self) -> Iterator[np.ndarray]:
        where = str(self.path)
        for first_row, block in self._blocks:
            yield _checked_chunk(block, first_row, self.class_names, where)

    def __repr__(self) -> str:
        return f"LabelChunks({str(self.path)!r}, format={self.format!r}, n_classes={len(self.class_names)})"


def iter_label_chunks(path, *, format: Optional[str] = None, columns: Optional[Sequence[str]] = None,
                      delimiter: Optional[str] = None, class_names: Optional[Sequence[str]] = None,
                      chunk_rows: int = CHUNK_ROWS) -> LabelChunks:
    """The rows of a label file as checked 0/1 chunks, read lazily.

    Parameters
    ----------
    path : path-like
        A label file (see the module docstring for the formats).
    format : {"csv", "npy", "npz", "parquet"}, optional
        Default: from the file name.
    columns : sequence of str, optional
        CSV and Parquet: read only these columns, in this order (e.g. to leave out an
        id column). Default: every column.
    delimiter : str, optional
        CSV field separator; default ``","``, or a tab for ``.tsv`` names.
    class_names : sequence of str, optional
        Names of the columns read, in order (overrides the header; names the columns of
        an ``.npy``).
    chunk_rows : int
        Rows per chunk.

    Returns
    -------
    LabelChunks
        Iterating it yields C-contiguous ``uint8`` arrays of shape ``(rows, n_classes)``
        holding only 0 and 1; it also tells the class names and, where the format does,
        the number of rows before any is read. The header is read (and the names
        checked) here; the values as the chunks are iterated.

    Raises
    ------
    ValueError
        Naming the file: it cannot be read in its format, is empty, has no label
        columns, a column asked for is missing, names repeat, ``class_names`` has
        another length than the columns, ``columns`` given for ``.npy``/``.npz``; while
        iterating, a value other than 0/1 (with its row and column) or a CSV line of
        another number of fields.
    ImportError
        Parquet without pyarrow.
    FileNotFoundError
        No file at ``path``.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"label file {str(path)!r} does not exist")
    if path.is_dir():
        raise ValueError(f"label file {str(path)!r} is a folder, expected a file")
    fmt = label_format(path, format)
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, (int, np.integer)) or chunk_rows < 1:
        raise ValueError(f"chunk_rows must be a positive integer, got {chunk_rows!r}")
    chunk_rows = int(chunk_rows)
    columns = None if columns is None else [str(c) for c in columns]
    if fmt in ("npy", "npz") and columns:
        raise ValueError("columns applies to CSV and Parquet files; name .npy/.npz columns with class_names")
    n_rows = None
    if fmt == "csv":
        names, blocks = _csv_blocks(path, delimiter, columns, chunk_rows)
    elif fmt == "parquet":
        names, blocks, n_rows = _parquet_blocks(path, columns, chunk_rows)
    elif fmt == "npy":
        arr = _npy_array(path)
        n_rows, names = arr.shape[0], [str(i) for i in range(arr.shape[1])]
        blocks = ((r, np.asarray(arr[r:r + chunk_rows])) for r in range(0, n_rows, chunk_rows))
    else:
        labels, stored = _npz_labels(path)
        n_rows, names = labels.shape[0], stored or [str(i) for i in range(labels.shape[1])]
        blocks = ((r, labels[r:r + chunk_rows]) for r in range(0, n_rows, chunk_rows))
    file_names = list(names)
    if class_names is not None:
        given = [str(n) for n in class_names]
        if len(given) != len(names):
            raise ValueError(f"class_names has {len(given)} names but {path} has {len(names)} label columns")
        names = given
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ValueError(f"{path}: class name {dup!r} appears twice")
    if not names:
        raise ValueError(f"{path} has no label columns")
    return LabelChunks(path, fmt, names, file_names, n_rows, chunk_rows, blocks)


def read_labels(path, *, format: Optional[str] = None, columns: Optional[Sequence[str]] = None,
                delimiter: Optional[str] = None, class_names: Optional[Sequence[str]] = None,
                keep_inverse: bool = True, n_threads: Optional[int] = None,
                progress: Optional[Callable] = None) -> PatternTable:
    """Group a label file's rows into a :class:`PatternTable`, one chunk at a time.

    Parameters
    ----------
    path, format, columns, delimiter, class_names
        As :func:`iter_label_chunks`.
    keep_inverse, n_threads
        As :meth:`PatternTable.from_chunks`.
    progress : callable, optional
        ``progress(chunks, n_chunks)`` returns ``chunks`` wrapped (e.g. in a progress
        bar); ``n_chunks`` is None where the format does not tell the row count.

    Returns
    -------
    PatternTable
        Equal to ``PatternTable.from_labels`` of the whole matrix, with the class
        names, and a :attr:`~PatternTable.provenance` of ``source`` (the absolute
        path), ``source_format``, ``columns`` (the file's names of the columns read),
        ``source_sha256`` (of the file's bytes, read once more after the labels) and
        ``cobalance`` (the version).

    Raises
    ------
    ValueError, ImportError, FileNotFoundError
        As :func:`iter_label_chunks`.
    """
    chunks = iter_label_chunks(path, format=format, columns=columns, delimiter=delimiter, class_names=class_names)
    stream = chunks if progress is None else progress(chunks, chunks.n_chunks)
    # The row count, where the format gives it, sizes the grouping once (a speed hint).
    table = PatternTable.from_chunks(stream, n_classes=len(chunks.class_names), class_names=chunks.class_names,
                                     keep_inverse=keep_inverse, n_threads=n_threads, n_samples=chunks.n_rows)
    table.provenance = {"cobalance": __version__, "source": str(chunks.path.resolve()),
                        "source_format": chunks.format, "source_sha256": file_sha256(chunks.path),
                        "columns": chunks.columns}
    return table


# -- checking values --------------------------------------------------------------------


def _checked_chunk(values: np.ndarray, first_row: int, names: Sequence[str], source: str) -> np.ndarray:
    """A C-contiguous 0/1 uint8 chunk; the first bad value is named with its row and column."""
    if values.dtype == np.bool_:
        return np.ascontiguousarray(values).view(np.uint8)
    if values.dtype.kind not in "iuf":
        # mixed or text columns: find the first cell that is not a number
        for c in range(values.shape[1]):
            col = values[:, c]
            try:
                np.asarray(col, dtype=np.float64)
            except (TypeError, ValueError):
                for r, v in enumerate(col):
                    try:
                        float(v)
                    except (TypeError, ValueError):
                        shown = "an empty cell" if v is None or str(v).strip() == "" else repr(v)
                        raise ValueError(f"{source}: row {first_row + r + 1}, column {names[c]!r}: "
                                         f"{shown} is not 0 or 1") from None
        values = np.asarray(values, dtype=np.float64)
    bad = (values != 0) & (values != 1)
    if bad.any():
        r, c = np.argwhere(bad)[0]
        v = values[r, c].item()
        if isinstance(v, float) and np.isnan(v):
            shown = "an empty cell"
        else:
            shown = repr(int(v) if isinstance(v, float) and v.is_integer() else v)
        raise ValueError(f"{source}: row {first_row + int(r) + 1}, column {names[int(c)]!r}: {shown} is not 0 or 1")
    return np.ascontiguousarray(values, dtype=np.uint8)


def _select_columns(names: List[str], columns: Optional[List[str]], source: str) -> List[int]:
    if not columns:
        return list(range(len(names)))
    missing = [c for c in columns if c not in names]
    if missing:
        raise ValueError(f"{source}: no column {missing[0]!r}; the columns are {', '.join(names)}")
    return [names.index(c) for c in columns]


# -- the formats ------------------------------------------------------------------------


def _csv_blocks(path: Path, delimiter: Optional[str], columns, chunk_rows: int):
    import csv
    import gzip

    opener = gzip.open if path.name.lower().endswith(".gz") else open
    if delimiter is None:
        delimiter = "\t" if ".tsv" in path.name.lower() else ","
    try:
        with opener(path, "rt", encoding="utf-8", newline="") as f:
            header = next(csv.reader(f, delimiter=delimiter), None)
    except (OSError, UnicodeDecodeError, EOFError, csv.Error) as exc:
        raise ValueError(f"cannot read {path} as CSV: {_one_line(exc)}") from None
    if not header:
        raise ValueError(f"{path} is empty; expected a header row of class names")
    header = [h.strip() for h in header]
    keep = _select_columns(header, columns, str(path))

    def with_pandas(pd):
        # all columns are read (not usecols) so that a row with too many fields is an error
        row = 0
        try:
            for frame in pd.read_csv(path, sep=delimiter, chunksize=chunk_rows, skipinitialspace=True):
                yield row, frame.to_numpy()[:, keep]
                row += len(frame)
        except (ValueError, OSError, UnicodeDecodeError, EOFError) as exc:
            raise ValueError(f"cannot read {path} as CSV: {_one_line(exc)}") from None

    def with_csv_module():
        try:
            with opener(path, "rt", encoding="utf-8", newline="") as f:
                rows = csv.reader(f, delimiter=delimiter)
                next(rows)
                block, row = [], 0
                for line_no, fields in enumerate(rows, start=2):
                    if len(fields) != len(header):
                        raise ValueError(f"{path}: line {line_no} has {len(fields)} fields, the header has "
                                         f"{len(header)}")
                    block.append([fields[i].strip() for i in keep])
                    if len(block) == chunk_rows:
                        yield row, _text_block(block)
                        row += len(block)
                        block = []
                if block:
                    yield row, _text_block(block)
        except (OSError, EOFError, UnicodeDecodeError, csv.Error) as exc:  # e.g. a truncated .gz
            raise ValueError(f"cannot read {path} as CSV: {_one_line(exc)}") from None

    def blocks():
        try:
            import pandas as pd
        except ImportError:
            pd = None
        yield from (with_csv_module() if pd is None else with_pandas(pd))

    return [header[i] for i in keep], blocks()


def _text_block(block):
    try:
        return np.array(block, dtype=np.float64)
    except ValueError:
        return np.array(block, dtype=object)


def _npy_array(path: Path) -> np.ndarray:
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise ValueError(f"cannot read {path} as .npy: {_one_line(exc)}") from None
    if not isinstance(arr, np.ndarray) or arr.ndim != 2:
        shape = getattr(arr, "shape", None)
        raise ValueError(f"{path}: expected a 2-D (samples x classes) array, got "
                         f"{'an .npz archive' if shape is None else f'shape {shape}'}")
    return arr


def _npz_labels(path: Path):
    try:
        z = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise ValueError(f"cannot read {path} as .npz: {_one_line(exc)}") from None
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise ValueError(f"{path}: expected an .npz archive, found a single array")
    with z:
        keys = list(z.keys())
        if "format" in keys:
            raise ValueError(f"{path} is a {str(z['format'])} file, not a label matrix")
        if "labels" in keys:
            key = "labels"
        else:
            arrays = [k for k in keys if k != "class_names"]
            if len(arrays) != 1:
                raise ValueError(f"{path}: expected an array named 'labels' (or a single array), found "
                                 f"{', '.join(keys) or 'none'}")
            key = arrays[0]
        try:
            labels = np.asarray(z[key])
            names = [str(s) for s in z["class_names"]] if "class_names" in keys else None
        except (OSError, ValueError, EOFError) as exc:
            raise ValueError(f"cannot read {path} as .npz: {_one_line(exc)}") from None
    if labels.ndim != 2:
        raise ValueError(f"{path}: {key!r} must be 2-D (samples x classes), got shape {labels.shape}")
    return labels, names


def _parquet_blocks(path: Path, columns, chunk_rows: int):
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise ImportError("reading Parquet needs pyarrow: pip install 'cobalance[cli]'") from exc
    try:
        pf = pq.ParquetFile(os.fspath(path))
    except Exception as exc:  # pyarrow raises its own ArrowInvalid for non-Parquet files
        raise ValueError(f"cannot read {path} as Parquet: {_one_line(exc)}") from None
    header = list(pf.schema_arrow.names)
    keep = _select_columns(header, columns, str(path))
    names = [header[i] for i in keep]

    def blocks():
        row = 0
        for batch in pf.iter_batches(batch_size=chunk_rows, columns=names):
            cols = [batch.column(i).to_numpy(zero_copy_only=False) for i in range(batch.num_columns)]
            block = np.column_stack(cols) if cols else np.zeros((batch.num_rows, 0))
            yield row, block
            row += batch.num_rows

    return names, blocks(), pf.metadata.num_rows
