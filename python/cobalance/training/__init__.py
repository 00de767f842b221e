"""Training and the fundus study: models, focal loss, stratified folds, repeat-factor
sampling, and the experiment that compares balancing arms.

Needs torch (the ``training`` extra) for models, losses and the experiment; folds and
repeat-factor sampling need only numpy. Heavy parts are imported on first use.
"""

from __future__ import annotations

import importlib

from .folds import MultilabelStratifiedKFold, iterative_stratification
from .rfs import class_repeat_factors, repeat_factor_copies, repeat_factor_plan, sample_repeat_factors

_LAZY = {
    "create_model": "models", "list_models": "models", "list_encoders": "models", "UNet": "models",
    "FocalLoss": "losses", "sigmoid_focal_loss": "losses", "softmax_focal_loss": "losses",
    "BCEDiceLoss": "losses", "bce_dice_loss": "losses",
    "ExperimentConfig": "experiment", "run_experiment": "experiment", "main": "experiment",
    "add_experiment_parser": "experiment", "experiment_handler": "experiment", "run_from_args": "experiment",
    "ARMS": "experiment", "DEFAULT_ARMS": "experiment",
}

__all__ = ["MultilabelStratifiedKFold", "iterative_stratification", "class_repeat_factors",
           "sample_repeat_factors", "repeat_factor_copies", "repeat_factor_plan", *sorted(_LAZY)]


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
