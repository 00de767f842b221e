// Minimal fork-join over contiguous ranges, shared by the core's loops.
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <memory>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

namespace cobalance {

// 0 (or negative) means every hardware thread; otherwise the value itself.
int resolve_threads(int n_threads) noexcept;

// Worker threads kept for a loop of many short parallel regions (an Adam run does six
// per iteration, some of tens of microseconds): starting a thread per region costs
// about as much as such a region's work, handing a region to a waiting worker about
// a microsecond. Workers spin briefly between regions, then sleep. A region runs part
// t on worker t (the owner takes t = 0), so which thread computes what does not
// depend on timing. Used through TeamScope; run_parts picks it up on its own.
class Team {
 public:
  using Call = void (*)(void* context, int part);

  explicit Team(int size);  // size - 1 workers; the owner is the last member
  ~Team();
  Team(const Team&) = delete;
  Team& operator=(const Team&) = delete;

  int size() const noexcept { return static_cast<int>(workers_.size()) + 1; }
  // Runs call(context, t) for t in [0, parts) and rethrows the error of the lowest t
  // that threw. Returns false (running nothing) where the team cannot take it: more
  // parts than members, or a region already running (a nested call).
  bool run(int parts, Call call, void* context);

 private:
  void work(int part);

  std::vector<std::thread> workers_;
  std::vector<std::exception_ptr> errors_;
  Call call_ = nullptr;
  void* context_ = nullptr;
  int parts_ = 0;
  bool busy_ = false;  // owner thread only
  std::atomic<std::uint64_t> generation_{0};
  std::atomic<int> remaining_{0};
  std::atomic<int> sleeping_{0};
  std::atomic<bool> stop_{false};
  std::mutex mutex_;
  std::condition_variable wake_;
};

// Makes a team of `size` members (none where size <= 1) the calling thread's for the
// scope's lifetime; run_parts on this thread then hands its regions to it.
class TeamScope {
 public:
  explicit TeamScope(int size);
  ~TeamScope();
  TeamScope(const TeamScope&) = delete;
  TeamScope& operator=(const TeamScope&) = delete;

 private:
  std::unique_ptr<Team> team_;  // null where the thread had a team already (kept) or size <= 1
};

// The calling thread's team, or nullptr.
Team* current_team() noexcept;

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
  if (Team* team = current_team()) {
    using F = std::remove_reference_t<Fn>;
    auto call = [](void* context, int t) { (*static_cast<F*>(context))(t); };
    if (team->run(parts, call, const_cast<void*>(static_cast<const void*>(&fn)))) return;
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
