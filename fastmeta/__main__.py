"""``python -m fastmeta``: the same as the ``fastmeta`` console script."""

import sys

from fastmeta.cli import main

sys.exit(main())
