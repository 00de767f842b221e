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
_MANIFEST_COLUMNS = ("file", "sample", "image_id", "y", "x", "copy_index", "augmented", "seed")


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

    Crash safety: every file is written to a temporary name and renamed; an item's
    image is written after its masks, so an item is complete exactly when its image
    exists. A rerun with the same arguments skips complete items, rewrites the others
    and removes temporaries a killed run left; the manifest is written last, so it
    exists only once everything is complete. ``out_dir`` keeps a description of the
    job (``.cobalance-write.json``), and a rerun with another plan, source, augment or
    seed is refused rather than mixed in.

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

    rows = []
    written = skipped = 0
    bar = tqdm(total=len(names), desc="write_balanced", unit="img", disable=not progress)
    try:
        for sample, copy, name in zip(indices.tolist(), copies.tolist(), names):
            i, y, x = (int(v) for v in folder.origins[sample])
            augmented = goes_through_augment(copy)
            rows.append((f"images/{name}.png", sample, folder.image_ids[i], y, x, copy, int(augmented),
                         sample_seed(base_seed, sample, copy) if augmented else ""))
            image_path = images_dir / f"{name}.png"
            if image_path.is_file():
                skipped += 1
                bar.update(1)
                continue
            image, mask = folder.sample(sample)
            if augmented:
                image, mask = _augment_item(augmenter, image, mask, label_map, sample, copy)
            if label_map:
                _save_png(_label_map_for_png(np.asarray(mask), name), masks_dir / f"{name}.png")
            else:
                for class_dir, plane in zip(class_dirs, np.asarray(mask)):
                    path = class_dir / f"{name}.png"
                    if plane.any():
                        _save_png(plane != 0, path)
                    elif path.exists():  # left by a run that wrote this item differently
                        path.unlink()
            # The image last: its presence marks the item complete.
            _save_png(np.ascontiguousarray(image, dtype=np.uint8), image_path)
            written += 1
            bar.update(1)
    finally:
        bar.close()

    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(_MANIFEST_COLUMNS)
    writer.writerows(rows)
    manifest = out_dir / MANIFEST
    atomic_write_text(manifest, text.getvalue())
    return WriteReport(manifest=manifest, written=written, skipped=skipped)
