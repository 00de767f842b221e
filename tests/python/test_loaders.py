"""Plan.load and PatternTable.load on damaged files: exactly what the file says, or a ValueError naming it.

The regression tests pin each damage found once (lossy float copies, negative counts,
booleans, wrong totals, low-level exceptions without the file name); the property
tests corrupt valid files at random (byte flips and truncation of the binary files;
values replaced by random JSON, keys deleted, deep nesting for JSON) and require that
a load either raises ValueError with the file name or returns the object the file
describes, which the constructors accept again.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings, strategies as st

from cobalance import Balancer, PatternTable, Plan
from cobalance.cli import EXIT_OK, EXIT_USAGE, main


def labels(seed=0, n=60):
    rng = np.random.default_rng(seed)
    return (rng.random((n, 5)) < [0.5, 0.3, 0.1, 0.05, 0.4]).astype(np.uint8)


def fitted_plan():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Balancer(random_state=0).fit(labels()).plan_


def json_doc(plan):
    return {"format": "cobalance.Plan", "version": 1, "n_samples": plan.n_samples,
            "n_samples_out": plan.n_samples_out, "copies": plan.copies.tolist(),
            "pattern_counts": None if plan.pattern_counts is None else plan.pattern_counts.tolist()}


def load_error(load, path) -> str:
    """The ValueError message of loading ``path``; it must name the file."""
    with pytest.raises(ValueError) as info:
        load(path)
    message = str(info.value)
    assert str(path) in message, message
    return message


# -- Plan: regressions -----------------------------------------------------------------------


def test_saved_plans_load_back_exactly(tmp_path):
    plan = fitted_plan()
    for suffix in (".json", ".npz"):
        plan.save(tmp_path / f"p{suffix}")
        back = Plan.load(tmp_path / f"p{suffix}")
        assert back == plan and back.copies.dtype == np.int64
    # the writer's JSON is exactly the document these tests edit
    assert json.loads((tmp_path / "p.json").read_text()) == json_doc(plan)


@pytest.mark.parametrize("field, value, fragments", [
    # floats were truncated to [1, 2, 0], where Plan([1.9]) raises
    ("copies", [1.9, 2.5, 0.2], ["copies", "integers", "1.9"]),
    ("copies", [1.0, 2.0, 0.0], ["copies", "integers", "1.0"]),
    ("copies", ["1", 2, 0], ["copies", "integers", "'1'"]),
    ("copies", [True, 2, 0], ["copies", "integers", "boolean"]),
    ("copies", [-1, 4, 0], ["copies", "non-negative", "-1"]),
    ("copies", [10 ** 30, 0, 0], ["copies", "int64"]),  # was a bare OverflowError
    ("copies", 3, ["copies", "list of integers"]),  # was a bare TypeError
    ("copies", [[1], 2, 0], ["copies", "integers"]),
    ("pattern_counts", [-1, 4], ["pattern_counts", "non-negative", "-1"]),
    ("pattern_counts", [1.5, 1.5], ["pattern_counts", "integers"]),
    ("pattern_counts", [2, 2], ["pattern_counts sum to 4", "copies to 3"]),
    ("n_samples", 4, ["n_samples = 4", "3 copies"]),
    ("n_samples", True, ["n_samples", "integer"]),
    ("n_samples_out", 5, ["n_samples_out = 5", "sum to 3"]),  # was accepted
    ("n_samples_out", 3.0, ["n_samples_out", "integer"]),
    ("version", True, ["version True"]),
    ("version", 0, ["version 0"]),
    ("format", ["cobalance.Plan"], ["not a cobalance plan file"]),
    ("extra", 1, ["unknown field", "'extra'"]),
    ("provenance", [1, 2], ["provenance must be a JSON object, got list"]),
    ("provenance", "table.npz", ["provenance must be a JSON object, got str"]),
])
def test_plan_json_fields_are_checked_like_the_constructor(tmp_path, field, value, fragments):
    doc = {"format": "cobalance.Plan", "version": 1, "n_samples": 3, "n_samples_out": 3, "copies": [1, 2, 0],
           "pattern_counts": [1, 2]}
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({**doc, field: value}))
    message = load_error(Plan.load, path)
    for fragment in fragments:
        assert fragment in message, message
    path.write_text(json.dumps(doc))
    assert Plan.load(path) == Plan([1, 2, 0], [1, 2])  # the unchanged document is valid


@pytest.mark.parametrize("text, fragment", [
    ('{"format": "cobalance.Plan", "version": 1, "copies": [NaN]}', "NaN"),  # was "got -9223372036854775808"
    ('{"format": "cobalance.Plan", "version": 1, "copies": [Infinity]}', "Infinity"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),  # was a bare RecursionError
    ('{"format": "cobalance.Plan", "version": 1, "copies": [1, 2', "not valid JSON"),
    ('{"format": "cobalance.Plan", "version": 1, "n_samples": 1, "n_samples_out": 1, "pattern_counts": null}',
     "'copies' are missing"),  # was a bare KeyError
    ('{"format": "cobalance.Plan", "version": 1, "copies": [' + "9" * 5000 + "]}", "digits"),
    ("[1, 2, 3]", "not a cobalance plan file"),
])
def test_plan_json_syntax_errors_name_the_file(tmp_path, text, fragment):
    path = tmp_path / "plan.json"
    path.write_text(text)
    assert fragment in load_error(Plan.load, path)


def test_plan_json_that_is_not_utf8_names_the_file(tmp_path):
    path = tmp_path / "plan.json"
    path.write_bytes(b'{"format": "cobalance.Plan\xff"}')
    assert "UTF-8" in load_error(Plan.load, path)


def test_plan_npz_fields_are_checked_like_the_constructor(tmp_path):
    good = {"format": np.array("cobalance.Plan"), "version": np.array(1), "copies": np.array([1, 2, 0]),
            "pattern_counts": np.array([1, 2])}
    cases = [
        ("copies", np.array([1.9, 2.5, 0.2]), "copies must hold integers"),  # was truncated to [1, 2, 0]
        ("copies", np.array([True, True, False]), "copies must hold integers"),
        ("copies", np.array([[1, 2, 0]]), "copies must be 1-D"),
        ("copies", np.array([2 ** 64 - 1, 0, 0], dtype=np.uint64), "below 2**63"),
        ("pattern_counts", np.array([-1, 4]), "pattern_counts must be non-negative"),
        ("pattern_counts", np.array([1.0, 2.0]), "pattern_counts must hold integers"),
        ("version", np.array(1.0), "version must be an integer"),
        ("version", np.array([1]), "version must be an integer"),
        ("version", np.array(2), "version 2"),
        ("format", np.array(b"cobalance.Plan"), "format must be a text"),
        ("extra", np.zeros(2), "unknown array"),
        ("provenance", np.array("[1]"), "provenance must be a JSON object, got list"),
        ("provenance", np.array('{"table": '), "provenance is not valid JSON"),
        ("provenance", np.array('{"x": NaN}'), "NaN is not a number JSON allows"),
        ("provenance", np.array(b"{}"), "provenance must be a text scalar"),
        ("provenance", np.array(["{}"]), "provenance must be a text scalar"),
        ("provenance", np.array("[" * 100_000 + "]" * 100_000), "provenance"),
    ]
    for k, (field, value, fragment) in enumerate(cases):
        path = tmp_path / f"bad_{field}_{k}.npz"
        np.savez(path, **{**good, field: value})
        assert fragment in load_error(Plan.load, path), (field, value)
    path = tmp_path / "no_copies.npz"
    np.savez(path, **{k: v for k, v in good.items() if k != "copies"})
    assert "'copies' are missing" in load_error(Plan.load, path)  # was a bare KeyError
    np.savez(path, **good)
    assert Plan.load(path) == Plan([1, 2, 0], [1, 2])


def test_plan_npz_damage_names_the_file(tmp_path):
    plan = fitted_plan()
    good = plan.save(tmp_path / "good.npz")
    data = open(good, "rb").read()
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(data[:100])  # was a bare BadZipFile
    assert "not a cobalance plan file" in load_error(Plan.load, truncated)
    flipped = bytearray(data)
    flipped[len(data) // 3] ^= 0xFF  # inside an array's data: the archive's checksum no longer matches
    (tmp_path / "flipped.npz").write_bytes(bytes(flipped))
    load_error(Plan.load, tmp_path / "flipped.npz")
    np.save(tmp_path / "single.npy", plan.copies)
    (tmp_path / "single.npz").write_bytes((tmp_path / "single.npy").read_bytes())
    assert "single array" in load_error(Plan.load, tmp_path / "single.npz")
    np.savez(tmp_path / "pickled.npz", format=np.array("cobalance.Plan"), version=np.array(1),
             copies=np.array([1, 2], dtype=object))
    assert "pickle" in load_error(Plan.load, tmp_path / "pickled.npz").lower()
    with pytest.raises(FileNotFoundError):
        Plan.load(tmp_path / "missing.npz")
    with pytest.raises(FileNotFoundError):
        Plan.load(tmp_path / "missing.json")


def test_report_refuses_a_plan_with_float_copies(tmp_path, capsys):
    # The command line read such a plan as [1, 2, 0, ...] and reported it with exit 0.
    y = labels()
    table_path = tmp_path / "t.npz"
    PatternTable.from_labels(y).save(table_path)
    plan_path = tmp_path / "plan.json"
    assert main(["fit", str(table_path), "-o", str(plan_path), "--quiet"]) == EXIT_OK
    capsys.readouterr()
    doc = json.loads(plan_path.read_text())
    doc["copies"][:3] = [1.9, 2.5, 0.2]
    doc["pattern_counts"] = None
    plan_path.write_text(json.dumps(doc))
    code = main(["report", str(plan_path), "--table", str(table_path), "--target", "uniform"])
    err = capsys.readouterr().err
    assert code == EXIT_USAGE
    assert str(plan_path) in err and "copies" in err and "integers" in err


# -- PatternTable ------------------------------------------------------------------------------


def table_arrays(tmp_path):
    t = PatternTable.from_labels(labels(1, 80), class_names=["a", "b", "c", "d", "e"])
    t.save(tmp_path / "t.npz")
    with np.load(tmp_path / "t.npz") as z:
        return t, dict(z)


def test_table_npz_fields_are_checked(tmp_path):
    t, arrays = table_arrays(tmp_path)
    cases = [
        ("counts", arrays["counts"].astype(np.float64), "counts must hold integers"),
        ("counts", np.r_[arrays["counts"][:-1], 0], "counts must be positive"),
        ("counts", np.r_[arrays["counts"][:-2], 2 ** 62, 2 ** 62], "beyond the int64 limit"),
        ("packed", arrays["packed"].astype(np.float64), "packed must be 64-bit integers"),
        ("packed", arrays["packed"].ravel(), "packed must be 64-bit integers of shape"),
        ("packed", arrays["packed"].astype(np.uint32), "packed must be 64-bit integers"),
        ("inverse", arrays["inverse"].astype(bool), "inverse must hold integers"),
        ("n_classes", np.array(5.0), "n_classes must be an integer"),
        ("n_classes", np.array(0), "n_classes must be an integer in [1,"),
        ("version", np.array(True), "version must be an integer"),
        ("version", np.array(0), "version 0"),
        ("class_names", np.array(["a", "b"]), "class_names must be 5 texts"),
        ("class_names", np.array(["a", "a", "b", "c", "d"]), "unique"),
        ("class_names", np.arange(5), "class_names must be 5 texts"),
        ("format", np.array("cobalance.Plan"), "not a cobalance pattern-table file"),
        ("extra", np.zeros(1), "unknown array"),
        ("provenance", np.array('"source"'), "provenance must be a JSON object, got str"),
        ("provenance", np.array('{"source": '), "provenance is not valid JSON"),
        ("provenance", np.array('{"x": Infinity}'), "Infinity is not a number JSON allows"),
        ("provenance", np.array(7), "provenance must be a text scalar"),
    ]
    for k, (field, value, fragment) in enumerate(cases):
        path = tmp_path / f"bad_{field}_{k}.npz"
        np.savez(path, **{**arrays, field: value})
        assert fragment in load_error(PatternTable.load, path), (field, fragment)
    # from_parts' own checks carry the file name too
    path = tmp_path / "dup.npz"
    np.savez(path, **{**arrays, "packed": np.zeros_like(arrays["packed"])})
    assert "duplicate" in load_error(PatternTable.load, path)
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes((tmp_path / "t.npz").read_bytes()[:300])
    load_error(PatternTable.load, truncated)
    with pytest.raises(FileNotFoundError):
        PatternTable.load(tmp_path / "missing.npz")


# -- PatternTable.merge ------------------------------------------------------------------------


def test_merge_requires_the_same_class_names():
    y = labels()
    first = PatternTable.from_labels(y[:30], class_names=["a", "b", "c", "d", "e"])
    renamed = PatternTable.from_labels(y[30:], class_names=["a", "b", "x", "d", "e"])
    with pytest.raises(ValueError, match=r"tables\[1\] names its classes \['a', 'b', 'x', 'd', 'e'\].*"
                                         r"tables\[0\] names them \['a', 'b', 'c', 'd', 'e'\]"):
        PatternTable.merge([first, renamed])
    reordered = PatternTable.from_labels(y[30:], class_names=["b", "a", "c", "d", "e"])
    with pytest.raises(ValueError, match="same class names in the same order"):
        PatternTable.merge([first, reordered])
    # unnamed tables merge as before, and with named ones, whose names the result keeps
    unnamed = [PatternTable.from_labels(y[:30]), PatternTable.from_labels(y[30:])]
    assert PatternTable.merge(unnamed) == PatternTable.from_labels(y)
    same = PatternTable.from_labels(y[30:], class_names=["a", "b", "c", "d", "e"])
    whole = PatternTable.from_labels(y, class_names=["a", "b", "c", "d", "e"])
    assert PatternTable.merge([first, same]) == whole
    assert PatternTable.merge([unnamed[0], same]) == whole


# -- random damage -----------------------------------------------------------------------------

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                        HealthCheck.too_slow])


#: A provenance as the command line writes one (shortened), for the files fuzzed with one.
PROVENANCE = {"cobalance": "0.1.0", "table": {"path": "/data/t.npz", "relative_path": "t.npz", "sha256": "0" * 64,
                                              "n_samples": 60}, "target": [0.5, 0.25, 1.0], "balancer": {"seed": 0},
              "report": {"extra": {}}}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The bytes of a valid plan (.json, .npz) and table (.npz), with and without provenance, and the objects."""
    folder = tmp_path_factory.mktemp("saved")
    plan = fitted_plan()
    table = PatternTable.from_labels(labels(), class_names=["a", "b", "c", "d", "e"])
    plan.save(folder / "p.json")
    plan.save(folder / "p.npz")
    table.save(folder / "t.npz")
    plan.provenance = table.provenance = PROVENANCE
    plan.save(folder / "pp.json")
    plan.save(folder / "pp.npz")
    table.save(folder / "tp.npz")
    plan.provenance = table.provenance = None
    return {"plan": plan, "table": table, "json": (folder / "p.json").read_bytes(),
            "plan_npz": (folder / "p.npz").read_bytes(), "table_npz": (folder / "t.npz").read_bytes(),
            "json_provenance": (folder / "pp.json").read_bytes(),
            "plan_npz_provenance": (folder / "pp.npz").read_bytes(),
            "table_npz_provenance": (folder / "tp.npz").read_bytes(),
            "folder": tmp_path_factory.mktemp("damaged")}


