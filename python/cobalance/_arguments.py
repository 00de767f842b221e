"""Checks of the arguments that several public modules take alike.

``n_threads`` and ``n_classes`` are taken by the pattern tables, the mask scans, the
mask folders and the balancer; ``tile`` / ``stride`` and ``min_pixels`` by the mask
scans and the mask folders. Each check lives here once so that every entry point
accepts the same values and words its ValueError the same way.
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

__all__ = ["class_count", "min_pixels_per_class", "size_pair", "thread_count"]


def thread_count(n_threads: Optional[int]) -> int:
    """``n_threads`` as the core takes it: 0 for None (all cores), else a positive int.

    Raises
    ------
    ValueError
        When ``n_threads`` is neither None nor a positive integer.
    """
    if n_threads is None:
        return 0
    if not isinstance(n_threads, (int, np.integer)) or n_threads < 1:
        raise ValueError(f"n_threads must be a positive integer or None (all cores), got {n_threads!r}")
    return int(n_threads)


def class_count(n_classes) -> int:
    """``n_classes`` as an int.

    Raises
    ------
    ValueError
        When ``n_classes`` is not a positive integer.
    """
    if not isinstance(n_classes, (int, np.integer)) or n_classes < 1:
        raise ValueError(f"n_classes must be a positive integer, got {n_classes!r}")
    return int(n_classes)


def size_pair(value, name: str) -> Tuple[int, int]:
    """A ``(height, width)`` pair of positive ints from one int or a pair of ints.

    Raises
    ------
    ValueError
        Naming ``name``, when ``value`` is neither or holds a value below 1.
    """

    def is_int(v):
        return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))

    if is_int(value):
        pair = (int(value), int(value))
    elif isinstance(value, (tuple, list, np.ndarray)) and len(value) == 2 and all(is_int(v) for v in value):
        pair = (int(value[0]), int(value[1]))
    else:
        raise ValueError(f"{name} must be an int or a (height, width) pair of ints, got {value!r}")
    if min(pair) < 1:
        raise ValueError(f"{name} must be >= 1, got {value!r}")
    return pair


def min_pixels_per_class(min_pixels, n_classes: int) -> np.ndarray:
    """``min_pixels`` as a C-contiguous int64 vector of 1 or ``n_classes`` values, each >= 1.

    Raises
    ------
    ValueError
        When ``min_pixels`` is not integer, has another length, or holds a value below 1
        (naming the class).
    """
    arr = np.asarray(min_pixels)
    if arr.dtype.kind not in "iu" or arr.dtype == np.bool_:
        raise ValueError(f"min_pixels must be an integer or one integer per class, got {min_pixels!r}")
    arr = np.ascontiguousarray(arr.reshape(-1), dtype=np.int64)
    if arr.size not in (1, n_classes):
        raise ValueError(f"min_pixels must hold 1 or n_classes = {n_classes} values, got {arr.size}")
    bad = np.flatnonzero(arr < 1)
    if bad.size:
        where = f" for class {bad[0]}" if arr.size > 1 else ""
        raise ValueError(f"min_pixels must be >= 1, got {arr[bad[0]]}{where}")
    return arr
