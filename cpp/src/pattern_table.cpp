#include "cobalance/pattern_table.hpp"

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>
#include <utility>

namespace cobalance {

int resolve_threads(int n_threads) noexcept {
  if (n_threads > 0) return n_threads;
  const unsigned hw = std::thread::hardware_concurrency();
  return hw == 0 ? 1 : static_cast<int>(hw);
}

namespace {

constexpr index_t kDirectMaxClasses = 16;   // 2^16 slots: a direct table fits in L2
constexpr index_t kRowsPerPart = 1 << 15;   // below this, threads cost more than they save
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
  std::uint64_t h = 0x9e3779b97f4a7c15ULL;
  for (index_t w = 0; w < n_words; ++w) h = mix64(h ^ key[w]) + static_cast<std::uint64_t>(w);
  return h;
}

}  // namespace

// Open-addressing index from packed pattern to pattern id (order of insertion).
// Three layouts by key width: a direct table for n_classes <= 16, inline 64-bit
// keys for n_classes <= 64, and (hash, id) slots over an external key array beyond.
class PatternIndex {
 public:
  explicit PatternIndex(index_t n_classes)
      : n_words_(words_for(n_classes)), direct_(n_classes <= kDirectMaxClasses) {
    if (direct_) {
      direct_slots_.assign(std::size_t{1} << n_classes, kEmpty);
    } else {
      rehash(1024);
    }
  }

  index_t size() const noexcept { return size_; }
  index_t n_words() const noexcept { return n_words_; }
  const std::vector<std::uint64_t>& keys() const noexcept { return keys_; }
  std::vector<std::uint64_t>& keys() noexcept { return keys_; }
  void reserve_keys(index_t n) { keys_.reserve(static_cast<std::size_t>(n * n_words_)); }

  // Returns the id of a one-word key, inserting it when new.
  index_t find_or_insert1(std::uint64_t key) {
    if (direct_) {
      index_t& slot = direct_slots_[static_cast<std::size_t>(key)];
      if (slot == kEmpty) {
        slot = size_++;
        keys_.push_back(key);
      }
      return slot;
    }
    std::uint64_t pos = mix64(key) & mask_;
    while (true) {
      Slot& s = slots_[pos];
      if (s.id == kEmpty) {
        s.hash_or_key = key;
        s.id = size_++;
        keys_.push_back(key);
        if (size_ * 2 > static_cast<index_t>(slots_.size())) rehash(slots_.size() * 2);
        return size_ - 1;
      }
      if (s.hash_or_key == key) return s.id;
      pos = (pos + 1) & mask_;
    }
  }

  // Returns the id of an n_words key, inserting it when new.
  index_t find_or_insert(const std::uint64_t* key) {
    if (n_words_ == 1) return find_or_insert1(key[0]);
    const std::uint64_t h = hash_words(key, n_words_);
    std::uint64_t pos = h & mask_;
    const std::size_t bytes = static_cast<std::size_t>(n_words_) * sizeof(std::uint64_t);
    while (true) {
      Slot& s = slots_[pos];
      if (s.id == kEmpty) {
        s.hash_or_key = h;
        s.id = size_++;
        keys_.insert(keys_.end(), key, key + n_words_);
        if (size_ * 2 > static_cast<index_t>(slots_.size())) rehash(slots_.size() * 2);
        return size_ - 1;
      }
      if (s.hash_or_key == h &&
          std::memcmp(keys_.data() + s.id * n_words_, key, bytes) == 0)
        return s.id;
      pos = (pos + 1) & mask_;
    }
  }

 private:
  struct Slot {
    std::uint64_t hash_or_key;  // the key itself when n_words == 1, else its hash
    index_t id;
  };

  void rehash(std::size_t capacity) {
    std::vector<Slot> old;
    old.swap(slots_);
    slots_.assign(capacity, Slot{0, kEmpty});
    mask_ = capacity - 1;
    for (const Slot& s : old) {
      if (s.id == kEmpty) continue;
      const std::uint64_t h = n_words_ == 1 ? mix64(s.hash_or_key) : s.hash_or_key;
      std::uint64_t pos = h & mask_;
      while (slots_[pos].id != kEmpty) pos = (pos + 1) & mask_;
      slots_[pos] = s;
    }
  }

  index_t n_words_;
  bool direct_;
  index_t size_ = 0;
  std::vector<index_t> direct_slots_;
  std::vector<Slot> slots_;
  std::uint64_t mask_ = 0;
  std::vector<std::uint64_t> keys_;
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
                                      std::vector<index_t> counts, std::vector<index_t> inverse,
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
    if (index.find_or_insert(key) != j)
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
  PatternIndex index;
  std::vector<index_t> counts;
  std::vector<index_t> inverse;

