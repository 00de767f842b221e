"""One training run of the study: an arm on a fold, with checkpoints after every epoch.

The run composes the library's stages: the arm's :class:`cobalance.Plan` and
:class:`cobalance.Report` (:func:`cobalance.training.arms.arm_plan`), a
:class:`cobalance.segmentation.BalancedDataset` over the fold's training tiles, the
epoch order of a :class:`cobalance.segmentation.PlanSampler`, and
:class:`cobalance.segmentation.DuplicateAugmentation` on the duplicates; then the
model, the loss (focal, or BCE + soft Dice; class-weighted in the ``class_weighted``
arm), Adam, and :class:`cobalance.segmentation.DiceMeter` on the
fold's test tiles after every epoch.

An interrupted run resumes from ``fold<k>.ckpt.pt`` (model, optimiser and history
after the last finished epoch) and gives what an uninterrupted one gives.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np

from .._atomic import atomic_path, atomic_write_text
from ._progress import progress_bar
from .arms import arm_plan
from .config import RESULT_VERSION, ExperimentConfig, derived_seed
from .data import StudyTiles

__all__ = ["FoldSplit", "epoch_positions", "evaluate", "forward_pass", "normalize", "train_arm_fold"]

_IMAGE_MEAN = (0.485, 0.456, 0.406)  # ImageNet statistics, what timm/smp encoders expect
_IMAGE_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass
class FoldSplit:
    """A fold's tiles: training and test indices into the study's tiles, and the
    training tiles' :class:`cobalance.PatternTable` (built once, shared by the arms)."""

    train: np.ndarray
    test: np.ndarray
    table: object


