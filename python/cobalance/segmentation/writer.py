"""Write a balanced dataset to disk in its source layout, resumably, with a manifest."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .._atomic import atomic_path, atomic_write_text
from ..folders import MaskFolder
from .datasets import SegmentationFolder, image_tensor, mask_tensor
from .samplers import plan_arrays

__all__ = ["WriteReport", "write_balanced"]

MANIFEST = "manifest.csv"
_JOB = ".cobalance-write.json"
_MANIFEST_COLUMNS = ("file", "sample", "image_id", "y", "x", "copy_index", "augmented", "seed",
                     "source_image_sha256", "source_mask_sha256", "image_sha256", "mask_sha256")
#: The manifest columns a resume checks an item against (absent from manifests of older versions).
_HASH_COLUMNS = _MANIFEST_COLUMNS[-4:]


class WriteReport(NamedTuple):
    """What :func:`write_balanced` did: the manifest's path, items written and items found complete."""

    manifest: Path
    written: int
    skipped: int


def _open_folder(dataset_or_folder) -> MaskFolder:
    if isinstance(dataset_or_folder, SegmentationFolder):
        return dataset_or_folder.folder
    if isinstance(dataset_or_folder, MaskFolder):
        return dataset_or_folder
    if isinstance(dataset_or_folder, (str, os.PathLike)):
        return MaskFolder(dataset_or_folder)
    raise ValueError(
        "dataset_or_folder must be a SegmentationFolder, a MaskFolder or a folder path (its layout is what is "
        f"written), got {type(dataset_or_folder).__name__}"
    )


def _item_names(folder: MaskFolder, indices: np.ndarray, copies: np.ndarray):
    names = []
    for sample, copy in zip(indices.tolist(), copies.tolist()):
        i, y, x = (int(v) for v in folder.origins[sample])
        base = folder.image_ids[i] if folder.tile is None else f"{folder.image_ids[i]}_y{y:05d}_x{x:05d}"
        names.append(base if copy == 0 else f"{base}_copy{copy:03d}")
    if len(set(names)) != len(names):
        seen = set()
        dup = next(n for n in names if n in seen or seen.add(n))
        raise ValueError(f"two output items would both be named {dup!r}; rename the source image ids")
    return names


def _job_description(folder, indices, copies, augment, seed) -> dict:
    digest = hashlib.sha256(np.ascontiguousarray(indices).tobytes() + np.ascontiguousarray(copies).tobytes())
    if augment is None:
        kind = "none"
    elif augment is True:
        kind = "DuplicateAugmentation"
    else:
        kind = getattr(augment, "__qualname__", type(augment).__qualname__)
        if isinstance(getattr(augment, "seed", None), int):
            kind += f"(seed={augment.seed})"
    return {
        "source": os.fspath(Path(folder.root).resolve()),
        "layout": folder.layout,
        "class_names": list(folder.class_names),
        "tile": None if folder.tile is None else list(folder.tile),
        "stride": None if getattr(folder, "stride", None) is None else list(folder.stride),
        "plan_sha256": digest.hexdigest(),
        "n_items": int(indices.size),
        "augment": kind,
        "seed": int(seed),
    }


def _claim_out_dir(out_dir: Path, job: dict) -> None:
    """Start a job in ``out_dir``, or check that it resumes the job already there."""
    marker = out_dir / _JOB
    if marker.is_file():
        previous = json.loads(marker.read_text(encoding="utf-8"))
        changed = sorted(k for k in set(previous) | set(job) if previous.get(k) != job.get(k))
        if changed:
            raise ValueError(
                f"out_dir {out_dir} holds another balanced dataset (different {', '.join(changed)}); "
                "write to an empty folder"
            )
        return
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ValueError(f"out_dir {out_dir} is not empty and was not written by write_balanced")
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(marker, json.dumps(job, indent=1) + "\n")


