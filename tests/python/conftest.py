"""Shared test configuration."""

import gzip
from pathlib import Path

import numpy as np
import pytest

import cobalance

#: The folder holding the ``cobalance`` package these tests import (site-packages
#: after ``pip install``, ``python/`` in a development build). Subprocesses get it as
#: PYTHONPATH so that they test the same installation as the test process.
PACKAGE_PARENT = Path(cobalance.__file__).resolve().parents[1]

#: The data sets in ../shared next to the repository root.
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


@pytest.fixture(scope="module")
def one_torch_thread():
    """Small per-item tensors run faster on one thread (the intra-op pool only adds
    hand-off cost at 64 x 64); the thread count is restored afterwards.

    Modules that want it mark themselves ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``.
    """
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
