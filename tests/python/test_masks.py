"""scan_masks / scan_masks_iter / MaskScan against hand-made answers and a brute-force numpy reference."""

import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cobalance
from cobalance import MaskScan, PatternTable, scan_masks, scan_masks_iter


# -- the reference: documented tile rule, per-tile numpy counting ------------------


def reference_starts(size, tile, stride):
    starts = list(range(0, size - tile + 1, stride))
    if starts[-1] + tile < size:
        starts.append(size - tile)
    return starts


def reference_scan(masks, n_classes, *, multilabel=False, ignore_index=None, min_pixels=1, tile=None, stride=None):
    """(presence, counts, valid, origins) by looping over images and tiles in Python."""
    masks = np.asarray(masks)
    if multilabel and masks.ndim == 3:
        masks = masks[None]
    if not multilabel and masks.ndim == 2:
        masks = masks[None]
    h, w = masks.shape[-2:]
    th, tw = (h, w) if tile is None else (tile if isinstance(tile, tuple) else (tile, tile))
    sh, sw = (th, tw) if stride is None else (stride if isinstance(stride, tuple) else (stride, stride))
    min_px = np.broadcast_to(np.asarray(min_pixels), (n_classes,))
    counts, valid, origins = [], [], []
    for i, m in enumerate(masks):
        for y in reference_starts(h, th, sh):
            for x in reference_starts(w, tw, sw):
                part = m[..., y:y + th, x:x + tw].astype(np.int64)
                if multilabel:
                    counts.append([int(np.count_nonzero(part[c])) for c in range(n_classes)])
                    valid.append(th * tw)
                else:
                    keep = part != ignore_index if ignore_index is not None else np.ones(part.shape, bool)
                    counts.append([int(np.sum((part == c) & keep)) for c in range(n_classes)])
                    valid.append(int(keep.sum()))
                origins.append((i, y, x))
    counts = np.array(counts, dtype=np.int64).reshape(-1, n_classes)
    return (counts >= min_px, counts, np.array(valid, dtype=np.int64),
            np.array(origins, dtype=np.int64).reshape(-1, 3))


def assert_matches(scan, ref):
    presence, counts, valid, origins = ref
    assert scan.presence.dtype == np.bool_ and scan.pixel_counts.dtype == np.int64
    np.testing.assert_array_equal(scan.pixel_counts, counts)
    np.testing.assert_array_equal(scan.presence, presence)
    np.testing.assert_array_equal(scan.valid_pixels, valid)
    np.testing.assert_array_equal(scan.origins, origins)


# -- hand-made masks ---------------------------------------------------------------


def test_hand_made_label_map():
    m = np.array([[0, 0, 1, 1],
                  [0, 0, 1, 2]], dtype=np.uint8)
    s = scan_masks(m, n_classes=3)
    assert s.n_samples == 1 and s.n_classes == 3 and s.n_images == 1 and s.tile is None
    np.testing.assert_array_equal(s.pixel_counts, [[4, 3, 1]])
    np.testing.assert_array_equal(s.presence, [[True, True, True]])
    np.testing.assert_array_equal(s.origins, [[0, 0, 0]])
    np.testing.assert_allclose(s.pixel_share(), [4 / 8, 3 / 8, 1 / 8])

    tiled = scan_masks(m, n_classes=3, tile=2)
    np.testing.assert_array_equal(tiled.pixel_counts, [[4, 0, 0], [0, 3, 1]])
    np.testing.assert_array_equal(tiled.presence, [[True, False, False], [False, True, True]])
    np.testing.assert_array_equal(tiled.origins, [[0, 0, 0], [0, 0, 2]])
    np.testing.assert_allclose(tiled.class_presence(), [0.5, 0.5, 0.5])
    np.testing.assert_allclose(tiled.pixel_share(per_sample=True), [[1, 0, 0], [0, 0.75, 0.25]])

    per_class = scan_masks(m, n_classes=3, min_pixels=[1, 4, 1])
    np.testing.assert_array_equal(per_class.presence, [[True, False, True]])
    np.testing.assert_array_equal(scan_masks(m, n_classes=3, min_pixels=4).presence, [[True, False, False]])


