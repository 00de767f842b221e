import json

import numpy as np
import pytest

from cobalance import PatternTable, Plan, Report
from cobalance.report import imbalance_measures


@pytest.fixture
def setup():
    rng = np.random.default_rng(0)
    y = (rng.random((300, 6)) < [0.9, 0.5, 0.3, 0.1, 0.05, 0.6]).astype(np.uint8)
    table = PatternTable.from_labels(y, class_names=[f"c{i}" for i in range(6)])
    copies = rng.integers(0, 6, 300)
    plan = Plan.from_copies(copies, table)
    target = np.array([1.0, 0.5, 0.5, 0.3, 0.3, 0.6])
    return y, table, plan, target


def test_report_figures_against_dense_reference(setup):
    y, table, plan, target = setup
    r = Report.from_plan(table, plan, target)
    c = plan.copies.astype(np.float64)
    np.testing.assert_allclose(r.before, y.mean(axis=0))
    np.testing.assert_allclose(r.after, c @ y / c.sum())
    np.testing.assert_array_equal(r.target, target)
    assert r.n_samples == 300 and r.n_samples_out == int(c.sum())
    assert r.n_duplicates == int(np.sum(np.maximum(c - 1, 0)))
    assert r.n_dropped == int(np.sum(c == 0))
    assert r.max_copies == int(c.max())
    assert r.effective_size == pytest.approx(c.sum() ** 2 / np.sum(c ** 2))
    for i in range(6):
        ci = c[y[:, i] == 1]
        assert r.class_effective_size[i] == pytest.approx(ci.sum() ** 2 / np.sum(ci ** 2))
    assert r.l2_error == pytest.approx(np.linalg.norm(c @ y / c.sum() - target))
    assert r.max_abs_error == pytest.approx(np.max(np.abs(c @ y / c.sum() - target)))
    assert r.max_abs_error_before == pytest.approx(np.max(np.abs(y.mean(axis=0) - target)))


def test_identity_plan_has_full_effective_size(setup):
    _, table, _, target = setup
    r = Report.from_plan(table, Plan.identity(table.n_samples), target)
    assert r.effective_size == pytest.approx(table.n_samples)
    np.testing.assert_allclose(r.after, r.before)
    assert r.n_duplicates == 0 and r.n_dropped == 0 and r.max_copies == 1


def test_to_dict_is_json_and_markdown_lists_every_class(setup):
    _, table, plan, target = setup
    r = Report.from_plan(table, plan, target, extra={"loss": np.float64(0.5), "history": np.ones(2)})
    d = json.loads(json.dumps(r.to_dict()))
    assert [c["name"] for c in d["classes"]] == table.class_names
    assert d["extra"] == {"loss": 0.5, "history": [1.0, 1.0]}
    assert d["n_samples_out"] == plan.n_samples_out
    md = r.to_markdown()
    for i, name in enumerate(table.class_names):
        assert f"| {name} | {100 * r.before[i]:.1f} | {100 * target[i]:.1f} | {100 * r.after[i]:.1f} |" in md
    assert f"{plan.n_duplicates} duplicates added" in md


def test_report_rejects_mismatched_sizes(setup):
    _, table, plan, target = setup
    with pytest.raises(ValueError, match="target must have shape"):
        Report.from_plan(table, plan, target[:3])
    with pytest.raises(ValueError, match="plan has 5 samples"):
        Report.from_plan(table, Plan.identity(5), target)


