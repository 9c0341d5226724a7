"""Tangent (forward-mode) CPU kernel: per-pixel derivatives along P input directions.

Each direction is d(kernel inputs)/d(theta_p) for one parameter theta_p (see
:mod:`nbragg.params`).  The forward loops run once per pixel carrying P tangents next
to every value, so the result is the Jacobian dI_i/dtheta_p (pixels x P).  Every
pixel is computed by one thread, so the result does not depend on the thread count.
"""

import math

import numpy as np
from numba import njit, prange

from .cpu import (F_CLOSE_DISTANCE, F_DEFAULT_F, F_DMIN, F_FUDGE, F_I_BG, F_KAHN, F_MU, F_NA,
                  F_NB, F_NC, F_PIXEL, F_SUBPIXEL, F_THICK, F_THICKSTEP, F_DISTANCE, I_CURVED,
                  I_NOPOLAR, I_OS_OMEGA, I_OS_POLAR, I_OS_THICK, I_OVERSAMPLE, I_ROI,
                  I_SHAPE, I_THICKSTEPS, I_USE_MASK, I_WATER, NF)
from .derivs import LP_SIZE, F_grad, capture_partials, lattice_grad, omega_partials
from .adjoint import _geometry, _omega
from .physics import polarization_grad, axis_lattice_grad, sum_row
from .cpu import I_HAS_HKLS, fast_path, flat_grid_index, grid_extent, orientations_soa, soa_hkl


@njit(cache=True, error_model="numpy", inline="always")
def square_tangent(qx, qy, qz, ori, nreal, Na, Nb, Nc, fflat, ipar, default_F, dq, dfpar, dori, has_dori,
                   dI, sc, ibuf):
    """Tangents of one block's terms (parallelepiped, nearest F, no -oversample_* flags).

    Adds d(sum of terms)/dtheta_p to dI[p] and returns the sum of terms.  The per-
    orientation work is done once (vectorised); each parameter then costs three dot
    products, plus one vectorised pass when it moves the orientations.
    """
    n = ori.shape[1]
    use_grid = ipar[I_HAS_HKLS] != 0
    extent = grid_extent(ipar)
    for m in range(n):
        h, k, l = soa_hkl(ori, m, qx, qy, qz)
        h0 = int(math.ceil(h - 0.5))
        k0 = int(math.ceil(k - 0.5))
        l0 = int(math.ceil(l - 0.5))
        ga, dga, nga = axis_lattice_grad(h - h0, Na)
        gb, dgb, ngb = axis_lattice_grad(k - k0, Nb)
        gc, dgc, ngc = axis_lattice_grad(l - l0, Nc)
        sc[0, m] = ga * gb * gc
        sc[1, m] = dga * gb * gc
        sc[2, m] = ga * dgb * gc
        sc[3, m] = ga * gb * dgc
        sc[4, m] = nga * gb * gc
        sc[5, m] = ga * ngb * gc
        sc[6, m] = ga * gb * ngc
        if use_grid:
            ibuf[m] = flat_grid_index(h0, k0, l0, extent)
    if use_grid:
        for m in range(nreal):
            j = ibuf[m]
            sc[7, m] = fflat[j] if j >= 0 else default_F
            sc[8, m] = 0.0 if j >= 0 else 1.0
    else:
        for m in range(nreal):
            sc[7, m] = default_F
            sc[8, m] = 1.0
    for m in range(nreal, n):
        sc[7, m] = 0.0
        sc[8, m] = 0.0
    for m in range(n):
        F = sc[7, m]
        L = sc[0, m]
        c = 2.0 * F * F * L
        cA = c * sc[1, m]
        cB = c * sc[2, m]
        cC = c * sc[3, m]
        sc[9, m] = cA * ori[0, m] + cB * ori[3, m] + cC * ori[6, m]
        sc[10, m] = cA * ori[1, m] + cB * ori[4, m] + cC * ori[7, m]
        sc[11, m] = cA * ori[2, m] + cB * ori[5, m] + cC * ori[8, m]
        sc[4, m] = c * sc[4, m]
        sc[5, m] = c * sc[5, m]
        sc[6, m] = c * sc[6, m]
        sc[8, m] = sc[8, m] * 2.0 * F * L * L
        sc[12, m] = F * F * L * L
        sc[1, m] = cA
        sc[2, m] = cB
        sc[3, m] = cC
    Wx = sum_row(sc, 9, n)
    Wy = sum_row(sc, 10, n)
    Wz = sum_row(sc, 11, n)
    SNa = sum_row(sc, 4, n)
    SNb = sum_row(sc, 5, n)
    SNc = sum_row(sc, 6, n)
    SD = sum_row(sc, 8, n)
    npar = dI.shape[0]
    for p in range(npar):
        v = (dq[p, 0] * Wx + dq[p, 1] * Wy + dq[p, 2] * Wz + dfpar[p, F_NA] * SNa + dfpar[p, F_NB] * SNb
             + dfpar[p, F_NC] * SNc + dfpar[p, F_DEFAULT_F] * SD)
        if has_dori[p]:
            if nreal < 8:   # a few orientations: a plain loop beats a padded vector pass
                for m in range(nreal):
                    v += (sc[1, m] * (dori[p, 0, m] * qx + dori[p, 1, m] * qy + dori[p, 2, m] * qz)
                          + sc[2, m] * (dori[p, 3, m] * qx + dori[p, 4, m] * qy + dori[p, 5, m] * qz)
                          + sc[3, m] * (dori[p, 6, m] * qx + dori[p, 7, m] * qy + dori[p, 8, m] * qz))
            else:
                for m in range(n):
                    sc[13, m] = (sc[1, m] * (dori[p, 0, m] * qx + dori[p, 1, m] * qy + dori[p, 2, m] * qz)
                                 + sc[2, m] * (dori[p, 3, m] * qx + dori[p, 4, m] * qy + dori[p, 5, m] * qz)
                                 + sc[3, m] * (dori[p, 6, m] * qx + dori[p, 7, m] * qy + dori[p, 8, m] * qz))
                v += sum_row(sc, 13, n)
        dI[p] += v
    return sum_row(sc, 12, nreal)


