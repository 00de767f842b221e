"""MaskFolder on the IDRiD data in ../shared, on the shipped sample and on hand-made folders,
checked against reading the files with Pillow and counting with numpy."""

import csv
import pickle
import importlib.util
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cobalance.folders import MaskFolder, sample_path
from conftest import IDRID

IDRID_CLASSES = ["MA", "HE", "EX", "SE", "OD"]
needs_idrid = pytest.mark.skipif(not (IDRID / "index.csv").is_file(),
                                 reason=f"IDRiD data not found at {IDRID} (../shared next to the repository)")


def read_index(root):
    with open(root / "index.csv", newline="") as f:
        return {row["image"]: set(row["classes_present"].split()) for row in csv.DictReader(f)}


def numpy_binary_mask(root, image_id, classes, shape):
    """C x H x W bool read file by file with Pillow; zeros where a class has no file."""
    out = np.zeros((len(classes),) + tuple(shape), bool)
    for c, name in enumerate(classes):
        path = root / "masks" / name / f"{image_id}.png"
        if path.exists():
            out[c] = np.array(Image.open(path)) != 0
    return out


def tile_reference(mask, tile, stride):
    """Per-tile class pixel counts of a C x H x W mask by slicing, with the documented tile rule."""
    def starts(size, t, s):
        xs = list(range(0, size - t + 1, s))
        return xs + [size - t] if xs[-1] + t < size else xs
    h, w = mask.shape[1:]
    rows = []
    for y in starts(h, tile[0], stride[0]):
        for x in starts(w, tile[1], stride[1]):
            rows.append((y, x, mask[:, y:y + tile[0], x:x + tile[1]].sum(axis=(1, 2))))
    return rows


# -- IDRiD (81 images, 2144 x 1424) ------------------------------------------------------


@pytest.fixture(scope="module")
def idrid_scan():
    folder = MaskFolder(IDRID, class_names=IDRID_CLASSES)
    return folder, folder.scan()


@needs_idrid
def test_idrid_whole_images_match_pillow_and_index(idrid_scan):
    folder, scan = idrid_scan
    index = read_index(IDRID)
    assert folder.layout == "binary_folders" and folder.image_ids == sorted(index)
    assert len(folder) == folder.n_images == 81 and scan.n_samples == 81
    assert set(map(tuple, folder.image_sizes)) == {(1424, 2144)}
    for i, image_id in enumerate(folder.image_ids):
        expected = [name in index[image_id] for name in IDRID_CLASSES]
        np.testing.assert_array_equal(scan.presence[i], expected, err_msg=image_id)
    # pixel counts against Pillow + numpy, for a spread of images (all would take long)
    for i in range(0, 81, 10):
        ref = numpy_binary_mask(IDRID, folder.image_ids[i], IDRID_CLASSES, (1424, 2144))
        np.testing.assert_array_equal(scan.pixel_counts[i], ref.sum(axis=(1, 2)))
    # the README's presence figures: MA 100%, HE 98.8%, EX 100%, SE 49.4%, OD 100%
    np.testing.assert_allclose(folder.class_presence(), [1, 80 / 81, 1, 40 / 81, 1])
    np.testing.assert_allclose(scan.pixel_share(), scan.pixel_counts.sum(0) / (81 * 1424 * 2144))


@needs_idrid
def test_idrid_tiles_match_numpy(tmp_path):
    # Four real images linked into a small folder, tiled with overlap.
    ids = ["IDRiD_03", "IDRiD_43", "IDRiD_60", "IDRiD_81"]
    (tmp_path / "images").mkdir()
    for image_id in ids:
        (tmp_path / "images" / f"{image_id}.jpg").symlink_to((IDRID / "images" / f"{image_id}.jpg").resolve())
    for name in IDRID_CLASSES:
        (tmp_path / "masks" / name).mkdir(parents=True)
        for image_id in ids:
            src = IDRID / "masks" / name / f"{image_id}.png"
            if src.exists():
                (tmp_path / "masks" / name / f"{image_id}.png").symlink_to(src.resolve())
    folder = MaskFolder(tmp_path, class_names=IDRID_CLASSES, tile=512, stride=(512, 384))
    scan = folder.scan(n_threads=2)
    k = 0
    for i, image_id in enumerate(ids):
        ref = numpy_binary_mask(IDRID, image_id, IDRID_CLASSES, (1424, 2144))
        for y, x, counts in tile_reference(ref, (512, 512), (512, 384)):
            np.testing.assert_array_equal(scan.origins[k], [i, y, x])
            np.testing.assert_array_equal(scan.pixel_counts[k], counts)
            k += 1
    assert k == len(folder) == scan.n_samples
    np.testing.assert_array_equal(scan.origins, folder.origins)
    # tiles are far less balanced than whole images
    assert folder.class_presence().min() < 0.5


