"""Reproducible kornia augmentation of duplicated samples, applied batch-wise on any device."""

from __future__ import annotations

import hashlib
from typing import Optional, Sequence, Tuple

import torch

try:
    import kornia.augmentation as K
    from kornia.augmentation.container.params import ParamItem
    from kornia.constants import DataKey, Resample
except ImportError as exc:  # pragma: no cover - exercised only without kornia
    raise ImportError(
        "cobalance.segmentation.augmentation needs kornia; install it with `pip install cobalance[torch]`"
    ) from exc

__all__ = ["DuplicateAugmentation", "sample_seed"]

# Keys of a kornia parameter dict that describe the call, not a sample.
_SHAPE_KEY = "forward_input_shape"
# ColorJitter draws one order of its four operations for a whole batch; a batch-wide
# draw cannot be reproduced per sample, so the order is fixed to the declared one.
_ORDER_KEY = "order"


def sample_seed(seed: int, sample: int, copy_index: int) -> int:
    """The seed of one copy's augmentation: a hash of (seed, sample, copy_index).

    A 63-bit integer from BLAKE2b, so that nearby triples give unrelated streams and
    the value is the same on every platform and Python version.
    """
    digest = hashlib.blake2b(f"{int(seed)}:{int(sample)}:{int(copy_index)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _as_pair(value, name: str) -> Tuple[float, float]:
    if isinstance(value, (int, float)):
        return float(value), float(value)
    if len(value) != 2:
        raise ValueError(f"{name} must be a number or a pair, got {value!r}")
    return float(value[0]), float(value[1])


class DuplicateAugmentation:
    """Augment the duplicates of a balanced batch; leave originals unchanged.

    A kornia ``AugmentationSequential(..., data_keys=["input", "mask"])`` of, in order:
    horizontal and vertical flips (each with probability 0.5), an elastic transform
    (always; the balancing method's choice), then, when asked for, an affine rotation
    and scaling and a colour jitter (each always applied). Masks are resampled with
    nearest interpolation and filled with 0 outside the image, so a label map keeps
    exact class ids and each channel of a multi-label mask stays 0/1.

    Reproducibility: the parameters of each augmented item are drawn on the CPU from
    torch's generator seeded by :func:`sample_seed` ``(seed, sample, copy_index)``
    (inside ``torch.random.fork_rng``, so the caller's random state is untouched), then
    stacked and applied to the whole batch at once on the batch's device. A duplicate
    therefore gets the same transformation whatever the batch it is in and whatever the
    device. The outputs then agree up to floating-point rounding (batched kernels may
    round image values differently, about 1e-6; on another device a mask pixel that
    sits exactly on a sampling boundary may flip). Because kornia draws from torch's
    global CPU generator, augmentations must not be called from several threads at
    once (DataLoader worker processes are fine).

    Parameters
    ----------
    seed : int
    augment_originals : bool
        Also augment items with ``copy_index == 0`` (default: they pass unchanged).
    flips : bool
    elastic : bool
    elastic_kernel_size, elastic_sigma, elastic_alpha : pair
        Passed to ``kornia.augmentation.RandomElasticTransform``: Gaussian kernel size
        and standard deviation in pixels (``(y, x)``), displacement scale in normalised
        coordinates (``(x, y)``). The defaults follow the reference implementation's
        elastic augmentation (MakiFlow ``ElasticAugment``: noise smoothed with a
        Gaussian of 8 px): on 512 x 512 images the mean displacement is about 8 px
        (kornia's own defaults, sigma 32 and alpha 1, move pixels by about 2 px).
        ``alpha`` is relative to the image size, so smaller images move fewer pixels.
    rotation : float or pair, optional
        Rotation range in degrees (``30`` means ``(-30, 30)``); ``None`` for none.
    scale : pair, optional
        Scaling range, e.g. ``(0.9, 1.1)``; ``None`` for none.
    color_jitter : sequence of 4 floats, optional
        ``(brightness, contrast, saturation, hue)`` for ``kornia.augmentation.ColorJitter``
        with its four operations in that fixed order; images only.
    extra : sequence of kornia augmentations, optional
        Appended after the above; each must draw per-sample parameters (no batch-wide
        draws), else ``__call__`` raises ``ValueError``.

    Attributes
    ----------
    sequential : kornia.augmentation.AugmentationSequential
        The pipeline. It stays on the CPU, where parameters are drawn: this class is
        not an ``nn.Module``, so moving a model does not move it.

    Examples
    --------
    >>> aug = DuplicateAugmentation(seed=0, rotation=15)          # doctest: +SKIP
    >>> for images, masks, sample, copy_index in loader:          # doctest: +SKIP
    ...     images, masks = aug(images.cuda(), masks.cuda(), sample, copy_index)
    """

    def __init__(
        self,
        *,
        seed: int = 0,
        augment_originals: bool = False,
        flips: bool = True,
        elastic: bool = True,
        elastic_kernel_size: Tuple[int, int] = (49, 49),
        elastic_sigma: Tuple[float, float] = (8.0, 8.0),
        elastic_alpha: Tuple[float, float] = (2.0, 2.0),
        rotation=None,
        scale: Optional[Tuple[float, float]] = None,
        color_jitter: Optional[Sequence[float]] = None,
        extra: Sequence = (),
    ) -> None:
        self.seed = int(seed)
        self.augment_originals = bool(augment_originals)
        modules = []
        if flips:
            modules += [K.RandomHorizontalFlip(p=0.5), K.RandomVerticalFlip(p=0.5)]
        if elastic:
            modules.append(
                K.RandomElasticTransform(
                    kernel_size=tuple(int(k) for k in elastic_kernel_size),
                    sigma=_as_pair(elastic_sigma, "elastic_sigma"),
                    alpha=_as_pair(elastic_alpha, "elastic_alpha"),
                    p=1.0,
                )
            )
        if rotation is not None or scale is not None:
            degrees = 0.0 if rotation is None else rotation
            if isinstance(degrees, (int, float)):
                degrees = (-abs(float(degrees)), abs(float(degrees)))
            modules.append(K.RandomAffine(degrees=_as_pair(degrees, "rotation"), scale=scale, p=1.0))
        if color_jitter is not None:
            if len(color_jitter) != 4:
                raise ValueError(
                    f"color_jitter must be (brightness, contrast, saturation, hue), got {color_jitter!r}"
                )
            modules.append(K.ColorJitter(*[float(v) for v in color_jitter], p=1.0))
        for module in extra:
            if getattr(module, "same_on_batch", False):
                raise ValueError(
                    f"extra augmentation {type(module).__name__} has same_on_batch=True: one transformation per "
                    "batch cannot be reproduced per sample"
                )
            modules.append(module)
        if not modules:
            raise ValueError("DuplicateAugmentation needs at least one augmentation (all were switched off)")
        self.sequential = K.AugmentationSequential(
            *modules,
            data_keys=["input", "mask"],
            # kornia's mask default, with align_corners stated as the images' (False).
            extra_args={DataKey.MASK: {"resample": Resample.NEAREST, "align_corners": False}},
        )
        self._batched_keys = {}

    # ------------------------------------------------------------------ parameters

    def _keys_with_batch_axis(self, shape: torch.Size):
        """Per module, the parameter keys that carry a batch axis.

        Found from draws for batches of 2 and 3: a key is batched when its leading
        size follows the batch size in both (a fixed-size vector of length 2 or 3
        cannot pass for both).
        """
        key = tuple(shape[1:])
        if key not in self._batched_keys:
            found = []
            for size in (2, 3):
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(0)
                    probe = self.sequential.forward_parameters(torch.Size((size, *shape[1:])))
                found.append({
                    item.name: {
                        k for k, v in item.data.items()
                        if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == size
                    }
                    for item in probe
                    if isinstance(item.data, dict)
                })
            self._batched_keys[key] = {name: keys & found[1].get(name, set()) for name, keys in found[0].items()}
        return self._batched_keys[key]

    def parameters_for(self, shape, samples, copies):
        """kornia parameters for a batch, drawn item by item from each item's seed.

        Parameters
        ----------
        shape : torch.Size
            Shape of the batch of images ``(B, C, H, W)`` to be augmented.
        samples, copies : sequence of int, length B
            Source sample and copy index of each item.

        Returns
        -------
        list of kornia ``ParamItem`` on the CPU, for ``sequential(..., params=...)``.

        Raises
        ------
        ValueError
            When an augmentation draws parameters shared by the whole batch.
        """
        shape = torch.Size(shape)
        one = torch.Size((1, *shape[1:]))
        draws = []
        for sample, copy in zip(samples, copies):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(sample_seed(self.seed, sample, copy))
                draws.append(self.sequential.forward_parameters(one))
        batched = self._keys_with_batch_axis(shape)
        merged = []
        for position, head in enumerate(draws[0]):
            items = [d[position] for d in draws]
            if not isinstance(head.data, dict):
                if any(item.data is not None for item in items):
                    raise ValueError(
                        f"augmentation {head.name!r} is a nested container; pass plain kornia augmentations"
                    )
                merged.append(head)
                continue
            data = {}
            for key, value in head.data.items():
                if key in batched.get(head.name, ()):
                    data[key] = torch.cat([item.data[key] for item in items], dim=0)
                elif key == _SHAPE_KEY:
                    data[key] = torch.tensor([shape[0], *value.tolist()[1:]], dtype=value.dtype)
                elif key == _ORDER_KEY:
                    data[key] = torch.arange(value.numel(), dtype=value.dtype)
                elif isinstance(value, torch.Tensor) and any(not torch.equal(item.data[key], value) for item in items):
                    raise ValueError(
                        f"augmentation {head.name!r} draws {key!r} once for the whole batch, so it cannot be "
                        "reproduced per sample; use an augmentation with per-sample parameters"
                    )
                else:
                    data[key] = value
            merged.append(ParamItem(head.name, data))
        return merged

    # ------------------------------------------------------------------ application

    def __call__(self, images: torch.Tensor, masks: torch.Tensor, samples, copy_index):
        """Augment the selected items of a batch.

        Parameters
        ----------
        images : Tensor, float, (B, C, H, W)
        masks : Tensor, (B, H, W) label map (any integer dtype) or (B, K, H, W)
            multi-label mask (0/1, any dtype); on ``images``' device.
        samples : Tensor or sequence of int, (B,)
            Source sample index of each item (``BalancedDataset(..., with_source=True)``).
        copy_index : Tensor or sequence of int, (B,)
            0 for an original, k for its k-th duplicate.

        Returns
        -------
        images, masks : Tensors of the input shapes, dtypes and device; unselected items
        are the input items unchanged.

        Raises
        ------
        ValueError
            On shapes that do not agree, a non-float image batch, or masks on another
            device.
        """
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or not images.is_floating_point():
            raise ValueError(
                f"images must be a float tensor (B, C, H, W), got "
                f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}"
            )
        b, _, h, w = images.shape
        if not isinstance(masks, torch.Tensor) or masks.dim() not in (3, 4) or masks.shape[0] != b or \
                tuple(masks.shape[-2:]) != (h, w):
            raise ValueError(
                f"masks must be (B, H, W) or (B, K, H, W) with B, H, W = {(b, h, w)} of images, got "
                f"{tuple(masks.shape) if isinstance(masks, torch.Tensor) else type(masks).__name__}"
            )
        if masks.device != images.device:
            raise ValueError(f"masks are on {masks.device} but images on {images.device}")
        samples = torch.as_tensor(samples).reshape(-1).tolist()
        copies = torch.as_tensor(copy_index).reshape(-1).tolist()
        if len(samples) != b or len(copies) != b:
            raise ValueError(
                f"samples and copy_index need {b} entries (the batch size), got {len(samples)}, {len(copies)}"
            )
        chosen = [k for k in range(b) if self.augment_originals or copies[k] > 0]
        if not chosen:
            return images, masks
        label_map = masks.dim() == 3
        picked = torch.tensor(chosen, device=images.device)
        sub_images = images.index_select(0, picked)
        sub_masks = masks.index_select(0, picked)
        sub_masks = (sub_masks.unsqueeze(1) if label_map else sub_masks).to(images.dtype)
        params = self.parameters_for(sub_images.shape, [samples[k] for k in chosen], [copies[k] for k in chosen])
        params = [_to_device(item, images.device) for item in params]
        out_images, out_masks = self.sequential(sub_images, sub_masks, params=params)
        # Nearest resampling keeps mask values exact; round() only undoes the float cast.
        out_masks = out_masks.round().to(masks.dtype)
        if label_map:
            out_masks = out_masks.squeeze(1)
        images = images.index_copy(0, picked, out_images.to(images.dtype))
        masks = masks.index_copy(0, picked, out_masks)
        return images, masks


def _to_device(item: ParamItem, device: torch.device) -> ParamItem:
    if not isinstance(item.data, dict):
        return item
    return ParamItem(item.name, {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in item.data.items()})
