#include "pybind.hpp"

#include <optional>
#include <utility>

#include "cobalance/mask_scan.hpp"

namespace cobalance::bindings {

namespace {

using MinPixels = py::array_t<index_t, py::array::c_style>;

MaskScanOptions make_options(std::optional<std::int64_t> ignore_index, const MinPixels& min_pixels,
                             std::pair<index_t, index_t> tile, std::pair<index_t, index_t> stride, int n_threads,
                             index_t first_image) {
  require_ndim(min_pixels, 1, "min_pixels");
  MaskScanOptions o;
  o.has_ignore_index = ignore_index.has_value();
  o.ignore_index = ignore_index.value_or(0);
  o.min_pixels.assign(min_pixels.data(), min_pixels.data() + min_pixels.size());
  o.tile_h = tile.first;
  o.tile_w = tile.second;
  o.stride_h = stride.first;
  o.stride_w = stride.second;
  o.n_threads = n_threads;
  o.first_image = first_image;
  o.interrupt = python_signals();  // Ctrl-C stops a long scan (see interruptible)
  return o;
}

py::tuple to_python(MaskScanResult&& r) {
  const py::ssize_t n = r.n_samples, c = r.n_classes;
  return py::make_tuple(array_from(std::move(r.presence), {n, c}), array_from(std::move(r.pixel_counts), {n, c}),
                        array_from(std::move(r.valid_pixels), {n}), array_from(std::move(r.origins), {n, 3}));
}

void require_c_contiguous(const py::array& a, const char* name) {
  if (!(a.flags() & py::array::c_style))
    throw std::invalid_argument(std::string(name) + " must be C-contiguous");
}

template <class T>
MaskScanResult scan_labels_as(const py::array& masks, index_t n_classes, const MaskScanOptions& o) {
  const T* data = static_cast<const T*>(masks.data());
  const index_t n = masks.shape(0), h = masks.shape(1), w = masks.shape(2);
  return interruptible([&] {
    // Safe: the loop reads only the mask buffer, which the caller's reference keeps
    // alive, and writes only C++-owned vectors.
    py::gil_scoped_release release;
    return scan_label_maps<T>(data, n, h, w, n_classes, o);
  });
}

}  // namespace

void bind_masks(py::module_& m) {
  m.def(
      "scan_label_maps",
      [](py::array masks, index_t n_classes, std::optional<std::int64_t> ignore_index, MinPixels min_pixels,
         std::pair<index_t, index_t> tile, std::pair<index_t, index_t> stride, int n_threads, index_t first_image) {
        require_ndim(masks, 3, "masks");
        require_c_contiguous(masks, "masks");
        const MaskScanOptions o = make_options(ignore_index, min_pixels, tile, stride, n_threads, first_image);
        const auto dt = masks.dtype();
        if (dt.is(py::dtype::of<std::uint8_t>())) return to_python(scan_labels_as<std::uint8_t>(masks, n_classes, o));
        if (dt.is(py::dtype::of<std::uint16_t>()))
          return to_python(scan_labels_as<std::uint16_t>(masks, n_classes, o));
        if (dt.is(py::dtype::of<std::int32_t>())) return to_python(scan_labels_as<std::int32_t>(masks, n_classes, o));
        throw std::invalid_argument("label-map masks must be uint8, uint16 or int32, got dtype " +
                                    py::str(py::object(dt)).cast<std::string>());
      },
      py::arg("masks").noconvert(), py::arg("n_classes"), py::arg("ignore_index"), py::arg("min_pixels"),
      py::arg("tile"), py::arg("stride"), py::arg("n_threads") = 0, py::arg("first_image") = 0,
      "Scan label maps (n_images, height, width); returns (presence, pixel_counts, valid_pixels, origins).");

  m.def(
      "scan_binary_masks",
      [](py::array_t<std::uint8_t, py::array::c_style> masks, MinPixels min_pixels, std::pair<index_t, index_t> tile,
         std::pair<index_t, index_t> stride, int n_threads, index_t first_image) {
        require_ndim(masks, 4, "masks");
        const MaskScanOptions o = make_options(std::nullopt, min_pixels, tile, stride, n_threads, first_image);
        const std::uint8_t* data = masks.data();
        const index_t n = masks.shape(0), c = masks.shape(1), h = masks.shape(2), w = masks.shape(3);
        MaskScanResult r = interruptible([&] {
          // Safe: reads only the mask buffer held by the caller; writes C++-owned vectors.
          py::gil_scoped_release release;
          return scan_binary_masks(data, n, c, h, w, o);
        });
        return to_python(std::move(r));
      },
      py::arg("masks").noconvert(), py::arg("min_pixels"), py::arg("tile"), py::arg("stride"),
      py::arg("n_threads") = 0, py::arg("first_image") = 0,
      "Scan binary masks (n_images, n_classes, height, width); returns (presence, pixel_counts, valid_pixels, "
      "origins).");

  m.def(
      "tile_starts",
      [](index_t size, index_t tile, index_t stride, const std::string& axis) {
        return tile_starts(size, tile, stride, axis.c_str());
      },
      py::arg("size"), py::arg("tile"), py::arg("stride"), py::arg("axis") = "height");
}

}  // namespace cobalance::bindings
