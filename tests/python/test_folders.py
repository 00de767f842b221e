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


# -- unreadable files --------------------------------------------------------------------


def _break_file(path, how):
    """Make ``path`` unreadable: cut it in half, or replace it with bytes that are not an image."""
    if how == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes(b"this is not a PNG file\n" * 4)


def _noise_label_folder(root):
    """Label maps of random noise, so that half a PNG file misses pixels (noise does not compress)."""
    rng = np.random.default_rng(5)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for k in range(3):
        Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(root / "images" / f"img{k}.png")
        Image.fromarray(rng.integers(0, 3, (40, 50), dtype=np.uint8)).save(root / "masks" / f"img{k}.png")
    (root / "classes.txt").write_text("a\nb\nc\n")
    return root


@pytest.mark.parametrize("n_threads", [1, 3])
@pytest.mark.parametrize("which", ["masks", "images"])
def test_truncated_file_names_the_file_when_decoded(tmp_path, which, n_threads):
    root = _noise_label_folder(tmp_path)
    bad = root / which / "img1.png"
    _break_file(bad, "truncated")
    folder = MaskFolder(root, tile=10)  # the header is intact: opening works
    pattern = rf"cannot read (label-map mask|image) .*img1\.png: image file is truncated \(OSError\)"
    if which == "masks":
        with pytest.raises(ValueError, match=pattern):
            folder.scan(n_threads=n_threads)
        with pytest.raises(ValueError, match=pattern):
            folder.load_mask(1)
    else:
        folder.scan(n_threads=n_threads)  # images are not decoded by a scan
        with pytest.raises(ValueError, match=pattern):
            folder.load_image(1)
    k = int(np.flatnonzero(folder.origins[:, 0] == 1)[0])
    with pytest.raises(ValueError, match=pattern):
        folder.sample(k)
    folder.sample(0)  # the other images still read
    pytest.importorskip("torch")
    from cobalance.segmentation import SegmentationFolder

    with pytest.raises(ValueError, match=pattern):
        SegmentationFolder(folder)[k]


@pytest.mark.parametrize("which", ["masks/MA", "images"])
def test_file_that_is_not_an_image_names_the_file(tmp_path, which):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks" / "MA").mkdir(parents=True)
    for name in ("a", "b"):
        Image.fromarray(np.zeros((4, 6, 3), np.uint8)).save(tmp_path / "images" / f"{name}.png")
        Image.fromarray(np.ones((4, 6), bool)).save(tmp_path / "masks" / "MA" / f"{name}.png")
    _break_file(tmp_path / which / "b.png", "garbage")
    what = "mask" if which.startswith("masks") else "image"
    with pytest.raises(ValueError, match=rf"cannot read {what} .*b\.png: cannot identify image file .*"
                                         r"\(UnidentifiedImageError\)"):
        MaskFolder(tmp_path)


def test_decompression_bomb_names_the_file(tmp_path, monkeypatch):
    root = _noise_label_folder(tmp_path)
    folder = MaskFolder(root)
    # Pillow refuses images over twice MAX_IMAGE_PIXELS; 40 x 50 = 2000 pixels is over 2 x 500
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)
    pattern = r"cannot read (label-map mask|image) .*img0\.png: .*(DecompressionBombError)"
    with pytest.raises(ValueError, match=pattern):
        folder.scan(n_threads=1)
    with pytest.raises(ValueError, match=pattern):
        folder.sample(0)
    with pytest.raises(ValueError, match=r"cannot read image .*img0\.png: .*(DecompressionBombError)"):
        MaskFolder(root)


# -- other layouts: DRIVE-shaped folders, stem keys, valid regions --------------------------


