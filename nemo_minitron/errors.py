"""Errors that nemo_minitron raises for bad input.

Every user-facing failure is a subclass of :class:`MinitronError`; the CLI prints its message on one
line and exits with status 2, so a message must name the offending field, key, path or value.
"""


class MinitronError(Exception):
    """Base class for errors caused by the user's input (as opposed to bugs)."""


class ConfigError(MinitronError, ValueError):
    """An architecture, parallel-layout or recipe configuration that this family cannot represent."""


class CheckpointError(MinitronError):
    """A missing, corrupt or inconsistent checkpoint file."""
