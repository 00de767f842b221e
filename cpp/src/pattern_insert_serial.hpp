// The serial strategy (see the map in pattern_strategy.hpp): rows straight into the
// global index on the calling thread, in order. Also the probe and prefix of every
// batch.
#pragma once

#include "pattern_builder.hpp"

namespace cobalance {

// Rows [begin, end) straight into the global index; `done` follows the rows counted.
// Packing the next batch while probing this one overlaps their cache misses.
template <class Pack>
void PatternTableBuilder::State::insert_rows(index_t begin, index_t end, const Pack& pack, pattern_id_t* inv, index_t& done) {
  const index_t nw = index.n_words();
  if (index.direct()) {
    // A direct table has no misses worth prefetching: pack a batch, resolve it.
    std::vector<std::uint64_t> keys(kDirectBatch);
    for (index_t row = begin; row < end; row += kDirectBatch) {
      const int n = static_cast<int>(std::min<index_t>(kDirectBatch, end - row));
      pack(row, n, keys.data());
      if (inv) {
        for (int i = 0; i < n; ++i) store_inverse(inv + row + i, index.add_direct(keys[static_cast<std::size_t>(i)]));
      } else {
        for (int i = 0; i < n; ++i) index.add_direct(keys[static_cast<std::size_t>(i)]);
      }
      done = row + n;
    }
    return;
  }
  Stage stages[2] = {Stage(nw), Stage(nw)};
  auto load = [&](Stage& st, index_t row) {
    st.row = row;
    st.n = static_cast<int>(std::min<index_t>(kBatch, end - row));
    pack(row, st.n, st.keys.data());
    for (int i = 0; i < st.n; ++i) {
      st.hash[i] = index.hash(st.keys.data() + i * nw);
      index.prefetch(st.hash[i]);
    }
  };
  if (begin >= end) return;
  load(stages[0], begin);
  for (int cur = 0;; cur ^= 1) {
    Stage& st = stages[cur];
    const index_t next = st.row + st.n;
    if (next < end) load(stages[cur ^ 1], next);
    if (nw == 1) {  // the slots were prefetched by load()
      index.add_ones_one_word(st.keys.data(), st.hash, st.n, st.n, inv ? inv + st.row : nullptr);
    } else {
      for (int i = 0; i < st.n; ++i) {
        const index_t id = index.add(st.keys.data() + i * nw, st.hash[i], 1);
        if (inv) store_inverse(inv + st.row + i, id);
      }
    }
    done = next;
    if (next >= end) break;
  }
}

}  // namespace cobalance
