"""Wall time and memory of each stage, recorded next to the results."""
from __future__ import annotations

import contextlib
import resource
import time
from typing import Iterator


def rss_mb() -> float:
    """Current resident memory of this process in MB."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / 1e6
    except OSError:
        return float("nan")


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3


class Stages:
    """``with stages("name"):`` records seconds, RSS after, and peak RSS so far."""

    def __init__(self) -> None:
        self.records: list[dict] = []

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0, before = time.perf_counter(), rss_mb()
        try:
            yield
        finally:
            self.records.append({
                "stage": name,
                "seconds": round(time.perf_counter() - t0, 3),
                "rss_before_mb": round(before, 1),
                "rss_after_mb": round(rss_mb(), 1),
                "peak_rss_mb": round(peak_rss_mb(), 1),
            })
