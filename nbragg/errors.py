"""Exceptions raised for user mistakes.

Every error a user can cause by what they typed or the files they pointed at is an
:class:`NbraggError`.  Its message names the flag, field or file (and line) and the
offending value; the command line prints it as one line and exits with status 2.
Anything else that escapes is a bug and keeps its traceback.
"""


class NbraggError(Exception):
    """Base class for every user-facing error in nbragg."""


class ArgumentError(NbraggError):
    """A command-line flag is missing a value or has a value that makes no sense."""


class InputFileError(NbraggError):
    """An input file is missing, unreadable or malformed."""


class ParameterError(NbraggError):
    """A model field (Python API) has an invalid value."""


class BackendError(NbraggError):
    """The requested compute backend is not available."""
