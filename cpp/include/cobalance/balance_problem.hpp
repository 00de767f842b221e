// The balancing problem: patterns, their counts, a target and the losses to minimise.
//
// Patterns u_j (K of them, over C classes) are stored sparsely in CSR form: the
// classes present in pattern j are indices[indptr[j] .. indptr[j+1]). n_j > 0 is the
// number of samples of pattern j, N = sum n_j, p0 = n / N. For real repeat counts
// alpha >= 0 with S = sum alpha > 0:
//
//   f(alpha) = U^T alpha / S                      achieved class fractions
//   p(alpha) = alpha / S                          pattern proportions
//
// Objectives (w >= 0 are class weights, d in [0, 1]^C the target):
//   fraction      F = sum_i w_i (f_i - d_i)^2
//   fraction_l2   sqrt(F); its gradient is taken as 0 where F == 0 (a subgradient)
//   geo           sum_i w_i (h_i - e_i)^2 with h = U^T alpha / ||U^T alpha||,
//                 e = d / ||d||: the weights multiply the squared terms
//   imbalance     log( sum_i w_i M / r_i / sum_i w_i ), over the active classes A
//                 (w_i > 0, d_i > 0 and present in some pattern), with r_i = f_i / d_i
//                 each class's presence relative to its target and
//                 M = (sum_{i in A} r_i^P)^(1/P), P = 16, a smooth maximum of r. With
//                 equal targets this is the log of the mean imbalance ratio (MeanIR) of
//                 Charte et al. (2015), max_k g_k / g_i averaged over the labels, with
//                 the max smoothed; with other targets, that of the presence relative
//                 to the target. Only the shape of d matters (a common factor cancels),
//                 and a class at half its target costs as much as one at twice it. It
//                 is undefined (std::invalid_argument from evaluate) where an active
//                 class has presence 0, so a solver keeps every such class present.
// Regularizers (multiplied by gamma >= 0):
//   counts        sum_j (alpha_j / n_j - 1)^2
//   proportions   sum_j (100 (p_j - p0_j))^2
//   ratio         sum_j (p_j / p0_j - 1)^2
//   ess           log(N Q / S^2), Q = sum_j (n_j q_j^2 + (alpha_j - q_j n_j)(2 q_j + 1)),
//                 q_j = floor(alpha_j / n_j): N over the Kish effective sample size
//                 (sum c)^2 / sum c^2 of the per-sample copies c that the plan gives
//                 (pattern j's alpha_j copies spread evenly over its n_j samples, each
//                 q_j or q_j + 1 copies). Q is piecewise linear and convex in alpha
//                 (the integer points of n_j (alpha_j / n_j)^2 joined by chords), so
//                 a copy's cost is what it costs once rounded: 2 q_j + 1. Its gradient
//                 at a kink is the right derivative. Scale-free: with the `imbalance`
//                 objective, gamma is the relative loss of effective sample size worth
//                 a relative gain in the imbalance measure.
//   none          0
//
// `geo` needs d != 0 and U^T alpha != 0; `imbalance` at least one active class and
// each active class present; every loss needs sum alpha > 0.
//
// Every evaluation costs O(nnz + K + C). Determinism: sums over patterns are taken
// over fixed blocks of patterns (the block size depends only on the problem's shape),
// each block summed sequentially and the block results combined in block order;
// U^T alpha is a gather over each class's pattern list in fixed chunks whose sums are
// combined in order; U z (for the gradient) gives every pattern its classes' terms in
// increasing class order. None of these orders depends on the thread count, so values
// and gradients are bitwise identical for any number of threads.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace cobalance {

using index_t = std::int64_t;

enum class Objective { fraction, fraction_l2, geo, imbalance };
enum class Regularizer { none, counts, proportions, ratio, ess };

// Parses a name ("fraction", "fraction_l2", "geo", "imbalance"); throws std::invalid_argument
// listing the valid names otherwise.
Objective objective_from_name(const std::string& name);
// Parses a name ("none", "counts", "proportions", "ratio", "ess"); throws likewise.
Regularizer regularizer_from_name(const std::string& name);
const char* objective_name(Objective objective) noexcept;
const char* regularizer_name(Regularizer regularizer) noexcept;

class BalanceProblem {
 public:
  // Copies and validates the problem data: indptr has K + 1 entries, starts at 0 and
  // is non-decreasing, ends at indices.size(); every index in [0, n_classes) and no
  // class twice in one pattern; counts
  // finite and > 0; target finite and in [0, 1]; class_weights (empty means all 1)
  // finite and >= 0; fewer than 2^32 patterns and classes. Throws std::invalid_argument naming the
  // argument and the value.
  BalanceProblem(std::vector<index_t> indptr, std::vector<index_t> indices, std::vector<double> counts,
                 index_t n_classes, std::vector<double> target, std::vector<double> class_weights = {});