def epoch_positions(sampler, epoch: int, epoch_size: int) -> np.ndarray:
    """Positions into the plan for one study epoch: ``epoch_size`` of them.

    They are passes of ``sampler`` (a :class:`cobalance.segmentation.PlanSampler`,
    one pass = one of its epochs, each a new permutation of the plan), the last pass
    cut short: study epoch ``e`` uses the sampler's epochs ``e * p`` to
    ``e * p + p - 1``, ``p = ceil(epoch_size / len(sampler))``. So every epoch of
    every arm takes the same number of steps whatever the plan's size, and with
    ``epoch_size == len(sampler)`` an epoch is exactly one sampler epoch.
    """
    n = len(sampler)
    passes = -(-int(epoch_size) // n)
    chunks = []
    for j in range(passes):
        sampler.set_epoch(int(epoch) * passes + j)
        chunks.append(sampler.epoch_positions())
    return np.concatenate(chunks)[: int(epoch_size)]


def normalize(x):
    """Images in [0, 1] standardised with the ImageNet mean and std (what encoders expect)."""
    import torch

    mean = torch.tensor(_IMAGE_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(_IMAGE_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


def forward_pass(model, x, amp: Optional[str] = None, channels_last: bool = False):
    """``model(normalize(x))`` as float32 logits, under bfloat16 autocast when ``amp == "bf16"``.

    The logits are cast back to float32 so that the loss and the Dice never see
    bfloat16 rounding of their own sums.
    """
    import torch

    x = normalize(x)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=amp == "bf16"):
        logits = model(x)
    return logits.float()


def evaluate(model, loader, n_classes: int, device, ignore_index: Optional[int] = None, *,
             amp: Optional[str] = None, channels_last: bool = False) -> Tuple[List[float], float]:
    """Per-class Dice (global over the loader's tiles; NaN for a class absent from both
    prediction and truth) and vDice of ``model`` on ``loader`` (forward passes as in
    :func:`forward_pass`)."""
    import torch

    from ..segmentation import DiceMeter

    # Multi-label: sigmoid > 0.5 per class; label maps: argmax over classes.
    meter = DiceMeter(n_classes, mode="global", absent="skip", pred_format="logits", threshold=0.5,
                      ignore_index=ignore_index)
    model.eval()
    with torch.no_grad():
        for x, m in loader:
            logits = forward_pass(model, x.to(device), amp, channels_last)
            meter.update(logits, m.to(device))
    result = meter.compute()
    return [float(v) for v in result.per_class.cpu()], float(result.vdice.cpu())


def _nan_to_none(values):
    return [None if (v is None or (isinstance(v, float) and math.isnan(v))) else v for v in values]


def _best(values):
    values = [v for v in values if v is not None]
    return max(values) if values else None


def train_arm_fold(arm: str, fold: int, tiles: StudyTiles, split: FoldSplit, config: ExperimentConfig,
                   run_dir: Path, result_path: Path, time_limit: Optional[float] = None) -> dict:
    """Train one arm on one fold, evaluating after every epoch; write its result file.

    Parameters
    ----------
    arm : str
    fold : int
    tiles : StudyTiles
    split : FoldSplit
        The fold's training / test tiles and the training tiles' pattern table.
    config : ExperimentConfig
        With its target parsed.
    run_dir, result_path : Path
        Folder of the checkpoint ``fold<k>.ckpt.pt`` and the result file written
        (atomically) at the end; the checkpoint is then removed.
    time_limit : float, optional
        Seconds this call may train: after each epoch, the run stops when one more
        epoch (timed as the slowest so far) would end past the limit. At least one
        epoch is trained per call. The result then has ``"time_limited": true``.

    Returns
    -------
    dict
        The result file's content: the plan's figures (from its Report), every
        epoch's loss and test Dice, the best Dice per class and vDice.

    Raises
    ------
    ValueError
        A plan that keeps no training tile.
    """
    import torch
    from torch.utils.data import DataLoader, Subset

    from ..segmentation import BalancedDataset, DuplicateAugmentation, PlanSampler
    from .losses import BCEDiceLoss, FocalLoss
    from .models import create_model

    device = torch.device(config.device)
    class_names = tiles.class_names
    n_classes = len(class_names)
    train_idx, test_idx = split.train, split.test
    plan, report, plan_info = arm_plan(arm, split.table, config, fold)
    if plan.n_samples_out == 0:
        raise ValueError(f"arm {arm!r}, fold {fold}: the plan keeps no training tile")
    epoch_size = {"train": train_idx.size, "plan": plan.n_samples_out}.get(config.epoch_size, config.epoch_size)

    train_set = BalancedDataset(Subset(tiles.items, train_idx.tolist()), plan, with_source=True)
    # One process trains: the whole plan on one rank, even under an initialised process group.
    sampler = PlanSampler(plan, seed=derived_seed(config, "order", arm, fold), positions=True,
                          num_replicas=1, rank=0)
    test_loader = DataLoader(Subset(tiles.items, test_idx.tolist()), batch_size=config.batch_size * 2,
                             shuffle=False, num_workers=config.num_workers)
    augment = DuplicateAugmentation(seed=derived_seed(config, "augment", fold)) if config.augment else None
    tile_ids = torch.as_tensor(train_idx)

    torch.manual_seed(derived_seed(config, "init", fold))  # the same initial weights for every arm of a fold
    model = create_model(config.model, in_channels=3, classes=n_classes, encoder=config.encoder,
                         encoder_weights_path=config.encoder_weights, head_prior=config.head_prior).to(device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    class_weights = plan_info.get("class_weights")  # the class_weighted arm's
    if tiles.label_map:
        alpha = class_weights
        loss_fn = FocalLoss("multiclass", gamma=config.focal_gamma, alpha=alpha, ignore_index=config.ignore_index)
    elif config.loss in ("bce_dice", "dice"):
        loss_fn = BCEDiceLoss(class_weights=class_weights, bce_weight=1.0 if config.loss == "bce_dice" else 0.0)
    else:
        loss_fn = FocalLoss("multilabel", gamma=config.focal_gamma, alpha=config.focal_alpha,
                            class_weights=class_weights)

    history: List[dict] = []
    checkpoint = run_dir / f"fold{fold}.ckpt.pt"
    fingerprint = config.fingerprint()
    if checkpoint.exists():
        state = torch.load(checkpoint, map_location=device, weights_only=False)
        if state.get("fingerprint") == fingerprint:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            history = state["history"]

    started = time.perf_counter()
    seconds_before = sum(h["seconds"] for h in history)
    time_limited = False
    first_epoch = len(history)
    for epoch in range(first_epoch, config.epochs):
        t0 = time.perf_counter()
        if time_limit is not None and epoch > first_epoch:
            # The slowest epoch so far, not the mean: the first one carries warm-up costs
            # too, and overrunning the budget costs more than one epoch fewer.
            if t0 - started + max(h["seconds"] for h in history) > time_limit:
                time_limited = True
                break
        model.train()
        positions = epoch_positions(sampler, epoch, epoch_size)
        loader = DataLoader(train_set, batch_size=config.batch_size, sampler=positions.tolist(),
                            num_workers=config.num_workers, pin_memory=device.type == "cuda")
        # The loss is summed on the device (in float64, as Python floats would) and read
        # once per epoch: reading it every step would wait for the GPU at every batch.
        total, count = torch.zeros((), dtype=torch.float64, device=device), 0
        batches = progress_bar(loader, config.progress, desc=f"{arm} fold {fold} epoch {epoch + 1}/{config.epochs}",
                               leave=False)
        for x, m, sample, copy_index in batches:
            # Pinned batches (on CUDA) copy without blocking, so the next batch is
            # prepared while this one trains.
            x, m = x.to(device, non_blocking=True), m.to(device, non_blocking=True)
            if augment is not None:
                # Seeded by the tile's id in the whole dataset: a duplicate is augmented
                # the same way whatever the fold, batch or position it lands in.
                x, m = augment(x, m, tile_ids[sample], copy_index)
            loss = loss_fn(forward_pass(model, x, config.amp, config.channels_last), m)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.detach().double() * x.shape[0]
            count += x.shape[0]
        dice, vd = evaluate(model, test_loader, n_classes, device, config.ignore_index, amp=config.amp,
                            channels_last=config.channels_last)
        history.append({"epoch": epoch + 1, "train_loss": float(total) / max(count, 1), "dice": _nan_to_none(dice),
                        "vdice": None if math.isnan(vd) else vd, "seconds": time.perf_counter() - t0})
        if config.checkpoints:
            with atomic_path(checkpoint, suffix=".pt") as tmp:
                torch.save({"fingerprint": fingerprint, "model": model.state_dict(),
                            "optimizer": optimizer.state_dict(), "history": history}, tmp)

    result = {
        "version": RESULT_VERSION,
        "fingerprint": fingerprint,
        "arm": arm,
        "fold": fold,
        "seed": config.seed,
        "classes": class_names,
        "device": str(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "n_train_tiles": int(train_idx.size),
        "n_test_tiles": int(test_idx.size),
        "n_train_images": int(np.unique(tiles.image_of[train_idx]).size),
        "n_test_images": int(np.unique(tiles.image_of[test_idx]).size),
        "test_images": sorted({tiles.image_ids[i] for i in tiles.image_of[test_idx]}),
        "plan_size": report.n_samples_out,
        "plan_duplicates": report.n_duplicates,
        "plan_max_copies": report.max_copies,
        "plan_dropped": report.n_dropped,
        "plan_effective_size": report.effective_size,
        "plan_info": plan_info,
        "epoch_size": int(epoch_size),
        "presence_before": report.before.tolist(),
        "presence": report.after.tolist(),
        "history": history,
        "time_limited": time_limited,
        "best_dice": [_best([h["dice"][c] for h in history]) for c in range(n_classes)],
        "best_vdice": _best([h["vdice"] for h in history]),
        "seconds": seconds_before + time.perf_counter() - started,
    }
    atomic_write_text(result_path, json.dumps(result, indent=1))
    with contextlib.suppress(FileNotFoundError):
        checkpoint.unlink()
    return result
