// Internal to the grouping core: the packers that turn rows of 0/1 bytes into keys of
// 64-bit words (class i = bit i % 64 of word i / 64), and the one selector that picks
// among them (choose_dense_packer). Every packer gives the same keys and reports a
// byte other than 0 or 1; they differ in speed and in what the CPU must have:
//
//   packer        | rows of       | needs          | reads past the row
//   --------------+---------------+----------------+--------------------------------
//   small_avx512  | <= 16 classes | AVX-512BW      | nothing (masked loads)
//   small_sse2    | <= 16 classes | SSE2           | up to 15 bytes (last rows exact)
//   avx512        | any           | AVX-512BW      | nothing (masked loads)
//   avx2          | any           | AVX2           | up to 31 bytes (last rows exact)
//   sse2          | any           | SSE2           | up to 15 bytes (last rows exact)
//   exact         | any           | nothing        | nothing
//
// The selector takes the first that applies, top to bottom (the small packers cut a
// batch of short rows out of one bit stream; per row they would cost more than the
// grouping); COBALANCE_NO_AVX512 / COBALANCE_NO_AVX2 and the tests' switch
// (pattern_strategy.hpp) take the portable ones on machines that have more.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif
#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#include <immintrin.h>
#endif

#include "pattern_common.hpp"
#include "pattern_memory.hpp"
#include "pattern_strategy.hpp"

namespace cobalance {
inline namespace grouping {


[[noreturn]] inline void bad_dense_value(index_t row, index_t col, unsigned value) {
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
// The chunk packers: one row `Chunk::kWidth` bytes per load, chunk k covering classes
// [kWidth k, kWidth k + kWidth) and `valid[k]` masking its bytes of the row. They read
// up to kWidth - 1 bytes past the row (the caller guarantees that they exist) and
// ignore them. Chunk::bits returns the chunk's bit 0s as a mask and sets `ok` to the
// mask of bytes that are 0 or 1.
struct Sse2Chunk {
  static constexpr index_t kWidth = 16;
  static unsigned bits(const std::uint8_t* p, unsigned& ok) noexcept {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    ok = static_cast<unsigned>(
        _mm_movemask_epi8(_mm_cmpeq_epi8(_mm_and_si128(v, _mm_set1_epi8(static_cast<char>(0xfe))), _mm_setzero_si128())));
    // Bit 0 of each byte moved to its bit 7, where movemask collects it.
    return static_cast<unsigned>(_mm_movemask_epi8(_mm_slli_epi64(v, 7)));
  }
};

template <class Chunk>
inline unsigned pack_row_chunks(const std::uint8_t* row, index_t n_chunks, const std::uint32_t* valid,
                                std::uint64_t* key) noexcept {
  constexpr index_t kPerWord = 64 / Chunk::kWidth;
  unsigned bad = 0;
  std::uint64_t word = 0;
  for (index_t k = 0; k < n_chunks; ++k) {
    unsigned ok;
    const unsigned bits = Chunk::bits(row + Chunk::kWidth * k, ok);
    bad |= ~ok & valid[k];
    word |= static_cast<std::uint64_t>(bits & valid[k]) << (Chunk::kWidth * (k % kPerWord));
    if (k % kPerWord == kPerWord - 1 || k + 1 == n_chunks) {
      key[k / kPerWord] = word;
      word = 0;
    }
  }
  return bad;
}

inline unsigned pack_row_sse2(const std::uint8_t* row, index_t n_chunks, const std::uint32_t* valid,
                              std::uint64_t* key) noexcept {
  return pack_row_chunks<Sse2Chunk>(row, n_chunks, valid, key);
}
#endif

#if defined(COBALANCE_X86_AVX512)
// Half the loads of SSE2, for CPUs with AVX2 but not AVX-512BW. Its bits() is not
// inlined into pack_row_chunks<Avx2Chunk> (whose own target lacks AVX2); `flatten`
// inlines the whole into pack_row_avx2, which has it.
struct Avx2Chunk {
  static constexpr index_t kWidth = 32;
  __attribute__((target("avx2"))) static unsigned bits(const std::uint8_t* p, unsigned& ok) noexcept {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    ok = static_cast<unsigned>(_mm256_movemask_epi8(
        _mm256_cmpeq_epi8(_mm256_and_si256(v, _mm256_set1_epi8(static_cast<char>(0xfe))), _mm256_setzero_si256())));
    return static_cast<unsigned>(_mm256_movemask_epi8(_mm256_slli_epi64(v, 7)));
  }
};
__attribute__((target("avx2"), flatten)) inline unsigned pack_row_avx2(const std::uint8_t* row, index_t n_chunks,
                                                                       const std::uint32_t* valid,
                                                                       std::uint64_t* key) noexcept {
  return pack_row_chunks<Avx2Chunk>(row, n_chunks, valid, key);
}
#endif

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#define COBALANCE_PACK_AVX512 1
// Packs n rows of c 0/1 bytes, one 64-byte (masked) load per 64 classes; masked-off
// bytes are not read, so nothing past the last row is touched. Returns nonzero when
// a byte is neither 0 nor 1. Called only where the CPU has AVX-512BW.
__attribute__((target("avx512f,avx512bw"))) inline std::uint64_t pack_rows_avx512(const std::uint8_t* rows, index_t c,
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
__attribute__((target("avx512f,avx512bw"))) inline std::uint64_t pack_small_rows_avx512(const std::uint8_t* rows,
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

#if defined(__SSE2__)
// Packs rows [r, r + n) of c <= 16 classes, one 16-byte load per row for the rows
// before `wide_rows` (whose loads stay inside the buffer; `mask`: the row's bytes of
// the load), exactly after. Returns nonzero when a byte is neither 0 nor 1. The
// arguments are values, not references: stores through `keys` could alias them.
inline std::uint64_t pack_small_rows_sse2(const std::uint8_t* data, index_t r, int n, index_t c, index_t wide_rows,
                                          unsigned mask, std::uint64_t* keys) noexcept {
  const __m128i high = _mm_set1_epi8(static_cast<char>(0xfe));
  const __m128i zero = _mm_setzero_si128();
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
  return bad | bad_exact;
}
#endif

// The packer for rows of `n_classes` classes: the tests' forced one, else the first
// of the table above that this build and CPU have.
inline detail::DensePacker choose_dense_packer(index_t n_classes) {
  using detail::DensePacker;
  const DensePacker forced = detail::forced_paths().packer;
  if (forced != DensePacker::automatic) {
    if (!detail::dense_packer_available(forced, n_classes))
      throw std::logic_error("the dense packer forced by the tests is not available for " +
                             std::to_string(n_classes) + " classes here");
    return forced;
  }
  for (const DensePacker p : {DensePacker::small_avx512, DensePacker::small_sse2, DensePacker::avx512,
                              DensePacker::avx2, DensePacker::sse2})
    if (detail::dense_packer_available(p, n_classes)) return p;
  return DensePacker::exact;
}

}  // namespace grouping
}  // namespace cobalance
