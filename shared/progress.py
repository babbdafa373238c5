"""Progress output that reads well both on a terminal and in a log file.

A tqdm bar redraws itself with carriage returns: on a terminal that is one live line, in `make all > log` or CI
it is hundreds of half-lines. So bars are drawn only where stderr is a terminal; everywhere else a script prints
one complete line per step of interest with log().
"""
from __future__ import annotations

import sys
from typing import Iterable, TypeVar

T = TypeVar("T")


def interactive() -> bool:
    """True when stderr, where tqdm draws, is a terminal."""
    return sys.stderr.isatty()


def bar(iterable: Iterable[T], desc: str, total: int | None = None, enabled: bool = True) -> Iterable[T]:
    """`iterable` wrapped in a transient tqdm bar on a terminal; the plain iterable otherwise or when not enabled."""
    if not (enabled and interactive()):
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False)


def postfix(progress: Iterable, **values) -> None:
    """Show `values` beside a bar made by bar(); nothing when there is no bar."""
    if hasattr(progress, "set_postfix"):
        progress.set_postfix(**values)


def log(line: str) -> None:
    """One complete line on stdout, flushed at once so a log file follows the run as it goes."""
    print(line, flush=True)


def meter(total: int | None, desc: str, unit: str = "it", enabled: bool = True, **kwargs):
    """A tqdm bar to update() by hand, drawn only on a terminal (elsewhere it accepts the same calls silently)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not (enabled and interactive()), **kwargs)
