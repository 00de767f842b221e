"""The fundus study: train a U-Net on each balancing arm and compare per-class Dice.

For every fold of a multi-label stratified K-fold over images (the tiles of one image
stay on one side) and every *arm*, a training set is formed from the fold's training
tiles, a model is trained from the same initial weights with focal loss and Adam, and
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

Duplicates (``copy_index > 0``) are augmented (elastic transform and flips); originals
are not. Every arm of a fold sees the same number of samples per epoch by default
(``epoch_size="train"``: the fold's number of training tiles), so arms differ in what
they see, not in how many steps they take.

Results folder
--------------
``config.json``, ``table1.{md,csv,json}`` (class presence per arm),
``table2.{md,csv,json}`` (per class the maximum Dice over epochs, and the maximum
vDice, mean and std over folds), ``curves_<class>.png`` for the two rarest classes and
``curves_vdice.png``, and ``runs/<arm>/fold<k>.json`` with every epoch's figures. A
finished (arm, fold) is never retrained; an interrupted one resumes from its last
finished epoch (``runs/<arm>/fold<k>.ckpt.pt``). Every file is written atomically.

Determinism
-----------
On CPU the same configuration, seed and thread count give identical results:
``torch.use_deterministic_algorithms(True)`` is on during training, the initial weights
are seeded per fold, the sample order per (arm, fold, epoch) and the augmentation per
(seed, sample, copy index), and a resumed run equals an uninterrupted one. A different
number of CPU threads may change float reductions in convolutions and hence the last
digits.

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
import contextlib
import csv
import dataclasses
import hashlib
import io
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .._atomic import atomic_path, atomic_write_text
from .folds import MultilabelStratifiedKFold
from .rfs import repeat_factor_copies

__all__ = ["ARMS", "DEFAULT_ARMS", "ExperimentConfig", "run_experiment", "add_experiment_parser",
           "experiment_handler", "run_from_args", "main", "arm_plan", "downscale_folder"]

ARMS = ("unbalanced", "balanced_noreg", "balanced_reg", "exact", "rfs")
DEFAULT_ARMS = ("unbalanced", "balanced_noreg", "balanced_reg")
ARM_TITLES = {
    "unbalanced": "unbalanced",
    "balanced_noreg": "balanced, no reg.",
    "balanced_reg": "balanced, reg.",
    "exact": "balanced, exact",
    "rfs": "repeat-factor",
}
_RESULT_VERSION = 1
# Config fields that do not change what a finished (arm, fold) holds: changing them
# between an interrupted run and its resumption is allowed.
_RUNTIME_FIELDS = ("out", "data_cache", "arms", "device", "num_workers", "threads", "progress", "cache_images")


@dataclasses.dataclass
class ExperimentConfig:
    """Everything that defines a study; stored as ``config.json`` in the results folder.

    Parameters
    ----------
    data : str
        Dataset folder: ``images/`` and ``masks/<class>/`` (one binary PNG per image
        holding the class; a missing file means the class is absent), as IDRiD ships;
        or ``images/`` and ``masks/<id>.png`` label maps of class ids (names from
        ``classes`` or ``classes.txt``), trained with the softmax focal loss.
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
    target : str or dict
        Balancer target (``"rare_boost"``, ``"equal"``, ``"all"``, or {class: fraction}).
    gamma : float, optional
        Regularizer weight of the regularized arms; None: the Balancer's default.
    undersample : bool
        Let the balancer drop tiles of over-represented patterns; by default a
        balanced set is the training tiles plus duplicates.
    rfs_threshold : float
        Repeat-factor threshold ``t`` of the ``rfs`` arm.
    epoch_size : "train", "plan" or int
        Samples per epoch: the fold's training tile count (same for every arm), each
        arm's own plan size, or a fixed number. Drawn from the arm's plan in shuffled
        passes.
    focal_gamma, focal_alpha
        Focal loss parameters (``focal_alpha``, the weight of sigmoid positives, for
        multi-label masks only).
    augment : bool
        Augment duplicates (elastic transform and flips).
    max_tiles, max_images : int, optional
        Use a seeded random subset of the tiles / images (quick runs).
    cache_images : bool
        Keep every decoded image in memory (for datasets that fit, e.g. downscaled).
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

    def validate(self) -> "ExperimentConfig":
        """Check every field; return self. Raises ValueError naming the field."""
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
        d = {k: v for k, v in self.to_dict().items() if k not in _RUNTIME_FIELDS and v is not None}
        d["data"] = os.path.abspath(d["data"])
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


# -- seeds ------------------------------------------------------------------------------------


