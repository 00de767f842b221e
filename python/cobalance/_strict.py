"""Strict checks shared by the plan and the loaders: exact integer sums, typed fields.

The loaders of :class:`~cobalance.Plan` and :class:`~cobalance.PatternTable` accept a
file only when every field has the type, shape and range its writer gives it. Every
way of failing to read one (a broken zip archive, a truncated array, JSON nested past
the parser's depth, a number beyond int64, ...) becomes a ``ValueError`` that names
the file, the field and what was expected; a file that cannot be opened (missing, a
folder, no permission) keeps its ``OSError``.
"""

from __future__ import annotations

import contextlib
import json
import struct
import zipfile
import zlib

import numpy as np

__all__ = ["INT64_MAX", "NPZ_READ_ERRORS", "exact_sum", "exact_sum_fits", "show", "read_json", "json_int",
           "json_int_list", "open_npz", "npz_fields", "npz_str", "npz_int", "npz_int_vector", "reason"]

INT64_MAX = int(np.iinfo(np.int64).max)

#: What reading a damaged ``.npz`` can raise besides ValueError: zipfile and zlib
#: errors for a broken archive, EOFError / OSError for a truncated member, KeyError for
#: a name the directory lists but the archive lacks, NotImplementedError for an unknown
#: compression method, RuntimeError for an "encrypted" member, struct.error for a
#: short header.
NPZ_READ_ERRORS = (ValueError, TypeError, KeyError, IndexError, OverflowError, EOFError, OSError,
                   RuntimeError, NotImplementedError, zipfile.BadZipFile, zlib.error, struct.error)


def exact_sum(values: np.ndarray) -> int:
    """The exact sum of non-negative int64 ``values`` as a Python int.

    ``np.sum`` of int64 wraps silently past 2**63 - 1; here, where the largest entry
    times the length could pass it, the entries are split into their high and low 32
    bits and each part is summed in uint64, which cannot wrap below 2**32 entries.
    """
    if values.size == 0:
        return 0
    if int(values.max()) <= INT64_MAX // values.size:
        return int(values.sum())
    words = np.ascontiguousarray(values).view(np.uint64)
    high = int(np.sum(words >> np.uint64(32), dtype=np.uint64))
    low = int(np.sum(words & np.uint64(0xFFFFFFFF), dtype=np.uint64))
    return (high << 32) + low


def show(value) -> str:
    """A short description of a decoded value for an error message.

    Containers are named, not printed (a deeply nested list would overflow ``repr``),
    and very long numbers and strings are cut.
    """
    if value is None:
        return "null"
    if isinstance(value, (bool, np.bool_)):
        return f"{bool(value)!r} (a boolean)"
    if isinstance(value, (int, np.integer)):
        value = int(value)
        return str(value) if abs(value) < 10 ** 30 else f"an integer of {value.bit_length()} bits"
    if isinstance(value, (float, np.floating)):
        return repr(float(value))
    if isinstance(value, str):
        return repr(value) if len(value) <= 40 else repr(value[:40]) + "..."
    if isinstance(value, list):
        return f"a list of {len(value)} entries"
    if isinstance(value, dict):
        return f"an object of {len(value)} fields"
    return f"a {type(value).__name__}"


# -- JSON ------------------------------------------------------------------------------


def _no_constant(text):
    raise ValueError(f"{text} is not a number JSON allows")


def read_json(name: str, what: str):
    """The decoded JSON document of the file ``name`` (``what``: e.g. "plan")."""
    with open(name, "rb") as f:  # a missing file stays FileNotFoundError
        data = f.read()
    where = f"{name!r} is not a cobalance {what} file"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    return parse_json(text, where + ":")


def parse_json(text: str, where: str):
    """``json.loads(text)`` with every failure a ValueError starting with ``where``.

    NaN and infinities are refused (JSON has no such numbers), as is nesting too deep
    to read.
    """
    try:
        return json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where} not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    except RecursionError:
        raise ValueError(f"{where} JSON nested too deeply to read") from None
    except ValueError as e:  # NaN / Infinity, an integer of more digits than Python converts
        raise ValueError(f"{where} not JSON: {e}") from None


def json_int(value, where: str, field: str, *, low: int = 0, high: int = INT64_MAX) -> int:
    """A JSON integer field in ``[low, high]`` (not a boolean, not a float)."""
    if type(value) is not int:
        raise ValueError(f"{where}: {field} must be an integer, got {show(value)}")
    if not low <= value <= high:
        raise ValueError(f"{where}: {field} must be an integer in [{low}, {high}], got {show(value)}")
    return value


