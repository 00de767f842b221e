"""Dice / vDice: hand-computed cases, a brute-force reference, torchmetrics, numpy == torch."""

import math
import subprocess
import sys
import zlib

import numpy as np
import pytest

from cobalance import metrics as npm
from conftest import PACKAGE_PARENT


def test_numpy_metrics_need_no_torch():
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['kornia'] = None\n"
        "import numpy as np, cobalance\n"
        "print(cobalance.vdice(np.array([[0, 1, 1]]), np.array([[0, 1, 0]]), num_classes=2))\n"
        "try:\n    import cobalance.segmentation\nexcept ImportError as e:\n    print('ImportError', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(PACKAGE_PARENT)})
    first, second = out.stdout.splitlines()
    # class 0: 2*1/(1+2) = 2/3, class 1: 2*1/(2+1) = 2/3
    assert float(first) == pytest.approx(2 / 3)
    assert second.startswith("ImportError") and "pip install cobalance[torch]" in second


torch = pytest.importorskip("torch")
from cobalance.segmentation import metrics as tm  # noqa: E402


def brute_force_dice(pred_on, target_on, valid, absent):
    """Per-image, per-class Dice by explicit loops over 0/1 arrays (N, C, H, W)."""
    n, c = target_on.shape[:2]
    out = np.empty((n, c))
    for i in range(n):
        for k in range(c):
            v = valid[i, k]
            p = pred_on[i, k][v]
            t = target_on[i, k][v]
            denom = int(p.sum()) + int(t.sum())
            out[i, k] = (np.nan if absent == "skip" else 1.0) if denom == 0 else 2.0 * int((p & t).sum()) / denom
    return out


def brute_force_global(pred_on, target_on, valid, absent):
    c = target_on.shape[1]
    out = np.empty(c)
    for k in range(c):
        v = valid[:, k]
        p, t = pred_on[:, k][v], target_on[:, k][v]
        denom = int(p.sum()) + int(t.sum())
        out[k] = (np.nan if absent == "skip" else 1.0) if denom == 0 else 2.0 * int((p & t).sum()) / denom
    return out


def one_hot(labels, c):
    return np.stack([labels == k for k in range(c)], axis=1)


# ---------------------------------------------------------------- hand-computed


def test_label_map_hand_computed():
    target = np.array([[0, 0, 1], [1, 2, 2]])
    pred = np.array([[0, 1, 1], [1, 1, 2]])
    # class 0: tp 1, P 1, T 2 -> 2/3; class 1: tp 2, P 4, T 2 -> 4/6; class 2: tp 1, P 1, T 2 -> 2/3
    expected = np.array([2 / 3, 2 / 3, 2 / 3])
    np.testing.assert_allclose(npm.dice_per_class(pred, target, num_classes=3), expected)
    got = tm.dice_per_class(torch.from_numpy(pred), torch.from_numpy(target), num_classes=3)
    np.testing.assert_allclose(got.numpy(), expected)
    assert npm.vdice(pred, target, num_classes=3) == pytest.approx(2 / 3)


def test_absent_class_policy_hand_computed():
    # class 3 is in neither prediction nor target
    target = np.array([[0, 0, 1, 1]])
    pred = np.array([[0, 1, 1, 1]])
    # class 0: 2*1/(1+2)=2/3; class 1: 2*2/(3+2)=4/5; class 2: absent both -> skip/one
    skip = npm.dice_per_class(pred, target, num_classes=3, absent="skip")
    np.testing.assert_allclose(skip[:2], [2 / 3, 4 / 5])
    assert math.isnan(skip[2])
    assert npm.vdice(pred, target, num_classes=3, absent="skip") == pytest.approx((2 / 3 + 4 / 5) / 2)
    one = npm.dice_per_class(pred, target, num_classes=3, absent="one")
    np.testing.assert_allclose(one, [2 / 3, 4 / 5, 1.0])
    assert npm.vdice(pred, target, num_classes=3, absent="one") == pytest.approx((2 / 3 + 4 / 5 + 1) / 3)
    t = tm.vdice(torch.from_numpy(pred), torch.from_numpy(target), num_classes=3, absent="one")
    assert float(t) == pytest.approx((2 / 3 + 4 / 5 + 1) / 3)


