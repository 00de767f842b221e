"""Augmentation of duplicates and vDice: batched kornia / cobalance against per-sample loops and torchmetrics.

Run:
    PYTHONPATH=python .venv/bin/python -m pytest benchmarks/bench_augmentation.py --benchmark-only

Sizes: batches of 512 x 512 image + mask pairs (8 by default; COBALANCE_BENCH_BATCH to change),
vDice on 16 x 5-class 512 x 512 predictions. Throughput = items / mean time per round.
"""

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("kornia")
scipy_ndimage = pytest.importorskip("scipy.ndimage")

from cobalance import metrics as np_metrics  # noqa: E402
from cobalance.segmentation import DuplicateAugmentation, vdice  # noqa: E402

BATCH = int(os.environ.get("COBALANCE_BENCH_BATCH", "8"))
SIZE = 512
N_CLASSES = 5


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(BATCH, 3, SIZE, SIZE, generator=g)
    masks = torch.randint(0, N_CLASSES, (BATCH, SIZE, SIZE), generator=g)
    samples = list(range(BATCH))
    copies = [1] * BATCH  # all duplicates: everything is augmented
    return images, masks, samples, copies


@pytest.fixture(scope="module")
def augment_case():
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    return _batch()


def _check(images, masks, out_images, out_masks):
    assert out_images.shape == images.shape and out_masks.shape == masks.shape
    assert set(torch.unique(out_masks).tolist()) <= set(range(N_CLASSES))
    assert not torch.equal(out_masks, masks)


@pytest.mark.benchmark(group="augment 512x512 image+mask")
def test_kornia_batched(benchmark, augment_case):
    images, masks, samples, copies = augment_case
    aug = DuplicateAugmentation(seed=0)
    out_images, out_masks = benchmark.pedantic(aug, args=(images, masks, samples, copies), rounds=2, iterations=1,
                                               warmup_rounds=1)
    _check(images, masks, out_images, out_masks)
    benchmark.extra_info["images_per_s"] = BATCH / benchmark.stats.stats.mean
    # a batch gives every item the transformation it gets alone
    alone_images, alone_masks = aug(images[:1], masks[:1], samples[:1], copies[:1])
    assert torch.equal(alone_masks[0], out_masks[0])


@pytest.mark.benchmark(group="augment 512x512 image+mask")
def test_kornia_per_sample_loop(benchmark, augment_case):
    images, masks, samples, copies = augment_case
    aug = DuplicateAugmentation(seed=0)

    def loop():
        outs = [aug(images[k:k + 1], masks[k:k + 1], samples[k:k + 1], copies[k:k + 1]) for k in range(BATCH)]
        return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])

    out_images, out_masks = benchmark.pedantic(loop, rounds=2, iterations=1, warmup_rounds=0)
    _check(images, masks, out_images, out_masks)
    benchmark.extra_info["images_per_s"] = BATCH / benchmark.stats.stats.mean


def _rigid():
    return DuplicateAugmentation(seed=0, elastic=False, rotation=20, scale=(0.9, 1.1))


@pytest.mark.benchmark(group="flips + rotation/scale 512x512 image+mask")
def test_rigid_kornia_batched(benchmark, augment_case):
    images, masks, samples, copies = augment_case
    aug = _rigid()
    out_images, out_masks = benchmark.pedantic(aug, args=(images, masks, samples, copies), rounds=3, iterations=1,
                                               warmup_rounds=1)
    _check(images, masks, out_images, out_masks)
    benchmark.extra_info["images_per_s"] = BATCH / benchmark.stats.stats.mean


@pytest.mark.benchmark(group="flips + rotation/scale 512x512 image+mask")
def test_rigid_kornia_per_sample_loop(benchmark, augment_case):
    images, masks, samples, copies = augment_case
    aug = _rigid()

    def loop():
        outs = [aug(images[k:k + 1], masks[k:k + 1], samples[k:k + 1], copies[k:k + 1]) for k in range(BATCH)]
        return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])

    out_images, out_masks = benchmark.pedantic(loop, rounds=3, iterations=1, warmup_rounds=1)
    _check(images, masks, out_images, out_masks)
    batched = aug(images, masks, samples, copies)
    assert torch.equal(batched[1], out_masks)  # the loop and the batch agree item for item
    benchmark.extra_info["images_per_s"] = BATCH / benchmark.stats.stats.mean


