"""The paper-scale GPU run's preparation and run scripts (scripts/gpu/), on CPU.

The prepare step copies a small IDRiD-layout folder (no wheels: no network in tests),
then the run script's wrapper runs the study's command in CPU mode for one epoch; and
the options the GPU run adds to the study (bf16 autocast, channels-last, a time budget,
the library-default arm) are checked against independent references.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("kornia")
PIL = pytest.importorskip("PIL.Image")
pytest.importorskip("matplotlib")

from cobalance.training import tables  # noqa: E402
from cobalance.training.config import ExperimentConfig  # noqa: E402
from cobalance.training.models import create_model  # noqa: E402
from cobalance.training.run import forward_pass, normalize  # noqa: E402
from cobalance.training.runner import run_experiment  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
CLASSES = ["EX", "HE", "MA", "OD", "SE"]
PAPER_ARMS = ["unbalanced", "balanced_noreg", "balanced_reg", "library_default"]


def _idrid_like(root, n_images=6, h=128, w=192, seed=0):
    """JPEG images and 1-bit PNG masks in IDRiD's layout; SE only in every third image."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    yy, xx = np.mgrid[:h, :w]
    for i in range(n_images):
        image = rng.integers(0, 80, size=(h, w, 3)).astype(np.uint8)
        for k, name in enumerate(CLASSES):
            if name == "SE" and i % 3:
                continue  # a missing file: the class is absent, as IDRiD ships
            cy, cx, r = rng.integers(10, h - 10), rng.integers(10, w - 10), 6 + 4 * (name == "OD")
            disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
            image[disc, k % 3] = 220
            (root / "masks" / name).mkdir(parents=True, exist_ok=True)
            PIL.fromarray(disc).save(root / "masks" / name / f"IDRiD_{i + 1:02d}.png")
        PIL.fromarray(image).save(root / "images" / f"IDRiD_{i + 1:02d}.jpg", quality=90)
    (root / "index.csv").write_text("id,split\n" + "".join(f"IDRiD_{i + 1:02d},train\n" for i in range(n_images)))
    (root / "README.md").write_text("synthetic, IDRiD layout\n")
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return _idrid_like(tmp_path_factory.mktemp("gpu-prep") / "idrid")


def _env():
    # The cobalance this test imports (installed in CI, or the tree's through PYTHONPATH
    # in development): the tree's python/ holds no compiled extension in a fresh clone.
    return dict(os.environ)


def test_prepare_then_run_script_on_cpu(data, tmp_path):
    carry, out, work = tmp_path / "carry", tmp_path / "out", tmp_path / "work"
    subprocess.run([sys.executable, str(REPO / "scripts/gpu/prepare.py"), "--data", str(data), "--carry", str(carry),
                    "--max-images", "5", "--no-wheels"], check=True, env=_env(), cwd=REPO)
    # The first 5 images by name, byte for byte, with only their masks.
    copied = sorted(p.relative_to(carry / "idrid") for p in (carry / "idrid").rglob("*") if p.is_file())
    expected = sorted(p.relative_to(data) for p in data.rglob("*") if p.is_file() and "IDRiD_06" not in p.name)
    assert copied == expected
    for rel in expected:
        assert (carry / "idrid" / rel).read_bytes() == (data / rel).read_bytes()
    manifest = json.loads((carry / "manifest.json").read_text())
    assert manifest["data"]["images"] == 5 and manifest["size"]["total"] <= manifest["size"]["limit"]

    env = dict(_env(), COBALANCE_GPU_INSTALL="0", PYTHON=sys.executable, OUT=str(out))
    proc = subprocess.run(["bash", str(REPO / "scripts/gpu/run-study"), "--data", str(carry / "idrid"),
                           "--work", str(work), "--device", "cpu", "--model", "unet", "--epochs", "1",
                           "--", "--encoder", "conv-tiny", "--tile", "64", "--threads", "1"],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    names = sorted(p.name for p in out.iterdir())
    assert names == ["curves_all.png", "results.json", "study.log", "tables.md"]
    assert len(names) <= 8  # what one device call returns
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["tile"] == 64 and results["config"]["model"] == "unet"
    assert list(results["runs"]) == PAPER_ARMS
    for arm, runs in results["runs"].items():
        assert [r["fold"] for r in runs] == [0, 1, 2]
        assert all(len(r["history"]) == 1 and not r["time_limited"] for r in runs)
        # Table 2 against the per-fold bests, recomputed here.
        best = np.array([r["best_vdice"] for r in runs], dtype=float)
        cell = results["table2_best"]["cells"][arm]["vDice"]
        assert cell["mean"] == pytest.approx(best.mean()) and cell["std"] == pytest.approx(best.std(ddof=1))
    assert "| arm | fold | epochs |" in proc.stdout
    assert "vDice" in proc.stdout.rstrip().splitlines()[-1]  # the short table is printed last


def _config(data, out, **kw):
    base = dict(data=str(data), out=str(out), tile=64, folds=3, epochs=1, batch_size=4, model="unet",
                encoder="conv-tiny", arms=["unbalanced"], progress=False, seed=0, threads=1)
    base.update(kw)
    return ExperimentConfig(**base)


def test_time_budget_stops_every_run_after_its_share(data, tmp_path):
    # A budget far below one epoch: every run trains its one guaranteed epoch and stops.
    config = _config(data, tmp_path / "r", epochs=3, arms=["unbalanced", "balanced_reg"], max_minutes=1e-6)
    result = run_experiment(config)
    for runs in result["runs"].values():
        assert all(len(r["history"]) == 1 and r["time_limited"] for r in runs)
    # Cut runs count as finished: resuming (with a generous budget) retrains nothing.
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "r" / "runs").rglob("fold*.json")}
    run_experiment(_config(data, tmp_path / "r", epochs=3, arms=["unbalanced", "balanced_reg"], max_minutes=60))
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    # Without a budget every epoch runs.
    full = run_experiment(_config(data, tmp_path / "f", epochs=2))
    assert all(len(r["history"]) == 2 and not r["time_limited"] for r in full["runs"]["unbalanced"])


