"""Multi-label samplers for scikit-learn and imbalanced-learn pipelines.

imbalanced-learn's samplers refuse multi-label targets; these take them::

    from imblearn.pipeline import make_pipeline
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_validate
    from sklearn.multioutput import MultiOutputClassifier
    from cobalance.sklearn import BalancedSampler
    from cobalance.training import MultilabelStratifiedKFold

    model = make_pipeline(BalancedSampler(random_state=0),
                          MultiOutputClassifier(LogisticRegression()))
    cross_validate(model, X, Y, cv=MultilabelStratifiedKFold(5, random_state=0))

=========================  ===========================================================
sampler                    plan
=========================  ===========================================================
:class:`BalancedSampler`   :class:`cobalance.Balancer` (takes exactly its parameters)
:class:`MLROS`             :func:`cobalance.ml_ros`
:class:`MLRUS`             :func:`cobalance.ml_rus`
:class:`LPROS`             :func:`cobalance.lp_ros`
:class:`LPRUS`             :func:`cobalance.lp_rus`
:class:`RepeatFactorSampler`  :func:`cobalance.repeat_factor`
=========================  ===========================================================

Every sampler follows imbalanced-learn's protocol: ``fit_resample(X, y)`` returns
``(X_res, y_res)`` of the types given (numpy array, list, pandas DataFrame / Series,
scipy.sparse matrix; rows taken with scikit-learn's ``_safe_indexing``), and records
``sample_indices_`` (the rows taken, int64, in sample order: a sample's copies are
adjacent), ``plan_`` (the :class:`cobalance.Plan`) and ``classes_`` (the class names).
``y`` is a 0/1 label matrix (multilabel-indicator: ndarray, DataFrame whose column
names become the class names, or sparse) or, for single-label data, a 1-D vector or one
column of class labels (binary / multiclass), which is one-hot encoded for planning and
returned in its own form. Samplers are deterministic for a given ``random_state``.

This module needs scikit-learn (``pip install "cobalance[study]"``); ``import
cobalance`` does not import it.
"""

from __future__ import annotations

import inspect

import numpy as np
from scipy.sparse import issparse
from sklearn.base import BaseEstimator, OneToOneFeatureMixin
from sklearn.utils import _safe_indexing
from sklearn.utils.multiclass import type_of_target
from sklearn.utils.validation import _num_samples, validate_data

from .balancer import Balancer
from .resamplers import lp_ros, lp_rus, ml_ros, ml_rus, repeat_factor

__all__ = ["BalancedSampler", "MLROS", "MLRUS", "LPROS", "LPRUS", "RepeatFactorSampler"]


def _rows(sampler, X):
    """``X`` checked as a 2-D table of at least one row and column, to be indexed by rows.

    Sets ``n_features_in_`` (and ``feature_names_in_`` for a DataFrame). A DataFrame,
    list or array is returned as given (only checked: an array is not copied); a sparse
    matrix in a format without row indexing (COO, DIA, BSR) is returned as CSR.
    """
    if hasattr(X, "iloc"):  # pandas: checked without converting it to one array
        validate_data(sampler, X, skip_check_array=True)
        if X.ndim != 2 or X.shape[0] < 1 or X.shape[1] < 1:
            raise ValueError(f"X must be a 2-D DataFrame with at least one row and one column, got shape {X.shape}")
        return X
    checked = validate_data(sampler, X, accept_sparse=("csr", "csc", "lil"), dtype=None,
                            ensure_all_finite=False, reset=True)
    return checked if issparse(X) else X


def _label_matrix(y, n_samples: int):
    """``(labels, class_names)``: ``y`` as an (N, C) uint8 matrix and its class names.

    Raises ValueError for a target that is neither a 0/1 label matrix nor class labels,
    or whose length is not ``n_samples``.
    """
    n_y = _num_samples(y)
    if n_y != n_samples:
        raise ValueError(f"X and y must have the same number of samples, got {n_samples} and {n_y}")
    kind = type_of_target(y, input_name="y")
    if kind == "multilabel-indicator":
        if hasattr(y, "toarray"):  # scipy.sparse
            labels = y.toarray()
        else:
            labels = np.asarray(y)
        names = getattr(y, "columns", None)
        names = [str(c) for c in names] if names is not None else None
        return (labels != 0).astype(np.uint8), names
    if kind in ("binary", "multiclass"):
        values = np.asarray(y)
        if values.ndim == 2:  # one column of class labels
            values = values[:, 0]
        classes, codes = np.unique(values, return_inverse=True)
        if classes.size < 2:
            raise ValueError(f"y holds one class only ({classes[0]!r}): a sampler needs at least two classes "
                             "to balance")
        labels = np.zeros((values.shape[0], classes.size), dtype=np.uint8)
        labels[np.arange(values.shape[0]), codes.reshape(-1)] = 1
        return labels, [str(c) for c in classes]
    raise ValueError(f"Unknown label type: y is {kind!r}; expected a 0/1 label matrix (multilabel-indicator) "
                     "or class labels (binary or multiclass)")


