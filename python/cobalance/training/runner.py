"""The study's arms x folds runner: opens the data, splits it into folds, trains every
(arm, fold) that has no result file yet, and writes the tables.

Resumable: each (arm, fold) has one result file, ``runs/<arm>/fold<k>.json``, kept
while the configuration's fingerprint and epoch count match (or the run was cut short
by ``max_minutes``); ``config.json`` guards the folder against a run of another
configuration.

====================  =========================================================
step                  where
====================  =========================================================
configuration         :mod:`.config` (``ExperimentConfig``, seeds, determinism)
data, tiles           :mod:`.data` (``SegmentationFolder`` over ``MaskFolder``)
folds                 :class:`.folds.MultilabelStratifiedKFold` over images
plans and reports     :mod:`.arms` (``Plan``, ``Balancer``, ``Report``)
one (arm, fold)       :mod:`.run` (``PlanSampler``, model, loss, evaluation)
tables and figures    :mod:`.tables`
====================  =========================================================
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from .._atomic import atomic_write_text
from ._progress import progress_bar
from .arms import study_target
from .config import RESULT_VERSION, RUNTIME_FIELDS, ExperimentConfig, derived_seed, deterministic
from .data import StudyTiles, open_data, select_tiles, shrunk_tiles
from .folds import MultilabelStratifiedKFold
from .run import FoldSplit, train_arm_fold
from .tables import SUMMARIES, paired_tests, plot_curves, table1, table2, write_tables

__all__ = ["run_experiment", "finished_result", "same_setting"]


def run_experiment(config: ExperimentConfig) -> dict:
    """Run (or resume) the study and write the results folder.

    Parameters
    ----------
    config : ExperimentConfig

    Returns
    -------
    dict
        ``{"config", "classes", "rarest", "runs": {arm: [fold results]}, "table1",
        "table2", "table2_last3", "paired": {summary: paired tests}, "files"}``: the
        per-(arm, fold) results and the tables as dictionaries (``table2`` by the best
        epoch, ``table2_last3`` by the mean of the last three), and the paths written.

    Raises
    ------
    ValueError
        Bad configuration or target; a data folder that is missing, empty, has a mask
        without an image or of another size (naming the file); a results folder of
        another configuration.
    ImportError
        torch, or segmentation_models_pytorch for an ``smp-`` model, missing.
    """
    config.validate()
    deadline = None if config.max_minutes is None else time.perf_counter() + 60.0 * config.max_minutes
    import torch  # noqa: F401  (fail early with torch's own ImportError)

    from .. import PatternTable
    from ..targets import resolve_target
    from .models import create_model

    out = Path(config.out)
    # Opening the folder checks every mask against its image before anything is written.
    source, folder = open_data(config)
    label_map = source.layout == "label_map"
    if label_map and config.focal_alpha is not None:
        raise ValueError(f"focal_alpha={config.focal_alpha} weighs sigmoid positives; it does not apply to "
                         f"label maps (softmax focal loss)")
    class_names = list(source.class_names)
    config = dataclasses.replace(config, target=study_target(config.target, class_names))
    # Build the model once up front: a wrong name or a missing smp fails before any work.
    create_model(config.model, in_channels=3, classes=len(class_names), encoder=config.encoder,
                 encoder_weights_path=config.encoder_weights, head_prior=config.head_prior)
    scan = dict(cache_images=config.cache_images, progress=config.progress)
    # The data as it is is scanned before anything is written (a bad label-map value
    # fails here); a shrunk copy is scanned once written.
    tiles = None if folder is None else StudyTiles.scan(folder, **scan)
    out.mkdir(parents=True, exist_ok=True)
    _check_results_folder(out, config)
    atomic_write_text(out / "config.json", json.dumps(config.to_dict(), indent=1, default=str))
    if tiles is None:
        tiles = StudyTiles.scan(shrunk_tiles(source, config, out), **scan)
    keep = select_tiles(tiles, config)
    if config.cache_images:
        # Read in tile order, each image is decoded once; the epochs' random order would
        # decode a whole image for every tile.
        tiles.items.fill(keep, progress=config.progress)
    if keep.size < config.folds:
        raise ValueError(f"only {keep.size} tiles to split into folds={config.folds}")
    presence = tiles.presence[keep]
    all_tiles = PatternTable.from_labels(presence, class_names=class_names)
    resolve_target(config.target, all_tiles)  # a target naming no class fails before training
    fold_of = MultilabelStratifiedKFold(config.folds, random_state=derived_seed(config, "folds")).assign(
        presence, groups=tiles.image_of[keep])

    splits: Dict[int, FoldSplit] = {}

    def split_of(fold: int) -> FoldSplit:
        if fold not in splits:  # one pattern table per fold, shared by its arms
            train = keep[fold_of != fold]
            splits[fold] = FoldSplit(train=train, test=keep[fold_of == fold],
                                     table=PatternTable.from_labels(tiles.presence[train], class_names=class_names))
        return splits[fold]

    runs: Dict[str, List[dict]] = {arm: [] for arm in config.arms}
    jobs = [(arm, fold) for fold in range(config.folds) for arm in config.arms]
    finished = {job: finished_result(out / "runs" / job[0] / f"fold{job[1]}.json", config) for job in jobs}
    if config.only_folds is not None:
        # Other folds' finished results still go into the tables; their missing ones wait.
        jobs = [job for job in jobs if job[1] in config.only_folds or finished[job] is not None]
    to_train = sum(finished[job] is None for job in jobs)
    with deterministic(torch.device(config.device).type, config.threads):
        for arm, fold in progress_bar(jobs, config.progress, desc="arms x folds"):
            run_dir = out / "runs" / arm
            result_path = run_dir / f"fold{fold}.json"
            result = finished[(arm, fold)]
            if result is None:
                time_limit = None
                if deadline is not None:
                    # An equal share of what is left: every run still to train gets about
                    # as many epochs, whatever the order they run in.
                    time_limit = max(deadline - time.perf_counter(), 0.0) / to_train
                result = train_arm_fold(arm, fold, tiles, split_of(fold), config, run_dir, result_path,
                                        time_limit=time_limit)
                to_train -= 1
            runs[arm].append(result)

    runs = {arm: results for arm, results in runs.items() if results}
    share = all_tiles.class_presence()
    rarest = [class_names[c] for c in np.argsort(share, kind="stable")[:2]]
    t1 = table1(runs, class_names, share, len(keep))
    t2s = {summary: table2(runs, class_names, summary) for summary in SUMMARIES}
    paired = {summary: paired_tests(runs, class_names, summary) for summary in SUMMARIES}
    files = write_tables(out, t1, t2s, paired, class_names)
    files += plot_curves(out, runs, class_names)
    return {"config": config.to_dict(), "classes": class_names, "rarest": rarest, "runs": runs,
            "table1": t1, "table2": t2s["best"], "table2_last3": t2s["last3"], "paired": paired,
            "files": [str(f) for f in files]}


def finished_result(path: Path, config: ExperimentConfig) -> Optional[dict]:
    """The result file at ``path`` when it is of this configuration and complete, else None."""
    if not path.exists():
        return None
    try:
        result = json.loads(path.read_text())
    except ValueError:
        return None  # unreadable (cannot happen with atomic writes, but never trust it): retrain
    if result.get("version") != RESULT_VERSION or result.get("fingerprint") != config.fingerprint():
        return None
    if len(result.get("history", [])) != config.epochs and not result.get("time_limited", False):
        return None
    return result


def _check_results_folder(out: Path, config: ExperimentConfig) -> None:
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
        if key not in RUNTIME_FIELDS and not same_setting(key, old.get(key), value):
            raise ValueError(f"results folder {str(out)!r} holds a run with {key}={old.get(key)!r}, this one has "
                             f"{key}={value!r}; use another --out to keep both")


def same_setting(key: str, a, b) -> bool:
    """Whether two stored configurations agree on field ``key`` (``data`` as absolute
    paths, every other field by its JSON form)."""
    if key == "data":
        return os.path.abspath(str(a)) == os.path.abspath(str(b))
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)
