"""Per-sample physics shared by the CPU and GPU kernels.

Small pure functions of floats, compiled with Numba.  Trigonometry of the lattice
transform is done with ``sinpi``/``cospi`` (sin and cos of pi*x) after an exact
reduction of x to [-1/2, 1/2]: cheaper than libm and accurate to a few ulp even where
pi*N*h is large, which is where plain ``sin`` loses digits.
"""

import math

import numpy as np
from .. import _jitcache  # noqa: F401  (nbragg's cache keys, before any cached function)
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

# Precision hooks (see precision.py): ``real`` converts an integer where it meets floats,
# ``REAL`` is the dtype of working arrays; single-precision twins rebind both to float32.
# ``np.float64(...)`` is left alone: it marks a float64 accumulator.
real = float
REAL = np.float64
PI = math.pi
_INV_PI = 1.0 / math.pi

# shape codes
SQUARE = 0
ROUND = 1
GAUSS = 2
TOPHAT = 3
DOMAIN = 4     # nbragg's Gaussian domain of a full size matrix (Crystal.shape "gauss_domain")

ROUND_SCALE = 0.723601254558268  # sqrt of the cube/sphere volume ratio (nanoBragg)
GAUSS_WIDTH = 0.63
TOPHAT_RADIUS_SQR = 0.3969


# The polynomials may fuse each multiply-add into one FMA instruction ("contract": one
# rounding instead of two, so no less accurate); it halves their cost and latency in the
# vector loops.  Every CPU mode calls these same two functions, so forward, tangent and
# adjoint still agree bit for bit.  Elsewhere only the adjoint's sums over a block's lanes
# (derivs._lane_partial_sums) are contracted and reordered: gradients, not images.
@njit(cache=True, error_model="numpy", fastmath={"contract"})
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


@njit(cache=True, error_model="numpy", fastmath={"contract"})
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
    return 1.0 - 2.0 * (n - 2.0 * real(math.floor(0.5 * n)))


@njit(cache=True, error_model="numpy")
def sinpi(x):
    """sin(pi*x)."""
    n = real(math.floor(x + 0.5))
    return _parity_sign(n) * _sinpi_reduced(x - n)


@njit(cache=True, error_model="numpy")
def cospi(x):
    """cos(pi*x)."""
    n = real(math.floor(x + 0.5))
    return _parity_sign(n) * _cospi_reduced(x - n)


@njit(cache=True, error_model="numpy", inline="always")
def floor_float(x):
    """floor(x) as a float of x's type.  numpy's floor never leaves floating point (math's
    returns an integer), so loops over it vectorise, float32 ones at full width; the GPU
    twins take their own (cuda.py)."""
    return np.floor(x)


@njit(cache=True, error_model="numpy", inline="always")
def node_offset(h):
    """h minus its nearest node as nanoBragg rounds it, ceil(h - 1/2), kept in floating
    point (ceil(y) = -floor(-y) exactly, and 1/2 - h = -(h - 1/2) exactly), so vector
    loops need no integer conversions."""
    return h + floor_float(0.5 - h)


@njit(cache=True, error_model="numpy")
def sinpi_sq_parts(delta, N):
    """(sin(pi N delta)^2-ready numerator, denominator) for |delta| <= 1/2, N > 1.

    Returns (num, den) with |num/den| = |sin(N pi delta) / sin(pi delta)|, and (N, 1)
    at delta = 0.  The sign is not tracked (callers square it), which saves the parity
    arithmetic in the innermost loop.
    """
    x = N * delta
    num = _sinpi_reduced(x - floor_float(x + 0.5))
    den = _sinpi_reduced(delta)
    if den == 0.0:
        return N, 1.0
    return num, den


@njit(cache=True, error_model="numpy", inline="always")
def square_lattice_sq(dh, dk, dl, Na, Nb, Nc):
    """F_latt^2 of a parallelepiped at fractional offsets (dh, dk, dl) from the nearest
    node, as the vectorised loops compute it (one quotient of products; axes with N <= 1
    are left out).  The vectorised blocks of every mode take their value from here, so
    their images agree bit for bit."""
    num = 1.0
    den = 1.0
    if Na > 1.0:
        a, b = sinpi_sq_parts(dh, Na)
        num *= a
        den *= b
    if Nb > 1.0:
        a, b = sinpi_sq_parts(dk, Nb)
        num *= a
        den *= b
    if Nc > 1.0:
        a, b = sinpi_sq_parts(dl, Nc)
        num *= a
        den *= b
    latt = num / den
    return latt * latt


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
    s, c = sin_cos(x)
    return 3.0 * (s / x - c) / (x * x)


@njit(cache=True, error_model="numpy", inline="always")
def sin_cos(x):
    """(sin x, cos x) from the sinpi/cospi polynomials after one reduction (no calls; off
    libm's by the rounding of x / pi, about 2e-16 |x|, a few ulps of x in the
    single-precision twins)."""
    r = x * _INV_PI
    n = floor_float(r + 0.5)
    sign = _parity_sign(n)
    d = r - n
    return sign * _sinpi_reduced(d), sign * _cospi_reduced(d)


@njit(cache=True, error_model="numpy", inline="always")
def polarization_axes(kahn, ix, iy, iz, px, py, pz):
    """(Bx, By, Bz, Ex, Ey, Ez): the unit vectors B = unit(p x i) and E = unit(i x B) of
    the polarization factor for incident i and E-vector axis p (zero where undefined, and
    without Kahn factor, where psi does not matter).  They depend on the source only, so
    loops over pixels take them once."""
    bx = by = bz = ex = ey = ez = 0.0
    if kahn != 0.0:
        bx = py * iz - pz * iy
        by = pz * ix - px * iz
        bz = px * iy - py * ix
        bm = math.sqrt(bx * bx + by * by + bz * bz)
        if bm != 0.0:
            bx /= bm
            by /= bm
            bz /= bm
        else:
            bx = by = bz = 0.0
        ex = iy * bz - iz * by
        ey = iz * bx - ix * bz
        ez = ix * by - iy * bx
        em = math.sqrt(ex * ex + ey * ey + ez * ez)
        if em != 0.0:
            ex /= em
            ey /= em
            ez /= em
        else:
            ex = ey = ez = 0.0
    return bx, by, bz, ex, ey, ez


@njit(cache=True, error_model="numpy", inline="always")
def polarization_with_axes(kahn, ix, iy, iz, dx, dy, dz, bx, by, bz, ex, ey, ez):
    """nanoBragg's polarization factor 0.5 (1 + cos^2 2theta - kahn cos(2 psi) sin^2 2theta),
    psi = -atan2(d.B, d.E), with cos(2 psi) = (x^2 - y^2) / (x^2 + y^2) taken without
    trigonometry (1 where x = y = 0, as atan2(0, 0) = 0 gives): no calls, so loops over
    pixels vectorise.  (B and E zero where undefined: see :func:`polarization_axes`.)"""
    return polarization_parts(kahn, ix, iy, iz, dx, dy, dz, bx, by, bz, ex, ey, ez, True)[0]


@njit(cache=True, error_model="numpy")
def polarization_factor(kahn, ix, iy, iz, dx, dy, dz, px, py, pz):
    """nanoBragg's polarization factor for unit incident i, diffracted d and E-axis p."""
    bx, by, bz, ex, ey, ez = polarization_axes(kahn, ix, iy, iz, px, py, pz)
    return polarization_with_axes(kahn, ix, iy, iz, dx, dy, dz, bx, by, bz, ex, ey, ez)


