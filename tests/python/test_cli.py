"""The cobalance command line, end to end on temporary files."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cobalance import PatternTable
from cobalance.cli import EXIT_OK, EXIT_USAGE, main

REPO = Path(__file__).parents[2]
SHARED = REPO / ".." / "shared"
MULTILABEL = SHARED / "data" / "multilabel"


def run(argv, capsys):
    """Run main() in-process; returns (exit code, stdout, stderr)."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *fragments):
    assert code == EXIT_USAGE
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("cobalance: error: ")
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def reference_presence(y):
    y = np.asarray(y, dtype=bool)
    return y.sum(axis=0), len({row.tobytes() for row in y.astype(np.uint8)})


def multilabel_csv(name):
    path = MULTILABEL / f"{name}.labels.csv.gz"
    if not path.exists():
        pytest.skip(f"shared data set {path} is absent")
    with gzip.open(path, "rt") as f:
        header = f.readline().strip().split(",")
        y = np.loadtxt(f, delimiter=",", dtype=np.uint8, ndmin=2)
    return path, header, y


def write_csv(path, header, rows):
    path.write_text(",".join(header) + "\n" + "".join(",".join(str(v) for v in r) + "\n" for r in rows))
    return path


@pytest.fixture
def labels():
    rng = np.random.default_rng(0)
    y = (rng.random((300, 4)) < [0.5, 0.2, 0.05, 0.6]).astype(np.uint8)
    return ["cat", "dog", "bird", "fish"], y


# -- scan --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["emotions", "yeast", "enron"])
def test_scan_multilabel_csv_json(name, tmp_path, capsys):
    path, header, y = multilabel_csv(name)
    out = tmp_path / "table.npz"
    code, stdout, _ = run(["scan", path, "-o", out, "--json"], capsys)
    assert code == EXIT_OK
    doc = json.loads(stdout)
    class_counts, n_patterns = reference_presence(y)
    assert doc["n_samples"] == len(y) and doc["n_classes"] == len(header)
    assert doc["n_patterns"] == n_patterns
    assert [c["name"] for c in doc["classes"]] == header
    np.testing.assert_array_equal([c["samples"] for c in doc["classes"]], class_counts)
    np.testing.assert_allclose([c["presence"] for c in doc["classes"]], class_counts / len(y))
    table = PatternTable.load(out)
    assert table.class_names == header and table.n_samples == len(y)
    # the stored patterns reproduce every row through the inverse
    np.testing.assert_array_equal(table.patterns[table.inverse], y.astype(bool))
    record = json.loads((tmp_path / "table.scan.json").read_text())
    assert record["format"] == "cobalance.scan" and record["source_format"] == "csv"
    assert Path(record["source"]) == path.resolve()


def test_scan_text_output_and_quiet(labels, tmp_path, capsys):
    names, y = labels
    path = write_csv(tmp_path / "y.csv", names, y)
    code, stdout, stderr = run(["scan", path], capsys)
    assert code == EXIT_OK and stderr == ""
    counts = y.sum(axis=0)
    assert stdout.splitlines()[0].startswith(f"{len(y)} samples, 4 classes")
    for name, c in zip(names, counts):
        line = next(line for line in stdout.splitlines() if line.startswith(name + " "))
        assert line.split()[1] == str(c)
        assert line.split()[2] == f"{c / len(y):.2%}"
    code, stdout, stderr = run(["scan", path, "--quiet", "-o", tmp_path / "t.npz"], capsys)
    assert code == EXIT_OK and stdout == "" and stderr == ""
    assert (tmp_path / "t.npz").exists()


@pytest.mark.parametrize("kind", ["npy", "npz", "parquet", "tsv"])
def test_scan_other_formats(kind, labels, tmp_path, capsys):
    names, y = labels
    extra = []
    if kind == "npy":
        path = tmp_path / "y.npy"
        np.save(path, y.astype(bool))
        extra = ["--class-names", ",".join(names)]
    elif kind == "npz":
        path = tmp_path / "y.npz"
        np.savez(path, labels=y.astype(np.float32), class_names=np.array(names))
    elif kind == "parquet":
        pd = pytest.importorskip("pandas")
        pytest.importorskip("pyarrow")
        path = tmp_path / "y.parquet"
        pd.DataFrame(y, columns=names).assign(image_id=np.arange(len(y))).to_parquet(path)
        extra = ["--columns", ",".join(names)]
    else:
        path = tmp_path / "y.tsv"
        path.write_text("\t".join(names) + "\n" + "".join("\t".join(map(str, r)) + "\n" for r in y))
    out = tmp_path / "t.npz"
    code, stdout, _ = run(["scan", path, "-o", out, "--json", *extra], capsys)
    assert code == EXIT_OK, stdout
    table = PatternTable.load(out)
    assert table.class_names == names
    np.testing.assert_array_equal(table.patterns[table.inverse], y.astype(bool))


