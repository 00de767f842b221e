// Class-presence patterns: group samples by their set of present classes.
//
// A sample is described by a bit vector of length n_classes (bit i set when the
// sample contains class i), stored as ceil(n_classes / 64) little-endian 64-bit
// words: class i is bit (i % 64) of word (i / 64). Identical vectors form one
// pattern. Patterns are numbered in order of first occurrence, so a table depends
// only on the order of its samples, never on the number of threads used.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <new>
#include <type_traits>
#include <utility>
#include <vector>

#include "cobalance/interrupt.hpp"
#include "cobalance/parallel.hpp"

namespace cobalance {

using index_t = std::int64_t;
// A pattern's number in its table (the inverse's entries): 32 bits, since a table
// holds at most 2^31 - 1 patterns. Counts and sample indices are index_t.
using pattern_id_t = std::int32_t;

// Number of 64-bit words that hold `n_classes` bits.
constexpr index_t words_for(index_t n_classes) noexcept { return (n_classes + 63) / 64; }

// The most classes a table may have: a table feeds a BalanceProblem, which numbers
// classes in 32 bits, and each pattern is stored as words_for(n_classes) 64-bit words
// (512 MiB per pattern at this limit). Tables and builders of more classes are
// std::invalid_argument, naming n_classes and this limit.
constexpr index_t kMaxClasses = (index_t{1} << 32) - 1;

class PatternIndex;  // hash index over packed patterns (implementation detail)

// An allocator for arrays that are written in full right after they grow: resize()
// leaves new trivially constructible elements uninitialised instead of zeroing them
// (a fresh buffer from the kernel is zero already, and the builder overwrites it),
// and buffers of 4 MiB or more start on a 2 MiB boundary so that they can be backed
// by huge pages. Otherwise a std::allocator.
template <class T>
class UninitializedAllocator {
 public:
  using value_type = T;
  UninitializedAllocator() noexcept = default;
  template <class U>
  UninitializedAllocator(const UninitializedAllocator<U>&) noexcept {}

  T* allocate(std::size_t n) {
    if (n > static_cast<std::size_t>(-1) / sizeof(T)) throw std::bad_array_new_length();
    const std::size_t bytes = n * sizeof(T);
    if (bytes >= kLarge) return static_cast<T*>(::operator new(bytes, std::align_val_t{kAlign}));
    return static_cast<T*>(::operator new(bytes));
  }
  void deallocate(T* p, std::size_t n) noexcept {
    if (n * sizeof(T) >= kLarge)
      ::operator delete(p, std::align_val_t{kAlign});
    else
      ::operator delete(p);
  }
  template <class U>
  void construct(U* p) noexcept(std::is_nothrow_default_constructible<U>::value) {
    ::new (static_cast<void*>(p)) U;  // default-initialisation: no zero fill
  }
  template <class U, class... Args>
  void construct(U* p, Args&&... args) {
    ::new (static_cast<void*>(p)) U(std::forward<Args>(args)...);
  }
  template <class U>
  bool operator==(const UninitializedAllocator<U>&) const noexcept { return true; }
  template <class U>
  bool operator!=(const UninitializedAllocator<U>&) const noexcept { return false; }

 private:
  static constexpr std::size_t kLarge = std::size_t{4} << 20;
  static constexpr std::size_t kAlign = std::size_t{2} << 20;
};

// The sample -> pattern index of a table: a std::vector of pattern_id_t whose
// growth skips the zero fill (see UninitializedAllocator).
using InverseVector = std::vector<pattern_id_t, UninitializedAllocator<pattern_id_t>>;
// The packed patterns of a table: a std::vector of 64-bit words whose growth skips
// the zero fill (see UninitializedAllocator).
using PackedVector = std::vector<std::uint64_t, UninitializedAllocator<std::uint64_t>>;

class PatternTable {
 public:
  PatternTable();
  // 1 <= n_classes <= kMaxClasses, else std::invalid_argument.
  explicit PatternTable(index_t n_classes);
  PatternTable(const PatternTable&);
  PatternTable(PatternTable&&) noexcept;
  PatternTable& operator=(const PatternTable&);
  PatternTable& operator=(PatternTable&&) noexcept;
  ~PatternTable();

  // Builds a table from its parts and validates them: patterns unique, no bit set
  // at or beyond n_classes, counts positive, and (when given) every inverse entry a
  // valid pattern index with bincount(inverse) == counts. Throws
  // std::invalid_argument naming the first offending value (also when the counts sum
  // past 2^63 - 1).
  static PatternTable from_parts(index_t n_classes, PackedVector packed,
                                 std::vector<index_t> counts, InverseVector inverse,
                                 bool has_inverse);