def _seed(config: ExperimentConfig, *parts) -> int:
    """A 63-bit seed from the run seed and a path of names / numbers (stable across runs)."""
    words = [int(config.seed)]
    for p in parts:
        words.append(int(p) if isinstance(p, (int, np.integer)) else
                     int.from_bytes(hashlib.sha256(str(p).encode()).digest()[:4], "little"))
    return int(np.random.SeedSequence(words).generate_state(2, dtype=np.uint32).view(np.uint64)[0] >> np.uint64(1))


# -- data -----------------------------------------------------------------------------------------


_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")


def _check_data_folder(data: Path) -> Tuple[Path, Path]:
    if not data.exists():
        raise ValueError(f"data folder {str(data)!r} does not exist")
    if not data.is_dir():
        raise ValueError(f"data folder {str(data)!r} is not a folder")
    images, masks = data / "images", data / "masks"
    if not images.is_dir() or not any(p.suffix.lower() in _IMAGE_SUFFIXES for p in images.iterdir()):
        raise ValueError(f"data folder {str(data)!r} has no images: expected image files under {str(images)!r}")
    if not masks.is_dir() or not any(p.is_dir() or p.suffix.lower() in _IMAGE_SUFFIXES for p in masks.iterdir()):
        raise ValueError(f"data folder {str(data)!r} has no masks: expected one folder per class, or one "
                         f"label-map file per image, under {str(masks)!r}")
    return images, masks


def _is_label_map_folder(masks: Path) -> bool:
    """Label-map layout: mask files directly under ``masks/`` (and no class folders)."""
    return not any(p.is_dir() and not p.name.startswith(".") for p in masks.iterdir())


def _class_names(masks: Path, classes: Optional[Sequence[str]]) -> List[str]:
    found = sorted(p.name for p in masks.iterdir() if p.is_dir() and not p.name.startswith("."))
    if classes is None:
        return found
    missing = [c for c in classes if c not in found]
    if missing:
        raise ValueError(f"classes {missing} have no folder under {str(masks)!r} (found {found})")
    return list(classes)


def downscale_folder(src, dst, factor: int, class_names: Sequence[str], *, progress: bool = False) -> Path:
    """Write a copy of an images + per-class masks folder shrunk by an integer factor.

    Images are averaged over ``factor x factor`` blocks (PIL's box filter) and saved as
    PNG (lossless); masks are max-pooled over the same blocks, so that a lesion pixel
    survives. Sizes not divisible by ``factor`` lose their last rows / columns. A file
    already present in ``dst`` is kept, so an interrupted preparation resumes; every
    file is written atomically.

    Parameters
    ----------
    src, dst : path
        Source folder (``images/``, ``masks/<class>/``) and destination folder.
    factor : int
        Shrink factor, >= 2.
    class_names : sequence of str
        Mask folders to copy.

    Returns
    -------
    Path
        ``dst``.

    Raises
    ------
    ValueError
        A mask without an image of the same stem, or a mask whose size differs from
        its image's (the message names the file).
    """
    from PIL import Image

    src, dst = Path(src), Path(dst)
    images, masks = _check_data_folder(src)
    by_stem = {p.stem: p for p in sorted(images.iterdir()) if p.suffix.lower() in _IMAGE_SUFFIXES}
    sizes = {}
    for name in class_names:
        for mask_path in sorted((masks / name).iterdir()):
            if mask_path.suffix.lower() not in _IMAGE_SUFFIXES:
                continue
            if mask_path.stem not in by_stem:
                raise ValueError(f"mask {mask_path} has no image in {images} (no {mask_path.stem}.* file)")
    items = list(by_stem.items())
    bar = _progress(items, progress, desc=f"downscale x{factor}")
    for stem, image_path in bar:
        out_image = dst / "images" / f"{stem}.png"
        with Image.open(image_path) as im:
            size = im.size
            if not out_image.exists():
                w, h = size[0] // factor, size[1] // factor
                small = im.convert("RGB").crop((0, 0, w * factor, h * factor)).resize((w, h), Image.Resampling.BOX)
                with atomic_path(out_image, suffix=".png") as tmp:
                    small.save(tmp, format="PNG")
        sizes[stem] = size
        for name in class_names:
            mask_path = next((p for p in (masks / name).glob(f"{stem}.*") if p.suffix.lower() in _IMAGE_SUFFIXES),
                             None)
            if mask_path is None:
                continue
            out_mask = dst / "masks" / name / f"{stem}.png"
            with Image.open(mask_path) as mk:
                if mk.size != size:
                    raise ValueError(f"mask {mask_path} is {mk.size[1]} x {mk.size[0]} (height x width) but "
                                     f"its image {image_path} is {size[1]} x {size[0]}")
                if out_mask.exists():
                    continue
                m = np.asarray(mk.convert("L")) > 0
            w, h = size[0] // factor, size[1] // factor
            pooled = m[: h * factor, : w * factor].reshape(h, factor, w, factor).any(axis=(1, 3))
            with atomic_path(out_mask, suffix=".png") as tmp:
                Image.fromarray(pooled).save(tmp, format="PNG")  # bool -> 1-bit PNG, as IDRiD ships
    return dst