# per-direction flags: which tangent inputs are non-zero (work for the others is skipped)
T_GEO = 1      # the sub-pixel positions move (detector vectors, distance, sub-pixel size)
T_SRC = 2      # source directions
T_LAM = 4      # wavelengths
T_OMEGA = 8    # pixel size / close distance (solid angle)
T_POL = 16     # Kahn factor or polarization axis
T_CAP = 32     # absorption (mu, layer spacing, odet)


def tangent_flags(dgeom, dfpar, dsrc, dlam):
    """Bit flags per direction (see T_GEO ...)."""
    P = dfpar.shape[0]
    flags = np.zeros(P, dtype=np.int64)
    for p in range(P):
        f = 0
        if (np.any(dgeom[p, :5] != 0) or dfpar[p, F_SUBPIXEL] != 0 or dfpar[p, F_THICKSTEP] != 0
                or dfpar[p, F_DISTANCE] != 0):
            f |= T_GEO
        if np.any(dsrc[p] != 0):
            f |= T_SRC
        if np.any(dlam[p] != 0):
            f |= T_LAM
        if dfpar[p, F_PIXEL] != 0 or dfpar[p, F_CLOSE_DISTANCE] != 0:
            f |= T_OMEGA
        if dfpar[p, F_KAHN] != 0 or np.any(dgeom[p, 5] != 0):
            f |= T_POL
        if dfpar[p, F_MU] != 0 or dfpar[p, F_THICKSTEP] != 0 or np.any(dgeom[p, 3] != 0):
            f |= T_CAP
        flags[p] = f
    return flags


@njit(cache=True, error_model="numpy")
def _rot_jvp(vx, vy, vz, ax, ay, az, phi, dvx, dvy, dvz, dax, day, daz, dphi):
    """Value and tangent of rotate_axis(v, a, phi)."""
    s = math.sin(phi)
    c = math.cos(phi)
    av = ax * vx + ay * vy + az * vz
    ox = ax * av * (1 - c) + vx * c + (ay * vz - az * vy) * s
    oy = ay * av * (1 - c) + vy * c + (az * vx - ax * vz) * s
    oz = az * av * (1 - c) + vz * c + (ax * vy - ay * vx) * s
    dav = dax * vx + day * vy + daz * vz + ax * dvx + ay * dvy + az * dvz
    tx = ((dax * av + ax * dav) * (1 - c) + dvx * c + (day * vz + ay * dvz - daz * vy - az * dvy) * s
          + (ax * av * s - vx * s + (ay * vz - az * vy) * c) * dphi)
    ty = ((day * av + ay * dav) * (1 - c) + dvy * c + (daz * vx + az * dvx - dax * vz - ax * dvz) * s
          + (ay * av * s - vy * s + (az * vx - ax * vz) * c) * dphi)
    tz = ((daz * av + az * dav) * (1 - c) + dvz * c + (dax * vy + ax * dvy - day * vx - ay * dvx) * s
          + (az * av * s - vz * s + (ax * vy - ay * vx) * c) * dphi)
    return ox, oy, oz, tx, ty, tz


