"""Focal loss (Lin et al., 2017) for multi-label masks and for label maps.

- ``multilabel``: one sigmoid per class, classes may overlap (the IDRiD masks). The
  per-element loss is ``-alpha_t (1 - p_t)**gamma log p_t`` with ``p = sigmoid(x)``,
  ``p_t = p`` where the target is 1 and ``1 - p`` where it is 0, and
  ``alpha_t = alpha`` / ``1 - alpha`` likewise (no weighting when ``alpha`` is None);
  the same formula as ``torchvision.ops.sigmoid_focal_loss``.
- ``multiclass``: a softmax over classes for label maps (one class id per pixel):
  ``-alpha[y] (1 - p_y)**gamma log p_y`` with ``p = softmax(x)``; pixels equal to
  ``ignore_index`` do not count.

``gamma = 0`` and no ``alpha`` give binary cross-entropy and cross-entropy exactly.

:class:`BCEDiceLoss` (multi-label masks) adds to the binary cross-entropy of each class
one minus its soft Dice over the batch, the usual recipe for small structures: the
Dice term is normalised by the class's own area, so a class covering 0.1 % of the
pixels weighs as much as one covering 10 %.

Every multi-label loss here takes optional ``class_weights`` (one per class): the
loss of class ``c`` is multiplied by ``w_c`` and the classes are averaged with the
weights summing to the number of classes, so weights of all 1 change nothing.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import nn
import torch.nn.functional as F

__all__ = ["BCEDiceLoss", "FocalLoss", "bce_dice_loss", "sigmoid_focal_loss", "softmax_focal_loss"]

_REDUCTIONS = ("mean", "sum", "none")


def _check(gamma: float, reduction: str) -> None:
    if not (float(gamma) >= 0.0):
        raise ValueError(f"gamma must be >= 0, got {gamma!r}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def _reduce(loss: torch.Tensor, reduction: str, count: Optional[torch.Tensor] = None) -> torch.Tensor:
    if reduction == "none":
        return loss
    total = loss.sum()
    if reduction == "sum":
        return total
    n = loss.new_tensor(loss.numel()) if count is None else count.to(loss.dtype)
    return total / n.clamp_min(1)


def _class_weights(class_weights, logits: torch.Tensor) -> Optional[torch.Tensor]:
    """``class_weights`` as a (C,) tensor scaled to sum to C; None stays None.

    Raises ValueError for a wrong length, a negative or non-finite weight, or all zero.
    """
    if class_weights is None:
        return None
    if logits.ndim < 2:
        raise ValueError(f"class_weights need logits shaped (B, C, ...), got shape {tuple(logits.shape)}")
    w = torch.as_tensor(class_weights, dtype=logits.dtype, device=logits.device)
    n_classes = logits.shape[1]
    if w.ndim != 1 or w.numel() != n_classes:
        raise ValueError(f"class_weights must hold one weight per class ({n_classes}), got shape {tuple(w.shape)}")
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or float(w.sum()) <= 0:
        raise ValueError(f"class_weights must be finite, >= 0 and not all 0, got {w.tolist()}")
    return w * (n_classes / w.sum())


def _per_class_view(weights: torch.Tensor, ndim: int) -> torch.Tensor:
    return weights.view((1, -1) + (1,) * (ndim - 2))


def sigmoid_focal_loss(logits: torch.Tensor, target: torch.Tensor, *, gamma: float = 2.0,
                       alpha: Optional[float] = None, reduction: str = "mean",
                       class_weights=None) -> torch.Tensor:
    """Focal loss of independent sigmoids (multi-label masks, overlapping classes).

    Parameters
    ----------
    logits : Tensor, shape (B, C, ...)
    target : Tensor, same shape
        0/1 (any dtype; soft targets in [0, 1] are allowed).
    gamma : float
        Focusing parameter, >= 0.
    alpha : float, optional
        Weight of positives in [0, 1] (negatives get ``1 - alpha``); None: no weighting.
    reduction : {"mean", "sum", "none"}
        ``"mean"`` averages over every element.
    class_weights : sequence of C floats, optional
        Per-class weights (scaled to sum to C); each element's loss is multiplied by its
        class's weight.

    Raises
    ------
    ValueError
        Shapes differ, ``gamma < 0``, ``alpha`` outside [0, 1], unknown reduction, bad
        ``class_weights``.
    """
    _check(gamma, reduction)
    if logits.shape != target.shape:
        raise ValueError(f"target must have the shape of logits {tuple(logits.shape)}, got {tuple(target.shape)}")
    if alpha is not None and not (0.0 <= float(alpha) <= 1.0):
        raise ValueError(f"alpha must be in [0, 1] or None, got {alpha!r}")
    target = target.to(logits.dtype)
    # log p and log(1 - p) via logsigmoid: stable for large |logits|.
    log_p = F.logsigmoid(logits)
    log_not_p = F.logsigmoid(-logits)
    log_pt = target * log_p + (1 - target) * log_not_p
    # 1 - p_t computed from probabilities of the *other* outcome, no cancellation.
    one_minus_pt = target * torch.exp(log_not_p) + (1 - target) * torch.exp(log_p)
    loss = -log_pt if gamma == 0 else -(one_minus_pt ** gamma) * log_pt
    if alpha is not None:
        loss = loss * (alpha * target + (1 - alpha) * (1 - target))
    weights = _class_weights(class_weights, logits)
    if weights is not None:
        loss = loss * _per_class_view(weights, logits.ndim)
    return _reduce(loss, reduction)


def _check_bce_dice(smooth: float, bce_weight: float, reduction: str) -> None:
    if not (float(smooth) > 0):
        raise ValueError(f"smooth must be > 0, got {smooth!r}")
    if not (float(bce_weight) >= 0):
        raise ValueError(f"bce_weight must be >= 0, got {bce_weight!r}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def bce_dice_loss(logits: torch.Tensor, target: torch.Tensor, *, smooth: float = 1.0,
                  class_weights=None, reduction: str = "mean", bce_weight: float = 1.0) -> torch.Tensor:
    """Binary cross-entropy plus soft Dice loss per class, for multi-label masks.

    For class ``c``: ``BCE_c`` is the mean binary cross-entropy over its elements and
    ``Dice_c = (2 sum(p t) + smooth) / (sum(p) + sum(t) + smooth)`` with
    ``p = sigmoid(x)``, sums over the batch and the pixels; the class's loss is
    ``bce_weight * BCE_c + 1 - Dice_c`` (``bce_weight=0``: the soft Dice loss alone).

    Parameters
    ----------
    logits : Tensor, shape (B, C, ...)
    target : Tensor, same shape, 0/1 (soft targets in [0, 1] allowed)
    smooth : float
        Added to the Dice numerator and denominator (> 0): a class absent from the batch
        and predicted absent has Dice 1, not 0/0.
    class_weights : sequence of C floats, optional
        Per-class weights of the classes' losses (scaled to sum to C).
    reduction : {"mean", "sum", "none"}
        ``"mean"``: the (weighted) mean over classes; ``"sum"``: the sum; ``"none"``:
        the per-class losses, shape (C,).
    bce_weight : float
        Weight of the cross-entropy term, >= 0.

    Raises
    ------
    ValueError
        Shapes differ, ``smooth <= 0``, ``bce_weight < 0``, unknown reduction, bad
        ``class_weights``.
    """
    if logits.shape != target.shape or logits.ndim < 2:
        raise ValueError(f"target must have the shape of logits (B, C, ...) {tuple(logits.shape)}, "
                         f"got {tuple(target.shape)}")
    _check_bce_dice(smooth, bce_weight, reduction)
    target = target.to(logits.dtype)
    dims = [0] + list(range(2, logits.ndim))
    p = torch.sigmoid(logits)
    dice = (2 * (p * target).sum(dim=dims) + smooth) / (p.sum(dim=dims) + target.sum(dim=dims) + smooth)
    per_class = 1 - dice
    if bce_weight:
        bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(dim=dims)
        per_class = per_class + float(bce_weight) * bce
    weights = _class_weights(class_weights, logits)
    if weights is not None:
        per_class = per_class * weights
    if reduction == "none":
        return per_class
    return per_class.sum() if reduction == "sum" else per_class.mean()


class BCEDiceLoss(nn.Module):
    """:func:`bce_dice_loss` as a module (multi-label masks)."""

    def __init__(self, *, smooth: float = 1.0, class_weights=None, reduction: str = "mean", bce_weight: float = 1.0):
        super().__init__()
        _check_bce_dice(smooth, bce_weight, reduction)
        self.smooth, self.class_weights, self.reduction = float(smooth), class_weights, reduction
        self.bce_weight = float(bce_weight)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return bce_dice_loss(logits, target, smooth=self.smooth, class_weights=self.class_weights,
                             reduction=self.reduction, bce_weight=self.bce_weight)

    def extra_repr(self) -> str:
        return (f"smooth={self.smooth}, bce_weight={self.bce_weight}, class_weights={self.class_weights}, "
                f"reduction={self.reduction!r}")


def softmax_focal_loss(logits: torch.Tensor, target: torch.Tensor, *, gamma: float = 2.0,
                       alpha: Optional[Union[Sequence[float], torch.Tensor]] = None,
                       ignore_index: Optional[int] = None, reduction: str = "mean") -> torch.Tensor:
    """Focal loss of a softmax over classes (label maps, one class id per pixel).

    Parameters
    ----------
    logits : Tensor, shape (B, C, ...)
    target : Tensor of integers, shape (B, ...)
        Class ids in ``[0, C)``, or ``ignore_index``.
    gamma : float
        Focusing parameter, >= 0.
    alpha : sequence of C floats, optional
        Per-class weights; None: all 1.
    ignore_index : int, optional
        Target value whose pixels are left out (of the loss and of the mean).
    reduction : {"mean", "sum", "none"}
        ``"mean"`` averages over the pixels that are not ignored; ``"none"`` returns the
        per-pixel loss (0 at ignored pixels), shape (B, ...).

    Raises
    ------
    ValueError
        Shapes that do not fit, class ids outside ``[0, C)``, a wrong-length ``alpha``,
        ``gamma < 0``, unknown reduction.
    """
    _check(gamma, reduction)
    if logits.ndim < 2 or target.shape != logits.shape[:1] + logits.shape[2:]:
        raise ValueError(f"target must have shape {tuple(logits.shape[:1] + logits.shape[2:])} "
                         f"(logits {tuple(logits.shape)} without the class axis), got {tuple(target.shape)}")
    if target.dtype.is_floating_point or target.dtype == torch.bool:
        raise ValueError(f"target must hold integer class ids, got dtype {target.dtype}")
    n_classes = logits.shape[1]
    target = target.long()
    valid = torch.ones_like(target, dtype=torch.bool) if ignore_index is None else target != ignore_index
    safe = torch.where(valid, target, torch.zeros_like(target))
    if valid.any():
        lo, hi = int(safe[valid].min()), int(safe[valid].max())
        if lo < 0 or hi >= n_classes:
            bad = lo if lo < 0 else hi
            raise ValueError(f"target class ids must be in [0, {n_classes}) or ignore_index={ignore_index!r}, "
                             f"got {bad}")
    log_prob = F.log_softmax(logits, dim=1)
    log_pt = log_prob.gather(1, safe.unsqueeze(1)).squeeze(1)
    pt = torch.exp(log_pt)
    loss = -log_pt if gamma == 0 else -((1 - pt).clamp_min(0) ** gamma) * log_pt
    if alpha is not None:
        weights = torch.as_tensor(alpha, dtype=logits.dtype, device=logits.device)
        if weights.ndim != 1 or weights.numel() != n_classes:
            raise ValueError(f"alpha must hold one weight per class ({n_classes}), got shape {tuple(weights.shape)}")
        loss = loss * weights[safe]
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    return _reduce(loss, reduction, count=valid.sum())


class FocalLoss(nn.Module):
    """Focal loss as a module, in the modes of segmentation_models_pytorch.

    Parameters
    ----------
    mode : {"multilabel", "binary", "multiclass"}
        ``"multilabel"`` / ``"binary"``: sigmoid per channel, target shaped like the
        logits (multi-label masks); ``"multiclass"``: softmax, target a label map.
    gamma, alpha, ignore_index, reduction
        As in :func:`sigmoid_focal_loss` / :func:`softmax_focal_loss`; ``ignore_index``
        applies to ``"multiclass"`` only.
    class_weights : sequence of C floats, optional
        ``"multilabel"`` / ``"binary"`` only: per-class weights (for ``"multiclass"``,
        ``alpha`` is the per-class weight).
    """

    def __init__(self, mode: str = "multilabel", *, gamma: float = 2.0, alpha=None,
                 ignore_index: Optional[int] = None, reduction: str = "mean", class_weights=None):
        super().__init__()
        if mode not in ("multilabel", "binary", "multiclass"):
            raise ValueError(f"mode must be one of ['binary', 'multiclass', 'multilabel'], got {mode!r}")
        _check(gamma, reduction)
        if ignore_index is not None and mode != "multiclass":
            raise ValueError(f"ignore_index applies to mode 'multiclass' only, got mode={mode!r}")
        if class_weights is not None and mode == "multiclass":
            raise ValueError("class_weights apply to the sigmoid modes; for mode 'multiclass' pass per-class alpha")
        self.mode, self.gamma, self.alpha = mode, float(gamma), alpha
        self.ignore_index, self.reduction, self.class_weights = ignore_index, reduction, class_weights

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.mode == "multiclass":
            return softmax_focal_loss(logits, target, gamma=self.gamma, alpha=self.alpha,
                                      ignore_index=self.ignore_index, reduction=self.reduction)
        return sigmoid_focal_loss(logits, target, gamma=self.gamma, alpha=self.alpha, reduction=self.reduction,
                                  class_weights=self.class_weights)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, gamma={self.gamma}, alpha={self.alpha}, reduction={self.reduction!r}"