@st.composite
def damaged_bytes(draw, data: bytes):
    out = bytearray(data)
    for _ in range(draw(st.integers(0, 6))):
        i = draw(st.integers(0, len(out) - 1))
        out[i] ^= draw(st.integers(1, 255))
    if draw(st.booleans()):
        out = out[:draw(st.integers(0, len(out)))]
    return bytes(out)


def assert_plan_or_value_error(path):
    """Load ``path``: a ValueError naming it, or a plan the constructor accepts as it is."""
    try:
        back = Plan.load(path)
    except ValueError as e:
        assert str(path) in str(e), str(e)
        event("refused")
        return None
    event("loaded")
    again = Plan(back.copies, back.pattern_counts)
    assert again == back
    return back


@FUZZ
@given(data=st.data())
def test_damaged_plan_npz(saved, data):
    damaged = data.draw(damaged_bytes(saved["plan_npz"]))
    path = saved["folder"] / "plan.npz"
    path.write_bytes(damaged)
    back = assert_plan_or_value_error(path)
    if back is not None:
        # the archive's checksums leave no way for a flip to change an array unnoticed
        assert back == saved["plan"]


@FUZZ
@given(data=st.data())
def test_damaged_table_npz(saved, data):
    damaged = data.draw(damaged_bytes(saved["table_npz"]))
    path = saved["folder"] / "table.npz"
    path.write_bytes(damaged)
    try:
        back = PatternTable.load(path)
    except ValueError as e:
        assert str(path) in str(e), str(e)
        event("refused")
        return
    event("loaded")
    # rebuilt from its own per-sample patterns, the loaded table is the same table
    rebuilt = PatternTable.from_packed(back.packed[back.inverse], back.n_classes, class_names=back.class_names)
    assert rebuilt == back
    assert back == saved["table"]


