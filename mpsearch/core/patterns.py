"""Tensor-name patterns (``re:<regex>`` or an exact name) with bounded matching.

Plans, search spaces, rules and ties select tensors by ``re:`` patterns a user writes.
Python's ``re`` backtracks without limit: ``re:(.|.)*[0-9]{3}`` against one tensor name
runs for hours. Patterns are compiled with the ``regex`` package (a superset of ``re``'s
syntax), and every match runs under :data:`TIMEOUT_S`; a pattern that exceeds it is an
error naming the pattern and the name, never a hang.
"""

from __future__ import annotations

from functools import lru_cache

import regex

#: seconds one match of a pattern against one tensor name may take (a sane pattern takes microseconds)
TIMEOUT_S = 0.25
#: longest pattern accepted, in characters
MAX_LENGTH = 1000


class PatternError(ValueError):
    """A pattern that does not compile, is too long, or backtracks past the time limit."""


@lru_cache(maxsize=4096)
def _compiled(body: str) -> regex.Pattern:
    return regex.compile(body)


def compile_pattern(pattern: str, where: str) -> regex.Pattern | None:
    """The compiled regex of a ``re:`` pattern (None for an exact name); errors name ``where``."""
    if not isinstance(pattern, str) or not pattern:
        raise PatternError(f"{where}: expected a tensor name or 're:<regex>', got {pattern!r}")
    if len(pattern) > MAX_LENGTH:
        raise PatternError(
            f"{where}: pattern of {len(pattern):,} characters (at most {MAX_LENGTH}): {pattern[:40]!r}..."
        )
    if not pattern.startswith("re:"):
        return None
    try:
        return _compiled(pattern[3:])
    except (regex.error, RecursionError, OverflowError) as e:
        raise PatternError(f"{where}: bad regex {pattern!r}: {e}") from None


def fullmatch(pattern: str, name: str, where: str = "pattern") -> regex.Match | bool | None:
    """Whether ``pattern`` (exact, or ``re:`` matched in full) selects ``name``; a regex match object when it is one."""
    rx = compile_pattern(pattern, where)
    if rx is None:
        return pattern == name
    try:
        return rx.fullmatch(name, timeout=TIMEOUT_S)
    except TimeoutError:
        raise PatternError(
            f"{where}: regex {pattern!r} took over {TIMEOUT_S} s on the name {name[:80]!r}: it backtracks "
            "without bound (nested quantifiers such as (.|.)*); write it without them"
        ) from None