@njit(cache=True, error_model="numpy")
def lagrange4(t):
    """Cubic Lagrange weights on nodes -1, 0, 1, 2 at t (nanoBragg's polint)."""
    w0 = t * (t - 1.0) * (t - 2.0) / -6.0
    w1 = (t + 1.0) * (t - 1.0) * (t - 2.0) / 2.0
    w2 = (t + 1.0) * t * (t - 2.0) / -2.0
    w3 = (t + 1.0) * t * (t - 1.0) / 6.0
    return w0, w1, w2, w3


# --------------------------------------------------------------------------- partials
# Local derivatives of the per-sample functions above.  The adjoint (reverse) and
# tangent (forward) kernels both contract with these, so each derivative is written
# once.  Where nanoBragg's function has a kink or a jump, these are the derivatives of
# the smooth piece.


@njit(cache=True, error_model="numpy")
def sincg_grad(delta, N):
    """(g, dg/ddelta, dg/dN) for g = sin(N pi delta) / sin(pi delta), |delta| <= 1/2.

    The sign of g follows :func:`sinpi_sq_parts` (callers use g^2, and g * g').  Near
    delta = 0 the quotient rule cancels catastrophically, so a series in u = pi delta
    is used there: g = N (1 + a u^2 + b u^4), a = (1 - N^2)/6, b = (3N^4 - 10N^2 + 7)/360.
    """
    if _near_node(delta, N):
        return _axis_series(delta, N)
    sr, cr, cd = _quotient_sines(delta, N)
    return _axis_quotients(delta, N, 1.0 / _sinpi_reduced(delta), sr, cr, cd)


@njit(cache=True, error_model="numpy")
def sinc3_grad(x):
    """(sinc3(x), sinc3'(x) / x); the second is finite at x = 0 (-1/5)."""
    ax = abs(x)
    x2 = x * x
    if ax < 0.02:
        f = 1.0 - x2 / 10.0 + x2 * x2 / 280.0 - x2 * x2 * x2 / 15120.0
        return f, -0.2 + x2 / 70.0 - x2 * x2 / 2520.0
    s, c = sin_cos(x)
    f = 3.0 * (s / x - c) / x2
    return f, 3.0 * s / (x2 * x) - 3.0 * f / x2


@njit(cache=True, error_model="numpy", inline="always")
def polarization_frame(ix, iy, iz, px, py, pz):
    """(Bx, By, Bz, |b|, Ex, Ey, Ez, |e|) of :func:`polarization_grad`: B = unit(b),
    b = p x i, and E = unit(e), e = i x B, for incident i and E-vector axis p (B and E
    left unnormalised where |b| or |e| is 0, where they are not used)."""
    bx = py * iz - pz * iy
    by = pz * ix - px * iz
    bz = px * iy - py * ix
    bm = math.sqrt(bx * bx + by * by + bz * bz)
    if bm == 0.0:
        return bx, by, bz, bm, 0.0, 0.0, 0.0, 0.0
    Bx = bx / bm
    By = by / bm
    Bz = bz / bm
    ex = iy * Bz - iz * By
    ey = iz * Bx - ix * Bz
    ez = ix * By - iy * Bx
    em = math.sqrt(ex * ex + ey * ey + ez * ez)
    if em == 0.0:
        return Bx, By, Bz, bm, ex, ey, ez, em
    return Bx, By, Bz, bm, ex / em, ey / em, ez / em, em


@njit(cache=True, error_model="numpy", inline="always")
def polarization_frame_vjp(ix, iy, iz, px, py, pz, Bx, By, Bz, bm, Ex, Ey, Ez, em, gEx, gEy, gEz, gBx, gBy, gBz):
    """Gradients (gE, gB) of :func:`polarization_frame`'s E and B (gB: the part of B's
    gradient that does not come through E) pushed back to i and p: (gi, gp).  Linear in
    (gE, gB), so a sum of pixels' gradients may be pushed back at once."""
    # through E = unit(e), e = i x B
    t = Ex * gEx + Ey * gEy + Ez * gEz
    gex = (gEx - Ex * t) / em
    gey = (gEy - Ey * t) / em
    gez = (gEz - Ez * t) / em
    # gi += B x ge ; gB += ge x i
    gix = By * gez - Bz * gey
    giy = Bz * gex - Bx * gez
    giz = Bx * gey - By * gex
    gBx = gBx + (gey * iz - gez * iy)
    gBy = gBy + (gez * ix - gex * iz)
    gBz = gBz + (gex * iy - gey * ix)
    # through B = unit(b), b = p x i
    t = Bx * gBx + By * gBy + Bz * gBz
    gbx = (gBx - Bx * t) / bm
    gby = (gBy - By * t) / bm
    gbz = (gBz - Bz * t) / bm
    # gp = i x gb ; gi += gb x p
    gix += gby * pz - gbz * py
    giy += gbz * px - gbx * pz
    giz += gbx * py - gby * px
    return gix, giy, giz, iy * gbz - iz * gby, iz * gbx - ix * gbz, ix * gby - iy * gbx


@njit(cache=True, error_model="numpy", inline="always")
def polarization_frame_jvp(ix, iy, iz, px, py, pz, Bx, By, Bz, bm, Ex, Ey, Ez, em, dix, diy, diz, dpx, dpy, dpz):
    """Tangents (dB, dE) of :func:`polarization_frame`'s B and E along (di, dp)."""
    # b = p x i
    dbx = dpy * iz - dpz * iy + py * diz - pz * diy
    dby = dpz * ix - dpx * iz + pz * dix - px * diz
    dbz = dpx * iy - dpy * ix + px * diy - py * dix
    t = Bx * dbx + By * dby + Bz * dbz
    dBx = (dbx - Bx * t) / bm
    dBy = (dby - By * t) / bm
    dBz = (dbz - Bz * t) / bm
    # e = i x B
    dex = diy * Bz - diz * By + iy * dBz - iz * dBy
    dey = diz * Bx - dix * Bz + iz * dBx - ix * dBz
    dez = dix * By - diy * Bx + ix * dBy - iy * dBx
    t = Ex * dex + Ey * dey + Ez * dez
    return dBx, dBy, dBz, (dex - Ex * t) / em, (dey - Ey * t) / em, (dez - Ez * t) / em


