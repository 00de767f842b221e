// The partitioned strategy (see the map in pattern_strategy.hpp): threads insert at
// once, each into its own regions of the index, chunk by chunk in lockstep.
#pragma once

#include "pattern_builder.hpp"

namespace cobalance {
inline namespace grouping {

inline void cpu_relax() noexcept {
#if defined(__SSE2__)
  _mm_pause();
#endif
}

// A reusable barrier for threads 0 .. n - 1, which spin (then yield) while they
// wait. Once all have arrived, thread 0 runs `then` (which must not throw) before
// any is released, so `then` sees every thread's writes and they all see its.
// Thread 0 rather than the last to arrive, so that the index always grows on the
// calling thread.
class SpinBarrier {
 public:
  explicit SpinBarrier(int n) : n_(n) {}
  template <class F>
  void arrive_and_wait(int thread, F&& then) {
    arrive_and_wait(thread, std::forward<F>(then), [] { return false; });
  }
  // The same; while thread 0 waits for the others it calls idle(), a short step of
  // optional work, until that returns false (nothing left to do).
  template <class F, class Idle>
  void arrive_and_wait(int thread, F&& then, Idle&& idle) {
    const unsigned gen = generation_.load(std::memory_order_acquire);
    if (thread == 0) {
      bool busy = true;
      for (int spin = 0; arrived_.load(std::memory_order_acquire) != n_ - 1;) {
        if (busy) busy = idle();
        if (!busy) relax(spin++);
      }
      then();
      arrived_.store(0, std::memory_order_relaxed);
      generation_.store(gen + 1, std::memory_order_release);
      return;
    }
    arrived_.fetch_add(1, std::memory_order_acq_rel);
    for (int spin = 0; generation_.load(std::memory_order_acquire) == gen; ++spin) relax(spin);
  }

 private:
  static void relax(int spin) noexcept {
    if (spin < 4096)
      cpu_relax();
    else
      std::this_thread::yield();
  }
  const int n_;
  std::atomic<int> arrived_{0};
  std::atomic<unsigned> generation_{0};
};

}  // namespace grouping

// Rows [begin, end) into the global index on `parts` threads, each inserting the
// rows whose hash falls in the index regions it owns, chunk after chunk in
// lockstep. Per chunk: every thread packs and hashes a share of the rows and
// hands each row (its number, hash and key) to its owner's list; each thread then
// inserts its rows in order, giving a pattern new in the chunk a provisional id
// (see PatternIndex::add_provisional) and marking its first row in a bitmap.
// After a barrier the bitmaps give every new pattern its id, the number of first
// rows before its own, so ids are those of one sequential pass; each thread
// writes the final ids into its slots, and for the rows of its share the keys of
// the patterns first seen there (consecutive ids) and the inverse entries; a
// second barrier makes those keys visible before the next chunk's probes. The
// threads' writes go to separate arrays or separate runs of one, so that no
// cache line passes back and forth, and all scratch is sized for one chunk and
// reused. The error reported is that of the first bad row: chunks are checked in
// order and a chunk's shares in row order.
template <class Pack>
void PatternTableBuilder::State::insert_rows_partitioned(index_t begin, index_t end, int parts, index_t expected, const Pack& pack,
                             pattern_id_t* inv, index_t& done) {
  const index_t nw = index.n_words();
  const std::size_t P = static_cast<std::size_t>(parts);
  const std::size_t NW = static_cast<std::size_t>(nw);
  int bits = 0;
  while ((1 << bits) < 8 * parts && bits < 10) ++bits;
  const std::size_t regions = std::size_t{1} << bits;
  // The table for the patterns expected, in regions, filled before the first chunk.
  PatternIndex::Regrid regrid = index.begin_regrid(slots_for(expected), expected, bits);
  // Rows per chunk: a multiple of 64 (one bitmap word), fewer for wide rows.
  const index_t chunk =
      std::max<index_t>(64 * parts, std::min<index_t>(2048 * parts, (index_t{1} << 16) * parts / nw)) / 64 * 64;
  const std::size_t share = static_cast<std::size_t>((chunk + parts - 1) / parts);  // rows per packer, at most
  const std::size_t words = static_cast<std::size_t>(chunk / 64);
  const index_t n_chunks = (end - begin + chunk - 1) / chunk;
  const auto rows_in = [&](index_t c) { return std::min(chunk, end - begin - c * chunk); };
  const auto owner_of = [&](std::uint64_t h) {
    return static_cast<std::size_t>((regrid.geometry.region_of(h) * P) >> bits);
  };

  // One chunk's rows as lists (packer p, owner o), list q = p * P + o holding up to
  // `share` rows from offset q * share: row number in the chunk, hash, key, and
  // the id the owner found.
  struct Buffer {
    std::vector<std::uint32_t> rows;
    std::vector<std::uint64_t> hash, keys;
    std::vector<pattern_id_t> ids;
    std::vector<std::size_t> length;         // by list
    std::vector<std::exception_ptr> errors;  // by packer: the first bad row of its share
  };
  Buffer buffers[3];  // chunk c's is read until every thread is past chunk c + 1's barrier
  for (Buffer& b : buffers) {
    b.rows.resize(P * P * share);
    b.hash.resize(P * P * share);
    b.keys.resize(P * P * share * NW);
    if (inv) b.ids.resize(P * P * share);
    b.length.resize(P * P);
    b.errors.resize(P);
  }
  struct alignas(64) Own {  // one thread's
    std::vector<std::uint64_t> batch;        // keys of rows being packed
    std::vector<std::uint32_t> fresh_rows[2];  // rows that created a slot, in order, by chunk parity
    std::vector<std::uint64_t> fresh_slots;  // that slot
    std::vector<const std::uint64_t*> fresh_keys;  // and its key, in the chunk's lists
    std::vector<std::uint32_t> matched;      // rows matched to a final id by hash (list positions)
    std::vector<pattern_id_t> matched_ids;   // and that id
    std::size_t n_fresh = 0;
    bool out_of_order = false;               // see finish_own
    std::vector<std::uint64_t> marks[2];     // bitmap of fresh_rows, by chunk parity
    std::vector<std::uint64_t> any;          // all threads' marks
    std::vector<index_t> before;             // and their running count, by word
    std::vector<std::size_t> listed;         // by owner
    std::vector<index_t> load;               // new patterns by region
  };
  std::vector<Own> own(P);
  for (Own& o : own) {
    o.batch.resize(static_cast<std::size_t>(kDirectBatch) * NW);
    for (auto& f : o.fresh_rows) f.resize(static_cast<std::size_t>(chunk));
    o.fresh_slots.resize(static_cast<std::size_t>(chunk));
    o.fresh_keys.resize(static_cast<std::size_t>(chunk));
    o.matched.resize(static_cast<std::size_t>(chunk));
    o.matched_ids.resize(static_cast<std::size_t>(chunk));
    for (auto& m : o.marks) m.assign(words, 0);
    o.any.resize(words);
    o.before.resize(words);
    o.listed.resize(P);
    o.load.resize(regions);
  }

  // Packer p's share of chunk c into its lists.
  const auto pack_share = [&](index_t c, std::size_t p) {
    Buffer& b = buffers[c % 3];
    const index_t n = rows_in(c), r0 = begin + c * chunk;
    const index_t lo = n * static_cast<index_t>(p) / parts, hi = n * static_cast<index_t>(p + 1) / parts;
    std::size_t* cnt = own[p].listed.data();
    std::fill(cnt, cnt + P, std::size_t{0});
    b.errors[p] = nullptr;
    std::uint64_t* keys = own[p].batch.data();
    try {
      if (P == 1) {  // one list, in row order: packed in place
        for (index_t r = lo; r < hi; r += kDirectBatch) {
          const int m = static_cast<int>(std::min<index_t>(kDirectBatch, hi - r));
          std::uint64_t* at = b.keys.data() + static_cast<std::size_t>(r) * NW;
          pack(r0 + r, m, at);
          for (int i = 0; i < m; ++i) {
            b.rows[static_cast<std::size_t>(r + i)] = static_cast<std::uint32_t>(r + i);
            b.hash[static_cast<std::size_t>(r + i)] = index.hash(at + static_cast<std::size_t>(i) * NW);
          }
        }
        cnt[0] = static_cast<std::size_t>(hi - lo);
      } else {
        for (index_t r = lo; r < hi; r += kDirectBatch) {
          const int m = static_cast<int>(std::min<index_t>(kDirectBatch, hi - r));
          pack(r0 + r, m, keys);
          for (int i = 0; i < m; ++i) {
            const std::uint64_t* key = keys + static_cast<std::size_t>(i) * NW;
            const std::uint64_t h = index.hash(key);
            const std::size_t o = owner_of(h);
            const std::size_t at = (p * P + o) * share + cnt[o]++;
            b.rows[at] = static_cast<std::uint32_t>(r + i);
            b.hash[at] = h;
            copy_key(key, NW, b.keys.data() + at * NW);
          }
        }
      }
    } catch (...) {
      b.errors[p] = std::current_exception();
    }
    for (std::size_t o = 0; o < P; ++o) b.length[p * P + o] = cnt[o];
  };

  // Thread t's rows of chunk c (k0 = patterns before it). A new pattern's
  // provisional id is k0 + f * P + t, f its number among the thread's new ones.
  // The slots are prefetched ahead of the probes. A row matched to a final id by
  // its hash alone (add_provisional<true>) is listed, and the listed rows are
  // then compared with their stored keys, those reads prefetched ahead; a row
  // whose key differs (two keys with one 64-bit hash) is taken back and added
  // again with whole-key compares. The rows are handled in order either way, so
  // a pattern's first row is its first row in the chunk. Whole-key compares in
  // the probes waited on the stored keys' cache misses one at a time.
  const auto insert_own = [&](index_t c, std::size_t t, index_t k0) {
    Buffer& b = buffers[c % 3];
    Own& mine = own[t];
    std::uint64_t* marks = mine.marks[c & 1].data();
    std::fill(marks, marks + words, std::uint64_t{0});
    std::fill(mine.load.begin(), mine.load.end(), 0);
    std::size_t n_fresh = 0, n_matched = 0;
    const auto fresh = [&](std::size_t at, std::uint64_t h, const std::uint64_t* key, std::uint64_t slot) {
      const std::uint32_t i = b.rows[at];
      marks[i >> 6] |= std::uint64_t{1} << (i & 63);
      mine.fresh_rows[c & 1][n_fresh] = i;
      mine.fresh_slots[n_fresh] = slot;
      mine.fresh_keys[n_fresh] = key;  // see same_key
      ++mine.load[index.region_of(h)];
      ++n_fresh;
    };
    constexpr std::size_t kAhead = 16;
    for (std::size_t p = 0; p < P; ++p) {
      const std::size_t at = (p * P + t) * share, n = b.length[p * P + t];
      const std::uint64_t* hash = b.hash.data() + at;
      const std::uint64_t* keys = b.keys.data() + at * NW;
      for (std::size_t j = 0; j < std::min(n, kAhead); ++j) index.prefetch(hash[j]);
      for (std::size_t j = 0; j < n; ++j) {
        if (j + kAhead < n) index.prefetch(hash[j + kAhead]);
        const std::uint64_t* key = keys + j * NW;
        const index_t provisional = k0 + static_cast<index_t>(n_fresh * P + t);
        std::uint64_t slot = 0;
        const index_t id =
            index.add_provisional<true>(key, hash[j], provisional, mine.fresh_keys.data(), parts, slot);
        if (id == provisional) {
          fresh(at + j, hash[j], key, slot);
        } else if (id < k0) {
          mine.matched[n_matched] = static_cast<std::uint32_t>(at + j);
          mine.matched_ids[n_matched++] = static_cast<pattern_id_t>(id);
        }
        if (inv) b.ids[at + j] = static_cast<pattern_id_t>(id);
      }
    }
    // The matches by hash, checked in order. All rows of a key that a false match
    // took share its hash, so they are all listed, and the first of them to be
    // added again creates the key's pattern when it is new: its first row.
    for (std::size_t m = 0; m < std::min(n_matched, kAhead); ++m) index.prefetch_stored(mine.matched_ids[m]);
    for (std::size_t m = 0; m < n_matched; ++m) {
      if (m + kAhead < n_matched) index.prefetch_stored(mine.matched_ids[m + kAhead]);
      const std::size_t at = mine.matched[m];
      const std::uint64_t* key = b.keys.data() + at * NW;
      if (index.same_as_stored(key, mine.matched_ids[m])) continue;
      index.unmatch(b.hash[at], mine.matched_ids[m]);
      const index_t provisional = k0 + static_cast<index_t>(n_fresh * P + t);
      std::uint64_t slot = 0;
      const index_t id = index.add_provisional<false>(key, b.hash[at], provisional, mine.fresh_keys.data(), parts, slot);
      if (id == provisional) {
        fresh(at, b.hash[at], key, slot);
        mine.out_of_order = true;  // a new pattern after later rows' new ones
      }
      if (inv) b.ids[at] = static_cast<pattern_id_t>(id);
    }
    mine.n_fresh = n_fresh;
  };

  // After chunk c's barrier (k0 = patterns before the chunk): thread t's new
  // patterns get their ids and keys, and its share of the chunk its inverse entries.
  const auto finish_own = [&](index_t c, std::size_t t, index_t k0, std::uint64_t* keys_out) {
    const Buffer& b = buffers[c % 3];
    Own& mine = own[t];
    index.add_region_load(mine.load.data());
    pattern_id_t* out = inv ? inv + begin + c * chunk : nullptr;
    if (P == 1 && !mine.out_of_order) {
      // One thread met the chunk's rows in order, so its provisional ids k0 + f
      // are the final ones (and already in the slots), unless a false match
      // added a pattern late: the inverse is the ids as found, the keys are
      // the fresh ones in order, with no bitmap to rank.
      for (std::size_t f = 0; f < mine.n_fresh; ++f)
        copy_key(mine.fresh_keys[f], NW, keys_out + (static_cast<std::size_t>(k0) + f) * NW);
      if (out) std::copy(b.ids.data(), b.ids.data() + b.length[0], out);
      return;
    }
    mine.out_of_order = false;
    index_t running = 0;
    for (std::size_t w = 0; w < words; ++w) {
      std::uint64_t m = 0;
      for (std::size_t u = 0; u < P; ++u) m |= own[u].marks[c & 1][w];
      mine.any[w] = m;
      mine.before[w] = running;
      running += popcount64(m);
    }
    const auto id_of_first = [&](std::uint32_t i) {
      const std::size_t w = i >> 6;
      return k0 + mine.before[w] + popcount64(mine.any[w] & ((std::uint64_t{1} << (i & 63)) - 1));
    };
    for (std::size_t f = 0; f < mine.n_fresh; ++f)
      index.set_slot_id(mine.fresh_slots[f], id_of_first(mine.fresh_rows[c & 1][f]));
    // The keys of the new patterns first seen in this thread's share: their ids
    // are consecutive, so no other thread writes near them.
    for (std::size_t o = 0; o < P; ++o) {
      const std::size_t at = (t * P + o) * share, n = b.length[t * P + o];
      const std::uint32_t* rows = b.rows.data() + at;
      const std::uint64_t* keys = b.keys.data() + at * NW;
      const pattern_id_t* ids = inv ? b.ids.data() + at : nullptr;
      const Own& owner = own[o];
      for (std::size_t j = 0; j < n; ++j) {
        const std::uint32_t i = rows[j];
        if ((mine.any[i >> 6] >> (i & 63)) & 1) {
          const index_t id = id_of_first(i);
          copy_key(keys + j * NW, NW, keys_out + static_cast<std::size_t>(id) * NW);
          if (out) store_inverse(out + i, id);
        } else if (out) {
          const index_t id = ids[j];
          store_inverse(out + i, id < k0 ? id : id_of_first(owner.fresh_rows[c & 1][static_cast<std::size_t>(id - k0) / P]));
        }
      }
    }
  };

  SpinBarrier barrier(parts);
  // Written by the last thread at a barrier, read by all after it.
  std::exception_ptr failure;  // every thread stops once set
  bool grow = false;           // the slots must grow before the next chunk
  index_t k0 = index.size();   // patterns before the chunk being inserted
  index_t base = k0;           // the same for the chunk being finished
  std::uint64_t* keys_out = nullptr;
  const auto check_packed = [&](index_t c) {  // stop at chunk c's first bad row
    if (c >= n_chunks || failure) return;
    for (const std::exception_ptr& e : buffers[c % 3].errors)
      if (e) {
        failure = e;
        return;
      }
  };
  // The keys' pages are populated ahead of the threads that write them. Faulted in
  // as they are written, each new 2 MiB page is touched by all threads at once
  // (their runs of new keys are adjacent) and the thread reaching it first waits
  // for the fault. The capacity reserved for the estimate is populated by all
  // threads with the table (below): up front, because a step of populating
  // blocks the thread that arrives at a barrier meanwhile. Should the keys move to
  // a larger reserve, thread 0 populates the new pages while it waits for the
  // others at a barrier, 2 MiB at a time (populate_keys_step).
  const std::uint64_t* keys_seen = index.keys().data();
  std::uintptr_t keys_ready =  // populated below this address
      reinterpret_cast<std::uintptr_t>(index.keys().data() + index.keys().capacity());
  const auto populate_keys_step = [&]() -> bool {
    constexpr std::uintptr_t kStep = std::uintptr_t{1} << 21;
    const PackedVector& k = index.keys();
    const std::uintptr_t used = reinterpret_cast<std::uintptr_t>(k.data() + k.size());
    const std::uintptr_t cap = reinterpret_cast<std::uintptr_t>(k.data() + k.capacity());
    if (k.data() != keys_seen) {
      keys_seen = k.data();
      keys_ready = (used + kStep - 1) & ~(kStep - 1);
    }
    if (keys_ready + kStep > cap) return false;
    populate_huge_units(reinterpret_cast<void*>(keys_ready), kStep);
    keys_ready += kStep;
    return true;
  };
  const auto make_room = [&] {
    try {
      index.make_room(chunk);
    } catch (...) {
      failure = std::current_exception();
    }
  };
  run_parts(parts, [&](int thread) {
    const std::size_t t = static_cast<std::size_t>(thread);
    // Each thread populates its part of the new table's pages, of the inverse's
    // and of the keys' (above), each its own 2 MiB units, rather than thread 0
    // populating them while the others wait. Then thread 0 moves the index's
    // patterns into the table while the others pack.
    PatternIndex::populate_regrid(regrid, t, P);
    if (inv) populate_part(inv + begin, static_cast<std::size_t>(end - begin) * sizeof(pattern_id_t), t, P);
    PackedVector& keys = index.keys();  // read only here: no thread writes them yet
    populate_part(keys.data() + keys.size(), (keys.capacity() - keys.size()) * sizeof(std::uint64_t), t, P);
    barrier.arrive_and_wait(thread, [] {});
    if (t == 0) index.fill_regrid(regrid);
    pack_share(0, t);
    barrier.arrive_and_wait(thread, [&] {
      try {
        index.end_regrid(regrid);
      } catch (...) {
        failure = std::current_exception();
        return;
      }
      check_packed(0);
      if (!failure) make_room();
    });
    for (index_t c = 0; c < n_chunks && !failure; ++c) {
      insert_own(c, t, k0);
      if (c + 1 < n_chunks) pack_share(c + 1, t);
      barrier.arrive_and_wait(thread, [&] {
        index_t n_new = 0;
        for (const Own& o : own) n_new += static_cast<index_t>(o.n_fresh);
        base = k0;
        index.extend(n_new);  // within the room made: cannot throw
        k0 = index.size();
        done = begin + c * chunk + rows_in(c);
        check_packed(c + 1);
        // Room for the next chunk: for its keys now; for its slots, if they must
        // move, once this chunk's ids are final (below).
        grow = false;
        if (!failure) {
          try {
            index.reserve_keys(chunk);
          } catch (...) {
            failure = std::current_exception();
          }
          grow = !index.slots_have_room(chunk);
        }
        keys_out = index.keys().data();
      }, populate_keys_step);
      finish_own(c, t, base, keys_out);
      // The next chunk's probes compare keys with the stored keys, which all
      // threads have just written.
      barrier.arrive_and_wait(thread, [&] {
        if (grow) make_room();
      }, populate_keys_step);
    }
  });
  index.note_added(done - begin);
  if (failure) std::rethrow_exception(failure);
}

}  // namespace cobalance
