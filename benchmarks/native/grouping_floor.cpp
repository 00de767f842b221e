// How close pattern grouping comes to the memory work it cannot avoid, on the
// benchmark's long-tailed rows (class c, 1-based, present with probability 0.9 / c),
// dense uint8, in one process:
//
//  - read:  every row read once and packed into bits (the input's floor);
//  - floor: each thread groups its own contiguous 1/T of the rows into its own
//           table, as cheaply as this layout allows: pack, hash, probe with the
//           slots prefetched ahead, a key compare only for rows that match by
//           hash (prefetched, after the probes), the new keys and the inverse
//           written in place, the pages populated inside the timed region. The
//           threads never meet: the parts' tables are not merged and the ids are
//           not those of one pass, so no exact grouping can be faster than this
//           on T threads;
//  - cobalance: PatternTableBuilder::add_dense + finish with the inverse, exact.
//
//   cmake -S . -B build/bench -DCOBALANCE_BUILD_BENCHMARKS=ON
//   cmake --build build/bench --target grouping_floor
//   build/bench/benchmarks/native/grouping_floor [rows] [classes] [threads] [repeats]
//
// Defaults: 10000000 rows, 300 classes, all cores, 5 repeats (the minimum is
// reported). It needs AVX-512BW for the packing of the read and the floor, and
// about rows x classes bytes of memory for the input plus the tables.
#include <cobalance/parallel.hpp>
#include <cobalance/pattern_table.hpp>

#include <sys/mman.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include <immintrin.h>