def test_multilabel_overlapping_hand_computed():
    # two overlapping channels on a 1 x 4 image
    target = np.array([[[[1, 1, 0, 0]], [[0, 1, 1, 0]]]], dtype=np.uint8)
    probs = np.array([[[[0.9, 0.2, 0.7, 0.1]], [[0.6, 0.8, 0.9, 0.4]]]], dtype=np.float32)
    # ch0: pred 1 0 1 0 -> tp 1, P 2, T 2 -> 0.5; ch1: pred 1 1 1 0 -> tp 2, P 3, T 2 -> 0.8
    np.testing.assert_allclose(npm.dice_per_class(probs, target, num_classes=2), [0.5, 0.8])
    logits = np.log(probs / (1 - probs))
    np.testing.assert_allclose(npm.dice_per_class(logits, target, num_classes=2, pred_format="logits"), [0.5, 0.8])
    got = tm.dice_per_class(torch.from_numpy(logits), torch.from_numpy(target), num_classes=2, pred_format="logits")
    np.testing.assert_allclose(got.numpy(), [0.5, 0.8], rtol=1e-12)


def test_ignore_index_hand_computed():
    target = np.array([[0, 255, 1, 1]])
    pred = np.array([[0, 0, 1, 0]])
    # ignored pixel 1 drops out: class 0 tp 1 P 2 T 1 -> 2/3; class 1 tp 1 P 1 T 2 -> 2/3
    np.testing.assert_allclose(npm.dice_per_class(pred, target, num_classes=2, ignore_index=255), [2 / 3, 2 / 3])
    got = tm.dice_per_class(torch.from_numpy(pred), torch.from_numpy(target), num_classes=2, ignore_index=255)
    np.testing.assert_allclose(got.numpy(), [2 / 3, 2 / 3])


def test_per_image_mean_hand_computed():
    target = np.array([[[1, 1]], [[0, 0]]])
    pred = np.array([[[1, 0]], [[0, 0]]])
    # image 0: class 0 tp 0 P 1 T 0 -> 0, class 1 tp 1 P 1 T 2 -> 2/3
    # image 1: class 0 -> 1, class 1 absent -> NaN (skip)
    none = npm.dice_per_class(pred, target, num_classes=2, reduction="none")
    np.testing.assert_allclose(none, [[0, 2 / 3], [1, np.nan]])
    np.testing.assert_allclose(npm.dice_per_class(pred, target, num_classes=2, reduction="per_image"), [0.5, 2 / 3])
    # global: class 0 tp 2 P 3 T 2 -> 0.8; class 1 tp 1 P 1 T 2 -> 2/3
    np.testing.assert_allclose(npm.dice_per_class(pred, target, num_classes=2), [0.8, 2 / 3])


# ---------------------------------------------------------------- references on random inputs


def _random_case(rng, layout, n=3, c=4, h=9, w=7, ignore=False):
    if layout == "label_map":
        target = rng.integers(0, c, (n, h, w))
        # make some classes absent in some images
        target[0][target[0] == c - 1] = 0
        if ignore:
            target[rng.random(target.shape) < 0.1] = 255
        scores = rng.normal(size=(n, c, h, w)).astype(np.float32)
        return scores, target
    target = (rng.random((n, c, h, w)) < 0.3).astype(np.uint8)
    target[1, 0] = 0
    if ignore:
        target[rng.random(target.shape) < 0.1] = 255
    logits = rng.normal(size=(n, c, h, w)).astype(np.float32) * 2
    return logits, target


def _decoded(scores, target, layout, c, ignore_index):
    if layout == "label_map":
        pred_on = one_hot(scores.argmax(1), c)
        target_on = one_hot(target, c)
        valid = np.broadcast_to((target != ignore_index)[:, None], target_on.shape) if ignore_index else None
    else:
        pred_on = scores > 0
        target_on = target == 1
        valid = target != ignore_index if ignore_index else None
    if valid is None:
        valid = np.ones(target_on.shape, bool)
    return pred_on, target_on, valid


