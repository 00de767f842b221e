"""Per-class Dice and vDice on numpy arrays, for offline evaluation (numpy only).

The same definitions, layouts and options as :mod:`cobalance.segmentation.metrics`
(its torch twin, which runs on any device):

- label maps: ``target`` class ids ``(N, H, W)`` or ``(H, W)``; ``pred`` class ids of
  the same shape or scores ``(N, C, H, W)`` decoded by argmax;
- multi-label masks: ``target`` 0/1 ``(N, C, H, W)``; ``pred`` 0/1 labels,
  probabilities (``> threshold``) or logits (``sigmoid(pred) > threshold``);
- Dice of class ``c`` = ``2 tp / (P + T)``; vDice = mean over classes of it;
- ``absent="skip"``: a class absent from prediction and target gets NaN, left out of
  every mean; ``absent="one"``: it gets 1;
- ``reduction="global"`` (counts over all images, ``(C,)``), ``"per_image"`` (mean over
  images of per-image Dice, ``(C,)``) or ``"none"`` (``(N, C)``);
- ``ignore_index``: target value whose pixels are not counted (per channel for
  multi-label masks); not a class id.

Both modules are thin front ends of one implementation, :mod:`cobalance._dice`, so
they count, reduce and fail alike; this one adds only the numpy spelling of a few
array operations.
"""

from __future__ import annotations

import warnings
from typing import Optional

import numpy as np

from . import _dice
from ._dice import DiceResult

__all__ = ["DiceMeter", "DiceResult", "dice_counts", "dice_per_class", "vdice"]


class _NumpyOps(_dice.ArrayOps):
    """The array operations of :mod:`cobalance._dice` on numpy arrays."""

    def inputs(self, pred, target):
        return np.asarray(pred), np.asarray(target)

    def is_integer(self, x) -> bool:
        return x.dtype.kind in "iub"

    def is_float(self, x) -> bool:
        return x.dtype.kind == "f"

    def int64(self, x):
        return x.astype(np.int64, copy=False)

    def to_float(self, x):
        return np.asarray(x, dtype=np.float64)

    def argmax_classes(self, scores):
        return scores.argmax(axis=1)

    def arange(self, n, like):
        return np.arange(n, dtype=np.int64)

    def bincount(self, keys, size):
        return np.bincount(keys, minlength=size).astype(np.int64, copy=False)

    def count(self, on, axes):
        return on.sum(axis=axes, dtype=np.int64)

    def where(self, condition, a, b):
        return np.where(condition, a, b)

    def scalar(self, value, like):
        return np.asarray(value, dtype=like.dtype)

    def isnan(self, x):
        return np.isnan(x)

    def nanmean(self, x, axis):
        # An all-NaN slice is a defined outcome here (every class skipped), not a warning.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.nanmean(x, axis=axis)

    def device(self, x):
        return "cpu"

    def result(self, x):
        return float(x) if np.ndim(x) == 0 else x


_NUMPY = _NumpyOps()


def dice_counts(pred, target, *, num_classes, ignore_index=None, pred_format="auto", threshold=0.5):
    """Per-image, per-class pixel counts behind Dice.

    Parameters
    ----------
    pred, target : array_like
        Layouts as in the module docstring.
    num_classes : int
    ignore_index : int, optional
    pred_format : {"auto", "labels", "probs", "logits"}
        Multi-label decoding; ``"auto"`` reads integers and booleans as labels, floats
        within [0, 1] as probabilities, other floats as logits.
    threshold : float

    Returns
    -------
    tp, pred_sum, target_sum : ndarray of int64, shape (N, C)

    Raises
    ------
    ValueError
        On mismatched shapes, class ids outside ``[0, num_classes)``, multi-label values
        other than 0/1, or bad options; the message names the argument.
    """
    return _dice.dice_counts(_NUMPY, pred, target, num_classes=num_classes, ignore_index=ignore_index,
                             pred_format=pred_format, threshold=threshold)


def dice_per_class(
    pred,
    target,
    *,
    num_classes: int,
    ignore_index: Optional[int] = None,
    absent: str = "skip",
    reduction: str = "global",
    pred_format: str = "auto",
    threshold: float = 0.5,
) -> np.ndarray:
    """Binary Dice of each class against the rest (float64).

    ``reduction="global"`` / ``"per_image"`` give shape ``(C,)``, ``"none"`` ``(N, C)``.
    Other parameters and errors as in :func:`dice_counts`; ``absent`` as in the module
    docstring.
    """
    return _dice.dice_per_class(_NUMPY, pred, target, num_classes=num_classes, ignore_index=ignore_index,
                                absent=absent, reduction=reduction, pred_format=pred_format, threshold=threshold)


def vdice(
    pred,
    target,
    *,
    num_classes: int,
    ignore_index: Optional[int] = None,
    absent: str = "skip",
    reduction: str = "global",
    pred_format: str = "auto",
    threshold: float = 0.5,
):
    """vDice: the mean over classes of :func:`dice_per_class` (NaN entries left out).

    A float for ``"global"`` / ``"per_image"``, a ``(N,)`` array for ``"none"``.
    """
    return _dice.vdice(_NUMPY, pred, target, num_classes=num_classes, ignore_index=ignore_index, absent=absent,
                       reduction=reduction, pred_format=pred_format, threshold=threshold)


class DiceMeter(_dice.StreamingDice):
    """Streaming per-class Dice and vDice over a dataset (numpy).

    ``mode="global"`` reports Dice of the pixel counts summed over images (micro over
    pixels), ``"per_image"`` the mean of per-image Dice; the result equals
    :func:`dice_per_class` with the same reduction on the whole dataset, however it is
    cut into batches. :meth:`compute` returns a :class:`DiceResult` of a float64 array
    and a float.

    Parameters
    ----------
    num_classes : int
    mode : {"global", "per_image"}
    ignore_index, absent, pred_format, threshold
        As in :func:`dice_per_class`.

    Attributes
    ----------
    tp, pred_sum, target_sum : ndarray of int64, shape (C,), or None
        Pixel counts summed over every image seen (None before the first batch).
    image_dice_sum : ndarray of float64, shape (C,), or None
        Sum over images of each image's Dice, where it is defined.
    image_dice_count : ndarray of int64, shape (C,), or None
        Number of images whose Dice of the class is defined.
    n_images : int
    """

    ops = _NUMPY