class TileSet:
    """The tiles of a dataset folder: presence per tile, their image, and tile loading.

    A thin layer over :class:`cobalance.folders.MaskFolder`, in either of its layouts:
    per-class binary mask folders (IDRiD's; multi-label masks) or one label map per
    image (class ids; ``classes.txt`` or ``class_names`` names them).

    Attributes
    ----------
    presence : ndarray of bool, shape (n_tiles, n_classes)
    image_of : ndarray of int64, shape (n_tiles,)
        Index of each tile's image in ``image_ids``.
    image_ids : list of str
    class_names : list of str
    label_map : bool
        True for the label-map layout.
    """

    def __init__(self, root, class_names: Optional[Sequence[str]], *, tile: int, stride: Optional[int],
                 min_pixels: int, ignore_index: Optional[int] = None):
        from cobalance.folders import MaskFolder

        self.root = Path(root)
        self.folder = MaskFolder(self.root, layout="auto", class_names=class_names, tile=tile,
                                 stride=stride or tile, min_pixels=min_pixels, ignore_index=ignore_index)
        self.class_names = list(self.folder.class_names)
        self.label_map = self.folder.layout == "label_map"
        self.ignore_index = ignore_index
        scan = self.folder.scan()
        self.presence = np.asarray(scan.presence, dtype=bool)
        self.image_of = np.asarray(scan.origins[:, 0], dtype=np.int64)
        self.image_ids = list(self.folder.image_ids)
        self._cache: Dict[int, Tuple[np.ndarray, np.ndarray]] = {}
        self.cache_images = False

    def __len__(self) -> int:
        return int(self.presence.shape[0])

    def load(self, k: int) -> Tuple[np.ndarray, np.ndarray]:
        """(image H x W x 3 uint8, mask) of tile ``k``: mask C x H x W of 0/1, or H x W ids.

        With ``cache_images`` set, every decoded image and mask is kept in memory (for
        small, downscaled datasets read in random tile order); otherwise only the last
        one is (the folder's own cache).
        """
        if not self.cache_images:
            return self.folder.sample(int(k))
        i, y, x = (int(v) for v in self.folder.origins[k])
        if i not in self._cache:
            self._cache[i] = (self.folder.load_image(i), self.folder.load_mask(i))
        image, mask = self._cache[i]
        th, tw = self.folder.tile
        return image[y:y + th, x:x + tw], mask[..., y:y + th, x:x + tw]


class _TorchTiles:
    """A map-style dataset over chosen tiles: (image float 3xHxW in [0, 1], mask).

    The mask is float C x H x W of 0/1 (multi-label) or int64 H x W class ids.
    """

    def __init__(self, tiles: TileSet, indices: np.ndarray):
        self.tiles, self.indices = tiles, np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return int(self.indices.size)

    def __getitem__(self, i):
        import torch

        image, mask = self.tiles.load(self.indices[i])
        x = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float().div_(255.0)
        if self.tiles.label_map:
            return x, torch.from_numpy(np.ascontiguousarray(mask, dtype=np.int64))
        return x, torch.from_numpy(np.ascontiguousarray(mask > 0)).float()


# -- plans --------------------------------------------------------------------------------------


def _balancer_plan(arm: str, presence: np.ndarray, config: ExperimentConfig, fold: int, class_names):
    import cobalance
    from cobalance import Balancer

    table = cobalance.PatternTable.from_labels(presence, class_names=list(class_names))
    # the method paper's arms: squared fraction error, its size rules and 50-copy cap
    kwargs = dict(target=config.target, objective="fraction", budget=None, max_copies=50,
                  allow_undersampling=config.undersample, random_state=_seed(config, "balance", arm, fold))
    if arm == "balanced_noreg":
        kwargs.update(regularizer="none")
    else:
        kwargs.update(regularizer="proportions", solver="exact" if arm == "exact" else "adam")
        if config.gamma is not None:
            kwargs["gamma"] = float(config.gamma)
    balancer = Balancer(**kwargs)
    balancer.fit(table)
    info = {"target": [float(v) for v in balancer.target_], "loss": float(balancer.loss_)}
    gap = getattr(balancer, "optimality_gap_", None)
    if gap is not None:
        info["optimality_gap"] = float(gap)
    return balancer.plan_, info


