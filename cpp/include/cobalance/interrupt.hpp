// Cooperative cancellation of the core's long loops (solvers, grouping, mask scans).
//
// A caller that wants to stop a long computation early (a Ctrl-C, a termination
// request, a deadline) gives it an InterruptCheck: a function returning true when the
// computation should stop. The loops poll it through an InterruptPoller, on the thread
// that called into the core only (never from the worker threads of run_parts, so a
// check may take locks or call into an interpreter that belongs to that thread), and at
// most once per kInterruptInterval of wall time, so that a check may be slow next to
// one iteration. When it returns true the computation throws Interrupted and leaves no
// object half-updated (a PatternTableBuilder stays as it was before the call).
//
// Without a check (an empty std::function, the default everywhere) nothing is polled
// and nothing changes; with one that never returns true the results are bitwise those
// without it.
#pragma once

#include <chrono>
#include <exception>
#include <functional>

namespace cobalance {

// Returns true to ask the computation to stop.
using InterruptCheck = std::function<bool()>;

// Thrown when an InterruptCheck returned true. Not a std::invalid_argument: the input
// was fine, the caller asked to stop.
class Interrupted : public std::exception {
 public:
  const char* what() const noexcept override { return "cobalance: the computation was interrupted"; }
};

// The least wall time between two calls of a check.
inline constexpr std::chrono::milliseconds kInterruptInterval{50};

// Polls a check on behalf of one loop: poll() calls it on its first use and then at
// most once per `interval`, and throws Interrupted when it returns true. Costs one
// clock read per poll() while a check is set, nothing otherwise; loops whose
// iterations are far cheaper than a clock read call it every few thousand iterations.
// The poller refers to the check (which must outlive it) and belongs to one thread.
class InterruptPoller {
 public:
  explicit InterruptPoller(const InterruptCheck& check, std::chrono::milliseconds interval = kInterruptInterval)
      : check_(check ? &check : nullptr), interval_(interval) {}

  bool active() const noexcept { return check_ != nullptr; }

  void poll() {
    if (check_ == nullptr) return;
    const auto now = std::chrono::steady_clock::now();
    if (polled_ && now < next_) return;
    polled_ = true;
    next_ = now + interval_;
    if ((*check_)()) throw Interrupted();
  }

 private:
  const InterruptCheck* check_;
  std::chrono::steady_clock::duration interval_;
  std::chrono::steady_clock::time_point next_{};
  bool polled_ = false;
};

}  // namespace cobalance
