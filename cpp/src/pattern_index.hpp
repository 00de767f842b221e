// Internal to the grouping core: the hash index from packed pattern to pattern id
// and count (PatternIndex), and the hash of a packed key. Its layouts and the reason
// for each are in the class comment; which builder path uses which entry point is
// in pattern_builder.hpp.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <utility>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif
#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#include <immintrin.h>
#endif

#include "cobalance/parallel.hpp"
#include "pattern_common.hpp"
#include "pattern_memory.hpp"
#include "pattern_strategy.hpp"

namespace cobalance {
inline namespace grouping {

// The builtin where the target has the instruction; otherwise the builtin is a call
// into the compiler's runtime, and the bit-parallel sum below is cheaper.
inline int popcount64(std::uint64_t x) noexcept {
#if (defined(__GNUC__) || defined(__clang__)) && defined(__POPCNT__)
  return __builtin_popcountll(x);
#else
  x = x - ((x >> 1) & 0x5555555555555555ULL);
  x = (x & 0x3333333333333333ULL) + ((x >> 2) & 0x3333333333333333ULL);
  x = (x + (x >> 4)) & 0x0f0f0f0f0f0f0f0fULL;
  return static_cast<int>((x * 0x0101010101010101ULL) >> 56);
#endif
}

inline std::uint64_t mix64(std::uint64_t x) noexcept {  // splitmix64 finaliser
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ULL;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebULL;
  x ^= x >> 31;
  return x;
}

// COBALANCE_TEST_HASH_BITS=b (1 to 63; for tests) keeps b bits of the hash of every
// key of several words, so that distinct keys often share a hash and the paths that
// tell them apart run (with 64 bits, two of 1e7 distinct keys share one with a
// probability of about 3e-6).
std::uint64_t test_hash_mask() noexcept {
  const char* v = std::getenv("COBALANCE_TEST_HASH_BITS");
  const int bits = v ? std::atoi(v) : 0;
  return bits >= 1 && bits <= 63 ? (std::uint64_t{1} << bits) - 1 : 0;
}
const std::uint64_t kTestHashMask = test_hash_mask();

// The low and high halves of the 128-bit product a * b, xored.
inline std::uint64_t fold_multiply(std::uint64_t a, std::uint64_t b) noexcept {
#if defined(__SIZEOF_INT128__)
  __extension__ typedef unsigned __int128 u128;  // __extension__: no -Wpedantic note
  const u128 p = static_cast<u128>(a) * b;
  return static_cast<std::uint64_t>(p) ^ static_cast<std::uint64_t>(p >> 64);
#else
  const std::uint64_t a0 = a & 0xffffffffu, a1 = a >> 32, b0 = b & 0xffffffffu, b1 = b >> 32;
  const std::uint64_t p00 = a0 * b0, p01 = a0 * b1, p10 = a1 * b0, p11 = a1 * b1;
  const std::uint64_t mid = (p00 >> 32) + (p01 & 0xffffffffu) + (p10 & 0xffffffffu);
  const std::uint64_t lo = (mid << 32) | (p00 & 0xffffffffu);
  const std::uint64_t hi = p11 + (p01 >> 32) + (p10 >> 32) + (mid >> 32);
  return lo ^ hi;
#endif
}

inline std::uint64_t hash_words(const std::uint64_t* key, index_t n_words) noexcept {
  if (n_words == 1) return mix64(key[0]);
  // Each word is folded in with a full 64 x 64 -> 128-bit product, whose two halves
  // are xored. The previous step, (h ^ key[w]) * m then h ^= h >> 32, let a key's
  // top bit flip only bits 63 and 31 of h (a product's bit 63 carries nowhere), and
  // the same two bits in the next word undid it: keys differing in classes 64, 96
  // and 128 shared a hash, 1681 false matches among the 1e7 rows of the C=300
  // benchmark data (each one checked and taken back, so only speed suffered). In the
  // high half the flip becomes one that depends on h through the carries, so no
  // fixed difference cancels: 0 false matches there.
  std::uint64_t h = 0x9e3779b97f4a7c15ULL ^ static_cast<std::uint64_t>(n_words);
  for (index_t w = 0; w < n_words; ++w) h = fold_multiply(h ^ key[w], 0xff51afd7ed558ccdULL);
  h = mix64(h);
  return kTestHashMask ? mix64(h & kTestHashMask) : h;
}

// A key of n_words words (key and out do not overlap). Keys of a few words are
// copied inline: a copy of a length known only at run time is a call to memmove,
// and GCC 12 makes std::copy_n of a constant 40 bytes one too; a memcpy of a
// constant size it expands into moves.
template <std::size_t W>
inline void copy_words(const std::uint64_t* key, std::uint64_t* out) noexcept {
  std::memcpy(out, key, W * sizeof(std::uint64_t));
}
inline void copy_key(const std::uint64_t* key, index_t n_words, std::uint64_t* out) noexcept {
  switch (n_words) {
    case 2: return copy_words<2>(key, out);
    case 3: return copy_words<3>(key, out);
    case 4: return copy_words<4>(key, out);
    case 5: return copy_words<5>(key, out);
    case 6: return copy_words<6>(key, out);
    case 7: return copy_words<7>(key, out);
    case 8: return copy_words<8>(key, out);
    default: std::copy(key, key + n_words, out);
  }
}

#if defined(COBALANCE_X86_AVX512)

// For hash slots of 16 bytes laid out as (64-bit tag, 32-bit id + 1, 32-bit count):
// calls f(j) for each slot j of the first n / 4 * 4 at `slots` that is used and holds
// a count other than 1, four slots per 64-byte compare, and returns n / 4 * 4 (the
// caller tests the rest). Called only where the CPU has AVX-512BW.
template <class F>
__attribute__((target("avx512f,avx512bw"))) std::size_t for_each_other_count_avx512(const void* slots,
                                                                                       std::size_t n, F&& f) {
  const unsigned char* p = static_cast<const unsigned char*>(slots);
  const __m512i zero = _mm512_setzero_si512(), one = _mm512_set1_epi32(1);
  std::size_t j = 0;
  for (; j + 4 <= n; j += 4) {
    const __m512i v = _mm512_loadu_si512(p + 16 * j);
    const unsigned used = _mm512_mask_cmpneq_epi32_mask(0x4444, v, zero);  // id + 1 lanes
    const unsigned other = _mm512_mask_cmpneq_epi32_mask(0x8888, v, one);  // count lanes
    for (unsigned m = (used << 1) & other; m; m &= m - 1) f(j + static_cast<std::size_t>(__builtin_ctz(m)) / 4);
  }
  return j;
}
#endif  // COBALANCE_X86_AVX512

}  // namespace grouping

// Open-addressing index from packed pattern to pattern id (order of insertion)
// and its sample count. Two layouts: a direct table indexed by the key for
// n_classes <= 16, and linear probing over 16-byte slots beyond: (tag, id + 1,
// count), where the tag is the key itself for one-word keys and the key's hash
// otherwise (the key then lives in `keys_`). An all-zero slot is free, so a new
// table needs no fill. The count sits in the slot so that a probe touches one
// cache line; it holds the count modulo 2^31, the rest (needed only past 2^31
// samples of one pattern) is kept in `high_counts_`. Lookups are split into
// hash / prefetch / probe so that callers can overlap the cache misses of several
// rows. Concurrent const calls are safe. Patterns appended with append_unindexed
// are invisible to find/add until sync().
class PatternIndex {
  struct Slot {
    std::uint64_t tag;   // the key itself when n_words == 1, else its hash
    std::uint32_t id1;   // id + 1; 0 marks a free slot
    std::uint32_t count; // modulo 2^31; see high_counts_
  };

