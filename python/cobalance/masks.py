"""Segmentation masks to class presence: which classes each image (or tile) contains.

Two mask layouts are read:

``"label"``
    Label maps, one class id per pixel: ``(n_images, height, width)`` or one
    ``(height, width)`` mask. uint8, uint16 and int32 are scanned in place; bool is
    viewed as uint8; other integer dtypes are converted to int32 (a copy).
``"multilabel"``
    Multi-channel binary masks, one plane per class, nonzero = the pixel belongs to
    the class (a pixel may belong to several): ``(n_images, n_classes, height, width)``
    or one ``(n_classes, height, width)`` mask. uint8 and bool are scanned in place;
    other integer dtypes are converted with ``mask != 0`` (a copy).

A *sample* is a whole image or, with ``tile``, one tile of it. Tiles are laid out per
axis of length ``L`` at ``0, stride, 2 * stride, ...`` while ``start + tile <= L``, plus
one last tile at ``L - tile`` when those do not reach the border, so every pixel is
in at least one tile. ``stride`` may not exceed ``tile`` (no gaps) and a tile larger
than the image is an error. Samples are numbered image by image, tile rows top to
bottom, tiles left to right; :attr:`MaskScan.origins` gives each sample's image
index and top-left corner.
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence, Tuple, Union

import numpy as np

from . import _core
from ._arguments import class_count, min_pixels_per_class, size_pair, thread_count

__all__ = ["MaskScan", "scan_masks", "scan_masks_iter"]

_LAYOUTS = ("label", "multilabel")
_NATIVE_LABEL_DTYPES = (np.uint8, np.uint16, np.int32)
_INT32 = np.iinfo(np.int32)


class MaskScan:
    """Per-sample class presence and pixel counts of a set of masks.

    Built by :func:`scan_masks`, :func:`scan_masks_iter` or
    :meth:`cobalance.folders.MaskFolder.scan`.

    Attributes
    ----------
    presence : ndarray of bool, shape (n_samples, n_classes)
        ``pixel_counts >= min_pixels`` of the class.
    pixel_counts : ndarray of int64, shape (n_samples, n_classes)
        Pixels of each class in each sample.
    valid_pixels : ndarray of int64, shape (n_samples,)
        Pixels of each sample that are not ``ignore_index`` (the tile area for
        multi-label masks): the denominator of pixel shares.
    origins : ndarray of int64, shape (n_samples, 3)
        Image index, top row ``y`` and left column ``x`` of each sample.
    tile : tuple of int or None
        ``(tile_h, tile_w)`` when tiled.
    n_images : int
        Number of images scanned.
    class_names : list of str or None
    """

    def __init__(self, presence, pixel_counts, valid_pixels, origins, *, tile=None, class_names=None,
                 n_images: Optional[int] = None):
        self.presence = np.asarray(presence, dtype=np.bool_)
        self.pixel_counts = np.asarray(pixel_counts, dtype=np.int64)
        self.valid_pixels = np.asarray(valid_pixels, dtype=np.int64)
        self.origins = np.asarray(origins, dtype=np.int64)
        n, c = self.presence.shape
        if self.pixel_counts.shape != (n, c) or self.valid_pixels.shape != (n,) or self.origins.shape != (n, 3):
            raise ValueError(
                f"inconsistent shapes: presence {self.presence.shape}, pixel_counts {self.pixel_counts.shape}, "
                f"valid_pixels {self.valid_pixels.shape}, origins {self.origins.shape}")
        self.tile = tile
        # Images without samples cannot occur (every image yields at least one tile),
        # but a batch of zero images has no origins to count from.
        self.n_images = int(n_images) if n_images is not None else (int(self.origins[:, 0].max()) + 1 if n else 0)
        if class_names is not None and len(class_names) != c:
            raise ValueError(f"class_names has {len(class_names)} names for n_classes = {c}")
        self.class_names = None if class_names is None else [str(name) for name in class_names]

    @property
    def n_samples(self) -> int:
        return self.presence.shape[0]

    @property
    def n_classes(self) -> int:
        return self.presence.shape[1]

    def __len__(self) -> int:
        return self.n_samples

    def class_presence(self) -> np.ndarray:
        """Fraction of samples containing each class (float64, length n_classes; zeros when empty)."""
        if self.n_samples == 0:
            return np.zeros(self.n_classes)
        return self.presence.mean(axis=0)

    def pixel_share(self, per_sample: bool = False) -> np.ndarray:
        """Share of each class in the non-ignored pixels.

        Parameters
        ----------
        per_sample : bool
            False: one share per class over all samples (float64, length n_classes).
            True: one row per sample (n_samples x n_classes).

        Returns
        -------
        ndarray of float64
            ``pixel_counts / valid_pixels`` summed as asked; 0 where there are no valid
            pixels. Overlapping tiles count their shared pixels once per tile; for
            multi-label masks the shares may add up to more than 1 (a pixel can be in
            several classes) or less (background).
        """
        if per_sample:
            denom = self.valid_pixels[:, None].astype(np.float64)
            return np.divide(self.pixel_counts, denom, out=np.zeros(self.pixel_counts.shape), where=denom > 0)
        total = int(self.valid_pixels.sum())
        counts = self.pixel_counts.sum(axis=0).astype(np.float64)
        return counts / total if total else np.zeros(self.n_classes)

    def to_table(self, class_names: Optional[Sequence[str]] = None):
        """Group the samples' presence vectors into a :class:`cobalance.PatternTable`.

        ``class_names`` defaults to the scan's own. Returns the table, which keeps this
        scan as its ``mask_scan`` attribute.
        """
        # Imported here: scans come before tables in the data flow, and
        # PatternTable.from_masks imports this module, so a module-level import of
        # patterns would make the two modules import each other.
        from .patterns import PatternTable

        names = class_names if class_names is not None else self.class_names
        table = PatternTable.from_labels(self.presence, class_names=names)
        table.mask_scan = self
        return table

    @classmethod
    def concatenate(cls, scans: Sequence["MaskScan"], *, renumber_images: bool = True) -> "MaskScan":
        """Join scans sample-wise.

        With ``renumber_images`` the image indices of each scan are shifted to continue
        after the previous scans' images; without, origins are kept as they are.
        """
        scans = list(scans)
        if not scans:
            raise ValueError("concatenate needs at least one scan")
        n_classes = scans[0].n_classes
        for k, s in enumerate(scans):
            if s.n_classes != n_classes:
                raise ValueError(f"scan {k} has n_classes = {s.n_classes}, expected {n_classes}")
        origins = []
        offset = 0
        for s in scans:
            o = s.origins.copy()
            if renumber_images:
                o[:, 0] += offset
                offset += s.n_images
            origins.append(o)
        tiles = {s.tile for s in scans}
        return cls(np.concatenate([s.presence for s in scans]), np.concatenate([s.pixel_counts for s in scans]),
                   np.concatenate([s.valid_pixels for s in scans]), np.concatenate(origins),
                   tile=scans[0].tile if len(tiles) == 1 else None, class_names=scans[0].class_names,
                   n_images=sum(s.n_images for s in scans))

    def __repr__(self) -> str:
        return f"MaskScan(n_samples={self.n_samples}, n_classes={self.n_classes}, tile={self.tile})"


def _infer_layout(layout: Optional[str], ndim: int) -> str:
    if layout is None:
        if ndim in (2, 3):
            return "label"
        if ndim == 4:
            return "multilabel"
        raise ValueError(f"masks must be 2-D or 3-D label maps or 4-D multi-label masks, got ndim={ndim}")
    if layout not in _LAYOUTS:
        raise ValueError(f"layout must be one of {_LAYOUTS} or None, got {layout!r}")
    return layout


def _label_batch(masks: np.ndarray, ignore_index: Optional[int]) -> np.ndarray:
    """(n, h, w) uint8/uint16/int32, C-contiguous; copies only for other dtypes or layouts."""
    if masks.ndim == 2:
        masks = masks[None]
    if masks.ndim != 3:
        raise ValueError(f"label-map masks must be (height, width) or (n_images, height, width), got ndim={masks.ndim}")
    if masks.dtype == np.bool_:
        masks = masks.view(np.uint8)
    if masks.dtype.kind not in "iu":
        raise ValueError(f"label-map masks must hold integer class ids (uint8, uint16 or int32 are read in place), "
                         f"got dtype {masks.dtype}")
    if masks.dtype in _NATIVE_LABEL_DTYPES:
        return np.ascontiguousarray(masks)
    if masks.size and (masks.dtype.itemsize > 4 or masks.dtype == np.uint32):
        outside = (masks < _INT32.min) | (masks > _INT32.max)
        if outside.any():
            bad = outside if ignore_index is None else outside & (masks != ignore_index)
            if bad.any():
                i, y, x = (int(v) for v in np.argwhere(bad)[0])
                raise ValueError(f"mask value {masks[i, y, x]} at image {i}, pixel (y={y}, x={x}) is not a class id")
            raise ValueError(f"ignore_index={ignore_index} does not fit in int32, the widest label-map type")
    return np.ascontiguousarray(masks, dtype=np.int32)


def _multilabel_batch(masks: np.ndarray, n_classes: int) -> np.ndarray:
    if masks.ndim == 3:
        masks = masks[None]
    if masks.ndim != 4:
        raise ValueError(f"multi-label masks must be (n_classes, height, width) or "
                         f"(n_images, n_classes, height, width), got ndim={masks.ndim}")
    if masks.shape[1] != n_classes:
        raise ValueError(f"multi-label masks have {masks.shape[1]} channels but n_classes = {n_classes}")
    if masks.dtype == np.bool_:
        return np.ascontiguousarray(masks).view(np.uint8)
    if masks.dtype == np.uint8:
        return np.ascontiguousarray(masks)
    if masks.dtype.kind not in "iu":
        raise ValueError(f"multi-label masks must be bool or integer (nonzero = present; uint8 and bool are read "
                         f"in place), got dtype {masks.dtype}")
    return np.ascontiguousarray(masks != 0).view(np.uint8)


def scan_masks(masks, *, n_classes: int, layout: Optional[str] = None, ignore_index: Optional[int] = None,
               min_pixels: Union[int, Sequence[int]] = 1, tile: Union[None, int, Tuple[int, int]] = None,
               stride: Union[None, int, Tuple[int, int]] = None, n_threads: Optional[int] = None,
               class_names: Optional[Sequence[str]] = None, first_image: int = 0) -> MaskScan:
    """Class presence and pixel counts of every image or tile of a batch of masks.

    Parameters
    ----------
    masks : array-like
        Label maps ``(n_images, height, width)`` or ``(height, width)``, or multi-label
        masks ``(n_images, n_classes, height, width)`` or ``(n_classes, height, width)``
        (see the module docstring for dtypes). C-contiguous uint8/uint16/int32 label
        maps and uint8/bool multi-label masks are read without a copy; other dtypes
        and non-contiguous arrays are copied once.
    n_classes : int
        Number of classes; label-map ids must lie in ``[0, n_classes)``.
    layout : {"label", "multilabel"}, optional
        Default: inferred from ``masks.ndim`` (2 or 3: label maps, 4: multi-label).
        A single ``(n_classes, height, width)`` multi-label mask needs
        ``layout="multilabel"``.
    ignore_index : int, optional
        Label maps only: pixels with this value belong to no class and are left out
        of :attr:`MaskScan.valid_pixels`. It may be a class id (e.g. 0 for
        background) or any other value (e.g. 255). Default: none.
    min_pixels : int or sequence of int
        A class is present in a sample from this many of its pixels on; one value for
        all classes or one per class. Default 1.
    tile : int or (int, int), optional
        Tile height and width; each tile is a sample. Default: whole images.
    stride : int or (int, int), optional
        Step between tiles, ``1 <= stride <= tile``. Default: the tile size.
    n_threads : int, optional
        Threads; default all cores. The result is the same for every value.
    class_names : sequence of str, optional
        Stored on the scan and used by :meth:`MaskScan.to_table`.
    first_image : int
        Index of the batch's first image in :attr:`MaskScan.origins` and in error
        messages, for a dataset scanned batch by batch. Default 0.

    Returns
    -------
    MaskScan

    Raises
    ------
    ValueError
        Wrong ndim or dtype; a label-map value outside ``[0, n_classes)`` that is not
        ``ignore_index`` (the message names the value, the image index and the
        pixel); multi-label channels != n_classes; a tile larger than the image
        (naming both sizes); stride > tile; min_pixels < 1 or of the wrong length;
        ignore_index with multi-label masks; first_image negative or not an integer.
    """
    n_classes = class_count(n_classes)
    if isinstance(first_image, bool) or not isinstance(first_image, (int, np.integer)) or first_image < 0:
        raise ValueError(f"first_image must be a non-negative integer, got {first_image!r}")
    arr = np.asarray(masks)
    layout = _infer_layout(layout, arr.ndim)
    if ignore_index is not None and (not isinstance(ignore_index, (int, np.integer)) or isinstance(ignore_index, bool)):
        raise ValueError(f"ignore_index must be an integer or None, got {ignore_index!r}")
    min_px = min_pixels_per_class(min_pixels, n_classes)
    tile_hw = (0, 0) if tile is None else size_pair(tile, "tile")
    if stride is not None and tile is None:
        raise ValueError(f"stride={stride!r} given without a tile size")
    stride_hw = tile_hw if stride is None else size_pair(stride, "stride")
    threads = thread_count(n_threads)
    if layout == "label":
        batch = _label_batch(arr, ignore_index)
        parts = _core.scan_label_maps(batch, n_classes, None if ignore_index is None else int(ignore_index),
                                      min_px, tile_hw, stride_hw, threads, int(first_image))
    else:
        if ignore_index is not None:
            raise ValueError(f"ignore_index={ignore_index} does not apply to multi-label masks (0/nonzero per class)")
        batch = _multilabel_batch(arr, n_classes)
        parts = _core.scan_binary_masks(batch, min_px, tile_hw, stride_hw, threads, int(first_image))
    presence, pixel_counts, valid_pixels, origins = parts
    return MaskScan(presence.view(np.bool_), pixel_counts, valid_pixels, origins,
                    tile=None if tile is None else tile_hw, class_names=class_names, n_images=batch.shape[0])


def scan_masks_iter(masks: Iterable, *, n_classes: int, layout: Optional[str] = None,
                    ignore_index: Optional[int] = None, min_pixels: Union[int, Sequence[int]] = 1,
                    tile: Union[None, int, Tuple[int, int]] = None,
                    stride: Union[None, int, Tuple[int, int]] = None, n_threads: Optional[int] = None,
                    class_names: Optional[Sequence[str]] = None) -> MaskScan:
    """:func:`scan_masks` over an iterable of masks, one item at a time.

    Each item is anything :func:`scan_masks` accepts (one mask or a batch; items may
    differ in size), so masks too large to hold together are read and scanned one
    by one and only the per-sample results are kept. Image indices in
    :attr:`MaskScan.origins` count images across all items in order.

    Parameters are those of :func:`scan_masks` (but ``first_image``). Errors name the item: a bad value in
    item ``k`` raises ValueError starting with ``"mask item k: "``, and the image index
    in the message counts across items like the origins do.
    """
    scans = []
    n_images = 0
    for k, item in enumerate(masks):
        try:
            scan = scan_masks(item, n_classes=n_classes, layout=layout, ignore_index=ignore_index,
                              min_pixels=min_pixels, tile=tile, stride=stride, n_threads=n_threads,
                              class_names=class_names, first_image=n_images)
        except ValueError as err:
            raise ValueError(f"mask item {k}: {err}") from None
        n_images += scan.n_images
        scans.append(scan)
    if not scans:
        n_classes = class_count(n_classes)
        min_pixels_per_class(min_pixels, n_classes)
        return MaskScan(np.zeros((0, n_classes), np.bool_), np.zeros((0, n_classes), np.int64),
                        np.zeros(0, np.int64), np.zeros((0, 3), np.int64),
                        tile=None if tile is None else size_pair(tile, "tile"), class_names=class_names, n_images=0)
    return MaskScan.concatenate(scans, renumber_images=False)
