#include "cobalance/mask_scan.hpp"

#include <algorithm>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "cobalance/parallel.hpp"

namespace cobalance {

namespace {

// Independent histogram copies filled round-robin: runs of equal pixels (a mask is
// mostly background) would otherwise chain every increment on the previous store to
// the same counter.
constexpr int kLanes = 8;
// Local uint32 counters are folded into int64 totals before they can overflow.
constexpr index_t kFlushPixels = index_t{1} << 31;
// Below this many pixels per thread, starting a thread costs more than it saves.
constexpr index_t kMinPixelsPerPart = index_t{1} << 16;
// Pixels per thread between two polls of an interrupt check: tens of milliseconds of
// scanning, so that a poll costs nothing next to a wave and a stop comes promptly.
constexpr index_t kWavePixels = index_t{1} << 26;

std::string str(index_t v) { return std::to_string(v); }

struct Grid {
  index_t n_images = 0, height = 0, width = 0;
  index_t tile_h = 0, tile_w = 0;
  std::vector<index_t> ys, xs;  // tile starts
  index_t per_image() const { return static_cast<index_t>(ys.size() * xs.size()); }
};

Grid make_grid(index_t n_images, index_t height, index_t width, const MaskScanOptions& o) {
  if (o.first_image < 0) throw std::invalid_argument("first_image must be >= 0, got " + str(o.first_image));
  if (n_images < 0) throw std::invalid_argument("n_images must be >= 0, got " + str(n_images));
  if (height < 0) throw std::invalid_argument("height must be >= 0, got " + str(height));
  if (width < 0) throw std::invalid_argument("width must be >= 0, got " + str(width));
  Grid g;
  g.n_images = n_images;
  g.height = height;
  g.width = width;
  const bool tiled = o.tile_h != 0 || o.tile_w != 0;
  if (!tiled) {
    if (o.stride_h != 0 || o.stride_w != 0)
      throw std::invalid_argument("stride (" + str(o.stride_h) + ", " + str(o.stride_w) +
                                  ") given without a tile size");
    g.tile_h = height;
    g.tile_w = width;
    g.ys = {0};
    g.xs = {0};
    return g;
  }
  g.tile_h = o.tile_h;
  g.tile_w = o.tile_w;
  g.ys = tile_starts(height, o.tile_h, o.stride_h == 0 ? o.tile_h : o.stride_h, "height");
  g.xs = tile_starts(width, o.tile_w, o.stride_w == 0 ? o.tile_w : o.stride_w, "width");
  return g;
}

std::vector<index_t> resolve_min_pixels(const std::vector<index_t>& given, index_t n_classes) {
  std::vector<index_t> out;
  if (given.empty()) {
    out.assign(static_cast<std::size_t>(n_classes), 1);
  } else if (given.size() == 1) {
    out.assign(static_cast<std::size_t>(n_classes), given[0]);
  } else if (static_cast<index_t>(given.size()) == n_classes) {
    out = given;
  } else {
    throw std::invalid_argument("min_pixels must hold 1 or n_classes = " + str(n_classes) + " values, got " +
                                std::to_string(given.size()));
  }
  for (std::size_t c = 0; c < out.size(); ++c)
    if (out[c] < 1)
      throw std::invalid_argument("min_pixels must be >= 1, got " + str(out[c]) +
                                  (given.size() > 1 ? " for class " + std::to_string(c) : std::string()));
  return out;
}

// Runs `make_worker()(image, y0, x0, row_begin, row_end, counts, valid)` over every
// sample of the grid, adding a sample's class counts into counts[0..n_classes) and its
// non-ignored pixel count into *valid, then derives presence. When there are fewer
// samples than threads each sample is split into row bands, summed afterwards in a
// fixed order (integer sums, so the result is the same for any split).
template <class MakeWorker>
MaskScanResult run_scan(const Grid& g, index_t n_classes, index_t planes, const MaskScanOptions& o,
                        MakeWorker&& make_worker) {
  const std::vector<index_t> min_pixels = resolve_min_pixels(o.min_pixels, n_classes);
  MaskScanResult r;
  r.n_classes = n_classes;
  r.n_samples = g.n_images * g.per_image();
  const auto n = static_cast<std::size_t>(r.n_samples);
  const auto c = static_cast<std::size_t>(n_classes);
  r.presence.assign(n * c, 0);
  r.pixel_counts.assign(n * c, 0);
  r.valid_pixels.assign(n, 0);
  r.origins.resize(n * 3);
  const auto nx = static_cast<index_t>(g.xs.size());
  for (index_t s = 0; s < r.n_samples; ++s) {
    const index_t k = s % g.per_image();
    r.origins[static_cast<std::size_t>(3 * s)] = o.first_image + s / g.per_image();
    r.origins[static_cast<std::size_t>(3 * s + 1)] = g.ys[static_cast<std::size_t>(k / nx)];
    r.origins[static_cast<std::size_t>(3 * s + 2)] = g.xs[static_cast<std::size_t>(k % nx)];
  }
  if (r.n_samples == 0) return r;

  const index_t threads = resolve_threads(o.n_threads);
  index_t bands = 1;
  if (r.n_samples < threads && g.tile_h > 1)
    bands = std::min(g.tile_h, (threads + r.n_samples - 1) / r.n_samples);
  const index_t units = r.n_samples * bands;
  const index_t unit_pixels = std::max<index_t>(1, g.tile_h * g.tile_w * planes / bands);
  const index_t by_work = std::max<index_t>(1, units / std::max<index_t>(1, kMinPixelsPerPart / unit_pixels));
  const int parts = static_cast<int>(std::min({threads, units, by_work}));

  std::vector<index_t> band_counts, band_valid;
  if (bands > 1) {
    band_counts.assign(static_cast<std::size_t>(units) * c, 0);
    band_valid.assign(static_cast<std::size_t>(units), 0);
  }
  // With an interrupt check the units go in waves of about kWavePixels per part, the
  // check polled between them on this thread; without one, in one wave. Every unit's
  // counts are its own exact sums, so the waves change no result, and an error is still
  // that of the first bad unit in order (the waves run in order, and within one the
  // lowest part's error is rethrown, its units coming first).
  InterruptPoller interrupt(o.interrupt);
  const index_t wave = interrupt.active() ? std::max<index_t>(parts, kWavePixels / unit_pixels * parts) : units;
  for (index_t first = 0; first < units; first += wave) {
    interrupt.poll();
    const index_t last = std::min(units, first + wave);
    const int wave_parts = static_cast<int>(std::min<index_t>(parts, last - first));
    const std::vector<index_t> bounds = split_range(last - first, wave_parts);
    run_parts(wave_parts, [&](int t) {
      auto worker = make_worker();
      for (index_t u = first + bounds[static_cast<std::size_t>(t)]; u < first + bounds[static_cast<std::size_t>(t) + 1];
           ++u) {
        const index_t s = u / bands, band = u % bands;
        const index_t row_begin = g.tile_h * band / bands, row_end = g.tile_h * (band + 1) / bands;
        const auto s3 = static_cast<std::size_t>(3 * s);
        index_t* counts = bands > 1 ? &band_counts[static_cast<std::size_t>(u) * c] : &r.pixel_counts[s * c];
        index_t* valid = bands > 1 ? &band_valid[static_cast<std::size_t>(u)] : &r.valid_pixels[s];
        worker(r.origins[s3] - o.first_image, r.origins[s3 + 1], r.origins[s3 + 2], row_begin, row_end, counts,
               valid);
      }
    });
  }
  if (bands > 1) {
    for (std::size_t u = 0; u < static_cast<std::size_t>(units); ++u) {
      const std::size_t s = u / static_cast<std::size_t>(bands);
      for (std::size_t k = 0; k < c; ++k) r.pixel_counts[s * c + k] += band_counts[u * c + k];
      r.valid_pixels[s] += band_valid[u];
    }
  }
  for (std::size_t s = 0; s < n; ++s)
    for (std::size_t k = 0; k < c; ++k)
      r.presence[s * c + k] = r.pixel_counts[s * c + k] >= min_pixels[k] ? 1 : 0;
  return r;
}

// Label-map histogram of one tile band.
//
// uint8 maps: every byte value has its own bin (256 bins, no per-pixel test at all).
// Wider types: a window of values [lo, lo + width) has its own bins, chosen to hold
// the class ids and, when it is close to them, ignore_index (e.g. 255 or -100); every
// other value goes to the overflow bin `width` through one unsigned compare and a
// conditional move. Only when ignore_index is far from the class ids does each pixel
// get a second compare, sending it to its own bin `width + 1`.
//
// Values that are neither class ids nor ignore_index land in bins that are never
// folded; the shortfall in the folded total reveals them (see operator()).
template <class T>
class LabelHistogram {
  static constexpr bool kDirect = std::is_same_v<T, std::uint8_t>;
  // Widest window worth a direct bin for ignore_index (a uint16 map with 65535).
  static constexpr index_t kMaxWindow = (index_t{1} << 16) + 1;

