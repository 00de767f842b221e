"""How the command line talks to its user: the usage error, the console, the checks of given paths.

Shared by :mod:`cobalance.cli` (parsing, ``main``) and the command bodies in
:mod:`cobalance._cli_commands`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

__all__ = ["EXIT_OK", "EXIT_FAILURE", "EXIT_USAGE", "EXIT_INTERRUPTED", "EXIT_BROKEN_PIPE", "UsageError", "Console",
           "one_line", "require_file"]

#: The exit codes (see :mod:`cobalance.cli`).
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141


class UsageError(Exception):
    """Bad usage or bad input: exit code 2, message printed as one line."""


class Console:
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


def one_line(text) -> str:
    """``text`` with its whitespace runs (newlines included) made single spaces."""
    return " ".join(str(text).split())


def require_file(path, what: str) -> Path:
    """``path`` as a Path; a UsageError naming ``what`` when it is missing or a folder."""
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{what} {str(path)!r} does not exist")
    if p.is_dir():
        raise UsageError(f"{what} {str(path)!r} is a folder, expected a file")
    return p