  index_t n_classes() const noexcept { return n_classes_; }
  index_t n_words() const noexcept { return words_for(n_classes_); }
  index_t n_patterns() const noexcept { return static_cast<index_t>(counts_.size()); }
  index_t n_samples() const noexcept { return n_samples_; }
  bool has_inverse() const noexcept { return has_inverse_; }

  // n_patterns x n_words, row-major.
  const PackedVector& packed() const noexcept { return packed_; }
  // Samples per pattern.
  const std::vector<index_t>& counts() const noexcept { return counts_; }
  // Pattern index of every sample (empty when the table was built without it).
  const InverseVector& inverse() const noexcept { return inverse_; }

  bool has_class(index_t pattern, index_t cls) const noexcept {
    return (packed_[static_cast<std::size_t>(pattern * n_words() + (cls >> 6))] >> (cls & 63)) & 1u;
  }
  // n_patterns x n_classes of 0/1, row-major.
  std::vector<std::uint8_t> dense() const;
  // The patterns in CSR form: classes of pattern j are indices[indptr[j] .. indptr[j+1]).
  void sparse(std::vector<index_t>& indptr, std::vector<index_t>& indices) const;
  // Number of samples containing each class (length n_classes).
  std::vector<index_t> class_counts() const;

 private:
  friend class PatternTableBuilder;
  index_t n_classes_ = 0;
  index_t n_samples_ = 0;
  bool has_inverse_ = true;
  PackedVector packed_;
  std::vector<index_t> counts_;
  InverseVector inverse_;
};

// Builds a PatternTable from one or more batches of samples, added in order. The
// result equals that of one pass over the concatenated batches, whatever the batch
// boundaries and thread counts. A batch that throws leaves the builder as it was.
// A table holds at most 2^31 - 1 distinct patterns (std::length_error beyond), so
// that the inverse's entries are 32-bit; counts and sample indices are 64-bit, and a
// batch that would take the samples past 2^63 - 1 is std::invalid_argument.
class PatternTableBuilder {
 public:
  // keep_inverse=false skips the sample -> pattern index (counts only, O(K) memory).
  // n_threads: 0 = all hardware threads. 1 <= n_classes <= kMaxClasses, else
  // std::invalid_argument.
  explicit PatternTableBuilder(index_t n_classes, bool keep_inverse = true, int n_threads = 0);
  PatternTableBuilder(PatternTableBuilder&&) noexcept;
  PatternTableBuilder& operator=(PatternTableBuilder&&) noexcept;
  ~PatternTableBuilder();

  // Dense row-major n_rows x n_classes bytes, each 0 or 1.
  void add_dense(const std::uint8_t* data, index_t n_rows);
  // Bit-packed rows, n_rows x words_for(n_classes) words; bits past n_classes must be 0.
  void add_packed(const std::uint64_t* words, index_t n_rows);
  // CSR label lists: the classes of row r are indices[indptr[r] - indptr[0] ..
  // indptr[r+1] - indptr[0]); indptr has n_rows + 1 non-decreasing entries and
  // indptr[n_rows] - indptr[0] == nnz. Repeated classes in a row are allowed. With
  // many classes (keys of more than 64 words) the rows are grouped by their sets of
  // classes before any is packed: the batch costs O(nnz) (a sort for a row whose
  // classes are not increasing) plus O(n_words) per distinct set, never O(n_classes)
  // per row.
  void add_lists(const index_t* indptr, index_t n_rows, const index_t* indices, index_t nnz);
  // Appends the samples of a table built separately (the next partition in order).
  void add_table(const PatternTable& table);

  // Speed hint: about n_total samples in all (those added so far included) will be
  // added; 0, the default, means not known. The first batches then size the hash
  // table for the patterns expected over all of them (extrapolated from how their
  // first rows bring new patterns) instead of growing it as later batches bring
  // more. The result does not depend on it. n_total < 0 is std::invalid_argument.
  void expect_samples(index_t n_total);

  // A check that the add_* calls poll on the calling thread (see interrupt.hpp); when
  // it returns true the call throws Interrupted and the builder is as before the call.
  // Large batches are then grouped in slices of rows of about half a second each, with
  // the check polled between them (the result does not depend on batch boundaries).
  // Empty: never polled.
  void set_interrupt_check(InterruptCheck check);

  index_t n_classes() const noexcept;
  index_t n_samples() const noexcept;
  index_t n_patterns() const noexcept;
  // Returns the table and leaves the builder empty (ready for a new pass).
  PatternTable finish();

 private:
  struct State;
  std::unique_ptr<State> state_;
};

// Merges tables of consecutive partitions, in order; equals the one-pass table.
// `interrupt` is polled between and within the tables (see interrupt.hpp).
PatternTable merge_tables(const std::vector<const PatternTable*>& tables, int n_threads = 0,
                          const InterruptCheck& interrupt = {});

}  // namespace cobalance
