"""SegmentationFolder and BalancedDataset against pixels read directly with Pillow."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from seg_folders import (  # noqa: E402
    SIZE,
    make_binary_folder,
    make_label_map_folder,
    make_plan,
    read_plane,
    read_rgb,
)

from cobalance.folders import MaskFolder  # noqa: E402
from cobalance.segmentation import BalancedDataset, SegmentationFolder  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_label_map_items_are_tensors_of_the_files(tmp_path):
    root = make_label_map_folder(tmp_path / "lm")
    ds = SegmentationFolder(root)
    assert len(ds) == 5 and ds.layout == "label_map" and ds.class_names == ["class0", "class1", "class2", "class3"]
    for k in range(len(ds)):
        image, mask = ds[k]
        assert image.dtype == torch.float32 and image.shape == (3, SIZE, SIZE)
        assert mask.dtype == torch.int64 and mask.shape == (SIZE, SIZE)
        ref_image = read_rgb(root / "images" / f"im{k}.png")
        np.testing.assert_allclose(image.permute(1, 2, 0).numpy(), ref_image / 255.0, rtol=0, atol=1e-7)
        np.testing.assert_array_equal(mask.numpy(), read_plane(root / "masks" / f"im{k}.png"))


def brute_force_binary(root, classes, image_id):
    planes = []
    for name in classes:
        path = root / "masks" / name / f"{image_id}.png"
        planes.append(read_plane(path).astype(bool) if path.exists() else np.zeros((SIZE, SIZE), bool))
    return np.stack(planes).astype(np.uint8)


def test_binary_folders_tiled_items_and_presence(tmp_path, monkeypatch):
    classes = ["EX", "HE", "MA"]
    root = make_binary_folder(tmp_path / "bin", classes=classes)
    ds = SegmentationFolder(root, tile=32, stride=32)
    assert len(ds) == 4 * 4 and ds.layout == "binary_folders"
    expected_presence = []
    k = 0
    for i in range(4):
        full = brute_force_binary(root, classes, f"im{i}")
        image_full = read_rgb(root / "images" / f"im{i}.png")
        for y in (0, 32):
            for x in (0, 32):
                image, mask = ds[k]
                assert mask.dtype == torch.uint8 and mask.shape == (3, 32, 32)
                np.testing.assert_array_equal(mask.numpy(), full[:, y:y + 32, x:x + 32])
                np.testing.assert_allclose(image.permute(1, 2, 0).numpy() * 255, image_full[y:y + 32, x:x + 32],
                                           atol=1e-4)
                expected_presence.append(full[:, y:y + 32, x:x + 32].reshape(3, -1).any(1))
                k += 1
    expected_presence = np.array(expected_presence)

    # presence needs the masks only: image decoding is made to fail
    fresh = SegmentationFolder(root, tile=32, stride=32)

    def no_images(*args, **kwargs):
        raise AssertionError("class presence must not decode images")

    monkeypatch.setattr(MaskFolder, "load_image", no_images)
    np.testing.assert_array_equal(fresh.presence(), expected_presence)
    np.testing.assert_allclose(fresh.class_presence(), expected_presence.mean(0))
    table = fresh.pattern_table()
    patterns, counts = np.unique(expected_presence, axis=0, return_counts=True)
    assert sorted(table.counts.tolist()) == sorted(counts.tolist())


def test_wraps_an_open_mask_folder(tmp_path):
    folder = MaskFolder(make_label_map_folder(tmp_path / "lm"))
    ds = SegmentationFolder(folder)
    assert ds.folder is folder and len(ds) == len(folder)
    with pytest.raises(ValueError, match="tile"):
        SegmentationFolder(folder, tile=32)


def test_balanced_dataset_items_follow_the_plan(tmp_path):
    ds = SegmentationFolder(make_label_map_folder(tmp_path / "lm"))
    plan = make_plan([2, 0, 1, 3, 1])
    balanced = BalancedDataset(ds, plan)
    assert len(balanced) == 7
    expected = [(0, 0), (0, 1), (2, 0), (3, 0), (3, 1), (3, 2), (4, 0)]
    for k, (sample, copy) in enumerate(expected):
        image, mask, copy_index = balanced[k]
        assert copy_index == copy
        ref_image, ref_mask = ds[sample]
        assert torch.equal(image, ref_image) and torch.equal(mask, ref_mask)
    with_source = BalancedDataset(ds, plan, with_source=True)
    assert [tuple(with_source[k][2:]) for k in range(7)] == expected
    with pytest.raises(IndexError):
        balanced[7]


def test_balanced_dataset_refuses_a_plan_for_another_length(tmp_path):
    ds = SegmentationFolder(make_label_map_folder(tmp_path / "lm"))
    with pytest.raises(ValueError, match=r"plan is for 4 samples \(plan.n_samples\) but the dataset has 5"):
        BalancedDataset(ds, make_plan([1, 1, 1, 1]))


def test_loader_pipeline_with_sampler_and_augmentation(tmp_path):
    pytest.importorskip("kornia")
    from cobalance.segmentation import DuplicateAugmentation, PlanSampler

    ds = SegmentationFolder(make_label_map_folder(tmp_path / "lm"))
    plan = make_plan([1, 3, 0, 2, 1])
    balanced = BalancedDataset(ds, plan, with_source=True)
    loader = torch.utils.data.DataLoader(balanced, batch_size=3,
                                         sampler=PlanSampler(plan, seed=0, positions=True))
    aug = DuplicateAugmentation(seed=0)
    seen = []
    for images, masks, samples, copies in loader:
        out_images, out_masks = aug(images, masks, samples, copies)
        for j in range(len(samples)):
            if copies[j] == 0:
                assert torch.equal(out_images[j], images[j])
        assert set(torch.unique(out_masks).tolist()) <= {0, 1, 2, 3}
        seen += list(zip(samples.tolist(), copies.tolist()))
    assert sorted(seen) == sorted(zip(plan.indices().tolist(), plan.copy_index.tolist()))


def test_bad_folders_name_the_file(tmp_path):
    from PIL import Image

    root = make_label_map_folder(tmp_path / "size")
    Image.fromarray(np.zeros((SIZE, SIZE + 1), np.uint8)).save(root / "masks" / "im2.png")
    with pytest.raises(ValueError, match="im2.png"):
        SegmentationFolder(root)

    root = make_binary_folder(tmp_path / "names")
    with pytest.raises(ValueError, match="unknown class names"):
        SegmentationFolder(root, class_names=["EX", "OD"])

    empty = tmp_path / "empty"
    (empty / "images").mkdir(parents=True)
    (empty / "masks").mkdir()
    with pytest.raises(ValueError, match="empty"):
        SegmentationFolder(empty)