def make_drive_folder(root, n_images=3, size=(40, 48), seed=0):
    """A small folder laid out like the DRIVE retinal vessel set.

    ``training/images/<k>_training.tif`` (RGB), ``training/1st_manual/<k>_manual1.gif``
    (vessels 0/255) and ``training/mask/<k>_training_mask.gif`` (the field of view, a
    disc). Returns ``{key: (vessels bool, fov bool)}``.
    """
    rng = np.random.default_rng(seed)
    base = root / "training"
    for sub in ("images", "1st_manual", "mask"):
        (base / sub).mkdir(parents=True)
    h, w = size
    yy, xx = np.mgrid[:h, :w]
    truth = {}
    for k in range(21, 21 + n_images):
        fov = (yy - h / 2) ** 2 + (xx - w / 2) ** 2 <= (min(h, w) / 2 - 1) ** 2 + 4 * (k - 21)
        vessels = (rng.random((h, w)) < 0.15) & (rng.random((h, w)) < 0.9)
        vessels[:, : 2 * (k - 20)] = False
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(base / "images" / f"{k}_training.tif")
        Image.fromarray((vessels * 255).astype(np.uint8)).save(base / "1st_manual" / f"{k}_manual1.gif")
        Image.fromarray((fov * 255).astype(np.uint8)).save(base / "mask" / f"{k}_training_mask.gif")
        truth[str(k)] = (vessels, fov)
    return base, truth


DRIVE = dict(mask_dir=".", layout="binary_folders", class_names=["1st_manual"], valid_dir="mask",
             stem_key=r"^(\d+)_")


def drive_reference(truth, tile, min_valid):
    """Per tile (image order, row-major tiles): vessel pixels inside the FOV, FOV pixels, kept."""
    rows = []
    for key in sorted(truth):
        vessels, fov = truth[key]
        h, w = fov.shape
        for y in range(0, h - tile + 1, tile):
            for x in range(0, w - tile + 1, tile):
                v = fov[y:y + tile, x:x + tile]
                if v.sum() >= min_valid * tile * tile:
                    rows.append((int((vessels[y:y + tile, x:x + tile] & v).sum()), int(v.sum()), y, x))
    return rows


def test_drive_shaped_folder_pairs_by_stem_key_and_honours_the_field_of_view(tmp_path):
    base, truth = make_drive_folder(tmp_path)
    folder = MaskFolder(base, tile=8, min_valid=0.5, **DRIVE)
    assert folder.image_ids == ["21", "22", "23"] and folder.class_names == ["1st_manual"]
    scan = folder.scan()
    reference = drive_reference(truth, 8, 0.5)
    assert len(folder) == len(reference) == scan.n_samples
    assert len(reference) < 3 * 5 * 6  # tiles outside the field of view were dropped
    np.testing.assert_array_equal(scan.pixel_counts[:, 0], [r[0] for r in reference])
    np.testing.assert_array_equal(scan.valid_pixels, [r[1] for r in reference])
    np.testing.assert_array_equal(scan.origins[:, 1:], [(r[2], r[3]) for r in reference])
    np.testing.assert_array_equal(scan.presence[:, 0], [r[0] >= 1 for r in reference])
    np.testing.assert_array_equal(folder.valid_mask(1), truth["22"][1])
    # without min_valid every tile stays; the counts still ignore pixels outside the field of view
    every = MaskFolder(base, tile=8, **DRIVE).scan()
    assert every.n_samples == 3 * 5 * 6
    np.testing.assert_array_equal(every.pixel_counts.sum(), sum(int((v & f).sum()) for v, f in truth.values()))


def test_mismatched_stems_raise_instead_of_silent_zeros(tmp_path):
    base, _ = make_drive_folder(tmp_path)
    with pytest.raises(ValueError, match=r"21_manual1\.gif has no image .*stem_key"):
        MaskFolder(base, mask_dir=".", layout="binary_folders", class_names=["1st_manual"])
    with pytest.raises(ValueError, match=r"21_training\.tif does not match stem_key"):
        MaskFolder(base, mask_dir=".", layout="binary_folders", class_names=["1st_manual"], valid_dir="mask",
                   stem_key=r"^(\d+)_manual")
    (base / "other").mkdir()
    (base / "other" / "21_training.xyz").write_bytes(b"not a mask")
    with pytest.raises(ValueError, match=r"class folder .*other is empty: no mask Pillow reads \(1 \.xyz\)"):
        MaskFolder(base, mask_dir=".", layout="binary_folders", class_names=["other"], stem_key=r"^(\d+)_")
    with pytest.raises(ValueError, match="min_valid needs a valid region"):
        MaskFolder(base, mask_dir=".", layout="binary_folders", class_names=["1st_manual"], stem_key=r"^(\d+)_",
                   tile=8, min_valid=0.5)
    with pytest.raises(ValueError, match="stem_key .* is not a regular expression"):
        MaskFolder(base, stem_key="(")


