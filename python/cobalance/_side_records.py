"""Where the command line's files came from (as read back), and no command writing over what it reads.

A table or plan the command line writes carries its provenance inside the file
(:attr:`PatternTable.provenance`, :attr:`Plan.provenance`; see :mod:`cobalance.cli`
and ``docs/cli.md``). Earlier versions wrote it beside the file as a side record - ``scan -o T.npz`` wrote ``T.npz.scan.json`` (or
``T.scan.json``), ``fit -o P.npz`` wrote ``P.npz.fit.json`` (or ``P.fit.json``) - and
those are still read for a file without provenance. This module names the records,
reads them, checks every value the commands use (from a record or a provenance
alike), and refuses an output that would replace one of a command's inputs. Errors
are ValueErrors naming the file (and the key), which the command line reports with
exit 2.

=====================  ============================================================
function               used by
=====================  ============================================================
record_path            the names outputs may not take (a record's current name)
existing_record        readers: the current name, else an earlier version's
read_record            ``report``, ``write``: the JSON, its format and version
check_fit_record       ``report``, ``write``: every value they read of a plan's origin
check_scan_record      ``write``: every value it reads of a table's origin
refuse_clobbering      ``scan``, ``fit``, ``report``: outputs against inputs and each other
same_file, within      the above, and ``write``/``demo`` for their output folders
=====================  ============================================================
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence, Tuple

import numpy as np

from ._provenance import file_sha256
from .labels import LABEL_FORMATS

__all__ = ["SCAN_RECORD", "FIT_RECORD", "SOURCE_FORMATS", "file_sha256", "record_path", "legacy_record_path",
           "record_names", "existing_record", "read_record", "check_fit_record", "check_scan_record", "same_file",
           "within", "refuse_clobbering", "records_of"]

SCAN_RECORD = "cobalance.scan"
FIT_RECORD = "cobalance.fit"
#: The ``source_format`` values of a scan record or table provenance: the formats ``scan`` reads.
SOURCE_FORMATS = LABEL_FORMATS + ("masks",)


def record_path(path, kind: str) -> Path:
    """``table.npz`` -> ``table.npz.scan.json``; ``plan.npz`` -> ``plan.npz.fit.json``.

    Named after the whole file name, so that two outputs (``p.npz``, ``p.json``) never
    share a record.
    """
    p = Path(path)
    return p.with_name(f"{p.name}.{kind}.json")


def legacy_record_path(path, kind: str) -> Path:
    """The name earlier versions gave the record (``plan.npz`` -> ``plan.fit.json``)."""
    p = Path(path)
    stem = p.name[: -len(p.suffix)] if p.suffix else p.name
    return p.with_name(f"{stem}.{kind}.json")


def record_names(path, kind: str) -> List[Path]:
    """Where the record of ``path`` may be, in the order it is looked for."""
    names = [record_path(path, kind)]
    legacy = legacy_record_path(path, kind)
    return names if legacy == names[0] else names + [legacy]


def existing_record(path, kind: str) -> Path:
    """The record of ``path``: the current name, else an earlier version's if that exists."""
    names = record_names(path, kind)
    return next((n for n in names if n.exists()), names[0])


def read_record(path: Path, fmt: str) -> Optional[dict]:
    """The record at ``path`` (None when there is none), of format ``fmt`` and version 1.

    Raises
    ------
    ValueError
        Naming the file: not UTF-8 JSON, not an object, another format or version.
        The values inside are checked by :func:`check_fit_record` /
        :func:`check_scan_record`.
    """
    if not path.exists():
        return None
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        cause = " ".join(str(exc).split())
        raise ValueError(f"cannot read {path}: {cause}") from None
    if not isinstance(doc, dict) or doc.get("format") != fmt:
        raise ValueError(f"{path} is not a {fmt} record")
    if doc.get("version") != 1:
        raise ValueError(f"{path}: record version {doc.get('version')!r} is not one this cobalance reads (1)")
    return doc