 public:
  LabelHistogram(const T* masks, const Grid& g, index_t n_classes, const MaskScanOptions& o)
      : masks_(masks),
        g_(g),
        n_classes_(n_classes),
        has_ignore_(o.has_ignore_index),
        ignore_(o.ignore_index),
        first_image_(o.first_image) {
    const auto max_id = static_cast<index_t>(std::numeric_limits<T>::max());
    const auto min_id = static_cast<index_t>(std::numeric_limits<T>::min());
    const index_t binned_classes = std::min(n_classes, max_id + 1);  // ids T can hold
    // An ignore value the dtype cannot hold never matches and needs no bin.
    const bool ignore_representable = has_ignore_ && ignore_ >= min_id && ignore_ <= max_id;
    if (kDirect) {
      lo_ = 0;
      width_ = 256;
      bins_ = 256;
    } else {
      lo_ = 0;
      width_ = binned_classes;
      if (ignore_representable && (ignore_ < 0 || ignore_ >= binned_classes)) {
        const index_t lo = std::min<index_t>(0, ignore_), hi = std::max<index_t>(binned_classes, ignore_ + 1);
        if (hi - lo <= std::max(kMaxWindow, binned_classes)) {
          lo_ = lo;
          width_ = hi - lo;
        } else {
          compare_ignore_ = true;
        }
      }
      bins_ = width_ + (compare_ignore_ ? 2 : 1);
    }
    hist_.assign(static_cast<std::size_t>(kLanes * bins_), 0);
    totals_.assign(static_cast<std::size_t>(bins_), 0);
    for (index_t v = 0; v < binned_classes; ++v)
      if (!(ignore_representable && v == ignore_)) class_ids_.push_back(v);
    if (ignore_representable) ignore_bin_ = compare_ignore_ ? width_ + 1 : ignore_ - lo_;
  }

