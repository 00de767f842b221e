"""The cobalance command line, end to end on temporary files."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cobalance import PatternTable, Plan
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


def sha256_of(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def side_records(folder: Path):
    """The side records earlier versions wrote (``*.scan.json``, ``*.fit.json``) under ``folder``."""
    return sorted(p.name for p in folder.rglob("*.json") if p.name.endswith((".scan.json", ".fit.json")))


def make_old_style(plan_path: Path, table_path: Path = None, *, legacy_names: bool = False) -> Path:
    """Rewrite a plan (and its table) as versions before provenance wrote them.

    The provenance leaves the file for a side record beside it, in the documented
    record format (``cobalance.fit`` / ``cobalance.scan``, version 1, the file's
    SHA-256); ``legacy_names``: the oldest names (``p.fit.json``) instead of
    ``p.npz.fit.json``. Returns the plan's record path.
    """
    def record_name(path, kind):
        return path.with_name(f"{path.stem if legacy_names else path.name}.{kind}.json")

    if table_path is not None:
        table = PatternTable.load(table_path)
        origin, table.provenance = table.provenance, None
        table.save(table_path)
        record_name(table_path, "scan").write_text(json.dumps(
            {"format": "cobalance.scan", "version": 1, **origin, "table_sha256": sha256_of(table_path)}))
    plan = Plan.load(plan_path)
    origin, plan.provenance = plan.provenance, None
    plan.save(plan_path)
    if table_path is not None:
        origin["table"]["sha256"] = sha256_of(table_path)
    path = record_name(plan_path, "fit")
    path.write_text(json.dumps({"format": "cobalance.fit", "version": 1, "plan_sha256": sha256_of(plan_path),
                                **origin}))
    return path


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
    # where the table came from is inside it, and no side record is written
    origin = table.provenance
    assert origin["source_format"] == "csv" and Path(origin["source"]) == path.resolve()
    assert origin["source_sha256"] == sha256_of(path) and origin["columns"] == header
    assert side_records(tmp_path) == []


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
    origin = table.provenance
    assert origin["source_format"] == "masks" and Path(origin["source"]) == SAMPLE.resolve()
    assert origin["mask_folder"]["tile"] == [128, 128] and origin["mask_folder"]["layout"] == "binary_folders"
    assert side_records(tmp_path) == []
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
    origin = plan.provenance
    assert origin["table"]["relative_path"] == "yeast.npz" and origin["table"]["sha256"] == sha256_of(table_path)
    np.testing.assert_allclose(origin["target"], doc["target"])
    # a .json plan carries its provenance too, and no side record is written
    code, _, _ = run(["fit", table_path, "--target", "uniform", "-o", tmp_path / "plan.v2.json", "--quiet"], capsys)
    assert code == EXIT_OK
    assert json.loads((tmp_path / "plan.v2.json").read_text())["provenance"]["table"]["path"] == str(table_path)
    assert side_records(tmp_path) == []
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


def test_fit_has_the_balancers_size_bound_weight_and_floor_options(labels, tmp_path, capsys):
    from cobalance import Plan
    from cobalance.balancer import Balancer

    names, y = labels
    table_path = tmp_path / "t.npz"
    PatternTable.from_labels(y, class_names=names).save(table_path)
    argv = ["fit", table_path, "--n-samples-out", "130%", "--class-weights", "bird=3,dog=2", "--max-count", "200",
            "--min-count", "1", "--allow-undersampling", "--min-effective-size", "0.7", "--seed", "2",
            "-o", tmp_path / "plan.npz", "--quiet"]
    code, stdout, stderr = run(argv, capsys)
    assert code == EXIT_OK, stderr
    expected = Balancer(n_samples_out="1.3x", class_weights=[1, 2, 3, 1], max_count=200, min_count=1,
                        allow_undersampling=True, min_effective_size=0.7, random_state=2).fit(
        PatternTable.from_labels(y, class_names=names)).plan_
    plan = Plan.load(tmp_path / "plan.npz")
    np.testing.assert_array_equal(plan.copies, expected.copies)
    assert plan.n_samples_out == 390
    origin = plan.provenance
    assert origin["balancer"]["class_weights"] == {"cat": 1.0, "dog": 2.0, "bird": 3.0, "fish": 1.0}
    assert origin["balancer"]["n_samples_out"] == "130%"
    code, _, _ = run(["fit", table_path, "--class-weights", "1,2,3,4", "-o", tmp_path / "p2.npz", "-q"], capsys)
    assert code == EXIT_OK
    for option, value, fragment in [("--n-samples-out", "1.3", "ratio such as 1.25x"),
                                    ("--class-weights", "1,2", "lists 2 weights, the table has 4 classes"),
                                    ("--class-weights", "cow=2", "unknown class 'cow'"),
                                    ("--class-weights", "dog=-1", "weight of 'dog' must be a finite number"),
                                    ("--min-effective-size", "2", "share of N in (0, 1]"),
                                    ("--max-count", "0", "positive number")]:
        code, _, err = run(["fit", table_path, option, value, "-o", tmp_path / "bad.npz"], capsys)
        assert_one_line_error(code, err, fragment)
        assert not (tmp_path / "bad.npz").exists()


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


def test_report_from_the_plans_provenance(yeast_table, tmp_path, capsys):
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
    # the provenance (or, for a file of earlier versions, its record) is the link to the
    # table: without either, --table and --target are needed
    record_path = make_old_style(plan_path)
    record = record_path.read_text()
    record_path.unlink()
    code, _, err = run(["report", plan_path], capsys)
    assert_one_line_error(code, err, "no provenance", "no fit record", "plan.npz.fit.json", "pass --table and --target")
    record_path.write_text(record)
    assert run(["report", plan_path, "-q"], capsys)[0] == EXIT_OK
    # a plan rewritten by other means no longer matches its record
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
    ("balanced", ["--target: a target must be equal | sqrt"]),
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
    for name in ["table.npz", "plan.npz", "report.md", "report.json", "report.png", "balanced/manifest.csv"]:
        assert (out / name).exists(), name
    assert side_records(out) == []
    plan = Plan.load(out / "plan.npz")
    assert PatternTable.load(out / "table.npz").provenance["mask_folder"]["tile"] == [256, 256]
    assert plan.provenance["table"]["relative_path"] == "table.npz"
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


# -- outputs never overwrite inputs -------------------------------------------------------


def _snapshot(folder: Path):
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and not p.is_symlink()}


@pytest.fixture
def fitted(labels, tmp_path, capsys):
    """t.npz (a table), p.npz fitted on it, tg.json (a target file) in tmp_path."""
    names, y = labels
    PatternTable.from_labels(y, class_names=names).save(tmp_path / "t.npz")
    (tmp_path / "tg.json").write_text(json.dumps({"bird": 0.3}))
    assert run(["fit", tmp_path / "t.npz", "-o", tmp_path / "p.npz", "-q"], capsys)[0] == EXIT_OK
    return tmp_path


@pytest.mark.parametrize("argv, fragments", [
    (["fit", "t.npz", "-o", "t.npz"], ["--output", "is the table"]),
    (["fit", "t.npz", "-o", "t.npz.scan.json"], ["--output", "is the table's scan record"]),
    (["fit", "t.npz", "-o", "t.scan.json"], ["--output", "is the table's scan record"]),  # an earlier version's name
    (["fit", "t.npz", "--target", "tg.json", "-o", "tg.json"], ["--output", "is the target file"]),
    (["fit", "t.npz", "-o", "q.npz", "--markdown", "t.npz"], ["--markdown", "is the table"]),
    (["fit", "t.npz", "-o", "q.npz", "--markdown", "x.md", "--report-json", "x.md"],
     ["--report-json", "--markdown", "are the same file"]),
    (["fit", "t.npz", "-o", "q.npz", "--report-json", "q.npz.fit.json"], ["--report-json", "its fit record"]),
    (["fit", "t.npz", "-o", "hard.npz"], ["--output", "hard.npz", "is the table", "t.npz"]),
    (["scan", "t.npz", "-o", "t.npz"], ["--output", "is the input"]),
    (["report", "p.npz", "--markdown", "p.npz"], ["--markdown", "is the plan"]),
    (["report", "p.npz", "--report-json", "p.npz.fit.json"], ["--report-json", "is the plan's fit record"]),
    (["report", "p.npz", "--report-json", "link.json"], ["--report-json", "link.json", "is the plan's fit record"]),
    (["report", "p.npz", "--png", "t.npz"], ["--png", "is the table"]),
    (["report", "p.npz", "--markdown", "r.md", "--png", "r.md"], ["--png", "--markdown", "are the same file"]),
])
def test_an_output_that_is_an_input_is_refused(argv, fragments, fitted, capsys, monkeypatch):
    monkeypatch.chdir(fitted)
    os.link("t.npz", "hard.npz")  # another name of the table
    os.symlink("p.npz.fit.json", "link.json")  # another name of the plan's record
    before = _snapshot(fitted)
    code, _, err = run(argv, capsys)
    assert_one_line_error(code, err, *fragments)
    assert _snapshot(fitted) == before  # nothing written, nothing replaced


def test_scan_output_may_not_be_the_labels_npz(labels, tmp_path, capsys):
    names, y = labels
    path = tmp_path / "y.npz"
    np.savez(path, labels=y, class_names=np.array(names))
    before = path.read_bytes()
    code, _, err = run(["scan", path, "-o", path], capsys)
    assert_one_line_error(code, err, "--output", "is the input", str(path))
    assert path.read_bytes() == before


def test_plans_of_one_stem_keep_their_own_records(fitted, capsys):
    """p.npz and p.json fitted one after the other: each report still finds its own table and target."""
    t = fitted / "t.npz"
    assert run(["fit", t, "--target", "all", "-o", fitted / "p.json", "-q"], capsys)[0] == EXIT_OK
    assert Plan.load(fitted / "p.json").provenance["target"] == [1.0] * 4
    assert max(Plan.load(fitted / "p.npz").provenance["target"]) < 1
    code, out_npz, _ = run(["report", fitted / "p.npz", "--json"], capsys)
    assert code == EXIT_OK
    code, out_json, _ = run(["report", fitted / "p.json", "--json"], capsys)
    assert code == EXIT_OK
    np.testing.assert_allclose([c["target"] for c in json.loads(out_json)["report"]["classes"]], 1.0)
    # p.npz was fitted towards 'equal': one shared presence, below 1 for these classes
    equal = [c["target"] for c in json.loads(out_npz)["report"]["classes"]]
    assert max(equal) < 1 and np.allclose(equal, equal[0])


def test_records_of_earlier_versions_are_still_read(fitted, capsys):
    make_old_style(fitted / "p.npz", legacy_names=True)  # p.fit.json, the name the earliest versions wrote
    code, _, err = run(["report", fitted / "p.npz", "-q"], capsys)
    assert code == EXIT_OK, err
    # and it is protected like the current name
    code, _, err = run(["report", fitted / "p.npz", "--markdown", fitted / "p.fit.json"], capsys)
    assert_one_line_error(code, err, "is the plan's fit record")


# -- side records are checked -------------------------------------------------------------


def _edit_fit_record(doc):
    doc["target"][0] = 5
    doc["target"][1] = -1


@pytest.mark.parametrize("edit, fragments", [
    (_edit_fit_record, ["'target[0]' must be a fraction in [0, 1], got 5"]),
    (lambda d: d.update(target=[0.5, float("nan"), 0.5, 0.5]), ["'target[1]' must be a fraction in [0, 1]"]),
    (lambda d: d.update(target=[0.5]), ["'target' must be one fraction per class"]),
    (lambda d: d.update(table="oops"), ["'table' must be an object, got \"oops\""]),
    (lambda d: d["table"].pop("relative_path"), ["'table.relative_path' must be a non-empty path, it is missing"]),
    (lambda d: d["table"].update(sha256=7), ["'table.sha256' must be a SHA-256 hex digest, got 7"]),
    (lambda d: d.pop("plan_sha256"), ["'plan_sha256'", "it is missing"]),
    (lambda d: d.pop("target"), ["'target'", "it is missing"]),
    (lambda d: d.update(report=[]), ["'report' must be an object"]),
    (lambda d: d["report"].update(extra="x"), ["'report.extra' must be an object"]),
    (lambda d: d.update(version=2), ["record version 2"]),
    (lambda d: d.update(format="cobalance.scan"), ["is not a cobalance.fit record"]),
])
def test_a_damaged_fit_record_is_refused(edit, fragments, fitted, capsys):
    path = make_old_style(fitted / "p.npz")
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))
    code, _, err = run(["report", fitted / "p.npz"], capsys)
    assert_one_line_error(code, err, str(path), *fragments)


def test_an_unreadable_fit_record_is_refused(fitted, capsys):
    path = make_old_style(fitted / "p.npz")
    for content in (b"{not json", b"\xff\xfe\x00garbage", b"[1, 2]"):
        path.write_bytes(content)
        code, _, err = run(["report", fitted / "p.npz"], capsys)
        assert_one_line_error(code, err, str(path))


@pytest.mark.parametrize("edit, fragments", [
    (lambda d: d["mask_folder"].update(tile=[0, 5]), ["'mask_folder.tile' must be null or [height, width]"]),
    (lambda d: d["mask_folder"].update(min_pixels=-3), ["'mask_folder.min_pixels' must be a positive integer"]),
    (lambda d: d["mask_folder"].update(colour="red"), ["'mask_folder.colour' must be absent"]),
    (lambda d: d.update(mask_folder="tiles"), ["'mask_folder' must be an object"]),
    (lambda d: d.update(source_format="xls"), ["'source_format' must be one of"]),
    (lambda d: d.pop("source"), ["'source'", "it is missing"]),
    (lambda d: d.update(table_sha256="0" * 64), ["describes another table"]),
])
def test_a_damaged_scan_record_is_refused_by_write(edit, fragments, tmp_path, capsys):
    pytest.importorskip("torch")
    table_path, plan_path = _sample_plan(tmp_path, capsys, 128)
    make_old_style(plan_path, table_path)
    path = tmp_path / "t.npz.scan.json"
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))
    code, _, err = run(["write", plan_path, SAMPLE, tmp_path / "out"], capsys)
    assert_one_line_error(code, err, str(path), *fragments)
    assert not (tmp_path / "out").exists()


def test_write_table_option_is_checked(tmp_path, capsys):
    pytest.importorskip("torch")
    table_path, plan_path = _sample_plan(tmp_path, capsys, 128)
    code, _, err = run(["write", plan_path, SAMPLE, tmp_path / "out", "--table", tmp_path / "nope.npz"], capsys)
    assert_one_line_error(code, err, "table", "nope.npz", "does not exist")
    PatternTable.from_labels(np.eye(3, dtype=np.uint8)).save(tmp_path / "small.npz")
    code, _, err = run(["write", plan_path, SAMPLE, tmp_path / "out", "--table", tmp_path / "small.npz"], capsys)
    assert_one_line_error(code, err, "the plan has 120 samples but the table", "small.npz", "has 3")
    (tmp_path / "junk.npz").write_bytes(b"junk")
    code, _, err = run(["write", plan_path, SAMPLE, tmp_path / "out", "--table", tmp_path / "junk.npz"], capsys)
    assert_one_line_error(code, err, "cannot read table", "junk.npz")
    assert not (tmp_path / "out").exists()


def test_write_out_dir_may_not_hold_its_inputs(tmp_path, capsys):
    pytest.importorskip("torch")
    import shutil

    src = tmp_path / "src"
    shutil.copytree(SAMPLE, src)
    _, plan_path = _sample_plan(tmp_path, capsys, 128)
    cases = [
        (src, ["is the dataset"]),
        (src / "masks" / "balanced", ["inside the dataset's masks folder"]),
        (src / "images", ["inside the dataset's images folder"]),
        (tmp_path, ["is inside OUT_DIR"]),
    ]
    for out_dir, fragments in cases:
        code, _, err = run(["write", plan_path, src, out_dir], capsys)
        assert_one_line_error(code, err, *fragments)
    assert not (src / "masks" / "balanced").exists()


# -- unreadable images and masks -----------------------------------------------------------


@pytest.mark.parametrize("how", ["truncated", "garbage", "bomb"])
def test_unreadable_mask_names_the_file(how, tmp_path, capsys, monkeypatch):
    from PIL import Image

    make_label_map_folder(tmp_path / "ds")
    bad = tmp_path / "ds" / "masks" / "im1.png"
    if how == "truncated":
        # noise does not compress, so half the file misses pixels
        Image.fromarray(np.random.default_rng(0).integers(0, 3, (40, 60), dtype=np.uint8)).save(bad)
        bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
        cause = "image file is truncated (OSError)"
    elif how == "garbage":
        bad.write_bytes(b"not an image at all\n" * 10)
        cause = "(UnidentifiedImageError)"
    else:
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 40 x 60 is over twice that
        cause = "(DecompressionBombError)"
    code, _, err = run(["scan", tmp_path / "ds", "--class-names", "bg,a,b", "--ignore-index", 255], capsys)
    assert_one_line_error(code, err, "cannot read", "mask", "im" if how == "bomb" else str(bad), cause)


def test_unreadable_image_names_the_file_in_write(tmp_path, capsys):
    pytest.importorskip("torch")
    make_label_map_folder(tmp_path / "ds")
    table_path, plan_path = tmp_path / "t.npz", tmp_path / "p.npz"
    assert run(["scan", tmp_path / "ds", "--class-names", "bg,a,b", "--ignore-index", 255, "-o", table_path, "-q"],
               capsys)[0] == EXIT_OK
    assert run(["fit", table_path, "-o", plan_path, "-q"], capsys)[0] == EXIT_OK
    bad = tmp_path / "ds" / "images" / "im2.png"
    bad.write_bytes(bad.read_bytes()[:300])  # the header is intact: only decoding fails
    code, _, err = run(["write", plan_path, tmp_path / "ds", tmp_path / "out"], capsys)
    assert_one_line_error(code, err, "cannot read image", str(bad), "image file is truncated")


# -- write resumes over changed sources ---------------------------------------------------------


def _decoded_tree(folder: Path):
    from PIL import Image

    out = {}
    for p in sorted(folder.rglob("*.png")):
        with Image.open(p) as img:
            out[str(p.relative_to(folder))] = np.asarray(img).copy()
    return out


def test_write_resume_over_changed_masks_rewrites_them(tmp_path, capsys):
    """The manifest and one item deleted, every source mask rewritten: the rerun gives what a fresh write gives."""
    pytest.importorskip("torch")
    import shutil

    from PIL import Image

    src = tmp_path / "src"
    shutil.copytree(SAMPLE, src)
    table_path, plan_path = tmp_path / "t.npz", tmp_path / "plan.npz"
    assert run(["scan", src, "--tile", 128, "-o", table_path, "-q"], capsys)[0] == EXIT_OK
    assert run(["fit", table_path, "-o", plan_path, "-q"], capsys)[0] == EXIT_OK
    out = tmp_path / "out"
    code, stdout, _ = run(["write", plan_path, src, out, "--json"], capsys)
    assert code == EXIT_OK
    n_items = json.loads(stdout)["written"]
    (out / "manifest.csv").unlink()
    victim = sorted((out / "images").iterdir())[0]
    victim.unlink()
    for mask in (src / "masks").rglob("*.png"):  # every lesion mask mirrored left to right
        with Image.open(mask) as img:
            img.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(mask)
    code, stdout, err = run(["write", plan_path, src, out, "--json"], capsys)
    assert code == EXIT_OK, err
    doc = json.loads(stdout)
    assert doc["written"] + doc["skipped"] == n_items
    assert doc["written"] > 1  # not only the deleted item
    fresh = tmp_path / "fresh"
    assert run(["write", plan_path, src, fresh, "-q"], capsys)[0] == EXIT_OK
    got, expected = _decoded_tree(out), _decoded_tree(fresh)
    assert sorted(got) == sorted(expected)
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
    assert (out / "manifest.csv").read_text() == (fresh / "manifest.csv").read_text()


def test_demo_out_may_not_overlap_the_sample(capsys):
    from cobalance.folders import sample_path

    for out in (sample_path(), sample_path() / "masks" / "new", sample_path().parent):
        code, _, err = run(["demo", "--out", out, "-q"], capsys)
        assert_one_line_error(code, err, "--out", "overlaps the shipped sample")
    assert not (sample_path() / "masks" / "new").exists()


# -- provenance inside the files ---------------------------------------------------------------


def test_report_and_write_find_the_table_through_the_provenance_alone(tmp_path, capsys):
    """No side record anywhere: report and write find the table, its tiling and the target in the files."""
    pytest.importorskip("torch")
    work = tmp_path / "work"
    work.mkdir()
    table_path, plan_path = _sample_plan(work, capsys, 128, target="equal")
    assert side_records(tmp_path) == []
    # moved together to another folder: found by the path relative to the plan
    moved = tmp_path / "moved"
    os.replace(work, moved)
    code, stdout, err = run(["report", moved / "plan.npz", "--json"], capsys)
    assert code == EXIT_OK, err
    doc = json.loads(stdout)
    assert doc["table"] == str(moved / "t.npz")
    # the target reported is the one fitted (equal: one presence for every class)
    targets = [c["target"] for c in doc["report"]["classes"]]
    np.testing.assert_allclose(targets, Plan.load(moved / "plan.npz").provenance["target"])
    assert np.allclose(targets, targets[0])
    # write takes the tiling (128) from the table's provenance: 120 tiles, as the plan has
    code, stdout, err = run(["write", moved / "plan.npz", SAMPLE, tmp_path / "out", "--json"], capsys)
    assert code == EXIT_OK, err
    assert json.loads(stdout)["n_items"] == Plan.load(moved / "plan.npz").n_samples_out
    assert side_records(tmp_path) == []


def test_old_style_files_with_side_records_still_work(tmp_path, capsys):
    """A table and plan written before provenance (records beside them) report and write as before."""
    pytest.importorskip("torch")
    table_path, plan_path = _sample_plan(tmp_path, capsys, 128)
    make_old_style(plan_path, table_path)
    assert PatternTable.load(table_path).provenance is None and Plan.load(plan_path).provenance is None
    assert side_records(tmp_path) == ["plan.npz.fit.json", "t.npz.scan.json"]
    assert run(["report", plan_path, "-q"], capsys)[0] == EXIT_OK
    code, stdout, err = run(["write", plan_path, SAMPLE, tmp_path / "out", "--json"], capsys)
    assert code == EXIT_OK, err  # the tiling came from the scan record: 120 tiles
    assert json.loads(stdout)["n_items"] == Plan.load(plan_path).n_samples_out


def test_the_provenance_wins_over_a_stale_side_record(fitted, capsys):
    """A record left beside a plan that now carries its provenance is not read."""
    (fitted / "p.npz.fit.json").write_text("{not json")
    code, _, err = run(["report", fitted / "p.npz", "-q"], capsys)
    assert code == EXIT_OK, err


@pytest.mark.parametrize("edit, fragments", [
    (_edit_fit_record, ["'provenance.target[0]' must be a fraction in [0, 1], got 5"]),
    (lambda d: d.update(target=[0.5]), ["'provenance.target' must be one fraction per class"]),
    (lambda d: d["table"].pop("relative_path"), ["'provenance.table.relative_path'", "it is missing"]),
    (lambda d: d["table"].update(sha256="x"), ["'provenance.table.sha256' must be a SHA-256 hex digest"]),
    (lambda d: d.update(report=[]), ["'provenance.report' must be an object"]),
])
@pytest.mark.parametrize("suffix", [".npz", ".json"])
def test_a_damaged_plan_provenance_is_refused(edit, fragments, suffix, fitted, capsys):
    path = fitted / f"p{suffix}"
    assert run(["fit", fitted / "t.npz", "-o", path, "-q"], capsys)[0] == EXIT_OK
    plan = Plan.load(path)
    origin = plan.provenance
    edit(origin)
    plan.provenance = origin
    plan.save(path)
    code, _, err = run(["report", path], capsys)
    assert_one_line_error(code, err, str(path), *fragments)


def test_a_corrupted_provenance_text_is_refused(fitted, capsys):
    """Not a JSON object inside the file: the loader's ValueError, naming the file (exit 2)."""
    path = fitted / "p.npz"
    with np.load(path) as z:
        arrays = dict(z)
    np.savez(path, **{**arrays, "provenance": np.array('{"table": ')})
    code, _, err = run(["report", path], capsys)
    assert_one_line_error(code, err, "cannot read plan", str(path), "provenance is not valid JSON")


@pytest.mark.parametrize("edit, fragments", [
    (lambda d: d["mask_folder"].update(tile=[0, 5]), ["'provenance.mask_folder.tile' must be null or [height, width]"]),
    (lambda d: d.update(source_format="xls"), ["'provenance.source_format' must be one of"]),
    (lambda d: d.pop("source"), ["'provenance.source'", "it is missing"]),
])
def test_a_damaged_table_provenance_is_refused_by_write(edit, fragments, tmp_path, capsys):
    pytest.importorskip("torch")
    table_path, _ = _sample_plan(tmp_path, capsys, 128)
    table = PatternTable.load(table_path)
    origin = table.provenance
    edit(origin)
    table.provenance = origin
    table.save(table_path)
    # fitted again, so that the plan names the table as it is now
    plan_path = tmp_path / "p2.npz"
    assert run(["fit", table_path, "-o", plan_path, "-q"], capsys)[0] == EXIT_OK
    code, _, err = run(["write", plan_path, SAMPLE, tmp_path / "out"], capsys)
    assert_one_line_error(code, err, str(table_path), *fragments)
    assert not (tmp_path / "out").exists()