# -- the shipped sample ---------------------------------------------------------------


def test_sample_is_shipped_with_attribution():
    root = sample_path()
    assert root.is_dir()
    readme = (root / "README.md").read_text()
    assert "CC BY 4.0" in readme and "Porwal" in readme
    total = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    assert total < 2_000_000


def test_sample_matches_pillow_and_index():
    root = sample_path()
    folder = MaskFolder(root, class_names=IDRID_CLASSES)
    index = read_index(root)
    assert folder.image_ids == sorted(index) and len(folder) == 8
    scan = folder.scan()
    for i, image_id in enumerate(folder.image_ids):
        ref = numpy_binary_mask(root, image_id, IDRID_CLASSES, (356, 536))
        np.testing.assert_array_equal(folder.load_mask(i), ref.astype(np.uint8))
        np.testing.assert_array_equal(scan.pixel_counts[i], ref.sum(axis=(1, 2)))
        np.testing.assert_array_equal(scan.presence[i], [c in index[image_id] for c in IDRID_CLASSES])
        image = folder.load_image(i)
        assert image.shape == (356, 536, 3) and image.dtype == np.uint8
        np.testing.assert_array_equal(image, np.array(Image.open(root / "images" / f"{image_id}.jpg")))
    # default class order: folder names sorted
    assert MaskFolder(root).class_names == sorted(IDRID_CLASSES)


def test_sample_tiles():
    root = sample_path()
    folder = MaskFolder(root, class_names=IDRID_CLASSES, tile=(128, 160), stride=96)
    # 356 -> starts 0, 96, 192 and the border tile 228; 536 -> 0, 96, ..., 288, 376
    assert len(folder) == 8 * 4 * 5
    scan = folder.scan()
    table = folder.pattern_table()
    assert table.n_samples == len(folder) and table.class_names == IDRID_CLASSES
    np.testing.assert_array_equal(table.patterns[table.inverse], scan.presence)
    for k in (0, 7, 19, 20, 159):
        i, y, x = folder.origins[k]
        image, mask = folder.sample(k)
        assert image.shape == (128, 160, 3) and mask.shape == (5, 128, 160)
        ref = numpy_binary_mask(root, folder.image_ids[i], IDRID_CLASSES, (356, 536))[:, y:y + 128, x:x + 160]
        np.testing.assert_array_equal(mask, ref)
        np.testing.assert_array_equal(scan.pixel_counts[k], ref.sum(axis=(1, 2)))
        full = np.array(Image.open(root / "images" / f"{folder.image_ids[i]}.jpg"))
        np.testing.assert_array_equal(image, full[y:y + 128, x:x + 160])
    with pytest.raises(IndexError):
        folder.sample(len(folder))


@needs_idrid
def test_sample_is_max_pooled_from_shared():
    root = sample_path()
    for image_id in read_index(root):
        big = numpy_binary_mask(IDRID, image_id, IDRID_CLASSES, (1424, 2144))
        pooled = big.reshape(5, 356, 4, 536, 4).any(axis=(2, 4))
        np.testing.assert_array_equal(numpy_binary_mask(root, image_id, IDRID_CLASSES, (356, 536)), pooled)


@needs_idrid
def test_make_sample_reproduces_the_shipped_sample(tmp_path):
    script = Path(__file__).parents[2] / "scripts" / "make_sample.py"
    spec = importlib.util.spec_from_file_location("make_sample", script)
    make_sample = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_sample)
    dest = tmp_path / "sample"
    make_sample.main(["--source", str(IDRID), "--dest", str(dest)])
    shipped = sample_path()
    made = sorted(p.relative_to(dest) for p in dest.rglob("*") if p.is_file())
    assert made == sorted(p.relative_to(shipped) for p in shipped.rglob("*") if p.is_file())
    for rel in made:
        if rel.suffix in (".png", ".jpg"):
            np.testing.assert_array_equal(np.array(Image.open(dest / rel)), np.array(Image.open(shipped / rel)))
        else:
            assert (dest / rel).read_text() == (shipped / rel).read_text()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


# -- label-map folders -------------------------------------------------------------------


