#include "cobalance/exact_solver.hpp"

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <sstream>
#include <stdexcept>
#include <string>

#include "cobalance/adam.hpp"
#include "cobalance/parallel.hpp"

namespace cobalance {

namespace {

constexpr double kHundredSquared = 1.0e4;
constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr index_t kPowerIterations = 50;
constexpr index_t kResidualEvery = 10;  // FISTA iterations between KKT tests

std::string show(double v) {
  std::ostringstream s;
  s.precision(17);
  s << v;
  return s.str();
}

[[noreturn]] void bad(const std::string& message) { throw std::invalid_argument(message); }

// The QP  minimise F(p) + mu R(p)  over  {sum p = 1, lo <= p <= hi}, with the helpers
// that FISTA, the projection and the KKT test need. All sums over patterns go through
// fixed blocks (the problem's), so results do not depend on the thread count.
class ConvexQP {
 public:
  ConvexQP(const BalanceProblem& problem, Regularizer regularizer, double total, std::vector<double> lo,
           std::vector<double> hi, int n_threads)
      : pr_(problem),
        reg_(regularizer),
        total_(total),
        lo_(std::move(lo)),
        hi_(std::move(hi)),
        n_threads_(n_threads),
        k_(problem.n_patterns()),
        c_(problem.n_classes()),
        parts_(problem.parts(n_threads)) {
    // Diagonal of R's Hessian in p (every regularizer is a separable quadratic).
    hess_.assign(static_cast<std::size_t>(k_), 0.0);
    const auto& n = pr_.counts();
    const auto& p0 = pr_.base_proportions();
    for (index_t j = 0; j < k_; ++j) {
      switch (reg_) {
        case Regularizer::none: hess_[j] = 0.0; break;
        case Regularizer::counts: hess_[j] = 2.0 * total_ * total_ / (n[j] * n[j]); break;
        case Regularizer::proportions: hess_[j] = 2.0 * kHundredSquared; break;
        case Regularizer::ratio: hess_[j] = 2.0 / (p0[j] * p0[j]); break;
      }
    }
  }

  index_t k() const { return k_; }
  index_t c() const { return c_; }

  // Runs fn(j0, j1) over the problem's blocks of patterns; with_partial: fn returns
  // per-block values summed in block order.
  template <class Fn>
  void for_patterns(Fn&& fn) const {
    const index_t bs = pr_.block_size(), nb = pr_.n_blocks();
    const auto bounds = split_range(nb, parts_);
    run_parts(parts_, [&](int t) {
      const index_t j0 = bounds[static_cast<std::size_t>(t)] * bs;
      const index_t j1 = std::min(k_, bounds[static_cast<std::size_t>(t) + 1] * bs);
      fn(j0, j1);
    });
  }

  // Sums `width` per-pattern quantities: fn(j, acc) adds pattern j's terms into acc[0..width).
  template <int width, class Fn>
  std::array<double, width> sum_patterns(Fn&& fn) const {
    const index_t bs = pr_.block_size(), nb = pr_.n_blocks();
    std::vector<std::array<double, width>> partial(static_cast<std::size_t>(nb));
    const auto bounds = split_range(nb, parts_);
    run_parts(parts_, [&](int t) {
      for (index_t b = bounds[static_cast<std::size_t>(t)]; b < bounds[static_cast<std::size_t>(t) + 1]; ++b) {
        std::array<double, width> acc{};
        const index_t end = std::min(k_, (b + 1) * bs);
        for (index_t j = b * bs; j < end; ++j) fn(j, acc);
        partial[static_cast<std::size_t>(b)] = acc;
      }
    });
    std::array<double, width> total{};
    for (const auto& a : partial)
      for (int w = 0; w < width; ++w) total[static_cast<std::size_t>(w)] += a[static_cast<std::size_t>(w)];
    return total;
  }

  // f = U^T p.
  void marginals(const double* p, double* f) const { pr_.class_sums(p, f, n_threads_); }

  double objective(const double* f) const {
    const auto& d = pr_.target();
    const auto& w = pr_.class_weights();
    double s = 0.0;
    for (index_t i = 0; i < c_; ++i) s += w[i] * (f[i] - d[i]) * (f[i] - d[i]);
    return s;
  }

  double regularizer(const double* p) const {
    if (reg_ == Regularizer::none) return 0.0;
    const auto& n = pr_.counts();
    const auto& p0 = pr_.base_proportions();
    return sum_patterns<1>([&](index_t j, std::array<double, 1>& acc) {
      double t;
      if (reg_ == Regularizer::counts) {
        t = total_ * p[j] / n[j] - 1.0;
      } else if (reg_ == Regularizer::proportions) {
        t = 100.0 * (p[j] - p0[j]);
      } else {
        t = p[j] / p0[j] - 1.0;
      }
      acc[0] += t * t;
    })[0];
  }