def test_plot_and_save_png(setup, tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _, table, plan, target = setup
    r = Report.from_plan(table, plan, target)
    ax = r.plot()
    heights = [p.get_height() for p in ax.patches]
    assert len(heights) == 3 * 6
    np.testing.assert_allclose(heights[:6], 100 * r.before)
    np.testing.assert_allclose(heights[12:], 100 * r.after)
    plt.close(ax.figure)
    path = tmp_path / "report.png"
    r.save_png(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.png"]


# -- multi-label imbalance measures (Charte et al. 2014, 2015) ------------------------------


def _charte_reference(y, copies):
    """The measures as the papers define them, on the explicit balanced label matrix."""
    balanced = np.repeat(y, copies, axis=0).astype(bool)
    counts = balanced.sum(axis=0)
    present = counts > 0
    irlbl = np.full(y.shape[1], np.nan)
    irlbl[present] = counts.max() / counts[present]
    ir = irlbl[present]
    mean_ir = ir.mean() if ir.size else np.nan
    cvir = np.std(ir, ddof=1) / mean_ir if ir.size > 1 else np.nan
    per_sample = []
    for row in balanced:
        labels = irlbl[row]
        if labels.size == 0:
            per_sample.append(0.0)
        else:
            per_sample.append(1.0 - np.prod(labels) ** (1.0 / labels.size) / labels.mean())
    return {"counts": counts, "irlbl": irlbl, "mean_ir": mean_ir,
            "max_ir": ir.max() if ir.size else np.nan, "cvir": cvir,
            "scumble": np.mean(per_sample) if per_sample else np.nan}


def _assert_measures(r, y, copies):
    names = r.class_names
    before = _charte_reference(y, np.ones(len(y), dtype=np.int64))
    after = _charte_reference(y, copies)
    for when, ref in [("before", before), ("after", after)]:
        np.testing.assert_array_equal(getattr(r, f"count_{when}"), ref["counts"])
        np.testing.assert_allclose(getattr(r, f"irlbl_{when}"), ref["irlbl"], rtol=1e-12)
        for key in ("mean_ir", "max_ir", "cvir", "scumble"):
            assert getattr(r, f"{key}_{when}") == pytest.approx(ref[key], rel=1e-10, abs=1e-12, nan_ok=True), key
    lost = [names[i] for i in range(len(names)) if before["counts"][i] > 0 and after["counts"][i] == 0]
    assert r.labels_lost == lost and r.n_labels_lost == len(lost)


def test_imbalance_measures_against_brute_force(setup):
    y, table, plan, target = setup
    _assert_measures(Report.from_plan(table, plan, target), y, plan.copies)


def test_imbalance_measures_function_on_table_patterns(setup):
    y, table, plan, _ = setup
    indptr, indices = table.sparse_patterns()
    inverse = np.asarray(table.inverse)
    weights = np.bincount(inverse, weights=plan.copies, minlength=table.n_patterns)
    m = imbalance_measures(plan.copies @ y, indptr, indices, weights)
    ref = _charte_reference(y, plan.copies)
    np.testing.assert_allclose(m["irlbl"], ref["irlbl"], rtol=1e-12)
    for key in ("mean_ir", "max_ir", "cvir", "scumble"):
        assert m[key] == pytest.approx(ref[key], rel=1e-10, abs=1e-12), key
    m0 = imbalance_measures(table.class_counts(), indptr, indices, table.counts)
    assert m0["scumble"] == pytest.approx(_charte_reference(y, np.ones(len(y), dtype=int))["scumble"], rel=1e-10)


def test_plan_that_drops_every_sample_of_a_label(setup):
    y, table, _, target = setup
    copies = np.random.default_rng(1).integers(1, 4, len(y))
    copies[y[:, 4] == 1] = 0
    r = Report.from_plan(table, Plan.from_copies(copies, table), target)
    _assert_measures(r, y, copies)
    assert r.labels_lost == ["c4"] and r.n_labels_lost == 1
    assert np.isnan(r.irlbl_after[4]) and np.isfinite(r.irlbl_before[4])
    d = json.loads(json.dumps(r.to_dict(), allow_nan=False))
    assert d["classes"][4]["irlbl_after"] is None and d["classes"][4]["count_after"] == 0
    assert d["labels_lost"] == ["c4"] and d["n_labels_lost"] == 1
    assert "- labels lost: 1 (c4)" in r.to_markdown()


def test_samples_without_labels_count_as_zero_scumble():
    rng = np.random.default_rng(2)
    y = (rng.random((60, 5)) < [0.6, 0.4, 0.2, 0.1, 0.3]).astype(np.uint8)
    y[::4] = 0  # a quarter of the samples carry no label
    table = PatternTable.from_labels(y, class_names=list("abcde"))
    copies = rng.integers(0, 4, 60)
    copies[::4] = 5  # lean on the empty ones
    r = Report.from_plan(table, Plan.from_copies(copies, table), np.full(5, 0.5))
    _assert_measures(r, y, copies)
    assert r.scumble_after < r.scumble_before


def test_identity_plan_leaves_the_measures_unchanged(setup):
    y, table, _, target = setup
    r = Report.from_plan(table, Plan.identity(table.n_samples), target)
    _assert_measures(r, y, np.ones(len(y), dtype=np.int64))
    np.testing.assert_array_equal(r.count_after, r.count_before)
    np.testing.assert_array_equal(r.irlbl_after, r.irlbl_before)
    for key in ("mean_ir", "max_ir", "cvir", "scumble"):
        assert getattr(r, f"{key}_after") == pytest.approx(getattr(r, f"{key}_before"), rel=1e-12)
    assert r.labels_lost == [] and r.n_labels_lost == 0


def test_hand_computed_example():
    # samples {A}, {A,B}, {A,B}, {A,C}, {}: counts A=4, B=2, C=1 -> IRLbl 1, 2, 4
    #   MeanIR = 7/3, MaxIR = 4
    #   sample std (ddof=1): squares of 1-7/3, 2-7/3, 4-7/3 = (16 + 1 + 25)/9 = 42/9, / 2 = 7/3
    #   CVIR = sqrt(7/3) / (7/3) = sqrt(3/7) = 0.65465
    #   SCUMBLE_i: {A} 0, {A,B} 1 - sqrt(2)/1.5 = 0.05719 (twice), {A,C} 1 - 2/2.5 = 0.2, {} 0
    #   SCUMBLE = (2 (1 - 2 sqrt(2)/3) + 0.2) / 5 = 0.06288
    # copies 2, 0, 1, 0, 3 -> {A}x2, {A,B}, {}x3: counts A=3, B=1, C=0 (C lost)
    #   IRLbl 1, 3, NaN; MeanIR 2, MaxIR 3, CVIR sqrt(2)/2
    #   SCUMBLE = (1 - sqrt(3)/2) / 6 = 0.02233 (the {A,B} sample, of 6)
    y = np.array([[1, 0, 0], [1, 1, 0], [1, 1, 0], [1, 0, 1], [0, 0, 0]], dtype=np.uint8)
    table = PatternTable.from_labels(y, class_names=["A", "B", "C"])
    r = Report.from_plan(table, Plan.from_copies(np.array([2, 0, 1, 0, 3]), table), np.full(3, 0.5))
    np.testing.assert_array_equal(r.count_before, [4, 2, 1])
    np.testing.assert_array_equal(r.count_after, [3, 1, 0])
    np.testing.assert_allclose(r.irlbl_before, [1, 2, 4])
    np.testing.assert_allclose(r.irlbl_after, [1, 3, np.nan])
    assert r.mean_ir_before == pytest.approx(7 / 3) and r.max_ir_before == 4
    assert r.cvir_before == pytest.approx(np.sqrt(3 / 7))
    assert r.scumble_before == pytest.approx((2 * (1 - 2 * np.sqrt(2) / 3) + 0.2) / 5)
    assert r.mean_ir_after == pytest.approx(2) and r.max_ir_after == 3
    assert r.cvir_after == pytest.approx(np.sqrt(2) / 2)
    assert r.scumble_after == pytest.approx((1 - np.sqrt(3) / 2) / 6)
    assert r.labels_lost == ["C"]
    md = r.to_markdown()
    assert "- mean imbalance ratio (MeanIR): 2.33 -> 2.00, MaxIR 4.00 -> 3.00, CVIR 0.655 -> 0.707, " \
           "SCUMBLE 0.0629 -> 0.0223" in md
    assert "| C | 20.0 | 50.0 | 0.0 |" in md and "| 4.00 | n/a |" in md


def test_to_dict_is_strict_json_and_markdown_has_the_imbalance_lines(setup):
    _, table, plan, target = setup
    r = Report.from_plan(table, plan, target)
    d = json.loads(json.dumps(r.to_dict(), allow_nan=False))
    for i, c in enumerate(d["classes"]):
        assert c["count_before"] == int(r.count_before[i]) and c["count_after"] == int(r.count_after[i])
        assert c["irlbl_before"] == pytest.approx(r.irlbl_before[i])
        assert c["irlbl_after"] == pytest.approx(r.irlbl_after[i])
    for key in ("mean_ir", "max_ir", "cvir", "scumble"):
        for when in ("before", "after"):
            assert d[f"{key}_{when}"] == pytest.approx(getattr(r, f"{key}_{when}"))
    assert d["labels_lost"] == [] and d["n_labels_lost"] == 0
    md = r.to_markdown()
    assert "| effective size | IRLbl before | IRLbl after |" in md
    assert (f"- mean imbalance ratio (MeanIR): {r.mean_ir_before:.2f} -> {r.mean_ir_after:.2f}, "
            f"MaxIR {r.max_ir_before:.2f} -> {r.max_ir_after:.2f}, CVIR {r.cvir_before:.3f} -> "
            f"{r.cvir_after:.3f}, SCUMBLE {r.scumble_before:.4f} -> {r.scumble_after:.4f}") in md
    assert "- labels lost: 0\n" in md


def _hand_report(n, **kwargs):
    return Report(class_names=[f"k{i}" for i in range(n)], before=np.full(n, 0.5), target=np.full(n, 0.5),
                  after=np.full(n, 0.5), n_samples=10, n_samples_out=10, n_duplicates=0, n_dropped=0,
                  max_copies=1, effective_size=10.0, class_effective_size=np.full(n, 5.0), **kwargs)


def test_report_built_by_hand_without_counts_has_no_measures():
    r = _hand_report(3)
    for key in ("irlbl_before", "irlbl_after", "mean_ir_before", "mean_ir_after", "max_ir_before", "cvir_after",
                "scumble_before", "scumble_after", "labels_lost", "n_labels_lost"):
        assert getattr(r, key) is None, key
    d = json.loads(json.dumps(r.to_dict(), allow_nan=False))
    assert d["mean_ir_before"] is None and d["labels_lost"] is None and d["classes"][0]["irlbl_after"] is None
    md = r.to_markdown()
    assert "IRLbl" not in md and "MeanIR" not in md and "labels lost" not in md


def test_many_lost_labels_are_truncated_in_markdown():
    r = _hand_report(13, count_before=np.arange(1, 14), count_after=[5] + [0] * 12)
    assert r.n_labels_lost == 12 and r.labels_lost == [f"k{i}" for i in range(1, 13)]
    assert "- labels lost: 12 (k1, k2, k3, k4, k5, k6, k7, k8, k9, k10, ...)\n" in r.to_markdown()
    # a single class left: CVIR is undefined (sample std of one value), SCUMBLE not given
    assert np.isnan(r.cvir_after) and r.to_dict()["cvir_after"] is None and r.to_dict()["scumble_after"] is None
    assert "CVIR" in r.to_markdown() and "SCUMBLE " in r.to_markdown()


def test_table_without_labels_gives_undefined_measures():
    y = np.zeros((4, 2), dtype=np.uint8)
    table = PatternTable.from_labels(y)
    r = Report.from_plan(table, Plan.identity(4), np.zeros(2))
    assert np.all(np.isnan(r.irlbl_before)) and np.isnan(r.mean_ir_before) and r.scumble_before == 0.0
    json.dumps(r.to_dict(), allow_nan=False)


def test_imbalance_measures_rejects_inconsistent_input():
    indptr, indices = np.array([0, 1, 3]), np.array([0, 0, 1])
    with pytest.raises(ValueError, match="label 1 has count 0"):
        imbalance_measures([3, 0], indptr, indices, [1, 2])
    # a pattern nobody carries may hold an absent label
    assert imbalance_measures([3, 0], indptr, indices, [3, 0])["scumble"] == 0.0
    with pytest.raises(ValueError, match="outside"):
        imbalance_measures([3, 1], indptr, np.array([0, 0, 2]), [1, 2])
    with pytest.raises(ValueError, match="pattern_indptr"):
        imbalance_measures([3, 1], indptr[:2], indices, [1, 2])
    with pytest.raises(ValueError, match="non-negative"):
        imbalance_measures([3, 1], indptr, indices, [1, -2])


def test_plot_has_an_irlbl_row(setup):
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    y, table, _, target = setup
    copies = np.ones(len(y), dtype=np.int64)
    copies[y[:, 4] == 1] = 0
    r = Report.from_plan(table, Plan.from_copies(copies, table), target)
    ax = r.plot()
    axes = ax.figure.axes
    assert len(axes) == 2 and axes[0] is ax and axes[1].get_yscale() == "log"
    tops = [p.get_y() + p.get_height() for p in axes[1].patches]
    np.testing.assert_allclose(tops[:6], r.irlbl_before)
    np.testing.assert_allclose(tops[6:], np.where(np.isnan(r.irlbl_after), 0.5, r.irlbl_after))
    plt.close(ax.figure)
    fig, given = plt.subplots()
    assert r.plot(given) is given and len(fig.axes) == 1 and len(given.patches) == 18
    assert given.get_title() == f"MeanIR {r.mean_ir_before:.2f} -> {r.mean_ir_after:.2f}"
    plt.close(fig)


def test_plan_that_drops_everything_loses_every_label(setup):
    y, table, _, target = setup
    r = Report.from_plan(table, Plan.from_copies(np.zeros(len(y), dtype=np.int64), table), target)
    assert r.labels_lost == table.class_names and np.all(np.isnan(r.irlbl_after))
    assert np.isnan(r.mean_ir_after) and np.isnan(r.scumble_after)
    d = json.loads(json.dumps(r.to_dict(), allow_nan=False))
    assert d["mean_ir_after"] is None and d["scumble_after"] is None and d["n_labels_lost"] == 6
    assert "-> n/a, MaxIR" in r.to_markdown()
