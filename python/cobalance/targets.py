"""Target class-presence fractions: resolving the user's target, checking it can be met."""

from __future__ import annotations

import json
import os
import warnings
from numbers import Integral, Real
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np

__all__ = ["FeasibilityWarning", "resolve_target", "check_feasibility", "reachable_presence",
           "parse_target_text", "target_file", "RARE_THRESHOLD", "RARE_VALUE", "TARGET_NAMES", "TARGET_TEXT_HELP"]

#: The named targets (see :func:`resolve_target`); "smooth=q" and "max_ir=k" take a number.
TARGET_NAMES = ("equal", "uniform", "sqrt", "smooth=q", "max_ir=k", "rare_boost", "all")

#: The forms a target takes as text (command lines): see :func:`parse_target_text`.
TARGET_TEXT_HELP = ("equal | sqrt | smooth=Q | max_ir=K | rare_boost | all | CLASS=FRACTION,... | "
                    "F1,F2,... (one per class) | FILE.json")
#: Named targets that carry a number after '=' (not CLASS=FRACTION lists).
_TARGET_WITH_NUMBER = ("smooth=", "max_ir=")
_PLAIN_NAMES = ("equal", "uniform", "sqrt", "rare_boost", "all")

#: A class is *rare* for ``target="rare_boost"`` when it is present in fewer than this
#: fraction of the samples (the method's paper calls its two classes below 20 % rare).
RARE_THRESHOLD = 0.2
#: The target of a rare class under ``"rare_boost"``: "near 1", as the paper advises
#: when a regularizer keeps the counts close to the data.
RARE_VALUE = 0.9


class FeasibilityWarning(UserWarning):
    """The target asks for fractions that no resampling of the patterns can reach."""


def resolve_target(target, table, *, rare_threshold: float = RARE_THRESHOLD,
                   rare_value: float = RARE_VALUE, class_names: Optional[Sequence[str]] = None) -> np.ndarray:
    """Turn a target specification into per-class fractions.

    Parameters
    ----------
    target : array-like, dict or str
        - array-like of length C: the fractions themselves, each in [0, 1];
        - dict ``{class name or index: fraction}``: the listed classes get the given
          fraction, every other class keeps its current share (its presence in
          ``table``);
        - ``"equal"`` (alias ``"uniform"``): every class present in the data at the same
          presence, the mean label cardinality spread evenly (``sum_i f_i / C'`` over
          the C' present classes), so the target keeps the average number of labels per
          sample; absent classes 0. The equal-frequency target of multi-label
          balancing: its imbalance ratio is 1 for every class;
        - ``"smooth=q"`` with q in [0, 1] (``"sqrt"`` is ``"smooth=0.5"``): ``d_i``
          proportional to ``f_i ** q``, scaled to the same mean label cardinality and
          clipped to 1: between equal frequencies (q = 0) and the data (q = 1), like
          repeat-factor sampling's square root;
        - ``"max_ir=k"`` with k >= 1: every class raised to at least ``1 / k`` of the
          most frequent one, ``d_i = max(f_i, max(f) / k)``: a target whose imbalance
          ratio (IRLbl) is at most k for every class;
        - ``"rare_boost"``: the method paper's recommendation. A class is rare when it
          is present, but in fewer than ``rare_threshold`` of the samples
          (``0 < presence < rare_threshold``); rare classes get ``rare_value``, all
          other classes (including absent ones) keep their current share;
        - ``"all"``: every class at 1, i.e. present in every sample (the method paper's
          first suggestion; with a regularizer it means "as much of every class as the
          regularizer allows").
    table : PatternTable
        Gives the current shares and the class names.
    rare_threshold : float in (0, 1]
        Default :data:`RARE_THRESHOLD` = 0.2.
    rare_value : float in [0, 1]
        Default :data:`RARE_VALUE` = 0.9.
    class_names : sequence of str, optional
        Names for dict keys; default ``table.class_names``.

    Returns
    -------
    ndarray of float64, shape (C,)

    Raises
    ------
    ValueError
        Unknown string, wrong length, NaN, a value outside [0, 1], an unknown class
        name or index, or a bad ``rare_threshold`` / ``rare_value`` / ``q`` / ``k``.
    """
    n_classes = table.n_classes
    presence = np.asarray(table.class_presence(), dtype=np.float64)
    names = list(class_names) if class_names is not None else list(getattr(table, "class_names", []))
    if isinstance(target, str):
        return _named_target(target, presence, rare_threshold, rare_value)
    if isinstance(target, Mapping):
        out = presence.copy()
        for key, value in target.items():
            out[_class_position(key, names, n_classes)] = _check_fraction(value, f"target[{key!r}]")
        return out
    arr = np.asarray(target)
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"target must hold numbers, got dtype {arr.dtype}")
    arr = arr.astype(np.float64)
    if arr.ndim != 1 or arr.shape[0] != n_classes:
        raise ValueError(f"target must have length n_classes = {n_classes}, got shape {arr.shape}")
    if np.isnan(arr).any():
        raise ValueError(f"target must not contain NaN, got NaN for class {int(np.flatnonzero(np.isnan(arr))[0])}")
    bad = (arr < 0) | (arr > 1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"target values must be in [0, 1], got {arr[i]!r} for class {i}")
    return arr


