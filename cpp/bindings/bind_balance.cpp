#include "pybind.hpp"

#include "cobalance/adam.hpp"
#include "cobalance/balance_problem.hpp"
#include "cobalance/exact_solver.hpp"
#include "cobalance/projected_gradient.hpp"

#include <optional>

namespace cobalance::bindings {

namespace {

// forcecast: integer counts and the like are converted (a copy) to float64 / int64;
// float64 / int64 C-contiguous arrays are used in place.
using Doubles = py::array_t<double, py::array::c_style | py::array::forcecast>;
using Indices = py::array_t<index_t, py::array::c_style | py::array::forcecast>;

std::vector<double> vector_of(const Doubles& a, const char* name) {
  require_ndim(a, 1, name);
  return std::vector<double>(a.data(), a.data() + a.size());
}

std::vector<index_t> vector_of(const Indices& a, const char* name) {
  require_ndim(a, 1, name);
  return std::vector<index_t>(a.data(), a.data() + a.size());
}

// A 1-D float64 view of `a` of the problem's length (checked in C++ too).
const double* pattern_vector(const Doubles& a, const BalanceProblem& problem, const char* name) {
  require_ndim(a, 1, name);
  if (a.shape(0) != problem.n_patterns())
    throw std::invalid_argument(std::string(name) + " must have n_patterns = " +
                                std::to_string(problem.n_patterns()) + " entries, got " + std::to_string(a.shape(0)));
  return a.data();
}

// A 1-D float64 array that takes over `v` (no copy).
py::array_t<double> array_1d(std::vector<double>&& v) {
  const auto n = static_cast<py::ssize_t>(v.size());
  return array_from(std::move(v), {n});
}

// An iterative solver's result (AdamResult, GradientResult) as the dict Python reads:
// alpha, history, n_iter, converged.
template <class Run>
py::dict run_dict(Run&& result) {
  py::dict out;
  out["alpha"] = array_1d(std::move(result.alpha));
  out["history"] = array_1d(std::move(result.history));
  out["n_iter"] = result.n_iter;
  out["converged"] = result.converged;
  return out;
}

// Runs a solver without the GIL: safe because it works on copies made beforehand and on
// the problem, which the caller keeps alive. The solver polls Python's signal handlers
// (its options' interrupt is python_signals()), so Ctrl-C stops it.
template <class Solve>
auto without_gil(Solve&& solve) {
  return interruptible([&] {
    py::gil_scoped_release release;
    return solve();
  });
}

// The objective and regularizer named by a caller (ValueError listing the valid names).
struct LossKind {
  Objective objective;
  Regularizer regularizer;
};

LossKind loss_kind(const std::string& objective, const std::string& regularizer) {
  return {objective_from_name(objective), regularizer_from_name(regularizer)};
}

// The loss at `alpha` and, where `grad` is not null, its gradient (K entries) into grad.
double loss_at(const BalanceProblem& p, const Doubles& alpha, const std::string& objective,
               const std::string& regularizer, double gamma, double* grad, int n_threads) {
  const LossKind kind = loss_kind(objective, regularizer);
  const double* a = pattern_vector(alpha, p, "alpha");
  py::gil_scoped_release release;  // pure C++ over `alpha` (kept alive by the caller), the problem and `grad`
  return grad == nullptr ? p.loss(a, kind.objective, kind.regularizer, gamma, n_threads)
                         : p.loss_and_gradient(a, kind.objective, kind.regularizer, gamma, grad, n_threads);
}

}  // namespace

void bind_balance(py::module_& m) {
  py::class_<BalanceProblem>(m, "BalanceProblem", R"doc(
The balancing problem: sparse patterns (CSR), their counts, a target and class weights.

Copies indptr, indices, counts, target and class_weights (O(nnz + K + C)); raises
ValueError naming the argument and value for malformed input. See balance_problem.hpp
for the objectives and regularizers.
)doc")
      .def(py::init([](Indices indptr, Indices indices, Doubles counts, index_t n_classes, Doubles target,
                       py::object class_weights) {
             std::vector<double> weights;
             if (!class_weights.is_none()) weights = vector_of(class_weights.cast<Doubles>(), "class_weights");
             return BalanceProblem(vector_of(indptr, "indptr"), vector_of(indices, "indices"),
                                   vector_of(counts, "counts"), n_classes, vector_of(target, "target"),
                                   std::move(weights));
           }),
           py::arg("indptr"), py::arg("indices"), py::arg("counts"), py::arg("n_classes"), py::arg("target"),
           py::arg("class_weights") = py::none())
      .def_property_readonly("n_patterns", &BalanceProblem::n_patterns)
      .def_property_readonly("n_classes", &BalanceProblem::n_classes)
      .def_property_readonly("nnz", &BalanceProblem::nnz)
      .def_property_readonly("n_samples", &BalanceProblem::n_samples)
      .def_property_readonly("n_blocks", &BalanceProblem::n_blocks)
      .def(
          "marginals",
          [](const BalanceProblem& p, Doubles alpha, int n_threads) {
            const double* a = pattern_vector(alpha, p, "alpha");
            std::vector<double> out(static_cast<std::size_t>(p.n_classes()));
            {
              // Safe: reads `alpha` (kept alive by the caller) and the problem only.
              py::gil_scoped_release release;
              p.marginals(a, out.data(), n_threads);
            }
            return array_1d(std::move(out));
          },
          py::arg("alpha"), py::arg("n_threads") = 0, "Achieved class fractions f(alpha) = U^T alpha / sum(alpha).")
      .def(
          "loss",
          [](const BalanceProblem& p, Doubles alpha, const std::string& objective, const std::string& regularizer,
             double gamma, int n_threads) { return loss_at(p, alpha, objective, regularizer, gamma, nullptr, n_threads); },
          py::arg("alpha"), py::arg("objective"), py::arg("regularizer"), py::arg("gamma"), py::arg("n_threads") = 0,
          "objective(alpha) + gamma * regularizer(alpha).")
      .def(
          "loss_and_gradient",
          [](const BalanceProblem& p, Doubles alpha, const std::string& objective, const std::string& regularizer,
             double gamma, int n_threads) {
            std::vector<double> grad(static_cast<std::size_t>(p.n_patterns()));
            const double value = loss_at(p, alpha, objective, regularizer, gamma, grad.data(), n_threads);
            return py::make_tuple(value, array_1d(std::move(grad)));
          },
          py::arg("alpha"), py::arg("objective"), py::arg("regularizer"), py::arg("gamma"), py::arg("n_threads") = 0,
          "(loss, d loss / d alpha).");

  m.def(
      "adam",
      [](const BalanceProblem& problem, Doubles alpha0, Doubles lower, Doubles upper, const std::string& objective,
         const std::string& regularizer, double gamma, double lr, double beta1, double beta2, double eps,
         index_t max_iter, double tol, int n_threads, std::optional<double> total) {
        const LossKind kind = loss_kind(objective, regularizer);
        AdamOptions options;
        options.lr = lr;
        options.beta1 = beta1;
        options.beta2 = beta2;
        options.eps = eps;
        options.max_iter = max_iter;
        options.tol = tol;
        options.n_threads = n_threads;
        options.total = total;
        options.interrupt = python_signals();
        auto a0 = vector_of(alpha0, "alpha0");
        const auto lo = vector_of(lower, "lower"), hi = vector_of(upper, "upper");
        AdamResult result = without_gil(
            [&] { return adam(problem, std::move(a0), lo, hi, kind.objective, kind.regularizer, gamma, options); });
        return run_dict(std::move(result));
      },
      py::arg("problem"), py::arg("alpha0"), py::arg("lower"), py::arg("upper"), py::arg("objective"),
      py::arg("regularizer"), py::arg("gamma"), py::arg("lr"), py::arg("beta1") = 0.9, py::arg("beta2") = 0.999,
      py::arg("eps") = 1e-8, py::arg("max_iter") = 1000, py::arg("tol") = 0.0, py::arg("n_threads") = 0,
      py::arg("total") = py::none(),
      R"doc(
Adam (torch.optim.Adam's update) with alpha clamped to [lower, upper] after each step,
or, with ``total``, projected onto {lower <= alpha <= upper, sum(alpha) = total}
(for a fixed balanced size).

alpha0, lower and upper are copied. ``total`` (None: no fixed total) must be finite and
in [sum(lower), sum(upper)]; with it, alpha0 need not be feasible: it is projected
(Euclidean) onto the feasible set before the first step, so scale it to sum ``total``
first to keep its proportions where the bounds allow. The projection after each step is
the exact solver's box-constrained simplex projection in Adam's metric
diag(sqrt(v_hat) + eps), whose fixed points satisfy the KKT conditions (adam.hpp).

Returns dict(alpha, history, n_iter, converged): history[0] is the loss at (projected)
alpha0 and history[t] the loss after step t; the run stops (converged=True) when
|L_{t-1} - L_t| <= tol * max(|L_{t-1}|, DBL_MIN); tol <= 0 runs max_iter steps. Raises
ValueError for invalid arguments (named in the message).
)doc");

  m.def(
      "projected_gradient",
      [](const BalanceProblem& problem, Doubles alpha0, Doubles lower, Doubles upper, const std::string& objective,
         const std::string& regularizer, double gamma, double total, index_t max_iter, double tol, int n_threads) {
        const LossKind kind = loss_kind(objective, regularizer);
        GradientOptions options;
        options.max_iter = max_iter;
        options.tol = tol;
        options.n_threads = n_threads;
        options.interrupt = python_signals();
        auto a0 = vector_of(alpha0, "alpha0");
        const auto lo = vector_of(lower, "lower"), hi = vector_of(upper, "upper");
        GradientResult result = without_gil([&] {
          return projected_gradient(problem, std::move(a0), lo, hi, kind.objective, kind.regularizer, gamma, total,
                                    options);
        });
        return run_dict(std::move(result));
      },
      py::arg("problem"), py::arg("alpha0"), py::arg("lower"), py::arg("upper"), py::arg("objective"),
      py::arg("regularizer"), py::arg("gamma"), py::arg("total"), py::arg("max_iter") = 5000, py::arg("tol") = 1e-9,
      py::arg("n_threads") = 0,
      R"doc(
Projected gradient descent with Barzilai-Borwein steps and Armijo backtracking on
{lower <= alpha <= upper, sum(alpha) = total}, for any objective and regularizer
(projected_gradient.hpp). alpha0 is copied and projected onto the set first. Returns
dict(alpha, history, n_iter, converged). Raises ValueError for invalid arguments or a
loss undefined at the start.
)doc");

  m.def(
      "solve_exact",
      [](const BalanceProblem& problem, const std::string& objective, const std::string& regularizer, double gamma,
         double total, Doubles lower, Doubles upper, index_t max_iter, double tol, int n_threads) {
        const LossKind kind = loss_kind(objective, regularizer);
        ExactOptions options;
        options.max_iter = max_iter;
        options.tol = tol;
        options.n_threads = n_threads;
        options.interrupt = python_signals();
        const auto lo = vector_of(lower, "lower"), hi = vector_of(upper, "upper");
        ExactResult result = without_gil(
            [&] { return solve_exact(problem, kind.objective, kind.regularizer, gamma, total, lo, hi, options); });
        py::dict out;
        out["alpha"] = array_1d(std::move(result.alpha));
        out["p"] = array_1d(std::move(result.p));
        out["loss"] = result.loss;
        out["kkt_residual"] = result.kkt_residual;
        out["n_iter"] = result.n_iter;
        out["converged"] = result.converged;
        out["marginals"] = array_1d(std::move(result.marginals));
        out["max_abs_error"] = result.max_abs_error;
        return out;
      },
      py::arg("problem"), py::arg("objective"), py::arg("regularizer"), py::arg("gamma"), py::arg("total"),
      py::arg("lower"), py::arg("upper"), py::arg("max_iter") = 100000, py::arg("tol") = 1e-10,
      py::arg("n_threads") = 0,
      R"doc(
The global optimum of the convex problem (objective 'fraction' or 'fraction_l2') for
sum(alpha) = total and lower <= alpha <= upper. See exact_solver.hpp for the method and
the KKT residual. Returns dict(alpha, p, loss, kkt_residual, n_iter, converged,
marginals, max_abs_error). Raises ValueError for 'geo', infeasible bounds or invalid
arguments.
)doc");
}

}  // namespace cobalance::bindings