# -- checking what is read --------------------------------------------------------------
#
# A record or a provenance is read back by later commands; every value they use is
# checked here, so a hand-edited or damaged one is an error naming the file and the
# key, not a TypeError or a silently wrong report.


class _RecordCheck:
    """Checks on one record or provenance; every message starts with the file's path and the key.

    ``prefix`` starts every key named (``"provenance."`` for a provenance inside a
    table or plan file, empty for a side record).
    """

    def __init__(self, path, doc: dict, prefix: str = ""):
        self.path, self.doc, self.prefix = path, doc, prefix
        self.kind = "file" if prefix else "record"

    def fail(self, key: str, expected: str, value: Any = None, *, missing: bool = False):
        shown = "it is missing" if missing else f"got {json.dumps(value)[:80]}"
        raise ValueError(f"{self.path}: {self.prefix + key!r} must be {expected}, {shown} (a damaged or hand-edited "
                         f"{self.kind}?)")

    def get(self, key: str, expected: str, accepts: Callable[[Any], bool], inside: str = "",
            required: bool = True):
        """``doc[inside][key]`` (``inside`` names an object checked before), or None when optional and absent."""
        doc = self.doc[inside] if inside else self.doc
        name = f"{inside}.{key}" if inside else key
        if key not in doc:
            if required:
                self.fail(name, expected, missing=True)
            return None
        value = doc[key]
        if not accepts(value):
            self.fail(name, expected, value)
        return value


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_sha256(value) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def _is_str_list(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _is_fraction(value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value)
            and 0.0 <= value <= 1.0)


def check_fit_record(path, doc: dict, *, prefix: str = "") -> dict:
    """The values ``report`` and ``write`` read of a plan's origin, checked (ValueError naming the file).

    ``prefix`` empty: ``doc`` is a fit record (side record of earlier versions), whose
    ``plan_sha256`` names the plan it describes. ``prefix="provenance."``: ``doc`` is
    the provenance inside the plan file ``path``, which needs no hash of the plan.
    """
    check = _RecordCheck(path, doc, prefix)
    if not prefix:
        check.get("plan_sha256", "a SHA-256 hex digest", _is_sha256)
    check.get("table", "an object", lambda v: isinstance(v, dict))
    for key in ("path", "relative_path"):
        check.get(key, "a non-empty path", lambda v: isinstance(v, str) and v != "", "table")
    check.get("sha256", "a SHA-256 hex digest", _is_sha256, "table")
    for key in ("n_samples", "n_patterns"):
        check.get(key, "a non-negative integer", lambda v: _is_int(v) and v >= 0, "table", required=False)
    target = check.get("target", "a list of fractions in [0, 1], one per class",
                       lambda v: isinstance(v, list) and len(v) > 0)
    for k, value in enumerate(target):
        if not _is_fraction(value):
            check.fail(f"target[{k}]", "a fraction in [0, 1]", value)
    names = check.get("class_names", "a list of class names", _is_str_list, required=False)
    if names is not None and len(names) != len(target):
        check.fail("target", f"one fraction per class ({len(names)} in 'class_names')", target)
    check.get("report", "an object", lambda v: isinstance(v, dict))
    check.get("extra", "an object", lambda v: isinstance(v, dict), "report", required=False)
    return doc


_MASK_FOLDER_KEYS = ("layout", "class_names", "tile", "stride", "ignore_index", "min_pixels", "image_dir", "mask_dir",
                     "valid_dir", "stem_key", "min_valid")


