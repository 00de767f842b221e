"""The study's tables and figures: Table 1 (class presence, size, duplicates and
effective size per arm), Table 2 (test Dice per class and vDice per arm, as the best
epoch and as the mean of the last three epochs), the paired differences of every arm
against ``unbalanced`` with sign and Wilcoxon signed-rank tests, and the Dice curves of
every class; as markdown, CSV, JSON and PNG.

Everything is computed from the per-(arm, fold) result files' content; the presence
figures there come from each plan's :class:`cobalance.Report`.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np

from .._atomic import atomic_path, atomic_write_text
from .config import ARM_TITLES

__all__ = ["table1", "table2", "paired_tests", "table1_markdown", "table2_markdown", "paired_markdown",
           "write_tables", "plot_curves", "sign_test", "wilcoxon_exact", "run_key", "SUMMARIES"]

#: How a run's per-epoch test Dice is summed up: the paper's best epoch (optimistic:
#: the epoch is chosen on the test fold) and the mean of the last three epochs.
SUMMARIES = ("best", "last3")
_SUMMARY_TEXT = {"best": "the maximum over epochs (the paper's; the epoch is picked on the test fold, so "
                         "optimistic)",
                 "last3": "the mean over the last three epochs (no epoch picked on the test fold)"}


def run_value(result: dict, metric, summary: str) -> Optional[float]:
    """One run's test Dice of class index ``metric`` (or ``"vDice"``), summed up by ``summary``."""
    if summary not in SUMMARIES:
        raise ValueError(f"summary must be one of {list(SUMMARIES)}, got {summary!r}")
    if summary == "best":
        return result["best_vdice"] if metric == "vDice" else result["best_dice"][metric]
    values = [h["vdice"] if metric == "vDice" else h["dice"][metric] for h in result["history"][-3:]]
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def sign_test(differences) -> float:
    """Two-sided exact sign test of paired differences (zeros dropped); 1.0 when none is left."""
    d = np.asarray([x for x in differences if x != 0], dtype=np.float64)
    n = d.size
    if n == 0:
        return 1.0
    k = int((d > 0).sum())
    probs = np.array([math.comb(n, i) for i in range(n + 1)], dtype=np.float64) / 2.0 ** n
    p = 2.0 * min(probs[: k + 1].sum(), probs[k:].sum())
    return float(min(1.0, p))