@pytest.mark.parametrize("layout", ["label_map", "multilabel"])
@pytest.mark.parametrize("absent", ["skip", "one"])
@pytest.mark.parametrize("ignore", [False, True])
def test_numpy_and_torch_match_brute_force(layout, absent, ignore):
    rng = np.random.default_rng(7)
    c = 4
    scores, target = _random_case(rng, layout, c=c, ignore=ignore)
    ignore_index = 255 if ignore else None
    pred_on, target_on, valid = _decoded(scores, target, layout, c, ignore_index)
    ref_none = brute_force_dice(pred_on, target_on, valid, absent)
    ref_global = brute_force_global(pred_on, target_on, valid, absent)
    kw = dict(num_classes=c, ignore_index=ignore_index, absent=absent)
    for name, ref in [("none", ref_none), ("global", ref_global), ("per_image", np.nanmean(ref_none, 0))]:
        got_np = npm.dice_per_class(scores, target, reduction=name, **kw)
        got_t = tm.dice_per_class(torch.from_numpy(scores), torch.from_numpy(target), reduction=name, **kw)
        np.testing.assert_allclose(got_np, ref, rtol=1e-12, err_msg=name)
        np.testing.assert_allclose(got_t.numpy(), ref, rtol=1e-12, err_msg=name)
        np.testing.assert_allclose(
            tm.vdice(torch.from_numpy(scores), torch.from_numpy(target), reduction=name, **kw).numpy(),
            np.nanmean(ref, axis=-1),
            rtol=1e-12,
        )


@pytest.mark.parametrize("layout", ["label_map", "multilabel"])
def test_equals_torchmetrics(layout):
    torchmetrics = pytest.importorskip("torchmetrics")
    from torchmetrics.functional.segmentation import dice_score
    from torchmetrics.segmentation import DiceScore

    rng = np.random.default_rng(11)
    c = 5
    scores, target = _random_case(rng, layout, n=6, c=c, h=16, w=16)
    s, t = torch.from_numpy(scores), torch.from_numpy(target)
    if layout == "label_map":
        tm_pred, tm_target, fmt = s.argmax(1), t.long(), "index"
    else:
        tm_pred, tm_target, fmt = (s > 0).long(), t.long(), "one-hot"
    kw = dict(num_classes=c, include_background=True, input_format=fmt)
    ours = dict(num_classes=c, absent="skip")
    ref = dice_score(tm_pred, tm_target, average="none", aggregation_level="samplewise", **kw)
    torch.testing.assert_close(tm.dice_per_class(s, t, reduction="none", **ours), ref.double(), equal_nan=True)
    ref = dice_score(tm_pred, tm_target, average="none", aggregation_level="global", **kw)[0]
    torch.testing.assert_close(tm.dice_per_class(s, t, reduction="global", **ours), ref.double(), equal_nan=True)
    ref = dice_score(tm_pred, tm_target, average="macro", aggregation_level="global", **kw)[0]
    torch.testing.assert_close(tm.vdice(s, t, reduction="global", **ours), ref.double())
    ref = dice_score(tm_pred, tm_target, average="macro", aggregation_level="samplewise", **kw)
    torch.testing.assert_close(tm.vdice(s, t, reduction="none", **ours), ref.double())

    # the module metric, streamed in uneven batches, against our per-image meter
    metric = DiceScore(average="none", **kw)
    meter = tm.DiceMeter(c, mode="per_image")
    for lo, hi in [(0, 1), (1, 4), (4, 6)]:
        metric.update(tm_pred[lo:hi], tm_target[lo:hi])
        meter.update(s[lo:hi], t[lo:hi])
    torch.testing.assert_close(meter.compute().per_class, metric.compute().double(), equal_nan=True)
    assert torchmetrics.__version__


@pytest.mark.parametrize("mode", ["global", "per_image"])
@pytest.mark.parametrize("layout", ["label_map", "multilabel"])
def test_meter_streams_like_one_shot(mode, layout):
    rng = np.random.default_rng(3)
    scores, target = _random_case(rng, layout, n=7, c=3, ignore=True)
    reduction = mode
    ref = npm.dice_per_class(scores, target, num_classes=3, ignore_index=255, reduction=reduction)
    meter_np = npm.DiceMeter(3, mode=mode, ignore_index=255)
    meter_t = tm.DiceMeter(3, mode=mode, ignore_index=255)
    for lo, hi in [(0, 2), (2, 3), (3, 7)]:
        meter_np.update(scores[lo:hi], target[lo:hi])
        meter_t.update(torch.from_numpy(scores[lo:hi]), torch.from_numpy(target[lo:hi]))
    np.testing.assert_allclose(meter_np.compute().per_class, ref, rtol=1e-12)
    np.testing.assert_allclose(meter_t.compute().per_class.numpy(), ref, rtol=1e-12)
    assert meter_np.compute().vdice == pytest.approx(float(np.nanmean(ref)))
    assert meter_np.n_images == 7
    meter_np.reset()
    with pytest.raises(ValueError, match="before any update"):
        meter_np.compute()