  void operator()(index_t image, index_t y0, index_t x0, index_t row_begin, index_t row_end, index_t* counts,
                  index_t* valid) {
    index_t pending = 0;
    for (index_t y = row_begin; y < row_end; ++y) {
      const T* row = masks_ + (image * g_.height + y0 + y) * g_.width + x0;
      for (index_t x = 0; x < g_.tile_w;) {
        const index_t len = std::min(g_.tile_w - x, kFlushPixels);
        if (pending + len > kFlushPixels) {
          flush();
          pending = 0;
        }
        accumulate(row + x, len);
        pending += len;
        x += len;
      }
    }
    flush();
    // Every pixel went to a class bin, the ignore bin, or a bin of an invalid value;
    // the last are never folded, so a shortfall in the folded sum reveals them.
    const index_t pixels = (row_end - row_begin) * g_.tile_w;
    index_t accounted = 0;
    for (const index_t c : class_ids_) {
      auto& total = totals_[static_cast<std::size_t>(c - lo_)];
      counts[c] += total;
      accounted += total;
      total = 0;
    }
    index_t ignored = 0;
    if (ignore_bin_ >= 0) {
      ignored = totals_[static_cast<std::size_t>(ignore_bin_)];
      totals_[static_cast<std::size_t>(ignore_bin_)] = 0;
    }
    if (accounted + ignored != pixels) throw_first_bad_pixel(image);
    *valid += pixels - ignored;
  }

