"""cobalance.sklearn: samplers that imbalanced-learn pipelines and scikit-learn accept.

References: imbalanced-learn's own sampler checks and pipeline, scikit-learn's
estimator checks and cross_validate, and the library functions the samplers wrap.
"""

import warnings

import numpy as np
import pytest

sklearn = pytest.importorskip("sklearn", reason="scikit-learn (dev extra) not installed")
imblearn = pytest.importorskip("imblearn", reason="imbalanced-learn (dev extra) not installed")

from imblearn.pipeline import make_pipeline  # noqa: E402
from imblearn.utils import estimator_checks as imblearn_checks  # noqa: E402
from sklearn.base import clone  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.model_selection import GridSearchCV, cross_val_score, cross_validate  # noqa: E402
from sklearn.multioutput import MultiOutputClassifier  # noqa: E402
from sklearn.utils.estimator_checks import check_estimator  # noqa: E402

import cobalance  # noqa: E402
from cobalance.sklearn import LPROS, LPRUS, MLROS, MLRUS, BalancedSampler, RepeatFactorSampler  # noqa: E402
from cobalance.training import MultilabelStratifiedKFold  # noqa: E402

SAMPLERS = [BalancedSampler(random_state=0), MLROS(random_state=0), MLRUS(random_state=0),
            LPROS(random_state=0), LPRUS(random_state=0), RepeatFactorSampler(random_state=0)]
IDS = [type(s).__name__ for s in SAMPLERS]

# imbalanced-learn's sampler checks that apply to multi-label samplers. Left out:
# check_target_type (asserts that multi-label targets are refused, the opposite of this
# module's purpose), check_samplers_fit and check_samplers_sampling_strategy_fit_resample
# (they test imbalanced-learn's `sampling_strategy` parameter, which these samplers do
# not have: their balance is set by the target or percentage), and
# check_samplers_sample_indices (it reads imbalanced-learn's private tag classes;
# sample_indices_ is tested below).
IMBLEARN_CHECKS = [getattr(imblearn_checks, "check_samplers_" + name) for name in
                   ("one_label", "fit_resample", "sparse", "pandas", "pandas_sparse", "string", "nan", "list",
                    "multiclass_ova", "preserve_dtype", "2d_target")]
IMBLEARN_CHECKS += [imblearn_checks.check_sampler_get_feature_names_out,
                    imblearn_checks.check_sampler_get_feature_names_out_pandas]


def _data(n=240, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 5))
    Y = (X[:, :4] + 0.5 * rng.normal(size=(n, 4)) > [0.0, 0.5, 1.0, 1.5]).astype(np.int64)
    return X, Y


@pytest.mark.parametrize("sampler", SAMPLERS, ids=IDS)
@pytest.mark.parametrize("check", IMBLEARN_CHECKS, ids=lambda c: c.__name__)
def test_imbalanced_learn_sampler_checks(sampler, check):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check(type(sampler).__name__, sampler)


@pytest.mark.parametrize("sampler", SAMPLERS, ids=IDS)
def test_scikit_learn_estimator_checks(sampler):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = check_estimator(sampler, on_fail=None)
    failed = [(r["check_name"], str(r["exception"])[:200]) for r in results if r["status"] == "failed"]
    assert failed == []
    assert sum(r["status"] == "passed" for r in results) >= 30


@pytest.mark.parametrize("sampler", SAMPLERS, ids=IDS)
def test_pipeline_cross_validate_with_multilabel_stratified_folds(sampler):
    X, Y = _data()
    model = make_pipeline(sampler, MultiOutputClassifier(LogisticRegression()))
    cv = MultilabelStratifiedKFold(3, random_state=0)
    scores = cross_validate(model, X, Y, cv=cv, scoring="f1_macro")["test_score"]
    assert scores.shape == (3,) and np.all((scores > 0.3) & (scores <= 1))
    assert cross_val_score(model, X, Y, cv=cv).shape == (3,)


def test_the_pipeline_trains_its_classifier_on_the_resampled_rows():
    X, Y = _data()
    sampler = BalancedSampler(random_state=0)
    model = make_pipeline(sampler, MultiOutputClassifier(LogisticRegression())).fit(X, Y)
    fitted = model.steps[0][1]
    idx = fitted.sample_indices_
    direct = MultiOutputClassifier(LogisticRegression()).fit(X[idx], Y[idx])
    np.testing.assert_allclose(model.predict_proba(X)[2], direct.predict_proba(X)[2])
    assert len(idx) > len(X)  # oversampled: the classifier saw duplicates


