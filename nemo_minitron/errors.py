"""Errors that nemo_minitron raises for bad input.

Every user-facing failure is a subclass of :class:`MinitronError`; the CLI prints its message on one
line and exits with status 2, so a message must name the offending field, key, path or value.
"""


import sys


class MinitronError(Exception):
    """Base class for errors caused by the user's input (as opposed to bugs)."""


def exit_status(body) -> int:
    """A command's exit status: ``body()`` runs; 0 when it returns, 2 with the error on one line of
    stderr when it raises a :class:`MinitronError` (bad input). Anything else propagates (a bug)."""
    try:
        body()
    except MinitronError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


class ConfigError(MinitronError, ValueError):
    """An architecture, parallel-layout or recipe configuration that this family cannot represent."""


class CheckpointError(MinitronError):
    """A missing, corrupt or inconsistent checkpoint file."""
