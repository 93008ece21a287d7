"""``python -m fastmeta``: the same as the ``fastmeta`` console script."""

from fastmeta.cli import run

run()