@njit(cache=True, error_model="numpy", inline="always")
def polarization_parts(kahn, ix, iy, iz, dx, dy, dz, Bx, By, Bz, Ex, Ey, Ez, framed):
    """(p, dp/dkahn, dp/dc, dp/dx, dp/dy) of nanoBragg's polarization factor
    p = 0.5 (1 + c^2 - kahn cos(2 psi) (1 - c^2)), psi = -atan2(y, x), as a function of kahn,
    c = i.d, x = d.E and y = d.B, for a source's frame from :func:`polarization_frame`
    (``framed``: |b| and |e| are not 0); cos(2 psi) = (x^2 - y^2) / (x^2 + y^2) without
    trigonometry, 1 where x = y = 0 (as atan2(0, 0) = 0 gives); no calls, so loops over
    pixels vectorise.  With the frame's tangents or
    gradients (:func:`polarization_frame_jvp`, :func:`polarization_frame_vjp`) they give
    :func:`polarization_grad`'s partials."""
    c2 = ix * dx + iy * dy + iz * dz
    c2sqr = c2 * c2
    s2sqr = 1.0 - c2sqr
    yv = dx * Bx + dy * By + dz * Bz
    xv = dx * Ex + dy * Ey + dz * Ez
    rr = xv * xv + yv * yv
    psi = framed and rr != 0.0
    cos2 = (xv * xv - yv * yv) / rr if psi else 1.0
    sin2 = -2.0 * xv * yv / rr if psi else 0.0
    dp_dpsi = kahn * sin2 * s2sqr
    return (0.5 * (1.0 + c2sqr - kahn * cos2 * s2sqr), -0.5 * cos2 * s2sqr, c2 * (1.0 + kahn * cos2),
            dp_dpsi * yv / rr if psi else 0.0, dp_dpsi * -xv / rr if psi else 0.0)


@njit(cache=True, error_model="numpy")
def polarization_grad(kahn, ix, iy, iz, dx, dy, dz, px, py, pz, out):
    """Polarization factor and its partials.

    Writes into ``out`` (10): dp/dkahn, dp/di (3), dp/dd (3), dp/daxis (3); returns p.
    psi is computed even when kahn is 0 so that dp/dkahn is the derivative of the smooth
    function of kahn (the value at kahn = 0 does not depend on psi).
    """
    c2 = ix * dx + iy * dy + iz * dz
    c2sqr = c2 * c2
    s2sqr = 1.0 - c2sqr
    for j in range(10):
        out[j] = 0.0
    Bx, By, Bz, bm, Ex, Ey, Ez, em = polarization_frame(ix, iy, iz, px, py, pz)
    cos2 = 1.0
    sin2 = 0.0
    dpsi_dix = dpsi_diy = dpsi_diz = 0.0
    dpsi_ddx = dpsi_ddy = dpsi_ddz = 0.0
    dpsi_dpx = dpsi_dpy = dpsi_dpz = 0.0
    if bm != 0.0 and em != 0.0:
        yv = Bx * dx + By * dy + Bz * dz
        xv = Ex * dx + Ey * dy + Ez * dz
        rr = xv * xv + yv * yv
        if rr != 0.0:
            # psi = -atan2(y, x): cos(2 psi) and sin(2 psi) without trigonometry
            cos2 = (xv * xv - yv * yv) / rr
            sin2 = -2.0 * xv * yv / rr
            dpsi_dy = -xv / rr
            dpsi_dx = yv / rr
            dpsi_ddx = dpsi_dy * Bx + dpsi_dx * Ex
            dpsi_ddy = dpsi_dy * By + dpsi_dx * Ey
            dpsi_ddz = dpsi_dy * Bz + dpsi_dx * Ez
            dpsi_dix, dpsi_diy, dpsi_diz, dpsi_dpx, dpsi_dpy, dpsi_dpz = polarization_frame_vjp(
                ix, iy, iz, px, py, pz, Bx, By, Bz, bm, Ex, Ey, Ez, em,
                dpsi_dx * dx, dpsi_dx * dy, dpsi_dx * dz, dpsi_dy * dx, dpsi_dy * dy, dpsi_dy * dz)
    p = 0.5 * (1.0 + c2sqr - kahn * cos2 * s2sqr)
    dp_dc2 = c2 * (1.0 + kahn * cos2)
    dp_dpsi = kahn * sin2 * s2sqr
    out[0] = -0.5 * cos2 * s2sqr
    out[1] = dp_dc2 * dx + dp_dpsi * dpsi_dix
    out[2] = dp_dc2 * dy + dp_dpsi * dpsi_diy
    out[3] = dp_dc2 * dz + dp_dpsi * dpsi_diz
    out[4] = dp_dc2 * ix + dp_dpsi * dpsi_ddx
    out[5] = dp_dc2 * iy + dp_dpsi * dpsi_ddy
    out[6] = dp_dc2 * iz + dp_dpsi * dpsi_ddz
    out[7] = dp_dpsi * dpsi_dpx
    out[8] = dp_dpsi * dpsi_dpy
    out[9] = dp_dpsi * dpsi_dpz
    return p


@njit(cache=True, error_model="numpy")
def lagrange4_grad(t):
    """Derivatives of :func:`lagrange4` with respect to t."""
    d0 = (3.0 * t * t - 6.0 * t + 2.0) / -6.0
    d1 = (3.0 * t * t - 4.0 * t - 1.0) / 2.0
    d2 = (3.0 * t * t - 2.0 * t - 2.0) / -2.0
    d3 = (3.0 * t * t - 1.0) / 6.0
    return d0, d1, d2, d3


@njit(cache=True, error_model="numpy", inline="always")
def _quotient_sines(delta, N):
    """sin(pi r), pi cos(pi r) and pi cos(pi delta) for r = N delta reduced to the nearest
    integer: the quotient rule's pieces (:func:`_axis_quotients`)."""
    x = N * delta
    r = x - floor_float(x + 0.5)
    return _sinpi_reduced(r), math.pi * _cospi_reduced(r), math.pi * _cospi_reduced(delta)


@njit(cache=True, error_model="numpy", inline="always")
def _axis_sines(delta, N):
    """One axis's sines: the forward's (numerator, denominator) from
    :func:`sinpi_sq_parts`, and :func:`_quotient_sines` (the compiler evaluates the shared
    sines once)."""
    num, den = sinpi_sq_parts(delta, N)
    sr, cr, cd = _quotient_sines(delta, N)
    return num, den, sr, cr, cd


@njit(cache=True, error_model="numpy", inline="always")
def _axis_quotients(delta, N, rden, sr, cr, cd):
    """(g, dg/ddelta, dg/dN) of g = sin(N pi delta) / sin(pi delta) by the quotient rule,
    given rden = 1 / sin(pi delta) and :func:`_axis_sines`' last three values; it cancels
    catastrophically near delta = 0 (see :func:`_near_node`)."""
    g = sr * rden
    dg_dx = cr * rden
    return g, N * dg_dx - g * cd * rden, delta * dg_dx


@njit(cache=True, error_model="numpy", inline="always")
def _near_node(delta, N):
    """Whether an axis is close enough to its node for :func:`sincg_grad`'s series."""
    return abs(N * (math.pi * delta)) < 2e-3


@njit(cache=True, error_model="numpy", inline="always")
def _axis_series(delta, N):
    """:func:`sincg_grad`'s series (g, dg/ddelta, dg/dN), for :func:`_near_node`."""
    u = math.pi * delta
    N2 = N * N
    u2 = u * u
    a = (1.0 - N2) / 6.0
    b = (3.0 * N2 * N2 - 10.0 * N2 + 7.0) / 360.0
    return (N * (1.0 + a * u2 + b * u2 * u2),
            math.pi * N * (2.0 * a * u + 4.0 * b * u2 * u),
            1.0 + a * u2 + b * u2 * u2 + N * (-N / 3.0 * u2 + (12.0 * N2 * N - 20.0 * N) / 360.0 * u2 * u2))


@njit(cache=True, error_model="numpy", inline="always")
def _axis_kept(use, num, den):
    """An axis's (numerator, denominator), or (1, 1) where nanoBragg leaves it out (N <= 1)."""
    return (num if use else 1.0), (den if use else 1.0)