def _named_target(name: str, presence: np.ndarray, rare_threshold, rare_value) -> np.ndarray:
    present = presence > 0
    key, _, arg = name.partition("=")
    if key in ("equal", "uniform", "sqrt", "smooth") and not (arg and key in ("equal", "uniform", "sqrt")):
        power = 0.0 if key in ("equal", "uniform") else 0.5 if key == "sqrt" else _number(arg, name, 0.0, 1.0)
        shape = np.where(present, np.where(present, presence, 1.0) ** power, 0.0)
        return _at_cardinality(shape, presence)
    if key == "max_ir" and arg:
        k = _number(arg, name, 1.0, np.inf)
        return np.where(present, np.maximum(presence, presence.max(initial=0.0) / k), 0.0)
    if name == "all":
        return np.ones(presence.size)
    if name == "rare_boost":
        _check_fraction(rare_value, "rare_value")
        if not isinstance(rare_threshold, Real) or not 0 < rare_threshold <= 1:
            raise ValueError(f"rare_threshold must be in (0, 1], got {rare_threshold!r}")
        rare = present & (presence < rare_threshold)
        return np.where(rare, float(rare_value), presence)
    raise ValueError(f"target must be an array, a dict or one of {list(TARGET_NAMES)} (q in [0, 1], k >= 1), "
                     f"got {name!r}")


def _number(text: str, name: str, low: float, high: float) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not low <= value <= high:
        raise ValueError(f"target {name!r}: the number after '=' must be in [{low:g}, {high:g}], got {text!r}")
    return value


def _at_cardinality(shape: np.ndarray, presence: np.ndarray) -> np.ndarray:
    """``shape`` scaled so that its sum is the data's mean label cardinality, clipped to 1.

    Clipping a class at 1 hands its excess to the others (water-filling), so the sum is
    kept wherever it is at most the number of shaped classes.
    """
    cardinality = float(presence.sum())
    out = np.zeros_like(shape)
    free = shape > 0
    remaining = cardinality
    while free.any():
        scaled = shape[free] * (remaining / shape[free].sum())
        over = scaled > 1.0
        if not over.any():
            out[free] = scaled
            break
        idx = np.flatnonzero(free)[over]
        out[idx] = 1.0
        remaining -= idx.size
        free[idx] = False
    return out


def reachable_presence(table, lower, upper, total: float):
    """Per class, the lowest and highest presence any counts within the bounds reach at a size.

    Parameters
    ----------
    table : PatternTable
    lower, upper : ndarray (K,)
        Per-pattern bounds on the counts.
    total : float
        The balanced size, within ``[sum(lower), sum(upper)]``.

    Returns
    -------
    (low, high) : two ndarrays of float64, shape (C,)
        Class i's presence is at least ``low[i]`` and at most ``high[i]``: its patterns
        take as much (or as little) of the size as their bounds and the others'
        bounds allow.
    """
    indptr, indices = table.sparse_patterns()
    indptr = np.asarray(indptr, dtype=np.int64)
    indices = np.asarray(indices, dtype=np.int64)
    rows = np.repeat(np.arange(indptr.size - 1), np.diff(indptr))
    n_classes = table.n_classes
    lower = np.asarray(lower, dtype=np.float64)
    upper = np.asarray(upper, dtype=np.float64)
    lo_in = np.bincount(indices, weights=lower[rows], minlength=n_classes)
    finite = np.isfinite(upper)
    upper_finite = np.where(finite, upper, 0.0)
    hi_in = np.bincount(indices, weights=upper_finite[rows], minlength=n_classes)
    inf_in = np.bincount(indices, weights=(~finite)[rows].astype(np.float64), minlength=n_classes)
    inf_out = (~finite).sum() - inf_in
    hi_in = np.where(inf_in > 0, np.inf, hi_in)
    high = np.minimum(hi_in, total - (float(lower.sum()) - lo_in)) / total
    # the others' patterns can absorb at most their upper bounds (without limit if one is unbounded)
    others_hi = np.where(inf_out > 0, np.inf, float(upper_finite.sum()) - np.where(inf_in > 0, 0.0, hi_in))
    low = np.maximum(lo_in, total - others_hi) / total
    return np.clip(low, 0.0, 1.0), np.clip(high, 0.0, 1.0)