  // Groups rows [0, n_rows) of one batch. key_of(r, buf) writes row r's packed key
  // into buf (n_words words) and throws std::invalid_argument for a bad row.
  // Each part builds a local index over a contiguous block of rows; locals are then
  // folded into the global index in block order, which reproduces first-occurrence
  // order exactly, so the result does not depend on the number of parts.
  template <class KeyOf>
  void add_rows(index_t n_rows, KeyOf&& key_of) {
    if (n_rows < 0) throw std::invalid_argument("n_rows must be >= 0, got " + std::to_string(n_rows));
    if (n_rows == 0) return;
    const index_t nw = words_for(n_classes);
    const int parts = parts_for(n_rows, n_threads, kRowsPerPart);
    const std::vector<index_t> bounds = split_range(n_rows, parts);
    const std::size_t old_size = inverse.size();
    index_t* inv = nullptr;
    if (keep_inverse) {
      inverse.resize(old_size + static_cast<std::size_t>(n_rows));
      inv = inverse.data() + old_size;
    }
    struct Local {
      explicit Local(index_t c) : index(c) {}
      PatternIndex index;
      std::vector<index_t> counts;
    };
    std::vector<Local> locals;
    locals.reserve(static_cast<std::size_t>(parts));
    for (int t = 0; t < parts; ++t) locals.emplace_back(n_classes);
    try {
      run_parts(parts, [&](int t) {
        Local& local = locals[static_cast<std::size_t>(t)];
        std::vector<std::uint64_t> key(static_cast<std::size_t>(nw));
        for (index_t r = bounds[t]; r < bounds[t + 1]; ++r) {
          key_of(r, key.data());
          const index_t id = local.index.find_or_insert(key.data());
          if (id == static_cast<index_t>(local.counts.size())) local.counts.push_back(0);
          ++local.counts[static_cast<std::size_t>(id)];
          if (inv) inv[r] = id;
        }
      });
    } catch (...) {
      inverse.resize(old_size);  // leave the builder as it was before this batch
      throw;
    }
    // Fold locals into the global index, in block order.
    std::vector<std::vector<index_t>> remap(static_cast<std::size_t>(parts));
    std::vector<char> identity(static_cast<std::size_t>(parts), 1);
    for (int t = 0; t < parts; ++t) {
      const Local& local = locals[static_cast<std::size_t>(t)];
      const index_t k = local.index.size();
      auto& map = remap[static_cast<std::size_t>(t)];
      map.resize(static_cast<std::size_t>(k));
      for (index_t l = 0; l < k; ++l) {
        const index_t g = index.find_or_insert(local.index.keys().data() + l * nw);
        if (g == static_cast<index_t>(counts.size())) counts.push_back(0);
        counts[static_cast<std::size_t>(g)] += local.counts[static_cast<std::size_t>(l)];
        map[static_cast<std::size_t>(l)] = g;
        if (g != l) identity[static_cast<std::size_t>(t)] = 0;
      }
    }
    if (inv) {
      run_parts(parts, [&](int t) {
        if (identity[static_cast<std::size_t>(t)]) return;
        const index_t* map = remap[static_cast<std::size_t>(t)].data();
        for (index_t r = bounds[t]; r < bounds[t + 1]; ++r) inv[r] = map[inv[r]];
      });
    }
    n_samples += n_rows;
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

}  // namespace

void PatternTableBuilder::add_dense(const std::uint8_t* data, index_t n_rows) {
  State& s = *state_;
  const index_t c = s.n_classes, nw = words_for(c);
  const index_t row0 = s.n_samples;
  if (n_rows > 0 && data == nullptr) throw std::invalid_argument("dense labels: null data pointer");
  s.add_rows(n_rows, [&](index_t r, std::uint64_t* key) {
    const std::uint8_t* row = data + r * c;
    for (index_t w = 0; w < nw; ++w) {
      const index_t begin = w * 64, end = std::min(c, begin + 64);
      std::uint64_t word = 0, bad = 0;
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
      if (bad) {
        for (index_t j = begin; j < end; ++j)
          if (row[j] > 1) bad_dense_value(row0 + r, j, row[j]);
      }
      key[w] = word;
    }
  });
}

void PatternTableBuilder::add_packed(const std::uint64_t* words, index_t n_rows) {
  State& s = *state_;
  const index_t nw = words_for(s.n_classes);
  const std::uint64_t tail = tail_mask(s.n_classes);
  const index_t row0 = s.n_samples;
  if (n_rows > 0 && words == nullptr) throw std::invalid_argument("packed labels: null data pointer");
  s.add_rows(n_rows, [&](index_t r, std::uint64_t* key) {
    const std::uint64_t* row = words + r * nw;
    if (row[nw - 1] & tail)
      throw std::invalid_argument("packed row " + std::to_string(row0 + r) +
                                  " has bits set at or beyond n_classes = " + std::to_string(s.n_classes));
    std::memcpy(key, row, static_cast<std::size_t>(nw) * sizeof(std::uint64_t));
  });
}

void PatternTableBuilder::add_lists(const index_t* indptr, index_t n_rows, const index_t* indices,
                                    index_t nnz) {
  State& s = *state_;
  const index_t c = s.n_classes, nw = words_for(c);
  const index_t row0 = s.n_samples;
  if (n_rows < 0) throw std::invalid_argument("n_rows must be >= 0, got " + std::to_string(n_rows));
  if (indptr == nullptr) throw std::invalid_argument("indptr: null data pointer");
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
  s.add_rows(n_rows, [&](index_t r, std::uint64_t* key) {
    std::fill(key, key + nw, std::uint64_t{0});
    for (index_t p = indptr[r] - base; p < indptr[r + 1] - base; ++p) {
      const index_t cls = indices[p];
      if (cls < 0 || cls >= c)
        throw std::invalid_argument("class index " + std::to_string(cls) + " in row " +
                                    std::to_string(row0 + r) + " is outside [0, n_classes = " +
                                    std::to_string(c) + ")");
      key[cls >> 6] |= std::uint64_t{1} << (cls & 63);
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
  std::vector<index_t> map(static_cast<std::size_t>(k));
  for (index_t j = 0; j < k; ++j) {
    const index_t g = s.index.find_or_insert(table.packed().data() + j * nw);
    if (g == static_cast<index_t>(s.counts.size())) s.counts.push_back(0);
    s.counts[static_cast<std::size_t>(g)] += table.counts()[static_cast<std::size_t>(j)];
    map[static_cast<std::size_t>(j)] = g;
  }
  if (s.keep_inverse) {
    const std::size_t old_size = s.inverse.size();
    const index_t n = table.n_samples();
    s.inverse.resize(old_size + static_cast<std::size_t>(n));
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
  t.packed_ = std::move(s.index.keys());
  t.counts_ = std::move(s.counts);
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
