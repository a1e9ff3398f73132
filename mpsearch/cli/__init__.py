"""The ``mpsearch`` command (``mpsearch.cli:main``): ``search``, ``evolve``, ``worker``, ``apply``, ``eval``,
``export``, ``heatmap``, ``leaderboard``, ``evolve-proxy``, ``profile-device``, ``report`` and ``list``.

The flags are in :mod:`.parser`, what each command does in :mod:`.commands`.

Every command is a thin layer over one library call (``mpsearch.run.search``,
``mpsearch.apply_``, ``mpsearch.evaluate_plan``); errors in the input are printed as
one line naming the problem, with exit status 2.
"""

from __future__ import annotations

import logging
import sys

from .commands import COMMANDS, trial_summary
from .parser import parser

__all__ = ["main", "parser", "trial_summary", "user_errors"]


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    if getattr(a, "proxy", 1) is None:
        a.proxy = ["fisher"]
    if getattr(a, "budget", 1) is None:
        a.budget = ["uniform:3"]
    logging.basicConfig(level=logging.WARNING if getattr(a, "quiet", False) else logging.INFO, format="%(message)s")
    if getattr(a, "quiet", False):
        _quiet_libraries()
    try:
        return COMMANDS[a.cmd](a)
    except user_errors() as e:  # bad input: one line naming the problem; crashes keep their traceback
        print(f"mpsearch {a.cmd}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk or a folder it may not write: one line naming the place, not a traceback
        from ..store.cache import NO_SPACE, NOT_WRITABLE

        if e.errno not in NO_SPACE | NOT_WRITABLE:
            raise
        print(f"mpsearch {a.cmd}: error: {e.strerror}: {e.filename or 'a file it writes'}", file=sys.stderr)
        return 1


def _quiet_libraries() -> None:
    """``--quiet`` silences the progress bars of the libraries too (transformers' model loading, GGUF conversion)."""
    import os

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read when transformers is first imported
    if "transformers" in sys.modules:
        sys.modules["transformers"].utils.logging.disable_progress_bar()


def user_errors() -> tuple[type[Exception], ...]:
    """Errors that mean "the input is wrong", each with a message naming the problem."""
    from ..core.registry import UnknownComponentError
    from ..models.data import DataError
    from ..models.loader import ModelError
    from ..primitives import PrimitiveError
    from ..solvers import SolverError

    # ValueError covers PlanError, SpaceError, BudgetError, FormatError, ExpressionError, ProxyFileError
    return (ValueError, UnknownComponentError, DataError, ModelError, PrimitiveError, SolverError, FileNotFoundError)
