// Minimal fork-join over contiguous ranges, shared by the core's loops.
#pragma once

#include <algorithm>
#include <cstdint>
#include <exception>
#include <thread>
#include <vector>

namespace cobalance {

// 0 (or negative) means every hardware thread; otherwise the value itself.
int resolve_threads(int n_threads) noexcept;

// Splits [0, n) into `parts` contiguous ranges of near-equal size; range t is
// [bounds[t], bounds[t + 1]).
inline std::vector<std::int64_t> split_range(std::int64_t n, int parts) {
  std::vector<std::int64_t> bounds(static_cast<std::size_t>(parts) + 1);
  for (int t = 0; t <= parts; ++t) bounds[static_cast<std::size_t>(t)] = n * t / parts;
  return bounds;
}

// Runs fn(t) for t in [0, parts) on `parts` threads (the calling thread takes t = 0)
// and rethrows the exception of the lowest t that threw, so that the error a caller
// sees does not depend on scheduling.
template <class Fn>
void run_parts(int parts, Fn&& fn) {
  if (parts <= 1) {
    fn(0);
    return;
  }
  std::vector<std::exception_ptr> errors(static_cast<std::size_t>(parts));
  std::vector<std::thread> threads;
  threads.reserve(static_cast<std::size_t>(parts - 1));
  auto guarded = [&](int t) {
    try {
      fn(t);
    } catch (...) {
      errors[static_cast<std::size_t>(t)] = std::current_exception();
    }
  };
  for (int t = 1; t < parts; ++t) threads.emplace_back(guarded, t);
  guarded(0);
  for (auto& th : threads) th.join();
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
}

// Number of parts worth using for n items of roughly `grain` cost units each.
inline int parts_for(std::int64_t n, int n_threads, std::int64_t min_per_part) {
  const std::int64_t t = resolve_threads(n_threads);
  const std::int64_t by_size = std::max<std::int64_t>(1, n / std::max<std::int64_t>(1, min_per_part));
  return static_cast<int>(std::min(t, by_size));
}

}  // namespace cobalance
