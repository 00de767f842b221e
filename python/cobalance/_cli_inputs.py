"""The command line's inputs: tables, plans and targets, and where a plan or table came from.

A plan's origin (its table, target, options, report) is its :attr:`Plan.provenance`;
a table's (its source and scan options) its :attr:`PatternTable.provenance`. A file
written before files carried their provenance has none: its side record of earlier
versions (``P.npz.fit.json`` / ``P.fit.json``, ``T.npz.scan.json`` /
``T.scan.json``) is read instead, and must describe that very file (SHA-256).

=====================  ============================================================
function               used by
=====================  ============================================================
load_table, load_plan  every command that reads one (exit 2 naming the file)
parse_target           ``fit``, ``report``, ``demo``: ``--target`` text -> target
target_path            the clobbering checks: the target file named by ``--target``
plan_origin            ``report``, ``write``: provenance, else the fit record
table_of_plan          ``report``, ``write``: ``--table``, else the plan's origin
table_origin           ``write``: the table's provenance, else its scan record
=====================  ============================================================
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple

from . import _side_records as records
from ._cli_console import UsageError, one_line, require_file
from .patterns import PatternTable
from .plan import Plan

__all__ = ["load_table", "load_plan", "parse_target", "target_path", "plan_origin", "table_of_plan", "table_origin"]

#: The key prefix of values read from a provenance, in error messages.
PROVENANCE = "provenance."


def load_table(path, what: str = "table") -> PatternTable:
    """The table at ``path``, with its per-sample index (UsageError naming the file otherwise)."""
    p = require_file(path, what)
    try:
        table = PatternTable.load(p)
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read {what} {str(path)!r}: {one_line(exc)}") from None
    if not table.has_inverse:
        raise UsageError(f"{what} {str(path)!r} has no per-sample index (it was saved with keep_inverse=False)")
    return table


def load_plan(path) -> Plan:
    p = require_file(path, "plan")
    try:
        return Plan.load(p)
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read plan {str(path)!r}: {one_line(exc)}") from None


def target_path(text):
    """The file ``--target`` names, or None when it is not a file name."""
    from .targets import target_file

    return target_file(text)


def parse_target(text: str, table: PatternTable):
    """The ``--target`` text as what :func:`cobalance.resolve_target` accepts, and the resolved target."""
    from .targets import parse_target_text, resolve_target

    path = target_path(text)
    if path is not None:
        require_file(str(path), "target file")
    try:
        spec = parse_target_text(text, table.class_names)
        return spec, resolve_target(spec, table)
    except ValueError as exc:
        raise UsageError(f"--target: {one_line(exc)}") from None


def plan_origin(plan_path: Path, plan: Plan, *, required: bool, hint: str = "pass --table") -> Optional[dict]:
    """What the plan was fitted from, checked: its provenance, else its fit record; or None.

    The result holds the values of :func:`records.check_fit_record` and ``"_where"``,
    how error messages name it (the plan file, or the record). None (an error when
    ``required``) when the plan has neither.
    """
    if plan.provenance is not None:
        records.check_fit_record(plan_path, plan.provenance, prefix=PROVENANCE)
        return dict(plan.provenance, _where=f"{plan_path} (its provenance)")
    record_path = records.existing_record(plan_path, "fit")
    record = records.read_record(record_path, records.FIT_RECORD)
    if record is None:
        if required:
            raise UsageError(f"the plan {plan_path} has no provenance (written before plans carried it) and no fit "
                             f"record {record_path} beside it; {hint}")
        return None
    records.check_fit_record(record_path, record)
    if record["plan_sha256"] != records.file_sha256(plan_path):
        raise UsageError(f"{record_path} describes another plan (the plan file changed since `fit`); {hint}")
    return dict(record, _where=str(record_path))


def table_of_plan(plan_path: Path, origin: Optional[dict], override) -> Tuple[PatternTable, Path]:
    """The table ``--table`` names, else the one the plan's origin names (unchanged since the fit)."""
    if override:
        return load_table(override), Path(override)
    assert origin is not None
    info = origin["table"]  # checked by check_fit_record
    candidates = [plan_path.resolve().parent / info["relative_path"], Path(info["path"])]
    for candidate in candidates:
        if candidate.is_file():
            if records.file_sha256(candidate) != info["sha256"]:
                raise UsageError(f"the table {candidate} changed since the plan was fitted (SHA-256 differs); "
                                 "pass --table to use it anyway")
            return load_table(candidate), candidate
    raise UsageError(f"the plan's table is not at {candidates[0]} nor {candidates[1]}; pass --table")


def table_origin(table_path: Path, table: PatternTable) -> Optional[dict]:
    """Where the table came from, checked: its provenance, else its scan record; None when neither.

    A scan record must carry the table's hash as written: a record beside a table it
    does not describe would cut the samples wrongly.
    """
    if table.provenance is not None:
        records.check_scan_record(table_path, table.provenance, prefix=PROVENANCE)
        return dict(table.provenance, _where=f"{table_path} (its provenance)")
    record_path = records.existing_record(table_path, "scan")
    record = records.read_record(record_path, records.SCAN_RECORD)
    if record is None:
        return None
    records.check_scan_record(record_path, record)
    recorded = record.get("table_sha256")
    if recorded is not None and recorded != records.file_sha256(table_path):
        raise UsageError(f"{record_path} describes another table (the table {table_path} changed since `scan`); "
                         "rerun `cobalance scan`, or remove the record and pass --tile/--stride/--layout")
    return dict(record, _where=str(record_path))
