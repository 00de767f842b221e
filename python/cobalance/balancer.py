"""The balancer: per-pattern repeat counts that move class presence towards a target.

The method (gradient-descent balancing): group samples by class-presence pattern
``u_j`` with counts ``n_j``; find real repeat counts ``alpha_j`` so that the achieved
fractions ``f(alpha) = sum_j alpha_j u_j / sum_j alpha_j`` approach the target ``d``,
minimising ``objective + gamma * regularizer`` with Adam inside per-pattern bounds.
The optimisation runs in the native core (``cobalance._core``); this module resolves
the target, sets the bounds and the start, rounds the result to an integer
:class:`~cobalance.Plan` and summarises it in a :class:`~cobalance.Report`.
"""

from __future__ import annotations

import inspect
import warnings
from numbers import Integral, Real
from typing import Optional

import numpy as np

from . import _core
from ._arguments import thread_count
from .patterns import PatternTable
from ._plan_size import (check_size, effective_size, raise_weight_to_floor, repeat_factor_counts,
                         size_form, size_keeping_lower_bounds)
from .plan import Plan, round_counts, scale_to_total
from .report import Report
from .targets import FeasibilityWarning, check_feasibility, reachable_presence, resolve_target

__all__ = ["Balancer", "SizeWarning", "ConvergenceWarning", "LabelLossWarning"]


class SizeWarning(UserWarning):
    """Adam's solution was clipped to the per-pattern bounds at the balanced size.

    Adam does not hold the total fixed, so its repeat counts are rescaled to the
    balanced size afterwards; where that moves a pattern by a copy or more, the plan
    is worse than the exact optimum at that size (``solver="exact"`` finds it).
    """


class ConvergenceWarning(UserWarning):
    """The solver stopped before meeting its tolerance (scikit-learn's name and meaning)."""


class LabelLossWarning(UserWarning):
    """A class present in the data is absent from the balanced set."""


OBJECTIVES = ("imbalance", "fraction", "fraction_l2", "geo")
REGULARIZERS = ("ess", "counts", "proportions", "ratio", "none")
SOLVERS = ("auto", "pg", "adam", "exact")
INITS = ("auto", "counts", "constant", "class_weighted", "repeat_factor")

#: Default weight of the regularizer. With the ``proportions`` regularizer,
#: ``sum_j (100 (p_j - p0_j))^2``, a pattern whose share of the data moves by one
#: percentage point costs ``gamma``. On the paper's setting (115 images, target
#: ``"rare_boost"``) 1e-3 raises the two rare classes from 7 % and 10 % to about
#: 21 % and 26 % (the paper reports 16 % and 20 % with its regularizer) while no other
#: class moves by more than 4 points; the paper found +10-15 points reachable
#: without excess duplicates.
DEFAULT_GAMMA = 1e-3
#: Default weight of the ``ess`` regularizer. Both the ``imbalance`` objective and
#: ``ess`` are logarithms, so gamma is an exchange rate: a plan may give up 1 % of its
#: effective sample size for a mean imbalance ratio lower by about ``gamma`` %. No single
#: value suits every dataset (on the six shared MULAN label sets at +25 % the range that
#: beats ML-ROS, LP-ROS and repeat-factor sampling everywhere was 1.25-1.3 wide), so the
#: default pairs a low 0.5 (balance first) with an effective-size floor
#: (``min_effective_size``) that raises it where a plan would concentrate duplicates
#: more than repeat-factor sampling does (benchmarks/bench_quality.py; 0.3-0.7 measured
#: alike there, 1.0 lost once more at +10 %).
DEFAULT_GAMMA_ESS = 0.5
#: ``min_effective_size="repeat_factor"``: the floor's share of repeat-factor sampling's
#: effective size (below 1 so that the plan may trade a little diversity for balance).
REPEAT_FACTOR_ESS_SHARE = 0.96
#: ``min_effective_size="repeat_factor"`` where the set does not grow (undersampling):
#: the floor's share of the balanced size, so that dropping samples and repeating
#: others does not concentrate the set on a few samples.
SHRINKING_ESS_SHARE = 0.75
#: Default added size when nothing is dropped: the balanced set has ``(1 + budget) N``
#: samples. +10 % is the cautious end of the budgets benchmarked (+10/25/50 %): it keeps
#: the Kish effective size above 80 % of N on the six shared label sets, where +25 %
#: lets it fall to 70-72 % on medical and genbase (benchmarks/README.md).
DEFAULT_BUDGET = 0.1
#: Default iteration cap of the projected-gradient solver (it typically stops after
#: 50-200 steps).
DEFAULT_PG_MAX_ITER = 5000
#: A balanced set below this share of the original size draws a SizeWarning.
COLLAPSE_SHARE = 0.5
#: Default Adam step, in units of the mean count per pattern (see the Balancer's
#: Notes). Adam moves each alpha_j by at most about ``lr`` units per step. On the
#: paper's setting and the six MULAN label sets, 0.2 with the default 2000 steps and
#: tolerance ends within 1e-6 (relative to the starting loss) of the exact optimum in
#: almost all cases, where 0.01 and 0.05 often stop short.
DEFAULT_LR = 0.2
DEFAULT_MAX_ITER = 2000
#: Relative loss change below which Adam stops early.
DEFAULT_TOL = 1e-9