def arm_plan(arm: str, presence: np.ndarray, config: ExperimentConfig, fold: int, class_names):
    """The :class:`cobalance.Plan` of one arm over a fold's training tiles.

    Returns
    -------
    plan : cobalance.Plan
    info : dict
        For the balancer arms its resolved target, final loss and (Adam) optimality
        gap; for ``rfs`` the threshold; empty for ``unbalanced``.
    """
    import cobalance

    if arm == "unbalanced":
        return cobalance.Plan.identity(presence.shape[0]), {}
    if arm == "rfs":
        copies = repeat_factor_copies(presence, config.rfs_threshold, random_state=_seed(config, "rfs", fold))
        return cobalance.Plan.from_copies(copies), {"rfs_threshold": float(config.rfs_threshold)}
    return _balancer_plan(arm, presence, config, fold, class_names)


def _epoch_positions(n_plan: int, epoch_size: int, seed: int) -> np.ndarray:
    """``epoch_size`` positions into the plan: shuffled passes over it, the last cut short."""
    rng = np.random.default_rng(seed)
    passes = -(-epoch_size // n_plan)
    return np.concatenate([rng.permutation(n_plan) for _ in range(passes)])[:epoch_size]


# -- training -------------------------------------------------------------------------------------


@contextlib.contextmanager
def _deterministic(device_type: str, threads: Optional[int] = None):
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


def _progress(iterable, enabled: bool, **kwargs):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, dynamic_ncols=True, **kwargs)


_IMAGE_MEAN = (0.485, 0.456, 0.406)  # ImageNet statistics, what timm/smp encoders expect
_IMAGE_STD = (0.229, 0.224, 0.225)


