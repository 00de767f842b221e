// The blocks strategy (see the map in pattern_strategy.hpp): contiguous blocks of rows
// look rows up in the global index (read-only) and give the rows it lacks block-local
// ids; the blocks' new patterns are then numbered block by block in local order of
// first occurrence, which is the order of first occurrence over the batch, and only
// those rows are rewritten.
#pragma once

#include "pattern_builder.hpp"

namespace cobalance {
inline namespace grouping {

struct Block {
  Block(index_t c, index_t known, bool direct) : local(c, direct), known_counts(static_cast<std::size_t>(known), 0) {}
  PatternIndex local;                 // patterns not in the global index, first-occurrence order
  std::vector<index_t> known_counts;  // samples per global pattern known before the block
  std::vector<index_t> unresolved;    // rows holding a local id (while few)
  bool rescan = false;                // too many to list: scan the block's inverse instead
  std::vector<index_t> to_global;     // local id -> global id, set after the blocks ran
};

}  // namespace grouping

template <class Pack>
void PatternTableBuilder::State::add_blocks(index_t begin, index_t end, int parts, const Pack& pack, pattern_id_t* inv) {
  const index_t nw = index.n_words();
  const index_t known = index.size();
  // More blocks than threads, taken from a counter: one thread first populates the
  // inverse's pages (see populate_pages) and then joins the others. The blocks and
  // so the result do not depend on which thread runs which.
  const std::size_t n_blocks = static_cast<std::size_t>(
      std::min<index_t>(index_t{parts} * kBlocksPerThread, std::max<index_t>(parts, (end - begin) / kRowsPerPart)));
  std::vector<index_t> bounds = split_range(end - begin, static_cast<int>(n_blocks));
  for (auto& b : bounds) b += begin;
  std::vector<Block> blocks;
  blocks.reserve(n_blocks);
  for (std::size_t b = 0; b < n_blocks; ++b) blocks.emplace_back(n_classes, known, index.direct());

  std::atomic<std::size_t> next_block{0};
  auto group_block = [&](std::size_t t) {
    Block& blk = blocks[t];
    const index_t b0 = bounds[t], b1 = bounds[t + 1];
    const std::size_t max_listed = static_cast<std::size_t>((b1 - b0) / 8);
    // Three stages in flight: pack + hash + prefetch the global slot; probe the
    // global index + prefetch the local slot of the rows it lacks; resolve locally.
    auto resolve_local = [&](const std::uint64_t* key, std::uint64_t h, index_t r) {
      const index_t l = blk.local.add(key, h, 1);
      if (inv && !blk.rescan) {
        if (blk.unresolved.size() < max_listed) {
          blk.unresolved.push_back(r);
        } else {
          blk.rescan = true;
          std::vector<index_t>().swap(blk.unresolved);
        }
      }
      return -1 - l;  // negative: a local id, rewritten once the blocks are numbered
    };
    if (index.direct()) {
      // Batches whose rows are all known (the common case) take a loop over
      // local pointers: with the members behind `this`, every store (a count, an
      // inverse entry) made the compiler reload them.
      std::uint64_t keys[kDirectBatch];
      std::int32_t slot[kDirectBatch];
      const std::int32_t* __restrict slots = index.direct_slots();
      index_t* __restrict known_counts = blk.known_counts.data();
      // Odd rows count apart from even ones, so that a run of one frequent pattern
      // is two chains of increments instead of one.
      std::vector<index_t> odd_counts(blk.known_counts.size(), 0);
      index_t* __restrict odd = odd_counts.data();
      for (index_t row = b0; row < b1; row += kDirectBatch) {
        const int n = static_cast<int>(std::min<index_t>(kDirectBatch, b1 - row));
        pack(row, n, keys);
        std::int32_t absent = 0;
        for (int i = 0; i < n; ++i) {
          slot[i] = slots[keys[i]];
          absent |= slot[i] == 0;
        }
        if (!absent) {
          int i = 0;
          for (; i + 1 < n; i += 2) {
            ++known_counts[slot[i] - 1];
            ++odd[slot[i + 1] - 1];
          }
          if (i < n) ++known_counts[slot[i] - 1];
          if (inv) {
            pattern_id_t* __restrict out = inv + row;
            for (int i = 0; i < n; ++i) out[i] = slot[i] - 1;
          }
          continue;
        }
        for (int i = 0; i < n; ++i) {
          index_t id = index_t{slot[i]} - 1;
          if (id != kEmpty)
            ++known_counts[id];
          else
            id = resolve_local(keys + i, 0, row + i);
          if (inv) store_inverse(inv + row + i, id);
        }
      }
      for (std::size_t g = 0; g < odd_counts.size(); ++g) known_counts[g] += odd[g];
      return;
    }
    Stage stages[3] = {Stage(nw), Stage(nw), Stage(nw)};
    const index_t n_batches = (b1 - b0 + kBatch - 1) / kBatch;
    for (index_t k = 0; k < n_batches + 2; ++k) {
      if (k < n_batches) {
        Stage& st = stages[k % 3];
        st.row = b0 + k * kBatch;
        st.n = static_cast<int>(std::min<index_t>(kBatch, b1 - st.row));
        pack(st.row, st.n, st.keys.data());
        for (int i = 0; i < st.n; ++i) {
          st.hash[i] = index.hash(st.keys.data() + i * nw);
          index.prefetch(st.hash[i]);
        }
      }
      if (k >= 1 && k - 1 < n_batches) {
        Stage& st = stages[(k - 1) % 3];
        for (int i = 0; i < st.n; ++i) {
          st.id[i] = index.find(st.keys.data() + i * nw, st.hash[i]);
          if (st.id[i] == kEmpty) blk.local.prefetch(st.hash[i]);
        }
      }
      if (k >= 2) {
        Stage& st = stages[(k - 2) % 3];
        for (int i = 0; i < st.n; ++i) {
          const index_t r = st.row + i;
          index_t id = st.id[i];
          if (id != kEmpty)
            ++blk.known_counts[static_cast<std::size_t>(id)];
          else
            id = resolve_local(st.keys.data() + i * nw, st.hash[i], r);
          if (inv) store_inverse(inv + r, id);
        }
      }
    }
  };
  // A block's error (a bad value) is kept with the block: the error reported is
  // that of the first block with one, whichever thread ran it.
  std::vector<std::exception_ptr> errors(n_blocks);
  run_parts(parts, [&](int t) {
    if (inv && t == parts - 1 && parts > 1)
      populate_pages(inv + begin, static_cast<std::size_t>(end - begin) * sizeof(pattern_id_t));
    for (std::size_t b; (b = next_block.fetch_add(1, std::memory_order_relaxed)) < n_blocks;) {
      try {
        group_block(b);
      } catch (...) {
        errors[b] = std::current_exception();
      }
    }
  });
  for (const std::exception_ptr& e : errors)
    if (e) std::rethrow_exception(e);

  // New patterns are numbered without a sequential fold: a block's local pattern
  // is new in that block unless an earlier block's local table holds it, and the
  // new ones are numbered block by block in local order, i.e. in order of first
  // occurrence. All probes are read-only, so threads share them out.
  std::vector<std::vector<index_t>> local_counts(n_blocks);
  std::vector<index_t> n_first(n_blocks, 0);
  for (std::size_t t = 0; t < n_blocks; ++t)
    blocks[t].to_global.assign(static_cast<std::size_t>(blocks[t].local.size()), kEmpty);
  // to_global first holds, for a pattern seen in an earlier block, -2 - (its local
  // id there) and the block in `owner`; kEmpty marks a pattern new in its block.
  std::vector<std::vector<std::int32_t>> owner(n_blocks);
  for (std::size_t t = 1; t < n_blocks; ++t) owner[t].assign(blocks[t].to_global.size(), -1);
  run_parts(parts, [&](int part) {
    for (std::size_t b = static_cast<std::size_t>(part); b < n_blocks; b += static_cast<std::size_t>(parts))
      local_counts[b] = blocks[b].local.counts();
    for (std::size_t t = 1; t < n_blocks; ++t) {
      Block& blk = blocks[t];
      const index_t k = blk.local.size();
      const index_t l0 = k * part / parts, l1 = k * (part + 1) / parts;
      for (index_t l = l0; l < l1; l += kBatch) {
        const int n = static_cast<int>(std::min<index_t>(kBatch, l1 - l));
        std::uint64_t h[kBatch];
        for (int i = 0; i < n; ++i) {
          h[i] = blk.local.hash(blk.local.key(l + i));
          for (std::size_t e = 0; e < t; ++e) blocks[e].local.prefetch(h[i]);
        }
        for (int i = 0; i < n; ++i) {
          for (std::size_t e = 0; e < t; ++e) {
            const index_t there = blocks[e].local.find(blk.local.key(l + i), h[i]);
            if (there != kEmpty) {
              blk.to_global[static_cast<std::size_t>(l + i)] = -2 - there;
              owner[t][static_cast<std::size_t>(l + i)] = static_cast<std::int32_t>(e);
              break;
            }
          }
        }
      }
    }
  });
  for (std::size_t t = 0; t < n_blocks; ++t)
    for (const index_t g : blocks[t].to_global) n_first[t] += g == kEmpty;
  index_t n_new = 0;
  std::vector<index_t> first_base(n_blocks);
  for (std::size_t t = 0; t < n_blocks; ++t) {
    first_base[t] = known + n_new;
    n_new += n_first[t];
  }
  // The only allocation of the commit; nothing below can fail.
  const auto fresh = index.append_unindexed(n_new);
  std::uint64_t* new_keys = fresh.first;
  index_t* new_counts = fresh.second;
  run_parts(parts, [&](int part) {  // number the new patterns, copy their keys and counts
    for (std::size_t t = static_cast<std::size_t>(part); t < n_blocks; t += static_cast<std::size_t>(parts)) {
      Block& blk = blocks[t];
      index_t g = first_base[t];
      const auto& lc = local_counts[t];
      for (std::size_t l = 0; l < blk.to_global.size(); ++l) {
        if (blk.to_global[l] != kEmpty) continue;
        std::copy(blk.local.key(static_cast<index_t>(l)), blk.local.key(static_cast<index_t>(l)) + nw,
                  new_keys + (g - known) * nw);
        new_counts[g - known] = lc[l];
        blk.to_global[l] = g++;
      }
    }
  });
  for (std::size_t t = 1; t < n_blocks; ++t) {  // patterns first seen in an earlier block
    Block& blk = blocks[t];
    for (std::size_t l = 0; l < blk.to_global.size(); ++l) {
      if (blk.to_global[l] >= 0) continue;
      const index_t g = blocks[static_cast<std::size_t>(owner[t][l])].to_global[static_cast<std::size_t>(-2 - blk.to_global[l])];
      blk.to_global[l] = g;
      new_counts[g - known] += local_counts[t][l];
    }
  }
  for (index_t g = 0; g < known; ++g) {
    index_t n = 0;
    for (const Block& blk : blocks) n += blk.known_counts[static_cast<std::size_t>(g)];
    if (n) index.add(index.key(g), n);
  }

  if (!inv) return;
  run_parts(parts, [&](int part) {
    for (std::size_t t = static_cast<std::size_t>(part); t < n_blocks; t += static_cast<std::size_t>(parts)) {
      const Block& blk = blocks[t];
      const index_t* map = blk.to_global.data();
      if (blk.rescan) {
        for (index_t r = bounds[t]; r < bounds[t + 1]; ++r)
          if (inv[r] < 0) store_inverse(inv + r, map[-1 - inv[r]]);
      } else {
        for (const index_t r : blk.unresolved) store_inverse(inv + r, map[-1 - inv[r]]);
      }
    }
  });
}

}  // namespace cobalance
