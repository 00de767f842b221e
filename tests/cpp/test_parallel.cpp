// The worker team behind the solvers' loops: every part runs once per region on a
// fixed thread, errors come back from the lowest failing part, nested and oversized
// regions fall back to plain threads, and Adam / projected gradient give bitwise the
// same result with a team of any size as with one thread.
#include <cobalance/adam.hpp>
#include <cobalance/balance_problem.hpp>
#include <cobalance/parallel.hpp>
#include <cobalance/projected_gradient.hpp>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "balance_data.hpp"
#include "check.hpp"

using namespace cobalance;

namespace {

void every_part_once_on_a_fixed_thread() {
  const TeamScope scope(4);
  CHECK(current_team() != nullptr && current_team()->size() == 4);
  std::vector<std::thread::id> owner(4);
  std::vector<std::int64_t> hits(4, 0);
  for (int region = 0; region < 2000; ++region) {
    const int parts = 1 + region % 4;
    run_parts(parts, [&](int t) {
      if (region < 4 && t == region) owner[static_cast<std::size_t>(t)] = std::this_thread::get_id();
      if (region >= 4) CHECK(owner[static_cast<std::size_t>(t)] == std::this_thread::get_id());
      ++hits[static_cast<std::size_t>(t)];  // part t alone writes entry t
    });
  }
  CHECK(hits[0] == 2000 && hits[1] == 1500 && hits[2] == 1000 && hits[3] == 500);
  CHECK(owner[0] == std::this_thread::get_id());
}

void lowest_failing_part_rethrown_and_team_reusable() {
  const TeamScope scope(3);
  for (int round = 0; round < 50; ++round) {
    std::string message;
    try {
      run_parts(3, [&](int t) {
        if (t >= 1) throw std::invalid_argument("part " + std::to_string(t));
      });
    } catch (const std::invalid_argument& e) {
      message = e.what();
    }
    CHECK(message == "part 1");
    std::atomic<int> sum{0};
    run_parts(3, [&](int t) { sum += t + 1; });
    CHECK(sum.load() == 6);
  }
}

void nested_and_oversized_regions_fall_back() {
  const TeamScope scope(2);
  Team* team = current_team();
  CHECK(!team->run(3, [](void*, int) {}, nullptr));  // more parts than members
  std::atomic<int> inner{0}, outer{0};
  run_parts(2, [&](int) {
    ++outer;
    run_parts(2, [&](int) { ++inner; });  // the team is busy: plain threads
  });
  CHECK(outer.load() == 2 && inner.load() == 4);
  std::atomic<int> wide{0};
  run_parts(5, [&](int) { ++wide; });
  CHECK(wide.load() == 5);
  {
    const TeamScope inner_scope(3);  // a team is already there: kept
    CHECK(current_team() == team);
  }
  CHECK(current_team() == team);
}

void scope_sets_and_clears_the_team() {
  CHECK(current_team() == nullptr);
  {
    const TeamScope one(1);  // a single member needs no team
    CHECK(current_team() == nullptr);
  }
  {
    const TeamScope two(2);
    CHECK(current_team() != nullptr);
  }
  CHECK(current_team() == nullptr);
}

void workers_sleep_and_wake() {
  const TeamScope scope(2);
  std::atomic<int> sum{0};
  run_parts(2, [&](int t) { sum += t + 1; });
  std::this_thread::sleep_for(std::chrono::milliseconds(50));  // past the spin: the worker sleeps
  run_parts(2, [&](int t) { sum += t + 1; });
  CHECK(sum.load() == 6);
}

void solvers_same_with_any_team() {
  // nnz + K of about 5e4: two or more parts inside a team, one outside.
  const Data d = random_data(20000, 9, 21);
  const BalanceProblem problem = make(d);
  CHECK(problem.loop_parts(4) >= 2 && problem.parts(4) == 1);
  std::vector<double> lo(d.counts.size(), 0.0), hi(d.counts);
  for (auto& v : hi) v *= 5.0;
  double total = 0.0;
  for (double n : d.counts) total += n;
  for (const Regularizer r : {Regularizer::proportions, Regularizer::ess, Regularizer::ratio}) {
    for (const bool fixed : {false, true}) {
      AdamOptions opt;
      opt.lr = 0.05;
      opt.max_iter = 15;
      if (fixed) opt.total = 1.5 * total;
      opt.n_threads = 1;
      const auto a1 = adam(problem, d.counts, lo, hi, Objective::fraction, r, 0.01, opt);
      for (const int threads : {2, 3}) {
        opt.n_threads = threads;
        const auto at = adam(problem, d.counts, lo, hi, Objective::fraction, r, 0.01, opt);
        CHECK(at.alpha == a1.alpha && at.history == a1.history);
      }
    }
  }
  GradientOptions popt;
  popt.max_iter = 10;
  popt.n_threads = 1;
  const auto p1 = projected_gradient(problem, d.counts, lo, hi, Objective::fraction, Regularizer::proportions,
                                     1e-3, 1.5 * total, popt);
  popt.n_threads = 3;
  const auto p3 = projected_gradient(problem, d.counts, lo, hi, Objective::fraction, Regularizer::proportions,
                                     1e-3, 1.5 * total, popt);
  CHECK(p1.alpha == p3.alpha && p1.history == p3.history);
}

}  // namespace

int main() {
  scope_sets_and_clears_the_team();
  every_part_once_on_a_fixed_thread();
  lowest_failing_part_rethrown_and_team_reusable();
  nested_and_oversized_regions_fall_back();
  workers_sleep_and_wake();
  solvers_same_with_any_team();
  return 0;
}
