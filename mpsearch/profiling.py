"""Wall time and memory of each stage, recorded next to the results."""
from __future__ import annotations

import contextlib
import ctypes
import resource
import threading
import time
from typing import Iterator


def rss_mb() -> float:
    """Current resident memory of this process in MB."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / 1e6
    except OSError:
        return float("nan")


def release_memory() -> None:
    """Hand freed heap pages back to the OS (glibc ``malloc_trim``, about a millisecond), so a
    stage's large temporaries (logits, gradient sums) do not stay resident for the next one."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


class Stages:
    """``with stages("name"):`` records seconds, resident memory before/after and the
    stage's own peak (sampled every ``interval`` seconds by a background thread)."""

    def __init__(self, interval: float = 0.05, progress=None) -> None:
        self.interval = interval
        self.records: list[dict] = []
        #: told each stage's name as it starts (:class:`mpsearch.progress.SearchProgress`)
        self.progress = progress

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if self.progress is not None:
            self.progress.stage(name)
        before = rss_mb()
        peak = [before]
        done = threading.Event()

        def sample() -> None:
            while not done.wait(self.interval):
                peak[0] = max(peak[0], rss_mb())

        watcher = threading.Thread(target=sample, daemon=True)
        watcher.start()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            seconds = time.perf_counter() - t0
            done.set()
            watcher.join()
            release_memory()
            after = rss_mb()
            self.records.append({
                "stage": name,
                "seconds": round(seconds, 3),
                "rss_before_mb": round(before, 1),
                "rss_after_mb": round(after, 1),
                "peak_rss_mb": round(max(peak[0], after), 1),
            })