class Balancer:
    """Balance a multi-label dataset by repeating (or dropping) class-presence patterns.

    All parameters are keyword-only and stored as given; they are validated in
    :meth:`fit` (the scikit-learn convention). ``Balancer()`` with no argument is the
    recommended setting: every class towards an equal presence, measured as the mean
    imbalance ratio, against the plan's effective sample size, at +10 % samples with
    none dropped, at most 10 copies of one sample.

    Parameters
    ----------
    target : array-like, dict or str
        Wanted share of samples containing each class; default ``"equal"`` (every
        present class at the same presence). See :func:`cobalance.resolve_target` for
        ``"sqrt"``, ``"smooth=q"``, ``"max_ir=k"``, ``"rare_boost"`` (the method paper's
        setting), ``"all"`` and explicit arrays or dicts.
    objective : {"imbalance", "fraction", "fraction_l2", "geo"}
        ``imbalance`` (default): the log of the mean imbalance ratio of each class's
        presence relative to its target, ``mean_i max_k(f_k / d_k) / (f_i / d_i)``
        with a smoothed max: scale-free and symmetric in log presence, so a class at
        0.1 % that should be at 2 % counts as much as one at 40 % that should be at
        2 %, and a class never falls to 0 (the loss is infinite there).
        ``fraction``: ``sum_i w_i (f_i - d_i)^2`` (the method paper's); ``fraction_l2``:
        its square root; ``geo``: ``|| U^T alpha / ||U^T alpha|| - d / ||d|| ||^2``.
    regularizer : {"ess", "proportions", "counts", "ratio", "none"}
        ``ess`` (default): ``log(N / ESS)`` with ESS the Kish effective sample size
        ``(sum c)^2 / sum c^2`` of the per-sample copies ``c`` the plan will give
        (pattern j's count spread evenly over its samples, so that a copy costs what it
        costs once rounded): it spreads duplicates over many samples instead of cloning
        a few. With ``p = alpha / sum(alpha)`` and ``p0 = n / N``: ``proportions``
        ``sum_j (100 (p_j - p0_j))^2`` (the paper's best); ``counts``
        ``sum_j (alpha_j / m_j - 1)^2`` with the reference counts ``m`` (the counts
        ``n`` scaled to the balanced size when it is known up front); ``ratio``
        ``sum_j (p_j / p0_j - 1)^2``.
    gamma : float >= 0, optional
        Weight of the regularizer. Default :data:`DEFAULT_GAMMA_ESS` (0.5) for
        ``ess``, a scale-free exchange rate between relative imbalance and relative
        effective size that needs no per-dataset tuning; :data:`DEFAULT_GAMMA` (1e-3,
        the method paper's) for the other regularizers.
    solver : {"auto", "pg", "adam", "exact"}
        ``pg``: projected gradient with Barzilai-Borwein steps and backtracking at the
        balanced size (any loss). ``adam``: the method paper's optimiser (with the loss
        history kept); afterwards the exact optimum at the same size and bounds is
        computed too where the loss is a convex quadratic, and the difference is
        ``optimality_gap_``. ``exact``: the global optimum of the convex problem
        (``fraction`` / ``fraction_l2`` with a quadratic regularizer). ``auto``
        (default): ``pg`` for the ``imbalance`` objective or the ``ess`` regularizer,
        ``adam`` otherwise.
    budget : float, optional
        Added samples as a share of the original size N: the balanced set has
        ``round((1 + budget) N)`` samples (default :data:`DEFAULT_BUDGET`, 0.1: +10 %
        duplicates). ``0`` keeps the size (only possible with
        ``allow_undersampling=True`` unless nothing needs to move); negative values
        (> -1) shrink the set and need ``allow_undersampling=True``. Ignored when
        ``n_samples_out`` is given. ``None`` restores the method paper's size rules
        (see *Size of the balanced set*).
    lr : float > 0
        Adam step, in units of the mean reference count per pattern (see Notes);
        default :data:`DEFAULT_LR` (0.2).
    max_iter : int > 0, optional
        Steps of Adam (default 2000) or of the projected gradient (default 5000).
    tol : float >= 0
        Relative loss change that stops the solver early; default 1e-9 (0 runs all
        steps). A solver that ends without meeting it draws a
        :class:`ConvergenceWarning`.
    init : {"auto", "counts", "constant", "class_weighted", "repeat_factor"}
        The solver's start: ``counts`` alpha_j = n_j; ``constant`` alpha_j = N / K;
        ``class_weighted`` alpha_j proportional to ``1 / presence`` of the rarest
        class in pattern j (1 for the empty pattern), scaled to sum N;
        ``repeat_factor`` alpha_j = n_j r_j with repeat-factor sampling's factor
        ``r_j = max(1, max_{c in j} sqrt(t d_c / f_c))`` (presence f, target d; t such
        that the counts sum to the balanced size). With a size known up front the
        start is scaled to it; it is then clipped into the bounds. ``auto``
        (default): for ``solver="pg"`` both ``counts`` and ``repeat_factor``, keeping
        the solution with the lower loss (the ``imbalance`` objective is not convex,
        and the two starts reach different local optima); ``counts`` otherwise.
    min_count, max_count : scalar or array-like of shape (K,), optional
        Bounds on each pattern's total count.
    max_copies : float or None
        Cap on copies per sample: pattern j gets at most ``max_copies * n_j``
        (default 10). ``None`` removes this cap (``max_count`` may still cap).
    allow_undersampling : bool
        When False (default) a pattern's count is at least its size n_j, so no sample
        is dropped. When True counts may go down to ``min_count`` (default 0); the
        ``imbalance`` objective still keeps every class present.
    n_samples_out : int, str, optional
        Size of the balanced set; overrides ``budget``. An integer (or an
        integer-valued float such as ``806.0``), or a ratio of the original size:
        ``"1.25x"`` or ``"125%"``. See *Size of the balanced set* below.
    min_effective_size : "repeat_factor", float or None
        A floor on the plan's Kish effective sample size, for the ``ess`` regularizer
        with ``solver="pg"``: where the solution at ``gamma`` falls below it, gamma is
        raised (doubling, then bisection to within 5 %) until it holds. A float is a
        share of the original size N. ``"repeat_factor"`` (default): 96 % of the
        effective size of repeat-factor sampling's counts at the same size (towards the
        same target; see ``init``), i.e. never concentrate duplicates much more than
        that widely used heuristic does; where the set does not grow, 75 % of its size.
        ``None``: no floor (gamma alone sets the trade-off).
    class_weights : array-like of shape (C,), optional
        Weights ``w_i`` of the classes in the objective (default 1).
    compute_optimality_gap : bool
        For ``solver="adam"``, also solve the exact problem at the same size and bounds
        to report ``optimality_gap_`` (default True). The exact solve can take far
        longer than Adam on very large problems (it runs to a KKT tolerance of 1e-10);
        turn it off there.
    exact_max_iter : int > 0
        Iteration cap of the exact solver (default 100000).
    n_threads : int, optional
        Threads of the native optimiser; default all cores. Results do not depend on it.
    random_state : int, numpy Generator or None
        Seeds which members of a pattern get its remainder copies (see :class:`Plan`).

    Attributes
    ----------
    target_ : ndarray (C,)
        The resolved target.
    lower_, upper_ : ndarray (K,)
        The per-pattern bounds used.
    alpha_ : ndarray (K,)
        Real repeat counts, already at the balanced size (see *Size of the balanced
        set*; for ``regularizer="counts"`` without ``n_samples_out``, Adam's own sum);
        the plan rounds them.
    pattern_counts_ : ndarray of int64 (K,)
        ``round_counts(alpha_, ceil(lower_), floor(upper_), S)`` with the balanced
        size ``S``.
    history_ : ndarray or None
        Adam's loss before the first step and after each step (None for "exact").
    n_iter_ : int
        Iterations of the solver that produced ``alpha_``.
    converged_ : bool
    loss_ : float
        Loss at ``alpha_``.
    exact_ : dict or None
        The exact solver's result (alpha in copies, p, loss, kkt_residual, n_iter,
        converged, marginals, max_abs_error) at the plan's size; None for ``geo`` or
        when the gap is not computed.
    optimality_gap_ : float or None
        ``loss_ - exact_["loss"]`` for ``solver="adam"``: how far Adam ended above
        the optimum at the same size and bounds (None for "exact", for ``geo`` and
        with ``compute_optimality_gap=False``).
    plan_ : Plan
    report_ : Report

    Notes
    -----
    **Size of the balanced set.** ``S = n_samples_out`` when given, otherwise
    ``round((1 + budget) N)``; the solvers work at that size throughout. With
    ``budget=None`` the method paper's rules below apply. The fractions depend only on
    ``p = alpha / sum(alpha)``, and so do the ``proportions``, ``ratio`` and ``none``
    regularizers: for them the optimiser chooses a direction ``p``, not a size (where
    Adam's sum ends up is an accident of its path). The size ``S`` is therefore set by
    a rule:

    - ``n_samples_out`` given: ``S = n_samples_out``.
    - ``regularizer="counts"`` (the one loss anchored to a scale, through
      ``alpha / n``): ``S = round(sum(alpha))`` of Adam's solution, which lies inside
      the bounds.
    - otherwise, undersampling allowed: ``S = N``, the original size (or the nearest
      size the bounds allow when ``min_count`` / ``max_count`` exclude N): balancing
      re-weights the dataset without growing or shrinking it.
    - otherwise, undersampling forbidden: the smallest size at which no pattern falls
      below its lower bound (``n_j``, or ``min_count`` where larger),
      ``S = ceil(max_j lower_j / p_j)``. Nothing is dropped and no size below S keeps
      the direction ``p`` without dropping samples. This S never exceeds Adam's own
      sum, where Adam kept every pattern within its caps, so the caps (``max_copies``,
      ``max_count``) hold at S up to the rounding up of S by less than one copy.

    When ``S`` is known before optimising (``n_samples_out`` given, or undersampling
    allowed with a scale-free loss) Adam holds ``sum(alpha) = S`` throughout: after
    each step ``alpha`` is projected onto the bounds and the fixed sum (in Adam's own
    step metric, whose fixed points are the optimality conditions), so it optimises at
    the plan's size. Where ``S`` follows from Adam's direction (undersampling
    forbidden) Adam runs with the bounds only and its ``alpha`` is brought to ``S``
    with one common factor (``scale_to_total``); should that clip a pattern by a copy
    or more, a :class:`SizeWarning` says so and ``optimality_gap_`` shows the cost.

    ``solver="exact"`` solves the exact problem at the same ``S`` (its size is needed
    up front); where the rule needs Adam's solution (``counts``, or undersampling
    forbidden) Adam is run from the same start, bounds and loss to find it. The
    ``optimality_gap_`` of ``solver="adam"`` compares with the exact optimum at the
    plan's size (for ``counts``, at Adam's real sum, which the rounding changes by
    less than one copy).

    **Units.** With ``s = n_samples_out / N`` (1 when not given) the reference
    counts are ``m = s n`` and the problem is handed to the native optimiser in units
    of ``sum(m) / K`` copies (counts, bounds, start and size divided by it). All
    losses are unchanged by such a unit (they depend on ``alpha / sum(alpha)`` and
    ``alpha / m`` only), so only the meaning of ``lr`` is affected: it is relative
    to the mean reference count per pattern, whatever the size of the dataset.
    ``alpha_``, ``exact_["alpha"]`` and the bounds are reported in copies.

    The integer counts never leave the integer bounds ``[ceil(lower), floor(upper)]``,
    so a size the bounds cannot hold raises ``ValueError``.
    """

    def __init__(self, *, target="equal", objective: str = "imbalance", regularizer: str = "ess",
                 gamma: Optional[float] = None, solver: str = "auto", budget: Optional[float] = DEFAULT_BUDGET,
                 lr: float = DEFAULT_LR, max_iter: Optional[int] = None, tol: float = DEFAULT_TOL,
                 init: str = "auto", min_count=None, max_count=None, max_copies: Optional[float] = 10,
                 allow_undersampling: bool = False, n_samples_out: Optional[int] = None,
                 min_effective_size="repeat_factor", class_weights=None, compute_optimality_gap: bool = True, exact_max_iter: int = 100_000,
                 n_threads: Optional[int] = None, random_state=None):
        self.target = target
        self.objective = objective
        self.regularizer = regularizer
        self.gamma = gamma
        self.solver = solver
        self.budget = budget
        self.lr = lr
        self.max_iter = max_iter
        self.tol = tol
        self.init = init
        self.min_count = min_count
        self.max_count = max_count
        self.max_copies = max_copies
        self.allow_undersampling = allow_undersampling
        self.n_samples_out = n_samples_out
        self.min_effective_size = min_effective_size
        self.class_weights = class_weights
        self.compute_optimality_gap = compute_optimality_gap
        self.exact_max_iter = exact_max_iter
        self.n_threads = n_threads
        self.random_state = random_state

    # -- scikit-learn style parameters ------------------------------------------------

    def get_params(self, deep: bool = True) -> dict:
        names = [p for p in inspect.signature(type(self).__init__).parameters if p != "self"]
        return {name: getattr(self, name) for name in names}

    def set_params(self, **params) -> "Balancer":
        valid = self.get_params()
        for name, value in params.items():
            if name not in valid:
                raise ValueError(f"unknown parameter {name!r}; valid parameters are {sorted(valid)}")
            setattr(self, name, value)
        return self

    def __repr__(self) -> str:
        return (f"Balancer(target={self.target!r}, objective={self.objective!r}, regularizer={self.regularizer!r}, "
                f"budget={self.budget!r})")

    # -- fitting ----------------------------------------------------------------------

    def fit(self, table, *, class_names=None) -> "Balancer":
        """Compute repeat counts, the integer plan and its report.

        Parameters
        ----------
        table : PatternTable or array-like of shape (N, C)
            A label matrix is grouped with :meth:`PatternTable.from_labels`. The table
            must keep its sample -> pattern index.
        class_names : sequence of str, optional
            Names for a label matrix (a table keeps its own).

        Returns
        -------
        self

        Raises
        ------
        ValueError
            An invalid parameter (the message names it and its value), a target that
            cannot be resolved, bounds that leave no room, or ``n_samples_out``
            outside what the bounds allow.

        Warns
        -----
        FeasibilityWarning
            Parts of the target no resampling can reach (see
            :func:`cobalance.targets.check_feasibility`).
        SizeWarning
            Bringing Adam's solution to the balanced size clipped it to the per-pattern
            bounds (see *Size of the balanced set* in the class Notes).
        """
        if not isinstance(table, PatternTable):
            table = PatternTable.from_labels(table, class_names=class_names, n_threads=self.n_threads)
        if not table.has_inverse:
            raise ValueError("table must keep its sample -> pattern index (built with keep_inverse=True)")
        if table.n_samples == 0:
            raise ValueError("table has no samples")
        self._check_params()
        n_threads = thread_count(self.n_threads)
        counts = np.asarray(table.counts, dtype=np.float64)
        n_patterns = counts.size
        n_samples = float(counts.sum())
        objective, regularizer, gamma, solver = self.objective, self.regularizer, self._gamma(), self._solver()
        max_iter = self._max_iter(solver)

        target = resolve_target(self.target, table)
        class_weights = self._class_weights(table.n_classes)
        check_feasibility(target, table, class_weights=class_weights)
        lower, upper = self._bounds(counts)
        lo_int = np.ceil(lower - 1e-9)
        hi_int = np.floor(upper + 1e-9)
        # The balanced size: known up front unless the method paper's rules are asked for.
        total = self._size_up_front(n_samples)
        sized = total is not None
        if sized:
            what = "n_samples_out = " if self.n_samples_out is not None else f"the size for budget={self.budget!r}, "
            check_size(total, lo_int, hi_int, what)
        # The losses depend on alpha only through alpha / sum(alpha) and alpha / counts,
        # so the problem is posed in a unit of copies chosen for the optimiser: the
        # reference counts average 1 per pattern. Adam's step `lr` then means the same on
        # any dataset size. `ess` needs the true counts (its copies per sample are
        # alpha_j / n_j); `counts` keeps alpha near the counts scaled to the size.
        scale = total / n_samples if (sized and regularizer != "ess") else 1.0
        reference = counts * scale
        unit = reference.sum() / n_patterns
        lower_u, upper_u = lower / unit, upper / unit
        if solver == "pg" and total is None:
            if not self.allow_undersampling:
                raise ValueError("solver 'pg' works at a size known up front; with budget=None and "
                                 "allow_undersampling=False set n_samples_out or a budget")
            total = int(np.clip(n_samples, lo_int.sum(), hi_int.sum()))
            check_size(total, lo_int, hi_int, "the balanced size ")
        # the solver's starts, in copies, each computed once (the effective-size search
        # below solves from them again and again)
        starts = {kind: self._initial_alpha(table, counts, kind, target, total) for kind in self._starts(solver)}

        indptr, indices = table.sparse_patterns()
        problem = _core.BalanceProblem(indptr, indices, reference / unit, table.n_classes, target, class_weights)
        loss_of = lambda a: float(problem.loss(a / unit, objective, regularizer, gamma, n_threads))  # noqa: E731

        adam = exact = None
        self.min_effective_size_ = None
        if solver == "pg":
            def solve_pg(weight, kinds=tuple(starts)):
                best = best_loss = None
                for kind in kinds:  # keep the lowest loss; the first start wins ties
                    start = starts[kind]
                    start = start * (total / unit) / start.sum() if start.sum() > 0 else start
                    trial = _core.projected_gradient(problem, start, lower_u, upper_u, objective, regularizer,
                                                     weight, total / unit, max_iter=max_iter, tol=float(self.tol),
                                                     n_threads=n_threads)
                    trial_loss = float(problem.loss(trial["alpha"], objective, regularizer, weight, n_threads))
                    if best is None or trial_loss < best_loss:
                        best, best_loss = trial, trial_loss
                        best["start"] = kind
                return best

            run = solve_pg(gamma)
            floor = self._effective_size_floor(table, counts, target, total, starts.get("repeat_factor"))
            self.min_effective_size_ = floor
            if floor is not None and regularizer == "ess" and \
                    effective_size(counts, np.asarray(run["alpha"]) * unit) < floor:
                # the search keeps to the start that won at the first weight (half the solves)
                won = [run["start"]]
                gamma, run = raise_weight_to_floor(lambda w: solve_pg(w, won), gamma, floor,
                                                    lambda r: effective_size(counts, np.asarray(r["alpha"]) * unit))
            alpha = np.asarray(run["alpha"], dtype=np.float64) * unit
            self.history_ = np.asarray(run["history"], dtype=np.float64)
            self.n_iter_, self.converged_ = int(run["n_iter"]), bool(run["converged"])
        else:
            start_scale = total / n_samples if sized else 1.0
            alpha0 = np.clip(next(iter(starts.values())) * start_scale / unit, lower_u, upper_u)
            scale_free = regularizer != "counts"
            if not sized and scale_free and self.allow_undersampling:
                total = int(np.clip(counts.sum(), lo_int.sum(), hi_int.sum()))
            # With the size known up front, Adam keeps sum(alpha) at it (each step projected
            # onto the bounds and the fixed sum), so it optimises at the plan's size.
            adam_sized = total is not None
            if solver == "adam" or total is None:
                adam = _core.adam(problem, alpha0, lower_u, upper_u, objective, regularizer, gamma, float(self.lr),
                                  max_iter=max_iter, tol=float(self.tol), n_threads=n_threads,
                                  total=None if total is None else total / unit)
                adam_alpha = np.asarray(adam["alpha"], dtype=np.float64) * unit
            if total is None and not scale_free:
                total = int(np.rint(adam_alpha.sum()))
            elif total is None:
                # undersampling forbidden: the smallest size at which Adam's direction keeps
                # every pattern at or above its lower bound (its count n_j), rounded up. It
                # is at most Adam's own sum (alpha_j >= lower_j), where the caps hold, so the
                # caps never clip; the `min` only absorbs the rounding up.
                minimal = size_keeping_lower_bounds(adam_alpha, lower)
                total = int(min(np.ceil(minimal * (1.0 - 1e-12)), hi_int.sum()))
            if not sized:
                check_size(total, lo_int, hi_int, "the balanced size ")
            if adam is not None and not adam_sized and scale_free:
                # the size followed from Adam's direction: one common factor (entries
                # clipped to their bounds) brings the solution to it
                adam_raw = adam_alpha
                adam_alpha = scale_to_total(adam_raw, lower, upper, float(total))
                _warn_if_clipped(adam_raw, adam_alpha, total, loss_of)
            exact_possible = objective in ("fraction", "fraction_l2") and regularizer != "ess"
            if exact_possible and (solver == "exact" or self.compute_optimality_gap):
                # the same size as the plan (Adam's real sum for the `counts` regularizer
                # without a known size, whose loss changes with the size; rounding moves
                # it by under one copy)
                exact_total = float(adam_alpha.sum()) if solver == "adam" else float(total)
                exact = _core.solve_exact(problem, objective, regularizer, gamma, exact_total / unit, lower_u,
                                          upper_u, max_iter=int(self.exact_max_iter), n_threads=n_threads)
                exact = dict(exact)
                exact["alpha"] = np.asarray(exact["alpha"], dtype=np.float64) * unit
            if solver == "exact":
                alpha = exact["alpha"]
                self.history_ = None
                self.n_iter_ = int(exact["n_iter"])
                self.converged_ = bool(exact["converged"])
            else:
                alpha = adam_alpha
                self.history_ = np.asarray(adam["history"], dtype=np.float64)
                self.n_iter_ = int(adam["n_iter"])
                self.converged_ = bool(adam["converged"])
        self.loss_ = loss_of(alpha)
        rise = _loss_rise(self.history_, self.loss_)
        if rise is not None:
            # the steps stalled somewhere worse than the start (e.g. an lr so large that
            # every step lands on the bounds): meeting tol there is no convergence
            self.converged_ = False
            warnings.warn(
                f"solver {solver!r} ended at loss {rise[1]:.6g}, above its starting loss {rise[0]:.6g}, so it did "
                f"not converge" + (f"; lower lr (now {self.lr!r})" if solver == "adam" else "")
                + " - the plan below is from the last iterate", ConvergenceWarning, stacklevel=2)
        elif not self.converged_:
            warnings.warn(
                f"solver {solver!r} stopped after {self.n_iter_} iterations without meeting tol={self.tol!r} "
                f"(max_iter={max_iter}); raise max_iter"
                + (", or use solver='exact'" if objective in ("fraction", "fraction_l2") and regularizer != "ess"
                   else "") + " - the plan below is from the last iterate",
                ConvergenceWarning, stacklevel=2)

        self.target_ = target
        self.gamma_ = gamma
        self.solver_ = solver
        self.lower_, self.upper_ = lower, upper
        self.alpha_ = alpha
        self.exact_ = exact
        self.optimality_gap_ = (self.loss_ - float(exact["loss"])) if (exact is not None and solver == "adam") \
            else None
        pattern_counts = round_counts(alpha, lo_int, hi_int, total)
        if objective == "imbalance":
            pattern_counts = _keep_classes_present(table, pattern_counts, alpha, lo_int, hi_int, target,
                                                   class_weights)
        self.pattern_counts_ = pattern_counts
        self.plan_ = Plan.from_pattern_counts(table, self.pattern_counts_, random_state=self.random_state)
        self.report_ = Report.from_plan(table, self.plan_, target, extra={
            "objective": objective, "regularizer": regularizer, "gamma": gamma, "solver": solver,
            "budget": self.budget, "loss": self.loss_, "n_iter": self.n_iter_, "converged": self.converged_,
            "optimality_gap": self.optimality_gap_,
            "exact_loss": None if exact is None else float(exact["loss"]),
        })
        self.n_patterns_ = n_patterns
        self._warn_about_result(table, target, lower, upper, total)
        return self

    def fit_resample(self, labels, *, class_names=None) -> np.ndarray:
        """Fit on a label matrix (or table) and return the balanced index list (int64, length N').

        The list is in sample order (``plan_.indices()``: a sample's copies adjacent);
        ``plan_.indices("shuffled", random_state=...)`` gives a shuffled one. For
        ``(X_res, Y_res)`` as imbalanced-learn returns them, use
        :class:`cobalance.sklearn.BalancedSampler`.
        """
        return self.fit(labels, class_names=class_names).plan_.indices()

    # -- parts of fit --------------------------------------------------------------------

    def _check_params(self) -> None:
        _choice(self.objective, "objective", OBJECTIVES)
        _choice(self.regularizer, "regularizer", REGULARIZERS)
        _choice(self.solver, "solver", SOLVERS)
        _choice(self.init, "init", INITS)
        if self.solver == "exact" and self.objective not in ("fraction", "fraction_l2"):
            raise ValueError(f"solver='exact' needs a convex quadratic objective ('fraction' or 'fraction_l2'), "
                             f"got objective={self.objective!r}; solver='pg' solves it")
        if self.solver == "exact" and self.regularizer == "ess":
            raise ValueError("solver='exact' needs a quadratic regularizer, got regularizer='ess'; "
                             "solver='pg' solves it")
        if self.solver == "adam" and self.regularizer == "ess":
            raise ValueError("regularizer='ess' is piecewise linear (its gradient jumps where a pattern's copies "
                             "per sample reach an integer), which Adam's fixed steps do not settle on; use "
                             "solver='pg' (or 'auto')")
        if self.gamma is not None:
            _real(self.gamma, "gamma", low=0.0)
        if isinstance(self.min_effective_size, str):
            _choice(self.min_effective_size, "min_effective_size", ("repeat_factor",))
        elif self.min_effective_size is not None:
            _real(self.min_effective_size, "min_effective_size", low=0.0, strict=True)
        if self.budget is not None:
            _real(self.budget, "budget", low=-1.0, strict=True)
            if self.budget < 0 and not self.allow_undersampling:
                raise ValueError(f"budget={self.budget!r} shrinks the set, which drops samples; set "
                                 f"allow_undersampling=True or a budget >= 0")
        _real(self.lr, "lr", low=0.0, strict=True)
        _real(self.tol, "tol", low=0.0)
        for name in ("max_iter", "exact_max_iter"):
            value = getattr(self, name)
            if name == "max_iter" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.compute_optimality_gap, (bool, np.bool_)):
            raise ValueError(f"compute_optimality_gap must be True or False, got {self.compute_optimality_gap!r}")
        if self.max_copies is not None:
            _real(self.max_copies, "max_copies", low=1.0)
        if self.n_samples_out is not None:
            size_form(self.n_samples_out)
        if not isinstance(self.allow_undersampling, (bool, np.bool_)):
            raise ValueError(f"allow_undersampling must be True or False, got {self.allow_undersampling!r}")

    def _gamma(self) -> float:
        if self.gamma is None:
            return DEFAULT_GAMMA_ESS if self.regularizer == "ess" else DEFAULT_GAMMA
        return float(self.gamma)

    def _solver(self) -> str:
        if self.solver != "auto":
            return self.solver
        return "pg" if (self.objective == "imbalance" or self.regularizer == "ess") else "adam"

    def _max_iter(self, solver: str) -> int:
        if self.max_iter is not None:
            return int(self.max_iter)
        return DEFAULT_PG_MAX_ITER if solver == "pg" else DEFAULT_MAX_ITER

    def _size_up_front(self, n_samples: float) -> Optional[int]:
        """The balanced size from ``n_samples_out`` or ``budget``; None for the paper's rules."""
        if self.n_samples_out is not None:
            kind, value = size_form(self.n_samples_out)
            if kind == "count":
                return value
            size = int(round(value * n_samples))
            if size < 1:
                raise ValueError(f"n_samples_out={self.n_samples_out!r} gives {size} samples for N={n_samples:g}; "
                                 "expected at least 1")
            return size
        if self.budget is None:
            return None
        return int(round((1.0 + float(self.budget)) * n_samples))

    def _warn_about_result(self, table, target, lower, upper, total) -> None:
        """The warnings of a fitted plan: labels lost, a collapsed size, targets out of reach."""
        report = self.report_
        names = report.class_names
        lost = report.labels_lost
        if lost:
            warnings.warn(
                f"{len(lost)} classes present in the data are absent from the balanced set: "
                f"{_name_list(lost)}; set allow_undersampling=False (the default), or min_count, to keep "
                f"every sample", LabelLossWarning, stacklevel=3)
        if report.n_samples_out < COLLAPSE_SHARE * report.n_samples:
            warnings.warn(
                f"the balanced set keeps {report.n_samples_out} of {report.n_samples} samples "
                f"({100 * report.n_samples_out / report.n_samples:.1f} %); set budget / n_samples_out for the size "
                f"or allow_undersampling=False to drop nothing", SizeWarning, stacklevel=3)
        if self.objective == "imbalance":
            return  # scale-free: only the target's shape matters, and every shape is aimed at
        low, high = reachable_presence(table, lower, upper, float(total))
        out = np.flatnonzero((target < low - 1e-3) | (target > high + 1e-3))
        if out.size:
            nearest = np.clip(target, low, high)
            listed = ", ".join(f"{names[i]!r} (target {target[i]:.4g}, nearest reachable {nearest[i]:.4g})"
                               for i in out[:10]) + (", ..." if out.size > 10 else "")
            warnings.warn(
                f"{out.size} class targets are out of reach at the balanced size {total} within the per-pattern "
                f"bounds: {listed}; raise budget / max_copies, or allow_undersampling=True, to reach further",
                FeasibilityWarning, stacklevel=3)

    def _class_weights(self, n_classes: int):
        if self.class_weights is None:
            return None
        w = np.asarray(self.class_weights, dtype=np.float64)
        if w.shape != (n_classes,):
            raise ValueError(f"class_weights must have length n_classes = {n_classes}, got shape {w.shape}")
        if not np.all(np.isfinite(w)) or (w < 0).any():
            raise ValueError(f"class_weights must be finite and non-negative, got {w.tolist()}")
        return w

    def _bounds(self, counts: np.ndarray):
        k = counts.size
        min_count = _per_pattern(self.min_count, "min_count", k, 0.0)
        max_count = _per_pattern(self.max_count, "max_count", k, np.inf)
        if k and not (np.floor(max_count + 1e-9) >= 1).any():
            shown = repr(self.max_count) if np.ndim(self.max_count) == 0 else "entries all below 1"
            raise ValueError(f"max_count must allow at least one copy (a number >= 1, or per pattern with some entry "
                             f">= 1), got {shown}: every pattern would get 0 copies and the balanced set would be "
                             f"empty")
        lower, upper = min_count, max_count
        if self.max_copies is not None:
            upper = np.minimum(upper, float(self.max_copies) * counts)
        if not self.allow_undersampling:
            lower = np.maximum(lower, counts)
        bad = lower > upper
        if bad.any():
            j = int(np.flatnonzero(bad)[0])
            low = (f"min_count = {min_count[j]:g}" if lower[j] == min_count[j] else
                   f"its size {counts[j]:g} (allow_undersampling=False keeps every sample)")
            high = (f"max_count = {max_count[j]:g}" if upper[j] == max_count[j] else
                    f"max_copies * size = {float(self.max_copies):g} * {counts[j]:g}")
            need = "max_count" if upper[j] == max_count[j] else "max_copies"
            raise ValueError(f"the bounds of pattern {j} are empty: its lower bound, {low}, exceeds its upper bound, "
                             f"{high}; {need} must allow at least {lower[j]:g} copies of this pattern, or lower "
                             f"min_count / set allow_undersampling=True")
        return lower, upper

    def _effective_size_floor(self, table, counts, target, total, repeat_factor=None) -> Optional[float]:
        """The floor of ``min_effective_size`` in samples (``repeat_factor``: that start's
        counts at this size, when already computed)."""
        floor = self.min_effective_size
        if floor is None:
            return None
        if isinstance(floor, str):
            if total <= counts.sum():
                # no growth, so no repeat-factor plan to compare with: a share of the size
                return SHRINKING_ESS_SHARE * float(total)
            reference = repeat_factor if repeat_factor is not None else \
                repeat_factor_counts(table, counts, target, float(total))
            return REPEAT_FACTOR_ESS_SHARE * effective_size(counts, reference)
        return float(floor) * float(counts.sum())

    def _starts(self, solver: str) -> list:
        if self.init != "auto":
            return [self.init]
        return ["counts", "repeat_factor"] if solver == "pg" else ["counts"]

    def _initial_alpha(self, table: PatternTable, counts: np.ndarray, kind: str, target: np.ndarray,
                       total) -> np.ndarray:
        n = counts.sum()
        if kind == "counts":
            return counts.copy()
        if kind == "constant":
            return np.full(counts.size, n / counts.size)
        if kind == "repeat_factor":
            return repeat_factor_counts(table, counts, target, n if total is None else float(total))
        # class_weighted: inverse presence of each pattern's rarest class
        presence = np.asarray(table.class_presence(), dtype=np.float64)
        indptr, indices = table.sparse_patterns()
        indptr = np.asarray(indptr)
        rarest = np.ones(counts.size)
        nonempty = np.diff(indptr) > 0
        if indices.size:
            mins = np.minimum.reduceat(presence[np.asarray(indices)], indptr[:-1][nonempty])
            rarest[nonempty] = mins
        weight = 1.0 / rarest
        return weight * (n / weight.sum())


