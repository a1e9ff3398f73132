"""Progress of a whole search, not one stage: which stage, how many plans are left, and an ETA.

Each stage's own bar (tqdm) says how far that stage is; this says where the search is.
One line per stage start and per measured plan, through logging (``--quiet`` hides it).
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger("mpsearch.core.progress")


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class SearchProgress:
    """``stage(name)`` at each stage start; ``plans(n)`` once the plans to measure are known;
    ``measured(seconds)`` after each. The ETA is the mean time per plan measured so far x plans left."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.start = time.perf_counter()
        self.stages = 0
        self.total = 0
        self.done: list[float] = []

    @property
    def left(self) -> int:
        return max(0, self.total - len(self.done))

    def eta(self) -> float | None:
        if not self.total or not self.done:
            return None
        return sum(self.done) / len(self.done) * self.left

    def status(self, name: str) -> str:
        parts = [f"[search {_clock(time.perf_counter() - self.start)}] stage {self.stages}: {name}"]
        if self.total:
            parts.append(f"{len(self.done)} of {self.total} plans measured, {self.left} left")
            eta = self.eta()
            parts.append(f"ETA {_clock(eta)}" if eta is not None else "ETA after the first plan")
        return " | ".join(parts)

    def stage(self, name: str) -> None:
        self.stages += 1
        if self.enabled:
            log.info("%s", self.status(name))

    def plans(self, n: int) -> None:
        self.total = n

    def measured(self, seconds: float) -> None:
        self.done.append(seconds)