 private:
  // Lane l of bin b. uint8: one 256-bin block per lane, so the lane is a constant
  // displacement; wider types: lanes interleaved per bin, for the same reason with a
  // run-time bin count.
  std::size_t slot(index_t lane, index_t bin) const {
    return static_cast<std::size_t>(kDirect ? lane * 256 + bin : bin * kLanes + lane);
  }

  void accumulate(const T* p, index_t n) {
    std::uint32_t* h = hist_.data();
    index_t i = 0;
    if constexpr (kDirect) {
      for (; i + kLanes <= n; i += kLanes)
        for (int l = 0; l < kLanes; ++l) ++h[l * 256 + p[i + l]];
      for (; i < n; ++i) ++h[p[i]];
    } else {
      const auto width = static_cast<std::uint64_t>(width_);
      const auto lo = static_cast<std::int64_t>(lo_);
      if (compare_ignore_) {
        const auto ignore = static_cast<T>(ignore_);
        const auto ignore_bin = width + 1;
        auto bin = [=](T v) -> std::uint64_t {
          const auto u = static_cast<std::uint64_t>(static_cast<std::int64_t>(v) - lo);
          const std::uint64_t b = u < width ? u : width;
          return v == ignore ? ignore_bin : b;
        };
        for (; i + kLanes <= n; i += kLanes)
          for (int l = 0; l < kLanes; ++l) ++h[bin(p[i + l]) * kLanes + l];
        for (; i < n; ++i) ++h[bin(p[i]) * kLanes];
      } else {
        // Values below lo wrap to huge unsigned numbers and land in the overflow bin.
        auto bin = [=](T v) -> std::uint64_t {
          const auto u = static_cast<std::uint64_t>(static_cast<std::int64_t>(v) - lo);
          return u < width ? u : width;
        };
        for (; i + kLanes <= n; i += kLanes)
          for (int l = 0; l < kLanes; ++l) ++h[bin(p[i + l]) * kLanes + l];
        for (; i < n; ++i) ++h[bin(p[i]) * kLanes];
      }
    }
  }

  // Folds and clears only the class and ignore bins: with valid input no other bin
  // is ever touched, so a tile costs O(n_classes) besides its pixels, not O(bins).
  void flush() {
    auto fold = [&](index_t b) {
      index_t sum = 0;
      for (index_t l = 0; l < kLanes; ++l) {
        auto& h = hist_[slot(l, b)];
        sum += h;
        h = 0;
      }
      totals_[static_cast<std::size_t>(b)] += sum;
    };
    for (const index_t c : class_ids_) fold(c - lo_);
    if (ignore_bin_ >= 0) fold(ignore_bin_);
  }

  // Slow path, only on error: the first offending pixel of the image in row-major
  // order, so the message does not depend on tiling or threads.
  [[noreturn]] void throw_first_bad_pixel(index_t image) const {
    const index_t shown = image + first_image_;
    const T* m = masks_ + image * g_.height * g_.width;
    for (index_t y = 0; y < g_.height; ++y)
      for (index_t x = 0; x < g_.width; ++x) {
        const auto v = static_cast<index_t>(m[y * g_.width + x]);
        if ((v < 0 || v >= n_classes_) && !(has_ignore_ && v == ignore_))
          throw std::invalid_argument(
              "mask value " + str(v) + " at image " + str(shown) + ", pixel (y=" + str(y) + ", x=" + str(x) +
              ") is not a class id in [0, n_classes=" + str(n_classes_) + ")" +
              (has_ignore_ ? " nor ignore_index=" + str(ignore_) : std::string()));
      }
    throw std::logic_error("mask scan: overflow bin set but no offending pixel found");
  }

