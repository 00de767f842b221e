"""What a resampling plan did to the class presence of a dataset."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from ._atomic import atomic_path
from .plan import sum_by_group

__all__ = ["Report"]


def _kish(weight_sum: np.ndarray, weight_sq_sum: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(weight_sq_sum > 0, weight_sum.astype(np.float64) ** 2 / weight_sq_sum, 0.0)


def _l2_distance(presence: np.ndarray, target: np.ndarray) -> float:
    return float(np.linalg.norm(presence - target))


def _max_abs_distance(presence: np.ndarray, target: np.ndarray) -> float:
    return float(np.max(np.abs(presence - target))) if target.size else 0.0


class Report:
    """Per-class presence before / target / after a plan, and the plan's cost.

    Build it with :meth:`from_plan`. Fractions are shares of samples containing the
    class (the method's Table 1), before (original data) and after (balanced data).

    Attributes
    ----------
    class_names : list of str
    before, target, after : ndarray of float64, shape (C,)
    n_samples, n_samples_out : int
        Size before and after.
    n_duplicates : int
        Entries beyond each sample's first copy, ``sum(max(copies - 1, 0))``.
    n_dropped : int
        Samples with no copy.
    max_copies : int
        Most copies of one sample.
    effective_size : float
        Kish effective sample size of the balanced set, ``(sum c)^2 / sum c^2`` over
        the per-sample copies ``c``: N' when every sample is used once, lower the more
        the set relies on repeating a few samples.
    class_effective_size : ndarray of float64, shape (C,)
        The same over the samples that contain each class.
    l2_error, max_abs_error : float
        ``||after - target||_2`` and ``max |after - target|``.
    l2_error_before, max_abs_error_before : float
        The same for the original data.
    """

    def __init__(self, *, class_names, before, target, after, n_samples, n_samples_out, n_duplicates,
                 n_dropped, max_copies, effective_size, class_effective_size, extra=None):
        self.class_names = [str(n) for n in class_names]
        self.before = np.asarray(before, dtype=np.float64)
        self.target = np.asarray(target, dtype=np.float64)
        self.after = np.asarray(after, dtype=np.float64)
        self.n_samples = int(n_samples)
        self.n_samples_out = int(n_samples_out)
        self.n_duplicates = int(n_duplicates)
        self.n_dropped = int(n_dropped)
        self.max_copies = int(max_copies)
        self.effective_size = float(effective_size)
        self.class_effective_size = np.asarray(class_effective_size, dtype=np.float64)
        self.extra = dict(extra or {})

    @classmethod
    def from_plan(cls, table, plan, target, *, class_names: Optional[Sequence[str]] = None,
                  extra: Optional[dict] = None) -> "Report":
        """Summarise ``plan`` applied to the samples of ``table`` against ``target``.

        Parameters
        ----------
        table : PatternTable
            The original data, with its sample -> pattern index (``keep_inverse=True``).
        plan : Plan
        target : array-like, shape (C,)
        class_names : sequence of str, optional
            Default ``table.class_names``.
        extra : dict, optional
            JSON-serialisable facts to carry along (e.g. the optimiser's loss).

        Raises
        ------
        ValueError
            Sizes that do not match.
        """
        target = np.asarray(target, dtype=np.float64)
        if target.shape != (table.n_classes,):
            raise ValueError(f"target must have shape ({table.n_classes},), got {target.shape}")
        if plan.n_samples != table.n_samples:
            raise ValueError(f"plan has {plan.n_samples} samples but the table has {table.n_samples}")
        if not table.has_inverse:
            raise ValueError("table must keep its sample -> pattern index (built with keep_inverse=True)")
        copies = plan.copies
        inverse = np.asarray(table.inverse)
        k = table.n_patterns
        # per-pattern sums of c and c^2, exact in int64, then per class via the sparse patterns
        sum_c = sum_by_group(inverse, copies, k)
        sum_c2 = sum_by_group(inverse, copies * copies, k)
        indptr, indices = table.sparse_patterns()
        rows = np.repeat(np.arange(k, dtype=np.int64), np.diff(np.asarray(indptr)))
        indices = np.asarray(indices, dtype=np.int64)
        per_class = sum_by_group(indices, sum_c[rows], table.n_classes)
        per_class_sq = sum_by_group(indices, sum_c2[rows], table.n_classes)
        n_out = int(copies.sum())
        after = per_class / n_out if n_out else np.zeros(table.n_classes)
        return cls(
            class_names=class_names if class_names is not None else table.class_names,
            before=table.class_presence(), target=target, after=after,
            n_samples=table.n_samples, n_samples_out=n_out, n_duplicates=plan.n_duplicates,
            n_dropped=plan.n_dropped, max_copies=int(copies.max()) if copies.size else 0,
            effective_size=float(_kish(np.array(n_out), np.array(int((copies * copies).sum())))),
            class_effective_size=_kish(per_class, per_class_sq), extra=extra)

    # -- derived figures -------------------------------------------------------------

    @property
    def l2_error(self) -> float:
        return _l2_distance(self.after, self.target)

    @property
    def max_abs_error(self) -> float:
        return _max_abs_distance(self.after, self.target)

    @property
    def l2_error_before(self) -> float:
        return _l2_distance(self.before, self.target)

    @property
    def max_abs_error_before(self) -> float:
        return _max_abs_distance(self.before, self.target)

    def _class_rows(self):
        """(name, before, target, after, effective size) of each class."""
        return zip(self.class_names, self.before, self.target, self.after, self.class_effective_size)

    def _figure_size(self):
        return (max(4.0, 0.6 * len(self.class_names) + 2), 3.5)

    # -- output ----------------------------------------------------------------------

    def to_dict(self) -> dict:
        """Plain Python types only (``json.dumps`` works on it)."""
        return {
            "classes": [
                {"name": n, "before": float(b), "target": float(t), "after": float(a),
                 "effective_size": float(e)}
                for n, b, t, a, e in self._class_rows()
            ],
            "n_samples": self.n_samples,
            "n_samples_out": self.n_samples_out,
            "n_duplicates": self.n_duplicates,
            "n_dropped": self.n_dropped,
            "max_copies": self.max_copies,
            "effective_size": self.effective_size,
            "l2_error": self.l2_error,
            "max_abs_error": self.max_abs_error,
            "l2_error_before": self.l2_error_before,
            "max_abs_error_before": self.max_abs_error_before,
            "extra": _plain(self.extra),
        }

    def to_markdown(self) -> str:
        """A Markdown table of presence (%) per class, then the size and error figures."""
        lines = ["| class | before % | target % | after % | effective size |",
                 "|---|---:|---:|---:|---:|"]
        for n, b, t, a, e in self._class_rows():
            lines.append(f"| {n} | {100 * b:.1f} | {100 * t:.1f} | {100 * a:.1f} | {e:.1f} |")
        lines += [
            "",
            f"- samples: {self.n_samples} -> {self.n_samples_out} "
            f"({self.n_duplicates} duplicates added, {self.n_dropped} dropped, "
            f"at most {self.max_copies} copies of one sample)",
            f"- Kish effective sample size: {self.effective_size:.1f}",
            f"- marginal error vs target: L2 {self.l2_error_before:.4f} -> {self.l2_error:.4f}, "
            f"max abs {self.max_abs_error_before:.4f} -> {self.max_abs_error:.4f}",
        ]
        return "\n".join(lines) + "\n"

    def __repr__(self) -> str:
        return (f"Report(n_samples={self.n_samples}, n_samples_out={self.n_samples_out}, "
                f"max_abs_error={self.max_abs_error:.4g})")

    def plot(self, ax=None):
        """Bar chart of before / target / after per class; returns the matplotlib Axes.

        Raises
        ------
        ImportError
            matplotlib is not installed (``pip install cobalance[plot]``).
        """
        try:
            import matplotlib.pyplot as plt
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError("Report.plot needs matplotlib: pip install 'cobalance[plot]'") from err
        if ax is None:
            _, ax = plt.subplots(figsize=self._figure_size())
        x = np.arange(len(self.class_names))
        width = 0.27
        ax.bar(x - width, 100 * self.before, width, label="before")
        ax.bar(x, 100 * self.target, width, label="target")
        ax.bar(x + width, 100 * self.after, width, label="after")
        ax.set_xticks(x)
        ax.set_xticklabels(self.class_names, rotation=45 if len(x) > 8 else 0, ha="right" if len(x) > 8 else "center")
        ax.set_ylabel("samples containing the class (%)")
        ax.set_ylim(0, 105)
        ax.legend()
        return ax

    def save_png(self, path, *, dpi: int = 120) -> None:
        """Write :meth:`plot` to a PNG file atomically (temporary name, then rename)."""
        try:
            from matplotlib.figure import Figure
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError("Report.save_png needs matplotlib: pip install 'cobalance[plot]'") from err

        # a bare Figure renders with Agg and leaves pyplot's global state alone
        fig = Figure(figsize=self._figure_size())
        self.plot(fig.subplots())
        fig.tight_layout()
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, format="png", dpi=dpi)


def _plain(value):
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value
