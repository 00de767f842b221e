"""Small synthetic mask folders (64 x 64) and plans from copies for the segmentation tests."""

from pathlib import Path

import numpy as np
from PIL import Image

from cobalance import Plan

SIZE = 64


def make_plan(copies):
    return Plan.from_copies(np.asarray(copies, dtype=np.int64))


def _blobs(rng, n_classes, size=SIZE):
    """A label map with a few rectangles of random classes on background 0."""
    labels = np.zeros((size, size), np.uint8)
    for _ in range(rng.integers(1, 4)):
        c = rng.integers(1, n_classes)
        y, x = rng.integers(0, size - 8, 2)
        h, w = rng.integers(4, 24, 2)
        labels[y:y + h, x:x + w] = c
    return labels


def make_label_map_folder(root: Path, n_images=5, n_classes=4, seed=0):
    """root/images/*.png, root/masks/*.png (class ids), root/classes.txt."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n_images):
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(root / "images" / f"im{i}.png")
        Image.fromarray(_blobs(rng, n_classes)).save(root / "masks" / f"im{i}.png")
    (root / "classes.txt").write_text("".join(f"class{c}\n" for c in range(n_classes)))
    return root


def make_binary_folder(root: Path, n_images=4, classes=("EX", "HE", "MA"), seed=0):
    """root/images/*.png, root/masks/<CLASS>/*.png (1-bit), a missing file = class absent."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    for name in classes:
        (root / "masks" / name).mkdir(parents=True)
    for i in range(n_images):
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(root / "images" / f"im{i}.png")
        for c, name in enumerate(classes):
            if (i + c) % 3 == 2:
                continue  # class absent from this image: no file
            plane = _blobs(rng, 2) > 0
            Image.fromarray(plane).save(root / "masks" / name / f"im{i}.png")
    return root


def read_rgb(path):
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def read_plane(path):
    with Image.open(path) as img:
        return np.asarray(img)

