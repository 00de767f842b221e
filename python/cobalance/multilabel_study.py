"""Does balancing help a classifier? A multi-label classification study.

Each data set (an ``.npz`` with ``X``: float features, samples x features; ``Y``: 0/1
labels; optional ``labels``: label names) is split by multi-label stratified K-fold
(:class:`cobalance.training.folds.MultilabelStratifiedKFold`, iterative
stratification), repeated with several seeds. In every fold, each *arm* resamples the
training part only (never the test part), the features are scaled by their largest
absolute value in the training part (scikit-learn's ``MaxAbsScaler``: numeric features
into [-1, 1], 0/1 word features left as they are), and each classifier is trained on the
resampled training set and scored on the untouched test part. (Standardising the 0/1
word features of enron made logistic regression 20x slower, 20 s per fit of its 53
labels, for a macro-F1 within 0.01.)

Arms (the budget-matched ones add 25 % samples, nothing dropped):

- ``none``: no resampling;
- ``class_weight``: no resampling, each label's loss weighted by its inverse frequency
  (scikit-learn's ``class_weight="balanced"`` in every binary model; logistic
  regression only, since k-NN has no loss);
- ``ml_ros``, ``lp_ros`` (P = 25), ``ml_rus`` (P = 25, deletes), ``repeat_factor``
  (at 1.25 N): the literature's resamplers (:mod:`cobalance.resamplers`);
- ``cobalance``: ``Balancer()`` with its defaults (+10 %);
- ``cobalance_25``: ``Balancer(n_samples_out=round(1.25 N))``;
- ``cobalance_exact``: the method paper's squared-fraction loss towards the equal
  target, ``proportions`` regularizer, exact solver, at 1.25 N, nothing dropped.

Classifiers (scikit-learn): ``logreg``, binary relevance with logistic regression
(liblinear, C = 10); ``knn``, k-nearest neighbours (k = 10, distance-weighted), which
is multi-label by itself. A duplicated sample counts several times in either.

Metrics on the test part: macro-F1, micro-F1, macro ROC AUC (over the labels with both
values in the test part; threshold free), F1 averaged over the rarest third of the
labels (by training frequency), Hamming loss; and, of the resampled training set, its
MeanIR and Kish effective sample size (as a share of the training part).

Statistics: mean and standard deviation over the folds x seeds; per data set, a
paired Wilcoxon signed-rank test of each arm against ``none`` over the folds x seeds;
over the data sets, each arm's average rank, a Friedman test across the arms, and a
paired Wilcoxon test of each arm's per-set means against ``none`` (scipy.stats).

Output in ``out``: ``results.json`` (everything, with the per-fold values),
``results.csv`` (one row per data set, classifier, arm and metric), ``tables.md`` (the
tables) and ``summary.png`` (macro-F1 and rare-label F1 of each arm relative to
``none``, per data set). Files are written to temporary names and renamed.
"""

from __future__ import annotations

import json
import os
import platform
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

__all__ = ["ARMS", "CLASSIFIERS", "METRICS", "load_dataset", "run_study", "main"]

ARMS = ("none", "class_weight", "ml_ros", "ml_rus", "lp_ros", "repeat_factor", "cobalance", "cobalance_25",
        "cobalance_exact")
CLASSIFIERS = ("logreg", "knn")
#: Test-part metrics (higher is better except ``hamming``) and training-set figures.
METRICS = ("macro_f1", "micro_f1", "macro_auc", "rare_f1", "hamming", "train_mean_ir", "train_ess")
HIGHER_IS_BETTER = {"macro_f1": True, "micro_f1": True, "macro_auc": True, "rare_f1": True, "hamming": False,
                    "train_mean_ir": False, "train_ess": True}
BUDGET = 25  # percent added (or deleted) by the budget-matched arms


def _sklearn():
    try:
        import sklearn  # noqa: F401
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("the multi-label study needs scikit-learn and scipy: pip install 'cobalance[study]'") \
            from err