  // Where keys go in a table of 2^k slots split into 2^bits regions of 2^shift: a
  // hash's top bits pick the region, its low bits the first slot tried there, and
  // probing wraps around within the region.
  struct Geometry {
    Geometry() = default;
    Geometry(std::size_t capacity, int region_bits) : bits(region_bits) {
      int shift = 0;  // log2(slots per region)
      while ((std::size_t{1} << shift) < (capacity >> bits)) ++shift;
      mask = (std::uint64_t{1} << shift) - 1;
      if (bits) {
        down = 64 - bits - shift;
        region_mask = ((std::uint64_t{1} << bits) - 1) << shift;
      }
    }
    std::uint64_t region_of(std::uint64_t h) const noexcept { return bits ? h >> (64 - bits) : 0; }
    // Without regions this is h & mask, as cheap as a plain table.
    std::uint64_t home(std::uint64_t h) const noexcept { return ((h >> down) & region_mask) | (h & mask); }
    std::uint64_t next(std::uint64_t pos) const noexcept { return (pos & ~mask) | ((pos + 1) & mask); }
    index_t region_slots() const noexcept { return static_cast<index_t>(mask + 1); }
    int bits = 0;
    int down = 0;                  // moves a hash's top `bits` bits to the region's place
    std::uint64_t region_mask = 0;  // those bits of a slot's position
    std::uint64_t mask = 0;         // slots per region - 1
  };