def check_scan_record(path, doc: dict, *, prefix: str = "") -> dict:
    """The values ``write`` reads of a table's origin, checked (ValueError naming the file).

    ``doc``: a scan record (``prefix`` empty) or the provenance inside the table file
    ``path`` (``prefix="provenance."``).
    """
    check = _RecordCheck(path, doc, prefix)
    check.get("source", "a non-empty path", lambda v: isinstance(v, str) and v != "")
    fmt = check.get("source_format", f"one of {', '.join(SOURCE_FORMATS)}", lambda v: v in SOURCE_FORMATS)
    check.get("table_sha256", "a SHA-256 hex digest", _is_sha256, required=False)
    if fmt != "masks":
        return doc
    folder = check.get("mask_folder", "an object", lambda v: isinstance(v, dict))
    unknown = sorted(set(folder) - set(_MASK_FOLDER_KEYS))
    if unknown:
        check.fail(f"mask_folder.{unknown[0]}", f"absent (the keys are {', '.join(_MASK_FOLDER_KEYS)})",
                   folder[unknown[0]])

    def pair(v):
        return v is None or (isinstance(v, list) and len(v) == 2 and all(_is_int(x) and x >= 1 for x in v))

    def min_pixels(v):
        values = v if isinstance(v, list) else [v]
        return len(values) > 0 and all(_is_int(x) and x >= 1 for x in values)

    check.get("layout", "'label_map' or 'binary_folders'", lambda v: v in ("label_map", "binary_folders"),
              "mask_folder", required=False)
    check.get("class_names", "a non-empty list of class names", lambda v: _is_str_list(v) and len(v) > 0,
              "mask_folder", required=False)
    for key in ("tile", "stride"):
        check.get(key, "null or [height, width] of positive integers", pair, "mask_folder", required=False)
    check.get("ignore_index", "null, an integer or a list of integers",
              lambda v: v is None or _is_int(v) or (isinstance(v, list) and len(v) > 0 and all(map(_is_int, v))),
              "mask_folder", required=False)
    for key in ("image_dir", "mask_dir"):
        check.get(key, "a folder name", lambda v: isinstance(v, str) and v != "", "mask_folder", required=False)
    for key in ("valid_dir", "stem_key"):
        check.get(key, "null or a non-empty string", lambda v: v is None or (isinstance(v, str) and v != ""),
                  "mask_folder", required=False)
    check.get("min_valid", "null or a share in (0, 1]",
              lambda v: v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 1),
              "mask_folder", required=False)
    check.get("min_pixels", "a positive integer or a list of them", min_pixels, "mask_folder", required=False)
    return doc


# -- outputs never overwrite inputs -----------------------------------------------------------


def same_file(a, b) -> bool:
    """The same file by path, symbolic link or hard link (whether or not it exists yet)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        sa, sb = os.stat(a), os.stat(b)
    except OSError:  # one of them does not exist: only the paths could say they are the same
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def within(path, folder) -> bool:
    """Whether ``path`` is ``folder`` or lies under it (after resolving links)."""
    p, f = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([p, f]) == f


def refuse_clobbering(outputs: Sequence[Tuple[str, Any]], inputs: Sequence[Tuple[str, Any]]) -> None:
    """Refuse (exit 2) an output that is one of the command's inputs, or another of its outputs.

    ``outputs`` and ``inputs`` are ``(what, path)`` pairs, ``path`` None when not
    given; the inputs include the side records the command reads. Checked before
    any work, so a refused command leaves every file as it was.
    """
    given_outputs = [(what, Path(path)) for what, path in outputs if path is not None]
    given_inputs = [(what, Path(path)) for what, path in inputs if path is not None]
    for k, (what, path) in enumerate(given_outputs):
        for in_what, in_path in given_inputs:
            if same_file(path, in_path):
                raise ValueError(f"{what} {str(path)!r} is {in_what} {str(in_path)!r}; writing it would destroy "
                                 "an input: choose another output name")
        for other_what, other in given_outputs[:k]:
            if same_file(path, other):
                raise ValueError(f"{what} {str(path)!r} and {other_what} {str(other)!r} are the same file; "
                                 "give each output its own name")


def records_of(path, kind: str, what: str) -> List[Tuple[str, Path]]:
    """``(what, path)`` for every name the record of ``path`` may have (current and earlier versions')."""
    return [(what, name) for name in record_names(path, kind)]