def test_pred_formats_agree():
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(2, 3, 8, 8)).astype(np.float32)
    target = (rng.random((2, 3, 8, 8)) < 0.4).astype(np.uint8)
    probs = 1 / (1 + np.exp(-logits.astype(np.float64)))
    labels = (logits > 0).astype(np.int64)
    a = npm.dice_per_class(logits, target, num_classes=3)  # auto -> logits (values outside [0, 1])
    b = npm.dice_per_class(probs, target, num_classes=3)  # auto -> probs
    c = npm.dice_per_class(labels, target, num_classes=3)  # auto -> labels
    np.testing.assert_allclose(a, b)
    np.testing.assert_allclose(a, c)
    lt = tm.dice_per_class(torch.from_numpy(labels), torch.from_numpy(target), num_classes=3)
    np.testing.assert_allclose(lt.numpy(), a)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
@pytest.mark.parametrize("layout", ["label_map", "multilabel"])
def test_cpu_equals_cuda(layout):
    rng = np.random.default_rng(9)
    scores, target = _random_case(rng, layout, n=4, c=4, h=32, w=32, ignore=True)
    s, t = torch.from_numpy(scores), torch.from_numpy(target)
    for reduction in ("global", "per_image", "none"):
        cpu = tm.dice_per_class(s, t, num_classes=4, ignore_index=255, reduction=reduction)
        gpu = tm.dice_per_class(s.cuda(), t.cuda(), num_classes=4, ignore_index=255, reduction=reduction)
        assert gpu.device.type == "cuda"
        torch.testing.assert_close(gpu.cpu(), cpu, equal_nan=True)


@pytest.mark.parametrize("impl", ["numpy", "torch"])
def test_bad_input_names_the_argument(impl):
    mod = npm if impl == "numpy" else tm
    conv = np.asarray if impl == "numpy" else torch.as_tensor
    target = conv(np.array([[0, 1], [2, 1]]))
    with pytest.raises(ValueError, match="num_classes"):
        mod.dice_per_class(target, target, num_classes=0)
    with pytest.raises(ValueError, match="target holds class id 2"):
        mod.dice_per_class(target, target, num_classes=2)
    with pytest.raises(ValueError, match="pred must be class ids shaped like target"):
        mod.dice_per_class(target[:1], target, num_classes=3)
    with pytest.raises(ValueError, match="absent"):
        mod.dice_per_class(target, target, num_classes=3, absent="zero")
    with pytest.raises(ValueError, match="reduction"):
        mod.dice_per_class(target, target, num_classes=3, reduction="mean")
    with pytest.raises(ValueError, match="ignore_index=1 is a class id"):
        mod.dice_per_class(target, target, num_classes=3, ignore_index=1)
    ml = conv(np.full((1, 2, 2, 2), 3, dtype=np.uint8))
    with pytest.raises(ValueError, match="target of a multi-label mask must be 0 or 1"):
        mod.dice_per_class(ml * 0, ml, num_classes=2)
    with pytest.raises(ValueError, match="num_classes=3 channels"):
        mod.dice_per_class(ml, ml, num_classes=3)


# ---------------------------------------------------------------- numpy and torch front ends agree


def _front_end_case(rng, layout, n=4, c=4, h=6, w=5):
    """(pred, target, options) for every layout and pred kind the front ends take."""
    if layout in ("scores", "ids", "single_map"):
        target = rng.integers(0, c, (n, h, w))
        target[0][target[0] == c - 1] = 0  # a class absent from one image
        scores = rng.normal(size=(n, c, h, w)).astype(np.float32)
        pred = scores if layout == "scores" else scores.argmax(1)
        if layout == "single_map":
            return pred[0].astype(np.uint8), target[0].astype(np.int32), {}
        return pred, target, {}
    target = (rng.random((n, c, h, w)) < 0.3).astype(np.uint8)
    target[1, 0] = 0
    logits = (rng.normal(size=(n, c, h, w)) * 2).astype(np.float32)
    if layout == "ml_logits":
        return logits, target, {"pred_format": "logits", "threshold": 0.3}
    if layout == "ml_probs":
        return 1 / (1 + np.exp(-logits.astype(np.float64))), target, {"threshold": 0.7}
    return (logits > 0).astype(np.bool_), target, {"pred_format": "labels"}


