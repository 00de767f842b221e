"""Segmentation toolkit for PyTorch: datasets, plan samplers, augmentation, metrics, writer.

Needs torch (and kornia for augmentation): ``pip install cobalance[torch]``. Not
imported by ``import cobalance``.
"""

try:
    import torch  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised only without torch
    raise ImportError(
        "cobalance.segmentation needs PyTorch; install it with `pip install cobalance[torch]`"
    ) from exc

from .metrics import DiceMeter, DiceResult, dice_counts, dice_per_class, vdice

__all__ = ["DiceMeter", "DiceResult", "dice_counts", "dice_per_class", "vdice"]