 public:
  // The direct layout for n_classes <= 16 unless the tests force the hashed one.
  explicit PatternIndex(index_t n_classes)
      : PatternIndex(n_classes, n_classes <= kDirectMaxClasses && !detail::forced_paths().hashed_index) {}
  PatternIndex(index_t n_classes, bool direct) : n_words_(words_for(n_classes)), direct_(direct) {
    if (direct_) {
      direct_slots_ = TableArray<std::int32_t>(std::size_t{1} << n_classes);
    } else {
      rehash(256);
    }
  }

  index_t size() const noexcept { return size_; }
  std::size_t slot_count() const noexcept { return slots_.size(); }
  int region_bits() const noexcept { return geo_.bits; }
  bool direct() const noexcept { return direct_; }
  index_t n_words() const noexcept { return n_words_; }
  const std::uint64_t* key(index_t id) const noexcept { return keys_.data() + id * n_words_; }
  PackedVector& keys() noexcept { return keys_; }

  std::uint64_t hash(const std::uint64_t* key) const noexcept {
    return direct_ ? key[0] : hash_words(key, n_words_);
  }
  // No branch on direct_ (a direct index has no slots, and its home is 0): measured
  // with GCC 12, a branch here let -O3 drop the prefetches from the callers' loops.
  void prefetch(std::uint64_t h) const noexcept { prefetch_slot(slots_.data() + home(h)); }

  // The direct layout's table: id + 1 by key, 0 = absent (read-only row loops).
  const std::int32_t* direct_slots() const noexcept { return direct_slots_.data(); }
  // The direct layout's add(key, 1), small enough to inline in row loops.
  index_t add_direct(std::uint64_t key) {
    std::int32_t& slot = direct_slots_[static_cast<std::size_t>(key)];
    if (slot == 0) {
      keys_.push_back(key);
      direct_counts_.push_back(0);
      slot = static_cast<std::int32_t>(++size_);
    }
    ++direct_counts_[static_cast<std::size_t>(slot - 1)];
    return slot - 1;
  }

  // The id of `key` (with hash `h`), or kEmpty when absent.
  index_t find(const std::uint64_t* key, std::uint64_t h) const noexcept {
    if (direct_) return static_cast<index_t>(direct_slots_[static_cast<std::size_t>(key[0])]) - 1;
    std::uint64_t pos = home(h);
    while (true) {
      const Slot& s = slots_[pos];
      if (s.id1 == 0) return kEmpty;
      if (matches(s, key, h)) return static_cast<index_t>(s.id1) - 1;
      pos = next(pos);
    }
  }

  // Adds n samples to `key`, inserting it with the next id when absent; returns its
  // id (ids >= the size before the call are new).
  index_t add(const std::uint64_t* key, std::uint64_t h, index_t n) {
    if (direct_) {
      std::int32_t& slot = direct_slots_[static_cast<std::size_t>(key[0])];
      if (slot == 0) {
        keys_.push_back(key[0]);
        direct_counts_.push_back(0);
        slot = static_cast<std::int32_t>(++size_);
      }
      direct_counts_[static_cast<std::size_t>(slot - 1)] += n;
      return slot - 1;
    }
    if (n > 0) low_added_ += n;
    std::uint64_t pos = home(h);
    while (true) {
      Slot& s = slots_[pos];
      if (s.id1 == 0) return insert_at(s, key, h, n);
      if (matches(s, key, h)) {
        bump(s, n);
        return static_cast<index_t>(s.id1) - 1;
      }
      pos = next(pos);
    }
  }
  index_t add(const std::uint64_t* key, index_t n) { return add(key, hash(key), n); }

