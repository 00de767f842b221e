# Hand-written stubs for the private native module cobalance._core.
#
# Every long call (the builder's add_* methods, merge_tables, the mask scans, adam,
# projected_gradient, solve_exact) runs Python's signal handlers about every 50 ms
# while it works without the GIL, and stops with the exception a handler raised
# (KeyboardInterrupt for Ctrl-C), leaving a builder as it was before the call.
from typing import Optional, Sequence, Tuple

import numpy as np
import numpy.typing as npt

def resolve_threads(n_threads: int) -> int: ...

# The most classes a table holds: 2**32 - 1 (class numbers are 32-bit in the balancing
# problem; a pattern takes ceil(n_classes / 64) * 8 bytes).
MAX_CLASSES: int

# --- pattern tables -------------------------------------------------------------

class PatternTable:
    @property
    def n_classes(self) -> int: ...
    @property
    def n_words(self) -> int: ...
    @property
    def n_patterns(self) -> int: ...
    @property
    def n_samples(self) -> int: ...
    @property
    def has_inverse(self) -> bool: ...
    def packed(self) -> npt.NDArray[np.uint64]: ...
    def counts(self) -> npt.NDArray[np.int64]: ...
    def inverse(self) -> npt.NDArray[np.int32]: ...
    def dense(self) -> npt.NDArray[np.uint8]: ...
    def sparse(self) -> Tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]: ...
    def class_counts(self) -> npt.NDArray[np.int64]: ...
    @staticmethod
    def from_parts(
        n_classes: int,
        packed: npt.NDArray[np.uint64],
        counts: npt.NDArray[np.int64],
        inverse: Optional[npt.NDArray[np.int64]],
    ) -> PatternTable: ...

class PatternTableBuilder:
    def __init__(self, n_classes: int, keep_inverse: bool = True, n_threads: int = 0) -> None: ...
    @property
    def n_classes(self) -> int: ...
    @property
    def n_samples(self) -> int: ...
    @property
    def n_patterns(self) -> int: ...
    def expect_samples(self, n_total: int) -> None: ...
    def add_dense(self, labels: npt.NDArray[np.uint8]) -> None: ...
    def add_packed(self, words: npt.NDArray[np.uint64]) -> None: ...
    def add_lists(self, indptr: npt.NDArray[np.int64], indices: npt.NDArray[np.int64]) -> None: ...
    def add_table(self, table: PatternTable) -> None: ...
    def finish(self) -> PatternTable: ...

def merge_tables(tables: Sequence[PatternTable], n_threads: int = 0) -> PatternTable: ...

# --- mask scanning ----------------------------------------------------------------

# Both return (presence uint8 (n, C), pixel_counts int64 (n, C), valid_pixels int64 (n,),
# origins int64 (n, 3)); masks must be C-contiguous (read in place, GIL released).
def scan_label_maps(
    masks: npt.NDArray[np.uint8] | npt.NDArray[np.uint16] | npt.NDArray[np.int32],
    n_classes: int,
    ignore_index: Optional[int],
    min_pixels: npt.NDArray[np.int64],
    tile: Tuple[int, int],
    stride: Tuple[int, int],
    n_threads: int = 0,
    first_image: int = 0,
) -> Tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64]]: ...
def scan_binary_masks(
    masks: npt.NDArray[np.uint8],
    min_pixels: npt.NDArray[np.int64],
    tile: Tuple[int, int],
    stride: Tuple[int, int],
    n_threads: int = 0,
    first_image: int = 0,
) -> Tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64]]: ...
def tile_starts(size: int, tile: int, stride: int, axis: str = "height") -> list[int]: ...

# --- balancing problem and solvers ------------------------------------------------

class BalanceProblem:
    def __init__(
        self,
        indptr: npt.ArrayLike,
        indices: npt.ArrayLike,
        counts: npt.ArrayLike,
        n_classes: int,
        target: npt.ArrayLike,
        class_weights: Optional[npt.ArrayLike] = None,
    ) -> None: ...
    @property
    def n_patterns(self) -> int: ...
    @property
    def n_classes(self) -> int: ...
    @property
    def nnz(self) -> int: ...
    @property
    def n_samples(self) -> float: ...
    @property
    def n_blocks(self) -> int: ...
    def marginals(self, alpha: npt.ArrayLike, n_threads: int = 0) -> npt.NDArray[np.float64]: ...
    def loss(self, alpha: npt.ArrayLike, objective: str, regularizer: str, gamma: float, n_threads: int = 0) -> float: ...
    def loss_and_gradient(
        self, alpha: npt.ArrayLike, objective: str, regularizer: str, gamma: float, n_threads: int = 0
    ) -> Tuple[float, npt.NDArray[np.float64]]: ...

def adam(
    problem: BalanceProblem,
    alpha0: npt.ArrayLike,
    lower: npt.ArrayLike,
    upper: npt.ArrayLike,
    objective: str,
    regularizer: str,
    gamma: float,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    max_iter: int = 1000,
    tol: float = 0.0,
    n_threads: int = 0,
    total: Optional[float] = None,
) -> dict: ...
def projected_gradient(
    problem: BalanceProblem,
    alpha0: npt.ArrayLike,
    lower: npt.ArrayLike,
    upper: npt.ArrayLike,
    objective: str,
    regularizer: str,
    gamma: float,
    total: float,
    max_iter: int = 5000,
    tol: float = 1e-9,
    n_threads: int = 0,
) -> dict: ...
def solve_exact(
    problem: BalanceProblem,
    objective: str,
    regularizer: str,
    gamma: float,
    total: float,
    lower: npt.ArrayLike,
    upper: npt.ArrayLike,
    max_iter: int = 100000,
    tol: float = 1e-10,
    n_threads: int = 0,
) -> dict: ...
