// Interrupt checks (interrupt.hpp): a check that returns true stops the solvers, the
// builder, merges and mask scans with cobalance::Interrupted, leaving a builder as it
// was; a check that never returns true changes no result. CTest runs this with
// COBALANCE_TEST_SLICE_ROWS=1000, so that small batches are grouped in several slices
// with the check polled between them.
#include <cobalance/adam.hpp>
#include <cobalance/exact_solver.hpp>
#include <cobalance/interrupt.hpp>
#include <cobalance/mask_scan.hpp>
#include <cobalance/pattern_table.hpp>
#include <cobalance/projected_gradient.hpp>

#include <chrono>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <vector>

#include "check.hpp"

using cobalance::index_t;
using cobalance::InterruptCheck;
using cobalance::Objective;
using cobalance::PatternTable;
using cobalance::PatternTableBuilder;
using cobalance::Regularizer;

static_assert(std::is_base_of_v<std::exception, cobalance::Interrupted>);
static_assert(!std::is_base_of_v<std::invalid_argument, cobalance::Interrupted>,
              "an interruption is not bad input");

#define CHECK_INTERRUPTED(expr)                  \
  do {                                           \
    bool thrown_ = false;                        \
    try {                                        \
      expr;                                      \
    } catch (const cobalance::Interrupted&) {    \
      thrown_ = true;                            \
    }                                            \
    CHECK(thrown_);                              \
  } while (0)

