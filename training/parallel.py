"""Mapping a function over many files with a few worker processes, results in input order."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


def ordered_map(
    function: Callable[[Item], Result], items: Iterable[Item], workers: int, chunksize: int = 4
) -> Iterator[Result]:
    """function(item) for every item, in order: in this process for workers <= 1, else in `workers` processes
    (`function` must then be a picklable module-level function)."""
    if workers <= 1:
        yield from map(function, items)
        return
    with ProcessPoolExecutor(workers) as pool:
        yield from pool.map(function, items, chunksize=chunksize)
