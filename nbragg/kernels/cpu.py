"""CPU kernels (Numba, parallel over detector rows).

The forward kernel computes, for every pixel inside the ROI and the mask, nanoBragg's
accumulated intensity times the solid-angle, polarization and absorption factors.  The
engine multiplies by r_e^2 * fluence / steps.  Each pixel is computed by one thread
from start to end, so the image does not depend on the number of threads.

Inputs are packed into a few arrays so that the signature (and the compiled
specialisation) stays the same for every experiment:

``geom`` (6, 3): pix0, fdet, sdet, odet, beam, polar_vector (metres / unit vectors)
``fpar`` float64[NF], ``ipar`` int64[NI]: scalar settings, indexed by the constants below
``sources`` (n, 3) unit vectors toward the sources; ``lambdas`` (n,) metres
``orients`` (m, 3, 3) rows a, b, c in metres; ``recip`` (3, 3) rows a*, b*, c* (1/A)
``fgrid`` 3-D structure-factor grid (1x1x1 when there is none); ``mask`` uint8 image
"""

import math

import numpy as np
from numba import njit, prange

from .physics import (GAUSS, GAUSS_WIDTH, PI, REAL, ROUND, ROUND_SCALE, SQUARE,
                      TOPHAT_RADIUS_SQR, lagrange4, polarization_factor, real, sinc3,
                      sincg_frac, sinpi_sq_parts, sum_fixed)

# fpar indices
F_PIXEL = 0
F_SUBPIXEL = 1
F_DISTANCE = 2
F_CLOSE_DISTANCE = 3
F_THICKSTEP = 4
F_MU = 5
F_KAHN = 6
F_DMIN = 7
F_NA = 8
F_NB = 9
F_NC = 10
F_FUDGE = 11
F_DEFAULT_F = 12
F_I_BG = 13
F_THICK = 14
NF = 15

# ipar indices
I_OVERSAMPLE = 0
I_THICKSTEPS = 1
I_CURVED = 2
I_POINT_PIXEL = 3
I_OS_OMEGA = 4
I_OS_POLAR = 5
I_OS_THICK = 6
I_NOPOLAR = 7
I_SHAPE = 8
I_HAS_HKLS = 9
I_INTERPOLATE = 10
I_WATER = 11
I_ROI = 12          # 4 entries: xmin, xmax, ymin, ymax (inclusive)
I_HKL_MIN = 16      # 3 entries
I_HKL_MAX = 19      # 3 entries
I_USE_MASK = 22
NI = 23


@njit(cache=True, error_model="numpy")
def lookup_F(h, k, l, h0, k0, l0, fgrid, ipar, default_F):
    """Structure factor at fractional (h, k, l): tricubic or nearest, nanoBragg rules."""
    hmin = ipar[I_HKL_MIN]
    kmin = ipar[I_HKL_MIN + 1]
    lmin = ipar[I_HKL_MIN + 2]
    hmax = ipar[I_HKL_MAX]
    kmax = ipar[I_HKL_MAX + 1]
    lmax = ipar[I_HKL_MAX + 2]
    if ipar[I_INTERPOLATE] != 0:
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
    if ipar[I_HAS_HKLS] != 0 and hmin <= h0 <= hmax and kmin <= k0 <= kmax and lmin <= l0 <= lmax:
        return fgrid[h0 - hmin, k0 - kmin, l0 - lmin]
    return default_F


@njit(cache=True, error_model="numpy")
def lattice_factor(h, k, l, h0, k0, l0, shape, Na, Nb, Nc, fudge, recip):
    """F_latt for one orientation sample."""
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
        return Na * Nb * Nc * ROUND_SCALE * sinc3(PI * math.sqrt(hrad * fudge))
    dx = dh * recip[0, 0] + dk * recip[1, 0] + dl * recip[2, 0]
    dy = dh * recip[0, 1] + dk * recip[1, 1] + dl * recip[2, 1]
    dz = dh * recip[0, 2] + dk * recip[1, 2] + dl * recip[2, 2]
    rad = (dx * dx + dy * dy + dz * dz) * Na * Na * Nb * Nb * Nc * Nc
    if shape == GAUSS:
        return Na * Nb * Nc * math.exp(-(rad / GAUSS_WIDTH * fudge))
    if rad * fudge < TOPHAT_RADIUS_SQR:
        return Na * Nb * Nc
    return 0.0


