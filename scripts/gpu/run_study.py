"""Run the fundus study in the paper's configuration and gather its results into ``$OUT``.

Called by ``scripts/gpu/run-study`` on the GPU machine once the carried wheels are
installed. It runs ``python -m cobalance.training`` with

- the method's model: U-Net with the Xception-65 encoder (``smp-unet-xception65``);
- 512-px tiles of the half-resolution IDRiD images, 3 folds, focal loss (gamma 2),
  Adam with lr 8e-3, batch 8;
- the paper's three arms (``unbalanced``, ``balanced_noreg``, ``balanced_reg``) and
  the library's default Balancer (``library_default``);
- bfloat16 autocast, channels-last, every tile kept in memory once read, no
  per-epoch checkpoints;
- **8 epochs by default, 10 (the paper's) with** ``--full``, and a time budget
  (``--max-minutes``, default 8) that stops every run after the same share of it,
  so that the run ends inside its time limit whatever the card's speed. Why 8:
  docs/results/idrid-gpu/README.md, *Budget*.

Then it writes 4 files into ``$OUT`` (at most 8 files, flat, come back from the GPU machine):
``results.json`` (configuration, environment, timings, both tables and every
(arm, fold)'s epochs), ``tables.md``, ``curves_all.png`` and ``study.log``;
and prints a short table last.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PAPER_ARMS = "unbalanced,balanced_noreg,balanced_reg,library_default"
DEFAULT_EPOCHS = 8
PAPER_EPOCHS = 10


def study_command(args, extra) -> list:
    """The ``python -m cobalance.training`` command line of this run."""
    epochs = args.epochs if args.epochs is not None else (PAPER_EPOCHS if args.full else DEFAULT_EPOCHS)
    cmd = [sys.executable, "-m", "cobalance.training", "--data", args.data, "--out", args.work,
           "--tile", "512", "--folds", "3", "--epochs", str(epochs), "--batch-size", "8", "--lr", "8e-3",
           "--focal-gamma", "2", "--model", args.model, "--arms", args.arms, "--device", args.device,
           "--cache-images", "--no-progress"]
    if args.device != "cpu":
        # The GPU machine starts bare for every run: nothing could resume from a
        # checkpoint there, and saving one every epoch costs time.
        cmd += ["--amp", "bf16", "--channels-last", "--no-checkpoints"]
    if args.max_minutes > 0:
        cmd += ["--max-minutes", str(args.max_minutes)]
    return cmd + list(extra)


def environment(device: str) -> dict:
    """Versions and the card, for results.json."""
    env = {"python": platform.python_version(), "machine": platform.machine()}
    try:
        import torch

        env["torch"] = torch.__version__
        if device != "cpu" and torch.cuda.is_available():
            env["gpu"] = torch.cuda.get_device_name(0)
            env["cuda"] = torch.version.cuda
    except ImportError:
        pass
    for name in ("segmentation_models_pytorch", "timm", "kornia", "cobalance"):
        try:
            env[name] = __import__(name).__version__
        except (ImportError, AttributeError):
            env[name] = None
    try:  # the GPU machine's copy of the tree may come without git or .git
        env["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                                       text=True).stdout.strip() or None
    except OSError:
        env["commit"] = None
    return env


_TABLES = {
    "table1": "Table 1: class presence, duplicates and effective size of the training sets (mean over folds)",
    "table2_best": "Table 2: maximum test Dice over epochs (mean ± std over folds)",
    "table2_last3": "Table 2b: test Dice, mean of the last three epochs (mean ± std over folds)",
    "paired_best": "Paired differences against unbalanced, best epoch (sign test / Wilcoxon p)",
    "paired_last3": "Paired differences against unbalanced, last three epochs (sign test / Wilcoxon p)",
}


def gather(work: Path, out: Path, log: Path, meta: dict) -> dict:
    """Write results.json and tables.md into ``out``, copy the curves; return results.json's content."""
    runs = {}
    for path in sorted((work / "runs").glob("*/fold*.json")):
        result = json.loads(path.read_text())
        runs.setdefault(result["arm"], []).append(result)
    results = dict(meta)
    results["config"] = json.loads((work / "config.json").read_text())
    # In the configuration's arm order (a resumed folder may hold other arms too).
    runs = {arm: runs[arm] for arm in results["config"]["arms"] if arm in runs}
    for name in _TABLES:
        path = work / f"{name}.json"
        results[name] = json.loads(path.read_text()) if path.exists() else None
    results["runs"] = {arm: [{k: r.get(k) for k in ("fold", "plan_size", "plan_duplicates", "plan_max_copies",
                                                   "plan_info", "epoch_size", "presence", "best_dice",
                                                   "best_vdice", "seconds", "time_limited", "history",
                                                   "n_train_tiles", "n_test_tiles", "device", "torch")}
                             for r in sorted(rs, key=lambda r: r["fold"])] for arm, rs in runs.items()}
    _write(out / "results.json", json.dumps(results, indent=1) + "\n")
    parts = []
    for name, title in _TABLES.items():
        path = work / f"{name}.md"
        if path.exists():
            parts.append(f"## {title}\n\n{path.read_text()}")
    parts.append("## Runs\n\n" + runs_markdown(runs))
    _write(out / "tables.md", "\n".join(parts))
    if (work / "curves_all.png").exists():  # every class in one figure: few files come back
        shutil.copyfile(work / "curves_all.png", out / "curves_all.png")
    if log.parent != out:
        shutil.copyfile(log, out / log.name)
    return results


