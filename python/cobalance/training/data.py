"""The study's tiles: the dataset folder opened once through the library, shrunk on request.

Every file is read by :class:`cobalance.folders.MaskFolder` (through
:class:`cobalance.segmentation.SegmentationFolder` for the tiles): its layouts, its
pairing of images and masks and its errors naming the file. The shrunk copy that
:func:`downscale_folder` writes is a folder MaskFolder reads in the same layout.

Which path runs when:

- ``downscale == 1``: ``SegmentationFolder(data, tile=...)`` over the data as it is
  (:func:`open_data`);
- ``downscale > 1``: ``MaskFolder(data)`` over whole images (checks only, in
  :func:`open_data`), then :func:`downscale_folder` into the cache and
  ``SegmentationFolder(cache, tile=...)`` (:func:`shrunk_tiles`);
- then the presence of every tile from the folder's native mask scan
  (:meth:`StudyTiles.scan`) and the subset the study uses (:func:`select_tiles`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .._atomic import atomic_path
from ._progress import progress_bar
from .config import ExperimentConfig, derived_seed

__all__ = ["downscale_folder", "folder_options", "open_data", "shrunk_tiles", "StudyTiles", "KeptItems", "select_tiles"]


def downscale_folder(src, dst, factor: int, class_names: Optional[Sequence[str]] = None, *,
                     progress: bool = False) -> Path:
    """Write a copy of an images + per-class masks folder shrunk by an integer factor.

    The source is read by :class:`cobalance.folders.MaskFolder` (``binary_folders``
    layout); the copy is ``dst/images/<id>.png`` and ``dst/masks/<class>/<id>.png``
    (``<id>`` the source's image id), the same layout, which MaskFolder reads. Images
    are averaged over ``factor x factor`` blocks (PIL's box filter) and saved as PNG
    (lossless); masks are max-pooled over the same blocks, so that a lesion pixel
    survives, and a class without a mask file for an image stays without one. Sizes
    not divisible by ``factor`` lose their last rows / columns. A file already present
    in ``dst`` is kept, so an interrupted preparation resumes; every file is written
    atomically.

    Parameters
    ----------
    src : path or MaskFolder
        Source folder (``images/``, ``masks/<class>/``), or an open ``binary_folders``
        MaskFolder.
    dst : path
        Destination folder.
    factor : int
        Shrink factor, >= 2.
    class_names : sequence of str, optional
        Mask folders to copy (default: every class folder); only with a path.

    Returns
    -------
    Path
        ``dst``.

    Raises
    ------
    ValueError
        Whatever MaskFolder raises for the source (a mask without an image, a mask
        whose size differs from its image's, ..., naming the file); a label-map
        source; a factor below 2 or larger than an image.
    """
    from PIL import Image

    from ..folders import MaskFolder

    if isinstance(factor, bool) or not isinstance(factor, (int, np.integer)) or factor < 2:
        raise ValueError(f"factor must be an integer >= 2, got {factor!r}")
    factor = int(factor)
    if isinstance(src, MaskFolder):
        if class_names is not None:
            raise ValueError("class_names cannot be given with an open MaskFolder; open the folder with them")
        source = src
    else:
        source = MaskFolder(src, class_names=class_names)
    if source.layout != "binary_folders":
        raise ValueError(f"downscale_folder copies per-class binary mask folders; {source.root} holds label maps "
                         "(shrink them with nearest-neighbour resampling first)")
    dst = Path(dst)
    for i in progress_bar(range(source.n_images), progress, desc=f"downscale x{factor}"):
        stem = source.image_ids[i]
        full_h, full_w = (int(v) for v in source.image_sizes[i])
        h, w = full_h // factor, full_w // factor
        if h == 0 or w == 0:
            raise ValueError(f"image {source.image_path(i)} ({full_h} x {full_w}) is smaller than the "
                             f"downscale factor {factor}")
        out_image = dst / "images" / f"{stem}.png"
        if not out_image.exists():
            small = Image.fromarray(source.load_image(i)).crop((0, 0, w * factor, h * factor))
            small = small.resize((w, h), Image.Resampling.BOX)
            with atomic_path(out_image, suffix=".png") as tmp:
                small.save(tmp, format="PNG")
        todo = [(c, dst / "masks" / name / f"{stem}.png")
                for c, (name, path) in enumerate(zip(source.class_names, source.mask_paths(i))) if path is not None]
        todo = [(c, path) for c, path in todo if not path.exists()]
        if not todo:
            continue
        masks = source.load_mask(i)
        for c, out_mask in todo:
            pooled = masks[c, : h * factor, : w * factor].reshape(h, factor, w, factor).any(axis=(1, 3))
            with atomic_path(out_mask, suffix=".png") as tmp:
                Image.fromarray(pooled).save(tmp, format="PNG")  # bool -> 1-bit PNG, as IDRiD ships
    return dst


def open_data(config: ExperimentConfig):
    """Open the configured data folder; nothing is written.

    Returns
    -------
    source : MaskFolder
        The folder as it is (whole images when ``downscale > 1``, else tiled).
    tiles : SegmentationFolder or None
        The tiled dataset; None when ``downscale > 1`` (see :func:`shrunk_tiles`).

    Raises
    ------
    ValueError
        A missing data folder, whatever MaskFolder raises (naming the file), or
        ``downscale > 1`` on label maps.
    """
    from ..folders import MaskFolder
    from ..segmentation import SegmentationFolder

    data = Path(config.data)
    if not data.exists():
        raise ValueError(f"data folder {str(data)!r} does not exist")
    if not data.is_dir():
        raise ValueError(f"data folder {str(data)!r} is not a folder")
    layout = folder_options(config)
    if config.downscale > 1:
        # Tiles are laid out on the shrunk copy; here the folder is only checked.
        source = MaskFolder(data, class_names=config.classes, ignore_index=config.ignore_index, **layout)
        if source.layout == "label_map":
            raise ValueError(f"downscale={config.downscale} applies to per-class binary mask folders only; "
                             f"{str(data / source.mask_dir)!r} holds label maps (shrink them with "
                             "nearest-neighbour resampling first)")
        return source, None
    tiles = SegmentationFolder(data, class_names=config.classes, tile=config.tile, stride=config.stride,
                               min_pixels=config.min_pixels, ignore_index=config.ignore_index, **layout)
    return tiles.folder, tiles


def folder_options(config: ExperimentConfig) -> dict:
    """The MaskFolder layout options the configuration sets (those left at None are MaskFolder's defaults)."""
    names = ("image_dir", "mask_dir", "stem_key", "valid_dir", "min_valid")
    return {name: getattr(config, name) for name in names if getattr(config, name) is not None}


def shrunk_tiles(source, config: ExperimentConfig, out: Path):
    """The tiled dataset over the shrunk copy of ``source`` (written first when missing).

    The copy goes to ``config.data_cache``, default ``<out>/data-<factor>x``.
    """
    from ..segmentation import SegmentationFolder

    cache = Path(config.data_cache) if config.data_cache else out / f"data-{config.downscale}x"
    downscale_folder(source, cache, config.downscale, progress=config.progress)
    return SegmentationFolder(cache, layout="binary_folders", class_names=source.class_names, tile=config.tile,
                              stride=config.stride, min_pixels=config.min_pixels)


class KeptItems:
    """A map-style dataset that keeps every item of ``dataset`` after its first read.

    For small (e.g. downscaled) datasets read in random tile order: MaskFolder keeps
    only the last decoded image, so each tile would otherwise decode its whole image.
    Items are returned as stored; the DataLoader's collation copies them into batches.
    """

    def __init__(self, dataset):
        self.dataset = dataset
        self._items = {}

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, k):
        k = int(k)
        item = self._items.get(k)
        if item is None:
            item = self._items[k] = self.dataset[k]
        return item

    def fill(self, indices: Sequence[int], *, progress: bool = False) -> None:
        """Read the items at ``indices`` now, in ascending order.

        The folder decodes one image at a time and keeps the last, so reading its tiles
        in order decodes each image once, where the epochs' random order would decode
        an image for every tile.
        """
        for k in progress_bar(sorted(int(i) for i in indices), progress, desc="read tiles"):
            self[k]


@dataclasses.dataclass
class StudyTiles:
    """The tiles the study trains on.

    Attributes
    ----------
    folder : SegmentationFolder
        The tiled dataset (items ``(image, mask)``: float32 ``(3, H, W)``, and uint8
        ``(C, H, W)`` or int64 ``(H, W)``).
    items : map-style dataset
        ``folder``, or :class:`KeptItems` over it (``cache_images``).
    presence : ndarray of bool, shape (n_tiles, n_classes)
        From the folder's mask scan.
    image_of : ndarray of int64, shape (n_tiles,)
        Index of each tile's image in ``image_ids``.
    """

    folder: object
    items: object
    presence: np.ndarray
    image_of: np.ndarray

    @classmethod
    def scan(cls, folder, *, cache_images: bool = False, progress: bool = False) -> "StudyTiles":
        """Scan ``folder``'s masks (native scanner) for the tiles' presence."""
        n_images = folder.folder.n_images
        bar = (lambda masks: progress_bar(masks, True, total=n_images, desc="scan masks")) if progress else None
        scan = folder.folder.scan(progress=bar)
        return cls(folder=folder, items=KeptItems(folder) if cache_images else folder,
                   presence=np.asarray(scan.presence, dtype=bool),
                   image_of=np.asarray(scan.origins[:, 0], dtype=np.int64))

    @property
    def class_names(self):
        return list(self.folder.class_names)

    @property
    def image_ids(self):
        return list(self.folder.folder.image_ids)

    @property
    def label_map(self) -> bool:
        return self.folder.layout == "label_map"

    def __len__(self) -> int:
        return int(self.presence.shape[0])


def select_tiles(tiles: StudyTiles, config: ExperimentConfig) -> np.ndarray:
    """Indices of the tiles the study uses: all, or a seeded subset of images / tiles."""
    keep = np.arange(len(tiles))
    n_images = len(tiles.image_ids)
    if config.max_images is not None and config.max_images < n_images:
        chosen = np.random.default_rng(derived_seed(config, "images")).choice(n_images, config.max_images,
                                                                            replace=False)
        keep = keep[np.isin(tiles.image_of[keep], chosen)]
    if config.max_tiles is not None and config.max_tiles < keep.size:
        keep = np.sort(np.random.default_rng(derived_seed(config, "tiles")).choice(keep, config.max_tiles,
                                                                                   replace=False))
    return keep
