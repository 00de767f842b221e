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

The numpy twin of this module is :mod:`cobalance.metrics`; both are thin front ends
of one implementation, :mod:`cobalance._dice`, and this one adds only the torch
spelling of a few tensor operations (nothing leaves the tensors' device).
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import _dice
from .._dice import DiceResult

__all__ = ["DiceMeter", "DiceResult", "dice_counts", "dice_per_class", "vdice"]


class _TorchOps(_dice.ArrayOps):
    """The array operations of :mod:`cobalance._dice` on torch tensors, on their device."""

    def inputs(self, pred, target):
        if not isinstance(pred, torch.Tensor) or not isinstance(target, torch.Tensor):
            raise ValueError(
                f"pred and target must be torch tensors, got {type(pred).__name__}, {type(target).__name__}"
            )
        if pred.device != target.device:
            raise ValueError(f"pred is on {pred.device} but target is on {target.device}")
        return pred, target

    def is_integer(self, x) -> bool:
        return not (x.is_floating_point() or x.is_complex())

    def is_float(self, x) -> bool:
        return x.is_floating_point()

    def int64(self, x):
        return x.long()

    def to_float(self, x):
        # float64 keeps Dice exact to the last digit against numpy; MPS has no float64.
        return x.to(torch.float32 if x.device.type == "mps" else torch.float64)

    def argmax_classes(self, scores):
        # torch's CPU argmax over a non-last dimension is a slow strided reduction;
        # running maxima (first maximum kept on ties) are several times faster there
        # and cost the same on a GPU.
        best = scores[:, 0]
        labels = torch.zeros(best.shape, dtype=torch.long, device=scores.device)
        for c in range(1, scores.shape[1]):
            candidate = scores[:, c]
            labels.masked_fill_(candidate > best, c)
            best = torch.maximum(best, candidate)
        return labels

    def arange(self, n, like):
        return torch.arange(n, dtype=torch.long, device=like.device)

    def bincount(self, keys, size):
        return torch.bincount(keys, minlength=size)

    def count(self, on, axes):
        return on.sum(dim=axes, dtype=torch.long)

    def where(self, condition, a, b):
        return torch.where(condition, a, b)

    def scalar(self, value, like):
        return torch.tensor(value, dtype=like.dtype, device=like.device)

    def isnan(self, x):
        return torch.isnan(x)

    def nanmean(self, x, axis):
        return torch.nanmean(x, dim=axis)

    def device(self, x):
        return x.device

    def result(self, x):
        return x


_TORCH = _TorchOps()


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
    return _dice.dice_counts(_TORCH, pred, target, num_classes=num_classes, ignore_index=ignore_index,
                             pred_format=pred_format, threshold=threshold)


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
    return _dice.dice_per_class(_TORCH, pred, target, num_classes=num_classes, ignore_index=ignore_index,
                                absent=absent, reduction=reduction, pred_format=pred_format, threshold=threshold)


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
    return _dice.vdice(_TORCH, pred, target, num_classes=num_classes, ignore_index=ignore_index, absent=absent,
                       reduction=reduction, pred_format=pred_format, threshold=threshold)


class DiceMeter(_dice.StreamingDice):
    """Streaming per-class Dice and vDice over a dataset, batch by batch.

    Parameters
    ----------
    num_classes : int
    mode : {"global", "per_image"}
        ``"global"`` reports Dice of the pixel counts summed over every image (micro
        over pixels) and equals ``dice_per_class(..., reduction="global")`` on the
        whole dataset; ``"per_image"`` reports the mean of each image's Dice and equals
        ``reduction="per_image"``.
    ignore_index, absent, pred_format, threshold
        As in :func:`dice_per_class`.

    Attributes
    ----------
    tp, pred_sum, target_sum : Tensor of int64, shape (C,), or None
        Pixel counts summed over every image seen (None before the first batch).
    image_dice_sum : Tensor of float64 (float32 on MPS), shape (C,), or None
        Sum over images of each image's Dice, where it is defined.
    image_dice_count : Tensor of int64, shape (C,), or None
        Number of images whose Dice of the class is defined.
    n_images : int

    Notes
    -----
    State lives on the device of the first batch (a batch elsewhere is a ValueError);
    only sums are kept, so the result does not depend on how the dataset is cut into
    batches. :meth:`compute` returns a :class:`DiceResult` of tensors on that device.
    """

    ops = _TORCH

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch (same layouts as :func:`dice_per_class`)."""
        super().update(pred, target)
