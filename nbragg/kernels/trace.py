"""The tracing mode of the pixel walk (``-printout``): the forward model of one pixel,
recording every sample.

Each row of ``rows`` is one sample, in walk order, with the columns named in COLUMNS;
``skipped`` is 1 for a sample that -dmin cut (only its position and q are set) and 2 for
an orientation whose lattice factor was 0 (its structure factor not looked up).
"""

import math

import numpy as np
from .. import _jitcache  # noqa: F401  (nbragg's cache keys, before any cached function)
from numba import njit

from .cpu import _forward_finish, term
from .pixel import add_term
from .pixel import specialise

COLUMNS = ("layer", "subS", "subF", "source", "orientation", "skipped", "px", "py", "pz", "qx", "qy", "qz", "stol",
           "h", "k", "l", "h0", "k0", "l0", "F_cell", "F_latt", "omega", "polar", "capture", "I")
(C_LAYER, C_SUBS, C_SUBF, C_SOURCE, C_ORIENT, C_SKIPPED, C_PX, C_PY, C_PZ, C_QX, C_QY, C_QZ, C_STOL, C_H, C_K, C_L,
 C_H0, C_K0, C_L0, C_FCELL, C_FLATT, C_OMEGA, C_POLAR, C_CAPTURE, C_I) = range(len(COLUMNS))


@njit(cache=True, error_model="numpy")
def _row(W, t, subS, subF, s, qx, qy, qz):
    count = W[1]           # W = (rows, count, pos), read by index (see pixel.py)
    pos = W[2]
    r = W[0][count[0]]
    count[0] += 1
    r[C_LAYER] = t
    r[C_SUBS] = subS
    r[C_SUBF] = subF
    r[C_SOURCE] = s
    r[C_PX] = pos[0]
    r[C_PY] = pos[1]
    r[C_PZ] = pos[2]
    r[C_QX] = qx
    r[C_QY] = qy
    r[C_QZ] = qz
    r[C_STOL] = 0.5 * math.sqrt(qx * qx + qy * qy + qz * qz)
    return r


@njit(cache=True, error_model="numpy")
def _trace_subpixel(W, S, fpixel, spixel, subF, subS, t, px, py, pz, R, dx, dy, dz):
    pos = W[2]
    pos[0] = px
    pos[1] = py
    pos[2] = pz


@njit(cache=True, error_model="numpy")
def _trace_cut(W, S, t, subS, subF, s, px, py, pz, qx, qy, qz):
    r = _row(W, t, subS, subF, s, qx, qy, qz)
    r[C_SKIPPED] = 1


@njit(cache=True, error_model="numpy")
def _trace_block(W, S, I, qx, qy, qz, capture, polar, omega, t, subS, subF, s, sub):
    orients = S.xtal.orients
    for o in range(orients.shape[0]):
        h, k, l, h0, k0, l0, F_latt, F_cell, counted, T = term(orients, o, qx, qy, qz, S, s)
        r = _row(W, t, subS, subF, s, qx, qy, qz)
        r[C_ORIENT] = o
        r[C_H] = h
        r[C_K] = k
        r[C_L] = l
        r[C_H0] = h0
        r[C_K0] = k0
        r[C_L0] = l0
        r[C_FLATT] = F_latt
        r[C_OMEGA] = omega
        r[C_POLAR] = polar
        r[C_CAPTURE] = capture
        if counted:
            I = add_term(I, T, S.samp, capture, polar, omega)
            r[C_FCELL] = F_cell
        else:
            r[C_SKIPPED] = 2
        r[C_I] = I
    return I


@njit(cache=True, error_model="numpy")
def _trace_finish(W, S, I, capture, polar, omega, omega_sum, bg):
    value, _ = _forward_finish(W, S, I, capture, polar, omega, omega_sum, bg)
    return value, I, capture, polar, omega


walk_trace = specialise("trace", subpixel=_trace_subpixel, cut=_trace_cut, block=_trace_block,
                        finish=_trace_finish)


def trace_samples(S, fpixel, spixel):
    """(value before r_e^2 fluence / steps, the sum I, capture, polar, omega, rows) for one
    pixel: the forward walk, recording every sample (see COLUMNS)."""
    det = S.det
    n = det.thicksteps * det.oversample ** 2 * S.beam.sources.shape[0] * max(S.xtal.orients.shape[0], 1)
    rows = np.zeros((n, len(COLUMNS)))
    count = np.zeros(1, dtype=np.int64)
    pos = np.zeros(3)
    value, I, capture, polar, omega = walk_trace(fpixel, spixel, S, (rows, count, pos))
    return value, I, capture, polar, omega, rows[:count[0]]