@FUZZ
@given(data=st.data())
def test_damaged_plan_json_text(saved, data):
    damaged = data.draw(damaged_bytes(saved["json"]))
    path = saved["folder"] / "text.json"
    path.write_bytes(damaged)
    back = assert_plan_or_value_error(path)
    if back is not None:
        assert_is_the_document(back, json.loads(damaged))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-2 ** 70, max_value=2 ** 70) | st.integers(-3, 70)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=8)
FIELDS = ["format", "version", "n_samples", "n_samples_out", "copies", "pattern_counts"]


def assert_is_the_document(back, doc):
    """A loaded plan holds exactly the document's values: nothing rounded, cast or dropped."""
    assert isinstance(doc, dict) and doc["format"] == "cobalance.Plan" and doc["version"] == 1
    assert all(type(v) is int for v in doc["copies"])
    assert back.copies.tolist() == doc["copies"]
    if doc["pattern_counts"] is None:
        assert back.pattern_counts is None
    else:
        assert all(type(v) is int for v in doc["pattern_counts"])
        assert back.pattern_counts.tolist() == doc["pattern_counts"]
    assert type(doc["n_samples"]) is int and doc["n_samples"] == back.n_samples
    assert type(doc["n_samples_out"]) is int and doc["n_samples_out"] == back.n_samples_out


