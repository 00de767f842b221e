"""cobalance.labels: label files read chunk by chunk, against numpy / pandas reading the same file."""

from __future__ import annotations

import gzip
import hashlib
import sys
from pathlib import Path

import numpy as np
import pytest

from cobalance import PatternTable
from cobalance.labels import LABEL_FORMATS, iter_label_chunks, label_format, read_labels
from conftest import read_multilabel

NAMES = ["cat", "dog", "bird", "fish"]


@pytest.fixture
def y():
    rng = np.random.default_rng(3)
    return (rng.random((257, 4)) < [0.5, 0.2, 0.05, 0.6]).astype(np.uint8)


def write_labels(kind: str, folder: Path, y: np.ndarray, names=NAMES) -> Path:
    """The matrix ``y`` written as a label file of ``kind`` by numpy / pandas / the csv text itself."""
    if kind == "csv":
        path = folder / "y.csv"
        path.write_text(",".join(names) + "\n" + "".join(",".join(map(str, r)) + "\n" for r in y))
    elif kind == "csv.gz":
        path = folder / "y.csv.gz"
        with gzip.open(path, "wt") as f:
            f.write(",".join(names) + "\n" + "".join(",".join(map(str, r)) + "\n" for r in y))
    elif kind == "tsv":
        path = folder / "y.tsv"
        path.write_text("\t".join(names) + "\n" + "".join("\t".join(map(str, r)) + "\n" for r in y))
    elif kind == "npy":
        path = folder / "y.npy"
        np.save(path, y.astype(bool))
    elif kind == "npz":
        path = folder / "y.npz"
        np.savez(path, labels=y.astype(np.float32), class_names=np.array(names))
    else:
        pd = pytest.importorskip("pandas")
        pytest.importorskip("pyarrow")
        path = folder / "y.parquet"
        pd.DataFrame(y, columns=names).to_parquet(path)
    return path


def reference(path: Path):
    """``(matrix, column names)`` of a label file, read by numpy or pandas at once."""
    name = path.name
    if name.endswith(".npy"):
        arr = np.load(path)
        return arr.astype(np.uint8), [str(i) for i in range(arr.shape[1])]
    if name.endswith(".npz"):
        with np.load(path) as z:
            return z["labels"].astype(np.uint8), [str(s) for s in z["class_names"]]
    pd = pytest.importorskip("pandas")
    if name.endswith(".parquet"):
        frame = pd.read_parquet(path)
    else:
        frame = pd.read_csv(path, sep="\t" if ".tsv" in name else ",")
    return frame.to_numpy().astype(np.uint8), [str(c) for c in frame.columns]


