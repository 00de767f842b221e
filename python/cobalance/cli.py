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
130
    Interrupted (Ctrl-C); no partial output file is left behind.

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
import textwrap
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np

from ._atomic import atomic_write_text
from ._version import __version__
from .patterns import PatternTable

__all__ = ["main", "build_parser", "EXIT_OK", "EXIT_FAILURE", "EXIT_USAGE", "EXIT_INTERRUPTED"]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

#: Rows read per chunk from label files (bounded memory on large inputs).
CHUNK_ROWS = 1 << 16

_SCAN_RECORD = "cobalance.scan"
_FIT_RECORD = "cobalance.fit"


class UsageError(Exception):
    """Bad usage or bad input: exit code 2, message printed as one line."""


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
    return p.with_name(p.name[: -len(p.suffix)] if p.suffix else p.name).with_suffix(f".{kind}.json")


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
                        raise UsageError(f"{source}: row {first_row + r + 1}, column {names[c]!r}: "
                                         f"{v!r} is not 0 or 1") from None
        values = np.asarray(values, dtype=np.float64)
    bad = (values != 0) & (values != 1)
    if bad.any():
        r, c = np.argwhere(bad)[0]
        v = values[r, c]
        shown = "an empty cell" if isinstance(v, float) and np.isnan(v) else repr(v.item())
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
    return arr.shape[1], ((r, np.asarray(arr[r:r + CHUNK_ROWS])) for r in range(0, arr.shape[0], CHUNK_ROWS))


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
        n_classes, chunks = _npy_chunks(path)
        names = [str(i) for i in range(n_classes)]
    elif fmt == "npz":
        labels, stored = _npz_labels(path)
        names = stored or [str(i) for i in range(labels.shape[1])]
        chunks = ((r, labels[r:r + CHUNK_ROWS]) for r in range(0, labels.shape[0], CHUNK_ROWS))
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
    table = PatternTable.from_chunks(checked, n_classes=len(names), class_names=names)
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


def _scan_masks(path: Path, args, console: _Console):
    """A masks folder -> (table, pixel share, record options); needs cobalance.folders."""
    try:
        from .folders import MaskFolder
    except ImportError as exc:
        raise ImportError(f"scanning a masks folder needs cobalance.folders ({_one_line(exc)})") from exc
    folder = MaskFolder(path, **_mask_folder_options(args))
    scan = folder.scan(progress=console.progress)
    table = scan.to_table()
    return table, scan, {"mask_folder": _mask_folder_record(args, table.class_names)}


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


def _mask_folder_record(args, class_names) -> dict:
    options = _mask_folder_options(args)
    options["class_names"] = list(class_names)
    return options


def _cmd_scan(args, console: _Console) -> int:
    path = Path(args.input)
    if not path.exists():
        raise UsageError(f"input {args.input!r} does not exist")
    fmt = _detect_format(path, args.format)
    if fmt != "masks" and path.is_dir():
        raise UsageError(f"input {args.input!r} is a folder; --format {fmt} expects a file")
    if fmt == "masks" and not path.is_dir():
        raise UsageError(f"--format masks expects a folder, got the file {args.input!r}")
    pixel_share = None
    if fmt == "masks":
        table, scan, options = _scan_masks(path, args, console)
        pixel_share = scan.pixel_share()
        unit = "tiles" if args.tile is not None else "images"
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
        out = Path(args.output)
        if out.suffix != ".npz":
            raise UsageError(f"--output must end in .npz (a pattern-table file), got {args.output!r}")
        table.save(out)
        record = {"format": _SCAN_RECORD, "version": 1, "cobalance": __version__, "source": str(path.resolve()),
                  "source_format": fmt, "table_sha256": _sha256(out), **options}
        _write_record(_record_path(out, "scan"), record)
        doc["output"] = str(out)
    console.print(_presence_text(table, pixel_share, unit))
    if args.output:
        console.print(f"\nwrote {args.output}")
    console.emit_json(doc)
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
bad input, 130 interrupted. Errors are one line on stderr; set COBALANCE_DEBUG=1 for
a traceback.
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


def _common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    out = common.add_argument_group("output")
    out.add_argument("--json", action="store_true", help="print one JSON document on stdout instead of text")
    out.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    return common


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


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

    p = sub.add_parser("scan", parents=[common], help="labels or masks -> pattern table",
                       description="Group a dataset's samples by class-presence pattern and print the "
                       "per-class presence.", epilog=_SCAN_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", help="label file (CSV, .npy, .npz, Parquet) or masks folder")
    p.add_argument("-o", "--output", metavar="TABLE.npz", help="save the pattern table here")
    p.add_argument("--format", choices=_LABEL_FORMATS, help="input format (default: from the name)")
    p.add_argument("--class-names", metavar="A,B,...", help="class names, in column order")
    p.add_argument("--columns", metavar="A,B,...", help="CSV/Parquet: use only these columns, in this order")
    p.add_argument("--delimiter", metavar="CHAR", help="CSV field separator (default ',' or tab for .tsv)")
    _add_mask_options(p)
    p.set_defaults(handler=_cmd_scan)

    return parser


# -- entry point ------------------------------------------------------------------------


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the exit code (see the module docstring)."""
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
    debug = os.environ.get("COBALANCE_DEBUG", "") not in ("", "0")
    try:
        return args.handler(args, console)
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
        print(f"cobalance: error: {type(exc).__name__}: {_one_line(exc)} (set COBALANCE_DEBUG=1 for a traceback)",
              file=sys.stderr)
        return EXIT_FAILURE