  index_t n_patterns() const noexcept { return static_cast<index_t>(counts_.size()); }
  index_t n_classes() const noexcept { return n_classes_; }
  index_t nnz() const noexcept { return static_cast<index_t>(indices_.size()); }
  double n_samples() const noexcept { return n_total_; }

  const std::vector<index_t>& indptr() const noexcept { return indptr_; }
  const std::vector<index_t>& indices() const noexcept { return indices_; }
  const std::vector<double>& counts() const noexcept { return counts_; }
  const std::vector<double>& target() const noexcept { return target_; }
  const std::vector<double>& class_weights() const noexcept { return weights_; }
  // p0 = counts / sum(counts).
  const std::vector<double>& base_proportions() const noexcept { return p0_; }

  // Checks alpha (length K, finite, >= 0, positive sum); throws std::invalid_argument
  // naming `name` otherwise.
  void check_alpha(const double* alpha, index_t size, const char* name = "alpha") const;

  // f(alpha), written to out[0 .. C). alpha is checked.
  void marginals(const double* alpha, double* out, int n_threads = 0) const;
  // The loss objective(alpha) + gamma * regularizer(alpha). alpha is checked.
  double loss(const double* alpha, Objective objective, Regularizer regularizer, double gamma,
              int n_threads = 0) const;
  // The loss and its gradient with respect to alpha (written to grad[0 .. K)).
  // alpha is checked.
  double loss_and_gradient(const double* alpha, Objective objective, Regularizer regularizer, double gamma,
                           double* grad, int n_threads = 0) const;

  // The same without checking alpha, for solver loops whose iterates are known to be
  // valid; `grad` may be null for the loss alone. Throws std::invalid_argument only
  // when the loss is undefined at alpha (sum alpha == 0, or U^T alpha == 0 for geo).
  double evaluate(const double* alpha, Objective objective, Regularizer regularizer, double gamma,
                  double* grad, int n_threads) const;

  // Building blocks, exposed for the exact solver: out = U^T x (length C) and
  // out = U y (length K, out_j = sum of y over the classes of pattern j).
  void class_sums(const double* x, double* out, int n_threads) const;
  void pattern_sums(const double* y, double* out, int n_threads) const;
  // sum_j x_j, taken blockwise like every other sum over patterns.
  double pattern_total(const double* x, int n_threads) const;

  // Number of patterns per block of the fixed-order reductions, and the number of blocks.
  index_t block_size() const noexcept { return block_size_; }
  index_t n_blocks() const noexcept { return n_blocks_; }
  // Worker count used for a pass over patterns (at most n_blocks). Inside a TeamScope
  // a region costs far less to start, so smaller passes are split too (at most the
  // team's size).
  int parts(int n_threads) const noexcept;
  // The team size worth keeping for a loop of passes (a solver's iterations): parts()
  // as it would be inside a TeamScope.
  int loop_parts(int n_threads) const noexcept;

 private:
  // The `imbalance` objective's value at class sums g, and its gradient with respect to
  // g into z (C entries; 0 for inactive classes).
  double imbalance_terms(const double* g, double* z) const;
  bool imbalance_active(index_t i) const noexcept {
    return weights_[static_cast<std::size_t>(i)] > 0.0 && target_[static_cast<std::size_t>(i)] > 0.0 &&
           class_ptr_[static_cast<std::size_t>(i) + 1] > class_ptr_[static_cast<std::size_t>(i)];
  }

  index_t n_classes_;
  std::vector<index_t> indptr_;
  std::vector<index_t> indices_;
  std::vector<double> counts_;
  std::vector<double> target_;
  std::vector<double> weights_;
  std::vector<double> p0_;
  std::vector<double> inv_n_, inv_p0_;  // 1 / n and 1 / p0
  double n_total_ = 0.0;
  index_t block_size_ = 1;
  index_t n_blocks_ = 1;
  // The patterns by class (CSC): the patterns holding class i are
  // class_patterns_[class_ptr_[i] .. class_ptr_[i+1]), in increasing order. U^T x is
  // a gather over these, cut into fixed chunks (chunk_ptr_: class i owns chunks
  // [chunk_ptr_[i], chunk_ptr_[i+1])) whose sums are combined in order.
  std::vector<index_t> class_ptr_;
  std::vector<std::uint32_t> class_patterns_;  // 32-bit: half the memory traffic of the hot loops
  std::vector<index_t> chunk_ptr_;
  std::vector<index_t> chunk_class_, chunk_begin_, chunk_end_;  // per chunk
  // With many patterns (over 2^17) and few classes (4 C per block small next to the
  // data), both products run over the entries in row order instead, without a loop per
  // row (whose varying lengths stall the branch predictor): U^T x adds x[row] into one
  // of four per-block copies of the class vector (copy row % 4, so that a class present
  // in most rows does not chain every add on the one before), U y adds into out[row].
  // The choice depends on the shape only.
  bool by_rows_ = false;
  std::vector<std::uint32_t> entry_row_;   // pattern of each entry
  std::vector<std::uint32_t> entry_slot_;  // (row % 4) * C + class of each entry
};

}  // namespace cobalance
