// Balancing problems written out densely for the C++ tests: the CSR form the core
// takes, and the dense pattern matrix the brute-force references read.
#pragma once

#include <cobalance/balance_problem.hpp>

#include <vector>

struct Data {
  cobalance::index_t k, c;
  std::vector<std::vector<int>> dense;  // k x c
  std::vector<cobalance::index_t> indptr, indices;
  std::vector<double> counts, target, weights;
};

inline cobalance::BalanceProblem make(const Data& d) {
  return cobalance::BalanceProblem(d.indptr, d.indices, d.counts, d.c, d.target, d.weights);
}