def load_dataset(path) -> dict:
    """Read a study ``.npz``: ``X`` (N x F numbers), ``Y`` (N x C of 0/1), optional ``labels``.

    Raises
    ------
    ValueError
        A missing or malformed array, with the file and the array named.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"data set {str(path)!r} does not exist")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read data set {str(path)!r}: {exc}") from None
    for key in ("X", "Y"):
        if key not in arrays:
            raise ValueError(f"data set {str(path)!r} has no array {key!r} (it holds {sorted(arrays)})")
    x, y = arrays["X"], arrays["Y"]
    if x.ndim != 2 or x.dtype.kind not in "biuf":
        raise ValueError(f"data set {str(path)!r}: X must be a 2-D numeric array, got shape {x.shape}, "
                         f"dtype {x.dtype}")
    if y.ndim != 2 or y.shape[0] != x.shape[0]:
        raise ValueError(f"data set {str(path)!r}: Y must be 2-D with as many rows as X ({x.shape[0]}), "
                         f"got shape {y.shape}")
    if y.dtype.kind not in "biuf" or not np.isin(y, (0, 1)).all():
        raise ValueError(f"data set {str(path)!r}: Y must hold 0/1 values")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"data set {str(path)!r}: X holds NaN or infinite values")
    if x.shape[0] < 10:
        raise ValueError(f"data set {str(path)!r}: {x.shape[0]} samples are too few for cross-validation")
    labels = [str(v) for v in arrays["labels"]] if "labels" in arrays else [str(i) for i in range(y.shape[1])]
    if len(labels) != y.shape[1]:
        raise ValueError(f"data set {str(path)!r}: {len(labels)} label names for {y.shape[1]} label columns")
    return {"name": path.name[:-4] if path.name.endswith(".npz") else path.name, "X": x.astype(np.float64),
            "Y": y.astype(bool), "labels": labels}


# -- arms ---------------------------------------------------------------------------------


def _plan_of(arm: str, y: np.ndarray, seed: int):
    """The resampling plan of ``arm`` for training labels ``y`` (None: no resampling)."""
    import cobalance
    from cobalance import Balancer

    n = y.shape[0]
    if arm in ("none", "class_weight"):
        return None
    if arm == "ml_ros":
        return cobalance.ml_ros(y, BUDGET, random_state=seed)
    if arm == "ml_rus":
        return cobalance.ml_rus(y, BUDGET, random_state=seed)
    if arm == "lp_ros":
        return cobalance.lp_ros(y, BUDGET, random_state=seed)
    if arm == "repeat_factor":
        return cobalance.repeat_factor(y, n_samples_out=round((1 + BUDGET / 100) * n), random_state=seed)
    with warnings.catch_warnings():
        # a study reports what each arm does; the library's advice is for interactive use
        warnings.simplefilter("ignore")
        if arm == "cobalance":
            return Balancer(random_state=seed).fit(y).plan_
        if arm == "cobalance_25":
            return Balancer(n_samples_out=round((1 + BUDGET / 100) * n), random_state=seed).fit(y).plan_
        if arm == "cobalance_exact":
            return Balancer(objective="fraction", regularizer="proportions", solver="exact",
                            n_samples_out=round((1 + BUDGET / 100) * n), random_state=seed).fit(y).plan_
    raise ValueError(f"arm must be one of {list(ARMS)}, got {arm!r}")


def _classifier(name: str, arm: str):
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.neighbors import KNeighborsClassifier

    if name == "logreg":
        weight = "balanced" if arm == "class_weight" else None
        return OneVsRestClassifier(LogisticRegression(solver="liblinear", C=10.0, max_iter=500, class_weight=weight))
    if name == "knn":
        return KNeighborsClassifier(n_neighbors=10, weights="distance")
    raise ValueError(f"classifier must be one of {list(CLASSIFIERS)}, got {name!r}")


def _applies(arm: str, classifier: str) -> bool:
    return not (arm == "class_weight" and classifier == "knn")


# -- metrics ------------------------------------------------------------------------------


def _scores_of(model, x: np.ndarray, n_labels: int) -> np.ndarray:
    """Per-label scores (probability of 1), N x C, whatever the estimator returns."""
    proba = model.predict_proba(x)
    if isinstance(proba, list):  # k-NN on multi-label targets: one (N x 2) array per label
        cols = []
        for p, classes in zip(proba, model.classes_):
            classes = list(classes)
            cols.append(p[:, classes.index(1)] if 1 in classes else np.zeros(p.shape[0]))
        return np.stack(cols, axis=1)
    return np.asarray(proba).reshape(-1, n_labels)


def fold_metrics(y_true: np.ndarray, y_pred: np.ndarray, scores: np.ndarray, rare: np.ndarray) -> dict:
    """The test-part metrics of one fold (see the module docstring)."""
    from sklearn.metrics import f1_score, hamming_loss, roc_auc_score

    y_true = y_true.astype(int)
    y_pred = y_pred.astype(int)
    per_label_f1 = f1_score(y_true, y_pred, average=None, zero_division=0)
    aucs = [roc_auc_score(y_true[:, i], scores[:, i]) for i in range(y_true.shape[1])
            if 0 < y_true[:, i].sum() < y_true.shape[0]]
    return {"macro_f1": float(np.mean(per_label_f1)),
            "micro_f1": float(f1_score(y_true, y_pred, average="micro", zero_division=0)),
            "macro_auc": float(np.mean(aucs)) if aucs else float("nan"),
            "rare_f1": float(np.mean(per_label_f1[rare])),
            "hamming": float(hamming_loss(y_true, y_pred))}


def _training_figures(table, plan) -> dict:
    """MeanIR and ESS (share of the training part) of ``plan`` on the training part's ``table``."""
    from cobalance import Plan, Report

    plan = plan if plan is not None else Plan.identity(table.n_samples)
    r = Report.from_plan(table, plan, np.zeros(table.n_classes))
    return {"train_mean_ir": float(r.mean_ir_after), "train_ess": float(r.effective_size / table.n_samples)}


