"""Per-sample physics shared by the CPU and GPU kernels.

Small pure functions of floats, compiled with Numba.  Trigonometry of the lattice
transform is done with ``sinpi``/``cospi`` (sin and cos of pi*x) after an exact
reduction of x to [-1/2, 1/2]: cheaper than libm and accurate to a few ulp even where
pi*N*h is large, which is where plain ``sin`` loses digits.
"""

import math

from numba import njit

# sin(pi r) = r * P(r^2) and cos(pi r) = Q(r^2) for |r| <= 1/2; minimax fits with
# relative error below 1e-18 (P) and absolute error below 1e-19 (Q) before rounding.
_P0 = 3.141592653589793
_P1 = -5.167712780049969
_P2 = 2.55016403987732
_P3 = -0.5992645293201467
_P4 = 0.0821458866027277
_P5 = -0.007370430882891271
_P6 = 0.0004663025196106766
_P7 = -2.1914546007020413e-05
_P8 = 7.938260335562545e-07
_P9 = -2.1637708848852173e-08

_Q0 = 1.0
_Q1 = -4.934802200544679
_Q2 = 4.058712126416768
_Q3 = -1.3352627688545688
_Q4 = 0.23533063035856358
_Q5 = -0.025806891386933862
_Q6 = 0.0019295742914554475
_Q7 = -0.00010463803772763892
_Q8 = 4.302907834841192e-06
_Q9 = -1.3854731434980876e-07
_Q10 = 3.398814699264509e-09

# shape codes
SQUARE = 0
ROUND = 1
GAUSS = 2
TOPHAT = 3

ROUND_SCALE = 0.723601254558268  # sqrt of the cube/sphere volume ratio (nanoBragg)
GAUSS_WIDTH = 0.63
TOPHAT_RADIUS_SQR = 0.3969


@njit(cache=True, error_model="numpy")
def _sinpi_reduced(r):
    s = r * r
    p = _P9
    p = p * s + _P8
    p = p * s + _P7
    p = p * s + _P6
    p = p * s + _P5
    p = p * s + _P4
    p = p * s + _P3
    p = p * s + _P2
    p = p * s + _P1
    p = p * s + _P0
    return r * p


@njit(cache=True, error_model="numpy")
def _cospi_reduced(r):
    s = r * r
    p = _Q10
    p = p * s + _Q9
    p = p * s + _Q8
    p = p * s + _Q7
    p = p * s + _Q6
    p = p * s + _Q5
    p = p * s + _Q4
    p = p * s + _Q3
    p = p * s + _Q2
    p = p * s + _Q1
    p = p * s + _Q0
    return p


@njit(cache=True, error_model="numpy")
def _parity_sign(n):
    # (-1)^n for an integral float n
    return 1.0 - 2.0 * (n - 2.0 * math.floor(0.5 * n))


@njit(cache=True, error_model="numpy")
def sinpi(x):
    """sin(pi*x)."""
    n = math.floor(x + 0.5)
    return _parity_sign(n) * _sinpi_reduced(x - n)


@njit(cache=True, error_model="numpy")
def cospi(x):
    """cos(pi*x)."""
    n = math.floor(x + 0.5)
    return _parity_sign(n) * _cospi_reduced(x - n)


@njit(cache=True, error_model="numpy")
def nearest_index(h):
    """nanoBragg's rounding to the nearest Miller index: ceil(h - 0.5)."""
    return math.ceil(h - 0.5)


@njit(cache=True, error_model="numpy")
def sinpi_sq_parts(delta, N):
    """(sin(pi N delta)^2-ready numerator, denominator) for |delta| <= 1/2, N > 1.

    Returns (num, den) with |num/den| = |sin(N pi delta) / sin(pi delta)|, and (N, 1)
    at delta = 0.  The sign is not tracked (callers square it), which saves the parity
    arithmetic in the innermost loop.
    """
    x = N * delta
    num = _sinpi_reduced(x - math.floor(x + 0.5))
    den = _sinpi_reduced(delta)
    if den == 0.0:
        return N, 1.0
    return num, den


@njit(cache=True, error_model="numpy")
def sincg_frac(delta, N):
    """|sin(N pi h) / sin(pi h)| written on the fractional index delta = h - h0.

    For integer N this equals the magnitude of nanoBragg's ``sincg(pi*h, N)``; it is
    smooth in N, so N can be refined.  The value at delta = 0 is N.
    """
    den = sinpi(delta)
    if den == 0.0:
        return N
    return sinpi(N * delta) / den


@njit(cache=True, error_model="numpy")
def sinc3(x):
    """3 (sin x - x cos x) / x^3, the transform of a sphere (1 at x = 0)."""
    ax = abs(x)
    if ax < 0.02:
        x2 = x * x
        return 1.0 - x2 / 10.0 + x2 * x2 / 280.0 - x2 * x2 * x2 / 15120.0
    return 3.0 * (math.sin(x) / x - math.cos(x)) / (x * x)


@njit(cache=True, error_model="numpy")
def polarization_factor(kahn, ix, iy, iz, dx, dy, dz, px, py, pz):
    """nanoBragg's polarization factor for unit incident i, diffracted d and E-axis p."""
    c2 = ix * dx + iy * dy + iz * dz
    c2sqr = c2 * c2
    s2sqr = 1.0 - c2sqr
    psi = 0.0
    if kahn != 0.0:
        # B_in = unit(p x i); E_in = unit(i x B_in)
        bx = py * iz - pz * iy
        by = pz * ix - px * iz
        bz = px * iy - py * ix
        bm = math.sqrt(bx * bx + by * by + bz * bz)
        if bm != 0.0:
            bx /= bm
            by /= bm
            bz /= bm
        else:
            bx = 0.0
            by = 0.0
            bz = 0.0
        ex = iy * bz - iz * by
        ey = iz * bx - ix * bz
        ez = ix * by - iy * bx
        em = math.sqrt(ex * ex + ey * ey + ez * ez)
        if em != 0.0:
            ex /= em
            ey /= em
            ez /= em
        else:
            ex = 0.0
            ey = 0.0
            ez = 0.0
        eo = dx * ex + dy * ey + dz * ez
        bo = dx * bx + dy * by + dz * bz
        psi = -math.atan2(bo, eo)
    return 0.5 * (1.0 + c2sqr - kahn * math.cos(2.0 * psi) * s2sqr)


@njit(cache=True, error_model="numpy")
def lagrange4(t):
    """Cubic Lagrange weights on nodes -1, 0, 1, 2 at t (nanoBragg's polint)."""
    w0 = t * (t - 1.0) * (t - 2.0) / -6.0
    w1 = (t + 1.0) * (t - 1.0) * (t - 2.0) / 2.0
    w2 = (t + 1.0) * t * (t - 2.0) / -2.0
    w3 = (t + 1.0) * t * (t - 1.0) / 6.0
    return w0, w1, w2, w3
