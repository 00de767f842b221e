#include <cobalance/pattern_table.hpp>

#include <map>
#include <random>
#include <vector>

#include "check.hpp"

using cobalance::index_t;
using cobalance::PatternTable;
using cobalance::PatternTableBuilder;

namespace {

// Brute force: map from row bytes to first-occurrence id.
void check_against_reference(const std::vector<std::uint8_t>& y, index_t n, index_t c, const PatternTable& t) {
  std::map<std::vector<std::uint8_t>, index_t> ids;
  std::vector<index_t> counts;
  cobalance::InverseVector inverse;
  std::vector<std::vector<std::uint8_t>> order;
  for (index_t r = 0; r < n; ++r) {
    std::vector<std::uint8_t> row(y.begin() + r * c, y.begin() + (r + 1) * c);
    auto it = ids.find(row);
    if (it == ids.end()) {
      it = ids.emplace(row, static_cast<index_t>(counts.size())).first;
      counts.push_back(0);
      order.push_back(row);
    }
    ++counts[it->second];
    inverse.push_back(it->second);
  }
  CHECK(t.n_patterns() == static_cast<index_t>(counts.size()));
  CHECK(t.counts() == counts);
  CHECK(t.inverse() == inverse);
  CHECK(t.n_samples() == n);
  const auto dense = t.dense();
  for (index_t j = 0; j < t.n_patterns(); ++j)
    for (index_t i = 0; i < c; ++i) CHECK(dense[j * c + i] == order[j][i]);
}

std::vector<std::uint8_t> random_labels(index_t n, index_t c, unsigned seed) {
  std::mt19937_64 rng(seed);
  std::vector<std::uint8_t> y(static_cast<std::size_t>(n * c));
  for (index_t r = 0; r < n; ++r)
    for (index_t i = 0; i < c; ++i) y[r * c + i] = (rng() % 1000) < 900 / (i + 1) ? 1 : 0;
  return y;
}

}  // namespace