@njit(cache=True, error_model="numpy", inline="always")
def _quotients_kept(use, g, dg, ng):
    """An axis's (g, dg/ddelta, dg/dN), or (1, 0, 0) where it is left out."""
    return (g if use else 1.0), (dg if use else 0.0), (ng if use else 0.0)


# (the lattice helpers below pass scalars, never tuples: inlined into a parallel loop,
# tuples passed between them trip Numba's array analysis)
@njit(cache=True, error_model="numpy", inline="always")
def _lattice_by_quotients(dh, dk, dl, Na, Nb, Nc):
    """F_latt^2 (bit for bit :func:`square_lattice_sq`'s) and each axis's (g, dg/ddelta,
    dg/dN) by the quotient rule, with one reciprocal for the three axes; wrong on an
    axis that is :func:`_near_node`."""
    na, da, sa, ca, cda = _axis_sines(dh, Na)
    nb, db, sb, cb, cdb = _axis_sines(dk, Nb)
    nc, dc, sc, cc, cdc = _axis_sines(dl, Nc)
    na, da = _axis_kept(Na > 1.0, na, da)
    nb, db = _axis_kept(Nb > 1.0, nb, db)
    nc, dc = _axis_kept(Nc > 1.0, nc, dc)
    den = da * db * dc
    latt = (na * nb * nc) / den
    rden = 1.0 / den
    g, dg, ng = _axis_quotients(dh, Na, db * dc * rden, sa, ca, cda)
    ga, dga, nga = _quotients_kept(Na > 1.0, g, dg, ng)
    g, dg, ng = _axis_quotients(dk, Nb, da * dc * rden, sb, cb, cdb)
    gb, dgb, ngb = _quotients_kept(Nb > 1.0, g, dg, ng)
    g, dg, ng = _axis_quotients(dl, Nc, da * db * rden, sc, cc, cdc)
    gc, dgc, ngc = _quotients_kept(Nc > 1.0, g, dg, ng)
    return latt, ga, dga, nga, gb, dgb, ngb, gc, dgc, ngc


@njit(cache=True, error_model="numpy", inline="always")
def _near_axis(delta, N):
    """Whether an axis the lattice factor keeps (N > 1) is :func:`_near_node`."""
    return (N > 1.0) & _near_node(delta, N)


@njit(cache=True, error_model="numpy", inline="always")
def _series_if_near(delta, N, g, dg, ng):
    """An axis's (g, dg/ddelta, dg/dN): the series where :func:`_near_axis`, else the
    values given (both computed, one selected)."""
    gs, dgs, ngs = _axis_series(delta, N)
    near = _near_axis(delta, N)
    return (gs if near else g), (dgs if near else dg), (ngs if near else ng)


@njit(cache=True, error_model="numpy", inline="always")
def _lattice_products(latt, ga, dga, nga, gb, dgb, ngb, gc, dgc, ngc):
    """(F_latt^2, F_latt, its partials in h, k, l and in Na, Nb, Nc) from each axis's
    (g, dg/ddelta, dg/dN)."""
    return (latt * latt, ga * gb * gc, dga * gb * gc, ga * dgb * gc, ga * gb * dgc,
            nga * gb * gc, ga * ngb * gc, ga * gb * ngc)


@njit(cache=True, error_model="numpy", inline="always")
def square_lattice_grad(dh, dk, dl, Na, Nb, Nc):
    """(F_latt^2 bit for bit as :func:`square_lattice_sq`, F_latt, its partials in h, k,
    l, and in Na, Nb, Nc) of a parallelepiped at fractional offsets (dh, dk, dl): the
    reference, exact everywhere (both forms computed, one selected, so loops over
    orientations vectorise; the row lanes take :func:`square_lattice_grad_far`)."""
    latt, ga, dga, nga, gb, dgb, ngb, gc, dgc, ngc = _lattice_by_quotients(dh, dk, dl, Na, Nb, Nc)
    ga, dga, nga = _series_if_near(dh, Na, ga, dga, nga)
    gb, dgb, ngb = _series_if_near(dk, Nb, gb, dgb, ngb)
    gc, dgc, ngc = _series_if_near(dl, Nc, gc, dgc, ngc)
    return _lattice_products(latt, ga, dga, nga, gb, dgb, ngb, gc, dgc, ngc)


@njit(cache=True, error_model="numpy", inline="always")
def square_lattice_grad_far(dh, dk, dl, Na, Nb, Nc):
    """:func:`square_lattice_grad`'s values without the series, and a ninth value: 1.0
    where an axis is :func:`_near_node` (those values are wrong there: the caller takes
    :func:`square_lattice_grad` instead), else 0.0.  What the derivative kernels' row
    lanes evaluate: the series' arithmetic is a sixth of a term's cost, and one lane in a
    few thousand needs it.  F_latt^2 is bit for bit the forward's everywhere."""
    latt, ga, dga, nga, gb, dgb, ngb, gc, dgc, ngc = _lattice_by_quotients(dh, dk, dl, Na, Nb, Nc)
    T, Lt, LH, LK, LL, LNa, LNb, LNc = _lattice_products(latt, ga, dga, nga, gb, dgb, ngb, gc, dgc, ngc)
    near = _near_axis(dh, Na) | _near_axis(dk, Nb) | _near_axis(dl, Nc)
    return T, Lt, LH, LK, LL, LNa, LNb, LNc, 1.0 if near else 0.0


@njit(cache=True, error_model="numpy")
def sum_row(a, row, n):
    """:func:`sum_fixed` of a[row, :n] (no array view is made)."""
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = 0.0
    m = 0
    while m + 8 <= n:
        a0 += a[row, m]
        a1 += a[row, m + 1]
        a2 += a[row, m + 2]
        a3 += a[row, m + 3]
        a4 += a[row, m + 4]
        a5 += a[row, m + 5]
        a6 += a[row, m + 6]
        a7 += a[row, m + 7]
        m += 8
    while m < n:
        a0 += a[row, m]
        m += 1
    return ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7))


@njit(cache=True, error_model="numpy")
def sum_fixed(buf, n):
    """Sum of buf[:n] in a fixed order with eight partial sums (vectorisable, and the
    same result whatever the thread count)."""
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = 0.0
    m = 0
    while m + 8 <= n:
        a0 += buf[m]
        a1 += buf[m + 1]
        a2 += buf[m + 2]
        a3 += buf[m + 3]
        a4 += buf[m + 4]
        a5 += buf[m + 5]
        a6 += buf[m + 6]
        a7 += buf[m + 7]
        m += 8
    while m < n:
        a0 += buf[m]
        m += 1
    return ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7))


# --------------------------------------------------------------------------- per-sample geometry and lookups
# (the kernels read the scene's blocks: det, beam, xtal (xt), fhkl (fs); see scene.py)


@njit(cache=True, error_model="numpy", inline="always")
def aniso_exponent(h, k, l, beta):
    """h^T beta h for beta = (b11, b22, b33, b12, b13, b23): the anisotropic displacements'
    exp(-h^T beta h) on F, at fractional (h, k, l)."""
    return (beta[0] * h * h + beta[1] * k * k + beta[2] * l * l
            + 2.0 * (beta[3] * h * k + beta[4] * h * l + beta[5] * k * l))


