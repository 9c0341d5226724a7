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
from typing import NamedTuple

import numpy as np
from .. import _jitcache  # noqa: F401  (nbragg's cache keys, before any cached function)
from numba import njit, prange

from .cpu import block_total, clipped_roi, derivative_row_path, fast_path, lane_directions, term
from .physics import (amorphous_F_grad, amorphous_stol, beyond_dmin, capture_fraction, direction, miller,
                      orientations_soa, pixel_solid_angle, polarization_frame, polarization_frame_vjp,
                      polarization_parts, scattering, signed_square, soa_hkl, solid_angle)
from .derivs import (AM_A, AM_C2, AM_CAPTURE, AM_CDX, AM_CDY, AM_CDZ, AM_CMU, AM_COX, AM_COY, AM_COZ, AM_CTS, AM_DA,
                     AM_KAHN, AM_OCLOSE, AM_OMEGA, AM_OPIX, AM_OR, AM_POLAR, AM_ROWS, AM_STOL, AM_X, AM_Y, LP_NAB,
                     LP_NAC, LP_NBC, LP_SIZE, SQ_F, SQ_L, SQ_LH, SQ_LK, SQ_LL, SQ_LNA, SQ_LNB, SQ_LNC, SQ_ROWS, SQ_T,
                     F_grad, amorphous_lane_partials, aniso_monomials, bragg_weight_vjp, capture_partials,
                     direction_vjp, flat_position_vjp, lane_scratch, lane_sums, lattice_grad, omega_partials,
                     orientation_lanes, position_vjp, solid_angle_partials, square_partials, weight_partials)
from .pixel import add_term, apply_final, final_factor, oversampled_factor, specialise
from .scene import Scene
from .physics import (SQUARE, bragg_weight, polarization_factor, polarization_grad,
                      square_lattice_grad, sum_row)

ADJOINT_LANES = 128   # a row's pixels taken as lanes at once (a multiple of 16: see cpu.lane_chunk) ...
ADJOINT_CHUNK_TERMS = 1 << 14   # ... or more, up to this many terms per chunk
NCHUNKS = 64   # row chunks; the number depends on the problem only, never on the thread count
CHUNK_GRID_BYTES = 4 * 2 ** 20   # memory for per-chunk structure-factor partials (at least)


