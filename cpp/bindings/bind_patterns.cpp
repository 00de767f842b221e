#include "pybind.hpp"

#include "cobalance/pattern_table.hpp"

#include <limits>

namespace cobalance::bindings {

namespace {

using Dense = py::array_t<std::uint8_t, py::array::c_style>;
using Words = py::array_t<std::uint64_t, py::array::c_style>;
using Index = py::array_t<index_t, py::array::c_style>;
using AnyIndex = py::array_t<index_t, py::array::c_style | py::array::forcecast>;

// The inverse of a table from 64-bit entries: each must fit a pattern_id_t (from_parts
// then checks that it names one of the table's patterns).
template <int Flags>
InverseVector inverse_from(const py::array_t<index_t, Flags>& a) {
  require_ndim(a, 1, "inverse");
  InverseVector inv(static_cast<std::size_t>(a.size()));
  const index_t* v = a.data();
  for (py::ssize_t r = 0; r < a.size(); ++r) {
    if (v[r] < 0 || v[r] > std::numeric_limits<pattern_id_t>::max())
      throw std::invalid_argument("inverse[" + std::to_string(r) + "] = " + std::to_string(v[r]) +
                                  " is not a pattern index (0 <= index < 2^31)");
    inv[static_cast<std::size_t>(r)] = static_cast<pattern_id_t>(v[r]);
  }
  return inv;
}

}  // namespace

void bind_patterns(py::module_& m) {
  m.def("resolve_threads", &resolve_threads, py::arg("n_threads"));
  m.attr("MAX_CLASSES") = kMaxClasses;

  py::class_<PatternTable>(m, "PatternTable")
      .def_property_readonly("n_classes", &PatternTable::n_classes)
      .def_property_readonly("n_words", &PatternTable::n_words)
      .def_property_readonly("n_patterns", &PatternTable::n_patterns)
      .def_property_readonly("n_samples", &PatternTable::n_samples)
      .def_property_readonly("has_inverse", &PatternTable::has_inverse)
      .def("packed", [](py::object self) {
        const auto& t = self.cast<const PatternTable&>();
        return view_of(t.packed(), {t.n_patterns(), t.n_words()}, self);
      })
      .def("counts", [](py::object self) {
        const auto& t = self.cast<const PatternTable&>();
        return view_of(t.counts(), {t.n_patterns()}, self);
      })
      .def("inverse", [](py::object self) {
        const auto& t = self.cast<const PatternTable&>();
        return view_of(t.inverse(), {static_cast<py::ssize_t>(t.inverse().size())}, self);
      })
      .def("dense", [](const PatternTable& t) {
        return array_from(t.dense(), {t.n_patterns(), t.n_classes()});
      })
      .def("sparse", [](const PatternTable& t) {
        std::vector<index_t> indptr, indices;
        t.sparse(indptr, indices);
        const auto nnz = static_cast<py::ssize_t>(indices.size());
        return py::make_tuple(array_from(std::move(indptr), {t.n_patterns() + 1}),
                              array_from(std::move(indices), {nnz}));
      })
      .def("class_counts", [](const PatternTable& t) {
        return array_from(t.class_counts(), {t.n_classes()});
      })
      .def_static(
          "from_parts",
          [](index_t n_classes, Words packed, Index counts, py::object inverse) {
            require_ndim(packed, 2, "packed");
            require_ndim(counts, 1, "counts");
            PackedVector p(packed.data(), packed.data() + packed.size());
            std::vector<index_t> c(counts.data(), counts.data() + counts.size());
            InverseVector inv;
            const bool has_inverse = !inverse.is_none();
            if (has_inverse) inv = inverse_from(inverse.cast<Index>());
            if (packed.shape(0) != counts.shape(0))
              throw std::invalid_argument("packed has " + std::to_string(packed.shape(0)) +
                                          " rows but counts has " + std::to_string(counts.shape(0)));
            py::gil_scoped_release release;  // validation only touches the copies above
            return PatternTable::from_parts(n_classes, std::move(p), std::move(c), std::move(inv),
                                            has_inverse);
          },
          py::arg("n_classes"), py::arg("packed"), py::arg("counts"), py::arg("inverse"))
      .def(py::pickle(
          [](py::object self) {
            const auto& t = self.cast<const PatternTable&>();
            py::object inv = py::none();
            if (t.has_inverse()) inv = py::array_t<pattern_id_t>(view_of(t.inverse(), {static_cast<py::ssize_t>(t.inverse().size())}, self));
            return py::make_tuple(t.n_classes(),
                                  py::array_t<std::uint64_t>(view_of(t.packed(), {t.n_patterns(), t.n_words()}, self)),
                                  py::array_t<index_t>(view_of(t.counts(), {t.n_patterns()}, self)), inv);
          },
          [](py::tuple s) {
            InverseVector inv;
            const bool has_inverse = !s[3].is_none();
            auto packed = s[1].cast<Words>();
            auto counts = s[2].cast<Index>();
            if (has_inverse) inv = inverse_from(s[3].cast<AnyIndex>());
            return PatternTable::from_parts(
                s[0].cast<index_t>(), PackedVector(packed.data(), packed.data() + packed.size()),
                std::vector<index_t>(counts.data(), counts.data() + counts.size()), std::move(inv), has_inverse);
          }));

  // Every builder polls Python's signal handlers in its add_* calls, which stop on
  // Ctrl-C with the builder as before the call (see interruptible).
  py::class_<PatternTableBuilder>(m, "PatternTableBuilder")
      .def(py::init([](index_t n_classes, bool keep_inverse, int n_threads) {
             PatternTableBuilder b(n_classes, keep_inverse, n_threads);
             b.set_interrupt_check(python_signals());
             return b;
           }),
           py::arg("n_classes"), py::arg("keep_inverse") = true, py::arg("n_threads") = 0)
      .def_property_readonly("n_classes", &PatternTableBuilder::n_classes)
      .def_property_readonly("n_samples", &PatternTableBuilder::n_samples)
      .def_property_readonly("n_patterns", &PatternTableBuilder::n_patterns)
      .def("expect_samples", &PatternTableBuilder::expect_samples, py::arg("n_total"))
      .def(
          "add_dense",
          [](PatternTableBuilder& b, Dense labels) {
            require_ndim(labels, 2, "labels");
            if (labels.shape(1) != b.n_classes())
              throw std::invalid_argument("labels must have n_classes = " + std::to_string(b.n_classes()) +
                                          " columns, got " + std::to_string(labels.shape(1)));
            const std::uint8_t* data = labels.data();
            const index_t n = labels.shape(0);
            interruptible([&] {
              // Safe: the loop reads only `labels`, which the caller's reference keeps alive.
              py::gil_scoped_release release;
              b.add_dense(data, n);
            });
          },
          py::arg("labels").noconvert())
      .def(
          "add_packed",
          [](PatternTableBuilder& b, Words words) {
            require_ndim(words, 2, "words");
            if (words.shape(1) != words_for(b.n_classes()))
              throw std::invalid_argument("words must have ceil(n_classes / 64) = " +
                                          std::to_string(words_for(b.n_classes())) + " words per row, got " +
                                          std::to_string(words.shape(1)));
            const std::uint64_t* data = words.data();
            const index_t n = words.shape(0);
            interruptible([&] {
              py::gil_scoped_release release;  // reads only `words`
              b.add_packed(data, n);
            });
          },
          py::arg("words").noconvert())
      .def(
          "add_lists",
          [](PatternTableBuilder& b, Index indptr, Index indices) {
            require_ndim(indptr, 1, "indptr");
            require_ndim(indices, 1, "indices");
            if (indptr.shape(0) < 1) throw std::invalid_argument("indptr must have at least one entry");
            const index_t* p = indptr.data();
            const index_t* ix = indices.data();
            const index_t n = indptr.shape(0) - 1, nnz = indices.shape(0);
            interruptible([&] {
              py::gil_scoped_release release;  // reads only the two arrays
              b.add_lists(p, n, ix, nnz);
            });
          },
          py::arg("indptr").noconvert(), py::arg("indices").noconvert())
      .def(
          "add_table",
          [](PatternTableBuilder& b, const PatternTable& t) {
            interruptible([&] {
              py::gil_scoped_release release;  // `t` is held by the caller
              b.add_table(t);
            });
          },
          py::arg("table"))
      .def("finish", &PatternTableBuilder::finish);

  m.def(
      "merge_tables",
      [](const std::vector<const PatternTable*>& tables, int n_threads) {
        return interruptible([&] {
          py::gil_scoped_release release;  // the tables are held by the caller's list
          return merge_tables(tables, n_threads, python_signals());
        });
      },
      py::arg("tables"), py::arg("n_threads") = 0);
}

}  // namespace cobalance::bindings