def _normalize(x):
    import torch

    mean = torch.tensor(_IMAGE_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(_IMAGE_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


def _evaluate(model, loader, n_classes: int, device, ignore_index: Optional[int] = None) -> Tuple[List[float], float]:
    import torch
    from cobalance.segmentation import DiceMeter

    # Multi-label: sigmoid > 0.5 per class; label maps: argmax over classes.
    meter = DiceMeter(n_classes, mode="global", absent="skip", pred_format="logits", threshold=0.5,
                      ignore_index=ignore_index)
    model.eval()
    with torch.no_grad():
        for x, m in loader:
            logits = model(_normalize(x.to(device)))
            meter.update(logits, m.to(device))
    result = meter.compute()
    return [float(v) for v in result.per_class.cpu()], float(result.vdice.cpu())


def _nan_to_none(values):
    return [None if (v is None or (isinstance(v, float) and math.isnan(v))) else v for v in values]


def _train_arm_fold(arm: str, fold: int, tiles: TileSet, train_idx: np.ndarray, test_idx: np.ndarray,
                    config: ExperimentConfig, run_dir: Path, result_path: Path) -> dict:
    import torch
    from torch.utils.data import DataLoader

    from cobalance.segmentation import BalancedDataset, DuplicateAugmentation

    from .losses import FocalLoss
    from .models import create_model

    device = torch.device(config.device)
    class_names = tiles.class_names
    n_classes = len(class_names)
    presence = tiles.presence[train_idx]
    plan, plan_info = arm_plan(arm, presence, config, fold, class_names)
    indices = plan.indices()
    if indices.size == 0:
        raise ValueError(f"arm {arm!r}, fold {fold}: the plan keeps no training tile")
    epoch_size = {"train": train_idx.size, "plan": indices.size}.get(config.epoch_size, config.epoch_size)

    train_set = BalancedDataset(_TorchTiles(tiles, train_idx), plan, with_source=True)
    test_loader = DataLoader(_TorchTiles(tiles, test_idx), batch_size=config.batch_size * 2, shuffle=False,
                             num_workers=config.num_workers)
    augment = DuplicateAugmentation(seed=_seed(config, "augment", fold)) if config.augment else None

    torch.manual_seed(_seed(config, "init", fold))  # the same initial weights for every arm of a fold
    model = create_model(config.model, in_channels=3, classes=n_classes, encoder=config.encoder,
                         encoder_weights_path=config.encoder_weights).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    if tiles.label_map:
        loss_fn = FocalLoss("multiclass", gamma=config.focal_gamma, ignore_index=config.ignore_index)
    else:
        loss_fn = FocalLoss("multilabel", gamma=config.focal_gamma, alpha=config.focal_alpha)

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
    for epoch in range(len(history), config.epochs):
        t0 = time.perf_counter()
        model.train()
        positions = _epoch_positions(indices.size, epoch_size, _seed(config, "order", arm, fold, epoch))
        loader = DataLoader(train_set, batch_size=config.batch_size, sampler=positions.tolist(),
                            num_workers=config.num_workers, pin_memory=device.type == "cuda")
        total, count = 0.0, 0
        batches = _progress(loader, config.progress, desc=f"{arm} fold {fold} epoch {epoch + 1}/{config.epochs}",
                            leave=False)
        for x, m, sample, copy_index in batches:
            x, m = x.to(device), m.to(device)
            if augment is not None:
                # Seeded by the tile's id in the whole dataset: a duplicate is augmented
                # the same way whatever the fold, batch or position it lands in.
                x, m = augment(x, m, torch.as_tensor(train_idx)[sample], copy_index)
            loss = loss_fn(model(_normalize(x)), m)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * x.shape[0]
            count += x.shape[0]
        dice, vd = _evaluate(model, test_loader, n_classes, device, config.ignore_index)
        history.append({"epoch": epoch + 1, "train_loss": total / max(count, 1), "dice": _nan_to_none(dice),
                        "vdice": None if math.isnan(vd) else vd, "seconds": time.perf_counter() - t0})
        with atomic_path(checkpoint, suffix=".pt") as tmp:
            torch.save({"fingerprint": fingerprint, "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(), "history": history}, tmp)

    def best(values):
        values = [v for v in values if v is not None]
        return max(values) if values else None

    result = {
        "version": _RESULT_VERSION,
        "fingerprint": fingerprint,
        "arm": arm,
        "fold": fold,
        "classes": class_names,
        "device": str(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "n_train_tiles": int(train_idx.size),
        "n_test_tiles": int(test_idx.size),
        "n_train_images": int(np.unique(tiles.image_of[train_idx]).size),
        "n_test_images": int(np.unique(tiles.image_of[test_idx]).size),
        "test_images": sorted({tiles.image_ids[i] for i in tiles.image_of[test_idx]}),
        "plan_size": int(indices.size),
        "plan_duplicates": int(indices.size - np.count_nonzero(plan.copies)),
        "plan_max_copies": int(plan.copies.max()),
        "plan_dropped": int(np.count_nonzero(plan.copies == 0)),
        "plan_info": plan_info,
        "epoch_size": int(epoch_size),
        "presence_before": presence.mean(axis=0).tolist(),
        "presence": (presence.astype(np.float64) * plan.copies[:, None]).sum(axis=0).tolist(),
        "history": history,
        "best_dice": [best([h["dice"][c] for h in history]) for c in range(n_classes)],
        "best_vdice": best([h["vdice"] for h in history]),
        "seconds": seconds_before + time.perf_counter() - started,
    }
    result["presence"] = [v / indices.size for v in result["presence"]]
    atomic_write_text(result_path, json.dumps(result, indent=1))
    with contextlib.suppress(FileNotFoundError):
        checkpoint.unlink()
    return result


# -- the study ------------------------------------------------------------------------------------


def _load_config_guard(out: Path, config: ExperimentConfig) -> None:
    """Refuse to mix results of a different configuration in one folder."""
    path = out / "config.json"
    if not path.exists():
        return
    try:
        old = json.loads(path.read_text())
    except ValueError as err:
        raise ValueError(f"{str(path)!r} is not valid JSON ({err}); remove it or choose another --out") from err
    new = config.to_dict()
    for key, value in new.items():
        if key in _RUNTIME_FIELDS:
            continue
        old_value = old.get(key)
        if key == "data":
            same = os.path.abspath(str(old_value)) == os.path.abspath(value)
        else:
            same = json.dumps(old_value, sort_keys=True, default=str) == json.dumps(value, sort_keys=True, default=str)
        if not same:
            raise ValueError(f"results folder {str(out)!r} holds a run with {key}={old_value!r}, this one has "
                             f"{key}={value!r}; use another --out to keep both")


def _select(tiles: TileSet, config: ExperimentConfig) -> np.ndarray:
    keep = np.arange(len(tiles))
    if config.max_images is not None and config.max_images < len(tiles.image_ids):
        chosen = np.random.default_rng(_seed(config, "images")).choice(len(tiles.image_ids), config.max_images,
                                                                       replace=False)
        keep = keep[np.isin(tiles.image_of[keep], chosen)]
    if config.max_tiles is not None and config.max_tiles < keep.size:
        keep = np.sort(np.random.default_rng(_seed(config, "tiles")).choice(keep, config.max_tiles, replace=False))
    return keep


def run_experiment(config: ExperimentConfig) -> dict:
    """Run (or resume) the study and write the results folder.

    Parameters
    ----------
    config : ExperimentConfig

    Returns
    -------
    dict
        ``{"config", "classes", "rarest", "runs": {arm: [fold results]}, "table1",
        "table2", "files"}``: the per-(arm, fold) results and both tables as
        dictionaries, and the paths written.

    Raises
    ------
    ValueError
        Bad configuration; a data folder that is missing, empty, has a mask without an
        image or of another size (naming the file); a results folder of another
        configuration.
    ImportError
        torch, or segmentation_models_pytorch for an ``smp-`` model, missing.
    """
    config.validate()
    import torch  # noqa: F401  (fail early with torch's own ImportError)

    from .models import create_model

    out = Path(config.out)
    data = Path(config.data)
    _, masks = _check_data_folder(data)
    label_map = _is_label_map_folder(masks)
    if label_map and config.downscale > 1:
        raise ValueError(f"downscale={config.downscale} applies to per-class binary mask folders only; "
                         f"{str(masks)!r} holds label maps (shrink them with nearest-neighbour resampling first)")
    if config.ignore_index is not None and not label_map:
        raise ValueError(f"ignore_index={config.ignore_index} applies to label-map masks only; {str(masks)!r} "
                         "holds per-class folders")
    # Opening the folder checks every mask against its image before any work is done.
    if label_map and config.focal_alpha is not None:
        raise ValueError(f"focal_alpha={config.focal_alpha} weighs sigmoid positives; it does not apply to "
                         f"label maps (softmax focal loss)")
    tiles = None
    if label_map:
        tiles = TileSet(data, config.classes, tile=config.tile, stride=config.stride,
                        min_pixels=config.min_pixels, ignore_index=config.ignore_index)
        class_names = tiles.class_names
    else:
        class_names = _class_names(masks, config.classes)
    # Build the model once up front: a wrong name or a missing smp fails before any work.
    create_model(config.model, in_channels=3, classes=len(class_names), encoder=config.encoder,
                 encoder_weights_path=config.encoder_weights)
    out.mkdir(parents=True, exist_ok=True)
    _load_config_guard(out, config)
    atomic_write_text(out / "config.json", json.dumps(config.to_dict(), indent=1, default=str))

    root = data
    if config.downscale > 1:
        cache = Path(config.data_cache) if config.data_cache else out / f"data-{config.downscale}x"
        root = downscale_folder(data, cache, config.downscale, class_names,
                                progress=config.progress)
    if tiles is None:
        tiles = TileSet(root, class_names, tile=config.tile, stride=config.stride, min_pixels=config.min_pixels)
    tiles.cache_images = config.cache_images
    keep = _select(tiles, config)
    if keep.size < config.folds:
        raise ValueError(f"only {keep.size} tiles to split into folds={config.folds}")
    presence = tiles.presence[keep]
    fold_of = MultilabelStratifiedKFold(config.folds, random_state=_seed(config, "folds")).assign(
        presence, groups=tiles.image_of[keep])

    runs: Dict[str, List[dict]] = {arm: [] for arm in config.arms}
    jobs = [(arm, fold) for fold in range(config.folds) for arm in config.arms]
    with _deterministic(torch.device(config.device).type, config.threads):
        for arm, fold in _progress(jobs, config.progress, desc="arms x folds"):
            run_dir = out / "runs" / arm
            result_path = run_dir / f"fold{fold}.json"
            result = _finished(result_path, config)
            if result is None:
                result = _train_arm_fold(arm, fold, tiles, keep[fold_of != fold], keep[fold_of == fold], config,
                                         run_dir, result_path)
            runs[arm].append(result)

    share = presence.mean(axis=0)
    rarest = [class_names[c] for c in np.argsort(share, kind="stable")[:2]]
    table1 = _table1(runs, class_names, share, len(keep))
    table2 = _table2(runs, class_names)
    files = _write_tables(out, table1, table2, class_names, config)
    files += _plot_curves(out, runs, class_names, rarest)
    return {"config": config.to_dict(), "classes": class_names, "rarest": rarest, "runs": runs,
            "table1": table1, "table2": table2, "files": [str(f) for f in files]}


def _finished(path: Path, config: ExperimentConfig) -> Optional[dict]:
    if not path.exists():
        return None
    try:
        result = json.loads(path.read_text())
    except ValueError:
        return None  # unreadable (cannot happen with atomic writes, but never trust it): retrain
    if result.get("version") != _RESULT_VERSION or result.get("fingerprint") != config.fingerprint():
        return None
    if len(result.get("history", [])) != config.epochs:
        return None
    return result


# -- tables and figures ------------------------------------------------------------------------


def _mean_std(values: Sequence[Optional[float]]) -> Tuple[Optional[float], Optional[float], int]:
    v = np.array([x for x in values if x is not None], dtype=np.float64)
    if v.size == 0:
        return None, None, 0
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0, int(v.size)


def _table1(runs, class_names, share, n_tiles) -> dict:
    rows = [{"set": "all tiles", "size": float(n_tiles), **{c: float(share[i]) for i, c in enumerate(class_names)}}]
    for arm, results in runs.items():
        row = {"set": arm, "size": float(np.mean([r["plan_size"] for r in results]))}
        for i, c in enumerate(class_names):
            row[c] = float(np.mean([r["presence"][i] for r in results]))
        rows.append(row)
    return {"description": "share of tiles containing each class in the training set of each arm "
                           "(mean over folds; 'all tiles' is the whole tiled dataset); size: tiles per set",
            "classes": list(class_names), "rows": rows}


def _table2(runs, class_names) -> dict:
    metrics = list(class_names) + ["vDice"]
    cells = {}
    for arm, results in runs.items():
        cells[arm] = {}
        for i, name in enumerate(metrics):
            values = [r["best_vdice"] if name == "vDice" else r["best_dice"][i] for r in results]
            mean, std, n = _mean_std(values)
            cells[arm][name] = {"mean": mean, "std": std, "n_folds": n, "folds": values}
    return {"description": "per class the maximum test Dice over epochs, and the maximum vDice over "
                           "epochs; mean and sample std over folds",
            "metrics": metrics, "arms": list(runs), "cells": cells}


def _fmt(x: Optional[float], digits: int = 4) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _table1_markdown(t1) -> str:
    classes = t1["classes"]
    lines = ["| set | tiles | " + " | ".join(classes) + " |", "|---|---:|" + "---:|" * len(classes)]
    for row in t1["rows"]:
        lines.append(f"| {row['set']} | {row['size']:.0f} | " +
                     " | ".join(f"{100 * row[c]:.1f}%" for c in classes) + " |")
    return "\n".join(lines) + "\n"


def _table2_markdown(t2) -> str:
    arms = t2["arms"]
    lines = ["| class | " + " | ".join(ARM_TITLES.get(a, a) for a in arms) + " |", "|---|" + "---:|" * len(arms)]
    for metric in t2["metrics"]:
        means = [t2["cells"][a][metric]["mean"] for a in arms]
        known = [m for m in means if m is not None]
        # Bold the best arm(s), unless every arm has the same mean.
        top = max(known) if known and min(known) != max(known) else None
        cells = []
        for a, m in zip(arms, means):
            s = f"{_fmt(m)} ± {_fmt(t2['cells'][a][metric]['std'])}"
            cells.append(f"**{s}**" if top is not None and m == top else s)
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _write_tables(out: Path, t1: dict, t2: dict, class_names, config) -> List[Path]:
    files = []
    header = f"<!-- {t1['description']} -->\n"
    atomic_write_text(out / "table1.md", header + _table1_markdown(t1))
    atomic_write_text(out / "table1.json", json.dumps(t1, indent=1))
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["set", "size"] + list(class_names))
    for row in t1["rows"]:
        w.writerow([row["set"], f"{row['size']:.1f}"] + [f"{row[c]:.6f}" for c in class_names])
    atomic_write_text(out / "table1.csv", buf.getvalue())
    header = f"<!-- {t2['description']} -->\n"
    atomic_write_text(out / "table2.md", header + _table2_markdown(t2))
    atomic_write_text(out / "table2.json", json.dumps(t2, indent=1))
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["metric"] + [f"{a}_{s}" for a in t2["arms"] for s in ("mean", "std")])
    for metric in t2["metrics"]:
        row = [metric]
        for a in t2["arms"]:
            cell = t2["cells"][a][metric]
            row += ["" if cell["mean"] is None else f"{cell['mean']:.6f}",
                    "" if cell["std"] is None else f"{cell['std']:.6f}"]
        w.writerow(row)
    atomic_write_text(out / "table2.csv", buf.getvalue())
    files += [out / f"table{i}.{ext}" for i in (1, 2) for ext in ("md", "json", "csv")]
    return files


def _plot_curves(out: Path, runs, class_names, rarest) -> List[Path]:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    files = []
    for metric in list(rarest) + ["vDice"]:
        fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=110)
        for arm, results in runs.items():
            if metric == "vDice":
                curves = [[np.nan if h["vdice"] is None else h["vdice"] for h in r["history"]] for r in results]
            else:
                c = class_names.index(metric)
                curves = [[np.nan if h["dice"][c] is None else h["dice"][c] for h in r["history"]] for r in results]
            arr = np.array(curves, dtype=np.float64)
            epochs = np.arange(1, arr.shape[1] + 1)
            with np.errstate(invalid="ignore"), _quiet_nan_warnings():
                mean = np.nanmean(arr, axis=0)
                std = np.nanstd(arr, axis=0)
            line, = ax.plot(epochs, mean, marker="o", ms=3, label=ARM_TITLES.get(arm, arm))
            if arr.shape[0] > 1:
                ax.fill_between(epochs, mean - std, mean + std, color=line.get_color(), alpha=0.15, lw=0)
        ax.set_xlabel("epoch")
        ax.set_ylabel("test vDice" if metric == "vDice" else f"test Dice, {metric}")
        ax.set_title(f"{metric}: mean over folds (band: ±1 std)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / f"curves_{_file_name(metric)}.png"
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, format="png")
        plt.close(fig)
        files.append(path)
    return files


@contextlib.contextmanager
def _quiet_nan_warnings():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN epochs (a class absent everywhere)
        yield


def _file_name(metric: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in metric).lower()


# -- command line ---------------------------------------------------------------------------------


def _target_arg(text: str):
    if text in ("rare_boost", "uniform", "equal", "all", "sqrt"):
        return text
    target = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"target must be 'rare_boost', 'equal', 'all', 'sqrt' or CLASS=FRACTION,..., "
                                             f"got {text!r}")
        try:
            target[name.strip()] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"target fraction for {name!r} must be a number, got {value!r}")
    return target


