"""Tangent (forward-mode) CPU kernel: per-pixel derivatives along P input directions.

Each direction is d(kernel inputs)/d(theta_p) for one parameter theta_p (see
:mod:`nbragg.params`).  The forward loops run once per pixel carrying P tangents next
to every value, so the result is the Jacobian dI_i/dtheta_p (pixels x P).  Every
pixel is computed by one thread, so the result does not depend on the thread count.
"""

import math
from typing import NamedTuple

import numpy as np
from .. import _jitcache  # noqa: F401  (nbragg's cache keys, before any cached function)
from numba import njit, prange

from .cpu import block_total, clipped_roi, derivative_row_path, fast_path, lane_chunk, lane_directions, term
from .physics import (beyond_dmin, capture_fraction, orientations_soa, pixel_solid_angle, polarization_frame,
                      polarization_frame_jvp, polarization_parts)
from .derivs import (AM_A, AM_C2, AM_CAPTURE, AM_CDX, AM_CDY, AM_CDZ, AM_CMU, AM_COX, AM_COY, AM_COZ, AM_CTS, AM_DA,
                     AM_KAHN, AM_OCLOSE, AM_OMEGA, AM_OPIX, AM_OR, AM_POLAR, AM_ROWS, AM_STOL, AM_X, AM_Y, LP_NAB,
                     LP_NAC, LP_NBC, LP_SIZE, SQ_F, SQ_L, SQ_LH, SQ_LK, SQ_LL, SQ_LNA, SQ_LNB, SQ_LNC, SQ_ROWS, SQ_T,
                     F_grad, amorphous_lane_partials, aniso_monomials, bragg_weight_partials, bragg_weight_tangent,
                     capture_partials, lane_scratch, lane_sums, lattice_grad, omega_partials, orientation_lanes,
                     solid_angle_partials, square_partials, weight_partials)
from .physics import (SQUARE, amorphous_F_grad, amorphous_factor, amorphous_stol, polarization_grad,
                      signed_square, soa_hkl, sum_row)
from .pixel import add_term, apply_final, final_factor, oversampled_factor, specialise
from .scene import Layout, Scene, field_slice


# square_tangent's own scratch rows, after square_partials' (derivs.SQ_*)
_T_WX, _T_WY, _T_WZ, _T_DEF, _T_ORI = range(SQ_ROWS, SQ_ROWS + 5)
T_SCRATCH = SQ_ROWS + 5


@njit(cache=True, error_model="numpy", inline="always")
def square_tangent(qx, qy, qz, ori, nreal, S, s, fflat, dq, d, L, has_dori, base, flags, dI, sc, ibuf):
    """Tangents of one block's terms (parallelepiped, nearest F, no -oversample_* flags)
    of source ``s``, times the term's weight w (physics.bragg_weight).

    Adds d(w * sum of terms)/dtheta_p to dI[p] and returns w * the sum of terms.  The per-
    orientation work is done once (vectorised); each parameter then costs three dot
    products, plus nine more when it moves the orientations as C A_m (T_BASE: the block's
    dT/d(h, k, l) outer (h, k, l) is summed once for all such), else one vectorised pass.
    """
    n = ori.shape[1]
    xt = S.xtal
    fs = S.fhkl
    wp = bragg_weight_partials(S, s, qx, qy, qz)
    w = wp[0]
    square_partials(qx, qy, qz, ori, nreal, xt, fs, fflat, sc, ibuf)
    # dT/d(default_F) per orientation: 2 F F_latt^2 where F is the default, else 0
    if fs.has_hkls:
        for m in range(nreal):
            sc[_T_DEF, m] = 0.0 if ibuf[m] >= 0 else 1.0
    else:
        for m in range(nreal):
            sc[_T_DEF, m] = 1.0
    for m in range(nreal, n):
        sc[_T_DEF, m] = 0.0
    for m in range(n):
        F = sc[SQ_F, m]
        Lt = sc[SQ_L, m]
        c = 2.0 * F * F * Lt
        cA = c * sc[SQ_LH, m]
        cB = c * sc[SQ_LK, m]
        cC = c * sc[SQ_LL, m]
        sc[_T_WX, m] = cA * ori[0, m] + cB * ori[3, m] + cC * ori[6, m]
        sc[_T_WY, m] = cA * ori[1, m] + cB * ori[4, m] + cC * ori[7, m]
        sc[_T_WZ, m] = cA * ori[2, m] + cB * ori[5, m] + cC * ori[8, m]
        sc[SQ_LNA, m] = c * sc[SQ_LNA, m]
        sc[SQ_LNB, m] = c * sc[SQ_LNB, m]
        sc[SQ_LNC, m] = c * sc[SQ_LNC, m]
        sc[_T_DEF, m] = sc[_T_DEF, m] * 2.0 * F * Lt * Lt
        sc[SQ_LH, m] = cA
        sc[SQ_LK, m] = cB
        sc[SQ_LL, m] = cC
    Wx = sum_row(sc, _T_WX, n)
    Wy = sum_row(sc, _T_WY, n)
    Wz = sum_row(sc, _T_WZ, n)
    SNa = sum_row(sc, SQ_LNA, n)
    SNb = sum_row(sc, SQ_LNB, n)
    SNc = sum_row(sc, SQ_LNC, n)
    SD = sum_row(sc, _T_DEF, n)
    T = sum_row(sc, SQ_T, nreal)     # the forward's block sum, bit for bit
    npar = dI.shape[0]
    any_base = False
    for p in range(npar):
        any_base = any_base or (flags[p] & T_BASE) != 0
    # (nine scalars, not an array: this runs per block of every pixel)
    N0 = N1 = N2 = N3 = N4 = N5 = N6 = N7 = N8 = 0.0
    if any_base:
        for m in range(nreal):
            h, k, l = soa_hkl(ori, m, qx, qy, qz)
            gh = sc[SQ_LH, m]
            gk = sc[SQ_LK, m]
            gl = sc[SQ_LL, m]
            N0 += gh * h
            N1 += gh * k
            N2 += gh * l
            N3 += gk * h
            N4 += gk * k
            N5 += gk * l
            N6 += gl * h
            N7 += gl * k
            N8 += gl * l
    for p in range(npar):
        v = (dq[p, 0] * Wx + dq[p, 1] * Wy + dq[p, 2] * Wz + d[p, L.Na] * SNa + d[p, L.Nb] * SNb
             + d[p, L.Nc] * SNc + d[p, L.default_F] * SD)
        if (flags[p] & T_BASE) != 0:
            C = base[p]
            v += (C[0] * N0 + C[1] * N1 + C[2] * N2 + C[3] * N3 + C[4] * N4 + C[5] * N5 + C[6] * N6 + C[7] * N7
                  + C[8] * N8)
        elif has_dori[p]:
            # rows 3 i + j of d(orientations), each a contiguous run of n (scene.py's layout)
            o0 = L.orients
            a0 = d[p, o0:o0 + n]
            a1 = d[p, o0 + n:o0 + 2 * n]
            a2 = d[p, o0 + 2 * n:o0 + 3 * n]
            b0 = d[p, o0 + 3 * n:o0 + 4 * n]
            b1 = d[p, o0 + 4 * n:o0 + 5 * n]
            b2 = d[p, o0 + 5 * n:o0 + 6 * n]
            c0 = d[p, o0 + 6 * n:o0 + 7 * n]
            c1 = d[p, o0 + 7 * n:o0 + 8 * n]
            c2 = d[p, o0 + 8 * n:o0 + 9 * n]
            if nreal < 8:   # a few orientations: a plain loop beats a padded vector pass
                for m in range(nreal):
                    v += (sc[SQ_LH, m] * (a0[m] * qx + a1[m] * qy + a2[m] * qz)
                          + sc[SQ_LK, m] * (b0[m] * qx + b1[m] * qy + b2[m] * qz)
                          + sc[SQ_LL, m] * (c0[m] * qx + c1[m] * qy + c2[m] * qz))
            else:
                for m in range(n):
                    sc[_T_ORI, m] = (sc[SQ_LH, m] * (a0[m] * qx + a1[m] * qy + a2[m] * qz)
                                     + sc[SQ_LK, m] * (b0[m] * qx + b1[m] * qy + b2[m] * qz)
                                     + sc[SQ_LL, m] * (c0[m] * qx + c1[m] * qy + c2[m] * qz))
                v += sum_row(sc, _T_ORI, n)
        dI[p] += w * v + bragg_weight_tangent(wp, d, L, p, s, qx, qy, qz, dq) * T
    return w * T


