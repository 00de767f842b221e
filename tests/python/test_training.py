"""The fundus-study driver end to end on CPU: results folder, resume, determinism, bad input."""

import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("kornia")
PIL = pytest.importorskip("PIL.Image")
pytest.importorskip("matplotlib")

from cobalance.training import experiment as ex  # noqa: E402
from cobalance.training import run as run_module  # noqa: E402
from cobalance.training import runner  # noqa: E402
from cobalance.training.experiment import ARMS, ExperimentConfig, run_experiment  # noqa: E402

CLASSES = ["big", "rare", "mid"]


def _synthetic_folder(root, n_images=6, size=64, seed=0):
    """Images with coloured discs; per-class binary masks in the IDRiD layout.

    ``big`` covers much of every image, ``mid`` overlaps it in some images and ``rare``
    is a small disc in a third of the images, so tiles are imbalanced.
    """
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    for c in CLASSES:
        (root / "masks" / c).mkdir(parents=True)
    yy, xx = np.mgrid[:size, :size]
    for i in range(n_images):
        image = rng.integers(0, 60, size=(size, size, 3)).astype(np.uint8)
        discs = {"big": (rng.integers(20, 44), rng.integers(20, 44), 18)}
        if i % 2 == 0:
            discs["mid"] = (discs["big"][0] + 8, discs["big"][1], 10)
        if i % 3 == 0:
            discs["rare"] = (rng.integers(4, 60), rng.integers(4, 60), 4)
        for k, (name, (cy, cx, r)) in enumerate(discs.items()):
            disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
            image[disc, k] = 200
            PIL.fromarray(disc).save(root / "masks" / name / f"img{i:02d}.png")
        PIL.fromarray(image).save(root / "images" / f"img{i:02d}.png")
    return root


def spy_on_training(monkeypatch):
    """Record each (arm, fold) the runner trains from now on; returns the list it fills."""
    trained = []
    real_train = runner.train_arm_fold

    def spy(arm, fold, *args, **kwargs):
        trained.append((arm, fold))
        return real_train(arm, fold, *args, **kwargs)

    monkeypatch.setattr(runner, "train_arm_fold", spy)
    return trained


def _config(data, out, **kw):
    base = dict(data=str(data), out=str(out), tile=32, folds=2, epochs=1, batch_size=4, model="unet",
                encoder="conv-tiny", arms=list(ARMS), progress=False, seed=0, threads=1)
    base.update(kw)
    return ExperimentConfig(**base)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return _synthetic_folder(tmp_path_factory.mktemp("data") / "synth")


