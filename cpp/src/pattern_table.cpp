#include "cobalance/pattern_table.hpp"

#include <algorithm>
#include <cmath>
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

inline std::uint64_t mix64(std::uint64_t x) noexcept {  // splitmix64 finaliser
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ULL;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebULL;
  x ^= x >> 31;
  return x;
}

inline std::uint64_t hash_words(const std::uint64_t* key, index_t n_words) noexcept {
  if (n_words == 1) return mix64(key[0]);
  // One multiply per word keeps the dependency chain short; mix64 at the end
  // spreads the high bits that the multiplies leave unmixed.
  std::uint64_t h = 0x9e3779b97f4a7c15ULL ^ static_cast<std::uint64_t>(n_words);
  for (index_t w = 0; w < n_words; ++w) {
    h = (h ^ key[w]) * 0xff51afd7ed558ccdULL;
    h ^= h >> 32;
  }
  return mix64(h);
}

inline void prefetch_slot(const void* p) noexcept {
#if defined(__GNUC__) || defined(__clang__)
  __builtin_prefetch(p);
#else
  (void)p;
#endif
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
inline void store_inverse(index_t* p, index_t v) noexcept { *p = v; }

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
  bool direct() const noexcept { return direct_; }
  index_t n_words() const noexcept { return n_words_; }
  const std::uint64_t* key(index_t id) const noexcept { return keys_.data() + id * n_words_; }
  std::vector<std::uint64_t>& keys() noexcept { return keys_; }

  std::uint64_t hash(const std::uint64_t* key) const noexcept {
    return direct_ ? key[0] : hash_words(key, n_words_);
  }
  void prefetch(std::uint64_t h) const noexcept {
    if (!direct_) prefetch_slot(slots_.data() + (h & mask_));
  }

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
    std::uint64_t pos = h & mask_;
    while (true) {
      const Slot& s = slots_[pos];
      if (s.id1 == 0) return kEmpty;
      if (matches(s, key, h)) return static_cast<index_t>(s.id1) - 1;
      pos = (pos + 1) & mask_;
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
    std::uint64_t pos = h & mask_;
    while (true) {
      Slot& s = slots_[pos];
      if (s.id1 == 0) {
        if (size_ >= kMaxPatterns)
          throw std::length_error("a pattern table holds at most 2^32 - 2 distinct patterns");
        keys_.insert(keys_.end(), key, key + n_words_);
        s.tag = n_words_ == 1 ? key[0] : h;
        s.id1 = static_cast<std::uint32_t>(++size_);
        s.count = 0;
        bump(s, n);
        if (size_ * 2 > static_cast<index_t>(slots_.size())) rehash(slots_.size() * 2);
        return size_ - 1;
      }
      if (matches(s, key, h)) {
        bump(s, n);
        return static_cast<index_t>(s.id1) - 1;
      }
      pos = (pos + 1) & mask_;
    }
  }
  index_t add(const std::uint64_t* key, index_t n) { return add(key, hash(key), n); }

  // Appends n patterns known to be absent (and distinct), ids size() .. size() + n - 1;
  // returns where the caller writes their keys (n x n_words) and counts. Their slots
  // are filled by the next sync(): until then find() and add() do not see them, which
  // costs nothing when the table is finished without further lookups.
  std::pair<std::uint64_t*, index_t*> append_unindexed(index_t n) {
    if (size_ + n > kMaxPatterns)
      throw std::length_error("a pattern table holds at most 2^32 - 2 distinct patterns");
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
  std::vector<index_t> counts(int n_threads = 1) const {
    std::vector<index_t> out(static_cast<std::size_t>(size_));
    const std::size_t indexed = static_cast<std::size_t>(size_) - pending_counts_.size();
    if (direct_) {
      std::copy(direct_counts_.begin(), direct_counts_.end(), out.begin());
    } else {
      const index_t n = static_cast<index_t>(slots_.size());
      const int parts = parts_for(n, n_threads, index_t{1} << 18);
      const std::vector<index_t> bounds = split_range(n, parts);
      run_parts(parts, [&](int t) {  // ids are distinct: the threads write disjoint entries
        for (index_t i = bounds[static_cast<std::size_t>(t)]; i < bounds[static_cast<std::size_t>(t) + 1]; ++i) {
          const Slot& s = slots_[static_cast<std::size_t>(i)];
          if (s.id1) out[s.id1 - 1] = s.count;
        }
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
    std::size_t capacity = slots_.size();
    while (static_cast<index_t>(capacity) < 2 * n_patterns) capacity *= 2;
    if (capacity != slots_.size()) rehash(capacity);
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
    for (index_t id = 0; id < n; ++id) place(id, hash(key(id)), kept[static_cast<std::size_t>(id)]);
  }

 private:
  static constexpr index_t kMaxPatterns = 0xfffffffeLL;   // id + 1 fits a uint32
  static constexpr index_t kLowSpan = index_t{1} << 31;  // a slot's count stays below this

  struct Slot {
    std::uint64_t tag;   // the key itself when n_words == 1, else its hash
    std::uint32_t id1;   // id + 1; 0 marks a free slot
    std::uint32_t count; // modulo 2^31; see high_counts_
  };

  bool matches(const Slot& s, const std::uint64_t* key, std::uint64_t h) const noexcept {
    if (n_words_ == 1) return s.tag == key[0];
    if (s.tag != h) return false;
    const std::uint64_t* other = keys_.data() + (static_cast<index_t>(s.id1) - 1) * n_words_;
    for (index_t w = 0; w < n_words_; ++w)
      if (key[w] != other[w]) return false;
    return true;
  }

  // Puts an id known to be absent into a free slot.
  void place(index_t id, std::uint64_t h, index_t count) {
    std::uint64_t pos = h & mask_;
    while (slots_[pos].id1 != 0) pos = (pos + 1) & mask_;
    Slot& s = slots_[pos];
    s = Slot{n_words_ == 1 ? key(id)[0] : h, static_cast<std::uint32_t>(id + 1), 0};
    bump(s, count);
  }

  // Adds n (possibly negative) to the count of slot s.
  void bump(Slot& s, index_t n) {
    const index_t c = static_cast<index_t>(s.count) + n;
    if (c >= 0 && c < kLowSpan) {
      s.count = static_cast<std::uint32_t>(c);
      return;
    }
    // Rare: move whole multiples of 2^31 to (or borrow them from) high_counts_.
    const std::size_t id = s.id1 - 1;
    if (high_counts_.size() <= id) high_counts_.resize(id + 1, 0);
    const index_t low = ((c % kLowSpan) + kLowSpan) % kLowSpan;
    high_counts_[id] += c - low;
    s.count = static_cast<std::uint32_t>(low);
  }

  void rehash(std::size_t capacity) {
    TableArray<Slot> old(std::move(slots_));
    slots_ = TableArray<Slot>(capacity);
    mask_ = capacity - 1;
    for (const Slot& s : old) {
      if (s.id1 == 0) continue;
      const std::uint64_t h = n_words_ == 1 ? mix64(s.tag) : s.tag;
      std::uint64_t pos = h & mask_;
      while (slots_[pos].id1 != 0) pos = (pos + 1) & mask_;
      slots_[pos] = s;
    }
  }

  index_t n_words_;
  bool direct_;
  index_t size_ = 0;
  TableArray<std::int32_t> direct_slots_;  // id + 1 by key; 0 = absent
  std::vector<index_t> direct_counts_;
  TableArray<Slot> slots_;
  std::uint64_t mask_ = 0;
  std::vector<std::uint64_t> keys_;
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

PatternTable PatternTable::from_parts(index_t n_classes, std::vector<std::uint64_t> packed,
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
  //  - many new patterns: one thread inserts every row in order while the others
  //    pack and hash rows ahead of it (insert_rows_pipelined).
  // Nothing depends on timing or on the number of threads.
  template <class Pack>
  void add_rows(index_t n_rows, const Pack& pack) {
    if (n_rows < 0) throw std::invalid_argument("n_rows must be >= 0, got " + std::to_string(n_rows));
    if (n_rows == 0) return;
    index.sync();
    const int parts = parts_for(n_rows, n_threads, kRowsPerPart);
    // The prefix takes the frequent patterns into the global index, so that most
    // rows of the blocks resolve to final ids; it is short because one thread runs it.
    const index_t prefix =
        parts == 1 ? n_rows : std::min(n_rows, std::max<index_t>(4096, n_rows / (16 * static_cast<index_t>(parts))));
    const std::size_t old_size = inverse.size();
    index_t* inv = keep_inverse ? grow_inverse(n_rows) : nullptr;
    const index_t k0 = index.size();
    index_t done = 0;  // rows of the prefix counted in `index`
    try {
      // The prefix (with one thread, its first rows) runs in two halves: how the
      // number of patterns grows from one to the other sizes the hash table for the
      // whole batch, instead of doubling it step by step.
      const index_t probe = parts == 1 ? std::min(n_rows, std::max<index_t>(4096, n_rows / 32)) : prefix;
      insert_rows(0, probe / 2, pack, inv, done);
      const index_t k_half = index.size();
      insert_rows(probe / 2, probe, pack, inv, done);
      if (probe < n_rows) presize(k0, k_half, probe, n_rows);
      // The inverse's pages past the prefix are populated ahead of the rows that
      // write them (see populate_pages): here, or in add_blocks by one of its threads.
      const auto populate_from = [&](index_t row) {
        if (inv) populate_pages(inv + row, static_cast<std::size_t>(n_rows - row) * sizeof(index_t));
      };
      if (parts == 1) {
        populate_from(probe);
        insert_rows(probe, n_rows, pack, inv, done);
      }
      if (prefix < n_rows) {
        // Blocks pay off when their local tables stay small. When the prefix shows
        // many new patterns (as with many classes), merging the blocks' tables
        // would cost about as much as building them, and when the index already
        // holds many more patterns than a block has rows (a late chunk of a long
        // stream), the blocks' per-pattern counters would outweigh their rows; then
        // one thread builds the table while the others pack and hash rows ahead of it.
        const index_t new_in_prefix = index.size() - k0;
        const index_t block_rows = (n_rows - prefix) / parts;
        if (!index.direct() && (new_in_prefix * 32 > prefix || index.size() > block_rows / 4)) {
          populate_from(prefix);
          insert_rows_pipelined(prefix, n_rows, parts, pack, inv, done);
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
  // Reserves the hash table for the patterns expected in a batch of n_rows rows,
  // from those found in its first `probe` rows (k0 before, k_half after the first
  // half): new patterns taken to grow like rows^b (b from the two halves, at most
  // 1), capped by one per row; the table is sized so that the estimate fills at
  // most 60 % of it. Only speed depends on the estimate.
  void presize(index_t k0, index_t k_half, index_t probe, index_t n_rows) {
    const index_t new1 = k_half - k0, new2 = index.size() - k0;
    if (index.direct() || new2 * 32 <= probe) return;  // few new patterns: nothing to gain
    double b = 1.0;
    if (new1 > 0 && new2 > new1) b = std::min(1.0, std::log2(static_cast<double>(new2) / static_cast<double>(new1)));
    const double grown = static_cast<double>(new2) * std::pow(static_cast<double>(n_rows) / static_cast<double>(probe), b);
    const double expected = static_cast<double>(k0) + std::min(grown, static_cast<double>(n_rows));
    index.reserve(static_cast<index_t>(expected / 1.2));  // capacity >= 2 x that = expected / 0.6
  }

  // Room for n_rows more inverse entries; returns where they start. Large buffers
  // are advised onto huge pages before their first touch (fewer page faults).
  index_t* grow_inverse(index_t n_rows) {
    const std::size_t old_size = inverse.size(), need = old_size + static_cast<std::size_t>(n_rows);
    if (need > inverse.capacity()) {
      inverse.reserve(std::max(need, 2 * old_size));
      advise_huge_pages(inverse.data() + old_size, (inverse.capacity() - old_size) * sizeof(index_t));
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
  void insert_rows(index_t begin, index_t end, const Pack& pack, index_t* inv, index_t& done) {
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
      for (int i = 0; i < st.n; ++i) {
        const index_t id = index.add(st.keys.data() + i * nw, st.hash[i], 1);
        if (inv) store_inverse(inv + st.row + i, id);
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
  void insert_rows_pipelined(index_t begin, index_t end, int parts, const Pack& pack, index_t* inv,
                             index_t& done) {
    const index_t nw = index.n_words();
    // Rows per chunk: 2048, fewer for very wide rows so that a buffer stays ~0.5 MiB.
    const index_t kChunk = std::max<index_t>(kBatch, std::min<index_t>(2048, 65536 / nw));
    constexpr index_t kAhead = 16;  // prefetch distance, in rows
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
        for (index_t i = 0; i < n; ++i) {
          if (i + kAhead < n) index.prefetch(hash[i + kAhead]);
          const index_t id = index.add(keys + i * nw, hash[i], 1);
          if (inv) store_inverse(inv + r0 + i, id);
        }
        done = r0 + n;
        consumed.store(c + 1, std::memory_order_release);
      }
    });
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
  void add_blocks(index_t begin, index_t end, int parts, const Pack& pack, index_t* inv) {
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
        std::vector<std::uint64_t> keys(kDirectBatch);
        index_t* known_counts = blk.known_counts.data();
        for (index_t row = b0; row < b1; row += kDirectBatch) {
          const int n = static_cast<int>(std::min<index_t>(kDirectBatch, b1 - row));
          pack(row, n, keys.data());
          for (int i = 0; i < n; ++i) {
            index_t id = index.find_direct(keys[static_cast<std::size_t>(i)]);
            if (id != kEmpty)
              ++known_counts[id];
            else
              id = resolve_local(keys.data() + i, 0, row + i);
            if (inv) store_inverse(inv + row + i, id);
          }
        }
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
        populate_pages(inv + begin, static_cast<std::size_t>(end - begin) * sizeof(index_t));
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
            if (inv[r] < 0) inv[r] = map[-1 - inv[r]];
        } else {
          for (const index_t r : blk.unresolved) inv[r] = map[-1 - inv[r]];
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
inline unsigned pack_row_wide(const std::uint8_t* row, index_t n_chunks, const unsigned* valid,
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
// is bits [i c, i c + c); each key is then cut out of it with one unaligned load.
// Only the batch's bytes are read (the last block is a masked load). Returns
// nonzero when a byte is neither 0 nor 1. Called only where the CPU has AVX-512BW.
__attribute__((target("avx512f,avx512bw"))) std::uint64_t pack_small_rows_avx512(const std::uint8_t* rows,
                                                                                    index_t c, int n,
                                                                                    std::uint64_t* keys) {
  constexpr index_t kMaxBlocks = kDirectBatch * kDirectMaxClasses / 64;
  std::uint64_t bits[kMaxBlocks + 2];
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
  bits[blocks] = bits[blocks + 1] = 0;  // the last keys' 8-byte loads reach into them
  const unsigned char* stream = reinterpret_cast<const unsigned char*>(bits);
  const std::uint64_t mask = (std::uint64_t{1} << c) - 1;
  for (int i = 0; i < n; ++i) {
    const index_t bit = i * c;
    std::uint64_t w;
    std::memcpy(&w, stream + (bit >> 3), 8);
    keys[i] = (w >> (bit & 7)) & mask;
  }
  return bad;
}

// COBALANCE_NO_AVX512 (any value) selects the portable path on an AVX-512 machine, so
// that the tests also cover what CPUs without it run.
bool cpu_has_avx512bw() noexcept {
  static const bool yes = std::getenv("COBALANCE_NO_AVX512") == nullptr && __builtin_cpu_supports("avx512f") &&
                          __builtin_cpu_supports("avx512bw");
  return yes;
}
#endif

}  // namespace

void PatternTableBuilder::add_dense(const std::uint8_t* data, index_t n_rows) {
  State& s = *state_;
  const index_t c = s.n_classes, nw = words_for(c);
  const index_t row0 = s.n_samples;
  if (n_rows > 0 && data == nullptr) throw std::invalid_argument("dense labels: null data pointer");
  std::vector<unsigned> valid(static_cast<std::size_t>((c + 15) / 16));
  for (std::size_t k = 0; k < valid.size(); ++k) {
    const index_t len = std::min<index_t>(16, c - 16 * static_cast<index_t>(k));
    valid[k] = len == 16 ? 0xffffu : (1u << len) - 1u;
  }
  const index_t n_chunks = static_cast<index_t>(valid.size());
  // Rows whose 16-byte loads stay inside the buffer (the last few are packed exactly).
  const index_t overread = n_chunks * 16 - c;
  const index_t wide_rows = std::max<index_t>(0, n_rows - (overread + c - 1) / c);
  auto report = [&](index_t r, int n) {
    for (index_t rr = r; rr < r + n; ++rr)
      for (index_t j = 0; j < c; ++j)
        if (data[rr * c + j] > 1) bad_dense_value(row0 + rr, j, data[rr * c + j]);
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
    const unsigned mask = valid[0];
    // Captured by value: stores through `keys` (uint64) could otherwise alias them.
    s.add_rows(n_rows, [&report, data, c, wide_rows, high, zero, mask](index_t r, int n, std::uint64_t* keys) {
      unsigned bad = 0;
      std::uint64_t bad_exact = 0;
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
#endif
  s.add_rows(n_rows, [&](index_t r, int n, std::uint64_t* keys) {
    std::uint64_t bad = 0;
    for (int i = 0; i < n; ++i) {
      const std::uint8_t* row = data + (r + i) * c;
#if defined(__SSE2__)
      if (r + i < wide_rows) {
        bad |= pack_row_wide(row, n_chunks, valid.data(), keys + i * nw);
        continue;
      }
#endif
      bad |= pack_row_exact(row, c, nw, keys + i * nw);
    }
    if (bad) report(r, n);
  });
}

void PatternTableBuilder::add_packed(const std::uint64_t* words, index_t n_rows) {
  State& s = *state_;
  const index_t nw = words_for(s.n_classes);
  const std::uint64_t tail = tail_mask(s.n_classes);
  const index_t row0 = s.n_samples;
  if (n_rows > 0 && words == nullptr) throw std::invalid_argument("packed labels: null data pointer");
  s.add_rows(n_rows, [&](index_t r, int n, std::uint64_t* keys) {
    std::memcpy(keys, words + r * nw, static_cast<std::size_t>(n * nw) * sizeof(std::uint64_t));
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
    index_t* out = s.inverse.data() + old_size;
    const index_t* in = table.inverse().data();
    const int parts = parts_for(n, s.n_threads, kRowsPerPart);
    const auto bounds = split_range(n, parts);
    run_parts(parts, [&](int t) {
      for (index_t r = bounds[t]; r < bounds[t + 1]; ++r) out[r] = map[static_cast<std::size_t>(in[r])];
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