def test_samplers_match_the_library_functions():
    X, Y = _data()
    expected = {
        BalancedSampler(random_state=3): cobalance.Balancer(random_state=3).fit(Y).plan_,
        MLROS(percentage=30, random_state=3): cobalance.ml_ros(Y, 30, random_state=3),
        MLRUS(percentage=10, random_state=3): cobalance.ml_rus(Y, 10, random_state=3),
        LPROS(random_state=3): cobalance.lp_ros(Y, 25, random_state=3),
        LPRUS(random_state=3): cobalance.lp_rus(Y, 25, random_state=3),
        RepeatFactorSampler(threshold=0.3): cobalance.repeat_factor(Y, 0.3),
        RepeatFactorSampler(budget=0.25, random_state=3):
            cobalance.repeat_factor(Y, n_samples_out=300, random_state=3),
    }
    for sampler, plan in expected.items():
        X_res, Y_res = sampler.fit_resample(X, Y)
        np.testing.assert_array_equal(sampler.plan_.copies, plan.copies)
        np.testing.assert_array_equal(sampler.sample_indices_, np.repeat(np.arange(len(X)), plan.copies))
        np.testing.assert_array_equal(X_res, X[sampler.sample_indices_])
        np.testing.assert_array_equal(Y_res, Y[sampler.sample_indices_])


def test_balanced_sampler_takes_the_balancer_parameters_and_clones():
    params = cobalance.Balancer().get_params()
    sampler = BalancedSampler(target="sqrt", budget=0.25)
    assert set(sampler.get_params()) == set(params)
    assert sampler.get_params()["target"] == "sqrt" and sampler.get_params()["gamma"] == params["gamma"]
    twin = clone(sampler)
    assert twin is not sampler and twin.get_params() == sampler.get_params()
    with pytest.raises(TypeError):
        BalancedSampler(no_such_parameter=1)
    X, Y = _data()
    X_res, _ = sampler.fit_resample(X, Y)
    assert len(X_res) == round(1.25 * len(X))
    assert sampler.balancer_.report_ is not None


def test_grid_search_tunes_the_sampler_inside_the_pipeline():
    X, Y = _data()
    model = make_pipeline(BalancedSampler(random_state=0), MultiOutputClassifier(LogisticRegression()))
    search = GridSearchCV(model, {"balancedsampler__budget": [0.1, 0.3]}, cv=MultilabelStratifiedKFold(3, random_state=0))
    search.fit(X, Y)
    assert search.best_params_["balancedsampler__budget"] in (0.1, 0.3)


def test_dataframe_labels_keep_their_column_names():
    pd = pytest.importorskip("pandas")
    X, Y = _data()
    frame = pd.DataFrame(Y, columns=["cat", "dog", "bird", "fish"])
    sampler = MLROS(random_state=0)
    _, Y_res = sampler.fit_resample(pd.DataFrame(X), frame)
    assert list(Y_res.columns) == ["cat", "dog", "bird", "fish"]
    assert list(sampler.classes_) == ["cat", "dog", "bird", "fish"]
    np.testing.assert_array_equal(Y_res.to_numpy(), Y[sampler.sample_indices_])


def test_sparse_labels_and_features_are_resampled_as_sparse():
    sparse = pytest.importorskip("scipy.sparse")
    X, Y = _data()
    sampler = LPROS(random_state=0)
    X_res, Y_res = sampler.fit_resample(sparse.csr_matrix(X), sparse.csr_matrix(Y))
    assert sparse.issparse(X_res) and sparse.issparse(Y_res)
    np.testing.assert_array_equal(Y_res.toarray(), Y[sampler.sample_indices_])


def test_bad_input_names_what_was_expected():
    X, Y = _data()
    with pytest.raises(ValueError, match="same number of samples"):
        BalancedSampler().fit_resample(X[:-1], Y)
    with pytest.raises(ValueError, match="Unknown label type"):
        BalancedSampler().fit_resample(X, np.linspace(0, 1, len(X)))
    with pytest.raises(ValueError, match="one class only"):
        MLROS().fit_resample(X, np.zeros(len(X)))
    with pytest.raises(ValueError, match="requires y"):
        MLROS().fit_resample(X, None)
    with pytest.raises(ValueError, match="threshold or budget"):
        RepeatFactorSampler(threshold=0.1, budget=0.2).fit_resample(X, Y)
    with pytest.raises(ValueError, match="budget must be"):
        RepeatFactorSampler(budget=-1).fit_resample(X, Y)
    with pytest.raises(ValueError, match="gamma"):
        BalancedSampler(gamma=-1).fit_resample(X, Y)


def test_stratified_folds_take_x_and_y_like_scikit_learn_splitters():
    X, Y = _data()
    cv = MultilabelStratifiedKFold(4, random_state=1)
    assert cv.get_n_splits(X, Y) == 4
    by_labels = [test for _, test in cv.split(Y)]
    by_xy = [test for _, test in cv.split(X, Y)]
    for a, b in zip(by_labels, by_xy):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="same number of samples"):
        next(cv.split(X[:-1], Y))