def test_ignore_index_inside_and_outside_the_class_range():
    m = np.array([[255, 1], [255, 0]], dtype=np.uint8)
    s = scan_masks(m, n_classes=2, ignore_index=255)
    np.testing.assert_array_equal(s.pixel_counts, [[1, 1]])
    np.testing.assert_array_equal(s.valid_pixels, [2])
    np.testing.assert_allclose(s.pixel_share(), [0.5, 0.5])

    bg = scan_masks(np.array([[0, 0, 0, 2]], np.int32), n_classes=3, ignore_index=0)
    np.testing.assert_array_equal(bg.pixel_counts, [[0, 0, 1]])
    np.testing.assert_array_equal(bg.presence, [[False, False, True]])
    np.testing.assert_allclose(bg.pixel_share(), [0, 0, 1])

    # torch-style -100 in an int64 map (converted to int32)
    t = scan_masks(np.array([[-100, 1, 1]], np.int64), n_classes=2, ignore_index=-100)
    np.testing.assert_array_equal(t.pixel_counts, [[0, 2]])


def test_multilabel_overlap_and_layout_inference():
    m = np.zeros((1, 2, 2, 3), dtype=bool)
    m[0, 0, 0, :] = True      # class 0: top row
    m[0, 1, :, 0] = True      # class 1: left column, overlapping class 0 at (0, 0)
    s = scan_masks(m, n_classes=2)  # 4-D: multi-label
    np.testing.assert_array_equal(s.pixel_counts, [[3, 2]])
    np.testing.assert_array_equal(s.valid_pixels, [6])
    one = scan_masks(m[0].astype(np.uint8) * 7, n_classes=2, layout="multilabel")  # nonzero = present
    np.testing.assert_array_equal(one.pixel_counts, [[3, 2]])
    # a 3-D array without a layout is a batch of label maps
    assert scan_masks(m[0].astype(np.uint8), n_classes=2).n_samples == 2


def test_tiles_cover_the_border():
    m = np.zeros((1, 10, 7), np.uint8)
    m[0, 9, 6] = 1  # bottom-right corner pixel: only the last tile reaches it
    s = scan_masks(m, n_classes=2, tile=(4, 3))
    ys = sorted({int(y) for y in s.origins[:, 1]})
    xs = sorted({int(x) for x in s.origins[:, 2]})
    assert ys == [0, 4, 6] and xs == [0, 3, 4]
    assert s.presence[:, 1].sum() == 1
    np.testing.assert_array_equal(s.origins[s.presence[:, 1]], [[0, 6, 4]])


def test_to_table_and_from_masks():
    rng = np.random.default_rng(3)
    m = rng.choice(4, size=(6, 8, 8), p=[0.7, 0.1, 0.1, 0.1]).astype(np.uint8)
    s = scan_masks(m, n_classes=4, tile=4, class_names=["bg", "a", "b", "c"])
    table = s.to_table()
    assert table.class_names == ["bg", "a", "b", "c"] and table.mask_scan is s
    # reference grouping: row -> tuple -> dict in order of first occurrence
    seen = {}
    for row in s.presence:
        seen[tuple(row)] = seen.get(tuple(row), 0) + 1
    np.testing.assert_array_equal(table.patterns, np.array(list(seen), dtype=bool))
    np.testing.assert_array_equal(table.counts, list(seen.values()))

    via = PatternTable.from_masks(m, n_classes=4, tile=4, min_pixels=2)
    ref = reference_scan(m, 4, tile=4, min_pixels=2)[0]
    np.testing.assert_array_equal(via.patterns[via.inverse], ref)
    np.testing.assert_array_equal(via.mask_scan.presence, ref)
    np.testing.assert_allclose(table.class_presence(), s.class_presence())


