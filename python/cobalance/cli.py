"""The ``cobalance`` command line.

Subcommands follow the library's data flow, each reading the previous one's file::

    cobalance scan labels.csv -o table.npz              # labels or masks -> pattern table
    cobalance fit table.npz --target rare_boost -o plan.npz   # table + target -> plan
    cobalance report plan.npz --png chart.png            # plan -> markdown table, PNG chart
    cobalance write plan.npz masks/ balanced/            # plan + dataset -> balanced folder
    cobalance demo                                       # the whole path on the shipped sample

Exit codes
----------
0
    Success.
1
    Failure that is not the input's fault (an optional dependency missing, disk full,
    an unexpected error). Set ``COBALANCE_DEBUG=1`` for a traceback.
2
    Bad usage or bad input: unknown option, missing or unreadable file, a value that is
    not 0/1, an unknown class name, a target outside [0, 1].
130, 143
    Interrupted (Ctrl-C) or terminated (SIGTERM); no partial output file is left
    behind (``write`` leaves the items completed so far, and resumes on a rerun).
141
    stdout was closed before the output was printed (e.g. piped into ``head``).

Errors are reported as one line on stderr, ``cobalance: error: ...``, without a
traceback. ``--json`` prints one JSON document on stdout instead of the human-readable
text; ``--quiet`` prints nothing but errors. Progress bars (tqdm, when installed) go to
stderr and only appear on a terminal.

Files link to each other by side records (JSON, written atomically with their file):

* ``scan -o T.npz`` writes ``T.npz`` (:meth:`PatternTable.save`) and ``T.scan.json``:
  the source (absolute path), its format and the scan options (tiling of a masks
  folder), so that ``write`` can rebuild the same samples in the same order;
* ``fit -o P.npz`` writes ``P.npz`` (:meth:`Plan.save`) and ``P.fit.json``: the table's
  path (absolute, and relative to the plan) and SHA-256, the resolved target, the
  balancer options and the report. ``report`` and ``write`` find the table through it
  (``--table`` overrides) and refuse a table whose hash changed.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from ._atomic import atomic_write_text
from ._version import __version__
from .patterns import PatternTable

__all__ = ["main", "build_parser", "EXIT_OK", "EXIT_FAILURE", "EXIT_USAGE", "EXIT_INTERRUPTED", "EXIT_BROKEN_PIPE"]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141

#: Rows read per chunk from label files (bounded memory on large inputs).
CHUNK_ROWS = 1 << 16

_SCAN_RECORD = "cobalance.scan"
_FIT_RECORD = "cobalance.fit"


class UsageError(Exception):
    """Bad usage or bad input: exit code 2, message printed as one line."""


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that partial outputs are cleaned up like on Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that raises instead of printing usage and exiting."""

    def error(self, message):  # noqa: D401 - argparse API
        raise UsageError(f"{message} (see '{self.prog} --help')")


# -- output helpers -------------------------------------------------------------------


class _Console:
    """Where the human-readable text, the JSON document and the progress bars go."""

    def __init__(self, args, stdout=None, stderr=None):
        self.json = bool(getattr(args, "json", False))
        self.quiet = bool(getattr(args, "quiet", False))
        self.stdout = stdout or sys.stdout
        self.stderr = stderr or sys.stderr

    def print(self, text: str = "") -> None:
        if not self.json and not self.quiet:
            print(text, file=self.stdout)

    def note(self, text: str) -> None:
        """A remark about what was skipped or assumed (stderr, so stdout stays clean)."""
        if not self.quiet:
            print(f"cobalance: {text}", file=self.stderr)

    def emit_json(self, doc: dict) -> None:
        if self.json:
            print(json.dumps(doc, indent=2, sort_keys=False), file=self.stdout)

    def progress(self, iterable, *, total=None, desc: str = "", unit: str = "it"):
        """Wrap ``iterable`` in a tqdm bar on stderr when tqdm is installed and stderr is a TTY."""
        if self.quiet:
            return iterable
        try:
            from tqdm.auto import tqdm
        except ImportError:
            return iterable
        # disable=None: tqdm shows the bar only when stderr is a terminal, so logs and
        # captured output stay free of carriage returns.
        return tqdm(iterable, total=total, desc=desc, unit=unit, file=self.stderr, disable=None,
                    leave=False, dynamic_ncols=True)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _record_path(path, kind: str) -> Path:
    """``table.npz`` -> ``table.scan.json``; ``plan.npz`` -> ``plan.fit.json``."""
    p = Path(path)
    stem = p.name[: -len(p.suffix)] if p.suffix else p.name
    return p.with_name(f"{stem}.{kind}.json")


def _write_record(path: Path, doc: dict) -> None:
    atomic_write_text(path, json.dumps(doc, indent=2) + "\n")


