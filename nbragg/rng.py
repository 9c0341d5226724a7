"""Bit-exact replicas of the random-number routines nanoBragg.c uses.

nanoBragg.c draws mosaic domains, random missetting angles and Poisson noise from the
Numerical-Recipes generator ``ran1`` (Park-Miller minimal standard with a Bays-Durham
shuffle table).  The shuffle table and its cursor are *static* in the C, i.e. shared by
every seed variable in one run; a seed that is negative (or zero) reloads the table.
:class:`NRGenerator` keeps that shared state so that a sequence of draws from several
seeds reproduces the C run exactly.  Single-precision (``float``) arithmetic is kept
where the C uses it, because a one-ulp difference can flip a rejection decision.
"""

import math

import numpy as np
from . import _jitcache  # noqa: F401  (nbragg's cache keys, before any cached function)
from numba import njit

from .models.geometry import cos, sin

_IA = 16807
_IM = 2147483647
_AM = 1.0 / _IM
_IQ = 127773
_IR = 2836
_NTAB = 32
_NDIV = 1 + (_IM - 1) // _NTAB
_RNMX = np.float32(1.0 - 1.2e-7)

# state layout (int64): [0] = iy, [1:33] = shuffle table iv
_STATE_SIZE = 1 + _NTAB
# float-state layout (float64): poidev cache [0]=oldm [1]=g [2]=sq [3]=alxm,
# gaussdev spare [4]=iset [5]=gset
_FSTATE_SIZE = 6

# The draws run one at a time, each a call that takes the state's arrays.  Numba counts
# references to a function's array arguments (an atomic increment and decrement each, per
# call) and removes the pairs only where it can follow them; around gaussdev's and
# poidev's rejection loops it cannot, and the counting took half of a noise image's time.
# These allocate nothing, so they are compiled without Numba's runtime: no counting.
_UNCOUNTED = {"_nrt": False}


@njit(cache=True, **_UNCOUNTED)
def ran1(idum, state):
    """One uniform deviate in (0, 1) as a float32; ``idum`` is a 1-element int64 array."""
    if idum[0] <= 0 or state[0] == 0:
        if -idum[0] < 1:
            idum[0] = 1
        else:
            idum[0] = -idum[0]
        for j in range(_NTAB + 7, -1, -1):
            k = idum[0] // _IQ
            idum[0] = _IA * (idum[0] - k * _IQ) - _IR * k
            if idum[0] < 0:
                idum[0] += _IM
            if j < _NTAB:
                state[1 + j] = idum[0]
        state[0] = state[1]
    k = idum[0] // _IQ
    idum[0] = _IA * (idum[0] - k * _IQ) - _IR * k
    if idum[0] < 0:
        idum[0] += _IM
    j = state[0] // _NDIV
    state[0] = state[1 + j]
    state[1 + j] = idum[0]
    temp = np.float32(_AM * state[0])
    if temp > _RNMX:
        return _RNMX
    return temp


@njit(cache=True)
def _gammln(xx):
    # argument and result are C floats; the series runs in double
    cof0 = 76.18009172947146
    cof1 = -86.50532032941677
    cof2 = 24.01409824083091
    cof3 = -1.231739572450155
    cof4 = 0.1208650973866179e-2
    cof5 = -0.5395239384953e-5
    x = np.float64(xx)
    y = x
    tmp = x + 5.5
    tmp -= (x + 0.5) * math.log(tmp)
    ser = 1.000000000190015
    y += 1.0
    ser += cof0 / y
    y += 1.0
    ser += cof1 / y
    y += 1.0
    ser += cof2 / y
    y += 1.0
    ser += cof3 / y
    y += 1.0
    ser += cof4 / y
    y += 1.0
    ser += cof5 / y
    return np.float32(-tmp + math.log(2.5066282746310005 * ser / x))


@njit(cache=True, **_UNCOUNTED)
def gaussdev(idum, state, fstate):
    """Gaussian deviate (Box-Muller, polar form) as a float32, with the C's spare value."""
    if fstate[4] == 0.0:
        while True:
            v1 = np.float32(2.0 * np.float64(ran1(idum, state)) - 1.0)
            v2 = np.float32(2.0 * np.float64(ran1(idum, state)) - 1.0)
            rsq = np.float32(v1 * v1 + v2 * v2)
            if not (rsq >= 1.0 or rsq == 0):
                break
        fac = np.float32(math.sqrt(-2.0 * math.log(np.float64(rsq)) / np.float64(rsq)))
        fstate[5] = np.float32(v1 * fac)
        fstate[4] = 1.0
        return np.float32(v2 * fac)
    fstate[4] = 0.0
    return np.float32(fstate[5])


