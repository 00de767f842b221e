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
"""

from __future__ import annotations

import abc
import math
import warnings
from typing import Any, NamedTuple, Optional

import numpy as np

__all__ = ["DiceMeter", "DiceResult", "dice_counts", "dice_per_class", "vdice"]

_ABSENT = ("skip", "one")
_REDUCTIONS = ("global", "per_image", "none")
_PRED_FORMATS = ("auto", "labels", "probs", "logits")
_METER_MODES = ("global", "per_image")
_NO_UPDATE = "DiceMeter.compute() called before any update()"

# What follows up to _labelmap_counts holds no array code of its own (only shapes, options
# and methods that numpy arrays and torch tensors share), so the torch twin
# cobalance.segmentation.metrics imports it and both validate and decide alike.


def _check_options(num_classes, ignore_index, absent, pred_format, threshold) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    if ignore_index is not None:
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, (int, np.integer)):
            raise ValueError(f"ignore_index must be an integer or None, got {ignore_index!r}")
        if 0 <= ignore_index < num_classes:
            raise ValueError(
                f"ignore_index={ignore_index} is a class id (num_classes={num_classes}); "
                "to leave a class out of vDice, drop its column from dice_per_class instead"
            )
    if absent not in _ABSENT:
        raise ValueError(f"absent must be one of {_ABSENT}, got {absent!r}")
    if pred_format not in _PRED_FORMATS:
        raise ValueError(f"pred_format must be one of {_PRED_FORMATS}, got {pred_format!r}")
    if not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f"threshold must lie in [0, 1], got {threshold!r}")
    return int(num_classes)


def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


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


def _check_multilabel_shapes(pred_shape: tuple, target_shape: tuple, num_classes: int) -> None:
    if target_shape[1] != num_classes:
        raise ValueError(f"multi-label target must have num_classes={num_classes} channels, got shape {target_shape}")
    if pred_shape != target_shape:
        raise ValueError(f"pred must have the shape of target {target_shape}, got {pred_shape}")


def _multilabel_cut(pred, pred_is_float: bool, pred_format: str, threshold: float) -> Optional[float]:
    """The value a multi-label ``pred`` must exceed to be on; None when it holds 0/1 labels.

    ``"auto"`` reads integers and booleans as labels, floats within [0, 1] as
    probabilities and other floats as logits.
    """
    fmt = pred_format
    if fmt == "auto":
        if not pred_is_float:
            fmt = "labels"
        elif math.prod(pred.shape) and (float(pred.min()) < 0.0 or float(pred.max()) > 1.0):
            fmt = "logits"
        else:
            fmt = "probs"
    if fmt == "labels":
        return None
    # sigmoid(x) > t  <=>  x > logit(t): comparing in pred's own dtype decodes the same
    # pixels in both twins, with no rounding of a computed sigmoid.
    return float(threshold) if fmt == "probs" else _logit(threshold)


def _bad_target_layout(target_shape: tuple) -> ValueError:
    return ValueError(
        f"target must be a label map (N, H, W) / (H, W) or a multi-label mask (N, C, H, W), got shape {target_shape}"
    )


class DiceResult(NamedTuple):
    """What ``DiceMeter.compute`` returns: per-class Dice ``(C,)`` and their mean.

    A float64 array and a float from :class:`cobalance.metrics.DiceMeter`; tensors on
    the batches' device from :class:`cobalance.segmentation.metrics.DiceMeter`.
    """

    per_class: Any
    vdice: Any


class _DiceMeterOptions(abc.ABC):
    """The options of a streaming Dice meter, validated once; the twins' meters build on it."""

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
        if mode not in _METER_MODES:
            raise ValueError(f"mode must be 'global' or 'per_image', got {mode!r}")
        self.num_classes = _check_options(num_classes, ignore_index, absent, pred_format, threshold)
        self.mode = mode
        self.ignore_index = ignore_index
        self.absent = absent
        self.pred_format = pred_format
        self.threshold = threshold
        self.reset()

    @abc.abstractmethod
    def reset(self) -> None:
        """Forget every batch seen so far."""

    def _count_options(self) -> dict:
        """The keyword arguments of ``dice_counts`` for one batch."""
        return {
            "num_classes": self.num_classes,
            "ignore_index": self.ignore_index,
            "pred_format": self.pred_format,
            "threshold": self.threshold,
        }


def _labelmap_counts(pred, target, num_classes, ignore_index):
    n = target.shape[0]
    if _pred_is_scores(pred.shape, target.shape, num_classes):
        pred = pred.argmax(axis=1)
    elif pred.dtype.kind not in "iub":
        raise ValueError(f"pred class ids must be integers, got dtype {pred.dtype}")
    pred = pred.astype(np.int64, copy=False).reshape(n, -1)
    target = target.astype(np.int64, copy=False).reshape(n, -1)
    image = np.broadcast_to(np.arange(n, dtype=np.int64)[:, None], target.shape)
    if ignore_index is not None:
        valid = target != ignore_index
        pred, target, image = pred[valid], target[valid], image[valid]
    _check_range(target, num_classes, "target")
    _check_range(pred, num_classes, "pred")
    size = n * num_classes
    key_pred = (image * num_classes + pred).ravel()
    key_target = (image * num_classes + target).ravel()
    same = (pred == target).ravel()
    pred_sum = np.bincount(key_pred, minlength=size)
    target_sum = np.bincount(key_target, minlength=size)
    tp = np.bincount(key_target[same], minlength=size)
    return tuple(x.astype(np.int64).reshape(n, num_classes) for x in (tp, pred_sum, target_sum))


