#include "cobalance/balance_problem.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>

#include "cobalance/parallel.hpp"
#include "invalid_argument.hpp"

namespace cobalance {

namespace {

constexpr index_t kMinBlock = 2048;         // patterns per block at least
constexpr index_t kWorkPerPart = 1 << 16;   // below this much work (nnz + K), a thread costs more than it saves
constexpr index_t kWorkPerTeamPart = 1 << 14;  // the same for a worker of a Team (no thread start)
constexpr double kHundredSquared = 1.0e4;   // the `proportions` regularizer's (100 (p - p0))^2
constexpr index_t kChunk = 4096;            // entries per chunk of a class's gather
// Both products go in row order only above this many patterns (1 MiB of doubles):
// below, the by-class loops' accesses stay in cache and measured faster (K = 1e4,
// C = 9 and 300: 1.1-1.2x per Adam iteration); above, row order keeps the accesses
// sequential (K = 1e6: 1.2-1.7x faster).
constexpr index_t kRowOrderPatterns = index_t{1} << 17;
// Exponent of the `imbalance` objective's smooth maximum. (sum r^P)^(1/P) exceeds
// max r by at most C^(1/P) (1.5x at C = 1000), a factor that barely moves the
// minimiser, while a larger P makes the loss nearly as kinked as the max itself.
constexpr double kSoftMaxPower = 16.0;

using detail::bad;
using detail::show;

// Runs fn(first_block, last_block) over contiguous block ranges on `parts` workers.
template <class Fn>
void over_blocks(index_t n_blocks, int parts, Fn&& fn) {
  const auto bounds = split_range(n_blocks, parts);
  run_parts(parts, [&](int t) { fn(bounds[static_cast<std::size_t>(t)], bounds[static_cast<std::size_t>(t) + 1]); });
}

// Per-pattern terms of each regularizer: value() adds R_j to v and q_j p_j to q;
// gradient() is d R / d alpha_j given sum_k q_k p_k. `none` has no terms.
template <Regularizer R>
struct RegTerms {
  const double* n;
  const double* inv_n;
  const double* p0;
  const double* inv_p0;
  double inv_total;

  void value([[maybe_unused]] double a, [[maybe_unused]] index_t j, [[maybe_unused]] double& v,
             [[maybe_unused]] double& q) const {
    if constexpr (R == Regularizer::counts) {
      const double t = a * inv_n[j] - 1.0;
      v += t * t;
    } else if constexpr (R == Regularizer::proportions) {
      const double p = a * inv_total, t = p - p0[j];
      v += kHundredSquared * t * t;
      q += 2.0 * kHundredSquared * t * p;
    } else if constexpr (R == Regularizer::ratio) {
      const double p = a * inv_total, t = p * inv_p0[j] - 1.0;
      v += t * t;
      q += 2.0 * t * inv_p0[j] * p;
    } else if constexpr (R == Regularizer::ess) {
      // sum of c^2 over the pattern's samples once alpha_j copies are spread evenly
      const double copies = ess_floor(a / n[j]);
      v += n[j] * copies * copies + (a - copies * n[j]) * (2.0 * copies + 1.0);
    }
  }

  // floor(x), with x a hair below an integer (from a / n rounding) counted as on it
  static double ess_floor(double x) { return std::floor(x * (1.0 + 1e-12) + 1e-12); }

