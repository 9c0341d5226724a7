"""Structure factors: HKL text files and the binary Fdump cache.

An HKL file has one reflection per line: ``h k l F`` and optionally more columns
(phase, sigma...) that are ignored.  Blank lines and lines starting with ``#`` are
skipped.  Indices that are not integers are rounded to the nearest integer with a
warning (nanoBragg.c warns too).  A later line for the same hkl replaces an earlier one.
"""

import logging
import math
import os

import numpy as np

from ..errors import InputFileError
from ._text import parse_float, read_text

log = logging.getLogger(__name__)


class HKLData:
    """A list of reflections: integer indices (n, 3) and amplitudes (n,)."""

    def __init__(self, indices, amplitudes, source=None):
        self.indices = np.asarray(indices, dtype=np.int64).reshape(-1, 3)
        self.amplitudes = np.asarray(amplitudes, dtype=np.float64).reshape(-1)
        self.source = source

    def __len__(self):
        return len(self.amplitudes)

    def to_grid(self, default_F):
        """Dense grid covering the index ranges, unlisted points set to ``default_F``.

        Returns ``(grid, (h_min, k_min, l_min))``.
        """
        lo = self.indices.min(axis=0)
        hi = self.indices.max(axis=0)
        shape = tuple(int(x) for x in hi - lo + 1)
        grid = np.full(shape, float(default_F))
        rel = self.indices - lo
        grid[rel[:, 0], rel[:, 1], rel[:, 2]] = self.amplitudes
        return grid, tuple(int(x) for x in lo)


def read_hkl(path, warn=None):
    """Read an HKL text file.  ``warn(message)`` receives non-fatal remarks."""
    text = read_text(path, "HKL")
    idx = []
    amps = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        fields = stripped.replace(",", " ").split()
        where = f"HKL file {path!r} line {lineno}"
        if len(fields) < 4:
            raise InputFileError(f"{where}: expected 'h k l F', found {len(fields)} column(s): {stripped!r}")
        values = [parse_float(tok, where) for tok in fields[:4]]
        hkl = []
        for name, v in zip("hkl", values[:3]):
            r = math.floor(v + 0.5)
            if r != v:
                if warn is not None:
                    warn(f"{where}: non-integer {name} = {v:g}, rounded to {r}")
            if abs(r) > 1_000_000:
                raise InputFileError(f"{where}: index {name} = {v:g} is out of range")
            hkl.append(int(r))
        idx.append(hkl)
        amps.append(values[3])
    if not idx:
        raise InputFileError(f"HKL file {path!r} holds no reflections")
    data = HKLData(idx, amps, source=os.fspath(path))
    lo = data.indices.min(axis=0)
    hi = data.indices.max(axis=0)
    npoints = float(np.prod((hi - lo + 1).astype(float)))
    if npoints > 2e8:
        raise InputFileError(
            f"HKL file {path!r}: index ranges {lo.tolist()}..{hi.tolist()} need a grid of {npoints:.3g} points; too large")
    return data


# ----------------------------------------------------------------------------- Fdump

def write_hkl(path, indices, amplitudes):
    """A nanoBragg HKL text file: one ``h k l F`` line per reflection."""
    idx = np.asarray(indices, dtype=np.int64).reshape(-1, 3)
    amp = np.asarray(amplitudes, dtype=np.float64).reshape(-1)
    with open(path, "w") as fh:
        for (h, k, l), f in zip(idx.tolist(), amp.tolist()):
            fh.write(f"{h} {k} {l} {f:.6g}\n")


def write_fdump(path, grid, origin):
    """Write the binary structure-factor cache in nanoBragg.c's ``Fdump.bin`` layout.

    The layout is a text line ``h_min h_max k_min k_max l_min l_max`` followed by a
    newline and a form feed, then ``(nh+1)*(nk+1)*(nl+1)`` native doubles (each axis
    padded by one zero, as the C allocates).  Written atomically.
    """
    grid = np.asarray(grid, dtype=np.float64)
    nh, nk, nl = grid.shape
    h0, k0, l0 = origin
    padded = np.zeros((nh + 1, nk + 1, nl + 1))
    padded[:nh, :nk, :nl] = grid
    header = f"{h0} {h0 + nh - 1} {k0} {k0 + nk - 1} {l0} {l0 + nl - 1}\n\f".encode()
    from .atomic import atomic_write
    atomic_write(path, header, padded)


def read_fdump(path):
    """Read a structure-factor cache written by :func:`write_fdump` or by nanoBragg.c."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        raise InputFileError(f"Fdump file {path!r} cannot be read: {exc.strerror}") from None
    end = raw.find(b"\f")
    if end < 0 or end > 200:
        raise InputFileError(f"Fdump file {path!r} has no header line (expected six integers and a form feed)")
    try:
        h_min, h_max, k_min, k_max, l_min, l_max = (int(x) for x in raw[:end].split())
    except ValueError:
        raise InputFileError(f"Fdump file {path!r}: header {raw[:end]!r} is not six integers") from None
    nh, nk, nl = h_max - h_min + 1, k_max - k_min + 1, l_max - l_min + 1
    if min(nh, nk, nl) <= 0 or nh * nk * nl > 2e9:
        raise InputFileError(f"Fdump file {path!r}: bad index ranges in header {raw[:end]!r}")
    need = (nh + 1) * (nk + 1) * (nl + 1) * 8
    body = raw[end + 1:]
    if len(body) < need:
        raise InputFileError(f"Fdump file {path!r} is truncated: {len(body)} data bytes, expected {need}")
    padded = np.frombuffer(body[:need], dtype=np.float64).reshape(nh + 1, nk + 1, nl + 1)
    grid = padded[:nh, :nk, :nl].copy()
    if not np.all(np.isfinite(grid)):
        raise InputFileError(f"Fdump file {path!r} holds non-finite structure factors")
    return grid, (h_min, k_min, l_min)
