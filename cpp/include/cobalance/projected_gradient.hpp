// Projected gradient descent at a fixed balanced size, for losses that are not convex
// quadratics (the `imbalance` objective, the `ess` regularizer) or not smooth.
//
// Minimises objective(alpha) + gamma * regularizer(alpha) over
//   {lower <= alpha <= upper, sum alpha = total}.
// Each step: y = alpha - s * grad, the Euclidean projection of y onto that set (the
// box-constrained simplex projection the other solvers use), then an Armijo
// backtracking line search along the projection arc: s is halved until
//   L(alpha_new) <= L(alpha) + 1e-4 * grad . (alpha_new - alpha).
// A point where the loss is undefined (a class the `imbalance` objective weighs at
// presence 0) counts as failing the test, so the iterates keep every such class
// present. The next trial step is the Barzilai-Borwein length s'.s' / s'.y' of the
// last move s' and gradient change y' (doubled instead where s'.y' <= 0), which adapts
// the step to the local curvature without a Lipschitz bound (the `ess` regularizer's
// gradient jumps at its kinks, so no global bound would be useful).
//
// Stopping: after `patience` (5) consecutive accepted steps whose relative decrease
// |L_{t-1} - L_t| <= tol * max(|L_{t-1}|, 1e-12) each, or a step that leaves alpha
// unchanged (a stationary point), converged = true. A line search that halves 60
// times without success ends the run: converged = true where its last trial moved no
// entry by more than 1e-9 of total / K (a kink of a piecewise-linear term, e.g. the
// ess regularizer's, where no projected-gradient step decreases the loss), false
// otherwise; max_iter ends it with converged = false.
// Every sum goes through the problem's fixed blocks: the result does not depend on the
// number of threads.
#pragma once

#include <vector>

#include "cobalance/balance_problem.hpp"
#include "cobalance/interrupt.hpp"

namespace cobalance {

struct GradientOptions {
  index_t max_iter = 5000;
  double tol = 1e-9;
  int n_threads = 0;
  // Polled between line-search trials (see interrupt.hpp): Interrupted when it returns true.
  InterruptCheck interrupt;
};

struct GradientResult {
  std::vector<double> alpha;    // the last accepted iterate
  std::vector<double> history;  // loss at every accepted iterate, history[0] at the projected start
  index_t n_iter = 0;           // steps taken (accepted)
  bool converged = false;
};

// Validates (std::invalid_argument naming the argument): alpha0, lower, upper of length
// K (check_bounds), total finite, > 0 and in [sum lower, sum upper], gamma >= 0 finite,
// tol >= 0, max_iter >= 0. alpha0 is projected (Euclidean) onto the feasible set first;
// the loss must be defined there (for `imbalance`: every weighed class present),
// otherwise std::invalid_argument says so.
GradientResult projected_gradient(const BalanceProblem& problem, std::vector<double> alpha0,
                                  const std::vector<double>& lower, const std::vector<double>& upper,
                                  Objective objective, Regularizer regularizer, double gamma, double total,
                                  const GradientOptions& options);

}  // namespace cobalance
