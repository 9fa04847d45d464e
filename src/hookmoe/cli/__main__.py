"""``python -m hookmoe.cli`` — the same as the ``hookmoe`` command."""

from hookmoe.cli import main

main()