# -- random masks against the reference ----------------------------------------------


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int32, np.int64, np.int16, np.uint32, np.int8])
@pytest.mark.parametrize("tiling", [None, (5, 5), ((4, 6), (3, 2))])
def test_label_maps_match_reference(dtype, tiling):
    rng = np.random.default_rng(zlib.crc32(f"{np.dtype(dtype).str}{tiling}".encode()))
    n_classes = 5
    m = rng.choice(n_classes, size=(4, 11, 13), p=[0.6, 0.2, 0.1, 0.07, 0.03]).astype(dtype)
    m[rng.random(m.shape) < 0.1] = 100  # ignored pixels
    tile, stride = (None, None) if tiling is None else ((tiling, None) if isinstance(tiling[0], int) else tiling)
    min_pixels = [1, 3, 2, 1, 2]
    s = scan_masks(m, n_classes=n_classes, ignore_index=100, min_pixels=min_pixels, tile=tile, stride=stride)
    assert_matches(s, reference_scan(m, n_classes, ignore_index=100, min_pixels=min_pixels, tile=tile, stride=stride))


@pytest.mark.parametrize("dtype", [np.bool_, np.uint8, np.int32])
def test_multilabel_matches_reference(dtype):
    rng = np.random.default_rng(7)
    m = (rng.random((3, 4, 9, 10)) < 0.2).astype(dtype)
    for tile, stride in [(None, None), (4, 2), ((9, 3), (1, 3))]:
        s = scan_masks(m, n_classes=4, tile=tile, stride=stride, min_pixels=[1, 2, 3, 4])
        assert_matches(s, reference_scan(m, 4, multilabel=True, tile=tile, stride=stride, min_pixels=[1, 2, 3, 4]))


def test_non_contiguous_and_read_only_inputs():
    rng = np.random.default_rng(11)
    base = rng.integers(0, 3, size=(3, 20, 20)).astype(np.uint8)
    view = base[:, ::2, 1::3]
    assert not view.flags.c_contiguous
    assert_matches(scan_masks(view, n_classes=3, tile=3), reference_scan(view, 3, tile=3))
    ro = base.copy()
    ro.setflags(write=False)
    assert_matches(scan_masks(ro, n_classes=3), reference_scan(ro, 3))
    ml = (rng.random((2, 3, 8, 8)) < 0.3).transpose(0, 1, 3, 2)
    assert_matches(scan_masks(ml, n_classes=3, tile=4), reference_scan(ml, 3, multilabel=True, tile=4))


def test_thread_count_does_not_change_the_result():
    rng = np.random.default_rng(5)
    m = rng.choice(6, size=(3, 64, 48), p=[0.8, 0.1, 0.05, 0.03, 0.01, 0.01]).astype(np.uint16)
    ml = rng.random((2, 3, 40, 30)) < 0.1
    ref = reference_scan(m, 6, tile=(16, 12), stride=(8, 12))
    ref_whole = reference_scan(m[:1], 6)  # one image: split into row bands across threads
    ref_ml = reference_scan(ml, 3, multilabel=True)
    for n_threads in (1, 2, 3, 8, None):
        assert_matches(scan_masks(m, n_classes=6, tile=(16, 12), stride=(8, 12), n_threads=n_threads), ref)
        assert_matches(scan_masks(m[0], n_classes=6, n_threads=n_threads), ref_whole)
        assert_matches(scan_masks(ml, n_classes=3, n_threads=n_threads), ref_ml)


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_property_label_maps(data):
    dtype = data.draw(st.sampled_from([np.uint8, np.uint16, np.int32]))
    n = data.draw(st.integers(0, 3))
    h, w = data.draw(st.integers(1, 9)), data.draw(st.integers(1, 9))
    n_classes = data.draw(st.sampled_from([1, 2, 3, 7, 63, 64, 65, 300]))
    far = [-100, -1, 2**20] if dtype == np.int32 else ([65535] if dtype == np.uint16 else [])
    ignore_index = data.draw(st.one_of(st.none(), st.integers(0, 255), st.sampled_from(far or [255])))
    ids = st.integers(0, min(n_classes, 256) - 1)
    values = ids if ignore_index is None else st.one_of(ids, st.just(ignore_index))
    flat = data.draw(st.lists(values, min_size=n * h * w, max_size=n * h * w))
    m = np.array(flat, dtype=np.int64).reshape(n, h, w).astype(dtype)
    tiled = data.draw(st.booleans())
    tile = stride = None
    if tiled:
        tile = (data.draw(st.integers(1, h)), data.draw(st.integers(1, w)))
        stride = (data.draw(st.integers(1, tile[0])), data.draw(st.integers(1, tile[1])))
    min_pixels = data.draw(st.one_of(st.integers(1, 4), st.lists(st.integers(1, 4), min_size=n_classes,
                                                                    max_size=n_classes)))
    n_threads = data.draw(st.sampled_from([1, 2, 4]))
    s = scan_masks(m, n_classes=n_classes, layout="label", ignore_index=ignore_index, min_pixels=min_pixels,
                   tile=tile, stride=stride, n_threads=n_threads)
    assert_matches(s, reference_scan(m, n_classes, ignore_index=ignore_index, min_pixels=min_pixels, tile=tile,
                                     stride=stride))
    assert s.n_images == n