@njit(cache=True, error_model="numpy")
def lookup_F(h, k, l, h0, k0, l0, fs):
    """Structure factor at fractional (h, k, l): tricubic or nearest, nanoBragg rules
    (``fs``: the scene's Structure block), times exp(-h^T beta h) with anisotropic
    displacements (Structure.U_aniso)."""
    F = _grid_F(h, k, l, h0, k0, l0, fs)
    if fs.aniso:
        F *= math.exp(-aniso_exponent(h, k, l, fs.beta))
    return F


@njit(cache=True, error_model="numpy", inline="always")
def _grid_F(h, k, l, h0, k0, l0, fs):
    fgrid = fs.grid
    hmin = fs.hkl_min[0]
    kmin = fs.hkl_min[1]
    lmin = fs.hkl_min[2]
    hmax = fs.hkl_max[0]
    kmax = fs.hkl_max[1]
    lmax = fs.hkl_max[2]
    if fs.interpolate:
        hr = hmax - hmin + 1
        kr = kmax - kmin + 1
        lr = lmax - lmin + 1
        if not ((h - real(hmin) + 3.0) > real(hr) or (h - 2.0) < real(hmin)
                or (k - real(kmin) + 3.0) > real(kr) or (k - 2.0) < real(kmin)
                or (l - real(lmin) + 3.0) > real(lr) or (l - 2.0) < real(lmin)):
            hf = math.floor(h)
            kf = math.floor(k)
            lf = math.floor(l)
            wh0, wh1, wh2, wh3 = lagrange4(h - real(hf))
            wk0, wk1, wk2, wk3 = lagrange4(k - real(kf))
            wl0, wl1, wl2, wl3 = lagrange4(l - real(lf))
            ih = int(hf) - 1 - hmin
            ik = int(kf) - 1 - kmin
            il = int(lf) - 1 - lmin
            F = 0.0
            for i in range(4):
                wh = wh0 if i == 0 else (wh1 if i == 1 else (wh2 if i == 2 else wh3))
                Fk = 0.0
                for j in range(4):
                    wk = wk0 if j == 0 else (wk1 if j == 1 else (wk2 if j == 2 else wk3))
                    row = fgrid[ih + i, ik + j]
                    Fk += wk * (wl0 * row[il] + wl1 * row[il + 1] + wl2 * row[il + 2] + wl3 * row[il + 3])
                F += wh * Fk
            return F
    if fs.has_hkls and hmin <= h0 <= hmax and kmin <= k0 <= kmax and lmin <= l0 <= lmax:
        return fgrid[h0 - hmin, k0 - kmin, l0 - lmin]
    return fs.default_F


@njit(cache=True, error_model="numpy", inline="always")
def domain_offset(dh, dk, dl, xt):
    """N (dh, dk, dl) for the domain's symmetric size matrix N (Na Nb Nc on its diagonal,
    N_ab N_ac N_bc off it): the fractional offset from the node in units of the spot."""
    return (xt.Na * dh + xt.N_ab * dk + xt.N_ac * dl, xt.N_ab * dh + xt.Nb * dk + xt.N_bc * dl,
            xt.N_ac * dh + xt.N_bc * dk + xt.Nc * dl)


@njit(cache=True, error_model="numpy", inline="always")
def domain_cells(xt):
    """det N: the domain's number of unit cells (Na Nb Nc without off-diagonal terms)."""
    return (xt.Na * xt.Nb * xt.Nc + 2.0 * xt.N_ab * xt.N_bc * xt.N_ac - xt.Na * xt.N_bc * xt.N_bc
            - xt.Nb * xt.N_ac * xt.N_ac - xt.Nc * xt.N_ab * xt.N_ab)


@njit(cache=True, error_model="numpy")
def lattice_factor(h, k, l, h0, k0, l0, xt):
    """F_latt for one orientation sample (``xt``: the scene's Crystal block)."""
    shape = xt.shape
    Na = xt.Na
    Nb = xt.Nb
    Nc = xt.Nc
    if shape == SQUARE:
        F = 1.0
        if Na > 1.0:
            F *= sincg_frac(h - real(h0), Na)
        if Nb > 1.0:
            F *= sincg_frac(k - real(k0), Nb)
        if Nc > 1.0:
            F *= sincg_frac(l - real(l0), Nc)
        return F
    dh = h - real(h0)
    dk = k - real(k0)
    dl = l - real(l0)
    if shape == ROUND:
        hrad = dh * dh * Na * Na + dk * dk * Nb * Nb + dl * dl * Nc * Nc
        return Na * Nb * Nc * ROUND_SCALE * sinc3(PI * math.sqrt(hrad * xt.fudge))
    if shape == DOMAIN:
        x, y, z = domain_offset(dh, dk, dl, xt)
        return domain_cells(xt) * math.exp(-((x * x + y * y + z * z) / GAUSS_WIDTH * xt.fudge))
    recip = xt.recip
    fudge = xt.fudge
    dx = dh * recip[0, 0] + dk * recip[1, 0] + dl * recip[2, 0]
    dy = dh * recip[0, 1] + dk * recip[1, 1] + dl * recip[2, 1]
    dz = dh * recip[0, 2] + dk * recip[1, 2] + dl * recip[2, 2]
    rad = (dx * dx + dy * dy + dz * dz) * Na * Na * Nb * Nb * Nc * Nc
    if shape == GAUSS:
        return Na * Nb * Nc * math.exp(-(rad / GAUSS_WIDTH * fudge))
    if rad * fudge < TOPHAT_RADIUS_SQR:
        return Na * Nb * Nc
    return 0.0


@njit(cache=True, error_model="numpy", inline="always")
def flat_position(fpixel, spixel, subF, subS, t, det):
    """3-D position (x, y, z) of a sub-pixel in sensor layer t of a flat detector (m)."""
    os = det.oversample
    sub = det.subpixel
    f = det.fdet
    s = det.sdet
    o = det.odet
    p0 = det.pix0
    Fdet = sub * real(fpixel * os + subF) + sub / 2.0
    Sdet = sub * real(spixel * os + subS) + sub / 2.0
    Odet = real(t) * det.thickstep
    return (Fdet * f[0] + Sdet * s[0] + Odet * o[0] + p0[0],
            Fdet * f[1] + Sdet * s[1] + Odet * o[1] + p0[1],
            Fdet * f[2] + Sdet * s[2] + Odet * o[2] + p0[2])


@njit(cache=True, error_model="numpy", inline="always")
def subpixel_position(fpixel, spixel, subF, subS, t, det, beam):
    """3-D position (x, y, z) of a sub-pixel in sensor layer t (metres)."""
    px, py, pz = flat_position(fpixel, spixel, subF, subS, t, det)
    if det.curved:
        # a point at "distance" along the beam, swung about sdet by y/distance and then
        # about fdet by z/distance (nanoBragg's curved detector)
        f = det.fdet
        s = det.sdet
        dist = det.distance
        b = beam.beam
        vx = dist * b[0]
        vy = dist * b[1]
        vz = dist * b[2]
        vx, vy, vz = _rotate_axis(vx, vy, vz, s[0], s[1], s[2], py / dist)
        px, py, pz = _rotate_axis(vx, vy, vz, f[0], f[1], f[2], pz / dist)
    return px, py, pz


