import json

import numpy as np
import pytest

from cobalance import PatternTable, Plan, Report


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
