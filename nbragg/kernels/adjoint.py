"""Adjoint (reverse-mode) CPU kernel: the gradient of sum_i g_i I_i with respect to
every kernel input, in one pass over the detector.

For each pixel the forward loops are replayed once, recording per (sensor layer,
sub-pixel, source) "block" the running sum at the block's start, the multiplier that
nanoBragg's ``-oversample_*`` flags apply after every term, and how many terms were
added; then the blocks are walked backwards, recomputing each term and pushing its
gradient into the orientations, the scattering vector, the structure factors, N,
the solid angle, polarization and absorption, and finally the detector geometry.
Nothing per term is stored, so memory is O(pixels + inputs).

Determinism: rows are split into a fixed number of chunks (independent of the thread
count); each chunk accumulates its own partial gradients, and the partials are summed
in chunk order.
"""

import math

import numpy as np
from numba import njit, prange

from .cpu import (F_CLOSE_DISTANCE, F_DEFAULT_F, F_DMIN, F_FUDGE, F_I_BG, F_KAHN, F_MU, F_NA,
                  F_NB, F_NC, F_PIXEL, F_THICK, F_THICKSTEP, I_INTERPOLATE, I_NOPOLAR, I_OS_OMEGA,
                  I_OS_POLAR, I_OS_THICK, I_OVERSAMPLE, I_POINT_PIXEL, I_ROI, I_SHAPE,
                  I_THICKSTEPS, I_USE_MASK, I_WATER, NF, lattice_factor, lookup_F,
                  subpixel_position)
from .derivs import (G_FPAR, G_GEOM, G_SCALE, LP_SIZE, NFIX, F_grad, capture_partials,
                     direction_vjp, lattice_grad, omega_partials, position_vjp)
from .physics import SQUARE, polarization_factor, polarization_grad

NCHUNKS = 64


@njit(cache=True, error_model="numpy")
def _geometry(fpixel, spixel, subF, subS, t, geom, fpar, ipar):
    px, py, pz = subpixel_position(fpixel, spixel, subF, subS, t, geom, fpar, ipar)
    R = math.sqrt(px * px + py * py + pz * pz)
    if R != 0.0:
        return px, py, pz, R, px / R, py / R, pz / R
    return px, py, pz, R, 0.0, 0.0, 0.0


@njit(cache=True, error_model="numpy")
def _omega(R, fpar, ipar):
    if ipar[I_POINT_PIXEL] != 0:
        return 1.0 / R / R
    return fpar[F_PIXEL] * fpar[F_PIXEL] / R / R * fpar[F_CLOSE_DISTANCE] / R


@njit(cache=True, error_model="numpy")
def _capture(t, dx, dy, dz, geom, fpar):
    parallax = dx * geom[3, 0] + dy * geom[3, 1] + dz * geom[3, 2]
    ts = fpar[F_THICKSTEP]
    mu = fpar[F_MU]
    return math.exp(-t * ts * mu / parallax) - math.exp(-(t + 1) * ts * mu / parallax)


@njit(cache=True, error_model="numpy")
def _factor_vjp(kind, g, fpixel, spixel, subF, subS, t, s, geom, fpar, ipar, sources, gfix, gsrc, pbuf):
    """Gradient of one of the pixel factors (0 omega, 1 capture, 2 polarization) at the
    sub-pixel / source where it was computed, pushed back to its inputs."""
    if g == 0.0:
        return
    px, py, pz, R, dx, dy, dz = _geometry(fpixel, spixel, subF, subS, t, geom, fpar, ipar)
    gdx = 0.0
    gdy = 0.0
    gdz = 0.0
    gR = 0.0
    if kind == 0:
        om = _omega(R, fpar, ipar)
        dR, dpix, dclose = omega_partials(R, fpar, ipar, om)
        gR = g * dR
        gfix[G_FPAR + F_PIXEL] += g * dpix
        gfix[G_FPAR + F_CLOSE_DISTANCE] += g * dclose
    elif kind == 1:
        cap, cdx, cdy, cdz, cox, coy, coz, cts, cmu = capture_partials(t, dx, dy, dz, geom, fpar)
        gdx = g * cdx
        gdy = g * cdy
        gdz = g * cdz
        gfix[G_GEOM + 9] += g * cox
        gfix[G_GEOM + 10] += g * coy
        gfix[G_GEOM + 11] += g * coz
        gfix[G_FPAR + F_THICKSTEP] += g * cts
        gfix[G_FPAR + F_MU] += g * cmu
    else:
        ix = -sources[s, 0]
        iy = -sources[s, 1]
        iz = -sources[s, 2]
        polarization_grad(fpar[F_KAHN], ix, iy, iz, dx, dy, dz, geom[5, 0], geom[5, 1], geom[5, 2], pbuf)
        gfix[G_FPAR + F_KAHN] += g * pbuf[0]
        gsrc[s, 0] -= g * pbuf[1]
        gsrc[s, 1] -= g * pbuf[2]
        gsrc[s, 2] -= g * pbuf[3]
        gdx = g * pbuf[4]
        gdy = g * pbuf[5]
        gdz = g * pbuf[6]
        gfix[G_GEOM + 15] += g * pbuf[7]
        gfix[G_GEOM + 16] += g * pbuf[8]
        gfix[G_GEOM + 17] += g * pbuf[9]
    gpx, gpy, gpz = direction_vjp(gdx, gdy, gdz, gR, px, py, pz, R, dx, dy, dz)
    position_vjp(gpx, gpy, gpz, fpixel, spixel, subF, subS, t, geom, fpar, ipar, gfix)


