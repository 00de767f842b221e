// Mask scanning against hand-made masks with known answers and a brute-force
// per-pixel reference on random masks (tiling, ignore_index, min_pixels, threads).
#include <cstdint>
#include <random>
#include <type_traits>
#include <vector>

#include "check.hpp"
#include "cobalance/mask_scan.hpp"

using cobalance::index_t;
using cobalance::MaskScanOptions;
using cobalance::MaskScanResult;

namespace {

struct Reference {
  std::vector<index_t> counts, valid, origins;
};

// Brute force: enumerate tiles by the documented rule, count pixel by pixel.
template <class T>
Reference reference_labels(const std::vector<T>& m, index_t n, index_t h, index_t w, index_t c, bool has_ignore,
                           index_t ignore, index_t th, index_t tw, index_t sh, index_t sw) {
  auto starts = [](index_t size, index_t tile, index_t stride) {
    std::vector<index_t> s;
    for (index_t x = 0; x + tile <= size; x += stride) s.push_back(x);
    if (s.back() + tile != size) s.push_back(size - tile);
    return s;
  };
  if (th == 0) th = h, tw = w, sh = h, sw = w;
  Reference r;
  for (index_t i = 0; i < n; ++i)
    for (index_t y0 : starts(h, th, sh))
      for (index_t x0 : starts(w, tw, sw)) {
        std::vector<index_t> cnt(static_cast<std::size_t>(c), 0);
        index_t valid = 0;
        for (index_t y = y0; y < y0 + th; ++y)
          for (index_t x = x0; x < x0 + tw; ++x) {
            const auto v = static_cast<index_t>(m[static_cast<std::size_t>((i * h + y) * w + x)]);
            if (has_ignore && v == ignore) continue;
            ++valid;
            ++cnt[static_cast<std::size_t>(v)];
          }
        r.counts.insert(r.counts.end(), cnt.begin(), cnt.end());
        r.valid.push_back(valid);
        r.origins.insert(r.origins.end(), {i, y0, x0});
      }
  return r;
}

void hand_made() {
  // One 2 x 4 label map, 3 classes: class 0 x4, class 1 x3, class 2 x1.
  const std::vector<std::uint8_t> m = {0, 0, 1, 1,  //
                                       0, 0, 1, 2};
  MaskScanOptions o;
  auto r = cobalance::scan_label_maps(m.data(), 1, 2, 4, 3, o);
  CHECK(r.n_samples == 1);
  CHECK((r.pixel_counts == std::vector<index_t>{4, 3, 1}));
  CHECK((r.presence == std::vector<std::uint8_t>{1, 1, 1}));
  CHECK((r.valid_pixels == std::vector<index_t>{8}));
  CHECK((r.origins == std::vector<index_t>{0, 0, 0}));

  o.min_pixels = {1, 4, 1};  // class 1 needs 4 pixels: absent
  r = cobalance::scan_label_maps(m.data(), 1, 2, 4, 3, o);
  CHECK((r.presence == std::vector<std::uint8_t>{1, 0, 1}));

  // 2 x 2 tiles: left tile all 0, right tile 1, 1, 1, 2.
  o = MaskScanOptions{};
  o.tile_h = 2, o.tile_w = 2;
  r = cobalance::scan_label_maps(m.data(), 1, 2, 4, 3, o);
  CHECK(r.n_samples == 2);
  CHECK((r.pixel_counts == std::vector<index_t>{4, 0, 0, 0, 3, 1}));
  CHECK((r.presence == std::vector<std::uint8_t>{1, 0, 0, 0, 1, 1}));
  CHECK((r.origins == std::vector<index_t>{0, 0, 0, 0, 0, 2}));

  // ignore_index inside the class range skips that class and the pixels' share.
  o = MaskScanOptions{};
  o.has_ignore_index = true, o.ignore_index = 0;
  r = cobalance::scan_label_maps(m.data(), 1, 2, 4, 3, o);
  CHECK((r.pixel_counts == std::vector<index_t>{0, 3, 1}));
  CHECK((r.valid_pixels == std::vector<index_t>{4}));

  // ignore_index outside the range (255) is not an error.
  const std::vector<std::uint16_t> m16 = {255, 1, 255, 0};
  o.ignore_index = 255;
  auto r16 = cobalance::scan_label_maps(m16.data(), 1, 2, 2, 2, o);
  CHECK((r16.pixel_counts == std::vector<index_t>{1, 1}));
  CHECK((r16.valid_pixels == std::vector<index_t>{2}));

  // Binary masks: 2 classes overlapping on one pixel.
  const std::vector<std::uint8_t> b = {1, 1, 0, 0,   // class 0
                                       0, 7, 0, 0};  // class 1 (nonzero = present)
  o = MaskScanOptions{};
  auto rb = cobalance::scan_binary_masks(b.data(), 1, 2, 2, 2, o);
  CHECK((rb.pixel_counts == std::vector<index_t>{2, 1}));
  CHECK((rb.valid_pixels == std::vector<index_t>{4}));
}

void tiling_rule() {
  CHECK((cobalance::tile_starts(10, 4, 4, "height") == std::vector<index_t>{0, 4, 6}));
  CHECK((cobalance::tile_starts(8, 4, 4, "height") == std::vector<index_t>{0, 4}));
  CHECK((cobalance::tile_starts(10, 4, 3, "height") == std::vector<index_t>{0, 3, 6}));
  CHECK((cobalance::tile_starts(11, 4, 3, "height") == std::vector<index_t>{0, 3, 6, 7}));
  CHECK((cobalance::tile_starts(4, 4, 1, "width") == std::vector<index_t>{0}));
  CHECK_INVALID(cobalance::tile_starts(3, 4, 4, "width"), "tile width 4 is larger than the image width 3");
  CHECK_INVALID(cobalance::tile_starts(8, 4, 5, "width"), "stride along width (5)");
  CHECK_INVALID(cobalance::tile_starts(8, 0, 1, "height"), "tile height must be >= 1, got 0");
}

void bad_input() {
  const std::vector<std::int32_t> m = {0, 1, 2, 0, /* image 1 */ 0, 0, -3, 9};
  MaskScanOptions o;
  CHECK_INVALID(cobalance::scan_label_maps(m.data(), 2, 2, 2, 3, o), "mask value -3 at image 1, pixel (y=1, x=0)");
  o.has_ignore_index = true, o.ignore_index = -3;
  CHECK_INVALID(cobalance::scan_label_maps(m.data(), 2, 2, 2, 3, o), "mask value 9 at image 1, pixel (y=1, x=1)");
  // ignore_index far from the ids gets its own compare; bad values are still found.
  const std::vector<std::int32_t> far = {1000000, 2, 1000000, 0};
  o.ignore_index = 1000000;
  const auto rf = cobalance::scan_label_maps(far.data(), 1, 2, 2, 3, o);
  CHECK((rf.pixel_counts == std::vector<index_t>{1, 0, 1}));
  CHECK((rf.valid_pixels == std::vector<index_t>{2}));
  const std::vector<std::int32_t> far_bad = {1000000, 2, 999999, 0};
  CHECK_INVALID(cobalance::scan_label_maps(far_bad.data(), 1, 2, 2, 3, o), "mask value 999999 at image 0, pixel (y=1, x=0)");
  o.ignore_index = -3;
  o.first_image = 40;  // numbering continued from earlier batches
  CHECK_INVALID(cobalance::scan_label_maps(m.data(), 2, 2, 2, 3, o), "mask value 9 at image 41, pixel (y=1, x=1)");
  const auto ok = cobalance::scan_label_maps(m.data(), 1, 2, 2, 3, o);
  CHECK((ok.origins == std::vector<index_t>{40, 0, 0}));
  const std::vector<std::uint8_t> m8 = {0, 5};
  o = MaskScanOptions{};
  CHECK_INVALID(cobalance::scan_label_maps(m8.data(), 1, 1, 2, 5, o), "mask value 5 at image 0, pixel (y=0, x=1)");
  CHECK_INVALID(cobalance::scan_label_maps(m8.data(), 1, 1, 2, 0, o), "n_classes must be >= 1, got 0");
  o.min_pixels = {1, 0, 1, 1, 1, 1};
  CHECK_INVALID(cobalance::scan_label_maps(m8.data(), 1, 1, 2, 6, o), "min_pixels must be >= 1, got 0 for class 1");
  o.min_pixels = {1, 2};
  CHECK_INVALID(cobalance::scan_label_maps(m8.data(), 1, 1, 2, 6, o), "min_pixels must hold 1 or n_classes = 6");
  o = MaskScanOptions{};
  o.tile_h = 2, o.tile_w = 2;
  CHECK_INVALID(cobalance::scan_label_maps(m8.data(), 1, 1, 2, 6, o), "tile height 2 is larger than the image height 1");
  o = MaskScanOptions{};
  o.has_ignore_index = true, o.ignore_index = 255;
  CHECK_INVALID(cobalance::scan_binary_masks(m8.data(), 1, 1, 1, 2, o), "ignore_index (255) does not apply");
}

template <class T>
void random_against_reference(std::mt19937_64& rng, int reps) {
  for (int rep = 0; rep < reps; ++rep) {
    const index_t n = rng() % 4, h = 1 + rng() % 13, w = 1 + rng() % 17, c = 1 + rng() % 6;
    const bool has_ignore = rng() % 2;
    // A class id, a value just above or below the ids, or one far away (the label
    // histogram bins each of these differently).
    std::vector<index_t> ignores = {static_cast<index_t>(rng() % c), c + 3, 255};
    if (std::is_same_v<T, std::uint16_t>) ignores.push_back(65535);
    if (std::is_same_v<T, std::int32_t>) ignores.insert(ignores.end(), {-100, -1, index_t{1} << 20, -(index_t{1} << 30)});
    const index_t ignore = ignores[rng() % ignores.size()];
    std::vector<T> m(static_cast<std::size_t>(n * h * w));
    for (auto& v : m) {
      // Skewed: mostly class 0, like a background.
      const auto u = rng() % 10;
      v = static_cast<T>(u < 6 ? 0 : (u < 8 && has_ignore) ? ignore : static_cast<index_t>(rng() % c));
    }
    index_t th = 0, tw = 0, sh = 0, sw = 0;
    if (rng() % 3) {
      th = 1 + rng() % h, tw = 1 + rng() % w;
      sh = 1 + rng() % th, sw = 1 + rng() % tw;
    }
    const auto ref = reference_labels(m, n, h, w, c, has_ignore, ignore, th, tw, sh, sw);
    std::vector<index_t> min_pixels(static_cast<std::size_t>(c));
    for (auto& v : min_pixels) v = 1 + static_cast<index_t>(rng() % 3);
    for (int threads : {1, 2, 3, 8}) {
      MaskScanOptions o;
      o.has_ignore_index = has_ignore, o.ignore_index = ignore;
      o.tile_h = th, o.tile_w = tw, o.stride_h = sh, o.stride_w = sw;
      o.min_pixels = min_pixels;
      o.n_threads = threads;
      const auto r = cobalance::scan_label_maps(m.data(), n, h, w, c, o);
      CHECK(r.pixel_counts == ref.counts);
      CHECK(r.valid_pixels == ref.valid);
      CHECK(r.origins == ref.origins);
      for (std::size_t k = 0; k < ref.counts.size(); ++k)
        CHECK(r.presence[k] == (ref.counts[k] >= min_pixels[k % static_cast<std::size_t>(c)]));
    }
  }
}

void binary_against_reference(std::mt19937_64& rng, int reps) {
  for (int rep = 0; rep < reps; ++rep) {
    const index_t n = rng() % 3, h = 1 + rng() % 9, w = 1 + rng() % 11, c = 1 + rng() % 5;
    std::vector<std::uint8_t> m(static_cast<std::size_t>(n * c * h * w));
    for (auto& v : m) v = (rng() % 4 == 0) ? static_cast<std::uint8_t>(1 + rng() % 255) : 0;
    const index_t th = 1 + rng() % h, tw = 1 + rng() % w;
    MaskScanOptions o;
    o.tile_h = th, o.tile_w = tw;
    o.n_threads = 1 + static_cast<int>(rng() % 4);
    const auto r = cobalance::scan_binary_masks(m.data(), n, c, h, w, o);
    // Reference: channel k of a binary mask is the label map "pixel in class k".
    for (index_t k = 0; k < c; ++k) {
      std::vector<std::uint8_t> plane(static_cast<std::size_t>(n * h * w));
      for (index_t i = 0; i < n; ++i)
        for (index_t p = 0; p < h * w; ++p)
          plane[static_cast<std::size_t>(i * h * w + p)] = m[static_cast<std::size_t>((i * c + k) * h * w + p)] != 0;
      const auto ref = reference_labels(plane, n, h, w, 2, false, 0, th, tw, th, tw);
      CHECK(static_cast<index_t>(ref.valid.size()) == r.n_samples);
      for (index_t s = 0; s < r.n_samples; ++s) {
        CHECK(r.pixel_counts[static_cast<std::size_t>(s * c + k)] == ref.counts[static_cast<std::size_t>(2 * s + 1)]);
        CHECK(r.valid_pixels[static_cast<std::size_t>(s)] == ref.valid[static_cast<std::size_t>(s)]);
      }
    }
  }
}

}  // namespace

int main() {
  hand_made();
  tiling_rule();
  bad_input();
  std::mt19937_64 rng(20261201);
  random_against_reference<std::uint8_t>(rng, 150);
  random_against_reference<std::uint16_t>(rng, 100);
  random_against_reference<std::int32_t>(rng, 100);
  binary_against_reference(rng, 100);
  return 0;
}
