#include <cobalance/pattern_table.hpp>

#include <algorithm>
#include <limits>
#include <map>
#include <string>
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
    inverse.push_back(static_cast<cobalance::pattern_id_t>(it->second));
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
  // One-word keys, many new patterns: one thread inserts every row, inline while the
  // table has room. The opening rows repeat 512 patterns, so the table is sized for
  // few, and then every row is new: the table grows many times during the batch.
  {
    const index_t n = 120000, c = 40;
    std::mt19937_64 rng(21);
    std::vector<std::uint8_t> y(static_cast<std::size_t>(n * c));
    for (index_t r = 0; r < n; ++r) {
      const std::uint64_t code = r < 4096 ? (r * 2654435761u) % 512 : rng();
      for (index_t i = 0; i < c; ++i) y[static_cast<std::size_t>(r * c + i)] = (code >> i) & 1;
    }
    for (index_t r = n / 2; r < n; r += 50) std::copy(y.begin() + 5000 * c, y.begin() + 5001 * c, y.begin() + r * c);
    for (int threads : {1, 2, 3}) {
      PatternTableBuilder b(c, true, threads);
      b.add_dense(y.data(), n);
      check_against_reference(y, n, c, b.finish());
      PatternTableBuilder chunked(c, true, threads);
      chunked.add_dense(y.data(), 3000);
      chunked.add_dense(y.data() + 3000 * c, n - 3000);
      check_against_reference(y, n, c, chunked.finish());
      // The expected total sizes the table from the first batch: right, too high
      // or too low, the table is the same (and 10^12, far too high, reserves at
      // most 8x the first batch's own estimate).
      for (index_t hint : {n, 4 * n, n / 10, index_t{1000000000000}}) {
        PatternTableBuilder hinted(c, true, threads);
        hinted.expect_samples(hint);
        hinted.add_dense(y.data(), 3000);
        hinted.add_dense(y.data() + 3000 * c, n - 3000);
        check_against_reference(y, n, c, hinted.finish());
      }
    }
    PatternTableBuilder b(c);
    CHECK_INVALID(b.expect_samples(-1), "n_total must be >= 0, got -1");
  }
  // Wide keys with many new patterns take the partitioned path (threads insert into
  // their own regions of the index, chunk by chunk; one thread takes it too): every
  // thread count gives the table of the reference, batch after batch, and reports
  // the first bad row wherever it falls (first chunk, a chunk or share edge, the
  // last row).
  {
    const index_t n = 150000, c = 200;
    auto y = random_labels(n, c, 11);
    for (index_t r = 0; r < n; r += 7) std::copy(y.begin(), y.begin() + c, y.begin() + r * c);  // a frequent pattern
    PatternTableBuilder one(c, true, 1);
    one.add_dense(y.data(), n);
    const PatternTable reference = one.finish();
    check_against_reference(y, n, c, reference);
    for (int threads : {1, 2, 3, 4}) {
      PatternTableBuilder b(c, true, threads);
      b.add_dense(y.data(), n / 3);
      b.add_dense(y.data() + n / 3 * c, n - n / 3);  // into an index that already holds many
      const PatternTable t = b.finish();
      CHECK(t.packed() == reference.packed());
      CHECK(t.counts() == reference.counts());
      CHECK(t.inverse() == reference.inverse());
      PatternTableBuilder counts_only(c, false, threads);
      counts_only.add_dense(y.data(), n);
      const PatternTable tc = counts_only.finish();
      CHECK(tc.packed() == reference.packed());
      CHECK(tc.counts() == reference.counts());
      PatternTableBuilder hinted(c, true, threads);
      hinted.expect_samples(3 * n);
      hinted.add_dense(y.data(), n / 3);
      hinted.add_dense(y.data() + n / 3 * c, n - n / 3);
      const PatternTable th = hinted.finish();
      CHECK(th.packed() == reference.packed());
      CHECK(th.counts() == reference.counts());
      CHECK(th.inverse() == reference.inverse());
    }
    // With 2 threads the batch after row 1000 starts with a probe of 4096 rows (run
    // on one thread), then chunks of 4096 rows in shares of 2048: rows 3000 (the
    // probe), 7144 (a share edge), 17383 / 17384 (a chunk edge).
    for (const index_t bad_row : {index_t{3000}, index_t{7144}, index_t{17383}, index_t{17384}, index_t{60000}, n - 1}) {
      std::vector<std::uint8_t> yb = y;
      yb[static_cast<std::size_t>(bad_row * c + 3)] = 7;
      if (bad_row < n - 1) yb[static_cast<std::size_t>((n - 1) * c + 4)] = 8;  // later: not the one reported
      for (int threads : {1, 2, 3}) {
        PatternTableBuilder b(c, true, threads);
        b.add_dense(yb.data(), 1000);
        CHECK_INVALID(b.add_dense(yb.data() + 1000 * c, n - 1000), "got 7 at row " + std::to_string(bad_row) + ", column 3");
        CHECK(b.n_samples() == 1000);
        PatternTable t = b.finish();
        PatternTableBuilder first(c, true, 1);
        first.add_dense(y.data(), 1000);
        const PatternTable f = first.finish();
        CHECK(t.packed() == f.packed());
        CHECK(t.counts() == f.counts());
        CHECK(t.inverse() == f.inverse());
      }
    }
  }
  // The partitioned path counts in 31-bit slot fields: a pattern merged in with a
  // count near 2^31 keeps its exact count when rows add to it.
  {
    const index_t n = 100000, c = 130;
    auto y = random_labels(n, c, 12);
    for (index_t r = 0; r < n; r += 3) std::fill(y.begin() + r * c, y.begin() + (r + 1) * c, std::uint8_t{0});
    const index_t big = (index_t{1} << 31) - 100;
    cobalance::PackedVector zero_key(static_cast<std::size_t>(cobalance::words_for(c)), 0);
    PatternTable seed = PatternTable::from_parts(c, zero_key, {big}, {}, false);
    PatternTableBuilder plain(c, false, 1);
    plain.add_dense(y.data(), n);
    const PatternTable ref = plain.finish();
    const PatternTable expected = cobalance::merge_tables({&seed, &ref});
    index_t zero_rows = 0;
    for (index_t r = 0; r < n; ++r)
      zero_rows += std::all_of(y.begin() + r * c, y.begin() + (r + 1) * c, [](std::uint8_t v) { return v == 0; });
    for (int threads : {1, 2}) {
      PatternTableBuilder b(c, false, threads);
      b.add_table(seed);
      b.add_dense(y.data(), n);
      const PatternTable t = b.finish();
      CHECK(t.packed() == expected.packed());
      CHECK(t.counts() == expected.counts());
      CHECK(t.counts()[0] == big + zero_rows);
    }
  }
  // Label lists over many classes are grouped by their sets before any is packed: two
  // rows over 10^8 classes cost two keys of 1.6M words, not a key per row of a batch
  // (the classes in any order, repeated: the same set).
  {
    const index_t c = 100000000;
    std::vector<index_t> indptr{0, 3, 4, 7, 7}, indices{99999999, 5, 5, 64, 5, 99999999, 5};
    PatternTableBuilder b(c);
    b.add_lists(indptr.data(), 4, indices.data(), 7);
    const PatternTable t = b.finish();
    CHECK(t.n_patterns() == 3 && t.n_samples() == 4);
    CHECK(t.counts() == (std::vector<index_t>{2, 1, 1}));
    CHECK(t.inverse() == (cobalance::InverseVector{0, 1, 0, 2}));
    CHECK(t.has_class(0, 5) && t.has_class(0, 99999999) && !t.has_class(0, 64) && t.has_class(1, 64));
    std::vector<index_t> ptr, ix;
    t.sparse(ptr, ix);
    CHECK(ix == (std::vector<index_t>{5, 99999999, 64}));
    PatternTableBuilder bad(c);
    std::vector<index_t> bad_indices{3, 100000000};
    std::vector<index_t> bad_ptr{0, 1, 2};
    CHECK_INVALID(bad.add_lists(bad_ptr.data(), 2, bad_indices.data(), 2),
                  "class index 100000000 in row 1 is outside [0, n_classes = 100000000)");
    CHECK(bad.n_samples() == 0 && bad.n_patterns() == 0);
  }
  // More classes than a table holds: an error naming n_classes and the limit, before
  // anything is allocated (10^12 classes would take 125 GB per pattern).
  CHECK(cobalance::kMaxClasses == 4294967295LL);
  CHECK_INVALID(PatternTableBuilder(index_t{1000000000000}), "n_classes = 1000000000000 is more than");
  CHECK_INVALID(PatternTableBuilder(cobalance::kMaxClasses + 1), "at most 2^32 - 1 = 4294967295 classes");
  CHECK_INVALID(PatternTableBuilder(cobalance::kMaxClasses + 1), "here 536870912)");
  CHECK_INVALID(PatternTable(index_t{1} << 40), "n_classes = 1099511627776");
  CHECK_INVALID(PatternTable::from_parts(index_t{1} << 33, {}, {}, {}, false), "n_classes = 8589934592");
  PatternTableBuilder at_limit(cobalance::kMaxClasses);
  CHECK(at_limit.n_classes() == cobalance::kMaxClasses);
  // Sample counts past 2^63 - 1: from_parts, merges and builders refuse them, naming
  // the value, and leave the builder as it was.
  {
    const index_t big = index_t{1} << 62;
    CHECK_INVALID(PatternTable::from_parts(70, {1, 0, 2, 0, 3, 0}, {big, big - 1, 2}, {}, false),
                  "counts[2] = 2 would make 9223372036854775807 + 2 samples");
    const PatternTable half = PatternTable::from_parts(70, {1, 0, 2, 0}, {big, big - 1}, {}, false);
    CHECK(half.n_samples() == std::numeric_limits<index_t>::max());
    const PatternTable one = PatternTable::from_parts(70, {4, 0}, {1}, {}, false);
    CHECK_INVALID(cobalance::merge_tables({&half, &one}), "a table of 1 samples would make 9223372036854775807 + 1");
    PatternTableBuilder b(70, false);
    b.add_table(half);
    std::vector<std::uint8_t> row(70, 0);
    CHECK_INVALID(b.add_dense(row.data(), 1), "a batch of 1 rows would make");
    std::vector<index_t> ptr{0, 0};
    CHECK_INVALID(b.add_lists(ptr.data(), 1, nullptr, 0), "a batch of 1 rows would make");
    CHECK(b.n_samples() == half.n_samples());
    PatternTable t = b.finish();
    CHECK(t.counts() == half.counts());
  }
  // Empty input.
  PatternTableBuilder empty(5);
  empty.add_dense(nullptr, 0);
  PatternTable e = empty.finish();
  CHECK(e.n_patterns() == 0 && e.n_samples() == 0);
  std::cout << "test_pattern_table: all checks passed\n";
  return 0;
}
