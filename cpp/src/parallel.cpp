#include "cobalance/parallel.hpp"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace cobalance {

namespace {

thread_local Team* tls_team = nullptr;

// A waiting thread's loop: first pause instructions (a region usually follows within
// microseconds), then yields, then (workers only) sleep.
constexpr int kPauses = 4000;
constexpr int kYields = 200;

inline void cpu_relax() noexcept {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

}  // namespace

Team* current_team() noexcept { return tls_team; }

Team::Team(int size) {
  const int workers = std::max(0, size - 1);
  errors_.resize(static_cast<std::size_t>(workers) + 1);
  workers_.reserve(static_cast<std::size_t>(workers));
  for (int w = 1; w <= workers; ++w) workers_.emplace_back([this, w] { work(w); });
}

Team::~Team() {
  stop_.store(true);
  generation_.fetch_add(1);
  {
    std::lock_guard<std::mutex> lock(mutex_);
  }
  wake_.notify_all();
  for (auto& worker : workers_) worker.join();
}

bool Team::run(int parts, Call call, void* context) {
  if (busy_ || parts > size()) return false;
  busy_ = true;
  call_ = call;
  context_ = context;
  parts_ = parts;
  for (auto& e : errors_) e = nullptr;
  remaining_.store(static_cast<int>(workers_.size()));
  // seq_cst on both sides: a worker that counted itself asleep after this bump
  // re-reads the generation under the mutex and sees it; one that did so before is
  // woken below.
  generation_.fetch_add(1);
  if (sleeping_.load() > 0) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
    }
    wake_.notify_all();
  }
  try {
    call(context, 0);
  } catch (...) {
    errors_[0] = std::current_exception();
  }
  for (int spins = 0; remaining_.load(std::memory_order_acquire) != 0; ++spins) {
    if (spins < kPauses)
      cpu_relax();
    else
      std::this_thread::yield();
  }
  busy_ = false;
  for (int t = 0; t < parts; ++t)
    if (errors_[static_cast<std::size_t>(t)]) std::rethrow_exception(errors_[static_cast<std::size_t>(t)]);
  return true;
}

void Team::work(int part) {
  std::uint64_t seen = 0;
  for (;;) {
    std::uint64_t now;
    for (int spins = 0; (now = generation_.load(std::memory_order_acquire)) == seen; ++spins) {
      if (spins < kPauses) {
        cpu_relax();
      } else if (spins < kPauses + kYields) {
        std::this_thread::yield();
      } else {
        std::unique_lock<std::mutex> lock(mutex_);
        sleeping_.fetch_add(1);
        wake_.wait(lock, [&] { return generation_.load() != seen; });
        sleeping_.fetch_sub(1);
        spins = 0;
      }
    }
    seen = now;
    if (stop_.load()) return;
    if (part < parts_) {
      try {
        call_(context_, part);
      } catch (...) {
        errors_[static_cast<std::size_t>(part)] = std::current_exception();
      }
    }
    remaining_.fetch_sub(1, std::memory_order_acq_rel);
  }
}

TeamScope::TeamScope(int size) {
  if (size > 1 && tls_team == nullptr) {
    team_ = std::make_unique<Team>(size);
    tls_team = team_.get();
  }
}

TeamScope::~TeamScope() {
  if (team_) tls_team = nullptr;  // only a scope that found no team makes one
}

}  // namespace cobalance