@njit(cache=True, error_model="numpy")
def pixel_adjoint(fpixel, spixel, gv, geom, fpar, ipar, sources, lambdas, orients, recip, fgrid,
                  blk_I, blk_m, blk_K, blk_id, lp, pbuf, fidx, fw,
                  gfix, gsrc, glam, gor, grec, gF):
    """Accumulate gv * d(pixel value before scaling)/d(inputs); returns the value."""
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
    nsub = os * os

    # ---------------------------------------------------------------- replay forward
    I = fpar[F_I_BG]
    polar = 1.0 if ipar[I_NOPOLAR] != 0 else 0.0
    omega = 0.0
    capture = 0.0
    polar_at = -1
    omega_at = -1
    capture_at = -1
    nb = 0
    for t in range(thicksteps):
        capture = 1.0 if fpar[F_THICK] == 0.0 else 0.0
        for subS in range(os):
            for subF in range(os):
                sub_id = (t * os + subS) * os + subF
                px, py, pz, R, dx, dy, dz = _geometry(fpixel, spixel, subF, subS, t, geom, fpar, ipar)
                if omega == 0.0 or os_omega:
                    omega = _omega(R, fpar, ipar)
                    omega_at = sub_id
                if capture == 0.0 or os_thick:
                    capture = _capture(t, dx, dy, dz, geom, fpar)
                    capture_at = sub_id
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
                        polar = polarization_factor(kahn, ix, iy, iz, dx, dy, dz, geom[5, 0], geom[5, 1], geom[5, 2])
                        polar_at = sub_id * nsrc + s
                    m = 1.0
                    if os_thick:
                        m *= capture
                    if os_polar:
                        m *= polar
                    if os_omega:
                        m *= omega
                    blk_I[nb] = I
                    blk_m[nb] = m
                    blk_id[nb] = sub_id * nsrc + s
                    K = 0
                    for o in range(norient):
                        h = orients[o, 0, 0] * qx + orients[o, 0, 1] * qy + orients[o, 0, 2] * qz
                        k = orients[o, 1, 0] * qx + orients[o, 1, 1] * qy + orients[o, 1, 2] * qz
                        l = orients[o, 2, 0] * qx + orients[o, 2, 1] * qy + orients[o, 2, 2] * qz
                        h0 = math.ceil(h - 0.5)
                        k0 = math.ceil(k - 0.5)
                        l0 = math.ceil(l - 0.5)
                        F_latt = lattice_factor(h, k, l, h0, k0, l0, shape, Na, Nb, Nc, fudge, recip)
                        if F_latt == 0.0 and not water:
                            continue
                        F_cell = lookup_F(h, k, l, h0, k0, l0, fgrid, ipar, default_F)
                        I = (I + F_cell * F_cell * F_latt * F_latt) * m
                        K += 1
                    blk_K[nb] = K
                    nb += 1
    post = 1.0
    if not os_thick:
        post *= capture
    if not os_polar:
        post *= polar
    if not os_omega:
        post *= omega
    value = I * post
    gfix[G_SCALE] += gv * value

    # ---------------------------------------------------------------- backward
    # gradients of the factors applied once at the end
    if not os_thick and capture_at >= 0 and fpar[F_THICK] != 0.0:
        g = gv * I * (1.0 if os_polar else polar) * (1.0 if os_omega else omega)
        su = capture_at
        t_ = su // nsub
        _factor_vjp(1, g, fpixel, spixel, su % os, (su // os) % os, t_, 0, geom, fpar, ipar, sources, gfix, gsrc, pbuf)
    if not os_polar and polar_at >= 0:
        g = gv * I * (1.0 if os_thick else capture) * (1.0 if os_omega else omega)
        su = polar_at // nsrc
        _factor_vjp(2, g, fpixel, spixel, su % os, (su // os) % os, su // nsub, polar_at % nsrc,
                    geom, fpar, ipar, sources, gfix, gsrc, pbuf)
    if not os_omega and omega_at >= 0:
        g = gv * I * (1.0 if os_thick else capture) * (1.0 if os_polar else polar)
        su = omega_at
        _factor_vjp(0, g, fpixel, spixel, su % os, (su // os) % os, su // nsub, 0, geom, fpar, ipar,
                    sources, gfix, gsrc, pbuf)

    G = gv * post
    for b in range(nb - 1, -1, -1):
        m = blk_m[b]
        K = blk_K[b]
        s = blk_id[b] % nsrc
        su = blk_id[b] // nsrc
        subF = su % os
        subS = (su // os) % os
        t = su // nsub
        px, py, pz, R, dx, dy, dz = _geometry(fpixel, spixel, subF, subS, t, geom, fpar, ipar)
        ix = -sources[s, 0]
        iy = -sources[s, 1]
        iz = -sources[s, 2]
        lam = lambdas[s]
        qx = (dx - ix) / lam
        qy = (dy - iy) / lam
        qz = (dz - iz) / lam
        gqx = 0.0
        gqy = 0.0
        gqz = 0.0
        mpow = m          # m^(e+1) for the term e places from the end of the block
        S_dm = 0.0        # sum over terms of (e+1) T m^e
        mpow_e = 1.0      # m^e
        e = 0
        for o in range(norient - 1, -1, -1):
            h = orients[o, 0, 0] * qx + orients[o, 0, 1] * qy + orients[o, 0, 2] * qz
            k = orients[o, 1, 0] * qx + orients[o, 1, 1] * qy + orients[o, 1, 2] * qz
            l = orients[o, 2, 0] * qx + orients[o, 2, 1] * qy + orients[o, 2, 2] * qz
            h0 = math.ceil(h - 0.5)
            k0 = math.ceil(k - 0.5)
            l0 = math.ceil(l - 0.5)
            L = lattice_grad(h, k, l, h0, k0, l0, shape, Na, Nb, Nc, fudge, recip, lp)
            if L == 0.0 and not water:
                continue
            F, Fh, Fk, Fl, nidx, Fdef = F_grad(h, k, l, h0, k0, l0, fgrid, ipar, default_F, fidx, fw)
            T = F * F * L * L
            gT = G * mpow
            S_dm += (e + 1) * T * mpow_e
            mpow *= m
            mpow_e *= m
            e += 1
            gL = gT * 2.0 * F * F * L
            gFc = gT * 2.0 * F * L * L
            gh = gL * lp[0] + gFc * Fh
            gk = gL * lp[1] + gFc * Fk
            gl = gL * lp[2] + gFc * Fl
            gfix[G_FPAR + F_NA] += gL * lp[3]
            gfix[G_FPAR + F_NB] += gL * lp[4]
            gfix[G_FPAR + F_NC] += gL * lp[5]
            gfix[G_FPAR + F_FUDGE] += gL * lp[6]
            if shape != SQUARE:
                for j in range(9):
                    grec[j] += gL * lp[7 + j]
            for j in range(nidx):
                gF[fidx[j]] += gFc * fw[j]
            gfix[G_FPAR + F_DEFAULT_F] += gFc * Fdef
            gor[o, 0] += gh * qx
            gor[o, 1] += gh * qy
            gor[o, 2] += gh * qz
            gor[o, 3] += gk * qx
            gor[o, 4] += gk * qy
            gor[o, 5] += gk * qz
            gor[o, 6] += gl * qx
            gor[o, 7] += gl * qy
            gor[o, 8] += gl * qz
            gqx += gh * orients[o, 0, 0] + gk * orients[o, 1, 0] + gl * orients[o, 2, 0]
            gqy += gh * orients[o, 0, 1] + gk * orients[o, 1, 1] + gl * orients[o, 2, 1]
            gqz += gh * orients[o, 0, 2] + gk * orients[o, 1, 2] + gl * orients[o, 2, 2]
        # the block's multiplier (only with -oversample_* flags)
        if m != 1.0 or os_thick or os_polar or os_omega:
            if K > 0:
                gm = G * (K * blk_I[b] * m ** (K - 1) + S_dm)
                # the factors of this block, recomputed where they were taken
                cap_b = _capture(t, dx, dy, dz, geom, fpar) if os_thick else 1.0
                pol_b = 1.0
                if os_polar:
                    pol_b = polarization_factor(kahn, ix, iy, iz, dx, dy, dz, geom[5, 0], geom[5, 1], geom[5, 2])
                om_b = _omega(R, fpar, ipar) if os_omega else 1.0
                if os_thick:
                    _factor_vjp(1, gm * pol_b * om_b, fpixel, spixel, subF, subS, t, s, geom, fpar, ipar,
                                sources, gfix, gsrc, pbuf)
                if os_polar:
                    _factor_vjp(2, gm * cap_b * om_b, fpixel, spixel, subF, subS, t, s, geom, fpar, ipar,
                                sources, gfix, gsrc, pbuf)
                if os_omega:
                    _factor_vjp(0, gm * cap_b * pol_b, fpixel, spixel, subF, subS, t, s, geom, fpar, ipar,
                                sources, gfix, gsrc, pbuf)
                G = G * m ** K
        # q = (d + src) / lambda
        if gqx != 0.0 or gqy != 0.0 or gqz != 0.0:
            gdx = gqx / lam
            gdy = gqy / lam
            gdz = gqz / lam
            gsrc[s, 0] += gqx / lam
            gsrc[s, 1] += gqy / lam
            gsrc[s, 2] += gqz / lam
            glam[s] -= (gqx * qx + gqy * qy + gqz * qz) / lam
            gpx, gpy, gpz = direction_vjp(gdx, gdy, gdz, 0.0, px, py, pz, R, dx, dy, dz)
            position_vjp(gpx, gpy, gpz, fpixel, spixel, subF, subS, t, geom, fpar, ipar, gfix)
    gfix[G_FPAR + F_I_BG] += G
    return value


@njit(parallel=True, cache=True, error_model="numpy")
def adjoint(geom, fpar, ipar, sources, lambdas, orients, recip, fgrid, mask, upstream, scale, nchunks,
            gfix_c, gsrc_c, glam_c, gor_c, grec_c, gF_c, image):
    """Partial gradients per chunk of rows (summed by the caller in chunk order).

    ``upstream`` (spixels, fpixels) is dL/dI for the scaled image; ``image`` receives
    the forward image (scaled), which the replay computes anyway.
    """
    spixels, fpixels = image.shape
    xmin = max(ipar[I_ROI], 0)
    xmax = min(ipar[I_ROI + 1], fpixels - 1)
    ymin = max(ipar[I_ROI + 2], 0)
    ymax = min(ipar[I_ROI + 3], spixels - 1)
    use_mask = ipar[I_USE_MASK] != 0
    nrows = ymax - ymin + 1
    nsrc = sources.shape[0]
    os = ipar[I_OVERSAMPLE]
    nblocks = ipar[I_THICKSTEPS] * os * os * nsrc
    for c in prange(nchunks):
        blk_I = np.empty(nblocks)
        blk_m = np.empty(nblocks)
        blk_K = np.empty(nblocks, dtype=np.int64)
        blk_id = np.empty(nblocks, dtype=np.int64)
        lp = np.empty(LP_SIZE)
        pbuf = np.empty(10)
        fidx = np.empty(64, dtype=np.int64)
        fw = np.empty(64)
        gfix = gfix_c[c]
        gsrc = gsrc_c[c]
        glam = glam_c[c]
        gor = gor_c[c]
        grec = grec_c[c]
        gF = gF_c[c]
        r0 = ymin + (c * nrows) // nchunks
        r1 = ymin + ((c + 1) * nrows) // nchunks
        for spixel in range(r0, r1):
            for fpixel in range(xmin, xmax + 1):
                if use_mask and mask[spixel, fpixel] == 0:
                    continue
                gv = upstream[spixel, fpixel] * scale
                v = pixel_adjoint(fpixel, spixel, gv, geom, fpar, ipar, sources, lambdas, orients, recip, fgrid,
                                  blk_I, blk_m, blk_K, blk_id, lp, pbuf, fidx, fw,
                                  gfix, gsrc, glam, gor, grec, gF)
                image[spixel, fpixel] = v * scale
