#include "cobalance/adam.hpp"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <string>
#include <type_traits>

#include "box_simplex.hpp"
#include "cobalance/parallel.hpp"
#include "invalid_argument.hpp"

namespace cobalance {

namespace {

using detail::bad;
using detail::show;

// One Adam step's constants. The first moment uses torch.lerp's formula
// (start + w (end - start) for w < 0.5, else end - (end - start)(1 - w)), so that the
// trajectory matches torch.optim.Adam to the last bits where it can. The loops below
// take that branch outside the loop and work on restrict-qualified arrays, so that the
// compiler vectorises them; the operations, and so the results, are those of one
// entry at a time.
struct AdamStep {
  double weight, beta2, bias2_sqrt, eps, step;
};

template <bool low_weight>
inline double first_moment(const AdamStep& s, double start, double end) {
  return low_weight ? start + s.weight * (end - start) : end - (end - start) * (1.0 - s.weight);
}

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define COBALANCE_ADAM_AVX2 1
#define COBALANCE_INLINE inline __attribute__((always_inline))
#else
#define COBALANCE_INLINE inline
#endif

// The arrays one step reads and writes. With a fixed total the moved point goes to
// `out` and the step's 1 / D_j to `inv`; without, the moved point is clamped to
// [lower, upper] into `alpha`. The pointers a case does not use are null.
struct AdamArrays {
  const double* g;
  double* m;
  double* v;
  double* alpha;
  const double* lower;
  const double* upper;
  double* out;
  double* inv;
};

template <bool low_weight, bool fixed_total>
COBALANCE_INLINE void adam_step_impl(const AdamStep& s, const double* __restrict g, double* __restrict m,
                                     double* __restrict v, double* __restrict alpha, const double* __restrict lower,
                                     const double* __restrict upper, double* __restrict out, double* __restrict inv,
                                     std::size_t j0, std::size_t j1) {
  for (std::size_t j = j0; j < j1; ++j) {
    const double gj = g[j];
    m[j] = first_moment<low_weight>(s, m[j], gj);
    v[j] = v[j] * s.beta2 + (1.0 - s.beta2) * (gj * gj);  // torch: mul_(beta2).addcmul_(g, g, 1 - beta2)
    const double denom = std::sqrt(v[j]) / s.bias2_sqrt + s.eps;
    const double moved = alpha[j] - s.step * (m[j] / denom);
    if constexpr (fixed_total) {
      out[j] = moved;
      inv[j] = 1.0 / denom;
    } else {
      alpha[j] = std::min(std::max(moved, lower[j]), upper[j]);
    }
  }
}

template <bool low_weight, bool fixed_total>
void adam_step_portable(const AdamStep& s, const AdamArrays& a, std::size_t j0, std::size_t j1) {
  adam_step_impl<low_weight, fixed_total>(s, a.g, a.m, a.v, a.alpha, a.lower, a.upper, a.out, a.inv, j0, j1);
}

using AdamKernel = void (*)(const AdamStep&, const AdamArrays&, std::size_t, std::size_t);

#ifdef COBALANCE_ADAM_AVX2
// The same loop compiled for AVX2 (4 doubles a vector instead of SSE2's 2), taken when
// the CPU has it. AVX2 brings no FMA: every operation rounds as in the portable loop, so
// the results are bitwise the same (COBALANCE_NO_AVX2=1 forces the portable loop, which
// CTest runs too).
template <bool low_weight, bool fixed_total>
__attribute__((target("avx2"))) void adam_step_avx2(const AdamStep& s, const AdamArrays& a, std::size_t j0,
                                                    std::size_t j1) {
  adam_step_impl<low_weight, fixed_total>(s, a.g, a.m, a.v, a.alpha, a.lower, a.upper, a.out, a.inv, j0, j1);
}

bool use_avx2() {
  static const bool yes = std::getenv("COBALANCE_NO_AVX2") == nullptr && __builtin_cpu_supports("avx2");
  return yes;
}
#endif

// One Adam step over entries [j0, j1): the loop compiled for this CPU, with torch.lerp's
// branch and the fixed-total case chosen once, outside it.
void adam_step(const AdamStep& s, const AdamArrays& a, bool fixed_total, std::size_t j0, std::size_t j1) {
  // [low weight][fixed total]
  static constexpr AdamKernel portable[2][2] = {
      {adam_step_portable<false, false>, adam_step_portable<false, true>},
      {adam_step_portable<true, false>, adam_step_portable<true, true>}};
  const AdamKernel(*kernels)[2] = portable;
#ifdef COBALANCE_ADAM_AVX2
  static constexpr AdamKernel avx2[2][2] = {{adam_step_avx2<false, false>, adam_step_avx2<false, true>},
                                             {adam_step_avx2<true, false>, adam_step_avx2<true, true>}};
  if (use_avx2()) kernels = avx2;
#endif
  kernels[s.weight < 0.5][fixed_total](s, a, j0, j1);
}

}  // namespace

void check_bounds(const BalanceProblem& problem, const std::vector<double>& lower, const std::vector<double>& upper) {
  const auto k = static_cast<std::size_t>(problem.n_patterns());
  if (lower.size() != k)
    bad("lower must have n_patterns = " + std::to_string(k) + " entries, got " + std::to_string(lower.size()));
  if (upper.size() != k)
    bad("upper must have n_patterns = " + std::to_string(k) + " entries, got " + std::to_string(upper.size()));
  for (std::size_t j = 0; j < k; ++j) {
    if (!std::isfinite(lower[j]) || lower[j] < 0.0)
      bad("lower must be finite and >= 0, got lower[" + std::to_string(j) + "] = " + show(lower[j]));
    if (std::isnan(upper[j])) bad("upper must not be NaN, got upper[" + std::to_string(j) + "] = nan");
    if (upper[j] < lower[j])
      bad("bounds must satisfy lower <= upper, got lower[" + std::to_string(j) + "] = " + show(lower[j]) +
          " > upper[" + std::to_string(j) + "] = " + show(upper[j]));
  }
}

AdamResult adam(const BalanceProblem& problem, std::vector<double> alpha0, const std::vector<double>& lower,
                const std::vector<double>& upper, Objective objective, Regularizer regularizer, double gamma,
                const AdamOptions& options) {
  const auto k = static_cast<std::size_t>(problem.n_patterns());
  if (!std::isfinite(options.lr) || !(options.lr > 0.0)) bad("lr must be finite and > 0, got " + show(options.lr));
  if (!std::isfinite(gamma) || gamma < 0.0) bad("gamma must be finite and >= 0, got " + show(gamma));
  if (!(options.beta1 >= 0.0 && options.beta1 < 1.0)) bad("beta1 must be in [0, 1), got " + show(options.beta1));
  if (!(options.beta2 >= 0.0 && options.beta2 < 1.0)) bad("beta2 must be in [0, 1), got " + show(options.beta2));
  if (!std::isfinite(options.eps) || !(options.eps > 0.0)) bad("eps must be finite and > 0, got " + show(options.eps));
  if (options.max_iter < 0) bad("max_iter must be >= 0, got " + std::to_string(options.max_iter));
  if (std::isnan(options.tol)) bad("tol must not be NaN");
  check_bounds(problem, lower, upper);
  const bool fixed_total = options.total.has_value();
  if (fixed_total) detail::check_total(lower, upper, *options.total);
  problem.check_alpha(alpha0.data(), static_cast<index_t>(alpha0.size()), "alpha0");
  if (!fixed_total)
    for (std::size_t j = 0; j < k; ++j)
      if (alpha0[j] < lower[j] || alpha0[j] > upper[j])
        bad("alpha0 must lie within the bounds, got alpha0[" + std::to_string(j) + "] = " + show(alpha0[j]) +
            " outside [" + show(lower[j]) + ", " + show(upper[j]) + "]");

  // One team for the whole run: every pass of every iteration goes to the same workers.
  const TeamScope team(problem.loop_parts(options.n_threads));
  AdamResult result;
  result.alpha = std::move(alpha0);
  double* alpha = result.alpha.data();
  std::vector<double> grad(k), m(k, 0.0), v(k, 0.0);
  // With a fixed total each step's point goes to `unprojected` and the step's
  // denominators to inv_metric (as 1 / D_j), then the projection in that metric onto
  // {lower <= alpha <= upper, sum alpha = total} to alpha (see adam.hpp for why this
  // metric). alpha0 is projected in the Euclidean metric. tau, the projection's
  // multiplier, warm-starts the next projection.
  const detail::PatternBlocks blocks(problem, options.n_threads);
  std::vector<double> unprojected, inv_metric;
  double tau = 0.0;
  auto project = [&] {
    detail::project_box_simplex(blocks, unprojected.data(), inv_metric.data(), lower.data(), upper.data(),
                                *options.total, alpha, tau);
  };
  if (fixed_total) {
    unprojected = result.alpha;
    inv_metric.assign(k, 1.0);
    project();  // the identity, to rounding, where alpha0 is feasible already
  }
  result.history.reserve(static_cast<std::size_t>(std::min<index_t>(options.max_iter, 1 << 20)) + 1);
  result.history.push_back(problem.evaluate(alpha, objective, regularizer, gamma, grad.data(), options.n_threads));

  const int parts = problem.parts(options.n_threads);
  const auto bounds = split_range(static_cast<std::int64_t>(k), parts);
  const double b1 = options.beta1, b2 = options.beta2, eps = options.eps;
  InterruptPoller interrupt(options.interrupt);
  for (index_t t = 1; t <= options.max_iter; ++t) {
    interrupt.poll();
    const double bias1 = 1.0 - std::pow(b1, static_cast<double>(t));
    const double bias2 = 1.0 - std::pow(b2, static_cast<double>(t));
    const double step = options.lr / bias1;
    const double bias2_sqrt = std::sqrt(bias2);
    // Elementwise: each entry depends on its own state only, so any split is exact.
    const AdamStep step_of{1.0 - b1, b2, bias2_sqrt, eps, step};
    const AdamArrays arrays{grad.data(), m.data(), v.data(), alpha,
                            fixed_total ? nullptr : lower.data(), fixed_total ? nullptr : upper.data(),
                            fixed_total ? unprojected.data() : nullptr, fixed_total ? inv_metric.data() : nullptr};
    run_parts(parts, [&](int part) {
      adam_step(step_of, arrays, fixed_total, static_cast<std::size_t>(bounds[static_cast<std::size_t>(part)]),
                static_cast<std::size_t>(bounds[static_cast<std::size_t>(part) + 1]));
    });
    if (fixed_total) project();
    double loss;
    try {
      loss = problem.evaluate(alpha, objective, regularizer, gamma, grad.data(), options.n_threads);
    } catch (const std::invalid_argument& e) {
      bad("Adam step " + std::to_string(t) + " reached an iterate where the loss is undefined (" + e.what() +
          "); lower lr or raise the lower bounds");
    }
    result.history.push_back(loss);
    result.n_iter = t;
    const double previous = result.history[result.history.size() - 2];
    if (options.tol > 0.0 && std::abs(previous - loss) <= options.tol * std::max(std::abs(previous), DBL_MIN)) {
      result.converged = true;
      break;
    }
  }
  return result;
}

}  // namespace cobalance
