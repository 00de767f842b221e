"""``python -m cobalance`` and the ``cobalance`` console script."""

import sys

from .cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
