"""The fundus study's seams: the runner's result files, the run's PlanSampler order,
Table 1 against the plans, the one target parser, the shrunk folder MaskFolder reads."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("kornia")
PIL = pytest.importorskip("PIL.Image")
pytest.importorskip("matplotlib")

from cobalance import PatternTable  # noqa: E402
from cobalance.folders import MaskFolder  # noqa: E402
from cobalance.segmentation import SegmentationFolder  # noqa: E402
from cobalance.training import experiment as ex  # noqa: E402
from cobalance.training import run as run_module  # noqa: E402
from cobalance.training import runner  # noqa: E402
from cobalance.training.arms import arm_plan, study_target  # noqa: E402
from cobalance.training.config import ExperimentConfig, derived_seed  # noqa: E402
from cobalance.training.data import StudyTiles  # noqa: E402
from test_training import CLASSES, _synthetic_folder, spy_on_training  # noqa: E402

TILE = 32


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return _synthetic_folder(tmp_path_factory.mktemp("data") / "synth")


def _config(data, out, **kw):
    base = dict(data=str(data), out=str(out), tile=TILE, folds=2, epochs=1, batch_size=4, model="unet",
                encoder="conv-tiny", arms=["unbalanced"], progress=False, seed=0, threads=1)
    base.update(kw)
    return ExperimentConfig(**base)


def _reference_presence(root, classes):
    """Per tile (image order, then row-major tiles) the classes with a pixel: read with PIL."""
    rows, image_ids = [], sorted(p.stem for p in (root / "images").iterdir())
    for stem in image_ids:
        planes = []
        for c in classes:
            path = root / "masks" / c / f"{stem}.png"
            planes.append(np.asarray(PIL.open(path)) > 0 if path.exists() else np.zeros((64, 64), bool))
        for y in range(0, 64, TILE):
            for x in range(0, 64, TILE):
                rows.append([p[y:y + TILE, x:x + TILE].any() for p in planes])
    image_of = np.repeat(np.arange(len(image_ids)), (64 // TILE) ** 2)
    return np.array(rows, dtype=bool), image_of, image_ids


def test_table1_and_plan_figures_equal_the_plans_copies(synthetic, tmp_path):
    arms = ["unbalanced", "balanced_noreg", "rfs"]
    config = _config(synthetic, tmp_path / "r", arms=arms)
    result = runner.run_experiment(config)
    classes = result["classes"]
    assert sorted(classes) == sorted(CLASSES)
    presence, image_of, image_ids = _reference_presence(synthetic, classes)
    parsed = ExperimentConfig(**{**config.to_dict(), "target": study_target(config.target, classes)})
    rows = {r["set"]: r for r in result["table1"]["rows"]}
    for c, name in enumerate(classes):
        assert rows["all tiles"][name] == pytest.approx(presence[:, c].mean(), abs=1e-12)
    for arm in arms:
        sizes, after = [], []
        for fold, r in enumerate(result["runs"][arm]):
            train = ~np.isin(np.asarray(image_ids)[image_of], r["test_images"])
            p = presence[train]
            plan, _, _ = arm_plan(arm, PatternTable.from_labels(p, class_names=classes), parsed, fold)
            copies = plan.copies
            # brute force from the per-tile copies
            assert r["plan_size"] == copies.sum()
            assert r["plan_duplicates"] == np.maximum(copies - 1, 0).sum()
            assert r["plan_dropped"] == np.count_nonzero(copies == 0)
            assert r["plan_max_copies"] == copies.max()
            assert r["plan_effective_size"] == pytest.approx(copies.sum() ** 2 / (copies ** 2).sum())
            np.testing.assert_allclose(r["presence_before"], p.mean(axis=0), rtol=0, atol=1e-12)
            expected = (p * copies[:, None]).sum(axis=0) / copies.sum()
            np.testing.assert_allclose(r["presence"], expected, rtol=0, atol=1e-12)
            sizes.append(copies.sum())
            after.append(expected)
        assert rows[arm]["size"] == pytest.approx(np.mean(sizes))
        for c, name in enumerate(classes):
            assert rows[arm][name] == pytest.approx(np.mean([a[c] for a in after]), abs=1e-12)
    assert result["runs"]["balanced_noreg"][0]["plan_duplicates"] > 0  # the check saw duplicates


class _Recorder:
    """A dataset that records the items asked of it, in order."""

    def __init__(self, dataset):
        self.dataset, self.asked = dataset, []

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, k):
        self.asked.append(int(k))
        return self.dataset[k]


@pytest.mark.parametrize("extra", [0, 3], ids=["one-pass", "passes"])
def test_run_visits_the_plan_in_planSampler_order(synthetic, tmp_path, monkeypatch, extra):
    arm, fold, epochs = "balanced_noreg", 0, 2
    folder = SegmentationFolder(synthetic, tile=TILE)
    tiles = StudyTiles.scan(folder)
    recorder = _Recorder(folder)
    tiles.items = recorder
    image_rows = np.unique(tiles.image_of)
    train = np.flatnonzero(np.isin(tiles.image_of, image_rows[:4]))
    test = np.flatnonzero(~np.isin(tiles.image_of, image_rows[:4]))
    classes = tiles.class_names
    table = PatternTable.from_labels(tiles.presence[train], class_names=classes)
    probe = _config(synthetic, tmp_path, arms=[arm], epochs=epochs, target=study_target("rare_boost", classes))
    n_plan = arm_plan(arm, table, probe, fold)[0].n_samples_out
    # the order does not depend on augmentation; without it the test runs in seconds
    config = _config(synthetic, tmp_path, arms=[arm], epochs=epochs, epoch_size=n_plan + extra, augment=False,
                     target=study_target("rare_boost", classes))
    plans = []
    real_arm_plan = run_module.arm_plan

    def keep_plan(*args, **kwargs):
        plans.append(real_arm_plan(*args, **kwargs)[0])
        return plans[-1], *real_arm_plan(*args, **kwargs)[1:]

    monkeypatch.setattr(run_module, "arm_plan", keep_plan)
    split = run_module.FoldSplit(train=train, test=test, table=table)
    run_module.train_arm_fold(arm, fold, tiles, split, config, tmp_path / "runs", tmp_path / "runs" / "r.json")

    # Reference: torch's DistributedSampler over the plan's positions (PlanSampler's contract),
    # one of its epochs per pass, the last pass cut to the epoch size.
    indices = plans[0].indices()
    assert indices.size == n_plan and plans[0].n_duplicates > 0
    seed = derived_seed(config, "order", arm, fold)
    passes = -(-(n_plan + extra) // n_plan)
    expected = []
    for epoch in range(epochs):
        positions = []
        for j in range(passes):
            reference = torch.utils.data.DistributedSampler(range(n_plan), num_replicas=1, rank=0, seed=seed)
            reference.set_epoch(epoch * passes + j)
            positions += list(reference)
        expected += train[indices[positions[: n_plan + extra]]].tolist() + test.tolist()
    assert recorder.asked == expected


def test_runner_resumes_from_result_files(synthetic, tmp_path, monkeypatch):
    config = _config(synthetic, tmp_path / "r", arms=["unbalanced", "rfs"])
    runner.run_experiment(config)
    trained = spy_on_training(monkeypatch)
    # A finished result file is taken as it is: the tables show what it holds.
    path = tmp_path / "r" / "runs" / "rfs" / "fold1.json"
    held = json.loads(path.read_text())
    held["best_vdice"] = 0.123456
    path.write_text(json.dumps(held))
    again = runner.run_experiment(config)
    assert trained == []
    assert again["table2"]["cells"]["rfs"]["vDice"]["runs"][1] == 0.123456
    # One of another version, or cut short, is trained again; the others are kept.
    held["version"] = 99
    path.write_text(json.dumps(held))
    short = tmp_path / "r" / "runs" / "unbalanced" / "fold0.json"
    cut = json.loads(short.read_text())
    cut["history"] = []
    short.write_text(json.dumps(cut))
    third = runner.run_experiment(config)
    assert sorted(trained) == [("rfs", 1), ("unbalanced", 0)]
    assert third["table2"]["cells"]["rfs"]["vDice"]["runs"][1] != 0.123456
    assert json.loads(path.read_text())["version"] != 99


def test_target_text_is_parsed_once_against_the_classes(synthetic, tmp_path, capsys):
    # the library's parser: CLASS=FRACTION against the folder's classes, stored parsed
    result = runner.run_experiment(_config(synthetic, tmp_path / "ok", target="rare=0.5,mid=0.4"))
    assert result["config"]["target"] == {"rare": 0.5, "mid": 0.4}
    with pytest.raises(ValueError, match="unknown class 'nope'; the classes are big, mid, rare"):
        runner.run_experiment(_config(synthetic, tmp_path / "bad", target="nope=0.5"))
    assert not (tmp_path / "bad").exists()  # refused before anything is written
    # the command line: one error path, cobalance.cli.main's (one line, exit 2)
    code = ex.main(["--data", str(synthetic), "--out", str(tmp_path / "cli"), "--model", "unet",
                    "--encoder", "conv-tiny", "--tile", "32", "--target", "rare=2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("cobalance: error:") and "'rare'" in err[0]


def test_downscaled_folder_is_read_by_mask_folder(synthetic, tmp_path):
    dst = ex.downscale_folder(synthetic, tmp_path / "small", 2)
    source, small = MaskFolder(synthetic), MaskFolder(dst)
    assert small.layout == "binary_folders" and small.class_names == source.class_names
    assert small.image_ids == source.image_ids
    for i in range(source.n_images):
        # a class without a mask file stays without one
        assert [p is None for p in small.mask_paths(i)] == [p is None for p in source.mask_paths(i)]
        full = source.load_mask(i).astype(bool)
        pooled = full.reshape(source.n_classes, 32, 2, 32, 2).any(axis=(2, 4))
        np.testing.assert_array_equal(small.load_mask(i).astype(bool), pooled)
    labels = tmp_path / "labels"
    (labels / "images").mkdir(parents=True)
    (labels / "masks").mkdir()
    PIL.fromarray(np.zeros((8, 8, 3), np.uint8)).save(labels / "images" / "a.png")
    PIL.fromarray(np.zeros((8, 8), np.uint8)).save(labels / "masks" / "a.png")
    (labels / "classes.txt").write_text("bg\n")
    with pytest.raises(ValueError, match="holds label maps"):
        ex.downscale_folder(labels, tmp_path / "nope", 2)
    with pytest.raises(ValueError, match="factor must be an integer >= 2"):
        ex.downscale_folder(synthetic, tmp_path / "nope", 1)


def test_other_layouts_through_mask_folder_options(synthetic, tmp_path):
    # Differently named files in other folders, paired by a stem key, and a valid region
    # covering the left half of every image: only the left column of tiles is kept.
    root = tmp_path / "drive-like"
    for sub in ["img", "fov"] + [f"lesions/{c}" for c in CLASSES]:
        (root / sub).mkdir(parents=True)
    fov = np.zeros((64, 64), dtype=bool)
    fov[:, :32] = True
    for image in sorted((synthetic / "images").iterdir()):
        (root / "img" / f"{image.stem}_image.png").write_bytes(image.read_bytes())
        PIL.fromarray(fov).save(root / "fov" / f"{image.stem}_fov.png")
        for c in CLASSES:
            mask = synthetic / "masks" / c / image.name
            if mask.exists():
                (root / "lesions" / c / f"{image.stem}_mask.png").write_bytes(mask.read_bytes())
    options = dict(image_dir="img", mask_dir="lesions", stem_key=r"^(img\d+)_", valid_dir="fov", min_valid=0.5)
    result = runner.run_experiment(_config(root, tmp_path / "out", **options))
    classes = result["classes"]
    presence, image_of, _ = _reference_presence(synthetic, classes)
    left = np.tile([True, False], presence.shape[0] // 2)  # tiles (y, x): x = 0 first in each row
    rows = {r["set"]: r for r in result["table1"]["rows"]}
    assert rows["all tiles"]["size"] == np.count_nonzero(left)
    for c, name in enumerate(classes):
        assert rows["all tiles"][name] == pytest.approx(presence[left, c].mean(), abs=1e-12)
    with pytest.raises(ValueError, match="valid_dir and min_valid apply with downscale=1 only"):
        runner.run_experiment(_config(root, tmp_path / "o2", downscale=2, **options))


def test_only_folds_trains_those_and_tables_cover_the_finished(synthetic, tmp_path, monkeypatch):
    trained = spy_on_training(monkeypatch)
    first = runner.run_experiment(_config(synthetic, tmp_path / "r", arms=["unbalanced", "rfs"], only_folds=[1]))
    assert sorted(trained) == [("rfs", 1), ("unbalanced", 1)]
    assert [r["fold"] for r in first["runs"]["unbalanced"]] == [1]
    assert first["table2"]["cells"]["rfs"]["vDice"]["n_runs"] == 1
    trained.clear()
    # The rest later, into the same folder (only_folds is not part of the configuration).
    second = runner.run_experiment(_config(synthetic, tmp_path / "r", arms=["unbalanced", "rfs"]))
    assert sorted(trained) == [("rfs", 0), ("unbalanced", 0)]
    assert [r["fold"] for r in second["runs"]["rfs"]] == [0, 1]
    assert second["paired"]["best"]["cells"]["rfs"]["vDice"]["n_pairs"] == 2
    with pytest.raises(ValueError, match="only_folds"):
        _config(synthetic, tmp_path / "x", only_folds=[2]).validate()
    with pytest.raises(ValueError, match="only_folds"):
        _config(synthetic, tmp_path / "x", only_folds=[0, 0]).validate()


def test_class_weighted_arm_weights_the_loss_by_median_frequency(synthetic, tmp_path, monkeypatch):
    from cobalance.training import losses
    from cobalance.training.arms import presence_class_weights

    seen = []
    real = losses.bce_dice_loss

    def spy(logits, target, **kwargs):
        seen.append(kwargs.get("class_weights"))
        return real(logits, target, **kwargs)

    monkeypatch.setattr(losses, "bce_dice_loss", spy)
    config = _config(synthetic, tmp_path / "cw", arms=["class_weighted"], loss="bce_dice", folds=2)
    result = runner.run_experiment(config)
    run = result["runs"]["class_weighted"][0]
    weights = run["plan_info"]["class_weights"]
    assert len(weights) == len(CLASSES)
    # the plan is the training tiles as they are; the weights follow their presence
    assert run["plan_duplicates"] == 0 and run["plan_size"] == run["n_train_tiles"]
    np.testing.assert_allclose(weights, presence_class_weights(run["presence_before"]))
    assert seen and all(list(w) == weights for w in seen)


def test_presence_class_weights():
    from cobalance.training.arms import presence_class_weights

    w = presence_class_weights([0.5, 0.1, 0.25, 0.0])
    f = np.array([0.5, 0.1, 0.25])
    ref = np.median(f) / f
    ref = np.append(ref, ref.max())
    np.testing.assert_allclose(w, ref / ref.mean())
    assert w.mean() == pytest.approx(1.0)
    np.testing.assert_array_equal(presence_class_weights([0.0, 0.0]), [1.0, 1.0])
    for bad in ([], [1.5], [[0.1]], [np.nan]):
        with pytest.raises(ValueError, match="presence"):
            presence_class_weights(bad)


@pytest.mark.parametrize("seed", range(6))
def test_exact_tests_match_scipy(seed):
    stats = pytest.importorskip("scipy.stats")
    from cobalance.training.tables import sign_test, wilcoxon_exact

    rng = np.random.default_rng(seed)
    d = rng.normal(0.2, 1.0, size=3 + seed)  # no ties, no zeros: scipy's exact test applies
    assert wilcoxon_exact(d) == pytest.approx(stats.wilcoxon(d, method="exact").pvalue, rel=1e-12)
    k = int((d > 0).sum())
    assert sign_test(d) == pytest.approx(stats.binomtest(k, d.size).pvalue, rel=1e-12)
    assert wilcoxon_exact([]) == 1.0 and sign_test([0.0, 0.0]) == 1.0


def test_wilcoxon_with_ties_against_enumeration():
    from itertools import product

    from cobalance.training.tables import wilcoxon_exact

    d = np.array([0.5, -0.5, 1.0, 2.0, -2.0, 0.0, 3.0])
    nz = d[d != 0]
    absd = np.abs(nz)
    ranks = np.array([np.mean(np.flatnonzero(np.sort(absd) == a)) + 1 for a in absd])
    observed = ranks[nz > 0].sum()
    sums = np.array([sum(r for r, s in zip(ranks, signs) if s) for signs in product([0, 1], repeat=nz.size)])
    p = 2 * min(np.mean(sums <= observed + 1e-9), np.mean(sums >= observed - 1e-9))
    assert wilcoxon_exact(d) == pytest.approx(min(1.0, p), rel=1e-12)


def test_pool_pairs_runs_by_seed_and_fold(synthetic, tmp_path):
    from cobalance.training import pool

    arms = ["unbalanced", "rfs"]
    studies = [runner.run_experiment(_config(synthetic, tmp_path / f"s{seed}", arms=arms, seed=seed))
               for seed in (0, 1)]
    pooled = pool.pool_studies([str(tmp_path / "s0"), str(tmp_path / "s1")], str(tmp_path / "pooled"))
    assert pooled["seeds"] == [0, 1]
    assert sorted((r["seed"], r["fold"]) for r in pooled["runs"]["rfs"]) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    # The pairs by hand: each seed's runs against its own unbalanced run of the same fold.
    expected = []
    for seed, study in zip((0, 1), studies):
        base = {r["fold"]: r["history"] for r in study["runs"]["unbalanced"]}
        for r in study["runs"]["rfs"]:
            expected.append(max(h["vdice"] for h in r["history"]) - max(h["vdice"] for h in base[r["fold"]]))
    cell = pooled["paired"]["best"]["cells"]["rfs"]["vDice"]
    assert cell["n_pairs"] == 4
    np.testing.assert_allclose(sorted(cell["differences"]), sorted(expected), rtol=0, atol=1e-12)
    assert pooled["table2"]["cells"]["unbalanced"]["vDice"]["n_runs"] == 4
    for stem in ("table1.md", "table2_best.md", "paired_last3.json", "curves_all.png", "pool.json"):
        assert (tmp_path / "pooled" / stem).is_file(), stem
    assert json.loads((tmp_path / "pooled" / "pool.json").read_text())["seeds"] == [0, 1]
    # The command line writes the same tables.
    assert pool.main([str(tmp_path / "s0"), str(tmp_path / "s1"), "--out", str(tmp_path / "cli"), "--no-plot"]) == 0
    assert (tmp_path / "cli" / "paired_best.md").read_text() == (tmp_path / "pooled" / "paired_best.md").read_text()
    assert pooled["table1"]["rows"][0]["set"] == "all tiles"
    # A study still in its first call has no table1.json yet: Table 1 without 'all tiles'.
    (tmp_path / "s0" / "table1.json").unlink()
    partial = pool.pool_studies([str(tmp_path / "s0")], str(tmp_path / "partial"), plot=False)
    assert [r["set"] for r in partial["table1"]["rows"]] == arms
    assert partial["table2"]["cells"]["rfs"]["vDice"]["runs"] == pooled["table2"]["cells"]["rfs"]["vDice"]["runs"][:2]


def test_pool_matched_keeps_the_runs_finished_in_every_arm(synthetic, tmp_path):
    from cobalance.training import pool

    arms = ["unbalanced", "rfs"]
    for seed in (0, 1):
        runner.run_experiment(_config(synthetic, tmp_path / f"s{seed}", arms=arms, seed=seed))
    # Seed 1 still running: its rfs fold 1 not finished.
    (tmp_path / "s1" / "runs" / "rfs" / "fold1.json").unlink()
    folders = [str(tmp_path / "s0"), str(tmp_path / "s1")]
    every = pool.pool_studies(folders, str(tmp_path / "every"), plot=False)
    assert [len(every["runs"][a]) for a in arms] == [4, 3]
    matched = pool.pool_studies(folders, str(tmp_path / "matched"), plot=False, matched=True)
    keys = {a: sorted((r["seed"], r["fold"]) for r in matched["runs"][a]) for a in arms}
    assert keys["unbalanced"] == keys["rfs"] == [(0, 0), (0, 1), (1, 0)]
    # Table 2's unbalanced column is over those three runs only; the pairs are unchanged.
    base = {(r["seed"], r["fold"]): max(h["vdice"] for h in r["history"]) for r in every["runs"]["unbalanced"]}
    cell = matched["table2"]["cells"]["unbalanced"]["vDice"]
    assert cell["n_runs"] == 3
    assert cell["mean"] == pytest.approx(np.mean([base[k] for k in keys["unbalanced"]]), abs=1e-12)
    assert (matched["paired"]["best"]["cells"]["rfs"]["vDice"]["differences"]
            == every["paired"]["best"]["cells"]["rfs"]["vDice"]["differences"])
    assert json.loads((tmp_path / "matched" / "pool.json").read_text())["matched"] is True
    # --arms picks and orders the arms.
    only = pool.pool_studies(folders, str(tmp_path / "only"), plot=False, arms=["rfs", "unbalanced"])
    assert list(only["runs"]) == ["rfs", "unbalanced"]
    assert pool.main(folders + ["--out", str(tmp_path / "cli"), "--no-plot", "--matched", "--arms", "unbalanced"]) == 0
    assert json.loads((tmp_path / "cli" / "pool.json").read_text())["runs"] == {"unbalanced": [[0, 0], [0, 1], [1, 0], [1, 1]]}
    for bad in (["exact"], [], ["rfs", "rfs"]):
        with pytest.raises(ValueError, match="arms must be distinct arms of the study"):
            pool.pool_studies(folders, str(tmp_path / "bad"), plot=False, arms=bad)
    for name in ("fold0.json", "fold1.json"):
        (tmp_path / "s0" / "runs" / "rfs" / name).unlink()
    (tmp_path / "s1" / "runs" / "rfs" / "fold0.json").unlink()
    with pytest.raises(ValueError, match="finished in every arm"):
        pool.pool_studies(folders, str(tmp_path / "none"), plot=False, matched=True)


def test_pool_refuses_what_is_not_one_study(synthetic, tmp_path):
    from cobalance.training import pool

    runner.run_experiment(_config(synthetic, tmp_path / "a", seed=0))
    runner.run_experiment(_config(synthetic, tmp_path / "b", seed=0))
    runner.run_experiment(_config(synthetic, tmp_path / "c", seed=1, lr=5e-3))
    with pytest.raises(ValueError, match="distinct seeds"):
        pool.pool_studies([str(tmp_path / "a"), str(tmp_path / "b")], str(tmp_path / "p"))
    with pytest.raises(ValueError, match="lr="):
        pool.pool_studies([str(tmp_path / "a"), str(tmp_path / "c")], str(tmp_path / "p"))
    with pytest.raises(ValueError, match="one of the pooled folders"):
        pool.pool_studies([str(tmp_path / "a")], str(tmp_path / "a"))
    with pytest.raises(ValueError, match="config.json"):
        pool.pool_studies([str(tmp_path / "a"), str(tmp_path / "nothing")], str(tmp_path / "p"))
    with pytest.raises(ValueError, match="at least one"):
        pool.pool_studies([], str(tmp_path / "p"))
    with pytest.raises(SystemExit):
        pool.main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "p")])