namespace {

// A check that records its calls and the threads they came from, and returns true
// from call number `stop_at` on (0: never). Each call before that sleeps past the
// poll interval, so that the next poll calls it again: the stop then comes at the
// stop_at-th poll, whatever the speed of the machine.
struct Recorder {
  int stop_at = 0;
  int calls = 0;
  bool other_thread = false;
  std::thread::id caller = std::this_thread::get_id();
  InterruptCheck check() {
    return [this] {
      ++calls;
      other_thread = other_thread || std::this_thread::get_id() != caller;
      if (stop_at > 0 && calls >= stop_at) return true;
      if (stop_at > 0) std::this_thread::sleep_for(cobalance::kInterruptInterval + std::chrono::milliseconds(10));
      return false;
    };
  }
};

struct Problem {
  std::vector<index_t> indptr{0}, indices;
  std::vector<double> counts;
  index_t k, c;
};

// K random patterns over C classes (every pattern holds class 0, so none is empty).
Problem random_problem(index_t k, index_t c, unsigned seed) {
  std::mt19937_64 rng(seed);
  Problem p;
  p.k = k;
  p.c = c;
  for (index_t j = 0; j < k; ++j) {
    p.indices.push_back(0);
    for (index_t i = 1; i < c; ++i)
      if (rng() % 3 == 0) p.indices.push_back(i);
    p.indptr.push_back(static_cast<index_t>(p.indices.size()));
    p.counts.push_back(static_cast<double>(1 + rng() % 40));
  }
  return p;
}

void check_solvers() {
  const Problem d = random_problem(300, 8, 3);
  const cobalance::BalanceProblem problem(d.indptr, d.indices, d.counts, d.c, std::vector<double>(8, 0.5));
  double total = 0.0;
  for (double n : d.counts) total += n;
  std::vector<double> lo(d.counts.size(), 0.0), hi(d.counts);
  for (auto& v : hi) v *= 10.0;

  // Never true: bitwise the results without a check, and the check only ever called
  // from this thread (the solvers run on 3).
  {
    Recorder never;
    cobalance::AdamOptions a;
    a.lr = 0.5;
    a.max_iter = 3000;
    a.n_threads = 3;
    const auto plain = cobalance::adam(problem, d.counts, lo, hi, Objective::fraction, Regularizer::proportions,
                                       1e-3, a);
    a.interrupt = never.check();
    const auto checked = cobalance::adam(problem, d.counts, lo, hi, Objective::fraction, Regularizer::proportions,
                                         1e-3, a);
    CHECK(plain.alpha == checked.alpha && plain.history == checked.history && plain.n_iter == checked.n_iter);

    cobalance::GradientOptions g;
    g.max_iter = 2000;
    g.tol = 0.0;
    g.n_threads = 3;
    const auto gp = cobalance::projected_gradient(problem, d.counts, lo, hi, Objective::imbalance, Regularizer::ess,
                                                  0.1, 2 * total, g);
    g.interrupt = never.check();
    const auto gc = cobalance::projected_gradient(problem, d.counts, lo, hi, Objective::imbalance, Regularizer::ess,
                                                  0.1, 2 * total, g);
    CHECK(gp.alpha == gc.alpha && gp.history == gc.history && gp.n_iter == gc.n_iter);

    // The Newton path (proportions), FISTA (none) and the fraction_l2 outer loop.
    for (auto [objective, regularizer, gamma] :
         {std::tuple{Objective::fraction, Regularizer::proportions, 1e-3},
          std::tuple{Objective::fraction, Regularizer::none, 0.0},
          std::tuple{Objective::fraction_l2, Regularizer::ratio, 1e-2}}) {
      cobalance::ExactOptions e;
      e.max_iter = 20000;
      e.n_threads = 3;
      const auto ep = cobalance::solve_exact(problem, objective, regularizer, gamma, 2 * total, lo, hi, e);
      e.interrupt = never.check();
      const auto ec = cobalance::solve_exact(problem, objective, regularizer, gamma, 2 * total, lo, hi, e);
      CHECK(ep.p == ec.p && ep.loss == ec.loss && ep.n_iter == ec.n_iter && ep.kkt_residual == ec.kkt_residual);
    }
    CHECK(never.calls > 0);
    CHECK(!never.other_thread);
  }

  // True at once: the first poll stops every solver.
  for (int stop_at : {1, 3}) {
    Recorder stop;
    stop.stop_at = stop_at;
    cobalance::AdamOptions a;
    a.max_iter = index_t{1} << 40;
    a.n_threads = 2;
    a.interrupt = stop.check();
    CHECK_INTERRUPTED(cobalance::adam(problem, d.counts, lo, hi, Objective::fraction, Regularizer::proportions, 1e-3, a));
    CHECK(stop.calls == stop_at);
    stop.calls = 0;
    cobalance::GradientOptions g;
    g.max_iter = index_t{1} << 40;
    g.tol = 0.0;
    g.n_threads = 2;
    g.interrupt = stop.check();
    CHECK_INTERRUPTED(cobalance::projected_gradient(problem, d.counts, lo, hi, Objective::fraction, Regularizer::ratio,
                                                    1e-3, 2 * total, g));
    CHECK(stop.calls == stop_at);
    cobalance::ExactOptions e;
    e.max_iter = index_t{1} << 40;
    e.tol = 0.0;
    e.n_threads = 2;
    for (auto regularizer : {Regularizer::proportions, Regularizer::none}) {
      stop.calls = 0;
      e.interrupt = stop.check();
      CHECK_INTERRUPTED(cobalance::solve_exact(problem, Objective::fraction, regularizer, 1e-3, 2 * total, lo, hi, e));
      CHECK(stop.calls == stop_at);
    }
    CHECK(!stop.other_thread);
  }
  // Later: past the power iterations, inside the Newton / FISTA / outer loops of an
  // exact solve that would otherwise run for 2^40 iterations (tol = 0).
  {
    Recorder late;
    late.stop_at = 60;
    cobalance::ExactOptions e;
    e.max_iter = index_t{1} << 40;
    e.tol = 0.0;
    e.interrupt = late.check();
    CHECK_INTERRUPTED(cobalance::solve_exact(problem, Objective::fraction_l2, Regularizer::proportions, 1e-2,
                                             2 * total, lo, hi, e));
    CHECK(late.calls == 60);
  }
}

std::vector<std::uint8_t> random_labels(index_t n, index_t c, unsigned seed) {
  std::mt19937_64 rng(seed);
  std::vector<std::uint8_t> y(static_cast<std::size_t>(n * c));
  for (index_t r = 0; r < n; ++r)
    for (index_t i = 0; i < c; ++i) y[static_cast<std::size_t>(r * c + i)] = (rng() % 1000) < 600 / (i + 1) ? 1 : 0;
  return y;
}

bool same_table(const PatternTable& a, const PatternTable& b) {
  return a.n_classes() == b.n_classes() && a.packed() == b.packed() && a.counts() == b.counts() &&
         a.inverse() == b.inverse() && a.n_samples() == b.n_samples();
}

// One batch in the three input forms the builder takes.
struct Batch {
  index_t n, c;
  std::vector<std::uint8_t> dense;
  std::vector<std::uint64_t> words;
  std::vector<index_t> indptr{0}, indices;
  Batch(index_t rows, index_t classes, unsigned seed) : n(rows), c(classes), dense(random_labels(rows, classes, seed)) {
    const index_t nw = cobalance::words_for(c);
    words.assign(static_cast<std::size_t>(n * nw), 0);
    for (index_t r = 0; r < n; ++r) {
      for (index_t i = 0; i < c; ++i)
        if (dense[static_cast<std::size_t>(r * c + i)]) {
          indices.push_back(i);
          words[static_cast<std::size_t>(r * nw + i / 64)] |= std::uint64_t{1} << (i % 64);
        }
      indptr.push_back(static_cast<index_t>(indices.size()));
    }
  }
  // Rows [first, first + rows) in the given form.
  void add(PatternTableBuilder& b, int form, index_t first, index_t rows) const {
    if (form == 0) b.add_dense(dense.data() + first * c, rows);
    if (form == 1) b.add_packed(words.data() + first * cobalance::words_for(c), rows);
    if (form == 2)
      b.add_lists(indptr.data() + first, rows, indices.data() + indptr[static_cast<std::size_t>(first)],
                  indptr[static_cast<std::size_t>(first + rows)] - indptr[static_cast<std::size_t>(first)]);
  }
};

void check_builder() {
  // 7 classes: the direct index; 70: hashed keys of two words; 5000: label lists
  // grouped by their sets (keys of 79 words).
  for (index_t c : {7, 70, 5000}) {
    const Batch batch(9000, c, static_cast<unsigned>(c));
    for (int form = 0; form < 3; ++form) {
      if (c == 5000 && form != 2) continue;  // 45 MB of dense rows: the lists suffice
      PatternTableBuilder plain(c, true, 2);
      batch.add(plain, form, 0, batch.n);
      const PatternTable reference = plain.finish();
      PatternTableBuilder head(c, true, 2);
      batch.add(head, form, 0, 500);
      const PatternTable first_rows = head.finish();

      // A check that never stops: the table of one pass, in one batch or two.
      Recorder never;
      PatternTableBuilder sliced(c, true, 2);
      sliced.set_interrupt_check(never.check());
      batch.add(sliced, form, 0, 500);
      batch.add(sliced, form, 500, batch.n - 500);
      CHECK(same_table(sliced.finish(), reference));
      CHECK(never.calls > 0 && !never.other_thread);

      // Stopped at the second poll (between slices, or in the lists' grouping), into
      // an empty builder and into one holding 500 rows: the builder is as before.
      for (index_t before : {index_t{0}, index_t{500}}) {
        Recorder stop;
        stop.stop_at = 2;
        PatternTableBuilder b(c, true, 2);
        if (before) batch.add(b, form, 0, before);
        b.set_interrupt_check(stop.check());
        CHECK_INTERRUPTED(batch.add(b, form, before, batch.n - before));
        CHECK(stop.calls == 2);
        CHECK(b.n_samples() == before);
        CHECK(b.n_patterns() == (before ? first_rows.n_patterns() : 0));
        // ... and goes on as if the stopped batch had never come.
        b.set_interrupt_check({});
        batch.add(b, form, before, batch.n - before);
        CHECK(same_table(b.finish(), reference));
      }
    }
    // A table merged in, stopped at its first pattern, or with 5000 classes part-way
    // through its patterns (51 patterns of 79 words between polls); whole merges.
    PatternTableBuilder whole(c, true, 2);
    batch.add(whole, 2, 0, batch.n);
    const PatternTable all = whole.finish();
    PatternTableBuilder head(c, true, 2), tail(c, true, 2);
    batch.add(head, 2, 0, 500);
    batch.add(tail, 2, 500, batch.n - 500);
    const PatternTable a = head.finish(), b = tail.finish();
    Recorder stop;
    stop.stop_at = c == 5000 ? 3 : 2;
    PatternTableBuilder merging(c, true, 2);
    merging.add_table(a);
    merging.set_interrupt_check(stop.check());
    CHECK_INTERRUPTED(merging.add_table(b));
    CHECK(stop.calls == stop.stop_at);
    CHECK(merging.n_samples() == 500 && merging.n_patterns() == a.n_patterns());
    merging.set_interrupt_check({});
    merging.add_table(b);
    CHECK(same_table(merging.finish(), all));
    Recorder at_once;
    at_once.stop_at = 1;
    CHECK_INTERRUPTED(cobalance::merge_tables({&a, &b}, 2, at_once.check()));
    Recorder never;
    CHECK(same_table(cobalance::merge_tables({&a, &b}, 2, never.check()), all));
  }

  // Label lists of many classes, stopped while their sets enter the index: the first
  // poll is in the grouping (the batch is under 4096 rows), the second at the first
  // set, the third at the second, with one set entered and taken back out.
  {
    const index_t c = 100000;
    std::vector<index_t> indptr{0}, indices;
    std::mt19937_64 rng(5);
    for (index_t r = 0; r < 3000; ++r) {
      for (int e = 0; e < 3; ++e) indices.push_back(static_cast<index_t>(rng() % c));
      indptr.push_back(static_cast<index_t>(indices.size()));
    }
    const index_t nnz = static_cast<index_t>(indices.size());
    PatternTableBuilder plain(c);
    plain.add_lists(indptr.data(), 1000, indices.data(), indptr[1000]);
    plain.add_lists(indptr.data() + 1000, 2000, indices.data() + indptr[1000], nnz - indptr[1000]);
    const PatternTable reference = plain.finish();
    for (int stop_at : {2, 3}) {
      Recorder stop;
      stop.stop_at = stop_at;
      PatternTableBuilder b(c);
      b.add_lists(indptr.data(), 1000, indices.data(), indptr[1000]);
      const index_t k = b.n_patterns();
      b.set_interrupt_check(stop.check());
      CHECK_INTERRUPTED(b.add_lists(indptr.data() + 1000, 2000, indices.data() + indptr[1000], nnz - indptr[1000]));
      CHECK(stop.calls == stop_at);
      CHECK(b.n_samples() == 1000 && b.n_patterns() == k);
      b.set_interrupt_check({});
      b.add_lists(indptr.data() + 1000, 2000, indices.data() + indptr[1000], nnz - indptr[1000]);
      CHECK(same_table(b.finish(), reference));
    }
  }

  // Bad input in a later slice: the earlier slices are taken back out as well.
  {
    const index_t c = 30;
    auto y = random_labels(5000, c, 8);
    y[static_cast<std::size_t>(4321 * c + 2)] = 7;
    Recorder never;
    PatternTableBuilder b(c, true, 2);
    b.add_dense(y.data(), 100);
    const index_t k = b.n_patterns();
    b.set_interrupt_check(never.check());
    CHECK_INVALID(b.add_dense(y.data() + 100 * c, 4900), "got 7 at row 4321, column 2");
    CHECK(b.n_samples() == 100 && b.n_patterns() == k);
    CHECK(b.finish().inverse().size() == 100);
  }
}

void check_mask_scans() {
  const index_t n = 6, h = 40, w = 50, c = 5;
  std::mt19937_64 rng(4);
  std::vector<std::uint8_t> maps(static_cast<std::size_t>(n * h * w));
  for (auto& v : maps) v = static_cast<std::uint8_t>(rng() % c);
  std::vector<std::uint8_t> binary(static_cast<std::size_t>(n * c * h * w));
  for (auto& v : binary) v = static_cast<std::uint8_t>(rng() % 5 == 0);
  cobalance::MaskScanOptions o;
  o.tile_h = 16;
  o.tile_w = 16;
  o.stride_h = 8;
  o.n_threads = 3;
  const auto plain = cobalance::scan_label_maps(maps.data(), n, h, w, c, o);
  const auto plain_binary = cobalance::scan_binary_masks(binary.data(), n, c, h, w, o);
  Recorder never;
  o.interrupt = never.check();
  const auto checked = cobalance::scan_label_maps(maps.data(), n, h, w, c, o);
  const auto checked_binary = cobalance::scan_binary_masks(binary.data(), n, c, h, w, o);
  CHECK(plain.pixel_counts == checked.pixel_counts && plain.presence == checked.presence &&
        plain.origins == checked.origins && plain.valid_pixels == checked.valid_pixels);
  CHECK(plain_binary.pixel_counts == checked_binary.pixel_counts &&
        plain_binary.valid_pixels == checked_binary.valid_pixels);
  CHECK(never.calls > 0 && !never.other_thread);
  Recorder stop;
  stop.stop_at = 1;
  o.interrupt = stop.check();
  CHECK_INTERRUPTED(cobalance::scan_label_maps(maps.data(), n, h, w, c, o));
  CHECK_INTERRUPTED(cobalance::scan_binary_masks(binary.data(), n, c, h, w, o));
  // Bad input is still reported for the first bad image, with a check.
  maps[static_cast<std::size_t>(4 * h * w + 3 * w + 7)] = 9;
  maps[static_cast<std::size_t>(5 * h * w)] = 9;
  o.interrupt = never.check();
  CHECK_INVALID(cobalance::scan_label_maps(maps.data(), n, h, w, c, o), "mask value 9 at image 4, pixel (y=3, x=7)");
}

// The poller itself: no check, nothing called; the first poll calls the check, the
// next ones only once the interval has passed.
void check_poller() {
  cobalance::InterruptPoller none(InterruptCheck{});
  CHECK(!none.active());
  none.poll();
  int calls = 0;
  const InterruptCheck count = [&calls] {
    ++calls;
    return false;
  };
  cobalance::InterruptPoller poller(count, std::chrono::hours(1));
  CHECK(poller.active());
  for (int i = 0; i < 1000; ++i) poller.poll();
  CHECK(calls == 1);
  cobalance::InterruptPoller eager(count, std::chrono::milliseconds(0));
  for (int i = 0; i < 10; ++i) eager.poll();
  CHECK(calls == 11);
}

}  // namespace

int main() {
  check_poller();
  check_solvers();
  check_builder();
  check_mask_scans();
  return 0;
}
