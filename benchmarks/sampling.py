"""Sampling a server's process tree (CPU time, RSS, PSS) in the background while load runs."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from benchmarks.procfs import TreeMemory, tree_cpu_seconds, tree_memory


@dataclass(frozen=True)
class TreeSample:
    at: float  # time.time(), the clock the locustfile's window uses
    cpu_s: float
    rss_kib: int
    pss_kib: int
    processes: int


def take_sample(pid: int, memory: TreeMemory | None = None) -> TreeSample:
    """CPU time now; memory read now unless given (reading PSS walks every mapping, so it is read less often)."""
    memory = memory or tree_memory(pid)
    return TreeSample(time.time(), tree_cpu_seconds(pid), memory.rss_kib, memory.pss_kib, memory.processes)


class TreeSampler:
    """A daemon thread sampling CPU time every `interval_s` and memory every `memory_every` samples, until stopped.

    The sampler runs on the same cores as the server; a Ray tree's PSS takes tens of ms to read.
    """

    def __init__(self, pid: int, interval_s: float = 1.0, memory_every: int = 5) -> None:
        self.pid, self.interval_s, self.memory_every = pid, interval_s, memory_every
        self.samples: list[TreeSample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tree-sampler", daemon=True)

    def _run(self) -> None:
        memory: TreeMemory | None = None
        for tick in itertools.count():
            if self._stop.is_set():
                return
            if tick % self.memory_every == 0:
                memory = tree_memory(self.pid)
            self.samples.append(take_sample(self.pid, memory))
            self._stop.wait(self.interval_s)

    def start(self) -> TreeSampler:
        self._thread.start()
        return self

    def stop(self) -> list[TreeSample]:
        self._stop.set()
        self._thread.join()
        self.samples.append(take_sample(self.pid))  # so the last window has a sample after its end
        return self.samples


def cpu_cores_between(samples: Sequence[TreeSample], start: float, end: float) -> float:
    """Average cores in use over [start, end]: CPU time between the samples that bracket the window
    (the last one at or before start, the first one at or after end) over the time between them."""
    before = [s for s in samples if s.at <= start]
    after = [s for s in samples if s.at >= end]
    if not before or not after or after[0].at <= before[-1].at:
        return float("nan")
    first, last = before[-1], after[0]
    return (last.cpu_s - first.cpu_s) / (last.at - first.at)
