// Adam on the balancing loss, with alpha kept in per-pattern bounds.
//
// The update is torch.optim.Adam's (default, non-amsgrad, no weight decay), step
// t = 1, 2, ...:
//   m = lerp(m, g, 1 - beta1)          v = beta2 v + (1 - beta2) g^2
//   alpha -= (lr / (1 - beta1^t)) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
// followed by alpha = clamp(alpha, lower, upper).
//
// With a fixed total the clamp is replaced by the projection onto
// {lower <= alpha <= upper, sum alpha = total} in Adam's own metric
// D = diag(sqrt(v) / sqrt(1 - beta2^t) + eps), the denominators of the step:
//   alpha = argmin_q sum_j D_j (q_j - y_j)^2 over that set, y the point after the step,
// i.e. alpha_j = clamp(y_j - tau / D_j, lower_j, upper_j) with tau such that the sum is
// total (to a relative 1e-13); it is the exact solver's box-constrained simplex
// projection. In this metric a fixed point of the iteration satisfies the KKT
// conditions of the constrained problem (the gradient equal on the free entries, larger
// at lower bounds, smaller at upper bounds). A Euclidean projection would not: its fixed
// points are those where Adam's normalised step m / (sqrt(v) + eps) (about sign(g)) is
// undone by a uniform shift, which holds wherever the free entries' gradients share a
// sign, so Adam would stall short of the optimum where the bounds bind.
//
// Early stop: after step t, with L_t the loss at the new iterate, the run stops as
// converged when |L_{t-1} - L_t| <= tol * max(|L_{t-1}|, DBL_MIN). tol <= 0 disables
// the test (the run takes max_iter steps).
#pragma once

#include <optional>
#include <vector>

#include "cobalance/balance_problem.hpp"
#include "cobalance/interrupt.hpp"

namespace cobalance {

struct AdamOptions {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  index_t max_iter = 1000;
  double tol = 0.0;
  int n_threads = 0;
  // The balanced size sum(alpha), held fixed by projection after every step; empty:
  // no fixed total (alpha is clamped to the bounds).
  std::optional<double> total;
  // Polled between steps (see interrupt.hpp): Interrupted when it returns true.
  InterruptCheck interrupt;
};

struct AdamResult {
  std::vector<double> alpha;    // the last iterate
  std::vector<double> history;  // loss at every iterate: history[0] at alpha0, history[t] after step t
  index_t n_iter = 0;           // steps taken
  bool converged = false;       // stopped by the tolerance test
};

// Validates (throws std::invalid_argument naming the argument): alpha0, lower, upper
// of length K and free of NaN; 0 <= lower <= upper (upper may be +inf, lower finite);
// alpha0 >= 0 with a positive sum; lr > 0 finite, gamma >= 0 finite, beta1 and beta2 in
// [0, 1), eps > 0, max_iter >= 0. Without a total, lower <= alpha0 <= upper. With a
// total: total finite, > 0 and in [sum(lower), sum(upper)] (to a relative 1e-12); alpha0
// need not be feasible: it is projected (Euclidean) onto the feasible set first, since a
// caller can rarely build a point whose floating-point sum is total exactly and the
// projection leaves a feasible point as it is (history[0] is the loss there). Scale
// alpha0 to sum `total` beforehand to keep its proportions where the bounds allow. Throws std::invalid_argument also when an
// iterate's loss is undefined (sum alpha == 0: all clamped to zero lower bounds; for
// `geo`, U^T alpha == 0).
AdamResult adam(const BalanceProblem& problem, std::vector<double> alpha0, const std::vector<double>& lower,
                const std::vector<double>& upper, Objective objective, Regularizer regularizer, double gamma,
                const AdamOptions& options);

// The bound checks shared by the solvers: length K, no NaN, lower finite and >= 0,
// lower <= upper. Throws std::invalid_argument naming `lower` or `upper`.
void check_bounds(const BalanceProblem& problem, const std::vector<double>& lower, const std::vector<double>& upper);

}  // namespace cobalance