def _read_record(path: Path, fmt: str) -> Optional[dict]:
    if not path.exists():
        return None
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise UsageError(f"cannot read {path}: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != fmt:
        raise UsageError(f"{path} is not a {fmt} record")
    return doc


def _require_file(path, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{what} {str(path)!r} does not exist")
    if p.is_dir():
        raise UsageError(f"{what} {str(path)!r} is a folder, expected a file")
    return p


# -- reading labels ---------------------------------------------------------------------

_LABEL_FORMATS = ("csv", "npy", "npz", "parquet", "masks")


def _detect_format(path: Path, fmt: Optional[str]) -> str:
    if fmt:
        return fmt
    if path.is_dir():
        return "masks"
    name = path.name.lower()
    for suffix, kind in ((".csv", "csv"), (".csv.gz", "csv"), (".tsv", "csv"), (".tsv.gz", "csv"),
                         (".npy", "npy"), (".npz", "npz"), (".parquet", "parquet"), (".pq", "parquet")):
        if name.endswith(suffix):
            return kind
    raise UsageError(f"cannot tell the format of {str(path)!r} from its name; pass --format "
                     f"({', '.join(_LABEL_FORMATS)})")


def _checked_chunk(values: np.ndarray, first_row: int, names: Sequence[str], source: str) -> np.ndarray:
    """A 0/1 uint8 chunk; the first bad value is reported with its file row and column name."""
    if values.dtype == np.bool_:
        return values.view(np.uint8)
    if values.dtype.kind not in "iuf":
        # mixed or text columns: find the first cell that is not a number
        for c in range(values.shape[1]):
            col = values[:, c]
            try:
                np.asarray(col, dtype=np.float64)
            except (TypeError, ValueError):
                for r, v in enumerate(col):
                    try:
                        float(v)
                    except (TypeError, ValueError):
                        shown = "an empty cell" if str(v).strip() == "" else repr(v)
                        raise UsageError(f"{source}: row {first_row + r + 1}, column {names[c]!r}: "
                                         f"{shown} is not 0 or 1") from None
        values = np.asarray(values, dtype=np.float64)
    bad = (values != 0) & (values != 1)
    if bad.any():
        r, c = np.argwhere(bad)[0]
        v = values[r, c].item()
        if isinstance(v, float) and np.isnan(v):
            shown = "an empty cell"
        else:
            shown = repr(int(v) if isinstance(v, float) and v.is_integer() else v)
        raise UsageError(f"{source}: row {first_row + int(r) + 1}, column {names[int(c)]!r}: "
                         f"{shown} is not 0 or 1")
    return values.astype(np.uint8)


def _select_columns(names: List[str], columns: Optional[List[str]], source: str) -> List[int]:
    if not columns:
        return list(range(len(names)))
    missing = [c for c in columns if c not in names]
    if missing:
        raise UsageError(f"{source}: no column {missing[0]!r}; the columns are {', '.join(names)}")
    return [names.index(c) for c in columns]


def _csv_chunks(path: Path, delimiter: Optional[str], columns) -> Tuple[List[str], Iterator[Tuple[int, np.ndarray]]]:
    import csv
    import gzip

    opener = gzip.open if path.name.lower().endswith(".gz") else open
    if delimiter is None:
        delimiter = "\t" if ".tsv" in path.name.lower() else ","
    try:
        with opener(path, "rt", encoding="utf-8", newline="") as f:
            header = next(csv.reader(f, delimiter=delimiter), None)
    except (OSError, UnicodeDecodeError, EOFError) as exc:
        raise UsageError(f"cannot read {path} as CSV: {_one_line(exc)}") from None
    if not header:
        raise UsageError(f"{path} is empty; expected a header row of class names")
    header = [h.strip() for h in header]
    keep = _select_columns(header, columns, str(path))
    names = [header[i] for i in keep]

    def chunks():
        try:
            import pandas as pd
        except ImportError:
            pd = None
        if pd is not None:
            # all columns are read (not usecols) so that a row with too many fields is an error
            row = 0
            try:
                for frame in pd.read_csv(path, sep=delimiter, chunksize=CHUNK_ROWS, skipinitialspace=True):
                    yield row, frame.to_numpy()[:, keep]
                    row += len(frame)
            except (ValueError, OSError, UnicodeDecodeError, EOFError) as exc:
                raise UsageError(f"cannot read {path} as CSV: {_one_line(exc)}") from None
            return
        try:
            with opener(path, "rt", encoding="utf-8", newline="") as f:
                rows = csv.reader(f, delimiter=delimiter)
                next(rows)
                block, row = [], 0
                for line_no, fields in enumerate(rows, start=2):
                    if len(fields) != len(header):
                        raise UsageError(f"{path}: line {line_no} has {len(fields)} fields, the header has "
                                         f"{len(header)}")
                    block.append([fields[i].strip() for i in keep])
                    if len(block) == CHUNK_ROWS:
                        yield row, _text_block(block)
                        row += len(block)
                        block = []
                if block:
                    yield row, _text_block(block)
        except (OSError, EOFError, UnicodeDecodeError, csv.Error) as exc:  # e.g. a truncated .gz
            raise UsageError(f"cannot read {path} as CSV: {_one_line(exc)}") from None

    return names, chunks()


def _text_block(block):
    try:
        return np.array(block, dtype=np.float64)
    except ValueError:
        return np.array(block, dtype=object)


def _npy_chunks(path: Path):
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read {path} as .npy: {_one_line(exc)}") from None
    if arr.ndim != 2:
        raise UsageError(f"{path}: expected a 2-D (samples x classes) array, got shape {arr.shape}")
    return arr.shape, ((r, np.asarray(arr[r:r + CHUNK_ROWS])) for r in range(0, arr.shape[0], CHUNK_ROWS))


def _npz_labels(path: Path):
    try:
        z = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read {path} as .npz: {_one_line(exc)}") from None
    with z:
        keys = list(z.keys())
        if "format" in keys:
            raise UsageError(f"{path} is a {str(z['format'])} file, not a label matrix")
        if "labels" in keys:
            key = "labels"
        else:
            arrays = [k for k in keys if k != "class_names"]
            if len(arrays) != 1:
                raise UsageError(f"{path}: expected an array named 'labels' (or a single array), found "
                                 f"{', '.join(keys) or 'none'}")
            key = arrays[0]
        labels = np.asarray(z[key])
        names = [str(s) for s in z["class_names"]] if "class_names" in keys else None
    if labels.ndim != 2:
        raise UsageError(f"{path}: {key!r} must be 2-D (samples x classes), got shape {labels.shape}")
    return labels, names


def _parquet_chunks(path: Path, columns):
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise ImportError("reading Parquet needs pyarrow: pip install 'cobalance[cli]'") from exc
    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises its own ArrowInvalid for non-Parquet files
        raise UsageError(f"cannot read {path} as Parquet: {_one_line(exc)}") from None
    header = list(pf.schema_arrow.names)
    keep = _select_columns(header, columns, str(path))
    names = [header[i] for i in keep]

    def chunks():
        row = 0
        for batch in pf.iter_batches(batch_size=CHUNK_ROWS, columns=names):
            cols = [batch.column(i).to_numpy(zero_copy_only=False) for i in range(batch.num_columns)]
            block = np.column_stack(cols) if cols else np.zeros((batch.num_rows, 0))
            yield row, block
            row += batch.num_rows

    return names, chunks(), pf.metadata.num_rows


def _parse_names(text: Optional[str]) -> Optional[List[str]]:
    if text is None:
        return None
    names = [s.strip() for s in text.split(",")]
    if any(not s for s in names):
        raise UsageError(f"--class-names must be a comma-separated list of non-empty names, got {text!r}")
    return names


def _table_from_label_file(path: Path, fmt: str, args, console: _Console) -> Tuple[PatternTable, dict]:
    """Group a label file chunk by chunk; returns the table and what to record about it."""
    columns = _parse_names(args.columns)
    names = None
    total = None
    if fmt == "csv":
        names, chunks = _csv_chunks(path, args.delimiter, columns)
    elif fmt == "parquet":
        names, chunks, total = _parquet_chunks(path, columns)
    elif fmt == "npy":
        (total, n_classes), chunks = _npy_chunks(path)
        names = [str(i) for i in range(n_classes)]
    elif fmt == "npz":
        labels, stored = _npz_labels(path)
        names = stored or [str(i) for i in range(labels.shape[1])]
        total = labels.shape[0]
        chunks = ((r, labels[r:r + CHUNK_ROWS]) for r in range(0, total, CHUNK_ROWS))
    else:  # pragma: no cover - guarded by the caller
        raise UsageError(f"unknown label format {fmt!r}")
    if fmt in ("npy", "npz") and columns:
        raise UsageError("--columns applies to CSV and Parquet files; use --class-names to name .npy/.npz columns")
    given = _parse_names(args.class_names)
    if given is not None:
        if len(given) != len(names):
            raise UsageError(f"--class-names has {len(given)} names but {path} has {len(names)} label columns")
        names = given
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise UsageError(f"{path}: class name {dup!r} appears twice")
    if not names:
        raise UsageError(f"{path} has no label columns")
    checked = (_checked_chunk(block, row, names, str(path))
               for row, block in console.progress(chunks, desc="scan", unit="chunk",
                                                  total=None if total is None else -(-total // CHUNK_ROWS)))
    # The row count, where the format gives it, sizes the grouping once (a speed hint).
    table = PatternTable.from_chunks(checked, n_classes=len(names), class_names=names, n_samples=total)
    return table, {"columns": names}


# -- scan -------------------------------------------------------------------------------


def _presence_rows(table: PatternTable, pixel_share=None) -> List[dict]:
    counts = table.class_counts()
    presence = table.class_presence()
    rows = []
    for i, name in enumerate(table.class_names):
        row = {"name": name, "samples": int(counts[i]), "presence": float(presence[i])}
        if pixel_share is not None:
            row["pixel_share"] = float(pixel_share[i])
        rows.append(row)
    return rows


def _presence_text(table: PatternTable, pixel_share=None, unit: str = "samples") -> str:
    rows = _presence_rows(table, pixel_share)
    width = max([5] + [len(r["name"]) for r in rows])
    head = f"{'class':<{width}}  {unit:>9}  presence"
    if pixel_share is not None:
        head += "  pixel share"
    lines = [f"{table.n_samples} {unit}, {table.n_classes} classes, {table.n_patterns} patterns", "", head]
    for r in rows:
        line = f"{r['name']:<{width}}  {r['samples']:>9d}  {r['presence']:8.2%}"
        if pixel_share is not None:
            line += f"  {r['pixel_share']:11.3%}"
        lines.append(line)
    return "\n".join(lines)


def _mask_folder(path: Path, args):
    """A MaskFolder from the command line's masks options."""
    from .folders import MaskFolder

    return MaskFolder(path, **_mask_folder_options(args))


def _mask_folder_options(args) -> dict:
    options = {}
    if getattr(args, "layout", None):
        options["layout"] = args.layout
    names = _parse_names(getattr(args, "class_names", None))
    if names is not None:
        options["class_names"] = names
    for key in ("tile", "stride", "ignore_index", "min_pixels"):
        value = getattr(args, key, None)
        if value is not None:
            options[key] = value
    return options


def _mask_folder_record(folder) -> dict:
    """What rebuilds the same samples in the same order (for ``write``)."""
    return {"layout": folder.layout, "class_names": list(folder.class_names),
            "tile": None if folder.tile is None else list(folder.tile),
            "stride": None if folder.stride is None else list(folder.stride),
            "ignore_index": folder.ignore_index,
            "min_pixels": np.asarray(folder.min_pixels).tolist()}


def _cmd_scan(args, console: _Console) -> int:
    path = Path(args.input)
    if not path.exists():
        raise UsageError(f"input {args.input!r} does not exist")
    fmt = _detect_format(path, args.format)
    if fmt != "masks" and path.is_dir():
        raise UsageError(f"input {args.input!r} is a folder; --format {fmt} expects a file")
    if fmt == "masks" and not path.is_dir():
        raise UsageError(f"--format masks expects a folder, got the file {args.input!r}")
    if args.output and Path(args.output).suffix != ".npz":
        raise UsageError(f"--output must end in .npz (a pattern-table file), got {args.output!r}")
    pixel_share = None
    if fmt == "masks":
        if args.columns or args.delimiter:
            raise UsageError("--columns and --delimiter apply to label files, not masks folders")
        folder = _mask_folder(path, args)
        scan = folder.scan()
        table = scan.to_table(folder.class_names)
        pixel_share = scan.pixel_share()
        options = {"mask_folder": _mask_folder_record(folder)}
        unit = "tiles" if folder.tile is not None else "images"
    else:
        for flag in ("tile", "stride", "ignore_index", "min_pixels", "layout"):
            if getattr(args, flag) is not None:
                raise UsageError(f"--{flag.replace('_', '-')} applies to masks folders only, not {fmt} files")
        table, options = _table_from_label_file(path, fmt, args, console)
        unit = "samples"
    doc = {"command": "scan", "input": str(path), "format": fmt, "output": None,
           "n_samples": table.n_samples, "n_classes": table.n_classes, "n_patterns": table.n_patterns,
           "classes": _presence_rows(table, pixel_share)}
    if args.output:
        _save_table_with_record(table, Path(args.output), path, fmt, options)
        doc["output"] = str(args.output)
    console.print(_presence_text(table, pixel_share, unit))
    if args.output:
        console.print(f"\nwrote {args.output}")
    console.emit_json(doc)
    return EXIT_OK


# -- fit ----------------------------------------------------------------------------------

_TARGET_HELP = ("equal | sqrt | smooth=Q | max_ir=K | rare_boost | all | CLASS=FRACTION,... | "
                "F1,F2,... (one per class) | FILE.json")
#: Named targets that carry a number after '=' (not CLASS=FRACTION lists).
_TARGET_WITH_NUMBER = ("smooth=", "max_ir=")


def _parse_target(text: str, table: PatternTable):
    """The ``--target`` text as what :func:`cobalance.resolve_target` accepts, validated."""
    from .targets import resolve_target

    text = text.strip()
    spec = text
    if text.lower().endswith(".json") or (os.sep in text and "=" not in text):
        path = _require_file(text, "target file")
        try:
            with open(path, encoding="utf-8") as f:
                spec = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UsageError(f"cannot read target file {text!r}: {_one_line(exc)}") from None
        if not isinstance(spec, (str, list, dict)):
            raise UsageError(f"target file {text!r} must hold a list of fractions, an object "
                             "{class: fraction} or a target name (equal, sqrt, rare_boost, all, ...)")
    elif text.startswith(_TARGET_WITH_NUMBER) and "," not in text:
        spec = text
    elif "=" in text:
        spec = {}
        for item in text.split(","):
            name, sep, value = item.partition("=")
            name, value = name.strip(), value.strip()
            if not sep or not name:
                raise UsageError(f"--target: expected CLASS=FRACTION, got {item.strip()!r}")
            if name in spec:
                raise UsageError(f"--target: class {name!r} is given twice")
            spec[name] = _fraction(value, f"--target {name}")
    elif text not in ("equal", "uniform", "sqrt", "rare_boost", "all"):
        try:
            spec = [float(v) for v in text.split(",")]
        except ValueError:
            raise UsageError(f"--target must be {_TARGET_HELP}; got {text!r}") from None
    if isinstance(spec, dict):
        unknown = [k for k in spec if str(k) not in table.class_names]
        if unknown:
            raise UsageError(f"--target: unknown class {str(unknown[0])!r}; the classes are "
                             f"{', '.join(table.class_names)}")
        fractions = spec.items()
    elif isinstance(spec, list):
        if len(spec) != table.n_classes:
            raise UsageError(f"--target lists {len(spec)} fractions, the table has {table.n_classes} classes "
                             f"({', '.join(table.class_names)})")
        fractions = zip(table.class_names, spec)
    else:
        fractions = ()
    for name, v in fractions:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= float(v) <= 1.0:
            raise UsageError(f"--target: the fraction of {name!r} must be in [0, 1], got {v!r}")
    try:
        return spec, resolve_target(spec, table)
    except ValueError as exc:
        raise UsageError(f"--target: {_one_line(exc)}") from None


def _fraction(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"{what}: expected a fraction in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:  # also rejects nan
        raise UsageError(f"{what}: the fraction must be in [0, 1], got {text}")
    return value


def _load_table(path, what: str = "table") -> PatternTable:
    p = _require_file(path, what)
    try:
        table = PatternTable.load(p)
    except (OSError, KeyError, EOFError, ValueError) as exc:
        raise UsageError(f"cannot read {what} {str(path)!r}: {_one_line(exc)}") from None
    if not table.has_inverse:
        raise UsageError(f"{what} {str(path)!r} has no per-sample index (it was saved with keep_inverse=False)")
    return table


def _load_plan(path):
    from .plan import Plan

    p = _require_file(path, "plan")
    try:
        return Plan.load(p)
    except (OSError, KeyError, EOFError, json.JSONDecodeError, ValueError) as exc:
        raise UsageError(f"cannot read plan {str(path)!r}: {_one_line(exc)}") from None


def _balancer_options(args) -> dict:
    options = {"objective": args.objective, "regularizer": args.regularizer, "gamma": args.gamma,
               "solver": args.solver, "lr": args.lr, "max_iter": args.max_iter, "tol": args.tol,
               "init": args.init, "max_copies": args.max_copies, "budget": args.budget,
               "allow_undersampling": args.allow_undersampling, "n_samples_out": args.n_samples_out,
               "random_state": args.seed}
    return options


def _fit(table: PatternTable, target_spec, options: dict, console: _Console):
    """Fit a Balancer; feasibility warnings become notes on stderr."""
    import warnings

    from .balancer import Balancer

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        balancer = Balancer(target=target_spec, **options).fit(table)
    for w in caught:
        console.note(f"warning: {_one_line(w.message)}")
    return balancer


def _write_report_files(report, args, console: _Console, written: dict) -> None:
    if getattr(args, "markdown", None):
        atomic_write_text(args.markdown, report.to_markdown())
        written["markdown"] = str(args.markdown)
    if getattr(args, "report_json", None):
        atomic_write_text(args.report_json, json.dumps(report.to_dict(), indent=2) + "\n")
        written["report_json"] = str(args.report_json)
    if getattr(args, "png", None):
        report.save_png(args.png)
        written["png"] = str(args.png)


def _require_png_support(args) -> None:
    """Fail before the work, not after it, when a chart is asked for without matplotlib."""
    if getattr(args, "png", None):
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ImportError("--png needs matplotlib: pip install 'cobalance[plot]'") from None


def _save_table_with_record(table: PatternTable, out: Path, source: Path, fmt: str, options: dict) -> None:
    """The table, then its scan record (source, format, scan options, the table's hash)."""
    table.save(out)
    _write_record(_record_path(out, "scan"), {
        "format": _SCAN_RECORD, "version": 1, "cobalance": __version__, "source": str(Path(source).resolve()),
        "source_format": fmt, "table_sha256": _sha256(out), **options})


def _save_plan_with_record(plan, out: Path, table: PatternTable, table_path: Path, target_spec, target,
                           options: dict, report) -> dict:
    """The plan first, then the record naming it: a record always describes a whole plan."""
    plan.save(out)
    record = {
        "format": _FIT_RECORD, "version": 1, "cobalance": __version__,
        "plan_sha256": _sha256(out),
        "table": {"path": str(table_path.resolve()),
                  "relative_path": os.path.relpath(table_path.resolve(), out.resolve().parent),
                  "sha256": _sha256(table_path), "n_samples": table.n_samples,
                  "n_patterns": table.n_patterns},
        "class_names": table.class_names,
        "target_spec": target_spec,
        "target": [float(v) for v in target],
        "balancer": options,
        "report": report.to_dict(),
    }
    _write_record(_record_path(out, "fit"), record)
    return record


def _plan_path(text: str) -> Path:
    p = Path(text)
    if p.suffix not in (".npz", ".json"):
        raise UsageError(f"--output must end in .npz or .json (a plan file), got {text!r}")
    return p


def _cmd_fit(args, console: _Console) -> int:
    out = _plan_path(args.output)
    _require_png_support(args)
    table_path = Path(args.table)
    table = _load_table(table_path)
    target_spec, target = _parse_target(args.target, table)
    options = _balancer_options(args)
    balancer = _fit(table, target_spec, options, console)
    plan, report = balancer.plan_, balancer.report_
    record = _save_plan_with_record(plan, out, table, table_path, target_spec, target, options, report)
    written = {"plan": str(out), "record": str(_record_path(out, "fit"))}
    _write_report_files(report, args, console, written)
    console.print(report.to_markdown().rstrip("\n"))
    console.print(f"\nwrote {', '.join(written.values())}")
    console.emit_json({"command": "fit", "table": str(table_path), "outputs": written,
                       "target": record["target"], "balancer": options, "report": report.to_dict()})
    return EXIT_OK


# -- report -----------------------------------------------------------------------------


def _fit_record_for(plan_path: Path, *, required: bool, hint: str = "pass --table") -> Optional[dict]:
    record_path = _record_path(plan_path, "fit")
    record = _read_record(record_path, _FIT_RECORD)
    if record is None:
        if required:
            raise UsageError(f"no fit record {record_path} beside the plan; {hint}")
        return None
    if record.get("plan_sha256") != _sha256(plan_path):
        raise UsageError(f"{record_path} describes another plan (the plan file changed since `fit`); {hint}")
    return record


def _table_for_plan(plan_path: Path, record: Optional[dict], override) -> Tuple[PatternTable, Path]:
    if override:
        return _load_table(override), Path(override)
    assert record is not None
    info = record["table"]
    candidates = [plan_path.resolve().parent / info["relative_path"], Path(info["path"])]
    for candidate in candidates:
        if candidate.is_file():
            if _sha256(candidate) != info["sha256"]:
                raise UsageError(f"the table {candidate} changed since the plan was fitted (SHA-256 differs); "
                                 "pass --table to use it anyway")
            return _load_table(candidate), candidate
    raise UsageError(f"the plan's table is not at {candidates[0]} nor {candidates[1]}; pass --table")


def _cmd_report(args, console: _Console) -> int:
    from .report import Report

    plan_path = _require_file(args.plan, "plan")
    _require_png_support(args)
    plan = _load_plan(plan_path)
    # With both --table and --target the record is not needed (nor checked).
    record = None if (args.table and args.target) else _fit_record_for(plan_path, required=True,
                                                                          hint="pass --table and --target")
    table, table_path = _table_for_plan(plan_path, record, args.table)
    if plan.n_samples != table.n_samples:
        raise UsageError(f"the plan has {plan.n_samples} samples but the table {table_path} has {table.n_samples}")
    if args.target:
        _, target = _parse_target(args.target, table)
    else:
        target = np.asarray(record["target"], dtype=np.float64)
        if target.shape != (table.n_classes,):
            raise UsageError(f"the fit record's target has {target.size} classes, the table {table.n_classes}")
    extra = dict(record["report"].get("extra", {})) if record and not args.target else None
    report = Report.from_plan(table, plan, target, extra=extra)
    written = {}
    _write_report_files(report, args, console, written)
    console.print(report.to_markdown().rstrip("\n"))
    if written:
        console.print(f"\nwrote {', '.join(written.values())}")
    console.emit_json({"command": "report", "plan": str(plan_path), "table": str(table_path),
                       "outputs": written, "report": report.to_dict()})
    return EXIT_OK


# -- demo -------------------------------------------------------------------------------


def _cmd_demo(args, console: _Console) -> int:
    from .folders import MaskFolder, sample_path

    root = sample_path()
    folder = MaskFolder(root, tile=args.tile, stride=args.stride, min_pixels=args.min_pixels)
    whole = MaskFolder(root)
    scan = folder.scan()
    table = scan.to_table(folder.class_names)
    images = whole.scan().to_table(whole.class_names)
    tile_text = f"{folder.tile[0]}x{folder.tile[1]}"
    console.print(f"IDRiD sample: {whole.n_images} fundus images ({root})")
    pixels = "pixel" if args.min_pixels == 1 else "pixels"
    console.print(f"tiles of {tile_text} pixels, a class present from {args.min_pixels} {pixels} on\n")
    names = table.class_names
    width = max(5, *(len(n) for n in names))
    console.print(f"{'class':<{width}}  images %  tiles %  pixel share %")
    img_presence, tile_presence, share = images.class_presence(), table.class_presence(), scan.pixel_share()
    for i, n in enumerate(names):
        console.print(f"{n:<{width}}  {100 * img_presence[i]:8.1f}  {100 * tile_presence[i]:7.1f}  "
                      f"{100 * share[i]:13.3f}")
    console.print(f"\n{table.n_samples} tiles, {table.n_patterns} class-presence patterns")

    target_spec, target = _parse_target(args.target, table)
    options = _balancer_options(args)
    balancer = _fit(table, target_spec, options, console)
    plan, report = balancer.plan_, balancer.report_
    console.print(f"\nbalanced towards target {args.target!r}:\n")
    console.print(report.to_markdown().rstrip("\n"))

    written = {}
    skipped = None
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        table_path, plan_path = out / "table.npz", out / "plan.npz"
        _save_table_with_record(table, table_path, root, "masks", {"mask_folder": _mask_folder_record(folder)})
        _save_plan_with_record(plan, plan_path, table, table_path, target_spec, target, options, report)
        written.update(table=str(table_path), plan=str(plan_path))
        atomic_write_text(out / "report.md", report.to_markdown())
        atomic_write_text(out / "report.json", json.dumps(report.to_dict(), indent=2) + "\n")
        written.update(markdown=str(out / "report.md"), report_json=str(out / "report.json"))
        try:
            report.save_png(out / "report.png")
            written["png"] = str(out / "report.png")
        except ImportError:
            console.note("matplotlib is not installed: no report.png (pip install 'cobalance[plot]')")
        skipped = _demo_write_dataset(folder, plan, out / "balanced", args, console, written)
        console.print(f"\nwrote {len(written)} outputs under {out}")
    console.emit_json({
        "command": "demo", "source": str(root), "n_images": whole.n_images, "n_tiles": table.n_samples,
        "n_patterns": table.n_patterns, "tile": list(folder.tile), "min_pixels": args.min_pixels,
        "classes": [{"name": n, "image_presence": float(img_presence[i]), "tile_presence": float(tile_presence[i]),
                     "pixel_share": float(share[i])} for i, n in enumerate(names)],
        "report": report.to_dict(), "outputs": written, "skipped": skipped})
    return EXIT_OK


def _demo_write_dataset(folder, plan, out_dir: Path, args, console: _Console, written: dict):
    """The balanced dataset folder; returns why it was skipped, or None."""
    try:
        import torch  # noqa: F401  (the writer's augmentations run on torch)
        from .segmentation.writer import write_balanced
    except ImportError as exc:
        why = f"torch is not installed ({_one_line(exc)}): skipped writing the balanced dataset"
        console.note(why + " (pip install 'cobalance[torch]')")
        return why
    _write_dataset(write_balanced, folder, plan, out_dir, args, console)
    written["balanced"] = str(out_dir)
    return None


# -- write ------------------------------------------------------------------------------


def _scan_record_of_plan(plan_path: Path, table_override) -> Optional[dict]:
    """The scan record of the plan's table: it says how the samples were cut."""
    if table_override:
        table_path = Path(table_override)
    elif (record := _fit_record_for(plan_path, required=False)) is not None:
        _, table_path = _table_for_plan(plan_path, record, None)
    else:
        return None
    return _read_record(_record_path(table_path, "scan"), _SCAN_RECORD)


def _write_dataset(write_balanced, folder, plan, out_dir: Path, args, console: _Console):
    """Run the writer; a bar on stderr when it is a terminal and not --quiet."""
    show = not console.quiet and console.stderr.isatty()
    try:
        return write_balanced(folder, plan, out_dir, augment=True if args.augment else None, seed=args.seed,
                              progress=show)
    except KeyboardInterrupt:
        # The atomic writers remove their temporary file when the exception passes
        # through them, but a signal can also land between creating the file and
        # entering that cleanup; the folder is this job's alone, so sweep it.
        for tmp in out_dir.rglob(".tmp-*"):
            with contextlib.suppress(OSError):
                tmp.unlink()
        console.note(f"interrupted: {out_dir} holds the complete items so far and no manifest; "
                     "rerun the same command to finish it")
        raise


def _cmd_write(args, console: _Console) -> int:
    try:
        import torch  # noqa: F401
        from .segmentation.writer import write_balanced
    except ImportError as exc:
        raise ImportError(f"`cobalance write` needs torch: pip install 'cobalance[torch]' ({_one_line(exc)})") \
            from None
    plan_path = _require_file(args.plan, "plan")
    plan = _load_plan(plan_path)
    dataset = Path(args.dataset)
    if not dataset.is_dir():
        raise UsageError(f"dataset {args.dataset!r} is not a folder")
    scan_record = _scan_record_of_plan(plan_path, args.table)
    options = {}
    if scan_record is not None and scan_record.get("source_format") == "masks":
        recorded = dict(scan_record["mask_folder"])
        for key in ("tile", "stride"):
            if recorded.get(key) is not None:
                recorded[key] = tuple(recorded[key])
        options.update({k: v for k, v in recorded.items() if v is not None})
        if Path(scan_record["source"]).resolve() != dataset.resolve():
            console.note(f"note: the plan's table was scanned from {scan_record['source']}, writing from {dataset}")
    options.update(_mask_folder_options(args))  # the command line overrides the record
    from .folders import MaskFolder

    folder = MaskFolder(dataset, **options)
    if len(folder) != plan.n_samples:
        cut = f"tiles of {folder.tile[0]}x{folder.tile[1]}" if folder.tile else "whole images"
        raise UsageError(f"the plan has {plan.n_samples} samples but {dataset} has {len(folder)} ({cut}); "
                         "pass the --tile/--stride the table was scanned with")
    result = _write_dataset(write_balanced, folder, plan, Path(args.out_dir), args, console)
    console.print(f"wrote {result.written} items ({result.skipped} already complete) to {args.out_dir}; "
                  f"manifest {result.manifest}")
    console.emit_json({"command": "write", "plan": str(plan_path), "dataset": str(dataset),
                       "out_dir": str(args.out_dir), "manifest": str(result.manifest),
                       "written": result.written, "skipped": result.skipped, "n_items": plan.n_samples_out})
    return EXIT_OK


# -- parser -----------------------------------------------------------------------------

_MAIN_EPILOG = """\
examples:
  cobalance demo                                   the whole path on the shipped IDRiD sample
  cobalance scan labels.csv -o table.npz           CSV with a header of class names
  cobalance fit table.npz --target rare_boost -o plan.npz
  cobalance report plan.npz --png chart.png
  cobalance write plan.npz masks/ balanced/

exit codes: 0 ok, 1 failure (missing dependency, unexpected error), 2 bad usage or
bad input, 130 interrupted (Ctrl-C), 143 terminated (SIGTERM), 141 stdout closed early.
Errors are one line on stderr; set COBALANCE_DEBUG=1 for a traceback. Outputs are written to a temporary
name and renamed, so an interrupted command leaves no partial file.
"""

_SCAN_EPILOG = """\
examples:
  cobalance scan labels.csv.gz -o table.npz
  cobalance scan labels.parquet --columns cat,dog,bird -o table.npz
  cobalance scan labels.npy --class-names cat,dog,bird --json
  cobalance scan masks/ --tile 256 --stride 256 --min-pixels 10 -o tiles.npz

Label files hold one row per sample and one 0/1 column per class: CSV (header of
class names; .csv, .csv.gz, .tsv), .npy (2-D), .npz (array 'labels' and optional
'class_names'), Parquet. A folder is scanned as masks (the layouts of
cobalance.folders.MaskFolder); --tile cuts every image into tiles, each a sample.
With -o, the table is saved (.npz) with a side record TABLE.scan.json naming the
source and the scan options.
"""


_FIT_EPILOG = """\
examples:
  cobalance fit table.npz -o plan.npz                     # equal presence, +25 %, nothing dropped
  cobalance fit table.npz --target max_ir=10 --budget 0.5 -o plan.npz
  cobalance fit table.npz --target rare_boost --objective fraction --regularizer proportions \
      --budget none --allow-undersampling --max-copies 50 -o plan.npz    # the method paper's setting
  cobalance fit table.npz --target SE=0.5,OD=0.4 -o plan.npz --markdown report.md
  cobalance fit table.npz --target target.json --objective fraction --solver exact -o plan.json

Targets: 'equal' (alias 'uniform': every class at the same presence, keeping the mean
number of labels per sample), 'sqrt' / 'smooth=Q' (between the data and equal, d
proportional to presence**Q), 'max_ir=K' (every class at least 1/K of the most
frequent), 'rare_boost' (classes under 20 % presence to 0.9, the others kept), 'all'
(every class at 1), CLASS=FRACTION,... (the listed classes; the others kept), one
fraction per class, or a JSON file with a list, an object {class: fraction} or a
name. Besides PLAN, a record PLAN.fit.json is written: the table's path
and SHA-256, the resolved target, the options and the report; `report` and `write`
use it to find the table.
"""

_REPORT_EPILOG = """\
examples:
  cobalance report plan.npz
  cobalance report plan.npz --png chart.png --markdown report.md
  cobalance report plan.npz --table table.npz --target equal --json

The table and the target come from PLAN.fit.json (written by `fit`) unless given.
"""

_WRITE_EPILOG = """\
examples:
  cobalance write plan.npz masks/ balanced/
  cobalance write plan.npz masks/ balanced/ --augment --seed 7

The tiling the table was scanned with is read from the table's record
(TABLE.scan.json); --tile/--stride/--layout override it. Every file is written to
a temporary name and renamed, the manifest last: an interrupted run leaves only
complete items and no manifest, and the same command resumes it.
"""

_DEMO_EPILOG = """\
examples:
  cobalance demo
  cobalance demo --tile 64 --target SE=0.5 --out demo/
  cobalance demo --json --quiet
"""


def _common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    out = common.add_argument_group("output")
    out.add_argument("--json", action="store_true", help="print one JSON document on stdout instead of text")
    out.add_argument("-q", "--quiet", action="store_true",
                     help="print nothing but errors (and the --json document when asked for)")
    return common


def _argument_type(convert: Callable[[str], Any], accepts: Callable[[Any], bool], expected: str):
    """An argparse ``type``: ``convert(text)``, refused as "expected <expected>" unless ``accepts`` it."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not accepts(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


_int = _argument_type(int, lambda value: True, "an integer")
_positive_int = _argument_type(int, lambda value: value >= 1, "a positive integer")
_non_negative_int = _argument_type(int, lambda value: value >= 0, "a non-negative integer")
_positive_float = _argument_type(float, lambda value: value > 0 and np.isfinite(value), "a positive number")
_non_negative_float = _argument_type(float, lambda value: value >= 0 and np.isfinite(value), "a non-negative number")
_copies_bound = _argument_type(float, lambda value: value >= 1 and np.isfinite(value), "a number >= 1 or 'none'")


def _add_mask_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("masks folders")
    g.add_argument("--layout", help="folder layout (see cobalance.folders.MaskFolder); default: detected")
    g.add_argument("--tile", type=_positive_int, metavar="PIXELS", help="cut images into square tiles of this size")
    g.add_argument("--stride", type=_positive_int, metavar="PIXELS", help="tile stride (default: the tile size)")
    g.add_argument("--ignore-index", type=_int, metavar="LABEL", help="label value to ignore in label maps")
    g.add_argument("--min-pixels", type=_non_negative_int, metavar="N",
                   help="a class is present in a tile when it covers at least N pixels")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for documentation tools and tests)."""
    parser = _Parser(prog="cobalance", description="Balance multi-label and segmentation datasets by "
                     "class-presence patterns.", epilog=_MAIN_EPILOG,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"cobalance {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    common = _common_options()

    def add_command(name: str, **texts) -> argparse.ArgumentParser:
        # every command takes the output options and keeps its epilog's line breaks
        return sub.add_parser(name, parents=[common], formatter_class=argparse.RawDescriptionHelpFormatter, **texts)

    p = add_command("scan", help="labels or masks -> pattern table",
                    description="Group a dataset's samples by class-presence pattern and print the "
                    "per-class presence.", epilog=_SCAN_EPILOG)
    p.add_argument("input", help="label file (CSV, .npy, .npz, Parquet) or masks folder")
    p.add_argument("-o", "--output", metavar="TABLE.npz", help="save the pattern table here")
    p.add_argument("--format", choices=_LABEL_FORMATS, help="input format (default: from the name)")
    p.add_argument("--class-names", metavar="A,B,...", help="class names, in column order")
    p.add_argument("--columns", metavar="A,B,...", help="CSV/Parquet: use only these columns, in this order")
    p.add_argument("--delimiter", metavar="CHAR", help="CSV field separator (default ',' or tab for .tsv)")
    _add_mask_options(p)
    p.set_defaults(handler=_cmd_scan)

    p = add_command("fit", help="pattern table + target -> plan and report",
                    description="Find per-pattern repeat counts that move class presence towards a "
                    "target; write the integer plan and print the report.", epilog=_FIT_EPILOG)
    p.add_argument("table", help="pattern table (.npz from `cobalance scan`)")
    p.add_argument("--target", default="equal", metavar="TARGET", help=_TARGET_HELP + " (default equal)")
    p.add_argument("-o", "--output", required=True, metavar="PLAN.npz", help="plan file (.npz or .json)")
    _add_balancer_options(p)
    _add_report_outputs(p)
    p.set_defaults(handler=_cmd_fit)

    p = add_command("report", help="plan -> markdown table and PNG chart",
                    description="Per-class presence before / target / after a plan.", epilog=_REPORT_EPILOG)
    p.add_argument("plan", help="plan file from `cobalance fit`")
    p.add_argument("--table", help="pattern table (default: the one recorded in PLAN.fit.json)")
    p.add_argument("--target", metavar="TARGET", help="target to compare with (default: the fitted one); "
                   + _TARGET_HELP)
    _add_report_outputs(p)
    p.set_defaults(handler=_cmd_report)

    p = add_command("write", help="plan + dataset folder -> balanced dataset folder",
                    description="Write the balanced dataset of a plan as files, in the source's layout, "
                    "with a manifest. Needs torch.", epilog=_WRITE_EPILOG)
    p.add_argument("plan", help="plan file from `cobalance fit`")
    p.add_argument("dataset", help="the masks folder the table was scanned from")
    p.add_argument("out_dir", help="output folder: missing, empty, or an interrupted run of the same job")
    p.add_argument("--table", help="pattern table (default: the one recorded in PLAN.fit.json)")
    p.add_argument("--augment", action="store_true", help="augment the duplicates (kornia flips and elastic)")
    p.add_argument("--seed", type=_non_negative_int, default=0, help="augmentation seed (default 0)")
    p.add_argument("--class-names", metavar="A,B,...", help=argparse.SUPPRESS)
    _add_mask_options(p)
    p.set_defaults(handler=_cmd_write)

    p = add_command("demo", help="the whole path on the shipped IDRiD sample",
                    description="Scan the IDRiD sample shipped with cobalance into tiles, print the "
                    "per-class presence and pixel share, balance, and print the report.",
                    epilog=_DEMO_EPILOG)
    p.add_argument("--out", metavar="DIR", help="also write table, plan, reports, chart and (with torch) the "
                   "balanced tiles here")
    p.add_argument("--tile", type=_positive_int, default=128, metavar="PIXELS", help="tile size (default 128)")
    p.add_argument("--stride", type=_positive_int, metavar="PIXELS", help="tile stride (default: the tile size)")
    p.add_argument("--min-pixels", type=_non_negative_int, default=1, metavar="N",
                   help="a class is present in a tile from N pixels on (default 1)")
    p.add_argument("--target", default="equal", metavar="TARGET", help=_TARGET_HELP + " (default equal)")
    p.add_argument("--augment", action="store_true", help="augment the duplicates when writing")
    _add_balancer_options(p)
    p.set_defaults(handler=_cmd_demo)

    from .training.experiment import add_experiment_parser  # numpy-only at import; torch when run

    add_experiment_parser(sub)
    return parser


def _budget(text: str):
    if text.strip().lower() == "none":
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > -1 or 'none', got {text!r}") from None
    if not (value > -1.0) or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number > -1 or 'none', got {text!r}")
    return value


def _add_balancer_options(p: argparse.ArgumentParser) -> None:
    import inspect

    from .balancer import INITS, OBJECTIVES, REGULARIZERS, SOLVERS, Balancer

    # The defaults are the Balancer's own, read from its signature so the two never drift.
    default = {k: v.default for k, v in inspect.signature(Balancer.__init__).parameters.items()}
    g = p.add_argument_group("balancer (see cobalance.Balancer)")
    g.add_argument("--objective", choices=OBJECTIVES, default=default["objective"], help="(default %(default)s)")
    g.add_argument("--regularizer", choices=REGULARIZERS, default=default["regularizer"],
                   help="(default %(default)s)")
    g.add_argument("--gamma", type=_non_negative_float, default=default["gamma"],
                   help="regularizer weight (default 1.2 for ess, 1e-3 for the others)")
    g.add_argument("--solver", choices=SOLVERS, default=default["solver"], help="(default %(default)s)")
    g.add_argument("--lr", type=_positive_float, default=default["lr"], help="Adam step (default %(default)g)")
    g.add_argument("--max-iter", type=_positive_int, default=default["max_iter"],
                   help="solver steps (default 5000 for pg, 2000 for adam)")
    g.add_argument("--tol", type=_non_negative_float, default=default["tol"],
                   help="relative loss change that stops the solver (default %(default)g)")
    g.add_argument("--init", choices=INITS, default=default["init"], help="(default %(default)s)")
    g.add_argument("--max-copies", type=_max_copies, default=default["max_copies"], metavar="X",
                   help="at most X copies per sample (default %(default)s; 'none' for no cap)")
    g.add_argument("--budget", type=_budget, default=default["budget"], metavar="B",
                   help="added samples as a share of the original size: the balanced set has (1 + B) N samples "
                        "(default %(default)s; 'none' for the method paper's size rules)")
    g.add_argument("--allow-undersampling", action="store_true",
                   help="let patterns lose samples (default: no sample is dropped)")
    g.add_argument("--no-undersampling", action="store_false", dest="allow_undersampling",
                   help="never drop a sample (the default)")
    g.add_argument("--n-samples-out", type=_positive_int, metavar="N",
                   help="size of the balanced set (overrides --budget)")
    g.add_argument("--seed", type=_non_negative_int, default=0,
                   help="seeds which samples get a pattern's remainder copies (default 0)")


def _add_report_outputs(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("report files")
    g.add_argument("--markdown", metavar="FILE.md", help="write the report as Markdown")
    g.add_argument("--report-json", metavar="FILE.json", help="write the report as JSON")
    g.add_argument("--png", metavar="FILE.png", help="write a bar chart (needs matplotlib)")


def _max_copies(text: str) -> Optional[float]:
    return None if text.lower() == "none" else _copies_bound(text)


# -- entry point ------------------------------------------------------------------------


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the exit code (see the module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["experiment", "multilabel"]:
        # the classification study parses its own options (cobalance.multilabel_study)
        from . import multilabel_study

        def run():
            return multilabel_study.main(argv[2:])
    else:
        parser = build_parser()
        try:
            args = parser.parse_args(argv)
        except UsageError as exc:
            print(f"cobalance: error: {_one_line(exc)}", file=sys.stderr)
            return EXIT_USAGE
        except SystemExit as exc:  # --help and --version exit through argparse
            return int(exc.code or 0)
        if getattr(args, "handler", None) is None:
            parser.print_help(sys.stderr)
            return EXIT_USAGE
        console = _Console(args)

        def run():
            return args.handler(args, console)
    debug = os.environ.get("COBALANCE_DEBUG", "") not in ("", "0")
    with _terminate_as_interrupt():
        try:
            code = run()
            sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
            return code
        except SystemExit as exc:  # the study's argparse: --help, or a usage error (exit 2)
            return int(exc.code or 0)
        except BrokenPipeError:
            # stdout was closed early (e.g. piped into `head`): nothing left to tell anyone
            with contextlib.suppress(OSError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return EXIT_BROKEN_PIPE
        except _Terminated as exc:
            print("cobalance: terminated", file=sys.stderr)
            return 128 + exc.signum
        except KeyboardInterrupt:
            print("cobalance: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
        except (UsageError, ValueError, FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
            if debug:
                raise
            print(f"cobalance: error: {_one_line(exc)}", file=sys.stderr)
            return EXIT_USAGE
        except ImportError as exc:
            if debug:
                raise
            print(f"cobalance: error: {_one_line(exc)}", file=sys.stderr)
            return EXIT_FAILURE
        except Exception as exc:  # noqa: BLE001 - the command line reports, never dumps a traceback
            if debug:
                raise
            print(f"cobalance: error: {type(exc).__name__}: {_one_line(exc)} "
                  "(set COBALANCE_DEBUG=1 for a traceback)", file=sys.stderr)
            return EXIT_FAILURE


@contextlib.contextmanager
def _terminate_as_interrupt():
    """Turn SIGTERM into an exception while a command runs (main thread only).

    The default SIGTERM action ends the process at once, leaving temporary files;
    as an exception it unwinds through the atomic writers, which remove them.
    """
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise _Terminated(signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