def _epoch_size_arg(text: str):
    if text in ("train", "plan"):
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"epoch size must be 'train', 'plan' or an integer, got {text!r}")


def _configure_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--data", required=True, help="dataset folder: images/ and masks/<class>/ (the IDRiD layout)")
    p.add_argument("--out", required=True, help="results folder (created; an existing one is resumed)")
    p.add_argument("--classes", type=lambda s: [c for c in s.split(",") if c], default=None,
                   help="comma-separated class folders, in order (default: all, sorted)")
    p.add_argument("--tile", type=int, default=512, help="tile size in pixels (default 512)")
    p.add_argument("--stride", type=int, default=None, help="tile stride (default: the tile size)")
    p.add_argument("--downscale", type=int, default=1, help="shrink images by this integer factor first")
    p.add_argument("--data-cache", default=None, help="folder for the downscaled copy (default OUT/data-Nx)")
    p.add_argument("--min-pixels", type=int, default=1, help="pixels of a class that make it present in a tile")
    p.add_argument("--ignore-index", type=int, default=None, help="label maps: id of pixels in no class")
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
    p.add_argument("--target", type=_target_arg, default="rare_boost",
                   help="balancer target: rare_boost, equal, all, sqrt, or CLASS=FRACTION,... (default rare_boost)")
    p.add_argument("--gamma", type=float, default=None, help="regularizer weight (default: the Balancer's)")
    p.add_argument("--undersample", action="store_true", help="let the balancer drop tiles")
    p.add_argument("--rfs-threshold", type=float, default=0.3, help="repeat-factor threshold t (default 0.3)")
    p.add_argument("--epoch-size", type=_epoch_size_arg, default="train",
                   help="samples per epoch: train (fold's tile count, default), plan, or an integer")
    p.add_argument("--focal-gamma", type=float, default=2.0)
    p.add_argument("--no-augment", dest="augment", action="store_false", help="do not augment duplicates")
    p.add_argument("--max-tiles", type=int, default=None, help="use a seeded random subset of the tiles")
    p.add_argument("--max-images", type=int, default=None, help="use a seeded random subset of the images")
    p.add_argument("--cache-images", action="store_true", help="keep decoded images in memory")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, ...)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    return p


