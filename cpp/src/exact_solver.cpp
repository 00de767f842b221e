#include "cobalance/exact_solver.hpp"

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>
#include <utility>

#include "box_simplex.hpp"
#include "cobalance/adam.hpp"
#include "invalid_argument.hpp"

namespace cobalance {

namespace {

constexpr double kHundredSquared = 1.0e4;
constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr index_t kPowerIterations = 50;
constexpr index_t kResidualEvery = 10;  // FISTA iterations between KKT tests

using detail::bad;
using detail::show;

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
        blocks_(problem, n_threads) {
    // Diagonal of R's Hessian in p (every regularizer is a separable quadratic).
    ones_.assign(static_cast<std::size_t>(k_), 1.0);
    hess_.assign(static_cast<std::size_t>(k_), 0.0);
    lin_.assign(static_cast<std::size_t>(k_), 0.0);
    const auto& n = pr_.counts();
    const auto& p0 = pr_.base_proportions();
    for (index_t j = 0; j < k_; ++j) {
      switch (reg_) {
        case Regularizer::none: hess_[j] = 0.0, lin_[j] = 0.0; break;
        case Regularizer::counts:
          hess_[j] = 2.0 * total_ * total_ / (n[j] * n[j]), lin_[j] = -2.0 * total_ / n[j];
          break;
        case Regularizer::proportions:
          hess_[j] = 2.0 * kHundredSquared, lin_[j] = -2.0 * kHundredSquared * p0[j];
          break;
        case Regularizer::ratio: hess_[j] = 2.0 / (p0[j] * p0[j]), lin_[j] = -2.0 / p0[j]; break;
        case Regularizer::ess: break;  // refused by solve_exact before a QP is built
      }
    }
  }

  index_t k() const { return k_; }
  index_t c() const { return c_; }

  // Runs fn(j0, j1) over the problem's blocks of patterns.
  template <class Fn>
  void for_patterns(Fn&& fn) const {
    blocks_.for_each(std::forward<Fn>(fn));
  }

  // Sums `width` per-pattern quantities: fn(j, acc) adds pattern j's terms into acc[0..width).
  template <int width, class Fn>
  std::array<double, width> sum_patterns(Fn&& fn) const {
    return blocks_.sum<width>(std::forward<Fn>(fn));
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
    // Every regularizer's gradient is affine in p: hess_j p_j + lin_j.
    const double* h = hess_.data();
    const double* b = lin_.data();
    for_patterns([&](index_t j0, index_t j1) {
      for (index_t j = j0; j < j1; ++j) grad[j] += s_r * (h[j] * p[j] + b[j]);
    });
  }

  // out = argmin sum_j metric_j (q_j - y_j)^2  s.t.  sum q = 1, lo <= q <= hi (see
  // project_box_simplex); `tau` is a warm start in, the multiplier out.
  void project(const double* y, const double* inv_metric, double* out, double& tau) const {
    project_box_simplex(blocks_, y, inv_metric, lo_.data(), hi_.data(), 1.0, out, tau);
  }

