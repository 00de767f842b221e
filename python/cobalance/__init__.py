"""cobalance: balance multi-label and segmentation datasets by class-presence patterns.

Only numpy is needed to import this package; torch, kornia, matplotlib and dask are
imported lazily by the parts that use them.
"""

from ._version import __version__
from .balancer import Balancer, SizeWarning
from .patterns import PatternTable
from .masks import MaskScan, scan_masks, scan_masks_iter
from .plan import Plan
from .metrics import DiceMeter, dice_per_class, vdice
from .report import Report
from .targets import FeasibilityWarning, resolve_target

__all__ = ["PatternTable", "__version__"]
__all__ += ["Balancer", "Plan", "Report", "FeasibilityWarning", "SizeWarning", "resolve_target"]
__all__ += ["DiceMeter", "dice_per_class", "vdice"]
