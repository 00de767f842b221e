// Balancing problems written out densely for the C++ tests: the CSR form the core
// takes, and the dense pattern matrix the brute-force references read.
#pragma once

#include <cobalance/balance_problem.hpp>

#include <cmath>
#include <random>
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

// K random patterns over C classes (class i present with probability 0.9 / (i + 1)),
// counts 1-20, random targets and weights.
inline Data random_data(cobalance::index_t k, cobalance::index_t c, unsigned seed) {
  std::mt19937_64 gen(seed);
  std::uniform_real_distribution<double> unit(0.0, 1.0);
  Data d{k, c, {}, {0}, {}, {}, {}, {}};
  for (cobalance::index_t j = 0; j < k; ++j) {
    std::vector<int> row(static_cast<std::size_t>(c), 0);
    for (cobalance::index_t i = 0; i < c; ++i)
      if (unit(gen) < 0.9 / static_cast<double>(i + 1)) {
        row[static_cast<std::size_t>(i)] = 1;
        d.indices.push_back(i);
      }
    d.dense.push_back(row);
    d.indptr.push_back(static_cast<cobalance::index_t>(d.indices.size()));
    d.counts.push_back(1.0 + std::floor(unit(gen) * 20.0));
  }
  for (cobalance::index_t i = 0; i < c; ++i) {
    d.target.push_back(unit(gen));
    d.weights.push_back(0.5 + unit(gen));
  }
  return d;
}
