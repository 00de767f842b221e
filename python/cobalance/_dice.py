"""Per-class Dice written once, for numpy arrays and torch tensors alike.

The public front ends are :mod:`cobalance.metrics` (numpy) and
:mod:`cobalance.segmentation.metrics` (torch, on the tensors' device); their module
docstrings define the layouts, options and reductions. Everything here - option and
shape checks, the counting of ``tp``, ``P`` and ``T`` per image and class, the
reductions, the ``absent`` policy and the streaming meter's state - is written against
an :class:`ArrayOps` adapter that holds the few operations numpy and torch spell
differently; the rest (shapes, indexing, comparisons, ``&``, ``sum(0)``, ``min``,
``max``, ``item``) both libraries share. This module imports neither torch nor anything
that imports it, so ``import cobalance`` stays numpy-only.

Which path runs when:

=====================  ==========================================================
target layout          counting
=====================  ==========================================================
``(N, H, W)``, ints    :func:`labelmap_counts`: ``pred`` scores decoded by
(or ``(H, W)``)        ``ops.argmax_classes``, then three ``ops.bincount`` over
                       (image, class) keys; ignored pixels go to one extra bin
``(N, C, H, W)``       :func:`multilabel_counts`: ``pred`` cut by
                       :func:`multilabel_cut`, then ``ops.count`` over H, W
=====================  ==========================================================
"""

from __future__ import annotations

import abc
import math
from typing import Any, NamedTuple, Optional

import numpy as np

__all__ = [
    "ArrayOps",
    "DiceResult",
    "StreamingDice",
    "check_options",
    "check_reduction",
    "dice_counts",
    "dice_from_counts",
    "dice_per_class",
    "vdice",
]

ABSENT = ("skip", "one")
REDUCTIONS = ("global", "per_image", "none")
PRED_FORMATS = ("auto", "labels", "probs", "logits")
METER_MODES = ("global", "per_image")
NO_UPDATE = "DiceMeter.compute() called before any update()"


class ArrayOps(abc.ABC):
    """The operations that numpy and torch spell differently, as one front end needs them."""

    @abc.abstractmethod
    def inputs(self, pred, target):
        """``(pred, target)`` as arrays of this library; raises ValueError for what it cannot take."""

    @abc.abstractmethod
    def is_integer(self, x) -> bool:
        """Whether ``x`` holds integers or booleans."""

    @abc.abstractmethod
    def is_float(self, x) -> bool:
        """Whether ``x`` holds floating-point values."""

    @abc.abstractmethod
    def int64(self, x):
        """``x`` as int64 (no copy when it already is)."""

    @abc.abstractmethod
    def to_float(self, x):
        """``x`` in the float type Dice is computed in (float64 where the device has it)."""

    @abc.abstractmethod
    def argmax_classes(self, scores):
        """Class ids ``(N, ...)`` of ``scores`` ``(N, C, ...)``: the first maximum over axis 1."""

    @abc.abstractmethod
    def arange(self, n: int, like):
        """``0 .. n - 1`` as int64, where ``like`` lives."""

    @abc.abstractmethod
    def bincount(self, keys, size: int):
        """int64 counts of each value of the 1-D int64 ``keys`` in ``[0, size)``, length ``size``."""

    @abc.abstractmethod
    def count(self, on, axes: tuple):
        """int64 number of true values of the boolean ``on`` over ``axes``."""

    @abc.abstractmethod
    def where(self, condition, a, b):
        """Elementwise ``a`` where ``condition`` else ``b`` (either may be a Python scalar)."""

    @abc.abstractmethod
    def scalar(self, value: float, like):
        """``value`` as a 0-d array of ``like``'s dtype, where ``like`` lives."""

    @abc.abstractmethod
    def isnan(self, x):
        """Elementwise NaN test."""

    @abc.abstractmethod
    def nanmean(self, x, axis: int):
        """Mean over ``axis`` leaving NaN out; NaN (no warning) where every value is NaN."""

    @abc.abstractmethod
    def device(self, x):
        """Where ``x`` lives (the meter keeps its state there)."""

    @abc.abstractmethod
    def result(self, x):
        """What a front end hands back for a reduced Dice ``x`` (a float for numpy's 0-d arrays)."""


class DiceResult(NamedTuple):
    """What ``DiceMeter.compute`` returns: per-class Dice ``(C,)`` and their mean.

    A float64 array and a float from :class:`cobalance.metrics.DiceMeter`; tensors on
    the batches' device from :class:`cobalance.segmentation.metrics.DiceMeter`.
    """

    per_class: Any
    vdice: Any


