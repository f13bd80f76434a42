"""Errors that stop a stage with a message for the user instead of a traceback."""


class Cifar2Error(Exception):
    """Base class for failures caused by the user's input, data or configuration.

    Stage scripts catch it, log its message and exit with status 1. Every message names the bad
    value and what to do about it.
    """


class ParamsError(Cifar2Error, ValueError):
    """A key of ``params.yaml`` (or of a sweep configuration) is missing, unknown or invalid."""


class ArchiveError(Cifar2Error):
    """The CIFAR-10 archive is missing, corrupt, truncated or not in the official layout."""


class VerificationError(Cifar2Error):
    """A verification stage measured an error above its tolerance."""


class SelectionError(Cifar2Error):
    """No sweep configuration can be selected, for example because all of them diverged."""
