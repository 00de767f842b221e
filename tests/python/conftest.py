"""Shared test configuration."""

from pathlib import Path

import cobalance

#: The folder holding the ``cobalance`` package these tests import (site-packages
#: after ``pip install``, ``python/`` in a development build). Subprocesses get it as
#: PYTHONPATH so that they test the same installation as the test process.
PACKAGE_PARENT = Path(cobalance.__file__).resolve().parents[1]
