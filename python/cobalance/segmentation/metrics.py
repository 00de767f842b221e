"""Per-class Dice and vDice on torch tensors, on the tensors' device.

vDice, the metric of the balancing method, is the mean over classes of the binary
Dice of each class against the rest. Both mask layouts are handled:

- **label maps**: ``target`` holds class ids, shape ``(N, H, W)`` (or one ``(H, W)``
  map); ``pred`` is either class ids of the same shape or per-class scores
  ``(N, C, H, W)`` (logits, probabilities or one-hot), decoded by ``argmax`` over C.
- **multi-label masks**: ``target`` is 0/1, shape ``(N, C, H, W)``; classes may
  overlap. ``pred`` has the same shape and holds 0/1 labels, probabilities
  (``> threshold``) or logits (``sigmoid(pred) > threshold``).

Class ``c`` of image ``n`` has ``tp`` pixels predicted and labelled ``c``, ``P``
predicted ``c`` and ``T`` labelled ``c``; its Dice is ``2 tp / (P + T)``.

A class absent from both prediction and target (``P + T == 0``) has no defined Dice;
``absent`` says what to do with it:

- ``"skip"`` (default): the Dice is NaN and is left out of every mean (over images and
  over classes); a mean over nothing is NaN.
- ``"one"``: the Dice is 1 (an empty prediction of an empty class is perfect).

``reduction`` says over what the counts are taken:

- ``"global"``: counts summed over all images and pixels (micro over pixels), one Dice
  per class, shape ``(C,)``;
- ``"per_image"``: Dice per image and class, then the mean over images, shape ``(C,)``;
- ``"none"``: Dice per image and class, shape ``(N, C)``.

``vdice`` is always the mean over the last (class) axis of ``dice_per_class`` with the
same arguments, so ``vdice(reduction="per_image")`` averages the per-class image means.
(``torchmetrics``' samplewise macro Dice averages per-image means instead; the two agree
whenever no class is skipped.)

``ignore_index``: pixels whose target equals it are left out of every count (for
multi-label masks, of the counts of that channel only). It must not be a class id.

The numpy twin of this module is :mod:`cobalance.metrics`.
"""

from __future__ import annotations

from typing import Optional

import torch

# The array-independent part (option checks, shape checks, the absent policy, the
# multi-label decoding rule, the result container) is shared with the numpy twin.
from ..metrics import (
    _NO_UPDATE,
    DiceResult,
    _absent_dice,
    _bad_target_layout,
    _check_multilabel_shapes,
    _check_options,
    _check_range,
    _check_reduction,
    _DiceMeterOptions,
    _multilabel_cut,
    _pred_is_scores,
)

__all__ = ["DiceMeter", "DiceResult", "dice_counts", "dice_per_class", "vdice"]


def _float_dtype(device: torch.device) -> torch.dtype:
    # float64 keeps Dice exact to the last digit against numpy; MPS has no float64.
    return torch.float32 if device.type == "mps" else torch.float64


def _argmax_classes(scores: torch.Tensor) -> torch.Tensor:
    """``scores.argmax(1)`` (first maximum on ties) as C elementwise passes.

    torch's CPU argmax over a non-last dimension is a slow strided reduction; running
    maxima are several times faster there and cost the same on a GPU.
    """
    best = scores[:, 0]
    labels = torch.zeros(best.shape, dtype=torch.long, device=scores.device)
    for c in range(1, scores.shape[1]):
        candidate = scores[:, c]
        labels.masked_fill_(candidate > best, c)
        best = torch.maximum(best, candidate)
    return labels


def _labelmap_counts(pred, target, num_classes, ignore_index):
    n = target.shape[0]
    if _pred_is_scores(tuple(pred.shape), tuple(target.shape), num_classes):
        pred = _argmax_classes(pred)
    elif pred.is_floating_point():
        raise ValueError(f"pred class ids must be integers, got dtype {pred.dtype}")
    pred = pred.long().reshape(n, -1)
    target = target.long().reshape(n, -1)
    valid = None if ignore_index is None else target != ignore_index
    if valid is not None:
        # checked and counted as class 0, then sent to a discarded bin below
        target = torch.where(valid, target, torch.zeros_like(target))
        pred = torch.where(valid, pred, torch.zeros_like(pred))
    _check_range(target, num_classes, "target")
    _check_range(pred, num_classes, "pred")
    # One pass over the pixels: a per-image confusion matrix from one bincount over
    # (image, target, pred) keys; ignored pixels go to one extra bin that is dropped.
    c = num_classes
    size = n * c * c
    offset = (torch.arange(n, device=target.device) * (c * c)).unsqueeze(1)
    key = offset + target * c + pred
    if valid is not None:
        key = torch.where(valid, key, torch.full_like(key, size))
    confusion = torch.bincount(key.reshape(-1), minlength=size + 1)[:size].reshape(n, c, c)
    tp = torch.diagonal(confusion, dim1=1, dim2=2)
    return tp, confusion.sum(dim=1), confusion.sum(dim=2)