@pytest.mark.parametrize("layout", ["scores", "ids", "single_map", "ml_logits", "ml_probs", "ml_labels"])
@pytest.mark.parametrize("absent", ["skip", "one"])
@pytest.mark.parametrize("ignore", [False, True])
def test_numpy_and_torch_front_ends_agree(layout, absent, ignore):
    rng = np.random.default_rng(zlib.crc32(f"{layout} {absent} {ignore}".encode()))
    pred, target, options = _front_end_case(rng, layout)
    if ignore:
        target = target.copy()
        target[rng.random(target.shape) < 0.15] = 255
    kw = dict(num_classes=4, ignore_index=255 if ignore else None, **options)
    pt, tt = torch.from_numpy(np.ascontiguousarray(pred)), torch.from_numpy(target)
    for a, b in zip(npm.dice_counts(pred, target, **kw), tm.dice_counts(pt, tt, **kw)):
        np.testing.assert_array_equal(a, b.numpy())
        assert a.dtype == np.int64 and b.dtype == torch.int64
    for reduction in ("global", "per_image", "none"):
        got_np = npm.dice_per_class(pred, target, absent=absent, reduction=reduction, **kw)
        got_t = tm.dice_per_class(pt, tt, absent=absent, reduction=reduction, **kw)
        np.testing.assert_array_equal(got_np, got_t.numpy())
        v_np = npm.vdice(pred, target, absent=absent, reduction=reduction, **kw)
        v_t = tm.vdice(pt, tt, absent=absent, reduction=reduction, **kw)
        np.testing.assert_array_equal(v_np, v_t.numpy())
        assert isinstance(v_np, float) == (reduction != "none")
    if layout == "single_map":
        return
    for mode in ("global", "per_image"):
        meters = npm.DiceMeter(mode=mode, absent=absent, **kw), tm.DiceMeter(mode=mode, absent=absent, **kw)
        for lo, hi in [(0, 1), (1, 4)]:
            meters[0].update(pred[lo:hi], target[lo:hi])
            meters[1].update(pt[lo:hi], tt[lo:hi])
        r_np, r_t = meters[0].compute(), meters[1].compute()
        np.testing.assert_array_equal(r_np.per_class, r_t.per_class.numpy())
        np.testing.assert_array_equal(r_np.vdice, r_t.vdice.numpy())
        for field in ("tp", "pred_sum", "target_sum", "image_dice_sum", "image_dice_count"):
            np.testing.assert_array_equal(getattr(meters[0], field), getattr(meters[1], field).numpy(), err_msg=field)


@pytest.mark.parametrize("impl", ["numpy", "torch"])
@pytest.mark.parametrize("mode", ["global", "per_image"])
def test_meter_fields_mean_the_same_in_every_mode(impl, mode):
    rng = np.random.default_rng(13)
    scores, target = _random_case(rng, "label_map", n=5, c=4, ignore=True)
    pred_on, target_on, valid = _decoded(scores, target, "label_map", 4, 255)
    mod, conv = (npm, np.asarray) if impl == "numpy" else (tm, torch.from_numpy)
    meter = mod.DiceMeter(4, mode=mode, ignore_index=255, absent="skip")
    for lo, hi in [(0, 2), (2, 5)]:
        meter.update(conv(scores[lo:hi]), conv(target[lo:hi]))
    # brute-force counts summed over images, and per-image Dice sums and counts
    p, t = pred_on & valid, target_on & valid
    np.testing.assert_array_equal(np.asarray(meter.tp), (p & t).sum((0, 2, 3)))
    np.testing.assert_array_equal(np.asarray(meter.pred_sum), p.sum((0, 2, 3)))
    np.testing.assert_array_equal(np.asarray(meter.target_sum), t.sum((0, 2, 3)))
    per_image = brute_force_dice(pred_on, target_on, valid, "skip")
    np.testing.assert_allclose(np.asarray(meter.image_dice_sum), np.nansum(per_image, 0), rtol=1e-12)
    np.testing.assert_array_equal(np.asarray(meter.image_dice_count), (~np.isnan(per_image)).sum(0))
    assert meter.n_images == 5
    meter.reset()
    assert meter.tp is None and meter.image_dice_sum is None and meter.n_images == 0


def test_torch_meter_refuses_a_batch_on_another_device():
    meter = tm.DiceMeter(2)
    meter.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.zeros(1, 2, 2, dtype=torch.long))
    meter.tp = meter.tp.to("meta")  # stands in for another device on a CPU-only machine
    with pytest.raises(ValueError, match="meter accumulates on meta"):
        meter.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.zeros(1, 2, 2, dtype=torch.long))
