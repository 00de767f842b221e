"""The native balancing problem: losses, gradients, marginals and input validation."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cobalance import _core

from balance_reference import (
    ALL_OBJECTIVES,
    ALL_REGULARIZERS,
    random_problem,
    reference_loss,
    torch_loss,
)

COMBOS = [(o, r) for o in ALL_OBJECTIVES for r in ALL_REGULARIZERS]


def make(prob, weights=True):
    return _core.BalanceProblem(prob["indptr"], prob["indices"], prob["counts"], prob["dense"].shape[1],
                                prob["target"], prob["class_weights"] if weights else None)


# (40, 9): the products run over the entries in row order; (30, 200): many classes per
# entry, so they run over the by-class lists.
@pytest.mark.parametrize("shape", [(40, 9), (30, 200)])
@pytest.mark.parametrize("objective,regularizer", COMBOS)
def test_loss_and_gradient_match_dense_reference(objective, regularizer, shape):
    torch = pytest.importorskip("torch")
    k, c = shape
    rng = np.random.default_rng(1)
    prob = random_problem(rng, k, c, weights=True)
    problem = make(prob)
    alpha = rng.random(k) * 5 + 0.1
    for gamma in [0.0, 0.37]:
        expected = reference_loss(prob, alpha, objective, regularizer, gamma)
        assert problem.loss(alpha, objective, regularizer, gamma) == pytest.approx(expected, rel=1e-12)
        value, grad = problem.loss_and_gradient(alpha, objective, regularizer, gamma)
        assert value == pytest.approx(expected, rel=1e-12)
        t_alpha = torch.tensor(alpha, dtype=torch.float64, requires_grad=True)
        torch_loss(torch, prob, t_alpha, objective, regularizer, gamma).backward()
        np.testing.assert_allclose(grad, t_alpha.grad.numpy(), rtol=1e-9, atol=1e-12 * np.abs(grad).max())


@pytest.mark.parametrize("objective,regularizer", COMBOS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gradient_matches_central_differences(objective, regularizer, seed):
    rng = np.random.default_rng(seed)
    k, c = 25, 7
    prob = random_problem(rng, k, c, weights=seed == 2)
    problem = make(prob)
    alpha = rng.random(k) * 3 + 0.5
    gamma = 0.05
    _, grad = problem.loss_and_gradient(alpha, objective, regularizer, gamma)
    # Differences of the dense numpy reference, so the check is independent of the C++ loss.
    fd = np.empty(k)
    for j in range(k):
        h = 1e-6 * max(1.0, alpha[j])
        e = np.zeros(k)
        e[j] = h
        fd[j] = (reference_loss(prob, alpha + e, objective, regularizer, gamma)
                 - reference_loss(prob, alpha - e, objective, regularizer, gamma)) / (2 * h)
    np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-6 * np.abs(fd).max())


@pytest.mark.parametrize("objective,regularizer", COMBOS)
def test_gradient_matches_torch_autograd(objective, regularizer):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(7)
    k, c = 60, 12
    prob = random_problem(rng, k, c, weights=True)
    problem = make(prob)
    alpha = rng.random(k) * 4 + 0.01
    gamma = 0.3
    t_alpha = torch.tensor(alpha, dtype=torch.float64, requires_grad=True)
    t_loss = torch_loss(torch, prob, t_alpha, objective, regularizer, gamma)
    t_loss.backward()
    value, grad = problem.loss_and_gradient(alpha, objective, regularizer, gamma)
    assert value == pytest.approx(t_loss.item(), rel=1e-12)
    np.testing.assert_allclose(grad, t_alpha.grad.numpy(), rtol=1e-6, atol=1e-12 * np.abs(grad).max())


def test_fraction_l2_gradient_is_zero_at_an_exact_fit():
    # Two patterns {0} and {1}; equal alpha gives f = (0.5, 0.5) = d exactly.
    problem = _core.BalanceProblem(np.array([0, 1, 2]), np.array([0, 1]), np.array([1.0, 3.0]), 2,
                                   np.array([0.5, 0.5]))
    value, grad = problem.loss_and_gradient(np.array([2.0, 2.0]), "fraction_l2", "none", 0.0)
    assert value == 0.0
    np.testing.assert_array_equal(grad, [0.0, 0.0])


def test_marginals_match_dense_reference():
    rng = np.random.default_rng(3)
    prob = random_problem(rng, 100, 20)
    problem = make(prob)
    alpha = rng.random(100)
    np.testing.assert_allclose(problem.marginals(alpha), prob["dense"].T @ alpha / alpha.sum(), rtol=1e-13)
    assert problem.n_patterns == 100 and problem.n_classes == 20 and problem.nnz == prob["indices"].size


def test_integer_counts_and_default_weights():
    rng = np.random.default_rng(4)
    prob = random_problem(rng, 30, 5)
    problem = _core.BalanceProblem(prob["indptr"], prob["indices"], prob["counts"].astype(np.int64), 5,
                                   prob["target"])
    alpha = rng.random(30) + 0.1
    assert problem.loss(alpha, "fraction", "ratio", 0.2) == pytest.approx(
        reference_loss(prob, alpha, "fraction", "ratio", 0.2), rel=1e-12)


def sparse_long_tailed(rng, k, c):
    """CSR patterns without a dense K x C matrix (class i present with probability 0.9 / (i + 1))."""
    rows = [rng.choice(k, size=rng.binomial(k, 0.9 / (i + 1)), replace=False) for i in range(c)]
    cols = np.concatenate([np.full(r.size, i) for i, r in enumerate(rows)])
    rows = np.concatenate(rows)
    order = np.lexsort((cols, rows))
    indptr = np.zeros(k + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=k), out=indptr[1:])
    return indptr, cols[order].astype(np.int64)


# Large enough (nnz + K > 4 * 65536) that up to 8 threads really split the work; C = 6
# runs the products in row order, C = 2000 over the by-class lists.
@pytest.mark.parametrize("n_classes", [6, 2000])
@pytest.mark.parametrize("objective,regularizer", [("fraction", "proportions"), ("geo", "counts"),
                                                   ("fraction_l2", "ratio")])
def test_thread_count_does_not_change_a_bit(objective, regularizer, n_classes):
    rng = np.random.default_rng(5)
    indptr, indices = sparse_long_tailed(rng, 150_000, n_classes)
    problem = _core.BalanceProblem(indptr, indices, rng.integers(1, 30, 150_000), n_classes,
                                   rng.random(n_classes))
    assert problem.n_blocks > 8
    alpha = rng.random(150_000) * 10
    ref_value, ref_grad = problem.loss_and_gradient(alpha, objective, regularizer, 0.1, n_threads=1)
    ref_marg = problem.marginals(alpha, n_threads=1)
    for threads in [2, 3, 8]:
        value, grad = problem.loss_and_gradient(alpha, objective, regularizer, 0.1, n_threads=threads)
        assert value == ref_value
        np.testing.assert_array_equal(grad, ref_grad)
        np.testing.assert_array_equal(problem.marginals(alpha, n_threads=threads), ref_marg)


# --- bad input -------------------------------------------------------------------------

def base_args():
    return dict(indptr=np.array([0, 1, 3]), indices=np.array([0, 0, 1]), counts=np.array([2.0, 5.0]),
                n_classes=2, target=np.array([0.5, 0.4]))


@pytest.mark.parametrize("change,needle", [
    (dict(indptr=np.array([0, 1])), "indptr"),
    (dict(indptr=np.array([1, 1, 3])), "indptr"),
    (dict(indptr=np.array([0, 2, 1])), "indptr"),
    (dict(indptr=np.array([0, 1, 4])), "indptr"),
    (dict(indices=np.array([0, 2, 1])), "indices"),
    (dict(indices=np.array([0, -1, 1])), "indices"),
    (dict(indices=np.array([0, 1, 1])), "repeat"),
    (dict(counts=np.array([0.0, 5.0])), "counts"),
    (dict(counts=np.array([np.nan, 5.0])), "counts"),
    (dict(target=np.array([0.5])), "target"),
    (dict(target=np.array([1.5, 0.2])), "target"),
    (dict(target=np.array([np.nan, 0.2])), "target"),
    (dict(target=np.array([-0.1, 0.2])), "target"),
    (dict(n_classes=0), "n_classes"),
    (dict(class_weights=np.array([1.0, -1.0])), "class_weights"),
    (dict(class_weights=np.array([1.0, np.nan])), "class_weights"),
    (dict(class_weights=np.array([1.0])), "class_weights"),
])
def test_bad_problem_raises_value_error_naming_argument(change, needle):
    args = base_args()
    args.update(change)
    with pytest.raises(ValueError, match=needle):
        _core.BalanceProblem(**args)


def test_bad_evaluation_arguments():
    problem = _core.BalanceProblem(**base_args())
    alpha = np.array([1.0, 2.0])
    with pytest.raises(ValueError, match="objective.*fraction.*fraction_l2.*geo"):
        problem.loss(alpha, "l2", "none", 0.0)
    with pytest.raises(ValueError, match="regularizer.*none.*counts.*proportions.*ratio"):
        problem.loss(alpha, "fraction", "entropy", 0.0)
    with pytest.raises(ValueError, match="gamma"):
        problem.loss(alpha, "fraction", "counts", -1.0)
    with pytest.raises(ValueError, match="gamma"):
        problem.loss_and_gradient(alpha, "fraction", "counts", float("nan"))
    with pytest.raises(ValueError, match="alpha"):
        problem.loss(np.array([1.0, np.nan]), "fraction", "none", 0.0)
    with pytest.raises(ValueError, match="alpha"):
        problem.loss(np.array([1.0, -1.0]), "fraction", "none", 0.0)
    with pytest.raises(ValueError, match="alpha"):
        problem.loss(np.array([0.0, 0.0]), "fraction", "none", 0.0)
    with pytest.raises(ValueError, match="alpha"):
        problem.loss_and_gradient(np.array([1.0, 2.0, 3.0]), "fraction", "none", 0.0)
    with pytest.raises(ValueError, match="alpha"):
        problem.marginals(np.ones((2, 1)))


def test_geo_with_zero_target_raises():
    args = base_args()
    args["target"] = np.array([0.0, 0.0])
    problem = _core.BalanceProblem(**args)
    with pytest.raises(ValueError, match="target"):
        problem.loss(np.array([1.0, 1.0]), "geo", "none", 0.0)


# --- property tests ---------------------------------------------------------------------

@st.composite
def problems(draw):
    k = draw(st.integers(1, 12))
    c = draw(st.integers(1, 6))
    rows = [sorted(draw(st.sets(st.integers(0, c - 1), max_size=c))) for _ in range(k)]
    counts = draw(st.lists(st.floats(0.5, 1e4), min_size=k, max_size=k))
    target = draw(st.lists(st.floats(0.0, 1.0), min_size=c, max_size=c))
    weights = draw(st.lists(st.floats(0.0, 10.0), min_size=c, max_size=c))
    alpha = draw(st.lists(st.floats(0.0, 1e3), min_size=k, max_size=k).filter(lambda a: sum(a) > 1e-3))
    dense = np.zeros((k, c))
    for j, row in enumerate(rows):
        dense[j, row] = 1
    prob = dict(dense=dense, indptr=np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64),
                indices=np.array([i for r in rows for i in r], dtype=np.int64), counts=np.array(counts),
                target=np.array(target), class_weights=np.array(weights))
    return prob, np.array(alpha)


@settings(max_examples=60, deadline=None)
@given(problems(), st.sampled_from(["fraction", "fraction_l2"]), st.sampled_from(ALL_REGULARIZERS),
       st.floats(0.0, 5.0))
def test_property_loss_matches_reference(case, objective, regularizer, gamma):
    prob, alpha = case
    problem = make(prob)
    value, grad = problem.loss_and_gradient(alpha, objective, regularizer, gamma)
    expected = reference_loss(prob, alpha, objective, regularizer, gamma)
    assert value == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert np.all(np.isfinite(grad))
    f = problem.marginals(alpha)
    np.testing.assert_allclose(f, prob["dense"].T @ alpha / alpha.sum(), rtol=1e-12, atol=1e-15)
    assert np.all((f >= 0) & (f <= 1 + 1e-12))


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 5), st.integers(1, 4), st.data())
def test_property_invalid_indices_are_rejected(k, c, data):
    bad = data.draw(st.one_of(st.integers(c, c + 100), st.integers(-100, -1)))
    indices = np.zeros(k, dtype=np.int64)
    indices[data.draw(st.integers(0, k - 1))] = bad
    with pytest.raises(ValueError, match="indices"):
        _core.BalanceProblem(np.arange(k + 1), indices, np.ones(k), c, np.full(c, 0.5))