# per-direction flags: which tangent inputs are non-zero (work for the others is skipped)
T_GEO = 1      # the sub-pixel positions move (detector vectors, distance, sub-pixel size)
T_SRC = 2      # source directions
T_LAM = 4      # wavelengths
T_OMEGA = 8    # pixel size / close distance (solid angle)
T_POL = 16     # Kahn factor or polarization axis
T_CAP = 32     # absorption (mu, layer spacing, odet)
T_BASE = 64    # every orientation moves as C A_m, one 3x3 C for all (orientation_tangents)

# how closely C A_m must give a direction's orientation tangents, relative to their largest
# entry, for T_BASE (the cell's and missetting's directions: within 1e-15; a mosaic
# spread's or an oscillation's: not at all)
BASE_TOLERANCE = 1e-12


def orientation_tangents(d, L, orients):
    """(flags, has_dori, base) for the tangent kernel's directions d (P, L.size): the
    :func:`tangent_flags`, whether each direction moves the orientations, and for those
    whose orientation tangents are C A_m for every orientation A_m (rows a, b, c) with one
    3x3 C -- a direction that moves the unrotated cell (the cell's edges and angles, the
    missetting, phi0) -- C (row-major in base[p]) and the flag T_BASE.  Then dh/dtheta =
    C (h, k, l) for every orientation, so the pixel walk's :func:`square_tangent` sums
    dT/d(h, k, l) outer (h, k, l) over a block's orientations once for all such directions
    instead of a pass over the orientations per direction."""
    flags = tangent_flags(d, L)
    P = d.shape[0]
    m = orients.shape[0]
    dA = d[:, L.orients:L.orients + 9 * L.npad].reshape(P, 3, 3, L.npad)[..., :m]
    has_dori = np.array([bool(np.any(dA[p] != 0)) for p in range(P)], dtype=np.bool_)
    base = np.zeros((P, 9))
    # [A_0 | A_1 | ...] and the same of a direction's tangents: C solves C A = dA
    A = np.ascontiguousarray(orients.transpose(1, 0, 2)).reshape(3, 3 * m)
    for p in range(P):
        if not has_dori[p] or not np.all(np.isfinite(dA[p])):
            continue
        dAp = np.ascontiguousarray(dA[p].transpose(0, 2, 1)).reshape(3, 3 * m)
        C = np.linalg.lstsq(A.T, dAp.T, rcond=None)[0].T
        if np.abs(C @ A - dAp).max() <= BASE_TOLERANCE * np.abs(dAp).max():
            base[p] = C.ravel()
            flags[p] |= T_BASE
    return flags, has_dori, base


def tangent_flags(d, L):
    """Bit flags per direction of a tangent (P, L.size) (see T_GEO ...)."""
    def moves(p, *names):
        return any(np.any(d[p, field_slice(L, n)] != 0) for n in names)
    P = d.shape[0]
    flags = np.zeros(P, dtype=np.int64)
    for p in range(P):
        f = 0
        if moves(p, "pix0", "fdet", "sdet", "odet", "beam", "subpixel", "thickstep", "distance"):
            f |= T_GEO
        if moves(p, "sources"):
            f |= T_SRC
        if moves(p, "lambdas"):
            f |= T_LAM
        if moves(p, "pixel", "close_distance"):
            f |= T_OMEGA
        if moves(p, "kahn", "polar_axis"):
            f |= T_POL
        if moves(p, "mu", "thickstep", "odet"):
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
def _position_jvp(fpixel, spixel, subF, subS, t, det, beam, d, L, flags, dP):
    """Tangents of the sub-pixel position for every direction (written to dP (P, 3))."""
    os = det.oversample
    sub = det.subpixel
    f = det.fdet
    sv = det.sdet
    o = det.odet
    cF = fpixel * os + subF + 0.5
    cS = spixel * os + subS + 0.5
    Fdet = sub * (fpixel * os + subF) + sub / 2.0
    Sdet = sub * (spixel * os + subS) + sub / 2.0
    Odet = t * det.thickstep
    npar = dP.shape[0]
    curved = det.curved
    D = det.distance
    b = beam.beam
    py = Fdet * f[1] + Sdet * sv[1] + Odet * o[1] + det.pix0[1]
    pz = Fdet * f[2] + Sdet * sv[2] + Odet * o[2] + det.pix0[2]
    for p in range(npar):
        if (flags[p] & T_GEO) == 0:
            continue
        dF = cF * d[p, L.subpixel]
        dS = cS * d[p, L.subpixel]
        dO = t * d[p, L.thickstep]
        for j in range(3):
            dP[p, j] = (d[p, L.pix0 + j] + Fdet * d[p, L.fdet + j] + dF * f[j] + Sdet * d[p, L.sdet + j]
                        + dS * sv[j] + Odet * d[p, L.odet + j] + dO * o[j])
        if curved:
            dD = d[p, L.distance]
            v0x = D * b[0]
            v0y = D * b[1]
            v0z = D * b[2]
            dv0x = dD * b[0] + D * d[p, L.beam]
            dv0y = dD * b[1] + D * d[p, L.beam + 1]
            dv0z = dD * b[2] + D * d[p, L.beam + 2]
            dphi1 = dP[p, 1] / D - py * dD / (D * D)
            dphi2 = dP[p, 2] / D - pz * dD / (D * D)
            v1x, v1y, v1z, dv1x, dv1y, dv1z = _rot_jvp(v0x, v0y, v0z, sv[0], sv[1], sv[2], py / D,
                                                        dv0x, dv0y, dv0z, d[p, L.sdet], d[p, L.sdet + 1],
                                                        d[p, L.sdet + 2], dphi1)
            _, _, _, tx, ty, tz = _rot_jvp(v1x, v1y, v1z, f[0], f[1], f[2], pz / D,
                                           dv1x, dv1y, dv1z, d[p, L.fdet], d[p, L.fdet + 1], d[p, L.fdet + 2], dphi2)
            dP[p, 0] = tx
            dP[p, 1] = ty
            dP[p, 2] = tz


class TangentWork(NamedTuple):
    """The tangent mode's state for one pixel: the directions d (P, L.size) and their
    tangents at each step of the walk (dP positions, dd directions and distance, dq
    scattering vectors, dI the sum, dom/dcap/dpol the factors, dm the multiplier, dbg the
    amorphous background's sum).

    The hooks get it as a plain tuple and read it by the W_* indices below: Numba's
    parallel loops, into which the tangent pixel is inlined, lose writes made through a
    named tuple's fields."""
    d: np.ndarray
    L: Layout
    flags: np.ndarray
    dP: np.ndarray
    dd: np.ndarray
    dq: np.ndarray
    dI: np.ndarray
    dom: np.ndarray
    dcap: np.ndarray
    dpol: np.ndarray
    dm: np.ndarray
    dbg: np.ndarray
    lp: np.ndarray
    pbuf: np.ndarray
    fidx: np.ndarray
    fw: np.ndarray
    fast: bool
    ori: np.ndarray
    fflat: np.ndarray
    has_dori: np.ndarray
    base: np.ndarray
    sc: np.ndarray
    ibuf: np.ndarray


