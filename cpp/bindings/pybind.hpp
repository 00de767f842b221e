// The one header that includes pybind11; every binding file includes it first.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "cobalance/interrupt.hpp"

namespace py = pybind11;

namespace cobalance::bindings {

// The interrupt check that the bindings give the core's long loops: it runs Python's
// signal handlers (taking the GIL, which the loops run without; the core calls it from
// the thread that called in, at most every 50 ms), so that Ctrl-C, or a handler that
// raises (the command line's SIGTERM handler), stops the computation. The exception
// the handler raised stays pending until interruptible() raises it.
inline InterruptCheck python_signals() {
  return [] {
    py::gil_scoped_acquire gil;
    return PyErr_CheckSignals() != 0;
  };
}

// Returns fn() (which may release the GIL); where the core stopped on
// python_signals(), raises the exception that the signal handler left pending
// (KeyboardInterrupt for Ctrl-C) instead, once the GIL is held again.
template <class Fn>
auto interruptible(Fn&& fn) -> decltype(fn()) {
  try {
    return fn();
  } catch (const Interrupted&) {
    if (!PyErr_Occurred()) PyErr_SetNone(PyExc_KeyboardInterrupt);  // a check other than python_signals()
    throw py::error_already_set();
  }
}

// A read-only numpy view of a vector owned by `owner` (kept alive by the view).
template <class T, class Alloc>
py::array_t<T> view_of(const std::vector<T, Alloc>& v, std::vector<py::ssize_t> shape, py::handle owner) {
  std::vector<py::ssize_t> strides(shape.size());
  py::ssize_t step = sizeof(T);
  for (std::size_t i = shape.size(); i-- > 0;) {
    strides[i] = step;
    step *= shape[i];
  }
  py::array_t<T> out(shape, strides, v.data(), owner);
  py::detail::array_proxy(out.ptr())->flags &= ~py::detail::npy_api::NPY_ARRAY_WRITEABLE_;
  return out;
}

// Moves a vector into a new numpy array that owns it (no copy).
template <class T>
py::array_t<T> array_from(std::vector<T>&& v, std::vector<py::ssize_t> shape) {
  auto* heap = new std::vector<T>(std::move(v));
  py::capsule free_when_done(heap, [](void* p) { delete static_cast<std::vector<T>*>(p); });
  return py::array_t<T>(shape, heap->data(), free_when_done);
}

// Checks a C-contiguous array's dimensionality; names the argument in the error.
inline void require_ndim(const py::array& a, py::ssize_t ndim, const char* name) {
  if (a.ndim() != ndim)
    throw std::invalid_argument(std::string(name) + " must be " + std::to_string(ndim) +
                                "-dimensional, got ndim=" + std::to_string(a.ndim()));
}

void bind_patterns(py::module_& m);
void bind_masks(py::module_& m);
void bind_balance(py::module_& m);

}  // namespace cobalance::bindings