@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 3), c=st.integers(1, 6), h=st.integers(1, 8), w=st.integers(1, 8),
       tile=st.one_of(st.none(), st.integers(1, 8)), seed=st.integers(0, 2**32 - 1))
def test_property_multilabel(n, c, h, w, tile, seed):
    rng = np.random.default_rng(seed)
    m = (rng.random((n, c, h, w)) < rng.random()).astype(np.uint8) * rng.integers(1, 256, (n, c, h, w)).astype(np.uint8)
    if tile is not None:
        tile = min(tile, h, w)
    s = scan_masks(m, n_classes=c, tile=tile)
    assert_matches(s, reference_scan(m, c, multilabel=True, tile=tile))


# -- streaming ---------------------------------------------------------------------


def test_scan_masks_iter_equals_one_batch_and_keeps_numbering():
    rng = np.random.default_rng(9)
    batch = rng.integers(0, 4, size=(5, 12, 12)).astype(np.uint8)
    items = [batch[0], batch[1:3], batch[3], batch[4:]]
    streamed = scan_masks_iter((x for x in items), n_classes=4, tile=6, stride=3)
    assert_matches(streamed, reference_scan(batch, 4, tile=6, stride=3))
    assert streamed.n_images == 5

    sizes = [rng.integers(0, 3, size=(8 + k, 6 + 2 * k)).astype(np.int32) for k in range(3)]
    mixed = scan_masks_iter(sizes, n_classes=3)
    np.testing.assert_array_equal(mixed.pixel_counts, [np.bincount(x.ravel(), minlength=3) for x in sizes])
    np.testing.assert_array_equal(mixed.origins[:, 0], [0, 1, 2])

    empty = scan_masks_iter([], n_classes=3)
    assert empty.n_samples == 0 and empty.presence.shape == (0, 3) and empty.n_images == 0
    np.testing.assert_array_equal(empty.class_presence(), np.zeros(3))

    bad = batch.copy()
    bad[4, 2, 7] = 9
    with pytest.raises(ValueError, match=r"mask item 2: mask value 9 at image 4, pixel \(y=2, x=7\)"):
        scan_masks_iter([batch[:2], batch[2:4], bad[4]], n_classes=4)


def test_concatenate():
    a = scan_masks(np.zeros((2, 4, 4), np.uint8), n_classes=2, tile=2)
    b = scan_masks(np.ones((1, 4, 4), np.uint8), n_classes=2, tile=2)
    joined = MaskScan.concatenate([a, b])
    assert joined.n_samples == 12 and joined.n_images == 3
    np.testing.assert_array_equal(joined.origins[:, 0], [0] * 4 + [1] * 4 + [2] * 4)
    np.testing.assert_array_equal(joined.presence[:, 1], [False] * 8 + [True] * 4)
    with pytest.raises(ValueError, match="n_classes"):
        MaskScan.concatenate([a, scan_masks(np.zeros((4, 4), np.uint8), n_classes=3)])


def test_first_image_numbers_a_batch_within_its_dataset():
    rng = np.random.default_rng(4)
    masks = rng.integers(0, 3, size=(5, 6, 6)).astype(np.uint8)
    whole = scan_masks(masks, n_classes=3, tile=3)
    later = scan_masks(masks[3:], n_classes=3, tile=3, first_image=3)
    tail = whole.origins[:, 0] >= 3
    np.testing.assert_array_equal(later.origins, whole.origins[tail])
    np.testing.assert_array_equal(later.pixel_counts, whole.pixel_counts[tail])
    assert later.n_images == 2
    bad = masks[3:].copy()
    bad[1, 2, 4] = 9
    with pytest.raises(ValueError, match=r"mask value 9 at image 4, pixel \(y=2, x=4\)"):
        scan_masks(bad, n_classes=3, first_image=3)


