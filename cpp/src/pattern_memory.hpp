// Internal to the grouping core: memory the builder's loops touch at random or in
// bulk - zero-filled tables mapped straight from the kernel onto huge pages, pages
// populated ahead of the threads that write them, prefetches for row loops whose
// reads the hardware prefetchers do not follow. Every function here is a hint or a
// layout: results never depend on it, only speed.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <new>
#include <utility>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "pattern_common.hpp"

namespace cobalance {
inline namespace grouping {

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
// Into L2: into L1 gained nothing, non-temporal prefetches lost (figures in
// benchmarks/README.md, "grouping core: history").
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
// than one page fault at a time as threads write the buffer: faults taken by the
// writing threads cost several times more once other work shares the cores.
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

// Writes an inverse entry. Plain stores: non-temporal ones (which skip reading the
// line) were slower on pages faulted in by the stores and no better on populated ones.
inline void store_inverse(pattern_id_t* p, index_t v) noexcept { *p = static_cast<pattern_id_t>(v); }

}  // namespace grouping
}  // namespace cobalance