def test_curves_of_runs_of_different_lengths(tmp_path):
    def run(vdice):
        return {"history": [{"vdice": v, "dice": [v] * 2} for v in vdice]}

    files = tables.plot_curves(tmp_path, {"unbalanced": [run([0.1, 0.2, 0.3]), run([0.2])]}, ["A", "B"], ["A"])
    assert [f.name for f in files] == ["curves_a.png", "curves_vdice.png", "curves_all.png"]
    assert all(f.stat().st_size > 0 for f in files)


def test_bf16_channels_last_forward_matches_float32():
    torch.manual_seed(0)
    model = create_model("unet", classes=5, encoder="conv-tiny").eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        reference = model(normalize(x)).double()
        plain = forward_pass(model, x)
        fast = forward_pass(model.to(memory_format=torch.channels_last), x, "bf16", channels_last=True)
    assert plain.dtype == fast.dtype == torch.float32
    assert torch.equal(plain.double(), reference)
    rel = float((fast.double() - reference).norm() / reference.norm())
    assert 0 < rel < 5e-2  # bf16 operands: rounding, but not another function


def test_amp_and_channels_last_study_runs(data, tmp_path):
    result = run_experiment(_config(data, tmp_path / "a", amp="bf16", channels_last=True))
    run = result["runs"]["unbalanced"][0]
    assert np.isfinite(run["history"][0]["train_loss"])
    assert json.loads((tmp_path / "a" / "config.json").read_text())["amp"] == "bf16"


def test_no_checkpoints_saves_nothing_during_training(data, tmp_path, monkeypatch):
    saved = []
    monkeypatch.setattr(torch, "save", lambda obj, f, *a, **k: saved.append(f))
    result = run_experiment(_config(data, tmp_path / "n", epochs=2, checkpoints=False))
    assert saved == [] and all(len(r["history"]) == 2 for r in result["runs"]["unbalanced"])
    run_experiment(_config(data, tmp_path / "c", epochs=2))
    assert len(saved) == 3 * 2  # with them (the default): one per epoch of each fold


def test_library_default_arm_is_the_default_balancer_size(data, tmp_path):
    result = run_experiment(_config(data, tmp_path / "d", arms=["library_default"], epochs=1))
    for run in result["runs"]["library_default"]:
        # Balancer's default budget: +10 % over the fold's training tiles, nothing dropped.
        assert run["plan_size"] == round(1.1 * run["n_train_tiles"])
        assert run["plan_duplicates"] == run["plan_size"] - run["n_train_tiles"]


@pytest.mark.parametrize("field, value, name", [("amp", "fp8", "amp"), ("amp", "BF16", "amp"),
                                                  ("max_minutes", 0, "max_minutes"),
                                                  ("max_minutes", float("nan"), "max_minutes"),
                                                  ("max_minutes", True, "max_minutes")])
def test_bad_gpu_options(data, tmp_path, field, value, name):
    with pytest.raises(ValueError, match=name):
        _config(data, tmp_path, **{field: value}).validate()


def test_native_sources_hash_follows_the_cpp_sources_only(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_prepare", REPO / "scripts/gpu/prepare.py")
    prepare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prepare)
    (tmp_path / "cpp" / "src").mkdir(parents=True)
    (tmp_path / "python").mkdir()
    (tmp_path / "cpp" / "src" / "a.cpp").write_text("int a;\n")
    (tmp_path / "python" / "m.py").write_text("x = 1\n")
    (tmp_path / "pyproject.toml").write_text("[project]\n")
    first = prepare.native_sources_hash(tmp_path)
    (tmp_path / "python" / "m.py").write_text("x = 2\n")  # Python code travels as source: no rebuild
    assert prepare.native_sources_hash(tmp_path) == first
    (tmp_path / "cpp" / "src" / "a.cpp").write_text("int b;\n")
    assert prepare.native_sources_hash(tmp_path) != first
