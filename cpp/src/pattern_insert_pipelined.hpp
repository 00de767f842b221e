// The pipelined strategy (see the map in pattern_strategy.hpp): one thread inserts,
// the others pack and hash ahead of it.
#pragma once

#include "pattern_builder.hpp"

namespace cobalance {

// Rows [begin, end) straight into the global index, like insert_rows, with
// parts - 1 threads packing and hashing chunks of rows ahead of the thread that
// probes the index. Chunk c is packed by thread 1 + c % (parts - 1) into ring slot
// c % ring, unless the inserting thread reaches it first and packs it itself (so a
// packer that is not scheduled delays nothing). Rows are inserted strictly in
// order, so ids are those of one pass.
template <class Pack>
void PatternTableBuilder::State::insert_rows_pipelined(index_t begin, index_t end, int parts, const Pack& pack, pattern_id_t* inv,
                           index_t& done) {
  const index_t nw = index.n_words();
  // Rows per chunk: 2048, fewer for very wide rows so that a buffer stays ~0.5 MiB.
  const index_t kChunk = std::max<index_t>(kBatch, std::min<index_t>(2048, 65536 / nw));
  constexpr index_t kAhead = 64;  // prefetch distance, in rows: a chunk's probes are independent
  const int producers = parts - 1;
  const index_t n_chunks = (end - begin + kChunk - 1) / kChunk;
  const index_t ring = 4 * static_cast<index_t>(producers);
  struct Buffer {
    Buffer(index_t rows, index_t nw) : keys(static_cast<std::size_t>(rows * nw)), hash(static_cast<std::size_t>(rows)) {}
    std::vector<std::uint64_t> keys, hash;
    std::exception_ptr error;  // the chunk's first bad row, if any
  };
  enum : unsigned char { kFreeChunk = 0, kClaimed = 1, kPacked = 2 };
  std::vector<Buffer> slots(static_cast<std::size_t>(ring), Buffer(kChunk, nw));
  std::unique_ptr<std::atomic<unsigned char>[]> state(new std::atomic<unsigned char>[static_cast<std::size_t>(n_chunks)]);
  for (index_t c = 0; c < n_chunks; ++c) state[static_cast<std::size_t>(c)].store(kFreeChunk, std::memory_order_relaxed);
  std::atomic<index_t> consumed{0};  // chunks fully inserted
  std::atomic<bool> stop{false};     // the inserting thread is done or failed
  auto pack_chunk = [&](index_t c, Buffer& buf) {
    const index_t r0 = begin + c * kChunk, r1 = std::min(end, r0 + kChunk);
    for (index_t r = r0; r < r1; r += kBatch) {
      const int n = static_cast<int>(std::min<index_t>(kBatch, r1 - r));
      std::uint64_t* keys = buf.keys.data() + (r - r0) * nw;
      pack(r, n, keys);
      for (int i = 0; i < n; ++i) buf.hash[static_cast<std::size_t>(r - r0 + i)] = index.hash(keys + i * nw);
    }
  };
  run_parts(parts, [&](int t) {
    if (t > 0) {
      for (index_t c = t - 1; c < n_chunks; c += producers) {
        while (consumed.load(std::memory_order_acquire) <= c - ring) {
          if (stop.load(std::memory_order_relaxed)) return;
          std::this_thread::yield();
        }
        unsigned char expected = kFreeChunk;
        if (!state[static_cast<std::size_t>(c)].compare_exchange_strong(expected, kClaimed, std::memory_order_acq_rel))
          continue;  // the inserting thread took it
        Buffer& buf = slots[static_cast<std::size_t>(c % ring)];
        try {
          pack_chunk(c, buf);
        } catch (...) {
          buf.error = std::current_exception();
          state[static_cast<std::size_t>(c)].store(kPacked, std::memory_order_release);
          return;
        }
        state[static_cast<std::size_t>(c)].store(kPacked, std::memory_order_release);
      }
      return;
    }
    struct StopOnExit {
      std::atomic<bool>& stop;
      ~StopOnExit() { stop.store(true, std::memory_order_relaxed); }
    } stop_on_exit{stop};
    Buffer own(kChunk, nw);
    for (index_t c = 0; c < n_chunks; ++c) {
      Buffer* buf = &slots[static_cast<std::size_t>(c % ring)];
      unsigned char expected = kFreeChunk;
      if (state[static_cast<std::size_t>(c)].compare_exchange_strong(expected, kClaimed, std::memory_order_acq_rel)) {
        pack_chunk(c, own);  // throws the chunk's first bad row
        buf = &own;
      } else {
        while (state[static_cast<std::size_t>(c)].load(std::memory_order_acquire) != kPacked) std::this_thread::yield();
        if (buf->error) std::rethrow_exception(buf->error);
      }
      const index_t r0 = begin + c * kChunk, n = std::min(end, r0 + kChunk) - r0;
      const std::uint64_t* hash = buf->hash.data();
      const std::uint64_t* keys = buf->keys.data();
      for (index_t i = 0; i < std::min(n, kAhead); ++i) index.prefetch(hash[i]);
      if (nw == 1) {
        index.add_ones_one_word(keys, hash, n, kAhead, inv ? inv + r0 : nullptr);
      } else {
        for (index_t i = 0; i < n; ++i) {
          if (i + kAhead < n) index.prefetch(hash[i + kAhead]);
          const index_t id = index.add(keys + i * nw, hash[i], 1);
          if (inv) store_inverse(inv + r0 + i, id);
        }
      }
      done = r0 + n;
      consumed.store(c + 1, std::memory_order_release);
    }
  });
}

}  // namespace cobalance