  // grad = s_f * dF/dp + s_r * dR/dp at p, where f = U^T p.
  void gradient(const double* p, const double* f, double s_f, double s_r, double* grad,
                std::vector<double>& work) const {
    const auto& d = pr_.target();
    const auto& w = pr_.class_weights();
    work.resize(static_cast<std::size_t>(c_));
    for (index_t i = 0; i < c_; ++i) work[i] = s_f * 2.0 * w[i] * (f[i] - d[i]);
    pr_.pattern_sums(work.data(), grad, n_threads_);
    if (reg_ == Regularizer::none || s_r == 0.0) return;
    const auto& n = pr_.counts();
    const auto& p0 = pr_.base_proportions();
    for_patterns([&](index_t j0, index_t j1) {
      for (index_t j = j0; j < j1; ++j) {
        double r;
        if (reg_ == Regularizer::counts) {
          r = 2.0 * (total_ * p[j] / n[j] - 1.0) * total_ / n[j];
        } else if (reg_ == Regularizer::proportions) {
          r = 2.0 * kHundredSquared * (p[j] - p0[j]);
        } else {
          r = 2.0 * (p[j] / p0[j] - 1.0) / p0[j];
        }
        grad[j] += s_r * r;
      }
    });
  }

  // out = argmin sum_j metric_j (q_j - y_j)^2  s.t. sum q = 1, lo <= q <= hi, i.e.
  // out_j = clamp(y_j - tau / metric_j, lo_j, hi_j) with sum out = 1. The sum is a
  // non-increasing piecewise-linear function of tau; safeguarded Newton steps on it
  // are exact linear solves on the current piece, so the loop ends on the piece that
  // holds the root. `tau` is a warm start in, the multiplier out.
  void project(const double* y, const double* metric, double* out, double& tau) const {
    const double* lo = lo_.data();
    const double* hi = hi_.data();
    auto measure = [&](double t) {
      // [0] sum of clamped values, [1] sum of free y_j, [2] sum of free 1/metric_j,
      // [3] sum of bounds of clamped entries.
      return sum_patterns<4>([&](index_t j, std::array<double, 4>& acc) {
        const double inv = 1.0 / metric[j];
        const double v = y[j] - t * inv;
        if (v <= lo[j]) {
          acc[0] += lo[j];
          acc[3] += lo[j];
        } else if (v >= hi[j]) {
          acc[0] += hi[j];
          acc[3] += hi[j];
        } else {
          acc[0] += v;
          acc[1] += y[j];
          acc[2] += inv;
        }
      });
    };
    double below = -kInf, above = kInf;  // sum >= 1 at `below`, <= 1 at `above`
    bool bracketed = false;
    double t = std::isfinite(tau) ? tau : 0.0;
    for (int it = 0; it < 200; ++it) {
      const auto m = measure(t);
      const double excess = m[0] - 1.0;
      // Rounding in the sum of up to K terms: closer than this is the root.
      if (std::abs(excess) <= 1e-13) break;
      if (excess > 0.0) below = t;
      else above = t;
      double next = m[2] > 0.0 ? (m[1] + m[3] - 1.0) / m[2] : std::numeric_limits<double>::quiet_NaN();
      if (!(next > below && next < above)) {
        if (!bracketed) {
          // Where every entry sits at its upper bound (or at >= 1 when unbounded) the
          // sum is >= 1; where every entry sits at its lower bound it is <= 1.
          const auto range = bracket(y, metric);
          below = std::max(below, range.first);
          above = std::min(above, range.second);
          bracketed = true;
        }
        if (!(next > below && next < above)) next = 0.5 * (below + above);
      }
      if (next == t || !(above > below)) break;
      t = next;
    }
    tau = t;
    for_patterns([&](index_t j0, index_t j1) {
      for (index_t j = j0; j < j1; ++j) out[j] = std::clamp(y[j] - t / metric[j], lo[j], hi[j]);
    });
  }

