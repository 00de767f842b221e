// The exact (global) optimum of the convex balancing problem for a given total size.
//
// With S = total fixed, alpha = total * p and the problem in p is
//   minimise  F(p) + gamma R(p)   subject to  sum p = 1,  lower / total <= p <= upper / total
// where F(p) = sum_i w_i ((U^T p)_i - d_i)^2 (the `fraction` objective, since f = U^T p
// on the simplex) and R is the regularizer written in p (`counts` through
// alpha = total * p). F and every R are convex quadratics, so this is a convex QP.
//
// Method, where gamma R is strictly convex (gamma > 0, any regularizer but `none`),
// every class weight is > 0, C <= min(512, K / 4) and sum_j |u_j|^2 <= 64 (nnz + K): semismooth
// Newton on the C-dimensional dual (variable y = 2 w (U^T p - d); for a given y the
// primal minimiser is one projection), damped by a backtracking line search on the
// dual, each step a C x C Cholesky solve. The F part has rank <= C, which makes the
// problem in p badly conditioned for first-order methods at large K; the dual does
// not see K. Otherwise (and from Newton's last point when it stalls): FISTA with
// adaptive (gradient) restart in the diagonal metric
// D = L_F + gamma diag(H_R) (L_F an upper bound on F's curvature from power iteration,
// checked and raised along the way), with an exact projection onto the box-constrained
// simplex in that metric (a piecewise-linear equation in the multiplier, solved by
// safeguarded Newton steps that end on an exact linear solve).
//
// Stopping test (the KKT residual): r = || p - P(p - grad) ||_inf with P the Euclidean
// projection onto the feasible set. r == 0 exactly when p satisfies the KKT conditions
// (for some multiplier t: grad_j = t where p_j is strictly inside its bounds,
// grad_j >= t at a lower bound, grad_j <= t at an upper bound).
//
// `fraction_l2` (sqrt(F) + gamma R): sqrt is not differentiable where F = 0 (an exact
// fit), so the smooth QP below is solved instead and its KKT residual reported. When
// gamma == 0 (or no regularizer) the minimiser is that of F: the QP is F itself. When
// gamma > 0, the KKT conditions of sqrt(F) + gamma R are those of F + mu R with
// mu = 2 gamma sqrt(F(p)), so the QP is solved for a sequence of mu (warm-started) and
// mu found as the root of mu - 2 gamma sqrt(F(p(mu))) (fixed-point steps, then a
// safeguarded secant) to a relative 1e-12; the residual reported is that of F + mu R
// for the last mu solved, i.e. about 2 sqrt(F) times the original gradient where F > 0.
// Where the target can be met exactly the root is mu -> 0 (the optimum sits on the
// kink F = 0); the search stops once 2 gamma sqrt(F) < 1e-8 * 2 gamma sqrt(sum w), and
// the last QP's solution (sqrt(F) below 1e-8 sqrt(sum w)) is returned. Its KKT test
// (tol) bounds the gradient of F + mu R, so with mu that small the regularizer is
// minimised over the exact fits only to about tol / mu.
// When the dual Newton path stalls, FISTA goes on from the better (in F + mu R) of its
// start and Newton's last point.
// The `geo` objective is not convex in p and is refused.
#pragma once

#include <vector>

#include "cobalance/balance_problem.hpp"
#include "cobalance/interrupt.hpp"

namespace cobalance {

struct ExactOptions {
  index_t max_iter = 100000;  // Newton plus FISTA iterations in all
  double tol = 1e-10;         // on the KKT residual
  int n_threads = 0;
  // Polled between Newton, line-search and FISTA steps (see interrupt.hpp):
  // Interrupted when it returns true.
  InterruptCheck interrupt;
};

struct ExactResult {
  std::vector<double> alpha;      // total * p
  std::vector<double> p;          // the optimal proportions
  double loss = 0.0;              // objective + gamma * regularizer at alpha
  double kkt_residual = 0.0;      // see above
  index_t n_iter = 0;             // Newton plus FISTA iterations
  bool converged = false;         // kkt_residual <= tol
  std::vector<double> marginals;  // f(alpha)
  double max_abs_error = 0.0;     // max_i |f_i - d_i|
};

// Throws std::invalid_argument for the `geo` objective, total not finite or <= 0,
// bounds as in check_bounds, infeasible bounds (sum lower > total or sum upper < total),
// gamma < 0 or NaN, tol < 0 or NaN, max_iter < 0.
ExactResult solve_exact(const BalanceProblem& problem, Objective objective, Regularizer regularizer, double gamma,
                        double total, const std::vector<double>& lower, const std::vector<double>& upper,
                        const ExactOptions& options);

}  // namespace cobalance