def _binary(values: torch.Tensor, name: str, ignore_index) -> torch.Tensor:
    check = values if ignore_index is None else values[values != ignore_index]
    if check.numel() and bool(((check != 0) & (check != 1)).any()):
        bad = check[(check != 0) & (check != 1)][0].item()
        raise ValueError(f"{name} of a multi-label mask must be 0 or 1, got {bad!r}")
    return values == 1


def _multilabel_counts(pred, target, num_classes, ignore_index, pred_format, threshold):
    _check_multilabel_shapes(tuple(pred.shape), tuple(target.shape), num_classes)
    cut = _multilabel_cut(pred, pred.is_floating_point(), pred_format, threshold)
    if cut is None:
        pred_on = _binary(pred, "pred", None)
    else:
        pred_on = pred > torch.tensor(cut, dtype=pred.dtype, device=pred.device)
    target_on = _binary(target, "target", ignore_index)
    if ignore_index is not None:
        valid = target != ignore_index
        pred_on = pred_on & valid
    dims = tuple(range(2, target.dim()))
    tp = (pred_on & target_on).sum(dim=dims)
    return tp, pred_on.sum(dim=dims), target_on.sum(dim=dims)


def dice_counts(
    pred: torch.Tensor,
    target: torch.Tensor,
    *,
    num_classes: int,
    ignore_index: Optional[int] = None,
    pred_format: str = "auto",
    threshold: float = 0.5,
):
    """Per-image, per-class pixel counts behind Dice.

    Parameters
    ----------
    pred, target : Tensor
        See the module docstring for the accepted layouts. A ``(N, H, W)`` or ``(H, W)``
        integer target is a label map; a ``(N, C, H, W)`` target is a multi-label mask.
    num_classes : int
    ignore_index : int, optional
        Target value whose pixels are not counted; not a class id.
    pred_format : {"auto", "labels", "probs", "logits"}
        For multi-label masks: how ``pred`` is decoded. ``"auto"`` reads integer and
        boolean tensors as labels, floats within [0, 1] as probabilities and other
        floats as logits. Label-map scores are decoded by argmax whatever the format.
    threshold : float
        Probability above which a multi-label pixel is predicted on.

    Returns
    -------
    tp, pred_sum, target_sum : Tensor of int64, shape (N, C), on ``target``'s device

    Raises
    ------
    ValueError
        On shapes that do not match, class ids outside ``[0, num_classes)``, multi-label
        values other than 0/1, or bad options; the message names the argument.
    """
    num_classes = _check_options(num_classes, ignore_index, "skip", pred_format, threshold)
    if not isinstance(pred, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise ValueError(f"pred and target must be torch tensors, got {type(pred).__name__}, {type(target).__name__}")
    if pred.device != target.device:
        raise ValueError(f"pred is on {pred.device} but target is on {target.device}")
    if target.dim() == 2:
        target = target.unsqueeze(0)
        pred = pred.unsqueeze(0)
    if target.dim() == 3:
        if target.is_floating_point():
            raise ValueError(f"a label-map target must hold integer class ids, got dtype {target.dtype}")
        return _labelmap_counts(pred, target, num_classes, ignore_index)
    if target.dim() == 4:
        return _multilabel_counts(pred, target, num_classes, ignore_index, pred_format, threshold)
    raise _bad_target_layout(tuple(target.shape))


def _dice(tp, pred_sum, target_sum, absent: str) -> torch.Tensor:
    dtype = _float_dtype(tp.device)
    denom = (pred_sum + target_sum).to(dtype)
    empty = denom == 0
    dice = 2.0 * tp.to(dtype) / torch.where(empty, torch.ones_like(denom), denom)
    return torch.where(empty, torch.full_like(dice, _absent_dice(absent)), dice)


def dice_per_class(
    pred: torch.Tensor,
    target: torch.Tensor,
    *,
    num_classes: int,
    ignore_index: Optional[int] = None,
    absent: str = "skip",
    reduction: str = "global",
    pred_format: str = "auto",
    threshold: float = 0.5,
) -> torch.Tensor:
    """Binary Dice of each class against the rest.

    Parameters
    ----------
    pred, target, num_classes, ignore_index, pred_format, threshold
        As in :func:`dice_counts`.
    absent : {"skip", "one"}
        Dice of a class absent from both prediction and target: NaN, left out of means
        (``"skip"``), or 1 (``"one"``).
    reduction : {"global", "per_image", "none"}
        ``"global"``: counts over all images, shape ``(C,)``; ``"per_image"``: mean over
        images of per-image Dice, shape ``(C,)``; ``"none"``: shape ``(N, C)``.

    Returns
    -------
    Tensor of float64 (float32 on MPS) on ``target``'s device.

    Raises
    ------
    ValueError
        See :func:`dice_counts`; also on an unknown ``absent`` or ``reduction``.
    """
    _check_reduction(reduction)
    _check_options(num_classes, ignore_index, absent, pred_format, threshold)
    tp, ps, ts = dice_counts(
        pred, target, num_classes=num_classes, ignore_index=ignore_index, pred_format=pred_format, threshold=threshold
    )
    if reduction == "global":
        return _dice(tp.sum(0), ps.sum(0), ts.sum(0), absent)
    per_image = _dice(tp, ps, ts, absent)
    if reduction == "none":
        return per_image
    return torch.nanmean(per_image, dim=0)


def vdice(
    pred: torch.Tensor,
    target: torch.Tensor,
    *,
    num_classes: int,
    ignore_index: Optional[int] = None,
    absent: str = "skip",
    reduction: str = "global",
    pred_format: str = "auto",
    threshold: float = 0.5,
) -> torch.Tensor:
    """vDice: the mean over classes of :func:`dice_per_class` (NaN entries left out).

    Returns a 0-d tensor for ``reduction="global"`` / ``"per_image"`` and a ``(N,)``
    tensor of per-image vDice for ``"none"``. NaN when every class is skipped.
    Parameters and errors as in :func:`dice_per_class`.
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
    return torch.nanmean(per_class, dim=-1)


class DiceMeter(_DiceMeterOptions):
    """Streaming per-class Dice and vDice over a dataset, batch by batch.

    Parameters
    ----------
    num_classes : int
    mode : {"global", "per_image"}
        ``"global"`` accumulates pixel counts over every image (micro over pixels) and
        equals ``dice_per_class(..., reduction="global")`` on the whole dataset;
        ``"per_image"`` accumulates each image's Dice and equals
        ``reduction="per_image"``.
    ignore_index, absent, pred_format, threshold
        As in :func:`dice_per_class`.

    Notes
    -----
    State lives on the device of the first batch; only integer counts (``"global"``)
    or a float64 sum and an image count per class (``"per_image"``) are kept, so the
    result does not depend on how the dataset is cut into batches.
    """

    def reset(self) -> None:
        """Forget every batch seen so far."""
        self._a: Optional[torch.Tensor] = None  # global: tp; per_image: sum of Dice
        self._b: Optional[torch.Tensor] = None  # global: pred_sum; per_image: images counted
        self._c: Optional[torch.Tensor] = None  # global: target_sum
        self.n_images = 0

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch (same layouts as :func:`dice_per_class`)."""
        tp, ps, ts = dice_counts(pred, target, **self._count_options())
        if self._a is not None and self._a.device != tp.device:
            raise ValueError(f"batch is on {tp.device} but the meter accumulates on {self._a.device}")
        if self.mode == "global":
            sums = (tp.sum(0), ps.sum(0), ts.sum(0))
            if self._a is None:
                self._a, self._b, self._c = sums
            else:
                self._a, self._b, self._c = self._a + sums[0], self._b + sums[1], self._c + sums[2]
        else:
            dice = _dice(tp, ps, ts, self.absent)
            defined = ~torch.isnan(dice)
            add = torch.where(defined, dice, torch.zeros_like(dice)).sum(0)
            count = defined.sum(0)
            if self._a is None:
                self._a, self._b = add, count
            else:
                self._a, self._b = self._a + add, self._b + count
        self.n_images += int(tp.shape[0])

    def compute(self) -> DiceResult:
        """Per-class Dice and vDice of everything seen since the last reset.

        Raises
        ------
        ValueError
            When no batch was added.
        """
        if self._a is None:
            raise ValueError(_NO_UPDATE)
        if self.mode == "global":
            per_class = _dice(self._a, self._b, self._c, self.absent)
        else:
            total = self._b.to(self._a.dtype)
            per_class = torch.where(self._b > 0, self._a / total.clamp_min(1), torch.full_like(self._a, float("nan")))
        return DiceResult(per_class=per_class, vdice=torch.nanmean(per_class))