int main() {
  for (index_t c : {1, 7, 16, 17, 63, 64, 65, 130}) {
    const index_t n = 70000;  // more than one part per thread
    auto y = random_labels(n, c, static_cast<unsigned>(c));
    PatternTable reference;
    for (int threads : {1, 2, 3, 8}) {
      PatternTableBuilder b(c, true, threads);
      b.add_dense(y.data(), n);
      PatternTable t = b.finish();
      check_against_reference(y, n, c, t);
      if (threads == 1) reference = t;
      CHECK(t.packed() == reference.packed());
    }
    // Chunked adds and merged partitions equal the one-pass table.
    PatternTableBuilder chunked(c, true, 2);
    chunked.add_dense(y.data(), 1000);
    chunked.add_dense(y.data() + 1000 * c, n - 1000);
    PatternTable tc = chunked.finish();
    CHECK(tc.inverse() == reference.inverse());
    PatternTableBuilder p1(c), p2(c);
    p1.add_dense(y.data(), 33333);
    p2.add_dense(y.data() + 33333 * c, n - 33333);
    PatternTable a = p1.finish(), b2 = p2.finish();
    PatternTable merged = cobalance::merge_tables({&a, &b2});
    CHECK(merged.packed() == reference.packed());
    CHECK(merged.counts() == reference.counts());
    CHECK(merged.inverse() == reference.inverse());
    // Lists and packed give the same table.
    std::vector<index_t> indptr{0}, indices;
    std::vector<std::uint64_t> words(static_cast<std::size_t>(n * cobalance::words_for(c)), 0);
    for (index_t r = 0; r < n; ++r) {
      for (index_t i = 0; i < c; ++i)
        if (y[r * c + i]) {
          indices.push_back(i);
          words[r * cobalance::words_for(c) + i / 64] |= std::uint64_t{1} << (i % 64);
        }
      indptr.push_back(static_cast<index_t>(indices.size()));
    }
    PatternTableBuilder bl(c, true, 2), bp(c, true, 2);
    bl.add_lists(indptr.data(), n, indices.data(), static_cast<index_t>(indices.size()));
    bp.add_packed(words.data(), n);
    CHECK(bl.finish().inverse() == reference.inverse());
    CHECK(bp.finish().packed() == reference.packed());
    // Round trip through parts.
    PatternTable again = PatternTable::from_parts(c, reference.packed(), reference.counts(), reference.inverse(), true);
    CHECK(again.inverse() == reference.inverse());
  }

  // Bad input.
  CHECK_INVALID(PatternTableBuilder(0), "n_classes");
  {
    std::vector<std::uint8_t> y{0, 1, 2, 0};
    PatternTableBuilder b(2);
    CHECK_INVALID(b.add_dense(y.data(), 2), "got 2 at row 1, column 0");
    CHECK(b.n_samples() == 0);  // a failed batch leaves the builder unchanged
    std::vector<index_t> indptr{0, 1, 2}, indices{0, 5};
    CHECK_INVALID(b.add_lists(indptr.data(), 2, indices.data(), 2), "class index 5 in row 1");
    std::vector<index_t> bad_ptr{0, 2, 1};
    CHECK_INVALID(b.add_lists(bad_ptr.data(), 2, indices.data(), 2), "non-decreasing");
    std::vector<std::uint64_t> words{1, 4};
    CHECK_INVALID(b.add_packed(words.data(), 2), "packed row 1");
  }
  CHECK_INVALID(PatternTable::from_parts(3, {1, 1}, {1, 1}, {}, false), "duplicate");
  CHECK_INVALID(PatternTable::from_parts(3, {1, 2}, {1, 0}, {}, false), "counts[1]");
  CHECK_INVALID(PatternTable::from_parts(3, {1, 2}, {1, 1}, {0, 2}, true), "inverse[1] = 2");
  // Counts beyond 2^31 for one pattern (merged tables without inverse), in the
  // hashed layout (70 classes: two words per pattern) and the direct one.
  {
    const index_t big = index_t{3} << 30;
    PatternTable wide = PatternTable::from_parts(70, {1, 0, 2, 1}, {big, 5}, {}, false);
    PatternTable m = cobalance::merge_tables({&wide, &wide, &wide});
    CHECK(m.counts() == (std::vector<index_t>{3 * big, 15}));
    PatternTable narrow = PatternTable::from_parts(5, {1, 2}, {big, 5}, {}, false);
    PatternTable mn = cobalance::merge_tables({&narrow, &narrow});
    CHECK(mn.counts() == (std::vector<index_t>{2 * big, 10}));
    PatternTable one = PatternTable::from_parts(64, {7}, {big}, {}, false);
    PatternTable m1 = cobalance::merge_tables({&one, &one, &one, &one});
    CHECK(m1.counts() == (std::vector<index_t>{4 * big}));
  }
  // Many distinct patterns with a bad row late: every thread count reports it and
  // leaves the builder as it was.
  {
    const index_t n = 200000, c = 64;
    std::mt19937_64 rng(9);
    std::vector<std::uint8_t> y(static_cast<std::size_t>(n * c));
    for (auto& v : y) v = rng() & 1;
    y[static_cast<std::size_t>((n - 77) * c + 5)] = 9;
    for (int threads : {1, 2, 3}) {
      PatternTableBuilder b(c, true, threads);
      b.add_dense(y.data(), 1000);
      CHECK_INVALID(b.add_dense(y.data() + 1000 * c, n - 1000), "got 9 at row " + std::to_string(n - 77) + ", column 5");
      CHECK(b.n_samples() == 1000);
      CHECK(b.n_patterns() == 1000);
      PatternTable t = b.finish();
      CHECK(t.inverse().size() == 1000);
      CHECK(t.counts() == std::vector<index_t>(1000, 1));
    }
  }
  // Empty input.
  PatternTableBuilder empty(5);
  empty.add_dense(nullptr, 0);
  PatternTable e = empty.finish();
  CHECK(e.n_patterns() == 0 && e.n_samples() == 0);
  std::cout << "test_pattern_table: all checks passed\n";
  return 0;
}
