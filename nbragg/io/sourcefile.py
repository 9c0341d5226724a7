"""Source lists (``-sourcefile``): one source per line, ``X Y Z [weight [lambda]]``.

X Y Z is the position of the source relative to the sample (any length; only the
direction is used; missing values default to ``-source_distance`` times the beam
vector), lambda is in metres (missing: the run's wavelength).  nanoBragg.c reads but
ignores the weight: every source counts equally, and so does nbragg unless
``-source_weights`` (Beam.source_weights) is given.  Fields may be
separated by blanks, tabs, or ``, ; : !``.  Blank lines and ``#`` comment lines are
skipped.
"""

import numpy as np

from ..errors import InputFileError
from ._text import numeric_rows


def read_sourcefile(path):
    """Return an (n, 5) array X Y Z weight lambda_m with NaN for missing columns."""
    rows = []
    for where, values in numeric_rows(path, "source", " \t,;:!", "X Y Z weight lambda"):
        row = values + [np.nan] * (5 - len(values))
        if len(values) > 4 and values[4] <= 0:
            raise InputFileError(f"{where}: wavelength {values[4]:g} m is not positive")
        rows.append(row)
    if not rows:
        raise InputFileError(f"source file {path!r} holds no sources")
    return np.array(rows, dtype=float)