def test_scan_columns_reorder_and_select(tmp_path, capsys):
    y = np.array([[1, 0, 1], [0, 1, 1], [1, 1, 0]])
    path = write_csv(tmp_path / "y.csv", ["id", "a", "b"], [[7, r[0], r[1]] for r in y])
    code, stdout, _ = run(["scan", path, "--columns", "b,a", "--json"], capsys)
    assert code == EXIT_OK
    doc = json.loads(stdout)
    assert [c["name"] for c in doc["classes"]] == ["b", "a"]
    assert [c["samples"] for c in doc["classes"]] == [y[:, 1].sum(), y[:, 0].sum()]


def test_python_dash_m_and_help(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO / "python"))
    res = subprocess.run([sys.executable, "-m", "cobalance", "--help"], capture_output=True, text=True, env=env,
                         timeout=60)
    assert res.returncode == 0 and "examples:" in res.stdout and "exit codes" in res.stdout
    res = subprocess.run([sys.executable, "-m", "cobalance", "scan", "--help"], capture_output=True, text=True,
                         env=env, timeout=60)
    assert res.returncode == 0 and "cobalance scan labels.csv.gz -o table.npz" in res.stdout
    res = subprocess.run([sys.executable, "-m", "cobalance", "scan", str(tmp_path / "missing.csv")],
                         capture_output=True, text=True, env=env, timeout=60)
    assert res.returncode == EXIT_USAGE
    assert res.stderr.strip() == f"cobalance: error: input '{tmp_path / 'missing.csv'}' does not exist"


# -- bad input ---------------------------------------------------------------------------


@pytest.mark.parametrize("content, fragments", [
    ("a,b\n1,0\n0,2\n", ["row 2", "column 'b'", "2 is not 0 or 1"]),
    ("a,b\n1,0\n0,\n", ["row 2", "column 'b'", "empty cell"]),
    ("a,b\n1,0\n1,yes\n", ["row 2", "'yes' is not 0 or 1"]),
    ("a,b\n1,0\n0,1,1\n", ["cannot read", "Expected 2 fields in line 3"]),
    ("", ["is empty"]),
])
def test_scan_bad_csv(content, fragments, tmp_path, capsys):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    out = tmp_path / "t.npz"
    code, _, err = run(["scan", path, "-o", out], capsys)
    assert_one_line_error(code, err, *fragments)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left either


def test_scan_bad_usage(labels, tmp_path, capsys):
    names, y = labels
    csv_path = write_csv(tmp_path / "y.csv", names, y)
    cases = [
        (["scan", tmp_path / "missing.csv"], ["does not exist"]),
        (["scan", csv_path, "--bogus"], ["unrecognized arguments: --bogus"]),
        (["scan", csv_path, "--columns", "cat,cow"], ["no column 'cow'"]),
        (["scan", csv_path, "--class-names", "a,b"], ["--class-names has 2 names", "4 label columns"]),
        (["scan", csv_path, "--tile", "64"], ["--tile applies to masks folders only"]),
        (["scan", csv_path, "--tile", "-3"], ["expected a positive integer"]),
        (["scan", csv_path, "-o", tmp_path / "t.txt"], ["must end in .npz"]),
        (["scan", tmp_path / "y.unknown"], ["does not exist"]),
    ]
    for argv, fragments in cases:
        code, _, err = run(argv, capsys)
        assert_one_line_error(code, err, *fragments)
    (tmp_path / "y.unknown").write_text("x")
    code, _, err = run(["scan", tmp_path / "y.unknown"], capsys)
    assert_one_line_error(code, err, "cannot tell the format", "--format")
    (tmp_path / "junk.npy").write_bytes(b"not numpy")
    code, _, err = run(["scan", tmp_path / "junk.npy"], capsys)
    assert_one_line_error(code, err, "cannot read", "as .npy")
    np.save(tmp_path / "flat.npy", np.zeros(5))
    code, _, err = run(["scan", tmp_path / "flat.npy"], capsys)
    assert_one_line_error(code, err, "expected a 2-D")
    table_file = tmp_path / "table.npz"
    PatternTable.from_labels(y).save(table_file)
    code, _, err = run(["scan", table_file], capsys)
    assert_one_line_error(code, err, "is a cobalance.PatternTable file, not a label matrix")


def test_no_command_prints_help_and_exits_2(capsys):
    code, _, err = run([], capsys)
    assert code == EXIT_USAGE and "usage: cobalance" in err
