"""Rich progress bars for long jobs (disabled cleanly for non-rank-0 processes and in tests)."""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator, Optional, TypeVar

T = TypeVar("T")

__all__ = ["make_progress", "track"]


def make_progress(enabled: bool = True, transient: bool = False):
    """A rich ``Progress`` with bar, count, elapsed/remaining time and a free-text ``info`` field.

    With ``enabled=False`` a no-op context is returned whose ``add_task``/``update``/``advance`` do nothing.
    """
    if not enabled:
        return _NullProgress()
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TimeRemainingColumn(), TextColumn("{task.fields[info]}"), transient=transient,
    )


def track(items: Iterable[T], description: str, enabled: bool = True, total: Optional[int] = None) -> Iterator[T]:
    """Iterate over ``items`` with a transient progress bar."""
    items = list(items) if total is None else items
    total = total if total is not None else len(items)  # type: ignore[arg-type]
    with make_progress(enabled, transient=True) as progress:
        task = progress.add_task(description, total=total, info="")
        for item in items:
            yield item
            progress.advance(task)


class _NullProgress(contextlib.AbstractContextManager):
    def __exit__(self, *exc) -> None:
        return None

    def add_task(self, *args, **kwargs) -> int:
        return 0

    def update(self, *args, **kwargs) -> None:
        return None

    def advance(self, *args, **kwargs) -> None:
        return None
