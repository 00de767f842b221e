r"""Folders of images and segmentation masks, read lazily with numpy and Pillow.

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

Other layouts (e.g. DRIVE: ``training/images/21_training.tif``,
``training/1st_manual/21_manual1.gif``, field-of-view masks
``training/mask/21_training_mask.gif``) are read by naming the folders (``image_dir``,
``mask_dir``, which may be ``"."``, ``valid_dir``) and how file stems pair
(``stem_key``, e.g. ``r"^(\d+)_"``): ``MaskFolder("DRIVE/training", mask_dir=".",
layout="binary_folders", class_names=["1st_manual"], valid_dir="mask",
stem_key=r"^(\d+)_")``. Any format Pillow reads is accepted for images and masks.

Only file headers are read when the folder is opened (to check sizes and to lay out
the tiles; with ``min_valid`` also the valid-region masks); pixels are decoded when
asked for. Every file is opened through
:func:`_image_file`, so a file Pillow cannot read (truncated, not an image, over
Pillow's decompression-bomb limit) raises ValueError naming the file and the cause,
whether it shows when the folder is opened, scanned or read.
"""

from __future__ import annotations

import collections
import contextlib
import os
import re
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from . import _core
from ._arguments import min_pixels_per_class, size_pair, thread_count
from .masks import MaskScan, scan_masks

__all__ = ["MaskFolder", "sample_path"]

_LAYOUTS = ("auto", "label_map", "binary_folders")


def _readable_suffixes() -> Tuple[str, ...]:
    """The file suffixes Pillow can open (lower case, with the dot), sorted."""
    image_module = _pillow()
    image_module.init()
    opened = set(image_module.OPEN)
    return tuple(sorted(ext for ext, fmt in image_module.registered_extensions().items() if fmt in opened))


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


@contextlib.contextmanager
def _image_file(path: Path, what: str):
    """The image at ``path`` opened with Pillow; any failure to open or decode it is a ValueError.

    Everything the ``with`` block does with the image (reading the header, decoding
    the pixels) is covered, so the caller's block should hold only Pillow work.
    Pillow reports broken files in many ways (OSError "image file is truncated",
    UnidentifiedImageError, DecompressionBombError, SyntaxError from its chunk
    readers, struct.error); all of them become ``ValueError("cannot read <what>
    <path>: <cause> (<type>)")``. MemoryError is left as it is: it says nothing about
    the file.

    Parameters
    ----------
    path : Path
    what : str
        What the file is, for the message (``"image"``, ``"mask"``).
    """
    image_module = _pillow()
    try:
        with image_module.open(path) as img:
            yield img
    except MemoryError:
        raise
    except Exception as err:  # noqa: BLE001 - see the docstring: every decoding error names the file
        cause = " ".join(str(err).split()) or "unreadable"
        raise ValueError(f"cannot read {what} {path}: {cause} ({type(err).__name__})") from err


def _stem_key_function(stem_key) -> Callable[[str], Optional[str]]:
    """``stem_key`` as a function of a file stem: the key that pairs files (None: no match).

    None: the stem itself. A string: a regular expression searched in the stem; the key
    is its group ``id`` where it has one, else its first group, else the whole match.
    A callable: called with the stem; it returns the key (a string) or None.
    """
    if stem_key is None:
        return lambda stem: stem
    if callable(stem_key):
        return lambda stem: (None if (key := stem_key(stem)) is None else str(key))
    if not isinstance(stem_key, str):
        raise ValueError(f"stem_key must be None, a regular expression or a callable, got {stem_key!r}")
    try:
        pattern = re.compile(stem_key)
    except re.error as err:
        raise ValueError(f"stem_key {stem_key!r} is not a regular expression: {err}") from None

    def key(stem: str) -> Optional[str]:
        match = pattern.search(stem)
        if match is None:
            return None
        if "id" in pattern.groupindex:
            return match.group("id")
        return match.group(1) if pattern.groups else match.group(0)

    return key