  // add(keys[i], hash[i], 1) for i in [0, n), keys of one word, ids to out[i] when
  // out is not null, the slots prefetched `ahead` rows in advance. add() reloads the
  // table's geometry and counters on every row (its stores into the slots may alias
  // them) and inserts out of line; here they stay in registers and a new pattern is
  // inserted inline while no rehash, key reallocation or id limit is near (about a
  // third faster than add() at C=64).
  void add_ones_one_word(const std::uint64_t* keys, const std::uint64_t* hash, index_t n, index_t ahead, pattern_id_t* out) {
    low_added_ += n;
    Slot* slots = slots_.data();
    std::uint64_t mask = geo_.mask;
    const bool plain = geo_.bits == 0;
    // Inserts that need no rehash, key reallocation or size check.
    const auto fast_room = [&]() -> index_t {
      if (!plain) return 0;
      const index_t by_load = static_cast<index_t>(slots_.size() / 2) - region_load_[0];
      const index_t by_keys = static_cast<index_t>(keys_.capacity() - keys_.size());
      return std::max<index_t>(0, std::min({by_load, by_keys, kMaxPatterns - size_}));
    };
    index_t fast_left = fast_room();
    for (index_t i = 0; i < n; ++i) {
      if (i + ahead < n) prefetch_slot(slots + (plain ? (hash[i + ahead] & mask) : home(hash[i + ahead])));
      const std::uint64_t key = keys[i];
      std::uint64_t pos = plain ? (hash[i] & mask) : home(hash[i]);
      index_t id;
      while (true) {
        Slot& s = slots[pos];
        if (s.tag == key && s.id1 != 0) {
          if (s.count + 1 < static_cast<std::uint32_t>(kLowSpan)) ++s.count; else bump(s, 1);
          id = static_cast<index_t>(s.id1) - 1;
          break;
        }
        if (s.id1 == 0) {
          if (fast_left > 0) {
            --fast_left;
            keys_.push_back(key);
            s.tag = key;
            s.id1 = static_cast<std::uint32_t>(++size_);
            s.count = 1;
            ++region_load_[0];
            id = size_ - 1;
            break;
          }
          id = insert_at(s, &keys[i], hash[i], 1);
          slots = slots_.data();
          mask = geo_.mask;
          fast_left = fast_room();
          break;
        }
        pos = plain ? ((pos + 1) & mask) : next(pos);
      }
      if (out) out[i] = static_cast<pattern_id_t>(id);
    }
  }

  // Appends n patterns known to be absent (and distinct), ids size() .. size() + n - 1;
  // returns where the caller writes their keys (n x n_words) and counts. Their slots
  // are filled by the next sync(): until then find() and add() do not see them, which
  // costs nothing when the table is finished without further lookups.
  std::pair<std::uint64_t*, index_t*> append_unindexed(index_t n) {
    if (size_ + n > kMaxPatterns)
      throw std::length_error("a pattern table holds at most 2^31 - 1 distinct patterns");
    pending_counts_.reserve(pending_counts_.size() + static_cast<std::size_t>(n));
    keys_.resize(keys_.size() + static_cast<std::size_t>(n * n_words_));
    pending_counts_.resize(pending_counts_.size() + static_cast<std::size_t>(n), 0);
    size_ += n;
    return {keys_.data() + (size_ - n) * n_words_,
            pending_counts_.data() + pending_counts_.size() - static_cast<std::size_t>(n)};
  }

  // Gives the patterns appended by append_unindexed their slots.
  void sync() {
    if (pending_counts_.empty()) return;
    const index_t first = size_ - static_cast<index_t>(pending_counts_.size());
    if (direct_) {
      for (index_t id = first; id < size_; ++id)
        direct_slots_[static_cast<std::size_t>(keys_[static_cast<std::size_t>(id)])] = static_cast<std::int32_t>(id + 1);
      direct_counts_.insert(direct_counts_.end(), pending_counts_.begin(), pending_counts_.end());
    } else {
      reserve(size_);
      constexpr index_t kAhead = 8;
      for (index_t id = first; id < std::min(size_, first + kAhead); ++id) prefetch(hash(key(id)));
      for (index_t id = first; id < size_; ++id) {
        if (id + kAhead < size_) prefetch(hash(key(id + kAhead)));
        place(id, hash(key(id)), pending_counts_[static_cast<std::size_t>(id - first)]);
      }
    }
    std::vector<index_t>().swap(pending_counts_);
  }

