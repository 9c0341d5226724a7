"""Atomic file writes: write to a temporary name in the same folder, then rename."""

import contextlib
import os
import tempfile

from ..errors import InputFileError


def check_output_path(path, flag):
    """Raise a clear error now if ``path`` cannot be written later (missing folder)."""
    folder = os.path.dirname(os.path.abspath(os.fspath(path)))
    if not os.path.isdir(folder):
        raise InputFileError(f"{flag}: folder {folder!r} of output file {os.fspath(path)!r} does not exist")
    if os.path.isdir(path):
        raise InputFileError(f"{flag}: output path {os.fspath(path)!r} is a directory")


def check_output_paths(files, write_pgm=True, calculate_noise=True, float_out=True):
    """:func:`check_output_path` for the output files of nanoBragg's suite: ``files`` has
    ``floatfile`` (checked with ``float_out``; noisify reads it), ``intfile``, ``pgmfile``
    and ``noisefile``; the PGM and noise files only where they are written."""
    for flag, name, written in (("-floatfile", "floatfile", float_out), ("-intfile", "intfile", True),
                                ("-pgmfile", "pgmfile", write_pgm), ("-noisefile", "noisefile", calculate_noise)):
        path = getattr(files, name, None)
        if written and path is not None:
            check_output_path(path, flag)


def default_mode():
    """The mode a newly created file gets (0666 less the umask); mkstemp uses 0600."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def partial_name_pattern(path):
    """A glob for the temporary files :func:`atomic_path` makes for ``path``."""
    path = os.fspath(path)
    return os.path.join(os.path.dirname(os.path.abspath(path)), "." + os.path.basename(path) + ".*.part")


@contextlib.contextmanager
def atomic_path(path):
    """A temporary path beside ``path`` to write to: renamed onto ``path`` when the block
    ends, removed if it raises, so that readers never see a partial file."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".part", dir=folder)
    except OSError as exc:
        raise InputFileError(f"output file {path!r} cannot be written: {exc.strerror}") from None
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, default_mode())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError) and not isinstance(exc, InputFileError):
            raise InputFileError(f"output file {path!r} cannot be written: {exc.strerror or exc}") from None
        raise


@contextlib.contextmanager
def atomic_file(path):
    """A binary file object whose content replaces ``path`` (synced to disk) when the
    block ends without error."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())


def atomic_write(path, *parts):
    """Write ``parts`` one after another to ``path`` so that readers never see a partial
    file: bytes, or C-contiguous arrays, written as their raw bytes without a copy."""
    with atomic_file(path) as fh:
        for part in parts:
            fh.write(part)
