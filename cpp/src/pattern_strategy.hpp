// Internal to the grouping core: which path groups a batch, and a switch for the C++
// tests to force each one (never set by the library itself, not installed, not bound
// to Python). Every path gives the same table - patterns, their order, counts and
// inverse - so forcing one changes only speed; the tests compare each against a
// brute-force reference.
//
// The map of the builder's paths (PatternTableBuilder::State::add_rows in
// pattern_builder.hpp picks; the index layout is fixed per builder):
//
//   index layout (PatternIndex)
//     direct   n_classes <= 16: a table of 2^n_classes ids, no hashing or probing.
//     hashed   otherwise: open addressing over 16-byte slots (tag, id, count).
//
//   every batch: a probe of its first rows (at least 4096) is inserted on the calling
//   thread; how the patterns grew over its two halves estimates the batch's patterns
//   (presize), and with several threads a prefix (1/16 of a thread's rows) follows.
//   Then the rest of the batch by:
//
//   strategy    | taken when                                 | why
//   ------------+--------------------------------------------+---------------------------
//   serial      | one thread (under 2 x 2^15 rows, or         | nothing to share out; two
//               | n_threads = 1), unless partitioned applies  | pipeline stages overlap
//               |                                             | the probes' cache misses
//   blocks      | threads > 1 and few new patterns: the       | blocks only read the shared
//               | direct layout, or the prefix found at most  | index; their small local
//               | 1 new per 32 rows and the index holds at    | tables are cheap to number
//               | most a block's rows / 4                     | in order of first rows
//   pipelined   | hashed, threads > 1, many new patterns,     | a one-word probe compares
//               | keys of one word (n_classes <= 64), or      | the key in the slot: one
//               | wider keys whose ids or counts could pass   | inserting thread is as fast
//               | 2^31 within the batch                       | as several; the rest pack
//   partitioned | hashed, keys of several words, many new     | a wide probe also fetches
//               | patterns, any number of threads (on one,    | the stored key: threads own
//               | final ids are matched by hash and checked   | regions of the index and
//               | afterwards, in a loop whose reads overlap)  | insert at once, new ids
//               |                                             | fixed per chunk
//
//   Files: pattern_insert_serial.hpp, _blocks.hpp, _pipelined.hpp, _partitioned.hpp.
//
//   "many new patterns": the probe found more than 1 new pattern per 32 rows, or the
//   index already holds more patterns than a block has rows / 4 (a late batch of a
//   long stream, where blocks' per-pattern counters would outweigh their rows).
//
// Input side: dense rows go through one of the packers of pattern_packers.hpp;
// packed rows are copied; label lists are packed per row up to 64 words per key, and
// beyond are grouped by their sets of classes first (ListSets in pattern_lists.hpp;
// COBALANCE_TEST_LISTS=sets|packed forces either); tables are merged pattern by
// pattern (add_table). A batch with an interrupt check runs in slices (see
// pattern_builder.hpp), each slice a batch as above.
#pragma once

#include <cstdint>

namespace cobalance {
namespace detail {

// The insertion strategies of the table above; automatic: the table's choice.
enum class Insertion { automatic, serial, blocks, pipelined, partitioned };
// The packers of pattern_packers.hpp; automatic: the selector's choice.
enum class DensePacker { automatic, small_avx512, small_sse2, avx512, avx2, sse2, exact };

// What the tests force. Set it before building and reset it (ForcedPaths{}) after;
// builders read it at each batch.
struct ForcedPaths {
  Insertion insertion = Insertion::automatic;
  DensePacker packer = DensePacker::automatic;
  bool hashed_index = false;          // the hashed layout also for n_classes <= 16
  std::int64_t rows_per_thread = 0;   // > 0: threads from this many rows each (default 2^15)
};
void force_paths(const ForcedPaths& paths) noexcept;
ForcedPaths forced_paths() noexcept;

// Whether `strategy` can group rows of `n_classes` classes with the index layout
// given: pipelined needs the hashed layout, partitioned also keys of several words.
// A forced strategy that cannot is std::logic_error at the batch.
bool insertion_applies(Insertion strategy, std::int64_t n_classes, bool hashed_index) noexcept;
// Whether this build and CPU have `packer` for rows of `n_classes` classes. A forced
// packer that is not available is std::logic_error at the batch.
bool dense_packer_available(DensePacker packer, std::int64_t n_classes) noexcept;

// The paths the last batch took (for tests to confirm a force took effect).
Insertion last_insertion() noexcept;
DensePacker last_dense_packer() noexcept;
void note_insertion(Insertion strategy) noexcept;
void note_dense_packer(DensePacker packer) noexcept;

}  // namespace detail
}  // namespace cobalance
