"""Tables over several seeds of one study: ``python -m cobalance.training.pool``.

A study's seed decides its fold split and every random stream of its training, so a
second seed is a repeat of the whole cross-validation. Each seed runs into its own
results folder (``--seed S --out DIR``, resumable as ever); this module reads the
finished runs of several such folders, checks that they are the same study apart from
the seed, and writes Table 1, Table 2 (best epoch and last three epochs), the paired
tests (pairs by seed and fold: 3 folds x 2 seeds give 6 pairs, enough for a two-sided
exact test to reach p = 0.031) and the curves over all of their runs::

    python -m cobalance.training.pool --out results/idrid-cpu-pooled \\
        results/idrid-cpu results/idrid-cpu-seed1

While a seed is still running its arms have different numbers of finished runs, so
Table 2's columns would average different runs; ``--matched`` keeps only the
(seed, fold) runs finished in every reported arm, and ``--arms`` picks the arms::

    python -m cobalance.training.pool --matched --arms unbalanced,balanced_noreg \\
        --out results/idrid-cpu-pooled results/idrid-cpu results/idrid-cpu-seed1
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from .._atomic import atomic_write_text
from .config import RUNTIME_FIELDS, ExperimentConfig
from .runner import finished_result, same_setting
from .tables import SUMMARIES, paired_tests, plot_curves, run_key, table1, table2, write_tables

__all__ = ["pool_studies", "main"]


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise ValueError(f"{str(path)!r} not found: {what}")
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise ValueError(f"{str(path)!r} is not valid JSON ({err})") from err


def pool_studies(folders: Sequence[str], out: str, plot: bool = True, arms: Optional[Sequence[str]] = None,
                 matched: bool = False) -> dict:
    """Pool the finished runs of several seeds of one study and write its tables.

    Parameters
    ----------
    folders : sequence of str
        Results folders of ``python -m cobalance.training``, each with its
        ``config.json``; all of one configuration apart from ``seed`` (and the runtime
        fields), with distinct seeds. Finished runs only are read, so a study still
        running can be summed up; Table 1's 'all tiles' row comes from the first
        folder's ``table1.json`` (written at the end of each call of the study) and is
        left out where there is none yet.
    out : str
        Folder for the pooled tables (created); it may not be one of ``folders``.
    plot : bool
        Also draw the curves (needs matplotlib).
    arms : sequence of str, optional
        The arms to report, in this order (default: the study's arms). The paired
        tests need ``unbalanced`` among them.
    matched : bool
        Keep only the (seed, fold) runs finished in every reported arm, so that every
        column of the tables is over the same runs (default: every finished run).

    Returns
    -------
    dict
        ``{"folders", "seeds", "classes", "runs": {arm: [results]}, "table1", "table2",
        "table2_last3", "paired", "files"}``; every result carries its ``seed``.

    Raises
    ------
    ValueError
        Fewer than one folder, a folder without its files, configurations that differ
        in more than the seed (naming the field), a repeated seed, ``out`` among the
        folders, an arm the study does not have, or no finished run (with ``matched``:
        no (seed, fold) finished in every arm).
    """
    if not folders:
        raise ValueError("pool needs at least one results folder, got none")
    out_path = Path(out)
    if any(Path(f).resolve() == out_path.resolve() for f in folders):
        raise ValueError(f"out={out!r} is one of the pooled folders; choose another folder")
    configs = [_read_json(Path(f) / "config.json", "is it a results folder of the study?") for f in folders]
    first = configs[0]
    for folder, cfg in zip(folders[1:], configs[1:]):
        for key in sorted(set(first) | set(cfg)):
            if key not in RUNTIME_FIELDS and key != "seed" and not same_setting(key, first.get(key), cfg.get(key)):
                raise ValueError(f"{folder!r} has {key}={cfg.get(key)!r}, {folders[0]!r} has "
                                 f"{key}={first.get(key)!r}: only the seed may differ between pooled studies")
    seeds = [int(c["seed"]) for c in configs]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"pooled folders must have distinct seeds, got seeds {seeds}")
    # The 'all tiles' row of Table 1 (the same for every seed) comes from a table the
    # study wrote; a study still running its first call has none yet.
    table1_path = Path(folders[0]) / "table1.json"
    base_table1 = _read_json(table1_path, "") if table1_path.is_file() else None

    study_arms = list(first["arms"])
    arms = study_arms if arms is None else list(arms)
    unknown = [arm for arm in arms if arm not in study_arms]
    if not arms or unknown or len(set(arms)) != len(arms):
        raise ValueError(f"arms must be distinct arms of the study {study_arms}, got {arms}")
    runs: Dict[str, List[dict]] = {arm: [] for arm in arms}
    for folder, cfg, seed in zip(folders, configs, seeds):
        config = ExperimentConfig(**cfg)
        for arm in arms:
            for fold in range(config.folds):
                result = finished_result(Path(folder) / "runs" / arm / f"fold{fold}.json", config)
                if result is not None:
                    runs[arm].append({**result, "seed": seed})
    if matched:
        keys = set.intersection(*({run_key(r) for r in results} for results in runs.values()))
        if not keys:
            raise ValueError(f"no (seed, fold) is finished in every arm of {arms} in {list(folders)}")
        runs = {arm: [r for r in results if run_key(r) in keys] for arm, results in runs.items()}
    runs = {arm: results for arm, results in runs.items() if results}
    if not runs:
        raise ValueError(f"no finished run in {list(folders)}")

    class_names = list(next(iter(runs.values()))[0]["classes"])
    out_path.mkdir(parents=True, exist_ok=True)
    if base_table1 is not None and base_table1["rows"] and base_table1["rows"][0]["set"] == "all tiles":
        all_row = base_table1["rows"][0]
        t1 = table1(runs, class_names, [all_row[c] for c in class_names], int(all_row["size"]))
    else:
        t1 = table1(runs, class_names)
    t2s = {summary: table2(runs, class_names, summary) for summary in SUMMARIES}
    paired = {summary: paired_tests(runs, class_names, summary) for summary in SUMMARIES}
    files = write_tables(out_path, t1, t2s, paired, class_names)
    if plot:
        files += plot_curves(out_path, runs, class_names)
    manifest = {"folders": [str(f) for f in folders], "seeds": seeds, "matched": bool(matched),
                "runs": {arm: [list(run_key(r)) for r in results] for arm, results in runs.items()}}
    atomic_write_text(out_path / "pool.json", json.dumps(manifest, indent=1))
    files.append(out_path / "pool.json")
    return {"folders": manifest["folders"], "seeds": seeds, "classes": class_names, "runs": runs, "table1": t1,
            "table2": t2s["best"], "table2_last3": t2s["last3"], "paired": paired, "files": [str(f) for f in files]}


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cobalance.training.pool",
                                description="tables and curves over several seeds of one fundus study")
    p.add_argument("folders", nargs="+", help="results folders of the study, one per seed")
    p.add_argument("--out", required=True, help="folder for the pooled tables (created)")
    p.add_argument("--no-plot", action="store_true", help="tables only (no matplotlib needed)")
    p.add_argument("--arms", help="comma-separated arms to report, in this order (default: the study's)")
    p.add_argument("--matched", action="store_true",
                   help="only the (seed, fold) runs finished in every reported arm, so every column is over the same runs")
    args = p.parse_args(argv)
    arms = None if args.arms is None else [a.strip() for a in args.arms.split(",") if a.strip()]
    try:
        result = pool_studies(args.folders, args.out, plot=not args.no_plot, arms=arms, matched=args.matched)
    except ValueError as err:
        p.exit(2, f"error: {err}\n")
    n = {arm: len(r) for arm, r in result["runs"].items()}
    print(f"pooled seeds {result['seeds']}: runs per arm {n}; wrote {len(result['files'])} files to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
