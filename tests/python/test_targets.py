import re
import warnings

import numpy as np
import pytest

from cobalance import FeasibilityWarning, PatternTable, resolve_target
from cobalance.targets import RARE_THRESHOLD, RARE_VALUE, check_feasibility


@pytest.fixture
def table():
    # presence per class: a 6/10, b 1/10, c 0/10, d 10/10, e 3/10
    y = np.zeros((10, 5), dtype=np.uint8)
    y[:6, 0] = 1
    y[0, 1] = 1
    y[:, 3] = 1
    y[[1, 4, 7], 4] = 1
    return PatternTable.from_labels(y, class_names=list("abcde"))


def test_all_and_array(table):
    np.testing.assert_array_equal(resolve_target("all", table), np.ones(5))
    np.testing.assert_array_equal(resolve_target([0, 0.5, 0, 1, 0.25], table), [0, 0.5, 0, 1, 0.25])


def test_dict_keeps_other_classes_at_their_share(table):
    out = resolve_target({"b": 0.4, 4: 0.5}, table)
    np.testing.assert_allclose(out, [0.6, 0.4, 0.0, 1.0, 0.5])


def test_rare_boost_definition(table):
    out = resolve_target("rare_boost", table)
    # b (10 %) is rare; c (absent) is not boosted; e (30 %) is above the 20 % threshold
    assert RARE_THRESHOLD == 0.2 and RARE_VALUE == 0.9
    np.testing.assert_allclose(out, [0.6, 0.9, 0.0, 1.0, 0.3])
    out = resolve_target("rare_boost", table, rare_threshold=0.35, rare_value=0.8)
    np.testing.assert_allclose(out, [0.6, 0.8, 0.0, 1.0, 0.8])


@pytest.mark.parametrize("target, match", [
    ([0.5] * 4, "length n_classes = 5"),
    ([0.5, np.nan, 0, 1, 0], "NaN"),
    ([0.5, 1.5, 0, 1, 0], "1.5"),
    ([-0.1, 0.5, 0, 1, 0], "-0.1"),
    ({"zz": 0.5}, "unknown class 'zz'"),
    ({7: 0.5}, "class index 7"),
    ({"a": 2.0}, r"target\['a'\]"),
    ({"a": float("nan")}, r"target\['a'\]"),
    ("balanced", "'balanced'"),
    (["x"] * 5, "numbers"),
])
def test_bad_targets(table, target, match):
    with pytest.raises(ValueError, match=match):
        resolve_target(target, table)


def test_bad_rare_parameters(table):
    with pytest.raises(ValueError, match="rare_value"):
        resolve_target("rare_boost", table, rare_value=1.2)
    with pytest.raises(ValueError, match="rare_threshold"):
        resolve_target("rare_boost", table, rare_threshold=0)


def test_feasible_target_gives_no_warning(table):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_feasibility(np.array([0.6, 0.5, 0.0, 1.0, 0.3]), table) == []


def test_absent_and_always_present_classes_warn(table):
    with pytest.warns(FeasibilityWarning) as record:
        check_feasibility(np.array([0.6, 0.5, 0.2, 0.8, 0.3]), table)
    text = " ".join(str(r.message) for r in record)
    assert "'c' (target 0.2)" in text and "never present" in text and "fraction 0" in text
    assert "'d' (target 0.8)" in text and "every sample" in text and "fraction 1" in text


def test_classes_that_always_occur_together_warn_with_nearest_fraction():
    rng = np.random.default_rng(0)
    y = (rng.random((50, 4)) < 0.4).astype(np.uint8)
    y[:, 2] = y[:, 0]  # classes 0 and 2 always together
    y[0, 1] = y[1, 1] = 1
    y[0, 3] = 0
    y[1, 3] = 1
    table = PatternTable.from_labels(y, class_names=["w", "x", "y", "z"])
    target = np.array([0.2, 0.5, 0.6, 0.5])
    with pytest.warns(FeasibilityWarning, match=r"'w' \(target 0.2\), 'y' \(target 0.6\).*0.4"):
        check_feasibility(target, table)
    with pytest.warns(FeasibilityWarning, match="common fraction 0.5"):
        check_feasibility(target, table, class_weights=[1, 1, 3, 1])  # (0.2 + 3 * 0.6) / 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_feasibility(np.array([0.3, 0.5, 0.3, 0.5]), table)


