"""Timestamped progress lines for the long-running benchmark commands."""

from __future__ import annotations

import time


class Progress:
    """Timestamped progress lines (elapsed mm:ss since the run started)."""

    def __init__(self) -> None:
        self.started = time.perf_counter()

    def __call__(self, message: str) -> None:
        elapsed = int(time.perf_counter() - self.started)
        print(f"[{elapsed // 60:02d}:{elapsed % 60:02d}] {message}", flush=True)