def test_stem_key_callable_pairs_like_the_pattern(tmp_path):
    base, _ = make_drive_folder(tmp_path)
    by_pattern = MaskFolder(base, **DRIVE).scan()
    options = dict(DRIVE, stem_key=lambda stem: stem.split("_")[0])
    by_callable = MaskFolder(base, **options).scan()
    np.testing.assert_array_equal(by_pattern.pixel_counts, by_callable.pixel_counts)


def test_label_maps_with_several_ignore_values_and_a_valid_region(tmp_path):
    rng = np.random.default_rng(4)
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    (tmp_path / "fov").mkdir()
    maps, fovs = {}, {}
    for name in ("a", "b"):
        labels = rng.integers(0, 3, (16, 20)).astype(np.uint8)
        labels[rng.random(labels.shape) < 0.2] = 254
        labels[rng.random(labels.shape) < 0.1] = 255
        fov = rng.random(labels.shape) < 0.7
        Image.fromarray(np.zeros((16, 20, 3), np.uint8)).save(tmp_path / "images" / f"{name}.png")
        Image.fromarray(labels).save(tmp_path / "masks" / f"{name}.png")
        Image.fromarray((fov * 255).astype(np.uint8)).save(tmp_path / "fov" / f"{name}.png")
        maps[name], fovs[name] = labels, fov
    folder = MaskFolder(tmp_path, class_names=["x", "y", "z"], ignore_index=[254, 255], valid_dir="fov", tile=4,
                        min_valid=0.25)
    scan = folder.scan()
    counts, valid = [], []
    for name in ("a", "b"):
        ok = fovs[name] & (maps[name] < 3)
        for y in range(0, 16, 4):
            for x in range(0, 20, 4):
                v = ok[y:y + 4, x:x + 4]
                if v.sum() >= 0.25 * 16:
                    lab = maps[name][y:y + 4, x:x + 4][v]
                    counts.append(np.bincount(lab, minlength=3))
                    valid.append(v.sum())
    np.testing.assert_array_equal(scan.pixel_counts, counts)
    np.testing.assert_array_equal(scan.valid_pixels, valid)
    assert folder.ignore_index == (254, 255)


def test_drive_folder_scans_from_the_cli(tmp_path, capsys):
    import json

    from cobalance import PatternTable
    from cobalance.cli import main

    base, truth = make_drive_folder(tmp_path)
    out = tmp_path / "t.npz"
    code = main(["scan", str(base), "--image-dir", "images", "--mask-dir", ".", "--layout", "binary_folders",
                 "--class-names", "1st_manual", "--valid-dir", "mask", "--stem-key", r"^(\d+)_", "--tile", "8",
                 "--min-valid", "0.5", "-o", str(out), "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 0
    reference = drive_reference(truth, 8, 0.5)
    assert doc["n_samples"] == len(reference)
    table = PatternTable.load(out)
    np.testing.assert_array_equal(table.patterns[table.inverse][:, 0], [r[0] >= 1 for r in reference])
    record = table.provenance  # where the table came from is inside it
    assert record["mask_folder"]["stem_key"] == r"^(\d+)_" and record["mask_folder"]["valid_dir"] == "mask"
    code = main(["scan", str(base), "--mask-dir", ".", "--layout", "binary_folders", "--class-names", "1st_manual"])
    err = capsys.readouterr().err
    assert code == 2 and "stem_key" in err
