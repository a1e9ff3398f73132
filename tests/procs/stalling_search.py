"""``mpsearch search`` that stops dead at a chosen point, so a test can SIGKILL it exactly there.

``python -m tests.procs.stalling_search WHAT N MARKER -- <mpsearch search args>`` runs the real
command; after the N-th save of WHAT (``primitives``: a primitive pass's checkpoint,
``kl``: the measured-KL table, written once per decoder layer) it writes MARKER and sleeps.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path


def main() -> int:
    what, n, marker = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    args = sys.argv[sys.argv.index("--") + 1 :]
    saves = 0

    def stall_after(save):
        def wrapped(*a, **k):
            nonlocal saves
            out = save(*a, **k)
            saves += 1
            if saves == n:
                marker.write_text(str(saves))
                time.sleep(3600)
            return out

        return wrapped

    if what == "primitives":
        from mpsearch.primitives.base import Checkpoint

        Checkpoint.save = stall_after(Checkpoint.save)
    elif what == "kl":
        from mpsearch.primitives import sensitivity

        sensitivity.write_json = stall_after(sensitivity.write_json)
    else:
        raise SystemExit(f"unknown stall point {what!r}")
    from mpsearch.cli import main as mpsearch

    return mpsearch(args)


if __name__ == "__main__":
    sys.exit(main())
