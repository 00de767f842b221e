"""The multi-label classification study: metrics against numpy references, the protocol
(resampling on the training part only), the files it writes and its command line."""

import json

import numpy as np
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("scipy")

from cobalance import multilabel_study as study  # noqa: E402
from cobalance.cli import main as cli_main  # noqa: E402


def tiny_npz(path, n=90, f=6, c=4, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, f)).astype(np.float32)
    logits = x[:, :c] * 2 + rng.normal(scale=0.5, size=(n, c)) - np.array([0.0, 0.8, 1.5, 2.2])
    y = (logits > 0).astype(np.uint8)
    y[:3, :] = 1  # every label present
    np.savez(path, X=x, Y=y, labels=np.array([f"l{i}" for i in range(c)]))
    return path


def test_fold_metrics_match_numpy():
    rng = np.random.default_rng(1)
    y = rng.random((40, 5)) < 0.3
    y[0] = True
    pred = rng.random((40, 5)) < 0.3
    scores = rng.random((40, 5))
    rare = np.array([3, 4])
    got = study.fold_metrics(y, pred, scores, rare)
    tp = (y & pred).sum(0)
    fp = (~y & pred).sum(0)
    fn = (y & ~pred).sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), 0.0)
    assert got["macro_f1"] == pytest.approx(f1.mean())
    assert got["rare_f1"] == pytest.approx(f1[rare].mean())
    assert got["micro_f1"] == pytest.approx(2 * tp.sum() / (2 * tp.sum() + fp.sum() + fn.sum()))
    assert got["hamming"] == pytest.approx(np.mean(y != pred))

    # ROC AUC by its definition: the share of (positive, negative) pairs ranked right
    def auc(t, s):
        pos, neg = s[t], s[~t]
        return np.mean((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :]))

    assert got["macro_auc"] == pytest.approx(np.mean([auc(y[:, i], scores[:, i]) for i in range(5)]))


def test_resampling_touches_the_training_part_only(tmp_path, monkeypatch):
    data = study.load_dataset(tiny_npz(tmp_path / "tiny.npz"))
    seen = []
    real = study._plan_of

    def spy(arm, y, seed):
        plan = real(arm, y, seed)
        seen.append((arm, y.shape[0], None if plan is None else plan.n_samples_out))
        return plan

    monkeypatch.setattr(study, "_plan_of", spy)
    res = study.run_dataset(data, arms=["none", "ml_ros", "cobalance_25"], classifiers=["logreg"], folds=3,
                            seeds=[0])
    sizes = {(a, n) for a, n, _ in seen}
    # every plan is fitted on a training part (about 2/3 of the 90 samples), never on all
    assert all(55 <= n <= 65 for _, n in sizes)
    for arm, n, out in seen:
        if arm == "cobalance_25":
            assert out == round(1.25 * n)
        if arm == "ml_ros":
            assert n < out <= round(1.25 * n)
    ess = res["values"]["logreg"]["cobalance_25"]["train_ess"]
    assert len(ess) == 3 and all(0 < v <= 1.25 for v in ess)
    assert res["values"]["logreg"]["none"]["train_ess"] == [1.0, 1.0, 1.0]


def test_study_writes_its_files(tmp_path):
    paths = [tiny_npz(tmp_path / "a.npz", seed=2), tiny_npz(tmp_path / "b.npz", seed=3)]
    out = tmp_path / "out"
    code = cli_main(["experiment", "multilabel", "--data", str(paths[0]), "--data", str(paths[1]), "--out", str(out),
                     "--folds", "2", "--seeds", "0", "--arms", "none,class_weight,repeat_factor,cobalance",
                     "--quiet"])
    assert code == 0
    doc = json.loads((out / "results.json").read_text())
    assert set(doc["datasets"]) == {"a", "b"}
    logreg = doc["summary"]["logreg"]["macro_f1"]
    assert set(logreg["per_set"]["a"]) == {"none", "class_weight", "repeat_factor", "cobalance"}
    assert "class_weight" not in doc["summary"]["knn"]["macro_f1"]["per_set"]["a"]  # k-NN has no loss to weigh
    for row in logreg["per_set"].values():
        for arm, e in row.items():
            assert 0 <= e["mean"] <= 1
    assert set(logreg["average_rank"]) == {"none", "class_weight", "repeat_factor", "cobalance"}
    csv = (out / "results.csv").read_text().splitlines()
    assert csv[0] == "dataset,classifier,arm,metric,mean,std,p_vs_none" and len(csv) > 10
    assert "## logreg: macro_f1" in (out / "tables.md").read_text()
    assert (out / "summary.png").read_bytes()[:4] == b"\x89PNG"
    assert not list(out.glob("*.tmp"))


def test_bad_input_exits_2_naming_the_problem(tmp_path, capsys):
    good = tiny_npz(tmp_path / "g.npz")
    np.savez(tmp_path / "noy.npz", X=np.zeros((20, 2)))
    np.savez(tmp_path / "bady.npz", X=np.zeros((20, 2)), Y=np.full((20, 2), 2))
    cases = [
        (["--data", str(tmp_path / "missing.npz")], "does not exist"),
        (["--data", str(tmp_path / "noy.npz")], "has no array 'Y'"),
        (["--data", str(tmp_path / "bady.npz")], "Y must hold 0/1"),
        (["--data", str(good), "--arms", "none,magic"], "'magic'"),
        (["--data", str(good), "--folds", "1"], "folds must be an integer >= 2"),
    ]
    for extra, fragment in cases:
        code = cli_main(["experiment", "multilabel", "--out", str(tmp_path / "o"), "--quiet", *extra])
        err = capsys.readouterr().err
        assert code == 2 and fragment in err, (extra, err)
