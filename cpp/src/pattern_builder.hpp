// Internal to the grouping core: the builder's state and the choice, per batch, of
// the strategy that groups it (add_rows; the map is in pattern_strategy.hpp). The
// strategies themselves are in pattern_insert_*.hpp, included at the end.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <exception>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "cobalance/interrupt.hpp"
#include "cobalance/parallel.hpp"
#include "cobalance/pattern_table.hpp"
#include "pattern_common.hpp"
#include "pattern_index.hpp"
#include "pattern_memory.hpp"
#include "pattern_strategy.hpp"

namespace cobalance {
inline namespace grouping {


// With an interrupt check, a batch of more than kSliceBytes of input (and more than
// kSliceMinRows rows) is grouped in slices of rows, the check polled between them. The
// first slice holds kSliceBytes; the next ones are sized from the time the last took,
// to about kSliceSeconds each (at most 4x the last). Each slice costs a batch's fixed
// work (the blocks' counters over the patterns known so far, the threads' start), tens
// of milliseconds with 10^5 patterns, so slices are kept long next to it while a stop
// still comes within about kSliceSeconds.
constexpr index_t kSliceBytes = index_t{1} << 28;
constexpr index_t kSliceMinRows = index_t{1} << 20;
constexpr double kSliceSeconds = 0.5;

// Rows of the first slice for rows of `row_bytes` bytes; COBALANCE_TEST_SLICE_ROWS=n
// (for tests) makes every slice n rows, so that small batches run in several slices.
inline index_t forced_slice_rows() {
  static const index_t forced = [] {
    const char* v = std::getenv("COBALANCE_TEST_SLICE_ROWS");
    return v ? std::max<index_t>(0, std::atoll(v)) : 0;
  }();
  return forced;
}
inline index_t first_slice_rows(index_t row_bytes) {
  const index_t forced = forced_slice_rows();
  return forced > 0 ? forced : std::max(kSliceMinRows, kSliceBytes / std::max<index_t>(1, row_bytes));
}
// The rows of the slice after one of `rows` rows that took `seconds`.
inline index_t next_slice_rows(index_t rows, double seconds) {
  if (forced_slice_rows() > 0) return rows;
  const double fitted = static_cast<double>(rows) * kSliceSeconds / std::max(seconds, 1e-6);
  return std::max(kSliceMinRows, static_cast<index_t>(std::min(fitted, 4.0 * static_cast<double>(rows))));
}

}  // namespace grouping

struct PatternTableBuilder::State {
  State(index_t c, bool keep, int threads)
      : n_classes(c), keep_inverse(keep), n_threads(threads), index(c) {}
  index_t n_classes;
  bool keep_inverse;
  int n_threads;
  index_t n_samples = 0;
  index_t expected_samples = 0;  // expect_samples(): 0 = not known
  index_t rows_after_slice = 0;  // rows of the batch after the slice being added
  PatternIndex index;  // patterns so far, with their counts
  InverseVector inverse;
  InterruptCheck interrupt;  // set_interrupt_check(); empty: never polled

