"""Where a saved table or plan came from: a JSON object stored inside the file.

:class:`~cobalance.PatternTable` and :class:`~cobalance.Plan` carry an optional
``provenance`` (a dict, or None) that :meth:`save` writes into the file - a JSON text
in the ``.npz`` array ``provenance``, the ``"provenance"`` key of a plan's ``.json`` -
and :meth:`load` reads back. The library checks only that it is a JSON object (string
keys; numbers, strings, booleans, null, lists and objects; no NaN or infinity); what
the keys mean is up to the writer (the command line's are documented in
``docs/cli.md`` and checked where it reads them).

=====================  ==========================================================
function               used by
=====================  ==========================================================
checked                the ``provenance`` setters (a plain JSON copy, or ValueError)
to_text                ``save`` of both classes (the ``.npz`` array's text)
from_npz_text          ``PatternTable.load``, ``Plan.load`` (``.npz``)
from_json_value        ``Plan.load`` (``.json``)
file_sha256            what a provenance records of a file (labels, the command line)
=====================  ==========================================================
"""

from __future__ import annotations

import hashlib
import json
from typing import Optional

import numpy as np

from ._strict import parse_json

__all__ = ["checked", "to_text", "from_npz_text", "from_json_value", "file_sha256"]


def file_sha256(path) -> str:
    """The SHA-256 hex digest of a file's bytes (read in blocks of 1 MiB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def checked(value) -> Optional[dict]:
    """``value`` as a plain JSON object (a deep copy: tuples become lists), or None.

    Raises
    ------
    ValueError
        ``value`` is not a dict, or holds something JSON cannot store exactly (a
        non-string key, NaN or infinity, an object of another type).
    """
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError(f"provenance must be a dict of JSON values or None, got {type(value).__name__}")
    try:
        text = json.dumps(value, allow_nan=False, sort_keys=False)
    except (TypeError, ValueError, RecursionError) as exc:
        raise ValueError(f"provenance must hold JSON values only (str keys; numbers, text, booleans, None, lists, "
                         f"dicts; no NaN or infinity): {' '.join(str(exc).split())}") from None
    return json.loads(text)


def to_text(value: dict) -> str:
    """The provenance as the JSON text stored in an ``.npz``."""
    return json.dumps(value, allow_nan=False, separators=(",", ":"))


def from_npz_text(array: np.ndarray, where: str) -> dict:
    """The provenance stored in an ``.npz`` array; ``where`` (the quoted file name) starts every error."""
    if array.ndim != 0 or array.dtype.kind != "U":
        raise ValueError(f"{where}: provenance must be a text scalar (a JSON object), got dtype {array.dtype}, "
                         f"shape {array.shape}")
    return from_json_value(parse_json(str(array), f"{where}: provenance is"), where)


def from_json_value(value, where: str) -> dict:
    """A decoded provenance value, which must be a JSON object."""
    if not isinstance(value, dict):
        kind = "null" if value is None else type(value).__name__
        raise ValueError(f"{where}: provenance must be a JSON object, got {kind}")
    return value


class Recorded:
    """The ``provenance`` attribute of tables and plans: a JSON copy of a dict, or None.

    Setting it stores a copy (see :func:`checked`), so what is saved is what was set and
    later edits of the caller's dict do not reach the object.
    """

    _provenance: Optional[dict] = None

    @property
    def provenance(self) -> Optional[dict]:
        """Where this came from: a dict of JSON values, or None."""
        return self._provenance

    @provenance.setter
    def provenance(self, value) -> None:
        self._provenance = checked(value)
