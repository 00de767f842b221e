"""write_balanced: output re-read equals the plan; killed mid-run, it resumes; bad input."""

import csv
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("kornia")
from seg_folders import (  # noqa: E402
    make_binary_folder,
    make_label_map_folder,
    make_plan,
    read_plane,
    read_rgb,
)

from cobalance.folders import MaskFolder  # noqa: E402
from cobalance.segmentation import DuplicateAugmentation, SegmentationFolder, sample_seed, write_balanced  # noqa: E402

from conftest import PACKAGE_PARENT as PYTHON_DIR  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def read_manifest(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def source_presence(folder: MaskFolder):
    """Per-sample class presence computed here from the decoded masks."""
    rows = []
    for k in range(len(folder)):
        _, mask = folder.sample(k)
        if folder.layout == "label_map":
            rows.append([(mask == c).any() for c in range(folder.n_classes)])
        else:
            rows.append(mask.reshape(folder.n_classes, -1).any(1))
    return np.array(rows, dtype=bool)


def test_label_map_output_reread_equals_the_plan(tmp_path):
    src = MaskFolder(make_label_map_folder(tmp_path / "src"))
    plan = make_plan([2, 0, 1, 3, 1])
    report = write_balanced(src, plan, tmp_path / "out", progress=False)
    assert (report.written, report.skipped) == (7, 0)
    out = MaskFolder(tmp_path / "out")
    assert out.layout == "label_map" and out.class_names == src.class_names and len(out) == 7
    expected = source_presence(src)[plan.indices()].sum(0)
    np.testing.assert_array_equal(out.scan().presence.sum(0), expected)
    rows = read_manifest(report.manifest)
    assert [int(r["sample"]) for r in rows] == plan.indices().tolist()
    assert [int(r["copy_index"]) for r in rows] == plan.copy_index.tolist()
    assert all(r["augmented"] == "0" and r["seed"] == "" for r in rows)
    for r in rows:
        image_id = out.image_ids.index(Path(r["file"]).stem)
        np.testing.assert_array_equal(out.load_image(image_id), read_rgb(tmp_path / "src" / "images" /
                                                                          f"{r['image_id']}.png"))
        np.testing.assert_array_equal(out.load_mask(image_id),
                                      read_plane(tmp_path / "src" / "masks" / f"{r['image_id']}.png"))
    assert not any(p.name.startswith(".tmp-") for p in (tmp_path / "out").rglob("*"))


def test_binary_tiles_with_flip_augmentation_keep_presence(tmp_path):
    classes = ["EX", "HE", "MA"]
    src = SegmentationFolder(make_binary_folder(tmp_path / "src", classes=classes), tile=32)
    n = len(src)
    rng = np.random.default_rng(0)
    copies = rng.integers(0, 4, n)
    plan = make_plan(copies)
    # flips only: they keep every pixel, so class presence must match the plan exactly
    flips = DuplicateAugmentation(seed=4, elastic=False)
    # the manifest's seeds are the augmentation's own, not write_balanced's default seed
    report = write_balanced(src, plan, tmp_path / "out", augment=flips, progress=False)
    out = MaskFolder(tmp_path / "out", class_names=classes)
    assert out.layout == "binary_folders" and len(out) == plan.n_samples_out
    expected = source_presence(src.folder)[plan.indices()].sum(0)
    np.testing.assert_array_equal(out.scan().presence.sum(0), expected)
    rows = read_manifest(report.manifest)
    for r in rows:
        sample, copy = int(r["sample"]), int(r["copy_index"])
        assert r["augmented"] == ("1" if copy > 0 else "0")
        assert r["seed"] == (str(sample_seed(4, sample, copy)) if copy > 0 else "")
        image_id = out.image_ids.index(Path(r["file"]).stem)
        src_image, src_mask = src.folder.sample(sample)
        if copy == 0:
            np.testing.assert_array_equal(out.load_image(image_id), src_image)
            np.testing.assert_array_equal(out.load_mask(image_id), src_mask)
        else:
            got = out.load_mask(image_id)
            # a flip of the source tile (or the tile itself when neither flip fired)
            candidates = [src_mask, src_mask[:, ::-1], src_mask[:, :, ::-1], src_mask[:, ::-1, ::-1]]
            assert any(np.array_equal(got, c) for c in candidates)
            # and exactly the one this copy's seed gives
            _, expected_mask = flips(torch.from_numpy(src_image.transpose(2, 0, 1) / 255.0).float()[None],
                                     torch.from_numpy(src_mask.copy())[None], [sample], [copy])
            np.testing.assert_array_equal(got, expected_mask[0].numpy())


def test_default_augmentation_keeps_masks_binary(tmp_path):
    src = SegmentationFolder(make_binary_folder(tmp_path / "src"))
    plan = make_plan([1, 2, 1, 3])
    report = write_balanced(src, plan, tmp_path / "out", augment=True, seed=1, progress=False)
    out = MaskFolder(tmp_path / "out")
    assert len(out) == 7
    for i in range(len(out)):
        assert set(np.unique(out.load_mask(i)).tolist()) <= {0, 1}
    again = write_balanced(src, plan, tmp_path / "out", augment=True, seed=1, progress=False)
    assert (again.written, again.skipped) == (0, 7)
    assert again.manifest.read_text() == report.manifest.read_text()


class SlowFlips(DuplicateAugmentation):
    """The augmentation of the killed run's job, resumed in this process (same name)."""


SCRIPT = textwrap.dedent(
    """
    import sys, time
    import torch
    torch.set_num_threads(1)
    sys.path.insert(0, sys.argv[1])
    sys.path.insert(0, sys.argv[2])
    from seg_folders import make_plan
    from cobalance.segmentation import DuplicateAugmentation, write_balanced

    class SlowFlips(DuplicateAugmentation):
        def __call__(self, *args):
            time.sleep(0.1)
            return super().__call__(*args)

    print("started", flush=True)
    write_balanced(sys.argv[3], make_plan([3] * 10), sys.argv[4], augment=SlowFlips(seed=2, elastic=False),
                   seed=2, progress=False)
    """
)


def _visible_images(out):
    folder = out / "images"
    return [p for p in folder.iterdir() if not p.name.startswith(".")] if folder.is_dir() else []


def test_killed_mid_run_resumes_to_the_same_output(tmp_path):
    src = make_label_map_folder(tmp_path / "src", n_images=10)
    out = tmp_path / "out"
    script = tmp_path / "run_writer.py"
    script.write_text(SCRIPT)
    tests_dir = Path(__file__).resolve().parent
    proc = subprocess.Popen([sys.executable, str(script), str(PYTHON_DIR), str(tests_dir), str(src), str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while len(_visible_images(out)) < 5:
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "the writer did not start writing"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    done = len(_visible_images(out))
    assert 5 <= done < 30, "killed mid-run"
    assert not (out / "manifest.csv").exists(), "no manifest before everything is written"
    for path in _visible_images(out):  # whatever is visible is whole
        assert read_rgb(path).shape == (64, 64, 3)
        assert read_plane(out / "masks" / path.name).shape == (64, 64)

    report = write_balanced(src, make_plan([3] * 10), out, augment=SlowFlips(seed=2, elastic=False), seed=2,
                            progress=False)
    assert report.skipped == done and report.written + report.skipped == 30
    assert not any(p.name.startswith(".tmp-") for p in out.rglob("*"))

    clean = tmp_path / "clean"
    write_balanced(src, make_plan([3] * 10), clean, augment=SlowFlips(seed=2, elastic=False), seed=2,
                   progress=False)
    assert report.manifest.read_text() == (clean / "manifest.csv").read_text()
    for path in sorted((clean / "images").iterdir()):
        np.testing.assert_array_equal(read_rgb(out / "images" / path.name), read_rgb(path))
        np.testing.assert_array_equal(read_plane(out / "masks" / path.name), read_plane(clean / "masks" / path.name))


def test_bad_input(tmp_path):
    src = SegmentationFolder(make_label_map_folder(tmp_path / "src"))
    with pytest.raises(ValueError, match=r"plan is for 3 samples \(plan.n_samples\)"):
        write_balanced(src, make_plan([1, 1, 1]), tmp_path / "a", progress=False)
    write_balanced(src, make_plan([1, 1, 1, 1, 1]), tmp_path / "b", progress=False)
    with pytest.raises(ValueError, match="holds another balanced dataset .*plan_sha256"):
        write_balanced(src, make_plan([2, 1, 1, 1, 1]), tmp_path / "b", progress=False)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        write_balanced(src, make_plan([1, 1, 1, 1, 1]), tmp_path / "c", progress=False)
    with pytest.raises(ValueError, match="augment must be"):
        write_balanced(src, make_plan([1, 1, 1, 1, 1]), tmp_path / "d", augment="elastic", progress=False)
    with pytest.raises(ValueError, match="dataset_or_folder must be"):
        write_balanced([1, 2], make_plan([1, 1]), tmp_path / "e", progress=False)


def test_balanced_idrid_sample_matches_the_balancers_report(tmp_path):
    """Real fundus tiles: table -> Balancer -> plan -> files; re-read presence equals report_.after."""
    from cobalance import Balancer
    from cobalance.folders import sample_path

    if not sample_path().is_dir():
        pytest.skip(f"the shipped IDRiD sample is missing at {sample_path()}")
    src = SegmentationFolder(sample_path(), tile=128)
    balancer = Balancer(target="rare_boost").fit(src.pattern_table())
    plan = balancer.plan_
    # flips keep every lesion pixel, so presence after writing is exact
    write_balanced(src, plan, tmp_path / "out", augment=DuplicateAugmentation(seed=0, elastic=False),
                   progress=False)
    out = MaskFolder(tmp_path / "out", class_names=src.class_names)
    assert len(out) == plan.n_samples_out
    np.testing.assert_allclose(out.scan().presence.mean(0), balancer.report_.after, rtol=0, atol=1e-12)


# -- resuming over changed files ----------------------------------------------------------


def _rewrite_label_maps(src: Path, image_ids, n_classes=4):
    """Every pixel of the named label maps moves to the next class id: no item stays as it was."""
    for image_id in image_ids:
        path = src / "masks" / f"{image_id}.png"
        from PIL import Image

        Image.fromarray(((read_plane(path).astype(np.int64) + 1) % n_classes).astype(np.uint8)).save(path)


def _assert_items_equal_the_source(out: Path, src: Path, rows):
    """Each item's files hold its source image and label map, read here with Pillow (no augmentation)."""
    for r in rows:
        name = Path(r["file"]).name
        np.testing.assert_array_equal(read_rgb(out / "images" / name),
                                      read_rgb(src / "images" / f"{r['image_id']}.png"))
        np.testing.assert_array_equal(read_plane(out / "masks" / name),
                                      read_plane(src / "masks" / f"{r['image_id']}.png"))


def test_resume_without_manifest_over_changed_sources_rewrites_them(tmp_path):
    """The manifest and one item deleted, every source mask rewritten: a rerun redoes every item."""
    src = make_label_map_folder(tmp_path / "src")
    plan = make_plan([2, 0, 1, 3, 1])
    out = tmp_path / "out"
    first = write_balanced(src, plan, out, progress=False)
    assert (first.written, first.skipped) == (7, 0)
    first.manifest.unlink()
    (out / "images" / "im3_copy002.png").unlink()
    _rewrite_label_maps(src, [f"im{i}" for i in range(5)])
    again = write_balanced(src, plan, out, progress=False)
    assert (again.written, again.skipped) == (7, 0)
    rows = read_manifest(again.manifest)
    _assert_items_equal_the_source(out, src, rows)
    # without a change, a rerun without a manifest verifies every item and keeps it
    text = again.manifest.read_text()
    again.manifest.unlink()
    third = write_balanced(src, plan, out, progress=False)
    assert (third.written, third.skipped) == (0, 7)
    assert third.manifest.read_text() == text


def test_resume_with_manifest_redoes_changed_items_only(tmp_path):
    from cobalance.segmentation.writer import _file_sha256

    src = make_label_map_folder(tmp_path / "src")
    plan = make_plan([2, 0, 1, 3, 1])
    out = tmp_path / "out"
    write_balanced(src, plan, out, progress=False)
    rows = read_manifest(out / "manifest.csv")
    for r in rows:  # the recorded hashes are those of the files, computed here with hashlib
        name = Path(r["file"]).name
        assert r["image_sha256"] == _file_sha256(out / "images" / name)
        assert r["mask_sha256"] == _file_sha256(out / "masks" / name)
        assert r["source_mask_sha256"] == _file_sha256(src / "masks" / f"{r['image_id']}.png")
        assert r["source_image_sha256"] == _file_sha256(src / "images" / f"{r['image_id']}.png")
    # a changed source mask: the items of that image (sample 3, three copies) are redone
    _rewrite_label_maps(src, ["im3"])
    # an output edited by hand: that item is redone too
    from PIL import Image

    Image.fromarray(np.zeros((64, 64), np.uint8)).save(out / "masks" / "im0.png")
    again = write_balanced(src, plan, out, progress=False)
    assert (again.written, again.skipped) == (4, 3)
    _assert_items_equal_the_source(out, src, read_manifest(again.manifest))


def test_interrupted_redo_leaves_no_manifest(tmp_path, monkeypatch):
    """A rerun that changes items removes the manifest first: a stale one never vouches for them."""
    import cobalance.segmentation.writer as writer

    src = make_label_map_folder(tmp_path / "src")
    plan = make_plan([2, 0, 1, 3, 1])
    out = tmp_path / "out"
    write_balanced(src, plan, out, progress=False)
    _rewrite_label_maps(src, ["im0", "im3"])
    saved = []
    real_save = writer._save_png

    def failing_save(array, path):
        if len(saved) == 3:
            raise OSError(28, "No space left on device")
        saved.append(path)
        real_save(array, path)

    monkeypatch.setattr(writer, "_save_png", failing_save)
    with pytest.raises(OSError):
        write_balanced(src, plan, out, progress=False)
    assert not (out / "manifest.csv").exists()
    monkeypatch.setattr(writer, "_save_png", real_save)
    report = write_balanced(src, plan, out, progress=False)
    assert report.written + report.skipped == 7 and report.written >= 4
    _assert_items_equal_the_source(out, src, read_manifest(report.manifest))


def test_resume_binary_folder_with_a_class_removed_from_the_source(tmp_path):
    classes = ["EX", "HE", "MA"]
    src = make_binary_folder(tmp_path / "src", classes=classes)
    plan = make_plan([1, 2, 1, 1])
    out = tmp_path / "out"
    write_balanced(src, plan, out, progress=False)
    present = sorted(p for p in (src / "masks").rglob("im1.png"))
    assert present, "im1 has at least one class file"
    present[0].unlink()  # the class is now absent from im1
    report = write_balanced(src, plan, out, progress=False)
    assert (report.written, report.skipped) == (2, 3)
    folder = MaskFolder(src, class_names=classes)
    written = MaskFolder(out, class_names=classes)
    for r in read_manifest(report.manifest):
        k = written.image_ids.index(Path(r["file"]).stem)
        np.testing.assert_array_equal(written.load_mask(k), folder.load_mask(folder.image_ids.index(r["image_id"])))
    # the removed class has no file for im1's items any more
    cls = present[0].parent.name
    assert not (out / "masks" / cls / "im1.png").exists() and not (out / "masks" / cls / "im1_copy001.png").exists()
