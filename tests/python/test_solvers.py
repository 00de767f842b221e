"""Native solvers: bounded Adam against torch.optim.Adam, the exact solver against KKT and scipy."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cobalance import _core

from balance_reference import problem_in_p, random_problem, reference_loss, torch_loss


def make(prob):
    return _core.BalanceProblem(prob["indptr"], prob["indices"], prob["counts"], prob["dense"].shape[1],
                                prob["target"], prob["class_weights"])


# --- Adam ------------------------------------------------------------------------------

TORCH_CASES = [("fraction", "proportions", 1e-3), ("fraction_l2", "counts", 0.01), ("geo", "ratio", 0.02),
               ("fraction", "none", 0.0)]


def torch_adam_run(torch, prob, case, start, lr, betas, eps, constrain, steps=100):
    """torch.optim.Adam from `start`, each step followed by constrain(param, optimizer state, step)
    (in place, without grad). Returns the losses at every iterate and the iterates by step."""
    objective, regularizer, gamma = case
    param = torch.tensor(start, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([param], lr=lr, betas=betas, eps=eps)
    losses, trajectory = [], {0: np.array(start, dtype=np.float64)}
    for step in range(1, steps + 1):
        opt.zero_grad()
        loss = torch_loss(torch, prob, param, objective, regularizer, gamma)
        losses.append(loss.item())
        loss.backward()
        opt.step()
        with torch.no_grad():
            constrain(param, opt.state[param], step)
        trajectory[step] = param.detach().numpy().copy()
    losses.append(torch_loss(torch, prob, param, objective, regularizer, gamma).item())
    return losses, trajectory


def torch_test_problem(rng):
    """The trajectory tests' problem: 40 weighted patterns over 8 classes, none empty."""
    prob = random_problem(rng, 40, 8, weights=True, empty_rows=False)
    return prob, make(prob), prob["counts"]


@pytest.mark.parametrize("case", TORCH_CASES)
def test_adam_trajectory_equals_torch_adam_with_clamp(case):
    torch = pytest.importorskip("torch")
    objective, regularizer, gamma = case
    rng = np.random.default_rng(11)
    prob, problem, n = torch_test_problem(rng)
    lower, upper = 0.8 * n, 1.5 * n  # tight enough that the clamp is active along the way
    alpha0 = n.copy()
    lr, betas, eps = 0.2, (0.85, 0.99), 1e-8

    lo_t, hi_t = torch.tensor(lower), torch.tensor(upper)
    losses, trajectory = torch_adam_run(
        torch, prob, case, alpha0, lr, betas, eps,
        lambda param, state, step: param.copy_(torch.minimum(torch.maximum(param, lo_t), hi_t)))
    clamped = any(((a == lower) | (a == upper)).any() for a in trajectory.values())

    for steps in [1, 10, 57, 100]:
        out = _core.adam(problem, alpha0, lower, upper, objective, regularizer, gamma, lr, beta1=betas[0],
                         beta2=betas[1], eps=eps, max_iter=steps)
        assert out["n_iter"] == steps and not out["converged"]
        np.testing.assert_allclose(out["alpha"], trajectory[steps], rtol=1e-9, atol=0)
        np.testing.assert_allclose(out["history"], losses[: steps + 1], rtol=1e-9, atol=0)
    assert clamped  # the test exercised the bounds


def test_adam_history_and_tolerance_stop():
    rng = np.random.default_rng(12)
    prob = random_problem(rng, 30, 6)
    problem = make(prob)
    n = prob["counts"]
    out = _core.adam(problem, n, np.zeros(30), 50 * n, "fraction", "proportions", 1e-3, 0.05, max_iter=5000,
                     tol=1e-9)
    hist = out["history"]
    assert out["converged"] and out["n_iter"] < 5000 and hist.size == out["n_iter"] + 1
    assert hist[0] == pytest.approx(reference_loss(prob, n, "fraction", "proportions", 1e-3), rel=1e-12)
    assert hist[-1] == pytest.approx(reference_loss(prob, out["alpha"], "fraction", "proportions", 1e-3),
                                     rel=1e-12)
    assert abs(hist[-2] - hist[-1]) <= 1e-9 * abs(hist[-2])
    assert np.all(np.abs(np.diff(hist[:-1])) > 1e-9 * np.abs(hist[:-2]))  # did not stop earlier
    assert hist[-1] < hist[0]