def _config_from_args(args: argparse.Namespace) -> ExperimentConfig:
    fields = {f.name for f in dataclasses.fields(ExperimentConfig)}
    return ExperimentConfig(**{k: v for k, v in vars(args).items() if k in fields})


def experiment_handler(args: argparse.Namespace, console=None) -> int:
    """Run the ``experiment`` subcommand; errors propagate (ValueError, ImportError).

    The signature is the ``cobalance`` CLI's ``handler(args, console)``; ``console``
    is not used (progress goes through tqdm, results to stdout).
    """
    result = run_experiment(_config_from_args(args))
    print(_table1_markdown(result["table1"]))
    print(_table2_markdown(result["table2"]))
    print(f"results in {args.out}")
    return 0


def run_from_args(args: argparse.Namespace) -> int:
    """Run the ``experiment`` subcommand; an error is one line on stderr and exit status 2."""
    try:
        return experiment_handler(args)
    except (ValueError, ImportError) as err:
        print(f"cobalance experiment: error: {err}", file=sys.stderr)
        return 2


def add_experiment_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``experiment`` subcommand to an ``argparse`` subparsers object.

    Two handlers are set: ``args.func(args)`` (:func:`run_from_args`, which turns errors
    into exit status 2) and ``args.handler(args, console)``
    (:func:`experiment_handler`, which lets them propagate to the caller's error
    handling). Returns the subparser.
    """
    p = subparsers.add_parser("experiment", help="train a U-Net on each balancing arm and compare per-class Dice",
                              description=__doc__.split("\n\n")[0])
    _configure_parser(p)
    p.set_defaults(func=run_from_args, handler=experiment_handler)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m cobalance.training`` / ``cobalance experiment``: parse ``argv`` and run."""
    parser = _configure_parser(argparse.ArgumentParser(prog="cobalance experiment",
                                                       description=__doc__.split("\n\n")[0]))
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