namespace {

using cobalance::index_t;

double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

std::uint64_t splitmix(std::uint64_t& s) {
  std::uint64_t z = (s += 0x9e3779b97f4a7c15ULL);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

// Anonymous memory on huge pages where the kernel gives them (as the core's tables).
void* map(std::size_t bytes) {
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) throw std::bad_alloc();
#ifdef MADV_HUGEPAGE
  madvise(p, bytes, MADV_HUGEPAGE);
#endif
  return p;
}
void populate(void* p, std::size_t bytes) {
#ifdef MADV_POPULATE_WRITE
  if (madvise(p, bytes, MADV_POPULATE_WRITE) == 0) return;
#endif
  for (std::size_t i = 0; i < bytes; i += 4096) static_cast<volatile char*>(p)[i] = 0;
}

// Rows x classes of 0/1, seeded, filled by `threads` threads (row r from seed r).
std::uint8_t* long_tailed(index_t rows, index_t classes, int threads) {
  auto* y = static_cast<std::uint8_t*>(map(static_cast<std::size_t>(rows * classes)));
  std::vector<std::uint64_t> cut(static_cast<std::size_t>(classes));  // present below this
  for (index_t c = 0; c < classes; ++c)
    cut[static_cast<std::size_t>(c)] = static_cast<std::uint64_t>(0.9 / static_cast<double>(c + 1) * 18446744073709551615.0);
  cobalance::run_parts(threads, [&](int t) {
    for (index_t r = rows * t / threads; r < rows * (t + 1) / threads; ++r) {
      std::uint64_t s = static_cast<std::uint64_t>(r) * 0x632be59bd9b4e019ULL;
      for (index_t c = 0; c < classes; ++c) y[r * classes + c] = splitmix(s) < cut[static_cast<std::size_t>(c)];
    }
  });
  return y;
}

// Packs one row of `classes` bytes into words (bit i = byte i is not 0), asking for
// the row 4 KiB ahead as the core does.
__attribute__((target("avx512bw,avx512f"))) inline void pack_row(const std::uint8_t* row, index_t classes,
                                                                   std::uint64_t* out) {
  for (index_t w = 0; w * 64 < classes; w += 1) _mm_prefetch(reinterpret_cast<const char*>(row + 4096 + 64 * w), _MM_HINT_T1);
  const __m512i zero = _mm512_setzero_si512();
  index_t w = 0;
  for (; (w + 1) * 64 <= classes; ++w)
    out[w] = _mm512_cmpneq_epi8_mask(_mm512_loadu_si512(row + 64 * w), zero);
  if (w * 64 < classes) {
    const __mmask64 tail = (__mmask64{1} << (classes - w * 64)) - 1;
    out[w] = _mm512_cmpneq_epi8_mask(_mm512_maskz_loadu_epi8(tail, row + 64 * w), zero);
  }
}

std::uint64_t fold_multiply(std::uint64_t a, std::uint64_t b) {
  __extension__ typedef unsigned __int128 u128;
  const u128 p = static_cast<u128>(a) * b;
  return static_cast<std::uint64_t>(p) ^ static_cast<std::uint64_t>(p >> 64);
}
std::uint64_t hash_key(const std::uint64_t* key, index_t words) {
  std::uint64_t h = 0x9e3779b97f4a7c15ULL ^ static_cast<std::uint64_t>(words);
  for (index_t w = 0; w < words; ++w) h = fold_multiply(h ^ key[w], 0xff51afd7ed558ccdULL);
  h ^= h >> 30;
  h *= 0xbf58476d1ce4e5b9ULL;
  h ^= h >> 27;
  h *= 0x94d049bb133111ebULL;
  return h ^ (h >> 31);
}

// Reads every row once, packing it; returns a checksum so the work is kept.
__attribute__((target("avx512bw,avx512f"))) std::uint64_t read_once(const std::uint8_t* y, index_t rows,
                                                                      index_t classes, int threads) {
  const index_t words = (classes + 63) / 64;
  std::vector<std::uint64_t> sums(static_cast<std::size_t>(threads) * 8, 0);
  cobalance::run_parts(threads, [&](int t) {
    std::vector<std::uint64_t> key(static_cast<std::size_t>(words));
    std::uint64_t s = 0;
    for (index_t r = rows * t / threads; r < rows * (t + 1) / threads; ++r) {
      pack_row(y + r * classes, classes, key.data());
      for (index_t w = 0; w < words; ++w) s += key[static_cast<std::size_t>(w)];
    }
    sums[static_cast<std::size_t>(t) * 8] = s;
  });
  std::uint64_t s = 0;
  for (std::uint64_t v : sums) s += v;
  return s;
}

// The floor (see the top of the file); returns the sum of the parts' pattern counts.
__attribute__((target("avx512bw,avx512f"))) index_t floor_parts(const std::uint8_t* y, index_t rows,
                                                                 index_t classes, int threads) {
  struct Slot {
    std::uint64_t tag;
    std::uint32_t id1, count;
  };
  const index_t words = (classes + 63) / 64;
  const std::size_t W = static_cast<std::size_t>(words);
  std::vector<index_t> found(static_cast<std::size_t>(threads) * 8, 0);
  std::vector<std::string> errors(static_cast<std::size_t>(threads));
  cobalance::run_parts(threads, [&](int t) {
    const index_t r0 = rows * t / threads, r1 = rows * (t + 1) / threads, n = r1 - r0;
    // Slots for at least 1.6 x the part's rows (the core sizes its table for the
    // patterns expected, which here are most rows), keys for every row.
    std::size_t slots = 1;
    while (static_cast<double>(slots) < 1.6 * static_cast<double>(n)) slots *= 2;
    const std::uint64_t mask = slots - 1;
    auto* table = static_cast<Slot*>(map(slots * sizeof(Slot)));
    auto* keys = static_cast<std::uint64_t*>(map(static_cast<std::size_t>(n) * W * 8 + 8));
    auto* inverse = static_cast<std::int32_t*>(map(static_cast<std::size_t>(n) * 4 + 4));
    populate(table, slots * sizeof(Slot));
    populate(keys, static_cast<std::size_t>(n) * W * 8);
    populate(inverse, static_cast<std::size_t>(n) * 4);
    constexpr index_t kChunk = 2048, kAhead = 16;
    std::vector<std::uint64_t> batch(static_cast<std::size_t>(kChunk) * W), hash(kChunk);
    std::vector<std::uint32_t> match_row(kChunk), match_id(kChunk);
    std::uint32_t k = 0;
    for (index_t c = 0; c < n; c += kChunk) {
      const index_t m = std::min(kChunk, n - c);
      for (index_t i = 0; i < m; ++i) {
        std::uint64_t* key = batch.data() + static_cast<std::size_t>(i) * W;
        pack_row(y + (r0 + c + i) * classes, classes, key);
        hash[static_cast<std::size_t>(i)] = hash_key(key, words);
      }
      for (index_t i = 0; i < std::min(m, kAhead); ++i) _mm_prefetch(reinterpret_cast<const char*>(table + (hash[i] & mask)), _MM_HINT_T0);
      index_t matched = 0;
      for (index_t i = 0; i < m; ++i) {
        if (i + kAhead < m) _mm_prefetch(reinterpret_cast<const char*>(table + (hash[i + kAhead] & mask)), _MM_HINT_T0);
        const std::uint64_t h = hash[static_cast<std::size_t>(i)];
        std::uint64_t pos = h & mask;
        std::uint32_t id;
        while (true) {
          Slot& s = table[pos];
          if (s.id1 == 0) {
            s = Slot{h, ++k, 1};
            id = k - 1;
            std::memcpy(keys + static_cast<std::size_t>(id) * W, batch.data() + static_cast<std::size_t>(i) * W, W * 8);
            break;
          }
          if (s.tag == h) {
            ++s.count;
            id = s.id1 - 1;
            match_row[static_cast<std::size_t>(matched)] = static_cast<std::uint32_t>(i);
            match_id[static_cast<std::size_t>(matched++)] = id;
            break;
          }
          pos = (pos + 1) & mask;
        }
        inverse[c + i] = static_cast<std::int32_t>(id);
      }
      const auto prefetch_key = [&](index_t j) {
        const std::uint64_t* key = keys + static_cast<std::size_t>(match_id[static_cast<std::size_t>(j)]) * W;
        _mm_prefetch(reinterpret_cast<const char*>(key), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(key + W - 1), _MM_HINT_T0);
      };
      for (index_t j = 0; j < std::min(matched, kAhead); ++j) prefetch_key(j);
      for (index_t j = 0; j < matched; ++j) {
        if (j + kAhead < matched) prefetch_key(j + kAhead);
        const std::uint64_t* stored = keys + static_cast<std::size_t>(match_id[static_cast<std::size_t>(j)]) * W;
        if (std::memcmp(stored, batch.data() + static_cast<std::size_t>(match_row[static_cast<std::size_t>(j)]) * W, W * 8) != 0)
          errors[static_cast<std::size_t>(t)] = "two keys share a 64-bit hash";  // not expected: report, do not fix
      }
    }
    found[static_cast<std::size_t>(t) * 8] = k;
    munmap(table, slots * sizeof(Slot));
    munmap(keys, static_cast<std::size_t>(n) * W * 8 + 8);
    munmap(inverse, static_cast<std::size_t>(n) * 4 + 4);
  });
  for (const std::string& e : errors)
    if (!e.empty()) throw std::runtime_error(e);
  index_t k = 0;
  for (index_t v : found) k += v;
  return k;
}

index_t parse(const char* text, const char* what, index_t low) {
  char* end = nullptr;
  const long long v = std::strtoll(text, &end, 10);
  if (end == text || *end != '\0' || v < low)
    throw std::invalid_argument(std::string(what) + " must be an integer >= " + std::to_string(low) + ", got '" + text + "'");
  return static_cast<index_t>(v);
}

}  // namespace