def test_adam_is_thread_count_invariant():
    rng = np.random.default_rng(13)
    prob = random_problem(rng, 150_000, 5)  # nnz + K > 4 * 65536: several threads take part
    problem = make(prob)
    n = prob["counts"]
    runs = [_core.adam(problem, n, 0 * n, 10 * n, "fraction_l2", "ratio", 0.01, 0.1, max_iter=30, n_threads=t)
            for t in (1, 2, 5)]
    for r in runs[1:]:
        np.testing.assert_array_equal(r["alpha"], runs[0]["alpha"])
        np.testing.assert_array_equal(r["history"], runs[0]["history"])


def test_adam_bad_arguments():
    rng = np.random.default_rng(14)
    prob = random_problem(rng, 5, 3)
    problem = make(prob)
    n = prob["counts"]
    lo, hi = np.zeros(5), 10 * n

    def run(**kw):
        args = dict(problem=problem, alpha0=n, lower=lo, upper=hi, objective="fraction",
                    regularizer="proportions", gamma=0.1, lr=0.1)
        args.update(kw)
        return _core.adam(**args)

    for kw, needle in [
        (dict(lr=-0.1), "lr"), (dict(lr=0.0), "lr"), (dict(lr=float("nan")), "lr"),
        (dict(gamma=-1.0), "gamma"), (dict(beta1=1.0), "beta1"), (dict(beta2=-0.1), "beta2"),
        (dict(eps=0.0), "eps"), (dict(max_iter=-1), "max_iter"), (dict(tol=float("nan")), "tol"),
        (dict(lower=np.full(5, -1.0)), "lower"), (dict(lower=hi + 1), "lower"),
        (dict(lower=np.r_[np.nan, lo[1:]]), "lower"), (dict(upper=np.r_[np.nan, hi[1:]]), "upper"),
        (dict(lower=np.zeros(4)), "lower"), (dict(alpha0=np.r_[np.nan, n[1:]]), "alpha0"),
        (dict(alpha0=20 * n), "alpha0"), (dict(objective="l1"), "objective"),
        (dict(regularizer="l2"), "regularizer"),
    ]:
        with pytest.raises(ValueError, match=needle):
            run(**kw)


# --- Adam with a fixed total -----------------------------------------------------------

def project_by_bisection(y, metric, lower, upper, total):
    """argmin sum metric (q - y)^2 on {lower <= q <= upper, sum q = total}, by bisection on
    the multiplier tau of q = clip(y - tau / metric, lower, upper) (sum non-increasing in tau)."""
    top = np.where(np.isfinite(upper), upper, lower + total)
    lo_tau, hi_tau = np.min((y - top) * metric), np.max((y - lower) * metric)
    for _ in range(2000):
        mid = 0.5 * (lo_tau + hi_tau)
        if mid in (lo_tau, hi_tau):
            break
        if np.clip(y - mid / metric, lower, upper).sum() > total:
            lo_tau = mid
        else:
            hi_tau = mid
    return np.clip(y - 0.5 * (lo_tau + hi_tau) / metric, lower, upper)


