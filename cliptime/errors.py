"""The one exception type for errors a user can cause (bad input, bad flags, missing files).

Jobs turn it into a one-line message on stderr and a non-zero exit, without a traceback; everything else is a
bug and keeps its traceback.
"""

from __future__ import annotations

from collections.abc import Callable


class CliptimeError(Exception):
    """A user-caused error. The message is one line and names the offending input."""

    exit_code = 2


class Interrupted(CliptimeError):
    """A job or sweep stopped by Ctrl-C or SIGTERM, its state saved; the message says how to continue it."""

    exit_code = 130  # the shell's code for a process stopped by SIGINT


def find_cause(e: BaseException | None, match: Callable[[BaseException], bool]) -> BaseException | None:
    """`e` or the first exception behind it that `match`es, also one raised inside a Ray task or worker (which
    Ray keeps as the `cause` of the error it raises in the driver)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if match(e):
            return e
        e = getattr(e, "cause", None) or e.__cause__
    return None