def _assert_results_folder(out, arms, classes, n_folds, n_epochs):
    stems = ["table1", "table2_best", "table2_last3", "paired_best", "paired_last3"]
    for name in ["config.json"] + [f"{stem}.{e}" for stem in stems for e in ("md", "csv", "json")]:
        assert (out / name).is_file(), name
    t1 = json.loads((out / "table1.json").read_text())
    assert [r["set"] for r in t1["rows"]] == ["all tiles"] + list(arms)
    for row in t1["rows"]:
        for c in classes:
            assert 0.0 <= row[c] <= 1.0
        if row["set"] != "all tiles":
            assert 0 < row["effective_size"] <= row["size"] and row["duplicates"] >= 0
    runs = {arm: [json.loads((out / "runs" / arm / f"fold{k}.json").read_text()) for k in range(n_folds)]
            for arm in arms}
    for summary in ("best", "last3"):
        t2 = json.loads((out / f"table2_{summary}.json").read_text())
        assert t2["arms"] == list(arms) and t2["metrics"] == list(classes) + ["vDice"]
        for arm in arms:
            for i, metric in enumerate(t2["metrics"]):
                cell = t2["cells"][arm][metric]
                assert len(cell["runs"]) == n_folds
                # recomputed from the run files' histories
                for run, v in zip(runs[arm], cell["runs"]):
                    key = "vdice" if metric == "vDice" else None
                    series = [h[key] if key else h["dice"][i] for h in run["history"]]
                    if summary == "last3":  # the last three epochs, then the known values among them
                        series = series[-3:]
                    series = [x for x in series if x is not None]
                    expected = (max(series) if summary == "best" else float(np.mean(series))) if series else None
                    assert v == pytest.approx(expected)
                    assert v is None or 0.0 <= v <= 1.0
        md = (out / f"table2_{summary}.md").read_text()
        for c in list(classes) + ["vDice"]:
            assert f"| {c} |" in md
        tp = json.loads((out / f"paired_{summary}.json").read_text())
        assert tp["arms"] == [a for a in arms if a != "unbalanced"]
        for arm in tp["arms"]:
            assert tp["cells"][arm]["vDice"]["n_pairs"] <= n_folds
    for arm in arms:
        for fold in range(n_folds):
            assert len(runs[arm][fold]["history"]) == n_epochs
            assert not (out / "runs" / arm / f"fold{fold}.ckpt.pt").exists()
    pngs = sorted(p.name for p in out.glob("curves_*.png"))
    assert "curves_vdice.png" in pngs and "curves_all.png" in pngs and len(pngs) == len(classes) + 2
    for p in out.glob("curves_*.png"):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_smoke_all_arms_on_shipped_sample(tmp_path):
    folders = pytest.importorskip("cobalance.folders")
    data = folders.sample_path()
    if not data.is_dir():
        pytest.skip(f"the shipped IDRiD sample is missing at {data}")
    out = tmp_path / "results"
    config = _config(data, out, tile=64, downscale=2, folds=2, epochs=1, batch_size=8, cache_images=True)
    result = run_experiment(config)
    classes = result["classes"]
    assert classes == sorted(["MA", "HE", "EX", "SE", "OD"])
    _assert_results_folder(out, ARMS, classes, n_folds=2, n_epochs=1)
    # Test sets of the folds are disjoint and made of whole images.
    tests = [set(r["test_images"]) for r in result["runs"]["unbalanced"]]
    assert not tests[0] & tests[1]
    # Balanced arms raise the presence of the rarest class over the unbalanced set.
    t1 = {r["set"]: r for r in result["table1"]["rows"]}
    rare = result["rarest"][0]
    assert t1["balanced_noreg"][rare] > t1["unbalanced"][rare]
    assert t1["rfs"][rare] > t1["unbalanced"][rare]


def test_resume_skips_finished_and_interrupted_run_equals_uninterrupted(synthetic, tmp_path, monkeypatch):
    arms = ["unbalanced", "balanced_reg"]
    straight = run_experiment(_config(synthetic, tmp_path / "a", arms=arms, epochs=2))

    # Interrupt the second arm's second epoch, as a kill would: nothing of it is final.
    calls = {"n": 0}
    real_evaluate = run_module.evaluate

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # fold 0: unbalanced epochs 1-2, balanced_reg epoch 1, then epoch 2
            raise KeyboardInterrupt
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(run_module, "evaluate", flaky)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(_config(synthetic, tmp_path / "b", arms=arms, epochs=2))
    assert (tmp_path / "b" / "runs" / "unbalanced" / "fold0.json").exists()
    assert (tmp_path / "b" / "runs" / "balanced_reg" / "fold0.ckpt.pt").exists()
    assert not (tmp_path / "b" / "runs" / "balanced_reg" / "fold0.json").exists()
    monkeypatch.setattr(run_module, "evaluate", real_evaluate)

    trained = spy_on_training(monkeypatch)
    resumed = run_experiment(_config(synthetic, tmp_path / "b", arms=arms, epochs=2))
    assert ("unbalanced", 0) not in trained and ("balanced_reg", 0) in trained
    for arm in arms:
        for a, b in zip(straight["runs"][arm], resumed["runs"][arm]):
            assert [h["dice"] for h in a["history"]] == [h["dice"] for h in b["history"]]
            assert [h["train_loss"] for h in a["history"]] == [h["train_loss"] for h in b["history"]]
    # A finished study is not retrained at all.
    trained.clear()
    run_experiment(_config(synthetic, tmp_path / "b", arms=arms, epochs=2))
    assert trained == []


def test_same_seed_same_results_other_seed_differs(synthetic, tmp_path):
    kw = dict(arms=["rfs"], epochs=1)
    a = run_experiment(_config(synthetic, tmp_path / "a", **kw))
    b = run_experiment(_config(synthetic, tmp_path / "b", **kw))
    c = run_experiment(_config(synthetic, tmp_path / "c", seed=1, **kw))
    hist = lambda r: [(h["train_loss"], h["dice"]) for run in r["runs"]["rfs"] for h in run["history"]]  # noqa: E731
    assert hist(a) == hist(b)
    assert hist(a) != hist(c)


