// Every path of the grouping core, forced one at a time through the tests' switch
// (cpp/src/pattern_strategy.hpp): each insertion strategy, on both index layouts
// where it applies, and each dense packer that this build and CPU have, against a
// brute-force reference (a std::map of the packed rows), with several thread counts.
// Data shapes are chosen so that each strategy meets both few and many new patterns,
// in one batch and in two.
#include <cobalance/pattern_table.hpp>

#include <cstdint>
#include <cstdlib>
#include <iostream>
#include <map>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "check.hpp"
#include "pattern_strategy.hpp"

using cobalance::index_t;
using cobalance::PatternTable;
using cobalance::PatternTableBuilder;
namespace detail = cobalance::detail;
using detail::DensePacker;
using detail::Insertion;

namespace {

// Row r's key, packed by hand: class i is bit i % 64 of word i / 64.
std::vector<std::uint64_t> packed_row(const std::vector<std::uint8_t>& y, index_t r, index_t c) {
  std::vector<std::uint64_t> key(static_cast<std::size_t>(cobalance::words_for(c)), 0);
  for (index_t i = 0; i < c; ++i)
    if (y[static_cast<std::size_t>(r * c + i)]) key[static_cast<std::size_t>(i / 64)] |= std::uint64_t{1} << (i % 64);
  return key;
}

// The table of rows [0, n) by brute force: patterns numbered in order of first row.
struct Reference {
  std::vector<std::uint64_t> packed;
  std::vector<index_t> counts;
  cobalance::InverseVector inverse;
};
Reference reference_of(const std::vector<std::uint8_t>& y, index_t n, index_t c) {
  std::map<std::vector<std::uint64_t>, index_t> ids;
  Reference ref;
  for (index_t r = 0; r < n; ++r) {
    const std::vector<std::uint64_t> key = packed_row(y, r, c);
    auto it = ids.find(key);
    if (it == ids.end()) {
      it = ids.emplace(key, static_cast<index_t>(ref.counts.size())).first;
      ref.counts.push_back(0);
      ref.packed.insert(ref.packed.end(), key.begin(), key.end());
    }
    ++ref.counts[static_cast<std::size_t>(it->second)];
    ref.inverse.push_back(static_cast<cobalance::pattern_id_t>(it->second));
  }
  return ref;
}

void check_table(const PatternTable& t, const Reference& ref, bool with_inverse, const std::string& what) {
  const bool same = t.packed().size() == ref.packed.size() &&
                    std::equal(t.packed().begin(), t.packed().end(), ref.packed.begin()) && t.counts() == ref.counts &&
                    (!with_inverse || t.inverse() == ref.inverse);
  if (!same) {
    std::cerr << "differs from the reference: " << what << " (" << t.n_patterns() << " patterns, reference "
              << ref.counts.size() << ")\n";
    std::exit(1);
  }
}

// few: class i present with probability 0.9 / (i + 1) (few patterns, a long tail);
// many: every class with probability 1/2 (for more than ~20 classes, nearly every
// row a new pattern).
std::vector<std::uint8_t> labels(index_t n, index_t c, bool many, unsigned seed) {
  std::mt19937_64 rng(seed);
  std::vector<std::uint8_t> y(static_cast<std::size_t>(n * c));
  for (index_t r = 0; r < n; ++r)
    for (index_t i = 0; i < c; ++i)
      y[static_cast<std::size_t>(r * c + i)] = many ? rng() & 1 : (rng() % 1000) < 900 / static_cast<unsigned>(i + 1);
  return y;
}

const char* name(Insertion s) {
  switch (s) {
    case Insertion::serial: return "serial";
    case Insertion::blocks: return "blocks";
    case Insertion::pipelined: return "pipelined";
    case Insertion::partitioned: return "partitioned";
    default: return "automatic";
  }
}
const char* name(DensePacker p) {
  switch (p) {
    case DensePacker::small_avx512: return "small_avx512";
    case DensePacker::small_sse2: return "small_sse2";
    case DensePacker::avx512: return "avx512";
    case DensePacker::avx2: return "avx2";
    case DensePacker::sse2: return "sse2";
    case DensePacker::exact: return "exact";
    default: return "automatic";
  }
}

// Forces `paths` for the lifetime of the object.
struct Forced {
  explicit Forced(const detail::ForcedPaths& paths) { detail::force_paths(paths); }
  ~Forced() { detail::force_paths(detail::ForcedPaths{}); }
};

constexpr index_t kRows = 20000;        // past the probe (4096 rows), into the strategy
constexpr index_t kRowsPerThread = 1024;  // so that kRows rows take several threads

void check_strategies() {
  for (const index_t c : {3, 9, 16, 17, 64, 65, 130, 300}) {
    for (const bool many : {false, true}) {
      const auto y = labels(kRows, c, many, static_cast<unsigned>(c * 2 + many));
      const Reference ref = reference_of(y, kRows, c);
      for (const Insertion s : {Insertion::serial, Insertion::blocks, Insertion::pipelined, Insertion::partitioned}) {
        for (const bool hashed : {false, true}) {
          if (hashed && c > 16) continue;  // the hashed layout is the only one there
          if (!detail::insertion_applies(s, c, hashed)) continue;
          detail::ForcedPaths paths;
          paths.insertion = s;
          paths.hashed_index = hashed;
          paths.rows_per_thread = kRowsPerThread;
          const Forced forced(paths);
          for (const int threads : {1, 2, 3}) {
            const std::string what = std::string(name(s)) + (hashed ? " hashed" : "") + ", C=" + std::to_string(c) +
                                     (many ? " many" : " few") + ", " + std::to_string(threads) + " threads";
            PatternTableBuilder one(c, true, threads);
            one.add_dense(y.data(), kRows);
            CHECK(detail::last_insertion() == s);
            check_table(one.finish(), ref, true, what);
            // Two batches: the second meets an index that holds patterns already.
            PatternTableBuilder two(c, true, threads);
            two.add_dense(y.data(), kRows / 2 - 7);
            two.add_dense(y.data() + (kRows / 2 - 7) * c, kRows - (kRows / 2 - 7));
            check_table(two.finish(), ref, true, what + ", two batches");
            PatternTableBuilder counts_only(c, false, threads);
            counts_only.add_dense(y.data(), kRows);
            const PatternTable t = counts_only.finish();
            CHECK(t.inverse().empty());
            check_table(t, ref, false, what + ", counts only");
          }
        }
      }
    }
  }
}

void check_packers() {
  for (const index_t c : {1, 5, 9, 15, 16, 17, 31, 32, 33, 64, 65, 100, 130, 300}) {
    // An odd number of rows, so that the last rows (packed exactly by the packers
    // that read past a row) and a short last batch are there.
    const index_t n = 9001;
    const auto y = labels(n, c, c > 16, static_cast<unsigned>(c + 1000));
    const Reference ref = reference_of(y, n, c);
    for (const DensePacker p : {DensePacker::small_avx512, DensePacker::small_sse2, DensePacker::avx512,
                                DensePacker::avx2, DensePacker::sse2, DensePacker::exact}) {
      if (!detail::dense_packer_available(p, c)) {
        if (c == 9 || c == 64) std::cout << "packer " << name(p) << " not available here for C=" << c << "\n";
        continue;
      }
      detail::ForcedPaths paths;
      paths.packer = p;
      paths.rows_per_thread = kRowsPerThread;
      const Forced forced(paths);
      for (const int threads : {1, 2}) {
        const std::string what = std::string("packer ") + name(p) + ", C=" + std::to_string(c) + ", " +
                                 std::to_string(threads) + " threads";
        PatternTableBuilder b(c, true, threads);
        b.add_dense(y.data(), n);
        CHECK(detail::last_dense_packer() == p);
        check_table(b.finish(), ref, true, what);
      }
      // A byte other than 0 or 1 is reported with its row and column, in the middle
      // of the rows and in the last one (packed exactly by the packers that read past
      // a row).
      for (const index_t row : {n / 2, n - 1}) {
        std::vector<std::uint8_t> bad = y;
        bad[static_cast<std::size_t>(row * c + c - 1)] = 2;
        PatternTableBuilder b(c, true, 2);
        CHECK_INVALID(b.add_dense(bad.data(), n),
                      "got 2 at row " + std::to_string(row) + ", column " + std::to_string(c - 1));
        CHECK(b.n_samples() == 0);
      }
    }
  }
}

// Batches with an interrupt check (never true) run in slices of kSliceRows rows (set
// in main); each strategy across slices, whose later ones find the index sized and
// laid out by the earlier ones, equals the reference.
constexpr index_t kSliceRows = 6000;  // past the probe of each slice (4096 rows)
void check_slices() {
  for (const index_t c : {9, 64, 130}) {
    const auto y = labels(kRows, c, true, static_cast<unsigned>(c + 77));
    const Reference ref = reference_of(y, kRows, c);
    for (const Insertion s : {Insertion::automatic, Insertion::serial, Insertion::blocks, Insertion::pipelined,
                              Insertion::partitioned}) {
      if (!detail::insertion_applies(s, c, false)) continue;
      detail::ForcedPaths paths;
      paths.insertion = s;
      paths.rows_per_thread = kRowsPerThread;
      const Forced forced(paths);
      for (const int threads : {1, 2}) {
        PatternTableBuilder b(c, true, threads);
        b.set_interrupt_check([] { return false; });
        b.add_dense(y.data(), kRows);
        check_table(b.finish(), ref, true,
                    std::string("slices, ") + name(s) + ", C=" + std::to_string(c) + ", " + std::to_string(threads) +
                        " threads");
      }
    }
  }
}

// A strategy or packer that cannot run is refused, not silently replaced.
void check_refusals() {
  const auto y = labels(kRows, 9, false, 1);
  {
    detail::ForcedPaths paths;
    paths.insertion = Insertion::partitioned;  // needs keys of several words
    const Forced forced(paths);
    PatternTableBuilder b(9, true, 2);
    bool refused = false;
    try {
      b.add_dense(y.data(), kRows);
    } catch (const std::logic_error&) {
      refused = true;
    }
    CHECK(refused);
    CHECK(b.n_samples() == 0);
  }
  {
    detail::ForcedPaths paths;
    paths.packer = DensePacker::small_sse2;  // rows of at most 16 classes
    const Forced forced(paths);
    const auto wide = labels(100, 17, false, 2);
    PatternTableBuilder b(17, true, 1);
    bool refused = false;
    try {
      b.add_dense(wide.data(), 100);
    } catch (const std::logic_error&) {
      refused = true;
    }
    CHECK(refused);
  }
}

}  // namespace

int main() {
  // Read once, at the first batch with an interrupt check (check_slices).
  setenv("COBALANCE_TEST_SLICE_ROWS", std::to_string(kSliceRows).c_str(), 1);
  check_strategies();
  check_slices();
  check_packers();
  check_refusals();
  return 0;
}