  // Samples per pattern, by id; the slots are scanned on up to n_threads threads.
  //
  // Most patterns of a large table are seen once, so the output starts as all ones
  // (a sequential fill, on huge pages) and only the slots holding another count are
  // written into it, at random; the slots are tested four at a time, so that the
  // scan does not branch on every slot (half the time of writing every count).
  std::vector<index_t> counts(int n_threads = 1) const {
    std::vector<index_t> out;
    out.reserve(static_cast<std::size_t>(size_));
    advise_huge_pages(out.data(), static_cast<std::size_t>(size_) * sizeof(index_t));
    out.assign(static_cast<std::size_t>(size_), 1);
    const std::size_t indexed = static_cast<std::size_t>(size_) - pending_counts_.size();
    if (direct_) {
      std::copy(direct_counts_.begin(), direct_counts_.end(), out.begin());
    } else {
      const index_t n = static_cast<index_t>(slots_.size());
      const int parts = parts_for(n, n_threads, index_t{1} << 18);
      const std::vector<index_t> bounds = split_range(n, parts);
      run_parts(parts, [&](int t) {  // ids are distinct: the threads write disjoint entries
        const Slot* slots = slots_.data();
        index_t* counts = out.data();
        const auto other_count = [](const Slot& s) { return (s.id1 != 0) & (s.count != 1); };
        const index_t i1 = bounds[static_cast<std::size_t>(t) + 1];
        index_t i = bounds[static_cast<std::size_t>(t)];
#if defined(COBALANCE_X86_AVX512)
        static_assert(sizeof(Slot) == 16 && offsetof(Slot, id1) == 8 && offsetof(Slot, count) == 12,
                      "for_each_other_count_avx512 reads this layout");
        if (cpu_has_avx512bw()) {  // four slots per compare: no branch per slot
          const Slot* first = slots + i;
          i += static_cast<index_t>(for_each_other_count_avx512(
              first, static_cast<std::size_t>(i1 - i), [&](std::size_t j) { counts[first[j].id1 - 1] = first[j].count; }));
        }
#endif
        for (; i + 4 <= i1; i += 4) {
          if (!(other_count(slots[i]) | other_count(slots[i + 1]) | other_count(slots[i + 2]) |
                other_count(slots[i + 3])))
            continue;
          for (index_t j = i; j < i + 4; ++j)
            if (other_count(slots[j])) counts[slots[j].id1 - 1] = slots[j].count;
        }
        for (; i < i1; ++i)
          if (other_count(slots[i])) counts[slots[i].id1 - 1] = slots[i].count;
      });
      for (std::size_t id = 0; id < high_counts_.size(); ++id) out[id] += high_counts_[id];
    }
    std::copy(pending_counts_.begin(), pending_counts_.end(), out.begin() + static_cast<std::ptrdiff_t>(indexed));
    return out;
  }

  // Room for `n_patterns` in total without reallocating: afterwards, inserting up to
  // that many cannot throw.
  void reserve(index_t n_patterns) {
    keys_.reserve(static_cast<std::size_t>(n_patterns * n_words_));
    if (direct_) {
      direct_counts_.reserve(static_cast<std::size_t>(n_patterns));
      return;
    }
    const std::size_t capacity = slots_needed(n_patterns);
    if (capacity != slots_.size()) rehash(capacity);
  }
  // The slots of the table after reserve(n_patterns) (0 for a direct index).
  std::size_t slots_needed(index_t n_patterns) const noexcept {
    if (direct_) return 0;
    std::size_t capacity = slots_.size();
    while (static_cast<index_t>(capacity) < 2 * n_patterns) capacity *= 2;
    return capacity;
  }

  // Forgets the patterns with ids >= n (used to undo a failed batch, after their
  // samples were taken back out of the counts).
  void truncate(index_t n) {
    sync();
    if (n >= size_) return;
    if (direct_) {
      for (index_t id = n; id < size_; ++id) direct_slots_[static_cast<std::size_t>(keys_[static_cast<std::size_t>(id)])] = 0;
      keys_.resize(static_cast<std::size_t>(n));
      direct_counts_.resize(static_cast<std::size_t>(n));
      size_ = n;
      return;
    }
    // Linear probing cannot delete in place, so the slots are rebuilt.
    const std::vector<index_t> kept = counts();
    keys_.resize(static_cast<std::size_t>(n * n_words_));
    size_ = n;
    high_counts_.clear();
    std::fill(slots_.begin(), slots_.end(), Slot{0, 0, 0});
    std::fill(region_load_.begin(), region_load_.end(), 0);
    low_added_ = 0;
    for (index_t id = 0; id < n; ++id) place(id, hash(key(id)), kept[static_cast<std::size_t>(id)]);
  }

  // --- Partitioned insertion (PatternTableBuilder::State::insert_rows_partitioned).
  // The slots form 2^bits regions, chosen by a hash's top bits, and probing stays
  // inside a key's region, so that threads owning disjoint regions can insert
  // concurrently (add_provisional). A pattern new in a chunk first gets a
  // provisional id; once every thread has gone through the chunk, the builder
  // numbers the new patterns in order of first occurrence, appends them (extend)
  // and each thread writes the final ids into its slots (set_slot_id). Between
  // chunks, one thread makes room (reserve_keys, make_room).

  std::uint64_t region_of(std::uint64_t h) const noexcept { return geo_.region_of(h); }

