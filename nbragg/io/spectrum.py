"""Spectrum files (``-spectrum FILE``): one channel per line, ``wavelength_A weight``.

Weights are relative (they are normalised).  Fields may be separated by blanks, tabs or
``, ;``; blank lines and ``#`` comment lines are skipped.
"""

import numpy as np

from ..errors import InputFileError
from ._text import numeric_rows


def read_spectrum(path):
    """(wavelengths_A, weights) from a spectrum file."""
    lam, w = [], []
    for where, values in numeric_rows(path, "spectrum", " \t,;", "wavelength_A weight"):
        if len(values) != 2:
            raise InputFileError(f"{where}: expected 2 columns (wavelength_A weight), found {len(values)}")
        x, y = values
        if x <= 0:
            raise InputFileError(f"{where}: wavelength {x:g} A is not positive")
        if y < 0:
            raise InputFileError(f"{where}: weight {y:g} is negative")
        lam.append(x)
        w.append(y)
    if not lam:
        raise InputFileError(f"spectrum file {path!r} holds no channels")
    if not sum(w) > 0:
        raise InputFileError(f"spectrum file {path!r}: every weight is 0")
    return np.array(lam), np.array(w)
