#include "cobalance/pattern_table.hpp"

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <new>
#include <stdexcept>
#include <string>
#include <utility>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif
#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#include <immintrin.h>
#endif
#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace cobalance {

int resolve_threads(int n_threads) noexcept {
  if (n_threads > 0) return n_threads;
  const unsigned hw = std::thread::hardware_concurrency();
  return hw == 0 ? 1 : static_cast<int>(hw);
}

namespace {

constexpr index_t kDirectMaxClasses = 16;  // 2^16 int32 slots (256 KiB): a direct table fits in L2
constexpr index_t kRowsPerPart = 1 << 15;  // below this, threads cost more than they save
constexpr int kBatch = 16;                 // rows per pipeline stage: the distance of a prefetch
constexpr index_t kBlocksPerThread = 8;    // add_blocks: blocks per thread, taken from a counter
constexpr int kDirectBatch = 256;          // rows packed per call where nothing is prefetched
constexpr index_t kEmpty = -1;

#if defined(__GNUC__) || defined(__clang__)
#define COBALANCE_NOINLINE __attribute__((noinline))
#else
#define COBALANCE_NOINLINE
#endif
constexpr index_t kMaxPatterns = 0x7fffffffLL;  // a pattern id fits a pattern_id_t

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
// and GCC 12 makes std::copy_n of a constant 40 bytes one too (at C=300, those
// calls took 4.7 % of the partitioned path's time); a memcpy of a constant size
// it expands into moves.
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

inline void prefetch_slot(const void* p) noexcept {
#if defined(__GNUC__) || defined(__clang__)
  __builtin_prefetch(p);
#else
  (void)p;
#endif
}

// Asks for the `bytes` bytes 4 KiB past `row` to be brought into L2 (prefetcht1),
// for the loops that pack dense labels: their reads are sequential, yet alternate
// with other work (probes, list writes) that keeps the hardware prefetchers from
// running ahead. Prefetches never fault, so the addresses may lie past the input.
// Measured (N = 1e7, dense + inverse, 2 threads unless said): AVX-512 packing, C=300
// packing 0.135 -> 0.107 s per thread and the call 0.570-0.581 -> 0.547-0.553 s,
// C=64 on one thread 0.214 -> 0.198 s, C=24 0.056 -> 0.044 s; the portable packing
// (COBALANCE_NO_AVX512), C=9 0.024-0.026 -> 0.015 s, C=64 0.28 -> 0.139 s, C=300
// 0.97 -> 0.645 s. Prefetching into L1 instead was on par, non-temporal
// prefetches 1.5-2x slower.
inline void prefetch_row_ahead(const std::uint8_t* row, index_t bytes) noexcept {
  constexpr index_t kAhead = 4096;
  for (index_t off = 0; off < bytes; off += 64) __builtin_prefetch(row + kAhead + off, 0, 2);
}

#if defined(__linux__)
// madvise(advice) over the whole `align`-byte units inside [p, p + bytes). Only a
// hint: failure changes nothing but speed.
inline void advise_within(void* p, std::size_t bytes, std::uintptr_t align, int advice) noexcept {
  const std::uintptr_t begin = (reinterpret_cast<std::uintptr_t>(p) + align - 1) & ~(align - 1);
  const std::uintptr_t end = (reinterpret_cast<std::uintptr_t>(p) + bytes) & ~(align - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, advice);
}
#endif

// Advises the kernel to back [p, p + bytes) with 2 MiB pages: the tables are
// probed at random, and with 4 KiB pages nearly every probe of a large table would
// also miss the TLB.
inline void advise_huge_pages(void* p, std::size_t bytes) noexcept {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr std::uintptr_t kHuge = std::uintptr_t{1} << 21;
  if (bytes >= 2 * kHuge) advise_within(p, bytes, kHuge, MADV_HUGEPAGE);
#else
  (void)p;
  (void)bytes;
#endif
}

// Asks the kernel to back [p, p + bytes) with written pages now, in one call, rather
// than one page fault at a time as threads write the buffer. Measured here (C=9,
// 1e7 rows, 2 threads): faulting the inverse's pages as the threads wrote it took
// 18 ms on an idle machine but 64-103 ms once other work ran; with this call,
// 20-22 ms in both cases.
inline void populate_pages(void* p, std::size_t bytes) noexcept {
#if defined(__linux__) && defined(MADV_POPULATE_WRITE)
  if (bytes >= (std::size_t{1} << 22)) advise_within(p, bytes, 4096, MADV_POPULATE_WRITE);  // small: faults cost little
#else
  (void)p;
  (void)bytes;
#endif
}

// Populates the 2 MiB units inside [p, p + bytes) (see populate_pages); for steps of
// a buffer being filled in order.
inline void populate_huge_units(void* p, std::size_t bytes) noexcept {
#if defined(__linux__) && defined(MADV_POPULATE_WRITE)
  advise_within(p, bytes, std::uintptr_t{1} << 21, MADV_POPULATE_WRITE);
#else
  (void)p;
  (void)bytes;
#endif
}

// Populates part `part` of `parts` of [p, p + bytes) (see populate_pages), for
// threads that populate a buffer together: the parts meet at 2 MiB boundaries, so
// that no huge page is faulted in by two threads.
inline void populate_part(void* p, std::size_t bytes, std::size_t part, std::size_t parts) noexcept {
#if defined(__linux__) && defined(MADV_POPULATE_WRITE)
  constexpr std::uintptr_t kHuge = std::uintptr_t{1} << 21;
  const std::uintptr_t begin = reinterpret_cast<std::uintptr_t>(p), end = begin + bytes;
  const auto cut = [&](std::size_t k) -> std::uintptr_t {
    if (k == 0) return begin;
    if (k >= parts) return end;
    return std::max(begin, (begin + bytes / parts * k) & ~(kHuge - 1));
  };
  const std::uintptr_t a = cut(part), b = cut(part + 1);
  if (bytes >= (std::size_t{1} << 22) && b > a) advise_within(reinterpret_cast<void*>(a), b - a, 4096, MADV_POPULATE_WRITE);
#else
  (void)p;
  (void)bytes;
  (void)part;
  (void)parts;
#endif
}

// A fixed-size, zero-filled array of trivially copyable T. Large instances are
// mapped straight from the kernel, whose fresh pages are already zero (so no fill
// pass is needed and untouched pages cost nothing), start on a 2 MiB boundary and
// are advised onto huge pages before they are first touched.
template <class T>
class TableArray {
 public:
  TableArray() = default;
  explicit TableArray(std::size_t n) : n_(n) {
    const std::size_t bytes = n * sizeof(T);
#if defined(__linux__) && defined(MAP_ANONYMOUS)
    constexpr std::size_t kHuge = std::size_t{1} << 21;
    if (bytes >= 2 * kHuge) {
      // Over-map by 2 MiB and trim both ends to get an aligned region.
      const std::size_t span = (bytes + kHuge - 1) / kHuge * kHuge;
      void* raw = mmap(nullptr, span + kHuge, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (raw == MAP_FAILED) throw std::bad_alloc();
      const std::uintptr_t base = reinterpret_cast<std::uintptr_t>(raw);
      const std::uintptr_t aligned = (base + kHuge - 1) & ~(std::uintptr_t{kHuge} - 1);
      if (aligned > base) munmap(raw, aligned - base);
      const std::uintptr_t tail = base + span + kHuge - (aligned + span);
      if (tail) munmap(reinterpret_cast<void*>(aligned + span), tail);
      data_ = reinterpret_cast<T*>(aligned);
      mapped_ = span;
      advise_huge_pages(data_, span);
      return;
    }
#endif
    data_ = static_cast<T*>(std::calloc(std::max<std::size_t>(n, 1), sizeof(T)));
    if (!data_) throw std::bad_alloc();
  }
  TableArray(TableArray&& o) noexcept : data_(o.data_), n_(o.n_), mapped_(o.mapped_) {
    o.data_ = nullptr;
    o.n_ = o.mapped_ = 0;
  }
  TableArray& operator=(TableArray&& o) noexcept {
    std::swap(data_, o.data_);
    std::swap(n_, o.n_);
    std::swap(mapped_, o.mapped_);
    return *this;
  }
  TableArray(const TableArray& o) : TableArray(o.n_) { std::copy(o.data_, o.data_ + o.n_, data_); }
  TableArray& operator=(const TableArray& o) {
    if (this != &o) *this = TableArray(o);
    return *this;
  }
  ~TableArray() { release(); }

  std::size_t size() const noexcept { return n_; }
  T* data() noexcept { return data_; }
  const T* data() const noexcept { return data_; }
  T& operator[](std::size_t i) noexcept { return data_[i]; }
  const T& operator[](std::size_t i) const noexcept { return data_[i]; }
  T* begin() noexcept { return data_; }
  T* end() noexcept { return data_ + n_; }
  const T* begin() const noexcept { return data_; }
  const T* end() const noexcept { return data_ + n_; }

 private:
  void release() noexcept {
#if defined(__linux__) && defined(MAP_ANONYMOUS)
    if (mapped_) {
      munmap(data_, mapped_);
      return;
    }
#endif
    std::free(data_);
  }

  T* data_ = nullptr;
  std::size_t n_ = 0;
  std::size_t mapped_ = 0;  // bytes mapped with mmap, 0 when from calloc
};

// Writes an inverse entry. Plain stores: measured here, non-temporal stores (which
// skip reading the line) were slower on pages faulted in by the stores themselves,
// and on the pages populated beforehand (populate_pages) no better overall (faster
// with one thread at C=9, on par with two, slower at C=300).
inline void store_inverse(pattern_id_t* p, index_t v) noexcept { *p = static_cast<pattern_id_t>(v); }

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#define COBALANCE_X86_AVX512 1
// COBALANCE_NO_AVX512 (any value) selects the portable paths on an AVX-512 machine, so
// that the tests also cover what CPUs without it run.
bool cpu_has_avx512bw() noexcept {
  static const bool yes = std::getenv("COBALANCE_NO_AVX512") == nullptr && __builtin_cpu_supports("avx512f") &&
                          __builtin_cpu_supports("avx512bw");
  return yes;
}
// COBALANCE_NO_AVX2 (any value) likewise selects the SSE2 packing where AVX2 is there.
bool cpu_has_avx2() noexcept {
  static const bool yes = std::getenv("COBALANCE_NO_AVX2") == nullptr && __builtin_cpu_supports("avx2");
  return yes;
}

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
#endif

}  // namespace

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
  explicit PatternIndex(index_t n_classes)
      : n_words_(words_for(n_classes)), direct_(n_classes <= kDirectMaxClasses) {
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
  // The direct layout's find and add(key, 1), small enough to inline in row loops.
  index_t find_direct(std::uint64_t key) const noexcept {
    return static_cast<index_t>(direct_slots_[static_cast<std::size_t>(key)]) - 1;
  }
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
  // inserted inline while no rehash, key reallocation or id limit is near. C=64,
  // 1e7 rows, 2 threads: the pipelined insertion took 0.153-0.164 s with add(),
  // 0.104-0.116 s so.
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
  // scan does not branch on every slot. Measured at C=300 (6.8M patterns, 16M
  // slots, 2 threads): 65 ms with every count written, 33 ms so.
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
        if (cpu_has_avx512bw()) {  // C=300, N=1e7, 2 threads: the call 0.574-0.581 -> 0.555-0.568 s
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
    bool fits = true;  // no region more than half full
  };
  Regrid begin_regrid(index_t n_patterns, index_t n_keys, int bits) {
    std::size_t capacity = std::max<std::size_t>(slots_.size(), std::size_t{1024} << bits);
    while (static_cast<index_t>(capacity) < 2 * std::max(n_patterns, size_)) capacity *= 2;
    const std::size_t key_words = static_cast<std::size_t>(std::max(n_keys, size_) * n_words_);
    if (keys_.capacity() < key_words) {
      keys_.reserve(key_words);
      advise_huge_pages(keys_.data() + keys_.size(), (keys_.capacity() - keys_.size()) * sizeof(std::uint64_t));
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
  // the prefetch. C=64, a stream of 1e8 rows in batches of 1e7 (10.1M patterns,
  // the table rebuilt 3 times): without it the rebuilds took about 0.3 s of 1.32 s.
  void fill_regrid(Regrid& r) const noexcept {
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
  index_t add_provisional(const std::uint64_t* key, std::uint64_t h, index_t provisional,
                          const std::uint64_t* const* fresh_keys, index_t stride, std::uint64_t& slot) noexcept {
    std::uint64_t pos = home(h);
    while (true) {
      Slot& s = slots_[pos];
      if (s.id1 == 0) {
        s = Slot{n_words_ == 1 ? key[0] : h, static_cast<std::uint32_t>(provisional + 1), 1};
        slot = pos;
        return provisional;
      }
      if (n_words_ == 1 ? s.tag == key[0] : s.tag == h && same_key(s, key, fresh_keys, stride)) {
        ++s.count;  // cannot carry: see make_count_room
        return static_cast<index_t>(s.id1) - 1;
      }
      pos = next(pos);
    }
  }
  // add_provisional for keys of several words, comparing a final id's stored key
  // only by its hash: the first slot with hash h and a final id is taken for `key`
  // without reading the stored key, which is where probes otherwise waited (at
  // C=300, the compare's cache misses were a third of the insertion loop's time).
  // The caller checks each such match afterwards (same_as_stored, a loop whose
  // reads of the stored keys overlap) and calls unmatch for a false one, then
  // add_provisional. Provisional ids, whose keys are in cache, are compared whole.
  index_t add_provisional_by_hash(const std::uint64_t* key, std::uint64_t h, index_t provisional,
                                  const std::uint64_t* const* fresh_keys, index_t stride,
                                  std::uint64_t& slot) noexcept {
    std::uint64_t pos = home(h);
    while (true) {
      Slot& s = slots_[pos];
      if (s.id1 == 0) {
        s = Slot{h, static_cast<std::uint32_t>(provisional + 1), 1};
        slot = pos;
        return provisional;
      }
      if (s.tag == h && (static_cast<index_t>(s.id1) <= size_ || same_key(s, key, fresh_keys, stride))) {
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
  // Takes back the sample that add_provisional_by_hash gave to final id `id` (hash h)
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
  // row loops; the rest is out of line (measured: once add() grew past GCC's
  // inlining limit, C=24 grouping took 15 % longer).

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
      // the shared zero page and fault again on the write (C=64, 1e7 rows, one
      // thread: 0.291 -> 0.279 s).
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

// ---------------------------------------------------------------------------
// PatternTable

PatternTable::PatternTable() = default;
PatternTable::PatternTable(index_t n_classes) : n_classes_(n_classes) {
  if (n_classes < 1)
    throw std::invalid_argument("n_classes must be >= 1, got " + std::to_string(n_classes));
}
PatternTable::PatternTable(const PatternTable&) = default;
PatternTable::PatternTable(PatternTable&&) noexcept = default;
PatternTable& PatternTable::operator=(const PatternTable&) = default;
PatternTable& PatternTable::operator=(PatternTable&&) noexcept = default;
PatternTable::~PatternTable() = default;

std::vector<std::uint8_t> PatternTable::dense() const {
  const index_t k = n_patterns(), c = n_classes_;
  std::vector<std::uint8_t> out(static_cast<std::size_t>(k * c));
  for (index_t j = 0; j < k; ++j)
    for (index_t i = 0; i < c; ++i) out[static_cast<std::size_t>(j * c + i)] = has_class(j, i);
  return out;
}

void PatternTable::sparse(std::vector<index_t>& indptr, std::vector<index_t>& indices) const {
  const index_t k = n_patterns(), nw = n_words();
  indptr.assign(static_cast<std::size_t>(k) + 1, 0);
  indices.clear();
  for (index_t j = 0; j < k; ++j) {
    for (index_t w = 0; w < nw; ++w) {
      std::uint64_t bits = packed_[static_cast<std::size_t>(j * nw + w)];
      while (bits) {
        const int b = __builtin_ctzll(bits);
        indices.push_back(w * 64 + b);
        bits &= bits - 1;
      }
    }
    indptr[static_cast<std::size_t>(j) + 1] = static_cast<index_t>(indices.size());
  }
}

std::vector<index_t> PatternTable::class_counts() const {
  std::vector<index_t> out(static_cast<std::size_t>(n_classes_), 0);
  const index_t nw = n_words();
  for (index_t j = 0; j < n_patterns(); ++j) {
    for (index_t w = 0; w < nw; ++w) {
      std::uint64_t bits = packed_[static_cast<std::size_t>(j * nw + w)];
      while (bits) {
        out[static_cast<std::size_t>(w * 64 + __builtin_ctzll(bits))] += counts_[static_cast<std::size_t>(j)];
        bits &= bits - 1;
      }
    }
  }
  return out;
}

namespace {

// Bits at or beyond n_classes in the last word of a packed row.
inline std::uint64_t tail_mask(index_t n_classes) noexcept {
  const index_t r = n_classes & 63;
  return r == 0 ? 0 : ~((std::uint64_t{1} << r) - 1);
}

}  // namespace

PatternTable PatternTable::from_parts(index_t n_classes, PackedVector packed,
                                      std::vector<index_t> counts, InverseVector inverse,
                                      bool has_inverse) {
  PatternTable t(n_classes);
  const index_t nw = t.n_words();
  const index_t k = static_cast<index_t>(counts.size());
  if (static_cast<index_t>(packed.size()) != k * nw)
    throw std::invalid_argument("packed patterns must hold n_patterns * n_words = " +
                                std::to_string(k * nw) + " words, got " +
                                std::to_string(packed.size()));
  const std::uint64_t tail = tail_mask(n_classes);
  PatternIndex index(n_classes);
  index_t total = 0;
  for (index_t j = 0; j < k; ++j) {
    const std::uint64_t* key = packed.data() + j * nw;
    if (key[nw - 1] & tail)
      throw std::invalid_argument("pattern " + std::to_string(j) + " has a class >= n_classes = " +
                                  std::to_string(n_classes));
    if (index.add(key, 0) != j)
      throw std::invalid_argument("pattern " + std::to_string(j) + " is a duplicate of an earlier pattern");
    if (counts[static_cast<std::size_t>(j)] < 1)
      throw std::invalid_argument("counts[" + std::to_string(j) + "] must be >= 1, got " +
                                  std::to_string(counts[static_cast<std::size_t>(j)]));
    total += counts[static_cast<std::size_t>(j)];
  }
  if (has_inverse) {
    if (static_cast<index_t>(inverse.size()) != total)
      throw std::invalid_argument("inverse must have sum(counts) = " + std::to_string(total) +
                                  " entries, got " + std::to_string(inverse.size()));
    std::vector<index_t> seen(static_cast<std::size_t>(k), 0);
    for (std::size_t r = 0; r < inverse.size(); ++r) {
      const index_t v = inverse[r];
      if (v < 0 || v >= k)
        throw std::invalid_argument("inverse[" + std::to_string(r) + "] = " + std::to_string(v) +
                                    " is not a pattern index in [0, " + std::to_string(k) + ")");
      ++seen[static_cast<std::size_t>(v)];
    }
    if (seen != counts) throw std::invalid_argument("counts do not match the inverse (bincount(inverse) != counts)");
  } else if (!inverse.empty()) {
    throw std::invalid_argument("inverse given but has_inverse is false");
  }
  t.n_samples_ = total;
  t.has_inverse_ = has_inverse;
  t.packed_ = std::move(packed);
  t.counts_ = std::move(counts);
  t.inverse_ = std::move(inverse);
  return t;
}

// ---------------------------------------------------------------------------
// PatternTableBuilder

struct PatternTableBuilder::State {
  State(index_t c, bool keep, int threads)
      : n_classes(c), keep_inverse(keep), n_threads(threads), index(c) {}
  index_t n_classes;
  bool keep_inverse;
  int n_threads;
  index_t n_samples = 0;
  index_t expected_samples = 0;  // expect_samples(): 0 = not known
  PatternIndex index;  // patterns so far, with their counts
  InverseVector inverse;

  // Groups rows [0, n_rows) of one batch. pack(r, n, keys) writes the packed keys of
  // rows [r, r + n) (n <= kDirectBatch) into keys (n x n_words words) and throws
  // std::invalid_argument naming the first bad row among them.
  //
  // Determinism: a prefix of the batch is resolved on one thread straight into the
  // global index, so its ids are final; with one thread the prefix is the whole
  // batch. The rest goes one of two ways, both giving the ids of one sequential pass:
  //  - few new patterns (the prefix found few): contiguous blocks, one per thread,
  //    look rows up in the global index (read-only there) and give the rows it
  //    lacks block-local ids; the block-local patterns are then numbered block by
  //    block in local first-occurrence order (add_blocks), which is the order of
  //    first occurrence over the batch, and only those rows are rewritten;
  //  - many new patterns, keys of one word: one thread inserts every row in order
  //    while the others pack and hash rows ahead of it (insert_rows_pipelined);
  //  - many new patterns, wider keys: the threads insert in parallel, each into its
  //    own regions of the index, chunk by chunk in lockstep, new patterns numbered
  //    by first row at the end of each chunk (insert_rows_partitioned).
  // Nothing depends on timing or on the number of threads.
  template <class Pack>
  void add_rows(index_t n_rows, const Pack& pack) {
    if (n_rows < 0) throw std::invalid_argument("n_rows must be >= 0, got " + std::to_string(n_rows));
    if (n_rows == 0) return;
    index.sync();
    const int parts = parts_for(n_rows, n_threads, kRowsPerPart);
    // The prefix takes the frequent patterns into the global index, so that most
    // rows of the blocks resolve to final ids; it is short because one thread runs it.
    index_t prefix =
        parts == 1 ? n_rows : std::min(n_rows, std::max<index_t>(4096, n_rows / (16 * static_cast<index_t>(parts))));
    const std::size_t old_size = inverse.size();
    pattern_id_t* inv = keep_inverse ? grow_inverse(n_rows) : nullptr;
    const index_t k0 = index.size();
    index_t done = 0;  // rows of the prefix counted in `index`
    try {
      // The first rows (the probe) run in two halves: how the number of patterns
      // grows from one to the other sizes the hash table for the whole batch,
      // instead of doubling it step by step. When they show many new patterns, the
      // table is built directly (below) and the rest of the prefix would only keep
      // the other threads waiting (at C=300, 2 threads: 0.71 -> 0.67 s; at C=64,
      // since the one-word insertion loop (PatternIndex::add_ones_one_word), 0.136
      // -> 0.131 s against the probe spanning the whole prefix).
      const index_t probe = std::min(prefix, std::max<index_t>(4096, n_rows / 128));
      insert_rows(0, probe / 2, pack, inv, done);
      const index_t k_half = index.size();
      insert_rows(probe / 2, probe, pack, inv, done);
      // With expect_samples(), the estimate reaches over the rows still to come, so
      // that a stream's table is sized once (C=64, 1e8 rows in batches of 1e7, 10.1M
      // patterns: 1.24 s with the table growing three times, 0.93 s so). Its growth
      // is capped at 8x the batch's own estimate (there 7.1x: 17.4M patterns against
      // 2.46M for the first batch), so that a short first batch or a wrong hint
      // cannot reserve a table far beyond the batch's.
      index_t expected = probe < n_rows ? presize(k0, k_half, probe, n_rows) : 0;
      if (expected > 0 && expected_samples - n_samples > n_rows)
        expected = std::min(presize(k0, k_half, probe, expected_samples - n_samples), k0 + 8 * (expected - k0));
      if (parts > 1 && probe < prefix) {
        if (!index.direct() && (index.size() - k0) * 32 > probe)
          prefix = probe;
        else
          insert_rows(probe, prefix, pack, inv, done);
      }
      // The inverse's pages past the prefix are populated ahead of the rows that
      // write them (see populate_pages): here, or in add_blocks by one of its threads.
      const auto populate_from = [&](index_t row) {
        if (inv) populate_pages(inv + row, static_cast<std::size_t>(n_rows - row) * sizeof(pattern_id_t));
      };
      if (parts == 1) {
        // Many new patterns with keys of several words: the partitioned path on
        // this one thread, whose probes match final ids by hash and check the keys
        // afterwards, in a loop whose reads overlap; insert_rows compares each key
        // in the probe. C=300, 1e7 rows, 1 thread: 1.10-1.15 s -> 0.82 s; C=1000
        // 0.22 -> 0.17 s; C=128 on par (0.27 s).
        if (expected > 0 && fits_partitioned(n_rows - probe, 1)) {
          insert_rows_partitioned(probe, n_rows, 1, expected, pack, inv, done);
        } else {
          index.reserve(slots_for(expected));
          populate_from(probe);
          insert_rows(probe, n_rows, pack, inv, done);
        }
      }
      if (prefix < n_rows) {
        // Blocks pay off when their local tables stay small. When the prefix shows
        // many new patterns (as with many classes), merging the blocks' tables
        // would cost about as much as building them, and when the index already
        // holds many more patterns than a block has rows (a late chunk of a long
        // stream), the blocks' per-pattern counters would outweigh their rows. Then
        // the table is built directly: for keys of one word by one thread while the
        // others pack (measured here, splitting the insertion gained nothing at
        // C = 64 and lost 29 % at C = 24: the probes compare the key held in the
        // slot, and exchanging rows between threads costs as much), for wider keys
        // by all threads (probes also fetch the stored key; measured 5-22 % faster
        // at C = 128-1000). The partitioned path needs ids and counts that cannot
        // overflow within the batch.
        const index_t new_in_prefix = index.size() - k0;
        const index_t block_rows = (n_rows - prefix) / parts;
        if (!index.direct() && (new_in_prefix * 32 > prefix || index.size() > block_rows / 4)) {
          if (fits_partitioned(n_rows - prefix, parts)) {
            insert_rows_partitioned(prefix, n_rows, parts, expected, pack, inv, done);
          } else {
            reserve_populated(slots_for(expected), parts, inv, prefix, n_rows);
            insert_rows_pipelined(prefix, n_rows, parts, pack, inv, done);
          }
        } else {
          add_blocks(prefix, n_rows, parts, pack, inv);
        }
      }
    } catch (...) {
      undo_prefix(k0, done, pack);
      inverse.resize(old_size);
      throw;
    }
    n_samples += n_rows;
  }

 private:
  // The patterns expected after the next n_rows rows (this batch, or all the rows
  // still expected; 0: too few new ones to size the table for), from those found in
  // the batch's first `probe` rows (k0 before, k_half after the first half): new
  // patterns taken to grow like rows^b (b from the two halves, at most 1), capped
  // by one per row. The callers reserve slots_for(it), so that the estimate fills
  // at most 60 % of the table. Only speed depends on the estimate.
  index_t presize(index_t k0, index_t k_half, index_t probe, index_t n_rows) {
    const index_t new1 = k_half - k0, new2 = index.size() - k0;
    if (index.direct() || new2 * 32 <= probe) return 0;  // few new patterns: nothing to gain
    double b = 1.0;
    if (new1 > 0 && new2 > new1) b = std::min(1.0, std::log2(static_cast<double>(new2) / static_cast<double>(new1)));
    const double grown = static_cast<double>(new2) * std::pow(static_cast<double>(n_rows) / static_cast<double>(probe), b);
    const double expected = static_cast<double>(k0) + std::min(grown, static_cast<double>(n_rows));
    return static_cast<index_t>(expected);
  }

  // Whether n_rows more rows can take insert_rows_partitioned on `parts` threads:
  // keys of several words, and ids and slot counts that cannot overflow within the
  // rows (provisional ids reach past the final ones by at most a chunk's rows times
  // the threads). make_count_room may first move the slots' counts aside.
  bool fits_partitioned(index_t n_rows, int parts) {
    const index_t margin = 2048 * index_t{parts} * parts;
    return !index.direct() && index.n_words() > 1 && index.size() + n_rows + margin <= kMaxPatterns &&
           index.make_count_room(n_rows);
  }

  // The patterns to reserve slots for when `expected` are expected: the table then
  // has at least expected / 0.6 slots.
  static index_t slots_for(index_t expected) noexcept { return static_cast<index_t>(static_cast<double>(expected) / 1.2); }

  // index.reserve(n_patterns), then the inverse's pages for rows [from, n_rows)
  // populated (see populate_pages), both on `parts` threads that each populate
  // their own 2 MiB units of the new table and of the inverse (see populate_part).
  // C=64, 1e7 rows, 2 threads: these steps took 12.7 ms on the calling thread
  // alone, 7.6 ms so.
  void reserve_populated(index_t n_patterns, int parts, pattern_id_t* inv, index_t from, index_t n_rows) {
    const std::size_t inv_bytes = static_cast<std::size_t>(n_rows - from) * sizeof(pattern_id_t);
    const std::size_t P = static_cast<std::size_t>(parts);
    if (index.slots_needed(n_patterns) <= index.slot_count()) {
      index.reserve(n_patterns);  // the keys' room only
      run_parts(parts, [&](int t) {
        if (inv) populate_part(inv + from, inv_bytes, static_cast<std::size_t>(t), P);
      });
      return;
    }
    PatternIndex::Regrid regrid = index.begin_regrid(n_patterns, n_patterns, index.region_bits());
    run_parts(parts, [&](int t) {
      PatternIndex::populate_regrid(regrid, static_cast<std::size_t>(t), P);
      if (inv) populate_part(inv + from, inv_bytes, static_cast<std::size_t>(t), P);
    });
    index.fill_regrid(regrid);
    index.end_regrid(regrid);
  }

  // Room for n_rows more inverse entries; returns where they start. Large buffers
  // are advised onto huge pages before their first touch (fewer page faults).
  pattern_id_t* grow_inverse(index_t n_rows) {
    const std::size_t old_size = inverse.size(), need = old_size + static_cast<std::size_t>(n_rows);
    if (need > inverse.capacity()) {
      inverse.reserve(std::max(need, 2 * old_size));
      advise_huge_pages(inverse.data() + old_size, (inverse.capacity() - old_size) * sizeof(pattern_id_t));
    }
    inverse.resize(need);
    return inverse.data() + old_size;
  }


  // Per-thread buffers of one pipeline stage: kBatch rows' keys, hashes and ids.
  struct Stage {
    explicit Stage(index_t nw) : keys(static_cast<std::size_t>(kBatch * nw)) {}
    std::vector<std::uint64_t> keys;
    std::uint64_t hash[kBatch];
    index_t id[kBatch];
    index_t row = 0;
    int n = 0;
  };

  // Rows [begin, end) straight into the global index; `done` follows the rows counted.
  // Packing the next batch while probing this one overlaps their cache misses.
  template <class Pack>
  void insert_rows(index_t begin, index_t end, const Pack& pack, pattern_id_t* inv, index_t& done) {
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

  // Rows [begin, end) straight into the global index, like insert_rows, with
  // parts - 1 threads packing and hashing chunks of rows ahead of the thread that
  // probes the index. Chunk c is packed by thread 1 + c % (parts - 1) into ring slot
  // c % ring, unless the inserting thread reaches it first and packs it itself (so a
  // packer that is not scheduled delays nothing). Rows are inserted strictly in
  // order, so ids are those of one pass.
  template <class Pack>
  void insert_rows_pipelined(index_t begin, index_t end, int parts, const Pack& pack, pattern_id_t* inv,
                             index_t& done) {
    const index_t nw = index.n_words();
    // Rows per chunk: 2048, fewer for very wide rows so that a buffer stays ~0.5 MiB.
    const index_t kChunk = std::max<index_t>(kBatch, std::min<index_t>(2048, 65536 / nw));
    constexpr index_t kAhead = 64;  // prefetch distance, in rows (16: 4-8 % slower at C=24 and C=64)
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
  void insert_rows_partitioned(index_t begin, index_t end, int parts, index_t expected, const Pack& pack,
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
    // its hash alone (add_provisional_by_hash) is listed, and the listed rows are
    // then compared with their stored keys, those reads prefetched ahead; a row
    // whose key differs (two keys with one 64-bit hash) is taken back and added
    // again with whole-key compares. The rows are handled in order either way, so
    // a pattern's first row is its first row in the chunk. C=300, N = 1e7, 2
    // threads, a C++ loop over the same data (minimum of 6 calls, two runs each):
    // 0.518-0.528 s with whole-key compares in the probes, 0.435-0.436 s so
    // (together with copy_key and fresh keys kept as pointers into the lists).
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
              index.add_provisional_by_hash(key, hash[j], provisional, mine.fresh_keys.data(), parts, slot);
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
        const index_t id = index.add_provisional(key, b.hash[at], provisional, mine.fresh_keys.data(), parts, slot);
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
        // the fresh ones in order. C=300, 1e7 rows, 1 thread: this step 0.097 ->
        // 0.037 s, the call 0.79-0.80 -> 0.725-0.73 s.
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
    // (their runs of new keys are adjacent), and measured at C=300 that cost the
    // thread reaching it first 0.46 s in all, against 0.08 s. The capacity reserved
    // for the estimate is populated by all threads with the table (below); should
    // the keys move to a larger reserve, thread 0 populates the new pages while it
    // waits for the others at a barrier, 2 MiB at a time (populate_keys_step). That
    // was the only way until measured at C=300 (2 threads, with the rows
    // prefetched while packing): populating all of the keys that way, 0.520-0.533 s,
    // the threads waiting 42-50 ms each at the barriers, as a step blocks the thread
    // that arrives meanwhile; up front on all threads, 0.505-0.509 s, waits 8-15 ms.
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
      // and of the keys' (above), each its own 2 MiB units (C=300, 2 threads:
      // 0.607 -> 0.587 s for the table and the inverse, against thread 0 populating
      // them while the others waited). Then thread 0 moves the index's patterns
      // into the table while the others pack.
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

  // Undoes the counts and patterns of the first `done` rows (their keys are valid,
  // so packing them again cannot throw).
  template <class Pack>
  void undo_prefix(index_t k0, index_t done, const Pack& pack) {
    const index_t nw = index.n_words();
    Stage st(nw);
    for (index_t r = 0; r < done; r += kBatch) {
      const int n = static_cast<int>(std::min<index_t>(kBatch, done - r));
      pack(r, n, st.keys.data());
      for (int i = 0; i < n; ++i) {
        const std::uint64_t* key = st.keys.data() + i * nw;
        index.add(key, -1);
      }
    }
    index.truncate(k0);
  }

  struct Block {
    Block(index_t c, index_t known) : local(c), known_counts(static_cast<std::size_t>(known), 0) {}
    PatternIndex local;                 // patterns not in the global index, first-occurrence order
    std::vector<index_t> known_counts;  // samples per global pattern known before the block
    std::vector<index_t> unresolved;    // rows holding a local id (while few)
    bool rescan = false;                // too many to list: scan the block's inverse instead
    std::vector<index_t> to_global;     // local id -> global id, set after the blocks ran
  };

  template <class Pack>
  void add_blocks(index_t begin, index_t end, int parts, const Pack& pack, pattern_id_t* inv) {
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
    for (std::size_t b = 0; b < n_blocks; ++b) blocks.emplace_back(n_classes, known);

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
};

PatternTableBuilder::PatternTableBuilder(index_t n_classes, bool keep_inverse, int n_threads) {
  if (n_classes < 1)
    throw std::invalid_argument("n_classes must be >= 1, got " + std::to_string(n_classes));
  state_ = std::make_unique<State>(n_classes, keep_inverse, n_threads);
}
PatternTableBuilder::PatternTableBuilder(PatternTableBuilder&&) noexcept = default;
PatternTableBuilder& PatternTableBuilder::operator=(PatternTableBuilder&&) noexcept = default;
PatternTableBuilder::~PatternTableBuilder() = default;

index_t PatternTableBuilder::n_classes() const noexcept { return state_->n_classes; }
index_t PatternTableBuilder::n_samples() const noexcept { return state_->n_samples; }
index_t PatternTableBuilder::n_patterns() const noexcept { return state_->index.size(); }

void PatternTableBuilder::expect_samples(index_t n_total) {
  if (n_total < 0) throw std::invalid_argument("expect_samples: n_total must be >= 0, got " + std::to_string(n_total));
  state_->expected_samples = n_total;
}

namespace {

[[noreturn]] void bad_dense_value(index_t row, index_t col, unsigned value) {
  throw std::invalid_argument("labels must be 0 or 1, got " + std::to_string(value) + " at row " +
                              std::to_string(row) + ", column " + std::to_string(col));
}

// Packs one row of 0/1 bytes, reading only [row, row + c). Returns nonzero when a
// byte is neither 0 nor 1.
inline std::uint64_t pack_row_exact(const std::uint8_t* row, index_t c, index_t nw, std::uint64_t* key) noexcept {
  std::uint64_t bad = 0;
  for (index_t w = 0; w < nw; ++w) {
    const index_t begin = w * 64, end = std::min(c, begin + 64);
    std::uint64_t word = 0;
    index_t i = begin;
    // Eight 0/1 bytes -> eight bits with one multiply: byte b lands on bit 56 + b.
    for (; i + 8 <= end; i += 8) {
      std::uint64_t x;
      std::memcpy(&x, row + i, 8);
      bad |= x & 0xfefefefefefefefeULL;
      word |= ((x * 0x0102040810204080ULL) >> 56) << (i - begin);
    }
    for (; i < end; ++i) {
      bad |= row[i] & 0xfeu;
      word |= static_cast<std::uint64_t>(row[i] & 1u) << (i - begin);
    }
    key[w] = word;
  }
  return bad;
}

#if defined(__SSE2__)
// Packs one row sixteen bytes at a time: chunk k covers classes [16k, 16k + 16),
// `valid[k]` masks the bytes of the chunk that belong to the row. Reads up to 15
// bytes past the row (the caller guarantees they exist) and ignores them.
inline unsigned pack_row_wide(const std::uint8_t* row, index_t n_chunks, const std::uint32_t* valid,
                              std::uint64_t* key) noexcept {
  const __m128i high = _mm_set1_epi8(static_cast<char>(0xfe));
  const __m128i zero = _mm_setzero_si128();
  unsigned bad = 0;
  std::uint64_t word = 0;
  for (index_t k = 0; k < n_chunks; ++k) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 16 * k));
    // Bit 0 of each byte moved to its bit 7, where movemask collects it.
    const unsigned bits = static_cast<unsigned>(_mm_movemask_epi8(_mm_slli_epi64(v, 7)));
    const unsigned ok = static_cast<unsigned>(_mm_movemask_epi8(_mm_cmpeq_epi8(_mm_and_si128(v, high), zero)));
    bad |= ~ok & valid[k];
    word |= static_cast<std::uint64_t>(bits & valid[k]) << (16 * (k & 3));
    if ((k & 3) == 3 || k + 1 == n_chunks) {
      key[k >> 2] = word;
      word = 0;
    }
  }
  return bad;
}
#endif

#if defined(COBALANCE_X86_AVX512)
// pack_row_wide with 32-byte chunks (chunk k: classes [32k, 32k + 32), `valid[k]`
// its bytes of the row): half the loads of SSE2, for CPUs with AVX2 but not
// AVX-512BW. Reads up to 31 bytes past the row (the caller guarantees they exist).
__attribute__((target("avx2"))) unsigned pack_row_avx2(const std::uint8_t* row, index_t n_chunks,
                                                       const std::uint32_t* valid, std::uint64_t* key) noexcept {
  const __m256i high = _mm256_set1_epi8(static_cast<char>(0xfe));
  const __m256i zero = _mm256_setzero_si256();
  std::uint32_t bad = 0;
  std::uint64_t word = 0;
  for (index_t k = 0; k < n_chunks; ++k) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 32 * k));
    const std::uint32_t bits = static_cast<std::uint32_t>(_mm256_movemask_epi8(_mm256_slli_epi64(v, 7)));
    const std::uint32_t ok =
        static_cast<std::uint32_t>(_mm256_movemask_epi8(_mm256_cmpeq_epi8(_mm256_and_si256(v, high), zero)));
    bad |= ~ok & valid[k];
    word |= static_cast<std::uint64_t>(bits & valid[k]) << (32 * (k & 1));
    if ((k & 1) == 1 || k + 1 == n_chunks) {
      key[k >> 1] = word;
      word = 0;
    }
  }
  return bad;
}
#endif

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#define COBALANCE_PACK_AVX512 1
// Packs n rows of c 0/1 bytes, one 64-byte (masked) load per 64 classes; masked-off
// bytes are not read, so nothing past the last row is touched. Returns nonzero when
// a byte is neither 0 nor 1. Called only where the CPU has AVX-512BW.
__attribute__((target("avx512f,avx512bw"))) std::uint64_t pack_rows_avx512(const std::uint8_t* rows, index_t c,
                                                                              index_t nw, int n,
                                                                              std::uint64_t* keys) {
  const __m512i one = _mm512_set1_epi8(1), high = _mm512_set1_epi8(static_cast<char>(0xfe));
  const __mmask64 tail = c % 64 == 0 ? ~__mmask64{0} : (__mmask64{1} << (c % 64)) - 1;
  __mmask64 bad = 0;
  for (int i = 0; i < n; ++i) {
    const std::uint8_t* row = rows + i * c;
    std::uint64_t* key = keys + i * nw;
    prefetch_row_ahead(row, c);
    for (index_t w = 0; w + 1 < nw; ++w) {
      const __m512i v = _mm512_loadu_si512(row + 64 * w);
      key[w] = _mm512_test_epi8_mask(v, one);
      bad |= _mm512_test_epi8_mask(v, high);
    }
    const __m512i v = _mm512_maskz_loadu_epi8(tail, row + 64 * (nw - 1));
    key[nw - 1] = _mm512_test_epi8_mask(v, one);
    bad |= _mm512_test_epi8_mask(v, high);
  }
  return bad;
}

// Packs n <= kDirectBatch rows of c <= 16 0/1 bytes. The rows are contiguous, so one
// byte test per 64-byte block turns the batch into one bit stream in which row i
// is bits [i c, i c + c). Eight rows are c bytes of it, row j at bit j c of them,
// so one word permute gives each of eight lanes the 64 bits that hold its row,
// and a shift and a mask cut the keys out (a scalar cut per row took about a fifth
// of the grouping at C=9). Only the batch's bytes are read (the last block is a
// masked load). Returns nonzero when a byte is neither 0 nor 1. Called only where
// the CPU has AVX-512BW.
__attribute__((target("avx512f,avx512bw"))) std::uint64_t pack_small_rows_avx512(const std::uint8_t* rows,
                                                                                    index_t c, int n,
                                                                                    std::uint64_t* keys) {
  constexpr index_t kMaxBlocks = kDirectBatch * kDirectMaxClasses / 64;
  // The stream, and room for the last group's 64-byte load.
  alignas(64) std::uint64_t bits[kMaxBlocks + 8];
  const __m512i one = _mm512_set1_epi8(1), high = _mm512_set1_epi8(static_cast<char>(0xfe));
  const index_t bytes = n * c;
  index_t blocks = bytes / 64;
  __mmask64 bad = 0;
  for (index_t b = 0; b < blocks; ++b) {
    // The next batch's bytes: the hardware prefetcher alone leaves this loop waiting.
    _mm_prefetch(reinterpret_cast<const char*>(rows + bytes + 64 * b), _MM_HINT_T0);
    const __m512i v = _mm512_loadu_si512(rows + 64 * b);
    bits[b] = _mm512_test_epi8_mask(v, one);
    bad |= _mm512_test_epi8_mask(v, high);
  }
  if (const index_t rest = bytes - 64 * blocks) {
    const __m512i v = _mm512_maskz_loadu_epi8((__mmask64{1} << rest) - 1, rows + 64 * blocks);
    bits[blocks++] = _mm512_test_epi8_mask(v, one);
    bad |= _mm512_test_epi8_mask(v, high);
  }
  std::fill(bits + blocks, bits + blocks + 8, std::uint64_t{0});
  // Lane j takes the four 16-bit words from word (j c) / 16 on, shifted by (j c) % 16.
  alignas(64) std::uint16_t word_of[32];
  alignas(64) std::uint64_t shift_of[8];
  for (int j = 0; j < 8; ++j) {
    const int bit = j * static_cast<int>(c);
    for (int w = 0; w < 4; ++w) word_of[4 * j + w] = static_cast<std::uint16_t>((bit >> 4) + w);
    shift_of[j] = static_cast<std::uint64_t>(bit & 15);
  }
  const __m512i words = _mm512_load_si512(word_of), shifts = _mm512_load_si512(shift_of);
  const __m512i mask = _mm512_set1_epi64(static_cast<long long>((std::uint64_t{1} << c) - 1));
  const unsigned char* stream = reinterpret_cast<const unsigned char*>(bits);
  for (int g = 0; 8 * g < n; ++g) {
    const __m512i group = _mm512_loadu_si512(stream + g * c);
    // maskz with all lanes: the unmasked form trips a false GCC 12 warning in its header.
    const __m512i k = _mm512_and_si512(_mm512_maskz_srlv_epi64(0xff, _mm512_permutexvar_epi16(words, group), shifts), mask);
    const int left = n - 8 * g;
    if (left >= 8)
      _mm512_storeu_si512(keys + 8 * g, k);
    else
      _mm512_mask_storeu_epi64(keys + 8 * g, static_cast<__mmask8>((1u << left) - 1), k);
  }
  return bad;
}

#endif

}  // namespace

void PatternTableBuilder::add_dense(const std::uint8_t* data, index_t n_rows) {
  State& s = *state_;
  const index_t c = s.n_classes, nw = words_for(c);
  const index_t row0 = s.n_samples;
  if (n_rows > 0 && data == nullptr) throw std::invalid_argument("dense labels: null data pointer");
  // The masks of the row's bytes in each of its `width`-byte chunks, and the rows
  // whose chunk loads stay inside the buffer (the last few are packed exactly).
  const auto chunk_masks = [c](index_t width) {
    std::vector<std::uint32_t> masks(static_cast<std::size_t>((c + width - 1) / width));
    for (std::size_t k = 0; k < masks.size(); ++k) {
      const index_t len = std::min<index_t>(width, c - width * static_cast<index_t>(k));
      masks[k] = len == 32 ? 0xffffffffu : (std::uint32_t{1} << len) - 1u;
    }
    return masks;
  };
  const auto rows_in_buffer = [c, n_rows](index_t width) {
    const index_t overread = (c + width - 1) / width * width - c;
    return std::max<index_t>(0, n_rows - (overread + c - 1) / c);
  };
  auto report = [&](index_t r, int n) {
    for (index_t rr = r; rr < r + n; ++rr)
      for (index_t j = 0; j < c; ++j)
        if (data[rr * c + j] > 1) bad_dense_value(row0 + rr, j, data[rr * c + j]);
  };
  // Rows of more than 16 classes, `width` bytes per load by pack_row where the
  // loads stay inside the buffer, exactly otherwise (width 0: every row exactly).
  const auto add_wide = [&](index_t width, auto pack_row) {
    const std::vector<std::uint32_t> valid = width > 0 ? chunk_masks(width) : std::vector<std::uint32_t>();
    const index_t n_chunks = static_cast<index_t>(valid.size()), wide_rows = width > 0 ? rows_in_buffer(width) : 0;
    s.add_rows(n_rows, [&report, &valid, pack_row, data, c, nw, n_chunks, wide_rows](index_t r, int n,
                                                                                     std::uint64_t* keys) {
      std::uint64_t bad = 0;
      for (int i = 0; i < n; ++i) {
        const std::uint8_t* row = data + (r + i) * c;
        prefetch_row_ahead(row, c);
        if (r + i < wide_rows) {
          bad |= pack_row(row, n_chunks, valid.data(), keys + i * nw);
        } else {
          bad |= pack_row_exact(row, c, nw, keys + i * nw);
        }
      }
      if (bad) report(r, n);
    });
  };
#if defined(COBALANCE_PACK_AVX512)
  if (c <= kDirectMaxClasses && cpu_has_avx512bw()) {
    s.add_rows(n_rows, [&report, data, c](index_t r, int n, std::uint64_t* keys) {
      if (pack_small_rows_avx512(data + r * c, c, n, keys)) report(r, n);
    });
    return;
  }
#endif
#if defined(__SSE2__)
  if (c <= 16) {
    // One chunk per row: the common few-class case, kept free of loops.
    const __m128i high = _mm_set1_epi8(static_cast<char>(0xfe));
    const __m128i zero = _mm_setzero_si128();
    const unsigned mask = chunk_masks(16)[0];
    const index_t wide_rows = rows_in_buffer(16);
    // Captured by value: stores through `keys` (uint64) could otherwise alias them.
    s.add_rows(n_rows, [&report, data, c, wide_rows, high, zero, mask](index_t r, int n, std::uint64_t* keys) {
      unsigned bad = 0;
      std::uint64_t bad_exact = 0;
      prefetch_row_ahead(data + r * c, n * c);  // the batch's rows, 4 KiB ahead
      for (int i = 0; i < n; ++i) {
        const std::uint8_t* row = data + (r + i) * c;
        if (r + i < wide_rows) {
          const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row));
          const unsigned bits = static_cast<unsigned>(_mm_movemask_epi8(_mm_slli_epi64(v, 7)));
          const unsigned ok = static_cast<unsigned>(_mm_movemask_epi8(_mm_cmpeq_epi8(_mm_and_si128(v, high), zero)));
          bad |= ~ok & mask;
          keys[i] = bits & mask;
        } else {
          bad_exact |= pack_row_exact(row, c, 1, keys + i);
        }
      }
      if (bad | bad_exact) report(r, n);
    });
    return;
  }
#endif
#if defined(COBALANCE_PACK_AVX512)
  if (cpu_has_avx512bw()) {
    s.add_rows(n_rows, [&report, data, c, nw](index_t r, int n, std::uint64_t* keys) {
      if (pack_rows_avx512(data + r * c, c, nw, n, keys)) report(r, n);
    });
    return;
  }
  if (cpu_has_avx2()) {
    // Measured here with COBALANCE_NO_AVX512 (N = 1e7, dense + inverse, 2 threads),
    // against SSE2: C=64 0.148-0.149 -> 0.123-0.129 s, C=300 0.605-0.648 ->
    // 0.573-0.634 s, C=24 on par.
    add_wide(32, [](auto... a) { return pack_row_avx2(a...); });
    return;
  }
#endif
#if defined(__SSE2__)
  add_wide(16, [](auto... a) { return pack_row_wide(a...); });
#else
  add_wide(0, [](auto...) { return 0u; });
#endif
}

void PatternTableBuilder::add_packed(const std::uint64_t* words, index_t n_rows) {
  State& s = *state_;
  const index_t nw = words_for(s.n_classes);
  const std::uint64_t tail = tail_mask(s.n_classes);
  const index_t row0 = s.n_samples;
  if (n_rows > 0 && words == nullptr) throw std::invalid_argument("packed labels: null data pointer");
  s.add_rows(n_rows, [&](index_t r, int n, std::uint64_t* keys) {
    const std::size_t bytes = static_cast<std::size_t>(n * nw) * sizeof(std::uint64_t);
    const char* from = reinterpret_cast<const char*>(words + r * nw);
    // The next batch's words, as in the dense path: the copy otherwise waits on memory.
    for (std::size_t b = 0; b < bytes; b += 64) prefetch_slot(from + bytes + b);
    std::memcpy(keys, from, bytes);
    std::uint64_t bad = 0;  // one test per batch; the row is looked for only when it fails
    for (int i = 0; i < n; ++i) bad |= keys[(i + 1) * nw - 1];
    if (!(bad & tail)) return;
    for (int i = 0; i < n; ++i)
      if (keys[(i + 1) * nw - 1] & tail)
        throw std::invalid_argument("packed row " + std::to_string(row0 + r + i) +
                                    " has bits set at or beyond n_classes = " + std::to_string(s.n_classes));
  });
}

void PatternTableBuilder::add_lists(const index_t* indptr, index_t n_rows, const index_t* indices,
                                    index_t nnz) {
  State& s = *state_;
  const index_t c = s.n_classes, nw = words_for(c);
  const index_t row0 = s.n_samples;
  if (n_rows < 0) throw std::invalid_argument("n_rows must be >= 0, got " + std::to_string(n_rows));
  if (indptr == nullptr) throw std::invalid_argument("indptr: null data pointer");
  if (nnz > 0 && indices == nullptr) throw std::invalid_argument("indices: null data pointer");
  const index_t base = indptr[0];
  for (index_t r = 0; r < n_rows; ++r) {
    if (indptr[r + 1] < indptr[r])
      throw std::invalid_argument("indptr must be non-decreasing, but indptr[" + std::to_string(r + 1) +
                                  "] = " + std::to_string(indptr[r + 1]) + " < indptr[" +
                                  std::to_string(r) + "] = " + std::to_string(indptr[r]));
  }
  if (indptr[n_rows] - base != nnz)
    throw std::invalid_argument("indptr[-1] - indptr[0] = " + std::to_string(indptr[n_rows] - base) +
                                " does not match len(indices) = " + std::to_string(nnz));
  s.add_rows(n_rows, [&](index_t r, int n, std::uint64_t* keys) {
    std::fill(keys, keys + n * nw, std::uint64_t{0});
    for (int i = 0; i < n; ++i) {
      std::uint64_t* key = keys + i * nw;
      for (index_t p = indptr[r + i] - base; p < indptr[r + i + 1] - base; ++p) {
        const index_t cls = indices[p];
        if (cls < 0 || cls >= c)
          throw std::invalid_argument("class index " + std::to_string(cls) + " in row " +
                                      std::to_string(row0 + r + i) + " is outside [0, n_classes = " +
                                      std::to_string(c) + ")");
        key[cls >> 6] |= std::uint64_t{1} << (cls & 63);
      }
    }
  });
}

void PatternTableBuilder::add_table(const PatternTable& table) {
  State& s = *state_;
  if (table.n_classes() != s.n_classes)
    throw std::invalid_argument("cannot merge a table of " + std::to_string(table.n_classes()) +
                                " classes into one of " + std::to_string(s.n_classes));
  if (s.keep_inverse && !table.has_inverse())
    throw std::invalid_argument("cannot merge a table without inverse into a builder that keeps the inverse");
  const index_t nw = table.n_words(), k = table.n_patterns();
  s.index.sync();
  std::vector<index_t> map(static_cast<std::size_t>(k));
  // Allocate first so that the loop below cannot fail half-way.
  s.index.reserve(s.index.size() + k);
  const std::size_t old_size = s.inverse.size();
  const index_t n = table.n_samples();
  if (s.keep_inverse) s.inverse.resize(old_size + static_cast<std::size_t>(n));
  constexpr index_t kAhead = 8;
  const std::uint64_t* keys = table.packed().data();
  for (index_t j = 0; j < std::min(k, kAhead); ++j) s.index.prefetch(s.index.hash(keys + j * nw));
  for (index_t j = 0; j < k; ++j) {
    if (j + kAhead < k) s.index.prefetch(s.index.hash(keys + (j + kAhead) * nw));
    map[static_cast<std::size_t>(j)] = s.index.add(keys + j * nw, table.counts()[static_cast<std::size_t>(j)]);
  }
  if (s.keep_inverse) {
    pattern_id_t* out = s.inverse.data() + old_size;
    const pattern_id_t* in = table.inverse().data();
    const int parts = parts_for(n, s.n_threads, kRowsPerPart);
    const auto bounds = split_range(n, parts);
    run_parts(parts, [&](int t) {
      for (index_t r = bounds[t]; r < bounds[t + 1]; ++r) store_inverse(out + r, map[static_cast<std::size_t>(in[r])]);
    });
  }
  s.n_samples += table.n_samples();
}

PatternTable PatternTableBuilder::finish() {
  State& s = *state_;
  PatternTable t(s.n_classes);
  t.n_samples_ = s.n_samples;
  t.has_inverse_ = s.keep_inverse;
  t.counts_ = s.index.counts(s.n_threads);
  t.packed_ = std::move(s.index.keys());
  t.inverse_ = std::move(s.inverse);
  state_ = std::make_unique<State>(s.n_classes, s.keep_inverse, s.n_threads);
  return t;
}

PatternTable merge_tables(const std::vector<const PatternTable*>& tables, int n_threads) {
  if (tables.empty()) throw std::invalid_argument("merge_tables needs at least one table");
  bool keep = true;
  for (const PatternTable* t : tables) {
    if (t == nullptr) throw std::invalid_argument("merge_tables: null table");
    keep = keep && t->has_inverse();
  }
  PatternTableBuilder builder(tables.front()->n_classes(), keep, n_threads);
  for (const PatternTable* t : tables) builder.add_table(*t);
  return builder.finish();
}

}  // namespace cobalance