def _check_fraction(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    value = float(value)
    if not 0.0 <= value <= 1.0:  # also rejects NaN
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return value


def _class_position(key, names: Sequence[str], n_classes: int) -> int:
    if isinstance(key, str):
        if key in names:
            return names.index(key)
        raise ValueError(f"target names an unknown class {key!r}; classes are {list(names)}")
    if isinstance(key, Integral) and not isinstance(key, bool):
        if 0 <= key < n_classes:
            return int(key)
        raise ValueError(f"target names class index {key!r}, expected 0 <= index < {n_classes}")
    raise ValueError(f"target keys must be class names or indices, got {key!r}")


def _identical_columns(indptr: np.ndarray, indices: np.ndarray, n_classes: int):
    """Groups (lists of >= 2 classes) whose columns over the patterns are identical.

    Works on the CSR patterns: every class's sorted list of pattern ids is hashed with
    random weights, candidates with equal (length, hashes) are then compared exactly.
    Cost O(nnz) plus a sort of the candidates' entries; no dense K x C matrix.
    """
    n_patterns = indptr.size - 1
    rows = np.repeat(np.arange(n_patterns, dtype=np.int64), np.diff(indptr))
    length = np.bincount(indices, minlength=n_classes)
    rng = np.random.default_rng(0x5EED)
    h1 = np.bincount(indices, weights=rng.random(n_patterns)[rows], minlength=n_classes)
    h2 = np.bincount(indices, weights=rng.random(n_patterns)[rows], minlength=n_classes)
    # equal columns have equal (length, h1, h2): the sums run over the same patterns
    # in the same (CSR) order, so they are bitwise equal
    keys = np.stack([length.astype(np.float64), h1, h2], axis=1)
    _, group_id = np.unique(keys, axis=0, return_inverse=True)
    group_id = group_id.ravel()
    # constant columns (never or always present) are reported on their own
    varying = (length > 0) & (length < n_patterns)
    candidate = varying & (np.bincount(group_id[varying], minlength=group_id.max() + 1)[group_id] > 1)
    groups = []
    if not candidate.any():
        return groups, length
    # the pattern lists of the candidate classes: CSR rows ascend, so a stable sort by
    # class leaves each class's patterns in order, one segment per class
    keep = candidate[indices]
    sub_rows, sub_classes = rows[keep], indices[keep]
    col_rows = sub_rows[np.argsort(sub_classes, kind="stable")]
    col_start = np.r_[0, np.cumsum(np.where(candidate, length, 0))]
    for g in np.unique(group_id[candidate]):  # one step per candidate group
        remaining = [int(c) for c in np.flatnonzero((group_id == g) & candidate)]
        # split exactly by the actual pattern lists (hash collisions fall apart here)
        while remaining:
            ref = col_rows[col_start[remaining[0]]:col_start[remaining[0] + 1]]
            same = {c for c in remaining if np.array_equal(col_rows[col_start[c]:col_start[c + 1]], ref)}
            if len(same) > 1:
                groups.append(sorted(same))
            remaining = [c for c in remaining if c not in same]
    return groups, length


def check_feasibility(target, table, *, class_weights=None, tol: float = 1e-12) -> list:
    """Warn about parts of a target that no resampling of the patterns can reach.

    Three cases are detected, each giving one :class:`FeasibilityWarning` that names
    the classes and the nearest achievable fractions:

    - a class never present in any sample but with a target above 0 (its fraction is
      always 0);
    - a class present in every sample but with a target below 1 (always 1);
    - classes that always occur together (identical columns over the patterns, so
      equal fractions under any resampling) but have different targets; the nearest
      achievable common fraction is their ``class_weights``-weighted mean target.

    Parameters
    ----------
    target : ndarray of float, shape (C,)
        Resolved target (see :func:`resolve_target`).
    table : PatternTable
    class_weights : array-like, shape (C,), optional

    Returns
    -------
    list of str
        The warning messages (empty when the target is feasible in these respects).
    """
    target = np.asarray(target, dtype=np.float64)
    n_classes = table.n_classes
    names = list(getattr(table, "class_names", [str(i) for i in range(n_classes)]))
    w = np.ones(n_classes) if class_weights is None else np.asarray(class_weights, dtype=np.float64)
    indptr, indices = table.sparse_patterns()
    indptr = np.asarray(indptr, dtype=np.int64)
    indices = np.asarray(indices, dtype=np.int64)
    groups, length = _identical_columns(indptr, indices, n_classes)
    n_patterns = indptr.size - 1
    messages = []

    absent = np.flatnonzero((length == 0) & (target > tol))
    if absent.size:
        listed = ", ".join(f"{names[i]!r} (target {target[i]:.4g})" for i in absent)
        messages.append(f"classes never present in any sample cannot reach a positive fraction: {listed}; "
                        f"nearest achievable fraction 0")
    always = np.flatnonzero((length == n_patterns) & (n_patterns > 0) & (target < 1 - tol))
    if always.size:
        listed = ", ".join(f"{names[i]!r} (target {target[i]:.4g})" for i in always)
        messages.append(f"classes present in every sample always have fraction 1: {listed}; "
                        f"nearest achievable fraction 1")
    for group in groups:
        g = np.asarray(group)
        if np.ptp(target[g]) <= tol:
            continue
        weights = w[g]
        nearest = float(np.dot(weights, target[g]) / weights.sum()) if weights.sum() > 0 else float(target[g].mean())
        listed = ", ".join(f"{names[i]!r} (target {target[i]:.4g})" for i in g)
        messages.append(f"classes that always occur together get equal fractions but different targets: "
                        f"{listed}; nearest achievable common fraction {nearest:.4g}")
    for m in messages:
        warnings.warn(m, FeasibilityWarning, stacklevel=3)
    return messages


# -- targets written as text (the command lines) ---------------------------------------


def target_file(text: Optional[str]) -> Optional[Path]:
    """The JSON file a target text names (ends in ``.json`` or holds a path separator), else None."""
    if text is None:
        return None
    text = text.strip()
    if text.lower().endswith(".json") or (os.sep in text and "=" not in text):
        return Path(text)
    return None


def parse_target_text(text: str, class_names: Sequence[str]):
    """A target written as text, as what :func:`resolve_target` accepts, checked.

    The forms (:data:`TARGET_TEXT_HELP`): a name (``equal``, ``uniform``, ``sqrt``,
    ``rare_boost``, ``all``), ``smooth=Q`` / ``max_ir=K``, ``CLASS=FRACTION,...``
    (a dict; other classes keep their share), one fraction per class ``F1,F2,...`` (a
    list), or a JSON file (see :func:`target_file`) holding a list, an object
    ``{class: fraction}`` or a name. Both command lines (``cobalance fit`` and the
    fundus study) parse targets with it.

    Raises
    ------
    ValueError
        A form not listed, a fraction outside [0, 1], an unknown or repeated class, a
        list of the wrong length, or a JSON file that cannot be read (naming it).
        A missing file stays ``FileNotFoundError``.
    """
    names = [str(n) for n in class_names]
    text = text.strip()
    spec = text
    path = target_file(text)
    if path is not None:
        try:
            with open(path, encoding="utf-8") as f:
                spec = json.load(f)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise ValueError(f"cannot read target file {text!r}: {' '.join(str(exc).split())}") from None
        if not isinstance(spec, (str, list, dict)):
            raise ValueError(f"target file {text!r} must hold a list of fractions, an object "
                             "{class: fraction} or a target name (equal, sqrt, rare_boost, all, ...)")
    elif text.startswith(_TARGET_WITH_NUMBER) and "," not in text:
        spec = text
    elif "=" in text:
        spec = {}
        for item in text.split(","):
            name, sep, value = item.partition("=")
            name, value = name.strip(), value.strip()
            if not sep or not name:
                raise ValueError(f"expected CLASS=FRACTION, got {item.strip()!r}")
            if name in spec:
                raise ValueError(f"class {name!r} is given twice")
            spec[name] = _fraction_text(value, name)
    elif text not in _PLAIN_NAMES:
        try:
            spec = [float(v) for v in text.split(",")]
        except ValueError:
            raise ValueError(f"a target must be {TARGET_TEXT_HELP}; got {text!r}") from None
    if isinstance(spec, dict):
        unknown = [k for k in spec if str(k) not in names]
        if unknown:
            raise ValueError(f"unknown class {str(unknown[0])!r}; the classes are {', '.join(names)}")
        fractions = spec.items()
    elif isinstance(spec, list):
        if len(spec) != len(names):
            raise ValueError(f"the target lists {len(spec)} fractions, the table has {len(names)} classes "
                             f"({', '.join(names)})")
        fractions = zip(names, spec)
    else:
        fractions = ()
    for name, v in fractions:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= float(v) <= 1.0:
            raise ValueError(f"the fraction of {name!r} must be in [0, 1], got {v!r}")
    return spec


def _fraction_text(text: str, name: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"the fraction of {name!r}: expected a fraction in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:  # also rejects nan
        raise ValueError(f"the fraction of {name!r} must be in [0, 1], got {text}")
    return value
