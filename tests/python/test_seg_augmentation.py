"""DuplicateAugmentation: exact masks, untouched originals, per-copy reproducibility."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("kornia")
from cobalance.segmentation.augmentation import DuplicateAugmentation, sample_seed  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


H = W = 64


def batch(n, seed=0, classes=4, multilabel=False):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, H, W, generator=g)
    if multilabel:
        masks = (torch.rand(n, classes, H, W, generator=g) < 0.3).to(torch.uint8)
    else:
        masks = torch.randint(0, classes, (n, H, W), generator=g)
    return images, masks


def full_pipeline(seed=5, **kw):
    return DuplicateAugmentation(seed=seed, rotation=25, scale=(0.8, 1.2), color_jitter=(0.2, 0.2, 0.2, 0.05), **kw)


@pytest.mark.parametrize("multilabel", [False, True])
def test_masks_keep_their_value_set_and_dtype(multilabel):
    images, masks = batch(6, multilabel=multilabel)
    out_images, out_masks = full_pipeline()(images, masks, list(range(6)), [1, 2, 1, 3, 1, 1])
    assert out_masks.dtype == masks.dtype and out_masks.shape == masks.shape
    allowed = {0, 1} if multilabel else {0, 1, 2, 3}
    assert set(torch.unique(out_masks).tolist()) <= allowed
    assert out_images.shape == images.shape and out_images.dtype == images.dtype
    assert not torch.equal(out_masks, masks), "duplicates must be transformed"


def test_originals_pass_unchanged_and_duplicates_change():
    images, masks = batch(5)
    copies = [0, 1, 0, 2, 0]
    out_images, out_masks = full_pipeline()(images, masks, [10, 10, 11, 11, 12], copies)
    for k, c in enumerate(copies):
        if c == 0:
            assert torch.equal(out_images[k], images[k]) and torch.equal(out_masks[k], masks[k])
        else:
            assert not torch.equal(out_images[k], images[k])
    assert torch.equal(images, batch(5)[0]), "the input batch is not modified in place"


def test_augment_originals_option():
    images, masks = batch(2)
    out_images, _ = full_pipeline(augment_originals=True)(images, masks, [0, 1], [0, 0])
    assert not torch.equal(out_images[0], images[0]) and not torch.equal(out_images[1], images[1])


@pytest.mark.parametrize("multilabel", [False, True])
def test_duplicate_is_reproduced_whatever_the_batch(multilabel):
    images, masks = batch(6, seed=1, multilabel=multilabel)
    samples, copies = [3, 7, 7, 9, 2, 4], [1, 1, 2, 1, 0, 5]
    out_images, out_masks = full_pipeline()(images, masks, samples, copies)
    # item 2 (sample 7, copy 2) alone, then in another batch order with other companions
    alone_images, alone_masks = full_pipeline()(images[2:3], masks[2:3], [7], [2])
    assert torch.equal(alone_masks[0], out_masks[2])
    torch.testing.assert_close(alone_images[0], out_images[2], rtol=0, atol=1e-5)
    order = [5, 2, 0]
    other_images, other_masks = full_pipeline()(images[order], masks[order], [samples[k] for k in order],
                                                [copies[k] for k in order])
    for j, k in enumerate(order):
        assert torch.equal(other_masks[j], out_masks[k])
        torch.testing.assert_close(other_images[j], out_images[k], rtol=0, atol=1e-5)
    # a different seed or copy index gives a different transformation
    _, reseeded = full_pipeline(seed=6)(images[2:3], masks[2:3], [7], [2])
    _, next_copy = full_pipeline()(images[2:3], masks[2:3], [7], [3])
    assert not torch.equal(reseeded[0], out_masks[2]) and not torch.equal(next_copy[0], out_masks[2])


def test_callers_random_state_is_untouched():
    images, masks = batch(3)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    full_pipeline()(images, masks, [0, 1, 2], [1, 1, 1])
    assert torch.equal(torch.get_rng_state(), state)


def test_mask_follows_the_image_geometry():
    # flips only: exact, so an image channel that encodes the label map must still match it
    _, masks = batch(8, seed=2)
    images = (masks.to(torch.float32) / 3).unsqueeze(1).repeat(1, 3, 1, 1)
    aug = DuplicateAugmentation(seed=0, elastic=False)
    out_images, out_masks = aug(images, masks, list(range(8)), [1] * 8)
    assert torch.equal(torch.round(out_images[:, 0] * 3).long(), out_masks)
    flipped = [not torch.equal(out_masks[k], masks[k]) for k in range(8)]
    assert any(flipped), "p=0.5 flips over 8 items flip at least one (fixed seeds)"


def test_elastic_moves_mask_with_image():
    # smooth label map: elastic + nearest mask must agree with the bilinear image almost everywhere
    yy, xx = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    masks = ((xx // 16 + yy // 16) % 2).unsqueeze(0).repeat(2, 1, 1)
    images = masks.to(torch.float32).unsqueeze(1).repeat(1, 3, 1, 1)
    aug = DuplicateAugmentation(seed=0, flips=False, elastic_alpha=(4.0, 4.0), rotation=20)
    out_images, out_masks = aug(images, masks, [0, 1], [1, 1])
    inside = out_images[:, 0] > 0.05  # away from the zero-filled border
    agree = (torch.round(out_images[:, 0]).long() == out_masks)[inside].float().mean()
    assert agree > 0.95
    assert not torch.equal(out_masks, masks)


def test_sample_seed_is_stable_and_distinct():
    assert sample_seed(0, 1, 2) == sample_seed(0, 1, 2)
    seeds = {sample_seed(s, i, c) for s in range(3) for i in range(10) for c in range(4)}
    assert len(seeds) == 120
    assert all(0 <= x < 2**63 for x in seeds)


def test_batch_wide_parameters_are_refused():
    import kornia.augmentation as K
    from kornia.augmentation import IntensityAugmentationBase2D

    with pytest.raises(ValueError, match="same_on_batch=True"):
        DuplicateAugmentation(extra=[K.RandomHorizontalFlip(p=0.5, same_on_batch=True)])

    class BatchWideGain(IntensityAugmentationBase2D):
        """Draws one gain per channel for the whole batch (no batch axis)."""

        def generate_parameters(self, shape):
            return {"gain": torch.rand(3)}

        def apply_transform(self, input, params, flags, transform=None):
            return input * params["gain"].view(1, 3, 1, 1)

    aug = DuplicateAugmentation(seed=0, flips=False, elastic=False, extra=[BatchWideGain(p=1.0)])
    images, masks = batch(2)
    with pytest.raises(ValueError, match="'gain' once for the whole batch"):
        aug(images, masks, [0, 1], [1, 1])
    out_images, _ = aug(images[:1], masks[:1], [0], [1])  # one item: nothing to disagree on
    assert out_images.shape == images[:1].shape


def test_bad_input_raises():
    images, masks = batch(2)
    aug = DuplicateAugmentation(seed=0)
    with pytest.raises(ValueError, match="images must be a float tensor"):
        aug((images * 255).to(torch.uint8), masks, [0, 1], [1, 1])
    with pytest.raises(ValueError, match="masks must be"):
        aug(images, masks[:, :32], [0, 1], [1, 1])
    with pytest.raises(ValueError, match="batch size"):
        aug(images, masks, [0], [1, 1])
    with pytest.raises(ValueError, match="color_jitter"):
        DuplicateAugmentation(color_jitter=(0.1, 0.1))
    with pytest.raises(ValueError, match="at least one augmentation"):
        DuplicateAugmentation(flips=False, elastic=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cpu_and_cuda_agree():
    images, masks = batch(4, seed=3)
    cpu_images, cpu_masks = full_pipeline()(images, masks, [0, 1, 2, 3], [1, 2, 1, 1])
    gpu_images, gpu_masks = full_pipeline()(images.cuda(), masks.cuda(), [0, 1, 2, 3], [1, 2, 1, 1])
    assert gpu_images.device.type == "cuda"
    # nearest sampling may flip a pixel that sits on a rounding boundary
    assert (gpu_masks.cpu() == cpu_masks).float().mean() > 0.999
    torch.testing.assert_close(gpu_images.cpu(), cpu_images, rtol=0, atol=1e-3)


def test_numpy_free_of_global_seed():
    # two fresh objects with the same seed agree exactly (nothing depends on global state)
    images, masks = batch(3)
    np.random.seed(0)
    torch.manual_seed(0)
    a = full_pipeline()(images, masks, [0, 1, 2], [1, 1, 1])
    np.random.seed(1)
    torch.manual_seed(1)
    b = full_pipeline()(images, masks, [0, 1, 2], [1, 1, 1])
    assert torch.equal(a[1], b[1]) and torch.equal(a[0], b[0])
