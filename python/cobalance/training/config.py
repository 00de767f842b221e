"""The fundus study's configuration: its fields and checks, its fingerprint, its seeds.

Everything here is numpy-only; torch is needed only by :func:`deterministic`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
from typing import List, Optional

import numpy as np

__all__ = ["ARMS", "DEFAULT_ARMS", "ARM_TITLES", "AMP_MODES", "LOSSES", "RESULT_VERSION", "RUNTIME_FIELDS", "ExperimentConfig",
           "derived_seed", "deterministic"]

ARMS = ("unbalanced", "balanced_noreg", "balanced_reg", "exact", "rfs", "library_default", "class_weighted")
DEFAULT_ARMS = ("unbalanced", "balanced_noreg", "balanced_reg")
ARM_TITLES = {
    "unbalanced": "unbalanced",
    "balanced_noreg": "balanced, no reg.",
    "balanced_reg": "balanced, reg.",
    "exact": "balanced, exact",
    "rfs": "repeat-factor",
    "library_default": "balanced, library default",
    "class_weighted": "class-weighted loss",
}
#: Training losses of ``ExperimentConfig.loss``.
LOSSES = ("focal", "bce_dice", "dice")
#: Version of the per-(arm, fold) result files; a file of another version is retrained.
RESULT_VERSION = 1
#: Config fields that do not change what a finished (arm, fold) holds: changing them
#: between an interrupted run and its resumption is allowed.
RUNTIME_FIELDS = ("out", "data_cache", "arms", "device", "num_workers", "threads", "progress", "cache_images",
                  "channels_last", "max_minutes", "checkpoints", "only_folds")
#: Mixed-precision modes of ``ExperimentConfig.amp``.
AMP_MODES = ("bf16",)


@dataclasses.dataclass
class ExperimentConfig:
    """Everything that defines a study; stored as ``config.json`` in the results folder.

    Parameters
    ----------
    data : str
        Dataset folder, read by :class:`cobalance.folders.MaskFolder`: ``images/`` and
        ``masks/<class>/`` (one binary mask per image holding the class; a missing file
        means the class is absent), as IDRiD ships; or ``images/`` and
        ``masks/<id>.png`` label maps of class ids (names from ``classes`` or
        ``classes.txt``), trained with the softmax focal loss.
    out : str
        Results folder.
    classes : list of str, optional
        Class folders to use, in this order; default the sorted folders of ``masks/``.
        For label maps: the name of each class id.
    tile, stride : int
        Tile size and stride in pixels of the (downscaled) images; stride defaults to tile.
    downscale : int
        Integer factor to shrink images (area average) and masks (max pooling, so a
        lesion pixel survives) before tiling; 1 uses the data as is. The shrunk copy
        is cached under ``data_cache``.
    data_cache : str, optional
        Folder for the downscaled copy; default ``<out>/data-<factor>x``.
    min_pixels : int
        A class is present in a tile when it covers at least this many pixels.
    ignore_index : int, optional
        Label maps only: the id of pixels that belong to no class (left out of the
        loss, the metrics and the presence).
    image_dir, mask_dir, stem_key, valid_dir, min_valid : optional
        Other folder layouts, passed to :class:`cobalance.folders.MaskFolder`: the
        image and mask sub-folders (default ``images`` and ``masks``), how file stems
        pair (a regular expression), a valid-region folder (e.g. a field of view) and
        the share of valid pixels below which a tile is left out. ``valid_dir`` and
        ``min_valid`` need ``downscale=1``.
    folds, epochs, batch_size, lr
        Cross-validation folds, epochs, batch size and Adam learning rate (the
        method's defaults: 3, 10, 8, 8e-3).
    model, encoder, encoder_weights
        Passed to :func:`cobalance.training.create_model`; the default
        ``smp-unet-xception65`` is the method's configuration and needs
        segmentation_models_pytorch; ``model="unet"`` with ``encoder="conv-tiny"``
        trains on a CPU.
    arms : list of str
        Subset of :data:`ARMS`.
    target : str, dict or list
        Balancer target in any form :func:`cobalance.targets.parse_target_text` reads
        (``"rare_boost"``, ``"equal"``, ``"sqrt"``, ``"CLASS=FRACTION,..."``, a JSON
        file, ...) or that :func:`cobalance.resolve_target` accepts ({class: fraction},
        one fraction per class). Text is parsed against the class names when the
        study starts, and ``config.json`` holds the parsed form.
    gamma : float, optional
        Regularizer weight of the regularized arms; None: the Balancer's default.
    undersample : bool
        Let the balancer drop tiles of over-represented patterns; by default a
        balanced set is the training tiles plus duplicates.
    rfs_threshold : float
        Repeat-factor threshold ``t`` of the ``rfs`` arm.
    epoch_size : "train", "plan" or int
        Samples per epoch: the fold's training tile count (same for every arm), each
        arm's own plan size, or a fixed number. Drawn from the arm's plan in passes,
        each pass one epoch of :class:`cobalance.segmentation.PlanSampler`.
    head_prior : float, optional
        Start the model's output at this probability for every class
        (:func:`cobalance.training.create_model`'s ``head_prior``); None: PyTorch's
        default initialisation.
    loss : {"focal", "bce_dice", "dice"}
        Training loss for multi-label masks: the method's focal loss (default),
        binary cross-entropy plus soft Dice per class
        (:class:`cobalance.training.BCEDiceLoss`), or the soft Dice alone. Label maps always use the softmax
        focal loss.
    focal_gamma, focal_alpha
        Focal loss parameters (``focal_alpha``, the weight of sigmoid positives, for
        multi-label masks only).
    augment : bool
        Augment duplicates (elastic transform and flips).
    max_tiles, max_images : int, optional
        Use a seeded random subset of the tiles / images (quick runs).
    cache_images : bool
        Keep every tile in memory once read (for datasets that fit, e.g. downscaled):
        the epochs visit tiles in random order, and without it each tile decodes its
        whole image again.
    device : str
        Torch device, e.g. ``"cpu"`` or ``"cuda"``.
    seed : int
    num_workers : int
        DataLoader workers (0: load in the main process).
    threads : int, optional
        torch CPU threads during the run (default: torch's). On a machine shared with
        other jobs, 1 can be many times faster than oversubscribed OpenMP threads.
    progress : bool
        Show tqdm progress bars.
    amp : {"bf16"}, optional
        Run the model's forward passes (training and evaluation) under bfloat16
        autocast; the loss and the Dice are computed in float32. None: float32
        throughout. Changes the results' last digits, so it is part of the fingerprint.
    channels_last : bool
        Keep the model and the batches in channels-last memory layout (faster
        convolutions on GPUs); the same arithmetic up to rounding order.
    max_minutes : float, optional
        Time budget of the whole call, in minutes. Each (arm, fold) still to train gets
        an equal share of the time left when it starts, and stops after the epoch
        whose successor would overrun that share (it always trains at least one).
        Such a run's result says ``"time_limited": true`` and counts as finished, so a
        resumed study does not extend it (remove its file to train it again).
    only_folds : list of int, optional
        Train only these folds (0-based) in this call, e.g. to spread a study over
        several sessions or machines sharing the results folder; the tables cover the
        folds finished so far. None: every fold.
    checkpoints : bool
        Save each (arm, fold)'s model and optimiser after every epoch, so that an
        interrupted run resumes from its last epoch. Off, an interrupted run starts
        again (finished runs are still kept); for a one-shot run, where saving
        Xception-65's model and Adam state (about 0.6 GB) every epoch costs time.
    """

    data: str
    out: str
    classes: Optional[List[str]] = None
    tile: int = 512
    stride: Optional[int] = None
    downscale: int = 1
    data_cache: Optional[str] = None
    min_pixels: int = 1
    ignore_index: Optional[int] = None
    image_dir: Optional[str] = None
    mask_dir: Optional[str] = None
    stem_key: Optional[str] = None
    valid_dir: Optional[str] = None
    min_valid: Optional[float] = None
    folds: int = 3
    epochs: int = 10
    batch_size: int = 8
    lr: float = 8e-3
    model: str = "smp-unet-xception65"
    encoder: Optional[str] = None
    encoder_weights: Optional[str] = None
    arms: List[str] = dataclasses.field(default_factory=lambda: list(DEFAULT_ARMS))
    target: object = "rare_boost"
    gamma: Optional[float] = None
    undersample: bool = False
    rfs_threshold: float = 0.3
    epoch_size: object = "train"
    loss: str = "focal"
    head_prior: Optional[float] = None
    focal_gamma: float = 2.0
    focal_alpha: Optional[float] = None
    augment: bool = True
    max_tiles: Optional[int] = None
    max_images: Optional[int] = None
    cache_images: bool = False
    device: str = "cpu"
    seed: int = 0
    num_workers: int = 0
    threads: Optional[int] = None
    progress: bool = True
    amp: Optional[str] = None
    channels_last: bool = False
    max_minutes: Optional[float] = None
    checkpoints: bool = True
    only_folds: Optional[List[int]] = None

    def validate(self) -> "ExperimentConfig":
        """Check every field; return self. Raises ValueError naming the field.

        The target is checked against the class names when the study opens the data.
        """
        def positive_int(name, value, allow_none=False):
            if value is None and allow_none:
                return
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

        for name in ("tile", "downscale", "min_pixels", "epochs", "batch_size"):
            positive_int(name, getattr(self, name))
        for name in ("stride", "max_tiles", "max_images"):
            positive_int(name, getattr(self, name), allow_none=True)
        if not isinstance(self.folds, int) or self.folds < 2:
            raise ValueError(f"folds must be an integer >= 2, got {self.folds!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if self.only_folds is not None:
            if (not self.only_folds or len(set(self.only_folds)) != len(self.only_folds)
                    or any(isinstance(f, bool) or not isinstance(f, (int, np.integer)) or not 0 <= f < self.folds
                           for f in self.only_folds)):
                raise ValueError(f"only_folds must list distinct folds in [0, {self.folds}), "
                                 f"got {self.only_folds!r}")
        if not self.arms:
            raise ValueError(f"arms must name at least one of {list(ARMS)}, got {self.arms!r}")
        for arm in self.arms:
            if arm not in ARMS:
                raise ValueError(f"arms must be among {list(ARMS)}, got {arm!r}")
        if len(set(self.arms)) != len(self.arms):
            raise ValueError(f"arms must not repeat, got {self.arms!r}")
        if not (isinstance(self.epoch_size, int) and self.epoch_size >= 1) and self.epoch_size not in ("train", "plan"):
            raise ValueError(f"epoch_size must be 'train', 'plan' or a positive integer, got {self.epoch_size!r}")
        if not (0 < float(self.rfs_threshold) <= 1):
            raise ValueError(f"rfs_threshold must be in (0, 1], got {self.rfs_threshold!r}")
        if self.gamma is not None and not (float(self.gamma) >= 0):
            raise ValueError(f"gamma must be >= 0 or None, got {self.gamma!r}")
        positive_int("threads", self.threads, allow_none=True)
        if not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise ValueError(f"num_workers must be a non-negative integer, got {self.num_workers!r}")
        if self.min_valid is not None and not (isinstance(self.min_valid, (int, float)) and 0 < self.min_valid <= 1):
            raise ValueError(f"min_valid must be a share in (0, 1], got {self.min_valid!r}")
        if self.downscale > 1 and (self.valid_dir is not None or self.min_valid is not None):
            raise ValueError(f"valid_dir and min_valid apply with downscale=1 only (the shrunk copy has no "
                             f"valid region), got downscale={self.downscale}")
        if self.head_prior is not None and not (isinstance(self.head_prior, (int, float))
                                                and 0.0 < self.head_prior < 1.0):
            raise ValueError(f"head_prior must be a probability in (0, 1) or None, got {self.head_prior!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {list(LOSSES)}, got {self.loss!r}")
        if self.amp is not None and self.amp not in AMP_MODES:
            raise ValueError(f"amp must be one of {list(AMP_MODES)} or None, got {self.amp!r}")
        if self.max_minutes is not None and not (isinstance(self.max_minutes, (int, float))
                                                 and not isinstance(self.max_minutes, bool)
                                                 and math.isfinite(self.max_minutes) and self.max_minutes > 0):
            raise ValueError(f"max_minutes must be a positive number of minutes or None, got {self.max_minutes!r}")
        if self.classes is not None and (not self.classes or len(set(self.classes)) != len(self.classes)):
            raise ValueError(f"classes must be a non-empty list of distinct names, got {self.classes!r}")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        """Hash of the fields that decide what an (arm, fold) result holds.

        Fields left at None are not hashed, so that an option added later (default
        None) does not invalidate finished results.
        """
        d = {k: v for k, v in self.to_dict().items() if k not in RUNTIME_FIELDS and v is not None}
        d["data"] = os.path.abspath(d["data"])
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def derived_seed(config: ExperimentConfig, *parts) -> int:
    """A 63-bit seed from the run seed and a path of names / numbers (stable across runs).

    Each stage draws from its own path (``"folds"``, ``("order", arm, fold)``, ...), so
    adding an arm or an epoch changes no other stage's stream.
    """
    words = [int(config.seed)]
    for p in parts:
        words.append(int(p) if isinstance(p, (int, np.integer)) else
                     int.from_bytes(hashlib.sha256(str(p).encode()).digest()[:4], "little"))
    return int(np.random.SeedSequence(words).generate_state(2, dtype=np.uint32).view(np.uint64)[0] >> np.uint64(1))


@contextlib.contextmanager
def deterministic(device_type: str, threads: Optional[int] = None):
    """torch's deterministic algorithms (and ``threads`` CPU threads) inside the block.

    On CUDA, cuDNN benchmarking is switched off and ``CUBLAS_WORKSPACE_CONFIG`` set
    (when unset); operations without a deterministic CUDA kernel only warn. The
    previous settings are restored on exit.
    """
    import torch

    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    previous = torch.are_deterministic_algorithms_enabled()
    previous_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    if device_type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True, warn_only=device_type != "cpu")
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=previous_warn)
        torch.set_num_threads(previous_threads)