  double gradient([[maybe_unused]] double a, [[maybe_unused]] index_t j, [[maybe_unused]] double qp) const {
    if constexpr (R == Regularizer::counts) {
      return 2.0 * (a * inv_n[j] - 1.0) * inv_n[j];
    } else if constexpr (R == Regularizer::proportions) {
      return (2.0 * kHundredSquared * (a * inv_total - p0[j]) - qp) * inv_total;
    } else if constexpr (R == Regularizer::ratio) {
      return (2.0 * (a * inv_total * inv_p0[j] - 1.0) * inv_p0[j] - qp) * inv_total;
    } else if constexpr (R == Regularizer::ess) {
      // qp carries Q here: d log(N Q / S^2) / d alpha_j = (2 q_j + 1) / Q - 2 / S
      return (2.0 * ess_floor(a / n[j]) + 1.0) / qp - 2.0 * inv_total;
    } else {
      return 0.0;
    }
  }
};

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
  if (name == "imbalance") return Objective::imbalance;
  bad("objective must be one of 'fraction', 'fraction_l2', 'geo', 'imbalance', got '" + name + "'");
}

Regularizer regularizer_from_name(const std::string& name) {
  if (name == "none") return Regularizer::none;
  if (name == "counts") return Regularizer::counts;
  if (name == "proportions") return Regularizer::proportions;
  if (name == "ratio") return Regularizer::ratio;
  if (name == "ess") return Regularizer::ess;
  bad("regularizer must be one of 'none', 'counts', 'proportions', 'ratio', 'ess', got '" + name + "'");
}

const char* objective_name(Objective objective) noexcept {
  switch (objective) {
    case Objective::fraction: return "fraction";
    case Objective::fraction_l2: return "fraction_l2";
    case Objective::geo: return "geo";
    case Objective::imbalance: return "imbalance";
  }
  return "?";
}

const char* regularizer_name(Regularizer regularizer) noexcept {
  switch (regularizer) {
    case Regularizer::none: return "none";
    case Regularizer::counts: return "counts";
    case Regularizer::proportions: return "proportions";
    case Regularizer::ratio: return "ratio";
    case Regularizer::ess: return "ess";
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
  if (k > static_cast<index_t>(UINT32_MAX))
    bad("counts must hold fewer than 2^32 patterns, got " + std::to_string(k));
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
  {
    // A class listed twice in one pattern would be counted twice (fractions above 1).
    std::vector<index_t> seen_in(static_cast<std::size_t>(n_classes_), -1);
    for (index_t j = 0; j < k; ++j)
      for (index_t e = indptr_[static_cast<std::size_t>(j)]; e < indptr_[static_cast<std::size_t>(j + 1)]; ++e) {
        index_t& mark = seen_in[static_cast<std::size_t>(indices_[static_cast<std::size_t>(e)])];
        if (mark == j)
          bad("indices must not repeat a class within a pattern, got class " +
              std::to_string(indices_[static_cast<std::size_t>(e)]) + " twice in pattern " + std::to_string(j));
        mark = j;
      }
  }
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

  // Transpose by counting sort; scanning patterns in order keeps each class's list sorted.
  class_ptr_.assign(static_cast<std::size_t>(n_classes_) + 1, 0);
  for (index_t e : indices_) ++class_ptr_[static_cast<std::size_t>(e) + 1];
  for (index_t i = 0; i < n_classes_; ++i) class_ptr_[i + 1] += class_ptr_[i];
  class_patterns_.resize(indices_.size());
  {
    std::vector<index_t> next(class_ptr_.begin(), class_ptr_.end() - 1);
    for (index_t j = 0; j < k; ++j)
      for (index_t e = indptr_[j]; e < indptr_[j + 1]; ++e)
        class_patterns_[static_cast<std::size_t>(next[indices_[e]]++)] = static_cast<std::uint32_t>(j);
  }
  chunk_ptr_.assign(static_cast<std::size_t>(n_classes_) + 1, 0);
  for (index_t i = 0; i < n_classes_; ++i)
    chunk_ptr_[i + 1] = chunk_ptr_[i] + std::max<index_t>(1, (class_ptr_[i + 1] - class_ptr_[i] + kChunk - 1) / kChunk);
  for (index_t i = 0; i < n_classes_; ++i)
    for (index_t q = chunk_ptr_[i]; q < chunk_ptr_[i + 1]; ++q) {
      const index_t begin = class_ptr_[i] + (q - chunk_ptr_[i]) * kChunk;
      chunk_class_.push_back(i);
      chunk_begin_.push_back(begin);
      chunk_end_.push_back(std::min(class_ptr_[i + 1], begin + kChunk));
    }

  if (n_classes_ > static_cast<index_t>(UINT32_MAX))
    bad("n_classes must be below 2^32, got " + std::to_string(n_classes_));
  by_rows_ = 4 * n_classes_ * n_blocks_ * 2 <= nnz() && k > kRowOrderPatterns;
  if (by_rows_) {
    entry_row_.resize(indices_.size());
    entry_slot_.resize(indices_.size());
    for (index_t j = 0; j < k; ++j)
      for (index_t e = indptr_[j]; e < indptr_[j + 1]; ++e) {
        entry_row_[static_cast<std::size_t>(e)] = static_cast<std::uint32_t>(j);
        entry_slot_[static_cast<std::size_t>(e)] = static_cast<std::uint32_t>((j & 3) * n_classes_ + indices_[e]);
      }
  }

  n_total_ = pattern_total(counts_.data(), 1);
  p0_.resize(counts_.size());
  for (std::size_t j = 0; j < counts_.size(); ++j) p0_[j] = counts_[j] / n_total_;
  inv_n_.resize(counts_.size());
  inv_p0_.resize(counts_.size());
  for (std::size_t j = 0; j < counts_.size(); ++j) {
    inv_n_[j] = 1.0 / counts_[j];
    inv_p0_[j] = n_total_ / counts_[j];
  }
}

namespace {

int parts_by_work(index_t work, index_t n_blocks, int n_threads, index_t per_part) noexcept {
  // Asked once: the query is a system call, too slow for every pass of a solver loop.
  static const int hardware = resolve_threads(0);
  const index_t threads = n_threads > 0 ? n_threads : hardware;
  const index_t by_work = std::max<index_t>(1, work / per_part);
  return static_cast<int>(std::min({threads, by_work, n_blocks}));
}

}  // namespace

int BalanceProblem::parts(int n_threads) const noexcept {
  if (const Team* team = current_team())
    return std::min(team->size(), parts_by_work(nnz() + n_patterns(), n_blocks_, n_threads, kWorkPerTeamPart));
  return parts_by_work(nnz() + n_patterns(), n_blocks_, n_threads, kWorkPerPart);
}

int BalanceProblem::loop_parts(int n_threads) const noexcept {
  return parts_by_work(nnz() + n_patterns(), n_blocks_, n_threads, kWorkPerTeamPart);
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
      // Four interleaved accumulators in a fixed order: the adds need not wait on each other.
      double a0 = 0.0, a1 = 0.0, a2 = 0.0, a3 = 0.0;
      const index_t end = std::min(k, (b + 1) * block_size_);
      index_t j = b * block_size_;
      for (; j + 4 <= end; j += 4) {
        a0 += x[j];
        a1 += x[j + 1];
        a2 += x[j + 2];
        a3 += x[j + 3];
      }
      for (; j < end; ++j) a0 += x[j];
      partial[static_cast<std::size_t>(b)] = (a0 + a1) + (a2 + a3);
    }
  });
  return sum_in_order(partial);
}

