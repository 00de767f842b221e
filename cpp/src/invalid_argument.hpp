// How the core reports bad input: std::invalid_argument, with values shown in full
// (17 significant digits, so that the value in the message is the value passed).
// Internal to the core's sources; not installed.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace cobalance::detail {

inline std::string show(double v) {
  std::ostringstream s;
  s.precision(17);
  s << v;
  return s.str();
}

[[noreturn]] inline void bad(const std::string& message) { throw std::invalid_argument(message); }

}  // namespace cobalance::detail