def _files_by_stem(folder: Path, suffixes: Sequence[str], key=None, what: str = "files") -> Dict[str, Path]:
    """Visible files of ``folder`` with one of ``suffixes`` (any case), keyed by ``key(stem)``.

    A file whose stem gives no key (``stem_key`` does not match) is an error naming it,
    as are two files with the same key.
    """
    key = key or (lambda stem: stem)
    found: Dict[str, Path] = {}
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith(".") or not entry.is_file() or entry.suffix.lower() not in suffixes:
            continue
        k = key(entry.stem)
        if k is None:
            raise ValueError(f"{what} {entry} does not match stem_key (its stem {entry.stem!r} gives no key)")
        if k in found:
            raise ValueError(f"two files for {k!r} in {folder}: {found[k].name} and {entry.name}")
        found[k] = entry
    return found


def _describe_folder(folder: Path) -> str:
    """What a folder holds, for messages: the count of files by suffix."""
    suffixes = collections.Counter(e.suffix.lower() or "(no suffix)" for e in folder.iterdir()
                                   if e.is_file() and not e.name.startswith("."))
    if not suffixes:
        return "no files"
    return ", ".join(f"{n} {ext}" for ext, n in sorted(suffixes.items()))


def _tile_sums(plane: np.ndarray, origins: np.ndarray, tile) -> np.ndarray:
    """Sums of a 2-D 0/1 plane over tiles at ``origins[:, 1:]`` of size ``tile`` (whole plane: None)."""
    if tile is None:
        return np.array([int(plane.sum(dtype=np.int64))] * len(origins), dtype=np.int64)
    integral = np.zeros((plane.shape[0] + 1, plane.shape[1] + 1), dtype=np.int64)
    np.cumsum(np.cumsum(plane, axis=0, dtype=np.int64), axis=1, out=integral[1:, 1:])
    y, x = origins[:, 1], origins[:, 2]
    th, tw = tile
    return integral[y + th, x + tw] - integral[y, x + tw] - integral[y + th, x] + integral[y, x]


def _read_label_map(path: Path) -> np.ndarray:
    with _image_file(path, "label-map mask") as img:
        mode = img.mode
        # only the modes that hold class ids are decoded; the others are refused below
        arr = np.asarray(img) if mode in ("L", "P", "1", "I") or mode.startswith("I;16") else None
    if mode in ("L", "P"):
        return arr.astype(np.uint8, copy=False)
    if mode == "1":
        return arr.astype(np.uint8)
    if mode.startswith("I;16"):
        return arr.astype(np.uint16)
    if mode == "I":
        return arr.astype(np.int32)
    raise ValueError(f"label-map mask {path} must be a single-channel image of class ids (mode L, P, I;16 or I), "
                     f"got mode {mode}")


def _read_binary_into(path: Path, out: np.ndarray) -> None:
    """Writes the 0/1 plane of a binary mask file into ``out`` (uint8, height x width).

    For multi-channel files a pixel is set when any channel is nonzero.
    """
    with _image_file(path, "mask") as img:
        arr = np.asarray(img)
    if arr.ndim == 3:
        arr = arr.any(axis=2)
    if arr.dtype == np.bool_:
        out[...] = arr  # 1-bit files decode to bool: a cast, no compare needed
    else:
        np.not_equal(arr, 0, out=out.view(np.bool_))


def _ignore_values(ignore_index) -> Optional[Tuple[int, ...]]:
    """``ignore_index`` as a tuple of ints (None when not given); ValueError otherwise."""
    if ignore_index is None:
        return None
    values = [ignore_index] if isinstance(ignore_index, (int, np.integer)) else ignore_index
    try:
        values = list(values)
    except TypeError:
        values = [ignore_index]
    if not values or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) for v in values):
        raise ValueError(f"ignore_index must be an integer or a non-empty sequence of integers, got {ignore_index!r}")
    return tuple(sorted({int(v) for v in values}))


