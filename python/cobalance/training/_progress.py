"""Progress bars of the fundus study (tqdm, imported only when shown)."""

from __future__ import annotations

__all__ = ["progress_bar"]


def progress_bar(iterable, enabled: bool, **kwargs):
    """``iterable`` wrapped in a tqdm bar when ``enabled``, else as it is."""
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, dynamic_ncols=True, **kwargs)