def _name_list(names, limit: int = 10) -> str:
    shown = ", ".join(repr(name) for name in names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def _keep_classes_present(table, pattern_counts, alpha, lo_int, hi_int, target, class_weights):
    """Give one copy back to each weighed class that rounding left with no sample.

    The ``imbalance`` objective is infinite where such a class is absent, so the real
    counts keep it present; rounding a pattern's fraction of a copy down can still
    remove it. For each such class, its pattern with the largest real count gets one
    copy, taken from the pattern with the most copies above its lower bound (the size
    stays). Patterns are visited in a fixed order: deterministic.
    """
    counts = pattern_counts.copy()
    indptr, indices = table.sparse_patterns()
    indptr = np.asarray(indptr, dtype=np.int64)
    indices = np.asarray(indices, dtype=np.int64)
    rows = np.repeat(np.arange(counts.size), np.diff(indptr))
    weights = np.ones(table.n_classes) if class_weights is None else class_weights
    wanted = (weights > 0) & (target > 0) & (np.bincount(indices, minlength=table.n_classes) > 0)
    for _ in range(table.n_classes):
        present = np.bincount(indices, weights=(counts[rows] > 0).astype(np.float64), minlength=table.n_classes) > 0
        missing = np.flatnonzero(wanted & ~present)
        if missing.size == 0:
            break
        members = rows[indices == missing[0]]
        members = members[counts[members] < hi_int[members]]
        slack = counts - lo_int
        donors = np.flatnonzero(slack > 0)
        if members.size == 0 or donors.size == 0:
            break
        receiver = int(members[np.argmax(alpha[members])])
        donor = int(donors[np.argmax(counts[donors] - 1e-9 * donors)])
        if donor == receiver:
            break
        counts[receiver] += 1
        counts[donor] -= 1
    return counts


def _warn_if_clipped(alpha, scaled, total, loss):
    """Warn when rescaling ``alpha`` to ``total`` moved a pattern off its direction by a copy or more.

    Smaller moves (e.g. the minimal size rounded up to an integer) are of the order of
    the integer rounding that follows and go unreported.
    """
    direction = alpha * (total / alpha.sum())
    moved = np.abs(scaled - direction)
    if moved.max(initial=0.0) >= 1.0:
        clipped = int(np.count_nonzero(moved > 1e-9 * max(1.0, float(total))))
        warnings.warn(
            f"at the balanced size {total} the per-pattern bounds clip Adam's solution (it sums to "
            f"{alpha.sum():.6g}; up to {moved.max():.3g} copies move in {clipped} of {alpha.size} patterns), "
            f"which raises the loss from {loss(alpha):.6g} to {loss(scaled):.6g}; solver='exact' finds the "
            f"optimum at this size, or n_samples_out / max_copies choose another size or cap",
            SizeWarning, stacklevel=3)


def _loss_rise(history, loss):
    """``(start, end)`` where a solver's run ended above its starting loss or at a non-finite one, else None.

    The margin (1e-9 relative, the default tol) leaves out rounding noise of a run
    that starts at its optimum.
    """
    if history is None or history.size == 0:
        return None
    start, end = float(history[0]), float(history[-1])
    if np.isfinite(end) and not np.isfinite(loss):
        end = float(loss)  # the solution rescaled to the plan's size
    if not np.isfinite(end) or end > start + 1e-9 * max(abs(start), 1e-300):
        return start, end
    return None


def _choice(value, name, options):
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"{name} must be one of {list(options)}, got {value!r}")


def _real(value, name, *, low, strict=False):
    if isinstance(value, bool) or not isinstance(value, Real) or not np.isfinite(value) \
            or value < low or (strict and value == low):
        rel = ">" if strict else ">="
        raise ValueError(f"{name} must be a finite number {rel} {low:g}, got {value!r}")


def _per_pattern(value, name, k, default):
    if value is None:
        return np.full(k, default, dtype=np.float64)
    try:
        if isinstance(value, (bool, np.bool_)):
            raise TypeError
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a non-negative number or one per pattern ({k}), got {value!r}") from None
    if arr.ndim == 0:
        arr = np.full(k, float(arr))
    if arr.shape != (k,):
        raise ValueError(f"{name} must be a scalar or have one entry per pattern ({k}), got shape {arr.shape}")
    if np.isnan(arr).any() or (arr < 0).any():
        raise ValueError(f"{name} must be non-negative numbers, got {arr[np.isnan(arr) | (arr < 0)][0]!r}")
    return arr