@njit(cache=True, error_model="numpy")
def subpixel_position(fpixel, spixel, subF, subS, t, geom, fpar, ipar):
    """3-D position (x, y, z) of a sub-pixel in sensor layer t (metres)."""
    os = ipar[I_OVERSAMPLE]
    sub = fpar[F_SUBPIXEL]
    Fdet = sub * real(fpixel * os + subF) + sub / 2.0
    Sdet = sub * real(spixel * os + subS) + sub / 2.0
    Odet = real(t) * fpar[F_THICKSTEP]
    px = Fdet * geom[1, 0] + Sdet * geom[2, 0] + Odet * geom[3, 0] + geom[0, 0]
    py = Fdet * geom[1, 1] + Sdet * geom[2, 1] + Odet * geom[3, 1] + geom[0, 1]
    pz = Fdet * geom[1, 2] + Sdet * geom[2, 2] + Odet * geom[3, 2] + geom[0, 2]
    if ipar[I_CURVED] != 0:
        # a point at "distance" along the beam, swung about sdet by y/distance and then
        # about fdet by z/distance (nanoBragg's curved detector)
        dist = fpar[F_DISTANCE]
        vx = dist * geom[4, 0]
        vy = dist * geom[4, 1]
        vz = dist * geom[4, 2]
        vx, vy, vz = _rotate_axis(vx, vy, vz, geom[2, 0], geom[2, 1], geom[2, 2], py / dist)
        px, py, pz = _rotate_axis(vx, vy, vz, geom[1, 0], geom[1, 1], geom[1, 2], pz / dist)
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
def soa_hkl(ori, m, qx, qy, qz):
    """Fractional (h, k, l) of orientation m of a (9, m8) orientation block."""
    return (ori[0, m] * qx + ori[1, m] * qy + ori[2, m] * qz,
            ori[3, m] * qx + ori[4, m] * qy + ori[5, m] * qz,
            ori[6, m] * qx + ori[7, m] * qy + ori[8, m] * qz)


@njit(cache=True, error_model="numpy", inline="always")
def grid_extent(ipar):
    """(hmin, kmin, lmin, nh, nk, nl) of the structure-factor grid."""
    hmin = ipar[I_HKL_MIN]
    kmin = ipar[I_HKL_MIN + 1]
    lmin = ipar[I_HKL_MIN + 2]
    return (hmin, kmin, lmin,
            ipar[I_HKL_MAX] - hmin + 1, ipar[I_HKL_MAX + 1] - kmin + 1, ipar[I_HKL_MAX + 2] - lmin + 1)


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
def square_terms(qx, qy, qz, ori, Na, Nb, Nc, fflat, ipar, default_F, buf, ibuf):
    """F_cell^2 F_latt^2 for every orientation (parallelepiped shape, nearest F).

    The first loop has no calls, gathers or early exits, so LLVM vectorises it; the
    structure-factor gather, when there is a grid, runs in a second (scalar) loop.
    ``ori`` is (9, m8): rows a_x a_y a_z b_x ... c_z, zero-padded (see
    :func:`orientations_soa`); ``fflat`` the flattened grid.  Entries past the real
    orientations hold garbage and must be ignored.
    """
    n = ori.shape[1]
    use_grid = ipar[I_HAS_HKLS] != 0
    extent = grid_extent(ipar)
    for m in range(n):
        h, k, l = soa_hkl(ori, m, qx, qy, qz)
        h0 = int(math.ceil(h - 0.5))
        k0 = int(math.ceil(k - 0.5))
        l0 = int(math.ceil(l - 0.5))
        num = 1.0
        den = 1.0
        if Na > 1.0:
            a, b = sinpi_sq_parts(h - real(h0), Na)
            num *= a
            den *= b
        if Nb > 1.0:
            a, b = sinpi_sq_parts(k - real(k0), Nb)
            num *= a
            den *= b
        if Nc > 1.0:
            a, b = sinpi_sq_parts(l - real(l0), Nc)
            num *= a
            den *= b
        latt = num / den
        buf[m] = latt * latt
        if use_grid:
            ibuf[m] = flat_grid_index(h0, k0, l0, extent)
    Fdef2 = default_F * default_F
    if use_grid:
        for m in range(n):
            j = ibuf[m]
            if j >= 0:
                F = fflat[j]
                buf[m] *= F * F
            else:
                buf[m] *= Fdef2
    else:
        for m in range(n):
            buf[m] *= Fdef2


