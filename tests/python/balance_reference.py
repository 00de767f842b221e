"""Dense numpy references for the balancing losses, written from their definitions.

Shared by test_objectives.py and test_solvers.py; independent of the C++ code.
"""

import numpy as np


def random_problem(rng, n_patterns, n_classes, *, weights=False, empty_rows=True):
    """Long-tailed sparse patterns (class c present with probability ~0.9 / (c + 1))."""
    prob = 0.9 / np.arange(1, n_classes + 1)
    dense = (rng.random((n_patterns, n_classes)) < prob).astype(np.int64)
    if not empty_rows:
        dense[dense.sum(1) == 0, 0] = 1
    indptr = np.concatenate([[0], np.cumsum(dense.sum(1))]).astype(np.int64)
    indices = np.nonzero(dense)[1].astype(np.int64)
    counts = rng.integers(1, 30, n_patterns).astype(np.float64)
    target = rng.random(n_classes)
    class_weights = rng.random(n_classes) + 0.2 if weights else np.ones(n_classes)
    return dict(dense=dense.astype(np.float64), indptr=indptr, indices=indices, counts=counts,
                target=target, class_weights=class_weights)


def _loss(xp, u, n, d, w, alpha, objective, regularizer, gamma):
    """The loss from its definition, on numpy arrays (xp = numpy) or torch tensors (xp = torch)."""
    s = alpha.sum()
    g = u.T @ alpha
    if objective == "geo":
        value = xp.sum(w * (g / xp.linalg.norm(g) - d / xp.linalg.norm(d)) ** 2)
    else:
        value = xp.sum(w * (g / s - d) ** 2)
        if objective == "fraction_l2":
            value = xp.sqrt(value)
    p, p0 = alpha / s, n / n.sum()
    if regularizer == "counts":
        reg = xp.sum((alpha / n - 1) ** 2)
    elif regularizer == "proportions":
        reg = xp.sum((100 * (p - p0)) ** 2)
    elif regularizer == "ratio":
        reg = xp.sum((p / p0 - 1) ** 2)
    else:
        reg = 0.0
    return value + gamma * reg


def reference_loss(prob, alpha, objective, regularizer, gamma):
    return _loss(np, prob["dense"], prob["counts"], prob["target"], prob["class_weights"], alpha, objective,
                 regularizer, gamma)


def torch_loss(torch, prob, alpha, objective, regularizer, gamma):
    """The same loss on torch tensors (float64), for autograd."""
    u, n, d, w = (torch.as_tensor(prob[key], dtype=torch.float64)
                  for key in ("dense", "counts", "target", "class_weights"))
    return _loss(torch, u, n, d, w, alpha, objective, regularizer, gamma)


def problem_in_p(prob, objective, regularizer, gamma, total):
    """The exact problem's loss and gradient as functions of p (sum p = 1 implied)."""
    u, n, d, w = prob["dense"], prob["counts"], prob["target"], prob["class_weights"]
    p0 = n / n.sum()

    def reg_and_grad(p):
        if regularizer == "counts":
            t = total * p / n - 1
            return np.sum(t**2), 2 * t * total / n
        if regularizer == "proportions":
            return np.sum((100 * (p - p0)) ** 2), 2e4 * (p - p0)
        if regularizer == "ratio":
            t = p / p0 - 1
            return np.sum(t**2), 2 * t / p0
        return 0.0, np.zeros_like(p)

    def fun(p):
        f = u.T @ p
        value = np.sum(w * (f - d) ** 2)
        grad = u @ (2 * w * (f - d))
        if objective == "fraction_l2":
            root = np.sqrt(value)
            grad = grad / (2 * root) if root > 0 else np.zeros_like(grad)
            value = root
        r, rg = reg_and_grad(p)
        return value + gamma * r, grad + gamma * rg

    return fun


ALL_OBJECTIVES = ["fraction", "fraction_l2", "geo"]
ALL_REGULARIZERS = ["none", "counts", "proportions", "ratio"]