@FUZZ
@given(data=st.data())
def test_edited_plan_json(saved, data):
    doc = json.loads(saved["json"])
    for _ in range(data.draw(st.integers(1, 3))):
        edit = data.draw(st.sampled_from(["replace", "entry", "delete", "add", "nest", "no_counts"]))
        if edit == "no_counts":  # a valid plan still: one without per-pattern counts
            doc["pattern_counts"] = None
        elif edit == "replace":
            doc[data.draw(st.sampled_from(FIELDS))] = data.draw(json_values)
        elif edit == "entry":
            field = data.draw(st.sampled_from(["copies", "pattern_counts"]))
            if isinstance(doc.get(field), list) and doc[field]:
                doc[field][data.draw(st.integers(0, len(doc[field]) - 1))] = data.draw(json_values)
        elif edit == "delete":
            doc.pop(data.draw(st.sampled_from(FIELDS)), None)
        elif edit == "add":
            doc[data.draw(st.text(max_size=6))] = data.draw(json_values)
        else:
            field = data.draw(st.sampled_from(FIELDS))
            if field in doc:
                for _ in range(data.draw(st.sampled_from([1, 2, 50]))):
                    doc[field] = [doc[field]]
    text = json.dumps(doc)  # NaN and Infinity are written as JSON's extensions
    depth = data.draw(st.sampled_from([0, 0, 1, 10, 5000, 200_000]))
    text = "[" * depth + text + "]" * depth
    path = saved["folder"] / "edited.json"
    path.write_text(text)
    back = assert_plan_or_value_error(path)
    if back is not None:
        assert depth == 0
        assert_is_the_document(back, doc)


