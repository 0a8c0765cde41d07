"""Exceptions that the CLI turns into a one-line ``error: ...`` message and a non-zero exit.

Every message names the file/subject/flag at fault and says what to do.
"""


class Octa3dError(Exception):
    """Base class of the errors a user can fix."""


class ConfigError(Octa3dError, ValueError):
    """A configuration value or file is invalid."""


class DataError(Octa3dError):
    """The data root, a scan, or the labels cannot be used as they are."""


class LeakageError(Octa3dError):
    """A stage was about to use a subject from a split it must never see (e.g. test subjects in training)."""


class RunExistsError(Octa3dError):
    """A stage folder already holds results and ``--overwrite`` was not given."""


class DiskFullError(Octa3dError):
    """A write failed because the file system is full (or the user's disk quota is spent)."""