  // The slots laid out again in 2^bits regions, for n_patterns (as reserve), with
  // room for n_keys keys: begin_regrid allocates, fill_regrid moves the patterns in
  // (while other threads go on with other work), end_regrid swaps the new table in.
  struct Regrid {
    TableArray<Slot> slots;
    Geometry geometry;
    std::vector<index_t> load;
    bool fits = true;   // no region more than half full
    bool keep = false;  // the table already has this layout: nothing to move
  };
  Regrid begin_regrid(index_t n_patterns, index_t n_keys, int bits) {
    std::size_t capacity = std::max<std::size_t>(slots_.size(), std::size_t{1024} << bits);
    while (static_cast<index_t>(capacity) < 2 * std::max(n_patterns, size_)) capacity *= 2;
    const std::size_t key_words = static_cast<std::size_t>(std::max(n_keys, size_) * n_words_);
    if (keys_.capacity() < key_words) {
      keys_.reserve(key_words);
      advise_huge_pages(keys_.data() + keys_.size(), (keys_.capacity() - keys_.size()) * sizeof(std::uint64_t));
    }
    if (capacity == slots_.size() && bits == geo_.bits) {
      // Regions are at most half full in the current table (make_room keeps them so).
      Regrid same;
      same.geometry = geo_;
      same.keep = true;
      return same;
    }
    return regrid_of(capacity, bits);
  }
  // Populates part `part` of `parts` of the regrid's slots (see populate_part).
  static void populate_regrid(Regrid& r, std::size_t part, std::size_t parts) noexcept {
    populate_part(r.slots.data(), r.slots.size() * sizeof(Slot), part, parts);
  }
  // Stops early (fits = false) where a region would pass half full, which only a
  // badly skewed hash can do; end_regrid then rebuilds from the old table.
  //
  // The old slots are read in order and placed in that order, each kAhead live
  // slots after its new home was prefetched: the new table is the same as without
  // the prefetch. Without it, rebuilding a large table is a cache miss per slot.
  void fill_regrid(Regrid& r) const noexcept {
    if (r.keep) return;
    constexpr std::size_t kAhead = 16;  // a power of two
    const Slot* queued[kAhead];
    std::uint64_t queued_hash[kAhead];
    std::size_t n_queued = 0;  // slots taken from the old table; n_placed of them placed
    std::size_t n_placed = 0;
    const auto place_next = [&]() -> bool {
      const std::size_t q = n_placed++ & (kAhead - 1);
      const std::uint64_t h = queued_hash[q];
      index_t& load = r.load[r.geometry.region_of(h)];
      if (2 * ++load > r.geometry.region_slots()) {
        r.fits = false;
        return false;
      }
      std::uint64_t pos = r.geometry.home(h);
      while (r.slots[pos].id1 != 0) pos = r.geometry.next(pos);
      r.slots[pos] = *queued[q];
      return true;
    };
    for (const Slot& s : slots_) {
      if (s.id1 == 0) continue;
      if (n_queued - n_placed == kAhead && !place_next()) return;
      const std::uint64_t h = n_words_ == 1 ? mix64(s.tag) : s.tag;
      prefetch_slot(r.slots.data() + r.geometry.home(h));
      const std::size_t q = n_queued++ & (kAhead - 1);
      queued[q] = &s;
      queued_hash[q] = h;
    }
    while (n_placed < n_queued)
      if (!place_next()) return;
  }
  void end_regrid(Regrid& r) {
    if (r.keep) return;
    if (!r.fits) {
      rebuild(r.slots.size() * 2, r.geometry.bits);
      return;
    }
    slots_ = std::move(r.slots);
    geo_ = r.geometry;
    region_load_ = std::move(r.load);
  }

  // Makes sure that `n_new` more patterns, however they fall into regions, leave
  // every region at most half full, and that their keys fit without reallocating.
  void make_room(index_t n_new) {
    index_t fullest = 0;
    for (const index_t l : region_load_) fullest = std::max(fullest, l);
    std::size_t capacity = slots_.size();
    while (static_cast<std::size_t>(2 * (fullest + n_new)) > (capacity >> geo_.bits)) capacity *= 2;
    if (capacity != slots_.size()) rebuild(capacity, geo_.bits);
    reserve_keys(n_new);
  }
  bool slots_have_room(index_t n_new) const noexcept {
    for (const index_t l : region_load_)
      if (2 * (l + n_new) > region_slots()) return false;
    return true;
  }
  void reserve_keys(index_t n_new) {
    const std::size_t need = static_cast<std::size_t>((size_ + n_new) * n_words_);
    if (keys_.capacity() < need) keys_.reserve(std::max(need, 2 * keys_.capacity()));
  }

