"""The arms' training sets: one :class:`cobalance.Plan` and its :class:`cobalance.Report` per arm.

===================  ==========================================================
arm                  plan
===================  ==========================================================
``unbalanced``       ``Plan.identity``: the training tiles as they are
``balanced_noreg``   ``Balancer(regularizer="none")`` fitted on the fold's table
``balanced_reg``     ``Balancer(regularizer="proportions")`` (Adam)
``exact``            the same, solved to optimality (``solver="exact"``)
``rfs``              repeat-factor sampling, ``Plan.from_copies``
``library_default``  ``Balancer`` as a user calls it: every option at the
                     library's default (objective, regularizer, solver, +10 %
                     budget, copy cap) except the study's target and undersampling
``class_weighted``   ``Plan.identity`` with per-class loss weights instead:
                     median-frequency weights of the tiles' class presence
                     (:func:`presence_class_weights`)
===================  ==========================================================

Every arm's report is ``Report.from_plan`` against the configured target resolved on
the fold's training tiles (the balancer arms' own ``report_``), so duplicates, drops,
effective size and presence after are counted in one place for every arm.
"""

from __future__ import annotations

from typing import Tuple

import numpy as np

from .config import ARMS, ExperimentConfig, derived_seed
from .rfs import repeat_factor_copies

__all__ = ["arm_plan", "presence_class_weights", "study_target"]


def presence_class_weights(presence) -> np.ndarray:
    """Median-frequency class weights from class presence: ``w_c = median(f) / f_c``.

    ``f_c`` is the share of samples holding class ``c``; the weights are scaled to mean
    1, so a loss weighted by them keeps its overall scale (and learning rate). A class
    in no sample gets the largest weight of the others (all 1 when no class is present).

    Parameters
    ----------
    presence : array-like, shape (C,)
        Shares in [0, 1].

    Raises
    ------
    ValueError
        Not a 1-D array of shares in [0, 1].
    """
    f = np.asarray(presence, dtype=np.float64)
    if f.ndim != 1 or f.size == 0 or not np.all(np.isfinite(f)) or np.any((f < 0) | (f > 1)):
        raise ValueError(f"presence must be a non-empty 1-D array of shares in [0, 1], got {presence!r}")
    seen = f > 0
    if not seen.any():
        return np.ones_like(f)
    w = np.empty_like(f)
    w[seen] = np.median(f[seen]) / f[seen]
    w[~seen] = w[seen].max()
    return w / w.mean()


def study_target(target, class_names):
    """The configured target as :func:`cobalance.resolve_target` takes it.

    Text is parsed by :func:`cobalance.targets.parse_target_text` against
    ``class_names``; a dict or list is returned as it is (checked when resolved).

    Raises
    ------
    ValueError
        Text in no known form, or naming an unknown class (see parse_target_text).
    """
    from ..targets import parse_target_text

    if isinstance(target, str):
        return parse_target_text(target, class_names)
    return target


def _balancer(arm: str, config: ExperimentConfig, fold: int):
    from ..balancer import Balancer

    if arm == "library_default":
        # What the paper's configuration is compared against: the library out of the box,
        # aimed at the same target as the other balancing arms.
        return Balancer(target=config.target, allow_undersampling=config.undersample,
                        random_state=derived_seed(config, "balance", arm, fold))
    # the method paper's arms: squared fraction error, its size rules and 50-copy cap
    kwargs = dict(target=config.target, objective="fraction", budget=None, max_copies=50,
                  allow_undersampling=config.undersample, random_state=derived_seed(config, "balance", arm, fold))
    if arm == "balanced_noreg":
        kwargs.update(regularizer="none")
    else:
        kwargs.update(regularizer="proportions", solver="exact" if arm == "exact" else "adam")
        if config.gamma is not None:
            kwargs["gamma"] = float(config.gamma)
    return Balancer(**kwargs)


def arm_plan(arm: str, table, config: ExperimentConfig, fold: int) -> Tuple[object, object, dict]:
    """The plan of one arm over a fold's training tiles, and its report.

    Parameters
    ----------
    arm : str
        One of :data:`cobalance.training.ARMS`.
    table : PatternTable
        The fold's training tiles (with class names and its sample -> pattern index).
    config : ExperimentConfig
        Its ``target`` already parsed (:func:`study_target`).
    fold : int
        Seeds the arm's random choices.

    Returns
    -------
    plan : cobalance.Plan
    report : cobalance.Report
        Presence before / after against the resolved target, duplicates, drops,
        effective size.
    info : dict
        For the balancer arms its resolved target, final loss and (Adam) optimality
        gap; for ``rfs`` the threshold; for ``class_weighted`` the loss's
        ``class_weights``; empty for ``unbalanced``.

    Raises
    ------
    ValueError
        An unknown arm, or a target the table cannot resolve.
    """
    from .. import Plan, Report
    from ..targets import resolve_target

    if arm in ("balanced_noreg", "balanced_reg", "exact", "library_default"):
        balancer = _balancer(arm, config, fold).fit(table)
        info = {"target": [float(v) for v in balancer.target_], "loss": float(balancer.loss_)}
        if balancer.optimality_gap_ is not None:
            info["optimality_gap"] = float(balancer.optimality_gap_)
        return balancer.plan_, balancer.report_, info
    if arm == "unbalanced":
        plan, info = Plan.identity(table.n_samples), {}
    elif arm == "class_weighted":
        weights = presence_class_weights(table.class_presence())
        plan, info = Plan.identity(table.n_samples), {"class_weights": [float(w) for w in weights]}
    elif arm == "rfs":
        presence = table.patterns[np.asarray(table.inverse)]  # per tile, from its pattern
        copies = repeat_factor_copies(presence, config.rfs_threshold, random_state=derived_seed(config, "rfs", fold))
        plan, info = Plan.from_copies(copies, table), {"rfs_threshold": float(config.rfs_threshold)}
    else:
        raise ValueError(f"arm must be one of {list(ARMS)}, got {arm!r}")
    return plan, Report.from_plan(table, plan, resolve_target(config.target, table)), info