  // max_j |p_j - P(p - grad)_j| with P the Euclidean projection.
  double natural_residual(const double* p, const double* grad, std::vector<double>& work, double& tau) const {
    work.resize(static_cast<std::size_t>(k_) * 2);
    double* y = work.data();
    double* q = work.data() + k_;
    for_patterns([&](index_t j0, index_t j1) {
      for (index_t j = j0; j < j1; ++j) y[j] = p[j] - grad[j];
    });
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
  const std::vector<double>& linear_term() const { return lin_; }
  const std::vector<double>& lower() const { return lo_; }
  const std::vector<double>& upper() const { return hi_; }
  const BalanceProblem& problem() const { return pr_; }
  Regularizer regularizer_kind() const { return reg_; }
  int n_threads() const { return n_threads_; }
  // mu R(p) + <y_patterns, p>: the dual's pattern part (y_patterns = U y).
  double dual_pattern_part(const double* p, const double* uy, double mu) const {
    const double* h = hess_.data();
    const double* b = lin_.data();
    return sum_patterns<1>([&](index_t j, std::array<double, 1>& acc) {
      acc[0] += mu * (0.5 * h[j] * p[j] * p[j] + b[j] * p[j]) + uy[j] * p[j];
    })[0];
  }
  const std::vector<double>& weights() const { return pr_.class_weights(); }

  // Largest eigenvalue of F's Hessian 2 U W U^T, by power iteration on the C x C
  // matrix W^1/2 U^T U W^1/2 from a fixed start (deterministic).
  double curvature_estimate(InterruptPoller& interrupt) const {
    const auto& w = pr_.class_weights();
    std::vector<double> v(static_cast<std::size_t>(c_), 1.0), x(static_cast<std::size_t>(k_)),
        u(static_cast<std::size_t>(c_));
    double lambda = 0.0;
    for (index_t it = 0; it < kPowerIterations; ++it) {
      interrupt.poll();
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
  const BalanceProblem& pr_;
  Regularizer reg_;
  double total_;
  std::vector<double> lo_, hi_, hess_, lin_;  // R's gradient is hess_ * p + lin_
  std::vector<double> ones_;  // the Euclidean metric
  int n_threads_;
  index_t k_, c_;
  detail::PatternBlocks blocks_;
};

struct InnerResult {
  index_t n_iter = 0;
  bool converged = false;
  double residual = kInf;
};

// FISTA with gradient restart for F + mu R from x (feasible; updated in place). The
// stopping test is on the natural residual of dF + mu dR.
InnerResult fista(const ConvexQP& qp, double mu, std::vector<double>& x, double& lipschitz, index_t max_iter,
                  double tol, InterruptPoller& interrupt) {
  const index_t k = qp.k(), c = qp.c();
  const auto& hess = qp.hessian_diagonal();
  std::vector<double> inv_metric(static_cast<std::size_t>(k));
  auto set_metric = [&] {
    for (index_t j = 0; j < k; ++j) inv_metric[j] = 1.0 / (lipschitz + mu * hess[j]);
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
    qp.gradient(x.data(), fx.data(), 1.0, mu, grad.data(), work);
    return qp.natural_residual(x.data(), grad.data(), work2, tau_residual);
  };

  result.residual = residual_at_x();
  if (result.residual <= tol) {
    result.converged = true;
    return result;
  }
  for (index_t it = 1; it <= max_iter; ++it) {
    interrupt.poll();
    result.n_iter = it;
    qp.gradient(y.data(), fy.data(), 1.0, mu, grad.data(), work);
    qp.for_patterns([&](index_t j0, index_t j1) {
      for (index_t j = j0; j < j1; ++j) z[j] = y[j] - grad[j] * inv_metric[j];
    });
    qp.project(z.data(), inv_metric.data(), x_new.data(), tau);
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

// Semismooth Newton on the dual of F + mu R (mu > 0, every w_i > 0), whose variable is
// y = 2 w (U^T p - d), one per class. For a given y the primal minimiser is the
// projection p(y) = P_D(c - (U y) / (mu h)) (c the regularizer's centre, D = mu h),
// so the dual is smooth and concave with gradient U^T p(y) - d - y / (2 w), and its
// generalised Hessian is -(U^T (V - v v^T / sum v) U + diag(1 / (2 w))) with v = 1 / (mu h)
// on the patterns strictly inside their bounds. Steps are damped by a backtracking
// (Armijo) line search on the dual. Returns true when the primal KKT residual at p(y)
// is <= tol, with x = p(y); otherwise x is the last p(y) (feasible) for FISTA to go on.
// Only used where the C x C system is cheap (see newton_applies).
bool newton_applies(const ConvexQP& qp, double mu) {
  const BalanceProblem& pr = qp.problem();
  if (!(mu > 0.0) || qp.regularizer_kind() == Regularizer::none) return false;
  // The C x C Cholesky solve (C^3 / 3 per step) must stay cheap next to a pass over the data,
  // and the dual smaller than the primal.
  if (pr.n_classes() > 512 || 4 * pr.n_classes() > pr.n_patterns()) return false;
  for (double w : pr.class_weights())
    if (!(w > 0.0)) return false;
  for (double h : qp.hessian_diagonal())
    if (!(h > 0.0) || !std::isfinite(h)) return false;
  // Forming U^T V U costs sum_j |u_j|^2.
  double pairs = 0.0;
  const auto& ptr = pr.indptr();
  for (index_t j = 0; j < pr.n_patterns(); ++j) {
    const double len = static_cast<double>(ptr[j + 1] - ptr[j]);
    pairs += len * len;
  }
  return pairs <= 64.0 * static_cast<double>(pr.nnz() + pr.n_patterns());
}

bool dual_newton(const ConvexQP& qp, double mu, std::vector<double>& x, index_t max_iter, double tol,
                 index_t& n_iter, InterruptPoller& interrupt) {
  const BalanceProblem& pr = qp.problem();
  const index_t k = qp.k(), c = qp.c();
  const auto& w = pr.class_weights();
  const auto& d = pr.target();
  const auto& h = qp.hessian_diagonal();
  const auto& b = qp.linear_term();
  const auto& lo = qp.lower();
  const auto& hi = qp.upper();
  const auto& ptr = pr.indptr();
  const auto& idx = pr.indices();
  std::vector<double> inv(static_cast<std::size_t>(k)), centre(static_cast<std::size_t>(k));
  for (index_t j = 0; j < k; ++j) {
    inv[j] = 1.0 / (mu * h[j]);
    centre[j] = -b[j] / h[j];
  }
  std::vector<double> f(static_cast<std::size_t>(c)), y(static_cast<std::size_t>(c)), uy(static_cast<std::size_t>(k)),
      z(static_cast<std::size_t>(k)), p(static_cast<std::size_t>(k)), grad_p(static_cast<std::size_t>(k)),
      work, work2;
  qp.marginals(x.data(), f.data());
  for (index_t i = 0; i < c; ++i) y[i] = 2.0 * w[i] * (f[i] - d[i]);
  double tau = 0.0, tau_residual = 0.0;
  // On failure FISTA goes on from the better (in F + mu R) of the start and p(y).
  const double start_value = qp.objective(f.data()) + mu * qp.regularizer(x.data());
  auto give_up = [&](const std::vector<double>& pv, const std::vector<double>& fv) {
    if (qp.objective(fv.data()) + mu * qp.regularizer(pv.data()) < start_value) x = pv;
    return false;
  };

  // p(y), f = U^T p(y), the dual value and its gradient.
  std::vector<double> dual_grad(static_cast<std::size_t>(c));
  auto evaluate = [&](const std::vector<double>& yv, std::vector<double>& pv, std::vector<double>& fv,
                      std::vector<double>& gv) {
    pr.pattern_sums(yv.data(), uy.data(), qp.n_threads());
    for (index_t j = 0; j < k; ++j) z[j] = centre[j] - uy[j] * inv[j];
    qp.project(z.data(), inv.data(), pv.data(), tau);
    qp.marginals(pv.data(), fv.data());
    double value = qp.dual_pattern_part(pv.data(), uy.data(), mu);
    for (index_t i = 0; i < c; ++i) {
      value += -yv[i] * d[i] - yv[i] * yv[i] / (4.0 * w[i]);
      gv[i] = fv[i] - d[i] - yv[i] / (2.0 * w[i]);
    }
    return value;
  };
  double value = evaluate(y, p, f, dual_grad);
  std::vector<double> m(static_cast<std::size_t>(c * c)), a(static_cast<std::size_t>(c)), step(static_cast<std::size_t>(c)),
      y_try(static_cast<std::size_t>(c)), p_try(static_cast<std::size_t>(k)), f_try(static_cast<std::size_t>(c)),
      g_try(static_cast<std::size_t>(c));
  for (index_t it = 0; it < max_iter; ++it) {
    interrupt.poll();
    qp.gradient(p.data(), f.data(), 1.0, mu, grad_p.data(), work);
    if (qp.natural_residual(p.data(), grad_p.data(), work2, tau_residual) <= tol) {
      x = p;
      return true;
    }
    ++n_iter;
    // M = U^T V U - a a^T / s + diag(1 / (2 w)), a = U^T v, s = sum v (lower triangle).
    std::fill(m.begin(), m.end(), 0.0);
    std::fill(a.begin(), a.end(), 0.0);
    double s = 0.0;
    for (index_t j = 0; j < k; ++j) {
      if (!(p[j] > lo[j] && p[j] < hi[j])) continue;
      const double v = inv[j];
      s += v;
      for (index_t e = ptr[j]; e < ptr[j + 1]; ++e) {
        const index_t r = idx[e];
        a[r] += v;
        for (index_t e2 = ptr[j]; e2 < ptr[j + 1]; ++e2) {
          const index_t q = idx[e2];
          if (q <= r) m[r * c + q] += v;
        }
      }
    }
    for (index_t r = 0; r < c; ++r) {
      for (index_t q = 0; q <= r; ++q) m[r * c + q] -= s > 0.0 ? a[r] * a[q] / s : 0.0;
      m[r * c + r] += 1.0 / (2.0 * w[r]);
    }
    // Cholesky (in place, lower triangle); M is positive definite by construction.
    for (index_t r = 0; r < c; ++r) {
      for (index_t q = 0; q <= r; ++q) {
        double sum = m[r * c + q];
        for (index_t t = 0; t < q; ++t) sum -= m[r * c + t] * m[q * c + t];
        if (q == r) {
          if (!(sum > 0.0)) return give_up(p, f);
          m[r * c + r] = std::sqrt(sum);
        } else {
          m[r * c + q] = sum / m[q * c + q];
        }
      }
    }
    for (index_t r = 0; r < c; ++r) {
      double sum = dual_grad[r];
      for (index_t t = 0; t < r; ++t) sum -= m[r * c + t] * step[t];
      step[r] = sum / m[r * c + r];
    }
    for (index_t r = c; r-- > 0;) {
      double sum = step[r];
      for (index_t t = r + 1; t < c; ++t) sum -= m[t * c + r] * step[t];
      step[r] = sum / m[r * c + r];
    }
    double slope = 0.0;
    for (index_t i = 0; i < c; ++i) slope += dual_grad[i] * step[i];
    if (!(slope > 0.0)) break;
    double t = 1.0, value_try = value;
    bool accepted = false;
    double grad_norm = 0.0;
    for (double g : dual_grad) grad_norm += g * g;
    for (int ls = 0; ls < 30; ++ls, t *= 0.5) {
      interrupt.poll();
      for (index_t i = 0; i < c; ++i) y_try[i] = y[i] + t * step[i];
      value_try = evaluate(y_try, p_try, f_try, g_try);
      // Armijo on the dual value; near the optimum its change drowns in rounding, so a
      // halved gradient norm also counts as progress.
      double try_norm = 0.0;
      for (double g : g_try) try_norm += g * g;
      if (value_try >= value + 1e-4 * t * slope || try_norm <= 0.25 * grad_norm) {
        accepted = true;
        break;
      }
    }
    if (!accepted) break;
    y.swap(y_try);
    p.swap(p_try);
    f.swap(f_try);
    dual_grad.swap(g_try);
    value = value_try;
  }
  return give_up(p, f);
}

// The QP for one mu: Newton on the dual where it applies, then (if still needed) FISTA.
InnerResult solve_qp(const ConvexQP& qp, double mu, std::vector<double>& x, double& lipschitz, index_t max_iter,
                     double tol, InterruptPoller& interrupt) {
  InnerResult result;
  if (newton_applies(qp, mu)) {
    index_t newton_iter = 0;
    const bool done = dual_newton(qp, mu, x, std::min<index_t>(max_iter, 60), tol, newton_iter, interrupt);
    if (done) {
      result.n_iter = newton_iter;
      result.converged = true;
      return result;
    }
    result = fista(qp, mu, x, lipschitz, max_iter - newton_iter, tol, interrupt);
    result.n_iter += newton_iter;
    return result;
  }
  return fista(qp, mu, x, lipschitz, max_iter, tol, interrupt);
}

}  // namespace

ExactResult solve_exact(const BalanceProblem& problem, Objective objective, Regularizer regularizer, double gamma,
                        double total, const std::vector<double>& lower, const std::vector<double>& upper,
                        const ExactOptions& options) {
  if (objective == Objective::geo || objective == Objective::imbalance)
    bad(std::string("objective '") + objective_name(objective) +
        "' is not a convex quadratic in p; the exact solver accepts 'fraction' or 'fraction_l2' "
        "(projected_gradient solves the others)");
  if (regularizer == Regularizer::ess)
    bad("regularizer 'ess' is piecewise linear, not quadratic; the exact solver accepts 'none', 'counts', "
        "'proportions' or 'ratio' (projected_gradient solves it)");
  if (!std::isfinite(gamma) || gamma < 0.0) bad("gamma must be finite and >= 0, got " + show(gamma));
  if (std::isnan(options.tol) || options.tol < 0.0) bad("tol must be >= 0, got " + show(options.tol));
  if (options.max_iter < 0) bad("max_iter must be >= 0, got " + std::to_string(options.max_iter));
  check_bounds(problem, lower, upper);
  detail::check_total(lower, upper, total);
  const index_t k = problem.n_patterns();

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
  InterruptPoller interrupt(options.interrupt);
  double lipschitz = std::max(1.02 * qp.curvature_estimate(interrupt), 1e-12);

  ExactResult result;
  bool outer_converged = true;
  double mu = gamma;  // the regularizer's weight in the QP that is solved
  if (objective == Objective::fraction) {
    result.n_iter = solve_qp(qp, gamma, x, lipschitz, options.max_iter, options.tol, interrupt).n_iter;
  } else if (gamma == 0.0 || regularizer == Regularizer::none) {
    // sqrt is increasing: the minimiser of sqrt(F) is that of F.
    mu = 0.0;
    result.n_iter = fista(qp, 0.0, x, lipschitz, options.max_iter, options.tol, interrupt).n_iter;
  } else {
    // KKT of sqrt(F) + gamma R == KKT of F + mu R with mu = 2 gamma sqrt(F): find the
    // root of h(mu) = mu - 2 gamma sqrt(F(p(mu))), unique because the optimum is.
    auto fixed_point = [&]() {
      qp.marginals(x.data(), f.data());
      return 2.0 * gamma * std::sqrt(qp.objective(f.data()));
    };
    double weight_sum = 0.0;
    for (double w : problem.class_weights()) weight_sum += w;
    const double exact_fit_floor = 1e-8 * 2.0 * gamma * std::sqrt(weight_sum);  // F <= sum w
    mu = fixed_point();
    double mu_solved = mu;
    double mu_below = 0.0, h_below = 0.0, mu_above = kInf, h_above = 0.0, mu_previous = 0.0, h_previous = 0.0;
    bool has_below = false, has_above = false;
    int side = 0;  // Illinois: the side kept twice in a row
    outer_converged = false;
    for (int outer = 0; outer < 200 && result.n_iter < options.max_iter; ++outer) {
      interrupt.poll();
      const auto inner = solve_qp(qp, mu, x, lipschitz, options.max_iter - result.n_iter, options.tol, interrupt);
      result.n_iter += inner.n_iter;
      mu_solved = mu;
      const double image = fixed_point();
      const double h = mu - image;
      // An exact fit (F = 0 reachable: the root is mu -> 0, where the QP grows
      // ill-conditioned): stop once sqrt(F) is below 1e-8 of its largest value.
      // Otherwise relative to mu.
      if (image <= exact_fit_floor || std::abs(h) <= 1e-12 * std::max(mu, image)) {
        outer_converged = inner.converged;
        break;
      }
      if (h < 0.0) {
        if (has_below && side == -1) h_above *= 0.5;
        mu_below = mu, h_below = h, has_below = true, side = -1;
      } else {
        if (has_above && side == 1) h_below *= 0.5;
        mu_above = mu, h_above = h, has_above = true, side = 1;
      }
      // Secant steps through the last two points until the root is bracketed (the
      // fixed-point map can contract slowly), falling back on the fixed-point step.
      double next = image;
      if (outer > 0 && h != h_previous) {
        const double secant = mu - h * (mu - mu_previous) / (h - h_previous);
        if (std::isfinite(secant) && secant >= 0.0) next = secant;
      }
      mu_previous = mu, h_previous = h;
      if (has_below && has_above) {
        if (mu_above - mu_below <= 1e-15 * mu_above) {
          outer_converged = inner.converged;
          break;
        }
        next = mu_below - h_below * (mu_above - mu_below) / (h_above - h_below);
        if (!(next > mu_below && next < mu_above)) next = 0.5 * (mu_below + mu_above);
      }
      mu = next;
    }
    mu = mu_solved;
  }

  // The KKT residual of the QP that was solved last (see the header for fraction_l2).
  qp.marginals(x.data(), f.data());
  std::vector<double> grad(static_cast<std::size_t>(k)), work, work2;
  qp.gradient(x.data(), f.data(), 1.0, mu, grad.data(), work);
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