def runs_markdown(runs) -> str:
    """One row per (arm, fold): epochs trained, seconds, seconds per epoch, best vDice."""
    lines = ["| arm | fold | epochs | cut by time | seconds | s / epoch | best vDice |",
             "|---|---:|---:|---|---:|---:|---:|"]
    for arm, results in runs.items():
        for r in sorted(results, key=lambda r: r["fold"]):
            n = len(r["history"])
            vd = r.get("best_vdice")
            lines.append(f"| {arm} | {r['fold']} | {n} | {'yes' if r.get('time_limited') else 'no'} | "
                         f"{r['seconds']:.1f} | {r['seconds'] / max(n, 1):.2f} | "
                         f"{'n/a' if vd is None else f'{vd:.4f}'} |")
    return "\n".join(lines) + "\n"


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Arguments after '--' go to python -m cobalance.training as they are.")
    p.add_argument("--data", default=str(REPO / ".gpu-carry" / "idrid"), help="the carried IDRiD folder")
    p.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "results" / "idrid-gpu-out"),
                   help="where the gathered files go (default $OUT)")
    p.add_argument("--work", default=str(REPO / "results" / "idrid-gpu"),
                   help="the study's own results folder (resumable; default results/idrid-gpu)")
    p.add_argument("--full", action="store_true", help=f"the paper's {PAPER_EPOCHS} epochs (default {DEFAULT_EPOCHS})")
    p.add_argument("--epochs", type=int, default=None, help="epochs, overriding --full")
    p.add_argument("--max-minutes", type=float, default=8.0,
                   help="time budget of the study's training (default 8); 0: none")
    p.add_argument("--device", default="cuda")
    p.add_argument("--model", default="smp-unet-xception65")
    p.add_argument("--arms", default=PAPER_ARMS)
    args, extra = p.parse_known_args(argv)
    extra = [a for a in extra if a != "--"]  # argparse keeps or drops the '--' by version

    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    log = out / "study.log"
    cmd = study_command(args, extra)
    meta = {"command": cmd[1:], "environment": environment(args.device)}
    print("environment:", json.dumps(meta["environment"]), flush=True)
    print("+", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
        for line in proc.stdout:
            f.write(line)
            f.flush()
            sys.stdout.write(line)
        rc = proc.wait()
    meta["study_seconds"] = round(time.perf_counter() - t0, 1)
    meta["study_exit_status"] = rc
    if not (work / "config.json").exists():
        print(f"the study wrote nothing (exit status {rc}); see {log}", file=sys.stderr)
        return rc or 1
    results = gather(work, out, log, meta)
    # Only the output's end may be kept: the short table goes last.
    print(f"\nstudy: {meta['study_seconds']} s, exit status {rc}; files in {out}: "
          f"{sorted(p.name for p in out.iterdir() if not p.name.startswith('.'))}")
    print(runs_markdown(results["runs"]))
    table2 = work / "table2_best.md"
    if table2.exists():
        print(table2.read_text())
    return rc


if __name__ == "__main__":
    sys.exit(main())
