// Internal to the grouping core (pattern_table.cpp and its headers): the constants
// its layers share, the checks of sizes, and which vector instructions the CPU has.
// Not installed; nothing outside cpp/src includes it.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <limits>
#include <stdexcept>
#include <string>

#include "cobalance/pattern_table.hpp"

namespace cobalance {
inline namespace grouping {

constexpr index_t kDirectMaxClasses = 16;  // 2^16 int32 slots (256 KiB): a direct table fits in L2
constexpr index_t kRowsPerPart = 1 << 15;  // below this, threads cost more than they save
constexpr int kBatch = 16;                 // rows per pipeline stage: the distance of a prefetch
constexpr index_t kBlocksPerThread = 8;    // add_blocks: blocks per thread, taken from a counter
constexpr int kDirectBatch = 256;          // rows packed per call where nothing is prefetched
constexpr index_t kEmpty = -1;

#if defined(__GNUC__) || defined(__clang__)
#define COBALANCE_NOINLINE __attribute__((noinline))
#else
#define COBALANCE_NOINLINE
#endif
constexpr index_t kMaxPatterns = 0x7fffffffLL;  // a pattern id fits a pattern_id_t

// The n_classes a table or builder accepts (see kMaxClasses).
inline void check_n_classes(index_t n_classes) {
  if (n_classes < 1) throw std::invalid_argument("n_classes must be >= 1, got " + std::to_string(n_classes));
  if (n_classes > kMaxClasses)
    throw std::invalid_argument(
        "n_classes = " + std::to_string(n_classes) + " is more than a pattern table holds (at most 2^32 - 1 = " +
        std::to_string(kMaxClasses) + " classes: the balancing problem numbers classes in 32 bits, and each pattern " +
        "takes ceil(n_classes / 64) * 8 bytes, here " + std::to_string(words_for(n_classes) * 8) + ")");
}

// a + b samples (a, b >= 0), or std::invalid_argument naming `what` (the b samples)
// and both numbers where the sum passes 2^63 - 1: counts and sample numbers are int64.
inline index_t add_samples(index_t a, index_t b, const std::string& what) {
  if (b > std::numeric_limits<index_t>::max() - a)
    throw std::invalid_argument(what + " would make " + std::to_string(a) + " + " + std::to_string(b) +
                                " samples, more than a table counts (2^63 - 1)");
  return a + b;
}

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#define COBALANCE_X86_AVX512 1
// COBALANCE_NO_AVX512 (any value) selects the portable paths on an AVX-512 machine, so
// that the tests also cover what CPUs without it run.
inline bool cpu_has_avx512bw() noexcept {
  static const bool yes = std::getenv("COBALANCE_NO_AVX512") == nullptr && __builtin_cpu_supports("avx512f") &&
                          __builtin_cpu_supports("avx512bw");
  return yes;
}
// COBALANCE_NO_AVX2 (any value) likewise selects the SSE2 packing where AVX2 is there.
inline bool cpu_has_avx2() noexcept {
  static const bool yes = std::getenv("COBALANCE_NO_AVX2") == nullptr && __builtin_cpu_supports("avx2");
  return yes;
}
#endif

}  // namespace grouping
}  // namespace cobalance
