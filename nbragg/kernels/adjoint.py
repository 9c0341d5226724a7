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

from .cpu import (F_CLOSE_DISTANCE, F_DEFAULT_F, F_DMIN, F_FUDGE, F_I_BG, F_KAHN, F_MU, F_NA, F_NB,
                  F_NC, F_PIXEL, F_THICK, F_THICKSTEP, I_HAS_HKLS, I_NOPOLAR,
                  I_OS_OMEGA, I_OS_POLAR, I_OS_THICK, I_OVERSAMPLE, I_POINT_PIXEL, I_ROI, I_SHAPE,
                  I_THICKSTEPS, I_USE_MASK, I_WATER, fast_path, flat_grid_index, grid_extent, lattice_factor,
                  lookup_F, orientations_soa, soa_hkl, subpixel_position)
from .derivs import (G_FPAR, G_GEOM, G_SCALE, LP_SIZE, F_grad, capture_partials, direction_vjp,
                     lattice_grad, omega_partials, position_vjp)
from .physics import SQUARE, polarization_factor, polarization_grad, axis_lattice_grad, sum_row

NCHUNKS = 64   # row chunks; the number depends on the problem only, never on the thread count
CHUNK_GRID_BYTES = 4 * 2 ** 20   # memory for per-chunk structure-factor partials (at least)