(W_d, W_L, W_flags, W_dP, W_dd, W_dq, W_dI, W_dom, W_dcap, W_dpol, W_dm, W_dbg, W_lp, W_pbuf, W_fidx, W_fw, W_fast,
 W_ori, W_fflat, W_has_dori, W_base, W_sc, W_ibuf) = range(len(TangentWork._fields))


@njit(cache=True, error_model="numpy", inline="always")
def _t_begin(W, S, fpixel, spixel):
    d = W[W_d]
    for p in range(W[W_dI].shape[0]):
        W[W_dI][p] = d[p, W[W_L].I_bg]
        W[W_dom][p] = 0.0
        W[W_dcap][p] = 0.0
        W[W_dpol][p] = 0.0
        W[W_dbg][p] = 0.0
    return S.samp.I_bg, True


@njit(cache=True, error_model="numpy", inline="always")
def _t_amorphous(W, S, bg, s, sub, t, R, ix, iy, iz, dx, dy, dz, lam, qx, qy, qz, omega, capture):
    return bg + amorphous_tangents(S, s, t, R, ix, iy, iz, dx, dy, dz, lam, qx, qy, qz, omega, capture, W[W_d],
                                   W[W_L], W[W_flags], W[W_dd], W[W_dbg], W[W_pbuf])


@njit(cache=True, error_model="numpy", inline="always")
def amorphous_tangents(S, s, t, R, ix, iy, iz, dx, dy, dz, lam, qx, qy, qz, omega, capture, d, L, flags, dd, dbg,
                       pb):
    """An amorphous sample's value (the walk's amorphous_term, bit for bit), its tangents
    added to dbg (P): in the materials' amounts, and through sin(theta)/lambda, the
    sub-pixel's solid angle and capture fraction, the polarization and the source's
    weight; dd (P, 4) the direction's and distance's tangents (0 for the directions that
    do not move the sub-pixel), pb scratch of 10.  The walk's hook; the row lanes take the
    same across their lanes (:func:`_amorphous_lanes_tangent`)."""
    samp = S.samp
    det = S.det
    beam = S.beam
    stol = amorphous_stol(qx, qy, qz)
    factor = amorphous_factor(S, s, ix, iy, iz, dx, dy, dz, omega, capture)
    acc = np.float64(0.0)        # amorphous_sum's sum, term for term
    dA = 0.0
    for m in range(samp.bg_amount.shape[0]):
        F, dF = amorphous_F_grad(samp, m, stol)              # F: the forward's, bit for bit
        sF2 = signed_square(F)
        a = factor * sF2
        for p in range(dbg.shape[0]):
            dbg[p] += a * d[p, L.bg_amount + m]
        acc += np.float64(samp.bg_amount[m]) * np.float64(sF2)
        dA += samp.bg_amount[m] * 2.0 * abs(F) * dF
    A = acc
    polar = 1.0
    if not beam.nopolar:
        pv = beam.polar_axis
        polar = polarization_grad(beam.kahn, ix, iy, iz, dx, dy, dz, pv[0], pv[1], pv[2], pb)
    w = beam.weights[s]
    oR, opix, oclose = omega_partials(R, det, omega)
    cdx = cdy = cdz = cox = coy = coz = cts = cmu = 0.0
    if det.thick != 0.0:
        cap, cdx, cdy, cdz, cox, coy, coz, cts, cmu = capture_partials(t, dx, dy, dz, det)
    so = L.sources + 3 * s
    for p in range(dbg.shape[0]):
        f = flags[p]
        v = d[p, L.weights + s] * (polar * omega * capture)
        if (f & (T_GEO | T_SRC | T_LAM)) != 0 and stol > 0.0:
            dlam = d[p, L.lambdas + s]
            dqx = (dd[p, 0] + d[p, so] - qx * dlam) / lam
            dqy = (dd[p, 1] + d[p, so + 1] - qy * dlam) / lam
            dqz = (dd[p, 2] + d[p, so + 2] - qz * dlam) / lam
            dbg[p] += factor * dA * (qx * dqx + qy * dqy + qz * dqz) / (4.0 * stol)
        if (f & (T_GEO | T_OMEGA)) != 0:
            v += (oR * dd[p, 3] + opix * d[p, L.pixel] + oclose * d[p, L.close_distance]) * (polar * w * capture)
        if det.thick != 0.0 and (f & (T_GEO | T_CAP)) != 0:
            v += (cdx * dd[p, 0] + cdy * dd[p, 1] + cdz * dd[p, 2] + cox * d[p, L.odet] + coy * d[p, L.odet + 1]
                  + coz * d[p, L.odet + 2] + cts * d[p, L.thickstep] + cmu * d[p, L.mu]) * (polar * omega * w)
        if not beam.nopolar and (f & (T_GEO | T_SRC | T_POL)) != 0:
            v += (pb[0] * d[p, L.kahn] - pb[1] * d[p, so] - pb[2] * d[p, so + 1] - pb[3] * d[p, so + 2]
                  + pb[4] * dd[p, 0] + pb[5] * dd[p, 1] + pb[6] * dd[p, 2] + pb[7] * d[p, L.polar_axis]
                  + pb[8] * d[p, L.polar_axis + 1] + pb[9] * d[p, L.polar_axis + 2]) * (omega * w * capture)
        dbg[p] += v * A
    return factor * acc


@njit(cache=True, error_model="numpy", inline="always")
def _t_layer(W, S, t):
    for p in range(W[W_dcap].shape[0]):
        W[W_dcap][p] = 0.0


@njit(cache=True, error_model="numpy", inline="always")
def _t_subpixel(W, S, fpixel, spixel, subF, subS, t, px, py, pz, R, dx, dy, dz):
    dP = W[W_dP]
    dd = W[W_dd]
    flags = W[W_flags]
    _position_jvp(fpixel, spixel, subF, subS, t, S.det, S.beam, W[W_d], W[W_L], flags, dP)
    for p in range(dP.shape[0]):
        if (flags[p] & T_GEO) == 0:
            continue
        dR = dx * dP[p, 0] + dy * dP[p, 1] + dz * dP[p, 2]
        dd[p, 0] = (dP[p, 0] - dx * dR) / R
        dd[p, 1] = (dP[p, 1] - dy * dR) / R
        dd[p, 2] = (dP[p, 2] - dz * dR) / R
        dd[p, 3] = dR


@njit(cache=True, error_model="numpy", inline="always")
def _t_omega(W, S, R, omega, sub):
    d = W[W_d]
    L = W[W_L]
    oR, opix, oclose = omega_partials(R, S.det, omega)
    for p in range(W[W_dom].shape[0]):
        if (W[W_flags][p] & (T_GEO | T_OMEGA)) != 0:
            W[W_dom][p] = oR * W[W_dd][p, 3] + opix * d[p, L.pixel] + oclose * d[p, L.close_distance]


