"""Helpers shared by the file readers."""

import math
import re

from ..errors import InputFileError


def read_bytes(path, what):
    """A file's bytes, with OS errors turned into :class:`InputFileError` naming ``what``."""
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except FileNotFoundError:
        raise InputFileError(f"{what} file {path!r} does not exist") from None
    except IsADirectoryError:
        raise InputFileError(f"{what} file {path!r} is a directory") from None
    except OSError as exc:
        raise InputFileError(f"{what} file {path!r} cannot be read: {exc.strerror}") from None


def read_text(path, what):
    """Read a text file, turning OS and decoding errors into :class:`InputFileError`."""
    raw = read_bytes(path, what)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        try:
            return raw.decode("latin-1")
        except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes every byte
            raise InputFileError(f"{what} file {path!r} is not a text file") from None


def parse_float(token, where):
    """A finite float, or an :class:`InputFileError` naming ``where`` and the token."""
    try:
        value = float(token)
    except ValueError:
        raise InputFileError(f"{where}: {token!r} is not a number") from None
    if not math.isfinite(value):
        raise InputFileError(f"{where}: {token!r} is not a finite number")
    return value


def numeric_rows(path, what, separators, columns):
    """(where, values) for each data line of a text table of numbers: fields split on
    runs of the characters ``separators``, blank and ``#`` lines skipped.  ``columns``
    names the columns ("X Y Z weight lambda"): a line with more fields is an error that
    names the file and line, as is a field that is not a finite number."""
    split = re.compile("[" + re.escape(separators) + "]+")
    most = len(columns.split())
    for lineno, line in enumerate(read_text(path, what).splitlines(), start=1):
        stripped = line.strip(separators + "\r\n")
        if not stripped or stripped.startswith("#"):
            continue
        fields = [f for f in split.split(stripped) if f]
        where = f"{what} file {path!r} line {lineno}"
        if len(fields) > most:
            raise InputFileError(f"{where}: expected at most {most} columns ({columns}), found {len(fields)}")
        yield where, [parse_float(tok, where) for tok in fields]
