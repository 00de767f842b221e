// A tiny assertion helper for the C++ tests (no test framework to fetch).
#pragma once

#include <cstdlib>
#include <iostream>
#include <stdexcept>
#include <string>

#define CHECK(cond)                                                                 \
  do {                                                                              \
    if (!(cond)) {                                                                  \
      std::cerr << __FILE__ << ":" << __LINE__ << ": CHECK failed: " #cond "\n"; \
      std::exit(1);                                                                 \
    }                                                                               \
  } while (0)

// Checks that `expr` throws std::invalid_argument whose message contains `needle`.
#define CHECK_INVALID(expr, needle)                                                          \
  do {                                                                                       \
    bool thrown_ = false;                                                                    \
    try {                                                                                    \
      expr;                                                                                  \
    } catch (const std::invalid_argument& e_) {                                              \
      thrown_ = true;                                                                        \
      if (std::string(e_.what()).find(needle) == std::string::npos) {                        \
        std::cerr << __FILE__ << ":" << __LINE__ << ": message '" << e_.what()               \
                  << "' lacks '" << needle << "'\n";                                         \
        std::exit(1);                                                                        \
      }                                                                                      \
    }                                                                                        \
    if (!thrown_) {                                                                          \
      std::cerr << __FILE__ << ":" << __LINE__ << ": expected invalid_argument: " #expr "\n"; \
      std::exit(1);                                                                          \
    }                                                                                        \
  } while (0)