def test_other_config_in_same_folder_is_refused(synthetic, tmp_path):
    run_experiment(_config(synthetic, tmp_path / "r", arms=["unbalanced"]))
    with pytest.raises(ValueError, match=r"holds a run with lr=0\.008, this one has lr=0\.001"):
        run_experiment(_config(synthetic, tmp_path / "r", arms=["unbalanced"], lr=1e-3))
    # adding an arm is fine: the finished one is kept
    result = run_experiment(_config(synthetic, tmp_path / "r", arms=["unbalanced", "rfs"]))
    assert set(result["runs"]) == {"unbalanced", "rfs"}


def test_bad_data_folders_name_the_file(tmp_path, synthetic):
    with pytest.raises(ValueError, match="does not exist"):
        run_experiment(_config(tmp_path / "nowhere", tmp_path / "o1"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty.images is missing"):
        run_experiment(_config(tmp_path / "empty", tmp_path / "o2"))

    orphan = tmp_path / "orphan"
    shutil.copytree(synthetic, orphan)
    PIL.fromarray(np.zeros((64, 64), dtype=bool)).save(orphan / "masks" / "rare" / "ghost.png")
    for downscale in (1, 2):
        with pytest.raises(ValueError, match=r"ghost\.png.*has no image"):
            run_experiment(_config(orphan, tmp_path / f"o3-{downscale}", downscale=downscale))

    resized = tmp_path / "resized"
    shutil.copytree(synthetic, resized)
    PIL.fromarray(np.zeros((40, 64), dtype=bool)).save(resized / "masks" / "big" / "img01.png")
    for downscale in (1, 2):
        with pytest.raises(ValueError, match=r"img01\.png is 40 x 64 \(height x width\)"):
            run_experiment(_config(resized, tmp_path / f"o4-{downscale}", downscale=downscale))


def test_bad_config_and_cli(synthetic, tmp_path, capsys):
    with pytest.raises(ValueError, match="arms must be among"):
        run_experiment(_config(synthetic, tmp_path / "o", arms=["oversample"]))
    with pytest.raises(ValueError, match="folds must be an integer >= 2"):
        run_experiment(_config(synthetic, tmp_path / "o", folds=1))
    with pytest.raises(ValueError, match="name must be one of"):
        run_experiment(_config(synthetic, tmp_path / "o", model="deeplab"))
    with pytest.raises(ValueError, match=r"unknown class names \['nope'\]: no such folders"):
        run_experiment(_config(synthetic, tmp_path / "o", classes=["big", "nope"]))
    with pytest.raises(ValueError, match="loss must be one of"):
        run_experiment(_config(synthetic, tmp_path / "o", loss="hinge"))
    with pytest.raises(ValueError, match="head_prior must be a probability"):
        run_experiment(_config(synthetic, tmp_path / "o", head_prior=1.5))
    for argv, message in ((["--only-folds", "0,x"], "folds must be comma-separated integers"),
                          (["--loss", "hinge"], "invalid choice")):
        assert ex.main(["--data", str(synthetic), "--out", str(tmp_path / "o"), *argv]) == 2
        assert message in capsys.readouterr().err
    # CLI: an error is one line on stderr and exit status 2
    status = ex.main(["--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o"), "--model", "unet"])
    assert status == 2
    assert "error: data folder" in capsys.readouterr().err


def test_cli_parser_hooks_into_subparsers(synthetic, tmp_path, capsys):
    import argparse

    parser = argparse.ArgumentParser(prog="cobalance")
    sub = parser.add_subparsers(dest="command")
    ex.add_experiment_parser(sub)
    args = parser.parse_args(["experiment", "--data", str(synthetic), "--out", str(tmp_path / "cli"),
                              "--tile", "32", "--folds", "2", "--epochs", "1", "--model", "unet",
                              "--encoder", "conv-tiny", "--arms", "unbalanced,rfs", "--no-progress",
                              "--target", "rare=0.5", "--epoch-size", "plan", "--threads", "1"])
    # the target text is parsed against the class names once the data is open
    assert args.target == "rare=0.5" and args.epoch_size == "plan" and args.arms == ["unbalanced", "rfs"]
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "| vDice |" in printed
    stored = json.loads((tmp_path / "cli" / "config.json").read_text())
    assert stored["epoch_size"] == "plan" and stored["target"] == {"rare": 0.5}
    # The cobalance CLI's handler(args, console) lets errors reach its own reporting.
    bad = parser.parse_args(["experiment", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x"),
                             "--model", "unet"])
    with pytest.raises(ValueError, match="does not exist"):
        bad.handler(bad, None)


def _sampler(n_plan, seed):
    from cobalance import Plan
    from cobalance.segmentation import PlanSampler

    return PlanSampler(Plan.identity(n_plan), seed=seed, positions=True, num_replicas=1, rank=0)


def test_epoch_positions_are_shuffled_passes():
    pos = run_module.epoch_positions(_sampler(5, 3), 0, 12)
    assert pos.size == 12
    assert sorted(pos[:5]) == list(range(5)) and sorted(pos[5:10]) == list(range(5))
    np.testing.assert_array_equal(pos, run_module.epoch_positions(_sampler(5, 3), 0, 12))


def test_downscale_max_pools_masks_and_averages_images(tmp_path):
    src = tmp_path / "src"
    (src / "images").mkdir(parents=True)
    (src / "masks" / "a").mkdir(parents=True)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(9, 12, 3)).astype(np.uint8)
    mask = np.zeros((9, 12), dtype=bool)
    mask[4, 7] = True  # one pixel: survives in block (1, 2) of 3x3 blocks
    PIL.fromarray(image).save(src / "images" / "x.png")
    PIL.fromarray(mask).save(src / "masks" / "a" / "x.png")
    ex.downscale_folder(src, tmp_path / "dst", 3, ["a"])
    small = np.asarray(PIL.open(tmp_path / "dst" / "images" / "x.png"))
    pooled = np.asarray(PIL.open(tmp_path / "dst" / "masks" / "a" / "x.png"))
    assert small.shape == (3, 4, 3) and pooled.shape == (3, 4)
    expected = np.zeros((3, 4), dtype=bool)
    expected[1, 2] = True
    np.testing.assert_array_equal(pooled > 0, expected)
    block_mean = image.reshape(3, 3, 4, 3, 3).astype(np.float64).mean(axis=(1, 3))
    assert np.abs(small.astype(np.float64) - block_mean).max() <= 1.0