# -- bad input ---------------------------------------------------------------------


def test_class_id_out_of_range_names_value_image_and_pixel():
    m = np.zeros((3, 4, 5), np.uint8)
    m[2, 1, 3] = 7
    with pytest.raises(ValueError, match=r"mask value 7 at image 2, pixel \(y=1, x=3\).*n_classes=5"):
        scan_masks(m, n_classes=5)
    with pytest.raises(ValueError, match=r"mask value 7 at image 2"):
        scan_masks(m, n_classes=5, tile=2, n_threads=3)
    neg = np.zeros((2, 3, 3), np.int32)
    neg[1, 0, 0] = -1
    with pytest.raises(ValueError, match=r"mask value -1 at image 1, pixel \(y=0, x=0\)"):
        scan_masks(neg, n_classes=2, ignore_index=255)
    huge = np.zeros((1, 2, 2), np.int64)
    huge[0, 1, 1] = 2**40
    with pytest.raises(ValueError, match=f"mask value {2**40} at image 0, pixel \\(y=1, x=1\\)"):
        scan_masks(huge, n_classes=2)


@pytest.mark.parametrize("masks, options, message", [
    (np.zeros((2, 2), np.float32), {}, "dtype float32"),
    (np.zeros((1, 2, 2, 2), np.float64), {}, "dtype float64"),
    (np.zeros(4, np.uint8), {}, "ndim=1"),
    (np.zeros((1, 1, 1, 2, 2), np.uint8), {}, "ndim=5"),
    (np.zeros((1, 2, 2), np.uint8), {"layout": "multilabel"}, "1 channels but n_classes = 2"),
    (np.zeros((4, 4), np.uint8), {"layout": "rgb"}, "layout must be one of"),
    (np.zeros((4, 4), np.uint8), {"tile": 5}, "tile height 5 is larger than the image height 4"),
    (np.zeros((4, 3), np.uint8), {"tile": (2, 4)}, "tile width 4 is larger than the image width 3"),
    (np.zeros((4, 4), np.uint8), {"tile": 2, "stride": 3}, r"stride along height \(3\) must not exceed"),
    (np.zeros((4, 4), np.uint8), {"stride": 2}, "without a tile size"),
    (np.zeros((4, 4), np.uint8), {"tile": 0}, "tile must be >= 1"),
    (np.zeros((4, 4), np.uint8), {"tile": (2, 2, 2)}, "tile must be an int or a"),
    (np.zeros((4, 4), np.uint8), {"min_pixels": 0}, "min_pixels must be >= 1, got 0"),
    (np.zeros((4, 4), np.uint8), {"min_pixels": [1, 0]}, "min_pixels must be >= 1, got 0 for class 1"),
    (np.zeros((4, 4), np.uint8), {"min_pixels": [1, 2, 3]}, "min_pixels must hold 1 or n_classes = 2"),
    (np.zeros((4, 4), np.uint8), {"min_pixels": 1.5}, "min_pixels must be an integer"),
    (np.zeros((4, 4), np.uint8), {"ignore_index": 1.0}, "ignore_index must be an integer"),
    (np.zeros((1, 2, 4, 4), np.uint8), {"ignore_index": 255}, "does not apply to multi-label"),
    (np.zeros((4, 4), np.uint8), {"n_threads": 0}, "n_threads must be a positive integer"),
    (np.zeros((4, 4), np.uint8), {"first_image": -1}, "first_image must be a non-negative integer, got -1"),
    (np.zeros((4, 4), np.uint8), {"first_image": 1.0}, "first_image must be a non-negative integer"),
])
def test_bad_input(masks, options, message):
    with pytest.raises(ValueError, match=message):
        scan_masks(masks, n_classes=2, **options)


def test_bad_n_classes():
    with pytest.raises(ValueError, match="n_classes must be a positive integer, got 0"):
        scan_masks(np.zeros((2, 2), np.uint8), n_classes=0)


def test_exported_from_the_package():
    assert cobalance.scan_masks is scan_masks and cobalance.MaskScan is MaskScan
