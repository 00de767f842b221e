"""What a resampling plan did to the class presence of a dataset.

Besides presence shares, a :class:`Report` carries the multi-label imbalance measures of
Charte et al. (IRLbl, MeanIR, MaxIR, CVIR: "Addressing imbalance in multilabel
classification: measures and random resampling algorithms", Neurocomputing 2015;
SCUMBLE: "Concurrence among imbalanced labels and its influence on multilabel
resampling algorithms", HAIS 2014), before and after the plan, computed by
:func:`imbalance_measures`.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from ._atomic import atomic_path
from .plan import sum_by_group

__all__ = ["Report", "imbalance_measures"]


def _kish(weight_sum: np.ndarray, weight_sq_sum: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(weight_sq_sum > 0, weight_sum.astype(np.float64) ** 2 / weight_sq_sum, 0.0)


def _l2_distance(presence: np.ndarray, target: np.ndarray) -> float:
    return float(np.linalg.norm(presence - target))


def _max_abs_distance(presence: np.ndarray, target: np.ndarray) -> float:
    return float(np.max(np.abs(presence - target))) if target.size else 0.0


def _irlbl(counts: np.ndarray) -> np.ndarray:
    """Imbalance ratio per label, ``max(counts) / counts``; NaN where the count is 0."""
    irlbl = np.full(counts.shape, np.nan)
    present = counts > 0
    if present.any():
        irlbl[present] = counts.max() / counts[present].astype(np.float64)
    return irlbl


def _ir_summary(irlbl: np.ndarray) -> dict:
    """MeanIR, MaxIR and CVIR over the finite (present) entries of ``irlbl``."""
    ir = irlbl[np.isfinite(irlbl)]
    if ir.size == 0:
        return {"mean_ir": float("nan"), "max_ir": float("nan"), "cvir": float("nan")}
    mean_ir = float(ir.mean())
    # Charte et al. use the sample standard deviation (divisor |L| - 1), undefined for one label
    cvir = float(ir.std(ddof=1) / mean_ir) if ir.size > 1 else float("nan")
    return {"mean_ir": mean_ir, "max_ir": float(ir.max()), "cvir": cvir}


def imbalance_measures(counts, pattern_indptr, pattern_indices, pattern_weights) -> dict:
    """Multi-label imbalance measures of Charte et al. for a weighted set of patterns.

    A data set is given as its distinct label sets (patterns, in CSR form) and how many
    samples carry each: ``table.counts`` for the original data, or the per-pattern sums
    of a plan's copies for the balanced data.

    Parameters
    ----------
    counts : array-like of int, shape (C,)
        Samples containing each label, ``sum`` of ``pattern_weights`` over the patterns
        holding it.
    pattern_indptr : array-like of int, shape (K + 1,)
    pattern_indices : array-like of int, shape (nnz,)
        The label ids of pattern ``k`` are ``pattern_indices[pattern_indptr[k]:pattern_indptr[k + 1]]``,
        as :meth:`PatternTable.sparse_patterns` gives them.
    pattern_weights : array-like of non-negative numbers, shape (K,)
        Samples carrying each pattern.

    Returns
    -------
    dict
        ``irlbl`` : ndarray of float64, shape (C,)
            ``max(counts) / counts[l]``; NaN for a label with count 0 (absent).
        ``mean_ir`` : float
            Mean of ``irlbl`` over the present labels (count > 0). Applied to the data
            after a plan, these are the labels present before that are still present.
        ``max_ir`` : float
            Largest ``irlbl`` (that of the rarest present label).
        ``cvir`` : float
            ``std(irlbl, ddof=1) / mean_ir`` over the present labels: the sample standard
            deviation (divisor ``n - 1``) as in Charte et al.; NaN with fewer than two.
        ``scumble`` : float
            Weighted mean over samples of ``1 - geomean(irlbl[Y_i]) / mean(irlbl[Y_i])``
            over each sample's labels ``Y_i``; a sample without labels counts as 0. NaN
            when the weights sum to 0.
        With no present label, ``mean_ir``, ``max_ir`` and ``cvir`` are NaN.

    Raises
    ------
    ValueError
        Shapes that do not match, a label id outside ``[0, C)``, a negative weight, or a
        pattern with weight > 0 holding a label whose count is 0.
    """
    counts = np.asarray(counts)
    indptr = np.asarray(pattern_indptr, dtype=np.int64)
    indices = np.asarray(pattern_indices, dtype=np.int64)
    weights = np.asarray(pattern_weights, dtype=np.float64)
    if counts.ndim != 1:
        raise ValueError(f"counts must be one-dimensional, got shape {counts.shape}")
    if np.any(counts < 0):
        raise ValueError(f"counts must be non-negative, got {counts.min()}")
    k = weights.shape[0] if weights.ndim == 1 else -1
    if k < 0 or indptr.shape != (k + 1,):
        raise ValueError(f"pattern_weights must have shape (K,) and pattern_indptr (K + 1,), got "
                         f"{weights.shape} and {indptr.shape}")
    if indptr[0] != 0 or indptr[-1] != indices.size or np.any(np.diff(indptr) < 0):
        raise ValueError(f"pattern_indptr must rise from 0 to len(pattern_indices) = {indices.size}")
    if indices.size and (indices.min() < 0 or indices.max() >= counts.size):
        bad = indices[(indices < 0) | (indices >= counts.size)][0]
        raise ValueError(f"pattern_indices holds label {bad}, outside [0, {counts.size})")
    if np.any(weights < 0):
        raise ValueError(f"pattern_weights must be non-negative, got {weights.min()}")

    irlbl = _irlbl(counts)
    out = {"irlbl": irlbl, **_ir_summary(irlbl)}

    total = weights.sum()
    if total == 0:
        out["scumble"] = float("nan")
        return out
    sizes = np.diff(indptr)
    rows = np.repeat(np.arange(k, dtype=np.int64), sizes)
    # patterns nobody carries may hold absent labels (NaN IRLbl): leave them out, as 0 * NaN is NaN
    used = (weights > 0)[rows]
    ir = irlbl[indices[used]]
    if not np.all(np.isfinite(ir)):
        label = indices[used][~np.isfinite(ir)][0]
        raise ValueError(f"label {label} has count 0 but a pattern with weight > 0 holds it")
    log_sum = np.bincount(rows[used], weights=np.log(ir), minlength=k)
    lin_sum = np.bincount(rows[used], weights=ir, minlength=k)
    scumble = np.zeros(k)
    has = (weights > 0) & (sizes > 0)
    n = sizes[has].astype(np.float64)
    # geomean <= mean, so rounding is the only way below 0 (single-label patterns)
    scumble[has] = np.maximum(1.0 - np.exp(log_sum[has] / n) / (lin_sum[has] / n), 0.0)
    out["scumble"] = float(weights @ scumble / total)
    return out


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
    count_before, count_after : ndarray of int64, shape (C,), or None
        Samples containing each class in the original data and in the balanced set
        (copies counted); None when not available (a Report built by hand without them).
    scumble_before, scumble_after : float or None
        SCUMBLE (Charte et al. 2014) of the original data and of the balanced set, from
        :func:`imbalance_measures`; None when not available.
    irlbl_before, irlbl_after : ndarray of float64, shape (C,), or None
        Imbalance ratio per label, ``max(count) / count``, from ``count_before`` and
        ``count_after``; NaN for a class absent from that data.
    mean_ir_before, mean_ir_after, max_ir_before, max_ir_after : float or None
        Mean and largest IRLbl over the classes present in that data. After a plan those
        are the classes present before that are still present (see ``labels_lost``).
    cvir_before, cvir_after : float or None
        ``std(irlbl, ddof=1) / mean_ir`` over the present classes: the sample standard
        deviation as in Charte et al. (2015); NaN with fewer than two present classes.
    labels_lost : list of str or None
        Names of the classes present before (count > 0) and absent after (count 0).
    n_labels_lost : int or None
    """

    def __init__(self, *, class_names, before, target, after, n_samples, n_samples_out, n_duplicates,
                 n_dropped, max_copies, effective_size, class_effective_size, extra=None,
                 count_before=None, count_after=None, scumble_before=None, scumble_after=None):
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
        self.count_before = _optional_counts(count_before, len(self.class_names), "count_before")
        self.count_after = _optional_counts(count_after, len(self.class_names), "count_after")
        self.scumble_before = None if scumble_before is None else float(scumble_before)
        self.scumble_after = None if scumble_after is None else float(scumble_after)

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
        count_before = np.asarray(table.class_counts(), dtype=np.int64)
        measures_before = imbalance_measures(count_before, indptr, indices, table.counts)
        measures_after = imbalance_measures(per_class, indptr, indices, sum_c)
        return cls(
            class_names=class_names if class_names is not None else table.class_names,
            before=table.class_presence(), target=target, after=after,
            n_samples=table.n_samples, n_samples_out=n_out, n_duplicates=plan.n_duplicates,
            n_dropped=plan.n_dropped, max_copies=int(copies.max()) if copies.size else 0,
            effective_size=float(_kish(np.array(n_out), np.array(int((copies * copies).sum())))),
            class_effective_size=_kish(per_class, per_class_sq), extra=extra,
            count_before=count_before, count_after=per_class,
            scumble_before=measures_before["scumble"], scumble_after=measures_after["scumble"])

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

    @property
    def irlbl_before(self) -> Optional[np.ndarray]:
        return None if self.count_before is None else _irlbl(self.count_before)

    @property
    def irlbl_after(self) -> Optional[np.ndarray]:
        return None if self.count_after is None else _irlbl(self.count_after)

    @staticmethod
    def _summary(irlbl: Optional[np.ndarray], key: str) -> Optional[float]:
        return None if irlbl is None else _ir_summary(irlbl)[key]

    @property
    def mean_ir_before(self) -> Optional[float]:
        return self._summary(self.irlbl_before, "mean_ir")

    @property
    def mean_ir_after(self) -> Optional[float]:
        return self._summary(self.irlbl_after, "mean_ir")

    @property
    def max_ir_before(self) -> Optional[float]:
        return self._summary(self.irlbl_before, "max_ir")

    @property
    def max_ir_after(self) -> Optional[float]:
        return self._summary(self.irlbl_after, "max_ir")

    @property
    def cvir_before(self) -> Optional[float]:
        return self._summary(self.irlbl_before, "cvir")

    @property
    def cvir_after(self) -> Optional[float]:
        return self._summary(self.irlbl_after, "cvir")

    @property
    def labels_lost(self) -> Optional[list]:
        if self.count_before is None or self.count_after is None:
            return None
        lost = np.flatnonzero((self.count_before > 0) & (self.count_after == 0))
        return [self.class_names[i] for i in lost]

    @property
    def n_labels_lost(self) -> Optional[int]:
        lost = self.labels_lost
        return None if lost is None else len(lost)

    @property
    def _has_counts(self) -> bool:
        return self.count_before is not None and self.count_after is not None

    def _class_rows(self):
        """(name, before, target, after, effective size) of each class."""
        return zip(self.class_names, self.before, self.target, self.after, self.class_effective_size)

    def _figure_size(self):
        return (max(4.0, 0.6 * len(self.class_names) + 2), 3.5)

    # -- output ----------------------------------------------------------------------

    def to_dict(self) -> dict:
        """Plain Python types only (``json.dumps`` works on it).

        The imbalance measures are None where not available or undefined (NaN), so the
        result also passes ``json.dumps(..., allow_nan=False)``.
        """
        n = len(self.class_names)
        per_class = {key: _per_class(value, n) for key, value in [
            ("count_before", self.count_before), ("count_after", self.count_after),
            ("irlbl_before", self.irlbl_before), ("irlbl_after", self.irlbl_after)]}
        return {
            "classes": [
                {"name": name, "before": float(b), "target": float(t), "after": float(a),
                 "effective_size": float(e), **{key: values[i] for key, values in per_class.items()}}
                for i, (name, b, t, a, e) in enumerate(self._class_rows())
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
            **{f"{name}_{when}": _finite_or_none(getattr(self, f"{name}_{when}"))
               for name in ("mean_ir", "max_ir", "cvir", "scumble") for when in ("before", "after")},
            "labels_lost": self.labels_lost,
            "n_labels_lost": self.n_labels_lost,
            "extra": _plain(self.extra),
        }

    def to_markdown(self) -> str:
        """A Markdown table of presence (%) and IRLbl per class, then the size, error and
        imbalance figures. Without class counts the IRLbl columns and imbalance lines are left out."""
        counts = self._has_counts
        lines = ["| class | before % | target % | after % | effective size |"
                 + (" IRLbl before | IRLbl after |" if counts else ""),
                 "|---|---:|---:|---:|---:|" + ("---:|---:|" if counts else "")]
        irlbl = zip(self.irlbl_before, self.irlbl_after) if counts else None
        for n, b, t, a, e in self._class_rows():
            row = f"| {n} | {100 * b:.1f} | {100 * t:.1f} | {100 * a:.1f} | {e:.1f} |"
            if irlbl is not None:
                ib, ia = next(irlbl)
                row += f" {_number(ib, '.2f')} | {_number(ia, '.2f')} |"
            lines.append(row)
        lines += [
            "",
            f"- samples: {self.n_samples} -> {self.n_samples_out} "
            f"({self.n_duplicates} duplicates added, {self.n_dropped} dropped, "
            f"at most {self.max_copies} copies of one sample)",
            f"- Kish effective sample size: {self.effective_size:.1f}",
            f"- marginal error vs target: L2 {self.l2_error_before:.4f} -> {self.l2_error:.4f}, "
            f"max abs {self.max_abs_error_before:.4f} -> {self.max_abs_error:.4f}",
        ]
        if counts:
            lines += [
                f"- mean imbalance ratio (MeanIR): {_number(self.mean_ir_before, '.2f')} -> "
                f"{_number(self.mean_ir_after, '.2f')}, "
                f"MaxIR {_number(self.max_ir_before, '.2f')} -> {_number(self.max_ir_after, '.2f')}, "
                f"CVIR {_number(self.cvir_before, '.3f')} -> {_number(self.cvir_after, '.3f')}, "
                f"SCUMBLE {_number(self.scumble_before, '.4f')} -> {_number(self.scumble_after, '.4f')}",
                f"- labels lost: {_lost_text(self.labels_lost)}",
            ]
        return "\n".join(lines) + "\n"

    def __repr__(self) -> str:
        return (f"Report(n_samples={self.n_samples}, n_samples_out={self.n_samples_out}, "
                f"max_abs_error={self.max_abs_error:.4g})")

    def plot(self, ax=None):
        """Bar charts of the plan's effect per class; returns the matplotlib Axes of presence.

        With ``ax=None`` a new figure gets two rows: presence before / target / after (%)
        and, when class counts are available, IRLbl before / after on a log scale; the
        presence Axes is returned. With ``ax`` given only presence is drawn there, and
        MeanIR before -> after goes in its title.

        Raises
        ------
        ImportError
            matplotlib is not installed (``pip install cobalance[plot]``).
        """
        try:
            import matplotlib.pyplot as plt
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError("Report.plot needs matplotlib: pip install 'cobalance[plot]'") from err
        if ax is not None:
            self._plot_presence(ax)
            if self._has_counts:
                ax.set_title(f"MeanIR {_number(self.mean_ir_before, '.2f')} -> {_number(self.mean_ir_after, '.2f')}")
            return ax
        if not self._has_counts:
            _, ax = plt.subplots(figsize=self._figure_size())
            self._plot_presence(ax)
            return ax
        width, height = self._figure_size()
        _, (ax, ax_ir) = plt.subplots(2, 1, figsize=(width, 2 * height))
        self._plot_presence(ax)
        self._plot_irlbl(ax_ir)
        return ax

    def _set_class_ticks(self, ax, x) -> None:
        ax.set_xticks(x)
        ax.set_xticklabels(self.class_names, rotation=45 if len(x) > 8 else 0, ha="right" if len(x) > 8 else "center")

    def _plot_presence(self, ax) -> None:
        x = np.arange(len(self.class_names))
        width = 0.27
        ax.bar(x - width, 100 * self.before, width, label="before")
        ax.bar(x, 100 * self.target, width, label="target")
        ax.bar(x + width, 100 * self.after, width, label="after")
        self._set_class_ticks(ax, x)
        ax.set_ylabel("samples containing the class (%)")
        # the bars' own range (small presences stay readable), at most 0-105 %
        top = max(float(np.max(np.r_[self.before, self.target, self.after], initial=0.0)), 0.01)
        ax.set_ylim(0, min(105.0, 115.0 * top))
        ax.legend()

    def _plot_irlbl(self, ax) -> None:
        x = np.arange(len(self.class_names))
        width = 0.4
        before, after = self.irlbl_before, self.irlbl_after
        # bars rise from below 1 (the smallest IRLbl), which a log axis cannot start at 0;
        # absent classes (NaN) get an empty bar
        base = 0.5
        for offset, irlbl, when, mean_ir in [(-width / 2, before, "before", self.mean_ir_before),
                                             (width / 2, after, "after", self.mean_ir_after)]:
            ax.bar(x + offset, np.where(np.isfinite(irlbl), irlbl - base, 0.0), width, bottom=base,
                   label=f"{when} (MeanIR {_number(mean_ir, '.2f')})")
        ax.set_yscale("log")
        for i in np.flatnonzero(np.isnan(after) & np.isfinite(before)):
            ax.text(x[i] + width / 2, 1.0, "lost", ha="center", va="bottom", rotation=90, fontsize=8)
        self._set_class_ticks(ax, x)
        ax.set_ylabel("IRLbl (max count / count)")
        ax.legend()

    def save_png(self, path, *, dpi: int = 120) -> None:
        """Write the figure of :meth:`plot` (both rows) to a PNG file atomically
        (temporary name, then rename)."""
        try:
            from matplotlib.figure import Figure
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError("Report.save_png needs matplotlib: pip install 'cobalance[plot]'") from err

        # a bare Figure renders with Agg and leaves pyplot's global state alone
        width, height = self._figure_size()
        if self._has_counts:
            fig = Figure(figsize=(width, 2 * height))
            ax, ax_ir = fig.subplots(2, 1)
            self._plot_presence(ax)
            self._plot_irlbl(ax_ir)
        else:
            fig = Figure(figsize=(width, height))
            self._plot_presence(fig.subplots())
        fig.tight_layout()
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, format="png", dpi=dpi)


def _optional_counts(counts, n_classes: int, name: str) -> Optional[np.ndarray]:
    if counts is None:
        return None
    counts = np.asarray(counts, dtype=np.int64)
    if counts.shape != (n_classes,):
        raise ValueError(f"{name} must have shape ({n_classes},), got {counts.shape}")
    return counts


def _finite_or_none(value) -> Optional[float]:
    return None if value is None or not np.isfinite(value) else float(value)


def _per_class(values: Optional[np.ndarray], n: int) -> list:
    """JSON-safe per-class list: ints stay ints, NaN and missing become None."""
    if values is None:
        return [None] * n
    if np.issubdtype(values.dtype, np.integer):
        return [int(v) for v in values]
    return [_finite_or_none(v) for v in values]


def _number(value, spec: str) -> str:
    return "n/a" if value is None or not np.isfinite(value) else format(value, spec)


def _lost_text(names: list, shown: int = 10) -> str:
    if not names:
        return "0"
    listed = ", ".join(names[:shown]) + (", ..." if len(names) > shown else "")
    return f"{len(names)} ({listed})"


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