@pytest.mark.parametrize("case", TORCH_CASES)
def test_adam_with_total_equals_torch_adam_with_projection(case):
    torch = pytest.importorskip("torch")
    objective, regularizer, gamma = case
    rng = np.random.default_rng(31)
    prob, problem, n = torch_test_problem(rng)
    total = 3.0 * n.sum()
    lower, upper = 1.5 * n, 4.5 * n  # tight enough that both bounds bind along the way
    alpha0 = n * (2.0 + rng.random(n.size))  # not feasible: projected before the first step
    lr, betas, eps = 2.0, (0.85, 0.99), 1e-8

    def project(param, state, step):
        # The projection in Adam's metric: the step's denominators sqrt(v_hat) + eps.
        metric = np.sqrt(state["exp_avg_sq"].numpy()) / np.sqrt(1 - betas[1] ** step) + eps
        param.copy_(torch.from_numpy(project_by_bisection(param.numpy(), metric, lower, upper, total)))

    start = project_by_bisection(alpha0, np.ones(n.size), lower, upper, total)
    losses, trajectory = torch_adam_run(torch, prob, case, start, lr, betas, eps, project)
    at_bounds = np.array([((a <= lower * (1 + 1e-12)) | (a >= upper * (1 - 1e-12))).any()
                          for a in trajectory.values()])
    assert at_bounds.sum() > 50  # the test exercised the bounds along the way

    for steps in [0, 1, 10, 57, 100]:
        out = _core.adam(problem, alpha0, lower, upper, objective, regularizer, gamma, lr, beta1=betas[0],
                         beta2=betas[1], eps=eps, max_iter=steps, total=total)
        assert out["n_iter"] == steps and not out["converged"]
        np.testing.assert_allclose(out["alpha"], trajectory[steps], rtol=1e-9, atol=0)
        np.testing.assert_allclose(out["history"], losses[: steps + 1], rtol=1e-9, atol=0)
        assert abs(out["alpha"].sum() - total) <= 1e-12 * total
        assert np.all(out["alpha"] >= lower) and np.all(out["alpha"] <= upper)


@pytest.mark.parametrize("objective,regularizer,gamma", [
    ("fraction", "proportions", 1e-3), ("fraction", "counts", 1e-6), ("fraction_l2", "ratio", 1e-3),
    ("fraction", "none", 0.0),
])
def test_adam_with_total_approaches_the_exact_optimum_where_caps_bind(objective, regularizer, gamma):
    rng = np.random.default_rng(32)
    k, c = 30, 6
    prob = random_problem(rng, k, c, empty_rows=False)
    problem = make(prob)
    n = prob["counts"]
    total = 20.0 * n.sum()
    lower, upper = np.zeros(k), 25.0 * n
    exact = _core.solve_exact(problem, objective, regularizer, gamma, total, lower, upper)
    assert exact["converged"]
    assert np.sum(exact["alpha"] >= upper * (1 - 1e-9)) >= 2  # the caps bind at the optimum
    alpha0 = n * (total / n.sum())
    gaps = []
    for iters in [300, 20000]:
        out = _core.adam(problem, alpha0, lower, upper, objective, regularizer, gamma, 3.0, max_iter=iters,
                         total=total)
        assert abs(out["alpha"].sum() - total) <= 1e-12 * total
        gaps.append(out["history"][-1] - exact["loss"])
    scale = max(exact["loss"], 1e-3)
    # No feasible point beats the optimum; Adam closes in on it.
    assert gaps[1] >= -1e-12 * scale and gaps[1] <= gaps[0] + 1e-12 * scale
    assert gaps[1] < 1e-8 * scale
    if regularizer != "none":  # a strictly convex loss: the optimum is unique
        np.testing.assert_allclose(out["alpha"], exact["alpha"], rtol=0, atol=1e-2 * total / k)
    # KKT at Adam's last point, from scratch (the gradient of the loss in alpha).
    _, grad = problem_in_p(prob, objective, regularizer, gamma, total)(out["alpha"] / total)
    lo, hi = lower / total, upper / total
    p = out["alpha"] / total
    free = (p > lo + 1e-7) & (p < hi - 1e-7)
    lam = np.median(grad[free])
    tol = 1e-4 * max(1.0, np.abs(grad).max())
    assert np.all(np.abs(grad[free] - lam) <= tol)
    assert np.all(grad[p <= lo + 1e-7] >= lam - tol) and np.all(grad[p >= hi - 1e-7] <= lam + tol)