@pytest.mark.parametrize("kind", ["csv", "csv.gz", "tsv", "npy", "npz", "parquet"])
def test_read_labels_matches_the_reference(kind, y, tmp_path):
    path = write_labels(kind, tmp_path, y)
    expected, columns = reference(path)
    class_names = NAMES if kind == "npy" else None
    table = read_labels(path, class_names=class_names)
    assert table.class_names == NAMES
    np.testing.assert_array_equal(table.patterns[table.inverse], expected.astype(bool))
    np.testing.assert_array_equal(table.class_counts(), expected.sum(axis=0))
    assert table == PatternTable.from_labels(expected, class_names=NAMES)
    origin = table.provenance
    assert Path(origin["source"]) == path.resolve()
    assert origin["source_format"] == label_format(path) and origin["source_format"] in LABEL_FORMATS
    assert origin["source_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert origin["columns"] == columns
    # the provenance is saved inside the table file and read back
    table.save(tmp_path / "t.npz")
    assert PatternTable.load(tmp_path / "t.npz").provenance == origin


@pytest.mark.parametrize("kind", ["csv", "npy", "npz", "parquet"])
def test_chunks_are_checked_uint8_slices_of_the_rows(kind, y, tmp_path):
    path = write_labels(kind, tmp_path, y)
    expected, _ = reference(path)
    chunks = iter_label_chunks(path, chunk_rows=50)
    assert chunks.format == label_format(path)
    assert chunks.n_rows == (None if kind == "csv" else len(y))
    got = list(chunks)
    assert [len(c) for c in got] == [50] * 5 + [7]
    assert all(c.dtype == np.uint8 and c.flags.c_contiguous for c in got)
    np.testing.assert_array_equal(np.concatenate(got), expected)


def test_a_real_data_set_with_and_without_pandas(monkeypatch):
    path, header, y = read_multilabel("scene")  # a .csv.gz read by numpy in conftest
    table = read_labels(path)
    assert table.class_names == header
    np.testing.assert_array_equal(table.patterns[table.inverse], y.astype(bool))
    monkeypatch.setitem(sys.modules, "pandas", None)  # the csv module's reader
    assert read_labels(path) == table


@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_columns_select_and_order(kind, y, tmp_path):
    path = write_labels(kind, tmp_path, y)
    table = read_labels(path, columns=["bird", "cat"])
    assert table.class_names == ["bird", "cat"]
    np.testing.assert_array_equal(table.patterns[table.inverse], y[:, [2, 0]].astype(bool))
    renamed = read_labels(path, columns=["bird", "cat"], class_names=["B", "C"])
    assert renamed.class_names == ["B", "C"] and renamed.provenance["columns"] == ["bird", "cat"]


@pytest.mark.parametrize("reader", ["pandas", "csv module"])
@pytest.mark.parametrize("content, fragments", [
    ("a,b\n1,0\n0,2\n", ["row 2", "column 'b'", "2 is not 0 or 1"]),
    ("a,b\n1,0\n0,\n", ["row 2", "column 'b'", "an empty cell is not 0 or 1"]),
    ("a,b\n1,0\n1,yes\n", ["row 2", "column 'b'", "'yes' is not 0 or 1"]),
    ("a,b\n1,0\n0,1\n0.5,1\n", ["row 3", "column 'a'", "0.5 is not 0 or 1"]),
    ("a,b\n1,0\n0,1,1\n", ["line 3"]),
    ("", ["is empty"]),
])
def test_csv_errors_name_the_file_row_and_column(content, fragments, reader, tmp_path, monkeypatch):
    if reader == "pandas":
        pytest.importorskip("pandas")
    else:
        monkeypatch.setitem(sys.modules, "pandas", None)
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(ValueError) as info:
        read_labels(path)
    for fragment in [str(path), *fragments]:
        assert fragment in str(info.value), str(info.value)


def test_a_bad_value_in_a_later_chunk_names_its_row_in_the_file(y, tmp_path):
    bad = y.astype(np.int64)
    bad[183, 3] = 7
    np.save(tmp_path / "y.npy", bad)
    with pytest.raises(ValueError, match=r"y\.npy: row 184, column 'fish': 7 is not 0 or 1"):
        read_labels(tmp_path / "y.npy", class_names=NAMES)
    chunks = iter(iter_label_chunks(tmp_path / "y.npy", chunk_rows=100))
    np.testing.assert_array_equal(next(chunks), y[:100])  # the first chunk is fine
    with pytest.raises(ValueError, match="row 184, column '3'"):
        next(chunks)


def test_parquet_errors_name_the_row_and_column(tmp_path):
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    frame = pd.DataFrame({"a": [1, 0, 1], "b": pd.array([0, None, 1], dtype="Int64")})
    frame.to_parquet(tmp_path / "y.parquet")
    with pytest.raises(ValueError, match=r"row 2, column 'b': an empty cell is not 0 or 1"):
        read_labels(tmp_path / "y.parquet")
    pd.DataFrame({"a": ["1", "0", "x"]}).to_parquet(tmp_path / "s.parquet")
    with pytest.raises(ValueError, match=r"row 3, column 'a': 'x' is not 0 or 1"):
        read_labels(tmp_path / "s.parquet")


def test_bad_files_and_arguments(y, tmp_path):
    path = write_labels("csv", tmp_path, y)
    cases = [
        (lambda: read_labels(path, columns=["cat", "cow"]), "no column 'cow'; the columns are cat, dog, bird, fish"),
        (lambda: read_labels(path, class_names=["a", "b"]), "class_names has 2 names but"),
        (lambda: read_labels(path, class_names=["a", "a", "b", "c"]), "class name 'a' appears twice"),
        (lambda: read_labels(path, format="xls"), "format must be one of csv, npy, npz, parquet"),
        (lambda: iter_label_chunks(path, chunk_rows=0), "chunk_rows must be a positive integer"),
        (lambda: read_labels(tmp_path / "y.unknown"), "does not exist"),
        (lambda: read_labels(tmp_path), "is a folder"),
    ]
    for call, fragment in cases[:-2]:
        with pytest.raises(ValueError, match=fragment):
            call()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        cases[-2][0]()
    with pytest.raises(ValueError, match="is a folder"):
        cases[-1][0]()
    (tmp_path / "y.unknown").write_text("x")
    with pytest.raises(ValueError, match="cannot tell the format"):
        read_labels(tmp_path / "y.unknown")
    np.save(tmp_path / "flat.npy", np.zeros(5))
    with pytest.raises(ValueError, match="expected a 2-D"):
        read_labels(tmp_path / "flat.npy")
    (tmp_path / "junk.npy").write_bytes(b"not numpy")
    with pytest.raises(ValueError, match="cannot read .*junk.npy as .npy"):
        read_labels(tmp_path / "junk.npy")
    PatternTable.from_labels(y).save(tmp_path / "table.npz")
    with pytest.raises(ValueError, match="is a cobalance.PatternTable file, not a label matrix"):
        read_labels(tmp_path / "table.npz")
    with pytest.raises(ValueError, match="columns applies to CSV and Parquet"):
        read_labels(write_labels("npy", tmp_path, y), columns=["0"])