def make_label_folder(root, n_images=3, n_classes=4, size=(20, 30), mode="L", ignore=None, seed=0):
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    maps = {}
    for k in range(n_images):
        image_id = f"img{k:02d}"
        h, w = size[0] + k, size[1] - k  # sizes differ between images
        label = rng.choice(n_classes, size=(h, w), p=np.r_[0.7, np.full(n_classes - 1, 0.3 / (n_classes - 1))])
        if ignore is not None:
            label[rng.random((h, w)) < 0.05] = ignore
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "images" / f"{image_id}.png")
        if mode == "L":
            Image.fromarray(label.astype(np.uint8)).save(root / "masks" / f"{image_id}.png")
        elif mode == "I;16":
            Image.fromarray(label.astype(np.uint16)).save(root / "masks" / f"{image_id}.png")
        elif mode == "P":
            img = Image.fromarray(label.astype(np.uint8), mode="L").convert("P")
            img.putpalette([v for i in range(256) for v in (i, 255 - i, 0)])
            img.save(root / "masks" / f"{image_id}.png")
        maps[image_id] = label
    return maps


@pytest.mark.parametrize("mode", ["L", "I;16", "P"])
def test_label_map_folder_matches_numpy(tmp_path, mode):
    maps = make_label_folder(tmp_path, mode=mode, ignore=255 if mode != "P" else None)
    names = ["bg", "road", "car", "tree"]
    ignore = 255 if mode != "P" else None
    folder = MaskFolder(tmp_path, class_names=names, ignore_index=ignore, tile=(8, 10), stride=(4, 10),
                        min_pixels=[1, 2, 2, 3])
    assert folder.layout == "label_map" and folder.n_classes == 4
    scan = folder.scan()
    k = 0
    for i, (image_id, label) in enumerate(sorted(maps.items())):
        np.testing.assert_array_equal(folder.load_mask(i), label)
        assert folder.load_image(i).shape == label.shape + (3,)
        one_hot = np.stack([label == c for c in range(4)])
        for y, x, counts in tile_reference(one_hot, (8, 10), (4, 10)):
            np.testing.assert_array_equal(scan.origins[k], [i, y, x])
            np.testing.assert_array_equal(scan.pixel_counts[k], counts)
            np.testing.assert_array_equal(scan.presence[k], counts >= [1, 2, 2, 3])
            tile = label[y:y + 8, x:x + 10]
            assert scan.valid_pixels[k] == np.sum(tile != 255)
            k += 1
    assert k == len(folder)
    _, mask = folder.sample(len(folder) - 1)
    i, y, x = folder.origins[-1]
    np.testing.assert_array_equal(mask, maps[folder.image_ids[i]][y:y + 8, x:x + 10])


def test_label_map_class_names_from_classes_txt(tmp_path):
    maps = make_label_folder(tmp_path, n_classes=3)
    (tmp_path / "classes.txt").write_text("background\nlesion\n\nvessel\n")
    folder = MaskFolder(tmp_path)
    assert folder.class_names == ["background", "lesion", "vessel"]
    whole = folder.scan()
    for i, label in enumerate(maps[k] for k in sorted(maps)):
        np.testing.assert_array_equal(whole.pixel_counts[i], np.bincount(label.ravel(), minlength=3))
    assert folder.scan() is whole  # kept


def test_label_value_out_of_range_names_the_file(tmp_path):
    make_label_folder(tmp_path, n_classes=4)
    bad = np.zeros((21, 29), np.uint8)
    bad[3, 4] = 9
    Image.fromarray(bad).save(tmp_path / "masks" / "img01.png")
    folder = MaskFolder(tmp_path, class_names=list("abcd"))
    with pytest.raises(ValueError, match=r"img01\.png: mask value 9 at image 1, pixel \(y=3, x=4\)"):
        folder.scan()


# -- bad folders -------------------------------------------------------------------------


