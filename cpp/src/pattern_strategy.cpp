// The tests' switch of pattern_strategy.hpp, and which path the last batch took.
#include "pattern_strategy.hpp"

#include <atomic>

#include "pattern_common.hpp"

namespace cobalance {
namespace detail {
namespace {

// Atomics, relaxed: builders on several threads read them at each batch, and a test
// sets them between batches; nothing else is ordered by them.
std::atomic<int> g_insertion{0}, g_packer{0}, g_last_insertion{0}, g_last_packer{0};
std::atomic<bool> g_hashed_index{false};
std::atomic<std::int64_t> g_rows_per_thread{0};

}  // namespace

void force_paths(const ForcedPaths& paths) noexcept {
  g_insertion.store(static_cast<int>(paths.insertion), std::memory_order_relaxed);
  g_packer.store(static_cast<int>(paths.packer), std::memory_order_relaxed);
  g_hashed_index.store(paths.hashed_index, std::memory_order_relaxed);
  g_rows_per_thread.store(paths.rows_per_thread, std::memory_order_relaxed);
}

ForcedPaths forced_paths() noexcept {
  ForcedPaths p;
  p.insertion = static_cast<Insertion>(g_insertion.load(std::memory_order_relaxed));
  p.packer = static_cast<DensePacker>(g_packer.load(std::memory_order_relaxed));
  p.hashed_index = g_hashed_index.load(std::memory_order_relaxed);
  p.rows_per_thread = g_rows_per_thread.load(std::memory_order_relaxed);
  return p;
}

bool insertion_applies(Insertion strategy, std::int64_t n_classes, bool hashed_index) noexcept {
  const bool hashed = hashed_index || n_classes > kDirectMaxClasses;
  switch (strategy) {
    case Insertion::pipelined: return hashed;
    case Insertion::partitioned: return hashed && words_for(n_classes) > 1;
    default: return true;
  }
}

bool dense_packer_available(DensePacker packer, std::int64_t n_classes) noexcept {
  switch (packer) {
    case DensePacker::automatic:
    case DensePacker::exact:
      return true;
#if defined(__SSE2__)
    case DensePacker::small_sse2: return n_classes <= 16;
    case DensePacker::sse2: return true;
#endif
#if defined(COBALANCE_X86_AVX512)
    case DensePacker::small_avx512: return n_classes <= kDirectMaxClasses && cpu_has_avx512bw();
    case DensePacker::avx512: return cpu_has_avx512bw();
    case DensePacker::avx2: return cpu_has_avx2();
#endif
    default: return false;
  }
}

Insertion last_insertion() noexcept { return static_cast<Insertion>(g_last_insertion.load(std::memory_order_relaxed)); }
DensePacker last_dense_packer() noexcept {
  return static_cast<DensePacker>(g_last_packer.load(std::memory_order_relaxed));
}
void note_insertion(Insertion strategy) noexcept {
  g_last_insertion.store(static_cast<int>(strategy), std::memory_order_relaxed);
}
void note_dense_packer(DensePacker packer) noexcept {
  g_last_packer.store(static_cast<int>(packer), std::memory_order_relaxed);
}

}  // namespace detail
}  // namespace cobalance