# -- the study ----------------------------------------------------------------------------


def run_dataset(data: dict, *, arms: Sequence[str] = ARMS, classifiers: Sequence[str] = CLASSIFIERS,
                folds: int = 5, seeds: Sequence[int] = (0, 1),
                progress: Optional[Callable[[str], None]] = None) -> dict:
    """Every fold x seed x arm x classifier of one data set; per-fold values of each metric.

    Returns ``{classifier: {arm: {metric: [value per fold x seed]}}}`` plus ``"folds"``.
    """
    _sklearn()
    from sklearn.preprocessing import MaxAbsScaler

    from cobalance import PatternTable
    from cobalance.training.folds import MultilabelStratifiedKFold

    x, y = data["X"], data["Y"]
    # the rarest third of the labels present, by frequency in the whole set (fixed per set)
    freq = y.mean(axis=0)
    present = np.flatnonzero(freq > 0)
    rare = present[np.argsort(freq[present], kind="stable")[:max(1, len(present) // 3)]]
    values: Dict[str, Dict[str, Dict[str, list]]] = {
        c: {a: {m: [] for m in METRICS} for a in arms if _applies(a, c)} for c in classifiers}
    for seed in seeds:
        splitter = MultilabelStratifiedKFold(n_splits=folds, random_state=seed)
        for k, (train, test) in enumerate(splitter.split(y.astype(np.int64))):
            scaler = MaxAbsScaler().fit(x[train])
            x_train, x_test = scaler.transform(x[train]), scaler.transform(x[test])
            y_train, y_test = y[train], y[test]
            train_table = PatternTable.from_labels(y_train)  # once per fold, for every arm's figures
            for arm in arms:
                plan = _plan_of(arm, y_train, seed * 1000 + k)
                idx = np.arange(train.size) if plan is None else plan.indices()
                figures = _training_figures(train_table, plan)
                for clf in classifiers:
                    if not _applies(arm, clf):
                        continue
                    model = _classifier(clf, arm)
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")  # labels absent from a fold, liblinear notes
                        model.fit(x_train[idx], y_train[idx].astype(int))
                        pred = np.asarray(model.predict(x_test)).reshape(y_test.shape)
                        scores = _scores_of(model, x_test, y.shape[1])
                    row = {**fold_metrics(y_test, pred, scores, rare), **figures}
                    for m in METRICS:
                        values[clf][arm][m].append(row[m])
            if progress:
                progress(f"{data['name']}: seed {seed} fold {k + 1}/{folds} done")
    return {"n_samples": int(y.shape[0]), "n_features": int(x.shape[1]), "n_labels": int(y.shape[1]),
            "rare_labels": [data["labels"][i] for i in rare], "folds": folds, "seeds": list(seeds),
            "values": values}


def _summary(per_set: Dict[str, dict], arms: Sequence[str], classifiers: Sequence[str]) -> dict:
    """Means, stds, per-set Wilcoxon against ``none``, ranks, Friedman and across-set Wilcoxon."""
    from scipy import stats

    out: dict = {}
    for clf in classifiers:
        out[clf] = {}
        for metric in METRICS:
            table = {}
            for name, res in per_set.items():
                vals = res["values"][clf]
                base = np.asarray(vals["none"][metric]) if "none" in vals else None
                row = {}
                for arm, mv in vals.items():
                    v = np.asarray(mv[metric], dtype=float)
                    entry = {"mean": float(np.nanmean(v)), "std": float(np.nanstd(v))}
                    if base is not None and arm != "none":
                        entry["p_vs_none"] = _wilcoxon(stats, v, base)
                    row[arm] = entry
                table[name] = row
            arms_here = [a for a in arms if all(a in table[s] for s in table)]
            means = np.array([[table[s][a]["mean"] for a in arms_here] for s in table])  # sets x arms
            sign = -1.0 if HIGHER_IS_BETTER[metric] else 1.0
            ranks = np.array([stats.rankdata(sign * row) for row in means]) if means.size else means
            friedman = None
            if len(table) >= 2 and len(arms_here) >= 3 and np.all(np.isfinite(means)):
                friedman = float(stats.friedmanchisquare(*means.T).pvalue)
            across = {}
            if "none" in arms_here:
                base = means[:, arms_here.index("none")]
                for j, arm in enumerate(arms_here):
                    if arm != "none":
                        across[arm] = _wilcoxon(stats, means[:, j], base)
            out[clf][metric] = {"per_set": table, "arms": arms_here,
                                "average_rank": {a: float(ranks[:, j].mean()) for j, a in enumerate(arms_here)}
                                if ranks.size else {},
                                "friedman_p": friedman, "wilcoxon_vs_none_across_sets": across}
    return out


def _wilcoxon(stats, a: np.ndarray, b: np.ndarray) -> Optional[float]:
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    d = d[np.isfinite(d)]
    if d.size < 2 or np.all(d == 0):
        return None
    return float(stats.wilcoxon(d).pvalue)


def run_study(paths: Sequence, out, *, arms: Sequence[str] = ARMS, classifiers: Sequence[str] = CLASSIFIERS,
              folds: int = 5, seeds: Sequence[int] = (0, 1), command: Optional[str] = None,
              progress: Optional[Callable[[str], None]] = None) -> dict:
    """Run the study on each ``.npz`` of ``paths`` and write its files to ``out``.

    Returns the dictionary written to ``results.json``.

    Raises
    ------
    ValueError
        Unknown arms or classifiers, fewer than 2 folds, no seeds, or an unreadable
        data set (named in the message).
    """
    _sklearn()
    arms, classifiers = list(arms), list(classifiers)
    for name, chosen, valid in (("arm", arms, ARMS), ("classifier", classifiers, CLASSIFIERS)):
        bad = [c for c in chosen if c not in valid]
        if bad or not chosen:
            raise ValueError(f"{name}s must be a non-empty subset of {list(valid)}, got {chosen!r}")
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
        raise ValueError(f"folds must be an integer >= 2, got {folds!r}")
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("seeds must list at least one seed")
    datasets = [load_dataset(p) for p in paths]
    if not datasets:
        raise ValueError("give at least one data set")
    names = [d["name"] for d in datasets]
    if len(set(names)) != len(names):
        raise ValueError(f"data set names must differ, got {names}")
    t0 = time.perf_counter()
    per_set = {d["name"]: run_dataset(d, arms=arms, classifiers=classifiers, folds=folds, seeds=seeds,
                                      progress=progress) for d in datasets}
    result = {
        "meta": {"command": command, "machine": f"{platform.node()} ({os.cpu_count()} cores, {platform.machine()})",
                 "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                 "seconds": round(time.perf_counter() - t0, 1), "folds": folds, "seeds": seeds, "arms": arms,
                 "classifiers": classifiers, "budget_percent": BUDGET},
        "datasets": per_set,
        "summary": _summary(per_set, arms, classifiers),
    }
    _write_outputs(result, Path(out))
    return result


# -- output -------------------------------------------------------------------------------


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _fmt_p(p) -> str:
    if p is None:
        return "-"
    return f"{p:.3f}" if p >= 0.001 else f"{p:.0e}"


def _write_outputs(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    _atomic_text(out / "results.json", json.dumps(result, indent=1, default=_json_default) + "\n")
    summary, meta = result["summary"], result["meta"]
    lines = ["dataset,classifier,arm,metric,mean,std,p_vs_none"]
    for clf, by_metric in summary.items():
        for metric, s in by_metric.items():
            for name, row in s["per_set"].items():
                for arm, e in row.items():
                    p = e.get("p_vs_none")
                    lines.append(f"{name},{clf},{arm},{metric},{e['mean']:.6g},{e['std']:.6g},"
                                 f"{'' if p is None else f'{p:.6g}'}")
    _atomic_text(out / "results.csv", "\n".join(lines) + "\n")
    _atomic_text(out / "tables.md", _markdown(result))
    _summary_png(result, out / "summary.png")


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def _markdown(result: dict) -> str:
    meta, summary = result["meta"], result["summary"]
    lines = ["# Multi-label classification with and without balancing", "",
             f"Command: `{meta['command']}`  ", f"Machine: {meta['machine']}, {meta['date']}, "
             f"{meta['seconds']} s. {meta['folds']}-fold multi-label stratified cross-validation x "
             f"{len(meta['seeds'])} seeds; resampling on the training part only; budget-matched arms "
             f"add {meta['budget_percent']} % (ML-RUS deletes {meta['budget_percent']} %).", ""]
    for clf in meta["classifiers"]:
        for metric in ("macro_f1", "rare_f1", "micro_f1", "macro_auc", "hamming", "train_mean_ir", "train_ess"):
            s = summary[clf][metric]
            better = "higher" if HIGHER_IS_BETTER[metric] else "lower"
            lines += [f"## {clf}: {metric} ({better} is better)", "",
                      "Mean ± std over folds x seeds; (p) paired Wilcoxon against `none` over folds x seeds.", "",
                      "| set | " + " | ".join(s["arms"]) + " |", "|---|" + "---:|" * len(s["arms"])]
            for name, row in s["per_set"].items():
                cells = []
                for arm in s["arms"]:
                    e = row[arm]
                    p = "" if arm == "none" else f" ({_fmt_p(e.get('p_vs_none'))})"
                    cells.append(f"{e['mean']:.3f} ± {e['std']:.3f}{p}")
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
            ranks = s["average_rank"]
            lines.append("| average rank | " + " | ".join(f"{ranks[a]:.2f}" for a in s["arms"]) + " |")
            across = s["wilcoxon_vs_none_across_sets"]
            lines.append("| p vs none, across sets | - | " + " | ".join(_fmt_p(across.get(a)) for a in s["arms"][1:])
                         + " |" if s["arms"] and s["arms"][0] == "none" else "")
            lines += ["", f"Friedman test across the arms: p = {_fmt_p(s['friedman_p'])}.", ""]
    return "\n".join(lines) + "\n"


def _summary_png(result: dict, path: Path) -> None:
    try:
        from matplotlib.figure import Figure
    except ImportError:  # pragma: no cover - the chart is optional
        return
    meta, summary = result["meta"], result["summary"]
    clfs = meta["classifiers"]
    fig = Figure(figsize=(5.2 * len(clfs), 7.8))
    axes = fig.subplots(2, len(clfs), squeeze=False)
    for col, clf in enumerate(clfs):
        for row, metric in enumerate(("macro_f1", "rare_f1")):
            ax = axes[row][col]
            s = summary[clf][metric]
            arms = [a for a in s["arms"] if a != "none"]
            sets = list(s["per_set"])
            width = 0.8 / max(1, len(sets))
            for k, name in enumerate(sets):
                base = s["per_set"][name]["none"]["mean"]
                diffs = [s["per_set"][name][a]["mean"] - base for a in arms]
                ax.barh(np.arange(len(arms)) + k * width - 0.4 + width / 2, diffs, height=width, label=name)
            ax.axvline(0, color="black", lw=0.8)
            ax.set_yticks(np.arange(len(arms)))
            ax.set_yticklabels([f"{a} (rank {s['average_rank'][a]:.1f})" for a in arms])
            ax.invert_yaxis()
            ax.set_xlabel(f"{metric} minus no resampling (per data set)")
            ax.set_title(f"{clf}: {metric}")
            ax.grid(True, axis="x", alpha=0.3)
            if row == 0 and col == 0:
                handles, names = ax.get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=min(6, len(names)), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=100)
    os.replace(tmp, path)


# -- command line -------------------------------------------------------------------------


def add_arguments(parser) -> None:
    parser.add_argument("--data", action="append", required=True, metavar="SET.npz",
                        help="a data set (.npz with X, Y and optional labels); repeat for several")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for the results")
    parser.add_argument("--folds", type=int, default=5, help="cross-validation folds (default 5)")
    parser.add_argument("--seeds", default="0,1", help="comma-separated seeds, one repetition each (default 0,1)")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated arms (default all: {','.join(ARMS)})")
    parser.add_argument("--classifiers", default=",".join(CLASSIFIERS),
                        help=f"comma-separated classifiers (default {','.join(CLASSIFIERS)})")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")


def run_from_args(args, argv_text: str) -> int:
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--seeds must be comma-separated integers, got {args.seeds!r}") from None
    progress = None if args.quiet else (lambda msg: print(msg, flush=True))
    result = run_study(args.data, args.out, arms=[a.strip() for a in args.arms.split(",") if a.strip()],
                       classifiers=[c.strip() for c in args.classifiers.split(",") if c.strip()],
                       folds=args.folds, seeds=seeds, command=argv_text, progress=progress)
    if not args.quiet:
        print(f"wrote {args.out}/results.json, results.csv, tables.md, summary.png "
              f"({result['meta']['seconds']} s)")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``cobalance experiment multilabel ...`` / ``python -m cobalance.multilabel_study ...``."""
    import argparse
    import shlex
    import sys

    parser = argparse.ArgumentParser(prog="cobalance experiment multilabel", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    return run_from_args(args, "cobalance experiment multilabel " + " ".join(shlex.quote(a) for a in argv))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
