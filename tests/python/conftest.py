"""Shared test configuration."""

from pathlib import Path

import pytest

import cobalance

#: The folder holding the ``cobalance`` package these tests import (site-packages
#: after ``pip install``, ``python/`` in a development build). Subprocesses get it as
#: PYTHONPATH so that they test the same installation as the test process.
PACKAGE_PARENT = Path(cobalance.__file__).resolve().parents[1]


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
