"""The ``cobalance`` command line: options, parsing and the one error handling of every command.

Subcommands follow the library's data flow, each reading the previous one's file::

    cobalance scan labels.csv -o table.npz              # labels or masks -> pattern table
    cobalance fit table.npz --target rare_boost -o plan.npz   # table + target -> plan
    cobalance report plan.npz --png chart.png            # plan -> markdown table, PNG chart
    cobalance write plan.npz masks/ balanced/            # plan + dataset -> balanced folder
    cobalance demo                                       # the whole path on the shipped sample

=====================  ============================================================
module                 holds
=====================  ============================================================
cobalance.cli          the parser, ``main`` (exit codes, errors, signals)
_cli_commands          what each subcommand does (``cmd_scan``, ``cmd_fit``, ...)
_cli_inputs            reading tables, plans, targets and where they came from
_cli_console           the usage error, the console (text, JSON, progress bars)
cobalance.labels       the label-file reader ``scan`` uses (a library feature)
_side_records          side records of earlier versions; outputs never replace inputs
=====================  ============================================================

Exit codes
----------
0
    Success.
1
    Failure that is not the input's fault (an optional dependency missing, disk full,
    an unexpected error). Set ``COBALANCE_DEBUG=1`` for a traceback.
2
    Bad usage or bad input: unknown option, missing or unreadable file (an image or
    mask that cannot be decoded is named, with the cause), a value that is not 0/1, an
    unknown class name, a target outside [0, 1], a damaged provenance or side record,
    an output that would overwrite an input.
130, 143
    Interrupted (Ctrl-C) or terminated (SIGTERM); no partial output file is left
    behind (``write`` leaves the items completed so far, and resumes on a rerun).
141
    stdout was closed before the output was printed (e.g. piped into ``head``).

Errors are reported as one line on stderr, ``cobalance: error: ...``, without a
traceback. ``--json`` prints one JSON document on stdout instead of the human-readable
text; ``--quiet`` prints nothing but errors. Progress bars (tqdm, when installed) go to
stderr and only appear on a terminal.

Files carry where they came from inside them (their ``provenance``, see
``docs/cli.md``):

* ``scan -o T.npz``: the source (absolute path), its format, the label columns and
  the file's SHA-256, or the masks folder's options (tiling, layout, ...), so that
  ``write`` can rebuild the same samples in the same order;
* ``fit -o P.npz`` (or ``P.json``): the table's path (absolute, and relative to the
  plan) and SHA-256, the resolved target, the balancer options and the report.
  ``report`` and ``write`` find the table through it (``--table`` overrides) and
  refuse a table whose hash changed.

Files written before files carried their provenance are read with the side records
earlier versions wrote beside them (``T.npz.scan.json`` or ``T.scan.json``,
``P.npz.fit.json`` or ``P.fit.json``); no side record is written any more. Every
value read from a provenance or record is checked: a damaged one is an error (exit
2) naming the file and the key.

No command writes over what it reads: an output that is one of its inputs or the side
records beside them (the same file by path, symbolic link or hard link), or two
outputs that are the same file, are refused (exit 2) before any work.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import Any, Callable, Optional, Sequence

import numpy as np

from ._cli_commands import cmd_demo, cmd_fit, cmd_report, cmd_scan, cmd_write
from ._cli_console import (EXIT_BROKEN_PIPE, EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, Console,
                           UsageError, one_line)
from ._version import __version__
from .labels import LABEL_FORMATS
from .targets import TARGET_TEXT_HELP as _TARGET_HELP

__all__ = ["main", "build_parser", "EXIT_OK", "EXIT_FAILURE", "EXIT_USAGE", "EXIT_INTERRUPTED", "EXIT_BROKEN_PIPE"]

#: The formats ``scan`` reads: label files (cobalance.labels) and masks folders.
_SCAN_FORMATS = LABEL_FORMATS + ("masks",)


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that partial outputs are cleaned up like on Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that raises instead of printing usage and exiting."""

    def error(self, message):  # noqa: D401 - argparse API
        raise UsageError(f"{message} (see '{self.prog} --help')")


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
With -o, the table is saved (.npz) with its provenance inside: the source, its
format and SHA-256 or the masks folder's options. The output may not be the input.
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
name. PLAN holds its provenance: the table's path and SHA-256, the resolved target,
the options and the report; `report` and `write` use it to find the table. No output
may be the table, its side record, the target file, or another output.
"""

_REPORT_EPILOG = """\
examples:
  cobalance report plan.npz
  cobalance report plan.npz --png chart.png --markdown report.md
  cobalance report plan.npz --table table.npz --target equal --json

