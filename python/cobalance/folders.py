"""Folders of images and segmentation masks, read lazily with numpy and Pillow.

Two layouts are read (``root`` is the folder given to :class:`MaskFolder`)::

    label_map                             binary_folders
    root/images/<id>.jpg|png|...          root/images/<id>.jpg|png|...
    root/masks/<id>.png                   root/masks/<CLASS>/<id>.png
    root/classes.txt (optional)

``label_map``: one single-channel mask per image holding class ids (uint8, 16-bit or
32-bit PNG/TIFF, or a palette PNG whose indices are the ids); the class names come
from ``class_names`` or from ``classes.txt`` (one name per line, line ``i`` = id ``i``).

``binary_folders``: one folder per class holding a 0/nonzero mask for every image that
has the class; a missing file means the class is absent from that image. Classes may
overlap, so masks are multi-label, ``(n_classes, height, width)``. This is how IDRiD
ships (see :func:`sample_path`).

Only file headers are read when the folder is opened (to check sizes and to lay out
the tiles); pixels are decoded when asked for.
"""

from __future__ import annotations

import collections
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from . import _core
from .masks import MaskScan, _min_pixels, _pair, _scan
from .patterns import _threads

__all__ = ["MaskFolder", "sample_path"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")
MASK_SUFFIXES = (".png", ".tif", ".tiff", ".bmp")
_LAYOUTS = ("auto", "label_map", "binary_folders")


def sample_path() -> Path:
    """The small IDRiD sample shipped with cobalance (``binary_folders`` layout).

    8 fundus images downscaled to 536 x 356 with their lesion masks (MA, HE, EX, SE,
    OD), CC BY 4.0; see the README.md inside the folder for attribution.
    """
    return Path(__file__).resolve().parent / "data" / "idrid_sample"


def _pillow():
    try:
        from PIL import Image
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("reading mask folders needs Pillow: pip install pillow") from err
    return Image


def _files_by_stem(folder: Path, suffixes: Sequence[str]) -> Dict[str, Path]:
    """Visible files of ``folder`` with one of ``suffixes`` (any case), keyed by stem."""
    found: Dict[str, Path] = {}
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith(".") or not entry.is_file() or entry.suffix.lower() not in suffixes:
            continue
        if entry.stem in found:
            raise ValueError(f"two files for {entry.stem!r} in {folder}: {found[entry.stem].name} and {entry.name}")
        found[entry.stem] = entry
    return found


def _read_label_map(path: Path) -> np.ndarray:
    img = _pillow().open(path)
    if img.mode in ("L", "P"):
        return np.asarray(img, dtype=np.uint8)
    if img.mode == "1":
        return np.asarray(img).astype(np.uint8)
    if img.mode.startswith("I;16"):
        return np.asarray(img).astype(np.uint16)
    if img.mode == "I":
        return np.asarray(img).astype(np.int32)
    raise ValueError(f"label-map mask {path} must be a single-channel image of class ids (mode L, P, I;16 or I), "
                     f"got mode {img.mode}")


def _read_binary_into(path: Path, out: np.ndarray) -> None:
    """Writes the 0/1 plane of a binary mask file into ``out`` (uint8, height x width).

    For multi-channel files a pixel is set when any channel is nonzero.
    """
    with _pillow().open(path) as img:
        arr = np.asarray(img)
    if arr.ndim == 3:
        arr = arr.any(axis=2)
    if arr.dtype == np.bool_:
        out[...] = arr  # 1-bit files decode to bool: a cast, no compare needed
    else:
        np.not_equal(arr, 0, out=out.view(np.bool_))


def _checked_index(index, size: int, what: str, items: str) -> int:
    """``index`` (negative counts from the end) as a position in ``[0, size)``; IndexError otherwise."""
    if not isinstance(index, (int, np.integer)) or isinstance(index, bool) or not -size <= index < size:
        raise IndexError(f"{what} {index!r} out of range for {size} {items}")
    return int(index) % size


class MaskFolder:
    """A folder of images and segmentation masks, as samples (whole images or tiles).

    Parameters
    ----------
    root : str or path
        The folder holding ``image_dir`` and ``mask_dir``.
    layout : {"auto", "label_map", "binary_folders"}
        ``"auto"``: ``binary_folders`` when ``mask_dir`` holds sub-folders,
        ``label_map`` when it holds mask files.
    class_names : sequence of str, optional
        ``label_map``: the name of each class id (required unless ``root/classes.txt``
        exists). ``binary_folders``: the class folders to read, in this order
        (default: every sub-folder, sorted by name); other sub-folders are left out.
    image_dir, mask_dir : str
        Sub-folders of ``root``.
    tile : int or (int, int), optional
        Cut every image into tiles of this size; each tile is a sample (tiles cover
        the image, see :mod:`cobalance.masks`). Default: whole images.
    stride : int or (int, int), optional
        Step between tiles, ``1 <= stride <= tile``. Default: the tile size.
    ignore_index : int, optional
        ``label_map`` only: the id of pixels that belong to no class.
    min_pixels : int or sequence of int
        A class is present in a sample from this many pixels on (one value or one
        per class).

    Attributes
    ----------
    root : Path
    layout : str
        ``"label_map"`` or ``"binary_folders"``.
    class_names : list of str
    n_classes : int
    image_ids : list of str
        Image file stems, sorted; image index ``i`` is ``image_ids[i]``.
    image_sizes : ndarray of int64, shape (n_images, 2)
        ``(height, width)`` of every image.
    origins : ndarray of int64, shape (n_samples, 3)
        Image index and tile top-left ``(y, x)`` of every sample, in the order of
        :meth:`scan`.

    Raises
    ------
    ValueError
        Naming the file or folder: a missing or empty folder, a mask without an
        image, an image without its label map, a mask whose size differs from its
        image's, a class name with no folder, no class names for a label-map folder,
        a tile larger than an image, ``ignore_index`` with ``binary_folders``.

    Notes
    -----
    The decoded pixels of the last image read are kept (one image and one mask), so
    reading the tiles of one image in a row decodes it once; they are not pickled.
    Every reading method returns new arrays.
    """

    def __init__(self, root, *, layout: str = "auto", class_names: Optional[Sequence[str]] = None,
                 image_dir: str = "images", mask_dir: str = "masks",
                 tile: Union[None, int, Tuple[int, int]] = None, stride: Union[None, int, Tuple[int, int]] = None,
                 ignore_index: Optional[int] = None, min_pixels: Union[int, Sequence[int]] = 1):
        self.root = Path(root)
        if layout not in _LAYOUTS:
            raise ValueError(f"layout must be one of {_LAYOUTS}, got {layout!r}")
        if not self.root.is_dir():
            raise ValueError(f"mask folder {self.root} does not exist or is not a folder")
        images_dir, masks_dir = self.root / image_dir, self.root / mask_dir
        for folder in (images_dir, masks_dir):
            if not folder.is_dir():
                raise ValueError(f"folder {folder} is missing")
        images = _files_by_stem(images_dir, IMAGE_SUFFIXES)
        if not images:
            raise ValueError(f"image folder {images_dir} is empty (no {'/'.join(IMAGE_SUFFIXES)} files)")
        self.image_ids: List[str] = sorted(images)
        self._image_paths = [images[i] for i in self.image_ids]
        self.layout = self._resolve_layout(layout, masks_dir)

        if self.layout == "label_map":
            self.class_names = self._label_map_classes(class_names)
            masks = _files_by_stem(masks_dir, MASK_SUFFIXES)
            self._check_masks_have_images(masks, masks_dir, images_dir)
            missing = [i for i in self.image_ids if i not in masks]
            if missing:
                raise ValueError(f"image {images[missing[0]]} has no label-map mask in {masks_dir} "
                                 f"({len(missing)} images without a mask)")
            self._mask_paths: List[List[Optional[Path]]] = [[masks[i]] for i in self.image_ids]
        else:
            if ignore_index is not None:
                raise ValueError(f"ignore_index={ignore_index} does not apply to binary_folders masks (0/nonzero)")
            self.class_names = self._binary_classes(class_names, masks_dir)
            per_class = []
            for name in self.class_names:
                files = _files_by_stem(masks_dir / name, MASK_SUFFIXES)
                self._check_masks_have_images(files, masks_dir / name, images_dir)
                per_class.append(files)
            self._mask_paths = [[files.get(i) for files in per_class] for i in self.image_ids]
        self.n_classes = len(self.class_names)

        self.image_sizes = np.array([self._header_size(p) for p in self._image_paths], dtype=np.int64).reshape(-1, 2)
        for i, paths in enumerate(self._mask_paths):
            for path in paths:
                if path is not None and self._header_size(path) != tuple(self.image_sizes[i]):
                    h, w = self._header_size(path)
                    raise ValueError(f"mask {path} is {h} x {w} (height x width) but its image "
                                     f"{self._image_paths[i]} is {self.image_sizes[i, 0]} x {self.image_sizes[i, 1]}")

        self.tile = None if tile is None else _pair(tile, "tile")
        if stride is not None and tile is None:
            raise ValueError(f"stride={stride!r} given without a tile size")
        self.stride = None if stride is None else _pair(stride, "stride")
        self.ignore_index = None if ignore_index is None else int(ignore_index)
        self.min_pixels = _min_pixels(min_pixels, self.n_classes)
        self.origins = self._lay_out_tiles()
        self._cache: Dict[str, Tuple[int, np.ndarray]] = {}
        self._scan: Optional[MaskScan] = None

    # -- opening ------------------------------------------------------------------

    @staticmethod
    def _resolve_layout(layout: str, masks_dir: Path) -> str:
        has_dirs = any(e.is_dir() and not e.name.startswith(".") for e in masks_dir.iterdir())
        has_files = bool(_files_by_stem(masks_dir, MASK_SUFFIXES))
        if layout != "auto":
            return layout
        if has_dirs and has_files:
            raise ValueError(f"{masks_dir} holds both mask files and class folders; pass layout='label_map' "
                             f"or layout='binary_folders'")
        if has_dirs:
            return "binary_folders"
        if has_files:
            return "label_map"
        raise ValueError(f"mask folder {masks_dir} is empty (no class folders and no {'/'.join(MASK_SUFFIXES)} files)")

    def _label_map_classes(self, class_names) -> List[str]:
        if class_names is None:
            listing = self.root / "classes.txt"
            if not listing.is_file():
                raise ValueError(f"a label-map folder needs class_names, or {listing} with one name per line")
            class_names = [line.strip() for line in listing.read_text(encoding="utf-8").splitlines() if line.strip()]
            if not class_names:
                raise ValueError(f"{listing} lists no class names")
        names = [str(n) for n in class_names]
        if not names:
            raise ValueError("class_names is empty")
        return names

    @staticmethod
    def _binary_classes(class_names, masks_dir: Path) -> List[str]:
        available = sorted(e.name for e in masks_dir.iterdir() if e.is_dir() and not e.name.startswith("."))
        if class_names is None:
            if not available:
                raise ValueError(f"mask folder {masks_dir} has no class folders")
            return available
        names = [str(n) for n in class_names]
        if not names:
            raise ValueError("class_names is empty")
        unknown = [n for n in names if n not in available]
        if unknown:
            raise ValueError(f"unknown class names {unknown}: no such folders in {masks_dir} (it has {available})")
        return names

    def _check_masks_have_images(self, masks: Dict[str, Path], masks_dir: Path, images_dir: Path) -> None:
        orphans = sorted(set(masks) - set(self.image_ids))
        if orphans:
            raise ValueError(f"mask {masks[orphans[0]]} has no image in {images_dir} "
                             f"({len(orphans)} masks in {masks_dir} without an image)")

    @staticmethod
    def _header_size(path: Path) -> Tuple[int, int]:
        with _pillow().open(path) as img:  # reads the header only
            w, h = img.size
        return h, w

    def _lay_out_tiles(self) -> np.ndarray:
        if self.tile is None:
            n = len(self.image_ids)
            return np.column_stack([np.arange(n), np.zeros(n, np.int64), np.zeros(n, np.int64)]).astype(np.int64)
        stride = self.stride or self.tile
        rows = []
        for i, (h, w) in enumerate(self.image_sizes):
            try:
                ys = _core.tile_starts(int(h), self.tile[0], stride[0], "height")
                xs = _core.tile_starts(int(w), self.tile[1], stride[1], "width")
            except ValueError as err:
                raise ValueError(f"image {self._image_paths[i]} ({h} x {w}): {err}") from None
            yy, xx = np.meshgrid(ys, xs, indexing="ij")
            rows.append(np.column_stack([np.full(yy.size, i), yy.ravel(), xx.ravel()]))
        return np.concatenate(rows).astype(np.int64)

    # -- reading ------------------------------------------------------------------

    def __len__(self) -> int:
        """Number of samples: images, or tiles when tiling."""
        return int(self.origins.shape[0])

    @property
    def n_images(self) -> int:
        return len(self.image_ids)

    def image_path(self, i: int) -> Path:
        """Path of image ``i``."""
        return self._image_paths[self._image_index(i)]

    def mask_paths(self, i: int) -> List[Optional[Path]]:
        """Mask files of image ``i``: one for ``label_map``; one per class (None = absent) for ``binary_folders``."""
        return list(self._mask_paths[self._image_index(i)])

    def _image_index(self, i) -> int:
        return _checked_index(i, self.n_images, "image index", "images")

    def load_image(self, i: int) -> np.ndarray:
        """Image ``i`` as a new ``(height, width, 3)`` uint8 RGB array."""
        return self._decoded_image(self._image_index(i)).copy()

    def _decoded_image(self, i: int) -> np.ndarray:
        """Image ``i``, read-only, decoded once for consecutive calls."""
        cached = self._cache.get("image")
        if cached is not None and cached[0] == i:
            return cached[1]
        with _pillow().open(self._image_paths[i]) as img:
            arr = np.asarray(img.convert("RGB"))
        arr.flags.writeable = False
        self._cache["image"] = (i, arr)
        return arr

    def load_mask(self, i: int) -> np.ndarray:
        """Mask of image ``i``, as a new array.

        Returns
        -------
        ndarray
            ``label_map``: ``(height, width)`` class ids (uint8; uint16 or int32 for
            16/32-bit files). ``binary_folders``: ``(n_classes, height, width)`` uint8
            of 0/1, zeros for a class without a file.
        """
        return self._decoded_mask(self._image_index(i)).copy()

    def _decoded_mask(self, i: int) -> np.ndarray:
        """Mask ``i``, read-only, decoded once for consecutive calls."""
        cached = self._cache.get("mask")
        if cached is not None and cached[0] == i:
            return cached[1]
        arr = self._read_mask(i)
        arr.flags.writeable = False
        self._cache["mask"] = (i, arr)
        return arr

    def sample(self, k: int) -> Tuple[np.ndarray, np.ndarray]:
        """Sample ``k``: its image and mask, cut to the tile when tiling.

        Returns
        -------
        image : ndarray of uint8, shape (tile_h, tile_w, 3)
        mask : ndarray, shape (tile_h, tile_w) or (n_classes, tile_h, tile_w)
            New C-contiguous arrays (the caller may modify them). Whole images when
            not tiling.
        """
        i, y, x = (int(v) for v in self.origins[_checked_index(k, len(self), "sample index", "samples")])
        image, mask = self._decoded_image(i), self._decoded_mask(i)
        if self.tile is None:
            return image.copy(), mask.copy()
        th, tw = self.tile
        return image[y:y + th, x:x + tw].copy(), mask[..., y:y + th, x:x + tw].copy()

    # -- statistics ---------------------------------------------------------------

    def scan(self, n_threads: Optional[int] = None) -> MaskScan:
        """Class presence and pixel counts of every sample.

        Masks are decoded one image at a time (images are not decoded; up to
        ``n_threads`` masks are decoded ahead in threads) and scanned natively; the
        result is kept, so later calls return the same object.

        Parameters
        ----------
        n_threads : int, optional
            Threads for decoding and scanning; default all cores. The result does not
            depend on it.

        Raises
        ------
        ValueError
            A label-map value outside ``[0, n_classes)`` that is not ``ignore_index``;
            the message names the mask file.
        """
        if self._scan is not None:
            return self._scan
        layout = "label" if self.layout == "label_map" else "multilabel"
        scans = []
        # Read directly, not through the cache, so that scanning keeps no mask alive.
        for i, mask in enumerate(self._masks_in_order(_threads(n_threads))):
            try:
                scans.append(_scan(mask, n_classes=self.n_classes, layout=layout, ignore_index=self.ignore_index,
                                   min_pixels=self.min_pixels, tile=self.tile, stride=self.stride,
                                   n_threads=n_threads, class_names=self.class_names, first_image=i))
            except ValueError as err:
                raise ValueError(f"{self._mask_paths[i][0] or self._image_paths[i]}: {err}") from None
        self._scan = MaskScan.concatenate(scans, renumber_images=False)
        return self._scan

    def _read_binary_stack(self, i: int) -> np.ndarray:
        h, w = (int(v) for v in self.image_sizes[i])
        arr = np.zeros((self.n_classes, h, w), dtype=np.uint8)
        for c, path in enumerate(self._mask_paths[i]):
            if path is not None:
                _read_binary_into(path, arr[c])
        return arr

    def _read_mask(self, i: int) -> np.ndarray:
        if self.layout == "label_map":
            return _read_label_map(self._mask_paths[i][0])
        return self._read_binary_stack(i)

    def _masks_in_order(self, n_threads: int):
        """Masks of all images in order, decoded by up to ``n_threads`` threads.

        Pillow releases the GIL while decoding, so files decode in parallel; at most
        ``n_threads`` masks are decoded ahead of the one being scanned.
        """
        workers = min(_core.resolve_threads(n_threads), self.n_images)
        if workers <= 1:
            for i in range(self.n_images):
                yield self._read_mask(i)
            return
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=workers) as pool:
            pending = collections.deque()
            for i in range(self.n_images):
                pending.append(pool.submit(self._read_mask, i))
                if len(pending) >= workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()

    def class_presence(self) -> np.ndarray:
        """Fraction of samples containing each class (float64, length n_classes)."""
        return self.scan().class_presence()

    def pixel_share(self) -> np.ndarray:
        """Share of each class in the non-ignored pixels of all samples (float64, length n_classes)."""
        return self.scan().pixel_share()

    def pattern_table(self, n_threads: Optional[int] = None):
        """The samples' class-presence patterns as a :class:`cobalance.PatternTable`."""
        return self.scan(n_threads=n_threads).to_table(self.class_names)

    def __getstate__(self):
        # Decoded pixels stay behind (e.g. when sent to data-loader worker processes).
        state = self.__dict__.copy()
        state["_cache"] = {}
        return state

    def __repr__(self) -> str:
        return (f"MaskFolder({os.fspath(self.root)!r}, layout={self.layout!r}, n_images={self.n_images}, "
                f"n_samples={len(self)}, classes={self.class_names}, tile={self.tile})")
