"""Segmentation toolkit for PyTorch: datasets, plan samplers, augmentation, metrics, writer.

Needs torch and kornia: ``pip install cobalance[torch]``. Not imported by
``import cobalance``.

- :class:`SegmentationFolder`, :class:`BalancedDataset` (:mod:`.datasets`)
- :class:`PlanSampler` (:mod:`.samplers`)
- :class:`DuplicateAugmentation` (:mod:`.augmentation`)
- :func:`dice_per_class`, :func:`vdice`, :class:`DiceMeter` (:mod:`.metrics`)
- :func:`write_balanced` (:mod:`.writer`)
"""

try:
    import torch  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised only without torch
    raise ImportError(
        "cobalance.segmentation needs PyTorch; install it with `pip install cobalance[torch]`"
    ) from exc

from .augmentation import DuplicateAugmentation, sample_seed
from .datasets import BalancedDataset, SegmentationFolder
from .metrics import DiceMeter, DiceResult, dice_counts, dice_per_class, vdice
from .samplers import PlanSampler
from .writer import WriteReport, write_balanced

__all__ = [
    "BalancedDataset",
    "DiceMeter",
    "DiceResult",
    "DuplicateAugmentation",
    "PlanSampler",
    "SegmentationFolder",
    "WriteReport",
    "dice_counts",
    "dice_per_class",
    "sample_seed",
    "vdice",
    "write_balanced",
]
