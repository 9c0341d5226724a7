"""Amorphous-scattering tables: structure factor F against sin(theta)/lambda.

The text format nonBragg.c reads: one row per line, the first column the abscissa and the
second F; further columns are ignored.  Leading blanks, tabs and ``,;:!`` are skipped,
blank lines too, and a row with one number has F = 0.  The abscissa is sin(theta)/lambda
in 1/A (``units="stol"``), 4 sin(theta)/lambda (``"4stol"``) or Q = 4 pi sin(theta)/lambda
(``"Q"``).

Where nbragg differs from nonBragg.c (see the README):

* a line that does not start with a number (a ``#`` comment, a column title) is skipped;
  nonBragg.c reads it as a row (0, 0), and two such rows at stol 0 make every pixel near
  the beam NaN (0/0 in the interpolation);
* rows out of order are sorted (with a warning): nonBragg.c keeps the file's order and
  then interpolates with a search whose result depends on the pixel evaluated before;
* two rows at the same abscissa are an error (nonBragg.c gives NaN pixels).
"""

from __future__ import annotations

import gzip
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputFileError, ParameterError
from ._text import read_bytes

UNITS = ("stol", "4stol", "Q")

# the factor that turns the first column into sin(theta)/lambda in 1/m, as nonBragg.c
# computes it (the same double operations, so that stol tables land on the same values)
_TO_PER_M = {"stol": 1.0e10, "4stol": 1e10 / 4, "Q": 1e10 / math.pi / 4}

_DELIMITERS = " \t,;:!"
_NUMBER_CHARS = set("0123456789-+.EGeg")


def _leading_float(text):
    """(value, consumed): the longest prefix of ``text`` that is a decimal number, as C's
    atof reads it (consumed 0 when there is none)."""
    best = (0.0, 0)
    n = len(text)
    end = 0
    while end < n and text[end] in _NUMBER_CHARS:
        end += 1
    for stop in range(end, 0, -1):
        try:
            return float(text[:stop]), stop
        except ValueError:
            continue
    return best


def parse_rows(text, where):
    """[(line number, abscissa, F)] from a table's text, F NaN where the row has one
    number."""
    rows = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.lstrip(_DELIMITERS)
        if not line.strip():
            continue
        x, used = _leading_float(line)
        if used == 0:
            continue            # a comment or a title (nonBragg.c: a row 0 0)
        rest = line[used:]
        # like the C reader: skip what is left of the token, then the delimiters
        i = 0
        while i < len(rest) and rest[i] not in _DELIMITERS:
            i += 1
        rest = rest[i:].lstrip(_DELIMITERS)
        F, used_f = _leading_float(rest)
        if not rest.strip():
            F = math.nan
        elif used_f == 0:
            F = 0.0             # atof of text
        for what, v in (("first column", x), ("F", F)):
            if math.isinf(v) or (what == "first column" and math.isnan(v)):
                raise InputFileError(f"{where} line {lineno}: the {what} {v!r} is not a finite number")
        rows.append((lineno, x, F))
    return rows


@dataclass(frozen=True)
class StolTable:
    """A parsed table: ``stol_per_m`` (sin(theta)/lambda in 1/m, increasing, converted
    from the file's column with nonBragg.c's operations) and ``F``, with where they came
    from."""

    stol_per_m: np.ndarray
    F: np.ndarray
    source: str

    @property
    def stol(self):
        """sin(theta)/lambda in 1/A."""
        return self.stol_per_m / 1e10



def table_from_rows(rows, where, units="stol", warn=None):
    """A :class:`StolTable` from parsed rows: the abscissae converted, the rows sorted and
    checked."""
    if units not in UNITS:
        raise ParameterError(f"{where}: table units {units!r}; expected one of {', '.join(UNITS)}")
    if not rows:
        raise InputFileError(f"{where} holds no rows of numbers")
    lines = np.array([r[0] for r in rows])
    x = np.array([r[1] for r in rows], dtype=float) * _TO_PER_M[units]
    F = np.array([r[2] for r in rows], dtype=float)
    if np.any(np.diff(x) < 0):
        first = int(np.argmax(np.diff(x) < 0)) + 1
        msg = (f"{where}: rows are not in increasing order (line {lines[first]} comes after line "
               f"{lines[first - 1]}); nbragg sorts them, nonBragg.c would interpolate in the file's order")
        if warn is not None:
            warn(msg)
        order = np.argsort(x, kind="stable")
        x, F, lines = x[order], F[order], lines[order]
    same = np.flatnonzero(np.diff(x) == 0)
    if same.size:
        i = int(same[0])
        raise InputFileError(f"{where}: lines {lines[i]} and {lines[i + 1]} give the same abscissa "
                             f"{x[i] / _TO_PER_M[units]:g}; interpolation through them is undefined")
    F[np.isnan(F)] = 0.0                # a row with one number: F = 0
    return StolTable(stol_per_m=x, F=F, source=where)


def read_stol(path, units="stol", warn=None):
    """Read a table file (plain or gzip-compressed) into a :class:`StolTable`."""
    where = f"table file {str(path)!r}"
    raw = read_bytes(path, "table")
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise InputFileError(f"{where} is not a valid gzip file: {exc}") from None
    text = raw.decode("latin-1")
    return table_from_rows(parse_rows(text, where), where, units, warn)


_cache = {}


def read_stol_cached(path, units="stol", warn=None):
    """:func:`read_stol`, remembered per file (name, size, modification time) and units,
    so that a Material re-made with one field changed (a refinement step) does not parse
    its file again.  The warnings are replayed."""
    import os
    try:
        st = os.stat(path)
        key = (os.path.abspath(path), st.st_size, st.st_mtime_ns, units)
    except OSError:
        return read_stol(path, units, warn)         # the reader reports the error
    if key not in _cache:
        notes = []
        _cache[key] = (read_stol(path, units, notes.append), tuple(notes))
    table, notes = _cache[key]
    for note in notes:
        if warn is not None:
            warn(note)
    return table


#: the tables shipped with nbragg: name -> (file, density g/cm^3, molecular weight g/mol)
#: (see nbragg/data/README.md for their sources)
BUILTIN = {
    "water": ("water.stol.gz", 1.0, 18.0),
    "ice": ("ice.stol", 0.92, 18.0),
    "nanoice": ("nanoice.stol", 0.92, 18.0),
    "air": ("air.stol", 0.0012, 28.8),
    "helium": ("helium.stol", 0.000166, 4.0026),
}


def builtin_path(name):
    return Path(__file__).resolve().parent.parent / "data" / BUILTIN[name][0]