def test_adam_with_total_is_thread_count_invariant():
    rng = np.random.default_rng(33)
    prob = random_problem(rng, 150_000, 5)  # several threads take part
    problem = make(prob)
    n = prob["counts"]
    total = 2.0 * n.sum()
    runs = [_core.adam(problem, 2 * n, 0 * n, 3 * n, "fraction_l2", "ratio", 0.01, 0.1, max_iter=20, n_threads=t,
                       total=total) for t in (1, 2, 5)]
    for r in runs[1:]:
        np.testing.assert_array_equal(r["alpha"], runs[0]["alpha"])
        np.testing.assert_array_equal(r["history"], runs[0]["history"])
    assert abs(runs[0]["alpha"].sum() - total) <= 1e-12 * total


def test_adam_with_total_bad_arguments():
    rng = np.random.default_rng(34)
    prob = random_problem(rng, 5, 3)
    problem = make(prob)
    n = prob["counts"]
    lo, hi = 0.5 * n, 10 * n

    def run(**kw):
        args = dict(problem=problem, alpha0=n, lower=lo, upper=hi, objective="fraction",
                    regularizer="proportions", gamma=0.1, lr=0.1, max_iter=3)
        args.update(kw)
        return _core.adam(**args)

    for total in [float("nan"), float("inf"), 0.0, -1.0, 0.49 * n.sum(), 10.01 * n.sum()]:
        with pytest.raises(ValueError, match="total"):
            run(total=total)
    with pytest.raises(ValueError, match=r"\[sum\(lower\), sum\(upper\)\]"):
        run(total=11 * n.sum())
    for kw, needle in [(dict(alpha0=np.r_[np.nan, n[1:]]), "alpha0"), (dict(alpha0=-n), "alpha0"),
                       (dict(lower=np.zeros(4)), "lower"), (dict(lr=0.0), "lr")]:
        with pytest.raises(ValueError, match=needle):
            run(total=n.sum(), **kw)
    # The bounds' ends are feasible totals, and alpha0 outside the bounds is projected.
    for total in [0.5 * n.sum(), 10 * n.sum()]:
        out = run(total=total, alpha0=20 * n)
        assert abs(out["alpha"].sum() - total) <= 1e-12 * total


# --- the exact solver ------------------------------------------------------------------

def check_kkt(prob, objective, regularizer, gamma, total, lower, upper, p, tol):
    """KKT of min loss(p) on {sum p = 1, lower/total <= p <= upper/total}, checked from scratch."""
    lo, hi = lower / total, upper / total
    if objective == "fraction_l2":
        # sqrt(F) + gamma R has the KKT conditions of F + mu R, mu = 2 gamma sqrt(F); this
        # form stays valid at an exact fit (F = 0), where sqrt is not differentiable.
        f_value, _ = problem_in_p(prob, "fraction", "none", 0.0, total)(p)
        objective, gamma = "fraction", 2 * gamma * np.sqrt(f_value)
    _, grad = problem_in_p(prob, objective, regularizer, gamma, total)(p)
    assert abs(p.sum() - 1) < 1e-12
    assert np.all(p >= lo - 1e-15) and np.all(p <= hi + 1e-15)
    slack = 1e-9
    free = (p > lo + slack) & (p < hi - slack)
    scale = max(1.0, np.abs(grad).max())
    # The multiplier: the common gradient value on the free entries.
    lam = np.median(grad[free]) if free.any() else np.median(grad)
    assert np.all(np.abs(grad[free] - lam) <= tol * scale)
    at_lower = ~free & (p <= lo + slack)
    at_upper = ~free & (p >= hi - slack)
    assert np.all(grad[at_lower] >= lam - tol * scale)
    assert np.all(grad[at_upper] <= lam + tol * scale)


CASES = [("fraction", "none", 0.0), ("fraction", "proportions", 1e-3), ("fraction", "counts", 1e-4),
         ("fraction", "ratio", 1e-3), ("fraction_l2", "none", 0.0), ("fraction_l2", "proportions", 1e-3),
         ("fraction_l2", "counts", 1e-3), ("fraction_l2", "ratio", 1e-2)]


