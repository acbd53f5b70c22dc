"""The one exception type for errors a user can cause (bad input, bad flags, missing files).

Jobs turn it into a one-line message on stderr and a non-zero exit, without a traceback; everything else is a
bug and keeps its traceback.
"""


class CliptimeError(Exception):
    """A user-caused error. The message is one line and names the offending input."""

    exit_code = 2


class Interrupted(CliptimeError):
    """A job or sweep stopped by Ctrl-C or SIGTERM, its state saved; the message says how to continue it."""

    exit_code = 130  # the shell's code for a process stopped by SIGINT