def json_int_list(value, where: str, field: str) -> np.ndarray:
    """A JSON list of integers that int64 holds, as an int64 array (signs not checked)."""
    if not isinstance(value, list):
        raise ValueError(f"{where}: {field} must be a list of integers, got {show(value)}")
    if not all(type(v) is int for v in value):
        i = next(i for i, v in enumerate(value) if type(v) is not int)
        raise ValueError(f"{where}: {field} must hold integers only, got {show(value[i])} at position {i}")
    try:
        return np.array(value, dtype=np.int64)
    except OverflowError:
        i = next(i for i, v in enumerate(value) if not -INT64_MAX - 1 <= v <= INT64_MAX)
        raise ValueError(f"{where}: {field} must hold integers that int64 holds (|value| < 2**63), got "
                         f"{show(value[i])} at position {i}") from None


# -- npz ---------------------------------------------------------------------------------


@contextlib.contextmanager
def open_npz(name: str, what: str):
    """The open ``np.load`` archive of the file ``name``, pickles refused."""
    with open(name, "rb") as f:  # a missing file stays FileNotFoundError
        try:
            archive = np.load(f, allow_pickle=False)
        except NPZ_READ_ERRORS as e:
            raise ValueError(f"{name!r} is not a cobalance {what} file ({reason(e)})") from None
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise ValueError(f"{name!r} is not a cobalance {what} file (a single array, not an .npz archive)")
        with archive:
            yield archive


def npz_fields(archive, name: str, what: str, required, optional=()) -> dict:
    """Every array of the archive, read; missing required or unknown arrays refused."""
    names = set(archive.files)
    missing = [key for key in required if key not in names]
    if missing:
        raise ValueError(f"{name!r} is not a complete cobalance {what} file: the array(s) "
                         f"{', '.join(map(repr, missing))} are missing")
    unknown = sorted(names - set(required) - set(optional))
    if unknown:
        raise ValueError(f"{name!r}: unknown array(s) {', '.join(map(repr, unknown[:5]))} in a cobalance {what} "
                         f"file (it holds {', '.join(map(repr, list(required) + list(optional)))})")
    fields = {}
    for key in archive.files:
        try:
            fields[key] = archive[key]
        except NPZ_READ_ERRORS as e:
            raise ValueError(f"{name!r}: cannot read the array {key!r} ({reason(e)})") from None
    return fields


def npz_str(value: np.ndarray, where: str, field: str) -> str:
    """A 0-d text array's string."""
    if value.ndim != 0 or value.dtype.kind != "U":
        raise ValueError(f"{where}: {field} must be a text scalar, got dtype {value.dtype}, shape {value.shape}")
    return str(value)


def npz_int(value: np.ndarray, where: str, field: str, *, low: int = 0, high: int = INT64_MAX) -> int:
    """A 0-d integer array's value, in ``[low, high]``."""
    if value.ndim != 0 or value.dtype.kind not in "iu":
        raise ValueError(f"{where}: {field} must be an integer scalar, got dtype {value.dtype}, shape {value.shape}")
    number = int(value)
    if not low <= number <= high:
        raise ValueError(f"{where}: {field} must be an integer in [{low}, {high}], got {number}")
    return number


def npz_int_vector(value: np.ndarray, where: str, field: str) -> np.ndarray:
    """A 1-D integer array that int64 holds, as contiguous int64 (signs not checked)."""
    if value.ndim != 1:
        raise ValueError(f"{where}: {field} must be 1-D, got shape {value.shape}")
    if value.dtype.kind not in "iu":
        raise ValueError(f"{where}: {field} must hold integers, got dtype {value.dtype}")
    if value.dtype.kind == "u" and value.size and int(value.max()) > INT64_MAX:
        i = int(np.argmax(value))
        raise ValueError(f"{where}: {field} must hold integers below 2**63, got {int(value[i])} at position {i}")
    return np.ascontiguousarray(value, dtype=np.int64)


def reason(exc: BaseException) -> str:
    """An exception as ``Type: message`` on one line, cut to a readable length."""
    text = " ".join(str(exc).split())
    if isinstance(exc, ValueError) and "pickle" in text:
        # numpy's own words advise allow_pickle=True, which no cobalance file needs
        return "it holds pickled Python objects, which cobalance never loads"
    text = text if len(text) <= 200 else text[:200] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def exact_sum_fits(values: np.ndarray, what: str) -> int:
    """:func:`exact_sum`, refused with ``what`` named where it is beyond int64."""
    total = exact_sum(values)
    if total > INT64_MAX:
        raise ValueError(f"{what} sum to {total}, beyond the int64 limit 2**63 - 1 = {INT64_MAX}")
    return total
