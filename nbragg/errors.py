"""Exceptions raised for user mistakes.

Every error a user can cause by what they typed or the files they pointed at is an
:class:`NbraggError`.  Its message names the flag, field or file (and line) and the
offending value; the command line prints it as one line and exits with status 2.
Anything else that escapes is a bug and keeps its traceback.
"""

import sys


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


def report(prog, exc, stream=None):
    """Print a user error as the commands do: one line, ``PROG: error: message``; returns
    the exit status for user errors (2)."""
    import sys
    print(f"{prog}: error: " + " ".join(str(exc).split()), file=stream or sys.stderr)
    return 2


def console_main(prog, run, argv=None):
    """A command's entry point: ``run(argv)``, with user errors reported by :func:`report`."""
    import sys
    argv = sys.argv[1:] if argv is None else argv
    try:
        status = run(argv)
        if sys.stdout is not None:   # (None: started with stdout closed)
            sys.stdout.flush()       # (here, where a reader that left is caught, not at exit)
        return status
    except NbraggError as exc:
        return report(prog, exc)
    except BrokenPipeError:          # (nbragg ... | head): the reader left; no traceback
        import os
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # (nothing left to flush at exit)
        except (OSError, ValueError, AttributeError):
            pass
        return 1


def console_streams(stdout=None, stderr=None):
    """(say, warn) for a command: ``say(line)`` prints to stdout, ``warn(msg)`` a WARNING
    line to stderr (the streams given, else the process's)."""
    out = stdout or sys.stdout
    err = stderr or sys.stderr

    def say(line=""):
        print(line, file=out)

    def warn(msg):
        print(f"WARNING: {msg}", file=err)
    return say, warn


def help_or_version(prog, usage, argv, out):
    """0 after printing ``usage`` for -h/-help/--help or the version for --version; None
    when the command should run."""
    if any(a in ("-h", "-help", "--help") for a in argv):
        print(usage, end="", file=out)
        return 0
    if "--version" in argv:
        from . import __version__
        print(f"{prog} {__version__}", file=out)
        return 0
    return None