void BalanceProblem::class_sums(const double* x, double* out, int n_threads) const {
  const index_t c = n_classes_;
  if (by_rows_) {
    const index_t k = n_patterns();
    const index_t* ptr = indptr_.data();
    const std::uint32_t* row = entry_row_.data();
    const std::uint32_t* slot = entry_slot_.data();
    std::vector<double> partial(static_cast<std::size_t>(n_blocks_ * c));
    over_blocks(n_blocks_, parts(n_threads), [&](index_t b0, index_t b1) {
      std::vector<double> acc(static_cast<std::size_t>(4 * c));
      for (index_t b = b0; b < b1; ++b) {
        std::fill(acc.begin(), acc.end(), 0.0);
        const index_t e1 = ptr[std::min(k, (b + 1) * block_size_)];
        for (index_t e = ptr[b * block_size_]; e < e1; ++e) acc[slot[e]] += x[row[e]];
        double* dst = partial.data() + b * c;
        for (index_t i = 0; i < c; ++i) dst[i] = (acc[i] + acc[c + i]) + (acc[2 * c + i] + acc[3 * c + i]);
      }
    });
    for (index_t i = 0; i < c; ++i) {
      double s = 0.0;
      for (index_t b = 0; b < n_blocks_; ++b) s += partial[static_cast<std::size_t>(b * c + i)];
      out[i] = s;
    }
    return;
  }
  const index_t n_chunks = chunk_ptr_.back();
  const std::uint32_t* rows = class_patterns_.data();
  // Gather per chunk of a class's pattern list. A chunk's sum uses four interleaved
  // accumulators (a fixed order) so that the adds do not wait on each other; the chunks
  // of a class are then added in order, so the result is independent of the threads.
  std::vector<double> partial(static_cast<std::size_t>(n_chunks));
  auto sum_chunk = [&](index_t q) {
    const index_t begin = chunk_begin_[q], end = chunk_end_[q];
    double a0 = 0.0, a1 = 0.0, a2 = 0.0, a3 = 0.0;
    index_t e = begin;
    for (; e + 4 <= end; e += 4) {
      a0 += x[rows[e]];
      a1 += x[rows[e + 1]];
      a2 += x[rows[e + 2]];
      a3 += x[rows[e + 3]];
    }
    for (; e < end; ++e) a0 += x[rows[e]];
    return (a0 + a1) + (a2 + a3);
  };
  const int parts_used = std::min<int>(parts(n_threads), static_cast<int>(std::min<index_t>(n_chunks, 1 << 20)));
  // Split the chunks into contiguous ranges of about equal entry counts.
  std::vector<index_t> bounds(static_cast<std::size_t>(parts_used) + 1, n_chunks);
  bounds[0] = 0;
  if (parts_used > 1) {
    const index_t per_part = (nnz() + parts_used - 1) / parts_used;
    index_t seen = 0;
    int part = 1;
    for (index_t q = 0; q < n_chunks && part < parts_used; ++q) {
      seen += chunk_end_[q] - chunk_begin_[q];
      if (seen >= per_part * part) bounds[static_cast<std::size_t>(part++)] = q + 1;
    }
    for (; part < parts_used; ++part) bounds[static_cast<std::size_t>(part)] = n_chunks;
  }
  run_parts(parts_used, [&](int t) {
    for (index_t q = bounds[static_cast<std::size_t>(t)]; q < bounds[static_cast<std::size_t>(t) + 1]; ++q)
      partial[static_cast<std::size_t>(q)] = sum_chunk(q);
  });
  for (index_t i = 0; i < c; ++i) {
    double s = 0.0;
    for (index_t q = chunk_ptr_[i]; q < chunk_ptr_[i + 1]; ++q) s += partial[static_cast<std::size_t>(q)];
    out[i] = s;
  }
}