@njit(cache=True, error_model="numpy")
def _position_jvp(fpixel, spixel, subF, subS, t, geom, fpar, ipar, dgeom, dfpar, flags, dP):
    """Tangents of the sub-pixel position for every direction (written to dP (P, 3))."""
    os = ipar[I_OVERSAMPLE]
    sub = fpar[F_SUBPIXEL]
    cF = fpixel * os + subF + 0.5
    cS = spixel * os + subS + 0.5
    Fdet = sub * (fpixel * os + subF) + sub / 2.0
    Sdet = sub * (spixel * os + subS) + sub / 2.0
    Odet = t * fpar[F_THICKSTEP]
    npar = dP.shape[0]
    curved = ipar[I_CURVED] != 0
    D = fpar[F_DISTANCE]
    py = Fdet * geom[1, 1] + Sdet * geom[2, 1] + Odet * geom[3, 1] + geom[0, 1]
    pz = Fdet * geom[1, 2] + Sdet * geom[2, 2] + Odet * geom[3, 2] + geom[0, 2]
    for p in range(npar):
        if (flags[p] & T_GEO) == 0:
            continue
        dF = cF * dfpar[p, F_SUBPIXEL]
        dS = cS * dfpar[p, F_SUBPIXEL]
        dO = t * dfpar[p, F_THICKSTEP]
        for j in range(3):
            dP[p, j] = (dgeom[p, 0, j] + Fdet * dgeom[p, 1, j] + dF * geom[1, j] + Sdet * dgeom[p, 2, j]
                        + dS * geom[2, j] + Odet * dgeom[p, 3, j] + dO * geom[3, j])
        if curved:
            dD = dfpar[p, F_DISTANCE]
            v0x = D * geom[4, 0]
            v0y = D * geom[4, 1]
            v0z = D * geom[4, 2]
            dv0x = dD * geom[4, 0] + D * dgeom[p, 4, 0]
            dv0y = dD * geom[4, 1] + D * dgeom[p, 4, 1]
            dv0z = dD * geom[4, 2] + D * dgeom[p, 4, 2]
            dphi1 = dP[p, 1] / D - py * dD / (D * D)
            dphi2 = dP[p, 2] / D - pz * dD / (D * D)
            v1x, v1y, v1z, dv1x, dv1y, dv1z = _rot_jvp(v0x, v0y, v0z, geom[2, 0], geom[2, 1], geom[2, 2], py / D,
                                                        dv0x, dv0y, dv0z, dgeom[p, 2, 0], dgeom[p, 2, 1],
                                                        dgeom[p, 2, 2], dphi1)
            _, _, _, tx, ty, tz = _rot_jvp(v1x, v1y, v1z, geom[1, 0], geom[1, 1], geom[1, 2], pz / D,
                                           dv1x, dv1y, dv1z, dgeom[p, 1, 0], dgeom[p, 1, 1], dgeom[p, 1, 2], dphi2)
            dP[p, 0] = tx
            dP[p, 1] = ty
            dP[p, 2] = tz