def test_bad_folders(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        MaskFolder(tmp_path / "nowhere")
    (tmp_path / "images").mkdir()
    with pytest.raises(ValueError, match=r"folder .*masks is missing"):
        MaskFolder(tmp_path)
    (tmp_path / "masks").mkdir()
    with pytest.raises(ValueError, match=r"image folder .*images is empty"):
        MaskFolder(tmp_path)
    Image.fromarray(np.zeros((4, 6, 3), np.uint8)).save(tmp_path / "images" / "a.png")
    with pytest.raises(ValueError, match=r"mask folder .*masks is empty"):
        MaskFolder(tmp_path)
    Image.fromarray(np.zeros((4, 6), np.uint8)).save(tmp_path / "masks" / "a.png")
    with pytest.raises(ValueError, match="needs class_names"):
        MaskFolder(tmp_path)
    Image.fromarray(np.zeros((4, 6), np.uint8)).save(tmp_path / "masks" / "b.png")
    with pytest.raises(ValueError, match=r"mask .*b\.png has no image"):
        MaskFolder(tmp_path, class_names=["x"])
    (tmp_path / "masks" / "b.png").unlink()
    Image.fromarray(np.zeros((4, 6, 3), np.uint8)).save(tmp_path / "images" / "c.jpg")
    with pytest.raises(ValueError, match=r"image .*c\.jpg has no label-map mask"):
        MaskFolder(tmp_path, class_names=["x"])
    Image.fromarray(np.zeros((5, 6), np.uint8)).save(tmp_path / "masks" / "c.png")
    with pytest.raises(ValueError, match=r"mask .*c\.png is 5 x 6 .* but its image .*c\.jpg is 4 x 6"):
        MaskFolder(tmp_path, class_names=["x"])
    Image.fromarray(np.zeros((4, 6), np.uint8)).save(tmp_path / "masks" / "c.png")
    assert len(MaskFolder(tmp_path, class_names=["x"])) == 2
    with pytest.raises(ValueError, match=r"a\.png \(4 x 6\): tile height 5 is larger than the image height 4"):
        MaskFolder(tmp_path, class_names=["x"], tile=5)
    Image.fromarray(np.zeros((4, 6, 3), np.uint8)).save(tmp_path / "masks" / "c.png")
    with pytest.raises(ValueError, match=r"c\.png must be a single-channel image .* got mode RGB"):
        MaskFolder(tmp_path, class_names=["x"]).scan()
    (tmp_path / "masks" / "SE").mkdir()
    with pytest.raises(ValueError, match="both mask files and class folders"):
        MaskFolder(tmp_path)
    with pytest.raises(ValueError, match="layout must be one of"):
        MaskFolder(tmp_path, layout="coco")


def test_bad_binary_folders(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks" / "MA").mkdir(parents=True)
    Image.fromarray(np.zeros((4, 6, 3), np.uint8)).save(tmp_path / "images" / "a.jpg")
    Image.fromarray(np.ones((4, 6), bool)).save(tmp_path / "masks" / "MA" / "a.png")
    folder = MaskFolder(tmp_path)
    assert folder.layout == "binary_folders" and folder.class_names == ["MA"]
    np.testing.assert_array_equal(folder.scan().pixel_counts, [[24]])
    with pytest.raises(ValueError, match=r"unknown class names \['HE'\]"):
        MaskFolder(tmp_path, class_names=["MA", "HE"])
    with pytest.raises(ValueError, match="ignore_index=255 does not apply"):
        MaskFolder(tmp_path, ignore_index=255)
    Image.fromarray(np.ones((4, 6), bool)).save(tmp_path / "masks" / "MA" / "z.png")
    with pytest.raises(ValueError, match=r"mask .*MA.z\.png has no image"):
        MaskFolder(tmp_path)
    Image.fromarray(np.ones((4, 7), bool)).save(tmp_path / "masks" / "MA" / "a.png")
    (tmp_path / "masks" / "MA" / "z.png").unlink()
    with pytest.raises(ValueError, match=r"mask .*MA.a\.png is 4 x 7"):
        MaskFolder(tmp_path)


def test_reading_returns_new_arrays_and_pickles_without_pixels():
    root = sample_path()
    folder = MaskFolder(root, class_names=IDRID_CLASSES, tile=128)
    image, mask = folder.sample(1)
    i, y, x = folder.origins[1]
    image[:] = 0
    mask[:] = 1
    again_image, again_mask = folder.sample(1)
    full = np.array(Image.open(root / "images" / f"{folder.image_ids[i]}.jpg"))
    np.testing.assert_array_equal(again_image, full[y:y + 128, x:x + 128])
    ref = numpy_binary_mask(root, folder.image_ids[i], IDRID_CLASSES, (356, 536))[:, y:y + 128, x:x + 128]
    np.testing.assert_array_equal(again_mask, ref)
    whole = folder.load_mask(int(i))
    whole[:] = 7
    np.testing.assert_array_equal(folder.sample(1)[1], ref)
    blob = pickle.dumps(folder)
    assert len(blob) < 50_000  # the decoded image and mask are not in it
    clone = pickle.loads(blob)
    np.testing.assert_array_equal(clone.sample(1)[1], ref)
    np.testing.assert_array_equal(clone.origins, folder.origins)
