// Internal to the grouping core: label lists over many classes grouped by their sets
// of classes before any is packed (ListSets), for PatternTableBuilder::add_lists.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "pattern_common.hpp"
#include "pattern_index.hpp"

namespace cobalance {
inline namespace grouping {

// add_lists groups the rows by their sets of classes (ListSets) rather than packing
// each row where keys have more than this many words: packing a row zeroes, hashes and
// compares all its words, sorting its few classes costs far less. COBALANCE_TEST_LISTS
// =sets or =packed (for tests) forces one path.
constexpr index_t kListsPackedMaxWords = 64;

inline bool lists_by_sets(index_t n_words) {
  static const int forced = [] {
    const char* v = std::getenv("COBALANCE_TEST_LISTS");
    if (v != nullptr && std::strcmp(v, "sets") == 0) return 1;
    if (v != nullptr && std::strcmp(v, "packed") == 0) return 0;
    return -1;
  }();
  return forced >= 0 ? forced == 1 : n_words > kListsPackedMaxWords;
}

[[noreturn]] inline void bad_list_class(index_t cls, index_t row, index_t n_classes) {
  throw std::invalid_argument("class index " + std::to_string(cls) + " in row " + std::to_string(row) +
                              " is outside [0, n_classes = " + std::to_string(n_classes) + ")");
}

// Rows of label lists grouped by their sets of classes, none of them packed: the
// distinct sets in order of first occurrence (set s holds the increasing classes
// classes_[ptr_[s] .. ptr_[s + 1])) and the rows of each. A row costs a check of its
// classes, a sort when they are not increasing already, and a hash and compare of its
// set; nothing in it depends on n_classes.
class ListSets {
 public:
  explicit ListSets(index_t n_classes) : n_classes_(n_classes), slots_(16, 0) {}

  // The set of one row (`n` classes in any order, repeats allowed); returns its number.
  // std::invalid_argument for a class outside [0, n_classes), naming it and `row`;
  // std::length_error past 2^31 - 1 sets (more than a table holds).
  index_t add(const index_t* list, index_t n, index_t row) {
    bool increasing = true;
    for (index_t i = 0; i < n; ++i) {
      if (list[i] < 0 || list[i] >= n_classes_) bad_list_class(list[i], row, n_classes_);
      increasing = increasing && (i == 0 || list[i] > list[i - 1]);
    }
    const index_t* set = list;
    if (!increasing) {
      scratch_.assign(list, list + n);
      std::sort(scratch_.begin(), scratch_.end());
      n = std::unique(scratch_.begin(), scratch_.end()) - scratch_.begin();
      set = scratch_.data();
    }
    std::uint64_t h = mix64(static_cast<std::uint64_t>(n));
    for (index_t i = 0; i < n; ++i) h = mix64(h ^ static_cast<std::uint64_t>(set[i]));
    const std::uint64_t mask = slots_.size() - 1;
    for (std::uint64_t pos = h & mask;; pos = (pos + 1) & mask) {
      const std::uint32_t id1 = slots_[pos];
      if (id1 == 0) break;
      const index_t id = static_cast<index_t>(id1) - 1;
      if (hashes_[static_cast<std::size_t>(id)] == h && same(id, set, n)) {
        ++counts_[static_cast<std::size_t>(id)];
        return id;
      }
    }
    const index_t id = size();
    if (id >= kMaxPatterns) throw std::length_error("a pattern table holds at most 2^31 - 1 distinct patterns");
    classes_.insert(classes_.end(), set, set + n);
    ptr_.push_back(static_cast<index_t>(classes_.size()));
    counts_.push_back(1);
    hashes_.push_back(h);
    if (2 * static_cast<std::size_t>(id + 1) > slots_.size()) {
      rehash(2 * slots_.size());
    } else {
      place(id);
    }
    return id;
  }

  index_t size() const noexcept { return static_cast<index_t>(counts_.size()); }
  index_t count(index_t s) const noexcept { return counts_[static_cast<std::size_t>(s)]; }
  const index_t* begin(index_t s) const noexcept { return classes_.data() + ptr_[static_cast<std::size_t>(s)]; }
  const index_t* end(index_t s) const noexcept { return classes_.data() + ptr_[static_cast<std::size_t>(s) + 1]; }

 private:
  bool same(index_t id, const index_t* set, index_t n) const noexcept {
    const index_t* stored = begin(id);
    return end(id) - stored == n && std::equal(set, set + n, stored);
  }
  void place(index_t id) noexcept {
    const std::uint64_t mask = slots_.size() - 1;
    std::uint64_t pos = hashes_[static_cast<std::size_t>(id)] & mask;
    while (slots_[pos] != 0) pos = (pos + 1) & mask;
    slots_[pos] = static_cast<std::uint32_t>(id + 1);
  }
  void rehash(std::size_t capacity) {
    slots_.assign(capacity, 0);
    for (index_t id = 0; id < size(); ++id) place(id);
  }

  index_t n_classes_;
  std::vector<std::uint32_t> slots_;  // set + 1 by hash, linear probing; 0 = free
  std::vector<index_t> classes_;
  std::vector<index_t> ptr_ = std::vector<index_t>(1, 0);
  std::vector<index_t> counts_;
  std::vector<std::uint64_t> hashes_;
  std::vector<index_t> scratch_;
};

}  // namespace grouping
}  // namespace cobalance
