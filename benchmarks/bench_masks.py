"""Mask scanning: cobalance.scan_masks against what a user writes with numpy.

Per-mask numpy.bincount and numpy.unique (label maps), per-channel
numpy.count_nonzero (multi-label masks), and for tiles a loop of bincount over the
tiles or a vectorised one-hot count over a reshaped batch. Every case asserts that it
produced the reference pixel counts. ``extra_info["GB_per_s_best"]`` and
``["GB_per_s_median"]`` are mask bytes per second (best and median round); with
``n_threads=1`` that is per core.

    PYTHONPATH=python .venv/bin/python -m pytest benchmarks/bench_masks.py --benchmark-only \
        --benchmark-timer=time.process_time

``time.process_time`` counts the CPU time of all the process's threads, so the rates
are per core even on a busy machine (and the threaded runs show their total CPU cost,
not their wall-clock speed-up); drop the option for wall-clock times.

``COBALANCE_BENCH_LARGE=1`` scans 4x as many masks.
"""

import os
from pathlib import Path

import numpy as np
import pytest

from cobalance import scan_masks

LARGE = os.environ.get("COBALANCE_BENCH_LARGE") == "1"
IDRID = Path(__file__).parents[1] / ".." / "shared" / "data" / "idrid"
N_CLASSES = 5
TILE = 128