int main(int argc, char** argv) {
  try {
    const index_t rows = argc > 1 ? parse(argv[1], "rows", 1) : 10000000;
    const index_t classes = argc > 2 ? parse(argv[2], "classes", 1) : 300;
    const int threads = argc > 3 ? static_cast<int>(parse(argv[3], "threads", 1)) : cobalance::resolve_threads(0);
    const int repeats = argc > 4 ? static_cast<int>(parse(argv[4], "repeats", 1)) : 5;
    if (!__builtin_cpu_supports("avx512bw")) {
      std::fprintf(stderr, "grouping_floor: the read and the floor pack with AVX-512BW, which this CPU lacks\n");
      return 2;
    }
    const std::uint8_t* y = long_tailed(rows, classes, threads);
    double t_read = 1e30, t_floor = 1e30, t_cobalance = 1e30;
    index_t k_floor = 0, k = 0;
    std::uint64_t checksum = 0;
    for (int r = 0; r < repeats; ++r) {  // interleaved, so that drift affects all three alike
      double t0 = now();
      checksum += read_once(y, rows, classes, threads);
      t_read = std::min(t_read, now() - t0);
      t0 = now();
      k_floor = floor_parts(y, rows, classes, threads);
      t_floor = std::min(t_floor, now() - t0);
      t0 = now();
      {
        cobalance::PatternTableBuilder builder(classes, true, threads);
        builder.add_dense(y, rows);
        k = builder.finish().n_patterns();
      }
      t_cobalance = std::min(t_cobalance, now() - t0);
    }
    std::printf("rows %lld, classes %lld, threads %d, minimum of %d (checksum %llu)\n", static_cast<long long>(rows),
                static_cast<long long>(classes), threads, repeats, static_cast<unsigned long long>(checksum % 1000));
    std::printf("read once:                    %.4f s\n", t_read);
    std::printf("floor (parts never merged):   %.4f s  (%lld patterns over the parts)\n", t_floor,
                static_cast<long long>(k_floor));
    std::printf("cobalance (exact, inverse):   %.4f s  (%lld patterns)\n", t_cobalance, static_cast<long long>(k));
    std::printf("cobalance / floor: %.2fx, cobalance / read: %.2fx\n", t_cobalance / t_floor, t_cobalance / t_read);
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "grouping_floor: %s\n", e.what());
    return 1;
  }
}
