// The projection onto the box-constrained simplex {lo <= q <= hi, sum q = total},
// shared by the exact solver (in proportions: total 1, a diagonal metric) and Adam with
// a fixed total (in repeat counts, the Euclidean metric). Internal to the core's
// sources; not installed.
#pragma once

#include <algorithm>
#include <array>
#include <vector>

#include "cobalance/balance_problem.hpp"
#include "cobalance/parallel.hpp"

namespace cobalance::detail {

// Loops and sums over a problem's fixed blocks of patterns. A sum is taken block by
// block and the block results are added in block order, so it does not depend on the
// number of threads.
class PatternBlocks {
 public:
  PatternBlocks(const BalanceProblem& problem, int n_threads)
      : k_(problem.n_patterns()),
        block_size_(problem.block_size()),
        n_blocks_(problem.n_blocks()),
        parts_(problem.parts(n_threads)) {}

  index_t size() const noexcept { return k_; }

  // Runs fn(j0, j1) over contiguous ranges of whole blocks, one range per worker.
  template <class Fn>
  void for_each(Fn&& fn) const {
    const auto bounds = split_range(n_blocks_, parts_);
    run_parts(parts_, [&](int t) {
      const index_t j0 = bounds[static_cast<std::size_t>(t)] * block_size_;
      const index_t j1 = std::min(k_, bounds[static_cast<std::size_t>(t) + 1] * block_size_);
      fn(j0, j1);
    });
  }

  // Sums `width` per-pattern quantities: fn(j, acc) adds pattern j's terms into acc[0..width).
  template <int width, class Fn>
  std::array<double, width> sum(Fn&& fn) const {
    std::vector<std::array<double, width>> partial(static_cast<std::size_t>(n_blocks_));
    const auto bounds = split_range(n_blocks_, parts_);
    run_parts(parts_, [&](int t) {
      for (index_t b = bounds[static_cast<std::size_t>(t)]; b < bounds[static_cast<std::size_t>(t) + 1]; ++b) {
        std::array<double, width> acc{};
        const index_t end = std::min(k_, (b + 1) * block_size_);
        for (index_t j = b * block_size_; j < end; ++j) fn(j, acc);
        partial[static_cast<std::size_t>(b)] = acc;
      }
    });
    std::array<double, width> total{};
    for (const auto& a : partial)
      for (int w = 0; w < width; ++w) total[static_cast<std::size_t>(w)] += a[static_cast<std::size_t>(w)];
    return total;
  }

 private:
  index_t k_, block_size_, n_blocks_;
  int parts_;
};

// Checks that {lower <= alpha <= upper, sum alpha = total} is not empty: total finite
// and > 0, sum(lower) <= total <= sum(upper) to a relative 1e-12 (rounding in the sums).
// lower and upper must have passed check_bounds. Throws std::invalid_argument naming
// `total` and the range otherwise.
void check_total(const std::vector<double>& lower, const std::vector<double>& upper, double total);

// out = argmin sum_j metric_j (q_j - y_j)^2  s.t.  sum q = total, lo <= q <= hi, i.e.
// out_j = clamp(y_j - tau / metric_j, lo_j, hi_j) with sum out = total (inv_metric =
// 1 / metric, > 0). The sum is a non-increasing piecewise-linear function of tau;
// safeguarded Newton steps on it are exact linear solves on the current piece, so the
// loop ends on the piece that holds the root. `tau` is a warm start in (NaN or inf: 0),
// the multiplier out. The set must not be empty (check_total); all arrays have
// blocks.size() entries; out must not alias y. Deterministic and independent of the
// thread count (every sum goes through `blocks`).
void project_box_simplex(const PatternBlocks& blocks, const double* y, const double* inv_metric, const double* lo,
                         const double* hi, double total, double* out, double& tau);

}  // namespace cobalance::detail
