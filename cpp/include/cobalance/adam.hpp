// Adam on the balancing loss, with alpha kept in per-pattern bounds.
//
// The update is torch.optim.Adam's (default, non-amsgrad, no weight decay), step
// t = 1, 2, ...:
//   m = lerp(m, g, 1 - beta1)          v = beta2 v + (1 - beta2) g^2
//   alpha -= (lr / (1 - beta1^t)) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
// followed by alpha = clamp(alpha, lower, upper).
//
// Early stop: after step t, with L_t the loss at the new iterate, the run stops as
// converged when |L_{t-1} - L_t| <= tol * max(|L_{t-1}|, DBL_MIN). tol <= 0 disables
// the test (the run takes max_iter steps).
#pragma once

#include <vector>

#include "cobalance/balance_problem.hpp"

namespace cobalance {

struct AdamOptions {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  index_t max_iter = 1000;
  double tol = 0.0;
  int n_threads = 0;
};

struct AdamResult {
  std::vector<double> alpha;    // the last iterate
  std::vector<double> history;  // loss at every iterate: history[0] at alpha0, history[t] after step t
  index_t n_iter = 0;           // steps taken
  bool converged = false;       // stopped by the tolerance test
};

// Validates (throws std::invalid_argument naming the argument): alpha0, lower, upper
// of length K and free of NaN; 0 <= lower <= upper (upper may be +inf, lower finite);
// lower <= alpha0 <= upper; lr > 0 finite, gamma >= 0 finite, beta1 and beta2 in
// [0, 1), eps > 0, max_iter >= 0. Throws std::invalid_argument also when an iterate has
// sum alpha == 0 (all clamped to zero lower bounds), where the loss is undefined.
AdamResult adam(const BalanceProblem& problem, std::vector<double> alpha0, const std::vector<double>& lower,
                const std::vector<double>& upper, Objective objective, Regularizer regularizer, double gamma,
                const AdamOptions& options);

// The bound checks shared by the solvers: length K, no NaN, lower finite and >= 0,
// lower <= upper. Throws std::invalid_argument naming `lower` or `upper`.
void check_bounds(const BalanceProblem& problem, const std::vector<double>& lower, const std::vector<double>& upper);

}  // namespace cobalance