@njit(cache=True, **_UNCOUNTED)
def poidev(xm, idum, state, fstate):
    """Poisson deviate with mean ``xm`` (a float32), exactly as nanoBragg.c computes it.

    Below 12 the direct (multiplied-uniforms) method, up to 1e6 the Lorentzian rejection
    method, above that a Gaussian approximation.
    """
    xm = np.float32(xm)
    if xm > 1.0e6:
        return np.float32(np.float64(xm) + math.sqrt(np.float64(xm)) * np.float64(gaussdev(idum, state, fstate)))
    if xm < 12.0:
        if np.float32(fstate[0]) != xm:
            fstate[0] = xm
            fstate[1] = np.float32(math.exp(-np.float64(xm)))
        g = np.float32(fstate[1])
        em = np.float32(-1.0)
        t = np.float32(1.0)
        while True:
            em = np.float32(em + np.float32(1.0))
            t = np.float32(t * ran1(idum, state))
            if not (t > g):
                break
        return em
    if np.float32(fstate[0]) != xm:
        fstate[0] = xm
        fstate[2] = np.float32(math.sqrt(2.0 * np.float64(xm)))
        alxm = np.float32(math.log(np.float64(xm)))
        fstate[3] = alxm
        fstate[1] = np.float32(np.float32(xm * alxm) - _gammln(np.float32(np.float64(xm) + 1.0)))
    sq = np.float32(fstate[2])
    alxm = np.float32(fstate[3])
    g = np.float32(fstate[1])
    while True:
        while True:
            y = np.float32(math.tan(math.pi * np.float64(ran1(idum, state))))
            em = np.float32(np.float32(sq * y) + xm)
            if not (em < 0.0):
                break
        em = np.float32(math.floor(np.float64(em)))
        arg = np.float32(np.float32(np.float32(em * alxm) - _gammln(np.float32(np.float64(em) + 1.0))) - g)
        t = np.float32(0.9 * (1.0 + np.float64(np.float32(y * y))) * math.exp(np.float64(arg)))
        if not (ran1(idum, state) > t):
            break
    return em


class NRGenerator:
    """The C program's shared generator state plus its seed variables.

    One instance stands for one nanoBragg.c process: draws from different seeds share
    the shuffle table as they do in the C.
    """

    def __init__(self):
        self.state = np.zeros(_STATE_SIZE, dtype=np.int64)
        self.fstate = np.zeros(_FSTATE_SIZE, dtype=np.float64)
        self.fstate[0] = -1.0  # poidev's "oldm" starts at -1

    @staticmethod
    def seed_cell(seed):
        """A seed variable as the C stores it (``-atoi(value)`` for the seed flags)."""
        return np.array([seed], dtype=np.int64)

    def ran1(self, idum):
        return ran1(idum, self.state)


def mosaic_rotation_umat(mosaicity, idum, gen, single_precision=False):
    """A random rotation on a spherical cap of size ``mosaicity`` (radians), as nanoBragg.c.

    Returns ``(umat, axis, angle, shrink)``: the 3x3 matrix, its unit axis, its angle and
    the seed-fixed factor with angle = mosaicity * shrink.  The C forms that product in
    single precision; nbragg keeps the single-precision factor (``powf``, as the C) but
    multiplies in double, so that the angle is a smooth function of the spread (the
    difference is below 1e-7 of the angle).
    """
    r1 = 2.0 * float(gen.ran1(idum)) - 1.0
    r2 = 2.0 * float(gen.ran1(idum)) - 1.0
    r3 = 2.0 * float(gen.ran1(idum)) - 1.0
    xyrad = math.sqrt(1.0 - r2 * r2)
    with np.errstate(all="ignore"):
        shrink = float(np.power(np.float32(1.0 - r3 * r3), np.float32(1.0 / 3.0)))
    rot = mosaicity * shrink
    if single_precision:   # exactly the C's float product (used for -misset random)
        rot = float(np.float32(np.float32(mosaicity) * np.float32(shrink)))
    v1 = xyrad * math.sin(math.pi * r1)
    v2 = xyrad * math.cos(math.pi * r1)
    v3 = r2
    axis = np.array([v1, v2, v3])
    return axis_angle_matrix(axis, rot), axis, rot, shrink


def axis_angle_matrix(v, rot):
    """Rotation matrix by ``rot`` radians about the unit vector ``v`` (nanoBragg's form)."""
    v1, v2, v3 = v
    t1 = cos(rot)
    t2 = 1.0 - t1
    t8 = sin(rot)
    t6 = t2 * v1
    t7 = t6 * v2
    t9 = t8 * v3
    t11 = t6 * v3
    t12 = t8 * v2
    t19 = t2 * v2 * v3
    t20 = t8 * v1
    return np.array([
        [t1 + t2 * v1 * v1, t7 - t9, t11 + t12],
        [t7 + t9, t1 + t2 * v2 * v2, t19 - t20],
        [t11 - t12, t19 + t20, t1 + t2 * v3 * v3],
    ])


def umat2misset(umat):
    """Missetting angles (x, y, z rotations, radians) of a rotation matrix, as nanoBragg.c."""
    u = np.array(umat, dtype=float).copy()
    norms = np.sqrt((u * u).sum(axis=1))
    for i in range(3):
        if norms[i] > 0:
            u[i] /= norms[i]
    uzx, uzy, uzz = u[2]
    if uzx * uzx < 1.0:
        rotx = math.atan2(uzy, uzz)
        roty = math.atan2(-uzx, math.sqrt(uzy * uzy + uzz * uzz))
        rotz = math.atan2(u[1, 0], u[0, 0])
    else:
        rotx = math.atan2(1, 1) * 4
        roty = math.atan2(1, 1) * 2
        rotz = math.atan2(u[0, 1], -u[1, 1])
    return rotx, roty, rotz
