"""Progress bars: the one helper every long-running step uses.

Bars are rich progress bars on stderr. They are off when the caller says so (``--no-progress``) and when stderr is
not a terminal (logs and pipes stay clean), or when ``HOOKMOE_PROGRESS=0``
(``HOOKMOE_PROGRESS=always`` draws them anyway).
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")


def wanted(enabled: bool = True) -> bool:
    """Whether a bar should be drawn: asked for, and stderr is a terminal; ``HOOKMOE_PROGRESS=0`` turns every bar
    off, ``HOOKMOE_PROGRESS=always`` draws them even when stderr is not a terminal (logs, tests)."""
    mode = os.environ.get("HOOKMOE_PROGRESS", "auto").lower()
    if not enabled or mode == "0":
        return False
    return mode == "always" or bool(getattr(sys.stderr, "isatty", lambda: False)())


@contextlib.contextmanager
def bar(enabled: bool, description: str, total: int | None, *, auto_refresh: bool = True,
        unit: str | None = None) -> Iterator[Callable[..., None]]:
    """A progress bar; yields ``advance(n=1)``. ``auto_refresh=False`` redraws only on advance (no refresh thread
    competing for the CPU while something is being timed). ``unit`` shows ``completed/total unit`` instead of M/N."""
    if not wanted(enabled):
        yield lambda n=1: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn

    count = TextColumn("{task.completed:,}/{task.total:,} " + unit) if unit else MofNCompleteColumn()
    with Progress(TextColumn("{task.description}", markup=False), BarColumn(), count, TimeElapsedColumn(), TimeRemainingColumn(),
                  console=Console(stderr=True), transient=True, auto_refresh=auto_refresh) as prog:
        task = prog.add_task(description, total=total)

        def advance(n: int = 1) -> None:
            prog.advance(task, n)
            if not auto_refresh:
                prog.refresh()

        yield advance


def iterate(iterable: Iterable[T], total: int | None, description: str, enabled: bool = True) -> Iterator[T]:
    """Iterate with a progress bar."""
    with bar(enabled, description, total) as advance:
        for x in iterable:
            yield x
            advance()