@njit(cache=True, error_model="numpy")
def pixel_value(fpixel, spixel, geom, fpar, ipar, sources, lambdas, orients, recip, fgrid, fast, ori, fflat, buf,
                ibuf):
    """One pixel: returns (value before r_e^2*fluence/steps, sum of sub-pixel omegas).

    ``fast`` (see :func:`fast_path`) sums each block's orientations in bulk with
    :func:`square_terms` (CPU vector loops over ``ori``, ``buf``, ``ibuf``); otherwise
    they are summed one by one, as the GPU does."""
    os = ipar[I_OVERSAMPLE]
    thicksteps = ipar[I_THICKSTEPS]
    os_omega = ipar[I_OS_OMEGA] != 0
    os_polar = ipar[I_OS_POLAR] != 0
    os_thick = ipar[I_OS_THICK] != 0
    shape = ipar[I_SHAPE]
    water = ipar[I_WATER] != 0
    pixel = fpar[F_PIXEL]
    close_distance = fpar[F_CLOSE_DISTANCE]
    thickstep = fpar[F_THICKSTEP]
    mu = fpar[F_MU]
    kahn = fpar[F_KAHN]
    dmin = fpar[F_DMIN]
    Na = fpar[F_NA]
    Nb = fpar[F_NB]
    Nc = fpar[F_NC]
    fudge = fpar[F_FUDGE]
    default_F = fpar[F_DEFAULT_F]
    ox = geom[3, 0]
    oy = geom[3, 1]
    oz = geom[3, 2]
    pvx = geom[5, 0]
    pvy = geom[5, 1]
    pvz = geom[5, 2]
    nsrc = sources.shape[0]
    norient = orients.shape[0]

    # the pixel's sum of samples: np.float64(), which single-precision twins keep, holds it in
    # float64 (one add per sample) so that long sums keep their digits there too
    I = np.float64(fpar[F_I_BG])
    polar = 1.0 if ipar[I_NOPOLAR] != 0 else 0.0
    omega = 0.0
    omega_sum = 0.0
    capture = 0.0
    for t in range(thicksteps):
        capture = 1.0 if fpar[F_THICK] == 0.0 else 0.0
        for subS in range(os):
            for subF in range(os):
                px, py, pz = subpixel_position(fpixel, spixel, subF, subS, t, geom, fpar, ipar)
                R = math.sqrt(px * px + py * py + pz * pz)
                if R != 0.0:
                    dx = px / R
                    dy = py / R
                    dz = pz / R
                else:
                    dx = 0.0
                    dy = 0.0
                    dz = 0.0
                if omega == 0.0 or os_omega:
                    omega = pixel * pixel / R / R * close_distance / R
                    if ipar[I_POINT_PIXEL] != 0:
                        omega = 1.0 / R / R
                omega_sum += omega
                if capture == 0.0 or os_thick:
                    parallax = dx * ox + dy * oy + dz * oz
                    capture = (math.exp(-real(t) * thickstep * mu / parallax)
                               - math.exp(-real(t + 1) * thickstep * mu / parallax))
                for s in range(nsrc):
                    ix = -sources[s, 0]
                    iy = -sources[s, 1]
                    iz = -sources[s, 2]
                    lam = lambdas[s]
                    qx = (dx - ix) / lam
                    qy = (dy - iy) / lam
                    qz = (dz - iz) / lam
                    if dmin > 0.0:
                        stol = 0.5 * math.sqrt(qx * qx + qy * qy + qz * qz)
                        if stol > 0.0 and dmin > 0.5 / stol:
                            continue
                    if polar == 0.0 or os_polar:
                        polar = polarization_factor(kahn, ix, iy, iz, dx, dy, dz, pvx, pvy, pvz)
                    if fast:
                        square_terms(qx, qy, qz, ori, Na, Nb, Nc, fflat, ipar, default_F, buf, ibuf)
                        I += sum_fixed(buf, norient)
                        continue
                    for m in range(norient):
                        h = orients[m, 0, 0] * qx + orients[m, 0, 1] * qy + orients[m, 0, 2] * qz
                        k = orients[m, 1, 0] * qx + orients[m, 1, 1] * qy + orients[m, 1, 2] * qz
                        l = orients[m, 2, 0] * qx + orients[m, 2, 1] * qy + orients[m, 2, 2] * qz
                        h0 = int(math.ceil(h - 0.5))
                        k0 = int(math.ceil(k - 0.5))
                        l0 = int(math.ceil(l - 0.5))
                        F_latt = lattice_factor(h, k, l, h0, k0, l0, shape, Na, Nb, Nc, fudge, recip)
                        if F_latt == 0.0 and not water:
                            continue
                        F_cell = lookup_F(h, k, l, h0, k0, l0, fgrid, ipar, default_F)
                        I += F_cell * F_cell * F_latt * F_latt
                        if os_thick:
                            I *= capture
                        if os_polar:
                            I *= polar
                        if os_omega:
                            I *= omega
    value = I
    if not os_thick:
        value *= capture
    if not os_polar:
        value *= polar
    if not os_omega:
        value *= omega
    return value, omega_sum


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