def _binary(values: np.ndarray, name: str, ignore_index) -> np.ndarray:
    check = values if ignore_index is None else values[values != ignore_index]
    bad = (check != 0) & (check != 1)
    if bad.any():
        raise ValueError(f"{name} of a multi-label mask must be 0 or 1, got {check[bad][0]!r}")
    return values == 1


def _multilabel_counts(pred, target, num_classes, ignore_index, pred_format, threshold):
    _check_multilabel_shapes(pred.shape, target.shape, num_classes)
    cut = _multilabel_cut(pred, pred.dtype.kind == "f", pred_format, threshold)
    if cut is None:
        pred_on = _binary(pred, "pred", None)
    else:
        pred_on = pred > np.asarray(cut, dtype=pred.dtype)
    target_on = _binary(target, "target", ignore_index)
    if ignore_index is not None:
        pred_on = pred_on & (target != ignore_index)
    axes = tuple(range(2, target.ndim))
    tp = (pred_on & target_on).sum(axis=axes, dtype=np.int64)
    return tp, pred_on.sum(axis=axes, dtype=np.int64), target_on.sum(axis=axes, dtype=np.int64)


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
    num_classes = _check_options(num_classes, ignore_index, "skip", pred_format, threshold)
    pred = np.asarray(pred)
    target = np.asarray(target)
    if target.ndim == 2:
        target, pred = target[None], pred[None]
    if target.ndim == 3:
        if target.dtype.kind not in "iub":
            raise ValueError(f"a label-map target must hold integer class ids, got dtype {target.dtype}")
        return _labelmap_counts(pred, target, num_classes, ignore_index)
    if target.ndim == 4:
        return _multilabel_counts(pred, target, num_classes, ignore_index, pred_format, threshold)
    raise _bad_target_layout(target.shape)


def _dice(tp, pred_sum, target_sum, absent: str) -> np.ndarray:
    denom = (pred_sum + target_sum).astype(np.float64)
    empty = denom == 0
    dice = 2.0 * tp / np.where(empty, 1.0, denom)
    return np.where(empty, _absent_dice(absent), dice)


def _nanmean(a: np.ndarray, axis) -> np.ndarray:
    # An all-NaN slice is a defined outcome here (every class skipped), not a warning.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(a, axis=axis)


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
    _check_reduction(reduction)
    _check_options(num_classes, ignore_index, absent, pred_format, threshold)
    tp, ps, ts = dice_counts(
        pred, target, num_classes=num_classes, ignore_index=ignore_index, pred_format=pred_format, threshold=threshold
    )
    if reduction == "global":
        return _dice(tp.sum(0), ps.sum(0), ts.sum(0), absent)
    per_image = _dice(tp, ps, ts, absent)
    return per_image if reduction == "none" else _nanmean(per_image, axis=0)


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
    per_class = dice_per_class(
        pred,
        target,
        num_classes=num_classes,
        ignore_index=ignore_index,
        absent=absent,
        reduction=reduction,
        pred_format=pred_format,
        threshold=threshold,
    )
    out = _nanmean(per_class, axis=-1)
    return float(out) if np.ndim(out) == 0 else out


class DiceMeter(_DiceMeterOptions):
    """Streaming per-class Dice and vDice over a dataset (numpy).

    ``mode="global"`` accumulates pixel counts (micro over pixels), ``"per_image"``
    accumulates per-image Dice; the result equals :func:`dice_per_class` with the same
    reduction on the whole dataset, however it is cut into batches.
    """

    def reset(self) -> None:
        """Forget every batch seen so far."""
        c = self.num_classes
        self._tp = np.zeros(c, np.int64)
        self._pred_sum = np.zeros(c, np.int64)
        self._target_sum = np.zeros(c, np.int64)
        self._dice_sum = np.zeros(c, np.float64)
        self._dice_count = np.zeros(c, np.int64)
        self.n_images = 0

    def update(self, pred, target) -> None:
        """Add a batch (same layouts as :func:`dice_per_class`)."""
        tp, ps, ts = dice_counts(pred, target, **self._count_options())
        if self.mode == "global":
            self._tp += tp.sum(0)
            self._pred_sum += ps.sum(0)
            self._target_sum += ts.sum(0)
        else:
            dice = _dice(tp, ps, ts, self.absent)
            defined = ~np.isnan(dice)
            self._dice_sum += np.where(defined, dice, 0.0).sum(0)
            self._dice_count += defined.sum(0)
        self.n_images += tp.shape[0]

    def compute(self) -> DiceResult:
        """Per-class Dice and vDice of everything seen since the last reset.

        Raises
        ------
        ValueError
            When no batch was added.
        """
        if self.n_images == 0:
            raise ValueError(_NO_UPDATE)
        if self.mode == "global":
            per_class = _dice(self._tp, self._pred_sum, self._target_sum, self.absent)
        else:
            per_class = np.where(
                self._dice_count > 0, self._dice_sum / np.maximum(self._dice_count, 1), np.nan
            )
        return DiceResult(per_class=per_class, vdice=float(_nanmean(per_class, axis=-1)))
