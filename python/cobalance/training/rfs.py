"""Repeat-factor sampling, the LVIS / detectron2 heuristic, as a plan.

Gupta, Dollar and Girshick, "LVIS: A Dataset for Large Vocabulary Instance
Segmentation" (CVPR 2019), as implemented in detectron2's
``RepeatFactorTrainingSampler``: class ``c`` present in a fraction ``f_c`` of the
samples gets the repeat factor ``r_c = max(1, sqrt(t / f_c))``; a sample gets the
largest factor among its classes (1 when it has none); the real factor is rounded
stochastically, ``floor(r) + (u < r - floor(r))`` with ``u`` uniform, so the expected
number of copies is ``r``.
"""

from __future__ import annotations

import numpy as np

__all__ = ["class_repeat_factors", "sample_repeat_factors", "repeat_factor_copies", "repeat_factor_plan"]


def _presence(labels) -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim != 2:
        raise ValueError(f"labels must be a 2-D (n_samples, n_classes) array, got ndim={y.ndim}")
    if y.dtype != np.bool_:
        if y.dtype.kind not in "iuf":
            raise ValueError(f"labels must hold 0/1 numbers or booleans, got dtype {y.dtype}")
        bad = (y != 0) & (y != 1)
        if bad.any():
            r, c = np.argwhere(bad)[0]
            raise ValueError(f"labels must be 0 or 1, got {y[r, c]!r} at row {r}, column {c}")
        y = y.astype(bool)
    if y.shape[0] == 0:
        raise ValueError("labels must have at least one sample (row), got 0")
    return y


def _threshold(threshold) -> float:
    t = float(threshold)
    if not (0.0 < t <= 1.0):
        raise ValueError(f"threshold must be in (0, 1], got {threshold!r}")
    return t


def class_repeat_factors(labels, threshold: float) -> np.ndarray:
    """``max(1, sqrt(t / f_c))`` per class; classes that never occur get 1.

    Parameters
    ----------
    labels : array-like, shape (n_samples, n_classes)
        0/1 class presence.
    threshold : float in (0, 1]
        ``t``: classes present in fewer than this fraction of samples are repeated.

    Returns
    -------
    ndarray of float64, shape (n_classes,)
    """
    y = _presence(labels)
    t = _threshold(threshold)
    freq = y.mean(axis=0)
    out = np.ones(y.shape[1], dtype=np.float64)
    seen = freq > 0
    out[seen] = np.maximum(1.0, np.sqrt(t / freq[seen]))
    return out


def sample_repeat_factors(labels, threshold: float) -> np.ndarray:
    """Per sample, the largest repeat factor among its classes (1 for none)."""
    y = _presence(labels)
    per_class = class_repeat_factors(y, threshold)
    return np.where(y, per_class[None, :], 1.0).max(axis=1, initial=1.0)


def repeat_factor_copies(labels, threshold: float, *, random_state=None) -> np.ndarray:
    """Integer copies per sample by stochastic rounding of the sample repeat factors.

    Every sample keeps at least one copy. ``random_state`` (int or numpy Generator)
    seeds the rounding: one uniform draw per sample, in sample order.

    Returns
    -------
    ndarray of int64, shape (n_samples,)
    """
    factors = sample_repeat_factors(labels, threshold)
    rng = np.random.default_rng(random_state)
    whole = np.floor(factors)
    draws = rng.random(factors.size)
    return (whole + (draws < factors - whole)).astype(np.int64)


def repeat_factor_plan(labels, threshold: float, *, random_state=None):
    """:func:`repeat_factor_copies` as a :class:`cobalance.Plan` (``Plan.from_copies``)."""
    from cobalance import Plan

    return Plan.from_copies(repeat_factor_copies(labels, threshold, random_state=random_state))