@njit(cache=True)
def fast_path(ipar):
    """True when the kernels may use the bulk orientation loops (no -oversample_* flags,
    parallelepiped spots, nearest-neighbour F)."""
    return (ipar[I_OS_OMEGA] == 0 and ipar[I_OS_POLAR] == 0 and ipar[I_OS_THICK] == 0
            and ipar[I_SHAPE] == SQUARE and ipar[I_INTERPOLATE] == 0)


@njit(parallel=True, cache=True, error_model="numpy")
def forward(geom, fpar, ipar, sources, lambdas, orients, recip, fgrid, mask, image, omega_rows):
    """Fill ``image`` (spixels, fpixels) inside ROI and mask; other pixels are left as they are."""
    spixels, fpixels = image.shape
    xmin = max(ipar[I_ROI], 0)
    xmax = min(ipar[I_ROI + 1], fpixels - 1)
    ymin = max(ipar[I_ROI + 2], 0)
    ymax = min(ipar[I_ROI + 3], spixels - 1)
    use_mask = ipar[I_USE_MASK] != 0
    ori = orientations_soa(orients)
    fflat = fgrid.ravel()
    npad = ori.shape[1]
    fast = fast_path(ipar)
    for spixel in prange(ymin, ymax + 1):
        buf = np.empty(npad, dtype=REAL)
        ibuf = np.empty(npad, dtype=np.int64)
        osum = 0.0
        for fpixel in range(xmin, xmax + 1):
            if use_mask and mask[spixel, fpixel] == 0:
                continue
            v, o = pixel_value(fpixel, spixel, geom, fpar, ipar, sources, lambdas, orients, recip, fgrid, fast, ori, fflat,
                               buf, ibuf)
            image[spixel, fpixel] = v
            osum += o
        omega_rows[spixel] = osum