@njit(cache=True, error_model="numpy")
def pixel_tangent(fpixel, spixel, geom, fpar, ipar, sources, lambdas, orients, recip, fgrid,
                  dgeom, dfpar, dsrc, dlam, dori, drec, dP, dd, dq, dI, dom, dcap, dpol, dm, lp, pbuf, fidx, fw,
                  fast, ori, fflat, dori_soa, has_dori, flags, sc, ibuf):
    """Value (unscaled) of one pixel; its tangents are left in dI (P).

    ``fast``: blocks go through :func:`square_tangent` (CPU vector loops), as in
    :func:`~nbragg.kernels.cpu.pixel_value`."""
    os = ipar[I_OVERSAMPLE]
    thicksteps = ipar[I_THICKSTEPS]
    os_omega = ipar[I_OS_OMEGA] != 0
    os_polar = ipar[I_OS_POLAR] != 0
    os_thick = ipar[I_OS_THICK] != 0
    shape = ipar[I_SHAPE]
    water = ipar[I_WATER] != 0
    kahn = fpar[F_KAHN]
    dmin = fpar[F_DMIN]
    Na = fpar[F_NA]
    Nb = fpar[F_NB]
    Nc = fpar[F_NC]
    fudge = fpar[F_FUDGE]
    default_F = fpar[F_DEFAULT_F]
    nsrc = sources.shape[0]
    norient = orients.shape[0]
    npar = dI.shape[0]
    I = fpar[F_I_BG]
    for p in range(npar):
        dI[p] = dfpar[p, F_I_BG]
        dom[p] = 0.0
        dcap[p] = 0.0
        dpol[p] = 0.0
    polar = 1.0 if ipar[I_NOPOLAR] != 0 else 0.0
    omega = 0.0
    capture = 0.0
    for t in range(thicksteps):
        capture = 1.0 if fpar[F_THICK] == 0.0 else 0.0
        for p in range(npar):
            dcap[p] = 0.0
        for subS in range(os):
            for subF in range(os):
                px, py, pz, R, dx, dy, dz = _geometry(fpixel, spixel, subF, subS, t, geom, fpar, ipar)
                _position_jvp(fpixel, spixel, subF, subS, t, geom, fpar, ipar, dgeom, dfpar, flags, dP)
                for p in range(npar):
                    if (flags[p] & T_GEO) == 0:
                        continue
                    dR = dx * dP[p, 0] + dy * dP[p, 1] + dz * dP[p, 2]
                    dd[p, 0] = (dP[p, 0] - dx * dR) / R
                    dd[p, 1] = (dP[p, 1] - dy * dR) / R
                    dd[p, 2] = (dP[p, 2] - dz * dR) / R
                    dd[p, 3] = dR
                if omega == 0.0 or os_omega:
                    omega = _omega(R, fpar, ipar)
                    oR, opix, oclose = omega_partials(R, fpar, ipar, omega)
                    for p in range(npar):
                        if (flags[p] & (T_GEO | T_OMEGA)) != 0:
                            dom[p] = oR * dd[p, 3] + opix * dfpar[p, F_PIXEL] + oclose * dfpar[p, F_CLOSE_DISTANCE]
                if capture == 0.0 or os_thick:
                    cap, cdx, cdy, cdz, cox, coy, coz, cts, cmu = capture_partials(t, dx, dy, dz, geom, fpar)
                    capture = cap
                    for p in range(npar):
                        if (flags[p] & (T_GEO | T_CAP)) == 0:
                            continue
                        dcap[p] = (cdx * dd[p, 0] + cdy * dd[p, 1] + cdz * dd[p, 2] + cox * dgeom[p, 3, 0]
                                   + coy * dgeom[p, 3, 1] + coz * dgeom[p, 3, 2] + cts * dfpar[p, F_THICKSTEP]
                                   + cmu * dfpar[p, F_MU])
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
                    for p in range(npar):
                        if (flags[p] & (T_GEO | T_SRC | T_LAM)) == 0:
                            continue
                        dq[p, 0] = (dd[p, 0] + dsrc[p, s, 0] - qx * dlam[p, s]) / lam
                        dq[p, 1] = (dd[p, 1] + dsrc[p, s, 1] - qy * dlam[p, s]) / lam
                        dq[p, 2] = (dd[p, 2] + dsrc[p, s, 2] - qz * dlam[p, s]) / lam
                    if polar == 0.0 or os_polar:
                        polar = polarization_grad(kahn, ix, iy, iz, dx, dy, dz, geom[5, 0], geom[5, 1], geom[5, 2], pbuf)
                        for p in range(npar):
                            if (flags[p] & (T_GEO | T_SRC | T_POL)) == 0:
                                continue
                            dpol[p] = (pbuf[0] * dfpar[p, F_KAHN] - pbuf[1] * dsrc[p, s, 0] - pbuf[2] * dsrc[p, s, 1]
                                       - pbuf[3] * dsrc[p, s, 2] + pbuf[4] * dd[p, 0] + pbuf[5] * dd[p, 1]
                                       + pbuf[6] * dd[p, 2] + pbuf[7] * dgeom[p, 5, 0] + pbuf[8] * dgeom[p, 5, 1]
                                       + pbuf[9] * dgeom[p, 5, 2])
                    m = 1.0
                    if os_thick:
                        m *= capture
                    if os_polar:
                        m *= polar
                    if os_omega:
                        m *= omega
                    if fast:
                        I += square_tangent(qx, qy, qz, ori, norient, Na, Nb, Nc, fflat, ipar, default_F, dq, dfpar,
                                            dori_soa, has_dori, dI, sc, ibuf)
                        continue
                    for p in range(npar):
                        v = 0.0
                        if os_thick:
                            v += dcap[p] * (polar if os_polar else 1.0) * (omega if os_omega else 1.0)
                        if os_polar:
                            v += dpol[p] * (capture if os_thick else 1.0) * (omega if os_omega else 1.0)
                        if os_omega:
                            v += dom[p] * (capture if os_thick else 1.0) * (polar if os_polar else 1.0)
                        dm[p] = v
                    for o in range(norient):
                        h = orients[o, 0, 0] * qx + orients[o, 0, 1] * qy + orients[o, 0, 2] * qz
                        k = orients[o, 1, 0] * qx + orients[o, 1, 1] * qy + orients[o, 1, 2] * qz
                        l = orients[o, 2, 0] * qx + orients[o, 2, 1] * qy + orients[o, 2, 2] * qz
                        h0 = int(math.ceil(h - 0.5))
                        k0 = int(math.ceil(k - 0.5))
                        l0 = int(math.ceil(l - 0.5))
                        L = lattice_grad(h, k, l, h0, k0, l0, shape, Na, Nb, Nc, fudge, recip, lp)
                        if L == 0.0 and not water:
                            continue
                        F, Fh, Fk, Fl, nidx, Fdef = F_grad(h, k, l, h0, k0, l0, fgrid, ipar, default_F, fidx, fw)
                        T = F * F * L * L
                        aL = 2.0 * F * F * L
                        aF = 2.0 * F * L * L
                        for p in range(npar):
                            dh = (dori[p, o, 0, 0] * qx + dori[p, o, 0, 1] * qy + dori[p, o, 0, 2] * qz
                                  + orients[o, 0, 0] * dq[p, 0] + orients[o, 0, 1] * dq[p, 1] + orients[o, 0, 2] * dq[p, 2])
                            dk = (dori[p, o, 1, 0] * qx + dori[p, o, 1, 1] * qy + dori[p, o, 1, 2] * qz
                                  + orients[o, 1, 0] * dq[p, 0] + orients[o, 1, 1] * dq[p, 1] + orients[o, 1, 2] * dq[p, 2])
                            dl = (dori[p, o, 2, 0] * qx + dori[p, o, 2, 1] * qy + dori[p, o, 2, 2] * qz
                                  + orients[o, 2, 0] * dq[p, 0] + orients[o, 2, 1] * dq[p, 1] + orients[o, 2, 2] * dq[p, 2])
                            dL = (lp[0] * dh + lp[1] * dk + lp[2] * dl + lp[3] * dfpar[p, F_NA] + lp[4] * dfpar[p, F_NB]
                                  + lp[5] * dfpar[p, F_NC] + lp[6] * dfpar[p, F_FUDGE])
                            if shape != 0:
                                for j in range(9):
                                    dL += lp[7 + j] * drec[p, j // 3, j % 3]
                            dF = Fh * dh + Fk * dk + Fl * dl + Fdef * dfpar[p, F_DEFAULT_F]
                            dT = aL * dL + aF * dF
                            dI[p] = (dI[p] + dT) * m + (I + T) * dm[p]
                        I = (I + T) * m
    post = 1.0
    if not os_thick:
        post *= capture
    if not os_polar:
        post *= polar
    if not os_omega:
        post *= omega
    for p in range(npar):
        v = dI[p] * post
        if not os_thick:
            v += I * dcap[p] * (1.0 if os_polar else polar) * (1.0 if os_omega else omega)
        if not os_polar:
            v += I * dpol[p] * (1.0 if os_thick else capture) * (1.0 if os_omega else omega)
        if not os_omega:
            v += I * dom[p] * (1.0 if os_thick else capture) * (1.0 if os_polar else polar)
        dI[p] = v
    return I * post


@njit(parallel=True, cache=True, error_model="numpy")
def tangent(geom, fpar, ipar, sources, lambdas, orients, recip, fgrid, mask, scale, dscale,
            dgeom, dfpar, dsrc, dlam, dori, drec, dori_soa, has_dori, flags, J, image):
    """J[s, f, p] = d(scaled image)/d(theta_p); ``image`` receives the scaled image."""
    spixels, fpixels = image.shape
    xmin = max(ipar[I_ROI], 0)
    xmax = min(ipar[I_ROI + 1], fpixels - 1)
    ymin = max(ipar[I_ROI + 2], 0)
    ymax = min(ipar[I_ROI + 3], spixels - 1)
    use_mask = ipar[I_USE_MASK] != 0
    npar = dfpar.shape[0]
    ori = orientations_soa(orients)
    fflat = fgrid.ravel()
    npad = ori.shape[1]
    fast = fast_path(ipar)
    for spixel in prange(ymin, ymax + 1):
        sc = np.empty((14, npad))
        ibuf = np.empty(npad, dtype=np.int64)
        dP = np.zeros((npar, 3))
        dd = np.zeros((npar, 4))
        dq = np.zeros((npar, 3))
        dI = np.empty(npar)
        dom = np.empty(npar)
        dcap = np.empty(npar)
        dpol = np.empty(npar)
        dm = np.empty(npar)
        lp = np.empty(LP_SIZE)
        pbuf = np.empty(10)
        fidx = np.empty(64, dtype=np.int64)
        fw = np.empty(64)
        for fpixel in range(xmin, xmax + 1):
            if use_mask and mask[spixel, fpixel] == 0:
                continue
            v = pixel_tangent(fpixel, spixel, geom, fpar, ipar, sources, lambdas, orients, recip, fgrid,
                              dgeom, dfpar, dsrc, dlam, dori, drec, dP, dd, dq, dI, dom, dcap, dpol, dm,
                              lp, pbuf, fidx, fw, fast, ori, fflat, dori_soa, has_dori, flags, sc, ibuf)
            image[spixel, fpixel] = v * scale
            for p in range(npar):
                J[spixel, fpixel, p] = scale * dI[p] + dscale[p] * v


def run_tangent(model, tangents, threads=None, backend="cpu"):
    """Jacobian (spixels, fpixels, P) for a list of InputTangent; returns (J, image)."""
    from ..engine import check_backend, cuda_kernels, kernel_args, set_threads
    if check_backend(backend) == "cuda":
        return cuda_kernels().run_tangent(model, tangents)
    geom, fpar, ipar, src, lam, ori, rec, grid, mask = kernel_args(model)
    P = len(tangents)
    dgeom = np.ascontiguousarray(np.array([t.geom for t in tangents]).reshape(P, 6, 3))
    dfpar = np.ascontiguousarray(np.array([t.fpar for t in tangents]).reshape(P, NF))
    dsrc = np.ascontiguousarray(np.array([t.sources for t in tangents]).reshape((P,) + src.shape))
    dlam = np.ascontiguousarray(np.array([t.lambdas for t in tangents]).reshape(P, len(lam)))
    dori = np.ascontiguousarray(np.array([t.orients for t in tangents]).reshape((P,) + ori.shape))
    drec = np.ascontiguousarray(np.array([t.recip for t in tangents]).reshape(P, 3, 3))
    dscale = np.array([t.scale for t in tangents], dtype=np.float64)
    m = ori.shape[0]
    npad = (m + 7) // 8 * 8
    dori_soa = np.zeros((P, 9, npad))
    dori_soa[:, :, :m] = dori.reshape(P, m, 9).transpose(0, 2, 1)
    has_dori = np.array([bool(np.any(t.orients != 0)) for t in tangents])
    flags = tangent_flags(dgeom, dfpar, dsrc, dlam)
    J = np.zeros(model.shape + (P,))
    image = np.zeros(model.shape)
    prev = set_threads(threads)
    try:
        tangent(geom, fpar, ipar, src, lam, ori, rec, grid, mask, model.scale, dscale,
                dgeom, dfpar, dsrc, dlam, dori, drec, dori_soa, has_dori, flags, J, image)
    finally:
        if threads is not None:
            set_threads(prev)
    return J, image
