// The `imbalance` objective, the `ess` regularizer and the projected-gradient solver
// from C++ alone: values against a dense brute force written from the definitions,
// gradients against central differences (away from the regularizer's kinks),
// feasibility, descent and thread-count invariance of the solver, and the refusals.
#include <cobalance/balance_problem.hpp>
#include <cobalance/exact_solver.hpp>
#include <cobalance/projected_gradient.hpp>

#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

#include "balance_data.hpp"
#include "check.hpp"

using namespace cobalance;

namespace {

// Skewed random patterns; class c - 1 is never present and one target is 0, so that
// the objective's inactive classes are exercised.
Data skewed_data(index_t k, index_t c, unsigned seed) {
  std::mt19937_64 gen(seed);
  std::uniform_real_distribution<double> unit(0.0, 1.0);
  Data d{k, c, {}, {0}, {}, {}, {}, {}};
  for (index_t j = 0; j < k; ++j) {
    std::vector<int> row(static_cast<std::size_t>(c), 0);
    for (index_t i = 0; i + 1 < c; ++i)
      if (unit(gen) < 0.8 / static_cast<double>(i + 1) || (j % (c - 1)) == i) {
        row[static_cast<std::size_t>(i)] = 1;
        d.indices.push_back(i);
      }
    d.dense.push_back(row);
    d.indptr.push_back(static_cast<index_t>(d.indices.size()));
    d.counts.push_back(1.0 + std::floor(unit(gen) * 9.0));
  }
  for (index_t i = 0; i < c; ++i) {
    d.target.push_back(i == 1 ? 0.0 : 0.05 + 0.9 * unit(gen));
    d.weights.push_back(0.5 + unit(gen));
  }
  return d;
}

// log(mean_i w_i M / r_i) with M = (sum r^16)^(1/16), r_i = g_i / d_i over the active
// classes, plus gamma log(N Q / S^2) with Q the sum of squared per-sample copies.
double brute_loss(const Data& d, const std::vector<double>& a, double gamma) {
  double s = 0.0, n_total = 0.0;
  std::vector<double> g(static_cast<std::size_t>(d.c), 0.0);
  std::vector<int> present(static_cast<std::size_t>(d.c), 0);
  for (index_t j = 0; j < d.k; ++j) {
    s += a[j];
    n_total += d.counts[j];
    for (index_t i = 0; i < d.c; ++i) {
      g[i] += d.dense[j][i] * a[j];
      present[i] |= d.dense[j][i];
    }
  }
  double m = 0.0, t = 0.0, w = 0.0;
  for (index_t i = 0; i < d.c; ++i)
    if (present[i] && d.target[i] > 0 && d.weights[i] > 0) m += std::pow(g[i] / d.target[i], 16.0);
  m = std::pow(m, 1.0 / 16.0);
  for (index_t i = 0; i < d.c; ++i)
    if (present[i] && d.target[i] > 0 && d.weights[i] > 0) {
      t += d.weights[i] * m / (g[i] / d.target[i]);
      w += d.weights[i];
    }
  double q = 0.0;  // sum over samples of c^2, pattern j's a_j copies spread evenly over n_j samples
  for (index_t j = 0; j < d.k; ++j) {
    const double n = d.counts[j], base = std::floor(a[j] / n), extra = a[j] - base * n;
    q += (n - extra) * base * base + extra * (base + 1.0) * (base + 1.0);
  }
  return std::log(t / w) + gamma * std::log(n_total * q / (s * s));
}

void values_and_gradients_match_the_definitions() {
  for (unsigned seed = 1; seed <= 5; ++seed) {
    const Data d = skewed_data(40, 7, seed);
    const BalanceProblem problem = make(d);
    std::mt19937_64 gen(seed);
    std::uniform_real_distribution<double> unit(0.0, 1.0);
    std::vector<double> a(static_cast<std::size_t>(d.k));
    // copies per sample 1.2 .. 3.8 and never within 0.05 of an integer (the kinks)
    for (index_t j = 0; j < d.k; ++j) {
      double x = 1.2 + 2.6 * unit(gen);
      if (std::abs(x - std::round(x)) < 0.05) x += 0.1;
      a[j] = x * d.counts[j];
    }
    for (double gamma : {0.0, 0.7}) {
      std::vector<double> grad(a.size());
      const double value = problem.loss_and_gradient(a.data(), Objective::imbalance, Regularizer::ess, gamma,
                                                     grad.data(), 1);
      CHECK(std::abs(value - brute_loss(d, a, gamma)) <= 1e-11 * std::max(1.0, std::abs(value)));
      for (index_t j = 0; j < d.k; ++j) {
        const double h = 1e-6 * a[j];
        std::vector<double> up = a, down = a;
        up[j] += h;
        down[j] -= h;
        const double fd = (brute_loss(d, up, gamma) - brute_loss(d, down, gamma)) / (2.0 * h);
        CHECK(std::abs(grad[j] - fd) <= 1e-6 * std::max(1.0, std::abs(fd)));
      }
    }
  }
}

void imbalance_is_the_mean_imbalance_ratio_with_equal_targets() {
  // two classes, counts 10 and 2 samples: IRLbl = (1, 5), MeanIR 3; the smooth max
  // (10^16 + 2^16)^(1/16) exceeds 10 by a hair
  const BalanceProblem problem({0, 1, 2}, {0, 1}, {10.0, 2.0}, 2, {0.5, 0.5});
  const std::vector<double> a = {10.0, 2.0};
  const double value = problem.loss(a.data(), Objective::imbalance, Regularizer::none, 0.0, 1);
  const double m = std::pow(std::pow(10.0, 16.0) + std::pow(2.0, 16.0), 1.0 / 16.0);
  CHECK(std::abs(value - std::log(0.5 * (m / 10.0 + m / 2.0))) <= 1e-14);
  CHECK(std::abs(std::exp(value) - 3.0) <= 1e-9);
}

void undefined_where_a_weighed_class_vanishes() {
  const BalanceProblem problem({0, 1, 2}, {0, 1}, {10.0, 2.0}, 2, {0.5, 0.5});
  const std::vector<double> a = {10.0, 0.0};
  CHECK_INVALID(problem.loss(a.data(), Objective::imbalance, Regularizer::none, 0.0, 1), "presence 0");
  // a class with target 0 is not weighed: no error
  const BalanceProblem zero_target({0, 1, 2}, {0, 1}, {10.0, 2.0}, 2, {0.5, 0.0});
  CHECK(zero_target.loss(a.data(), Objective::imbalance, Regularizer::none, 0.0, 1) == 0.0);
}

void projected_gradient_is_feasible_descends_and_ignores_threads() {
  const Data d = skewed_data(5000, 9, 11);  // several blocks of the fixed-order sums
  const BalanceProblem problem = make(d);
  double n_total = 0.0;
  for (double n : d.counts) n_total += n;
  std::vector<double> lower = d.counts, upper(d.counts.size());
  for (std::size_t j = 0; j < upper.size(); ++j) upper[j] = 10.0 * d.counts[j];
  const double total = std::round(1.25 * n_total);
  GradientOptions options;
  options.n_threads = 1;
  const GradientResult one = projected_gradient(problem, d.counts, lower, upper, Objective::imbalance,
                                                Regularizer::ess, 1.0, total, options);
  options.n_threads = 4;
  const GradientResult four = projected_gradient(problem, d.counts, lower, upper, Objective::imbalance,
                                                 Regularizer::ess, 1.0, total, options);
  CHECK(one.alpha == four.alpha && one.history == four.history);  // bitwise
  CHECK(one.converged && one.n_iter > 0);
  double sum = 0.0;
  for (std::size_t j = 0; j < one.alpha.size(); ++j) {
    CHECK(one.alpha[j] >= lower[j] - 1e-9 && one.alpha[j] <= upper[j] + 1e-9);
    sum += one.alpha[j];
  }
  CHECK(std::abs(sum - total) <= 1e-9 * total);
  for (std::size_t t = 1; t < one.history.size(); ++t) CHECK(one.history[t] <= one.history[t - 1]);
  CHECK(one.history.back() < one.history.front());
  CHECK(std::abs(one.history.back() - brute_loss(d, one.alpha, 1.0)) <= 1e-10);
  // no step from the solution lowers the loss much: moving one copy between two free
  // patterns raises it or lowers it by far less than the first steps did
  const double first_drop = one.history[0] - one.history[1];
  for (std::size_t j = 0; j + 1 < one.alpha.size(); j += 7) {
    std::vector<double> moved = one.alpha;
    const double step = std::min({1.0, moved[j] - lower[j], upper[j + 1] - moved[j + 1]});
    moved[j] -= step;
    moved[j + 1] += step;
    CHECK(brute_loss(d, moved, 1.0) >= one.history.back() - 1e-3 * first_drop);
  }
}

void refusals() {
  const Data d = skewed_data(20, 4, 3);
  const BalanceProblem problem = make(d);
  ExactOptions eopt;
  std::vector<double> upper(d.counts.size());
  double n_total = 0.0;
  for (std::size_t j = 0; j < upper.size(); ++j) upper[j] = 5.0 * d.counts[j], n_total += d.counts[j];
  CHECK_INVALID(solve_exact(problem, Objective::imbalance, Regularizer::none, 0.0, n_total, d.counts, upper, eopt),
                "imbalance");
  CHECK_INVALID(solve_exact(problem, Objective::fraction, Regularizer::ess, 1.0, n_total, d.counts, upper, eopt),
                "ess");
  GradientOptions options;
  CHECK_INVALID(projected_gradient(problem, d.counts, d.counts, upper, Objective::imbalance, Regularizer::ess, 1.0,
                                   0.5 * n_total, options),
                "total");
  CHECK_INVALID(projected_gradient(problem, d.counts, d.counts, upper, Objective::imbalance, Regularizer::ess, -1.0,
                                   n_total, options),
                "gamma");
  CHECK_INVALID(regularizer_from_name("kish"), "'ess'");
  CHECK_INVALID(objective_from_name("meanir"), "'imbalance'");
  CHECK(regularizer_from_name("ess") == Regularizer::ess && objective_from_name("imbalance") == Objective::imbalance);
}

}  // namespace

int main() {
  values_and_gradients_match_the_definitions();
  imbalance_is_the_mean_imbalance_ratio_with_equal_targets();
  undefined_where_a_weighed_class_vanishes();
  projected_gradient_is_feasible_descends_and_ignores_threads();
  refusals();
  return 0;
}
