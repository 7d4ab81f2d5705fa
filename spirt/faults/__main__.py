"""``python -m spirt.faults``: see :func:`spirt.faults.main`."""

import sys

from . import main

raise SystemExit(main(sys.argv[1:]))