The table and the target come from the plan's provenance (written by `fit`; for a
plan of earlier versions, its side record PLAN.fit.json) unless given. No output may
be the plan, the table, their records or another output.
"""

_WRITE_EPILOG = """\
examples:
  cobalance write plan.npz masks/ balanced/
  cobalance write plan.npz masks/ balanced/ --augment --seed 7

The tiling the table was scanned with is read from the table's provenance (for a
table of earlier versions, its side record TABLE.scan.json); --tile/--stride/--layout override it;
--table must name an existing table of the plan's samples. Every file is written to
a temporary name and renamed, the manifest last: an interrupted run leaves only
complete items and no manifest, and the same command resumes it. The manifest holds
the SHA-256 of every item's source and output files: a rerun rewrites the items
whose source or output changed since (without a manifest, it keeps only the items
whose files hold what writing them now would give).
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
_int_list = _argument_type(lambda text: [int(v) for v in text.split(",")], lambda value: len(value) > 0,
                           "integers separated by commas")
_share = _argument_type(float, lambda value: 0 < value <= 1, "a share in (0, 1]")
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
    g.add_argument("--ignore-index", type=_int_list, metavar="LABEL[,LABEL...]",
                   help="label value(s) to ignore in label maps")
    g.add_argument("--min-pixels", type=_non_negative_int, metavar="N",
                   help="a class is present in a tile when it covers at least N pixels")
    g.add_argument("--image-dir", metavar="DIR", help="images sub-folder (default images)")
    g.add_argument("--mask-dir", metavar="DIR", help="masks sub-folder, '.' for the folder itself (default masks)")
    g.add_argument("--valid-dir", metavar="DIR",
                   help="sub-folder of valid-region masks (e.g. a field of view; nonzero = valid), one per image")
    g.add_argument("--stem-key", metavar="REGEX",
                   help="pair image and mask files by this part of their names: a regular expression whose "
                        "group 'id' (or first group) is the key, e.g. '^(\\d+)_' pairs 21_training.tif with "
                        "21_manual1.gif (default: equal names)")
    g.add_argument("--min-valid", type=_share, metavar="SHARE",
                   help="drop tiles with fewer valid pixels than this share of their area (needs --valid-dir "
                        "or --ignore-index)")


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
    p.add_argument("--format", choices=_SCAN_FORMATS, help="input format (default: from the name)")
    p.add_argument("--class-names", metavar="A,B,...", help="class names, in column order")
    p.add_argument("--columns", metavar="A,B,...", help="CSV/Parquet: use only these columns, in this order")
    p.add_argument("--delimiter", metavar="CHAR", help="CSV field separator (default ',' or tab for .tsv)")
    _add_mask_options(p)
    p.set_defaults(handler=cmd_scan)

    p = add_command("fit", help="pattern table + target -> plan and report",
                    description="Find per-pattern repeat counts that move class presence towards a "
                    "target; write the integer plan and print the report.", epilog=_FIT_EPILOG)
    p.add_argument("table", help="pattern table (.npz from `cobalance scan`)")
    p.add_argument("--target", default="equal", metavar="TARGET", help=_TARGET_HELP + " (default equal)")
    p.add_argument("-o", "--output", required=True, metavar="PLAN.npz", help="plan file (.npz or .json)")
    _add_balancer_options(p)
    _add_report_outputs(p)
    p.set_defaults(handler=cmd_fit)

    p = add_command("report", help="plan -> markdown table and PNG chart",
                    description="Per-class presence before / target / after a plan.", epilog=_REPORT_EPILOG)
    p.add_argument("plan", help="plan file from `cobalance fit`")
    p.add_argument("--table", help="pattern table (default: the one named in the plan's provenance)")
    p.add_argument("--target", metavar="TARGET", help="target to compare with (default: the fitted one); "
                   + _TARGET_HELP)
    _add_report_outputs(p)
    p.set_defaults(handler=cmd_report)

    p = add_command("write", help="plan + dataset folder -> balanced dataset folder",
                    description="Write the balanced dataset of a plan as files, in the source's layout, "
                    "with a manifest. Needs torch.", epilog=_WRITE_EPILOG)
    p.add_argument("plan", help="plan file from `cobalance fit`")
    p.add_argument("dataset", help="the masks folder the table was scanned from")
    p.add_argument("out_dir", help="output folder: missing, empty, or an interrupted run of the same job")
    p.add_argument("--table", help="pattern table (default: the one named in the plan's provenance)")
    p.add_argument("--augment", action="store_true", help="augment the duplicates (kornia flips and elastic)")
    p.add_argument("--seed", type=_non_negative_int, default=0, help="augmentation seed (default 0)")
    p.add_argument("--class-names", metavar="A,B,...", help=argparse.SUPPRESS)
    _add_mask_options(p)
    p.set_defaults(handler=cmd_write)

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
    p.set_defaults(handler=cmd_demo)

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
                   help="regularizer weight (default 0.5 for ess, 1e-3 for the others)")
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
    g.add_argument("--n-samples-out", type=_size, metavar="N",
                   help="size of the balanced set: a count, or a ratio of the original size such as 1.25x or "
                        "125%% (overrides --budget)")
    g.add_argument("--min-count", type=_non_negative_float, metavar="M",
                   help="at least M samples per pattern (with --allow-undersampling; default 0)")
    g.add_argument("--max-count", type=_positive_float, metavar="M",
                   help="at most M samples per pattern (in addition to --max-copies)")
    g.add_argument("--class-weights", metavar="W",
                   help="weights of the classes in the objective: CLASS=W,... (others 1) or W1,W2,... "
                        "(one per class; default 1 each)")
    g.add_argument("--min-effective-size", type=_effective_size_floor, default=default["min_effective_size"],
                   metavar="S", help="floor on the plan's Kish effective size: repeat_factor (96%% of "
                                     "repeat-factor sampling's at the same size), a share of N such as 0.8, or "
                                     "none (default %(default)s)")
    g.add_argument("--seed", type=_non_negative_int, default=0,
                   help="seeds which samples get a pattern's remainder copies (default 0)")


