"""A torch ``Sampler`` that walks a balancing plan, shuffled per epoch and sharded over ranks."""

from __future__ import annotations

import math
from typing import Iterator, Optional

import numpy as np
import torch
from torch.utils.data import Sampler

__all__ = ["PlanSampler", "plan_arrays"]


def plan_arrays(plan):
    """The balanced index list and copy indices of a plan, as validated int64 arrays.

    Parameters
    ----------
    plan : cobalance.Plan
        Anything with ``indices()`` (int64[N'], the balanced index list), ``copy_index``
        (int64[N'], 0 for an original, k for its k-th duplicate) and ``n_samples``.

    Returns
    -------
    indices, copy_index : ndarray of int64, shape (N',)

    Raises
    ------
    ValueError
        When the arrays are not 1-D integers of one length, or an index falls outside
        ``[0, plan.n_samples)``.
    """
    for attr in ("indices", "copy_index", "n_samples"):
        if not hasattr(plan, attr):
            raise ValueError(f"plan must be a cobalance.Plan (indices(), copy_index, n_samples); it has no {attr!r}")
    indices = np.asarray(plan.indices() if callable(plan.indices) else plan.indices)
    copy_index = np.asarray(plan.copy_index)
    for name, arr in (("plan.indices()", indices), ("plan.copy_index", copy_index)):
        if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
            raise ValueError(f"{name} must be a 1-D integer array, got shape {arr.shape}, dtype {arr.dtype}")
    if indices.shape != copy_index.shape:
        raise ValueError(
            f"plan.indices() has {indices.size} entries but plan.copy_index has {copy_index.size}; they must align"
        )
    n = int(plan.n_samples)
    if indices.size and (indices.min() < 0 or indices.max() >= n):
        bad = int(indices.min()) if indices.min() < 0 else int(indices.max())
        raise ValueError(f"plan.indices() holds sample {bad}, outside [0, plan.n_samples={n})")
    return indices.astype(np.int64, copy=False), copy_index.astype(np.int64, copy=False)


class PlanSampler(Sampler[int]):
    """Yield a plan's balanced index list, reshuffled every epoch, split over ranks.

    A drop-in for :class:`torch.utils.data.DistributedSampler` whose "dataset" is the
    plan's balanced index list ``plan.indices()`` (length ``N'``): the epoch order,
    the padding and the split over ranks follow DistributedSampler exactly, position
    for position, and the positions are then read through the plan.

    Parameters
    ----------
    plan : cobalance.Plan
        See :func:`plan_arrays`.
    shuffle : bool
        Permute the positions each epoch with ``torch.randperm`` seeded by
        ``seed + epoch`` (the same on every rank); otherwise keep the plan's order.
    seed : int
        Base seed; the same ``seed`` and epoch give the same order on any machine.
    num_replicas, rank : int, optional
        The number of ranks and this one's rank. ``None`` reads them from an
        initialised ``torch.distributed`` process group, and means one rank (rank 0)
        when there is none (where DistributedSampler would raise).
    drop_last : bool
        How ``N'`` is made a multiple of ``num_replicas``. ``False``: the permuted
        positions are padded by repeating them from the start (cyclically when the
        padding exceeds ``N'``), so each rank gets ``ceil(N' / num_replicas)`` items and
        up to ``num_replicas - 1`` positions are seen twice in the epoch. ``True``: the
        tail of the permutation is dropped, each rank gets ``floor(N' / num_replicas)``
        items and up to ``num_replicas - 1`` positions are not seen this epoch.
    positions : bool
        What is yielded. ``False`` (default): sample indices ``plan.indices()[p]``, to
        index the original dataset (a duplicate is the same index again). ``True``: the
        positions ``p`` into the plan, to index a :class:`BalancedDataset`, whose item
        ``p`` carries ``plan.copy_index[p]`` so that augmentation can tell a duplicate
        from its original.

    Notes
    -----
    Over all ranks, one epoch yields every position of the plan once, plus the padding
    (or minus the dropped tail) described under ``drop_last``; hence, with
    ``positions=False``, exactly the plan's multiset of indices plus the indices of the
    padded positions. Call :meth:`set_epoch` at the start of every epoch, as with
    DistributedSampler, or every epoch repeats the same order.

    Raises
    ------
    ValueError
        On a malformed plan, ``num_replicas < 1`` or ``rank`` outside
        ``[0, num_replicas)``.
    """

    def __init__(
        self,
        plan,
        *,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: Optional[int] = None,
        rank: Optional[int] = None,
        drop_last: bool = False,
        positions: bool = False,
    ) -> None:
        self.indices_, self.copy_index_ = plan_arrays(plan)
        if num_replicas is None or rank is None:
            initialised = torch.distributed.is_available() and torch.distributed.is_initialized()
            if num_replicas is None:
                num_replicas = torch.distributed.get_world_size() if initialised else 1
            if rank is None:
                rank = torch.distributed.get_rank() if initialised else 0
        if isinstance(num_replicas, bool) or not isinstance(num_replicas, (int, np.integer)) or num_replicas < 1:
            raise ValueError(f"num_replicas must be a positive integer, got {num_replicas!r}")
        if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be an integer in [0, num_replicas={num_replicas}), got {rank!r}")
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.drop_last = bool(drop_last)
        self.positions = bool(positions)
        self.epoch = 0
        n = self.indices_.size
        # The same arithmetic as DistributedSampler, so that the two agree item for item.
        if self.drop_last and n % self.num_replicas != 0:
            self.num_samples = math.ceil((n - self.num_replicas) / self.num_replicas)
        else:
            self.num_samples = math.ceil(n / self.num_replicas)
        self.total_size = self.num_samples * self.num_replicas

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch whose order the next iteration yields (``seed + epoch``)."""
        self.epoch = int(epoch)

    def epoch_positions(self) -> np.ndarray:
        """This rank's positions into the plan for the current epoch, int64[num_samples]."""
        n = self.indices_.size
        if self.shuffle:
            generator = torch.Generator()
            generator.manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=generator).numpy()
        else:
            order = np.arange(n, dtype=np.int64)
        if not self.drop_last:
            padding = self.total_size - n
            if padding > 0:
                order = np.concatenate([order, np.resize(order, padding)])
        else:
            order = order[: self.total_size]
        return order[self.rank : self.total_size : self.num_replicas].astype(np.int64, copy=False)

    def __iter__(self) -> Iterator[int]:
        positions = self.epoch_positions()
        out = positions if self.positions else self.indices_[positions]
        return iter(out.tolist())

    def __len__(self) -> int:
        return self.num_samples