def test_identical_columns_against_dense_reference():
    rng = np.random.default_rng(3)
    for trial in range(20):
        y = (rng.random((30, 8)) < 0.5).astype(np.uint8)
        y[:, rng.integers(0, 8)] = y[:, rng.integers(0, 8)]
        y[:, rng.integers(0, 8)] = y[:, rng.integers(0, 8)]
        table = PatternTable.from_labels(y)
        pats = table.patterns
        target = rng.random(8)
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            messages = check_feasibility(target, table)
        together = [m for m in messages if "occur together" in m]
        # dense reference: groups of equal, non-constant columns
        cols = {}
        for i in range(8):
            col = pats[:, i]
            if col.all() or not col.any():
                continue
            cols.setdefault(col.tobytes(), []).append(i)
        expected = [g for g in cols.values() if len(g) > 1]
        assert len(together) == len(expected)
        for g in expected:
            assert any(all(f"'{i}'" in m for i in g) for m in together)


def _brute_named_targets(presence):
    """Independent reference: the named targets written out class by class."""
    present = [i for i, p in enumerate(presence) if p > 0]
    card = sum(presence)
    equal = [card / len(present) if p > 0 else 0.0 for p in presence]
    roots = [p ** 0.5 for p in presence]
    sqrt = [card * r / sum(roots[i] for i in present) if p > 0 else 0.0 for p, r in zip(presence, roots)]
    top = max(presence)
    max_ir = [max(p, top / 4) if p > 0 else 0.0 for p in presence]
    return {"equal": equal, "uniform": equal, "sqrt": sqrt, "smooth=0.5": sqrt, "smooth=1": list(presence),
            "max_ir=4": max_ir}


def test_named_imbalance_targets_match_a_reference():
    rng = np.random.default_rng(3)
    y = rng.random((4000, 7)) < [0.6, 0.3, 0.1, 0.05, 0.01, 0.002, 0.0]
    table = PatternTable.from_labels(y)
    presence = table.class_presence()
    for name, expected in _brute_named_targets(list(presence)).items():
        got = resolve_target(name, table)
        np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-15, err_msg=name)
    # equal and sqrt keep the mean label cardinality; max_ir=k bounds every IRLbl by k
    for name in ("equal", "sqrt", "smooth=0.3"):
        assert resolve_target(name, table).sum() == pytest.approx(presence.sum())
    d = resolve_target("max_ir=4", table)
    assert (d[presence > 0].max() / d[presence > 0]).max() <= 4 + 1e-12
    # never "every class in every sample"
    assert not np.any(resolve_target("uniform", table) == 1.0)


def test_equal_target_clips_at_one_and_keeps_the_cardinality():
    # two classes in every sample: the equal level (2.1 / 3) never exceeds 1
    y = np.zeros((100, 3), dtype=bool)
    y[:, 0] = True
    y[:, 1] = True
    y[:10, 2] = True
    table = PatternTable.from_labels(y)
    d = resolve_target("equal", table)
    assert d.max() <= 1.0 and d.sum() == pytest.approx(2.1)


@pytest.mark.parametrize("bad", ["smooth=2", "smooth=-1", "smooth=x", "max_ir=0.5", "max_ir=", "equal=1", "Equal"])
def test_bad_named_targets_raise(bad):
    table = PatternTable.from_labels(np.eye(3, dtype=bool))
    with pytest.raises(ValueError, match=re.escape(repr(bad)) if "=" not in bad else "target"):
        resolve_target(bad, table)


# -- targets written as text ---------------------------------------------------------------


def test_parse_target_text_forms(tmp_path):
    from cobalance.targets import parse_target_text

    names = ["cat", "dog", "bird"]
    assert parse_target_text(" equal ", names) == "equal"
    assert parse_target_text("smooth=0.5", names) == "smooth=0.5"
    assert parse_target_text("dog=0.4, bird=0.3", names) == {"dog": 0.4, "bird": 0.3}
    assert parse_target_text("0.5,0.25,1", names) == [0.5, 0.25, 1.0]
    path = tmp_path / "t.json"
    path.write_text('{"cat": 0.2}')
    assert parse_target_text(str(path), names) == {"cat": 0.2}
    for text, fragment in [("dog=2", "must be in [0, 1]"), ("cow=0.1", "unknown class 'cow'"),
                           ("dog=0.1,dog=0.2", "given twice"), ("0.5,0.5", "lists 2 fractions"),
                           ("balanced", "a target must be"), ("dog=", "expected a fraction")]:
        with pytest.raises(ValueError, match=re.escape(fragment)):
            parse_target_text(text, names)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="cannot read target file"):
        parse_target_text(str(path), names)
    with pytest.raises(FileNotFoundError):
        parse_target_text(str(tmp_path / "missing.json"), names)
