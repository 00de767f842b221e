#include "pybind.hpp"

PYBIND11_MODULE(_core, m) {
  m.doc() = "cobalance native core (private; use the cobalance package)";
  cobalance::bindings::bind_patterns(m);
  cobalance::bindings::bind_masks(m);
  cobalance::bindings::bind_balance(m);
}
