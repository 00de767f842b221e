// The balancing problem, Adam and the exact solver from C++ alone: gradients against
// central differences of a dense brute-force loss, thread-count invariance, KKT.
#include <cobalance/adam.hpp>
#include <cobalance/balance_problem.hpp>
#include <cobalance/exact_solver.hpp>

#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

#include "balance_data.hpp"
#include "check.hpp"

using namespace cobalance;

namespace {

// The loss written from its definition over the dense patterns.
double brute_loss(const Data& d, const std::vector<double>& a, Objective o, Regularizer r, double gamma) {
  double s = 0.0, n_total = 0.0;
  for (index_t j = 0; j < d.k; ++j) {
    s += a[j];
    n_total += d.counts[j];
  }
  std::vector<double> g(static_cast<std::size_t>(d.c), 0.0);
  for (index_t j = 0; j < d.k; ++j)
    for (index_t i = 0; i < d.c; ++i) g[i] += d.dense[j][i] * a[j];
  double value = 0.0;
  if (o == Objective::geo) {
    double gn = 0.0, dn = 0.0;
    for (index_t i = 0; i < d.c; ++i) gn += g[i] * g[i], dn += d.target[i] * d.target[i];
    for (index_t i = 0; i < d.c; ++i) {
      const double e = g[i] / std::sqrt(gn) - d.target[i] / std::sqrt(dn);
      value += d.weights[i] * e * e;
    }
  } else {
    for (index_t i = 0; i < d.c; ++i) value += d.weights[i] * (g[i] / s - d.target[i]) * (g[i] / s - d.target[i]);
    if (o == Objective::fraction_l2) value = std::sqrt(value);
  }
  double reg = 0.0;
  for (index_t j = 0; j < d.k; ++j) {
    const double p = a[j] / s, p0 = d.counts[j] / n_total;
    if (r == Regularizer::counts) reg += (a[j] / d.counts[j] - 1) * (a[j] / d.counts[j] - 1);
    if (r == Regularizer::proportions) reg += 1e4 * (p - p0) * (p - p0);
    if (r == Regularizer::ratio) reg += (p / p0 - 1) * (p / p0 - 1);
  }
  return value + gamma * reg;
}

void gradients_match_central_differences() {
  const Data d = random_data(20, 6, 1);
  const auto problem = make(d);
  std::mt19937_64 gen(2);
  std::uniform_real_distribution<double> unit(0.5, 3.0);
  std::vector<double> a(20);
  for (auto& v : a) v = unit(gen);
  for (auto o : {Objective::fraction, Objective::fraction_l2, Objective::geo})
    for (auto r : {Regularizer::none, Regularizer::counts, Regularizer::proportions, Regularizer::ratio}) {
      std::vector<double> grad(20);
      const double value = problem.loss_and_gradient(a.data(), o, r, 0.07, grad.data(), 1);
      CHECK(std::abs(value - brute_loss(d, a, o, r, 0.07)) <= 1e-12 * std::abs(value));
      double scale = 0.0;
      for (double g : grad) scale = std::max(scale, std::abs(g));
      for (index_t j = 0; j < 20; ++j) {
        auto plus = a, minus = a;
        const double h = 1e-6 * a[j];
        plus[j] += h;
        minus[j] -= h;
        const double fd = (brute_loss(d, plus, o, r, 0.07) - brute_loss(d, minus, o, r, 0.07)) / (2 * h);
        CHECK(std::abs(fd - grad[j]) <= 1e-6 * std::abs(fd) + 1e-7 * scale);
      }
    }
}

void results_do_not_depend_on_threads() {
  const Data d = random_data(150000, 8, 3);
  const auto problem = make(d);
  CHECK(problem.n_blocks() > 4);
  CHECK(problem.parts(4) == 4);  // the threads really split the work
  std::vector<double> a(d.counts);
  for (index_t j = 0; j < d.k; ++j) a[j] *= 1.0 + 0.01 * static_cast<double>(j % 17);
  std::vector<double> g1(static_cast<std::size_t>(d.k)), g4(g1.size());
  const double v1 = problem.loss_and_gradient(a.data(), Objective::fraction, Regularizer::proportions, 0.1,
                                              g1.data(), 1);
  const double v4 = problem.loss_and_gradient(a.data(), Objective::fraction, Regularizer::proportions, 0.1,
                                              g4.data(), 4);
  CHECK(v1 == v4);
  CHECK(g1 == g4);
  // At this many patterns U y runs in row order (the by-row path): each out_j is its
  // classes' y_i added in class order, as the dense brute force adds them.
  std::vector<double> y(static_cast<std::size_t>(d.c)), uy(static_cast<std::size_t>(d.k));
  for (index_t i = 0; i < d.c; ++i) y[i] = 0.1 + 1.0 / static_cast<double>(i + 3);
  problem.pattern_sums(y.data(), uy.data(), 4);
  std::vector<double> uta(static_cast<std::size_t>(d.c)), expected_uta(static_cast<std::size_t>(d.c), 0.0);
  problem.class_sums(a.data(), uta.data(), 3);
  for (index_t j = 0; j < d.k; ++j) {
    double s = 0.0;
    for (index_t i = 0; i < d.c; ++i)
      if (d.dense[j][i]) {
        s += y[i];
        expected_uta[i] += a[j];
      }
    CHECK(uy[j] == s);
  }
  for (index_t i = 0; i < d.c; ++i) CHECK(std::abs(uta[i] - expected_uta[i]) <= 1e-12 * expected_uta[i]);

  std::vector<double> lo(static_cast<std::size_t>(d.k), 0.0), hi(d.counts);
  for (auto& v : hi) v *= 10.0;
  AdamOptions opt;
  opt.lr = 0.1;
  opt.max_iter = 20;
  opt.n_threads = 1;
  const auto r1 = adam(problem, d.counts, lo, hi, Objective::geo, Regularizer::ratio, 0.01, opt);
  opt.n_threads = 3;
  const auto r3 = adam(problem, d.counts, lo, hi, Objective::geo, Regularizer::ratio, 0.01, opt);
  CHECK(r1.alpha == r3.alpha && r1.history == r3.history);

  double total = 0.0;
  for (double n : d.counts) total += n;
  ExactOptions eopt;
  eopt.max_iter = 100;
  eopt.n_threads = 1;
  const auto e1 = solve_exact(problem, Objective::fraction, Regularizer::counts, 1e-4, total, lo, hi, eopt);
  eopt.n_threads = 4;
  const auto e4 = solve_exact(problem, Objective::fraction, Regularizer::counts, 1e-4, total, lo, hi, eopt);
  CHECK(e1.p == e4.p && e1.loss == e4.loss);
}

// KKT from scratch: the gradient in p is constant on free entries, larger at lower
// bounds, smaller at upper bounds.
void exact_solver_meets_kkt() {
  const Data d = random_data(30, 5, 4);
  const auto problem = make(d);
  double total = 0.0;
  for (double n : d.counts) total += n;
  std::vector<double> lo(30), hi(30);
  for (index_t j = 0; j < 30; ++j) lo[j] = 0.3 * d.counts[j], hi[j] = 4.0 * d.counts[j];
  ExactOptions opt;
  opt.tol = 1e-11;
  const auto res = solve_exact(problem, Objective::fraction, Regularizer::proportions, 1e-3, total, lo, hi, opt);
  CHECK(res.converged && res.kkt_residual <= 1e-11);
  // Gradient in p of F + gamma R, dense.
  std::vector<double> f(5, 0.0), grad(30, 0.0);
  for (index_t j = 0; j < 30; ++j)
    for (index_t i = 0; i < 5; ++i) f[i] += d.dense[j][i] * res.p[j];
  for (index_t j = 0; j < 30; ++j) {
    for (index_t i = 0; i < 5; ++i) grad[j] += d.dense[j][i] * 2.0 * d.weights[i] * (f[i] - d.target[i]);
    grad[j] += 1e-3 * 2e4 * (res.p[j] - d.counts[j] / total);
  }
  double lam = 0.0;
  int n_free = 0;
  for (index_t j = 0; j < 30; ++j)
    if (res.p[j] > lo[j] / total + 1e-9 && res.p[j] < hi[j] / total - 1e-9) lam += grad[j], ++n_free;
  CHECK(n_free > 0);
  lam /= n_free;
  double sum = 0.0;
  for (index_t j = 0; j < 30; ++j) {
    sum += res.p[j];
    const bool at_lo = res.p[j] <= lo[j] / total + 1e-9, at_hi = res.p[j] >= hi[j] / total - 1e-9;
    if (!at_lo && !at_hi) CHECK(std::abs(grad[j] - lam) <= 1e-7);
    if (at_lo) CHECK(grad[j] >= lam - 1e-7);
    if (at_hi) CHECK(grad[j] <= lam + 1e-7);
  }
  CHECK(std::abs(sum - 1.0) <= 1e-12);
  CHECK(std::abs(res.loss - brute_loss(d, res.alpha, Objective::fraction, Regularizer::proportions, 1e-3)) <=
        1e-12 * res.loss);
}

void adam_follows_the_update_rule_for_one_step() {
  // One pattern per class, two classes: the gradient is known in closed form.
  const BalanceProblem problem({0, 1, 2}, {0, 1}, {1.0, 1.0}, 2, {0.8, 0.2});
  AdamOptions opt;
  opt.lr = 0.1;
  opt.max_iter = 1;
  const auto r = adam(problem, {1.0, 1.0}, {0.0, 0.0}, {10.0, 10.0}, Objective::fraction, Regularizer::none, 0.0, opt);
  // f = (0.5, 0.5): dF/dalpha_0 = (2 * -0.3 - (2 * -0.3 * 0.5 + 2 * 0.3 * 0.5)) / 2 = -0.3, and +0.3 for
  // alpha_1; the first Adam step moves each by lr * sign(grad) (up to eps).
  CHECK(std::abs(r.alpha[0] - 1.1) < 1e-7 && std::abs(r.alpha[1] - 0.9) < 1e-7);
  CHECK(r.history.size() == 2 && std::abs(r.history[0] - 0.18) < 1e-15);
}

// Adam with a fixed total: every iterate sums to the total within the bounds, the run
// does not depend on the thread count, and with many steps it reaches the exact optimum
// at that total where the caps bind (KKT checked from scratch).
void adam_with_a_total_reaches_the_exact_optimum() {
  const Data d = random_data(25, 5, 6);
  const auto problem = make(d);
  double n_total = 0.0;
  for (double n : d.counts) n_total += n;
  const double total = 15.0 * n_total;
  std::vector<double> lo(25, 0.0), hi(25), alpha0(25);
  for (index_t j = 0; j < 25; ++j) hi[j] = 20.0 * d.counts[j], alpha0[j] = 15.0 * d.counts[j];
  const auto exact = solve_exact(problem, Objective::fraction, Regularizer::proportions, 1e-3, total, lo, hi, {});
  CHECK(exact.converged);
  int capped = 0;
  for (index_t j = 0; j < 25; ++j) capped += exact.alpha[j] >= hi[j] * (1.0 - 1e-9);
  CHECK(capped >= 1);
  AdamOptions opt;
  opt.lr = 3.0;
  opt.max_iter = 20000;
  opt.total = total;
  opt.n_threads = 1;
  const auto r1 = adam(problem, alpha0, lo, hi, Objective::fraction, Regularizer::proportions, 1e-3, opt);
  opt.n_threads = 3;
  const auto r3 = adam(problem, alpha0, lo, hi, Objective::fraction, Regularizer::proportions, 1e-3, opt);
  CHECK(r1.alpha == r3.alpha && r1.history == r3.history);
  double sum = 0.0;
  for (index_t j = 0; j < 25; ++j) {
    sum += r1.alpha[j];
    CHECK(r1.alpha[j] >= lo[j] && r1.alpha[j] <= hi[j]);
  }
  CHECK(std::abs(sum - total) <= 1e-12 * total);
  const double loss = brute_loss(d, r1.alpha, Objective::fraction, Regularizer::proportions, 1e-3);
  CHECK(loss >= exact.loss * (1.0 - 1e-12) && loss - exact.loss <= 1e-8 * exact.loss);
  for (index_t j = 0; j < 25; ++j) CHECK(std::abs(r1.alpha[j] - exact.alpha[j]) <= 1e-3 * total / 25.0);
}

void bad_input_is_rejected() {
  CHECK_INVALID(BalanceProblem({0, 1}, {3}, {1.0}, 2, {0.5, 0.5}), "indices");
  CHECK_INVALID(BalanceProblem({0, 1}, {0}, {0.0}, 2, {0.5, 0.5}), "counts");
  CHECK_INVALID(BalanceProblem({0, 1}, {0}, {1.0}, 2, {0.5, 1.5}), "target");
  CHECK_INVALID(BalanceProblem({0, 1}, {0}, {1.0}, 2, {0.5, NAN}), "target");
  CHECK_INVALID(BalanceProblem({0, 1}, {0}, {1.0}, 2, {0.5, 0.5}, {1.0, -2.0}), "class_weights");
  CHECK_INVALID(BalanceProblem({0, 2}, {0}, {1.0}, 2, {0.5, 0.5}), "indptr");
  CHECK_INVALID(objective_from_name("l1"), "fraction_l2");
  CHECK_INVALID(regularizer_from_name("l1"), "proportions");
  const BalanceProblem problem({0, 1, 2}, {0, 1}, {1.0, 1.0}, 2, {0.8, 0.2});
  const std::vector<double> a{1.0, NAN};
  CHECK_INVALID(problem.loss(a.data(), Objective::fraction, Regularizer::none, 0.0), "alpha");
  const std::vector<double> ok{1.0, 1.0};
  CHECK_INVALID(problem.loss(ok.data(), Objective::fraction, Regularizer::none, -1.0), "gamma");
  AdamOptions opt;
  opt.lr = -1.0;
  CHECK_INVALID(adam(problem, ok, {0.0, 0.0}, {2.0, 2.0}, Objective::fraction, Regularizer::none, 0.0, opt), "lr");
  opt.lr = 0.1;
  CHECK_INVALID(adam(problem, ok, {0.0, 3.0}, {2.0, 2.0}, Objective::fraction, Regularizer::none, 0.0, opt), "lower");
  CHECK_INVALID(adam(problem, ok, {-1.0, 0.0}, {2.0, 2.0}, Objective::fraction, Regularizer::none, 0.0, opt), "lower");
  opt.total = 5.0;  // above sum(upper) = 4
  CHECK_INVALID(adam(problem, ok, {0.0, 0.0}, {2.0, 2.0}, Objective::fraction, Regularizer::none, 0.0, opt), "total");
  opt.total = NAN;
  CHECK_INVALID(adam(problem, ok, {0.0, 0.0}, {2.0, 2.0}, Objective::fraction, Regularizer::none, 0.0, opt), "total");
  opt.total = 0.0;
  CHECK_INVALID(adam(problem, ok, {0.0, 0.0}, {2.0, 2.0}, Objective::fraction, Regularizer::none, 0.0, opt), "total");
  opt.total = 3.0;  // alpha0 outside the bounds is projected, not refused
  const auto projected = adam(problem, {5.0, 0.5}, {0.0, 0.0}, {2.0, 2.0}, Objective::fraction, Regularizer::none,
                              0.0, opt);
  CHECK(projected.alpha.size() == 2 && std::abs(projected.alpha[0] + projected.alpha[1] - 3.0) <= 3e-12);
  ExactOptions eopt;
  CHECK_INVALID(solve_exact(problem, Objective::geo, Regularizer::none, 0.0, 2.0, {0.0, 0.0}, {2.0, 2.0}, eopt), "geo");
  CHECK_INVALID(solve_exact(problem, Objective::fraction, Regularizer::none, 0.0, 5.0, {0.0, 0.0}, {2.0, 2.0}, eopt),
                "total");
}

}  // namespace

int main() {
  gradients_match_central_differences();
  results_do_not_depend_on_threads();
  exact_solver_meets_kkt();
  adam_follows_the_update_rule_for_one_step();
  adam_with_a_total_reaches_the_exact_optimum();
  bad_input_is_rejected();
  return 0;
}
