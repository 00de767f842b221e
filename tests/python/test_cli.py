"""The cobalance command line, end to end on temporary files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cobalance import PatternTable
from cobalance.cli import EXIT_OK, EXIT_USAGE, main
from conftest import PACKAGE_PARENT, read_multilabel

REPO = Path(__file__).parents[2]


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
    path, header, y = read_multilabel(name)
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
    env = dict(os.environ, PYTHONPATH=str(PACKAGE_PARENT))
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


@pytest.mark.parametrize("reader", ["pandas", "csv module"])
@pytest.mark.parametrize("content, fragments", [
    ("a,b\n1,0\n0,2\n", ["row 2", "column 'b'", "2 is not 0 or 1"]),
    ("a,b\n1,0\n0,\n", ["row 2", "column 'b'", "an empty cell is not 0 or 1"]),
    ("a,b\n1,0\n1,yes\n", ["row 2", "'yes' is not 0 or 1"]),
    ("a,b\n1,0\n0,1,1\n", ["line 3"]),
    ("", ["is empty"]),
])
def test_scan_bad_csv(content, fragments, reader, tmp_path, capsys, monkeypatch):
    if reader == "pandas":
        pytest.importorskip("pandas")
    else:  # the reader used when pandas is not installed
        monkeypatch.setitem(sys.modules, "pandas", None)
    path = tmp_path / "bad.csv"
    path.write_text(content)
    out = tmp_path / "t.npz"
    code, _, err = run(["scan", path, "-o", out], capsys)
    assert_one_line_error(code, err, *fragments)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left either


def test_scan_csv_without_pandas_matches(monkeypatch, tmp_path, capsys):
    path, header, y = read_multilabel("scene")
    monkeypatch.setitem(sys.modules, "pandas", None)
    code, _, _ = run(["scan", path, "-o", tmp_path / "t.npz", "--quiet"], capsys)
    assert code == EXIT_OK
    table = PatternTable.load(tmp_path / "t.npz")
    assert table.class_names == header
    np.testing.assert_array_equal(table.patterns[table.inverse], y.astype(bool))


def test_broken_pipe_exit_code(tmp_path):
    path = write_csv(tmp_path / "y.csv", ["a", "b"], [[0, 1]] * 5)
    env = dict(os.environ, PYTHONPATH=str(PACKAGE_PARENT))
    proc = subprocess.Popen([sys.executable, "-m", "cobalance", "scan", str(path)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader goes away before anything is printed
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 141 and err == b""


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


# -- the shipped sample: brute-force presence from the mask files -------------------------

SAMPLE = REPO / "python" / "cobalance" / "data" / "idrid_sample"


def sample_presence(tile):
    """Per-tile class presence of the shipped sample, from the PNG files with PIL and numpy.

    Tiles start every ``tile`` pixels; the last row/column of tiles is shifted back to
    end at the border when the size is not a multiple (the toolkit's covering layout).
    """
    from PIL import Image

    classes = sorted(p.name for p in (SAMPLE / "masks").iterdir() if p.is_dir())
    ids = sorted(p.stem for p in (SAMPLE / "images").iterdir())
    rows = []
    for image_id in ids:
        with Image.open(SAMPLE / "images" / f"{image_id}.jpg") as img:
            w, h = img.size
        planes = []
        for c in classes:
            path = SAMPLE / "masks" / c / f"{image_id}.png"
            planes.append(np.asarray(Image.open(path)) != 0 if path.exists() else np.zeros((h, w), bool))
        planes = np.stack(planes)

        def starts(n):
            s = list(range(0, n - tile + 1, tile))
            if s[-1] + tile < n:
                s.append(n - tile)
            return s

        for y in starts(h):
            for x in starts(w):
                rows.append(planes[:, y:y + tile, x:x + tile].any(axis=(1, 2)))
    return classes, ids, np.array(rows, dtype=np.uint8)


@pytest.fixture(scope="module")
def sample_tiles():
    pytest.importorskip("PIL")
    return sample_presence(128)


def test_scan_masks_folder_matches_pixels(sample_tiles, tmp_path, capsys):
    classes, _, y = sample_tiles
    out = tmp_path / "tiles.npz"
    code, stdout, _ = run(["scan", SAMPLE, "--tile", 128, "-o", out, "--json"], capsys)
    assert code == EXIT_OK
    doc = json.loads(stdout)
    assert doc["format"] == "masks" and [c["name"] for c in doc["classes"]] == classes
    assert doc["n_samples"] == len(y)
    np.testing.assert_array_equal([c["samples"] for c in doc["classes"]], y.sum(axis=0))
    assert all(0 < c["pixel_share"] < 0.05 for c in doc["classes"])
    table = PatternTable.load(out)
    np.testing.assert_array_equal(table.patterns[table.inverse], y.astype(bool))
    record = json.loads((tmp_path / "tiles.scan.json").read_text())
    assert record["mask_folder"]["tile"] == [128, 128] and record["mask_folder"]["layout"] == "binary_folders"
    code, stdout, _ = run(["scan", SAMPLE], capsys)  # whole images
    assert code == EXIT_OK and stdout.startswith("8 images, 5 classes")


# -- fit and report ---------------------------------------------------------------------


def after_presence(y, copies):
    """Class presence of the balanced set, straight from the labels and the copies."""
    y = np.asarray(y, dtype=np.int64)
    return (y * copies[:, None]).sum(axis=0) / copies.sum()


@pytest.fixture
def yeast_table(tmp_path, capsys):
    path, header, y = read_multilabel("yeast")
    table_path = tmp_path / "yeast.npz"
    code, _, _ = run(["scan", path, "-o", table_path, "--quiet"], capsys)
    assert code == EXIT_OK
    return table_path, header, y


def test_fit_rare_boost_on_yeast(yeast_table, tmp_path, capsys):
    from cobalance import Plan

    table_path, header, y = yeast_table
    plan_path = tmp_path / "plan.npz"
    code, stdout, _ = run(["fit", table_path, "--target", "rare_boost", "-o", plan_path, "--json",
                           "--markdown", tmp_path / "r.md", "--report-json", tmp_path / "r.json"], capsys)
    assert code == EXIT_OK
    doc = json.loads(stdout)
    plan = Plan.load(plan_path)
    assert plan.n_samples == len(y)
    presence = y.mean(axis=0)
    rare = (presence > 0) & (presence < 0.2)
    np.testing.assert_allclose(doc["target"], np.where(rare, 0.9, presence))
    after = after_presence(y, plan.copies)
    np.testing.assert_allclose([c["after"] for c in doc["report"]["classes"]], after)
    np.testing.assert_allclose([c["before"] for c in doc["report"]["classes"]], presence)
    # rare classes move towards the target
    assert np.all(after[rare] > presence[rare])
    assert json.loads((tmp_path / "r.json").read_text())["n_samples_out"] == int(plan.copies.sum())
    md = (tmp_path / "r.md").read_text()
    for name, b, a in zip(header, presence, after):
        assert f"| {name} | {100 * b:.1f} |" in md and f"| {100 * a:.1f} |" in md
    record = json.loads((tmp_path / "plan.fit.json").read_text())
    assert record["format"] == "cobalance.fit" and record["table"]["relative_path"] == "yeast.npz"
    # dotted names keep their dots: plan.v2.json -> plan.v2.fit.json
    code, _, _ = run(["fit", table_path, "--target", "uniform", "-o", tmp_path / "plan.v2.json", "--quiet"], capsys)
    assert code == EXIT_OK and (tmp_path / "plan.v2.fit.json").exists()
    assert run(["report", tmp_path / "plan.v2.json", "--quiet"], capsys)[0] == EXIT_OK


def test_fit_options_reach_the_balancer(labels, tmp_path, capsys):
    from cobalance import Plan
    from cobalance.balancer import Balancer

    names, y = labels
    table_path = tmp_path / "t.npz"
    PatternTable.from_labels(y, class_names=names).save(table_path)
    argv = ["fit", table_path, "--target", "bird=0.3,dog=0.4", "--objective", "fraction", "--solver", "exact", "--gamma", "0.01",
            "--regularizer", "counts", "--no-undersampling", "--max-copies", "20", "--seed", "3",
            "-o", tmp_path / "plan.json", "--quiet"]
    code, stdout, stderr = run(argv, capsys)
    assert code == EXIT_OK and stdout == ""
    expected = Balancer(target={"bird": 0.3, "dog": 0.4}, objective="fraction", solver="exact", gamma=0.01,
                        regularizer="counts",
                        allow_undersampling=False, max_copies=20, random_state=3).fit(
        PatternTable.from_labels(y, class_names=names)).plan_
    plan = Plan.load(tmp_path / "plan.json")
    np.testing.assert_array_equal(plan.copies, expected.copies)
    assert plan.copies.min() >= 1  # --no-undersampling
    assert plan.copies.max() <= 20 * len(y)


def test_fit_target_forms(labels, tmp_path, capsys):
    names, y = labels
    table_path = tmp_path / "t.npz"
    PatternTable.from_labels(y, class_names=names).save(table_path)
    presence = y.mean(axis=0)
    (tmp_path / "target.json").write_text(json.dumps({"fish": 0.5}))
    (tmp_path / "list.json").write_text(json.dumps([0.5, 0.5, 0.5, 0.5]))
    forms = {
        "all": np.ones(4),
        "0.5,0.4,0.3,0.6": np.array([0.5, 0.4, 0.3, 0.6]),
        str(tmp_path / "target.json"): np.r_[presence[:3], 0.5],
        str(tmp_path / "list.json"): np.full(4, 0.5),
    }
    for text, expected in forms.items():
        code, stdout, _ = run(["fit", table_path, "--target", text, "-o", tmp_path / "p.npz", "--json"], capsys)
        assert code == EXIT_OK, text
        np.testing.assert_allclose(json.loads(stdout)["target"], expected)


def test_report_from_the_fit_record(yeast_table, tmp_path, capsys):
    from PIL import Image

    from cobalance import Plan

    table_path, header, y = yeast_table
    plan_path = tmp_path / "plan.npz"
    assert run(["fit", table_path, "--target", "Class14=0.3", "-o", plan_path, "--quiet"], capsys)[0] == 0
    plan = Plan.load(plan_path)
    code, stdout, _ = run(["report", plan_path, "--png", tmp_path / "chart.png"], capsys)
    assert code == EXIT_OK
    after = after_presence(y, plan.copies)
    line = next(line for line in stdout.splitlines() if line.startswith("| Class14 |"))
    assert line.split("|")[3].strip() == "30.0" and line.split("|")[4].strip() == f"{100 * after[-1]:.1f}"
    with Image.open(tmp_path / "chart.png") as img:
        assert img.format == "PNG" and img.size[0] > 100
    # another target, and the table given explicitly, moved next to nothing
    moved = tmp_path / "moved"
    moved.mkdir()
    os.replace(plan_path, moved / "plan.npz")
    os.replace(tmp_path / "plan.fit.json", moved / "plan.fit.json")
    code, stdout, _ = run(["report", moved / "plan.npz", "--table", table_path, "--target", "all", "--json"],
                          capsys)
    assert code == EXIT_OK
    doc = json.loads(stdout)
    np.testing.assert_allclose([c["target"] for c in doc["report"]["classes"]], 1.0)
    np.testing.assert_allclose([c["after"] for c in doc["report"]["classes"]], after)


def test_report_bad_input(yeast_table, labels, tmp_path, capsys):
    table_path, _, _ = yeast_table
    plan_path = tmp_path / "plan.npz"
    assert run(["fit", table_path, "--target", "uniform", "-o", plan_path, "--quiet"], capsys)[0] == 0
    code, _, err = run(["report", tmp_path / "none.npz"], capsys)
    assert_one_line_error(code, err, "plan", "does not exist")
    # the record is the link to the table: without it, --table and --target are needed
    record = (tmp_path / "plan.fit.json").read_text()
    (tmp_path / "plan.fit.json").unlink()
    code, _, err = run(["report", plan_path], capsys)
    assert_one_line_error(code, err, "no fit record", "pass --table and --target")
    (tmp_path / "plan.fit.json").write_text(record)
    # a plan rewritten by other means no longer matches its record
    from cobalance import Plan

    Plan.identity(2417).save(plan_path)
    code, _, err = run(["report", plan_path], capsys)
    assert_one_line_error(code, err, "describes another plan", "pass --table and --target")
    assert run(["fit", table_path, "--target", "uniform", "-o", plan_path, "--quiet"], capsys)[0] == 0
    # a table that changed since the fit is refused
    names, y = labels
    PatternTable.from_labels(y, class_names=names).save(table_path)
    code, _, err = run(["report", plan_path], capsys)
    assert_one_line_error(code, err, "changed since the plan was fitted")
    code, _, err = run(["report", plan_path, "--table", table_path, "--target", "uniform"], capsys)
    assert_one_line_error(code, err, "the plan has 2417 samples", "has 300")


@pytest.mark.parametrize("target, fragments", [
    ("MA=0.5", ["unknown class 'MA'", "the classes are cat, dog, bird, fish"]),
    ("cat=1.5", ["cat", "must be in [0, 1], got 1.5"]),
    ("cat=-0.1", ["must be in [0, 1]"]),
    ("cat=lots", ["expected a fraction in [0, 1], got 'lots'"]),
    ("0.5,0.5", ["lists 2 fractions", "4 classes"]),
    ("0.5,0.5,2,0.5", ["'bird' must be in [0, 1], got 2.0"]),
    ("balanced", ["--target must be equal | sqrt"]),
    ("missing.json", ["target file 'missing.json' does not exist"]),
])
def test_fit_bad_target(target, fragments, labels, tmp_path, capsys):
    names, y = labels
    table_path = tmp_path / "t.npz"
    PatternTable.from_labels(y, class_names=names).save(table_path)
    code, _, err = run(["fit", table_path, "--target", target, "-o", tmp_path / "plan.npz"], capsys)
    assert_one_line_error(code, err, *fragments)
    assert not (tmp_path / "plan.npz").exists()


def test_fit_bad_usage(labels, tmp_path, capsys):
    names, y = labels
    csv_path = write_csv(tmp_path / "y.csv", names, y)
    table_path = tmp_path / "t.npz"
    PatternTable.from_labels(y, class_names=names).save(table_path)
    (tmp_path / "bad.json").write_text("{not json")
    cases = [
        (["fit", tmp_path / "none.npz", "--target", "uniform", "-o", tmp_path / "p.npz"], ["does not exist"]),
        (["fit", csv_path, "--target", "uniform", "-o", tmp_path / "p.npz"], ["cannot read table"]),
        (["fit", table_path, "--target", "uniform", "-o", tmp_path / "p.txt"], ["must end in .npz or .json"]),
        (["fit", table_path, "--target", "max_ir=0.5", "-o", tmp_path / "p.npz"], ["must be in [1, inf]"]),
        (["fit", table_path, "--budget", "-0.2", "-o", tmp_path / "p.npz"], ["shrinks the set"]),
        (["fit", table_path, "--budget", "x", "-o", tmp_path / "p.npz"], ["expected a number > -1 or 'none'"]),
        (["fit", table_path, "--target", "uniform", "-o", tmp_path / "p.npz", "--gamma", "-1"],
         ["expected a non-negative number"]),
        (["fit", table_path, "--target", "uniform", "-o", tmp_path / "p.npz", "--solver", "magic"],
         ["invalid choice: 'magic'"]),
        (["fit", table_path, "--target", tmp_path / "bad.json", "-o", tmp_path / "p.npz"], ["cannot read target file"]),
        (["fit", table_path, "--target", "uniform", "--objective", "geo", "--solver", "exact",
          "-o", tmp_path / "p.npz"], ["solver='exact' needs a convex quadratic objective"]),
    ]
    for argv, fragments in cases:
        code, _, err = run(argv, capsys)
        assert_one_line_error(code, err, *fragments)
    assert not (tmp_path / "p.npz").exists()


# -- atomic output ----------------------------------------------------------------------


def test_failed_fit_leaves_no_partial_file(labels, tmp_path, capsys, monkeypatch):
    """A write that fails half-way leaves neither a partial plan nor a temporary file."""
    names, y = labels
    table_path = tmp_path / "t.npz"
    PatternTable.from_labels(y, class_names=names).save(table_path)
    plan_path = tmp_path / "plan.npz"
    assert run(["fit", table_path, "--target", "uniform", "-o", plan_path, "--quiet"], capsys)[0] == 0
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def failing_savez(file, **arrays):
        file.write(b"PK\x03\x04 half a zip")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", failing_savez)
    code, _, err = run(["fit", table_path, "--target", "rare_boost", "-o", plan_path], capsys)
    assert code == 1
    assert err.strip().startswith("cobalance: error: OSError:") and "No space left" in err
    # the earlier plan and its record are untouched, and nothing else appeared
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


# -- write ------------------------------------------------------------------------------


def _sample_plan(tmp_path, capsys, tile, target="rare_boost"):
    table_path, plan_path = tmp_path / "t.npz", tmp_path / "plan.npz"
    assert run(["scan", SAMPLE, "--tile", tile, "-o", table_path, "--quiet"], capsys)[0] == EXIT_OK
    assert run(["fit", table_path, "--target", target, "-o", plan_path, "--quiet"], capsys)[0] == EXIT_OK
    return table_path, plan_path


def read_manifest(path):
    import csv

    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_write_balanced_folder(sample_tiles, tmp_path, capsys):
    pytest.importorskip("torch")
    from cobalance import Plan

    classes, _, y = sample_tiles
    _, plan_path = _sample_plan(tmp_path, capsys, 128)
    plan = Plan.load(plan_path)
    out = tmp_path / "balanced"
    code, stdout, _ = run(["write", plan_path, SAMPLE, out, "--json"], capsys)
    assert code == EXIT_OK
    doc = json.loads(stdout)
    assert doc["written"] == plan.copies.sum() and doc["skipped"] == 0
    rows = read_manifest(out / "manifest.csv")
    samples = np.array([int(r["sample"]) for r in rows])
    np.testing.assert_array_equal(np.bincount(samples, minlength=len(y)), plan.copies)
    # every item's mask files are exactly the classes present in its tile
    for r in rows:
        name = Path(r["file"]).stem
        present = [c for c in classes if (out / "masks" / c / f"{name}.png").exists()]
        assert present == [c for c, v in zip(classes, y[int(r["sample"])]) if v]
    assert len(list((out / "images").iterdir())) == len(rows)
    # the same command again finds everything complete
    code, stdout, _ = run(["write", plan_path, SAMPLE, out, "--json"], capsys)
    assert code == EXIT_OK and json.loads(stdout)["skipped"] == len(rows)


def test_write_bad_input(tmp_path, capsys):
    pytest.importorskip("torch")
    _, plan_path = _sample_plan(tmp_path, capsys, 128)
    code, _, err = run(["write", plan_path, tmp_path / "nowhere", tmp_path / "out"], capsys)
    assert_one_line_error(code, err, "is not a folder")
    code, _, err = run(["write", plan_path, SAMPLE, tmp_path / "out", "--tile", "64"], capsys)
    assert_one_line_error(code, err, "the plan has 120 samples", "tiles of 64x64", "--tile")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "other.txt").write_text("x")
    code, _, err = run(["write", plan_path, SAMPLE, tmp_path / "full"], capsys)
    assert_one_line_error(code, err, "is not empty")


def _wait_for_items(folder: Path, n: int, proc, timeout=60.0):
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if folder.is_dir() and sum(1 for p in folder.iterdir() if p.suffix == ".png") >= n:
            return True
        time.sleep(0.02)
    return False


def _assert_complete_pngs(folder: Path):
    """Every file under its final name decodes; temporaries (``.tmp-*``) are not final names."""
    from PIL import Image

    for p in folder.rglob("*.png"):
        if p.name.startswith(".tmp-"):
            continue
        with Image.open(p) as img:
            img.load()  # a truncated file raises here


def test_killed_write_leaves_no_partial_file_and_resumes(tmp_path, capsys):
    pytest.importorskip("torch")
    import signal

    from cobalance import Plan

    _, plan_path = _sample_plan(tmp_path, capsys, 48)
    n_items = Plan.load(plan_path).n_samples_out
    out = tmp_path / "balanced"
    env = dict(os.environ, PYTHONPATH=str(PACKAGE_PARENT))
    cmd = [sys.executable, "-m", "cobalance", "write", str(plan_path), str(SAMPLE), str(out)]

    # SIGTERM: the command unwinds, removes its temporary file, exits 143
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert _wait_for_items(out / "images", 30, proc), "write finished before it could be interrupted"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "terminated" in err and "Traceback" not in err
    assert not (out / "manifest.csv").exists()
    assert not [p for p in out.rglob(".tmp-*")]
    _assert_complete_pngs(out)
    done_after_term = len(list((out / "images").iterdir()))
    assert 0 < done_after_term < n_items

    # SIGKILL: no cleanup possible, but no file under its final name is partial
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert _wait_for_items(out / "images", done_after_term + 30, proc)
    proc.kill()
    proc.communicate(timeout=60)
    assert not (out / "manifest.csv").exists()
    _assert_complete_pngs(out)

    # a rerun finishes the job: every item once, the killed runs' temporaries gone
    res = subprocess.run(cmd + ["--json"], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["skipped"] >= done_after_term + 30 and doc["written"] + doc["skipped"] == n_items
    assert len(read_manifest(out / "manifest.csv")) == n_items
    assert len(list((out / "images").iterdir())) == n_items
    assert not [p for p in (out / "images").iterdir() if p.name.startswith(".tmp-")]


# -- demo -------------------------------------------------------------------------------


def test_demo_prints_presence_and_report(sample_tiles, capsys):
    classes, ids, y = sample_tiles
    code, stdout, _ = run(["demo", "--json"], capsys)
    assert code == EXIT_OK
    doc = json.loads(stdout)
    assert doc["n_images"] == len(ids) and doc["n_tiles"] == len(y)
    image_presence = [sum((SAMPLE / "masks" / c / f"{i}.png").exists() for i in ids) / len(ids) for c in classes]
    np.testing.assert_allclose([c["image_presence"] for c in doc["classes"]], image_presence)
    np.testing.assert_allclose([c["tile_presence"] for c in doc["classes"]], y.mean(axis=0))
    assert doc["outputs"] == {} and doc["skipped"] is None
    rare = y.mean(axis=0) < 0.2
    after = np.array([c["after"] for c in doc["report"]["classes"]])
    assert np.all(after[rare] > y.mean(axis=0)[rare])
    code, stdout, _ = run(["demo"], capsys)
    assert code == EXIT_OK
    assert "images %  tiles %  pixel share %" in stdout and "| class | before % |" in stdout


def test_demo_out_writes_everything(tmp_path, capsys):
    pytest.importorskip("torch")
    from cobalance import Plan

    out = tmp_path / "demo"
    code, _, _ = run(["demo", "--out", out, "--tile", 256, "--quiet"], capsys)
    assert code == EXIT_OK
    for name in ["table.npz", "table.scan.json", "plan.npz", "plan.fit.json", "report.md", "report.json",
                 "report.png", "balanced/manifest.csv"]:
        assert (out / name).exists(), name
    plan = Plan.load(out / "plan.npz")
    assert len(read_manifest(out / "balanced" / "manifest.csv")) == plan.n_samples_out
    # the demo's files work with the other subcommands
    assert run(["report", out / "plan.npz", "--quiet"], capsys)[0] == EXIT_OK


def test_demo_without_torch(tmp_path):
    """torch hidden from the interpreter: the demo still runs and says what it skipped."""
    script = ("import sys; sys.modules['torch'] = None\n"
              "from cobalance.cli import main\n"
              f"sys.exit(main(['demo', '--out', {str(tmp_path / 'demo')!r}, '--tile', '256']))\n")
    env = dict(os.environ, PYTHONPATH=str(PACKAGE_PARENT))
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "torch is not installed" in res.stderr and "skipped writing the balanced dataset" in res.stderr
    assert "| class | before % |" in res.stdout
    assert (tmp_path / "demo" / "plan.npz").exists() and not (tmp_path / "demo" / "balanced").exists()
    script = script.replace("['demo', '--out', " + repr(str(tmp_path / "demo")) + ", '--tile', '256']",
                            f"['write', {str(tmp_path / 'demo' / 'plan.npz')!r}, {str(SAMPLE)!r}, "
                            f"{str(tmp_path / 'w')!r}]")
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 1
    assert res.stderr.strip().startswith("cobalance: error: `cobalance write` needs torch")


def make_label_map_folder(root: Path):
    """3 label-map images of 40 x 60: class ids 0..2 in rectangles, 255 for unlabelled pixels."""
    from PIL import Image

    rng = np.random.default_rng(11)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    maps = []
    for i in range(3):
        labels = np.zeros((40, 60), np.uint8)
        for _ in range(4):
            y, x = rng.integers(0, 36, 2)
            labels[y:y + rng.integers(2, 12), x:x + rng.integers(2, 20)] = rng.choice([1, 2, 255])
        Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(root / "images" / f"im{i}.png")
        Image.fromarray(labels).save(root / "masks" / f"im{i}.png")
        maps.append(labels)
    return maps


def test_scan_fit_write_label_map_folder(tmp_path, capsys):
    pytest.importorskip("PIL")
    maps = make_label_map_folder(tmp_path / "ds")
    # brute force: tiles of 20 x 20, a class present from 5 pixels on, 255 ignored
    expected = np.array([[np.count_nonzero(m[y:y + 20, x:x + 20] == c) >= 5 for c in range(3)]
                         for m in maps for y in (0, 20) for x in (0, 20, 40)], dtype=np.uint8)
    table_path = tmp_path / "t.npz"
    code, stdout, _ = run(["scan", tmp_path / "ds", "--class-names", "bg,a,b", "--tile", 20, "--ignore-index", 255,
                           "--min-pixels", 5, "-o", table_path, "--json"], capsys)
    assert code == EXIT_OK, stdout
    doc = json.loads(stdout)
    np.testing.assert_array_equal([c["samples"] for c in doc["classes"]], expected.sum(axis=0))
    table = PatternTable.load(table_path)
    np.testing.assert_array_equal(table.patterns[table.inverse], expected.astype(bool))
    code, _, err = run(["scan", tmp_path / "ds", "--tile", 20], capsys)
    assert code == EXIT_USAGE and err.startswith("cobalance: error: ") and len(err.strip().splitlines()) == 1
    import importlib.util

    if importlib.util.find_spec("torch") is not None:  # the write step needs torch
        plan_path = tmp_path / "plan.npz"
        assert run(["fit", table_path, "--target", "b=0.6", "-o", plan_path, "--quiet"], capsys)[0] == EXIT_OK
        from cobalance import Plan

        plan = Plan.load(plan_path)
        code, _, _ = run(["write", plan_path, tmp_path / "ds", tmp_path / "out", "--quiet"], capsys)
        assert code == EXIT_OK
        assert (tmp_path / "out" / "classes.txt").read_text().split() == ["bg", "a", "b"]
        rows = read_manifest(tmp_path / "out" / "manifest.csv")
        np.testing.assert_array_equal(np.bincount([int(r["sample"]) for r in rows], minlength=18), plan.copies)


def test_fit_feasibility_warning_is_a_note(tmp_path, capsys):
    y = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 0], [1, 0, 0]])
    path = write_csv(tmp_path / "y.csv", ["a", "b", "never"], y)
    assert run(["scan", path, "-o", tmp_path / "t.npz", "-q"], capsys)[0] == EXIT_OK
    argv = ["fit", tmp_path / "t.npz", "--target", "never=0.5", "-o", tmp_path / "p.npz"]
    code, stdout, err = run(argv, capsys)
    assert code == EXIT_OK and "| never |" in stdout
    assert err.startswith("cobalance: warning: classes never present in any sample") and "'never'" in err
    code, stdout, err = run(argv + ["--json", "--quiet"], capsys)
    assert code == EXIT_OK and err == ""
    assert json.loads(stdout)["report"]["classes"][2]["after"] == 0.0