def _label_map_folder(root, n_images=6, size=64, seed=0):
    """Label maps: 0 background, 1 a large disc, 2 a small disc in a third of the images."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir(parents=True)
    (root / "classes.txt").write_text("background\ndisc\nspot\n")
    yy, xx = np.mgrid[:size, :size]
    for i in range(n_images):
        image = rng.integers(0, 60, size=(size, size, 3)).astype(np.uint8)
        labels = np.zeros((size, size), dtype=np.uint8)
        cy, cx = rng.integers(20, 44, size=2)
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= 15 ** 2] = 1
        if i % 3 == 0:
            sy, sx = rng.integers(4, 60, size=2)
            labels[(yy - sy) ** 2 + (xx - sx) ** 2 <= 16] = 2
        labels[:2, :] = 255  # a border that belongs to no class
        image[labels == 1, 0] = 200
        image[labels == 2, 1] = 200
        PIL.fromarray(image).save(root / "images" / f"img{i:02d}.png")
        PIL.fromarray(labels).save(root / "masks" / f"img{i:02d}.png")
    return root


def test_label_map_folder_trains_with_softmax_focal_loss(tmp_path):
    data = _label_map_folder(tmp_path / "labels")
    out = tmp_path / "out"
    result = run_experiment(_config(data, out, arms=["unbalanced", "balanced_reg"], ignore_index=255))
    assert result["classes"] == ["background", "disc", "spot"]
    _assert_results_folder(out, ["unbalanced", "balanced_reg"], result["classes"], n_folds=2, n_epochs=1)
    with pytest.raises(ValueError, match="applies to per-class binary mask folders only"):
        run_experiment(_config(data, tmp_path / "o2", downscale=2))
    with pytest.raises(ValueError, match="does not apply to label maps"):
        run_experiment(_config(data, tmp_path / "o3", focal_alpha=0.5, ignore_index=255))
    with pytest.raises(ValueError, match=r"img00\.png: mask value 255 .* is not a class id"):
        run_experiment(_config(data, tmp_path / "o4"))  # 255 is not a class without ignore_index


def test_cobalance_cli_has_the_experiment_subcommand(tmp_path, capsys):
    from cobalance.cli import main

    code = main(["experiment", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "out")])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cobalance: error:") and "missing" in err[0]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