def _remove_stale_temporaries(folders) -> None:
    # A killed run leaves its temporary files (".tmp-<name>-...") behind; they are
    # invisible to readers (dot files) and are never renamed into place after a crash.
    for folder in folders:
        if folder.is_dir():
            for entry in folder.iterdir():
                if entry.name.startswith(".tmp-") and entry.is_file():
                    entry.unlink()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _masks_sha256(paths, label_map: bool) -> str:
    """One digest for an item's mask files (``None`` or a missing path: no file).

    A label map: its file's SHA-256. Binary folders: the SHA-256 of the per-class
    file digests, one line each in class order, ``-`` for a class without a file.
    """
    paths = [p if p is not None and p.is_file() else None for p in paths]
    if label_map:
        return "-" if paths[0] is None else _file_sha256(paths[0])
    lines = "".join(f"{'-' if p is None else _file_sha256(p)}\n" for p in paths)
    return hashlib.sha256(lines.encode("ascii")).hexdigest()


def _read_manifest_hashes(manifest: Path) -> dict:
    """``file -> {hash column: digest}`` of an earlier complete run; empty when there is none to trust.

    A manifest without the hash columns (an older version's) or one that cannot be
    parsed records nothing that could prove an item current, so its items are
    verified like those of an interrupted run.
    """
    if not manifest.is_file():
        return {}
    try:
        with open(manifest, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if not set(_HASH_COLUMNS) <= set(reader.fieldnames or ()):
                return {}
            return {row["file"]: {k: row[k] for k in _HASH_COLUMNS} for row in reader}
    except (OSError, UnicodeDecodeError, csv.Error, KeyError):
        return {}


def _output_matches(image: np.ndarray, mask, image_path: Path, mask_paths, label_map: bool) -> bool:
    """Whether the files of an item hold exactly ``image`` and ``mask`` (pixel values, not bytes)."""
    from PIL import Image

    def decoded(path):
        with Image.open(path) as img:
            return np.asarray(img)

    try:
        if not np.array_equal(decoded(image_path), image):
            return False
        if label_map:
            return np.array_equal(decoded(mask_paths[0]), mask)
        for path, plane in zip(mask_paths, mask):
            if not plane.any():
                if path.exists():
                    return False
            elif not path.is_file() or not np.array_equal(decoded(path) != 0, plane != 0):
                return False
    except Exception:  # noqa: BLE001 - a file Pillow cannot read is not a complete item: it is rewritten
        return False
    return True


def _save_png(array: np.ndarray, path: Path) -> None:
    from PIL import Image

    with atomic_path(path, suffix=".png") as tmp:
        Image.fromarray(array).save(tmp, format="PNG", compress_level=1)


def _label_map_for_png(mask: np.ndarray, name: str) -> np.ndarray:
    hi = int(mask.max()) if mask.size else 0
    lo = int(mask.min()) if mask.size else 0
    if lo < 0 or hi > 65535:
        bad = lo if lo < 0 else hi
        raise ValueError(f"label map of {name} holds value {bad}, outside what a PNG stores (0..65535)")
    return mask.astype(np.uint8 if hi < 256 else np.uint16)


def _augmenter(augment, seed):
    if augment is None or augment is False:
        return None
    if augment is True:
        from .augmentation import DuplicateAugmentation

        return DuplicateAugmentation(seed=seed)
    if callable(augment):
        return augment
    raise ValueError(f"augment must be None, True or a callable like DuplicateAugmentation, got {augment!r}")


def _augment_item(augmenter, image: np.ndarray, mask: np.ndarray, label_map: bool, sample: int, copy: int):
    import torch

    images = image_tensor(image).unsqueeze(0)
    masks = mask_tensor(mask, label_map).unsqueeze(0)
    with torch.no_grad():
        out_images, out_masks = augmenter(images, masks, [sample], [copy])
    out_image = (out_images[0].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    out_mask = out_masks[0].numpy()
    return out_image, out_mask.astype(mask.dtype) if label_map else out_mask.astype(np.uint8)


def write_balanced(dataset_or_folder, plan, out_dir, *, augment=None, seed: int = 0,
                   progress: bool = True) -> WriteReport:
    """Write the balanced dataset of a plan as files, in the source's layout.

    Item ``k`` of the plan (sample ``plan.indices()[k]``, copy ``plan.copy_index[k]``)
    becomes ``images/<name>.png`` plus its mask:

    - ``label_map`` sources: ``masks/<name>.png`` (8- or 16-bit class ids) and
      ``classes.txt``;
    - ``binary_folders`` sources: ``masks/<CLASS>/<name>.png`` (1-bit) for each class
      with a pixel in the item; no file where the class is absent, as in the source.

    ``<name>`` is the image id (``<id>_y<row>_x<col>`` for a tile), with
    ``_copy<k>`` appended for the ``k``-th duplicate. Images are written as PNG from
    the decoded pixels, so originals keep their exact pixel values.
    ``manifest.csv`` lists every item: ``file`` (image path relative to ``out_dir``),
    ``sample``, ``image_id``, ``y``, ``x`` (tile origin), ``copy_index``,
    ``augmented`` (1 when the item went through ``augment``) and ``seed`` (its
    per-copy seed :func:`~cobalance.segmentation.augmentation.sample_seed` of the
    augmentation's seed: a ``DuplicateAugmentation``'s own, else the ``seed``
    argument; empty when not augmented).

    The manifest also records content hashes (SHA-256) for resuming:
    ``source_image_sha256`` and ``source_mask_sha256`` (the source files the item was
    made from) and ``image_sha256`` and ``mask_sha256`` (its files in ``out_dir``). A
    mask column holds the file's digest for a label map, and for binary folders the
    SHA-256 of the per-class file digests (one line each, in class order, ``-`` for
    a class without a file).

    Crash safety: every file is written to a temporary name and renamed; an item's
    image is written after its masks. The manifest is written last, and removed
    before a rerun changes any item, so it exists only when every item in
    ``out_dir`` is complete and current. ``out_dir`` keeps a description of the job
    (``.cobalance-write.json``), and a rerun with another plan, source, augment or
    seed is refused rather than mixed in.

    Resuming: a rerun with the same arguments removes temporaries a killed run left
    and writes every item that is missing. An item whose image exists is kept
    (counted as ``skipped``) only when it is shown current, and rewritten otherwise:

    - with a manifest (a complete earlier run): when the hashes of its source files
      and of its files in ``out_dir`` equal the manifest's, so an item whose source
      changed, or whose files were edited, is rewritten without being decoded;
    - without one (an interrupted run, or a deleted or older-version manifest,
      whose files nothing vouches for): when its files hold exactly the pixels that
      writing it now would give, which costs decoding (and augmenting) the item
      but not encoding it.

    Parameters
    ----------
    dataset_or_folder : SegmentationFolder, MaskFolder or path
        The source; tiling, class names and layout are taken from it.
    plan : cobalance.Plan
        A plan for it (``plan.n_samples == len(source)``).
    out_dir : str or path
        An empty or missing folder, or the folder of an interrupted run of this job.
    augment : None, True or callable
        ``None``: items are copies. ``True``: ``DuplicateAugmentation(seed=seed)``
        (duplicates augmented, originals unchanged). A callable with that signature
        ``augment(images, masks, samples, copy_index) -> (images, masks)`` is called with
        a batch of one item for every item, and must be deterministic for resuming to
        be exact.
    seed : int
    progress : bool
        Show a tqdm progress bar.

    Returns
    -------
    WriteReport
        The manifest's path and how many items were written / found complete.

    Raises
    ------
    ValueError
        A plan for another number of samples (naming ``plan``), a bad ``augment``, an
        ``out_dir`` holding something else, or the source folder's own errors.
    """
    folder = _open_folder(dataset_or_folder)
    indices, copies = plan_arrays(plan)
    if int(plan.n_samples) != len(folder):
        raise ValueError(f"plan is for {int(plan.n_samples)} samples (plan.n_samples) but the source "
                         f"{folder.root} has {len(folder)}")
    augmenter = _augmenter(augment, seed)
    out_dir = Path(out_dir)
    names = _item_names(folder, indices, copies)
    _claim_out_dir(out_dir, _job_description(folder, indices, copies, augment, seed))

    label_map = folder.layout == "label_map"
    images_dir, masks_dir = out_dir / "images", out_dir / "masks"
    class_dirs = [] if label_map else [masks_dir / name for name in folder.class_names]
    for d in [images_dir, masks_dir, *class_dirs]:
        d.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries([images_dir, masks_dir, *class_dirs])
    if label_map:
        atomic_write_text(out_dir / "classes.txt", "".join(f"{n}\n" for n in folder.class_names))

    from .augmentation import DuplicateAugmentation, sample_seed

    # The seed each augmented copy's parameters come from: a DuplicateAugmentation's own.
    base_seed = augmenter.seed if isinstance(augmenter, DuplicateAugmentation) else int(seed)

    def goes_through_augment(copy: int) -> bool:
        if augmenter is None:
            return False
        if isinstance(augmenter, DuplicateAugmentation):  # it would pass the rest unchanged
            return copy > 0 or augmenter.augment_originals
        return True

    from tqdm.auto import tqdm

    manifest = out_dir / MANIFEST
    recorded = _read_manifest_hashes(manifest)
    source_digests = {}

    def source_sha256(i: int):
        # the tiles of an image share its files: hashed once per image
        if i not in source_digests:
            source_digests[i] = (_file_sha256(folder.image_path(i)), _masks_sha256(folder.mask_paths(i), label_map))
        return source_digests[i]

    def item_arrays(sample: int, copy: int, augmented: bool, name: str):
        """The item's image and mask as they are written (label maps in the PNG's integer type)."""
        image, mask = folder.sample(sample)
        if augmented:
            image, mask = _augment_item(augmenter, image, mask, label_map, sample, copy)
        image = np.ascontiguousarray(image, dtype=np.uint8)
        if label_map:
            return image, _label_map_for_png(np.asarray(mask), name)
        return image, np.asarray(mask)

    rows = []
    written = skipped = 0
    bar = tqdm(total=len(names), desc="write_balanced", unit="img", disable=not progress)
    try:
        for sample, copy, name in zip(indices.tolist(), copies.tolist(), names):
            i, y, x = (int(v) for v in folder.origins[sample])
            augmented = goes_through_augment(copy)
            file = f"images/{name}.png"
            image_path = images_dir / f"{name}.png"
            mask_paths = [masks_dir / f"{name}.png"] if label_map else [d / f"{name}.png" for d in class_dirs]
            sources = source_sha256(i)
            row = (file, sample, folder.image_ids[i], y, x, copy, int(augmented),
                   sample_seed(base_seed, sample, copy) if augmented else "")
            arrays = outputs = None
            current = False
            if image_path.is_file():
                record = recorded.get(file)
                if record is not None:
                    outputs = (_file_sha256(image_path), _masks_sha256(mask_paths, label_map))
                    current = tuple(record[k] for k in _HASH_COLUMNS) == (*sources, *outputs)
                else:
                    arrays = item_arrays(sample, copy, augmented, name)
                    current = _output_matches(*arrays, image_path, mask_paths, label_map)
            if current:
                skipped += 1
            else:
                if manifest.exists():  # it would vouch for items this run is about to change
                    manifest.unlink()
                image, mask = arrays if arrays is not None else item_arrays(sample, copy, augmented, name)
                if image_path.exists():  # an item being redone is incomplete until its image is back
                    image_path.unlink()
                if label_map:
                    _save_png(mask, mask_paths[0])
                else:
                    for path, plane in zip(mask_paths, mask):
                        if plane.any():
                            _save_png(plane != 0, path)
                        elif path.exists():  # left by a run that wrote this item differently
                            path.unlink()
                # The image last: its presence marks the item complete.
                _save_png(image, image_path)
                written += 1
                outputs = None
            if outputs is None:
                outputs = (_file_sha256(image_path), _masks_sha256(mask_paths, label_map))
            rows.append(row + (*sources, *outputs))
            bar.update(1)
    finally:
        bar.close()

    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(_MANIFEST_COLUMNS)
    writer.writerows(rows)
    atomic_write_text(manifest, text.getvalue())
    return WriteReport(manifest=manifest, written=written, skipped=skipped)