  // max_j |p_j - P(p - grad)_j| with P the Euclidean projection.
  double natural_residual(const double* p, const double* grad, std::vector<double>& work, double& tau) const {
    work.resize(static_cast<std::size_t>(k_) * 2);
    double* y = work.data();
    double* q = work.data() + k_;
    for_patterns([&](index_t j0, index_t j1) {
      for (index_t j = j0; j < j1; ++j) y[j] = p[j] - grad[j];
    });
    if (ones_.empty()) ones_.assign(static_cast<std::size_t>(k_), 1.0);
    project(y, ones_.data(), q, tau);
    const index_t bs = pr_.block_size(), nb = pr_.n_blocks();
    std::vector<double> partial(static_cast<std::size_t>(nb), 0.0);
    for (index_t b = 0; b < nb; ++b) {
      double m = 0.0;
      const index_t end = std::min(k_, (b + 1) * bs);
      for (index_t j = b * bs; j < end; ++j) m = std::max(m, std::abs(p[j] - q[j]));
      partial[static_cast<std::size_t>(b)] = m;
    }
    return *std::max_element(partial.begin(), partial.end());
  }

  const std::vector<double>& hessian_diagonal() const { return hess_; }
  const std::vector<double>& weights() const { return pr_.class_weights(); }
  Regularizer regularizer_kind() const { return reg_; }

  // Largest eigenvalue of F's Hessian 2 U W U^T, by power iteration on the C x C
  // matrix W^1/2 U^T U W^1/2 from a fixed start (deterministic).
  double curvature_estimate() const {
    const auto& w = pr_.class_weights();
    std::vector<double> v(static_cast<std::size_t>(c_), 1.0), x(static_cast<std::size_t>(k_)),
        u(static_cast<std::size_t>(c_));
    double lambda = 0.0;
    for (index_t it = 0; it < kPowerIterations; ++it) {
      double norm = 0.0;
      for (double e : v) norm += e * e;
      norm = std::sqrt(norm);
      if (!(norm > 0.0)) return 0.0;
      for (index_t i = 0; i < c_; ++i) {
        v[i] /= norm;                    // the unit vector v
        u[i] = std::sqrt(w[i]) * v[i];  // W^1/2 v
      }
      pr_.pattern_sums(u.data(), x.data(), n_threads_);
      lambda = 0.0;
      pr_.class_sums(x.data(), u.data(), n_threads_);
      for (index_t i = 0; i < c_; ++i) {
        const double mv = std::sqrt(w[i]) * u[i];  // (W^1/2 U^T U W^1/2 v)_i
        lambda += v[i] * mv;
        v[i] = mv;
      }
    }
    return 2.0 * lambda;
  }

 private:
  std::pair<double, double> bracket(const double* y, const double* metric) const {
    const double* lo = lo_.data();
    const double* hi = hi_.data();
    double first = kInf, last = -kInf;
    for (index_t j = 0; j < k_; ++j) {
      const double top = std::isfinite(hi[j]) ? hi[j] : lo[j] + 1.0;
      first = std::min(first, metric[j] * (y[j] - top));
      last = std::max(last, metric[j] * (y[j] - lo[j]));
    }
    return {first, last};
  }