# ---------------------------------------------------------------- options and shapes


def _is_int(value) -> bool:
    # bool is not a count or a class id, though Python makes it an int.
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def check_options(num_classes, ignore_index, absent, pred_format, threshold) -> int:
    """``num_classes`` as an int, after checking every option of the Dice functions.

    Raises
    ------
    ValueError
        Naming the option and what it must be.
    """
    if not _is_int(num_classes) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    if ignore_index is not None:
        if not _is_int(ignore_index):
            raise ValueError(f"ignore_index must be an integer or None, got {ignore_index!r}")
        if 0 <= ignore_index < num_classes:
            raise ValueError(
                f"ignore_index={ignore_index} is a class id (num_classes={num_classes}); "
                "to leave a class out of vDice, drop its column from dice_per_class instead"
            )
    if absent not in ABSENT:
        raise ValueError(f"absent must be one of {ABSENT}, got {absent!r}")
    if pred_format not in PRED_FORMATS:
        raise ValueError(f"pred_format must be one of {PRED_FORMATS}, got {pred_format!r}")
    if not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f"threshold must lie in [0, 1], got {threshold!r}")
    return int(num_classes)


def check_reduction(reduction: str) -> None:
    """Raises ValueError unless ``reduction`` is one of :data:`REDUCTIONS`."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def _absent_dice(absent: str) -> float:
    """The Dice given to a class absent from prediction and target."""
    return math.nan if absent == "skip" else 1.0


def _logit(p: float) -> float:
    p = float(p)
    if p <= 0.0:
        return -math.inf
    if p >= 1.0:
        return math.inf
    return math.log(p / (1.0 - p))


def _check_range(values, num_classes: int, name: str) -> None:
    if math.prod(values.shape) == 0:
        return
    lo, hi = int(values.min()), int(values.max())
    if lo < 0 or hi >= num_classes:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{name} holds class id {bad}, outside [0, {num_classes}) (num_classes={num_classes})")


def _pred_is_scores(pred_shape: tuple, target_shape: tuple, num_classes: int) -> bool:
    """Whether a label-map ``pred`` holds scores ``(N, C, H, W)`` (else class ids shaped like target).

    Raises ValueError when it is neither.
    """
    if len(pred_shape) == len(target_shape) + 1:
        if pred_shape[1] != num_classes or pred_shape[:1] + pred_shape[2:] != target_shape:
            raise ValueError(
                f"pred scores must have shape (N, num_classes, H, W) = "
                f"{(target_shape[0], num_classes) + target_shape[1:]}, got {pred_shape}"
            )
        return True
    if pred_shape != target_shape:
        raise ValueError(
            f"pred must be class ids shaped like target {target_shape} or scores (N, num_classes, H, W), "
            f"got {pred_shape}"
        )
    return False


def multilabel_cut(ops: ArrayOps, pred, pred_format: str, threshold: float) -> Optional[float]:
    """The value a multi-label ``pred`` must exceed to be on; None when it holds 0/1 labels.

    ``"auto"`` reads integers and booleans as labels, floats within [0, 1] as
    probabilities and other floats as logits.
    """
    fmt = pred_format
    if fmt == "auto":
        if not ops.is_float(pred):
            fmt = "labels"
        elif math.prod(pred.shape) and (float(pred.min()) < 0.0 or float(pred.max()) > 1.0):
            fmt = "logits"
        else:
            fmt = "probs"
    if fmt == "labels":
        return None
    # sigmoid(x) > t  <=>  x > logit(t): comparing in pred's own dtype decodes the same
    # pixels on every library and device, with no rounding of a computed sigmoid.
    return float(threshold) if fmt == "probs" else _logit(threshold)


# ---------------------------------------------------------------- counting


def labelmap_counts(ops: ArrayOps, pred, target, num_classes: int, ignore_index: Optional[int]):
    """``tp, pred_sum, target_sum`` ``(N, C)`` of label maps ``target`` ``(N, H, W)``."""
    n = target.shape[0]
    if _pred_is_scores(tuple(pred.shape), tuple(target.shape), num_classes):
        pred = ops.argmax_classes(pred)
    elif not ops.is_integer(pred):
        raise ValueError(f"pred class ids must be integers, got dtype {pred.dtype}")
    pred = ops.int64(pred).reshape(n, -1)
    target = ops.int64(target).reshape(n, -1)
    valid = None if ignore_index is None else target != ignore_index
    if valid is not None:
        # Checked and keyed as class 0, then sent to the discarded bin below: masking
        # with a boolean index instead would make a GPU wait for the number of pixels.
        target = ops.where(valid, target, 0)
        pred = ops.where(valid, pred, 0)
    _check_range(target, num_classes, "target")
    _check_range(pred, num_classes, "pred")
    # Keys number (image, class) pairs; the counts of each are one bincount each, so the
    # work is linear in pixels and the memory in N * C whatever the number of classes.
    size = n * num_classes
    image = ops.arange(n, target).reshape(n, 1) * num_classes
    key_target = image + target
    key_pred = image + pred
    hit = pred == target
    if valid is not None:
        hit = hit & valid
        key_target = ops.where(valid, key_target, size)
        key_pred = ops.where(valid, key_pred, size)
    key_tp = ops.where(hit, key_target, size)
    return tuple(ops.bincount(key.reshape(-1), size + 1)[:size].reshape(n, num_classes)
                 for key in (key_tp, key_pred, key_target))


def _binary(values, name: str, ignore_index: Optional[int]):
    bad = (values != 0) & (values != 1)
    if ignore_index is not None:
        bad = bad & (values != ignore_index)
    if bool(bad.any()):
        raise ValueError(f"{name} of a multi-label mask must be 0 or 1, got {values[bad][0].item()!r}")
    return values == 1


def multilabel_counts(ops: ArrayOps, pred, target, num_classes: int, ignore_index: Optional[int],
                      pred_format: str, threshold: float):
    """``tp, pred_sum, target_sum`` ``(N, C)`` of multi-label masks ``target`` ``(N, C, H, W)``."""
    target_shape, pred_shape = tuple(target.shape), tuple(pred.shape)
    if target_shape[1] != num_classes:
        raise ValueError(f"multi-label target must have num_classes={num_classes} channels, got shape {target_shape}")
    if pred_shape != target_shape:
        raise ValueError(f"pred must have the shape of target {target_shape}, got {pred_shape}")
    cut = multilabel_cut(ops, pred, pred_format, threshold)
    pred_on = _binary(pred, "pred", None) if cut is None else pred > ops.scalar(cut, pred)
    target_on = _binary(target, "target", ignore_index)
    if ignore_index is not None:
        pred_on = pred_on & (target != ignore_index)
    axes = tuple(range(2, len(target_shape)))
    return ops.count(pred_on & target_on, axes), ops.count(pred_on, axes), ops.count(target_on, axes)


def dice_counts(ops: ArrayOps, pred, target, *, num_classes, ignore_index=None, pred_format="auto", threshold=0.5):
    """Per-image, per-class ``tp, pred_sum, target_sum`` (int64, ``(N, C)``); see the front ends."""
    num_classes = check_options(num_classes, ignore_index, "skip", pred_format, threshold)
    pred, target = ops.inputs(pred, target)
    if len(target.shape) == 2:
        target, pred = target[None], pred[None]
    if len(target.shape) == 3:
        if not ops.is_integer(target):
            raise ValueError(f"a label-map target must hold integer class ids, got dtype {target.dtype}")
        return labelmap_counts(ops, pred, target, num_classes, ignore_index)
    if len(target.shape) == 4:
        return multilabel_counts(ops, pred, target, num_classes, ignore_index, pred_format, threshold)
    raise ValueError(
        f"target must be a label map (N, H, W) / (H, W) or a multi-label mask (N, C, H, W), "
        f"got shape {tuple(target.shape)}"
    )


# ---------------------------------------------------------------- reductions


def dice_from_counts(ops: ArrayOps, tp, pred_sum, target_sum, absent: str):
    """``2 tp / (P + T)`` elementwise, ``absent``'s value where ``P + T == 0``."""
    denom = ops.to_float(pred_sum + target_sum)
    empty = denom == 0
    dice = 2.0 * ops.to_float(tp) / ops.where(empty, 1.0, denom)
    return ops.where(empty, _absent_dice(absent), dice)


