"""Wall time and memory of each stage, recorded next to the results."""

from __future__ import annotations

import contextlib
import ctypes
import resource
import sys
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


def _cuda_in_use():
    """torch's CUDA module when this process has started CUDA (a model on a GPU), else None:
    a CPU run never touches CUDA, and its stage records stay as they were."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return torch.cuda


class Stages:
    """``with stages("name"):`` records seconds, resident memory before/after and the
    stage's own peak (sampled every ``interval`` seconds by a background thread).

    Once CUDA is in use, each stage also records ``peak_gpu_mb``, the most GPU memory torch
    had allocated during it (nested stages fold into the enclosing ones), and waits for the
    GPU's queued work at both ends, so its seconds are the GPU's too, not just the launches'."""

    def __init__(self, interval: float = 0.05, progress=None) -> None:
        self.interval = interval
        self.records: list[dict] = []
        #: told each stage's name as it starts (:class:`mpsearch.core.progress.SearchProgress`)
        self.progress = progress
        #: per open stage that watches the GPU (outermost first): the most bytes allocated so far
        self._gpu_open: list[list[int]] = []

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
        cuda = _cuda_in_use()
        box = self._gpu_start(cuda) if cuda is not None else None
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if box is not None:
                cuda.synchronize()
            seconds = time.perf_counter() - t0
            done.set()
            watcher.join()
            release_memory()
            after = rss_mb()
            record = {
                "stage": name,
                "seconds": round(seconds, 3),
                "rss_before_mb": round(before, 1),
                "rss_after_mb": round(after, 1),
                "peak_rss_mb": round(max(peak[0], after), 1),
            }
            if box is not None:
                record["peak_gpu_mb"] = round(self._gpu_end(cuda, box) / 1e6, 1)
            self.records.append(record)

    def _gpu_start(self, cuda) -> list[int]:
        """Fold the peak so far into the open stages, then count this stage's from here."""
        cuda.synchronize()
        so_far = cuda.max_memory_allocated()
        for b in self._gpu_open:
            b[0] = max(b[0], so_far)
        cuda.reset_peak_memory_stats()
        box = [cuda.memory_allocated()]
        self._gpu_open.append(box)
        return box

    def _gpu_end(self, cuda, box: list[int]) -> int:
        peak = max(box[0], cuda.max_memory_allocated())
        self._gpu_open = [b for b in self._gpu_open if b is not box]  # by identity: two boxes may hold equal counts
        for b in self._gpu_open:
            b[0] = max(b[0], peak)
        return peak