@pytest.mark.parametrize("objective,regularizer,gamma", CASES)
@pytest.mark.parametrize("seed", [0, 1])
def test_exact_solver_satisfies_kkt_and_matches_scipy(objective, regularizer, gamma, seed):
    optimize = pytest.importorskip("scipy.optimize")
    rng = np.random.default_rng(100 + seed)
    k, c = 12, 5
    prob = random_problem(rng, k, c, weights=seed == 1)
    problem = make(prob)
    n = prob["counts"]
    total = 1.5 * n.sum()
    lower, upper = 0.2 * n, 6.0 * n
    out = _core.solve_exact(problem, objective, regularizer, gamma, total, lower, upper, tol=1e-11)
    assert out["converged"] and out["kkt_residual"] <= 1e-11
    p = out["p"]
    np.testing.assert_allclose(out["alpha"], total * p, rtol=1e-15)
    check_kkt(prob, objective, regularizer, gamma, total, lower, upper, p, 1e-7)

    fun = problem_in_p(prob, objective, regularizer, gamma, total)
    ref_loss = reference_loss(prob, out["alpha"], objective, regularizer, gamma)
    assert out["loss"] == pytest.approx(ref_loss, rel=1e-12)
    f = prob["dense"].T @ p
    np.testing.assert_allclose(out["marginals"], f, rtol=1e-12, atol=1e-15)
    assert out["max_abs_error"] == pytest.approx(np.abs(f - prob["target"]).max(), rel=1e-12)

    # scipy's SLSQP from several starts: none may beat the exact optimum.
    best = np.inf
    for start in [n / n.sum(), np.clip(rng.random(k), lower / total, upper / total)]:
        res = optimize.minimize(lambda q: fun(q)[0], start / start.sum(), jac=lambda q: fun(q)[1],
                                method="SLSQP", bounds=list(zip(lower / total, upper / total)),
                                constraints=[{"type": "eq", "fun": lambda q: q.sum() - 1,
                                              "jac": lambda q: np.ones_like(q)}],
                                options=dict(ftol=1e-15, maxiter=1000))
        if abs(res.x.sum() - 1) < 1e-9:
            best = min(best, fun(np.clip(res.x, lower / total, upper / total))[0])
    assert fun(p)[0] <= best + 1e-9
    assert fun(p)[0] == pytest.approx(best, rel=1e-6, abs=1e-9)


def test_adam_approaches_the_exact_optimum():
    rng = np.random.default_rng(21)
    k, c = 30, 6
    prob = random_problem(rng, k, c, empty_rows=False)
    problem = make(prob)
    n = prob["counts"]
    # Scale-free loss and bounds [0, inf): Adam's feasible proportions are the whole simplex,
    # the same set as the exact problem's for any total.
    lower, upper = np.zeros(k), np.full(k, np.inf)
    exact = _core.solve_exact(problem, "fraction", "proportions", 1e-4, n.sum(), lower, upper)
    assert exact["converged"]
    gaps = []
    for iters in [100, 3000]:
        out = _core.adam(problem, n, lower, upper, "fraction", "proportions", 1e-4, 0.05, max_iter=iters)
        gaps.append(out["history"][-1] - exact["loss"])
    assert gaps[0] > 0 and gaps[1] >= -1e-12
    assert gaps[1] < 1e-6 * exact["loss"] and gaps[1] < gaps[0]


@pytest.mark.parametrize("regularizer,gamma", [("proportions", 1e-3), ("none", 0.0)])  # dual Newton, FISTA
def test_exact_solver_is_thread_count_invariant(regularizer, gamma):
    rng = np.random.default_rng(22)
    prob = random_problem(rng, 150_000, 5)  # several threads take part
    problem = make(prob)
    n = prob["counts"]
    runs = [_core.solve_exact(problem, "fraction", regularizer, gamma, n.sum(), 0 * n, 20 * n, max_iter=3,
                              n_threads=t) for t in (1, 2, 5)]
    for r in runs[1:]:
        np.testing.assert_array_equal(r["p"], runs[0]["p"])
        assert r["loss"] == runs[0]["loss"] and r["n_iter"] == runs[0]["n_iter"]


