#include "cobalance/balance_problem.hpp"

#include <algorithm>
#include <cmath>
#include <sstream>
#include <stdexcept>
#include <utility>

#include "cobalance/parallel.hpp"

namespace cobalance {

namespace {

constexpr index_t kMinBlock = 2048;         // patterns per block at least
constexpr index_t kWorkPerPart = 1 << 16;   // below this much work (nnz + K), a thread costs more than it saves
constexpr double kHundredSquared = 1.0e4;   // the `proportions` regularizer's (100 (p - p0))^2

std::string show(double v) {
  std::ostringstream s;
  s.precision(17);
  s << v;
  return s.str();
}

[[noreturn]] void bad(const std::string& message) { throw std::invalid_argument(message); }

// Runs fn(first_block, last_block) over contiguous block ranges on `parts` workers.
template <class Fn>
void over_blocks(index_t n_blocks, int parts, Fn&& fn) {
  const auto bounds = split_range(n_blocks, parts);
  run_parts(parts, [&](int t) { fn(bounds[static_cast<std::size_t>(t)], bounds[static_cast<std::size_t>(t) + 1]); });
}

// Sums per-block partial results in block order: out[i] = sum_b partial[b * width + i].
// Each entry's order of addition is fixed, so splitting i over threads cannot change it.
void combine_partials(const std::vector<double>& partial, index_t n_blocks, index_t width, double* out,
                      int n_threads) {
  const int parts = parts_for(n_blocks * width, n_threads, kWorkPerPart);
  const auto bounds = split_range(width, parts);
  run_parts(parts, [&](int t) {
    for (index_t i = bounds[static_cast<std::size_t>(t)]; i < bounds[static_cast<std::size_t>(t) + 1]; ++i) {
      double s = 0.0;
      for (index_t b = 0; b < n_blocks; ++b) s += partial[static_cast<std::size_t>(b * width + i)];
      out[i] = s;
    }
  });
}

double sum_in_order(const std::vector<double>& v) {
  double s = 0.0;
  for (double x : v) s += x;
  return s;
}

}  // namespace

Objective objective_from_name(const std::string& name) {
  if (name == "fraction") return Objective::fraction;
  if (name == "fraction_l2") return Objective::fraction_l2;
  if (name == "geo") return Objective::geo;
  bad("objective must be one of 'fraction', 'fraction_l2', 'geo', got '" + name + "'");
}

Regularizer regularizer_from_name(const std::string& name) {
  if (name == "none") return Regularizer::none;
  if (name == "counts") return Regularizer::counts;
  if (name == "proportions") return Regularizer::proportions;
  if (name == "ratio") return Regularizer::ratio;
  bad("regularizer must be one of 'none', 'counts', 'proportions', 'ratio', got '" + name + "'");
}

const char* objective_name(Objective objective) noexcept {
  switch (objective) {
    case Objective::fraction: return "fraction";
    case Objective::fraction_l2: return "fraction_l2";
    case Objective::geo: return "geo";
  }
  return "?";
}

const char* regularizer_name(Regularizer regularizer) noexcept {
  switch (regularizer) {
    case Regularizer::none: return "none";
    case Regularizer::counts: return "counts";
    case Regularizer::proportions: return "proportions";
    case Regularizer::ratio: return "ratio";
  }
  return "?";
}

BalanceProblem::BalanceProblem(std::vector<index_t> indptr, std::vector<index_t> indices, std::vector<double> counts,
                               index_t n_classes, std::vector<double> target, std::vector<double> class_weights)
    : n_classes_(n_classes),
      indptr_(std::move(indptr)),
      indices_(std::move(indices)),
      counts_(std::move(counts)),
      target_(std::move(target)),
      weights_(std::move(class_weights)) {
  if (n_classes_ < 1) bad("n_classes must be positive, got " + std::to_string(n_classes_));
  const index_t k = static_cast<index_t>(counts_.size());
  if (k < 1) bad("counts must hold at least one pattern, got 0");
  if (static_cast<index_t>(indptr_.size()) != k + 1)
    bad("indptr must have len(counts) + 1 = " + std::to_string(k + 1) + " entries, got " +
        std::to_string(indptr_.size()));
  if (indptr_[0] != 0) bad("indptr[0] must be 0, got " + std::to_string(indptr_[0]));
  for (index_t j = 0; j < k; ++j)
    if (indptr_[static_cast<std::size_t>(j + 1)] < indptr_[static_cast<std::size_t>(j)])
      bad("indptr must be non-decreasing, got indptr[" + std::to_string(j + 1) +
          "] = " + std::to_string(indptr_[static_cast<std::size_t>(j + 1)]) + " < indptr[" + std::to_string(j) +
          "] = " + std::to_string(indptr_[static_cast<std::size_t>(j)]));
  if (indptr_.back() != static_cast<index_t>(indices_.size()))
    bad("indptr[-1] must equal len(indices) = " + std::to_string(indices_.size()) + ", got " +
        std::to_string(indptr_.back()));
  for (std::size_t e = 0; e < indices_.size(); ++e)
    if (indices_[e] < 0 || indices_[e] >= n_classes_)
      bad("indices must lie in [0, n_classes = " + std::to_string(n_classes_) + "), got indices[" +
          std::to_string(e) + "] = " + std::to_string(indices_[e]));
  for (std::size_t j = 0; j < counts_.size(); ++j)
    if (!std::isfinite(counts_[j]) || !(counts_[j] > 0.0))
      bad("counts must be finite and > 0, got counts[" + std::to_string(j) + "] = " + show(counts_[j]));
  if (static_cast<index_t>(target_.size()) != n_classes_)
    bad("target must have n_classes = " + std::to_string(n_classes_) + " entries, got " +
        std::to_string(target_.size()));
  for (std::size_t i = 0; i < target_.size(); ++i)
    if (!std::isfinite(target_[i]) || target_[i] < 0.0 || target_[i] > 1.0)
      bad("target must be finite and in [0, 1], got target[" + std::to_string(i) + "] = " + show(target_[i]));
  if (weights_.empty()) weights_.assign(static_cast<std::size_t>(n_classes_), 1.0);
  if (static_cast<index_t>(weights_.size()) != n_classes_)
    bad("class_weights must have n_classes = " + std::to_string(n_classes_) + " entries, got " +
        std::to_string(weights_.size()));
  for (std::size_t i = 0; i < weights_.size(); ++i)
    if (!std::isfinite(weights_[i]) || weights_[i] < 0.0)
      bad("class_weights must be finite and >= 0, got class_weights[" + std::to_string(i) +
          "] = " + show(weights_[i]));

  // Few enough blocks that combining the C-wide partial sums costs at most about a
  // quarter of one pass over the data; the choice depends on the shape only.
  const index_t work = nnz() + k;
  const index_t max_blocks = (k + kMinBlock - 1) / kMinBlock;
  n_blocks_ = std::clamp<index_t>(work / (4 * n_classes_), 1, max_blocks);
  block_size_ = (k + n_blocks_ - 1) / n_blocks_;
  n_blocks_ = (k + block_size_ - 1) / block_size_;

  n_total_ = pattern_total(counts_.data(), 1);
  p0_.resize(counts_.size());
  for (std::size_t j = 0; j < counts_.size(); ++j) p0_[j] = counts_[j] / n_total_;
}

int BalanceProblem::parts(int n_threads) const noexcept {
  const int by_work = parts_for(nnz() + n_patterns(), n_threads, kWorkPerPart);
  return static_cast<int>(std::min<index_t>(by_work, n_blocks_));
}

void BalanceProblem::check_alpha(const double* alpha, index_t size, const char* name) const {
  if (size != n_patterns())
    bad(std::string(name) + " must have n_patterns = " + std::to_string(n_patterns()) + " entries, got " +
        std::to_string(size));
  for (index_t j = 0; j < size; ++j)
    if (!std::isfinite(alpha[j]) || alpha[j] < 0.0)
      bad(std::string(name) + " must be finite and >= 0, got " + name + "[" + std::to_string(j) +
          "] = " + show(alpha[j]));
  if (!(pattern_total(alpha, 0) > 0.0)) bad(std::string(name) + " must have a positive sum, got 0");
}

double BalanceProblem::pattern_total(const double* x, int n_threads) const {
  std::vector<double> partial(static_cast<std::size_t>(n_blocks_), 0.0);
  const index_t k = n_patterns();
  over_blocks(n_blocks_, parts(n_threads), [&](index_t b0, index_t b1) {
    for (index_t b = b0; b < b1; ++b) {
      double s = 0.0;
      const index_t end = std::min(k, (b + 1) * block_size_);
      for (index_t j = b * block_size_; j < end; ++j) s += x[j];
      partial[static_cast<std::size_t>(b)] = s;
    }
  });
  return sum_in_order(partial);
}

void BalanceProblem::class_sums(const double* x, double* out, int n_threads) const {
  const index_t c = n_classes_, k = n_patterns();
  const index_t* ptr = indptr_.data();
  const index_t* idx = indices_.data();
  if (n_blocks_ == 1) {
    std::fill(out, out + c, 0.0);
    for (index_t j = 0; j < k; ++j)
      for (index_t e = ptr[j]; e < ptr[j + 1]; ++e) out[idx[e]] += x[j];
    return;
  }
  std::vector<double> partial(static_cast<std::size_t>(n_blocks_ * c), 0.0);
  over_blocks(n_blocks_, parts(n_threads), [&](index_t b0, index_t b1) {
    for (index_t b = b0; b < b1; ++b) {
      double* acc = partial.data() + b * c;
      const index_t end = std::min(k, (b + 1) * block_size_);
      for (index_t j = b * block_size_; j < end; ++j)
        for (index_t e = ptr[j]; e < ptr[j + 1]; ++e) acc[idx[e]] += x[j];
    }
  });
  combine_partials(partial, n_blocks_, c, out, n_threads);
}

void BalanceProblem::pattern_sums(const double* y, double* out, int n_threads) const {
  const index_t k = n_patterns();
  const index_t* ptr = indptr_.data();
  const index_t* idx = indices_.data();
  // No reduction across patterns: every out_j is computed alone, in a fixed order.
  over_blocks(n_blocks_, parts(n_threads), [&](index_t b0, index_t b1) {
    const index_t end = std::min(k, b1 * block_size_);
    for (index_t j = b0 * block_size_; j < end; ++j) {
      double s = 0.0;
      for (index_t e = ptr[j]; e < ptr[j + 1]; ++e) s += y[idx[e]];
      out[j] = s;
    }
  });
}

void BalanceProblem::marginals(const double* alpha, double* out, int n_threads) const {
  check_alpha(alpha, n_patterns());
  const double total = pattern_total(alpha, n_threads);
  class_sums(alpha, out, n_threads);
  for (index_t i = 0; i < n_classes_; ++i) out[i] /= total;
}

double BalanceProblem::loss(const double* alpha, Objective objective, Regularizer regularizer, double gamma,
                            int n_threads) const {
  check_alpha(alpha, n_patterns());
  if (!std::isfinite(gamma) || gamma < 0.0) bad("gamma must be finite and >= 0, got " + show(gamma));
  return evaluate(alpha, objective, regularizer, gamma, nullptr, n_threads);
}

double BalanceProblem::loss_and_gradient(const double* alpha, Objective objective, Regularizer regularizer,
                                         double gamma, double* grad, int n_threads) const {
  check_alpha(alpha, n_patterns());
  if (!std::isfinite(gamma) || gamma < 0.0) bad("gamma must be finite and >= 0, got " + show(gamma));
  return evaluate(alpha, objective, regularizer, gamma, grad, n_threads);
}

double BalanceProblem::evaluate(const double* alpha, Objective objective, Regularizer regularizer, double gamma,
                                double* grad, int n_threads) const {
  const index_t c = n_classes_, k = n_patterns();
  const double total = pattern_total(alpha, n_threads);
  if (!(total > 0.0)) bad("alpha must have a positive sum, got " + show(total));

  // Objective: the loss and, for the gradient, the per-class coefficients z and the
  // constant z0 such that d objective / d alpha_j = sum_{i in j} z_i + z0.
  std::vector<double> g(static_cast<std::size_t>(c));
  class_sums(alpha, g.data(), n_threads);
  std::vector<double> z(static_cast<std::size_t>(c));
  double z0 = 0.0;
  double objective_value = 0.0;
  if (objective == Objective::geo) {
    double gg = 0.0, dd = 0.0;
    for (index_t i = 0; i < c; ++i) {
      gg += g[i] * g[i];
      dd += target_[i] * target_[i];
    }
    if (!(dd > 0.0)) bad("target must not be all zero for objective 'geo' (d / ||d|| is undefined)");
    if (!(gg > 0.0)) bad("the 'geo' objective is undefined where U^T alpha = 0 (alpha only on empty patterns)");
    const double gnorm = std::sqrt(gg), dnorm = std::sqrt(dd);
    double hr = 0.0;
    for (index_t i = 0; i < c; ++i) {
      const double h = g[i] / gnorm, diff = h - target_[i] / dnorm;
      objective_value += weights_[i] * diff * diff;
      z[i] = 2.0 * weights_[i] * diff;  // d loss / d h_i
      hr += h * z[i];
    }
    // d h / d g = (I - h h^T) / ||g||.
    for (index_t i = 0; i < c; ++i) z[i] = (z[i] - g[i] / gnorm * hr) / gnorm;
  } else {
    double rf = 0.0;
    for (index_t i = 0; i < c; ++i) {
      const double f = g[i] / total, diff = f - target_[i];
      objective_value += weights_[i] * diff * diff;
      z[i] = 2.0 * weights_[i] * diff;  // d F / d f_i
      rf += z[i] * f;
    }
    // d f_i / d alpha_j = (u_ji - f_i) / S.
    for (index_t i = 0; i < c; ++i) z[i] /= total;
    z0 = -rf / total;
    if (objective == Objective::fraction_l2) {
      const double root = std::sqrt(objective_value);
      // sqrt is not differentiable at 0; 0 is a subgradient there (the minimum).
      const double scale = root > 0.0 ? 0.5 / root : 0.0;
      for (index_t i = 0; i < c; ++i) z[i] *= scale;
      z0 *= scale;
      objective_value = root;
    }
  }

  // Regularizer: its value and, for proportions / ratio, sum_k q_k p_k where
  // q = d R / d p, since d R / d alpha_j = (q_j - sum_k q_k p_k) / S.
  const bool regularized = regularizer != Regularizer::none && gamma != 0.0;
  double reg_value = 0.0, qp = 0.0;
  const double* n = counts_.data();
  const double* p0 = p0_.data();
  const int parts_used = parts(n_threads);
  if (regularized) {
    std::vector<double> value_part(static_cast<std::size_t>(n_blocks_), 0.0);
    std::vector<double> qp_part(static_cast<std::size_t>(n_blocks_), 0.0);
    over_blocks(n_blocks_, parts_used, [&](index_t b0, index_t b1) {
      for (index_t b = b0; b < b1; ++b) {
        double v = 0.0, s = 0.0;
        const index_t end = std::min(k, (b + 1) * block_size_);
        for (index_t j = b * block_size_; j < end; ++j) {
          if (regularizer == Regularizer::counts) {
            const double t = alpha[j] / n[j] - 1.0;
            v += t * t;
          } else if (regularizer == Regularizer::proportions) {
            const double p = alpha[j] / total, t = p - p0[j];
            v += kHundredSquared * t * t;
            s += 2.0 * kHundredSquared * t * p;
          } else {
            const double p = alpha[j] / total, t = p / p0[j] - 1.0;
            v += t * t;
            s += 2.0 * t / p0[j] * p;
          }
        }
        value_part[static_cast<std::size_t>(b)] = v;
        qp_part[static_cast<std::size_t>(b)] = s;
      }
    });
    reg_value = sum_in_order(value_part);
    qp = sum_in_order(qp_part);
  }

  if (grad != nullptr) {
    const index_t* ptr = indptr_.data();
    const index_t* idx = indices_.data();
    const double* zc = z.data();
    // Every gradient entry is computed alone: no cross-thread reduction.
    over_blocks(n_blocks_, parts_used, [&](index_t b0, index_t b1) {
      const index_t end = std::min(k, b1 * block_size_);
      for (index_t j = b0 * block_size_; j < end; ++j) {
        double s = 0.0;
        for (index_t e = ptr[j]; e < ptr[j + 1]; ++e) s += zc[idx[e]];
        double gj = s + z0;
        if (regularized) {
          double r;
          if (regularizer == Regularizer::counts) {
            r = 2.0 * (alpha[j] / n[j] - 1.0) / n[j];
          } else if (regularizer == Regularizer::proportions) {
            const double p = alpha[j] / total;
            r = (2.0 * kHundredSquared * (p - p0[j]) - qp) / total;
          } else {
            const double p = alpha[j] / total;
            r = (2.0 * (p / p0[j] - 1.0) / p0[j] - qp) / total;
          }
          gj += gamma * r;
        }
        grad[j] = gj;
      }
    });
  }
  return objective_value + (regularized ? gamma * reg_value : 0.0);
}

}  // namespace cobalance