  const BalanceProblem& pr_;
  Regularizer reg_;
  double total_;
  std::vector<double> lo_, hi_, hess_;
  mutable std::vector<double> ones_;
  int n_threads_;
  index_t k_, c_;
  int parts_;
};

struct InnerResult {
  index_t n_iter = 0;
  bool converged = false;
  double residual = kInf;
};

// FISTA with gradient restart for F + mu R from x (feasible; updated in place). The
// stopping test is on the natural residual of grad_scale(x) * (dF + mu dR), which is
// the reported problem's gradient (see solve_exact).
template <class Scale>
InnerResult fista(const ConvexQP& qp, double mu, std::vector<double>& x, double& lipschitz, index_t max_iter,
                  double tol, Scale&& grad_scale) {
  const index_t k = qp.k(), c = qp.c();
  const auto& hess = qp.hessian_diagonal();
  std::vector<double> metric(static_cast<std::size_t>(k));
  auto set_metric = [&] {
    for (index_t j = 0; j < k; ++j) metric[j] = lipschitz + mu * hess[j];
  };
  set_metric();
  std::vector<double> y = x, x_new(static_cast<std::size_t>(k)), grad(static_cast<std::size_t>(k)),
      z(static_cast<std::size_t>(k));
  std::vector<double> fx(static_cast<std::size_t>(c)), fy, f_new(static_cast<std::size_t>(c)), work, work2;
  qp.marginals(x.data(), fx.data());
  fy = fx;
  double t = 1.0, tau = 0.0, tau_residual = 0.0;
  InnerResult result;

  auto residual_at_x = [&]() {
    const double s = grad_scale(fx);
    qp.gradient(x.data(), fx.data(), s, s * mu, grad.data(), work);
    return qp.natural_residual(x.data(), grad.data(), work2, tau_residual);
  };

  result.residual = residual_at_x();
  if (result.residual <= tol) {
    result.converged = true;
    return result;
  }
  for (index_t it = 1; it <= max_iter; ++it) {
    result.n_iter = it;
    qp.gradient(y.data(), fy.data(), 1.0, mu, grad.data(), work);
    qp.for_patterns([&](index_t j0, index_t j1) {
      for (index_t j = j0; j < j1; ++j) z[j] = y[j] - grad[j] / metric[j];
    });
    qp.project(z.data(), metric.data(), x_new.data(), tau);
    qp.marginals(x_new.data(), f_new.data());

    // F is quadratic: F(y + d) - F(y) - <dF(y), d> = sum_i w_i (U^T d)_i^2 exactly, so the
    // step is valid iff that is <= lipschitz / 2 |d|^2 (R's part is covered by mu * hess).
    const auto sums = qp.sum_patterns<2>([&](index_t j, std::array<double, 2>& acc) {
      const double d = x_new[j] - y[j];
      acc[0] += d * d;
      acc[1] += (y[j] - x_new[j]) * (x_new[j] - x[j]);
    });
    double curvature = 0.0;
    {
      const auto& w = qp.weights();
      for (index_t i = 0; i < c; ++i) {
        const double df = f_new[i] - fy[i];
        curvature += w[i] * df * df;
      }
    }
    if (2.0 * curvature > lipschitz * sums[0] * (1.0 + 1e-12) && sums[0] > 0.0) {
      lipschitz = std::max(2.0 * lipschitz, 2.0 * 1.1 * curvature / sums[0]);
      set_metric();
      y = x;
      fy = fx;
      t = 1.0;
      continue;
    }
    if (sums[1] > 0.0) {
      // Momentum points uphill: restart (O'Donoghue & Candes).
      t = 1.0;
      y = x_new;
      fy = f_new;
    } else {
      const double t_next = 0.5 * (1.0 + std::sqrt(1.0 + 4.0 * t * t));
      const double beta = (t - 1.0) / t_next;
      qp.for_patterns([&](index_t j0, index_t j1) {
        for (index_t j = j0; j < j1; ++j) y[j] = x_new[j] + beta * (x_new[j] - x[j]);
      });
      for (index_t i = 0; i < c; ++i) fy[i] = f_new[i] + beta * (f_new[i] - fx[i]);
      t = t_next;
    }
    x.swap(x_new);
    fx.swap(f_new);
    if (it % kResidualEvery == 0 || it == max_iter) {
      result.residual = residual_at_x();
      if (result.residual <= tol) {
        result.converged = true;
        return result;
      }
    }
  }
  return result;
}

}  // namespace

ExactResult solve_exact(const BalanceProblem& problem, Objective objective, Regularizer regularizer, double gamma,
                        double total, const std::vector<double>& lower, const std::vector<double>& upper,
                        const ExactOptions& options) {
  if (objective == Objective::geo)
    bad("objective 'geo' is not convex in p; the exact solver accepts 'fraction' or 'fraction_l2'");
  if (!std::isfinite(gamma) || gamma < 0.0) bad("gamma must be finite and >= 0, got " + show(gamma));
  if (!std::isfinite(total) || !(total > 0.0)) bad("total must be finite and > 0, got " + show(total));
  if (std::isnan(options.tol) || options.tol < 0.0) bad("tol must be >= 0, got " + show(options.tol));
  if (options.max_iter < 0) bad("max_iter must be >= 0, got " + std::to_string(options.max_iter));
  check_bounds(problem, lower, upper);
  const index_t k = problem.n_patterns();
  double sum_lower = 0.0, sum_upper = 0.0;
  for (index_t j = 0; j < k; ++j) {
    sum_lower += lower[j];
    sum_upper += upper[j];
  }
  if (sum_lower > total * (1.0 + 1e-12))
    bad("total must be >= sum(lower) = " + show(sum_lower) + " for the bounds to be feasible, got " + show(total));
  if (sum_upper < total * (1.0 - 1e-12))
    bad("total must be <= sum(upper) = " + show(sum_upper) + " for the bounds to be feasible, got " + show(total));

  std::vector<double> lo(static_cast<std::size_t>(k)), hi(static_cast<std::size_t>(k));
  for (index_t j = 0; j < k; ++j) {
    lo[j] = lower[j] / total;
    hi[j] = upper[j] / total;
  }
  const ConvexQP qp(problem, regularizer, total, lo, hi, options.n_threads);
  const index_t c = qp.c();
  std::vector<double> f(static_cast<std::size_t>(c));

  // Start from the Euclidean projection of the current proportions p0.
  std::vector<double> x(static_cast<std::size_t>(k)), ones(static_cast<std::size_t>(k), 1.0);
  double tau = 0.0;
  qp.project(problem.base_proportions().data(), ones.data(), x.data(), tau);
  double lipschitz = std::max(1.02 * qp.curvature_estimate(), 1e-12);

  auto root_scale = [&](const std::vector<double>& fx) {
    const double value = qp.objective(fx.data());
    return value > 0.0 ? 0.5 / std::sqrt(value) : 0.0;
  };
  ExactResult result;
  bool outer_converged = true;
  if (objective == Objective::fraction) {
    const auto inner = fista(qp, gamma, x, lipschitz, options.max_iter, options.tol, [](const std::vector<double>&) {
      return 1.0;
    });
    result.n_iter = inner.n_iter;
  } else if (gamma == 0.0 || regularizer == Regularizer::none) {
    // sqrt is increasing: the minimiser of sqrt(F) is that of F.
    const auto inner = fista(qp, 0.0, x, lipschitz, options.max_iter, options.tol, root_scale);
    result.n_iter = inner.n_iter;
  } else {
    // KKT of sqrt(F) + gamma R == KKT of F + mu R with mu = 2 gamma sqrt(F): find the
    // root of h(mu) = mu - 2 gamma sqrt(F(p(mu))), unique because the optimum is.
    auto fixed_point = [&]() {
      qp.marginals(x.data(), f.data());
      return 2.0 * gamma * std::sqrt(qp.objective(f.data()));
    };
    double mu = fixed_point();
    double mu_below = 0.0, h_below = -kInf, mu_above = kInf, h_above = kInf;
    bool has_below = false, has_above = false;
    int side = 0;  // Illinois: the side kept twice in a row
    outer_converged = false;
    for (int outer = 0; outer < 200 && result.n_iter < options.max_iter; ++outer) {
      const double inner_tol = options.tol;
      const auto inner = fista(qp, mu, x, lipschitz, options.max_iter - result.n_iter, inner_tol, root_scale);
      result.n_iter += inner.n_iter;
      const double image = fixed_point();
      const double h = mu - image;
      if (std::abs(h) <= 1e-12 * std::max(mu, 1e-300) && inner.converged) {
        outer_converged = true;
        break;
      }
      if (h < 0.0) {
        if (has_below && side == -1) h_above *= 0.5;
        mu_below = mu, h_below = h, has_below = true, side = -1;
      } else {
        if (has_above && side == 1) h_below *= 0.5;
        mu_above = mu, h_above = h, has_above = true, side = 1;
      }
      double next = image;  // the fixed-point step until the root is bracketed
      if (has_below && has_above) {
        next = mu_below - h_below * (mu_above - mu_below) / (h_above - h_below);
        if (!(next > mu_below && next < mu_above)) next = 0.5 * (mu_below + mu_above);
        if (mu_above - mu_below <= 1e-15 * mu_above) {
          outer_converged = inner.converged;
          break;
        }
      }
      mu = next;
    }
  }

  // Report the KKT residual of the problem as posed (objective + gamma R).
  qp.marginals(x.data(), f.data());
  const double scale = objective == Objective::fraction ? 1.0 : root_scale(f);
  std::vector<double> grad(static_cast<std::size_t>(k)), work, work2;
  qp.gradient(x.data(), f.data(), scale, gamma, grad.data(), work);
  double tau_residual = 0.0;
  result.kkt_residual = qp.natural_residual(x.data(), grad.data(), work2, tau_residual);
  result.converged = outer_converged && result.kkt_residual <= options.tol;

  result.alpha.resize(static_cast<std::size_t>(k));
  for (index_t j = 0; j < k; ++j) result.alpha[j] = total * x[j];
  result.loss = problem.evaluate(result.alpha.data(), objective, regularizer, gamma, nullptr, options.n_threads);
  result.marginals.resize(static_cast<std::size_t>(c));
  problem.marginals(result.alpha.data(), result.marginals.data(), options.n_threads);
  result.max_abs_error = 0.0;
  for (index_t i = 0; i < c; ++i)
    result.max_abs_error = std::max(result.max_abs_error, std::abs(result.marginals[i] - problem.target()[i]));
  result.p = std::move(x);
  return result;
}

}  // namespace cobalance
