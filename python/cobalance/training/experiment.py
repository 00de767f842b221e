"""The fundus study: train a U-Net on each balancing arm and compare per-class Dice.

For every fold of a multi-label stratified K-fold over images (the tiles of one image
stay on one side) and every *arm*, a training set is formed from the fold's training
tiles, a model is trained from the same initial weights with the configured loss (the
method's focal loss, or BCE + soft Dice) and Adam, and
after every epoch the per-class Dice and vDice on the fold's test tiles are recorded.

Arms
----
``unbalanced``
    The training tiles as they are.
``balanced_noreg``
    :class:`cobalance.Balancer` with ``regularizer="none"`` (fitted on the training
    tiles of the fold only).
``balanced_reg``
    :class:`cobalance.Balancer` with the ``proportions`` regularizer (the method's
    recommended setting).
``exact``
    Like ``balanced_reg`` but solved to optimality (``solver="exact"``).
``rfs``
    Repeat-factor sampling (LVIS / detectron2), see :mod:`cobalance.training.rfs`.
``library_default``
    :class:`cobalance.Balancer` with every option at the library's default but the
    study's target and undersampling (what a user gets out of the box).
``class_weighted``
    The training tiles as they are, with the loss of each class weighted by its
    median-frequency weight (the usual alternative to resampling).

Duplicates (``copy_index > 0``) are augmented (elastic transform and flips); originals
are not. Every arm of a fold sees the same number of samples per epoch by default
(``epoch_size="train"``: the fold's number of training tiles), so arms differ in what
they see, not in how many steps they take.

The study is built from the library's stages, one module per subject:

=====================  ========================================================
module                 subject
=====================  ========================================================
:mod:`.config`         ``ExperimentConfig``, its checks and fingerprint, seeds
:mod:`.data`           the tiles: ``SegmentationFolder`` over ``MaskFolder``,
                       :func:`downscale_folder`
:mod:`.arms`           each arm's ``Plan`` and ``Report`` (``Balancer``, RFS)
:mod:`.run`            one (arm, fold): ``BalancedDataset``, ``PlanSampler``,
                       ``DuplicateAugmentation``, model, loss, evaluation
:mod:`.runner`         arms x folds, resumable (:func:`run_experiment`)
:mod:`.tables`         Table 1, Table 2, paired tests, curves
this module            the command line
=====================  ========================================================

Results folder
--------------
``config.json``, ``table1.{md,csv,json}`` (class presence, duplicates and effective
size per arm), ``table2_best.{md,csv,json}`` (per class the maximum Dice over epochs,
and the maximum vDice, mean and std over folds) and ``table2_last3.*`` (the mean of the
last three epochs instead), ``paired_best.*`` and ``paired_last3.*`` (each arm minus
``unbalanced`` per fold, with sign and Wilcoxon tests), ``curves_<class>.png`` for every
class and ``curves_vdice.png``, and ``runs/<arm>/fold<k>.json`` with every epoch's figures. A
finished (arm, fold) is never retrained; an interrupted one resumes from its last
finished epoch (``runs/<arm>/fold<k>.ckpt.pt``). Every file is written atomically.

Determinism
-----------
On CPU the same configuration, seed and thread count give identical results:
``torch.use_deterministic_algorithms(True)`` is on during training, the initial weights
are seeded per fold, the sample order (a ``PlanSampler`` per (arm, fold), one of its
epochs per pass) and the augmentation per (seed, sample, copy index), and a resumed run
equals an uninterrupted one. A different number of CPU threads may change float
reductions in convolutions and hence the last digits.

On CUDA the run sets ``cudnn.benchmark = False``, ``CUBLAS_WORKSPACE_CONFIG=:4096:8``
(when unset) and ``torch.use_deterministic_algorithms(True, warn_only=True)``: cuDNN
then picks deterministic convolution algorithms, but operations that have no
deterministic CUDA kernel (PyTorch's reproducibility notes list them: among others
some interpolation and adaptive-pooling backward passes and atomic scatter / index-add
reductions, which timm / smp encoders and decoders may use) only warn instead of
failing, so two GPU runs can differ in the last digits (and such differences can grow
over training). The augmentation's
parameters are drawn on the CPU and are the same on any device; its interpolation on
the GPU differs from the CPU's by floating-point rounding. Data order, plans, folds and
initial weights do not depend on the device.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Optional, Sequence

from ..targets import TARGET_TEXT_HELP
from .config import AMP_MODES, ARM_TITLES, ARMS, DEFAULT_ARMS, LOSSES, ExperimentConfig
from .arms import arm_plan
from .data import downscale_folder
from .runner import run_experiment
from .tables import table1_markdown, table2_markdown

__all__ = ["ARMS", "DEFAULT_ARMS", "ARM_TITLES", "ExperimentConfig", "run_experiment", "add_experiment_parser",
           "experiment_handler", "run_from_args", "main", "arm_plan", "downscale_folder"]


def _epoch_size_arg(text: str):
    if text in ("train", "plan"):
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"epoch size must be 'train', 'plan' or an integer, got {text!r}")


def _fold_list_arg(text: str):
    try:
        return [int(f) for f in text.split(",") if f.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"folds must be comma-separated integers, e.g. 0,2, got {text!r}")


def _configure_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--data", required=True, help="dataset folder: images/ and masks/<class>/ (the IDRiD layout), "
                   "or images/ and masks/<id>.png label maps")
    p.add_argument("--out", required=True, help="results folder (created; an existing one is resumed)")
    p.add_argument("--classes", type=lambda s: [c for c in s.split(",") if c], default=None,
                   help="comma-separated class folders, in order (default: all, sorted)")
    p.add_argument("--tile", type=int, default=512, help="tile size in pixels (default 512)")
    p.add_argument("--stride", type=int, default=None, help="tile stride (default: the tile size)")
    p.add_argument("--downscale", type=int, default=1, help="shrink images by this integer factor first")
    p.add_argument("--data-cache", default=None, help="folder for the downscaled copy (default OUT/data-Nx)")
    p.add_argument("--min-pixels", type=int, default=1, help="pixels of a class that make it present in a tile")
    p.add_argument("--ignore-index", type=int, default=None, help="label maps: id of pixels in no class")
    p.add_argument("--image-dir", default=None, help="image sub-folder of --data (default images)")
    p.add_argument("--mask-dir", default=None, help="mask sub-folder of --data (default masks; '.' for --data)")
    p.add_argument("--stem-key", default=None, metavar="REGEX",
                   help="pair image and mask files by this part of their stems, e.g. '^(\\d+)_'")
    p.add_argument("--valid-dir", default=None, help="sub-folder of valid-region masks (e.g. a field of view)")
    p.add_argument("--min-valid", type=float, default=None, metavar="SHARE",
                   help="leave out tiles with less than this share of valid pixels")
    p.add_argument("--folds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=8e-3, help="Adam learning rate (default 8e-3)")
    p.add_argument("--model", default="smp-unet-xception65",
                   help="model name (default smp-unet-xception65, the method's; 'unet' needs only torch)")
    p.add_argument("--encoder", default=None, help="encoder name (e.g. conv-tiny, resnet-tiny for 'unet')")
    p.add_argument("--encoder-weights", default=None, help="local file with encoder weights (never downloaded)")
    p.add_argument("--arms", type=lambda s: [a for a in s.split(",") if a], default=list(DEFAULT_ARMS),
                   help=f"comma-separated arms among {','.join(ARMS)} (default {','.join(DEFAULT_ARMS)})")
    # Parsed against the class names once the data is open (cobalance.targets.parse_target_text).
    p.add_argument("--target", default="rare_boost",
                   help=f"balancer target: {TARGET_TEXT_HELP} (default rare_boost)")
    p.add_argument("--gamma", type=float, default=None, help="regularizer weight (default: the Balancer's)")
    p.add_argument("--undersample", action="store_true", help="let the balancer drop tiles")
    p.add_argument("--rfs-threshold", type=float, default=0.3, help="repeat-factor threshold t (default 0.3)")
    p.add_argument("--epoch-size", type=_epoch_size_arg, default="train",
                   help="samples per epoch: train (fold's tile count, default), plan, or an integer")
    p.add_argument("--loss", choices=LOSSES, default="focal",
                   help="training loss for multi-label masks: focal (the method's, default), bce_dice "
                        "(binary cross-entropy plus soft Dice per class) or dice (soft Dice alone)")
    p.add_argument("--head-prior", type=float, default=None, metavar="P",
                   help="start every class's output at probability P (bias log(P/(1-P)); default: off)")
    p.add_argument("--focal-gamma", type=float, default=2.0)
    p.add_argument("--no-augment", dest="augment", action="store_false", help="do not augment duplicates")
    p.add_argument("--max-tiles", type=int, default=None, help="use a seeded random subset of the tiles")
    p.add_argument("--max-images", type=int, default=None, help="use a seeded random subset of the images")
    p.add_argument("--cache-images", action="store_true", help="keep the tiles in memory once read")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, ...)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.add_argument("--amp", choices=AMP_MODES, default=None,
                   help="forward passes under this autocast precision (bf16; default float32)")
    p.add_argument("--channels-last", action="store_true", help="channels-last memory layout (faster on GPUs)")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="time budget: each (arm, fold) left gets an equal share and stops after the epoch "
                        "that would overrun it")
    p.add_argument("--only-folds", type=_fold_list_arg, default=None,
                   metavar="K,K", help="train only these folds (0-based) now; the tables cover the finished folds")
    p.add_argument("--no-checkpoints", dest="checkpoints", action="store_false",
                   help="do not save a checkpoint after every epoch (an interrupted run starts again)")
    return p


def _config_from_args(args: argparse.Namespace) -> ExperimentConfig:
    fields = {f.name for f in dataclasses.fields(ExperimentConfig)}
    return ExperimentConfig(**{k: v for k, v in vars(args).items() if k in fields})


def experiment_handler(args: argparse.Namespace, console=None) -> int:
    """Run the ``experiment`` subcommand; errors propagate (ValueError, ImportError).

    The signature is the ``cobalance`` CLI's ``handler(args, console)``; ``console``
    is not used (progress goes through tqdm, results to stdout). :func:`cobalance.cli.main`
    turns the errors into one line on stderr and an exit status (ValueError: 2).
    """
    result = run_experiment(_config_from_args(args))
    print(table1_markdown(result["table1"]))
    print(table2_markdown(result["table2"]))
    print(f"results in {args.out}")
    return 0


def run_from_args(args: argparse.Namespace) -> int:
    """``args.func(args)`` of the subparser: :func:`experiment_handler` without a console.

    Errors propagate, as from the handler; run the study through
    :func:`main` (or ``cobalance experiment``) for the command line's exit statuses.
    """
    return experiment_handler(args)


def add_experiment_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``experiment`` subcommand to an ``argparse`` subparsers object.

    Two entry points are set, both letting errors propagate to the caller's error
    handling: ``args.handler(args, console)`` (:func:`experiment_handler`, what
    :func:`cobalance.cli.main` calls) and ``args.func(args)`` (:func:`run_from_args`).
    Returns the subparser.
    """
    p = subparsers.add_parser("experiment", help="train a U-Net on each balancing arm and compare per-class Dice",
                              description=__doc__.split("\n\n")[0])
    _configure_parser(p)
    p.set_defaults(func=run_from_args, handler=experiment_handler)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m cobalance.training``: ``cobalance experiment`` with ``argv``.

    Runs through :func:`cobalance.cli.main`, the command line's one error handling: a
    ValueError is one line on stderr and exit status 2.
    """
    from ..cli import main as cli_main

    argv = list(sys.argv[1:] if argv is None else argv)
    return cli_main(["experiment", *argv])


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