  // add_rows, polling the interrupt check (when there is one) first and, for a batch of
  // more than a slice (see kSliceBytes; row_bytes: the input per row), between slices of
  // rows. The slices depend on timing, the result does not: slices give the table of
  // the whole batch (it does not depend on batch boundaries). Each slice knows the
  // rows of the batch after it (rows_after_slice), so that the first sizes the hash
  // table for the whole batch as add_rows would, and the later ones find it sized
  // (grown slice by slice, the table was laid out again at each slice, which cost
  // C=300 grouping 1.3-2.5x; see benchmarks/README.md). A slice that throws, or an
  // interruption between slices, takes the earlier slices back out (take_back): the
  // builder is left as it was.
  template <class Pack>
  void add_rows_checked(index_t n_rows, index_t row_bytes, const Pack& pack) {
    InterruptPoller poller(interrupt);
    poller.poll();
    index_t slice = first_slice_rows(row_bytes);
    if (!poller.active() || n_rows <= slice) {
      add_rows(n_rows, pack);
      return;
    }
    add_samples(n_samples, n_rows, "a batch of " + std::to_string(n_rows) + " rows");
    const index_t samples0 = n_samples, k0 = index.size();
    const std::size_t inverse0 = inverse.size();
    index_t done = 0;
    try {
      // The inverse's room for the whole batch at once, as add_rows would take it: grown
      // slice by slice, it would be copied and its pages faulted in again each time.
      if (keep_inverse) {
        grow_inverse(n_rows);
        inverse.resize(inverse0);
      }
      while (done < n_rows) {
        if (done > 0) poller.poll();
        // A last slice shorter than half a slice joins this one.
        const index_t n = n_rows - done < slice + slice / 2 ? n_rows - done : slice;
        const auto start = std::chrono::steady_clock::now();
        rows_after_slice = n_rows - done - n;
        add_rows(n, [pack, done](index_t r, int m, std::uint64_t* keys) { pack(done + r, m, keys); });
        rows_after_slice = 0;
        done += n;
        slice = next_slice_rows(n, std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
      }
    } catch (...) {
      rows_after_slice = 0;
      take_back(samples0, k0, inverse0, done, pack);
      throw;
    }
  }

  // Undoes the first `done` rows of a batch that was added in slices (the builder had
  // samples0 samples, k0 patterns and inverse0 inverse entries before it). An empty
  // builder is simply emptied again; otherwise the rows' counts are taken back one by
  // one (their keys are valid, so packing them again cannot throw).
  template <class Pack>
  void take_back(index_t samples0, index_t k0, std::size_t inverse0, index_t done, const Pack& pack) {
    if (samples0 == 0 && k0 == 0) {
      index = PatternIndex(n_classes, index.direct());
    } else {
      index.sync();
      undo_prefix(k0, done, pack);
    }
    inverse.resize(inverse0);
    n_samples = samples0;
  }


  // Groups rows [0, n_rows) of one batch. pack(r, n, keys) writes the packed keys of
  // rows [r, r + n) (n <= kDirectBatch) into keys (n x n_words words) and throws
  // std::invalid_argument naming the first bad row among them.
  //
  // Determinism: a prefix of the batch is resolved on one thread straight into the
  // global index, so its ids are final; with one thread the prefix is the whole
  // batch. The rest goes by one of the strategies of pattern_strategy.hpp, each of
  // which gives the ids of one sequential pass. Nothing depends on timing or on the
  // number of threads.
  template <class Pack>
  void add_rows(index_t n_rows, const Pack& pack) {
    using detail::Insertion;
    if (n_rows < 0) throw std::invalid_argument("n_rows must be >= 0, got " + std::to_string(n_rows));
    if (n_rows == 0) return;
    add_samples(n_samples, n_rows, "a batch of " + std::to_string(n_rows) + " rows");
    index.sync();
    const detail::ForcedPaths forced = detail::forced_paths();
    const Insertion force = forced.insertion;
    if (force != Insertion::automatic && !detail::insertion_applies(force, n_classes, !index.direct()))
      throw std::logic_error("the insertion strategy forced by the tests does not apply to this index");
    const int parts =
        parts_for(n_rows, n_threads, forced.rows_per_thread > 0 ? forced.rows_per_thread : kRowsPerPart);
    // The prefix takes the frequent patterns into the global index, so that most
    // rows of the blocks resolve to final ids; it is short because one thread runs it.
    index_t prefix =
        parts == 1 ? n_rows : std::min(n_rows, std::max<index_t>(4096, n_rows / (16 * static_cast<index_t>(parts))));
    const std::size_t old_size = inverse.size();
    pattern_id_t* inv = keep_inverse ? grow_inverse(n_rows) : nullptr;
    const index_t k0 = index.size();
    index_t done = 0;  // rows of the prefix counted in `index`
    try {
      // The first rows (the probe) run in two halves: how the number of patterns
      // grows from one to the other sizes the hash table for the whole batch,
      // instead of doubling it step by step. When they show many new patterns, the
      // table is built directly (below) and the rest of the prefix would only keep
      // the other threads waiting.
      const index_t probe = std::min(prefix, std::max<index_t>(4096, n_rows / 128));
      if (parts == 1 && force != Insertion::automatic && force != Insertion::serial) prefix = probe;
      insert_rows(0, probe / 2, pack, inv, done);
      const index_t k_half = index.size();
      insert_rows(probe / 2, probe, pack, inv, done);
      // With expect_samples(), the estimate reaches over the rows still to come, so
      // that a stream's table is sized once instead of growing with each batch. Its
      // growth is capped at 8x the batch's own estimate, so that a short first batch
      // or a wrong hint cannot reserve a table far beyond the batch's.
      const index_t batch_rows = n_rows + rows_after_slice;
      index_t expected = probe < n_rows ? presize(k0, k_half, probe, batch_rows) : 0;
      if (expected > 0 && expected_samples - n_samples > batch_rows)
        expected = std::min(presize(k0, k_half, probe, expected_samples - n_samples), k0 + 8 * (expected - k0));
      if (parts > 1 && probe < prefix) {
        if (!index.direct() && (index.size() - k0) * 32 > probe)
          prefix = probe;
        else
          insert_rows(probe, prefix, pack, inv, done);
      }
      // The inverse's pages past the prefix are populated ahead of the rows that
      // write them (see populate_pages): here, or in add_blocks by one of its threads.
      const auto populate_from = [&](index_t row) {
        if (inv) populate_pages(inv + row, static_cast<std::size_t>(n_rows - row) * sizeof(pattern_id_t));
      };
      Insertion strategy = force;
      if (strategy == Insertion::automatic && parts == 1) {
        strategy = expected > 0 && fits_partitioned(n_rows - probe, 1) ? Insertion::partitioned : Insertion::serial;
      } else if (strategy == Insertion::automatic && prefix < n_rows) {
        // Blocks pay off when their local tables stay small: not when the prefix shows
        // many new patterns (merging the blocks' tables would cost about as much as
        // building them), nor when the index already holds many more patterns than a
        // block has rows (a late chunk of a long stream: the blocks' per-pattern
        // counters would outweigh their rows). The partitioned path needs ids and
        // counts that cannot overflow within the batch.
        const index_t new_in_prefix = index.size() - k0;
        const index_t block_rows = (n_rows - prefix) / parts;
        if (!index.direct() && (new_in_prefix * 32 > prefix || index.size() > block_rows / 4))
          strategy = fits_partitioned(n_rows - prefix, parts) ? Insertion::partitioned : Insertion::pipelined;
        else
          strategy = Insertion::blocks;
      } else if (strategy == Insertion::partitioned && !fits_partitioned(n_rows - (parts == 1 ? probe : prefix), parts)) {
        throw std::logic_error("the partitioned strategy forced by the tests cannot take this batch");
      }
      if (strategy == Insertion::automatic) strategy = Insertion::serial;  // the prefix was the whole batch
      const index_t from = parts == 1 ? probe : prefix;
      switch (strategy) {
        case Insertion::serial:
          if (from < n_rows) {
            index.reserve(slots_for(expected));
            populate_from(from);
            insert_rows(from, n_rows, pack, inv, done);
          }
          break;
        case Insertion::partitioned:
          insert_rows_partitioned(from, n_rows, parts, expected, pack, inv, done);
          break;
        case Insertion::pipelined:
          reserve_populated(slots_for(expected), parts, inv, from, n_rows);
          insert_rows_pipelined(from, n_rows, std::max(parts, 2), pack, inv, done);
          break;
        case Insertion::blocks:
          add_blocks(from, n_rows, parts, pack, inv);
          break;
        case Insertion::automatic:
          break;
      }
      detail::note_insertion(strategy);
    } catch (...) {
      undo_prefix(k0, done, pack);
      inverse.resize(old_size);
      throw;
    }
    n_samples += n_rows;
  }

  // The strategies (pattern_insert_*.hpp). Each groups rows [begin, end) of the batch
  // after the prefix, writes their inverse entries to inv (when not null) and keeps
  // `done` at the rows counted in the index, for undo_prefix should it throw.
  template <class Pack>
  void insert_rows(index_t begin, index_t end, const Pack& pack, pattern_id_t* inv, index_t& done);
  template <class Pack>
  void insert_rows_pipelined(index_t begin, index_t end, int parts, const Pack& pack, pattern_id_t* inv,
                             index_t& done);
  template <class Pack>
  void insert_rows_partitioned(index_t begin, index_t end, int parts, index_t expected, const Pack& pack,
                               pattern_id_t* inv, index_t& done);
  // add_blocks counts rows in `index` only once all its blocks succeeded.
  template <class Pack>
  void add_blocks(index_t begin, index_t end, int parts, const Pack& pack, pattern_id_t* inv);

 private:
  // The patterns expected after the next n_rows rows (this batch, or all the rows
  // still expected; 0: too few new ones to size the table for), from those found in
  // the batch's first `probe` rows (k0 before, k_half after the first half): new
  // patterns taken to grow like rows^b (b from the two halves, at most 1), capped
  // by one per row. The callers reserve slots_for(it), so that the estimate fills
  // at most 60 % of the table. Only speed depends on the estimate.
  index_t presize(index_t k0, index_t k_half, index_t probe, index_t n_rows) {
    const index_t new1 = k_half - k0, new2 = index.size() - k0;
    if (index.direct() || new2 * 32 <= probe) return 0;  // few new patterns: nothing to gain
    double b = 1.0;
    if (new1 > 0 && new2 > new1) b = std::min(1.0, std::log2(static_cast<double>(new2) / static_cast<double>(new1)));
    const double grown = static_cast<double>(new2) * std::pow(static_cast<double>(n_rows) / static_cast<double>(probe), b);
    const double expected = static_cast<double>(k0) + std::min(grown, static_cast<double>(n_rows));
    return static_cast<index_t>(expected);
  }

  // Whether n_rows more rows can take insert_rows_partitioned on `parts` threads:
  // keys of several words, and ids and slot counts that cannot overflow within the
  // rows (provisional ids reach past the final ones by at most a chunk's rows times
  // the threads). make_count_room may first move the slots' counts aside.
  bool fits_partitioned(index_t n_rows, int parts) {
    const index_t margin = 2048 * index_t{parts} * parts;
    return !index.direct() && index.n_words() > 1 && index.size() + n_rows + margin <= kMaxPatterns &&
           index.make_count_room(n_rows);
  }

  // The patterns to reserve slots for when `expected` are expected: the table then
  // has at least expected / 0.6 slots.
  static index_t slots_for(index_t expected) noexcept { return static_cast<index_t>(static_cast<double>(expected) / 1.2); }

  // index.reserve(n_patterns), then the inverse's pages for rows [from, n_rows)
  // populated (see populate_pages), both on `parts` threads that each populate
  // their own 2 MiB units of the new table and of the inverse (see populate_part).
  void reserve_populated(index_t n_patterns, int parts, pattern_id_t* inv, index_t from, index_t n_rows) {
    const std::size_t inv_bytes = static_cast<std::size_t>(n_rows - from) * sizeof(pattern_id_t);
    const std::size_t P = static_cast<std::size_t>(parts);
    if (index.slots_needed(n_patterns) <= index.slot_count()) {
      index.reserve(n_patterns);  // the keys' room only
      run_parts(parts, [&](int t) {
        if (inv) populate_part(inv + from, inv_bytes, static_cast<std::size_t>(t), P);
      });
      return;
    }
    PatternIndex::Regrid regrid = index.begin_regrid(n_patterns, n_patterns, index.region_bits());
    run_parts(parts, [&](int t) {
      PatternIndex::populate_regrid(regrid, static_cast<std::size_t>(t), P);
      if (inv) populate_part(inv + from, inv_bytes, static_cast<std::size_t>(t), P);
    });
    index.fill_regrid(regrid);
    index.end_regrid(regrid);
  }

  // Room for n_rows more inverse entries; returns where they start. Large buffers
  // are advised onto huge pages before their first touch (fewer page faults).
  pattern_id_t* grow_inverse(index_t n_rows) {
    const std::size_t old_size = inverse.size(), need = old_size + static_cast<std::size_t>(n_rows);
    if (need > inverse.capacity()) {
      inverse.reserve(std::max(need, 2 * old_size));
      advise_huge_pages(inverse.data() + old_size, (inverse.capacity() - old_size) * sizeof(pattern_id_t));
    }
    inverse.resize(need);
    return inverse.data() + old_size;
  }


  // Per-thread buffers of one pipeline stage: kBatch rows' keys, hashes and ids.
  struct Stage {
    explicit Stage(index_t nw) : keys(static_cast<std::size_t>(kBatch * nw)) {}
    std::vector<std::uint64_t> keys;
    std::uint64_t hash[kBatch];
    index_t id[kBatch];
    index_t row = 0;
    int n = 0;
  };
  // Undoes the counts and patterns of the first `done` rows (their keys are valid,
  // so packing them again cannot throw).
  template <class Pack>
  void undo_prefix(index_t k0, index_t done, const Pack& pack) {
    const index_t nw = index.n_words();
    Stage st(nw);
    for (index_t r = 0; r < done; r += kBatch) {
      const int n = static_cast<int>(std::min<index_t>(kBatch, done - r));
      pack(r, n, st.keys.data());
      for (int i = 0; i < n; ++i) {
        const std::uint64_t* key = st.keys.data() + i * nw;
        index.add(key, -1);
      }
    }
    index.truncate(k0);
  }

};

}  // namespace cobalance

#include "pattern_insert_serial.hpp"
#include "pattern_insert_pipelined.hpp"
#include "pattern_insert_partitioned.hpp"
#include "pattern_insert_blocks.hpp"
