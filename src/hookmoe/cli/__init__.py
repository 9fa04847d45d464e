"""The ``hookmoe`` command line: one module per command group, registered from the explicit table below.

The library never imports this package (checked by import-linter); commands call the library's public API.
"""

from __future__ import annotations

from typing import List, Optional

from hookmoe.cli import bench, convert, demo, eval, export, frontier, info, search, train
from hookmoe.cli.common import app, run

#: Every command and the module that defines it; ``hookmoe --help`` lists exactly these (tested).
COMMANDS: dict[str, object] = {
    "info": info, "generate": info,
    "eval": eval,
    "sweep": search, "search": search, "compare": search, "run": search,
    "frontier": frontier,
    "train": train,
    "export": export,
    "bench": bench,
    "convert": convert,
    "demo": demo,
}

_registered = False


def build_app():
    """Register every command group of :data:`COMMANDS` on ``app`` (once) and return it."""
    global _registered
    if not _registered:
        for module in dict.fromkeys(COMMANDS.values()):
            module.register_cli(app)
        _registered = True
    return app


def main(argv: Optional[List[str]] = None) -> None:
    build_app()
    run(argv)


if __name__ == "__main__":
    main()
