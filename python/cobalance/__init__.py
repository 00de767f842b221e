"""cobalance: balance multi-label and segmentation datasets by class-presence patterns.

Only numpy is needed to import this package; torch, kornia, matplotlib and dask are
imported lazily by the parts that use them (``cobalance.segmentation``,
``cobalance.training``, ``cobalance.dask``, charts).
"""

from ._version import __version__
from .balancer import Balancer, ConvergenceWarning, LabelLossWarning, SizeWarning
from .masks import MaskScan, scan_masks, scan_masks_iter
from .metrics import DiceMeter, dice_per_class, vdice
from .patterns import PatternTable
from .plan import Plan
from .report import Report, imbalance_measures
from .resamplers import lp_ros, lp_rus, ml_ros, ml_rus, repeat_factor
from .targets import FeasibilityWarning, resolve_target

__all__ = [
    "__version__",
    "PatternTable",
    "MaskScan", "scan_masks", "scan_masks_iter",
    "Balancer", "SizeWarning", "ConvergenceWarning", "LabelLossWarning", "FeasibilityWarning", "resolve_target",
    "Plan", "Report", "imbalance_measures",
    "ml_ros", "ml_rus", "lp_ros", "lp_rus", "repeat_factor",
    "DiceMeter", "dice_per_class", "vdice",
]
