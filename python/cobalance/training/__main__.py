"""``python -m cobalance.training --data DIR --out DIR ...``: the fundus study (see experiment.py)."""

import sys

from .experiment import main

sys.exit(main())