# -- random damage to files that carry a provenance -----------------------------------------------


@FUZZ
@given(data=st.data())
def test_damaged_npz_with_provenance(saved, data):
    kind = data.draw(st.sampled_from(["plan", "table"]))
    damaged = data.draw(damaged_bytes(saved[f"{kind}_npz_provenance"]))
    path = saved["folder"] / f"{kind}_provenance.npz"
    path.write_bytes(damaged)
    load = Plan.load if kind == "plan" else PatternTable.load
    try:
        back = load(path)
    except ValueError as e:
        assert str(path) in str(e), str(e)
        event("refused")
        return
    event("loaded")
    # the archive's checksums leave no way for a flip to change an array unnoticed
    assert back == saved[kind] and back.provenance == PROVENANCE


@FUZZ
@given(data=st.data())
def test_edited_provenance_in_plan_json(saved, data):
    doc = json.loads(saved["json_provenance"])
    edit = data.draw(st.sampled_from(["replace", "entry", "delete", "nest"]))
    if edit == "replace":
        doc["provenance"] = data.draw(json_values)
    elif edit == "entry":
        doc["provenance"][data.draw(st.sampled_from(sorted(PROVENANCE)))] = data.draw(json_values)
    elif edit == "delete":
        del doc["provenance"]
    else:
        for _ in range(data.draw(st.sampled_from([1, 2, 50, 5000]))):
            doc["provenance"] = {"inner": doc["provenance"]}
    path = saved["folder"] / "edited_provenance.json"
    try:
        path.write_text(json.dumps(doc))
    except RecursionError:  # json.dumps itself cannot write it: nothing to load
        return
    back = assert_plan_or_value_error(path)
    if back is None:
        return
    assert_is_the_document(back, doc)
    expected = doc.get("provenance")
    assert isinstance(expected, dict) or expected is None
    assert back.provenance == expected
    # a loaded provenance saves and loads back as it is
    back.save(saved["folder"] / "again.npz")
    assert Plan.load(saved["folder"] / "again.npz").provenance == expected