  const T* masks_;
  const Grid& g_;
  index_t n_classes_;
  bool has_ignore_;
  index_t ignore_;
  index_t first_image_;
  index_t lo_ = 0;                  // value of bin 0
  index_t width_ = 0;               // values with a bin of their own: [lo_, lo_ + width_)
  bool compare_ignore_ = false;     // ignore_index far outside the window: own compare
  index_t bins_ = 0;
  std::vector<index_t> class_ids_;  // ids counted (those T can hold, minus a class-valued ignore_index)
  index_t ignore_bin_ = -1;         // -1: no ignore_index the dtype can hold
  std::vector<std::uint32_t> hist_;
  std::vector<index_t> totals_;
};

// Nonzero bytes of p[0..n). Written as a plain reduction so that the compiler turns it
// into a vectorised compare-and-add.
index_t count_nonzero(const std::uint8_t* p, index_t n) {
  index_t total = 0;
  for (index_t i = 0; i < n;) {
    const index_t len = std::min<index_t>(n - i, kFlushPixels);
    std::uint32_t acc = 0;
    for (index_t j = 0; j < len; ++j) acc += p[i + j] != 0;
    total += acc;
    i += len;
  }
  return total;
}

}  // namespace

std::vector<index_t> tile_starts(index_t size, index_t tile, index_t stride, const char* axis) {
  const std::string name(axis);
  if (tile < 1) throw std::invalid_argument("tile " + name + " must be >= 1, got " + str(tile));
  if (stride < 1) throw std::invalid_argument("stride along " + name + " must be >= 1, got " + str(stride));
  if (stride > tile)
    throw std::invalid_argument("stride along " + name + " (" + str(stride) + ") must not exceed the tile " +
                                name + " (" + str(tile) + "), or the tiles would leave gaps");
  if (tile > size)
    throw std::invalid_argument("tile " + name + " " + str(tile) + " is larger than the image " + name + " " +
                                str(size));
  std::vector<index_t> starts;
  for (index_t s = 0; s + tile <= size; s += stride) starts.push_back(s);
  if (starts.back() + tile < size) starts.push_back(size - tile);
  return starts;
}

template <class T>
MaskScanResult scan_label_maps(const T* masks, index_t n_images, index_t height, index_t width,
                               index_t n_classes, const MaskScanOptions& options) {
  static_assert(std::is_same_v<T, std::uint8_t> || std::is_same_v<T, std::uint16_t> ||
                    std::is_same_v<T, std::int32_t>,
                "label maps are uint8, uint16 or int32");
  if (n_classes < 1) throw std::invalid_argument("n_classes must be >= 1, got " + str(n_classes));
  const Grid g = make_grid(n_images, height, width, options);
  if (g.n_images > 0 && g.height * g.width > 0 && masks == nullptr)
    throw std::invalid_argument("masks must not be null");
  return run_scan(g, n_classes, 1, options, [&] { return LabelHistogram<T>(masks, g, n_classes, options); });
}

MaskScanResult scan_binary_masks(const std::uint8_t* masks, index_t n_images, index_t n_classes, index_t height,
                                 index_t width, const MaskScanOptions& options) {
  if (n_classes < 1) throw std::invalid_argument("n_classes must be >= 1, got " + str(n_classes));
  if (options.has_ignore_index)
    throw std::invalid_argument("ignore_index (" + str(options.ignore_index) +
                                ") does not apply to binary masks, which hold 0/nonzero per class");
  const Grid g = make_grid(n_images, height, width, options);
  if (g.n_images > 0 && g.height * g.width > 0 && masks == nullptr)
    throw std::invalid_argument("masks must not be null");
  return run_scan(g, n_classes, n_classes, options, [&] {
    return [&](index_t image, index_t y0, index_t x0, index_t row_begin, index_t row_end, index_t* counts,
               index_t* valid) {
      for (index_t c = 0; c < n_classes; ++c) {
        const std::uint8_t* plane = masks + (image * n_classes + c) * g.height * g.width;
        index_t total = 0;
        for (index_t y = row_begin; y < row_end; ++y)
          total += count_nonzero(plane + (y0 + y) * g.width + x0, g.tile_w);
        counts[c] += total;
      }
      *valid += (row_end - row_begin) * g.tile_w;
    };
  });
}

template MaskScanResult scan_label_maps<std::uint8_t>(const std::uint8_t*, index_t, index_t, index_t, index_t,
                                                      const MaskScanOptions&);
template MaskScanResult scan_label_maps<std::uint16_t>(const std::uint16_t*, index_t, index_t, index_t, index_t,
                                                       const MaskScanOptions&);
template MaskScanResult scan_label_maps<std::int32_t>(const std::int32_t*, index_t, index_t, index_t, index_t,
                                                      const MaskScanOptions&);

}  // namespace cobalance