@njit(cache=True, error_model="numpy")
def _rotate_axis(vx, vy, vz, ax, ay, az, phi):
    s = math.sin(phi)
    c = math.cos(phi)
    d = (ax * vx + ay * vy + az * vz) * (1.0 - c)
    return (ax * d + vx * c + (-az * vy + ay * vz) * s,
            ay * d + vy * c + (az * vx - ax * vz) * s,
            az * d + vz * c + (-ay * vx + ax * vy) * s)


@njit(cache=True, error_model="numpy", inline="always")
def miller(orients, o, qx, qy, qz):
    """(h, k, l, h0, k0, l0): fractional Miller indices of q for orientation o, and the
    nearest integers as nanoBragg rounds them (ceil(h - 0.5))."""
    h = orients[o, 0, 0] * qx + orients[o, 0, 1] * qy + orients[o, 0, 2] * qz
    k = orients[o, 1, 0] * qx + orients[o, 1, 1] * qy + orients[o, 1, 2] * qz
    l = orients[o, 2, 0] * qx + orients[o, 2, 1] * qy + orients[o, 2, 2] * qz
    return h, k, l, int(math.ceil(h - 0.5)), int(math.ceil(k - 0.5)), int(math.ceil(l - 0.5))


@njit(cache=True, error_model="numpy", inline="always")
def scattering(sources, lambdas, s, dx, dy, dz):
    """(ix, iy, iz, lambda, qx, qy, qz): the incident direction from source s, its
    wavelength, and the scattering vector q = (d - i) / lambda toward direction d."""
    ix = -sources[s, 0]
    iy = -sources[s, 1]
    iz = -sources[s, 2]
    lam = lambdas[s]
    return ix, iy, iz, lam, (dx - ix) / lam, (dy - iy) / lam, (dz - iz) / lam


@njit(cache=True, error_model="numpy", inline="always")
def bragg_weight(S, s, qx, qy, qz):
    """What a Bragg term F_cell^2 F_latt^2 of source ``s`` is multiplied by: the source's
    weight, times the Debye-Waller factor."""
    return weighted(S.beam.weights[s], S.fhkl.B, qx, qy, qz)


@njit(cache=True, error_model="numpy", inline="always")
def weighted(w, B, qx, qy, qz):
    """:func:`bragg_weight` from the source's weight w and the B factor: w times the
    Debye-Waller factor exp(-B |q|^2 / 2), the overall B's exp(-2 B (sin(theta)/lambda)^2)
    on F^2."""
    if B != 0.0:
        w = w * math.exp(-0.5 * B * (qx * qx + qy * qy + qz * qz))
    return w


@njit(cache=True, error_model="numpy", inline="always")
def soa_hkl(ori, m, qx, qy, qz):
    """Fractional (h, k, l) of orientation m of a (9, m8) orientation block."""
    return (ori[0, m] * qx + ori[1, m] * qy + ori[2, m] * qz,
            ori[3, m] * qx + ori[4, m] * qy + ori[5, m] * qz,
            ori[6, m] * qx + ori[7, m] * qy + ori[8, m] * qz)


@njit(cache=True, error_model="numpy", inline="always")
def orientation_axes(ori, m):
    """Orientation m of a (9, m8) orientation block as nine scalars (a_x, a_y, a_z, b_x,
    ..., c_z), read once before a loop over pixels."""
    return ori[0, m], ori[1, m], ori[2, m], ori[3, m], ori[4, m], ori[5, m], ori[6, m], ori[7, m], ori[8, m]


@njit(cache=True, error_model="numpy", inline="always")
def axes_hkl(A, qx, qy, qz):
    """Fractional (h, k, l) of q for the axes A (:func:`orientation_axes`)."""
    return (A[0] * qx + A[1] * qy + A[2] * qz,
            A[3] * qx + A[4] * qy + A[5] * qz,
            A[6] * qx + A[7] * qy + A[8] * qz)


@njit(cache=True, error_model="numpy", inline="always")
def soa_miller(ori, m, qx, qy, qz):
    """:func:`miller` for orientation m of a (9, m8) orientation block."""
    h, k, l = soa_hkl(ori, m, qx, qy, qz)
    return h, k, l, int(math.ceil(h - 0.5)), int(math.ceil(k - 0.5)), int(math.ceil(l - 0.5))


@njit(cache=True, error_model="numpy", inline="always")
def grid_extent(fs):
    """(hmin, kmin, lmin, nh, nk, nl) of the structure-factor grid."""
    hmin = fs.hkl_min[0]
    kmin = fs.hkl_min[1]
    lmin = fs.hkl_min[2]
    return (hmin, kmin, lmin,
            fs.hkl_max[0] - hmin + 1, fs.hkl_max[1] - kmin + 1, fs.hkl_max[2] - lmin + 1)


@njit(cache=True, error_model="numpy", inline="always")
def flat_grid_index(h0, k0, l0, extent):
    """Index of the integer (h0, k0, l0) in the flattened grid, or -1 outside it."""
    hmin, kmin, lmin, nh, nk, nl = extent
    ih = h0 - hmin
    ik = k0 - kmin
    il = l0 - lmin
    inside = (ih >= 0) & (ih < nh) & (ik >= 0) & (ik < nk) & (il >= 0) & (il < nl)
    return (ih * nk + ik) * nl + il if inside else -1


@njit(cache=True, error_model="numpy", inline="always")
def grid_cells(ori, m, qx, qy, qz, extent, cell, n):
    """cell[p] = the flat grid index of the node nearest q[p] for orientation m (-1 outside
    the grid), p < n: the row lanes' loop before their gather."""
    for p in range(n):
        h, k, l, h0, k0, l0 = soa_miller(ori, m, qx[p], qy[p], qz[p])
        cell[p] = flat_grid_index(h0, k0, l0, extent)


@njit(cache=True, error_model="numpy", inline="always")
def solid_angle(R, det):
    """Solid angle of a pixel (nanoBragg's, with -point_pixel: 1/R^2)."""
    return pixel_solid_angle(R, det.pixel, det.close_distance, det.point_pixel)


@njit(cache=True, error_model="numpy", inline="always")
def pixel_solid_angle(R, pixel, close_distance, point_pixel):
    """:func:`solid_angle` from the detector's scalars (loops over pixels pass no arrays:
    each call would count references to every one of them)."""
    if point_pixel:
        return 1.0 / R / R
    return pixel * pixel / R / R * close_distance / R


@njit(cache=True, error_model="numpy", inline="always")
def capture_fraction(t, dx, dy, dz, det):
    """Fraction of the photons along d absorbed in sensor layer t."""
    o = det.odet
    parallax = dx * o[0] + dy * o[1] + dz * o[2]
    return (math.exp(-real(t) * det.thickstep * det.mu / parallax)
            - math.exp(-real(t + 1) * det.thickstep * det.mu / parallax))


@njit(cache=True, error_model="numpy", inline="always")
def beyond_dmin(qx, qy, qz, dmin):
    """True when -dmin cuts the scattering vector q (1/m): its resolution is finer."""
    if dmin > 0.0:
        stol = 0.5 * math.sqrt(qx * qx + qy * qy + qz * qz)
        return stol > 0.0 and dmin > 0.5 / stol
    return False


@njit(cache=True, error_model="numpy", inline="always")
def unit_direction(px, py, pz):
    """(px, py, pz, R, dx, dy, dz): a position, its distance and unit direction."""
    R = math.sqrt(px * px + py * py + pz * pz)
    if R != 0.0:
        return px, py, pz, R, px / R, py / R, pz / R
    return px, py, pz, R, 0.0, 0.0, 0.0