  // Room for n more samples in the slots' counts (see bump) without carrying: true
  // unless n alone is too many. Moves the counts into high_counts_ when needed.
  bool make_count_room(index_t n) {
    if (n >= kLowSpan) return false;
    if (low_added_ + n < kLowSpan) return true;
    high_counts_.resize(static_cast<std::size_t>(size_), 0);
    for (Slot& s : slots_) {
      if (s.id1 == 0) continue;
      high_counts_[s.id1 - 1] += s.count;
      s.count = 0;
    }
    low_added_ = 0;
    return true;
  }
  void note_added(index_t n) noexcept { low_added_ += n; }

  // One sample of `key` (hash h, in a region the calling thread owns). Returns its
  // id: final (< size()), provisional (>= size()) when first seen in this chunk,
  // or `provisional` itself when new, in which case `slot` is set to its position.
  // The key of provisional id size() + f * stride + t is at fresh_keys[f] (t < stride
  // being the calling thread's number).
  //
  // kByHash (keys of several words): a slot with hash h and a final id is taken for
  // `key` without reading the stored key, which is where probes otherwise wait on
  // memory (at C=300, a third of the insertion loop). The caller then checks each
  // such match (same_as_stored, in a loop whose reads overlap), and for a false one
  // calls unmatch and this again with kByHash false. Provisional ids, whose keys are
  // in cache, are always compared whole.
  template <bool kByHash>
  index_t add_provisional(const std::uint64_t* key, std::uint64_t h, index_t provisional,
                          const std::uint64_t* const* fresh_keys, index_t stride, std::uint64_t& slot) noexcept {
    std::uint64_t pos = home(h);
    while (true) {
      Slot& s = slots_[pos];
      if (s.id1 == 0) {
        s = Slot{!kByHash && n_words_ == 1 ? key[0] : h, static_cast<std::uint32_t>(provisional + 1), 1};
        slot = pos;
        return provisional;
      }
      const bool same = kByHash ? s.tag == h && (static_cast<index_t>(s.id1) <= size_ || same_key(s, key, fresh_keys, stride))
                                : n_words_ == 1 ? s.tag == key[0] : s.tag == h && same_key(s, key, fresh_keys, stride);
      if (same) {
        ++s.count;  // cannot carry: see make_count_room
        return static_cast<index_t>(s.id1) - 1;
      }
      pos = next(pos);
    }
  }
  // Whether `key` is the stored key of final id `id`.
  bool same_as_stored(const std::uint64_t* key, index_t id) const noexcept {
    return same_words(key, keys_.data() + id * n_words_);
  }
  // Takes back the sample that add_provisional<true> gave to final id `id` (hash h)
  // for a key that is not its own.
  void unmatch(std::uint64_t h, index_t id) noexcept {
    std::uint64_t pos = home(h);
    while (slots_[pos].id1 != static_cast<std::uint32_t>(id + 1)) pos = next(pos);
    --slots_[pos].count;
  }
  void prefetch_stored(index_t id) const noexcept {
    const std::uint64_t* k = keys_.data() + id * n_words_;
    prefetch_slot(k);
    if (n_words_ > 4) prefetch_slot(k + n_words_ - 1);
  }
  void set_slot_id(std::uint64_t slot, index_t id) noexcept { slots_[slot].id1 = static_cast<std::uint32_t>(id + 1); }

  // Appends n_new patterns; the caller writes their keys (into keys(), by id) and
  // their regions' loads (add_region_load). Needs make_room or reserve_keys first.
  void extend(index_t n_new) noexcept {
    size_ += n_new;
    keys_.resize(static_cast<std::size_t>(size_ * n_words_));  // within capacity: cannot throw
  }
  // Adds new patterns per region (one count per region); entries left 0 are not
  // written, so threads owning disjoint regions can call it at once.
  void add_region_load(const index_t* added) noexcept {
    for (std::size_t r = 0; r < region_load_.size(); ++r)
      if (added[r]) region_load_[r] += added[r];
  }

 private:
  static constexpr index_t kLowSpan = index_t{1} << 31;  // a slot's count stays below this

  std::uint64_t home(std::uint64_t h) const noexcept { return geo_.home(h); }
  std::uint64_t next(std::uint64_t pos) const noexcept { return geo_.next(pos); }
  index_t region_slots() const noexcept { return geo_.region_slots(); }