@njit(cache=True, error_model="numpy", inline="always")
def _t_capture(W, S, t, dx, dy, dz, capture, sub):
    d = W[W_d]
    L = W[W_L]
    dd = W[W_dd]
    cap, cdx, cdy, cdz, cox, coy, coz, cts, cmu = capture_partials(t, dx, dy, dz, S.det)
    for p in range(W[W_dcap].shape[0]):
        if (W[W_flags][p] & (T_GEO | T_CAP)) == 0:
            continue
        W[W_dcap][p] = (cdx * dd[p, 0] + cdy * dd[p, 1] + cdz * dd[p, 2] + cox * d[p, L.odet]
                     + coy * d[p, L.odet + 1] + coz * d[p, L.odet + 2] + cts * d[p, L.thickstep]
                     + cmu * d[p, L.mu])


@njit(cache=True, error_model="numpy", inline="always")
def _t_source(W, S, s, dx, dy, dz, qx, qy, qz, lam):
    d = W[W_d]
    L = W[W_L]
    dd = W[W_dd]
    dq = W[W_dq]
    for p in range(dq.shape[0]):
        if (W[W_flags][p] & (T_GEO | T_SRC | T_LAM)) == 0:
            continue
        dlam = d[p, L.lambdas + s]
        dq[p, 0] = (dd[p, 0] + d[p, L.sources + 3 * s] - qx * dlam) / lam
        dq[p, 1] = (dd[p, 1] + d[p, L.sources + 3 * s + 1] - qy * dlam) / lam
        dq[p, 2] = (dd[p, 2] + d[p, L.sources + 3 * s + 2] - qz * dlam) / lam


@njit(cache=True, error_model="numpy", inline="always")
def _t_polar(W, S, s, ix, iy, iz, dx, dy, dz, sub):
    d = W[W_d]
    L = W[W_L]
    dd = W[W_dd]
    pb = W[W_pbuf]
    pv = S.beam.polar_axis
    polar = polarization_grad(S.beam.kahn, ix, iy, iz, dx, dy, dz, pv[0], pv[1], pv[2], pb)
    so = L.sources + 3 * s
    for p in range(W[W_dpol].shape[0]):
        if (W[W_flags][p] & (T_GEO | T_SRC | T_POL)) == 0:
            continue
        W[W_dpol][p] = (pb[0] * d[p, L.kahn] - pb[1] * d[p, so] - pb[2] * d[p, so + 1] - pb[3] * d[p, so + 2]
                     + pb[4] * dd[p, 0] + pb[5] * dd[p, 1] + pb[6] * dd[p, 2] + pb[7] * d[p, L.polar_axis]
                     + pb[8] * d[p, L.polar_axis + 1] + pb[9] * d[p, L.polar_axis + 2])
    return polar


@njit(cache=True, error_model="numpy", inline="always")
def _t_block(W, S, I, qx, qy, qz, capture, polar, omega, t, subS, subF, s, sub):
    """Terms and their tangents; with -oversample_* flags I = (I + T) m after each term,
    m the product of the oversampled factors."""
    xt = S.xtal
    fs = S.fhkl
    orients = xt.orients
    norient = orients.shape[0]
    d = W[W_d]
    L = W[W_L]
    dq = W[W_dq]
    dI = W[W_dI]
    lp = W[W_lp]
    npar = dI.shape[0]
    if W[W_fast]:
        return I + square_tangent(qx, qy, qz, W[W_ori], norient, S, s, W[W_fflat], dq, d, L, W[W_has_dori],
                                  W[W_base], W[W_flags], dI, W[W_sc], W[W_ibuf])
    samp = S.samp
    os_thick = samp.os_thick
    os_polar = samp.os_polar
    os_omega = samp.os_omega
    m = oversampled_factor(S.samp, capture, polar, omega)
    dm = W[W_dm]
    for p in range(npar):
        v = 0.0
        if os_thick:
            v += W[W_dcap][p] * (polar if os_polar else 1.0) * (omega if os_omega else 1.0)
        if os_polar:
            v += W[W_dpol][p] * (capture if os_thick else 1.0) * (omega if os_omega else 1.0)
        if os_omega:
            v += W[W_dom][p] * (capture if os_thick else 1.0) * (polar if os_polar else 1.0)
        dm[p] = v
    npad = L.npad
    wp = bragg_weight_partials(S, s, qx, qy, qz)
    w = wp[0]
    for o in range(norient):
        # the value is the forward's term, bit for bit; the derivatives come from the _grad
        # twins, whose F_latt carries the sign that goes with their partials
        h, k, l, h0, k0, l0, _, _, counted, T = term(orients, o, qx, qy, qz, S, s)
        if not counted:
            continue
        Lt = lattice_grad(h, k, l, h0, k0, l0, xt, lp)
        F, Fh, Fk, Fl, nidx, Fdef, FU = F_grad(h, k, l, h0, k0, l0, fs, W[W_fidx], W[W_fw])
        T0 = F * F * Lt * Lt
        aL = 2.0 * w * F * F * Lt
        aF = 2.0 * w * F * Lt * Lt
        oo = L.orients + o
        for p in range(npar):
            dh = (d[p, oo] * qx + d[p, oo + npad] * qy + d[p, oo + 2 * npad] * qz
                  + orients[o, 0, 0] * dq[p, 0] + orients[o, 0, 1] * dq[p, 1] + orients[o, 0, 2] * dq[p, 2])
            dk = (d[p, oo + 3 * npad] * qx + d[p, oo + 4 * npad] * qy + d[p, oo + 5 * npad] * qz
                  + orients[o, 1, 0] * dq[p, 0] + orients[o, 1, 1] * dq[p, 1] + orients[o, 1, 2] * dq[p, 2])
            dl = (d[p, oo + 6 * npad] * qx + d[p, oo + 7 * npad] * qy + d[p, oo + 8 * npad] * qz
                  + orients[o, 2, 0] * dq[p, 0] + orients[o, 2, 1] * dq[p, 1] + orients[o, 2, 2] * dq[p, 2])
            dL = (lp[0] * dh + lp[1] * dk + lp[2] * dl + lp[3] * d[p, L.Na] + lp[4] * d[p, L.Nb]
                  + lp[5] * d[p, L.Nc] + lp[6] * d[p, L.fudge])
            if xt.shape != SQUARE:
                for j in range(9):
                    dL += lp[7 + j] * d[p, L.recip + j]
                dL += lp[LP_NAB] * d[p, L.N_ab] + lp[LP_NAC] * d[p, L.N_ac] + lp[LP_NBC] * d[p, L.N_bc]
            dF = Fh * dh + Fk * dk + Fl * dl + Fdef * d[p, L.default_F]
            if fs.aniso:
                for j in range(6):
                    dF += FU * aniso_monomials(h, k, l, j) * d[p, L.beta + j]
            dT = aL * dL + aF * dF + bragg_weight_tangent(wp, d, L, p, s, qx, qy, qz, dq) * T0
            if samp.physical:
                dI[p] += dT * m + T * dm[p]
            else:
                dI[p] = (dI[p] + dT) * m + (I + T) * dm[p]
        I = add_term(I, T, samp, capture, polar, omega)
    return I


@njit(cache=True, error_model="numpy", inline="always")
def _t_finish(W, S, I, capture, polar, omega, omega_sum, bg):
    """The factors applied once at the end, and their tangents."""
    samp = S.samp
    os_thick = samp.os_thick
    os_polar = samp.os_polar
    os_omega = samp.os_omega
    post = final_factor(S.samp, capture, polar, omega)
    dI = W[W_dI]
    for p in range(dI.shape[0]):
        v = dI[p] * post
        if not os_thick:
            v += I * W[W_dcap][p] * (1.0 if os_polar else polar) * (1.0 if os_omega else omega)
        if not os_polar:
            v += I * W[W_dpol][p] * (1.0 if os_thick else capture) * (1.0 if os_omega else omega)
        if not os_omega:
            v += I * W[W_dom][p] * (1.0 if os_thick else capture) * (1.0 if os_polar else polar)
        dI[p] = v + W[W_dbg][p]
    return apply_final(samp, I, capture, polar, omega) + bg