@njit(cache=True, error_model="numpy", inline="always")
def direction(fpixel, spixel, subF, subS, t, det, beam):
    """(px, py, pz, R, dx, dy, dz): a sub-pixel's position, distance and unit direction."""
    px, py, pz = subpixel_position(fpixel, spixel, subF, subS, t, det, beam)
    return unit_direction(px, py, pz)


@njit(cache=True, error_model="numpy")
def orientations_soa(orients):
    """(m, 3, 3) rows a, b, c -> (9, m8) so loops over orientations read contiguously.

    m8 is m rounded up to a multiple of 8 (the padding is zeros): the bulk loops then run
    entirely in vector registers, with no scalar remainder; padded entries are computed
    and ignored.
    """
    norient = orients.shape[0]
    ori = np.zeros((9, (norient + 7) // 8 * 8), dtype=REAL)
    for m in range(norient):
        for i in range(3):
            for j in range(3):
                ori[3 * i + j, m] = orients[m, i, j]
    return ori


# ----------------------------------------------------------------------------- amorphous
# An amorphous material's structure factor F(stol) comes from a table (samp.bg_stol and
# samp.bg_F: stol in 1/m, increasing; material m's rows are bg_start[m] ..
# bg_start[m + 1] - 1) by the Lagrange polynomial through the rows nearest-1 ..
# nearest+2, nearest the last row at or below stol.  nonBragg.c pads its table with two
# rows at each end, at stol -1e99, -1e98 and 1e98, 1e99: a padding row's term is 0 and
# its factors (x - pad) / (a - pad) are 1 to double precision, so a point beyond the
# table is simply left out here -- the polynomial is quadratic through the first or last
# three rows near the ends and linear through the last two beyond them, as in the C --
# and the tables hold nothing beyond float32's range (single-precision twins stay
# float32).  Inside the table the four-point form is the C's, operation for operation.

@njit(cache=True, error_model="numpy", inline="always")
def amorphous_stol(qx, qy, qz):
    """sin(theta)/lambda (1/m): half the length of the scattering vector q."""
    return 0.5 * math.sqrt(qx * qx + qy * qy + qz * qz)


@njit(cache=True, error_model="numpy", inline="always")
def _basis(x, a, b, c, d, ya):
    # the Lagrange basis polynomial of abscissa a (through b, c, d) at x, times ya
    return (x - b) * (x - c) * (x - d) * ya / ((a - b) * (a - c) * (a - d))


@njit(cache=True, error_model="numpy", inline="always")
def _basis3(x, a, b, c, ya):
    return (x - b) * (x - c) * ya / ((a - b) * (a - c))


@njit(cache=True, error_model="numpy", inline="always")
def _basis2(x, a, b, ya):
    return (x - b) * ya / (a - b)


@njit(cache=True, error_model="numpy", inline="always")
def _row_guess(xs, first, last, span, x):
    """The row of table xs[first..last] (span: its last abscissa less its first) at or
    just below x if the rows were evenly spaced."""
    return first + int((x - xs[first]) * real(last - first) / span)


@njit(cache=True, error_model="numpy", inline="always")
def _amorphous_rows(samp, m, x):
    """(a, n): the rows a .. a + n - 1 of material m whose polynomial gives F at x."""
    xs = samp.bg_stol
    first = samp.bg_start[m]
    last = samp.bg_start[m + 1] - 1
    # nearest: the last row at or below x (first - 1 when x is below the table), searched
    # within [lo, hi) after a first guess from the mean spacing -- exact for the usual
    # evenly spaced tables, so the search then takes no step
    lo = first - 1
    hi = last + 1
    span = xs[last] - xs[first]
    if span > 0.0:
        g = _row_guess(xs, first, last, span, x)
        if first <= g <= last:
            if xs[g] <= x:
                lo = g
                if g + 1 > last or xs[g + 1] > x:
                    hi = g + 1
            else:
                hi = g
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if xs[mid] <= x:
            lo = mid
        else:
            hi = mid
    a = max(lo - 1, first)
    return a, min(lo + 2, last) - a + 1


@njit(cache=True, error_model="numpy")
def amorphous_F(samp, m, stol):
    """F of material m at sin(theta)/lambda ``stol`` (1/m)."""
    a, n = _amorphous_rows(samp, m, stol)
    return _lagrange_value(samp.bg_stol, samp.bg_F, a, n, stol)


@njit(cache=True, error_model="numpy", inline="always")
def _lane_rows(xs, first, last, span, x):
    """(a, ok) for the row lanes: rows a .. a + 3 of table xs[first..last] (span: its
    last abscissa less its first) around the row the mean spacing finds for x, always
    inside the table (so that they may be gathered unconditionally), and whether they are
    :func:`_amorphous_rows`' for x (the row found at or just below x, four rows inside)."""
    g = _row_guess(xs, first, last, span, x)
    gc = min(max(g, first + 1), last - 2)
    return gc - 1, g == gc and xs[gc] <= x and xs[gc + 1] > x


@njit(cache=True, error_model="numpy", inline="always")
def _lagrange4(xs, ys, a, x):
    """The cubic through rows a .. a + 3 at x (inside the table: nonBragg.c's four-point
    form, operation for operation)."""
    x0 = xs[a]
    x1 = xs[a + 1]
    x2 = xs[a + 2]
    x3 = xs[a + 3]
    return (_basis(x, x0, x1, x2, x3, ys[a]) + _basis(x, x1, x0, x2, x3, ys[a + 1])
            + _basis(x, x2, x0, x1, x3, ys[a + 2]) + _basis(x, x3, x0, x1, x2, ys[a + 3]))


@njit(cache=True, error_model="numpy")
def amorphous_lanes(samp, stol, weight, bg, redo, n):
    """bg[p] += weight[p] * :func:`amorphous_sum` (samp, stol[p]) for n lanes, each
    lane's sum bit for bit amorphous_sum's.  A lane whose rows the mean spacing finds at
    once, four of them inside the table, is summed in a loop with no calls (vectorised,
    its rows gathered); the others (a table's ends, uneven spacing) go through
    :func:`amorphous_F`'s search one by one (``redo``: scratch of n booleans)."""
    xs = samp.bg_stol
    ys = samp.bg_F
    acc = np.zeros(n, dtype=np.float64)      # amorphous_sum's float64 sums, lane by lane
    for m in range(samp.bg_amount.shape[0]):
        amount = np.float64(samp.bg_amount[m])
        first = samp.bg_start[m]
        last = samp.bg_start[m + 1] - 1
        span = xs[last] - xs[first]
        if span > 0.0 and last - first >= 3:
            for p in range(n):
                x = stol[p]
                a, ok = _lane_rows(xs, first, last, span, x)
                v = acc[p] + amount * np.float64(signed_square(_lagrange4(xs, ys, a, x)))
                acc[p] = v if ok else acc[p]
                redo[p] = not ok
        else:
            for p in range(n):
                redo[p] = True
        for p in range(n):
            if redo[p]:
                acc[p] += amount * np.float64(signed_square(amorphous_F(samp, m, stol[p])))
    for p in range(n):
        bg[p] += weight[p] * acc[p]


@njit(cache=True, error_model="numpy", inline="always")
def _lagrange4_slope(xs, ys, a, x):
    """d/dx of :func:`_lagrange4` at x: each basis polynomial's derivative, the sum over
    its three factors of the other two's product (no calls: loops over lanes vectorise)."""
    x0 = xs[a]
    x1 = xs[a + 1]
    x2 = xs[a + 2]
    x3 = xs[a + 3]
    u0 = x - x0
    u1 = x - x1
    u2 = x - x2
    u3 = x - x3
    return ((u2 * u3 + u1 * u3 + u1 * u2) * ys[a] / ((x0 - x1) * (x0 - x2) * (x0 - x3))
            + (u2 * u3 + u0 * u3 + u0 * u2) * ys[a + 1] / ((x1 - x0) * (x1 - x2) * (x1 - x3))
            + (u1 * u3 + u0 * u3 + u0 * u1) * ys[a + 2] / ((x2 - x0) * (x2 - x1) * (x2 - x3))
            + (u1 * u2 + u0 * u2 + u0 * u1) * ys[a + 3] / ((x3 - x0) * (x3 - x1) * (x3 - x2)))


@njit(cache=True, error_model="numpy")
def amorphous_grad_lanes(samp, stol, A, dA, sq, redo, n):
    """The materials' sum and its derivative for n lanes, as :func:`amorphous_F_grad`
    gives them lane by lane: A[p] = sum_m amount_m sq[m, p], sq[m, p] = sign(F_m) F_m^2
    at stol[p] (the derivative of A in material m's amount), and dA[p], A's derivative in
    stol[p] (A and dA bit for bit the walk's: :func:`_lagrange4_slope` takes
    amorphous_F_grad's products in its order).  Lanes found at once by the mean spacing
    are computed in loops with no calls, as :func:`amorphous_lanes`' (``redo``: scratch of
    n booleans)."""
    xs = samp.bg_stol
    ys = samp.bg_F
    A[:n] = 0.0
    dA[:n] = 0.0
    for m in range(samp.bg_amount.shape[0]):
        amount = samp.bg_amount[m]
        first = samp.bg_start[m]
        last = samp.bg_start[m + 1] - 1
        span = xs[last] - xs[first]
        sqm = sq[m]
        if span > 0.0 and last - first >= 3:
            for p in range(n):
                x = stol[p]
                a, ok = _lane_rows(xs, first, last, span, x)
                F = _lagrange4(xs, ys, a, x)
                sF2 = signed_square(F)
                v = A[p] + amount * sF2
                d = dA[p] + amount * 2.0 * abs(F) * _lagrange4_slope(xs, ys, a, x)
                A[p] = v if ok else A[p]
                dA[p] = d if ok else dA[p]
                sqm[p] = sF2
                redo[p] = not ok
        else:
            for p in range(n):
                redo[p] = True
        for p in range(n):
            if redo[p]:
                F, dF = amorphous_F_grad(samp, m, stol[p])
                sqm[p] = signed_square(F)
                A[p] += amount * sqm[p]
                dA[p] += amount * 2.0 * abs(F) * dF


@njit(cache=True, error_model="numpy", inline="always")
def _lagrange_value(xs, ys, a, n, x):
    # the polynomial through rows a .. a + n - 1 at x, in nonBragg.c's form
    if n >= 4:
        return _lagrange4(xs, ys, a, x)
    if n == 3:
        x0 = xs[a]
        x1 = xs[a + 1]
        x2 = xs[a + 2]
        return _basis3(x, x0, x1, x2, ys[a]) + _basis3(x, x1, x0, x2, ys[a + 1]) + _basis3(x, x2, x0, x1, ys[a + 2])
    if n == 2:
        return _basis2(x, xs[a], xs[a + 1], ys[a]) + _basis2(x, xs[a + 1], xs[a], ys[a + 1])
    return ys[a]


@njit(cache=True, error_model="numpy")
def amorphous_F_grad(samp, m, stol):
    """(F, dF/dstol) of material m at ``stol`` (1/m): F is amorphous_F's, bit for bit,
    from the same search."""
    xs = samp.bg_stol
    ys = samp.bg_F
    x = stol
    a, n = _amorphous_rows(samp, m, x)
    dF = 0.0
    for k in range(n):
        # d/dx of row k's basis polynomial: the sum over its factors of the others' product
        num = 0.0
        den = 1.0
        for i in range(n):
            if i == k:
                continue
            den *= xs[a + k] - xs[a + i]
            term = 1.0
            for j in range(n):
                if j != k and j != i:
                    term *= x - xs[a + j]
            num += term
        dF += num * ys[a + k] / den
    return _lagrange_value(xs, ys, a, n, x), dF


@njit(cache=True, error_model="numpy", inline="always")
def signed_square(F):
    """sign(F) F^2: a negative interpolated F gives a negative intensity, as in nonBragg.c."""
    return -F * F if F < 0.0 else F * F


@njit(cache=True, error_model="numpy")
def amorphous_sum(samp, stol):
    """sum over materials of amount_m sign(F_m) F_m^2 at ``stol``, summed in float64 (a
    declared accumulator: amounts of 1e20 molecules times F^2 can pass float32's range)."""
    acc = np.float64(0.0)
    for m in range(samp.bg_amount.shape[0]):
        acc += np.float64(samp.bg_amount[m]) * np.float64(signed_square(amorphous_F(samp, m, stol)))
    return acc


@njit(cache=True, error_model="numpy", inline="always")
def amorphous_factor(S, s, ix, iy, iz, dx, dy, dz, omega, capture):
    """The factors of an amorphous sample, as nonBragg.c takes them: the polarization for
    this source and direction, the sub-pixel's solid angle and capture fraction (taken at
    every sub-pixel), and the source's weight."""
    beam = S.beam
    bx = by = bz = ex = ey = ez = 0.0
    if not beam.nopolar:
        pv = beam.polar_axis
        bx, by, bz, ex, ey, ez = polarization_axes(beam.kahn, ix, iy, iz, pv[0], pv[1], pv[2])
    return amorphous_weight(beam.nopolar, beam.kahn, ix, iy, iz, dx, dy, dz, bx, by, bz, ex, ey, ez, omega,
                            beam.weights[s], capture)


@njit(cache=True, error_model="numpy", inline="always")
def amorphous_weight(nopolar, kahn, ix, iy, iz, dx, dy, dz, bx, by, bz, ex, ey, ez, omega, ws, capture):
    """:func:`amorphous_factor` given the source's polarization axes (:func:`polarization_axes`)
    and weight ws: no calls, so loops over pixels vectorise."""
    polar = 1.0
    if not nopolar:
        polar = polarization_with_axes(kahn, ix, iy, iz, dx, dy, dz, bx, by, bz, ex, ey, ez)
    return polar * omega * ws * capture


@njit(cache=True, error_model="numpy", inline="always")
def amorphous_term(S, s, ix, iy, iz, dx, dy, dz, omega, capture, qx, qy, qz):
    """One amorphous sample of source ``s`` toward d at scattering vector q: its
    :func:`amorphous_factor` times the materials' :func:`amorphous_sum` (float64)."""
    return amorphous_factor(S, s, ix, iy, iz, dx, dy, dz, omega, capture) * amorphous_sum(
        S.samp, amorphous_stol(qx, qy, qz))
