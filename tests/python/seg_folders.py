"""Small synthetic mask folders (64 x 64) and a Plan stand-in for the segmentation tests."""

from pathlib import Path

import numpy as np
from PIL import Image

try:
    from cobalance import Plan
except ImportError:  # the Plan class is not on this branch yet
    Plan = None

SIZE = 64


class CopiesPlan:
    """The attributes of cobalance.Plan that the toolkit reads, built from per-sample copies."""

    def __init__(self, copies):
        self.copies = np.asarray(copies, dtype=np.int64)
        self.n_samples = self.copies.size
        self.n_samples_out = int(self.copies.sum())
        self._indices = np.repeat(np.arange(self.n_samples, dtype=np.int64), self.copies)
        starts = np.cumsum(self.copies) - self.copies
        self.copy_index = np.arange(self.n_samples_out, dtype=np.int64) - np.repeat(starts, self.copies)

    def indices(self):
        return self._indices


def make_plan(copies):
    copies = np.asarray(copies, dtype=np.int64)
    return Plan.from_copies(copies) if Plan is not None else CopiesPlan(copies)


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
