"""Where the tests find the data sets in ../shared next to the repository root."""

import gzip
from pathlib import Path

import numpy as np
import pytest

SHARED = Path(__file__).parents[2] / ".." / "shared"
MULTILABEL = SHARED / "data" / "multilabel"
IDRID = SHARED / "data" / "idrid"


def multilabel_path(name: str) -> Path:
    """``<name>.labels.csv.gz`` of the multi-label collection; skips the test when it is absent."""
    path = MULTILABEL / f"{name}.labels.csv.gz"
    if not path.exists():
        pytest.skip(f"shared multi-label data set {path} is absent")
    return path


def read_multilabel(name: str):
    """``(path, class names, 0/1 uint8 labels)`` of a multi-label data set, read with numpy."""
    path = multilabel_path(name)
    with gzip.open(path, "rt") as f:
        header = f.readline().strip().split(",")
        y = np.loadtxt(f, delimiter=",", dtype=np.uint8, ndmin=2)
    return path, header, y
