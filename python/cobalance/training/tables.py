"""The study's tables and figures: Table 1 (class presence per arm), Table 2 (best Dice
per class and vDice per arm), and the Dice curves; as markdown, CSV, JSON and PNG.

Everything is computed from the per-(arm, fold) result files' content; the presence
figures there come from each plan's :class:`cobalance.Report`.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np

from .._atomic import atomic_path, atomic_write_text
from .config import ARM_TITLES

__all__ = ["table1", "table2", "table1_markdown", "table2_markdown", "write_tables", "plot_curves"]


def _mean_std(values: Sequence[Optional[float]]) -> Tuple[Optional[float], Optional[float], int]:
    v = np.array([x for x in values if x is not None], dtype=np.float64)
    if v.size == 0:
        return None, None, 0
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0, int(v.size)


def table1(runs, class_names, share, n_tiles) -> dict:
    """Share of tiles holding each class: all tiles, then each arm's training set.

    Parameters
    ----------
    runs : dict
        ``{arm: [result of each fold]}``; a result's ``presence`` and ``plan_size`` are
        its plan's ``Report.after`` and ``Report.n_samples_out``.
    class_names : list of str
    share : array-like, shape (C,)
        Presence over all the study's tiles.
    n_tiles : int
    """
    rows = [{"set": "all tiles", "size": float(n_tiles), **{c: float(share[i]) for i, c in enumerate(class_names)}}]
    for arm, results in runs.items():
        row = {"set": arm, "size": float(np.mean([r["plan_size"] for r in results]))}
        for i, c in enumerate(class_names):
            row[c] = float(np.mean([r["presence"][i] for r in results]))
        rows.append(row)
    return {"description": "share of tiles containing each class in the training set of each arm "
                           "(mean over folds; 'all tiles' is the whole tiled dataset); size: tiles per set",
            "classes": list(class_names), "rows": rows}


def table2(runs, class_names) -> dict:
    """Per arm and class the best test Dice over epochs (and vDice): mean, std over folds."""
    metrics = list(class_names) + ["vDice"]
    cells = {}
    for arm, results in runs.items():
        cells[arm] = {}
        for i, name in enumerate(metrics):
            values = [r["best_vdice"] if name == "vDice" else r["best_dice"][i] for r in results]
            mean, std, n = _mean_std(values)
            cells[arm][name] = {"mean": mean, "std": std, "n_folds": n, "folds": values}
    return {"description": "per class the maximum test Dice over epochs, and the maximum vDice over "
                           "epochs; mean and sample std over folds",
            "metrics": metrics, "arms": list(runs), "cells": cells}


def _fmt(x: Optional[float], digits: int = 4) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def table1_markdown(t1) -> str:
    classes = t1["classes"]
    lines = ["| set | tiles | " + " | ".join(classes) + " |", "|---|---:|" + "---:|" * len(classes)]
    for row in t1["rows"]:
        lines.append(f"| {row['set']} | {row['size']:.0f} | " +
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


def write_tables(out: Path, t1: dict, t2: dict, class_names) -> List[Path]:
    """Write ``table{1,2}.{md,json,csv}`` into ``out`` (atomically); return their paths."""
    header = f"<!-- {t1['description']} -->\n"
    atomic_write_text(out / "table1.md", header + table1_markdown(t1))
    atomic_write_text(out / "table1.json", json.dumps(t1, indent=1))
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["set", "size"] + list(class_names))
    for row in t1["rows"]:
        w.writerow([row["set"], f"{row['size']:.1f}"] + [f"{row[c]:.6f}" for c in class_names])
    atomic_write_text(out / "table1.csv", buf.getvalue())
    header = f"<!-- {t2['description']} -->\n"
    atomic_write_text(out / "table2.md", header + table2_markdown(t2))
    atomic_write_text(out / "table2.json", json.dumps(t2, indent=1))
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["metric"] + [f"{a}_{s}" for a in t2["arms"] for s in ("mean", "std")])
    for metric in t2["metrics"]:
        row = [metric]
        for a in t2["arms"]:
            cell = t2["cells"][a][metric]
            row += ["" if cell["mean"] is None else f"{cell['mean']:.6f}",
                    "" if cell["std"] is None else f"{cell['std']:.6f}"]
        w.writerow(row)
    atomic_write_text(out / "table2.csv", buf.getvalue())
    return [out / f"table{i}.{ext}" for i in (1, 2) for ext in ("md", "json", "csv")]


def plot_curves(out: Path, runs, class_names, rarest) -> List[Path]:
    """``curves_<class>.png`` for the ``rarest`` classes and ``curves_vdice.png``: test
    Dice per epoch, mean over folds with a ±1 std band, one line per arm."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    files = []
    for metric in list(rarest) + ["vDice"]:
        fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=110)
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
        ax.set_title(f"{metric}: mean over folds (band: ±1 std)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / f"curves_{_file_name(metric)}.png"
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, format="png")
        plt.close(fig)
        files.append(path)
    return files


@contextlib.contextmanager
def _quiet_nan_warnings():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN epochs (a class absent everywhere)
        yield


def _file_name(metric: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in metric).lower()