def wilcoxon_exact(differences) -> float:
    """Two-sided exact Wilcoxon signed-rank test of paired differences.

    Zeros are dropped; tied absolute differences get their average rank, and the exact
    null distribution of the positive rank sum is counted over all ``2**n`` sign
    patterns of those ranks. 1.0 when no difference is left.
    """
    d = np.asarray([x for x in differences if x != 0], dtype=np.float64)
    n = d.size
    if n == 0:
        return 1.0
    order = np.argsort(np.abs(d), kind="stable")
    ranks = np.empty(n, dtype=np.float64)
    absd = np.abs(d)[order]
    i = 0
    while i < n:  # average ranks over ties
        j = i
        while j + 1 < n and absd[j + 1] == absd[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    doubled = np.rint(2 * ranks).astype(np.int64)  # half-integers -> integers
    counts = np.zeros(int(doubled.sum()) + 1, dtype=np.float64)
    counts[0] = 1.0
    for r in doubled:  # distribution of the positive rank sum, one rank at a time
        counts[r:] = counts[r:] + counts[:-r]  # the right side is computed before it is stored
    probs = counts / counts.sum()
    observed = int(doubled[d > 0].sum())
    p = 2.0 * min(probs[: observed + 1].sum(), probs[observed:].sum())
    return float(min(1.0, p))


def _mean_std(values: Sequence[Optional[float]]) -> Tuple[Optional[float], Optional[float], int]:
    v = np.array([x for x in values if x is not None], dtype=np.float64)
    if v.size == 0:
        return None, None, 0
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0, int(v.size)


def table1(runs, class_names, share=None, n_tiles=None) -> dict:
    """Share of tiles holding each class: all tiles, then each arm's training set.

    Parameters
    ----------
    runs : dict
        ``{arm: [result of each fold]}``; a result's ``presence`` and ``plan_size`` are
        its plan's ``Report.after`` and ``Report.n_samples_out``.
    class_names : list of str
    share : array-like, shape (C,), optional
        Presence over all the study's tiles; None leaves out the 'all tiles' row.
    n_tiles : int, optional
    """
    rows = []
    if share is not None:
        rows.append({"set": "all tiles", "size": float(n_tiles), "duplicates": None, "dropped": None,
                     "effective_size": None, **{c: float(share[i]) for i, c in enumerate(class_names)}})
    for arm, results in runs.items():
        row = {"set": arm, "size": float(np.mean([r["plan_size"] for r in results])),
               "duplicates": float(np.mean([r["plan_duplicates"] for r in results])),
               "dropped": float(np.mean([r["plan_dropped"] for r in results])),
               "effective_size": float(np.mean([r["plan_effective_size"] for r in results]))}
        for i, c in enumerate(class_names):
            row[c] = float(np.mean([r["presence"][i] for r in results]))
        rows.append(row)
    return {"description": "share of tiles containing each class in the training set of each arm "
                           "(mean over runs, one per fold and seed; 'all tiles' is the whole tiled dataset); "
                           "size: tiles per set; "
                           "duplicates, dropped and Kish effective size of the plan (mean over runs)",
            "classes": list(class_names), "rows": rows}


def table2(runs, class_names, summary: str = "best") -> dict:
    """Per arm and class the test Dice (and vDice) summed up per run by ``summary``
    (:data:`SUMMARIES`): mean and sample std over runs."""
    metrics = list(class_names) + ["vDice"]
    cells = {}
    for arm, results in runs.items():
        cells[arm] = {}
        for i, name in enumerate(metrics):
            values = [run_value(r, "vDice" if name == "vDice" else i, summary) for r in results]
            mean, std, n = _mean_std(values)
            cells[arm][name] = {"mean": mean, "std": std, "n_runs": n, "runs": values}
    return {"description": f"per class the test Dice of each run, taken as {_SUMMARY_TEXT[summary]}; mean and "
                           f"sample std over runs (one per fold and seed)", "summary": summary,
            "metrics": metrics, "arms": list(runs), "cells": cells}


def paired_tests(runs, class_names, summary: str = "best", baseline: str = "unbalanced") -> dict:
    """Each arm against ``baseline``, paired by (seed, fold): the differences of the runs' Dice.

    Per arm and metric: the mean difference, the number of runs where the arm is ahead,
    the number of pairs, and the two-sided exact sign test and Wilcoxon signed-rank
    p-values (:func:`sign_test`, :func:`wilcoxon_exact`). With n pairs neither test
    can go below ``2 / 2**n`` (0.25 for 3 folds, 0.031 for 3 folds x 2 seeds), so few
    runs can show a direction, not significance.
    """
    metrics = list(class_names) + ["vDice"]
    if baseline not in runs:
        return {"description": f"no {baseline!r} arm to pair with", "summary": summary, "baseline": baseline,
                "metrics": metrics, "arms": [], "cells": {}}
    base = {run_key(r): r for r in runs[baseline]}
    cells = {}
    for arm, results in runs.items():
        if arm == baseline:
            continue
        cells[arm] = {}
        for i, name in enumerate(metrics):
            key = "vDice" if name == "vDice" else i
            diffs = []
            for r in results:
                if run_key(r) in base:
                    a, b = run_value(r, key, summary), run_value(base[run_key(r)], key, summary)
                    if a is not None and b is not None:
                        diffs.append(a - b)
            cells[arm][name] = {"mean_difference": float(np.mean(diffs)) if diffs else None,
                                "ahead": int(sum(d > 0 for d in diffs)), "n_pairs": len(diffs),
                                "differences": diffs, "sign_p": sign_test(diffs), "wilcoxon_p": wilcoxon_exact(diffs)}
    return {"description": f"each arm minus {baseline} per run (seed, fold), test Dice taken as {_SUMMARY_TEXT[summary]}: "
                           f"mean difference, runs ahead / pairs, two-sided exact sign test and Wilcoxon "
                           f"signed-rank p-values", "summary": summary, "baseline": baseline,
            "metrics": metrics, "arms": list(cells), "cells": cells}


def run_key(result: dict) -> Tuple[int, int]:
    """What pairs two arms' runs: the seed (0 in files written before seeds were pooled)
    and the fold."""
    return int(result.get("seed", 0)), int(result["fold"])


def _fmt(x: Optional[float], digits: int = 4) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def table1_markdown(t1) -> str:
    classes = t1["classes"]
    lines = ["| set | tiles | duplicates | dropped | effective size | " + " | ".join(classes) + " |",
             "|---|---:|---:|---:|---:|" + "---:|" * len(classes)]
    for row in t1["rows"]:
        extra = " | ".join("" if row.get(k) is None else f"{row[k]:.0f}"
                           for k in ("duplicates", "dropped", "effective_size"))
        lines.append(f"| {row['set']} | {row['size']:.0f} | {extra} | " +
                     " | ".join(f"{100 * row[c]:.1f}%" for c in classes) + " |")
    return "\n".join(lines) + "\n"


def table2_markdown(t2) -> str:
    arms = t2["arms"]
    lines = ["| class | " + " | ".join(ARM_TITLES.get(a, a) for a in arms) + " |", "|---|" + "---:|" * len(arms)]
    for metric in t2["metrics"]:
        means = [t2["cells"][a][metric]["mean"] for a in arms]
        known = [m for m in means if m is not None]
        # Bold the best arm(s), unless every arm has the same mean.
        top = max(known) if known and min(known) != max(known) else None
        cells = []
        for a, m in zip(arms, means):
            s = f"{_fmt(m)} ± {_fmt(t2['cells'][a][metric]['std'])}"
            cells.append(f"**{s}**" if top is not None and m == top else s)
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def paired_markdown(tp) -> str:
    """Rows: arms; columns: metrics; cells ``+0.0123 (2/3, p=0.50/0.50)``: mean
    difference, runs ahead / pairs, sign-test / Wilcoxon p."""
    metrics = tp["metrics"]
    lines = ["| arm − " + tp["baseline"] + " | " + " | ".join(metrics) + " |", "|---|" + "---:|" * len(metrics)]
    for arm in tp["arms"]:
        cells = []
        for m in metrics:
            c = tp["cells"][arm][m]
            if c["mean_difference"] is None:
                cells.append("n/a")
            else:
                cells.append(f"{c['mean_difference']:+.4f} ({c['ahead']}/{c['n_pairs']}, "
                             f"p={c['sign_p']:.2f}/{c['wilcoxon_p']:.2f})")
        lines.append(f"| {ARM_TITLES.get(arm, arm)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _csv_text(header, rows) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def _num(x, fmt=".6f") -> str:
    return "" if x is None else format(x, fmt)


def write_tables(out: Path, t1: dict, t2s: dict, paired: dict, class_names) -> List[Path]:
    """Write the tables into ``out`` (atomically); return their paths.

    ``table1.{md,json,csv}``; for each summary ``s`` in ``t2s`` (``{summary: table2}``)
    ``table2_<s>.{md,json,csv}``; and for each summary in ``paired``
    (``{summary: paired_tests}``) ``paired_<s>.{md,json,csv}``.
    """
    files = []

    def emit(stem, table, markdown, header, rows):
        atomic_write_text(out / f"{stem}.md", f"<!-- {table['description']} -->\n" + markdown)
        atomic_write_text(out / f"{stem}.json", json.dumps(table, indent=1))
        atomic_write_text(out / f"{stem}.csv", _csv_text(header, rows))
        files.extend(out / f"{stem}.{ext}" for ext in ("md", "json", "csv"))

    emit("table1", t1, table1_markdown(t1), ["set", "size", "duplicates", "dropped", "effective_size"] +
         list(class_names),
         [[row["set"], f"{row['size']:.1f}"] + [_num(row.get(k), ".1f") for k in ("duplicates", "dropped",
                                                                                    "effective_size")] +
          [f"{row[c]:.6f}" for c in class_names] for row in t1["rows"]])
    for summary, t2 in t2s.items():
        emit(f"table2_{summary}", t2, table2_markdown(t2),
             ["metric"] + [f"{a}_{s}" for a in t2["arms"] for s in ("mean", "std")],
             [[metric] + [_num(t2["cells"][a][metric][k]) for a in t2["arms"] for k in ("mean", "std")]
              for metric in t2["metrics"]])
    for summary, tp in paired.items():
        emit(f"paired_{summary}", tp, paired_markdown(tp),
             ["arm", "metric", "mean_difference", "ahead", "n_pairs", "sign_p", "wilcoxon_p"],
             [[a, m, _num(tp["cells"][a][m]["mean_difference"]), tp["cells"][a][m]["ahead"],
               tp["cells"][a][m]["n_pairs"], _num(tp["cells"][a][m]["sign_p"], ".4f"),
               _num(tp["cells"][a][m]["wilcoxon_p"], ".4f")] for a in tp["arms"] for m in tp["metrics"]])
    return files


def _draw_curves(ax, runs, class_names, metric) -> None:
    """One panel: test Dice of ``metric`` per epoch, mean over runs with a ±1 std band, one line per arm."""
    for arm, results in runs.items():
        if metric == "vDice":
            curves = [[np.nan if h["vdice"] is None else h["vdice"] for h in r["history"]] for r in results]
        else:
            c = class_names.index(metric)
            curves = [[np.nan if h["dice"][c] is None else h["dice"][c] for h in r["history"]] for r in results]
        # Runs cut short by a time budget have fewer epochs: pad them with NaN.
        longest = max(len(c) for c in curves)
        arr = np.array([c + [np.nan] * (longest - len(c)) for c in curves], dtype=np.float64)
        epochs = np.arange(1, arr.shape[1] + 1)
        with np.errstate(invalid="ignore"), _quiet_nan_warnings():
            mean = np.nanmean(arr, axis=0)
            std = np.nanstd(arr, axis=0)
        line, = ax.plot(epochs, mean, marker="o", ms=3, label=ARM_TITLES.get(arm, arm))
        if arr.shape[0] > 1:
            ax.fill_between(epochs, mean - std, mean + std, color=line.get_color(), alpha=0.15, lw=0)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test vDice" if metric == "vDice" else f"test Dice, {metric}")
    ax.grid(alpha=0.3)


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def plot_curves(out: Path, runs, class_names, metrics=None) -> List[Path]:
    """Test Dice per epoch, mean over runs with a ±1 std band, one line per arm.

    ``curves_<class>.png`` for every class (or those in ``metrics``), ``curves_vdice.png``,
    and ``curves_all.png`` with all of them as panels of one figure.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    panels = list(class_names if metrics is None else metrics) + ["vDice"]
    files = []
    for metric in panels:
        fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=110)
        _draw_curves(ax, runs, class_names, metric)
        ax.set_title(f"{metric}: mean over runs (band: ±1 std)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        files.append(_save(fig, out / f"curves_{_file_name(metric)}.png"))
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), dpi=100, squeeze=False)
    for ax, metric in zip(axes.flat, panels):
        _draw_curves(ax, runs, class_names, metric)
        ax.set_title(metric)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), fontsize=8)
    fig.suptitle("test Dice per epoch: mean over runs (band: ±1 std)")
    fig.tight_layout(rect=(0, 0.07, 1, 0.96))
    files.append(_save(fig, out / "curves_all.png"))
    return files


@contextlib.contextmanager
def _quiet_nan_warnings():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN epochs (a class absent everywhere)
        yield


def _file_name(metric: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in metric).lower()
