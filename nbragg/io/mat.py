"""MOSFLM-style orientation matrix files (``-mat``).

The first nine numbers are the reciprocal cell vectors as columns::

    a*_x b*_x c*_x
    a*_y b*_y c*_y
    a*_z b*_z c*_z

in Angstrom^-1 multiplied by the wavelength (MOSFLM's A matrix).  Anything after the
nine numbers (MOSFLM's U matrix, cell, missets) is ignored.
"""

import numpy as np

from ..errors import InputFileError
from ._text import parse_float, read_text


def read_mat(path):
    """Return the 3x3 matrix whose columns are a*, b*, c* (as written in the file)."""
    text = read_text(path, "A matrix")
    tokens = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        for tok in line.split():
            tokens.append((lineno, tok))
            if len(tokens) == 9:
                break
        if len(tokens) == 9:
            break
    if len(tokens) < 9:
        raise InputFileError(f"A matrix file {path!r} holds {len(tokens)} number(s); a 3x3 matrix needs 9")
    values = [parse_float(tok, f"A matrix file {path!r} line {lineno}") for lineno, tok in tokens]
    m = np.array(values, dtype=float).reshape(3, 3)
    # columns are the three reciprocal vectors; they must not be coplanar
    det = np.linalg.det(m)
    if not np.isfinite(det) or abs(det) < 1e-300 or abs(det) < 1e-12 * np.prod(np.linalg.norm(m, axis=0)):
        raise InputFileError(f"A matrix file {path!r}: the three reciprocal vectors are coplanar (determinant {det:g})")
    return m
