"""Fixtures shared by the Python tests."""

import pytest


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