def _checked_index(index, size: int, what: str, items: str) -> int:
    """``index`` (negative counts from the end) as a position in ``[0, size)``; IndexError otherwise."""
    if not isinstance(index, (int, np.integer)) or isinstance(index, bool) or not -size <= index < size:
        raise IndexError(f"{what} {index!r} out of range for {size} {items}")
    return int(index) % size


class MaskFolder:
    r"""A folder of images and segmentation masks, as samples (whole images or tiles).

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
        Sub-folders of ``root`` (``"."``: ``root`` itself; with ``binary_folders`` the
        class folders then sit beside the image folder, so name them in
        ``class_names``).
    tile : int or (int, int), optional
        Cut every image into tiles of this size; each tile is a sample (tiles cover
        the image, see :mod:`cobalance.masks`). Default: whole images.
    stride : int or (int, int), optional
        Step between tiles, ``1 <= stride <= tile``. Default: the tile size.
    ignore_index : int or sequence of int, optional
        ``label_map`` only: the id(s) of pixels that belong to no class (neither
        counted in a class nor in the valid pixels).
    min_pixels : int or sequence of int
        A class is present in a sample from this many pixels on (one value or one
        per class).
    stem_key : str or callable, optional
        How image and mask files pair: files pair when their stems give the same key.
        A regular expression searched in each stem (the key is its group ``id``, else
        its first group, else the match; ``r"^(\d+)_"`` pairs ``21_training`` with
        ``21_manual1`` and ``21_training_mask``), or a callable ``stem -> key``.
        Default: the stems themselves. A file whose stem gives no key is an error.
    valid_dir : str, optional
        Sub-folder of ``root`` with one valid-region mask per image (nonzero = valid,
        e.g. a fundus camera's field of view), paired like the masks. Pixels outside
        it count in no class and not in the valid pixels, for every layout.
    min_valid : float in (0, 1], optional
        Drop the samples (tiles or images) whose valid pixels - inside the valid
        region and not ``ignore_index`` - are less than this share of their area.
        Needs ``valid_dir`` or ``ignore_index``; the folder then decodes those masks
        (valid regions, or label maps) when it is opened.

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
        image, an image without its label map (or valid-region mask), a class folder
        without one readable mask file or whose masks pair with no image (never
        silent zeros), a file whose stem does not match ``stem_key``, a mask whose
        size differs from its image's, a class name with no folder, no class names
        for a label-map folder, a tile larger than an image, ``ignore_index`` with
        ``binary_folders``, ``min_valid`` without a valid region or leaving no
        sample, a file Pillow cannot open (``"cannot read image <path>: <cause>"``).
        A file whose pixels cannot be decoded (e.g. truncated) raises the same
        ValueError from the method that decodes it (:meth:`scan`, :meth:`sample`,
        :meth:`load_image`, :meth:`load_mask`).

    Notes
    -----
    The decoded pixels of the last image read are kept (one image and one mask), so
    reading the tiles of one image in a row decodes it once; they are not pickled.
    Every reading method returns new arrays.
    """

    def __init__(self, root, *, layout: str = "auto", class_names: Optional[Sequence[str]] = None,
                 image_dir: str = "images", mask_dir: str = "masks",
                 tile: Union[None, int, Tuple[int, int]] = None, stride: Union[None, int, Tuple[int, int]] = None,
                 ignore_index: Union[None, int, Sequence[int]] = None, min_pixels: Union[int, Sequence[int]] = 1,
                 stem_key: Union[None, str, Callable[[str], Optional[str]]] = None, valid_dir: Optional[str] = None,
                 min_valid: Optional[float] = None):
        self.root = Path(root)
        if layout not in _LAYOUTS:
            raise ValueError(f"layout must be one of {_LAYOUTS}, got {layout!r}")
        if not self.root.is_dir():
            raise ValueError(f"mask folder {self.root} does not exist or is not a folder")
        self.image_dir, self.mask_dir, self.valid_dir = image_dir, mask_dir, valid_dir
        self.stem_key = stem_key
        key = _stem_key_function(stem_key)
        suffixes = _readable_suffixes()
        images_dir, masks_dir = self.root / image_dir, self.root / mask_dir
        for folder in (images_dir, masks_dir):
            if not folder.is_dir():
                raise ValueError(f"folder {folder} is missing")
        images = _files_by_stem(images_dir, suffixes, key, "image")
        if not images:
            raise ValueError(f"image folder {images_dir} is empty: no image Pillow reads ({_describe_folder(images_dir)})")
        self.image_ids: List[str] = sorted(images)
        self._image_paths = [images[i] for i in self.image_ids]
        self.layout = self._resolve_layout(layout, masks_dir, suffixes, exclude=(images_dir, valid_dir))

        if self.layout == "label_map":
            self.class_names = self._label_map_classes(class_names)
            masks = self._one_per_image(masks_dir, suffixes, key, "label-map mask", images, images_dir)
            self._mask_paths: List[List[Optional[Path]]] = [[path] for path in masks]
        else:
            if ignore_index is not None:
                raise ValueError(f"ignore_index={ignore_index} does not apply to binary_folders masks (0/nonzero); "
                                 "give a valid region with valid_dir")
            self.class_names = self._binary_classes(class_names, masks_dir, exclude=(images_dir, valid_dir))
            per_class = []
            for name in self.class_names:
                folder = masks_dir / name
                files = _files_by_stem(folder, suffixes, key, "mask")
                if not files:
                    raise ValueError(f"class folder {folder} is empty: no mask Pillow reads ({_describe_folder(folder)})")
                self._check_masks_have_images(files, folder, images_dir)
                per_class.append(files)
            self._mask_paths = [[files.get(i) for files in per_class] for i in self.image_ids]
        self.n_classes = len(self.class_names)

        self._valid_paths: Optional[List[Path]] = None
        if valid_dir is not None:
            valid_folder = self.root / valid_dir
            if not valid_folder.is_dir():
                raise ValueError(f"valid-region folder {valid_folder} is missing")
            self._valid_paths = self._one_per_image(valid_folder, suffixes, key, "valid-region mask", images,
                                                    images_dir)

        self.image_sizes = np.array([self._header_size(p, "image") for p in self._image_paths],
                                    dtype=np.int64).reshape(-1, 2)
        for i, paths in enumerate(self._mask_paths + ([[p] for p in self._valid_paths] if self._valid_paths else [])):
            i %= self.n_images
            for path in paths:
                if path is not None and self._header_size(path, "mask") != tuple(self.image_sizes[i]):
                    h, w = self._header_size(path, "mask")
                    raise ValueError(f"mask {path} is {h} x {w} (height x width) but its image "
                                     f"{self._image_paths[i]} is {self.image_sizes[i, 0]} x {self.image_sizes[i, 1]}")

        self.tile = None if tile is None else size_pair(tile, "tile")
        if stride is not None and tile is None:
            raise ValueError(f"stride={stride!r} given without a tile size")
        self.stride = None if stride is None else size_pair(stride, "stride")
        self.ignore_index = _ignore_values(ignore_index)
        self.min_pixels = min_pixels_per_class(min_pixels, self.n_classes)
        self._cache: Dict[str, Tuple[int, np.ndarray]] = {}
        self._scan: Optional[MaskScan] = None
        self._all_origins = self._lay_out_tiles()
        self.min_valid = None if min_valid is None else float(min_valid)
        self._kept = None
        if self.min_valid is not None:
            if not 0.0 < self.min_valid <= 1.0:
                raise ValueError(f"min_valid must be a share in (0, 1], got {min_valid!r}")
            if valid_dir is None and self.ignore_index is None:
                raise ValueError("min_valid needs a valid region: give valid_dir (or ignore_index for label maps)")
            self._kept = self._samples_with_valid_share(self.min_valid)
        self.origins = self._all_origins if self._kept is None else self._all_origins[self._kept]

    # -- opening ------------------------------------------------------------------

    def _stem_hint(self) -> str:
        if self.stem_key is not None:
            return ""
        return ("; if image and mask files are named differently (e.g. 21_training / 21_manual1), "
                "pair them with stem_key (e.g. r'^(\\d+)_')")

    @staticmethod
    def _sub_folders(masks_dir: Path, exclude) -> List[str]:
        """Visible sub-folders of ``masks_dir`` other than the image and valid-region folders."""
        skip = {Path(os.path.realpath(masks_dir / e)) for e in exclude if e is not None}
        return sorted(e.name for e in masks_dir.iterdir()
                      if e.is_dir() and not e.name.startswith(".") and Path(os.path.realpath(e)) not in skip)

    @classmethod
    def _resolve_layout(cls, layout: str, masks_dir: Path, suffixes, exclude=()) -> str:
        if layout != "auto":
            return layout
        has_dirs = bool(cls._sub_folders(masks_dir, exclude))
        has_files = any(e.is_file() and not e.name.startswith(".") and e.suffix.lower() in suffixes
                        for e in masks_dir.iterdir())
        if has_dirs and has_files:
            raise ValueError(f"{masks_dir} holds both mask files and class folders; pass layout='label_map' "
                             f"or layout='binary_folders'")
        if has_dirs:
            return "binary_folders"
        if has_files:
            return "label_map"
        raise ValueError(f"mask folder {masks_dir} is empty (no class folders and no mask Pillow reads: "
                         f"{_describe_folder(masks_dir)})")

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

    @classmethod
    def _binary_classes(cls, class_names, masks_dir: Path, exclude=()) -> List[str]:
        available = cls._sub_folders(masks_dir, exclude)
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

    def _one_per_image(self, folder: Path, suffixes, key, what: str, images: Dict[str, Path],
                       images_dir: Path) -> List[Path]:
        """The file of ``folder`` paired with each image, in image order; every image must have one."""
        files = _files_by_stem(folder, suffixes, key, what)
        self._check_masks_have_images(files, folder, images_dir)
        missing = [i for i in self.image_ids if i not in files]
        if missing:
            raise ValueError(f"image {images[missing[0]]} has no {what} in {folder} "
                             f"({len(missing)} images without one){self._stem_hint()}")
        return [files[i] for i in self.image_ids]

    def _check_masks_have_images(self, masks: Dict[str, Path], masks_dir: Path, images_dir: Path) -> None:
        orphans = sorted(set(masks) - set(self.image_ids))
        if orphans:
            raise ValueError(f"mask {masks[orphans[0]]} has no image in {images_dir} "
                             f"({len(orphans)} masks in {masks_dir} without an image){self._stem_hint()}")

    @staticmethod
    def _header_size(path: Path, what: str) -> Tuple[int, int]:
        with _image_file(path, what) as img:  # reads the header only
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

    def _samples_with_valid_share(self, share: float) -> np.ndarray:
        """Boolean mask over every tile: valid pixels >= ``share`` of the tile area."""
        keep = np.zeros(len(self._all_origins), dtype=bool)
        for i in range(self.n_images):
            rows = np.flatnonzero(self._all_origins[:, 0] == i)
            valid = self._valid_plane(i)
            h, w = (int(v) for v in self.image_sizes[i])
            area = h * w if self.tile is None else self.tile[0] * self.tile[1]
            keep[rows] = _tile_sums(valid, self._all_origins[rows], self.tile) >= share * area
        if not keep.any():
            raise ValueError(f"min_valid={share} leaves no sample: no tile has that share of valid pixels")
        return keep

    def _valid_plane(self, i: int, mask: Optional[np.ndarray] = None) -> np.ndarray:
        """Image ``i``'s valid pixels (uint8 0/1): inside the valid region and, for label maps, not ignored."""
        h, w = (int(v) for v in self.image_sizes[i])
        valid = np.ones((h, w), dtype=np.uint8)
        if self._valid_paths is not None:
            _read_binary_into(self._valid_paths[i], valid)
        if self.layout == "label_map" and self.ignore_index is not None:
            labels = self._read_mask(i) if mask is None else mask
            valid &= ~np.isin(labels, self.ignore_index)
        return valid

    def valid_mask(self, i: int) -> np.ndarray:
        """Image ``i``'s valid pixels as a new ``(height, width)`` bool array.

        Inside the valid region (``valid_dir``) and, for label maps, not
        ``ignore_index``; every pixel when neither is given. For masking a loss.
        """
        i = self._image_index(i)
        return self._valid_plane(i).astype(bool)

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
        with _image_file(self._image_paths[i], "image") as img:
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

    def scan(self, n_threads: Optional[int] = None, *, progress=None) -> MaskScan:
        """Class presence and pixel counts of every sample.

        Masks are decoded one image at a time (images are not decoded; up to
        ``n_threads`` masks are decoded ahead in threads) and scanned natively; the
        result is kept, so later calls return the same object.

        Parameters
        ----------
        n_threads : int, optional
            Threads for decoding and scanning; default all cores. The result does not
            depend on it.
        progress : callable, optional
            Wraps the iterator over the decoded masks, one per image, e.g.
            ``tqdm.tqdm`` (``lambda masks: tqdm(masks, total=folder.n_images)``) for a
            progress bar.

        Raises
        ------
        ValueError
            A label-map value outside ``[0, n_classes)`` that is not ``ignore_index``,
            or a mask file that cannot be decoded; the message names the mask file.
        """
        if self._scan is not None:
            return self._scan
        layout = "label" if self.layout == "label_map" else "multilabel"
        scans = []
        # Read directly, not through the cache, so that scanning keeps no mask alive.
        masks = self._masks_in_order(thread_count(n_threads))
        for i, mask in enumerate(masks if progress is None else progress(masks)):
            mask, ignore, valid = self._masked_for_scan(i, mask)
            try:
                scan = scan_masks(mask, n_classes=self.n_classes, layout=layout, ignore_index=ignore,
                                  min_pixels=self.min_pixels, tile=self.tile, stride=self.stride,
                                  n_threads=n_threads, class_names=self.class_names, first_image=i)
            except ValueError as err:
                raise ValueError(f"{self._mask_paths[i][0] or self._image_paths[i]}: {err}") from None
            if valid is not None and self.layout != "label_map":  # binary masks: the scan counted tile areas
                scan.valid_pixels = _tile_sums(valid, scan.origins, self.tile)
            if self._kept is not None:
                keep = self._kept[self._all_origins[:, 0] == i]
                scan = MaskScan(scan.presence[keep], scan.pixel_counts[keep], scan.valid_pixels[keep],
                                scan.origins[keep], tile=scan.tile, class_names=scan.class_names, n_images=1)
            scans.append(scan)
        self._scan = MaskScan.concatenate(scans, renumber_images=False)
        return self._scan

    def _masked_for_scan(self, i: int, mask: np.ndarray):
        """``(mask, ignore_index, valid plane or None)`` for the native scan of image ``i``.

        Pixels outside the valid region are cleared (binary masks) or set to an
        ignored id (label maps; several ignore ids become one, -1, in an int32 copy).
        """
        if self._valid_paths is None and (self.ignore_index is None or len(self.ignore_index) == 1):
            return mask, None if self.ignore_index is None else self.ignore_index[0], None
        valid = self._valid_plane(i, mask)
        if self.layout == "label_map":
            labels = mask.astype(np.int32)
            labels[valid == 0] = -1
            return labels, -1, valid
        return np.where(valid.astype(bool)[None], mask, 0).astype(np.uint8), None, valid

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