def _scipy_elastic_flip(image, mask, rng, sigma=32.0, alpha=1.0):
    """The classic per-sample recipe: smoothed random displacements + map_coordinates, then flips."""
    h, w = mask.shape
    dy = scipy_ndimage.gaussian_filter(rng.uniform(-1, 1, (h, w)), sigma, mode="constant") * alpha * h / 2
    dx = scipy_ndimage.gaussian_filter(rng.uniform(-1, 1, (h, w)), sigma, mode="constant") * alpha * w / 2
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    coords = np.stack([yy + dy, xx + dx])
    out_image = np.stack([scipy_ndimage.map_coordinates(ch, coords, order=1, mode="constant") for ch in image])
    out_mask = scipy_ndimage.map_coordinates(mask, coords, order=0, mode="constant")
    if rng.random() < 0.5:
        out_image, out_mask = out_image[:, :, ::-1], out_mask[:, ::-1]
    if rng.random() < 0.5:
        out_image, out_mask = out_image[:, ::-1], out_mask[::-1]
    return out_image, out_mask


@pytest.mark.benchmark(group="augment 512x512 image+mask")
def test_scipy_per_sample_loop(benchmark, augment_case):
    images, masks, _, _ = augment_case
    np_images, np_masks = images.numpy(), masks.numpy()

    def loop():
        rng = np.random.default_rng(0)
        outs = [_scipy_elastic_flip(np_images[k], np_masks[k], rng) for k in range(BATCH)]
        return np.stack([o[0] for o in outs]), np.stack([o[1] for o in outs])

    out_images, out_masks = benchmark.pedantic(loop, rounds=2, iterations=1, warmup_rounds=0)
    assert set(np.unique(out_masks).tolist()) <= set(range(N_CLASSES))
    benchmark.extra_info["images_per_s"] = BATCH / benchmark.stats.stats.mean


# ----------------------------------------------------------------------------- vDice

N_IMAGES = 16


@pytest.fixture(scope="module")
def dice_case():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(N_IMAGES, N_CLASSES, SIZE, SIZE, generator=g)
    target = torch.randint(0, N_CLASSES, (N_IMAGES, SIZE, SIZE), generator=g)
    return logits, target


@pytest.fixture(scope="module")
def torchmetrics_vdice(dice_case):
    from torchmetrics.functional.segmentation import dice_score

    logits, target = dice_case

    def run():
        return dice_score(logits.argmax(1), target, num_classes=N_CLASSES, average="macro",
                          aggregation_level="global", input_format="index")[0]

    return run


@pytest.mark.benchmark(group="vDice 16x5x512x512 label maps from logits")
def test_vdice_cobalance_torch(benchmark, dice_case, torchmetrics_vdice):
    logits, target = dice_case
    got = benchmark.pedantic(lambda: vdice(logits, target, num_classes=N_CLASSES, reduction="global"), rounds=3,
                             iterations=1, warmup_rounds=1)
    torch.testing.assert_close(got.float(), torchmetrics_vdice().float())
    benchmark.extra_info["images_per_s"] = N_IMAGES / benchmark.stats.stats.mean


@pytest.mark.benchmark(group="vDice 16x5x512x512 label maps from logits")
def test_vdice_torchmetrics(benchmark, torchmetrics_vdice):
    got = benchmark.pedantic(torchmetrics_vdice, rounds=3, iterations=1, warmup_rounds=1)
    assert 0.0 < float(got) < 1.0
    benchmark.extra_info["images_per_s"] = N_IMAGES / benchmark.stats.stats.mean


@pytest.mark.benchmark(group="vDice 16x5x512x512 label maps from logits")
def test_vdice_cobalance_numpy(benchmark, dice_case, torchmetrics_vdice):
    logits, target = dice_case
    np_logits, np_target = logits.numpy(), target.numpy()
    got = benchmark.pedantic(lambda: np_metrics.vdice(np_logits, np_target, num_classes=N_CLASSES),
                             rounds=3, iterations=1, warmup_rounds=1)
    assert got == pytest.approx(float(torchmetrics_vdice()), rel=1e-6)
    benchmark.extra_info["images_per_s"] = N_IMAGES / benchmark.stats.stats.mean