def _add_report_outputs(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("report files")
    g.add_argument("--markdown", metavar="FILE.md", help="write the report as Markdown")
    g.add_argument("--report-json", metavar="FILE.json", help="write the report as JSON")
    g.add_argument("--png", metavar="FILE.png", help="write a bar chart (needs matplotlib)")


def _size(text: str):
    """``--n-samples-out``: an integer count, or a ratio string (``1.25x``, ``125%``) as Balancer takes it."""
    from ._plan_size import size_form as _size_form

    text = text.strip()
    value = text if text[-1:].lower() in ("x", "%") else None
    if value is None:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive integer or a ratio such as 1.25x or 125%, "
                                             f"got {text!r}") from None
    try:
        _size_form(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def _effective_size_floor(text: str):
    text = text.strip()
    if text.lower() == "none":
        return None
    if text == "repeat_factor":
        return text
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (0.0 < value <= 1.0):
        raise argparse.ArgumentTypeError(f"expected repeat_factor, none or a share of N in (0, 1], got {text!r}")
    return value


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
            print(f"cobalance: error: {one_line(exc)}", file=sys.stderr)
            return EXIT_USAGE
        except SystemExit as exc:  # --help and --version exit through argparse
            return int(exc.code or 0)
        if getattr(args, "handler", None) is None:
            parser.print_help(sys.stderr)
            return EXIT_USAGE
        console = Console(args)

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
            print(f"cobalance: error: {one_line(exc)}", file=sys.stderr)
            return EXIT_USAGE
        except ImportError as exc:
            if debug:
                raise
            print(f"cobalance: error: {one_line(exc)}", file=sys.stderr)
            return EXIT_FAILURE
        except Exception as exc:  # noqa: BLE001 - the command line reports, never dumps a traceback
            if debug:
                raise
            print(f"cobalance: error: {type(exc).__name__}: {one_line(exc)} "
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