  // Whether a multi-word key equals slot s's (see add_provisional for where the key
  // of a provisional id is).
  bool same_key(const Slot& s, const std::uint64_t* key, const std::uint64_t* const* fresh_keys,
                index_t stride) const noexcept {
    const index_t id = static_cast<index_t>(s.id1) - 1;
    return same_words(key, id < size_ ? keys_.data() + id * n_words_ : fresh_keys[(id - size_) / stride]);
  }
  bool same_words(const std::uint64_t* key, const std::uint64_t* other) const noexcept {
    for (index_t w = 0; w < n_words_; ++w)
      if (key[w] != other[w]) return false;
    return true;
  }

  bool matches(const Slot& s, const std::uint64_t* key, std::uint64_t h) const noexcept {
    if (n_words_ == 1) return s.tag == key[0];
    return s.tag == h && same_as_stored(key, static_cast<index_t>(s.id1) - 1);
  }

  // Puts an id known to be absent into a free slot.
  void place(index_t id, std::uint64_t h, index_t count) {
    std::uint64_t pos = home(h);
    while (slots_[pos].id1 != 0) pos = next(pos);
    Slot& s = slots_[pos];
    s = Slot{n_words_ == 1 ? key(id)[0] : h, static_cast<std::uint32_t>(id + 1), 0};
    if (count > 0) low_added_ += count;
    bump(s, count);
    if (++region_load_[region_of(h)] * 2 > region_slots()) rehash(slots_.size() * 2);
  }

  // The hot paths (a probe, a hit's count) stay small enough to inline into the
  // row loops; the rest is out of line (once add() grew past GCC's inlining limit,
  // grouping slowed down).

  // Adds n (possibly negative) to the count of slot s.
  void bump(Slot& s, index_t n) {
    const index_t c = static_cast<index_t>(s.count) + n;
    if (c >= 0 && c < kLowSpan) {
      s.count = static_cast<std::uint32_t>(c);
      return;
    }
    carry(s, c);
  }
  // A new pattern in free slot s.
  COBALANCE_NOINLINE index_t insert_at(Slot& s, const std::uint64_t* key, std::uint64_t h, index_t n) {
    if (size_ >= kMaxPatterns) throw std::length_error("a pattern table holds at most 2^31 - 1 distinct patterns");
    keys_.insert(keys_.end(), key, key + n_words_);
    s.tag = n_words_ == 1 ? key[0] : h;
    s.id1 = static_cast<std::uint32_t>(++size_);
    s.count = 0;
    bump(s, n);
    if (++region_load_[region_of(h)] * 2 > region_slots()) rehash(slots_.size() * 2);
    return size_ - 1;
  }
  // Rare: moves whole multiples of 2^31 of count c to (or borrows them from)
  // high_counts_.
  COBALANCE_NOINLINE void carry(Slot& s, index_t c) {
    const std::size_t id = s.id1 - 1;
    if (high_counts_.size() <= id) high_counts_.resize(id + 1, 0);
    const index_t low = ((c % kLowSpan) + kLowSpan) % kLowSpan;
    high_counts_[id] += c - low;
    s.count = static_cast<std::uint32_t>(low);
  }

  void rehash(std::size_t capacity) { rebuild(capacity, geo_.bits); }

  // Moves the slots into a table of `capacity` slots in 2^bits regions, doubling it
  // until no region is more than half full. The old table stays intact until the
  // new one is complete, so a failed allocation changes nothing.
  void rebuild(std::size_t capacity, int bits) {
    while (true) {
      Regrid r = regrid_of(capacity, bits);
      // Populated before the fill: its probes read free slots first, which would map
      // the shared zero page and fault again on the write.
      populate_pages(r.slots.data(), r.slots.size() * sizeof(Slot));
      fill_regrid(r);
      if (r.fits) {
        end_regrid(r);
        return;
      }
      capacity *= 2;
    }
  }
  static Regrid regrid_of(std::size_t capacity, int bits) {
    return Regrid{TableArray<Slot>(capacity), Geometry(capacity, bits), std::vector<index_t>(std::size_t{1} << bits, 0)};
  }

  index_t n_words_;
  bool direct_;
  index_t size_ = 0;
  TableArray<std::int32_t> direct_slots_;  // id + 1 by key; 0 = absent
  std::vector<index_t> direct_counts_;
  TableArray<Slot> slots_;
  Geometry geo_;
  std::vector<index_t> region_load_ = std::vector<index_t>(1, 0);  // patterns per region
  index_t low_added_ = 0;           // samples added to slot counts since they last carried
  PackedVector keys_;  // grows without a zero fill: every new key is written
  std::vector<index_t> high_counts_;     // by id: multiples of 2^31 not held in the slots
  std::vector<index_t> pending_counts_;  // counts of the last ids, not yet in the slots
};

}  // namespace cobalance