void BalanceProblem::pattern_sums(const double* y, double* out, int n_threads) const {
  const index_t c = n_classes_, k = n_patterns();
  if (by_rows_) {
    // out_j gets its entries in stored order, whichever thread owns pattern j.
    const index_t* ptr = indptr_.data();
    const std::uint32_t* row = entry_row_.data();
    const std::uint32_t* slot = entry_slot_.data();
    std::vector<double> y4(static_cast<std::size_t>(4 * c));  // y in each of the four slots
    for (index_t q = 0; q < 4; ++q) std::copy(y, y + c, y4.begin() + q * c);
    over_blocks(n_blocks_, parts(n_threads), [&](index_t b0, index_t b1) {
      const index_t j0 = b0 * block_size_, j1 = std::min(k, b1 * block_size_);
      std::fill(out + j0, out + j1, 0.0);
      for (index_t e = ptr[j0]; e < ptr[j1]; ++e) out[row[e]] += y4[slot[e]];
    });
    return;
  }
  const std::uint32_t* rows = class_patterns_.data();
  // A scatter over the by-class lists: out_j receives the y_i of its classes in
  // increasing class order, whichever thread owns pattern j, so the result does not
  // depend on the split. (A gather over the rows stalls on their varying lengths.)
  const int parts_used = parts(n_threads);
  const auto bounds = split_range(k, parts_used);
  run_parts(parts_used, [&](int t) {
    const index_t j0 = bounds[static_cast<std::size_t>(t)], j1 = bounds[static_cast<std::size_t>(t) + 1];
    std::fill(out + j0, out + j1, 0.0);
    for (index_t i = 0; i < c; ++i) {
      const std::uint32_t* first = rows + class_ptr_[i];
      const std::uint32_t* last = rows + class_ptr_[i + 1];
      if (parts_used > 1) {
        first = std::lower_bound(first, last, static_cast<std::uint32_t>(j0));
        last = std::lower_bound(first, last, static_cast<std::uint32_t>(j1));
      }
      const double yi = y[i];
      for (const std::uint32_t* e = first; e < last; ++e) out[*e] += yi;
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
  if (objective == Objective::imbalance) {
    objective_value = imbalance_terms(g.data(), z.data());
  } else if (objective == Objective::geo) {
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
  const int parts_used = parts(n_threads);
  const double inv_total = 1.0 / total;
  double reg_value = 0.0;
  auto run = [&](auto kind) {
    constexpr Regularizer R = decltype(kind)::value;
    const RegTerms<R> terms{counts_.data(), inv_n_.data(), p0_.data(), inv_p0_.data(), inv_total};
    double qp = 0.0;
    if (R != Regularizer::none) {
      std::vector<double> value_part(static_cast<std::size_t>(n_blocks_), 0.0);
      std::vector<double> qp_part(static_cast<std::size_t>(n_blocks_), 0.0);
      over_blocks(n_blocks_, parts_used, [&](index_t b0, index_t b1) {
        for (index_t b = b0; b < b1; ++b) {
          // Four interleaved pairs of accumulators in a fixed order: the adds need not
          // wait on each other.
          double v[4] = {0.0, 0.0, 0.0, 0.0}, q[4] = {0.0, 0.0, 0.0, 0.0};
          const index_t end = std::min(k, (b + 1) * block_size_);
          index_t j = b * block_size_;
          for (; j + 4 <= end; j += 4)
            for (int lane = 0; lane < 4; ++lane) terms.value(alpha[j + lane], j + lane, v[lane], q[lane]);
          for (; j < end; ++j) terms.value(alpha[j], j, v[0], q[0]);
          value_part[static_cast<std::size_t>(b)] = (v[0] + v[1]) + (v[2] + v[3]);
          qp_part[static_cast<std::size_t>(b)] = (q[0] + q[1]) + (q[2] + q[3]);
        }
      });
      reg_value = sum_in_order(value_part);
      qp = sum_in_order(qp_part);
      if constexpr (R == Regularizer::ess) {
        qp = reg_value;  // Q, which the gradient needs
        reg_value = std::log(n_total_ * reg_value * inv_total * inv_total);
      }
    }
    if (grad == nullptr) return;
    pattern_sums(z.data(), grad, n_threads);
    // Every gradient entry is completed alone: no cross-thread reduction.
    over_blocks(n_blocks_, parts_used, [&](index_t b0, index_t b1) {
      const index_t end = std::min(k, b1 * block_size_);
      for (index_t j = b0 * block_size_; j < end; ++j) {
        double gj = grad[j] + z0;
        if (R != Regularizer::none) gj += gamma * terms.gradient(alpha[j], j, qp);
        grad[j] = gj;
      }
    });
  };
  if (!regularized) {
    run(std::integral_constant<Regularizer, Regularizer::none>{});
  } else if (regularizer == Regularizer::counts) {
    run(std::integral_constant<Regularizer, Regularizer::counts>{});
  } else if (regularizer == Regularizer::proportions) {
    run(std::integral_constant<Regularizer, Regularizer::proportions>{});
  } else if (regularizer == Regularizer::ratio) {
    run(std::integral_constant<Regularizer, Regularizer::ratio>{});
  } else {
    run(std::integral_constant<Regularizer, Regularizer::ess>{});
  }
  return objective_value + (regularized ? gamma * reg_value : 0.0);
}

double BalanceProblem::imbalance_terms(const double* g, double* z) const {
  // Active classes: weighted, targeted and present in some pattern. In logs, so that
  // presences of very different sizes neither overflow nor lose the small ones:
  // l_i = log(g_i / d_i) (the common 1 / S cancels in M / r_i).
  const index_t c = n_classes_;
  std::vector<double> l(static_cast<std::size_t>(c), 0.0);
  double l_max = -HUGE_VAL, weight_sum = 0.0;
  for (index_t i = 0; i < c; ++i) {
    z[i] = 0.0;
    if (!imbalance_active(i)) continue;
    if (!(g[i] > 0.0))
      bad("the 'imbalance' objective is undefined where class " + std::to_string(i) +
          " has presence 0 (every class it weighs must stay present)");
    l[i] = std::log(g[i]) - std::log(target_[i]);
    l_max = std::max(l_max, l[i]);
    weight_sum += weights_[i];
  }
  if (!(weight_sum > 0.0))
    bad("the 'imbalance' objective needs a class with weight > 0, target > 0 and present in some pattern, got "
        "none (are all label rows 0?); nothing to balance");
  // log M = l_max + log(sum exp(P (l_i - l_max))) / P; s_i = softmax weights of P l.
  std::vector<double> e(static_cast<std::size_t>(c), 0.0);  // exp(P (l_i - l_max))
  double e_sum = 0.0;
  for (index_t i = 0; i < c; ++i)
    if (imbalance_active(i)) e_sum += (e[i] = std::exp(kSoftMaxPower * (l[i] - l_max)));
  const double log_m = l_max + std::log(e_sum) / kSoftMaxPower;
  double t = 0.0;  // T = sum_i w_i M / r_i / sum w
  std::vector<double> m_over_r(static_cast<std::size_t>(c), 0.0);
  for (index_t i = 0; i < c; ++i)
    if (imbalance_active(i)) t += weights_[i] * (m_over_r[i] = std::exp(log_m - l[i]));
  t /= weight_sum;
  // d log T / d g_i = (s_i - w_i (M / r_i) / (W T)) / g_i
  for (index_t i = 0; i < c; ++i)
    if (imbalance_active(i)) z[i] = (e[i] / e_sum - weights_[i] * m_over_r[i] / (weight_sum * t)) / g[i];
  return std::log(t);
}

}  // namespace cobalance