def n_chunks(nrows, grid_size, image_bytes=0):
    """How many row chunks (each with its own partial gradients) the adjoint uses.

    Enough for load balance, but the per-chunk structure-factor partials together stay
    within max(4 MB, the image's size)."""
    budget = max(CHUNK_GRID_BYTES, image_bytes)
    by_memory = max(4, budget // max(8 * grid_size, 1))
    return int(max(1, min(NCHUNKS, nrows, by_memory)))

# square_adjoint's own scratch rows, after square_partials' (derivs.SQ_*)
_S_BX, _S_BY, _S_BZ, _S_DF = range(SQ_ROWS, SQ_ROWS + 4)
NSCRATCH = SQ_ROWS + 4


@njit(cache=True, error_model="numpy")
def add_F(gF, g, j, value):
    """dL/dF_j += value.  (The GPU kernels swap in a deterministic atomic version.)"""
    gF[j] += value


@njit(cache=True, error_model="numpy")
def orientation_rows(g, L):
    """The orientation part of a flat derivative vector as its (9, npad) rows."""
    return g[L.orients:L.orients + 9 * L.npad].reshape((9, L.npad))


@njit(cache=True, error_model="numpy", inline="always")
def _push_orientation(gor, m, gh, gk, gl, qx, qy, qz):
    """dL/d(orientation m) += (dL/dh, dL/dk, dL/dl) outer q."""
    gor[0, m] += gh * qx
    gor[1, m] += gh * qy
    gor[2, m] += gh * qz
    gor[3, m] += gk * qx
    gor[4, m] += gk * qy
    gor[5, m] += gk * qz
    gor[6, m] += gl * qx
    gor[7, m] += gl * qy
    gor[8, m] += gl * qz


@njit(cache=True, error_model="numpy", inline="always")
def square_adjoint(qx, qy, qz, ori, nreal, xt, fs, fflat, G, gor, sc, ibuf, g, L, gF):
    """Backward pass of :func:`~nbragg.kernels.cpu.square_terms` for one block with
    upstream G on every term; returns (dL/dq, the block's sum of terms as the forward
    kernel computes it).

    The work is split into short loops over the zero-padded orientation list, each with
    few memory streams, so that LLVM vectorises every one of them (a single loop with
    all the stores does not vectorise); padded entries get zero weight.
    """
    n = ori.shape[1]
    use_grid = fs.has_hkls
    Na = xt.Na
    Nb = xt.Nb
    Nc = xt.Nc
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
        F = fs.default_F
        for m in range(nreal):
            h, k, l = soa_hkl(ori, m, qx, qy, qz)
            dh = h - math.ceil(h - 0.5)
            dk = k - math.ceil(k - 0.5)
            dl = l - math.ceil(l - 0.5)
            T, Lt, LH, LK, LL, LNa, LNb, LNc = square_lattice_grad(dh, dk, dl, Na, Nb, Nc)
            c = G * 2.0 * F * F * Lt
            gh = c * LH
            gk = c * LK
            gl = c * LL
            _push_orientation(gor, m, gh, gk, gl, qx, qy, qz)
            gqx += gh * ori[0, m] + gk * ori[3, m] + gl * ori[6, m]
            gqy += gh * ori[1, m] + gk * ori[4, m] + gl * ori[7, m]
            gqz += gh * ori[2, m] + gk * ori[5, m] + gl * ori[8, m]
            gNa += c * LNa
            gNb += c * LNb
            gNc += c * LNc
            # the forward's term; under 8 terms sum_fixed is this running sum
            S += T * (F * F)
            gD += G * 2.0 * F * Lt * Lt
        g[L.Na] += gNa
        g[L.Nb] += gNb
        g[L.Nc] += gNc
        g[L.default_F] += gD
        return gqx, gqy, gqz, S
    square_partials(qx, qy, qz, ori, nreal, xt, fs, fflat, sc, ibuf)
    # scale the partials by dL/dF_latt; keep dL/dF
    for m in range(n):
        F = sc[SQ_F, m]
        Lt = sc[SQ_L, m]
        c = G * 2.0 * F * F * Lt
        sc[SQ_LH, m] *= c
        sc[SQ_LK, m] *= c
        sc[SQ_LL, m] *= c
        sc[SQ_LNA, m] *= c
        sc[SQ_LNB, m] *= c
        sc[SQ_LNC, m] *= c
        sc[_S_DF, m] = G * 2.0 * F * Lt * Lt
    for m in range(n):
        _push_orientation(gor, m, sc[SQ_LH, m], sc[SQ_LK, m], sc[SQ_LL, m], qx, qy, qz)
    for m in range(n):
        gh = sc[SQ_LH, m]
        gk = sc[SQ_LK, m]
        gl = sc[SQ_LL, m]
        sc[_S_BX, m] = gh * ori[0, m] + gk * ori[3, m] + gl * ori[6, m]
        sc[_S_BY, m] = gh * ori[1, m] + gk * ori[4, m] + gl * ori[7, m]
        sc[_S_BZ, m] = gh * ori[2, m] + gk * ori[5, m] + gl * ori[8, m]
    g[L.Na] += sum_row(sc, SQ_LNA, n)
    g[L.Nb] += sum_row(sc, SQ_LNB, n)
    g[L.Nc] += sum_row(sc, SQ_LNC, n)
    if use_grid:
        for m in range(nreal):
            j = ibuf[m]
            if j >= 0:
                gF[j] += sc[_S_DF, m]
            else:
                g[L.default_F] += sc[_S_DF, m]
    else:
        g[L.default_F] += sum_row(sc, _S_DF, n)
    return (sum_row(sc, _S_BX, n), sum_row(sc, _S_BY, n), sum_row(sc, _S_BZ, n),
            sum_row(sc, SQ_T, nreal))


@njit(cache=True, error_model="numpy")
def _factors_vjp(g_om, g_cap, g_pol, fpixel, spixel, subF, subS, t, s, S, g, L, pbuf):
    """Gradients of the pixel factors computed at one sub-pixel (omega, capture fraction,
    and the polarization with source s), pushed back to their inputs together."""
    if g_om == 0.0 and g_cap == 0.0 and g_pol == 0.0:
        return
    px, py, pz, R, dx, dy, dz = direction(fpixel, spixel, subF, subS, t, S.det, S.beam)
    _sample_vjp(g_om, g_cap, g_pol, 0.0, 0.0, 0.0, fpixel, spixel, subF, subS, t, s, px, py, pz, R, dx, dy, dz, S, g,
                L, pbuf)


@njit(cache=True, error_model="numpy")
def _sample_vjp(g_om, g_cap, g_pol, gdx, gdy, gdz, fpixel, spixel, subF, subS, t, s, px, py, pz, R, dx, dy, dz, S, g,
                L, pbuf):
    """:func:`_factors_vjp` at a sub-pixel whose position and direction are known, with a
    gradient (gdx, gdy, gdz) of its direction from elsewhere (an amorphous sample's
    scattering vector), pushed back with them."""
    if g_om == 0.0 and g_cap == 0.0 and g_pol == 0.0 and gdx == 0.0 and gdy == 0.0 and gdz == 0.0:
        return
    det = S.det
    sources = S.beam.sources
    pv = S.beam.polar_axis
    gR = 0.0
    if g_om != 0.0:
        om = solid_angle(R, det)
        dR, dpix, dclose = omega_partials(R, det, om)
        gR = g_om * dR
        g[L.pixel] += g_om * dpix
        g[L.close_distance] += g_om * dclose
    if g_cap != 0.0:
        cap, cdx, cdy, cdz, cox, coy, coz, cts, cmu = capture_partials(t, dx, dy, dz, det)
        gdx += g_cap * cdx
        gdy += g_cap * cdy
        gdz += g_cap * cdz
        g[L.odet] += g_cap * cox
        g[L.odet + 1] += g_cap * coy
        g[L.odet + 2] += g_cap * coz
        g[L.thickstep] += g_cap * cts
        g[L.mu] += g_cap * cmu
    if g_pol != 0.0:
        ix = -sources[s, 0]
        iy = -sources[s, 1]
        iz = -sources[s, 2]
        polarization_grad(S.beam.kahn, ix, iy, iz, dx, dy, dz, pv[0], pv[1], pv[2], pbuf)
        g[L.kahn] += g_pol * pbuf[0]
        g[L.sources + 3 * s] -= g_pol * pbuf[1]
        g[L.sources + 3 * s + 1] -= g_pol * pbuf[2]
        g[L.sources + 3 * s + 2] -= g_pol * pbuf[3]
        gdx += g_pol * pbuf[4]
        gdy += g_pol * pbuf[5]
        gdz += g_pol * pbuf[6]
        g[L.polar_axis] += g_pol * pbuf[7]
        g[L.polar_axis + 1] += g_pol * pbuf[8]
        g[L.polar_axis + 2] += g_pol * pbuf[9]
    gpx, gpy, gpz = direction_vjp(gdx, gdy, gdz, gR, px, py, pz, R, dx, dy, dz)
    position_vjp(gpx, gpy, gpz, fpixel, spixel, subF, subS, t, det, S.beam, L, g)


class ReplayWork(NamedTuple):
    """What the adjoint's replay of the walk records for its backward sweep: per block
    the sum at its start, its multiplier, its number of terms and its (sub-pixel, source)
    number; ``rec`` = (blocks, omega_at, capture_at, polar_at); ``fac`` = (sum, capture,
    polar, omega) at the end."""
    blk_I: np.ndarray
    blk_m: np.ndarray
    blk_K: np.ndarray
    blk_id: np.ndarray
    rec: np.ndarray
    fac: np.ndarray


@njit(cache=True, error_model="numpy", inline="always")
def _r_begin(W, S, fpixel, spixel):
    W.rec[0] = 0
    W.rec[1] = -1
    W.rec[2] = -1
    W.rec[3] = -1
    return S.samp.I_bg, True


@njit(cache=True, error_model="numpy", inline="always")
def _r_omega(W, S, R, omega, sub):
    W.rec[1] = sub


@njit(cache=True, error_model="numpy", inline="always")
def _r_capture(W, S, t, dx, dy, dz, capture, sub):
    W.rec[2] = sub


@njit(cache=True, error_model="numpy", inline="always")
def _r_polar(W, S, s, ix, iy, iz, dx, dy, dz, sub):
    W.rec[3] = sub * S.beam.sources.shape[0] + s
    pv = S.beam.polar_axis
    return polarization_factor(S.beam.kahn, ix, iy, iz, dx, dy, dz, pv[0], pv[1], pv[2])


@njit(cache=True, error_model="numpy", inline="always")
def _r_block(W, S, I, qx, qy, qz, capture, polar, omega, t, subS, subF, s, sub):
    """The block's terms, I = (I + T) m after each (m: the product of the oversampled
    factors, 1 without -oversample_* flags), recorded for the sweep."""
    orients = S.xtal.orients
    m = oversampled_factor(S.samp, capture, polar, omega)
    nb = W.rec[0]
    W.blk_I[nb] = I
    W.blk_m[nb] = m
    W.blk_id[nb] = sub * S.beam.sources.shape[0] + s
    K = 0
    for o in range(orients.shape[0]):
        h, k, l, h0, k0, l0, F_latt, F_cell, counted, T = term(orients, o, qx, qy, qz, S, s)
        if counted:
            I = add_term(I, T, S.samp, capture, polar, omega)
            K += 1
    W.blk_K[nb] = K
    W.rec[0] = nb + 1
    return I


@njit(cache=True, error_model="numpy", inline="always")
def _r_finish(W, S, I, capture, polar, omega, omega_sum, bg):
    W.fac[0] = I
    W.fac[1] = capture
    W.fac[2] = polar
    W.fac[3] = omega
    return apply_final(S.samp, I, capture, polar, omega) + bg


walk_replay = specialise("replay", begin=_r_begin, omega_taken=_r_omega, capture_taken=_r_capture,
                         polarization=_r_polar, block=_r_block, finish=_r_finish)


@njit(cache=True, error_model="numpy")
def pixel_adjoint(fpixel, spixel, gv, S, L, blk_I, blk_m, blk_K, blk_id, rec, fac, lp, pbuf, fidx, fw, g, gor, gF):
    """Accumulate gv * d(pixel value before scaling)/d(inputs) into ``g`` (layout ``L``;
    orientations into ``gor`` (9, npad), structure factors into ``gF``); returns the value.

    The walk of :mod:`.pixel` replays the pixel, recording each block (``blk_*``, ``rec``,
    ``fac``: see :class:`ReplayWork`); then the blocks are swept backwards."""
    det = S.det
    beam = S.beam
    xt = S.xtal
    fs = S.fhkl
    os = det.oversample
    os_omega = S.samp.os_omega
    os_polar = S.samp.os_polar
    os_thick = S.samp.os_thick
    physical = S.samp.physical
    # (the physical mode keeps a capture fraction of 1 without a sensor: see pixel.walk)
    sensor = det.thick != 0.0 or not physical
    shape = xt.shape
    water = S.samp.water
    kahn = beam.kahn
    pv = beam.polar_axis
    sources = beam.sources
    lambdas = beam.lambdas
    orients = xt.orients
    nsrc = sources.shape[0]
    norient = orients.shape[0]
    nsub = os * os

    # ---------------------------------------------------------------- replay forward
    value = walk_replay(fpixel, spixel, S, ReplayWork(blk_I, blk_m, blk_K, blk_id, rec, fac))
    if S.samp.bg_amount.shape[0] > 0:
        # the amorphous background: a sum added after the Bragg factors, swept on its own
        for su in range(S.det.thicksteps * S.det.oversample * S.det.oversample):
            for s in range(S.beam.sources.shape[0]):
                amorphous_sample_vjp(gv, fpixel, spixel, su % S.det.oversample, (su // S.det.oversample) %
                                     S.det.oversample, su // (S.det.oversample * S.det.oversample), s, S, g, L, pbuf)
    nb = rec[0]
    omega_at = rec[1]
    capture_at = rec[2]
    polar_at = rec[3]
    I = fac[0]
    capture = fac[1]
    polar = fac[2]
    omega = fac[3]
    post = final_factor(S.samp, capture, polar, omega)

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
        px, py, pz, R, dx, dy, dz = direction(fpixel, spixel, subF, subS, t, det, beam)
        ix, iy, iz, lam, qx, qy, qz = scattering(sources, lambdas, s, dx, dy, dz)
        w = bragg_weight(S, s, qx, qy, qz)
        gw = 0.0          # dL/dw over the block's terms
        gqx = 0.0
        gqy = 0.0
        gqz = 0.0
        mpow = m          # m^(e+1) for the term e places from the end of the block
        S_dm = 0.0        # sum over terms of (e+1) T m^e
        mpow_e = 1.0      # m^e
        e = 0
        for o in range(norient - 1, -1, -1):
            h, k, l, h0, k0, l0 = miller(orients, o, qx, qy, qz)
            Lt = lattice_grad(h, k, l, h0, k0, l0, xt, lp)
            if Lt == 0.0 and not water:
                continue
            F, Fh, Fk, Fl, nidx, Fdef, FU = F_grad(h, k, l, h0, k0, l0, fs, fidx, fw)
            T0 = F * F * Lt * Lt
            T = w * T0
            gw += G * mpow * T0
            gT = G * mpow * w
            if physical:
                # each term times its own factors: T m, with no powers of m
                S_dm += T
            else:
                S_dm += (e + 1) * T * mpow_e
                mpow *= m
                mpow_e *= m
            e += 1
            gL = gT * 2.0 * F * F * Lt
            gFc = gT * 2.0 * F * Lt * Lt
            gh = gL * lp[0] + gFc * Fh
            gk = gL * lp[1] + gFc * Fk
            gl = gL * lp[2] + gFc * Fl
            g[L.Na] += gL * lp[3]
            g[L.Nb] += gL * lp[4]
            g[L.Nc] += gL * lp[5]
            g[L.fudge] += gL * lp[6]
            if shape != SQUARE:
                for j in range(9):
                    g[L.recip + j] += gL * lp[7 + j]
                g[L.N_ab] += gL * lp[LP_NAB]
                g[L.N_ac] += gL * lp[LP_NAC]
                g[L.N_bc] += gL * lp[LP_NBC]
            for j in range(nidx):
                add_F(gF, g, fidx[j], gFc * fw[j])
            g[L.default_F] += gFc * Fdef
            if fs.aniso:
                for j in range(6):
                    g[L.beta + j] += gFc * FU * aniso_monomials(h, k, l, j)
            _push_orientation(gor, o, gh, gk, gl, qx, qy, qz)
            gqx += gh * orients[o, 0, 0] + gk * orients[o, 1, 0] + gl * orients[o, 2, 0]
            gqy += gh * orients[o, 0, 1] + gk * orients[o, 1, 1] + gl * orients[o, 2, 1]
            gqz += gh * orients[o, 0, 2] + gk * orients[o, 1, 2] + gl * orients[o, 2, 2]
        # the block's multiplier (only with -oversample_* flags)
        if m != 1.0 or os_thick or os_polar or os_omega:
            if K > 0:
                gm = G * S_dm if physical else G * (K * blk_I[b] * m ** (K - 1) + S_dm)
                # the factors of this block, recomputed where they were taken
                cap_b = capture_fraction(t, dx, dy, dz, det) if os_thick and sensor else 1.0
                pol_b = 1.0
                if os_polar:
                    pol_b = polarization_factor(kahn, ix, iy, iz, dx, dy, dz, pv[0], pv[1], pv[2])
                om_b = solid_angle(R, det) if os_omega else 1.0
                _factors_vjp(gm * cap_b * pol_b if os_omega else 0.0, gm * pol_b * om_b if os_thick else 0.0,
                             gm * cap_b * om_b if os_polar else 0.0, fpixel, spixel, subF, subS, t, s, S, g, L,
                             pbuf)
                if not physical:
                    G = G * m ** K
        bx, by, bz = bragg_weight_vjp(S, s, qx, qy, qz, gw, g, L)
        gqx += bx
        gqy += by
        gqz += bz
        # q = (d + src) / lambda
        if gqx != 0.0 or gqy != 0.0 or gqz != 0.0:
            gdx = gqx / lam
            gdy = gqy / lam
            gdz = gqz / lam
            g[L.sources + 3 * s] += gqx / lam
            g[L.sources + 3 * s + 1] += gqy / lam
            g[L.sources + 3 * s + 2] += gqz / lam
            g[L.lambdas + s] -= (gqx * qx + gqy * qy + gqz * qz) / lam
            gpx, gpy, gpz = direction_vjp(gdx, gdy, gdz, 0.0, px, py, pz, R, dx, dy, dz)
            position_vjp(gpx, gpy, gpz, fpixel, spixel, subF, subS, t, det, beam, L, g)
    g[L.I_bg] += G
    g[L.scale] += gv * value
    # gradients of the factors applied once at the end, each at the sub-pixel (and source)
    # where it was taken; when they coincide (the usual case) one geometry pass serves all
    g_cap = 0.0
    g_pol = 0.0
    g_om = 0.0
    if not os_thick and capture_at >= 0 and det.thick != 0.0:
        g_cap = gv * I * (1.0 if os_polar else polar) * (1.0 if os_omega else omega)
    if not os_polar and polar_at >= 0:
        g_pol = gv * I * (1.0 if os_thick else capture) * (1.0 if os_omega else omega)
    if not os_omega and omega_at >= 0:
        g_om = gv * I * (1.0 if os_thick else capture) * (1.0 if os_polar else polar)
    pol_sub = polar_at // nsrc if polar_at >= 0 else -1
    pol_src = polar_at % nsrc if polar_at >= 0 else 0
    if g_om != 0.0 and omega_at == pol_sub and omega_at == capture_at:
        su = omega_at
        _factors_vjp(g_om, g_cap, g_pol, fpixel, spixel, su % os, (su // os) % os, su // nsub, pol_src, S, g, L,
                     pbuf)
    else:
        if g_om != 0.0:
            su = omega_at
            _factors_vjp(g_om, 0.0, 0.0, fpixel, spixel, su % os, (su // os) % os, su // nsub, 0, S, g, L, pbuf)
        if g_cap != 0.0:
            su = capture_at
            _factors_vjp(0.0, g_cap, 0.0, fpixel, spixel, su % os, (su // os) % os, su // nsub, 0, S, g, L, pbuf)
        if g_pol != 0.0:
            su = pol_sub
            _factors_vjp(0.0, 0.0, g_pol, fpixel, spixel, su % os, (su // os) % os, su // nsub, pol_src, S, g, L,
                         pbuf)
    return value


@njit(cache=True, error_model="numpy")
def amorphous_sample_vjp(gv, fpixel, spixel, subF, subS, t, s, S, g, L, pbuf):
    """One amorphous sample (sub-pixel, sensor layer, source): adds gv times its
    derivative in every input to ``g`` -- the materials' amounts, and through
    sin(theta)/lambda, the solid angle, the capture fraction, the polarization and the
    source weight the geometry, sources and wavelengths -- and returns its value (the
    forward's to rounding).  ``pbuf`` (10) is scratch."""
    det = S.det
    beam = S.beam
    samp = S.samp
    px, py, pz, R, dx, dy, dz = direction(fpixel, spixel, subF, subS, t, det, beam)
    ix, iy, iz, lam, qx, qy, qz = scattering(beam.sources, beam.lambdas, s, dx, dy, dz)
    stol = amorphous_stol(qx, qy, qz)
    omega = solid_angle(R, det)
    capture = 1.0
    if det.thick != 0.0:
        capture = capture_fraction(t, dx, dy, dz, det)
    polar = 1.0
    if not beam.nopolar:
        pv = beam.polar_axis
        polar = polarization_factor(beam.kahn, ix, iy, iz, dx, dy, dz, pv[0], pv[1], pv[2])
    w = beam.weights[s]
    factor = polar * omega * w * capture
    A = 0.0          # sum_m amount_m sign(F_m) F_m^2 and its derivative in stol
    dA = 0.0
    for m in range(samp.bg_amount.shape[0]):
        F, dF = amorphous_F_grad(samp, m, stol)
        sF2 = signed_square(F)
        g[L.bg_amount + m] += gv * (factor * sF2)
        A += samp.bg_amount[m] * sF2
        dA += samp.bg_amount[m] * 2.0 * abs(F) * dF
    gA = gv * A
    g[L.weights + s] += gA * (polar * omega * capture)
    g_om = gA * (polar * w * capture)
    g_cap = gA * (polar * omega * w) if det.thick != 0.0 else 0.0
    g_pol = gA * (omega * w * capture) if not beam.nopolar else 0.0
    # stol = |q| / 2 and q = (d + src) / lambda
    gdx = 0.0
    gdy = 0.0
    gdz = 0.0
    if stol > 0.0:
        c = gv * factor * dA / (4.0 * stol)
        gqx = c * qx
        gqy = c * qy
        gqz = c * qz
        g[L.sources + 3 * s] += gqx / lam
        g[L.sources + 3 * s + 1] += gqy / lam
        g[L.sources + 3 * s + 2] += gqz / lam
        g[L.lambdas + s] -= (gqx * qx + gqy * qy + gqz * qz) / lam
        gdx = gqx / lam
        gdy = gqy / lam
        gdz = gqz / lam
    _sample_vjp(g_om, g_cap, g_pol, gdx, gdy, gdz, fpixel, spixel, subF, subS, t, s, px, py, pz, R, dx, dy, dz, S, g,
                L, pbuf)
    return factor * A


@njit(cache=True, error_model="numpy", inline="always")
def pixel_adjoint_fast(fpixel, spixel, gv, S, L, ori, norient, fflat, sc, ibuf, pbuf, g, gor, gF):
    """Adjoint of one pixel without -oversample_* flags, for parallelepiped spots and
    nearest-neighbour F.  Every term is only added, so each block is visited once, in
    forward order, with the same upstream.  The three pixel factors (and their partials)
    are evaluated first; their gradients, which need the pixel's sum, are applied at the
    end -- at the first sub-pixel together with that sub-pixel's own gradient.

    Returns (True, the pixel value unscaled), or (False, 0) when a factor is exactly zero
    where nanoBragg would recompute it later (the caller then uses the general path; a
    pixel's value itself may be negative, with an amorphous F below 0).

    This is one of the loops outside :mod:`.pixel`'s walk (with the row lanes: this
    module's :func:`_adjoint_lanes`, which mirrors this function across a row's pixels,
    and the forward's and the tangent's).  Written as a walk mode
    (hooks keeping the factors and the first sub-pixel's gradient in a scratch array) it
    ran the B2 gradient 13-17 % slower, measured twice; its blocks are the walk's blocks,
    swept by :func:`square_adjoint`, and its value is the forward's to rounding.
    """
    det = S.det
    beam = S.beam
    os = det.oversample
    thicksteps = det.thicksteps
    sources = beam.sources
    lambdas = beam.lambdas
    pv = beam.polar_axis
    nsrc = sources.shape[0]
    dmin = S.samp.dmin
    # ---- omega at the first sub-pixel
    p0x, p0y, p0z, R0, d0x, d0y, d0z = direction(fpixel, spixel, 0, 0, 0, det, beam)
    omega = solid_angle(R0, det)
    if omega == 0.0:
        return False, 0.0
    om_R, om_pix, om_close = omega_partials(R0, det, omega)
    # ---- capture fraction at the first sub-pixel of the last layer
    capture = 1.0
    if det.thick != 0.0:
        tl = thicksteps - 1
        cx, cy, cz, cR, cdx, cdy, cdz = direction(fpixel, spixel, 0, 0, tl, det, beam)
        capture = capture_partials(tl, cdx, cdy, cdz, det)[0]
        if capture == 0.0:
            return False, 0.0
    # ---- polarization at the first (sub-pixel, source) -dmin does not cut; its
    # partials are kept in pbuf
    polar = 1.0 if beam.nopolar else 0.0
    pol_sub = -1
    pol_src = 0
    if not beam.nopolar:
        for su in range(thicksteps * os * os):
            if su == 0:
                gdx, gdy, gdz = d0x, d0y, d0z
            else:
                gx, gy, gz, gR, gdx, gdy, gdz = direction(fpixel, spixel, su % os, (su // os) % os, su // (os * os),
                                                          det, beam)
            for s in range(nsrc):
                lam = lambdas[s]
                qx = (gdx + sources[s, 0]) / lam
                qy = (gdy + sources[s, 1]) / lam
                qz = (gdz + sources[s, 2]) / lam
                if beyond_dmin(qx, qy, qz, dmin):
                    continue
                polar = polarization_grad(beam.kahn, -sources[s, 0], -sources[s, 1], -sources[s, 2],
                                          gdx, gdy, gdz, pv[0], pv[1], pv[2], pbuf)
                pol_sub = su
                pol_src = s
                break
            if pol_sub >= 0:
                break
        if pol_sub >= 0 and polar == 0.0:
            return False, 0.0
    post = omega * capture * polar
    G = gv * post
    # ---- every block once: terms, and their gradients pushed to q and the geometry
    I = S.samp.I_bg
    nbg = S.samp.bg_amount.shape[0]
    bg = 0.0
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
                    px, py, pz, R, dx, dy, dz = direction(fpixel, spixel, subF, subS, t, det, beam)
                gdx = 0.0
                gdy = 0.0
                gdz = 0.0
                for s in range(nsrc):
                    if nbg > 0:
                        # (pbuf[:10] holds the Bragg polarization's partials until the end)
                        bg += amorphous_sample_vjp(gv, fpixel, spixel, subF, subS, t, s, S, g, L, pbuf[10:])
                    ix, iy, iz, lam, qx, qy, qz = scattering(sources, lambdas, s, dx, dy, dz)
                    if not S.samp.bragg or beyond_dmin(qx, qy, qz, dmin):
                        continue
                    w = bragg_weight(S, s, qx, qy, qz)
                    gqx, gqy, gqz, terms = square_adjoint(qx, qy, qz, ori, norient, S.xtal, S.fhkl, fflat, G * w, gor,
                                                          sc, ibuf, g, L, gF)
                    I += w * terms
                    bx, by, bz = bragg_weight_vjp(S, s, qx, qy, qz, G * terms, g, L)
                    gqx += bx
                    gqy += by
                    gqz += bz
                    gdx += gqx / lam
                    gdy += gqy / lam
                    gdz += gqz / lam
                    g[L.sources + 3 * s] += gqx / lam
                    g[L.sources + 3 * s + 1] += gqy / lam
                    g[L.sources + 3 * s + 2] += gqz / lam
                    g[L.lambdas + s] -= (gqx * qx + gqy * qy + gqz * qz) / lam
                if first:
                    g0x = gdx
                    g0y = gdy
                    g0z = gdz
                elif gdx != 0.0 or gdy != 0.0 or gdz != 0.0:
                    gpx, gpy, gpz = direction_vjp(gdx, gdy, gdz, 0.0, px, py, pz, R, dx, dy, dz)
                    position_vjp(gpx, gpy, gpz, fpixel, spixel, subF, subS, t, det, beam, L, g)
    g[L.I_bg] += G
    value = apply_final(S.samp, I, capture, polar, omega) + bg
    g[L.scale] += gv * value
    # ---- the factors' gradients, now that the sum is known
    g_om = gv * I * capture * polar
    g[L.pixel] += g_om * om_pix
    g[L.close_distance] += g_om * om_close
    gR0 = g_om * om_R
    if pol_sub >= 0:
        g_pol = gv * I * omega * capture
        g[L.kahn] += g_pol * pbuf[0]
        g[L.sources + 3 * pol_src] -= g_pol * pbuf[1]
        g[L.sources + 3 * pol_src + 1] -= g_pol * pbuf[2]
        g[L.sources + 3 * pol_src + 2] -= g_pol * pbuf[3]
        g[L.polar_axis] += g_pol * pbuf[7]
        g[L.polar_axis + 1] += g_pol * pbuf[8]
        g[L.polar_axis + 2] += g_pol * pbuf[9]
        gpx = g_pol * pbuf[4]
        gpy = g_pol * pbuf[5]
        gpz = g_pol * pbuf[6]
        if pol_sub == 0:
            g0x += gpx
            g0y += gpy
            g0z += gpz
        else:
            su = pol_sub
            sx, sy, sz, sR, sdx, sdy, sdz = direction(fpixel, spixel, su % os, (su // os) % os, su // (os * os),
                                                      det, beam)
            hx, hy, hz = direction_vjp(gpx, gpy, gpz, 0.0, sx, sy, sz, sR, sdx, sdy, sdz)
            position_vjp(hx, hy, hz, fpixel, spixel, su % os, (su // os) % os, su // (os * os), det, beam, L, g)
    gpx, gpy, gpz = direction_vjp(g0x, g0y, g0z, gR0, p0x, p0y, p0z, R0, d0x, d0y, d0z)
    position_vjp(gpx, gpy, gpz, fpixel, spixel, 0, 0, 0, det, beam, L, g)
    if det.thick != 0.0:
        g_cap = gv * I * omega * polar
        _factors_vjp(0.0, g_cap, 0.0, fpixel, spixel, 0, 0, thicksteps - 1, 0, S, g, L, pbuf)
    return True, value


@njit(parallel=True, cache=True, error_model="numpy")
def adjoint(det, beam, xtal, fhkl, samp, L, upstream, scale, nchunks, g_c, gF_c, image, lanes):
    """Partial gradients per chunk of rows (summed by the caller in chunk order).

    ``upstream`` (spixels, fpixels) is dL/dI for the scaled image; ``g_c`` (nchunks,
    L.size) and ``gF_c`` (nchunks, grid size) receive each chunk's dL/d(inputs) in the
    layout ``L`` (see :mod:`.scene`).  ``image``, when it has the image's shape, receives
    the (scaled) image of the pixels with non-zero upstream, which the adjoint computes
    anyway (pass a (0, 0) array to skip it).  ``lanes``: rows take
    :func:`_adjoint_row_lanes` where :func:`~nbragg.kernels.cpu.derivative_row_path` allows
    (False: every pixel is swept on its own, as the tests' reference does).  (The scene comes
    block by block, as in :func:`~nbragg.kernels.cpu.forward`.)  Returns how many pixels
    were swept one by one (with the lanes: those they left).
    """
    spixels, fpixels = upstream.shape
    xmin, xmax, ymin, ymax = clipped_roi(det, spixels, fpixels)
    nrows = ymax - ymin + 1
    ori = orientations_soa(xtal.orients)
    fflat = fhkl.grid.ravel()
    fast = fast_path(Scene(det, beam, xtal, fhkl, samp))
    lanes = lanes and derivative_row_path(Scene(det, beam, xtal, fhkl, samp))
    want_image = image.shape[0] == spixels and image.shape[1] == fpixels   # (0, 0): no image
    swept = 0
    for c in prange(nchunks):
        r0 = ymin + (c * nrows) // nchunks
        r1 = ymin + ((c + 1) * nrows) // nchunks
        swept += _adjoint_rows(Scene(det, beam, xtal, fhkl, samp), L, r0, r1, xmin, xmax, upstream, scale, fast, lanes,
                               ori, fflat, g_c[c], gF_c[c], want_image, image)
    return swept


@njit(cache=True, error_model="numpy", inline="always")
def _adjoint_rows(S, L, r0, r1, xmin, xmax, upstream, scale, fast, lanes, ori, fflat, g, gF, want_image, image):
    """Rows r0..r1-1 of the adjoint, accumulating into one chunk's g and gF (a call per
    chunk: see cpu._forward_row); returns how many pixels it swept one by one."""
    det = S.det
    use_mask = det.use_mask
    mask = det.mask
    nblocks = det.thicksteps * det.oversample * det.oversample * S.beam.sources.shape[0]
    norient = S.xtal.orients.shape[0]
    npad = ori.shape[1]
    sc = np.empty((NSCRATCH, npad))
    ibuf = np.empty(npad, dtype=np.int64)
    blk_I = np.empty(nblocks)
    blk_m = np.empty(nblocks)
    blk_K = np.empty(nblocks, dtype=np.int64)
    blk_id = np.empty(nblocks, dtype=np.int64)
    rec = np.empty(4, dtype=np.int64)
    fac = np.empty(4)
    lp = np.empty(LP_SIZE)
    pbuf = np.empty(20)         # the fast path keeps the polarization's partials in [:10]
    fidx = np.empty(64, dtype=np.int64)
    fw = np.empty(64)
    gor = orientation_rows(g, L)
    todo = np.empty(max(xmax - xmin + 1, 0), dtype=np.int64)
    swept = 0
    for spixel in range(r0, r1):
        ntodo = 0
        if lanes:
            ntodo = _adjoint_row_lanes(S, L, spixel, xmin, xmax, upstream, scale, ori, fflat, g, gF, gor,
                                       want_image, image, todo)
        else:
            for fpixel in range(xmin, xmax + 1):
                todo[ntodo] = fpixel
                ntodo += 1
        for i in range(ntodo):
            fpixel = todo[i]
            if use_mask and mask[spixel, fpixel] == 0:
                continue
            gv = upstream[spixel, fpixel] * scale
            if gv == 0.0:
                continue
            swept += 1
            done = False
            v = 0.0
            if fast:
                done, v = pixel_adjoint_fast(fpixel, spixel, gv, S, L, ori, norient, fflat, sc, ibuf, pbuf, g, gor,
                                             gF)
            if not done:
                v = pixel_adjoint(fpixel, spixel, gv, S, L, blk_I, blk_m, blk_K, blk_id, rec, fac, lp, pbuf, fidx, fw,
                                  g, gor, gF)
            if want_image:
                image[spixel, fpixel] = v * scale
    return swept


@njit(cache=True, error_model="numpy")
def _adjoint_row_lanes(S, L, spixel, xmin, xmax, upstream, scale, ori, fflat, g, gF, gor, want_image, image, todo):
    """One row of the adjoint in the :func:`~nbragg.kernels.cpu.derivative_row_path` case, its
    pixels as vector lanes, in chunks (see :func:`_adjoint_lanes`) of ADJOINT_LANES pixels,
    whose per-lane arrays stay in a core's second-level cache (those of the orientation
    loop, in its first), or more where a pixel has few terms: a chunk allocates some eighty
    arrays (a background's scratch besides), which cost more than a few thousand terms.
    Writes to ``todo`` the pixels the lanes leave to the per-pixel sweep and returns how
    many."""
    width = xmax - xmin + 1
    if width <= 0:
        return 0
    det = S.det
    terms = det.thicksteps * det.oversample * det.oversample * S.beam.sources.shape[0] * S.xtal.orients.shape[0]
    width = min(width, max(ADJOINT_LANES, ADJOINT_CHUNK_TERMS // max(terms, 1) // 16 * 16))
    ntodo = 0
    for x0 in range(xmin, xmax + 1, width):
        ntodo = _adjoint_lanes(S, L, spixel, x0, min(x0 + width - 1, xmax), upstream, scale, ori, fflat, g, gF, gor,
                               want_image, image, todo, ntodo)
    return ntodo


@njit(cache=True, error_model="numpy", fastmath={"reassoc", "contract"})
def _block_sums(G, Tk, dws, dwB, Wx, Wy, Wz, cwq, qx, qy, qz, lam, n):
    """A block's sums over its lanes in :func:`_adjoint_lanes`: dL/d(source weight),
    dL/dB, dL/d(direction) and dL/d(wavelength)'s sum, each lane's dL/dq taken again
    (reassociated and contracted: see :func:`_position_vjp_lanes`)."""
    gws = gwB = sgx = sgy = sgz = sgl = 0.0
    for x in range(n):
        gw = G[x] * Tk[x]
        gqx = (Wx[x] + gw * cwq[x] * qx[x]) / lam
        gqy = (Wy[x] + gw * cwq[x] * qy[x]) / lam
        gqz = (Wz[x] + gw * cwq[x] * qz[x]) / lam
        gws += gw * dws[x]
        gwB += gw * dwB[x]
        sgx += gqx
        sgy += gqy
        sgz += gqz
        sgl += gqx * qx[x] + gqy * qy[x] + gqz * qz[x]
    return gws, gwB, sgx, sgy, sgz, sgl


@njit(cache=True, error_model="numpy", fastmath={"reassoc", "contract"})
def _factor_sums(samp, act, G, gv, I, bg, capture, polar, omega, opix, oclose, pol_kahn, pol_c2, pol_x, pol_y, d0x,
                 d0y, d0z, n):
    """The sums over the lanes in ``act`` of :func:`_adjoint_lanes`'s pixel factors:
    dL/dI_bg, dL/dscale (times the scale), dL/dpixel, dL/dclose_distance, dL/dkahn, and
    dL/d(i.d) d, dL/d(d.E) d and dL/d(d.B) d (reassociated and contracted: see
    :func:`_position_vjp_lanes`)."""
    sG = svalue = spix = sclose = skahn = 0.0
    si0 = si1 = si2 = sE0 = sE1 = sE2 = sB0 = sB1 = sB2 = 0.0
    for x in range(n):
        on = act[x]
        value = apply_final(samp, I[x], capture[x], polar[x], omega[x]) + bg[x]
        g_om = gv[x] * I[x] * capture[x] * polar[x]
        g_pol = gv[x] * I[x] * omega[x] * capture[x]
        gc2 = g_pol * pol_c2[x]
        gx = g_pol * pol_x[x]
        gy = g_pol * pol_y[x]
        sG += G[x] if on else 0.0
        svalue += gv[x] * value if on else 0.0
        spix += g_om * opix[x] if on else 0.0
        sclose += g_om * oclose[x] if on else 0.0
        skahn += g_pol * pol_kahn[x] if on else 0.0
        si0 += gc2 * d0x[x] if on else 0.0
        si1 += gc2 * d0y[x] if on else 0.0
        si2 += gc2 * d0z[x] if on else 0.0
        sE0 += gx * d0x[x] if on else 0.0
        sE1 += gx * d0y[x] if on else 0.0
        sE2 += gx * d0z[x] if on else 0.0
        sB0 += gy * d0x[x] if on else 0.0
        sB1 += gy * d0y[x] if on else 0.0
        sB2 += gy * d0z[x] if on else 0.0
    return sG, svalue, spix, sclose, skahn, si0, si1, si2, sE0, sE1, sE2, sB0, sB1, sB2


@njit(cache=True, error_model="numpy", fastmath={"reassoc", "contract"})
def _position_vjp_lanes(det, L, g, spixel, xmin, n, subF, subS, t, act, gdx, gdy, gdz, gR, R, dx, dy, dz):
    """:func:`direction_vjp` and :func:`position_vjp` for sub-pixel (subF, subS) of layer t
    of the pixels xmin.. of a flat detector's row, the lanes in ``act`` only: the
    position is affine in the pixel's fast coordinate, so the geometry's partials are
    sums over the lanes.  (A function of its own, its sums reassociated as
    :func:`~nbragg.kernels.derivs._lane_partial_sums`'s: in lane order they kept the loop
    scalar, a tenth of a still's gradient.)"""
    os = det.oversample
    sub = det.subpixel
    f = det.fdet
    sx = 0.0
    sy = 0.0
    sz = 0.0
    fx = 0.0
    fy = 0.0
    fz = 0.0
    cf = 0.0
    for x in range(n):
        u = dx[x] * gdx[x] + dy[x] * gdy[x] + dz[x] * gdz[x]
        px = (gdx[x] - dx[x] * u) / R[x] + gR[x] * dx[x]
        py = (gdy[x] - dy[x] * u) / R[x] + gR[x] * dy[x]
        pz = (gdz[x] - dz[x] * u) / R[x] + gR[x] * dz[x]
        px = px if act[x] else 0.0
        py = py if act[x] else 0.0
        pz = pz if act[x] else 0.0
        col = (xmin + x) * os + subF
        Fdet = sub * col + sub / 2.0
        sx += px
        sy += py
        sz += pz
        fx += Fdet * px
        fy += Fdet * py
        fz += Fdet * pz
        cf += (col + 0.5) * (f[0] * px + f[1] * py + f[2] * pz)
    flat_position_vjp(sx, sy, sz, fx, fy, fz, cf, sub * (spixel * os + subS) + sub / 2.0, spixel * os + subS + 0.5, t,
                      det, L, g)


# rows of _amorphous_lanes_vjp's per-lane scratch after those of the factors' partials
# (derivs.amorphous_lane_partials)
BG_GFAC, BG_GA, BG_GOM, BG_GPOL, BG_GCAP, BG_CQ = range(AM_ROWS, AM_ROWS + 6)
BG_ROWS = AM_ROWS + 6


@njit(cache=True, error_model="numpy")
def _amorphous_lanes_vjp(S, L, g, t, s, n, act, gv, R, dx, dy, dz, qx, qy, qz, bg, gdx, gdy, gdz, gRs, sq, redo, w):
    """The amorphous samples of source s at one sub-pixel of layer t of n lanes (R, d and
    q: their distances, directions and scattering vectors): :func:`amorphous_sample_vjp`
    across the lanes in ``act``, in loops over them.  Adds each lane's value to ``bg``, its gradients of d and
    R to gd and gRs (pushed to the positions with the lanes' own), and the sums over the
    lanes of the other inputs' to ``g``.  ``sq`` (materials, n), ``redo`` (n) and ``w``
    (BG_ROWS, n, zeros at first) are scratch."""
    det = S.det
    beam = S.beam
    ix = -beam.sources[s, 0]
    iy = -beam.sources[s, 1]
    iz = -beam.sources[s, 2]
    lam = beam.lambdas[s]
    ws = beam.weights[s]
    pv = beam.polar_axis
    nopolar = beam.nopolar
    thick = det.thick != 0.0
    Bx, By, Bz, bm, Ex, Ey, Ez, em, framed = amorphous_lane_partials(S, s, t, n, R, dx, dy, dz, qx, qy, qz, w, sq,
                                                                      redo)
    stol = w[AM_STOL]
    omega = w[AM_OMEGA]
    polar = w[AM_POLAR]
    capture = w[AM_CAPTURE]
    A = w[AM_A]
    dA = w[AM_DA]
    gfac = w[BG_GFAC]
    gA = w[BG_GA]
    g_om = w[BG_GOM]
    g_pol = w[BG_GPOL]
    g_cap = w[BG_GCAP]
    cq = w[BG_CQ]
    # ---- the amounts' gradients
    for x in range(n):
        gfac[x] = gv[x] * (polar[x] * omega[x] * ws * capture[x]) if act[x] else 0.0
    for m in range(sq.shape[0]):
        g[L.bg_amount + m] += _lane_dot(gfac, sq[m], n)
    # ---- each lane's value and its gradients of d and R (the sums of the others' below:
    # see _block_sums)
    for x in range(n):
        factor = polar[x] * omega[x] * ws * capture[x]
        bg[x] += factor * A[x] if act[x] else 0.0
        ga = gv[x] * A[x] if act[x] else 0.0
        gA[x] = ga
        g_om[x] = ga * (polar[x] * ws * capture[x])
        g_pol[x] = ga * (omega[x] * ws * capture[x]) if not nopolar else 0.0
        g_cap[x] = ga * (polar[x] * omega[x] * ws) if thick else 0.0
        # stol = |q| / 2 and q = (d - i) / lambda
        c = gv[x] * factor * dA[x] / (4.0 * stol[x]) / lam
        cq[x] = c if act[x] and stol[x] > 0.0 else 0.0
        gRs[x] += g_om[x] * w[AM_OR, x]
        gdx[x] += cq[x] * qx[x]
        gdy[x] += cq[x] * qy[x]
        gdz[x] += cq[x] * qz[x]
    if not nopolar:
        for x in range(n):
            gc2 = g_pol[x] * w[AM_C2, x]
            gxv = g_pol[x] * w[AM_X, x]
            gyv = g_pol[x] * w[AM_Y, x]
            gdx[x] += gc2 * ix + gyv * Bx + gxv * Ex
            gdy[x] += gc2 * iy + gyv * By + gxv * Ey
            gdz[x] += gc2 * iz + gyv * Bz + gxv * Ez
    if thick:
        for x in range(n):
            gdx[x] += g_cap[x] * w[AM_CDX, x]
            gdy[x] += g_cap[x] * w[AM_CDY, x]
            gdz[x] += g_cap[x] * w[AM_CDZ, x]
    # ---- the other inputs' gradients, summed over the lanes
    (sw, spix, sclose, sqx, sqy, sqz, sql, skahn, si0, si1, si2, sE0, sE1, sE2, sB0, sB1, sB2, sox, soy, soz, sts,
     smu) = _amorphous_sums(w, act, dx, dy, dz, qx, qy, qz, n)
    g[L.weights + s] += sw
    g[L.pixel] += spix
    g[L.close_distance] += sclose
    _push_q_sums(g, L, s, sqx, sqy, sqz, sql)
    if thick:
        g[L.odet] += sox
        g[L.odet + 1] += soy
        g[L.odet + 2] += soz
        g[L.thickstep] += sts
        g[L.mu] += smu
    if not nopolar:
        _polarization_sums_vjp(g, L, s, ix, iy, iz, pv, Bx, By, Bz, bm, Ex, Ey, Ez, em, framed, skahn, si0, si1, si2,
                               sE0, sE1, sE2, sB0, sB1, sB2)


@njit(cache=True, error_model="numpy", inline="always")
def _push_q_sums(g, L, s, sx, sy, sz, sl):
    """Lanes' gradients of their scattering vectors q = (d - i) / lambda from source s,
    summed over them as dL/dq / lambda (sx, sy, sz) and its dot with q (sl), pushed to the
    source's direction and wavelength."""
    g[L.sources + 3 * s] += sx
    g[L.sources + 3 * s + 1] += sy
    g[L.sources + 3 * s + 2] += sz
    g[L.lambdas + s] -= sl


@njit(cache=True, error_model="numpy", inline="always")
def _polarization_sums_vjp(g, L, s, ix, iy, iz, pv, Bx, By, Bz, bm, Ex, Ey, Ez, em, framed, skahn, si0, si1, si2, sE0,
                           sE1, sE2, sB0, sB1, sB2):
    """Lanes' polarization gradients of source s summed over them (dL/dkahn, and dL/d(i.d) d,
    dL/d(d.E) d, dL/d(d.B) d: see :func:`~nbragg.kernels.physics.polarization_parts`)
    pushed to the Kahn factor, the source and, through its frame (B, E from
    :func:`~nbragg.kernels.physics.polarization_frame`), the E-vector axis."""
    gix = si0
    giy = si1
    giz = si2
    if framed:
        fix, fiy, fiz, gpx, gpy, gpz = polarization_frame_vjp(ix, iy, iz, pv[0], pv[1], pv[2], Bx, By, Bz, bm, Ex, Ey,
                                                              Ez, em, sE0, sE1, sE2, sB0, sB1, sB2)
        gix += fix
        giy += fiy
        giz += fiz
        g[L.polar_axis] += gpx
        g[L.polar_axis + 1] += gpy
        g[L.polar_axis + 2] += gpz
    g[L.kahn] += skahn
    g[L.sources + 3 * s] -= gix
    g[L.sources + 3 * s + 1] -= giy
    g[L.sources + 3 * s + 2] -= giz


@njit(cache=True, error_model="numpy", fastmath={"reassoc", "contract"})
def _lane_dot(a, b, n):
    """sum_x a[x] b[x] over n lanes (reassociated: see :func:`_block_sums`)."""
    total = 0.0
    for x in range(n):
        total += a[x] * b[x]
    return total


@njit(cache=True, error_model="numpy", fastmath={"reassoc", "contract"})
def _amorphous_sums(w, act, dx, dy, dz, qx, qy, qz, n):
    """:func:`_amorphous_lanes_vjp`'s sums over the lanes in ``act`` (the others left out
    whatever their partials: a lane whose factor is zero may have partials that are not
    finite): dL/d(source weight), dL/dpixel, dL/dclose_distance, dL/dq / lambda (3) and
    its dot with q, dL/dkahn, dL/d(i.d) d, dL/d(d.E) d, dL/d(d.B) d, dL/dodet (3),
    dL/dthickstep and dL/dmu (reassociated and contracted: see :func:`_block_sums`)."""
    sw = spix = sclose = sqx = sqy = sqz = sql = skahn = 0.0
    si0 = si1 = si2 = sE0 = sE1 = sE2 = sB0 = sB1 = sB2 = sox = soy = soz = sts = smu = 0.0
    for x in range(n):
        on = act[x]
        gom = w[BG_GOM, x]
        gpol = w[BG_GPOL, x]
        gcap = w[BG_GCAP, x]
        c = w[BG_CQ, x]
        sw += w[BG_GA, x] * (w[AM_POLAR, x] * w[AM_OMEGA, x] * w[AM_CAPTURE, x]) if on else 0.0
        spix += gom * w[AM_OPIX, x] if on else 0.0
        sclose += gom * w[AM_OCLOSE, x] if on else 0.0
        sqx += c * qx[x] if on else 0.0
        sqy += c * qy[x] if on else 0.0
        sqz += c * qz[x] if on else 0.0
        sql += c * (qx[x] * qx[x] + qy[x] * qy[x] + qz[x] * qz[x]) if on else 0.0
        skahn += gpol * w[AM_KAHN, x] if on else 0.0
        gc2 = gpol * w[AM_C2, x]
        gxv = gpol * w[AM_X, x]
        gyv = gpol * w[AM_Y, x]
        si0 += gc2 * dx[x] if on else 0.0
        si1 += gc2 * dy[x] if on else 0.0
        si2 += gc2 * dz[x] if on else 0.0
        sE0 += gxv * dx[x] if on else 0.0
        sE1 += gxv * dy[x] if on else 0.0
        sE2 += gxv * dz[x] if on else 0.0
        sB0 += gyv * dx[x] if on else 0.0
        sB1 += gyv * dy[x] if on else 0.0
        sB2 += gyv * dz[x] if on else 0.0
        sox += gcap * w[AM_COX, x] if on else 0.0
        soy += gcap * w[AM_COY, x] if on else 0.0
        soz += gcap * w[AM_COZ, x] if on else 0.0
        sts += gcap * w[AM_CTS, x] if on else 0.0
        smu += gcap * w[AM_CMU, x] if on else 0.0
    return (sw, spix, sclose, sqx, sqy, sqz, sql, skahn, si0, si1, si2, sE0, sE1, sE2, sB0, sB1, sB2, sox, soy, soz,
            sts, smu)


@njit(cache=True, error_model="numpy")
def _adjoint_lanes(S, L, spixel, xmin, xmax, upstream, scale, ori, fflat, g, gF, gor, want_image, image, todo, ntodo):
    """Pixels xmin..xmax of row spixel: :func:`pixel_adjoint_fast` with the sample loop
    outside and the pixel loop inside, as the forward's and the tangent's row lanes.

    The pixel factors and their partials come first (omega at the first sub-pixel, the
    capture fraction at the last layer's first, the polarization at the first sample),
    so each lane's upstream on the terms, G = dL/dI omega capture polar, is known before
    the blocks.  Per block :func:`~nbragg.kernels.derivs.orientation_lanes` gives per
    pixel dL/dq (W*, pushed to the sub-pixel and source at once) and adds dL/dN, dL/dF
    and per orientation dL/d(orientation), summed over the lanes (into ``sums.gN`` and
    ``gor``).  An amorphous background's samples are taken with the blocks, per sample
    (:func:`_amorphous_lanes_vjp`), their gradients of the directions and distances pushed
    with the blocks'.  A pixel whose factor is zero where the walk would
    take it again later, or whose polarization -dmin moves past its first sample, goes to
    ``todo`` for the per-pixel sweep.  Returns the new length of ``todo``."""
    det = S.det
    beam = S.beam
    xt = S.xtal
    fs = S.fhkl
    samp = S.samp
    n = xmax - xmin + 1
    os = det.oversample
    norient = xt.orients.shape[0]
    kahn = beam.kahn
    pv = beam.polar_axis
    sources = beam.sources
    lambdas = beam.lambdas
    nsrc = sources.shape[0]
    dmin = samp.dmin
    B = fs.B
    pixel = det.pixel
    close_distance = det.close_distance
    point_pixel = det.point_pixel
    use_mask = det.use_mask
    mask = det.mask
    gv = np.empty(n)
    act = np.empty(n, dtype=np.bool_)     # the lanes this sweep differentiates
    G = np.empty(n)
    I = np.empty(n)
    omega = np.empty(n)
    capture = np.ones(n)
    polar = np.ones(n)
    oR = np.empty(n)
    opix = np.empty(n)
    oclose = np.empty(n)
    pol_kahn = np.zeros(n)   # the polarization's partials (polarization_parts)
    pol_c2 = np.zeros(n)
    pol_x = np.zeros(n)
    pol_y = np.zeros(n)
    R0 = np.empty(n)
    d0x = np.empty(n)
    d0y = np.empty(n)
    d0z = np.empty(n)
    g0x = np.zeros(n)
    g0y = np.zeros(n)
    g0z = np.zeros(n)
    R = np.empty(n)
    dx = np.empty(n)
    dy = np.empty(n)
    dz = np.empty(n)
    gdx = np.empty(n)
    gdy = np.empty(n)
    gdz = np.empty(n)
    gR = np.empty(n)         # dL/dR at the first sub-pixel (the solid angle's), known at the end
    gRs = np.zeros(n)        # ... at a sub-pixel, the amorphous background's (none without one)
    gR0 = np.zeros(n)        # ... the background's at the first sub-pixel, pushed at the end
    nbg = samp.bg_amount.shape[0]
    bg = np.zeros(n)         # the amorphous background's sum, as the per-pixel sweep's
    bgw = np.zeros((BG_ROWS if nbg > 0 else 0, n))     # (rows of partials a term lacks stay 0)
    bgsq = np.empty((nbg, n))
    redo = np.empty(n, dtype=np.bool_)
    qx = np.empty(n)
    qy = np.empty(n)
    qz = np.empty(n)
    keep = np.empty(n, dtype=np.bool_)
    w = np.empty(n)
    Gw = np.empty(n)
    dws = np.empty(n)        # weight_partials
    dwB = np.empty(n)
    cwq = np.empty(n)
    Tk = np.empty(n)
    sc = lane_scratch(n, fs.default_F)
    sums = lane_sums(n, norient, False)
    acc = sums.acc
    Wx = sums.Wx
    Wy = sums.Wy
    Wz = sums.Wz
    pb = np.empty(10)
    # ---- the pixel factors, where the walk takes them
    for x in range(n):
        v = upstream[spixel, xmin + x] * scale
        gv[x] = 0.0 if use_mask and mask[spixel, xmin + x] == 0 else v
    lane_directions(det, beam, spixel, xmin, n, 0, 0, 0, R0, d0x, d0y, d0z)
    for x in range(n):
        omega[x] = pixel_solid_angle(R0[x], pixel, close_distance, point_pixel)
        oR[x], opix[x], oclose[x] = solid_angle_partials(R0[x], pixel, close_distance, point_pixel, omega[x])
    tl = det.thicksteps - 1
    if det.thick != 0.0:
        # (exp: a scalar loop, run only with sensor layers)
        lane_directions(det, beam, spixel, xmin, n, 0, 0, tl, R, dx, dy, dz)
        for x in range(n):
            capture[x] = capture_partials(tl, dx[x], dy[x], dz[x], det)[0]
    # the polarization at the first sample: its value, and what its gradient needs (the
    # partials in i and the E-vector axis go through the source's frame B, E once, at
    # the end: see polarization_frame_vjp)
    ix0 = -sources[0, 0]
    iy0 = -sources[0, 1]
    iz0 = -sources[0, 2]
    Bx, By, Bz, bm, Ex, Ey, Ez, em = polarization_frame(ix0, iy0, iz0, pv[0], pv[1], pv[2])
    framed = bm != 0.0 and em != 0.0
    if not beam.nopolar:
        lam = lambdas[0]
        for x in range(n):
            p1, pol_kahn[x], pol_c2[x], pol_x[x], pol_y[x] = polarization_parts(
                kahn, ix0, iy0, iz0, d0x[x], d0y[x], d0z[x], Bx, By, Bz, Ex, Ey, Ez, framed)
            cut = beyond_dmin((d0x[x] - ix0) / lam, (d0y[x] - iy0) / lam, (d0z[x] - iz0) / lam, dmin)
            polar[x] = 0.0 if cut else p1
    for x in range(n):
        live = gv[x] != 0.0
        act[x] = live and omega[x] != 0.0 and capture[x] != 0.0 and polar[x] != 0.0
        if live and not act[x]:
            todo[ntodo] = xmin + x
            ntodo += 1
        G[x] = gv[x] * (omega[x] * capture[x] * polar[x]) if act[x] else 0.0
        I[x] = samp.I_bg
    # ---- every block once, in the walk's order
    for t in range(det.thicksteps):
        for subS in range(os):
            for subF in range(os):
                first = t == 0 and subS == 0 and subF == 0
                lane_directions(det, beam, spixel, xmin, n, subF, subS, t, R, dx, dy, dz)
                gdx[:] = 0.0
                gdy[:] = 0.0
                gdz[:] = 0.0
                if nbg > 0:
                    gRs[:] = 0.0
                for s in range(nsrc):
                    ix = -sources[s, 0]
                    iy = -sources[s, 1]
                    iz = -sources[s, 2]
                    lam = lambdas[s]
                    wsrc = beam.weights[s]
                    for x in range(n):
                        qx[x] = (dx[x] - ix) / lam
                        qy[x] = (dy[x] - iy) / lam
                        qz[x] = (dz[x] - iz) / lam
                        keep[x] = not beyond_dmin(qx[x], qy[x], qz[x], dmin)
                        wv, dws[x], dwB[x], cwq[x] = weight_partials(wsrc, B, qx[x], qy[x], qz[x])
                        w[x] = wv if keep[x] else 0.0
                        Gw[x] = G[x] * w[x]
                    orientation_lanes(ori, norient, qx, qy, qz, Gw, xt, fs, fflat, False, True, gF, gor, sc, sums, n)
                    # the block's sum, its weight's gradient, and dL/dq to the sub-pixel and source
                    # (the lanes here, their sums in _block_sums: with the sums, or with more
                    # stores, LLVM leaves the loop scalar)
                    for x in range(n):
                        Tk[x] = 0.0
                        if keep[x]:
                            Tk[x] = block_total(acc, x)
                            I[x] += w[x] * Tk[x]
                        gw = G[x] * Tk[x]
                        gdx[x] += (Wx[x] + gw * cwq[x] * qx[x]) / lam
                        gdy[x] += (Wy[x] + gw * cwq[x] * qy[x]) / lam
                        gdz[x] += (Wz[x] + gw * cwq[x] * qz[x]) / lam
                    gws, gwB, sgx, sgy, sgz, sgl = _block_sums(G, Tk, dws, dwB, Wx, Wy, Wz, cwq, qx, qy, qz, lam, n)
                    g[L.weights + s] += gws
                    g[L.B] += gwB
                    _push_q_sums(g, L, s, sgx, sgy, sgz, sgl)
                    if nbg > 0:
                        # the background's samples (the sweep's amorphous_sample_vjp); their
                        # direction's and distance's gradients join the lanes' push below
                        _amorphous_lanes_vjp(S, L, g, t, s, n, act, gv, R, dx, dy, dz, qx, qy, qz, bg, gdx, gdy,
                                             gdz, gRs, bgsq, redo, bgw)
                if first:
                    # (pushed at the end, with the factors' gradients)
                    g0x[:] = gdx
                    g0y[:] = gdy
                    g0z[:] = gdz
                    gR0[:] = gRs
                elif det.curved:
                    for x in range(n):
                        if act[x]:
                            gpx, gpy, gpz = direction_vjp(gdx[x], gdy[x], gdz[x], gRs[x], 0.0, 0.0, 0.0, R[x], dx[x],
                                                          dy[x], dz[x])
                            position_vjp(gpx, gpy, gpz, xmin + x, spixel, subF, subS, t, det, beam, L, g)
                else:
                    _position_vjp_lanes(det, L, g, spixel, xmin, n, subF, subS, t, act, gdx, gdy, gdz, gRs, R, dx,
                                        dy, dz)
    # ---- the sums, and the factors' gradients now that each pixel's sum is known
    # (the lanes here, their sums in _factor_sums: see the blocks' sums)
    for x in range(n):
        g_om = gv[x] * I[x] * capture[x] * polar[x]
        g_pol = gv[x] * I[x] * omega[x] * capture[x]
        gR[x] = g_om * oR[x] + gR0[x]
        gc2 = g_pol * pol_c2[x]
        gx = g_pol * pol_x[x]
        gy = g_pol * pol_y[x]
        g0x[x] += gc2 * ix0 + gy * Bx + gx * Ex
        g0y[x] += gc2 * iy0 + gy * By + gx * Ey
        g0z[x] += gc2 * iz0 + gy * Bz + gx * Ez
    if want_image:
        for x in range(n):
            if act[x]:
                image[spixel, xmin + x] = (apply_final(samp, I[x], capture[x], polar[x], omega[x]) + bg[x]) * scale
    sG, svalue, spix, sclose, skahn, si0, si1, si2, sE0, sE1, sE2, sB0, sB1, sB2 = _factor_sums(
        samp, act, G, gv, I, bg, capture, polar, omega, opix, oclose, pol_kahn, pol_c2, pol_x, pol_y, d0x, d0y, d0z,
        n)
    g[L.I_bg] += sG
    g[L.scale] += svalue
    g[L.pixel] += spix
    g[L.close_distance] += sclose
    if not beam.nopolar:
        _polarization_sums_vjp(g, L, 0, ix0, iy0, iz0, pv, Bx, By, Bz, bm, Ex, Ey, Ez, em, framed, skahn, si0, si1, si2,
                               sE0, sE1, sE2, sB0, sB1, sB2)
    g[L.Na] += sums.gN[0]
    g[L.Nb] += sums.gN[1]
    g[L.Nc] += sums.gN[2]
    g[L.default_F] += sums.gN[3]
    if det.curved:
        for x in range(n):
            if act[x]:
                gpx, gpy, gpz = direction_vjp(g0x[x], g0y[x], g0z[x], gR[x], 0.0, 0.0, 0.0, R0[x], d0x[x], d0y[x],
                                              d0z[x])
                position_vjp(gpx, gpy, gpz, xmin + x, spixel, 0, 0, 0, det, beam, L, g)
    else:
        _position_vjp_lanes(det, L, g, spixel, xmin, n, 0, 0, 0, act, g0x, g0y, g0z, gR, R0, d0x, d0y, d0z)
    if det.thick != 0.0:
        for x in range(n):
            if act[x]:
                g_cap = gv[x] * I[x] * omega[x] * polar[x]
                _factors_vjp(0.0, g_cap, 0.0, xmin + x, spixel, 0, 0, tl, 0, S, g, L, pb)
    return ntodo
