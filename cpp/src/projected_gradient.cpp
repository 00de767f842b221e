#include "cobalance/projected_gradient.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>

#include "box_simplex.hpp"
#include "cobalance/adam.hpp"
#include "cobalance/parallel.hpp"
#include "invalid_argument.hpp"

namespace cobalance {

namespace {

using detail::bad;
using detail::show;

constexpr double kArmijo = 1e-4;
constexpr int kMaxHalvings = 60;
constexpr int kPatience = 5;

}  // namespace

GradientResult projected_gradient(const BalanceProblem& problem, std::vector<double> alpha0,
                                  const std::vector<double>& lower, const std::vector<double>& upper,
                                  Objective objective, Regularizer regularizer, double gamma, double total,
                                  const GradientOptions& options) {
  const auto k = static_cast<std::size_t>(problem.n_patterns());
  if (alpha0.size() != k)
    bad("alpha0 must have n_patterns = " + std::to_string(k) + " entries, got " + std::to_string(alpha0.size()));
  for (std::size_t j = 0; j < k; ++j)
    if (!std::isfinite(alpha0[j])) bad("alpha0 must be finite, got alpha0[" + std::to_string(j) + "] = " + show(alpha0[j]));
  check_bounds(problem, lower, upper);
  detail::check_total(lower, upper, total);
  if (!std::isfinite(gamma) || gamma < 0.0) bad("gamma must be finite and >= 0, got " + show(gamma));
  if (!(options.tol >= 0.0)) bad("tol must be >= 0, got " + show(options.tol));
  if (options.max_iter < 0) bad("max_iter must be >= 0, got " + std::to_string(options.max_iter));

  const int n_threads = options.n_threads;
  const TeamScope team(problem.loop_parts(n_threads));  // one set of workers for every pass
  const detail::PatternBlocks blocks(problem, n_threads);
  const std::vector<double> ones(k, 1.0);
  double tau = 0.0;
  auto project = [&](const std::vector<double>& y, std::vector<double>& out) {
    detail::project_box_simplex(blocks, y.data(), ones.data(), lower.data(), upper.data(), total, out.data(), tau);
  };
  // The loss at x and its gradient into `grad`; +inf where the loss is undefined. The
  // gradient comes with every trial: a step is accepted at the first trial almost
  // always (the Barzilai-Borwein length fits the curvature), so it is seldom wasted.
  auto loss_at = [&](const std::vector<double>& x, double* grad) {
    try {
      return problem.evaluate(x.data(), objective, regularizer, gamma, grad, n_threads);
    } catch (const std::invalid_argument&) {
      return std::numeric_limits<double>::infinity();
    }
  };
  auto dot = [&](const std::vector<double>& a, const std::vector<double>& b) {
    return blocks.sum<1>([&](index_t j, std::array<double, 1>& acc) {
      acc[0] += a[static_cast<std::size_t>(j)] * b[static_cast<std::size_t>(j)];
    })[0];
  };

  GradientResult result;
  std::vector<double> x(k), grad(k), trial(k), trial_grad(k), moved(k), step_vec(k), grad_change(k);
  project(alpha0, x);
  double loss;
  try {
    loss = problem.evaluate(x.data(), objective, regularizer, gamma, grad.data(), n_threads);
  } catch (const std::invalid_argument& e) {
    bad(std::string("the loss is undefined at the start: ") + e.what());
  }
  result.history.push_back(loss);

  // First trial step: moves the entry with the largest gradient by a tenth of the mean
  // count per pattern.
  double grad_max = 0.0;
  for (double g : grad) grad_max = std::max(grad_max, std::abs(g));
  double step = grad_max > 0.0 ? 0.1 * (total / static_cast<double>(k)) / grad_max : 1.0;
  int quiet = 0;
  InterruptPoller interrupt(options.interrupt);
  for (index_t t = 1; t <= options.max_iter; ++t) {
    double trial_loss = std::numeric_limits<double>::infinity();
    double decrease_bound = 0.0;
    bool accepted = false, stationary = false;
    for (int h = 0; h <= kMaxHalvings; ++h) {
      interrupt.poll();
      for (std::size_t j = 0; j < k; ++j) moved[j] = x[j] - step * grad[j];
      project(moved, trial);
      for (std::size_t j = 0; j < k; ++j) step_vec[j] = trial[j] - x[j];
      const double descent = dot(grad, step_vec);
      if (std::all_of(step_vec.begin(), step_vec.end(), [](double d) { return d == 0.0; })) {
        stationary = true;
        break;
      }
      trial_loss = loss_at(trial, trial_grad.data());
      decrease_bound = loss + kArmijo * descent;
      if (trial_loss <= decrease_bound) {
        accepted = true;
        break;
      }
      step *= 0.5;
    }
    if (stationary) {
      result.converged = true;
      break;
    }
    if (!accepted) {
      // No step along the projected gradient decreases the loss. Where even the last,
      // smallest trial moved no pattern by 1e-9 of the mean count, this is a kink of a
      // piecewise-linear term (the ess regularizer's, where a pattern's copies per
      // sample reach an integer) at which the one-sided gradient promises a descent no
      // direction gives: a stationary point for the projected gradient, not a failure.
      double largest = 0.0;
      for (double d : step_vec) largest = std::max(largest, std::abs(d));
      result.converged = largest <= 1e-9 * (total / static_cast<double>(k));
      break;
    }
    for (std::size_t j = 0; j < k; ++j) grad_change[j] = trial_grad[j] - grad[j];
    const double sy = dot(step_vec, grad_change), ss = dot(step_vec, step_vec);
    step = sy > 0.0 ? ss / sy : 2.0 * step;
    const double previous = loss;
    x.swap(trial);
    grad.swap(trial_grad);
    loss = trial_loss;
    result.history.push_back(loss);
    result.n_iter = t;
    quiet = std::abs(previous - loss) <= options.tol * std::max(std::abs(previous), 1e-12) ? quiet + 1 : 0;
    if (quiet >= kPatience) {
      result.converged = true;
      break;
    }
  }
  result.alpha = std::move(x);
  return result;
}

}  // namespace cobalance