def test_exact_solver_bad_arguments():
    rng = np.random.default_rng(23)
    prob = random_problem(rng, 6, 3)
    problem = make(prob)
    n = prob["counts"]

    def run(**kw):
        args = dict(problem=problem, objective="fraction", regularizer="none", gamma=0.0, total=n.sum(),
                    lower=0 * n, upper=5 * n)
        args.update(kw)
        return _core.solve_exact(**args)

    for kw, needle in [
        (dict(objective="geo"), "geo"), (dict(objective="bad"), "objective"), (dict(gamma=-1.0), "gamma"),
        (dict(total=0.0), "total"), (dict(total=float("nan")), "total"), (dict(total=10 * n.sum()), "total"),
        (dict(lower=n * 2), "total"), (dict(lower=-n), "lower"), (dict(upper=n * 0.5, lower=n), "lower"),
        (dict(tol=-1.0), "tol"), (dict(max_iter=-5), "max_iter"), (dict(upper=np.full(6, np.nan)), "upper"),
    ]:
        with pytest.raises(ValueError, match=needle):
            run(**kw)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(2, 15), st.integers(1, 6),
       st.sampled_from(CASES), st.floats(0.3, 3.0), st.booleans())
def test_property_exact_solver_meets_kkt(seed, k, c, case, size, unbounded):
    objective, regularizer, gamma = case
    rng = np.random.default_rng(seed)
    prob = random_problem(rng, k, c, weights=True)
    problem = make(prob)
    n = prob["counts"]
    total = size * n.sum()
    lower = rng.random(k) * n * min(size, 1.0)
    upper = np.full(k, np.inf) if unbounded else lower + n * (1 + 5 * rng.random(k))
    if upper.sum() < total:
        upper *= total / upper.sum() * 1.01
    out = _core.solve_exact(problem, objective, regularizer, gamma, total, lower, upper)
    assert out["converged"], out
    check_kkt(prob, objective, regularizer, gamma, total, lower, upper, out["p"], 1e-7)
    assert np.all(out["alpha"] >= lower * (1 - 1e-12)) and np.all(out["alpha"] <= upper * (1 + 1e-12))


def test_exact_solver_fraction_l2_at_an_exact_fit_matches_slsqp():
    # One class: any target between the patterns' fractions is met exactly, so the
    # optimum of sqrt(F) + gamma R sits on the kink F = 0.
    optimize = pytest.importorskip("scipy.optimize")
    rng = np.random.default_rng(0)
    k = 8
    prob = random_problem(rng, k, 1, weights=True)
    problem = make(prob)
    n = prob["counts"]
    total = 3.0 * n.sum()
    lower, upper = rng.random(k) * n, np.full(k, np.inf)
    out = _core.solve_exact(problem, "fraction_l2", "ratio", 0.01, total, lower, upper)
    assert out["converged"]
    fun = problem_in_p(prob, "fraction_l2", "ratio", 0.01, total)
    lo = lower / total
    best = np.inf
    for _ in range(4):
        start = np.clip(rng.random(k), lo, 1)
        res = optimize.minimize(lambda q: fun(q)[0], start / start.sum(), method="SLSQP",
                                bounds=[(a, 1.0) for a in lo],
                                constraints=[{"type": "eq", "fun": lambda q: q.sum() - 1}],
                                options=dict(ftol=1e-14, maxiter=2000))
        if abs(res.x.sum() - 1) < 1e-9:
            best = min(best, fun(np.clip(res.x, lo, None))[0])
    assert fun(out["p"])[0] == pytest.approx(best, rel=1e-6)
    assert out["max_abs_error"] < 1e-7
