"""torch datasets over mask folders and over balancing plans."""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from ..folders import MaskFolder
from .samplers import plan_arrays

__all__ = ["BalancedDataset", "SegmentationFolder"]


def image_tensor(image: np.ndarray) -> torch.Tensor:
    """``(H, W, 3)`` uint8 -> ``(3, H, W)`` float32 in [0, 1] (a new tensor)."""
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32)).div_(255.0)


def mask_tensor(mask: np.ndarray, label_map: bool) -> torch.Tensor:
    """A label map as int64 ``(H, W)``; a multi-label mask as uint8 ``(C, H, W)`` (copies)."""
    if label_map:
        return torch.from_numpy(mask.astype(np.int64))
    return torch.from_numpy(np.array(mask, dtype=np.uint8, copy=True))


class SegmentationFolder(Dataset):
    """A folder of images and masks as a torch ``Dataset`` of tensors, read lazily.

    Reading is :class:`cobalance.folders.MaskFolder`'s (Pillow decoding; label-map or
    per-class binary-folder layouts; optional tiling, each tile a sample). Item ``k``
    is ``(image, mask)``:

    - ``image``: float32 ``(3, H, W)`` in [0, 1];
    - ``mask``: int64 ``(H, W)`` class ids for a label-map folder, uint8
      ``(C, H, W)`` of 0/1 for binary folders (classes may overlap).

    Parameters
    ----------
    root : str, path or MaskFolder
        The folder (see MaskFolder for the layouts), or an open MaskFolder to wrap (then
        no other argument may be given).
    layout, class_names, tile, stride, ignore_index, min_pixels, image_dir, mask_dir, stem_key, valid_dir, min_valid
        Passed to :class:`~cobalance.folders.MaskFolder`.

    Attributes
    ----------
    folder : MaskFolder
    layout : str
    class_names : list of str
    n_classes : int

    Raises
    ------
    ValueError
        Whatever MaskFolder raises (empty folder, image/mask size mismatch, unknown
        class names, ...), naming the file or folder; indexing raises it too for a
        file that cannot be decoded (``"cannot read image <path>: <cause>"``).
    """

    def __init__(
        self,
        root: Union[str, "MaskFolder"],
        *,
        layout: str = "auto",
        class_names: Optional[Sequence[str]] = None,
        tile=None,
        stride=None,
        ignore_index=None,
        min_pixels=1,
        image_dir: str = "images",
        mask_dir: str = "masks",
        stem_key=None,
        valid_dir: Optional[str] = None,
        min_valid: Optional[float] = None,
    ) -> None:
        if isinstance(root, MaskFolder):
            given = dict(layout=layout != "auto", class_names=class_names is not None, tile=tile is not None,
                         stride=stride is not None, ignore_index=ignore_index is not None, min_pixels=min_pixels != 1,
                         image_dir=image_dir != "images", mask_dir=mask_dir != "masks", stem_key=stem_key is not None,
                         valid_dir=valid_dir is not None, min_valid=min_valid is not None)
            extra = [name for name, set_ in given.items() if set_]
            if extra:
                raise ValueError(f"{extra} cannot be given with an open MaskFolder; open the folder with them instead")
            self.folder = root
        else:
            self.folder = MaskFolder(root, layout=layout, class_names=class_names, tile=tile, stride=stride,
                                     ignore_index=ignore_index, min_pixels=min_pixels, image_dir=image_dir,
                                     mask_dir=mask_dir, stem_key=stem_key, valid_dir=valid_dir, min_valid=min_valid)

    @property
    def layout(self) -> str:
        return self.folder.layout

    @property
    def class_names(self):
        return self.folder.class_names

    @property
    def n_classes(self) -> int:
        return len(self.folder.class_names)

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
        image, mask = self.folder.sample(int(k))
        return image_tensor(image), mask_tensor(mask, self.folder.layout == "label_map")

    def scan(self, n_threads: Optional[int] = None):
        """Per-sample class presence and pixel counts from the native mask scanner.

        Only masks are decoded, never images; see :meth:`MaskFolder.scan`.
        """
        return self.folder.scan(n_threads=n_threads)

    def presence(self, n_threads: Optional[int] = None) -> np.ndarray:
        """Per-sample class presence, bool ``(n_samples, n_classes)`` (masks only decoded)."""
        return self.scan(n_threads=n_threads).presence

    def class_presence(self, n_threads: Optional[int] = None) -> np.ndarray:
        """Fraction of samples containing each class, float64 ``(n_classes,)`` (masks only decoded)."""
        return self.scan(n_threads=n_threads).class_presence()

    def pattern_table(self, n_threads: Optional[int] = None):
        """The samples' class-presence patterns as a :class:`cobalance.PatternTable`."""
        return self.folder.pattern_table(n_threads=n_threads)

    def __repr__(self) -> str:
        return f"SegmentationFolder({self.folder!r})"


class BalancedDataset(Dataset):
    """A dataset seen through a balancing plan: item ``k`` is the plan's ``k``-th entry.

    Parameters
    ----------
    dataset : torch Dataset
        Its item ``i`` starts with ``(image, mask)`` (as :class:`SegmentationFolder`'s).
    plan : cobalance.Plan
        A plan for ``dataset``: ``plan.n_samples == len(dataset)``.
    with_source : bool
        Also return the source sample index, which :class:`DuplicateAugmentation`
        needs to seed each copy.

    Items
    -----
    ``(image, mask, copy_index)``, or ``(image, mask, sample, copy_index)`` with
    ``with_source=True``: ``sample = plan.indices()[k]`` and ``copy_index`` is 0 for
    the original and ``j`` for the ``j``-th duplicate of the sample. Pair it with
    ``PlanSampler(plan, positions=True)`` or any sampler over ``range(len(self))``.

    Raises
    ------
    ValueError
        When the plan is not for a dataset of this length.
    """

    def __init__(self, dataset, plan, *, with_source: bool = False) -> None:
        self.indices, self.copy_index = plan_arrays(plan)
        n = len(dataset)
        if int(plan.n_samples) != n:
            raise ValueError(
                f"plan is for {int(plan.n_samples)} samples (plan.n_samples) but the dataset has {n}"
            )
        self.dataset = dataset
        self.plan = plan
        self.with_source = bool(with_source)

    def __len__(self) -> int:
        return int(self.indices.size)

    def source(self, k: int) -> Tuple[int, int]:
        """``(sample, copy_index)`` of item ``k``."""
        return int(self.indices[k]), int(self.copy_index[k])

    def __getitem__(self, k: int):
        if not -len(self) <= int(k) < len(self):
            raise IndexError(f"item {k} out of range for a balanced dataset of {len(self)} items")
        sample, copy = self.source(k)
        item = self.dataset[sample]
        image, mask = item[0], item[1]
        if self.with_source:
            return image, mask, sample, copy
        return image, mask, copy