walk_tangent = specialise("tangent", begin=_t_begin, layer=_t_layer, subpixel=_t_subpixel, omega_taken=_t_omega,
                          capture_taken=_t_capture, source=_t_source, polarization=_t_polar,
                          amorphous=_t_amorphous, block=_t_block, finish=_t_finish)


@njit(cache=True, error_model="numpy", inline="always")
def pixel_tangent(fpixel, spixel, S, d, L, dP, dd, dq, dI, dom, dcap, dpol, dm, dbg, lp, pbuf, fidx, fw,
                  fast, ori, fflat, has_dori, base, flags, sc, ibuf):
    """Value (unscaled) of one pixel; its tangents along the directions d (P, L.size)
    are left in dI (P).  The walk of :mod:`.pixel` with the tangent hooks above.

    ``fast``: blocks go through :func:`square_tangent` (CPU vector loops), as in
    :func:`~nbragg.kernels.cpu.pixel_value`."""
    W = (d, L, flags, dP, dd, dq, dI, dom, dcap, dpol, dm, dbg, lp, pbuf, fidx, fw, fast, ori, fflat, has_dori, base,
         sc, ibuf)
    return walk_tangent(fpixel, spixel, S, W)


@njit(parallel=True, cache=True, error_model="numpy")
def tangent(det, beam, xtal, fhkl, samp, d, L, scale, has_dori, base, flags, J, image, lanes):
    """J[s, f, p] = d(scaled image)/d(theta_p) for the directions d (P, L.size) in the
    layout L (``flags``, ``has_dori``, ``base``: :func:`orientation_tangents`); ``image``
    receives the scaled image.  ``lanes``: rows take
    :func:`_tangent_row_lanes` where :func:`~nbragg.kernels.cpu.derivative_row_path` allows
    (False: every pixel walks, as the tests' reference does).  (The scene comes block by block,
    as in :func:`~nbragg.kernels.cpu.forward`.)"""
    spixels, fpixels = image.shape
    xmin, xmax, ymin, ymax = clipped_roi(det, spixels, fpixels)
    ori = orientations_soa(xtal.orients)
    fflat = fhkl.grid.ravel()
    fast = fast_path(Scene(det, beam, xtal, fhkl, samp))
    lanes = lanes and derivative_row_path(Scene(det, beam, xtal, fhkl, samp))
    for spixel in prange(ymin, ymax + 1):
        if lanes:
            _tangent_row_lanes(Scene(det, beam, xtal, fhkl, samp), spixel, xmin, xmax, d, L, scale, has_dori, flags,
                               ori, fflat, J, image)
        else:
            _tangent_row(Scene(det, beam, xtal, fhkl, samp), spixel, xmin, xmax, d, L, scale, has_dori, base, flags,
                         fast, ori, fflat, J, image)


@njit(cache=True, error_model="numpy", inline="always")
def _tangent_row(S, spixel, xmin, xmax, d, L, scale, has_dori, base, flags, fast, ori, fflat, J, image):
    """One row of the tangent kernel (a call per row: see cpu._forward_row)."""
    use_mask = S.det.use_mask
    mask = S.det.mask
    npar = d.shape[0]
    npad = ori.shape[1]
    sc = np.empty((T_SCRATCH, npad))
    ibuf = np.empty(npad, dtype=np.int64)
    dP = np.zeros((npar, 3))
    dd = np.zeros((npar, 4))
    dq = np.zeros((npar, 3))
    dI = np.empty(npar)
    dom = np.empty(npar)
    dcap = np.empty(npar)
    dpol = np.empty(npar)
    dm = np.empty(npar)
    dbg = np.empty(npar)
    lp = np.empty(LP_SIZE)
    pbuf = np.empty(10)
    fidx = np.empty(64, dtype=np.int64)
    fw = np.empty(64)
    for fpixel in range(xmin, xmax + 1):
        if use_mask and mask[spixel, fpixel] == 0:
            continue
        v = pixel_tangent(fpixel, spixel, S, d, L, dP, dd, dq, dI, dom, dcap, dpol, dm, dbg, lp, pbuf, fidx, fw,
                          fast, ori, fflat, has_dori, base, flags, sc, ibuf)
        image[spixel, fpixel] = v * scale
        for p in range(npar):
            J[spixel, fpixel, p] = scale * dI[p] + d[p, L.scale] * v


@njit(cache=True, error_model="numpy")
def _direction_tangents_flat(det, spixel, xmin, n, subF, subS, t, d, L, flags, R, dx, dy, dz, dd):
    """dd[p, :, x]: the tangents of the unit direction and distance of sub-pixel (subF,
    subS) in layer t for the pixels xmin.. of row spixel of a flat detector, for the
    directions that move the geometry (:func:`_position_jvp` and ``_t_subpixel``, one
    loop over the pixels per direction: the position's tangent is affine in the pixel's
    fast coordinate)."""
    os = det.oversample
    sub = det.subpixel
    f = det.fdet
    sv = det.sdet
    o = det.odet
    cS = spixel * os + subS + 0.5
    Sdet = sub * (spixel * os + subS) + sub / 2.0
    Odet = t * det.thickstep
    for p in range(d.shape[0]):
        if (flags[p] & T_GEO) == 0:
            continue
        dsub = d[p, L.subpixel]
        dS = cS * dsub
        dO = t * d[p, L.thickstep]
        # the parts that do not depend on the pixel's fast coordinate
        a0 = d[p, L.pix0] + Sdet * d[p, L.sdet] + dS * sv[0] + Odet * d[p, L.odet] + dO * o[0]
        a1 = d[p, L.pix0 + 1] + Sdet * d[p, L.sdet + 1] + dS * sv[1] + Odet * d[p, L.odet + 1] + dO * o[1]
        a2 = d[p, L.pix0 + 2] + Sdet * d[p, L.sdet + 2] + dS * sv[2] + Odet * d[p, L.odet + 2] + dO * o[2]
        b0 = d[p, L.fdet]
        b1 = d[p, L.fdet + 1]
        b2 = d[p, L.fdet + 2]
        c0 = dsub * f[0]
        c1 = dsub * f[1]
        c2 = dsub * f[2]
        for x in range(n):
            col = (xmin + x) * os + subF
            Fdet = sub * col + sub / 2.0
            cF = col + 0.5
            P0 = a0 + Fdet * b0 + cF * c0
            P1 = a1 + Fdet * b1 + cF * c1
            P2 = a2 + Fdet * b2 + cF * c2
            dR = dx[x] * P0 + dy[x] * P1 + dz[x] * P2
            dd[p, 0, x] = (P0 - dx[x] * dR) / R[x]
            dd[p, 1, x] = (P1 - dy[x] * dR) / R[x]
            dd[p, 2, x] = (P2 - dz[x] * dR) / R[x]
            dd[p, 3, x] = dR


@njit(cache=True, error_model="numpy")
def _tangent_row_lanes(S, spixel, xmin, xmax, d, L, scale, has_dori, flags, ori, fflat, J, image):
    """One row of the tangent kernel in the :func:`~nbragg.kernels.cpu.derivative_row_path` case,
    its pixels as vector lanes (in chunks whose orientation partials fit in a core's cache):
    see :func:`_tangent_lanes`."""
    norient = S.xtal.orients.shape[0]
    any_dori = False
    for p in range(d.shape[0]):
        any_dori = any_dori or has_dori[p]
    width = xmax - xmin + 1
    if width <= 0:
        return
    if any_dori:
        width = lane_chunk(width, norient)
    for x0 in range(xmin, xmax + 1, width):
        _tangent_lanes(S, spixel, x0, min(x0 + width - 1, xmax), d, L, scale, has_dori, any_dori, flags, ori, fflat,
                       J, image)


