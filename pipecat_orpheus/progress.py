"""Progress of long start-up work: a bar on a terminal, a few plain log lines in a log file."""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from typing import TypeVar

from loguru import logger
from tqdm import tqdm

T = TypeVar("T")
_LOG_LINES = 4  # lines logged over the whole work when stderr is not a terminal (a log file, a pipe)


def progress(items: Sequence[T], desc: str, unit: str) -> Iterator[T]:
    """Iterate `items`, showing progress: tqdm on a TTY, else `desc: k/n unit` a few times (no carriage-return bars)."""
    if sys.stderr.isatty():
        yield from tqdm(items, desc=desc, unit=unit)
        return
    n = len(items)
    every = max(1, -(-n // _LOG_LINES))
    for k, item in enumerate(items, 1):
        yield item
        if k % every == 0 or k == n:
            logger.info(f"{desc}: {k}/{n} {unit}s")
