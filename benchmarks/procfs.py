"""Memory and CPU time of a process tree, read from /proc (psutil is not a dependency).

A server here is a tree: the service and its decode workers, or a framework's driver, daemons and
replicas. Its footprint is the sum over the tree. RSS counts pages shared between processes (the
libraries forked workers share) once per process, so the proportional set size (PSS, each shared
page split among its users) is reported beside it: PSS adds up to what the tree really occupies.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class TreeMemory:
    rss_kib: int
    pss_kib: int
    processes: int


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants that are alive now (the root first)."""
    found, pending = [], [pid]
    while pending:
        current = pending.pop()
        try:
            children = [
                int(child)
                for task in (PROC / str(current) / "task").iterdir()
                for child in (task / "children").read_text().split()
            ]
        except (FileNotFoundError, ProcessLookupError):
            continue  # exited while we looked
        found.append(current)
        pending += children
    return found


def status_kib(status_text: str, field: str) -> int:
    """A `Name:   123 kB` line of /proc/PID/status (or smaps_rollup) in KiB; 0 when absent (a zombie)."""
    for line in status_text.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def cpu_ticks(stat_text: str) -> int:
    """utime + stime of /proc/PID/stat, in clock ticks.

    The command name (field 2) may hold spaces and parentheses, so fields are counted after its last ')'.
    """
    fields = stat_text.rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5), counted from 'state' (field 3)


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return ""


def tree_memory(pid: int) -> TreeMemory:
    pids = process_tree(pid)
    rss = sum(status_kib(_read(PROC / str(p) / "status"), "VmRSS") for p in pids)
    pss = sum(status_kib(_read(PROC / str(p) / "smaps_rollup"), "Pss") for p in pids)
    return TreeMemory(rss_kib=rss, pss_kib=pss, processes=len(pids))


def process_tree_rss_kib(pid: int) -> int:
    """Resident memory of a process and all its descendants (KiB)."""
    return tree_memory(pid).rss_kib


def tree_cpu_seconds(pid: int) -> float:
    """CPU time (user + system) used so far by the processes of the tree that are alive now."""
    stats = (_read(PROC / str(p) / "stat") for p in process_tree(pid))
    return sum(cpu_ticks(text) for text in stats if text) / CLOCK_TICKS
