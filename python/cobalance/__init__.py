"""cobalance: balance multi-label and segmentation datasets by class-presence patterns.

Only numpy is needed to import this package; torch, kornia, matplotlib and dask are
imported lazily by the parts that use them.
"""

from ._version import __version__
from .patterns import PatternTable
from .masks import MaskScan, scan_masks, scan_masks_iter

__all__ = ["PatternTable", "__version__"]
