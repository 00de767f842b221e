// The grouping core's public side: PatternTable, and PatternTableBuilder's batches of
// each input form handed to the builder (pattern_builder.hpp), which picks the path
// that groups them (the map is in pattern_strategy.hpp).
#include "cobalance/pattern_table.hpp"

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "pattern_builder.hpp"
#include "pattern_common.hpp"
#include "pattern_index.hpp"
#include "pattern_lists.hpp"
#include "pattern_memory.hpp"
#include "pattern_packers.hpp"
#include "pattern_strategy.hpp"

namespace cobalance {

int resolve_threads(int n_threads) noexcept {
  if (n_threads > 0) return n_threads;
  const unsigned hw = std::thread::hardware_concurrency();
  return hw == 0 ? 1 : static_cast<int>(hw);
}

// ---------------------------------------------------------------------------
// PatternTable

PatternTable::PatternTable() = default;
PatternTable::PatternTable(index_t n_classes) : n_classes_(n_classes) { check_n_classes(n_classes); }
PatternTable::PatternTable(const PatternTable&) = default;
PatternTable::PatternTable(PatternTable&&) noexcept = default;
PatternTable& PatternTable::operator=(const PatternTable&) = default;
PatternTable& PatternTable::operator=(PatternTable&&) noexcept = default;
PatternTable::~PatternTable() = default;

std::vector<std::uint8_t> PatternTable::dense() const {
  const index_t k = n_patterns(), c = n_classes_;
  std::vector<std::uint8_t> out(static_cast<std::size_t>(k * c));
  for (index_t j = 0; j < k; ++j)
    for (index_t i = 0; i < c; ++i) out[static_cast<std::size_t>(j * c + i)] = has_class(j, i);
  return out;
}

void PatternTable::sparse(std::vector<index_t>& indptr, std::vector<index_t>& indices) const {
  const index_t k = n_patterns(), nw = n_words();
  indptr.assign(static_cast<std::size_t>(k) + 1, 0);
  indices.clear();
  for (index_t j = 0; j < k; ++j) {
    for (index_t w = 0; w < nw; ++w) {
      std::uint64_t bits = packed_[static_cast<std::size_t>(j * nw + w)];
      while (bits) {
        const int b = __builtin_ctzll(bits);
        indices.push_back(w * 64 + b);
        bits &= bits - 1;
      }
    }
    indptr[static_cast<std::size_t>(j) + 1] = static_cast<index_t>(indices.size());
  }
}

std::vector<index_t> PatternTable::class_counts() const {
  std::vector<index_t> out(static_cast<std::size_t>(n_classes_), 0);
  const index_t nw = n_words();
  for (index_t j = 0; j < n_patterns(); ++j) {
    for (index_t w = 0; w < nw; ++w) {
      std::uint64_t bits = packed_[static_cast<std::size_t>(j * nw + w)];
      while (bits) {
        out[static_cast<std::size_t>(w * 64 + __builtin_ctzll(bits))] += counts_[static_cast<std::size_t>(j)];
        bits &= bits - 1;
      }
    }
  }
  return out;
}

namespace {

// Bits at or beyond n_classes in the last word of a packed row.
inline std::uint64_t tail_mask(index_t n_classes) noexcept {
  const index_t r = n_classes & 63;
  return r == 0 ? 0 : ~((std::uint64_t{1} << r) - 1);
}

}  // namespace

PatternTable PatternTable::from_parts(index_t n_classes, PackedVector packed,
                                      std::vector<index_t> counts, InverseVector inverse,
                                      bool has_inverse) {
  PatternTable t(n_classes);
  const index_t nw = t.n_words();
  const index_t k = static_cast<index_t>(counts.size());
  if (static_cast<index_t>(packed.size()) != k * nw)
    throw std::invalid_argument("packed patterns must hold n_patterns * n_words = " +
                                std::to_string(k * nw) + " words, got " +
                                std::to_string(packed.size()));
  const std::uint64_t tail = tail_mask(n_classes);
  PatternIndex index(n_classes);
  index_t total = 0;
  for (index_t j = 0; j < k; ++j) {
    const std::uint64_t* key = packed.data() + j * nw;
    if (key[nw - 1] & tail)
      throw std::invalid_argument("pattern " + std::to_string(j) + " has a class >= n_classes = " +
                                  std::to_string(n_classes));
    if (index.add(key, 0) != j)
      throw std::invalid_argument("pattern " + std::to_string(j) + " is a duplicate of an earlier pattern");
    if (counts[static_cast<std::size_t>(j)] < 1)
      throw std::invalid_argument("counts[" + std::to_string(j) + "] must be >= 1, got " +
                                  std::to_string(counts[static_cast<std::size_t>(j)]));
    if (counts[static_cast<std::size_t>(j)] > std::numeric_limits<index_t>::max() - total)
      add_samples(total, counts[static_cast<std::size_t>(j)],
                  "counts[" + std::to_string(j) + "] = " + std::to_string(counts[static_cast<std::size_t>(j)]));
    total += counts[static_cast<std::size_t>(j)];
  }
  if (has_inverse) {
    if (static_cast<index_t>(inverse.size()) != total)
      throw std::invalid_argument("inverse must have sum(counts) = " + std::to_string(total) +
                                  " entries, got " + std::to_string(inverse.size()));
    std::vector<index_t> seen(static_cast<std::size_t>(k), 0);
    for (std::size_t r = 0; r < inverse.size(); ++r) {
      const index_t v = inverse[r];
      if (v < 0 || v >= k)
        throw std::invalid_argument("inverse[" + std::to_string(r) + "] = " + std::to_string(v) +
                                    " is not a pattern index in [0, " + std::to_string(k) + ")");
      ++seen[static_cast<std::size_t>(v)];
    }
    if (seen != counts) throw std::invalid_argument("counts do not match the inverse (bincount(inverse) != counts)");
  } else if (!inverse.empty()) {
    throw std::invalid_argument("inverse given but has_inverse is false");
  }
  t.n_samples_ = total;
  t.has_inverse_ = has_inverse;
  t.packed_ = std::move(packed);
  t.counts_ = std::move(counts);
  t.inverse_ = std::move(inverse);
  return t;
}

PatternTableBuilder::PatternTableBuilder(index_t n_classes, bool keep_inverse, int n_threads) {
  check_n_classes(n_classes);
  state_ = std::make_unique<State>(n_classes, keep_inverse, n_threads);
}
PatternTableBuilder::PatternTableBuilder(PatternTableBuilder&&) noexcept = default;
PatternTableBuilder& PatternTableBuilder::operator=(PatternTableBuilder&&) noexcept = default;
PatternTableBuilder::~PatternTableBuilder() = default;

index_t PatternTableBuilder::n_classes() const noexcept { return state_->n_classes; }
index_t PatternTableBuilder::n_samples() const noexcept { return state_->n_samples; }
index_t PatternTableBuilder::n_patterns() const noexcept { return state_->index.size(); }

void PatternTableBuilder::expect_samples(index_t n_total) {
  if (n_total < 0) throw std::invalid_argument("expect_samples: n_total must be >= 0, got " + std::to_string(n_total));
  state_->expected_samples = n_total;
}

void PatternTableBuilder::add_dense(const std::uint8_t* data, index_t n_rows) {
  State& s = *state_;
  const index_t c = s.n_classes, nw = words_for(c);
  const index_t row0 = s.n_samples;
  if (n_rows > 0 && data == nullptr) throw std::invalid_argument("dense labels: null data pointer");
  // The masks of the row's bytes in each of its `width`-byte chunks, and the rows
  // whose chunk loads stay inside the buffer (the last few are packed exactly).
  const auto chunk_masks = [c](index_t width) {
    std::vector<std::uint32_t> masks(static_cast<std::size_t>((c + width - 1) / width));
    for (std::size_t k = 0; k < masks.size(); ++k) {
      const index_t len = std::min<index_t>(width, c - width * static_cast<index_t>(k));
      masks[k] = len == 32 ? 0xffffffffu : (std::uint32_t{1} << len) - 1u;
    }
    return masks;
  };
  const auto rows_in_buffer = [c, n_rows](index_t width) {
    const index_t overread = (c + width - 1) / width * width - c;
    return std::max<index_t>(0, n_rows - (overread + c - 1) / c);
  };
  auto report = [&](index_t r, int n) {
    for (index_t rr = r; rr < r + n; ++rr)
      for (index_t j = 0; j < c; ++j)
        if (data[rr * c + j] > 1) bad_dense_value(row0 + rr, j, data[rr * c + j]);
  };
  // Rows `width` bytes per load by pack_row where the loads stay inside the buffer,
  // exactly otherwise (width 0: every row exactly).
  const auto add_wide = [&](index_t width, auto pack_row) {
    const std::vector<std::uint32_t> valid = width > 0 ? chunk_masks(width) : std::vector<std::uint32_t>();
    const index_t n_chunks = static_cast<index_t>(valid.size()), wide_rows = width > 0 ? rows_in_buffer(width) : 0;
    s.add_rows_checked(n_rows, c, [&report, &valid, pack_row, data, c, nw, n_chunks, wide_rows](index_t r, int n,
                                                                                     std::uint64_t* keys) {
      std::uint64_t bad = 0;
      for (int i = 0; i < n; ++i) {
        const std::uint8_t* row = data + (r + i) * c;
        prefetch_row_ahead(row, c);
        if (r + i < wide_rows) {
          bad |= pack_row(row, n_chunks, valid.data(), keys + i * nw);
        } else {
          bad |= pack_row_exact(row, c, nw, keys + i * nw);
        }
      }
      if (bad) report(r, n);
    });
  };
  using detail::DensePacker;
  const DensePacker packer = choose_dense_packer(c);
  detail::note_dense_packer(packer);
  switch (packer) {
#if defined(COBALANCE_PACK_AVX512)
    case DensePacker::small_avx512:
      s.add_rows_checked(n_rows, c, [&report, data, c](index_t r, int n, std::uint64_t* keys) {
        if (pack_small_rows_avx512(data + r * c, c, n, keys)) report(r, n);
      });
      return;
    case DensePacker::avx512:
      s.add_rows_checked(n_rows, c, [&report, data, c, nw](index_t r, int n, std::uint64_t* keys) {
        if (pack_rows_avx512(data + r * c, c, nw, n, keys)) report(r, n);
      });
      return;
    case DensePacker::avx2:
      add_wide(32, [](auto... a) { return pack_row_avx2(a...); });
      return;
#endif
#if defined(__SSE2__)
    case DensePacker::small_sse2: {
      const unsigned mask = chunk_masks(16)[0];
      const index_t wide_rows = rows_in_buffer(16);
      s.add_rows_checked(n_rows, c, [&report, data, c, wide_rows, mask](index_t r, int n, std::uint64_t* keys) {
        if (pack_small_rows_sse2(data, r, n, c, wide_rows, mask, keys)) report(r, n);
      });
      return;
    }
    case DensePacker::sse2:
      add_wide(16, [](auto... a) { return pack_row_sse2(a...); });
      return;
#endif
    default:  // exact; choose_dense_packer returns only packers this build has
      add_wide(0, [](auto...) { return 0u; });
      return;
  }
}

void PatternTableBuilder::add_packed(const std::uint64_t* words, index_t n_rows) {
  State& s = *state_;
  const index_t nw = words_for(s.n_classes);
  const std::uint64_t tail = tail_mask(s.n_classes);
  const index_t row0 = s.n_samples;
  if (n_rows > 0 && words == nullptr) throw std::invalid_argument("packed labels: null data pointer");
  s.add_rows_checked(n_rows, nw * 8, [&](index_t r, int n, std::uint64_t* keys) {
    const std::size_t bytes = static_cast<std::size_t>(n * nw) * sizeof(std::uint64_t);
    const char* from = reinterpret_cast<const char*>(words + r * nw);
    // The next batch's words, as in the dense path: the copy otherwise waits on memory.
    for (std::size_t b = 0; b < bytes; b += 64) prefetch_slot(from + bytes + b);
    std::memcpy(keys, from, bytes);
    std::uint64_t bad = 0;  // one test per batch; the row is looked for only when it fails
    for (int i = 0; i < n; ++i) bad |= keys[(i + 1) * nw - 1];
    if (!(bad & tail)) return;
    for (int i = 0; i < n; ++i)
      if (keys[(i + 1) * nw - 1] & tail)
        throw std::invalid_argument("packed row " + std::to_string(row0 + r + i) +
                                    " has bits set at or beyond n_classes = " + std::to_string(s.n_classes));
  });
}



void PatternTableBuilder::add_lists(const index_t* indptr, index_t n_rows, const index_t* indices,
                                    index_t nnz) {
  State& s = *state_;
  const index_t c = s.n_classes, nw = words_for(c);
  const index_t row0 = s.n_samples;
  if (n_rows < 0) throw std::invalid_argument("n_rows must be >= 0, got " + std::to_string(n_rows));
  if (indptr == nullptr) throw std::invalid_argument("indptr: null data pointer");
  if (nnz > 0 && indices == nullptr) throw std::invalid_argument("indices: null data pointer");
  const index_t base = indptr[0];
  for (index_t r = 0; r < n_rows; ++r) {
    if (indptr[r + 1] < indptr[r])
      throw std::invalid_argument("indptr must be non-decreasing, but indptr[" + std::to_string(r + 1) +
                                  "] = " + std::to_string(indptr[r + 1]) + " < indptr[" +
                                  std::to_string(r) + "] = " + std::to_string(indptr[r]));
  }
  if (indptr[n_rows] - base != nnz)
    throw std::invalid_argument("indptr[-1] - indptr[0] = " + std::to_string(indptr[n_rows] - base) +
                                " does not match len(indices) = " + std::to_string(nnz));
  if (!lists_by_sets(nw)) {
    s.add_rows_checked(n_rows, 8 * (nnz / std::max<index_t>(1, n_rows) + 1), [&](index_t r, int n, std::uint64_t* keys) {
      std::fill(keys, keys + n * nw, std::uint64_t{0});
      for (int i = 0; i < n; ++i) {
        std::uint64_t* key = keys + i * nw;
        for (index_t p = indptr[r + i] - base; p < indptr[r + i + 1] - base; ++p) {
          const index_t cls = indices[p];
          if (cls < 0 || cls >= c) bad_list_class(cls, row0 + r + i, c);
          key[cls >> 6] |= std::uint64_t{1} << (cls & 63);
        }
      }
    });
    return;
  }

  // Many classes: the rows are grouped by their sets first, and only the distinct sets
  // are packed and entered into the index, in order of first occurrence, which gives
  // the ids of a pass row by row. The builder is untouched until the sets enter the
  // index; from there a failure or interruption takes them back out.
  if (n_rows == 0) return;
  add_samples(s.n_samples, n_rows, "a batch of " + std::to_string(n_rows) + " rows");
  InterruptPoller interrupt(s.interrupt);
  constexpr index_t kRowsPerPoll = 4096;
  const std::size_t inverse0 = s.inverse.size();
  // The rows' set numbers go straight into the inverse, rewritten to pattern ids below.
  pattern_id_t* inv = nullptr;
  if (s.keep_inverse) {
    s.inverse.resize(inverse0 + static_cast<std::size_t>(n_rows));
    inv = s.inverse.data() + inverse0;
  }
  s.index.sync();
  const index_t k0 = s.index.size();
  std::vector<index_t> to_global;
  try {
    ListSets sets(c);
    for (index_t r = 0; r < n_rows; ++r) {
      if (r % kRowsPerPoll == 0) interrupt.poll();
      const index_t set = sets.add(indices + (indptr[r] - base), indptr[r + 1] - indptr[r], row0 + r);
      if (inv) inv[r] = static_cast<pattern_id_t>(set);
    }
    to_global.reserve(static_cast<std::size_t>(sets.size()));
    std::vector<std::uint64_t> key(static_cast<std::size_t>(nw), 0);
    try {
      for (index_t j = 0; j < sets.size(); ++j) {
        interrupt.poll();  // a set costs O(n_words) here, far more than a clock read
        for (const index_t* e = sets.begin(j); e != sets.end(j); ++e) key[*e >> 6] |= std::uint64_t{1} << (*e & 63);
        to_global.push_back(s.index.add(key.data(), sets.count(j)));
        for (const index_t* e = sets.begin(j); e != sets.end(j); ++e) key[*e >> 6] = 0;
      }
    } catch (...) {
      for (std::size_t j = 0; j < to_global.size(); ++j)
        s.index.add(s.index.key(to_global[j]), -sets.count(static_cast<index_t>(j)));
      s.index.truncate(k0);
      throw;
    }
  } catch (...) {
    s.inverse.resize(inverse0);
    throw;
  }
  if (inv) {
    const int parts = parts_for(n_rows, s.n_threads, kRowsPerPart);
    const auto bounds = split_range(n_rows, parts);
    run_parts(parts, [&](int t) {
      for (index_t r = bounds[t]; r < bounds[t + 1]; ++r) store_inverse(inv + r, to_global[static_cast<std::size_t>(inv[r])]);
    });
  }
  s.n_samples += n_rows;
}

void PatternTableBuilder::add_table(const PatternTable& table) {
  State& s = *state_;
  if (table.n_classes() != s.n_classes)
    throw std::invalid_argument("cannot merge a table of " + std::to_string(table.n_classes()) +
                                " classes into one of " + std::to_string(s.n_classes));
  if (s.keep_inverse && !table.has_inverse())
    throw std::invalid_argument("cannot merge a table without inverse into a builder that keeps the inverse");
  add_samples(s.n_samples, table.n_samples(), "a table of " + std::to_string(table.n_samples()) + " samples");
  const index_t nw = table.n_words(), k = table.n_patterns();
  InterruptPoller interrupt(s.interrupt);
  interrupt.poll();
  s.index.sync();
  std::vector<index_t> map(static_cast<std::size_t>(k));
  const index_t k0 = s.index.size();
  const std::size_t old_size = s.inverse.size();
  const index_t n = table.n_samples();
  const std::uint64_t* keys = table.packed().data();
  index_t added = 0;  // patterns of `table` counted in the index
  try {
    // Allocated first, so that the loop below fails only past the pattern limit.
    s.index.reserve(s.index.size() + k);
    if (s.keep_inverse) s.inverse.resize(old_size + static_cast<std::size_t>(n));
    constexpr index_t kAhead = 8;
    // Patterns between polls: an add costs about n_words words' hashing and compare.
    const index_t per_poll = std::max<index_t>(1, 4096 / nw);
    for (index_t j = 0; j < std::min(k, kAhead); ++j) s.index.prefetch(s.index.hash(keys + j * nw));
    for (index_t j = 0; j < k; ++j) {
      if (j % per_poll == 0) interrupt.poll();
      if (j + kAhead < k) s.index.prefetch(s.index.hash(keys + (j + kAhead) * nw));
      map[static_cast<std::size_t>(j)] = s.index.add(keys + j * nw, table.counts()[static_cast<std::size_t>(j)]);
      added = j + 1;
    }
  } catch (...) {
    for (index_t j = 0; j < added; ++j) s.index.add(keys + j * nw, -table.counts()[static_cast<std::size_t>(j)]);
    s.index.truncate(k0);
    s.inverse.resize(old_size);
    throw;
  }
  if (s.keep_inverse) {
    pattern_id_t* out = s.inverse.data() + old_size;
    const pattern_id_t* in = table.inverse().data();
    const int parts = parts_for(n, s.n_threads, kRowsPerPart);
    const auto bounds = split_range(n, parts);
    run_parts(parts, [&](int t) {
      for (index_t r = bounds[t]; r < bounds[t + 1]; ++r) store_inverse(out + r, map[static_cast<std::size_t>(in[r])]);
    });
  }
  s.n_samples += table.n_samples();
}

void PatternTableBuilder::set_interrupt_check(InterruptCheck check) { state_->interrupt = std::move(check); }

PatternTable PatternTableBuilder::finish() {
  State& s = *state_;
  PatternTable t(s.n_classes);
  t.n_samples_ = s.n_samples;
  t.has_inverse_ = s.keep_inverse;
  t.counts_ = s.index.counts(s.n_threads);
  t.packed_ = std::move(s.index.keys());
  t.inverse_ = std::move(s.inverse);
  auto fresh = std::make_unique<State>(s.n_classes, s.keep_inverse, s.n_threads);
  fresh->interrupt = std::move(s.interrupt);
  state_ = std::move(fresh);
  return t;
}

PatternTable merge_tables(const std::vector<const PatternTable*>& tables, int n_threads,
                          const InterruptCheck& interrupt) {
  if (tables.empty()) throw std::invalid_argument("merge_tables needs at least one table");
  bool keep = true;
  for (const PatternTable* t : tables) {
    if (t == nullptr) throw std::invalid_argument("merge_tables: null table");
    keep = keep && t->has_inverse();
  }
  PatternTableBuilder builder(tables.front()->n_classes(), keep, n_threads);
  builder.set_interrupt_check(interrupt);
  for (const PatternTable* t : tables) builder.add_table(*t);
  return builder.finish();
}

}  // namespace cobalance