def blob_label_maps(n, h, w, seed):
    """Background 0 with discs of classes 1..4, rarer for higher ids (a long tail)."""
    rng = np.random.default_rng(seed)
    out = np.zeros((n, h, w), np.uint8)
    for i in range(n):
        for c in range(1, N_CLASSES):
            for _ in range(rng.poisson(24 / c)):
                r = int(rng.integers(2, max(3, min(h, w) // (6 * c))))
                y, x = int(rng.integers(0, h)), int(rng.integers(0, w))
                y0, y1, x0, x1 = max(0, y - r), min(h, y + r + 1), max(0, x - r), min(w, x + r + 1)
                yy, xx = np.ogrid[y0:y1, x0:x1]
                out[i, y0:y1, x0:x1][(yy - y) ** 2 + (xx - x) ** 2 <= r * r] = c
    return out


def idrid_masks(n):
    """n IDRiD multi-label masks (n, 5, 1424, 2144) from ../shared, or blobs of that size."""
    classes = ["MA", "HE", "EX", "SE", "OD"]
    if (IDRID / "index.csv").is_file():
        from PIL import Image

        ids = sorted(p.stem for p in (IDRID / "images").glob("*.jpg"))[:n]
        out = np.zeros((len(ids), 5, 1424, 2144), np.uint8)
        for i, image_id in enumerate(ids):
            for c, name in enumerate(classes):
                path = IDRID / "masks" / name / f"{image_id}.png"
                if path.exists():
                    out[i, c] = np.asarray(Image.open(path))
        return out
    label = blob_label_maps(n, 1424, 2144, seed=5)
    return np.stack([label == c for c in range(1, 6)], axis=1).astype(np.uint8)


N_512 = 256 if LARGE else 64
N_IDRID = 16 if LARGE else 4
DATA = {}


def data(name):
    if name not in DATA:
        if name == "512":
            DATA[name] = blob_label_maps(N_512, 512, 512, seed=1)
        elif name in ("512_uint16", "512_int32"):
            DATA[name] = data("512").astype(name.split("_")[1])
        elif name == "idrid_multilabel":
            DATA[name] = idrid_masks(N_IDRID)
        elif name == "idrid_label":
            ml = data("idrid_multilabel")
            label = np.zeros((ml.shape[0],) + ml.shape[2:], np.uint8)
            for c in range(ml.shape[1]):  # later classes paint over earlier ones
                label[ml[:, c] != 0] = c + 1
            DATA[name] = label
    return DATA[name]


def reference_counts(masks, n_classes, tile=None):
    """Per-sample class counts by one-hot comparison (independent of the scanner)."""
    if tile is not None:
        n, h, w = masks.shape
        masks = masks[:, : h // tile * tile, : w // tile * tile]
        masks = masks.reshape(n, h // tile, tile, w // tile, tile).transpose(0, 1, 3, 2, 4).reshape(-1, tile, tile)
    return np.stack([(masks == c).sum(axis=(1, 2)) for c in range(n_classes)], axis=1)


def reference_multilabel_tiled(masks, tile):
    """(n, c, h // tile, w // tile) counts of the full tiles, slice by slice."""
    n, c, h, w = masks.shape
    out = np.zeros((n, c, h // tile, w // tile), np.int64)
    for ty in range(h // tile):
        for tx in range(w // tile):
            out[:, :, ty, tx] = np.count_nonzero(masks[:, :, ty * tile:(ty + 1) * tile, tx * tile:(tx + 1) * tile],
                                                 axis=(2, 3))
    return out


def record(benchmark, nbytes):
    # Best and median: on a shared machine the best round is the closest to the cost.
    stats = benchmark.stats.stats
    benchmark.extra_info["GB_per_s_best"] = round(nbytes / stats.min / 1e9, 3)
    benchmark.extra_info["GB_per_s_median"] = round(nbytes / stats.median / 1e9, 3)


# -- label maps, whole images -----------------------------------------------------------

LABEL_CASES = ["512", "512_uint16", "512_int32", "idrid_label"]
TILED_CASES = ["512", "idrid_label"]


def n_classes_of(name):
    return N_CLASSES + 1 if name == "idrid_label" else N_CLASSES


@pytest.mark.parametrize("name", LABEL_CASES)
@pytest.mark.parametrize("n_threads", [1, None])
def test_label_cobalance(benchmark, name, n_threads):
    masks, c = data(name), n_classes_of(name)
    benchmark.group = f"label {name}"
    scan = benchmark.pedantic(scan_masks, args=(masks,), kwargs={"n_classes": c, "n_threads": n_threads},
                              rounds=20, warmup_rounds=1)
    np.testing.assert_array_equal(scan.pixel_counts, reference_counts(masks, c))
    record(benchmark, masks.nbytes)


@pytest.mark.parametrize("name", LABEL_CASES)
def test_label_numpy_bincount(benchmark, name):
    masks, c = data(name), n_classes_of(name)
    benchmark.group = f"label {name}"
    counts = benchmark.pedantic(lambda: np.stack([np.bincount(m.ravel(), minlength=c) for m in masks]),
                                rounds=5, warmup_rounds=1)
    np.testing.assert_array_equal(counts, reference_counts(masks, c))
    record(benchmark, masks.nbytes)


@pytest.mark.parametrize("name", LABEL_CASES)
def test_label_numpy_unique(benchmark, name):
    masks, c = data(name), n_classes_of(name)
    benchmark.group = f"label {name}"

    def per_mask_unique():
        out = np.zeros((len(masks), c), np.int64)
        for i, m in enumerate(masks):
            values, counts = np.unique(m, return_counts=True)
            out[i, values] = counts
        return out

    counts = benchmark.pedantic(per_mask_unique, rounds=3, warmup_rounds=0)
    np.testing.assert_array_equal(counts, reference_counts(masks, c))
    record(benchmark, masks.nbytes)


# -- label maps, tiled ------------------------------------------------------------------

# 512 divides into 128-tiles; IDRiD (1424 x 2144) does not, so its cobalance scan has
# the border tiles too and the numpy versions see only the full tiles (less work).
@pytest.mark.parametrize("name", TILED_CASES)
@pytest.mark.parametrize("n_threads", [1, None])
def test_tiled_cobalance(benchmark, name, n_threads):
    masks, c = data(name), n_classes_of(name)
    benchmark.group = f"tiled {name}"
    scan = benchmark.pedantic(scan_masks, args=(masks,), kwargs={"n_classes": c, "tile": TILE, "n_threads": n_threads},
                              rounds=20, warmup_rounds=1)
    h, w = masks.shape[1:]
    full = (scan.origins[:, 1] + TILE <= h // TILE * TILE) & (scan.origins[:, 2] + TILE <= w // TILE * TILE)
    np.testing.assert_array_equal(scan.pixel_counts[full], reference_counts(masks, c, TILE))
    record(benchmark, masks.nbytes)


@pytest.mark.parametrize("name", TILED_CASES)
def test_tiled_numpy_bincount_loop(benchmark, name):
    masks, c = data(name), n_classes_of(name)
    benchmark.group = f"tiled {name}"
    h, w = masks.shape[1:]

    def per_tile_bincount():
        return np.stack([np.bincount(m[y:y + TILE, x:x + TILE].ravel(), minlength=c)
                         for m in masks for y in range(0, h - TILE + 1, TILE) for x in range(0, w - TILE + 1, TILE)])

    counts = benchmark.pedantic(per_tile_bincount, rounds=3, warmup_rounds=1)
    np.testing.assert_array_equal(counts, reference_counts(masks, c, TILE))
    record(benchmark, masks.nbytes)


@pytest.mark.parametrize("name", TILED_CASES)
def test_tiled_numpy_one_hot(benchmark, name):
    masks, c = data(name), n_classes_of(name)
    benchmark.group = f"tiled {name}"
    n, h, w = masks.shape

    def one_hot_reshape():
        t = masks[:, : h // TILE * TILE, : w // TILE * TILE].reshape(n, h // TILE, TILE, w // TILE, TILE)
        return np.stack([(t == k).sum(axis=(2, 4)).reshape(-1) for k in range(c)], axis=1)

    counts = benchmark.pedantic(one_hot_reshape, rounds=3, warmup_rounds=1)
    np.testing.assert_array_equal(counts, reference_counts(masks, c, TILE))
    record(benchmark, masks.nbytes)


# -- multi-label masks (IDRiD layout: one binary plane per class) ------------------------


@pytest.mark.parametrize("tile", [None, TILE])
@pytest.mark.parametrize("n_threads", [1, None])
def test_multilabel_cobalance(benchmark, tile, n_threads):
    masks = data("idrid_multilabel")
    benchmark.group = f"multilabel idrid tile={tile}"
    scan = benchmark.pedantic(scan_masks, args=(masks,),
                              kwargs={"n_classes": 5, "tile": tile, "n_threads": n_threads}, rounds=20, warmup_rounds=1)
    if tile is None:
        np.testing.assert_array_equal(scan.pixel_counts, np.count_nonzero(masks, axis=(2, 3)))
    else:
        n, c, h, w = masks.shape
        i, y, x = scan.origins.T
        full = (y + tile <= h // tile * tile) & (x + tile <= w // tile * tile)
        ref = reference_multilabel_tiled(masks, tile)
        np.testing.assert_array_equal(scan.pixel_counts[full], ref[i[full], :, y[full] // tile, x[full] // tile])
    record(benchmark, masks.nbytes)


def test_multilabel_numpy_count_nonzero(benchmark):
    masks = data("idrid_multilabel")
    benchmark.group = "multilabel idrid tile=None"
    counts = benchmark.pedantic(lambda: np.stack([np.count_nonzero(m, axis=(1, 2)) for m in masks]),
                                rounds=5, warmup_rounds=1)
    np.testing.assert_array_equal(counts, masks.astype(bool).sum(axis=(2, 3)))
    record(benchmark, masks.nbytes)


def test_multilabel_numpy_tiled_sum(benchmark):
    masks = data("idrid_multilabel")
    benchmark.group = f"multilabel idrid tile={TILE}"
    n, c, h, w = masks.shape

    def reshape_sum():
        t = masks[:, :, : h // TILE * TILE, : w // TILE * TILE] != 0
        return t.reshape(n, c, h // TILE, TILE, w // TILE, TILE).sum(axis=(3, 5))

    counts = benchmark.pedantic(reshape_sum, rounds=3, warmup_rounds=1)
    np.testing.assert_array_equal(counts, reference_multilabel_tiled(masks, TILE))
    record(benchmark, masks.nbytes)