def dice_per_class(ops: ArrayOps, pred, target, *, num_classes, ignore_index, absent, reduction, pred_format,
                   threshold):
    """Dice per class (``"global"``, ``"per_image"``) or per image and class (``"none"``)."""
    check_reduction(reduction)
    check_options(num_classes, ignore_index, absent, pred_format, threshold)
    tp, ps, ts = dice_counts(ops, pred, target, num_classes=num_classes, ignore_index=ignore_index,
                             pred_format=pred_format, threshold=threshold)
    if reduction == "global":
        return dice_from_counts(ops, tp.sum(0), ps.sum(0), ts.sum(0), absent)
    per_image = dice_from_counts(ops, tp, ps, ts, absent)
    return per_image if reduction == "none" else ops.nanmean(per_image, 0)


def vdice(ops: ArrayOps, pred, target, **options):
    """The mean over classes (NaN left out) of :func:`dice_per_class` with the same options."""
    return ops.result(ops.nanmean(dice_per_class(ops, pred, target, **options), -1))


# ---------------------------------------------------------------- streaming


class StreamingDice:
    """Per-class Dice and vDice over a dataset, batch by batch, for one :class:`ArrayOps`.

    A front end subclasses it and sets :attr:`ops`.

    Parameters
    ----------
    num_classes : int
    mode : {"global", "per_image"}
        What :meth:`compute` reports: Dice from the pixel counts summed over every
        image (micro over pixels, like ``reduction="global"``), or the mean over
        images of each image's Dice (like ``reduction="per_image"``).
    ignore_index, absent, pred_format, threshold
        As in ``dice_per_class``.

    Attributes
    ----------
    tp, pred_sum, target_sum : int64 array, shape (C,), or None
        Pixel counts summed over every image seen (None before the first batch).
    image_dice_sum : float array, shape (C,), or None
        Sum over images of each image's Dice, where it is defined (not NaN).
    image_dice_count : int64 array, shape (C,), or None
        Number of images whose Dice of the class is defined.
    n_images : int
        Images seen since the last :meth:`reset`.

    Both kinds of state are kept whatever the mode, so each field means one thing;
    only sums are kept, so the result does not depend on how the dataset is cut into
    batches. The state lives where the first batch lives.
    """

    ops: ArrayOps

    def __init__(
        self,
        num_classes: int,
        *,
        mode: str = "global",
        ignore_index: Optional[int] = None,
        absent: str = "skip",
        pred_format: str = "auto",
        threshold: float = 0.5,
    ) -> None:
        if mode not in METER_MODES:
            raise ValueError(f"mode must be 'global' or 'per_image', got {mode!r}")
        self.num_classes = check_options(num_classes, ignore_index, absent, pred_format, threshold)
        self.mode = mode
        self.ignore_index = ignore_index
        self.absent = absent
        self.pred_format = pred_format
        self.threshold = threshold
        self.reset()

    def reset(self) -> None:
        """Forget every batch seen so far."""
        self.tp = None
        self.pred_sum = None
        self.target_sum = None
        self.image_dice_sum = None
        self.image_dice_count = None
        self.n_images = 0

    def update(self, pred, target) -> None:
        """Add a batch (the layouts of ``dice_per_class``)."""
        ops = self.ops
        tp, ps, ts = dice_counts(ops, pred, target, num_classes=self.num_classes, ignore_index=self.ignore_index,
                                 pred_format=self.pred_format, threshold=self.threshold)
        if self.tp is not None and ops.device(tp) != ops.device(self.tp):
            raise ValueError(f"batch is on {ops.device(tp)} but the meter accumulates on {ops.device(self.tp)}")
        dice = dice_from_counts(ops, tp, ps, ts, self.absent)
        defined = ~ops.isnan(dice)
        sums = (tp.sum(0), ps.sum(0), ts.sum(0), ops.where(defined, dice, 0.0).sum(0), ops.int64(defined.sum(0)))
        if self.tp is None:
            self.tp, self.pred_sum, self.target_sum, self.image_dice_sum, self.image_dice_count = sums
        else:
            self.tp = self.tp + sums[0]
            self.pred_sum = self.pred_sum + sums[1]
            self.target_sum = self.target_sum + sums[2]
            self.image_dice_sum = self.image_dice_sum + sums[3]
            self.image_dice_count = self.image_dice_count + sums[4]
        self.n_images += int(tp.shape[0])

    def compute(self) -> DiceResult:
        """Per-class Dice and vDice of everything seen since the last reset.

        Raises
        ------
        ValueError
            When no image was added.
        """
        if self.n_images == 0:
            raise ValueError(NO_UPDATE)
        ops = self.ops
        if self.mode == "global":
            per_class = dice_from_counts(ops, self.tp, self.pred_sum, self.target_sum, self.absent)
        else:
            counted = self.image_dice_count > 0
            images = ops.to_float(ops.where(counted, self.image_dice_count, 1))
            per_class = ops.where(counted, self.image_dice_sum / images, math.nan)
        return DiceResult(per_class=per_class, vdice=ops.result(ops.nanmean(per_class, -1)))