def n_chunks(nrows, grid_size, image_bytes=0):
    """How many row chunks (each with its own partial gradients) the adjoint uses.

    Enough for load balance, but the per-chunk structure-factor partials together stay
    within max(4 MB, the image's size)."""
    budget = max(CHUNK_GRID_BYTES, image_bytes)
    by_memory = max(4, budget // max(8 * grid_size, 1))
    return int(max(1, min(NCHUNKS, nrows, by_memory)))

# rows of the per-chunk scratch used by square_adjoint
_S_L, _S_LH, _S_LK, _S_LL, _S_NA, _S_NB, _S_NC, _S_F, _S_BX, _S_BY, _S_BZ, _S_GA, _S_GB, _S_GC = range(14)
NSCRATCH = 14


@njit(cache=True, error_model="numpy")
def add_F(gF, gfix, j, value):
    """dL/dF_j += value.  (The GPU kernels swap in a deterministic atomic version.)"""
    gF[j] += value


@njit(cache=True, error_model="numpy")
def grid_indices(qx, qy, qz, ori, ipar, ibuf):
    """Flat structure-factor grid index of the nearest hkl for every orientation (-1
    outside the grid).  Kept out of the lattice loops so that those vectorise."""
    extent = grid_extent(ipar)
    for m in range(ori.shape[1]):
        h, k, l = soa_hkl(ori, m, qx, qy, qz)
        ibuf[m] = flat_grid_index(int(math.ceil(h - 0.5)), int(math.ceil(k - 0.5)), int(math.ceil(l - 0.5)), extent)


@njit(cache=True, error_model="numpy", inline="always")
def square_adjoint(qx, qy, qz, ori, nreal, Na, Nb, Nc, fflat, ipar, default_F, G, gor, sc, ibuf, gfix, gF):
    """Backward pass of :func:`~nbragg.kernels.cpu.square_terms` for one block with
    upstream G on every term; returns (dL/dq, sum of the block's terms).

    The work is split into short loops over the zero-padded orientation list, each with
    few memory streams, so that LLVM vectorises every one of them (a single loop with
    all the stores does not vectorise); padded entries get zero weight.
    """
    n = ori.shape[1]
    use_grid = ipar[I_HAS_HKLS] != 0
    if not use_grid and nreal < 8:
        # a few orientations: plain scalar accumulation, no padded vector passes
        gqx = 0.0
        gqy = 0.0
        gqz = 0.0
        S = 0.0
        gNa = 0.0
        gNb = 0.0
        gNc = 0.0
        gD = 0.0
        F = default_F
        for m in range(nreal):
            h, k, l = soa_hkl(ori, m, qx, qy, qz)
            ga, dga, nga = axis_lattice_grad(h - math.ceil(h - 0.5), Na)
            gb, dgb, ngb = axis_lattice_grad(k - math.ceil(k - 0.5), Nb)
            gc, dgc, ngc = axis_lattice_grad(l - math.ceil(l - 0.5), Nc)
            L = ga * gb * gc
            c = G * 2.0 * F * F * L
            gh = c * dga * gb * gc
            gk = c * ga * dgb * gc
            gl = c * ga * gb * dgc
            gor[0, m] += gh * qx
            gor[1, m] += gh * qy
            gor[2, m] += gh * qz
            gor[3, m] += gk * qx
            gor[4, m] += gk * qy
            gor[5, m] += gk * qz
            gor[6, m] += gl * qx
            gor[7, m] += gl * qy
            gor[8, m] += gl * qz
            gqx += gh * ori[0, m] + gk * ori[3, m] + gl * ori[6, m]
            gqy += gh * ori[1, m] + gk * ori[4, m] + gl * ori[7, m]
            gqz += gh * ori[2, m] + gk * ori[5, m] + gl * ori[8, m]
            gNa += c * nga * gb * gc
            gNb += c * ga * ngb * gc
            gNc += c * ga * gb * ngc
            S += F * F * L * L
            gD += G * 2.0 * F * L * L
        gfix[G_FPAR + F_NA] += gNa
        gfix[G_FPAR + F_NB] += gNb
        gfix[G_FPAR + F_NC] += gNc
        gfix[G_FPAR + F_DEFAULT_F] += gD
        return gqx, gqy, gqz, S
    if not use_grid:
        # F = default_F for every orientation: the partials come out already scaled
        for m in range(n):
            h, k, l = soa_hkl(ori, m, qx, qy, qz)
            ga, dga, nga = axis_lattice_grad(h - math.ceil(h - 0.5), Na)
            gb, dgb, ngb = axis_lattice_grad(k - math.ceil(k - 0.5), Nb)
            gc, dgc, ngc = axis_lattice_grad(l - math.ceil(l - 0.5), Nc)
            F = default_F if m < nreal else 0.0
            L = ga * gb * gc
            c = G * 2.0 * F * F * L
            sc[_S_LH, m] = c * dga * gb * gc
            sc[_S_LK, m] = c * ga * dgb * gc
            sc[_S_LL, m] = c * ga * gb * dgc
            sc[_S_GA, m] = c * nga * gb * gc
            sc[_S_GB, m] = c * ga * ngb * gc
            sc[_S_GC, m] = c * ga * gb * ngc
            sc[_S_NA, m] = F * F * L * L
            sc[_S_NB, m] = G * 2.0 * F * L * L
    else:
        _lattice_grid_pass(qx, qy, qz, ori, nreal, Na, Nb, Nc, fflat, ipar, default_F, G, sc, ibuf)
    for m in range(n):
        gh = sc[_S_LH, m]
        gk = sc[_S_LK, m]
        gl = sc[_S_LL, m]
        gor[0, m] += gh * qx
        gor[1, m] += gh * qy
        gor[2, m] += gh * qz
        gor[3, m] += gk * qx
        gor[4, m] += gk * qy
        gor[5, m] += gk * qz
        gor[6, m] += gl * qx
        gor[7, m] += gl * qy
        gor[8, m] += gl * qz
    for m in range(n):
        gh = sc[_S_LH, m]
        gk = sc[_S_LK, m]
        gl = sc[_S_LL, m]
        sc[_S_BX, m] = gh * ori[0, m] + gk * ori[3, m] + gl * ori[6, m]
        sc[_S_BY, m] = gh * ori[1, m] + gk * ori[4, m] + gl * ori[7, m]
        sc[_S_BZ, m] = gh * ori[2, m] + gk * ori[5, m] + gl * ori[8, m]
    gfix[G_FPAR + F_NA] += sum_row(sc, _S_GA, n)
    gfix[G_FPAR + F_NB] += sum_row(sc, _S_GB, n)
    gfix[G_FPAR + F_NC] += sum_row(sc, _S_GC, n)
    if use_grid:
        for m in range(nreal):
            j = ibuf[m]
            if j >= 0:
                gF[j] += sc[_S_NB, m]
            else:
                gfix[G_FPAR + F_DEFAULT_F] += sc[_S_NB, m]
    else:
        gfix[G_FPAR + F_DEFAULT_F] += sum_row(sc, _S_NB, n)
    return (sum_row(sc, _S_BX, n), sum_row(sc, _S_BY, n), sum_row(sc, _S_BZ, n),
            sum_row(sc, _S_NA, nreal))


@njit(cache=True, error_model="numpy")
def _lattice_grid_pass(qx, qy, qz, ori, nreal, Na, Nb, Nc, fflat, ipar, default_F, G, sc, ibuf):
    """The lattice pass of :func:`square_adjoint` when F comes from a grid (a gather)."""
    n = ori.shape[1]
    for m in range(n):
        h, k, l = soa_hkl(ori, m, qx, qy, qz)
        h0 = int(math.ceil(h - 0.5))
        k0 = int(math.ceil(k - 0.5))
        l0 = int(math.ceil(l - 0.5))
        ga, dga, nga = axis_lattice_grad(h - h0, Na)
        gb, dgb, ngb = axis_lattice_grad(k - k0, Nb)
        gc, dgc, ngc = axis_lattice_grad(l - l0, Nc)
        sc[_S_L, m] = ga * gb * gc
        sc[_S_LH, m] = dga * gb * gc
        sc[_S_LK, m] = ga * dgb * gc
        sc[_S_LL, m] = ga * gb * dgc
        sc[_S_NA, m] = nga * gb * gc
        sc[_S_NB, m] = ga * ngb * gc
        sc[_S_NC, m] = ga * gb * ngc
    # structure factors (a gather); zero on the padding
    grid_indices(qx, qy, qz, ori, ipar, ibuf)
    for m in range(nreal):
        j = ibuf[m]
        sc[_S_F, m] = fflat[j] if j >= 0 else default_F
    for m in range(nreal, n):
        sc[_S_F, m] = 0.0
    # scale the partials by dL/dF_latt; keep the term and dL/dF
    for m in range(n):
        F = sc[_S_F, m]
        L = sc[_S_L, m]
        c = G * 2.0 * F * F * L
        sc[_S_LH, m] *= c
        sc[_S_LK, m] *= c
        sc[_S_LL, m] *= c
        sc[_S_GA, m] = c * sc[_S_NA, m]
        sc[_S_GB, m] = c * sc[_S_NB, m]
        sc[_S_GC, m] = c * sc[_S_NC, m]
        sc[_S_NA, m] = F * F * L * L            # the term
        sc[_S_NB, m] = G * 2.0 * F * L * L      # dL/dF


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
def _factors_vjp(g_om, g_cap, g_pol, fpixel, spixel, subF, subS, t, s, geom, fpar, ipar, sources, gfix, gsrc,
                 pbuf):
    """Gradients of the pixel factors computed at one sub-pixel (omega, capture fraction,
    and the polarization with source s), pushed back to their inputs together."""
    if g_om == 0.0 and g_cap == 0.0 and g_pol == 0.0:
        return
    px, py, pz, R, dx, dy, dz = _geometry(fpixel, spixel, subF, subS, t, geom, fpar, ipar)
    gdx = 0.0
    gdy = 0.0
    gdz = 0.0
    gR = 0.0
    if g_om != 0.0:
        om = _omega(R, fpar, ipar)
        dR, dpix, dclose = omega_partials(R, fpar, ipar, om)
        gR = g_om * dR
        gfix[G_FPAR + F_PIXEL] += g_om * dpix
        gfix[G_FPAR + F_CLOSE_DISTANCE] += g_om * dclose
    if g_cap != 0.0:
        cap, cdx, cdy, cdz, cox, coy, coz, cts, cmu = capture_partials(t, dx, dy, dz, geom, fpar)
        gdx += g_cap * cdx
        gdy += g_cap * cdy
        gdz += g_cap * cdz
        gfix[G_GEOM + 9] += g_cap * cox
        gfix[G_GEOM + 10] += g_cap * coy
        gfix[G_GEOM + 11] += g_cap * coz
        gfix[G_FPAR + F_THICKSTEP] += g_cap * cts
        gfix[G_FPAR + F_MU] += g_cap * cmu
    if g_pol != 0.0:
        ix = -sources[s, 0]
        iy = -sources[s, 1]
        iz = -sources[s, 2]
        polarization_grad(fpar[F_KAHN], ix, iy, iz, dx, dy, dz, geom[5, 0], geom[5, 1], geom[5, 2], pbuf)
        gfix[G_FPAR + F_KAHN] += g_pol * pbuf[0]
        gsrc[s, 0] -= g_pol * pbuf[1]
        gsrc[s, 1] -= g_pol * pbuf[2]
        gsrc[s, 2] -= g_pol * pbuf[3]
        gdx += g_pol * pbuf[4]
        gdy += g_pol * pbuf[5]
        gdz += g_pol * pbuf[6]
        gfix[G_GEOM + 15] += g_pol * pbuf[7]
        gfix[G_GEOM + 16] += g_pol * pbuf[8]
        gfix[G_GEOM + 17] += g_pol * pbuf[9]
    gpx, gpy, gpz = direction_vjp(gdx, gdy, gdz, gR, px, py, pz, R, dx, dy, dz)
    position_vjp(gpx, gpy, gpz, fpixel, spixel, subF, subS, t, geom, fpar, ipar, gfix)


@njit(cache=True, error_model="numpy")
def pixel_adjoint(fpixel, spixel, gv, geom, fpar, ipar, sources, lambdas, orients, recip, fgrid,
                  blk_I, blk_m, blk_K, blk_id, lp, pbuf, fidx, fw, gfix, gsrc, glam, gor, grec, gF):
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
                        h0 = int(math.ceil(h - 0.5))
                        k0 = int(math.ceil(k - 0.5))
                        l0 = int(math.ceil(l - 0.5))
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

    # ---------------------------------------------------------------- backward
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
            h0 = int(math.ceil(h - 0.5))
            k0 = int(math.ceil(k - 0.5))
            l0 = int(math.ceil(l - 0.5))
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
                add_F(gF, gfix, fidx[j], gFc * fw[j])
            gfix[G_FPAR + F_DEFAULT_F] += gFc * Fdef
            gor[0, o] += gh * qx
            gor[1, o] += gh * qy
            gor[2, o] += gh * qz
            gor[3, o] += gk * qx
            gor[4, o] += gk * qy
            gor[5, o] += gk * qz
            gor[6, o] += gl * qx
            gor[7, o] += gl * qy
            gor[8, o] += gl * qz
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
                _factors_vjp(gm * cap_b * pol_b if os_omega else 0.0, gm * pol_b * om_b if os_thick else 0.0,
                             gm * cap_b * om_b if os_polar else 0.0, fpixel, spixel, subF, subS, t, s, geom, fpar,
                             ipar, sources, gfix, gsrc, pbuf)
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
    gfix[G_SCALE] += gv * value
    # gradients of the factors applied once at the end, each at the sub-pixel (and source)
    # where it was taken; when they coincide (the usual case) one geometry pass serves all
    g_cap = 0.0
    g_pol = 0.0
    g_om = 0.0
    if not os_thick and capture_at >= 0 and fpar[F_THICK] != 0.0:
        g_cap = gv * I * (1.0 if os_polar else polar) * (1.0 if os_omega else omega)
    if not os_polar and polar_at >= 0:
        g_pol = gv * I * (1.0 if os_thick else capture) * (1.0 if os_omega else omega)
    if not os_omega and omega_at >= 0:
        g_om = gv * I * (1.0 if os_thick else capture) * (1.0 if os_polar else polar)
    pol_sub = polar_at // nsrc if polar_at >= 0 else -1
    pol_src = polar_at % nsrc if polar_at >= 0 else 0
    if g_om != 0.0 and omega_at == pol_sub and omega_at == capture_at:
        su = omega_at
        _factors_vjp(g_om, g_cap, g_pol, fpixel, spixel, su % os, (su // os) % os, su // nsub, pol_src, geom, fpar,
                     ipar, sources, gfix, gsrc, pbuf)
    else:
        if g_om != 0.0:
            su = omega_at
            _factors_vjp(g_om, 0.0, 0.0, fpixel, spixel, su % os, (su // os) % os, su // nsub, 0, geom, fpar, ipar,
                         sources, gfix, gsrc, pbuf)
        if g_cap != 0.0:
            su = capture_at
            _factors_vjp(0.0, g_cap, 0.0, fpixel, spixel, su % os, (su // os) % os, su // nsub, 0, geom, fpar, ipar,
                         sources, gfix, gsrc, pbuf)
        if g_pol != 0.0:
            su = pol_sub
            _factors_vjp(0.0, 0.0, g_pol, fpixel, spixel, su % os, (su // os) % os, su // nsub, pol_src, geom, fpar,
                         ipar, sources, gfix, gsrc, pbuf)
    return value


@njit(cache=True, error_model="numpy")
def pixel_adjoint_fast(fpixel, spixel, gv, geom, fpar, ipar, sources, lambdas, ori, norient, fflat, sc, ibuf,
                       pbuf, gfix, gsrc, glam, gor, gF):
    """Adjoint of one pixel without -oversample_* flags, for parallelepiped spots and
    nearest-neighbour F.  Every term is only added, so each block is visited once, in
    forward order, with the same upstream.  The three pixel factors (and their partials)
    are evaluated first; their gradients, which need the pixel's sum, are applied at the
    end -- at the first sub-pixel together with that sub-pixel's own gradient.

    Returns the pixel value (unscaled), or -1.0 when a factor is exactly zero where
    nanoBragg would recompute it later (the caller then uses the general path).
    """
    os = ipar[I_OVERSAMPLE]
    thicksteps = ipar[I_THICKSTEPS]
    nsrc = sources.shape[0]
    dmin = fpar[F_DMIN]
    Na = fpar[F_NA]
    Nb = fpar[F_NB]
    Nc = fpar[F_NC]
    default_F = fpar[F_DEFAULT_F]
    # ---- omega at the first sub-pixel
    p0x, p0y, p0z, R0, d0x, d0y, d0z = _geometry(fpixel, spixel, 0, 0, 0, geom, fpar, ipar)
    omega = _omega(R0, fpar, ipar)
    if omega == 0.0:
        return -1.0
    om_R, om_pix, om_close = omega_partials(R0, fpar, ipar, omega)
    # ---- capture fraction at the first sub-pixel of the last layer
    capture = 1.0
    if fpar[F_THICK] != 0.0:
        tl = thicksteps - 1
        cx, cy, cz, cR, cdx, cdy, cdz = _geometry(fpixel, spixel, 0, 0, tl, geom, fpar, ipar)
        capture = capture_partials(tl, cdx, cdy, cdz, geom, fpar)[0]
        if capture == 0.0:
            return -1.0
    # ---- polarization at the first (sub-pixel, source) -dmin does not cut; its
    # partials are kept in pbuf
    polar = 1.0 if ipar[I_NOPOLAR] != 0 else 0.0
    pol_sub = -1
    pol_src = 0
    if ipar[I_NOPOLAR] == 0:
        for su in range(thicksteps * os * os):
            if su == 0:
                gdx, gdy, gdz = d0x, d0y, d0z
            else:
                gx, gy, gz, gR, gdx, gdy, gdz = _geometry(fpixel, spixel, su % os, (su // os) % os, su // (os * os),
                                                          geom, fpar, ipar)
            for s in range(nsrc):
                lam = lambdas[s]
                qx = (gdx + sources[s, 0]) / lam
                qy = (gdy + sources[s, 1]) / lam
                qz = (gdz + sources[s, 2]) / lam
                if dmin > 0.0:
                    stol = 0.5 * math.sqrt(qx * qx + qy * qy + qz * qz)
                    if stol > 0.0 and dmin > 0.5 / stol:
                        continue
                polar = polarization_grad(fpar[F_KAHN], -sources[s, 0], -sources[s, 1], -sources[s, 2],
                                          gdx, gdy, gdz, geom[5, 0], geom[5, 1], geom[5, 2], pbuf)
                pol_sub = su
                pol_src = s
                break
            if pol_sub >= 0:
                break
        if pol_sub >= 0 and polar == 0.0:
            return -1.0
    post = omega * capture * polar
    G = gv * post
    # ---- every block once: terms, and their gradients pushed to q and the geometry
    I = fpar[F_I_BG]
    g0x = 0.0
    g0y = 0.0
    g0z = 0.0
    for t in range(thicksteps):
        for subS in range(os):
            for subF in range(os):
                first = t == 0 and subS == 0 and subF == 0
                if first:
                    px, py, pz, R, dx, dy, dz = p0x, p0y, p0z, R0, d0x, d0y, d0z
                else:
                    px, py, pz, R, dx, dy, dz = _geometry(fpixel, spixel, subF, subS, t, geom, fpar, ipar)
                gdx = 0.0
                gdy = 0.0
                gdz = 0.0
                for s in range(nsrc):
                    lam = lambdas[s]
                    qx = (dx + sources[s, 0]) / lam
                    qy = (dy + sources[s, 1]) / lam
                    qz = (dz + sources[s, 2]) / lam
                    if dmin > 0.0:
                        stol = 0.5 * math.sqrt(qx * qx + qy * qy + qz * qz)
                        if stol > 0.0 and dmin > 0.5 / stol:
                            continue
                    gqx, gqy, gqz, S = square_adjoint(qx, qy, qz, ori, norient, Na, Nb, Nc, fflat, ipar, default_F,
                                                      G, gor, sc, ibuf, gfix, gF)
                    I += S
                    gdx += gqx / lam
                    gdy += gqy / lam
                    gdz += gqz / lam
                    gsrc[s, 0] += gqx / lam
                    gsrc[s, 1] += gqy / lam
                    gsrc[s, 2] += gqz / lam
                    glam[s] -= (gqx * qx + gqy * qy + gqz * qz) / lam
                if first:
                    g0x = gdx
                    g0y = gdy
                    g0z = gdz
                elif gdx != 0.0 or gdy != 0.0 or gdz != 0.0:
                    gpx, gpy, gpz = direction_vjp(gdx, gdy, gdz, 0.0, px, py, pz, R, dx, dy, dz)
                    position_vjp(gpx, gpy, gpz, fpixel, spixel, subF, subS, t, geom, fpar, ipar, gfix)
    gfix[G_FPAR + F_I_BG] += G
    value = I * post
    gfix[G_SCALE] += gv * value
    # ---- the factors' gradients, now that the sum is known
    g_om = gv * I * capture * polar
    gfix[G_FPAR + F_PIXEL] += g_om * om_pix
    gfix[G_FPAR + F_CLOSE_DISTANCE] += g_om * om_close
    gR0 = g_om * om_R
    if pol_sub >= 0:
        g_pol = gv * I * omega * capture
        gfix[G_FPAR + F_KAHN] += g_pol * pbuf[0]
        gsrc[pol_src, 0] -= g_pol * pbuf[1]
        gsrc[pol_src, 1] -= g_pol * pbuf[2]
        gsrc[pol_src, 2] -= g_pol * pbuf[3]
        gfix[G_GEOM + 15] += g_pol * pbuf[7]
        gfix[G_GEOM + 16] += g_pol * pbuf[8]
        gfix[G_GEOM + 17] += g_pol * pbuf[9]
        gpx = g_pol * pbuf[4]
        gpy = g_pol * pbuf[5]
        gpz = g_pol * pbuf[6]
        if pol_sub == 0:
            g0x += gpx
            g0y += gpy
            g0z += gpz
        else:
            su = pol_sub
            sx, sy, sz, sR, sdx, sdy, sdz = _geometry(fpixel, spixel, su % os, (su // os) % os, su // (os * os),
                                                      geom, fpar, ipar)
            hx, hy, hz = direction_vjp(gpx, gpy, gpz, 0.0, sx, sy, sz, sR, sdx, sdy, sdz)
            position_vjp(hx, hy, hz, fpixel, spixel, su % os, (su // os) % os, su // (os * os), geom, fpar, ipar, gfix)
    gpx, gpy, gpz = direction_vjp(g0x, g0y, g0z, gR0, p0x, p0y, p0z, R0, d0x, d0y, d0z)
    position_vjp(gpx, gpy, gpz, fpixel, spixel, 0, 0, 0, geom, fpar, ipar, gfix)
    if fpar[F_THICK] != 0.0:
        g_cap = gv * I * omega * polar
        _factors_vjp(0.0, g_cap, 0.0, fpixel, spixel, 0, 0, thicksteps - 1, 0, geom, fpar, ipar, sources, gfix,
                     gsrc, pbuf)
    return value


@njit(parallel=True, cache=True, error_model="numpy")
def adjoint(geom, fpar, ipar, sources, lambdas, orients, recip, fgrid, mask, upstream, scale, nchunks,
            gfix_c, gsrc_c, glam_c, gor_c, grec_c, gF_c, image):
    """Partial gradients per chunk of rows (summed by the caller in chunk order).

    ``upstream`` (spixels, fpixels) is dL/dI for the scaled image; ``image``, when it
    has the image's shape, receives the (scaled) image of the pixels with non-zero
    upstream, which the adjoint computes anyway (pass a 1x1 array to skip it).
    """
    spixels, fpixels = upstream.shape
    xmin = max(ipar[I_ROI], 0)
    xmax = min(ipar[I_ROI + 1], fpixels - 1)
    ymin = max(ipar[I_ROI + 2], 0)
    ymax = min(ipar[I_ROI + 3], spixels - 1)
    use_mask = ipar[I_USE_MASK] != 0
    nrows = ymax - ymin + 1
    nsrc = sources.shape[0]
    os = ipar[I_OVERSAMPLE]
    nblocks = ipar[I_THICKSTEPS] * os * os * nsrc
    ori = orientations_soa(orients)
    fflat = fgrid.ravel()
    norient = orients.shape[0]
    npad = ori.shape[1]
    fast = fast_path(ipar)
    want_image = image.shape[0] == spixels and image.shape[1] == fpixels   # (0, 0): no image
    for c in prange(nchunks):
        sc = np.empty((NSCRATCH, npad))
        ibuf = np.empty(npad, dtype=np.int64)
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
                if gv == 0.0:
                    continue
                v = -1.0
                if fast:
                    v = pixel_adjoint_fast(fpixel, spixel, gv, geom, fpar, ipar, sources, lambdas, ori, norient,
                                           fflat, sc, ibuf, pbuf, gfix, gsrc, glam, gor, gF)
                if v < 0.0:
                    v = pixel_adjoint(fpixel, spixel, gv, geom, fpar, ipar, sources, lambdas, orients, recip, fgrid,
                                      blk_I, blk_m, blk_K, blk_id, lp, pbuf, fidx, fw, gfix, gsrc, glam, gor,
                                      grec, gF)
                if want_image:
                    image[spixel, fpixel] = v * scale
