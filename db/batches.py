"""Lists of ids asked for in batches.

A statement binds one parameter per id of ``column IN (...)``; PostgreSQL refuses more
than 65,535 in one statement. A list whose length the data decides (not a page size or
a constant) is asked for 1,000 at a time.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TypeVar

T = TypeVar("T")

#: Well under PostgreSQL's 65,535 parameters, leaving room for the statement's others.
BATCH = 1000


def batches(ids: Sequence[T], size: int = BATCH) -> Iterator[list[T]]:
    """``ids`` in consecutive lists of at most ``size``."""
    for start in range(0, len(ids), size):
        yield list(ids[start:start + size])
