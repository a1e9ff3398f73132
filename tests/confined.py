"""Run a command where a folder is read-only or a disk is full, for real.

Under root (CI, these machines) the command runs in its own mount namespace (``unshare -m``):
a read-only folder is a read-only bind mount of itself (writes fail with EROFS, as on a
read-only volume, whatever the permissions say), and a full disk is a small tmpfs mounted over
the folder (ENOSPC once it is full). Nothing outside the namespace sees either mount.
Without root, a read-only folder is ``chmod -R a-w`` (EACCES), and a full disk cannot be made.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Sequence


def _as_root() -> bool:
    return os.geteuid() == 0 and shutil.which("unshare") is not None


def can_fill() -> bool:
    """Whether a full disk can be made here (a tmpfs in a mount namespace: root)."""
    return _as_root()


def run(
    argv: Sequence[str],
    *,
    read_only: Sequence[Path] = (),
    full: Path | None = None,
    full_kb: int = 64,
    env: dict | None = None,
    cwd: Path | None = None,
    timeout: float = 300,
) -> subprocess.CompletedProcess:
    """``argv`` with each of ``read_only`` read-only and ``full`` a fresh disk of ``full_kb`` KB (needs
    :func:`can_fill`)."""
    if _as_root():
        q = shlex.quote
        mounts = [f"mount --bind {q(str(p))} {q(str(p))} && mount -o remount,bind,ro {q(str(p))}" for p in read_only]
        if full is not None:
            mounts.append(f"mount -t tmpfs -o size={full_kb}k tmpfs {q(str(full))}")
        script = " && ".join(mounts + ['exec "$@"'])
        cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", *argv]
        return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if full is not None:
        raise RuntimeError("a full disk needs root here (a tmpfs in a mount namespace)")
    for p in read_only:
        subprocess.run(["chmod", "-R", "a-w", str(p)], check=True)
    try:
        return subprocess.run(list(argv), env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    finally:
        for p in read_only:
            subprocess.run(["chmod", "-R", "u+w", str(p)], check=True)