@njit(cache=True, error_model="numpy", inline="always")
def _frame_tangents(d, p, L, so, ix, iy, iz, pv, Bx, By, Bz, bm, Ex, Ey, Ez, em, framed):
    """Direction p's tangents of a source's incident direction i (its row at ``so``) and
    of its polarization frame B, E (physics.polarization_frame; 0 where it is not
    ``framed``): (di (3), dB (3), dE (3))."""
    dix = -d[p, so]
    diy = -d[p, so + 1]
    diz = -d[p, so + 2]
    dBx = dBy = dBz = dEx = dEy = dEz = 0.0
    if framed:
        dBx, dBy, dBz, dEx, dEy, dEz = polarization_frame_jvp(ix, iy, iz, pv[0], pv[1], pv[2], Bx, By, Bz, bm, Ex, Ey,
                                                              Ez, em, dix, diy, diz, d[p, L.polar_axis],
                                                              d[p, L.polar_axis + 1], d[p, L.polar_axis + 2])
    return dix, diy, diz, dBx, dBy, dBz, dEx, dEy, dEz


@njit(cache=True, error_model="numpy", inline="always")
def _polarization_tangent(pk, pc, pX, pY, dk, dix, diy, diz, dBx, dBy, dBz, dEx, dEy, dEz, ix, iy, iz, Bx, By, Bz,
                          Ex, Ey, Ez, dx, dy, dz, ddx, ddy, ddz):
    """A lane's polarization tangent from its partials (physics.polarization_parts: in
    kahn, i.d, d.E, d.B), the tangents of kahn, i, B and E (:func:`_frame_tangents`) and
    of its direction d (dd): no calls, so loops over the lanes vectorise."""
    return (pk * dk
            + pc * (dix * dx + diy * dy + diz * dz + ix * ddx + iy * ddy + iz * ddz)
            + pX * (dEx * dx + dEy * dy + dEz * dz + Ex * ddx + Ey * ddy + Ez * ddz)
            + pY * (dBx * dx + dBy * dy + dBz * dz + Bx * ddx + By * ddy + Bz * ddz))


# rows of _amorphous_lanes_tangent's per-lane scratch after those of the factors'
# partials (derivs.amorphous_lane_partials)
TB_FACTOR, TB_CQ, TB_V = range(AM_ROWS, AM_ROWS + 3)
TB_ROWS = AM_ROWS + 3


@njit(cache=True, error_model="numpy")
def _amorphous_lanes_tangent(S, s, t, n, d, L, flags, R, dx, dy, dz, qx, qy, qz, dd, dq, bg, dbg, sq, redo, w):
    """The amorphous samples of source s at one sub-pixel of layer t of n lanes (R, d and
    q: their distances, directions and scattering vectors): :func:`amorphous_tangents`
    across the lanes, in loops over them.  Adds each lane's value to ``bg`` (the forward's bit for bit) and its
    tangents to ``dbg`` (P, n).  ``dd`` (P, 4, n): the directions' tangents of the lanes'
    directions and distances (rows of zeros for the directions that do not move them);
    ``dq`` (P, 3, n): of their scattering vectors, on the rows of the directions that move
    them (T_GEO, T_SRC, T_LAM); unlike the Bragg terms' loops it reads dd's zero rows
    rather than a row of zeros of its own.  ``sq`` (materials, n), ``redo`` (n) and ``w``
    (TB_ROWS, n) are scratch."""
    det = S.det
    beam = S.beam
    ix = -beam.sources[s, 0]
    iy = -beam.sources[s, 1]
    iz = -beam.sources[s, 2]
    ws = beam.weights[s]
    pv = beam.polar_axis
    so = L.sources + 3 * s
    Bx, By, Bz, bm, Ex, Ey, Ez, em, framed = amorphous_lane_partials(S, s, t, n, R, dx, dy, dz, qx, qy, qz, w, sq,
                                                                      redo)
    stol = w[AM_STOL]
    omega = w[AM_OMEGA]
    polar = w[AM_POLAR]
    capture = w[AM_CAPTURE]
    A = w[AM_A]
    dA = w[AM_DA]
    factor = w[TB_FACTOR]
    cq = w[TB_CQ]
    v = w[TB_V]
    for x in range(n):
        factor[x] = polar[x] * omega[x] * ws * capture[x]      # (amorphous_weight's product)
        bg[x] += factor[x] * A[x]
        c = factor[x] * dA[x] / (4.0 * stol[x])
        cq[x] = c if stol[x] > 0.0 else 0.0
    for p in range(d.shape[0]):
        f = flags[p]
        dbp = dbg[p]
        for m in range(sq.shape[0]):
            a = d[p, L.bg_amount + m]
            if a != 0.0:
                sqm = sq[m]
                for x in range(n):
                    dbp[x] += factor[x] * sqm[x] * a
        # the factors' tangents, times the materials' sum at the end
        dw = d[p, L.weights + s]
        for x in range(n):
            v[x] = dw * (polar[x] * omega[x] * capture[x])
        ddp = dd[p]
        if (f & (T_GEO | T_SRC | T_LAM)) != 0:
            dqp = dq[p]
            for x in range(n):
                dbp[x] += cq[x] * (qx[x] * dqp[0, x] + qy[x] * dqp[1, x] + qz[x] * dqp[2, x])
        if (f & (T_GEO | T_OMEGA)) != 0:
            dpix = d[p, L.pixel]
            dclose = d[p, L.close_distance]
            for x in range(n):
                v[x] += ((w[AM_OR, x] * ddp[3, x] + w[AM_OPIX, x] * dpix + w[AM_OCLOSE, x] * dclose)
                         * (polar[x] * ws * capture[x]))
        if det.thick != 0.0 and (f & (T_GEO | T_CAP)) != 0:
            do0 = d[p, L.odet]
            do1 = d[p, L.odet + 1]
            do2 = d[p, L.odet + 2]
            dts = d[p, L.thickstep]
            dmu = d[p, L.mu]
            for x in range(n):
                v[x] += ((w[AM_CDX, x] * ddp[0, x] + w[AM_CDY, x] * ddp[1, x] + w[AM_CDZ, x] * ddp[2, x]
                          + w[AM_COX, x] * do0 + w[AM_COY, x] * do1 + w[AM_COZ, x] * do2 + w[AM_CTS, x] * dts
                          + w[AM_CMU, x] * dmu) * (polar[x] * omega[x] * ws))
        if not beam.nopolar and (f & (T_GEO | T_SRC | T_POL)) != 0:
            dk = d[p, L.kahn]
            dix, diy, diz, dBx, dBy, dBz, dEx, dEy, dEz = _frame_tangents(d, p, L, so, ix, iy, iz, pv, Bx, By, Bz, bm,
                                                                          Ex, Ey, Ez, em, framed)
            for x in range(n):
                dpol = _polarization_tangent(w[AM_KAHN, x], w[AM_C2, x], w[AM_X, x], w[AM_Y, x], dk, dix, diy, diz,
                                             dBx, dBy, dBz, dEx, dEy, dEz, ix, iy, iz, Bx, By, Bz, Ex, Ey, Ez, dx[x],
                                             dy[x], dz[x], ddp[0, x], ddp[1, x], ddp[2, x])
                v[x] += dpol * (omega[x] * ws * capture[x])
        for x in range(n):
            dbp[x] += v[x] * A[x]


