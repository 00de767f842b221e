// Mask scanning: from segmentation masks to per-sample class presence and pixel counts.
//
// Two mask layouts are read:
//   - label maps, one class id per pixel: n_images x height x width of uint8, uint16
//     or int32 (row-major);
//   - multi-channel binary masks, one 0/nonzero plane per class: n_images x n_classes
//     x height x width of uint8 (a pixel may belong to several classes).
//
// A *sample* is either a whole image or, with tiling, one tile of an image. Samples
// are numbered image by image, and within an image row of tiles by row of tiles, left
// to right. For every sample the scan reports
//   - pixel_counts[s * n_classes + c]: pixels of class c in the sample (int64),
//   - presence[s * n_classes + c]: 1 when pixel_counts >= min_pixels[c], else 0,
//   - valid_pixels[s]: pixels of the sample that are not ignore_index (label maps;
//     the tile area for binary masks), the denominator of pixel shares,
//   - origins[s * 3 + {0, 1, 2}]: the image index and the tile's top-left (y, x).
//
// Tiling (tile_h, tile_w > 0, strides 1 <= stride <= tile): along each axis of size L
// the tile starts are 0, stride, 2 * stride, ... while start + tile <= L, plus one last
// tile at L - tile when the previous tiles do not reach the border, so the tiles
// always cover the whole image (tiles overlap when stride < tile, and the last tile
// may overlap its neighbour). A tile larger than the image is an error naming both
// sizes. Without tiling every image is one sample.
//
// Results do not depend on the number of threads: every sample's counts are exact
// integer sums, and the error reported for bad input is always the one of the first
// offending image in sample order.
#pragma once

#include <cstdint>
#include <vector>

#include "cobalance/interrupt.hpp"
#include "cobalance/pattern_table.hpp"

namespace cobalance {

struct MaskScanOptions {
  // Label maps only: pixels with this value are skipped (counted in no class and not
  // in valid_pixels). It may lie inside [0, n_classes) (e.g. to skip background 0) or
  // outside it (e.g. 255); outside it the value is not an error.
  bool has_ignore_index = false;
  std::int64_t ignore_index = 0;
  // Empty: 1 for every class; one value: for every class; n_classes values: per class.
  // Every value must be >= 1.
  std::vector<index_t> min_pixels;
  // 0 for both tile sizes: no tiling. A stride of 0 means "equal to the tile size".
  index_t tile_h = 0, tile_w = 0;
  index_t stride_h = 0, stride_w = 0;
  // 0: every hardware thread.
  int n_threads = 0;
  // Index given to the first image in origins and error messages, so that masks
  // scanned one batch at a time are numbered as one sequence.
  index_t first_image = 0;
  // Polled between waves of tiles (see interrupt.hpp): Interrupted when it returns true.
  InterruptCheck interrupt;
};

struct MaskScanResult {
  index_t n_samples = 0;
  index_t n_classes = 0;
  std::vector<std::uint8_t> presence;   // n_samples x n_classes
  std::vector<index_t> pixel_counts;    // n_samples x n_classes
  std::vector<index_t> valid_pixels;    // n_samples
  std::vector<index_t> origins;         // n_samples x 3: image, y, x
};

// Tile starts along one axis of length `size` (see the rules above). `axis` names the
// axis ("height" or "width") in error messages. Throws std::invalid_argument when
// tile < 1, stride < 1, stride > tile, or tile > size.
std::vector<index_t> tile_starts(index_t size, index_t tile, index_t stride, const char* axis);

// Scans label maps, n_images x height x width, row-major. T is std::uint8_t,
// std::uint16_t or std::int32_t. Throws std::invalid_argument for n_classes < 1, bad
// options (naming the option and value), and for a pixel value outside
// [0, n_classes) that is not ignore_index (naming the value, the image index and the
// pixel's y and x, for the first such pixel in row-major order of the first such image).
template <class T>
MaskScanResult scan_label_maps(const T* masks, index_t n_images, index_t height, index_t width,
                               index_t n_classes, const MaskScanOptions& options);

// Scans multi-channel binary masks, n_images x n_classes x height x width, row-major;
// a nonzero byte marks the pixel as belonging to that channel's class.
// options.has_ignore_index must be false (binary masks have no ignore value).
MaskScanResult scan_binary_masks(const std::uint8_t* masks, index_t n_images, index_t n_classes,
                                 index_t height, index_t width, const MaskScanOptions& options);

extern template MaskScanResult scan_label_maps<std::uint8_t>(const std::uint8_t*, index_t, index_t, index_t,
                                                             index_t, const MaskScanOptions&);
extern template MaskScanResult scan_label_maps<std::uint16_t>(const std::uint16_t*, index_t, index_t,
                                                              index_t, index_t, const MaskScanOptions&);
extern template MaskScanResult scan_label_maps<std::int32_t>(const std::int32_t*, index_t, index_t, index_t,
                                                             index_t, const MaskScanOptions&);

}  // namespace cobalance