class _PlanSampler(OneToOneFeatureMixin, BaseEstimator):
    """Shared protocol: labels -> :class:`cobalance.Plan` (``_plan``) -> resampled rows."""

    _estimator_type = "sampler"

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = True
        tags.input_tags.allow_nan = True  # X is only indexed, never read
        tags.input_tags.string = True
        tags.target_tags.required = True
        tags.target_tags.multi_output = True
        return tags

    def fit(self, X, y):
        """Plan the resampling (as :meth:`fit_resample`) and return ``self``."""
        self.fit_resample(X, y)
        return self

    def fit_resample(self, X, y):
        """Resample ``X`` and ``y`` row-wise by the plan of this sampler.

        Parameters
        ----------
        X : array-like, DataFrame or sparse matrix of shape (n_samples, n_features)
            Only indexed by rows (any content, NaN and strings included).
        y : array-like, DataFrame, Series or sparse matrix
            A 0/1 label matrix of shape (n_samples, n_classes), or class labels of shape
            (n_samples,) or (n_samples, 1).

        Returns
        -------
        X_res, y_res
            ``X`` and ``y`` at the rows ``sample_indices_``, of the types given.

        Raises
        ------
        ValueError
            ``X`` and ``y`` of different lengths, a continuous or multi-output target
            that is not 0/1, a single class, or the sampler's own parameter errors.
        """
        if y is None:
            raise ValueError(f"{type(self).__name__} requires y to be passed, but the target y is None")
        X = _rows(self, X)
        labels, names = _label_matrix(y, _num_samples(X))
        plan = self._plan(labels, names)
        self.plan_ = plan
        self.sample_indices_ = plan.indices()
        self.classes_ = np.asarray(names if names is not None else [str(c) for c in range(labels.shape[1])],
                                   dtype=object)
        return _safe_indexing(X, self.sample_indices_), _safe_indexing(y, self.sample_indices_)

    def _plan(self, labels: np.ndarray, names):  # pragma: no cover - abstract
        raise NotImplementedError


def _balancer_init(self, **params):
    bound = _BALANCER_SIGNATURE.bind(self, **params)
    bound.apply_defaults()
    for name, value in list(bound.arguments.items())[1:]:
        setattr(self, name, value)


_BALANCER_SIGNATURE = inspect.signature(Balancer.__init__)
_balancer_init.__signature__ = _BALANCER_SIGNATURE


class BalancedSampler(_PlanSampler):
    """The :class:`cobalance.Balancer` plan as an imbalanced-learn sampler.

    Takes exactly :class:`cobalance.Balancer`'s keyword parameters, with the same
    defaults (so ``BalancedSampler()`` is ``Balancer()``: the equal-presence target at
    +10 % size, nothing dropped), and tunes like any estimator
    (``GridSearchCV(..., {"balancedsampler__gamma": [...]})``).

    Attributes
    ----------
    balancer_ : Balancer
        The fitted balancer (its ``report_``, ``gamma_``, ...).
    plan_ : Plan
    sample_indices_ : ndarray of int64
    classes_ : ndarray of str
    """

    __init__ = _balancer_init

    def _plan(self, labels, names):
        self.balancer_ = Balancer(**self.get_params()).fit(labels, class_names=names)
        return self.balancer_.plan_


class _PercentageSampler(_PlanSampler):
    """A literature resampler with Charte et al.'s P % budget."""

    _method = None

    def __init__(self, *, percentage=25, random_state=None):
        self.percentage = percentage
        self.random_state = random_state

    def _plan(self, labels, names):
        return type(self)._method(labels, self.percentage, random_state=self.random_state)


class MLROS(_PercentageSampler):
    """ML-ROS (:func:`cobalance.ml_ros`): clone samples of minority labels, ``percentage`` % of N at most."""

    _method = staticmethod(ml_ros)


class MLRUS(_PercentageSampler):
    """ML-RUS (:func:`cobalance.ml_rus`): delete samples of majority labels, ``percentage`` % of N at most."""

    _method = staticmethod(ml_rus)


class LPROS(_PercentageSampler):
    """LP-ROS (:func:`cobalance.lp_ros`): clone samples of rare labelsets, ``percentage`` % of N."""

    _method = staticmethod(lp_ros)


class LPRUS(_PercentageSampler):
    """LP-RUS (:func:`cobalance.lp_rus`): delete samples of frequent labelsets, ``percentage`` % of N."""

    _method = staticmethod(lp_rus)


class RepeatFactorSampler(_PlanSampler):
    """Repeat-factor sampling (:func:`cobalance.repeat_factor`).

    Give LVIS's ``threshold`` t, or a ``budget`` (added samples as a share of N, as in
    :class:`cobalance.Balancer`: the plan has ``round((1 + budget) N)`` samples), not
    both; neither: ``budget=0.1``, the size of the default :class:`BalancedSampler`.
    """

    def __init__(self, *, threshold=None, budget=None, random_state=None):
        self.threshold = threshold
        self.budget = budget
        self.random_state = random_state

    def _plan(self, labels, names):
        if self.threshold is not None:
            if self.budget is not None:
                raise ValueError(f"give threshold or budget, not both (got threshold={self.threshold!r}, "
                                 f"budget={self.budget!r})")
            return repeat_factor(labels, self.threshold, random_state=self.random_state)
        budget = 0.1 if self.budget is None else self.budget
        if isinstance(budget, bool) or not isinstance(budget, (int, float, np.integer, np.floating)) \
                or not np.isfinite(budget) or budget < 0:
            raise ValueError(f"budget must be a finite number >= 0, got {budget!r}")
        size = int(round((1.0 + float(budget)) * labels.shape[0]))
        return repeat_factor(labels, n_samples_out=size, random_state=self.random_state)