@njit(cache=True, error_model="numpy")
def _tangent_lanes(S, spixel, xmin, xmax, d, L, scale, has_dori, any_dori, flags, ori, fflat, J, image):
    """Pixels xmin..xmax of row spixel: the tangent walk (``_t_*`` hooks, square blocks)
    with the sample loop outside and the pixel loop inside, as the forward's row lanes
    (whose image it gives bit for bit).

    The orientations are where the work is, so their loops make no calls and carry no
    direction index: each block adds, per pixel, w dT/dq (W*), w dT/dN (SN*), w dT/dF
    (SD), and per orientation m, w (dT/dh, dT/dk, dT/dl) outer q (O); the directions'
    tangents of q are contracted with W* per block, those of N, F and the orientations
    with the sums once, at the end.  The pixel factors and the geometry's tangents
    (scalar loops over the pixels) are taken where the walk takes them, and so is an
    amorphous background (:func:`_amorphous_lanes_tangent`, in loops over the lanes).
    (The T_BASE directions take O here too: summing dT/d(h, k, l) outer (h, k, l) instead, as
    :func:`square_tangent` does, costs these loops as much per term as O, measured on B2,
    and O's contraction is once per pixel.)"""
    det = S.det
    beam = S.beam
    xt = S.xtal
    fs = S.fhkl
    samp = S.samp
    n = xmax - xmin + 1
    if n <= 0:
        return
    P = d.shape[0]
    npad = ori.shape[1]
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
    geo = False        # some direction moves the sub-pixels
    moves_q = False    # ... or the sources or wavelengths
    for p in range(P):
        geo = geo or (flags[p] & T_GEO) != 0
        moves_q = moves_q or (flags[p] & (T_GEO | T_SRC | T_LAM)) != 0
    I = np.empty(n)
    nbg = samp.bg_amount.shape[0]
    bg = np.zeros(n)                      # the amorphous background (as the walk's, see the forward's lanes)
    dbg = np.zeros((P, n))                # ... and its tangents
    bgsq = np.empty((nbg, n))             # (_amorphous_lanes_tangent's scratch)
    redo = np.empty(n, dtype=np.bool_)
    bgw = np.zeros((TB_ROWS if nbg > 0 else 0, n))
    # (rows a little longer than n: with n a power of two, every row's value of a pixel
    # would fall in one set of the first-level cache, which the final store reads across)
    dI = np.empty((P, n + 8))
    omega = np.zeros(n)
    capture = np.empty(n)
    polar = np.empty(n)
    # the factors' tangents and the directions' (rows of the directions that move them
    # only: the others read zrow, zero4)
    dom = np.empty((P, n))
    dcap = np.empty((P, n))
    dpol = np.empty((P, n))
    zrow = np.zeros(n)
    zero4 = np.zeros((4, n))
    R = np.empty(n)
    dx = np.empty(n)
    dy = np.empty(n)
    dz = np.empty(n)
    qx = np.empty(n)
    qy = np.empty(n)
    qz = np.empty(n)
    keep = np.empty(n, dtype=np.bool_)
    w = np.empty(n)          # the block's weight, 0 where -dmin cuts it
    dws = np.empty(n)        # bragg_weight_partials
    dwB = np.empty(n)
    cwq = np.empty(n)
    dd = np.zeros((P, 4, n))     # (rows of the directions that do not move the sub-pixels: 0)
    dq = np.empty((P, 3, n))
    dP1 = np.zeros((P, 3))
    Tk = np.empty(n)         # the block's sum where kept, else 0
    sc = lane_scratch(n, fs.default_F)
    sums = lane_sums(n, norient if any_dori else 0, True)
    no_gor = np.empty((0, 0))
    acc = sums.acc
    Wx = sums.Wx
    Wy = sums.Wy
    Wz = sums.Wz
    no_gF = np.empty(0)
    polar0 = 1.0 if beam.nopolar else 0.0
    pending = 0 if beam.nopolar else n      # lanes whose polarization is still to be taken
    om_pending = False                      # ... whose solid angle is (0 at the first sub-pixel)
    fresh = np.empty(n, dtype=np.bool_)
    pk = np.empty(n)         # polarization_parts
    pc = np.empty(n)
    pX = np.empty(n)
    pY = np.empty(n)
    oR = np.empty(n)         # solid_angle_partials
    opix = np.empty(n)
    oclose = np.empty(n)
    for p in range(P):
        if (flags[p] & (T_GEO | T_SRC | T_POL)) != 0:
            dpol[p, :] = 0.0
    for x in range(n):
        I[x] = samp.I_bg
        polar[x] = polar0
    for p in range(P):
        dI[p, :] = d[p, L.I_bg]
    for t in range(det.thicksteps):
        capture0 = 1.0 if det.thick == 0.0 else 0.0
        for x in range(n):
            capture[x] = capture0
        if capture0 == 0.0:
            for p in range(P):
                if (flags[p] & (T_GEO | T_CAP)) != 0:
                    dcap[p, :] = 0.0
        for subS in range(os):
            for subF in range(os):
                first_sub = t == 0 and subS == 0 and subF == 0
                lane_directions(det, beam, spixel, xmin, n, subF, subS, t, R, dx, dy, dz)
                if geo and not det.curved:
                    _direction_tangents_flat(det, spixel, xmin, n, subF, subS, t, d, L, flags, R, dx, dy, dz, dd)
                elif geo:
                    for x in range(n):
                        _position_jvp(xmin + x, spixel, subF, subS, t, det, beam, d, L, flags, dP1)
                        for p in range(P):
                            if (flags[p] & T_GEO) == 0:
                                continue
                            dR = dx[x] * dP1[p, 0] + dy[x] * dP1[p, 1] + dz[x] * dP1[p, 2]
                            dd[p, 0, x] = (dP1[p, 0] - dx[x] * dR) / R[x]
                            dd[p, 1, x] = (dP1[p, 1] - dy[x] * dR) / R[x]
                            dd[p, 2, x] = (dP1[p, 2] - dz[x] * dR) / R[x]
                            dd[p, 3, x] = dR
                if first_sub:
                    # the solid angle where the walk takes it: at the first sub-pixel, and
                    # again at the next where it is 0 there
                    for x in range(n):
                        omega[x] = pixel_solid_angle(R[x], pixel, close_distance, point_pixel)
                        oR[x], opix[x], oclose[x] = solid_angle_partials(R[x], pixel, close_distance, point_pixel,
                                                                         omega[x])
                    for p in range(P):
                        if (flags[p] & (T_GEO | T_OMEGA)) != 0:
                            ddp = dd[p] if (flags[p] & T_GEO) != 0 else zero4
                            dpix = d[p, L.pixel]
                            dclose = d[p, L.close_distance]
                            for x in range(n):
                                dom[p, x] = oR[x] * ddp[3, x] + opix[x] * dpix + oclose[x] * dclose
                elif om_pending:
                    for x in range(n):
                        if omega[x] == 0.0:
                            omega[x] = pixel_solid_angle(R[x], pixel, close_distance, point_pixel)
                            a, b, c = solid_angle_partials(R[x], pixel, close_distance, point_pixel, omega[x])
                            for p in range(P):
                                if (flags[p] & (T_GEO | T_OMEGA)) != 0:
                                    ddp = dd[p] if (flags[p] & T_GEO) != 0 else zero4
                                    dom[p, x] = a * ddp[3, x] + b * d[p, L.pixel] + c * d[p, L.close_distance]
                om_pending = False
                for x in range(n):
                    om_pending = om_pending or omega[x] == 0.0
                if capture0 == 0.0:
                    for x in range(n):
                        if capture[x] == 0.0:
                            capture[x] = capture_fraction(t, dx[x], dy[x], dz[x], det)
                            _, cdx, cdy, cdz, cox, coy, coz, cts, cmu = capture_partials(t, dx[x], dy[x], dz[x], det)
                            for p in range(P):
                                if (flags[p] & (T_GEO | T_CAP)) != 0:
                                    ddp = dd[p] if (flags[p] & T_GEO) != 0 else zero4
                                    dcap[p, x] = (cdx * ddp[0, x] + cdy * ddp[1, x] + cdz * ddp[2, x]
                                                  + cox * d[p, L.odet] + coy * d[p, L.odet + 1]
                                                  + coz * d[p, L.odet + 2] + cts * d[p, L.thickstep]
                                                  + cmu * d[p, L.mu])
                for s in range(nsrc):
                    ix = -sources[s, 0]
                    iy = -sources[s, 1]
                    iz = -sources[s, 2]
                    lam = lambdas[s]
                    so = L.sources + 3 * s
                    wsrc = beam.weights[s]
                    for x in range(n):
                        qx[x] = (dx[x] - ix) / lam
                        qy[x] = (dy[x] - iy) / lam
                        qz[x] = (dz[x] - iz) / lam
                        keep[x] = not beyond_dmin(qx[x], qy[x], qz[x], dmin)
                    if pending > 0:
                        # the polarization where the walk takes it, at the first kept sample;
                        # its tangents in i and the E-vector axis through the source's frame
                        Bx, By, Bz, bm, Ex, Ey, Ez, em = polarization_frame(ix, iy, iz, pv[0], pv[1], pv[2])
                        framed = bm != 0.0 and em != 0.0
                        for x in range(n):
                            fresh[x] = keep[x] and polar[x] == 0.0
                            p1, pk[x], pc[x], pX[x], pY[x] = polarization_parts(kahn, ix, iy, iz, dx[x], dy[x], dz[x],
                                                                                Bx, By, Bz, Ex, Ey, Ez, framed)
                            polar[x] = p1 if fresh[x] else polar[x]
                        for p in range(P):
                            if (flags[p] & (T_GEO | T_SRC | T_POL)) == 0:
                                continue
                            dk = d[p, L.kahn]
                            dix, diy, diz, dBx, dBy, dBz, dEx, dEy, dEz = _frame_tangents(
                                d, p, L, so, ix, iy, iz, pv, Bx, By, Bz, bm, Ex, Ey, Ez, em, framed)
                            ddp = dd[p] if (flags[p] & T_GEO) != 0 else zero4
                            for x in range(n):
                                v = _polarization_tangent(pk[x], pc[x], pX[x], pY[x], dk, dix, diy, diz, dBx, dBy,
                                                          dBz, dEx, dEy, dEz, ix, iy, iz, Bx, By, Bz, Ex, Ey, Ez,
                                                          dx[x], dy[x], dz[x], ddp[0, x], ddp[1, x], ddp[2, x])
                                dpol[p, x] = v if fresh[x] else dpol[p, x]
                        pending = 0
                        for x in range(n):
                            pending += 1 if polar[x] == 0.0 else 0
                    for x in range(n):
                        wv, ws, wB, cq = weight_partials(wsrc, B, qx[x], qy[x], qz[x])
                        w[x] = wv if keep[x] else 0.0
                        dws[x] = ws
                        dwB[x] = wB
                        cwq[x] = cq
                    if moves_q:
                        for p in range(P):
                            if (flags[p] & (T_GEO | T_SRC | T_LAM)) == 0:
                                continue
                            dlam = d[p, L.lambdas + s]
                            ddp = dd[p] if (flags[p] & T_GEO) != 0 else zero4
                            for x in range(n):
                                dq[p, 0, x] = (ddp[0, x] + d[p, so] - qx[x] * dlam) / lam
                                dq[p, 1, x] = (ddp[1, x] + d[p, so + 1] - qy[x] * dlam) / lam
                                dq[p, 2, x] = (ddp[2, x] + d[p, so + 2] - qz[x] * dlam) / lam
                    if nbg > 0:
                        _amorphous_lanes_tangent(S, s, t, n, d, L, flags, R, dx, dy, dz, qx, qy, qz, dd, dq, bg, dbg,
                                                 bgsq, redo, bgw)
                    orientation_lanes(ori, norient, qx, qy, qz, w, xt, fs, fflat, True, any_dori, no_gF, no_gor, sc,
                                      sums, n)
                    for x in range(n):
                        Tk[x] = 0.0
                        if keep[x]:
                            Tk[x] = block_total(acc, x)
                            I[x] += w[x] * Tk[x]
                    for p in range(P):
                        a = d[p, L.weights + s]
                        b = d[p, L.B]
                        if a != 0.0 or b != 0.0:
                            for x in range(n):
                                dI[p, x] += (dws[x] * a + dwB[x] * b) * Tk[x]
                        if (flags[p] & (T_GEO | T_SRC | T_LAM)) != 0:
                            for x in range(n):
                                dI[p, x] += (Wx[x] * dq[p, 0, x] + Wy[x] * dq[p, 1, x] + Wz[x] * dq[p, 2, x]
                                             + cwq[x] * (qx[x] * dq[p, 0, x] + qy[x] * dq[p, 1, x]
                                                         + qz[x] * dq[p, 2, x]) * Tk[x])
    # the sums' tangents in N, the default F and the orientations, once
    for p in range(P):
        aN = d[p, L.Na]
        bN = d[p, L.Nb]
        cN = d[p, L.Nc]
        dF = d[p, L.default_F]
        if aN != 0.0 or bN != 0.0 or cN != 0.0 or dF != 0.0:
            for x in range(n):
                dI[p, x] += aN * sums.SNa[x] + bN * sums.SNb[x] + cN * sums.SNc[x] + dF * sums.SD[x]
        if has_dori[p]:
            for i in range(9):
                for m in range(norient):
                    coef = d[p, L.orients + i * npad + m]
                    if coef != 0.0:
                        for x in range(n):
                            dI[p, x] += coef * sums.O[i, m, x]
    # the factors applied at the end (_t_finish), vectorised across the pixels
    value = np.empty(n)
    for x in range(n):
        value[x] = apply_final(samp, I[x], capture[x], polar[x], omega[x]) + bg[x]
        R[x] = final_factor(samp, capture[x], polar[x], omega[x])          # (R: scratch now)
    for p in range(P):
        cap_p = dcap[p] if det.thick != 0.0 and (flags[p] & (T_GEO | T_CAP)) != 0 else zrow
        pol_p = dpol[p] if not beam.nopolar and (flags[p] & (T_GEO | T_SRC | T_POL)) != 0 else zrow
        om_p = dom[p] if (flags[p] & (T_GEO | T_OMEGA)) != 0 else zrow
        for x in range(n):
            dI[p, x] = (dI[p, x] * R[x] + I[x] * cap_p[x] * polar[x] * omega[x]
                        + I[x] * pol_p[x] * capture[x] * omega[x] + I[x] * om_p[x] * capture[x] * polar[x]
                        + dbg[p, x])
    use_mask = det.use_mask
    mask = det.mask
    for x in range(n):
        fpixel = xmin + x
        if use_mask and mask[spixel, fpixel] == 0:
            continue
        image[spixel, fpixel] = value[x] * scale
        for p in range(P):
            J[spixel, fpixel, p] = scale * dI[p, x] + d[p, L.scale] * value[x]
