"""``python -m forcecalc``: the ``forcecalc`` command."""

import sys

from forcecalc.cli import main

sys.exit(main())
