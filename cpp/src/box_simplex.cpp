#include "box_simplex.hpp"

#include <cmath>
#include <limits>
#include <string>
#include <utility>

#include "invalid_argument.hpp"

namespace cobalance::detail {

namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

// A tau where the sum is >= total and one where it is <= total: with every entry at its
// upper bound (or at lo + total where unbounded) the sum is >= total; with every entry at
// its lower bound it is <= total.
std::pair<double, double> bracket(index_t k, const double* y, const double* inv_metric, const double* lo,
                                  const double* hi, double total) {
  double first = kInf, last = -kInf;
  for (index_t j = 0; j < k; ++j) {
    const double top = std::isfinite(hi[j]) ? hi[j] : lo[j] + total;
    first = std::min(first, (y[j] - top) / inv_metric[j]);
    last = std::max(last, (y[j] - lo[j]) / inv_metric[j]);
  }
  return {first, last};
}

}  // namespace

void check_total(const std::vector<double>& lower, const std::vector<double>& upper, double total) {
  if (!std::isfinite(total) || !(total > 0.0)) bad("total must be finite and > 0, got " + show(total));
  double sum_lower = 0.0, sum_upper = 0.0;
  for (std::size_t j = 0; j < lower.size(); ++j) {
    sum_lower += lower[j];
    sum_upper += upper[j];
  }
  if (sum_lower > total * (1.0 + 1e-12) || sum_upper < total * (1.0 - 1e-12))
    bad("total must lie in [sum(lower), sum(upper)] = [" + show(sum_lower) + ", " + show(sum_upper) +
        "] for the bounds to be feasible, got " + show(total));
}

void project_box_simplex(const PatternBlocks& blocks, const double* y, const double* inv_metric, const double* lo,
                         const double* hi, double total, double* out, double& tau) {
  auto measure = [&](double t) {
    // [0] sum of clamped values, [1] sum of free y_j, [2] sum of free 1/metric_j,
    // [3] sum of bounds of clamped entries.
    return blocks.sum<4>([&](index_t j, std::array<double, 4>& acc) {
      const double inv = inv_metric[j];
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
  double below = -kInf, above = kInf;  // sum >= total at `below`, <= total at `above`
  bool bracketed = false;
  double t = std::isfinite(tau) ? tau : 0.0;
  for (int it = 0; it < 200; ++it) {
    const auto m = measure(t);
    const double excess = m[0] - total;
    // Rounding in the sum of up to K terms: closer than this is the root.
    if (std::abs(excess) <= 1e-13 * total) break;
    if (excess > 0.0) below = t;
    else above = t;
    double next = m[2] > 0.0 ? (m[1] + m[3] - total) / m[2] : std::numeric_limits<double>::quiet_NaN();
    if (!(next > below && next < above)) {
      if (!bracketed) {
        const auto range = bracket(blocks.size(), y, inv_metric, lo, hi, total);
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
  blocks.for_each([&](index_t j0, index_t j1) {
    for (index_t j = j0; j < j1; ++j) out[j] = std::clamp(y[j] - t * inv_metric[j], lo[j], hi[j]);
  });
  // Where 1 / metric is large, one ulp of tau moves the sum by more than rounding;
  // spread what is left over the free entries in proportion to 1 / metric (the same
  // direction as a change of tau), so that sum out = total to rounding.
  for (int fix = 0; fix < 4; ++fix) {
    const auto m = blocks.sum<2>([&](index_t j, std::array<double, 2>& acc) {
      acc[0] += out[j];
      if (out[j] > lo[j] && out[j] < hi[j]) acc[1] += inv_metric[j];
    });
    const double excess = m[0] - total;
    if (std::abs(excess) <= 1e-14 * total || !(m[1] > 0.0)) break;
    const double shift = excess / m[1];
    blocks.for_each([&](index_t j0, index_t j1) {
      for (index_t j = j0; j < j1; ++j)
        if (out[j] > lo[j] && out[j] < hi[j]) out[j] = std::clamp(out[j] - shift * inv_metric[j], lo[j], hi[j]);
    });
    tau += shift;
  }
}

}  // namespace cobalance::detail
